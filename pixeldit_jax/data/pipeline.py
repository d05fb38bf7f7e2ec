"""The Grain pipeline: shard by process, shuffle, repeat, read with replacement, batch, prefetch.

  MapDataset.range(n)[process slice] -> seed -> shuffle -> repeat -> FetchWithReplacement
  -> (RandomFlip) -> batch(B_local) -> to_iter_dataset(reader threads) -> mp_prefetch(workers)

Everything up to the batch is a MapDataset, so example k of the stream is a pure function of
(seed, process, k): the output is the same with any number of workers. The iterator state (what
``get_state`` returns) does depend on the worker count, which is therefore fixed by the config.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import grain
import ml_collections
import numpy as np

from pixeldit_jax.data import identity, sources
from pixeldit_jax.data.base import ImageSource, UnreadableDataError
from pixeldit_jax.data.config import data_config

log = logging.getLogger(__name__)

MAX_TRIES = 64  # consecutive unreadable examples tolerated before the data set counts as broken
_LOGGED_FAILURES = 20  # per worker; later failures only show in the "skipped" metric


class FetchWithReplacement(grain.transforms.Map):
  """Source index -> example dict; an unreadable example is replaced by the next readable one.

  The replacement is deterministic (indices i+1, i+2, ... in source order, wrapping around) and is
  marked ``skipped=1``. ``converted`` says whether the source had to convert the image.
  """

  def __init__(self, source: ImageSource, max_tries: int = MAX_TRIES):
    self.source = source
    self.max_tries = max(1, min(int(max_tries), len(source)))
    self._failures = 0

  def map(self, index: Any) -> dict[str, np.ndarray]:
    n = len(self.source)
    index = int(index)
    for k in range(self.max_tries):
      j = (index + k) % n
      try:
        example = self.source[j]
      except Exception as e:  # pylint: disable=broad-except  (any unreadable example is skipped)
        self._failures += 1
        if self._failures <= _LOGGED_FAILURES:
          log.warning("Skipping unreadable example %d of %s: %s", j, self.source.description, e)
        continue
      return {"image": example["image"], "label": np.int32(example["label"]),
              "skipped": np.int32(k > 0), "converted": np.int32(bool(example["converted"])),
              "index": np.int64(j)}  # the source index actually read (precomputed REPA features)
    if self.max_tries == n:
      raise UnreadableDataError(f"None of the {n} examples of {self.source.description} could be "
                                "read (see the warnings above for the errors)")
    raise UnreadableDataError(f"{self.max_tries} consecutive examples of {self.source.description} "
                              f"starting at index {index} could not be read; the data set looks "
                              "broken (see the warnings above for the errors)")


class RandomFlip(grain.transforms.RandomMap):
  """Flip the image left-right with probability 1/2 (seeded per stream position by Grain)."""

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    if rng.random() < 0.5:
      element = dict(element, image=np.ascontiguousarray(element["image"][:, ::-1]))
    return element


def _plain_arrays(batch: dict) -> dict:
  return {key: np.array(value) for key, value in batch.items()}


def _ensure_flags_parsed():
  """Grain's worker start-up reads an absl flag; outside absl.app (tests, notebooks) use defaults."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def local_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(f"config.batch_size ({global_batch}) must be a positive multiple of the "
                     f"number of processes ({process_count})")
  return global_batch // process_count


def read_in_parallel(ds: grain.MapDataset, data) -> grain.IterDataset:
  """Batched MapDataset -> iterator dataset read by `read_threads` threads and, with
  `num_workers` > 0, worker processes."""
  threads = int(data.read_threads)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))
  if data.num_workers > 0:
    _ensure_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(data.num_workers),
                                                     per_worker_buffer_size=2))
    # Workers hand batches over in shared memory; copy them out so that the trainer gets plain
    # arrays and a held batch never pins (or, at exit, leaks) a shared-memory block.
    ds = ds.map(_plain_arrays)
  return ds


def resolve_process(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
  """(index, count) of this process, from JAX where not given."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (workers never need it)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  return process_index, process_count


def build(config: ml_collections.ConfigDict, process_index: Optional[int] = None,
          process_count: Optional[int] = None) -> grain.IterDataset:
  """The training input pipeline of this process; ``iter()`` of it is a checkpointable iterator.

  Batches are dicts of numpy arrays: image uint8 (B_local, H, W, C), label / skipped / converted
  int32 (B_local,), index int64 (B_local,) (source indices), with
  B_local = config.batch_size // process_count. Its `identity` attribute names the data
  (``data.identity.record``).
  """
  process_index, process_count = resolve_process(process_index, process_count)
  data = data_config(config)
  batch_size = local_batch_size(int(config.batch_size), process_count)
  source = sources.make_source(config, data)
  per_process = len(source) // process_count
  if per_process == 0:
    raise ValueError(f"{source.description} has fewer examples than there are processes "
                     f"({process_count})")
  # Equal, disjoint, interleaved slices keep every process's epochs the same length.
  ds = grain.MapDataset.range(len(source))[process_index:per_process * process_count:process_count]
  ds = ds.seed(int(config.seed))
  if data.shuffle:
    ds = ds.shuffle()
  ds = ds.repeat()  # infinite; reshuffled every epoch
  ds = ds.map(FetchWithReplacement(source))
  if data.random_flip:
    ds = ds.random_map(RandomFlip())
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = read_in_parallel(ds, data)
  ds.identity = identity.record(source, data)  # what checkpoints record (data.identity)
  log.info("Data: %s, process %d/%d, %d examples per process, local batch %d, %d workers",
           source.description, process_index, process_count, per_process, batch_size,
           data.num_workers)
  return ds
