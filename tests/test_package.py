"""The installable package: pyproject.toml, configs found by name outside the repository, a fresh
install used from another directory, and the skip guard that keeps CI from hiding untested code."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import tomllib

import numpy as np
import pytest
from helpers import timeout

from pixeldit_jax import config_lib

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIGS = os.path.join(REPO, "configs")


def test_pyproject_lists_every_subpackage_and_ships_the_configs():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    setuptools = tomllib.load(f)["tool"]["setuptools"]
  on_disk = {"pixeldit_jax"} | {
      f"pixeldit_jax.{d}" for d in os.listdir(os.path.join(REPO, "pixeldit_jax"))
      if os.path.isfile(os.path.join(REPO, "pixeldit_jax", d, "__init__.py"))}
  assert set(setuptools["packages"]) == on_disk | {"pixeldit_jax.configs"}
  assert setuptools["package-dir"] == {"pixeldit_jax.configs": "configs"}


# ---------------------------------------------------------------- config names


def test_config_names_resolve_to_the_shipped_files(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a user's directory: no configs/ here
  tiny = os.path.join(config_lib.packaged_configs_dir(), "tiny.py")
  assert os.path.samefile(os.path.dirname(tiny), CONFIGS)
  for spec in ("tiny.py", "tiny", "configs/tiny.py", "./configs/tiny.py"):
    assert config_lib.resolve_config_path(spec) == tiny
    assert config_lib.resolve_config_path(spec + ":size=small") == tiny + ":size=small"
  # Not a shipped name, or not a bare name: unchanged, so the usual missing-file error follows.
  for spec in ("nope.py", "other/tiny.py", "/abs/configs/tiny.py", "__init__.py", ":x", ""):
    assert config_lib.resolve_config_path(spec) == spec
  # A local file of the same name wins over the shipped one.
  (tmp_path / "tiny.py").write_text("def get_config(arg=None):\n  return {'local': True}\n")
  assert config_lib.resolve_config_path("tiny.py:a") == "tiny.py:a"
  assert config_lib.load("tiny.py") == {"local": True}
  config = config_lib.load("fashion_mnist.py:steps=20")
  assert config.train.num_steps == 20 and config.data.source == "fashion_mnist"


def test_config_flag_values_in_argv_are_resolved(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  fm = os.path.join(config_lib.packaged_configs_dir(), "fashion_mnist.py")
  argv = ["prog", "--config=fashion_mnist.py:steps=20", "--config.train.lr=0.1", "--workdir=w"]
  assert config_lib.resolve_config_argv(argv) == [
      "prog", f"--config={fm}:steps=20", "--config.train.lr=0.1", "--workdir=w"]
  assert config_lib.resolve_config_argv(["prog", "-config", "configs/fashion_mnist.py"]) == [
      "prog", "-config", fm]
  # Other flags, values after "--" and unknown names stay as they are.
  argv = ["prog", "--configs=tiny.py", "--other=tiny.py", "--", "--config=tiny.py", "--config=x.py"]
  assert config_lib.resolve_config_argv(argv) == argv
  tiny = os.path.join(config_lib.packaged_configs_dir(), "tiny.py")
  assert config_lib.resolve_config_argv(["prog", "--cfg=tiny.py"], flag="cfg") == ["prog", f"--cfg={tiny}"]


# ---------------------------------------------------------------- a fresh install


def _uv() -> str:
  return shutil.which("uv", path=os.path.dirname(sys.executable)) or shutil.which("uv") or "uv"


def test_fresh_install_works_outside_the_repository(tmp_path):
  """Installs a copy of the checkout (not editable) with its [cpu] extra into a new venv, the
  versions held to requirements.txt so that uv's cache serves them (~4 s), and uses it elsewhere."""
  elsewhere = tmp_path / "user"
  os.makedirs(elsewhere)
  src = tmp_path / "src"  # a copy: building in the checkout would leave build/ there
  os.makedirs(src)
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(REPO, name), src)
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  for name in ("pixeldit_jax", "configs"):
    shutil.copytree(os.path.join(REPO, name), src / name, ignore=ignore)
  with open(os.path.join(REPO, "requirements.txt")) as f:  # pins only: constraints take no -e
    (tmp_path / "pins.txt").write_text("".join(l for l in f if not l.startswith("-e")))
  venv = tmp_path / "venv"
  python = str(venv / "bin" / "python")
  start = time.perf_counter()
  for cmd in ([_uv(), "venv", "-q", "--python", sys.executable, str(venv)],
              [_uv(), "pip", "install", "-q", "--python", python, f"{src}[cpu]", "-c", str(tmp_path / "pins.txt")]):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout(300))
    assert res.returncode == 0, res.stderr[-3000:]
  install_s = time.perf_counter() - start
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  res = subprocess.run([python, "-c", "import pixeldit_jax; print(pixeldit_jax.__file__)"],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=timeout(60))
  assert res.stdout.startswith(str(venv)) and "site-packages" in res.stdout, res.stdout + res.stderr
  # The training entry point with a shipped config named as in the repository, from the user's
  # directory: a tiny model's jitted forward and backward pass.
  res = subprocess.run([python, "-m", "pixeldit_jax.main", "--config=configs/tiny.py:size=tiny",
                        "--config.image_size=(16,16)", "--config.model.hidden_size=32",
                        "--config.model.num_heads=2", "--config.model.patch_depth=1",
                        "--check_model", "--workdir=run"],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=timeout(300))
  assert res.returncode == 0, res.stderr[-3000:]
  with open(elsewhere / "run" / "model_check.json") as f:
    report = json.load(f)
  assert report["image_size"] == [16, 16] and np.isfinite(report["loss"]), report
  assert install_s < timeout(60), f"the install took {install_s:.0f} s: is uv's cache being used?"


