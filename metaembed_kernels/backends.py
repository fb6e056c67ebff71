"""Backend selection: the one place that decides which implementation runs.

    backend=None / "auto"  ->  METAEMBED_BACKEND if set, else the fastest available
                               backend for the tensors' device and dtype:
                                 cpu tensors:  "cpu" (C++ extension), else "reference"
                                 cuda tensors: "triton", then "cuda" (C++/CUDA extension),
                                               else "reference"
    "reference"            ->  pure torch (metaembed_kernels.reference), any device/dtype
    "cpu"                  ->  C++ kernels in csrc/cpu, CPU tensors
    "cuda"                 ->  CUDA C++ kernels in csrc/cuda, CUDA tensors
    "triton"               ->  Triton kernels, CUDA tensors; CPU tensors too when
                               TRITON_INTERPRET=1 (the interpreter runs them on the CPU)

Every backend is a set of torch.library custom ops with the schemas of ``_schemas.py``
(``metaembed::<prefix><op>``), the fake kernels and autograd of ``_autograd.py``, and the
argument checks of ``_validation.py``. The public functions in ``functional.py`` do argument
checking and loss assembly on top of three primitives:

    maxsim_grouped(q, c, groups, q_mask, c_mask)             -> scores (G, Nq, Nc)
    maxsim_paired_grouped(q, c, groups, q_mask, c_mask)      -> scores (G, B, N)
    infonce_terms(q, c, hn, labels, groups, scale, masks..)  -> terms (G, Nq),
        terms[g, a] = logsumexp_b(logits_g[a, b]) - logits_g[a, labels[a]]

Selection is compile-safe: whether a backend can run a call depends only on Python
constants (names, device type, dtype, budget), and is evaluated by ``_unavailable_reason``,
which torch.compile treats as a constant (``assume_constant_result``), so a compiled
function selects its backend on the first call without a graph break.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Dict, Optional, Tuple

import torch

from . import _extension, _reference_ops  # noqa: F401  (importing registers the reference ops)

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")
# Triton on CPU tensors (the interpreter) is a test vehicle, never an automatic choice.
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ENV_VAR = "METAEMBED_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot run these tensors."""


def triton_interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _split(groups) -> Tuple[list, list]:
    return [g[0] for g in groups], [g[1] for g in groups]


class Backend:
    """A registered op family ``<op_namespace>::<op_prefix><op>`` (schemas: _schemas.py)."""

    name = ""
    op_namespace = "metaembed"
    op_prefix = ""

    def unavailable_reason(self, device_type: str, dtype: torch.dtype, max_rq: int = 1, max_rc: int = 1) -> Optional[str]:
        """None if this backend can run tensors of this device type and dtype, and a budget
        of max_rq x max_rc tokens; else the reason it cannot."""
        raise NotImplementedError

    def _op(self, name: str):
        return getattr(getattr(torch.ops, self.op_namespace), self.op_prefix + name)

    # save_argmax: q or c will need a gradient, so a backend that can (cpu) keeps the forward's
    # maximising tokens and its backward recomputes nothing.
    def maxsim_grouped(self, q, c, groups, q_mask, c_mask, save_argmax: bool = False):
        scores, _argmax = self._op("maxsim_grouped")(q, c, *_split(groups), q_mask, c_mask, save_argmax)
        return scores

    def maxsim_paired_grouped(self, q, c, groups, q_mask, c_mask, save_argmax: bool = False):
        scores, _argmax = self._op("maxsim_paired_grouped")(q, c, *_split(groups), q_mask, c_mask, save_argmax)
        return scores

    def infonce_terms(self, q, c, hard_negatives, labels, groups, scale, q_mask, c_mask, hn_mask,
                      query_gradient: bool = False):
        """query_gradient: q will need a gradient, so a backend that can fuses it into the
        forward (its backward then skips the second pass for dq)."""
        op = self._op("matryoshka_infonce")
        terms, _lse, _jq = op(q, c, hard_negatives, labels, *_split(groups), float(scale), q_mask, c_mask, hn_mask,
                              query_gradient)
        return terms

    def __repr__(self) -> str:
        return f"<metaembed backend {self.name!r}>"


class ReferenceBackend(Backend):
    """Pure torch (``_reference_ops.py`` over ``reference.py``): any device, any float dtype."""

    name = "reference"
    op_prefix = "reference_"

    def unavailable_reason(self, device_type, dtype, max_rq=1, max_rc=1):
        return None


