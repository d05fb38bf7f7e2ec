"""Skip JAX's TPU probe on hosts without a TPU, so that CPU runs do not print libtpu's warnings.

With ``libtpu`` installed (the ``[aot]`` extra, for compiling TPU programs ahead of time on a
CPU), JAX initialises the TPU backend in every process; on a machine without TPU chips libtpu
then prints half a dozen lines about TPU metadata it cannot find before the first line of ours.
For ``python -m pixeldit_jax.<command>`` (other than the AOT tool, which uses libtpu on purpose),
when the user has not chosen platforms (``JAX_PLATFORMS`` unset) and the machine has no TPU chip
(JAX's own test: a Google PCI device with a TPU device id), no NVIDIA device and no AMD GPU, JAX
is told to use the CPU; a machine with any accelerator is left alone.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import MutableMapping, Optional

GOOGLE_PCI_VENDOR = "0x1ae0"
KEEP_PROBE = ("pixeldit_jax.aot",)  # compiles for TPU through libtpu: needs the plugin loaded


def has_tpu_chip(sysfs: str = "/sys/bus/pci/devices") -> bool:
  """A Google PCI device is there (TPU chips are the only Google PCI devices on these hosts)."""
  for vendor in glob.glob(os.path.join(sysfs, "*", "vendor")):
    try:
      with open(vendor) as f:
        if f.read().strip() == GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def has_gpu(dev: str = "/dev") -> bool:
  return bool(glob.glob(os.path.join(dev, "nvidia*"))) or os.path.exists(os.path.join(dev, "kfd"))


def cpu_only_env(module: Optional[str], env: MutableMapping[str, str], *, sysfs: str = "/sys/bus/pci/devices",
                 dev: str = "/dev", libtpu_installed: Optional[bool] = None) -> bool:
  """Set JAX_PLATFORMS=cpu in `env` when the probe would only print warnings; True if it did."""
  if module is None or not module.startswith("pixeldit_jax.") or module in KEEP_PROBE:
    return False
  if "JAX_PLATFORMS" in env or has_tpu_chip(sysfs) or has_gpu(dev):
    return False
  if libtpu_installed is None:
    libtpu_installed = importlib.util.find_spec("libtpu") is not None
  if not libtpu_installed:
    return False
  env["JAX_PLATFORMS"] = "cpu"
  return True
