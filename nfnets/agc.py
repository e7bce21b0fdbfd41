"""Adaptive Gradient Clipping (AGC), unit-wise.

Implements AGC from Brock et al. 2021, "High-Performance Large-Scale Image
Recognition Without Normalization", Sec. 4.1: each unit (one output channel) of
a gradient is rescaled so that the ratio of its Frobenius norm to the norm of
the matching parameter unit never exceeds a threshold `clipping`.

`optax.adaptive_grad_clip` computes the same clip, but this version is its own
`GradientTransformation` so that it can (a) compute norms in float32 even for
bfloat16 grads/params, (b) skip leaves via a mask (the released code does not
clip the final classifier's weight), and (c) report the fraction of clipped units in its
state for logging. With the fast paths on (`nfnets.ops.switch`), the norms of
same-shaped leaves are reduced together (`nfnets.ops.norms`); off, each leaf
is clipped on its own, the same values.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from nfnets.ops import norms
from nfnets.ops import switch

# Floor on the grad norm in the denominator: only guards against 0/0 for
# all-zero grad units (which are never clipped anyway), so it never changes a
# result that is actually used. Same value as optax.
_DIV_EPS = 1e-6

MaskOrFn = Optional[Union[Any, Callable[[Any], Any]]]


class AGCState(NamedTuple):
  """State of `adaptive_grad_clip`.

  Attributes:
    clipped_fraction: float32 scalar, the fraction of units (over the masked-in
      leaves) that were clipped at the last update; 0.0 before any update.
  """
  clipped_fraction: jax.Array


def unitwise_norm(x: jax.Array) -> jax.Array:
  """Float32 Frobenius norm of each unit of `x`, keeping dims for broadcasting.

  A unit is one output channel, which Haiku stores on the last axis (dense
  kernels are [in, out], conv kernels HWIO), so for ndim >= 2 every axis but
  the last is fan-in and is reduced: [in, out] -> [1, out], [H, W, I, O] ->
  [1, 1, 1, O]. Scalars and vectors (biases, gains) are one unit each, so their
  whole norm is returned with shape () or (1,). Brock et al. 2021, Sec. 4.1.

  Args:
    x: parameter or gradient leaf, any float dtype.

  Returns:
    float32 array of norms, with x.ndim dims, broadcastable against `x`.
  """
  return jnp.sqrt(norms.unit_sum_squares([x])[0])


def clip_unitwise(
    grad: jax.Array,
    param: jax.Array,
    clipping: float,
    eps: float = 1e-3,
) -> tuple[jax.Array, jax.Array, int]:
  """Applies AGC to a single gradient leaf (Brock et al. 2021, Sec. 4.1).

  With `||W_i||* = max(||W_i||_F, eps)`, a unit whose ratio
  `||G_i||_F / ||W_i||*` exceeds `clipping` is rescaled to
  `clipping * ||W_i||* / ||G_i||_F * G_i`; other units are returned bit-exact.

  Args:
    grad: gradient leaf.
    param: parameter leaf of the same shape as `grad`.
    clipping: the clipping threshold lambda, > 0.
    eps: floor on the parameter norm, so that zero-initialised parameters can
      still receive (small) updates.

  Returns:
    `(clipped_grad, num_clipped_units, num_units)`: the clipped grad in
    `grad.dtype`, an int32 scalar count of the clipped units, and the static
    number of units in the leaf.
  """
  grad = jnp.asarray(grad)
  param = jnp.asarray(param)
  if grad.shape != param.shape:
    raise ValueError(
        f"grad and param shapes differ: {grad.shape} vs {param.shape}.")
  clipped, clip = _clip_leaf(grad, param, clipping, eps)
  return clipped, jnp.sum(clip, dtype=jnp.int32), int(clip.size)


def _clip_leaf(grad: jax.Array, param: jax.Array, clipping: float,
               eps: float) -> tuple[jax.Array, jax.Array]:
  """One leaf's clipped grad and its per-unit clip flags."""
  g_norm, p_norm = (jnp.sqrt(n)
                    for n in norms.unit_sum_squares([grad, param]))
  max_norm, clip = _limits(g_norm, p_norm, clipping, eps)
  return _clip(grad, g_norm, max_norm, clip), clip


