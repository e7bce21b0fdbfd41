"""A class-per-folder image dataset (`root/<class>/<image>`) as a source.

`ImageFolderSource` gives `pipeline` random access to the files of one split.
Unreadable files are dropped once, at listing time (checked with PIL), not
while decoding: skipping inside tf.data (`ignore_errors`) would shift every
later batch and break exact resumption and process independence. No
TensorFlow here: decoding is `pipeline`'s.
"""

from __future__ import annotations

from concurrent import futures
import os

from absl import logging
import numpy as np
from PIL import Image


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# The train/val split of a folder without split sub-folders is fixed, not
# config.seed, so that runs with different seeds evaluate on the same images.
SPLIT_SEED = 0


# What PIL may call a file that tf.io.decode_image can decode (MPO: JPEGs
# from cameras with extra frames). PIL also reads e.g. TIFF and 1-bit BMPs,
# which would fail later, mid-epoch, at the same step on every resume.
DECODABLE_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP")


def _is_readable_image(path: str) -> bool:
  """Whether PIL can parse `path` (no full decode) and TF can decode it."""
  try:
    with Image.open(path) as image:
      image.verify()
      return (image.format in DECODABLE_FORMATS and
              not (image.format == "BMP" and image.mode == "1"))
  except Exception:  # pylint: disable=broad-except
    return False  # PIL raises many types for bad files; all mean unusable.


def _images_in(folder: str) -> list[str]:
  paths = [os.path.join(folder, n) for n in sorted(os.listdir(folder))]
  return [p for p in paths
          if p.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(p)]


def _class_names(folder: str) -> list[str]:
  return sorted(n for n in os.listdir(folder)
                if os.path.isdir(os.path.join(folder, n)))


def list_image_folder(
    root: str, split: str, val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], np.ndarray, list[str]]:
  """(paths, labels, class_names) of `list_with_skipped`; see there."""
  return list_with_skipped(root, split, val_fraction, seed)[:3]


def list_with_skipped(
    root: str, split: str, val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], np.ndarray, list[str], int]:
  """Lists the readable images of one split of a class-per-folder dataset.

  If `root/train` and `root/val` both exist they are the splits and hold the
  class folders. Otherwise the class folders are `root`'s sub-folders and each
  class is split deterministically: a seeded shuffle of its sorted files puts
  `round(val_fraction * n)` of them in 'val' and the rest in 'train'.

  Args:
    root: the dataset folder.
    split: 'train' or 'val'.
    val_fraction: share of each class held out without split folders.
    seed: seed of the per-class split.

  Returns:
    (paths, labels int32 [n], class_names, skipped), sorted by class then
    name; `skipped` counts image-named files PIL cannot read (left out, one
    warning).

  Raises:
    ValueError: for a missing root, a bad split or fraction, no class folders
      or no readable images.
  """
  if split not in ("train", "val"):
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
  if not 0 <= val_fraction < 1:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  if not root or not os.path.isdir(root):
    raise ValueError(f"image folder {root!r} does not exist")
  by_folder = all(os.path.isdir(os.path.join(root, s)) for s in ("train", "val"))
  class_root = os.path.join(root, split) if by_folder else root
  class_names = _class_names(class_root)
  if not class_names:
    raise ValueError(f"no class sub-folders in {class_root!r}")
  if by_folder:
    # Both splits must agree on the label of each class name.
    class_names = sorted(set(_class_names(os.path.join(root, "train"))) |
                         set(_class_names(os.path.join(root, "val"))))
  paths, labels = [], []
  for label, name in enumerate(class_names):
    folder = os.path.join(class_root, name)
    files = _images_in(folder) if os.path.isdir(folder) else []
    if not by_folder:
      rng = np.random.default_rng([seed, label])
      order = rng.permutation(len(files))
      num_val = int(round(val_fraction * len(files)))
      chosen = order[:num_val] if split == "val" else order[num_val:]
      files = [files[i] for i in sorted(chosen)]
    paths.extend(files)
    labels.extend([label] * len(files))
  # Threads: verification is mostly file I/O, which releases the GIL.
  with futures.ThreadPoolExecutor(max_workers=16) as pool:
    readable = list(pool.map(_is_readable_image, paths))
  skipped = readable.count(False)
  if skipped:
    bad = [p for p, ok in zip(paths, readable) if not ok]
    logging.warning("Skipping %d unreadable image file(s) in %s (split %s), "
                    "e.g. %s", skipped, class_root, split, bad[0])
  paths = [p for p, ok in zip(paths, readable) if ok]
  labels = [y for y, ok in zip(labels, readable) if ok]
  if not paths:
    raise ValueError(f"no readable images for split {split!r} in {root!r}")
  return paths, np.asarray(labels, np.int32), class_names, skipped


class ImageFolderSource:
  """Random access to one split of a class-per-folder dataset's files.

  Attributes:
    paths: the readable image files, sorted by class then name.
    labels: int32 [n], their class indices.
    class_names: the class folder names, in label order.
    skipped: image-named files PIL could not read, left out at listing.
  """

  def __init__(self, root: str, split: str, val_fraction: float = 0.1):
    """Lists `split` of `root` (see `list_with_skipped`; the split is fixed)."""
    self.paths, self.labels, self.class_names, self.skipped = (
        list_with_skipped(root, split, val_fraction, SPLIT_SEED))

  @property
  def num_examples(self) -> int:
    return len(self.paths)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def read(self, indices: np.ndarray) -> tuple[list[bytes], np.ndarray]:
    """The files' bytes and labels at `indices`, in order."""
    chosen = [self.paths[i] for i in indices]
    # Threads: reading files releases the GIL.
    with futures.ThreadPoolExecutor(max_workers=8) as pool:
      contents = list(pool.map(_read_bytes, chosen))
    return contents, self.labels[np.asarray(indices, np.int64)]


def _read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()
