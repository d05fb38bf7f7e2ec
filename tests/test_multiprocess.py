"""Multi-process runs: 2 processes x 2 CPU devices joined through the project's own start-up path
(PIXELDIT_COORDINATOR / PIXELDIT_NUM_PROCESSES / PIXELDIT_PROCESS_ID on 127.0.0.1, as
launch/gpu_multinode.sh sets them), FSDP over the 4 devices, against one process with 4 devices.

One scenario, to pay for the start-ups once: train, SIGKILL one process after a checkpoint (the
other ends with one line), restart both (resume), SIGTERM one process (both save the same step and
stop cleanly), sample with the sampling binary as 2 processes; the losses and the samples equal
those of one process. Start-up and mid-run failures (a process that never joins, dies or fails)
run as small programs of their own: each must end every process in one line, at once.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import timeout
from pixeldit_jax import distributed, peers

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# The smallest model the trainer takes, FSDP over every device: "embed" (32) splits 4 ways.
OVERRIDES = {
    "image_size": (8, 8), "batch_size": 8, "model.hidden_size": 32, "model.num_heads": 2,
    "model.patch_size": 4, "model.patch_depth": 1, "model.pixel_depth": 1,
    "model.pixel_hidden_size": 8, "model.num_classes": 5, "sharding.mesh_shape": (1, -1, 1),
    "data.source": "fake", "data.num_workers": 0, "train.log_every": 1,
    "train.checkpoint_every": 3, "train.keep_checkpoints": 1000, "train.sample_every": 0,
    "train.sample_rows": 0, "train.lr": 1e-3, "sample.sampler": "euler", "sample.num_steps": 2,
    "sample.num_per_class": 2, "sample.batch_size": 8}
CONFIG = ["--config=configs/tiny.py:size=tiny"] + [
    f"--config.{k}={v if isinstance(v, str) else repr(v).replace(' ', '')}" for k, v in OVERRIDES.items()]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
  # The suite's persistent compilation cache (see conftest): a restart, and a rerun of the suite,
  # load the programs an earlier run compiled. Each process of a job still compiles on its own.
  cache = os.environ.get("PIXELDIT_TEST_JAX_CACHE", os.path.join(REPO, ".jax_cache"))
  # Unbuffered, with faulthandler: a job that hangs shows its last lines and, at SIGABRT, every
  # thread's Python stack (see Job.wait).
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
             PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0")
  for k in distributed.COORDINATOR_ENV + (distributed.AUTO_ENV, distributed.INIT_TIMEOUT_ENV):
    env.pop(k, None)
  env.update(extra)
  return env


class Job:
  """`python -m module CONFIG args` as `n` processes of 2 devices (n=1: one process of 4 devices);
  `module=None`: `python -c code`."""

  def __init__(self, module, args: list, n: int, log_dir, code: str = ""):
    self.port, self.n = _free_port(), n
    os.makedirs(log_dir, exist_ok=True)
    name = module.rsplit('.', 1)[1] if module else "reference"
    self.logs = [os.path.join(log_dir, f"{name}_{self.port}_p{i}.txt") for i in range(n)]
    cmd = [sys.executable, "-m", module, *CONFIG, *args] if module else [sys.executable, "-c", code, *args]
    self.procs = []
    for i in range(n):
      env = _env(4 // n) if n == 1 else _env(
          4 // n, PIXELDIT_COORDINATOR=f"127.0.0.1:{self.port}", PIXELDIT_NUM_PROCESSES=str(n),
          PIXELDIT_PROCESS_ID=str(i))
      with open(self.logs[i], "w") as out:
        self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))

  def output(self, i: int) -> str:
    with open(self.logs[i]) as f:
      return f.read()

  def wait(self, seconds: float) -> list:
    deadline = time.time() + timeout(seconds)
    try:
      return [p.wait(timeout=max(1.0, deadline - time.time())) for p in self.procs]
    except subprocess.TimeoutExpired:
      self.dump_stacks()
      self.kill()
      raise AssertionError("timed out; the last output:\n" + self.tails())

  def tails(self) -> str:
    """The end of each process's output (room for the stacks dump_stacks writes)."""
    return "\n".join(f"--- process {i}\n{self.output(i)[-6000:]}" for i in range(self.n))

  def dump_stacks(self):
    """SIGABRT to the processes still running: faulthandler writes their threads' stacks."""
    for p in self.procs:
      if p.poll() is None:
        p.send_signal(signal.SIGABRT)
    for p in self.procs:
      try:
        p.wait(timeout=10)
      except subprocess.TimeoutExpired:
        pass

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)  # SIGTERM would only ask JAX's preemption service to save
    for p in self.procs:
      p.wait()

  def check_ok(self, seconds: float):
    codes = self.wait(seconds)
    assert codes == [0] * self.n, "\n".join(f"--- process {i} (exit {c})\n{self.output(i)[-3000:]}"
                                            for i, c in enumerate(codes))


