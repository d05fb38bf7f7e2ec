"""REPA: align an intermediate patch representation with a frozen DINOv2 teacher (spec §4.2, §7.2).

    student = projector(tokens after patch block k)         (B, Hs*Ws, 768)
    teacher = DINOv2 x_norm_patchtokens of the clean image  (B, Ht*Wt, 768), no gradient
    L = L_flow + weight * L_repa

The two released trainers differ in details that change the loss value, so both are kept:
  "c2i" (REPATrainer): project, match the grid on the student side (adaptive average pooling
        when the teacher grid is smaller, bilinear otherwise), L_repa = mean(1 - cos).
  "t2i" (PixDiTTrainer): project, L2-normalise, resize the side with more tokens to the other
        bilinearly, normalise again, L_repa = -mean(cos).
The projector's parameters live in the train state beside the model's and are trained with them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pixeldit_jax.model import layers

LOSS_FORMS = ("c2i", "t2i")


class Projector(nnx.Module):
  """Linear(D, h) -> SiLU -> Linear(h, h) -> SiLU -> Linear(h, out); torch-default init.

  Names fc1/fc2/fc3 are the checkpoint layout the official-weight importer writes."""

  def __init__(self, in_dim: int, hidden: int, out_dim: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.fc1 = layers.linear(in_dim, hidden, ("embed", "mlp"), **kw)
    # Logical names only pick shardings: FSDP over one side of each matrix, tensor over the other.
    self.fc2 = layers.linear(hidden, hidden, ("mlp", "embed"), **kw)
    self.fc3 = layers.linear(hidden, out_dim, ("embed", "channels"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc3(nnx.silu(self.fc2(nnx.silu(self.fc1(x))))).astype(jnp.float32)


def make_projector(model_cfg, repa_cfg, seed: int = 0) -> Projector:
  hidden = repa_cfg.projector_dim or model_cfg.hidden_size
  return Projector(model_cfg.hidden_size, hidden, repa_cfg.teacher_dim, rngs=nnx.Rngs(params=seed + 7),
                   dtype=jnp.dtype(model_cfg.dtype), param_dtype=jnp.dtype(model_cfg.param_dtype))


def _to_grid(tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
  b, _, c = tokens.shape
  return tokens.reshape(b, grid[0], grid[1], c)


def _from_grid(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1, x.shape[-1])


def resize_tokens(tokens: jax.Array, grid: tuple[int, int], target: tuple[int, int],
                  method: str) -> jax.Array:
  """(B, H*W, C) on `grid` -> (B, h*w, C) on `target`, by "avgpool" (integer factors, as torch's
  adaptive_avg_pool2d then is) or "bilinear" (half-pixel centres, no antialiasing: torch's
  interpolate(mode="bilinear", align_corners=False))."""
  if tuple(grid) == tuple(target):
    return tokens
  x = _to_grid(tokens, grid)
  if method == "avgpool":
    fh, fw = grid[0] // target[0], grid[1] // target[1]
    if fh * target[0] != grid[0] or fw * target[1] != grid[1]:
      raise ValueError(f"average pooling from grid {grid} to {target} needs integer factors")
    x = x.reshape(x.shape[0], target[0], fh, target[1], fw, x.shape[-1]).mean(axis=(2, 4))
  elif method == "bilinear":
    x = jax.image.resize(x, (x.shape[0], *target, x.shape[-1]), "linear", antialias=False)
  else:
    raise ValueError(f"unknown resize method {method!r}")
  return _from_grid(x)


def _normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  # torch.nn.functional.normalize / cosine_similarity clamp the norm at a tiny epsilon.
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def loss(student: jax.Array, student_grid: tuple[int, int], teacher: jax.Array,
         teacher_grid: tuple[int, int], form: str = "c2i") -> jax.Array:
  """REPA loss of projected student tokens against teacher tokens (both (B, N, C), fp32)."""
  student, teacher = student.astype(jnp.float32), jax.lax.stop_gradient(teacher.astype(jnp.float32))
  ns, nt = student_grid[0] * student_grid[1], teacher_grid[0] * teacher_grid[1]
  if form == "c2i":
    method = "avgpool" if nt < ns else "bilinear"
    student = resize_tokens(student, student_grid, teacher_grid, method)
    return jnp.mean(1.0 - jnp.sum(_normalize(student) * _normalize(teacher), axis=-1))
  if form == "t2i":
    student = _normalize(student)
    if nt > ns:
      teacher = resize_tokens(teacher, teacher_grid, student_grid, "bilinear")
    elif nt < ns:
      student = _normalize(resize_tokens(student, student_grid, teacher_grid, "bilinear"))
    return -jnp.mean(jnp.sum(student * _normalize(teacher), axis=-1))
  raise ValueError(f"repa.loss_form must be one of {LOSS_FORMS}, got {form!r}")
