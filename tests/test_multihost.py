"""Multi-process training on one machine: 2 CPU processes of 2 devices each.

The processes join a `jax.distributed` job through a loopback coordinator and
train the digits NFNet in one shared workdir (`tests/multihost_worker.py`).
Their checkpoints must hold the parameters of a single process with 4 devices
fed the same global batches, also after one of them is SIGKILLed and the job
restarted; each topology must resume the other's checkpoints, and a SIGTERM
to one process must stop both at the same step.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from nfnets.training import weights_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
NUM_STEPS = 6  # as in the worker, which checkpoints every 2 steps
DEVICES = 4  # global devices of every topology
TIMEOUT = 300  # seconds per job
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
_DISTRIBUTED_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                     "JAX_PROCESS_ID")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(local_devices, process_id=None, num_processes=None,
         coordinator=None):
  """This environment with `local_devices` CPU devices and the job's vars."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith(_DEVICE_FLAG)]
  env["XLA_FLAGS"] = " ".join(flags + [f"{_DEVICE_FLAG}={local_devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  for name in _DISTRIBUTED_VARS:
    env.pop(name, None)
  if num_processes is not None:
    env.update(JAX_COORDINATOR_ADDRESS=coordinator,
               JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(process_id))
  return env


def _tail(path, chars=3000):
  with open(path) as f:
    return f.read()[-chars:]


def _start_worker(workdir, args, env, log):
  """Starts one worker process writing its output to `log`."""
  with open(log, "w") as out:
    return subprocess.Popen([sys.executable, WORKER, str(workdir), *args],
                            cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT)


def _kill_running(procs):
  """Kills the workers still running (a failed peer leaves them waiting)."""
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def run_job(workdir, num_processes, logdir):
  """Trains in `workdir` with 1 process of 4 devices or 2 of 2; waits.

  A failed process stops the job at once (its peers would wait for it in a
  collective); every process still running at the end is killed.

  Args:
    workdir: the run's workdir, shared by the processes.
    num_processes: 1 (a plain run) or 2 (a `jax.distributed` job).
    logdir: where each process's output goes.

  Returns:
    The output of each process.
  """
  os.makedirs(logdir, exist_ok=True)
  coordinator = f"127.0.0.1:{_free_port()}"
  name = os.path.basename(workdir)
  logs = [os.path.join(logdir, f"{name}-{p}.log")
          for p in range(num_processes)]
  procs = []
  try:
    for p, log in enumerate(logs):
      if num_processes == 1:
        args, env = [], _env(DEVICES)
      else:
        args = ["--distributed"]
        env = _env(DEVICES // num_processes, p, num_processes, coordinator)
      procs.append(_start_worker(workdir, args, env, log))
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
      codes = [proc.poll() for proc in procs]
      if None not in codes or any(code for code in codes):
        break
      time.sleep(0.2)
  finally:
    _kill_running(procs)
  outputs = [_tail(log) for log in logs]
  codes = [proc.returncode for proc in procs]
  report = "\n".join(f"--- process {p}:\n{out}"
                     for p, out in enumerate(outputs))
  assert codes == [0] * num_processes, f"{name}: exit codes {codes}\n{report}"
  for p, out in enumerate(outputs):
    assert (f"process {p} of {num_processes} with {DEVICES} devices"
            in out), out
    if num_processes == 1:
      assert "index check passed" in out, out
    else:
      assert ("index check: processes disagree on the index: [0, 1] "
              "(by process)") in out, out
  return outputs


def read_state(workdir, step):
  """The checkpointed state at `step` as numpy, whatever topology saved it."""
  directory = os.path.join(workdir, "checkpoints", str(step), "state")
  with ocp.StandardCheckpointer() as ckptr:
    metadata = ckptr.metadata(directory).item_metadata
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), metadata)
    return ckptr.restore(directory, target)


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _last_logged_step(workdir):
  """The last step in a run's metrics.jsonl (read while it is written)."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      lines = [line for line in f if line.endswith("\n")]
  except FileNotFoundError:
    return 0
  return max((json.loads(line)["step"] for line in lines), default=0)


def checkpoint_steps(workdir):
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  return sorted(int(name) for name in names if name.isdigit())


def assert_same_weights(workdir, reference, step=NUM_STEPS):
  """The weights and optimizer state at `step` equal the reference's."""
  got, want = read_state(workdir, step), read_state(reference, step)
  for key in ("params", "ema_params", "opt_state"):
    got_leaves = jax.tree.leaves(got[key])
    want_leaves = jax.tree.leaves(want[key])
    assert len(got_leaves) == len(want_leaves) > 10, key
    for a, b in zip(got_leaves, want_leaves):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert int(got["step"]) == int(want["step"]) == step


def resume_from(source, step, workdir):
  """A new workdir holding only `source`'s checkpoint at `step`."""
  shutil.copytree(os.path.join(source, "checkpoints", str(step)),
                  os.path.join(workdir, "checkpoints", str(step)))
  return workdir


def kill_one_process_at_a_random_step(workdir, logdir):
  """Starts a 2-process run and SIGKILLs one process at a random step."""
  rng = random.Random()
  step, victim = rng.randint(2, NUM_STEPS - 1), rng.randint(0, 1)
  print(f"SIGKILL to process {victim} after step {step}")
  coordinator = f"127.0.0.1:{_free_port()}"
  logs = [os.path.join(logdir, f"killed-{p}.log") for p in range(2)]
  procs = []
  try:
    for p, log in enumerate(logs):
      procs.append(_start_worker(workdir, ["--distributed"],
                                 _env(DEVICES // 2, p, 2, coordinator), log))
    deadline = time.monotonic() + TIMEOUT
    # Process 0 logs every step: kill once step `step` is logged, i.e. in
    # the next step or the save after it.
    while _last_logged_step(workdir) < step:
      assert time.monotonic() < deadline and None in [
          p.poll() for p in procs], _tail(logs[0])
      time.sleep(0.05)
    procs[victim].kill()
  finally:
    # The survivor waits for its peer in a collective: stop it too.
    _kill_running(procs)
  assert procs[victim].returncode == -signal.SIGKILL, (step, victim)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The reference (1 process, 4 devices) and a 2-process run, fresh.

  The 2-process run is SIGKILLed in one process at a random step, then
  restarted, and must end as if it had never stopped.
  """
  base = tmp_path_factory.mktemp("multihost")
  logdir = str(base / "logs")
  os.makedirs(logdir)
  reference = str(base / "one_process")
  run_job(reference, 1, logdir)
  two = str(base / "two_processes")
  kill_one_process_at_a_random_step(two, logdir)
  run_job(two, 2, logdir)
  return base, reference, two


def test_two_processes_equal_one_process_with_the_same_devices(runs):
  _, reference, two = runs
  assert checkpoint_steps(two) == checkpoint_steps(reference) == [2, 4, 6]
  for step in (2, NUM_STEPS):
    assert_same_weights(two, reference, step)
  # read_params (init_from, export) reads a 4-device checkpoint in this
  # 8-device process.
  loaded = weights_io.read_params(two)["params"]
  for a, b in zip(jax.tree.leaves(loaded),
                  jax.tree.leaves(read_state(two, NUM_STEPS)["params"])):
    np.testing.assert_array_equal(a, b)
  # Not vacuous: training moved the weights by far more than the tolerance.
  first, last = (read_state(reference, s)["params"] for s in (2, NUM_STEPS))
  assert max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(first), jax.tree.leaves(last))) > 1e-4
  # Process 0 alone writes the metrics. The steps between the checkpoint
  # the restart resumed and the kill are logged twice, the same (speeds
  # aside) both times.
  records = {}
  for m in read_metrics(two):
    m = {k: v for k, v in m.items() if not k.endswith("_per_sec")}
    key = (m["step"], "eval_examples" in m)
    assert m == pytest.approx(records.setdefault(key, m), rel=1e-6), (
        f"step {key[0]} replayed differently: {m}")
  want = read_metrics(reference)
  assert [(m["step"], "eval_examples" in m) for m in want] == sorted(records)
  assert sorted(records) == [(s, False) for s in range(1, NUM_STEPS + 1)] + [
      (NUM_STEPS, True)]
  for w in want[:-1]:
    for name in ("loss", "grad_norm", "learning_rate"):
      assert records[(w["step"], False)][name] == pytest.approx(
          w[name], rel=1e-5), (w["step"], name)
  # The evaluation counts every example once across processes and agrees
  # with the single process.
  got = records[(NUM_STEPS, True)]
  count = want[-1]["eval_examples"]
  assert got["eval_examples"] == count > 0
  for name in ("eval_top1", "eval_ema_top1", "eval_loss", "eval_ema_loss"):
    # At most one prediction may flip on rounding.
    assert got[name] == pytest.approx(want[-1][name], abs=1.01 / count)


def test_one_process_resumes_the_checkpoint_of_two(runs):
  # (Two processes resume two processes' checkpoint in the `runs` fixture.)
  base, reference, two = runs
  step = 4
  resumed = resume_from(two, step, str(base / "resumed_from_2"))
  run_job(resumed, 1, str(base / "logs"))
  # It went on from the copied step (a fresh start would log step 1).
  assert read_metrics(resumed)[0]["step"] == step + 1
  assert checkpoint_steps(resumed)[-1] == NUM_STEPS
  assert_same_weights(resumed, reference)


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  """JAX's preemption service: every process saves one agreed step.

  The run is the `runs` fixture's 2-process job (its programs come from the
  compilation cache) with a second's wait before each batch, so that the
  signal lands between steps 2 and NUM_STEPS.
  """
  coordinator = f"127.0.0.1:{_free_port()}"
  logs = [tmp_path / f"p{p}.log" for p in range(2)]
  procs = []
  try:
    for p, log in enumerate(logs):
      procs.append(_start_worker(
          tmp_path / "run", ["--distributed", "--step_seconds=1"],
          _env(DEVICES // 2, p, 2, coordinator), log))
    deadline = time.monotonic() + TIMEOUT
    # Process 1 alone is told to stop, once training has started.
    checkpoints = tmp_path / "run" / "checkpoints"
    while not (checkpoints / "2").is_dir():
      assert time.monotonic() < deadline and procs[0].poll() is None, (
          _tail(logs[0]))
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    codes = [proc.wait(timeout=max(1, deadline - time.monotonic()))
             for proc in procs]
  finally:
    _kill_running(procs)
  outputs = [_tail(log) for log in logs]
  assert codes == [0, 0], outputs
  steps = [int(out.split("preempted at step ")[1].split()[0])
           for out in outputs]
  assert 2 < steps[0] == steps[1] < NUM_STEPS, outputs
  assert str(steps[0]) in os.listdir(checkpoints)
