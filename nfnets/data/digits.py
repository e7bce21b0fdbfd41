"""scikit-learn's 8x8 digits, upscaled to RGB images: the bundled dataset.

The data ships inside scikit-learn, so it needs no network access, which makes
it the default for smoke tests and small training runs. The train/test split is
computed with numpy from a fixed seed so that it is identical across machines
and scikit-learn versions.
"""

from __future__ import annotations

import functools

import numpy as np

NUM_CLASSES = 10
SPLITS = ('train', 'test')
TEST_FRACTION = 0.2
SPLIT_SEED = 0
_MAX_PIXEL = 16.0


def _split_indices(targets: np.ndarray) -> dict[str, np.ndarray]:
  """Stratified split: per class, a fixed permutation; first 20% to test."""
  rng = np.random.default_rng(SPLIT_SEED)
  train, test = [], []
  # Classes are visited in sorted order so the rng stream is deterministic.
  for c in range(NUM_CLASSES):
    idx = np.flatnonzero(targets == c)
    idx = idx[rng.permutation(idx.size)]
    n_test = int(round(TEST_FRACTION * idx.size))
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return {
      'train': np.sort(np.concatenate(train)),
      'test': np.sort(np.concatenate(test)),
  }


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] matrix doing 1-D bilinear resampling.

  Uses half-pixel centres with edge clamping, which matches PIL's BILINEAR
  filter when upsampling, so the 2-D resize is two small matrix products.

  Args:
    in_size: input length.
    out_size: output length.

  Returns:
    float64 matrix whose rows sum to 1.
  """
  centres = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
  centres = np.clip(centres, 0.0, in_size - 1)
  lo = np.floor(centres).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = centres - lo
  weights = np.zeros((out_size, in_size))
  rows = np.arange(out_size)
  np.add.at(weights, (rows, lo), 1.0 - frac)
  np.add.at(weights, (rows, hi), frac)
  return weights


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinearly resizes [N, h, w] images to [N, size, size]."""
  rows = _bilinear_matrix(images.shape[1], size)
  cols = _bilinear_matrix(images.shape[2], size)
  return np.einsum('ih,nhw,jw->nij', rows, images, cols)


@functools.lru_cache(maxsize=None)
def _load_all(image_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Loads, splits, resizes and normalises both splits once per size."""
  # Imported here: scikit-learn takes a second to import, which every
  # process importing the trainer would pay for nothing.
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  raw = datasets.load_digits()
  pixels = raw.images.astype(np.float64) / _MAX_PIXEL  # [N, 8, 8] in [0, 1].
  targets = raw.target.astype(np.int32)
  images = _resize(pixels, image_size)
  splits = _split_indices(targets)
  # Statistics come from the training split only, so no test information
  # leaks into preprocessing. Channels are identical, so scalars suffice.
  train_images = images[splits['train']]
  mean = train_images.mean()
  std = train_images.std()
  out = {}
  for name, idx in splits.items():
    x = (images[idx] - mean) / std
    x = np.repeat(x[..., None], 3, axis=-1).astype(np.float32)
    y = targets[idx]
    # The arrays are shared by every caller through the cache; freeze them so
    # an accidental in-place edit fails loudly instead of corrupting them.
    x.flags.writeable = False
    y.flags.writeable = False
    out[name] = (x, y)
  return out


def load_digits(split: str,
                image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """Loads a fixed split of the digits dataset as normalised RGB images.

  Args:
    split: 'train' (1,438 examples) or 'test' (359 examples); the split is
      stratified by class and fixed by a seed.
    image_size: side length of the (square) output images.

  Returns:
    `(images, labels)`: read-only float32 [N, image_size, image_size, 3]
    images normalised with the training split's mean and std, and int32 [N]
    labels in [0, NUM_CLASSES).

  Raises:
    ValueError: if `split` or `image_size` is invalid.
  """
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; valid splits are {SPLITS}.')
  if isinstance(image_size, bool) or not isinstance(image_size, int) or (
      image_size <= 0):
    raise ValueError(
        f'image_size must be a positive int, got {image_size!r}.')
  return _load_all(image_size)[split]


def random_shift(images: np.ndarray,
                 rng: np.random.Generator,
                 max_shift: int = 2,
                 fill_value: float = 0.0) -> np.ndarray:
  """Translates each image by a random integer offset, padding with a constant.

  Usable directly as the `augment` argument of `arrays.TrainIterator`.

  Args:
    images: [B, H, W, C] batch.
    rng: source of the per-image offsets.
    max_shift: largest offset in pixels along each axis (inclusive).
    fill_value: value of pixels shifted in from outside the image. Zero is the
      dataset mean after normalisation.

  Returns:
    Array with the shape and dtype of `images`.

  Raises:
    ValueError: if `images` is not 4-D or `max_shift` is negative.
  """
  if images.ndim != 4:
    raise ValueError(
        f'images must be [B, H, W, C], got shape {tuple(images.shape)}.')
  if max_shift < 0:
    raise ValueError(f'max_shift must be >= 0, got {max_shift}.')
  b, h, w, _ = images.shape
  m = int(max_shift)
  padded = np.pad(images, ((0, 0), (m, m), (m, m), (0, 0)),
                  constant_values=np.asarray(fill_value, images.dtype))
  dy = rng.integers(-m, m + 1, size=b)
  dx = rng.integers(-m, m + 1, size=b)
  # Output pixel (i, j) reads input pixel (i - dy, j - dx), i.e. padded
  # coordinate (i - dy + m, j - dx + m); a single gather handles the batch.
  rows = np.arange(h)[None, :] + (m - dy)[:, None]  # [B, H]
  cols = np.arange(w)[None, :] + (m - dx)[:, None]  # [B, W]
  batch = np.arange(b)[:, None, None]
  return padded[batch, rows[:, :, None], cols[:, None, :]]
