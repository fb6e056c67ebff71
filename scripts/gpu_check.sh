#!/usr/bin/env bash
# GPU field check (`make gpu-check`): builds the extension with CUDA for this GPU, measures
# the ceilings, runs the GPU tests (and compute-sanitizer), times the kernels and prints a
# verdict; JSON and logs under --out (default results/gpu-check). See scripts/gpu_check.py.
#
#   scripts/gpu_check.sh [--dry-run] [--out DIR] [--set NAME=VALUE ...]
#
# Python: $PYTHON if set, else the first of python3 / .venv/bin/python whose torch sees a
# CUDA device (GPU images ship their own torch and triton: no install happens here). With
# none: prints "no CUDA device: skipped" and exits 0. --dry-run runs every Python stage on
# CPU at tiny sizes (tests/test_gpu_check.py), with .venv's python unless $PYTHON is set.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=results/gpu-check
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --dry-run) DRY=1 ;;
    --out) OUT="${args[$((i + 1))]:-$OUT}" ;;
    --out=*) OUT="${args[$i]#--out=}" ;;
  esac
done

sees_gpu() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }

if [ "$DRY" = 1 ]; then
  PY="${PYTHON:-}"
  if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
  fi
else
  PY=""
  for candidate in ${PYTHON:-} python3 .venv/bin/python; do
    if command -v "$candidate" >/dev/null 2>&1 && sees_gpu "$candidate"; then PY=$candidate; break; fi
  done
  if [ -z "$PY" ]; then
    echo "no CUDA device: skipped (no python among ${PYTHON:-} python3 .venv/bin/python has a torch that sees a GPU)"
    exit 0
  fi
fi

mkdir -p "$OUT"
# The log holds everything printed; the Python driver writes gpu_check.json next to it.
"$PY" scripts/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
