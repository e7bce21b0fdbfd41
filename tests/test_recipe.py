"""The training recipe against the released code (docs/fidelity.md).

Schedule and step count, evaluation precision, the EMA of the model state
(and old checkpoints without it), gradient accumulation. The optimizer's
three parameter groups: test_recipe_optimizer.py.
"""

import jax
from jax.sharding import Mesh
import numpy as np
import pytest

from nfnets import models
from nfnets.training import checkpoint
from nfnets.training import experiment_config
from nfnets.training import loop
from nfnets.training import optim
from nfnets.training import parallel
from nfnets.training import steps
from nfnets.training import weights_io

from train_helpers import batch  # pylint: disable=g-bad-import-order
from train_helpers import setup  # pylint: disable=g-bad-import-order
from train_helpers import tiny_config  # pylint: disable=g-bad-import-order
import configs.nfnet as nfnet_config  # pylint: disable=g-bad-import-order

IMAGENET_TRAIN = 1281167


def _mesh(count=None):
  return Mesh(np.asarray(jax.devices()[:count]), (parallel.AXIS,))


def _released_warmup_cosine(itr, peak, total, warmup):
  """The released `optim.WarmupCosineDecay` (start 0, min 0), in numpy."""
  warm = peak * (itr / warmup)
  cos = 0.5 * peak * (1 + np.cos(np.pi * (itr - warmup) / (total - warmup)))
  return warm if not warmup < itr else cos


def test_step_count_and_schedule_are_the_released_ones():
  c = nfnet_config.get_config()
  # 1281167 * 360 // 4096; whole batches per epoch would give 112,320.
  total = optim.training_steps(c, IMAGENET_TRAIN)
  assert total == 112_602
  c.num_steps = 50
  assert optim.training_steps(c, IMAGENET_TRAIN) == 50
  c.num_steps = 0
  # 5 epochs of warmup are 1563.88 steps, not rounded.
  warmup = 5 * IMAGENET_TRAIN / 4096
  schedule = optim.learning_rate_schedule(c, total, IMAGENET_TRAIN / 4096)
  for itr in (0, 1, 781, 1563, 1564, 1565, 3000, 56_300, 112_599):
    expected = _released_warmup_cosine(float(itr), 1.6, total, warmup)
    assert float(schedule(itr)) == pytest.approx(expected, rel=1e-5,
                                                 abs=1e-7), itr
  assert float(schedule(0)) == 0.0
  c.optimizer.warmup_epochs = 0.0
  flat = optim.learning_rate_schedule(c, total, IMAGENET_TRAIN / 4096)
  assert float(flat(0)) == pytest.approx(1.6)


def _eval_sums(config, state, mesh):
  model = models.build_model(config.model.name, num_classes=10,
                             **config.model.kwargs)
  data = batch(40)
  data["mask"] = np.ones(40, np.float32)
  step = steps.make_eval_step(model, config, mesh)
  return jax.device_get(step(state, parallel.shard_batch(data, mesh)))


def test_evaluation_runs_in_eval_precision():
  # The released code trains in bfloat16 and evaluates in float32.
  mesh = _mesh()
  trained = tiny_config(precision="bfloat16")
  state, _ = setup(trained, mesh)
  default = _eval_sums(trained, state, mesh)
  as_float32 = _eval_sums(tiny_config(precision="float32"), state, mesh)
  assert trained.eval_precision == "float32"
  assert default == as_float32
  trained.eval_precision = "bfloat16"
  in_bfloat16 = _eval_sums(trained, state, mesh)
  assert in_bfloat16["loss"] != default["loss"]


def _bn_config():
  """A tiny batch-normalised ResNet: a model with a model state."""
  return tiny_config(model=experiment_config.model_config(
      "resnet26", width_multiplier=0.25))


def test_ema_of_the_model_state_and_its_evaluation():
  # The released `_train_fn` averages the model state (batch-norm
  # statistics) as it does the parameters; the EMA evaluation uses it.
  config = _bn_config()
  mesh = _mesh()
  state, step = setup(config, mesh)
  before = jax.device_get(state)
  state, metrics = step(state, parallel.shard_batch(batch(), mesh))
  after = jax.device_get(state)
  decay = float(metrics["ema_decay"])
  assert 0 < decay < 1
  moved = 0
  for path, ema in jax.tree_util.tree_leaves_with_path(after.ema_model_state):
    old = _at(before.ema_model_state, path)
    new = _at(after.model_state, path)
    if np.issubdtype(ema.dtype, np.floating):
      np.testing.assert_allclose(ema, decay * old + (1 - decay) * new,
                                 rtol=1e-6, atol=1e-7)
      moved += int(not np.array_equal(ema, new))
    else:
      np.testing.assert_array_equal(ema, new)
  assert moved  # the EMA state is not just a copy of the state
  # EMA weights equal to the raw ones: only the model state differs.
  state = state._replace(ema_params=state.params)
  sums = _eval_sums(config, state, mesh)
  assert sums["ema_loss"] != sums["loss"]
  same = _eval_sums(config, state._replace(
      ema_model_state=state.model_state), mesh)
  assert same["ema_loss"] == same["loss"] == sums["loss"]


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


