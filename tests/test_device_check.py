"""bench/device_check.py: its --smoke mode on the CPU, with the packages the GPU image lacks blocked.

The device check is run unchanged on a lent GPU machine whose image has jax, flax, optax, orbax,
numpy and absl but not ml_collections, clu, grain, tfds, tensorboardX, gcsfs or pillow; the smoke
run here blocks those imports to prove that its path never needs them.
"""

import importlib.util
import json
import os
import subprocess
import sys

from helpers import timeout

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SCRIPT = os.path.join(REPO, "bench", "device_check.py")
MISSING_ON_GPU_IMAGE = ("ml_collections", "clu", "grain", "tensorflow_datasets", "tensorflow",
                        "tensorboardX", "gcsfs", "PIL", "libtpu")

BLOCKER = f"""
import sys
BLOCKED = {MISSING_ON_GPU_IMAGE!r}
class _Block:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ImportError("not on the GPU image: " + name)
    return None
sys.meta_path.insert(0, _Block())
"""


def _load_module():
  spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run(tmp_path, *args, seconds=120):
  site = tmp_path / "site"
  site.mkdir(exist_ok=True)
  (site / "sitecustomize.py").write_text(BLOCKER)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(site))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile for real (the budget test relies on it)
  return subprocess.run([sys.executable, SCRIPT, *args], cwd=str(tmp_path), env=env,
                        capture_output=True, text=True, timeout=timeout(seconds))


def test_smoke_all_parts_guarded_without_missing_packages(tmp_path):
  out = tmp_path / "dc.json"
  # 'bogus' is a bad attention switch: that variant fails and the other parts still run.
  r = _run(tmp_path, "--smoke", "--blocks", "scanned", "--attention", "cudnn,xla,bogus",
           "--extra-remat=", "--out", str(out))
  assert r.returncode == 1, r.stdout + r.stderr  # 1: a part failed (the bogus one)
  data = json.loads(out.read_text())
  assert data["finished"] is True and data["smoke"] is True and data["backend"] == "cpu"
  parts = data["parts"]
  parity = parts["parity"]
  assert parity["status"] == "ok", parity
  for precision in ("default", "highest"):
    assert parity[precision]["max_abs_err"] < 1e-5 and parity[precision]["finite"]
  assert parity["reference_abs_max"] > 0  # perturbed weights: the output is not trivially zero
  assert parts["train/scanned/cudnn"]["status"] == "skipped"
  assert "CUDA GPU" in parts["train/scanned/cudnn"]["reason"]
  train = parts["train/scanned/xla"]
  assert train["status"] == "ok", train.get("traceback")
  assert train["images_per_s"] > 0 and train["compile_s"] > 0 and train["lower_s"] > 0
  assert train["finite"] and train["timed_steps"] == 5 and train["batch"] == 2
  assert train["compiled_memory"]["temp_size_in_bytes"] > 0
  assert train["mfu"] is None  # no bf16 peak for a CPU
  bogus = parts["train/scanned/bogus"]
  assert bogus["status"] == "error" and "attention_impl" in bogus["error"] and bogus["traceback"]
  sample = parts["sample"]
  assert sample["status"] == "ok", sample.get("traceback")
  assert sample["images_per_s"] > 0 and sample["sampler"] == "dpm_solver_pp_2m"
  assert "train/unrolled/xla" not in parts  # --blocks scanned
  assert "memory" in data and data["total_s"] > 0
  assert "train XL@256 bf16" in r.stdout and "parity (highest precision)" in r.stdout
  assert f"wrote {out}" in r.stdout


def test_budget_overrun_keeps_the_json(tmp_path):
  out = tmp_path / "dc.json"
  r = _run(tmp_path, "--smoke", "--parts", "parity,train", "--budget-s", "1", "--out", str(out),
           seconds=60)  # parity alone (four compiles) takes longer than 1 s
  assert r.returncode == 3, r.stdout + r.stderr
  data = json.loads(out.read_text())
  assert data["finished"] is False
  killed = [n for n, p in data["parts"].items() if p["status"] == "killed"]
  assert killed and "budget" in data["parts"][killed[0]]["error"]


def test_peak_table():
  dc = _load_module()
  assert dc.peak_tflops("NVIDIA H100 80GB HBM3")[0] == 989.0
  assert dc.peak_tflops("NVIDIA H200")[0] == 989.0
  assert dc.peak_tflops("NVIDIA GH200 480GB")[0] == 989.0
  assert dc.peak_tflops("NVIDIA H100 PCIe")[0] == 756.0
  assert dc.peak_tflops("NVIDIA A100-SXM4-80GB")[0] == 312.0
  assert dc.peak_tflops("NVIDIA L4")[0] == 121.0
  assert dc.peak_tflops("cpu")[0] is None
  assert dc.peak_tflops("cpu", 100.0) == (100.0, "--peak-tflops")


def test_settings_match_the_released_configs():
  """The script copies the recipes' settings (to avoid ml_collections); they must not drift."""
  from pixeldit_jax import config_lib
  from pixeldit_jax.model import preset
  dc = _load_module()
  xl = config_lib.load("configs/imagenet256_xl.py")
  for key, value in dc.XL_TRAIN.items():
    assert xl.train[key] == value, key
  model = config_lib.model_config(xl)  # the check sets the remat policy itself (--remat)
  assert model == preset("XL", dtype="bfloat16", remat_policy=model.remat_policy)
  assert tuple(xl.image_size) == (256, 256)
  t2i = config_lib.load("configs/t2i_1024.py:stage1")
  assert tuple(t2i.image_size) == (512, 512) and t2i.sample.sampler == "dpm_solver_pp_2m"
  for key, value in dc.T2I_SAMPLE.items():
    assert (tuple(t2i.sample[key]) if key == "cfg_interval" else t2i.sample[key]) == value, key
  model = config_lib.model_config(t2i)
  assert model == preset("T2I", dtype="bfloat16", remat_policy=model.remat_policy)
  assert model.text_length == dc.T2I_TEXT_TOKENS
