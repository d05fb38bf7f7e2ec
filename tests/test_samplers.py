"""Samplers on a velocity field known in closed form.

Data x ~ N(mu, s^2 I), noise eps ~ N(0, I), x_t = t x + (1 - t) eps. The exact velocity is
v(x_t, t) = mu + (t s^2 - (1 - t)) (x_t - t mu) / (t^2 s^2 + (1 - t)^2), and the ODE started at
x_0 = eps ends exactly at mu + s eps. Each sampler's error must shrink at its order as steps grow.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixeldit_jax.diffusion import samplers

MU, S = 0.7, 0.3


def gaussian_velocity(x, t, cond):
  t = t.reshape(-1, *([1] * (x.ndim - 1)))
  mu = MU + 0.0 * cond.reshape(-1, *([1] * (x.ndim - 1)))
  return mu + (t * S ** 2 - (1 - t)) * (x - t * mu) / (t ** 2 * S ** 2 + (1 - t) ** 2)


NOISE = jax.random.normal(jax.random.PRNGKey(0), (64, 4, 4, 1))
COND = jnp.zeros((64,), jnp.int32)
EXACT = MU + S * NOISE


def error(name, steps, shift=1.0):
  out = samplers.sample(name, gaussian_velocity, NOISE, COND, num_steps=steps, shift=shift)
  return float(jnp.max(jnp.abs(out - EXACT)))


@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2), ("ab2", 2)])
def test_convergence_order(name, order):
  errs = [error(name, n) for n in (16, 32, 64)]
  ratios = [errs[0] / errs[1], errs[1] / errs[2]]
  assert errs[2] < errs[0]
  for r in ratios:
    assert 2 ** order * 0.75 < r < 2 ** order * 1.35, (errs, ratios)


@pytest.mark.parametrize("name", ["euler", "heun", "heun_released", "ab2"])
def test_shifted_grids_converge(name):
  assert error(name, 200, shift=3.0) < error(name, 25, shift=3.0) / 4


def test_ab2_is_exact_for_a_constant_velocity():
  v = jnp.full(NOISE.shape, 0.37)
  out = samplers.ab2(lambda x, t, c: v, NOISE, COND, num_steps=7, shift=2.0)
  np.testing.assert_allclose(out, NOISE + 0.37, atol=1e-6)


def test_time_grid_is_the_released_one():
  np.testing.assert_allclose(samplers.time_grid(4), [0, 0.25, 0.5, 0.75, 1.0])
  t = np.array([0, 0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(samplers.time_grid(4, 2.0), t / (t + (1 - t) * 2.0), rtol=1e-6)


def _class_velocity(x, t, cond):
  # Conditional field: the null class 10 pulls to 0, class c to c / 10.
  target = jnp.where(cond == 10, 0.0, cond / 10.0).reshape(-1, 1, 1, 1)
  return (target - x) * jnp.ones_like(t).reshape(-1, 1, 1, 1)


def test_cfg_scale_one_is_the_conditional_sample_and_guidance_is_applied_in_the_interval():
  cond = jnp.full((64,), 5, jnp.int32)
  uncond = jnp.full((64,), 10, jnp.int32)
  for name in ("euler", "heun", "heun_released", "ab2"):
    plain = samplers.sample(name, _class_velocity, NOISE, cond, num_steps=10)
    w1 = samplers.sample(name, _class_velocity, NOISE, cond, uncond, num_steps=10, cfg_scale=1.0)
    np.testing.assert_allclose(w1, plain, atol=1e-6)
    w3 = samplers.sample(name, _class_velocity, NOISE, cond, uncond, num_steps=10, cfg_scale=3.0)
    assert float(jnp.max(jnp.abs(w3 - plain))) > 1e-2
    # An empty interval turns guidance off everywhere.
    off = samplers.sample(name, _class_velocity, NOISE, cond, uncond, num_steps=10, cfg_scale=3.0,
                          interval=(0.5, 0.5))
    np.testing.assert_allclose(off, plain, atol=1e-6)


def test_guidance_interval_is_strict():
  calls = []
  cond, uncond = jnp.ones((2,), jnp.int32), jnp.zeros((2,), jnp.int32)

  def apply(x, t, c):
    return jnp.where(c.reshape(-1, 1) == 1, 1.0, 0.0) * jnp.ones_like(x)

  x = jnp.zeros((2, 3))
  inside = samplers.guided(apply, x, 0.5, cond, uncond, 4.0, (0.1, 0.9))
  at_edge = samplers.guided(apply, x, 0.1, cond, uncond, 4.0, (0.1, 0.9))
  np.testing.assert_allclose(inside, 4.0)  # 0 + 4 (1 - 0)
  np.testing.assert_allclose(at_edge, 1.0)  # conditional only at t = t_min


def sigma_velocity(x, time_1000, cond):
  """The same Gaussian in the T2I convention: sigma = 1 - t and v_sigma = -v_t."""
  t = 1.0 - time_1000 / 1000.0
  return -gaussian_velocity(x, t, cond)


def _dpm_reference(v_fn, x, cond, n, shift=1.0):
  """DPM-Solver++(2M), written step by step from its definition in (alpha, sigma, lambda)."""
  sig = np.asarray(samplers.sigma_grid(n, shift), np.float64)
  x = np.asarray(x, np.float64)
  prev = None
  for i in range(n):
    s, t = sig[i], sig[i + 1]
    x0 = x - s * np.asarray(v_fn(jnp.asarray(x, jnp.float32), jnp.full((x.shape[0],), 1000 * s), cond), np.float64)
    if t == 0:
      x = x0  # first-order final step into sigma = 0: x_0 = D
      break
    lam_s, lam_t = np.log((1 - s) / s), np.log((1 - t) / t)
    h = lam_t - lam_s
    if prev is None:
      d = x0
    else:
      r = prev[1] / h
      d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev[0]
    x = (t / s) * x - (1 - t) * (np.exp(-h) - 1) * d
    prev = (x0, h)
  return x


def test_dpm_solver_pp_2m_matches_its_definition_and_converges():
  for n, shift in ((6, 1.0), (9, 4.0)):
    out = samplers.dpm_solver_pp_2m(sigma_velocity, NOISE, COND, num_steps=n, shift=shift)
    np.testing.assert_allclose(out, _dpm_reference(sigma_velocity, NOISE, COND, n, shift), atol=2e-5)
  # The grid starts at sigma = 0.999; the exact endpoint of the ODE from that point:
  t0 = 1 - 0.999
  exact = MU + S * (NOISE - t0 * MU) / np.sqrt(t0 ** 2 * S ** 2 + (1 - t0) ** 2)
  errs = [float(jnp.max(jnp.abs(samplers.dpm_solver_pp_2m(sigma_velocity, NOISE, COND, num_steps=n) - exact)))
          for n in (10, 40, 160)]
  # The first-order final step into sigma = 0 makes the global error O(1/N) (SANA's setting).
  assert errs[0] > errs[1] > errs[2] and errs[2] < 2e-3, errs


def test_sigma_grid_runs_from_shifted_0999_to_zero():
  g = np.asarray(samplers.sigma_grid(5, shift=4.0))
  assert g[-1] == 0 and g[0] == pytest.approx(4 * 0.999 / (1 + 3 * 0.999))
  assert np.all(np.diff(g) < 0)


def test_to_uint8_rounding():
  np.testing.assert_array_equal(samplers.to_uint8(jnp.array([-1.0, 0.0, 1.0, 2.0])), [0, 128, 255, 255])


def _linear_velocity(x, t, cond):
  # Linear in x and t, with a class-dependent offset so that CFG changes the result.
  t = t.reshape(-1, *([1] * (x.ndim - 1)))
  c = cond.reshape(-1, *([1] * (x.ndim - 1))).astype(jnp.float32)
  return 0.3 * c - (0.8 + 0.5 * t) * x + 0.2 * t


def _released_heun_reference(x, cond, uncond, n, shift, w, lo, hi):
  """The released HeunSampler (exact_henu=False, ODE step) transcribed in NumPy float64."""
  grid = np.concatenate([np.linspace(0.0, 1.0 - 1.0 / n, n), [1.0]])
  grid = grid / (grid + (1 - grid) * shift)

  def vel(x, t):
    def f(c):
      return np.asarray(_linear_velocity(jnp.asarray(x), jnp.full((x.shape[0],), t), c), np.float64)
    if uncond is None:
      return f(cond)
    vu, vc = f(uncond), f(cond)
    return vu + w * (vc - vu) if lo < t < hi else vc

  x = np.asarray(x, np.float64)
  v_hat = None
  for i in range(n):
    dt = grid[i + 1] - grid[i]
    v = vel(x, grid[i]) if i == 0 else v_hat
    x_hat = x + dt * v
    if i < n - 1:
      v_hat = vel(x_hat, grid[i + 1])
      x = x + dt * (v + v_hat) / 2
    else:
      x = x_hat  # the last step is Euler with the reused velocity
  return x


@pytest.mark.parametrize("n,shift,cfg,interval", [
    (1, 1.0, 1.0, (0.0, 1.0)), (7, 1.0, 1.0, (0.0, 1.0)), (10, 2.0, 3.0, (0.1, 0.9))])
def test_heun_released_matches_a_transcription_of_the_released_rule(n, shift, cfg, interval):
  cond, uncond = jnp.full((64,), 2, jnp.int32), jnp.full((64,), -1, jnp.int32)
  use_cfg = cfg != 1.0
  out = samplers.sample("heun_released", _linear_velocity, NOISE, cond, uncond if use_cfg else None,
                        num_steps=n, cfg_scale=cfg, interval=interval, shift=shift)
  ref = _released_heun_reference(NOISE, cond, uncond if use_cfg else None, n, shift, cfg, *interval)
  np.testing.assert_allclose(out, ref, atol=2e-5)
  # It is not the textbook method (which also corrects the last step).
  if n > 1:
    textbook = samplers.sample("heun", _linear_velocity, NOISE, cond, uncond if use_cfg else None,
                               num_steps=n, cfg_scale=cfg, interval=interval, shift=shift)
    assert float(jnp.max(jnp.abs(textbook - out))) > 1e-3


def test_heun_released_evaluates_the_model_once_per_step():
  calls = []

  def counting(x, t, c):
    calls.append(1)  # traced once per call site: scan bodies count once
    return _linear_velocity(x, t, c)

  # Step 0's evaluation, one in the scanned body and none in the final Euler step.
  samplers.heun_released(counting, NOISE, COND, num_steps=5)
  assert len(calls) == 2


def test_config_accepts_heun_released_only_for_the_class_conditional_convention():
  from pixeldit_jax import config_lib  # noqa: PLC0415
  c = config_lib.load("configs/imagenet256_xl.py")
  c.sample.sampler = "heun_released"
  config_lib.validate(c)
  t2i = config_lib.load("configs/t2i_1024.py")
  t2i.sample.sampler = "heun_released"
  with pytest.raises(ValueError, match="sample.sampler"):
    config_lib.validate(t2i)
