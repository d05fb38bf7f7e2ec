"""Optimizers with warmup, the paper's LR/clip step-down, and global-norm clipping (spec §4.3, §7.2).

ImageNet (``optimizer='adamw'``): AdamW(0.9, 0.999, eps 1e-8, wd 0), LR 1e-4, clip 1.0; after 160
epochs the LR steps down to 1e-5 and the clip to 0.5 (``step_down_step``; None keeps the first
phase). T2I (``optimizer='came'``): CAME (``came.py``) with betas (b1, b2, b3), eps ``came_eps``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from pixeldit_jax.train import came as came_lib


def _step_down(before: float, after: float, at) -> Callable:
  if at is None or at < 0:
    return lambda count: jnp.asarray(before, jnp.float32)
  return lambda count: jnp.where(count < at, before, after).astype(jnp.float32)


LR_DECAYS = ("none", "cosine", "linear")


def _decay(tcfg):
  """step -> factor in [lr_min_ratio, 1], from the end of warmup down to lr_min_ratio at
  num_steps; None for "none" (the paper's recipes: constant LR)."""
  kind = tcfg.get("lr_decay", "none")
  if kind == "none":
    return None
  start, end, floor = tcfg.warmup_steps, tcfg.num_steps, tcfg.get("lr_min_ratio", 0.0)

  def factor(count):
    frac = jnp.clip((count - start) / max(end - start, 1), 0.0, 1.0).astype(jnp.float32)
    shape = 0.5 * (1.0 + jnp.cos(jnp.pi * frac)) if kind == "cosine" else 1.0 - frac
    return floor + (1.0 - floor) * shape
  return factor


def learning_rate(tcfg) -> Callable:
  """step -> LR: linear warmup from 0, then constant (or the optional decay), times the step-down."""
  step_down = _step_down(tcfg.lr, tcfg.lr_after_step_down, tcfg.step_down_step)
  decay = _decay(tcfg)
  base = step_down if decay is None else (lambda count: step_down(count) * decay(count))
  if not tcfg.warmup_steps:
    return base
  return lambda count: base(count) * jnp.minimum(1.0, (count + 1) / tcfg.warmup_steps)


def clip_norm(tcfg) -> Callable:
  return _step_down(tcfg.grad_clip, tcfg.grad_clip_after_step_down, tcfg.step_down_step)


def clip_by_global_norm(max_norm) -> optax.GradientTransformation:
  """Global-norm clipping as torch.nn.utils.clip_grad_norm_ does it (the official trainer's
  Lightning ``gradient_clip_algorithm: norm``): every gradient times
  min(1, max_norm / (norm + 1e-6)), also just below the threshold.

  optax.clip_by_global_norm instead selects between g and g / (norm / max_norm); XLA materialised
  that clipped copy and read both it and g in each moment update (4 extra passes over every
  gradient, 2% of the CPU train step at 256^2). One scalar factor fuses into the moment updates.
  The state is optax's (empty), so checkpoints are unchanged.
  """

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    coef = jnp.minimum(1.0, max_norm / (optax.global_norm(updates) + 1e-6))
    return jax.tree.map(lambda g: g * coef.astype(g.dtype), updates), state

  return optax.GradientTransformation(init, update)


def make(tcfg, stacked_axes=None, factored=None) -> optax.GradientTransformation:
  """The configured optimizer behind global-norm clipping.

  CAME needs `stacked_axes` (see ``came.came``), e.g. ``came.layer_axes(model)`` shaped like the
  optimised tree, so that each slice of a scanned block's 'layers' axis is its own torch tensor;
  `factored` optionally overrides which params are factored.
  """
  name = tcfg.get("optimizer", "adamw")
  clip = optax.inject_hyperparams(clip_by_global_norm)(max_norm=clip_norm(tcfg))
  if name == "adamw":
    return optax.chain(clip, optax.adamw(learning_rate(tcfg), b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps,
                                         weight_decay=tcfg.weight_decay))
  if name == "came":
    if stacked_axes is None:
      raise ValueError("optimizer 'came' needs make(tcfg, stacked_axes=...), "
                       "e.g. came.layer_axes(model)")
    return optax.chain(clip, came_lib.came(
        learning_rate(tcfg), b1=tcfg.b1, b2=tcfg.b2, b3=tcfg.get("b3", 0.9999),
        eps=tuple(tcfg.get("came_eps", (1e-30, 1e-16))), weight_decay=tcfg.weight_decay,
        stacked_axes=stacked_axes, factored=factored))
  raise ValueError(f"Unknown optimizer {name!r} (available: 'adamw', 'came')")


def _torch_unfactored(path, param):
  # The learned text position table is (1, L, D) in torch, which the official CAME leaves
  # unfactored (only 2-D tensors are); ours is (L, D).
  return False if path and str(path[-1]) == "text_pos" else None


def _adapter_layer_axes(lora_model) -> dict:
  """came's stacked_axes for the LoRA adapters: their count of leading 'layers' axes."""
  from flax import nnx, traverse_util  # noqa: PLC0415
  from pixeldit_jax.model import lora as lora_lib  # noqa: PLC0415

  def count(names):
    n = 0
    while n < len(names) and names[n] == "layers":
      n += 1
    return n

  return traverse_util.unflatten_dict({
      tuple(p): count(v.get_metadata()["out_sharding"])
      for p, v in nnx.to_flat_state(nnx.state(lora_model, lora_lib.LoRAParam))})


def for_training(tcfg, model, projector=None, lora_model=None) -> optax.GradientTransformation:
  """The optimizer of the trainer's (params, projector) pair, from the abstract modules; with
  `lora_model` (the adapted model) of the (adapters, projector) pair: only the adapters are
  trained, so the base weights get no optimizer state at all."""
  if tcfg.get("optimizer", "adamw") != "came":
    return make(tcfg)
  trained = came_lib.layer_axes(model) if lora_model is None else _adapter_layer_axes(lora_model)
  return make(tcfg, stacked_axes=(trained, came_lib.layer_axes(projector)),
              factored=_torch_unfactored)
