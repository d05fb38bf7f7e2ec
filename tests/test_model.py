"""The class-conditional PixelDiT: shapes, zero-init identities, ablation switches, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import forward, inputs, max_abs, perturb, tiny
from pixeldit_jax.model import PixelDiTConfig, build
from pixeldit_jax.model import layers
from pixeldit_jax.model.cost import count_params, param_breakdown
from pixeldit_jax.model.patch_level import PatchBlock, patchify
from pixeldit_jax.model.pixel_level import PiTBlock, group_pixels, ungroup_pixels


@pytest.mark.parametrize("height,width", [(4, 4), (16, 24), (28, 8), (12, 20)])
def test_output_shape_any_size_divisible_by_patch(height, width):
  cfg = tiny()
  model = perturb(build(cfg))
  x, t, y = inputs(cfg, 3, height, width)
  out = forward(model, x, t, y)
  assert out.shape == (3, height, width, 3) and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))


def test_rejects_size_not_divisible_by_patch():
  cfg = tiny()
  model = build(cfg)
  x, t, y = inputs(cfg, 1, 16, 18)
  with pytest.raises(ValueError, match="divisible by the patch size 4"):
    model(x, t, y)


def test_fresh_model_outputs_exactly_zero_velocity():
  for cfg in (tiny(), tiny(pixel_adaln="patchwise"), tiny(pixel_depth=0)):
    out = forward(build(cfg), *inputs(cfg))
    assert float(jnp.max(jnp.abs(out))) == 0.0


def test_fresh_patch_and_pit_blocks_are_identities():
  cfg = tiny()
  block = PatchBlock(cfg, rngs=nnx.Rngs(0))
  s = jax.random.normal(jax.random.key(0), (2, 6, cfg.hidden_size))
  c = jax.random.normal(jax.random.key(1), (2, 1, cfg.hidden_size))
  rope = tuple(map(jnp.asarray, layers.rope_2d_table(cfg.head_dim, 2, 3)))
  np.testing.assert_array_equal(nnx.jit(lambda b, *a: b(*a))(block, s, c, rope), s)
  pit = PiTBlock(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (2, 6, 16, cfg.pixel_hidden_size))
  s_cond = jax.random.normal(jax.random.key(3), (2, 6, cfg.hidden_size))
  pit_rope = tuple(map(jnp.asarray, PiTBlock.rope_tables(cfg, 8, 12)))
  call = nnx.jit(lambda b, *a: b(*a))
  np.testing.assert_array_equal(call(pit, x, s_cond, pit_rope), x)
  # The post-modulation block has no gates: it is not the identity at zero init (spec §2).
  post = PiTBlock(tiny(pit_post_modulation=True), rngs=nnx.Rngs(0))
  assert max_abs(call(post, x, s_cond, pit_rope), x) > 1e-3


def _pit_reference(block: PiTBlock, cfg: PixelDiTConfig, x, s_cond, rope):
  """PiT forward written straight from spec §2-3 in numpy, from the block's own parameters."""
  P = {k: np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(
      nnx.to_pure_dict(nnx.state(block, nnx.Param)))[0] and
       {"/".join(str(getattr(q, "key", q)) for q in path): leaf for path, leaf in
        jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(block, nnx.Param)))[0]}.items()}
  x, s_cond = np.asarray(x, np.float64), np.asarray(s_cond, np.float64)
  b, l, p2, d = x.shape
  heads, a = cfg.pixel_heads, cfg.attn_size
  hd = a // heads

  def lin(v, name):
    return v @ P[f"{name}/kernel"] + P.get(f"{name}/bias", 0)

  def rms(v, w):
    return v / np.sqrt(np.mean(v ** 2, -1, keepdims=True) + 1e-6) * w

  theta = lin(s_cond, "adaln/proj").reshape(b, l, p2, 6, d)  # [pixel][param][channel]
  shift1, scale1, gate1, shift2, scale2, gate2 = (theta[:, :, :, k] for k in range(6))
  xn = rms(x, P["norm1/scale"]) * (1 + scale1) + shift1
  tok = lin(xn.reshape(b, l, p2 * d), "compress")  # [pixel][channel] flatten
  qkv = (tok @ P["attn/qkv/kernel"]).reshape(b, l, 3, heads, hd)
  cos, sin = (np.asarray(r, np.float64)[None, :, None, :] for r in rope)

  def rot(v):
    z = (v[..., 0::2] + 1j * v[..., 1::2]) * (cos + 1j * sin)
    return np.stack([z.real, z.imag], -1).reshape(v.shape)

  q = rot(rms(qkv[:, :, 0], P["attn/q_norm/scale"]))
  k = rot(rms(qkv[:, :, 1], P["attn/k_norm/scale"]))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  att = np.einsum("bhqk,bkhd->bqhd", w, qkv[:, :, 2]).reshape(b, l, a)
  x = x + gate1 * lin(lin(att, "attn/proj"), "expand").reshape(b, l, p2, d)
  h = lin(rms(x, P["norm2/scale"]) * (1 + scale2) + shift2, "mlp/fc1")
  from scipy.special import erf  # noqa: PLC0415
  h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
  return x + gate2 * lin(h, "mlp/fc2")


