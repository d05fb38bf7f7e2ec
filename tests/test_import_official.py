"""Tests of the official-checkpoint importer (pixeldit_jax/tools/import_official.py).

The official tensors are produced by `export_official` below, a hand-written exporter that spells
out the released PixDiT parameter names and torch (out, in) shapes. It deliberately does not use
the importer's own name tables, so a wrong mapping in the importer cannot agree with itself here.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from flax import nnx, traverse_util

from pixeldit_jax import checkpoint
from pixeldit_jax.model import PixelDiTConfig, abstract
from pixeldit_jax.tools import import_official
from pixeldit_jax.tools.import_official import CheckpointMismatch

# ----------------------------------------------------------------------------- configs

TINY = dict(patch_size=4, hidden_size=64, num_heads=4, patch_depth=2, pixel_depth=2, num_classes=10)

CONFIGS = {
    "tiny": PixelDiTConfig(**TINY),
    # June 2026 variant: 4 modulation parameters per pixel, no gates.
    "post_modulation": PixelDiTConfig(**TINY, pit_post_modulation=True),
    # A != D, pixel heads != patch heads, D_pix != 16, p = 2, depths that differ from each other.
    "narrow_pixel_attn": PixelDiTConfig(patch_size=2, hidden_size=64, num_heads=4, patch_depth=3,
                                        pixel_depth=1, num_classes=7, pixel_hidden_size=8,
                                        pixel_attn_size=32, pixel_num_heads=2),
}


# ----------------------------------------------------------------------------- hand-written exporter

def export_official(params: dict, cfg: PixelDiTConfig) -> dict[str, np.ndarray]:
  """Our pure param dict -> the official PixDiT state dict (names spelled out, torch layouts)."""
  P = jax.tree.map(np.asarray, params)

  def W(kernel):  # flax (in, out) -> torch Linear (out, in)
    assert kernel.ndim == 2
    return np.ascontiguousarray(kernel.T)

  sd = {
      "s_embedder.proj.weight": W(P["patch_embed"]["proj"]["kernel"]),
      "s_embedder.proj.bias": P["patch_embed"]["proj"]["bias"],
      "t_embedder.mlp.0.weight": W(P["t_embedder"]["mlp_in"]["kernel"]),
      "t_embedder.mlp.0.bias": P["t_embedder"]["mlp_in"]["bias"],
      "t_embedder.mlp.2.weight": W(P["t_embedder"]["mlp_out"]["kernel"]),
      "t_embedder.mlp.2.bias": P["t_embedder"]["mlp_out"]["bias"],
      "y_embedder.embedding_table.weight": P["y_embedder"]["embedding"]["embedding"],
      "pixel_embedder.proj.weight": W(P["pixel_embed"]["proj"]["kernel"]),
      "pixel_embedder.proj.bias": P["pixel_embed"]["proj"]["bias"],
      "final_layer.norm.weight": P["out_head"]["norm"]["scale"],
      "final_layer.linear.weight": W(P["out_head"]["linear"]["kernel"]),
      "final_layer.linear.bias": P["out_head"]["linear"]["bias"],
  }
  blocks = P["patch_blocks"]
  assert blocks["norm1"]["scale"].shape[0] == cfg.patch_depth  # leading 'layers' axis
  for i in range(cfg.patch_depth):
    b = jax.tree.map(lambda a: a[i], blocks)
    pre = f"patch_blocks.{i}."
    sd.update({
        pre + "norm1.weight": b["norm1"]["scale"],
        pre + "attn.qkv.weight": W(b["attn"]["qkv"]["kernel"]),
        pre + "attn.q_norm.weight": b["attn"]["q_norm"]["scale"],
        pre + "attn.k_norm.weight": b["attn"]["k_norm"]["scale"],
        pre + "attn.proj.weight": W(b["attn"]["proj"]["kernel"]),
        pre + "attn.proj.bias": b["attn"]["proj"]["bias"],
        pre + "norm2.weight": b["norm2"]["scale"],
        pre + "mlp.w1.weight": W(b["mlp"]["w1"]["kernel"]),
        pre + "mlp.w3.weight": W(b["mlp"]["w3"]["kernel"]),
        pre + "mlp.w2.weight": W(b["mlp"]["w2"]["kernel"]),
        pre + "adaLN_modulation.0.weight": W(b["adaln"]["kernel"]),
        pre + "adaLN_modulation.0.bias": b["adaln"]["bias"],
    })
  blocks = P["pixel_blocks"]
  assert blocks["norm1"]["scale"].shape[0] == cfg.pixel_depth
  for i in range(cfg.pixel_depth):
    b = jax.tree.map(lambda a: a[i], blocks)
    pre = f"pixel_blocks.{i}."
    sd.update({
        pre + "compress_to_attn.weight": W(b["compress"]["kernel"]),
        pre + "compress_to_attn.bias": b["compress"]["bias"],
        pre + "expand_from_attn.weight": W(b["expand"]["kernel"]),
        pre + "expand_from_attn.bias": b["expand"]["bias"],
        pre + "norm1.weight": b["norm1"]["scale"],
        pre + "attn.qkv.weight": W(b["attn"]["qkv"]["kernel"]),
        pre + "attn.q_norm.weight": b["attn"]["q_norm"]["scale"],
        pre + "attn.k_norm.weight": b["attn"]["k_norm"]["scale"],
        pre + "attn.proj.weight": W(b["attn"]["proj"]["kernel"]),
        pre + "attn.proj.bias": b["attn"]["proj"]["bias"],
        pre + "norm2.weight": b["norm2"]["scale"],
        pre + "mlp.fc1.weight": W(b["mlp"]["fc1"]["kernel"]),
        pre + "mlp.fc1.bias": b["mlp"]["fc1"]["bias"],
        pre + "mlp.fc2.weight": W(b["mlp"]["fc2"]["kernel"]),
        pre + "mlp.fc2.bias": b["mlp"]["fc2"]["bias"],
        pre + "adaLN_modulation.0.weight": W(b["adaln"]["proj"]["kernel"]),
        pre + "adaLN_modulation.0.bias": b["adaln"]["proj"]["bias"],
    })
  # Every one of our parameters must have been exported exactly once.
  n_ours = sum(a.shape[0] if path[0] in ("patch_blocks", "pixel_blocks") else 1
               for path, a in traverse_util.flatten_dict(P).items())
  assert len(sd) == n_ours, f"exporter covers {len(sd)} tensors, the model has {n_ours}"
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


def official_shapes(cfg: PixelDiTConfig) -> dict[str, tuple]:
  """The released PixDiT tensor shapes, from the published module definitions."""
  D, p, C, dpix = cfg.hidden_size, cfg.patch_size, cfg.in_channels, cfg.pixel_hidden_size
  A = cfg.pixel_attn_size or D
  heads, pheads = cfg.num_heads, cfg.pixel_num_heads or cfg.num_heads
  F = int(2 * int(4 * D) / 3)
  n = 4 if cfg.pit_post_modulation else 6
  shapes = {
      "s_embedder.proj.weight": (D, C * p * p), "s_embedder.proj.bias": (D,),
      "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
      "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
      "y_embedder.embedding_table.weight": (cfg.num_classes + 1, D),
      "pixel_embedder.proj.weight": (dpix, C), "pixel_embedder.proj.bias": (dpix,),
      "final_layer.norm.weight": (dpix,),
      "final_layer.linear.weight": (C, dpix), "final_layer.linear.bias": (C,),
  }
  for i in range(cfg.patch_depth):
    pre = f"patch_blocks.{i}."
    shapes.update({
        pre + "norm1.weight": (D,), pre + "attn.qkv.weight": (3 * D, D),
        pre + "attn.q_norm.weight": (D // heads,), pre + "attn.k_norm.weight": (D // heads,),
        pre + "attn.proj.weight": (D, D), pre + "attn.proj.bias": (D,),
        pre + "norm2.weight": (D,), pre + "mlp.w1.weight": (F, D), pre + "mlp.w3.weight": (F, D),
        pre + "mlp.w2.weight": (D, F),
        pre + "adaLN_modulation.0.weight": (6 * D, D), pre + "adaLN_modulation.0.bias": (6 * D,),
    })
  for i in range(cfg.pixel_depth):
    pre = f"pixel_blocks.{i}."
    shapes.update({
        pre + "compress_to_attn.weight": (A, p * p * dpix), pre + "compress_to_attn.bias": (A,),
        pre + "expand_from_attn.weight": (p * p * dpix, A), pre + "expand_from_attn.bias": (p * p * dpix,),
        pre + "norm1.weight": (dpix,), pre + "attn.qkv.weight": (3 * A, A),
        pre + "attn.q_norm.weight": (A // pheads,), pre + "attn.k_norm.weight": (A // pheads,),
        pre + "attn.proj.weight": (A, A), pre + "attn.proj.bias": (A,),
        pre + "norm2.weight": (dpix,),
        pre + "mlp.fc1.weight": (4 * dpix, dpix), pre + "mlp.fc1.bias": (4 * dpix,),
        pre + "mlp.fc2.weight": (dpix, 4 * dpix), pre + "mlp.fc2.bias": (dpix,),
        pre + "adaLN_modulation.0.weight": (p * p * n * dpix, D),
        pre + "adaLN_modulation.0.bias": (p * p * n * dpix,),
    })
  return shapes


# ----------------------------------------------------------------------------- helpers

def abstract_params(cfg):
  return nnx.to_pure_dict(nnx.state(abstract(cfg), nnx.Param))


def random_params(cfg, seed):
  """Random float32 values for every parameter, zero-initialised ones included (shapes from the
  abstract model; no initialiser is run, which keeps these tests fast on a CPU)."""
  rng = np.random.default_rng(seed)

  def draw(path, s):
    leaf = path[-1]
    if leaf == "kernel":  # torch-default-like U(+-1/sqrt(fan_in)), per block for stacked ones
      bound = 1.0 / np.sqrt(s.shape[-2])
      return rng.uniform(-bound, bound, s.shape).astype(np.float32)
    if leaf == "scale":  # RMSNorm weights near one, but not one
      return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
    if leaf == "embedding":
      return (0.5 * rng.standard_normal(s.shape)).astype(np.float32)
    return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)  # biases

  flat = traverse_util.flatten_dict(abstract_params(cfg))
  return traverse_util.unflatten_dict({path: draw(path, s) for path, s in flat.items()})


def random_model(cfg, seed):
  """Our model, built from its abstract graph, with every parameter random (non-zero output)."""
  model = nnx.merge(*nnx.split(abstract(cfg)))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, random_params(cfg, seed))
  nnx.update(model, state)
  return model


# One compiled forward per model structure, shared by every model of that structure.
forward = nnx.jit(lambda model, x, t, y: model(x, t, y))


def params_of(model):
  return jax.tree.map(np.asarray, checkpoint.param_dict(model))


def assert_same_params(got, want):
  got, want = traverse_util.flatten_dict(got), traverse_util.flatten_dict(want)
  assert set(got) == set(want)
  for path in want:
    assert np.shape(got[path]) == np.shape(want[path]), path
    np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=str(path))


def inputs(batch=2, h=16, w=24, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, (batch, h, w, 3)).astype(np.float32)
  t = np.array([0.3, 0.8][:batch], np.float32)
  y = np.array([3, 10][:batch], np.int32)  # 10 = the null class of a 10-class model
  return x, t, y


def projector_tensors(seed=0):
  rng = np.random.default_rng(seed)
  return {"diffusion_trainer.proj.0.0.weight": rng.standard_normal((32, 64)).astype(np.float32),
          "diffusion_trainer.proj.0.0.bias": rng.standard_normal(32).astype(np.float32),
          "diffusion_trainer.proj.0.2.weight": rng.standard_normal((16, 32)).astype(np.float32)}


def to_torch(sd):
  torch = pytest.importorskip("torch")
  return {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in sd.items()}


def save_lightning(path, ema_sd, online_sd=None, extra=None):
  """A Lightning-style .ckpt: state_dict with ema_denoiser./denoiser./diffusion_trainer. keys."""
  torch = pytest.importorskip("torch")
  state = {f"ema_denoiser.{k}": v for k, v in ema_sd.items()}
  if online_sd is not None:
    state.update({f"denoiser.{k}": v for k, v in online_sd.items()})
  state.update(projector_tensors())
  state.update(extra or {})
  torch.save({"state_dict": to_torch(state), "epoch": 320, "global_step": 1234}, str(path))
  return str(path)


def run_main(*argv):
  return import_official.main([str(a) for a in argv])


# ----------------------------------------------------------------------------- no torch needed

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_exporter_matches_official_shapes(name):
  """Our parameter tree, exported by hand, has exactly the released names and torch shapes."""
  cfg = CONFIGS[name]
  sd = export_official(random_params(cfg, 0), cfg)
  assert {k: v.shape for k, v in sd.items()} == official_shapes(cfg)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_convert_and_infer_config_without_torch(name):
  """infer_config recovers the config and convert inverts the hand-written export exactly."""
  cfg = CONFIGS[name]
  params = random_params(cfg, 1)
  sd = export_official(params, cfg)
  inferred = import_official.infer_config(sd)
  assert PixelDiTConfig.from_dict(inferred) == cfg, inferred
  for field in ("hidden_size", "num_heads", "patch_depth", "pixel_depth", "patch_size",
                "pixel_hidden_size", "pixel_attn_size", "pixel_num_heads", "pit_post_modulation",
                "num_classes", "in_channels"):
    assert inferred[field] == getattr(cfg, field), field
  converted = import_official.convert(sd, abstract_params(cfg))
  assert_same_params(converted, params)


def mismatch_edits(sd, case):
  """Edits {name: new tensor, or None to delete} to a bare official state dict, and the key that
  the error must name."""
  if case == "missing":
    return {"pixel_blocks.1.mlp.fc2.bias": None}, "pixel_blocks.1.mlp.fc2.bias"
  if case == "unknown":  # the official qkv has no bias
    return {"patch_blocks.0.attn.qkv.bias": np.zeros(192, np.float32)}, "patch_blocks.0.attn.qkv.bias"
  if case == "wrong_shape":  # a transposed (non-square) weight outside the blocks
    name = "t_embedder.mlp.0.weight"
    return {name: np.ascontiguousarray(sd[name].T)}, name
  if case == "wrong_shape_every_block":
    names = [f"patch_blocks.{i}.mlp.w2.weight" for i in range(2)]
    return {n: np.ascontiguousarray(sd[n].T) for n in names}, names[1]
  if case == "wrong_shape_one_block":
    name = "patch_blocks.1.mlp.w2.weight"
    return {name: np.ascontiguousarray(sd[name].T)}, name
  raise KeyError(case)


def apply_edits(sd, edits, prefix=""):
  sd = dict(sd)
  for k, v in edits.items():
    if v is None:
      del sd[prefix + k]
    else:
      sd[prefix + k] = v
  return sd


MISMATCH_CASES = ["missing", "unknown", "wrong_shape", "wrong_shape_every_block",
                  "wrong_shape_one_block"]


@pytest.mark.parametrize("case", MISMATCH_CASES)
def test_convert_refuses_mismatch(case):
  """No torch: convert() raises CheckpointMismatch naming the offending tensor."""
  cfg = CONFIGS["tiny"]
  sd = export_official(random_params(cfg, 2), cfg)
  edits, key = mismatch_edits(sd, case)
  with pytest.raises(CheckpointMismatch) as e:
    import_official.convert(apply_edits(sd, edits), abstract_params(cfg))
  assert key in str(e.value)
  # Only the offending tensors are named.
  for other in ("patch_blocks.0.attn.proj.weight", "pixel_blocks.0.mlp.fc2.bias"):
    assert other not in str(e.value)


def test_block_index_gap_is_refused():
  """Blocks 0 and 2 present, block 1 absent: missing and unknown keys, not a shallower model."""
  cfg = CONFIGS["tiny"]
  sd = export_official(random_params(cfg, 2), cfg)
  gap = {k.replace("patch_blocks.1.", "patch_blocks.2."): v for k, v in sd.items()}
  inferred = import_official.infer_config(gap)
  with pytest.raises(CheckpointMismatch) as e:
    import_official.convert(gap, abstract_params(PixelDiTConfig.from_dict(inferred)))
  assert "patch_blocks.1.attn.qkv.weight" in str(e.value)
  assert "patch_blocks.2.attn.qkv.weight" in str(e.value)


def test_bad_shape_message_states_expected_shape_in_checkpoint_layout():
  cfg = CONFIGS["tiny"]
  sd = export_official(random_params(cfg, 2), cfg)
  D = cfg.hidden_size
  sd["t_embedder.mlp.0.weight"] = np.ascontiguousarray(sd["t_embedder.mlp.0.weight"].T)
  with pytest.raises(CheckpointMismatch) as e:
    import_official.convert(sd, abstract_params(cfg))
  assert f"checkpoint (256, {D})" in str(e.value)
  assert f"expected ({D}, 256)" in str(e.value), str(e.value)


def test_infer_config_names_the_tensor_it_needs():
  cfg = CONFIGS["tiny"]
  sd = export_official(random_params(cfg, 3), cfg)
  del sd["patch_blocks.0.attn.q_norm.weight"]
  with pytest.raises(CheckpointMismatch, match=re.escape("patch_blocks.0.attn.q_norm.weight")):
    import_official.infer_config(sd)


def test_select_weights_prefixes():
  cfg = CONFIGS["tiny"]
  ema = export_official(random_params(cfg, 4), cfg)
  online = export_official(random_params(cfg, 5), cfg)
  lightning = {**{f"ema_denoiser.{k}": v for k, v in ema.items()},
               **{f"denoiser.{k}": v for k, v in online.items()}, **projector_tensors()}

  weights, projector = import_official.select_weights(lightning, "ema")
  assert set(weights) == set(ema) and all(weights[k] is ema[k] for k in ema)
  assert set(projector) == {"proj.0.0.weight", "proj.0.0.bias", "proj.0.2.weight"}
  weights, _ = import_official.select_weights(lightning, "online")
  assert all(weights[k] is online[k] for k in online)

  # Bare state dict: returned unchanged.
  weights, projector = import_official.select_weights(ema, "ema")
  assert weights == ema and projector == {}

  # Unknown top-level prefix next to the known ones.
  stray = {**lightning, "model_ema.s_embedder.proj.weight": ema["s_embedder.proj.weight"]}
  with pytest.raises(CheckpointMismatch, match=re.escape("model_ema.s_embedder.proj.weight")):
    import_official.select_weights(stray, "ema")

  # Only online weights present, EMA asked for.
  only_online = {f"denoiser.{k}": v for k, v in online.items()}
  with pytest.raises(CheckpointMismatch, match="--weights online"):
    import_official.select_weights(only_online, "ema")


def test_missing_file_is_a_helpful_file_not_found(tmp_path, capsys):
  path = tmp_path / "imagenet256_pixeldit_xl_epoch320.ckpt"
  with pytest.raises(FileNotFoundError, match=re.escape(str(path))) as e:
    import_official.load_state_dict(str(path))
  assert "PixelDiT-ImageNet" in str(e.value)  # says where the released checkpoints are
  out = tmp_path / "out"
  assert run_main("--checkpoint", path, "--out", out) == 2
  err = capsys.readouterr().err
  assert str(path) in err and "No checkpoint file" in err
  assert not out.exists()


# ----------------------------------------------------------------------------- end to end (torch)

@pytest.fixture(scope="module")
def tiny_models():
  """(cfg, EMA model, online model): two tiny models with different random weights."""
  cfg = CONFIGS["tiny"]
  return cfg, random_model(cfg, 0), random_model(cfg, 1)


def test_round_trip_lightning_ckpt(tmp_path, tiny_models, capsys):
  """Export -> Lightning .ckpt -> importer -> Orbax -> load_model gives the same model."""
  pytest.importorskip("torch")
  cfg, ema_model, online_model = tiny_models
  ema_params, online_params = params_of(ema_model), params_of(online_model)
  for leaf in traverse_util.flatten_dict(ema_params).values():
    assert np.all(leaf != 0)  # the zero-initialised parameters are random too
  path = save_lightning(tmp_path / "model.ckpt", export_official(ema_params, cfg),
                        export_official(online_params, cfg))
  out = tmp_path / "imported"

  assert run_main("--checkpoint", path, "--out", out) == 0
  assert "Imported ema weights" in capsys.readouterr().out
  model, meta = checkpoint.load_model(str(out))
  assert meta["model"] == cfg.to_dict()
  assert meta["source"]["weights"] == "ema"
  assert meta["source"]["repa_projector_tensors_skipped"] == 3
  assert_same_params(params_of(model), ema_params)

  x, t, y = inputs()  # non-square: 4 x 6 patches
  want = np.asarray(forward(ema_model, x, t, y))
  got = np.asarray(forward(model, x, t, y))
  assert want.shape == (2, 16, 24, 3) and np.abs(want).max() > 1e-2 and np.all(np.isfinite(want))
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_round_trip_online_weights_and_step(tmp_path, tiny_models):
  """--weights online imports the denoiser.* weights; --step records them as another step."""
  pytest.importorskip("torch")
  cfg, ema_model, online_model = tiny_models
  ema_params, online_params = params_of(ema_model), params_of(online_model)
  path = save_lightning(tmp_path / "model.ckpt", export_official(ema_params, cfg),
                        export_official(online_params, cfg))
  out = tmp_path / "imported"
  assert run_main("--checkpoint", path, "--out", out) == 0
  assert run_main("--checkpoint", path, "--out", out, "--weights", "online", "--step", 5) == 0

  model, meta = checkpoint.load_model(str(out))  # latest step: the online weights
  assert meta["source"]["weights"] == "online"
  assert_same_params(params_of(model), online_params)
  ema_loaded, meta0 = checkpoint.load_model(str(out), step=0)
  assert meta0["source"]["weights"] == "ema"
  assert_same_params(params_of(ema_loaded), ema_params)

  x, t, y = inputs(seed=1)
  want = np.asarray(forward(online_model, x, t, y))
  got = np.asarray(forward(model, x, t, y))
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  assert np.abs(got - np.asarray(forward(ema_loaded, x, t, y))).max() > 1e-3  # really other weights


@pytest.mark.parametrize("name", ["post_modulation", "narrow_pixel_attn"])
def test_import_records_inferred_config(tmp_path, name):
  """The imported checkpoint's meta rebuilds the original config, and the weights load."""
  pytest.importorskip("torch")
  cfg = CONFIGS[name]
  params = random_params(cfg, 6)
  path = save_lightning(tmp_path / "model.ckpt", export_official(params, cfg),
                        export_official(random_params(cfg, 7), cfg))
  out = tmp_path / "imported"
  assert run_main("--checkpoint", path, "--out", out) == 0
  model, meta = checkpoint.load_model(str(out))
  assert PixelDiTConfig.from_dict(meta["model"]) == cfg
  assert model.cfg == cfg
  assert_same_params(params_of(model), params)


