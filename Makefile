# orderflow — every target creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench
# uv resolves the lock files (`make lock`); installing from them needs only pip.
UV_VERSION := 0.13.9
UV_VENV := .venv-uv
UV ?= $(UV_VENV)/bin/uv
LOCK := $(UV) pip compile pyproject.toml --quiet --universal --python-version 3.11 \
	--generate-hashes --custom-compile-command 'make lock' $(if $(UPGRADE),--upgrade,)

MUTATION_STAMP := $(VENV)/.installed-mutation

.PHONY: run test lint typecheck pytest bench demo soak mutation lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# A lock file's exact, hash-checked set, then orderflow itself without resolving again.
define install_lock
	$(PIP) install --quiet --require-hashes -r $(1)
	$(PIP) install --quiet --no-deps -e .
	touch $@
endef

$(RUN_STAMP): requirements/run.txt pyproject.toml | $(BIN)/python
	$(call install_lock,requirements/run.txt)

$(STAMP): requirements/dev.txt pyproject.toml | $(BIN)/python
	$(call install_lock,requirements/dev.txt)

$(BENCH_STAMP): requirements/bench.txt $(STAMP)
	$(call install_lock,requirements/bench.txt)

$(MUTATION_STAMP): requirements/mutation.txt $(STAMP)
	$(call install_lock,requirements/mutation.txt)

## run: start the whole system on embedded defaults (Ctrl-C stops it)
run: $(RUN_STAMP)
	$(BIN)/orderflow up

## test: lint, types and the whole test suite against real servers it starts itself
test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests examples bench
	$(BIN)/ruff format --check src tests examples bench

typecheck: $(STAMP)
	$(BIN)/mypy

# The suite in TEST_WORKERS processes side by side (pytest-xdist), less the chaos
# scenarios, which then run alone, one after another: each kills processes on a
# schedule, and together they write RELIABILITY.md. PYTEST_ARGS: one plain pytest run.
TEST_WORKERS ?= 2
pytest: $(STAMP)
ifeq ($(strip $(PYTEST_ARGS)),)
	$(BIN)/pytest -n $(TEST_WORKERS) --ignore=tests/chaos
	$(BIN)/pytest tests/chaos
else
	$(BIN)/pytest $(PYTEST_ARGS)
endif

## bench: throughput, latency and memory side by side with the baselines
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench $(if $(QUICK),--quick,)

## demo: the lab's story through the real system
demo: $(STAMP)
	$(BIN)/orderflow demo

## soak: the long chaos run
soak: $(STAMP)
	ORDERFLOW_SOAK=1 $(BIN)/pytest -m chaos $(PYTEST_ARGS)

## lock: resolve requirements/*.txt again from pyproject.toml (UPGRADE=1 takes newer releases)
# run.txt is what `make run` installs; dev.txt adds the tools `make test` uses, at run.txt's
# versions; bench.txt adds the peers `make bench` measures, mutation.txt the mutation tool;
# lowest.txt holds every direct dependency at its lower bound, for .ci/lowest.
lock: | $(filter $(UV_VENV)/%,$(UV))
	$(LOCK) -o requirements/run.txt
	$(LOCK) --extra dev -c requirements/run.txt -o requirements/dev.txt
	$(LOCK) --extra dev --extra bench -c requirements/dev.txt -o requirements/bench.txt
	$(LOCK) --extra dev --extra mutation -c requirements/dev.txt -o requirements/mutation.txt
	$(LOCK) --extra dev --resolution lowest-direct -o requirements/lowest.txt

$(UV_VENV)/bin/uv:
	$(PYTHON) -m venv $(UV_VENV)
	$(UV_VENV)/bin/python -m pip install --quiet uv==$(UV_VERSION)

## mutation: mutmut over the core with its targeted tests (MODULE=ledger for one; docs/MUTATION.md)
mutation: $(MUTATION_STAMP)
	nice -n 10 $(BIN)/python -m tests.mutation.run $(MODULE)

clean:
	rm -rf $(VENV) .venv-lowest $(UV_VENV) .mypy_cache .ruff_cache .pytest_cache
