"""Sampling entry point: EMA weights from an Orbax checkpoint -> samples.npz + PNG grid.

  python -m pixeldit_jax.sample --config=configs/imagenet256_xl.py --checkpoint=/abs/ckpt_dir
  python -m pixeldit_jax.sample --config=configs/fashion_mnist.py --workdir=workdir/demo

`--workdir` reads `<workdir>/checkpoints` (a training run); `--checkpoint` any checkpoint
directory written by training or by pixeldit_jax.tools.import_official. The model is rebuilt from
the checkpoint's own record. A LoRA run's checkpoint (config.train.lora.rank > 0) is sampled as
its recorded base plus its EMA adapters, folded into the base weights once at load; `--lora=DIR`
applies the adapters of the LoRA checkpoint directory DIR (its newest step) to the model of
`--checkpoint`/`--workdir` instead. Sampler settings come from `config.sample` (ImageNet protocol:
`num_per_class` images per class, sample i has class i // num_per_class).

Every sample has its own seed, noise_i = N(0, I) from fold_in(PRNGKey(sample.seed), i), so any
subset can be regenerated and the images do not depend on the batch size or on how many devices or
hosts share the work. Finished samples are kept as parts, each recording the checkpoint step and a
hash of the settings that change the images; a rerun into the same folder reuses the matching parts
(whatever batch size made them), sets aside damaged ones, and refuses a folder of another step or
other settings (SampleFolderMismatch). With no --step the newest step whose EMA weights can be read
is used, and the default output folder is named by it. The result is `samples.npz` in the ADM
evaluator's layout: `arr_0` uint8 NHWC, `arr_1` (and `labels`) the classes.
"""

from __future__ import annotations

import hashlib
import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from pixeldit_jax import checkpoint as ckpt_lib
from pixeldit_jax import distributed, fs, images, sharding, xla_options
from pixeldit_jax.diffusion import samplers
from pixeldit_jax.model import abstract as abstract_model

def _define_flags():
  """Flags exist only when this module runs as the program (so modules can import each other)."""
  from pixeldit_jax import config_lib  # noqa: PLC0415 - also finds shipped configs by name
  config_lib.define_config_file("config", "configs/fashion_mnist.py", "Experiment config file: a path "
                                "or a shipped name (fashion_mnist.py:steps=20).")
  flags.DEFINE_string("workdir", None, "Training workdir: restores <workdir>/checkpoints.")
  flags.DEFINE_string("checkpoint", None, "A checkpoint directory (training or imported).")
  flags.DEFINE_string("out", None, "Output directory (default: <workdir or checkpoint>/samples_step<N>_<settings>).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest readable one).")
  flags.DEFINE_string("prompts", None, "Text-to-image: a file of prompts (one per line, or a JSON list).")
  flags.DEFINE_string("lora", None, "A LoRA run's checkpoint directory (or workdir): its EMA adapters "
                      "are applied to the sampled model (default: only when the checkpoint is a LoRA run's).")


def settings_tag(s) -> str:
  lo, hi = s.cfg_interval
  return f"{s.sampler}{s.num_steps}_cfg{s.cfg_scale:g}_i{lo:g}-{hi:g}_shift{s.time_shift:g}_seed{s.seed}"


def noise_for(indices: jax.Array, seed: int, shape) -> jax.Array:
  """Per-sample noise from the sample's global index only."""
  base = jax.random.PRNGKey(seed)
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), shape))(indices)


def make_sample_batch(graphdef, s, image_shape, null_class: int):
  """(params, indices, labels) -> uint8 images, jitted once per batch shape."""

  def sample_batch(params, indices, labels):
    apply = lambda x, t, y: nnx.merge(graphdef, params)(x, t, y)
    noise = noise_for(indices, s.seed, image_shape)
    x = samplers.sample(s.sampler, apply, noise, labels, jnp.full_like(labels, null_class),
                        num_steps=s.num_steps, cfg_scale=s.cfg_scale, interval=tuple(s.cfg_interval),
                        shift=s.time_shift)
    return samplers.to_uint8(x)

  return sample_batch


