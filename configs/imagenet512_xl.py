"""PixelDiT-XL/16 on ImageNet 512x512 (class-conditional), with REPA.

Launch (TPU v5p-64, or 8x H100 80 GB with remat; see launch/), after preparing tfds imagenet2012
in DATA_DIR and downloading the DINOv2 ViT-B/14 teacher (facebook/dinov2-base model.safetensors
or dinov2_vitb14_pretrain.pth):
  python -m pixeldit_jax.main --config=configs/imagenet512_xl.py \
      --config.data.path=DATA_DIR --config.repa.teacher_path=DINOV2_PATH \
      --workdir=gs://BUCKET/pixeldit_xl512
Memory: full remat by default; compiled ahead of time (python -m pixeldit_jax.aot) the step needs
5.9 GiB per chip on v5p-64 and 3.2 on v5p-128. Variants `:size=B`, `:size=L`. Same 797.38 M parameters as at 256
(nothing in the model depends on the resolution).
Recipe (spec §4.3; the released 512 config): batch 256, AdamW 1e-4, clip 0.5,
training time shift 3.0, EMA 0.9999, up to 4 M steps (the released model trained 850 epochs);
REPA 0.5 at patch block 8 with DINOv2 at 448x448 (a 32x32 grid, the patch grid's size).
Paper result (100-step sampler, CFG 3.5, time shift 2.0): FID 1.81.
"""

from pixeldit_jax import config_lib
from pixeldit_jax.model import preset


def get_config(arg=None):
  v = config_lib.parse_variant(arg, size="XL")
  c = config_lib.base_config()
  c.image_size = (512, 512)
  # Full remat: without it the step cannot fit (see imagenet256_xl.py; 4x the tokens here).
  c.model = config_lib.model_dict(preset(v.size, dtype="bfloat16", remat_policy="full"))
  c.batch_size = 256
  c.sharding.dcn_mesh_shape = (1, 1, 1)  # multi-slice: e.g. (2, 1, 1), data parallel over 2 slices
  c.data.source = "imagenet"
  c.data.num_workers = 8
  t = c.train
  t.num_steps = 4_000_000
  t.lr, t.grad_clip, t.ema_decay, t.time_shift = 1e-4, 0.5, 0.9999, 3.0
  t.log_every, t.checkpoint_every, t.sample_every = 100, 10_000, 10_000
  t.sample_cfg_scale, t.sample_cfg_interval = 3.5, (0.1, 1.0)
  # The released 512 evaluation: 100 AB2 steps, CFG 3.5 on t in (0.1, 1), time shift 2.0.
  c.sample.update(dict(num_steps=100, cfg_scale=3.5, cfg_interval=(0.1, 1.0), time_shift=2.0, batch_size=32))
  c.repa.update(dict(weight=0.5, block=8, loss_form="c2i"))  # teacher at 448: 14 * 512 / 16
  return c
