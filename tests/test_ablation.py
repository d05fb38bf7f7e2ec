"""bench/ablation.py: the variants are the paper's, the no-pixel model matches the parameter budget,
and the smoke run (2 variants, a few steps) writes its table, JSON and plot."""

import importlib.util
import json
import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ablation():
  spec = importlib.util.spec_from_file_location("ablation", os.path.join(REPO, "bench", "ablation.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_variants_change_only_what_they_ablate():
  ab = _ablation()
  from pixeldit_jax import config_lib
  base = dict(config_lib.load("fashion_mnist.py").model)
  full_params = ab.param_count(base)
  for name in ab.VARIANTS:
    m = ab.variant_model(base, name)
    changed = {k for k in m if m[k] != base[k]}
    expected = {"full": set(), "patchwise": {"pixel_adaln"}, "no_compaction": {"pixel_compaction"},
                "post_mod": {"pit_post_modulation"}, "no_pixel": {"pixel_depth", "patch_depth"}}[name]
    assert changed == expected, name
  no_pixel = ab.variant_model(base, "no_pixel")
  assert no_pixel["pixel_depth"] == 0 and no_pixel["patch_depth"] > base["patch_depth"]
  # The patch-only DiT gets the depth whose parameter count is nearest the full model's.
  n = ab.param_count(no_pixel)
  one_block = ab.param_count(dict(no_pixel, patch_depth=no_pixel["patch_depth"] + 1)) - n
  assert abs(n - full_params) <= one_block / 2


def test_summary_is_mean_and_sample_std_of_the_final_evaluation():
  ab = _ablation()
  runs = [dict(variant="full", seed=s, params=10, model=dict(patch_depth=4, pixel_depth=2), train_s=t,
               final_loss=0.2, evals=[dict(step=1, fd=100.0, accuracy=0.1), dict(step=2, fd=fd, accuracy=acc)])
          for s, (fd, acc, t) in enumerate([(4.0, 0.9, 10.0), (6.0, 0.8, 20.0)])]
  (s,) = ab.summarize(runs, ["full", "patchwise"])
  assert s["fd_mean"] == 5.0 and s["fd_std"] == pytest.approx(np.std([4, 6], ddof=1))
  assert s["accuracy_mean"] == pytest.approx(0.85) and s["train_s_mean"] == 15.0 and s["seeds"] == 2


def test_smoke_run_writes_table_json_and_plot(tmp_path, fmnist_quick_classifier):
  _, cache_dir = fmnist_quick_classifier
  ab = _ablation()
  out = tmp_path / "results"
  ab.main(["--smoke", "--work", str(tmp_path / "work"), "--out", str(out), "--classifier_cache", cache_dir])
  r = json.loads((out / "ablation.json").read_text())
  assert [s["variant"] for s in r["summary"]] == ["full", "patchwise"]
  for run in r["runs"]:
    assert [e["step"] for e in run["evals"]] == [2, 4]
    assert all(np.isfinite(e["fd"]) and 0 <= e["accuracy"] <= 1 for e in run["evals"])
  # Pixel-wise AdaLN has p^2 times the patch-wise projection's outputs: more parameters.
  assert r["summary"][0]["params"] > r["summary"][1]["params"]
  md = (out / "ablation.md").read_text()
  assert "| full PixelDiT (pixel-wise AdaLN) |" in md and "| patch-wise AdaLN |" in md
  from PIL import Image
  img = Image.open(out / "ablation.png")
  assert img.size == (900, 560)
  # Both curves were drawn: the plot holds each variant's colour.
  colours = {c for _, c in img.convert("RGB").getcolors(1 << 20)}
  assert ab.COLOURS["full"] in colours and ab.COLOURS["patchwise"] in colours
