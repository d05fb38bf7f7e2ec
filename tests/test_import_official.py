"""Tests of the official-checkpoint importer (pixeldit_jax/tools/import_official.py).

The official tensors are produced by `export_official` / `export_official_t2i` below, hand-written
exporters that spell out the released PixDiT / PixDiT_T2I parameter names and torch (out, in)
shapes. They deliberately do not use the importer's own name tables, so a wrong mapping in the
importer cannot agree with itself here. (tests/test_t2i_model.py checks the T2I forward pass
against the spec equations; with PIXELDIT_OFFICIAL_SRC pointing at a checkout of the official
code, `test_t2i_matches_official_torch_module` also runs the released torch module.)
"""

from __future__ import annotations

import os
import re
import sys

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

TINY_T2I = dict(patch_size=4, hidden_size=64, num_heads=4, patch_depth=2, pixel_depth=2, text_dim=12,
                text_length=5)
T2I_CONFIGS = {
    "t2i_tiny": PixelDiTConfig(**TINY_T2I),
    # As the released T2I model: A != D and pixel heads != patch heads; plus post-modulation PiT.
    "t2i_narrow_pixel_attn_post": PixelDiTConfig(**{**TINY_T2I, "patch_depth": 3, "pixel_depth": 1},
                                                 pixel_hidden_size=8, pixel_attn_size=32,
                                                 pixel_num_heads=2, pit_post_modulation=True),
}


# ----------------------------------------------------------------------------- hand-written exporter

def W(kernel):  # flax (in, out) -> torch Linear (out, in)
  assert kernel.ndim == 2
  return np.ascontiguousarray(kernel.T)


def _export_shared(P: dict) -> dict:
  """The tensors named alike in PixDiT and PixDiT_T2I, outside the blocks."""
  return {
      "s_embedder.proj.weight": W(P["patch_embed"]["proj"]["kernel"]),
      "s_embedder.proj.bias": P["patch_embed"]["proj"]["bias"],
      "t_embedder.mlp.0.weight": W(P["t_embedder"]["mlp_in"]["kernel"]),
      "t_embedder.mlp.0.bias": P["t_embedder"]["mlp_in"]["bias"],
      "t_embedder.mlp.2.weight": W(P["t_embedder"]["mlp_out"]["kernel"]),
      "t_embedder.mlp.2.bias": P["t_embedder"]["mlp_out"]["bias"],
      "pixel_embedder.proj.weight": W(P["pixel_embed"]["proj"]["kernel"]),
      "pixel_embedder.proj.bias": P["pixel_embed"]["proj"]["bias"],
      "final_layer.norm.weight": P["out_head"]["norm"]["scale"],
      "final_layer.linear.weight": W(P["out_head"]["linear"]["kernel"]),
      "final_layer.linear.bias": P["out_head"]["linear"]["bias"],
  }


def _export_pixel_blocks(P: dict, cfg: PixelDiTConfig) -> dict:
  sd = {}
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
  return sd


def _finish(sd: dict, P: dict) -> dict:
  # Every one of our parameters must have been exported exactly once.
  n_ours = sum(a.shape[0] if path[0] in ("patch_blocks", "pixel_blocks") else 1
               for path, a in traverse_util.flatten_dict(P).items())
  assert len(sd) == n_ours, f"exporter covers {len(sd)} tensors, the model has {n_ours}"
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


def export_official(params: dict, cfg: PixelDiTConfig) -> dict[str, np.ndarray]:
  """Our pure param dict -> the official PixDiT state dict (names spelled out, torch layouts)."""
  P = jax.tree.map(np.asarray, params)
  sd = _export_shared(P)
  sd["y_embedder.embedding_table.weight"] = P["y_embedder"]["embedding"]["embedding"]
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
  sd.update(_export_pixel_blocks(P, cfg))
  return _finish(sd, P)


