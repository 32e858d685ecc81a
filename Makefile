# One target per intent; each creates .venv from nothing with only python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The official Kalshi SDK, a test oracle for the API's shapes (see ../shared/KALSHI.md's pip trap).
SDK := kalshi-python-sync==3.34.0

.PHONY: demo test test-long bench lint fmt clean soak

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --ignore-requires-python $(SDK)
	touch $(STAMP)

demo: $(STAMP)
	KALSHI_ETL_HOME=$${KALSHI_ETL_HOME:-./.kalshi-etl} $(BIN)/python -m etl demo

# The suite but the long end-to-end scenarios (marker `long`: the short soak, replicas), which
# `make test-long` runs and .ci/run runs once; keeps `make test` within 5 minutes.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not long" $(PYTEST_ARGS)

test-long: $(STAMP)
	$(BIN)/python -m pytest -m long $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .kalshi-etl .pytest_cache .mypy_cache .ruff_cache

# The long soak (10 minutes; SOAK_SECONDS to change): replicas, a backfill and six accounts
# under faults, kill -9 and a PostgreSQL restart; prints what it injected and verified.
soak: $(STAMP)
	$(BIN)/python -m tests.soak.driver --seconds $${SOAK_SECONDS:-600}
