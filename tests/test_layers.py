"""Position tables, sinusoids, RoPE and norms against hand-computed values."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from pixeldit_jax.model import layers


def test_rope_2d_table_hand_computed():
  # head_dim 8 -> 2 frequencies: 1 and 10000^(-4/8) = 0.01. Grid 2 rows x 3 columns:
  # x positions linspace(0, 16, 3) = 0, 8, 16; y positions linspace(0, 16, 2) = 0, 16.
  cos, sin = layers.rope_2d_table(8, 2, 3)
  assert cos.shape == sin.shape == (6, 4)
  angles = np.arctan2(sin, cos)
  # Pairs alternate x, y: [x*f0, y*f0, x*f1, y*f1]. Token 1 = (row 0, col 1): x = 8, y = 0.
  np.testing.assert_allclose(cos[1], np.cos([8.0, 0.0, 0.08, 0.0]), atol=1e-6)
  np.testing.assert_allclose(sin[1], np.sin([8.0, 0.0, 0.08, 0.0]), atol=1e-6)
  # Token 5 = (row 1, col 2): x = y = 16.
  np.testing.assert_allclose(cos[5], np.cos([16.0, 16.0, 0.16, 0.16]), atol=1e-6)
  np.testing.assert_allclose(angles[3], [0.0, 16.0 - 6 * math.pi, 0.0, 0.16], atol=1e-5)


def test_rope_positions_are_normalised_to_the_same_span():
  # Any grid spans [0, 16]: the last token of a 4x4 and of a 32x32 grid sit at the same position.
  small, big = layers.rope_2d_table(16, 4, 4)[0], layers.rope_2d_table(16, 32, 32)[0]
  np.testing.assert_allclose(small[-1], big[-1], atol=1e-5)
  np.testing.assert_allclose(small[0], big[0])


def test_apply_rope_is_complex_multiplication_of_adjacent_pairs():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, 3, 8)).astype(np.float32)  # (B, T, heads, head_dim)
  cos, sin = layers.rope_2d_table(8, 2, 3)
  out = np.asarray(layers.apply_rope(jnp.asarray(x), jnp.asarray(cos), jnp.asarray(sin)))
  z = x[..., 0::2] + 1j * x[..., 1::2]
  rot = z * (cos + 1j * sin)[None, :, None, :]
  np.testing.assert_allclose(out[..., 0::2], rot.real, atol=1e-5)
  np.testing.assert_allclose(out[..., 1::2], rot.imag, atol=1e-5)
  # A rotation keeps norms.
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rope_1d_table():
  cos, sin = layers.rope_1d_table(4, 3)  # freqs 1, 0.01
  np.testing.assert_allclose(np.arctan2(sin[2], cos[2]), [2.0, 0.02], atol=1e-6)


def test_sincos_2d_table_hand_computed():
  # dim 8: each half has 2 frequencies, 1 and 10000^(-1/2) = 0.01; first half x, second half y.
  table = layers.sincos_2d_table(8, 3, 5)
  assert table.shape == (15, 8)
  r, c = 2, 3
  expected = [math.sin(3), math.sin(0.03), math.cos(3), math.cos(0.03),
              math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]
  np.testing.assert_allclose(table[r * 5 + c], expected, atol=1e-6)
  np.testing.assert_allclose(table[0], [0, 0, 1, 1, 0, 0, 1, 1])


def test_timestep_sinusoid_max_period_10_cos_first():
  emb = np.asarray(layers.timestep_sinusoid(jnp.array([0.5]), dim=4))
  f1 = 10 ** -0.5
  np.testing.assert_allclose(emb[0], [math.cos(0.5), math.cos(0.5 * f1), math.sin(0.5), math.sin(0.5 * f1)],
                             atol=1e-6)
  assert layers.timestep_sinusoid(jnp.zeros((3,)), 256).shape == (3, 256)


def test_rmsnorm_fp32_statistics_and_dtype():
  norm = layers.RMSNorm(4)
  x = jnp.array([[1.0, 2.0, 3.0, 4.0]])
  expected = np.array([1, 2, 3, 4]) / math.sqrt(30 / 4 + 1e-6)
  np.testing.assert_allclose(np.asarray(norm(x))[0], expected, rtol=1e-6)
  assert norm(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("fan_in", [3, 1152])
def test_torch_default_init_bounds(fan_in):
  import jax
  w = layers.torch_uniform(fan_in)(jax.random.key(0), (fan_in, 64))
  bound = 1 / math.sqrt(fan_in)
  assert float(jnp.max(jnp.abs(w))) <= bound
  assert float(jnp.max(jnp.abs(w))) > 0.9 * bound


@pytest.mark.parametrize("rows,din,dout", [
    (16384, 16, 64),   # per-pixel MLP in: narrow input, narrow bias
    (16384, 64, 16),   # per-pixel MLP out: narrow output
    (16384, 3, 16),    # pixel embedding (K = 3)
    (96, 48, 640),     # wide output (the AdaLN projection's shape class)
    (96, 640, 48),     # wide input
])
def test_dense_gradients_match_autodiff(rows, din, dout):
  # dense / dense_no_bias carry hand-written CPU gradients (transposes placed for XLA:CPU, bias
  # sums by row width): they must equal autodiff's for every shape class they special-case.
  import jax
  k = np.random.default_rng(rows + din + dout)
  x = jnp.asarray(k.standard_normal((2, rows // 2, din)), jnp.float32)
  w = jnp.asarray(k.standard_normal((din, dout)) / np.sqrt(din), jnp.float32)
  b = jnp.asarray(k.standard_normal((dout,)), jnp.float32)
  probe = jnp.asarray(k.standard_normal((2, rows // 2, dout)), jnp.float32)

  def loss(f):
    return lambda *a: jnp.sum(jnp.tanh(f(*a)) * probe)

  ours = jax.jit(jax.grad(loss(layers.dense), argnums=(0, 1, 2)))(x, w, b)
  ref = jax.jit(jax.grad(loss(lambda x, w, b: x @ w + b), argnums=(0, 1, 2)))(x, w, b)
  for name, a, r in zip(("dx", "dw", "db"), ours, ref):
    assert a.shape == r.shape, name
    np.testing.assert_allclose(a, r, rtol=2e-5, atol=2e-5 * float(jnp.abs(r).max()), err_msg=name)
  ours = jax.jit(jax.grad(loss(layers.dense_no_bias), argnums=(0, 1)))(x, w)
  ref = jax.jit(jax.grad(loss(lambda x, w: x @ w), argnums=(0, 1)))(x, w)
  for a, r in zip(ours, ref):
    np.testing.assert_allclose(a, r, rtol=2e-5, atol=2e-5 * float(jnp.abs(r).max()))


def test_thin_input_is_transposed_exactly_by_the_identity_product():
  # The per-pixel MLP's (N, 16) input reaches its weight gradient transposed by a product with the
  # identity (layers._cpu_dense_grads): the same bits as a transpose, so the same weight gradient.
  import jax
  k = np.random.default_rng(0)
  x2 = jnp.asarray(k.standard_normal((4096, 16)) * np.exp(k.uniform(-30, 30, (4096, 16))), jnp.float32)
  g2 = jnp.asarray(k.standard_normal((4096, 64)), jnp.float32)
  w = jnp.asarray(k.standard_normal((16, 64)), jnp.float32)
  dx, dw = jax.jit(layers._cpu_dense_grads)(x2, w, g2)
  np.testing.assert_array_equal(dw, jax.jit(lambda x, g: jax.lax.optimization_barrier(x.T) @ g)(x2, g2))
  np.testing.assert_array_equal(dx, jax.jit(lambda g, w: g @ w.T)(g2, w))
