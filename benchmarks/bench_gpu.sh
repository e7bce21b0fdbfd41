#!/usr/bin/env bash
# The GPU benchmark matrix behind BENCHMARKS.md, as one script for a machine
# with no registry access: it installs the few missing pure-Python packages
# from wheels in .whl/ (copied from ../shared/wheels), prints the machine, then
# one JSON line per configuration (also appended to $OUT/bench.jsonl if set).
# Runs are ordered by importance, so a run cut short by the time limit still
# has the headline figures.
#
#   bash benchmarks/bench_gpu.sh            # on the GPU machine, from the repo root
#
# Fast paths against their plain twins (nfnets/ops): the headline step is
# timed three times each way, alternating, so the difference can be read
# against the run-to-run noise.
set -u
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# Autotuning results shared by the runs: the same kernels are not re-tuned.
base_flags="--xla_gpu_per_fusion_autotune_cache_dir=/tmp/xla_autotune"
# (XLA aborts on a flag it does not know: drop it if this XLA lacks it.)
XLA_FLAGS="$base_flags" python3 -c "import jax; jax.numpy.zeros(1).block_until_ready()" \
  > /dev/null 2>&1 || base_flags=""
export XLA_FLAGS="$base_flags"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, optax, haiku; print('jax', jax.__version__, 'optax', optax.__version__, 'haiku', haiku.__version__, jax.devices())"
log=${OUT:-/tmp}/bench.jsonl
bench() { python3 benchmarks/benchmark.py --json "$@" 2>/tmp/err.txt | tee -a "$log" || tail -3 /tmp/err.txt; }
f0="--model=nfnet_f0 --image_size=192"
# The headline run also records a 3-step profile after its timing; its
# summary per kernel says where the F0 step's time goes.
trace_dir=${OUT:-/tmp}/trace
bench $f0 --batch_size=256 --steps=30 --trace_dir="$trace_dir"
trace=$(find "$trace_dir" -name "*trace.json.gz" 2>/dev/null | head -1)
[ -n "$trace" ] && python3 benchmarks/kernel_times.py "$trace" --top=40
for repeat in 1 2 3; do
  bench $f0 --batch_size=256 --steps=30 --plain
  [ $repeat -lt 3 ] && bench $f0 --batch_size=256 --steps=30
done
# The step's on-device augmentation alone (MixUp/CutMix + RandAugment 4x5 of
# 512 crops): its share of the step above; and the step without it.
bench $f0 --batch_size=256 --steps=30 --mode=augment
bench $f0 --batch_size=256 --steps=30 --noaugment
# The strided grouped convolutions' input gradient: polyphase (the models')
# against XLA's zero-interleaved one, forward + backward, F0 at batch 256.
python3 benchmarks/bench_conv.py --batch_size=256 --image_size=192 --json \
  2>/tmp/err.txt | tee -a "$log" || tail -3 /tmp/err.txt
bench --model=nfnet_f0 --batch_size=256 --image_size=256 --steps=20 --mode=eval
# Diagnostic: the same step without CUDA graphs (XLA's command buffers, which
# group the kernels between convolutions). How much slower it gets says how
# much per-kernel launch cost remains, i.e. what fewer kernels would buy.
echo "XLA_FLAGS: no command buffers:"
XLA_FLAGS="$base_flags --xla_gpu_enable_command_buffer=" \
  bench $f0 --batch_size=256 --steps=30
bench $f0 --batch_size=512 --steps=20
# Memory: the same step with rematerialised blocks, then the largest batches
# (an out-of-memory failure prints its last error lines instead of JSON).
bench $f0 --batch_size=256 --steps=20 --remat
bench $f0 --batch_size=1024 --steps=5
bench $f0 --batch_size=2048 --steps=5 --remat
