"""The training loop: mesh, sharded state, data, one jitted step, metrics, samples, checkpoints.

    train(config, workdir) -> summary dict

The run resumes from the newest readable checkpoint in ``<workdir>/checkpoints``; when there are
checkpoints but none restores, it stops (NoReadableCheckpointError) unless
config.train.restart_if_unreadable, and on other data than the checkpoint records it stops
(DataChangedError) unless config.train.allow_data_change. SIGTERM makes it save and stop cleanly at
the next step; in a run of several processes, SIGTERM to any one of them reaches all through JAX's
preemption service, and all save the same step and stop. One run at a time owns the workdir
(``workdir_lock``).

Steps are named by how many are done: the step that takes the state from 4 to 5 completed steps
is step 5, in metrics.jsonl, TensorBoard, the console and errors alike.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from typing import Optional

import jax
import ml_collections
import numpy as np
from clu import parameter_overview
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from pixeldit_jax import checkpoint as ckpt_lib
from pixeldit_jax import cli, config_lib, data, distributed, fs, images, logs, sharding, xla_options
from pixeldit_jax import sample as sample_lib
from pixeldit_jax.model import abstract as abstract_model
from pixeldit_jax.model import lora as lora_lib
from pixeldit_jax.model.cost import forward_flops
from pixeldit_jax.train import metrics as metrics_lib
from pixeldit_jax.train import optimizer as optimizer_lib
from pixeldit_jax.train import profiling
from pixeldit_jax.train import conditioning as conditioning_lib
from pixeldit_jax.train import repa as repa_lib
from pixeldit_jax.train import state as state_lib
from pixeldit_jax.train import step as step_lib
from pixeldit_jax.train import workdir_lock


class NonFiniteError(FloatingPointError):
  pass


cli.register(NonFiniteError)  # entry points print it as one `error:` line


class _StopFlag:
  """Set by SIGTERM in a single-process run; the loop checks it once per step.

  In a run of several processes it installs nothing: JAX's preemption service owns SIGTERM there
  (a Python handler would replace its C++ one), tells every process, and the loop stops where
  reached_preemption_sync_point agrees on a step (see pixeldit_jax.distributed)."""

  def __init__(self):
    self.stop = False
    self._previous = None

  def __enter__(self):
    if distributed.preemption_service_active():
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no signal handling
      self._previous = None
    return self

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint and stopping after this step.")
    self.stop = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _grid_path(workdir: str, step: int) -> str:
  return fs.join(workdir, "samples", f"step_{step:08d}.png")


def _sample_grid(sample_fn, params, config, mesh, rules, step: int, workdir: str, writer, cond):
  """Samples with the EMA weights written as a PNG grid: one row per class (class-conditional)
  or per prompt of config.train.sample_prompts (text-to-image)."""
  tcfg = config.train
  per_row = tcfg.sample_per_row
  h, w = config.image_size
  batch_devices = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
  if cond.text:
    prompts = conditioning_lib.sample_prompts(config)[:tcfg.sample_rows]
    rows = len(prompts)
    conds = np.repeat(cond.embed(prompts), per_row, axis=0)
  else:
    rows = min(cond.num_classes, tcfg.sample_rows)
    conds = np.repeat(np.arange(rows), per_row).astype(np.int32)
  n = rows * per_row
  padded = -(-n // batch_devices) * batch_devices
  conds = np.concatenate([conds, np.repeat(conds[:1], padded - n, axis=0)])
  put = lambda a: jax.device_put(a, sharding.batch_sharding(mesh, rules, a.ndim))
  args = (put(conds), put(np.repeat(cond.null_emb, padded, axis=0))) if cond.text else (put(conds),)
  out = sample_fn(params, put(np.arange(padded, dtype=np.int32)), *args)
  out = np.asarray(multihost_utils.process_allgather(out, tiled=True))[:n]
  grid = images.grid(out, rows)
  if jax.process_index() == 0:
    path = _grid_path(workdir, step)
    images.save_png(grid, path, scale=max(1, 256 // max(h, w)))
    writer.write_images(step, {"samples/ema": grid})
    return path
  return None


def _setup_repa(config, model_cfg, mesh):
  """REPA's projector and frozen teacher; stops at once when the teacher weights are missing."""
  rcfg = config.get("repa")
  if rcfg is None or rcfg.weight <= 0:
    return None, None, None, {}
  make_projector = lambda: repa_lib.make_projector(model_cfg, rcfg, config.seed)
  abstract_projector = nnx.eval_shape(make_projector)
  h, w = config.image_size
  p = model_cfg.patch_size
  size = tuple(rcfg.teacher_size) if rcfg.get("teacher_size") else (14 * h // p, 14 * w // p)
  grid = (size[0] // 14, size[1] // 14)
  if rcfg.get("features_path"):
    # Precomputed teacher features, looked up per example on the host (see repa_features).
    return abstract_projector, make_projector, step_lib.Teacher(None, size, grid), {}
  from pixeldit_jax.teacher import dinov2  # noqa: PLC0415
  if not rcfg.get("teacher_path"):
    raise FileNotFoundError(
        f"REPA is on (config.repa.weight={rcfg.weight}) but config.repa.teacher_path is not set. "
        "Provide the DINOv2 ViT-B/14 weights (the Hugging Face facebook/dinov2-base "
        "model.safetensors, or torch hub dinov2_vitb14_pretrain.pth) with "
        "--config.repa.teacher_path=PATH, or train without REPA with --config.repa.weight=0.")
  # "hub" position-embedding interpolation reproduces the official (torch.hub) targets also from
  # the Hugging Face weights.
  teacher_graphdef, teacher_params = dinov2.load_teacher(
      rcfg.teacher_path, dtype=rcfg.teacher_dtype, pos_interpolation="hub")
  teacher_params = jax.device_put(teacher_params, sharding.replicated(mesh))
  features = lambda params, images01, input_size: dinov2.teacher_features(
      teacher_graphdef, params, images01, input_size)
  teacher = step_lib.Teacher(features, size, grid)
  return abstract_projector, make_projector, teacher, {"teacher": teacher_params}


class MissingInputsError(FileNotFoundError):
  """Inputs of the config that are not there: all of them, in one message."""


def _setup_inputs(config, model_cfg, mesh):
  """The REPA teacher, the conditioning (text encoder or cache), precomputed REPA features and the
  data pipeline. Everything that can be missing fails here, before any compilation, and all of it
  at once: one rerun, not three, to learn that a stage needs text, data and teacher paths."""
  missing = []

  def gather(fn):
    try:
      return fn()
    except FileNotFoundError as e:
      missing.append(cli.message(e))
      return None

  repa = gather(lambda: _setup_repa(config, model_cfg, mesh))
  cond = gather(lambda: conditioning_lib.make(config))
  teacher = repa[2] if repa else None
  feature_table = None
  if teacher is not None and teacher.features_fn is None:
    from pixeldit_jax.train.repa_features import FeatureTable  # noqa: PLC0415
    feature_table = gather(lambda: FeatureTable(config.repa.features_path, teacher.grid[0] * teacher.grid[1],
                                                config.repa.teacher_dim))
  text = config.model.get("text_dim") is not None
  pipeline = gather(lambda: data.build_text_image(config) if text else data.build(config))
  if len(missing) == 1:
    raise MissingInputsError(missing[0])
  if missing:
    raise MissingInputsError(f"{len(missing)} inputs are missing: "
                             + " ".join(f"({i}) {m}" for i, m in enumerate(missing, 1)))
  return repa, cond, feature_table, pipeline


def _lora_base(directory: str) -> dict:
  """Where a LoRA run's frozen base comes from: the init_from checkpoint's latest step, its EMA
  weights where it has them (what its sampler uses), else its online weights."""
  if ckpt_lib.lora_record(directory):
    raise ckpt_lib.CheckpointError(
        f"config.train.init_from={directory} is itself a LoRA run; merge it first "
        "(python -m pixeldit_jax.tools.merge_lora) and start from the merged checkpoint")
  step, _ = ckpt_lib.read_meta(directory)
  items = ckpt_lib.items(directory, step)
  item = ckpt_lib.EMA_PARAMS if ckpt_lib.EMA_PARAMS in items else ckpt_lib.PARAMS
  return dict(base=fs.resolve(directory), base_step=int(step), base_item=item)


def _load_lora_base(state, base: dict, state_shardings):
  """The frozen base weights of a LoRA run into state.params (fresh start and resume alike)."""
  target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        state.params, state_shardings.params)
  try:
    params = ckpt_lib.load_params(base["base"], target, base["base_item"], base["base_step"])
  except ckpt_lib.CheckpointError as e:
    raise ckpt_lib.CheckpointError(
        f"The LoRA run's base weights ({base['base_item']} of step {base['base_step']} in "
        f"{base['base']}) cannot be read: {e}") from e
  logging.info("LoRA base weights from %s step %d (%s)", base["base"], base["base_step"], base["base_item"])
  return state.replace(params=params)


def _load_initial_weights(state, directory: str, state_shardings):
  """Start from another run's or an imported checkpoint's weights with a fresh optimizer (the
  official --load_from between T2I stages): the online weights (or EMA where there are none), and
  the REPA projector when both sides have one."""
  items = ckpt_lib.items(directory)
  item = ckpt_lib.PARAMS if ckpt_lib.PARAMS in items else ckpt_lib.EMA_PARAMS
  target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        state.params, state_shardings.params)
  params = ckpt_lib.load_params(directory, target, item)
  ema = jax.tree.map(lambda a: a.astype(jax.numpy.float32), params)
  projector = state.projector
  if state.projector and ckpt_lib.REPA_PROJECTOR in items:
    ptarget = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                           state.projector, state_shardings.projector)
    projector = ckpt_lib.load_params(directory, ptarget, ckpt_lib.REPA_PROJECTOR)
  logging.info("Initial weights from %s (%s%s)", directory, item,
               ", REPA projector" if projector is not state.projector else "")
  return state.replace(params=params, ema_params=ema, projector=projector)


