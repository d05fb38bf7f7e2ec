"""Import NVIDIA's released class-conditional PixelDiT checkpoints into an Orbax checkpoint.

    python -m pixeldit_jax.tools.import_official --checkpoint imagenet256_pixeldit_xl_epoch320.ckpt \
        --out /path/to/ckpt_dir

Reads the Lightning ``.ckpt`` (``state_dict`` with ``denoiser.*``, ``ema_denoiser.*`` and the
REPA projector ``diffusion_trainer.proj.*``) with ``torch.load(weights_only=True)``, or a bare
denoiser state dict (``.pth``/``.pt``/``.safetensors``). The model's hyper-parameters are read
from the tensor shapes, every tensor is mapped by name and shape (spec §10: Linear weights are
transposed to (in, out), per-block tensors are stacked along the scanned 'layers' axis), and
missing or unknown keys stop the import with a list of them. torch is only needed here.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Mapping

import numpy as np

# ours -> official module paths (blocks are addressed without their index here).
_MODULES = {
    "patch_embed.proj": "s_embedder.proj",
    "t_embedder.mlp_in": "t_embedder.mlp.0",
    "t_embedder.mlp_out": "t_embedder.mlp.2",
    "y_embedder.embedding": "y_embedder.embedding_table",
    "pixel_embed.proj": "pixel_embedder.proj",
    "out_head.norm": "final_layer.norm",
    "out_head.linear": "final_layer.linear",
    "patch_blocks.adaln": "patch_blocks.adaLN_modulation.0",
    "pixel_blocks.adaln.proj": "pixel_blocks.adaLN_modulation.0",
    "pixel_blocks.compress": "pixel_blocks.compress_to_attn",
    "pixel_blocks.expand": "pixel_blocks.expand_from_attn",
}
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
STACKED = ("patch_blocks", "pixel_blocks")
WEIGHT_PREFIXES = {"ema": "ema_denoiser.", "online": "denoiser."}
PROJECTOR_PREFIX = "diffusion_trainer."


class CheckpointMismatch(ValueError):
  """A checkpoint that does not match the model: the message lists what is wrong."""


def official_name(path: tuple, layer: int | None = None) -> str:
  """Official tensor name of our parameter `path` (a pure-dict key path), for block `layer`."""
  module, leaf = ".".join(path[:-1]), path[-1]
  for ours, theirs in sorted(_MODULES.items(), key=lambda kv: -len(kv[0])):
    if module == ours or module.startswith(ours + "."):
      module = theirs + module[len(ours):]
      break
  if path[0] in STACKED:
    module = f"{path[0]}.{layer}{module[len(path[0]):]}"
  return f"{module}.{_LEAVES[leaf]}"


def infer_config(sd: Mapping[str, np.ndarray]) -> dict:
  """PixelDiT hyper-parameters read off the official tensor shapes."""
  def need(name):
    if name not in sd:
      raise CheckpointMismatch(f"Not a PixelDiT class-conditional state dict: no tensor {name!r}")
    return sd[name].shape

  def depth(group):
    return len({int(m.group(1)) for k in sd if (m := re.match(rf"{group}\.(\d+)\.", k))})

  hidden, patch_in = need("s_embedder.proj.weight")
  in_ch = need("final_layer.linear.weight")[0]
  p = int(round((patch_in / in_ch) ** 0.5))
  cfg = dict(in_channels=in_ch, patch_size=p, hidden_size=hidden,
             num_heads=hidden // need("patch_blocks.0.attn.q_norm.weight")[0],
             patch_depth=depth("patch_blocks"), pixel_depth=depth("pixel_blocks"),
             num_classes=need("y_embedder.embedding_table.weight")[0] - 1,
             mlp_ratio=4.0)
  if cfg["pixel_depth"]:
    dpix = need("pixel_embedder.proj.weight")[0]
    attn = need("pixel_blocks.0.compress_to_attn.weight")[0]
    n_mod = need("pixel_blocks.0.adaLN_modulation.0.weight")[0] // (p * p * dpix)
    cfg.update(pixel_hidden_size=dpix, pixel_attn_size=None if attn == hidden else attn,
               pixel_num_heads=attn // need("pixel_blocks.0.attn.q_norm.weight")[0],
               pit_post_modulation=n_mod == 4)
    if cfg["pixel_num_heads"] == cfg["num_heads"]:
      cfg["pixel_num_heads"] = None
  return cfg


def convert(sd: Mapping[str, np.ndarray], abstract_params: Mapping) -> dict:
  """Official state dict (prefix stripped) -> our pure param dict, checked key by key."""
  from flax import traverse_util  # local: keeps `--help` fast

  flat = traverse_util.flatten_dict(abstract_params)
  expected = {}
  for path, leaf in flat.items():
    layers = range(leaf.shape[0]) if path[0] in STACKED else [None]
    for i in layers:
      expected[official_name(path, i)] = (path, i)
  missing = sorted(set(expected) - set(sd))
  unknown = sorted(set(sd) - set(expected))
  if missing or unknown:
    raise CheckpointMismatch("Checkpoint does not match the model:\n"
                       f"  missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}\n"
                       f"  unknown keys ({len(unknown)}): {unknown[:20]}{' ...' if len(unknown) > 20 else ''}")
  out, bad_shapes = {}, []
  for path, leaf in flat.items():
    stacked = path[0] in STACKED
    per_layer = tuple(leaf.shape[1:] if stacked else leaf.shape)
    is_kernel = path[-1] == "kernel"  # torch Linear weights are (out, in): transpose
    tensors = []
    for i in (range(leaf.shape[0]) if stacked else [None]):
      name = official_name(path, i)
      t = np.asarray(sd[name], dtype=np.float32)
      t = t.T if is_kernel else t
      if t.shape != per_layer:
        want = per_layer[::-1] if is_kernel else per_layer  # in the checkpoint's own layout
        bad_shapes.append(f"{name}: checkpoint {tuple(sd[name].shape)}, expected {want}")
      tensors.append(t)
    if not bad_shapes:
      out[path] = np.stack(tensors) if stacked else tensors[0]
  if bad_shapes:
    raise CheckpointMismatch("Checkpoint tensor shapes do not match the model:\n  " + "\n  ".join(bad_shapes))
  return traverse_util.unflatten_dict(out)


def load_state_dict(path: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """Read a .ckpt/.pth/.pt (torch) or .safetensors file into {name: float32 numpy array}."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No checkpoint file at {path!r}. The released ImageNet checkpoints are "
                            "the .ckpt files of the Hugging Face repository nvidia/PixelDiT-ImageNet; "
                            "download one and pass its local path.")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return dict(load_file(path))
  try:
    import torch
  except ImportError as e:
    raise SystemExit("Reading torch checkpoints needs PyTorch (CPU is enough): pip install torch") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
  except Exception as e:  # noqa: BLE001
    raise CheckpointMismatch(f"torch.load(weights_only=True) refused {path}: {e}\nIf you trust the file, "
                       "re-run with --allow-pickle to load its full pickle.") from e
  if isinstance(obj, dict) and "state_dict" in obj:
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise CheckpointMismatch(f"{path} holds a {type(obj).__name__}, not a state dict")
  return {k: v.detach().float().numpy() for k, v in obj.items() if hasattr(v, "detach")}


