"""Image conversions shared by the sources: channel/bit-depth normalisation, resize and crop, pad.

All functions are pure and deterministic; they take PIL images or numpy arrays and return new ones.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def target_mode(channels: int) -> str:
  if channels not in (1, 3):
    raise ValueError(f"in_channels must be 1 or 3 for image data, got {channels}")
  return "L" if channels == 1 else "RGB"


def to_model_mode(img: Image.Image, channels: int) -> tuple[Image.Image, bool]:
  """Convert any PIL mode to 8-bit 'L' (channels=1) or 'RGB' (channels=3).

  16-bit and 32-bit integer images are scaled from [0, 65535] to [0, 255]; float images are clipped
  to [0, 255]; images with transparency are composited on white. Returns (image, converted).
  """
  mode = target_mode(channels)
  if img.mode == mode:
    return img, False
  if img.mode in _SIXTEEN_BIT_MODES:
    wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
    img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
  elif img.mode == "F":
    img = Image.fromarray(np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8), "L")
  elif img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    img = Image.alpha_composite(white, rgba).convert("RGB")
  if img.mode != mode:
    img = img.convert(mode)
  return img, True


def center_crop(img: Image.Image, size: int | Sequence[int]) -> Image.Image:
  """Resize to cover `size` and crop the centre: the ADM (guided-diffusion) ImageNet preprocessing.

  While the image is at least twice the target on both sides, halve it with a BOX filter; then
  resize with BICUBIC so that it just covers the target (for a square target: the short side equals
  it); then crop the centre. `size` is an int (square) or (H, W).
  """
  height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
  while img.width >= 2 * width and img.height >= 2 * height:
    img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
  scale = max(height / img.height, width / img.width)
  new_w = max(width, round(img.width * scale))
  new_h = max(height, round(img.height * scale))
  if (new_w, new_h) != img.size:
    img = img.resize((new_w, new_h), resample=Image.BICUBIC)
  left, top = (new_w - width) // 2, (new_h - height) // 2
  return img.crop((left, top, left + width, top + height))


def as_hwc(img: Image.Image) -> np.ndarray:
  """An 'L' or 'RGB' image as a uint8 (H, W, C) array."""
  arr = np.asarray(img, dtype=np.uint8)
  return arr[:, :, None] if arr.ndim == 2 else arr


def pad_center(img: np.ndarray, size: Sequence[int], channels: int) -> np.ndarray:
  """A (h, w) grayscale array zero-padded (centred) to (H, W) and repeated to `channels`."""
  height, width = int(size[0]), int(size[1])
  h, w = img.shape
  if height < h or width < w:
    raise ValueError(f"image_size {(height, width)} is smaller than the {h}x{w} source images; "
                     "only padding is supported for this source")
  out = np.zeros((height, width, channels), np.uint8)
  top, left = (height - h) // 2, (width - w) // 2
  out[top:top + h, left:left + w, :] = img[:, :, None]
  return out
