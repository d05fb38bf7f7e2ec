"""The text-to-image PixelDiT (spec §7.1): size, FLOPs, init, shapes, and the forward pass against
a numpy reference written from the spec equations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from pixeldit_jax.model import PixelDiT, PixelDiTConfig, PixelDiTT2I, abstract, build, preset
from pixeldit_jax.model.cost import count_params, forward_flops, param_breakdown

TINY = dict(patch_size=4, hidden_size=32, num_heads=2, patch_depth=2, pixel_depth=2, pixel_hidden_size=8,
            pixel_attn_size=16, pixel_num_heads=2, text_dim=12, text_length=5)


def tiny(**overrides) -> PixelDiTConfig:
  return PixelDiTConfig(**{**TINY, **overrides})


def random_params(cfg, seed=0):
  """Random values for every parameter, zero-initialised ones included (no initialiser runs)."""
  rng = np.random.default_rng(seed)

  def draw(path, s):
    if path[-1] == "kernel":
      return rng.uniform(-1, 1, s.shape) / np.sqrt(s.shape[-2])
    if path[-1] == "scale":
      return 1 + 0.1 * rng.standard_normal(s.shape)
    return (1.0 if path == ("text_pos",) else 0.1) * rng.standard_normal(s.shape)

  flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(abstract(cfg), nnx.Param)))
  return traverse_util.unflatten_dict({k: draw(k, s).astype(np.float32) for k, s in flat.items()})


def random_model(cfg, seed=0):
  model = nnx.merge(*nnx.split(abstract(cfg)))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, random_params(cfg, seed))
  nnx.update(model, state)
  return model


@nnx.jit
def forward(model, x, t, text):
  return model(x, t, text)


@nnx.jit(static_argnames="k")
def forward_capture(model, x, t, text, k):
  return model(x, t, text, capture_block=k)


def inputs(cfg, batch=2, height=8, width=12, n_txt=None, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, (batch, height, width, 3)).astype(np.float32)
  t = np.array([137.5, 912.0, 500.0][:batch], np.float32)  # sigma * 1000 (spec §7.4)
  text = rng.standard_normal((batch, n_txt or cfg.text_length, cfg.text_dim)).astype(np.float32)
  return x, t, text


@pytest.fixture(scope="module")
def model():
  return random_model(tiny())


# ----------------------------------------------------------------------------- size and cost

def test_t2i_preset_has_1302_5m_parameters_like_the_official_module():
  m = abstract(preset("T2I"))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(m))  # nothing allocated
  assert isinstance(m, PixelDiTT2I)
  assert count_params(m) / 1e6 == pytest.approx(1302.47, abs=0.1)
  # Per part, as counted on the official PixDiT_T2I (spec §6.1: 1302.5 M + 8.9 M projector = 1311 M).
  parts = {k: round(v / 1e6, 2) for k, v in param_breakdown(m).items()}
  assert parts == {"patch_blocks": 1189.48, "pixel_blocks": 105.06, "text_embed": 3.54, "text_pos": 0.46,
                   "t_embedder": 2.76, "patch_embed": 1.18, "pixel_embed": 0.0, "out_head": 0.0}
  cfg = preset("T2I")
  assert (cfg.swiglu_hidden, cfg.head_dim, cfg.attn_size // cfg.pixel_heads) == (4096, 64, 72)


def test_t2i_forward_gflops():
  # Derived in spec §6.2 / §8 with the official convention, 300 text tokens included.
  cfg = preset("T2I")
  assert round(forward_flops(cfg, 512, 512)["total"] / 1e9) == 1433
  assert round(forward_flops(cfg, 1024, 1024)["total"] / 1e12, 1) == 6.2
  cfg = tiny(patch_depth=1)
  f = forward_flops(cfg, 8, 8, text_tokens=3)
  L, T, d = 4, 3, 32
  lin = lambda n, a, b: 2 * n * a * b
  assert f["text_embed"] == lin(T, 12, d)
  assert f["patch_blocks"] == (2 * lin(1, d, 6 * d) + lin(L + T, d, 3 * d) + lin(L + T, d, d)
                               + 4 * (L + T) ** 2 * d + 3 * lin(L + T, d, cfg.swiglu_hidden))
  assert forward_flops(cfg, 8, 8)["patch_blocks"] > f["patch_blocks"]  # default: text_length tokens
  assert f["total"] == sum(v for k, v in f.items() if k != "total")


# ----------------------------------------------------------------------------- config and init

def test_config_and_model_dispatch():
  cfg = preset("T2I")
  assert cfg.is_text_to_image and (cfg.text_dim, cfg.text_length) == (2304, 300)
  assert not preset("XL").is_text_to_image
  assert PixelDiTConfig.from_dict(cfg.to_dict()) == cfg
  assert isinstance(abstract(tiny()), PixelDiTT2I) and isinstance(abstract(tiny(text_dim=None)), PixelDiT)
  with pytest.raises(ValueError, match="text_dim must be a positive"):
    tiny(text_dim=0)
  with pytest.raises(ValueError, match="text_length must be >= 1"):
    tiny(text_length=0)
  with pytest.raises(ValueError, match="pixel_depth >= 1"):
    tiny(pixel_depth=0)
  with pytest.raises(ValueError, match="needs cfg.text_dim"):
    PixelDiTT2I(tiny(text_dim=None), rngs=nnx.Rngs(0))


def test_initialisation_follows_the_official_t2i_model():
  cfg = tiny()
  m = build(cfg, seed=3)
  x, t, text = inputs(cfg)
  assert float(jnp.abs(forward(m, x, t, text)).max()) == 0.0  # zero final layer only
  P = nnx.to_pure_dict(nnx.state(m, nnx.Param))
  bound = 1 / math.sqrt(cfg.hidden_size)
  # Unlike the ImageNet model, neither the MM-DiT nor the PiT modulation starts at zero.
  for w in (P["patch_blocks"]["img_adaln"]["kernel"], P["patch_blocks"]["txt_adaln"]["bias"],
            P["pixel_blocks"]["adaln"]["proj"]["kernel"], P["pixel_blocks"]["adaln"]["proj"]["bias"]):
    w = np.asarray(w)
    assert 0.8 * bound < np.abs(w).max() <= bound and np.abs(w).mean() > 0.3 * bound
  # Different blocks get different draws.
  k = np.asarray(P["pixel_blocks"]["adaln"]["proj"]["kernel"])
  assert np.abs(k[0] - k[1]).max() > 0
  assert abs(float(np.std(P["text_pos"])) - 1) < 0.25  # N(0, 1); 5 x 32 draws
  assert np.all(np.asarray(P["out_head"]["linear"]["kernel"]) == 0)
  assert np.all(np.asarray(P["patch_embed"]["proj"]["bias"]) == 0)
  assert np.all(np.asarray(P["text_embed"]["norm"]["scale"]) == 1)


def test_every_parameter_has_logical_axis_names():
  vocabulary = {"layers", "embed", "mlp", "heads", "kv", "norm", "cond", "freq", "patch_in", "channels",
                "pixel", "pixel_mlp", "pixel_cond", "pixel_patch", "text_in", "text"}
  for path, var in nnx.to_flat_state(nnx.state(abstract(tiny()), nnx.Param)):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == len(var.shape), (path, names)
    assert set(names) <= vocabulary, (path, names)
    assert (names[0] == "layers") == (path[0] in ("patch_blocks", "pixel_blocks")), (path, names)


# ----------------------------------------------------------------------------- forward

def test_shapes_capture_and_non_square(model):
  cfg = model.cfg
  x, t, text = inputs(cfg)
  out = forward(model, x, t, text)
  assert out.shape == (2, 8, 12, 3) and out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  out1, f1 = forward_capture(model, x, t, text, 1)
  out2, f2 = forward_capture(model, x, t, text, 2)
  assert f1.shape == f2.shape == (2, 6, cfg.hidden_size)
  np.testing.assert_array_equal(out1, out)
  np.testing.assert_array_equal(out2, out)
  assert float(jnp.abs(f1 - f2).max()) > 1e-3
  # Taller than wide, and fewer text tokens than position slots.
  out, f = forward_capture(model, *inputs(cfg, height=12, width=4, n_txt=3, seed=12), 1)
  assert out.shape == (2, 12, 4, 3) and f.shape == (2, 3, cfg.hidden_size)


def test_rejects_bad_inputs(model):
  cfg = model.cfg
  x, t, text = inputs(cfg)
  with pytest.raises(ValueError, match="T <= 5"):
    model(x, t, np.zeros((2, 6, 12), np.float32))  # longer than the position table
  with pytest.raises(ValueError, match="text embeddings"):
    model(x, t, text[..., :8])
  with pytest.raises(ValueError, match="text embeddings"):
    model(x, t, text[:1])
  with pytest.raises(ValueError, match="divisible by the patch size 4"):
    model(x[:, :6], t, text)
  with pytest.raises(ValueError, match="capture block 3 is outside 1..2"):
    model(x, t, text, capture_block=3)


def test_every_text_token_is_attended_no_mask(model):
  # No attention mask (spec §7.1): even the last ("padding") text token changes the output.
  x, t, text = inputs(model.cfg)
  changed = text.copy()
  changed[:, -1] += 1.0
  assert float(jnp.abs(forward(model, x, t, text) - forward(model, x, t, changed)).max()) > 1e-4


def test_unrolled_blocks_equal_scanned_blocks(model):
  unrolled = random_model(tiny(scan_layers=False))
  x, t, text = inputs(model.cfg)
  np.testing.assert_allclose(forward(unrolled, x, t, text), forward(model, x, t, text), rtol=1e-5, atol=1e-6)


def test_text_stream_is_dropped_after_the_last_block():
  # After the last MM-DiT block only the image tokens go on, so that block's text-side output
  # projection and FFN cannot change the velocity; its text keys and values (joint attention) do.
  cfg = tiny()
  x, t, text = inputs(cfg)
  ref = forward(random_model(cfg), x, t, text)

  def changed(*path, block):
    m = random_model(cfg)
    var = m.patch_blocks
    for name in path:
      var = getattr(var, name)
    var.set_value(jnp.asarray(var[...]).at[block].add(1.0))
    return float(jnp.abs(forward(m, x, t, text) - ref).max())

  assert changed("txt_mlp", "w2", "kernel", block=-1) == 0.0
  assert changed("attn", "txt", "proj", "kernel", block=-1) == 0.0
  assert changed("txt_mlp", "w2", "kernel", block=0) > 1e-4
  assert changed("attn", "txt", "qkv", "kernel", block=-1) > 1e-4


# ----------------------------------------------------------------------------- spec reference

def _reference(P, cfg, x, t, text, capture=None):
  """PixelDiT-T2I forward written from spec §1.1, §2-3, §7.1 and §8 in float64 numpy, on our
  parameter tree. Returns (velocity, image tokens after block `capture`)."""
  P = jax.tree.map(lambda a: np.asarray(a, np.float64), P)
  x, t, text = (np.asarray(a, np.float64) for a in (x, t, text))
  b, h, w, c = x.shape
  p, d, hd, n_txt = cfg.patch_size, cfg.hidden_size, cfg.head_dim, text.shape[1]
  hs, ws = h // p, w // p
  silu = lambda v: v / (1 + np.exp(-v))
  lin = lambda v, m: v @ m["kernel"] + m.get("bias", 0)
  rms = lambda v, s: v / np.sqrt(np.mean(v ** 2, -1, keepdims=True) + 1e-6) * s

  def rotate(v, angles):  # adjacent channel pairs (2k, 2k+1) as complex numbers, angles (N, hd/2)
    z = (v[..., 0::2] + 1j * v[..., 1::2]) * np.exp(1j * angles)[:, None, :]
    return np.stack([z.real, z.imag], -1).reshape(v.shape)

  def angles_2d(head_dim, rows, cols):  # normalised positions in [0, 16]; pair 2i: x, pair 2i+1: y
    f = 10000.0 ** (-4 * np.arange(head_dim // 4) / head_dim)
    yy, xx = np.meshgrid(np.linspace(0, 16, rows), np.linspace(0, 16, cols), indexing="ij")
    return np.stack([np.outer(xx.ravel(), f), np.outer(yy.ravel(), f)], -1).reshape(rows * cols, -1)

  def attention(q, k, v):  # (B, N, heads, hd)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    a = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", a / a.sum(-1, keepdims=True), v)

  def qkv(m, v, angles, heads):
    q, k, val = np.moveaxis(lin(v, m["qkv"]).reshape(*v.shape[:2], 3, heads, -1), 2, 0)
    return rotate(rms(q, m["q_norm"]["scale"]), angles), rotate(rms(k, m["k_norm"]["scale"]), angles), val

  # Patch tokens (channel-major vectors), timestep and text embeddings.
  patches = x.reshape(b, hs, p, ws, p, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, hs * ws, c * p * p)
  s = lin(patches, P["patch_embed"]["proj"])
  half = 128
  args = t[:, None] * np.exp(-np.log(10.0) * np.arange(half) / half)
  t_emb = lin(silu(lin(np.concatenate([np.cos(args), np.sin(args)], -1), P["t_embedder"]["mlp_in"])),
              P["t_embedder"]["mlp_out"])[:, None]
  y = rms(lin(text, P["text_embed"]["proj"]), P["text_embed"]["norm"]["scale"]) + P["text_pos"][:n_txt]
  cond = silu(t_emb)
  img_angles = angles_2d(hd, hs, ws)
  txt_angles = np.outer(np.arange(n_txt), 10000.0 ** (-2 * np.arange(hd // 2) / hd))

  features = None
  for i in range(cfg.patch_depth):
    B = jax.tree.map(lambda a: a[i], P["patch_blocks"])
    mx = np.split(lin(cond, B["img_adaln"]), 6, -1)  # shift, scale, gate (attn), shift, scale, gate (FFN)
    my = np.split(lin(cond, B["txt_adaln"]), 6, -1)
    qx, kx, vx = qkv(B["attn"]["img"], rms(s, B["img_norm1"]["scale"]) * (1 + mx[1]) + mx[0], img_angles,
                     cfg.num_heads)
    qy, ky, vy = qkv(B["attn"]["txt"], rms(y, B["txt_norm1"]["scale"]) * (1 + my[1]) + my[0], txt_angles,
                     cfg.num_heads)
    joint = attention(*(np.concatenate(pair, 1) for pair in ((qy, qx), (ky, kx), (vy, vx))))  # [text, image]
    joint = joint.reshape(b, n_txt + hs * ws, d)
    s = s + mx[2] * lin(joint[:, n_txt:], B["attn"]["img"]["proj"])
    y = y + my[2] * lin(joint[:, :n_txt], B["attn"]["txt"]["proj"])

    def ffn(v, m):
      return lin(silu(lin(v, m["w1"])) * lin(v, m["w3"]), m["w2"])

    s = s + mx[5] * ffn(rms(s, B["img_norm2"]["scale"]) * (1 + mx[4]) + mx[3], B["img_mlp"])
    y = y + my[5] * ffn(rms(y, B["txt_norm2"]["scale"]) * (1 + my[4]) + my[3], B["txt_mlp"])
    if capture == i + 1:
      features = s
  s_cond = silu(s + t_emb)

  # Pixel tokens: per-pixel linear + 2D sin-cos of integer coordinates (x half, then y half).
  dpix = cfg.pixel_hidden_size
  omega = 10000.0 ** (-np.arange(dpix // 4) / (dpix / 4))
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  enc = lambda pos: np.concatenate([np.sin(np.outer(pos.ravel(), omega)), np.cos(np.outer(pos.ravel(), omega))], 1)
  pix = lin(x, P["pixel_embed"]["proj"]) + np.concatenate([enc(xx), enc(yy)], 1).reshape(h, w, dpix)
  pix = pix.reshape(b, hs, p, ws, p, dpix).transpose(0, 1, 3, 2, 4, 5).reshape(b, hs * ws, p * p, dpix)
  heads, a = cfg.pixel_heads, cfg.attn_size
  pit_angles = angles_2d(a // heads, hs, ws)
  for i in range(cfg.pixel_depth):
    B = jax.tree.map(lambda v: v[i], P["pixel_blocks"])
    theta = lin(s_cond, B["adaln"]["proj"]).reshape(b, hs * ws, p * p, 6, dpix)  # [pixel][param][chan]
    sh1, sc1, g1, sh2, sc2, g2 = (theta[..., k, :] for k in range(6))
    tok = lin((rms(pix, B["norm1"]["scale"]) * (1 + sc1) + sh1).reshape(b, hs * ws, -1), B["compress"])
    att = attention(*qkv(B["attn"], tok, pit_angles, heads)).reshape(b, hs * ws, a)
    pix = pix + g1 * lin(lin(att, B["attn"]["proj"]), B["expand"]).reshape(pix.shape)
    from scipy.special import erf  # noqa: PLC0415
    hid = lin(rms(pix, B["norm2"]["scale"]) * (1 + sc2) + sh2, B["mlp"]["fc1"])
    pix = pix + g2 * lin(0.5 * hid * (1 + erf(hid / np.sqrt(2))), B["mlp"]["fc2"])
  out = lin(rms(pix, P["out_head"]["norm"]["scale"]), P["out_head"]["linear"])
  out = out.reshape(b, hs, ws, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
  return out, features


@pytest.mark.parametrize("height,width,n_txt", [(8, 12, 5), (12, 4, 3)])
def test_forward_matches_spec_reference(model, height, width, n_txt):
  pytest.importorskip("scipy")
  x, t, text = inputs(model.cfg, height=height, width=width, n_txt=n_txt, seed=height)
  out, feats = forward_capture(model, x, t, text, 1)
  want, want_feats = _reference(nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.cfg, x, t, text, capture=1)
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(np.asarray(out), want, rtol=0, atol=2e-5 * np.abs(want).max())
  np.testing.assert_allclose(np.asarray(feats), want_feats, rtol=0, atol=2e-5 * np.abs(want_feats).max())


def test_pooled_text_condition_option():
  # Off (the released model): no parameter. On: Linear(mean text) is added to t_emb in the MM-DiT
  # condition only, so a zero projection gives the plain model and a non-zero one changes it.
  with pytest.raises(ValueError, match="text_pooled_cond needs the text-to-image model"):
    tiny(text_dim=None, text_pooled_cond=True)
  assert abstract(tiny()).text_pool is None
  cfg = tiny(text_pooled_cond=True)
  x, t, text = inputs(cfg)
  ref = forward(random_model(tiny()), x, t, text)
  m = random_model(cfg)
  assert m.text_pool.kernel.shape == (cfg.text_dim, cfg.hidden_size)
  assert forward_flops(cfg, 8, 12)["total"] - forward_flops(tiny(), 8, 12)["total"] == 2 * 12 * 32
  assert float(jnp.abs(forward(m, x, t, text) - ref).max()) > 1e-4
  params = random_params(tiny())  # the plain model's values, plus a zero projection
  params["text_pool"] = {"kernel": np.zeros((12, 32), np.float32), "bias": np.zeros(32, np.float32)}
  state = nnx.state(m, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(m, state)
  np.testing.assert_allclose(forward(m, x, t, text), ref, atol=1e-6)
