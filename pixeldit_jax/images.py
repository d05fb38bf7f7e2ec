"""Image grids as PNG."""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
from PIL import Image

from pixeldit_jax import fs


def grid(images: np.ndarray, rows: int, pad: int = 2, cols: Optional[int] = None) -> np.ndarray:
  """(N, H, W, C) uint8 -> one (rows*(H+pad)-pad, cols*(W+pad)-pad, C) image, row-major
  (cols defaults to as many as `rows` rows need)."""
  n, h, w, c = images.shape
  cols = cols or -(-n // rows)
  out = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, k = divmod(i, cols)
    out[r * (h + pad): r * (h + pad) + h, k * (w + pad): k * (w + pad) + w] = img
  return out


def save_png(image: np.ndarray, path: str, scale: int = 1) -> None:
  """Write an HWC uint8 image (C = 1 or 3); `scale` enlarges small images with nearest pixels."""
  img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  fs.atomic_write_bytes(path, buf.getvalue())  # local or gs://; never a half-written PNG


RESIZE_MODES = ("bilinear", "center_crop")


def load_png(path: str, mode: str = "RGB") -> np.ndarray:
  """An image file (local or gs://) as uint8 HWC (`mode` "RGB") or HW1 ("L"); alpha is dropped."""
  with Image.open(io.BytesIO(fs.read_bytes(path))) as img:
    out = np.asarray(img.convert(mode), np.uint8)
  return out[..., None] if out.ndim == 2 else out


def fit(image: np.ndarray, size, how: str, nearest: bool = False) -> np.ndarray:
  """Resize an HWC uint8 image to `size` (H, W): "bilinear" stretches to it, "center_crop" scales
  to cover it (bilinear) and crops the middle. `nearest` resamples with nearest pixels (masks)."""
  if how not in RESIZE_MODES:
    raise ValueError(f"unknown resize mode {how!r}; one of {', '.join(RESIZE_MODES)}")
  h, w = int(size[0]), int(size[1])
  squeeze = image.shape[-1] == 1
  img = Image.fromarray(image[..., 0] if squeeze else image)
  resample = Image.NEAREST if nearest else Image.BILINEAR
  if how == "bilinear":
    img = img.resize((w, h), resample)
  else:
    scale = max(h / img.height, w / img.width)
    cw, ch = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    img = img.resize((cw, ch), resample)
    left, top = (cw - w) // 2, (ch - h) // 2
    img = img.crop((left, top, left + w, top + h))
  out = np.asarray(img, np.uint8)
  return out[..., None] if squeeze else out