def select_weights(sd: Mapping[str, np.ndarray], which: str = "ema") -> tuple[dict, dict]:
  """Split a Lightning state dict into the chosen denoiser weights and the REPA projector.

  A bare denoiser state dict (no known prefix at all) is returned as it is.
  """
  known = tuple(WEIGHT_PREFIXES.values()) + (PROJECTOR_PREFIX,)
  if not any(k.startswith(known) for k in sd):
    return dict(sd), {}
  prefix = WEIGHT_PREFIXES[which]
  weights = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
  if not weights:
    raise CheckpointMismatch(f"The checkpoint has no {prefix}* tensors; try --weights "
                       f"{'online' if which == 'ema' else 'ema'}")
  projector = {k[len(PROJECTOR_PREFIX):]: v for k, v in sd.items() if k.startswith(PROJECTOR_PREFIX)}
  stray = sorted(k for k in sd if not k.startswith(known))
  if stray:
    raise CheckpointMismatch(f"Unknown top-level keys in the checkpoint ({len(stray)}): {stray[:20]}")
  return weights, projector


def import_checkpoint(checkpoint: str, out: str, which: str = "ema", allow_pickle: bool = False,
                      step: int = 0) -> dict:
  """Convert `checkpoint` and write it as Orbax checkpoint `step` under `out`. Returns the config."""
  from pixeldit_jax import checkpoint as ckpt
  from pixeldit_jax.model import PixelDiTConfig, abstract
  from flax import nnx

  sd, projector = select_weights(load_state_dict(checkpoint, allow_pickle), which)
  cfg = PixelDiTConfig.from_dict(infer_config(sd))
  abstract_params = nnx.to_pure_dict(nnx.state(abstract(cfg), nnx.Param))
  params = convert(sd, abstract_params)
  meta = {"model": cfg.to_dict(), "source": {"checkpoint": os.path.abspath(checkpoint),
                                              "weights": which,
                                              "repa_projector_tensors_skipped": len(projector)}}
  ckpt.save_weights(out, step, {ckpt.EMA_PARAMS: params}, meta)
  return cfg.to_dict()


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--checkpoint", required=True, help="official .ckpt / .pth / .safetensors file")
  ap.add_argument("--out", required=True, help="Orbax checkpoint directory to write")
  ap.add_argument("--weights", choices=sorted(WEIGHT_PREFIXES), default="ema",
                  help="which Lightning weights to import (the sampler uses the EMA ones)")
  ap.add_argument("--step", type=int, default=0, help="step number to record the weights under")
  ap.add_argument("--allow-pickle", action="store_true",
                  help="load the full pickle if weights_only loading fails (only for trusted files)")
  args = ap.parse_args(argv)
  try:
    cfg = import_checkpoint(args.checkpoint, args.out, args.weights, args.allow_pickle, args.step)
  except (CheckpointMismatch, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  shown = {k: cfg[k] for k in ("hidden_size", "num_heads", "patch_depth", "pixel_depth",
                               "patch_size", "pixel_hidden_size", "pit_post_modulation")}
  print(f"Imported {args.weights} weights of {args.checkpoint} -> {os.path.abspath(args.out)} "
        f"(step {args.step}); model: {shown}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
