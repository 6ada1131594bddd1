# Two commands do all set-up on a fresh machine:  `make demo` (main job on the bundled model)  and  `make test`.
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
INSTALL ?= -e
# Two test workers, each test file on one of them (its module fixtures built once); PYTEST_ARGS adds options (CI:
# --durations=30).
PYTEST_ARGS ?=
BIN := $(VENV)/bin

.PHONY: demo test typecheck

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q $(INSTALL) ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/avarc classify examples/digits

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/python scripts/typecheck.py
	$(BIN)/python -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

typecheck: $(VENV)/.installed
	$(BIN)/python scripts/typecheck.py
