"""Flow matching in the two released time conventions; both are written here and only here.

ImageNet (class-conditional) convention, spec §4.1:

    t in [0, 1], t = 0 is pure noise and t = 1 is data
    x_t = t * x + (1 - t) * eps,   eps ~ N(0, I),   x in [-1, 1]
    velocity target v = dx_t/dt = x - eps,   loss = mean squared error, weight 1

Training times are logit-normal, t = sigmoid(N(0, 1)), then shifted toward noise by
t <- t / (t + (1 - t) * s) (s = 1 at 256^2, 3 at 512^2). The same shift is applied to the
sampling grid. Class labels are replaced by the null class with probability 0.1 for CFG.

Text-to-image (SANA) convention, spec §7.4:

    sigma in [0, 1], sigma = 1 is pure noise and sigma = 0 is data
    x_sigma = (1 - sigma) * x0 + sigma * eps,   target v = eps - x0
    sigma = shift(i / 1000), i = floor(sigmoid(N(0, 1)) * 1000), shift(s) = k s / (1 + (k - 1) s)
    model time input: sampling 1000 * sigma; training (released trainer) the integer
    trunc(1000 * sigma) from a float64 table (``train_timestep_table``)

They are one process under sigma = 1 - t with v_t2i = -v_c2i (``to_sigma`` / ``to_t`` are the
only conversion); the shifts agree under that change too. A model trained in one convention
gives garbage when sampled in the other (spec §10.8), so each checkpoint records its own.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def time_shift(t: jax.Array, shift: float) -> jax.Array:
  """t / (t + (1 - t) * s): s > 1 spends more of [0, 1] near the noise end (t = 0)."""
  return t / (t + (1.0 - t) * shift)


def sample_time(key: jax.Array, batch: int, shift: float = 1.0) -> jax.Array:
  """Logit-normal(0, 1) training times, shifted."""
  return time_shift(jax.nn.sigmoid(jax.random.normal(key, (batch,), jnp.float32)), shift)


def interpolate(x: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = t x + (1 - t) eps, t broadcast over the image axes."""
  t = t.reshape(-1, *([1] * (x.ndim - 1)))
  return t * x + (1.0 - t) * noise


def velocity_target(x: jax.Array, noise: jax.Array) -> jax.Array:
  return x - noise


def drop_labels(key: jax.Array, labels: jax.Array, null_class: int, prob: float) -> jax.Array:
  """Replace each label by the null class with probability `prob` (classifier-free guidance)."""
  if prob <= 0:
    return labels
  return jnp.where(jax.random.uniform(key, labels.shape) < prob, null_class, labels)


def loss_at(apply: Callable, x: jax.Array, noise: jax.Array, t: jax.Array, cond) -> jax.Array:
  """MSE of `apply(x_t, t, cond)` against x - eps at given times and noise."""
  pred = apply(interpolate(x, noise, t), t, cond)
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - velocity_target(x, noise)))


def loss(apply: Callable, x: jax.Array, labels: jax.Array, key: jax.Array, *, null_class: int,
         shift: float = 1.0, label_dropout: float = 0.1) -> jax.Array:
  """Flow-matching MSE of `apply(x_t, t, y) -> velocity` on a batch of images in [-1, 1]."""
  k_t, k_noise, k_drop = jax.random.split(key, 3)
  t = sample_time(k_t, x.shape[0], shift)
  noise = jax.random.normal(k_noise, x.shape, x.dtype)
  return loss_at(apply, x, noise, t, drop_labels(k_drop, labels, null_class, label_dropout))


# ----------------------------------------------------------------------------- sigma convention

def sigma_shift(sigma: jax.Array, shift: float) -> jax.Array:
  """k sigma / (1 + (k - 1) sigma): k > 1 spends more of [0, 1] near the noise end (sigma = 1)."""
  return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def sample_sigma_index(key: jax.Array, batch: int) -> jax.Array:
  """SANA's discrete logit-normal training index floor(sigmoid(N(0, 1)) * 1000) in 0..999."""
  index = jnp.floor(jax.nn.sigmoid(jax.random.normal(key, (batch,), jnp.float32)) * 1000.0)
  return jnp.minimum(index, 999.0).astype(jnp.int32)


