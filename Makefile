# Two commands for a newcomer: `make demo` (setup, then the whole DAG) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# dvc runs each stage's `python -m ...` through the shell: put the venv first on PATH
demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

lint: setup
	$(BIN)/ruff check pipeline stages stores tests bench

test: setup lint
	$(BIN)/python -m pytest

# benchmarks (bench/README.md); e.g. make bench BENCH_ARGS="--scale real" on a GPU machine
bench: setup
	$(BIN)/python -m bench.run_all $(BENCH_ARGS)

clean:
	rm -rf data runs cache report.md report
