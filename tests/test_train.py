"""Trainer tests: data parallelism, masks, EMA, checkpoints, bad input."""

import math
import os
import shutil

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import pytest

from nfnets import models
from nfnets.data import digits
from nfnets.training import checkpoint
from nfnets.training import loop
from nfnets.training import optim
from nfnets.training import parallel
from nfnets.training import steps

from jaxpr_helpers import find_eqns  # pylint: disable=g-bad-import-order
import configs.digits as digits_config  # pylint: disable=g-bad-import-order
import configs.nfnet as nfnet_config  # pylint: disable=g-bad-import-order
import configs.resnet as resnet_config  # pylint: disable=g-bad-import-order


def tiny_config(**overrides):
  """The digits config, shortened; overrides as dotted keys."""
  c = digits_config.get_config()
  c.optimizer.warmup_epochs = 0.0
  c.model.kwargs = dict(c.model.kwargs, depths=(1, 1, 1, 1))
  c.batch_size = 32
  c.eval_batch_size = 40
  c.num_steps = 6
  c.checkpoint.every_steps = 3
  c.checkpoint.async_save = False
  c.log_every_steps = 3
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return c


def _setup(config, mesh):
  model = models.build_model(config.model.name, num_classes=10,
                             **config.model.kwargs)
  schedule = optim.learning_rate_schedule(config, 100, 10)
  optimizer = optim.make_optimizer(config, schedule)
  state = steps.make_init(model, optimizer, (32, 32, 3), mesh)(
      jax.random.PRNGKey(0))
  step = steps.make_train_step(model, optimizer, schedule, config, mesh)
  return state, step


def _restore_latest(config, workdir):
  """(state, data_state) of the newest readable checkpoint in `workdir`."""
  mesh = Mesh(np.asarray(jax.devices()), (parallel.AXIS,))
  state, _ = _setup(config, mesh)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=parallel.replicated_sharding(
                                         mesh)), state)
  ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), 3, False)
  try:
    return ckpt.restore_latest(abstract)
  finally:
    ckpt.close()


def _batch(n=32):
  images, labels = digits.load_digits("train")
  return {"images": images[:n], "labels": labels[:n]}


def test_one_and_eight_devices_give_the_same_sam_step():
  # The synchronised ascent step makes 8 devices equal 1 (without SAM:
  # test_fast_paths_on_and_off_give_the_same_step).
  config = tiny_config(**{"optimizer.sam_rho": 0.05})
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = Mesh(np.asarray(devices), (parallel.AXIS,))
    state, step = _setup(config, mesh)
    for _ in range(2):
      state, metrics = step(state, parallel.shard_batch(_batch(), mesh))
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
  fresh, _ = _setup(config, Mesh(np.asarray(jax.devices()[:1]), ("data",)))
  moved = [np.abs(a - b).max() for a, b in zip(
      jax.tree.leaves(fresh.params), jax.tree.leaves(one.params))]
  assert max(moved) > 1e-3


def test_fast_paths_on_and_off_give_the_same_step():
  # config.fast_paths=False traces the step with the plain twins of
  # nfnets.ops (XLA's conv gradient, autodiff of WS and the activations,
  # per-leaf AGC, no layout barrier): the same state to float tolerance, on
  # 1 and 8 devices. The tiny NFNet has strided grouped convs (stages 2-4).
  states, losses = {}, {}
  for fast_paths in (True, False):
    config = tiny_config(fast_paths=fast_paths)
    for devices in (jax.devices()[:1], jax.devices()):
      mesh = Mesh(np.asarray(devices), (parallel.AXIS,))
      state, step = _setup(config, mesh)
      # The switch reaches the traced step: custom VJPs and barriers (the
      # fast paths) or none.
      batch = parallel.shard_batch(_batch(), mesh)
      fenced = sum(len(find_eqns(step, name, state, batch)) for name in (
          "custom_vjp_call", "custom_vjp_call_jaxpr", "optimization_barrier"))
      assert (fenced > 0) == fast_paths, fenced
      for _ in range(2):
        state, metrics = step(state, batch)
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
  fresh, _ = _setup(tiny_config(), Mesh(np.asarray(jax.devices()[:1]),
                                        ("data",)))
  assert max(np.abs(a - b).max() for a, b in zip(
      jax.tree.leaves(fresh.params), jax.tree.leaves(reference.params))) > 1e-3


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
  assert not mask["NFNet/~/linear"]["w"] and not mask["NFNet/~/linear"]["b"]
  assert mask["NFNet/~/nf_block_2/~/squeeze_excite/~/linear"]["w"]
  assert mask["NFNet/~/stem_conv0"]["gain"]
  assert mask["NFNet/~/nf_block_2"]["skip_gain"]


