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

.PHONY: all install test test-fast test-integrations bench bench-deps bench-report cuda-gate clean

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

# Peers (benchmarks/requirements-peers.txt): one pip call per line, torch pinned on each, so
# a peer that fails to install is only skipped by the benchmarks. The stamp is written only
# when every line installed, so a failed line is retried by the next `make bench`.
PEERS_REQ := benchmarks/requirements-peers.txt

$(VENV)/.peers: $(VENV)/.deps $(PEERS_REQ)
	@sed -e 's/#.*//' $(PEERS_REQ) | { failed=0; while read -r args; do \
	  [ -n "$$args" ] || continue; \
	  echo "bench-deps: pip install $$args"; \
	  $(PIP) install -q --disable-pip-version-check $$args torch==$(TORCH_VERSION) </dev/null \
	    || { failed=1; echo "bench-deps: FAILED, its peer will be skipped: $$args"; }; \
	done; exit $$failed; } && touch $@ || true
	@$(PY) -c "import torch; v = torch.__version__; assert v.startswith('$(TORCH_VERSION)'), v; print('bench-deps: torch', v)"

bench-deps: $(VENV)/.peers

bench: install bench-deps
	$(PY) -m pytest benchmarks --benchmark-only -q

# The adapters inside PyLate 1.6.0, colpali-engine 0.3.18 and sentence-transformers 6.2.0, one
# cached venv per host (~/.cache/metaembed-kernels/hosts), our in-tree build on PYTHONPATH
# (scripts/test_integrations.sh; `--bench` adds benchmarks/test_bench_integrations.py).
test-integrations: install
	bash scripts/test_integrations.sh

# CUDA backend gate, no GPU needed: builds csrc/cuda out of tree in a torch-CUDA venv cached
# under ~/.cache/metaembed-kernels, checks registration and ptxas spills, and runs
# tests/test_cuda.py on the CPU emulator (scripts/cuda_gate.sh).
cuda-gate:
	bash scripts/cuda_gate.sh

clean:
	rm -rf build *.egg-info metaembed_kernels/*.so .pytest_cache .benchmarks
