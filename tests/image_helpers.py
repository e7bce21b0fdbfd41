"""Generated image files for the input pipeline tests."""

import os

import numpy as np
from PIL import Image

# What `write_folder` writes that PIL can read: 18 RGB JPEGs, a PNG, a
# grayscale JPEG and a CMYK JPEG (plus a corrupt JPEG and a text file).
NUM_READABLE = 21


def smooth_image(rng: np.random.Generator, low: int = 60,
                 high: int = 120) -> np.ndarray:
  """Random uint8 [h, w, 3] with structure at several scales, like a photo."""
  h, w = rng.integers(low, high + 1, 2)
  coarse = rng.integers(0, 256, (h // 10 + 1, w // 10 + 1, 3)).astype(np.uint8)
  image = Image.fromarray(coarse).resize((int(w), int(h)),
                                         Image.Resampling.BILINEAR)
  noise = rng.integers(-16, 17, (h, w, 3))
  return np.clip(np.asarray(image, np.int32) + noise, 0, 255).astype(np.uint8)


def write_folder(root: str) -> str:
  """Writes a 3-class folder (a, b, c) with every kind of file; returns it."""
  rng = np.random.default_rng(0)
  for name in ("a", "b", "c"):
    os.makedirs(os.path.join(root, name))
    for i in range(6):
      Image.fromarray(smooth_image(rng)).save(
          os.path.join(root, name, f"{i}.jpg"), quality=95)
  Image.fromarray(smooth_image(rng)).save(os.path.join(root, "a", "p.PNG"))
  Image.fromarray(smooth_image(rng)).convert("L").save(
      os.path.join(root, "a", "gray.jpg"))
  Image.fromarray(smooth_image(rng)).convert("CMYK").save(
      os.path.join(root, "b", "cmyk.jpeg"))
  with open(os.path.join(root, "b", "corrupt.jpg"), "wb") as f:
    f.write(rng.integers(0, 256, 500).astype(np.uint8).tobytes())
  with open(os.path.join(root, "c", "notes.txt"), "w") as f:
    f.write("not an image")
  return root
