"""RandAugment (Cubuk et al., 2019) in JAX, as the released NFNet code ran it.

The reference is `distort_image_with_randaugment` in google-deepmind/
deepmind-research `nfnets/autoaugment.py` (TF 2.4 era, uint8 images): 16 ops,
one magnitude M on a 0..10 scale (extrapolated linearly beyond), and for each
of `num_layers` layers one op drawn uniformly and always applied (the
reference draws a probability it never uses). Its quirks are kept: Contrast
blends towards H * W / 256 (a pixel count, not a grey level); Solarize's
threshold int(25.6 M) wraps modulo 256 (TF made it a uint8), so M = 10
inverts every pixel; Posterize keeps int(0.4 M) bits; Color, Contrast,
Brightness and Sharpness are the identity at M = 5 (factor exactly 1.0);
translations are absolute pixels (10 M); rotate, shear and translate sample
the nearest pixel (`tfa.image.transform`, rounding half away from zero) and
fill with grey 128.

The geometric ops and Cutout are in `geometric`. Everything runs per
example, jittable and vmappable, for the train step. XLA
contracts a multiply followed by an add into one fused multiply-add (on CPU
and GPU), which rounds once where TensorFlow rounded twice, so a pixel whose
exact value is an integer can truncate to its neighbour. Every product is
therefore a lookup in a float32 table that numpy computes on the host (a
pixel takes 256 values, a coordinate H or W), and the device only adds,
compares and gathers: the float32 rounding is that of TensorFlow's Eigen CPU
kernels (separate multiply and add, row-major conv taps) on any backend.
"""

import functools
from typing import Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

from nfnets.augment import geometric

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize",
       "Solarize", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
       "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd")
MAX_LEVEL = 10.0
TRANSLATE_CONST = 100  # Pixels at magnitude 10.
CUTOUT_CONST = 40  # Half-side of the Cutout square at magnitude 10.
FILL = geometric.FILL

_f32 = np.float32
_Branch = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _check_image(image: jax.Array) -> None:
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != jnp.uint8:
    raise ValueError(f"RandAugment takes one uint8 [H, W, 3] image; got "
                     f"{image.dtype} {tuple(image.shape)}")


# Host tables: float32 products rounded as TensorFlow rounded them.
_VALUES = np.arange(256, dtype=_f32)
# tf.image.rgb_to_grayscale, [3, 256]: (v * float32(1 / 255)) * weight_c.
_GREY = (np.array([0.2989, 0.5870, 0.1140], _f32)[:, None] *
         (_VALUES * _f32(1.0 / 255)))
# Sharpness's SMOOTH kernel taps, [2, 256]: v * (1 / 13) and v * (5 / 13).
_SMOOTH = (np.array([1.0, 5.0], _f32) / _f32(13.0))[:, None] * _VALUES
# AutoContrast, [256, 256]: row d holds v * float32(255 / d) (row 0 unused).
_STRETCH = (_f32(255.0) / np.maximum(_VALUES, 1))[:, None] * _VALUES


@functools.lru_cache(maxsize=None)
def _scaled_differences(factor: float) -> np.ndarray:
  """float32(factor) * d for d = -255..255: `blend`'s product."""
  return _f32(factor) * np.arange(-255, 256, dtype=_f32)


def _lookup(table: np.ndarray, image: jax.Array) -> jax.Array:
  return jnp.asarray(table)[image.astype(jnp.int32)]


# The photometric ops (the reference's functions of the same names).


def blend(image1: jax.Array, image2: jax.Array, factor: float) -> jax.Array:
  """image1 + factor * (image2 - image1) in float32, truncated to uint8.

  Factors 0 and 1 return image1 and image2 as they are; outside (0, 1) the
  result is clipped to [0, 255] first (inside it cannot leave that range).
  """
  if factor == 0.0:
    return jnp.broadcast_to(image1, image2.shape).astype(jnp.uint8)
  if factor == 1.0:
    return jnp.asarray(image2)
  image1 = jnp.broadcast_to(image1, image2.shape)
  difference = image2.astype(jnp.int32) - image1.astype(jnp.int32)
  scaled = jnp.asarray(_scaled_differences(factor))[difference + 255]
  out = image1.astype(jnp.float32) + scaled
  return jnp.clip(out, 0.0, 255.0).astype(jnp.uint8)


def autocontrast(image: jax.Array) -> jax.Array:
  """Per channel, (v - lo) * 255 / (hi - lo) truncated; flat channels kept.

  As the reference: v * scale + (-lo * scale), scale = 255 / (hi - lo), all
  in float32, clipped and truncated.
  """
  lo = jnp.min(image, axis=(0, 1)).astype(jnp.int32)
  hi = jnp.max(image, axis=(0, 1)).astype(jnp.int32)
  rows = jnp.asarray(_STRETCH)[hi - lo]  # [3, 256]
  offsets = -jnp.take_along_axis(rows, lo[:, None], axis=1)
  luts = jnp.clip(rows + offsets, 0.0, 255.0).astype(jnp.uint8)
  luts = jnp.where((hi > lo)[:, None], luts, jnp.arange(256, dtype=jnp.uint8))
  return _apply_luts(luts, image)