def sample_sigma(key: jax.Array, batch: int, shift: float = 1.0) -> jax.Array:
  """sigma = shift(i / 1000) for a discrete logit-normal index i (``sample_sigma_index``)."""
  return sigma_shift(sample_sigma_index(key, batch) / 1000.0, shift)


def train_timestep_table(shift: float) -> np.ndarray:
  """The released trainer's model time for each index: int64(1000 * shift(1 - betas[i])).

  The release builds the table in float64 from betas = linspace(1, 0.001, 1000) and looks it up
  as a long tensor, which truncates. Rounding error puts some entries just below an integer
  (at shift 1, 1000 sigma_61 = 60.999...), so it is computed the same way here rather than as
  floor(1000 sigma) in float32, which differs at ~15% of the indices at shift 1.
  """
  sigma = 1.0 - np.linspace(1.0, 0.001, 1000, dtype=np.float64)
  shifted = shift * sigma / (1.0 + (shift - 1.0) * sigma)
  return (shifted * 1000.0).astype(np.int64).astype(np.float32)


def sigma_interpolate(x: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
  """x_sigma = (1 - sigma) x0 + sigma eps."""
  sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
  return (1.0 - sigma) * x + sigma * noise


def sigma_target(x: jax.Array, noise: jax.Array) -> jax.Array:
  return noise - x


def model_time(sigma: jax.Array) -> jax.Array:
  """What the T2I model's timestep embedder receives when sampling: 1000 sigma (continuous)."""
  return 1000.0 * sigma


def to_sigma(t: jax.Array, velocity: jax.Array | None = None):
  """ImageNet time and velocity -> sigma convention: sigma = 1 - t, v = -v."""
  return 1.0 - t if velocity is None else (1.0 - t, -velocity)


def to_t(sigma: jax.Array, velocity: jax.Array | None = None):
  """Sigma convention -> ImageNet time and velocity (the inverse of ``to_sigma``)."""
  return 1.0 - sigma if velocity is None else (1.0 - sigma, -velocity)


def sigma_loss_at(apply: Callable, x: jax.Array, noise: jax.Array, sigma: jax.Array, cond,
                  time: jax.Array | None = None) -> jax.Array:
  """MSE of `apply(x_sigma, time, cond)` against eps - x0; `time` defaults to 1000 sigma."""
  time = model_time(sigma) if time is None else time
  pred = apply(sigma_interpolate(x, noise, sigma), time, cond)
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - sigma_target(x, noise)))


def drop_text(key: jax.Array, text: jax.Array, null_text: jax.Array, prob: float) -> jax.Array:
  """Replace each caption embedding (B, L, C) by the null embedding (1, L, C) with probability `prob`."""
  if prob <= 0:
    return text
  drop = jax.random.uniform(key, (text.shape[0], 1, 1)) < prob
  return jnp.where(drop, null_text.astype(text.dtype), text)


def sigma_loss(apply: Callable, x: jax.Array, text: jax.Array, key: jax.Array, *, null_text: jax.Array,
               shift: float = 1.0, text_dropout: float = 0.1, integer_time: bool = True) -> jax.Array:
  """Text-to-image flow-matching MSE of `apply(x_sigma, time, text) -> eps - x0`.

  time is the released trainer's integer timestep (``train_timestep_table``) when
  `integer_time`, else the continuous 1000 sigma that sampling feeds.
  """
  k_t, k_noise, k_drop = jax.random.split(key, 3)
  index = sample_sigma_index(k_t, x.shape[0])
  sigma = sigma_shift(index / 1000.0, shift)
  time = jnp.asarray(train_timestep_table(shift))[index] if integer_time else model_time(sigma)
  noise = jax.random.normal(k_noise, x.shape, x.dtype)
  return sigma_loss_at(apply, x, noise, sigma, drop_text(k_drop, text, null_text, text_dropout), time)
