"""The trainer as users run it: `experiments/train.py` in a subprocess.

Exact resume after SIGKILL at random steps, a save on SIGTERM, and one-line
errors with a non-zero exit for bad command lines.
"""

import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from nfnets.training import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["--config.num_steps=24", "--config.batch_size=32",
         "--config.checkpoint.every_steps=4", "--config.log_every_steps=1",
         "--config.eval_batch_size=360"]


def _command(workdir, *flags):
  return [sys.executable, os.path.join(ROOT, "experiments", "train.py"),
          f"--workdir={workdir}", *flags]


def _run(workdir, *flags, timeout=300):
  return subprocess.run(_command(workdir, *flags), cwd=ROOT, timeout=timeout,
                        capture_output=True, text=True, check=False)


def _metric_lines(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(1 for _ in f)


def _start_and_signal(workdir, sig, after_lines, *flags):
  """Starts a run, sends `sig` once `after_lines` more metric lines exist."""
  base = _metric_lines(workdir)
  proc = subprocess.Popen(_command(workdir, *flags), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 240
  while _metric_lines(workdir) < base + after_lines:
    if proc.poll() is not None:
      break
    assert time.time() < deadline, "run made no progress"
    time.sleep(0.05)
  if proc.poll() is None:
    proc.send_signal(sig)
  out, err = proc.communicate(timeout=120)
  return proc.returncode, out, err


def test_sigkill_at_random_steps_then_resume_is_exact(tmp_path):
  reference = tmp_path / "reference"
  done = _run(reference, *SHORT)
  assert done.returncode == 0, done.stderr[-2000:]
  killed = tmp_path / "killed"
  rng = random.Random(os.getpid())
  for _ in range(2):
    code, _, _ = _start_and_signal(killed, signal.SIGKILL,
                                   rng.randint(2, 12), *SHORT)
    assert code in (-signal.SIGKILL, 0)
  final = _run(killed, *SHORT)
  assert final.returncode == 0, final.stderr[-2000:]
  a = checkpoint.read_params(str(reference))
  b = checkpoint.read_params(str(killed))
  for key in ("params", "ema_params"):
    leaves_a, leaves_b = jax.tree.leaves(a[key]), jax.tree.leaves(b[key])
    assert len(leaves_a) == len(leaves_b) > 10
    for x, y in zip(leaves_a, leaves_b):
      np.testing.assert_array_equal(x, y)
  assert "test accuracy" in final.stdout


def test_sigterm_saves_before_exiting(tmp_path):
  code, out, err = _start_and_signal(
      tmp_path, signal.SIGTERM, 5, "--config.num_steps=5000",
      "--config.batch_size=32", "--config.log_every_steps=1",
      "--config.checkpoint.every_steps=1000")
  assert code == 0, err[-2000:]
  assert "preempted at step" in out
  step = int(out.split("preempted at step ")[1].split(";")[0])
  assert step >= 5
  assert str(step) in os.listdir(tmp_path / "checkpoints")


@pytest.mark.parametrize("flags,message", [
    (["--config.batch_sizee=3"], "batch_sizee"),
    (["--config=configs/nope.py"], "nope.py"),
    (["--config=configs/nfnet.py:variant=F9"], "unknown NFNet variant 'F9'"),
    (["--config=configs/resnet.py:depth=abc"],
     "config arg depth must be of type int, got abc"),
    (["--config.batch_size=36"], "not divisible by the 8 devices"),
    (["--config=configs/nfnet.py"],
     "dataset.data_dir is required for imagenet2012"),
    (["--config.dataset.name=imagenet_1k", "--config.dataset.data_dir=/x"],
     "unknown dataset 'imagenet_1k'"),
    (["--config=configs/nfnet.py", "--config.dataset.data_dir=/no/tfds"],
     "TFDS imagenet2012 is not prepared: data_dir '/no/tfds' does not exist"),
    (["--config.optimizer.base_lr=1e30", "--config.num_steps=6",
      "--config.batch_size=32", "--config.optimizer.agc_clipping=0",
      "--config.log_every_steps=2"], "NaN/inf at step"),
])
def test_bad_command_lines_fail_with_one_clear_line(tmp_path, flags,
                                                    message):
  result = _run(tmp_path / "run", *flags, timeout=240)
  assert result.returncode != 0
  assert message in result.stderr
  assert "Traceback" not in result.stderr
