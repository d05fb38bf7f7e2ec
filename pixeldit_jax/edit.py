"""Editing entry point: FlowEdit, image-to-image and inpainting with a trained or imported model.

  python -m pixeldit_jax.edit --config=configs/t2i_fmnist.py --workdir=workdir/demo_t2i \\
      --image=in.png --source="a red coat on a blue background, top left" \\
      --target="a green coat on a blue background, top left" --method=flowedit --out=edits/1
  python -m pixeldit_jax.edit --config=configs/fashion_mnist.py --workdir=workdir/demo \\
      --image=in.png --mask=mask.png --target=7 --method=inpaint --out=edits/2

The model (EMA weights, the newest readable step unless --step; a LoRA run's adapters folded in,
or those of --lora=DIR) and the sampler settings come from the checkpoint and `config.sample`, as
for `pixeldit_jax.sample`; --steps overrides the number of steps. `--source`/`--target` are prompts for a text-to-image model and class indices for a
class-conditional one. Methods (``diffusion/editing.py``):

  flowedit  the source condition -> the target condition, inversion-free; --strength sets
            n_max = round(strength * steps) (default 0.75), or give --n_max; --n_min, --n_avg,
            --source_cfg (default 1.5), --target_cfg (default 4.5); a weaker source than target
            guidance, as in the paper's settings, measured best on the captioned Fashion-MNIST
            model (bench/editing.py)
  img2img   SDEdit: noise to --strength (default 0.6), sample the rest towards --target
            (--target_cfg, default config.sample.cfg_scale)
  inpaint   img2img inside --mask (white = regenerate; default strength 1.0); outside it the
            output is exactly the input

The image must have the config's image size; --resize=bilinear|center_crop fits it on request.
Writes edited.png, panel.png (source | mask | edited) and settings.json to --out (local or gs://).
`edit(...)` is the same as a Python function, for notebooks.
"""

from __future__ import annotations

import json
import time
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from flax import nnx
from tqdm import tqdm

from pixeldit_jax import checkpoint as ckpt_lib
from pixeldit_jax import fs, images
from pixeldit_jax.cli import UserError
from pixeldit_jax.diffusion import editing, samplers

METHODS = ("flowedit", "img2img", "inpaint")
DEFAULT_STRENGTH = {"flowedit": 0.75, "img2img": 0.6, "inpaint": 1.0}
FLOWEDIT_CFG = (1.5, 4.5)  # (source, target): bench/editing.py, 20 pairs, against 3/3 and 1/7


def _define_flags():
  from pixeldit_jax import config_lib  # noqa: PLC0415 - also finds shipped configs by name
  config_lib.define_config_file("config", None, "Experiment config file: a path or a shipped name.")
  flags.DEFINE_string("workdir", None, "Training workdir: restores <workdir>/checkpoints.")
  flags.DEFINE_string("checkpoint", None, "A checkpoint directory (training or imported).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest readable one).")
  flags.DEFINE_string("lora", None, "A LoRA run's checkpoint directory (or workdir) whose EMA adapters "
                      "are folded into the model (a LoRA run's own --checkpoint needs no --lora).")
  flags.DEFINE_string("image", None, "The image to edit (PNG/JPEG, local or gs://).")
  flags.DEFINE_string("mask", None, "inpaint: a mask image, white = regenerate, black = keep.")
  flags.DEFINE_string("source", None, "The source prompt (text-to-image) or class index.")
  flags.DEFINE_string("target", None, "The target prompt (text-to-image) or class index.")
  flags.DEFINE_enum("method", "flowedit", METHODS, "Editing method.")
  flags.DEFINE_float("strength", None, "Fraction of the sampler's steps redone (img2img, inpaint), "
                     "or n_max / steps (flowedit). Default: flowedit 0.75, img2img 0.6, inpaint 1.0.")
  flags.DEFINE_integer("steps", None, "Sampler steps (default: config.sample.num_steps).")
  flags.DEFINE_integer("seed", 0, "Noise seed.")
  flags.DEFINE_string("out", None, "Output directory: edited.png, panel.png, settings.json.")
  flags.DEFINE_enum("resize", None, list(images.RESIZE_MODES), "Fit an image of another size "
                    "(default: refuse it).")
  flags.DEFINE_integer("n_max", None, "FlowEdit: the step count it starts from the end (overrides --strength).")
  flags.DEFINE_integer("n_min", 0, "FlowEdit: the last n_min steps are plain sampling towards the target.")
  flags.DEFINE_integer("n_avg", 1, "FlowEdit: noise draws averaged per step.")
  flags.DEFINE_float("source_cfg", None, "FlowEdit: CFG scale of the source side (default 1.5).")
  flags.DEFINE_float("target_cfg", None, "CFG scale towards the target (default: FlowEdit 4.5, "
                     "else config.sample.cfg_scale).")


