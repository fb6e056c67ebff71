# One-command set-up and runs on a fresh machine (see README):
#   make bench   benchmarks (the main job)       make test   the test suite
# Each creates .venv, installs torch==2.13.0 (CPU wheel from local disk), the dev
# dependencies and this package (built without build isolation), then runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/python -m pip
TORCH_VERSION ?= 2.13.0
export MAX_JOBS ?= 2
CSRC := $(shell find csrc -type f 2>/dev/null)

.PHONY: all install test test-fast bench bench-report cuda-gate clean

all: test

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==$(TORCH_VERSION)
	$(PIP) install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml $(CSRC)
	$(PIP) install -q --disable-pip-version-check --no-build-isolation -e .
	$(PY) -c "import metaembed_kernels as m; assert m._extension.is_loaded(), m._extension.load_error(); print('built:', m._extension.cpu_isa())"
	touch $@

install: $(VENV)/.built

test: install
	$(PY) -m pytest tests -q -ra

test-fast: install
	$(PY) -m pytest tests -q -x -k "not slow"

bench: install
	$(PY) -m pytest benchmarks --benchmark-only -q

clean:
	rm -rf build *.egg-info metaembed_kernels/*.so .pytest_cache .benchmarks
