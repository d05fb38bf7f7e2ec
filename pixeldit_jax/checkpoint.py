"""The one place that talks to Orbax.

A checkpoint directory is managed by an Orbax ``CheckpointManager``; each step holds named items:

  ``ema_params``  EMA weights (what the sampler loads), pure dict of the model's nnx.Param state
  ``params``      online weights (training only)
  ``opt_state``   optimizer state (training only)
  ``repa_projector`` REPA projector weights (runs with REPA, and imported official checkpoints)
  ``train``       step, RNG, non-finite bookkeeping (training only)
  ``data``        the Grain iterator position (training only)
  ``meta``        JSON: format tag, the model config (so a checkpoint rebuilds its own model),
                  where the weights came from, the experiment config
  ``lora``        LoRA adapters {"params", "ema"} (LoRA runs only; see below)

The official-checkpoint importer writes ``ema_params`` + ``meta``; training writes all items.

A LoRA run (config.train.lora.rank > 0) saves ``lora``, ``opt_state`` (of the adapters), ``train``,
``data`` and ``meta``, and no ``params``/``ema_params``: its base weights are the frozen
``init_from`` checkpoint, recorded in meta["lora"] (``base``, ``base_step``, ``base_item``, with
``rank``, ``alpha``, ``targets``), so a step is a few MB. Readers that only know ``ema_params``
fail on it loudly instead of sampling the base model; ``sample``/``edit`` (through
``sample._restore``) load base + adapters, and ``tools/merge_lora`` writes a plain checkpoint.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping, Optional

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint.checkpoint_managers import preservation_policy as ocp_keep
from orbax.checkpoint.checkpoint_managers import save_decision_policy as ocp_save

from pixeldit_jax import cli, distributed, fs
from pixeldit_jax.model import PixelDiTConfig, PixelDiT
from pixeldit_jax.model import pixeldit as pixeldit_lib

FORMAT = "pixeldit-jax/1"
EMA_PARAMS, PARAMS, OPT_STATE, TRAIN, DATA, META = (
    "ema_params", "params", "opt_state", "train", "data", "meta")
REPA_PROJECTOR = "repa_projector"
LORA = "lora"
_TRAIN_FIELDS = ("step", "rng", "nonfinite_step", "skipped_updates")


class CheckpointError(RuntimeError):
  pass


class RunMismatchError(CheckpointError):
  """The checkpoint is readable but belongs to a differently configured run."""


class DataChangedError(RunMismatchError):
  """The checkpoint was trained on other data than the config now reads."""


class NoReadableCheckpointError(CheckpointError):
  """A training workdir has checkpoints, but none of them restores."""


cli.register(CheckpointError)  # entry points print these as one `error:` line


def _manager(directory: str, create: bool) -> ocp.CheckpointManager:
  directory = fs.resolve(directory)  # Orbax wants absolute paths (URLs stay as they are)
  if not create and not fs.isdir(directory):
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


def items(directory: str, step: Optional[int] = None) -> set[str]:
  """Names of the items saved at `step` (default: the latest)."""
  step, _ = read_meta(directory, step)
  path = fs.path(directory) / str(step)
  return {c.name for c in path.iterdir() if c.is_dir()}


def _onto_reader(abstract_params):
  """Leaves without a sharding get this process's first device. Orbax would otherwise use the
  sharding recorded at save time, which names the writer's devices ("Topology mismatch")."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda s: s if getattr(s, "sharding", None) is not None
                      else jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract_params)


def load_params(directory: str, abstract_params, item: str = EMA_PARAMS, step: Optional[int] = None):
  """Restore one weight item onto the shapes, dtypes and shardings of `abstract_params`
  (a pure dict of ShapeDtypeStructs; without shardings the arrays land on the default device,
  whatever devices the checkpoint was written from)."""
  step, _ = read_meta(directory, step)
  abstract_params = _onto_reader(abstract_params)
  with _manager(directory, create=False) as mngr:
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract_params)}))
    except Exception as e:  # noqa: BLE001 - re-raised with the path and item that failed
      raise CheckpointError(f"Could not restore item {item!r} of step {step} from {directory}: {e}") from e
  return restored[item]


