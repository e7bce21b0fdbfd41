"""Numpy restatements of the released RandAugment's ops, for the tests.

The reference is `distort_image_with_randaugment` in DeepMind's released NFNet
code (deepmind-research `nfnets/autoaugment.py`). Each function restates one
of its ops from that code, independently of `nfnets.augment`: float32
arithmetic one operation at a time, in TensorFlow's order, and plain loops
where the reference works per pixel.
"""

import math

import numpy as np

def np_blend(image1, image2, factor):
  if factor == 0.0:
    return image1
  if factor == 1.0:
    return image2
  a, b = image1.astype(np.float32), image2.astype(np.float32)
  out = a + np.float32(factor) * (b - a)
  if 0.0 < factor < 1.0:
    return out.astype(np.uint8)
  return np.clip(out, 0.0, 255.0).astype(np.uint8)


def np_color(image, factor):
  rgb = image.astype(np.float32) * np.float32(1.0 / 255)
  w = np.array([0.2989, 0.5870, 0.1140], np.float32)
  grey = (rgb[..., 0] * w[0] + rgb[..., 1] * w[1]) + rgb[..., 2] * w[2]
  grey = (grey * np.float32(255.5)).astype(np.uint8)
  return np_blend(np.repeat(grey[..., None], 3, -1), image, factor)


def np_contrast(image, factor):
  h, w = image.shape[:2]
  mean = np.clip(np.float32(h * w) / np.float32(256.0), 0.0, 255.0)
  return np_blend(np.full_like(image, np.uint8(mean)), image, factor)


def np_sharpness(image, factor):
  h, w = image.shape[:2]
  pixels = image.astype(np.float32)
  kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13
  total = np.zeros((h - 2, w - 2, 3), np.float32)
  for dy in range(3):
    for dx in range(3):
      total = total + pixels[dy:dy + h - 2, dx:dx + w - 2] * kernel[dy, dx]
  smooth = image.copy()
  smooth[1:-1, 1:-1] = np.clip(total, 0.0, 255.0).astype(np.uint8)
  return np_blend(smooth, image, factor)


def np_autocontrast(image):
  out = image.copy()
  for c in range(3):
    lo, hi = np.float32(image[..., c].min()), np.float32(image[..., c].max())
    if hi > lo:
      scale = np.float32(255.0) / (hi - lo)
      stretched = image[..., c].astype(np.float32) * scale + (-lo * scale)
      out[..., c] = np.clip(stretched, 0.0, 255.0).astype(np.uint8)
  return out


def np_equalize(image):
  out = image.copy()
  for c in range(3):
    hist = np.bincount(image[..., c].ravel(), minlength=256)
    nonzero = hist[hist != 0]
    step = (nonzero.sum() - nonzero[-1]) // 255
    if step:
      lut = (np.cumsum(hist) + step // 2) // step
      lut = np.clip(np.concatenate([[0], lut[:-1]]), 0, 255)
      out[..., c] = lut[image[..., c]]
  return out


def _std_round(v):
  return int(math.copysign(math.floor(abs(v) + 0.5), v))


def np_warp(image, t):
  """tfa.image.transform (nearest) + unwrap: output (x, y) reads the input at
  (t0 x + t1 y + t2, t3 x + t4 y + t5) in float32, std::round, else 128."""
  t = [np.float32(v) for v in t]
  h, w = image.shape[:2]
  out = np.full_like(image, 128)
  for y in range(h):
    for x in range(w):
      fx, fy = np.float32(x), np.float32(y)
      sx = _std_round(float((t[0] * fx + t[1] * fy) + t[2]))
      sy = _std_round(float((t[3] * fx + t[4] * fy) + t[5]))
      if 0 <= sx < w and 0 <= sy < h:
        out[y, x] = image[sy, sx]
  return out


def np_rotation(degrees, h, w):
  """tfa.image.rotate's transform (angles_to_projective_transforms)."""
  radians = np.float32(degrees) * np.float32(math.pi / 180.0)
  cos = np.float32(math.cos(radians))
  sin = np.float32(math.sin(radians))
  w1, h1 = np.float32(w - 1), np.float32(h - 1)
  return [cos, -sin, (w1 - (cos * w1 - sin * h1)) / np.float32(2), sin, cos,
          (h1 - (sin * w1 + cos * h1)) / np.float32(2)]


def np_shift(image, pixels, axis):
  """Output index i reads input index i + pixels along `axis`, else 128."""
  out = np.full_like(image, 128)
  source = np.arange(image.shape[axis]) + pixels
  ok = (source >= 0) & (source < image.shape[axis])
  np.moveaxis(out, axis, 0)[ok] = np.moveaxis(image, axis, 0)[source[ok]]
  return out


def np_cutout(image, pad, cy, cx):
  out = image.copy()
  out[max(0, cy - pad):cy + pad, max(0, cx - pad):cx + pad] = 128
  return out
