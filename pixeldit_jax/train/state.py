"""The train state, its shardings, and its initialisation directly onto the mesh.

Weights are nested dicts of arrays (the on-disk layout of ``checkpoint.py``); the model graph is
kept apart and merged with them inside jitted functions (``nnx.merge(graphdef, params)``).

With LoRA (config.train.lora.rank > 0, ``pixeldit_jax.model.lora``) `params` is the frozen base,
`lora` = {"params": adapters, "ema": their EMA} is what is trained, the optimizer state is that of
(adapters, projector) only, and `ema_params` is {} (the base does not move, so it has no EMA).
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
from pixeldit_jax.model import lora as lora_lib
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
  lora: Any = flax.struct.field(default_factory=dict)  # {"params", "ema"} adapters; {} without LoRA


def _params(module: Optional[nnx.Module]) -> dict:
  return {} if module is None else nnx.to_pure_dict(nnx.state(module, nnx.Param))


def lora_on(lora_cfg) -> bool:
  return bool(lora_cfg is not None and lora_cfg.get("rank", 0) > 0)


def init(model_cfg: PixelDiTConfig, tx: optax.GradientTransformation, seed: int,
         make_projector: Optional[Callable[[], nnx.Module]] = None, lora_cfg=None) -> TrainState:
  """Build a fresh state (meant to run under jax.jit with out_shardings: nothing lands on host)."""
  model = pixeldit_lib.model_class(model_cfg)(model_cfg, rngs=nnx.Rngs(params=seed))
  params = _params(model)
  projector = _params(make_projector() if make_projector else None)
  lora, ema = {}, jax.tree.map(lambda p: p.astype(jnp.float32), params)
  if lora_on(lora_cfg):
    c = lora_lib.lora_config_of(lora_cfg)
    adapters = lora_lib.adapters(lora_lib.apply(model, c["rank"], c["alpha"], c["targets"], seed=seed + 7))
    lora, ema = {"params": adapters, "ema": jax.tree.map(lambda p: p.astype(jnp.float32), adapters)}, {}
  trained = lora["params"] if lora else params
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, ema_params=ema, projector=projector,
      opt_state=tx.init((trained, projector)), rng=jax.random.PRNGKey(seed + 1),
      nonfinite_step=jnp.full((), -1, jnp.int32), skipped_updates=jnp.zeros((), jnp.int32), lora=lora)


def shardings(abstract_model: nnx.Module, tx, mesh, rules,
              abstract_projector: Optional[nnx.Module] = None,
              abstract_lora_model: Optional[nnx.Module] = None) -> TrainState:
  """NamedShardings for every leaf of the train state: params by their logical names, optimizer
  moments like their params, scalars replicated. `abstract_lora_model` (the adapted model,
  lora.build_abstract) switches to the LoRA layout: adapters by their logical names."""
  def named(module):
    return {} if module is None else sharding.named(mesh, sharding.param_specs(module, mesh, rules))

  params, projector = named(abstract_model), named(abstract_projector)
  repl = sharding.replicated(mesh)
  lora, ema, trained, trained_abstract = {}, params, params, _params(abstract_model)
  if abstract_lora_model is not None:
    adapters = sharding.named(mesh, lora_lib.specs(abstract_lora_model, mesh, rules))
    lora, ema, trained = {"params": adapters, "ema": adapters}, {}, adapters
    trained_abstract = lora_lib.adapters(abstract_lora_model)
  abstract_opt = jax.eval_shape(tx.init, (trained_abstract, _params(abstract_projector)))
  # CAME's factored moments keep the param's rank with a reduced axis of size 1: that axis is
  # replicated (state_sharding); AdamW's moments get the param's sharding unchanged.
  opt = optax.tree_map_params(tx, came_lib.state_sharding, abstract_opt, (trained, projector),
                              transform_non_params=lambda _: repl)
  return TrainState(step=repl, params=params, ema_params=ema, projector=projector, opt_state=opt,
                    rng=repl, nonfinite_step=repl, skipped_updates=repl, lora=lora)


def abstract_state(model_cfg, tx, seed, state_shardings, make_projector=None, lora_cfg=None) -> TrainState:
  """ShapeDtypeStructs carrying the target shardings (restore targets)."""
  shapes = jax.eval_shape(lambda: init(model_cfg, tx, seed, make_projector, lora_cfg))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, state_shardings)
