"""Gemma-2 decoder (Hugging Face ``Gemma2Model``) in Flax NNX, and the PixelDiT text rule on top.

The network matches ``transformers`` ``Gemma2Model`` (eager attention) operation for operation:

* token embedding times sqrt(hidden), the factor cast to the weight dtype first (as HF does);
* RMSNorm in fp32 with a (1 + weight) scale, cast back afterwards;
* grouped-query attention with scale ``query_pre_attn_scalar ** -0.5``, logit soft-capping
  ``cap * tanh(logits / cap)``, half-split ("rotate_half") RoPE, softmax in fp32;
* layers alternate sliding-window (even indices, unless ``layer_types`` says otherwise) and
  global attention; both are causal and mask right padding on the key side, like HF's masks
  (a padded query whose whole window is padding attends uniformly, as HF's eager path does:
  those rows are not used);
* pre/post attention and pre/post feed-forward norms, GeGLU with tanh-GELU, final norm.

The output is ``last_hidden_state`` ("decoder hidden states", what SANA and PixelDiT condition on).
The layers are stacked and run under one ``nnx.scan`` (26 layers for Gemma-2-2B); each layer
picks its mask by its index from the static per-layer kinds of the config, so the state holds
nothing but the checkpoint's weights.

PixelDiT's prompt rule (spec §7.1; t2i/train.py and t2i/inference.py of the official code):
the prompt is prefixed by SANA's "complex human instruction" (`CHI_PROMPT`), tokenised with
<bos> and right padding to ``n_chi + length - 2`` tokens (``n_chi`` counts the <bos> of the
instruction tokenised alone; the 2 are that <bos> and the instruction's trailing space, which
merges into the first prompt token), and of Gemma's output only position 0 (<bos>) and the last
``length - 1`` positions are kept. The unconditional / negative prompt is tokenised without the
instruction, padded to ``length``, and every position is kept. Text beyond either budget is cut
from the end, <bos> kept (the release's ``truncation=True``), and the first cut logs a warning.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixeldit_jax.model.layers import scan_blocks, stack_blocks
from pixeldit_jax.text import base

WHAT = "Gemma-2 text encoder"

# SANA's Complex Human Instruction, the eight `text_encoder.chi_prompt` lines of every official
# PixelDiT T2I config, joined with "\n" (the last line ends in a space).
CHI_PROMPT = "\n".join([
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions '
    'suitable for image generation. Evaluate the level of detail in the user prompt:',
    '- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, '
    'and spatial relationships to create vivid and concrete scenes.',
    '- If the prompt is already detailed, refine and enhance the existing details slightly without '
    'overcomplicating.',
    'Here are examples of how to transform or refine prompts:',
    '- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round '
    'shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red '
    'flowers.',
    '- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring '
    'glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus '
    'passing by towering glass skyscrapers.',
    'Please generate only the enhanced description for the prompt below and avoid including any '
    'additional commentary or evaluations:',
    'User Prompt: ',
])
LENGTH = 300  # text tokens handed to the denoiser (`model_max_length`)

_ACTIVATIONS = {"gelu_pytorch_tanh": True, "gelu_new": True, "gelu_fast": True, "gelu": False}


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
  """The fields of a Hugging Face Gemma-2 config.json that the encoder uses."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  query_pre_attn_scalar: float
  attn_logit_softcapping: Optional[float]
  sliding_window: Optional[int]
  sliding: tuple  # per layer: True for sliding-window attention
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  attention_bias: bool = False
  tanh_gelu: bool = True

  @classmethod
  def from_hf(cls, d: dict) -> "Gemma2Config":
    n = d["num_hidden_layers"]
    types = d.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                     for i in range(n)]
    if d.get("use_bidirectional_attention"):
      raise NotImplementedError("use_bidirectional_attention Gemma-2 configs are not supported")
    rope = d.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
      raise NotImplementedError(f"rope_type {rope['rope_type']!r} is not supported")
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in _ACTIVATIONS:
      raise NotImplementedError(f"hidden_activation {act!r} is not supported")
    heads = d["num_attention_heads"]
    return cls(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        num_layers=n, num_heads=heads, num_kv_heads=d.get("num_key_value_heads", heads),
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256),
        attn_logit_softcapping=d.get("attn_logit_softcapping"), sliding_window=d.get("sliding_window"),
        sliding=tuple(t == "sliding_attention" for t in types), rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
        attention_bias=bool(d.get("attention_bias", False)), tanh_gelu=_ACTIVATIONS[act])


# ----------------------------------------------------------------------------- the network

class GemmaRMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, dtype):
    self.eps = eps
    self.weight = nnx.Param(jnp.zeros((dim,), dtype))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)