def _read_image(image, size, resize, what="--image", nearest=False, mode="RGB") -> tuple[np.ndarray, Optional[str]]:
  """(uint8 HWC of the model's size, its path or None); a wrong size is refused unless `resize`."""
  path = None
  if isinstance(image, str):
    path = image
    if not fs.isfile(path):
      raise FileNotFoundError(f"{what}: no file at {path}")
    try:
      arr = images.load_png(path, mode)
    except Exception as e:  # noqa: BLE001 - PIL's many decode errors: one line
      raise UserError(f"{what}: {path} is not a readable image ({type(e).__name__}: {e})") from e
  else:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
      raise UserError(f"{what}: expected a uint8 image array, got {arr.dtype}")
    if arr.ndim == 2:
      arr = arr[..., None]
    if mode == "RGB" and arr.shape[-1] == 1:
      arr = np.repeat(arr, 3, -1)
    elif mode == "L" and arr.shape[-1] != 1:
      arr = np.asarray(images.Image.fromarray(arr[..., :3]).convert("L"), np.uint8)[..., None]
  h, w = int(size[0]), int(size[1])
  if arr.shape[:2] != (h, w):
    if resize is None:
      raise UserError(f"{what} {path or 'array'} is {arr.shape[1]}x{arr.shape[0]} (WxH) but the model "
                      f"makes {w}x{h} images (config.image_size); give a {w}x{h} image or "
                      f"--resize=bilinear or --resize=center_crop")
    arr = images.fit(arr, (h, w), resize, nearest=nearest)
  return arr, path


def _class_label(value, num_classes: int, what: str) -> int:
  try:
    label = int(str(value).strip())
  except ValueError:
    raise UserError(f"{what}={value!r}: a class-conditional model takes a class index "
                    f"0..{num_classes - 1}") from None
  if not 0 <= label < num_classes:
    raise UserError(f"{what}={label}: the model has classes 0..{num_classes - 1}")
  return label


def _load_config(config):
  if isinstance(config, str):
    from pixeldit_jax import config_lib  # noqa: PLC0415
    config = config_lib.load(config)
  return config