def test_ema_update_and_decay_follow_the_formula():
  config = tiny_config()
  config.ema.update(dict(decay=0.9, warmup=False))
  mesh = Mesh(np.asarray(jax.devices()), (parallel.AXIS,))
  state, step = _setup(config, mesh)
  before = jax.device_get(state)
  after, metrics = step(state, parallel.shard_batch(_batch(), mesh))
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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished tiny run (train_eval) and its results; copy it to change it."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  results = loop.train_and_evaluate(tiny_config(), str(workdir), "train_eval")
  return workdir, results


def _copy_run(trained, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained[0], workdir)
  return workdir


def test_train_eval_end_to_end_writes_metrics_and_checkpoints(trained,
                                                              tmp_path):
  config = tiny_config()
  results = trained[1]
  tmp_path = _copy_run(trained, tmp_path)
  assert 0.0 <= results["eval_ema_top1"] <= 1.0
  assert results["eval_examples"] == 359
  assert sorted(os.listdir(tmp_path / "checkpoints"))[:2] == ["3", "6"]
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert any('"agc_clipped_fraction"' in line for line in lines)
  assert any('"eval_ema_top5"' in line for line in lines)
  # Resuming a finished run trains no further and evaluates the same state.
  again = loop.train_and_evaluate(config, str(tmp_path), "eval")
  assert again["eval_ema_top1"] == results["eval_ema_top1"]


def test_truncated_latest_checkpoint_falls_back_to_previous(trained, tmp_path,
                                                            caplog):
  config = tiny_config()
  tmp_path = _copy_run(trained, tmp_path)
  # Truncate every data file of the newest checkpoint.
  latest = tmp_path / "checkpoints" / "6" / "state"
  truncated = 0
  for root, _, files in os.walk(latest):
    for f in files:
      path = os.path.join(root, f)
      if os.path.getsize(path) > 16:
        with open(path, "r+b") as fh:
          fh.truncate(os.path.getsize(path) // 2)
        truncated += 1
  assert truncated
  with caplog.at_level("WARNING"):
    restored, data_state = _restore_latest(config, tmp_path)
  assert int(restored.step) == 3
  assert data_state == {"epoch": 0, "batch": 3}
  assert "step 6" in caplog.text and "unreadable" in caplog.text
  # Resumed, the run trains step 6 again and replaces the unreadable one.
  loop.train_and_evaluate(config, str(tmp_path), "train")
  caplog.clear()
  with caplog.at_level("WARNING"):
    restored, data_state = _restore_latest(config, tmp_path)
  assert int(restored.step) == 6 and "unreadable" not in caplog.text


def test_a_changed_config_is_an_error_not_a_fresh_start(trained, tmp_path):
  tmp_path = _copy_run(trained, tmp_path)
  folder = tmp_path / "checkpoints"
  before = {p: os.path.getmtime(p) for p in folder.rglob("*")}
  for mode in ("train", "eval"):
    with pytest.raises(ValueError, match=r"checkpoint at step 6 .* holds "
                       r"another model or optimizer .*opt_state"):
      loop.train_and_evaluate(tiny_config(**{"optimizer.name": "adamw"}),
                              str(tmp_path), mode)
  with pytest.raises(ValueError, match=r"final_conv/bias has shape \[384\] "
                     r"in the checkpoint, \[768\] here"):
    loop.train_and_evaluate(
        tiny_config(**{"model.kwargs": dict(tiny_config().model.kwargs,
                                            width_multiplier=0.25)}),
        str(tmp_path), "train")
  assert {p: os.path.getmtime(p) for p in folder.rglob("*")} == before


@pytest.mark.parametrize("overrides,message", [
    ({"batch_size": 36}, "not divisible by the 8 devices"),
    ({"model.name": "nfnet_f9"}, "unknown model 'nfnet_f9'"),
    ({"optimizer.name": "adagrad"}, "unknown optimizer"),
    ({"precision": "float16"}, "unknown precision"),
    ({"dataset.name": "imagenet_1k"}, "unknown dataset 'imagenet_1k'"),
    ({"dataset.name": "mnist"}, "dataset.data_dir is required for mnist"),
    ({"init_from": "/nonexistent/ckpt"}, "does not exist"),
    ({"dataset.image_size": 16}, "smaller than the network's total stride"),
    ({"num_steps": -5}, "num_steps and num_epochs must be >= 0"),
    ({"optimizer.warmup_epochs": -3.0}, "warmup_epochs must be >= 0"),
    ({"optimizer.momentum": 1.5}, r"momentum must be in \[0, 1\)"),
    ({"optimizer.b2": 1.0}, r"b1 and b2 must be in \[0, 1\)"),
])
def test_bad_config_is_a_clear_error_and_writes_nothing(tmp_path, overrides,
                                                        message):
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message):
    loop.train_and_evaluate(tiny_config(**overrides), str(workdir))
  assert not workdir.exists()


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(ValueError, match="cannot create workdir"):
    loop.train_and_evaluate(tiny_config(), str(blocker / "run"))


