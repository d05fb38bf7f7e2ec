"""CAME: against a NumPy reference of the released torch update, stacking, sharding, make()."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import timeout, tiny
from pixeldit_jax import config_lib
from pixeldit_jax.model import abstract
from pixeldit_jax.train import came, optimizer

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
B1, B2, B3, EPS1, EPS2 = 0.9, 0.999, 0.9999, 1e-30, 1e-16


# ----------------------------------------------------------------------------- reference

def _approx(row, col):
  return (row / row.mean())[:, None] ** -0.5 * col[None, :] ** -0.5


class TorchRef:
  """The released CAMEWrapper step for one tensor in torch layout, in float64, from its equations:
  factored iff 2-D or a 1x1 conv (out, in, 1, 1); unfactored tensors have no confidence term."""

  def __init__(self, shape):
    self.shape = shape
    self.fac = len(shape) == 2 or (len(shape) == 4 and shape[2:] == (1, 1))
    self.m = np.zeros(shape)
    if self.fac:
      self.row, self.col = np.zeros(shape[0]), np.zeros(shape[1])
      self.res_row, self.res_col = np.zeros(shape[0]), np.zeros(shape[1])
    else:
      self.v = np.zeros(shape)

  def step(self, p, g, lr, wd, clip=1.0):
    sq = g ** 2 + EPS1
    if self.fac:
      sq2 = sq.reshape(self.shape[:2])
      self.row = B2 * self.row + (1 - B2) * sq2.mean(1)
      self.col = B2 * self.col + (1 - B2) * sq2.mean(0)
      u = _approx(self.row, self.col).reshape(self.shape) * g
    else:
      self.v = B2 * self.v + (1 - B2) * sq
      u = g / np.sqrt(self.v)
    u = u / max(np.sqrt(np.mean(u ** 2)) / clip, 1.0)
    self.m = B1 * self.m + (1 - B1) * u
    if self.fac:
      res = ((u - self.m) ** 2 + EPS2).reshape(self.shape[:2])
      self.res_row = B3 * self.res_row + (1 - B3) * res.mean(1)
      self.res_col = B3 * self.res_col + (1 - B3) * res.mean(0)
      upd = _approx(self.res_row, self.res_col).reshape(self.shape) * self.m
    else:
      upd = self.m
    return p - wd * lr * p - lr * upd


# flax layout -> torch layout of the same tensor
TO_TORCH = {"kernel": lambda x: x.T, "bias": lambda x: x, "conv1x1": lambda x: x.transpose(3, 2, 0, 1),
            "conv3x3": lambda x: x.transpose(3, 2, 0, 1), "cube": lambda x: x}
SHAPES = {"kernel": (6, 5), "bias": (5,), "conv1x1": (1, 1, 3, 4), "conv3x3": (3, 3, 2, 4),
          "cube": (2, 3, 4)}


def _tree(rng, scale=1.0):
  return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def _run(tx, params, grads_seq):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grads_seq:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
  return params, state


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_matches_reference_of_released_torch_update(wd):
  rng = np.random.default_rng(0)
  params = _tree(rng)
  # Alternate large and small gradients so the RMS clip is active on some steps and not others.
  grads = [_tree(rng, s) for s in (1.0, 0.01, 1.0, 0.003, 0.5, 0.02)]
  lr = 0.05
  got, state = _run(came.came(lr, weight_decay=wd), params, grads)
  for k in SHAPES:
    to = TO_TORCH[k]
    ref, p = TorchRef(to(params[k]).shape), to(params[k]).astype(np.float64)
    for g in grads:
      p = ref.step(p, to(g[k]).astype(np.float64), lr, wd)
    np.testing.assert_allclose(to(np.asarray(got[k])), p, rtol=2e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(to(np.asarray(state.mu[k])), ref.m, rtol=2e-5, atol=1e-6, err_msg=k)
  assert int(state.count) == len(grads)


def test_state_layout_factored_and_unfactored():
  state = came.came(0.1).init(_tree(np.random.default_rng(0)))
  shapes = lambda t: {k: v.shape for k, v in t.items()}
  assert shapes(state.nu_row) == {"kernel": (6, 1), "bias": (1,), "conv1x1": (1, 1, 3, 1),
                                  "conv3x3": (1, 1, 1, 1), "cube": (1, 1, 1)}
  assert shapes(state.nu_col) == {"kernel": (1, 5), "bias": (1,), "conv1x1": (1, 1, 1, 4),
                                  "conv3x3": (1, 1, 1, 1), "cube": (1, 1, 1)}
  assert shapes(state.nu) == {**SHAPES, "kernel": (1, 1), "conv1x1": (1, 1, 1, 1)}
  assert shapes(state.mu) == SHAPES and state.res_row["kernel"].shape == (6, 1)
  assert state.count.dtype == jnp.int32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state[1:]))


def test_factored_equals_unfactored_second_moment_for_rank_one_squares():
  # If g² is rank one (and eps1 negligible), r c / mean(r) is exact: the normalised update u, and
  # so the first moment after one step, is the same on both paths.
  a, b = np.linspace(0.5, 2, 4), np.linspace(-1, 1.5, 5)
  g = {"x": np.outer(a, b)[None].astype(np.float32)}
  p = {"x": np.zeros((1, 4, 5), np.float32)}
  _, fac = _run(came.came(0.1, stacked_axes=1), p, [g])  # (4, 5) slice: factored
  _, full = _run(came.came(0.1, stacked_axes=0), p, [g])  # 3-D tensor: unfactored
  assert fac.nu["x"].shape == (1, 1, 1) and full.nu_row["x"].shape == (1, 1, 1)
  np.testing.assert_allclose(fac.mu["x"], full.mu["x"], rtol=1e-5)
  # ... but only the factored path has the confidence term, so the steps differ.
  _, fac2 = _run(came.came(0.1, stacked_axes=1), p, [g, g])
  assert np.all(np.asarray(fac2.res_row["x"]) > 0) and np.all(np.asarray(full.res_row["x"]) == 0)


def test_factored_override_matches_the_torch_shape():
  # T2I's text position table is (1, n, d) in torch (unfactored), (n, d) here: factored=False.
  rng = np.random.default_rng(5)
  p = rng.standard_normal((4, 6)).astype(np.float32)
  grads = [rng.standard_normal((4, 6)).astype(np.float32) * s for s in (1.0, 0.01, 0.4)]
  no_fac = lambda path, x: False if path[-1] == "pos" else None
  a, sa = _run(came.came(0.05, factored=no_fac), {"pos": p, "w": p}, [{"pos": g, "w": g} for g in grads])
  b, _ = _run(came.came(0.05), {"pos": p[None]}, [{"pos": g[None]} for g in grads])
  np.testing.assert_allclose(a["pos"], b["pos"][0], rtol=1e-6, atol=1e-7)
  assert sa.nu["pos"].shape == (4, 6) and sa.nu_row["w"].shape == (4, 1)  # the rule elsewhere


def test_stacked_params_equal_per_slice():
  rng = np.random.default_rng(1)
  p = {"w": rng.standard_normal((3, 6, 5)).astype(np.float32),
       "b": rng.standard_normal((3, 5)).astype(np.float32)}
  grads = [{k: (s * rng.standard_normal(v.shape)).astype(np.float32) for k, v in p.items()}
           for s in (1.0, 0.01, 0.3)]
  stacked, _ = _run(came.came(0.05, weight_decay=0.1, stacked_axes={"w": 1, "b": 1}), p, grads)
  for i in range(3):
    one = lambda t: {k: v[i] for k, v in t.items()}
    alone, _ = _run(came.came(0.05, weight_decay=0.1), one(p), [one(g) for g in grads])
    for k in p:
      np.testing.assert_allclose(stacked[k][i], alone[k], rtol=1e-6, atol=1e-7)


def test_transposed_layout_gives_transposed_update():
  # Row and column statistics swap under a transpose; r c / mean(r) = r c / mean(c) is symmetric.
  rng = np.random.default_rng(2)
  w = rng.standard_normal((6, 5)).astype(np.float32)
  grads = [rng.standard_normal((6, 5)).astype(np.float32) * s for s in (1.0, 0.01, 0.5)]
  a, _ = _run(came.came(0.05), {"w": w}, [{"w": g} for g in grads])
  b, _ = _run(came.came(0.05), {"w": w.T}, [{"w": g.T} for g in grads])
  np.testing.assert_allclose(a["w"], b["w"].T, rtol=1e-5, atol=1e-6)


def test_schedule_scales_the_update_and_weight_decay_needs_params():
  rng = np.random.default_rng(3)
  p = {k: v for k, v in _tree(rng).items() if k in ("kernel", "bias")}
  sched = lambda count: 0.1 * (count + 1)
  tx_s, tx_1 = came.came(sched), came.came(1.0)
  s_s, s_1 = tx_s.init(p), tx_1.init(p)
  up_s, up_1 = jax.jit(tx_s.update), jax.jit(tx_1.update)
  for t in range(3):
    g = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in p.items()}
    u_s, s_s = up_s(g, s_s)  # no weight decay: the params are not needed
    u_1, s_1 = up_1(g, s_1)
    for k in p:
      np.testing.assert_allclose(u_s[k], sched(t) * np.asarray(u_1[k]), rtol=1e-5, atol=1e-8)
  with pytest.raises(ValueError, match="needs the params"):
    came.came(0.1, weight_decay=0.1).update(g, s_1)


def test_fits_a_small_regression():
  rng = np.random.default_rng(4)
  x = rng.standard_normal((64, 8)).astype(np.float32)
  w_true, b_true = rng.standard_normal((8, 3)), rng.standard_normal(3)
  y = (x @ w_true + b_true).astype(np.float32)
  loss = lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)
  tx = came.came(optax.linear_schedule(0.03, 0.003, 400))
  params = {"w": jnp.zeros((8, 3)), "b": jnp.zeros(3)}

  @jax.jit
  def train(params):
    def body(carry, _):
      p, s = carry
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return (optax.apply_updates(p, u), s), None
    (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=400)
    return params

  start = float(loss(params))
  assert float(loss(train(params))) < 1e-3 * start


def _came_cfg(**kw):
  t = config_lib.train_defaults()
  t.update({**dict(optimizer="came", lr=1e-3, warmup_steps=10), **kw})
  return t


def test_make_came_runs_in_jit_with_layer_axes_of_the_model():
  model = abstract(tiny())
  axes = came.layer_axes(model)
  assert axes["patch_blocks"]["mlp"]["w1"]["kernel"] == 1 and axes["patch_blocks"]["norm1"]["scale"] == 1
  assert axes["patch_embed"]["proj"]["kernel"] == 0 and axes["y_embedder"]["embedding"]["embedding"] == 0
  shapes = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  # A few of the model's params (compiling the update for all of them takes seconds on CPU).
  keep = lambda t: {"patch_blocks": {"mlp": {"w1": t["patch_blocks"]["mlp"]["w1"]},
                                     "norm1": t["patch_blocks"]["norm1"]},
                    "patch_embed": t["patch_embed"]}
  params = jax.tree.map(lambda s: jnp.full(s.shape, 0.1, s.dtype), keep(shapes))
  tx = optimizer.make(_came_cfg(), stacked_axes=keep(axes))
  state = jax.jit(tx.init)(params)
  came_state = state[1]
  # Stacked (L, in, out) kernels are factored per layer, stacked (L, d) norm scales are not.
  w1 = shapes["patch_blocks"]["mlp"]["w1"]["kernel"].shape
  assert came_state.nu_row["patch_blocks"]["mlp"]["w1"]["kernel"].shape == w1[:-1] + (1,)
  scale = shapes["patch_blocks"]["norm1"]["scale"].shape
  assert came_state.nu["patch_blocks"]["norm1"]["scale"].shape == scale
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  # Step 0 of a 10-step warmup: lr 1e-4. A ones gradient gives u = 1, m = 1 - b1 = 0.1; the
  # factored tensors divide m by sqrt(S) = sqrt((1 - b3) (u - m)²) (no bias correction): 11x.
  m, s = 0.1, np.sqrt((1 - B3) * 0.9 ** 2)
  expect = {"patch_blocks": {"mlp": {"w1": {"kernel": m / s}}, "norm1": {"scale": m}},
            "patch_embed": {"proj": {"kernel": m / s, "bias": m}}}
  jax.tree.map(lambda u, e: np.testing.assert_allclose(u, -1e-4 * e, rtol=1e-4), updates, expect)


def test_make_errors():
  with pytest.raises(ValueError, match="stacked_axes"):
    optimizer.make(_came_cfg())
  with pytest.raises(ValueError, match="'adamw', 'came'"):
    optimizer.make(_came_cfg(optimizer="sgd"), stacked_axes=0)
  with pytest.raises(ValueError, match="outside"):
    came.came(0.1, stacked_axes=3).init({"w": jnp.zeros((2, 2))})
  with pytest.raises(ValueError, match="cannot factor"):
    came.came(0.1, factored=True).init({"b": jnp.zeros(3)})
  with pytest.raises(ValueError, match="no entry"):
    came.came(0.1, stacked_axes={"v": 0}).init({"w": jnp.zeros((2, 2))})


def test_sharded_state_via_tree_map_params_on_4_devices():
  code = textwrap.dedent("""
      import json
      import jax, numpy as np, optax
      from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
      from pixeldit_jax.train import came
      mesh = jax.make_mesh((2, 2), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
      specs = {"qkv": P(None, "fsdp", "tensor"), "bias": P(None, "tensor"), "embed": P("fsdp", None)}
      shapes = {"qkv": (2, 8, 6), "bias": (2, 6), "embed": (4, 6)}
      p_sh = {k: NamedSharding(mesh, s) for k, s in specs.items()}
      tx = came.came(0.01, weight_decay=0.1, stacked_axes={"qkv": 1, "bias": 1, "embed": 0})
      rng = np.random.default_rng(0)
      params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
      grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
      opt_sh = optax.tree_map_params(tx, came.state_sharding, jax.eval_shape(tx.init, params), p_sh,
                                     transform_non_params=lambda _: NamedSharding(mesh, P()))
      def run(update, state):
        for _ in range(2):
          upd, state = update(grads, state, params)
        return upd, state
      with jax.set_mesh(mesh):
        state = jax.jit(tx.init, out_shardings=opt_sh)(params)
        upd, state = run(jax.jit(tx.update, in_shardings=(p_sh, opt_sh, p_sh),
                                 out_shardings=(p_sh, opt_sh)), state)
      ref, _ = run(jax.jit(tx.update), tx.init(params))
      err = max(float(np.max(np.abs(np.asarray(upd[k]) - np.asarray(ref[k])))) for k in shapes)
      spec = lambda x: [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
      print(json.dumps({"err": err, "row": spec(state.nu_row["qkv"]), "col": spec(state.nu_col["qkv"]),
                        "mu": spec(state.mu["qkv"]), "nu_bias": spec(state.nu["bias"]),
                        "row_bias": spec(state.nu_row["bias"])}))
  """)
  flags = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
  env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=timeout(300))
  assert out.returncode == 0, out.stderr[-4000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got["err"] < 1e-6
  # The factored statistics keep the param's sharding on their remaining axis.
  assert got["mu"] == [None, "fsdp", "tensor"]
  assert got["row"] == [None, "fsdp", None] and got["col"] == [None, None, "tensor"]
  assert got["nu_bias"] == [None, "tensor"] and got["row_bias"] == [None, None]
