"""REPA: student capture, projector, grid matching and the two released loss forms, the recipe
configs, and the start-up error when the teacher is missing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import inputs, max_abs, perturb, timeout, tiny
from pixeldit_jax import config_lib
from pixeldit_jax.model import layers, pixeldit
from pixeldit_jax.train import repa


@pytest.mark.parametrize("scan", [True, False])
def test_capture_block_returns_the_tokens_after_block_k(scan):
  cfg = tiny(patch_depth=3, scan_layers=scan, remat_policy="full" if scan else "none")
  model = perturb(pixeldit.build(cfg))
  x, t, y = inputs(cfg)
  out = nnx.jit(lambda m, *a: m(*a))(model, x, t, y)
  out2, feats = nnx.jit(lambda m, *a: m(*a, capture_block=2))(model, x, t, y)
  assert max_abs(out, out2) == 0.0  # capturing changes nothing else
  # Reference: run the first two blocks one by one.
  s = model.patch_embed(x)
  cond = nnx.silu(model.t_embedder(t)[:, None] + model.y_embedder(y)[:, None])
  rope = tuple(jnp.asarray(a) for a in layers.rope_2d_table(cfg.head_dim, 4, 6))
  graphdef, stacked = nnx.split(model.patch_blocks)
  for i in range(2):
    s = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked))(s, cond, rope)
  assert feats.shape == (2, 24, cfg.hidden_size)
  assert max_abs(s, feats) < 1e-5
  with pytest.raises(ValueError, match="outside"):
    model(x, t, y, capture_block=4)


def test_projector_layout_and_grad():
  proj = repa.Projector(32, 48, 16, rngs=nnx.Rngs(params=0))
  params = nnx.to_pure_dict(nnx.state(proj, nnx.Param))
  assert {k: v["kernel"].shape for k, v in params.items()} == {
      "fc1": (32, 48), "fc2": (48, 48), "fc3": (48, 16)}
  out = proj(jnp.ones((2, 5, 32)))
  assert out.shape == (2, 5, 16) and out.dtype == jnp.float32


def test_grid_matching_matches_torch():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8 * 6, 5)).astype(np.float32)
  tx = torch.from_numpy(x).reshape(2, 8, 6, 5).permute(0, 3, 1, 2)
  pooled = torch.nn.functional.adaptive_avg_pool2d(tx, (4, 3)).permute(0, 2, 3, 1).reshape(2, 12, 5)
  assert max_abs(repa.resize_tokens(jnp.asarray(x), (8, 6), (4, 3), "avgpool"), pooled.numpy()) < 1e-6
  for target in [(4, 3), (16, 12), (5, 7)]:
    ref = torch.nn.functional.interpolate(tx, size=target, mode="bilinear", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(2, -1, 5).numpy()
    assert max_abs(repa.resize_tokens(jnp.asarray(x), (8, 6), target, "bilinear"), ref) < 1e-5, target
  with pytest.raises(ValueError, match="integer"):
    repa.resize_tokens(jnp.asarray(x), (8, 6), (3, 3), "avgpool")


def _cos(a, b):
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return np.sum(a * b, -1)


def test_loss_forms():
  rng = np.random.default_rng(1)
  s = rng.standard_normal((2, 16, 8)).astype(np.float32)
  t = rng.standard_normal((2, 16, 8)).astype(np.float32)
  # Same grid: c2i is 1 - cos, t2i is -cos; identical gradients.
  c2i = float(repa.loss(jnp.asarray(s), (4, 4), jnp.asarray(t), (4, 4), "c2i"))
  t2i = float(repa.loss(jnp.asarray(s), (4, 4), jnp.asarray(t), (4, 4), "t2i"))
  np.testing.assert_allclose(c2i, np.mean(1 - _cos(s, t)), rtol=1e-5)
  np.testing.assert_allclose(t2i, -np.mean(_cos(s, t)), rtol=1e-5)
  g1 = jax.grad(lambda a: repa.loss(a, (4, 4), jnp.asarray(t), (4, 4), "c2i"))(jnp.asarray(s))
  g2 = jax.grad(lambda a: repa.loss(a, (4, 4), jnp.asarray(t), (4, 4), "t2i"))(jnp.asarray(s))
  assert max_abs(g1, g2) < 1e-6
  # The teacher gets no gradient.
  assert float(jnp.abs(jax.grad(lambda b: repa.loss(jnp.asarray(s), (4, 4), b, (4, 4)))(jnp.asarray(t))).max()) == 0
  # Student grid larger (512 px student 32x32 vs 16x16 teacher): c2i pools the student.
  big = rng.standard_normal((2, 64, 8)).astype(np.float32)
  pooled = big.reshape(2, 4, 2, 4, 2, 8).mean((2, 4)).reshape(2, 16, 8)
  np.testing.assert_allclose(float(repa.loss(jnp.asarray(big), (8, 8), jnp.asarray(t), (4, 4), "c2i")),
                             np.mean(1 - _cos(pooled, t)), rtol=1e-5)
  # t2i normalises, resizes (a 2x bilinear downsample is a 2x2 mean), normalises again.
  n = big / np.linalg.norm(big, axis=-1, keepdims=True)
  n = n.reshape(2, 4, 2, 4, 2, 8).mean((2, 4)).reshape(2, 16, 8)
  np.testing.assert_allclose(float(repa.loss(jnp.asarray(big), (8, 8), jnp.asarray(t), (4, 4), "t2i")),
                             -np.mean(_cos(n, t)), rtol=1e-5)
  with pytest.raises(ValueError, match="loss_form"):
    repa.loss(jnp.asarray(s), (4, 4), jnp.asarray(t), (4, 4), "l2")


@pytest.mark.parametrize("spec,hidden,res,grid", [
    ("configs/imagenet256_xl.py", 1152, 256, 16), ("configs/imagenet256_xl.py:size=B", 768, 256, 16),
    ("configs/imagenet256_xl.py:size=L", 1024, 256, 16), ("configs/imagenet512_xl.py", 1152, 512, 32)])
def test_recipe_configs_build_with_repa(spec, hidden, res, grid):
  config = config_lib.load(spec)
  config_lib.validate(config)
  r, t = config.repa, config.train
  assert (r.weight, r.block, r.loss_form, r.teacher_dim) == (0.5, 8, "c2i", 768)
  assert config.batch_size == 256 and t.lr == 1e-4 and t.ema_decay == 0.9999
  assert (t.time_shift, t.grad_clip) == ((1.0, 1.0) if res == 256 else (3.0, 0.5))
  model_cfg = config_lib.model_config(config)
  model = pixeldit.abstract(model_cfg)
  assert model_cfg.hidden_size == hidden
  proj = nnx.eval_shape(lambda: repa.make_projector(model_cfg, r))
  shapes = {k: v["kernel"].shape for k, v in nnx.to_pure_dict(nnx.state(proj, nnx.Param)).items()}
  assert shapes == {"fc1": (hidden, hidden), "fc2": (hidden, hidden), "fc3": (hidden, 768)}
  # Teacher input 14 H / 16: the DINOv2 grid equals the patch grid.
  assert 14 * res // 16 // 14 == grid == res // model_cfg.patch_size
  del model


def test_missing_teacher_stops_the_run_at_start(tmp_path):
  from pixeldit_jax.train import trainer
  config = config_lib.load("configs/tiny.py")
  config.repa.weight = 0.5
  config.repa.block = 1
  with pytest.raises(FileNotFoundError, match=r"repa.teacher_path.*repa.weight=0"):
    trainer.train(config, str(tmp_path / "run"), max_steps=1)
  config.repa.teacher_path = str(tmp_path / "nowhere" / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    trainer.train(config, str(tmp_path / "run"), max_steps=1)
  assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def write_tiny_teacher(path, hidden=64, depth=2, image_size=56):
  """A random ViT teacher in the torch.hub layout (heads of 64, as DINOv2's)."""
  from pixeldit_jax.teacher import dinov2
  cfg = dinov2.Dinov2Config(hidden_size=hidden, depth=depth, num_heads=max(1, hidden // 64),
                            image_size=image_size, dtype="float32")
  _, params = nnx.split(jax.jit(lambda: dinov2.Dinov2(cfg, rngs=nnx.Rngs(3)))(), nnx.Param)
  return dinov2.save_hub_safetensors(str(path), params, cfg)


def test_repa_training_on_8_devices_matches_one_device_and_resumes(tmp_path):
  """REPA in the jitted step on meshes (1,1,1) and (2,2,2): same flow and REPA losses; the
  projector is trained, checkpointed and restored onto another mesh."""
  import json, os, subprocess, sys
  teacher = write_tiny_teacher(tmp_path / "teacher.safetensors")
  code = f"""
import json, sys
sys.path.insert(0, "tests")
import jax, numpy as np
from test_train import small_config
from pixeldit_jax import checkpoint as ckpt_lib
from pixeldit_jax.train import trainer
import pixeldit_jax.sharding as sh

def cfg(**kw):
  c = small_config(**kw)
  c.repa.update(dict(weight=0.5, block=1, teacher_dim=64, teacher_path="{teacher}", teacher_dtype="float32"))
  return c

out = {{}}
orig = sh.make_mesh
for shape in [(1, 1, 1), (2, 2, 2)]:
  c = cfg(num_steps=2, checkpoint_every=1)
  c.sharding.mesh_shape = shape
  sh.make_mesh = (lambda s, devices=None, dcn_shape=None: orig(s, devices=jax.devices()[:1])) if shape == (1, 1, 1) else orig
  out[str(shape)] = trainer.train(c, "{tmp_path}/m" + "".join(map(str, shape)))["losses"]
sh.make_mesh = orig
repa_losses = [json.loads(l)["repa_loss"] for l in open("{tmp_path}/m222/metrics.jsonl")]
# Resume the (2, 2, 2) run on an FSDP mesh for one more step: the projector comes back and trains on.
d = "{tmp_path}/m222/checkpoints"
c = cfg(num_steps=3, checkpoint_every=1)
c.sharding.mesh_shape = (1, 8, 1)
moved = trainer.train(c, "{tmp_path}/m222")
items = sorted(ckpt_lib.items(d))
proj2 = ckpt_lib.load_params(d, None, ckpt_lib.REPA_PROJECTOR, step=2)
proj3 = ckpt_lib.load_params(d, None, ckpt_lib.REPA_PROJECTOR, step=3)
change = float(np.abs(np.asarray(proj3["fc1"]["kernel"]) - np.asarray(proj2["fc1"]["kernel"])).max())
print(json.dumps({{"losses": out, "repa": repa_losses, "items": items, "change": change,
                   "moved": moved["losses"], "start": moved["start_step"]}}))
"""
  repo = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
  env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
  res = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout(600))
  assert res.returncode == 0, res.stderr[-4000:]
  got = json.loads(res.stdout.strip().splitlines()[-1])
  one, eight = got["losses"]["(1, 1, 1)"], got["losses"]["(2, 2, 2)"]
  for s in ("0", "1"):
    assert eight[s] == pytest.approx(one[s], rel=2e-5)  # fp32 sums in another order per layout
  # Cosine losses of an untrained projector sit near 1 (c2i form); weighted into the total.
  assert all(0.0 < r < 2.0 for r in got["repa"])
  assert "repa_projector" in got["items"] and got["change"] > 0
  assert got["start"] == 2 and np.isfinite(got["moved"]["2"])


def test_precomputed_teacher_features_give_the_same_step_as_the_teacher(tmp_path):
  """repa_features writes the teacher's features in source order; training from them gives the
  same losses as running the teacher in the step (no augmentation)."""
  import sys
  sys.path.insert(0, "tests")
  from test_train import small_config
  from pixeldit_jax.train import repa_features, trainer
  teacher = write_tiny_teacher(tmp_path / "teacher.safetensors")

  def cfg():
    c = small_config(num_steps=2, checkpoint_every=100)
    c.data.num_records = 64
    c.repa.update(dict(weight=0.5, block=1, teacher_dim=64, teacher_path=teacher, teacher_dtype="float32"))
    return c

  path = repa_features.precompute(cfg(), str(tmp_path / "features.npy"), batch_size=16)
  table = np.load(path)
  assert table.dtype == np.float16 and table.shape == (64, 4, 64)  # 8x8 images, patch 4: 2x2 grid
  live = trainer.train(cfg(), str(tmp_path / "live"))["losses"]
  c = cfg()
  c.repa.features_path = path
  pre = trainer.train(c, str(tmp_path / "pre"))["losses"]
  for s in (0, 1):
    assert pre[s] == pytest.approx(live[s], abs=2e-3)  # float16 storage of the targets
  c.repa.features_path = str(tmp_path / "missing.npy")
  with pytest.raises(FileNotFoundError, match="repa_features"):
    trainer.train(c, str(tmp_path / "x"))
