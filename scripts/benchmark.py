"""Times the trainer's real train (or eval) step on synthetic on-device data.

  python scripts/benchmark.py --model=nfnet_f0 --batch_size=256 \
      --image_size=192 --steps=50 [--mode=train|eval] [--json]

The step is the one `experiments/train.py` runs (`nfnets.train`), built from
the model family's config (the NFNet recipe: bfloat16 compute, float32 master
weights, AGC, SGD + Nesterov, weight decay, EMA, stochastic depth, label
smoothing on MixUp/CutMix soft labels). Steps are dispatched back to back as
the trainer does (no host sync between them) and timed in rounds of 10; prints
compile time, the median round's step time, images/s, achieved TFLOP/s and MFU (model FLOPs from the analytic MAC count: 2
FLOPs per MAC, x3 for a training step), and peak device memory. `--smoke`
shrinks the model (1/8 widths, one block per stage) so that it runs on a CPU in
seconds; `--trace_dir` also records a profile of 3 steps; `--remat` measures
the rematerialising model (`model.kwargs.remat=True`).
"""

import json
import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import nf_resnet as nf_resnet_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import nfnet as nfnet_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import resnet as resnet_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import experiment  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import optim  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.models import summary  # pylint: disable=g-import-not-at-top,wrong-import-position

_MODEL = flags.DEFINE_string("model", "nfnet_f0", "Registered model name.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Global batch size.")
_IMAGE = flags.DEFINE_integer("image_size", 192, "Square input resolution.")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed steps (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compiling.")
ROUND = 10  # Steps dispatched back to back between syncs.
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "Which step.")
_PRECISION = flags.DEFINE_enum("precision", "bfloat16",
                               ["bfloat16", "float32"], "Compute dtype.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny widths and depths.")
_REMAT = flags.DEFINE_bool("remat", False, "Recompute block activations in "
                           "the backward pass (model.kwargs.remat; NFNets "
                           "and NF-ResNets): less memory, larger batches.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")
_TRACE_DIR = flags.DEFINE_string(
    "trace_dir", None, "If set, also profile 3 steps with jax.profiler into "
    "this directory (TensorBoard/XProf files and a Perfetto JSON trace).")

# Dense bfloat16 peak FLOP/s by device kind (vendor figures).
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v6 lite": 918e12,
}


def config_for(model_name: str):
  """The model family's experiment config, pointed at `model_name`."""
  if model_name.startswith("nfnet_f"):
    variant = model_name[len("nfnet_"):].split("_")[0].upper()
    config = nfnet_config.get_config(
        f"variant={variant.replace('PLUS', '+')}")
  elif model_name.startswith("nf_resnet"):
    config = nf_resnet_config.get_config()
  elif model_name.startswith("resnet"):
    config = resnet_config.get_config()
  else:
    raise ValueError(f"no config family for {model_name!r}")
  config.model.name = model_name
  return config


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


def experiment_config(model_name: str, batch_size: int, image_size: int,
                      precision: str = "bfloat16", smoke: bool = False,
                      remat: bool = False):
  """The config whose step is timed: the family's recipe on synthetic data.

  Returns:
    (config, soft_labels): soft_labels is whether the recipe mixes images
    (MixUp/CutMix), so that the step gets soft labels as in training.

  Raises:
    ValueError: for an unknown model family or an invalid config.
  """
  config = config_for(model_name)
  config.batch_size = config.eval_batch_size = batch_size
  # Synthetic data stands in for the dataset (host-side augmentation is
  # scripts/bench_input.py's); `synthetic_batch` makes MixUp/CutMix-style
  # soft labels when the recipe mixes.
  soft_labels = bool(config.dataset.mixup_alpha or
                     config.dataset.cutmix_alpha)
  config.dataset.update(dict(name="digits", image_size=image_size,
                             eval_image_size=image_size,
                             randaugment_layers=0, mixup_alpha=0.0,
                             cutmix_alpha=0.0))
  config.precision = precision
  if smoke:
    kwargs = dict(config.model.kwargs, width_multiplier=0.125,
                  depths=(1, 1, 1, 1))
    if model_name.startswith("nfnet"):
      kwargs["group_width"] = 16
    config.model.kwargs = kwargs
  if remat:
    config.model.kwargs = dict(config.model.kwargs, remat=True)
  experiment.validate(config)
  return config, soft_labels


def make_step(config, mode: str, mesh):
  """The trainer's jitted train or eval step and its init function."""
  model = models.build_model(config.model.name,
                             num_classes=config.dataset.num_classes,
                             **config.model.kwargs)
  schedule = optim.learning_rate_schedule(config, 10_000, 100)
  optimizer = optim.make_optimizer(config, schedule)
  size = config.dataset.image_size
  init = train.make_init(model, optimizer, (size, size, 3), mesh)
  if mode == "train":
    return train.make_train_step(model, optimizer, schedule, config,
                                 mesh), init
  return train.make_eval_step(model, config, mesh), init


def batch_shapes(config, mode: str,
                 soft_labels: bool) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Name -> (shape, dtype) of the batch the step takes."""
  n, size = config.batch_size, config.dataset.image_size
  shapes = {"images": ((n, size, size, 3), np.float32)}
  if mode == "train" and soft_labels:
    shapes["labels"] = ((n, config.dataset.num_classes), np.float32)
  else:
    shapes["labels"] = ((n,), np.int32)
  if mode == "eval":
    shapes["mask"] = ((n,), np.float32)
  return shapes


def synthetic_batch(config, mode: str,
                    soft_labels: bool) -> dict[str, np.ndarray]:
  """Random images and labels; soft labels mix two classes per example."""
  rng = np.random.default_rng(0)
  n, num_classes = config.batch_size, config.dataset.num_classes
  batch = {}
  for name, (shape, dtype) in batch_shapes(config, mode, soft_labels).items():
    if name == "images":
      batch[name] = rng.standard_normal(shape, dtype)
    elif name == "mask":
      batch[name] = np.ones(shape, dtype)
    elif len(shape) == 1:
      batch[name] = rng.integers(0, num_classes, n, dtype)
    else:  # As MixUp/CutMix make them: two classes per example.
      labels = rng.integers(0, num_classes, n)
      lam = rng.uniform(size=(n, 1)).astype(dtype)
      eye = np.eye(num_classes, dtype=dtype)
      batch[name] = lam * eye[labels] + (1 - lam) * eye[np.roll(labels, 1)]
  return batch


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    config, soft_labels = experiment_config(_MODEL.value, _BATCH.value, _IMAGE.value,
                               _PRECISION.value, _SMOKE.value, _REMAT.value)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(_BATCH.value, mesh, "batch_size")
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None

  num_classes = config.dataset.num_classes
  step, init = make_step(config, _MODE.value, mesh)
  state = init(jax.random.PRNGKey(0))
  batch = parallel.shard_batch(
      synthetic_batch(config, _MODE.value, soft_labels), mesh)

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
  flops = 2 * macs * _BATCH.value * (3 if _MODE.value == "train" else 1)
  peak, peak_source = peak_flops(jnp.bfloat16 if _PRECISION.value ==
                                 "bfloat16" else jnp.float32)
  stats = jax.devices()[0].memory_stats() or {}
  result = {
      "model": config.model.name, "mode": _MODE.value,
      "image_size": _IMAGE.value, "batch_size": _BATCH.value,
      "precision": _PRECISION.value, "remat": _REMAT.value,
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
