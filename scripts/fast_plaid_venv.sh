#!/usr/bin/env bash
# fast-plaid's own venv (benchmarks/index_report.py's PLAID peer): fast-plaid==$FAST_PLAID
# requires torch==$FAST_PLAID_TORCH exactly, which the bench venv does not have. Cached under
# ~/.cache/metaembed-kernels (scripts/cached_venv.sh: built aside, renamed into place once
# checked). Prints the venv's python on its last line.
#   bash scripts/fast_plaid_venv.sh        (METAEMBED_FAST_PLAID_VENV overrides the path)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/pins.env
. scripts/cached_venv.sh
VENV="${METAEMBED_FAST_PLAID_VENV:-$HOME/.cache/metaembed-kernels/fastplaid-venv}"
echo "fast-plaid==$FAST_PLAID with torch==$FAST_PLAID_TORCH (~4.8 GB) in $VENV" >&2
cached_venv "$VENV" "import fast_plaid.search, torch; from importlib.metadata import version; assert version('fast-plaid') == '$FAST_PLAID' and torch.__version__.split('+')[0] == '$FAST_PLAID_TORCH'" \
  "torch==$FAST_PLAID_TORCH" "fast-plaid==$FAST_PLAID" >&2
echo "$VENV/bin/python"
