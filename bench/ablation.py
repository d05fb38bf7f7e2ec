"""The paper's Table-5 ablation at small scale: what pixel-wise AdaLN and token compaction buy.

  python bench/ablation.py                      # 5 variants x 2 seeds, ~45 minutes on 2 CPU cores
  python bench/ablation.py --smoke              # 2 variants, a few steps: checks it all runs

Every variant is the Fashion-MNIST demo model (configs/fashion_mnist.py) trained with the same
budget (steps, batch, learning-rate schedule, data order per seed); only the model differs:

  full            PixelDiT as released: pixel-wise AdaLN, compacted PiT attention (paper row D)
  patchwise       one modulation per patch broadcast to its pixels (paper row B, Fig. 3)
  no_compaction   PiT attention over every pixel instead of one token per patch (paper: OOM at
                  256^2; at 28^2 it fits, 784 tokens, but a step costs 7-9x the full model's on a
                  CPU, so the default runs it for 200 steps: with warmup and a constant LR these are
                  the same first 200 steps the other variants take, compared at step 200)
  no_pixel        no pixel level: a patch-only DiT with the patch-level depth raised until its
                  parameter count matches the full model's (paper: "vanilla DiT/16")
  post_mod        the June 2026 post-modulation PiT (scale/shift after each branch, no gates)

Each run keeps a checkpoint every --eval_every steps; every checkpoint's EMA weights draw
--num_samples images (equal per class) with the same sampler, noise and labels, and the project's
offline Fashion-MNIST scorer gives fmnist_fd and fmnist_accuracy (NOT FID). The table reports the
final figures as mean +- sample std over the seeds, and the wall time of training; the PNG plots
fd against training steps (mean over seeds, the band is min..max).

Writes <out>/ablation.json, ablation.md and ablation.png (default bench/results/).
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

VARIANTS = {
    "full": dict(),
    "patchwise": dict(pixel_adaln="patchwise"),
    "no_compaction": dict(pixel_compaction=False),
    "no_pixel": dict(pixel_depth=0),  # patch_depth raised to the full model's parameter count
    "post_mod": dict(pit_post_modulation=True),
}
LABELS = {"full": "full PixelDiT (pixel-wise AdaLN)", "patchwise": "patch-wise AdaLN",
          "no_compaction": "no token compaction", "no_pixel": "no pixel level (patch DiT)",
          "post_mod": "post-modulation PiT"}
COLOURS = {"full": (31, 119, 180), "patchwise": (255, 127, 14), "no_compaction": (44, 160, 44),
           "no_pixel": (214, 39, 40), "post_mod": (148, 103, 189)}


def param_count(model_dict) -> int:
  from pixeldit_jax.model import PixelDiTConfig, abstract
  from pixeldit_jax.model.cost import count_params
  return count_params(abstract(PixelDiTConfig.from_dict(model_dict)))


def variant_model(base: dict, name: str) -> dict:
  """The model dict of a variant; no_pixel gets the patch depth closest to the base's parameters."""
  m = dict(base, **VARIANTS[name])
  if name == "no_pixel":
    target = param_count(base)
    depths = range(base["patch_depth"], 4 * base["patch_depth"] + 1)
    m["patch_depth"] = min(depths, key=lambda d: abs(param_count(dict(m, patch_depth=d)) - target))
  return m


def variant_steps(args, name: str) -> int:
  """Training steps of a variant: --steps unless --variant_steps caps it (name=N,...)."""
  caps = dict(kv.split("=") for kv in args.variant_steps.split(",") if kv)
  return min(args.steps, int(caps.get(name, args.steps)))


