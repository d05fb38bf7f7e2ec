"""The text-to-image PixelDiT (PixelDiT-T2I, spec §7.1): MM-DiT patch level, then pixel level.

    x (B, H, W, 3) in [-1, 1], t (B,), text (B, T, text_dim)  ->  velocity (B, H, W, 3)

Text embeddings (Gemma-2-2B hidden states, T <= text_length) go through Linear -> RMSNorm plus a
learned position embedding and take part in the joint attention of every MM-DiT block; after the
last block the text stream is dropped and s_cond = SiLU(s_N + t_emb) conditions the PiT blocks,
exactly as in the class-conditional model. There is no class or pooled-text vector: the adaLN
condition is SiLU(t_emb) alone, and there is no attention mask (padded text tokens attend too).
(``text_pooled_cond``, off in the released model, adds a projection of the mean text embedding
to t_emb in the MM-DiT condition, as SD3 does with its pooled text vector.)

The model knows nothing of the diffusion convention: t goes through the max_period-10 sinusoid
as given (the T2I convention passes sigma * 1000, spec §7.4).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from pixeldit_jax import sharding
from pixeldit_jax.model import layers
from pixeldit_jax.model.config import PixelDiTConfig
from pixeldit_jax.model.patch_level import MMDiTBlock, PatchEmbedder
from pixeldit_jax.model.pixel_level import (PiTBlock, PixelEmbedder, PixelOutputHead,
                                            ungroup_pixels)


class TextEmbedder(nnx.Module):
  """Linear(text_dim -> D, bias) -> RMSNorm(D), torch-default init (official `y_embedder`)."""

  def __init__(self, text_dim: int, dim: int, *, rngs: nnx.Rngs, dtype, param_dtype):
    self.proj = layers.linear(text_dim, dim, ("text_in", "embed"), rngs=rngs, dtype=dtype,
                              param_dtype=param_dtype)
    self.norm = layers.RMSNorm(dim, param_dtype=param_dtype)

  def __call__(self, text: jax.Array) -> jax.Array:
    return self.norm(self.proj(text.astype(self.proj.dtype)))


class PixelDiTT2I(nnx.Module):

  def __init__(self, cfg: PixelDiTConfig, *, rngs: nnx.Rngs):
    if not cfg.is_text_to_image:
      raise ValueError("PixelDiTT2I needs cfg.text_dim (the class-conditional model is PixelDiT)")
    self.cfg = cfg
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    d = cfg.hidden_size
    self.patch_embed = PatchEmbedder(cfg.in_channels, cfg.patch_size, d, **kw)
    self.t_embedder = layers.TimestepEmbedder(d, **kw)
    self.text_embed = TextEmbedder(cfg.text_dim, d, **kw)
    # Learned absolute text positions, N(0, 1) (official `y_pos_embedding`, stored there as (1, T, D)).
    self.text_pool = (layers.linear(cfg.text_dim, d, ("text_in", "embed"), **kw)
                      if cfg.text_pooled_cond else None)
    self.text_pos = nnx.Param(jax.random.normal(rngs.params(), (cfg.text_length, d), param_dtype),
                              out_sharding=("text", "embed"), eager_sharding=False)
    self.patch_blocks = layers.stack_blocks(lambda r: MMDiTBlock(cfg, rngs=r), cfg.patch_depth, rngs)
    self.pixel_embed = PixelEmbedder(cfg, rngs=rngs)
    self.pixel_blocks = layers.stack_blocks(lambda r: PiTBlock(cfg, rngs=r), cfg.pixel_depth, rngs)
    # The T2I model does not zero its PiT modulation (only the ImageNet model does): torch default.
    proj = self.pixel_blocks.adaln.proj
    init = layers.torch_uniform(d)
    proj.kernel.set_value(init(rngs.params(), proj.kernel.shape, param_dtype))
    proj.bias.set_value(init(rngs.params(), proj.bias.shape, param_dtype))
    self.out_head = PixelOutputHead(cfg, rngs=rngs)  # zero-initialised, as in the ImageNet model

  def check_input(self, x: jax.Array, text: jax.Array):
    cfg = self.cfg
    p, c = cfg.patch_size, cfg.in_channels
    if x.ndim != 4 or x.shape[-1] != c or x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f"PixelDiTT2I expects images (B, H, W, {c}) with H and W divisible by the "
                       f"patch size {p}; got shape {tuple(x.shape)}")
    if (text.ndim != 3 or text.shape[0] != x.shape[0] or text.shape[-1] != cfg.text_dim
        or not 1 <= text.shape[1] <= cfg.text_length):
      raise ValueError(f"PixelDiTT2I expects text embeddings (B={x.shape[0]}, T <= {cfg.text_length}, "
                       f"{cfg.text_dim}); got shape {tuple(text.shape)}")

  def __call__(self, x: jax.Array, t: jax.Array, text: jax.Array, *,
               capture_block: Optional[int] = None):
    """Velocity (B, H, W, C) in fp32; with `capture_block=k` also the image tokens after MM-DiT
    block k (1-based, REPA's student features): (velocity, (B, L, D))."""
    cfg = self.cfg
    self.check_input(x, text)
    _, h, w, _ = x.shape
    p, n_txt = cfg.patch_size, text.shape[1]

    t_emb = self.t_embedder(t)[:, None, :]  # (B, 1, D)
    if self.text_pool is None:
      cond = nnx.silu(t_emb)  # the only adaLN input of both streams
    else:
      cond = nnx.silu(t_emb + self.text_pool(jnp.mean(text.astype(jnp.float32), axis=1))[:, None, :])
    txt = self.text_embed(text)
    txt = txt + self.text_pos[:n_txt].astype(txt.dtype)

    rope_img = tuple(jnp.asarray(a) for a in layers.rope_2d_table(
        cfg.head_dim, h // p, w // p, theta=cfg.rope_theta, scale=cfg.rope_scale))
    rope_txt = tuple(jnp.asarray(a) for a in layers.rope_1d_table(cfg.head_dim, n_txt, theta=cfg.rope_theta))
    # Activations keep the batch split where the block stacks start: without it GSPMD replicates
    # the batch (from the text position table, sharded over 'embed'); see sharding.constrain_batch.
    img, txt = sharding.constrain_batch((self.patch_embed(x), txt))
    streams = layers.scan_blocks(self.patch_blocks, (img, txt), cond, rope_img, rope_txt,
                                 remat_policy=cfg.remat_policy, unroll=not cfg.scan_layers,
                                 capture=capture_block)
    if capture_block is not None:
      streams, (features, _) = streams
    s = streams[0]  # the text stream ends here

    # Semantic condition for the pixel level, as in the class-conditional model.
    s_cond = nnx.silu(s + t_emb)
    pit_rope = tuple(jnp.asarray(a) for a in PiTBlock.rope_tables(cfg, h, w))
    pixels, s_cond = sharding.constrain_batch((self.pixel_embed(x), s_cond))
    pixels = layers.scan_blocks(self.pixel_blocks, pixels, s_cond, pit_rope,
                                remat_policy=cfg.remat_policy, unroll=not cfg.scan_layers)
    out = ungroup_pixels(self.out_head(pixels), h, w).astype(jnp.float32)
    return out if capture_block is None else (out, features)
