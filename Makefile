# The README's commands. Each sets up what it needs on a fresh machine:
# a virtual environment with the project and its dev tools, and (inside the
# commands themselves) an embedded PostgreSQL and moto's server when none is given.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint check

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

## The main job: the seed's failure and its repair, end to end, on this machine.
demo: $(VENV)/.installed
	$(BIN)/content-retry demo

## The test suite, on a real PostgreSQL (TEST_DATABASE_URL, or an embedded one).
test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

check: lint test
