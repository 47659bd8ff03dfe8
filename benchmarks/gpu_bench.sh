#!/usr/bin/env bash
# The Admin training benchmark on one GPU, several runs in one command, from the repository root.
# Each argument is one run: a config of configs/bench/ by name, then `admin_jax.bench` flags and config
# overrides; no argument runs base6, big6 and big18.
#
#   bash benchmarks/gpu_bench.sh                                   # base6, big6, big18
#   bash benchmarks/gpu_bench.sh base6 'base6 --config.train.prng_impl=rbg' 'base6 --trace_dir=/tmp/trace'
#   STEPS=30 XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true bash benchmarks/gpu_bench.sh big18
#
# Wheels in .whl/, if any, are installed into /tmp/site first (for a Python that lacks the requirements
# and cannot reach an index). Each run is its own process under RUN_TIMEOUT seconds, so a run
# that fails, runs out of memory or of time costs only its own line, and peak_memory_bytes (the
# allocator's peak of the process) is that run's own. JSON lines go to stdout and to $OUT/bench.jsonl
# (OUT defaults to /tmp/admin_bench); every run's stderr goes to $OUT/runs.log. A run with
# --trace_dir=DIR also leaves DIR/ops.csv as $OUT/RUN.ops.csv and DIR/hlo.txt compressed as
# $OUT/RUN.hlo.txt.xz (RUN is the run's number), so that one folder holds every result.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

if [ $# -eq 0 ]; then
  set -- base6 big6 big18
fi
STEPS=${STEPS:-20}
RUN_TIMEOUT=${RUN_TIMEOUT:-150}
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

number=0
for spec in "$@"; do
  number=$((number + 1))
  read -r -a words <<<"$spec"
  config=configs/bench/${words[0]}.py
  echo "=== run $number: $spec" >>"$LOGS/runs.log"
  start=$SECONDS
  timeout "$RUN_TIMEOUT" python3 -m admin_jax.bench --config="$config" --steps="$STEPS" "${words[@]:1}" \
    2>>"$LOGS/runs.log" | tee -a "$LOGS/bench.jsonl"
  status=${PIPESTATUS[0]}
  if [ "$status" -ne 0 ]; then
    error="exit status $status"
    [ "$status" -eq 124 ] && error="timed out after ${RUN_TIMEOUT}s"
    echo "{\"run\": \"$spec\", \"error\": \"$error\"}" | tee -a "$LOGS/bench.jsonl"
    tail -n 5 "$LOGS/runs.log"
  fi
  echo "=== run $number took $((SECONDS - start)) s" >>"$LOGS/runs.log"
  for word in "${words[@]:1}"; do
    if [[ $word == --trace_dir=* ]]; then
      trace_dir=${word#--trace_dir=}
      cp "$trace_dir/ops.csv" "$LOGS/$number.ops.csv" 2>/dev/null
      xz -c "$trace_dir/hlo.txt" >"$LOGS/$number.hlo.txt.xz" 2>/dev/null
    fi
  done
done
