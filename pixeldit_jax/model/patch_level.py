"""Patch level: the semantic DiT over 16x16 patches (spec §1.1 steps 1-5, §1.2), and the
MM-DiT block of the text-to-image model (spec §7.1).

Images are NHWC here (the JAX convention); patch vectors are built channel-major, [c][row][col],
exactly as torch's unfold lays them out, so the official patch-embedding weights load unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pixeldit_jax.model import attention, layers


def patchify(x: jax.Array, p: int) -> jax.Array:
  """(B, H, W, C) -> (B, L, C*p*p), patches in raster order, each vector channel-major."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, (h // p) * (w // p), c * p * p)


def modulate(x, shift, scale):
  return x * (1 + scale) + shift


class PatchEmbedder(nnx.Module):
  """Linear(C*p*p -> D) on channel-major patch vectors; Xavier-uniform weight, zero bias."""

  def __init__(self, in_channels: int, patch_size: int, dim: int, *, rngs, dtype, param_dtype):
    self.patch_size = patch_size
    self.proj = layers.linear(
        in_channels * patch_size ** 2, dim, ("patch_in", "embed"), rngs=rngs, dtype=dtype,
        param_dtype=param_dtype, kernel_init=nnx.initializers.xavier_uniform(), bias_init=layers.zeros)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(patchify(x.astype(self.proj.dtype), self.patch_size))


class PatchBlock(nnx.Module):
  """Pre-norm DiT block with adaLN-Zero, RMSNorm, rotary qk-norm attention and SwiGLU.

  s <- s + gate_msa * Attn(RMSNorm(s) * (1 + scale_msa) + shift_msa)
  s <- s + gate_mlp * FFN (RMSNorm(s) * (1 + scale_mlp) + shift_mlp)
  The modulation Linear(D -> 6D) starts at zero, so a fresh block is the identity.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    d = cfg.hidden_size
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm1 = layers.RMSNorm(d, param_dtype=param_dtype)
    self.attn = layers.RotaryAttention(d, cfg.num_heads, attention_impl=cfg.attention_impl, **kw)
    self.norm2 = layers.RMSNorm(d, param_dtype=param_dtype)
    self.mlp = layers.SwiGLU(d, cfg.swiglu_hidden, **kw)
    self.adaln = layers.linear(d, 6 * d, ("embed", "cond"), kernel_init=layers.zeros,
                               bias_init=layers.zeros, **kw)

  def __call__(self, s: jax.Array, c: jax.Array, rope) -> jax.Array:
    # c is the global condition SiLU(t_emb + y_emb), shape (B, 1, D).
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(self.adaln(c), 6, -1)
    s = s + gate_msa * self.attn(modulate(self.norm1(s), shift_msa, scale_msa), rope)
    s = s + gate_mlp * self.mlp(modulate(self.norm2(s), shift_mlp, scale_mlp))
    return s


class PatchOutputHead(nnx.Module):
  """Output head of the patch-only model (pixel_depth = 0, the "vanilla DiT/16" baseline).

  DiT's final layer with RMSNorm: adaLN shift/scale from c, then Linear(D -> p*p*C); both
  zero-initialised. Its output is (B, L, p*p, C), the same per-patch pixel layout as the PiT path.
  Not part of the released models, so its layout is ours.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    d, p, c = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, kernel_init=layers.zeros,
              bias_init=layers.zeros)
    self.out_channels = c
    self.norm = layers.RMSNorm(d, param_dtype=param_dtype)
    self.adaln = layers.linear(d, 2 * d, ("embed", "cond"), **kw)
    self.linear = layers.linear(d, p * p * c, ("embed", "patch_out"), **kw)

  def __call__(self, s: jax.Array, c: jax.Array) -> jax.Array:
    shift, scale = jnp.split(self.adaln(c), 2, -1)
    out = self.linear(modulate(self.norm(s), shift, scale))
    return out.reshape(*out.shape[:2], -1, self.out_channels)


# ----------------------------------------------------------------------------- text-to-image

def _rotary_qkv(attn: layers.RotaryAttention, x: jax.Array, rope):
  """q, k, v (B, N, heads, head_dim) of one stream, with that stream's qk-norm and RoPE."""
  *lead, n, _ = x.shape
  qkv = attn.qkv(x).reshape(*lead, n, 3, attn.num_heads, attn.head_dim)  # [q|k|v][head][head_dim]
  q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
  return layers.apply_rope(attn.q_norm(q), *rope), layers.apply_rope(attn.k_norm(k), *rope), v


