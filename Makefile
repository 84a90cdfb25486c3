# Quick start: `make demo` trains and evaluates on the bundled digits; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: demo test test-all data setup clean

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

clean:
	rm -rf $(VENV) runs
