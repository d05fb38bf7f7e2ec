"""Precomputed REPA targets: run the DINOv2 teacher once over a data set, train without it.

  python -m pixeldit_jax.train.repa_features --config=configs/imagenet256_xl.py \
      --config.data.path=DATA --config.repa.teacher_path=DINOV2 --out=FEATURES.npy
  python -m pixeldit_jax.main --config=configs/imagenet256_xl.py --config.repa.features_path=FEATURES.npy ...

The file is a float16 .npy of shape (num_examples, tokens, 768) in the data source's index order;
the trainer reads rows by the batch's `index` field (memory-mapped). It only fits data that is
not randomly augmented (the released recipe has no flips).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import flags
from tqdm import tqdm

from pixeldit_jax import config_lib, fs


class FeatureTable:
  """Host-side lookup of precomputed teacher features by source index."""

  def __init__(self, path: str, expected_tokens: int, expected_dim: int):
    if not fs.isfile(path):
      raise FileNotFoundError(f"No precomputed REPA features at {path!r} (config.repa.features_path); "
                              "make them with python -m pixeldit_jax.train.repa_features")
    self.table = np.load(fs.local_file(path), mmap_mode="r")  # gs:// tables are cached locally
    if self.table.ndim != 3 or self.table.shape[1:] != (expected_tokens, expected_dim):
      raise ValueError(f"{path} holds features of shape {self.table.shape}; this run needs "
                       f"(N, {expected_tokens}, {expected_dim})")

  def __call__(self, index: np.ndarray) -> np.ndarray:
    index = np.asarray(index, np.int64)
    if index.max(initial=0) >= len(self.table):
      raise IndexError(f"example index {int(index.max())} is past the {len(self.table)} precomputed rows")
    return np.asarray(self.table[index], np.float32)


def precompute(config, out: str, batch_size: int = 64) -> str:
  """Teacher features of every example of config.data's source, in index order, to `out`."""
  from pixeldit_jax.data import sources  # noqa: PLC0415
  from pixeldit_jax.data.config import data_config  # noqa: PLC0415
  from pixeldit_jax.teacher import dinov2  # noqa: PLC0415
  rcfg, data = config.repa, data_config(config)
  if data.random_flip:
    raise ValueError("Precomputed REPA features cannot follow random flips; set config.data.random_flip=False")
  model_cfg = config_lib.model_config(config)
  h, w = config.image_size
  size = tuple(rcfg.teacher_size) if rcfg.get("teacher_size") else dinov2.repa_input_size(h, w, model_cfg.patch_size)
  graphdef, params = dinov2.load_teacher(rcfg.teacher_path, dtype=rcfg.teacher_dtype, pos_interpolation="hub")
  source = sources.make_source(config, data)
  fn = jax.jit(lambda p, x: dinov2.teacher_features(graphdef, p, x, size))
  n = len(source)
  with fs.local_output(out, suffix=".npy") as local:  # uploaded when complete (gs://)
    _write_features(fn, params, source, n, batch_size, local)
  return fs.resolve(out)


def _write_features(fn, params, source, n: int, batch_size: int, out: str):
  table = None
  tmp = out + ".partial.npy"
  for start in tqdm(range(0, n, batch_size), desc="teacher features", unit="batch"):
    idx = range(start, min(n, start + batch_size))
    imgs = np.stack([source[i]["image"] for i in idx]).astype(np.float32) / 255.0
    if imgs.shape[-1] == 1:
      imgs = np.repeat(imgs, 3, axis=-1)
    feats = np.asarray(fn(params, imgs), np.float16)
    if table is None:
      table = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, *feats.shape[1:]))
    table[start:start + len(idx)] = feats
  table.flush()
  del table
  os.replace(tmp, out)


def main(argv):
  del argv
  f = flags.FLAGS
  print(precompute(f.config, f.out, f.batch_size))


def _define_flags():
  config_lib.define_config_file("config", None, "Experiment config file (a path or a shipped name).")
  flags.DEFINE_string("out", None, "Output .npy file.")
  flags.DEFINE_integer("batch_size", 64, "Teacher batch size.")
  flags.mark_flags_as_required(["config", "out"])


if __name__ == "__main__":
  from pixeldit_jax import cli
  cli.run_absl(main, _define_flags)
