"""The train state, its shardings, and its initialisation directly onto the mesh.

Weights are nested dicts of arrays (the on-disk layout of ``checkpoint.py``); the model graph is
kept apart and merged with them inside jitted functions (``nnx.merge(graphdef, params)``).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pixeldit_jax import sharding
from pixeldit_jax.model import PixelDiT, PixelDiTConfig


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # completed optimizer steps
  params: Any
  ema_params: Any  # fp32 exponential moving average of params
  opt_state: Any
  rng: jax.Array  # raw uint32[2] key; per-step keys are fold_in(rng, step)
  nonfinite_step: jax.Array  # first step whose loss or gradient was NaN/Inf, -1 if none
  skipped_updates: jax.Array  # updates not applied because of a non-finite loss or gradient


def init(model_cfg: PixelDiTConfig, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """Build a fresh state (meant to run under jax.jit with out_shardings: nothing lands on host)."""
  params = nnx.to_pure_dict(nnx.state(PixelDiT(model_cfg, rngs=nnx.Rngs(params=seed)), nnx.Param))
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      ema_params=jax.tree.map(lambda p: p.astype(jnp.float32), params),
      opt_state=tx.init(params), rng=jax.random.PRNGKey(seed + 1),
      nonfinite_step=jnp.full((), -1, jnp.int32), skipped_updates=jnp.zeros((), jnp.int32))


def shardings(abstract_model: PixelDiT, tx, mesh, rules) -> TrainState:
  """NamedShardings for every leaf of the train state: params by their logical names, optimizer
  moments like their params, scalars replicated."""
  specs = sharding.param_specs(abstract_model, mesh, rules)
  params = sharding.named(mesh, specs)
  repl = sharding.replicated(mesh)
  abstract_params = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, params,
                              transform_non_params=lambda _: repl)
  return TrainState(step=repl, params=params, ema_params=params, opt_state=opt, rng=repl,
                    nonfinite_step=repl, skipped_updates=repl)


def abstract_state(model_cfg, tx, seed, state_shardings) -> TrainState:
  """ShapeDtypeStructs carrying the target shardings (restore targets)."""
  shapes = jax.eval_shape(lambda: init(model_cfg, tx, seed))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, state_shardings)
