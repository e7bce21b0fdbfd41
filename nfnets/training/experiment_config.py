"""Experiment configs: the shared defaults, `arg` parsing and validation.

Each file in `configs/` builds on `base_config()` and overrides what its
family needs; `validate` runs before any compute so that a bad value is one
clear error, not a traceback from deep inside JAX. `model_config` gives
`config.model` every option of its model, so that each can be set with
`--config.model.kwargs.<option>=...` (config_flags takes only keys that
exist).
"""

import difflib
from typing import Any

import jax
import ml_collections

from nfnets import models
from nfnets.data import transforms
from nfnets.data.tfds import builders as tfds_builders
from nfnets.training import optim

# Besides these, `dataset.name` may be any TFDS image classification dataset.
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
      try:
        parsed[key] = type(default)(value)
      except ValueError:
        raise ValueError(f"config arg {key} must be of type "
                         f"{type(default).__name__}, got {value}") from None
  return parsed


def model_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
  """`config.model` for the named model: every option, with `overrides`.

  `kwargs` holds each of `models.model_options(name)`: a command line can
  override only keys that exist, with values of their type. Options whose
  default is None (the model's own choice, e.g. NFNet's per-variant
  `dropout_rate`) are typed placeholders, so that `--config.model.kwargs.
  dropout_rate=0.1` or `...depths='(1, 1, 1, 1)'` still parse; options that
  take a name or a function (`activation`) take a name.

  Args:
    name: a registered model name, e.g. `nfnet_f0`.
    **overrides: values for some of the options.

  Returns:
    ConfigDict(name=name, kwargs=ConfigDict(option=value, ...)).

  Raises:
    ValueError: for an unknown model or an option it does not take.
  """
  defaults = models.model_options(name)
  for key in overrides:
    if key not in defaults:
      raise ValueError(f"unknown option {key!r} for model {name!r}; valid: "
                       f"{', '.join(defaults)}")
  kinds = models.option_types(name)
  kwargs = {}
  for key, default in defaults.items():
    value, kind = overrides.get(key, default), kinds[key]
    if value is None:
      value = ml_collections.config_dict.placeholder(kind)
    elif kind is float and isinstance(value, int):
      # Stored as an int, the field would refuse `=0.1` on a command line.
      value = float(value)
    elif kind is tuple and isinstance(value, list):
      value = tuple(value)
    kwargs[key] = value
  return ml_collections.ConfigDict(dict(
      name=name, kwargs=ml_collections.ConfigDict(kwargs)))


