"""One training run per workdir: refusal naming the owner, stale-lock take-over, release, gs://."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pixeldit_jax import fs
from pixeldit_jax.train import workdir_lock
from pixeldit_jax.train.workdir_lock import WorkdirLock, WorkdirLockedError
from test_gcs import bucket  # noqa: F401 - the local GCS emulator fixture


def _write_lock(workdir, *, host=None, pid=None, heartbeat=None, run_id="other-run"):
  record = dict(host=host or socket.gethostname(), pid=pid or os.getpid(), run_id=run_id,
                start_time="2024-05-01T12:00:00+00:00", heartbeat=time.time() if heartbeat is None else heartbeat)
  fs.write_text(fs.join(str(workdir), workdir_lock.LOCK_NAME), json.dumps(record))


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_a_second_training_run_refuses_naming_the_first(tmp_path):
  from test_train import small_config
  from pixeldit_jax.train import trainer
  _write_lock(tmp_path)  # a live run: this very process, on this host, with a fresh heartbeat
  with pytest.raises(WorkdirLockedError) as e:
    trainer.train(small_config(num_steps=1), str(tmp_path))
  message = str(e.value)
  assert message.startswith(f"Workdir {tmp_path} is in use by another training run (host "
                            f"{socket.gethostname()}, pid {os.getpid()}, started 2024-05-01T12:00:00")
  assert "\n" not in message and str(tmp_path / "run.lock") in message
  assert not (tmp_path / "checkpoints").exists()  # refused before touching anything


def test_the_command_line_refuses_in_one_line_without_touching_the_live_runs_log(tmp_path):
  from helpers import timeout
  _write_lock(tmp_path)  # this test process plays the live run
  repo = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
  r = subprocess.run([sys.executable, "-m", "pixeldit_jax.main", "--config=fashion_mnist.py:smoke",
                      f"--workdir={tmp_path}"], cwd=repo, env=dict(os.environ, PYTHONPATH=repo),
                     capture_output=True, text=True, timeout=timeout(300))
  assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
  assert r.stderr.startswith(f"error: Workdir {tmp_path} is in use by another training run (host ")
  assert not (tmp_path / "log.txt").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("stale", ["dead pid", "old heartbeat"])
def test_a_stale_lock_is_taken_over(tmp_path, stale):
  if stale == "dead pid":
    _write_lock(tmp_path, pid=_dead_pid())
  else:
    _write_lock(tmp_path, host="elsewhere", heartbeat=time.time() - 100)
  lock = WorkdirLock(str(tmp_path), timeout_s=60, confirm_s=0.01)
  lock.acquire()
  assert lock.read()["run_id"] == lock.run_id and lock.read()["pid"] == os.getpid()
  lock.release()
  assert not (tmp_path / "run.lock").exists()


def test_a_live_lock_elsewhere_is_kept_and_release_leaves_others_alone(tmp_path):
  _write_lock(tmp_path, host="elsewhere", pid=1, heartbeat=time.time() - 10)
  with pytest.raises(WorkdirLockedError, match=r"host elsewhere, pid 1, .*last heartbeat 1\d s ago"):
    WorkdirLock(str(tmp_path), timeout_s=60, confirm_s=0.01).acquire()
  WorkdirLock(str(tmp_path)).release()  # never acquired: must not remove the other run's lock
  assert json.loads((tmp_path / "run.lock").read_text())["host"] == "elsewhere"


def test_heartbeat_refreshes_and_a_lost_race_is_noticed(tmp_path):
  with workdir_lock.hold(str(tmp_path), heartbeat_s=0.05, confirm_s=0.01) as lock:
    first = lock.read()["heartbeat"]
    time.sleep(0.3)
    assert lock.read()["heartbeat"] > first and workdir_lock.taken_over(lock) is None
    _write_lock(tmp_path, host="racer", pid=7)  # another run's write wins
    deadline = time.time() + 10
    while workdir_lock.taken_over(lock) is None and time.time() < deadline:
      time.sleep(0.05)
    error = workdir_lock.taken_over(lock)
    assert isinstance(error, WorkdirLockedError) and "host racer, pid 7" in str(error)
  assert json.loads((tmp_path / "run.lock").read_text())["host"] == "racer"  # theirs, kept


def test_the_lock_on_a_bucket(bucket):  # noqa: F811
  workdir = f"{bucket}/locks/run"
  with workdir_lock.hold(workdir, confirm_s=0.05) as lock:
    assert fs.exists(f"{workdir}/run.lock") and lock.read()["run_id"] == lock.run_id
    with pytest.raises(WorkdirLockedError, match=rf"Workdir {workdir} is in use .*pid {os.getpid()}"):
      WorkdirLock(workdir, confirm_s=0.05).acquire()
  assert not fs.exists(f"{workdir}/run.lock")
  _write_lock(workdir, host="elsewhere", heartbeat=time.time() - 1000)  # a dead run's
  with workdir_lock.hold(workdir, confirm_s=0.05) as lock:
    assert lock.read()["host"] == socket.gethostname()
  assert not fs.exists(f"{workdir}/run.lock")
