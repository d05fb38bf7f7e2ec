"""The train state, its shardings, and its initialisation directly onto the mesh.

Weights are nested dicts of arrays (the on-disk layout of ``checkpoint.py``); the model graph is
kept apart and merged with them inside jitted functions (``nnx.merge(graphdef, params)``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pixeldit_jax import sharding
from pixeldit_jax.train import came as came_lib
from pixeldit_jax.model import PixelDiTConfig
from pixeldit_jax.model import pixeldit as pixeldit_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # completed optimizer steps
  params: Any
  ema_params: Any  # fp32 exponential moving average of params
  projector: Any  # REPA projector parameters ({} without REPA); optimised with params
  opt_state: Any  # of the pair (params, projector)
  rng: jax.Array  # raw uint32[2] key; per-step keys are fold_in(rng, step)
  nonfinite_step: jax.Array  # first step (1-based, as in metrics.jsonl) not applied, -1 if none
  skipped_updates: jax.Array  # updates not applied: non-finite loss, gradient or update


def _params(module: Optional[nnx.Module]) -> dict:
  return {} if module is None else nnx.to_pure_dict(nnx.state(module, nnx.Param))


def init(model_cfg: PixelDiTConfig, tx: optax.GradientTransformation, seed: int,
         make_projector: Optional[Callable[[], nnx.Module]] = None) -> TrainState:
  """Build a fresh state (meant to run under jax.jit with out_shardings: nothing lands on host)."""
  params = _params(pixeldit_lib.model_class(model_cfg)(model_cfg, rngs=nnx.Rngs(params=seed)))
  projector = _params(make_projector() if make_projector else None)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      ema_params=jax.tree.map(lambda p: p.astype(jnp.float32), params), projector=projector,
      opt_state=tx.init((params, projector)), rng=jax.random.PRNGKey(seed + 1),
      nonfinite_step=jnp.full((), -1, jnp.int32), skipped_updates=jnp.zeros((), jnp.int32))


def shardings(abstract_model: nnx.Module, tx, mesh, rules,
              abstract_projector: Optional[nnx.Module] = None) -> TrainState:
  """NamedShardings for every leaf of the train state: params by their logical names, optimizer
  moments like their params, scalars replicated."""
  def named(module):
    return {} if module is None else sharding.named(mesh, sharding.param_specs(module, mesh, rules))

  params, projector = named(abstract_model), named(abstract_projector)
  repl = sharding.replicated(mesh)
  abstract_opt = jax.eval_shape(tx.init, (_params(abstract_model), _params(abstract_projector)))
  # CAME's factored moments keep the param's rank with a reduced axis of size 1: that axis is
  # replicated (state_sharding); AdamW's moments get the param's sharding unchanged.
  opt = optax.tree_map_params(tx, came_lib.state_sharding, abstract_opt, (params, projector),
                              transform_non_params=lambda _: repl)
  return TrainState(step=repl, params=params, ema_params=params, projector=projector, opt_state=opt,
                    rng=repl, nonfinite_step=repl, skipped_updates=repl)


def abstract_state(model_cfg, tx, seed, state_shardings, make_projector=None) -> TrainState:
  """ShapeDtypeStructs carrying the target shardings (restore targets)."""
  shapes = jax.eval_shape(lambda: init(model_cfg, tx, seed, make_projector))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, state_shardings)
