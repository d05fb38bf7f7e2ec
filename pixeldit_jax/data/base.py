"""What every image source provides, and the errors the data package raises.

A source is a random-access reader: ``len(source)`` examples, and ``source[i]`` returns one example
already in the model's format, or raises when example ``i`` cannot be read or decoded (the pipeline
then replaces it, see ``pipeline.FetchWithReplacement``)::

  {"image": uint8 (H, W, C), "label": int, "converted": bool}

``converted`` is True when the stored image's channel count or bit depth differed from the model's
(and, for image folders, when its size differed from ``image_size``). The fixed preprocessing of a
source (zero padding of 28x28 digits, the ADM resize of ImageNet) does not count as a conversion.

Sources are pickled into Grain worker processes, so they keep only paths and small tables, and
load heavy state lazily.
"""

from __future__ import annotations

from typing import Any, Protocol

from pixeldit_jax import cli


class DataNotFoundError(FileNotFoundError):
  """The configured data set is not on this machine; the message says how to get it."""


class UnreadableDataError(RuntimeError):
  """No readable example could be found near a requested index (a broken data set)."""


cli.register(UnreadableDataError)  # entry points print it as one `error:` line


class ImageSource(Protocol):
  description: str  # for messages, e.g. "image folder /data/pets (3 classes, 120 files)"

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> dict[str, Any]:
    ...
