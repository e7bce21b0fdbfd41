"""Tests for the bundled digits dataset and the numpy batch iterators."""

import json

import numpy as np
import pytest

from nfnets.data import arrays
from nfnets.data import digits


def _hashes(images: np.ndarray) -> list[bytes]:
  return [im.tobytes() for im in images]


def _toy(n: int = 50, size: int = 4):
  """Images whose first pixel encodes the example index, for easy tracking."""
  images = np.zeros((n, size, size, 1), np.float32)
  images[:, 0, 0, 0] = np.arange(n)
  labels = np.arange(n, dtype=np.int32) % 10
  return images, labels


def _ids(batch) -> np.ndarray:
  return batch['images'][:, 0, 0, 0].astype(np.int64)


# ----------------------------------------------------------------- digits.


def test_split_sizes_disjoint_and_stratified():
  x_train, y_train = digits.load_digits('train')
  x_test, y_test = digits.load_digits('test')
  assert len(x_train) + len(x_test) == 1797
  assert 330 <= len(x_test) <= 390
  assert not set(_hashes(x_train)) & set(_hashes(x_test))
  assert set(np.unique(y_test)) == set(range(digits.NUM_CLASSES))
  assert set(np.unique(y_train)) == set(range(digits.NUM_CLASSES))
  # Stratified: every class is ~20% test.
  counts_test = np.bincount(y_test, minlength=10)
  counts_all = counts_test + np.bincount(y_train, minlength=10)
  np.testing.assert_allclose(counts_test / counts_all, 0.2, atol=0.02)


def test_shapes_dtypes_and_normalisation():
  for split in digits.SPLITS:
    x, y = digits.load_digits(split)
    assert x.shape == (len(y), 32, 32, 3)
    assert x.dtype == np.float32
    assert y.dtype == np.int32
    assert np.all(np.isfinite(x))
    assert y.min() >= 0 and y.max() < digits.NUM_CLASSES
    # Channels are replicated grey.
    np.testing.assert_array_equal(x[..., 0], x[..., 2])
  x_train, _ = digits.load_digits('train')
  assert abs(float(x_train.mean())) < 1e-3
  assert abs(float(x_train.std()) - 1.0) < 1e-3


def test_deterministic_and_other_sizes():
  x1, y1 = digits.load_digits('test')
  digits._load_all.cache_clear()
  x2, y2 = digits.load_digits('test')
  np.testing.assert_array_equal(x1, x2)
  np.testing.assert_array_equal(y1, y2)
  x16, y16 = digits.load_digits('test', image_size=16)
  assert x16.shape == (len(y1), 16, 16, 3)
  np.testing.assert_array_equal(y16, y1)


def test_bad_split_and_read_only():
  with pytest.raises(ValueError, match='train'):
    digits.load_digits('validation')
  with pytest.raises(ValueError):
    digits.load_digits('train', image_size=0)
  x, _ = digits.load_digits('train')
  with pytest.raises(ValueError):
    x[0, 0, 0, 0] = 1.0


def test_random_shift_moves_content():
  images = np.zeros((64, 9, 9, 3), np.float32)
  images[:, 4, 4, :] = 1.0
  out = digits.random_shift(images, np.random.default_rng(0), max_shift=2)
  assert out.shape == images.shape and out.dtype == images.dtype
  # The dot stays inside the image, so it moves without being lost.
  np.testing.assert_array_equal(out.sum(axis=(1, 2, 3)), 3.0)
  rows, cols = np.nonzero(out[..., 0].reshape(64, 9, 9).max(axis=0))
  assert rows.min() == 2 and rows.max() == 6
  assert cols.min() == 2 and cols.max() == 6
  moved = np.any(out != images, axis=(1, 2, 3))
  assert moved.sum() > 32
  # Zero padding fills what shifts in from outside.
  ones = np.ones((16, 5, 5, 1), np.float32)
  shifted = digits.random_shift(ones, np.random.default_rng(1), max_shift=1)
  assert np.any(shifted == 0.0) and set(np.unique(shifted)) <= {0.0, 1.0}
  same = digits.random_shift(images, np.random.default_rng(0), max_shift=0)
  np.testing.assert_array_equal(same, images)


# ---------------------------------------------------------- TrainIterator.


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_train_iterator_seeds():
  images, labels = _toy()
  a = _take(arrays.TrainIterator(images, labels, 8, seed=1), 4)
  b = _take(arrays.TrainIterator(images, labels, 8, seed=1), 4)
  c = _take(arrays.TrainIterator(images, labels, 8, seed=2), 4)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['images'], y['images'])
    np.testing.assert_array_equal(x['labels'], y['labels'])
  assert any(not np.array_equal(x['images'], z['images'])
             for x, z in zip(a, c))
  assert a[0]['images'].dtype == np.float32
  assert a[0]['labels'].dtype == np.int32
  np.testing.assert_array_equal(a[0]['labels'], _ids(a[0]) % 10)


