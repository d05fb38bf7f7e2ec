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

Each sampler is a `Stepper` (init, one step, finish) run by a scan; the editing methods
(diffusion/editing.py) run the same steppers from a later step, one jitted step at a time.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

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


class Stepper(NamedTuple):
  """A sampler as pieces, so that it can start part-way (image-to-image) or be run step by step.

  grid[i] is the level (t, or sigma for the sigma samplers) before step i; `init(x, start)` makes
  the carry at grid[start] (carry[0] is always x); `step(carry, i)` advances it to grid[i + 1]
  for i < num_steps; `finish(carry)` gives x at grid[-1] (the released Heun's last step is an
  Euler step made there).
  """
  grid: jax.Array
  init: Callable
  step: Callable
  finish: Callable
  num_steps: int


def run_stepper(st: Stepper, x, start: int = 0) -> jax.Array:
  """The sampler from grid[start] (0: noise) to the end, as one scan."""
  carry = jax.lax.scan(lambda c, i: (st.step(c, i), None), st.init(x, start),
                       jnp.arange(start, st.num_steps))[0]
  return st.finish(carry)


def _first(c):
  return c[0]


def euler_stepper(apply: Callable, cond, uncond=None, *, num_steps: int, cfg_scale: float = 1.0,
                  interval=(0.0, 1.0), shift: float = 1.0) -> Stepper:
  grid, v = time_grid(num_steps, shift), _velocity_fn(apply, cond, uncond, cfg_scale, interval)

  def step(c, i):
    return (c[0] + (grid[i + 1] - grid[i]) * v(c[0], grid[i]),)

  return Stepper(grid, lambda x, start: (x,), step, _first, num_steps)


def heun_stepper(apply: Callable, cond, uncond=None, *, num_steps: int, cfg_scale: float = 1.0,
                 interval=(0.0, 1.0), shift: float = 1.0) -> Stepper:
  grid, v = time_grid(num_steps, shift), _velocity_fn(apply, cond, uncond, cfg_scale, interval)

  def step(c, i):
    x, t, t_next = c[0], grid[i], grid[i + 1]
    v0 = v(x, t)
    x_pred = x + (t_next - t) * v0
    return (x + (t_next - t) * 0.5 * (v0 + v(x_pred, t_next)),)

  return Stepper(grid, lambda x, start: (x,), step, _first, num_steps)


def heun_released_stepper(apply: Callable, cond, uncond=None, *, num_steps: int,
                          cfg_scale: float = 1.0, interval=(0.0, 1.0), shift: float = 1.0) -> Stepper:
  grid, v = time_grid(num_steps, shift), _velocity_fn(apply, cond, uncond, cfg_scale, interval)

  def step(c, i):
    x, v_pred = c
    dt = grid[i + 1] - grid[i]
    v_hat = v(x + dt * v_pred, grid[i + 1])
    return (x + dt * 0.5 * (v_pred + v_hat), v_hat)

  def finish(c):  # the last step: Euler with the carried v, no new evaluation
    return c[0] + (grid[num_steps] - grid[num_steps - 1]) * c[1]

  return Stepper(grid, lambda x, start: (x, v(x, grid[start])), step, finish, num_steps - 1)


def ab2_stepper(apply: Callable, cond, uncond=None, *, num_steps: int, cfg_scale: float = 1.0,
                interval=(0.0, 1.0), shift: float = 1.0) -> Stepper:
  grid, v = time_grid(num_steps, shift), _velocity_fn(apply, cond, uncond, cfg_scale, interval)

  def step(c, i):
    x, v_prev, first = c
    v_cur = v(x, grid[i])
    slope = jnp.where(first, v_cur, 1.5 * v_cur - 0.5 * v_prev)
    return (x + (grid[i + 1] - grid[i]) * slope, v_cur, jnp.zeros((), bool))

  return Stepper(grid, lambda x, start: (x, jnp.zeros_like(x), jnp.ones((), bool)), step, _first,
                 num_steps)


def euler(apply: Callable, noise, cond, uncond=None, **kwargs) -> jax.Array:
  """Explicit Euler from t = 0 to 1 (first order)."""
  return run_stepper(euler_stepper(apply, cond, uncond, **kwargs), noise)


def heun(apply: Callable, noise, cond, uncond=None, **kwargs) -> jax.Array:
  """Heun's method (explicit trapezoid; second order, two evaluations per step)."""
  return run_stepper(heun_stepper(apply, cond, uncond, **kwargs), noise)


def heun_released(apply: Callable, noise, cond, uncond=None, **kwargs) -> jax.Array:
  """The released HeunSampler with its default exact_henu=False (one evaluation per step).

  Only step 0 evaluates at the current x. Step i predicts x_hat = x + dt v with v the corrector
  evaluation of step i - 1 (taken at that step's x_hat, not at the corrected x), evaluates
  v_hat = v(x_hat, t_{i+1}) and corrects x += dt (v + v_hat) / 2. The last step is plain Euler
  with the carried v and makes no new evaluation, so N steps cost N evaluations. CFG at the
  corrector uses the interval test at t_{i+1}, as released.
  """
  return run_stepper(heun_released_stepper(apply, cond, uncond, **kwargs), noise)


