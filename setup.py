"""Build of metaembed_kernels._C: op schemas, CPU kernels and (optionally) CUDA kernels.

Install after torch, without build isolation (an isolated build would download a second,
multi-GB torch just to compile):

    pip install torch && pip install --no-build-isolation -e .

The extension uses the Python limited API (one abi3 binary for every Python >= 3.10; it only
has to match the torch it was built against, which it records in _build_info.json).

Build switches (environment variables):
    METAEMBED_BUILD_CUDA   auto (default): build csrc/cuda when torch is a CUDA build and a
                           CUDA toolkit matching its CUDA major version is found (else one
                           line says why not); 1: require it; 0: never. The decision never
                           depends on a GPU being present.
    TORCH_CUDA_ARCH_LIST   CUDA architectures. Unset: the visible GPUs' (torch's default), or
                           DEFAULT_CUDA_ARCHS ("8.0;9.0+PTX": A100, H100/H200, PTX for newer
                           GPUs) when no GPU is visible (a Docker build stage, a CPU CI box).
    METAEMBED_CPU_ISAS     the CPU kernels' instruction-set variants to build besides generic:
                           all (default), none, or a comma list of avx2, avx512, avx512_bf16,
                           amx (the last two build on avx512). Only the built ones are
                           selectable at run time. The CUDA gate and test-compat builds use
                           none: those variants hold no torch code and take half the build.
    METAEMBED_PTXAS_VERBOSE 1: -Xptxas=-v (registers and spills per kernel; the CUDA gate).
    METAEMBED_DEBUG        1: -O0 -g, for debuggers and sanitizers.
    MAX_JOBS               parallel compile jobs (ninja), as for any torch extension.
"""
import glob
import importlib.machinery
import json
import os
import re
import shlex
import subprocess
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
BUILD_INFO = "_build_info.json"