def edit(config, *, image, target, method: str = "flowedit", source=None, mask=None,
         checkpoint: Optional[str] = None, workdir: Optional[str] = None, step: Optional[int] = None,
         lora: Optional[str] = None,
         strength: Optional[float] = None, steps: Optional[int] = None, seed: int = 0,
         out: Optional[str] = None, resize: Optional[str] = None, n_max: Optional[int] = None,
         n_min: int = 0, n_avg: int = 1, source_cfg: Optional[float] = None,
         target_cfg: Optional[float] = None, cond=None, progress: bool = True) -> dict:
  """Edit one image; the same arguments as the command line (`image`/`mask` may be arrays).

  Returns {"image": edited uint8 HWC, "source": the input as fed, "mask", "settings", and the
  written paths when `out` is given}. `cond` may be a ready TextConditioning (text-to-image).
  """
  from pixeldit_jax import sample as sample_lib  # noqa: PLC0415
  config = _load_config(config)
  if method not in METHODS:
    raise UserError(f"--method={method!r}: one of {', '.join(METHODS)}")
  if bool(workdir) == bool(checkpoint):
    raise UserError("give exactly one of --workdir (a training run) or --checkpoint (a checkpoint directory)")
  if resize is not None and resize not in images.RESIZE_MODES:
    raise UserError(f"--resize={resize!r}: one of {', '.join(images.RESIZE_MODES)}")
  if target is None or str(target) == "":
    raise UserError("--target is required (a prompt or a class index)")
  if method == "flowedit" and (source is None or str(source) == ""):
    raise UserError("--method=flowedit needs --source (the condition the image was made with)")
  if (mask is not None) != (method == "inpaint"):
    raise UserError("--mask goes with --method=inpaint (and inpaint needs one)")
  ckpt_dir = fs.resolve(checkpoint or fs.join(workdir, "checkpoints"))
  if not fs.isdir(ckpt_dir):
    raise ckpt_lib.CheckpointError(f"No checkpoint directory at {ckpt_dir}")

  h, w = config.image_size
  # The model's channels (3, or 1 for the grayscale Fashion-MNIST model): the image is converted.
  channels = int(config.model.get("in_channels", 3))
  src_u8, image_path = _read_image(image, (h, w), resize, mode="L" if channels == 1 else "RGB")
  mask_u8, mask_path = (None, None)
  if mask is not None:
    mask_u8, mask_path = _read_image(mask, (h, w), resize, "--mask", nearest=True, mode="L")
  s = config.sample
  num_steps = int(steps or s.num_steps)
  strength = DEFAULT_STRENGTH[method] if strength is None else float(strength)
  if not 0.0 <= strength <= 1.0:
    raise UserError(f"--strength={strength}: must be in [0, 1]")
  fe = method == "flowedit"
  source_cfg = float((FLOWEDIT_CFG[0] if fe else s.cfg_scale) if source_cfg is None else source_cfg)
  target_cfg = float((FLOWEDIT_CFG[1] if fe else s.cfg_scale) if target_cfg is None else target_cfg)
  if method == "flowedit":
    n_max = int(round(strength * num_steps)) if n_max is None else int(n_max)
    if not 0 <= n_min < n_max <= num_steps:
      raise UserError(f"FlowEdit needs 0 <= --n_min < --n_max <= --steps ({num_steps}); got n_min={n_min}, "
                      f"n_max={n_max} (n_max = round(strength * steps) unless given)")
    if n_avg < 1:
      raise UserError(f"--n_avg={n_avg}: must be >= 1")

  # The sampler's restore: EMA weights on this host's mesh, a LoRA run's adapters folded in.
  lora_path = sample_lib.lora_dir(lora) if lora else None
  step, model_cfg, graphdef, _, mesh, _, params = sample_lib._restore(config, ckpt_dir, step, lora_path)  # noqa: SLF001
  _, meta = ckpt_lib.read_meta(ckpt_dir, step)
  text = model_cfg.text_dim is not None
  convention = meta.get("time_convention", editing.T2I if text else editing.C2I)
  try:
    editor = editing.Editor(lambda p, x, t, c: nnx.merge(graphdef, p)(x, t, c), convention,
                            sampler=s.sampler, num_steps=num_steps, shift=s.time_shift,
                            interval=tuple(s.cfg_interval))
  except ValueError as e:
    raise UserError(f"{ckpt_dir}: {e} (config.sample.sampler)") from e

  if text:
    from pixeldit_jax.train import conditioning as conditioning_lib  # noqa: PLC0415
    cond = cond or conditioning_lib.TextConditioning(config)
    negative = s.get("negative_prompt") or ""
    c_tar = jnp.asarray(cond.embed([str(target)]))
    c_src = jnp.asarray(cond.embed([str(source)])) if source is not None else None
    uncond = jnp.asarray(cond.embed([negative], null=True))
    source_v, target_v = (None if source is None else str(source)), str(target)
  else:
    n_cls = model_cfg.num_classes
    target_v = _class_label(target, n_cls, "--target")
    source_v = None if source is None else _class_label(source, n_cls, "--source")
    c_tar = jnp.asarray([target_v], jnp.int32)
    c_src = None if source is None else jnp.asarray([source_v], jnp.int32)
    uncond = jnp.asarray([n_cls], jnp.int32)

  # Every input replicated on the params' mesh: the steps' outputs come back with that sharding, so
  # the second step finds the first one's compilation instead of compiling again.
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  x_src, c_tar, uncond = jax.device_put((editing.to_float(src_u8[None]), c_tar, uncond), rep)
  c_src = None if c_src is None else jax.device_put(c_src, rep)
  total = editor.count_steps(method, strength=strength, n_max=n_max or 0, n_min=n_min)
  bar = tqdm(total=total, unit="step", desc=method, disable=not progress, dynamic_ncols=True)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    if method == "flowedit":
      x = editor.flowedit(params, x_src, c_src, c_tar, uncond, n_max=n_max, n_min=n_min, n_avg=n_avg,
                          src_cfg=source_cfg, tar_cfg=target_cfg, seed=seed, progress=bar.update)
    else:
      edit_mask = None if mask_u8 is None else jax.device_put(jnp.asarray(mask_u8[None] > 127), rep)
      x = editor.img2img(params, x_src, c_tar, uncond, strength=strength, cfg_scale=target_cfg,
                         seed=seed, mask=edit_mask, progress=bar.update)
    edited = np.asarray(samplers.to_uint8(x))[0]
  bar.close()
  seconds = time.perf_counter() - t0
  if mask_u8 is not None:  # exactly the input outside the mask, whatever the float path did
    edited = np.where(mask_u8 > 127, edited, src_u8)

  settings = dict(method=method, checkpoint=ckpt_dir, step=int(step), lora=lora_path, time_convention=convention,
                  image=image_path, mask=mask_path, resize=resize, image_size=[int(h), int(w)],
                  source=source_v, target=target_v, sampler=s.sampler, steps=num_steps,
                  time_shift=float(s.time_shift), cfg_interval=[float(v) for v in s.cfg_interval],
                  seed=int(seed), strength=strength, target_cfg=target_cfg, seconds=round(seconds, 3))
  if method == "flowedit":
    settings.update(n_max=n_max, n_min=int(n_min), n_avg=int(n_avg), source_cfg=source_cfg,
                    start_sigma=float(editor.sigmas[num_steps - n_max]))
  else:
    start = editor.start_step(strength)
    settings.update(start_step=start, start_sigma=float(editor.sigmas[start]) if start < num_steps else 0.0)
  if text:
    settings["negative_prompt"] = s.get("negative_prompt") or ""
  result = dict(image=edited, source=src_u8, mask=mask_u8, settings=settings)
  if out:
    result.update(write_outputs(out, src_u8, edited, mask_u8, settings))
  return result


