#!/usr/bin/env bash
# Cloud TPU VM launcher for PixelDiT: create / setup / run / logs / stop / delete.
# Every setting is an environment variable (defaults below); DRY_RUN=1 prints the environment,
# the command and the gcloud calls instead of running them.
set -euo pipefail

usage() {
  cat <<EOF
Usage: [VAR=value ...] $0 {create|setup|sync|run|logs|stop|delete} [--config.field=value ...]

  create   create the TPU VM (SPOT=1 for a spot VM)
  setup    copy the repo to every worker (git clone if REPO_URL is set, else scp of this
           checkout), then build a Python ${PYTHON_VERSION} venv with requirements.txt and jax[tpu]
  sync     copy the code again without reinstalling (scp mode only)
  run      start training on every worker in the background (nohup), with PIXELDIT_DISTRIBUTED=1
           (jax.distributed); extra arguments are passed through, quoted, as config overrides.
           With CHECKPOINT set it samples that checkpoint (--checkpoint; MODULE defaults to
           pixeldit_jax.sample) instead of training in WORKDIR
  logs     follow the log of worker LOG_WORKER
  stop     kill the run started by 'run' on every worker
  delete   delete the TPU VM

Variables (current value):
  TPU_NAME=$TPU_NAME  ZONE=$ZONE  PROJECT=${PROJECT:-<gcloud default>}
  ACCELERATOR_TYPE=$ACCELERATOR_TYPE  RUNTIME_VERSION=$RUNTIME_VERSION  SPOT=$SPOT
  CONFIG=$CONFIG  WORKDIR=${WORKDIR:-<required for run>}  MODULE=$MODULE
  CHECKPOINT=${CHECKPOINT:-<unset: train or sample WORKDIR>}
  REPO_URL=${REPO_URL:-<unset: scp this checkout>}  REPO_REF=${REPO_REF:-<default branch>}
  REMOTE_DIR=~/$REMOTE_DIR  VENV=~/$VENV  LOG_FILE=~/$LOG_FILE  LOG_WORKER=$LOG_WORKER
  REMOTE_ENV=${REMOTE_ENV:-<none>} (e.g. 'LIBTPU_INIT_ARGS=--flag=value', put before python)
  DRY_RUN=$DRY_RUN (1: print the environment, the command and the gcloud calls; run nothing)

Example:
  TPU_NAME=pix ZONE=us-east5-a $0 create && $0 setup
  WORKDIR=gs://my-bucket/pixeldit_xl256 $0 run --config.batch_size=512
EOF
}

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

TPU_NAME="${TPU_NAME:-pixeldit}"
ZONE="${ZONE:-us-east5-a}"            # must be a zone that offers ACCELERATOR_TYPE
PROJECT="${PROJECT:-}"                # empty: gcloud's configured project
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-32}"
SPOT="${SPOT:-0}"
# Each TPU generation has its own VM image; pick the matching one unless given.
case "$ACCELERATOR_TYPE" in
  v5litepod-*|v5e-*) default_runtime=v2-alpha-tpuv5-lite ;;
  v5p-*)             default_runtime=v2-alpha-tpuv5 ;;
  v6e-*)             default_runtime=v2-alpha-tpuv6e ;;
  *)                 default_runtime=tpu-ubuntu2204-base ;;
esac
RUNTIME_VERSION="${RUNTIME_VERSION:-$default_runtime}"
CONFIG="${CONFIG:-configs/imagenet256_xl.py}"
WORKDIR="${WORKDIR:-}"
CHECKPOINT="${CHECKPOINT:-}"          # sample this checkpoint (--checkpoint, no --workdir)
if [[ -n "$CHECKPOINT" ]]; then MODULE="${MODULE:-pixeldit_jax.sample}"; else MODULE="${MODULE:-pixeldit_jax.main}"; fi
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-}"
REMOTE_DIR="${REMOTE_DIR:-pixeldit}"   # relative to the remote home directory
VENV="${VENV:-pixeldit-venv}"          # relative to the remote home directory
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
LOG_FILE="${LOG_FILE:-pixeldit.log}"
LOG_WORKER="${LOG_WORKER:-0}"
REMOTE_ENV="${REMOTE_ENV:-}"
DRY_RUN="${DRY_RUN:-0}"

q() { printf '%q' "$1"; }   # quote one word for the remote shell

# Print (DRY_RUN=1) or run a command.
x() {
  if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

GCLOUD_ARGS=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && GCLOUD_ARGS+=(--project="$PROJECT")

# Run a shell snippet on the given worker(s) ("all" or an index).
on_workers() {
  x gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_ARGS[@]}" --worker="$1" --command="$2"
}

