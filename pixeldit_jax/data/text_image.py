"""Text-to-image data: image-caption sources and a Grain pipeline with aspect-ratio buckets.

  pipeline = build_text_image(config)    # process_index/count default to jax.process_index()/count()
  it = iter(pipeline)                    # checkpointable: get_state()/set_state(), and
                                         # grain.checkpoint.CheckpointSave/Restore(it) in Orbax
  batch = next(it)                       # B_local = config.batch_size // process_count
    image      uint8 (B_local, Hb, Wb, 3)  one bucket per step, the same on every process
    caption    object (B_local,)           python str
    skipped    int32 (B_local,)  1: the record was unreadable (or its caption empty) and was
                                 replaced by the next readable record of the same bucket
    converted  int32 (B_local,)  1: the image was not 8-bit RGB (gray, RGBA, palette, 16-bit, ...)
    index      int64 (B_local,)  the source record read (after any replacement), as in ``build``

Sources (``config.data.source``):
  webdataset        `path`: a directory of *.tar shards, a glob, or one .tar. A record is the
                    members sharing a key (the member path up to the first '.' of its file name):
                    an image (jpg, jpeg, png, webp) and a caption (.txt, else .json with the
                    first of the fields 'caption', 'prompt', 'text'). Each shard is indexed once
                    (member offsets, image sizes from the headers) into `<shard>.pixeldit-index.json`
                    next to it, or under ~/.cache/pixeldit_jax/wds_index when that is read-only.
  caption_folder    `path`: images plus `captions.jsonl` ({"file": ..., "caption": ...} per line)
                    or `captions.tsv` (file<TAB>caption); files are relative to `path`.
  captioned_fmnist  the embedded demo (``captioned_fmnist``): `split` 'train' | 'test' selects the
                    Fashion-MNIST images, image_size must be square (56 or 64).
  fake_text         deterministic random images and captions (tests, benchmarks); with buckets
                    each record has the size of a random bucket.

Sizes: without buckets every image is resized to cover config.image_size and centre-cropped; with
``buckets`` ('ASPECT_RATIO_512' | 'ASPECT_RATIO_1024' | 'auto') each record goes to the bucket
nearest to its aspect ratio and is resized to cover it and centre-cropped (the official transform,
see ``buckets``). The filter is ``resize``: the release resizes bilinearly in its fixed-size stage 1
(``PixelDataset``) and bicubically with buckets (``PixelDatasetMS``); configs/t2i_1024.py sets it
per stage. Resizing does not count as a conversion.

Batching plan (every global batch is one bucket; all processes agree without communicating):
each bucket's records are split into equal, disjoint, interleaved per-process shards of L_b
records; an epoch holds n_b = L_b // B_local steps of bucket b (the official drop-last bucket
sampler: buckets with fewer than process_count * B_local records are never used), in an order
drawn from (seed, epoch) that every process computes the same way. Step s of bucket b takes the
next B_local positions of this process's shard of b, reshuffled every epoch. The stream is a
MapDataset up to the batch, so it does not depend on the worker count (its saved state does).

Fields of ``config.data`` read here (``default_text_image_config`` gives them all):
  source, path, split, num_workers, read_threads, shuffle   as in ``pixeldit_jax.data``
  buckets           None   None | 'ASPECT_RATIO_512' | 'ASPECT_RATIO_1024' | 'auto' (from image_size)
  resize            'bicubic'  'bicubic' | 'bilinear': the resize-to-cover filter
  heldout_captions  100    captioned_fmnist: the first n of ``captioned_fmnist.heldout_captions``
                           never appear in the stream (the demo's evaluation grid uses them)
  num_records       None   fake_text: the number of records (None: 65,536)
Also read: config.seed, config.batch_size (global), config.image_size (H, W).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import sys
import tarfile
import threading
from concurrent import futures
from typing import Any, Optional, Sequence

import grain
import ml_collections
import numpy as np
from ml_collections import config_dict
from PIL import Image

from pixeldit_jax import fs
from pixeldit_jax.data import buckets as buckets_lib
from pixeldit_jax.data import captioned_fmnist, identity, transforms
from pixeldit_jax.data.base import DataNotFoundError, UnreadableDataError
from pixeldit_jax.data.config import data_config, default_data_config
from pixeldit_jax.data.pipeline import MAX_TRIES, local_batch_size, read_in_parallel, resolve_process

log = logging.getLogger(__name__)

from pixeldit_jax.data.config import T2I_SOURCES  # noqa: E402  (one list for both pipelines)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_FIELDS = ("caption", "prompt", "text")
INDEX_SUFFIX = ".pixeldit-index.json"
INDEX_FORMAT = "pixeldit-jax/wds-index/1"
FAKE_RECORDS = 1 << 16
_LOGGED_FAILURES = 20
_INDEX_MEMO: dict = {}  # (shard path, size, mtime) -> index, shared by the pipelines of a process
_INDEX_LOCK = threading.Lock()


def default_text_image_config(**overrides: Any) -> ml_collections.ConfigDict:
  """The data section for text-to-image runs: ``default_data_config`` with a T2I source."""
  return default_data_config(**{"source": "captioned_fmnist", **overrides})


def _data_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.data over the defaults, validated, with a text-to-image source."""
  d = data_config(config)
  if d.source not in T2I_SOURCES:
    raise ValueError(f"config.data.source must be one of {T2I_SOURCES} for text-to-image, got "
                     f"{d.source!r}")
  return d


