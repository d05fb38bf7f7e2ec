"""A synthetic stand-in for Fashion-MNIST, for tests on machines without the Debian package.

Same files, shapes and class balance as the real set: the four gzipped IDX files, 60,000 train and
10,000 test 28x28 uint8 images, 10 classes in equal numbers, shuffled. Each class is a drawn
silhouette of its garment (T-shirt, trouser, ..., ankle boot) under a random scale, shift, width
and shading, so a small CNN learns it quickly, as it does the real set. It is NOT Fashion-MNIST:
figures measured on it say nothing about the real data. The output is a pure function of the
seed.

  python -m pixeldit_jax.data.fmnist_standin --out DIR
  PIXELDIT_FASHION_MNIST_DIR=DIR python -m pixeldit_jax.main ...   # the loader reads DIR

tests/conftest.py writes it and sets that variable when the Debian package is not installed.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from typing import Optional, Sequence

import numpy as np

from pixeldit_jax import cli

SIZE = 28
SPLITS = {"train": ("train", 60_000, 0), "test": ("t10k", 10_000, 1)}  # prefix, count, seed offset
FILES = tuple(f"{prefix}-{kind}-idx{nd}-ubyte.gz" for prefix, _, _ in SPLITS.values()
              for kind, nd in (("images", 3), ("labels", 1)))
_PIXEL = 2.0 / SIZE  # one pixel in the [-1, 1] drawing coordinates


def _box(u, v, x0, x1, y0, y1):
  """Signed distance-like inside measure (> 0 inside) of an axis-aligned box."""
  return np.minimum(np.minimum(u - x0, x1 - u), np.minimum(v - y0, y1 - v))


def _trapezoid(u, v, y0, y1, w0, w1):
  """Centred trapezoid, half-width w0 at y0 growing linearly to w1 at y1."""
  w = w0 + (w1 - w0) * np.clip((v - y0) / (y1 - y0), 0.0, 1.0)
  return np.minimum(w - np.abs(u), np.minimum(v - y0, y1 - v))


def _ellipse(u, v, cx, cy, rx, ry):
  return (1.0 - np.sqrt(((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2)) * min(rx, ry)


def _union(*ds):
  return np.maximum.reduce(ds)


def _minus(a, b):
  return np.minimum(a, -b)


def _long_sleeves(u, v, bottom):
  return _union(_box(u, v, -0.82, -0.5, -0.55, bottom), _box(u, v, 0.5, 0.82, -0.55, bottom))


def _shape(cls: int, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(inside measure, shading pattern in [0, 1]) of class `cls` at coordinates u (right), v (down)."""
  flat = np.ones_like(u)
  if cls == 0:  # T-shirt/top: body, short wide sleeves, round neck
    d = _union(_box(u, v, -0.45, 0.45, -0.6, 0.85), _box(u, v, -0.85, 0.85, -0.6, -0.2))
    return _minus(d, _ellipse(u, v, 0.0, -0.62, 0.2, 0.14)), flat
  if cls == 1:  # trouser: two legs under a waistband
    d = _union(_box(u, v, -0.42, -0.06, -0.85, 0.9), _box(u, v, 0.06, 0.42, -0.85, 0.9),
               _box(u, v, -0.42, 0.42, -0.85, -0.45))
    return d, flat
  if cls == 2:  # pullover: long sleeves, a darker ribbed hem
    d = _union(_box(u, v, -0.48, 0.48, -0.65, 0.75), _long_sleeves(u, v, 0.75))
    return d, np.where(v > 0.55, 0.55, 1.0)
  if cls == 3:  # dress: a narrow top widening to a long skirt
    return _trapezoid(u, v, -0.85, 0.9, 0.16, 0.62), flat
  if cls == 4:  # coat: long body and sleeves, a dark opening down the middle
    d = _union(_box(u, v, -0.5, 0.5, -0.7, 0.92), _long_sleeves(u, v, 0.85))
    return _minus(d, _box(u, v, -0.04, 0.04, -0.7, 0.92)), flat
  if cls == 5:  # sandal: thin straps over a sole
    d = _union(_box(u, v, -0.9, 0.9, 0.42, 0.56), _box(u, v, -0.8, 0.7, 0.05, 0.14),
               _box(u, v, -0.55, 0.45, -0.22, -0.13), _box(u, v, 0.55, 0.68, -0.25, 0.5))
    return d, flat
  if cls == 6:  # shirt: long sleeves, collar, vertical stripes
    d = _union(_box(u, v, -0.46, 0.46, -0.62, 0.85), _long_sleeves(u, v, 0.7))
    d = _minus(d, _trapezoid(u, v, -0.7, -0.3, 0.22, 0.0))
    return d, 0.7 + 0.3 * np.cos(u * 18.0) ** 2
  if cls == 7:  # sneaker: low, toe to the left, bright sole
    d = _union(_box(u, v, -0.92, 0.88, 0.1, 0.5), _ellipse(u, v, 0.35, 0.1, 0.55, 0.3))
    return d, np.where(v > 0.38, 1.0, 0.6)
  if cls == 8:  # bag: a box under a handle
    handle = _minus(_ellipse(u, v, 0.0, -0.3, 0.42, 0.5), _ellipse(u, v, 0.0, -0.3, 0.3, 0.38))
    return _union(_box(u, v, -0.72, 0.72, -0.25, 0.8), handle), flat
  if cls == 9:  # ankle boot: a tall shaft over a foot, toe to the left
    d = _union(_box(u, v, 0.0, 0.62, -0.75, 0.6), _box(u, v, -0.9, 0.62, 0.05, 0.6),
               _ellipse(u, v, -0.45, 0.1, 0.45, 0.3))
    return d, np.where(v > 0.48, 1.0, 0.7)
  raise ValueError(f"class {cls} not in 0..9")


