"""Host-side (PIL + numpy) image transforms: the NFNet eval preprocessing.

`resize_crop_32` is the evaluation transform of the released NFNets
(`eval_preproc='resize_crop_32'` in DeepMind's released code,
google-deepmind/deepmind-research `nfnets/experiment_nfnets.py` and
`nfnets/dataset.py`): squash-resize to `S + 32` (no aspect ratio kept),
centre crop `S`, normalise with the ImageNet mean and std (on the 0-255
scale). The TF input pipeline implements the same transform for ImageNet
evaluation.
"""

import dataclasses
import re

import numpy as np
from PIL import Image

MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# Evaluation resampling: 'bicubic' is the released code's `tf.image.resize`
# (Keys cubic, not antialiased, in float, not rounded); 'bicubic_antialias'
# is PIL's BICUBIC (antialiased, rounded to uint8 levels), what the released
# Colab demo used.
EVAL_INTERPOLATIONS = ("bicubic", "bicubic_antialias")
_EVAL_PREPROC = re.compile(r"(resize_crop|crop_resize)(?:_(\d+(?:\.\d*)?))?$")


@dataclasses.dataclass(frozen=True)
class EvalPreproc:
  """An evaluation crop, named as the released code's `eval_preproc`.

  `resize_crop_{pct}`: resize the whole image, ignoring its aspect ratio, to
  `scaled_size(S)` squared, then take the centre S x S. `crop_resize_{pct}`:
  take the centre square of side `min(h, w) * S / scaled_size(S)`, then
  resize it to S. `{pct}` > 1 is a number of pixels (`scaled_size(S) = S +
  pct`), else a crop fraction (`int(S / pct)`); without it, 32.

  Attributes:
    mode: 'resize_crop' or 'crop_resize'.
    pct: the number after the mode.
  """
  mode: str
  pct: float

  def scaled_size(self, size: int) -> int:
    return int(size + self.pct) if self.pct > 1 else int(size / self.pct)


def parse_eval_preproc(name: str) -> EvalPreproc:
  """'resize_crop_32' -> EvalPreproc('resize_crop', 32.0); a clear error."""
  match = _EVAL_PREPROC.match(name)
  if not match or (match.group(2) is not None and
                   not float(match.group(2)) > 0):
    raise ValueError(
        f"unknown eval preproc {name!r}; valid: resize_crop_{{pct}} or "
        "crop_resize_{pct}, pct > 1 a padding in pixels (resize_crop_32, the "
        "released NFNets') or <= 1 a crop fraction (resize_crop_0.875)")
  return EvalPreproc(match.group(1), float(match.group(2) or 32))


def load_rgb(path: str) -> Image.Image:
  """Opens an image file as RGB (grayscale, CMYK, palette and RGBA too).

  Raises:
    ValueError: if the file is missing or not a readable image.
  """
  try:
    with Image.open(path) as image:
      image.load()
      return image.convert("RGB")
  except (OSError, SyntaxError) as e:
    raise ValueError(f"cannot read image {path}: {e}") from None


def normalize(pixels: np.ndarray) -> np.ndarray:
  """(pixels - mean) / std per RGB channel, pixels on the 0-255 scale."""
  return ((pixels.astype(np.float32) - np.asarray(MEAN_RGB, np.float32)) /
          np.asarray(STDDEV_RGB, np.float32))


def resize_crop_32(image: Image.Image, size: int) -> np.ndarray:
  """Squash-resizes to size + 32 (bicubic), centre-crops size, normalises.

  Args:
    image: an RGB image.
    size: the output resolution (the variant's test resolution).

  Returns:
    float32 [size, size, 3].
  """
  resized = image.resize((size + 32, size + 32), Image.Resampling.BICUBIC)
  pixels = np.asarray(resized, np.float32)[16:16 + size, 16:16 + size]
  return normalize(pixels)
