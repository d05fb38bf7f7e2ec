"""Multi-process start-up, barriers, and preemption: what every entry point of a job of several
processes needs.

    distributed.initialize()        # first thing in main(): True when this is one of several
    compiled = distributed.Synced(jax.jit(f), "name")   # compiles, then waits for every process
    distributed.barrier("name")     # all processes, through the coordinator (no device collective)

Where the coordinates come from:
  PIXELDIT_COORDINATOR=host:port, PIXELDIT_NUM_PROCESSES, PIXELDIT_PROCESS_ID
      explicit (launch/gpu_multinode.sh, slurm_gpu.sbatch, gke_xpk.sh on GPU); JAX's own cluster
      detection is then off, because under SLURM it would give each of our one-per-node processes
      a single GPU.
  PIXELDIT_DISTRIBUTED=1
      a bare jax.distributed.initialize(), which finds its peers on multi-host Cloud TPU VMs
      (launch/tpu_vm.sh sets it) and under GKE/JobSet.

Compile skew. On CPU, cross-process collectives go through gloo, and the first collective over a
set of devices opens a gloo context whose rendezvous waits only 30 s for the other processes (a
fixed key-value timeout: neither a JAX option nor --xla_cpu_collective_timeout_seconds changes
it). Once a context is open, collectives wait as long as they must. One process that compiles a
program 30 s later than another (a cold compile on a busy machine) therefore kills the job at its
first collective. So: (1) right after start-up, once every process has reached a coordinator
barrier, a tiny collective over all devices opens the all-device context while the processes are
in step; (2) every program the project compiles for a multi-process run (the train step, the
samplers) is compiled ahead of time and followed by a barrier, so that all processes start it
together, whatever new device groups it brings. Barriers go through the coordination service,
which waits for minutes, not through device collectives.

Start-up. jax.distributed.initialize() blocks until every process has joined the coordinator, and
when one never does (it crashed while starting, or the address or process count is wrong) JAX
aborts the process with a fatal-error stack dump after its timeout. Here a watchdog ends the wait
first, with one `error:` line naming the coordinator and the process count, and exit code 2.
PIXELDIT_INIT_TIMEOUT_S sets the wait (default 300 s, JAX's own).

A process lost later: the others notice at once and end with one `error:` line and exit code 3
(pixeldit_jax/peers.py), not after JAX's 100 s heartbeat timeout with a fatal abort.

Preemption. JAX's preemption service (started by jax.distributed.initialize) owns SIGTERM in a
multi-process run: a signal to any one process reaches all of them, and
multihost_utils.reached_preemption_sync_point(step) turns True at the same step everywhere. The
trainer must then not install a Python SIGTERM handler, which would replace JAX's (see
``preemption_service_active``).
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Callable

import jax
import numpy as np

from pixeldit_jax import logs, peers

COORDINATOR_ENV = ("PIXELDIT_COORDINATOR", "PIXELDIT_NUM_PROCESSES", "PIXELDIT_PROCESS_ID")
AUTO_ENV = "PIXELDIT_DISTRIBUTED"
INIT_TIMEOUT_ENV = "PIXELDIT_INIT_TIMEOUT_S"
INIT_TIMEOUT_S = 300  # JAX's default wait for every process to join
_JAX_GRACE_S = 30  # JAX's own timeout runs this much longer, so that the watchdog speaks first
# A barrier waits this long for the slowest process (a cold compile of a large model on a busy
# host takes minutes). A process that died is noticed sooner, by the coordinator's heartbeats.
BARRIER_TIMEOUT_S = 30 * 60

_barrier_ids = itertools.count()


def initialize() -> bool:
  """jax.distributed.initialize() when this process is one of several (see the module docstring);
  True if it did. Must run before anything starts JAX's backends."""
  coordinator, num, pid = (os.environ.get(k) for k in COORDINATOR_ENV)
  if coordinator:
    if num is None or pid is None:
      raise ValueError("PIXELDIT_COORDINATOR is set: PIXELDIT_NUM_PROCESSES and "
                       "PIXELDIT_PROCESS_ID must be set too")
    try:
      num_processes, process_id = int(num), int(pid)
    except ValueError:
      raise ValueError(f"PIXELDIT_NUM_PROCESSES={num!r} and PIXELDIT_PROCESS_ID={pid!r} must be "
                       "integers") from None
    _before_initialize()
    timeout = _init_timeout_s()
    with _join_watchdog(timeout, f"process {process_id} of {num_processes}: the job's processes did not "
                        f"all join the coordinator at {coordinator}"):
      jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                                 cluster_detection_method="deactivate",
                                 initialization_timeout=timeout + _JAX_GRACE_S)
  elif os.environ.get(AUTO_ENV, "0") not in ("", "0"):
    _before_initialize()
    timeout = _init_timeout_s()
    with _join_watchdog(timeout, "the job's processes did not all join (jax.distributed.initialize "
                        "with the cluster's own coordinates)"):
      jax.distributed.initialize(initialization_timeout=timeout + _JAX_GRACE_S)
  else:
    return False
  _after_initialize()
  return True


