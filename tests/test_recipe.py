"""The training recipe against the released code (docs/fidelity.md).

Schedule and step count, evaluation precision, the EMA of the model state
(and old checkpoints without it), invalid gradient accumulation settings.
The optimizer's three parameter groups: test_recipe_optimizer.py. An
accumulated step against the whole batch's: test_train.py's
test_fast_paths_on_and_off_give_the_same_step.
"""

import jax
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

from train_helpers import fast_compiled  # pylint: disable=g-bad-import-order
from train_helpers import mesh as _mesh  # pylint: disable=g-bad-import-order
from train_helpers import shared_config  # pylint: disable=g-bad-import-order
from train_helpers import batch  # pylint: disable=g-bad-import-order
from train_helpers import setup  # pylint: disable=g-bad-import-order
from train_helpers import tiny_config  # pylint: disable=g-bad-import-order
import configs.nfnet as nfnet_config  # pylint: disable=g-bad-import-order

IMAGENET_TRAIN = 1281167


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
  sharded = parallel.shard_batch(data, mesh)
  return jax.device_get(fast_compiled(step, state, sharded)(state, sharded))


def _bn_config(**overrides):
  """A tiny batch-normalised ResNet: a model with a model state."""
  return tiny_config(model=experiment_config.model_config(
      "resnet26", width_multiplier=0.25), **overrides)


@pytest.fixture(scope="module")
def bn_step():
  """One step of `_bn_config()` on 8 devices, for the evaluation, EMA and
  checkpoint tests: one compiled train step for the three (and one float32
  eval step for the first two).

  Returns:
    A dict: `mesh`, `step`, `batch` (sharded), `before` (a host copy of the
    initial state, which the step donates), `state` (after the step, on the
    devices) and `metrics`.
  """
  mesh = _mesh()
  state, step = setup(_bn_config(), mesh)
  sharded = parallel.shard_batch(batch(), mesh)
  step = fast_compiled(step, state, sharded)
  before = jax.device_get(state)
  state, metrics = step(state, sharded)
  return dict(mesh=mesh, step=step, batch=sharded, before=before,
              state=state, metrics=jax.device_get(metrics))


def test_evaluation_runs_in_eval_precision(bn_step):
  """The released code trains in bfloat16 and evaluates in float32."""
  state, mesh = bn_step["state"], bn_step["mesh"]
  trained = _bn_config(precision="bfloat16")
  # (The same eval program as the EMA test's, which uses `_bn_config()`.)
  default = _eval_sums(trained, state, mesh)
  as_float32 = _eval_sums(_bn_config(precision="float32"), state, mesh)
  assert trained.eval_precision == "float32"
  assert default == as_float32
  trained.eval_precision = "bfloat16"
  in_bfloat16 = _eval_sums(trained, state, mesh)
  assert in_bfloat16["loss"] != default["loss"]


def test_ema_of_the_model_state_and_its_evaluation(bn_step):
  """The released `_train_fn` averages the model state (batch-norm
  statistics) as it does the parameters; the EMA evaluation uses it."""
  mesh, state = bn_step["mesh"], bn_step["state"]
  before, after = bn_step["before"], jax.device_get(state)
  decay = float(bn_step["metrics"]["ema_decay"])
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
  sums = _eval_sums(_bn_config(), state, mesh)
  assert sums["ema_loss"] != sums["loss"]
  same = _eval_sums(_bn_config(), state._replace(
      ema_model_state=state.model_state), mesh)
  assert same["ema_loss"] == same["loss"] == sums["loss"]


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def _trained_nfnet():
  """The tiny NFNet (no model state) after one step, as `bn_step` gives it.

  On 1 device with `train_helpers.shared_config`: the program of
  its `plain_whole_batch`, compiled once (the persistent cache).
  """
  mesh = _mesh(1)
  state, step = setup(shared_config(), mesh)
  sharded = parallel.shard_batch(batch(), mesh)
  step = fast_compiled(step, state, sharded)
  state, _ = step(state, sharded)
  return dict(mesh=mesh, step=step, batch=sharded, state=state)


@pytest.mark.parametrize("name", ["resnet26", "nfnet_f0"])
def test_a_checkpoint_without_the_added_fields_restores(tmp_path, request,
                                                        name):
  """Checkpoints written before the TrainState had `ema_model_state` and
  `loss_average`: the EMA state starts as the model state (a BN-ResNet's,
  and NFNet's empty one), the average empty."""
  trained = (request.getfixturevalue("bn_step") if name == "resnet26"
             else _trained_nfnet())
  state, step = trained["state"], trained["step"]
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
  restored, metrics = step(restored, trained["batch"])
  assert np.isfinite(float(metrics["loss"]))
  assert int(restored.step) == 2
  assert weights_io.read_params(str(tmp_path))["ema_model_state"].keys() == (
      state.model_state.keys())


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