# ---------------------------------------------------------------- the skip guard


def _run_pytest(tmp_path, tests: str, env_extra=None):
  (tmp_path / "test_x.py").write_text(textwrap.dedent(tests))
  (tmp_path / "conftest.py").write_text(textwrap.dedent("""
      import skip_guard
      def pytest_configure(config):
        skip_guard.register(config, {"test_x.py::test_allowed"})
  """))
  env = {k: v for k, v in os.environ.items() if k != "PIXELDIT_ALLOW_SKIPS"}
  env.update(PYTHONPATH=os.path.dirname(__file__), **(env_extra or {}))
  return subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider",
                         "-c", os.devnull, "--rootdir", str(tmp_path), str(tmp_path)],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout(120))


def test_skip_guard_fails_the_run_on_unexpected_skips(tmp_path):
  allowed_only = """
      import pytest
      @pytest.mark.parametrize("x", [1, 2])
      def test_allowed(x):
        pytest.skip("opt-in")
      def test_passes():
        pass
      @pytest.mark.xfail(reason="known")
      def test_xfails():
        assert False
  """
  res = _run_pytest(tmp_path, allowed_only)
  assert res.returncode == 0, res.stdout[-3000:]
  assert "2 skipped" in res.stdout and "unexpected skips" not in res.stdout

  unexpected = allowed_only + """
      @pytest.mark.skipif(True, reason="data missing")
      def test_needs_data():
        pass
      def test_needs_torch():
        pytest.importorskip("a_module_that_is_not_installed")
  """
  res = _run_pytest(tmp_path, unexpected)
  assert res.returncode == 1, res.stdout[-3000:]
  assert "unexpected skips" in res.stdout
  assert "test_x.py::test_needs_data: Skipped: data missing" in res.stdout
  assert "test_x.py::test_needs_torch" in res.stdout and "2 test(s) skipped outside" in res.stdout
  assert "test_x.py::test_allowed" not in res.stdout.split("unexpected skips")[1]

  module_level = """
      import pytest
      pytest.importorskip("a_module_that_is_not_installed")
      def test_never_collected():
        pass
  """
  res = _run_pytest(tmp_path, module_level)
  assert res.returncode == 1 and "test_x.py: Skipped: could not import" in res.stdout, res.stdout[-3000:]

  res = _run_pytest(tmp_path, unexpected, {"PIXELDIT_ALLOW_SKIPS": "1"})
  assert res.returncode == 0 and "4 skipped" in res.stdout, res.stdout[-3000:]


def test_timeouts_scale_with_the_knob(monkeypatch):
  monkeypatch.delenv("PIXELDIT_TEST_TIMEOUT_SCALE", raising=False)
  assert timeout(120) == 120
  monkeypatch.setenv("PIXELDIT_TEST_TIMEOUT_SCALE", "2.5")
  assert timeout(120) == 300
  monkeypatch.setenv("PIXELDIT_TEST_TIMEOUT_SCALE", "0")
  with pytest.raises(ValueError, match="must be positive"):
    timeout(1)