def base_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with the NFNet ImageNet recipe's values."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dataset = ml_collections.ConfigDict(dict(
      name="digits", image_size=32, eval_image_size=32, num_classes=10,
      augment_shift=0,  # digits only: random shifts of up to this many px
      # image_folder: the class-per-folder root; TFDS: the data_dir.
      data_dir="",
      # TFDS datasets with manual downloads (imagenet2012): where the
      # ILSVRC2012 tars are, to prepare `data_dir` on first use.
      manual_dir="",
      # image_folder: the share of each class held out for evaluation when
      # the root has no train/ and val/ folders.
      val_fraction=0.1,
      # TFDS splits; "" evaluates on 'validation', else 'test'.
      train_split="train", eval_split="",
      # Training augmentation after the Inception crop and flip (image_folder
      # and TFDS), on the accelerator in the released order: MixUp and CutMix
      # alphas (two crops per example), then RandAugment ops and magnitude.
      randaugment_layers=0, randaugment_magnitude=0.0,
      mixup_alpha=0.0, cutmix_alpha=0.0,
      # With both alphas on: one of MixUp and CutMix per batch instead of
      # half the examples each (the released code's `mixup_or_cutmix`).
      mixup_or_cutmix=False,
      # Evaluation crop and resampling (image_folder and TFDS), as the
      # released code's: `nfnets.data.transforms.EvalPreproc` names the crop
      # ('resize_crop_32', 'resize_crop_0.875', 'crop_resize', ...); the
      # resampling is 'bicubic' (TF's, not antialiased, in float) or
      # 'bicubic_antialias' (PIL's, as in the released Colab demo).
      eval_preproc="resize_crop_32", eval_interpolation="bicubic"))
  c.model = model_config("nfnet_f0")
  c.batch_size = 4096
  # Micro-batches per step: each device's slice of `batch_size` is split in
  # this many parts whose gradients are averaged before one optimizer step
  # (the recipe's batch 4096 on devices that hold less; `steps.py`).
  c.accumulation_steps = 1
  c.eval_batch_size = 1024
  c.num_epochs = 360.0
  c.num_steps = 0  # > 0 overrides num_epochs
  c.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", base_lr=0.1, momentum=0.9, nesterov=True,
      weight_decay=2e-5, agc_clipping=0.01, agc_eps=1e-3, b1=0.9, b2=0.999,
      warmup_epochs=5.0,
      # The peak lr is base_lr * batch_size / 256 unless this is False (the
      # NF-RegNet recipe); the cosine decays to min_lr.
      scale_lr_by_batch=True, min_lr=0.0,
      # Sharpness-aware minimization: radius (0 = off) and whether the ascent
      # step uses the all-device gradient (False: per device, as for F6).
      sam_rho=0.0, sam_sync=True,
      # Fine-tuning (`optim.freeze_labels`): freeze the stem and the first
      # k stages (-1: nothing, 0: the stem), or train only the classifier.
      freeze_stages=-1, linear_probe=False))
  c.label_smoothing = 0.1
  # The released NFNet code warms the decay up ('tf1_ema', see
  # `steps.ema_decay`): with a flat 0.99999 the EMA of a 360-epoch run at
  # batch 4096 (112,320 steps) would still hold 0.99999**112320 = 32% of the
  # random initial weights.
  c.ema = ml_collections.ConfigDict(dict(decay=0.99999, warmup=True))
  c.precision = "bfloat16"
  # The released code evaluates in float32 (it casts to bfloat16 to train).
  c.eval_precision = "float32"
  # The fast paths of `nfnets.ops` (polyphase conv gradient, closed-form WS
  # gradient, recomputed activations, grouped norms, gradient layout); False
  # traces the steps with their plain twins: the same values, for timing
  # and checking them.
  c.fast_paths = True
  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=1000, max_to_keep=3, async_save=True))
  # The loss-spike guard: a step whose loss exceeds `factor` times the loss's
  # running average (an EMA over about `window` steps, checked once it has
  # seen that many) stops the run like a NaN does, with the state from
  # before the spike saved. 0 turns it off (the default, as in the released
  # code); e.g. 3.0 stops at a 3x jump.
  c.loss_spike = ml_collections.ConfigDict(dict(factor=0.0, window=200))
  c.log_every_steps = 100
  c.eval_every_steps = 0  # 0: evaluate at the end only (train_eval mode)
  c.init_from = ""
  c.distributed = False
  return c


def shrink_model(config: ml_collections.ConfigDict) -> None:
  """Shrinks `config.model` in place to a tiny model of the same family.

  NFNets get 1/8 of the widths, groups of 16 channels and one block per
  stage; NF-RegNets 1/2 of the table's widths (2/3 of their own), groups of
  16 channels and one block per stage; NF-ResNets and ResNets (whose depth
  picks the stage lengths) 1/4 of the widths. timm's light NFNets (`nfnet_l0`,
  `eca_nfnet_l*`), whose bottlenecks are a quarter of a block's width where
  an NFNet's are half, get 1/4 of the widths, groups of 16 channels and one
  block per stage: the bottleneck widths and group counts of the tiny NFNet
  (at 1/8 and groups of 8 they learned the digits 1-2% worse).
  """
  # In place: replacing `kwargs` would drop the types of its None
  # placeholders, which command-line overrides applied later need.
  if config.model.name.startswith(("nfnet_l", "eca_nfnet_l")):
    config.model.kwargs.update(dict(width_multiplier=0.25, group_width=16,
                                    depths=(1, 1, 1, 1)))
  elif config.model.name.startswith("nfnet"):
    config.model.kwargs.update(dict(width_multiplier=0.125, group_width=16,
                                    depths=(1, 1, 1, 1)))
  elif config.model.name.startswith("nf_regnet"):
    config.model.kwargs.update(dict(width_multiplier=0.5, group_width=16,
                                    depths=(1, 1, 1, 1)))
  else:
    config.model.kwargs.update(dict(width_multiplier=0.25))


