# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs. Tests pin the torch version; the package itself
# accepts a range (pyproject.toml). The default index serves the CUDA build of torch on Linux (a
# multi-GB download); for the CPU-only build, point pip at PyTorch's CPU wheel index:
#   make test PIP_EXTRA="--index-url https://download.pytorch.org/whl/cpu"
# PIP_EXTRA applies to the torch install only (the other packages come from the default index).
# `make test` runs `make lint` (ruff check, ruff format --check, mypy on cka/) before the tests (LINT=0 skips it).
PYTHON ?= python3
PIP_EXTRA ?=
LINT ?= 1
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
# the transformers the tests build their tiny BERT / GPT-2 / Llama / ViT models with (pure Python)
TRANSFORMERS_PIN := transformers==5.23.0

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# this package was distributed as `cka` before (a name taken on the index): drop that install
	-$(PY) -m pip uninstall -q -y cka 2>/dev/null
	$(PY) -m pip install -q $(PIP_EXTRA) "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[torch,jax,onnx,plot,dev,hf]" "$(TORCH_PIN)" "$(TRANSFORMERS_PIN)"
	# the predecessor, for compatibility tests only; its wheel declares no dependencies (--no-deps guards it)
	$(PY) -m pip install -q --no-deps torch-cka==0.21
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/cka demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check cka
	$(VENV)/bin/ruff format --check cka
	$(VENV)/bin/mypy cka

test: $(VENV)/.installed $(if $(filter 1,$(LINT)),lint)
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: $(VENV)/.installed
	$(PY) benchmarks/core.py
	$(PY) benchmarks/compare_models.py
	$(PY) benchmarks/onnx_bench.py
	$(PY) benchmarks/jax_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
