"""Optimizer, learning-rate schedule and weight-decay mask from a config.

The NFNet ImageNet recipe (ICML 2021, Sec. 6 and App. C): SGD with Nesterov
momentum 0.9, `lr = base_lr * batch_size / 256`, linear warmup from 0 then
cosine decay to 0, weight decay on weights only, AGC on every layer but the
final classifier. AdamW and LAMB are offered beside SGD.
"""

from typing import Any, Mapping

import jax
import ml_collections
import optax

from nfnets import agc

OPTIMIZERS = ("sgd", "adamw", "lamb")


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           total_steps: int,
                           steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak lr, then cosine decay to 0.

  Args:
    config: the experiment config (`optimizer.base_lr`,
      `optimizer.warmup_epochs`, `batch_size`).
    total_steps: the length of training.
    steps_per_epoch: converts warmup epochs to steps.

  Returns:
    step -> learning rate.
  """
  peak = config.optimizer.base_lr * config.batch_size / 256
  warmup = min(int(round(config.optimizer.warmup_epochs * steps_per_epoch)),
               max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=0.0)


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


def make_optimizer(config: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """Builds AGC (not on the classifier weight) + weight decay + the optimizer.

  Args:
    config: the experiment config; reads `optimizer.*`.
    schedule: the learning-rate schedule.

  Returns:
    The optax transformation. Its first element's state is an
    `agc.AGCState` when AGC is on (`optimizer.agc_clipping > 0`).
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
  return optax.chain(*parts)


def agc_clipped_fraction(opt_state: Any) -> jax.Array | float:
  """The fraction of units AGC clipped at the last step (0 when AGC is off)."""
  for leaf in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, agc.AGCState)):
    if isinstance(leaf, agc.AGCState):
      return leaf.clipped_fraction
  return 0.0
