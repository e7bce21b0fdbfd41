"""Writes a tiny ImageNet (ILSVRC2012) manual_dir that TFDS can prepare.

The archives are packed exactly like the real downloads, which TFDS's
`imagenet2012` builder reads from `manual_dir`:

* `ILSVRC2012_img_train.tar` holds one tar per class, `<wnid>.tar`, each with
  flat `<wnid>_<k>.JPEG` files; the label is the wnid (the inner tar's name).
* `ILSVRC2012_img_val.tar` holds flat `ILSVRC2012_val_<8 digits>.JPEG` files.
  The builder labels them with its bundled `validation_labels.txt`, whose
  lines follow the *sorted* file names: the i-th name (sorted) gets line i.
  The files are added to the tar in shuffled order to check that.
* `ILSVRC2012_img_test.tar` is optional (the builder skips a missing split)
  and is not written.

The builder stores each JPEG's bytes unchanged, except for the file names it
knows to be CMYK JPEGs or PNGs in disguise (`CMYK_IMAGES`, `PNG_IMAGES` in
`imagenet2012_dataset_builder.py`), which it re-encodes as RGB JPEGs
(quality 100). One of each is written under such a name, plus grayscale
JPEGs, which are stored as they are.
"""

from __future__ import annotations

import importlib.util
import io
import os
import tarfile
from typing import Any

import numpy as np
from PIL import Image

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
# Real wnids of TFDS's imagenet2012 label list (labels.txt); the last two own
# a file name that the builder re-encodes (see the module docstring).
WNIDS = ("n01440764", "n01739381", "n02105855", "n01443537", "n01484850")
CMYK_FILE = "n01739381_1309.JPEG"  # In the builder's CMYK_IMAGES.
PNG_FILE = "n02105855_2933.JPEG"  # In the builder's PNG_IMAGES.


def _image(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
  """Random uint8 [h, w, 3] photo-like content, h and w varied around size."""
  h = int(size[0] + rng.integers(-8, 9))
  w = int(size[1] + rng.integers(-8, 9))
  coarse = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3)).astype(np.uint8)
  image = Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR)
  noise = rng.integers(-12, 13, (h, w, 3))
  return np.clip(np.asarray(image, np.int32) + noise, 0, 255).astype(np.uint8)


def _encode(pixels: np.ndarray, mode: str, fmt: str) -> bytes:
  buffer = io.BytesIO()
  image = Image.fromarray(pixels).convert(mode)
  if fmt == "JPEG":
    image.save(buffer, format="JPEG", quality=90)
  else:
    image.save(buffer, format=fmt)
  return buffer.getvalue()


def _rgb(data: bytes) -> np.ndarray:
  """What a reader should see: the RGB pixels PIL decodes from `data`."""
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  info.mtime = 0
  tar.addfile(info, io.BytesIO(data))


def _label_file(name: str) -> str:
  """Path of a text file bundled with tensorflow_datasets' imagenet2012."""
  spec = importlib.util.find_spec("tensorflow_datasets")  # Not imported.
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("tensorflow_datasets is not installed.")
  return os.path.join(spec.submodule_search_locations[0], "datasets",
                      "imagenet2012", name)


def _read_lines(path: str) -> list[str]:
  with open(path) as f:
    return f.read().strip().splitlines()


def write_fake_imagenet(
    manual_dir: str,
    *,
    classes: int = 3,
    train_per_class: int = 4,
    val_images: int = 6,
    size: tuple[int, int] = (40, 48),
    seed: int = 0,
) -> dict[str, Any]:
  """Writes ILSVRC2012 train and val tars of small random JPEGs.

  Args:
    manual_dir: folder to write the two tars into (created if missing).
    classes: number of training classes, 3 to len(WNIDS); classes 2 and 3
      (when present) each hold one image that the builder re-encodes: a CMYK
      JPEG and a PNG, under the names it knows.
    train_per_class: training images per class, at least 2.
    val_images: number of validation images, 1 to 50000.
    size: nominal (height, width); each image's sides vary by up to 8 pixels.
    seed: seed of the image content and sizes.

  Returns:
    A dict with:
      'class_names': the 1000 wnids of TFDS's label list (label i is
        class_names[i]);
      'train', 'validation': lists of one dict per image, in the order
        written, with 'file_name', 'wnid', 'label' (int index in
        class_names), 'bytes' (the file written), 'rgb' (its RGB pixels as
        PIL decodes them) and 'reencoded' (whether the builder re-encodes the
        file, so its stored bytes differ from 'bytes');
      'num_examples': {'train': n, 'validation': n}.

  Raises:
    ValueError: if an argument is out of range.
  """
  if not 3 <= classes <= len(WNIDS):
    raise ValueError(f"classes must be in [3, {len(WNIDS)}], got {classes}.")
  if train_per_class < 2:
    raise ValueError(f"train_per_class must be >= 2, got {train_per_class}.")
  class_names = _read_lines(_label_file("labels.txt"))
  val_wnids = _read_lines(_label_file("validation_labels.txt"))
  if not 1 <= val_images <= len(val_wnids):
    raise ValueError(f"val_images must be in [1, {len(val_wnids)}].")
  os.makedirs(manual_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  index = {wnid: i for i, wnid in enumerate(class_names)}

  train = []
  with tarfile.open(os.path.join(manual_dir, TRAIN_TAR), "w") as outer:
    for wnid in WNIDS[:classes]:
      inner_bytes = io.BytesIO()
      with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
        for k in range(train_per_class):
          file_name = f"{wnid}_{k + 1}.JPEG"
          mode, fmt = "RGB", "JPEG"
          if wnid == WNIDS[0] and k == 1:
            mode = "L"
          if wnid == WNIDS[1] and k == 0:
            file_name, mode = CMYK_FILE, "CMYK"
          if wnid == WNIDS[2] and k == 0:
            file_name, fmt = PNG_FILE, "PNG"
          data = _encode(_image(rng, size), mode, fmt)
          _add(inner, file_name, data)
          train.append({
              "file_name": file_name, "wnid": wnid, "label": index[wnid],
              "bytes": data, "rgb": _rgb(data),
              "reencoded": file_name in (CMYK_FILE, PNG_FILE)})
      _add(outer, f"{wnid}.tar", inner_bytes.getvalue())

  validation = []
  for i in range(val_images):
    file_name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
    data = _encode(_image(rng, size), "L" if i == 1 else "RGB", "JPEG")
    validation.append({
        "file_name": file_name, "wnid": val_wnids[i],
        "label": index[val_wnids[i]], "bytes": data, "rgb": _rgb(data),
        "reencoded": False})
  with tarfile.open(os.path.join(manual_dir, VAL_TAR), "w") as tar:
    for i in rng.permutation(val_images):  # Not in sorted order, like ImageNet.
      _add(tar, validation[i]["file_name"], validation[i]["bytes"])

  return {
      "class_names": class_names,
      "train": train,
      "validation": validation,
      "num_examples": {"train": len(train), "validation": len(validation)},
  }
