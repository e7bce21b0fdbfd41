"""Sharpness-Aware Minimization (SAM) as a gradient computation.

Implements SAM from Foret et al. 2021, "Sharpness-Aware Minimization for
Efficiently Improving Generalization" (ICLR 2021), Eq. 2-3: with
`g = grad L(w)` the ascent step is `e = rho * g / ||g||_2` (one global L2 norm
over every parameter) and the step's gradient is `grad L(w + e)`, taken with
`e` held constant (the paper drops the second-order term).

Why this is not an `optax.GradientTransformation`: SAM must evaluate the loss
gradient a second time at the perturbed point `w + e`, and an optax `update`
only ever sees the gradient at `w`; it cannot call the loss. So the train step
calls `sam_gradient` in place of `jax.value_and_grad`, averages the result over
devices like any gradient, and hands it to the base optimizer unchanged. This
is how SAM wraps *any* base optimizer, and how it composes with the rest of
the NFNet recipe:

* AGC (`nfnets.agc`) clips the SAM gradient relative to the ORIGINAL params
  `w` (`optimizer.update(grads, opt_state, params)` with `params = w`): `w + e`
  is only a probe point and is never stored.
* Decoupled weight decay, momentum and the learning rate act on `w` as usual.
* The EMA averages the updated `w`, never `w + e`.
* The loss, logits and model state reported are those at `w` (the first
  evaluation), so metrics mean the same with and without SAM.

NFNet-F6 was trained with SAM whose ascent step is computed per device, without
synchronising the ascent gradient across devices (Brock et al. 2021, "High-
Performance Large-Scale Image Recognition Without Normalization", ICML 2021,
Sec. 6 and appendix); this is Foret et al.'s m-sharpness (Sec. 4.1), with m the
per-device batch, which they found generalises at least as well as full-batch
SAM while saving one all-reduce. `sync_ascent` selects between the two.
"""

from collections.abc import Callable
from typing import Any, Optional

import jax
from jax import lax
import jax.numpy as jnp

from nfnets.ops import norms


def sam_gradient(
    loss_fn: Callable[..., Any],
    params: Any,
    rho: float,
    *,
    axis_name: Optional[str] = None,
    sync_ascent: bool = True,
    eps: float = 1e-12,
    has_aux: bool = False,
) -> tuple[Any, Any]:
  """Value at `w` and SAM gradient `grad L(w + e)` (Foret et al. 2021, Eq. 3).

  With `g = grad L(w)` (device-averaged first if `axis_name` is given and
  `sync_ascent`), `e = rho * g / (||g||_2 + eps)`, the norm being one float32
  L2 norm over the whole tree, and the returned gradient is that of `loss_fn`
  at `w + e` with respect to its argument, i.e. without differentiating
  through `e`. `loss_fn` is called twice with the same closure, so any
  randomness it closes over (dropout, stochastic depth) is the same in both
  passes.

  The returned gradient is this device's own: the caller `lax.pmean`s it over
  the data axis as it would a plain gradient. With synchronised ascent that
  mean is the full-batch SAM gradient; without, each device probes its own
  `w + e_k` (the per-device variant used for NFNet-F6, Brock et al. 2021).

  Args:
    loss_fn: `params -> loss`, or `params -> (loss, aux)` if `has_aux`; the
      loss a real scalar.
    params: the current parameters `w`, any pytree.
    rho: the neighbourhood radius, a Python float >= 0. `rho == 0` is plain
      `jax.value_and_grad` (exactly, and with one pass).
    axis_name: the mapped data axis (e.g. `'data'` under `jax.shard_map` or
      `pmap`); None when not mapped.
    sync_ascent: with `axis_name`, whether the ascent gradient is averaged
      over the axis before normalising (True) or each device ascends along
      its local gradient (False). Ignored without `axis_name`.
    eps: added to the gradient norm so that a zero gradient gives `e = 0`.
    has_aux: whether `loss_fn` returns `(loss, aux)`.

  Returns:
    Like `jax.value_and_grad(loss_fn, has_aux=has_aux)(params)`:
    `(loss, sam_grads)`, or `((loss, aux), sam_grads)` if `has_aux`, where the
    loss and aux are from the evaluation at `w` and `sam_grads` (same tree and
    dtypes as the gradient of `params`) from the one at `w + e`.

  Raises:
    ValueError: if `rho` is negative or NaN.
  """
  rho = float(rho)
  if not rho >= 0:
    raise ValueError(f"SAM rho must be >= 0, got {rho}.")
  value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)
  if rho == 0:
    # Python-level short-cut: bit-identical to no SAM and a single pass.
    return value_and_grad(params)

  value, grads = value_and_grad(params)
  ascent = grads
  if axis_name is not None and sync_ascent:
    ascent = lax.pmean(ascent, axis_name)
  # The scale is computed in float32; each leaf of e is cast back to its
  # parameter's dtype so that w + e has exactly the structure loss_fn expects.
  scale = rho / (norms.global_norm(ascent) + eps)
  perturbed = jax.tree.map(
      lambda p, g: p + (g.astype(jnp.float32) * scale).astype(p.dtype),
      params, ascent)
  # e is a constant here: grad is taken w.r.t. the perturbed point itself, so
  # no second-order term flows back through the ascent step.
  grad_fn = jax.grad(loss_fn, has_aux=has_aux)
  sam_grads = grad_fn(perturbed)
  if has_aux:
    sam_grads, _ = sam_grads  # the aux at w + e is a probe's, not reported
  return value, sam_grads
