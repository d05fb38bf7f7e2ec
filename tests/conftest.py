import os
import sys

# Tests import the package from the checkout, installed or not.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

# The 2048-d Fréchet distances of the evaluation tests slow down ~10x when BLAS threads compete
# with other processes on a 2-core machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# CPU compiles dominate the suite's time; XLA's backend optimisation level 0 halves them and does
# not change what is computed. Benchmarks and real runs keep the default level.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

# The persistent compilation cache makes every program that is
# compiled twice (the same model built in several tests, a rerun of the suite) compile once.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("PIXELDIT_TEST_JAX_CACHE",
                                 os.path.join(os.path.dirname(__file__), "..", ".jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# Config paths in tests are relative to the repository root.
os.chdir(os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
