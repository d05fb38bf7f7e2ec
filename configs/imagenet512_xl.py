"""PixelDiT-XL/16 on ImageNet 512x512 (class-conditional).

Launch (TPU v5p-64 or 8x H100; see launch/):
  python -m pixeldit_jax.main --config=configs/imagenet512_xl.py --workdir=gs://BUCKET/pixeldit_xl512
Same 797.38 M parameters as at 256 (nothing in the model depends on the resolution).
Paper result (850 epochs, 100 steps, CFG 3.5, time shift 2.0): FID 1.81.
"""

from pixeldit_jax import config_lib
from pixeldit_jax.model import preset


def get_config(arg=None):
  v = config_lib.parse_variant(arg, size="XL")
  c = config_lib.base_config()
  c.image_size = (512, 512)
  c.model = config_lib.model_dict(preset(v.size, dtype="bfloat16"))
  c.batch_size = 256
  return c
