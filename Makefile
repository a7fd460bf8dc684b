# vidflow: `make demo` runs the main job, `make test` runs the checks. Both set up .venv first.
# The first Python 3.11+ on PATH (3.11 first: the pins in constraints.txt were made with it);
# `make PYTHON=/path/to/python3.12` to choose.
PYTHON ?= $(firstword $(foreach p,python3.11 python3.12 python3.13 python3,$(shell command -v $(p) 2>/dev/null)))
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS := all,dev

.PHONY: setup demo test faults lint format proto constraints bench clean FORCE

setup: $(STAMP)

# Whether .venv can be used as it is: its Python runs (an OS upgrade can remove the one it was
# made from), is 3.11+ and has pip (an interrupted set-up, or a system without python3-venv at
# the time); and, with `make PYTHON=...`, it is that Python's version.
VENV_USABLE = $(BIN)/python -c 'import sys, pip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
ifeq ($(origin PYTHON),command line)
VENV_USABLE += && [ "$$($(BIN)/python -c 'import sys; print(sys.version_info[:2])')" = \
    "$$("$(PYTHON)" -c 'import sys; print(sys.version_info[:2])' 2>/dev/null)" ]
endif
# Checked on every make, not only when the pins change: else a broken .venv stays in use.
# (Not usable where `clean` runs first in the same make: it removes .venv.)
VENV_STATE := $(if $(filter clean,$(MAKECMDGOALS)),,$(shell $(VENV_USABLE) && echo usable))
ifneq ($(VENV_STATE),usable)
$(STAMP): FORCE
endif
FORCE:

# Installed once; again when the dependency list or the pins change, or .venv is not usable
# (then made again, with $(PYTHON), which must then be 3.11+: a usable .venv is installed into
# with its own, whatever python3 is; a user who made it with `make PYTHON=...` was refused
# "needs Python 3.11" by every plain `make` after the pins changed).
$(STAMP): pyproject.toml constraints.txt
ifneq ($(VENV_STATE),usable)
	@"$(PYTHON)" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	    echo "vidflow needs Python 3.11 or newer; '$(PYTHON)' is" \
	        "$$(command -v "$(PYTHON)" >/dev/null && "$(PYTHON)" --version 2>&1 || echo not found):" \
	        "install one and run: make PYTHON=python3.11 $(MAKECMDGOALS)" >&2; exit 1; }
	@echo "making $(VENV) with $(PYTHON)"
	rm -rf $(VENV) && "$(PYTHON)" -m venv $(VENV)
endif
	$(BIN)/python -m pip install --quiet "pip==26.3"  # pinned: a new pip must not change a setup
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
# In steps: a pipe into constraints.txt emptied it first, and a failed freeze left it empty or
# partial while make went on (a pipe's status is its last command's).
# `--all`: setuptools too, which torch and grpcio-tools need at run time (pip's freeze leaves it
# out on Python < 3.12, and a setup then took the newest of the day); pip is pinned above.
constraints: setup
	$(BIN)/python -m pip freeze --all --exclude-editable > .constraints.frozen
	grep -v -e '^vidflow' -e '^pip==' .constraints.frozen > .constraints.new
	mv .constraints.new constraints.txt && rm -f .constraints.frozen

bench: setup
	$(BIN)/python -m bench.service

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
