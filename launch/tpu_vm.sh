#!/usr/bin/env bash
# Train admin-jax on a Cloud TPU VM or pod slice with gcloud.
# Run `launch/tpu_vm.sh --help` for the usage; docs/RUNNING.md has examples.
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$LAUNCH_DIR/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh COMMAND [options] [--config.KEY=VALUE ...] [-- TRAIN_ARGS ...]

Create a Cloud TPU VM or pod slice, install admin-jax on every worker, train on
all workers at once and stream worker 0's log, and delete the slice.

Commands:
  check      on this machine, compile the config's train step for
             --accelerator-type without a TPU (python -m admin_jax.compile):
             stops here, non-zero, if it does not fit the slice's chips
  create     create the TPU VM / pod slice
  install    copy --src (or git clone --repo-url) to ~/admin-jax on every
             worker, make the virtual environment ~/admin-jax/.venv with
             --remote-python, then pip install 'jax[tpu]==VERSION' and -e '.[gcs]'
  train      start training on all workers in the background (nohup, log in
             ~/admin-jax-train.log on each worker), then stream worker 0's log
  logs       stream worker 0's log until its training process exits
  stop       stop the training process on all workers
  delete     delete the TPU VM / pod slice
  all        check, create, install, train (with --delete: then delete)

Options (environment variable defaults in brackets):
  --name NAME               TPU name [TPU_NAME] (default: admin-jax)
  --zone ZONE               zone [TPU_ZONE] (default: us-central2-b)
  --accelerator-type TYPE   e.g. v4-8, v4-32, v5litepod-16, v5p-8, v6e-8
                            [TPU_ACCELERATOR_TYPE] (default: v4-8)
  --runtime-version V       TPU software version [TPU_RUNTIME_VERSION]
                            (default from the type: tpu-ubuntu2204-base for
                            v2-v4, v2-alpha-tpuv5-lite for v5e,
                            v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e)
  --project PROJECT         GCP project (default: gcloud's configured one)
  --spot                    create a Spot TPU
  --config PATH[:ARG]       config file, relative to the repository
                            (default: configs/default.py)
  --workdir DIR             checkpoints and logs; use a gs:// path on a
                            multi-host slice (required by train and all)
  --src DIR                 local checkout to copy to the workers
                            (default: the repository holding this script)
  --repo-url URL            git clone URL on every worker instead of --src
  --ref REF                 git ref to check out after cloning --repo-url
  --jax-version V           version for 'jax[tpu]' [JAX_VERSION] (default:
                            the jax pin in requirements.txt or pyproject.toml
                            of --src)
  --remote-python PY        interpreter for the workers' virtual environment
                            (default: python3.11); a missing PY is installed
                            with apt-get install PY PY-venv
  --no-check                all: skip the check
  --python PY               interpreter for the check on this machine
                            (default: python3)
  --no-follow               train: do not stream the log after starting
  --delete                  delete the slice after the other steps; after
                            train it waits until training ends. Alone, the
                            same as the delete command.
  --dry-run                 print the commands, one per line, without
                            running any of them
  -h, --help                show this help

Arguments starting with --config. are config overrides; they and everything
after -- are passed to `python -m admin_jax.train` unchanged.

Example:
  launch/tpu_vm.sh all --accelerator-type=v4-32 --zone=us-central2-b \
    --name=admin-v4 --workdir=gs://my-bucket/runs/admin6l \
    --config.train.num_steps=100000 --delete
EOF
}

# ----- Defaults ---------------------------------------------------------------

COMMAND=''
NAME=${TPU_NAME:-admin-jax}
ZONE=${TPU_ZONE:-us-central2-b}
ACCELERATOR_TYPE=${TPU_ACCELERATOR_TYPE:-v4-8}
RUNTIME_VERSION=${TPU_RUNTIME_VERSION:-}
PROJECT=''
SPOT=0
CONFIG=configs/default.py
WORKDIR=''
SRC_DIR=$(cd "$LAUNCH_DIR/.." && pwd)
REPO_URL=''
REF=''
JAX_VERSION=${JAX_VERSION:-}
# The TPU VM images ship Python 3.10; the project needs 3.11 or newer.
REMOTE_PYTHON=python3.11
FOLLOW=1
DELETE=0
CHECK=1
LOCAL_PYTHON=python3
CONFIG_OVERRIDES=()  # --config.* overrides, for the check and for training
TRAIN_ARGS=()  # --config.* overrides and arguments after --

