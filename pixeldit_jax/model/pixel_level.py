"""Pixel level: PiT blocks with pixel-wise AdaLN and pixel token compaction (spec §1.3, §2, §3).

Pixel tokens are kept grouped per patch, shape (B, L, p*p, D_pix), pixel index j = row*p + col
inside the patch. The semantic condition s_cond = SiLU(s_N + t_emb), shape (B, L, D), comes from
the patch level: each patch's semantic token conditions that patch's p*p pixels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixeldit_jax.model import layers
from pixeldit_jax.model.patch_level import modulate


def group_pixels(x: jax.Array, p: int) -> jax.Array:
  """(B, H, W, D) -> (B, L, p*p, D): pixels grouped by patch, patches in raster order."""
  b, h, w, d = x.shape
  x = x.reshape(b, h // p, p, w // p, p, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p, d)


def ungroup_pixels(x: jax.Array, height: int, width: int) -> jax.Array:
  """Inverse of group_pixels: (B, L, p*p, D) -> (B, H, W, D) (torch's fold, channel-last)."""
  b, _, p2, d = x.shape
  p = int(round(p2 ** 0.5))
  x = x.reshape(b, height // p, width // p, p, p, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, height, width, d)


class PixelEmbedder(nnx.Module):
  """Per-pixel Linear(C -> D_pix) plus the fixed 2D sin-cos embedding of pixel coordinates."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.patch_size = cfg.patch_size
    self.use_abs_pos = cfg.use_pixel_abs_pos
    self.proj = layers.linear(cfg.in_channels, cfg.pixel_hidden_size, ("channels", "pixel"),
                              rngs=rngs, dtype=jnp.dtype(cfg.dtype),
                              param_dtype=jnp.dtype(cfg.param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, _ = x.shape
    tokens = self.proj(x.astype(self.proj.dtype))
    if self.use_abs_pos:
      table = layers.sincos_2d_table(tokens.shape[-1], h, w).reshape(h, w, -1)
      tokens = tokens + jnp.asarray(table, tokens.dtype)
    return group_pixels(tokens, self.patch_size)


class PixelwiseAdaLN(nnx.Module):
  """Pixel-wise AdaLN: each pixel of a patch gets its own modulation from the patch's token.

  Phi = Linear(D -> p*p * n * D_pix) is applied to s_cond (B, L, D); its output is laid out
  [pixel j][parameter k][channel d], so it reshapes to (B, L, p*p, n, D_pix) and parameter k of
  pixel j is theta[:, :, j, k, :]. n = 6 (shift, scale, gate for attention, then for the MLP) in
  the default pre-modulation block, n = 4 (scale1, shift1, scale2, shift2) with post-modulation.

  mode="patchwise" is the paper's ablation (B): Linear(D -> n * D_pix), the same six vectors
  broadcast to every pixel of the patch. Only this projection differs between the two modes.
  Zero-initialised, so a fresh pre-modulation PiT block is the identity.
  """

  def __init__(self, cond_dim: int, pixel_dim: int, pixels_per_patch: int, num_params: int, *,
               mode: str, rngs: nnx.Rngs, dtype, param_dtype):
    self.num_params = num_params
    self.pixel_dim = pixel_dim
    self.pixels = pixels_per_patch if mode == "pixelwise" else 1
    self.proj = layers.linear(cond_dim, self.pixels * num_params * pixel_dim, ("embed", "pixel_cond"),
                              kernel_init=layers.zeros, bias_init=layers.zeros, rngs=rngs,
                              dtype=dtype, param_dtype=param_dtype)

  def __call__(self, s_cond: jax.Array) -> tuple[jax.Array, ...]:
    theta = self.proj(s_cond).reshape(*s_cond.shape[:-1], self.pixels, self.num_params, self.pixel_dim)
    # jnp.split (not theta[..., k, :]): its gradient is one concatenate, where six slices would
    # each be zero-padded back to full size and summed (the largest cost of the CPU backward).
    return tuple(p.squeeze(-2) for p in jnp.split(theta, self.num_params, axis=-2))  # (B, L, p*p or 1, D_pix)


def _pixel_rope_in_patch_order(head_dim, height, width, p, theta, scale):
  """2D RoPE over every pixel, reordered from raster order to the patch-grouped token order."""
  cos, sin = layers.rope_2d_table(head_dim, height, width, theta=theta, scale=scale)
  order = group_pixels(np.arange(height * width).reshape(1, height, width, 1), p).reshape(-1)
  return cos[order], sin[order]


class PiTBlock(nnx.Module):
  """Pixel Transformer block: pixel-wise AdaLN, compacted global attention, per-pixel MLP.

  Attention branch with compaction (spec §3): flatten each patch's modulated pixels to p*p*D_pix
  values, compress them to one token (Linear -> A), attend over the L patch tokens with 2D RoPE,
  expand back (Linear A -> p*p*D_pix) and add, gated per pixel, to the full-resolution pixel
  stream. Without compaction (ablation, tiny images only): Linear(D_pix -> A) per pixel and
  attention over all H*W pixels with 2D RoPE on the pixel grid, then Linear(A -> D_pix).
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    p2, dpix, a = cfg.patch_size ** 2, cfg.pixel_hidden_size, cfg.attn_size
    self.cfg = cfg
    self.post_modulation = cfg.pit_post_modulation
    self.adaln = PixelwiseAdaLN(cfg.hidden_size, dpix, p2, 4 if cfg.pit_post_modulation else 6,
                                mode=cfg.pixel_adaln, **kw)
    self.norm1 = layers.RMSNorm(dpix, param_dtype=param_dtype)
    if cfg.pixel_compaction:
      self.compress = layers.linear(p2 * dpix, a, ("pixel_patch", "embed"), **kw)
      self.expand = layers.linear(a, p2 * dpix, ("embed", "pixel_patch"), **kw)
    else:
      self.to_attn = layers.linear(dpix, a, ("pixel", "embed"), **kw)
      self.from_attn = layers.linear(a, dpix, ("embed", "pixel"), **kw)
    self.attn = layers.RotaryAttention(a, cfg.pixel_heads, attention_impl=cfg.attention_impl, **kw)
    self.norm2 = layers.RMSNorm(dpix, param_dtype=param_dtype)
    self.mlp = layers.GeluMLP(dpix, cfg.pixel_mlp_hidden, **kw)

  def attention_branch(self, x: jax.Array, rope) -> jax.Array:
    b, l, p2, dpix = x.shape
    if self.cfg.pixel_compaction:
      tokens = self.compress(x.reshape(b, l, p2 * dpix))  # one token per patch
      return self.expand(self.attn(tokens, rope)).reshape(b, l, p2, dpix)
    tokens = self.to_attn(x.reshape(b, l * p2, dpix))  # one token per pixel
    return self.from_attn(self.attn(tokens, rope)).reshape(b, l, p2, dpix)

  def __call__(self, x: jax.Array, s_cond: jax.Array, rope) -> jax.Array:
    mod = self.adaln(s_cond)
    if self.post_modulation:
      scale1, shift1, scale2, shift2 = mod
      x = x + modulate(self.attention_branch(self.norm1(x), rope), shift1, scale1)
      return x + modulate(self.mlp(self.norm2(x)), shift2, scale2)
    shift1, scale1, gate1, shift2, scale2, gate2 = mod
    x = x + gate1 * self.attention_branch(modulate(self.norm1(x), shift1, scale1), rope)
    return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))

  @staticmethod
  def rope_tables(cfg, height: int, width: int):
    """RoPE tables for this block's attention at image size (height, width)."""
    p, hd = cfg.patch_size, cfg.attn_size // cfg.pixel_heads
    if cfg.pixel_compaction:
      return layers.rope_2d_table(hd, height // p, width // p, theta=cfg.rope_theta, scale=cfg.rope_scale)
    return _pixel_rope_in_patch_order(hd, height, width, p, cfg.rope_theta, cfg.rope_scale)


class PixelOutputHead(nnx.Module):
  """RMSNorm(D_pix) -> Linear(D_pix -> C), zero-initialised; no adaLN (spec §1.1 step 9)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    param_dtype = jnp.dtype(cfg.param_dtype)
    self.norm = layers.RMSNorm(cfg.pixel_hidden_size, param_dtype=param_dtype)
    self.linear = layers.linear(cfg.pixel_hidden_size, cfg.in_channels, ("pixel", "channels"),
                                kernel_init=layers.zeros, bias_init=layers.zeros, rngs=rngs,
                                dtype=jnp.dtype(cfg.dtype), param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear(self.norm(x))