def _metrics(workdir) -> dict:
  """step -> loss, the last line of each step (a resumed run logs the steps after its checkpoint
  again)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  out = {}
  with open(path) as f:
    for line in f:
      if line.endswith("\n"):
        m = json.loads(line)
        out[m["step"]] = m["loss"]
  return out


def _steps(workdir) -> list:
  ckpt = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(ckpt) if n.isdigit()) if os.path.isdir(ckpt) else []


def _wait_for(cond, seconds: float, job: Job, what: str):
  deadline = time.time() + timeout(seconds)
  while time.time() < deadline:
    if cond():
      return
    if any(p.poll() is not None for p in job.procs):
      job.kill()
      raise AssertionError(f"a process ended while waiting for {what}:\n" + job.tails())
    time.sleep(0.2)
  job.dump_stacks()
  job.kill()
  raise AssertionError(f"timed out waiting for {what}:\n" + job.tails())


# One process of 4 devices, fed what 2 processes read together. The pipeline gives each process
# its own shuffled share of the data (data/pipeline.py), so a 1-process run of the same config
# reads other batches; here each global batch is process 0's local batch followed by process 1's,
# as make_array_from_process_local_data lays them out over the 4 devices.
REFERENCE = """
import json, sys
from pixeldit_jax import config_lib, data, sample
from pixeldit_jax.train import trainer
workdir, steps, overrides, out = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
config = config_lib.load("configs/tiny.py:size=tiny")
for key, value in overrides.items():
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = tuple(value) if isinstance(value, list) else value
config.train.num_steps = steps
build = data.build

class Joined:
  def __init__(self, parts):
    self.parts = parts
  def __next__(self):
    batches = [next(p) for p in self.parts]
    return {k: __import__("numpy").concatenate([b[k] for b in batches]) for k in batches[0]}
  def get_state(self):
    return json.dumps([p.get_state() for p in self.parts]).encode()
  def set_state(self, state):
    for p, s in zip(self.parts, json.loads(state)):
      p.set_state(s)

class Both:
  def __init__(self, config):
    self.pipelines = [build(config, i, 2) for i in range(2)]
    self.identity = self.pipelines[0].identity
  def __iter__(self):
    return Joined([iter(p) for p in self.pipelines])

