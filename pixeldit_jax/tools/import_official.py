"""Import NVIDIA's released PixelDiT checkpoints (ImageNet and text-to-image) into an Orbax checkpoint.

    python -m pixeldit_jax.tools.import_official --checkpoint imagenet256_pixeldit_xl_epoch320.ckpt \
        --out /path/to/ckpt_dir
    python -m pixeldit_jax.tools.import_official --checkpoint pixeldit_t2i_v1.pth --out /path/to/t2i_dir

Class-conditional: the Lightning ``.ckpt`` (``state_dict`` with ``denoiser.*``, ``ema_denoiser.*``
and the REPA projector ``diffusion_trainer.proj.0.{0,2,4}.*``). Text-to-image: the ``.pth`` of the
T2I trainer (``state_dict`` or ``model`` wrapper, optionally ``state_dict_ema``, with ``core.*`` and
the projector ``_repa_projector.{0,2,4}.*``). A bare denoiser state dict (``.pth``/``.pt``/
``.safetensors``) of either model is read too. Files are read with ``torch.load(weights_only=True)``.

The model's hyper-parameters are read from the tensor shapes, every tensor is mapped by name and
shape (spec §10: Linear weights are transposed to (in, out), per-block tensors are stacked along
the scanned 'layers' axis), and missing, unknown or misshapen keys stop the import with a list of
them. The REPA projector, when present, is written as the extra item ``repa_projector``
({"fc1", "fc2", "fc3"} of {"kernel", "bias"}). The meta records the diffusion time convention
the weights were trained in ("c2i_t" or "t2i_sigma", spec §10.8). torch is only needed here.
"""

from __future__ import annotations

import re
import sys
from typing import Mapping

import numpy as np

from pixeldit_jax import cli, fs

# ours -> official module paths (blocks are addressed without their index here).
_SHARED_MODULES = {
    "patch_embed.proj": "s_embedder.proj",
    "t_embedder.mlp_in": "t_embedder.mlp.0",
    "t_embedder.mlp_out": "t_embedder.mlp.2",
    "pixel_embed.proj": "pixel_embedder.proj",
    "out_head.norm": "final_layer.norm",
    "out_head.linear": "final_layer.linear",
    "pixel_blocks.adaln.proj": "pixel_blocks.adaLN_modulation.0",
    "pixel_blocks.compress": "pixel_blocks.compress_to_attn",
    "pixel_blocks.expand": "pixel_blocks.expand_from_attn",
}
_MODULES = {  # PixDiT (pixeldit_c2i.py)
    **_SHARED_MODULES,
    "y_embedder.embedding": "y_embedder.embedding_table",
    "patch_blocks.adaln": "patch_blocks.adaLN_modulation.0",
}
_T2I_MODULES = {  # PixDiT_T2I (pixeldit_t2i.py): x is the image stream, y the text stream
    **_SHARED_MODULES,
    "text_embed": "y_embedder",
    "patch_blocks.img_norm1": "patch_blocks.norm_x1",
    "patch_blocks.txt_norm1": "patch_blocks.norm_y1",
    "patch_blocks.img_norm2": "patch_blocks.norm_x2",
    "patch_blocks.txt_norm2": "patch_blocks.norm_y2",
    "patch_blocks.img_mlp": "patch_blocks.mlp_x",
    "patch_blocks.txt_mlp": "patch_blocks.mlp_y",
    "patch_blocks.img_adaln": "patch_blocks.adaLN_modulation_img.0",
    "patch_blocks.txt_adaln": "patch_blocks.adaLN_modulation_txt.0",
    **{f"patch_blocks.attn.{stream}.{part}": f"patch_blocks.attn.{part}_{xy}"
       for stream, xy in (("img", "x"), ("txt", "y")) for part in ("qkv", "q_norm", "k_norm", "proj")},
}
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Parameters stored without a leaf name, and the leading size-1 axis the official tensor adds.
_WHOLE = {("text_pos",): ("y_pos_embedding", 1)}
STACKED = ("patch_blocks", "pixel_blocks")
WEIGHT_PREFIXES = {"ema": "ema_denoiser.", "online": "denoiser."}
PROJECTOR_PREFIX = "diffusion_trainer."
# T2I trainer: `core` is the PixDiT_T2I, `_repa_projector` the REPA projector; an EMA copy of the
# whole trainer, if saved, sits under `state_dict_ema` (load_state_dict prefixes it so).
T2I_CORE, T2I_PROJECTOR, T2I_EMA = "core.", "_repa_projector.", "state_dict_ema."
T2I_IGNORED = ("pos_embed",)  # the official inference script deletes this key before loading
# Official names of the projector's three Linears (fc1, fc2, fc3) after the prefix is stripped.
_PROJECTOR_NAMES = {"c2i": "proj.0.{}", "t2i": "{}"}
_PROJECTOR_INDEX = {"fc1": 0, "fc2": 2, "fc3": 4}
TIME_CONVENTIONS = {"c2i": "c2i_t", "t2i": "t2i_sigma"}
# REPA student block in the official configs (align_layer / repa_encoder_index); not in the tensors.
OFFICIAL_REPA_BLOCK = {"c2i": 8, "t2i": 6}


