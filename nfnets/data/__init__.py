"""Input pipelines by dataset name: train iterators and eval passes.

`config.dataset.name` picks the source: 'digits' (bundled, in memory),
'image_folder' (a class-per-folder root) or the name of a TFDS image
classification dataset prepared in `dataset.data_dir` (e.g. 'imagenet2012',
prepared from the ILSVRC2012 tars in `dataset.manual_dir` on first use).

Each train iterator yields this process's slice of every global batch as
numpy dicts `{'images', 'labels'}`: float32 normalised images for the
digits, uint8 crops (two per example when mixing) for image folders and
TFDS, which `device_augment(config)` finishes inside the train step. It
has `get_state()` / `set_state()` so that checkpoints can resume it
exactly. Eval passes add a
float32 `'mask'` marking real (1) versus padding (0) examples, so that every
example is counted exactly once across processes.

TensorFlow is imported only for the image folder and TFDS sources.
"""

import functools
import importlib.util
from typing import Iterator

import jax
import ml_collections

from nfnets.data import arrays
from nfnets.data import digits
from nfnets.training import parallel


def _source(config: ml_collections.ConfigDict, train: bool):
  """The random-access source of the train or eval split."""
  ds = config.dataset
  if importlib.util.find_spec("tensorflow") is None:
    raise ValueError(f"dataset {ds.name!r} needs TensorFlow: pip install -e "
                     "'.[imagenet]'")
  if ds.name == "image_folder":
    split = "train" if train else "val"
  else:
    split = ds.train_split if train else ds.eval_split
  source = _open_source(ds.name, split, ds.data_dir, ds.manual_dir,
                        ds.val_fraction, jax.process_count() == 1)
  # Every process must index the same list, or the permutations diverge.
  parallel.check_same_across_processes(
      source.num_examples, f"the size of {ds.name} {split!r} in "
      f"{ds.data_dir!r} (a partial copy, or files unreadable on some hosts?)")
  if source.num_classes > ds.num_classes:
    raise ValueError(f"{ds.name} in {ds.data_dir!r} has {source.num_classes} "
                     f"classes but dataset.num_classes is {ds.num_classes}")
  return source


@functools.lru_cache(maxsize=4)
def _open_source(name: str, split: str, data_dir: str, manual_dir: str,
                 val_fraction: float, may_prepare: bool):
  """Opens a source once per process: each evaluation reuses the listing."""
  # Lazy: only these sources need TensorFlow.
  if name == "image_folder":
    from nfnets.data import image_folder  # pylint: disable=g-import-not-at-top
    return image_folder.ImageFolderSource(data_dir, split, val_fraction)
  from nfnets.data.tfds import source as tfds_source  # pylint: disable=g-import-not-at-top
  return tfds_source.open_split(name, split, data_dir=data_dir,
                                manual_dir=manual_dir,
                                may_prepare=may_prepare)


def train_iterator(config: ml_collections.ConfigDict) -> arrays.EpochSampler:
  """This process's training iterator for `config.dataset`."""
  ds = config.dataset
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
  from nfnets.data import pipeline  # pylint: disable=g-import-not-at-top
  augment = pipeline.TrainAugment(
      image_size=ds.image_size,
      crops_per_example=device_augment(config).crops_per_example)
  return pipeline.SourceTrainIterator(
      _source(config, train=True), config.batch_size, augment=augment,
      seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())


def device_augment(config: ml_collections.ConfigDict):
  """The train step's on-device augmentation, or None (digits: none).

  Image folders and TFDS datasets send uint8 crops; the step mixes them,
  applies RandAugment and normalises (`nfnets.augment.batch`).
  """
  ds = config.dataset
  if ds.name == "digits":
    return None
  from nfnets.augment import batch  # pylint: disable=g-import-not-at-top
  return batch.DeviceAugment(
      randaugment_layers=ds.randaugment_layers,
      randaugment_magnitude=ds.randaugment_magnitude,
      mixup_alpha=ds.mixup_alpha, cutmix_alpha=ds.cutmix_alpha,
      mixup_or_cutmix=ds.mixup_or_cutmix, num_classes=ds.num_classes)


def eval_pass(config: ml_collections.ConfigDict) -> Iterator[dict]:
  """One pass over this process's part of the evaluation split."""
  ds = config.dataset
  if ds.name == "digits":
    images, labels = digits.load_digits("test", ds.eval_image_size)
    return arrays.eval_batches(
        images, labels, config.eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count())
  from nfnets.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.eval_pass(
      _source(config, train=False), config.eval_batch_size,
      image_size=ds.eval_image_size, preproc=ds.eval_preproc,
      interpolation=ds.eval_interpolation,
      process_index=jax.process_index(), process_count=jax.process_count())
