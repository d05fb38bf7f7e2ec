"""AdamW with warmup, the paper's LR/clip step-down, and global-norm clipping (spec §4.3).

The released recipe: AdamW(0.9, 0.999, eps 1e-8, wd 0), LR 1e-4, clip 1.0; after 160 epochs the
LR steps down to 1e-5 and the clip to 0.5 (``step_down_step``; None keeps the first phase).
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import optax


def _step_down(before: float, after: float, at) -> Callable:
  if at is None or at < 0:
    return lambda count: jnp.asarray(before, jnp.float32)
  return lambda count: jnp.where(count < at, before, after).astype(jnp.float32)


def learning_rate(tcfg) -> Callable:
  """step -> LR: linear warmup from 0, then constant, then the optional step-down."""
  base = _step_down(tcfg.lr, tcfg.lr_after_step_down, tcfg.step_down_step)
  if not tcfg.warmup_steps:
    return base
  return lambda count: base(count) * jnp.minimum(1.0, (count + 1) / tcfg.warmup_steps)


def clip_norm(tcfg) -> Callable:
  return _step_down(tcfg.grad_clip, tcfg.grad_clip_after_step_down, tcfg.step_down_step)


def make(tcfg) -> optax.GradientTransformation:
  if tcfg.optimizer != "adamw":
    raise ValueError(f"Unknown optimizer {tcfg.optimizer!r} (available: 'adamw')")
  return optax.chain(
      optax.inject_hyperparams(optax.clip_by_global_norm)(max_norm=clip_norm(tcfg)),
      optax.adamw(learning_rate(tcfg), b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps,
                  weight_decay=tcfg.weight_decay),
  )
