"""TFDS builders shared by `source` (reading) and `prepare` (writing).

The dataset-name checks, builder construction, and the one-line errors that
say how to prepare or convert a dataset. TensorFlow Datasets is imported
inside `tfds_module()`, so importing this module loads no TensorFlow.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any

ARRAY_RECORD = "array_record"
# The tars TFDS's ImageNet builders read from manual_dir (a test tar is
# optional: the builder then skips the test split).
IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
_MANUAL_FILES = {
    "imagenet2012": IMAGENET_TARS,
    "imagenet2012_subset": IMAGENET_TARS,
    "imagenet2012_real": ("ILSVRC2012_img_val.tar",),
}
# Files named by a builder's MANUAL_DOWNLOAD_INSTRUCTIONS, for other builders.
_ARCHIVE_NAME = re.compile(r"[\w.-]+\.(?:tar\.gz|tgz|tar|zip)\b")


def tfds_module() -> Any:
  """Imports and returns `tensorflow_datasets`.

  tensorflow-datasets 4.9 uses `importlib_resources` to locate a builder's
  code (e.g. imagenet2012's label files) but only declares it for Python <
  3.9; where it is missing, the standard library's `importlib.resources`
  (which has the same `abc.Traversable`) stands in for it.
  """
  try:
    importlib.import_module("importlib_resources")
  except ImportError:
    try:
      importlib.import_module("importlib.resources.abc")  # Python >= 3.11.
    except ImportError:  # Then TFDS's own error will say what is missing.
      pass
    else:
      sys.modules.setdefault("importlib_resources",
                             sys.modules["importlib.resources"])
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f"TFDS datasets need tensorflow-datasets ({e}): pip "
                     "install -e '.[imagenet]'") from None
  return tfds


def base_name(name: str) -> str:
  """'imagenet2012_subset/1pct:5.0.0' -> 'imagenet2012_subset'."""
  return name.split("/")[0].split(":")[0]


def find_builder_cls(name: str) -> Any:
  """The registered TFDS builder class of `name`, or None."""
  tfds = tfds_module()
  try:
    return tfds.builder_cls(base_name(name))
  except tfds.core.DatasetNotFoundError:
    return None


def check_name(name: str) -> None:
  """Raises ValueError unless `name` is a TFDS builder name.

  Args:
    name: a TFDS dataset name, optionally with '/config' and ':version'.

  Raises:
    ValueError: if no TFDS builder has that name.
  """
  if find_builder_cls(name) is None:
    tfds = tfds_module()
    raise ValueError(
        f"unknown dataset {name!r}: not 'digits', 'image_folder' nor a "
        f"tensorflow_datasets {tfds.__version__} builder name (see "
        "tfds.list_builders())")


def manual_files(name: str, builder_cls: Any) -> tuple[str, ...]:
  """The files a manual-download builder needs in manual_dir, if known."""
  base = base_name(name)
  if base in _MANUAL_FILES:
    return _MANUAL_FILES[base]
  instructions = getattr(builder_cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", "") or ""
  return tuple(dict.fromkeys(_ARCHIVE_NAME.findall(instructions)))


def how_to_prepare(name: str, data_dir: str, builder_cls: Any) -> str:
  """One sentence saying how to prepare `name` in `data_dir`."""
  if getattr(builder_cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
    files = manual_files(name, builder_cls)
    holding = (" holding " + " and ".join(files)) if files else (
        " holding the files its MANUAL_DOWNLOAD_INSTRUCTIONS name")
    return (f"prepare it with nfnets.data.tfds.prepare.prepare({name!r}, "
            f"data_dir={data_dir!r}, manual_dir=DIR), DIR{holding} (or set "
            "dataset.manual_dir to DIR)")
  return (f"prepare it where the internet is reachable with tfds.builder("
          f"{name!r}, data_dir={data_dir!r}, file_format='array_record')"
          ".download_and_prepare() and copy it here")


def make_builder(name: str, data_dir: str) -> Any:
  """`tfds.builder(name, data_dir=...)`, bad configs or versions in one line.

  Raises:
    tfds.core.DatasetNotFoundError: if neither code nor files define `name`.
    ValueError: if the builder cannot be made (e.g. an unknown config).
  """
  tfds = tfds_module()
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    raise
  except (AssertionError, ValueError) as e:  # Bad config or version.
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise ValueError(f"cannot open TFDS {name!r} in data_dir {data_dir!r}: "
                     f"{type(e).__name__}: {first_line}") from None


def open_builder(name: str, data_dir: str) -> Any:
  """The builder of `name` prepared in `data_dir`; ValueError otherwise."""
  tfds = tfds_module()
  builder_cls = find_builder_cls(name)
  if not data_dir:
    where = "data_dir is empty"
  elif not os.path.isdir(data_dir):
    where = f"data_dir {data_dir!r} does not exist"
  elif not os.listdir(data_dir):
    where = f"data_dir {data_dir!r} is empty"
  else:
    where = ""
  unknown = (f"unknown dataset {name!r}: not a tensorflow_datasets "
             f"{tfds.__version__} builder name (see tfds.list_builders()) and "
             f"not prepared in data_dir {data_dir!r}")
  if builder_cls is None and where:
    raise ValueError(unknown)
  if where:
    how = how_to_prepare(name, data_dir or "DATA_DIR", builder_cls)
    raise ValueError(f"TFDS {name} is not prepared: {where}; {how}")
  try:
    builder = make_builder(name, data_dir)
  except tfds.core.DatasetNotFoundError:
    raise ValueError(unknown) from None
  if not builder.is_prepared():
    raise ValueError(
        f"TFDS {name} is not prepared in data_dir {data_dir!r} (no "
        f"{os.fspath(builder.data_path)}/dataset_info.json); "
        f"{how_to_prepare(name, data_dir, builder_cls)}")
  return builder


def has_array_record(builder: Any) -> bool:
  formats = builder.info.available_file_formats()
  return ARRAY_RECORD in {f.value for f in formats}


def conversion_error(name: str, data_dir: str, builder: Any) -> ValueError:
  formats = sorted(f.value for f in builder.info.available_file_formats())
  return ValueError(
      f"TFDS {name} in {os.fspath(builder.data_path)} is stored as "
      f"{', '.join(formats) or 'an unknown format'}, which cannot be read by "
      "index; add array_record shards in place with python -c \"from "
      f"nfnets.data.tfds import prepare; prepare.convert({name!r}, "
      f"data_dir={data_dir!r})\" (or tfds convert_format "
      f"--dataset_version_dir={os.fspath(builder.data_path)} "
      "--out_file_format=array_record, which needs apache-beam installed)")