def _limits(g_norm: jax.Array, p_norm: jax.Array, clipping: float,
            eps: float) -> tuple[jax.Array, jax.Array]:
  """Per unit: the largest allowed grad norm, and whether it is exceeded."""
  max_norm = clipping * jnp.maximum(p_norm, eps)
  return max_norm, g_norm > max_norm


def _clip(grad: jax.Array, g_norm: jax.Array, max_norm: jax.Array,
          clip: jax.Array) -> jax.Array:
  """Rescales the units of `grad` flagged in `clip` to norm `max_norm`."""
  scale = max_norm / jnp.maximum(g_norm, _DIV_EPS)
  clipped = (grad.astype(jnp.float32) * scale).astype(grad.dtype)
  # Selecting (rather than scaling by min(1, scale)) keeps unclipped units
  # bit-identical to the input, even for low-precision grads.
  return jnp.where(clip, clipped, grad)


def _resolve_mask(mask: MaskOrFn, params: Any) -> list[bool]:
  """Flattens `mask` (None, pytree or callable) to one bool per params leaf."""
  if mask is None:
    return [True] * len(jax.tree.leaves(params))
  if callable(mask):
    mask = mask(params)
  # jax.tree.map walks `mask` and hands each of its leaves the matching params
  # subtree, so a mask that is a prefix of params is broadcast over it.
  full = jax.tree.map(
      lambda m, sub: jax.tree.map(lambda _: bool(m), sub), mask, params)
  return jax.tree.leaves(full)