def test_pit_block_matches_spec_equations():
  pytest.importorskip("scipy")
  cfg = tiny()
  block = perturb(PiTBlock(cfg, rngs=nnx.Rngs(0)), scale=0.2)
  x = jax.random.normal(jax.random.key(2), (2, 6, 16, cfg.pixel_hidden_size))
  s_cond = jax.random.normal(jax.random.key(3), (2, 6, cfg.hidden_size))
  rope = PiTBlock.rope_tables(cfg, 8, 12)
  out = nnx.jit(lambda b, *a: b(*a))(block, x, s_cond, tuple(map(jnp.asarray, rope)))
  np.testing.assert_allclose(np.asarray(out), _pit_reference(block, cfg, x, s_cond, rope), rtol=1e-4, atol=1e-4)


def test_pixelwise_and_patchwise_adaln_differ_only_in_the_modulation_projection():
  cfg_pix, cfg_patch = tiny(), tiny(pixel_adaln="patchwise")
  pix, patch = build(cfg_pix), build(cfg_patch)
  shapes = lambda m: {"/".join(map(str, k)): v.shape for k, v in
                      nnx.to_flat_state(nnx.state(m, nnx.Param))}
  a, b = shapes(pix), shapes(patch)
  assert a.keys() == b.keys()
  differ = sorted(k for k in a if a[k] != b[k])
  assert differ == ["pixel_blocks/adaln/proj/bias", "pixel_blocks/adaln/proj/kernel"]
  p2, n = cfg_pix.patch_size ** 2, 6 * cfg_pix.pixel_hidden_size
  assert a["pixel_blocks/adaln/proj/kernel"][-1] == p2 * n and b["pixel_blocks/adaln/proj/kernel"][-1] == n
  # Pixel-wise AdaLN whose projection repeats the patch-wise one for every pixel is patch-wise.
  perturb(patch)
  same = nnx.to_pure_dict(nnx.state(patch, nnx.Param))
  proj = same["pixel_blocks"]["adaln"]["proj"]
  proj_rep = {"kernel": jnp.tile(proj["kernel"], (1, 1, p2)), "bias": jnp.tile(proj["bias"], (1, p2))}
  state = nnx.state(pix, nnx.Param)
  nnx.replace_by_pure_dict(state, {**same, "pixel_blocks": {**same["pixel_blocks"], "adaln": {"proj": proj_rep}}})
  nnx.update(pix, state)
  args = inputs(cfg_pix)
  np.testing.assert_allclose(forward(pix, *args), forward(patch, *args), atol=1e-6)
  # ... and a pixel-wise projection that varies across pixels gives a different output.
  perturb(pix, seed=5)
  assert max_abs(forward(pix, *args), forward(patch, *args)) > 1e-3


def test_pixel_compaction_on_off_shapes_and_parameter_difference():
  on, off = tiny(), tiny(pixel_compaction=False)
  m_on, m_off = perturb(build(on)), perturb(build(off))
  args = inputs(on, 2, 8, 12)
  assert forward(m_on, *args).shape == forward(m_off, *args).shape == (2, 8, 12, 3)
  p2d, a, d = on.patch_size ** 2 * on.pixel_hidden_size, on.attn_size, on.pixel_hidden_size
  per_block = (p2d * a + a + a * p2d + p2d) - (d * a + a + a * d + d)
  assert count_params(m_on) - count_params(m_off) == on.pixel_depth * per_block


