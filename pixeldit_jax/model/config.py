"""Model hyper-parameters: one frozen dataclass, plus the paper's size presets.

The defaults are PixelDiT-XL/16 as released (spec §6.1). Setting ``text_dim`` selects the
text-to-image model instead (PixelDiT-T2I, spec §7.1: MM-DiT patch blocks over image and text
tokens; ``num_classes`` is then unused). Experiment configs (``configs/*.py``) hold a ``model``
dict whose fields are exactly the fields below; unknown fields are rejected.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

PIXEL_ADALN_MODES = ("pixelwise", "patchwise")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class PixelDiTConfig:
  # Image and patches.
  in_channels: int = 3
  patch_size: int = 16
  num_classes: int = 1000  # the class table has num_classes + 1 rows; the last is the null class
  # Text conditioning (T2I). None: the class-conditional model. Set: text embeddings of this width
  # (Gemma-2-2B: 2304) go through Linear(text_dim -> D) -> RMSNorm and MM-DiT joint attention.
  text_dim: Optional[int] = None
  text_length: int = 300  # slots of the learned text position embedding (the max text tokens)
  # Not in the released model (off there): Linear(text_dim -> D) of the mean text embedding added
  # to the adaLN condition of the MM-DiT blocks, SD3's pooled-text vector. The small CPU demo uses
  # it: the caption then reaches every block's modulation, not only the joint attention.
  text_pooled_cond: bool = False
  # Patch level (semantic DiT).
  hidden_size: int = 1152  # D
  num_heads: int = 16
  patch_depth: int = 26  # N
  mlp_ratio: float = 4.0  # SwiGLU hidden = int(2 * int(D * mlp_ratio) / 3)
  # Pixel level (PiT blocks).
  pixel_depth: int = 4  # M; 0 gives a plain patch DiT (the paper's "vanilla DiT/16" row)
  pixel_hidden_size: int = 16  # D_pix
  pixel_attn_size: Optional[int] = None  # A; None means A = D (ImageNet models)
  pixel_num_heads: Optional[int] = None  # None means num_heads
  pixel_mlp_ratio: float = 4.0
  use_pixel_abs_pos: bool = True
  # Ablation switches (the defaults are the paper's model).
  pixel_adaln: str = "pixelwise"  # "patchwise": one modulation per patch broadcast to its pixels
  pit_post_modulation: bool = False  # June 2026 variant: scale/shift after each branch, no gates
  pixel_compaction: bool = True  # False: PiT attention over every pixel (tiny images only)
  # Positional encoding.
  rope_theta: float = 10000.0
  rope_scale: float = 16.0  # every grid spans [0, rope_scale] on each axis
  # Numerics and compilation.
  dtype: str = "float32"  # compute dtype ("bfloat16" for mixed precision); params stay param_dtype
  param_dtype: str = "float32"
  remat_policy: str = "none"
  # True: one traced block body run by a loop (compile time independent of depth). False unrolls
  # the loop at compile time: same parameters, ~30% faster steps on CPU for small models.
  scan_layers: bool = True
  # None: per backend (splash on TPU, cuDNN on GPU where it fits, else XLA); "xla", "cudnn" or
  # "splash" force one (model/attention.py).
  attention_impl: Optional[str] = None

  def __post_init__(self):
    errors = []
    if self.hidden_size % self.num_heads:
      errors.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    elif self.head_dim % 4:
      errors.append(f"2D RoPE needs head_dim % 4 == 0, got head_dim {self.head_dim}")
    if self.pixel_depth < 0 or self.patch_depth < 0:
      errors.append("patch_depth and pixel_depth must be >= 0")
    if self.text_dim is not None:
      if self.text_dim < 1:
        errors.append(f"text_dim must be a positive width or None, got {self.text_dim}")
      if self.text_length < 1:
        errors.append(f"text_length must be >= 1, got {self.text_length}")
      if self.pixel_depth < 1 or self.patch_depth < 1:
        errors.append("the text-to-image model needs patch_depth >= 1 and pixel_depth >= 1")
    elif self.text_pooled_cond:
      errors.append("text_pooled_cond needs the text-to-image model (set text_dim)")
    if self.pixel_depth > 0:
      if self.attn_size % self.pixel_heads:
        errors.append(
            f"pixel attention width {self.attn_size} is not divisible by {self.pixel_heads} heads")
      elif (self.attn_size // self.pixel_heads) % 4:
        errors.append("2D RoPE in PiT attention needs (pixel_attn_size / pixel_num_heads) % 4 == 0")
      if self.pixel_hidden_size % 4:
        errors.append("the 2D sin-cos pixel embedding needs pixel_hidden_size % 4 == 0")
    if self.pixel_adaln not in PIXEL_ADALN_MODES:
      errors.append(f"pixel_adaln must be one of {PIXEL_ADALN_MODES}, got {self.pixel_adaln!r}")
    if self.remat_policy not in REMAT_POLICIES:
      errors.append(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      errors.append(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
    if self.param_dtype not in ("float32", "bfloat16"):
      errors.append(f"param_dtype must be float32 or bfloat16, got {self.param_dtype!r}")
    if self.attention_impl not in (None, "xla", "cudnn", "splash"):
      errors.append(f"attention_impl must be None, 'xla', 'cudnn' or 'splash', got {self.attention_impl!r}")
    if errors:
      raise ValueError("Invalid PixelDiT model config:\n  - " + "\n  - ".join(errors))

  @property
  def is_text_to_image(self) -> bool:
    return self.text_dim is not None

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def attn_size(self) -> int:
    return self.pixel_attn_size or self.hidden_size

  @property
  def pixel_heads(self) -> int:
    return self.pixel_num_heads or self.num_heads

  @property
  def swiglu_hidden(self) -> int:
    # The official FeedForward takes int(D * mlp_ratio) and keeps two thirds of it.
    return int(2 * int(self.hidden_size * self.mlp_ratio) / 3)

  @property
  def pixel_mlp_hidden(self) -> int:
    return int(self.pixel_hidden_size * self.pixel_mlp_ratio)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "PixelDiTConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"Unknown PixelDiT model config fields: {unknown}. Known: {sorted(known)}")
    return cls(**d)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


# The paper's sizes (spec §6.1). Patch size 16 and D_pix 16 for all; A = D except for T2I.
PRESETS = {
    "B": dict(hidden_size=768, num_heads=12, patch_depth=12, pixel_depth=2),
    "L": dict(hidden_size=1024, num_heads=16, patch_depth=22, pixel_depth=4),
    "XL": dict(hidden_size=1152, num_heads=16, patch_depth=26, pixel_depth=4),
    # PixelDiT-T2I 1.3B (spec §7.1, official t2i configs): 14 MM-DiT blocks, SwiGLU hidden 4096.
    "T2I": dict(hidden_size=1536, num_heads=24, patch_depth=14, pixel_depth=2, pixel_attn_size=1152,
                pixel_num_heads=16, text_dim=2304, text_length=300),
}


def preset(name: str, **overrides) -> PixelDiTConfig:
  """PixelDiT-{B,L,XL}/16 or PixelDiT-T2I, optionally with some fields overridden."""
  if name not in PRESETS:
    raise ValueError(f"Unknown PixelDiT size {name!r}; choose one of {sorted(PRESETS)}")
  return PixelDiTConfig(**{**PRESETS[name], **overrides})
