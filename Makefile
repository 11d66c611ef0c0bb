# Two commands on a fresh machine: `make demo` runs the main job, `make test` runs every test
# that needs no GPU (the slow ones and the PostgreSQL ones too); `make test-fast` is the quick
# inner loop while developing (no test marked slow).
# Each creates .venv and installs what it needs (torch pinned through constraints.txt).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test test-fast lint docs bench-overhead clean

$(BIN)/amptrain-core: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[plot]'
	touch $@

$(BIN)/amptrain-dev: $(BIN)/amptrain-core
	$(PIP) -e '.[dev]'
	touch $@

demo: $(BIN)/amptrain-core
	$(BIN)/amptrain demo

# The tests run single-threaded (tests/conftest.py), so two workers use both cores of a 2-core
# machine; each worker starts its own throwaway PostgreSQL server when it reaches those tests.
test: $(BIN)/amptrain-dev
	$(BIN)/python -m pytest -q -m 'not gpu' -n 2

test-fast: $(BIN)/amptrain-dev
	$(BIN)/python -m pytest -q

lint: $(BIN)/amptrain-dev
	$(BIN)/ruff check amptrain tests benchmarks
	$(BIN)/ruff format --check amptrain tests benchmarks

docs: $(BIN)/amptrain-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench-overhead: $(BIN)/amptrain-core
	$(BIN)/python benchmarks/loop_overhead.py

clean:
	rm -rf $(VENV) runs
