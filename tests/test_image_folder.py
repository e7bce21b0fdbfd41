"""Tests of the class-per-folder source and its end-to-end training."""

import os
import signal
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

pytest.importorskip("tensorflow")

# pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.data import image_folder
import image_helpers

NUM_READABLE = image_helpers.NUM_READABLE


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
  return image_helpers.write_folder(str(tmp_path_factory.mktemp("folder")))


def test_listing_splits_and_skips_the_corrupt_file(folder, monkeypatch):
  warnings = []
  monkeypatch.setattr(image_folder.logging, "warning",
                      lambda msg, *args: warnings.append(msg % args))
  train = image_folder.list_with_skipped(folder, "train", 0.25, 0)
  val = image_folder.list_with_skipped(folder, "val", 0.25, 0)
  assert train[2] == val[2] == ["a", "b", "c"]
  assert train[3] + val[3] == 1 and len(warnings) == 1
  assert "Skipping 1 unreadable" in warnings[0]
  assert len(train[0]) + len(val[0]) == NUM_READABLE
  assert not set(train[0]) & set(val[0])
  assert all(not p.endswith(("corrupt.jpg", ".txt")) for p in train[0] + val[0])
  # Deterministic given the seed.
  assert image_folder.list_image_folder(folder, "val", 0.25, 0)[0] == val[0]


def test_train_and_val_subfolders_are_the_splits(tmp_path):
  for split, n in (("train", 3), ("val", 2)):
    for name in ("x", "y"):
      os.makedirs(tmp_path / split / name)
      for i in range(n):
        Image.new("RGB", (8, 8)).save(tmp_path / split / name / f"{i}.png")
  paths, labels, names = image_folder.list_image_folder(str(tmp_path), "val")
  assert names == ["x", "y"] and labels.tolist() == [0, 0, 1, 1]
  assert all(os.sep + "val" + os.sep in p for p in paths)


def test_a_class_only_in_val_gets_the_same_label_in_both_splits(tmp_path):
  for split, names in (("train", ("a", "c")), ("val", ("a", "b", "c"))):
    for name in names:
      os.makedirs(tmp_path / split / name)
      Image.new("RGB", (8, 8)).save(tmp_path / split / name / "0.png")
  train = image_folder.list_image_folder(str(tmp_path), "train")
  val = image_folder.list_image_folder(str(tmp_path), "val")
  assert train[2] == val[2] == ["a", "b", "c"]
  assert train[1].tolist() == [0, 2] and val[1].tolist() == [0, 1, 2]


def test_files_pil_reads_but_tensorflow_cannot_decode_are_skipped(tmp_path):
  os.makedirs(tmp_path / "k")
  Image.new("RGB", (8, 8)).save(tmp_path / "k" / "fine.bmp")
  Image.new("1", (8, 8)).save(tmp_path / "k" / "one_bit.bmp")
  Image.new("RGB", (8, 8)).save(tmp_path / "k" / "tiff.jpg", format="TIFF")
  paths, _, _, skipped = image_folder.list_with_skipped(str(tmp_path),
                                                        "train", 0.0)
  assert [os.path.basename(p) for p in paths] == ["fine.bmp"]
  assert skipped == 2


@pytest.mark.parametrize("make, message", [
    (lambda root: None, "does not exist"),
    (lambda root: os.makedirs(root), "no class sub-folders"),
    (lambda root: os.makedirs(os.path.join(root, "k")), "no readable images"),
])
def test_bad_roots_are_clear_errors(tmp_path, make, message):
  root = str(tmp_path / "data")
  make(root)
  with pytest.raises(ValueError, match=message):
    image_folder.list_image_folder(root, "train")


def test_source_reads_bytes_and_labels_in_index_order(folder):
  source = image_folder.ImageFolderSource(folder, "train", 0.25)
  assert source.num_classes == 3
  assert source.num_examples == len(source.paths) == len(source.labels)
  indices = np.array([3, 0, 3, len(source.paths) - 1])
  contents, labels = source.read(indices)
  for k, i in enumerate(indices):
    with open(source.paths[i], "rb") as f:
      assert contents[k] == f.read()
  np.testing.assert_array_equal(labels, source.labels[indices])