data.build = Both
trainer.train(config, workdir)
# What the sampling binary runs, in this process (one start-up less).
sample.run(config, workdir + "/checkpoints", out, steps)
"""


def test_two_processes_train_resume_preempt_and_sample_like_one(tmp_path):
  multi, single, logs = str(tmp_path / "multi"), str(tmp_path / "single"), tmp_path / "logs"
  forever = ["--config.train.num_steps=1000000"]

  # Train until checkpoint 3 is complete, then SIGKILL process 1: process 0 ends at once, with one
  # `error:` line and exit code 3 (peers.py), and a scheduler would restart the job.
  job = Job("pixeldit_jax.main", [f"--workdir={multi}", *forever], 2, logs)
  _wait_for(lambda: 3 in _steps(multi), 240, job, "checkpoint 3")
  job.procs[1].send_signal(signal.SIGKILL)
  job.procs[1].wait()
  try:
    code = job.procs[0].wait(timeout=timeout(60))
  except subprocess.TimeoutExpired:
    job.dump_stacks()
    job.kill()
    raise AssertionError("process 0 went on without process 1:\n" + job.tails())
  out = job.output(0)
  errors = [l for l in out.splitlines() if l.startswith("error:")]
  assert code == peers.EXIT and len(errors) == 1, out[-3000:]
  assert re.match(r"error: process 0 of 2: (?:process 1 stopped without finishing|another process of the "
                  r"job stopped \(.*\)); see its log, then restart every process of the job", errors[0]), errors
  assert "Traceback" not in out and "Check failure" not in out, out[-3000:]
  logged = max(_metrics(multi), default=0)  # the killed run logged steps past its last checkpoint

  # Restart both: the run resumes; SIGTERM to process 1 alone (JAX's preemption service tells
  # process 0) stops both at the same step, with one checkpoint there, and exit code 0. The signal
  # goes once the restarted run logs a step the killed one did not: a SIGTERM during start-up,
  # before JAX's service owns the signal, would end process 1 alone.
  job = Job("pixeldit_jax.main", [f"--workdir={multi}", *forever], 2, logs)
  _wait_for(lambda: max(_metrics(multi), default=0) > logged, 240, job, "steps after the resume")
  job.procs[1].send_signal(signal.SIGTERM)
  job.check_ok(120)
  stop = max(_metrics(multi))
  assert _steps(multi)[-1] == stop, (_steps(multi), stop)
  assert "Resumed from step" in open(os.path.join(multi, "log.txt")).read()
  for i in range(2):  # both stopped at the step of the checkpoint
    assert f"Stopped by preemption at step {stop}" in job.output(i), job.output(i)[-2000:]

  # One process of 4 devices trains the same steps straight and samples, while the 2 processes
  # sample with the sampling binary.
  multi_sample = Job("pixeldit_jax.sample", [f"--workdir={multi}", f"--out={tmp_path}/multi_samples",
                                             f"--step={stop}"], 2, logs)
  ref = Job(None, [single, str(stop), json.dumps(OVERRIDES), f"{tmp_path}/single_samples"], 1, logs,
            code=REFERENCE)
  ref.check_ok(240)
  multi_sample.check_ok(240)

  got, want = _metrics(multi), _metrics(single)
  assert sorted(got) == sorted(want) == list(range(1, stop + 1))
  # The weights are bit-identical (the samples below); a logged loss, a mean over the 4 devices,
  # may differ in its last bit: gloo sums across processes in another order than one process.
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-6, atol=0)
  with np.load(f"{tmp_path}/multi_samples/samples.npz") as a, np.load(f"{tmp_path}/single_samples/samples.npz") as b:
    assert a["arr_0"].shape == (10, 8, 8, 3)
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])


def test_distributed_start_up_reads_the_launchers_environment(monkeypatch):
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  for k in distributed.COORDINATOR_ENV + (distributed.AUTO_ENV, distributed.INIT_TIMEOUT_ENV):
    monkeypatch.delenv(k, raising=False)
  assert distributed.initialize() is False and not calls
  monkeypatch.setenv("PIXELDIT_DISTRIBUTED", "1")
  # JAX's own timeout is left 30 s longer than the watchdog's (300 s by default).
  assert distributed.initialize() is True and calls[-1] == ((), dict(initialization_timeout=330))
  monkeypatch.setenv("PIXELDIT_INIT_TIMEOUT_S", "0")
  with pytest.raises(ValueError, match="PIXELDIT_INIT_TIMEOUT_S='0' must be a positive"):
    distributed.initialize()
  monkeypatch.setenv("PIXELDIT_INIT_TIMEOUT_S", "60")
  monkeypatch.setenv("PIXELDIT_COORDINATOR", "10.0.0.1:1234")
  with pytest.raises(ValueError, match="PIXELDIT_NUM_PROCESSES"):
    distributed.initialize()
  monkeypatch.setenv("PIXELDIT_NUM_PROCESSES", "4")
  monkeypatch.setenv("PIXELDIT_PROCESS_ID", "two")
  with pytest.raises(ValueError, match="must be integers"):
    distributed.initialize()
  monkeypatch.setenv("PIXELDIT_PROCESS_ID", "2")
  assert distributed.initialize() is True
  assert calls[-1] == (("10.0.0.1:1234",), dict(num_processes=4, process_id=2,
                                                  cluster_detection_method="deactivate",
                                                  initialization_timeout=90))
  assert distributed.jax.config.jax_cpu_collectives_implementation == "gloo"
  # In one process: no barrier, no preemption service, and Synced is the jitted function.
  distributed.barrier("nothing to wait for")
  assert not distributed.preemption_service_active()
  assert int(distributed.Synced(distributed.jax.jit(lambda x: x + 1), "add")(1)) == 2


def test_a_process_that_never_joins_is_one_line_not_a_fatal_abort(tmp_path):
  """One process of two started, each alone: the coordinator (0) waits for a peer that never
  comes, a worker (1) for a coordinator that is not there. Each ends after PIXELDIT_INIT_TIMEOUT_S
  with one `error:` line and exit code 2, before JAX's own timeout aborts it with a stack dump."""
  start = time.monotonic()
  procs = {
      pid: subprocess.Popen(
          [sys.executable, "-m", "pixeldit_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path}/run{pid}"],
          cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          env=_env(1, PIXELDIT_COORDINATOR=f"127.0.0.1:{_free_port()}", PIXELDIT_NUM_PROCESSES="2",
                   PIXELDIT_PROCESS_ID=str(pid), PIXELDIT_INIT_TIMEOUT_S="3"))
      for pid in (0, 1)}
  for pid, proc in procs.items():
    _, err = proc.communicate(timeout=timeout(120))
    assert proc.returncode == 2, err[-3000:]
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        f"error: process {pid} of 2: the job's processes did not all join the coordinator at 127.0.0.1:"), err[-3000:]
    assert "within 3 s" in lines[0] and "PIXELDIT_INIT_TIMEOUT_S" in lines[0]
  assert time.monotonic() - start < 60


