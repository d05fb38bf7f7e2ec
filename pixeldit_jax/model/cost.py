"""Analytic parameter and FLOP counts.

FLOPs follow the convention of the official compute_flops tool (spec §6.2): 2 x multiply-adds
of every Linear plus 4 * N^2 * C for each attention over N tokens of width C; norms, activations
and elementwise work are not counted. T2I counts include the text tokens (spec §6.2). A training
step is taken as 3x the forward pass (forward + backward), the usual convention for MFU.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
from flax import nnx

from pixeldit_jax.model.config import PixelDiTConfig


def count_params(model: nnx.Module) -> int:
  """Number of parameters of a model or of its abstract (eval_shape) version."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def param_breakdown(model: nnx.Module) -> dict[str, int]:
  """Parameters per top-level submodule (patch_blocks, pixel_blocks, ...)."""
  state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return {k: sum(math.prod(x.shape) for x in jax.tree.leaves(v)) for k, v in state.items()}


def _linear(tokens: int, fan_in: int, fan_out: int) -> int:
  return 2 * tokens * fan_in * fan_out


def _attention(tokens: int, width: int) -> int:
  """qkv and output projections plus the 4 N^2 C of scores and weighted sum."""
  return _linear(tokens, width, 3 * width) + _linear(tokens, width, width) + 4 * tokens ** 2 * width


def forward_flops(cfg: PixelDiTConfig, height: int, width: int,
                  text_tokens: Optional[int] = None) -> dict[str, int]:
  """Forward FLOPs of one image at (height, width), by component, plus 'total'.

  For the T2I model the text stream (`text_tokens`, default cfg.text_length) runs through every
  MM-DiT block and joins the image tokens in one attention over L + T tokens."""
  p, d, c = cfg.patch_size, cfg.hidden_size, cfg.in_channels
  n_patch, n_pix = (height // p) * (width // p), height * width
  f = {
      "patch_embed": _linear(n_patch, c * p * p, d),
      "timestep_embed": _linear(1, 256, d) + _linear(1, d, d),
  }
  if cfg.is_text_to_image:
    n_txt = cfg.text_length if text_tokens is None else text_tokens
    n = n_patch + n_txt  # per-stream linears cost the same per token as one stream over all tokens
    f["text_embed"] = _linear(n_txt, cfg.text_dim, d) + cfg.text_pooled_cond * _linear(1, cfg.text_dim, d)
    f["patch_blocks"] = cfg.patch_depth * (2 * _linear(1, d, 6 * d) + _attention(n, d)
                                           + 3 * _linear(n, d, cfg.swiglu_hidden))
  else:
    # adaLN runs once per image: the condition is one vector, not one per token.
    f["patch_blocks"] = cfg.patch_depth * (_linear(1, d, 6 * d) + _attention(n_patch, d)
                                           + 3 * _linear(n_patch, d, cfg.swiglu_hidden))
  if cfg.pixel_depth == 0:
    f["out_head"] = _linear(1, d, 2 * d) + _linear(n_patch, d, p * p * c)
  else:
    dpix, a = cfg.pixel_hidden_size, cfg.attn_size
    n_mod = 4 if cfg.pit_post_modulation else 6
    mod_pixels = p * p if cfg.pixel_adaln == "pixelwise" else 1
    if cfg.pixel_compaction:
      attn_branch = 2 * _linear(n_patch, p * p * dpix, a) + _attention(n_patch, a)
    else:
      attn_branch = 2 * _linear(n_pix, dpix, a) + _attention(n_pix, a)
    f["pixel_embed"] = _linear(n_pix, c, dpix)
    f["pixel_blocks"] = cfg.pixel_depth * (_linear(n_patch, d, mod_pixels * n_mod * dpix) + attn_branch
                                           + 2 * _linear(n_pix, dpix, cfg.pixel_mlp_hidden))
    f["out_head"] = _linear(n_pix, dpix, c)
  f["total"] = sum(f.values())
  return f


def train_step_flops(cfg: PixelDiTConfig, height: int, width: int, batch: int,
                     forward: Optional[int] = None) -> int:
  """FLOPs of one training step (forward + backward = 3x forward) on a batch."""
  return 3 * batch * (forward if forward is not None else forward_flops(cfg, height, width)["total"])
