#!/usr/bin/env bash
# The Admin training benchmark on one GPU, all in one device call, from the repository root:
#
#   bash benchmarks/gpu_bench.sh                       # base6, big6, big18
#   PRESETS="big6 big18" STEPS=30 bash benchmarks/gpu_bench.sh
#   XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true bash benchmarks/gpu_bench.sh
#
# With the device tool: run(command='bash benchmarks/gpu_bench.sh', carry=['.whl'], timeout_s=540).
# The CUDA image has jax, flax, optax, absl and tqdm but not ml_collections: carry it as a wheel in
# .whl/ (docs/PERF.md says how). Each preset runs in its own process under PRESET_TIMEOUT seconds,
# so a big18 that runs out of memory or time costs only its own line, and peak_memory_bytes (the
# allocator's peak of the process) is that preset's own. JSON lines go to stdout and, when the
# device tool sets OUT, to $OUT/bench.jsonl; each preset's stderr goes to $OUT/PRESET.log.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PRESETS=${PRESETS:-base6 big6 big18}
STEPS=${STEPS:-20}
PRESET_TIMEOUT=${PRESET_TIMEOUT:-150}
LOGS=${OUT:-/tmp/admin_bench}
mkdir -p "$LOGS"

if compgen -G '.whl/*.whl' >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
  "optax", optax.__version__, jax.devices(), "XLA_FLAGS=" + __import__("os").environ.get("XLA_FLAGS", ""))' \
  || exit 1

for preset in $PRESETS; do
  timeout "$PRESET_TIMEOUT" python3 -m admin_jax.bench --preset="$preset" --steps="$STEPS" \
    2>"$LOGS/$preset.log" | tee -a "$LOGS/bench.jsonl"
  status=${PIPESTATUS[0]}
  if [ "$status" -ne 0 ]; then
    error="exit status $status"
    [ "$status" -eq 124 ] && error="timed out after ${PRESET_TIMEOUT}s"
    echo "{\"preset\": \"$preset\", \"error\": \"$error\"}" | tee -a "$LOGS/bench.jsonl"
    tail -n 5 "$LOGS/$preset.log"
  fi
done
