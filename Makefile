# vidflow: `make demo` runs the main job, `make test` runs the checks. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS := all,dev

.PHONY: setup demo test faults lint format proto constraints bench clean

setup: $(STAMP)

# Installed once; again only when the dependency list or the pins change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

# `make demo DEMO_ARGS=--keep-ui` keeps the Prefect UI up after the runs, until Ctrl-C.
demo: setup
	$(BIN)/python -m vidflow.demo $(DEMO_ARGS)

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

# The fault suite alone (kills, poison input, hostile peers); `make test` runs it too.
faults: setup
	$(BIN)/python -m pytest -m faults

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Regenerate the gRPC stubs from protos/ (tests/test_protos.py checks that they match).
proto: setup
	$(BIN)/python -m protos.generate

# Refresh the pins after changing dependencies in pyproject.toml (setup installs the change first).
constraints: setup
	$(BIN)/pip freeze --exclude-editable | grep -v '^vidflow' > constraints.txt

bench: setup
	$(BIN)/python -m bench.service

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
