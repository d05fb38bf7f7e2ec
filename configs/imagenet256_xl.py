"""PixelDiT on ImageNet 256x256 (class-conditional), the released XL/16 model by default.

Launch (TPU v5p-32 or 8x H100/A100; see launch/):
  python -m pixeldit_jax.main --config=configs/imagenet256_xl.py --workdir=gs://BUCKET/pixeldit_xl256
Variants: `:size=B`, `:size=L` (PixelDiT-B/16 184.75 M params, -L/16 569.65 M, -XL/16 797.38 M).
Paper result (XL, 320 epochs, FlowDPMSolver 100 steps, CFG 2.75 on t in (0.1, 0.9)): FID 1.61.
"""

from pixeldit_jax import config_lib
from pixeldit_jax.model import preset


def get_config(arg=None):
  v = config_lib.parse_variant(arg, size="XL")
  c = config_lib.base_config()
  c.image_size = (256, 256)
  c.model = config_lib.model_dict(preset(v.size, dtype="bfloat16"))
  c.batch_size = 256
  return c
