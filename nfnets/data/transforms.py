"""Host-side (PIL + numpy) image transforms: the NFNet eval preprocessing.

`resize_crop_32` is the evaluation transform of the released NFNets
(`eval_preproc='resize_crop_32'` in DeepMind's released code,
google-deepmind/deepmind-research `nfnets/experiment_nfnets.py` and
`nfnets/dataset.py`): squash-resize to `S + 32` (no aspect ratio kept),
centre crop `S`, normalise with the ImageNet mean and std (on the 0-255
scale). The TF input pipeline implements the same transform for ImageNet
evaluation.
"""

import numpy as np
from PIL import Image

MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


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
