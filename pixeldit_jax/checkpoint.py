"""The one place that talks to Orbax.

A checkpoint directory is managed by an Orbax ``CheckpointManager``; each step holds named items:

  ``ema_params``  EMA weights (what the sampler loads), pure dict of the model's nnx.Param state
  ``params``      online weights (training only)
  ``meta``        JSON: format tag, the model config (so a checkpoint rebuilds its own model),
                  where the weights came from

The official-checkpoint importer writes ``ema_params`` + ``meta``; training adds its own items.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp
from flax import nnx

from pixeldit_jax.model import PixelDiTConfig, PixelDiT
from pixeldit_jax.model import pixeldit as pixeldit_lib

FORMAT = "pixeldit-jax/1"
EMA_PARAMS, PARAMS, META = "ema_params", "params", "meta"


class CheckpointError(RuntimeError):
  pass


def _manager(directory: str, create: bool) -> ocp.CheckpointManager:
  directory = os.path.abspath(os.path.expanduser(directory))  # Orbax wants absolute paths
  if not create and not os.path.isdir(directory):
    raise CheckpointError(f"No checkpoint directory at {directory}")
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=create))


def param_dict(model: nnx.Module) -> dict:
  """The model's parameters as a nested dict of arrays (the on-disk layout)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def save_weights(directory: str, step: int, weights: Mapping[str, Mapping], meta: Mapping[str, Any]):
  """Write weight trees (item name -> pure dict) and a JSON meta record as checkpoint `step`."""
  items = {name: ocp.args.StandardSave(tree) for name, tree in weights.items()}
  items[META] = ocp.args.JsonSave({"format": FORMAT, **meta})
  with _manager(directory, create=True) as mngr:
    mngr.save(step, args=ocp.args.Composite(**items), force=True)
    mngr.wait_until_finished()


def read_meta(directory: str, step: Optional[int] = None) -> tuple[int, dict]:
  with _manager(directory, create=False) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"{directory} holds no checkpoint")
    meta = mngr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
  if meta.get("format") != FORMAT:
    raise CheckpointError(f"{directory} step {step}: unknown checkpoint format {meta.get('format')!r}")
  return step, meta


def load_model(directory: str, item: str = EMA_PARAMS, step: Optional[int] = None,
               **config_overrides) -> tuple[PixelDiT, dict]:
  """Rebuild the model recorded in a checkpoint's meta and load one weight item into it.

  `config_overrides` may change numerics-only fields (dtype, remat_policy, attention_impl).
  """
  step, meta = read_meta(directory, step)
  cfg = PixelDiTConfig.from_dict({**meta["model"], **config_overrides})
  abstract = pixeldit_lib.abstract(cfg)
  graphdef, state = nnx.split(abstract)
  params_target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), params_target)
  with _manager(directory, create=False) as mngr:
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))
    except Exception as e:  # noqa: BLE001 - re-raised with the path and item that failed
      raise CheckpointError(f"Could not restore item {item!r} of step {step} from {directory}: {e}") from e
  model = nnx.merge(graphdef, state)
  nnx.update(model, _as_state(model, restored[item]))
  return model, meta


def _as_state(model: nnx.Module, tree: Mapping) -> nnx.State:
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, tree)
  return state
