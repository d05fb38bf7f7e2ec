"""Training: flow-matching objective, resume equality, mesh equivalence, preemption, bad checkpoints,
the non-finite guard."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY, timeout
from pixeldit_jax import config_lib
from pixeldit_jax.diffusion import flow
from pixeldit_jax.train import optimizer, trainer

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def small_config(**train):
  c = config_lib.base_config()
  c.image_size = (8, 8)
  c.model = config_lib.model_dict(config_lib.PixelDiTConfig(**TINY))
  c.batch_size = 8
  c.data.source = "fake"
  c.data.num_workers = 0
  c.train.update(dict(num_steps=6, log_every=1, checkpoint_every=3, keep_checkpoints=5, sample_every=0,
                      lr=1e-3, ema_decay=0.9, sample_steps=4, sample_rows=2, sample_per_row=4))
  c.train.update(train)
  return c


# ----------------------------------------------------------------------------- objective

def test_flow_matching_convention():
  x = jnp.full((2, 4, 4, 3), 0.5)
  eps = jnp.full((2, 4, 4, 3), -1.0)
  t = jnp.array([0.0, 1.0])
  xt = flow.interpolate(x, eps, t)
  np.testing.assert_allclose(xt[0], eps[0])  # t = 0 is noise
  np.testing.assert_allclose(xt[1], x[1])  # t = 1 is data
  np.testing.assert_allclose(flow.velocity_target(x, eps), 1.5)
  assert float(flow.time_shift(jnp.array(0.5), 3.0)) == pytest.approx(0.25)  # toward noise


def test_time_sampling_is_logit_normal_then_shifted():
  t = np.asarray(flow.sample_time(jax.random.PRNGKey(0), 200_000, shift=1.0))
  logit = np.log(t / (1 - t))
  assert abs(logit.mean()) < 0.01 and abs(logit.std() - 1) < 0.01
  shifted = np.asarray(flow.sample_time(jax.random.PRNGKey(0), 200_000, shift=3.0))
  np.testing.assert_allclose(shifted, t / (t + (1 - t) * 3.0), rtol=1e-5)


def test_label_dropout_rate_and_loss_is_mse_of_velocity():
  labels = jnp.zeros((100_000,), jnp.int32)
  dropped = flow.drop_labels(jax.random.PRNGKey(1), labels, null_class=10, prob=0.1)
  assert abs(float(jnp.mean(dropped == 10)) - 0.1) < 0.005
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 4, 4, 3))
  # A model that returns the exact velocity has zero loss; a zero model has loss E|x - eps|^2.
  key = jax.random.PRNGKey(3)
  k_t, k_noise, _ = jax.random.split(key, 3)
  eps = jax.random.normal(k_noise, x.shape)
  oracle = lambda xt, t, y: x - eps
  assert float(flow.loss(oracle, x, jnp.zeros(4, jnp.int32), key, null_class=10)) == pytest.approx(0, abs=1e-6)
  zero = lambda xt, t, y: jnp.zeros_like(xt)
  assert float(flow.loss(zero, x, jnp.zeros(4, jnp.int32), key, null_class=10)) == pytest.approx(
      float(jnp.mean((x - eps) ** 2)), rel=1e-6)


def test_lr_and_clip_step_down_and_warmup():
  t = config_lib.train_defaults()
  t.update(dict(warmup_steps=10, step_down_step=100))
  lr, clip = optimizer.learning_rate(t), optimizer.clip_norm(t)
  assert float(lr(0)) == pytest.approx(1e-5) and float(lr(9)) == pytest.approx(1e-4)
  assert float(lr(99)) == pytest.approx(1e-4) and float(lr(100)) == pytest.approx(1e-5)
  assert float(clip(99)) == 1.0 and float(clip(100)) == 0.5


def test_clip_is_torchs_clip_grad_norm():
  # torch.nn.utils.clip_grad_norm_ (the official trainer's): g * min(1, max / (norm + 1e-6)).
  grads = {"a": jnp.full((3, 4), 0.5, jnp.float32), "b": jnp.full((4,), 0.5, jnp.float32)}  # norm 2
  clip = optimizer.clip_by_global_norm(1.0)
  out, _ = clip.update(grads, clip.init(grads))
  coef = np.float32(1.0) / (np.float32(2.0) + np.float32(1e-6))
  np.testing.assert_array_equal(out["a"], np.full((3, 4), np.float32(0.5) * coef, np.float32))
  np.testing.assert_array_equal(out["b"], np.full((4,), np.float32(0.5) * coef, np.float32))
  # below the threshold the factor is exactly 1: the gradients pass through bit for bit
  small = jax.tree.map(lambda g: g / 4, grads)
  out, _ = clip.update(small, clip.init(small))
  for k in small:
    np.testing.assert_array_equal(out[k], small[k])
  # just below: torch's +1e-6 already scales (optax's select would not)
  near = jax.tree.map(lambda g: g * np.float32(0.4999999), grads)
  out, _ = clip.update(near, clip.init(near))
  assert float(out["b"][0]) < float(near["b"][0])
  # under inject_hyperparams (the trainer's chain) the max norm follows the step-down schedule
  t = config_lib.train_defaults()
  t.update(dict(step_down_step=1, grad_clip=1.0, grad_clip_after_step_down=0.5))
  tx = optimizer.make(t)
  state = tx.init(grads)
  upd, state = tx.update(grads, state, grads)
  _, state2 = tx.update(grads, state, grads)
  assert float(jnp.abs(upd["a"]).max()) > 0
  assert float(state[0].hyperparams["max_norm"]) == 1.0 and float(state2[0].hyperparams["max_norm"]) == 0.5


def test_lr_decay_after_warmup_to_the_floor():
  t = config_lib.train_defaults()
  t.update(dict(lr=1e-3, warmup_steps=10, num_steps=110, lr_decay="cosine", lr_min_ratio=0.1))
  lr = optimizer.learning_rate(t)
  assert float(lr(0)) == pytest.approx(1e-4)  # warmup unchanged
  assert float(lr(10)) == pytest.approx(1e-3)  # decay starts where warmup ends
  assert float(lr(60)) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way: cos = 0
  assert float(lr(110)) == pytest.approx(1e-4) and float(lr(500)) == pytest.approx(1e-4)
  t.lr_decay = "linear"
  assert float(optimizer.learning_rate(t)(35)) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.75))
  with pytest.raises(ValueError, match="train.lr_decay must be one of"):
    c = config_lib.load("fashion_mnist.py")
    c.train.lr_decay = "exp"
    config_lib.validate(c)


# ----------------------------------------------------------------------------- the loop

def test_resume_continues_the_same_loss_trajectory(tmp_path):
  config = small_config()
  straight = trainer.train(config, str(tmp_path / "a"))
  first = trainer.train(config, str(tmp_path / "b"), max_steps=3)
  assert first["step"] == 3
  second = trainer.train(config, str(tmp_path / "b"))
  assert second["start_step"] == 3 and second["step"] == 6
  for s in range(3, 6):
    assert second["losses"][s] == pytest.approx(straight["losses"][s], abs=1e-6)
  assert straight["losses"][5] != straight["losses"][3]  # the losses do move
  lines = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
  assert {"loss", "grad_norm", "param_norm", "learning_rate", "images_per_s",
          "tflops_per_device", "data_skipped"} <= set(lines[-1])
  assert os.listdir(tmp_path / "a" / "tensorboard")
  assert not (tmp_path / "a" / "run.lock").exists()  # the workdir lock is released at the end


def test_sample_grid_png_is_written(tmp_path):
  from PIL import Image
  config = small_config(num_steps=2, sample_every=2)
  summary = trainer.train(config, str(tmp_path))
  img = Image.open(summary["last_sample"])
  assert img.size[0] > 0 and os.path.basename(summary["last_sample"]) == "step_00000002.png"


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
  config = small_config()
  trainer.train(config, str(tmp_path))  # checkpoints at 3 and 6
  ckpt_dir = tmp_path / "checkpoints"
  assert sorted(int(p) for p in os.listdir(ckpt_dir) if p.isdigit()) == [3, 6]
  shutil.rmtree(ckpt_dir / "6" / "params")  # damage the newest one
  config.train.num_steps = 7
  with caplog.at_level("ERROR"):
    summary = trainer.train(config, str(tmp_path))
  assert summary["start_step"] == 3 and summary["step"] == 7
  assert "Checkpoint step 6" in caplog.text and "cannot be restored" in caplog.text
  assert any(p.startswith("6.unreadable") for p in os.listdir(ckpt_dir))


def _strict_jsonl(path) -> list[dict]:
  """metrics.jsonl read by a strict JSON parser (NaN/Infinity refused)."""
  def refuse(name):
    raise ValueError(f"non-standard JSON constant {name} in {path}")
  return [json.loads(line, parse_constant=refuse) for line in open(path)]


def _restore_all_items(ckpt_dir, step) -> dict:
  import orbax.checkpoint as ocp
  from pixeldit_jax import checkpoint as ckpt_lib
  names = (ckpt_lib.PARAMS, ckpt_lib.EMA_PARAMS, ckpt_lib.OPT_STATE, ckpt_lib.TRAIN)
  with ocp.CheckpointManager(str(ckpt_dir)) as mngr:
    return mngr.restore(step, args=ocp.args.Composite(**{n: ocp.args.StandardRestore() for n in names}))


def test_nonfinite_update_stops_at_the_step_metrics_jsonl_names(tmp_path):
  # Two good steps, then LR = inf: the gradient is finite, the update is not. Step 3 (the third
  # done) is named in the error and is where metrics.jsonl first counts a skipped update.
  config = small_config(step_down_step=2, lr_after_step_down=float("inf"), num_steps=6,
                        checkpoint_every=100)
  with pytest.raises(trainer.NonFiniteError, match=r"Non-finite loss, gradient or update at step (\d+) ") as e:
    trainer.train(config, str(tmp_path))
  named = int(e.value.args[0].split("at step ")[1].split()[0])
  lines = _strict_jsonl(tmp_path / "metrics.jsonl")
  assert named == 3 == next(l["step"] for l in lines if l["skipped_updates"])
  assert "\n" not in str(e.value)


def test_nonfinite_updates_skipped_stop_after_max_consecutive_skips(tmp_path):
  # LR = inf with "skip": every update is non-finite. The run stops after 3 consecutive skips,
  # and no checkpoint item ever holds a non-finite value.
  config = small_config(lr=float("inf"), nonfinite_policy="skip", max_consecutive_skips=3,
                        num_steps=10, checkpoint_every=1)
  with pytest.raises(trainer.NonFiniteError, match=r"3 consecutive updates were non-finite and "
                     r"skipped \(steps 1-3;.*max_consecutive_skips=3"):
    trainer.train(config, str(tmp_path))
  steps = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
  assert steps == [1, 2]
  for step in steps:
    for name, tree in _restore_all_items(tmp_path / "checkpoints", step).items():
      for leaf in jax.tree.leaves(tree):
        assert np.all(np.isfinite(np.asarray(leaf))), (step, name)
  lines = _strict_jsonl(tmp_path / "metrics.jsonl")
  assert [l["skipped_updates"] for l in lines] == [1, 2, 3]
  assert not (tmp_path / "run.lock").exists()  # released on the error too


def test_metrics_jsonl_writes_non_finite_values_as_null(tmp_path):
  from pixeldit_jax.train import metrics as metrics_lib
  w = metrics_lib.MetricWriter(str(tmp_path), backend="tensorboardx")
  w.write_scalars(1, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
  w.close()
  assert _strict_jsonl(tmp_path / "metrics.jsonl") == [
      {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3}]


def test_all_checkpoints_unreadable_stop_the_run_unless_restart_is_asked(tmp_path):
  from pixeldit_jax import checkpoint as ckpt_lib
  config = small_config(num_steps=2, checkpoint_every=1)
  trainer.train(config, str(tmp_path))
  ckpt_dir = tmp_path / "checkpoints"
  for step in ("1", "2"):
    shutil.rmtree(ckpt_dir / step / "params")
  with pytest.raises(ckpt_lib.NoReadableCheckpointError) as e:
    trainer.train(config, str(tmp_path))
  message = str(e.value)
  assert str(ckpt_dir) in message and "tried steps 2 (" in message and ", 1 (" in message
  assert "--config.train.restart_if_unreadable=True" in message and "\n" not in message
  assert {"1", "2"} <= set(os.listdir(ckpt_dir))  # left as they were
  config.train.restart_if_unreadable = True
  summary = trainer.train(config, str(tmp_path))
  assert summary["start_step"] == 0 and summary["step"] == 2
  assert sum(p.startswith(("1.unreadable", "2.unreadable")) for p in os.listdir(ckpt_dir)) == 2


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  workdir = tmp_path / "run"
  args = [sys.executable, "-m", "pixeldit_jax.main", "--config=configs/tiny.py:size=tiny",
          f"--workdir={workdir}", "--config.image_size=(16,16)", "--config.batch_size=2",
          "--config.data.source=fake", "--config.data.num_workers=0", "--config.train.num_steps=100000",
          "--config.train.log_every=1", "--config.train.checkpoint_every=100000",
          "--config.train.sample_every=0"]
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + timeout(240)
  while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=timeout(240))
  assert proc.returncode == 0, out[-3000:]
  assert "Stopped by SIGTERM" in out
  steps = [int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit()]
  assert len(steps) == 1 and 2 <= steps[0] < 100000
  assert not (workdir / "run.lock").exists()  # the workdir lock is released on SIGTERM too


def test_meshes_give_the_same_loss_and_restore_onto_another_mesh(tmp_path):
  code = f"""
