"""Preparing TFDS datasets for `nfnets.data.tfds.source`, offline.

`prepare(name, data_dir=..., manual_dir=...)` runs the real TFDS builder of a
manual-download dataset (imagenet2012: the ILSVRC2012 tars) into `data_dir`
as `array_record`, with every download refused: nothing is fetched and
nothing is written outside `data_dir` (the builder's scratch download folder
is a temporary one, removed afterwards).

Datasets prepared in TFDS's default `tfrecord` format cannot be read by
index. `convert(name, data_dir=...)` adds `array_record` shards next to the
`tfrecord` ones (the same conversion as `tfds convert_format`, without its
apache-beam dependency) and records them in `dataset_info.json`.
"""

from __future__ import annotations

from concurrent import futures
import logging
import os
import shutil
import tempfile
from typing import Any

from nfnets.data.tfds import builders


def _check_manual_dir(name: str, manual_dir: str, builder_cls: Any) -> None:
  """Raises ValueError unless `manual_dir` holds the files `name` needs."""
  files = builders.manual_files(name, builder_cls)
  wanted = f" holding {' and '.join(files)}" if files else ""
  if not manual_dir or not os.path.isdir(manual_dir):
    raise ValueError(
        f"cannot prepare TFDS {name}: manual_dir {manual_dir!r} does not exist"
        f"; set it to the folder{wanted}")
  missing = [f for f in files
             if not os.path.isfile(os.path.join(manual_dir, f))]
  if missing or not os.listdir(manual_dir):
    raise ValueError(
        f"cannot prepare TFDS {name}: manual_dir {manual_dir!r} lacks "
        f"{', '.join(missing) or 'any file'}; it must be the folder{wanted}")


def _refuse_downloads(builder: Any, name: str) -> None:
  """Makes `builder`'s download manager raise instead of downloading."""
  make = builder._make_download_manager  # pylint: disable=protected-access

  def refuse(*args, **unused_kwargs):
    what = f" {args[0]!r}" if args else ""
    raise ValueError(
        f"TFDS {name} wants to download{what}; prepare only reads manual_dir "
        "and never downloads: prepare it where the internet is reachable")

  def make_offline(**kwargs):
    manager = make(**kwargs)
    for method in ("download", "download_and_extract", "download_checksums",
                   "download_kaggle_data"):
      setattr(manager, method, refuse)
    return manager

  # pylint: disable-next=protected-access
  builder._make_download_manager = make_offline


def prepare(name: str, *, data_dir: str, manual_dir: str) -> None:
  """Prepares manual-download TFDS dataset `name` in `data_dir`, offline.

  Runs the real builder (`download_and_prepare`) on the files in
  `manual_dir` (for imagenet2012: ILSVRC2012_img_train.tar and
  ILSVRC2012_img_val.tar), writing array_record shards to
  `data_dir/<name>/<version>/`. Downloads (data, GCS copies, checksums) are
  refused; the builder's scratch download folder is a temporary one, removed
  afterwards, so only `data_dir` is written. A dataset already prepared there
  as array_record is left as is, so preparing twice is safe.

  Args:
    name: a TFDS dataset name with manual downloads, e.g. 'imagenet2012'.
    data_dir: the TFDS data_dir to write to (created if missing).
    manual_dir: the folder holding the manually downloaded files.

  Raises:
    ValueError: (one line) if `name` is unknown or has no manual download,
      `manual_dir` is missing or lacks a needed file, the builder tries to
      download, or the dataset is already prepared in tfrecord format (the
      message says how to convert it).
  """
  tfds = builders.tfds_module()
  builders.check_name(name)
  builder_cls = builders.find_builder_cls(name)
  if not getattr(builder_cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
    raise ValueError(
        f"cannot prepare TFDS {name}: prepare only builds manual-download "
        f"datasets (like imagenet2012) and never downloads; "
        f"{builders.how_to_prepare(name, data_dir, builder_cls)}")
  if not data_dir:
    raise ValueError(f"cannot prepare TFDS {name}: data_dir is empty")
  builder = builders.make_builder(name, data_dir)
  if builder.is_prepared():
    if not builders.has_array_record(builder):
      raise builders.conversion_error(name, data_dir, builder)
    logging.info("TFDS %s is already prepared in %s", name, builder.data_path)
    return
  _check_manual_dir(name, manual_dir, builder_cls)
  _refuse_downloads(builder, name)
  config = tfds.download.DownloadConfig(
      manual_dir=manual_dir, try_download_gcs=False,
      download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  scratch = tempfile.mkdtemp(prefix="tfds-downloads-")
  try:
    builder.download_and_prepare(download_dir=scratch, download_config=config,
                                 file_format=builders.ARRAY_RECORD)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


def convert(name: str, *, data_dir: str) -> None:
  """Adds array_record shards to a dataset prepared as tfrecord, in place.

  Does what `tfds convert_format --dataset_version_dir=DIR
  --out_file_format=array_record` does (that CLI needs apache-beam): each
  split's shards are copied record by record, in order, to array_record
  shards beside them, then `dataset_info.json` lists array_record among the
  dataset's file formats. The tfrecord shards are kept. Converting an
  already converted dataset does nothing.

  Args:
    name: the TFDS dataset name, optionally with '/config' and ':version'.
    data_dir: the TFDS data_dir it was prepared in.

  Raises:
    ValueError: (one line) if the dataset is unknown or not prepared there.
  """
  builder = builders.open_builder(name, data_dir)
  if builders.has_array_record(builder):
    return
  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import dataset_info as dataset_info_lib
  from tensorflow_datasets.core import file_adapters
  from tensorflow_datasets.core.utils import py_utils
  # pylint: enable=g-import-not-at-top
  info = builder.info
  in_adapter = file_adapters.ADAPTER_FOR_FORMAT[info.file_format]
  out_format = file_adapters.FileFormat.ARRAY_RECORD
  out_adapter = file_adapters.ADAPTER_FOR_FORMAT[out_format]
  shards = []  # (source, target, expected record count)
  for split_info in info.splits.values():
    template = split_info.filename_template
    out_template = template.replace(filetype_suffix=out_format.file_suffix)
    lengths = list(split_info.shard_lengths)
    for shard, length in enumerate(lengths):
      shards.append((
          template.sharded_filepath(shard_index=shard, num_shards=len(lengths)),
          out_template.sharded_filepath(shard_index=shard,
                                        num_shards=len(lengths)),
          length))

  def convert_shard(shard: tuple[Any, Any, int]) -> None:
    source, target, length = shard
    count = 0

    def records():
      nonlocal count
      for record in in_adapter.make_tf_data(filename=source):
        yield count, record.numpy()
        count += 1

    with py_utils.incomplete_file(target) as tmp_target:  # Renamed at the end.
      out_adapter.write_examples(path=tmp_target, iterator=records())
      if count != length:
        raise ValueError(f"{source} has {count} records, its "
                         f"dataset_info.json says {length}")

  # Threads: TensorFlow's reads and ArrayRecord's writes release the GIL.
  with futures.ThreadPoolExecutor(max_workers=max(1, min(8, len(shards)))
                                  ) as pool:
    list(pool.map(convert_shard, shards))
  proto = dataset_info_lib.read_proto_from_builder_dir(builder.data_path)
  if out_format.value not in proto.alternative_file_formats:
    proto.alternative_file_formats.append(out_format.value)
  dataset_info_lib.write_dataset_info_proto(
      proto, dataset_info_dir=builder.data_path)
