#!/usr/bin/env bash
# Train (and optionally evaluate) admin-jax on this machine, on CPU or GPU.
# Run `launch/local.sh --help` for the usage.
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$LAUNCH_DIR/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/local.sh --workdir DIR [options] [--config.KEY=VALUE ...] [-- TRAIN_ARGS ...]

Train on this machine with `python -m admin_jax.train`, then optionally run
`python -m admin_jax.evaluate` on the same config and workdir. Run it from the
repository root (config paths are relative to the current directory).

Options:
  --config PATH[:ARG]   config file (default: configs/default.py)
  --workdir DIR         checkpoints and logs (required)
  --cpu                 run on CPU (sets JAX_PLATFORMS=cpu)
  --gpu                 run on GPU (sets JAX_PLATFORMS=cuda)
                        without either, JAX picks the platform itself
  --evaluate            run admin_jax.evaluate after training
  --python PYTHON       interpreter [PYTHON] (default: python)
  --dry-run             print the commands, one per line, without running them
  -h, --help            show this help

Arguments starting with --config. are config overrides, passed to train and
evaluate; arguments after -- are passed to train only.

Example:
  launch/local.sh --cpu --config=configs/default.py --workdir=workdirs/smoke \
    --config.data.source=synthetic --evaluate
EOF
}

# ----- Defaults and arguments -------------------------------------------------

CONFIG=configs/default.py
WORKDIR=''
PLATFORM=''  # value for JAX_PLATFORMS; empty leaves it unset
EVALUATE=0
PYTHON=${PYTHON:-python}
OVERRIDES=()   # --config.* arguments, for train and evaluate
TRAIN_EXTRA=() # arguments after --, for train only

while (($#)); do
  case $1 in
    --config | --config=*) opt_value "$@"; CONFIG=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --workdir | --workdir=*) opt_value "$@"; WORKDIR=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --python | --python=*) opt_value "$@"; PYTHON=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --cpu) PLATFORM=cpu; shift ;;
    --gpu) PLATFORM=cuda; shift ;;
    --evaluate) EVALUATE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --config.*) OVERRIDES+=("$1"); shift ;;
    --) shift; TRAIN_EXTRA+=("$@"); break ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

[[ -n $WORKDIR ]] || die "--workdir is required"

# Commands start with `env JAX_PLATFORMS=...` when a platform was chosen, so
# that what --dry-run prints is exactly what runs.
PREFIX=()
if [[ -n $PLATFORM ]]; then
  PREFIX=(env "JAX_PLATFORMS=$PLATFORM")
fi

# ----- Run --------------------------------------------------------------------

run "${PREFIX[@]}" "$PYTHON" -m admin_jax.train "--config=$CONFIG" "--workdir=$WORKDIR" \
  "${OVERRIDES[@]}" "${TRAIN_EXTRA[@]}"

if [[ $EVALUATE == 1 ]]; then
  run "${PREFIX[@]}" "$PYTHON" -m admin_jax.evaluate "--config=$CONFIG" "--workdir=$WORKDIR" \
    "${OVERRIDES[@]}"
fi
