"""What every entry point shares: expected mistakes end in one ``error: ...`` line and exit code 2.

A user who mistypes a config field, points at a missing file, runs out of disk or starts a second
run on a busy workdir gets one line on stderr that names the field, file or device count and the
fix, not a traceback. The traceback is still there for bugs, and for expected errors on request:
``--verbosity=1`` (absl entry points), ``--debug`` or ``PIXELDIT_DEBUG=1``. ``--help`` exits 0.

    python -m pixeldit_jax.main ...        run_absl(main, define_flags)
    python -m pixeldit_jax.evaluate ...    sys.exit(guard(lambda: main(argv)))

In a job of several processes, an entry point that ends on its own tells the others (peers.leave);
one that outlives a peer ends at once with one line and exit code 3 (peers.EXIT).
"""

from __future__ import annotations

import argparse
import difflib
import errno
import logging
import os
import re
import sys
import traceback
from typing import Callable, Optional, Sequence

EXIT_ERROR = 2
DEBUG_ENV = "PIXELDIT_DEBUG"

# OSErrors that are the machine's or the user's doing, not a bug: said in one line.
_DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.EFBIG: "file too large"}
# Libraries (tensorstore under Orbax, gcsfs) report these as text inside other exception types.
_DISK_TEXT = re.compile(r"no space left on device|disk quota exceeded|read-only file system",
                        re.IGNORECASE)


class UserError(Exception):
  """An expected mistake whose message is complete: what is wrong, where, and the fix."""


_EXPECTED: list[type] = [UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                         FileExistsError, KeyError, ValueError, ImportError]


def register(*classes: type) -> None:
  """Mark more exception classes as expected user errors (each module registers its own)."""
  for c in classes:
    if c not in _EXPECTED:
      _EXPECTED.append(c)


def disk_problem(e: BaseException) -> Optional[str]:
  """'no space left on device' etc. when `e` (or what it wraps) is a storage failure, else None."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
      return _DISK_ERRNOS[e.errno]
    m = _DISK_TEXT.search(str(e))
    if m:
      return m.group(0).lower()
    e = e.__cause__ or e.__context__
  return None


def _peers():
  """pixeldit_jax.peers once a job of several processes was started (no JAX import otherwise)."""
  return sys.modules.get("pixeldit_jax.peers")


def _in_job() -> bool:
  return bool(_peers() and _peers().in_job())


def is_expected(e: BaseException) -> bool:
  return isinstance(e, tuple(_EXPECTED)) or disk_problem(e) is not None


def message(e: BaseException) -> str:
  """The error as one line: KeyError's quotes dropped, continuation lines joined."""
  text = e.args[0] if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) else str(e)
  text = text or type(e).__name__
  lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
  if any(l.startswith("Traceback (most recent call last)") for l in lines):
    lines = lines[:1] + lines[-1:]  # a traceback inside a message: its first and last lines
  return "; ".join(lines) if len(lines) <= 6 else "; ".join(lines[:6]) + " ..."


def debug_requested(argv: Sequence[str]) -> bool:
  if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
    return True
  for i, a in enumerate(argv):
    if a == "--debug":
      return True
    m = re.fullmatch(r"--?(?:verbosity|v)=(-?\d+)", a)
    value = m.group(1) if m else (argv[i + 1] if a in ("--verbosity", "-v") and i + 1 < len(argv) else None)
    if value is not None and value.lstrip("-").isdigit() and int(value) >= 1:
      return True
  return False


