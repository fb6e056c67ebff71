# One-command set-up and runs on a fresh machine (see README):
#   make bench   benchmarks (the main job)       make test   the test suite (fast inner loop)
# Each creates .venv, installs the dev torch (scripts/pins.env: the CPU wheel from local
# disk), the dev dependencies and this package (built without build isolation), then runs.
# CI (.ci/run) runs everything: make test, make gate, make cuda-gate, make test-compat.
include scripts/pins.env
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/python -m pip
TORCH_VERSION ?= $(DEV_TORCH)
export MAX_JOBS ?= 2
CSRC := $(shell find csrc -type f 2>/dev/null)
# pip notes about this machine's empty extra index folders: noise, never an error
PIP_NOISE := is ignored: it is neither a file nor a directory

.PHONY: all install test test-fast test-integrations gate bench bench-deps bench-report cuda-gate test-compat gpu-check clean

all: test

$(VENV)/.deps: requirements-dev.txt scripts/pins.env
	$(PYTHON) -m venv $(VENV)
	@echo "install: torch==$(TORCH_VERSION) and requirements-dev.txt into $(VENV)"
	$(PIP) install -q --disable-pip-version-check torch==$(TORCH_VERSION)
	$(PIP) install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

# The build prints ninja's [n/N] progress (the full log: $(VENV)/build.log).
$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml $(CSRC)
	@echo "install: building the C++ extension (about 2 min on 2 cores, MAX_JOBS=$(MAX_JOBS); log: $(VENV)/build.log)"
	@start=$$(date +%s); $(PIP) install -v --disable-pip-version-check --no-build-isolation -e . 2>&1 \
	  | tee $(VENV)/build.log | { grep --line-buffered -E '^ *\[[0-9]+/[0-9]+\] ' || true; } \
	  | sed -u -E 's#^ *(\[[0-9]+/[0-9]+\]) .* -c ([^ ]+) .*#  \1 \2#; s#^ *(\[[0-9]+/[0-9]+\]) ([^ ]+).*#  \1 \2#' \
	  || { tail -40 $(VENV)/build.log; echo "install: build failed (log: $(VENV)/build.log)"; exit 1; }; \
	  echo "install: built in $$(( $$(date +%s) - start )) s"
	$(PY) -c "import metaembed_kernels as m; assert m._extension.is_loaded(), m._extension.load_error(); print('built:', m._extension.cpu_isa(), '| torch', m._extension.build_info()['torch'])"
	touch $@

install: $(VENV)/.built

# The fast inner loop: everything but the compile gates (marker `gate`, run by `make gate`),
# one pytest-xdist worker per core (tests/conftest.py gives each its share of torch's threads;
# work stealing, as a few tests take 10-30 s where most take milliseconds).
XDIST := -n auto --dist worksteal
test: install
	$(PY) -m pytest tests -q -ra -m "not gate" --durations=15 $(XDIST)

test-fast: install
	$(PY) -m pytest tests -q -x -m "not gate and not slow" $(XDIST)

# Ahead-of-time compile gates (Triton kernels for sm_80 and sm_90; several minutes).
gate: install
	$(PY) -m pytest tests -q -ra -m gate --durations=5

# --no-compile (the peers here; scripts/cached_venv.sh: the CUDA-gate and compat venvs):
# byte-compiling every module of torch & co. at install time is most of a venv's creation (a
# colpali host venv, wheels cached: 52.6 s with it, 20.2 s without), and these serve a few
# processes, each compiling only what it imports (`import torch` ~1.5 s more without .pyc
# files; at every start where PYTHONDONTWRITEBYTECODE=1, as on these machines). The dev venv and the
# host venvs keep them: they start hundreds of processes, or import transformers in each (the
# host tests took 99 s instead of ~20 s without them).
# Peers (benchmarks/requirements-peers.txt): one pip call per line, torch pinned on each, so
# a peer that fails to install is only skipped by the benchmarks. The stamp is written only
# when every line installed, so a failed line is retried by the next `make bench`. pip's
# output goes to $(VENV)/bench-deps.log; it is printed only for a line that failed (the
# resolver's notes about the --no-deps lines are expected).
PEERS_REQ := benchmarks/requirements-peers.txt

$(VENV)/.peers: $(VENV)/.deps $(PEERS_REQ)
	@: > $(VENV)/bench-deps.log; lines=$$(sed -e 's/#.*//' -e '/^ *$$/d' $(PEERS_REQ)); \
	n=$$(echo "$$lines" | wc -l); i=0; failed=0; \
	while read -r args; do i=$$((i + 1)); t=$$(date +%s); \
	  printf 'bench-deps [%d/%d] pip install %s ... ' $$i $$n "$$args"; \
	  if $(PIP) install -q --no-compile --disable-pip-version-check $$args torch==$(TORCH_VERSION) </dev/null \
	       >>$(VENV)/bench-deps.log 2>&1; then echo "ok ($$(( $$(date +%s) - t )) s)"; \
	  else failed=1; echo "FAILED, its peer will be skipped:"; \
	       grep -v "$(PIP_NOISE)" $(VENV)/bench-deps.log | tail -5 | sed 's/^/    /'; fi; \
	done <<< "$$lines"; [ $$failed = 0 ] && touch $@ || true
	@$(PY) -c "import torch; v = torch.__version__; assert v.startswith('$(TORCH_VERSION)'), v; print('bench-deps: torch', v)"

bench-deps: $(VENV)/.peers

# One summary table (<= 120 columns) first, then one line per skip reason; the wide
# per-provider tables and the raw data go to results/bench/ (benchmarks/conftest.py).
bench: install bench-deps
	@mkdir -p results/bench
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-quiet --benchmark-json=results/bench/benchmarks.json -q -rs

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

# The oldest torch / triton we claim (COMPAT_* in scripts/pins.env), in a venv cached under
# ~/.cache/metaembed-kernels: the extension with its CUDA part, the cpu-backend and Triton
# interpreter tests, and the Triton compile gate for sm_80 + sm_90 (scripts/test_compat.sh).
test-compat:
	bash scripts/test_compat.sh

# On a machine with a CUDA GPU: build, ceilings, GPU tests, speed, verdict (results/gpu-check/).
# Without one it prints "no CUDA device: skipped" and succeeds. GPU_CHECK_ARGS=--dry-run: on CPU.
gpu-check:
	bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf build *.egg-info metaembed_kernels/*.so metaembed_kernels/_build_info.json .pytest_cache .benchmarks
