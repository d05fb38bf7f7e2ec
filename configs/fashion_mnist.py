"""The embedded default: a small dual-level PixelDiT on Fashion-MNIST, runs offline on a CPU.

  make demo      (same as: python -m pixeldit_jax.main --config=configs/fashion_mnist.py --workdir=workdir/demo)

28x28 grayscale images padded to 32x32, patch size 4 (64 patch tokens of 16 pixels each), the
real model: patch blocks with RoPE + RMSNorm + SwiGLU, PiT blocks with pixel-wise AdaLN and
token compaction.
"""

from pixeldit_jax import config_lib
from pixeldit_jax.model import PixelDiTConfig


def get_config(arg=None):
  config_lib.parse_variant(arg)  # no variants yet; rejects unknown ones
  c = config_lib.base_config()
  c.image_size = (32, 32)
  c.model = config_lib.model_dict(PixelDiTConfig(
      in_channels=1, patch_size=4, num_classes=10, hidden_size=128, num_heads=4, patch_depth=4,
      pixel_depth=2, pixel_hidden_size=16))
  c.batch_size = 64
  return c
