"""The text section of an experiment config and the encoder it names."""

from __future__ import annotations

from typing import Mapping, Union

import ml_collections
from ml_collections import config_dict

from pixeldit_jax.text import base, gemma2, minilm

ENCODERS = ("gemma2", "minilm")


def text_config_defaults() -> ml_collections.ConfigDict:
  """encoder 'minilm' (bundled, CPU-friendly) or 'gemma2' (needs `path`, a local HF directory).

  path: model directory (None: the bundled MiniLM; required for Gemma-2). max_length: MiniLM
  tokens (Gemma-2 always hands out 300). dtype: 'float32' | 'bfloat16'. cache: directory of a
  precomputed embedding cache (``python -m pixeldit_jax.text.cache``), or None to encode online.
  """
  return ml_collections.ConfigDict(dict(
      encoder="minilm",
      path=config_dict.placeholder(str),
      max_length=minilm.MAX_LENGTH,
      dtype="float32",
      cache=config_dict.placeholder(str),
  ))


def _settings(text_cfg: Union[None, Mapping, ml_collections.ConfigDict]) -> dict:
  out = text_config_defaults().to_dict()
  if text_cfg is not None:
    out.update(text_cfg.to_dict() if isinstance(text_cfg, ml_collections.ConfigDict) else dict(text_cfg))
  return out


def make_encoder(text_cfg=None) -> base.TextEncoder:
  """The frozen encoder that `text_cfg` (config.text) names, loaded from local files only."""
  cfg = _settings(text_cfg)
  name, path = cfg["encoder"], cfg.get("path")
  if name == "minilm":
    return minilm.MiniLMEncoder.from_dir(path, max_length=int(cfg["max_length"]), dtype=cfg["dtype"])
  if name == "gemma2":
    if not path:
      raise FileNotFoundError(
          "config.text.path is not set: config.text.encoder='gemma2' needs a local Gemma-2-2B(-IT) "
          "directory (config.json, *.safetensors, tokenizer.json); nothing is downloaded")
    length = int(cfg.get("length") or gemma2.LENGTH)
    return gemma2.Gemma2Encoder.from_dir(path, dtype=cfg["dtype"], length=length)
  raise ValueError(f"config.text.encoder={name!r} is not one of {ENCODERS}")


def expected_fingerprint(text_cfg=None) -> dict:
  """What `make_encoder(text_cfg)` would report as its fingerprint, without loading weights
  where the config alone says it (encoder name and length); used to check an embedding cache."""
  cfg = _settings(text_cfg)
  name = cfg["encoder"]
  if name == "minilm":
    return {"encoder": name, "length": int(cfg["max_length"])}
  if name == "gemma2":
    return {"encoder": name, "length": int(cfg.get("length") or gemma2.LENGTH)}
  raise ValueError(f"config.text.encoder={name!r} is not one of {ENCODERS}")
