"""DINOv2 REPA teacher: torch-compatible bicubic, HF / torch.hub parity, weight loading, inputs.

Parity tests build a tiny random transformers ``Dinov2Model`` (no download) and write its weights
in both the Hugging Face and the torch.hub layouts; torch and transformers are optional.
"""

import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from pixeldit_jax.teacher import (Dinov2, Dinov2Config, TeacherWeightsMismatch, load_teacher,
                                  preprocess, repa_input_size, teacher_features, torch_bicubic_resize)

# 4x4 pretraining grid + cls, like ViT-B/14's 37x37 at a fraction of the cost.
TINY = dict(hidden_size=32, depth=2, num_heads=2, patch_size=14, image_size=56)


def tiny(**overrides) -> Dinov2Config:
  return Dinov2Config(**{**TINY, "dtype": "float32", **overrides})


@nnx.jit
def forward(model, x):
  return model(x)


def run(graphdef, params, x_nhwc):
  out = forward(nnx.merge(graphdef, params), jnp.asarray(x_nhwc))
  return np.asarray(out["x_norm_patchtokens"]), np.asarray(out["x_norm_clstoken"])


def random_hub_state_dict(cfg: Dinov2Config, seed=0) -> dict:
  """Random weights under the torch.hub tensor names, with torch shapes (numpy only)."""
  rng = np.random.default_rng(seed)
  d, p, h = cfg.hidden_size, cfg.patch_size, cfg.mlp_hidden
  shapes = {"cls_token": (1, 1, d), "pos_embed": (1, cfg.pos_grid ** 2 + 1, d), "mask_token": (1, d),
            "patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,),
            "norm.weight": (d,), "norm.bias": (d,)}
  for i in range(cfg.depth):
    b = f"blocks.{i}."
    shapes.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                   b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                   b + "ls1.gamma": (d,), b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                   b + "mlp.fc1.weight": (h, d), b + "mlp.fc1.bias": (h,), b + "mlp.fc2.weight": (d, h),
                   b + "mlp.fc2.bias": (d,), b + "ls2.gamma": (d,)})
  return {k: (0.1 * rng.standard_normal(s) + (1.0 if k.endswith(("gamma", "norm1.weight", "norm2.weight"))
                                               else 0.0)).astype(np.float32) for k, s in shapes.items()}


def hf_to_hub(sd: dict) -> dict:
  """Hugging Face Dinov2Model tensor names -> torch.hub names (q, k, v fused into qkv)."""
  out = {}
  for k, v in sd.items():
    k = (k.replace("embeddings.position_embeddings", "pos_embed")
         .replace("embeddings.patch_embeddings.projection", "patch_embed.proj")
         .replace("embeddings.", "").replace("encoder.layer.", "blocks.")
         .replace("attention.output.dense", "attn.proj").replace("layer_scale1.lambda1", "ls1.gamma")
         .replace("layer_scale2.lambda1", "ls2.gamma").replace("layernorm.", "norm."))
    out[k] = v
  for i in {int(m.group(1)) for k in out if (m := re.match(r"blocks\.(\d+)\.", k))}:
    for leaf in ("weight", "bias"):
      parts = [out.pop(f"blocks.{i}.attention.attention.{n}.{leaf}") for n in ("query", "key", "value")]
      out[f"blocks.{i}.attn.qkv.{leaf}"] = np.concatenate(parts, axis=0)
  return out


# ----------------------------------------------------------------------------- resize

@pytest.mark.parametrize("shape,size,scale,aa", [
    ((9, 7), (13, 5), None, False),  # up and down
    ((37, 37), (16, 16), None, False),  # HF pos table 518 -> 224
    ((37, 37), None, (16.1 / 37, 32.1 / 37), False),  # hub pos table, scale-factor sampling
    ((32, 24), (28, 21), None, False),  # 256 -> 224 images, in small
    ((20, 30), (7, 11), None, True),
    ((5, 6), (11, 13), None, True),
])
def test_bicubic_matches_torch(shape, size, scale, aa):
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).standard_normal((2, *shape, 3)).astype(np.float32)
  kw = dict(size=size) if size else dict(scale_factor=scale)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), mode="bicubic",
                                        align_corners=False, antialias=aa, **kw)
  ref = ref.permute(0, 2, 3, 1).numpy()
  out = np.asarray(torch_bicubic_resize(jnp.asarray(x), size, scale_factor=scale, antialias=aa))
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_bicubic_is_not_jax_cubic():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 9, 9, 1)), jnp.float32)
  ours = torch_bicubic_resize(x, (16, 16))
  assert float(jnp.max(jnp.abs(ours - jax.image.resize(x, (1, 16, 16, 1), "cubic")))) > 1e-2
  np.testing.assert_array_equal(np.asarray(torch_bicubic_resize(x, (9, 9))), np.asarray(x))


# ----------------------------------------------------------------------------- model and inputs

