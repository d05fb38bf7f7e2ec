"""Patch level: the semantic DiT over 16x16 patches (spec §1.1 steps 1-5, §1.2).

Images are NHWC here (the JAX convention); patch vectors are built channel-major, [c][row][col],
exactly as torch's unfold lays them out, so the official patch-embedding weights load unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pixeldit_jax.model import layers


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