def _linear(i, o, dtype, rngs, bias=False):
  return nnx.Linear(i, o, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


def _rotate_half(x):
  h = x.shape[-1] // 2
  return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


class Gemma2Attention(nnx.Module):
  def __init__(self, cfg: Gemma2Config, dtype, rngs):
    self.cfg = cfg
    d, hd = cfg.hidden_size, cfg.head_dim
    self.q_proj = _linear(d, cfg.num_heads * hd, dtype, rngs, cfg.attention_bias)
    self.k_proj = _linear(d, cfg.num_kv_heads * hd, dtype, rngs, cfg.attention_bias)
    self.v_proj = _linear(d, cfg.num_kv_heads * hd, dtype, rngs, cfg.attention_bias)
    self.o_proj = _linear(cfg.num_heads * hd, d, dtype, rngs, cfg.attention_bias)

  def __call__(self, x, cos, sin, mask):
    cfg, (b, t, _) = self.cfg, x.shape
    kv, groups, hd = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    q = self.q_proj(x).reshape(b, t, cfg.num_heads, hd)
    k = self.k_proj(x).reshape(b, t, kv, hd)
    v = self.v_proj(x).reshape(b, t, kv, hd)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    # Query head h reads kv head h // groups (HF's repeat_kv).
    q = q.reshape(b, t, kv, groups, hd)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k) * jnp.asarray(cfg.query_pre_attn_scalar ** -0.5, x.dtype)
    if cfg.attn_logit_softcapping:
      cap = jnp.asarray(cfg.attn_logit_softcapping, x.dtype)
      logits = jnp.tanh(logits / cap) * cap
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(x.dtype).min)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, cfg.num_heads * hd)
    return self.o_proj(out)


class Gemma2MLP(nnx.Module):
  def __init__(self, cfg: Gemma2Config, dtype, rngs):
    self.tanh = cfg.tanh_gelu
    self.gate_proj = _linear(cfg.hidden_size, cfg.intermediate_size, dtype, rngs)
    self.up_proj = _linear(cfg.hidden_size, cfg.intermediate_size, dtype, rngs)
    self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, dtype, rngs)

  def __call__(self, x):
    # GELU in fp32 like torch's bf16 kernels (they compute in fp32 and round once).
    gate = jax.nn.gelu(self.gate_proj(x).astype(jnp.float32), approximate=self.tanh).astype(x.dtype)
    return self.down_proj(gate * self.up_proj(x))


class Gemma2Layer(nnx.Module):
  def __init__(self, cfg: Gemma2Config, dtype, rngs):
    norm = lambda: GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)  # noqa: E731
    self.input_layernorm = norm()
    self.self_attn = Gemma2Attention(cfg, dtype, rngs)
    self.post_attention_layernorm = norm()
    self.pre_feedforward_layernorm = norm()
    self.mlp = Gemma2MLP(cfg, dtype, rngs)
    self.post_feedforward_layernorm = norm()

  def __call__(self, carry, cos, sin, full_mask, sliding_mask, sliding):
    x, i = carry  # i: this layer's index, to read its attention kind from `sliding`
    mask = jnp.where(sliding[i], sliding_mask, full_mask)
    x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask))
    return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), i + 1


class Gemma2(nnx.Module):
  """Gemma2Model: ids (B, T), mask (B, T) -> last_hidden_state (B, T, hidden) in `dtype`."""

  def __init__(self, cfg: Gemma2Config, *, dtype=jnp.float32, rngs: Optional[nnx.Rngs] = None):
    rngs = rngs or nnx.Rngs(0)
    self.cfg, self.dtype = cfg, dtype
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.layers = stack_blocks(lambda r: Gemma2Layer(cfg, dtype, r), cfg.num_layers, rngs)
    self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

  def __call__(self, ids, mask):
    cfg, t = self.cfg, ids.shape[1]
    x = self.embed_tokens(ids) * jnp.asarray(math.sqrt(cfg.hidden_size), self.dtype)
    # RoPE as HF: fp32 angles, [freqs | freqs] halves, cos/sin cast to the compute dtype.
    inv_freq = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32)
                                                      / np.float32(cfg.head_dim)))
    angles = jnp.arange(t, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None]
    angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]
    cos, sin = jnp.cos(angles).astype(self.dtype), jnp.sin(angles).astype(self.dtype)
    q_pos, k_pos = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    full = (k_pos <= q_pos)[None] & (mask[:, None, :] > 0)  # causal, padded keys masked
    window = cfg.sliding_window or t
    sliding = full & (k_pos > q_pos - window)[None]
    x, _ = scan_blocks(self.layers, (x, jnp.zeros((), jnp.int32)), cos, sin, full, sliding,
                       jnp.asarray(cfg.sliding, jnp.bool_))
    return self.norm(x)


def _key_of(path: tuple) -> str:
  """HF key of one of our variables: module names mirror HF's; stacked layers get '{i}'."""
  *mods, leaf = path
  if mods[0] == "layers":
    mods = ["layers", "{i}"] + mods[1:]
  return ".".join(mods + ["bias" if leaf == "bias" else "weight"])