def _interval_line(done: int, total: int, scalars: dict) -> str:
  """The console's one line per log interval."""
  line = (f"step {done}/{total}: loss {scalars['loss']:.4f}, grad norm {scalars['grad_norm']:.3g}, "
          f"lr {scalars['learning_rate']:.3g}, {scalars['images_per_s']:.1f} img/s, "
          f"{scalars['tflops_per_device']:.3g} TFLOP/s/device")
  if "mfu" in scalars:
    line += f", MFU {100 * scalars['mfu']:.1f}%"
  if scalars.get("skipped_updates"):
    line += f", {scalars['skipped_updates']:.0f} updates skipped"
  return line


def _report_start(config, model_cfg, params, mesh, workdir: str, start_step: int, end_step: int,
                  writer, adapters=None) -> None:
  """The parameter table to the log file; a few summary lines to the console; the config to
  TensorBoard (hparams and JSON text)."""
  logging.info("Parameters:\n%s", parameter_overview.get_parameter_overview(params, include_stats=False))
  h, w = config.image_size
  total = parameter_overview.count_parameters(params)
  gflops = forward_flops(model_cfg, h, w)["total"] / 1e9
  blocks = f"{model_cfg.patch_depth} patch + {model_cfg.pixel_depth} pixel blocks"
  logs.console("PixelDiT %.2f M parameters (hidden %d, %s, patch %d), %dx%dx%d images, %.3g GFLOPs "
               "per image", total / 1e6, model_cfg.hidden_size, blocks, model_cfg.patch_size, h, w,
               model_cfg.in_channels, gflops)
  if adapters:
    c = lora_lib.lora_config_of(config.train.lora)
    n = lora_lib.count(adapters)
    logs.console("LoRA rank %d (alpha %g) on %s: %d trainable parameters (%.3f%% of %.2f M; base frozen)",
                 c["rank"], c["alpha"], "+".join(c["targets"]), n, 100 * n / total, total / 1e6)
  devices = jax.devices()
  logs.console("Mesh %s over %d %s device(s), %d process(es); global batch %d; steps %d -> %d of %d",
               " ".join(f"{k}={v}" for k, v in mesh.shape.items()), len(devices),
               devices[0].platform, jax.process_count(), config.batch_size, start_step, end_step,
               config.train.num_steps)
  logs.console("Workdir %s (log: %s; TensorBoard via %s)", workdir, logs.path() or "-", writer.backend)
  writer.write_config(config, start_step)


