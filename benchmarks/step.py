"""The step the benchmark scripts measure: the trainer's, on synthetic data.

`benchmarks/benchmark.py` times it on a device; `benchmarks/kernel_census.py`
counts the kernels XLA compiles it into. Both build it here from the model
family's experiment config, so they measure the same thing.
"""

from typing import Any

import numpy as np

from configs import nf_resnet as nf_resnet_config
from configs import nfnet as nfnet_config
from configs import resnet as resnet_config
from nfnets import models
from nfnets.training import experiment_config
from nfnets.training import optim
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
                     remat: bool = False, fast_paths: bool = True):
  """The config whose step is timed: the family's recipe on synthetic data.

  Returns:
    (config, soft_labels): soft_labels is whether the recipe mixes images
    (MixUp/CutMix), so that the step gets soft labels as in training.

  Raises:
    ValueError: for an unknown model family or an invalid config.
  """
  config = config_for(model_name)
  config.batch_size = config.eval_batch_size = batch_size
  # Synthetic data stands in for the dataset (host-side augmentation is
  # benchmarks/bench_input.py's); `synthetic_batch` makes MixUp/CutMix-style
  # soft labels when the recipe mixes.
  soft_labels = bool(config.dataset.mixup_alpha or
                     config.dataset.cutmix_alpha)
  config.dataset.update(dict(name="digits", image_size=image_size,
                             eval_image_size=image_size,
                             randaugment_layers=0, mixup_alpha=0.0,
                             cutmix_alpha=0.0))
  config.precision = precision
  config.fast_paths = fast_paths
  if smoke:
    experiment_config.shrink_model(config)
  if remat:
    config.model.kwargs.remat = True
  experiment_config.validate(config)
  return config, soft_labels


def make_step(config, mode: str, mesh):
  """The trainer's jitted train or eval step and its init function."""
  model = models.build_model(config.model.name,
                             num_classes=config.dataset.num_classes,
                             **config.model.kwargs)
  schedule = optim.learning_rate_schedule(config, 10_000, 100)
  optimizer = optim.make_optimizer(config, schedule)
  size = config.dataset.image_size
  init = steps.make_init(model, optimizer, (size, size, 3), mesh)
  if mode == "train":
    return steps.make_train_step(model, optimizer, schedule, config,
                                 mesh), init
  return steps.make_eval_step(model, config, mesh), init


def batch_shapes(config, mode: str,
                 soft_labels: bool) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Name -> (shape, dtype) of the batch the step takes."""
  n, size = config.batch_size, config.dataset.image_size
  shapes = {"images": ((n, size, size, 3), np.float32)}
  if mode == "train" and soft_labels:
    shapes["labels"] = ((n, config.dataset.num_classes), np.float32)
  else:
    shapes["labels"] = ((n,), np.int32)
  if mode == "eval":
    shapes["mask"] = ((n,), np.float32)
  return shapes


def synthetic_batch(config, mode: str,
                    soft_labels: bool) -> dict[str, np.ndarray]:
  """Random images and labels; soft labels mix two classes per example."""
  rng = np.random.default_rng(0)
  n, num_classes = config.batch_size, config.dataset.num_classes
  batch = {}
  for name, (shape, dtype) in batch_shapes(config, mode, soft_labels).items():
    if name == "images":
      batch[name] = rng.standard_normal(shape, dtype)
    elif name == "mask":
      batch[name] = np.ones(shape, dtype)
    elif len(shape) == 1:
      batch[name] = rng.integers(0, num_classes, n, dtype)
    else:  # As MixUp/CutMix make them: two classes per example.
      labels = rng.integers(0, num_classes, n)
      lam = rng.uniform(size=(n, 1)).astype(dtype)
      eye = np.eye(num_classes, dtype=dtype)
      batch[name] = lam * eye[labels] + (1 - lam) * eye[np.roll(labels, 1)]
  return batch
