"""In-memory, resumable, per-host-sharded batch iterators over numpy arrays.

Everything here is host-side numpy so that it is cheap to import and never
touches an accelerator. Batching is defined on *global* batches, and each
process takes a contiguous slice of every global batch, so the data a model
sees does not depend on how many processes share the work.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

AugmentFn = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _check_arrays(images: np.ndarray, labels: np.ndarray) -> None:
  if images.ndim != 4:
    raise ValueError(
        f'images must be [N, H, W, C], got shape {tuple(images.shape)}.')
  if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
    raise ValueError(
        f'labels must be [N] with N={images.shape[0]}, got shape '
        f'{tuple(labels.shape)}.')


def _local_batch_size(global_batch_size: int, process_index: int,
                      process_count: int) -> int:
  """Validates the sharding arguments and returns the per-process batch."""
  if process_count <= 0:
    raise ValueError(f'process_count must be positive, got {process_count}.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index must be in [0, {process_count}), got '
                     f'{process_index}.')
  if global_batch_size <= 0:
    raise ValueError(
        f'global_batch_size must be positive, got {global_batch_size}.')
  if global_batch_size % process_count:
    raise ValueError(
        f'global_batch_size {global_batch_size} is not divisible by '
        f'process_count {process_count}.')
  return global_batch_size // process_count


class EpochSampler:
  """Which examples each process takes at each step; resumable.

  Epoch `e` visits the examples in the order of a permutation drawn from
  `np.random.default_rng([seed, e])`; global batch `k` of that epoch is
  `permutation[k * G:(k + 1) * G]` and the incomplete tail is dropped. Process
  `p` takes the `p`-th contiguous slice of each global batch. The position is
  (epoch, batch); subclasses turn indices into examples.
  """

  def __init__(self, num_examples: int, global_batch_size: int, *, seed: int,
               process_index: int = 0, process_count: int = 1):
    """Starts at epoch 0, batch 0.

    Args:
      num_examples: size of the dataset.
      global_batch_size: examples per step summed over all processes.
      seed: seed for shuffling (and the subclass's augmentation).
      process_index: index of this process in [0, process_count).
      process_count: number of processes sharing each global batch.

    Raises:
      ValueError: if the batch sizes are inconsistent with each other or
        exceed the dataset.
    """
    self._local_batch = _local_batch_size(global_batch_size, process_index,
                                          process_count)
    if global_batch_size > num_examples:
      raise ValueError(
          f'global_batch_size {global_batch_size} exceeds the number of '
          f'examples {num_examples}.')
    self._num_examples = int(num_examples)
    self._global_batch = global_batch_size
    self._seed = int(seed)
    self._process_index = process_index
    self._epoch = 0
    self._batch = 0
    # The permutation is the costly part of a step; recompute once per epoch.
    self._perm_epoch = -1
    self._perm = np.empty((0,), np.int64)

  @property
  def num_examples(self) -> int:
    """Number of examples in the dataset."""
    return self._num_examples

  @property
  def steps_per_epoch(self) -> int:
    """Number of whole global batches per epoch (the tail is dropped)."""
    return self.num_examples // self._global_batch

  @property
  def local_batch_size(self) -> int:
    """Examples per batch yielded by this process."""
    return self._local_batch

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._perm_epoch:
      rng = np.random.default_rng([self._seed, epoch])
      self._perm = rng.permutation(self.num_examples)
      self._perm_epoch = epoch
    return self._perm

  def _first_position(self, batch: int) -> int:
    """Position in the epoch's order of this process's first example."""
    return batch * self._global_batch + self._process_index * self._local_batch

  def _advance(self) -> tuple[int, int]:
    """Returns the current (epoch, batch) and moves to the next one."""
    at = (self._epoch, self._batch)
    self._batch += 1
    if self._batch == self.steps_per_epoch:
      self._epoch += 1
      self._batch = 0
    return at

  def __iter__(self):
    return self

  def get_state(self) -> dict[str, int]:
    """Returns the position of the next batch as JSON-serialisable ints."""
    return {'epoch': int(self._epoch), 'batch': int(self._batch)}

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores a position produced by `get_state`.

    Args:
      state: a dict `{'epoch': int >= 0, 'batch': int in [0, steps_per_epoch)}`.

    Raises:
      ValueError: if `state` is malformed or out of range.
    """
    if not isinstance(state, dict) or set(state) != {'epoch', 'batch'}:
      raise ValueError(
          f"state must be a dict with keys 'epoch' and 'batch', got {state!r}.")
    values = {}
    for key in ('epoch', 'batch'):
      value = state[key]
      # bool is an int subclass but is never a meaningful position.
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f'state[{key!r}] must be an int, got {value!r}.')
      values[key] = int(value)
    if values['epoch'] < 0:
      raise ValueError(f"state['epoch'] must be >= 0, got {values['epoch']}.")
    if not 0 <= values['batch'] < self.steps_per_epoch:
      raise ValueError(f"state['batch'] must be in [0, {self.steps_per_epoch})"
                       f", got {values['batch']}.")
    self._epoch = values['epoch']
    self._batch = values['batch']


