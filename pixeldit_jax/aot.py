"""Does a config fit a TPU slice? Compile its train step for the slice on any host, no TPU needed.

    python -m pixeldit_jax.aot --config=configs/imagenet256_xl.py --topology=v5p-32
    python -m pixeldit_jax.aot --config=configs/imagenet256_xl.py --topology=v5p-32 --sweep
    python -m pixeldit_jax.aot --config=configs/t2i_1024.py:stage1 --topology=v5p-128 \
        --config.model.remat_policy=full --json=out.json

The train step is the trainer's own (``train.step.make_train_step`` jitted with the trainer's state
shardings, donation and output shardings; scan and remat as the config says), lowered with abstract
inputs (``ShapeDtypeStruct``s carrying ``NamedSharding``s over a mesh of the slice's devices) and
compiled by XLA's TPU compiler from PyPI's ``libtpu`` through JAX's topology API. The sampling
binary's batch function is compiled the same way. Frozen parts run in the step as the recipe runs
them: REPA's DINOv2 teacher and the T2I Gemma-2 encoder, with abstract (random) weights.

Per chip it prints XLA's memory analysis (arguments, outputs, temporaries, peak) against the chip's
HBM, the analytic FLOPs of a step (``model.cost``: 3 x forward, the trainer's MFU convention) beside
XLA's cost analysis (which counts a scanned layer once), and the step time that the analytic FLOPs
imply at a stated MFU. ``--sweep`` compiles mesh shapes and remat policies and prints the fastest
that fit. Needs the ``[aot]`` extra (``pip install "pixeldit-jax[aot]"``, i.e. libtpu); CPU and GPU
runs never import it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any, Optional, Sequence

from pixeldit_jax import cli

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Generation:
  """Per chip: HBM (GiB) and dense bf16 peak (TFLOP/s) as the Cloud TPU docs list them."""
  name: str
  hbm_gib: float
  peak_tflops: float
  cores_per_chip: int  # the slice name counts TensorCores (v4, v5p) or chips (v5e, v6e)
  dims: int  # torus dimensions of a slice
  kind: str  # jax device_kind of its devices
  chip_config: Optional[str] = None  # libtpu chip config (v4: one megacore device per chip)


GENERATIONS = {
    "v4": Generation("v4", 32, 275, 2, 3, "TPU v4", "megacore"),
    "v5p": Generation("v5p", 95, 459, 2, 3, "TPU v5"),
    "v5e": Generation("v5e", 16, 197, 1, 2, "TPU v5 lite"),
    "v6e": Generation("v6e", 32, 918, 1, 2, "TPU v6 lite"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "trillium": "v6e"}

# Cost of a remat policy in forward passes per step (forward + backward = 3, a full recompute of
# the forward one more); the sweep ranks configurations that fit by it. dots/dots_no_batch keep the
# matmul outputs and recompute only the elementwise work: counted as a small extra.
REMAT_COST = {"none": 3.0, "dots": 3.1, "dots_no_batch": 3.2, "full": 4.0}


class AotError(cli.UserError):
  """An expected mistake of the AOT tool (unknown topology, no libtpu, a mesh the slice lacks)."""


# ----------------------------------------------------------------------------- topologies

def slice_shape(chips: int, dims: int) -> tuple:
  """The chip grid of a slice of `chips` chips: the Cloud TPU docs' shapes (v5p-32 = 2x2x4,
  v5e-256 = 16x16), grown from 2x2(x1) by doubling the smallest (last) dimension."""
  if chips == 1:
    return (1,) * dims
  shape = [2, 2] + [1] * (dims - 2)
  while math.prod(shape) < chips:
    small = min(shape)
    i = max(j for j, s in enumerate(shape) if s == small)
    shape[i] *= 2
  if math.prod(shape) != chips:
    raise ValueError
  return tuple(shape)


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as given, e.g. "v5p-32"
  generation: Generation
  shape: tuple  # chips per slice along the torus axes
  num_slices: int = 1

  @property
  def chips(self) -> int:
    return math.prod(self.shape) * self.num_slices

  @property
  def libtpu_name(self) -> str:
    return f"{self.generation.name}:{'x'.join(map(str, self.shape))}"


def parse_topology(name: str, num_slices: int = 1) -> Topology:
  """'v5p-32' (TensorCores for v4/v5p, chips for v5e/v6e, as the accelerator types count),
  'v5litepod-16', or an explicit grid 'v5p:2x2x4' / 'v6e:8x8'."""
  text = name.strip().lower()
  m = re.fullmatch(r"([a-z0-9]+?)[-:](\d+(?:x\d+)*)", text)
  gen_name = _ALIASES.get(m.group(1), m.group(1)) if m else None
  if gen_name not in GENERATIONS:
    raise AotError(f"unknown TPU topology {name!r}: expected GENERATION-SIZE such as v5p-32, "
                   f"v5e-256, v6e-64, v4-16, or GENERATION:GRID such as v5p:2x2x4 "
                   f"(generations: {', '.join(GENERATIONS)})")
  gen = GENERATIONS[gen_name]
  if num_slices < 1:
    raise AotError(f"--num_slices must be >= 1, got {num_slices}")
  size = m.group(2)
  if "x" in size or ":" in text:
    shape = tuple(int(s) for s in size.split("x"))
    if len(shape) != gen.dims:
      raise AotError(f"{gen.name} slices are {gen.dims}-D grids, got {size!r} in {name!r}")
    return Topology(name, gen, shape, num_slices)
  count = int(size)
  if count % gen.cores_per_chip:
    raise AotError(f"{name!r}: {gen.name} slice names count TensorCores ({gen.cores_per_chip} per "
                   "chip), so the size must be even")
  try:
    shape = slice_shape(count // gen.cores_per_chip, gen.dims)
  except ValueError:
    valid = [slice_shape(c, gen.dims) for c in (1, 4, 8, 16, 32, 64, 128, 256)]
    raise AotError(f"no {gen.name} slice {name!r}; sizes: " + ", ".join(
        f"{gen.name}-{math.prod(s) * gen.cores_per_chip}" for s in valid)) from None
  return Topology(name, gen, shape, num_slices)


def _quiet_libtpu_env(topo: Topology) -> None:
  """libtpu looks for a TPU VM's metadata when it loads: tell it what it would find, so that it
  prints no warnings, and let several compile-only processes load it at once (no lockfile)."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE",
                        f"{topo.generation.name}-{math.prod(topo.shape) * topo.generation.cores_per_chip}")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_WORKER_ID", "0")


