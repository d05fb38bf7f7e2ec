"""The notebooks in notebooks/ run headless (nbclient, a python3 ipykernel) with the CI smoke setting.

PIXELDIT_NOTEBOOK_STEPS shrinks training, sampling and the metric to seconds, and
PIXELDIT_NOTEBOOK_ASSETS points the download cells at local stand-ins: random-weight checkpoints in
the released layout (written here with the hand-written exporters of tests/test_import_official.py)
and the bundled MiniLM for Gemma-2. Nothing is downloaded. The kernel inherits the test
environment (the Fashion-MNIST directory of tests/conftest.py, XLA flags) and runs in a temporary
directory, so everything it writes goes there. With PIXELDIT_NOTEBOOK_PNG_DIR set, the last image
of each run is also saved there as <notebook>.png, for a human to look at.
"""

import base64
import glob
import importlib.util
import os
import subprocess
import sys

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from helpers import timeout

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
NOTEBOOKS = os.path.join(REPO, "notebooks")
ALL_NOTEBOOKS = sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The released file names (Hugging Face nvidia/PixelDiT-ImageNet and nvidia/PixelDiT-1300M-1024px).
C2I_FILE, T2I_FILE = "imagenet256_pixeldit_xl_epoch320.ckpt", "PixelDiT-T2I-v1.pth"


def _text(output) -> str:
  if output.output_type == "stream":
    return output.text
  if output.output_type in ("execute_result", "display_data"):
    return output.get("data", {}).get("text/plain", "")
  return ""


def _pngs(cell) -> list[bytes]:
  return [base64.b64decode(o.data["image/png"]) for o in cell.get("outputs", [])
          if o.output_type in ("execute_result", "display_data") and "image/png" in o.get("data", {})]


def _smoke_env(**extra) -> dict:
  return {"PIXELDIT_NOTEBOOK_STEPS": "3",
          "JAX_PLATFORMS": "cpu",  # CI is a CPU run; no accelerator probing in the kernel
          # The kernel's own copy of the tests' compilation cache (conftest sets it only in-process).
          "JAX_COMPILATION_CACHE_DIR": os.environ.get("PIXELDIT_TEST_JAX_CACHE",
                                                      os.path.join(REPO, ".jax_cache")),
          "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
          **extra}


def _execute(name: str, tmp_path, env: dict) -> nbformat.NotebookNode:
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel process inherits this environment
  try:
    client = NotebookClient(nb, timeout=int(timeout(240)), kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return nb


def _check_run(nb, png_name: str, min_pngs: int) -> str:
  """Every cell ran without an error and the run showed at least `min_pngs` PNG images; returns
  the text of all outputs. Saves the last image under $PIXELDIT_NOTEBOOK_PNG_DIR when set."""
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count for c in code)  # every cell ran
  errors = [o for c in code for o in c.outputs if o.output_type == "error"]
  assert not errors, errors
  pngs = [p for c in code for p in _pngs(c)]
  assert len(pngs) >= min_pngs and all(p.startswith(PNG_MAGIC) for p in pngs), len(pngs)
  if os.environ.get("PIXELDIT_NOTEBOOK_PNG_DIR"):
    os.makedirs(os.environ["PIXELDIT_NOTEBOOK_PNG_DIR"], exist_ok=True)
    with open(os.path.join(os.environ["PIXELDIT_NOTEBOOK_PNG_DIR"], png_name), "wb") as f:
      f.write(pngs[-1])
  return "\n".join(_text(o) for c in code for o in c.outputs)


