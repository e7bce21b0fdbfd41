"""Experiment configs: the shared defaults, `arg` parsing and validation.

Each file in `configs/` builds on `base_config()` and overrides what its
family needs; `validate` runs before any compute so that a bad value is one
clear error, not a traceback from deep inside JAX.
"""

from typing import Any

import jax
import ml_collections

from nfnets import models
from nfnets import optim

DATASETS = ("digits", "image_folder")
PRECISIONS = ("float32", "bfloat16")
MODES = ("train", "eval", "train_eval")


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `variant=F1,smoke=True` into a ConfigDict over `defaults`.

  Values are converted to the type of their default; keys not in `defaults`
  are an error naming the valid ones.

  Args:
    arg: the text after `:` in `--config=configs/x.py:arg`, or None.
    **defaults: the valid keys and their default values.

  Returns:
    The parsed options.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ValueError(f"bad config arg {item!r}; valid keys: "
                       f"{', '.join(defaults) or 'none'} (as key=value)")
    default = defaults[key]
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config arg {key} must be true or false")
      parsed[key] = value.lower() in ("true", "1")
    else:
      parsed[key] = type(default)(value)
  return parsed


def base_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with the NFNet ImageNet recipe's values."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dataset = ml_collections.ConfigDict(dict(
      name="digits", image_size=32, eval_image_size=32, num_classes=10,
      augment_shift=0,
      # image_folder: the class-per-folder root, and the share of each class
      # held out for evaluation when it has no train/ and val/ folders.
      data_dir="", val_fraction=0.1))
  c.model = ml_collections.ConfigDict(dict(name="nfnet_f0", kwargs={}))
  c.batch_size = 4096
  c.eval_batch_size = 1024
  c.num_epochs = 360.0
  c.num_steps = 0  # > 0 overrides num_epochs
  c.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", base_lr=0.1, momentum=0.9, nesterov=True,
      weight_decay=2e-5, agc_clipping=0.01, agc_eps=1e-3, b1=0.9, b2=0.999,
      warmup_epochs=5.0,
      # Sharpness-aware minimization: radius (0 = off) and whether the ascent
      # step uses the all-device gradient (False: per device, as for F6).
      sam_rho=0.0, sam_sync=True))
  c.label_smoothing = 0.1
  c.ema = ml_collections.ConfigDict(dict(decay=0.99999, warmup=False))
  c.precision = "bfloat16"
  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=1000, max_to_keep=3, async_save=True))
  c.log_every_steps = 100
  c.eval_every_steps = 0  # 0: evaluate at the end only (train_eval mode)
  c.init_from = ""
  c.distributed = False
  return c


def make_smoke_test(config: ml_collections.ConfigDict) -> None:
  """Shrinks a config in place to a one-minute run on the bundled digits.

  The model keeps its family and options but gets 1/8 of the widths (1/4
  for ResNets), one block per stage where the family allows it, and the
  data, batch and length of `configs/digits.py`.
  """
  config.dataset.update(dict(name="digits", image_size=32, eval_image_size=32,
                             num_classes=10, augment_shift=0))
  kwargs = dict(config.model.kwargs)
  if config.model.name.startswith("nfnet"):
    kwargs.update(width_multiplier=0.125, group_width=16,
                  depths=(1, 1, 1, 1))
  else:
    kwargs.update(width_multiplier=0.25)
  config.model.kwargs = kwargs
  config.batch_size = 64
  config.eval_batch_size = 360
  config.num_epochs = 1.0
  config.precision = "float32"
  config.ema.update(dict(decay=0.99, warmup=True))
  config.checkpoint.every_steps = 10
  config.log_every_steps = 5


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError with one clear line for the first bad value."""

  def need(ok: bool, message: str) -> None:
    if not ok:
      raise ValueError(message)

  need(config.dataset.name in DATASETS,
       f"unknown dataset {config.dataset.name!r}; valid: "
       f"{', '.join(DATASETS)}")
  if config.dataset.name == "image_folder":
    need(bool(config.dataset.data_dir),
         "dataset.data_dir is required for image_folder")
    need(0 <= config.dataset.val_fraction < 1,
         "dataset.val_fraction must be in [0, 1)")
  models.get_constructor(config.model.name)
  need(config.batch_size > 0 and config.eval_batch_size > 0,
       "batch_size and eval_batch_size must be positive")
  need(config.num_steps > 0 or config.num_epochs > 0,
       "set num_epochs or num_steps to a positive value")
  need(config.optimizer.name in optim.OPTIMIZERS,
       f"unknown optimizer {config.optimizer.name!r}; valid: "
       f"{', '.join(optim.OPTIMIZERS)}")
  need(config.optimizer.base_lr >= 0, "optimizer.base_lr must be >= 0")
  need(config.optimizer.agc_clipping >= 0,
       "optimizer.agc_clipping must be >= 0 (0 turns AGC off)")
  need(config.optimizer.agc_eps > 0, "optimizer.agc_eps must be > 0")
  need(config.optimizer.weight_decay >= 0, "weight_decay must be >= 0")
  need(config.optimizer.sam_rho >= 0, "optimizer.sam_rho must be >= 0")
  need(0 <= config.label_smoothing < 1, "label_smoothing must be in [0, 1)")
  need(0 <= config.ema.decay < 1, "ema.decay must be in [0, 1)")
  need(config.precision in PRECISIONS,
       f"unknown precision {config.precision!r}; valid: "
       f"{', '.join(PRECISIONS)}")
  need(config.checkpoint.every_steps > 0 and
       config.checkpoint.max_to_keep > 0,
       "checkpoint.every_steps and checkpoint.max_to_keep must be positive")
  need(config.log_every_steps > 0, "log_every_steps must be positive")
  need(config.eval_every_steps >= 0, "eval_every_steps must be >= 0")
  # Building the model abstractly checks its options (widths, activation,
  # image size) without allocating anything.
  model = models.build_model(config.model.name,
                             num_classes=config.dataset.num_classes,
                             **config.model.kwargs)
  for size in (config.dataset.image_size, config.dataset.eval_image_size):
    jax.eval_shape(
        lambda x: model.init(jax.random.PRNGKey(0), x, is_training=True),
        jax.ShapeDtypeStruct((1, size, size, 3), "float32"))
