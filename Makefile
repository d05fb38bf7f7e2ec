# Two commands set everything up on a fresh machine (Python 3.11, no GPU):
#   make test   create .venv from requirements*.txt, then run the test suite
#   make demo   same environment, then run the embedded default job (configs/fashion_mnist.py)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch (CPU) is optional: only the official-checkpoint importer and its tests use it. It is
# installed from a local wheel when one is there, never pulled from the index (a CUDA build).
TORCH_WHEEL ?= $(firstword $(wildcard /opt/wheels/torch-*+cpu-cp311-*.whl))
PYTEST_ARGS ?=

.PHONY: venv test demo bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check uv
	$(VENV)/bin/uv pip install -q --python $(PY) -r requirements.txt -r requirements-dev.txt
	@if [ -n "$(TORCH_WHEEL)" ]; then \
	  echo "Installing optional torch from $(TORCH_WHEEL)"; \
	  $(VENV)/bin/uv pip install -q --python $(PY) "$(TORCH_WHEEL)"; \
	else echo "No local torch wheel: tests of the torch checkpoint reader will be skipped"; fi
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

demo: venv
	$(PY) -m pixeldit_jax.main --config=configs/fashion_mnist.py --workdir=workdir/demo

bench: venv
	$(PY) bench/model_cost.py

clean:
	rm -rf $(VENV) .pytest_cache workdir
