"""Offline sample-quality metric of the Fashion-MNIST demo: class accuracy and a Fréchet distance.

This is NOT FID and its numbers are not comparable with published FID. No InceptionV3 weights can
be had offline, so the feature network is a small CNN the project trains itself on the official
Fashion-MNIST train split (``fmnist_classifier``; ~91.5-92% on the official 10k test split).

  fmnist_accuracy  fraction of samples that the classifier assigns to the class they were
                   generated for (a class-conditional model should approach the classifier's own
                   test accuracy, ~0.92; shuffled labels give ~0.10)
  fmnist_fd        Fréchet distance between Gaussians fitted to the classifier's 128-d penultimate
                   features (post-ReLU) of the samples and of the 10,000 official test images; the
                   test split scores ~0 against itself. Like FID it is biased upward for small
                   sample counts: compare runs only at equal N (10,000 is the natural choice).

Samples are uint8 (N, 28, 28) or (N, 28, 28, 1). 32x32 samples (28x28 zero-padded by 2 pixels on
each side, as the data pipeline does for image_size 32) are centre-cropped back to 28x28, and
3-channel samples (in_channels=3 configs repeat the gray channel) are averaged to one channel.
Anything else is rejected with a ValueError.

The classifier (weights.npz + meta.json) and the test-split statistics (test_stats.npz, keyed by
the md5s of the weights and of the test data) live in ``default_cache_dir()``:
$XDG_CACHE_HOME/pixeldit_jax/fmnist_classifier, by default ~/.cache/pixeldit_jax/fmnist_classifier.

  python -m pixeldit_jax.evaluation.fmnist train [--out DIR] [--epochs 5]
  python -m pixeldit_jax.evaluation.fmnist eval --samples samples.npz [--cache-dir DIR]

``eval`` reads uint8 ``arr_0`` and int ``labels`` from the npz, trains the classifier first if it is
not cached, prints both numbers and writes them to ``<samples stem>_fmnist.json`` next to the npz.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

from pixeldit_jax import cli, fs
from pixeldit_jax.data import load_fashion_mnist
from pixeldit_jax.evaluation import fmnist_classifier as clf_lib
from pixeldit_jax.evaluation.fmnist_classifier import (Classifier, TrainSettings, default_cache_dir,
                                                       load_or_train)
from pixeldit_jax.evaluation.metrics import feature_statistics, frechet_distance

log = logging.getLogger(__name__)

STATS_FILE = "test_stats.npz"
PADDED_SIZE = 32  # 28 + 2 * 2: the data pipeline's zero padding for image_size 32
NOT_FID = ("Fashion-MNIST classifier metric (project-trained CNN; NOT FID, not comparable with "
           "published FID)")

__all__ = ["Classifier", "TrainSettings", "default_cache_dir", "fmnist_metrics", "load_or_train",
           "prepare_labels", "prepare_samples", "reference_stats", "main"]


def prepare_samples(samples) -> np.ndarray:
  """Validate samples and bring them to uint8 (N, 28, 28) (see the module docstring for the rules)."""
  x = np.asarray(samples)
  if x.dtype != np.uint8:
    raise ValueError(f"samples must be uint8 in [0, 255], got dtype {x.dtype} (convert floats in "
                     f"[-1, 1] with np.clip(np.rint((x + 1) * 127.5), 0, 255).astype(np.uint8))")
  if x.ndim == 4:
    if x.shape[-1] == 3:
      x = np.rint(x.astype(np.float32).mean(axis=-1)).astype(np.uint8)
    elif x.shape[-1] == 1:
      x = x[..., 0]
    else:
      raise ValueError(f"samples must have 1 or 3 channels (N, H, W, C), got shape {x.shape}")
  elif x.ndim != 3:
    raise ValueError(f"samples must be (N, 28, 28) or (N, 28, 28, 1) (32x32 is centre-cropped), "
                     f"got shape {x.shape}")
  if len(x) == 0:
    raise ValueError("no samples")
  size, pad = clf_lib.IMAGE_SIZE, (PADDED_SIZE - clf_lib.IMAGE_SIZE) // 2
  if x.shape[1:] == (PADDED_SIZE, PADDED_SIZE):
    x = x[:, pad:pad + size, pad:pad + size]
  elif x.shape[1:] != (size, size):
    raise ValueError(f"samples must be 28x28 (or 32x32, centre-cropped to 28x28), got "
                     f"{x.shape[1]}x{x.shape[2]} (shape {np.shape(samples)})")
  return np.ascontiguousarray(x)


def prepare_labels(labels, num_samples: int) -> np.ndarray:
  """Validate class labels: integers in [0, 10), one per sample."""
  y = np.asarray(labels)
  if y.ndim != 1 or len(y) != num_samples:
    raise ValueError(f"labels must be a 1-D array with one label per sample ({num_samples}), got "
                     f"shape {y.shape}")
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {y.dtype}")
  if len(y) and (y.min() < 0 or y.max() >= clf_lib.NUM_CLASSES):
    raise ValueError(f"labels must be in [0, {clf_lib.NUM_CLASSES}), got values in "
                     f"[{y.min()}, {y.max()}] (the unconditional/null class has no accuracy)")
  return y.astype(np.int64)


def reference_stats(classifier: Classifier, data_path: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of the classifier's features of the official test split, cached next to the weights."""
  test_x, test_y = load_fashion_mnist("test", path=data_path)
  key = {"weights_md5": str(classifier.weights_md5), "test_md5": clf_lib.data_md5(test_x, test_y)}
  memo = classifier._reference_stats
  if memo is not None and memo[0] == key:
    return memo[1]
  path = os.path.join(classifier.cache_dir, STATS_FILE) if classifier.cache_dir else None
  stats = None
  if path and os.path.isfile(path):
    with np.load(path) as npz:
      if all(k in npz.files and str(npz[k]) == v for k, v in key.items()):
        stats = (npz["mu"], npz["sigma"])
  if stats is None:
    stats = feature_statistics(classifier.features(test_x))
    if path and classifier.weights_md5:  # only a saved classifier has a place (and a key) for it
      clf_lib._atomic_write(path, lambda f: np.savez(f, mu=stats[0], sigma=stats[1], **key))
  classifier._reference_stats = (key, stats)
  return stats


