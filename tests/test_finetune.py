"""Fine-tuning: frozen stages, the linear probe, and configs/finetune.py.

Frozen parameters get no update, decay, AGC or optimizer state, and the
train step computes no gradient for them; the fine-tuning config runs end to
end on a generated image folder from a released-format file of a tiny F0.
Backbone features and headless models: test_backbones.py.
"""

import functools
import tempfile

import jax
from jax.sharding import Mesh
import numpy as np
import pytest

from configs import finetune as finetune_config
from nfnets import models
from nfnets import released_weights
from nfnets.training import experiment_config
from nfnets.training import optim
from nfnets.training import parallel
from nfnets.training import steps
import jaxpr_helpers
import model_helpers
import train_helpers

# The tiny F0 of the digits config: one block a stage, 1/8 of the widths.
TINY_F0 = dict(width_multiplier=0.125, group_width=16, depths=(1, 1, 1, 1))


# ---------------------------------------------------------------- freezing


def _tiny_f0_config(**optimizer):
  c = experiment_config.base_config()
  c.model = experiment_config.model_config("nfnet_f0", **TINY_F0)
  c.dataset.num_classes = 10
  c.optimizer.update(dict(agc_clipping=0.01, weight_decay=0.1, **optimizer))
  return c


@functools.cache
def _tiny_f0_random_params():
  return model_helpers.random_params("nfnet_f0", num_classes=10, **TINY_F0)


def _tiny_f0_params():
  # device_put, not jnp.asarray: that compiles a (staging) program per shape.
  return jax.device_put(_tiny_f0_random_params())


def _frozen(config, params):
  return jax.tree.map(lambda label: label == optim.FROZEN,
                      optim.freeze_labels(config, params))


def _moved(updates):
  # On the host: eager jnp operations would compile a program per shape.
  return jax.tree.map(lambda u: bool(np.any(np.asarray(u) != 0)), updates)


# SGD's weight decay is a chain element, AdamW's (as LAMB's) inside optax's
# own transformation: both paths.
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_frozen_stages_get_no_update_decay_or_agc(name):
  config = _tiny_f0_config(name=name, freeze_stages=1)
  params = _tiny_f0_params()
  frozen = _frozen(config, params)
  groups = models.parameter_groups("nfnet_f0", params, num_classes=10,
                                   **TINY_F0)
  assert jax.tree.leaves(frozen) == [
      g in ("stem", "stage0") for g in jax.tree.leaves(groups)]
  optimizer = optim.make_optimizer(config, lambda _: 0.1)
  # Jitted, with cheaper XLA:CPU settings (and the gradients below made on
  # the host): eager operations would compile a program per shape.
  state = model_helpers.fast_jit(optimizer.init)(params)
  update = model_helpers.fast_jit(optimizer.update)
  # No optimizer state (momentum, Adam moments) for what is frozen.
  unfrozen = jax.eval_shape(optim.make_optimizer(
      _tiny_f0_config(name=name), lambda _: 0.1).init, params)
  assert len(jax.tree.leaves(state)) < len(jax.tree.leaves(unfrozen))
  # Huge gradients: every trained unit is clipped, no frozen one moves.
  huge = jax.tree.map(lambda p: np.full(p.shape, 1e3, np.float32), params)
  updates, new_state = update(huge, state, params)
  assert _moved(updates) == jax.tree.map(lambda f: not f, frozen)
  assert float(optim.agc_clipped_fraction(new_state)) == 1.0
  # Huge gradients on the frozen parameters only: AGC does not count them.
  only_frozen = jax.tree.map(lambda g, f: g if f else np.zeros_like(g),
                             huge, frozen)
  updates, new_state = update(only_frozen, state, params)
  assert float(optim.agc_clipped_fraction(new_state)) == 0.0
  # Zero gradients: weight decay moves the trained kernels, not the frozen.
  zeros = jax.tree.map(lambda p: np.zeros(p.shape, np.float32), params)
  updates, _ = update(zeros, state, params)
  decayed = optim.weight_decay_mask(params)
  assert _moved(updates) == jax.tree.map(
      lambda d, f: d and not f, decayed, frozen)


def test_linear_probe_updates_only_the_head():
  config = _tiny_f0_config(linear_probe=True)
  params = _tiny_f0_params()
  optimizer = optim.make_optimizer(config, lambda _: 0.1)
  grads = jax.tree.map(lambda p: np.ones(p.shape, np.float32), params)
  # One jitted program: eager operations would compile one per shape.
  updates = model_helpers.fast_jit(
      lambda g, p: optimizer.update(g, optimizer.init(p), p)[0])(grads, params)
  moved = {m for m, leaves in _moved(updates).items() if any(leaves.values())}
  assert moved == {"NFNet/~/linear"}