def test_train_iterator_epoch_covers_distinct_examples():
  images, labels = _toy(50)
  it = arrays.TrainIterator(images, labels, 8, seed=0)
  assert it.steps_per_epoch == 6 and it.num_examples == 50
  epoch = np.concatenate([_ids(b) for b in _take(it, it.steps_per_epoch)])
  assert len(np.unique(epoch)) == 48
  assert it.get_state() == {'epoch': 1, 'batch': 0}
  next_epoch = np.concatenate([_ids(b) for b in _take(it, 6)])
  assert not np.array_equal(epoch, next_epoch)


def test_train_iterator_sharding_matches_single_process():
  images, labels = _toy(50)
  aug = digits.random_shift
  single = arrays.TrainIterator(images, labels, 8, seed=3)
  shards = [
      arrays.TrainIterator(images, labels, 8, seed=3, process_index=p,
                           process_count=2) for p in range(2)
  ]
  # 10 steps cross the epoch boundary at step 6.
  for _ in range(10):
    whole = next(single)
    parts = [next(s) for s in shards]
    assert parts[0]['images'].shape[0] == 4
    np.testing.assert_array_equal(
        np.concatenate([p['images'] for p in parts]), whole['images'])
    np.testing.assert_array_equal(
        np.concatenate([p['labels'] for p in parts]), whole['labels'])
  # With augmentation the shards still draw the same examples.
  single = arrays.TrainIterator(images, labels, 8, seed=3, augment=aug)
  shard = arrays.TrainIterator(images, labels, 8, seed=3, process_index=1,
                               process_count=2, augment=aug)
  np.testing.assert_array_equal(next(single)['labels'][4:],
                                next(shard)['labels'])


def test_train_iterator_resume_with_augment():
  images, _ = digits.load_digits('test', image_size=8)
  labels = np.arange(len(images), dtype=np.int32)
  kwargs = dict(seed=5, augment=digits.random_shift)
  reference = arrays.TrainIterator(images, labels, 64, **kwargs)
  expected = _take(reference, 12)
  first = arrays.TrainIterator(images, labels, 64, **kwargs)
  _take(first, 7)  # Crosses the epoch boundary (5 steps per epoch).
  state = json.loads(json.dumps(first.get_state()))
  resumed = arrays.TrainIterator(images, labels, 64, **kwargs)
  resumed.set_state(state)
  for want, got in zip(expected[7:], _take(resumed, 5)):
    np.testing.assert_array_equal(want['images'], got['images'])
    np.testing.assert_array_equal(want['labels'], got['labels'])


@pytest.mark.parametrize('state', [
    None, {}, {'epoch': 0}, {'epoch': 0, 'batch': 0, 'x': 1},
    {'epoch': -1, 'batch': 0}, {'epoch': 0, 'batch': 6},
    {'epoch': '0', 'batch': 0}, {'epoch': 0, 'batch': 1.0},
    {'epoch': True, 'batch': 0}
])
def test_set_state_rejects_malformed(state):
  images, labels = _toy(50)
  it = arrays.TrainIterator(images, labels, 8, seed=0)
  with pytest.raises(ValueError):
    it.set_state(state)


@pytest.mark.parametrize('batch, count', [(0, 1), (-4, 1), (51, 1), (9, 2),
                                          (8, 3)])
def test_train_iterator_bad_batch_sizes(batch, count):
  images, labels = _toy(50)
  with pytest.raises(ValueError):
    arrays.TrainIterator(images, labels, batch, seed=0, process_count=count)


# ------------------------------------------------------------ eval_batches.


@pytest.mark.parametrize('process_count', [1, 3])
def test_eval_batches_cover_every_example_once(process_count):
  images, labels = _toy(50)
  global_batch = 12
  num = arrays.num_eval_batches(50, global_batch)
  assert num == 5
  seen, padding = [], 0
  for p in range(process_count):
    batches = list(arrays.eval_batches(images, labels, global_batch,
                                       process_index=p,
                                       process_count=process_count))
    assert len(batches) == num
    for b in batches:
      assert b['images'].shape == (global_batch // process_count, 4, 4, 1)
      assert b['mask'].dtype == np.float32
      real = b['mask'] == 1
      assert np.all((b['mask'] == 0) | real)
      seen.extend(_ids(b)[real])
      np.testing.assert_array_equal(b['labels'][real], _ids(b)[real] % 10)
      padding += int((~real).sum())
      assert np.all(b['images'][~real] == 0)
  assert sorted(seen) == list(range(50))
  assert padding == num * global_batch - 50


def test_eval_batches_validation_is_eager():
  images, labels = _toy(10)
  with pytest.raises(ValueError):
    arrays.eval_batches(images, labels, 5, process_count=2)
  assert arrays.num_eval_batches(0, 4) == 0
  assert arrays.num_eval_batches(8, 4) == 2