import json, sys
sys.path.insert(0, "tests")
import jax, numpy as np
from test_train import small_config
from pixeldit_jax.train import trainer
out = {{}}
for shape in [(1, 1, 1), (8, 1, 1), (2, 4, 1), (1, 4, 2)]:
  c = small_config(num_steps=2, checkpoint_every=100)
  c.sharding.mesh_shape = shape
  if shape == (1, 1, 1):
    import pixeldit_jax.sharding as sh
    orig = sh.make_mesh
    sh.make_mesh = lambda s, devices=None, dcn_shape=None: orig(s, devices=jax.devices()[:1])
  out[str(shape)] = trainer.train(c, "{tmp_path}/m" + "".join(map(str, shape)))["losses"]
  if shape == (1, 1, 1):
    sh.make_mesh = orig
# Save on an FSDP mesh, resume on a (2, 2, 2) mesh, against an uninterrupted FSDP run.
c = small_config(num_steps=4, checkpoint_every=2)
c.sharding.mesh_shape = (1, 8, 1)
straight = trainer.train(c, "{tmp_path}/straight")["losses"]
trainer.train(c, "{tmp_path}/moved", max_steps=2)
c.sharding.mesh_shape = (2, 2, 2)
moved = trainer.train(c, "{tmp_path}/moved")
print(json.dumps({{"losses": out, "straight": straight, "moved": moved["losses"], "start": moved["start_step"]}}))
"""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
  res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout(600))
  assert res.returncode == 0, res.stderr[-4000:]
  got = json.loads(res.stdout.strip().splitlines()[-1])
  one = got["losses"]["(1, 1, 1)"]
  for shape, losses in got["losses"].items():
    for s in ("0", "1"):
      assert losses[s] == pytest.approx(one[s], abs=1e-5), shape
  assert got["start"] == 2
  for s in ("2", "3"):
    assert got["moved"][s] == pytest.approx(got["straight"][s], abs=1e-5)


def test_resume_on_other_data_refuses_unless_allowed(tmp_path):
  from pixeldit_jax import checkpoint as ckpt_lib
  config = small_config(num_steps=3)
  trainer.train(config, str(tmp_path))
  _, meta = ckpt_lib.read_meta(str(tmp_path / "checkpoints"), 3)
  assert meta["data"]["kind"] == "fake" and meta["data"]["num_examples"] == 1 << 16
  config.train.num_steps = 4
  config.data.num_records = 1000  # other data: refused in one line naming the override
  with pytest.raises(ckpt_lib.DataChangedError) as e:
    trainer.train(config, str(tmp_path))
  message = str(e.value)
  assert "num_examples 65536" in message and "num_examples 1000" in message and "\n" not in message
  assert "--config.train.allow_data_change=True" in message
  config.train.allow_data_change = True
  summary = trainer.train(config, str(tmp_path))
  assert summary["start_step"] == 3 and summary["step"] == 4
  _, meta = ckpt_lib.read_meta(str(tmp_path / "checkpoints"), 4)
  assert meta["data"]["num_examples"] == 1000  # from now on the run records the new data


def test_data_fingerprint_tells_the_mnist_fallback_from_fashion_mnist(tmp_path):
  from pixeldit_jax.data import fashion_mnist, folder, identity
  from pixeldit_jax.data.config import default_data_config
  fmnist = fashion_mnist.SmallGrayscaleSource("fashion_mnist", "train", None, (28, 28), 1)
  digits = fashion_mnist.SmallGrayscaleSource("mnist_subset", "train", None, (28, 28), 1)
  a = identity.record(fmnist, default_data_config(source="fashion_mnist"))
  b = identity.record(digits, default_data_config(source="fashion_mnist"))  # the silent fallback
  assert (a["source"], a["kind"], b["source"], b["kind"]) == (
      "fashion_mnist", "fashion_mnist", "fashion_mnist", "mnist_subset")
  assert a["fingerprint"] != b["fingerprint"] and b["num_examples"] == 5000
  assert "mnist_subset" in identity.mismatch(a, b) and identity.mismatch(a, dict(a)) is None
  # Two image folders of the same size differ by their examples.
  from PIL import Image
  records = []
  for name, colour in (("one", 10), ("two", 200)):
    os.makedirs(tmp_path / name / "cls")
    Image.new("RGB", (8, 8), (colour, 0, 0)).save(tmp_path / name / "cls" / "a.png")
    records.append(identity.record(folder.FolderSource(str(tmp_path / name), (8, 8), 3),
                                   default_data_config(source="folder", path=str(tmp_path / name))))
  assert records[0]["num_examples"] == records[1]["num_examples"] == 1
  assert "fingerprint" in identity.mismatch(*records)
