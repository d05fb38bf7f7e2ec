"""DINOv2 ViT-B/14 (register-free): the frozen REPA teacher (spec §4.2, §7.2).

The network is the torch.hub ``dinov2_vitb14`` ViT: a 14x14 patch embedding, a class token, a
learned position table for the 518x518 pretraining grid (37x37 + cls) resampled bicubically to
the input grid, 12 pre-LN blocks (fused qkv with bias, exact-erf GELU MLP, LayerScale on both
branches) and a final LayerNorm. The teacher's targets are the normalised patch tokens
(``x_norm_patchtokens``).

Weights are read from a local file, either layout:

* Hugging Face ``facebook/dinov2-base`` (a directory with ``model.safetensors`` and
  ``config.json``, or the ``.safetensors`` file alone), legacy or transformers-5 tensor names;
* the torch.hub checkpoint ``dinov2_vitb14_pretrain.pth`` (needs torch to read; a ``.safetensors``
  file with the same tensor names needs nothing).

The one behavioural difference between the two reference implementations is the resampling of
the position table for an input grid other than 37x37 (``Dinov2Config.pos_interpolation``):

* ``"hub"`` (facebookresearch/dinov2, used by the official PixelDiT REPA): torch bicubic with
  ``scale_factor = (grid + 0.1) / 37`` and no antialiasing, so the sampling step is
  37 / (grid + 0.1) rather than 37 / grid;
* ``"hf"`` (transformers ``Dinov2Model``): torch bicubic to ``size = grid``, no antialiasing.

Both skip the resampling when the input is square and its grid is the pretraining one. The
loader picks ``"hub"`` for hub-named tensors and ``"hf"`` for Hugging Face ones unless told.

Precision: the official teacher ran with its weights cast to bf16 under bf16 autocast. Here the
matmuls, GELU, LayerScale and the residual stream run in ``cfg.dtype`` (bf16 by default); the
LayerNorm statistics, the position-table resampling and the final LayerNorm output are float32.
``param_dtype="bfloat16"`` also rounds the stored weights to bf16 as the official code did.

Sharding: parameters carry the same logical axis names as the PixelDiT model ("embed", "heads",
"mlp", "norm", "patch_in", "layers"), so the default FSDP rules shard the teacher like the
student; replicating it (86 M parameters, 172 MB in bf16) is also fine.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixeldit_jax import fs
from pixeldit_jax.model import layers
from pixeldit_jax.teacher.resize import output_size, torch_bicubic_resize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POS_INTERPOLATIONS = ("hub", "hf")
HUB_INTERPOLATE_OFFSET = 0.1  # dinov2 hub `interpolate_offset` of the register-free models

MISSING_WEIGHTS = (
    "DINOv2 ViT-B/14 weights not found at {path!r}: download facebook/dinov2-base "
    "model.safetensors (Hugging Face) or dinov2_vitb14_pretrain.pth (torch hub, "
    "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth) and set "
    "config.repa.teacher_path to the file or its directory, or set config.repa.weight=0 to train "
    "without REPA.")


class TeacherWeightsMismatch(ValueError):
  """A weight file that does not match the teacher: the message lists what is wrong."""


# ----------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class Dinov2Config:
  patch_size: int = 14
  hidden_size: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  layerscale_init: float = 1.0
  layer_norm_eps: float = 1e-6
  image_size: int = 518  # pretraining resolution: the position table is (518 / 14)^2 + 1 rows
  in_channels: int = 3
  pos_interpolation: str = "hub"  # "hub" or "hf", see the module docstring
  dtype: str = "bfloat16"  # compute dtype
  param_dtype: str = "float32"
  attention_impl: Optional[str] = None  # None (let JAX choose), "xla" or "cudnn"

  def __post_init__(self):
    errors = []
    if self.hidden_size % self.num_heads:
      errors.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if self.image_size % self.patch_size:
      errors.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
    if self.pos_interpolation not in POS_INTERPOLATIONS:
      errors.append(f"pos_interpolation must be one of {POS_INTERPOLATIONS}, got {self.pos_interpolation!r}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      errors.append(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
    if self.param_dtype not in ("float32", "bfloat16"):
      errors.append(f"param_dtype must be float32 or bfloat16, got {self.param_dtype!r}")
    if self.attention_impl not in (None, "xla", "cudnn"):
      errors.append(f"attention_impl must be None, 'xla' or 'cudnn', got {self.attention_impl!r}")
    if errors:
      raise ValueError("Invalid DINOv2 config:\n  - " + "\n  - ".join(errors))

  @property
  def pos_grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def mlp_hidden(self) -> int:
    return int(self.hidden_size * self.mlp_ratio)

  @classmethod
  def vitb14(cls, **overrides) -> "Dinov2Config":
    """torch.hub ``dinov2_vitb14`` / Hugging Face ``facebook/dinov2-base``."""
    return cls(**overrides)

  @classmethod
  def from_hf_config(cls, hf: Union[Mapping[str, Any], str, os.PathLike], **overrides) -> "Dinov2Config":
    """Config from a Hugging Face ``Dinov2Config`` dict or ``config.json`` path."""
    if not isinstance(hf, Mapping):
      hf = json.loads(fs.read_text(hf))
    unsupported = []
    if hf.get("model_type", "dinov2") != "dinov2":
      unsupported.append(f"model_type {hf['model_type']!r} (only register-free 'dinov2')")
    if hf.get("use_swiglu_ffn", False):
      unsupported.append("use_swiglu_ffn=true (ViT-g)")
    if not hf.get("qkv_bias", True):
      unsupported.append("qkv_bias=false")
    if hf.get("hidden_act", "gelu") != "gelu":
      unsupported.append(f"hidden_act {hf['hidden_act']!r} (only exact 'gelu')")
    if hf.get("num_register_tokens", 0):
      unsupported.append("register tokens")
    if unsupported:
      raise ValueError("Unsupported DINOv2 config: " + ", ".join(unsupported))

    def square(v):
      if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
          raise ValueError(f"only square image_size/patch_size are supported, got {v}")
        v = v[0]
      return int(v)

    fields = dict(patch_size=square(hf.get("patch_size", 14)),
                  hidden_size=int(hf.get("hidden_size", 768)),
                  depth=int(hf.get("num_hidden_layers", 12)),
                  num_heads=int(hf.get("num_attention_heads", 12)),
                  mlp_ratio=float(hf.get("mlp_ratio", 4)),
                  layerscale_init=float(hf.get("layerscale_value", 1.0)),
                  layer_norm_eps=float(hf.get("layer_norm_eps", 1e-6)),
                  image_size=square(hf.get("image_size", 518)),
                  in_channels=int(hf.get("num_channels", 3)),
                  pos_interpolation="hf")
    return cls(**{**fields, **overrides})


# ----------------------------------------------------------------------------- network

class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias; statistics in fp32 (two-pass variance, as torch)."""

  def __init__(self, dim: int, *, eps: float, param_dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",), eager_sharding=False)
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("norm",), eager_sharding=False)

  def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(out_dtype or x.dtype)