class JointAttention(nnx.Module):
  """MM-DiT joint attention: per-stream qkv (no bias), qk-RMSNorm, RoPE and output projection
  (bias), one SDPA over the concatenation [text, image], no mask (spec §7.1).

  Each stream's parameters are those of a RotaryAttention (`img`, `txt`); only the attention
  itself is shared. Image tokens get 2D RoPE, text tokens 1D RoPE, before the concatenation.
  """

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype, param_dtype,
               attention_impl=None):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
    self.attention_impl = attention_impl
    self.img = layers.RotaryAttention(dim, num_heads, **kw)
    self.txt = layers.RotaryAttention(dim, num_heads, **kw)

  def __call__(self, x: jax.Array, y: jax.Array, rope_img, rope_txt) -> tuple[jax.Array, jax.Array]:
    qx, kx, vx = _rotary_qkv(self.img, x, rope_img)
    qy, ky, vy = _rotary_qkv(self.txt, y, rope_txt)
    cat = lambda a, b: jnp.concatenate([a, b], axis=-3)  # text first, along the token axis
    out = attention.attention(cat(qy, qx), cat(ky, kx), cat(vy, vx), self.attention_impl)
    out = out.reshape(*out.shape[:-2], -1)
    n_txt = y.shape[-2]
    return self.img.proj(out[..., n_txt:, :]), self.txt.proj(out[..., :n_txt, :])


class MMDiTBlock(nnx.Module):
  """Two-stream MM-DiT block of the T2I model (official `MMDiTBlockT2I`, spec §7.1).

  Image (x) and text (y) streams have their own RMSNorms, SwiGLU FFNs and adaLN Linear(D -> 6D),
  both adaLNs fed the same c = SiLU(t_emb); they meet only in the joint attention:
    x, y <- x + gate_msa_x * attn_x, y + gate_msa_y * attn_y,
            (attn_x, attn_y) = JointAttn(RMSNorm(x)*(1+scale_msa_x)+shift_msa_x, ... y ...)
    x <- x + gate_mlp_x * FFN_x(RMSNorm(x) * (1 + scale_mlp_x) + shift_mlp_x), same for y.
  Unlike the ImageNet blocks, the modulation is not zero-initialised (torch default init).
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    d = cfg.hidden_size
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.img_norm1 = layers.RMSNorm(d, param_dtype=param_dtype)
    self.txt_norm1 = layers.RMSNorm(d, param_dtype=param_dtype)
    self.attn = JointAttention(d, cfg.num_heads, attention_impl=cfg.attention_impl, **kw)
    self.img_norm2 = layers.RMSNorm(d, param_dtype=param_dtype)
    self.txt_norm2 = layers.RMSNorm(d, param_dtype=param_dtype)
    self.img_mlp = layers.SwiGLU(d, cfg.swiglu_hidden, **kw)
    self.txt_mlp = layers.SwiGLU(d, cfg.swiglu_hidden, **kw)
    self.img_adaln = layers.linear(d, 6 * d, ("embed", "cond"), **kw)
    self.txt_adaln = layers.linear(d, 6 * d, ("embed", "cond"), **kw)

  def __call__(self, streams: tuple[jax.Array, jax.Array], c: jax.Array, rope_img, rope_txt):
    # streams = (image tokens (B, L, D), text tokens (B, T, D)); c = SiLU(t_emb), (B, 1, D).
    x, y = streams
    # Both streams split their modulation in the ImageNet block's order.
    (shift_msa_x, scale_msa_x, gate_msa_x,
     shift_mlp_x, scale_mlp_x, gate_mlp_x) = jnp.split(self.img_adaln(c), 6, -1)
    (shift_msa_y, scale_msa_y, gate_msa_y,
     shift_mlp_y, scale_mlp_y, gate_mlp_y) = jnp.split(self.txt_adaln(c), 6, -1)
    attn_x, attn_y = self.attn(modulate(self.img_norm1(x), shift_msa_x, scale_msa_x),
                               modulate(self.txt_norm1(y), shift_msa_y, scale_msa_y), rope_img, rope_txt)
    x = x + gate_msa_x * attn_x
    y = y + gate_msa_y * attn_y
    x = x + gate_mlp_x * self.img_mlp(modulate(self.img_norm2(x), shift_mlp_x, scale_mlp_x))
    y = y + gate_mlp_y * self.txt_mlp(modulate(self.txt_norm2(y), shift_mlp_y, scale_mlp_y))
    return x, y