def test_init_from_wrong_model_names_the_module(trained, tmp_path):
  shutil.copytree(trained[0], tmp_path / "a")
  wider = tiny_config(init_from=str(tmp_path / "a"))
  wider.model.kwargs = dict(wider.model.kwargs, width_multiplier=0.25)
  with pytest.raises(ValueError, match="does not fit the model: module"):
    loop.train_and_evaluate(wider, str(tmp_path / "b"))
  assert not (tmp_path / "b" / "checkpoints").exists() or not os.listdir(
      tmp_path / "b" / "checkpoints")
  # The same model initialises from it and starts at step 0 with its weights.
  same = tiny_config(init_from=str(tmp_path / "a"), num_steps=3)
  results = loop.train_and_evaluate(same, str(tmp_path / "c"), "eval")
  first = loop.train_and_evaluate(tiny_config(), str(tmp_path / "a"),
                                  "eval")
  assert results["eval_top1"] == first["eval_top1"]


def test_init_from_a_batch_norm_run_carries_its_statistics(tmp_path):
  """Evaluating a ResNet run through init_from equals evaluating the run."""
  config = resnet_config.get_config("depth=26,smoke=True")
  config.update(dict(num_steps=4, batch_size=32, eval_batch_size=40,
                     log_every_steps=2))
  config.checkpoint.update(dict(every_steps=2, async_save=False))
  loop.train_and_evaluate(config, str(tmp_path / "a"), "train")
  # The state keeps its types through the step (batch norm's int counter).
  saved = checkpoint.read_params(str(tmp_path / "a"))["model_state"]
  counters = [v for m in saved.values() for k, v in m.items() if k == "counter"]
  assert counters and all(c.dtype == np.int32 for c in counters)
  own = loop.train_and_evaluate(config, str(tmp_path / "a"), "eval")
  config.init_from = str(tmp_path / "a")
  via = loop.train_and_evaluate(config, str(tmp_path / "b"), "eval")
  for key in ("eval_top1", "eval_loss", "eval_ema_top1", "eval_ema_loss"):
    assert via[key] == own[key], key


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_state(
    tmp_path):
  config = tiny_config(num_steps=12)
  config.optimizer.update(dict(base_lr=1e30, agc_clipping=0.0))
  with pytest.raises(loop.NonFiniteLossError,
                     match=r"NaN/inf at step \d+.*last good state"):
    loop.train_and_evaluate(config, str(tmp_path))
  loaded = checkpoint.read_params(str(tmp_path))
  for leaf in jax.tree.leaves(loaded["params"]):
    assert np.all(np.isfinite(leaf))
  # Saved with the data position it was trained to, not the failing step's.
  restored, data_state = _restore_latest(config, tmp_path)
  good = int(restored.step)
  assert good < 12 and data_state == {"epoch": 0, "batch": good}


class _PoisonedIterator:
  """The training iterator with NaN images in its `bad`-th batch (from 1)."""

  def __init__(self, iterator, bad):
    self.iterator, self.bad, self.count = iterator, bad, 0
    self.steps_per_epoch = iterator.steps_per_epoch
    self.get_state, self.set_state = iterator.get_state, iterator.set_state

  def __next__(self):
    batch = dict(next(self.iterator))
    self.count += 1
    if self.count == self.bad:
      batch["images"] = np.full_like(batch["images"], np.nan)
    return batch


def test_a_run_stopped_by_a_nan_batch_resumes_and_finishes(tmp_path,
                                                            monkeypatch):
  make_iterator = loop.data.train_iterator
  monkeypatch.setattr(loop.data, "train_iterator",
                      lambda config: _PoisonedIterator(make_iterator(config),
                                                       bad=5))
  with pytest.raises(loop.NonFiniteLossError, match="NaN/inf at step 4"):
    loop.train_and_evaluate(tiny_config(num_steps=9), str(tmp_path))
  restored, _ = _restore_latest(tiny_config(), tmp_path)
  assert int(restored.step) == 4 and int(restored.nonfinite_step) == -1
  monkeypatch.setattr(loop.data, "train_iterator", make_iterator)
  results = loop.train_and_evaluate(tiny_config(num_steps=9),
                                    str(tmp_path))
  assert "eval_top1" in results and np.isfinite(results["loss"])
  assert int(_restore_latest(tiny_config(), tmp_path)[0].step) == 9


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