@pytest.fixture(scope="module")
def standin_assets(tmp_path_factory):
  """A directory with random-weight stand-ins of the released checkpoints, under the released file
  names, in their layouts: a Lightning .ckpt (ema_denoiser.*, REPA projector) of a tiny
  class-conditional model with 1,000 classes and 16x16 patches, and a T2I trainer .pth (core.*,
  _repa_projector.*) of a tiny text-to-image model with MiniLM's text width and 16 tokens."""
  pytest.importorskip("torch")
  from pixeldit_jax.model import PixelDiTConfig  # noqa: PLC0415
  from test_import_official import (export_official, export_official_t2i, random_params,  # noqa: PLC0415
                                    save_lightning, save_t2i)
  directory = tmp_path_factory.mktemp("notebook_assets")
  c2i = PixelDiTConfig(patch_size=16, hidden_size=64, num_heads=4, patch_depth=2, pixel_depth=1, num_classes=1000)
  save_lightning(directory / C2I_FILE, export_official(random_params(c2i, 0), c2i))
  t2i = PixelDiTConfig(patch_size=16, hidden_size=64, num_heads=4, patch_depth=2, pixel_depth=1, text_dim=384,
                       text_length=16, pixel_attn_size=32, pixel_num_heads=2)
  save_t2i(directory / T2I_FILE, export_official_t2i(random_params(t2i, 0), t2i))
  return str(directory)


def test_notebooks_are_stored_without_outputs():
  assert {"quickstart.ipynb", "pretrained.ipynb", "text_to_image.ipynb"} <= set(ALL_NOTEBOOKS)
  for name in ALL_NOTEBOOKS:
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, (name, cell.source[:60])
    # Each opens with its own Open-in-Colab badge.
    first = nb.cells[0]
    assert first.cell_type == "markdown" and "colab-badge.svg" in first.source, name
    assert f"/blob/main/notebooks/{name})" in first.source, name


def test_quickstart_runs_headless(tmp_path):
  nb = _execute("quickstart.ipynb", tmp_path, _smoke_env())
  text = _check_run(nb, "quickstart.png", 2)  # the EMA grid, the sampler's
  assert "pixeldit_jax is importable: no install" in text
  assert "Parameters: " in text and "Forward FLOPs per 28x28 image" in text
  assert "Trained to step 3" in text
  assert "fmnist_accuracy " in text and "fmnist_fd " in text
  assert (tmp_path / "pixeldit_quickstart" / "metrics.jsonl").is_file()
  assert (tmp_path / "pixeldit_quickstart" / "sampled" / "samples.npz").is_file()


def test_pretrained_runs_headless(tmp_path, standin_assets):
  nb = _execute("pretrained.ipynb", tmp_path, _smoke_env(PIXELDIT_NOTEBOOK_ASSETS=standin_assets))
  text = _check_run(nb, "pretrained.png", 1)  # the class grid
  assert "Local stand-in, no download: " + os.path.join(standin_assets, C2I_FILE) in text
  assert "ema weights -> " in text and "c2i_t time convention" in text
  # The released 320-epoch evaluation settings, with the smoke run's steps.
  assert "sampler ab2, 3 steps, CFG 2.75 on t in (0.1, 0.9), time shift 1.0" in text
  assert "FID skipped" in text
  work = tmp_path / "pixeldit_pretrained"
  assert (work / "class_grid.png").is_file()
  assert (work / C2I_FILE.rsplit(".", 1)[0]).is_dir()  # the Orbax import


@pytest.mark.parametrize("model", ["fmnist", "released"])
def test_text_to_image_runs_headless(tmp_path, standin_assets, model):
  """CI runs both paths: "fmnist" trains the small model here; "released" imports the stand-in of
  the 1.3 B checkpoint and encodes with the bundled MiniLM in place of Gemma-2."""
  nb = _execute("text_to_image.ipynb", tmp_path,
                _smoke_env(PIXELDIT_NOTEBOOK_ASSETS=standin_assets, PIXELDIT_NOTEBOOK_T2I_MODEL=model))
  text = _check_run(nb, f"text_to_image_{model}.png", 2 if model == "fmnist" else 1)
  assert f"MODEL={model} STEPS=3 SMOKE=True" in text
  with np.load(tmp_path / "pixeldit_t2i" / f"samples_{model}" / "samples.npz") as z:
    images, captions = z["arr_0"], list(z["captions"])
  if model == "fmnist":
    assert "Trained to step 3" in text
    assert images.shape == (12, 32, 32, 3) and captions[0] == "a blue t-shirt on a white background, bottom left"
  else:
    assert "Local stand-ins, no download" in text and "t2i_sigma convention" in text
    assert "text encoder minilm" in text
    assert images.shape == (4, 32, 32, 3) and captions[0].startswith("A photo of a red fox")
  assert images.dtype == np.uint8 and images.std() > 0