class SampleFolderMismatch(ValueError):
  """The output folder holds samples of another checkpoint step or made with other settings."""


def default_out_name(step: int, s, prompts=None) -> str:
  """samples_step{N}_<settings tag>, and a digest of the prompts for text-to-image."""
  name = f"samples_step{step}_{settings_tag(s)}"
  return name if prompts is None else f"{name}_p{_digest(list(prompts))[:8]}"


def _digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# Model fields that change how the images are computed, not what they are.
_EXECUTION_ONLY = ("attention_impl", "scan_layers", "remat_policy")


def image_settings(config, model_cfg, checkpoint_dir: str, **task) -> dict:
  """Every setting that changes the images. Not the batch size or the device count: each sample
  has its own seed."""
  s = config.sample
  lo, hi = s.cfg_interval
  out = dict(checkpoint=fs.resolve(checkpoint_dir), sampler=s.sampler, num_steps=int(s.num_steps),
             cfg_scale=float(s.cfg_scale), cfg_interval=[float(lo), float(hi)],
             time_shift=float(s.time_shift), seed=int(s.seed), image_size=list(config.image_size),
             **{f"model.{k}": v for k, v in model_cfg.to_dict().items() if k not in _EXECUTION_ONLY},
             **task)
  return json.loads(json.dumps(out, default=str))  # as settings.json reads it back


def _record(step: int, settings: dict, **info) -> dict:
  """settings.json: the checkpoint step and image settings (hashed) the folder's samples belong to."""
  return dict(info, step=int(step), settings_hash=_digest(settings)[:16], image_settings=settings)


def lora_dir(path: str) -> str:
  """A LoRA checkpoint directory from --lora: the directory itself, or <workdir>/checkpoints."""
  path = fs.resolve(path)
  sub = fs.join(path, "checkpoints")
  return sub if fs.isdir(sub) else path


def _lora_source(checkpoint_dir: str, step, lora):
  """(base dir, base step, LoRA dir or None, LoRA step or None, the step that names the output)."""
  if lora is None:
    try:
      record = ckpt_lib.lora_record(checkpoint_dir, step)
    except ckpt_lib.CheckpointError:
      record = None  # not readable here: the usual walk-back below reports it
    if not record:
      return checkpoint_dir, step, None, None, step
    lstep, _ = ckpt_lib.read_meta(checkpoint_dir, step)
    return record["base"], record["base_step"], checkpoint_dir, lstep, lstep
  lstep, _ = ckpt_lib.read_meta(lora)
  if not ckpt_lib.lora_record(lora, lstep):
    raise ckpt_lib.CheckpointError(f"--lora={lora}: step {lstep} there is not a LoRA run's checkpoint")
  return checkpoint_dir, step, lora, lstep, step


