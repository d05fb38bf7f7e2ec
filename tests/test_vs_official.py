"""bench/vs_official.py, the speed benchmark of record: refuses without the official checkout in
one line, and measures both sides (a stand-in for the official module here, built like the
released PixDiT: same constructor and call) and writes its table's JSON."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench", "vs_official.py")

STAND_IN = """
import torch
from torch import nn

class PixDiT(nn.Module):  # the released constructor and forward(x, t, y), nothing of its insides
  def __init__(self, in_channels, num_groups, hidden_size, pixel_hidden_size, patch_depth, pixel_depth,
               patch_size, num_classes):
    super().__init__()
    self.embed = nn.Embedding(num_classes + 1, in_channels)
    self.proj = nn.Conv2d(in_channels, in_channels, 3, padding=1)
    self.out = nn.Conv2d(in_channels, in_channels, 1)

  def forward(self, x, t, y):
    return self.out(self.proj(x) * t.view(-1, 1, 1, 1) + self.embed(y)[:, :, None, None])
"""


def run(*args):
  return subprocess.run([sys.executable, BENCH, *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_refuses_without_the_official_checkout(tmp_path):
  r = run("--official", str(tmp_path))
  assert r.returncode == 2
  assert r.stderr.strip().startswith("error:") and "pixdit_core" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def stand_in_checkout(tmp_path):
  pytest.importorskip("torch")
  (tmp_path / "pixdit_core").mkdir()
  (tmp_path / "pixdit_core" / "__init__.py").write_text("")
  (tmp_path / "pixdit_core" / "pixeldit_c2i.py").write_text(textwrap.dedent(STAND_IN))


def test_measures_both_sides(tmp_path):
  stand_in_checkout(tmp_path)
  out = tmp_path / "vs.json"
  r = run("--official", str(tmp_path), "--configs", "tiny", "--what", "train", "--sides", "official_eager,ours",
          "--rounds", "1", "--steps", "2", "--warmup", "1", "--max_busy", "1.01", "--out", str(out))
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads(out.read_text())
  (row,) = report["rows"]
  assert row["config"] == "tiny" and row["what"] == "train"
  for side in ("official_eager", "ours"):
    assert row[side]["n"] == 2 and row[side]["images_per_s"] > 0
  assert row["ours_over_best_official"] == pytest.approx(row["ours"]["images_per_s"] / row["official_eager"]["images_per_s"])
  assert "glibc.malloc.hugetlb=1" in report["sides"]["ours"]["glibc_tunables"] or sys.platform != "linux"
  assert "| tiny | train |" in r.stdout
  assert report["precision"] == "fp32" and "fp32" in r.stdout
  assert report["sides"]["official_eager"]["compute_dtype"] == "float32"


def test_bf16_runs_the_official_side_under_autocast(tmp_path):
  """--precision bf16: the official side under autocast (its output is bf16) and the table says
  bf16; ours with the bf16 model dtype: test_ours_bf16_program_computes_in_bf16."""
  stand_in_checkout(tmp_path)
  out = tmp_path / "vs.json"
  r = run("--official", str(tmp_path), "--configs", "tiny", "--what", "forward", "--sides", "official_eager",
          "--precision", "bf16", "--rounds", "1", "--steps", "1", "--warmup", "1", "--max_busy", "1.01",
          "--out", str(out))
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["precision"] == "bf16" and ", bf16, " in r.stdout
  assert report["sides"]["official_eager"]["compute_dtype"] == "bfloat16"


def test_ours_bf16_program_computes_in_bf16():
  sys.path.insert(0, os.path.join(REPO, "bench"))
  import vs_official  # noqa: PLC0415
  _, hlo = vs_official.ours_step("tiny", "forward", precision="bf16")
  assert "bf16[" in hlo()
  _, hlo = vs_official.ours_step("tiny", "forward", precision="fp32")
  assert "bf16[" not in hlo()
