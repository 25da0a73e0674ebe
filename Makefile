# Set-up is part of every target: a fresh clone needs only `make bench` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test bench lint audit screenshot docs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/torch-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --retries 1 -r requirements/torch-cpu.txt  # one retry: where PyTorch's index is unreachable, pip falls through to the other sources at once
	$(PY) -m pip install --quiet -e '.[dev,gpu]'
	touch $@

test: setup
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m pytest -q

audit: setup
	$(VENV)/bin/normscope audit --report normscope-report.html --json normscope-report.json

bench: setup
	$(VENV)/bin/normscope bench

# Render the audit report with headless Chromium (Debian package chromium) into docs/images/.
screenshot: setup
	$(VENV)/bin/normscope audit --quiet --report normscope-report.html > /dev/null || true
	$(PY) -m normscope.report.screenshot normscope-report.html docs/images/audit-report.png --width 1400 --height 2400

lint: setup
	$(PY) -m ruff check src tests benchmarks examples

# The documentation site (docs/ + the API reference from the docstrings) into site/; broken links fail it.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict
