"""PixelDiT on ImageNet 256x256 (class-conditional): the released XL/16 recipe, with REPA.

Launch (TPU v5p-32, or one node of 8x H100/A100 80 GB; see launch/), after preparing tfds
imagenet2012 in DATA_DIR and downloading the DINOv2 ViT-B/14 teacher (Hugging Face
facebook/dinov2-base model.safetensors, or torch hub dinov2_vitb14_pretrain.pth):
  python -m pixeldit_jax.main --config=configs/imagenet256_xl.py \
      --config.data.path=DATA_DIR --config.repa.teacher_path=DINOV2_PATH \
      --workdir=gs://BUCKET/pixeldit_xl256
Variants: `:size=B`, `:size=L` (PixelDiT-B/16 184.75 M params, -L/16 569.65 M, -XL/16 797.38 M;
the B and L recipes are the XL one, which the paper does not confirm, spec §12.8).
Memory: full remat by default; compiled ahead of time for v5p-32 (python -m pixeldit_jax.aot) the
step needs 4.1 GiB per chip (1.4 on v6e-64). On v5p-32 `--config.model.remat_policy=dots`
(12.8 GiB) and `none` (27.6 GiB) also fit and recompute less; a GPU holds twice that batch per
device (32 images), so keep full remat on 80 GB GPUs.
Recipe (spec §4.2, §4.3): batch 256, AdamW 1e-4, clip 1.0, 1.6 M steps (320 epochs), LR 1e-5 and
clip 0.5 after 160 epochs, EMA 0.9999, logit-normal t with shift 1.0, 10% label dropout, bf16;
REPA weight 0.5 on the output of patch block 8 through a D-D-D-768 projector, DINOv2 at 224x224.
Without the teacher the run stops at start; --config.repa.weight=0 trains without REPA (the
paper's XL then reaches FID 6.58 instead of 2.36 at 80 epochs).
Paper result (XL, 320 epochs, 100-step sampler, CFG 2.75 on t in (0.1, 0.9)): FID 1.61.
"""

from pixeldit_jax import config_lib
from pixeldit_jax.model import preset

STEPS_PER_EPOCH = 1_281_167 // 256  # ImageNet-1k train at batch 256


def get_config(arg=None):
  v = config_lib.parse_variant(arg, size="XL")
  c = config_lib.base_config()
  c.image_size = (256, 256)
  # Full remat: the step needs 4.1 GiB per chip on v5p-32 (FSDP 16, REPA teacher in the step);
  # dots 12.8, none 27.6 (python -m pixeldit_jax.aot, bench/results/aot_tpu.md).
  c.model = config_lib.model_dict(preset(v.size, dtype="bfloat16", remat_policy="full"))
  c.batch_size = 256
  c.sharding.dcn_mesh_shape = (1, 1, 1)  # multi-slice: e.g. (2, 1, 1), data parallel over 2 slices
  c.data.source = "imagenet"
  c.data.num_workers = 8
  t = c.train
  t.num_steps = 320 * STEPS_PER_EPOCH
  t.step_down_step = 160 * STEPS_PER_EPOCH
  t.lr, t.grad_clip, t.lr_after_step_down, t.grad_clip_after_step_down = 1e-4, 1.0, 1e-5, 0.5
  t.ema_decay, t.time_shift = 0.9999, 1.0
  t.log_every, t.checkpoint_every, t.sample_every = 100, 10_000, 10_000
  t.sample_cfg_scale, t.sample_cfg_interval = 3.25, (0.1, 1.0)
  # The released 320-epoch evaluation (FID 1.61): 100 AB2 steps, CFG 2.75 on t in (0.1, 0.9).
  # For the 80/160-epoch checkpoints use --config.sample.cfg_scale=3.25 --config.sample.cfg_interval="(0.1,1.0)".
  c.sample.update(dict(num_steps=100, cfg_scale=2.75, cfg_interval=(0.1, 0.9), time_shift=1.0))
  c.repa.update(dict(weight=0.5, block=8, loss_form="c2i"))  # projector hidden = D, teacher 224
  return c
