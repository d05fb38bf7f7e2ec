"""ODE samplers: pure functions of (model apply, noise, conditioning, schedule settings).

ImageNet convention (spec §4.1, §5.1): t runs from 0 (noise) to 1 (data), `apply(x, t, cond)`
returns the velocity x - eps. The grid is linspace(0, 1 - 1/N, N) with 1.0 appended, then
time-shifted. Samplers: `ab2` (the released "FlowDPMSolver": Adams-Bashforth 2 on the velocity,
first step Euler, fixed 1.5/-0.5 weights as released), `euler`, `heun` (textbook) and
`heun_released` (the released HeunSampler's default: the corrector evaluation is reused as the
next predictor, and the last step is Euler).

Text-to-image convention (spec §7.4): sigma runs from ~1 (noise) to 0 (data), `apply(x, 1000 *
sigma, cond)` returns eps - x0 and x0 = x - sigma * v. Sampler: `dpm_solver_pp_2m` (multistep
DPM-Solver++ of order 2 in data prediction, first-order final step).

Classifier-free guidance runs the unconditional and conditional halves in one forward pass
(uncond first, as released) and applies v_u + w (v_c - v_u) strictly inside the interval; outside
it the conditional prediction is used alone. `cond`/`uncond` are arrays (class labels or text
embeddings) with a leading batch axis.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from pixeldit_jax.diffusion.flow import sigma_shift, time_shift

SAMPLERS = ("ab2", "euler", "heun", "heun_released")  # ImageNet convention
SIGMA_SAMPLERS = ("dpm_solver_pp_2m",)  # text-to-image (sigma) convention


def time_grid(num_steps: int, shift: float = 1.0) -> jax.Array:
  """linspace(0, 1 - 1/N, N) with 1.0 appended, then shifted (the released sampler's grid)."""
  grid = jnp.concatenate([jnp.linspace(0.0, 1.0 - 1.0 / num_steps, num_steps), jnp.ones((1,))])
  return time_shift(grid, shift)


def guided(apply: Callable, x, time, cond, uncond, cfg_scale: float, interval=(0.0, 1.0)):
  """Prediction at scalar `time` with CFG when interval[0] < time < interval[1] (strict)."""
  n = x.shape[0]
  tt = jnp.full((n,), time, jnp.float32)
  if cfg_scale == 1.0 or uncond is None:
    return apply(x, tt, cond)
  both = apply(jnp.concatenate([x, x]), jnp.concatenate([tt, tt]), jnp.concatenate([uncond, cond]))
  out_u, out_c = both[:n], both[n:]
  inside = (time > interval[0]) & (time < interval[1])
  return jnp.where(inside, out_u + cfg_scale * (out_c - out_u), out_c)


def _velocity_fn(apply, cond, uncond, cfg_scale, interval):
  return lambda x, t: guided(apply, x, t, cond, uncond, cfg_scale, interval)


def euler(apply: Callable, noise, cond, uncond=None, *, num_steps: int, cfg_scale: float = 1.0,
          interval=(0.0, 1.0), shift: float = 1.0) -> jax.Array:
  """Explicit Euler from t = 0 to 1 (first order)."""
  grid, v = time_grid(num_steps, shift), _velocity_fn(apply, cond, uncond, cfg_scale, interval)

  def step(x, i):
    return x + (grid[i + 1] - grid[i]) * v(x, grid[i]), None

  return jax.lax.scan(step, noise, jnp.arange(num_steps))[0]


def heun(apply: Callable, noise, cond, uncond=None, *, num_steps: int, cfg_scale: float = 1.0,
         interval=(0.0, 1.0), shift: float = 1.0) -> jax.Array:
  """Heun's method (explicit trapezoid; second order, two evaluations per step)."""
  grid, v = time_grid(num_steps, shift), _velocity_fn(apply, cond, uncond, cfg_scale, interval)

  def step(x, i):
    t, t_next = grid[i], grid[i + 1]
    v0 = v(x, t)
    x_pred = x + (t_next - t) * v0
    return x + (t_next - t) * 0.5 * (v0 + v(x_pred, t_next)), None

  return jax.lax.scan(step, noise, jnp.arange(num_steps))[0]


def heun_released(apply: Callable, noise, cond, uncond=None, *, num_steps: int,
                  cfg_scale: float = 1.0, interval=(0.0, 1.0), shift: float = 1.0) -> jax.Array:
  """The released HeunSampler with its default exact_henu=False (one evaluation per step).

  Only step 0 evaluates at the current x. Step i predicts x_hat = x + dt v with v the corrector
  evaluation of step i - 1 (taken at that step's x_hat, not at the corrected x), evaluates
  v_hat = v(x_hat, t_{i+1}) and corrects x += dt (v + v_hat) / 2. The last step is plain Euler
  with the carried v and makes no new evaluation, so N steps cost N evaluations. CFG at the
  corrector uses the interval test at t_{i+1}, as released.
  """
  grid, v = time_grid(num_steps, shift), _velocity_fn(apply, cond, uncond, cfg_scale, interval)

  def step(carry, i):
    x, v_pred = carry
    dt = grid[i + 1] - grid[i]
    v_hat = v(x + dt * v_pred, grid[i + 1])
    return (x + dt * 0.5 * (v_pred + v_hat), v_hat), None

  x, v_last = jax.lax.scan(step, (noise, v(noise, grid[0])), jnp.arange(num_steps - 1))[0]
  return x + (grid[num_steps] - grid[num_steps - 1]) * v_last


def ab2(apply: Callable, noise, cond, uncond=None, *, num_steps: int, cfg_scale: float = 1.0,
        interval=(0.0, 1.0), shift: float = 1.0) -> jax.Array:
  """The released "FlowDPMSolver": x += dt (1.5 v_k - 0.5 v_{k-1}), the first step Euler.

  The weights are the fixed-step AB2 weights even on a shifted (non-uniform) grid, as released;
  on a uniform grid (shift 1) the method is second order.
  """
  grid, v = time_grid(num_steps, shift), _velocity_fn(apply, cond, uncond, cfg_scale, interval)

  def step(carry, i):
    x, v_prev = carry
    v_cur = v(x, grid[i])
    slope = jnp.where(i == 0, v_cur, 1.5 * v_cur - 0.5 * v_prev)
    return (x + (grid[i + 1] - grid[i]) * slope, v_cur), None

  return jax.lax.scan(step, (noise, jnp.zeros_like(noise)), jnp.arange(num_steps))[0][0]


def sample(name: str, *args, **kwargs) -> jax.Array:
  """Dispatch by sampler name (one of SAMPLERS)."""
  fns = {"ab2": ab2, "euler": euler, "heun": heun, "heun_released": heun_released}
  if name not in fns:
    raise ValueError(f"Unknown sampler {name!r}; choose one of {sorted(fns)}")
  return fns[name](*args, **kwargs)


# ----------------------------------------------------------------------------- sigma convention

def sigma_grid(num_steps: int, shift: float = 1.0) -> jax.Array:
  """SANA's time_uniform_flow grid: 1 - linspace(1, 0.001, N+1), shifted, reversed (~1 -> 0)."""
  return sigma_shift(1.0 - jnp.linspace(1.0, 0.001, num_steps + 1), shift)[::-1]


def dpm_solver_pp_2m(apply: Callable, noise, cond, uncond=None, *, num_steps: int,
                     cfg_scale: float = 1.0, interval=(0.0, 1.0), shift: float = 1.0) -> jax.Array:
  """Multistep DPM-Solver++(2M) for x_sigma = (1 - sigma) x0 + sigma eps, model time 1000 sigma.

  With alpha = 1 - sigma and lambda = log(alpha / sigma), one step from s to t is
      x_t = (sigma_t / sigma_s) x_s - alpha_t (exp(-h) - 1) D,   h = lambda_t - lambda_s,
  with D = x0(s) for the first and last steps and D = (1 + 1/(2r)) x0(s) - 1/(2r) x0(s_prev),
  r = h_prev / h, otherwise. The last step (to sigma = 0) returns D = x0.
  """
  sigmas = sigma_grid(num_steps, shift)

  def x0_pred(x, sigma):
    v = guided(lambda a, b, c: apply(a, 1000.0 * b, c), x, sigma, cond, uncond, cfg_scale, interval)
    return x - sigma * v

  def lam(sigma):
    return jnp.log(1.0 - sigma) - jnp.log(sigma)

  def step(carry, i):
    x, x0_prev, h_prev = carry
    s, t = sigmas[i], sigmas[i + 1]
    x0 = x0_pred(x, s)
    last = i == num_steps - 1
    h = lam(t) - lam(s)
    r = h_prev / h
    second = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
    d = jnp.where((i == 0) | last, x0, second)
    # At t = 0 (last step) the update is x0 itself; the formula's limit, written out.
    x_next = jnp.where(last, d, (t / s) * x - (1.0 - t) * jnp.expm1(-h) * d)
    return (x_next, x0, h), None

  init = (noise, jnp.zeros_like(noise), jnp.ones((), jnp.float32))
  return jax.lax.scan(step, init, jnp.arange(num_steps))[0][0]


def to_uint8(x: jax.Array) -> jax.Array:
  """[-1, 1] -> uint8 as the released sampler does: clip((x + 1) * 127.5 + 0.5, 0, 255)."""
  return jnp.clip((x + 1.0) * 127.5 + 0.5, 0, 255).astype(jnp.uint8)
