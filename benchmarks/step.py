"""The step the benchmark scripts measure: the trainer's, on synthetic data.

`benchmarks/benchmark.py` times it on a device; `benchmarks/kernel_census.py`
counts the kernels XLA compiles it into. Both build it here from the model
family's experiment config, so they measure the same thing.
"""

from typing import Any

import jax
from jax import lax
from jax.sharding import PartitionSpec as P
import numpy as np

from configs import nf_resnet as nf_resnet_config
from configs import nfnet as nfnet_config
from configs import resnet as resnet_config
from nfnets import data
from nfnets import models
from nfnets.training import experiment_config
from nfnets.training import optim
from nfnets.training import parallel
from nfnets.training import steps


def config_for(model_name: str):
  """The model family's experiment config, pointed at `model_name`."""
  if model_name.startswith("nfnet_f"):
    variant = model_name[len("nfnet_"):].split("_")[0].upper()
    config = nfnet_config.get_config(
        f"variant={variant.replace('PLUS', '+')}")
  elif model_name.startswith("nf_resnet"):
    config = nf_resnet_config.get_config()
  elif model_name.startswith("resnet"):
    config = resnet_config.get_config()
  else:
    raise ValueError(f"no config family for {model_name!r}")
  # The family's option values, less those the name fixes (`standardize` of
  # a `_nows` model).
  options = models.model_options(model_name)
  config.model = experiment_config.model_config(
      model_name, **{k: v for k, v in config.model.kwargs.items()
                     if k in options})
  return config


def benchmark_config(model_name: str, batch_size: int, image_size: int,
                     precision: str = "bfloat16", smoke: bool = False,
                     remat: bool = False, fast_paths: bool = True,
                     augment: bool = True):
  """The config whose step is timed: the family's recipe on synthetic data.

  Returns:
    (config, device_augment): the recipe's on-device augmentation (MixUp,
    CutMix, RandAugment, normalisation; `nfnets.augment.batch`), which the
    timed step runs first on uint8 crops as in training, or None with
    `augment=False` (the step then takes ready float images and int labels).

  Raises:
    ValueError: for an unknown model family or an invalid config.
  """
  config = config_for(model_name)
  config.batch_size = config.eval_batch_size = batch_size
  config.dataset.image_size = config.dataset.eval_image_size = image_size
  # The recipe's device augmentation, built before synthetic data stands
  # in for the dataset (the host's share is benchmarks/bench_input.py's).
  device_augment = data.device_augment(config)
  config.dataset.update(dict(name="digits", randaugment_layers=0,
                             mixup_alpha=0.0, cutmix_alpha=0.0))
  config.precision = precision
  config.fast_paths = fast_paths
  if smoke:
    experiment_config.shrink_model(config)
  if remat:
    config.model.kwargs.remat = True
  experiment_config.validate(config)
  return config, device_augment if augment else None


def make_step(config, mode: str, mesh, device_augment=None):
  """The trainer's jitted train or eval step and its init function.

  `mode='augment'` gives the train step's first part alone: `device_augment`
  on each device's slice, as `steps.make_train_step` runs it.
  """
  model = models.build_model(config.model.name,
                             num_classes=config.dataset.num_classes,
                             **config.model.kwargs)
  schedule = optim.learning_rate_schedule(config, 10_000, 100)
  optimizer = optim.make_optimizer(config, schedule)
  size = config.dataset.image_size
  init = steps.make_init(model, optimizer, (size, size, 3), mesh)
  if mode == "augment":
    if device_augment is None:
      raise ValueError(f"{config.model.name}'s recipe has no on-device "
                       "augmentation to time (or --noaugment was given)")

    def per_device(state, batch):
      examples = batch["images"].shape[0] // device_augment.crops_per_example
      return device_augment(
          batch["images"], batch["labels"],
          jax.random.fold_in(state.rng, state.step),
          lax.axis_index(parallel.AXIS) * examples)

    return jax.jit(jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(), P(parallel.AXIS)),
        out_specs=P(parallel.AXIS), check_vma=False)), init
  if mode == "train":
    return steps.make_train_step(model, optimizer, schedule, config, mesh,
                                 device_augment), init
  return steps.make_eval_step(model, config, mesh), init


def batch_shapes(config, mode: str,
                 device_augment) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Name -> (shape, dtype) of the batch the step takes."""
  n, size = config.batch_size, config.dataset.image_size
  if mode in ("train", "augment") and device_augment is not None:
    crops = n * device_augment.crops_per_example
    return {"images": ((crops, size, size, 3), np.uint8),
            "labels": ((crops,), np.int32)}
  shapes = {"images": ((n, size, size, 3), np.float32),
            "labels": ((n,), np.int32)}
  if mode == "eval":
    shapes["mask"] = ((n,), np.float32)
  return shapes


def synthetic_batch(config, mode: str, device_augment) -> dict[str, np.ndarray]:
  """Random images (uint8 crops for the device augmentation) and labels."""
  rng = np.random.default_rng(0)
  num_classes = config.dataset.num_classes
  batch = {}
  for name, (shape, dtype) in batch_shapes(config, mode,
                                           device_augment).items():
    if name == "images" and dtype == np.uint8:
      batch[name] = rng.integers(0, 256, shape, np.uint8)
    elif name == "images":
      batch[name] = rng.standard_normal(shape, dtype)
    elif name == "mask":
      batch[name] = np.ones(shape, dtype)
    else:
      batch[name] = rng.integers(0, num_classes, shape[0], dtype)
  return batch
