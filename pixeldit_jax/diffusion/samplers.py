"""Samplers on the ImageNet-convention velocity field (t: 0 = noise -> 1 = data).

The full sampler set (AB2 "FlowDPMSolver", Heun, DPM-Solver++ for T2I) belongs to the sampling
binary; training uses the Euler sampler below for its periodic sample grids.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from pixeldit_jax.diffusion.flow import time_shift


def time_grid(num_steps: int, shift: float = 1.0) -> jax.Array:
  """linspace(0, 1 - 1/N, N) with 1.0 appended, then shifted (the released sampler's grid)."""
  grid = jnp.concatenate([jnp.linspace(0.0, 1.0 - 1.0 / num_steps, num_steps), jnp.ones((1,))])
  return time_shift(grid, shift)


def guided_velocity(apply: Callable, x, t, labels, null_class: int, cfg_scale: float,
                    interval: tuple[float, float] = (0.0, 1.0)):
  """Velocity at scalar time t with classifier-free guidance: v_u + w (v_c - v_u) when interval[0] < t < interval[1] (strict), else v_c.

  The conditional and null-class halves run in one forward pass (uncond first, as released).
  """
  tt = jnp.full((x.shape[0],), t, jnp.float32)
  if cfg_scale == 1.0:
    return apply(x, tt, labels)
  both = apply(jnp.concatenate([x, x]), jnp.concatenate([tt, tt]),
               jnp.concatenate([jnp.full_like(labels, null_class), labels]))
  v_u, v_c = jnp.split(both, 2)
  inside = (t > interval[0]) & (t < interval[1])
  return jnp.where(inside, v_u + cfg_scale * (v_c - v_u), v_c)


def euler(apply: Callable, noise: jax.Array, labels: jax.Array, *, num_steps: int, null_class: int,
          cfg_scale: float = 1.0, interval=(0.0, 1.0), shift: float = 1.0) -> jax.Array:
  """Integrate dx/dt = v from t = 0 (noise) to t = 1 with explicit Euler steps."""
  grid = time_grid(num_steps, shift)

  def step(x, i):
    t, t_next = grid[i], grid[i + 1]
    v = guided_velocity(apply, x, t, labels, null_class, cfg_scale, interval)
    return x + (t_next - t) * v, None

  x, _ = jax.lax.scan(step, noise, jnp.arange(num_steps))
  return x


def to_uint8(x: jax.Array) -> jax.Array:
  """[-1, 1] -> uint8 as the released sampler does: clip((x + 1) * 127.5 + 0.5, 0, 255)."""
  return jnp.clip((x + 1.0) * 127.5 + 0.5, 0, 255).astype(jnp.uint8)
