"""Sampling entry point: EMA weights from an Orbax checkpoint -> samples.npz + PNG grid.

  python -m pixeldit_jax.sample --config=configs/imagenet256_xl.py --checkpoint=/abs/ckpt_dir
  python -m pixeldit_jax.sample --config=configs/fashion_mnist.py --workdir=workdir/demo

`--workdir` reads `<workdir>/checkpoints` (a training run); `--checkpoint` any checkpoint
directory written by training or by pixeldit_jax.tools.import_official. The model is rebuilt from
the checkpoint's own record. Sampler settings come from `config.sample` (ImageNet protocol:
`num_per_class` images per class, sample i has class i // num_per_class).

Every sample has its own seed, noise_i = N(0, I) from fold_in(PRNGKey(sample.seed), i), so any
subset can be regenerated and the images do not depend on the batch size or on how many devices or
hosts share the work. Finished batches are written as parts and a rerun resumes after the last
one. The result is `samples.npz` in the ADM evaluator's layout: `arr_0` uint8 NHWC, `arr_1` (and
`labels`) the classes.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from pixeldit_jax import checkpoint as ckpt_lib
from pixeldit_jax import fs, images, sharding
from pixeldit_jax.diffusion import samplers
from pixeldit_jax.model import abstract as abstract_model

def _define_flags():
  """Flags exist only when this module runs as the program (so modules can import each other)."""
  from pixeldit_jax import config_lib  # noqa: PLC0415 - also finds shipped configs by name
  config_lib.define_config_file("config", "configs/fashion_mnist.py", "Experiment config file: a path "
                                "or a shipped name (fashion_mnist.py:steps=20).")
  flags.DEFINE_string("workdir", None, "Training workdir: restores <workdir>/checkpoints.")
  flags.DEFINE_string("checkpoint", None, "A checkpoint directory (training or imported).")
  flags.DEFINE_string("out", None, "Output directory (default: <workdir or checkpoint>/samples_<settings>).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("prompts", None, "Text-to-image: a file of prompts (one per line, or a JSON list).")


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


def _ema_on_mesh(config, model_cfg, checkpoint_dir: str, step):
  """(mesh, rules, graphdef, param shardings, EMA params restored onto the mesh)."""
  mesh = sharding.make_mesh(config.sharding.mesh_shape)
  rules = tuple(tuple(r) for r in config.sharding.rules)
  model = abstract_model(model_cfg)
  param_shardings = sharding.named(mesh, sharding.param_specs(model, mesh, rules))
  target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        nnx.to_pure_dict(nnx.state(model, nnx.Param)), param_shardings)
  params = ckpt_lib.load_params(checkpoint_dir, target, ckpt_lib.EMA_PARAMS, step)
  return mesh, rules, nnx.graphdef(model), param_shardings, params


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


def run_text(config, checkpoint_dir: str, out_dir: str, prompts: list[str], step=None, cond=None) -> dict:
  """Text-to-image sampling: `sample.num_per_prompt` images per prompt at config.image_size.

  Sample i is prompt i // num_per_prompt with noise from index i, so results do not depend on the
  batch size. Writes samples.npz (arr_0 uint8 NHWC, captions), grid.png and one PNG per image.
  """
  from pixeldit_jax.train import conditioning as conditioning_lib  # noqa: PLC0415
  s = config.sample
  model_cfg = ckpt_lib.model_config(checkpoint_dir, step, dtype=config.model.dtype,
                                    attention_impl=config.model.attention_impl,
                                    scan_layers=config.model.scan_layers, remat_policy="none")
  if model_cfg.text_dim is None:
    raise ValueError(f"{checkpoint_dir} holds a class-conditional model; --prompts needs a text-to-image one")
  _, meta = ckpt_lib.read_meta(checkpoint_dir, step)
  if meta.get("time_convention", "t2i_sigma") != "t2i_sigma":
    raise ValueError(f"{checkpoint_dir} was trained in the {meta['time_convention']!r} convention; "
                     "the text-to-image sampler needs the sigma convention")
  cond = cond or conditioning_lib.TextConditioning(config)
  h, w = config.image_size
  per = int(s.get("num_per_prompt", 1))
  total = len(prompts) * per
  mesh, rules, graphdef, param_shardings, params = _ema_on_mesh(config, model_cfg, checkpoint_dir, step)
  batch = _global_batch(min(s.batch_size, total), mesh)
  text = cond.embed(prompts)
  negative_prompt = s.get("negative_prompt") or ""
  negative = cond.embed([negative_prompt], null=True)
  fn = jax.jit(make_text_sample_batch(graphdef, s, (h, w, model_cfg.in_channels)))
  put = lambda a: jax.device_put(a, sharding.batch_sharding(mesh, rules, a.ndim))
  outputs = []
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    for b in tqdm(range(0, total, batch), desc="sample", unit="batch", disable=jax.process_index() != 0):
      idx = np.arange(b, b + batch)
      which = np.minimum(idx // per, len(prompts) - 1)
      out = fn(params, put(idx.astype(np.int32)), put(text[which]), put(np.repeat(negative, batch, 0)))
      outputs.append(np.asarray(multihost_utils.process_allgather(out, tiled=True))[:total - b])
  seconds = time.perf_counter() - t0
  x = np.concatenate(outputs)[:total]
  captions = np.array([prompts[i // per] for i in range(total)])
  summary = dict(total=total, generated=total, seconds=seconds, images_per_s=total / seconds, out_dir=out_dir)
  if jax.process_index() == 0:
    path = fs.save_npz(fs.join(out_dir, "samples.npz"), arr_0=x, captions=captions)
    fs.write_text(fs.join(out_dir, "settings.json"), json.dumps(
        {"checkpoint": fs.resolve(checkpoint_dir), "step": step, "image_size": [h, w],
         "prompts": prompts, **s.to_dict()}, indent=1, default=str))
    for i, img in enumerate(x):
      images.save_png(img, fs.join(out_dir, "images", f"{i:05d}.png"))
    grid_path = fs.join(out_dir, "grid.png")
    images.save_png(images.grid(x, len(prompts) if per > 1 else max(1, int(total ** 0.5))), grid_path,
                    scale=max(1, 256 // max(h, w)))
    summary.update(samples=path, grid=grid_path)
  return summary


def run(config, checkpoint_dir: str, out_dir: str, step=None) -> dict:
  """Generate (or finish generating) the configured sample set. Returns a summary dict."""
  s = config.sample
  model_cfg = ckpt_lib.model_config(checkpoint_dir, step, dtype=config.model.dtype,
                                    attention_impl=config.model.attention_impl,
                                    scan_layers=config.model.scan_layers, remat_policy="none")
  if model_cfg.text_dim is not None:
    raise ValueError(f"{checkpoint_dir} holds a text-to-image model: give --prompts=FILE")
  h, w = config.image_size
  total = s.num_per_class * model_cfg.num_classes
  mesh, rules, graphdef, param_shardings, params = _ema_on_mesh(config, model_cfg, checkpoint_dir, step)
  batch = _global_batch(s.batch_size, mesh)

  parts_dir = fs.join(out_dir, "parts")
  is_main = jax.process_index() == 0
  if is_main:
    fs.makedirs(parts_dir)
    fs.write_text(fs.join(out_dir, "settings.json"), json.dumps(
        {"checkpoint": fs.resolve(checkpoint_dir), "step": step, "image_size": [h, w],
         "total": total, **s.to_dict()}, indent=1, default=str))
  multihost_utils.sync_global_devices("sample_start")
  # Object stores have no empty directories: no parts yet may mean no parts_dir at all.
  names = fs.listdir(parts_dir) if fs.isdir(parts_dir) else []
  done = {int(n[5:12]) for n in names if n.startswith("part_") and n.endswith(".npz")}

  batch_sharding = sharding.batch_sharding(mesh, rules, 1)
  fn = jax.jit(make_sample_batch(graphdef, s, (h, w, model_cfg.in_channels), model_cfg.num_classes),
               in_shardings=(param_shardings, batch_sharding, batch_sharding))
  starts = [b for b in range(0, total, batch) if b not in done]
  bar = tqdm(total=total, initial=total - sum(min(batch, total - b) for b in starts), unit="img",
             desc="sample", disable=not is_main, dynamic_ncols=True)
  t0, generated = time.perf_counter(), 0
  with jax.set_mesh(mesh):
    for b in starts:
      idx = np.arange(b, b + batch)  # the last batch runs past `total`; the extra is dropped
      labels = np.minimum(idx // s.num_per_class, model_cfg.num_classes - 1).astype(np.int32)
      put = lambda a: jax.make_array_from_process_local_data(batch_sharding, a[_local_slice(len(a))])
      out = fn(params, put(idx.astype(np.int32)), put(labels))
      imgs = np.asarray(multihost_utils.process_allgather(out, tiled=True))
      n = min(batch, total - b)
      if is_main:  # a part is whole or absent
        fs.save_npz(fs.join(parts_dir, f"part_{b:07d}.npz"), arr_0=imgs[:n], arr_1=labels[:n])
      generated += n
      bar.update(n)
  bar.close()
  seconds = time.perf_counter() - t0
  summary = dict(total=total, generated=generated, seconds=seconds,
                 images_per_s=generated / seconds if generated else None, out_dir=out_dir)
  if is_main:
    summary.update(_assemble(out_dir, parts_dir, total, model_cfg.num_classes, s.num_per_class, (h, w)))
  multihost_utils.sync_global_devices("sample_end")
  return summary


def _local_slice(n: int) -> slice:
  """This process's contiguous share of a global batch of n."""
  per = n // jax.process_count()
  return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def _assemble(out_dir, parts_dir, total, num_classes, per_class, hw) -> dict:
  parts = sorted(n for n in fs.listdir(parts_dir) if n.startswith("part_") and n.endswith(".npz"))
  arrays = [fs.load_npz(fs.join(parts_dir, n)) for n in parts]
  x = np.concatenate([a["arr_0"] for a in arrays])
  y = np.concatenate([a["arr_1"] for a in arrays])
  if len(x) != total:
    raise RuntimeError(f"{parts_dir} holds {len(x)} samples, expected {total}")
  # arr_1 as in ADM's labelled batches; labels by name
  path = fs.save_npz(fs.join(out_dir, "samples.npz"), arr_0=x, arr_1=y, labels=y)
  rows = min(10, num_classes)
  cols = min(10, per_class)
  pick = np.concatenate([np.arange(c * per_class, c * per_class + cols) for c in range(rows)])
  grid_path = fs.join(out_dir, "grid.png")
  images.save_png(images.grid(x[pick], rows), grid_path, scale=max(1, 256 // max(hw)))
  return dict(samples=path, grid=grid_path)


def main(argv):
  del argv
  from pixeldit_jax import config_lib
  f = flags.FLAGS
  sharding.maybe_initialize_distributed()
  config = f.config
  config_lib.validate(config)
  if bool(f.workdir) == bool(f.checkpoint):
    from pixeldit_jax.cli import UserError  # noqa: PLC0415
    raise UserError("give exactly one of --workdir (a training run) or --checkpoint (a checkpoint directory)")
  ckpt_dir = fs.resolve(f.checkpoint or fs.join(f.workdir, "checkpoints"))
  out_dir = fs.resolve(f.out or fs.join(f.workdir or f.checkpoint,
                                        "samples_" + settings_tag(config.sample)))
  if f.prompts:
    summary = run_text(config, ckpt_dir, out_dir, read_prompts(f.prompts), f.step)
  else:
    summary = run(config, ckpt_dir, out_dir, f.step)
  logging.info("sampling: %s", summary)
  rate = f", {summary['images_per_s']:.2f} images/s" if summary["images_per_s"] else ""
  print(f"{summary['total']} samples ({summary['generated']} generated now{rate}) -> "
        f"{summary.get('samples', out_dir)}; grid: {summary.get('grid', '-')}")


if __name__ == "__main__":
  from pixeldit_jax import cli
  cli.run_absl(main, _define_flags)
