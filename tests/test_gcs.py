"""gs:// workdirs for real: train, SIGKILL, resume, sample and evaluate against a local GCS emulator.

The emulator (PyPI's gcp-storage-emulator, started by tools/gcs_emulator.py with the generation
headers tensorstore needs) serves the JSON API on 127.0.0.1. gcsfs (behind
etils.epath, our path layer) finds it through STORAGE_EMULATOR_HOST and tensorstore (Orbax's array
writer) through TENSORSTORE_GCS_HTTP_URL; `fs.use_gcs_emulator` sets both.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import timeout
from pixeldit_jax import config_lib, fs

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BUCKET = "pixeldit-test"
_EMULATOR_ENV = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def bucket():
  port = _free_port()
  launcher = os.path.join(os.path.dirname(__file__), "tools", "gcs_emulator.py")
  proc = subprocess.Popen([sys.executable, launcher, str(port), BUCKET],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + timeout(60)
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      if time.time() > deadline or proc.poll() is not None:
        proc.kill()
        raise RuntimeError("the GCS emulator did not start")
      time.sleep(0.2)
  saved = {k: os.environ.get(k) for k in _EMULATOR_ENV}
  fs.use_gcs_emulator(f"http://127.0.0.1:{port}")
  yield f"gs://{BUCKET}"
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  proc.terminate()
  proc.wait(timeout=30)


def test_path_layer_round_trips_on_the_bucket(bucket, tmp_path):
  root = f"{bucket}/fs"
  fs.write_text(fs.join(root, "a", "x.txt"), "hello")
  assert fs.read_text(f"{root}/a/x.txt") == "hello" and fs.isdir(f"{root}/a") and fs.isfile(f"{root}/a/x.txt")
  fs.save_npz(f"{root}/arr.npz", x=np.arange(5), s=np.array(["a", "bc"]))
  with fs.load_npz(f"{root}/arr.npz") as z:
    np.testing.assert_array_equal(z["x"], np.arange(5))
    assert z["s"].tolist() == ["a", "bc"]
  fs.save_npz(f"{root}/obj.npz", o=np.array([{"a": 1}], dtype=object))
  with pytest.raises(ValueError, match="allow_pickle"), fs.load_npz(f"{root}/obj.npz") as z:
    z["o"]  # noqa: B018 - never unpickled
  local = tmp_path / "d"
  (local / "sub").mkdir(parents=True)
  (local / "sub" / "f.bin").write_bytes(b"\x00\x01")
  (local / "meta.json").write_text("{}")
  fs.upload_dir(str(local), f"{root}/up", last="meta.json")
  assert fs.listdir(f"{root}/up") == ["meta.json", "sub"]
  copy = fs.local_dir(f"{root}/up")
  assert open(os.path.join(copy, "sub", "f.bin"), "rb").read() == b"\x00\x01"
  fs.rename(f"{root}/a", f"{root}/b")
  assert not fs.exists(f"{root}/a") and fs.read_text(f"{root}/b/x.txt") == "hello"
  fs.remove(f"{root}/b")
  assert not fs.exists(f"{root}/b")


# The same run as a command line (subprocess) and as a config (in-process resume).
OVERRIDES = {
    "image_size": (16, 16), "batch_size": 2, "model.num_classes": 3,
    "data.source": "fake", "data.num_workers": 0,
    "train.log_every": 1, "train.checkpoint_every": 2, "train.keep_checkpoints": 3,
    "train.sample_every": 0, "train.sample_rows": 3, "train.sample_per_row": 2, "train.sample_steps": 2,
    "sample.sampler": "euler", "sample.num_steps": 2, "sample.num_per_class": 2, "sample.batch_size": 4,
}


def _config(**extra):
  c = config_lib.load("configs/tiny.py:size=tiny")
  for key, value in {**OVERRIDES, **extra}.items():
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _flags(**extra):
  return [f"--config.{k}={v}".replace(" ", "") for k, v in {**OVERRIDES, **extra}.items()]


def test_train_kill_resume_sample_evaluate_on_the_bucket(bucket, tmp_path):
  from pixeldit_jax import evaluate
  from pixeldit_jax import sample as sample_lib
  from pixeldit_jax.evaluation import inception
  from pixeldit_jax.train import trainer

  workdir = f"{bucket}/runs/tiny"
  ckpt_dir = f"{workdir}/checkpoints"
  env = dict(os.environ, PYTHONPATH=REPO, JAX_COMPILATION_CACHE_DIR=jax_cache_dir(),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  args = [sys.executable, "-m", "pixeldit_jax.main", f"--config={REPO}/configs/tiny.py:size=tiny",
          f"--workdir={workdir}", *_flags(**{"train.num_steps": 100_000})]
  proc = subprocess.Popen(args, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + timeout(300)
    steps = []
    while time.time() < deadline and proc.poll() is None:
      steps = [int(n) for n in fs.listdir(ckpt_dir) if n.isdigit()] if fs.isdir(ckpt_dir) else []
      if len(steps) >= 2:
        break
      time.sleep(0.5)
  finally:
    proc.send_signal(signal.SIGKILL)  # no chance to save: resume must use what is on the bucket
    out, _ = proc.communicate(timeout=timeout(60))
  assert len(steps) >= 2, f"no checkpoints appeared on the bucket:\n{out[-3000:]}"
  assert not os.path.exists(tmp_path / "gs:"), "the gs:// workdir became a local directory"

  # Resume in this process from the newest readable checkpoint and finish two steps later.
  latest = max(int(n) for n in fs.listdir(ckpt_dir) if n.isdigit())
  config = _config(**{"train.num_steps": latest + 2})
  summary = trainer.train(config, workdir)
  assert summary["workdir"] == workdir
  assert 2 <= summary["start_step"] <= latest and summary["step"] == latest + 2
  logged = [json.loads(l) for l in fs.read_text(f"{workdir}/metrics.jsonl").splitlines()]
  assert logged[-1]["step"] == latest + 2 and {1, 2} <= {r["step"] for r in logged}
  assert fs.listdir(f"{workdir}/tensorboard")
  assert summary["last_sample"].startswith(workdir) and fs.isfile(summary["last_sample"])
  assert latest + 2 in [int(n) for n in fs.listdir(ckpt_dir) if n.isdigit()]

  # Sample from the bucket's checkpoint into the bucket.
  out_dir = f"{workdir}/samples"
  result = sample_lib.run(config, ckpt_dir, out_dir)
  assert result["samples"] == f"{out_dir}/samples.npz"
  with fs.load_npz(result["samples"]) as z:
    assert z["arr_0"].shape == (6, 16, 16, 3) and z["labels"].tolist() == [0, 0, 1, 1, 2, 2]
  assert fs.isfile(f"{out_dir}/grid.png") and json.loads(fs.read_text(f"{out_dir}/settings.json"))["total"] == 6
  # A damaged part on the bucket is set aside (a copy, then a delete there) and generated again.
  first = fs.listdir(f"{out_dir}/parts")[0]
  a, b = (int(v) for v in first[5:-4].split("_"))
  fs.write_bytes(f"{out_dir}/parts/{first}", b"not a zip")
  assert sample_lib.run(config, ckpt_dir, out_dir)["generated"] == b - a
  assert any(n.startswith(first + ".damaged-") for n in fs.listdir(f"{out_dir}/parts"))
  with fs.load_npz(result["samples"]) as z:
    assert z["arr_0"].shape == (6, 16, 16, 3)

  # Evaluate: inputs, (random) Inception weights and the report all on the bucket.
  inception.save_npz(inception.random_weights(0), f"{bucket}/weights/inception.npz")
  report = f"{workdir}/eval/metrics.json"
  rc = evaluate.main(["--samples", result["samples"], "--reference", result["samples"],
                      "--inception", f"{bucket}/weights/inception.npz", "--metrics", "fid",
                      "--batch_size", "6", "--out", report, "--no_progress"])
  assert rc == 0
  metrics = json.loads(fs.read_text(report))
  assert metrics["samples"] == result["samples"] and metrics["metrics"]["fid"] == pytest.approx(0, abs=1e-3)


def jax_cache_dir() -> str:
  import jax
  return jax.config.jax_compilation_cache_dir or os.path.join(REPO, ".jax_cache")


def test_importer_text_cache_and_feature_table_on_the_bucket(bucket, tmp_path):
  """The other user paths that may name gs://: the importer's --checkpoint and --out, a text
  embedding cache (built, then read memory-mapped through the local cache) and a REPA table."""
  from safetensors.numpy import save as save_safetensors

  from pixeldit_jax import checkpoint as ckpt_lib
  from pixeldit_jax.text import cache as cache_lib
  from pixeldit_jax.text.encoders import make_encoder, text_config_defaults
  from pixeldit_jax.tools import import_official
  from pixeldit_jax.train.repa_features import FeatureTable
  from test_import_official import CONFIGS, assert_same_params, export_official, random_params

  root = f"{bucket}/paths"
  cfg = CONFIGS[sorted(CONFIGS)[0]]
  params = random_params(cfg, 3)
  fs.write_bytes(f"{root}/official.safetensors", save_safetensors(export_official(params, cfg)))
  assert import_official.main(["--checkpoint", f"{root}/official.safetensors", "--out", f"{root}/imported"]) == 0
  model, meta = ckpt_lib.load_model(f"{root}/imported")
  assert meta["source"]["checkpoint"] == f"{root}/official.safetensors"
  assert_same_params(ckpt_lib.param_dict(model), params)

  captions = ["a red bicycle", "snow", "two dogs"]
  fs.write_text(f"{root}/captions.txt", "\n".join(captions) + "\n")
  assert cache_lib.main([f"--captions={root}/captions.txt", f"--out={root}/text_cache", "--max_length=8"]) == 0
  assert fs.isfile(f"{root}/text_cache/meta.json")
  cfg_text = text_config_defaults()
  cfg_text.max_length, cfg_text.cache = 8, f"{root}/text_cache"
  emb, mask = cache_lib.load_cache(cfg_text).lookup(["snow", "a red bicycle"])
  ref, ref_mask = make_encoder(cfg_text).encode(["snow", "a red bicycle"])
  np.testing.assert_allclose(emb, ref, atol=2e-3, rtol=2e-3)
  np.testing.assert_array_equal(mask, ref_mask)

  table = np.random.default_rng(0).standard_normal((5, 4, 3)).astype(np.float16)
  np.save(tmp_path / "feats.npy", table)
  fs.write_bytes(f"{root}/feats.npy", (tmp_path / "feats.npy").read_bytes())
  np.testing.assert_array_equal(FeatureTable(f"{root}/feats.npy", 4, 3)(np.array([4, 0])),
                                table[[4, 0]].astype(np.float32))
