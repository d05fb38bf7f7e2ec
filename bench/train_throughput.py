"""Steady-state training throughput against a matmul peak measured in the same run.

    python bench/train_throughput.py [--steps 10] [--out bench/results/train_throughput.json]

For each config (configs/tiny.py: tiny = 64^2, hidden 256, patch 8, depths 4+1, batch 8;
small = 256^2, hidden 768, 12 heads, patch 16, depths 2+1, batch 2), with the blocks scanned and
unrolled: the real jitted train step (loss, grads, AdamW, EMA) on one device, timed after warm-up.
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
from pixeldit_jax.train import optimizer, state as state_lib, step as step_lib  # noqa: E402


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


def train_step_time(config, steps: int) -> float:
  model_cfg = config_lib.model_config(config)
  tx = optimizer.make(config.train)
  graphdef = nnx.graphdef(abstract(model_cfg))
  state = jax.jit(lambda: state_lib.init(model_cfg, tx, 0))()
  step = jax.jit(step_lib.make_train_step(graphdef, tx, config.train, model_cfg.num_classes),
                 donate_argnums=(0,))
  h, w = config.image_size
  b = config.batch_size
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (b, h, w, model_cfg.in_channels), np.uint8)),
           "label": jnp.asarray(rng.integers(0, model_cfg.num_classes, (b,), np.int32)),
           "skipped": jnp.zeros((b,), jnp.int32), "converted": jnp.zeros((b,), jnp.int32)}
  for _ in range(3):  # compile and warm up
    state, m = step(state, batch)
  jax.block_until_ready(m)
  best = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(steps):
      state, m = step(state, batch)
    jax.block_until_ready(m)
    best = min(best, (time.perf_counter() - start) / steps)
  return best


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--sizes", default="tiny,small")
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
    for scan in (True, False):
      config = config_lib.load(f"configs/tiny.py:size={size}")
      config.model.scan_layers = scan
      t = train_step_time(config, args.steps)
      model_cfg = config_lib.model_config(config)
      h, w = config.image_size
      flops = 3 * config.batch_size * forward_flops(model_cfg, h, w)["total"]
      gflops = flops / t / 1e9
      row = dict(config=size, scan_layers=scan, batch=config.batch_size, image_size=[h, w],
                 step_s=t, images_per_s=config.batch_size / t, gflops=gflops, fraction_of_peak=gflops / peak,
                 train_gflop_per_step=flops / 1e9)
      results["runs"].append(row)
      print(f"{size:8s} {'scanned' if scan else 'unrolled':9s} {config.batch_size:5d} {t * 1e3:9.1f} "
            f"{config.batch_size / t:8.2f} {gflops:9.1f} {100 * gflops / peak:8.1f}%", flush=True)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
