"""Text-to-image PixelDiT (1.3 B, MM-DiT + PiT, Gemma-2-2B-IT text encoder): the released stages.

  python -m pixeldit_jax.main --config=configs/t2i_1024.py:stage1 --workdir=W1 \
      --config.data.path=SHARDS --config.text.path=GEMMA_DIR --config.repa.teacher_path=DINOV2
  python -m pixeldit_jax.main --config=configs/t2i_1024.py:stage2 --workdir=W2 \
      --config.data.path=SHARDS --config.text.path=GEMMA_DIR --config.train.init_from=W1/checkpoints
  python -m pixeldit_jax.main --config=configs/t2i_1024.py --workdir=W3 \
      --config.data.path=SHARDS --config.text.path=GEMMA_DIR --config.train.init_from=W2/checkpoints
  python -m pixeldit_jax.sample --config=configs/t2i_1024.py --checkpoint=W3/checkpoints --prompts=FILE

Variants (spec §7.2): `:stage1` 512x512 fixed (bilinear resize + centre crop), REPA 0.5 on MM-DiT
block 6 with DINOv2 at 224x224, shift 3, LR 1e-4, clip 0.2, 400 K steps at batch 1024; `:stage2`
512 with the 40 aspect buckets (bicubic resize), no REPA; `:stage3` (the default) 1024 with the 7
aspect buckets, shift 4, LR 2e-5, clip 0.1, 100 K steps at batch 768. All: CAME (0.9, 0.999,
0.9999), eps (1e-30, 1e-16), 2,000 warmup steps, bf16, EMA off, 10% caption dropout. `:smoke` is a
scaled-down model with the MiniLM encoder on captioned Fashion-MNIST that runs on a laptop CPU in a
couple of minutes. Sampling (`config.sample`): `:preset=card` (the default) is the model card's
example, CFG 2.75 with a negative prompt and seed 2025; `:preset=inference` is the released
t2i/inference.py, CFG 3.5, no negative prompt, seed 0 (our noise is not torch's, so the same seed
does not give the same images). Combine with a stage as `:stage1,preset=inference`.

Hardware: the paper trained on A100/H100 nodes (batch 1024 at 512, 768 at 1024); on TPU use a
v5p-128 or larger with FSDP (the default mesh). Compiled ahead of time for v5p-128 (python -m
pixeldit_jax.aot), stage 1 needs 15.1 GiB per chip and stage 3 at 1024 56.4 GiB, of 95 (before
the models pinned their batch at the block stacks, XLA replicated it: 536 GiB). See
bench/results/aot_tpu.md.
Data: webdataset tar shards of image + caption (`NNNN.tar` with key.jpg + key.txt/json) in SHARDS;
Gemma: a local copy of Efficient-Large-Model/gemma-2-2b-it (config.json, tokenizer.json,
*.safetensors) in GEMMA_DIR.
Paper results: GenEval 0.74 and DPG-Bench 83.5 at 1024 (0.78 / 83.7 at 512).
"""

import ml_collections

from pixeldit_jax import config_lib
from pixeldit_jax.model import PixelDiTConfig, preset

NEGATIVE_PROMPT = "low quality, worst quality, over-saturated, blurry, deformed, watermark"
SAMPLE_PROMPTS = (
    "A photo of a red fox sitting in a snowy forest at sunrise",
    "A bowl of ramen with a soft-boiled egg, studio lighting",
    "An astronaut riding a horse on the moon, digital art",
    "A watercolor painting of a lighthouse on a cliff",
)

# Sampling presets for the released checkpoint (`:preset=NAME`), both DPM-Solver++(2M), 50 steps,
# CFG on all of [0, 1]. `card`: the model card's example; `inference`: the released t2i/inference.py
# defaults (its PixelDiTInference dataclass), which the card does not use.
SAMPLE_PRESETS = {
    "card": dict(cfg_scale=2.75, negative_prompt=NEGATIVE_PROMPT, seed=2025),
    "inference": dict(cfg_scale=3.5, negative_prompt="", seed=0),
}

STAGES = {
    # resolution, buckets, REPA weight, flow shift, LR, clip, global batch, steps
    "stage1": dict(res=512, buckets=None, repa=0.5, shift=3.0, lr=1e-4, clip=0.2, batch=1024, steps=400_000),
    "stage2": dict(res=512, buckets="ASPECT_RATIO_512", repa=0.0, shift=3.0, lr=1e-4, clip=0.2, batch=1024,
                   steps=100_000),
    "stage3": dict(res=1024, buckets="ASPECT_RATIO_1024", repa=0.0, shift=4.0, lr=2e-5, clip=0.1, batch=768,
                   steps=100_000),
}


