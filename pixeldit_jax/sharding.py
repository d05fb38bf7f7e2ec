"""Device meshes and multi-process start-up.

Parameters carry logical axis names (see pixeldit_jax.model.layers); this module is the only one
that maps them onto mesh axes. Multi-process runs are initialised here before any JAX call.
"""

from __future__ import annotations

import os

import jax

# Set by launch/gpu_multinode.sh for multi-node GPU runs outside SLURM/GKE/Cloud TPU.
_COORDINATOR_ENV = ("PIXELDIT_COORDINATOR", "PIXELDIT_NUM_PROCESSES", "PIXELDIT_PROCESS_ID")
# Environments in which jax.distributed.initialize() finds its peers by itself.
_AUTO_CLUSTER_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                     "JOBSET_NAME", "OMPI_COMM_WORLD_SIZE")


def maybe_initialize_distributed() -> bool:
  """Call jax.distributed.initialize() when this process is one of several. True if it did."""
  coordinator, num, pid = (os.environ.get(k) for k in _COORDINATOR_ENV)
  if coordinator:
    if num is None or pid is None:
      raise ValueError("PIXELDIT_COORDINATOR is set: PIXELDIT_NUM_PROCESSES and "
                       "PIXELDIT_PROCESS_ID must be set too")
    jax.distributed.initialize(coordinator, num_processes=int(num), process_id=int(pid))
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or any(
      k in os.environ for k in _AUTO_CLUSTER_ENV if k != "SLURM_JOB_ID"):
    jax.distributed.initialize()
    return True
  return False
