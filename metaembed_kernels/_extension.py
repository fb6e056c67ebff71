"""Loading the compiled extension (``metaembed_kernels._C``) and registering its ops.

The extension declares the op schemas (csrc/ops.cpp, ``TORCH_LIBRARY(metaembed, m)``) and
the CPU kernels (csrc/cpu), plus CUDA kernels (csrc/cuda) when built with CUDA. If it is
missing or fails to load, the package still imports and every call falls back to the
reference backend; one warning says why.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from . import _autograd
from ._schemas import OP_NAMES

_C = None
_LOAD_ERROR: Optional[str] = None

try:
    from . import _C  # noqa: F401  (importing registers the ops with torch)
except (ImportError, OSError) as err:  # pragma: no cover - depends on the build
    _LOAD_ERROR = f"{type(err).__name__}: {err}"
    warnings.warn(
        f"metaembed_kernels: C++ extension not available ({_LOAD_ERROR}); "
        "falling back to the pure-torch reference backend on CPU.",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    _autograd.register_all()


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
    """The instruction set the CPU kernels dispatch to ("avx512", "avx2" or "generic")."""
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
