"""Frozen text encoders of the text-to-image model (Gemma-2, MiniLM) and their embedding cache.

Names are resolved lazily, so importing the package pulls in nothing heavy and
``python -m pixeldit_jax.text.cache`` runs its module only once.
"""

import importlib

_EXPORTS = {
    "TextEncoder": "base",
    "make_encoder": "encoders", "text_config_defaults": "encoders",
    "CHI_PROMPT": "gemma2", "Gemma2Encoder": "gemma2",
    "MiniLMEncoder": "minilm",
    "TextEmbeddingCache": "cache", "build_cache": "cache", "load_cache": "cache",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
