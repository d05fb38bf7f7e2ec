"""What the text encoders share: the ``TextEncoder`` interface, local-file helpers and the loader
that fills an NNX model from a Hugging Face safetensors checkpoint.

Nothing here downloads: every path is a local directory and a missing file is a
``FileNotFoundError`` that names it (and the config field it came from).
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import os
from typing import Callable, Dict, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixeldit_jax import fs

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

log = logging.getLogger(__name__)
_warned_truncation = False  # once per process: long captions recur every epoch


def warn_truncated(what: str, count: int, total: int, limit: int) -> None:
  """Log (once per run) that `count` of `total` texts were cut to `limit` tokens, the tail dropped
  as the released code's Hugging Face tokenizer does (truncation=True, right side)."""
  global _warned_truncation
  if count and not _warned_truncation:
    _warned_truncation = True
    log.warning("%s: %d of %d texts exceed %d tokens and are truncated (the end is dropped, as in "
                "the released code); further truncations are not reported", what, count, total, limit)


def resolve_dtype(name) -> jnp.dtype:
  if name in DTYPES:
    return DTYPES[name]
  if name in DTYPES.values():
    return name
  raise ValueError(f"config.text.dtype={name!r} is not supported; expected one of {sorted(DTYPES)}")


# ----------------------------------------------------------------------------- local files

def require_dir(path: Optional[str], what: str, field: str = "config.text.path") -> str:
  """`path` if it is an existing directory, else a FileNotFoundError naming it and `field`."""
  if not path:
    raise FileNotFoundError(f"{field} is not set: {what} needs a directory, local or gs:// (nothing is downloaded)")
  if not fs.isdir(path):
    raise FileNotFoundError(f"{what} directory {str(path)!r} ({field}) does not exist or is not a directory")
  return fs.local_dir(path)  # read with local-file libraries: a gs:// directory is cached once


def require_file(directory: str, name: str, what: str, field: str = "config.text.path") -> str:
  path = os.path.join(directory, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what}: {path!r} is missing (the directory comes from {field})")
  return path


def read_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


# ----------------------------------------------------------------------------- tokenizers

def load_tokenizer(directory: str, what: str):
  """tokenizers.Tokenizer from `directory/tokenizer.json`, with its stored padding/truncation off
  (callers pad and truncate themselves, as the Hugging Face tokenizer call did)."""
  import tokenizers
  tok = tokenizers.Tokenizer.from_file(require_file(directory, "tokenizer.json", what))
  tok.no_padding()
  tok.no_truncation()
  return tok


def special_token(directory: str, key: str, default: Optional[str]) -> Optional[str]:
  """The text of a special token (`bos_token`, `pad_token`, ...) from tokenizer_config.json or
  special_tokens_map.json; entries may be strings or {"content": ...} dicts."""
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      value = read_json(path).get(key)
      if isinstance(value, dict):
        value = value.get("content")
      if value:
        return value
  return default


def token_id(tok, token: str, directory: str) -> int:
  idx = tok.token_to_id(token)
  if idx is None:
    raise ValueError(f"token {token!r} is not in {os.path.join(directory, 'tokenizer.json')}")
  return idx


def pad_batch(seqs: Sequence[Sequence[int]], length: int, pad_id: int) -> Dict[str, np.ndarray]:
  """Right-pad (already truncated) id lists to `length`: {'ids', 'mask'} int32 (B, length)."""
  ids = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    ids[i, :len(s)] = s
    mask[i, :len(s)] = 1
  return {"ids": ids, "mask": mask}


# ----------------------------------------------------------------------------- safetensors

class SafetensorsReader:
  """Lazy reader of a checkpoint directory: `model.safetensors`, a sharded set listed by
  `model.safetensors.index.json`, or any `*.safetensors` files. Tensors come back as numpy
  (bfloat16 through ml_dtypes). `prefixes` are stripped from key names when present
  ('model.' of Gemma2ForCausalLM, 'bert.' of BertFor*)."""

  def __init__(self, directory: str, what: str, prefixes: Sequence[str] = ()):
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
      files = sorted(set(read_json(index)["weight_map"].values()))
      files = [require_file(directory, f, f"{what} shard listed in {index}") for f in files]
    else:
      files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
      if not files:
        raise FileNotFoundError(f"{what}: no *.safetensors weights in {directory!r} "
                                "(the directory comes from config.text.path)")
    from safetensors import safe_open
    self._handles = [safe_open(f, framework="np") for f in files]
    self._where = {}
    for h in self._handles:
      for key in h.keys():
        name = key
        for p in prefixes:
          if name.startswith(p):
            name = name[len(p):]
            break
        self._where[name] = (h, key)

  def keys(self) -> Iterable[str]:
    return self._where.keys()

  def __contains__(self, key: str) -> bool:
    return key in self._where

  def get(self, key: str) -> np.ndarray:
    h, raw = self._where[key]
    return h.get_tensor(raw)


