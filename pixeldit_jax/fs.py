"""The one path layer: every user path may be local or a ``gs://`` (or other fsspec) URL.

Everything goes through ``etils.epath``, the path layer Orbax itself uses: local paths map to
``pathlib``, ``gs://`` to gcsfs (or ``tf.io.gfile`` where TensorFlow is installed). Nothing here
calls ``os.path.abspath`` on a URL (that silently turns ``gs://b/run`` into ``./gs:/b/run``).

Libraries that only read local files (memory-mapped ``.npy``, safetensors, tokenizers) get one
through ``local_file``, which copies a remote file into a cache directory once.

Pointing at a GCS emulator: set ``STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT`` (gcsfs) and
``TENSORSTORE_GCS_HTTP_URL`` to the same address (Orbax's array store); ``use_gcs_emulator``
does both.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import os
import shutil
import socket
import tempfile
import urllib.parse
from typing import IO, Iterator, Union

import numpy as np
from etils import epath

from pixeldit_jax import cli

PathLike = Union[str, os.PathLike, epath.Path]

try:
  import fsspec.config
  # Other processes and tensorstore (Orbax's arrays) write to the same bucket behind gcsfs's back:
  # a cached listing would hide new checkpoint steps or sample parts. Listings are cheap; keep none.
  fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)
except ImportError:  # no fsspec: local paths only (or tf.io.gfile)
  pass


def is_remote(path: PathLike) -> bool:
  """True for URLs (``gs://``, ``s3://``...), False for local paths."""
  return "://" in os.fspath(path)


class RemoteUnreachable(ConnectionError):
  """Cloud Storage cannot be reached at all (no network, no DNS): said in one line."""


cli.register(RemoteUnreachable)  # entry points print it as one `error:` line


_REACHED: set = set()
_PROXY_ENV = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _gcs_endpoint() -> tuple[str, int]:
  emulator = os.environ.get("STORAGE_EMULATOR_HOST")
  if emulator:
    u = urllib.parse.urlsplit(emulator if "://" in emulator else "http://" + emulator)
    return u.hostname or "localhost", u.port or (443 if u.scheme == "https" else 80)
  return "storage.googleapis.com", 443


def check_reachable(url: str, timeout_s: float = 10.0) -> None:
  """Raise RemoteUnreachable at once when a ``gs://`` URL's endpoint cannot be connected to.

  Without this, gcsfs retries a failed DNS lookup for ~40 s, logs a traceback per retry, and the
  caller then sees a missing file or directory, not the missing network. Checked once per
  endpoint and process; skipped behind a proxy (the direct connection would prove nothing)."""
  if not url.startswith("gs://") or any(os.environ.get(k) for k in _PROXY_ENV):
    return
  host, port = _gcs_endpoint()
  if (host, port) in _REACHED:
    return
  try:
    socket.create_connection((host, port), timeout=timeout_s).close()
  except OSError as e:
    reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
    raise RemoteUnreachable(
        f"cannot reach Cloud Storage for {url}: connecting to {host}:{port} failed ({reason}); "
        "check this machine's network, or give a local path") from None
  _REACHED.add((host, port))


def path(p: PathLike) -> epath.Path:
  """An epath for `p`: local paths are made absolute (``~`` expanded), URLs are kept as given."""
  s = os.fspath(p)
  if is_remote(s):
    check_reachable(s)
    return epath.Path(s)
  return epath.Path(os.path.abspath(os.path.expanduser(s)))


def resolve(p: PathLike) -> str:
  """`p` as a string: absolute for local paths, unchanged for URLs (what Orbax expects)."""
  return os.fspath(path(p))


def join(base: PathLike, *parts: str) -> str:
  """Join path parts; keeps ``gs://`` intact (``os.path.join`` does too, but says nothing)."""
  return os.fspath(epath.Path(os.fspath(base)).joinpath(*parts))


def exists(p: PathLike) -> bool:
  return path(p).exists()


def isdir(p: PathLike) -> bool:
  return path(p).is_dir()


def isfile(p: PathLike) -> bool:
  return path(p).is_file()


def makedirs(p: PathLike) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def listdir(p: PathLike) -> list[str]:
  """Sorted entry names (not full paths) of a directory."""
  return sorted(c.name for c in path(p).iterdir())


def glob(p: PathLike, pattern: str) -> list[str]:
  return sorted(os.fspath(c) for c in path(p).glob(pattern))


def open(p: PathLike, mode: str = "r") -> IO:  # noqa: A001 - mirrors builtins.open
  """Open a local or remote file; writing creates the parent directory."""
  fp = path(p)
  if any(c in mode for c in "wax"):
    fp.parent.mkdir(parents=True, exist_ok=True)
  return fp.open(mode)


def read_text(p: PathLike) -> str:
  return path(p).read_text()


def write_text(p: PathLike, text: str) -> None:
  with open(p, "w") as f:
    f.write(text)


def read_bytes(p: PathLike) -> bytes:
  return path(p).read_bytes()


def write_bytes(p: PathLike, data: bytes) -> None:
  with open(p, "wb") as f:
    f.write(data)


def rename(src: PathLike, dst: PathLike) -> None:
  """Rename a file or directory. Object stores have no rename: there it is a server-side copy of
  every object, then a delete (not atomic). gcsfs's own move first tries an API that only
  hierarchical buckets (and no emulator) have, retrying for half a minute."""
  s, d = path(src), path(dst)
  if not is_remote(src):
    s.rename(d)
    return
  for f in (_walk_files(s) if s.is_dir() else [s]):
    f.copy(d / os.path.relpath(os.fspath(f), os.fspath(s)) if f != s else d)
  remove(s)


def remove(p: PathLike) -> None:
  """Delete a file or a whole directory tree; missing is fine."""
  fp = path(p)
  if fp.is_dir():
    fp.rmtree()
  elif fp.exists():
    fp.unlink()


@contextlib.contextmanager
def _replace_when_done(fp: epath.Path, suffix: str = "") -> Iterator[str]:
  """A temporary local file beside `fp` that becomes `fp` (os.replace) if the block succeeds."""
  fp.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.fspath(fp.parent), prefix=f".{fp.name}.", suffix=suffix)
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, os.fspath(fp))
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def atomic_write_bytes(p: PathLike, data: bytes) -> None:
  """Write a file so that readers never see half of it: local files via rename, GCS objects
  are atomic per upload."""
  if is_remote(p):
    write_bytes(p, data)
    return
  with _replace_when_done(path(p)) as tmp, builtins.open(tmp, "wb") as f:
    f.write(data)


