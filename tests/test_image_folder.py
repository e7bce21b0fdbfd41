"""Tests of the class-per-folder tf.data dataset (needs TensorFlow)."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

pytest.importorskip("tensorflow")

# pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.data import image_folder
from nfnets.data import transforms

NUM_READABLE = 21  # 18 RGB JPEGs + PNG + grayscale JPEG + CMYK JPEG.


def _smooth_image(rng: np.random.Generator) -> np.ndarray:
  """Random uint8 [h, w, 3] with structure at several scales, like a photo."""
  h, w = rng.integers(60, 121, 2)
  coarse = rng.integers(0, 256, (h // 10 + 1, w // 10 + 1, 3)).astype(np.uint8)
  image = Image.fromarray(coarse).resize((int(w), int(h)),
                                         Image.Resampling.BILINEAR)
  noise = rng.integers(-16, 17, (h, w, 3))
  return np.clip(np.asarray(image, np.int32) + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
  root = str(tmp_path_factory.mktemp("image_folder"))
  rng = np.random.default_rng(0)
  for name in ("a", "b", "c"):
    os.makedirs(os.path.join(root, name))
    for i in range(6):
      Image.fromarray(_smooth_image(rng)).save(
          os.path.join(root, name, f"{i}.jpg"), quality=95)
  Image.fromarray(_smooth_image(rng)).save(os.path.join(root, "a", "p.PNG"))
  Image.fromarray(_smooth_image(rng)).convert("L").save(
      os.path.join(root, "a", "gray.jpg"))
  Image.fromarray(_smooth_image(rng)).convert("CMYK").save(
      os.path.join(root, "b", "cmyk.jpeg"))
  with open(os.path.join(root, "b", "corrupt.jpg"), "wb") as f:
    f.write(rng.integers(0, 256, 500).astype(np.uint8).tobytes())
  with open(os.path.join(root, "c", "notes.txt"), "w") as f:
    f.write("not an image")
  return root


def _batches(iterator, n):
  return [next(iterator) for _ in range(n)]


def _train_iter(folder, process_index=0, process_count=1, seed=0, batch=4):
  paths, labels, _ = image_folder.list_image_folder(folder, "train", 0.25, 0)
  return image_folder.ImageFolderTrainIterator(
      paths, labels, batch, image_size=24, seed=seed,
      process_index=process_index, process_count=process_count)


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


def test_train_batches_shapes_and_determinism(folder):
  iterator = _train_iter(folder)
  assert iterator.steps_per_epoch == iterator.num_examples // 4
  first = _batches(iterator, 4)  # crosses into epoch 1
  for batch in first:
    assert batch["images"].shape == (4, 24, 24, 3)
    assert batch["images"].dtype == np.float32
    assert batch["labels"].dtype == np.int32
    assert np.all(np.isfinite(batch["images"]))
    assert np.all((batch["labels"] >= 0) & (batch["labels"] < 3))
  again = _batches(_train_iter(folder), 4)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
  other = next(_train_iter(folder, seed=1))
  assert not np.array_equal(other["images"], first[0]["images"])


def test_process_slices_concatenate_to_the_global_batch(folder):
  whole = _batches(_train_iter(folder), 3)
  parts = [_batches(_train_iter(folder, p, 2), 3) for p in range(2)]
  for k in range(3):
    np.testing.assert_allclose(
        np.concatenate([parts[0][k]["images"], parts[1][k]["images"]]),
        whole[k]["images"], atol=1e-5)
    np.testing.assert_array_equal(
        np.concatenate([parts[0][k]["labels"], parts[1][k]["labels"]]),
        whole[k]["labels"])


def test_resume_from_state_matches_uninterrupted(folder):
  iterator = _train_iter(folder)
  _batches(iterator, 3)
  state = iterator.get_state()
  expected = _batches(iterator, 3)
  resumed = _train_iter(folder)
  resumed.set_state(state)
  for a, b in zip(_batches(resumed, 3), expected):
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["labels"], b["labels"])


def test_truncated_jpeg_decodes_instead_of_failing(tmp_path):
  path = str(tmp_path / "t.jpg")
  rng = np.random.default_rng(1)
  Image.fromarray(_smooth_image(rng)).save(path)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  batch, = image_folder.eval_pass([path], np.zeros(1, np.int32), 1,
                                  image_size=16)
  assert np.all(np.isfinite(batch["images"])) and batch["mask"][0] == 1


def _eval_all(paths, labels, process_count, global_batch=6, size=32):
  per_process = [list(image_folder.eval_pass(
      paths, labels, global_batch, image_size=size, process_index=p,
      process_count=process_count)) for p in range(process_count)]
  # Interleave the slices back into global batches, keep the real examples.
  images, out_labels = [], []
  for step in zip(*per_process):
    for part in step:
      real = part["mask"] == 1
      assert np.all(part["images"][~real] == 0)
      images.append(part["images"][real])
      out_labels.append(part["labels"][real])
  return np.concatenate(images), np.concatenate(out_labels)


def test_eval_pass_covers_each_example_once_and_matches_pil(folder):
  # Every readable file: all decoders (JPEG, PNG, grayscale, CMYK) compared.
  paths, labels, _ = image_folder.list_image_folder(folder, "train", 0.0, 0)
  assert len(paths) == NUM_READABLE
  one, one_labels = _eval_all(paths, labels, 1)
  three, three_labels = _eval_all(paths, labels, 3)
  np.testing.assert_array_equal(one_labels, labels)
  np.testing.assert_array_equal(three_labels, labels)
  np.testing.assert_array_equal(one, three)
  reference = np.stack([transforms.resize_crop_32(transforms.load_rgb(p), 32)
                        for p in paths])
  diff = np.abs(one - reference)
  # Normalised units: one grey level is 1 / (std * 255), 0.0171-0.0175.
  # JPEGs decode bit-identically to PIL; the bicubic resizes differ only in
  # rounding. Measured (TF 2.21, Pillow): mean 0.0033, max exactly one grey
  # level (0.0175), on 19% of the values.
  assert diff.mean() < 0.01, diff.mean()
  assert diff.max() < 0.018, diff.max()


def test_trainer_end_to_end_on_an_image_folder(folder, tmp_path):
  from configs import digits  # pylint: disable=g-import-not-at-top
  from nfnets import trainer  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  config.dataset.update(dict(name="image_folder", data_dir=folder,
                             num_classes=3, image_size=32, eval_image_size=32,
                             val_fraction=0.25))
  config.batch_size = 8
  config.eval_batch_size = 8
  config.num_steps = 2
  config.checkpoint.async_save = False
  results = trainer.train_and_evaluate(config, str(tmp_path), "train_eval")
  num_val = len(image_folder.list_image_folder(folder, "val", 0.25, 0)[0])
  assert results["eval_examples"] == num_val
  assert np.isfinite(results["eval_loss"])


def test_image_folder_config_needs_a_data_dir():
  from configs import digits  # pylint: disable=g-import-not-at-top
  from nfnets import experiment  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  config.dataset.name = "image_folder"
  with pytest.raises(ValueError,
                     match="dataset.data_dir is required for image_folder"):
    experiment.validate(config)


def test_trainer_and_digits_data_do_not_import_tensorflow():
  code = ("import sys; import nfnets.trainer, nfnets.data, nfnets.models; "
          "assert 'tensorflow' not in sys.modules, 'TF imported'")
  subprocess.run([sys.executable, "-c", code], check=True,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