# On each worker, paths relative to the home directory (the virtual
# environment's path is relative to REMOTE_DIR).
REMOTE_DIR=admin-jax
VENV_PYTHON=.venv/bin/python
REMOTE_TARBALL=admin-jax-src.tar.gz
REMOTE_LOG=admin-jax-train.log
REMOTE_PID=admin-jax-train.pid

# Where pip finds libtpu for older jax releases (newer ones take it from PyPI).
LIBTPU_FIND_LINKS=https://storage.googleapis.com/jax-releases/libtpu_releases.html

# ----- Arguments --------------------------------------------------------------

while (($#)); do
  case $1 in
    check | create | install | train | logs | stop | delete | all)
      [[ -z $COMMAND ]] || die "only one command may be given (got $COMMAND and $1)"
      COMMAND=$1
      shift
      ;;
    --name | --name=*) opt_value "$@"; NAME=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --zone | --zone=*) opt_value "$@"; ZONE=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --accelerator-type | --accelerator-type=*) opt_value "$@"; ACCELERATOR_TYPE=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --runtime-version | --runtime-version=*) opt_value "$@"; RUNTIME_VERSION=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --project | --project=*) opt_value "$@"; PROJECT=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --config | --config=*) opt_value "$@"; CONFIG=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --workdir | --workdir=*) opt_value "$@"; WORKDIR=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --src | --src=*) opt_value "$@"; SRC_DIR=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --repo-url | --repo-url=*) opt_value "$@"; REPO_URL=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --ref | --ref=*) opt_value "$@"; REF=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --jax-version | --jax-version=*) opt_value "$@"; JAX_VERSION=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --remote-python | --remote-python=*) opt_value "$@"; REMOTE_PYTHON=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --python | --python=*) opt_value "$@"; LOCAL_PYTHON=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --spot) SPOT=1; shift ;;
    --no-follow) FOLLOW=0; shift ;;
    --no-check) CHECK=0; shift ;;
    --delete) DELETE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --config.*) CONFIG_OVERRIDES+=("$1"); TRAIN_ARGS+=("$1"); shift ;;
    --) shift; TRAIN_ARGS+=("$@"); break ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

# `--delete` on its own means the delete command.
if [[ -z $COMMAND && $DELETE == 1 ]]; then
  COMMAND=delete
  DELETE=0
fi
[[ -n $COMMAND ]] || { usage >&2; die "missing COMMAND"; }
[[ -n $NAME && -n $ZONE ]] || die "--name and --zone must not be empty"
if [[ $COMMAND == train || $COMMAND == all ]]; then
  [[ -n $WORKDIR ]] || die "$COMMAND needs --workdir (a gs:// path on a multi-host slice)"
  [[ $FOLLOW == 1 || $DELETE == 0 ]] || die "--delete waits for training through the log stream; drop --no-follow"
fi

# Default runtime (TPU software) version for the accelerator generation,
# as listed on https://cloud.google.com/tpu/docs/runtimes.
if [[ -z $RUNTIME_VERSION ]]; then
  case $ACCELERATOR_TYPE in
    v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
  esac
fi

# Flags every `gcloud compute tpus tpu-vm` command takes.
GCLOUD_FLAGS=("--zone=$ZONE")
if [[ -n $PROJECT ]]; then
  GCLOUD_FLAGS+=("--project=$PROJECT")
fi

# ----- Helpers ----------------------------------------------------------------

# Run a shell command line on the workers: ssh_workers WORKER COMMAND_LINE,
# where WORKER is `all` or a worker index.
ssh_workers() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker="$1" --command "$2"
}

# Print the jax version pinned (jax==V or jax[extra]==V) in requirements.txt
# or pyproject.toml of --src; print nothing when neither pins it.
read_jax_pin() {
  local pin_re='(^|[^A-Za-z0-9_.-])jax(\[[^]]*\])?[[:space:]]*==[[:space:]]*([0-9][A-Za-z0-9.+!-]*)'
  local file line
  for file in "$SRC_DIR/requirements.txt" "$SRC_DIR/pyproject.toml"; do
    [[ -f $file ]] || continue
    while IFS= read -r line; do
      line=${line%%#*}  # drop comments
      if [[ $line =~ $pin_re ]]; then
        echo "${BASH_REMATCH[3]}"
        return
      fi
    done <"$file"
  done
}

# ----- Steps ------------------------------------------------------------------

do_check() {
  # Compile the run's train step for the slice on this machine (libtpu, no TPU): a config that does not fit
  # its chips, or whose batch does not split over them, stops here, before a slice is paid for.
  (cd "$SRC_DIR" && run "$LOCAL_PYTHON" -m admin_jax.compile "--config=$CONFIG" "--target=$ACCELERATOR_TYPE" \
    "${CONFIG_OVERRIDES[@]}")
}

do_create() {
  local cmd=(gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_FLAGS[@]}"
    "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION")
  if [[ $SPOT == 1 ]]; then
    cmd+=(--spot)
  fi
  run "${cmd[@]}"
}

