#!/usr/bin/env bash
# The GPU benchmark matrix behind BENCHMARKS.md, as one script for a machine
# with no registry access: it installs the few missing pure-Python packages
# from wheels in .whl/ (copied from ../shared/wheels), prints the machine, then
# one JSON line per configuration (also appended to $OUT/bench.jsonl if set).
#
#   bash scripts/bench_gpu.sh            # on the GPU machine, from the repo root
set -u
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, optax, haiku; print('jax', jax.__version__, 'optax', optax.__version__, 'haiku', haiku.__version__, jax.devices())"
log=${OUT:-/tmp}/bench.jsonl
bench() { python3 scripts/benchmark.py --json "$@" 2>/tmp/err.txt | tee -a "$log" || tail -3 /tmp/err.txt; }
bench --model=nfnet_f0 --batch_size=256 --image_size=192 --steps=30
bench --model=nfnet_f0 --batch_size=256 --image_size=256 --steps=20 --mode=eval
bench --model=nfnet_f0 --batch_size=512 --image_size=192 --steps=15
# Memory: the same step with rematerialised blocks, then the largest batches
# (an out-of-memory failure prints its last error lines instead of JSON).
bench --model=nfnet_f0 --batch_size=256 --image_size=192 --steps=20 --remat
for batch in 1024 2048; do
  bench --model=nfnet_f0 --batch_size=$batch --image_size=192 --steps=5
  bench --model=nfnet_f0 --batch_size=$batch --image_size=192 --steps=5 --remat
done
# Where the F0 step's time goes: a 3-step profile summed per kernel.
trace_dir=${OUT:-/tmp}/trace
python3 scripts/benchmark.py --model=nfnet_f0 --batch_size=256 --image_size=192 \
  --steps=10 --trace_dir="$trace_dir" > /dev/null 2>/tmp/err.txt || tail -3 /tmp/err.txt
trace=$(find "$trace_dir" -name "*trace.json.gz" | head -1)
[ -n "$trace" ] && python3 scripts/kernel_times.py "$trace" --top=40
