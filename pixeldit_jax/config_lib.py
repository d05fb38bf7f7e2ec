"""Experiment configs: ml_collections ConfigDicts built by ``configs/<name>.py:get_config(arg)``.

Config files take a variant string after a colon, parsed big_vision style:
``configs/imagenet256_xl.py:size=L,runlocal`` -> ``get_config("size=L,runlocal")``. Bare words are
booleans set to True. Command-line overrides use ``--config.model.dtype=bfloat16``.
Outside the repository the shipped configs are found by name: ``--config=fashion_mnist.py:steps=20``
(see ``resolve_config_path``).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import sys
from typing import Any, Optional, Sequence

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


def train_defaults() -> ml_collections.ConfigDict:
  """The released ImageNet recipe (spec §4); experiment configs override what differs."""
  return ml_collections.ConfigDict(dict(
      num_steps=1_600_000,
      optimizer="adamw", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0,
      grad_clip=1.0,
      # The paper steps LR 1e-4 -> 1e-5 and the clip 1.0 -> 0.5 after 160 epochs.
      step_down_step=config_dict.placeholder(int), lr_after_step_down=1e-5,
      grad_clip_after_step_down=0.5,
      # After warmup: "none" (constant, the paper), "cosine" or "linear" down to lr * lr_min_ratio
      # at num_steps.
      lr_decay="none", lr_min_ratio=0.0,
      ema_decay=0.9999, ema_warmup=False,
      time_shift=1.0, label_dropout=0.1,
      # Text-to-image only: feed the model the released trainer's integer timestep
      # trunc(1000 sigma) (False: the continuous 1000 sigma that sampling feeds).
      t2i_integer_timesteps=True,
      # CAME (T2I recipe, spec §7.2): optimizer="came" uses b1, b2, b3 and came_eps.
      b3=0.9999, came_eps=(1e-30, 1e-16),
      nonfinite_policy="stop",  # or "skip": drop the update and go on
      # With "skip": stop after this many consecutive skipped updates (0: never). Checked at each
      # log interval.
      max_consecutive_skips=20,
      # A workdir whose checkpoints all fail to restore stops the run; True sets them aside and
      # starts over from step 0.
      restart_if_unreadable=False,
      # A resume whose data differs from what the checkpoint records (source, split, size,
      # fingerprint: pixeldit_jax.data.identity) stops the run; True resumes on the new data.
      allow_data_change=False,
      # The workdir lock (<workdir>/run.lock) of a run whose heartbeat is older than this is
      # taken over (on the same host, a lock whose process is gone at once).
      lock_timeout_s=300.0,
      # Start a fresh run from another checkpoint's weights (fresh optimizer; the official
      # --load_from between T2I stages). Ignored when the workdir already has checkpoints.
      init_from=config_dict.placeholder(str),
      # LoRA fine-tuning (pixeldit_jax.model.lora): rank > 0 trains only low-rank adapters on the
      # targeted linears of the init_from checkpoint's weights (EMA item where it has one), which
      # stay frozen. alpha None = rank (scale alpha / rank = 1). Targets: attn, mlp, adaln (patch
      # level), pit_compaction, pit_attn, pixel_adaln (pixel level).
      lora=ml_collections.ConfigDict(dict(rank=0, alpha=config_dict.placeholder(float),
                                          targets=("attn", "mlp"))),
      sample_prompts=(),  # text-to-image grids: one row per prompt
      log_every=50, checkpoint_every=10_000, keep_checkpoints=3,
      sample_every=10_000, sample_steps=50, sample_cfg_scale=3.0, sample_cfg_interval=(0.1, 1.0),
      sample_rows=10, sample_per_row=10, sample_seed=0,
      peak_tflops=config_dict.placeholder(float),  # per device, for MFU; None: look up the device
      # A jax.profiler trace of num_steps steps (0: off), from when start_step steps are done,
      # into <workdir>/profile/ (TensorBoard's Profile tab).
      profile=ml_collections.ConfigDict(dict(start_step=10, num_steps=0)),
      # TensorBoard writer: "auto" (clu.metric_writers where TensorFlow imports, else
      # tensorboardX), "clu" or "tensorboardx".
      metric_writer="auto",
  ))


def sample_defaults() -> ml_collections.ConfigDict:
  """The sampling binary's settings: the released 320-epoch ImageNet-256 evaluation (spec §5.2)."""
  return ml_collections.ConfigDict(dict(
      sampler="ab2",  # the released "FlowDPMSolver"; also "euler", "heun", "heun_released"
      num_steps=100, cfg_scale=2.75, cfg_interval=(0.1, 0.9), time_shift=1.0,
      num_per_class=50,  # 50 x 1000 classes = the 50K-sample FID protocol
      batch_size=64,  # global; rounded up to a multiple of the batch devices
      seed=0,
  ))


