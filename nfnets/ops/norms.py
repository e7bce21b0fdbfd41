"""Float32 sums of squares of parameter and gradient trees, by unit or whole.

AGC needs the norm of every unit (output channel) of every gradient and
parameter leaf, and the trainer logs the global gradient norm. A network has
~200 leaves; reduced one by one, that is ~200 reductions (on GPUs each a
kernel launch) for each. The fast path stacks leaves of the same shape and
reduces each stack at once: a few dozen reductions, the same values. Its
plain twin (`nfnets.ops.switch`) reduces each leaf on its own.

A unit is one output channel, which Haiku stores on the last axis (dense
kernels [in, out], conv kernels HWIO): for ndim >= 2 every axis but the last
is reduced; scalars and vectors (biases, gains) are one unit each.
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from nfnets.ops import switch


def unit_axes(ndim: int, offset: int = 0) -> tuple[int, ...]:
  """The fan-in axes of a leaf of `ndim` dims (all of them for ndim <= 1)."""
  last = ndim if ndim <= 1 else ndim - 1
  return tuple(range(offset, offset + last))


def _sum_squares(x: jax.Array, offset: int = 0) -> jax.Array:
  # Upcast first: a bf16/fp16 sum of squares loses precision or overflows.
  x = jnp.asarray(x).astype(jnp.float32)
  return jnp.sum(jnp.square(x), axis=unit_axes(x.ndim - offset, offset),
                 keepdims=True)


def grouped_sum_squares(
    leaves: Sequence[jax.Array]) -> list[tuple[list[int], jax.Array]]:
  """Unit sums of squares, one reduction per group of same-shaped leaves.

  The fast path of `unit_sum_squares`, by group.

  Args:
    leaves: arrays of any float dtype.

  Returns:
    (leaf indices, their float32 unit sums stacked on a new leading axis)
    for each group of leaves of one shape, in order of first appearance.
  """
  groups: dict[tuple[int, ...], list[int]] = {}
  for i, x in enumerate(leaves):
    groups.setdefault(jnp.shape(x), []).append(i)
  return [(indices, _sum_squares(jnp.stack(
      [jnp.asarray(leaves[i]).astype(jnp.float32) for i in indices]),
                                   offset=1))
          for indices in groups.values()]


def unit_sum_squares(leaves: Sequence[jax.Array]) -> list[jax.Array]:
  """Float32 sum of squares of each unit of each leaf, keeping dims.

  Args:
    leaves: arrays of any float dtype.

  Returns:
    One float32 array per leaf, with the leaf's ndim, broadcastable against
    it: [H, W, I, O] -> [1, 1, 1, O], [O] -> [1], () -> ().
  """
  if not switch.fast_paths_enabled():
    return [_sum_squares(x) for x in leaves]
  sums: list[Any] = [None] * len(leaves)
  for indices, stacked in grouped_sum_squares(leaves):
    for j, i in enumerate(indices):
      sums[i] = stacked[j]
  return sums


def global_norm(tree: Any) -> jax.Array:
  """Float32 L2 norm of all leaves together (`optax.global_norm`'s value)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  if not switch.fast_paths_enabled():
    return jnp.sqrt(sum(jnp.sum(_sum_squares(x)) for x in leaves))
  # One sum over all the partial sums (XLA may still split it per group).
  return jnp.sqrt(jnp.sum(jnp.concatenate(
      [jnp.ravel(s) for _, s in grouped_sum_squares(leaves)])))
