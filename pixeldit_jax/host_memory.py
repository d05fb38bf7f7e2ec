"""Host memory: glibc malloc settings for JAX on the CPU, applied when a command starts.

XLA:CPU allocates each step's temporaries afresh. Under glibc's defaults, large blocks are
mmap'd and handed back to the kernel when freed, so every step faults its working set in again,
4 KiB at a time: 47 thousand page faults per step for the tiny benchmark config, 200 thousand
at 256^2, about a fifth of a CPU training step (bench/vs_official.py). Keeping freed memory in
the process (no mmap, no trim, one arena) and backing the heap with transparent huge pages
removes them; the cost is that the process keeps its peak heap until it exits.

glibc reads these tunables only when a process starts, so the command-line entry points
(`python -m pixeldit_jax.main`, `.sample`, `.edit`, `.evaluate`) re-execute themselves once,
before JAX is imported, with GLIBC_TUNABLES extended. A tunable the user set keeps the user's
value; PIXELDIT_MALLOC_TUNING=0 turns all of this off. Elsewhere (no glibc, a library import,
a notebook) nothing happens.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Optional

TUNABLES = {
    "glibc.malloc.hugetlb": "1",  # madvise(MADV_HUGEPAGE) on the heap: 2 MiB pages
    "glibc.malloc.mmap_max": "0",  # large blocks from the heap, reused after free
    "glibc.malloc.trim_threshold": str(1 << 36),  # never hand the heap's top back
    "glibc.malloc.arena_max": "1",  # one heap for XLA's worker threads too
}
SWITCH = "PIXELDIT_MALLOC_TUNING"
CLI_MODULES = ("pixeldit_jax.main", "pixeldit_jax.sample", "pixeldit_jax.edit", "pixeldit_jax.evaluate")


def _parse(value: str) -> dict:
  return dict(item.split("=", 1) for item in value.split(":") if "=" in item)


def environ(env: Optional[Mapping[str, str]] = None) -> dict:
  """A copy of `env` (default os.environ) with the tunables added to GLIBC_TUNABLES."""
  env = dict(os.environ if env is None else env)
  if env.get(SWITCH, "1") == "0":
    return env
  merged = {**TUNABLES, **_parse(env.get("GLIBC_TUNABLES", ""))}
  env["GLIBC_TUNABLES"] = ":".join(f"{k}={v}" for k, v in merged.items())
  return env


def needs_restart(env: Optional[Mapping[str, str]] = None) -> bool:
  """True on glibc when the tunables are wanted and this process did not start with them."""
  env = os.environ if env is None else env
  if env.get(SWITCH, "1") == "0" or platform.libc_ver()[0] != "glibc":
    return False
  return not set(TUNABLES) <= set(_parse(env.get("GLIBC_TUNABLES", "")))


def cli_module() -> Optional[str]:
  """The module of `python -m <module> ...`, from the interpreter's own argv; None otherwise."""
  argv = list(getattr(sys, "orig_argv", None) or [])
  return argv[argv.index("-m", 1) + 1] if "-m" in argv[1:-1] else None


def restart_cli_if_needed() -> None:
  """Re-execute `python -m <one of CLI_MODULES> ...` with the tunables; call before importing JAX.

  Only for those commands, recognised from the interpreter's own argv (a script that imports
  the package is left alone). The process keeps its PID, so launchers and signals still apply.
  """
  if cli_module() not in CLI_MODULES or not needs_restart():
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + list(sys.orig_argv)[1:], environ())