class TrainIterator(EpochSampler):
  """Infinite, shuffled, resumable per-process batches of in-memory arrays.

  The order is `EpochSampler`'s. Each call to `next` yields
  `{'images': float32 [B, H, W, C], 'labels': int32 [B]}` with
  `B = global_batch_size // process_count`.
  """

  def __init__(self,
               images: np.ndarray,
               labels: np.ndarray,
               global_batch_size: int,
               *,
               seed: int,
               process_index: int = 0,
               process_count: int = 1,
               augment: AugmentFn | None = None):
    """Initialises the iterator at the start of epoch 0.

    Args:
      images: [N, H, W, C] array of examples; not copied.
      labels: [N] integer labels.
      global_batch_size: examples per step summed over all processes.
      seed: seed for shuffling and augmentation.
      process_index: index of this process in [0, process_count).
      process_count: number of processes sharing each global batch.
      augment: optional `fn(images, rng) -> images` applied to every local
        batch, with a generator seeded by (seed, epoch, batch, process_index).

    Raises:
      ValueError: if the arrays or batch sizes are inconsistent.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    _check_arrays(images, labels)
    super().__init__(images.shape[0], global_batch_size, seed=seed,
                     process_index=process_index, process_count=process_count)
    self._images = images
    self._labels = labels
    self._augment = augment

  def __next__(self) -> dict[str, np.ndarray]:
    epoch, batch = self._advance()
    start = self._first_position(batch)
    idx = self._permutation(epoch)[start:start + self._local_batch]
    images = self._images[idx]
    if self._augment is not None:
      rng = np.random.default_rng(
          [self._seed, epoch, batch, self._process_index])
      images = self._augment(images, rng)
    return {
        'images': np.asarray(images, np.float32),
        'labels': np.asarray(self._labels[idx], np.int32),
    }


def num_eval_batches(n: int, global_batch_size: int) -> int:
  """Number of global batches needed to cover `n` examples, tail padded.

  Args:
    n: number of examples.
    global_batch_size: examples per global batch.

  Returns:
    ceil(n / global_batch_size).
  """
  if global_batch_size <= 0:
    raise ValueError(
        f'global_batch_size must be positive, got {global_batch_size}.')
  if n < 0:
    raise ValueError(f'n must be non-negative, got {n}.')
  return -(-n // global_batch_size)


def eval_batches(images: np.ndarray,
                 labels: np.ndarray,
                 global_batch_size: int,
                 *,
                 process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Returns one ordered pass over the data, every example exactly once.

  The last global batch is zero-padded to full size so every step has the same
  shape (avoiding recompilation); `'mask'` marks real examples with 1.

  Args:
    images: [N, H, W, C] array of examples.
    labels: [N] integer labels.
    global_batch_size: examples per step summed over all processes.
    process_index: index of this process in [0, process_count).
    process_count: number of processes sharing each global batch.

  Returns:
    An iterator of dicts `{'images': float32 [B, H, W, C], 'labels': int32 [B],
    'mask': float32 [B]}` with `B = global_batch_size // process_count`.

  Raises:
    ValueError: if the arrays or batch sizes are inconsistent.
  """
  images = np.asarray(images)
  labels = np.asarray(labels)
  _check_arrays(images, labels)
  local = _local_batch_size(global_batch_size, process_index, process_count)
  # Validation above runs eagerly; only the batching itself is lazy.
  return _eval_batch_generator(images, labels, global_batch_size, local,
                               process_index)


def _eval_batch_generator(
    images: np.ndarray, labels: np.ndarray, global_batch_size: int, local: int,
    process_index: int) -> Iterator[dict[str, np.ndarray]]:
  n = images.shape[0]
  for k in range(num_eval_batches(n, global_batch_size)):
    start = k * global_batch_size + process_index * local
    stop = min(start + local, n)
    real = max(stop - start, 0)
    batch_images = np.zeros((local,) + images.shape[1:], np.float32)
    batch_labels = np.zeros((local,), np.int32)
    mask = np.zeros((local,), np.float32)
    if real:
      batch_images[:real] = images[start:stop]
      batch_labels[:real] = labels[start:stop]
      mask[:real] = 1.0
    yield {'images': batch_images, 'labels': batch_labels, 'mask': mask}
