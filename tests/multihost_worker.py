"""One process of a tiny digits run, for `tests/test_multihost.py`.

  python tests/multihost_worker.py WORKDIR [--distributed] [--step_seconds=S]

Trains the digits NFNet for a few steps with `nfnets.training.loop` in
train_eval mode (a checkpoint and an evaluation every 2 steps and at the
end). With `--distributed` the process
joins a `jax.distributed` job described by JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID; the device count comes from XLA_FLAGS.
The config does not depend on the topology, so every topology trains the
same model on the same global batches. `--step_seconds` makes each training
batch wait that long before its step: a window for a signal between two
steps of a run that compiles the same programs as the others.
"""

import argparse
import os
import sys
import time

# Runnable from a clone: the repo root (for `configs`) and tests/ (for
# `train_helpers`) on the path.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.training import loop  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.training import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
import configs.digits as digits_config  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_helpers  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_STEPS = 8
CHECKPOINT_EVERY = 2  # and evaluate


def make_config(distributed: bool):
  """The digits config cut to a few steps of a global batch of 16."""
  c = digits_config.get_config()
  c.optimizer.warmup_epochs = 0.0
  c.batch_size = 16
  c.eval_batch_size = 40
  c.num_steps = NUM_STEPS
  c.checkpoint.every_steps = CHECKPOINT_EVERY
  c.eval_every_steps = CHECKPOINT_EVERY
  # Every checkpoint kept, a preemption's between them included.
  c.checkpoint.max_to_keep = NUM_STEPS
  c.checkpoint.async_save = False
  c.log_every_steps = 1
  c.precision = "float32"
  # The plain twins of the fast paths compile in about half the time on CPUs
  # (test_train.py shows both give the same step).
  c.fast_paths = False
  c.distributed = distributed
  return c


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir")
  parser.add_argument("--distributed", action="store_true")
  parser.add_argument("--step_seconds", type=float, default=0.0)
  args = parser.parse_args()
  if args.step_seconds:
    def wait(batch):
      time.sleep(args.step_seconds)
      return batch
    loop.data.train_iterator = train_helpers.changed_train_iterator(None, wait)
  results = loop.train_and_evaluate(make_config(args.distributed),
                                    args.workdir, "train_eval")
  if "preempted" in results:
    print(f"process {jax.process_index()}: preempted at step "
          f"{results['preempted']}", flush=True)
  # The data sources' cross-process consistency check, both ways.
  parallel.check_same_across_processes(7, "seven")
  try:
    parallel.check_same_across_processes(jax.process_index(), "the index")
    print("index check passed", flush=True)
  except ValueError as e:
    print(f"index check: {e}", flush=True)
  print(f"process {jax.process_index()} of {jax.process_count()} with "
        f"{jax.device_count()} devices: loss {results['loss']:.6f}",
        flush=True)


if __name__ == "__main__":
  main()
