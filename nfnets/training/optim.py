"""Optimizer, learning-rate schedule and weight-decay mask from a config.

The NFNet ImageNet recipe (ICML 2021, Sec. 6 and App. C): SGD with Nesterov
momentum 0.9, `lr = base_lr * batch_size / 256`, linear warmup from 0 then
cosine decay to 0 (the released code's step count and schedule; the
NF-RegNet recipe keeps `lr = base_lr` and decays to `min_lr`), weight decay
on weights only, AGC on all but the final classifier's weight. AdamW and LAMB
are offered beside SGD.

Fine-tuning can freeze the stem and the first k stages
(`optimizer.freeze_stages=k`; -1 freezes nothing, 0 the stem only) or
everything but the classifier (`optimizer.linear_probe=True`): the frozen
parameters go to `optax.set_to_zero` (`optax.multi_transform`), so they get
no update, no AGC, no weight decay and no optimizer state, and the train
step stops their gradients (`stop_frozen_gradients`), so that none is
computed.
"""

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from nfnets import agc
from nfnets import models

OPTIMIZERS = ("sgd", "adamw", "lamb")
TRAINED, FROZEN = "trained", "frozen"


def training_steps(config: ml_collections.ConfigDict,
                   num_examples: int) -> int:
  """The run's length in optimizer steps.

  `num_steps` when set; else `num_examples * num_epochs // batch_size`, as
  the released code counts (`experiment_nfnets.py`: 1281167 * 360 // 4096 =
  112,602 steps for the NFNet recipe, where whole batches per epoch would
  give 312 * 360 = 112,320).

  Args:
    config: the experiment config (`num_steps`, `num_epochs`, `batch_size`).
    num_examples: the size of the training split.

  Returns:
    The number of steps, at least 1.
  """
  if config.num_steps:
    return config.num_steps
  return max(1, int(num_examples * config.num_epochs) // config.batch_size)


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           total_steps: int,
                           steps_per_epoch: float) -> optax.Schedule:
  """Linear warmup from 0 to the peak lr, then cosine decay to `min_lr`.

  The released code's `WarmupCosineDecay`: the peak is `base_lr *
  batch_size / 256`, or `base_lr` with `optimizer.scale_lr_by_batch=False`
  (its `lr_scale_by_bs`); the warmup lasts `warmup_epochs * steps_per_epoch`
  steps, a fraction of a step included (5 epochs of ImageNet at batch 4096
  are 1563.9 steps), and step t <= warmup gets `peak * t / warmup`; after
  it, `min_lr + (peak - min_lr) * (1 + cos(pi * (t - warmup) /
  (total_steps - warmup))) / 2` (its `min_val`, 0 for NFNets).
  A warmup of 0 starts at the peak.

  Args:
    config: the experiment config (`optimizer.base_lr`,
      `optimizer.warmup_epochs`, `optimizer.scale_lr_by_batch`,
      `optimizer.min_lr`, `batch_size`).
    total_steps: the length of training.
    steps_per_epoch: training examples / batch size (not rounded).

  Returns:
    step -> learning rate (float32).
  """
  opt = config.optimizer
  peak = opt.base_lr * (config.batch_size / 256 if opt.scale_lr_by_batch
                        else 1.0)
  warmup = config.optimizer.warmup_epochs * steps_per_epoch
  # (Past total_steps the cosine is never read; the floor keeps it finite.)
  decay_length = max(total_steps - warmup, 1e-6)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    warm = peak * t / warmup if warmup > 0 else jnp.full_like(t, peak)
    cosine = opt.min_lr + 0.5 * (peak - opt.min_lr) * (
        1.0 + jnp.cos(jnp.pi * (t - warmup) / decay_length))
    return jnp.where(t <= warmup, warm, cosine)

  return schedule


def weight_decay_mask(params: Mapping[str, Mapping[str, Any]]) -> Any:
  """True for conv and dense kernels; False for gains, biases, skip_gain, BN.

  Args:
    params: a Haiku params tree `{module: {name: array}}`.

  Returns:
    A tree of bools of the same structure.
  """
  return {module: {name: name == "w" and getattr(value, "ndim", 0) > 1
                   for name, value in leaves.items()}
          for module, leaves in params.items()}


