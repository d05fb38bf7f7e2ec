"""Editing: FlowEdit, image-to-image and inpainting (diffusion/editing.py) and `pixeldit_jax.edit`.

Random-weight tiny models in both time conventions, saved as checkpoints the way the importer
writes them; the text-to-image one gets a stand-in for the text encoder.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from helpers import TINY, perturb, timeout
from pixeldit_jax import checkpoint as ckpt_lib
from pixeldit_jax import config_lib, edit as edit_lib
from pixeldit_jax.diffusion import editing
from pixeldit_jax.model import PixelDiTConfig, build

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TINY_T2I = dict(patch_size=4, hidden_size=32, num_heads=2, patch_depth=2, pixel_depth=1, pixel_hidden_size=8,
                pixel_attn_size=16, pixel_num_heads=2, text_dim=12, text_length=5)
CONFIG_FILE = """
from pixeldit_jax import config_lib
from pixeldit_jax.model import PixelDiTConfig
def get_config():
  c = config_lib.base_config()
  c.image_size = (8, 8)
  c.model = config_lib.model_dict(PixelDiTConfig(**{tiny!r}))
  c.sample.update(dict(sampler="ab2", num_steps=4, cfg_scale=2.0, cfg_interval=(0.0, 1.0)))
  return c
"""


def _save(tmp, cfg, convention):
  model = perturb(build(cfg), 0.2)
  ckpt = str(tmp / "ckpt")
  ckpt_lib.save_weights(ckpt, 1, {ckpt_lib.EMA_PARAMS: ckpt_lib.param_dict(model)},
                        {"model": cfg.to_dict(), "time_convention": convention})
  return model, ckpt


@pytest.fixture(scope="module")
def c2i(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("c2i")
  cfg = PixelDiTConfig(**TINY)
  model, ckpt = _save(tmp, cfg, editing.C2I)
  (tmp / "config.py").write_text(CONFIG_FILE.format(tiny=TINY))
  config = config_lib.load(str(tmp / "config.py"))
  return config, model, ckpt, str(tmp / "config.py")


@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("t2i")
  cfg = PixelDiTConfig(**TINY_T2I)
  model, ckpt = _save(tmp, cfg, editing.T2I)
  config = config_lib.base_config()
  config.image_size = (8, 8)
  config.model = config_lib.model_dict(cfg)
  config.sample.update(dict(sampler="dpm_solver_pp_2m", num_steps=4, cfg_scale=2.0, cfg_interval=(0.0, 1.0),
                            time_shift=2.0))
  config.sample.negative_prompt = ""
  return config, model, ckpt


class FakeText:
  """Stands in for TextConditioning: a fixed embedding per prompt."""

  def embed(self, prompts, null=False):
    def one(p):
      seed = 0 if null else sum(map(ord, p))
      return np.random.default_rng(seed).standard_normal((5, 12)).astype(np.float32)
    return np.stack([one(p) for p in prompts])


def _editor(model, convention, sampler, steps=4, shift=1.0):
  graphdef, params = nnx.split(model, nnx.Param)
  fn = lambda p, x, t, c: nnx.merge(graphdef, p)(x, t, c)
  return editing.Editor(fn, convention, sampler=sampler, num_steps=steps, shift=shift), params


def _images(n=2, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), (n, 8, 8, 3), minval=-1.0, maxval=1.0)


@pytest.mark.parametrize("sampler", ["heun_released"])  # its last step is `finish`
def test_img2img_and_inpaint_on_the_class_model(c2i, sampler):
  _, model, _, _ = c2i
  ed, params = _editor(model, editing.C2I, sampler)
  x = _images()
  y, null = jnp.array([1, 3]), jnp.array([5, 5])
  same = ed.img2img(params, x, y, null, strength=0.0, cfg_scale=2.0)
  np.testing.assert_array_equal(same, x)  # zero strength: the source itself
  ticks = []
  out = ed.img2img(params, x, y, null, strength=0.5, cfg_scale=2.0, progress=lambda: ticks.append(1))
  assert out.shape == x.shape and np.isfinite(np.asarray(out)).all()
  assert len(ticks) == ed.count_steps("img2img", strength=0.5) == 2
  assert float(jnp.abs(out - x).max()) > 1e-3
  mask = jnp.zeros((2, 8, 8, 1), bool).at[:, 2:6, 1:5].set(True)
  painted = ed.inpaint(params, x, mask, y, null, strength=1.0, cfg_scale=2.0)
  outside = ~np.asarray(mask)[..., 0]
  np.testing.assert_array_equal(np.asarray(painted)[outside], np.asarray(x)[outside])
  assert float(jnp.abs(painted - x)[:, 2:6, 1:5].max()) > 1e-3
  # Per-image noise: the first image's edit does not depend on the batch it is in.
  alone = ed.img2img(params, x[:1], y[:1], null[:1], strength=0.5, cfg_scale=2.0)
  np.testing.assert_allclose(alone, out[:1], atol=1e-5)


def test_img2img_at_full_strength_is_sampling(c2i):
  from pixeldit_jax.diffusion import samplers  # noqa: PLC0415
  _, model, _, _ = c2i
  ed, params = _editor(model, editing.C2I, "euler", steps=3, shift=2.0)
  x, y, null = _images(1), jnp.array([2]), jnp.array([5])
  out = ed.img2img(params, x, y, null, strength=1.0, cfg_scale=2.0, seed=4)
  eps = editing._noise(ed._keys(1, 4, None), editing._START, 0, x.shape[1:])  # noqa: SLF001
  graphdef, _ = nnx.split(model, nnx.Param)
  ref = jax.jit(lambda p: samplers.euler(lambda a, t, c: nnx.merge(graphdef, p)(a, t, c), eps, y, null,
                                         num_steps=3, cfg_scale=2.0, shift=2.0))(nnx.to_pure_dict(params))
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_flowedit_is_jitted_once_and_keeps_the_source_for_the_same_condition(c2i, t2i):
  _, model, _, _ = c2i
  traces = []
  graphdef, params = nnx.split(model, nnx.Param)

  def fn(p, x, t, c):
    traces.append(1)  # once per trace of a call site
    return nnx.merge(graphdef, p)(x, t, c)

  ed = editing.Editor(fn, editing.C2I, sampler="ab2", num_steps=6)
  x, y, null = _images(), jnp.array([1, 4]), jnp.array([5, 5])
  same = ed.flowedit(params, x, y, y, null, n_max=5, src_cfg=2.0, tar_cfg=2.0)
  np.testing.assert_allclose(same, x, atol=1e-4)
  assert len(traces) == 2  # the source and target calls of one step function, for all 5 steps
  moved = ed.flowedit(params, x, y, jnp.array([3, 0]), null, n_max=5, n_min=2, n_avg=2, src_cfg=1.5, tar_cfg=3.0)
  assert moved.shape == x.shape and float(jnp.abs(moved - x).max()) > 1e-3
  _, tmodel, _ = t2i
  ted, tparams = _editor(tmodel, editing.T2I, "dpm_solver_pp_2m", steps=5, shift=3.0)
  text = jnp.asarray(FakeText().embed(["a", "b"]))
  neg = jnp.asarray(FakeText().embed(["", ""], null=True))
  np.testing.assert_allclose(ted.flowedit(tparams, x, text, text, neg, n_max=4, src_cfg=3.0, tar_cfg=3.0),
                             x, atol=1e-4)
  with pytest.raises(ValueError, match="n_min < n_max"):
    ted.flowedit(tparams, x, text, text, neg, n_max=6, src_cfg=1.0, tar_cfg=1.0)


def test_edit_api_text_to_image_all_methods(t2i, tmp_path):
  config, _, ckpt = t2i
  rng = np.random.default_rng(0)
  src = rng.integers(0, 256, (8, 8, 3), np.uint8)
  mask = np.zeros((8, 8), np.uint8)
  mask[:4] = 255
  kw = dict(checkpoint=ckpt, image=src, source="a red bag", target="a blue bag", cond=FakeText(), progress=False)
  r = edit_lib.edit(config, method="flowedit", out=str(tmp_path / "fe"), **kw)
  assert r["image"].shape == (8, 8, 3) and r["image"].dtype == np.uint8
  settings = json.load(open(tmp_path / "fe" / "settings.json"))
  assert settings["n_max"] == 3 and settings["method"] == "flowedit" and settings["time_convention"] == "t2i_sigma"
  assert Image.open(tmp_path / "fe" / "panel.png").size[0] > Image.open(tmp_path / "fe" / "edited.png").size[0]
  ident = edit_lib.edit(config, method="img2img", strength=0.0, **kw)
  np.testing.assert_array_equal(ident["image"], src)
  painted = edit_lib.edit(config, method="inpaint", mask=mask, **kw)["image"]
  np.testing.assert_array_equal(painted[4:], src[4:])
  assert (painted[:4] != src[:4]).any()
  # A wrong size is refused, or fitted on request.
  big = rng.integers(0, 256, (12, 20, 3), np.uint8)
  with pytest.raises(edit_lib.UserError, match="20x12.*8x8.*--resize"):
    edit_lib.edit(config, method="img2img", **{**kw, "image": big})
  fitted = edit_lib.edit(config, method="img2img", resize="center_crop", **{**kw, "image": big})
  assert fitted["source"].shape == (8, 8, 3)


def _cli(args, env_extra=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
  return subprocess.run([sys.executable, "-m", "pixeldit_jax.edit", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout(300))


def test_cli_end_to_end_and_the_wrong_size_error(c2i, tmp_path):
  _, _, ckpt, config_path = c2i
  rng = np.random.default_rng(1)
  Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(tmp_path / "in.png")
  mask = np.zeros((8, 8), np.uint8)
  mask[2:6, 2:6] = 255
  Image.fromarray(mask).save(tmp_path / "mask.png")
  Image.fromarray(rng.integers(0, 256, (10, 8, 3), np.uint8)).save(tmp_path / "big.png")
  out = tmp_path / "out"
  res = _cli([f"--config={config_path}", f"--checkpoint={ckpt}", f"--image={tmp_path / 'in.png'}",
              f"--mask={tmp_path / 'mask.png'}", "--target=2", "--method=inpaint", f"--out={out}", "--seed=3"])
  assert res.returncode == 0, res.stderr[-3000:]
  edited = np.asarray(Image.open(out / "edited.png"))
  src = np.asarray(Image.open(tmp_path / "in.png"))
  keep = mask == 0
  np.testing.assert_array_equal(edited[keep], src[keep])
  settings = json.load(open(out / "settings.json"))
  assert settings["method"] == "inpaint" and settings["target"] == 2 and settings["seed"] == 3
  assert os.path.isfile(out / "panel.png")
  bad = _cli([f"--config={config_path}", f"--checkpoint={ckpt}", f"--image={tmp_path / 'big.png'}",
              "--source=1", "--target=2", f"--out={tmp_path / 'o2'}"])
  assert bad.returncode == 2
  lines = [l for l in bad.stderr.splitlines() if l.strip()]
  assert lines[-1].startswith("error: --image") and "8x10" in lines[-1] and "--resize" in lines[-1], bad.stderr[-2000:]
