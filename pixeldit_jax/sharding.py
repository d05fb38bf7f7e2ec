"""Device meshes and multi-process start-up.

Parameters carry logical axis names (see pixeldit_jax.model.layers); this module is the only one
that maps them onto mesh axes. Multi-process runs are initialised here before any JAX call.
"""

from __future__ import annotations

import os

import jax

# Explicit coordinates, set by launch/gpu_multinode.sh, launch/slurm_gpu.sbatch and
# launch/gke_xpk.sh (GPU): then JAX's own cluster detection is switched off, because under SLURM
# it would give each of our one-per-node processes a single GPU.
_COORDINATOR_ENV = ("PIXELDIT_COORDINATOR", "PIXELDIT_NUM_PROCESSES", "PIXELDIT_PROCESS_ID")
# PIXELDIT_DISTRIBUTED=1 asks for a bare jax.distributed.initialize(), which finds its peers on
# multi-host Cloud TPU VMs (launch/tpu_vm.sh sets it) and under GKE/JobSet by itself.
_AUTO_ENV = "PIXELDIT_DISTRIBUTED"


def maybe_initialize_distributed() -> bool:
  """Call jax.distributed.initialize() when this process is one of several. True if it did."""
  coordinator, num, pid = (os.environ.get(k) for k in _COORDINATOR_ENV)
  if coordinator:
    if num is None or pid is None:
      raise ValueError("PIXELDIT_COORDINATOR is set: PIXELDIT_NUM_PROCESSES and "
                       "PIXELDIT_PROCESS_ID must be set too")
    jax.distributed.initialize(coordinator, num_processes=int(num), process_id=int(pid),
                               cluster_detection_method="deactivate")
    return True
  if os.environ.get(_AUTO_ENV, "0") not in ("", "0"):
    jax.distributed.initialize()
    return True
  return False