LOSES_A_PEER = """
import os, signal, sys, time
import numpy as np
from pixeldit_jax import cli, distributed

def main():
  distributed.initialize()
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((jax.device_count(),), ("all",), axis_types=(jax.sharding.AxisType.Auto,))
  ones = jax.make_array_from_process_local_data(NamedSharding(mesh, P("all")),
                                                np.ones(jax.local_device_count(), np.float32))
  total = distributed.Synced(jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P())), "sum")
  victim = int(sys.argv[1])  # -1: none; process 1 then finishes first, process 0 a moment later
  for i in range(1_000_000 if victim >= 0 else 20):
    assert float(total(ones)) == jax.device_count()
    if i == 10 and jax.process_index() == victim:
      if sys.argv[2] == "raise":
        raise ValueError("boom: a value no process expected")
      os.kill(os.getpid(), signal.SIGKILL)
  if jax.process_index() == 0:
    time.sleep(2)

sys.exit(cli.guard(main))
"""


@pytest.mark.parametrize("processes,victim,how", [(2, 1, "kill"), (3, 2, "kill"), (2, None, "kill"),
                                                  (3, 1, "raise"), (2, 0, "raise")])
def test_a_process_that_loses_a_peer_is_one_line_and_exit_3(processes, victim, how):
  """A process dies mid-run (SIGKILL): every other one ends at once with one `error:` line naming it
  and exit code 3, not with a traceback and, after the heartbeat timeout (100 s), JAX's fatal abort.
  A process that fails (raise) says its own error and exit code 2, at once: not after 5 minutes at
  JAX's shutdown barrier, then an abort; the others end as if it had died. victim=None: process 1
  finishes first and process 0, still running, is not alarmed. (When process 0 dies by SIGKILL,
  JAX's own abort races with the others' line: not tested.)"""
  port, start = _free_port(), time.monotonic()
  procs = [subprocess.Popen([sys.executable, "-c", LOSES_A_PEER, str(-1 if victim is None else victim), how],
                            cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(1, PIXELDIT_COORDINATOR=f"127.0.0.1:{port}",
                                     PIXELDIT_NUM_PROCESSES=str(processes), PIXELDIT_PROCESS_ID=str(pid)))
           for pid in range(processes)]
  errs = [p.communicate(timeout=timeout(120))[1] for p in procs]
  if victim is None:
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-3000:] for e in errs)
    return
  if how == "kill":
    assert procs[victim].returncode == -signal.SIGKILL
  else:
    assert procs[victim].returncode == 2 and errs[victim].strip() == (
        "error: boom: a value no process expected"), errs[victim][-3000:]
  who = r"process 0 \(the coordinator\)" if victim == 0 else f"process {victim}"
  for pid in range(processes):
    if pid == victim:
      continue
    lines = [l for l in errs[pid].splitlines() if l.strip()]
    assert procs[pid].returncode == peers.EXIT == 3, errs[pid][-3000:]
    assert len(lines) == 1 and re.fullmatch(
        rf"error: process {pid} of {processes}: (?:(?:{who}|another process) stopped without finishing"
        r"|another process of the job stopped \(.*\)); see its log, then restart every process of the job",
        lines[0]), errs[pid][-3000:]
  assert time.monotonic() - start < 60  # not the heartbeat timeout's 100 s


def test_lost_peer_reads_the_runtimes_errors_and_connections_are_optional(monkeypatch, caplog):
  gloo = RuntimeError("UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:538] "
                      "Read error [127.0.0.1]:27551: Connection reset by peer")
  monkeypatch.setattr(peers, "_state", dict(peers._state))  # watch() below changes it
  assert peers.lost_peer(gloo) is None  # one process: never
  peers._state["count"] = 2
  assert peers.lost_peer(gloo) == "Gloo AllGather failed: Read error [127.0.0.1]:27551: Connection reset by peer"
  try:  # found in what an exception wraps, on its line
    try:
      raise RuntimeError("INTERNAL: Barrier failed\nUNAVAILABLE: Task 1 heartbeat timeout. This indicates ...")
    except RuntimeError as inner:
      raise ValueError("checkpoint save failed") from inner
  except ValueError as outer:
    assert peers.lost_peer(outer) == "Task 1 heartbeat timeout. This indicates ..."
  assert peers.lost_peer(RuntimeError("RESOURCE_EXHAUSTED: out of memory")) is None

  class NoCoordinator:  # the port never published: the run goes on, with a warning
    def blocking_key_value_get(self, key, timeout_ms):
      raise RuntimeError("DEADLINE_EXCEEDED")
  with caplog.at_level("WARNING"):
    peers.watch(NoCoordinator(), 1, 2, "127.0.0.1:1234")
  assert "Not watching the job's other processes (RuntimeError: DEADLINE_EXCEEDED)" in caplog.text
  assert peers._state["socks"] == {}
  caplog.clear()
  monkeypatch.setenv(peers.ENV, "0")  # turned off: the coordinator is not even asked
  peers.watch(NoCoordinator(), 1, 2, "127.0.0.1:1234")
  assert not caplog.text
