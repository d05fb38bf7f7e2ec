"""Flow matching, ImageNet convention (spec §4.1). The convention is written here and only here.

    t in [0, 1], t = 0 is pure noise and t = 1 is data
    x_t = t * x + (1 - t) * eps,   eps ~ N(0, I),   x in [-1, 1]
    velocity target v = dx_t/dt = x - eps,   loss = mean squared error, weight 1

Training times are logit-normal, t = sigmoid(N(0, 1)), then shifted toward noise by
t <- t / (t + (1 - t) * s) (s = 1 at 256^2, 3 at 512^2). The same shift is applied to the
sampling grid. Class labels are replaced by the null class with probability 0.1 for CFG.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


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


def loss(apply: Callable, x: jax.Array, labels: jax.Array, key: jax.Array, *, null_class: int,
         shift: float = 1.0, label_dropout: float = 0.1) -> jax.Array:
  """Flow-matching MSE of `apply(x_t, t, y) -> velocity` on a batch of images in [-1, 1]."""
  k_t, k_noise, k_drop = jax.random.split(key, 3)
  t = sample_time(k_t, x.shape[0], shift)
  noise = jax.random.normal(k_noise, x.shape, x.dtype)
  y = drop_labels(k_drop, labels, null_class, label_dropout)
  pred = apply(interpolate(x, noise, t), t, y)
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - velocity_target(x, noise)))
