"""Parameters and analytic forward GFLOPs of the paper's models, the ablations and our small configs.

    python bench/model_cost.py [--out bench/results/model_cost.json]

Parameters are counted on nnx.eval_shape models (nothing is allocated); GFLOPs use the official
convention (2 x MACs of linears + 4 N^2 C per attention, spec §6.2). Prints a table, writes JSON.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from pixeldit_jax import config_lib  # noqa: E402
from pixeldit_jax.model import abstract, preset  # noqa: E402
from pixeldit_jax.model.cost import count_params, forward_flops, param_breakdown  # noqa: E402

PAPER = {("B", 256): (184.75, None), ("L", 256): (569.65, None), ("XL", 256): (797.38, 311.2),
         ("XL", 512): (797.38, None), ("T2I", 512): (1300, None), ("T2I", 1024): (1300, None)}


def rows():
  for size in ("B", "L", "XL"):
    for res in (256, 512):
      yield f"PixelDiT-{size}/16", preset(size), res, PAPER.get((size, res), (None, None))
  for res in (512, 1024):  # the paper says 1.3 B; its GFLOPs are not given (spec §6.2 derives them)
    yield "PixelDiT-T2I (300 text tokens)", preset("T2I"), res, PAPER[("T2I", res)]
  yield "XL/16 patch-wise AdaLN (ablation B)", preset("XL", pixel_adaln="patchwise"), 256, (None, None)
  yield "XL/16 no compaction (OOM in paper)", preset("XL", pixel_compaction=False), 256, (None, 82247)
  yield "XL/16 post-modulation PiT", preset("XL", pit_post_modulation=True), 256, (None, None)
  yield "DiT/16, patch level only (XL dims)", preset("XL", pixel_depth=0), 256, (None, None)
  for spec in ("configs/fashion_mnist.py", "configs/tiny.py:size=tiny", "configs/tiny.py:size=small"):
    config = config_lib.load(spec)
    yield spec, config_lib.model_config(config), config.image_size[0], (None, None)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="bench/results/model_cost.json")
  args = ap.parse_args()
  results = []
  header = f"{'model':38s} {'res':>5s} {'params (M)':>11s} {'patch blk':>10s} {'pixel blk':>10s} {'GFLOPs':>11s}  paper"
  print(header)
  print("-" * len(header))
  for name, cfg, res, (paper_params, paper_gflops) in rows():
    model = abstract(cfg)
    params, parts = count_params(model), param_breakdown(model)
    gflops = forward_flops(cfg, res, res)["total"] / 1e9
    paper = ", ".join(s for s in (paper_params and f"{paper_params} M", paper_gflops and f"{paper_gflops} GFLOPs") if s)
    print(f"{name:38s} {res:5d} {params / 1e6:11.2f} {parts['patch_blocks'] / 1e6:10.2f} "
          f"{parts.get('pixel_blocks', 0) / 1e6:10.2f} {gflops:11.2f}  {paper}")
    results.append(dict(model=name, resolution=res, params=params, breakdown=parts, gflops=gflops,
                        paper_params_m=paper_params, paper_gflops=paper_gflops, config=cfg.to_dict()))
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