def draw(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """uint8 (N, 28, 28) images of the given classes; each image's brightest pixel is 255."""
  chunk = 5000  # bounds the float32 temporaries to ~16 MB each
  return np.concatenate([_draw(labels[i:i + chunk], rng) for i in range(0, len(labels), chunk)])


def _draw(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  n = len(labels)
  grid = ((np.arange(SIZE) + 0.5) * _PIXEL - 1.0).astype(np.float32)
  v0, u0 = np.meshgrid(grid, grid, indexing="ij")
  scale = rng.uniform(0.82, 1.05, (n, 1, 1)).astype(np.float32)
  width = rng.uniform(0.85, 1.15, (n, 1, 1)).astype(np.float32)
  shift = rng.uniform(-1.5, 1.5, (2, n, 1, 1)).astype(np.float32) * _PIXEL
  u = (u0 - shift[0]) / (scale * width)
  v = (v0 - shift[1]) / scale
  images = np.zeros((n, SIZE, SIZE), np.float32)
  for cls in range(10):
    idx = np.flatnonzero(labels == cls)
    if len(idx):
      d, pattern = _shape(cls, u[idx], v[idx])
      alpha = np.clip(0.5 + d * scale[idx] / _PIXEL, 0.0, 1.0)  # about one pixel of anti-aliasing
      images[idx] = alpha * np.broadcast_to(pattern, alpha.shape)
  # Smooth shading (a 4x4 grid of random levels, blurred up) and faint pixel noise.
  coarse = rng.uniform(0.55, 1.0, (n, 4, 4)).astype(np.float32)
  shade = np.repeat(np.repeat(coarse, 7, axis=1), 7, axis=2)
  for axis in (1, 2):
    shade = (shade + np.roll(shade, 3, axis) + np.roll(shade, -3, axis)) / 3.0
  images *= shade * rng.uniform(0.92, 1.0, images.shape).astype(np.float32)
  peak = images.reshape(n, -1).max(axis=1)[:, None, None]
  return np.rint(255.0 * images / np.maximum(peak, 1e-6)).astype(np.uint8)


def _write_idx_gz(path: str, array: np.ndarray):
  code = {np.dtype(np.uint8): 0x08}[array.dtype]
  header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  with gzip.open(path, "wb", compresslevel=1) as f:
    f.write(header + np.ascontiguousarray(array).tobytes())


def is_written(directory: str) -> bool:
  return all(os.path.isfile(os.path.join(directory, name)) for name in FILES)


def write(directory: str, seed: int = 0) -> str:
  """Write the four IDX .gz files into `directory` (created; complete or absent, never partial)."""
  if is_written(directory):
    return directory
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".fmnist-standin-", dir=parent)
  try:
    for prefix, count, offset in SPLITS.values():
      rng = np.random.default_rng([seed, offset])
      labels = rng.permutation(np.arange(count) % 10).astype(np.uint8)
      _write_idx_gz(os.path.join(tmp, f"{prefix}-images-idx3-ubyte.gz"), draw(labels, rng))
      _write_idx_gz(os.path.join(tmp, f"{prefix}-labels-idx1-ubyte.gz"), labels)
    try:
      os.rename(tmp, directory)
    except OSError:  # another process finished first
      if not is_written(directory):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return directory


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="directory for the four IDX .gz files")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  print(f"Fashion-MNIST stand-in (synthetic, not the real data set) in {write(args.out, args.seed)}; "
        f"use it with PIXELDIT_FASHION_MNIST_DIR={os.path.abspath(args.out)}")
  return 0


if __name__ == "__main__":
  raise SystemExit(cli.guard(main))
