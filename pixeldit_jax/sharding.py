"""Device meshes and logical-axis rules (multi-process start-up is in pixeldit_jax.distributed).

Parameters carry logical axis names (see pixeldit_jax.model.layers); this module is the only one
that maps them onto mesh axes. The mesh has the axes (data, fsdp, tensor); the rules table lives
in the config (``config.sharding.rules``), e.g. ``("embed", "fsdp")`` shards every dimension
named "embed" over the fsdp axis. The default is FSDP: parameters are split over ``fsdp`` and
the batch over ``(data, fsdp)``. A dimension that the mesh axes do not divide is replicated.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from flax import nnx, traverse_util
from flax.core import spmd as core_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = "batch"  # logical name of the batch dimension of activations and inputs

# FSDP over 'fsdp', tensor parallelism over 'tensor' for the wide dimensions; everything small
# (norms, biases of narrow layers, the pixel width 16, stacked-layer axis) is replicated.
DEFAULT_RULES = (
    (BATCH, ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("cond", "tensor"),
    ("pixel_cond", "tensor"),
    ("pixel_patch", "tensor"),
    ("patch_out", "tensor"),
    ("layers", None), ("kv", None), ("norm", None), ("classes", None), ("freq", None),
    ("patch_in", None), ("channels", None), ("pixel", None), ("pixel_mlp", None),
    ("text_in", None), ("text", None),  # text embedder input width, text position table rows
)


def _fill(shape: Sequence[int], count: int, what: str) -> tuple:
  """`shape` with its -1 (at most one) replaced so that it covers `count` devices."""
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"{what} needs {len(MESH_AXES)} sizes for {MESH_AXES}, got {shape}")
  if shape.count(-1) > 1:
    raise ValueError(f"at most one {what} size may be -1, got {shape}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if count % known:
      raise ValueError(f"{count} devices cannot fill {what} {shape}")
    shape[shape.index(-1)] = count // known
  if math.prod(shape) != count:
    raise ValueError(f"{what} {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                     f"{count} are available")
  return tuple(shape)


def hybrid_devices(shape: Sequence[int], dcn_shape: Sequence[int], devices: Sequence) -> np.ndarray:
  """The device array of a multi-slice mesh: `shape` within each slice (ICI), `dcn_shape` slices
  along the same (data, fsdp, tensor) axes, so that only the axes with a DCN size > 1 cross
  slices. Slices are the devices' slice_index (TPU); devices without one (GPU hosts) are grouped
  by process."""
  dcn = tuple(int(s) for s in dcn_shape)
  if len(dcn) != len(MESH_AXES) or min(dcn) < 1:
    raise ValueError(f"dcn_mesh_shape needs {len(MESH_AXES)} positive sizes for {MESH_AXES}, "
                     f"got {tuple(dcn_shape)}")
  by_slice = hasattr(devices[0], "slice_index")
  granule = (lambda d: d.slice_index) if by_slice else (lambda d: d.process_index)
  groups = len({granule(d) for d in devices})
  if groups != math.prod(dcn):
    raise ValueError(f"dcn_mesh_shape {dcn} asks for {math.prod(dcn)} "
                     f"{'slices' if by_slice else 'processes'}, the devices are in {groups}")
  ici = _fill(shape, len(devices) // groups, "mesh_shape (per slice)")
  from jax.experimental import mesh_utils  # noqa: PLC0415
  return mesh_utils.create_hybrid_device_mesh(ici, dcn, list(devices), process_is_granule=not by_slice,
                                              allow_split_physical_axes=True)


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices: Optional[Sequence] = None,
              dcn_shape: Optional[Sequence[int]] = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types; one size may be -1 (all the rest).

  `dcn_shape` (config.sharding.dcn_mesh_shape) makes a multi-slice mesh: `shape` is then the mesh
  within one slice and each axis is `dcn_shape` times longer across slices, e.g. (2, 1, 1) puts
  data parallelism over two slices (the usual choice: one gradient all-reduce per step over the
  slower network, FSDP's gathers within a slice). None or all ones: one slice."""
  devices = list(devices if devices is not None else jax.devices())
  if dcn_shape is not None and any(int(s) != 1 for s in dcn_shape):
    grid = hybrid_devices(shape, dcn_shape, devices)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  shape = _fill(shape, len(devices), "mesh")
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def mesh_from_config(sharding_cfg, devices: Optional[Sequence] = None) -> Mesh:
  """The mesh of a config's `sharding` section: mesh_shape, and dcn_mesh_shape where set."""
  dcn = sharding_cfg.get("dcn_mesh_shape")
  return make_mesh(tuple(sharding_cfg.mesh_shape), devices, tuple(dcn) if dcn else None)


