"""LoRA (pixeldit_jax.model.lora): zero-B identity, merge algebra, adapter-only training, the
trainable count, the adapter checkpoint item, resume, sampling and the merge tool."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from helpers import TINY, inputs, max_abs, perturb, tiny
from pixeldit_jax import checkpoint as ckpt_lib
from pixeldit_jax import sample as sample_lib
from pixeldit_jax.model import PixelDiTConfig, build, lora
from pixeldit_jax.tools import merge_lora
from pixeldit_jax.train import state as state_lib
from pixeldit_jax.train import step as step_lib
from pixeldit_jax.train import trainer

ALL = ("attn", "mlp", "adaln", "pit_compaction", "pit_attn", "pixel_adaln")
T2I = dict(patch_size=4, hidden_size=32, num_heads=2, patch_depth=1, pixel_depth=1, pixel_hidden_size=8,
           pixel_attn_size=16, pixel_num_heads=2, text_dim=12, text_length=5)


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _apply(graphdef, *states):
  return jax.jit(lambda x, t, c, *s: nnx.merge(graphdef, *s)(x, t, c))


@pytest.mark.parametrize("scan", [True, False])
def test_zero_b_is_the_base_model_and_paths_do_not_change(scan):
  model = perturb(build(tiny(scan_layers=scan)))
  x, t, y = inputs(model.cfg, height=8, width=8)
  base_gd, base = nnx.graphdef(model), _params(model)
  ref = _apply(base_gd, base)(x, t, y, base)
  lora.apply(model, rank=3, alpha=6.0, targets=ALL)
  # The base's parameter paths and values are untouched; the adapters are a separate collection.
  assert jax.tree.structure(_params(model)) == jax.tree.structure(base)
  assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(_params(model)), jax.tree.leaves(base)))
  ad = lora.adapters(model)
  flat = traverse_util.flatten_dict(ad)
  assert ("patch_blocks", "attn", "qkv", "lora_a") in flat and ("pixel_blocks", "adaln", "proj", "lora_b") in flat
  assert flat[("patch_blocks", "attn", "qkv", "lora_a")].shape == (2, 32, 3)  # (layers, in, r)
  assert flat[("patch_blocks", "attn", "qkv", "lora_b")].shape == (2, 3, 96)
  out = _apply(nnx.graphdef(model), base, ad)(x, t, y, base, ad)
  assert max_abs(out, ref) == 0.0


def test_t2i_zero_b_identity_and_merge_equals_unmerged():
  cfg = PixelDiTConfig(**T2I)
  model = perturb(build(cfg))
  k = jax.random.split(jax.random.key(0), 3)
  x, t = jax.random.normal(k[0], (2, 8, 8, 3)), jax.random.uniform(k[1], (2,))
  text = jax.random.normal(k[2], (2, 4, 12))
  base_gd, base = nnx.graphdef(model), _params(model)
  ref = _apply(base_gd, base)(x, t, text, base)
  lora.apply(model, rank=2, targets=("attn", "mlp", "pixel_adaln"))
  gd, ad = nnx.graphdef(model), lora.adapters(model)
  assert "txt" in ad["patch_blocks"]["attn"] and "txt_mlp" in ad["patch_blocks"]
  assert max_abs(_apply(gd, base, ad)(x, t, text, base, ad), ref) == 0.0
  ad = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(5), a.shape), ad)
  unmerged = _apply(gd, base, ad)(x, t, text, base, ad)
  merged = lora.merge_params(base, ad, 1.0)
  assert max_abs(unmerged, ref) > 1e-3
  assert max_abs(_apply(base_gd, merged)(x, t, text, merged), unmerged) < 1e-5


def _config(**train):
  """test_train's small config, with LoRA-test defaults (2 steps, no grids, a fast EMA)."""
  from test_train import small_config  # noqa: PLC0415 - tests/ is on sys.path under pytest
  return small_config(**{**dict(num_steps=2, checkpoint_every=2, lr=1e-2, ema_decay=0.5,
                                sample_steps=2, sample_rows=0, sample_per_row=2), **train})


