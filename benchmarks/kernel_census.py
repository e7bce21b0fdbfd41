"""Counts the kernels of the trainer's compiled step, with or without a GPU.

  python benchmarks/kernel_census.py --model=nfnet_f0 --image_size=192 \
      [--target=h200|h100|local] [--mode=train|eval] [--top=N]
      [--list=REGEX] [--dump=F] [--json]

Compiles the step that `benchmarks/benchmark.py` times (the trainer's own) and
reads XLA's optimized HLO: every instruction of the entry computation that
launches work (a fusion, a library call such as a cuDNN convolution, a copy)
is one kernel. It also prints the program's peak memory from XLA's buffer
assignment (on an H200 it matched the measured peak of the F0 step at batch
256: 15.3 GiB), so the largest batch that fits a GPU can be found without one.
It splits the kernels into those that touch a batch-sized array
(activations: their cost grows with the batch) and the rest (weights,
optimizer state, scalars: a fixed cost per step, which on a GPU is mostly
launch overhead for small kernels), and sums the bytes each reads and writes.

`--target=h100` or `h200` compiles for that GPU on a machine without one
(XLA's deviceless compilation: needs the CUDA plugin, `pip install
"jax[cuda12]"`, but no GPU or driver; kernels are chosen without autotuning).
`--target=local` compiles for the local backend (CPU in the tests).

The batch defaults to 232, a size no channel count or spatial size of the
models equals, so that an array is batch-sized when any of its dimensions is
the batch (per device: the global batch over the device count).
"""

import collections
import json
import os
import re
import sys
import time

from absl import app
from absl import flags

# Runnable from a clone without installing: the repo root on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_TARGET = flags.DEFINE_enum("target", "h200", ["h200", "h100", "local"],
                            "What to compile for.")
_MODEL = flags.DEFINE_string("model", "nfnet_f0", "Registered model name.")
_BATCH = flags.DEFINE_integer("batch_size", 232, "Global batch size.")
_IMAGE = flags.DEFINE_integer("image_size", 192, "Square input resolution.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "Which step.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny widths and depths.")
_REMAT = flags.DEFINE_bool("remat", False, "model.kwargs.remat=True.")
_AUGMENT = flags.DEFINE_bool(
    "augment", True, "Run the recipe's on-device augmentation (MixUp/CutMix,"
    " RandAugment, normalisation; nfnets.augment) in the train step on uint8"
    " crops, as training does; --noaugment feeds ready float images.")
_PLAIN = flags.DEFINE_bool("plain", False, "The plain twins of the fast "
                           "paths (config.fast_paths=False).")
_DUMP = flags.DEFINE_string("dump", None, "Also write the optimized HLO here.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")
_LIST = flags.DEFINE_string(
    "list", None, "Also list, in program order, every kernel whose JAX "
    "operation matches this regular expression (e.g. 'nf_block_5/' for one "
    "block, forward and backward): kind, bytes, result type, operation.")
_TOP = flags.DEFINE_integer(
    "top", 0, "Also list the N groups of kernels that move the most bytes, "
    "by the model code they come from (block numbers folded).")

# Device descriptions for deviceless compilation (XLA's GpuTargetConfig text
# format; vendor figures for the SXM parts).
_GPU_SPECS = {
    "h100": dict(name="NVIDIA H100 80GB HBM3", memory=85_520_000_000,
                 bandwidth=3_350_000_000_000),
    "h200": dict(name="NVIDIA H200", memory=150_100_000_000,
                 bandwidth=4_800_000_000_000),
}

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2,
          "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8,
          "u64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][\w-]*)\((.*)$")
_COMPUTATION = re.compile(r"^%(\S+) \((.*?)\) -> ", re.M)
# Instructions that launch nothing (views, plumbing, control).
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant",
         "after-all", "add-dependency", "opt-barrier", "partition-id",
         "replica-id"}