def export_official_t2i(params: dict, cfg: PixelDiTConfig) -> dict[str, np.ndarray]:
  """Our pure param dict -> the official PixDiT_T2I state dict (the `core.` prefix not included).

  In MMDiTBlockT2I, x is the image stream and y the text stream."""
  P = jax.tree.map(np.asarray, params)
  sd = _export_shared(P)
  sd.update({
      "y_embedder.proj.weight": W(P["text_embed"]["proj"]["kernel"]),
      "y_embedder.proj.bias": P["text_embed"]["proj"]["bias"],
      "y_embedder.norm.weight": P["text_embed"]["norm"]["scale"],
      "y_pos_embedding": P["text_pos"][None],  # nn.Parameter (1, txt_max_length, D)
  })
  blocks = P["patch_blocks"]
  assert blocks["img_norm1"]["scale"].shape[0] == cfg.patch_depth
  for i in range(cfg.patch_depth):
    b = jax.tree.map(lambda a: a[i], blocks)
    pre = f"patch_blocks.{i}."
    for ours, xy in (("img", "x"), ("txt", "y")):
      a = b["attn"][ours]
      sd.update({
          pre + f"norm_{xy}1.weight": b[f"{ours}_norm1"]["scale"],
          pre + f"norm_{xy}2.weight": b[f"{ours}_norm2"]["scale"],
          pre + f"attn.qkv_{xy}.weight": W(a["qkv"]["kernel"]),
          pre + f"attn.q_norm_{xy}.weight": a["q_norm"]["scale"],
          pre + f"attn.k_norm_{xy}.weight": a["k_norm"]["scale"],
          pre + f"attn.proj_{xy}.weight": W(a["proj"]["kernel"]),
          pre + f"attn.proj_{xy}.bias": a["proj"]["bias"],
          pre + f"mlp_{xy}.w1.weight": W(b[f"{ours}_mlp"]["w1"]["kernel"]),
          pre + f"mlp_{xy}.w3.weight": W(b[f"{ours}_mlp"]["w3"]["kernel"]),
          pre + f"mlp_{xy}.w2.weight": W(b[f"{ours}_mlp"]["w2"]["kernel"]),
      })
    sd.update({
        pre + "adaLN_modulation_img.0.weight": W(b["img_adaln"]["kernel"]),
        pre + "adaLN_modulation_img.0.bias": b["img_adaln"]["bias"],
        pre + "adaLN_modulation_txt.0.weight": W(b["txt_adaln"]["kernel"]),
        pre + "adaLN_modulation_txt.0.bias": b["txt_adaln"]["bias"],
    })
  sd.update(_export_pixel_blocks(P, cfg))
  return _finish(sd, P)


def _shared_shapes(cfg: PixelDiTConfig) -> dict[str, tuple]:
  D, p, C, dpix = cfg.hidden_size, cfg.patch_size, cfg.in_channels, cfg.pixel_hidden_size
  return {
      "s_embedder.proj.weight": (D, C * p * p), "s_embedder.proj.bias": (D,),
      "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
      "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
      "pixel_embedder.proj.weight": (dpix, C), "pixel_embedder.proj.bias": (dpix,),
      "final_layer.norm.weight": (dpix,),
      "final_layer.linear.weight": (C, dpix), "final_layer.linear.bias": (C,),
  }


def _pixel_block_shapes(cfg: PixelDiTConfig) -> dict[str, tuple]:
  D, p, dpix = cfg.hidden_size, cfg.patch_size, cfg.pixel_hidden_size
  A = cfg.pixel_attn_size or D
  pheads = cfg.pixel_num_heads or cfg.num_heads
  n = 4 if cfg.pit_post_modulation else 6
  shapes = {}
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


def official_shapes(cfg: PixelDiTConfig) -> dict[str, tuple]:
  """The released PixDiT tensor shapes, from the published module definitions."""
  D, heads = cfg.hidden_size, cfg.num_heads
  F = int(2 * int(4 * D) / 3)
  shapes = {**_shared_shapes(cfg), "y_embedder.embedding_table.weight": (cfg.num_classes + 1, D)}
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
  return {**shapes, **_pixel_block_shapes(cfg)}


