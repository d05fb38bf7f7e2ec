"""Metric writing (TensorBoard + JSONL) and the accelerator peaks used for MFU.

TensorBoard event files come from tensorboardX, which needs no TensorFlow. Every scalar also
goes to ``<workdir>/metrics.jsonl``, one JSON object per logged step.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import jax
import numpy as np

# Dense bf16 peak TFLOP/s per device, for MFU when config.train.peak_tflops is not set.
PEAK_TFLOPS = {
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0, "NVIDIA H100": 989.0, "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0, "NVIDIA B200": 2250.0,
}


def device_peak_tflops(configured: Optional[float] = None) -> Optional[float]:
  if configured:
    return float(configured)
  kind = jax.devices()[0].device_kind
  for name, peak in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(name) or name in kind:
      return peak
  return None


class MetricWriter:
  """Scalars and images to TensorBoard (process 0 only) and scalars to metrics.jsonl."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write_scalars(self, step: int, scalars: Mapping[str, float]):
    if not self.enabled:
      return
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")
    self._jsonl.flush()

  def write_image(self, step: int, name: str, image: np.ndarray):
    if self.enabled:
      self._tb.add_image(name, image, step, dataformats="HWC")

  def close(self):
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