def _restore(config, checkpoint_dir: str, step, lora=None):
  """(step, model config, graphdef, param shardings, mesh, rules, EMA params on the mesh): `step`,
  or else the newest step whose EMA weights can be read.

  A LoRA run's checkpoint, or `lora` (a LoRA checkpoint directory applied to this checkpoint's
  model), gives the base EMA weights with the EMA adapters folded in (model.lora.merge_params):
  the same graph and parameter layout as the base, so sampling and editing cost nothing extra."""
  base_dir, step, lora, lora_step, name_step = _lora_source(checkpoint_dir, step, lora)
  checkpoint_dir = base_dir
  rules = tuple(tuple(r) for r in config.sharding.rules)
  built = {}

  def target(st):  # the model as that step's own meta records it
    cfg = ckpt_lib.model_config(checkpoint_dir, st, dtype=config.model.dtype,
                                attention_impl=config.model.attention_impl,
                                scan_layers=config.model.scan_layers, remat_policy="none")
    # The mesh (which starts the backends) only once the checkpoint is found: a missing one is
    # then reported before any backend logging.
    if "mesh" not in built:
      built["mesh"] = sharding.mesh_from_config(config.sharding)
    mesh = built["mesh"]
    model = abstract_model(cfg)
    shardings = sharding.named(mesh, sharding.param_specs(model, mesh, rules))
    built[st] = cfg, nnx.graphdef(model), shardings
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        nnx.to_pure_dict(nnx.state(model, nnx.Param)), shardings)

  if step is None:
    step, params = ckpt_lib.load_params_latest_readable(checkpoint_dir, target)
  else:
    params = ckpt_lib.load_params(checkpoint_dir, target(step), ckpt_lib.EMA_PARAMS, step)
  logging.info("Sampling from checkpoint step %d of %s", step, checkpoint_dir)
  if lora is not None:
    from pixeldit_jax.model import lora as lora_lib  # noqa: PLC0415
    _, adapters, record = ckpt_lib.load_adapters(lora, lora_step,
                                                 sharding=sharding.replicated(built["mesh"]))
    shardings = built[step][2]
    with sharding.use(built["mesh"], rules):
      params = jax.jit(lambda p, a: lora_lib.merge_params(p, a, lora_lib.scale_of(record)),
                       out_shardings=shardings)(params, adapters)
    logging.info("With the LoRA adapters of step %d of %s (rank %d, %s) folded in", lora_step, lora,
                 record["rank"], "+".join(record["targets"]))
  entry = built[step]
  if lora is not None and name_step is not None:
    step = name_step  # a LoRA run's checkpoint names the output by its own step
  return (int(step), *entry, built["mesh"], rules, params)


