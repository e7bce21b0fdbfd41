"""Input pipelines by dataset name: train iterators and eval passes.

Each train iterator yields this process's slice of every global batch as
numpy dicts `{'images': float32 [b, H, W, 3], 'labels': int32 [b]}` and has
`get_state()` / `set_state()` so that checkpoints can resume it exactly.
Eval passes add a float32 `'mask'` marking real (1) versus padding (0)
examples, so that every example is counted exactly once across processes.
"""

import functools
from typing import Iterator

import jax
import ml_collections

from nfnets.data import arrays
from nfnets.data import digits


def train_iterator(config: ml_collections.ConfigDict) -> arrays.TrainIterator:
  """This process's training iterator for `config.dataset`."""
  ds = config.dataset
  if ds.name == "image_folder":
    # Lazy: only this dataset needs TensorFlow.
    from nfnets.data import image_folder  # pylint: disable=g-import-not-at-top
    return image_folder.train_iterator_from_config(config)
  if ds.name == "digits":
    images, labels = digits.load_digits("train", ds.image_size)
    augment = None
    if ds.augment_shift > 0:
      augment = functools.partial(digits.random_shift,
                                  max_shift=ds.augment_shift)
    return arrays.TrainIterator(
        images, labels, config.batch_size, seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(), augment=augment)
  raise ValueError(f"unknown dataset {ds.name!r}")


def eval_pass(config: ml_collections.ConfigDict) -> Iterator[dict]:
  """One pass over this process's part of the evaluation split."""
  ds = config.dataset
  if ds.name == "image_folder":
    from nfnets.data import image_folder  # pylint: disable=g-import-not-at-top
    return image_folder.eval_pass_from_config(config)
  if ds.name == "digits":
    images, labels = digits.load_digits("test", ds.eval_image_size)
    return arrays.eval_batches(
        images, labels, config.eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count())
  raise ValueError(f"unknown dataset {ds.name!r}")