def make_smoke_test(config: ml_collections.ConfigDict,
                    batch_size: int | None = None,
                    augment_shift: int = 0) -> None:
  """Shrinks a config in place to a run of a minute or two on the digits.

  The model keeps its family and options but gets the tiny widths of
  `shrink_model`, one block per stage where the family allows it, and the
  data, length and optimizer settings of `configs/digits.py`: 15 epochs, 1
  of warmup, weight decay 5e-5, base_lr scaled by batch / 256 and, for
  families trained with AGC, clipping 0.04 and a peak lr of 0.1 (batch 64,
  base_lr 0.4, as the digits config). Without AGC that peak diverges: those
  families train at a peak lr of 0.025, by default at batch 16 (as base_lr
  0.1 at batch 64, over four times the steps: batch 32 lifted each family by
  0.5-3% over 64, and 16 by a further 0.3% on average over seeds 0-2, 0-1.2%
  by family). `batch_size` picks another batch at the same peak lr;
  `augment_shift` shifts the training digits at random by up to that many
  pixels (unshifted by default, as the digits config). A config may tune
  its own smoke run further (`configs/nf_regnet.py`, `configs/resnet.py`);
  BENCHMARKS.md has what each reaches.
  """
  config.dataset.update(dict(name="digits", image_size=32, eval_image_size=32,
                             num_classes=10, augment_shift=augment_shift,
                             randaugment_layers=0, mixup_alpha=0.0,
                             cutmix_alpha=0.0))
  shrink_model(config)
  agc = config.optimizer.agc_clipping > 0
  config.batch_size = batch_size or (64 if agc else 16)
  peak_lr = 0.1 if agc else 0.025
  config.eval_batch_size = 360
  config.num_epochs = 15.0
  config.optimizer.update(dict(
      base_lr=peak_lr * 256 / config.batch_size,
      agc_clipping=0.04 if agc else 0.0, weight_decay=5e-5, warmup_epochs=1.0,
      scale_lr_by_batch=True, min_lr=0.0))
  config.precision = "float32"
  config.ema.update(dict(decay=0.99, warmup=True))
  config.checkpoint.every_steps = 10
  config.log_every_steps = 5


