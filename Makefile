# `make serve` and `make test` each set up .venv and run; see README.md.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := .demo/tiny

.PHONY: setup serve test clean

# harmony's o200k vocabulary: a local copy when one sits beside the checkout (offline machines);
# otherwise openai-harmony downloads it on first use
ifeq ($(TIKTOKEN_ENCODINGS_BASE),)
ifneq ($(wildcard ../shared/vocab/*.tiktoken),)
export TIKTOKEN_ENCODINGS_BASE := $(abspath ../shared/vocab)
endif
endif

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# On CPU-only machines torch==2.13.0 resolves to the local CPU wheel; install it
	# first so nothing below pulls the CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(BIN)/gptoss serve --model demo

# The CPU-bound kernel, engine and model tests run on every core (pytest-xdist, one torch thread a
# worker); then the rest, which start Ray clusters and servers with timing-sensitive checks, on their own.
# Both always run; `make test` fails if either does.
ON_EVERY_CORE := tests/kernels tests/engine tests/models

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto $(ON_EVERY_CORE); a=$$?; \
	$(BIN)/python -m pytest -q $(addprefix --ignore=,$(ON_EVERY_CORE)); b=$$?; \
	test $$a -eq 0 && test $$b -eq 0

clean:
	rm -rf $(VENV) .demo
