"""Deterministic random images and labels of the configured shape, for benchmarks and tests."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

NUM_EXAMPLES = 1 << 16


class FakeSource:
  """Example i is drawn from a generator seeded with (seed, i): the same on every run and process."""

  def __init__(self, image_size: Sequence[int], channels: int, num_classes: int, seed: int = 0,
               num_examples: Optional[int] = None):
    num_examples = NUM_EXAMPLES if num_examples is None else num_examples
    if num_classes < 1:
      raise ValueError(f"fake data needs num_classes >= 1, got {num_classes}")
    self.shape = (int(image_size[0]), int(image_size[1]), int(channels))
    self.num_classes, self.seed, self.num_examples = int(num_classes), int(seed), int(num_examples)
    self.description = f"fake data ({num_examples} random {self.shape} images, {num_classes} classes)"

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    rng = np.random.default_rng((self.seed, int(index)))
    return {"image": rng.integers(0, 256, self.shape, dtype=np.uint8),
            "label": int(rng.integers(self.num_classes)), "converted": False}
