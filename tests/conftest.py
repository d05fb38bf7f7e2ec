import hashlib
import os
import sys

import pytest

import skip_guard  # tests/ is on sys.path: pytest puts the conftest's directory there

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# Tests import the package from the checkout, installed or not.
sys.path.insert(0, REPO)

# The 2048-d Fréchet distances of the evaluation tests slow down ~10x when BLAS threads compete
# with other processes on a 2-core machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# CPU compiles dominate the suite's time; XLA's backend optimisation level 0 halves them and does
# not change what is computed. Benchmarks and real runs keep the default level.
# CPU only, for this process and every subprocess: with libtpu installed (the [aot] extra, in the
# dev requirements) JAX would otherwise probe for a TPU at start-up, and while another process
# holds libtpu (test_aot under xdist) that probe prints native warnings into the tested output.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

from pixeldit_jax.data import fashion_mnist, fmnist_standin  # noqa: E402

# The persistent compilation cache makes every program that is
# compiled twice (the same model built in several tests, a rerun of the suite) compile once.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("PIXELDIT_TEST_JAX_CACHE", os.path.join(REPO, ".jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _fashion_mnist_for_tests() -> tuple[str, str]:
  """(directory, kind) of the Fashion-MNIST the tests read: the installed one, else a generated
  stand-in, set in the environment so that subprocesses read it too. The stand-in's directory is
  named by the generator's hash, so an edited generator writes a new one."""
  if all(fashion_mnist.fashion_mnist_available(split=s) for s in ("train", "test")):
    return fashion_mnist.default_dir(), "installed"
  with open(fmnist_standin.__file__, "rb") as f:
    version = hashlib.md5(f.read()).hexdigest()[:10]
  directory = os.path.join(os.environ.get("PIXELDIT_TEST_DATA", os.path.join(REPO, ".test_data")),
                           f"fashion-mnist-standin-{version}")
  os.environ[fashion_mnist.DIR_ENV] = fmnist_standin.write(directory)
  return directory, "synthetic stand-in: the Debian package dataset-fashion-mnist is not installed"


FASHION_MNIST, FASHION_MNIST_KIND = _fashion_mnist_for_tests()

# Config paths in tests are relative to the repository root.
os.chdir(REPO)


def pytest_configure(config):
  skip_guard.register(config)  # a test skipped outside its allowed list fails the run


# The longest test files (seconds of test time on the 2-core CI machine, 2026-11-29), started
# first: `make test` hands whole files to its 2 xdist workers in collection order (--dist loadfile),
# and in alphabetical order test_train.py (160 s) started last, so one worker ran ~90 s alone at
# the end. Longest first, the two finish within seconds of each other.
SLOW_FILES_FIRST = ("test_train.py", "test_multiprocess.py", "test_repa.py", "test_notebooks.py",
                    "test_gcs.py", "test_cli.py", "test_evaluation.py", "test_vs_official.py", "test_aot.py",
                    "test_logging.py", "test_device_check.py", "test_model.py", "test_lora.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


def pytest_terminal_summary(terminalreporter):
  terminalreporter.write_line(f"Fashion-MNIST in these tests: {FASHION_MNIST} ({FASHION_MNIST_KIND})")


@pytest.fixture(scope="session")
def fmnist_quick_classifier(tmp_path_factory):
  """(classifier, cache_dir): the Fashion-MNIST CNN trained for FMNIST_QUICK_STEPS through
  load_or_train's train-and-save path, once per session (the metric and the T2I garment tests)."""
  from helpers import FMNIST_QUICK_STEPS  # noqa: PLC0415
  from pixeldit_jax.evaluation import fmnist_classifier as clf_lib  # noqa: PLC0415
  cache_dir = str(tmp_path_factory.mktemp("fmnist_classifier"))
  classifier = clf_lib.load_or_train(cache_dir, clf_lib.TrainSettings(max_steps=FMNIST_QUICK_STEPS),
                                     progress=False)
  return classifier, cache_dir
