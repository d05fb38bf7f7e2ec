"""The AOT fit check (python -m pixeldit_jax.aot): TPU compiles on this CPU host through libtpu.

Two compiles of configs/tiny.py, each in a subprocess (libtpu's compiler, no CPU test flags):
one v5e-4 slice with the sampler and the HLO inspection, and two v5e-4 slices joined over DCN
(config.sharding.dcn_mesh_shape). What the HLO check asserts, precisely:
- no host transfer inside the train step: no infeed/outfeed, no host callback or host-offload
  custom call, and no send/recv except, with several slices, the ones libtpu's megascale runtime
  carries over DCN, which must all be the data-parallel gradient all-reduce (ALL_REDUCE);
- every all-gather gathers within groups of the fsdp axis's size (never across slices), and most
  are FSDP parameter gathers (the result holds as many elements as a parameter or one layer of a
  stacked parameter). The others gather activations: the model sets no activation sharding
  constraints, and GSPMD sometimes replicates a (batch, ...) tensor; they are listed in the JSON
  (hlo.unexpected_all_gathers), bounded here, not yet excluded.
"""

import json
import os
import subprocess
import sys

import pytest

from helpers import timeout
from pixeldit_jax import aot
from pixeldit_jax.model.cost import forward_flops, train_step_flops
from pixeldit_jax import config_lib

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _aot(*args, seconds=300):
  # The suite's XLA_FLAGS (CPU optimisation level 0) must not reach libtpu's TPU compiler.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "pixeldit_jax.aot", *args], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=timeout(seconds))


def test_topology_names():
  shapes = {n: aot.parse_topology(n).shape for n in
            ("v5p-8", "v5p-32", "v5p-128", "v5e-4", "v5e-256", "v5litepod-16", "v6e-64", "v4-16", "v5p:2x4x4")}
  assert shapes == {"v5p-8": (2, 2, 1), "v5p-32": (2, 2, 4), "v5p-128": (4, 4, 4), "v5e-4": (2, 2),
                    "v5e-256": (16, 16), "v5litepod-16": (4, 4), "v6e-64": (8, 8), "v4-16": (2, 2, 2),
                    "v5p:2x4x4": (2, 4, 4)}
  assert aot.parse_topology("v5p-32", num_slices=2).chips == 32
  for bad, match in [("v7x-8", "unknown TPU topology"), ("v5p-33", "must be even"),
                     ("v5e-12", "no v5e slice"), ("v6e:8x8x2", "2-D grids")]:
    with pytest.raises(aot.AotError, match=match):
      aot.parse_topology(bad)


def test_sweep_tries_the_fastest_candidates_first():
  cfg = config_lib.load("configs/imagenet256_xl.py")
  cands = aot.sweep_candidates(cfg, 16)
  assert cands[0] == ((1, 16, 1), "none")  # no recompute, no tensor parallelism, most FSDP
  assert [p for _, p in cands[:5]] == ["none"] * 5 and cands[-1][1] == "full"
  assert all(16 % (d * f * t) == 0 and d * f * t == 16 and 16 % t == 0 for (d, f, t), _ in cands)
  assert {t for (_, _, t), _ in cands} == {1, 2, 4}  # 16 heads: tensor splits up to 4


def test_out_of_memory_message_parsed():
  need, have = aot._exhausted_bytes("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of "
                                    "memory in memory space hbm. HLO temporaries (162.70G) exceeds "
                                    "available HBM (95.74G)")
  assert (round(need / aot.GIB, 2), round(have / aot.GIB, 2)) == (162.7, 95.74)


def test_missing_libtpu_is_one_clear_error(monkeypatch):
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "libtpu" else real(n, *a))
  monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
  with pytest.raises(aot.AotError, match=r"libtpu is not installed.*pixeldit-jax\[aot\]"):
    aot.topology_devices(aot.parse_topology("v5e-4"))


