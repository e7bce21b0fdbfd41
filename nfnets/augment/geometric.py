"""RandAugment's geometric ops and Cutout, as the released NFNet code ran them.

`tfa.image.transform` followed by the reference's wrap/unwrap
(google-deepmind/deepmind-research `nfnets/autoaugment.py`): each output
pixel reads the input at an affine function of its coordinates, rounded to
the nearest pixel with halves away from zero, and grey 128 where that falls
outside the image. The coordinate products are float32 tables computed on
the host (see `randaugment`), so the rounding is TensorFlow's on any backend.
"""

import math
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

FILL = 128  # The reference's `replace` value, in every channel.
_f32 = np.float32



def _round_half_away(value: jax.Array) -> jax.Array:
  """std::round: to nearest, halves away from zero (jnp.round goes to even)."""
  whole = jnp.trunc(value)
  up = jnp.abs(value - whole) >= 0.5
  return (whole + jnp.where(up, jnp.sign(value), 0.0)).astype(jnp.int32)


def sample(image: jax.Array, transforms: np.ndarray,
            choice: Union[int, jax.Array]) -> jax.Array:
  """Nearest-pixel warp by one of `transforms`, grey 128 outside the image.

  Args:
    image: uint8 [H, W, 3].
    transforms: float32 [K, 6] rows (a0, a1, a2, b0, b1, b2): the output
      pixel (x, y) reads the input at ((a0 x + a1 y) + a2, (b0 x + b1 y) + b2),
      in float32 in that order, as TF's ImageProjectiveTransform kernel.
    choice: which row to apply (traced or not).

  Returns:
    uint8 [H, W, 3].
  """
  height, width = image.shape[:2]
  x = np.arange(width, dtype=_f32)
  y = np.arange(height, dtype=_f32)
  table = lambda column, coords: jnp.asarray(transforms[:, column, None] *
                                             coords)[choice]
  offsets = jnp.asarray(transforms[:, [2, 5]])[choice]
  source_x = _round_half_away(
      (table(0, x)[None, :] + table(1, y)[:, None]) + offsets[0])
  source_y = _round_half_away(
      (table(3, x)[None, :] + table(4, y)[:, None]) + offsets[1])
  inside = ((source_x >= 0) & (source_x < width) &
            (source_y >= 0) & (source_y < height))
  flat = (jnp.clip(source_y, 0, height - 1) * width +
          jnp.clip(source_x, 0, width - 1))
  pixels = jnp.asarray(image).reshape(height * width, 3)[flat]
  return jnp.where(inside[..., None], pixels, np.uint8(FILL))


def rotation(degrees: float, height: int, width: int) -> np.ndarray:
  """tfa.image.rotate's transform (about the centre), in float32."""
  radians = _f32(degrees) * _f32(math.pi / 180.0)
  cos, sin = _f32(math.cos(radians)), _f32(math.sin(radians))
  w1, h1 = _f32(width - 1), _f32(height - 1)
  x_offset = (w1 - (cos * w1 - sin * h1)) / _f32(2.0)
  y_offset = (h1 - (sin * w1 + cos * h1)) / _f32(2.0)
  return np.array([cos, -sin, x_offset, sin, cos, y_offset], _f32)


def affine(a0, a1, a2, b0, b1, b2) -> np.ndarray:
  return np.array([a0, a1, a2, b0, b1, b2], _f32)


def rotate(image: jax.Array, degrees: float) -> jax.Array:
  """tfa.image.rotate: counterclockwise (as displayed) about the centre."""
  return sample(image, rotation(degrees, *image.shape[:2])[None], 0)


def shear_x(image: jax.Array, level: float) -> jax.Array:
  """Output (x, y) reads the input at (x + level y, y)."""
  return sample(image, affine(1, level, 0, 0, 1, 0)[None], 0)


def shear_y(image: jax.Array, level: float) -> jax.Array:
  """Output (x, y) reads the input at (x, level x + y)."""
  return sample(image, affine(1, 0, 0, level, 1, 0)[None], 0)


def translate_x(image: jax.Array, pixels: float) -> jax.Array:
  """Output (x, y) reads (x + pixels, y): the reference's
  translate(image, [-pixels, 0]), content moving left by `pixels`."""
  return sample(image, affine(1, 0, pixels, 0, 1, 0)[None], 0)


def translate_y(image: jax.Array, pixels: float) -> jax.Array:
  """Output (x, y) reads (x, y + pixels): content moves up by `pixels`."""
  return sample(image, affine(1, 0, 0, 0, 1, pixels)[None], 0)


def cutout(image: jax.Array, pad_size: int, centre: jax.Array) -> jax.Array:
  """Greys rows and columns [c - pad_size, c + pad_size), clipped.

  Args:
    image: uint8 [H, W, 3].
    pad_size: half the side of the square.
    centre: int [2], the (row, column) of the square's centre.

  Returns:
    uint8 [H, W, 3].
  """
  rows = jnp.arange(image.shape[0])[:, None]
  cols = jnp.arange(image.shape[1])[None, :]
  inside = ((rows >= centre[0] - pad_size) & (rows < centre[0] + pad_size) &
            (cols >= centre[1] - pad_size) & (cols < centre[1] + pad_size))
  return jnp.where(inside[..., None], np.uint8(FILL), image)