def report(e: BaseException, argv: Sequence[str] = (), hint: Optional[str] = None,
           silence_rest: bool = False) -> int:
  """Print `e` as one `error:` line (plus the traceback when asked for); the exit code.

  `silence_rest` (a program about to exit): stderr is closed first, so that what failing
  background work (an async checkpoint's threads, unretrieved asyncio tasks) prints while the
  interpreter shuts down cannot repeat the error or cut into its line."""
  problem = disk_problem(e)
  text = message(e)
  if problem:  # storage libraries bury the cause in long messages: say it, and the file
    where = getattr(e, "filename", None) or next(iter(re.findall(r'"(/[^"]+|gs://[^"]+)"', str(e))), None)
    text = f"{problem}" + (f" writing {where}" if where else f": {text}")
  if hint:
    text = f"{text} ({hint})"
  if debug_requested(argv):
    traceback.print_exception(e)
  elif silence_rest:
    logging.disable(logging.CRITICAL)
    sys.stderr.flush()
    err = os.dup(sys.stderr.fileno())
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
    # A failed save's background threads may have left half a line on stderr just before it was
    # closed: start the error on a line of its own then.
    os.write(err, (("\n" if problem else "") + f"error: {text}\n").encode())
    os.close(err)
    return EXIT_ERROR
  print(f"error: {text}", file=sys.stderr)
  return EXIT_ERROR


def guard(fn: Callable[[], Optional[int]], argv: Optional[Sequence[str]] = None,
          hint: Callable[[BaseException], Optional[str]] = lambda e: None,
          silence_rest: bool = False) -> int:
  """Run an entry point's body: expected errors become one line and exit code 2, other exceptions
  propagate with their traceback. `hint(e)` may add context (e.g. the last good checkpoint).

  In a job of several processes (module docstring), a process that fails ends at once, after its
  line or traceback, and the others end with one line naming it (peers.py)."""
  argv = sys.argv if argv is None else argv
  try:
    code = int(fn() or 0)
  except KeyboardInterrupt:
    _leave(clean=False)
    print("error: interrupted", file=sys.stderr)
    return _end(130)
  except Exception as e:  # noqa: BLE001 - sorted into expected (one line) and bugs (re-raised)
    peers = _peers()
    reason = peers.lost_peer(e) if peers else None
    if reason is not None:  # a collective failed because another process is gone
      if debug_requested(argv):
        traceback.print_exception(e)
      sys.stdout.flush()
      sys.stderr.flush()
      peers.exit_lost(peers.line(f"another process of the job stopped ({reason})"))  # exits, unless already ending
    _leave(clean=False)  # this process's own failure: the others hear of it and say so
    if not is_expected(e):
      if not _in_job():
        raise
      traceback.print_exception(e)
      return _end(1)
    return _end(report(e, argv, hint(e), silence_rest))
  _leave(clean=code == 0)
  return code if code == 0 else _end(code)


def _end(code: int) -> int:
  """`code`; in a job of several processes, end now with it: JAX's exit handler would hold this
  process at a shutdown barrier for the others, which are not coming (5 minutes, then an abort)."""
  if _in_job():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # noqa: SLF001
  return code


def _leave(clean: bool):
  if _peers():
    _peers().leave(clean)


# ----------------------------------------------------------------------------- absl entry points

_HELP = {"-h", "--help", "-help", "--helpshort", "-?", "--helpfull", "--helpxml"}


def _config_override_errors(argv: Sequence[str]) -> list[str]:
  """For each --config.a.b=v naming no field of the loaded config: 'a.b' and the nearest field."""
  from pixeldit_jax import config_lib  # noqa: PLC0415
  spec = None
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
  try:
    config = config_lib.load(spec) if spec else None
  except Exception:  # noqa: BLE001 - the config itself failed: reported by the caller
    return []
  if config is None:
    return []
  problems = []
  for a in argv:
    m = re.fullmatch(r"--config\.([\w.]+)(?:=.*)?", a, re.DOTALL)
    if not m:
      continue
    node, path = config, m.group(1).split(".")
    for depth, key in enumerate(path):
      fields = list(node.keys()) if hasattr(node, "keys") else []
      if key not in fields:
        where = ".".join(path[:depth]) or "config"
        near = difflib.get_close_matches(key, fields, n=1)
        problems.append(f"--config.{m.group(1)}: {where} has no field {key!r}"
                        + (f" (did you mean {'.'.join(path[:depth] + [near[0]])!r}?)" if near else ""))
        break
      node = node[key]
  return problems


