"""The 2D convolution of the models (NHWC, HWIO, SAME padding).

XLA computes the input gradient of a grouped convolution as a forward
convolution of the output gradient with the regrouped, flipped kernel (its
cuDNN rewriter does not use cuDNN's backward-data call for groups). For a
strided convolution that forward convolution runs over the output gradient
with `stride - 1` zeros interleaved between its pixels: at stride 2, four
times the multiply-adds of the forward convolution, three quarters of them
with zeros, plus a kernel that writes the zero-interleaved gradient. NFNets
have such a convolution in the first block of each strided stage.

`conv2d` gives strided grouped convolutions a polyphase input gradient: each
of the `stride**2` phases of the input (pixels at `(s*u + r, s*v + q)`) gets
its gradient from a stride-1 convolution of the output gradient with the
taps of the kernel that reach it (2x2, 2x1, 1x2 and 1x1 taps for a 3x3
kernel at stride 2), and the phases are interleaved. The multiply-adds are
those of the forward convolution, with no zeros. Other convolutions, and
all of them with the fast paths off (`nfnets.ops.switch`), use XLA's own
gradients (`xla_conv2d`, the plain twin). The polyphase gradient is a
custom VJP, so with the fast paths on, strided grouped convolutions are
differentiable in reverse mode only (as are the other fast paths).
"""

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from nfnets.ops import switch

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def conv2d(x: jax.Array, kernel: jax.Array, stride: Sequence[int],
           groups: int) -> jax.Array:
  """`lax.conv_general_dilated` with SAME padding, NHWC input, HWIO kernel.

  Args:
    x: [N, H, W, C_in].
    kernel: [kh, kw, C_in / groups, C_out], x's dtype.
    stride: (sh, sw).
    groups: feature group count.

  Returns:
    [N, ceil(H / sh), ceil(W / sw), C_out].
  """
  stride = tuple(stride)
  if groups > 1 and max(stride) > 1 and switch.fast_paths_enabled():
    return _polyphase_conv(x, kernel, stride, groups)
  return _conv(x, kernel, stride, groups)


def xla_conv2d(x: jax.Array, kernel: jax.Array, stride: Sequence[int],
               groups: int) -> jax.Array:
  """The same convolution with XLA's gradients: `conv2d`'s plain twin."""
  return _conv(x, kernel, tuple(stride), groups)


def _conv(x, kernel, stride, groups, padding="SAME"):
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=stride, padding=padding,
      dimension_numbers=_DIMENSIONS, feature_group_count=groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _polyphase_conv(x, kernel, stride, groups):
  return _conv(x, kernel, stride, groups)


def _polyphase_fwd(x, kernel, stride, groups):
  return _conv(x, kernel, stride, groups), (x, kernel)


def _polyphase_bwd(stride, groups, residuals, d_out):
  x, kernel = residuals
  _, kernel_vjp = jax.vjp(lambda k: _conv(x, k, stride, groups), kernel)
  d_x = _input_gradient(d_out, kernel, x.shape, stride, groups)
  return d_x, kernel_vjp(d_out)[0]


_polyphase_conv.defvjp(_polyphase_fwd, _polyphase_bwd)


def _same_padding(size: int, k: int, s: int) -> tuple[int, int]:
  """XLA's SAME padding (low, high) of one spatial dimension."""
  total = max((math.ceil(size / s) - 1) * s + k - size, 0)
  return total // 2, total - total // 2


def _input_gradient(d_out, kernel, x_shape, stride, groups):
  """The gradient of a SAME conv with respect to its input, by phases.

  In one dimension, with the input padded by `lo` (padded length L), the
  padded input gradient at `m = s*u + r` is `sum_j w[s*j + r] d_out[u - j]`:
  a stride-1 correlation of `d_out` with the phase's taps reversed, padded
  by `J_r - 1` in front for `J_r` taps. Each phase is computed with the same
  padding at both ends (cuDNN takes only symmetric padding; anything else
  would copy `d_out` into a padded array), then cropped.
  """
  kh, kw, in_per_group, out_ch = kernel.shape
  # Regroup for the transposed problem: [kh, kw, out/groups, in].
  k = kernel.reshape(kh, kw, in_per_group, groups, out_ch // groups)
  k = k.transpose(0, 1, 4, 3, 2).reshape(kh, kw, out_ch // groups,
                                         groups * in_per_group)
  n, height, width, in_ch = x_shape
  (sh, sw), (ho, wo) = stride, d_out.shape[1:3]
  lo_h, hi_h = _same_padding(height, kh, sh)
  lo_w, hi_w = _same_padding(width, kw, sw)
  rows = -(-(height + lo_h + hi_h) // sh)  # phase-0 length, the longest
  cols = -(-(width + lo_w + hi_w) // sw)

  def phase(r, q):
    taps = k[r::sh, q::sw][::-1, ::-1]
    if taps.shape[0] == 0 or taps.shape[1] == 0:
      return jnp.zeros((n, rows, cols, in_ch), d_out.dtype)
    pads, crops = [], []
    for taps_len, out_len, length in ((taps.shape[0], ho, rows),
                                      (taps.shape[1], wo, cols)):
      pad = max(taps_len - 1, length - out_len)
      pads.append((pad, pad))
      crops.append(slice(pad - (taps_len - 1), pad - (taps_len - 1) + length))
    grad = _conv(d_out, taps, (1, 1), groups, padding=pads)
    # Rows past this phase's own length are zero padding: the crop below
    # removes them.
    return grad[:, crops[0], crops[1], :]

  phases = jnp.stack([jnp.stack([phase(r, q) for q in range(sw)], axis=3)
                      for r in range(sh)], axis=2)  # [n, rows, sh, cols, sw, c]
  padded = phases.reshape(n, rows * sh, cols * sw, in_ch)
  return padded[:, lo_h:lo_h + height, lo_w:lo_w + width, :]
