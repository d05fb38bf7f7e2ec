"""PixelDiT model: patch level, pixel level, and their composition."""

from pixeldit_jax.model.config import PRESETS, PixelDiTConfig, preset
from pixeldit_jax.model.pixeldit import PixelDiT, abstract, build

__all__ = ["PRESETS", "PixelDiT", "PixelDiTConfig", "abstract", "build", "preset"]