def upload_file(local: str, dest: PathLike) -> None:
  """Copy a local file to `dest` (local or remote), streamed."""
  with builtins.open(local, "rb") as src, open(dest, "wb") as dst:
    shutil.copyfileobj(src, dst, length=16 << 20)


def cache_dir() -> str:
  """Where remote files are copied for libraries that need a local file."""
  return os.environ.get("PIXELDIT_CACHE_DIR",
                        os.path.join(os.path.expanduser("~"), ".cache", "pixeldit_jax"))


def local_file(p: PathLike) -> str:
  """A local filename holding `p`'s bytes: `p` itself when local, else a cached copy (keyed by the
  URL, size and modification time, so a replaced object is fetched again)."""
  if not is_remote(p):
    return resolve(p)
  fp = path(p)
  st = fp.stat()
  size = st.length
  key = hashlib.sha256(f"{os.fspath(fp)}|{size}|{st.mtime}".encode()).hexdigest()[:16]
  dest = os.path.join(cache_dir(), "remote", key, fp.name)
  if not (os.path.exists(dest) and os.path.getsize(dest) == size):
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = dest + ".part"
    with fp.open("rb") as src, builtins.open(tmp, "wb") as dst:
      shutil.copyfileobj(src, dst, length=16 << 20)
    os.replace(tmp, dest)
  return dest


def _walk_files(top: epath.Path) -> Iterator[epath.Path]:
  """Every file under `top` (epath's rglob refuses '**' on GCS)."""
  for child in top.iterdir():
    if child.is_dir():
      yield from _walk_files(child)
    else:
      yield child


