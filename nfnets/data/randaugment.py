"""RandAugment (Cubuk et al., 2019) in TensorFlow, the NFNet training policy.

The policy of the TPU EfficientNet / NFNet `distort_image_with_randaugment`: 16
ops, one shared magnitude on a 0..10 scale (`MAX_LEVEL`; larger values
extrapolate linearly, NFNet-F3+ use 15), `num_layers` ops applied in turn, each
picked uniformly and always applied (the reference draws a probability p ~
U[0.2, 0.8] per layer but never uses it, and the paper applies every op).
Geometric ops sample with nearest neighbour, as the reference, and fill with
grey 128; rotate, shear and translate get a random sign. The photometric ops
match PIL's ImageOps / ImageEnhance bit for bit (tests/test_randaugment.py),
Contrast included (the reference blends towards pixel count / 256 instead of
the mean grey level). Magnitudes map as in the reference, so Posterize keeps
`int(4 m / 10)` bits and Solarize inverts from `int(256 m / 10)` up: both
weaken as m grows.

Randomness is stateless: the output depends only on (image, seed), so it is
the same eagerly, in any `tf.data` map and on any host. TensorFlow is imported
inside functions only, so importing this module does not load it.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
       "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
       "TranslateX", "TranslateY", "Cutout", "SolarizeAdd")
MAX_LEVEL = 10.0
CUTOUT_CONST = 40  # Half-side of the Cutout square at magnitude 10.
TRANSLATE_CONST = 100  # Pixels at magnitude 10.
FILL = 128

Tensor = Any  # tf.Tensor; TensorFlow is not imported at module level.


def _blend(degenerate: Tensor, image: Tensor, factor: float) -> Tensor:
  """degenerate + factor * (image - degenerate), clipped and truncated.

  Truncation (not rounding) to uint8, in float32, as PIL's Image.blend.
  `degenerate` is float32, of the shape of `image` or a scalar.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = degenerate + factor * (tf.cast(image, tf.float32) - degenerate)
  return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)


def _luma(image: Tensor, channels: int = 1) -> Tensor:
  """float32 [H, W, channels] grey levels, PIL's integer RGB -> 'L' formula.

  (19595 r + 38470 g + 7471 b + 32768) >> 16, as a matmul: every product and
  partial sum is an integer below 2**24, so float32 is exact in any order.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  weights = tf.constant([[19595.0], [38470.0], [7471.0]])
  rgb = tf.reshape(tf.cast(image, tf.float32), [-1, 3])
  dot = tf.matmul(rgb, tf.tile(weights, [1, channels]))
  grey = tf.floor((dot + 32768.0) * (1.0 / 65536.0))
  return tf.reshape(grey, tf.concat([tf.shape(image)[:2], [channels]], 0))


def _sharpness(image: Tensor, factor: float) -> Tensor:
  """ImageEnhance.Sharpness: a blend away from PIL's SMOOTH filter.

  The filter, 3x3 [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, covers the interior
  only; the one-pixel border of the degenerate image is the original, so the
  border of the blend is too and only the interior is blended.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[None], kernel,
                                  [1, 1, 1, 1], "VALID")[0]
  inner = _blend(tf.round(smooth), image[1:-1, 1:-1], factor)
  middle = tf.concat([image[1:-1, :1], inner, image[1:-1, -1:]], 1)
  return tf.concat([image[:1], middle, image[-1:]], 0)


