"""Measures the host input pipeline's examples/s on CPU, per core and total.

  python benchmarks/bench_input.py [--cores=1,2] [--sizes=192,256] [--json]
      [--data_dir=FOLDER]

Times the trainer's own pipelines (`nfnets.data.pipeline`) on JPEGs of about
ImageNet's size (400x350 on average, quality 90, generated into a temporary
class-per-folder directory unless `--data_dir` names one), at each size:
`train` (one crop per example: decode fused with the Inception crop, bicubic
resize, flip, uint8), `train_mixing` (the host's share of the NFNet recipe:
two such crops per example, which the accelerator mixes and RandAugments;
`benchmarks/benchmark.py` times that part in the step, against
`--noaugment`) and `eval` (decode, bicubic
squash-resize to S + 32, centre crop, normalise).

Each core count runs in a child process pinned to that many cores before
TensorFlow starts, so tf.data's thread pool matches it. Prints one line per
measurement (or one JSON object per line with `--json`): training examples
(eval images) per second in total and per core.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_CORES = flags.DEFINE_list("cores", None, "Core counts to measure; default "
                           "1 and all cores of this process.")
_SIZES = flags.DEFINE_list("sizes", ["192", "256"], "Output resolutions.")
KINDS = ("train", "train_mixing", "eval")
_KINDS = flags.DEFINE_list("kinds", list(KINDS), "Pipelines to time.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Images per batch.")
_BATCHES = flags.DEFINE_integer("batches", 8, "Timed batches per run.")
_NUM_IMAGES = flags.DEFINE_integer(
    "num_images", None, "JPEGs to generate; default 2 * batch_size * "
    "(batches + 1), what the two-crop train pipeline reads without a second "
    "epoch.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "A class-per-folder root to "
                                "read instead of generated JPEGs.")
_JSON = flags.DEFINE_bool("json", False, "Print JSON objects, one per line.")
_CHILD = flags.DEFINE_string("child", None, "Internal: kind,size,cores.")


def write_jpegs(root: str, count: int, seed: int = 0) -> None:
  """Writes `count` photo-like JPEGs (~400x350, quality 90) in 4 classes."""
  rng = np.random.default_rng(seed)
  for i in range(count):
    folder = os.path.join(root, f"class_{i % 4}")
    os.makedirs(folder, exist_ok=True)
    h, w = int(rng.integers(300, 401)), int(rng.integers(350, 451))
    coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize(
        (w, h), Image.Resampling.BICUBIC), np.int16)
    image = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255)
    Image.fromarray(image.astype(np.uint8)).save(
        os.path.join(folder, f"{i}.jpg"), quality=90)


def _measure(data_dir: str, kind: str, size: int, batch: int,
             batches: int) -> float:
  """Examples/s of one pipeline after one untimed batch."""
  from nfnets.data import image_folder  # pylint: disable=g-import-not-at-top
  from nfnets.data import pipeline  # pylint: disable=g-import-not-at-top
  source = image_folder.ImageFolderSource(data_dir, "train", 0.0)
  crops = 2 if kind == "train_mixing" else 1
  if batch * crops * (batches + 1) > source.num_examples:
    raise ValueError(f"{kind} needs {crops} * batch_size * (batches + 1) = "
                     f"{crops * batch * (batches + 1)} images, {data_dir} "
                     f"has {source.num_examples}")
  if kind == "eval":
    stream = pipeline.eval_pass(source, batch, image_size=size)
  else:
    augment = pipeline.TrainAugment(image_size=size, crops_per_example=crops)
    stream = pipeline.SourceTrainIterator(source, batch, augment=augment,
                                          seed=0)
  next(stream)
  start = time.perf_counter()
  for _ in range(batches):
    next(stream)
  return batch * batches / (time.perf_counter() - start)


def _child(spec: str) -> None:
  kind, size, cores = spec.split(",")
  result = _measure(_DATA_DIR.value, kind, int(size), _BATCH.value,
                    _BATCHES.value)
  print(json.dumps({"kind": kind, "size": int(size), "cores": int(cores),
                    "examples_per_sec": result,
                    "per_core": result / int(cores)}))


def _run_pinned(data_dir: str, kind: str, size: int, cores: int) -> dict:
  """Runs one measurement in a child pinned to `cores` cores."""
  available = sorted(os.sched_getaffinity(0))
  command = [sys.executable, os.path.abspath(__file__),
             f"--child={kind},{size},{cores}", f"--data_dir={data_dir}",
             f"--batch_size={_BATCH.value}", f"--batches={_BATCHES.value}"]
  result = subprocess.run(
      command, capture_output=True, text=True, check=False,
      preexec_fn=lambda: os.sched_setaffinity(0, available[:cores]))
  if result.returncode:
    last = (result.stderr.strip().splitlines() or ["no error output"])[-1]
    last = last.removeprefix("error: ")
    raise RuntimeError(f"{kind} at {size} px on {cores} cores failed: {last}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if _CHILD.value:
    _child(_CHILD.value)
    return
  unknown = set(_KINDS.value) - set(KINDS)
  if unknown:
    raise app.UsageError(f"unknown --kinds {sorted(unknown)}; valid: "
                         f"{', '.join(KINDS)}")
  available = len(os.sched_getaffinity(0))
  cores = sorted({int(c) for c in (_CORES.value or [1, available])})
  if cores[0] < 1 or cores[-1] > available:
    raise app.UsageError(f"--cores must be in [1, {available}], got {cores}")
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = _DATA_DIR.value
    if not data_dir:
      data_dir = os.path.join(tmp, "jpegs")
      write_jpegs(data_dir, _NUM_IMAGES.value or
                  2 * _BATCH.value * (_BATCHES.value + 1))
    for size in (int(s) for s in _SIZES.value):
      for kind in _KINDS.value:
        for count in cores:
          row = _run_pinned(data_dir, kind, size, count)
          if _JSON.value:
            print(json.dumps(row), flush=True)
          else:
            print(f"{kind:>12} {size:4d} px  {count:3d} cores  "
                  f"{row['examples_per_sec']:8.0f} examples/s  "
                  f"{row['per_core']:7.0f} /s/core", flush=True)


if __name__ == "__main__":
  try:
    app.run(main)
  except (ValueError, RuntimeError) as e:
    sys.exit(f"error: {e}")
