"""Attention implementations (model/attention.py): the splash kernel, run here in Pallas'
interpreter, against XLA's attention, with padding to 128-token blocks, under a mesh, and the
per-backend choice. The TPU compile of the kernel is checked in test_aot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixeldit_jax import sharding
from pixeldit_jax.model import PixelDiTConfig, attention


def _qkv(shape, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))


@pytest.mark.parametrize("shape", [(2, 200, 2, 64), (1, 130, 2, 72)])
def test_splash_matches_xla_forward_and_gradients(shape):
  q, k, v = _qkv(shape)
  np.testing.assert_allclose(attention.attention(q, k, v, "splash"), jax.nn.dot_product_attention(q, k, v),
                             atol=5e-6)
  loss = lambda impl: lambda q, k, v: (attention.attention(q, k, v, impl) * v).sum()
  for got, want in zip(jax.grad(loss("splash"), argnums=(0, 1, 2))(q, k, v),
                       jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, atol=5e-6)


def test_splash_per_shard_under_a_mesh():
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  q, k, v = _qkv((2, 3, 40, 2, 32), seed=1)  # extra leading axes are flattened into the batch
  with sharding.use(mesh, sharding.DEFAULT_RULES):
    assert attention.mesh_platform() == "cpu" and attention.resolve(None) is None
    out = jax.jit(lambda q, k, v: attention.attention(q, k, v, "splash"))(q, k, v)
  flat = lambda a: a.reshape(6, 40, 2, 32)
  np.testing.assert_allclose(out.reshape(6, 40, 2, 32), jax.nn.dot_product_attention(flat(q), flat(k), flat(v)),
                             atol=5e-6)


def test_implementation_choice():
  assert attention.resolve("xla") == "xla" and attention.resolve("cudnn") == "cudnn"
  assert attention.resolve(None) == (None if jax.default_backend() != "tpu" else "splash")
  assert PixelDiTConfig(attention_impl="splash").attention_impl == "splash"
  with pytest.raises(ValueError, match="'splash'"):
    PixelDiTConfig(attention_impl="flash")