def lora_record(directory: str, step: Optional[int] = None) -> Optional[dict]:
  """meta["lora"] of a LoRA run's checkpoint step (default: the latest), else None."""
  _, meta = read_meta(directory, step)
  return meta.get("lora")


def load_adapters(directory: str, step: Optional[int] = None, which: str = "ema",
                  sharding: Optional[jax.sharding.Sharding] = None) -> tuple[int, dict, dict]:
  """(step, adapters pure dict, meta["lora"]) of a LoRA checkpoint; `which` is "ema" (what the
  sampler uses) or "params" (the online adapters)."""
  from pixeldit_jax.model import lora as lora_lib  # noqa: PLC0415
  step, meta = read_meta(directory, step)
  record = meta.get("lora")
  if not record:
    raise CheckpointError(f"{directory} step {step} holds no LoRA adapters (no meta['lora'] record)")
  cfg = PixelDiTConfig.from_dict(meta["model"])
  abstract = lora_lib.adapters(lora_lib.build_abstract(cfg, record))
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract)
  tree = load_params(directory, {"params": target, "ema": target}, LORA, step)
  return step, tree[which], record


def load_params_latest_readable(directory: str, target, item: str = EMA_PARAMS) -> tuple[int, Any]:
  """(step, weights) of the newest step whose `item` restores, walking back past unreadable steps
  (each failure logged) the way training resumes, but read-only: nothing is renamed. `target` is
  load_params' abstract tree, or a function of the step returning it (so the model can be rebuilt
  from that step's own meta, which may be what is damaged)."""
  with _manager(directory, create=False) as mngr:
    steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    raise CheckpointError(f"{directory} holds no checkpoint")
  last = None
  for step in steps:
    try:
      params = load_params(directory, target(step) if callable(target) else target, item, step)
    except Exception as e:  # noqa: BLE001 - any failure to read a step means: try an older one
      last = f"{type(e).__name__}: {str(e)[:300]}"
      logging.warning("Checkpoint step %d in %s cannot be restored (%s); trying the previous one.",
                      step, directory, last)
      continue
    if step != steps[0]:
      logging.warning("Using checkpoint step %d of %s: the newer steps cannot be restored.", step, directory)
    return step, params
  raise NoReadableCheckpointError(f"No checkpoint step in {directory} can be restored (tried steps "
                        f"{', '.join(map(str, steps))}; the oldest failed with {last.splitlines()[0]})")


def model_config(directory: str, step: Optional[int] = None, **overrides) -> PixelDiTConfig:
  """The model config recorded in a checkpoint, with numerics-only fields overridden."""
  _, meta = read_meta(directory, step)
  return PixelDiTConfig.from_dict({**meta["model"], **overrides})


def load_model(directory: str, item: str = EMA_PARAMS, step: Optional[int] = None,
               sharding: Optional[jax.sharding.Sharding] = None,
               **config_overrides) -> tuple[PixelDiT, dict]:
  """Rebuild the model recorded in a checkpoint's meta and load one weight item into it, on this
  process's first device (or `sharding`, for every weight) whatever devices wrote it.

  `config_overrides` may change numerics-only fields (dtype, remat_policy, attention_impl).
  """
  step, meta = read_meta(directory, step)
  cfg = PixelDiTConfig.from_dict({**meta["model"], **config_overrides})
  abstract = pixeldit_lib.abstract(cfg)
  graphdef, state = nnx.split(abstract)
  params_target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        params_target)
  params = load_params(directory, target, item, step)
  model = nnx.merge(graphdef, state)
  nnx.update(model, _as_state(model, params))
  return model, meta


def _as_state(model: nnx.Module, tree: Mapping) -> nnx.State:
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, tree)
  return state


def multihost_sync(name: str):
  distributed.barrier(name)  # through the coordinator: no device collective to time out


