"""The sampling binary: training checkpoint -> samples.npz, resumption, seeds, importer path."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import timeout
from pixeldit_jax import checkpoint as ckpt_lib
from pixeldit_jax import sample as sample_lib
from pixeldit_jax.train import trainer
from test_train import small_config

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  config = small_config(num_steps=2, checkpoint_every=2)
  trainer.train(config, str(workdir))
  return config, str(workdir)


def sample_config(config, **s):
  c = config.copy_and_resolve_references()
  c.sample.update(dict(sampler="ab2", num_steps=3, cfg_scale=2.0, cfg_interval=(0.1, 0.9),
                       num_per_class=2, batch_size=4, seed=3))
  c.sample.update(s)
  return c


def test_samples_npz_layout_labels_and_resume(trained, tmp_path, caplog):
  config, workdir = trained
  c = sample_config(config)
  ckpt = os.path.join(workdir, "checkpoints")
  summary = sample_lib.run(c, ckpt, out_root=str(tmp_path))
  out = summary["out_dir"]  # named by the resolved step and the settings
  assert summary["step"] == 2 and out == str(tmp_path / ("samples_step2_" + sample_lib.settings_tag(c.sample)))
  data = np.load(summary["samples"])
  n_classes = config.model.num_classes
  assert data["arr_0"].shape == (2 * n_classes, 8, 8, 3) and data["arr_0"].dtype == np.uint8
  np.testing.assert_array_equal(data["arr_1"], np.repeat(np.arange(n_classes), 2))
  assert os.path.exists(summary["grid"])
  settings = json.load(open(os.path.join(out, "settings.json")))
  assert settings["total"] == 2 * n_classes and settings["sampler"] == "ab2" and settings["step"] == 2
  # Resume: drop one finished part; the rerun regenerates exactly that part.
  parts_dir = os.path.join(out, "parts")
  parts = sorted(os.listdir(parts_dir))
  assert parts == ["part_0000000_0000004.npz", "part_0000004_0000008.npz", "part_0000008_0000010.npz"]
  os.remove(os.path.join(parts_dir, parts[1]))
  again = sample_lib.run(c, ckpt, out)
  assert again["generated"] == 4
  np.testing.assert_array_equal(np.load(again["samples"])["arr_0"], data["arr_0"])
  # Damaged parts, a truncated one and one recording another step, are named in a warning, set
  # aside and generated again.
  first = os.path.join(parts_dir, parts[0])
  with open(first, "rb") as f:
    head = f.read()[:300]
  with open(first, "wb") as f:
    f.write(head)
  last = os.path.join(parts_dir, parts[2])
  with np.load(last) as z:
    record = dict(z)
  np.savez(last, **{**record, "step": np.int64(1)})
  with caplog.at_level("WARNING"):
    third = sample_lib.run(c, ckpt, out)
  assert third["generated"] == 6
  for name, why in ((parts[0], "cannot be read"), (parts[2], "made with step 1")):
    assert f"Sample part {os.path.join(parts_dir, name)} is damaged ({why}" in caplog.text
    assert any(n.startswith(name + ".damaged-") for n in os.listdir(parts_dir))
  np.testing.assert_array_equal(np.load(third["samples"])["arr_0"], data["arr_0"])


def test_each_sample_depends_only_on_its_index(trained, tmp_path):
  config, workdir = trained
  ckpt = os.path.join(workdir, "checkpoints")
  a = sample_lib.run(sample_config(config, batch_size=4), ckpt, str(tmp_path / "a"))
  # Another batch size resumes a folder: parts are keyed by index range, the missing indices of
  # two gaps (0-3 and 8-9) fill one batch of 6.
  b = str(tmp_path / "b")
  shutil.copytree(a["out_dir"], b)
  for name in ("samples.npz", "parts/part_0000000_0000004.npz", "parts/part_0000008_0000010.npz"):
    os.remove(os.path.join(b, name))
  b = sample_lib.run(sample_config(config, batch_size=6), ckpt, b)
  assert b["generated"] == 6
  assert sorted(os.listdir(os.path.join(b["out_dir"], "parts"))) == [
      "part_0000000_0000004.npz", "part_0000004_0000008.npz", "part_0000008_0000010.npz"]
  np.testing.assert_array_equal(np.load(a["samples"])["arr_0"], np.load(b["samples"])["arr_0"])
  c = sample_lib.run(sample_config(config, seed=4), ckpt, str(tmp_path / "c"))
  assert not np.array_equal(np.load(a["samples"])["arr_0"], np.load(c["samples"])["arr_0"])


def test_a_folder_never_mixes_steps_or_settings_and_a_damaged_step_falls_back(trained, tmp_path, caplog):
  config, workdir = trained
  ckpt = str(tmp_path / "checkpoints")
  shutil.copytree(os.path.join(workdir, "checkpoints"), ckpt)
  c = sample_config(config)
  out = str(tmp_path / "s")
  first = sample_lib.run(c, ckpt, out)
  ref = np.load(first["samples"])["arr_0"]
  # Interrupted before the last part and the result; meanwhile training saved step 4.
  os.remove(first["samples"])
  os.remove(os.path.join(out, "parts", "part_0000008_0000010.npz"))
  model, meta = ckpt_lib.load_model(ckpt)
  newer = jax.tree.map(lambda a: np.asarray(a) + 0.1, ckpt_lib.param_dict(model))
  ckpt_lib.save_weights(ckpt, 4, {ckpt_lib.EMA_PARAMS: newer}, meta)
  parts = sorted(os.listdir(os.path.join(out, "parts")))
  with pytest.raises(sample_lib.SampleFolderMismatch) as e:
    sample_lib.run(c, ckpt, out)
  assert str(e.value) == f"{out} holds samples of checkpoint step 2 (this run: step 4); use another --out or delete it"
  with pytest.raises(sample_lib.SampleFolderMismatch) as e:
    sample_lib.run(sample_config(config, cfg_scale=3.0), ckpt, out, step=2)
  assert str(e.value) == (f"{out} holds samples of other settings: cfg_scale 2.0 (this run: 3.0); "
                          "use another --out or delete it")
  assert sorted(os.listdir(os.path.join(out, "parts"))) == parts and not os.path.exists(first["samples"])
  # The newest step damaged: the sampler says so and finishes the run with step 2, read-only.
  shutil.rmtree(os.path.join(ckpt, "4", ckpt_lib.EMA_PARAMS))
  with caplog.at_level("WARNING"):
    done = sample_lib.run(c, ckpt, out)
  assert done["step"] == 2 and done["generated"] == 2
  assert f"Checkpoint step 4 in {ckpt} cannot be restored" in caplog.text
  assert f"Using checkpoint step 2 of {ckpt}" in caplog.text
  assert sorted(n for n in os.listdir(ckpt) if n[0].isdigit()) == ["2", "4"]
  np.testing.assert_array_equal(np.load(done["samples"])["arr_0"], ref)  # all from step 2
  # No step readable: one error naming the directory.
  shutil.rmtree(os.path.join(ckpt, "2", ckpt_lib.EMA_PARAMS))
  with pytest.raises(ckpt_lib.NoReadableCheckpointError, match=f"^No checkpoint step in {re.escape(ckpt)} can be restored"):
    sample_lib.run(c, ckpt, str(tmp_path / "t"))


def test_same_images_on_8_devices_as_on_one(trained, tmp_path):
  config, workdir = trained
  code = f"""