def test_post_modulation_round_trip_forward(tmp_path):
  pytest.importorskip("torch")
  cfg = CONFIGS["post_modulation"]
  original = random_model(cfg, 3)
  path = save_lightning(tmp_path / "model.ckpt", export_official(params_of(original), cfg))
  out = tmp_path / "imported"
  assert run_main("--checkpoint", path, "--out", out) == 0
  model, _ = checkpoint.load_model(str(out))
  assert model.cfg.pit_post_modulation
  x, t, y = inputs(h=24, w=16)
  want = np.asarray(forward(original, x, t, y))
  assert np.abs(want).max() > 1e-2
  np.testing.assert_allclose(np.asarray(forward(model, x, t, y)), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", MISMATCH_CASES + ["unknown_prefix"])
def test_mismatched_checkpoint_is_refused(tmp_path, capsys, case):
  """Through the CLI: CheckpointMismatch naming the key, exit status 2, nothing written."""
  torch = pytest.importorskip("torch")
  cfg = CONFIGS["tiny"]
  sd = export_official(random_params(cfg, 8), cfg)
  state = {f"ema_denoiser.{k}": v for k, v in sd.items()}
  state.update({f"denoiser.{k}": v for k, v in sd.items()})
  state.update(projector_tensors())
  if case == "unknown_prefix":
    key = "model_ema.s_embedder.proj.weight"
    state[key] = sd["s_embedder.proj.weight"]
  else:
    edits, key = mismatch_edits(sd, case)
    state = apply_edits(state, edits, prefix="ema_denoiser.")
  path = tmp_path / "bad.ckpt"
  torch.save({"state_dict": to_torch(state)}, str(path))
  out = tmp_path / "out"

  with pytest.raises(CheckpointMismatch) as e:
    import_official.import_checkpoint(str(path), str(out))
  assert key in str(e.value)
  assert not out.exists()  # nothing written for a refused checkpoint

  assert run_main("--checkpoint", path, "--out", out) == 2
  err = capsys.readouterr().err
  assert err.startswith("error:") and key in err
  assert not out.exists()


def test_bare_state_dict_pth(tmp_path):
  """A prefix-free denoiser state dict saved as .pth imports too."""
  torch = pytest.importorskip("torch")
  cfg = CONFIGS["narrow_pixel_attn"]
  params = random_params(cfg, 9)
  path = tmp_path / "denoiser.pth"
  torch.save(to_torch(export_official(params, cfg)), str(path))
  out = tmp_path / "imported"
  assert run_main("--checkpoint", path, "--out", out) == 0
  model, meta = checkpoint.load_model(str(out))
  assert model.cfg == cfg
  assert meta["source"]["repa_projector_tensors_skipped"] == 0
  assert_same_params(params_of(model), params)


def test_bfloat16_checkpoint_is_read_as_float32(tmp_path):
  torch = pytest.importorskip("torch")
  cfg = CONFIGS["tiny"]
  sd = export_official(random_params(cfg, 10), cfg)
  path = tmp_path / "bf16.pth"
  torch.save({k: v.to(torch.bfloat16) for k, v in to_torch(sd).items()}, str(path))
  loaded = import_official.load_state_dict(str(path))
  assert set(loaded) == set(sd)
  for k, v in sd.items():
    assert loaded[k].dtype == np.float32
    np.testing.assert_array_equal(loaded[k], torch.from_numpy(v).to(torch.bfloat16).float().numpy())
