"""benchmarks/benchmark.py on CPU at tiny sizes: it runs and reports sanely."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import step as bench_step
import model_helpers  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _benchmark(*flags):
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "benchmark.py"), *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


def test_train_step_benchmark_json_with_the_plain_twins():
  # --plain times the step traced without the fast paths of nfnets.ops.
  result = _benchmark("--model=nfnet_f0", "--smoke", "--precision=float32",
                      "--batch_size=16", "--image_size=32", "--steps=3",
                      "--warmup=1", "--plain", "--json")
  assert result.returncode == 0, result.stderr[-2000:]
  info = json.loads(result.stdout.strip().splitlines()[-1])
  assert info["model"] == "nfnet_f0" and info["mode"] == "train"
  assert info["batch_size"] == 16 and info["image_size"] == 32
  assert info["remat"] is False and info["fast_paths"] is False
  assert info["device"] == "8 x cpu"
  assert info["step_ms"] > 0 and info["compile_s"] > 0
  assert abs(info["images_per_sec"] * info["step_ms"] / 1e3 - 16) < 0.1
  assert 0 < info["mfu"] < 1
  assert info["augment"] is True  # the recipe's MixUp/CutMix + RandAugment


def test_augment_mode_times_the_device_augmentation_alone():
  result = _benchmark("--model=nfnet_f0", "--smoke", "--batch_size=16",
                      "--image_size=32", "--steps=2", "--warmup=1",
                      "--mode=augment", "--json")
  assert result.returncode == 0, result.stderr[-2000:]
  info = json.loads(result.stdout.strip().splitlines()[-1])
  assert info["mode"] == "augment" and info["step_ms"] > 0
  result = _benchmark("--model=nfnet_f0", "--smoke", "--batch_size=16",
                      "--image_size=32", "--mode=augment", "--noaugment")
  assert result.returncode != 0
  assert "no on-device augmentation to time" in result.stderr


@pytest.mark.parametrize("model", ["nf_resnet26", "resnet26",
                                   "nf_resnet26_nows", "nfnet_f1plus"])
def test_benchmark_config_of_each_family(model):
  # The benchmarks build their config as benchmark.py does; --smoke shrinks
  # each family as its config's smoke=True does (ResNets take no `depths`:
  # passing one made this fail before), and a `_nows` name keeps its
  # family's options but plain convs.
  config, _ = bench_step.benchmark_config(model, 16, 32, "float32",
                                          smoke=True, remat=False,
                                          fast_paths=False)
  assert config.model.name == model and config.fast_paths is False
  assert config.model.kwargs.width_multiplier < 1
  if model.endswith("_nows"):
    assert "standardize" not in config.model.kwargs


def test_bad_benchmark_arguments_are_one_line_errors():
  result = _benchmark("--model=nfnet_f0", "--smoke", "--batch_size=12",
                      "--image_size=32", "--steps=1")
  assert result.returncode != 0
  assert "not divisible by the 8 devices" in result.stderr
  assert "Traceback" not in result.stderr
  result = _benchmark("--model=vgg16")
  assert result.returncode != 0 and "no config family" in result.stderr


def test_input_benchmark_times_each_pipeline_per_core():
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "bench_input.py"),
       "--cores=1", "--sizes=32", "--batch_size=4", "--batches=2", "--json"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
  assert [r["kind"] for r in rows] == ["train", "train_mixing", "eval"]
  for row in rows:
    assert row["size"] == 32 and row["cores"] == 1
    assert row["examples_per_sec"] > 0
    assert row["per_core"] == row["examples_per_sec"]
  bad = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "bench_input.py"),
       "--kinds=train,fast"], cwd=ROOT, capture_output=True, text=True,
      timeout=300, check=False)
  assert bad.returncode != 0 and "unknown --kinds ['fast']" in bad.stderr


def _cheap_compile_env():
  """This environment, with XLA:CPU's classic kernel emitters where this XLA
  has the option (`model_helpers.fast_compile_options`): the census's step
  compiles in half the time."""
  env = dict(os.environ)
  if "xla_cpu_use_fusion_emitters" in model_helpers.fast_compile_options():
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_cpu_use_fusion_emitters=false").strip()
  return env


def test_kernel_census_counts_the_compiled_step():
  # The census reads whatever kernels the backend compiles the step into
  # (on CPU here, as it would a GPU's): the cheaper CPU emitters serve.
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "kernel_census.py"),
       "--target=local", "--model=nfnet_f0", "--smoke", "--batch_size=232",
       "--image_size=32", "--top=5", "--list=stem_conv1/", "--json"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
      env=_cheap_compile_env())
  assert result.returncode == 0, result.stderr[-2000:]
  info = json.loads(result.stdout.strip().splitlines()[-1])
  assert info["target"] == "local" and info["batch_size"] == 232
  kinds = info["by_kind"]
  assert info["kernels"] == sum(k["kernels"] for k in kinds.values())
  assert info["fixed_kernels"] == sum(
      k["kernels"] for name, k in kinds.items() if name.endswith("(fixed)"))
  # Convolutions and their gradients run on activations (29 per device).
  convs = [n for n in kinds if n.startswith("convolution")]
  assert convs and all(n.endswith("(batch)") for n in convs)
  assert 0 < info["fixed_kernels"] < info["kernels"]
  assert info["batch_gbytes"] > 0 and info["fixed_gbytes"] > 0
  assert info["peak_memory_gib"] > 0
  # The heaviest groups of kernels, by bytes moved, largest first.
  sizes = [group["gbytes"] for group in info["top"]]
  assert len(sizes) == 5 and sizes == sorted(sizes, reverse=True)
  assert sizes[0] <= info["batch_gbytes"] + info["fixed_gbytes"]
  # --list: the kernels of one layer, forward and backward, in order.
  listed = info["listed"]
  assert listed and all("stem_conv1/" in k["op"] for k in listed)
  # Forward first (the convolution), then the backward pass.
  assert "transpose(jvp" not in listed[0]["op"]
  assert any("transpose(jvp" in k["op"] for k in listed)
  bad = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "kernel_census.py"),
       "--target=local", "--list=conv("],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert bad.returncode != 0 and "bad --list pattern 'conv('" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_conv_benchmark_times_both_input_gradients():
  script = os.path.join(ROOT, "benchmarks", "bench_conv.py")
  run = lambda *flags: subprocess.run(  # pylint: disable=g-long-lambda
      [sys.executable, script, *flags], cwd=ROOT, capture_output=True,
      text=True, timeout=300, check=False)
  result = run("--batch_size=2", "--image_size=64", "--width_multiplier=0.25",
               "--group_width=16", "--steps=1", "--json")
  assert result.returncode == 0, result.stderr[-2000:]
  info = json.loads(result.stdout.strip().splitlines()[-1])
  # F0's strided stages 2-4 at 64 px: 16x16, 8x8, 4x4 inputs.
  assert [(c["size"], c["channels"], c["groups"]) for c in info["convs"]] == [
      (16, 64, 4), (8, 192, 12), (4, 192, 12)]
  assert all(c["polyphase_ms"] > 0 and c["xla_ms"] > 0
             for c in info["convs"])
  # One training call's MACs, 3x the forward's: batch 2, 8x8 outputs of 64
  # channels, 9 taps of 16 input channels each.
  assert info["convs"][0]["macs"] == 3 * 2 * 8 * 8 * 64 * 9 * 16
  bad = run("--variant=F9")
  assert bad.returncode != 0 and "unknown NFNet variant" in bad.stderr
  assert "Traceback" not in bad.stderr