def test_expected_mistakes_are_one_error_line(capsys):
  from pixeldit_jax import cli
  for args, text in [(["--topology=v9-8"], "unknown TPU topology 'v9-8'"),
                     (["--topology=v5e-4", "--config.sharding.mesh_shap=(1,-1,1)"], "no field 'sharding.mesh_shap'"),
                     (["--topology=v5e-4", "--mfu=40"], "--mfu must be in (0, 1]")]:
    assert cli.guard(lambda: aot.main(["--config=configs/tiny.py", *args]), argv=[]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], lines
  # A mesh the slice cannot hold (checked before anything compiles; four stand-in devices).
  cfg = aot.apply_overrides(config_lib.load("configs/tiny.py"), ["sharding.mesh_shape=(3,-1,1)"])
  with pytest.raises(aot.AotError, match=r"mesh \(3, -1, 1\) does not fit v5e-4 \(4 chips\): 4 devices cannot fill"):
    aot.mesh_for(cfg, [object()] * 4, aot.parse_topology("v5e-4"))


def test_tiny_on_v5e_4_fits_with_memory_flops_and_clean_hlo(tmp_path):
  path = tmp_path / "r.json"
  out = _aot("--config=configs/tiny.py", "--topology=v5e-4", "--config.sample.num_steps=2",
             "--config.sample.batch_size=8", "--hlo", f"--json={path}")
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(path.read_text())
  assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and r["chips"] == 4
  assert r["device_kind"] == "TPU v5 lite" and r["hbm_gib"] == 16
  t = r["train"]
  assert t["compiled"] and t["fits"]
  # fp32 params + EMA + two AdamW moments of a 7.9 M-parameter model, a quarter per chip.
  assert 0.02 < t["arguments_gib"] < 0.05 and t["temporaries_gib"] > 0
  assert t["arguments_gib"] < t["peak_gib"] < 1.0
  assert t["xla_flops_per_chip"] > 0
  assert r["sampler"]["compiled"] and r["sampler"]["fits"]
  cfg = config_lib.load("configs/tiny.py")
  model_cfg = config_lib.model_config(cfg)
  assert r["train_flops_per_step"] == train_step_flops(model_cfg, 64, 64, 8)
  assert r["forward_flops_per_image"] == forward_flops(model_cfg, 64, 64)["total"]
  assert r["implied_step_s"] == pytest.approx(r["train_flops_per_step"] / (4 * 197e12 * 0.4))
  h = r["hlo"]
  assert h["host_transfers"] == [] and h["dcn_transfers"] == {}
  # attention_impl None picks splash on TPU: Pallas kernels (forward, dq, dkv) for the patch-block
  # and the PiT attention at least.
  assert h["mosaic_kernels"] >= 2 * 3
  # Every all-gather runs within the fsdp axis's groups, and most are FSDP parameter gathers.
  assert h["all_gather_group_sizes"] == [4]
  assert h["all_gathers"] > 2 * len(h["unexpected_all_gathers"])
  # The rest gather activations (the model sets no activation sharding constraints, so GSPMD may
  # replicate a (batch, ...) tensor, e.g. the adaLN modulations): reported, not yet excluded.
  text = out.stdout
  assert "train step: fits:" in text and "GiB per chip of 16" in text
  assert "analytic" in text and "XLA cost analysis" in text and "at 40% MFU" in text


def test_two_slices_over_dcn(tmp_path):
  """Two v5e-4 slices: data parallelism across the slices (DCN), FSDP within each."""
  path = tmp_path / "r.json"
  out = _aot("--config=configs/tiny.py", "--topology=v5e-4", "--num_slices=2", "--no_sampler", "--hlo",
             "--config.sharding.dcn_mesh_shape=(2,1,1)", f"--json={path}")
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(path.read_text())
  assert r["chips"] == 8 and r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  assert r["train"]["fits"]
  h = r["hlo"]
  assert h["host_transfers"] == [] and h["all_gather_group_sizes"] == [4]
  # The gradients' all-reduce over the data axis is the only traffic between slices.
  assert set(h["dcn_transfers"]) == {"ALL_REDUCE"} and h["dcn_transfers"]["ALL_REDUCE"] > 0
  assert "DCN (2, 1, 1)" in out.stdout