def _channel_index(image: Tensor) -> Tensor:
  """Flat int32 value + 256 * channel of each element of `image`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # A full-length tiled offset: much faster than broadcasting a [3] vector.
  offsets = tf.tile(tf.range(0, 768, 256), [tf.size(image) // 3])
  return tf.reshape(tf.cast(image, tf.int32), [-1]) + offsets


def _autocontrast(image: Tensor) -> Tensor:
  """Stretches each channel's [min, max] to [0, 255] (ImageOps.autocontrast)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  lo = tf.cast(tf.reduce_min(image, [0, 1]), tf.float64)
  hi = tf.cast(tf.reduce_max(image, [0, 1]), tf.float64)
  # PIL's float64 LUT, floor(v * scale - lo * scale), evaluated per pixel (no
  # gather); flat channels (hi == lo) are left alone: v * 1 - 0. As lo <= v <=
  # hi, the result lies in [0, 255] without PIL's clipping.
  stretch = hi > lo
  scale = tf.where(stretch, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  offset = tf.where(stretch, lo * scale, 0.0)
  pixels = tf.size(image) // 3
  values = tf.cast(tf.reshape(image, [-1]), tf.float64)
  out = tf.floor(values * tf.tile(scale, [pixels]) - tf.tile(offset, [pixels]))
  return tf.reshape(tf.cast(out, tf.uint8), tf.shape(image))


def _equalize(image: Tensor) -> Tensor:
  """Per-channel histogram equalisation, PIL's ImageOps.equalize LUT."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  index = _channel_index(image)
  hist = tf.reshape(tf.math.bincount(index, minlength=768, maxlength=768),
                    [3, 256])
  last = tf.reduce_max(tf.where(hist > 0, tf.range(256), -1), 1)
  # Pixels outside the last occupied bin, spread over 255 steps.
  step = (tf.reduce_sum(hist, 1) - tf.gather(hist, last, batch_dims=1)) // 255
  step = step[:, None]
  cumulative = tf.cumsum(hist, 1, exclusive=True)
  luts = tf.minimum((cumulative + step // 2) // tf.maximum(step, 1), 255)
  luts = tf.cast(tf.where(step > 0, luts, tf.range(256)[None]), tf.uint8)
  return tf.reshape(tf.gather(tf.reshape(luts, [-1]), index), tf.shape(image))


def _transform(image: Tensor, matrix: list[Any]) -> Tensor:
  """Projective warp, [a0, a1, a2, b0, b1, b2] mapping output to input x, y.

  The kernel warps a map of pixel numbers (1 + y W + x; 0, the fill, selects
  a grey pixel) rather than the image: one lookup per pixel, not per channel.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  transform = tf.stack([tf.cast(v, tf.float32) for v in matrix] + [0.0, 0.0])
  size = tf.shape(image)[:2]
  numbers = tf.reshape(tf.range(1, size[0] * size[1] + 1),
                       [1, size[0], size[1], 1])
  source = tf.raw_ops.ImageProjectiveTransformV3(
      images=numbers, transforms=transform[None], output_shape=size,
      fill_value=0.0, interpolation="NEAREST", fill_mode="CONSTANT")
  grey = tf.fill([1, 3], tf.constant(FILL, tf.uint8))
  pixels = tf.concat([grey, tf.reshape(image, [-1, 3])], 0)
  return tf.gather(pixels, source[0, :, :, 0])


def _rotate(image: Tensor, radians: Tensor) -> Tensor:
  """Rotation about the image centre ((W - 1) / 2, (H - 1) / 2)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  size = tf.cast(tf.shape(image)[:2], tf.float32)
  cy, cx = (size[0] - 1) / 2, (size[1] - 1) / 2
  cos, sin = tf.cos(radians), tf.sin(radians)
  return _transform(image, [cos, -sin, cx - cos * cx + sin * cy,
                            sin, cos, cy - sin * cx - cos * cy])


def _cutout(image: Tensor, half: int, seed: Tensor) -> Tensor:
  """Greys the (2 half)^2 square, clipped to the image, at a uniform centre."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if half <= 0:
    return image
  size = tf.shape(image)[:2]
  u = tf.random.stateless_uniform([2], seed)
  centre = tf.cast(tf.floor(u * tf.cast(size, tf.float32)), tf.int32)
  # The square is [c - half, c + half) in rows and columns, clipped.
  (y0, x0), (y1, x1) = (tf.unstack(tf.clip_by_value(centre + d, 0, size))
                        for d in (-half, half))
  grey = tf.fill([y1 - y0, x1 - x0, tf.shape(image)[2]],
                 tf.constant(FILL, tf.uint8))
  band = tf.concat([image[y0:y1, :x0], grey, image[y0:y1, x1:]], 1)
  return tf.concat([image[:y0], band, image[y1:]], 0)


def _solarize(image: Tensor, threshold: int) -> Tensor:
  """Inverts values >= threshold; 255 - v is v ^ 255 on uint8."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if threshold <= 0:
    return 255 - image
  if threshold > 255:
    return image
  flip = tf.cast(image >= tf.constant(threshold, tf.uint8), tf.uint8) * 255
  return tf.bitwise.bitwise_xor(image, flip)


def _solarize_add(image: Tensor, addition: int) -> Tensor:
  """Adds `addition` to values below 128, saturating at 0 and 255."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  low = tf.cast(image < tf.constant(128, tf.uint8), tf.uint8)
  step = tf.constant(min(abs(addition), 255), tf.uint8)
  # uint8 throughout: adds min(step, 255 - v) (or subtracts min(step, v)) where
  # v < 128, 0 elsewhere.
  if addition >= 0:
    return image + tf.minimum(low * step, 255 - image)
  return image - tf.minimum(low * step, image)


def apply_op(image: Tensor, op_name: str, magnitude: float,
             seed: Tensor) -> Tensor:
  """Applies one RandAugment op (always, no skip probability).

  Args:
    image: uint8 [H, W, 3].
    op_name: one of `OPS`.
    magnitude: strength on the 0..MAX_LEVEL scale (larger extrapolates).
    seed: int32/int64 [2] stateless seed (the sign or the Cutout centre).

  Returns:
    uint8 [H, W, 3], the shape of `image`.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  image = tf.convert_to_tensor(image, tf.uint8)
  level = magnitude / MAX_LEVEL
  sign = tf.where(tf.random.stateless_uniform([], seed) < 0.5, -1.0, 1.0)
  factor = 0.1 + 1.8 * level  # The ImageEnhance ops.
  if op_name == "AutoContrast":
    out = _autocontrast(image)
  elif op_name == "Equalize":
    out = _equalize(image)
  elif op_name == "Invert":
    out = 255 - image
  elif op_name == "Rotate":
    out = _rotate(image, sign * math.radians(30.0 * level))
  elif op_name == "Posterize":  # Keeps the top `bits` bits of each value.
    shift = 8 - min(max(int(4 * level), 0), 8)
    out = tf.bitwise.bitwise_and(image, tf.constant(0xFF >> shift << shift,
                                                    tf.uint8))
  elif op_name == "Solarize":
    out = _solarize(image, int(256 * level))
  elif op_name == "SolarizeAdd":
    out = _solarize_add(image, int(110 * level))
  elif op_name == "Color":
    out = _blend(_luma(image, 3), image, factor)
  elif op_name == "Contrast":  # Towards the rounded mean grey level.
    mean = tf.reduce_mean(tf.cast(_luma(image), tf.float64))
    out = _blend(tf.cast(tf.floor(mean + 0.5), tf.float32), image, factor)
  elif op_name == "Brightness":  # Towards black.
    out = _blend(0.0, image, factor)
  elif op_name == "Sharpness":
    out = _sharpness(image, factor)
  elif op_name == "ShearX":
    out = _transform(image, [1.0, sign * 0.3 * level, 0.0, 0.0, 1.0, 0.0])
  elif op_name == "ShearY":
    out = _transform(image, [1.0, 0.0, 0.0, sign * 0.3 * level, 1.0, 0.0])
  elif op_name == "TranslateX":  # Content moves by +-pixels.
    out = _transform(image, [1.0, 0.0, -sign * TRANSLATE_CONST * level,
                             0.0, 1.0, 0.0])
  elif op_name == "TranslateY":
    out = _transform(image, [1.0, 0.0, 0.0,
                             0.0, 1.0, -sign * TRANSLATE_CONST * level])
  elif op_name == "Cutout":
    out = _cutout(image, int(CUTOUT_CONST * level), seed)
  else:
    raise ValueError(f"unknown RandAugment op {op_name!r}; expected one of "
                     f"{OPS}")
  return tf.ensure_shape(out, image.shape)


def randaugment(image: Tensor, seed: Tensor, num_layers: int,
                magnitude: float) -> Tensor:
  """Applies `num_layers` uniformly picked ops at `magnitude`.

  Args:
    image: uint8 [H, W, 3]; H and W may be unknown when tracing.
    seed: int32/int64 [2] stateless seed; the output depends only on
      (image, seed).
    num_layers: ops applied in sequence (N in the paper); 0 returns `image`.
    magnitude: shared strength on the 0..MAX_LEVEL scale (M in the paper).

  Returns:
    uint8 [H, W, 3], the shape of `image`.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  image = tf.convert_to_tensor(image, tf.uint8)
  if num_layers <= 0:
    return image
  seed = tf.convert_to_tensor(seed)
  split = tf.random.experimental.stateless_split
  for layer_seed in tf.unstack(split(seed, num_layers)):
    pick, op_seed = tf.unstack(split(layer_seed, 2))
    index = tf.random.stateless_uniform([], pick, maxval=len(OPS),
                                        dtype=tf.int32)
    branches: list[Callable[[], Tensor]] = [
        functools.partial(apply_op, image, name, magnitude, op_seed)
        for name in OPS]
    image = tf.switch_case(index, branches)
  return image
