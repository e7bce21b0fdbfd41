"""Random access to prepared TFDS image classification datasets.

`load(name, split, data_dir=...)` opens one split of a dataset that TFDS has
prepared in `data_dir` in the `array_record` file format and returns a
`TFDSSource`, whose `read(indices)` returns the examples' *encoded* images
(the JPEG/PNG bytes as stored, not decoded) and int32 labels, in the order
asked. That is all the input pipeline needs to sample by index like the
image-folder source: seeded epoch permutations, per-process slices and exact
resumption.

Datasets that are not prepared yet, or prepared in TFDS's default
`tfrecord` format (which cannot be read by index), are handled by
`nfnets.data.tfds_prepare` (`prepare`, `convert`); `open_split` prepares a
manual-download dataset first when given its `manual_dir`.

TensorFlow Datasets and TensorFlow are imported inside functions, so that
the trainer only loads them when a TFDS dataset is used.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import resource
import sys
from typing import Any

import numpy as np

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


def _tfds() -> Any:
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


def _base_name(name: str) -> str:
  """'imagenet2012_subset/1pct:5.0.0' -> 'imagenet2012_subset'."""
  return name.split("/")[0].split(":")[0]


def _builder_cls(name: str) -> Any:
  """The registered TFDS builder class of `name`, or None."""
  tfds = _tfds()
  try:
    return tfds.builder_cls(_base_name(name))
  except tfds.core.DatasetNotFoundError:
    return None


def check_name(name: str) -> None:
  """Raises ValueError unless `name` is a TFDS builder name.

  Args:
    name: a TFDS dataset name, optionally with '/config' and ':version'.

  Raises:
    ValueError: if no TFDS builder has that name.
  """
  if _builder_cls(name) is None:
    tfds = _tfds()
    raise ValueError(
        f"unknown dataset {name!r}: not 'digits', 'image_folder' nor a "
        f"tensorflow_datasets {tfds.__version__} builder name (see "
        "tfds.list_builders())")


def _manual_files(name: str, builder_cls: Any) -> tuple[str, ...]:
  """The files a manual-download builder needs in manual_dir, if known."""
  base = _base_name(name)
  if base in _MANUAL_FILES:
    return _MANUAL_FILES[base]
  instructions = getattr(builder_cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", "") or ""
  return tuple(dict.fromkeys(_ARCHIVE_NAME.findall(instructions)))


def _how_to_prepare(name: str, data_dir: str, builder_cls: Any) -> str:
  """One sentence saying how to prepare `name` in `data_dir`."""
  if getattr(builder_cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
    files = _manual_files(name, builder_cls)
    holding = (" holding " + " and ".join(files)) if files else (
        " holding the files its MANUAL_DOWNLOAD_INSTRUCTIONS name")
    return (f"prepare it with nfnets.data.tfds_prepare.prepare({name!r}, "
            f"data_dir={data_dir!r}, manual_dir=DIR), DIR{holding} (or set "
            "dataset.manual_dir to DIR)")
  return (f"prepare it where the internet is reachable with tfds.builder("
          f"{name!r}, data_dir={data_dir!r}, file_format='array_record')"
          ".download_and_prepare() and copy it here")


def _make_builder(name: str, data_dir: str) -> Any:
  """`tfds.builder(name, data_dir=...)`, bad configs or versions in one line.

  Raises:
    tfds.core.DatasetNotFoundError: if neither code nor files define `name`.
    ValueError: if the builder cannot be made (e.g. an unknown config).
  """
  tfds = _tfds()
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    raise
  except (AssertionError, ValueError) as e:  # Bad config or version.
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise ValueError(f"cannot open TFDS {name!r} in data_dir {data_dir!r}: "
                     f"{type(e).__name__}: {first_line}") from None


def _open_builder(name: str, data_dir: str) -> Any:
  """The builder of `name` prepared in `data_dir`; ValueError otherwise."""
  tfds = _tfds()
  builder_cls = _builder_cls(name)
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
    how = _how_to_prepare(name, data_dir or "DATA_DIR", builder_cls)
    raise ValueError(f"TFDS {name} is not prepared: {where}; {how}")
  try:
    builder = _make_builder(name, data_dir)
  except tfds.core.DatasetNotFoundError:
    raise ValueError(unknown) from None
  if not builder.is_prepared():
    raise ValueError(
        f"TFDS {name} is not prepared in data_dir {data_dir!r} (no "
        f"{os.fspath(builder.data_path)}/dataset_info.json); "
        f"{_how_to_prepare(name, data_dir, builder_cls)}")
  return builder


def _has_array_record(builder: Any) -> bool:
  formats = builder.info.available_file_formats()
  return ARRAY_RECORD in {f.value for f in formats}


def _conversion_error(name: str, data_dir: str, builder: Any) -> ValueError:
  formats = sorted(f.value for f in builder.info.available_file_formats())
  return ValueError(
      f"TFDS {name} in {os.fspath(builder.data_path)} is stored as "
      f"{', '.join(formats) or 'an unknown format'}, which cannot be read by "
      "index; add array_record shards in place with python -c \"from "
      f"nfnets.data import tfds_prepare; tfds_prepare.convert({name!r}, "
      f"data_dir={data_dir!r})\" (or tfds convert_format "
      f"--dataset_version_dir={os.fspath(builder.data_path)} "
      "--out_file_format=array_record, which needs apache-beam installed)")


def _find_features(info: Any) -> tuple[str, str]:
  """(image key, label key) of a dataset's top-level features."""
  tfds = _tfds()
  features = info.features
  keys = info.supervised_keys
  if (isinstance(keys, (tuple, list)) and len(keys) >= 2
      and all(isinstance(k, str) and k in features for k in keys[:2])):
    image_key, label_key = keys[0], keys[1]
  else:
    image_key = next((k for k, f in features.items()
                      if isinstance(f, tfds.features.Image)), None)
    label_key = next((k for k, f in features.items()
                      if isinstance(f, tfds.features.ClassLabel)), None)
  if (image_key is None or label_key is None
      or not isinstance(features[image_key], tfds.features.Image)
      or not isinstance(features[label_key], tfds.features.ClassLabel)):
    raise ValueError(
        f"TFDS {info.full_name} is not an image classification dataset: "
        "need an Image and a ClassLabel feature (supervised_keys "
        f"{keys!r}, features {list(features.keys())})")
  return image_key, label_key


