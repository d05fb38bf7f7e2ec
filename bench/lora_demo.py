"""LoRA demo (issue 14, item 5): teach the class-conditional Fashion-MNIST model a new style.

  python bench/lora_demo.py [--base_steps 400] [--lora_steps 300] [--rank 8] [--png_dir /tmp/lora_pngs]

1. Trains a short base model (configs/fashion_mnist.py, normal garments: white on black), or takes
   --base=CHECKPOINT_DIR.
2. Writes the "new style", inverted garments (black on white), as an image folder of the 10 classes
   (labels unchanged), from the Fashion-MNIST training split.
3. Trains LoRA adapters on it with the trainer (--config.train.lora.rank, init_from = the base):
   only the adapters move.
4. Samples a 10x10 grid (one row per class) before (base) and after (the LoRA run's checkpoint,
   base + EMA adapters) and from the merged checkpoint (tools/merge_lora), and scores the style:
   the fraction of samples whose border (background) is light, and the mean border value.

Writes bench/results/lora_demo.json and before.png / after.png / merged.png under --png_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def write_inverted(out: str, per_class: int, seed: int = 0) -> int:
  """Class folders c0..c9 of inverted training garments (PNG, 28x28 grey)."""
  from PIL import Image
  from pixeldit_jax.data.fashion_mnist import load_fashion_mnist
  images, labels = load_fashion_mnist("train")
  rng = np.random.default_rng(seed)
  n = 0
  for c in range(10):
    d = os.path.join(out, f"c{c}")
    os.makedirs(d, exist_ok=True)
    idx = rng.permutation(np.flatnonzero(labels == c))[:per_class]
    for i in idx:
      Image.fromarray(255 - images[i].reshape(28, 28).astype(np.uint8), "L").save(os.path.join(d, f"{i:05d}.png"))
      n += 1
  return n


def style_scores(x: np.ndarray) -> dict:
  """Border pixels are background: light (> 127 mean) means the inverted style."""
  x = x.astype(np.float32).reshape(len(x), 28, 28)
  border = np.concatenate([x[:, :2].reshape(len(x), -1), x[:, -2:].reshape(len(x), -1),
                           x[:, :, :2].reshape(len(x), -1), x[:, :, -2:].reshape(len(x), -1)], 1).mean(1)
  return dict(light_background_fraction=float((border > 127).mean()), mean_border=float(border.mean()))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--base", default=None, help="a base checkpoint dir (default: train one)")
  ap.add_argument("--base_steps", type=int, default=400)
  ap.add_argument("--lora_steps", type=int, default=300)
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--targets", default="attn,mlp,pixel_adaln")
  ap.add_argument("--lr", type=float, default=2e-3)
  ap.add_argument("--per_class", type=int, default=300, help="inverted training images per class")
  ap.add_argument("--out", default=os.path.join(REPO, "bench", "out", "lora_demo"))
  ap.add_argument("--png_dir", default="/tmp/lora_pngs")
  ap.add_argument("--json", default=os.path.join(REPO, "bench", "results", "lora_demo.json"))
  args = ap.parse_args(argv)

  import jax
  from pixeldit_jax import config_lib
  from pixeldit_jax import sample as sample_lib
  from pixeldit_jax.tools import merge_lora
  from pixeldit_jax.train import trainer

  out = os.path.abspath(args.out)
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(args.png_dir, exist_ok=True)
  result = dict(device=jax.devices()[0].platform, devices=jax.device_count())

  # 1. The base.
  if args.base:
    base = os.path.abspath(args.base)
  else:
    c = config_lib.load(f"fashion_mnist.py:steps={args.base_steps}")
    c.train.sample_rows = 0
    c.train.checkpoint_every = args.base_steps
    t0 = time.perf_counter()
    s = trainer.train(c, os.path.join(out, "base"))
    result["base"] = dict(steps=args.base_steps, seconds=round(time.perf_counter() - t0, 1), loss=s["loss"])
    base = os.path.join(out, "base", "checkpoints")

  # 2. The new style.
  folder = os.path.join(out, "inverted")
  result["style_images"] = write_inverted(folder, args.per_class)

  # 3. LoRA.
  c = config_lib.load(f"fashion_mnist.py:steps={args.lora_steps}")
  c.data.source, c.data.path = "folder", folder
  c.train.update(dict(init_from=base, lr=args.lr, warmup_steps=20, sample_rows=0,
                      checkpoint_every=args.lora_steps, log_every=50))
  c.train.lora.update(dict(rank=args.rank, targets=tuple(args.targets.split(","))))
  t0 = time.perf_counter()
  s = trainer.train(c, os.path.join(out, "lora"))
  lora_s = time.perf_counter() - t0
  lora_ckpt = os.path.join(out, "lora", "checkpoints")

  from pixeldit_jax import checkpoint as ckpt_lib
  from pixeldit_jax.model import lora as lora_lib
  _, adapters, record = ckpt_lib.load_adapters(lora_ckpt)
  from flax import nnx
  from pixeldit_jax.model import abstract
  total = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract(config_lib.model_config(c)), nnx.Param)))
  trainable = lora_lib.count(adapters)
  ckpt_bytes = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs_ in os.walk(os.path.join(lora_ckpt, str(args.lora_steps)))
                   for f in fs_)
  result["lora"] = dict(steps=args.lora_steps, seconds=round(lora_s, 1), loss=s["loss"], rank=args.rank,
                        alpha=record["alpha"], targets=record["targets"], lr=args.lr,
                        trainable_params=trainable, base_params=total,
                        trainable_fraction=trainable / total, checkpoint_step_bytes=ckpt_bytes)

  # 4. Grids and scores.
  sc = c.copy_and_resolve_references()
  sc.sample.update(dict(num_per_class=10, batch_size=100))
  grids = {}
  for name, ckpt in (("before", base), ("after", lora_ckpt)):
    t0 = time.perf_counter()
    r = sample_lib.run(sc, ckpt, os.path.join(out, f"samples_{name}"))
    x = np.load(r["samples"])["arr_0"]
    shutil.copy(r["grid"], os.path.join(args.png_dir, f"{name}.png"))
    grids[name] = x
    result[name] = dict(**style_scores(x), seconds=round(time.perf_counter() - t0, 1))
  merge_lora.main(["--checkpoint", lora_ckpt, "--out", os.path.join(out, "merged")])
  r = sample_lib.run(sc, os.path.join(out, "merged"), os.path.join(out, "samples_merged"))
  xm = np.load(r["samples"])["arr_0"]
  shutil.copy(r["grid"], os.path.join(args.png_dir, "merged.png"))
  result["merged"] = dict(**style_scores(xm),
                          max_abs_diff_vs_after=int(np.abs(xm.astype(int) - grids["after"].astype(int)).max()))
  result["pngs"] = {k: os.path.join(args.png_dir, f"{k}.png") for k in ("before", "after", "merged")}
  os.makedirs(os.path.dirname(args.json), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