def load_gemma2(path: str, *, dtype=jnp.float32) -> Gemma2:
  """Gemma-2 decoder from a local Hugging Face directory (config.json + *.safetensors)."""
  path = base.require_dir(path, WHAT)
  cfg = Gemma2Config.from_hf(base.read_json(base.require_file(path, "config.json", WHAT)))
  model = base.abstract(lambda: Gemma2(cfg, dtype=dtype))
  reader = base.SafetensorsReader(path, WHAT, prefixes=("model.",))
  base.load_weights(model, reader, _key_of, num_layers=cfg.num_layers, dtype=dtype, what=WHAT,
                    ignore=lambda k: k.startswith("lm_head."))
  return model


# ----------------------------------------------------------------------------- the encoder

class Gemma2Tokenizer:
  """Gemma's tokenizer.json driven the way HF's GemmaTokenizer is: <bos> first (tokenizer_config
  `add_bos_token`, default True), no <eos> unless `add_eos_token`, truncation keeps the special
  tokens, right padding with <pad>."""

  def __init__(self, directory: str):
    self.tok = base.load_tokenizer(directory, WHAT)
    conf_path = os.path.join(directory, "tokenizer_config.json")
    conf = base.read_json(conf_path) if os.path.isfile(conf_path) else {}
    self.add_bos = conf.get("add_bos_token", True)
    self.add_eos = conf.get("add_eos_token", False)
    self.bos_id = base.token_id(self.tok, base.special_token(directory, "bos_token", "<bos>"), directory)
    self.eos_id = base.token_id(self.tok, base.special_token(directory, "eos_token", "<eos>"), directory)
    self.pad_id = base.token_id(self.tok, base.special_token(directory, "pad_token", "<pad>"), directory)

  def encode(self, texts: Sequence[str], max_length: Optional[int] = None) -> list:
    """Token ids with the special tokens; at most `max_length` of them."""
    out, cut = [], 0
    for enc in self.tok.encode_batch(list(texts), add_special_tokens=False):
      ids = list(enc.ids)
      if max_length is not None:
        room = max(max_length - self.add_bos - self.add_eos, 0)
        cut += len(ids) > room
        ids = ids[:room]
      out.append([self.bos_id] * self.add_bos + ids + [self.eos_id] * self.add_eos)
    if max_length is not None:
      base.warn_truncated(WHAT, cut, len(out), max_length)
    return out


class Gemma2Encoder(base.TextEncoder):
  """PixelDiT's Gemma-2 text conditioning: (B, length, hidden) with the chi-prompt rule."""

  name = "gemma2"

  def __init__(self, model: Gemma2, tokenizer: Gemma2Tokenizer, *, length: int = LENGTH,
               chi_prompt: Optional[str] = CHI_PROMPT):
    super().__init__(model)
    self.tokenizer, self.dim, self.length = tokenizer, model.cfg.hidden_size, length
    self.chi_prompt = chi_prompt or ""
    # As the official code: len(tokenizer.encode(chi_prompt)), <bos> included.
    self.num_chi_tokens = len(tokenizer.encode([self.chi_prompt])[0]) if self.chi_prompt else 0
    self.max_length = self.num_chi_tokens + length - 2 if self.chi_prompt else length
    if self.max_length < length:
      raise ValueError(f"the chi prompt tokenises to {self.num_chi_tokens} tokens; need at least 2")

  @classmethod
  def from_dir(cls, path: str, *, dtype="float32", **kw) -> "Gemma2Encoder":
    model = load_gemma2(path, dtype=base.resolve_dtype(dtype))
    return cls(model, Gemma2Tokenizer(path), **kw)

  def tokenize(self, prompts, *, null=False):
    if null or not self.chi_prompt:
      return base.pad_batch(self.tokenizer.encode(prompts, self.length), self.length, self.tokenizer.pad_id)
    texts = [self.chi_prompt + p for p in prompts]
    return base.pad_batch(self.tokenizer.encode(texts, self.max_length), self.max_length,
                          self.tokenizer.pad_id)

  def _apply(self, model, ids, mask):
    hidden = model(ids, mask)
    t = ids.shape[1]
    if t == self.length:  # null rule (or no chi prompt): every position
      return hidden, mask
    if t < self.length:
      raise ValueError(f"{t} tokens are fewer than the {self.length} the encoder hands out")
    # <bos> and the last length - 1 positions: select_index = [0] + range(-(length - 1), 0).
    keep = lambda a: jnp.concatenate([a[:, :1], a[:, t - (self.length - 1):]], axis=1)  # noqa: E731
    return keep(hidden), keep(mask)

  def fingerprint(self):
    import hashlib
    return {**super().fingerprint(), "chi_sha256": hashlib.sha256(self.chi_prompt.encode()).hexdigest()}