def _config_load_error(argv: Sequence[str]) -> Optional[str]:
  """ml_collections defers a config file's load error to the first access: surface it here."""
  from absl import flags  # noqa: PLC0415
  if "config" not in flags.FLAGS:
    return None
  try:
    flags.FLAGS.config.keys()  # a placeholder that raises the stored load error on any access
  except Exception as e:  # noqa: BLE001
    from pixeldit_jax import config_lib  # noqa: PLC0415
    spec = flags.FLAGS["config"].config_filename if hasattr(flags.FLAGS["config"], "config_filename") else "?"
    detail = [l.strip() for l in str(e).splitlines() if l.strip()][-1]
    shipped = config_lib.packaged_configs_dir()
    names = sorted(n[:-3] for n in os.listdir(shipped) if n.endswith(".py") and n != "__init__.py") if shipped else []
    return (f"cannot load --config={spec}: {detail}"
            + (f" (give a path, or a shipped config: {', '.join(names)})" if names else ""))
  return None


def _parse_flags(argv: Sequence[str]):
  from absl import flags  # noqa: PLC0415
  try:
    rest = flags.FLAGS(list(argv))
  except Exception as e:  # noqa: BLE001 - flag and config-override errors: one line each
    problems = _config_override_errors(argv)
    if debug_requested(argv):
      traceback.print_exception(e)
    if problems:
      for p in problems:
        print(f"error: {p}", file=sys.stderr)
    else:
      text = message(e)
      text = re.sub(r"^Configuration is not available because of an earlier failure to load: ", "", text)
      print(f"error: {text} (see --help)", file=sys.stderr)
    sys.exit(EXIT_ERROR)
  problem = _config_load_error(argv)
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    sys.exit(EXIT_ERROR)
  return rest


def run_absl(main: Callable[[Sequence[str]], Optional[int]], define_flags: Callable[[], None],
             hint: Callable[[BaseException], Optional[str]] = lambda e: None) -> None:
  """app.run(main) with --help exiting 0, flag errors and expected errors as one line (exit 2)."""
  from absl import app, flags  # noqa: PLC0415
  define_flags()
  if _HELP & set(sys.argv[1:]):
    full = "--helpfull" in sys.argv or "--helpxml" in sys.argv
    if full:
      print(flags.FLAGS.get_help(), file=sys.stdout)
    else:
      app.usage(shorthelp=True, writeto_stdout=True)
    sys.exit(0)
  argv = list(sys.argv)

  app.run(lambda args: guard(lambda: main(args), argv, hint, silence_rest=True), flags_parser=_parse_flags)


# ----------------------------------------------------------------------------- argparse entry points


class ArgumentParser(argparse.ArgumentParser):
  """argparse with the project's flag style: every long option answers to both spellings
  (`--batch_size` and `--batch-size`; absl's underscores are the documented ones), `--debug`
  for tracebacks, and a usage error as one `error:` line with exit code 2."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    super().add_argument("--debug", action="store_true",
                         help=f"show tracebacks of expected errors too (or set {DEBUG_ENV}=1)")

  def add_argument(self, *names, **kwargs):
    spelled = []
    for n in names:  # the underscore spelling first: it is the one --help shows first
      alts = ("--" + n[2:].replace("-", "_"), "--" + n[2:].replace("_", "-")) if n.startswith("--") else (n,)
      spelled += [a for a in alts if a not in spelled]
    if spelled[0].startswith("--") and "dest" not in kwargs:
      kwargs["dest"] = spelled[0][2:].replace("-", "_")
    return super().add_argument(*spelled, **kwargs)

  def error(self, message: str):
    print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
    sys.exit(EXIT_ERROR)
