"""Building blocks shared by both levels (and by the text-to-image model).

RMSNorm, SwiGLU, the GELU pixel MLP, rotary attention with qk-norm, the 2D RoPE and 2D sin-cos
tables, the timestep and class embedders, and the helpers that stack identical blocks under
``nnx.vmap`` and run them with ``nnx.scan`` + ``nnx.remat``.

Every parameter carries logical axis names (``nnx.with_partitioning``); only
``pixeldit_jax.sharding`` maps those names onto a device mesh. Initialisers follow spec §4.5:
unless a module says otherwise, a Linear gets PyTorch's default init (weight and bias uniform in
±1/sqrt(fan_in)), because that is what the released checkpoints were trained from.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixeldit_jax.model import attention

Axes = Sequence[Optional[str]]
LAYERS_AXIS = "layers"  # logical name of the leading axis of scanned (stacked) blocks


# ----------------------------------------------------------------------------- initialisers

def torch_uniform(fan_in: int) -> nnx.Initializer:
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch.nn.Linear's default for weights and biases."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


zeros = nnx.initializers.zeros_init()


def partitioned(init: nnx.Initializer, axes: Axes) -> nnx.Initializer:
  """Attach logical axis names to an initialiser. Eager (construction-time) sharding stays off:
  the trainer places parameters on the mesh by jitting the initialiser with out_shardings."""
  return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


def normal(std: float) -> nnx.Initializer:
  return nnx.initializers.normal(stddev=std)


def _cpu_dense_grads(x2, w, g2):
  """(dx, dw) of x2 @ w for row-major (N, in) x2 and (N, out) g2, as XLA:CPU runs fastest.

  Autodiff writes the weight gradient as x2.T @ g2 whatever the widths; XLA:CPU then transposes
  the wider operand inside a fusion with its producer (25 ms for the 512 x 2048 SwiGLU
  activation at 256^2, ~10x a plain transpose). Here the narrower operand is the transposed one,
  as the left factor, so the product runs in the matmul library's (M, K) x (K, N) form. The
  barriers keep XLA's algebraic simplifier from folding the transposes back into the product
  (XLA:CPU drops barriers later, before fusion). The per-pixel layers (131072 x 16 at 256^2)
  take this path too: tiny train step -8 ms, small -20 ms against 64 summed partial products.

  Except the per-pixel MLP's input (N x 16), transposed by a product with the identity: as a
  transpose, XLA:CPU fused it with its producer, the pixel-wise modulation, which then re-read the
  24576-wide AdaLN output across rows for each of the 16 channels. The product writes the same
  values (each is x * 1 plus zeros) from one row-order pass: small train step -10 to -16 ms.
  """
  dx = g2 @ w.T
  bar = jax.lax.optimization_barrier
  if 8 <= x2.shape[1] <= 16 and x2.shape[1] < g2.shape[1]:  # the matmul library needs a dim >= 8
    x2t = jax.lax.dot_general(jnp.eye(x2.shape[1], dtype=x2.dtype), x2, (((1,), (1,)), ((), ())))
    return dx, bar(x2t) @ g2
  if x2.shape[1] <= g2.shape[1]:
    return dx, bar(bar(x2).T) @ g2
  return dx, bar(bar(bar(g2).T) @ x2).T


def _cpu_bias_grad(g2):
  """Column sums of (N, out) g2. XLA:CPU's reduction over rows is fast for narrow rows (the
  per-pixel layers: 2.3 ms for 131072 x 64) and slow for wide ones (45 ms for the 512 x 24576
  pixel-AdaLN gradient), where a product with a ones vector takes 2 ms. The narrow case as a
  product took 6 ms at 256^2: small train step -23 ms."""
  if g2.shape[1] <= 64:
    return jnp.sum(g2, axis=0)
  db = jnp.dot(jnp.ones((g2.shape[0],), g2.dtype), g2, preferred_element_type=jnp.float32)
  return db.astype(g2.dtype)


def _grads(x, w, g, bias: bool):
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])

  def generic(x2, w, g2):
    return (g2 @ w.T, x2.T @ g2) + ((jnp.sum(g2, axis=0),) if bias else ())

  def cpu(x2, w, g2):
    dx, dw = _cpu_dense_grads(x2, w, g2)
    return (dx, dw, _cpu_bias_grad(g2)) if bias else (dx, dw)

  grads = jax.lax.platform_dependent(x2, w, g2, cpu=cpu, default=generic)
  return (grads[0].reshape(x.shape),) + tuple(grads[1:])


@jax.custom_vjp
def dense(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """x @ w + b over the last axis of x (w: (in, out)). The value is autodiff's; the gradient is
  computed as XLA:CPU runs it fastest on the CPU (``_cpu_dense_grads``, ``_cpu_bias_grad``),
  and elsewhere as autodiff would."""
  return x @ w + b


dense.defvjp(lambda x, w, b: (x @ w + b, (x, w)), lambda res, g: _grads(*res, g, bias=True))


@jax.custom_vjp
def dense_no_bias(x: jax.Array, w: jax.Array) -> jax.Array:
  """`dense` without a bias."""
  return x @ w


dense_no_bias.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: _grads(*res, g, bias=False))


class Linear(nnx.Linear):
  """nnx.Linear computed by `dense` (same parameters and values, faster gradients on the CPU)."""

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    if out_sharding is not None or self.preferred_element_type is not None:
      return super().__call__(inputs, out_sharding=out_sharding)
    if self.bias is None:
      inputs, kernel = self.promote_dtype((inputs, self.kernel[...]), dtype=self.dtype)
      return dense_no_bias(inputs, kernel)
    inputs, kernel, bias = self.promote_dtype((inputs, self.kernel[...], self.bias[...]), dtype=self.dtype)
    return dense(inputs, kernel, bias)


def linear(in_features: int, out_features: int, axes: Axes, *, rngs: nnx.Rngs, use_bias: bool = True,
           kernel_init: Optional[nnx.Initializer] = None, bias_init: Optional[nnx.Initializer] = None,
           dtype=jnp.float32, param_dtype=jnp.float32) -> nnx.Linear:
  """A Linear with logical axis names (in, out) and torch-default init unless overridden."""
  return Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=partitioned(kernel_init or torch_uniform(in_features), axes),
      bias_init=partitioned(bias_init or torch_uniform(in_features), (axes[1],)),
      rngs=rngs)


# ----------------------------------------------------------------------------- norms and MLPs

class RMSNorm(nnx.Module):
  """RMSNorm with a learnable scale; statistics in fp32, result in the input dtype (spec §1.2)."""

  def __init__(self, dim: int, *, axis_name: str = "norm", eps: float = 1e-6, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(axis_name,), eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return y.astype(x.dtype) * self.scale[...].astype(x.dtype)


class SwiGLU(nnx.Module):
  """Bias-free SwiGLU FFN of the patch blocks: w2(silu(w1 x) * w3 x)."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, use_bias=False, dtype=dtype, param_dtype=param_dtype)
    self.w1 = linear(dim, hidden, ("embed", "mlp"), **kw)
    self.w3 = linear(dim, hidden, ("embed", "mlp"), **kw)
    self.w2 = linear(hidden, dim, ("mlp", "embed"), **kw)

  def __call__(self, x):
    if (type(self.w1) is Linear and type(self.w3) is Linear and self.w1.dtype == self.w3.dtype
        and attention.platform() == "cpu"):
      # On the CPU, w1 and w3 as one product over [w1 | w3] (same parameters): one wider matmul
      # instead of two, and in the backward one input-gradient product instead of two plus a
      # sum. Not under a tensor-parallel mesh, where the concatenation would move shards.
      x, w1, w3 = self.w1.promote_dtype((x, self.w1.kernel[...], self.w3.kernel[...]), dtype=self.w1.dtype)
      gate, up = jnp.split(dense_no_bias(x, jnp.concatenate([w1, w3], axis=1)), 2, axis=-1)
      return self.w2(nnx.silu(gate) * up)
    return self.w2(nnx.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nnx.Module):
  """Per-pixel MLP of the PiT blocks: Linear -> GELU (exact erf) -> Linear, with biases."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.fc1 = linear(dim, hidden, ("pixel", "pixel_mlp"), **kw)
    self.fc2 = linear(hidden, dim, ("pixel_mlp", "pixel"), **kw)

  def __call__(self, x):
    return self.fc2(gelu_erf(self.fc1(x)))


def gelu_erf(x: jax.Array) -> jax.Array:
  """Exact GELU as torch.nn.GELU computes it, x/2 (1 + erf(x/sqrt 2)). jax.nn.gelu's exact form
  goes through erfc, which XLA:CPU expands into exp and selects: 2-3x the cost of erf's
  polynomial on the largest activation of the pixel level."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(np.sqrt(0.5), x.dtype)))