def _apply_luts(luts: jax.Array, image: jax.Array) -> jax.Array:
  """image[..., c] -> luts[c, image[..., c]] for [3, 256] luts."""
  index = image.astype(jnp.int32) + 256 * jnp.arange(3)
  return luts.reshape(-1)[index]


def equalize(image: jax.Array) -> jax.Array:
  """PIL-style histogram equalisation of each channel (the reference's LUT).

  step = (pixels - count of the highest value) // 255; the value v maps to
  (pixels below v + step // 2) // step, clipped to 255; step 0 keeps the
  channel.
  """
  values = image.reshape(-1, 3).astype(jnp.int32)  # Histograms: scatter-add.
  hist = jnp.zeros((3, 256), jnp.int32).at[jnp.arange(3), values].add(1)
  top = jnp.max(image, axis=(0, 1)).astype(jnp.int32)
  last = jnp.take_along_axis(hist, top[:, None], axis=1)  # [3, 1]
  step = (image.shape[0] * image.shape[1] - last) // 255
  below = jnp.cumsum(hist, axis=1) - hist
  luts = jnp.minimum((below + step // 2) // jnp.maximum(step, 1), 255)
  luts = jnp.where(step > 0, luts, jnp.arange(256)).astype(jnp.uint8)
  return _apply_luts(luts, image)


def invert(image: jax.Array) -> jax.Array:
  """255 - v."""
  return 255 - image


def posterize(image: jax.Array, bits: int) -> jax.Array:
  """Keeps the top `bits` bits: (v >> s) << s, s = 8 - bits as TF shifted.

  TF made s a uint8 and clamped shifts to [0, 7], so bits 0 (s = 8) and
  bits > 8 (s wraps) both keep one bit.
  """
  shift = np.uint8(min((8 - bits) % 256, 7))
  return jnp.left_shift(jnp.right_shift(image, shift), shift)


def solarize(image: jax.Array, threshold: int) -> jax.Array:
  """Inverts values >= threshold, the threshold made uint8 (mod 256)."""
  threshold = np.uint8(threshold % 256)
  return jnp.where(image < threshold, image, 255 - image)


def solarize_add(image: jax.Array, addition: int,
                 threshold: int = 128) -> jax.Array:
  """Values below `threshold` get + addition, clipped to [0, 255]."""
  added = jnp.clip(image.astype(jnp.int32) + addition, 0, 255)
  return jnp.where(image < threshold, added.astype(jnp.uint8), image)


def color(image: jax.Array, factor: float) -> jax.Array:
  """Blend from tf.image.rgb_to_grayscale (float32 dot, * 255.5 truncated)."""
  grey = ((_lookup(_GREY[0], image[..., 0]) +
           _lookup(_GREY[1], image[..., 1])) +
          _lookup(_GREY[2], image[..., 2]))
  grey = (grey * _f32(255.5)).astype(jnp.uint8)
  return blend(jnp.broadcast_to(grey[..., None], image.shape), image, factor)


def contrast(image: jax.Array, factor: float) -> jax.Array:
  """Blend from a constant grey of H * W / 256, clipped to 255 and truncated.

  The reference sums the grey histogram, i.e. counts pixels, and divides
  by 256: the target depends only on the image size.
  """
  height, width = image.shape[:2]
  mean = min(_f32(height * width) / _f32(256.0), _f32(255.0))
  return blend(jnp.full(image.shape, int(mean), jnp.uint8), image, factor)


def brightness(image: jax.Array, factor: float) -> jax.Array:
  """Blend from black."""
  return blend(jnp.zeros_like(image), image, factor)


def sharpness(image: jax.Array, factor: float) -> jax.Array:
  """Blend from the 3x3 SMOOTH filter [[1,1,1],[1,5,1],[1,1,1]] / 13.

  TF's depthwise VALID conv: taps summed in row-major order from zero,
  clipped, truncated; the one-pixel border keeps the original pixels.
  """
  height, width = image.shape[:2]
  if height < 3 or width < 3:
    return image
  edge, centre = _lookup(_SMOOTH[0], image), _lookup(_SMOOTH[1], image)
  total = None
  for dy in range(3):
    for dx in range(3):
      taps = centre if (dy, dx) == (1, 1) else edge
      term = taps[dy:dy + height - 2, dx:dx + width - 2]
      total = term if total is None else total + term
  smooth = jnp.clip(total, 0.0, 255.0).astype(jnp.uint8)
  return blend(jnp.asarray(image).at[1:-1, 1:-1].set(smooth), image, factor)


# The policy.


def _branches(magnitude: float, height: int, width: int) -> list[_Branch]:
  """The 16 ops at `magnitude` (the reference's level_to_arg), in OPS order.

  Each takes (image, positive, centre): the random sign of the geometric
  ops and Cutout's centre.
  """
  level = float(magnitude) / MAX_LEVEL
  factor = level * 1.8 + 0.1  # Exactly 1.0 at magnitude 5.
  pixels = level * float(TRANSLATE_CONST)

  def fixed(op, *args) -> _Branch:
    return lambda image, positive, centre: op(image, *args)

  def signed(make: Callable[[float], np.ndarray], value: float) -> _Branch:
    transforms = np.stack([make(value), make(-value)])
    return lambda image, positive, centre: geometric.sample(
        image, transforms, jnp.where(positive, 0, 1))

  branches = {
      "AutoContrast": fixed(autocontrast),
      "Equalize": fixed(equalize),
      "Invert": fixed(invert),
      "Rotate": signed(lambda d: geometric.rotation(d, height, width),
                       level * 30.0),
      "Posterize": fixed(posterize, int(level * 4)),
      "Solarize": fixed(solarize, int(level * 256)),
      "Color": fixed(color, factor),
      "Contrast": fixed(contrast, factor),
      "Brightness": fixed(brightness, factor),
      "Sharpness": fixed(sharpness, factor),
      "ShearX": signed(lambda v: geometric.affine(1, v, 0, 0, 1, 0),
                       level * 0.3),
      "ShearY": signed(lambda v: geometric.affine(1, 0, 0, v, 1, 0),
                       level * 0.3),
      "TranslateX": signed(lambda p: geometric.affine(1, 0, p, 0, 1, 0),
                           pixels),
      "TranslateY": signed(lambda p: geometric.affine(1, 0, 0, 0, 1, p),
                           pixels),
      "Cutout": lambda image, positive, centre: geometric.cutout(
          image, int(level * CUTOUT_CONST), centre),
      "SolarizeAdd": fixed(solarize_add, int(level * 110)),
  }
  return [branches[name] for name in OPS]


def apply_op(image: jax.Array, op: Union[int, str, jax.Array],
             magnitude: float, key: jax.Array) -> jax.Array:
  """Applies one op at `magnitude`, its random arguments drawn from `key`.

  Args:
    image: uint8 [H, W, 3].
    op: a name in `OPS`, or its index (a Python int or a traced int32).
    magnitude: M, a Python number >= 0 (0..10, larger extrapolates).
    key: a PRNG key (typed or raw); `split(key)` gives the geometric ops'
      sign (positive with probability 1/2) and Cutout's uniform centre.

  Returns:
    uint8 [H, W, 3].
  """
  _check_image(image)
  if magnitude < 0:
    raise ValueError(f"RandAugment magnitude must be >= 0, got {magnitude}")
  if isinstance(op, str):
    if op not in OPS:
      raise ValueError(f"unknown RandAugment op {op!r}; expected one of {OPS}")
    op = OPS.index(op)
  height, width = image.shape[:2]
  sign_key, centre_key = jax.random.split(key)
  positive = jax.random.bernoulli(sign_key)
  centre = jax.random.randint(centre_key, (2,), 0, jnp.array([height, width]))
  branches = _branches(magnitude, height, width)
  if isinstance(op, int):
    return branches[op](image, positive, centre)
  return jax.lax.switch(op, branches, image, positive, centre)


def randaugment(image: jax.Array, key: jax.Array, num_layers: int,
                magnitude: float) -> jax.Array:
  """RandAugment of one image: `num_layers` uniformly drawn ops at M.

  Jittable (num_layers and magnitude static) and vmappable over (image,
  key). Layer i uses `split(key, num_layers)[i]`, split again into the op
  choice (uniform over OPS) and the key given to `apply_op`. Under vmap
  every op is computed for every image and the drawn one selected.

  Args:
    image: uint8 [H, W, 3].
    key: a PRNG key (typed or raw).
    num_layers: N, ops applied in turn; 0 returns `image`.
    magnitude: M, shared by all ops (NFNets use 5, 10 and 15).

  Returns:
    uint8 [H, W, 3].
  """
  _check_image(image)
  if num_layers < 0 or magnitude < 0:
    raise ValueError(f"RandAugment needs num_layers >= 0 and magnitude >= 0; "
                     f"got {num_layers} and {magnitude}")
  if num_layers == 0:
    return image

  def layer(image, layer_key):
    op_key, op_args_key = jax.random.split(layer_key)
    index = jax.random.randint(op_key, (), 0, len(OPS))
    return apply_op(image, index, magnitude, op_args_key), None

  image, _ = jax.lax.scan(layer, image, jax.random.split(key, num_layers))
  return image