def topology_devices(topo: Topology) -> list:
  """Compile-only devices of the slice(s) from libtpu (never needed outside this tool)."""
  import importlib.util  # noqa: PLC0415
  if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
    raise AotError("libtpu is not installed: the AOT tool compiles with XLA's TPU compiler from "
                   "PyPI's libtpu; pip install \"pixeldit-jax[aot]\" (or the pinned libtpu in "
                   "requirements-dev.txt). CPU and GPU runs do not need it.")
  _quiet_libtpu_env(topo)
  from jax.experimental import topologies  # noqa: PLC0415
  kwargs = {}
  if topo.num_slices > 1:
    kwargs["num_slices"] = topo.num_slices
  if topo.generation.chip_config:
    kwargs["chip_config_name"] = topo.generation.chip_config
  if math.prod(topo.shape) < 4:  # a slice smaller than one host's 2x2 chips
    kwargs["chips_per_host_bounds"] = tuple(topo.shape) + (1,) * (3 - len(topo.shape))
  try:
    desc = topologies.get_topology_desc(topology_name=topo.libtpu_name, platform="tpu", **kwargs)
  except Exception as e:  # noqa: BLE001 - libtpu's refusal is the user's topology
    raise AotError(f"libtpu refused topology {topo.libtpu_name!r} ({topo.name}): "
                   f"{cli.message(e)}") from e
  return list(desc.devices)


# ----------------------------------------------------------------------------- configs

def apply_overrides(config, overrides: Sequence[str]):
  """'a.b=value' pairs (or '--config.a.b=value') onto a ConfigDict; values as Python literals."""
  import ast  # noqa: PLC0415
  for item in overrides:
    item = re.sub(r"^--config\.", "", item)
    key, sep, text = item.partition("=")
    if not sep:
      raise AotError(f"override {item!r} is not KEY=VALUE")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    parts = key.split(".")
    node = config
    for depth, part in enumerate(parts[:-1]):
      if part not in node:
        raise AotError(f"--config.{key}: config has no field {'.'.join(parts[:depth + 1])!r}")
      node = node[part]
    if key == "sharding.dcn_mesh_shape" and parts[-1] not in node:
      node[parts[-1]] = None  # multi-slice is a property of the slice: any config may take it
    if parts[-1] not in node:
      raise AotError(f"--config.{key}: config has no field {key!r}")
    current = node[parts[-1]]
    if isinstance(current, (tuple, list)) and isinstance(value, list):
      value = tuple(value)
    node[parts[-1]] = value
  return config


def _remat_policies():
  from pixeldit_jax.model.config import REMAT_POLICIES  # noqa: PLC0415
  return REMAT_POLICIES


# ----------------------------------------------------------------------------- the compiled steps

# Gemma-2-2B (Efficient-Large-Model/gemma-2-2b-it config.json): the T2I recipe's text encoder.
GEMMA2_2B = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_layers=26,
                 num_heads=8, num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256,
                 attn_logit_softcapping=50.0, sliding_window=4096,
                 sliding=tuple(i % 2 == 0 for i in range(26)))