# ----------------------------------------------------------------------------- position tables

def rope_2d_table(head_dim: int, height: int, width: int, *, theta: float = 10000.0,
                  scale: float = 16.0) -> tuple[np.ndarray, np.ndarray]:
  """cos/sin tables (height*width, head_dim/2) for interleaved 2D RoPE on a raster-order grid.

  Positions are normalised: x = linspace(0, scale, width), y = linspace(0, scale, height), so any
  grid spans [0, scale]. There are head_dim/4 frequencies theta^(-4i/head_dim); rotation pair
  2i uses the x-frequency i and pair 2i+1 the y-frequency i (spec §8).
  """
  freqs = 1.0 / theta ** (np.arange(0, head_dim, 4)[: head_dim // 4].astype(np.float32) / head_dim)
  y, x = np.meshgrid(np.linspace(0, scale, height, dtype=np.float32),
                     np.linspace(0, scale, width, dtype=np.float32), indexing="ij")
  angles = np.stack([np.outer(x.reshape(-1), freqs), np.outer(y.reshape(-1), freqs)], axis=-1)
  angles = angles.reshape(height * width, head_dim // 2).astype(np.float32)
  return np.cos(angles), np.sin(angles)


def rope_1d_table(head_dim: int, length: int, *, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
  """cos/sin tables (length, head_dim/2) for 1D RoPE on integer positions (text tokens)."""
  freqs = 1.0 / theta ** (np.arange(0, head_dim, 2)[: head_dim // 2].astype(np.float32) / head_dim)
  angles = np.outer(np.arange(length, dtype=np.float32), freqs)
  return np.cos(angles), np.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate adjacent channel pairs (2k, 2k+1) of x (..., T, heads, head_dim) in fp32."""
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  x0, x1 = xf[..., 0], xf[..., 1]
  cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


def sincos_2d_table(dim: int, height: int, width: int) -> np.ndarray:
  """Fixed 2D sin-cos embedding (height*width, dim) on integer pixel coordinates (MAE layout).

  The first half encodes the column (x), the second the row (y); each half is [sin | cos] with
  frequencies 10000^(-k/(dim/4)). Not normalised, so it extrapolates with resolution (spec §8).
  """
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

  def encode(pos):
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  y, x = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64),
                     indexing="ij")
  return np.concatenate([encode(x), encode(y)], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------- attention

class RotaryAttention(nnx.Module):
  """Multi-head self-attention: bias-free fused qkv, qk-RMSNorm, then RoPE, SDPA, biased proj."""

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype, param_dtype,
               attention_impl: Optional[str] = None):
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.attention_impl = attention_impl
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.qkv = linear(dim, 3 * dim, ("embed", "heads"), use_bias=False, **kw)
    self.q_norm = RMSNorm(self.head_dim, axis_name="kv", param_dtype=param_dtype)
    self.k_norm = RMSNorm(self.head_dim, axis_name="kv", param_dtype=param_dtype)
    self.proj = linear(dim, dim, ("heads", "embed"), **kw)

  def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    *lead, n, dim = x.shape
    # The fused output is laid out [q|k|v][head][head_dim], as in the official checkpoints.
    qkv = self.qkv(x).reshape(*lead, n, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    q = apply_rope(self.q_norm(q), *rope)
    k = apply_rope(self.k_norm(k), *rope)
    out = attention.attention(q, k, v, self.attention_impl)
    return self.proj(out.reshape(*lead, n, dim))


# ----------------------------------------------------------------------------- embedders

def timestep_sinusoid(t: jax.Array, dim: int = 256, max_period: float = 10.0) -> jax.Array:
  """[cos(t f), sin(t f)] with f_i = max_period^(-i/(dim/2)); max_period is 10, not 10 000."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nnx.Module):
  """256-dim sinusoid -> Linear -> SiLU -> Linear; both weights N(0, 0.02) (spec §4.5)."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype, param_dtype, freq_dim: int = 256):
    self.freq_dim = freq_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, kernel_init=normal(0.02))
    self.mlp_in = linear(freq_dim, dim, ("freq", "mlp"), **kw)
    self.mlp_out = linear(dim, dim, ("mlp", "embed"), **kw)

  def __call__(self, t: jax.Array) -> jax.Array:
    return self.mlp_out(nnx.silu(self.mlp_in(timestep_sinusoid(t, self.freq_dim))))


class ClassEmbedder(nnx.Module):
  """Class table with num_classes + 1 rows, N(0, 0.02); index num_classes is the null class."""

  def __init__(self, num_classes: int, dim: int, *, rngs: nnx.Rngs, dtype, param_dtype):
    self.embedding = nnx.Embed(
        num_classes + 1, dim, dtype=dtype, param_dtype=param_dtype,
        embedding_init=partitioned(normal(0.02), ("classes", "embed")), rngs=rngs)

  def __call__(self, y: jax.Array) -> jax.Array:
    return self.embedding(y)


# ----------------------------------------------------------------------------- stacked blocks

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def stack_blocks(make_block: Callable[[nnx.Rngs], nnx.Module], depth: int, rngs: nnx.Rngs):
  """Create `depth` identical blocks whose parameters carry a leading 'layers' axis."""

  @nnx.split_rngs(splits=depth)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
  def create(r):
    return make_block(r)

  return create(rngs)


def scan_blocks(blocks: nnx.Module, x, *args, remat_policy: str = "none", unroll: bool = False,
                capture: Optional[int] = None):
  """x -> block_{depth-1}(... block_0(x, *args) ..., *args), one traced body for all blocks.

  `x` may be a pytree (the MM-DiT blocks carry (image, text)). `args` are broadcast to every
  block; `unroll` unrolls the loop at compile time. With a remat policy, each block's activations
  are recomputed in the backward pass instead of stored, as the policy allows.

  `capture=k` (1-based) also returns the carry after block k (REPA's student features), kept in
  the loop carry so that one scan still runs all blocks: returns (x_out, x_after_k).
  """

  def body(carry, block, *a):
    if capture is None:
      return block(carry, *a)
    h, kept, i = carry
    h = block(h, *a)
    kept = jax.tree.map(lambda new, old: jnp.where(i + 1 == capture, new, old), h, kept)
    return h, kept, i + 1

  if remat_policy != "none":
    body = nnx.remat(body, policy=_REMAT[remat_policy], prevent_cse=False)

  scanned = nnx.scan(body, in_axes=(nnx.Carry, 0) + (None,) * len(args), out_axes=nnx.Carry,
                     unroll=unroll, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
  if capture is None:
    return scanned(x, blocks, *args)
  depth = jax.tree.leaves(nnx.state(blocks))[0].shape[0]
  if not 1 <= capture <= depth:
    raise ValueError(f"capture block {capture} is outside 1..{depth}")
  out, kept, _ = scanned((x, jax.tree.map(jnp.zeros_like, x), jnp.zeros((), jnp.int32)), blocks, *args)
  return out, kept