def _flag(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def nvcc_version(cuda_home):
    """(major, minor) of the toolkit's nvcc, or None."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if not nvcc or not os.path.exists(nvcc):
        return None
    import subprocess

    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else None


def cuda_decision(flag: str, torch_cuda, cuda_home, toolkit):
    """(build CUDA?, reason): `toolkit` is nvcc's (major, minor) or None."""
    if flag in ("0", "false", "no", "off"):
        return False, "METAEMBED_BUILD_CUDA=0"
    problem = None
    if torch_cuda is None:
        problem = f"torch {torch.__version__} is not a CUDA build"
    elif cuda_home is None or toolkit is None:
        problem = "no CUDA toolkit found (set CUDA_HOME)"
    elif str(toolkit[0]) != str(torch_cuda).split(".")[0]:
        # torch refuses to compile across CUDA major versions
        problem = f"nvcc {toolkit[0]}.{toolkit[1]} does not match torch's CUDA {torch_cuda}"
    if flag in ("1", "true", "yes", "on"):
        if problem:
            raise RuntimeError(f"METAEMBED_BUILD_CUDA=1 but {problem} (torch.version.cuda={torch_cuda}, "
                               f"CUDA_HOME={cuda_home})")
        return True, "METAEMBED_BUILD_CUDA=1"
    return (problem is None), (problem or "torch is a CUDA build and a matching toolkit was found")


def cuda_arch_list(environ, gpu_visible: bool):
    """TORCH_CUDA_ARCH_LIST to build with, or None to let torch take the visible GPUs'.

    torch derives the list from the visible GPUs when it is unset; with none visible, some
    versions (2.11) crash (IndexError in _get_cuda_arch_flags). Never crash: take the
    documented default then."""
    given = environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if given:
        return given
    return None if gpu_visible else DEFAULT_CUDA_ARCHS


def nvcc_flags(opt, environ=os.environ):
    flags = opt + ["-lineinfo", "--expt-relaxed-constexpr"]
    if environ.get("METAEMBED_PTXAS_VERBOSE", "0") == "1":
        flags.append("-Xptxas=-v")  # the CUDA gate's register / spill report (scripts/ptxas_report.py)
    return flags


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


def shared_cxx_runtime(cxx=None, maps="/proc/self/maps") -> list:
    """The C++ runtime as a shared library, named on the link line before anything else can
    pull in libstdc++.a. A toolchain that links it statically (seen on a GPU image: its
    compiler wrappers put a private libstdc++ copy in the extension, next to the one torch
    already loaded) mixes the two copies' locale tables: formatting a number into an error
    message segfaulted there, and drops the number with -static-libstdc++ here.

    First choice: the libstdc++ this process has mapped (torch's, so the one the extension
    will meet at run time); else what the compiler finds. Empty when neither is known (the
    link is then left as it was)."""
    try:
        with open(maps) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and os.path.basename(fields[-1]).startswith("libstdc++.so"):
                    return [fields[-1]]
    except OSError:  # not Linux
        pass
    cxx = cxx or os.environ.get("CXX", "c++")  # the compiler torch's BuildExtension uses
    for name in ("libstdc++.so", "libstdc++.so.6"):
        try:
            out = subprocess.run(shlex.split(cxx) + [f"-print-file-name={name}"], capture_output=True, text=True,
                                 timeout=60)
        except (OSError, subprocess.SubprocessError):
            return []
        path = out.stdout.strip()
        if out.returncode == 0 and os.path.isabs(path) and os.path.exists(path):
            return [path]
    return []


CPU_ISAS = ("avx2", "avx512", "avx512_bf16", "amx")  # the variants beside generic (csrc/cpu/isa_*.cpp)


def omitted_cpu_isas(value: str) -> list:
    """The CPU ISA variants METAEMBED_CPU_ISAS leaves out (their files compile to stubs that
    report them unsupported). Raises ValueError naming what was expected."""
    value = value.strip().lower()
    if value in ("", "all"):
        return []
    wanted = set() if value == "none" else {name.strip() for name in value.split(",") if name.strip()}
    unknown = sorted(wanted - set(CPU_ISAS))
    if unknown:
        raise ValueError(f"METAEMBED_CPU_ISAS: unknown {unknown}; expected all, none or a comma list of "
                         f"{', '.join(CPU_ISAS)}")
    needy = sorted(wanted & {"avx512_bf16", "amx"})
    if needy and "avx512" not in wanted:
        raise ValueError(f"METAEMBED_CPU_ISAS: {', '.join(needy)} build on avx512's kernels: add avx512")
    return [name for name in CPU_ISAS if name not in wanted]


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
    omitted = omitted_cpu_isas(os.environ.get("METAEMBED_CPU_ISAS", "all"))
    kwargs = dict(
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"] + shared_cxx_runtime(),
        # torch adds Py_LIMITED_API (its oldest supported Python) for py_limited_api
        define_macros=[(f"METAEMBED_OMIT_{name.upper()}", "1") for name in omitted],
        py_limited_api=True,
    )
    if omitted:
        print(f"metaembed-kernels: METAEMBED_CPU_ISAS={os.environ['METAEMBED_CPU_ISAS']}: not building "
              f"{', '.join(omitted)}", file=sys.stderr)
    build_cuda, reason = cuda_decision(_flag("METAEMBED_BUILD_CUDA", "auto"), torch.version.cuda, CUDA_HOME,
                                       nvcc_version(CUDA_HOME))
    if not build_cuda:
        if torch.version.cuda is not None:
            print(f"metaembed-kernels: building without CUDA kernels: {reason}", file=sys.stderr)
        return [CppExtension("metaembed_kernels._C", sources, **kwargs)]
    archs = cuda_arch_list(os.environ, torch.cuda.is_available())
    if archs and not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        print(f"metaembed-kernels: no GPU visible and TORCH_CUDA_ARCH_LIST unset: building for {archs}",
              file=sys.stderr)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    kwargs["extra_compile_args"]["nvcc"] = nvcc_flags(opt)
    kwargs["define_macros"].append(("METAEMBED_WITH_CUDA", "1"))
    # After every other include dir, so the toolkit's own headers always win.
    for d in _cuda_extra_includes():
        kwargs["extra_compile_args"]["cxx"] += ["-idirafter", d]
    return [CUDAExtension("metaembed_kernels._C", sources, **kwargs)]


def remove_stale_binaries(built: str) -> list:
    """Delete other builds of the same module next to `built` (the binary just written).

    Python's importer tries the interpreter's own suffix (``_C.cpython-311-x86_64-linux-gnu.so``)
    before ``.abi3.so``, so a binary left by an older, non-abi3 build would shadow this one
    and register an older op table. Returns the paths removed."""
    folder, name = os.path.split(built)
    stem = name.split(".")[0]
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    removed = []
    for other in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if other != name and other.split(".")[0] == stem and other.endswith(suffixes):
            os.remove(os.path.join(folder, other))
            removed.append(os.path.join(folder, other))
    return removed


class BuildWithInfo(BuildExtension.with_options(use_ninja=True)):
    """Also writes _build_info.json next to the extension: the torch it was built against,
    read by metaembed_kernels/_extension.py before it loads the binary; and removes any
    other build of the extension beside it (remove_stale_binaries)."""

    def run(self):
        super().run()
        for ext in self.extensions:
            built = self.get_ext_fullpath(ext.name)
            if os.path.exists(built):
                for path in remove_stale_binaries(built):
                    print(f"metaembed-kernels: removed a stale build of the extension: {path}", file=sys.stderr)
            path = os.path.join(os.path.dirname(built), BUILD_INFO)
            with open(path, "w") as f:
                json.dump(dict(torch=torch.__version__, torch_cuda=torch.version.cuda,
                               cuda=any("METAEMBED_WITH_CUDA" == m[0] for m in ext.define_macros)), f)
                f.write("\n")


if __name__ == "__main__":
    setup(
        packages=find_packages(include=["metaembed_kernels", "metaembed_kernels.*"]),
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildWithInfo},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )
