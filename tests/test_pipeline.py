"""Tests of the tf.data train and eval pipelines over random-access sources."""

import os

import numpy as np
from PIL import Image
import pytest

pytest.importorskip("tensorflow")

# pylint: disable=g-import-not-at-top,wrong-import-position
import image_helpers
from nfnets.data import image_folder
from nfnets.data import pipeline
from nfnets.data import transforms


class FilesSource:
  """Any list of files as a source, for files outside a class folder."""

  def __init__(self, paths, labels):
    self.paths = list(paths)
    self.labels = np.asarray(labels, np.int32)
    self.num_examples = len(self.paths)

  def read(self, indices):
    contents = []
    for i in indices:
      with open(self.paths[i], "rb") as f:
        contents.append(f.read())
    return contents, self.labels[np.asarray(indices, np.int64)]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  root = image_helpers.write_folder(str(tmp_path_factory.mktemp("folder")))
  return image_folder.ImageFolderSource(root, "train", 0.0)


def _iterator(source, batch=4, seed=0, process_index=0, process_count=1,
              size=24, **augment):
  return pipeline.SourceTrainIterator(
      source, batch, augment=pipeline.TrainAugment(image_size=size, **augment),
      seed=seed, process_index=process_index, process_count=process_count)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_train_batches_shapes_dtype_and_determinism(source):
  iterator = _iterator(source)
  assert iterator.steps_per_epoch == image_helpers.NUM_READABLE // 4
  first = _take(iterator, 6)  # crosses into epoch 1
  for batch in first:
    assert batch["images"].shape == (4, 24, 24, 3)
    assert batch["images"].dtype == np.uint8  # normalised on the device
    assert batch["labels"].dtype == np.int32
  # One epoch holds each label as often as the source, less the dropped tail.
  epoch = np.concatenate([b["labels"] for b in first[:5]])
  counts = np.bincount(epoch, minlength=3)
  expected = np.bincount(source.labels, minlength=3)
  assert np.all(counts <= expected) and counts.sum() == expected.sum() - 1
  again = _take(_iterator(source), 6)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
  other = next(_iterator(source, seed=1))
  assert not np.array_equal(other["images"], first[0]["images"])


def test_two_crops_per_example_when_mixing(source):
  # The released code mixes 2B crops into B examples: the host sends both.
  iterator = _iterator(source, batch=4, crops_per_example=2)
  assert iterator.num_examples == image_helpers.NUM_READABLE
  assert iterator.steps_per_epoch == image_helpers.NUM_READABLE // 8
  batch = next(iterator)
  assert batch["images"].shape == (8, 24, 24, 3)
  assert batch["labels"].shape == (8,)
  with pytest.raises(ValueError, match="batch_size 12 reads 24 images a step"):
    _iterator(source, batch=12, crops_per_example=2)


@pytest.mark.parametrize("crops", [1, 2])
def test_process_slices_concatenate_to_the_global_batch(source, crops):
  whole = _take(_iterator(source, crops_per_example=crops), 3)
  parts = [_take(_iterator(source, process_index=p, process_count=2,
                           crops_per_example=crops), 3) for p in range(2)]
  for k in range(3):
    for key in ("images", "labels"):
      np.testing.assert_array_equal(
          np.concatenate([parts[0][k][key], parts[1][k][key]]),
          whole[k][key])


def test_resume_from_state_matches_uninterrupted(source):
  iterator = _iterator(source, batch=2, crops_per_example=2)
  _take(iterator, 3)
  state = iterator.get_state()
  expected = _take(iterator, 4)  # crosses into epoch 1
  resumed = _iterator(source, batch=2, crops_per_example=2)
  resumed.set_state(state)
  for a, b in zip(_take(resumed, 4), expected):
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["labels"], b["labels"])


def test_failed_crop_sampling_falls_back_to_the_centre_crop(tmp_path):
  # A 10 x 200 image has no crop of aspect 3/4..4/3 and area >= 8%: the
  # sampler returns the whole image, and the released code then takes the
  # centre crop S / (S + 32) of the shorter side, resized bicubically.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  pixels = np.random.default_rng(4).integers(0, 256, (10, 200, 3), np.uint8)
  path = str(tmp_path / "wide.png")
  Image.fromarray(pixels).save(path)
  batch = next(_iterator(FilesSource([path] * 2, [0, 0]), batch=2, size=24))
  side = int(10 * 24 / (24 + 32))  # 4
  left = (200 - side + 1) // 2
  top = (10 - side + 1) // 2
  crop = pixels[top:top + side, left:left + side]
  expected = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(
      crop, [24, 24], method="bicubic")), 0, 255), tf.uint8).numpy()
  for image in batch["images"]:
    assert (np.array_equal(image, expected) or
            np.array_equal(image, expected[:, ::-1]))


