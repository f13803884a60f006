# The two commands of the README: `make demo` and `make test`. Each creates .venv and installs
# the pinned development requirements (requirements-dev.txt) plus tnlayers itself, once.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch lies on this project's machines; elsewhere pip takes it from PyPI.
FIND_LINKS := $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels)

.PHONY: demo test lint clean

$(STAMP): requirements-dev.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(FIND_LINKS) -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

demo: $(STAMP)
	$(BIN)/tnlayers demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	OMP_WAIT_POLICY=PASSIVE TNLAYERS_REQUIRE_ALL=1 $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
