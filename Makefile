# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs. Tests pin the CPU build of torch (an unpinned torch
# pulls a multi-GB CUDA build); the package itself accepts a range (pyproject.toml).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[torch,jax,onnx,plot,dev]" "$(TORCH_PIN)"
	# the predecessor, for compatibility tests only; its wheel declares no dependencies (--no-deps guards it)
	$(PY) -m pip install -q --no-deps torch-cka==0.21
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/cka demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: $(VENV)/.installed
	$(PY) benchmarks/core.py
	$(PY) benchmarks/compare_models.py
	$(PY) benchmarks/onnx_bench.py
	$(PY) benchmarks/jax_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
