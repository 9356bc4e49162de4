# The README's commands. Each sets up what it needs on a fresh machine:
# a virtual environment with the project and its dev tools, and (inside the
# commands themselves) an embedded PostgreSQL and moto's server when none is given.
#
# Python: Lambda's runtime, 3.12, wherever this machine has it (on PATH, or
# installed by pyenv); PYTHON=... chooses another. Without a 3.12 the commands
# still run on python3 (3.11+), and the test that runs the handlers on the
# Lambda runtime says loudly that it was skipped.
PYTHON312 := $(shell layers/common/find-python3.12)
PYTHON    ?= $(or $(PYTHON312),python3)
VENV      := .venv
BIN       := $(VENV)/bin
LOCK      := layers/common/requirements.lock
IAC       := .venv-iac
LOCKER    := .venv-lock
# make layer's architecture: the template's Architecture parameter (arm64, its
# default, or x86_64 for a layer this machine can run; aarch64 is arm64's wheel name).
ARCH      ?= arm64
LAYER_TARGET_arm64   := build-CommonLayerArm64
LAYER_TARGET_aarch64 := build-CommonLayerArm64
LAYER_TARGET_x86_64  := build-CommonLayerX8664

.PHONY: demo test lint bench iac-lint check layer lock

# The dependencies are installed at the versions the layer ships (the lock,
# hashes dropped: pip takes no hashes for an editable install), so the tests
# run on exactly what is deployed.
$(VENV)/.installed: pyproject.toml $(LOCK)
	@[ -n "$(PYTHON312)" ] || echo "WARNING: no Python 3.12 (Lambda's runtime) found; using $(PYTHON). The Lambda-runtime test will be SKIPPED." >&2
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	sed -n 's/^\([A-Za-z0-9._-]*==[^ ]*\).*/\1/p' $(LOCK) > $(VENV)/constraints.txt
	$(BIN)/python -m pip install --quiet -c $(VENV)/constraints.txt -e '.[dev]'
	touch $@

## The main job: the seed's failure and its repair, end to end, on this machine.
demo: $(VENV)/.installed
	$(BIN)/content-retry demo

## The test suite, on a real PostgreSQL (TEST_DATABASE_URL, or an embedded one).
test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The runtime builds no SQL from strings (statements come from content_retry/tables.py),
# so bandit runs every check, B608 (SQL built from strings) included.
lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mypy benchmarks
	$(BIN)/bandit --quiet --recursive --severity-level medium layers/common functions

## The benchmarks of docs/PERFORMANCE.md (figures as ratios against same-run baselines).
bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

## The Lambda layer exactly as deployed, in build/layer/python/ (ARCH=x86_64 for one
## this machine can run): the target sam build runs for that architecture
## (layers/common/Makefile).
layer:
	@[ -n "$(LAYER_TARGET_$(ARCH))" ] || { echo "ARCH must be arm64 or x86_64 (the template's Architecture), not $(ARCH)" >&2; exit 1; }
	$(MAKE) -C layers/common $(LAYER_TARGET_$(ARCH)) ARTIFACTS_DIR=$(CURDIR)/build/layer

## Re-lock the layer's dependencies from pyproject.toml, with hashes, for Lambda's
## platform (CPython 3.12, manylinux2014); the lock holds for arm64 and x86_64 alike.
lock:
	[ -x $(LOCKER)/bin/uv ] || { $(PYTHON) -m venv $(LOCKER) && $(LOCKER)/bin/python -m pip install --quiet uv; }
	$(LOCKER)/bin/uv pip compile pyproject.toml --quiet --generate-hashes \
	    --python-version 3.12 --python-platform aarch64-manylinux2014 \
	    --custom-compile-command "make lock" --output-file $(LOCK)

## template.yaml: cfn-lint (0 errors, 0 warnings, and its informational checks: a
## data-bearing resource says what happens to it on delete and replace) and checkov
## (suppressions justified inline).
## Their own environment: checkov pins versions that would fight moto's.
$(IAC)/.installed:
	$(PYTHON) -m venv $(IAC)
	$(IAC)/bin/python -m pip install --quiet --upgrade pip
	$(IAC)/bin/python -m pip install --quiet cfn-lint checkov
	touch $@

iac-lint: $(IAC)/.installed
	$(IAC)/bin/cfn-lint --include-checks I -- template.yaml
	$(IAC)/bin/checkov --file template.yaml --framework cloudformation --compact --quiet --skip-download

check: lint iac-lint test
