# The README's commands. Each sets up what it needs on a fresh machine:
# a virtual environment with the project and its dev tools, and (inside the
# commands themselves) an embedded PostgreSQL and moto's server when none is given.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

IAC    := .venv-iac

.PHONY: demo test lint bench iac-lint check

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
	$(BIN)/mypy benchmarks
	$(BIN)/bandit --quiet --recursive --severity-level medium layers/common functions

## The benchmarks of docs/PERFORMANCE.md (figures as ratios against same-run baselines).
bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

## template.yaml: cfn-lint (0 errors, 0 warnings) and checkov (suppressions justified inline).
## Their own environment: checkov pins versions that would fight moto's.
$(IAC)/.installed:
	$(PYTHON) -m venv $(IAC)
	$(IAC)/bin/python -m pip install --quiet --upgrade pip
	$(IAC)/bin/python -m pip install --quiet cfn-lint checkov
	touch $@

iac-lint: $(IAC)/.installed
	$(IAC)/bin/cfn-lint template.yaml
	$(IAC)/bin/checkov --file template.yaml --framework cloudformation --compact --quiet --skip-download

check: lint iac-lint test
