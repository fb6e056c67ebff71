#!/usr/bin/env bash
# Compatibility job (`make test-compat`, run by .ci/run): the oldest torch / triton we claim
# (scripts/pins.env: COMPAT_TORCH, COMPAT_TRITON; pyproject.toml's floors), no GPU needed:
#   1. a venv with torch==$COMPAT_TORCH (PyPI's CUDA 13.0 build, ~4.7 GB) and
#      triton==$COMPAT_TRITON (numpy==$COMPAT_NUMPY for its interpreter), cached under
#      ~/.cache/metaembed-kernels (scripts/cached_venv.sh);
#   2. the extension built OUT OF TREE with METAEMBED_BUILD_CUDA=auto, no GPU visible and
#      no TORCH_CUDA_ARCH_LIST (the Docker-build case that once crashed in torch's
#      _get_cuda_arch_flags): it must build the CUDA part, for setup.py's default archs;
#      METAEMBED_CPU_ISAS=none: the CPU kernels' ISA variants (no torch code in them; make test
#      tests each) are left out, which halves the build;
#   3. the cpu-backend tests and the Triton interpreter tests on this torch / triton;
#   4. the Triton compile gate for sm_80 and sm_90 on this triton (no spills, MMA, smem), for
#      bf16 and fp32 (fp16 would compile bf16's kernels again with another element type; the
#      gate of `make gate` compiles all three on the dev triton).
# Cache (scripts/cached_venv.sh): the venv is built in VENV.partial and renamed into place
# only once complete and checked (an interrupted download never leaves a half venv to
# reuse), under a lock; a venv whose pins or imports no longer match is rebuilt.
# --venv-only: step 1 only (.ci/run downloads it while `make test` runs).
# Environment: METAEMBED_COMPAT_VENV, METAEMBED_COMPAT_BUILD, CUDA_HOME (/usr/local/cuda),
# MAX_JOBS (2).
set -euo pipefail

main() {  # parsed whole before it runs: editing the file during a run changes nothing
cd "$(dirname "$0")/.."
REPO=$PWD
. scripts/pins.env
CACHE="$HOME/.cache/metaembed-kernels"
VENV="${METAEMBED_COMPAT_VENV:-$CACHE/compat-venv}"
BUILD="${METAEMBED_COMPAT_BUILD:-$CACHE/compat-build}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export MAX_JOBS="${MAX_JOBS:-2}"
unset TORCH_CUDA_ARCH_LIST
export CUDA_VISIBLE_DEVICES=""  # no GPU visible, even on a machine that has one
T0=$(date +%s)
step() { echo "== test-compat [$(($(date +%s) - T0))s] $*"; }

# ---- 1. environment -------------------------------------------------------------------
. scripts/cached_venv.sh
step "torch==$COMPAT_TORCH (CUDA build, ~4.7 GB), triton==$COMPAT_TRITON, numpy==$COMPAT_NUMPY, ninja, pytest(-xdist) in $VENV"
cached_venv "$VENV" "import torch, triton, ninja, numpy, pytest, xdist; assert torch.__version__.split('+')[0] == '$COMPAT_TORCH' and torch.version.cuda and triton.__version__ == '$COMPAT_TRITON' and numpy.__version__ == '$COMPAT_NUMPY'" \
  "torch==$COMPAT_TORCH" "triton==$COMPAT_TRITON" "numpy==$COMPAT_NUMPY" ninja pytest "pytest-xdist>=3.2" \
  || { echo "test-compat: no torch $COMPAT_TORCH (CUDA) + triton $COMPAT_TRITON in $VENV"; exit 1; }
[ "${1:-}" = "--venv-only" ] && { step "venv ready"; return 0; }
"$VENV/bin/python" -c "import torch, triton; print('   torch', torch.__version__, '| CUDA', torch.version.cuda, '| triton', triton.__version__, '| GPU visible:', torch.cuda.is_available())"

# ---- 2. out-of-tree build, CUDA part included -----------------------------------------
step "syncing sources to $BUILD/src"
mkdir -p "$BUILD/src" "$BUILD/temp"
"$VENV/bin/python" scripts/sync_sources.py "$BUILD/src"
step "building (METAEMBED_BUILD_CUDA=auto, no TORCH_CUDA_ARCH_LIST, no GPU, MAX_JOBS=$MAX_JOBS)"
if ! (cd "$BUILD/src" && METAEMBED_CPU_ISAS=none METAEMBED_BUILD_CUDA=auto "$VENV/bin/python" setup.py -q build_ext --inplace \
      --build-temp "$BUILD/temp") >"$BUILD/build.log" 2>&1; then
  grep -E "error|Error" "$BUILD/build.log" | head -40 || true
  tail -30 "$BUILD/build.log"
  echo "test-compat: build failed (full log: $BUILD/build.log)"
  exit 1
fi
grep "metaembed-kernels:" "$BUILD/build.log" | sed 's/^/   /' || true
(cd "$BUILD/src" && "$VENV/bin/python" - <<'EOF'
import torch
from metaembed_kernels import _extension
assert _extension.is_loaded(), _extension.load_error()
assert list(_extension.supported_cpu_isas()) == ['generic'], _extension.supported_cpu_isas()  # METAEMBED_CPU_ISAS=none
assert _extension._C.built_with_cuda(), "METAEMBED_BUILD_CUDA=auto built no CUDA kernels with a CUDA torch and nvcc"
assert _extension.has_kernel("cpu") and _extension.has_kernel("cuda")
print("   extension: cpu + cuda kernels registered; built against torch", _extension.build_info()["torch"],
      "| cpu isa", _extension.cpu_isa())
EOF
)

# ---- 3. cpu-backend and Triton interpreter tests --------------------------------------
# test_maxsim / test_loss hold the parity sweeps of every backend here (cpu on each ISA,
# triton under the interpreter); test_triton the interpreter specifics and the gates.
TESTS="tests/test_cpu_backend.py tests/test_maxsim.py tests/test_loss.py tests/test_ops.py tests/test_validation.py tests/test_triton.py"
step "pytest (cpu backend, Triton interpreter): $TESTS"
(cd "$BUILD/src" && TRITON_INTERPRET=1 "$VENV/bin/python" -m pytest $TESTS -q -p no:cacheprovider -ra \
  -m "not gate and not gpu" --durations=5 -n auto --dist worksteal)

# ---- 4. the Triton compile gate on this triton ----------------------------------------
step "Triton compile gate (sm_80, sm_90; bf16, fp32) on triton $COMPAT_TRITON"
(cd "$BUILD/src" && METAEMBED_GATE_DTYPES=bf16,fp32 "$VENV/bin/python" -m pytest tests/test_triton.py -q \
  -p no:cacheprovider -ra -m gate)
step "passed"
}

main "$@"
