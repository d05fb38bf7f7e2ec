"""What the trainer and sampler condition on: class labels, or captions through a text encoder.

Host side, per batch: a class-conditional batch already holds `label`. A text batch holds
`caption` strings, which become either cached embeddings (`text_emb`, looked up on the host from a
precomputed cache) or tokens (`text_ids`, `text_mask`) that the frozen encoder turns into
embeddings inside the jitted step. The null (unconditional) embedding, used for CFG dropout and
for guidance, is computed once.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np

from pixeldit_jax import config_lib


class ClassConditioning:
  text = False

  def __init__(self, config):
    self.num_classes = config_lib.model_config(config).num_classes

  def prepare(self, local: dict) -> dict:
    return {k: np.asarray(local[k]) for k in ("image", "label", "skipped", "converted")}

  def frozen(self) -> dict:
    return {}


class TextConditioning:
  """Captions -> cached embeddings or encoder tokens; the encoder's frozen params; the null text."""

  text = True

  def __init__(self, config, *, encoder=None, cache=None):
    from pixeldit_jax import text as text_lib  # noqa: PLC0415 - only text runs need it
    tc = config.text
    model_cfg = config_lib.model_config(config)
    self.encoder, self.cache = encoder, cache
    if self.cache is None and tc.get("cache"):
      self.cache = text_lib.TextEmbeddingCache(tc.cache, expect=tc)  # refuses another encoder's cache
    if self.encoder is None and self.cache is None:
      self.encoder = text_lib.make_encoder(tc)
    if self.cache is not None:
      null_emb, _ = self.cache.lookup([""], null=True)
      width, length = null_emb.shape[-1], null_emb.shape[-2]
      source = f"cache {tc.cache}"
    else:
      null_emb, _ = self.encoder.encode([""], null=True)
      width, length = self.encoder.dim, self.encoder.length
      source = f"encoder {self.encoder.name}"
    if (width, length) != (model_cfg.text_dim, model_cfg.text_length):
      raise ValueError(
          f"The text {source} gives {length} tokens of width {width}, but the model expects "
          f"text_length={model_cfg.text_length}, text_dim={model_cfg.text_dim}; set "
          f"config.model.text_dim={width} and config.model.text_length={length}.")
    self.null_emb = np.asarray(null_emb, np.float32).reshape(1, length, width)
    logging.info("Text conditioning from the %s (%d x %d)", source, length, width)

  def prepare(self, local: dict) -> dict:
    out = {k: np.asarray(local[k]) for k in ("image", "skipped", "converted")}
    captions = [str(c) for c in local["caption"]]
    if self.cache is not None:
      emb, _ = self.cache.lookup(captions)
      out["text_emb"] = np.asarray(emb, np.float32)
    else:
      tokens = self.encoder.tokenize(captions)
      out["text_ids"], out["text_mask"] = tokens["ids"], tokens["mask"]
    return out

  def embed(self, prompts: Sequence[str], *, null: bool = False) -> np.ndarray:
    """Embeddings (B, L, C) for prompts (sampling); `null` uses the unconditional rule."""
    if self.cache is not None:
      emb, _ = self.cache.lookup(list(prompts), null=null)
      return np.asarray(emb, np.float32)
    return np.asarray(self.encoder.encode(list(prompts), null=null)[0], np.float32)

  def frozen(self) -> dict:
    out = {"null_text": self.null_emb}
    if self.cache is None:
      out["text"] = self.encoder.params
    return out

  def encode_tokens(self):
    return None if self.encoder is None else self.encoder.encode_tokens


def make(config, **kwargs):
  if config.model.get("text_dim") is None:
    return ClassConditioning(config)
  return TextConditioning(config, **kwargs)


def sample_prompts(config) -> Optional[list[str]]:
  prompts = config.train.get("sample_prompts")
  return list(prompts) if prompts else None