class TrainCheckpointer:
  """Saves and restores the whole train state plus the data iterator, for exact resumption.

  Saves are asynchronous; the save-decision policy saves every `every` steps (and, in
  multi-process runs, at a preemption notice), the preservation policy keeps the latest `keep`.
  Restoring walks back from the newest step past any checkpoint that fails to load.
  """

  def __init__(self, directory: str, *, every: int, keep: int):
    self.directory = fs.resolve(directory)
    save_policy = ocp_save.FixedIntervalPolicy(every)
    if distributed.preemption_service_active():  # SIGTERM to any process: one save, same step
      save_policy = ocp_save.AnySavePolicy([save_policy, ocp_save.PreemptionCheckpointingPolicy()])
    self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        save_decision_policy=save_policy, preservation_policy=ocp_keep.LatestN(keep), create=True))

  def save(self, state, data_iter, meta: Mapping[str, Any], step: int, force: bool = False) -> bool:
    """Save `state` (a TrainState) as `step` if the policy says so (or `force`).

    The caller passes the step it counted on the host: reading state.step back would make every
    step wait for the device."""
    if force and step in self.manager.all_steps():
      return False
    # A LoRA run's base weights are frozen and live in its init_from checkpoint: only adapters.
    weights = ({LORA: ocp.args.StandardSave(state.lora)} if state.lora else
               {PARAMS: ocp.args.StandardSave(state.params),
                EMA_PARAMS: ocp.args.StandardSave(state.ema_params)})
    items = {
        **weights,
        OPT_STATE: ocp.args.StandardSave(state.opt_state),
        **({REPA_PROJECTOR: ocp.args.StandardSave(state.projector)} if state.projector else {}),
        TRAIN: ocp.args.StandardSave({k: getattr(state, k) for k in _TRAIN_FIELDS}),
        DATA: grain.checkpoint.CheckpointSave(data_iter),
        META: ocp.args.JsonSave({"format": FORMAT, **meta}),
    }
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore_latest(self, abstract_state, data_iter, restart_if_unreadable: bool = False,
                     data_record: Optional[Mapping] = None, allow_data_change: bool = False,
                     lora_record: Optional[Mapping] = None):
    """The newest readable checkpoint restored onto `abstract_state`'s shardings, or None when
    there is none. Newer unreadable steps are set aside. When steps exist but none restores, raises
    NoReadableCheckpointError, leaving them untouched; `restart_if_unreadable` instead sets them
    all aside and returns None (start over). A checkpoint whose meta records other data than
    `data_record` (data.identity) raises DataChangedError, unless `allow_data_change`.

    `data_iter` is moved to the saved position in place. For a LoRA run (abstract_state.lora
    set) the returned state's `params` are still the abstract base: the caller loads the base;
    a step with other LoRA settings than `lora_record` (rank, alpha, targets) is a
    RunMismatchError.
    """
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state = self._restore(step, abstract_state, data_iter, data_record, allow_data_change,
                              lora_record)
      except RunMismatchError:
        raise
      except Exception as e:  # noqa: BLE001 - any failure to read a step means: try an older one
        logging.error("Checkpoint step %d in %s cannot be restored (%s: %s); trying the previous one.",
                      step, self.directory, type(e).__name__, str(e)[:500])
        failed.append((step, type(e).__name__))
        continue
      for bad, _ in failed:  # only once an older step restored: nothing is moved before that
        self._set_aside(bad)
      return state
    if failed and not restart_if_unreadable:
      tried = ", ".join(f"{step} ({err})" for step, err in failed)
      raise NoReadableCheckpointError(
          f"No checkpoint in {self.directory} can be restored (tried steps {tried}; details in the "
          "log); they are left as they are. Repair or move them to resume, or start over from step "
          "0 with --config.train.restart_if_unreadable=True (which sets them aside).")
    if failed:
      logging.warning("No checkpoint in %s can be restored; setting steps %s aside and starting over "
                      "(config.train.restart_if_unreadable).", self.directory,
                      ", ".join(str(step) for step, _ in failed))
      for bad, _ in failed:
        self._set_aside(bad)
    return None

  def _set_aside(self, step: int):
    """Rename an unreadable step so it is kept for inspection but never restored or overwritten."""
    path = fs.join(self.directory, str(step))
    if jax.process_index() == 0 and fs.isdir(path):
      fs.rename(path, f"{path}.unreadable-{int(time.time())}")
    multihost_sync(f"set_aside_{step}")
    self.manager.reload()

  def _check_data(self, step, data_record, allow_data_change):
    from pixeldit_jax.data import identity  # noqa: PLC0415 - the data package imports grain workers
    meta = self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
    problem = identity.mismatch(meta.get("data"), data_record)
    if problem is None:
      return
    if allow_data_change:
      logging.warning("Resuming step %d of %s on other data (config.train.allow_data_change): it "
                      "trained on %s", step, self.directory, problem)
      return
    raise DataChangedError(
        f"Checkpoint step {step} in {self.directory} was trained on {problem}. Point config.data at "
        "the data the run trained on to resume, or resume on the new data with "
        "--config.train.allow_data_change=True.")

  def _check_lora(self, step, want: bool, lora_record):
    has = fs.isdir(fs.join(self.directory, str(step), LORA))
    if want != has:
      raise RunMismatchError(
          f"Checkpoint step {step} in {self.directory} was saved {'without' if want else 'with'} "
          f"LoRA, but the config now has config.train.lora.rank {'> 0' if want else '= 0'}. Keep the "
          "original setting to resume, or start a new workdir (with --config.train.init_from=... to "
          "start from its weights; python -m pixeldit_jax.tools.merge_lora makes a LoRA run's "
          "weights a plain checkpoint).")
    if not want or lora_record is None:
      return
    meta = self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
    saved = meta.get("lora") or {}
    keys = ("rank", "alpha", "targets")
    if any(saved.get(k) != lora_record.get(k) for k in keys):
      raise RunMismatchError(
          f"Checkpoint step {step} in {self.directory} has LoRA "
          f"{ {k: saved.get(k) for k in keys} }, the config { {k: lora_record.get(k) for k in keys} }. "
          "Keep the original config.train.lora to resume, or start a new workdir.")

  def _restore(self, step, abstract_state, data_iter, data_record=None, allow_data_change=False,
               lora_record=None):
    if data_record is not None:
      self._check_data(step, data_record, allow_data_change)
    want_lora = bool(abstract_state.lora)
    self._check_lora(step, want_lora, lora_record)
    want_projector = bool(abstract_state.projector)
    if want_projector != fs.isdir(fs.join(self.directory, str(step), REPA_PROJECTOR)):
      # The optimizer state's structure differs too: not resumable, but not a damaged checkpoint.
      raise RunMismatchError(
          f"Checkpoint step {step} in {self.directory} was saved "
          f"{'without' if want_projector else 'with'} REPA, but the config now has REPA "
          f"{'on' if want_projector else 'off'}. Keep the original setting to resume, or start a "
          f"new workdir with --config.train.init_from={self.directory} to keep the weights.")
    weights = ({LORA: ocp.args.StandardRestore(abstract_state.lora)} if want_lora else
               {PARAMS: ocp.args.StandardRestore(abstract_state.params),
                EMA_PARAMS: ocp.args.StandardRestore(abstract_state.ema_params)})
    items = {
        **weights,
        OPT_STATE: ocp.args.StandardRestore(abstract_state.opt_state),
        **({REPA_PROJECTOR: ocp.args.StandardRestore(abstract_state.projector)}
           if want_projector else {}),
        TRAIN: ocp.args.StandardRestore({k: getattr(abstract_state, k) for k in _TRAIN_FIELDS}),
        DATA: grain.checkpoint.CheckpointRestore(data_iter),
    }
    r = self.manager.restore(step, args=ocp.args.Composite(**items))
    weights = (dict(lora=r[LORA]) if want_lora else dict(params=r[PARAMS], ema_params=r[EMA_PARAMS]))
    return abstract_state.replace(projector=r[REPA_PROJECTOR] if want_projector else {},
                                  opt_state=r[OPT_STATE], **weights, **r[TRAIN])

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