def repa_defaults() -> ml_collections.ConfigDict:
  """REPA (spec §4.2, §7.2). Off unless weight > 0; the released recipes use 0.5."""
  return ml_collections.ConfigDict(dict(
      weight=0.0,
      block=8,  # 1-based: the student is the output of this patch (or MM-DiT) block
      projector_dim=config_dict.placeholder(int),  # hidden width; None: the model's D (C2I)
      teacher_dim=768,  # DINOv2 ViT-B/14
      teacher_path=config_dict.placeholder(str),  # HF model.safetensors (dir) or hub .pth
      teacher_size=config_dict.placeholder(tuple),  # teacher input (H, W); None: 14 H/16 x 14 W/16
      teacher_dtype="bfloat16",
      loss_form="c2i",  # "c2i": mean(1 - cos), pooled student; "t2i": -mean(cos) (pixeldit_jax.train.repa)
      features_path=config_dict.placeholder(str),  # precomputed teacher features instead of a teacher
  ))


def sharding_defaults() -> ml_collections.ConfigDict:
  from pixeldit_jax import sharding  # noqa: PLC0415 - keeps config files light to import
  return ml_collections.ConfigDict(dict(
      mesh_shape=(1, -1, 1),  # (data, fsdp, tensor); -1 takes the remaining devices: FSDP
      # Multi-slice TPU jobs: slices per axis over DCN, e.g. (2, 1, 1); mesh_shape is then per slice.
      dcn_mesh_shape=(1, 1, 1),
      rules=sharding.DEFAULT_RULES))


def base_config() -> ml_collections.ConfigDict:
  """Fields every experiment has; config files fill them in."""
  from pixeldit_jax import data  # noqa: PLC0415
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.image_size = (256, 256)  # (H, W); both divisible by the patch size
  c.model = model_dict(PixelDiTConfig())
  c.batch_size = 256  # global batch
  c.train = train_defaults()
  c.sharding = sharding_defaults()
  c.data = data.default_data_config()
  c.sample = sample_defaults()
  c.repa = repa_defaults()
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Clear errors for a bad experiment config, before anything is built."""
  cfg = model_config(config)
  errors = []
  h, w = config.image_size
  if h % cfg.patch_size or w % cfg.patch_size:
    errors.append(f"image_size {tuple(config.image_size)} is not divisible by patch_size {cfg.patch_size}")
  t = config.train
  if t.nonfinite_policy not in ("stop", "skip"):
    errors.append(f"train.nonfinite_policy must be 'stop' or 'skip', got {t.nonfinite_policy!r}")
  for key in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "batch_size"):
    value = config.batch_size if key == "batch_size" else t[key]
    if value <= 0:
      errors.append(f"{key} must be positive, got {value}")
  if t.get("metric_writer", "auto") not in ("auto", "clu", "tensorboardx"):
    errors.append(f"train.metric_writer must be 'auto', 'clu' or 'tensorboardx', got {t.metric_writer!r}")
  if t.get("profile") is not None and (t.profile.num_steps < 0 or t.profile.start_step < 0):
    errors.append("train.profile.start_step and train.profile.num_steps must be >= 0")
  if t.get("max_consecutive_skips", 0) < 0:
    errors.append(f"train.max_consecutive_skips must be >= 0, got {t.max_consecutive_skips}")
  if t.get("lock_timeout_s", 1.0) <= 0:
    errors.append(f"train.lock_timeout_s must be positive, got {t.lock_timeout_s}")
  if not 0.0 <= t.ema_decay < 1.0:
    errors.append(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
  from pixeldit_jax.diffusion.samplers import SAMPLERS, SIGMA_SAMPLERS  # noqa: PLC0415
  text_to_image = config.model.get("text_dim") is not None
  allowed = SIGMA_SAMPLERS if text_to_image else SAMPLERS
  if config.sample.sampler not in allowed:
    errors.append(f"sample.sampler must be one of {allowed} for this "
                  f"{'text-to-image' if text_to_image else 'class-conditional'} model (its time "
                  f"convention), got {config.sample.sampler!r}")
  if text_to_image and "text" not in config:
    errors.append("a text-to-image model needs a `text` section (pixeldit_jax.text.text_config_defaults())")
  from pixeldit_jax.train.optimizer import LR_DECAYS  # noqa: PLC0415
  if t.get("lr_decay", "none") not in LR_DECAYS:
    errors.append(f"train.lr_decay must be one of {LR_DECAYS}, got {t.lr_decay!r}")
  if not 0.0 <= t.get("lr_min_ratio", 0.0) <= 1.0:
    errors.append(f"train.lr_min_ratio must be in [0, 1], got {t.lr_min_ratio}")
  if t.optimizer not in ("adamw", "came"):
    errors.append(f"train.optimizer must be 'adamw' or 'came', got {t.optimizer!r}")
  lcfg = t.get("lora")
  if lcfg is not None and lcfg.rank < 0:
    errors.append(f"train.lora.rank must be >= 0, got {lcfg.rank}")
  if lcfg is not None and lcfg.rank > 0:
    from pixeldit_jax.model.lora import TARGETS  # noqa: PLC0415
    unknown = [x for x in lcfg.targets if x not in TARGETS]
    if unknown or not lcfg.targets:
      errors.append(f"train.lora.targets {tuple(lcfg.targets)}: choose from {tuple(TARGETS)}")
    if not t.get("init_from"):
      errors.append("train.lora.rank > 0 adapts a trained or imported model: set "
                    "--config.train.init_from=CHECKPOINT_DIR (the base weights, kept frozen)")
    if lcfg.get("alpha") is not None and lcfg.alpha <= 0:
      errors.append(f"train.lora.alpha must be positive, got {lcfg.alpha}")
  r = config.get("repa")
  if r is not None and r.weight > 0:
    from pixeldit_jax.train.repa import LOSS_FORMS  # noqa: PLC0415
    if not 1 <= r.block <= cfg.patch_depth:
      errors.append(f"repa.block {r.block} is outside the model's patch blocks 1..{cfg.patch_depth}")
    if r.loss_form not in LOSS_FORMS:
      errors.append(f"repa.loss_form must be one of {LOSS_FORMS}, got {r.loss_form!r}")
    size = tuple(r.teacher_size) if r.get("teacher_size") else (14 * h // cfg.patch_size, 14 * w // cfg.patch_size)
    if size[0] % 14 or size[1] % 14:
      errors.append(f"repa.teacher_size {size} is not divisible by the teacher's patch size 14")
  elif r is not None and r.weight < 0:
    errors.append(f"repa.weight must be >= 0, got {r.weight}")
  if config.sample.num_steps <= 0 or config.sample.num_per_class <= 0:
    errors.append("sample.num_steps and sample.num_per_class must be positive")
  if errors:
    raise ValueError("Invalid config:\n  - " + "\n  - ".join(errors))


def packaged_configs_dir() -> Optional[str]:
  """The shipped configs: the installed package pixeldit_jax.configs, or a source checkout's configs/."""
  spec = importlib.util.find_spec("pixeldit_jax.configs")
  if spec is not None and spec.submodule_search_locations:
    return list(spec.submodule_search_locations)[0]
  checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  return checkout if os.path.isdir(checkout) else None