@functools.cache
def _step_convolutions(**optimizer_options):
  """(forward convolutions, convolutions in the train step's jaxpr) of
  `train_helpers.tiny_config` with these optimizer options on one device.

  Traced, not compiled: the state is the init's shapes (`jax.eval_shape`).
  """
  mesh = Mesh(np.asarray(jax.devices()[:1]), (parallel.AXIS,))
  config = train_helpers.tiny_config(**{
      f"optimizer.{k}": v for k, v in optimizer_options.items()})
  model = models.build_model(config.model.name, num_classes=10,
                             **config.model.kwargs)
  schedule = optim.learning_rate_schedule(config, 100, 10)
  optimizer = optim.make_optimizer(config, schedule)
  state = jax.eval_shape(steps.make_init(model, optimizer, (32, 32, 3), mesh),
                         jax.random.PRNGKey(0))
  step = steps.make_train_step(model, optimizer, schedule, config, mesh)
  count = jaxpr_helpers.count_primitive(
      step, "conv_general_dilated", state,
      parallel.shard_batch(train_helpers.batch(8), mesh))
  # One forward convolution per conv module.
  return sum(1 for m in state.params if "conv" in m or "stem" in m), count


@pytest.mark.parametrize("freeze", [dict(freeze_stages=1),
                                    dict(linear_probe=True)])
def test_the_step_computes_no_gradient_for_frozen_stages(freeze):
  # The train step's convolutions: frozen parameters are stop_gradient'ed in
  # the loss, so the backward pass has no weight gradient for a frozen conv
  # and stops before the first trained one. (The unfrozen step's count is
  # traced once for both cases.)
  forward, unfrozen = _step_convolutions()
  _, frozen = _step_convolutions(**freeze)
  if freeze.get("linear_probe"):
    assert frozen == forward  # no backward conv at all
  else:
    assert forward < frozen < unfrozen


@pytest.mark.parametrize("change,match", [
    (dict(freeze_stages=5), r"freeze_stages must be in \[-1, 4\]"),
    (dict(freeze_stages=-2), r"freeze_stages must be in \[-1, 4\]"),
    (dict(freeze_stages=0, linear_probe=True), "leave optimizer.freeze_st"),
])
def test_bad_freeze_options_are_clear_errors(change, match):
  config = _tiny_f0_config(**change)
  with pytest.raises(ValueError, match=match):
    experiment_config.validate(config)


# ------------------------------------------------------- the example config


def test_finetune_config_needs_the_number_of_classes(tmp_path):
  config = finetune_config.get_config()
  config.dataset.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match="dataset.num_classes must be "
                     "positive .*number of class folders"):
    experiment_config.validate(config)


def test_finetune_config_runs_end_to_end(tmp_path, monkeypatch):
  pytest.importorskip("tensorflow")
  from nfnets.training import weights_io  # pylint: disable=g-import-not-at-top
  from nfnets.training import loop  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  config = finetune_config.get_config("smoke=True")
  assert config.dataset.data_dir.startswith(str(tmp_path))
  name, kwargs = config.model.name, config.model.kwargs.to_dict()
  # A released-format file of the tiny F0 (a 1000-class head).
  params = model_helpers.random_params(name, num_classes=1000, **kwargs)
  released = str(tmp_path / "F0_tiny_haiku.npz")
  released_weights.save_released(params, released)
  config.init_from = released
  # The stem and stages 0-2 frozen: equal to the file after training, they
  # show it was loaded (the released-format path, with a head of another
  # width dropped); stage 3, the final conv and the new head train.
  config.optimizer.freeze_stages = 3
  config.fast_paths = False  # the plain twins compile faster on CPUs
  config.checkpoint.async_save = False
  config.num_steps = 3
  results = loop.train_and_evaluate(config, str(tmp_path / "run"), "train")
  assert np.isfinite(results["loss"])
  assert results["eval_examples"] == 3 * 2  # a quarter of 8 per class
  saved = weights_io.read_params(str(tmp_path / "run"))["params"]
  assert saved["NFNet/~/linear"]["w"].shape == (
      models.feature_info(name, **kwargs)[-1]["channels"], 3)
  groups = models.parameter_groups(name, saved, num_classes=3, **kwargs)
  moved = {}
  for module, leaves in saved.items():
    if module == "NFNet/~/linear":
      continue
    for leaf, value in leaves.items():
      group = groups[module][leaf]
      same = np.array_equal(value, np.asarray(params[module][leaf]))
      if group in ("stem", "stage0", "stage1", "stage2"):
        assert same, f"frozen {module}/{leaf} changed"
      moved[group] = moved.get(group, False) or not same
  assert moved == {"stem": False, "stage0": False, "stage1": False,
                   "stage2": False, "stage3": True, "final": True}
  assert np.any(saved["NFNet/~/linear"]["w"] != 0)
