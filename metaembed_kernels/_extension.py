"""Loading the compiled extension (``metaembed_kernels._C``) and registering its ops.

The extension declares the op schemas (csrc/ops.cpp, ``TORCH_LIBRARY(metaembed, m)``) and
the CPU kernels (csrc/cpu), plus CUDA kernels (csrc/cuda) when built with CUDA. It is an
abi3 binary (any Python >= 3.10) tied to the torch it was built against, which the build
records in ``_build_info.json`` beside it. If that torch is not the one installed, importing
the package raises ``ExtensionBuildMismatch`` saying how to rebuild (loading a binary built
against another torch can crash or misbehave; it never silently falls back). If the
extension is missing or fails to load for another reason, the package still imports and
every call falls back to the reference backend; one warning says why.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Optional

import torch

from . import _autograd
from ._schemas import OP_NAMES

REBUILD = "pip install --no-build-isolation -e .  (in the source checkout; `make install` does it)"
BUILD_INFO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")


class ExtensionBuildMismatch(ImportError):
    """metaembed_kernels._C was built against a different torch than the one installed."""


def build_info(path: str = BUILD_INFO) -> Optional[dict]:
    """What the build recorded (torch version, CUDA), or None for a build that did not."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def check_build_matches(info: Optional[dict], installed: str = torch.__version__) -> None:
    """Raise ExtensionBuildMismatch when the extension was built against another torch."""
    if info is not None and info.get("torch") != installed:
        raise ExtensionBuildMismatch(
            f"metaembed_kernels._C was built against torch {info.get('torch')}, but torch {installed} is "
            f"installed. Rebuild the extension for this torch: {REBUILD}. (Or install the torch it was "
            f"built for: pip install torch=={str(info.get('torch')).split('+')[0]}.)"
        )


_C = None
_LOAD_ERROR: Optional[str] = None

check_build_matches(build_info())
try:
    from . import _C  # noqa: F401  (importing registers the ops with torch)
except (ImportError, OSError) as err:  # pragma: no cover - depends on the build
    _LOAD_ERROR = f"{type(err).__name__}: {err}"
    warnings.warn(
        f"metaembed_kernels: C++ extension not available ({_LOAD_ERROR}); "
        f"falling back to the pure-torch reference backend on CPU. To build it: {REBUILD}",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    # A binary that lacks an op of this package's table is an older build that Python found
    # first (e.g. a non-abi3 _C.cpython-3xx*.so left beside the abi3 one): say so, never fail
    # later with an AttributeError deep in the autograd registration.
    _missing = [op for op in OP_NAMES if not hasattr(torch.ops.metaembed, op)]
    if _missing:
        raise ExtensionBuildMismatch(
            f"{_C.__file__} is an older build of metaembed_kernels._C: it does not define "
            f"{', '.join(_missing)}. Delete it and rebuild: {REBUILD}"
        )
    # The CPU kernels fuse the loss's query gradient into its forward and save the maxsim
    # forward's argmax for its backward; the CUDA ones do neither.
    on_cpu = lambda device: device.type == "cpu"  # noqa: E731
    _autograd.register_all(fuses_query_gradient=on_cpu, saves_argmax=on_cpu)


def is_loaded() -> bool:
    return _C is not None


def load_error() -> Optional[str]:
    return _LOAD_ERROR


def _kernels_registered(device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"metaembed::{op}", key) for op in OP_NAMES)


# Which device kernels this build registered, decided once at import: backend selection
# reads this plain dict (torch.compile can trace a dict lookup, not the dispatcher query).
_HAS_KERNEL = {d: _C is not None and _kernels_registered(d) for d in ("cpu", "cuda")}


def has_kernel(device_type: str) -> bool:
    """Whether every extension op has a kernel registered for this device type."""
    return _HAS_KERNEL.get(device_type, False)


def cpu_isa() -> str:
    """The instruction set the CPU kernels dispatch to: "amx", "avx512_bf16", "avx512", "avx2" or "generic".

    By default the best this CPU supports: "amx" (bf16 similarity tiles on AMX-BF16's
    TDPBF16PS, everything else as "avx512") where the CPU has AMX and Linux grants this process
    the tile state; else "avx512_bf16" (bf16 consumed by vdpbf16ps) only where that instruction
    outruns the fp32 FMA (AMD Zen 4/5); on Intel without AMX (measured: a Xeon with
    AVX512-FP16, where vdpbf16ps does half the FMA's FLOPs) "avx512" widens bf16 to fp32 and
    runs it twice as fast.
    ``METAEMBED_CPU_ISA`` or ``set_cpu_isa`` force one.
    """
    return _C.cpu_isa() if _C is not None else "none"


def set_cpu_isa(name: str) -> str:
    """Force the CPU kernels' instruction set (for testing every path); returns the previous one.

    ``name`` is "auto" or one of the names ``supported_cpu_isas()`` returns.
    """
    if _C is None:
        raise RuntimeError(f"the C++ extension is not built ({_LOAD_ERROR})")
    return _C.set_cpu_isa(name)


def supported_cpu_isas() -> tuple:
    return tuple(_C.supported_cpu_isas()) if _C is not None else ()
