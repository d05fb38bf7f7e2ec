"""Per-program compiler options: the sampling programs' CPU option takes effect, keeps the values,
and an option the installed jaxlib refuses is dropped rather than breaking sampling."""

import os
import re

import jax
from flax import nnx

from helpers import inputs, max_abs, perturb
from pixeldit_jax import config_lib, xla_options
from pixeldit_jax.model import build


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _products_per_library_fusion(hlo: str) -> list[int]:
  """Number of dots inside each fused computation that XLA:CPU handed to YNNPACK."""
  bodies = dict(re.findall(r"^(%\S+) .*?\{\n(.*?)\n\}", hlo, re.S | re.M))
  calls = re.findall(r'fusion\(.*?calls=(%[\w.\-]+).*?"kind":"__ynn_fusion"', hlo)
  return [len(re.findall(r"= f32\[[^\]]*\]\{[^}]*\} dot\(", bodies[c])) for c in calls if c in bodies]


def test_sampling_programs_hand_each_product_to_the_library_alone():
  assert jax.default_backend() == "cpu"
  options = xla_options.sampling()
  assert options == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
  # configs/tiny.py's benchmark model (64^2, hidden 256), where the default fuses across products
  cfg = config_lib.model_config(config_lib.load(f"{ROOT}/configs/tiny.py"))
  graphdef, params = nnx.split(perturb(build(cfg)))
  args = (params, *inputs(cfg, batch=2, height=64, width=64))
  fwd = lambda p, x, t, y: nnx.merge(graphdef, p)(x, t, y)
  default, sampling = jax.jit(fwd), jax.jit(fwd, compiler_options=options)
  per_default = _products_per_library_fusion(default.lower(*args).compile().as_text())
  per_sampling = _products_per_library_fusion(sampling.lower(*args).compile().as_text())
  # By default XLA:CPU fuses several products (and their elementwise neighbours) into one
  # library call; under the sampling option every library call holds exactly one product.
  assert max(per_default) > 1
  assert per_sampling and set(per_sampling) == {1}
  assert max_abs(default(*args), sampling(*args)) < 1e-5


def test_an_option_the_compiler_refuses_is_dropped():
  assert not xla_options._accepted((("xla_cpu_experimental_ynn_fusion_type", "NO_SUCH_FUSION"),))
  assert xla_options._accepted(tuple(xla_options._YNN_PRODUCTS_ALONE.items()))