def train(config, workdir: str, *, max_steps: Optional[int] = None) -> dict:
  """Train (or resume) the configured model in `workdir`. `max_steps` stops early (tests)."""
  workdir = fs.resolve(workdir)  # absolute when local; gs:// URLs stay URLs
  # Before anything is read or written: a second run on the workdir refuses here.
  with workdir_lock.hold(workdir, timeout_s=config.train.get("lock_timeout_s", 300.0)) as lock:
    return _train(config, workdir, lock, max_steps)


def _nonfinite_error(step: int, m: dict) -> NonFiniteError:
  return NonFiniteError(
      f"Non-finite loss, gradient or update at step {step} (loss {float(m['loss']):.4g}, grad norm "
      f"{float(m['grad_norm']):.4g}, learning rate {float(m['learning_rate']):.3g}); the update was "
      "not applied and the run stopped. Lower config.train.lr, or set "
      "config.train.nonfinite_policy='skip' to skip such updates.")


def _skips_error(first: int, last: int, m: dict, limit: int) -> NonFiniteError:
  return NonFiniteError(
      f"{last - first + 1} consecutive updates were non-finite and skipped (steps {first}-{last}; "
      f"last loss {float(m['loss']):.4g}, grad norm {float(m['grad_norm']):.4g}, learning rate "
      f"{float(m['learning_rate']):.3g}): the weights have not changed since step {first - 1}, and "
      f"the run stopped (config.train.max_consecutive_skips={limit}). Lower config.train.lr or "
      "check the data, then rerun to resume from the last checkpoint.")


