"""Config files, variants and overrides; the entry point's model check; distributed start-up."""

import json
import os

import pytest

from pixeldit_jax import config_lib
from pixeldit_jax.main import check_model

CONFIGS = ["configs/fashion_mnist.py", "configs/imagenet256_xl.py", "configs/imagenet512_xl.py",
           "configs/tiny.py", "configs/tiny.py:size=small", "configs/t2i_1024.py", "configs/t2i_1024.py:stage1",
           "configs/t2i_1024.py:stage2", "configs/t2i_1024.py:smoke", "configs/t2i_fmnist.py"]


@pytest.mark.parametrize("spec", CONFIGS)
def test_every_config_builds_a_valid_model_config(spec):
  config = config_lib.load(spec)
  cfg = config_lib.model_config(config)
  h, w = config.image_size
  assert h % cfg.patch_size == 0 and w % cfg.patch_size == 0


def test_variants_and_their_errors():
  assert config_lib.model_config(config_lib.load("configs/imagenet256_xl.py:size=B")).hidden_size == 768
  with pytest.raises(ValueError, match="Unknown config variant key 'sise'"):
    config_lib.load("configs/imagenet256_xl.py:sise=B")
  with pytest.raises(ValueError, match="Unknown PixelDiT size"):
    config_lib.load("configs/imagenet256_xl.py:size=XXL")
  v = config_lib.parse_variant("res=512,lr=1e-4,runlocal,name=abc", res=256, lr=0.0, runlocal=False, name="")
  assert (v.res, v.lr, v.runlocal, v.name) == (512, 1e-4, True, "abc")


def test_optional_model_fields_are_overridable_placeholders():
  config = config_lib.load("configs/fashion_mnist.py")
  config.model.pixel_attn_size = 64
  config.model.attention_impl = "xla"
  cfg = config_lib.model_config(config)
  assert cfg.attn_size == 64 and cfg.attention_impl == "xla"
  config.model.pixel_adaln = "bogus"
  with pytest.raises(ValueError, match="pixel_adaln"):
    config_lib.model_config(config)


def test_model_check_runs_forward_and_backward_and_writes_a_report(tmp_path):
  config = config_lib.load("configs/fashion_mnist.py")
  config.batch_size = 2
  report = check_model(config, str(tmp_path))  # the --check_model path of main
  assert report["batch"] == 2 and report["image_size"] == [28, 28]
  assert report["loss"] > 0 and report["grad_norm"] > 0
  saved = json.loads((tmp_path / "model_check.json").read_text())
  assert saved["params"] == report["params"] > 1e6
  t2i = check_model(config_lib.load("configs/t2i_1024.py:smoke"), str(tmp_path / "t2i"))  # text embeddings
  assert t2i["loss"] > 0 and t2i["grad_norm"] > 0


def test_experiment_config_validation():
  config = config_lib.load("configs/fashion_mnist.py")
  config_lib.validate(config)
  config.image_size = (30, 28)
  config.train.nonfinite_policy = "ignore"
  config.train.ema_decay = 1.0
  with pytest.raises(ValueError) as e:
    config_lib.validate(config)
  for text in ("not divisible by patch_size 4", "nonfinite_policy", "ema_decay"):
    assert text in str(e.value)


def test_imagenet_recipes():
  c256 = config_lib.load("configs/imagenet256_xl.py")
  assert (c256.batch_size, c256.train.lr, c256.train.grad_clip, c256.train.ema_decay) == (256, 1e-4, 1.0, 0.9999)
  assert c256.train.num_steps == 2 * c256.train.step_down_step  # step-down after 160 of 320 epochs
  assert c256.model.dtype == "bfloat16" and c256.data.source == "imagenet"
  c512 = config_lib.load("configs/imagenet512_xl.py")
  assert (c512.train.time_shift, c512.train.grad_clip) == (3.0, 0.5)
