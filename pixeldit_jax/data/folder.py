"""A folder of class sub-folders of images: ``path/<class_name>/*.{png,jpg,jpeg,webp,bmp}``.

Classes are the sub-folder names sorted, mapped to labels 0, 1, ...; files inside a class folder are
sorted by name (sub-sub-folders and hidden files are ignored). Images are decoded with PIL, converted
to the model's channel count and bit depth, and resized to cover ``image_size`` then centre-cropped
(``transforms.center_crop``) when their size differs. A file that cannot be decoded raises, and the
pipeline replaces it by the next readable one.

For large sets prefer a prepared ArrayRecord data set: many small file reads are slow on network
file systems.
"""

from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
from PIL import Image

from pixeldit_jax import fs
from pixeldit_jax.data import transforms
from pixeldit_jax.data.base import DataNotFoundError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def scan(root: str) -> tuple[list[str], list[str], np.ndarray]:
  """(class names, file paths relative to root, int32 labels), in a deterministic order."""
  if not root or not fs.isdir(root):
    raise DataNotFoundError(f"Image folder {root!r} does not exist; source 'folder' needs "
                            "config.data.path = a directory of class sub-folders of images")
  top = fs.path(root)
  classes = sorted(e.name for e in top.iterdir() if e.is_dir() and not e.name.startswith("."))
  files, labels = [], []
  for label, name in enumerate(classes):
    for entry in sorted((top / name).iterdir(), key=lambda e: e.name):
      if (not entry.name.startswith(".") and os.path.splitext(entry.name)[1].lower() in EXTENSIONS
          and entry.is_file()):
        files.append(f"{name}/{entry.name}")
        labels.append(label)
  if not files:
    raise DataNotFoundError(
        f"Image folder {root!r} holds no images: expected {root}/<class_name>/<image> with "
        f"extensions {', '.join(EXTENSIONS)} (found {len(classes)} class folders)")
  return classes, files, np.asarray(labels, np.int32)


def decode(data: bytes, image_size: Sequence[int], channels: int) -> tuple[np.ndarray, bool]:
  """Image file bytes -> (uint8 (H, W, C), converted). Raises on unreadable or truncated data."""
  with Image.open(io.BytesIO(data)) as img:
    img.load()  # decodes everything now, so truncation raises here
    img, converted = transforms.to_model_mode(img, channels)
  if img.size != (image_size[1], image_size[0]):
    img, converted = transforms.center_crop(img, image_size), True
  return transforms.as_hwc(img), converted


class FolderSource:

  def __init__(self, root: str, image_size: Sequence[int], channels: int):
    transforms.target_mode(channels)
    self.root = fs.resolve(root) if root else root
    self.classes, self.files, self.labels = scan(self.root)
    self.image_size, self.channels = (int(image_size[0]), int(image_size[1])), channels
    self.description = (f"image folder {self.root} ({len(self.classes)} classes, "
                        f"{len(self.files)} files)")

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict:
    path = fs.join(self.root, self.files[index])
    try:
      image, converted = decode(fs.read_bytes(path), self.image_size, self.channels)
    except Exception as e:  # any decoder failure: PIL raises OSError, SyntaxError, ValueError, ...
      raise OSError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    return {"image": image, "label": int(self.labels[index]), "converted": converted}