def test_step_trains_only_the_adapters_and_merge_matches():
  cfg = PixelDiTConfig(**TINY)
  config = _config()
  config.train.lora.update(dict(rank=2, alpha=4.0, targets=("attn", "mlp", "pixel_adaln")))
  lcfg = config.train.lora
  tx = optax.adamw(1e-2)
  state = jax.jit(lambda: state_lib.init(cfg, tx, 0, lora_cfg=lcfg))()
  # A non-trivial base (a fresh model's zero-initialised output head would hide everything).
  rng = np.random.default_rng(0)
  state = state.replace(params=jax.tree.map(
      lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(p.dtype), state.params))
  base = jax.device_get(state.params)
  assert state.ema_params == {}
  # The trainable count: per adapted linear r * (in + out), per stacked layer.
  d, hid, depth, r = 32, PixelDiTConfig(**TINY).swiglu_hidden, 2, 2
  pix_out = 16 * 6 * 8  # p*p * 6 * pixel width
  expected = depth * r * ((d + 3 * d) + (d + d) + 2 * (d + hid) + (hid + d) + (d + pix_out))
  assert lora.count(state.lora["params"]) == expected
  assert lora.count(state.lora["params"]) < 0.1 * lora.count(state.params)
  graphdef = nnx.graphdef(lora.build_abstract(cfg, lcfg))
  train_step = jax.jit(step_lib.make_train_step(graphdef, tx, config))
  batch = dict(image=jnp.asarray(rng.integers(0, 256, (4, 8, 8, 3)), jnp.uint8),
               label=jnp.arange(4, dtype=jnp.int32), skipped=jnp.zeros(4, jnp.int32),
               converted=jnp.zeros(4, jnp.int32))
  for _ in range(3):
    state, m = train_step(state, batch, {})
    assert bool(m["finite"])
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(jax.device_get(state.params))):
    np.testing.assert_array_equal(a, b)  # bit-identical base
  b_norm = sum(float(jnp.sum(jnp.abs(v))) for k, v in traverse_util.flatten_dict(state.lora["params"]).items()
               if k[-1] == "lora_b")
  assert b_norm > 0
  x, t, y = inputs(cfg, height=8, width=8)
  unmerged = _apply(graphdef, state.params, state.lora["params"])(x, t, y, state.params, state.lora["params"])
  merged = lora.merge_params(state.params, state.lora["params"], lora.scale_of(lcfg))
  base_out = _apply(nnx.graphdef(build(cfg)), state.params)(x, t, y, state.params)
  merged_out = _apply(nnx.graphdef(build(cfg)), merged)(x, t, y, merged)
  assert max_abs(unmerged, base_out) > 1e-4
  assert max_abs(merged_out, unmerged) < 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("lora")
  # 4 steps: the zero-initialised gates open one level per step (output head, pixel AdaLN, patch
  # AdaLN), and a patch block's attention reaches the loss (so its adapters get gradients) only then.
  trainer.train(_config(num_steps=4, checkpoint_every=4), str(root / "base"))
  config = _config(num_steps=4, init_from=str(root / "base" / "checkpoints"), sample_rows=1)
  config.train.lora.update(dict(rank=2, targets=("attn", "mlp")))
  first = trainer.train(config, str(root / "lora"), max_steps=2)
  second = trainer.train(config, str(root / "lora"))
  return config, root, first, second


def test_lora_run_checkpoint_resume_sample_and_merge(runs, tmp_path, caplog):
  config, root, first, second = runs
  assert first["step"] == 2 and second["start_step"] == 2 and second["step"] == 4
  assert os.path.isfile(second["last_sample"])  # grid from base + merged EMA adapters
  ckpt = str(root / "lora" / "checkpoints")
  assert ckpt_lib.items(ckpt, 4) == {"lora", "opt_state", "train", "data", "meta"}  # no base copy
  record = ckpt_lib.lora_record(ckpt)
  assert record["rank"] == 2 and record["base_step"] == 4 and record["base_item"] == "ema_params"
  _, ema4, _ = ckpt_lib.load_adapters(ckpt, 4)
  _, ema2, _ = ckpt_lib.load_adapters(ckpt, 2)
  assert max_abs(ema4["patch_blocks"]["attn"]["qkv"]["lora_b"], ema2["patch_blocks"]["attn"]["qkv"]["lora_b"]) > 0
  # Resuming with other LoRA settings refuses instead of treating the step as damaged.
  other = config.copy_and_resolve_references()
  other.train.lora.rank = 3
  with pytest.raises(ckpt_lib.RunMismatchError, match="LoRA"):
    trainer.train(other, str(root / "lora"))

  # Sampling: the LoRA run's own checkpoint, and --lora on top of the base, give the same images;
  # the merged checkpoint gives them too (the adapters folded in at load, or on disk).
  s = config.copy_and_resolve_references()
  s.sample.update(dict(sampler="euler", num_steps=2, num_per_class=1, batch_size=5))
  auto = sample_lib.run(s, ckpt, str(tmp_path / "auto"))
  explicit = sample_lib.run(s, str(root / "base" / "checkpoints"), str(tmp_path / "explicit"),
                            lora=sample_lib.lora_dir(str(root / "lora")))
  merge_lora.main(["--checkpoint", str(root / "lora"), "--out", str(tmp_path / "merged")])
  merged = sample_lib.run(s, str(tmp_path / "merged"), str(tmp_path / "m"))
  load = lambda r: np.load(r["samples"])["arr_0"]
  np.testing.assert_array_equal(load(auto), load(explicit))
  assert np.abs(load(merged).astype(int) - load(auto).astype(int)).max() <= 1
  assert auto["step"] == 4 and ckpt_lib.items(str(tmp_path / "merged")) == {"ema_params", "meta"}
  # The merged kernels moved off the base's (4 tiny steps barely move the pictures themselves).
  k = lambda d: ckpt_lib.load_model(d)[0].patch_blocks.attn.qkv.kernel[...]
  assert max_abs(k(str(tmp_path / "merged")), k(str(root / "base" / "checkpoints"))) > 0


def test_came_optimizer_sees_the_adapters_stacked_layers_axis():
  from pixeldit_jax.train import optimizer as optimizer_lib
  from pixeldit_jax.model import abstract
  cfg = PixelDiTConfig(**TINY)
  config = _config(optimizer="came")
  lora_model = lora.build_abstract(cfg, dict(rank=2, targets=("attn",)))
  tx = optimizer_lib.for_training(config.train, abstract(cfg), None, lora_model)
  ad = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), lora.adapters(lora_model))
  opt = tx.init((ad, {}))
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, (ad, {})), opt, (ad, {}))
  assert jax.tree.structure(updates[0]) == jax.tree.structure(ad)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