def is_frozen(group: str, freeze_stages: int, linear_probe: bool) -> bool:
  """Whether a parameter group (`models.parameter_groups`) is frozen.

  `freeze_stages=k` freezes `stem` (k >= 0) and `stage0` ... `stage<k-1>`;
  `linear_probe` everything but `head`. `final` (a final conv or BN) and
  `head` train unless `linear_probe`.
  """
  if linear_probe:
    return group != "head"
  if group == "stem":
    return freeze_stages >= 0
  if group.startswith("stage"):
    return int(group[len("stage"):]) < freeze_stages
  return False


def freeze_labels(config: ml_collections.ConfigDict,
                  params: Mapping[str, Mapping[str, Any]]) -> Any:
  """`TRAINED` or `FROZEN` for each parameter, from `config.optimizer`.

  Args:
    config: the experiment config (`model`, `dataset.num_classes`,
      `optimizer.freeze_stages`, `optimizer.linear_probe`).
    params: the model's params tree.

  Returns:
    A tree of labels with the structure of `params`.
  """
  stages = config.optimizer.get("freeze_stages", -1)
  probe = config.optimizer.get("linear_probe", False)
  groups = models.parameter_groups(
      config.model.name, params, num_classes=config.dataset.num_classes,
      **config.model.kwargs)
  return jax.tree.map(
      lambda g: FROZEN if is_frozen(g, stages, probe) else TRAINED, groups)


def stop_frozen_gradients(config: ml_collections.ConfigDict) -> Any:
  """`params -> params` with `lax.stop_gradient` on the frozen ones.

  Applied to the parameters inside the loss, it keeps the backward pass out
  of the frozen stages: their gradients are zeros that XLA does not compute
  (nor average across devices), and nothing upstream of the first trained
  parameter is differentiated. The identity when nothing is frozen.
  """
  if not is_fine_tuning(config):
    return lambda params: params

  def stop(params):
    return jax.tree.map(
        lambda p, label: jax.lax.stop_gradient(p) if label == FROZEN else p,
        params, freeze_labels(config, params))

  return stop


def is_fine_tuning(config: ml_collections.ConfigDict) -> bool:
  """Whether `config.optimizer` freezes any parameters."""
  opt = config.optimizer
  return opt.get("freeze_stages", -1) >= 0 or opt.get("linear_probe", False)


def make_optimizer(config: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """Builds AGC (not on the classifier weight) + weight decay + the optimizer.

  Args:
    config: the experiment config; reads `optimizer.*`.
    schedule: the learning-rate schedule.

  Returns:
    The optax transformation. Its state holds an `agc.AGCState` when AGC
    is on (`optimizer.agc_clipping > 0`), as its first element's state
    unless parameters are frozen (then inside an optax.MultiTransformState).
  """
  opt = config.optimizer
  parts = []
  if opt.agc_clipping > 0:
    parts.append(agc.adaptive_grad_clip(opt.agc_clipping, opt.agc_eps,
                                        mask=agc.classifier_mask))
  if opt.name == "sgd":
    parts += [optax.add_decayed_weights(opt.weight_decay, weight_decay_mask),
              optax.sgd(schedule, momentum=opt.momentum,
                        nesterov=opt.nesterov)]
  elif opt.name == "adamw":
    parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2,
                             weight_decay=opt.weight_decay,
                             mask=weight_decay_mask))
  elif opt.name == "lamb":
    parts.append(optax.lamb(schedule, b1=opt.b1, b2=opt.b2,
                            weight_decay=opt.weight_decay,
                            mask=weight_decay_mask))
  else:
    raise ValueError(f"unknown optimizer {opt.name!r}; valid: "
                     f"{', '.join(OPTIMIZERS)}")
  if not is_fine_tuning(config):
    return optax.chain(*parts)
  return optax.multi_transform(
      {TRAINED: optax.chain(*parts), FROZEN: optax.set_to_zero()},
      functools.partial(freeze_labels, config))


def agc_clipped_fraction(opt_state: Any) -> jax.Array | float:
  """The fraction of units AGC clipped at the last step (0 when AGC is off)."""
  for leaf in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, agc.AGCState)):
    if isinstance(leaf, agc.AGCState):
      return leaf.clipped_fraction
  return 0.0