def _gpu_target_config(spec: dict) -> str:
  """A Hopper (sm_90, 132 SMs) GpuTargetConfig in protobuf text format."""
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152 shared_memory_per_core: 233472
  shared_memory_per_block_optin: 232448 threads_per_core_limit: 2048
  core_count: 132 fpus_per_core: 128 block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {spec["bandwidth"]} l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: {spec["memory"]}
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 9 }}
device_description_str: "{spec["name"]}"
"""


def _arrays(text: str) -> list[tuple[int, tuple[int, ...]]]:
  """(bytes, dims) of every array type written in `text`."""
  out = []
  for dtype, dims in _ARRAY.findall(text):
    shape = tuple(int(d) for d in dims.split(",") if d)
    count = 1
    for d in shape:
      count *= d
    out.append((count * _BYTES[dtype], shape))
  return out


def census(hlo: str, batch_size: int) -> list[dict]:
  """One row per kernel of the entry computation of an optimized HLO module.

  Args:
    hlo: `compiled.as_text()`.
    batch_size: the dimension that marks activations (any axis: gradient
      convolutions see them transposed).

  Returns:
    Dicts with `name`, `kind` (`fusion:kLoop`, `custom-call:<target>`,
    `copy`, ...), `op` (the JAX operation it was made from, as XLA's
    metadata names it), `bytes` (arrays read and written, as far as the text
    shows them) and `batch` (whether any of them is batch-sized).
  """
  computations = {m.group(1): m.group(2) for m in _COMPUTATION.finditer(hlo)}
  values = {}  # Instruction name -> its result type, for operand sizes.
  rows = []
  entry = hlo[hlo.index("\nENTRY"):]
  header, body = entry.split("\n", 1)
  for name, result in re.findall(r"(\S+): (\w+\[[\d,]*\])", header):
    values[name] = result
  for line in body.split("\n"):
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, result, op, rest = match.groups()
    values[name] = result
    if op in _FREE:
      continue
    if op == "fusion":
      kind = "fusion:" + re.search(r"kind=(\w+)", line).group(1)
      called = re.search(r"calls=%([\w.\-]+)", line).group(1)
      inputs = computations.get(called, "")
    else:
      target = re.search(r'custom_call_target="([^"]+)"', line)
      kind = f"custom-call:{target.group(1)}" if target else op
      operands = rest.split(")", 1)[0]
      inputs = " ".join(values.get(n, "")
                        for n in re.findall(r"%([\w.\-]+)", operands))
    arrays = _arrays(result) + _arrays(inputs)
    op_name = re.search(r'op_name="([^"]*)"', line)
    rows.append({
        "name": name, "kind": kind, "result": result,
        "op": op_name.group(1) if op_name else "",
        "bytes": sum(b for b, _ in arrays),
        "batch": any(batch_size in shape for _, shape in arrays),
    })
  return rows


def summarize(rows: list[dict]) -> dict:
  """Kernel and byte totals, overall and per (kind, batch-sized or not)."""
  kinds = collections.defaultdict(lambda: {"kernels": 0, "gbytes": 0.0})
  for row in rows:
    key = f"{row['kind']} ({'batch' if row['batch'] else 'fixed'})"
    kinds[key]["kernels"] += 1
    kinds[key]["gbytes"] += row["bytes"] / 1e9
  by_count = sorted(kinds.items(), key=lambda kv: -kv[1]["kernels"])
  return {
      "kernels": len(rows),
      "fixed_kernels": sum(not r["batch"] for r in rows),
      "batch_gbytes": round(sum(r["bytes"] for r in rows if r["batch"]) /
                            1e9, 3),
      "fixed_gbytes": round(sum(r["bytes"] for r in rows
                                if not r["batch"]) / 1e9, 3),
      "by_kind": {k: {"kernels": v["kernels"],
                      "gbytes": round(v["gbytes"], 3)} for k, v in by_count},
  }


def top_groups(rows: list[dict], count: int) -> list[dict]:
  """The `count` (kind, source) groups of kernels that move the most bytes.

  The source is the operation's name with the jit wrapper dropped and block
  and stem-layer numbers folded (`nf_block_7/conv1` -> `nf_block/conv1`), so
  a group is one layer type across the network; `transpose(jvp(...))` marks
  the backward pass.
  """
  groups = collections.defaultdict(lambda: {"kernels": 0, "bytes": 0})
  for row in rows:
    source = re.sub(r"^jit\([^)]*\)/", "", row["op"])
    source = re.sub(r"(nf_block|block|stem_conv)_?\d+", r"\1", source)
    group = groups[(row["kind"], source, row["batch"])]
    group["kernels"] += 1
    group["bytes"] += row["bytes"]
  ranked = sorted(groups.items(), key=lambda kv: -kv[1]["bytes"])[:count]
  return [{"kind": kind, "source": source or "-", "batch": batch,
           "kernels": g["kernels"], "gbytes": round(g["bytes"] / 1e9, 3)}
          for (kind, source, batch), g in ranked]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    pattern = re.compile(_LIST.value) if _LIST.value else None
  except re.error as e:
    raise SystemExit(f"error: bad --list pattern {_LIST.value!r}: {e}"
                     ) from None
  if _TARGET.value != "local":
    # Deviceless: only the CPU backend starts; the GPU is a description.
    os.environ["JAX_PLATFORMS"] = "cpu"
  # pylint: disable=g-import-not-at-top
  import jax
  from jax.sharding import Mesh
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  import numpy as np
  from benchmarks import step as bench_step
  from nfnets.training import parallel
  # pylint: enable=g-import-not-at-top

  try:
    config, device_augment = bench_step.benchmark_config(
        _MODEL.value, _BATCH.value, _IMAGE.value, smoke=_SMOKE.value,
        remat=_REMAT.value, fast_paths=not _PLAIN.value,
        augment=_AUGMENT.value)
    if _TARGET.value == "local":
      mesh = parallel.make_mesh()
    else:
      mesh = Mesh(np.asarray(_gpu_devices(_TARGET.value)),
                  (parallel.AXIS,))
    parallel.check_batch_size(_BATCH.value, mesh, "batch_size")
  except (ValueError, RuntimeError, NotImplementedError) as e:
    raise SystemExit(f"error: {e}") from None
  step, init = bench_step.make_step(config, _MODE.value, mesh,
                                     device_augment)
  replicated = parallel.replicated_sharding(mesh)
  state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      jax.eval_shape(init, jax.random.PRNGKey(0)))
  batch_sharding = NamedSharding(mesh, P(parallel.AXIS))
  batch = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
           for name, (shape, dtype) in bench_step.batch_shapes(
               config, _MODE.value, device_augment).items()}
  start = time.perf_counter()
  compiled = step.trace(state, batch).lower().compile()
  compile_s = time.perf_counter() - start
  hlo = compiled.as_text()
  memory = compiled.memory_analysis()
  # Each device's program sees its slice of the batch.
  rows = census(hlo, _BATCH.value // mesh.size)
  if _DUMP.value:
    with open(_DUMP.value, "w") as f:
      f.write(hlo)
  result = {"model": config.model.name, "mode": _MODE.value,
            "target": _TARGET.value, "batch_size": _BATCH.value,
            "image_size": _IMAGE.value, "remat": _REMAT.value,
            "augment": _AUGMENT.value,
            "fast_paths": not _PLAIN.value,
            "compile_s": round(compile_s, 1), "jax": jax.__version__,
            # XLA's buffer assignment: arguments, outputs and temporaries at
            # the program's peak (the device's own use comes on top).
            "peak_memory_gib": round(
                getattr(memory, "peak_memory_in_bytes", 0) / 2**30, 2),
            **summarize(rows)}
  if _TOP.value:
    result["top"] = top_groups(rows, _TOP.value)
  if pattern:
    result["listed"] = [
        {"kind": r["kind"], "batch": r["batch"], "bytes": r["bytes"],
         "result": r["result"], "op": r["op"]}
        for r in rows if pattern.search(r["op"])]
  if _JSON.value:
    print(json.dumps(result))
    return
  by_kind = result.pop("by_kind")
  top = result.pop("top", [])
  listed = result.pop("listed", [])
  for key, value in result.items():
    print(f"{key:>14}: {value}")
  print(f"{'kernels':>8} {'GB':>8}  kind")
  for kind, value in by_kind.items():
    print(f"{value['kernels']:8d} {value['gbytes']:8.3f}  {kind}")
  if top:
    print(f"{'kernels':>8} {'GB':>8}  kind, source")
  for group in top:
    print(f"{group['kernels']:8d} {group['gbytes']:8.3f}  {group['kind']} "
          f"({'batch' if group['batch'] else 'fixed'}), {group['source']}")
  if _LIST.value:
    print(f"{len(listed)} kernels match {_LIST.value!r}, "
          f"{sum(k['bytes'] for k in listed) / 1e9:.3f} GB:")
  for k in listed:
    op = re.sub(r"^jit\([^)]*\)/", "", k["op"])
    print(f"{k['bytes'] / 1e6:10.1f} MB  {k['kind']} "
          f"({'batch' if k['batch'] else 'fixed'}) {k['result'][:60]}  {op}")


def _gpu_devices(target: str):
  """Compile-only devices of one GPU of `target`, with no GPU present."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topology = topologies.get_topology_desc(
        platform="cuda", topology_name=target, topology="1x1x1",
        target_config=_gpu_target_config(_GPU_SPECS[target]))
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
        f"cannot compile for {target} here ({str(e).splitlines()[0]}); "
        'install the CUDA plugin (pip install "jax[cuda12]") or use '
        "--target=local") from None
  return topology.devices


if __name__ == "__main__":
  app.run(main)
