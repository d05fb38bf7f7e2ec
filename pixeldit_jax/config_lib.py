"""Experiment configs: ml_collections ConfigDicts built by ``configs/<name>.py:get_config(arg)``.

Config files take a variant string after a colon, parsed big_vision style:
``configs/imagenet256_xl.py:size=L,runlocal`` -> ``get_config("size=L,runlocal")``. Bare words are
booleans set to True. Command-line overrides use ``--config.model.dtype=bfloat16``.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any

import ml_collections
from ml_collections import config_dict

from pixeldit_jax.model.config import PixelDiTConfig


def parse_variant(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """'size=L,res=512,runlocal' -> ConfigDict(size='L', res=512, runlocal=True) over defaults.

  Values are parsed as Python literals where possible (512, 1e-4, (1, 2)), else kept as strings.
  Keys not in `defaults` are rejected, so a typo in a variant fails loudly.
  """
  out = dict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"Unknown config variant key {key!r}; known: {sorted(defaults)}")
    if not sep:
      out[key] = True
      continue
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return ml_collections.ConfigDict(out)


def model_dict(cfg: PixelDiTConfig) -> ml_collections.ConfigDict:
  """A model config as a ConfigDict; Optional fields become typed placeholders (overridable)."""
  d = ml_collections.ConfigDict()
  for key, value in cfg.to_dict().items():
    if value is None:
      value = config_dict.placeholder(str if key == "attention_impl" else int)
    d[key] = value
  return d


def model_config(config: ml_collections.ConfigDict) -> PixelDiTConfig:
  """The experiment's model section as a validated PixelDiTConfig."""
  return PixelDiTConfig.from_dict(config.model.to_dict())


def base_config() -> ml_collections.ConfigDict:
  """Fields every experiment has; config files fill them in."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.image_size = (256, 256)  # (H, W); both divisible by the patch size
  c.model = model_dict(PixelDiTConfig())
  c.batch_size = 256  # global batch
  return c


def load(spec: str) -> ml_collections.ConfigDict:
  """Load 'path/to/config.py[:variant]' outside absl flags (tests, notebooks, tools)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No config file {path!r}")
  module_spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()