class LayerScale(nnx.Module):
  def __init__(self, dim: int, init: float, *, param_dtype):
    self.gamma = nnx.Param(jnp.full((dim,), init, param_dtype), out_sharding=("norm",),
                           eager_sharding=False)

  def __call__(self, x):
    return x * self.gamma[...].astype(x.dtype)


class Attention(nnx.Module):
  """Fused qkv (laid out [q|k|v][head][head_dim], with bias), softmax attention, proj."""

  def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs, dtype, param_dtype):
    self.num_heads = cfg.num_heads
    self.attention_impl = cfg.attention_impl
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    d = cfg.hidden_size
    self.qkv = layers.linear(d, 3 * d, ("embed", "heads"), **kw)
    self.proj = layers.linear(d, d, ("heads", "embed"), **kw)

  def __call__(self, x):
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
    out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                       implementation=self.attention_impl)
    return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):
  def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.fc1 = layers.linear(cfg.hidden_size, cfg.mlp_hidden, ("embed", "mlp"), **kw)
    self.fc2 = layers.linear(cfg.mlp_hidden, cfg.hidden_size, ("mlp", "embed"), **kw)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
  """Pre-LN ViT block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x))."""

  def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    d = cfg.hidden_size
    self.norm1 = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
    self.attn = Attention(cfg, **kw)
    self.ls1 = LayerScale(d, cfg.layerscale_init, param_dtype=param_dtype)
    self.norm2 = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
    self.mlp = Mlp(cfg, **kw)
    self.ls2 = LayerScale(d, cfg.layerscale_init, param_dtype=param_dtype)

  def __call__(self, x):
    x = x + self.ls1(self.attn(self.norm1(x)))
    return x + self.ls2(self.mlp(self.norm2(x)))


