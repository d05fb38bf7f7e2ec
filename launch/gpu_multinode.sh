#!/usr/bin/env bash
# Multi-node NVIDIA GPU training without a scheduler: run this once on every node, one process
# per node driving all its GPUs. Node 0 hosts the JAX coordinator.
#
#   node 0:  launch/gpu_multinode.sh --node_rank=0 --nnodes=2 --coordinator=10.0.0.1:8476
#   node 1:  launch/gpu_multinode.sh --node_rank=1 --nnodes=2 --coordinator=10.0.0.1:8476
#
# The flags may also come from NODE_RANK / NNODES / COORDINATOR; remaining arguments are config
# overrides, passed through unchanged. CONFIG, WORKDIR, VENV, MODULE as below; CHECKPOINT=DIR
# samples that checkpoint (--checkpoint instead of --workdir; MODULE defaults to
# pixeldit_jax.sample); DRY_RUN=1 prints the exported variables and the command instead.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${CONFIG:-configs/imagenet256_xl.py}"
WORKDIR="${WORKDIR:-}"                 # must be shared by all nodes (gs:// or a shared FS)
CHECKPOINT="${CHECKPOINT:-}"           # sample this checkpoint directory (shared by all nodes)
VENV="${VENV:-$REPO_ROOT/.venv}"       # built with: uv pip install -r requirements.txt 'jax[cuda12]==0.10.2'
if [[ -n "$CHECKPOINT" ]]; then MODULE="${MODULE:-pixeldit_jax.sample}"; else MODULE="${MODULE:-pixeldit_jax.main}"; fi
NODE_RANK="${NODE_RANK:-}"
NNODES="${NNODES:-}"
COORDINATOR="${COORDINATOR:-}"
DRY_RUN="${DRY_RUN:-0}"

usage() { sed -n '2,11s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }
die() { echo "error: $*" >&2; usage >&2; exit 2; }

overrides=()
for arg in "$@"; do
  case "$arg" in
    --node_rank=*|--node-rank=*) NODE_RANK="${arg#*=}" ;;
    --nnodes=*) NNODES="${arg#*=}" ;;
    --coordinator=*) COORDINATOR="${arg#*=}" ;;
    -h|--help) usage; exit 0 ;;
    *) overrides+=("$arg") ;;
  esac
done

[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "--nnodes must be a positive integer"
[[ "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt "$NNODES" ]] || die "--node_rank must be in [0, NNODES)"
[[ -n "$COORDINATOR" ]] || die "--coordinator=HOST[:PORT] (the address of node 0) is required"
if [[ -n "$CHECKPOINT" ]]; then
  [[ "$MODULE" == pixeldit_jax.sample ]] || die "CHECKPOINT is for sampling (MODULE=pixeldit_jax.sample);" \
    "to start training from a checkpoint pass --config.train.init_from=DIR"
  run_dir=(--checkpoint="$CHECKPOINT")
else
  [[ -n "$WORKDIR" ]] || die "WORKDIR is required (or CHECKPOINT to sample a checkpoint)"
  run_dir=(--workdir="$WORKDIR")
fi
# Any free port on node 0 works; all nodes just have to agree on it.
[[ "$COORDINATOR" == *:* ]] || COORDINATOR="$COORDINATOR:8476"

# Read by pixeldit_jax.distributed, which passes them to jax.distributed.initialize().
export PIXELDIT_COORDINATOR="$COORDINATOR"
export PIXELDIT_NUM_PROCESSES="$NNODES"
export PIXELDIT_PROCESS_ID="$NODE_RANK"
# Same reasoning as slurm_gpu.sbatch: one process owns all GPUs of the node, so preallocate more
# than JAX's 75% default, and overlap collectives with compute.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

cmd=("$VENV/bin/python" -m "$MODULE" --config="$CONFIG" "${run_dir[@]}"
     ${overrides[@]+"${overrides[@]}"})
cd "$REPO_ROOT"
echo "node $NODE_RANK/$NNODES, coordinator $COORDINATOR" >&2
if [[ "$DRY_RUN" == 1 ]]; then
  echo "# gpu_multinode.sh dry run: node $NODE_RANK of $NNODES"
  for v in PIXELDIT_COORDINATOR PIXELDIT_NUM_PROCESSES PIXELDIT_PROCESS_ID \
           XLA_PYTHON_CLIENT_MEM_FRACTION XLA_FLAGS NCCL_DEBUG; do
    printf 'export %s=%q\n' "$v" "${!v}"
  done
  printf 'cd %q\n' "$REPO_ROOT"
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
