"""Tests of random-access TFDS sources, on a fake ImageNet prepared offline.

The fake ILSVRC2012 tars (tests/fake_imagenet.py) go through TFDS's real
imagenet2012 builder (`tfds_prepare.prepare`) once per module, with sockets
blocked to prove that nothing is downloaded.
"""

import io
import os
import socket
import time

import numpy as np
from PIL import Image
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")

# pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.data.tfds import builders as tfds_builders
from nfnets.data.tfds import prepare as tfds_prepare
from nfnets.data.tfds import source as tfds_source
import fake_imagenet

NAME = "imagenet2012"


class NetworkAttempt(AssertionError):
  pass


class _NoNetwork:
  """Context manager making every socket connection attempt fail loudly."""

  def __enter__(self):
    self.attempts = []
    self._saved = (socket.socket.connect, socket.socket.connect_ex,
                   socket.create_connection, socket.getaddrinfo)

    def refuse(*args, **unused_kwargs):
      self.attempts.append(args[1:] if args else args)
      raise NetworkAttempt(f"network access attempted: {args[1:]!r}")

    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse
    return self

  def __exit__(self, *exc):
    (socket.socket.connect, socket.socket.connect_ex,
     socket.create_connection, socket.getaddrinfo) = self._saved
    return False


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
  """(data_dir, manual_dir, written, seconds to prepare, network attempts)."""
  root = tmp_path_factory.mktemp("tfds")
  manual_dir, data_dir = str(root / "manual"), str(root / "data")
  # 18 training images: the NFNet recipe's batch of 8 reads 16 crops.
  written = fake_imagenet.write_fake_imagenet(manual_dir, train_per_class=6)
  start = time.perf_counter()
  with _NoNetwork() as net:
    tfds_prepare.prepare(NAME, data_dir=data_dir, manual_dir=manual_dir)
  seconds = time.perf_counter() - start
  return data_dir, manual_dir, written, seconds, net.attempts


