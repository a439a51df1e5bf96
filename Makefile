# mcad developer commands. `make train` and `make test` work on a fresh clone (they install first).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install train test test-fast lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $@

## The embedded default: RD on the procedural dataset with offline Lite0 weights, on CPU.
train: install
	$(PY) train.py experiment=quickstart $(ARGS)

## The whole test suite, slow (real-data, multi-process) tests included. CI runs exactly this.
test: install
	$(PY) -m pytest -q $(ARGS)

## Only the fast tests.
test-fast: install
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: install
	$(VENV)/bin/ruff check src tests experiments train.py
	$(VENV)/bin/ruff format --check src tests experiments train.py
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix src tests experiments train.py
	$(VENV)/bin/ruff format src tests experiments train.py

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
