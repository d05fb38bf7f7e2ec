"""Precomputed text embeddings on disk, so that training need not run the text encoder.

A cache is a directory:

* ``embeddings.npy`` float16 (N, length, dim) (float32 with ``--store-dtype=float32``), read
  memory-mapped; ``mask.npy`` uint8 (N, length);
* ``captions.json``: the N captions (unique, in file order), the lookup keys;
* ``null_embedding.npy`` float32 (1, length, dim) and ``null_mask.npy``: the unconditional
  embedding (the encoder's null rule on "");
* ``meta.json``: the encoder's fingerprint (name, dim, length, and for Gemma-2 the hash of the
  chi prompt), the count and the storage dtype.

Build one with

    python -m pixeldit_jax.text.cache --encoder=minilm --captions=captions.txt --out=DIR

(one caption per line, blank lines skipped; ``--path`` for the model directory, required for
``--encoder=gemma2``). The cache is written to a temporary directory and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from typing import Optional, Sequence

import numpy as np

from pixeldit_jax import cli, fs
from pixeldit_jax.text import base

EMB_FILE, MASK_FILE, CAPTIONS_FILE, META_FILE = "embeddings.npy", "mask.npy", "captions.json", "meta.json"
NULL_EMB_FILE, NULL_MASK_FILE = "null_embedding.npy", "null_mask.npy"
FORMAT = 1


class CaptionsNotCached(KeyError):
  """Some captions of a lookup are not in the cache."""

  def __str__(self):
    return str(self.args[0])


def build_cache(encoder: base.TextEncoder, captions: Sequence[str], out: str, *, batch_size: int = 32,
                store_dtype: str = "float16", overwrite: bool = False, progress: bool = True
                ) -> "TextEmbeddingCache":
  """Encode the unique `captions` with `encoder` and write the cache directory `out`."""
  unique = list(dict.fromkeys(captions))
  if not unique:
    raise ValueError("no captions to encode")
  if fs.exists(out) and not overwrite:
    raise FileExistsError(f"{out!r} already exists (pass overwrite=True / --overwrite to replace it)")
  if store_dtype not in ("float16", "float32"):
    raise ValueError(f"store_dtype must be float16 or float32, not {store_dtype!r}")
  # Written into a temporary directory beside `out` (or a local one for a gs:// `out`), which
  # becomes `out` when complete.
  remote = fs.is_remote(out)
  tmp = tempfile.mkdtemp() if remote else f"{fs.resolve(out)}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  n, length, dim = len(unique), encoder.length, encoder.dim
  emb = np.lib.format.open_memmap(os.path.join(tmp, EMB_FILE), "w+", np.dtype(store_dtype), (n, length, dim))
  mask = np.lib.format.open_memmap(os.path.join(tmp, MASK_FILE), "w+", np.uint8, (n, length))
  from tqdm import tqdm
  bar = tqdm(total=n, desc=f"encoding captions ({encoder.name})", unit="caption", disable=not progress)
  for start in range(0, n, batch_size):
    chunk = unique[start:start + batch_size]
    # A short last batch is padded with "" so that one compiled shape serves every batch.
    e, m = encoder.encode(chunk + [""] * (batch_size - len(chunk)))
    e = e[:len(chunk)].astype(store_dtype)
    if not np.isfinite(e).all():
      raise ValueError(f"embeddings overflow {store_dtype}; rebuild with store_dtype='float32'")
    emb[start:start + len(chunk)] = e
    mask[start:start + len(chunk)] = m[:len(chunk)]
    bar.update(len(chunk))
  bar.close()
  emb.flush()
  mask.flush()
  del emb, mask
  null_emb, null_mask = encoder.encode_null()
  np.save(os.path.join(tmp, NULL_EMB_FILE), null_emb.astype(np.float32))
  np.save(os.path.join(tmp, NULL_MASK_FILE), null_mask.astype(np.uint8))
  with open(os.path.join(tmp, CAPTIONS_FILE), "w", encoding="utf-8") as f:
    json.dump(unique, f, ensure_ascii=False)
  meta = {**encoder.fingerprint(), "count": n, "store_dtype": store_dtype, "format": FORMAT}
  with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  if fs.exists(out):
    fs.remove(out)
  if remote:
    fs.upload_dir(tmp, out, last=META_FILE)  # meta.json last: a cache without it is incomplete
    shutil.rmtree(tmp, ignore_errors=True)
  else:
    os.replace(tmp, fs.resolve(out))
  return TextEmbeddingCache(out)


class TextEmbeddingCache:
  """Read side of a cache directory: `lookup(captions)` by caption text, and `null()`.

  With `expect` (config.text, or a TextEncoder) the cache must have been built by that encoder:
  same name and length (and, for an encoder object, the same dim and chi prompt).
  """

  def __init__(self, path: str, expect=None):
    what = "text embedding cache"
    if not fs.isdir(path):
      raise FileNotFoundError(f"{what} {str(path)!r} (config.text.cache) does not exist; build it with "
                              "python -m pixeldit_jax.text.cache --captions=FILE --out=DIR")
    path = fs.local_dir(path)  # memory-mapped: a gs:// cache is copied to the local cache once
    for name in (META_FILE, CAPTIONS_FILE, EMB_FILE, MASK_FILE, NULL_EMB_FILE, NULL_MASK_FILE):
      base.require_file(path, name, f"{what} is incomplete", field="config.text.cache")
    self.path = path
    self.meta = base.read_json(os.path.join(path, META_FILE))
    self.name, self.length, self.dim = self.meta["encoder"], int(self.meta["length"]), int(self.meta["dim"])
    self.embeddings = np.load(os.path.join(path, EMB_FILE), mmap_mode="r")
    self.mask = np.load(os.path.join(path, MASK_FILE))
    with open(os.path.join(path, CAPTIONS_FILE), encoding="utf-8") as f:
      self.captions = json.load(f)
    self.index = {c: i for i, c in enumerate(self.captions)}
    if self.embeddings.shape != (len(self.captions), self.length, self.dim):
      raise ValueError(f"{path}: {EMB_FILE} has shape {self.embeddings.shape}, meta.json and "
                       f"{CAPTIONS_FILE} say {(len(self.captions), self.length, self.dim)}")
    if expect is not None:
      self.check(expect)

  def __len__(self):
    return len(self.captions)

  def __contains__(self, caption: str) -> bool:
    return caption in self.index

  def check(self, expect) -> None:
    """Raise ValueError unless the cache was built by the encoder `expect` (config or encoder)."""
    if isinstance(expect, base.TextEncoder):
      want, source = expect.fingerprint(), "the text encoder"
    else:
      from pixeldit_jax.text.encoders import expected_fingerprint
      want, source = expected_fingerprint(expect), "config.text"
    diff = {k: (self.meta.get(k), v) for k, v in want.items() if self.meta.get(k) != v}
    if diff:
      detail = ", ".join(f"{k}: cache {have!r} vs {w!r}" for k, (have, w) in sorted(diff.items()))
      raise ValueError(f"text embedding cache {self.path!r} was built by encoder {self.name!r} "
                       f"(length {self.length}, dim {self.dim}) but {source} asks for "
                       f"{want['encoder']!r}: {detail}. Rebuild it with python -m pixeldit_jax.text.cache")

  def lookup(self, captions: Sequence[str], *, null: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(emb float32 (B, length, dim), mask int32 (B, length)) of the cached `captions`.

    `null=True` asks for the null rule, of which only the empty prompt is stored."""
    if isinstance(captions, str):
      captions = [captions]
    if null:
      other = [c for c in captions if c != ""]
      if other:
        raise CaptionsNotCached(f"the text embedding cache {self.path!r} holds only the empty prompt "
                                f"under the null rule, not {other[0][:80]!r}")
      return self.null(len(captions))
    idx = [self.index.get(c, -1) for c in captions]
    missing = [c for c, i in zip(captions, idx) if i < 0]
    if missing:
      shown = ", ".join(repr(c[:80]) for c in missing[:5]) + (" ..." if len(missing) > 5 else "")
      raise CaptionsNotCached(f"{len(missing)} of {len(captions)} captions are not in the text "
                              f"embedding cache {self.path!r}: {shown}")
    idx = np.asarray(idx, np.int64)
    return np.asarray(self.embeddings[idx], np.float32), self.mask[idx].astype(np.int32)

  def null(self, batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The stored unconditional embedding, repeated `batch` times: float32 / int32."""
    emb = np.load(os.path.join(self.path, NULL_EMB_FILE)).astype(np.float32)
    mask = np.load(os.path.join(self.path, NULL_MASK_FILE)).astype(np.int32)
    return np.repeat(emb, batch, axis=0), np.repeat(mask, batch, axis=0)


def load_cache(text_cfg) -> Optional[TextEmbeddingCache]:
  """The cache named by config.text.cache (checked against config.text), or None if unset."""
  path = text_cfg.get("cache") if text_cfg is not None else None
  return TextEmbeddingCache(path, expect=text_cfg) if path else None


def read_captions(path: str) -> list:
  """One caption per line; the line break is dropped, blank lines are skipped."""
  if not fs.isfile(path):
    raise FileNotFoundError(f"captions file {path!r} does not exist")
  text = fs.read_bytes(path).decode("utf-8")
  return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
  from pixeldit_jax.text.encoders import ENCODERS, make_encoder, text_config_defaults
  defaults = text_config_defaults()
  p = cli.ArgumentParser(prog="python -m pixeldit_jax.text.cache", description=__doc__.split("\n\n")[0])
  p.add_argument("--encoder", choices=ENCODERS, default=defaults.encoder)
  p.add_argument("--path", default=None, help="model directory (default: the bundled MiniLM)")
  p.add_argument("--max_length", "--max-length", type=int, default=defaults.max_length, help="MiniLM tokens")
  p.add_argument("--dtype", choices=sorted(base.DTYPES), default=defaults.dtype, help="encoder compute dtype")
  p.add_argument("--captions", required=True, help="text file, one caption per line")
  p.add_argument("--out", required=True, help="cache directory to write")
  p.add_argument("--batch_size", "--batch-size", type=int, default=32)
  p.add_argument("--store_dtype", "--store-dtype", choices=("float16", "float32"), default="float16")
  p.add_argument("--overwrite", action="store_true")
  args = p.parse_args(argv)
  if args.encoder == "gemma2" and not args.path:
    p.error("--encoder=gemma2 needs --path, a local Gemma-2-2B(-IT) directory (nothing is downloaded)")
  captions = read_captions(args.captions)
  encoder = make_encoder(dict(encoder=args.encoder, path=args.path, max_length=args.max_length,
                              dtype=args.dtype))
  cache = build_cache(encoder, captions, args.out, batch_size=args.batch_size, store_dtype=args.store_dtype,
                      overwrite=args.overwrite)
  print(f"wrote {len(cache)} {cache.name} embeddings ({cache.length} x {cache.dim}) to {cache.path}")
  return 0


if __name__ == "__main__":
  sys.exit(cli.guard(main))
