"""Scaled Weight Standardization of a kernel (ICLR 2021, Eq. 4).

`standardize_weight` has two sides (`nfnets.ops.switch`): the fast path
computes the statistics in one pass and differentiates in closed form (a
custom VJP, reverse mode only); its plain twin, `plain_standardize_weight`,
is the two-pass formula as written, differentiated by JAX. Differentiating
the formula made about ten GPU kernels per convolution at every step, mostly
tiny reductions (`benchmarks/kernel_census.py` counts them).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nfnets.ops import switch


def standardize_weight(w: jax.Array, gain: jax.Array,
                       eps: float = 1e-4) -> jax.Array:
  """Scaled Weight Standardization of an HWIO kernel, computed in float32.

  `W_hat = gain * (W - mean) / sqrt(N * var)` per output channel, over its
  fan-in N = H * W * I, with `N * var` floored at `eps` (ICLR 2021, Eq. 4).

  The values are those of the two-pass formula (mean, then the variance
  about it); the statistics are computed in one pass over the kernel and the
  gradient is the closed-form normalization backward (two sums per output
  channel in one pass, then one elementwise pass), a custom VJP (so reverse
  mode only). With the fast paths off, `plain_standardize_weight`.

  Args:
    w: kernel [..., O], any float dtype.
    gain: [O].
    eps: floor of `N * var`.

  Returns:
    The standardized kernel in float32.
  """
  w, gain = w.astype(jnp.float32), gain.astype(jnp.float32)
  if not switch.fast_paths_enabled():
    return plain_standardize_weight(w, gain, eps)
  return _standardize(w, gain, eps)


def plain_standardize_weight(w: jax.Array, gain: jax.Array,
                             eps: float = 1e-4) -> jax.Array:
  """`standardize_weight`'s plain twin: the two-pass formula, in float32."""
  w, gain = w.astype(jnp.float32), gain.astype(jnp.float32)
  axes = tuple(range(w.ndim - 1))
  mean = jnp.mean(w, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(w - mean), axis=axes, keepdims=True)
  fan_in = np.prod(w.shape[:-1])
  return (w - mean) * jax.lax.rsqrt(jnp.maximum(var * fan_in, eps)) * gain


def _moments(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-output-channel mean and (population) variance of a [..., O] kernel.

  One pass: sums of x and x^2 with x shifted by one element of each channel,
  which keeps E[x^2] - E[x]^2 accurate even when the mean dwarfs the spread
  (the shift is a sample of the channel, so close to its mean).
  """
  axes = tuple(range(w.ndim - 1))
  shift = jax.lax.stop_gradient(w[(0,) * (w.ndim - 1)])
  x = w - shift
  mean_x = jnp.mean(x, axis=axes, keepdims=True)
  var = jnp.maximum(jnp.mean(x * x, axis=axes, keepdims=True) - mean_x ** 2,
                    0.0)
  return mean_x + shift, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _standardize(w: jax.Array, gain: jax.Array, eps: float) -> jax.Array:
  return _standardize_fwd(w, gain, eps)[0]


def _standardize_fwd(w, gain, eps):
  fan_in = np.prod(w.shape[:-1])
  mean, var = _moments(w)
  n_var = var * fan_in
  inv_std = jax.lax.rsqrt(jnp.maximum(n_var, eps))
  scale = inv_std * gain
  return w * scale - mean * scale, (w, gain, mean, inv_std, n_var > eps)


def _standardize_bwd(eps, residuals, d_out):
  """Backward of `gain * x_hat`, `x_hat = (w - mean) * inv_std`.

  With `dx = d_out * gain`, per output channel: `d_gain = sum(d_out x_hat)`
  and `d_w = inv_std (dx - mean(dx) - x_hat sum(dx x_hat))`; the last term
  is absent where the variance floor `eps` is active (inv_std constant).
  """
  del eps
  w, gain, mean, inv_std, unclamped = residuals
  axes = tuple(range(w.ndim - 1))
  x_hat = (w - mean) * inv_std
  sum_d = jnp.sum(d_out, axis=axes, keepdims=True)
  sum_d_x = jnp.sum(d_out * x_hat, axis=axes, keepdims=True)
  fan_in = np.prod(w.shape[:-1])
  d_w = inv_std * gain * (d_out - sum_d / fan_in -
                          jnp.where(unclamped, x_hat * sum_d_x, 0.0))
  return d_w, jnp.reshape(sum_d_x, gain.shape)


_standardize.defvjp(_standardize_fwd, _standardize_bwd)
