# Quick start: `make demo` and `make test`; each builds .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench gpu-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test,demo]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m bigtransfer demo

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks tools hubconf.py

test: lint
	$(PY) -m pytest -q

# Ours vs HF transformers vs onnxruntime on our export, the matmul limit and issue 14's targets: a few minutes.
bench: $(STAMP)
	$(PY) benchmarks/bench_models.py --quick --no-memory

# On a GPU machine (python3 with torch; bigtransfer need not be installed): CUDA tests, then the GPU benchmark.
gpu-check:
	bash tools/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