def _raise_open_file_limit(wanted: int = 65536) -> None:
  """Lifts the soft limit on open files towards the hard one.

  Random access keeps a reader open per shard touched (ImageNet's train split
  has about a thousand), which a common soft limit of 1024 would not allow.
  """
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
  if soft != resource.RLIM_INFINITY and soft < target:
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    logging.info("raised the open-file limit from %d to %d", soft, target)


class TFDSSource:
  """Random access to one split of a prepared TFDS image classification set.

  Made by `load`. Reads the serialized examples of the ArrayRecord shards
  through TFDS's data source (`builder.as_data_source`) and parses them with
  protobuf (TensorFlow's `tf.train.Example` message).

  Attributes:
    name: the dataset name given to `load`.
    split: the split, as given (TFDS slices like 'train[:10%]' work too).
    image_key: the image feature's name.
    label_key: the label feature's name.
  """

  def __init__(self, builder: Any, name: str, split: str):
    """Opens `split` of a prepared `builder` (see `load`).

    Args:
      builder: a prepared `tfds.core.DatasetBuilder` with array_record shards.
      name: the dataset name, for messages.
      split: a split of the dataset.

    Raises:
      ValueError: if the dataset is not image classification.
    """
    self.name = name
    self.split = split
    info = builder.info
    self.image_key, self.label_key = _find_features(info)
    self._label_feature = info.features[self.label_key]
    self._data_source = builder.as_data_source(split,
                                               file_format=ARRAY_RECORD)
    _raise_open_file_limit()
    self._num_examples = len(self._data_source)

  @property
  def num_examples(self) -> int:
    return self._num_examples

  def __len__(self) -> int:
    return self._num_examples

  @property
  def num_classes(self) -> int:
    return int(self._label_feature.num_classes)

  @property
  def class_names(self) -> list[str] | None:
    names = self._label_feature.names
    return list(names) if names else None

  def read(self, indices: np.ndarray) -> tuple[list[bytes], np.ndarray]:
    """The encoded images and labels of the examples at `indices`, in order.

    Args:
      indices: int [k] example indices in [0, num_examples), in any order,
        repeats allowed.

    Returns:
      (images, labels): the k images' encoded bytes (JPEG, PNG, ... as
      stored) and their int32 [k] labels.

    Raises:
      ValueError: if `indices` is not a 1-D integer array.
      IndexError: if an index is out of range.
    """
    indices = np.asarray(indices)
    if indices.ndim != 1 or (indices.size and
                             not np.issubdtype(indices.dtype, np.integer)):
      raise ValueError(f"indices must be a 1-D integer array, got dtype "
                       f"{indices.dtype} and shape {indices.shape}")
    if not indices.size:
      return [], np.zeros([0], np.int32)
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= self._num_examples:
      raise IndexError(f"index {low if low < 0 else high} out of range for "
                       f"{self.name} split {self.split!r} with "
                       f"{self._num_examples} examples")
    # The serialized tf.train.Examples, parsed here by protobuf's C parser:
    # 2-4x the rate of TFDS's generic NumPy decoding of the same records
    # (BENCHMARKS.md), which bounds how fast one process can be fed.
    from tensorflow.core.example import example_pb2  # pylint: disable=g-import-not-at-top
    raw = self._data_source.data_source.__getitems__(indices.tolist())
    images, labels = [], np.empty([len(raw)], np.int32)
    for k, record in enumerate(raw):
      feature = example_pb2.Example.FromString(record).features.feature
      images.append(feature[self.image_key].bytes_list.value[0])
      labels[k] = feature[self.label_key].int64_list.value[0]
    return images, labels

  def __repr__(self) -> str:
    return (f"TFDSSource({self.name!r}, split={self.split!r}, "
            f"num_examples={self._num_examples}, "
            f"num_classes={self.num_classes})")


