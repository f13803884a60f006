# The two commands of the README: `make demo` and `make test`. Each creates .venv and installs
# the pinned development requirements (requirements-dev.txt) plus tnlayers itself, once.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch lies on this project's machines; elsewhere pip takes it from PyPI.
FIND_LINKS := $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels)

.PHONY: demo test lint mutate clean

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

# The suite runs in one worker per core (pytest-xdist; at most 4: each worker imports torch, TensorFlow and JAX).
test: lint
	OMP_WAIT_POLICY=PASSIVE TNLAYERS_REQUIRE_ALL=1 $(BIN)/python -m pytest -n auto --maxprocesses 4 --dist worksteal

# Mutation testing, not part of `make test`: deliberately wrong changes to the core and the adapters, each
# run against the tests that cover it (setup.cfg [mutmut]); results are kept in mutants/ between runs.
# One shard: make mutate SHARD="tnlayers.contract*". The score and the survivors: docs/testing.md.
mutate: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check mutmut==3.8.1
	OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 $(BIN)/mutmut run $(SHARD)
	$(BIN)/mutmut results

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis mutants
