# Quick start: `make demo` trains and evaluates on the bundled digits; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: demo test test-all data setup clean gpu-bundle

$(PY):
	$(PYTHON) -m venv $(VENV)

# The pinned CPU build of torch goes in first so no dependency pulls a CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/knnsolver train --dataset digits --solver rbf --epochs 15 --out runs/demo --overwrite

test: $(STAMP)
	$(PY) -m pytest -n 2

test-all: $(STAMP)
	$(PY) -m pytest -n 2 -m ''

data:
	apt-get update && apt-get install -y dataset-fashion-mnist

# What benchmarks/gpu_check.sh needs on a GPU machine without network (both folders are git-ignored).
gpu-bundle:
	mkdir -p .whl .data/fashion-mnist
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl faiss-cpu==1.15.1 pytorch-metric-learning==2.9.0
	cp /usr/share/datasets/fashion-mnist/*.gz .data/fashion-mnist/

clean:
	rm -rf $(VENV) runs
