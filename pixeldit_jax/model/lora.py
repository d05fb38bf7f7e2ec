"""LoRA adapters for the linears of a built PixelDiT (class-conditional or text-to-image).

    y = x W + b + ((x A) B) * alpha / r,   A (in, r), B (r, out) = 0 at the start

`apply(model, rank, alpha, targets)` replaces each targeted ``nnx.Linear`` by a ``LoRALinear``
that takes over the Linear's own kernel and bias Variables and adds two ``LoRAParam``s beside
them. ``LoRAParam`` is not an ``nnx.Param``, so ``nnx.state(model, nnx.Param)`` (the checkpoint
layout, the importer's and the sharding rules' view) is exactly the base model's, path for path;
the adapters are ``nnx.state(model, LoRAParam)``, a pure dict of their own.

Scanned blocks (``layers.stack_blocks``) hold a kernel (layers, in, out): the adapters get the
same leading axis, A (layers, in, r) and B (layers, r, out), so ``nnx.scan`` slices them with the
kernel. A and B carry the kernel's logical names on the in/out axes and None (replicated) on the
rank axis, so the existing sharding rules place them; no new rule is needed.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from pixeldit_jax.model import layers


class LoRAParam(nnx.Variable):
  """A LoRA adapter matrix: trained on its own, stored apart from the base nnx.Params."""


# Which linears each target name selects, by the module path (a tuple of attribute names).
# Patch level: blocks of both models (T2I: both streams, attn/img|txt/qkv|proj, img_mlp/txt_mlp).
TARGETS: dict[str, Callable[[tuple], bool]] = {
    "attn": lambda p: p[0] == "patch_blocks" and p[-1] in ("qkv", "proj"),
    "mlp": lambda p: p[0] == "patch_blocks" and p[-1] in ("w1", "w2", "w3"),
    "adaln": lambda p: p[0] == "patch_blocks" and p[-1] in ("adaln", "img_adaln", "txt_adaln"),
    # Pixel level: PiT compaction (compress/expand, or to_attn/from_attn without compaction), the
    # PiT attention's qkv/proj, and the pixel-wise AdaLN projection.
    "pit_compaction": lambda p: p[0] == "pixel_blocks" and p[-1] in ("compress", "expand", "to_attn",
                                                                     "from_attn"),
    "pit_attn": lambda p: p[0] == "pixel_blocks" and p[-2:] in (("attn", "qkv"), ("attn", "proj")),
    "pixel_adaln": lambda p: p[0] == "pixel_blocks" and p[-2:] == ("adaln", "proj"),
}
DEFAULT_TARGETS = ("attn", "mlp")
_LINEAR_FIELDS = ("in_features", "out_features", "use_bias", "dtype", "param_dtype", "precision",
                  "dot_general", "promote_dtype", "preferred_element_type")


class LoRALinear(layers.Linear):
  """An nnx.Linear plus a low-rank update; built from an existing Linear, whose kernel and bias
  Variables it keeps (same attribute names, so the same parameter paths)."""

  def __init__(self, base: nnx.Linear, rank: int, alpha: float, key: jax.Array):
    # Not nnx.Linear.__init__: that would initialise a second kernel. The base's Variables and
    # settings are taken over as they are.
    self.kernel = base.kernel
    self.bias = base.bias if base.bias is not None else nnx.data(None)
    for name in _LINEAR_FIELDS:
      setattr(self, name, getattr(base, name))
    self.rank = rank
    self.scale = alpha / rank
    shape = base.kernel.shape  # (..., in, out); leading axes are stacked layers
    lead, (fan_in, fan_out) = shape[:-2], shape[-2:]
    names = tuple(base.kernel.get_metadata().get("out_sharding") or (None,) * len(shape))
    meta = lambda axes: dict(out_sharding=axes, eager_sharding=False)
    dtype = base.kernel.dtype
    # A like the base layers' default init, B zero: the adapted model starts as the base model.
    self.lora_a = LoRAParam(layers.torch_uniform(fan_in)(key, (*lead, fan_in, rank), dtype),
                            **meta((*names[:-1], None)))
    self.lora_b = LoRAParam(jnp.zeros((*lead, rank, fan_out), dtype), **meta((*names[:-2], None, names[-1])))

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    y = super().__call__(inputs, out_sharding=out_sharding)
    x, a, b = self.promote_dtype((inputs, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
    return y + ((x @ a) @ b * self.scale).astype(y.dtype)


def _linears(model: nnx.Module) -> list[tuple[tuple, nnx.Linear]]:
  return [(tuple(path), m) for path, m in nnx.iter_graph(model)
          if isinstance(m, nnx.Linear) and not isinstance(m, LoRALinear)]


def target_paths(model: nnx.Module, targets: Sequence[str]) -> list[tuple]:
  """Module paths of the linears that `targets` select."""
  unknown = [t for t in targets if t not in TARGETS]
  if unknown:
    raise ValueError(f"unknown LoRA target(s) {unknown}; known: {sorted(TARGETS)}")
  return [path for path, _ in _linears(model) if any(TARGETS[t](path) for t in targets)]


def apply(model: nnx.Module, rank: int, alpha: Optional[float] = None,
          targets: Sequence[str] = DEFAULT_TARGETS, seed: int = 0) -> nnx.Module:
  """Add rank-`rank` adapters to the targeted linears of `model` in place; returns `model`.
  `alpha` defaults to `rank` (scale 1)."""
  if rank <= 0:
    raise ValueError(f"LoRA rank must be positive, got {rank}")
  paths = target_paths(model, targets)
  if not paths:
    raise ValueError(f"LoRA targets {list(targets)} select no linear of this model")
  key = jax.random.PRNGKey(seed)
  for i, path in enumerate(paths):
    parent = model
    for name in path[:-1]:
      parent = getattr(parent, name)
    base = getattr(parent, path[-1])
    setattr(parent, path[-1], LoRALinear(base, rank, float(alpha or rank), jax.random.fold_in(key, i)))
  return model


def adapters(model: nnx.Module) -> dict:
  """The adapters as a pure dict (paths like params', leaves lora_a / lora_b)."""
  return nnx.to_pure_dict(nnx.state(model, LoRAParam))


def count(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def merge_params(params: Mapping, lora: Mapping, scale: float) -> dict:
  """Base params with every adapter folded in: kernel + scale * A @ B (fp32, highest precision).
  A plain param dict of the base layout (no adapters left)."""
  flat = traverse_util.flatten_dict(dict(params))
  for path, a in traverse_util.flatten_dict(dict(lora)).items():
    if path[-1] != "lora_a":
      continue
    b = traverse_util.flatten_dict(dict(lora))[path[:-1] + ("lora_b",)]
    kpath = path[:-1] + ("kernel",)
    k = flat[kpath]
    delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    flat[kpath] = (k.astype(jnp.float32) + scale * delta).astype(k.dtype)
  return traverse_util.unflatten_dict(flat)


def lora_config_of(lcfg) -> dict:
  """The settings that define the adapters' shapes and scale (recorded in checkpoint meta)."""
  rank = int(lcfg["rank"])
  alpha = lcfg.get("alpha")
  return dict(rank=rank, alpha=float(alpha if alpha is not None else rank),
              targets=list(lcfg.get("targets") or DEFAULT_TARGETS))


def scale_of(lcfg) -> float:
  c = lora_config_of(lcfg)
  return c["alpha"] / c["rank"]


def build_abstract(model_cfg, lcfg) -> nnx.Module:
  """The adapted model with ShapeDtypeStruct leaves (graphdef, shapes, logical names)."""
  from pixeldit_jax.model import pixeldit as pixeldit_lib  # noqa: PLC0415
  c = lora_config_of(lcfg)
  cls = pixeldit_lib.model_class(model_cfg)
  return nnx.eval_shape(lambda: apply(cls(model_cfg, rngs=nnx.Rngs(params=0)), c["rank"], c["alpha"],
                                      c["targets"]))


def specs(abstract_model: nnx.Module, mesh, rules) -> dict:
  """PartitionSpecs of the adapters (pure-dict layout) from their logical names."""
  from pixeldit_jax import sharding  # noqa: PLC0415
  flat = {tuple(p): sharding.spec_for(v.get_metadata()["out_sharding"], v.shape, mesh, rules)
          for p, v in nnx.to_flat_state(nnx.state(abstract_model, LoRAParam))}
  return traverse_util.unflatten_dict(flat)
