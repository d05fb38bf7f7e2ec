"""Per-program XLA compiler options (``jax.jit(..., compiler_options=...)``).

Sampling on the CPU: XLA:CPU hands matrix products to the YNNPACK library, by default fused with
their elementwise neighbours into one library subgraph (the PiT block's attention output, residual,
RMSNorm, modulation, GELU MLP and output head became one 7.5 ms subgraph at 64^2, ~3x its
products' time). With each product handed over on its own and the elementwise work left to XLA's
loop fusions, the sampling forward is 7% faster at 64^2 (batch 8) and 2-4% at 256^2 (batch 2).
The training step is the other way round (the default is 10-15% faster there), so this is set per
program, on the sampling programs only. Other backends get no options.
"""

from __future__ import annotations

import functools

import jax

_YNN_PRODUCTS_ALONE = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.cache
def _accepted(options: tuple) -> bool:
  """Whether this jaxlib's CPU compiler knows the options (they are experimental flags: a later
  release may rename them, and then the program compiles with the defaults)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(1.0).compile()
    return True
  except Exception:  # noqa: BLE001 - any refusal means: do not use them
    return False


def sampling() -> dict:
  """Options for the sampling programs (model forward, no gradient) on the default backend."""
  if jax.default_backend() != "cpu" or not _accepted(tuple(_YNN_PRODUCTS_ALONE.items())):
    return {}
  return dict(_YNN_PRODUCTS_ALONE)
