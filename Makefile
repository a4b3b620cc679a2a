# The two set-up commands of a fresh machine: `make demo` and `make test`.
# Both create .venv (CPU torch 2.13.0, the package in editable mode) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.astraea-installed

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[cpu,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/astraea-build examples/tiny.yaml

# two pytest workers (pytest-xdist; one torch thread each), a test file on one worker so its
# shared engine folders are built once: CI's 2 cores both work
WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile

.PHONY: demo test
