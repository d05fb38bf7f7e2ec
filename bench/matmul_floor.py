"""Where a step's time goes on this machine: the step against the sum of its own matrix products.

    python bench/matmul_floor.py [--size tiny|small] [--what train|forward] [--out FILE.json]

Compiles our training step (loss, backward, clip, AdamW, EMA; the vs_official.py settings) or the
sampling forward for a configs/tiny.py size, times it (median of --steps), then reads every
matrix product out of the compiled HLO and times each alone, on random operands of the same
shapes and dimension numbers. Their sum is the step's "matmul floor": what the step would take if
nothing but its products ran, each as fast as it runs alone. The gap between step and floor is
what elementwise work, copies, the optimizer and scheduling cost. Prints the products by total
time and writes JSON. Profiling pitfall: compiling the step a second time in the same process
slowed later steps by up to 50% on XLA:CPU, so the HLO is read only after the step is timed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import vs_official  # noqa: E402 - the benchmark of record's settings
from train_throughput import timed  # noqa: E402

_DOT = re.compile(r"= \w+\[[\d,]*\]\{[\d,]*\} dot\(%([\w.\-]+), %([\w.\-]+)\), (.*?)metadata")
_SHAPE = re.compile(r"%([\w.\-]+) = \w+\[([\d,]*)\]")


def _dims(text: str, key: str) -> tuple:
  m = re.search(key + r"=\{([\d,]*)\}", text)
  return tuple(int(x) for x in m.group(1).split(",") if x) if m else ()


def hlo_dots(hlo: str) -> collections.Counter:
  """{(lhs shape, rhs shape, lhs contracting, rhs contracting, lhs batch, rhs batch): count}."""
  shapes = {m.group(1): tuple(int(x) for x in m.group(2).split(",") if x) for m in _SHAPE.finditer(hlo)}
  dots = collections.Counter()
  for m in _DOT.finditer(hlo):
    rest = m.group(3)
    dots[(shapes[m.group(1)], shapes[m.group(2)], _dims(rest, "lhs_contracting_dims"),
          _dims(rest, "rhs_contracting_dims"), _dims(rest, "lhs_batch_dims"), _dims(rest, "rhs_batch_dims"))] += 1
  return dots


def dot_flops(key) -> int:
  lhs, rhs, _, rc, _, rb = key
  return 2 * int(np.prod(lhs)) * int(np.prod([n for i, n in enumerate(rhs) if i not in rc and i not in rb]))


def time_dot(key) -> float:
  lhs, rhs, lc, rc, lb, rb = key
  k = jax.random.PRNGKey(0)
  a, b = jax.random.normal(k, lhs, jnp.float32), jax.random.normal(jax.random.fold_in(k, 1), rhs, jnp.float32)
  return timed(jax.jit(lambda x, y: jax.lax.dot_general(x, y, ((lc, rc), (lb, rb)))), a, b, repeats=10)


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--size", default="tiny", choices=("tiny", "small"))
  ap.add_argument("--what", default="train", choices=("train", "forward"))
  ap.add_argument("--steps", type=int, default=8)
  ap.add_argument("--top", type=int, default=12, help="products listed, by total time")
  ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "matmul_floor.json"))
  args = ap.parse_args()

  step, compiled_text = vs_official.ours_step(args.size, args.what)
  for _ in range(3):
    step()
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)

  hlo = compiled_text()
  rows = []
  for key, count in hlo_dots(hlo).items():
    t = time_dot(key)
    rows.append(dict(lhs=key[0], rhs=key[1], lhs_contracting=key[2], rhs_contracting=key[3],
                     lhs_batch=key[4], rhs_batch=key[5], count=count, seconds_each=t, total_s=count * t,
                     gflop=dot_flops(key) / 1e9, gflops_per_s=dot_flops(key) / t / 1e9))
  rows.sort(key=lambda r: -r["total_s"])
  floor_s = sum(r["total_s"] for r in rows)
  flops = sum(r["count"] * r["gflop"] * 1e9 for r in rows)
  print(f"{args.size} {args.what}: step {step_s * 1e3:.1f} ms (median of {args.steps}); "
        f"matmul floor {floor_s * 1e3:.1f} ms ({flops / 1e9:.2f} GFLOP in {sum(r['count'] for r in rows)} "
        f"products at {flops / floor_s / 1e9:.0f} GFLOP/s); the rest {(step_s - floor_s) * 1e3:.1f} ms\n")
  print("| total ms | count | lhs | rhs | contracting | GFLOP/s alone |")
  print("|---|---|---|---|---|---|")
  for r in rows[:args.top]:
    print(f"| {r['total_s'] * 1e3:.2f} | {r['count']} | {r['lhs']} | {r['rhs']} | "
          f"{r['lhs_contracting']}x{r['rhs_contracting']} | {r['gflops_per_s']:.0f} |")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(dict(size=args.size, what=args.what, step_s=step_s, step_times=times, floor_s=floor_s,
                   floor_gflop=flops / 1e9, products=[{k: (list(v) if isinstance(v, tuple) else v)
                                                       for k, v in r.items()} for r in rows]), f, indent=1)
  print(f"\nwrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