def hf_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  """A torch tensor in our layout: Linear weights (out, in) become NNX kernels (in, out)."""
  return value.T if leaf == "kernel" else value


def load_weights(model: nnx.Module, reader: SafetensorsReader, key_of: Callable[[tuple], Optional[str]],
                 *, num_layers: int, dtype, what: str, ignore: Callable[[str], bool] = lambda k: False):
  """Fill every variable of `model` (an abstract, eval_shape'd model) from `reader`, in place.

  `key_of(path)` gives the checkpoint key of a variable, with '{i}' for the layer index of the
  stacked blocks (their variables get a leading axis of `num_layers`), or None for variables
  that are not in the checkpoint. Every needed key must exist with the right shape and every
  checkpoint key must be used (unless `ignore`d); otherwise a ValueError lists the problems.
  """
  used, missing, bad = set(), [], []
  for path, var in nnx.iter_graph(model):
    if not isinstance(var, nnx.Variable):
      continue
    path = tuple(str(p) for p in path)
    template = key_of(path)
    if template is None:
      continue
    keys = [template.format(i=i) for i in range(num_layers)] if "{i}" in template else [template]
    used.update(k for k in keys if k in reader)
    if any(k not in reader for k in keys):
      missing += [k for k in keys if k not in reader]
      continue
    stacked = "{i}" in template
    want = tuple(var.get_value().shape)[1 if stacked else 0:]
    parts = [hf_layout(path[-1], reader.get(k)) for k in keys]
    wrong = [(k, p.shape) for k, p in zip(keys, parts) if p.shape != want]
    if wrong:
      bad += [f"{k}: {tuple(reversed(s)) if path[-1] == 'kernel' else s} in the checkpoint, "
              f"{tuple(reversed(want)) if path[-1] == 'kernel' else want} expected" for k, s in wrong]
      continue
    parts = [p.astype(dtype) for p in parts]
    var.set_value(jnp.asarray(np.stack(parts) if stacked else parts[0]))
  unexpected = sorted(k for k in reader.keys() if k not in used and not ignore(k))
  if missing or unexpected or bad:
    lines = [f"the checkpoint does not fit the {what} described by its config.json:"]
    for title, items in (("missing", sorted(missing)), ("unexpected", unexpected), ("wrong shape", bad)):
      if items:
        more = " ..." if len(items) > 12 else ""
        lines.append(f"  {len(items)} {title}: " + ", ".join(items[:12]) + more)
    raise ValueError("\n".join(lines))
  return model


def abstract(make: Callable[[], nnx.Module]) -> nnx.Module:
  """A model with shape-only variables (no random init: Gemma-2-2B would take minutes)."""
  return nnx.eval_shape(make)


# ----------------------------------------------------------------------------- the interface

class TextEncoder:
  """A frozen text encoder: host-side tokenisation plus a pure, jittable `encode_tokens`.

  Subclasses set `name`, `dim`, `length`, build the NNX model and implement `tokenize` and
  `_apply(model, ids, mask) -> (hidden (B, T, dim), mask (B, T))` with the output rule applied.
  `params` is the nnx.State of the model: pass it (or a sharded copy) to `encode_tokens`.
  """

  name: str = ""
  dim: int = 0
  length: int = 0

  def __init__(self, model: nnx.Module):
    self.graphdef, self.params = nnx.split(model)

  def tokenize(self, prompts: Sequence[str], *, null: bool = False) -> Dict[str, np.ndarray]:
    raise NotImplementedError

  def _apply(self, model, ids, mask):
    raise NotImplementedError

  def encode_tokens(self, params, ids, mask) -> tuple[jax.Array, jax.Array]:
    """(emb float32 (B, length, dim), mask int32 (B, length)); gradients never flow into it."""
    model = nnx.merge(self.graphdef, params)
    emb, mask = self._apply(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    return jax.lax.stop_gradient(emb.astype(jnp.float32)), mask.astype(jnp.int32)

  @functools.cached_property
  def _encode_jit(self):
    return jax.jit(self.encode_tokens)

  def encode(self, prompts: Sequence[str], *, null: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise on the host and run the (cached) jitted encoder: numpy (emb, mask)."""
    if isinstance(prompts, str):
      prompts = [prompts]
    tok = self.tokenize(list(prompts), null=null)
    emb, mask = self._encode_jit(self.params, tok["ids"], tok["mask"])
    return np.asarray(emb), np.asarray(mask)

  def encode_null(self, batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The unconditional embedding (the empty prompt under the null rule), repeated `batch` times."""
    emb, mask = self.encode([""], null=True)
    return np.repeat(emb, batch, axis=0), np.repeat(mask, batch, axis=0)

  def fingerprint(self) -> Dict[str, object]:
    """What makes two encoders' embeddings interchangeable (checked by the embedding cache)."""
    return {"encoder": self.name, "dim": int(self.dim), "length": int(self.length)}