def resolve_config_path(spec: str) -> str:
  """'path[:arg]' with a path that is not there but names a shipped config -> that file's path[:arg].

  'fashion_mnist', 'fashion_mnist.py' and 'configs/fashion_mnist.py' all name the shipped
  configs/fashion_mnist.py, so installed users need no checkout. An existing local file always
  wins; any other spec is returned unchanged, to fail with the usual missing-file error.
  """
  path, sep, arg = spec.partition(":")
  if not path or os.path.exists(path):
    return spec
  folder, name = os.path.split(os.path.normpath(path))
  if folder not in ("", "configs"):
    return spec
  name = name if name.endswith(".py") else name + ".py"
  directory = packaged_configs_dir()
  if directory is None or name == "__init__.py" or not os.path.isfile(os.path.join(directory, name)):
    return spec
  return os.path.join(directory, name) + sep + arg


def resolve_config_argv(argv: Sequence[str], flag: str = "config") -> list[str]:
  """argv with the value of --<flag>=X / --<flag> X (one or two dashes) passed through resolve_config_path."""
  out = list(argv)
  i = 1
  while i < len(out):
    if out[i] == "--":  # absl stops parsing flags here
      break
    m = re.fullmatch(rf"(--?{re.escape(flag)}=)(.*)", out[i], re.DOTALL)
    if m:
      out[i] = m.group(1) + resolve_config_path(m.group(2))
    elif out[i] in (f"-{flag}", f"--{flag}") and i + 1 < len(out):
      out[i + 1] = resolve_config_path(out[i + 1])
      i += 1
    i += 1
  return out


def define_config_file(name: str, default: Optional[str], help_string: str):
  """config_flags.DEFINE_config_file that also takes shipped config names (resolve_config_path).

  Call it where the flags are defined, before app.run: it rewrites sys.argv in place, since
  ml_collections reads the overrides of the config flag from sys.argv. A --config inside a
  --flagfile is not resolved.
  """
  from ml_collections import config_flags  # noqa: PLC0415 - only the entry points need absl flags
  sys.argv[:] = resolve_config_argv(sys.argv, name)
  return config_flags.DEFINE_config_file(name, resolve_config_path(default) if default else None,
                                         help_string)


def load(spec: str) -> ml_collections.ConfigDict:
  """Load 'path/to/config.py[:variant]' (or a shipped name) outside absl flags (tests, notebooks, tools)."""
  path, _, arg = resolve_config_path(spec).partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No config file {path!r}")
  module_spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()