def _cell(name: str, needle: str) -> str:
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  cells = [c.source for c in nb.cells if c.cell_type == "code" and needle in c.source]
  assert len(cells) == 1, f"{name}: one cell with {needle!r} expected, found {len(cells)}"
  return cells[0]


@pytest.mark.parametrize("name, settings", [
    ("pretrained.ipynb", {"CHECKPOINT": C2I_FILE}),
    ("text_to_image.ipynb", {"MODEL": "released"}),
])
def test_smoke_runs_never_download(name, settings, tmp_path, monkeypatch):
  """The download cells under the smoke setting without stand-ins stop instead of downloading."""
  import huggingface_hub  # noqa: PLC0415

  def refuse(*a, **k):
    raise AssertionError("a smoke run tried to download")

  for fn in ("hf_hub_download", "snapshot_download", "list_repo_files"):
    monkeypatch.setattr(huggingface_hub, fn, refuse)
  namespace = {"os": os, "SMOKE": True, "ASSETS": None, "WORK": str(tmp_path), **settings}
  with pytest.raises(RuntimeError, match="does not download"):
    exec(_cell(name, "hf_hub_download"), namespace)  # noqa: S102


def _install_cell(name: str) -> str:
  return _cell(name, "pip")


@pytest.mark.parametrize("name", ALL_NOTEBOOKS)
def test_install_cells_are_the_same(name):
  """One install cell per notebook, the same everywhere, so the runtime tests below hold for all."""
  assert _install_cell(name) == _install_cell("quickstart.ipynb")


@pytest.mark.parametrize("runtime, extra", [("tpu", "tpu"), ("gpu", "cuda12"), ("cpu", "cpu")])
def test_install_cell_picks_the_runtime_extra(runtime, extra, tmp_path, monkeypatch):
  """The install cell on a simulated Colab runtime without the package: one pip install of the
  package with the runtime's extra, so an accelerator runtime never gets the CPU pin."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  if runtime == "gpu":
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
  monkeypatch.setenv("PATH", str(bin_dir))
  if runtime == "tpu":
    monkeypatch.setenv("COLAB_TPU_ADDR", "10.0.0.2:8470")
  else:
    monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)
  real_glob, real_find_spec = glob.glob, importlib.util.find_spec
  monkeypatch.setattr(glob, "glob", lambda p, *a, **k: [] if p.startswith("/dev/accel") else real_glob(p, *a, **k))
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda n, *a: None if n == "pixeldit_jax" else real_find_spec(n, *a))
  calls = []
  monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
  monkeypatch.chdir(tmp_path)  # not notebooks/ of a checkout
  monkeypatch.setattr(sys, "path", list(sys.path))
  namespace = {}
  exec(_install_cell("quickstart.ipynb"), namespace)  # noqa: S102
  assert namespace["RUNTIME"] == runtime
  assert len(calls) == 1, calls
  cmd = calls[0]
  assert cmd[:4] == [sys.executable, "-m", "pip", "install"]
  assert cmd[-1].startswith(f"pixeldit-jax[{extra}] @ git+https://github.com/")
  assert not any("requirements" in c for c in cmd)
  if runtime != "cpu":
    assert "[cpu]" not in " ".join(cmd)


def test_install_cell_skips_when_importable(monkeypatch):
  calls = []
  monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
  exec(_install_cell("quickstart.ipynb"), {})  # noqa: S102 - the tests import pixeldit_jax
  assert not calls
