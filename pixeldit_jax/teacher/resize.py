"""Bicubic resizing that reproduces ``torch.nn.functional.interpolate(mode="bicubic")``.

``jax.image.resize(..., "cubic")`` is not a drop-in: it uses Keys' a = -0.5 and renormalises the
kernel at the borders. torch (align_corners=False) uses a = -0.75, clamps the four sample indices
to the edge, and maps output pixel i to input coordinate ``s * (i + 0.5) - 0.5`` with
``s = 1 / scale_factor`` when a scale factor is given and ``s = in / out`` otherwise; the DINOv2
hub code depends on that distinction (spec §4.2). With ``antialias=True`` torch switches to a
different, PIL-like filter (a = -0.5, support widened by the downscale factor, weights
renormalised), reproduced here too.

Each axis is resized by a small (out, in) matrix built on the host in float32, following torch's
arithmetic, and applied with one full-precision einsum per axis, so the result is jittable and
matches torch to float32 rounding.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_A = -0.75  # torch's cubic coefficient without antialias
_A_AA = -0.5  # and with antialias


def _source_scale(in_size: int, out_size: int, scale_factor: Optional[float]) -> np.float32:
  """Input step per output pixel as torch computes it (float32)."""
  if scale_factor is not None and scale_factor > 0:
    return np.float32(1.0 / scale_factor)
  return np.float32(in_size) / np.float32(out_size)


def _cubic_matrix(in_size: int, out_size: int, scale_factor: Optional[float]) -> np.ndarray:
  scale = _source_scale(in_size, out_size, scale_factor)
  src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  idx = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  t = np.clip(src - idx.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float64)
  # The polynomials cancel badly in float32 (torch's own float weights are off by up to ~1e-6,
  # depending on FMA use): evaluate them in float64 and round once.
  one, a = 1.0, float(_A)

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + one

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  weights = (far(t + one), near(t), near(one - t), far(2 * one - t))
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  for j, w in enumerate(weights):
    np.add.at(m, (rows, np.clip(idx - 1 + j, 0, in_size - 1)), w)
  return m.astype(np.float32)


def _aa_matrix(in_size: int, out_size: int, scale_factor: Optional[float]) -> np.ndarray:
  scale = float(_source_scale(in_size, out_size, scale_factor))
  support = 2.0 * scale if scale >= 1.0 else 2.0
  invscale = 1.0 / scale if scale >= 1.0 else 1.0

  def keys(x):
    x = np.abs(x)
    return np.where(x < 1, ((_A_AA + 2) * x - (_A_AA + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * _A_AA, 0.0))

  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as torch's cast does
    hi = min(int(center + support + 0.5), in_size)
    w = keys((np.arange(lo, hi) - center + 0.5) * invscale)
    total = w.sum()
    m[i, lo:hi] = w / total if total != 0 else w
  return m.astype(np.float32)


@functools.lru_cache(maxsize=256)
def resize_matrix(in_size: int, out_size: int, scale_factor: Optional[float] = None,
                  antialias: bool = False) -> np.ndarray:
  """(out_size, in_size) float32 matrix of torch's bicubic resize along one axis."""
  build = _aa_matrix if antialias else _cubic_matrix
  m = build(in_size, out_size, scale_factor)
  m.flags.writeable = False
  return m


def output_size(in_size: int, scale_factor: float) -> int:
  """torch's output length for a scale factor: floor(in * scale_factor) in double precision."""
  return int(math.floor(float(in_size) * scale_factor))


def torch_bicubic_resize(x: jax.Array, size: Optional[Sequence[int]] = None, *,
                         scale_factor: Optional[Sequence[float]] = None,
                         antialias: bool = False) -> jax.Array:
  """Resize x (..., H, W, C) like ``F.interpolate(x_nchw, size | scale_factor, mode="bicubic",
  align_corners=False, antialias=antialias)``. Computed in float32, returned in x's dtype.

  Give exactly one of `size` (H', W') or `scale_factor` (sh, sw); as in torch, a scale factor also
  sets the sampling step (1/scale), not just the output size.
  """
  if (size is None) == (scale_factor is None):
    raise ValueError("give exactly one of size and scale_factor")
  in_h, in_w = x.shape[-3], x.shape[-2]
  if scale_factor is not None:
    sh, sw = (float(s) for s in scale_factor)
    out_h, out_w = output_size(in_h, sh), output_size(in_w, sw)
  else:
    (out_h, out_w), sh, sw = (int(s) for s in size), None, None
  if out_h < 1 or out_w < 1:
    raise ValueError(f"resize of a {in_h}x{in_w} image gives an empty {out_h}x{out_w} output")
  y = x.astype(jnp.float32)
  hp = jax.lax.Precision.HIGHEST  # no TF32 / bf16 passes for the interpolation weights
  # A size-only resize to the same length is the identity in torch (weights 0, 1, 0, 0): skip it.
  if not (sh is None and out_h == in_h and not antialias):
    y = jnp.einsum("oh,...hwc->...owc", resize_matrix(in_h, out_h, sh, antialias), y, precision=hp)
  if not (sw is None and out_w == in_w and not antialias):
    y = jnp.einsum("pw,...hwc->...hpc", resize_matrix(in_w, out_w, sw, antialias), y, precision=hp)
  return y.astype(x.dtype)
