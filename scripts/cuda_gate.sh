#!/usr/bin/env bash
# CUDA gate (run by .ci/run after `make test`; `make cuda-gate` runs it alone). No GPU needed:
#   1. an environment with the CUDA 13.0 build of torch (reused from the cache when valid);
#   2. the extension with csrc/cuda built OUT OF TREE (the in-tree build/ and _C*.so belong
#      to the CPU venv) for TORCH_CUDA_ARCH_LIST="8.0;9.0a";
#      METAEMBED_CPU_ISAS=none: the CPU kernels' ISA variants (no torch code in them; make test
#      tests each) are left out, which halves the build;
#   3. it imports, and every op has a CPU and a CUDA kernel registered;
#   4. registers / shared memory / spills per kernel and arch from -Xptxas=-v: fails on any spill;
#   5. tests/test_cuda.py with the CUDA kernels running on the CPU emulator (csrc/cuda/emulate.h).
# --venv-only: step 1 only (.ci/run builds the venv while `make test` runs).
# Environment: METAEMBED_CUDA_VENV (default ~/.cache/metaembed-kernels/cuda-venv),
# METAEMBED_CUDA_BUILD (default ~/.cache/metaembed-kernels/cuda-build), CUDA_HOME
# (/usr/local/cuda), TORCH_CUDA_ARCH_LIST ("8.0;9.0a"), MAX_JOBS (2).
set -euo pipefail

# The whole script is one function, parsed before it runs: editing the file while a gate
# runs cannot change what that run does.
main() {
cd "$(dirname "$0")/.."
REPO=$PWD
CACHE="$HOME/.cache/metaembed-kernels"
VENV="${METAEMBED_CUDA_VENV:-$CACHE/cuda-venv}"
BUILD="${METAEMBED_CUDA_BUILD:-$CACHE/cuda-build}"
. scripts/pins.env
TORCH_PIN=$CUDA_GATE_TORCH
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}"
export MAX_JOBS="${MAX_JOBS:-2}"
ARCHS=$(echo "$TORCH_CUDA_ARCH_LIST" | tr ';' '\n' | sed -e 's/+PTX//' -e 's/^\([0-9]*\)\.\([0-9a-z]*\)$/sm_\1\2/' | paste -sd, -)
N_KERNELS=10  # score_kernel x3 dtypes, grad_q x3, grad_c x3, weights_kernel

T0=$(date +%s)
step() { echo "== cuda-gate [$(($(date +%s) - T0))s] $*"; }

# ---- 1. environment -------------------------------------------------------------------
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "cuda-gate: no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)"; exit 1; }
. scripts/cached_venv.sh
step "torch==$TORCH_PIN (CUDA build), ninja, numpy, pytest in $VENV"
cached_venv "$VENV" "import torch, ninja, numpy, pytest; assert torch.__version__.split('+')[0] == '$TORCH_PIN' and torch.version.cuda" \
  "torch==$TORCH_PIN" ninja numpy pytest || { echo "cuda-gate: no CUDA build of torch $TORCH_PIN in $VENV"; exit 1; }
[ "${1:-}" = "--venv-only" ] && { step "venv ready"; return 0; }
"$VENV/bin/python" -c "import torch; print('   torch', torch.__version__, '| CUDA', torch.version.cuda, '| GPU present:', torch.cuda.is_available())"

# ---- 2. out-of-tree build -------------------------------------------------------------
# Files are copied only when their content changed, so ninja (objects in $BUILD/temp)
# rebuilds only what changed, even from a fresh clone whose checkout touched every mtime.
step "syncing sources to $BUILD/src"
mkdir -p "$BUILD/src" "$BUILD/temp"
"$VENV/bin/python" scripts/sync_sources.py "$BUILD/src"
# kernels.cu always recompiles (~1 min) so the ptxas report below is always this build's.
find "$BUILD/temp" -name 'kernels.o' -delete
step "building (CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS)"
# METAEMBED_PTXAS_VERBOSE=1: -Xptxas=-v, for the register / spill report below (this gate only)
if ! (cd "$BUILD/src" && METAEMBED_CPU_ISAS=none METAEMBED_BUILD_CUDA=1 METAEMBED_PTXAS_VERBOSE=1 "$VENV/bin/python" setup.py -q build_ext --inplace \
      --build-temp "$BUILD/temp") >"$BUILD/build.log" 2>&1; then
  grep -E "error|Error" "$BUILD/build.log" | head -40 || true
  tail -30 "$BUILD/build.log"
  echo "cuda-gate: build failed (full log: $BUILD/build.log)"
  exit 1
fi

# ---- 3. import and registration -------------------------------------------------------
step "import and dispatch keys"
(cd "$BUILD/src" && "$VENV/bin/python" - <<'EOF'
import torch
from metaembed_kernels import _extension
assert _extension.is_loaded(), _extension.load_error()
assert list(_extension.supported_cpu_isas()) == ['generic'], _extension.supported_cpu_isas()  # METAEMBED_CPU_ISAS=none
assert _extension._C.built_with_cuda(), "extension built without METAEMBED_WITH_CUDA"
missing = []
for op in _extension.OP_NAMES:
    for key in ("CPU", "CUDA"):
        ok = torch._C._dispatch_has_kernel_for_dispatch_key(f"metaembed::{op}", key)
        print(f"   metaembed::{op:28} {key:4} {'registered' if ok else 'MISSING'}")
        if not ok:
            missing.append(f"{op}/{key}")
assert not missing, f"missing kernels: {missing}"
EOF
)

# ---- 4. registers and spills ----------------------------------------------------------
step "ptxas: registers, shared memory and spills per kernel and arch"
"$VENV/bin/python" "$REPO/scripts/ptxas_report.py" "$BUILD/build.log" --expect-archs "$ARCHS" \
  --expect-kernels "$N_KERNELS"

# ---- 5. the kernels on the CPU emulator -----------------------------------------------
step "tests/test_cuda.py (CUDA kernels on the CPU emulator)"
(cd "$BUILD/src" && METAEMBED_CUDA_EMU=1 METAEMBED_CUDA_EMU_BUILD="$BUILD/emu" \
  "$VENV/bin/python" -m pytest tests/test_cuda.py -q -p no:cacheprovider)
step "passed"
}

main "$@"
