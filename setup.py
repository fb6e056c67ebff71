"""Build of metaembed_kernels._C: op schemas, CPU kernels and (optionally) CUDA kernels.

Install after torch, without build isolation (an isolated build would download a second,
multi-GB torch just to compile):

    pip install torch==2.13.0 && pip install --no-build-isolation -e .

Build switches (environment variables):
    METAEMBED_BUILD_CUDA   auto (default): build csrc/cuda when torch is a CUDA build and a
                           CUDA toolkit is found; 1: require it; 0: never. The decision never
                           depends on a GPU being present.
    METAEMBED_DEBUG        1: -O0 -g, for debuggers and sanitizers.
    MAX_JOBS               parallel compile jobs (ninja), as for any torch extension.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _build_cuda() -> bool:
    flag = os.environ.get("METAEMBED_BUILD_CUDA", "auto").strip().lower()
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        if not available:
            raise RuntimeError(
                "METAEMBED_BUILD_CUDA=1 but torch is not a CUDA build or no CUDA toolkit was found "
                f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})"
            )
        return True
    return available


def _cuda_extra_includes():
    """ATen/cuda/CUDAContext.h includes cusparse.h, which a bare toolkit may lack; torch's
    CUDA wheels ship it in the nvidia-* packages (nvidia/cu13/include for CUDA 13)."""
    if CUDA_HOME and os.path.isfile(os.path.join(CUDA_HOME, "include", "cusparse.h")):
        return []
    found = []
    for base in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cusparse/include"):
            d = os.path.join(base, sub)
            if os.path.isfile(os.path.join(d, "cusparse.h")) and d not in found:
                found.append(d)
    return found


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extensions():
    debug = os.environ.get("METAEMBED_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fopenmp: at::parallel_for is an inline OpenMP region compiled into this extension.
    # No -march flags: the ISA-specific kernels select their target per file and are
    # chosen at run time (csrc/cpu/isa_select.cpp).
    cxx = opt + ["-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
    sources = ["csrc/ops.cpp"] + _sources("csrc/cpu/*.cpp")
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    if _build_cuda():
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
        nvcc = opt + ["-lineinfo", "--expt-relaxed-constexpr", "-Xptxas=-v"]
        kwargs["extra_compile_args"]["nvcc"] = nvcc
        kwargs["define_macros"] = [("METAEMBED_WITH_CUDA", "1")]
        # After every other include dir, so the toolkit's own headers always win.
        for d in _cuda_extra_includes():
            kwargs["extra_compile_args"]["cxx"] += ["-idirafter", d]
        return [CUDAExtension("metaembed_kernels._C", sources, **kwargs)]
    return [CppExtension("metaembed_kernels._C", sources, **kwargs)]


setup(
    packages=find_packages(include=["metaembed_kernels", "metaembed_kernels.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
