"""Trainer steps: data parallelism, the fast paths, masks, EMA, optimizers.

End to end runs, checkpoints and bad input: test_train_loop.py.
"""

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import pytest

from nfnets import models
from nfnets.training import optim
from nfnets.training import parallel
from nfnets.training import steps

from jaxpr_helpers import find_eqns  # pylint: disable=g-bad-import-order
from train_helpers import batch  # pylint: disable=g-bad-import-order
from train_helpers import setup  # pylint: disable=g-bad-import-order
from train_helpers import tiny_config  # pylint: disable=g-bad-import-order
import configs.nfnet as nfnet_config  # pylint: disable=g-bad-import-order


def test_one_and_eight_devices_give_the_same_sam_step():
  # The synchronised ascent step makes 8 devices equal 1 (without SAM:
  # test_fast_paths_on_and_off_give_the_same_step).
  config = tiny_config(**{"optimizer.sam_rho": 0.05})
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = Mesh(np.asarray(devices), (parallel.AXIS,))
    state, step = setup(config, mesh)
    initial = jax.device_get(state.params)
    for _ in range(2):
      state, metrics = step(state, parallel.shard_batch(batch(), mesh))
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
      jax.tree.leaves(initial), jax.tree.leaves(one.params))]
  assert max(moved) > 1e-4


def test_fast_paths_on_and_off_give_the_same_step():
  # config.fast_paths=False traces the step with the plain twins of
  # nfnets.ops (XLA's conv gradient, autodiff of WS and the activations,
  # per-leaf AGC, no layout barrier): the same state to float tolerance. The
  # fast paths on 1 and 8 devices and the plain twins on 1 (the plain twins
  # on 1 vs 8: the SAM and accumulation tests). The tiny NFNet has strided
  # grouped convs (stages 2-4).
  states, losses, initial = {}, {}, {}
  for fast_paths, device_counts in ((True, (1, 8)), (False, (1,))):
    config = tiny_config(fast_paths=fast_paths)
    for count in device_counts:
      devices = jax.devices()[:count]
      mesh = Mesh(np.asarray(devices), (parallel.AXIS,))
      state, step = setup(config, mesh)
      initial[fast_paths, count] = jax.device_get(state.params)
      # The switch reaches the traced step: custom VJPs and barriers (the
      # fast paths) or none.
      sharded = parallel.shard_batch(batch(), mesh)
      fenced = len(find_eqns(step, ("custom_vjp_call", "custom_vjp_call_jaxpr",
                                    "optimization_barrier"), state, sharded))
      assert (fenced > 0) == fast_paths, fenced
      for _ in range(2):
        state, metrics = step(state, sharded)
      states[fast_paths, len(devices)] = jax.device_get(state)
      losses[fast_paths, len(devices)] = float(metrics["loss"])
  reference = states[True, 1]
  for key, state in states.items():
    assert losses[key] == pytest.approx(losses[True, 1], rel=1e-5)
    for part in ("params", "opt_state", "ema_params"):
      for a, b in zip(jax.tree.leaves(getattr(reference, part)),
                      jax.tree.leaves(getattr(state, part))):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6,
                                   err_msg=f"{part}, {key}")
  assert max(np.abs(a - b).max() for a, b in zip(
      jax.tree.leaves(initial[True, 1]),
      jax.tree.leaves(reference.params))) > 1e-4


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


def test_ema_update_and_decay_follow_the_formula():
  config = tiny_config()
  config.ema.update(dict(decay=0.9, warmup=False))
  mesh = Mesh(np.asarray(jax.devices()), (parallel.AXIS,))
  state, step = setup(config, mesh)
  before = jax.device_get(state)
  after, metrics = step(state, parallel.shard_batch(batch(), mesh))
  after = jax.device_get(after)
  assert metrics["ema_decay"] == pytest.approx(0.9)
  for name in ("NFNet/~/nf_block_1/~/conv1", "NFNet/~/linear"):
    for leaf, ema in after.ema_params[name].items():
      expected = 0.9 * before.ema_params[name][leaf] + 0.1 * after.params[
          name][leaf]
      np.testing.assert_allclose(ema, expected, rtol=1e-6, atol=1e-7)
  # Warmup: min(decay, (1 + t) / (10 + t)).
  config.ema.warmup = True
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