class CheckpointMismatch(ValueError):
  """A checkpoint that does not match the model: the message lists what is wrong."""


def official_name(path: tuple, layer: int | None = None, t2i: bool = False) -> str:
  """Official tensor name of our parameter `path` (a pure-dict key path), for block `layer`."""
  if path in _WHOLE:
    return _WHOLE[path][0]
  module, leaf = ".".join(path[:-1]), path[-1]
  modules = _T2I_MODULES if t2i else _MODULES
  for ours, theirs in sorted(modules.items(), key=lambda kv: -len(kv[0])):
    if module == ours or module.startswith(ours + "."):
      module = theirs + module[len(ours):]
      break
  if path[0] in STACKED:
    module = f"{path[0]}.{layer}{module[len(path[0]):]}"
  return f"{module}.{_LEAVES[leaf]}"


def is_t2i_state_dict(sd: Mapping) -> bool:
  """A bare PixDiT_T2I state dict (no wrapper prefixes)."""
  return "y_pos_embedding" in sd or "patch_blocks.0.attn.qkv_x.weight" in sd


def _need(sd, name, what):
  if name not in sd:
    raise CheckpointMismatch(f"Not a PixelDiT {what} state dict: no tensor {name!r}")
  return sd[name].shape


def _depth(sd, group):
  return len({int(m.group(1)) for k in sd if (m := re.match(rf"{group}\.(\d+)\.", k))})


def _infer_pixel_level(sd, cfg, what):
  need = lambda name: _need(sd, name, what)
  p, hidden = cfg["patch_size"], cfg["hidden_size"]
  dpix = need("pixel_embedder.proj.weight")[0]
  attn = need("pixel_blocks.0.compress_to_attn.weight")[0]
  n_mod = need("pixel_blocks.0.adaLN_modulation.0.weight")[0] // (p * p * dpix)
  cfg.update(pixel_hidden_size=dpix, pixel_attn_size=None if attn == hidden else attn,
             pixel_num_heads=attn // need("pixel_blocks.0.attn.q_norm.weight")[0],
             pit_post_modulation=n_mod == 4)
  if cfg["pixel_num_heads"] == cfg["num_heads"]:
    cfg["pixel_num_heads"] = None
  return cfg


def infer_config(sd: Mapping[str, np.ndarray]) -> dict:
  """PixelDiT (or PixelDiT-T2I) hyper-parameters read off the official tensor shapes."""
  t2i = is_t2i_state_dict(sd)
  what = "text-to-image" if t2i else "class-conditional"
  need = lambda name: _need(sd, name, what)
  hidden, patch_in = need("s_embedder.proj.weight")
  in_ch = need("final_layer.linear.weight")[0]
  p = int(round((patch_in / in_ch) ** 0.5))
  cfg = dict(in_channels=in_ch, patch_size=p, hidden_size=hidden, patch_depth=_depth(sd, "patch_blocks"),
             pixel_depth=_depth(sd, "pixel_blocks"), mlp_ratio=4.0)
  if t2i:
    _, text_length, _ = need("y_pos_embedding")
    cfg.update(num_heads=hidden // need("patch_blocks.0.attn.q_norm_x.weight")[0],
               text_dim=need("y_embedder.proj.weight")[1], text_length=text_length)
  else:
    cfg.update(num_heads=hidden // need("patch_blocks.0.attn.q_norm.weight")[0],
               num_classes=need("y_embedder.embedding_table.weight")[0] - 1)
  if cfg["pixel_depth"]:
    _infer_pixel_level(sd, cfg, what)
  return cfg