def adaptive_grad_clip(
    clipping: float,
    eps: float = 1e-3,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  """Unit-wise Adaptive Gradient Clipping (Brock et al. 2021, Sec. 4.1).

  Pure jnp, so it works under `jax.jit` and inside `jax.shard_map`; there each
  shard clips the leaves it sees, so leaves should be whole (e.g. replicated
  params and already-reduced grads) for the unit norms to be the global ones.

  Args:
    clipping: the clipping threshold lambda, > 0 (the paper uses 0.01 to 0.16
      depending on batch size).
    eps: floor on the parameter unit norm, > 0.
    mask: None to clip every leaf; otherwise a pytree of Python bools with the
      structure of params (or a prefix of it), or a callable mapping params to
      such a pytree, as `optax.masked` accepts. Leaves marked False pass
      through untouched and are not counted in the clipped fraction; use
      `classifier_mask` to exclude the final classifier's weight as the
      released code does.

  Returns:
    An `optax.GradientTransformation` whose `update` requires `params` and
    whose state is an `AGCState`.

  Raises:
    ValueError: if `clipping` or `eps` is not > 0.
  """
  if not clipping > 0:
    raise ValueError(f"AGC clipping must be > 0, got {clipping}.")
  if not eps > 0:
    raise ValueError(f"AGC eps must be > 0, got {eps}.")

  def init_fn(params: Any) -> AGCState:
    del params
    return AGCState(clipped_fraction=jnp.zeros((), jnp.float32))

  def update_fn(updates: Any, state: AGCState,
                params: Optional[Any] = None) -> tuple[Any, AGCState]:
    del state
    if params is None:
      raise ValueError(
          "adaptive_grad_clip needs params: call update(updates, state, "
          "params).")
    grads, treedef = jax.tree.flatten(updates)
    param_leaves = treedef.flatten_up_to(params)
    mask_leaves = _resolve_mask(mask, params)
    if len(mask_leaves) != len(grads):
      raise ValueError(
          f"AGC mask has {len(mask_leaves)} leaves but updates have "
          f"{len(grads)}.")

    clipped = [i for i, keep in enumerate(mask_leaves) if keep]
    for i in clipped:
      if jnp.shape(grads[i]) != jnp.shape(param_leaves[i]):
        raise ValueError(
            f"grad and param shapes differ: {jnp.shape(grads[i])} vs "
            f"{jnp.shape(param_leaves[i])}.")
    if switch.fast_paths_enabled():
      new_grads, flags = _clip_grouped(grads, param_leaves, clipped, clipping,
                                       eps)
    else:
      new_grads, flags = _clip_per_leaf(grads, param_leaves, clipped,
                                        clipping, eps)
    flags = jnp.concatenate(flags) if flags else jnp.zeros((0,), bool)
    fraction = (jnp.sum(flags, dtype=jnp.int32).astype(jnp.float32) /
                max(flags.size, 1))
    return (jax.tree.unflatten(treedef, new_grads),
            AGCState(clipped_fraction=fraction))

  return optax.GradientTransformation(init_fn, update_fn)


def _clip_per_leaf(grads, params, clipped, clipping, eps):
  """The plain twin: each clipped leaf's norms and clip on their own.

  Returns:
    (the new grad leaves, a list of each clipped leaf's flattened flags).
  """
  new_grads, flags = list(grads), []
  for i in clipped:
    new_grads[i], clip = _clip_leaf(grads[i], params[i], clipping, eps)
    flags.append(jnp.ravel(clip))
  return new_grads, flags


def _clip_grouped(grads, params, clipped, clipping, eps):
  """The fast path: norms reduced in groups of same-shaped leaves.

  Every clipped grad and param leaf goes into one `grouped_sum_squares`: a
  few dozen reductions in all. A leaf's grad and param share a group, grads
  first, in the same order. Returns what `_clip_per_leaf` returns.
  """
  new_grads, flags = list(grads), []
  for indices, sums in norms.grouped_sum_squares(
      [grads[i] for i in clipped] + [params[i] for i in clipped]):
    half = len(indices) // 2
    g_norms, p_norms = jnp.sqrt(sums[:half]), jnp.sqrt(sums[half:])
    for j, k in enumerate(indices[:half]):
      # Decided again per leaf (a few elementwise ops): XLA then fuses the
      # decision into the leaf's update instead of slicing stacked flags.
      new_grads[clipped[k]] = _clip(
          grads[clipped[k]], g_norms[j],
          *_limits(g_norms[j], p_norms[j], clipping, eps))
    # One count over every unit's flag, from the stacked norms.
    flags.append(jnp.ravel(_limits(g_norms, p_norms, clipping, eps)[1]))
  return new_grads, flags


def classifier_module(params: Mapping[str, Any],
                      classifier: str = "linear") -> str:
  """The path of the final classifier in a Haiku params tree.

  The classifier is the module whose path is exactly `<root>/~/<classifier>`,
  a direct child of the root module; deeper modules with the same name (e.g.
  the `linear` layers inside squeeze-excite blocks) are not the classifier.

  Args:
    params: Haiku params mapping from module path to that module's params.
    classifier: name of the classifier module under the root module.

  Returns:
    The module path, e.g. 'NFNet/~/linear'.

  Raises:
    ValueError: if `params` is not a mapping or no module matches.
  """
  if not isinstance(params, Mapping):
    raise ValueError(
        f"expected a Haiku params mapping, got {type(params)}.")
  top_level = set()
  for path in params:
    parts = str(path).split("/~/")
    if len(parts) >= 2:
      top_level.add(parts[1])
      if len(parts) == 2 and parts[1] == classifier:
        return path
  raise ValueError(
      f"No classifier module {classifier!r} directly under the root module; "
      f"top-level modules found: {sorted(top_level)}.")


def classifier_mask(params: Mapping[str, Any],
                    classifier: str = "linear") -> Any:
  """Builds an AGC mask that excludes the final classifier's weight.

  Brock et al. 2021, Sec. 4.1, find it best not to clip the final linear
  layer. The released code (`experiment_nfnets.py`, `_make_opt`) excludes
  its weight only: the classifier's bias sits with the gains and biases,
  which are clipped (and not decayed). `classifier_module` says which module
  the classifier is.

  Args:
    params: Haiku params mapping from module path to that module's params.
    classifier: name of the classifier module under the root module.

  Returns:
    A pytree with the structure of `params`: False for the classifier's
    weight `w`, True for every other leaf (its bias included).

  Raises:
    ValueError: if `params` is not a mapping or no module matches.
  """
  head = classifier_module(params, classifier)
  return jax.tree_util.tree_map_with_path(
      lambda kp, _: not (kp[0].key == head and kp[1].key == "w"), params)