def fmnist_metrics(samples_uint8, labels, classifier: Optional[Classifier] = None, *,
                   data_path: Optional[str] = None) -> dict:
  """{"fmnist_accuracy", "fmnist_fd"} of class-conditional samples (NOT FID; see the module docstring).

  samples_uint8: uint8 (N, 28, 28) / (N, 28, 28, 1) (32x32 is centre-cropped, 3 channels averaged);
  labels: the (N,) classes the samples were generated for; classifier: default ``load_or_train()``;
  data_path: the Fashion-MNIST directory of the reference test split (default: the Debian package).
  """
  x = prepare_samples(samples_uint8)
  y = prepare_labels(labels, len(x))
  if len(x) < 2:
    raise ValueError(f"the Fréchet distance needs at least 2 samples, got {len(x)}")
  classifier = classifier if classifier is not None else load_or_train(data_path=data_path)
  if len(x) <= clf_lib.FEATURE_DIM:
    log.warning("fmnist_fd from %d samples (<= %d feature dims): the covariance is singular and the "
                "distance strongly biased; compare only at equal sample counts", len(x),
                clf_lib.FEATURE_DIM)
  feats, logits = classifier.apply(x)
  mu_ref, sigma_ref = reference_stats(classifier, data_path)
  fd = frechet_distance(*feature_statistics(feats), mu_ref, sigma_ref, method="eigh")
  return {"fmnist_accuracy": float(np.mean(np.argmax(logits, -1) == y)),
          "fmnist_fd": max(fd, 0.0)}  # clip round-off below 0 (e.g. the test split against itself)


def load_samples_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
  """uint8 ``arr_0`` and int ``labels`` of a samples npz."""
  with fs.load_npz(path) as npz:
    missing = [k for k in ("arr_0", "labels") if k not in npz.files]
    if missing:
      raise ValueError(f"{path} lacks {missing} (it holds {npz.files}); expected uint8 'arr_0' "
                       f"(N, 28, 28[, 1]) and int 'labels' (N,)")
    return npz["arr_0"], npz["labels"]


def _train_cmd(args) -> int:
  out = args.out or default_cache_dir()
  settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                           max_steps=args.max_steps)
  classifier = clf_lib.train(settings, data_path=args.data_path)
  clf_lib.save(classifier, out)
  meta = classifier.meta
  print(f"Fashion-MNIST classifier: test accuracy {meta['test_accuracy']:.4f} on the official 10k "
        f"test split after {meta['epochs']:.2f} epochs ({meta['steps']} steps, "
        f"{meta['train_seconds']:.0f} s); saved to {out}")
  if meta["test_accuracy"] < 0.9:
    print(f"WARNING: test accuracy {meta['test_accuracy']:.4f} is below 0.90; train longer "
          f"(--epochs) before using it as the demo metric", file=sys.stderr)
  return 0


def _eval_cmd(args) -> int:
  samples, labels = load_samples_npz(args.samples)
  classifier = load_or_train(args.cache_dir, data_path=args.data_path)
  start = time.perf_counter()
  result = fmnist_metrics(samples, labels, classifier, data_path=args.data_path)
  record = dict(result, num_samples=int(len(samples)), samples=fs.resolve(args.samples),
                classifier_test_accuracy=classifier.test_accuracy,
                classifier_weights_md5=classifier.weights_md5,
                reference="Fashion-MNIST official test split (10,000 images)", note=NOT_FID,
                seconds=round(time.perf_counter() - start, 2))
  out = args.out or os.path.splitext(args.samples)[0] + "_fmnist.json"
  fs.write_text(out, json.dumps(record, indent=2))
  print(f"{NOT_FID}\n  samples: {len(samples)} from {args.samples}\n"
        f"  fmnist_accuracy: {result['fmnist_accuracy']:.4f} (classifier's own test accuracy "
        f"{classifier.test_accuracy:.4f})\n  fmnist_fd: {result['fmnist_fd']:.4f}\n  written to {out}")
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = cli.ArgumentParser(prog="python -m pixeldit_jax.evaluation.fmnist",
                                   description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="train the classifier on the official train split and cache it")
  t.add_argument("--out", default=None, help=f"cache directory (default {default_cache_dir()})")
  t.add_argument("--epochs", type=float, default=clf_lib.DEFAULT_EPOCHS)
  t.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
  t.add_argument("--lr", type=float, default=TrainSettings.lr)
  t.add_argument("--seed", type=int, default=TrainSettings.seed)
  t.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (tests)")
  t.add_argument("--data-path", default=None, help="Fashion-MNIST IDX directory (default: Debian's)")
  e = sub.add_parser("eval", help="score a samples npz (uint8 arr_0, int labels)")
  e.add_argument("--samples", required=True)
  e.add_argument("--cache-dir", default=None, help=f"classifier directory (default {default_cache_dir()})")
  e.add_argument("--out", default=None, help="JSON path (default: <samples stem>_fmnist.json)")
  e.add_argument("--data-path", default=None, help="Fashion-MNIST IDX directory (default: Debian's)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  try:
    return _train_cmd(args) if args.command == "train" else _eval_cmd(args)
  except (ValueError, FileNotFoundError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(cli.guard(main))
