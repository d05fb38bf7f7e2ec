"""Logical-axis rules, mesh construction, the golden partition-spec table, mesh-equivalent steps.

These tests need 8 devices: they run in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must be set before JAX starts, and
the rest of the suite runs on one device).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from jax.sharding import PartitionSpec as P

from helpers import timeout
from pixeldit_jax import sharding

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


class FakeMesh:
  def __init__(self, **shape):
    self.shape = shape


def test_spec_for_follows_rules_divisibility_and_axis_reuse():
  mesh = FakeMesh(data=2, fsdp=4, tensor=2)
  rules = sharding.DEFAULT_RULES
  assert sharding.spec_for(("embed", "mlp"), (64, 96), mesh, rules) == P("fsdp", "tensor")
  assert sharding.spec_for(("layers", "embed", "heads"), (3, 64, 192), mesh, rules) == P(None, "fsdp", "tensor")
  assert sharding.spec_for(("classes", "embed"), (11, 64), mesh, rules) == P(None, "fsdp")
  assert sharding.spec_for(("embed",), (6,), mesh, rules) == P(None)  # 6 % 4: replicated
  assert sharding.spec_for(("batch", None), (16, 3), mesh, rules) == P(("data", "fsdp"), None)
  # A mesh axis is used at most once per array.
  assert sharding.spec_for(("embed", "embed"), (64, 64), mesh, rules) == P("fsdp", None)
  with pytest.raises(KeyError, match="No sharding rule for logical axis 'nope'"):
    sharding.spec_for(("nope",), (4,), mesh, rules)


def _run_8_devices(code: str) -> dict:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
             PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  prog = "import json, sys\n" + textwrap.dedent(code)
  out = subprocess.run([sys.executable, "-c", prog], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=timeout(600))
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


GOLDEN_2x2x2 = {
    # Small config of tests/helpers.TINY on a (data=2, fsdp=2, tensor=2) mesh.
    "patch_embed/proj/kernel": [None, "fsdp"],
    "patch_embed/proj/bias": ["fsdp"],
    "t_embedder/mlp_in/kernel": [None, "tensor"],
    "t_embedder/mlp_in/bias": ["tensor"],
    "t_embedder/mlp_out/kernel": ["tensor", "fsdp"],
    "t_embedder/mlp_out/bias": ["fsdp"],
    "y_embedder/embedding/embedding": [None, "fsdp"],
    "patch_blocks/norm1/scale": [None, None],
    "patch_blocks/norm2/scale": [None, None],
    "patch_blocks/attn/qkv/kernel": [None, "fsdp", "tensor"],
    "patch_blocks/attn/q_norm/scale": [None, None],
    "patch_blocks/attn/k_norm/scale": [None, None],
    "patch_blocks/attn/proj/kernel": [None, "tensor", "fsdp"],
    "patch_blocks/attn/proj/bias": [None, "fsdp"],
    # The SwiGLU width int(2 * 128 / 3) = 85 is odd: not divisible by tensor=2, so replicated.
    "patch_blocks/mlp/w1/kernel": [None, "fsdp", None],
    "patch_blocks/mlp/w3/kernel": [None, "fsdp", None],
    "patch_blocks/mlp/w2/kernel": [None, None, "fsdp"],
    "patch_blocks/adaln/kernel": [None, "fsdp", "tensor"],
    "patch_blocks/adaln/bias": [None, "tensor"],
    "pixel_embed/proj/kernel": [None, None],
    "pixel_embed/proj/bias": [None],
    "pixel_blocks/adaln/proj/kernel": [None, "fsdp", "tensor"],
    "pixel_blocks/adaln/proj/bias": [None, "tensor"],
    "pixel_blocks/norm1/scale": [None, None],
    "pixel_blocks/norm2/scale": [None, None],
    "pixel_blocks/compress/kernel": [None, "tensor", "fsdp"],
    "pixel_blocks/compress/bias": [None, "fsdp"],
    "pixel_blocks/expand/kernel": [None, "fsdp", "tensor"],
    "pixel_blocks/expand/bias": [None, "tensor"],
    "pixel_blocks/attn/qkv/kernel": [None, "fsdp", "tensor"],
    "pixel_blocks/attn/q_norm/scale": [None, None],
    "pixel_blocks/attn/k_norm/scale": [None, None],
    "pixel_blocks/attn/proj/kernel": [None, "tensor", "fsdp"],
    "pixel_blocks/attn/proj/bias": [None, "fsdp"],
    "pixel_blocks/mlp/fc1/kernel": [None, None, None],
    "pixel_blocks/mlp/fc1/bias": [None, None],
    "pixel_blocks/mlp/fc2/kernel": [None, None, None],
    "pixel_blocks/mlp/fc2/bias": [None, None],
    "out_head/norm/scale": [None],
    "out_head/linear/kernel": [None, None],
    "out_head/linear/bias": [None],
}


def test_golden_partition_specs_and_sharded_init_on_8_devices():
  got = _run_8_devices("""
      sys.path.insert(0, "tests")
      import jax
      from flax import traverse_util
      from helpers import tiny
      from pixeldit_jax import sharding
      from pixeldit_jax.model import abstract
      from pixeldit_jax.train import optimizer, state as state_lib
      from pixeldit_jax import config_lib
      mesh = sharding.make_mesh((2, 2, 2))
      model = abstract(tiny())
      specs = traverse_util.flatten_dict(sharding.param_specs(model, mesh, sharding.DEFAULT_RULES), sep="/")
      tx = optimizer.make(config_lib.train_defaults())
      sh = state_lib.shardings(model, tx, mesh, sharding.DEFAULT_RULES)
      st = jax.jit(lambda: state_lib.init(tiny(), tx, 0), out_shardings=sh)()
      mu = st.opt_state[1][0].mu[0]  # moments of (params, projector): the model's
      placed = {
        "qkv": str(st.params["patch_blocks"]["attn"]["qkv"]["kernel"].sharding.spec),
        "mu_qkv": str(mu["patch_blocks"]["attn"]["qkv"]["kernel"].sharding.spec),
        "ema_qkv": str(st.ema_params["patch_blocks"]["attn"]["qkv"]["kernel"].sharding.spec),
        "step": str(st.step.sharding.spec),
        "devices": len(jax.devices()),
      }
      print(json.dumps({"specs": {k: list(v) for k, v in specs.items()}, "placed": placed}))
  """)
  assert got["specs"] == GOLDEN_2x2x2
  assert got["placed"]["devices"] == 8
  spec = str(P(None, "fsdp", "tensor"))
  assert got["placed"]["qkv"] == got["placed"]["mu_qkv"] == got["placed"]["ema_qkv"] == spec
  assert got["placed"]["step"] == str(P())


def test_make_mesh_autofill_and_errors():
  got = _run_8_devices("""
      from pixeldit_jax import sharding
      out = {"fsdp": dict(sharding.make_mesh((1, -1, 1)).shape), "dp": dict(sharding.make_mesh((-1, 2, 2)).shape)}
      # A config's sharding section: dcn_mesh_shape all ones (or absent) is one slice.
      import ml_collections
      cfg = lambda **kw: ml_collections.ConfigDict(kw)
      out["dcn_ones"] = dict(sharding.mesh_from_config(cfg(mesh_shape=(2, -1, 1), dcn_mesh_shape=(1, 1, 1))).shape)
      out["no_dcn"] = dict(sharding.mesh_from_config(cfg(mesh_shape=(1, -1, 1))).shape)
      # constrain_batch: the leading dimension over (data, fsdp) under the mesh, a no-op without one.
      import jax, jax.numpy as jnp
      with jax.set_mesh(sharding.make_mesh((2, 2, 2))):
        y = jax.jit(lambda x: sharding.constrain_batch(x * 2))(jnp.ones((8, 4)))
      out["constrained"] = str(y.sharding.spec)
      out["no_mesh"] = float(sharding.constrain_batch(jnp.ones(2)).sum())
      for bad in [(3, -1, 1), (2, 2, 1), (-1, -1, 1)]:
        try:
          sharding.make_mesh(bad)
        except ValueError as e:
          out[str(bad)] = str(e)
      print(json.dumps(out))
  """)
  assert got["fsdp"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert got["dp"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert got["dcn_ones"] == {"data": 2, "fsdp": 4, "tensor": 1}
  assert got["no_dcn"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert got["constrained"] in (str(P(("data", "fsdp"))), str(P(("data", "fsdp"), None))) and got["no_mesh"] == 2.0
  assert "cannot fill" in got["(3, -1, 1)"]
  assert "needs 4 devices" in got["(2, 2, 1)"]
  assert "at most one" in got["(-1, -1, 1)"]


class FakeDevice:
  """What the hybrid mesh builder reads of a device; slice_index only where given (TPU)."""

  def __init__(self, i, slice_index=None, process_index=0):
    self.id, self.process_index, self.platform, self.device_kind = i, process_index, "cpu", "fake"
    if slice_index is not None:
      self.slice_index = slice_index

  def __repr__(self):
    return f"D{self.id}"


def _slices(grid):
  return [[[d.slice_index for d in row] for row in plane] for plane in grid.tolist()]


def test_dcn_mesh_puts_only_the_dcn_axes_across_slices():
  devices = [FakeDevice(i, slice_index=i // 4) for i in range(8)]
  # Data parallelism over two slices, FSDP within each (config.sharding.dcn_mesh_shape=(2,1,1)).
  grid = sharding.hybrid_devices((1, -1, 1), (2, 1, 1), devices)
  assert grid.shape == (2, 4, 1)
  assert _slices(grid) == [[[0]] * 4, [[1]] * 4]
  # FSDP across the slices instead: the fsdp axis's first half in slice 0, second half in slice 1.
  grid = sharding.hybrid_devices((2, 2, 1), (1, 2, 1), devices)
  assert grid.shape == (2, 4, 1)
  assert [[d.slice_index for d in row[:, 0]] for row in grid] == [[0, 0, 1, 1], [0, 0, 1, 1]]
  # GPU hosts have no slice_index: processes are the DCN granules.
  gpus = [FakeDevice(i, process_index=i // 2) for i in range(4)]
  grid = sharding.hybrid_devices((1, -1, 1), (2, 1, 1), gpus)
  assert [[d.process_index for d in row[:, 0]] for row in grid] == [[0, 0], [1, 1]]
  with pytest.raises(ValueError, match=r"asks for 4 slices, the devices are in 2"):
    sharding.hybrid_devices((1, -1, 1), (4, 1, 1), devices)
  with pytest.raises(ValueError, match="3 positive sizes"):
    sharding.hybrid_devices((1, -1, 1), (2, 1), devices)
  with pytest.raises(ValueError, match=r"mesh_shape \(per slice\).*needs 8 devices, 4 are available"):
    sharding.hybrid_devices((2, 4, 1), (2, 1, 1), devices)

