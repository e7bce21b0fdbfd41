"""SIGTERM during an evaluation: honoured at the next batch, not at its end.

A preemption notice gives a job seconds, while an ImageNet evaluation takes
minutes: the loop checks after every eval batch, as after every train step,
and stops with the last step saved. (Between train steps: test_train_cli.py
and, on two processes, test_multihost.py.)
"""

import json
import os
import signal

from nfnets.training import loop

from train_helpers import restore_latest  # pylint: disable=g-bad-import-order
from train_helpers import tiny_config  # pylint: disable=g-bad-import-order


def _sigterm_at_batch(monkeypatch, batch_number):
  """Makes the eval passes send this process SIGTERM at `batch_number`."""
  real = loop.data.eval_pass
  seen = {"batches": 0}

  def eval_pass(config):
    for k, batch in enumerate(real(config), 1):
      seen["batches"] += 1
      if k == batch_number:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(loop.data, "eval_pass", eval_pass)
  return seen


def test_sigterm_mid_evaluation_saves_and_stops_within_a_batch(
    tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  config = tiny_config(num_steps=6, eval_every_steps=3)
  handler = signal.getsignal(signal.SIGTERM)
  # The digits test split is 359 examples: 9 batches of 40.
  seen = _sigterm_at_batch(monkeypatch, 2)
  # A periodic evaluation (train_eval, step 3): stops there, step 3 saved.
  results = loop.train_and_evaluate(config, workdir, "train_eval")
  assert results["preempted"] == 3 and seen["batches"] == 2
  state, data_state = restore_latest(config, tmp_path / "run")
  assert int(state.step) == 3 and data_state == {"epoch": 0, "batch": 3}
  # The final evaluation: steps 4-6 train, then it stops within a batch.
  seen["batches"] = 0
  results = loop.train_and_evaluate(config, workdir, "train")
  assert results["preempted"] == 6 and seen["batches"] == 2
  assert not os.path.exists(os.path.join(workdir, "done.json"))
  # --mode=eval too.
  seen["batches"] = 0
  assert loop.train_and_evaluate(config, workdir, "eval") == {"preempted": 6}
  assert seen["batches"] == 2
  # Restarted without a preemption: nothing to train, the evaluation runs.
  monkeypatch.undo()
  results = loop.train_and_evaluate(config, workdir, "train")
  assert results["eval_examples"] == 359 and "preempted" not in results
  with open(os.path.join(workdir, "done.json")) as f:
    assert json.load(f)["eval_examples"] == 359
  # Each run puts the previous SIGTERM handler back.
  assert signal.getsignal(signal.SIGTERM) is handler