def test_config_presets_and_validation():
  cfg = Dinov2Config.vitb14()
  assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.pos_grid) == (768, 12, 12, 14, 37)
  assert (cfg.dtype, cfg.param_dtype, cfg.pos_interpolation) == ("bfloat16", "float32", "hub")
  hf = Dinov2Config.from_hf_config({"model_type": "dinov2", "hidden_size": 768, "num_hidden_layers": 12,
                                    "num_attention_heads": 12, "image_size": 518, "patch_size": 14,
                                    "mlp_ratio": 4, "layerscale_value": 1.0, "layer_norm_eps": 1e-6})
  assert hf == Dinov2Config.vitb14(pos_interpolation="hf")
  with pytest.raises(ValueError, match="register"):
    Dinov2Config.from_hf_config({"model_type": "dinov2", "num_register_tokens": 4})
  with pytest.raises(ValueError, match="pos_interpolation"):
    tiny(pos_interpolation="bilinear")


def test_shapes_and_logical_axes():
  model = Dinov2(tiny(), rngs=nnx.Rngs(0))
  out = forward(model, jnp.zeros((2, 42, 70, 3)))  # 3x5 grid: the 4x4 table is resampled
  assert out["x_norm_patchtokens"].shape == (2, 15, 32) and out["x_norm_clstoken"].shape == (2, 32)
  assert out["x_norm_patchtokens"].dtype == jnp.float32
  names = {tuple(k): v.get_metadata()["out_sharding"] for k, v in nnx.to_flat_state(nnx.state(model))}
  assert names[("blocks", "attn", "qkv", "kernel")] == ("layers", "embed", "heads")
  assert names[("blocks", "mlp", "fc1", "kernel")] == ("layers", "embed", "mlp")
  assert names[("patch_embed", "kernel")] == ("patch_in", "embed")
  with pytest.raises(ValueError, match="multiples of 14"):
    model(jnp.zeros((1, 30, 28, 3)))


def test_preprocess_and_input_size():
  assert repa_input_size(256, 256) == (224, 224) and repa_input_size(512, 512) == (448, 448)
  assert repa_input_size(256, 512) == (224, 448)
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  colour = np.array([0.2, 0.5, 0.9], np.float32)
  out = np.asarray(preprocess(np.broadcast_to(colour, (2, 32, 48, 3)), (28, 42)))
  assert out.shape == (2, 28, 42, 3)
  np.testing.assert_allclose(out, np.broadcast_to((colour - mean) / std, out.shape), atol=1e-5)
  x = np.random.default_rng(0).uniform(size=(1, 14, 14, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(preprocess(x, (14, 14))), (x - mean) / std, atol=1e-6)


# ----------------------------------------------------------------------------- loading

def test_missing_weights_message(tmp_path):
  for path in (tmp_path / "nope", tmp_path, None):
    with pytest.raises(FileNotFoundError) as e:
      load_teacher(path)
    msg = str(e.value)
    for needle in ("model.safetensors", "dinov2_vitb14_pretrain.pth", "config.repa.teacher_path",
                   "config.repa.weight=0"):
      assert needle in msg


def test_bad_keys_are_named(tmp_path):
  cfg = tiny()
  sd = random_hub_state_dict(cfg)
  sd["blocks.0.attn.qkv.weights"] = sd.pop("blocks.0.attn.qkv.weight")
  sd["blocks.1.mlp.fc1.bias"] = sd["blocks.1.mlp.fc1.bias"][:10]
  del sd["norm.bias"]
  save_file(sd, str(tmp_path / "bad.safetensors"))
  with pytest.raises(TeacherWeightsMismatch) as e:
    load_teacher(tmp_path / "bad.safetensors", cfg)
  msg = str(e.value)
  for needle in ("missing", "blocks.0.attn.qkv.weight'", "norm.bias", "unknown",
                 "blocks.0.attn.qkv.weights", "misshapen", "blocks.1.mlp.fc1.bias: file (10,)"):
    assert needle in msg
  save_file(random_hub_state_dict(cfg), str(tmp_path / "ok.safetensors"))
  with pytest.raises(TeacherWeightsMismatch, match="depth 12"):  # a tiny file is not ViT-B
    load_teacher(tmp_path / "ok.safetensors", Dinov2Config.vitb14())
  # Without a config, hub-named weights describe their own size.
  _, params = load_teacher(tmp_path / "ok.safetensors")
  assert params["cls_token"].value.shape == (cfg.hidden_size,)
  assert params["blocks"]["attn"]["qkv"]["kernel"].value.shape[0] == cfg.depth


def test_pth_without_torch_says_so(tmp_path, monkeypatch):
  (tmp_path / "dinov2_vitb14_pretrain.pth").write_bytes(b"")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match="needs PyTorch.*safetensors"):
    load_teacher(tmp_path)


