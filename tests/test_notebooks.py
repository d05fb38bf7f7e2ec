"""The notebooks in notebooks/ run headless (nbclient, a python3 ipykernel) with the CI smoke setting.

PIXELDIT_NOTEBOOK_STEPS shrinks training, sampling and the metric to seconds; the kernel inherits
the test environment (the Fashion-MNIST directory of tests/conftest.py, XLA flags) and runs in a
temporary directory, so the work directory it writes goes there.
"""

import base64
import glob
import importlib.util
import os
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import timeout

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
NOTEBOOKS = os.path.join(REPO, "notebooks")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _text(output) -> str:
  if output.output_type == "stream":
    return output.text
  if output.output_type in ("execute_result", "display_data"):
    return output.get("data", {}).get("text/plain", "")
  return ""


def _pngs(cell) -> list[bytes]:
  return [base64.b64decode(o.data["image/png"]) for o in cell.get("outputs", [])
          if o.output_type in ("execute_result", "display_data") and "image/png" in o.get("data", {})]


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


def test_notebooks_are_stored_without_outputs():
  for name in sorted(os.listdir(NOTEBOOKS)):
    if name.endswith(".ipynb"):
      nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
      nbformat.validate(nb)
      for cell in nb.cells:
        if cell.cell_type == "code":
          assert not cell.outputs and cell.execution_count is None, (name, cell.source[:60])


def test_quickstart_runs_headless(tmp_path):
  env = {"PIXELDIT_NOTEBOOK_STEPS": "3",
         # The kernel's own copy of the tests' compilation cache (conftest sets it only in-process).
         "JAX_COMPILATION_CACHE_DIR": os.environ.get("PIXELDIT_TEST_JAX_CACHE",
                                                     os.path.join(REPO, ".jax_cache")),
         "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
  nb = _execute("quickstart.ipynb", tmp_path, env)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count for c in code)  # every cell ran
  errors = [o for c in code for o in c.outputs if o.output_type == "error"]
  assert not errors, errors
  text = "\n".join(_text(o) for c in code for o in c.outputs)
  assert "pixeldit_jax is importable: no install" in text
  assert "Parameters: " in text and "Forward FLOPs per 28x28 image" in text
  assert "Trained to step 3" in text
  assert "fmnist_accuracy " in text and "fmnist_fd " in text
  pngs = [p for c in code for p in _pngs(c)]
  assert len(pngs) >= 2 and all(p.startswith(PNG_MAGIC) for p in pngs)  # the EMA grid, the sampler's
  assert (tmp_path / "pixeldit_quickstart" / "metrics.jsonl").is_file()
  assert (tmp_path / "pixeldit_quickstart" / "sampled" / "samples.npz").is_file()


def _install_cell(name: str) -> str:
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  cells = [c.source for c in nb.cells if c.cell_type == "code" and "pip" in c.source]
  assert len(cells) == 1, f"{name}: one install cell expected, found {len(cells)}"
  return cells[0]


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