def _decode_rgb(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"), np.int32)


def _match(data: bytes, written: list[dict]) -> dict:
  """The written image that `data` (as read) stores."""
  for entry in written:
    if entry["bytes"] == data:
      assert not entry["reencoded"], entry["file_name"]
      return entry
  # Re-encoded by the builder (CMYK, PNG): the closest in pixels.
  pixels = _decode_rgb(data)
  diffs = {e["file_name"]: np.abs(pixels - e["rgb"]).mean()
           for e in written if e["rgb"].shape == pixels.shape}
  name = min(diffs, key=diffs.get)
  assert diffs[name] < 12, diffs
  entry = next(e for e in written if e["file_name"] == name)
  assert entry["reencoded"], name
  return entry


def test_prepare_is_offline_fast_and_only_writes_data_dir(imagenet):
  data_dir, _, _, seconds, attempts = imagenet
  assert not attempts
  assert seconds < 30, seconds
  assert os.listdir(data_dir) == [NAME]
  (version,) = os.listdir(os.path.join(data_dir, NAME))
  files = sorted(os.listdir(os.path.join(data_dir, NAME, version)))
  assert f"{NAME}-train.array_record-00000-of-00001" in files
  assert f"{NAME}-validation.array_record-00000-of-00001" in files
  assert not [f for f in files if "tfrecord" in f or "incomplete" in f]


def test_prepare_twice_leaves_the_data(imagenet):
  data_dir, manual_dir, _, _, _ = imagenet
  folder = os.path.join(data_dir, NAME)
  before = {(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, fs in os.walk(folder) for f in fs}
  with _NoNetwork():
    tfds_prepare.prepare(NAME, data_dir=data_dir, manual_dir=manual_dir)
    # Prepared data needs no manual_dir any more.
    tfds_prepare.prepare(NAME, data_dir=data_dir, manual_dir="")
  after = {(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
           for d, _, fs in os.walk(folder) for f in fs}
  assert after == before


def test_splits_counts_and_classes(imagenet):
  data_dir, _, written, _, _ = imagenet
  for split in ("train", "validation"):
    source = tfds_source.load(NAME, split, data_dir=data_dir)
    assert source.name == NAME and source.split == split
    assert source.num_examples == len(source) == written["num_examples"][split]
    assert source.num_classes == 1000
    assert source.class_names == written["class_names"]
  head = tfds_source.load(NAME, "train[:5]", data_dir=data_dir)
  assert head.num_examples == 5


@pytest.mark.parametrize("split", ["train", "validation"])
def test_read_returns_stored_images_and_labels(imagenet, split):
  data_dir, _, written, _, _ = imagenet
  source = tfds_source.load(NAME, split, data_dir=data_dir)
  images, labels = source.read(np.arange(source.num_examples))
  assert labels.dtype == np.int32 and labels.shape == (source.num_examples,)
  assert all(isinstance(image, bytes) for image in images)
  matched = [_match(image, written[split]) for image in images]
  # Every written image once, with its label: train by the wnid's index in
  # TFDS's class list, validation from validation_labels.txt.
  assert sorted(e["file_name"] for e in matched) == sorted(
      e["file_name"] for e in written[split])
  np.testing.assert_array_equal(labels, [e["label"] for e in matched])
  for entry, label in zip(matched, labels):
    assert written["class_names"][label] == entry["wnid"]
  if split == "train":  # The CMYK and PNG files come back as RGB JPEGs.
    for image, entry in zip(images, matched):
      if entry["reencoded"]:
        with Image.open(io.BytesIO(image)) as decoded:
          assert (decoded.format, decoded.mode) == ("JPEG", "RGB")


def test_read_repeated_unsorted_indices(imagenet):
  data_dir, _, _, _, _ = imagenet
  source = tfds_source.load(NAME, "train", data_dir=data_dir)
  one_by_one = [source.read(np.array([i])) for i in range(len(source))]
  indices = np.array([7, 0, 7, 11, 3, 0, 1], np.int64)
  images, labels = source.read(indices)
  assert images == [one_by_one[i][0][0] for i in indices]
  np.testing.assert_array_equal(labels, [one_by_one[i][1][0] for i in indices])
  images, labels = source.read(np.zeros([0], np.int32))
  assert images == [] and labels.shape == (0,) and labels.dtype == np.int32
  with pytest.raises(IndexError, match="out of range"):
    source.read(np.array([0, len(source)]))
  with pytest.raises(IndexError, match="out of range"):
    source.read(np.array([-1]))
  with pytest.raises(ValueError, match="1-D integer"):
    source.read(np.zeros([2, 2], np.int64))


def _one_line_error(call, *fragments):
  with pytest.raises(ValueError) as info:
    call()
  message = str(info.value)
  assert "\n" not in message, message
  for fragment in fragments:
    assert fragment in message, (fragment, message)
  return message


def test_not_prepared_errors(tmp_path):
  missing = str(tmp_path / "missing")
  tars = "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar"
  for data_dir, where in [(missing, "does not exist"),
                          ("", "data_dir is empty")]:
    _one_line_error(lambda d=data_dir: tfds_source.load(NAME, "train",
                                                        data_dir=d),
                    where, "tfds.prepare.prepare", "manual_dir", tars)
  empty = tmp_path / "empty"
  empty.mkdir()
  _one_line_error(lambda: tfds_source.load(NAME, "train", data_dir=str(empty)),
                  str(empty), "is empty", "tfds.prepare.prepare", tars)
  other = tmp_path / "other"
  (other / "mnist").mkdir(parents=True)
  _one_line_error(lambda: tfds_source.load(NAME, "train", data_dir=str(other)),
                  str(other), "not prepared", "dataset_info.json", tars)
  # A dataset that downloads is not prepared here, and says how elsewhere.
  _one_line_error(
      lambda: tfds_source.load("cifar10", "train", data_dir=str(other)),
      str(other), "download_and_prepare", "file_format='array_record'")


def test_unknown_name_and_split_errors(imagenet):
  data_dir, _, _, _, _ = imagenet
  _one_line_error(
      lambda: tfds_source.load("no_such_dataset", "train", data_dir=data_dir),
      "unknown dataset 'no_such_dataset'", data_dir)
  _one_line_error(lambda: tfds_builders.check_name("no_such_dataset"),
                  "unknown dataset 'no_such_dataset'")
  tfds_builders.check_name(NAME)
  tfds_builders.check_name("cifar10")
  _one_line_error(lambda: tfds_source.load(NAME, "val", data_dir=data_dir),
                  "no split 'val'", "available: train, validation", data_dir)


def test_prepare_errors(imagenet, tmp_path):
  _, manual_dir, _, _, _ = imagenet
  data_dir = str(tmp_path / "data")
  _one_line_error(
      lambda: tfds_prepare.prepare(NAME, data_dir=data_dir,
                                  manual_dir=str(tmp_path / "nowhere")),
      "does not exist", str(tmp_path / "nowhere"), "ILSVRC2012_img_train.tar")
  only_val = tmp_path / "only_val"
  only_val.mkdir()
  os.symlink(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"),
             only_val / "ILSVRC2012_img_val.tar")
  _one_line_error(
      lambda: tfds_prepare.prepare(NAME, data_dir=data_dir,
                                  manual_dir=str(only_val)),
      "lacks ILSVRC2012_img_train.tar", str(only_val))
  _one_line_error(
      lambda: tfds_prepare.prepare("no_such_dataset", data_dir=data_dir,
                                  manual_dir=manual_dir), "unknown dataset")
  with _NoNetwork() as net:
    _one_line_error(
        lambda: tfds_prepare.prepare("cifar10", data_dir=data_dir,
                                    manual_dir=manual_dir),
        "manual-download", "never downloads")
    # A manual dataset whose builder also downloads (the subset lists).
    _one_line_error(
        lambda: tfds_prepare.prepare("imagenet2012_subset/1pct",
                                    data_dir=data_dir, manual_dir=manual_dir),
        "wants to download", "never downloads")
  assert not net.attempts
  # Nothing half-written is left (a builder with configs may have saved its
  # default config name in data_dir/<name>/metadata.json).
  left = [f for _, _, fs in os.walk(data_dir) for f in fs]
  assert set(left) <= {"metadata.json"}, left


def test_open_split_picks_the_eval_split(imagenet, tmp_path):
  data_dir, manual_dir, _, _, _ = imagenet
  source = tfds_source.open_split(NAME, "", data_dir=data_dir,
                                  manual_dir=manual_dir)
  assert source.split == "validation"
  fresh = str(tmp_path / "fresh")
  _one_line_error(
      lambda: tfds_source.open_split(NAME, "train", data_dir=fresh,
                                     manual_dir=manual_dir, may_prepare=False),
      "does not exist", "tfds.prepare.prepare",
      "with several processes none prepares it")


def _tiny_builder_class():
  """A 2-split image classification builder, unregistered, made offline."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class NfnetsTinyImages(tfds.core.GeneratorBasedBuilder,
                         skip_registration=True):
    """Five train and three test PNGs of three classes."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(encoding_format="png"),
              "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
          }),
          supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(0, 5),
              "test": self._generate_examples(5, 3)}

    def _generate_examples(self, start, count):
      for i in range(start, start + count):
        yield i, {"image": tiny_png(i), "label": i % 3}

  return NfnetsTinyImages