def _augmented_config(folder):
  """The NFNet recipe's augmentation (MixUp/CutMix, RandAugment 2 x 15) on
  the image folder, with the tiny digits model, for 4 steps."""
  from configs import digits  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  config.dataset.update(dict(
      name="image_folder", data_dir=folder, num_classes=3, image_size=32,
      eval_image_size=32, val_fraction=0.1, randaugment_layers=2,
      randaugment_magnitude=15.0, mixup_alpha=0.2, cutmix_alpha=1.0))
  config.fast_paths = False  # compiles faster; the same step (test_train.py)
  config.batch_size = 8  # 16 crops a step: an epoch a step (18 images)
  config.num_steps = 4
  config.checkpoint.update(dict(async_save=False, every_steps=2))
  return config


def test_trainer_on_an_image_folder_resumes_the_same_augmented_batches(
    folder, tmp_path, monkeypatch):
  # End to end with the recipe's augmentation. Its keys come from the state
  # (seed, step) and the host's crops from the data position in the
  # checkpoint: preempted after 2 steps and resumed, a run ends where an
  # uninterrupted one does. (Stopped by SIGTERM rather than by a 2-step
  # config, the runs share one compiled train step: a run's length is a
  # constant of its learning rate schedule.)
  from nfnets.training import weights_io  # pylint: disable=g-import-not-at-top
  from nfnets.training import loop  # pylint: disable=g-import-not-at-top
  import train_helpers  # pylint: disable=g-import-not-at-top
  config = _augmented_config(folder)
  whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
  results = loop.train_and_evaluate(config, whole, "train_eval")
  num_val = len(image_folder.list_image_folder(folder, "val", 0.1, 0)[0])
  assert results["eval_examples"] == num_val
  assert np.isfinite(results["eval_loss"]) and np.isfinite(results["loss"])

  def preempt(batch):  # as the second batch is drawn: stop after its step
    os.kill(os.getpid(), signal.SIGTERM)
    return batch

  train_helpers.change_train_batch(monkeypatch, 2, preempt)
  assert loop.train_and_evaluate(config, parts)["preempted"] == 2
  monkeypatch.undo()
  loop.train_and_evaluate(config, parts)
  a, b = weights_io.read_params(whole), weights_io.read_params(parts)
  for x, y in zip(jax_leaves(a["params"]), jax_leaves(b["params"])):
    np.testing.assert_array_equal(x, y)
  fresh = weights_io.read_params(os.path.join(parts, "checkpoints", "2"))
  assert any(not np.array_equal(x, y) for x, y in zip(
      jax_leaves(fresh["params"]), jax_leaves(b["params"])))


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.leaves(tree)


def test_image_folder_config_needs_a_data_dir():
  from configs import digits  # pylint: disable=g-import-not-at-top
  from nfnets.training import experiment_config  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  config.dataset.name = "image_folder"
  with pytest.raises(ValueError,
                     match="dataset.data_dir is required for image_folder"):
    experiment_config.validate(config)


def test_trainer_and_digits_data_do_not_import_tensorflow():
  code = ("import sys; import nfnets.training.loop, nfnets.data, nfnets.models; "
          "assert 'tensorflow' not in sys.modules, 'TF imported'")
  subprocess.run([sys.executable, "-c", code], check=True,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_missing_tensorflow_is_a_one_line_error(folder, monkeypatch):
  import importlib.util  # pylint: disable=g-import-not-at-top
  from configs import digits  # pylint: disable=g-import-not-at-top
  from nfnets import data  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  config.dataset.update(dict(name="image_folder", data_dir=folder))
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ValueError, match=r"needs TensorFlow: pip install -e "):
    data.train_iterator(config)
