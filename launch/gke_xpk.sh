#!/usr/bin/env bash
# Submit PixelDiT training (or sampling) to a GKE TPU or GPU cluster with `xpk workload create`.
# Settings are environment variables; arguments are passed through as config overrides.
set -euo pipefail

usage() {
  cat <<EOF
Usage: [VAR=value ...] $0 [--config.field=value ...]

  CLUSTER        xpk cluster name (required)
  WORKDIR        gs://bucket/path, shared by all pods (required unless CHECKPOINT is set)
  CHECKPOINT     sample this checkpoint directory (gs://, e.g. an imported one) instead of
                 WORKDIR's: passes --checkpoint and no --workdir; MODULE defaults to
                 pixeldit_jax.sample
  TPU_TYPE       TPU slice type, e.g. v5p-32 (default), v6e-256   NUM_SLICES (default 1)
                 NUM_SLICES > 1 adds --config.sharding.dcn_mesh_shape=(NUM_SLICES,1,1)
  DEVICE_TYPE    set for GPUs instead, e.g. h100-80gb-8           NUM_NODES  (default 1)
  BASE_IMAGE     image the repo is layered onto (default python:3.11); deps are installed
                 when each pod starts
  DOCKER_IMAGE   prebuilt image with deps installed and the repo as working directory;
                 used as is (no layering, no install)
  CONFIG, MODULE, WORKLOAD, PROJECT, ZONE, MAX_RESTARTS (default 0),
  XPK_ARGS       extra xpk flags, split on spaces, e.g. '--priority=high --env=FOO=1'
  DRY_RUN=1      print the pod's environment, its script and the xpk command; run nothing

Overrides may hold any characters (quotes, spaces, \$): the pod script travels base64-encoded
and each argument is quoted with printf %q inside it.

Example:
  CLUSTER=my-v5p WORKDIR=gs://my-bucket/pixeldit_xl256 TPU_TYPE=v5p-128 $0
EOF
}
[[ "${1:-}" == -h || "${1:-}" == --help ]] && { usage; exit 0; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER="${CLUSTER:-}"
WORKDIR="${WORKDIR:-}"
CHECKPOINT="${CHECKPOINT:-}"
TPU_TYPE="${TPU_TYPE:-v5p-32}"
NUM_SLICES="${NUM_SLICES:-1}"
DEVICE_TYPE="${DEVICE_TYPE:-}"
NUM_NODES="${NUM_NODES:-1}"
BASE_IMAGE="${BASE_IMAGE:-python:3.11}"    # the pins need Python >= 3.11
DOCKER_IMAGE="${DOCKER_IMAGE:-}"
CONFIG="${CONFIG:-configs/imagenet256_xl.py}"
if [[ -n "$CHECKPOINT" ]]; then MODULE="${MODULE:-pixeldit_jax.sample}"; else MODULE="${MODULE:-pixeldit_jax.main}"; fi
WORKLOAD="${WORKLOAD:-pixeldit-$(date +%m%d-%H%M%S)}"
PROJECT="${PROJECT:-}"
ZONE="${ZONE:-}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"          # >0 resumes from the last checkpoint after preemption
XPK_ARGS="${XPK_ARGS:-}"
DRY_RUN="${DRY_RUN:-0}"

die() { echo "error: $*" >&2; exit 2; }
[[ -n "$CLUSTER" ]] || { usage >&2; die "CLUSTER is required"; }
[[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "NUM_SLICES must be a positive integer"
[[ "$NUM_NODES" =~ ^[1-9][0-9]*$ ]] || die "NUM_NODES must be a positive integer"
[[ "$WORKLOAD" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "WORKLOAD must be lowercase letters, digits and '-'"
if [[ -n "$CHECKPOINT" ]]; then
  [[ "$MODULE" == pixeldit_jax.sample ]] || die "CHECKPOINT is for sampling (MODULE=pixeldit_jax.sample);" \
    "to start training from a checkpoint pass --config.train.init_from=DIR"
  [[ "$CHECKPOINT" == gs://* ]] || echo "warning: CHECKPOINT is not gs://; pods share no local disk" >&2
  run_dir=(--checkpoint="$CHECKPOINT")
else
  [[ -n "$WORKDIR" ]] || die "WORKDIR is required (or CHECKPOINT to sample a checkpoint)"
  [[ "$WORKDIR" == gs://* ]] || echo "warning: WORKDIR is not gs://; pods share no local disk" >&2
  run_dir=(--workdir="$WORKDIR")
fi

py_args=(-m "$MODULE" --config="$CONFIG" "${run_dir[@]}")
# Variables the pod exports before Python starts (pixeldit_jax.distributed reads PIXELDIT_*).
pod_env=()
if [[ -n "$DEVICE_TYPE" ]]; then
  [[ "$NUM_SLICES" == 1 ]] || die "NUM_SLICES is for TPUs; GPUs scale with NUM_NODES"
  jax_extra='jax[cuda12]==0.10.2'
  # xpk gives GPU pods NNODES, NODE_RANK, JAX_COORDINATOR_ADDRESS and JAX_COORDINATOR_PORT (pod 0);
  # hand them to pixeldit_jax.distributed (JAX's own k8s detection needs extra RBAC and the
  # kubernetes client). Expanded inside the pod, not here.
  # shellcheck disable=SC2016
  pod_env+=('PIXELDIT_COORDINATOR="${JAX_COORDINATOR_ADDRESS}:${JAX_COORDINATOR_PORT}"'
            'PIXELDIT_NUM_PROCESSES="${NNODES}"' 'PIXELDIT_PROCESS_ID="${NODE_RANK}"'
            'XLA_PYTHON_CLIENT_MEM_FRACTION=0.9'
            'XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"')
else
  jax_extra='jax[tpu]==0.10.2'
  # A bare jax.distributed.initialize(): on GKE it reads TPU_WORKER_HOSTNAMES / TPU_WORKER_ID
  # (set by GKE for TPU slice pods) and, with several slices, MEGASCALE_COORDINATOR_ADDRESS,
  # MEGASCALE_NUM_SLICES and MEGASCALE_SLICE_ID (set by GKE/JobSet for xpk's multi-slice
  # JobSet), which number the processes slice by slice.
  pod_env+=('PIXELDIT_DISTRIBUTED=1')
  if [[ "$NUM_SLICES" -gt 1 ]]; then
    py_args+=("--config.sharding.dcn_mesh_shape=($NUM_SLICES,1,1)")
  fi
fi
py_args+=("$@")

# The pod's script: exports, optional install, then exec python (so xpk's SIGTERM reaches it).
script="set -euo pipefail"$'\n'
for e in "${pod_env[@]}"; do script+="export $e"$'\n'; done
if [[ -z "$DEVICE_TYPE" && "$NUM_SLICES" -gt 1 ]]; then
  # Without these jax would start one job per slice; stop at once rather than train apart.
  script+="[ \"\${MEGASCALE_NUM_SLICES:-}\" = $NUM_SLICES ] || { echo \"error: NUM_SLICES=$NUM_SLICES but"
  script+=" MEGASCALE_NUM_SLICES=\${MEGASCALE_NUM_SLICES:-<unset>} in this pod\" >&2; exit 2; }"$'\n'
fi
if [[ -z "$DOCKER_IMAGE" ]]; then
  # Same order as the other launchers: requirements.txt first, then the accelerator jax.
  script+="pip install -q uv"$'\n'
  script+="uv pip install -q --system -r requirements.txt"$'\n'
  script+="uv pip install -q --system $(printf '%q' "$jax_extra")"$'\n'
fi
script+="exec python$(printf ' %q' "${py_args[@]}")"$'\n'

# xpk puts --command inside YAML (for GPUs also a double-quoted string) and a bash -c: base64
# keeps every character of the script intact through both.
b64="$(printf '%s' "$script" | base64 | tr -d '\n')"
command="echo $b64 | base64 -d > \${TMPDIR:-/tmp}/pixeldit_run.sh && exec bash \${TMPDIR:-/tmp}/pixeldit_run.sh"

xpk_cmd=(xpk workload create --cluster="$CLUSTER" --workload="$WORKLOAD" --max-restarts="$MAX_RESTARTS")
[[ -n "$PROJECT" ]] && xpk_cmd+=(--project="$PROJECT")
[[ -n "$ZONE" ]] && xpk_cmd+=(--zone="$ZONE")
if [[ -n "$DEVICE_TYPE" ]]; then
  xpk_cmd+=(--device-type="$DEVICE_TYPE" --num-nodes="$NUM_NODES")
else
  xpk_cmd+=(--tpu-type="$TPU_TYPE" --num-slices="$NUM_SLICES")
fi

stage=""
if [[ -n "$DOCKER_IMAGE" ]]; then
  xpk_cmd+=(--docker-image="$DOCKER_IMAGE")
else
  # Stage only tracked + unignored files, so .venv/ and workdir/ are not baked into the image.
  stage="$(mktemp -d "${TMPDIR:-/tmp}/pixeldit-xpk.XXXXXX")"
  trap 'rm -rf "$stage"' EXIT
  if [[ "$DRY_RUN" != 1 ]]; then
    git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard \
      | while IFS= read -r -d '' f; do if [[ -e "$REPO_ROOT/$f" ]]; then printf '%s\0' "$f"; fi; done \
      | tar -C "$REPO_ROOT" --null -T - -cf - | tar -C "$stage" -xf -
  fi
  xpk_cmd+=(--base-docker-image="$BASE_IMAGE" --script-dir="$stage")
fi
xpk_cmd+=(--command="$command")
if [[ -n "$XPK_ARGS" ]]; then read -ra extra <<<"$XPK_ARGS"; xpk_cmd+=("${extra[@]}"); fi

if [[ "$DRY_RUN" == 1 ]]; then
  if [[ -n "$DEVICE_TYPE" ]]; then what="GPU $DEVICE_TYPE x $NUM_NODES node(s)"
  else what="TPU $TPU_TYPE x $NUM_SLICES slice(s)"; fi
  echo "# gke_xpk.sh dry run: $what, workload $WORKLOAD"
  echo "# pod script (\$TMPDIR/pixeldit_run.sh, default /tmp; sent base64-encoded in --command):"
  printf '%s' "$script"
  echo "# submit:"
  printf '%q ' "${xpk_cmd[@]}"; echo
else
  "${xpk_cmd[@]}"
  echo "follow with: xpk workload list --cluster=$CLUSTER --filter-by-job=$WORKLOAD" >&2
fi