def _chi_tokens() -> int:
  """Tokens of the T2I chi prompt, estimated (the tokenizer is not loaded): ~4/3 per word."""
  from pixeldit_jax.text import gemma2  # noqa: PLC0415
  return 1 + math.ceil(len(gemma2.CHI_PROMPT.split()) * 4 / 3)


def _text_encoder(config):
  """(encode_tokens, abstract params, tokens per caption) of the config's in-step text encoder,
  or None when the recipe reads a precomputed embedding cache."""
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from pixeldit_jax.text import base, gemma2, minilm  # noqa: PLC0415
  tc = config.text
  if tc.get("cache"):
    return None
  dtype = base.resolve_dtype(tc.dtype)
  if tc.encoder == "gemma2":
    model = nnx.eval_shape(lambda: gemma2.Gemma2(gemma2.Gemma2Config(**GEMMA2_2B), dtype=dtype))
    enc = object.__new__(gemma2.Gemma2Encoder)  # no tokenizer: only the jitted half is needed
    base.TextEncoder.__init__(enc, model)
    enc.dim, enc.length = model.cfg.hidden_size, gemma2.LENGTH
    return enc.encode_tokens, enc.params, _chi_tokens() + gemma2.LENGTH - 2
  enc = minilm.MiniLMEncoder.from_dir(tc.get("path"), max_length=int(tc.max_length), dtype=tc.dtype)
  return enc.encode_tokens, enc.params, enc.length


@dataclasses.dataclass
class Built:
  """What a compile needs: the jitted function and its abstract arguments."""
  fn: Any
  args: tuple
  mesh: Any
  rules: tuple
  notes: list