def _init_timeout_s() -> int:
  raw = os.environ.get(INIT_TIMEOUT_ENV, str(INIT_TIMEOUT_S))
  try:
    timeout = int(raw)
  except ValueError:
    timeout = 0
  if timeout <= 0:
    raise ValueError(f"{INIT_TIMEOUT_ENV}={raw!r} must be a positive whole number of seconds")
  return timeout


def _join_watchdog(timeout_s: int, what: str):
  """Exit with one `error:` line if the block (jax.distributed.initialize, which releases the GIL
  while it waits) is still running after `timeout_s`: JAX's own timeout aborts the process with a
  stack dump instead."""

  def expire():
    os.write(2, (f"error: {what} within {timeout_s} s: start all of them (one crashed while "
                 f"starting? see its log), check the address and process count, or raise "
                 f"{INIT_TIMEOUT_ENV}\n").encode())
    os._exit(2)  # noqa: SLF001 - the main thread is blocked inside JAX; nothing else can end it

  return logs.if_still_running(timeout_s, expire)


def _before_initialize():
  # Gloo is JAX's default for CPU collectives today; set it so that a changed default or a stray
  # JAX_CPU_COLLECTIVES_IMPLEMENTATION cannot leave a CPU job of several processes without any.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _after_initialize():
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # noqa: PLC0415
  peers.watch(_client(), jax.process_index(), jax.process_count(),
              jax_distributed.global_state.coordinator_address)
  if jax.default_backend() == "cpu":
    warm_collectives()


def _client():
  from jax._src import distributed as jax_distributed  # noqa: PLC0415 - the runtime's own handle
  return jax_distributed.global_state.client


def is_multiprocess() -> bool:
  return _client() is not None and jax.process_count() > 1


def preemption_service_active() -> bool:
  """Whether JAX's preemption service watches SIGTERM for this process (a distributed run with
  jax_enable_preemption_service on)."""
  from jax._src import distributed as jax_distributed  # noqa: PLC0415
  return jax_distributed.global_state.preemption_sync_manager is not None


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S):
  """Wait until every process gets here, through the coordinator (no device collective). A no-op
  in a single process. All processes must pass the same barriers in the same order."""
  if not is_multiprocess():
    return
  # The coordinator's barrier ids are single-use: number them (in the same order everywhere).
  _client().wait_at_barrier(f"pixeldit:{name}:{next(_barrier_ids)}", int(timeout_s * 1000))


def warm_collectives():
  """Open the gloo context of all devices while every process is in step (module docstring)."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415
  mesh = jax.make_mesh((jax.device_count(),), ("all",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  ones = jax.make_array_from_process_local_data(NamedSharding(mesh, P("all")),
                                                np.ones(jax.local_device_count(), np.int32))
  total = Synced(jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P())),
                 "warm_collectives")(ones)
  if int(total) != jax.device_count():
    raise RuntimeError(f"The first collective over {jax.device_count()} devices gave {int(total)}")


def _signature(args) -> tuple:
  leaves, treedef = jax.tree.flatten(args)
  return (treedef, tuple((np.shape(a), str(getattr(a, "dtype", type(a))), getattr(a, "sharding", None))
                         for a in leaves))


class Synced:
  """A jitted function that, in a multi-process run, is compiled ahead of time for each new
  argument signature and then waits at a barrier, so that no process starts its collectives more
  than a moment before the others (module docstring). In one process it is the jitted function."""

  def __init__(self, jitted: Callable, name: str):
    self.jitted, self.name = jitted, name
    self._compiled: dict = {}

  def lower(self, *args):
    return self.jitted.lower(*args)

  def __call__(self, *args) -> Any:
    if not is_multiprocess():
      return self.jitted(*args)
    key = _signature(args)
    compiled = self._compiled.get(key)
    if compiled is None:
      compiled = self.jitted.lower(*args).compile()
      barrier(f"compiled_{self.name}")
      self._compiled[key] = compiled
    return compiled(*args)