# Copy this checkout (tracked + untracked-but-not-ignored files, so no .venv or workdir/) to
# every worker. A tarball keeps it to one scp per worker.
sync_code() {
  local tmp tgz
  tmp="$(mktemp -d "${TMPDIR:-/tmp}/pixeldit-src.XXXXXX")"; tgz="$tmp/src.tgz"
  # Skip tracked files deleted in the work tree, which tar would fail on.
  git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do if [[ -e "$REPO_ROOT/$f" ]]; then printf '%s\0' "$f"; fi; done \
    | tar -C "$REPO_ROOT" --null -T - -czf "$tgz"
  x gcloud compute tpus tpu-vm scp "$tgz" "$TPU_NAME:pixeldit-src.tgz" "${GCLOUD_ARGS[@]}" --worker=all
  rm -rf "$tmp"
  on_workers all "set -e; mkdir -p ~/$(q "$REMOTE_DIR") && tar -xzf ~/pixeldit-src.tgz -C ~/$(q "$REMOTE_DIR") && rm ~/pixeldit-src.tgz"
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  create)
    spot=()
    [[ "$SPOT" == 1 ]] && spot=(--spot)
    x gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_ARGS[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" ${spot[@]+"${spot[@]}"}
    ;;
  setup)
    if [[ -n "$REPO_URL" ]]; then
      fetch="if [ -d ~/$(q "$REMOTE_DIR")/.git ]; then git -C ~/$(q "$REMOTE_DIR") fetch -q origin; \
else git clone -q $(q "$REPO_URL") ~/$(q "$REMOTE_DIR"); fi"
      [[ -n "$REPO_REF" ]] && fetch+="; git -C ~/$(q "$REMOTE_DIR") checkout -q $(q "$REPO_REF")"
      on_workers all "set -e; $fetch"
    else
      sync_code
    fi
    # The TPU images ship Python 3.10 but the pins need >= 3.11: a python3 -m venv only hosts
    # uv, and uv builds the project venv on a managed Python ${PYTHON_VERSION}.
    on_workers all "set -e
python3 -m venv ~/.pixeldit-uv && ~/.pixeldit-uv/bin/pip install -q -U uv
UV=~/.pixeldit-uv/bin/uv
[ -x ~/$(q "$VENV")/bin/python ] || \$UV venv -q --python $(q "$PYTHON_VERSION") ~/$(q "$VENV")
cd ~/$(q "$REMOTE_DIR")
\$UV pip install -q --python ~/$(q "$VENV")/bin/python -r requirements.txt
\$UV pip install -q --python ~/$(q "$VENV")/bin/python 'jax[tpu]==0.10.2'
~/$(q "$VENV")/bin/python -c 'import jax; print(\"jax\", jax.__version__)'"
    ;;
  sync)
    [[ -z "$REPO_URL" ]] || { echo "sync copies this checkout; with REPO_URL set use: $0 setup" >&2; exit 1; }
    sync_code
    ;;
  run)
    if [[ -n "$CHECKPOINT" ]]; then
      [[ "$MODULE" == pixeldit_jax.sample ]] || { echo "CHECKPOINT is for sampling (MODULE=pixeldit_jax.sample);" \
        "to start training from a checkpoint pass --config.train.init_from=DIR" >&2; exit 2; }
      run_dir="--checkpoint=$CHECKPOINT"; shared="$CHECKPOINT"
    else
      [[ -n "$WORKDIR" ]] || { echo "WORKDIR is required (gs://bucket/path for multi-host slices)," \
        "or CHECKPOINT to sample a checkpoint" >&2; exit 2; }
      run_dir="--workdir=$WORKDIR"; shared="$WORKDIR"
    fi
    [[ "$shared" == gs://* ]] || echo "warning: ${run_dir%%=*} is not gs://; on a multi-host slice every" \
      "worker reads and writes its own local copy; multi-host runs need shared storage" >&2
    args=""
    for a in "--config=$CONFIG" "$run_dir" "$@"; do args+=" $(q "$a")"; done
    # Every worker starts jax.distributed (PIXELDIT_DISTRIBUTED=1: a bare initialize(), which
    # reads the slice's workers from the TPU VM metadata).
    python_cmd="env PIXELDIT_DISTRIBUTED=1 ${REMOTE_ENV:+$REMOTE_ENV }~/$(q "$VENV")/bin/python -m $(q "$MODULE")$args"
    if [[ "$DRY_RUN" == 1 ]]; then
      echo "# tpu_vm.sh dry run: on every worker of $TPU_NAME ($ACCELERATOR_TYPE), in ~/$REMOTE_DIR:"
      echo "export PIXELDIT_DISTRIBUTED=1"
      [[ -z "$REMOTE_ENV" ]] || echo "export $REMOTE_ENV"
      echo "$python_cmd"
      echo "# gcloud:"
    fi
    # setsid+nohup and closed stdin so the process survives the ssh session ending; refuse to
    # start a second run while one is alive (it would fail to grab the TPU anyway).
    on_workers all "cd ~/$(q "$REMOTE_DIR") || exit 1
if [ -f ~/pixeldit.pid ] && kill -0 \$(cat ~/pixeldit.pid) 2>/dev/null; then echo \"already running on \$(hostname)\"; exit 1; fi
setsid nohup $python_cmd > ~/$(q "$LOG_FILE") 2>&1 < /dev/null &
echo \$! > ~/pixeldit.pid; echo \"started pid \$! on \$(hostname), log ~/$(q "$LOG_FILE")\""
    ;;
  logs)
    on_workers "$LOG_WORKER" "tail -n 200 -F ~/$(q "$LOG_FILE")"
    ;;
  stop)
    on_workers all "[ -f ~/pixeldit.pid ] && kill \$(cat ~/pixeldit.pid) 2>/dev/null; rm -f ~/pixeldit.pid; true"
    ;;
  delete)
    x gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_ARGS[@]}" --quiet
    ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
