"""Tests of the tf.data train and eval pipelines over random-access sources."""

import os

import numpy as np
from PIL import Image
import pytest

pytest.importorskip("tensorflow")

# pylint: disable=g-import-not-at-top,wrong-import-position
import image_helpers
from nfnets.data import image_folder
from nfnets.data import mixing
from nfnets.data import pipeline
from nfnets.data import transforms

FULL = dict(randaugment_layers=2, randaugment_magnitude=9.0, mixup_alpha=0.2,
            cutmix_alpha=1.0, num_classes=3)


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


def test_train_batches_shapes_range_and_determinism(source):
  iterator = _iterator(source)
  assert iterator.steps_per_epoch == image_helpers.NUM_READABLE // 4
  first = _take(iterator, 6)  # crosses into epoch 1
  lowest = (0 - np.max(transforms.MEAN_RGB)) / np.min(transforms.STDDEV_RGB)
  highest = (255 - np.min(transforms.MEAN_RGB)) / np.min(transforms.STDDEV_RGB)
  for batch in first:
    assert batch["images"].shape == (4, 24, 24, 3)
    assert batch["images"].dtype == np.float32
    assert batch["labels"].dtype == np.int32
    assert lowest - 1e-4 <= batch["images"].min()
    assert batch["images"].max() <= highest + 1e-4
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


@pytest.mark.parametrize("augment", [{}, FULL], ids=["crop_flip", "full"])
def test_process_slices_concatenate_to_the_global_batch(source, augment):
  whole = _take(_iterator(source, **augment), 3)
  parts = [_take(_iterator(source, process_index=p, process_count=2,
                           **augment), 3) for p in range(2)]
  for k in range(3):
    for key in ("images", "labels"):
      np.testing.assert_allclose(
          np.concatenate([parts[0][k][key], parts[1][k][key]]),
          whole[k][key], atol=1e-5)


def test_resume_from_state_matches_uninterrupted(source):
  iterator = _iterator(source, **FULL)
  _take(iterator, 3)
  state = iterator.get_state()
  expected = _take(iterator, 4)  # crosses into epoch 1
  resumed = _iterator(source, **FULL)
  resumed.set_state(state)
  for a, b in zip(_take(resumed, 4), expected):
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["labels"], b["labels"])


def test_randaugment_changes_pixels_not_labels(source):
  plain = next(_iterator(source))
  augmented = next(_iterator(source, randaugment_layers=2,
                             randaugment_magnitude=9.0))
  np.testing.assert_array_equal(plain["labels"], augmented["labels"])
  assert not np.allclose(plain["images"], augmented["images"])


def test_mixup_and_cutmix_mix_pairs_with_matching_soft_labels(source):
  batch = 8  # 4 pairs per batch; with both on, odd pairs of the epoch CutMix
  plain = _take(_iterator(source, batch=batch, size=32), 4)
  mixed = _take(_iterator(source, batch=batch, size=32, mixup_alpha=0.2,
                          cutmix_alpha=1.0, num_classes=3), 4)
  cut_fractions = []
  for p, m in zip(plain, mixed):
    labels = m["labels"]
    assert labels.shape == (batch, 3) and labels.dtype == np.float32
    np.testing.assert_allclose(labels.sum(-1), 1.0, rtol=1e-6)
    for i in range(0, batch, 2):
      a, b = p["images"][i], p["images"][i + 1]
      ma, mb = m["images"][i], m["images"][i + 1]
      # Both ways: a pair's pixel sum is unchanged.
      np.testing.assert_allclose(ma + mb, a + b, atol=1e-4)
      if (i // 2) % 2:  # CutMix: `a` with a box of `b`, and vice versa
        from_b = np.isclose(ma, b, atol=1e-4) & ~np.isclose(ma, a, atol=1e-4)
        rows, cols = np.nonzero(from_b.any(-1))
        box = np.zeros(a.shape[:2], bool)
        if rows.size:
          box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        np.testing.assert_allclose(np.where(box[..., None], b, a), ma,
                                   atol=1e-4)
        lam = 1.0 - box.mean()
        cut_fractions.append(box.mean())
        atol = 1e-5
      else:  # MixUp: lam * a + (1 - lam) * b everywhere
        lam = np.nanmedian((ma - b) / np.where(np.isclose(a, b), np.nan,
                                               a - b))
        np.testing.assert_allclose(ma, lam * a + (1 - lam) * b, atol=1e-3)
        atol = 1e-3
      ya, yb = p["labels"][i], p["labels"][i + 1]
      np.testing.assert_allclose(
          labels[i], np.bincount([ya, yb], [lam, 1 - lam], 3), atol=atol)
      np.testing.assert_allclose(
          labels[i + 1], np.bincount([ya, yb], [1 - lam, lam], 3), atol=atol)
  # Boxes of varying size were pasted (CutMix lambda ~ U(0, 1), clipped).
  assert len(cut_fractions) == 8 and max(cut_fractions) > 0.1


def test_mixup_lambda_follows_beta():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  n = 4000
  images = tf.constant(np.tile(np.array([1.0, 0.0], np.float32), n // 2)
                       .reshape(n, 1, 1, 1) * np.ones((1, 2, 2, 3), np.float32))
  labels = tf.constant(np.tile([0, 1], n // 2), tf.int32)
  seeds = np.stack([np.zeros(n), np.arange(n) // 2], 1).astype(np.int64)
  out, soft = mixing.mix_pairs(images, labels, tf.constant(seeds),
                               tf.range(n, dtype=tf.int64), mixup_alpha=0.2,
                               cutmix_alpha=0.0, num_classes=2)
  lam = out.numpy()[0::2, 0, 0, 0]
  np.testing.assert_allclose(soft.numpy()[0::2, 0], lam, atol=1e-6)
  # Beta(0.2, 0.2): mean 1/2, variance 1 / (4 * (2 * 0.2 + 1)) = 0.1786.
  assert abs(lam.mean() - 0.5) < 0.03
  assert abs(lam.var() - 0.1786) < 0.015


def test_mixing_needs_an_even_local_batch(source):
  with pytest.raises(ValueError, match="even per-process batch"):
    _iterator(source, batch=6, process_count=2, mixup_alpha=0.2,
              num_classes=3)


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
