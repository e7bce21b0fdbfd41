"""RandAugment (Cubuk et al., 2019) in TensorFlow, the NFNet training policy.

The policy of the TPU EfficientNet / NFNet `distort_image_with_randaugment`:
16 ops, one shared magnitude on a 0..10 scale (`MAX_LEVEL`; larger values
extrapolate linearly, NFNet-F3+ use 15), `num_layers` ops applied in turn,
each picked uniformly and always applied (the reference draws a probability
p ~ U[0.2, 0.8] per layer but never uses it; so does the paper). Geometric ops sample with nearest
neighbour, as the reference, and fill with grey 128; rotate, shear and
translate get a random sign. The photometric ops match PIL's ImageOps /
ImageEnhance bit for bit (tests/test_randaugment.py), Contrast included (the
reference blends towards pixel count / 256 instead of the mean grey level).
Magnitudes map as in the reference, so Posterize keeps `int(4 m / 10)` bits
and Solarize inverts from `int(256 m / 10)` up: both weaken as m grows.

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
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  d = tf.cast(degenerate, tf.float32)
  out = d + factor * (tf.cast(image, tf.float32) - d)
  return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)


def _luma(image: Tensor) -> Tensor:
  """int32 [H, W, 1] grey levels, PIL's exact integer RGB -> 'L' formula."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rgb = tf.cast(image, tf.int32)
  weighted = rgb * tf.constant([19595, 38470, 7471], tf.int32)
  return (tf.reduce_sum(weighted, -1, keepdims=True) + 32768) // 65536


def _degenerate(image: Tensor, op: str) -> Tensor:
  """The image that an ImageEnhance op blends away from (factor 0)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if op == "Color":
    return tf.broadcast_to(_luma(image), tf.shape(image))
  if op == "Contrast":  # A flat image at the rounded mean grey level.
    mean = tf.reduce_mean(tf.cast(_luma(image), tf.float64))
    return tf.fill(tf.shape(image), tf.floor(mean + 0.5))
  if op == "Brightness":
    return tf.zeros_like(image)
  # Sharpness: PIL's SMOOTH filter, 3x3 [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13
  # on the interior; the one-pixel border keeps the original values.
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  inner = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[None], kernel,
                                 [1, 1, 1, 1], "VALID")[0]
  border = [[1, 1], [1, 1], [0, 0]]
  interior = tf.pad(tf.ones_like(inner, tf.bool), border)
  return tf.where(interior, tf.pad(tf.round(inner), border),
                  tf.cast(image, tf.float32))


def _lut_per_channel(image: Tensor, luts: Tensor) -> Tensor:
  """Maps each channel c of `image` through `luts[c]` (int [3, 256])."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  index = tf.cast(image, tf.int32) + tf.range(3) * 256
  return tf.cast(tf.gather(tf.reshape(luts, [-1]), index), tf.uint8)


def _autocontrast(image: Tensor) -> Tensor:
  """Stretches each channel's [min, max] to [0, 255] (ImageOps.autocontrast)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  lo = tf.cast(tf.reduce_min(image, [0, 1]), tf.float64)[:, None]
  hi = tf.cast(tf.reduce_max(image, [0, 1]), tf.float64)[:, None]
  # PIL's float64 scale and offset, truncated, so that results match exactly.
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  levels = tf.range(256, dtype=tf.float64)[None]
  luts = tf.clip_by_value(tf.floor(levels * scale - lo * scale), 0.0, 255.0)
  return _lut_per_channel(image, tf.where(hi > lo, luts, levels))


def _equalize(image: Tensor) -> Tensor:
  """Per-channel histogram equalisation, PIL's ImageOps.equalize LUT."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  index = tf.cast(image, tf.int32) + tf.range(3) * 256
  hist = tf.reshape(tf.math.bincount(index, minlength=768, maxlength=768),
                    [3, 256])
  last = tf.reduce_max(tf.where(hist > 0, tf.range(256), -1), 1)
  # Pixels outside the last occupied bin, spread over 255 steps.
  step = (tf.reduce_sum(hist, 1) - tf.gather(hist, last, batch_dims=1)) // 255
  step = step[:, None]
  cumulative = tf.cumsum(hist, 1, exclusive=True)
  luts = tf.minimum((cumulative + step // 2) // tf.maximum(step, 1), 255)
  return _lut_per_channel(image, tf.where(step > 0, luts, tf.range(256)[None]))


def _transform(image: Tensor, matrix: list[Any]) -> Tensor:
  """Projective warp, [a0, a1, a2, b0, b1, b2] mapping output to input x, y."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  transform = tf.stack([tf.cast(v, tf.float32) for v in matrix] + [0.0, 0.0])
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform[None],
      output_shape=tf.shape(image)[:2], fill_value=float(FILL),
      interpolation="NEAREST", fill_mode="CONSTANT")
  return out[0]


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
  size = tf.shape(image)[:2]
  u = tf.random.stateless_uniform([2], seed)
  centre = tf.cast(tf.floor(u * tf.cast(size, tf.float32)), tf.int32)
  # Row and column offsets from the centre; the square is [c - half, c + half).
  dy = tf.range(size[0]) - centre[0]
  dx = tf.range(size[1]) - centre[1]
  inside = ((dy >= -half) & (dy < half))[:, None, None] & (
      (dx >= -half) & (dx < half))[None, :, None]
  return tf.where(inside, tf.constant(FILL, tf.uint8), image)


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
  x = tf.cast(image, tf.int32)
  sign = tf.where(tf.random.stateless_uniform([], seed) < 0.5, -1.0, 1.0)
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
    out = tf.cast(x // 2**shift * 2**shift, tf.uint8)
  elif op_name == "Solarize":
    out = tf.where(x < int(256 * level), image, 255 - image)
  elif op_name == "SolarizeAdd":
    added = tf.cast(tf.clip_by_value(x + int(110 * level), 0, 255), tf.uint8)
    out = tf.where(x < 128, added, image)
  elif op_name in ("Color", "Contrast", "Brightness", "Sharpness"):
    out = _blend(_degenerate(image, op_name), image, 0.1 + 1.8 * level)
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
