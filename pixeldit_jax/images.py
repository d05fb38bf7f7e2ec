"""Image grids as PNG."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pixeldit_jax import fs


def grid(images: np.ndarray, rows: int, pad: int = 2) -> np.ndarray:
  """(N, H, W, C) uint8 -> one (rows*(H+pad)-pad, cols*(W+pad)-pad, C) image, row-major."""
  n, h, w, c = images.shape
  cols = -(-n // rows)
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