def local_dir(p: PathLike) -> str:
  """Like `local_file` for a directory (e.g. a Hugging Face model folder), copied whole."""
  if not is_remote(p):
    return resolve(p)
  fp = path(p)
  key = hashlib.sha256(os.fspath(fp).encode()).hexdigest()[:16]
  dest = os.path.join(cache_dir(), "remote", key, fp.name)
  for src in _walk_files(fp):
    rel = os.path.relpath(os.fspath(src), os.fspath(fp))
    target = os.path.join(dest, rel)
    size = src.stat().length
    if os.path.exists(target) and os.path.getsize(target) == size:
      continue
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with src.open("rb") as s, builtins.open(target + ".part", "wb") as d:
      shutil.copyfileobj(s, d, length=16 << 20)
    os.replace(target + ".part", target)
  return dest


def upload_dir(local: str, dest: PathLike, last: str = "") -> None:
  """Copy a local directory tree to `dest` (local or remote), the file named `last` at the end so
  that a reader that checks for it never sees a partial copy."""
  files = sorted((os.path.relpath(os.path.join(r, n), local) for r, _, ns in os.walk(local) for n in ns),
                 key=lambda rel: rel == last)
  for rel in files:
    upload_file(os.path.join(local, rel), join(dest, *rel.split(os.sep)))


class LocalMirror:
  """A local directory copied to a remote one, for libraries that write only local files
  (TensorBoard event writers, the profiler).

  Local targets are used directly; for URLs the files go to a temporary directory and `sync`
  uploads those that changed since the last sync (event files are rewritten whole: GCS objects
  cannot be appended to).
  """

  def __init__(self, target: str, prefix: str = "pixeldit_"):
    self.target = target
    self.remote = is_remote(target)
    if self.remote:
      self.local = tempfile.mkdtemp(prefix=prefix)
    else:
      self.local = resolve(target)
      os.makedirs(self.local, exist_ok=True)
    self._synced: dict[str, tuple[int, int]] = {}

  def sync(self) -> None:
    if not self.remote:
      return
    for root, _, files in os.walk(self.local):
      for name in files:
        local = os.path.join(root, name)
        st = os.stat(local)
        key = (st.st_size, st.st_mtime_ns)
        if self._synced.get(local) != key:
          upload_file(local, join(self.target, *os.path.relpath(local, self.local).split(os.sep)))
          self._synced[local] = key

  def close(self) -> None:
    self.sync()
    if self.remote:
      shutil.rmtree(self.local, ignore_errors=True)


@contextlib.contextmanager
def local_output(p: PathLike, suffix: str = "") -> Iterator[str]:
  """A local filename for a library that can only write local files; uploaded to `p` on success."""
  if not is_remote(p):
    makedirs(os.path.dirname(resolve(p)))
    yield resolve(p)
    return
  fd, tmp = tempfile.mkstemp(suffix=suffix or os.path.splitext(os.fspath(p))[1])
  os.close(fd)
  try:
    yield tmp
    upload_file(tmp, p)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)


def save_npz(p: PathLike, **arrays) -> str:
  """np.savez to a local or remote path; the file appears whole or not at all."""
  fp = path(p)
  if is_remote(p):
    with local_output(p, suffix=".npz") as tmp:
      np.savez(tmp, **arrays)
  else:
    with _replace_when_done(fp, suffix=".npz") as tmp:
      np.savez(tmp, **arrays)
  return os.fspath(fp)


def load_npz(p: PathLike):
  """np.load of a local or remote .npz, never unpickling (object arrays are refused)."""
  return np.load(local_file(p), allow_pickle=False)


def use_gcs_emulator(endpoint: str) -> None:
  """Point gcsfs, google-cloud-storage and tensorstore (Orbax's arrays) at a GCS emulator.

  Call it before the first gs:// access: gcsfs reads its switches when first imported. Its
  hierarchical-namespace probe asks a control-plane API that emulators lack, so it is turned off.
  """
  os.environ["STORAGE_EMULATOR_HOST"] = endpoint
  os.environ["TENSORSTORE_GCS_HTTP_URL"] = endpoint
  os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

