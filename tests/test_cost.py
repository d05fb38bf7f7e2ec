"""Parameter counts (from nnx.eval_shape, never materialised) and analytic FLOPs (spec §6)."""

import jax
import pytest

from pixeldit_jax import config_lib
from pixeldit_jax.model import PixelDiTConfig, abstract, preset
from pixeldit_jax.model.cost import count_params, forward_flops, param_breakdown, train_step_flops


@pytest.mark.parametrize("size,expected_m", [("B", 184.75), ("L", 569.65), ("XL", 797.38)])
def test_paper_parameter_counts(size, expected_m):
  model = abstract(preset(size))
  leaves = jax.tree.leaves(model)
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
  assert round(count_params(model) / 1e6, 2) == expected_m


def test_xl_breakdown_matches_spec():
  parts = param_breakdown(abstract(preset("XL")))
  assert round(parts["patch_blocks"] / 1e6) == 621
  assert round(parts["pixel_blocks"] / 1e6) == 172
  per_block_pixel_adaln = 1152 * 256 * 6 * 16 + 256 * 6 * 16
  assert round(4 * per_block_pixel_adaln / 1e6) == 113


@pytest.mark.parametrize("config_file,expected_m", [("configs/imagenet256_xl.py", 797.38),
                                                    ("configs/imagenet256_xl.py:size=B", 184.75),
                                                    ("configs/imagenet256_xl.py:size=L", 569.65),
                                                    ("configs/imagenet512_xl.py", 797.38)])
def test_config_files_build_paper_sizes(config_file, expected_m):
  cfg = config_lib.model_config(config_lib.load(config_file))
  assert round(count_params(abstract(cfg)) / 1e6, 2) == expected_m


def test_xl_256_forward_gflops_is_311_2():
  assert round(forward_flops(preset("XL"), 256, 256)["total"] / 1e9, 1) == 311.2


@pytest.mark.parametrize("size,res,gflops", [("B", 256, 75), ("L", 256, 228), ("XL", 512, 1352)])
def test_other_sizes_gflops(size, res, gflops):
  assert round(forward_flops(preset(size), res, res)["total"] / 1e9) == gflops


def test_without_compaction_xl_costs_82247_gflops():
  # Paper Table 6: the dual-level model without compaction needs 82 247 GFLOPs at 256^2.
  assert round(forward_flops(preset("XL", pixel_compaction=False), 256, 256)["total"] / 1e9) == 82247


def test_flops_components_and_train_step():
  cfg = PixelDiTConfig(patch_size=4, hidden_size=32, num_heads=2, patch_depth=1, pixel_depth=1,
                       pixel_hidden_size=8, num_classes=5)
  f = forward_flops(cfg, 8, 8)
  L, d, px = 4, 32, 64
  assert f["patch_embed"] == 2 * L * 48 * d
  assert f["patch_blocks"] == 2 * d * 6 * d + 2 * L * d * 4 * d + 4 * L * L * d + 3 * 2 * L * d * cfg.swiglu_hidden
  assert f["pixel_blocks"] == (2 * L * d * 16 * 6 * 8 + 2 * 2 * L * 128 * d + 2 * L * d * 4 * d
                               + 4 * L * L * d + 2 * 2 * px * 8 * 32)
  assert f["total"] == sum(v for k, v in f.items() if k != "total")
  assert train_step_flops(cfg, 8, 8, batch=4) == 12 * f["total"]
  # Patch-only model: no pixel-level terms.
  assert "pixel_blocks" not in forward_flops(PixelDiTConfig(pixel_depth=0), 256, 256)
