"""Trainer steps: data parallelism, the fast paths, gradient accumulation,
masks, EMA, optimizers.

End to end runs, checkpoints and bad input: test_train_loop.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import models
from nfnets.training import optim
from nfnets.training import parallel
from nfnets.training import steps

from jaxpr_helpers import find_eqns  # pylint: disable=g-bad-import-order
import train_helpers  # pylint: disable=g-bad-import-order
from train_helpers import batch  # pylint: disable=g-bad-import-order
from train_helpers import setup  # pylint: disable=g-bad-import-order
from train_helpers import tiny_config  # pylint: disable=g-bad-import-order
import configs.nfnet as nfnet_config  # pylint: disable=g-bad-import-order


# Compiling the train steps (10-20 s each on CPUs) takes most of this
# module's time, so it compiles few: the fast-path, accumulation and EMA
# tests share one plain whole-batch step on 1 device (`plain_whole_batch`);
# with the fast accumulated step and the two SAM steps, four in all, each
# with `train_helpers.fast_compiled`. The 8-device steps start from the 1-device init's
# state (`train_helpers.on_devices`): one init is compiled.


def _fenced(step, state, sharded):
  """How many custom VJPs and layout barriers (the fast paths) the traced
  `step` holds."""
  return len(find_eqns(step, ("custom_vjp_call", "custom_vjp_call_jaxpr",
                              "optimization_barrier"), state, sharded))


@pytest.fixture(scope="module")
def plain_whole_batch():
  """Two steps of `train_helpers.shared_config()` (plain twins) on 1 device.

  Returns:
    A dict: `states`, the host copies of the state before the first step
    and after each of the two (the step donates its input state), `metrics`,
    each step's metrics, and `fenced`, `_fenced` of the traced step.
  """
  mesh = train_helpers.mesh(1)
  state, step = setup(train_helpers.shared_config(), mesh)
  sharded = parallel.shard_batch(batch(), mesh)
  fenced = _fenced(step, state, sharded)
  step = train_helpers.fast_compiled(step, state, sharded)
  states, metrics = [jax.device_get(state)], []
  for _ in range(2):
    state, step_metrics = step(state, sharded)
    states.append(jax.device_get(state))
    metrics.append(jax.device_get(step_metrics))
  return dict(states=states, metrics=metrics, fenced=fenced)


def test_one_and_eight_devices_give_the_same_sam_step():
  """The synchronised ascent step makes 8 devices equal 1 (plain twins).

  Without SAM: test_fast_paths_on_and_off_give_the_same_step (1 vs 8
  devices too).
  """
  config = tiny_config(**{"optimizer.sam_rho": 0.05})
  mesh = train_helpers.mesh(1)
  state, step = setup(config, mesh)
  initial = jax.device_get(state)
  results = []
  for state, step, mesh in ((state, step, mesh),
                            train_helpers.on_devices(config, initial, 8)):
    sharded = parallel.shard_batch(batch(), mesh)
    step = train_helpers.fast_compiled(step, state, sharded)
    for _ in range(2):
      state, metrics = step(state, sharded)
    results.append((jax.device_get(state), jax.device_get(metrics)))
  (one, m1), (eight, m8) = results
  assert len(jax.devices()) == 8
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  for a, b in zip(jax.tree.leaves(one.ema_params),
                  jax.tree.leaves(eight.ema_params)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  assert m1["loss"] == pytest.approx(m8["loss"], rel=1e-5)
  # The update did something (not a vacuous equality).
  moved = [np.abs(a - b).max() for a, b in zip(
      jax.tree.leaves(initial.params), jax.tree.leaves(one.params))]
  assert max(moved) > 1e-4


def test_fast_paths_on_and_off_give_the_same_step(plain_whole_batch):
  """The fast paths with gradient accumulation on 8 devices give the plain
  whole-batch step on 1 device: one comparison for three claims.

  - config.fast_paths=False traces the step with the plain twins of
    nfnets.ops (XLA's conv gradient, autodiff of WS and the activations,
    per-leaf AGC, no layout barrier); True with custom VJPs and barriers.
    Both give the same state to float tolerance. The tiny NFNet has strided
    grouped convs (stages 2-4).
  - 1 device and 8 give the same step: the gradient and the metrics are
    means over the global batch (with SAM: the test above).
  - Micro-batches give the step of the whole batch (`accumulation_steps`):
    32 examples on one device; 2 micro-batches of 2 on each of 8. Stochastic
    depth and dropout are off (the tiny config has none), AGC on, so the
    clip sees the whole batch's gradient. (The accumulated step runs slowly
    on CPUs, ~0.2 s per example: hence 32, not more.)
  """
  config = train_helpers.shared_config(fast_paths=True, accumulation_steps=2)
  assert config.model.kwargs["drop_path_rate"] == 0.0
  assert config.model.kwargs["dropout_rate"] == 0.0
  assert config.optimizer.agc_clipping > 0
  assert len(jax.devices()) == 8
  initial, whole = plain_whole_batch["states"][0], plain_whole_batch[
      "states"][2]
  whole_metrics = plain_whole_batch["metrics"][1]
  state, step, mesh = train_helpers.on_devices(config, initial, 8)
  sharded = parallel.shard_batch(batch(), mesh)
  # The switch reaches the traced steps: custom VJPs and barriers (the fast
  # paths) or none.
  fenced = _fenced(step, state, sharded)
  assert fenced > 0, fenced
  assert plain_whole_batch["fenced"] == 0, plain_whole_batch["fenced"]
  step = train_helpers.fast_compiled(step, state, sharded)
  for _ in range(2):
    state, metrics = step(state, sharded)
  state, metrics = jax.device_get((state, metrics))
  assert int(state.step) == 2  # optimizer steps, not micro-batches
  for part in ("params", "opt_state", "ema_params"):
    for a, b in zip(jax.tree.leaves(getattr(whole, part)),
                    jax.tree.leaves(getattr(state, part)), strict=True):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=part)
  assert metrics["loss"] == pytest.approx(whole_metrics["loss"], rel=1e-5)
  for key in ("train_accuracy", "grad_norm", "agc_clipped_fraction"):
    assert metrics[key] == pytest.approx(whole_metrics[key], rel=1e-5,
                                         abs=1e-6), key
  # The update did something (not a vacuous equality).
  moved = max(np.abs(a - b).max() for a, b in zip(
      jax.tree.leaves(initial.params), jax.tree.leaves(whole.params)))
  assert moved > 1e-3


def test_masks_and_ema_act_on_the_right_leaves_of_nfnet_f0():
  model = models.build_model("nfnet_f0")
  params, _ = jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x, is_training=True),
      jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  wd = optim.weight_decay_mask(params)
  assert wd["NFNet/~/nf_block_3/~/conv1"]["w"]
  assert wd["NFNet/~/linear"]["w"]
  assert wd["NFNet/~/nf_block/~/squeeze_excite/~/linear"]["w"]
  assert not wd["NFNet/~/nf_block_3/~/conv1"]["gain"]
  assert not wd["NFNet/~/nf_block_3/~/conv1"]["bias"]
  assert not wd["NFNet/~/nf_block_3"]["skip_gain"]
  assert not wd["NFNet/~/linear"]["b"]
  from nfnets import agc  # pylint: disable=g-import-not-at-top
  mask = agc.classifier_mask(params)
  # AGC skips the classifier's weight only (the released `_make_opt`).
  assert not mask["NFNet/~/linear"]["w"] and mask["NFNet/~/linear"]["b"]
  assert mask["NFNet/~/nf_block_2/~/squeeze_excite/~/linear"]["w"]
  assert mask["NFNet/~/stem_conv0"]["gain"]
  assert mask["NFNet/~/nf_block_2"]["skip_gain"]


def test_ema_update_and_decay_follow_the_formula(plain_whole_batch):
  """Each step's EMA is `decay * EMA + (1 - decay) * new params` (decay 0.9,
  no warmup: `plain_whole_batch`); the warmup is `min(decay, (1 + t) /
  (10 + t))`."""
  states, metrics = plain_whole_batch["states"], plain_whole_batch["metrics"]
  # Step 1 starts from EMA = params; at step 2 they differ.
  for before, after, step_metrics in zip(states, states[1:], metrics):
    assert step_metrics["ema_decay"] == pytest.approx(0.9)
    for name in ("NFNet/~/nf_block_1/~/conv1", "NFNet/~/linear"):
      for leaf, ema in after.ema_params[name].items():
        expected = 0.9 * before.ema_params[name][leaf] + 0.1 * after.params[
            name][leaf]
        np.testing.assert_allclose(ema, expected, rtol=1e-6, atol=1e-7)
  # Warmup: min(decay, (1 + t) / (10 + t)).
  config = train_helpers.shared_config(**{"ema.warmup": True})
  assert float(steps.ema_decay(config, jnp.asarray(0))) == pytest.approx(0.1)
  assert float(steps.ema_decay(config, jnp.asarray(10**6))) == pytest.approx(
      0.9)


def test_default_ema_forgets_the_initial_weights_over_the_nfnet_recipe():
  """The released recipe warms the EMA decay up (its default 'tf1_ema')."""
  config = nfnet_config.get_config("variant=F0")
  num_steps = math.ceil(config.num_epochs * 1281167 / config.batch_size)
  decays = lambda: np.broadcast_to(np.asarray(
      steps.ema_decay(config, jnp.arange(num_steps)), np.float64),
      (num_steps,))
  # The weight of the initial parameters in the final EMA: prod of decays.
  assert np.prod(decays()) < 1e-30
  # (1 + t) / (10 + t) is still below 0.99999 at the end, as in that code.
  assert decays()[-1] == pytest.approx(num_steps / (num_steps + 9), rel=1e-6)
  config.ema.warmup = False
  # 0.33:
  assert np.prod(decays()) == pytest.approx(0.99999**num_steps, rel=0.01)


def test_weight_decay_skips_gains_and_biases():
  config = tiny_config()
  config.optimizer.update(dict(weight_decay=0.5, agc_clipping=0.0,
                               momentum=0.0))
  optimizer = optim.make_optimizer(config, lambda _: 1.0)
  params = {"m/~/conv": {"w": jnp.ones((1, 1, 2, 2)), "gain": jnp.ones(2),
                         "bias": jnp.ones(2)}, "m": {"skip_gain": jnp.ones(())}}
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  np.testing.assert_allclose(updates["m/~/conv"]["w"], -0.5)
  for leaf in (updates["m/~/conv"]["gain"], updates["m/~/conv"]["bias"],
               updates["m"]["skip_gain"]):
    np.testing.assert_array_equal(leaf, 0.0)


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_adam_family_with_agc_decays_weights_only(name):
  config = tiny_config()
  config.optimizer.update(dict(name=name, weight_decay=0.5,
                               agc_clipping=0.01))
  optimizer = optim.make_optimizer(config, lambda _: 0.1)
  params = {"NFNet/~/conv": {"w": jnp.ones((1, 1, 2, 2)),
                             "gain": jnp.ones(2)},
            "NFNet/~/linear": {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}}
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, state = jax.jit(optimizer.update)(grads, optimizer.init(params),
                                             params)
  assert float(optim.agc_clipped_fraction(state)) == 0.0
  w_update = np.asarray(updates["NFNet/~/conv"]["w"])
  assert np.all(w_update < 0)  # decoupled decay pulls weights to 0
  np.testing.assert_array_equal(updates["NFNet/~/conv"]["gain"], 0.0)
  np.testing.assert_array_equal(updates["NFNet/~/linear"]["b"], 0.0)