def _mismatch_message(missing, unknown, what="Checkpoint does not match the model"):
  return (f"{what}:\n"
          f"  missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}\n"
          f"  unknown keys ({len(unknown)}): {unknown[:20]}{' ...' if len(unknown) > 20 else ''}")


def convert(sd: Mapping[str, np.ndarray], abstract_params: Mapping) -> dict:
  """Official state dict (prefix stripped) -> our pure param dict, checked key by key.

  The naming (PixDiT or PixDiT_T2I) follows the model `abstract_params` belongs to."""
  from flax import traverse_util  # local: keeps `--help` fast

  t2i = "text_embed" in abstract_params
  flat = traverse_util.flatten_dict(abstract_params)
  expected = {}
  for path, leaf in flat.items():
    layers = range(leaf.shape[0]) if path[0] in STACKED else [None]
    for i in layers:
      expected[official_name(path, i, t2i)] = (path, i)
  missing = sorted(set(expected) - set(sd))
  unknown = sorted(set(sd) - set(expected))
  if missing or unknown:
    raise CheckpointMismatch(_mismatch_message(missing, unknown))
  out, bad_shapes = {}, []
  for path, leaf in flat.items():
    stacked = path[0] in STACKED
    per_layer = tuple(leaf.shape[1:] if stacked else leaf.shape)
    is_kernel = path[-1] == "kernel"  # torch Linear weights are (out, in): transpose
    extra_axes = (1,) * _WHOLE[path][1] if path in _WHOLE else ()
    tensors = []
    for i in (range(leaf.shape[0]) if stacked else [None]):
      name = official_name(path, i, t2i)
      t = np.asarray(sd[name], dtype=np.float32)
      t = t.T if is_kernel else t
      if t.shape[:len(extra_axes)] == extra_axes:
        t = t.reshape(t.shape[len(extra_axes):])
      if t.shape != per_layer:
        want = per_layer[::-1] if is_kernel else extra_axes + per_layer  # the checkpoint's layout
        bad_shapes.append(f"{name}: checkpoint {tuple(sd[name].shape)}, expected {want}")
      tensors.append(t)
    if not bad_shapes:
      out[path] = np.stack(tensors) if stacked else tensors[0]
  if bad_shapes:
    raise CheckpointMismatch("Checkpoint tensor shapes do not match the model:\n  " + "\n  ".join(bad_shapes))
  return traverse_util.unflatten_dict(out)


def convert_projector(sd: Mapping[str, np.ndarray], kind: str, in_dim: int,
                      prefix: str = "") -> tuple[dict, dict]:
  """Official REPA projector tensors (prefix stripped) -> ({"fc1", "fc2", "fc3"}, dims).

  Linear(D, h) -> SiLU -> Linear(h, h) -> SiLU -> Linear(h, out); kernels become (in, out).
  `prefix` only completes the names in error messages."""
  names = {f"{_PROJECTOR_NAMES[kind].format(i)}.{leaf}": (fc, leaf)
           for fc, i in _PROJECTOR_INDEX.items() for leaf in ("weight", "bias")}
  missing, unknown = sorted(set(names) - set(sd)), sorted(set(sd) - set(names))
  if missing or unknown:
    raise CheckpointMismatch(_mismatch_message([prefix + k for k in missing], [prefix + k for k in unknown],
                                               "The REPA projector does not have the official layout"))
  w = {names[k]: np.asarray(v, np.float32) for k, v in sd.items()}
  hidden, out_dim = w["fc1", "weight"].shape[0], w["fc3", "weight"].shape[0]
  want = {("fc1", "weight"): (hidden, in_dim), ("fc2", "weight"): (hidden, hidden),
          ("fc3", "weight"): (out_dim, hidden), ("fc1", "bias"): (hidden,), ("fc2", "bias"): (hidden,),
          ("fc3", "bias"): (out_dim,)}
  bad = [f"{prefix}{k}: checkpoint {tuple(sd[k].shape)}, expected {want[names[k]]}"
         for k in sorted(names) if tuple(sd[k].shape) != want[names[k]]]
  if bad:
    raise CheckpointMismatch(f"REPA projector shapes do not match a model of width {in_dim}:\n  "
                             + "\n  ".join(bad))
  tree = {fc: {"kernel": np.ascontiguousarray(w[fc, "weight"].T), "bias": w[fc, "bias"]}
          for fc in _PROJECTOR_INDEX}
  return tree, {"in_dim": in_dim, "hidden_dim": hidden, "out_dim": out_dim}


