"""Quiet console, complete log file.

Entry points call `setup(workdir)` once. Then the console shows what a person needs (lines sent
through `console()`: the run summary, one line per log interval, progress messages), our own
warnings and errors, and libraries' critical records; everything else at INFO and above (Orbax, absl, jax, grain,
gcsfs, tensorstore...) goes to ``<workdir>/log.txt`` only. ``--verbosity=N`` given on the command
line puts every record at that level on the console as well, as absl does by default.

The log file goes through the path layer: for a ``gs://`` workdir it is written locally (after
what the bucket already has, so resumed runs continue it) and uploaded on `flush` and `close`.
Processes other than 0 write ``log.p<N>.txt``.

Console lines are written with ``tqdm.write`` so that they never cut a progress bar.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import sys
import tempfile
import threading
import time
from typing import Callable, Optional, Union

from tqdm import tqdm

from pixeldit_jax import fs

CONSOLE = "pixeldit_jax.console"  # the logger whose records are the console's plain lines
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_UPLOAD_EVERY_S = 30.0  # remote log.txt: at most one upload per this many seconds before close

_active: Optional["RunLog"] = None


def console(msg: str, *args) -> None:
  """A line for the person watching (and the log file): no prefix, never cuts the bar. Without
  `setup` (a notebook, a test) it is printed directly."""
  if _active is None:
    tqdm.write(msg % args if args else msg, file=sys.stderr)
  logging.getLogger(CONSOLE).info(msg, *args, stacklevel=2)  # the caller's file:line in the log


@contextlib.contextmanager
def if_still_running(seconds: float, fn: Callable, *args):
  """Call fn(*args) from a timer thread if the block is still running after `seconds`."""
  timer = threading.Timer(seconds, fn, args)
  timer.daemon = True
  timer.start()
  try:
    yield
  finally:
    timer.cancel()


def after(seconds: float, msg: str, *args):
  """Say `msg` on the console only if the block is still running after `seconds` (a wait that is
  usually instant but can take minutes, e.g. a checkpoint upload)."""
  return if_still_running(seconds, console, msg, *args)


class _TqdmStream:
  """A stream for logging handlers that writes around tqdm bars."""

  def write(self, text: str) -> None:
    text = text.rstrip("\n")
    if text:
      tqdm.write(text, file=sys.stderr)

  def flush(self) -> None:
    sys.stderr.flush()


class _ConsoleFilter(logging.Filter):

  def __init__(self, level: Optional[int]):
    super().__init__()
    self.level = level  # --verbosity's level, when it was given

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == CONSOLE:
      return False  # printed plain by the console-channel handler
    if self.level is not None:
      return record.levelno >= self.level
    ours = record.pathname.startswith(_PACKAGE_DIR)
    # Library errors (e.g. Orbax's save threads, each with a traceback, on a full disk) go to the
    # file only: the entry point ends the run with one `error:` line that names the cause.
    return (ours and record.levelno >= logging.WARNING) or record.levelno >= logging.CRITICAL


class _FileHandler(logging.FileHandler):
  """The log file; when a write fails (full disk, lost mount) it stops writing instead of
  printing logging's own traceback for every later record. The run's error line names the cause."""

  def handleError(self, record: logging.LogRecord) -> None:
    self.broken = True

  def emit(self, record: logging.LogRecord) -> None:
    if not getattr(self, "broken", False):
      super().emit(record)


def _reject(record: logging.LogRecord) -> bool:
  return False


def _formatter() -> logging.Formatter:
  try:
    from absl import logging as absl_logging  # noqa: PLC0415
    return absl_logging.PythonFormatter()
  except ImportError:
    return logging.Formatter("%(asctime)s %(levelname)s %(filename)s:%(lineno)d] %(message)s")


def _flag_level() -> Optional[int]:
  """The standard logging level of --verbosity when it was given on the command line."""
  try:
    from absl import flags  # noqa: PLC0415
    from absl.logging import converter  # noqa: PLC0415
    f = flags.FLAGS
    if not f.is_parsed() or "verbosity" not in f or not f["verbosity"].present:
      return None
    v = f.verbosity
    return converter.absl_to_standard(v) if v <= converter.ABSL_DEBUG else logging.DEBUG - (v - 1)
  except Exception:  # noqa: BLE001 - no absl flags: the quiet default
    return None


class RunLog:
  """The active setup: its handlers, and the log file (uploaded on flush/close when remote)."""

  def __init__(self, target: str, local: str, handlers: list, quieted: list, root_level: int):
    self.path, self._local = target, local
    self.remote = fs.is_remote(target)
    self._handlers, self._quieted, self._root_level = handlers, quieted, root_level
    self._uploaded = 0.0

  def flush(self, force: bool = False) -> None:
    for h in self._handlers:
      h.flush()
    if self.remote and (force or time.monotonic() - self._uploaded >= _UPLOAD_EVERY_S):
      fs.upload_file(self._local, self.path)
      self._uploaded = time.monotonic()

  def close(self) -> None:
    global _active
    self.flush(force=True)
    root = logging.getLogger()
    for h in self._handlers:
      root.removeHandler(h)
      logging.getLogger(CONSOLE).removeHandler(h)
      h.close()
    for handler, f in self._quieted:
      handler.removeFilter(f)
    root.setLevel(self._root_level)  # as it was before setup (tests, notebooks)
    logging.captureWarnings(False)
    if self.remote:
      os.remove(self._local)
    if _active is self:
      _active = None


def setup(workdir: str, process_index: Union[int, Callable[[], int]] = 0,
          verbosity_level: Optional[int] = None) -> RunLog:
  """Console and log-file handlers for a run in `workdir` (replacing an earlier setup).

  `process_index` may be a function (e.g. jax.process_index): it is called once the console is
  quiet, so that the chatter of starting the backends reaches the file and not the console.
  `verbosity_level` (a logging level) puts every record at that level on the console; by
  default the --verbosity flag's, when it was given.
  """
  global _active
  if _active is not None:
    _active.close()
  level = verbosity_level if verbosity_level is not None else _flag_level()
  if level is None:
    # C++ INFO lines of XLA / TensorFlow go straight to stderr; keep their warnings and errors.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  root = logging.getLogger()
  root_level = root.level
  # The file gets INFO even when --verbosity asks the console for less.
  root.setLevel(min(level if level is not None else logging.INFO, logging.INFO))
  logging.captureWarnings(True)  # library warnings.warn(...) -> the file, not the console

  # absl's handler prints to stderr: our console handlers take that over.
  quieted = []
  for h in root.handlers:
    if getattr(getattr(h, "python_handler", h), "stream", None) in (sys.stderr, sys.__stderr__):
      h.addFilter(_reject)
      quieted.append((h, _reject))
  stream = _TqdmStream()
  fmt = _formatter()
  others = logging.StreamHandler(stream)
  others.setFormatter(fmt if level is not None else logging.Formatter("%(levelname)s: %(message)s"))
  others.addFilter(_ConsoleFilter(level))
  plain = logging.StreamHandler(stream)
  plain.setFormatter(logging.Formatter("%(message)s"))
  root.addHandler(others)
  channel = logging.getLogger(CONSOLE)
  channel.setLevel(logging.INFO)
  channel.addHandler(plain)  # and propagates to the root's file handler
  # Held until the file is open.
  early = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
  root.addHandler(early)

  try:
    index = process_index() if callable(process_index) else process_index
    name = "log.txt" if index == 0 else f"log.p{index}.txt"
    target = fs.join(fs.resolve(workdir), name)
    if fs.is_remote(target):
      fd, local = tempfile.mkstemp(prefix="pixeldit_log_", suffix=".txt")
      with os.fdopen(fd, "wb") as f:
        if fs.exists(target):
          f.write(fs.read_bytes(target))
    else:
      fs.makedirs(fs.resolve(workdir))
      local = target
    file_handler = _FileHandler(local, mode="a")
    file_handler.setFormatter(fmt)
  finally:
    root.removeHandler(early)
  early.setTarget(file_handler)
  early.close()  # flushes the held records into the file
  root.addHandler(file_handler)
  _active = RunLog(target, local, [file_handler, others, plain], quieted, root_level)
  return _active


def flush() -> None:
  """Flush (and for a remote workdir, now and then upload) the active log file."""
  if _active is not None:
    _active.flush()


def close() -> None:
  if _active is not None:
    _active.close()


@contextlib.contextmanager
def native_stderr_to_file():
  """Send what native code writes straight to file descriptor 2 into the log file for the
  duration (the profiler's start and stop: with libtpu installed, as the [aot] extra does, its
  TPU profiler plugin reports its absence there in a dozen lines). Unchanged without a log."""
  if _active is None:
    yield
    return
  _active.flush()
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(_active._local, "ab") as f:  # noqa: SLF001 - the local file behind the log
      os.dup2(f.fileno(), 2)
      yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


def path() -> Optional[str]:
  """The active log file's path (local or URL), if any."""
  return _active.path if _active is not None else None
