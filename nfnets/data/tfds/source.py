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
`nfnets.data.tfds.prepare` (`prepare`, `convert`); `open_split` prepares a
manual-download dataset first when given its `manual_dir`.

TensorFlow Datasets and TensorFlow are imported inside functions, so that
the trainer only loads them when a TFDS dataset is used.
"""

from __future__ import annotations

import logging
import os
import resource
from typing import Any

import numpy as np

from nfnets.data.tfds import builders
from nfnets.data.tfds import prepare


def _find_features(info: Any) -> tuple[str, str]:
  """(image key, label key) of a dataset's top-level features."""
  tfds = builders.tfds_module()
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
    self._data_source = builder.as_data_source(
        split, file_format=builders.ARRAY_RECORD)
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
  builder = builders.open_builder(name, data_dir)
  if not builders.has_array_record(builder):
    raise builders.conversion_error(name, data_dir, builder)
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
      dataset (`prepare.prepare`) when it is not prepared in `data_dir`
      yet ('' never prepares).
    may_prepare: whether this process may prepare it (False in multi-process
      runs, where one process must prepare it beforehand).

  Returns:
    The split's `TFDSSource`.

  Raises:
    ValueError: as `load` and `prepare` do.
  """
  if manual_dir and may_prepare:
    builder_cls = builders.find_builder_cls(name)
    if getattr(builder_cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
      prepare.prepare(name, data_dir=data_dir, manual_dir=manual_dir)
  try:
    if not split:
      builder = builders.open_builder(name, data_dir)
      splits = builder.info.splits.keys()
      split = "validation" if "validation" in splits else "test"
    return load(name, split, data_dir=data_dir)
  except ValueError as e:
    if manual_dir and not may_prepare and "not prepared" in str(e):
      raise ValueError(f"{e}; with several processes none prepares it: run "
                       "prepare once before the run") from None
    raise