# ---------------------------------------------------------------- decoding


def decode_image(data: bytes) -> tuple[Image.Image, bool]:
  """Image file bytes -> (8-bit RGB PIL image, converted). Raises on unreadable or truncated data."""
  with Image.open(io.BytesIO(data)) as img:
    img.load()  # decodes everything now, so truncation raises here
    rgb, converted = transforms.to_model_mode(img, 3)
    if rgb is img:
      rgb = img.copy()  # outlive the context manager
  return rgb, converted


def caption_from_json(data: bytes) -> str:
  value = json.loads(data.decode("utf-8"))
  if isinstance(value, dict):
    for field in CAPTION_FIELDS:
      if field in value:
        return value[field] if isinstance(value[field], str) else ""
  return ""


def clean_caption(text: Optional[str], where: str) -> str:
  text = (text or "").strip()
  if not text:
    raise ValueError(f"empty caption ({where})")
  return text


def header_size(f) -> tuple[int, int]:
  """(H, W) from an image header (PIL reads only what it needs); (0, 0) if it is unreadable."""
  try:
    with Image.open(f) as img:
      return int(img.height), int(img.width)
  except Exception:  # pylint: disable=broad-except  (any unreadable header: the record fails later)
    return 0, 0


class _Region(io.RawIOBase):
  """A read-only file view of bytes [start, start + size) of an open file."""

  def __init__(self, f, start: int, size: int):
    super().__init__()
    self._f, self._start, self._size, self._pos = f, start, size, 0

  def readable(self):
    return True

  def seekable(self):
    return True

  def tell(self):
    return self._pos

  def seek(self, offset, whence=io.SEEK_SET):
    base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
    self._pos = max(0, base + offset)
    return self._pos

  def readinto(self, buffer):
    n = max(0, min(len(buffer), self._size - self._pos))
    self._f.seek(self._start + self._pos)
    data = self._f.read(n)
    buffer[:len(data)] = data
    self._pos += len(data)
    return len(data)


# ---------------------------------------------------------------- webdataset tar shards


