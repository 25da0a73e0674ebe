# Set-up is part of every target: a fresh clone needs only `make bench` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test bench lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/torch-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/torch-cpu.txt
	$(PY) -m pip install --quiet -e '.[dev,gpu]'
	touch $@

test: setup
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m pytest -q

bench: setup
	$(VENV)/bin/normscope bench

lint: setup
	$(PY) -m ruff check src tests benchmarks examples