do_install() {
  if [[ -z $JAX_VERSION ]]; then
    JAX_VERSION=$(read_jax_pin)
  fi
  [[ -n $JAX_VERSION ]] ||
    die "no jax==VERSION pin in $SRC_DIR/requirements.txt or pyproject.toml; pass --jax-version"

  # 1. Put the source in ~/admin-jax on every worker (a fresh copy each time).
  local fetch
  if [[ -n $REPO_URL ]]; then
    fetch="rm -rf $REMOTE_DIR && git clone $(quote "$REPO_URL") $REMOTE_DIR"
    if [[ -n $REF ]]; then
      fetch+=" && git -C $REMOTE_DIR checkout $(quote "$REF")"
    fi
  else
    # Pack the working tree (uncommitted changes included, local build
    # outputs and virtual environments left out) and copy it to the workers.
    [[ -d $SRC_DIR ]] || die "--src $SRC_DIR is not a directory"
    local tarball=${TMPDIR:-/tmp}/admin-jax-src-$NAME.tar.gz
    run tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=__pycache__ \
      --exclude='*.egg-info' --exclude=.pytest_cache --exclude=workdirs --exclude=runs \
      --exclude=.whl -C "$SRC_DIR" .
    run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:$REMOTE_TARBALL" "${GCLOUD_FLAGS[@]}" --worker=all
    run rm -f "$tarball"
    fetch="rm -rf $REMOTE_DIR && mkdir $REMOTE_DIR && tar -xzf $REMOTE_TARBALL -C $REMOTE_DIR && rm $REMOTE_TARBALL"
  fi

  # 2. Make sure the interpreter exists; install it with apt-get if not.
  local py
  py=$(quote "$REMOTE_PYTHON")
  local get_python
  get_python="if ! command -v $py >/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq $py $(quote "$REMOTE_PYTHON-venv"); fi"

  # 3. In a fresh virtual environment: jax for TPU at the pinned version,
  #    then the project itself.
  local pip_jax
  pip_jax=$(quote_cmd "$VENV_PYTHON" -m pip install "jax[tpu]==$JAX_VERSION" -f "$LIBTPU_FIND_LINKS")
  ssh_workers all "$fetch && $get_python && cd $REMOTE_DIR && $py -m venv .venv && $pip_jax && $VENV_PYTHON -m pip install -e '.[gcs]'"
}

do_train() {
  local train_cmd=("$VENV_PYTHON" -m admin_jax.train "--config=$CONFIG" "--workdir=$WORKDIR" "${TRAIN_ARGS[@]}")
  # Start in the background on every worker, immune to the ssh session
  # closing; `exec` makes the saved pid that of the Python process. Every
  # worker runs the same command: jax.distributed.initialize() finds the
  # other workers of the slice by itself.
  ssh_workers all "(cd $REMOTE_DIR && exec nohup $(quote_cmd "${train_cmd[@]}")) >$REMOTE_LOG 2>&1 </dev/null & echo \$! >$REMOTE_PID"
  if [[ $FOLLOW == 1 ]]; then
    do_logs
  fi
}

do_logs() {
  # Follow worker 0's log; tail stops once the training process has exited.
  ssh_workers 0 "tail -n +1 -F --pid=\"\$(cat $REMOTE_PID)\" $REMOTE_LOG"
}

do_stop() {
  ssh_workers all "kill \"\$(cat $REMOTE_PID)\" || true"
}

do_delete() {
  run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet
}

# ----- Main -------------------------------------------------------------------

case $COMMAND in
  check) do_check ;;
  create) do_create ;;
  install) do_install ;;
  train) do_train ;;
  logs) do_logs ;;
  stop) do_stop ;;
  delete) do_delete ;;
  all)
    if [[ $CHECK == 1 ]]; then
      do_check
    fi
    do_create
    do_install
    do_train
    ;;
esac

if [[ $DELETE == 1 && $COMMAND != delete ]]; then
  do_delete
fi