def tiny_png(i: int) -> bytes:
  rng = np.random.default_rng(i)
  pixels = rng.integers(0, 256, (6 + i, 5, 3)).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def test_tfrecord_dataset_converts_to_array_record(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path)
  builder = _tiny_builder_class()(data_dir=data_dir)
  with _NoNetwork():
    builder.download_and_prepare(
        download_dir=str(tmp_path / "downloads"),
        download_config=tfds.download.DownloadConfig(try_download_gcs=False,
                                                     num_shards=2))
  version_dir = os.path.join(data_dir, "nfnets_tiny_images", "1.0.0")
  assert "nfnets_tiny_images-train.tfrecord-00001-of-00002" in os.listdir(
      version_dir)
  name = "nfnets_tiny_images"
  message = _one_line_error(
      lambda: tfds_source.load(name, "train", data_dir=data_dir),
      "tfrecord", "cannot be read by index", "prepare.convert(",
      "tfds convert_format", "--out_file_format=array_record")
  # The command in the message is the real one.
  command = message.split('python -c "')[1].split('"')[0]
  exec(command, {})  # pylint: disable=exec-used
  tfds_prepare.convert(name, data_dir=data_dir)  # Again: nothing to do.
  assert "nfnets_tiny_images-train.array_record-00001-of-00002" in os.listdir(
      version_dir)
  for split, first, count in [("train", 0, 5), ("test", 5, 3)]:
    source = tfds_source.load(name, split, data_dir=data_dir)
    assert source.num_examples == count and source.num_classes == 3
    assert source.class_names == ["a", "b", "c"]
    images, labels = source.read(np.arange(count)[::-1])
    by_bytes = {tiny_png(i): i for i in range(first, first + count)}
    found = [by_bytes[image] for image in images]  # Stored unchanged.
    assert sorted(found) == list(range(first, first + count))
    np.testing.assert_array_equal(labels, [i % 3 for i in found])