def test_no_compaction_attends_over_all_pixels_with_pixel_grid_rope():
  # Permuting pixels inside a patch moves their RoPE positions, so without compaction the output
  # at a pixel depends on where the other pixels are; with compaction, positions are per patch.
  cfg = tiny(pixel_compaction=False, pixel_depth=1)
  cos, _ = PiTBlock.rope_tables(cfg, 8, 8)
  assert cos.shape == (64, cfg.attn_size // cfg.pixel_heads // 2)
  raster = layers.rope_2d_table(cfg.attn_size // cfg.pixel_heads, 8, 8)[0]
  order = np.asarray(group_pixels(np.arange(64).reshape(1, 8, 8, 1), 4)).reshape(-1)
  np.testing.assert_array_equal(cos, raster[order])


def test_patch_only_model_depth_zero():
  cfg = tiny(pixel_depth=0)
  model = perturb(build(cfg))
  names = param_breakdown(model)
  assert "pixel_blocks" not in names and "pixel_embed" not in names
  assert forward(model, *inputs(cfg, 2, 8, 20)).shape == (2, 8, 20, 3)


def test_patchify_is_channel_major_and_grouping_round_trips():
  x = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
  patches = patchify(x, 4)
  assert patches.shape == (2, 6, 48)
  # Patch 4 = row 1, column 1 of the patch grid; vector index = c*16 + ky*4 + kx.
  np.testing.assert_array_equal(patches[1, 4, 2 * 16 + 3 * 4 + 1], x[1, 4 + 3, 4 + 1, 2])
  grouped = group_pixels(x, 4)
  np.testing.assert_array_equal(grouped[1, 4, 3 * 4 + 1], x[1, 7, 5])
  np.testing.assert_array_equal(ungroup_pixels(grouped, 8, 12), x)


def test_null_class_row_and_class_dependence():
  cfg = tiny()
  model = perturb(build(cfg))
  assert model.y_embedder.embedding.embedding.shape == (cfg.num_classes + 1, cfg.hidden_size)
  x, t, _ = inputs(cfg)
  out_null = forward(model, x, t, jnp.full((2,), cfg.num_classes))
  out_cls = forward(model, x, t, jnp.zeros((2,), jnp.int32))
  assert max_abs(out_null, out_cls) > 1e-4


def test_jit_forward_and_grad_then_one_update_moves_the_output():
  cfg = tiny()
  model = build(cfg)
  graphdef, params = nnx.split(model, nnx.Param)
  x, t, y = inputs(cfg)
  target = jnp.ones_like(x)

  @jax.jit
  def step(params):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((nnx.merge(graphdef, p)(x, t, y) - target) ** 2))(params)
    updates, _ = optax.sgd(0.5).update(grads, optax.sgd(0.5).init(params), params)
    return loss, grads, optax.apply_updates(params, updates)

  loss, grads, new_params = step(params)
  assert float(loss) == pytest.approx(1.0)
  flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(grads)}
  # At zero init only the output head (and nothing behind it) receives gradient.
  assert float(jnp.abs(flat["out_head/linear/bias"]).max()) > 0
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in flat.values())
  loss2, _, _ = step(new_params)
  assert float(loss2) < float(loss)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policies_keep_outputs_and_gradients(policy):
  base, cfg = tiny(), tiny(remat_policy=policy)
  m1, m2 = perturb(build(base)), perturb(build(cfg))
  x, t, y = inputs(base)

  def grads(m):
    g, p = nnx.split(m, nnx.Param)
    return jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(g, p)(x, t, y) ** 2)))(p)

  for a, b in zip(jax.tree.leaves(grads(m1)), jax.tree.leaves(grads(m2))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_keeps_fp32_params_and_tracks_fp32_output():
  f32, bf16 = perturb(build(tiny())), perturb(build(tiny(dtype="bfloat16")))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  args = inputs(tiny())
  ref, out = forward(f32, *args), forward(bf16, *args)
  assert out.dtype == jnp.float32
  assert max_abs(ref, out) < 0.05 * float(jnp.max(jnp.abs(ref)))
  assert max_abs(ref, out) > 0  # bf16 arithmetic really happened


def test_every_parameter_has_logical_axis_names():
  vocabulary = {"layers", "embed", "mlp", "heads", "kv", "norm", "cond", "classes", "freq",
                "patch_in", "patch_out", "channels", "pixel", "pixel_mlp", "pixel_cond", "pixel_patch"}
  for cfg in (tiny(), tiny(pixel_depth=0), tiny(pixel_compaction=False)):
    state = nnx.state(build(cfg), nnx.Param)
    for path, var in nnx.to_flat_state(state):
      names = var.get_metadata().get("out_sharding")
      assert names is not None and len(names) == var.ndim, (path, names)
      assert set(names) <= vocabulary, (path, names)
      assert (names[0] == "layers") == (path[0] in ("patch_blocks", "pixel_blocks")), (path, names)


def test_blocks_are_scanned_not_unrolled():
  # Depth must not multiply the traced program: one block body appears in the jaxpr per level.
  cfg_small, cfg_deep = tiny(patch_depth=2), tiny(patch_depth=8)
  def n_eqns(cfg):
    g, p = nnx.split(build(cfg), nnx.Param)
    return len(jax.make_jaxpr(lambda p, *a: nnx.merge(g, p)(*a))(p, *inputs(cfg)).eqns)
  assert n_eqns(cfg_small) == n_eqns(cfg_deep)


def test_config_validation_messages():
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    PixelDiTConfig(hidden_size=30, num_heads=4)
  with pytest.raises(ValueError, match="pixel_adaln"):
    PixelDiTConfig(pixel_adaln="global")
  with pytest.raises(ValueError, match="Unknown PixelDiT model config fields"):
    PixelDiTConfig.from_dict({"hidden": 3})
  with pytest.raises(ValueError, match="head_dim % 4"):
    PixelDiTConfig(hidden_size=36, num_heads=6)


def test_unrolled_blocks_equal_scanned_blocks():
  scanned, unrolled = perturb(build(tiny())), perturb(build(tiny(scan_layers=False)))
  args = inputs(tiny())
  np.testing.assert_allclose(forward(scanned, *args), forward(unrolled, *args), rtol=1e-5, atol=1e-6)
