"""Small configs for benchmarks and smoke tests (not from the paper).

  :size=tiny   64x64, hidden 256, patch 8, patch depth 4, pixel depth 1, batch 8
  :size=small  256x256, hidden 768, 12 heads, patch 16, patch depth 2, pixel depth 1, batch 2
"""

from pixeldit_jax import config_lib
from pixeldit_jax.model import PixelDiTConfig

SIZES = {
    "tiny": dict(image=64, batch=8, model=dict(patch_size=8, hidden_size=256, num_heads=4,
                                               patch_depth=4, pixel_depth=1)),
    "small": dict(image=256, batch=2, model=dict(patch_size=16, hidden_size=768, num_heads=12,
                                                 patch_depth=2, pixel_depth=1)),
}


def get_config(arg=None):
  v = config_lib.parse_variant(arg, size="tiny")
  if v.size not in SIZES:
    raise ValueError(f"size must be one of {sorted(SIZES)}, got {v.size!r}")
  s = SIZES[v.size]
  c = config_lib.base_config()
  c.image_size = (s["image"], s["image"])
  c.model = config_lib.model_dict(PixelDiTConfig(**s["model"]))
  c.batch_size = s["batch"]
  return c
