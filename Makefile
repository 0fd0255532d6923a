# Two commands for a newcomer: `make demo` (setup, then the whole DAG) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench device-wheels clean

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

# for a GPU machine without network access (bench/device_check.sh): the packages it lacks, at this venv's
# versions, as wheels for its Python 3.12 (it has torch, torchvision, numpy, pyyaml, msgpack, tqdm)
DEVICE_PKGS := webdataset|braceexpand|zarr|donfig|numcodecs|google-crc32c|zstandard|zfpy|pcodec|pycocotools|pytorch-msssim
device-wheels: setup
	rm -rf .whl && mkdir -p .whl
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  $(foreach n,1 2014 _2_17 _2_24 _2_27 _2_28 _2_31 _2_34,--platform manylinux$(n)_x86_64) --platform any -d .whl \
	  $$($(BIN)/python -m pip list --format=freeze | grep -i -E '^($(DEVICE_PKGS))==')
	ls .whl

clean:
	rm -rf data runs cache report.md report