class Dinov2(nnx.Module):
  """DINOv2 ViT. ``__call__(x)``: x (B, H, W, C) ImageNet-normalised, H and W multiples of the
  patch size -> {"x_norm_clstoken": (B, D), "x_norm_patchtokens": (B, H/p * W/p, D) in raster
  order, both float32; "x_prenorm": (B, 1 + N, D) in the compute dtype}."""

  def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    d, p = cfg.hidden_size, cfg.patch_size
    self.patch_embed = layers.linear(p * p * cfg.in_channels, d, ("patch_in", "embed"), rngs=rngs,
                                     dtype=dtype, param_dtype=param_dtype)
    self.cls_token = nnx.Param(layers.normal(0.02)(rngs.params(), (d,), param_dtype),
                               out_sharding=("embed",), eager_sharding=False)
    self.pos_embed = nnx.Param(layers.normal(0.02)(rngs.params(), (cfg.pos_grid ** 2 + 1, d), param_dtype),
                               out_sharding=(None, "embed"), eager_sharding=False)
    self.blocks = layers.stack_blocks(lambda r: Block(cfg, rngs=r), cfg.depth, rngs)
    self.norm = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=param_dtype)

  def position_embedding(self, height: int, width: int) -> jax.Array:
    """(1 + gh*gw, D) float32 position table for an input of height x width pixels."""
    cfg = self.cfg
    gh, gw, m = height // cfg.patch_size, width // cfg.patch_size, cfg.pos_grid
    pos = self.pos_embed[...].astype(jnp.float32)
    if gh * gw == m * m and height == width:  # both references skip the resampling only here
      return pos
    grid = pos[1:].reshape(1, m, m, -1)
    if cfg.pos_interpolation == "hub":
      scale = ((gh + HUB_INTERPOLATE_OFFSET) / m, (gw + HUB_INTERPOLATE_OFFSET) / m)
      if (output_size(m, scale[0]), output_size(m, scale[1])) != (gh, gw):
        raise ValueError(f"hub position resampling of {m}x{m} gives the wrong grid for {gh}x{gw}")
      grid = torch_bicubic_resize(grid, scale_factor=scale)
    else:
      grid = torch_bicubic_resize(grid, (gh, gw))
    return jnp.concatenate([pos[:1], grid.reshape(gh * gw, -1)], axis=0)

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    cfg = self.cfg
    b, h, w, c = x.shape
    p = cfg.patch_size
    if h % p or w % p or c != cfg.in_channels:
      raise ValueError(f"DINOv2 input must be (B, H, W, {cfg.in_channels}) with H and W multiples "
                       f"of {p}, got {x.shape}")
    dtype = jnp.dtype(cfg.dtype)
    gh, gw = h // p, w // p
    # Patches flattened as (row, col, channel) to match the kernel built from torch's (out, in, kh, kw).
    patches = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c)
    tokens = self.patch_embed(patches.astype(dtype))
    cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (b, 1, cfg.hidden_size))
    tokens = jnp.concatenate([cls, tokens], axis=1) + self.position_embedding(h, w).astype(dtype)
    tokens = layers.scan_blocks(self.blocks, tokens)
    out = self.norm(tokens, out_dtype=jnp.float32)
    return {"x_norm_clstoken": out[:, 0], "x_norm_patchtokens": out[:, 1:], "x_prenorm": tokens}