def _sds(shape, dtype, sharding):
  import jax  # noqa: PLC0415
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def build_train_step(config, mesh) -> Built:
  """The trainer's jitted step (trainer._train builds it the same way) and abstract inputs."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from pixeldit_jax import config_lib, sharding  # noqa: PLC0415
  from pixeldit_jax.model import abstract as abstract_model  # noqa: PLC0415
  from pixeldit_jax.train import optimizer as optimizer_lib  # noqa: PLC0415
  from pixeldit_jax.train import repa as repa_lib  # noqa: PLC0415
  from pixeldit_jax.train import state as state_lib  # noqa: PLC0415
  from pixeldit_jax.train import step as step_lib  # noqa: PLC0415

  tcfg = config.train
  model_cfg = config_lib.model_config(config)
  rules = tuple(tuple(r) for r in config.sharding.rules)
  b = config.batch_size
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  if b % batch_devices:
    raise AotError(f"batch_size {b} is not divisible by the {batch_devices} devices of the mesh's "
                   f"data and fsdp axes ({dict(mesh.shape)})")
  model = abstract_model(model_cfg)
  graphdef = nnx.graphdef(model)
  repl = sharding.replicated(mesh)
  frozen, notes = {}, []
  h, w = config.image_size
  rcfg = config.get("repa")
  abstract_projector = make_projector = teacher = None
  if rcfg is not None and rcfg.weight > 0:
    from pixeldit_jax.teacher import dinov2  # noqa: PLC0415
    make_projector = lambda: repa_lib.make_projector(model_cfg, rcfg, config.seed)  # noqa: E731
    abstract_projector = nnx.eval_shape(make_projector)
    p = model_cfg.patch_size
    size = tuple(rcfg.teacher_size) if rcfg.get("teacher_size") else (14 * h // p, 14 * w // p)
    tgraph, tparams = dinov2.abstract_teacher(dinov2.Dinov2Config.vitb14(
        dtype=rcfg.teacher_dtype, pos_interpolation="hub"))
    features = lambda params, images01, input_size: dinov2.teacher_features(  # noqa: E731
        tgraph, params, images01, input_size)
    teacher = step_lib.Teacher(features, size, (size[0] // 14, size[1] // 14))
    frozen["teacher"] = jax.tree.map(lambda a: _sds(a.shape, a.dtype, repl), tparams)
    notes.append(f"REPA teacher DINOv2 ViT-B/14 at {size[0]}x{size[1]} in the step")
  batch_sh = lambda ndim: sharding.batch_sharding(mesh, rules, ndim)  # noqa: E731
  batch = {"image": _sds((b, h, w, model_cfg.in_channels), jnp.uint8, batch_sh(4)),
           "skipped": _sds((b,), jnp.int32, batch_sh(1)),
           "converted": _sds((b,), jnp.int32, batch_sh(1))}
  encode_text = None
  if model_cfg.is_text_to_image:
    frozen["null_text"] = _sds((1, model_cfg.text_length, model_cfg.text_dim), jnp.float32, repl)
    encoder = _text_encoder(config)
    if encoder is None:
      batch["text_emb"] = _sds((b, model_cfg.text_length, model_cfg.text_dim), jnp.float32, batch_sh(3))
      notes.append("text from the embedding cache")
    else:
      encode_text, tparams, tokens = encoder
      frozen["text"] = jax.tree.map(lambda a: _sds(a.shape, a.dtype, repl), tparams)
      batch["text_ids"] = _sds((b, tokens), jnp.int32, batch_sh(2))
      batch["text_mask"] = _sds((b, tokens), jnp.int32, batch_sh(2))
      notes.append(f"text encoder {config.text.encoder} in the step ({tokens} tokens, estimated)")
  else:
    batch["label"] = _sds((b,), jnp.int32, batch_sh(1))
  tx = optimizer_lib.for_training(tcfg, model, abstract_projector)
  state_shardings = state_lib.shardings(model, tx, mesh, rules, abstract_projector)
  with jax.set_mesh(mesh):
    state = state_lib.abstract_state(model_cfg, tx, config.seed, state_shardings, make_projector)
  fn = jax.jit(
      step_lib.make_train_step(graphdef, tx, config, teacher=teacher,
                               projector_graphdef=nnx.graphdef(abstract_projector) if teacher else None,
                               encode_text=encode_text),
      out_shardings=(state_shardings, repl), donate_argnums=(0,))
  return Built(fn, (state, batch, frozen), mesh, rules, notes)


def build_sample_step(config, mesh) -> Built:
  """The sampling binary's batch function (sample.run / run_text) on its global batch."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from pixeldit_jax import config_lib, sharding  # noqa: PLC0415
  from pixeldit_jax import sample as sample_lib  # noqa: PLC0415
  from pixeldit_jax.model import abstract as abstract_model  # noqa: PLC0415

  model_cfg = config_lib.model_config(config)
  rules = tuple(tuple(r) for r in config.sharding.rules)
  model = abstract_model(model_cfg)
  graphdef = nnx.graphdef(model)
  specs = sharding.named(mesh, sharding.param_specs(model, mesh, rules))
  params = jax.tree.map(lambda a, sh: _sds(a.shape, jnp.float32, sh),
                        nnx.to_pure_dict(nnx.state(model, nnx.Param)), specs)
  s = config.sample
  devices = mesh.shape["data"] * mesh.shape["fsdp"]
  b = -(-s.batch_size // devices) * devices
  h, w = config.image_size
  shape = (h, w, model_cfg.in_channels)
  batch_sh = lambda ndim: sharding.batch_sharding(mesh, rules, ndim)  # noqa: E731
  idx = _sds((b,), jnp.int32, batch_sh(1))
  if model_cfg.is_text_to_image:
    text = _sds((b, model_cfg.text_length, model_cfg.text_dim), jnp.float32, batch_sh(3))
    fn = jax.jit(sample_lib.make_text_sample_batch(graphdef, s, shape))
    args = (params, idx, text, text)
  else:
    fn = jax.jit(sample_lib.make_sample_batch(graphdef, s, shape, model_cfg.num_classes))
    args = (params, idx, _sds((b,), jnp.int32, batch_sh(1)))
  return Built(fn, args, mesh, rules, [f"sampler {s.sampler} {s.num_steps} steps, batch {b}"])


_EXHAUSTED = re.compile(r"([\d.]+)\s*([KMGT]?)i?B?\)?\s+exceeds\s+(?:the\s+)?available\s+HBM\s+\(([\d.]+)\s*([KMGT]?)",
                        re.IGNORECASE)
_USED = re.compile(r"Used\s+([\d.]+)([KMGT])\s+of\s+([\d.]+)([KMGT])\s+hbm", re.IGNORECASE)
_UNIT = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GIB, "T": 1024 ** 4}


def _exhausted_bytes(text: str) -> Optional[tuple]:
  """(needed, available) bytes from XLA's RESOURCE_EXHAUSTED message, when it says them."""
  m = _EXHAUSTED.search(text) or _USED.search(text)
  if not m:
    return None
  return (float(m.group(1)) * _UNIT[m.group(2).upper()], float(m.group(3)) * _UNIT[m.group(4).upper()])


