"""Evaluation preprocessing as the released code's, checked in numpy.

The released NFNets were evaluated with `eval_preproc='resize_crop_32'` and
`tf.image.resize(..., BICUBIC)`: Keys' cubic (a = -0.5) at half-pixel
centres, not antialiased, in float, never rounded (google-deepmind/
deepmind-research `nfnets/dataset.py`). Here that resampling is rebuilt in
numpy, separably, and compared with the pipeline's output.
"""

import numpy as np
import pytest

pytest.importorskip("tensorflow")

# pylint: disable=g-import-not-at-top,wrong-import-position
import image_helpers
from nfnets.data import image_folder
from nfnets.data import transforms
from test_pipeline import eval_all

SIZE = 32


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  root = image_helpers.write_folder(str(tmp_path_factory.mktemp("folder")))
  return image_folder.ImageFolderSource(root, "train", 0.0)


def _keys_weights(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of TF's bicubic resize along one axis.

  Source position `(o + 0.5) * in / out - 0.5`; taps at floor - 1 ..
  floor + 2 with Keys' kernel (a = -0.5) on the fraction quantised to
  1/1024 (TF's coefficient table); taps outside the image get weight 0 and
  the rest are renormalised to sum to 1.
  """
  a = -0.5

  def kernel(x):
    x = abs(x)
    if x <= 1:
      return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
      return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0

  weights = np.zeros((out_size, in_size))
  scale = in_size / out_size
  for o in range(out_size):
    position = (o + 0.5) * scale - 0.5
    base = int(np.floor(position))
    fraction = round((position - base) * 1024) / 1024
    for tap in range(-1, 3):
      index = base + tap
      if 0 <= index < in_size:
        weights[o, index] = kernel(tap - fraction)
    weights[o] /= weights[o].sum()
  return weights


def _resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
  rows = _keys_weights(pixels.shape[0], height)
  cols = _keys_weights(pixels.shape[1], width)
  return np.einsum("oh,hwc,pw->opc", rows, pixels.astype(np.float64), cols)


def _reference(path: str, preproc: str) -> np.ndarray:
  """The released evaluation transform of one file, in numpy."""
  pixels = np.asarray(transforms.load_rgb(path), np.float64)
  parsed = transforms.parse_eval_preproc(preproc)
  scaled = parsed.scaled_size(SIZE)
  if parsed.mode == "resize_crop":
    resized = _resize(pixels, scaled, scaled)
    offset = (scaled - SIZE + 1) // 2
    resized = resized[offset:offset + SIZE, offset:offset + SIZE]
  else:
    h, w = pixels.shape[:2]
    side = max(int(min(h, w) * SIZE / scaled), 1)
    top, left = (h - side + 1) // 2, (w - side + 1) // 2
    resized = _resize(pixels[top:top + side, left:left + side], SIZE, SIZE)
  return transforms.normalize(resized)


# resize_crop_33: odd padding puts ((33 + 1) // 2) = 17 rows above the crop.
@pytest.mark.parametrize("preproc", ["resize_crop_32", "resize_crop_33",
                                     "resize_crop_0.875", "crop_resize"])
def test_eval_is_the_released_bicubic_resize_and_crop(source, preproc):
  images, _ = eval_all(source, 1, preproc, "bicubic", size=SIZE)
  reference = np.stack([_reference(p, preproc) for p in source.paths])
  diff = np.abs(images - reference)
  # Normalised units: one grey level is about 0.0173. Not rounded: the
  # values are off the uint8 grid, and overshoot [0, 255] at edges.
  if preproc == "crop_resize":
    # Decoding only the crop upsamples a colour JPEG's subsampled chroma
    # without the neighbours beyond it (test_pipeline.py): interior only.
    diff = diff[:, 2:-2, 2:-2]
  assert diff.max() < 2e-3, diff.max()
  on_grid = np.isclose(images * np.asarray(transforms.STDDEV_RGB) +
                       np.asarray(transforms.MEAN_RGB),
                       np.round(images * np.asarray(transforms.STDDEV_RGB) +
                                np.asarray(transforms.MEAN_RGB)), atol=1e-3)
  assert on_grid.mean() < 0.5
  # The PIL-style resampling is a different, antialiased transform.
  pil, _ = eval_all(source, 1, preproc, "bicubic_antialias", size=SIZE)
  assert np.abs(pil - images).max() > 0.1


def test_crop_sizes_follow_the_released_pct_rule():
  assert transforms.parse_eval_preproc("resize_crop_32").scaled_size(256) == (
      288)
  # pct <= 1 is a crop fraction: int(S / pct).
  assert transforms.parse_eval_preproc(
      "resize_crop_0.875").scaled_size(224) == 256
  assert transforms.parse_eval_preproc("crop_resize") == (
      transforms.EvalPreproc("crop_resize", 32.0))
  for bad in ("squash", "resize_crop_0", "resize_crop_", "crop_resize_x"):
    with pytest.raises(ValueError, match="unknown eval preproc"):
      transforms.parse_eval_preproc(bad)