def text_section(**overrides) -> ml_collections.ConfigDict:
  from pixeldit_jax import text  # noqa: PLC0415
  t = text.text_config_defaults()
  t.update(overrides)
  return t


def get_config(arg=None):
  v = config_lib.parse_variant(arg, stage1=False, stage2=False, stage3=False, smoke=False,
                               preset="card")
  if v.preset not in SAMPLE_PRESETS:
    raise ValueError(f"preset must be one of {sorted(SAMPLE_PRESETS)}, got {v.preset!r}")
  if v.smoke:
    return smoke_config()
  chosen = [k for k in STAGES if v[k]] or ["stage3"]
  if len(chosen) > 1:
    raise ValueError(f"choose one stage, got {chosen}")
  st = STAGES[chosen[0]]
  c = config_lib.base_config()
  c.image_size = (st["res"], st["res"])
  # Full remat: the least memory per chip (python -m pixeldit_jax.aot; bench/results/aot_tpu.md).
  c.model = config_lib.model_dict(preset("T2I", dtype="bfloat16", remat_policy="full"))
  c.sharding.dcn_mesh_shape = (1, 1, 1)  # multi-slice: e.g. (2, 1, 1), data parallel over 2 slices
  c.batch_size = st["batch"]
  c.text = text_section(encoder="gemma2", dtype="bfloat16")
  c.data.update(dict(source="webdataset", num_workers=8))
  c.data.buckets = st["buckets"]
  # As released: bilinear in the fixed-512 stage 1 (PixelDataset), bicubic with buckets.
  c.data.resize = "bilinear" if st["buckets"] is None else "bicubic"
  t = c.train
  t.num_steps = st["steps"]
  t.optimizer, t.b1, t.b2, t.b3, t.came_eps = "came", 0.9, 0.999, 0.9999, (1e-30, 1e-16)
  t.lr, t.warmup_steps, t.grad_clip, t.weight_decay = st["lr"], 2000, st["clip"], 0.0
  t.time_shift, t.label_dropout = st["shift"], 0.1
  t.ema_decay = 0.0  # EMA off as released: the sampler's "EMA" weights are the online weights
  t.log_every, t.checkpoint_every, t.sample_every = 100, 5_000, 5_000
  t.sample_steps, t.sample_cfg_scale, t.sample_cfg_interval = 25, 4.5, (0.0, 1.0)
  t.sample_prompts, t.sample_rows, t.sample_per_row = SAMPLE_PROMPTS, 4, 2
  c.repa.update(dict(weight=st["repa"], block=6, projector_dim=2048, teacher_size=(224, 224),
                     loss_form="t2i"))
  sp = SAMPLE_PRESETS[v.preset]
  c.sample = config_lib.sample_defaults()
  c.sample.update(dict(sampler="dpm_solver_pp_2m", num_steps=50, cfg_scale=sp["cfg_scale"],
                       cfg_interval=(0.0, 1.0), time_shift=st["shift"] if st["res"] == 1024 else 3.0,
                       seed=sp["seed"], batch_size=4))
  c.sample.num_per_prompt = 1
  c.sample.negative_prompt = sp["negative_prompt"]
  return c


def smoke_config():
  """A scaled-down T2I run on this CPU: the same code paths, small everything."""
  c = config_lib.base_config()
  c.image_size = (56, 56)
  c.model = config_lib.model_dict(PixelDiTConfig(
      patch_size=8, hidden_size=64, num_heads=2, patch_depth=2, pixel_depth=1, pixel_hidden_size=8,
      pixel_attn_size=32, pixel_num_heads=2, text_dim=384, text_length=16, scan_layers=False))
  c.batch_size = 8
  c.text = text_section(encoder="minilm", max_length=16, dtype="float32")
  c.data.update(dict(source="captioned_fmnist", num_workers=0))
  c.data.buckets = None
  t = c.train
  t.num_steps = 20
  t.optimizer, t.b3, t.came_eps = "came", 0.9999, (1e-30, 1e-16)
  t.lr, t.warmup_steps, t.grad_clip, t.time_shift = 1e-3, 5, 1.0, 1.0
  t.ema_decay, t.ema_warmup = 0.99, True
  t.log_every, t.checkpoint_every, t.sample_every = 10, 10, 0
  t.sample_steps, t.sample_cfg_scale, t.sample_cfg_interval = 4, 2.0, (0.0, 1.0)
  t.sample_prompts, t.sample_rows, t.sample_per_row = ("a red sneaker on a blue background, top left",), 1, 2
  c.sample = config_lib.sample_defaults()
  c.sample.update(dict(sampler="dpm_solver_pp_2m", num_steps=4, cfg_scale=2.0, cfg_interval=(0.0, 1.0),
                       time_shift=1.0, batch_size=4))
  c.sample.num_per_prompt = 2
  c.sample.negative_prompt = ""
  return c
