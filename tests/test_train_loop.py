"""The training loop end to end: checkpoints, init_from, NaN, bad input.

Each trainer run traces its steps and loads or compiles them, which is most
of this module's time: the tests share two finished runs, the tiny NFNet's
(`trained`) and a batch-normalised ResNet's (`bn_run`), and copy them to
change them; the NaN and loss-spike stops are one guarded run's.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets.training import loop
from nfnets.training import steps
from nfnets.training import weights_io

from train_helpers import change_train_batch  # pylint: disable=g-bad-import-order
from train_helpers import restore_latest  # pylint: disable=g-bad-import-order
from train_helpers import tiny_config  # pylint: disable=g-bad-import-order
import configs.resnet as resnet_config  # pylint: disable=g-bad-import-order


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
  # Resuming a finished run trains no further and evaluates the same state
  # (so `results` are also the eval-mode results of the finished run, which
  # test_init_from_wrong_model_names_the_module compares with).
  again = loop.train_and_evaluate(config, str(tmp_path), "eval")
  for key in ("eval_top1", "eval_ema_top1"):
    assert again[key] == results[key], key


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
    restored, data_state = restore_latest(config, tmp_path)
  assert int(restored.step) == 3
  assert data_state == {"epoch": 0, "batch": 3}
  assert "step 6" in caplog.text and "unreadable" in caplog.text
  # Resumed, the run trains step 6 again and replaces the unreadable one.
  loop.train_and_evaluate(config, str(tmp_path), "train")
  caplog.clear()
  with caplog.at_level("WARNING"):
    restored, data_state = restore_latest(config, tmp_path)
  assert int(restored.step) == 6 and "unreadable" not in caplog.text


def test_eval_verifies_checksums_and_falls_back(trained, tmp_path, caplog):
  tmp_path = _copy_run(trained, tmp_path)
  newest = tmp_path / "checkpoints" / "6" / "state" / "ocdbt.process_0" / "d"
  data_file = max(newest.iterdir(), key=os.path.getsize)
  with open(data_file, "r+b") as f:
    f.seek(os.path.getsize(data_file) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 1]))
  with caplog.at_level("WARNING"):
    results = loop.train_and_evaluate(tiny_config(), str(tmp_path), "eval")
  assert f"{data_file.name} has a different SHA-256" in caplog.text
  step3 = loop.train_and_evaluate(
      tiny_config(init_from=str(tmp_path / "checkpoints" / "3")),
      str(tmp_path / "fresh"), "eval")
  assert results["eval_ema_top1"] == step3["eval_ema_top1"]
  shutil.rmtree(tmp_path / "checkpoints" / "3" / "state")
  with pytest.raises(ValueError, match="no good checkpoint"):
    loop.train_and_evaluate(tiny_config(), str(tmp_path), "eval")


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


@pytest.fixture(scope="module")
def bn_run(tmp_path_factory):
  """A finished tiny ResNet run (batch norm): (workdir, config, results)."""
  config = resnet_config.get_config("depth=26,smoke=True")
  config.update(dict(num_steps=2, batch_size=32, eval_batch_size=40,
                     log_every_steps=2, fast_paths=False))
  config.model.kwargs.width_multiplier = 0.125
  config.checkpoint.update(dict(every_steps=2, async_save=False))
  workdir = tmp_path_factory.mktemp("bn_run") / "run"
  results = loop.train_and_evaluate(config, str(workdir), "train")
  return workdir, config, results


def test_init_from_wrong_model_names_the_module(trained, bn_run, tmp_path):
  """init_from another model's run is an error naming the first module that
  does not fit, and writes no checkpoint; the same model's run initialises
  the model with its weights."""
  # The NFNet from the ResNet run: both programs are the runs' own (cached).
  wrong = tiny_config(init_from=str(bn_run[0]))
  with pytest.raises(ValueError, match=r"does not fit the model: module "
                     r"'NFNet/~/\S+' has nothing there, the model needs"):
    loop.train_and_evaluate(wrong, str(tmp_path / "b"))
  assert not (tmp_path / "b" / "checkpoints").exists() or not os.listdir(
      tmp_path / "b" / "checkpoints")
  # The same model initialises from it and starts at step 0 with its weights:
  # it evaluates as the run's own evaluation of its last step (which
  # test_train_eval_end_to_end_writes_metrics_and_checkpoints shows is what
  # evaluating the finished run gives).
  shutil.copytree(trained[0], tmp_path / "a")
  same = tiny_config(init_from=str(tmp_path / "a"), num_steps=3)
  results = loop.train_and_evaluate(same, str(tmp_path / "c"), "eval")
  assert results["eval_top1"] == trained[1]["eval_top1"]


def test_init_from_a_batch_norm_run_carries_its_statistics(bn_run, tmp_path):
  """Evaluating a ResNet run through init_from equals evaluating the run."""
  workdir, config, own = bn_run
  # The state keeps its types through the step (batch norm's int counter).
  saved = weights_io.read_params(str(workdir))["model_state"]
  counters = [v for m in saved.values() for k, v in m.items() if k == "counter"]
  assert counters and all(c.dtype == np.int32 for c in counters)
  # `own`: the run's evaluation of its last (saved) state.
  config = config.copy_and_resolve_references()
  config.init_from = str(workdir)
  via = loop.train_and_evaluate(config, str(tmp_path / "b"), "eval")
  for key in ("eval_top1", "eval_loss", "eval_ema_top1", "eval_ema_loss"):
    assert via[key] == own[key], key


def test_nan_and_spike_stops_save_the_last_good_state_and_resume(
    tmp_path, monkeypatch):
  """A NaN batch stops a run (NonFiniteLossError), a finite loss spike stops
  it again (LossSpikeError, with the guard on); each time the last good
  state is saved with its data position, and the run resumes from it and
  finishes on clean data. (One guarded run: the guard is in the step, so
  both stops share its one compiled step.)"""
  config = tiny_config(**{"loss_spike.factor": 3.0, "loss_spike.window": 2})
  # The 5th batch NaN: step 4 -> 5 is not finite.
  change_train_batch(monkeypatch, 5, lambda batch: dict(
      batch, images=np.full_like(batch["images"], np.nan)))
  with pytest.raises(loop.NonFiniteLossError,
                     match=r"NaN/inf at step 4.*last good state"):
    loop.train_and_evaluate(config, str(tmp_path))
  # The state after the 4 good steps, finite, saved with the data position
  # it was trained to, not the failing step's.
  restored, data_state = restore_latest(config, tmp_path)
  assert int(restored.step) == 4 and int(restored.nonfinite_step) == -1
  assert data_state == {"epoch": 0, "batch": 4}
  for leaf in jax.tree.leaves(restored.params):
    assert np.all(np.isfinite(leaf))
  monkeypatch.undo()
  # Resumed at step 4, its 2nd batch (the 6th) scaled: a finite loss over 3
  # times the running average of the losses of steps 1-5.
  change_train_batch(monkeypatch, 2, lambda batch: dict(
      batch, images=batch["images"] * 2000.0))
  with pytest.raises(loop.LossSpikeError,
                     match=r"loss spiked at step 5: .*over loss_spike.factor"
                     r"=3 times its running average .*last good state"):
    loop.train_and_evaluate(config, str(tmp_path))
  restored, data_state = restore_latest(config, tmp_path)
  assert int(restored.step) == 5 and int(restored.nonfinite_step) == -1
  assert data_state == {"epoch": 0, "batch": 5}
  assert float(restored.loss_average["weight"]) > 0.9
  # Restarted on clean data, the guarded run finishes.
  monkeypatch.undo()
  results = loop.train_and_evaluate(config, str(tmp_path))
  assert "eval_top1" in results and np.isfinite(results["loss"])
  assert int(restore_latest(config, tmp_path)[0].step) == 6


def test_the_spike_guard_compares_with_a_bias_corrected_average():
  config = tiny_config(**{"loss_spike.factor": 2.0, "loss_spike.window": 4})
  average = steps.initial_loss_average()
  decay, total, weight, spikes = 0.75, 0.0, 0.0, []
  for k, loss in enumerate([9.0, 3.0, 2.0, 2.5, 3.9, 9.0, 1.0]):
    spike, average = steps.loss_spike(config, average, jnp.float32(loss))
    # Ready once the EMA's weight is 1 - 0.75**4 (after 4 losses).
    expected = k >= 4 and loss > 2.0 * total / weight
    assert bool(spike) == expected, (k, loss)
    spikes.append(bool(spike))
    total, weight = decay * total + (1 - decay) * loss, decay * weight + 0.25
    np.testing.assert_allclose(float(average["sum"]), total, rtol=1e-6)
    np.testing.assert_allclose(float(average["weight"]), weight, rtol=1e-6)
  assert spikes == [False] * 5 + [True, False]
  assert tiny_config().loss_spike.factor == 0.0  # off by default
  spike, _ = steps.loss_spike(tiny_config(), average, jnp.float32(1e9))
  assert not bool(spike)