# ----------------------------------------------------------------------------- preprocessing

def repa_input_size(height: int, width: int, patch: int = 16, teacher_patch: int = 14) -> tuple[int, int]:
  """Teacher input size for a (height, width) image so that both have the same token grid:
  (14*h//16, 14*w//16), i.e. 224 for 256 and 448 for 512 (spec §4.2; T2I uses a fixed 224)."""
  return teacher_patch * height // patch, teacher_patch * width // patch


def preprocess(images: jax.Array, size: Sequence[int], *, antialias: bool = False) -> jax.Array:
  """images (B, H, W, 3) in [0, 1] -> ImageNet-normalised (B, size[0], size[1], 3) float32.

  Normalises, then resizes like torch bicubic (no antialias, as the official code). The two steps
  commute (each resized pixel is an affine combination); this is the official order.
  """
  x = jnp.asarray(images, jnp.float32)
  x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
  if tuple(size) != tuple(x.shape[-3:-1]) or antialias:
    x = torch_bicubic_resize(x, tuple(int(s) for s in size), antialias=antialias)
  return x


def teacher_features(graphdef: nnx.GraphDef, params: nnx.State, images01: jax.Array,
                     size: Sequence[int]) -> jax.Array:
  """REPA targets: (B, N, D) float32 ``x_norm_patchtokens`` of images in [0, 1], gradient-free.

  Pure and jittable; `size` (the teacher input size, see `repa_input_size`) must be static.
  """
  model = nnx.merge(graphdef, params)
  feats = model(preprocess(images01, size))["x_norm_patchtokens"]
  return jax.lax.stop_gradient(feats.astype(jnp.float32))


# ----------------------------------------------------------------------------- weight loading

_WEIGHT_FILES = ("model.safetensors", "dinov2_vitb14_pretrain.pth")