def _global_batch(size: int, mesh) -> int:
  """`size` rounded up to a multiple of the devices the batch is split over."""
  devices = mesh.shape["data"] * mesh.shape["fsdp"]
  return -(-size // devices) * devices


def make_text_sample_batch(graphdef, s, image_shape):
  """(params, indices, text (B, L, C), negative (B, L, C)) -> uint8 images: DPM-Solver++(2M) in
  the sigma convention, CFG against the negative-prompt (or null) embedding."""

  def sample_batch(params, indices, text, negative):
    apply = lambda x, t, c: nnx.merge(graphdef, params)(x, t, c)
    noise = noise_for(indices, s.seed, image_shape)
    x = samplers.dpm_solver_pp_2m(apply, noise, text, negative, num_steps=s.num_steps,
                                  cfg_scale=s.cfg_scale, interval=tuple(s.cfg_interval),
                                  shift=s.time_shift)
    return samplers.to_uint8(x)

  return sample_batch


def read_prompts(path: str) -> list[str]:
  """One prompt per non-empty line (a .txt file), or a JSON list of strings."""
  if not fs.isfile(path):
    raise FileNotFoundError(f"No prompt file at {path!r} (one prompt per line, or a JSON list)")
  text = fs.read_bytes(path).decode("utf-8")
  prompts = json.loads(text) if path.endswith(".json") else [l.strip() for l in text.splitlines()]
  prompts = [p for p in prompts if p]
  if not prompts:
    raise ValueError(f"{path} holds no prompts")
  return prompts


def run_text(config, checkpoint_dir: str, out_dir, prompts: list[str], step=None, cond=None,
             out_root=None, lora=None) -> dict:
  """Text-to-image sampling: `sample.num_per_prompt` images per prompt at config.image_size.

  Sample i is prompt i // num_per_prompt with noise from index i, so results do not depend on the
  batch size. Resumes from the parts of an earlier run into `out_dir` (None: a folder under
  `out_root` named by the step and settings). Writes samples.npz (arr_0 uint8 NHWC, captions), grid.png and one
  PNG per image.
  """
  from pixeldit_jax.train import conditioning as conditioning_lib  # noqa: PLC0415
  s = config.sample
  step, model_cfg, graphdef, _, mesh, rules, params = _restore(config, checkpoint_dir, step, lora)
  if model_cfg.text_dim is None:
    raise ValueError(f"{checkpoint_dir} holds a class-conditional model; --prompts needs a text-to-image one")
  _, meta = ckpt_lib.read_meta(checkpoint_dir, step)
  if meta.get("time_convention", "t2i_sigma") != "t2i_sigma":
    raise ValueError(f"{checkpoint_dir} was trained in the {meta['time_convention']!r} convention; "
                     "the text-to-image sampler needs the sigma convention")
  h, w = config.image_size
  prompts = list(prompts)
  per = int(s.get("num_per_prompt", 1))
  total = len(prompts) * per
  negative_prompt = s.get("negative_prompt") or ""
  text_cfg = config.get("text") or {}
  settings = image_settings(config, model_cfg, checkpoint_dir, prompts=prompts, num_per_prompt=per,
                            negative_prompt=negative_prompt, **_lora_setting(lora),
                            **{f"text.{k}": text_cfg.get(k) for k in ("encoder", "path", "max_length", "dtype")})
  name = default_out_name(step, s, prompts) + ("_lora" if lora else "")
  out_dir = fs.resolve(out_dir or fs.join(out_root or checkpoint_dir, name))
  record = _record(step, settings, checkpoint=fs.resolve(checkpoint_dir), image_size=[h, w],
                   total=total, prompts=prompts, **s.to_dict())
  cond = cond or conditioning_lib.TextConditioning(config)
  text = cond.embed(prompts)
  negative = cond.embed([negative_prompt], null=True)
  fn = distributed.Synced(jax.jit(make_text_sample_batch(graphdef, s, (h, w, model_cfg.in_channels)),
                                  compiler_options=xla_options.sampling()), "text_sample_batch")
  put = lambda a: jax.device_put(a, sharding.batch_sharding(mesh, rules, a.ndim))

  def make_images(idx):
    which = np.minimum(idx // per, len(prompts) - 1)
    out = fn(params, put(idx), put(text[which]), put(np.repeat(negative, len(idx), 0)))
    return np.asarray(multihost_utils.process_allgather(out, tiled=True))

  with sharding.use(mesh, rules):
    x, generated, seconds = _sample_parts(out_dir, record, total, _global_batch(min(s.batch_size, total), mesh),
                                          make_images, (h, w, model_cfg.in_channels))
  summary = dict(total=total, generated=generated, seconds=seconds, step=step, out_dir=out_dir,
                 images_per_s=generated / seconds if generated else None)
  if jax.process_index() == 0:
    captions = np.array([prompts[i // per] for i in range(total)])
    path = fs.save_npz(fs.join(out_dir, "samples.npz"), arr_0=x, captions=captions)
    for i, img in enumerate(x):
      images.save_png(img, fs.join(out_dir, "images", f"{i:05d}.png"))
    grid_path = fs.join(out_dir, "grid.png")
    images.save_png(prompt_grid(x, len(prompts), per), grid_path, scale=max(1, 256 // max(h, w)))
    summary.update(samples=path, grid=grid_path)
  distributed.barrier("sample_end")
  return summary


def prompt_grid(x: np.ndarray, num_prompts: int, per: int) -> np.ndarray:
  """The samples of each prompt side by side: one row per prompt for up to 10 prompts, else whole
  prompts per row in a roughly square grid (100 prompts x 2: 7 prompts, 14 images, per row)."""
  if per == 1:
    return images.grid(x, max(1, int(len(x) ** 0.5)))
  k = 1 if num_prompts <= 10 else max(1, int((num_prompts / per) ** 0.5))
  return images.grid(x, -(-num_prompts // k), cols=k * per)


def _lora_setting(lora) -> dict:
  """--lora in the image settings (a LoRA run's own checkpoint is already the checkpoint named)."""
  if lora is None:
    return {}
  lstep, _ = ckpt_lib.read_meta(lora)
  return {"lora": fs.resolve(lora), "lora_step": int(lstep)}


def run(config, checkpoint_dir: str, out_dir=None, step=None, out_root=None, lora=None) -> dict:
  """Generate (or finish generating) the configured sample set. Returns a summary dict.

  `out_dir` defaults to a folder under `out_root` (default: the checkpoint directory) named by the
  checkpoint step and the settings; `step` to the newest step whose EMA weights can be read.
  """
  s = config.sample
  step, model_cfg, graphdef, param_shardings, mesh, rules, params = _restore(config, checkpoint_dir, step, lora)
  if model_cfg.text_dim is not None:
    raise ValueError(f"{checkpoint_dir} holds a text-to-image model: give --prompts=FILE")
  h, w = config.image_size
  total = s.num_per_class * model_cfg.num_classes
  settings = image_settings(config, model_cfg, checkpoint_dir, num_per_class=int(s.num_per_class),
                            **_lora_setting(lora))
  name = default_out_name(step, s) + ("_lora" if lora else "")
  out_dir = fs.resolve(out_dir or fs.join(out_root or checkpoint_dir, name))
  record = _record(step, settings, checkpoint=fs.resolve(checkpoint_dir), image_size=[h, w],
                   total=total, **s.to_dict())
  batch_sharding = sharding.batch_sharding(mesh, rules, 1)
  fn = distributed.Synced(jax.jit(make_sample_batch(graphdef, s, (h, w, model_cfg.in_channels),
                                                    model_cfg.num_classes),
                                  in_shardings=(param_shardings, batch_sharding, batch_sharding),
                                  compiler_options=xla_options.sampling()),
                          "sample_batch")
  put = lambda a: jax.make_array_from_process_local_data(batch_sharding, a[_local_slice(len(a))])

  def make_images(idx):
    labels = np.minimum(idx // s.num_per_class, model_cfg.num_classes - 1).astype(np.int32)
    return np.asarray(multihost_utils.process_allgather(fn(params, put(idx), put(labels)), tiled=True))

  with sharding.use(mesh, rules):
    x, generated, seconds = _sample_parts(out_dir, record, total, _global_batch(min(s.batch_size, total), mesh),
                                          make_images, (h, w, model_cfg.in_channels))
  summary = dict(total=total, generated=generated, seconds=seconds, step=step, out_dir=out_dir,
                 images_per_s=generated / seconds if generated else None)
  if jax.process_index() == 0:
    y = (np.arange(total) // s.num_per_class).astype(np.int32)
    # arr_1 as in ADM's labelled batches; labels by name
    path = fs.save_npz(fs.join(out_dir, "samples.npz"), arr_0=x, arr_1=y, labels=y)
    rows, cols = min(10, model_cfg.num_classes), min(10, s.num_per_class)
    pick = np.concatenate([np.arange(c * s.num_per_class, c * s.num_per_class + cols) for c in range(rows)])
    grid_path = fs.join(out_dir, "grid.png")
    images.save_png(images.grid(x[pick], rows), grid_path, scale=max(1, 256 // max(h, w)))
    summary.update(samples=path, grid=grid_path)
  distributed.barrier("sample_end")
  return summary


def _local_slice(n: int) -> slice:
  """This process's contiguous share of a global batch of n."""
  per = n // jax.process_count()
  return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


# ----------------------------------------------------------------------------- parts
# `parts/part_{a}_{b}.npz` holds samples a..b-1 (`images`, `index`) and the checkpoint `step` and
# `settings` hash they were made with. Parts are keyed by index range, not batch number, so a rerun
# with another batch size reuses them, and assembly goes by index coverage.

_PART = re.compile(r"part_(\d+)_(\d+)\.npz")


def _part_ranges(parts_dir: str, total: int) -> dict:
  """name -> (a, b) of each well-named part file within [0, total)."""
  # Object stores have no empty directories: no parts yet may mean no parts_dir at all.
  names = fs.listdir(parts_dir) if fs.isdir(parts_dir) else []
  ranges = {n: (int(m[1]), int(m[2])) for n in names if (m := _PART.fullmatch(n))}
  return {n: (a, b) for n, (a, b) in ranges.items() if 0 <= a < b <= total}


def _short(v) -> str:
  text = json.dumps(v)
  return text if len(text) <= 40 else text[:37] + "..."


def _check_folder(out_dir: str, parts_dir: str, record: dict):
  """Refuse (SampleFolderMismatch) a folder holding samples of another step or other settings."""
  path = fs.join(out_dir, "settings.json")
  if not fs.isfile(path):
    return
  try:
    old = json.loads(fs.read_text(path))
  except Exception as e:  # noqa: BLE001 - each part carries its own record and is checked alone
    logging.warning("%s cannot be read (%s); the parts are checked one by one.", path, e)
    return
  diff = []
  if old.get("step") != record["step"]:
    was = "unrecorded" if old.get("step") is None else old["step"]
    diff.append(f"checkpoint step {was} (this run: step {record['step']})")
  if old.get("settings_hash") != record["settings_hash"]:
    before, now = old.get("image_settings"), record["image_settings"]
    if not before:
      diff.append("unrecorded settings (an older sampler)")
    else:
      keys = [k for k in sorted({*before, *now}) if before.get(k) != now.get(k)]
      diff.append("other settings: " + ", ".join(
          f"{k} {_short(before.get(k))} (this run: {_short(now.get(k))})" for k in keys[:3])
          + (f" and {len(keys) - 3} more" if len(keys) > 3 else ""))
  names = fs.listdir(parts_dir) if fs.isdir(parts_dir) else []
  has_samples = fs.isfile(fs.join(out_dir, "samples.npz")) or any(_PART.fullmatch(n) for n in names)
  if diff and has_samples:
    raise SampleFolderMismatch(f"{out_dir} holds samples of {' and of '.join(diff)}; "
                               "use another --out or delete it")


def _load_parts(parts_dir: str, record: dict, total: int, image_shape, x: np.ndarray):
  """Fill `x` from every intact part; a damaged one (unreadable, wrong shape or record) is named
  in a warning and set aside, so the listing that follows no longer counts it."""
  ranges = _part_ranges(parts_dir, total)
  names = fs.listdir(parts_dir) if fs.isdir(parts_dir) else []
  for name in names:
    if not (name.startswith("part_") and name.endswith(".npz")):
      continue  # set aside earlier, or not ours
    path, problem = fs.join(parts_dir, name), None
    if name not in ranges:
      problem = f"its name gives no index range within 0..{total}"
    else:
      a, b = ranges[name]
      try:
        with fs.load_npz(path) as z:
          imgs, index, step, digest = z["images"], z["index"], int(z["step"]), str(z["settings"])
      except Exception as e:  # noqa: BLE001 - truncated, not a zip, a missing array...
        problem = f"cannot be read: {type(e).__name__}: {str(e)[:200]}"
      else:
        if imgs.shape != (b - a, *image_shape) or imgs.dtype != np.uint8:
          problem = f"images {imgs.dtype}{list(imgs.shape)}, expected uint8{[b - a, *image_shape]}"
        elif not np.array_equal(index, np.arange(a, b)):
          problem = "its index record does not match its name"
        elif (step, digest) != (record["step"], record["settings_hash"]):
          problem = (f"made with step {step}, settings {digest} (this run: step {record['step']}, "
                     f"settings {record['settings_hash']})")
    if problem is None:
      x[a:b] = imgs
      continue
    aside = f"{path}.damaged-{int(time.time())}"
    logging.warning("Sample part %s is damaged (%s); set aside as %s and generated again.", path, problem, aside)
    fs.rename(path, aside)


def _save_part(parts_dir: str, a: int, imgs: np.ndarray, record: dict):
  b = a + len(imgs)
  fs.save_npz(fs.join(parts_dir, f"part_{a:07d}_{b:07d}.npz"), images=imgs, index=np.arange(a, b),
              step=np.int64(record["step"]), settings=np.str_(record["settings_hash"]))


def _sample_parts(out_dir: str, record: dict, total: int, batch: int, make_images, image_shape):
  """Generate the samples that the folder's parts lack, in batches of `batch` indices (padded with
  the last index; `make_images` runs on every process). Returns (all `total` images on process 0,
  else None; how many were generated now; seconds)."""
  parts_dir = fs.join(out_dir, "parts")
  is_main = jax.process_index() == 0
  _check_folder(out_dir, parts_dir, record)  # every process reads the same files: all refuse or none
  distributed.barrier("sample_check")
  x = None
  if is_main:
    fs.write_text(fs.join(out_dir, "settings.json"), json.dumps(record, indent=1, default=str))
    x = np.zeros((total, *image_shape), np.uint8)
    _load_parts(parts_dir, record, total, image_shape, x)
  distributed.barrier("sample_parts")
  # After the barrier every process lists the same intact parts, so all agree on what is missing.
  covered = np.zeros(total, bool)
  for a, b in _part_ranges(parts_dir, total).values():
    covered[a:b] = True
  missing = np.flatnonzero(~covered).astype(np.int32)
  bar = tqdm(total=total, initial=total - len(missing), unit="img", desc="sample", disable=not is_main,
             dynamic_ncols=True)
  t0 = time.perf_counter()
  for c in range(0, len(missing), batch):
    idx = missing[c:c + batch]
    n = len(idx)
    imgs = make_images(np.pad(idx, (0, batch - n), mode="edge"))[:n]
    if is_main:  # one part per run of consecutive indices; a part is whole or absent
      x[idx] = imgs
      for run in np.split(np.arange(n), np.flatnonzero(np.diff(idx) != 1) + 1):
        _save_part(parts_dir, int(idx[run[0]]), imgs[run], record)
    bar.update(n)
  bar.close()
  return x, len(missing), time.perf_counter() - t0


def main(argv):
  del argv
  from pixeldit_jax import config_lib
  f = flags.FLAGS
  distributed.initialize()
  config = f.config
  config_lib.validate(config)
  if bool(f.workdir) == bool(f.checkpoint):
    from pixeldit_jax.cli import UserError  # noqa: PLC0415
    raise UserError("give exactly one of --workdir (a training run) or --checkpoint (a checkpoint directory)")
  ckpt_dir = fs.resolve(f.checkpoint or fs.join(f.workdir, "checkpoints"))
  if not fs.isdir(ckpt_dir):
    raise ckpt_lib.CheckpointError(f"No checkpoint directory at {ckpt_dir}")
  out_root = f.workdir or f.checkpoint  # the default out_dir is named by the step, known once restored
  lora = lora_dir(f.lora) if f.lora else None
  from pixeldit_jax import logs  # noqa: PLC0415
  # Library INFO (Orbax, jax) goes to log.txt beside the samples (or in the workdir), as in training.
  logs.setup(f.out or out_root, process_index=jax.process_index)
  try:
    if f.prompts:
      summary = run_text(config, ckpt_dir, f.out, read_prompts(f.prompts), f.step, out_root=out_root,
                         lora=lora)
    else:
      summary = run(config, ckpt_dir, f.out, f.step, out_root=out_root, lora=lora)
    logging.info("sampling: %s", summary)
    rate = f", {summary['images_per_s']:.2f} images/s" if summary["images_per_s"] else ""
    logs.console(f"{summary['total']} samples of checkpoint step {summary['step']} ({summary['generated']} "
                 f"generated now{rate}) -> {summary.get('samples', summary['out_dir'])}; "
                 f"grid: {summary.get('grid', '-')}")
  finally:
    logs.close()


if __name__ == "__main__":
  from pixeldit_jax import cli
  cli.run_absl(main, _define_flags)
