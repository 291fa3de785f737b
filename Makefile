# orderflow — every target creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench
MUTATION_STAMP := $(VENV)/.installed-mutation

.PHONY: run test lint typecheck pytest bench demo soak mutation clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

$(MUTATION_STAMP): pyproject.toml $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,mutation]'
	touch $(MUTATION_STAMP)

## run: start the whole system on embedded defaults (Ctrl-C stops it)
run: $(STAMP)
	$(BIN)/orderflow up

## test: lint, types and the whole test suite against real servers it starts itself
test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests examples bench
	$(BIN)/ruff format --check src tests examples bench

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

## bench: throughput, latency and memory side by side with the baselines
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench $(if $(QUICK),--quick,)

## demo: the lab's story through the real system
demo: $(STAMP)
	$(BIN)/orderflow demo

## soak: the long chaos run
soak: $(STAMP)
	ORDERFLOW_SOAK=1 $(BIN)/pytest -m chaos $(PYTEST_ARGS)

## mutation: mutmut over the core with its targeted tests (MODULE=ledger for one; docs/MUTATION.md)
mutation: $(MUTATION_STAMP)
	nice -n 10 $(BIN)/python -m tests.mutation.run $(MODULE)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
