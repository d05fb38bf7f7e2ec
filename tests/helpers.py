"""Shared test utilities."""

import os

import jax
import numpy as np
import jax.numpy as jnp
from flax import nnx

from pixeldit_jax.model import PixelDiTConfig

TINY = dict(in_channels=3, patch_size=4, num_classes=5, hidden_size=32, num_heads=2, patch_depth=2,
            pixel_depth=2, pixel_hidden_size=8)


def tiny(**overrides) -> PixelDiTConfig:
  return PixelDiTConfig(**{**TINY, **overrides})


def perturb(model: nnx.Module, scale: float = 0.1, seed: int = 1) -> nnx.Module:
  """Add noise to every parameter (zero-initialised ones included) so every path is exercised.

  Host-side numpy: a jitted version would spend seconds compiling one RNG call per leaf.
  """
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  noisy = jax.tree.map(
      lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape).astype(x.dtype)), state)
  nnx.update(model, noisy)
  return model


@nnx.jit
def forward(model, x, t, y):
  """Jitted model call (compiled once per model structure and input shape)."""
  return model(x, t, y)


def inputs(cfg: PixelDiTConfig, batch=2, height=16, width=24, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k1, (batch, height, width, cfg.in_channels))
  t = jax.random.uniform(k2, (batch,))
  y = jax.random.randint(k3, (batch,), 0, cfg.num_classes + 1)
  return x, t, y


def max_abs(a, b) -> float:
  return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


# Steps of the quickly trained Fashion-MNIST classifier shared by the tests (conftest fixture).
FMNIST_QUICK_STEPS = 120


def timeout(seconds: float) -> float:
  """A subprocess timeout scaled by $PIXELDIT_TEST_TIMEOUT_SCALE (default 1) for slow or busy machines."""
  scale = float(os.environ.get("PIXELDIT_TEST_TIMEOUT_SCALE") or 1.0)
  if not scale > 0:
    raise ValueError(f"PIXELDIT_TEST_TIMEOUT_SCALE must be positive, got {scale}")
  return seconds * scale
