"""The trainer as users run it: `experiments/train.py`.

Exact resume after SIGKILL and SIGTERM of a real process, and one-line
errors for bad command lines and configs: checked in-process through the
script's own `load_config` and the trainer, and once in a subprocess for the
format and the exit status.
"""

import importlib.util
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import cli_helpers
from nfnets.training import weights_io
from nfnets.training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The plain twins of the fast paths compile in about half the time on CPUs
# (test_train.py shows both give the same step).
SHORT = ["--config.num_steps=12", "--config.batch_size=32",
         "--config.checkpoint.every_steps=4", "--config.log_every_steps=1",
         "--config.eval_batch_size=360", "--config.fast_paths=False"]


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


def _train_cli():
  """experiments/train.py as a module (it defines absl flags: load once)."""
  if "train_cli" not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        "train_cli", os.path.join(ROOT, "experiments", "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["train_cli"] = module
  return sys.modules["train_cli"]


def test_sigkill_and_sigterm_then_resume_is_exact(tmp_path):
  # A run killed (SIGKILL: no chance to save), then preempted (SIGTERM: it
  # saves and exits 0), then resumed to the end, must end bit-identical to
  # an uninterrupted run. The signals come after a seeded number of steps.
  # (Checkpoints every 4 steps: the kill leaves step 0 or 4, and the
  # SIGTERM comes before the last step.)
  rng = random.Random(20261202)
  kill_after, term_after = rng.randint(2, 7), rng.randint(2, 5)
  print(f"SIGKILL after {kill_after} steps, then SIGTERM after {term_after}")
  reference = tmp_path / "reference"
  loop.train_and_evaluate(_train_cli().load_config(["train.py", *SHORT]),
                          str(reference))
  killed = tmp_path / "killed"
  code, _, _ = _start_and_signal(killed, signal.SIGKILL, kill_after, *SHORT)
  assert code in (-signal.SIGKILL, 0)
  before = set(os.listdir(killed / "checkpoints"))
  # No periodic save in this run: the checkpoint of its last step must come
  # from the SIGTERM handler.
  code, out, err = _start_and_signal(killed, signal.SIGTERM, term_after,
                                     *SHORT,
                                     "--config.checkpoint.every_steps=1000")
  assert code == 0, err[-2000:]
  assert "preempted at step" in out
  step = int(out.split("preempted at step ")[1].split(";")[0])
  assert term_after <= step < 12
  assert set(os.listdir(killed / "checkpoints")) - before == {str(step)}
  final = _run(killed, *SHORT)
  assert final.returncode == 0, final.stderr[-2000:]
  assert "test accuracy" in final.stdout
  a = weights_io.read_params(str(reference))
  b = weights_io.read_params(str(killed))
  for key in ("params", "ema_params"):
    leaves_a, leaves_b = jax.tree.leaves(a[key]), jax.tree.leaves(b[key])
    assert len(leaves_a) == len(leaves_b) > 10
    for x, y in zip(leaves_a, leaves_b):
      np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("flags,message", [
    (["--config.batch_sizee=3"],
     "unknown key config.batch_sizee (did you mean batch_size?); valid keys"),
    (["--config.model.kwargs.remat_=1"],
     "valid keys of config.model.kwargs: activation, alpha"),
    (["--config=configs/nope.py"], "nope.py"),
    (["--config=configs/nfnet.py:variant=F9"], "unknown NFNet variant 'F9'"),
    (["--config", "configs/resnet.py:depth=abc"],
     "config arg depth must be of type int, got abc"),
])
def test_bad_command_lines_are_one_clear_line(flags, message, monkeypatch):
  monkeypatch.chdir(ROOT)  # config paths as a user in the clone writes them
  with pytest.raises(ValueError) as info:
    _train_cli().load_config(["train.py", *flags])
  assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("flags,message", [
    (["--config.batch_size=36"], "not divisible by the 8 devices"),
    (["--config=configs/nfnet.py"],
     "dataset.data_dir is required for imagenet2012"),
    (["--config.dataset.name=imagenet_1k", "--config.dataset.data_dir=/x"],
     "unknown dataset 'imagenet_1k'"),
    (["--config=configs/nfnet.py", "--config.dataset.data_dir=/no/tfds"],
     "TFDS imagenet2012 is not prepared: data_dir '/no/tfds' does not exist"),
    (["--config=configs/nfnet.py", "--config.dataset.data_dir=/x",
      "--config.model.name=nf_resnet50"],
     "unknown option 'depths' for model 'nf_resnet50'"),
])
def test_bad_configs_are_one_clear_line(tmp_path, flags, message,
                                        monkeypatch):
  monkeypatch.chdir(ROOT)
  config = _train_cli().load_config(["train.py", *flags])
  with pytest.raises(ValueError) as info:
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert message in str(info.value) and "\n" not in str(info.value)
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_errors_print_one_line_and_exit_non_zero(tmp_path):
  # A bad command line: status 2; a config the trainer refuses: status 1.
  result = _run(tmp_path / "a", "--config.batch_sizee=3")
  assert result.returncode == 2
  cli_helpers.assert_one_line_error(result, "error: bad command line: ")
  result = _run(tmp_path / "b", "--config.batch_size=36")
  assert result.returncode == 1 and result.stdout == ""
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "error: batch_size 36 is not divisible by the 8 devices; use a "
      "multiple of 8")