def load_state_dict(path: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """Read a .ckpt/.pth/.pt (torch) or .safetensors file into {name: float32 numpy array}.

  Wrappers are unpacked: ``state_dict`` (Lightning, T2I trainer) or ``model``; a T2I
  ``state_dict_ema`` is kept beside it with its keys prefixed ``state_dict_ema.``.
  """
  if not fs.isfile(path):
    raise FileNotFoundError(f"No checkpoint file at {path!r}. The released checkpoints are the .ckpt "
                            "files of the Hugging Face repository nvidia/PixelDiT-ImageNet (ImageNet) "
                            "and the .pth of nvidia/PixelDiT-1300M-1024px (text-to-image); download "
                            "one and pass its path (local or gs://).")
  path = fs.local_file(path)  # a gs:// file is copied to the local cache once
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
  if not isinstance(obj, Mapping):
    raise CheckpointMismatch(f"{path} holds a {type(obj).__name__}, not a state dict")
  ema = obj.get(T2I_EMA[:-1]) if isinstance(obj.get(T2I_EMA[:-1]), Mapping) else {}
  for wrapper in ("state_dict", "model"):
    if isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
      break
  def tensors(d, prefix=""):
    return {prefix + k: v.detach().float().numpy() for k, v in d.items() if hasattr(v, "detach")}

  return {**tensors(obj), **tensors(ema, T2I_EMA)}


def select_weights(sd: Mapping[str, np.ndarray], which: str = "ema") -> tuple[dict, dict, dict]:
  """Split a checkpoint into the chosen denoiser weights, the REPA projector, and what they are.

  Returns (weights, projector, info); info["kind"] is "c2i" or "t2i", info["weights"] the weights
  taken ("ema" or "online"), info["projector_prefix"] the projector's prefix in the file. A bare
  denoiser state dict (no known prefix at all) is returned as it is. A T2I checkpoint without EMA
  weights (the official T2I runs keep none) gives its one set of weights for either choice.
  """
  c2i_known = tuple(WEIGHT_PREFIXES.values()) + (PROJECTOR_PREFIX,)
  t2i_known = (T2I_CORE, T2I_PROJECTOR, T2I_EMA)
  is_c2i, is_t2i = any(k.startswith(c2i_known) for k in sd), any(k.startswith(t2i_known) for k in sd)
  if is_c2i and is_t2i:
    raise CheckpointMismatch("The checkpoint mixes ImageNet (denoiser.*) and text-to-image (core.*) keys")
  if not (is_c2i or is_t2i):
    kind = "t2i" if is_t2i_state_dict(sd) else "c2i"
    return dict(sd), {}, {"kind": kind, "weights": "as_stored", "projector_prefix": None}
  if is_c2i:
    known, ignored = c2i_known, ()
  else:
    known = (T2I_CORE, T2I_PROJECTOR, T2I_EMA + T2I_CORE, T2I_EMA + T2I_PROJECTOR)
    ignored = T2I_IGNORED + tuple(T2I_EMA + k for k in T2I_IGNORED)
  stray = sorted(k for k in sd if not k.startswith(known) and k not in ignored)
  if stray:
    raise CheckpointMismatch(f"Unknown top-level keys in the checkpoint ({len(stray)}): {stray[:20]}")

  def under(prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

  if is_c2i:
    prefix = WEIGHT_PREFIXES[which]
    weights = under(prefix)
    if not weights:
      raise CheckpointMismatch(f"The checkpoint has no {prefix}* tensors; try --weights "
                               f"{'online' if which == 'ema' else 'ema'}")
    return weights, under(PROJECTOR_PREFIX), {"kind": "c2i", "weights": which,
                                              "projector_prefix": PROJECTOR_PREFIX}
  group = T2I_EMA if which == "ema" and under(T2I_EMA + T2I_CORE) else ""
  weights = under(group + T2I_CORE)
  if not weights:
    raise CheckpointMismatch(f"The checkpoint has no {group + T2I_CORE}* tensors")
  return weights, under(group + T2I_PROJECTOR), {"kind": "t2i", "weights": "ema" if group else "online",
                                                  "projector_prefix": group + T2I_PROJECTOR}


def t2i_weights_note(which: str, taken: str) -> str:
  """How the text-to-image weights taken relate to the released inference.py (it always loads
  `state_dict`). Taking `state_dict_ema` when present is kept on purpose: the released trainer only
  saves it when EMA was on (ema_update), and then it is the copy to sample from."""
  if taken == "ema":
    return ("state_dict_ema, the EMA copy the file holds; the released inference.py loads "
            "state_dict instead: --weights online")
  if taken != "online":
    return ""
  return "state_dict, as the released inference.py loads" + (
      "; the file has no state_dict_ema" if which == "ema" else "")


def import_checkpoint(checkpoint: str, out: str, which: str = "ema", allow_pickle: bool = False,
                      step: int = 0) -> dict:
  """Convert `checkpoint` and write it as Orbax checkpoint `step` under `out`. Returns the meta."""
  from pixeldit_jax import checkpoint as ckpt
  from pixeldit_jax.model import PixelDiTConfig, abstract
  from flax import nnx

  sd, projector_sd, info = select_weights(load_state_dict(checkpoint, allow_pickle), which)
  kind = info["kind"]
  cfg = PixelDiTConfig.from_dict(infer_config(sd))
  if cfg.is_text_to_image != (kind == "t2i"):
    raise CheckpointMismatch(f"The checkpoint's wrapper says {kind!r} but its tensors are those of a "
                             f"{'text-to-image' if cfg.is_text_to_image else 'class-conditional'} model")
  abstract_params = nnx.to_pure_dict(nnx.state(abstract(cfg), nnx.Param))
  items = {ckpt.EMA_PARAMS: convert(sd, abstract_params)}
  projector_meta = None
  if projector_sd:
    items[ckpt.REPA_PROJECTOR], projector_meta = convert_projector(
        projector_sd, kind, cfg.hidden_size, prefix=info["projector_prefix"])
    projector_meta["official_block"] = OFFICIAL_REPA_BLOCK[kind]  # from the configs, not the tensors
  meta = {"model": cfg.to_dict(), "time_convention": TIME_CONVENTIONS[kind],
          "repa_projector": projector_meta,
          "source": {"checkpoint": fs.resolve(checkpoint), "kind": kind, "weights": info["weights"]}}
  if kind == "t2i" and t2i_weights_note(which, info["weights"]):
    meta["source"]["note"] = t2i_weights_note(which, info["weights"])
  ckpt.save_weights(out, step, items, meta)
  return meta


def main(argv=None):
  ap = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--checkpoint", required=True, help="official .ckpt / .pth / .safetensors file")
  ap.add_argument("--out", required=True, help="Orbax checkpoint directory to write")
  ap.add_argument("--weights", choices=sorted(WEIGHT_PREFIXES), default="ema",
                  help="which weights to import (the sampler uses the EMA ones); text-to-image: "
                       "'ema' takes state_dict_ema when the file has it, else state_dict; "
                       "'online' takes state_dict, as the released inference.py does")
  ap.add_argument("--step", type=int, default=0, help="step number to record the weights under")
  ap.add_argument("--allow-pickle", action="store_true",
                  help="load the full pickle if weights_only loading fails (only for trusted files)")
  args = ap.parse_args(argv)
  try:
    meta = import_checkpoint(args.checkpoint, args.out, args.weights, args.allow_pickle, args.step)
  except (CheckpointMismatch, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  cfg = meta["model"]
  shown = {k: cfg[k] for k in ("hidden_size", "num_heads", "patch_depth", "pixel_depth", "patch_size",
                               "pixel_hidden_size", "pit_post_modulation", "text_dim")}
  note = f" ({meta['source']['note']})" if meta["source"].get("note") else ""
  print(f"Imported {meta['source']['weights']} weights{note} of {args.checkpoint} -> {fs.resolve(args.out)} "
        f"(step {args.step}, {meta['time_convention']} time convention); model: {shown}; "
        f"REPA projector: {meta['repa_projector']}")
  return 0


if __name__ == "__main__":
  sys.exit(cli.guard(main))
