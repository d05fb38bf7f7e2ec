#!/usr/bin/env bash
# Submit PixelDiT training to a GKE TPU or GPU cluster with `xpk workload create`.
# Settings are environment variables; arguments are passed through as config overrides.
set -euo pipefail

usage() {
  cat <<EOF
Usage: [VAR=value ...] $0 [--config.field=value ...]

  CLUSTER        xpk cluster name (required)
  WORKDIR        gs://bucket/path, shared by all pods (required)
  TPU_TYPE       TPU slice type, e.g. v5p-32 (default), v6e-256   NUM_SLICES (default 1)
  DEVICE_TYPE    set for GPUs instead, e.g. h100-80gb-8           NUM_NODES  (default 1)
  BASE_IMAGE     image the repo is layered onto (default python:3.11); deps are installed
                 when each pod starts
  DOCKER_IMAGE   prebuilt image with deps installed and the repo as working directory;
                 used as is (no layering, no install)
  CONFIG, MODULE, WORKLOAD, PROJECT, ZONE, MAX_RESTARTS (default 0),
  XPK_ARGS       extra xpk flags, e.g. '--priority=high --env=FOO=1'
  DRY_RUN=1      print the xpk command instead of running it

Example:
  CLUSTER=my-v5p WORKDIR=gs://my-bucket/pixeldit_xl256 TPU_TYPE=v5p-128 $0
EOF
}
[[ "${1:-}" == -h || "${1:-}" == --help ]] && { usage; exit 0; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER="${CLUSTER:-}"
WORKDIR="${WORKDIR:-}"
TPU_TYPE="${TPU_TYPE:-v5p-32}"
NUM_SLICES="${NUM_SLICES:-1}"
DEVICE_TYPE="${DEVICE_TYPE:-}"
NUM_NODES="${NUM_NODES:-1}"
BASE_IMAGE="${BASE_IMAGE:-python:3.11}"    # the pins need Python >= 3.11
DOCKER_IMAGE="${DOCKER_IMAGE:-}"
CONFIG="${CONFIG:-configs/imagenet256_xl.py}"
MODULE="${MODULE:-pixeldit_jax.main}"      # or pixeldit_jax.sample
WORKLOAD="${WORKLOAD:-pixeldit-$(date +%m%d-%H%M%S)}"
PROJECT="${PROJECT:-}"
ZONE="${ZONE:-}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"          # >0 resumes from the last checkpoint after preemption
XPK_ARGS="${XPK_ARGS:-}"
DRY_RUN="${DRY_RUN:-0}"

die() { echo "error: $*" >&2; exit 2; }
[[ -n "$CLUSTER" ]] || { usage >&2; die "CLUSTER is required"; }
[[ -n "$WORKDIR" ]] || die "WORKDIR is required"
[[ "$WORKDIR" == gs://* ]] || echo "warning: WORKDIR is not gs://; pods share no local disk" >&2
[[ "$WORKLOAD" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "WORKLOAD must be lowercase letters, digits and '-'"

# The command ends up inside YAML strings (for GPUs a double-quoted one) and a bash -c, so
# keep arguments to plain words or single-quote them; refuse characters that would break it.
word() {
  if [[ "$1" =~ ^[-A-Za-z0-9_./:=,+@%]+$ ]]; then printf '%s' "$1"
  elif [[ "$1" == *[\'\"\\\$]* ]]; then die "unsupported quote, backslash or \$ in: $1"
  else printf "'%s'" "$1"; fi
}
train="python -m $(word "$MODULE")"
for a in "--config=$CONFIG" "--workdir=$WORKDIR" "$@"; do train+=" $(word "$a")"; done

xpk_cmd=(xpk workload create --cluster="$CLUSTER" --workload="$WORKLOAD" --max-restarts="$MAX_RESTARTS")
[[ -n "$PROJECT" ]] && xpk_cmd+=(--project="$PROJECT")
[[ -n "$ZONE" ]] && xpk_cmd+=(--zone="$ZONE")
if [[ -n "$DEVICE_TYPE" ]]; then
  xpk_cmd+=(--device-type="$DEVICE_TYPE" --num-nodes="$NUM_NODES")
  jax_extra='jax[cuda12]==0.10.2'
  # xpk gives GPU pods NNODES, NODE_RANK and the coordinator of pod 0; hand them to
  # pixeldit_jax.sharding (JAX's own k8s detection needs extra RBAC and the kubernetes client).
  # Single-quoted so they expand inside the pod, not here.
  # shellcheck disable=SC2016
  train='export PIXELDIT_COORDINATOR=${JAX_COORDINATOR_ADDRESS}:${JAX_COORDINATOR_PORT}'\
' PIXELDIT_NUM_PROCESSES=${NNODES} PIXELDIT_PROCESS_ID=${NODE_RANK}'\
' XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true && '"$train"
else
  # TPU pods get TPU_WORKER_HOSTNAMES (and MEGASCALE_* for several slices) from GKE/xpk, which
  # jax.distributed.initialize() reads by itself.
  xpk_cmd+=(--tpu-type="$TPU_TYPE" --num-slices="$NUM_SLICES")
  jax_extra='jax[tpu]==0.10.2'
fi

if [[ -n "$DOCKER_IMAGE" ]]; then
  xpk_cmd+=(--docker-image="$DOCKER_IMAGE")
  command="$train"
else
  # Stage only tracked + unignored files, so .venv/ and workdir/ are not baked into the image.
  stage="$(mktemp -d "${TMPDIR:-/tmp}/pixeldit-xpk.XXXXXX")"
  trap 'rm -rf "$stage"' EXIT
  git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do if [[ -e "$REPO_ROOT/$f" ]]; then printf '%s\0' "$f"; fi; done \
    | tar -C "$REPO_ROOT" --null -T - -cf - | tar -C "$stage" -xf -
  xpk_cmd+=(--base-docker-image="$BASE_IMAGE" --script-dir="$stage")
  # Same order as the other launchers: requirements.txt first, then the accelerator jax.
  command="pip install -q uv && uv pip install -q --system -r requirements.txt"
  command+=" && uv pip install -q --system '$jax_extra' && $train"
fi
xpk_cmd+=(--command="$command")
if [[ -n "$XPK_ARGS" ]]; then read -ra extra <<<"$XPK_ARGS"; xpk_cmd+=("${extra[@]}"); fi

if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "${xpk_cmd[@]}"; echo; else "${xpk_cmd[@]}"; fi
echo "follow with: xpk workload list --cluster=$CLUSTER --filter-by-job=$WORKLOAD" >&2
