"""One training run per workdir: ``<workdir>/run.lock``, a JSON record with a heartbeat.

    with workdir_lock.hold(workdir, timeout_s=300) as lock:
      ...            # now and then: error = workdir_lock.taken_over(lock); stop if not None

Object stores have no POSIX locks and no atomic create-if-absent through our path layer, so the
lock is a plain file: process 0 writes its record (host, pid, start time, a random run id), waits
a moment and reads it back, so that of two runs starting together only the last writer goes on.
A timer thread rewrites the heartbeat every `heartbeat_s`, after checking that the record is
still ours (a run that finds another's record stops at its next check). A record is stale, and
taken over, when its heartbeat is older than `timeout_s`, or at once when it names this host and
a process that no longer exists. The record is removed on exit, whatever the exit.

In multi-process runs process 0 alone holds the lock; its decision is broadcast so that every
process refuses or goes on together.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Iterator, Optional

import jax
import numpy as np

from pixeldit_jax import cli, fs

LOCK_NAME = "run.lock"


class WorkdirLockedError(RuntimeError):
  """Another live training run owns the workdir."""


cli.register(WorkdirLockedError)  # entry points print it as one `error:` line


def _now_text(t: float) -> str:
  return datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  except (OSError, OverflowError, ValueError):
    return False
  try:  # an exited child its parent has not reaped yet is gone too (Linux)
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except (OSError, IndexError):
    return True


def describe(record: dict) -> str:
  """'host H, pid P, started T' of a lock record."""
  return (f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, "
          f"started {record.get('start_time', '?')}")


class WorkdirLock:
  """The lock of one workdir, held by this process (see the module docstring)."""

  def __init__(self, workdir: str, *, timeout_s: float = 300.0, heartbeat_s: float = 30.0,
               confirm_s: Optional[float] = None):
    self.workdir = fs.resolve(workdir)
    self.path = fs.join(self.workdir, LOCK_NAME)
    self.timeout_s = float(timeout_s)
    self.heartbeat_s = min(float(heartbeat_s), self.timeout_s / 3)
    # Long enough for a racing run to finish its read-then-write (an upload on object stores).
    self.confirm_s = (2.0 if fs.is_remote(self.workdir) else 0.2) if confirm_s is None else confirm_s
    self.host = socket.gethostname()
    self.pid = os.getpid()
    self.run_id = uuid.uuid4().hex
    self.started = time.time()
    self.lost: Optional[dict] = None  # the record that replaced ours, once seen
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  # ------------------------------------------------------------------ records

  def _record(self) -> dict:
    now = time.time()
    return dict(host=self.host, pid=self.pid, run_id=self.run_id, start_time=_now_text(self.started),
                heartbeat=now, heartbeat_time=_now_text(now), workdir=self.workdir)

  def _write(self) -> None:
    fs.atomic_write_bytes(self.path, json.dumps(self._record(), indent=1).encode())

  def read(self) -> Optional[dict]:
    """The current record; None when there is none; {} when it cannot be parsed."""
    try:
      text = fs.read_text(self.path)
    except FileNotFoundError:
      return None
    try:
      record = json.loads(text)
    except ValueError:
      return {}
    return record if isinstance(record, dict) else {}

  def stale_reason(self, record: dict) -> Optional[str]:
    """Why `record` (another run's) may be taken over, or None while that run is alive."""
    if not record:
      return "it cannot be parsed"
    try:
      age = time.time() - float(record["heartbeat"])
    except (KeyError, TypeError, ValueError):
      return "it has no heartbeat"
    if age > self.timeout_s:
      return f"its last heartbeat is {age:.0f} s old (config.train.lock_timeout_s={self.timeout_s:g})"
    if record.get("host") == self.host and not _pid_alive(int(record.get("pid", -1))):
      return f"its process {record.get('pid')} on this host is gone"
    return None

  def _refusal(self, record: dict) -> WorkdirLockedError:
    try:
      beat = f", last heartbeat {time.time() - float(record['heartbeat']):.0f} s ago"
    except (KeyError, TypeError, ValueError):
      beat = ""
    return WorkdirLockedError(
        f"Workdir {self.workdir} is in use by another training run ({describe(record)}{beat}): "
        "wait for it to end or stop it, or pass another --workdir. A dead run's lock is taken over "
        f"when its heartbeat is {self.timeout_s:.0f} s old (config.train.lock_timeout_s), at once "
        f"on its own host; or delete {self.path}.")

  # ------------------------------------------------------------------ life cycle

  def acquire(self) -> None:
    """Take the lock, or raise WorkdirLockedError naming the run that holds it."""
    record = self.read()
    if record is not None:
      reason = self.stale_reason(record)
      if reason is None:
        raise self._refusal(record)
      logging.warning("Taking over the lock %s of a run that is gone (%s): %s.", self.path,
                      describe(record), reason)
    self._write()
    time.sleep(self.confirm_s)
    record = self.read()
    if not record or record.get("run_id") != self.run_id:
      raise self._refusal(record or {})  # a run that started at the same moment won
    self._thread = threading.Thread(target=self._beat, name="workdir-lock", daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        record = self.read()
        if record and record.get("run_id") != self.run_id:
          self.lost = record
          logging.error("The lock %s now belongs to another run (%s).", self.path, describe(record))
          return
        self._write()
      except Exception as e:  # noqa: BLE001 - a failed heartbeat is retried at the next beat
        logging.warning("Could not refresh the workdir lock %s: %s: %s", self.path, type(e).__name__, e)

  def lost_error(self) -> WorkdirLockedError:
    """The error of a run whose lock another run has taken over (self.lost set)."""
    return WorkdirLockedError(
        f"Workdir {self.workdir} was taken over by another training run ({describe(self.lost)}) "
        "while this one ran (this run's heartbeat was late, or both started together); this run "
        "stops. Run one training per workdir.")

  def release(self) -> None:
    """Stop the heartbeat and remove the lock if it is still ours."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=60)
      self._thread = None
    try:
      record = self.read()
      if record and record.get("run_id") == self.run_id:
        fs.remove(self.path)
    except Exception as e:  # noqa: BLE001 - never hide the run's own outcome behind this
      logging.warning("Could not remove the workdir lock %s: %s: %s", self.path, type(e).__name__, e)


def check_free(workdir: str, *, timeout_s: float = 300.0) -> None:
  """Raise WorkdirLockedError if a live run holds `workdir`, without taking the lock: entry points
  call it before they open the run's log file, so a refused run never writes into a live run's
  log. `hold` still decides (two runs that pass this check at once race there)."""
  probe = WorkdirLock(workdir, timeout_s=timeout_s)
  record = probe.read()
  if record is not None and probe.stale_reason(record) is None:
    raise probe._refusal(record)


class _Follower:
  """What processes other than 0 hold: nothing to refresh or release."""

  def release(self) -> None:
    pass


def _agree(ok: bool) -> bool:
  """Process 0's `ok`, on every process."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # noqa: PLC0415
  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


@contextlib.contextmanager
def hold(workdir: str, *, timeout_s: float = 300.0, heartbeat_s: float = 30.0,
         confirm_s: Optional[float] = None) -> Iterator:
  """Hold the workdir's lock for the block (process 0 takes it; all processes refuse together)."""
  lock, error = _Follower(), None
  if jax.process_index() == 0:
    lock = WorkdirLock(workdir, timeout_s=timeout_s, heartbeat_s=heartbeat_s, confirm_s=confirm_s)
    try:
      lock.acquire()
    except Exception as e:  # noqa: BLE001 - raised below, once every process knows
      error = e
  if not _agree(error is None):
    raise error or WorkdirLockedError(
        f"Process 0 could not take the lock of workdir {fs.resolve(workdir)} (see its error).")
  try:
    yield lock
  finally:
    lock.release()


def taken_over(lock) -> Optional[WorkdirLockedError]:
  """The error to stop with, on every process, once process 0 saw another run take the lock."""
  lost = isinstance(lock, WorkdirLock) and lock.lost is not None
  if _agree(not lost):
    return None
  if lost:
    return lock.lost_error()
  return WorkdirLockedError("The workdir was taken over by another training run (see process 0's error).")