def list_shards(path: Optional[str]) -> list[str]:
  """The .tar shards of `path` (a directory, a glob, or one file), sorted."""
  if not path:
    raise DataNotFoundError("source 'webdataset' needs config.data.path = a directory (or glob) "
                            "of .tar shards")
  if fs.isdir(path):
    shards = fs.glob(path, "*.tar")
  elif any(ch in path for ch in "*?[") and not fs.is_remote(path):
    shards = glob.glob(os.path.expanduser(path))
  elif any(ch in path for ch in "*?["):  # gs://bucket/dir/shard-*.tar: a pattern in the last part
    parent, pattern = path.rsplit("/", 1)
    shards = fs.glob(parent, pattern) if fs.isdir(parent) else []
  else:
    shards = [path] if fs.isfile(path) else []
  shards = sorted(fs.resolve(s) for s in shards if fs.isfile(s))
  if not shards:
    raise DataNotFoundError(f"No .tar shards found at {path!r} (expected a directory or glob of "
                            "webdataset shards: key.jpg|jpeg|png|webp + key.txt|json)")
  return shards


def split_member(name: str) -> tuple[str, str]:
  """webdataset convention: 'dir/abc.seg.jpg' -> ('dir/abc', 'seg.jpg')."""
  directory, base = os.path.split(name)
  stem, dot, ext = base.partition(".")
  return (os.path.join(directory, stem) if directory else stem), (ext.lower() if dot else "")


def index_shard(shard: str) -> list[list]:
  """[key, image offset, image size, caption kind (0 none, 1 txt, 2 json), caption offset,
  caption size, H, W] per record, in tar order; members without an image are ignored."""
  records: dict[str, dict] = {}
  with fs.open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
    for member in tar:
      if not member.isfile():
        continue
      key, ext = split_member(member.name)
      if os.path.basename(key).startswith("."):  # hidden files, macOS '._' resource forks
        continue
      entry = records.setdefault(key, {})
      if ext in IMAGE_EXTENSIONS and "image" not in entry:
        entry["image"] = (member.offset_data, member.size)
      elif ext == "txt":
        entry["txt"] = (member.offset_data, member.size)
      elif ext == "json":
        entry["json"] = (member.offset_data, member.size)
  rows = []
  with fs.open(shard, "rb") as f:
    for key, entry in records.items():
      if "image" not in entry:
        continue
      off, size = entry["image"]
      h, w = header_size(io.BufferedReader(_Region(f, off, size)))
      kind, (c_off, c_size) = ((1, entry["txt"]) if "txt" in entry else
                               (2, entry["json"]) if "json" in entry else (0, (0, 0)))
      rows.append([key, off, size, kind, c_off, c_size, h, w])
  return rows


def _index_paths(shard: str) -> list[str]:
  cache = os.path.join(os.path.expanduser("~"), ".cache", "pixeldit_jax", "wds_index",
                       hashlib.md5(shard.encode()).hexdigest() + INDEX_SUFFIX)
  return [shard + INDEX_SUFFIX, cache]


def _size_and_mtime_ns(shard: str) -> tuple[int, int]:
  if fs.is_remote(shard):  # object stores give whole seconds
    st = fs.path(shard).stat()
    return int(st.length), int(st.mtime) * 10**9
  st = os.stat(shard)
  return st.st_size, st.st_mtime_ns


def load_shard_index(shard: str) -> list[list]:
  """The shard's index: from memory, from its cache file, or built (and cached) now."""
  size, mtime_ns = _size_and_mtime_ns(shard)
  memo_key = (shard, size, mtime_ns)
  with _INDEX_LOCK:
    if memo_key in _INDEX_MEMO:
      return _INDEX_MEMO[memo_key]
  stamp = {"format": INDEX_FORMAT, "size": size, "mtime_ns": mtime_ns}
  rows = None
  for path in _index_paths(shard):
    try:
      cached = json.loads(fs.read_text(path))
      if all(cached.get(k) == v for k, v in stamp.items()):
        rows = cached["records"]
        break
    except Exception:  # noqa: BLE001 - missing, unreadable (local or remote) or stale: rebuild
      continue
  if rows is None:
    rows = index_shard(shard)
    text = json.dumps(dict(stamp, shard=os.path.basename(shard), records=rows))
    for path in _index_paths(shard):  # next to the data, else in the user cache
      try:
        fs.atomic_write_bytes(path, text.encode())
        break
      except Exception:  # noqa: BLE001 - e.g. a read-only data directory or bucket
        continue
  with _INDEX_LOCK:
    _INDEX_MEMO[memo_key] = rows
  return rows


