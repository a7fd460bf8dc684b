# vidflow: `make demo` runs the main job, `make test` runs the checks. Both set up .venv first.
# The first Python 3.11+ on PATH (3.11 first: the pins in constraints.txt were made with it);
# `make PYTHON=/path/to/python3.12` to choose.
PYTHON ?= $(firstword $(foreach p,python3.11 python3.12 python3.13 python3,$(shell command -v $(p) 2>/dev/null)))
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS := all,dev

.PHONY: setup demo test faults lint format proto constraints bench clean

setup: $(STAMP)

# Installed once; again only when the dependency list or the pins change.
# A .venv of an older Python, or one left without pip (an interrupted set-up, or a system
# without python3-venv at the time), is made again.
$(STAMP): pyproject.toml constraints.txt
	@"$(PYTHON)" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	    echo "vidflow needs Python 3.11 or newer; '$(PYTHON)' is" \
	        "$$(command -v "$(PYTHON)" >/dev/null && "$(PYTHON)" --version 2>&1 || echo not found):" \
	        "install one and run: make PYTHON=python3.11 $(MAKECMDGOALS)" >&2; exit 1; }
	@$(BIN)/python -c 'import sys, pip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	    echo "making $(VENV) with $(PYTHON)"; rm -rf $(VENV) && "$(PYTHON)" -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
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
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^vidflow' > constraints.txt

bench: setup
	$(BIN)/python -m bench.service

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