def compile_built(built: Built) -> dict:
  """Lower and compile; per-chip memory from XLA, or what the compiler refused."""
  from pixeldit_jax import sharding  # noqa: PLC0415
  t0 = time.perf_counter()
  with sharding.use(built.mesh, built.rules):
    lowered = built.fn.lower(*built.args)
    try:
      compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA refuses a program that does not fit
      text = str(e)
      if "RESOURCE_EXHAUSTED" not in text:
        raise
      need = _exhausted_bytes(text)
      return {"compiled": False, "compile_s": time.perf_counter() - t0,
              "error": cli.message(e)[:300],
              "peak_gib": need[0] / GIB if need else None,
              "xla_hbm_gib": need[1] / GIB if need else None}
  ma = compiled.memory_analysis()
  get = lambda k: int(getattr(ma, k, 0) or 0)  # noqa: E731
  args, out, alias, temp = (get("argument_size_in_bytes"), get("output_size_in_bytes"),
                            get("alias_size_in_bytes"), get("temp_size_in_bytes"))
  code = get("generated_code_size_in_bytes")
  # Donated arguments alias outputs: live once. XLA's own peak where it reports one.
  total = args + out - alias + temp + code
  peak = get("peak_memory_in_bytes") or total
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"compiled": True, "compile_s": time.perf_counter() - t0,
          "arguments_gib": args / GIB, "outputs_gib": out / GIB, "aliased_gib": alias / GIB,
          "temporaries_gib": temp / GIB, "code_gib": code / GIB, "total_gib": total / GIB,
          "peak_gib": max(peak, total) / GIB,
          "xla_flops_per_chip": float((cost or {}).get("flops", 0.0)),
          "_compiled": compiled}


# ----------------------------------------------------------------------------- HLO inspection

_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([a-z][a-z\-]*)\(", re.MULTILINE)
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
                "collective-broadcast", "ragged-all-to-all")
# Host callbacks (jax.debug.print, io_callback, pure_callback) and host memory offload.
_HOST_TARGETS = re.compile(r'custom_call_target="([^"]*(?:callback|Callback|MoveToHost|MoveToDevice)[^"]*)"')
# Pallas/Mosaic kernels compiled into the program (the splash attention kernels on TPU).
_MOSAIC_TARGET = 'custom_call_target="tpu_custom_call"'