class WebDatasetSource:
  """Random access to the records of webdataset tar shards through a per-shard offset index."""

  def __init__(self, path: Optional[str], threads: int = 4):
    self.shards = list_shards(path)
    with futures.ThreadPoolExecutor(max(1, threads)) as pool:
      indices = list(pool.map(load_shard_index, self.shards))
    counts = [len(rows) for rows in indices]
    if not sum(counts):
      raise DataNotFoundError(f"The {len(self.shards)} shards at {path!r} hold no images "
                              f"({', '.join(IMAGE_EXTENSIONS)})")
    self.shard_of = np.repeat(np.arange(len(self.shards), dtype=np.int32), counts)
    table = np.asarray([row[1:] for rows in indices for row in rows], np.int64).reshape(-1, 7)
    self.keys = [row[0] for rows in indices for row in rows]
    self.image_off, self.image_size = table[:, 0], table[:, 1]
    self.caption_kind, self.caption_off, self.caption_size = table[:, 2], table[:, 3], table[:, 4]
    self._sizes = table[:, 5:7].astype(np.int32)
    self.description = (f"webdataset {path} ({len(self.shards)} shards, {len(self.keys)} records)")

  def __len__(self) -> int:
    return len(self.keys)

  def sizes(self) -> np.ndarray:
    return self._sizes

  def __getitem__(self, index: int) -> dict:
    shard = self.shards[self.shard_of[index]]
    where = f"{shard}:{self.keys[index]}"
    with fs.open(shard, "rb") as f:
      f.seek(int(self.image_off[index]))
      image_bytes = f.read(int(self.image_size[index]))
      kind = int(self.caption_kind[index])
      f.seek(int(self.caption_off[index]))
      raw = f.read(int(self.caption_size[index])) if kind else b""
    text = raw.decode("utf-8", errors="replace") if kind == 1 else caption_from_json(raw) if kind == 2 else ""
    caption = clean_caption(text, where)
    try:
      image, converted = decode_image(image_bytes)
    except Exception as e:  # any decoder failure: PIL raises OSError, SyntaxError, ValueError, ...
      raise OSError(f"cannot decode image {where}: {type(e).__name__}: {e}") from e
    return {"image": image, "caption": caption, "converted": converted}


# ---------------------------------------------------------------- a folder of images + captions file


def read_captions_file(root: str) -> tuple[list[str], list[str]]:
  """(files relative to root, captions) from captions.jsonl, else captions.tsv."""
  jsonl, tsv = fs.join(root, "captions.jsonl"), fs.join(root, "captions.tsv")
  files, captions = [], []
  if fs.isfile(jsonl):
    with fs.open(jsonl, "rb") as f:
      for n, line in enumerate(io.TextIOWrapper(f, encoding="utf-8"), 1):
        if not line.strip():
          continue
        try:
          entry = json.loads(line)
          files.append(str(entry["file"]))
        except (ValueError, KeyError, TypeError) as e:
          raise ValueError(f"{jsonl}:{n}: expected {{\"file\": ..., \"caption\": ...}}: {e}") from e
        captions.append(str(entry.get("caption") or ""))
  elif fs.isfile(tsv):
    with fs.open(tsv, "rb") as f:
      for line in io.TextIOWrapper(f, encoding="utf-8"):
        line = line.rstrip("\r\n")
        if line:
          file, _, text = line.partition("\t")
          files.append(file)
          captions.append(text)
  else:
    raise DataNotFoundError(f"Caption folder {root!r} has neither captions.jsonl nor captions.tsv")
  if not files:
    raise DataNotFoundError(f"The captions file of {root!r} lists no images")
  return files, captions