import sys, json
sys.path.insert(0, "tests")
import numpy as np
from test_sample import sample_config
from test_train import small_config
from pixeldit_jax import sample as sample_lib
out = {{}}
for shape in [(8, 1, 1), (2, 2, 2)]:
  c = sample_config(small_config(num_steps=2, checkpoint_every=2), batch_size=8)
  c.sharding.mesh_shape = shape
  s = sample_lib.run(c, "{workdir}/checkpoints", "{tmp_path}/m" + "".join(map(str, shape)))
  out[str(shape)] = s["samples"]
print(json.dumps(out))
"""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
  res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout(600))
  assert res.returncode == 0, res.stderr[-3000:]
  paths = json.loads(res.stdout.strip().splitlines()[-1])
  one = sample_lib.run(sample_config(config, batch_size=8), os.path.join(workdir, "checkpoints"), str(tmp_path / "one"))
  ref = np.load(one["samples"])["arr_0"].astype(int)
  for path in paths.values():
    # Reductions may round differently across shardings: at most one grey level apart.
    assert np.abs(np.load(path)["arr_0"].astype(int) - ref).max() <= 1


def test_official_checkpoint_path_importer_then_sampler(tmp_path):
  torch = pytest.importorskip("torch")
  from test_import_official import CONFIGS, export_official, random_params
  from pixeldit_jax.tools import import_official
  cfg = CONFIGS["tiny"]
  sd = export_official(random_params(cfg, 0), cfg)
  torch.save({"state_dict": {"ema_denoiser." + k: torch.from_numpy(v) for k, v in sd.items()}},
             tmp_path / "official.ckpt")
  assert import_official.main(["--checkpoint", str(tmp_path / "official.ckpt"), "--out", str(tmp_path / "imported")]) == 0
  config = small_config()
  config.image_size = (8, 8)
  c = sample_config(config, num_per_class=1, batch_size=5)
  summary = sample_lib.run(c, str(tmp_path / "imported"), str(tmp_path / "samples"))
  x = np.load(summary["samples"])["arr_0"]
  assert x.shape == (cfg.num_classes, 8, 8, 3) and x.std() > 0