def resolve_weights_path(path: Optional[Union[str, os.PathLike]]) -> str:
  """The weight file for `path` (a file, or a directory holding one); FileNotFoundError if none."""
  if not path:
    raise FileNotFoundError(MISSING_WEIGHTS.format(path=path))
  path = fs.resolve(path)  # local or gs://
  if fs.isfile(path):
    return path
  if fs.isdir(path):
    for name in _WEIGHT_FILES:
      if fs.isfile(fs.join(path, name)):
        return fs.join(path, name)
    found = [f for f in fs.listdir(path) if f.endswith((".safetensors", ".pth", ".pt", ".bin"))]
    if len(found) == 1:
      return fs.join(path, found[0])
    if found:
      raise FileNotFoundError(f"Several candidate DINOv2 weight files in {path!r}: {found}; "
                              "pass the file itself")
  raise FileNotFoundError(MISSING_WEIGHTS.format(path=path))


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{tensor name: numpy array} of a .safetensors (numpy only) or torch (.pth/.pt/.bin) file."""
  path = fs.local_file(path)  # a gs:// file is copied to the local cache once
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return dict(load_file(path))
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"Reading {path} (a torch checkpoint) needs PyTorch (CPU is enough: "
                      "pip install torch), or convert it once to .safetensors elsewhere with "
                      "safetensors.torch.save_file(torch.load(path), 'dinov2_vitb14.safetensors').") from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise TeacherWeightsMismatch(f"{path} holds a {type(obj).__name__}, not a state dict")
  return {k: v.detach().to(torch.float32).numpy() for k, v in obj.items() if hasattr(v, "detach")}


def detect_layout(names) -> str:
  """'hf' (transformers names), 'hf5' (transformers-5 in-memory names) or 'hub'."""
  names = list(names)
  if any(".attention.q_proj." in k for k in names):
    return "hf5"
  if any(k.startswith(("embeddings.", "dinov2.embeddings.")) for k in names):
    return "hf"
  return "hub"


_QKV = ("q", "k", "v")


# Per block: our (module path, leaf) -> [(tensor name suffix, conversion, torch shape)] for a layout.
# "linear": torch (out, in) -> (in, out); "q"/"k"/"v": one third of our fused qkv (HF only).
def _block_entries(layout: str, cfg: Dinov2Config) -> dict[tuple, list]:
  d, hid = cfg.hidden_size, cfg.mlp_hidden
  if layout == "hub":
    qkv = [("attn.qkv", "linear", 3 * d)]
    proj, ls = "attn.proj", ("ls1.gamma", "ls2.gamma")
  else:
    names = (("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj")
             if layout == "hf5" else
             ("attention.attention.query", "attention.attention.key", "attention.attention.value",
              "attention.output.dense"))
    qkv = [(name, how, d) for name, how in zip(names[:3], "qkv")]
    proj, ls = names[3], ("layer_scale1.lambda1", "layer_scale2.lambda1")
  linears = {("attn", "qkv"): (qkv, d), ("attn", "proj"): ([(proj, "linear", d)], d),
             ("mlp", "fc1"): ([("mlp.fc1", "linear", hid)], d),
             ("mlp", "fc2"): ([("mlp.fc2", "linear", d)], hid)}
  entries = {}
  for mod, (parts, fan_in) in linears.items():
    entries[mod + ("kernel",)] = [(f"{n}.weight", how, (out, fan_in)) for n, how, out in parts]
    entries[mod + ("bias",)] = [(f"{n}.bias", how if how in _QKV else "id", (out,))
                                for n, how, out in parts]
  for norm in ("norm1", "norm2"):
    entries[(norm, "scale")] = [(f"{norm}.weight", "id", (d,))]
    entries[(norm, "bias")] = [(f"{norm}.bias", "id", (d,))]
  entries[("ls1", "gamma")] = [(ls[0], "id", (d,))]
  entries[("ls2", "gamma")] = [(ls[1], "id", (d,))]
  return entries


def _top_entries(layout: str):
  if layout == "hub":
    return {("cls_token",): "cls_token", ("pos_embed",): "pos_embed",
            ("patch_embed", "kernel"): "patch_embed.proj.weight",
            ("patch_embed", "bias"): "patch_embed.proj.bias",
            ("norm", "scale"): "norm.weight", ("norm", "bias"): "norm.bias"}
  return {("cls_token",): "embeddings.cls_token", ("pos_embed",): "embeddings.position_embeddings",
          ("patch_embed", "kernel"): "embeddings.patch_embeddings.projection.weight",
          ("patch_embed", "bias"): "embeddings.patch_embeddings.projection.bias",
          ("norm", "scale"): "layernorm.weight", ("norm", "bias"): "layernorm.bias"}


_IGNORED = ("mask_token", "embeddings.mask_token")  # masked-image pretraining only


def convert_state_dict(sd: Mapping[str, np.ndarray], cfg: Dinov2Config) -> dict[tuple, np.ndarray]:
  """A hub or Hugging Face state dict -> {our param path: float32 array}, checked name by name
  and shape by shape against `cfg`; TeacherWeightsMismatch lists every problem."""
  layout = detect_layout(sd)
  if layout != "hub" and any(k.startswith("dinov2.") for k in sd):  # e.g. Dinov2ForImageClassification
    sd = {k[len("dinov2."):]: v for k, v in sd.items() if k.startswith("dinov2.")}
  if "register_tokens" in sd or "embeddings.register_tokens" in sd:
    raise TeacherWeightsMismatch("These are DINOv2 weights with register tokens (dinov2_vitb14_reg); "
                                 "the REPA teacher is the register-free dinov2_vitb14")
  d, p, c = cfg.hidden_size, cfg.patch_size, cfg.in_channels
  n_pos = cfg.pos_grid ** 2 + 1
  top_shapes = {("cls_token",): (1, 1, d), ("pos_embed",): (1, n_pos, d),
                ("patch_embed", "kernel"): (d, c, p, p), ("patch_embed", "bias"): (d,),
                ("norm", "scale"): (d,), ("norm", "bias"): (d,)}
  prefix = "blocks.{}." if layout == "hub" else "encoder.layer.{}."

  # expected[name] = (our path, layer or None, how, torch shape)
  expected = {}
  top_how = {("cls_token",): "cls", ("pos_embed",): "pos", ("patch_embed", "kernel"): "conv"}
  for path, name in _top_entries(layout).items():
    expected[name] = (path, None, top_how.get(path, "id"), top_shapes[path])
  for path, parts in _block_entries(layout, cfg).items():
    for i in range(cfg.depth):
      for suffix, how, shape in parts:
        expected[prefix.format(i) + suffix] = (("blocks",) + path, i, how, shape)

  names = set(sd) - set(_IGNORED)
  missing, unknown = sorted(set(expected) - names), sorted(names - set(expected))
  bad = [f"{k}: file {tuple(sd[k].shape)}, expected {expected[k][3]}"
         for k in sorted(names & set(expected)) if tuple(sd[k].shape) != expected[k][3]]
  if missing or unknown or bad:
    def listing(title, items):
      return f"\n  {title} ({len(items)}): {items[:20]}{' ...' if len(items) > 20 else ''}" if items else ""
    raise TeacherWeightsMismatch(
        f"DINOv2 weights ({layout} layout) do not match the teacher config "
        f"(hidden {d}, depth {cfg.depth}, patch {p}, image_size {cfg.image_size}):"
        + listing("missing tensors", missing) + listing("unknown tensors", unknown)
        + listing("misshapen tensors", bad))

  out: dict[tuple, Any] = {}
  for name, (path, layer, how, _) in expected.items():
    t = np.asarray(sd[name], np.float32)
    if how == "conv":  # (out, in, kh, kw) -> rows ordered (kh, kw, in), as our patch flattening
      t = t.transpose(2, 3, 1, 0).reshape(p * p * c, d)
    elif how in ("linear",) + _QKV and t.ndim == 2:
      t = t.T
    elif how in ("cls", "pos"):  # drop torch's leading singleton axes
      t = t.reshape(d) if how == "cls" else t[0]
    if layer is None:
      out[path] = t
      continue
    slot = out.setdefault(path, {})
    if how in _QKV:
      slot.setdefault(layer, [None] * 3)[_QKV.index(how)] = t
    else:
      slot[layer] = t
  for path, value in out.items():
    if isinstance(value, dict):  # stack the blocks along the scanned 'layers' axis
      per_layer = [np.concatenate(value[i], axis=-1) if isinstance(value[i], list) else value[i]
                   for i in range(cfg.depth)]
      out[path] = np.stack(per_layer)
  return out


def hub_config_from_shapes(sd: Mapping[str, np.ndarray]) -> Dinov2Config:
  """The config of hub-named weights, read off their shapes (DINOv2 heads are 64 wide)."""
  try:
    d = int(sd["cls_token"].shape[-1])
    p = int(sd["patch_embed.proj.weight"].shape[-1])
    grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    hidden = int(sd["blocks.0.mlp.fc1.weight"].shape[0])
  except KeyError as e:
    raise TeacherWeightsMismatch(f"not a DINOv2 hub state dict: no tensor {e}") from e
  return Dinov2Config(patch_size=p, hidden_size=d, depth=depth, num_heads=max(1, d // 64),
                      mlp_ratio=hidden / d, image_size=grid * p)


def to_hub_state_dict(params: nnx.State, cfg: Dinov2Config) -> dict[str, np.ndarray]:
  """Our params -> torch.hub tensor names and layouts (the inverse of `convert_state_dict`), e.g.
  to write a small random teacher in tests or to store weights as safetensors."""
  flat = {tuple(k): np.asarray(v.value if hasattr(v, "value") else v, np.float32)
          for k, v in nnx.to_flat_state(params)}
  d, p, c = cfg.hidden_size, cfg.patch_size, cfg.in_channels
  sd = {}
  for path, name in _top_entries("hub").items():
    t = flat[path]
    if path == ("cls_token",):
      t = t.reshape(1, 1, d)
    elif path == ("pos_embed",):
      t = t[None]
    elif path == ("patch_embed", "kernel"):
      t = t.reshape(p, p, c, d).transpose(3, 2, 0, 1)
    sd[name] = t
  for path, ((suffix, how, _),) in _block_entries("hub", cfg).items():
    for i in range(cfg.depth):
      t = flat[("blocks",) + path][i]
      sd[f"blocks.{i}.{suffix}"] = t.T if how == "linear" and t.ndim == 2 else t
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def save_hub_safetensors(path: str, params: nnx.State, cfg: Dinov2Config) -> str:
  from safetensors.numpy import save_file  # noqa: PLC0415
  save_file(to_hub_state_dict(params, cfg), path)
  return path


def abstract_teacher(cfg: Dinov2Config) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, abstract params) of the teacher without allocating its weights."""
  return nnx.split(nnx.eval_shape(lambda: Dinov2(cfg, rngs=nnx.Rngs(0))))


