"""Editing on the captioned Fashion-MNIST model: FlowEdit, img2img at two strengths, inpainting.

    python bench/editing.py --workdir=workdir/demo_t2i [--pairs=100] [--png_dir=/tmp/edit_pngs]
    python bench/editing.py --train --workdir=workdir/demo_t2i     # make demo-t2i's training first

Pairs: for each of the first `pairs` held-out captions (never shown in training) the target is
that caption and the source is the same garment class and quadrant with ONE attribute changed:
even pairs the garment's colour, odd pairs the background colour. The source image is a
Fashion-MNIST *test* garment rendered with the source caption; the ideal edit is the same garment
rendered with the target caption. Reported per method:

  (a) the scorer (evaluation/t2i_fmnist) on the edited images against the target caption: the
      edited attribute's check (`edit_acc`: colour for colour edits, background for background
      edits), and all checks (`all`: background, position, colour and garment class);
  (b) PSNR against the source over the region the edit must not touch: the pixels the ideal edit
      leaves unchanged (the background for a colour edit; the fully opaque garment pixels for a
      background edit). Pooled over all pairs (`psnr`), and the per-pair median; null in the
      JSON (inf in the table) where the region is exactly the source.

Inpainting is given the complement of that region as its mask (an oracle mask), so its PSNR is
exact by construction; its row says what the model paints inside. Reference rows score the
unedited source and the ideal edit. Prints a table, writes JSON and before/after panels.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from pixeldit_jax import config_lib, fs, images  # noqa: E402
from pixeldit_jax import sample as sample_lib  # noqa: E402
from pixeldit_jax.data import captioned_fmnist as cf  # noqa: E402
from pixeldit_jax.diffusion import editing, samplers  # noqa: E402
from pixeldit_jax.evaluation import t2i_fmnist  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PAIR_SEED = 20261128


def make_pairs(n: int, size: int):
  """Sources, ideal targets, captions, kinds and keep-masks of n (image, edit) pairs."""
  ds = cf.CaptionedFashionMNIST("test", size=size)
  garments, labels = ds._arrays()  # noqa: SLF001 - the test split's garments
  by_class = [np.flatnonzero(labels == k) for k in range(10)]
  src, ideal, src_caps, tar_caps, kinds = [], [], [], [], []
  for j, (cls, colour, bg, pos) in enumerate(cf.heldout_keys(n)):
    rng = np.random.default_rng((PAIR_SEED, j))
    garment = garments[by_class[cls][j // 10 % len(by_class[cls])]]
    if j % 2 == 0:
      kind = "colour"
      other = int(rng.choice([c for c in range(8) if c not in (colour, bg)]))
      s_key = (cls, other, bg, pos)
    else:
      kind = "background"
      other = int(rng.choice([b for b in range(8) if b not in (colour, bg)]))
      s_key = (cls, colour, other, pos)
    src.append(cf.render(garment, *s_key[1:], size=size))
    ideal.append(cf.render(garment, colour, bg, pos, size=size))
    src_caps.append(cf.caption(*s_key, class_names=ds.class_names))
    tar_caps.append(cf.caption(cls, colour, bg, pos, class_names=ds.class_names))
    kinds.append(kind)
  src, ideal = np.stack(src), np.stack(ideal)
  keep = np.all(src == ideal, axis=-1)  # (N, H, W): what an ideal edit leaves as it is
  return src, ideal, src_caps, tar_caps, np.asarray(kinds), keep


def psnr(edited, src, keep):
  """(pooled PSNR over every pair's keep region, per-pair median); inf where exact."""
  diff = (edited.astype(np.float64) - src.astype(np.float64)) ** 2
  per_sse = np.array([d[k].sum() for d, k in zip(diff, keep)])
  per_n = np.array([k.sum() * src.shape[-1] for k in keep])
  with np.errstate(divide="ignore"):
    pooled = 10 * np.log10(255.0 ** 2 / (per_sse.sum() / per_n.sum()))
    per = 10 * np.log10(255.0 ** 2 / (per_sse / np.maximum(per_n, 1)))
  return float(pooled), float(np.median(per))


def score(edited, tar_caps, kinds, src, keep, classifier):
  r = t2i_fmnist.faithfulness(edited, tar_caps, classifier, details=True)
  per = r["per_sample"]
  edit_ok = np.where(kinds == "colour", per["colour"], per["background"])
  pooled, median = psnr(edited, src, keep)
  out = dict(edit_acc=float(edit_ok.mean()), all=r["t2i_all"], background=r["t2i_background"],
             position=r["t2i_position"], colour=r["t2i_colour"], garment=r["t2i_garment"],
             psnr=pooled, psnr_median=median)
  for kind in ("colour", "background"):
    sel = kinds == kind
    out[f"edit_acc_{kind}"] = float(edit_ok[sel].mean())
    out[f"psnr_{kind}"] = psnr(edited[sel], src[sel], keep[sel])[0]
  return out


def strict(obj):
  """Strict JSON: an infinite PSNR (the region is exactly the source) is written as null."""
  if isinstance(obj, dict):
    return {k: strict(v) for k, v in obj.items()}
  if isinstance(obj, float) and not np.isfinite(obj):
    return None
  return obj


def train(workdir: str):
  """make demo-t2i's preparation and training, into `workdir`."""
  py = sys.executable
  spec = f"configs/t2i_fmnist.py:workdir={workdir}"
  cmds = [[py, "-m", "pixeldit_jax.data.captioned_fmnist", f"--out={workdir}"]]
  if not os.path.isfile(os.path.join(workdir, "text_cache", "meta.json")):
    cmds.append([py, "-m", "pixeldit_jax.text.cache", "--encoder=minilm", "--max_length=16",
                 f"--captions={workdir}/captions.txt", f"--out={workdir}/text_cache"])
  cmds.append([py, "-m", "pixeldit_jax.main", f"--config={spec}", f"--workdir={workdir}"])
  for cmd in cmds:
    subprocess.run(cmd, cwd=REPO, check=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", default="workdir/demo_t2i", help="the trained demo-t2i run")
  ap.add_argument("--train", action="store_true", help="train it first (as make demo-t2i)")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  ap.add_argument("--pairs", type=int, default=100)
  ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: config.sample)")
  ap.add_argument("--strengths", default="0.5,0.8", help="img2img strengths")
  ap.add_argument("--flowedit", default="0.75,1.5,4.5",
                  help="FlowEdit strength (n_max / steps), source CFG, target CFG")
  ap.add_argument("--n_avg", type=int, default=1)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--png_dir", default="/tmp/edit_pngs")
  ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "editing.json"))
  a = ap.parse_args()
  workdir = os.path.abspath(a.workdir)
  if a.train:
    train(workdir)
  ckpt = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt):
    sys.exit(f"error: no checkpoints in {workdir}: run make demo-t2i, or give --train")
  config = config_lib.load(f"configs/t2i_fmnist.py:workdir={workdir}")
  s = config.sample
  steps = int(a.steps or s.num_steps)
  size = config.image_size[0]
  src, ideal, src_caps, tar_caps, kinds, keep = make_pairs(a.pairs, size)

  step, model_cfg, graphdef, _, mesh, _, params = sample_lib._restore(config, ckpt, a.step)  # noqa: SLF001
  from pixeldit_jax.train import conditioning as conditioning_lib  # noqa: PLC0415
  from pixeldit_jax.evaluation.fmnist_classifier import load_or_train  # noqa: PLC0415
  cond = conditioning_lib.TextConditioning(config)
  c_src, c_tar = jnp.asarray(cond.embed(src_caps)), jnp.asarray(cond.embed(tar_caps))
  uncond = jnp.asarray(np.repeat(cond.embed([s.negative_prompt or ""], null=True), len(src), 0))
  editor = editing.Editor(lambda p, x, t, c: nnx.merge(graphdef, p)(x, t, c), editing.T2I,
                          sampler=s.sampler, num_steps=steps, shift=s.time_shift,
                          interval=tuple(s.cfg_interval))
  classifier = load_or_train()
  x_src = editing.to_float(src)
  cfg = float(s.cfg_scale)
  fe_strength, fe_src, fe_tar = (float(v) for v in a.flowedit.split(","))
  n_max = int(round(fe_strength * steps))
  strengths = [float(v) for v in a.strengths.split(",")]
  edit_mask = jnp.asarray(~keep[..., None])
  # Inputs replicated on the params' mesh, as the steps' outputs are: one compilation per method.
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  x_src, c_src, c_tar, uncond, edit_mask = jax.device_put((x_src, c_src, c_tar, uncond, edit_mask), rep)
  runs = {f"flowedit n_max={n_max}/{steps} cfg {fe_src:g}/{fe_tar:g}":
          lambda: editor.flowedit(params, x_src, c_src, c_tar, uncond, n_max=n_max, n_avg=a.n_avg,
                                  src_cfg=fe_src, tar_cfg=fe_tar, seed=a.seed)}
  for st in strengths:
    runs[f"img2img strength {st:g}"] = (
        lambda st=st: editor.img2img(params, x_src, c_tar, uncond, strength=st, cfg_scale=cfg, seed=a.seed))
  runs["inpaint (oracle mask) strength 1"] = (
      lambda: editor.inpaint(params, x_src, edit_mask, c_tar, uncond, strength=1.0, cfg_scale=cfg, seed=a.seed))

  rows = {"source (no edit)": dict(score(src, tar_caps, kinds, src, keep, classifier), seconds=0.0),
          "ideal edit (rendered target)": dict(score(ideal, tar_caps, kinds, src, keep, classifier), seconds=0.0)}
  outputs = {}
  for name, fn in runs.items():
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
      edited = np.asarray(samplers.to_uint8(fn()))
    if name.startswith("inpaint"):
      edited = np.where(keep[..., None], src, edited)  # exact outside the mask, as edit.py does
    seconds = time.perf_counter() - t0
    rows[name] = dict(score(edited, tar_caps, kinds, src, keep, classifier), seconds=round(seconds, 1))
    outputs[name] = edited
    print(f"{name}: {rows[name]}", flush=True)

  header = "| method | edit acc (colour / bg) | all checks | PSNR keep region (colour / bg) | s |"
  lines = [header, "|---|---|---|---|---|"]
  for name, r in rows.items():
    lines.append(f"| {name} | {r['edit_acc']:.2f} ({r['edit_acc_colour']:.2f} / {r['edit_acc_background']:.2f}) "
                 f"| {r['all']:.2f} | {r['psnr']:.1f} dB ({r['psnr_colour']:.1f} / {r['psnr_background']:.1f}) "
                 f"| {r['seconds']:.0f} |")
  table = "\n".join(lines)
  print(f"\n{a.pairs} pairs, checkpoint step {step} of {workdir}, {s.sampler} {steps} steps, shift "
        f"{s.time_shift:g}, CFG {cfg:g}\n{table}")
  record = dict(pairs=a.pairs, checkpoint=ckpt, step=step, sampler=s.sampler, steps=steps,
                time_shift=float(s.time_shift), cfg_scale=cfg, seed=a.seed, n_avg=a.n_avg,
                keep_pixels_mean=float(keep.mean()), rows=rows, table=table,
                device=str(jax.devices()[0].platform))
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(strict(record), f, indent=1)
  md = os.path.splitext(a.out)[0] + ".md"
  with open(md, "w") as f:
    f.write(table + "\n")
  # Before/after panels: per kind, 8 pairs as rows; columns source | ideal | each method.
  os.makedirs(a.png_dir, exist_ok=True)
  for kind in ("colour", "background"):
    pick = np.flatnonzero(kinds == kind)[:8]
    tiles = [np.stack([src[i], ideal[i], *(outputs[n][i] for n in runs)]) for i in pick]
    grid = images.grid(np.concatenate(tiles), rows=len(pick))
    images.save_png(grid, fs.join(a.png_dir, f"editing_{kind}.png"), scale=3)
  with open(os.path.join(a.png_dir, "columns.txt"), "w") as f:
    f.write("columns: source | ideal edit | " + " | ".join(runs) + "\n")
  print(f"written {a.out}, {md}; panels in {a.png_dir} (columns: source | ideal | {' | '.join(runs)})")


if __name__ == "__main__":
  main()