def official_shapes_t2i(cfg: PixelDiTConfig) -> dict[str, tuple]:
  """The released PixDiT_T2I tensor shapes, from the published module definitions."""
  D, heads = cfg.hidden_size, cfg.num_heads
  F = int(2 * int(4 * D) / 3)
  shapes = {**_shared_shapes(cfg),
            "y_embedder.proj.weight": (D, cfg.text_dim), "y_embedder.proj.bias": (D,),
            "y_embedder.norm.weight": (D,), "y_pos_embedding": (1, cfg.text_length, D)}
  for i in range(cfg.patch_depth):
    pre = f"patch_blocks.{i}."
    for xy in "xy":
      shapes.update({
          pre + f"norm_{xy}1.weight": (D,), pre + f"norm_{xy}2.weight": (D,),
          pre + f"attn.qkv_{xy}.weight": (3 * D, D),
          pre + f"attn.q_norm_{xy}.weight": (D // heads,), pre + f"attn.k_norm_{xy}.weight": (D // heads,),
          pre + f"attn.proj_{xy}.weight": (D, D), pre + f"attn.proj_{xy}.bias": (D,),
          pre + f"mlp_{xy}.w1.weight": (F, D), pre + f"mlp_{xy}.w3.weight": (F, D),
          pre + f"mlp_{xy}.w2.weight": (D, F),
      })
    for stream in ("img", "txt"):
      shapes.update({pre + f"adaLN_modulation_{stream}.0.weight": (6 * D, D),
                     pre + f"adaLN_modulation_{stream}.0.bias": (6 * D,)})
  return {**shapes, **_pixel_block_shapes(cfg)}


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


def projector_tensors(seed=0, prefix="diffusion_trainer.proj.0.", d=64, hidden=32, out=24):
  """A REPA projector in the official layout: Sequential(Linear(d, h), SiLU, Linear(h, h), SiLU,
  Linear(h, out)), i.e. Linear indices 0, 2, 4 (C2I: under diffusion_trainer.proj.0.; T2I: under
  _repa_projector.)."""
  rng = np.random.default_rng(seed)
  shapes = {0: (hidden, d), 2: (hidden, hidden), 4: (out, hidden)}
  sd = {}
  for i, shape in shapes.items():
    sd[f"{prefix}{i}.weight"] = rng.standard_normal(shape).astype(np.float32)
    sd[f"{prefix}{i}.bias"] = rng.standard_normal(shape[0]).astype(np.float32)
  return sd


def expected_projector(sd, prefix="diffusion_trainer.proj.0."):
  """The repa_projector item the importer must write, spelled out."""
  return {f"fc{n}": {"kernel": sd[f"{prefix}{i}.weight"].T, "bias": sd[f"{prefix}{i}.bias"]}
          for n, i in ((1, 0), (2, 2), (3, 4))}


def load_projector(directory, d=64, hidden=32, out=24):
  shapes = {"fc1": (d, hidden), "fc2": (hidden, hidden), "fc3": (hidden, out)}
  target = {k: {"kernel": jax.ShapeDtypeStruct(s, np.float32), "bias": jax.ShapeDtypeStruct(s[1:], np.float32)}
            for k, s in shapes.items()}
  return jax.tree.map(np.asarray, checkpoint.load_params(str(directory), target, item="repa_projector"))


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

  weights, projector, info = import_official.select_weights(lightning, "ema")
  assert set(weights) == set(ema) and all(weights[k] is ema[k] for k in ema)
  assert set(projector) == {f"proj.0.{i}.{leaf}" for i in (0, 2, 4) for leaf in ("weight", "bias")}
  assert info == {"kind": "c2i", "weights": "ema", "projector_prefix": "diffusion_trainer."}
  weights, _, info = import_official.select_weights(lightning, "online")
  assert all(weights[k] is online[k] for k in online) and info["weights"] == "online"

  # Bare state dict: returned unchanged.
  weights, projector, info = import_official.select_weights(ema, "ema")
  assert weights == ema and projector == {} and info["kind"] == "c2i"

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
  assert meta["time_convention"] == "c2i_t"
  assert meta["repa_projector"] == {"in_dim": 64, "hidden_dim": 32, "out_dim": 24, "official_block": 8}
  assert_same_params(params_of(model), ema_params)
  assert_same_params(load_projector(out), expected_projector(projector_tensors()))

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
  assert meta["repa_projector"] is None and meta["source"]["weights"] == "as_stored"
  assert meta["time_convention"] == "c2i_t"
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


# ----------------------------------------------------------------------------- REPA projector

@pytest.mark.parametrize("kind,prefix", [("c2i", "diffusion_trainer.proj.0."), ("t2i", "_repa_projector.")])
def test_projector_mapping(kind, prefix):
  """Official Sequential(Linear, SiLU, Linear, SiLU, Linear) -> fc1, fc2, fc3 with (in, out) kernels."""
  sd = projector_tensors(3, prefix=prefix)
  strip = "diffusion_trainer." if kind == "c2i" else prefix
  stripped = {k[len(strip):]: v for k, v in sd.items()}
  tree, dims = import_official.convert_projector(stripped, kind, 64, prefix=strip)
  assert dims == {"in_dim": 64, "hidden_dim": 32, "out_dim": 24}
  assert_same_params(tree, expected_projector(sd, prefix))
  z = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
  silu = lambda a: a / (1 + np.exp(-a))
  ours = silu(silu(z @ tree["fc1"]["kernel"] + tree["fc1"]["bias"]) @ tree["fc2"]["kernel"]
              + tree["fc2"]["bias"]) @ tree["fc3"]["kernel"] + tree["fc3"]["bias"]
  lin = lambda a, i: a @ sd[f"{prefix}{i}.weight"].T + sd[f"{prefix}{i}.bias"]  # torch Linear
  np.testing.assert_allclose(ours, lin(silu(lin(silu(lin(z, 0)), 2)), 4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["missing", "unknown", "wrong_width", "wrong_hidden"])
def test_projector_mismatch_is_refused_with_full_names(case):
  prefix = "_repa_projector."
  sd = {k[len(prefix):]: v for k, v in projector_tensors(prefix=prefix).items()}
  width = 64
  if case == "missing":
    del sd["4.bias"]
    key = "_repa_projector.4.bias"
  elif case == "unknown":
    sd["6.weight"] = sd["4.weight"]
    key = "_repa_projector.6.weight"
  elif case == "wrong_width":  # projector of another model width
    width, key = 48, "_repa_projector.0.weight: checkpoint (32, 64), expected (32, 48)"
  else:
    sd["2.weight"] = sd["2.weight"][:, :16]
    key = "_repa_projector.2.weight"
  with pytest.raises(CheckpointMismatch) as e:
    import_official.convert_projector(sd, "t2i", width, prefix=prefix)
  assert key in str(e.value)
  assert "_repa_projector.0.bias" not in str(e.value)


# ----------------------------------------------------------------------------- text-to-image (no torch)

@pytest.mark.parametrize("name", sorted(T2I_CONFIGS))
def test_t2i_exporter_matches_official_shapes(name):
  cfg = T2I_CONFIGS[name]
  sd = export_official_t2i(random_params(cfg, 0), cfg)
  assert {k: v.shape for k, v in sd.items()} == official_shapes_t2i(cfg)


def test_t2i_official_tensor_count_is_1302_5m():
  """The official tensors of the T2I preset hold exactly our parameter count (spec §6.1)."""
  from pixeldit_jax.model import preset
  from pixeldit_jax.model.cost import count_params
  cfg = preset("T2I")
  shapes = official_shapes_t2i(cfg)
  assert sum(int(np.prod(s)) for s in shapes.values()) == count_params(abstract(cfg)) == 1_302_470_787
  assert len(shapes) == 385  # the state dict of the official PixDiT_T2I at this size


@pytest.mark.parametrize("name", sorted(T2I_CONFIGS))
def test_t2i_convert_and_infer_config_without_torch(name):
  cfg = T2I_CONFIGS[name]
  params = random_params(cfg, 1)
  sd = export_official_t2i(params, cfg)
  assert import_official.is_t2i_state_dict(sd)
  inferred = import_official.infer_config(sd)
  assert PixelDiTConfig.from_dict(inferred) == cfg, inferred
  assert_same_params(import_official.convert(sd, abstract_params(cfg)), params)


def t2i_mismatch_edits(sd, case):
  if case == "missing":
    return {"patch_blocks.1.attn.k_norm_y.weight": None}, "patch_blocks.1.attn.k_norm_y.weight"
  if case == "unknown":  # the official qkv_y has no bias
    return {"patch_blocks.0.attn.qkv_y.bias": np.zeros(192, np.float32)}, "patch_blocks.0.attn.qkv_y.bias"
  if case == "class_table":  # a class-conditional tensor in a T2I state dict
    name = "y_embedder.embedding_table.weight"
    return {name: np.zeros((11, 64), np.float32)}, name
  if case == "wrong_shape":
    name = "y_embedder.proj.weight"
    return {name: np.ascontiguousarray(sd[name].T)}, f"{name}: checkpoint (12, 64), expected (64, 12)"
  if case == "wrong_text_length":
    name = "y_pos_embedding"
    return {name: np.zeros((1, 6, 64), np.float32)}, f"{name}: checkpoint (1, 6, 64), expected (1, 5, 64)"
  raise KeyError(case)


T2I_MISMATCH_CASES = ["missing", "unknown", "class_table", "wrong_shape", "wrong_text_length"]


@pytest.mark.parametrize("case", T2I_MISMATCH_CASES)
def test_t2i_convert_refuses_mismatch(case):
  cfg = T2I_CONFIGS["t2i_tiny"]
  sd = export_official_t2i(random_params(cfg, 2), cfg)
  edits, key = t2i_mismatch_edits(sd, case)
  with pytest.raises(CheckpointMismatch) as e:
    import_official.convert(apply_edits(sd, edits), abstract_params(cfg))
  assert key in str(e.value)
  assert "patch_blocks.0.attn.proj_x.weight" not in str(e.value)


def test_t2i_select_weights():
  cfg = T2I_CONFIGS["t2i_tiny"]
  online = export_official_t2i(random_params(cfg, 4), cfg)
  ema = export_official_t2i(random_params(cfg, 5), cfg)
  proj = projector_tensors(prefix="_repa_projector.")
  state = {**{f"core.{k}": v for k, v in online.items()}, **proj}

  weights, projector, info = import_official.select_weights(state, "ema")  # no EMA in the file
  assert all(weights[k] is online[k] for k in online) and len(weights) == len(online)
  assert set(projector) == {f"{i}.{leaf}" for i in (0, 2, 4) for leaf in ("weight", "bias")}
  assert info == {"kind": "t2i", "weights": "online", "projector_prefix": "_repa_projector."}

  # An EMA copy of the trainer (load_state_dict prefixes it with state_dict_ema.).
  with_ema = {**state, **{f"state_dict_ema.core.{k}": v for k, v in ema.items()},
              **{f"state_dict_ema.{k}": v for k, v in proj.items()}, "pos_embed": np.zeros(3, np.float32)}
  weights, projector, info = import_official.select_weights(with_ema, "ema")
  assert all(weights[k] is ema[k] for k in ema) and info["weights"] == "ema"
  assert info["projector_prefix"] == "state_dict_ema._repa_projector." and len(projector) == 6
  weights, _, info = import_official.select_weights(with_ema, "online")
  assert all(weights[k] is online[k] for k in online) and info["weights"] == "online"

  # A bare T2I state dict is recognised by its tensors.
  assert import_official.select_weights(online, "ema")[2]["kind"] == "t2i"

  with pytest.raises(CheckpointMismatch, match=re.escape("text_encoder.layer.0.weight")):
    import_official.select_weights({**state, "text_encoder.layer.0.weight": proj["_repa_projector.0.bias"]}, "ema")
  with pytest.raises(CheckpointMismatch, match=re.escape("state_dict_ema.text_encoder.w")):
    import_official.select_weights({**with_ema, "state_dict_ema.text_encoder.w": np.zeros(3)}, "ema")
  with pytest.raises(CheckpointMismatch, match="mixes"):
    import_official.select_weights({**state, "ema_denoiser.s_embedder.proj.bias": np.zeros(64)}, "ema")


# ----------------------------------------------------------------------------- text-to-image (torch)

def save_t2i(path, core_sd, projector=True, wrapper="state_dict", ema_sd=None):
  """The T2I trainer's .pth: {wrapper: {core.*, _repa_projector.*}} (+ state_dict_ema, epoch)."""
  torch = pytest.importorskip("torch")

  def trainer(sd):
    state = {f"core.{k}": v for k, v in sd.items()}
    if projector:
      state.update(projector_tensors(prefix="_repa_projector."))
    return to_torch(state)

  obj = {wrapper: trainer(core_sd), "epoch": 5}
  if ema_sd is not None:
    obj["state_dict_ema"] = trainer(ema_sd)
  torch.save(obj, str(path))
  return str(path)


def t2i_inputs(cfg, h=16, w=8, n_txt=3, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.uniform(-1, 1, (2, h, w, 3)).astype(np.float32), np.array([137.5, 912.0], np.float32),
          rng.standard_normal((2, n_txt, cfg.text_dim)).astype(np.float32))


def test_t2i_round_trip_pth(tmp_path, capsys):
  """T2I .pth -> importer -> Orbax -> load_model: same weights, same velocity, projector item, meta."""
  pytest.importorskip("torch")
  cfg = T2I_CONFIGS["t2i_tiny"]
  original = random_model(cfg, 0)
  params = params_of(original)
  path = save_t2i(tmp_path / "pixeldit_t2i.pth", export_official_t2i(params, cfg))
  out = tmp_path / "imported"
  assert run_main("--checkpoint", path, "--out", out) == 0
  assert "t2i_sigma" in capsys.readouterr().out
  model, meta = checkpoint.load_model(str(out))
  assert type(model).__name__ == "PixelDiTT2I" and model.cfg == cfg
  assert meta["time_convention"] == "t2i_sigma"
  assert meta["source"]["kind"] == "t2i" and meta["source"]["weights"] == "online"
  assert meta["repa_projector"] == {"in_dim": 64, "hidden_dim": 32, "out_dim": 24, "official_block": 6}
  assert_same_params(params_of(model), params)
  assert_same_params(load_projector(out), expected_projector(projector_tensors(prefix="_repa_projector."),
                                                             "_repa_projector."))
  x, t, text = t2i_inputs(cfg)  # non-square, fewer text tokens than slots
  want = np.asarray(forward(original, x, t, text))
  assert np.abs(want).max() > 1e-2
  np.testing.assert_allclose(np.asarray(forward(model, x, t, text)), want, atol=1e-6, rtol=0)


def test_t2i_model_wrapper_and_ema_copy(tmp_path, capsys):
  pytest.importorskip("torch")
  cfg = T2I_CONFIGS["t2i_narrow_pixel_attn_post"]
  online, ema = random_params(cfg, 1), random_params(cfg, 2)
  # {"model": ...} wrapper without a projector.
  path = save_t2i(tmp_path / "model.pth", export_official_t2i(online, cfg), projector=False, wrapper="model")
  assert run_main("--checkpoint", path, "--out", tmp_path / "a") == 0
  model, meta = checkpoint.load_model(str(tmp_path / "a"))
  assert model.cfg == cfg and meta["repa_projector"] is None
  assert_same_params(params_of(model), online)
  # state_dict + state_dict_ema: EMA by default, the trained weights with --weights online.
  path = save_t2i(tmp_path / "ema.pth", export_official_t2i(online, cfg), ema_sd=export_official_t2i(ema, cfg))
  assert run_main("--checkpoint", path, "--out", tmp_path / "b") == 0
  model, meta = checkpoint.load_model(str(tmp_path / "b"))
  assert meta["source"]["weights"] == "ema"
  assert_same_params(params_of(model), ema)
  capsys.readouterr()
  # The released inference.py loads obj["state_dict"] whatever else the file holds: --weights online.
  assert run_main("--checkpoint", path, "--out", tmp_path / "c", "--weights", "online") == 0
  model, meta = checkpoint.load_model(str(tmp_path / "c"))
  assert_same_params(params_of(model), online)
  assert capsys.readouterr().out.startswith(
      "Imported online weights (state_dict, as the released inference.py loads) of ")
  assert meta["source"]["note"] == "state_dict, as the released inference.py loads"
  # The printed line says which copy was taken and how to get the released script's choice.
  assert run_main("--checkpoint", path, "--out", tmp_path / "d") == 0
  assert capsys.readouterr().out.startswith(
      "Imported ema weights (state_dict_ema, the EMA copy the file holds; the released inference.py "
      "loads state_dict instead: --weights online) of ")
  no_ema = save_t2i(tmp_path / "no_ema.pth", export_official_t2i(online, cfg))
  assert run_main("--checkpoint", no_ema, "--out", tmp_path / "e") == 0
  assert capsys.readouterr().out.startswith("Imported online weights (state_dict, as the released "
                                            "inference.py loads; the file has no state_dict_ema) of ")


@pytest.mark.parametrize("case", ["missing", "unknown", "class_table", "wrong_shape", "projector"])
def test_t2i_mismatched_checkpoint_is_refused(tmp_path, capsys, case):
  """Through the CLI: CheckpointMismatch naming the key, exit status 2, nothing written."""
  torch = pytest.importorskip("torch")
  cfg = T2I_CONFIGS["t2i_tiny"]
  sd = export_official_t2i(random_params(cfg, 8), cfg)
  state = {f"core.{k}": v for k, v in sd.items()}
  state.update(projector_tensors(prefix="_repa_projector."))
  if case == "projector":
    del state["_repa_projector.2.bias"]
    key = "_repa_projector.2.bias"
  else:
    edits, key = t2i_mismatch_edits(sd, case)
    state = apply_edits(state, edits, prefix="core.")
    key = key.split(":")[0]  # the expected shape differs: the config is inferred from the tensors
  path = tmp_path / "bad.pth"
  torch.save({"state_dict": to_torch(state)}, str(path))
  out = tmp_path / "out"
  assert run_main("--checkpoint", path, "--out", out) == 2
  err = capsys.readouterr().err
  assert err.startswith("error:") and key in err
  assert not out.exists()


def test_c2i_incomplete_projector_is_refused(tmp_path):
  pytest.importorskip("torch")
  cfg = CONFIGS["tiny"]
  sd = export_official(random_params(cfg, 3), cfg)
  path = save_lightning(tmp_path / "m.ckpt", sd, extra={})
  torch = pytest.importorskip("torch")
  state = torch.load(path, weights_only=True)["state_dict"]
  del state["diffusion_trainer.proj.0.4.bias"]
  torch.save({"state_dict": state}, path)
  with pytest.raises(CheckpointMismatch, match=re.escape("diffusion_trainer.proj.0.4.bias")):
    import_official.import_checkpoint(path, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- official module (opt-in)

@pytest.mark.skipif(not os.environ.get("PIXELDIT_OFFICIAL_SRC"),
                    reason="set PIXELDIT_OFFICIAL_SRC to a local checkout of the official PixelDiT code")
@pytest.mark.parametrize("post_modulation", [False, True])
def test_t2i_matches_official_torch_module(tmp_path, monkeypatch, post_modulation):
  """The released PixDiT_T2I (random weights) -> importer -> our model: same velocity and REPA
  features (repa_encoder_index) on non-square images and short text, to ~1e-5 in fp32."""
  torch = pytest.importorskip("torch")
  monkeypatch.syspath_prepend(os.environ["PIXELDIT_OFFICIAL_SRC"])
  from pixdit_core.pixeldit_t2i import PixDiT_T2I  # noqa: PLC0415 - the checkout, not this repo
  torch.manual_seed(0)
  k = 2
  core = PixDiT_T2I(in_channels=3, num_groups=2, hidden_size=32, pixel_hidden_size=8, pixel_attn_hidden_size=16,
                    pixel_num_groups=2, patch_depth=3, pixel_depth=2, patch_size=4, txt_embed_dim=12,
                    txt_max_length=5, repa_encoder_index=k, pit_adaln_post_modulation=post_modulation).eval()
  with torch.no_grad():
    for p in core.parameters():  # the zero-initialised final layer too
      p.add_(0.1 * torch.randn_like(p))
  torch.save({"state_dict": {f"core.{n}": v for n, v in core.state_dict().items()}}, str(tmp_path / "t2i.pth"))
  assert run_main("--checkpoint", tmp_path / "t2i.pth", "--out", tmp_path / "out") == 0
  model, _ = checkpoint.load_model(str(tmp_path / "out"))
  run = nnx.jit(lambda m, *a: m(*a, capture_block=k))
  for h, w, n_txt in ((8, 8, 5), (12, 20, 5), (16, 8, 3)):
    x, t, text = t2i_inputs(model.cfg, h, w, n_txt, seed=h)
    with torch.no_grad():
      want = core(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t), torch.from_numpy(text))
      want, want_feats = want.numpy().transpose(0, 2, 3, 1), core.last_repa_tokens.numpy()
    got, feats = run(model, x, t, text)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(feats), want_feats, rtol=0, atol=5e-5)
  sys.modules.pop("pixdit_core", None)