def missing_key(config: ml_collections.ConfigDict, path: str) -> str | None:
  """Says that a dotted key is not in `config`, naming the keys that are.

  config_flags reports an override of a key that a locked config lacks as
  the bare key (`KeyError('nope')`), without where it is missing or what
  would have been valid; this is that line.

  Args:
    config: the config as its file builds it.
    path: a dotted key, as after `--config.` on a command line.

  Returns:
    e.g. "unknown key config.model.kwargs.nope; valid keys of
    config.model.kwargs: activation, alpha, ...", or None when `path` is in
    `config` or leaves its ConfigDicts (an index into a tuple).
  """
  node, where = config, "config"
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or "[" in part:
      return None
    if part not in node:
      valid = sorted(node.keys())
      close = difflib.get_close_matches(part, valid, n=1)
      hint = f" (did you mean {close[0]}?)" if close else ""
      return (f"unknown key {where}.{part}{hint}; valid keys of {where}: "
              f"{', '.join(valid)}")
    node, where = node[part], f"{where}.{part}"
  return None


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError with one clear line for the first bad value."""

  def need(ok: bool, message: str) -> None:
    if not ok:
      raise ValueError(message)

  ds = config.dataset
  if ds.name not in DATASETS:
    # Imports TensorFlow, which a TFDS dataset needs anyway.
    tfds_builders.check_name(ds.name)
  if ds.name == "digits":
    need(not (ds.randaugment_layers or ds.mixup_alpha or ds.cutmix_alpha),
         "RandAugment, MixUp and CutMix need an image dataset (image_folder "
         "or TFDS), not digits")
  else:
    need(bool(ds.data_dir), f"dataset.data_dir is required for {ds.name}")
    need(0 <= ds.val_fraction < 1, "dataset.val_fraction must be in [0, 1)")
    need(ds.randaugment_layers >= 0 and ds.randaugment_magnitude >= 0,
         "dataset.randaugment_layers and _magnitude must be >= 0")
    need(ds.mixup_alpha >= 0 and ds.cutmix_alpha >= 0,
         "dataset.mixup_alpha and cutmix_alpha must be >= 0")
    try:
      transforms.parse_eval_preproc(ds.eval_preproc)
    except ValueError as e:
      raise ValueError(f"dataset.eval_preproc: {e}") from None
    need(ds.eval_interpolation in transforms.EVAL_INTERPOLATIONS,
         f"unknown dataset.eval_interpolation {ds.eval_interpolation!r}; "
         f"valid: {', '.join(transforms.EVAL_INTERPOLATIONS)}")
  models.get_constructor(config.model.name)
  try:
    # Before building: a config written for another family (e.g.
    # `--config.model.name=nf_resnet50` on configs/nfnet.py) names the option
    # the model does not take rather than failing inside a trace.
    models.check_options(config.model.name, config.model.kwargs)
  except ValueError as e:
    raise ValueError(f"model.kwargs: {e}") from None
  need(config.batch_size > 0 and config.eval_batch_size > 0,
       "batch_size and eval_batch_size must be positive")
  need(config.num_steps >= 0 and config.num_epochs >= 0,
       "num_steps and num_epochs must be >= 0")
  need(config.num_steps > 0 or config.num_epochs > 0,
       "set num_epochs or num_steps to a positive value")
  need(config.optimizer.name in optim.OPTIMIZERS,
       f"unknown optimizer {config.optimizer.name!r}; valid: "
       f"{', '.join(optim.OPTIMIZERS)}")
  need(config.optimizer.base_lr >= 0, "optimizer.base_lr must be >= 0")
  need(config.optimizer.warmup_epochs >= 0,
       "optimizer.warmup_epochs must be >= 0")
  need(config.optimizer.min_lr >= 0, "optimizer.min_lr must be >= 0")
  need(0 <= config.optimizer.momentum < 1,
       "optimizer.momentum must be in [0, 1)")
  need(0 <= config.optimizer.b1 < 1 and 0 <= config.optimizer.b2 < 1,
       "optimizer.b1 and b2 must be in [0, 1)")
  need(config.optimizer.agc_clipping >= 0,
       "optimizer.agc_clipping must be >= 0 (0 turns AGC off)")
  need(config.optimizer.agc_eps > 0, "optimizer.agc_eps must be > 0")
  need(config.optimizer.weight_decay >= 0, "weight_decay must be >= 0")
  need(config.optimizer.sam_rho >= 0, "optimizer.sam_rho must be >= 0")
  need(config.dataset.num_classes >= 1,
       f"dataset.num_classes must be positive (the classifier's width; "
       f"an image folder's number of class folders), got "
       f"{config.dataset.num_classes}")
  stages = sum(f["name"].startswith("stage") for f in models.feature_info(
      config.model.name, **config.model.kwargs))
  need(-1 <= config.optimizer.freeze_stages <= stages,
       f"optimizer.freeze_stages must be in [-1, {stages}] (-1: none, 0: the "
       f"stem, k: the stem and {config.model.name}'s first k of {stages} "
       f"stages), got {config.optimizer.freeze_stages}")
  need(not (config.optimizer.linear_probe and
            config.optimizer.freeze_stages >= 0),
       "optimizer.linear_probe freezes everything but the classifier; "
       "leave optimizer.freeze_stages at -1 with it")
  need(0 <= config.label_smoothing < 1, "label_smoothing must be in [0, 1)")
  need(0 <= config.ema.decay < 1, "ema.decay must be in [0, 1)")
  for key in ("precision", "eval_precision"):
    need(config[key] in PRECISIONS,
         f"unknown {key} {config[key]!r}; valid: {', '.join(PRECISIONS)}")
  need(config.accumulation_steps >= 1, "accumulation_steps must be >= 1")
  need(config.checkpoint.every_steps > 0 and
       config.checkpoint.max_to_keep > 0,
       "checkpoint.every_steps and checkpoint.max_to_keep must be positive")
  need(config.log_every_steps > 0, "log_every_steps must be positive")
  need(config.loss_spike.factor == 0 or config.loss_spike.factor > 1,
       "loss_spike.factor must be 0 (off) or > 1")
  need(config.loss_spike.window >= 1, "loss_spike.window must be >= 1")
  need(config.eval_every_steps >= 0, "eval_every_steps must be >= 0")
  # Building the model abstractly checks its options (widths, activation,
  # image size) without allocating anything.
  model = models.build_model(config.model.name,
                             num_classes=config.dataset.num_classes,
                             **config.model.kwargs)
  for size in {config.dataset.image_size, config.dataset.eval_image_size}:
    jax.eval_shape(
        lambda x: model.init(jax.random.PRNGKey(0), x, is_training=True),
        jax.ShapeDtypeStruct((1, size, size, 3), "float32"))
