"""What checkpoint checksums cost: an F0-sized TrainState saved and verified.

  python benchmarks/bench_checkpoint.py [--model=nfnet_f0] [--repeats=3]
      [--dir=/tmp/x]

Builds the TrainState of `--model` (SGD + AGC, as the trainer does) with
random values, then times, per save, with `nfnets.training.checkpoint`:
`save_call` (what the train loop waits for: `save` returning while the async
write goes on), `save_total` (until the checkpoint, with its checksums, is
committed), `checksums` (`integrity.write_manifest` alone, over the same
files: the part of `save_total` the checksums add, in orbax's background
thread), `verify` (`integrity.first_mismatch`, which every read runs
first) and `restore` (`restore_latest`, verification included). Prints one
line per figure (median over the repeats) with the checkpoint's size.
"""

import os
import shutil
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nfnets import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.training import checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.training import experiment_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.training import integrity  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.training import optim  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.training import steps  # pylint: disable=g-import-not-at-top,wrong-import-position

_MODEL = flags.DEFINE_string("model", "nfnet_f0", "Registered model name.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Saves to time.")
_DIR = flags.DEFINE_string("dir", "", "Where to write (default: a temporary "
                           "folder, deleted after).")


def random_state(name: str) -> steps.TrainState:
  """The model's TrainState with random float leaves, on the host devices."""
  config = experiment_config.base_config()
  model = models.build_model(name, num_classes=1000)
  optimizer = optim.make_optimizer(config, lambda step: 0.1)
  size = models.image_sizes(name)[0]
  shapes = jax.eval_shape(
      lambda rng: steps.init_state(model, optimizer, rng, (size, size, 3)),
      jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda s: jax.numpy.asarray(rng.standard_normal(s.shape, np.float32)
                                  .astype(s.dtype)), shapes)


def main(argv):
  del argv
  state = random_state(_MODEL.value)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state)
  folder = _DIR.value or tempfile.mkdtemp(prefix="bench_checkpoint_")
  times = {k: [] for k in ("save_call", "save_total", "checksums", "verify",
                           "restore")}
  ckpt = checkpoint.Checkpointer(folder, max_to_keep=2, async_save=True)
  try:
    for k in range(1, _REPEATS.value + 1):
      start = time.perf_counter()
      ckpt.save(k, state, {"batch": k})
      times["save_call"].append(time.perf_counter() - start)
      ckpt.wait()
      times["save_total"].append(time.perf_counter() - start)
      step_dir = os.path.join(folder, str(k))
      start = time.perf_counter()
      integrity.write_manifest(step_dir)
      times["checksums"].append(time.perf_counter() - start)
      start = time.perf_counter()
      assert integrity.first_mismatch(step_dir) is None
      times["verify"].append(time.perf_counter() - start)
      start = time.perf_counter()
      restored, _ = ckpt.restore_latest(abstract)
      jax.block_until_ready(restored)
      times["restore"].append(time.perf_counter() - start)
    size = sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(step_dir) for f in files)
  finally:
    ckpt.close()
    if not _DIR.value:
      shutil.rmtree(folder)
  params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f"{_MODEL.value}: {params:,} parameters, checkpoint {size / 2**20:.0f}"
        f" MiB, {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"median of {_REPEATS.value}")
  for name, values in times.items():
    print(f"  {name:10s} {statistics.median(values):7.3f} s")


if __name__ == "__main__":
  app.run(main)
