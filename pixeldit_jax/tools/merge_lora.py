"""Fold a LoRA run's adapters into its base weights and write a plain checkpoint.

  python -m pixeldit_jax.tools.merge_lora --checkpoint=workdir/lora/checkpoints --out=/abs/merged
  python -m pixeldit_jax.tools.merge_lora --checkpoint=BASE_DIR --lora=workdir/lora --out=merged

The result has the ``ema_params`` and ``meta`` items of an imported checkpoint: kernel + alpha/r *
A @ B for every adapted linear (fp32), the base model's parameter layout, no adapters. The sampler,
the editor, evaluation and ``config.train.init_from`` read it like any other checkpoint.
By default the EMA adapters are merged (what the sampler uses); ``--adapters=params`` takes the
online ones.
"""

from __future__ import annotations

import sys
from typing import Optional

import jax

from pixeldit_jax import checkpoint as ckpt_lib
from pixeldit_jax import cli, fs
from pixeldit_jax.model import PixelDiTConfig
from pixeldit_jax.model import lora as lora_lib
from pixeldit_jax.model import pixeldit as pixeldit_lib


def merge_checkpoint(checkpoint: str, out: str, lora: Optional[str] = None, step: Optional[int] = None,
                     adapters: str = "ema") -> dict:
  """Write base + adapters (merged) to `out`; returns the written meta.

  `checkpoint` is a LoRA run's checkpoint directory (its recorded base is used) or, with `lora`,
  the base checkpoint to which the LoRA directory's adapters are applied. `step` picks the LoRA
  checkpoint's step (default: its newest)."""
  from flax import nnx  # noqa: PLC0415
  checkpoint = fs.resolve(checkpoint)
  lora_dir = fs.resolve(lora) if lora else checkpoint
  lstep, tree, record = ckpt_lib.load_adapters(lora_dir, step, which=adapters)
  if lora:
    base_dir, base_step = checkpoint, None
  else:
    base_dir, base_step = record["base"], record["base_step"]
  base_step, base_meta = ckpt_lib.read_meta(base_dir, base_step)
  cfg = PixelDiTConfig.from_dict(base_meta["model"])
  abstract = nnx.to_pure_dict(nnx.state(pixeldit_lib.abstract(cfg), nnx.Param))
  params = ckpt_lib.load_params(base_dir, abstract, ckpt_lib.EMA_PARAMS, base_step)
  merged = jax.jit(lambda p, a: lora_lib.merge_params(p, a, lora_lib.scale_of(record)))(params, tree)
  _, lora_meta = ckpt_lib.read_meta(lora_dir, lstep)
  meta = {k: v for k, v in base_meta.items() if k not in ("format", "lora")}
  meta.update(model=base_meta["model"],
              time_convention=lora_meta.get("time_convention", base_meta.get("time_convention")),
              merged_lora=dict(lora=lora_dir, lora_step=int(lstep), adapters=adapters,
                               base=base_dir, base_step=int(base_step),
                               **{k: record[k] for k in ("rank", "alpha", "targets")}))
  ckpt_lib.save_weights(out, int(lstep), {ckpt_lib.EMA_PARAMS: merged}, meta)
  return meta


def main(argv=None):
  ap = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--checkpoint", required=True,
                  help="a LoRA run's checkpoint directory (or, with --lora, the base checkpoint)")
  ap.add_argument("--lora", default=None, help="a LoRA run's checkpoint directory or workdir whose "
                  "adapters are applied to --checkpoint")
  ap.add_argument("--out", required=True, help="checkpoint directory to write")
  ap.add_argument("--step", type=int, default=None, help="the LoRA checkpoint's step (default: newest)")
  ap.add_argument("--adapters", choices=("ema", "params"), default="ema",
                  help="which adapters to merge: the EMA ones (what the sampler uses) or the online ones")
  args = ap.parse_args(argv)
  from pixeldit_jax.sample import lora_dir  # noqa: PLC0415
  ckpt = lora_dir(args.checkpoint)
  meta = merge_checkpoint(ckpt, args.out, lora_dir(args.lora) if args.lora else None, args.step,
                          args.adapters)
  m = meta["merged_lora"]
  print(f"Merged the {args.adapters} LoRA adapters (rank {m['rank']}, alpha {m['alpha']:g}, "
        f"{'+'.join(m['targets'])}) of step {m['lora_step']} of {m['lora']} into step {m['base_step']} "
        f"of {m['base']} -> {fs.resolve(args.out)}")
  return 0


if __name__ == "__main__":
  sys.exit(cli.guard(main))
