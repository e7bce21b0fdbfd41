"""Multi-process training on one machine: 2 CPU processes of 2 devices each.

The processes join a `jax.distributed` job through a loopback coordinator and
train the digits NFNet in one shared workdir (`tests/multihost_worker.py`).
Their checkpoints and evaluations must be those of a single process with 4
devices fed the same global batches, also after one of them is SIGKILLed and
the job restarted; a SIGTERM to one process must stop both at the same step,
and a single process must resume their checkpoint.
"""

import json
import os
import random
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
NUM_STEPS = 8  # as in the worker, which checkpoints and evaluates every 2
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


class Job:
  """1 process of 4 devices or 2 of 2 (a `jax.distributed` job) training in
  `workdir`, each process's output in `{logdir}/{name}-{process}.log`.

  Use as a context manager: every process still running at the end is
  killed (a failed process leaves its peers waiting in a collective).
  """

  def __init__(self, workdir, num_processes, logdir, name, *args):
    os.makedirs(logdir, exist_ok=True)
    self.workdir, self.num_processes = workdir, num_processes
    self.logs = [os.path.join(logdir, f"{name}-{p}.log")
                 for p in range(num_processes)]
    self.deadline = time.monotonic() + TIMEOUT
    coordinator = f"127.0.0.1:{_free_port()}"
    self.procs = []
    for p, log in enumerate(self.logs):
      if num_processes == 1:
        env = _env(DEVICES)
      else:
        args = ("--distributed", *args)
        env = _env(DEVICES // num_processes, p, num_processes, coordinator)
      self.procs.append(_start_worker(workdir, args, env, log))

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    _kill_running(self.procs)

  def wait_until(self, condition):
    """Polls `condition()` while every process runs."""
    while not condition():
      running = all(p.poll() is None for p in self.procs)
      assert running and time.monotonic() < self.deadline, self.report()
      time.sleep(0.05)

  def finish(self):
    """Waits for the processes to exit 0 (or one to fail); their outputs."""
    while time.monotonic() < self.deadline:
      codes = [proc.poll() for proc in self.procs]
      if None not in codes or any(code for code in codes):
        break
      time.sleep(0.2)
    _kill_running(self.procs)
    codes = [proc.returncode for proc in self.procs]
    assert codes == [0] * self.num_processes, (
        f"exit codes {codes}\n{self.report()}")
    outputs = self.outputs()
    for p, out in enumerate(outputs):
      assert (f"process {p} of {self.num_processes} with {DEVICES} devices"
              in out), out
      if self.num_processes == 1:
        assert "index check passed" in out, out
      else:
        assert ("index check: processes disagree on the index: [0, 1] "
                "(by process)") in out, out
    return outputs

  def outputs(self):
    return [_tail(log) for log in self.logs]

  def report(self):
    return "\n".join(f"--- process {p}:\n{out}"
                     for p, out in enumerate(self.outputs()))


def read_state(workdir, step):
  """The checkpointed state at `step` as numpy, whatever topology saved it."""
  directory = os.path.join(workdir, "checkpoints", str(step), "state")
  with ocp.StandardCheckpointer() as ckptr:
    metadata = ckptr.metadata(directory).item_metadata
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), metadata)
    return ckptr.restore(directory, target)


def read_metrics(workdir):
  """The lines of a run's metrics.jsonl (complete ones: it may be written)."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [json.loads(line) for line in f if line.endswith("\n")]
  except FileNotFoundError:
    return []


def checkpoint_steps(workdir):
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  return sorted(int(name) for name in names if name.isdigit())


def assert_same_weights(workdir, reference, step):
  """The weights and optimizer state at `step` equal the reference's."""
  got, want = read_state(workdir, step), read_state(reference, step)
  for key in ("params", "ema_params", "opt_state"):
    got_leaves = jax.tree.leaves(got[key])
    want_leaves = jax.tree.leaves(want[key])
    assert len(got_leaves) == len(want_leaves) > 10, key
    for a, b in zip(got_leaves, want_leaves):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert int(got["step"]) == int(want["step"]) == step


