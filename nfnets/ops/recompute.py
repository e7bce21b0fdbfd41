"""Activations whose backward pass keeps only their input.

Differentiating e.g. GELU stores its tanh beside its input: one more
activation-sized array written in the forward pass and read in the backward
pass, for each activation of the network (F0 at 192 px: 11% of the training
step's activation traffic and 26% of its peak memory, counted by
`benchmarks/kernel_census.py`). `recomputed(f)` keeps only the input and
recomputes f inside the backward pass's elementwise kernel; with the fast
paths off (`nfnets.ops.switch`) it returns f itself, differentiated by JAX.
"""

from typing import Callable

import jax

from nfnets.ops import switch

Activation = Callable[[jax.Array], jax.Array]


def recomputed(f: Activation) -> Activation:
  """f, whose backward pass keeps only the input and recomputes f from it.

  Like `jax.checkpoint(f)`, but only the saved input goes through the
  optimization barrier that keeps XLA from merging the recomputation with
  the forward pass's (which would store f's intermediates again):
  `jax.checkpoint` also puts the incoming gradient through it, so whatever
  produces that gradient (a slice after a strided convolution's input
  gradient, the phase interleaving of `nfnets.ops.conv`) cannot fuse into the
  backward kernel and is written out once more.

  The side is chosen where the result is called (traced), not where it is
  made: with the fast paths off (`nfnets.ops.switch`) it calls `f` itself,
  the plain twin.
  """

  @jax.custom_vjp
  def g(x):
    return f(x)

  def g_fwd(x):
    return f(x), x

  def g_bwd(x, d_out):
    _, vjp = jax.vjp(f, jax.lax.optimization_barrier(x))
    return vjp(d_out)

  g.defvjp(g_fwd, g_bwd)

  def call(x: jax.Array) -> jax.Array:
    return g(x) if switch.fast_paths_enabled() else f(x)

  return call
