"""bench/matmul_floor.py: the products it reads out of compiled HLO, their FLOPs, and a run."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import matmul_floor  # noqa: E402


def test_products_and_flops_are_read_from_compiled_hlo():
  def f(x, w, q, k):
    return jnp.tanh(x @ w) @ w.T, jnp.einsum("bhqd,bhkd->bhqk", q, k)

  args = (jnp.ones((64, 32)), jnp.ones((32, 48)), jnp.ones((2, 3, 16, 8)), jnp.ones((2, 3, 16, 8)))
  dots = matmul_floor.hlo_dots(jax.jit(f).lower(*args).compile().as_text())
  flops = sorted(matmul_floor.dot_flops(k) * n for k, n in dots.items())
  # x @ w and (.) @ w.T: 2 * 64 * 32 * 48 each; q k^T: 2 * (2 * 3) * 16 * 16 * 8
  assert flops == sorted([2 * 64 * 32 * 48, 2 * 64 * 48 * 32, 2 * 6 * 16 * 16 * 8]), dots
  key = next(k for k in dots if len(k[0]) == 4)
  assert key[4] == key[5] == (0, 1) and matmul_floor.time_dot(key) > 0


def test_a_run_prints_the_floor_and_writes_json(tmp_path):
  out = tmp_path / "floor.json"
  r = subprocess.run([sys.executable, os.path.join(REPO, "bench", "matmul_floor.py"), "--size", "tiny",
                      "--what", "forward", "--steps", "1", "--top", "3", "--out", str(out)],
                     cwd=REPO, capture_output=True, text=True, timeout=600,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-2000:]
  assert "matmul floor" in r.stdout and "| total ms |" in r.stdout
  report = json.loads(out.read_text())
  # The tiny forward's analytic FLOPs (model/cost.py, batch 8) are all products: 6.02 GFLOP.
  assert abs(report["floor_gflop"] - 6.02) < 0.05 and 0 < report["floor_s"] and report["step_s"] > 0