def spec_for(names: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
             rules: Sequence[tuple[str, Any]]) -> P:
  """PartitionSpec of an array whose dimensions have the given logical names."""
  table = dict(rules)
  used: set = set()
  out = []
  for name, size in zip(names, shape):
    if name is not None and name not in table:
      raise KeyError(f"No sharding rule for logical axis {name!r}; add it to config.sharding.rules")
    axes = table.get(name) if name is not None else None
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      out.append(axes[0] if len(axes) == 1 else axes)
    else:
      out.append(None)
  return P(*out)


def logical_names(model: nnx.Module) -> dict:
  """{param path tuple: logical axis names} of a model (or of its abstract version)."""
  return {tuple(path): var.get_metadata()["out_sharding"]
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def param_specs(model: nnx.Module, mesh: Mesh, rules) -> dict:
  """Nested dict (the params' pure-dict layout) of PartitionSpecs."""
  names = logical_names(model)
  shapes = {tuple(p): v.shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  return traverse_util.unflatten_dict({p: spec_for(n, shapes[p], mesh, rules) for p, n in names.items()})


def named(mesh: Mesh, specs):
  """PartitionSpec tree -> NamedSharding tree."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
  """Inputs are split over the batch axes of the rules along their first dimension."""
  axes = dict(rules).get(BATCH)
  axes = tuple(a for a in ((axes,) if isinstance(axes, str) else (axes or ())) if mesh.shape[a] > 1)
  lead = None if not axes else (axes[0] if len(axes) == 1 else axes)
  return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


@contextlib.contextmanager
def use(mesh: Mesh, rules):
  """Trace and run under `mesh` with these logical-axis rules: jax.set_mesh plus the rules that
  constrain_batch reads (flax's logical-axis-rules context)."""
  with jax.set_mesh(mesh), core_spmd.logical_axis_rules(tuple(rules)):
    yield


def current_batch_axes(mesh) -> tuple:
  """The mesh axes (of size > 1) the batch is split over under the current rules (``use``;
  DEFAULT_RULES when none are set)."""
  axes = dict(core_spmd.get_logical_axis_rules() or DEFAULT_RULES).get(BATCH)
  return tuple(a for a in ((axes,) if isinstance(axes, str) else (axes or ())) if mesh.shape.get(a, 1) > 1)


def constrain_batch(tree):
  """Pin the leading (batch) dimension of every array in `tree` to the batch axes of the current
  mesh and rules (``use``; DEFAULT_RULES when none are set), the rest unsharded; unchanged without
  a mesh. Without such a constraint GSPMD may replicate activations over the batch axes: the T2I
  model's text tokens (added to a position table sharded over 'embed') take the whole batch onto
  every chip, which the AOT check shows as 536 GiB per chip for stage 1 on v5p-128 instead of 15.
  The models call it where their block stacks start."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return tree
  axes = current_batch_axes(mesh)
  if not axes:
    return tree
  lead = axes[0] if len(axes) == 1 else axes
  size = math.prod(mesh.shape[a] for a in axes)

  def pin(a):  # a batch the axes do not divide (one image to edit, say) is left to GSPMD
    return a if a.shape[0] % size else jax.lax.with_sharding_constraint(a, P(lead, *([None] * (a.ndim - 1))))
  return jax.tree.map(pin, tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, rules) -> dict:
  """This process's slice of the batch -> global jax.Arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v)
          for k, v in local.items()}