def panel(source: np.ndarray, edited: np.ndarray, mask: Optional[np.ndarray] = None) -> np.ndarray:
  """source | (mask) | edited side by side, uint8 HWC."""
  tiles = [source] + ([np.repeat(mask, source.shape[-1], -1)] if mask is not None else []) + [edited]
  return images.grid(np.stack(tiles), rows=1)


def write_outputs(out: str, source, edited, mask, settings) -> dict:
  h = source.shape[0]
  scale = max(1, 256 // h)
  paths = dict(edited=fs.join(out, "edited.png"), panel=fs.join(out, "panel.png"),
               settings_json=fs.join(out, "settings.json"))
  images.save_png(edited, paths["edited"])
  images.save_png(panel(source, edited, mask), paths["panel"], scale=scale)
  fs.write_text(paths["settings_json"], json.dumps(settings, indent=1, default=str))
  return paths


def main(argv):
  del argv
  f = flags.FLAGS
  if f.config is None:
    raise UserError("--config is required (the config the model was trained or imported with)")
  for name in ("image", "out", "target"):
    if not f[name].value:
      raise UserError(f"--{name} is required (see --help)")
  from pixeldit_jax import config_lib, logs  # noqa: PLC0415
  config_lib.validate(f.config)
  logs.setup(f.out, process_index=jax.process_index)
  try:
    r = edit(f.config, image=f.image, mask=f.mask, source=f.source, target=f.target, method=f.method,
             checkpoint=f.checkpoint, workdir=f.workdir, step=f.step, lora=f.lora, strength=f.strength,
             steps=f.steps, seed=f.seed, out=f.out, resize=f.resize, n_max=f.n_max, n_min=f.n_min,
             n_avg=f.n_avg, source_cfg=f.source_cfg, target_cfg=f.target_cfg)
    logging.info("edit: %s", r["settings"])
    logs.console(f"{f.method} of {f.image} (checkpoint step {r['settings']['step']}) -> {r['edited']}; "
                 f"before/after: {r['panel']}")
  finally:
    logs.close()


if __name__ == "__main__":
  from pixeldit_jax import cli
  cli.run_absl(main, _define_flags)