def eval_all(source, process_count, preproc="resize_crop_32",
             interpolation="bicubic", global_batch=6, size=32):
  """(images, labels) of an eval pass over `process_count` processes."""
  per_process = [list(pipeline.eval_pass(
      source, global_batch, image_size=size, preproc=preproc,
      interpolation=interpolation, process_index=p,
      process_count=process_count)) for p in range(process_count)]
  # Interleave the slices back into global batches, keep the real examples.
  images, labels = [], []
  for step in zip(*per_process):
    for part in step:
      real = part["mask"] == 1
      assert np.all(part["images"][~real] == 0)
      images.append(part["images"][real])
      labels.append(part["labels"][real])
  return np.concatenate(images), np.concatenate(labels)


def _crop_resize_reference(image: Image.Image, size: int) -> np.ndarray:
  """PIL: centre crop size / (size + 32) of the shorter side, resize."""
  w, h = image.size
  side = int(min(w, h) * size / (size + 32))
  left, top = (w - side + 1) // 2, (h - side + 1) // 2
  crop = image.crop((left, top, left + side, top + side))
  resized = crop.resize((size, size), Image.Resampling.BICUBIC)
  return transforms.normalize(np.asarray(resized, np.float32))


@pytest.mark.parametrize("preproc", ["resize_crop_32", "crop_resize"])
def test_eval_covers_each_example_once_and_matches_pil(source, preproc):
  # Every readable file: all decoders (JPEG, PNG, grayscale, CMYK) compared,
  # with PIL's resampling (the released reference's: test_eval_preproc.py).
  assert source.num_examples == image_helpers.NUM_READABLE
  one, one_labels = eval_all(source, 1, preproc, "bicubic_antialias")
  three, three_labels = eval_all(source, 3, preproc, "bicubic_antialias")
  np.testing.assert_array_equal(one_labels, source.labels)
  np.testing.assert_array_equal(three_labels, source.labels)
  np.testing.assert_array_equal(one, three)
  reference_fn = {"resize_crop_32": transforms.resize_crop_32,
                  "crop_resize": _crop_resize_reference}[preproc]
  reference = np.stack([reference_fn(transforms.load_rgb(p), 32)
                        for p in source.paths])
  diff = np.abs(one - reference)
  # Normalised units: one grey level is 1 / (std * 255), 0.0171-0.0175.
  # JPEGs decode bit-identically to PIL; the bicubic resizes differ only in
  # rounding. Measured (TF 2.21, Pillow 13), squash: mean 0.0033, max
  # exactly one grey level (0.0175), on 19% of the values. crop_resize decodes
  # only the crop, whose colour JPEGs' subsampled chroma is upsampled without
  # the neighbours beyond the crop: the outermost output pixels differ by up
  # to 13 grey levels (mean 0.0041 overall), the interior by at most one.
  assert diff.mean() < 0.01, diff.mean()
  assert diff[:, 1:-1, 1:-1].max() < 0.018, diff[:, 1:-1, 1:-1].max()
  if preproc == "resize_crop_32":
    assert diff.max() < 0.018, diff.max()


def test_truncated_jpeg_decodes_instead_of_failing(tmp_path):
  path = str(tmp_path / "t.jpg")
  Image.fromarray(image_helpers.smooth_image(np.random.default_rng(1))).save(
      path)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  files = FilesSource([path], [0])
  batch, = pipeline.eval_pass(files, 1, image_size=16)
  assert np.all(np.isfinite(batch["images"])) and batch["mask"][0] == 1
  train = next(_iterator(FilesSource([path] * 2, [0, 0]), batch=2))
  assert np.all(np.isfinite(train["images"]))


def test_unknown_eval_preproc_or_interpolation_is_an_error(source):
  with pytest.raises(ValueError, match="unknown eval preproc 'squash'"):
    pipeline.eval_pass(source, 4, image_size=16, preproc="squash")
  with pytest.raises(ValueError, match="unknown eval interpolation 'area'"):
    pipeline.eval_pass(source, 4, image_size=16, interpolation="area")


def test_small_png_gets_cropped_and_resized(tmp_path):
  path = os.path.join(str(tmp_path), "tiny.png")
  Image.fromarray(image_helpers.smooth_image(np.random.default_rng(2), 9, 12)
                  ).save(path)
  batch = next(_iterator(FilesSource([path] * 2, [1, 1]), batch=2, size=40))
  assert batch["images"].shape == (2, 40, 40, 3)