class ExtensionBackend(Backend):
    """The compiled extension: csrc/cpu kernels for CPU tensors, csrc/cuda for CUDA tensors.

    Both register under the same op names; torch's dispatcher picks the device kernel.
    """

    def __init__(self, device_type: str):
        self.name = device_type
        self.device_type = device_type

    def unavailable_reason(self, device_type, dtype, max_rq=1, max_rc=1):
        if device_type != self.device_type:
            return f"backend {self.name!r} runs {self.device_type} tensors, got {device_type} tensors"
        if not _extension.is_loaded():
            return f"the C++ extension is not built ({_extension.load_error()})"
        if not _extension.has_kernel(self.device_type):
            return f"the C++ extension was built without {self.device_type.upper()} kernels"
        allowed = _KERNEL_DTYPES + ((torch.float64,) if self.device_type == "cpu" else ())
        if dtype not in allowed:
            return f"backend {self.name!r} does not support {dtype}"
        return None


class TritonBackend(Backend):
    """Triton kernels (metaembed_kernels/triton), registered as ``metaembed::triton_*`` ops
    when that module is first imported (on the first call that selects triton)."""

    name = "triton"
    op_prefix = "triton_"

    @functools.cached_property
    def _triton_installed(self) -> bool:
        return importlib.util.find_spec("triton") is not None

    @functools.cached_property
    def _ops(self):
        return importlib.import_module("metaembed_kernels.triton.ops")

    def unavailable_reason(self, device_type, dtype, max_rq=1, max_rc=1):
        if not self._triton_installed:
            return "triton is not installed"
        if device_type == "cpu" and not triton_interpret_enabled():
            return "triton runs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"
        if device_type not in ("cpu", "cuda"):
            return f"triton does not run {device_type} tensors"
        if dtype not in _KERNEL_DTYPES:
            return f"backend 'triton' does not support {dtype}"
        try:
            self._ops  # registers the ops
        except ImportError as err:  # pragma: no cover - depends on the install
            return f"the triton kernels failed to import: {err}"
        from .triton.heuristics import unsupported_reason

        return unsupported_reason(max_rq, max_rc)


_BACKENDS: Dict[str, Backend] = {
    "reference": ReferenceBackend(),
    "cpu": ExtensionBackend("cpu"),
    "cuda": ExtensionBackend("cuda"),
    "triton": TritonBackend(),
}


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES} or None, got {name!r}")
    return _BACKENDS[name]


@torch.compiler.assume_constant_result
def _unavailable_reason(name: str, device_type: str, dtype: torch.dtype, max_rq: int, max_rc: int) -> str:
    """"" if backend ``name`` can run the call, else why not. A pure function of constants:
    torch.compile evaluates it while tracing and bakes the answer into the graph."""
    return _BACKENDS[name].unavailable_reason(device_type, dtype, max_rq, max_rc) or ""


def _requested_name(requested: Optional[str]) -> str:
    if requested is not None:
        if not isinstance(requested, str):
            raise TypeError(f"backend must be a string or None, got {type(requested).__name__}")
        if requested != "auto" and requested not in _BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES} or None, got {requested!r}")
        return requested
    name = os.environ.get(ENV_VAR, "") or "auto"
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(
            f"the {ENV_VAR} environment variable must be one of {('auto',) + BACKEND_NAMES} or unset, "
            f"got {ENV_VAR}={name!r}"
        )
    return name


def select_backend(requested: Optional[str], device: torch.device, dtype: torch.dtype, groups=None) -> Backend:
    """Resolve ``backend=`` (or METAEMBED_BACKEND) to a backend that can run these tensors
    (and, when given, these groups: auto skips a backend that cannot run them)."""
    name = _requested_name(requested)
    max_rq = max(g[0] for g in groups) if groups else 1
    max_rc = max(g[1] for g in groups) if groups else 1
    if name != "auto":
        reason = _unavailable_reason(name, device.type, dtype, max_rq, max_rc)
        if reason:
            raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
        return _BACKENDS[name]
    for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
        if not _unavailable_reason(candidate, device.type, dtype, max_rq, max_rc):
            return _BACKENDS[candidate]
    return _BACKENDS["reference"]


def available_backends(device="cpu", dtype=torch.float32) -> Tuple[str, ...]:
    """Names of the backends that can run tensors of this device and dtype."""
    device = torch.device(device)
    return tuple(n for n in BACKEND_NAMES if _BACKENDS[n].unavailable_reason(device.type, dtype) is None)