@pytest.mark.parametrize("name", ["resnet26", "nfnet_f0"])
def test_a_checkpoint_without_the_added_fields_restores(tmp_path, name):
  # Checkpoints written before the TrainState had `ema_model_state` and
  # `loss_average`: the EMA state starts as the model state, the average
  # empty.
  config = tiny_config() if name == "nfnet_f0" else _bn_config()
  mesh = _mesh()
  state, step = setup(config, mesh)
  state, _ = step(state, parallel.shard_batch(batch(), mesh))
  old = {k: v for k, v in state._asdict().items()
         if k not in checkpoint.ADDED_FIELDS}
  ckpt = checkpoint.Checkpointer(str(tmp_path), 3, async_save=False)
  ckpt.save(1, old, {"epoch": 0, "batch": 1})
  ckpt.wait()
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=x.sharding), state)
  restored, data_state = ckpt.restore_latest(abstract)
  ckpt.close()
  assert isinstance(restored, steps.TrainState)
  assert data_state == {"epoch": 0, "batch": 1}
  for a, b in zip(jax.tree.leaves(restored.params),
                  jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(restored.ema_model_state),
                  jax.tree.leaves(state.model_state), strict=True):
    np.testing.assert_array_equal(a, b)
  assert {k: float(v) for k, v in restored.loss_average.items()} == {
      "sum": 0.0, "weight": 0.0}
  # It trains on (the donated state holds no buffer twice).
  restored, metrics = step(restored, parallel.shard_batch(batch(), mesh))
  assert np.isfinite(float(metrics["loss"]))
  assert int(restored.step) == 2
  assert weights_io.read_params(str(tmp_path))["ema_model_state"].keys() == (
      state.model_state.keys())


def test_accumulated_step_equals_the_whole_batch_step():
  # Stochastic depth and dropout off (the tiny config has none), AGC on:
  # micro-batches give the step of the whole batch, across devices (64
  # examples on one device; 2 micro-batches of 4 on each of 8).
  results = []
  for devices, accumulation in ((1, 1), (8, 2)):
    mesh = _mesh(devices)
    config = tiny_config(batch_size=64, accumulation_steps=accumulation)
    assert config.model.kwargs["drop_path_rate"] == 0.0
    assert config.model.kwargs["dropout_rate"] == 0.0
    assert config.optimizer.agc_clipping > 0
    state, step = setup(config, mesh)
    initial = jax.device_get(state.params)
    for _ in range(2):
      state, metrics = step(state, parallel.shard_batch(batch(64), mesh))
    results.append((jax.device_get(state), jax.device_get(metrics)))
  (whole, m1), *accumulated = results
  for state, metrics in accumulated:
    assert int(state.step) == 2  # optimizer steps, not micro-batches
    for a, b in zip(jax.tree.leaves(whole.params),
                    jax.tree.leaves(state.params), strict=True):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    for key in ("loss", "train_accuracy", "grad_norm",
                "agc_clipped_fraction"):
      assert metrics[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-6), key
  moved = max(np.abs(a - b).max() for a, b in zip(
      jax.tree.leaves(initial), jax.tree.leaves(whole.params)))
  assert moved > 1e-3


def test_accumulation_that_does_not_divide_the_batch_is_an_error(tmp_path):
  config = tiny_config(batch_size=32, accumulation_steps=3)
  with pytest.raises(ValueError, match="4 per device, not divisible into "
                     "accumulation_steps=3"):
    loop.train_and_evaluate(config, str(tmp_path))
  config.accumulation_steps = 0
  with pytest.raises(ValueError, match="accumulation_steps must be >= 1"):
    loop.train_and_evaluate(config, str(tmp_path))


def test_eval_precision_is_checked(tmp_path):
  config = tiny_config(eval_precision="float16")
  with pytest.raises(ValueError, match="unknown eval_precision 'float16'"):
    loop.train_and_evaluate(config, str(tmp_path))
