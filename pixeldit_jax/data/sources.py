"""Build the configured image source (see ``base.ImageSource``)."""

from __future__ import annotations

import ml_collections

from pixeldit_jax.data import fake, fashion_mnist, folder, imagenet
from pixeldit_jax.data.base import ImageSource


def num_classes(config: ml_collections.ConfigDict, data: ml_collections.ConfigDict):
  if data.num_classes is not None:
    return int(data.num_classes)
  model = config.get("model")
  return int(model.num_classes) if model is not None and "num_classes" in model else None


def make_source(config: ml_collections.ConfigDict, data: ml_collections.ConfigDict) -> ImageSource:
  """The source for `data` (a validated config.data) and the experiment's image shape."""
  image_size = tuple(int(s) for s in config.image_size)
  channels = int(config.model.in_channels)
  classes = num_classes(config, data)
  if data.source in ("fashion_mnist", "mnist_subset"):
    source = fashion_mnist.SmallGrayscaleSource(data.source, data.split, data.path, image_size, channels)
    source_classes = 10
  elif data.source == "imagenet":
    source = imagenet.TfdsImageSource(data.split, data.path, image_size, channels)
    source_classes = None
  elif data.source == "folder":
    source = folder.FolderSource(data.path, image_size, channels)
    source_classes = len(source.classes)
  elif data.source == "fake":
    if classes is None:
      raise ValueError("source 'fake' needs config.data.num_classes or config.model.num_classes")
    return fake.FakeSource(image_size, channels, classes, seed=int(config.seed),
                           num_examples=data.get("num_records"))
  else:
    raise ValueError(f"Unknown data source {data.source!r}")
  if classes is not None and source_classes is not None and source_classes > classes:
    raise ValueError(f"{source.description} has {source_classes} classes but the model has "
                     f"num_classes={classes}")
  return source
