"""The ``config.data`` section: defaults, and reading it from an experiment config."""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict

RESIZE_FILTERS = ("bicubic", "bilinear")  # text-to-image resize-to-cover filters
SOURCES = ("fashion_mnist", "mnist_subset", "imagenet", "folder", "fake")
# Image-caption sources of the text-to-image pipeline (pixeldit_jax.data.text_image).
T2I_SOURCES = ("captioned_fmnist", "webdataset", "caption_folder", "fake_text")


def default_data_config(**overrides: Any) -> ml_collections.ConfigDict:
  """The data section with its defaults; `overrides` must name existing fields."""
  c = ml_collections.ConfigDict()
  c.source = "fashion_mnist"  # one of SOURCES
  c.path = config_dict.placeholder(str)  # data dir / folder / tfds data_dir; None = the default
  c.split = "train"
  c.num_workers = 0  # Grain worker processes; 0 = read in-process. Fixed: the iterator state depends on it
  c.read_threads = 4  # reader threads per process (or per worker)
  c.shuffle = True
  c.drop_remainder = True  # must stay True: the trainer needs fixed batch shapes
  c.random_flip = False  # random horizontal flips (seeded; the DiT/ADM ImageNet recipe uses them)
  c.num_classes = config_dict.placeholder(int)  # 'fake' labels; None = config.model.num_classes
  # Text-to-image only (see pixeldit_jax.data.text_image):
  c.buckets = config_dict.placeholder(str)  # None | 'ASPECT_RATIO_512' | 'ASPECT_RATIO_1024' | 'auto'
  # Resize filter; the release uses bilinear for its fixed-size stage 1 and bicubic for buckets.
  c.resize = "bicubic"  # one of RESIZE_FILTERS
  c.heldout_captions = 100  # captioned_fmnist: captions never shown in training (evaluation grids)
  c.num_records = config_dict.placeholder(int)  # fake / fake_text: records (None: their default)
  for key, value in overrides.items():
    if key not in c:
      raise ValueError(f"Unknown data config field {key!r}; known: {sorted(c.keys())}")
    c[key] = value
  return c


def data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.data over the defaults, validated."""
  if "data" not in config or config.data is None:
    raise ValueError("The experiment config has no `data` section; add "
                     "`c.data = pixeldit_jax.data.default_data_config(source=...)`")
  d = default_data_config(**dict(config.data.items()))
  if d.source not in SOURCES + T2I_SOURCES:
    raise ValueError(f"config.data.source must be one of {SOURCES + T2I_SOURCES}, got {d.source!r}")
  if d.resize not in RESIZE_FILTERS:
    raise ValueError(f"config.data.resize must be one of {RESIZE_FILTERS}, got {d.resize!r}")
  if not d.drop_remainder:
    raise ValueError("config.data.drop_remainder=False is not supported: training batches must "
                     "all have the same shape")
  if int(d.num_workers) < 0 or int(d.read_threads) < 0:
    raise ValueError(f"config.data.num_workers ({d.num_workers}) and read_threads "
                     f"({d.read_threads}) must be >= 0")
  return d