def run_config(args, name: str, seed: int):
  from pixeldit_jax import config_lib
  steps = variant_steps(args, name)
  c = config_lib.load(f"fashion_mnist.py:steps={steps}")
  c.seed = seed
  c.model = config_lib.model_dict(config_lib.model_config(c).__class__.from_dict(
      variant_model(dict(c.model), name)))
  c.train.update(dict(checkpoint_every=args.eval_every, keep_checkpoints=steps // args.eval_every + 1,
                      sample_rows=0, log_every=min(50, args.eval_every)))
  c.sample.update(dict(sampler=args.sampler, num_steps=args.sample_steps, cfg_scale=args.cfg_scale,
                       num_per_class=args.num_samples // 10, batch_size=min(250, args.num_samples), seed=0))
  return c


def evaluate(c, workdir: str, steps: list[int], classifier) -> list[dict]:
  from pixeldit_jax import sample as sample_lib
  from pixeldit_jax.evaluation.fmnist import fmnist_metrics, load_samples_npz
  rows = []
  for step in steps:
    t0 = time.perf_counter()
    r = sample_lib.run(c, os.path.join(workdir, "checkpoints"), os.path.join(workdir, f"samples_{step}"),
                       step=step)
    x, y = load_samples_npz(r["samples"])
    m = fmnist_metrics(x, y, classifier)
    rows.append(dict(step=step, fd=m["fmnist_fd"], accuracy=m["fmnist_accuracy"],
                     sample_s=round(time.perf_counter() - t0, 1), grid=r.get("grid")))
    print(f"    step {step}: fd {m['fmnist_fd']:.2f}, accuracy {m['fmnist_accuracy']:.3f}", flush=True)
  return rows


def summarize(runs: list[dict], variants: list[str]) -> list[dict]:
  out = []
  std = lambda a: float(a.std(ddof=1)) if len(a) > 1 else 0.0  # noqa: E731
  # Every variant at the first evaluation step all of them reached (a capped variant's last).
  common = min(r["evals"][-1]["step"] for r in runs)
  for v in variants:
    rs = [r for r in runs if r["variant"] == v]
    if not rs:
      continue
    fd = np.array([r["evals"][-1]["fd"] for r in rs])
    acc = np.array([r["evals"][-1]["accuracy"] for r in rs])
    fd_c = np.array([next(e["fd"] for e in r["evals"] if e["step"] == common) for r in rs])
    out.append(dict(variant=v, label=LABELS[v], seeds=len(rs), params=rs[0]["params"],
                    steps=rs[0]["evals"][-1]["step"], common_step=common, fd_common_mean=float(fd_c.mean()),
                    fd_common_std=std(fd_c), step_s_mean=float(np.mean([r["train_s"] / r["evals"][-1]["step"] for r in rs])),
                    patch_depth=rs[0]["model"]["patch_depth"], pixel_depth=rs[0]["model"]["pixel_depth"],
                    fd_mean=float(fd.mean()), fd_std=std(fd), accuracy_mean=float(acc.mean()),
                    accuracy_std=std(acc), train_s_mean=float(np.mean([r["train_s"] for r in rs])),
                    final_loss_mean=float(np.mean([r["final_loss"] for r in rs]))))
  return out


def table_lines(summary: list[dict], meta: dict) -> list[str]:
  lines = [f"Fashion-MNIST 28x28, {meta['steps']} steps at batch {meta['batch_size']}, "
           f"{meta['num_samples']} samples per evaluation ({meta['sampler']} {meta['sample_steps']} steps, "
           f"CFG {meta['cfg_scale']:g}), seeds {meta['seeds']}; {meta['machine']}, {meta['date']}.",
           f"Command: `{meta['command']}`", "",
           "| variant | params | steps | fmnist_fd (lower is better) | fmnist_accuracy | "
           f"fmnist_fd at step {summary[0]['common_step']} | final loss | train s (s/step) |",
           "|---|---|---|---|---|---|---|---|"]
  for s in summary:
    depth = f", patch depth {s['patch_depth']}" if s["variant"] == "no_pixel" else ""
    lines.append(f"| {s['label']} | {s['params'] / 1e6:.2f} M{depth} | {s['steps']} | "
                 f"{s['fd_mean']:.2f} +- {s['fd_std']:.2f} | {s['accuracy_mean']:.3f} +- {s['accuracy_std']:.3f} | "
                 f"{s['fd_common_mean']:.2f} +- {s['fd_common_std']:.2f} | {s['final_loss_mean']:.4f} | "
                 f"{s['train_s_mean']:.0f} ({s['step_s_mean']:.2f}) |")
  return lines


def plot(runs: list[dict], variants: list[str], path: str, title: str):
  """fd against training steps: one line per variant (mean over seeds), band min..max. PIL only."""
  from PIL import Image, ImageDraw
  w, h, left, right, top, bottom = 900, 560, 70, 250, 40, 50
  img = Image.new("RGB", (w, h), "white")
  d = ImageDraw.Draw(img)
  curves = {}
  for v in variants:
    rs = [r for r in runs if r["variant"] == v]
    if rs:
      steps = [e["step"] for e in rs[0]["evals"]]
      fds = np.array([[e["fd"] for e in r["evals"]] for r in rs])
      curves[v] = (np.array(steps), fds.mean(0), fds.min(0), fds.max(0))
  all_steps = np.concatenate([c[0] for c in curves.values()])
  # Log scale: early and late figures differ by an order of magnitude or more.
  lo_exp = np.floor(np.log10(max(min(float(c[2].min()) for c in curves.values()), 1e-3)))
  hi_exp = np.ceil(np.log10(max(float(c[3].max()) for c in curves.values())))
  hi_exp = max(hi_exp, lo_exp + 1)
  x0, x1 = 0.0, float(all_steps.max())
  px = lambda s: left + (s - x0) / max(x1 - x0, 1) * (w - left - right)  # noqa: E731
  py = lambda f: h - bottom - (np.log10(max(f, 1e-3)) - lo_exp) / (hi_exp - lo_exp) * (h - top - bottom)  # noqa: E731
  d.rectangle([left, top, w - right, h - bottom], outline="black")
  for e in range(int(lo_exp), int(hi_exp) + 1):
    for m in (1, 2, 5):
      yv = m * 10.0 ** e
      if yv > 10.0 ** hi_exp:
        break
      d.line([left - 4, py(yv), left, py(yv)], fill="black")
      d.line([left, py(yv), w - right, py(yv)], fill=(225, 225, 225))
      d.text((8, py(yv) - 6), f"{yv:g}", fill="black")
  for k in range(6):
    sv = x0 + (x1 - x0) * k / 5
    d.line([px(sv), h - bottom, px(sv), h - bottom + 4], fill="black")
    d.text((px(sv) - 12, h - bottom + 8), f"{sv:.0f}", fill="black")
  d.text((left + (w - left - right) // 2 - 40, h - 20), "training step", fill="black")
  d.text((8, 12), "fmnist_fd (log scale, lower is better)", fill="black")
  d.text((left + 180, 12), title, fill="black")
  for i, (v, (s, mean, lo, hi)) in enumerate(curves.items()):
    col = COLOURS[v]
    band = [(px(a), py(b)) for a, b in zip(s, hi)] + [(px(a), py(b)) for a, b in zip(s[::-1], lo[::-1])]
    if len(s) > 1:
      overlay = Image.new("RGBA", img.size, (0, 0, 0, 0))
      ImageDraw.Draw(overlay).polygon(band, fill=col + (50,))
      img.paste(overlay, (0, 0), overlay)
      d = ImageDraw.Draw(img)
      d.line([(px(a), py(b)) for a, b in zip(s, mean)], fill=col, width=3)
    for a, b in zip(s, mean):
      d.ellipse([px(a) - 3, py(b) - 3, px(a) + 3, py(b) + 3], fill=col)
    ly = top + 10 + 22 * i
    d.line([w - right + 12, ly + 6, w - right + 40, ly + 6], fill=col, width=3)
    d.text((w - right + 46, ly), LABELS[v], fill="black")
  img.save(path)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--seeds", default="0,1")
  ap.add_argument("--steps", type=int, default=600)
  ap.add_argument("--eval_every", type=int, default=200)
  ap.add_argument("--variant_steps", default="no_compaction=200",
                  help="name=N,...: fewer steps for a variant too slow for the full budget")
  ap.add_argument("--num_samples", type=int, default=500)
  ap.add_argument("--sampler", default="euler")
  ap.add_argument("--sample_steps", type=int, default=20)
  ap.add_argument("--cfg_scale", type=float, default=1.0, help="1.0: no guidance (the model itself)")
  ap.add_argument("--smoke", action="store_true",
                  help="full and patchwise, one seed, 4 steps, 20 samples: checks that it runs (CI)")
  ap.add_argument("--classifier_cache", default=None,
                  help="the scorer's cache directory (default: pixeldit_jax's user cache; trained if absent)")
  ap.add_argument("--work", default=os.path.join(REPO, "bench", "out", "ablation"))
  ap.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
  args = ap.parse_args(argv)
  if args.smoke:
    args.variants, args.seeds, args.steps, args.eval_every = "full,patchwise", "0", 4, 2
    args.num_samples, args.sample_steps = 20, 2
  variants = args.variants.split(",")
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
  if any(variant_steps(args, v) % args.eval_every for v in VARIANTS) or args.num_samples % 10:
    ap.error("--steps and --variant_steps must be multiples of --eval_every, --num_samples of 10")
  seeds = [int(s) for s in args.seeds.split(",")]

  import jax
  from pixeldit_jax.evaluation.fmnist import load_or_train
  from pixeldit_jax.train import trainer
  classifier = load_or_train(args.classifier_cache)
  runs = []
  for seed in seeds:
    for v in variants:
      c = run_config(args, v, seed)
      workdir = os.path.join(os.path.abspath(args.work), f"{v}_seed{seed}")
      shutil.rmtree(workdir, ignore_errors=True)
      print(f"{v}, seed {seed}: training {variant_steps(args, v)} steps", flush=True)
      t0 = time.perf_counter()
      s = trainer.train(c, workdir)
      train_s = time.perf_counter() - t0
      steps = list(range(args.eval_every, variant_steps(args, v) + 1, args.eval_every))
      runs.append(dict(variant=v, seed=seed, model=dict(c.model), params=param_count(dict(c.model)),
                       train_s=round(train_s, 1), final_loss=float(s["loss"]),
                       evals=evaluate(c, workdir, steps, classifier)))
  summary = summarize(runs, variants)
  meta = dict(steps=args.steps, batch_size=c.batch_size, seeds=seeds,
              num_samples=args.num_samples, sampler=args.sampler, sample_steps=args.sample_steps,
              cfg_scale=args.cfg_scale, eval_every=args.eval_every,
              machine=f"{os.cpu_count()}-core CPU, {jax.devices()[0].platform}",
              date=time.strftime("%Y-%m-%d"), command="python bench/ablation.py " + " ".join(argv or sys.argv[1:]))
  os.makedirs(args.out, exist_ok=True)
  lines = table_lines(summary, meta)
  with open(os.path.join(args.out, "ablation.json"), "w") as f:
    json.dump(dict(meta=meta, summary=summary, runs=runs), f, indent=1)
  with open(os.path.join(args.out, "ablation.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  plot(runs, variants, os.path.join(args.out, "ablation.png"),
       f"{args.steps} steps, batch {meta['batch_size']}, {len(seeds)} seed(s)")
  print("\n".join(lines))


if __name__ == "__main__":
  # The glibc malloc settings of the command-line entry points (no per-step page faults), set
  # before JAX loads: this script re-executes itself once with them.
  from pixeldit_jax import host_memory
  if host_memory.needs_restart():
    os.execve(sys.executable, [sys.executable] + sys.argv, host_memory.environ())
  main()
