"""ImageNet (ILSVRC2012) read from a prepared TFDS ``imagenet2012`` data set, without TensorFlow.

``tfds.data_source`` gives random access to the ArrayRecord files; the JPEGs are decoded with
pillow. Each image gets the ADM centre-crop preprocessing (``transforms.center_crop``) to a square
``image_size``. Preparing the data set needs TensorFlow and the manually downloaded tars, once, on
any machine (see ``PREPARE``); this module only reads it.
"""

from __future__ import annotations

import io
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from pixeldit_jax.data import transforms
from pixeldit_jax.data.base import DataNotFoundError

TFDS_NAME = "imagenet2012"
PREPARE = (
    "Prepare it once on a machine with TensorFlow (pip install tensorflow tensorflow-datasets): "
    "register at https://image-net.org/download-images, put ILSVRC2012_img_train.tar and "
    "ILSVRC2012_img_val.tar into the manual_dir ({data_dir}/downloads/manual by default), run "
    "`tfds build imagenet2012 --data_dir={data_dir} --file_format=array_record` "
    "(the array_record format is required for random access), then copy {data_dir} to this "
    "machine (or a bucket it reads) and set config.data.path to it.")


def _default_data_dir() -> str:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return str(tfds.core.constants.DATA_DIR)


def open_tfds(split: str, data_dir: Optional[str], name: str = TFDS_NAME) -> Any:
  """The random-access tfds data source for `split`, or one clear error saying how to prepare it."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import, only here)
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises assorted errors for missing or TFRecord-only data
    resolved = data_dir if data_dir is not None else _default_data_dir()
    shown = resolved if data_dir is not None else f"{resolved} (the TFDS default)"
    raise DataNotFoundError(
        f"No prepared {name} data set (split {split!r}) readable with random access in data_dir "
        f"{shown} [{type(e).__name__}: {e}]. " + PREPARE.format(data_dir=resolved)) from e


def to_pil(image: Any) -> Image.Image:
  """A tfds image (decoded uint8 array, or encoded bytes) as a PIL image."""
  if isinstance(image, (bytes, bytearray)):
    img = Image.open(io.BytesIO(image))
    img.load()
    return img
  arr = np.asarray(image)
  if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
    raise ValueError(f"unexpected tfds image {arr.dtype} {arr.shape}")
  if arr.ndim == 3 and arr.shape[2] == 1:
    arr = arr[:, :, 0]
  return Image.fromarray(arr)


class TfdsImageSource:
  """A tfds image classification data set ('image', 'label' features), ADM centre-cropped."""

  def __init__(self, split: str, data_dir: Optional[str], image_size: Sequence[int], channels: int,
               name: str = TFDS_NAME):
    if int(image_size[0]) != int(image_size[1]):
      raise ValueError(f"ImageNet uses a square centre crop; image_size must be square, got "
                       f"{tuple(image_size)}")
    transforms.target_mode(channels)
    self.name, self.split, self.data_dir = name, split, data_dir
    self.size, self.channels = int(image_size[0]), channels
    self._ds = open_tfds(split, data_dir, name)
    self._len = len(self._ds)
    self.description = f"tfds {name} {split} ({self._len} images, data_dir={data_dir})"

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_ds"] = None  # reopened lazily in each worker process
    return state

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict:
    if self._ds is None:
      self._ds = open_tfds(self.split, self.data_dir, self.name)
    example = self._ds[index]
    img, converted = transforms.to_model_mode(to_pil(example["image"]), self.channels)
    image = transforms.as_hwc(transforms.center_crop(img, self.size))
    return {"image": image, "label": int(example["label"]), "converted": converted}
