"""Aspect-ratio buckets of the text-to-image stages (spec §7.2) and the resize to a bucket.

The tables are the official ones (PixelDiT ``t2i/diffusion/data/datasets/utils.py``, inherited from
PixArt-Sigma and SANA), reproduced as data: a label (H/W, rounded as the official code writes it)
and the bucket's (H, W) in pixels. A record goes to the bucket whose label is nearest to its
height / width, ties to the first in table order, exactly as the official ``min(..., key=...)``.

  ASPECT_RATIO_512   40 buckets, 256x1024 ... 512x512 ... 1024x256 (all multiples of 32)
  ASPECT_RATIO_1024   7 buckets, 752x1344 ... 1024x1024 ... 1344x752 (all multiples of 16)

The transform is the official one: resize to cover the bucket (bicubic; the side that does not
fill the bucket is truncated to an int, as the official code does) and crop the centre the way
torchvision's ``CenterCrop`` rounds.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image

# (label, H, W) in the official order.
ASPECT_RATIO_512 = (
    ("0.25", 256, 1024), ("0.26", 256, 992), ("0.27", 256, 960), ("0.28", 256, 928),
    ("0.32", 288, 896), ("0.33", 288, 864), ("0.35", 288, 832), ("0.4", 320, 800),
    ("0.42", 320, 768), ("0.48", 352, 736), ("0.5", 352, 704), ("0.52", 352, 672),
    ("0.57", 384, 672), ("0.6", 384, 640), ("0.68", 416, 608), ("0.72", 416, 576),
    ("0.78", 448, 576), ("0.82", 448, 544), ("0.88", 480, 544), ("0.94", 480, 512),
    ("1.0", 512, 512), ("1.07", 512, 480), ("1.13", 544, 480), ("1.21", 544, 448),
    ("1.29", 576, 448), ("1.38", 576, 416), ("1.46", 608, 416), ("1.67", 640, 384),
    ("1.75", 672, 384), ("2.0", 704, 352), ("2.09", 736, 352), ("2.4", 768, 320),
    ("2.5", 800, 320), ("2.89", 832, 288), ("3.0", 864, 288), ("3.11", 896, 288),
    ("3.62", 928, 256), ("3.75", 960, 256), ("3.88", 992, 256), ("4.0", 1024, 256),
)
ASPECT_RATIO_1024 = (
    ("0.5625", 752, 1344), ("0.66", 896, 1344), ("0.75", 896, 1200), ("1.0", 1024, 1024),
    ("1.33", 1200, 896), ("1.5", 1344, 896), ("1.77", 1344, 752),
)
TABLES = {"ASPECT_RATIO_512": ASPECT_RATIO_512, "ASPECT_RATIO_1024": ASPECT_RATIO_1024}


class BucketTable:
  """An ordered list of (H, W) buckets with their aspect-ratio labels."""

  def __init__(self, name: str, entries: Sequence[tuple[str, int, int]]):
    self.name = name
    self.labels = tuple(str(e[0]) for e in entries)
    self.sizes = tuple((int(e[1]), int(e[2])) for e in entries)
    self.ratios = np.asarray([float(label) for label in self.labels], np.float64)

  def __len__(self) -> int:
    return len(self.sizes)

  def __repr__(self) -> str:
    return f"BucketTable({self.name!r}, {len(self)} buckets)"

  def nearest(self, heights, widths) -> np.ndarray:
    """Bucket index of each (height, width); unknown sizes (<= 0) go to the bucket nearest to 1:1."""
    h = np.asarray(heights, np.float64).reshape(-1)
    w = np.asarray(widths, np.float64).reshape(-1)
    known = (h > 0) & (w > 0)
    ratio = np.where(known, h / np.where(known, w, 1.0), 1.0)
    # argmin returns the first minimum: the official tie-break (min over the table in order).
    return np.argmin(np.abs(self.ratios[None, :] - ratio[:, None]), axis=1).astype(np.int32)

  def nearest_one(self, height: int, width: int) -> int:
    return int(self.nearest([height], [width])[0])


def get_table(name: str) -> BucketTable:
  if name not in TABLES:
    raise ValueError(f"Unknown bucket table {name!r}; known: {sorted(TABLES)}")
  return BucketTable(name, TABLES[name])


def table_for(buckets: Optional[str], image_size: Sequence[int]) -> BucketTable:
  """The bucket table of a config: a named table, 'auto' (ASPECT_RATIO_<H>), or one fixed size."""
  height, width = int(image_size[0]), int(image_size[1])
  if buckets is None or buckets in ("", "none", "None"):
    return BucketTable(f"fixed_{height}x{width}", [(f"{height / width:g}", height, width)])
  if buckets == "auto":
    if height != width or f"ASPECT_RATIO_{height}" not in TABLES:
      raise ValueError(f"buckets='auto' needs image_size (512, 512) or (1024, 1024), got "
                       f"{(height, width)}")
    buckets = f"ASPECT_RATIO_{height}"
  return get_table(buckets)


def cover_size(height: int, width: int, target: Sequence[int]) -> tuple[int, int]:
  """(H, W) after the official resize-to-cover of a height x width image to target (H, W)."""
  th, tw = int(target[0]), int(target[1])
  if th / height > tw / width:
    new_h, new_w = th, int(width * th / height)
  else:
    new_h, new_w = int(height * tw / width), tw
  return max(new_h, th), max(new_w, tw)  # guards float round-off below the target


FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def resize_to_bucket(img: Image.Image, target: Sequence[int], resample: str = "bicubic") -> Image.Image:
  """Resize to cover target (H, W) (PIL filter `resample`, 'bicubic' | 'bilinear'), then crop the
  centre to exactly target: torchvision's Resize + CenterCrop on a PIL image, as released."""
  th, tw = int(target[0]), int(target[1])
  if img.size == (tw, th):
    return img
  new_h, new_w = cover_size(img.height, img.width, (th, tw))
  if (new_w, new_h) != img.size:
    img = img.resize((new_w, new_h), resample=FILTERS[resample])
  top, left = int(round((new_h - th) / 2.0)), int(round((new_w - tw) / 2.0))
  return img.crop((left, top, left + tw, top + th))