def _train(config, workdir: str, lock, max_steps: Optional[int]) -> dict:
  tcfg = config.train
  model_cfg = config_lib.model_config(config)
  is_main = jax.process_index() == 0
  if config.batch_size % jax.process_count():
    raise ValueError(f"batch_size {config.batch_size} is not divisible by {jax.process_count()} processes")

  mesh = sharding.mesh_from_config(config.sharding)
  rules = tuple(tuple(r) for r in config.sharding.rules)
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % batch_devices:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the {batch_devices} "
                     "devices of the mesh's data and fsdp axes")
  model = abstract_model(model_cfg)
  lcfg = tcfg.get("lora")
  use_lora = state_lib.lora_on(lcfg)
  # With LoRA the step runs the adapted model; grids and checkpoints keep the base layout.
  lora_model = lora_lib.build_abstract(model_cfg, lcfg) if use_lora else None
  graphdef = nnx.graphdef(model)
  step_graphdef = nnx.graphdef(lora_model) if use_lora else graphdef
  (abstract_projector, make_projector, teacher, frozen), cond, feature_table, pipeline = (
      _setup_inputs(config, model_cfg, mesh))
  tx = optimizer_lib.for_training(tcfg, model, abstract_projector, lora_model)
  frozen.update(cond.frozen())
  state_shardings = state_lib.shardings(model, tx, mesh, rules, abstract_projector, lora_model)
  data_iter = iter(pipeline)
  checkpointer = ckpt_lib.TrainCheckpointer(fs.join(workdir, "checkpoints"),
                                            every=tcfg.checkpoint_every, keep=tcfg.keep_checkpoints)
  data_record = getattr(pipeline, "identity", None)
  meta = {"model": model_cfg.to_dict(), "config": json.loads(config.to_json_best_effort()),
          "time_convention": "t2i_sigma" if cond.text else "c2i_t", "data": data_record}

  lora_settings = lora_lib.lora_config_of(lcfg) if use_lora else None
  with sharding.use(mesh, rules):
    target = state_lib.abstract_state(model_cfg, tx, config.seed, state_shardings, make_projector,
                                      lcfg if use_lora else None)
    state = checkpointer.restore_latest(target, data_iter,
                                        restart_if_unreadable=tcfg.get("restart_if_unreadable", False),
                                        data_record=data_record,
                                        allow_data_change=tcfg.get("allow_data_change", False),
                                        lora_record=lora_settings)
    if state is None:
      state = jax.jit(lambda: state_lib.init(model_cfg, tx, config.seed, make_projector,
                                             lcfg if use_lora else None),
                      out_shardings=state_shardings)()
      if use_lora:
        base = _lora_base(tcfg.init_from)
        state = _load_lora_base(state, base, state_shardings)
      elif tcfg.get("init_from"):
        state = _load_initial_weights(state, tcfg.init_from, state_shardings)
      logging.info("Starting from scratch in %s", workdir)
    else:
      if use_lora:  # the base the run started from, as its checkpoint records it
        recorded = ckpt_lib.lora_record(checkpointer.directory, checkpointer.manager.latest_step())
        base = {k: recorded[k] for k in ("base", "base_step", "base_item")}
        state = _load_lora_base(state, base, state_shardings)
      logging.info("Resumed from step %d in %s", int(state.step), workdir)
    if use_lora:
      meta["lora"] = {**lora_settings, **base}
      merge_adapters = jax.jit(lambda p, a: lora_lib.merge_params(p, a, lora_lib.scale_of(lcfg)),
                               out_shardings=state_shardings.params)
      grid_weights = lambda st: merge_adapters(st.params, st.lora["ema"])  # EMA adapters, merged
    else:
      grid_weights = lambda st: st.ema_params

    frozen = jax.device_put(frozen, sharding.replicated(mesh))
    batch_sharding = lambda a: sharding.batch_sharding(mesh, rules, np.ndim(a))
    train_step = jax.jit(
        step_lib.make_train_step(step_graphdef, tx, config, teacher=teacher,
                                 projector_graphdef=nnx.graphdef(abstract_projector) if teacher else None,
                                 encode_text=cond.encode_tokens() if cond.text else None),
        out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    # The sampling binary's batch function (per-index noise made on device), Euler / DPM-Solver++
    # for grids.
    grid_settings = ml_collections.ConfigDict(dict(
        sampler="dpm_solver_pp_2m" if cond.text else "euler", num_steps=tcfg.sample_steps,
        cfg_scale=tcfg.sample_cfg_scale, cfg_interval=tuple(tcfg.sample_cfg_interval),
        time_shift=tcfg.time_shift, seed=tcfg.sample_seed))
    image_shape = (*config.image_size, model_cfg.in_channels)
    if cond.text:
      sample_fn = jax.jit(sample_lib.make_text_sample_batch(graphdef, grid_settings, image_shape),
                          in_shardings=(state_shardings.params, None, None, None),
                          compiler_options=xla_options.sampling())
    else:
      sample_fn = jax.jit(sample_lib.make_sample_batch(graphdef, grid_settings, image_shape,
                                                       model_cfg.num_classes),
                          in_shardings=(state_shardings.params, None, None),
                          compiler_options=xla_options.sampling())
    sample_fn = distributed.Synced(sample_fn, "sample_grid")
    h, w = config.image_size
    step_flops = 3 * config.batch_size * forward_flops(model_cfg, h, w)["total"]
    peak = metrics_lib.device_peak_tflops(tcfg.peak_tflops)
    start_step = int(jax.device_get(state.step))
    end_step = tcfg.num_steps if max_steps is None else min(tcfg.num_steps, start_step + max_steps)
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main, backend=tcfg.get("metric_writer", "auto"))
    if is_main:
      _report_start(config, model_cfg, target.params, mesh, workdir, start_step, end_step, writer,
                    adapters=target.lora.get("params") if use_lora else None)
    pcfg = tcfg.get("profile") or {}
    profiler = profiling.StepProfiler(workdir, pcfg.get("start_step", 0), pcfg.get("num_steps", 0),
                                      start_step, enabled=is_main)
    actions = metrics_lib.clu_periodic_actions() if is_main else None
    report_progress = actions and actions.ReportProgress(
        num_train_steps=tcfg.num_steps, every_steps=tcfg.log_every, every_secs=None)
    losses, pending, last_sample, summary_loss, compile_s = {}, [], None, None, None
    compiled_step, first_scalars = None, {}
    bar = tqdm(total=tcfg.num_steps, initial=start_step, disable=not is_main, desc="train",
               dynamic_ncols=True, smoothing=0.1)
    steps_since_log = 0
    stopped_by = None
    skipped_since = None  # the first step of the current run of skipped updates

    def stop(error):
      bar.close()
      checkpointer.wait()
      checkpointer.close()
      profiler.close()
      writer.close()
      raise error

    # The preemption sync point is the step after the furthest any process has reported: report
    # the start, so that a notice before the first step stops the run at its first step.
    checkpointer.reached_preemption(start_step)
    with _StopFlag() as flag:
      for step in range(start_step, end_step):
        local = next(data_iter)
        host = cond.prepare(local)
        if feature_table is not None:
          host["repa_target"] = feature_table(local["index"])
        batch = sharding.global_batch(host, mesh, rules)
        if compiled_step is None:
          # Compiled ahead of time and timed on its own, so that throughput never includes it.
          t0 = time.perf_counter()
          compiled_step = train_step.lower(state, batch, frozen).compile()
          compile_s = time.perf_counter() - t0
          # No process starts the step's collectives long before the others (compile skew).
          distributed.barrier("train_step_compiled")
          first_scalars = {"compile_s": compile_s}  # logged with the run's first interval
          if is_main:
            logs.console("Compiled the train step in %.1f s", compile_s)
          bar.unpause()  # the bar's rate and ETA leave the compile out too
          profiler(start_step)  # a trace from the first step starts after the compile
          t_log = time.perf_counter()
        state, m = compiled_step(state, batch, frozen)
        pending.append((step, m))
        steps_since_log += 1
        done = step + 1
        bar.update(1)
        profiler(done, m)
        if report_progress:
          report_progress(done)
        if done % tcfg.log_every == 0 or done == end_step:
          fetched = jax.device_get([(s, mm) for s, mm in pending])
          pending = []
          elapsed = time.perf_counter() - t_log
          first_bad = None
          for s, mm in fetched:
            losses[s] = float(mm["loss"])
            if bool(mm["finite"]):
              skipped_since = None
            else:
              first_bad = first_bad or (s + 1, mm)
              skipped_since = skipped_since or s + 1
          scalars = metrics_lib.reduce_steps([mm for _, mm in fetched], repa=teacher is not None)
          scalars.update(
              skipped_updates=float(jax.device_get(state.skipped_updates)),
              steps_per_s=steps_since_log / elapsed,
              images_per_s=steps_since_log * config.batch_size / elapsed,
              tflops_per_device=steps_since_log * step_flops / elapsed / 1e12 / jax.device_count())
          if peak:
            scalars["mfu"] = scalars["tflops_per_device"] / peak
          scalars.update(first_scalars)
          first_scalars = {}
          writer.write_scalars(done, scalars)
          writer.flush()
          logs.flush()
          summary_loss = scalars["loss"]
          bar.set_postfix(loss=f"{summary_loss:.4f}", img_s=f"{scalars['images_per_s']:.1f}")
          if is_main:
            logs.console(_interval_line(done, tcfg.num_steps, scalars))
          t_log, steps_since_log = time.perf_counter(), 0
          if first_bad and tcfg.nonfinite_policy == "stop":
            stop(_nonfinite_error(*first_bad))
          limit = tcfg.get("max_consecutive_skips", 20)
          if skipped_since and limit and done - skipped_since + 1 >= limit:
            stop(_skips_error(skipped_since, done, fetched[-1][1], limit))
          lost = workdir_lock.taken_over(lock)
          if lost:
            stop(lost)
        if tcfg.sample_every and done % tcfg.sample_every == 0 and done != tcfg.num_steps:
          t0 = time.perf_counter()
          last_sample = _sample_grid(sample_fn, grid_weights(state), config, mesh, rules, done, workdir, writer, cond)
          t_log += time.perf_counter() - t0  # not part of the interval's throughput
          bar.unpause()
          if is_main:
            logs.console("step %d: sample grid %s (%.0f s)", done, last_sample, time.perf_counter() - t0)
        checkpointer.save(state, data_iter, {**meta, "step": done}, done, force=done == tcfg.num_steps)
        if flag.stop or checkpointer.reached_preemption(done):
          stopped_by = "SIGTERM" if flag.stop else "preemption"
          checkpointer.save(state, data_iter, {**meta, "step": done}, done, force=True)
          break
    bar.close()
    profiler.close()
    final_step = int(jax.device_get(state.step))
    # A finished run always ends with a grid (also when rerun and the grid is missing).
    if final_step == tcfg.num_steps and tcfg.sample_rows and not fs.exists(_grid_path(workdir, final_step)):
      if is_main:
        rows = cond.num_classes if not cond.text else len(conditioning_lib.sample_prompts(config))
        logs.console("Sampling the final %dx%d grid (%d steps)...", min(rows, tcfg.sample_rows),
                     tcfg.sample_per_row, tcfg.sample_steps)
      last_sample = _sample_grid(sample_fn, grid_weights(state), config, mesh, rules, final_step, workdir, writer, cond)
    with logs.after(5.0, "Waiting for the last checkpoint to be written..."):
      checkpointer.wait()
    checkpointer.close()
    writer.close()
  if stopped_by:
    logging.warning("Stopped by %s at step %d; the checkpoint is saved, rerun to resume.", stopped_by, final_step)
  # `loss` is the last log interval's mean, the figure of the bar and of metrics.jsonl.
  return dict(start_step=start_step, step=final_step, losses=losses, loss=summary_loss,
              compile_s=compile_s, stopped_by=stopped_by, last_sample=last_sample, workdir=workdir)
