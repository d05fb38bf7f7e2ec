"""The class-conditional PixelDiT: patch level, then pixel level (spec §1.1).

    x (B, H, W, 3) in [-1, 1], t (B,), y (B,) int  ->  velocity (B, H, W, 3)

The model knows nothing of the diffusion time convention: it receives whatever t the caller
passes through the max_period-10 sinusoid (ImageNet: t in [0, 1], 1 = data).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from pixeldit_jax import sharding
from pixeldit_jax.model import layers
from pixeldit_jax.model.config import PixelDiTConfig
from pixeldit_jax.model.patch_level import PatchBlock, PatchEmbedder, PatchOutputHead
from pixeldit_jax.model.pixel_level import (PiTBlock, PixelEmbedder, PixelOutputHead,
                                            ungroup_pixels)


class PixelDiT(nnx.Module):

  def __init__(self, cfg: PixelDiTConfig, *, rngs: nnx.Rngs):
    if cfg.patch_depth < 1:
      raise ValueError("PixelDiT needs at least one patch block")
    self.cfg = cfg
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.patch_embed = PatchEmbedder(cfg.in_channels, cfg.patch_size, cfg.hidden_size, **kw)
    self.t_embedder = layers.TimestepEmbedder(cfg.hidden_size, **kw)
    self.y_embedder = layers.ClassEmbedder(cfg.num_classes, cfg.hidden_size, **kw)
    self.patch_blocks = layers.stack_blocks(lambda r: PatchBlock(cfg, rngs=r), cfg.patch_depth, rngs)
    if cfg.pixel_depth > 0:
      self.pixel_embed = PixelEmbedder(cfg, rngs=rngs)
      self.pixel_blocks = layers.stack_blocks(lambda r: PiTBlock(cfg, rngs=r), cfg.pixel_depth, rngs)
      self.out_head = PixelOutputHead(cfg, rngs=rngs)
    else:
      self.out_head = PatchOutputHead(cfg, rngs=rngs)

  def check_input(self, x: jax.Array):
    p, c = self.cfg.patch_size, self.cfg.in_channels
    if x.ndim != 4 or x.shape[-1] != c or x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f"PixelDiT expects images (B, H, W, {c}) with H and W divisible by the "
                       f"patch size {p}; got shape {tuple(x.shape)}")

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, *,
               capture_block: Optional[int] = None):
    """Velocity (B, H, W, C) in fp32; with `capture_block=k` also the patch tokens after patch
    block k (1-based, REPA's student features): (velocity, (B, L, D))."""
    cfg = self.cfg
    self.check_input(x)
    _, h, w, _ = x.shape
    p = cfg.patch_size

    t_emb = self.t_embedder(t)[:, None, :]  # (B, 1, D)
    cond = nnx.silu(t_emb + self.y_embedder(y)[:, None, :])  # shared by all patch blocks

    rope = tuple(jnp.asarray(a) for a in layers.rope_2d_table(
        cfg.head_dim, h // p, w // p, theta=cfg.rope_theta, scale=cfg.rope_scale))
    # Activations keep the batch split where the block stacks start (sharding.constrain_batch);
    # not the small condition vector, which XLA would otherwise gather across slices.
    tokens = sharding.constrain_batch(self.patch_embed(x))
    s = layers.scan_blocks(self.patch_blocks, tokens, cond, rope,
                           remat_policy=cfg.remat_policy, unroll=not cfg.scan_layers,
                           capture=capture_block)
    if capture_block is not None:
      s, features = s

    if cfg.pixel_depth == 0:
      out = self.out_head(s, cond)
    else:
      # Semantic condition for the pixel level: the timestep is added again, the class is not.
      s_cond = nnx.silu(s + t_emb)
      pit_rope = tuple(jnp.asarray(a) for a in PiTBlock.rope_tables(cfg, h, w))
      pixels, s_cond = sharding.constrain_batch((self.pixel_embed(x), s_cond))
      pixels = layers.scan_blocks(self.pixel_blocks, pixels, s_cond, pit_rope,
                                  remat_policy=cfg.remat_policy, unroll=not cfg.scan_layers)
      out = self.out_head(pixels)
    out = ungroup_pixels(out, h, w).astype(jnp.float32)
    return out if capture_block is None else (out, features)


def model_class(cfg: PixelDiTConfig) -> type:
  """PixelDiT (class-conditional) or PixelDiTT2I (cfg.text_dim set)."""
  if getattr(cfg, "text_dim", None) is None:
    return PixelDiT
  from pixeldit_jax.model.pixeldit_t2i import PixelDiTT2I  # noqa: PLC0415 - it imports this module
  return PixelDiTT2I


def build(cfg: PixelDiTConfig, seed: int = 0) -> nnx.Module:
  """Materialise a model (PixelDiT or PixelDiTT2I, by cfg) on the default device (tests, demos);
  training inits sharded instead.

  Initialisation runs as one compiled program: eagerly it would be hundreds of tiny dispatches.
  """
  cls = model_class(cfg)
  graphdef, _ = nnx.split(abstract(cfg))
  state = jax.jit(lambda: nnx.state(cls(cfg, rngs=nnx.Rngs(params=seed))))()
  return nnx.merge(graphdef, state)


def abstract(cfg: PixelDiTConfig) -> nnx.Module:
  """The model with ShapeDtypeStruct leaves: shapes and logical names, nothing allocated."""
  cls = model_class(cfg)
  return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(params=0)))