def ab2(apply: Callable, noise, cond, uncond=None, **kwargs) -> jax.Array:
  """The released "FlowDPMSolver": x += dt (1.5 v_k - 0.5 v_{k-1}), the first step Euler.

  The weights are the fixed-step AB2 weights even on a shifted (non-uniform) grid, as released;
  on a uniform grid (shift 1) the method is second order.
  """
  return run_stepper(ab2_stepper(apply, cond, uncond, **kwargs), noise)


def sample(name: str, *args, **kwargs) -> jax.Array:
  """Dispatch by sampler name (one of SAMPLERS)."""
  fns = {"ab2": ab2, "euler": euler, "heun": heun, "heun_released": heun_released}
  if name not in fns:
    raise ValueError(f"Unknown sampler {name!r}; choose one of {sorted(fns)}")
  return fns[name](*args, **kwargs)


def stepper(name: str, apply: Callable, cond, uncond=None, **kwargs) -> Stepper:
  """The `Stepper` of any sampler, either convention, by name (SAMPLERS + SIGMA_SAMPLERS)."""
  fns = {"ab2": ab2_stepper, "euler": euler_stepper, "heun": heun_stepper,
         "heun_released": heun_released_stepper, "dpm_solver_pp_2m": dpm_solver_pp_2m_stepper}
  if name not in fns:
    raise ValueError(f"Unknown sampler {name!r}; choose one of {sorted(fns)}")
  return fns[name](apply, cond, uncond, **kwargs)


# ----------------------------------------------------------------------------- sigma convention

def sigma_grid(num_steps: int, shift: float = 1.0) -> jax.Array:
  """SANA's time_uniform_flow grid: 1 - linspace(1, 0.001, N+1), shifted, reversed (~1 -> 0)."""
  return sigma_shift(1.0 - jnp.linspace(1.0, 0.001, num_steps + 1), shift)[::-1]


def sigma_guided(apply: Callable, x, sigma, cond, uncond, cfg_scale: float, interval=(0.0, 1.0)):
  """eps - x0 at scalar `sigma` of a model fed 1000 sigma, with CFG (interval on sigma)."""
  return guided(lambda a, b, c: apply(a, 1000.0 * b, c), x, sigma, cond, uncond, cfg_scale, interval)


def dpm_solver_pp_2m_stepper(apply: Callable, cond, uncond=None, *, num_steps: int,
                             cfg_scale: float = 1.0, interval=(0.0, 1.0), shift: float = 1.0) -> Stepper:
  sigmas = sigma_grid(num_steps, shift)

  def lam(sigma):
    return jnp.log(1.0 - sigma) - jnp.log(sigma)

  def step(c, i):
    x, x0_prev, h_prev, first = c
    s, t = sigmas[i], sigmas[i + 1]
    x0 = x - s * sigma_guided(apply, x, s, cond, uncond, cfg_scale, interval)
    last = i == num_steps - 1
    h = lam(t) - lam(s)
    r = h_prev / h
    second = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
    d = jnp.where(first | last, x0, second)
    # At t = 0 (last step) the update is x0 itself; the formula's limit, written out.
    x_next = jnp.where(last, d, (t / s) * x - (1.0 - t) * jnp.expm1(-h) * d)
    return (x_next, x0, h, jnp.zeros((), bool))

  def init(x, start):
    return (x, jnp.zeros_like(x), jnp.ones((), jnp.float32), jnp.ones((), bool))

  return Stepper(sigmas, init, step, _first, num_steps)


def dpm_solver_pp_2m(apply: Callable, noise, cond, uncond=None, **kwargs) -> jax.Array:
  """Multistep DPM-Solver++(2M) for x_sigma = (1 - sigma) x0 + sigma eps, model time 1000 sigma.

  With alpha = 1 - sigma and lambda = log(alpha / sigma), one step from s to t is
      x_t = (sigma_t / sigma_s) x_s - alpha_t (exp(-h) - 1) D,   h = lambda_t - lambda_s,
  with D = x0(s) for the first and last steps and D = (1 + 1/(2r)) x0(s) - 1/(2r) x0(s_prev),
  r = h_prev / h, otherwise. The last step (to sigma = 0) returns D = x0.
  """
  return run_stepper(dpm_solver_pp_2m_stepper(apply, cond, uncond, **kwargs), noise)


def to_uint8(x: jax.Array) -> jax.Array:
  """[-1, 1] -> uint8 as the released sampler does: clip((x + 1) * 127.5 + 0.5, 0, 255)."""
  return jnp.clip((x + 1.0) * 127.5 + 0.5, 0, 255).astype(jnp.uint8)
