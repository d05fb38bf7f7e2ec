"""pixeldit-jax: PixelDiT (pixel-space diffusion transformers) in JAX/Flax NNX."""

__version__ = "0.1.0"

import sys as _sys

if getattr(_sys, "argv", [""])[:1] == ["-m"]:  # `python -m pixeldit_jax.<command>` is starting
  import os as _os

  from pixeldit_jax import host_memory as _host_memory
  from pixeldit_jax import no_tpu as _no_tpu

  _no_tpu.cpu_only_env(_host_memory.cli_module(), _os.environ)
  _host_memory.restart_cli_if_needed()