def _group_sizes(line: str) -> Optional[set]:
  """Sizes of a collective's replica groups, from any of XLA's spellings: explicit
  {{0,1},{2,3}}, iota [2,2]<=[4] (2 groups of 2), or mesh['axis_0'=2,'axis_1'=4] {'axis_1'}."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if m:
    sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
    return {math.prod(sizes[a] for a in re.findall(r"'([^']+)'", m.group(2)))}
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
  if m:
    return {int(m.group(2))}
  m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)+)\}", line)
  if m:
    return {len([x for x in g.split(",") if x]) for g in re.findall(r"\{([\d,]*)\}", m.group(1))}
  return None


def hlo_summary(hlo_text: str) -> dict:
  """What crosses chips and hosts in an optimised HLO module: collectives by kind, host transfers
  (send/recv/infeed/outfeed and host callbacks) apart from multi-slice DCN transfers (send/recv
  that libtpu's megascale runtime carries), and every all-gather's result shapes and groups."""
  ops: dict = {}
  gathers, host, dcn, kernels = [], [], {}, 0
  for line in hlo_text.splitlines():
    m = _OP.match(line)
    if not m:
      continue
    rtype, op = m.group(1), m.group(2)
    base = op[:-6] if op.endswith("-start") else op
    if op.endswith("-done"):
      continue
    if base in _COLLECTIVES:
      ops[base] = ops.get(base, 0) + 1
    if base == "all-gather":
      shapes = [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _SHAPE.findall(rtype)]
      if op.endswith("-start"):  # (operands, results) of the async form
        shapes = shapes[len(shapes) // 2:]
      gathers.append({"shapes": shapes, "group_sizes": _group_sizes(line)})
    elif base in ("send", "recv"):
      if "xla_megascale_runtime" in line:
        kind = (re.search(r'_xla_megascale_transfer_type="(\w+)"', line) or [None, "?"])[1]
        dcn[kind] = dcn.get(kind, 0) + 1
      else:
        host.append(line.strip()[:160])
    elif base in ("infeed", "outfeed"):
      host.append(line.strip()[:160])
    elif base == "custom-call" and _HOST_TARGETS.search(line):
      host.append(line.strip()[:160])
    elif base == "custom-call" and _MOSAIC_TARGET in line:
      kernels += 1
  return {"collectives": ops, "host_transfers": host, "dcn_transfers": dcn, "all_gathers": gathers,
          "mosaic_kernels": kernels}


def unexpected_gathers(summary: dict, param_sizes: set, group_size: int) -> list:
  """All-gathers that are not FSDP parameter gathers: each result must hold as many elements as
  a parameter or one layer of a stacked parameter, gathered within groups of `group_size` chips
  (the fsdp axis)."""
  bad = []
  for g in summary["all_gathers"]:
    sizes_ok = all(math.prod(shape) in param_sizes for _, shape in g["shapes"])
    groups_ok = g["group_sizes"] == {group_size}
    if not (sizes_ok and groups_ok):
      bad.append(g)
  return bad


def param_sizes(config) -> set:
  """Element counts of every parameter and of one layer of each stacked (scanned) parameter."""
  from flax import nnx  # noqa: PLC0415
  from pixeldit_jax import config_lib  # noqa: PLC0415
  from pixeldit_jax.model import abstract as abstract_model  # noqa: PLC0415
  out = set()
  for _, var in nnx.to_flat_state(nnx.state(abstract_model(config_lib.model_config(config)), nnx.Param)):
    shape = var.get_value().shape
    out.add(math.prod(shape))
    names = var.get_metadata().get("out_sharding") or ()
    if names and names[0] == "layers":
      out.add(math.prod(shape[1:]))
  return out


# ----------------------------------------------------------------------------- one check

def analytic_flops(config) -> dict:
  """Train-step FLOPs as the trainer counts them (3 x forward of the model on the batch)."""
  from pixeldit_jax import config_lib  # noqa: PLC0415
  from pixeldit_jax.model.cost import forward_flops, train_step_flops  # noqa: PLC0415
  model_cfg = config_lib.model_config(config)
  h, w = config.image_size
  fwd = forward_flops(model_cfg, h, w)["total"]
  return {"forward_flops_per_image": fwd,
          "train_flops_per_step": train_step_flops(model_cfg, h, w, config.batch_size, forward=fwd)}


def mesh_for(config, devices, topo: Topology):
  from pixeldit_jax import sharding  # noqa: PLC0415
  dcn = config.sharding.get("dcn_mesh_shape")
  try:
    return sharding.mesh_from_config(config.sharding, devices)
  except ValueError as e:
    raise AotError(f"mesh {tuple(config.sharding.mesh_shape)}"
                   + (f" x DCN {tuple(dcn)}" if dcn and any(int(d) != 1 for d in dcn) else "")
                   + f" does not fit {topo.name} ({len(devices)} chips"
                   + (f" in {topo.num_slices} slices" if topo.num_slices > 1 else "")
                   + f"): {cli.message(e)}") from e


def check(config, topo: Topology, devices=None, *, mfu: float = 0.4, sampler: bool = True,
          hlo: bool = False, keep_compiled: bool = False) -> dict:
  """Compile the train step (and the sampler) of `config` for `topo`; the report as a dict."""
  from pixeldit_jax import config_lib  # noqa: PLC0415
  devices = devices if devices is not None else topology_devices(topo)
  config_lib.validate(config)
  mesh = mesh_for(config, devices, topo)
  gen = topo.generation
  model_cfg = config_lib.model_config(config)
  flops = analytic_flops(config)
  chips = len(devices)
  step_s = flops["train_flops_per_step"] / (chips * gen.peak_tflops * 1e12 * mfu)
  built = build_train_step(config, mesh)
  train = compile_built(built)
  out = {
      "topology": topo.name, "libtpu_topology": topo.libtpu_name, "num_slices": topo.num_slices,
      "chips": chips, "device_kind": devices[0].device_kind, "hbm_gib": gen.hbm_gib,
      "peak_tflops": gen.peak_tflops, "mesh": dict(mesh.shape),
      "dcn_mesh_shape": list(config.sharding.get("dcn_mesh_shape") or []) or None,
      "image_size": list(config.image_size), "batch_size": config.batch_size,
      "remat_policy": model_cfg.remat_policy, "scan_layers": model_cfg.scan_layers,
      "repa": bool(config.get("repa") and config.repa.weight > 0), "notes": built.notes,
      "mfu": mfu, **flops,
      "implied_step_s": step_s,
      "implied_images_per_s_per_chip": config.batch_size / step_s / chips,
      "train": train,
  }
  train["fits"] = bool(train["compiled"] and train["peak_gib"] <= gen.hbm_gib)
  if hlo and train["compiled"]:
    summary = hlo_summary(train["_compiled"].as_text())
    bad = unexpected_gathers(summary, param_sizes(config), mesh.shape["fsdp"])
    out["hlo"] = {"collectives": summary["collectives"], "host_transfers": summary["host_transfers"],
                  "dcn_transfers": summary["dcn_transfers"],
                  "mosaic_kernels": summary["mosaic_kernels"],
                  "all_gathers": len(summary["all_gathers"]),
                  "all_gather_group_sizes": sorted({n for g in summary["all_gathers"]
                                                    for n in (g["group_sizes"] or {0})}),
                  "unexpected_all_gathers": [g["shapes"] for g in bad]}
  if sampler:
    built_s = build_sample_step(config, mesh)
    samp = compile_built(built_s)
    samp["fits"] = bool(samp["compiled"] and samp["peak_gib"] <= gen.hbm_gib)
    samp["notes"] = built_s.notes
    out["sampler"] = samp
  for part in ("train", "sampler"):
    if part in out and not keep_compiled:
      out[part].pop("_compiled", None)
  return out


def _flops(x: float) -> str:
  for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
    if x >= scale:
      return f"{x / scale:.3g} {unit}"
  return f"{x / 1e6:.3g} MFLOP"


def _seconds(x: float) -> str:
  return f"{x:.3g} s" if x >= 0.1 else f"{x * 1e3:.3g} ms"


def format_report(r: dict) -> str:
  """The human-readable report of one check."""
  t = r["train"]
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines = [f"{r['topology']} ({r['libtpu_topology']}"
           + (f" x {r['num_slices']} slices" if r["num_slices"] > 1 else "")
           + f", {r['chips']} chips of {r['hbm_gib']:g} GiB HBM, {r['peak_tflops']:g} bf16 TFLOP/s): "
           f"mesh {mesh}" + (f", DCN {tuple(r['dcn_mesh_shape'])}" if r.get("dcn_mesh_shape") else ""),
           f"  {r['image_size'][0]}x{r['image_size'][1]}, batch {r['batch_size']}, remat "
           f"{r['remat_policy']}, {'scanned' if r['scan_layers'] else 'unrolled'} layers"
           + "".join(f"; {n}" for n in r["notes"])]

  def memory(name, m):
    if m["compiled"]:
      verdict = "fits" if m["fits"] else "DOES NOT FIT"
      return (f"  {name}: {verdict}: {m['peak_gib']:.2f} GiB per chip of {r['hbm_gib']:g} "
              f"(arguments {m['arguments_gib']:.2f}, outputs {m['outputs_gib']:.2f}, aliased "
              f"{m['aliased_gib']:.2f}, temporaries {m['temporaries_gib']:.2f}); compiled in "
              f"{m['compile_s']:.0f} s")
    need = f" needs {m['peak_gib']:.2f} GiB of XLA's {m['xla_hbm_gib']:.2f}" if m.get("peak_gib") else ""
    return f"  {name}: DOES NOT FIT:{need} ({m['error']})"

  lines.append(memory("train step", t))
  if "sampler" in r:
    lines.append(memory(f"sampler ({r['sampler']['notes'][0]})", r["sampler"]))
  xla = t.get("xla_flops_per_chip")
  lines.append(f"  FLOPs per step: analytic {r['train_flops_per_step'] / 1e15:.3f} PFLOP "
               f"({r['train_flops_per_step'] / r['chips'] / 1e12:.2f} TFLOP per chip)"
               + (f"; XLA cost analysis {xla / 1e12:.2f} TFLOP per chip (a scanned layer counted once)"
                  if xla else ""))
  if "hlo" in r:
    h = r["hlo"]
    lines.append(
        "  train step HLO: " + (", ".join(f"{k} {v}" for k, v in sorted(h["collectives"].items())) or "no collectives")
        + f"; {h['all_gathers'] - len(h['unexpected_all_gathers'])} of {h['all_gathers']} all-gathers are "
        "FSDP parameter gathers; host transfers: " + (str(len(h["host_transfers"])) if h["host_transfers"] else "none")
        + ("; DCN (megascale) " + ", ".join(f"{k} x{v}" for k, v in h["dcn_transfers"].items())
           if h["dcn_transfers"] else "")
        + f"; {h.get('mosaic_kernels', 0)} Pallas kernel calls (splash attention)")
  lines.append(f"  at {100 * r['mfu']:.0f}% MFU: {r['implied_step_s']:.3f} s per step, "
               f"{r['implied_images_per_s_per_chip']:.1f} images/s per chip")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- sweep

def sweep_candidates(config, chips: int, policies=None, max_tensor: int = 4) -> list:
  """(mesh_shape, remat_policy) pairs to try: FSDP x data x tensor splits the batch and heads
  allow, each with every remat policy; cheapest (fastest) first."""
  from pixeldit_jax import config_lib  # noqa: PLC0415
  model_cfg = config_lib.model_config(config)
  policies = policies or _remat_policies()
  out = []
  t = 1
  while t <= min(max_tensor, chips):
    if chips % t == 0 and model_cfg.num_heads % t == 0:
      rest = chips // t
      f = 1
      while f <= rest:
        if rest % f == 0 and config.batch_size % rest == 0:
          out.extend(((rest // f, f, t), p) for p in policies)
        f *= 2
    t *= 2
  # Fastest first: the remat recompute, then tensor parallelism (its all-reduces per layer),
  # then more FSDP (smaller state per chip) before more data parallelism.
  out.sort(key=lambda c: (REMAT_COST[c[1]], c[0][2], -c[0][1]))
  return out


def sweep(config, topo: Topology, *, mfu: float = 0.4, limit: int = 8, policies=None,
          log=print) -> list:
  """Compile candidates in order of expected speed, at most `limit`; returns every report.

  Pruned: once a policy fits, slower policies are not tried; when a mesh does not fit, the same
  policy on meshes with less FSDP and the same tensor split is skipped (same batch per chip,
  more parameter state per chip)."""
  devices = topology_devices(topo)
  reports, failed = [], []
  best_cost = None
  for mesh_shape, policy in sweep_candidates(config, len(devices), policies):
    if len(reports) >= limit or (best_cost is not None and REMAT_COST[policy] > best_cost):
      break
    if any(p == policy and t == mesh_shape[2] and f >= mesh_shape[1] for (_, f, t), p in failed):
      continue
    c = apply_overrides(config.copy_and_resolve_references(),
                        [f"sharding.mesh_shape={mesh_shape}", f"model.remat_policy={policy!r}"])
    r = check(c, topo, devices, mfu=mfu, sampler=False)
    r["ranked_step_s"] = r["implied_step_s"] * REMAT_COST[policy] / 3.0
    reports.append(r)
    t = r["train"]
    log(f"  mesh {mesh_shape} remat {policy}: "
        + (f"{t['peak_gib']:.2f} GiB per chip, {'fits' if t['fits'] else 'does not fit'}"
           if t["compiled"] else f"does not fit ({t.get('peak_gib') or 0:.1f} GiB needed)"))
    if t["fits"]:
      best_cost = REMAT_COST[policy] if best_cost is None else best_cost
    else:
      failed.append((mesh_shape, policy))
  return reports


# ----------------------------------------------------------------------------- entry point

def _parser():
  p = cli.ArgumentParser(prog="python -m pixeldit_jax.aot",
                         description="Compile a config's train step for a TPU slice on this host "
                                     "and say whether it fits (needs libtpu: the [aot] extra).")
  p.add_argument("--config", required=True, help="config file[:variant], e.g. configs/imagenet256_xl.py")
  p.add_argument("--topology", required=True,
                 help="TPU slice: v5p-32, v5e-256, v6e-64, v4-16, or a grid such as v5p:2x2x4")
  p.add_argument("--num_slices", type=int, default=1,
                 help="slices joined over DCN (set config.sharding.dcn_mesh_shape to match)")
  p.add_argument("--mfu", type=float, default=0.4, help="MFU for the implied step time (0.4)")
  p.add_argument("--sweep", action="store_true", help="try mesh shapes and remat policies")
  p.add_argument("--sweep_limit", type=int, default=8, help="most compiles in a sweep (8)")
  p.add_argument("--no_sampler", action="store_true", help="compile the train step only")
  p.add_argument("--hlo", action="store_true",
                 help="inspect the train step's HLO: collectives, host transfers, all-gathers")
  p.add_argument("--json", default=None, help="also write the report(s) as JSON to this file")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, e.g. --set model.remat_policy=full (or --config.KEY=VALUE)")
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  args = _parser().parse_args([a for a in argv if not a.startswith("--config.")])
  from pixeldit_jax import config_lib  # noqa: PLC0415
  topo = parse_topology(args.topology, args.num_slices)
  if not 0 < args.mfu <= 1:
    raise AotError(f"--mfu must be in (0, 1], got {args.mfu}")
  config = apply_overrides(config_lib.load(args.config), args.set + overrides)
  if args.sweep:
    print(f"sweep over {topo.name}: mesh (data, fsdp, tensor) x remat policy", flush=True)
    reports = sweep(config, topo, mfu=args.mfu, limit=args.sweep_limit)
    fitting = sorted((r for r in reports if r["train"]["fits"]), key=lambda r: r["ranked_step_s"])
    if fitting:
      best = fitting[0]
      print(f"best that fits: --config.sharding.mesh_shape={tuple(best['mesh'].values())} "
            f"--config.model.remat_policy={best['remat_policy']} ({best['train']['peak_gib']:.2f} GiB "
            f"per chip, ~{_seconds(best['ranked_step_s'])} per step at {100 * args.mfu:.0f}% MFU "
            "with the remat recompute)")
      for r in fitting[1:]:
        print(f"  also fits: mesh {tuple(r['mesh'].values())} remat {r['remat_policy']} "
              f"({r['train']['peak_gib']:.2f} GiB, ~{_seconds(r['ranked_step_s'])})")
    else:
      print("nothing tried fits: a larger slice, a smaller batch, or more candidates (--sweep_limit)")
    result: Any = reports
  else:
    print(f"compiling for {topo.name}" + (f" x {topo.num_slices} slices" if topo.num_slices > 1 else "")
          + " (minutes for the XL and T2I models)...", flush=True)
    result = check(config, topo, mfu=args.mfu, sampler=not args.no_sampler, hlo=args.hlo)
    print(format_report(result), flush=True)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(cli.guard(main))
