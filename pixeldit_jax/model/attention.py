"""Scaled dot-product attention, with the implementation picked per backend.

All attention in the model (patch blocks, MM-DiT joint attention, compacted PiT attention) is
unmasked softmax(q k^T / sqrt(D)) v over (B, L, H, D) arrays. ``attention_impl``:

  None      per backend: splash attention (the Pallas TPU kernel) when the current mesh is made
            of TPU devices, on the CPU ``head_major`` below, else ``jax.nn.dot_product_attention``'s
            own choice (cuDNN on GPU where it supports the shapes, XLA otherwise)
  "xla"     XLA's softmax(q k^T) v (``head_major`` on the CPU)
  "cudnn"   cuDNN's fused kernel (GPU only)
  "splash"  the splash kernel, also off TPU (in Pallas' interpreter: for tests only)

Splash needs sequence blocks of 128: the tokens are padded to a multiple of 128 and the padding
is its own segment, which real tokens never attend (T2I at 1024²: 300 text + 4096 image tokens
-> 4480). Under a mesh the kernel runs per shard (shard_map): batch over the batch axes, heads
over 'tensor' when it divides them.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pixeldit_jax import sharding

LANES = 128  # splash's sequence block granularity


def mesh_platform() -> Optional[str]:
  """Platform of the devices of the mesh being traced under (AOT meshes included), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  device = getattr(mesh, "abstract_device", None)
  return getattr(device, "platform", None)


def platform() -> str:
  """Where the traced program will run: the mesh's devices, else the default backend."""
  return mesh_platform() or jax.default_backend()


def resolve(impl: Optional[str]) -> Optional[str]:
  if impl is None and platform() == "tpu":
    return "splash"
  return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: Optional[str] = None) -> jax.Array:
  """softmax(q k^T / sqrt(D)) v for (..., L, H, D) inputs, no mask."""
  impl = resolve(impl)
  if impl in (None, "xla") and platform() == "cpu":
    return head_major(q, k, v)
  if impl != "splash":
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)
  lead = q.shape[:-3]
  flat = lambda a: a.reshape(-1, *a.shape[-3:])
  out = _sharded_splash(flat(q), flat(k), flat(v))
  return out.reshape(*lead, *out.shape[-3:])


def head_major(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """XLA's attention with the heads moved next to the batch first, (..., H, L, D).

  The same products as ``jax.nn.dot_product_attention(implementation="xla")`` (logits scaled
  after q k^T, fp32 softmax), but each is a plain batched (L, D) x (D, L) matmul: on the CPU the
  (..., L, H, D) einsums ran the forward 1.4x and the gradient 1.5x slower (2 x 256 tokens,
  12 heads of 64)."""
  heads_first = lambda a: jnp.swapaxes(a, -3, -2)
  logits = jnp.einsum("...qd,...kd->...qk", heads_first(q), heads_first(k))
  logits = logits.astype(jnp.float32) * jnp.float32(1.0 / math.sqrt(q.shape[-1]))
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return heads_first(jnp.einsum("...qk,...kd->...qd", weights, heads_first(v)))


def _sharded_splash(q, k, v):
  mesh = jax.sharding.get_abstract_mesh()
  interpret = platform() != "tpu"
  if mesh.empty:
    return splash(q, k, v, interpret=interpret)
  batch_axes = sharding.current_batch_axes(mesh)
  if q.shape[0] % math.prod(mesh.shape[a] for a in batch_axes):
    batch_axes = ()  # a batch the axes do not divide (one image to edit): not split
  heads = "tensor" if mesh.shape.get("tensor", 1) > 1 and q.shape[2] % mesh.shape["tensor"] == 0 else None
  spec = P(batch_axes or None, None, heads, None)
  fn = functools.partial(splash, interpret=interpret)
  return jax.shard_map(fn, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def splash(q, k, v, *, interpret: bool = False):
  """(B, L, H, D) attention on one device with the splash kernel (tokens padded to 128s)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
      splash_attention_kernel as sk, splash_attention_mask as sm)
  b, n, h, d = q.shape
  padded = -(-n // LANES) * LANES
  block = next(s for s in (512, 256, LANES) if padded % s == 0)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  kernel = sk.make_splash_mha(sm.MultiHeadMask([sm.FullMask((padded, padded))] * h), block_sizes=sizes,
                              head_shards=1, q_seq_shards=1, interpret=interpret)
  dtype = q.dtype
  # The kernel takes (H, L, D) per example and does not scale the logits.
  prep = lambda a: jnp.pad(a, ((0, 0), (0, padded - n), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  q = prep(q * jnp.asarray(1.0 / math.sqrt(d), dtype))
  k, v = prep(k), prep(v)
  ids = jnp.where(jnp.arange(padded) < n, 0, 1).astype(jnp.int32)
  segments = sk.SegmentIds(q=ids, kv=ids)
  out = jax.vmap(lambda a, b_, c: kernel(a, b_, c, segment_ids=segments))(q, k, v)
  return out.transpose(0, 2, 1, 3)[:, :n].astype(dtype)