def load_teacher(path: Optional[Union[str, os.PathLike]], cfg: Optional[Dinov2Config] = None, *,
                 dtype: str = "bfloat16", param_dtype: str = "float32",
                 pos_interpolation: Optional[str] = None) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, params) of the DINOv2 teacher with weights from a local file or directory.

  `cfg` defaults to the directory's Hugging Face ``config.json`` if there is one, else ViT-B/14;
  its dtype, param_dtype and pos_interpolation are replaced by the arguments. `pos_interpolation`
  defaults to "hf" for Hugging Face tensor names and "hub" for hub ones; pass "hub" with Hugging
  Face weights to reproduce the official (torch.hub) REPA targets exactly.
  The params keep their logical axis names (``nnx.get_partition_spec`` / pixeldit_jax.sharding).
  """
  file = resolve_weights_path(path)
  sd = read_state_dict(file)
  layout = detect_layout(sd)
  if cfg is None:
    hf_config = fs.join(os.fspath(fs.path(file).parent), "config.json")
    if layout != "hub" and fs.isfile(hf_config):
      cfg = Dinov2Config.from_hf_config(hf_config)
    elif layout == "hub":
      cfg = hub_config_from_shapes(sd)
    else:
      cfg = Dinov2Config.vitb14()
  cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=param_dtype,
                            pos_interpolation=pos_interpolation or ("hub" if layout == "hub" else "hf"))
  arrays = convert_state_dict(sd, cfg)
  graphdef, abstract = abstract_teacher(cfg)
  flat = []
  for key, var in nnx.to_flat_state(abstract):
    value = arrays[tuple(key)]
    if value.shape != var.value.shape:  # a config the weights cannot express (e.g. mlp_ratio)
      raise TeacherWeightsMismatch(f"{'.'.join(map(str, key))}: converted shape {value.shape}, "
                                   f"model expects {var.value.shape}")
    flat.append((key, var.replace(value=jnp.asarray(value, jnp.dtype(param_dtype)))))
  return graphdef, nnx.from_flat_state(flat)
