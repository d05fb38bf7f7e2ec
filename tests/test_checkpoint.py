"""checkpoint.load_model on a checkpoint written from other devices than the reader's."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from helpers import TINY, timeout
from pixeldit_jax import checkpoint as ckpt_lib

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# A model's weights sharded FSDP over 4 devices, saved as the trainer saves EMA weights.
WRITE = """
import json, sys
import jax, numpy as np
from flax import nnx
from pixeldit_jax import checkpoint as ckpt_lib, sharding
from pixeldit_jax.model import PixelDiTConfig, build
directory, tiny = sys.argv[1], json.loads(sys.argv[2])
cfg = PixelDiTConfig(**tiny)
mesh = sharding.make_mesh((1, 4, 1))
with nnx.use_eager_sharding(False):  # built on one device, then placed as the trainer places it
  model = build(cfg, seed=3)
params = ckpt_lib.param_dict(model)
specs = sharding.param_specs(model, mesh, sharding.DEFAULT_RULES)
params = jax.device_put(params, sharding.named(mesh, specs))
kernel = params["patch_embed"]["proj"]["kernel"]
assert len(kernel.sharding.device_set) == 4 and not kernel.sharding.is_fully_replicated
ckpt_lib.save_weights(directory, 7, {ckpt_lib.EMA_PARAMS: params}, {"model": cfg.to_dict()})
np.save(directory + "_kernel.npy", np.asarray(kernel))
"""


def test_load_model_reads_a_checkpoint_sharded_over_other_devices(tmp_path):
  directory = str(tmp_path / "ckpt")
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")
  out = subprocess.run([sys.executable, "-c", WRITE, directory, json.dumps(TINY)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout(300))
  assert out.returncode == 0, out.stderr[-3000:]
  assert jax.device_count() == 1  # this process: one device
  model, meta = ckpt_lib.load_model(directory)
  kernel = model.patch_embed.proj.kernel[...]
  np.testing.assert_array_equal(np.asarray(kernel), np.load(directory + "_kernel.npy"))
  assert kernel.sharding.device_set == {jax.local_devices()[0]}
  assert meta["model"]["hidden_size"] == TINY["hidden_size"]