def _preempted_step(output):
  return int(output.split("preempted at step ")[1].split()[0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The reference and a 2-process run through every interruption.

  The reference is 1 process of 4 devices, uninterrupted. The other run is 2
  processes of 2 devices: one of them SIGKILLed at a random step (3 or 4,
  so that its first checkpoint and evaluation, at step 2, are done); the
  job restarted, with a second's wait before each batch, and SIGTERM sent
  to one process once it has trained a step; then finished by 1 process
  of 4 devices from the checkpoint that left.

  Returns:
    A dict: `reference` and `run` (workdirs); `killed`, `restarted` (the
    lines of `run`'s metrics.jsonl once each 2-process job ended) and
    `preempted` (the 2 processes' outputs after the SIGTERM).
  """
  base = tmp_path_factory.mktemp("multihost")
  logdir = str(base / "logs")
  reference, run = str(base / "one_process"), str(base / "two_processes")
  with Job(reference, 1, logdir, "reference") as job:
    job.finish()

  rng = random.Random()
  step, victim = rng.randint(3, 4), rng.randint(0, 1)
  print(f"SIGKILL to process {victim} after step {step}")
  with Job(run, 2, logdir, "killed") as job:
    # Process 0 logs every step: the kill comes in the next step or the
    # checkpoint and evaluation after it.
    job.wait_until(lambda: max(
        (m["step"] for m in read_metrics(run)), default=0) >= step)
    job.procs[victim].kill()
    job.procs[victim].wait()
  assert job.procs[victim].returncode == -signal.SIGKILL, (step, victim)
  killed = len(read_metrics(run))

  with Job(run, 2, logdir, "restarted", "--step_seconds=1") as job:
    # Process 1 alone is told to stop, once the restart has trained a step.
    job.wait_until(lambda: len(read_metrics(run)) > killed)
    job.procs[1].send_signal(signal.SIGTERM)
    preempted = job.finish()
  restarted = len(read_metrics(run))

  with Job(run, 1, logdir, "finished") as job:
    job.finish()
  return dict(reference=reference, run=run, killed=killed,
              restarted=restarted, preempted=preempted)


def test_sigterm_to_one_process_stops_both_at_the_same_step(runs):
  """JAX's preemption service: every process saves one agreed step."""
  metrics = read_metrics(runs["run"])
  resumed = metrics[runs["killed"]]["step"] - 1
  assert resumed in (2, 4), resumed  # a checkpoint of the killed job
  steps = [_preempted_step(out) for out in runs["preempted"]]
  assert resumed < steps[0] == steps[1] < NUM_STEPS, runs["preempted"]
  assert steps[0] in checkpoint_steps(runs["run"])
  # The last step the 2 processes logged is the step they saved.
  assert metrics[runs["restarted"] - 1]["step"] == steps[0]


def test_one_process_resumes_the_checkpoint_of_two(runs):
  metrics = read_metrics(runs["run"])
  preempted = _preempted_step(runs["preempted"][0])
  # It went on from the 2 processes' step (a fresh start would log step 1)
  # and ended as the reference did.
  assert metrics[runs["restarted"]]["step"] == preempted + 1
  assert_same_weights(runs["run"], runs["reference"], NUM_STEPS)


def test_two_processes_equal_one_process_with_the_same_devices(runs):
  reference, run = runs["reference"], runs["run"]
  assert checkpoint_steps(reference) == [2, 4, 6, 8]
  assert set(checkpoint_steps(run)) == {
      2, 4, 6, 8, _preempted_step(runs["preempted"][0])}
  # Step 2 was saved by the 2 processes (the killed job); they resumed it or
  # step 4.
  assert_same_weights(run, reference, 2)
  # read_params (init_from, export) reads a 4-device checkpoint in this
  # 8-device process.
  loaded = weights_io.read_params(run)["params"]
  for a, b in zip(jax.tree.leaves(loaded),
                  jax.tree.leaves(read_state(run, NUM_STEPS)["params"])):
    np.testing.assert_array_equal(a, b)
  # Not vacuous: training moved the weights by far more than the tolerance.
  first, last = (read_state(reference, s)["params"] for s in (2, NUM_STEPS))
  assert max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(first), jax.tree.leaves(last))) > 1e-4
  # Process 0 alone writes the metrics. The steps between the checkpoint a
  # restart resumed and the kill or SIGTERM are logged twice, the same
  # (speeds aside) both times.
  records, by_two = {}, set()
  for i, m in enumerate(read_metrics(run)):
    m = {k: v for k, v in m.items() if not k.endswith("_per_sec")}
    key = (m["step"], "eval_examples" in m)
    assert m == pytest.approx(records.setdefault(key, m), rel=1e-6), (
        f"step {key[0]} replayed differently: {m}")
    if i < runs["restarted"]:
      by_two.add(key)
  want = {(m["step"], "eval_examples" in m): m
          for m in read_metrics(reference)}
  assert sorted(want) == sorted(
      [(s, False) for s in range(1, NUM_STEPS + 1)] +
      [(s, True) for s in range(2, NUM_STEPS + 1, 2)])
  # Every step, and every evaluation but one the SIGTERM may have cut short.
  assert set(records) <= set(want)
  assert len(set(want) - set(records)) <= 1, sorted(records)
  assert {k for k in want if not k[1]} | {(NUM_STEPS, True)} <= set(records)
  for key, w in want.items():
    if not key[1]:
      for name in ("loss", "grad_norm", "learning_rate"):
        assert records[key][name] == pytest.approx(w[name], rel=1e-5), (
            key, name)
  # An evaluation by the 2 processes (at step 2, before the kill) counts
  # every example once across them and agrees with the single process; so
  # do the others.
  assert (2, True) in by_two
  for key, w in want.items():
    if key in records and key[1]:
      got, count = records[key], w["eval_examples"]
      assert got["eval_examples"] == count > 0
      for name in ("eval_top1", "eval_ema_top1", "eval_loss",
                   "eval_ema_loss"):
        # At most one prediction may flip on rounding.
        assert got[name] == pytest.approx(w[name], abs=1.01 / count), key