class CaptionFolderSource:

  def __init__(self, root: Optional[str], threads: int = 4):
    if not root or not fs.isdir(root):
      raise DataNotFoundError(f"Caption folder {root!r} does not exist; source 'caption_folder' "
                              "needs config.data.path = a folder of images with captions.jsonl or "
                              "captions.tsv")
    self.root, self.threads = fs.resolve(root), threads
    self.files, self.captions = read_captions_file(self.root)
    self._sizes = None
    self.description = f"caption folder {self.root} ({len(self.files)} images)"

  def __len__(self) -> int:
    return len(self.files)

  def _size(self, file: str) -> tuple[int, int]:
    try:
      with fs.open(fs.join(self.root, file), "rb") as f:
        return header_size(f)
    except OSError:
      return 0, 0

  def sizes(self) -> np.ndarray:
    """(H, W) of every image from its header, read once (only bucketed pipelines need them)."""
    if self._sizes is None:
      with futures.ThreadPoolExecutor(max(1, self.threads)) as pool:
        self._sizes = np.asarray(list(pool.map(self._size, self.files)), np.int32).reshape(-1, 2)
    return self._sizes

  def __getitem__(self, index: int) -> dict:
    path = fs.join(self.root, self.files[index])
    caption = clean_caption(self.captions[index], path)
    try:
      image, converted = decode_image(fs.read_bytes(path))
    except Exception as e:  # pylint: disable=broad-except
      raise OSError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    return {"image": image, "caption": caption, "converted": converted}


# ---------------------------------------------------------------- fake


_FAKE_WORDS = ("a", "photo", "of", "red", "blue", "cat", "dog", "tree", "house", "on", "the",
               "beach", "at", "night", "painting", "small", "large", "green", "car", "river")


class FakeTextSource:
  """Record i: random pixels and a random 4-12 word caption from a generator seeded with (seed, i);
  its size is one of `sizes`, drawn once for all records from a generator seeded with seed."""

  def __init__(self, sizes: Sequence[tuple[int, int]], seed: int = 0, num_records: Optional[int] = None):
    self.choices = np.asarray(sizes, np.int32).reshape(-1, 2)
    self.seed, self.num_records = int(seed), int(num_records or FAKE_RECORDS)
    self._sizes = self.choices[np.random.default_rng((self.seed, 1)).integers(
        len(self.choices), size=self.num_records)]
    self.description = f"fake text-image data ({self.num_records} records)"

  def __len__(self) -> int:
    return self.num_records

  def sizes(self) -> np.ndarray:
    return self._sizes

  def __getitem__(self, index: int) -> dict:
    rng = np.random.default_rng((self.seed, int(index)))
    h, w = (int(s) for s in self._sizes[index])
    words = rng.choice(len(_FAKE_WORDS), int(rng.integers(4, 13)))
    return {"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
            "caption": " ".join(_FAKE_WORDS[k] for k in words), "converted": False}


def make_source(config: ml_collections.ConfigDict, data: ml_collections.ConfigDict,
                table: buckets_lib.BucketTable):
  threads = max(1, int(data.read_threads))
  if data.source == "webdataset":
    return WebDatasetSource(data.path, threads)
  if data.source == "caption_folder":
    return CaptionFolderSource(data.path, threads)
  if data.source == "captioned_fmnist":
    h, w = (int(s) for s in config.image_size)
    if h != w:
      raise ValueError(f"captioned_fmnist needs a square image_size, got {(h, w)}")
    return captioned_fmnist.CaptionedFashionMNIST(data.split, data.path, h, int(data.heldout_captions))
  if data.source == "fake_text":
    return FakeTextSource(table.sizes, int(config.seed), data.num_records)
  raise ValueError(f"Unknown text-to-image source {data.source!r}")


