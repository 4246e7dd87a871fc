# Two commands do everything on a fresh machine (see README.md):
#   make demo   - set up .venv (once) and run the shipped default job
#   make test   - set up .venv (once) and run the test suite
#   make test-fast - the same, without the tests marked slow (a minute or two)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch/torchvision pair known to load together here; override e.g. TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
CONFIG ?= configs/ants_bees_lite0.yaml
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/python trainer/main.py --config $(CONFIG)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" -q $(PYTEST_ARGS)

clean:
	rm -rf runs data/shards
