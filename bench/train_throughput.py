"""Steady-state training throughput against a matmul peak measured in the same run.

    python bench/train_throughput.py [--steps 10] [--out bench/results/train_throughput.json]

For each config (configs/tiny.py: tiny = 64^2, hidden 256, patch 8, depths 4+1, batch 8;
small = 256^2, hidden 768, 12 heads, patch 16, depths 2+1, batch 2), with the blocks scanned and
unrolled: the real jitted train step (loss, grads, AdamW, EMA) on one device, timed after warm-up;
then the unrolled step with REPA (a randomly initialised ViT-B/14 teacher at 14H/16, projector on
block 1), whose cost is reported relative to the plain step.
Achieved GFLOP/s uses the analytic FLOPs (3x forward per image); the peak is the best fp32
matmul rate of this machine measured just before. Prints a table and writes JSON.
"""

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from pixeldit_jax import config_lib  # noqa: E402
from pixeldit_jax.model import abstract  # noqa: E402
from pixeldit_jax.model.cost import forward_flops  # noqa: E402
from pixeldit_jax.train import optimizer, repa as repa_lib, state as state_lib, step as step_lib  # noqa: E402


def timed(fn, *args, repeats: int):
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(repeats):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / repeats)
  return best


def matmul_peak_gflops() -> tuple[float, dict]:
  """Best fp32 GFLOP/s over square matmuls of a few sizes."""
  rates = {}
  for n in (512, 1024, 2048, 3072):
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    rates[n] = 2 * n ** 3 / timed(mm, a, repeats=max(2, 2048 // n)) / 1e9
  return max(rates.values()), rates


def repa_parts(config, model_cfg):
  """A ViT-B/14 teacher with random weights (the cost is the same as DINOv2's) and the projector."""
  from pixeldit_jax.teacher import dinov2  # noqa: PLC0415
  h, w = config.image_size
  size = dinov2.repa_input_size(h, w, model_cfg.patch_size)
  tcfg = dinov2.Dinov2Config.vitb14(dtype=config.repa.teacher_dtype)
  teacher_graphdef, teacher_params = nnx.split(jax.jit(lambda: dinov2.Dinov2(tcfg, rngs=nnx.Rngs(0)))())
  teacher = step_lib.Teacher(lambda p, x, s: dinov2.teacher_features(teacher_graphdef, p, x, s),
                             size, (size[0] // 14, size[1] // 14))
  make_projector = lambda: repa_lib.make_projector(model_cfg, config.repa)
  return teacher, make_projector, {"teacher": teacher_params}


def train_step_time(config, steps: int, repa: bool = False) -> float:
  model_cfg = config_lib.model_config(config)
  tx = optimizer.make(config.train)
  graphdef = nnx.graphdef(abstract(model_cfg))
  teacher, make_projector, frozen = None, None, {}
  if repa:
    config.repa.weight, config.repa.block = 0.5, 1
    teacher, make_projector, frozen = repa_parts(config, model_cfg)
  state = jax.jit(lambda: state_lib.init(model_cfg, tx, 0, make_projector))()
  step = jax.jit(step_lib.make_train_step(
      graphdef, tx, config, teacher=teacher,
      projector_graphdef=nnx.graphdef(nnx.eval_shape(make_projector)) if repa else None),
      donate_argnums=(0,))
  h, w = config.image_size
  b = config.batch_size
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (b, h, w, model_cfg.in_channels), np.uint8)),
           "label": jnp.asarray(rng.integers(0, model_cfg.num_classes, (b,), np.int32)),
           "skipped": jnp.zeros((b,), jnp.int32), "converted": jnp.zeros((b,), jnp.int32)}
  for _ in range(3):  # compile and warm up
    state, m = step(state, batch, frozen)
  jax.block_until_ready(m)
  best = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(steps):
      state, m = step(state, batch, frozen)
    jax.block_until_ready(m)
    best = min(best, (time.perf_counter() - start) / steps)
  return best


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--sizes", default="tiny,small")
  ap.add_argument("--repa", action=argparse.BooleanOptionalAction, default=True,
                  help="also time the unrolled step with REPA (a ViT-B/14 teacher, block 1)")
  ap.add_argument("--out", default="bench/results/train_throughput.json")
  args = ap.parse_args()
  peak, rates = matmul_peak_gflops()
  print(f"device: {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores); fp32 matmul peak {peak:.1f} GFLOP/s "
        f"({', '.join(f'{n}: {r:.0f}' for n, r in rates.items())})")
  header = f"{'config':8s} {'blocks':9s} {'batch':>5s} {'step ms':>9s} {'img/s':>8s} {'GFLOP/s':>9s} {'% of peak':>9s}"
  print(header)
  print("-" * len(header))
  results = dict(device=jax.devices()[0].device_kind, cpu_count=os.cpu_count(), matmul_peak_gflops=peak,
                 matmul_rates=rates, runs=[])
  for size in args.sizes.split(","):
    for scan, repa in ((True, False), (False, False)) + (((False, True),) if args.repa else ()):
      config = config_lib.load(f"configs/tiny.py:size={size}")
      config.model.scan_layers = scan
      t = train_step_time(config, args.steps, repa)
      model_cfg = config_lib.model_config(config)
      h, w = config.image_size
      flops = 3 * config.batch_size * forward_flops(model_cfg, h, w)["total"]
      gflops = flops / t / 1e9
      row = dict(config=size, scan_layers=scan, repa=repa, batch=config.batch_size, image_size=[h, w],
                 step_s=t, images_per_s=config.batch_size / t, gflops=gflops, fraction_of_peak=gflops / peak,
                 train_gflop_per_step=flops / 1e9)
      results["runs"].append(row)
      if repa:  # the model's GFLOP/s are not comparable: report the cost relative to the plain step
        plain = results["runs"][-2]["step_s"]
        row["repa_step_over_plain"] = t / plain
      print(f"{size:8s} {('scanned' if scan else 'unrolled') + ('+REPA' if repa else ''):9s} "
            f"{config.batch_size:5d} {t * 1e3:9.1f} {config.batch_size / t:8.2f} {gflops:9.1f} "
            f"{100 * gflops / peak:8.1f}%" + (f"  (x{row['repa_step_over_plain']:.2f} of the plain step)"
                                             if repa else ""), flush=True)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