# ---------------------------------------------------------------- the bucket plan


def _seed32(*parts: int) -> int:
  return int(np.random.SeedSequence([int(p) % (1 << 63) for p in parts]).generate_state(1)[0])


class BucketPlan:
  """Stream position k -> (bucket, this process's record) for the bucket-per-step schedule.

  Step s = k // B_local is in epoch e = s // steps_per_epoch; its bucket and that bucket's
  occurrence count within the epoch come from the epoch's schedule (the same on every process).
  """

  def __init__(self, record_buckets: np.ndarray, num_buckets: int, process_index: int,
               process_count: int, batch_size: int, seed: int, shuffle: bool):
    self.batch_size, self.seed, self.shuffle = int(batch_size), int(seed), bool(shuffle)
    self.shards, self.steps = [], np.zeros(num_buckets, np.int64)
    self.perms = []
    for b in range(num_buckets):
      members = np.flatnonzero(record_buckets == b)
      per_process = len(members) // process_count
      self.shards.append(members[process_index:per_process * process_count:process_count])
      self.steps[b] = per_process // self.batch_size
      self.perms.append(grain.MapDataset.range(per_process).shuffle(seed=_seed32(seed, 1, b))
                        if shuffle and per_process else None)
    self.steps_per_epoch = int(self.steps.sum())
    self._memo, self._lock = {}, threading.Lock()

  def __getstate__(self):
    return dict(self.__dict__, _memo={}, _lock=None)

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def schedule(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(bucket of each step of `epoch`, how many earlier steps of the epoch used that bucket)."""
    with self._lock:
      if epoch in self._memo:
        return self._memo[epoch]
    order = np.repeat(np.arange(len(self.steps), dtype=np.int32), self.steps)
    if self.shuffle:
      order = np.random.default_rng(_seed32(self.seed, 2, epoch)).permutation(order)
    sort = np.argsort(order, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(order, minlength=len(self.steps)))[:-1]])
    occurrence = np.empty(len(order), np.int64)
    occurrence[sort] = np.arange(len(order)) - starts[order[sort]]
    with self._lock:
      if len(self._memo) > 2:
        self._memo.clear()
      self._memo[epoch] = (order, occurrence)
    return order, occurrence

  def bucket_of_step(self, step: int) -> int:
    epoch, s = divmod(int(step), self.steps_per_epoch)
    return int(self.schedule(epoch)[0][s])

  def slot(self, k: int) -> tuple[int, int]:
    """(bucket, position in this process's shard of it) of stream position k."""
    step, j = divmod(int(k), self.batch_size)
    epoch, s = divmod(step, self.steps_per_epoch)
    order, occurrence = self.schedule(epoch)
    b = int(order[s])
    i = int(occurrence[s]) * self.batch_size + j
    length = len(self.shards[b])
    pos = int(self.perms[b][epoch * length + i]) if self.perms[b] is not None else i
    return b, pos


class ReadSlot(grain.transforms.Map):
  """Stream position -> example; an unreadable record is replaced by the next one of its bucket shard."""

  def __init__(self, source, plan: BucketPlan, table: buckets_lib.BucketTable,
               max_tries: int = MAX_TRIES, resize: str = "bicubic"):
    self.source, self.plan, self.sizes, self.resize = source, plan, table.sizes, resize
    self.max_tries = int(max_tries)
    self._failures = 0

  def map(self, k: Any) -> dict:
    b, pos = self.plan.slot(int(k))
    shard = self.plan.shards[b]
    tries = min(self.max_tries, len(shard))
    for t in range(tries):
      index = int(shard[(pos + t) % len(shard)])
      try:
        example = self.source[index]
        image = example["image"]
        if isinstance(image, np.ndarray) and image.shape[:2] == self.sizes[b]:
          pixels = image
        else:
          img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
          pixels = np.asarray(buckets_lib.resize_to_bucket(img, self.sizes[b], self.resize), np.uint8)
      except Exception as e:  # pylint: disable=broad-except  (any unreadable record is skipped)
        self._failures += 1
        if self._failures <= _LOGGED_FAILURES:
          log.warning("Skipping unreadable record %d of %s: %s", index, self.source.description, e)
        continue
      return {"image": pixels, "caption": example["caption"], "skipped": np.int32(t > 0),
              "converted": np.int32(bool(example["converted"])), "index": np.int64(index)}
    raise UnreadableDataError(f"{tries} consecutive records of bucket {self.sizes[b]} of "
                              f"{self.source.description} could not be read; the data set looks "
                              "broken (see the warnings above for the errors)")


def stack_batch(examples: Sequence[dict]) -> dict:
  """Stack examples; captions become an object array of python str."""
  captions = np.empty(len(examples), object)
  captions[:] = [str(e["caption"]) for e in examples]
  return {"image": np.stack([e["image"] for e in examples]), "caption": captions,
          "skipped": np.asarray([e["skipped"] for e in examples], np.int32),
          "converted": np.asarray([e["converted"] for e in examples], np.int32),
          "index": np.asarray([e["index"] for e in examples], np.int64)}


def build_plan(config: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1):
  """(source, bucket table, plan, per-record bucket) of a config, without the Grain pipeline."""
  data = _data_fields(config)
  batch_size = local_batch_size(int(config.batch_size), process_count)
  table = buckets_lib.table_for(data.buckets, config.image_size)
  if data.buckets and tuple(int(s) for s in config.image_size) != table.sizes[table.nearest_one(1, 1)]:
    log.warning("config.image_size %s differs from the 1:1 bucket %s of %s; the buckets decide the "
                "training sizes", tuple(config.image_size), table.sizes[table.nearest_one(1, 1)],
                table.name)
  source = make_source(config, data, table)
  if len(table) == 1:
    record_buckets = np.zeros(len(source), np.int32)
  else:
    sizes = source.sizes()
    record_buckets = table.nearest(sizes[:, 0], sizes[:, 1])
  plan = BucketPlan(record_buckets, len(table), process_index, process_count, batch_size,
                    int(config.seed), bool(data.shuffle))
  if plan.steps_per_epoch == 0:
    raise ValueError(f"{source.description} has no bucket with at least process_count x B_local "
                     f"= {process_count} x {batch_size} records; nothing to batch")
  counts = np.bincount(record_buckets, minlength=len(table))
  unused = [(table.sizes[b], int(counts[b])) for b in range(len(table))
            if 0 < counts[b] < process_count * batch_size]
  if unused:
    log.warning("%d buckets hold fewer than %d records and are never used: %s", len(unused),
                process_count * batch_size, unused)
  return source, table, plan, record_buckets


def build_text_image(config: ml_collections.ConfigDict, process_index: Optional[int] = None,
                     process_count: Optional[int] = None) -> grain.IterDataset:
  """The text-to-image training pipeline of this process; ``iter()`` of it is checkpointable."""
  process_index, process_count = resolve_process(process_index, process_count)
  data = _data_fields(config)
  source, table, plan, _ = build_plan(config, process_index, process_count)
  batch_size = plan.batch_size
  ds = grain.MapDataset.range(sys.maxsize)  # stream positions; the plan handles the epochs
  ds = ds.map(ReadSlot(source, plan, table, resize=data.resize))
  ds = ds.batch(batch_size, drop_remainder=True, batch_fn=stack_batch)
  ds = read_in_parallel(ds, data)
  ds.identity = identity.record(source, data)  # what checkpoints record (data.identity)
  log.info("Text-image data: %s, process %d/%d, buckets %s, %d steps per epoch, local batch %d, "
           "%d workers", source.description, process_index, process_count, table.name,
           plan.steps_per_epoch, batch_size, data.num_workers)
  return ds
