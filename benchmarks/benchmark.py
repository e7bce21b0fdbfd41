"""Times the trainer's real train (or eval) step on synthetic on-device data.

  python benchmarks/benchmark.py --model=nfnet_f0 --batch_size=256 \
      --image_size=192 --steps=50 [--mode=train|eval] [--json]

The step is the one `experiments/train.py` runs (`nfnets.training.steps`),
built from
the model family's config (the NFNet recipe: bfloat16 compute, float32 master
weights, AGC, SGD + Nesterov, weight decay, EMA, stochastic depth, label
smoothing, and first the on-device MixUp/CutMix and RandAugment of uint8
crops, two per example, unless `--noaugment`) by `benchmarks/step.py`. Steps are
dispatched back to back as the trainer does (no host sync between them) and
timed in rounds of 10. Prints compile time, the median round's step time,
images/s, achieved TFLOP/s and MFU (model FLOPs from the analytic MAC count: 2
FLOPs per MAC, x3 for a training step), and peak device memory. `--smoke`
shrinks the model as the configs' `smoke=True` does
(`experiment_config.shrink_model`), so that it runs on a CPU in seconds;
`--trace_dir` also records a profile of 3 steps; `--remat` measures the
rematerialising model (`model.kwargs.remat=True`); `--plain` the step traced
with the plain twins of the fast paths of `nfnets.ops`
(`config.fast_paths=False`).
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

# Runnable from a clone without installing: the repo root on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import step as bench  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.models import summary  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.training import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position

_MODEL = flags.DEFINE_string("model", "nfnet_f0", "Registered model name.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Global batch size.")
_IMAGE = flags.DEFINE_integer("image_size", 192, "Square input resolution.")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed steps (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compiling.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "augment"], "Which step; 'augment' "
    "times the train step's on-device augmentation alone (its share of "
    "the step: against --mode=train).")
_PRECISION = flags.DEFINE_enum("precision", "bfloat16",
                               ["bfloat16", "float32"], "Compute dtype.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny widths and depths.")
_REMAT = flags.DEFINE_bool("remat", False, "Recompute block activations in "
                           "the backward pass (model.kwargs.remat; NFNets "
                           "and NF-ResNets): less memory, larger batches.")
_AUGMENT = flags.DEFINE_bool(
    "augment", True, "Run the recipe's on-device augmentation (MixUp/CutMix,"
    " RandAugment, normalisation; nfnets.augment) in the train step on uint8"
    " crops, as training does; --noaugment feeds ready float images.")
_PLAIN = flags.DEFINE_bool("plain", False, "Trace the step with the plain "
                           "twins of the fast paths (nfnets.ops; "
                           "config.fast_paths=False).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")
_TRACE_DIR = flags.DEFINE_string(
    "trace_dir", None, "If set, also profile 3 steps with jax.profiler into "
    "this directory (TensorBoard/XProf files and a Perfetto JSON trace).")

ROUND = 10  # Steps dispatched back to back between syncs.

# Dense bfloat16 peak FLOP/s by device kind (vendor figures).
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v6 lite": 918e12,
}


def measured_peak_flops(dtype) -> float:
  """FLOP/s of a large square matmul: the peak where no table entry fits."""
  n = 4096 if jax.default_backend() != "cpu" else 1024
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(5):
    out = f(a)
  out.block_until_ready()
  return 5 * 2 * n ** 3 / (time.perf_counter() - start)


def peak_flops(dtype) -> tuple[float, str]:
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops * jax.device_count(), f"table ({name})"
  return measured_peak_flops(dtype) * jax.device_count(), "measured matmul"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    config, device_augment = bench.benchmark_config(
        _MODEL.value, _BATCH.value, _IMAGE.value, _PRECISION.value,
        _SMOKE.value, _REMAT.value, fast_paths=not _PLAIN.value,
        augment=_AUGMENT.value)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(_BATCH.value, mesh, "batch_size")
    step, init = bench.make_step(config, _MODE.value, mesh, device_augment)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None

  num_classes = config.dataset.num_classes
  state = init(jax.random.PRNGKey(0))
  batch = parallel.shard_batch(
      bench.synthetic_batch(config, _MODE.value, device_augment), mesh)

  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start

  def run(state, steps):
    """`steps` steps back to back, as the trainer runs them, then a sync."""
    metrics = None
    for _ in range(steps):
      out = compiled(state, batch)
      state, metrics = out if _MODE.value == "train" else (state, out)
    jax.block_until_ready(metrics)
    return state

  state = run(state, _WARMUP.value)
  # The trainer never waits for a step before dispatching the next (metrics
  # are fetched every log_every_steps), so steps are timed in rounds of up to
  # ROUND back-to-back steps; the step time is the median round's mean.
  times = []
  for first in range(0, _STEPS.value, ROUND):
    steps = min(ROUND, _STEPS.value - first)
    start = time.perf_counter()
    state = run(state, steps)
    times.append((time.perf_counter() - start) / steps)

  step_s = float(np.median(times))
  if _TRACE_DIR.value:
    with jax.profiler.trace(_TRACE_DIR.value, create_perfetto_trace=True):
      state = run(state, 3)
  macs = summary.summarize(config.model.name, _IMAGE.value,
                           num_classes=num_classes,
                           **config.model.kwargs)["gmacs"] * 1e9
  flops = 2 * macs * _BATCH.value * {"train": 3, "eval": 1, "augment": 0}[
      _MODE.value]
  peak, peak_source = peak_flops(jnp.bfloat16 if _PRECISION.value ==
                                 "bfloat16" else jnp.float32)
  stats = jax.devices()[0].memory_stats() or {}
  result = {
      "model": config.model.name, "mode": _MODE.value,
      "image_size": _IMAGE.value, "batch_size": _BATCH.value,
      "precision": _PRECISION.value, "remat": _REMAT.value,
      "augment": _AUGMENT.value,
      "fast_paths": not _PLAIN.value,
      "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "compile_s": round(compile_s, 2), "step_ms": round(step_s * 1e3, 3),
      "images_per_sec": round(_BATCH.value / step_s, 1),
      "tflops": round(flops / step_s / 1e12, 2),
      "mfu": round(flops / step_s / peak, 4), "peak_source": peak_source,
      "peak_memory_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
      "jax": jax.__version__,
  }
  if _JSON.value:
    print(json.dumps(result))
  else:
    for key, value in result.items():
      print(f"{key:>16}: {value}")


if __name__ == "__main__":
  app.run(main)