def load(name: str, split: str, *, data_dir: str) -> TFDSSource:
  """Opens `split` of TFDS dataset `name` prepared in `data_dir`.

  Args:
    name: a TFDS dataset name, optionally with '/config' and ':version'.
    split: a split name ('train', 'validation', ...) or TFDS slice of one.
    data_dir: the TFDS data_dir the dataset was prepared in.

  Returns:
    The split's `TFDSSource`.

  Raises:
    ValueError: (one line) if `name` is unknown, the dataset is not prepared
      in `data_dir`, is not stored as array_record (the message says how to
      convert it), has no such split, or is not image classification.
  """
  builder = _open_builder(name, data_dir)
  if not _has_array_record(builder):
    raise _conversion_error(name, data_dir, builder)
  available = ", ".join(sorted(builder.info.splits.keys()))
  try:
    builder.info.splits[split]  # pylint: disable=pointless-statement
  except (KeyError, ValueError):
    raise ValueError(
        f"TFDS {name} in {os.fspath(builder.data_path)} has no split "
        f"{split!r}; available: {available}") from None
  return TFDSSource(builder, name, split)


def open_split(name: str, split: str, *, data_dir: str, manual_dir: str = "",
               may_prepare: bool = True) -> TFDSSource:
  """`load`, preparing a manual-download dataset first when needed.

  Args:
    name: a TFDS dataset name.
    split: the split; '' picks 'validation' if the dataset has one, else
      'test'.
    data_dir: the TFDS data_dir.
    manual_dir: where the manual-download files are, to prepare the
      dataset (`tfds_prepare.prepare`) when it is not prepared in `data_dir` yet ('' never prepares).
    may_prepare: whether this process may prepare it (False in multi-process
      runs, where one process must prepare it beforehand).

  Returns:
    The split's `TFDSSource`.

  Raises:
    ValueError: as `load` and `prepare` do.
  """
  if manual_dir and may_prepare:
    builder_cls = _builder_cls(name)
    if getattr(builder_cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
      from nfnets.data import tfds_prepare  # pylint: disable=g-import-not-at-top
      tfds_prepare.prepare(name, data_dir=data_dir, manual_dir=manual_dir)
  try:
    if not split:
      builder = _open_builder(name, data_dir)
      splits = builder.info.splits.keys()
      split = "validation" if "validation" in splits else "test"
    return load(name, split, data_dir=data_dir)
  except ValueError as e:
    if manual_dir and not may_prepare and "not prepared" in str(e):
      raise ValueError(f"{e}; with several processes none prepares it: run "
                       "prepare once before the run") from None
    raise