# ------------------------------------------- The pipeline and the trainer.


def test_eval_on_two_processes_covers_each_example_once(imagenet):
  from nfnets.data import pipeline  # pylint: disable=g-import-not-at-top
  data_dir, _, written, _, _ = imagenet
  source = tfds_source.load(NAME, "validation", data_dir=data_dir)
  labels = []
  parts = [list(pipeline.eval_pass(source, 4, image_size=32, process_index=p,
                                   process_count=2)) for p in range(2)]
  for step in zip(*parts):
    for part in step:
      labels.extend(part["labels"][part["mask"] == 1])
  assert len(labels) == written["num_examples"]["validation"]
  _, expected = source.read(np.arange(source.num_examples))
  np.testing.assert_array_equal(labels, expected)


def test_nfnet_config_trains_and_evaluates_on_fake_imagenet(imagenet,
                                                            tmp_path):
  """configs/nfnet.py as a user runs it, with a tiny model: 2 steps + eval."""
  from configs import nfnet  # pylint: disable=g-import-not-at-top
  from nfnets.training import loop  # pylint: disable=g-import-not-at-top
  _, manual_dir, written, _, _ = imagenet
  config = nfnet.get_config("variant=F0")
  assert config.dataset.randaugment_layers == 4
  assert config.dataset.mixup_alpha and config.dataset.cutmix_alpha
  config.model.kwargs = dict(width_multiplier=0.125, group_width=16,
                             depths=(1, 1, 1, 1))
  # Prepared on first use from manual_dir, into a fresh data_dir.
  config.dataset.update(dict(data_dir=str(tmp_path / "tfds"),
                             manual_dir=manual_dir, image_size=32,
                             eval_image_size=32))
  config.update(dict(batch_size=8, eval_batch_size=8, num_steps=2,
                     precision="float32", log_every_steps=1))
  config.checkpoint.async_save = False
  results = loop.train_and_evaluate(config, str(tmp_path / "run"),
                                    "train_eval")
  assert results["eval_examples"] == written["num_examples"]["validation"]
  assert np.isfinite(results["loss"]) and np.isfinite(results["eval_loss"])
  assert os.path.isdir(tmp_path / "tfds" / NAME)