def test_teacher_features_jit_bf16_and_no_gradient(tmp_path):
  cfg = tiny()
  save_file(random_hub_state_dict(cfg), str(tmp_path / "hub.safetensors"))
  graphdef, params = load_teacher(tmp_path / "hub.safetensors", cfg)  # bf16 compute by default
  assert nnx.merge(graphdef, params).cfg.dtype == "bfloat16"
  images = jax.random.uniform(jax.random.key(0), (2, 48, 80, 3))
  size = repa_input_size(48, 80)  # (42, 70): a 3x5 grid
  feats_fn = jax.jit(teacher_features, static_argnums=(0, 3))
  feats = feats_fn(graphdef, params, images, size)
  assert feats.shape == (2, 15, 32) and feats.dtype == jnp.float32
  g32, p32 = load_teacher(tmp_path / "hub.safetensors", cfg, dtype="float32")
  ref, _ = run(g32, p32, preprocess(images, size))
  assert np.max(np.abs(np.asarray(feats) - ref)) < 0.1  # bf16 rounding only
  grad = jax.grad(lambda im: feats_fn(graphdef, params, im, size).sum())(images)
  assert not np.any(np.asarray(grad))


# ----------------------------------------------------------------------------- reference parity

@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
  """A seeded random transformers Dinov2Model (all parameters perturbed) saved in both layouts."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf_cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=56, patch_size=14, mlp_ratio=4)
  model = transformers.Dinov2Model(hf_cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  root = tmp_path_factory.mktemp("dinov2")
  model.save_pretrained(root / "hf")  # config.json + model.safetensors, legacy HF tensor names
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  save_file(sd, str(root / "hf5.safetensors"))  # transformers-5 in-memory names (q_proj, o_proj)
  sd = {k.replace("attention.q_proj", "attention.attention.query")  # in-memory transformers-5 names
        .replace("attention.k_proj", "attention.attention.key")
        .replace("attention.v_proj", "attention.attention.value")
        .replace("attention.o_proj", "attention.output.dense"): v for k, v in sd.items()}
  (root / "hub").mkdir()
  torch.save({k: torch.from_numpy(v) for k, v in hf_to_hub(sd).items()},
             root / "hub" / "dinov2_vitb14_pretrain.pth")
  return types.SimpleNamespace(torch=torch, model=model, root=root)


def hf_outputs(ref, x_nhwc):
  with ref.torch.no_grad():
    out = ref.model(pixel_values=ref.torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))
  hidden = out.last_hidden_state.numpy()
  return hidden[:, 1:], hidden[:, 0]


def hub_interpolate_pos_encoding(self, embeddings, height, width):
  """torch.hub dinov2 (register-free) resampling: scale_factor (grid + 0.1) / M, no antialias."""
  import torch
  pos = self.position_embeddings
  n_pos = pos.shape[1] - 1
  if embeddings.shape[1] - 1 == n_pos and height == width:
    return pos
  m = int(n_pos ** 0.5)
  gh, gw = height // 14, width // 14
  grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2).float()
  grid = torch.nn.functional.interpolate(grid, scale_factor=((gh + 0.1) / m, (gw + 0.1) / m),
                                         mode="bicubic", antialias=False)
  return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)


INPUTS = {"pretrain": (2, 56, 56, 3), "resampled": (2, 42, 70, 3)}


@pytest.mark.parametrize("which", sorted(INPUTS))
def test_matches_transformers(hf_reference, which):
  graphdef, params = load_teacher(hf_reference.root / "hf", dtype="float32")  # dir + config.json
  assert nnx.merge(graphdef, params).cfg == tiny(pos_interpolation="hf")
  x = np.random.default_rng(1).standard_normal(INPUTS[which]).astype(np.float32)
  patches, cls = run(graphdef, params, x)
  ref_patches, ref_cls = hf_outputs(hf_reference, x)
  np.testing.assert_allclose(patches, ref_patches, atol=1e-5, rtol=0)
  np.testing.assert_allclose(cls, ref_cls, atol=1e-5, rtol=0)


def test_hub_pth_matches_hub_resampling(hf_reference, monkeypatch):
  graphdef, params = load_teacher(hf_reference.root / "hub", tiny(), dtype="float32")
  assert nnx.merge(graphdef, params).cfg.pos_interpolation == "hub"
  g_hf, p_hf = load_teacher(hf_reference.root / "hf" / "model.safetensors", tiny(),
                            dtype="float32", pos_interpolation="hub")
  _, p_hf5 = load_teacher(hf_reference.root / "hf5.safetensors", tiny(), dtype="float32")
  for other in (p_hf, p_hf5):
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(params), nnx.to_pure_dict(other))
  x = np.random.default_rng(2).standard_normal(INPUTS["resampled"]).astype(np.float32)
  monkeypatch.setattr(hf_reference.model.embeddings, "interpolate_pos_encoding",
                      types.MethodType(hub_interpolate_pos_encoding, hf_reference.model.embeddings))
  ref_patches, _ = hf_outputs(hf_reference, x)
  patches, _ = run(graphdef, params, x)
  np.testing.assert_allclose(patches, ref_patches, atol=1e-5, rtol=0)
  hf_patches, _ = run(*load_teacher(hf_reference.root / "hf", dtype="float32"), x)
  assert np.max(np.abs(hf_patches - patches)) > 1e-3  # the two resamplings really differ
