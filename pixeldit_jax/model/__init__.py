"""PixelDiT model: patch level, pixel level, and their composition (class-conditional and T2I)."""

from pixeldit_jax.model.config import PRESETS, PixelDiTConfig, preset
from pixeldit_jax.model.pixeldit import PixelDiT, abstract, build
from pixeldit_jax.model.pixeldit_t2i import PixelDiTT2I

__all__ = ["PRESETS", "PixelDiT", "PixelDiTConfig", "PixelDiTT2I", "abstract", "build", "preset"]
