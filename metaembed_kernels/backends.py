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

Every backend exposes the same two primitives, and the public functions in
``metaembed_kernels.functional`` do argument checking and loss assembly on top:

    maxsim_grouped(q, c, groups, q_mask, c_mask)            -> scores (G, Nq, Nc)
    infonce_terms(q, c, hn, labels, groups, scale, masks..) -> terms (G, Nq),
        terms[g, a] = logsumexp_b(logits_g[a, b]) - logits_g[a, labels[a]]
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Dict, Optional, Tuple

import torch

from . import _extension, reference

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")
# Triton on CPU tensors (the interpreter) is a test vehicle, never an automatic choice.
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot run these tensors."""


def triton_interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class Backend:
    name = ""

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype, groups=None) -> Optional[str]:
        """None if this backend can run tensors of this device and dtype (and, when given,
        these groups), else the reason it cannot."""
        raise NotImplementedError

    def maxsim_grouped(self, q, c, groups, q_mask, c_mask) -> torch.Tensor:
        raise NotImplementedError

    def infonce_terms(self, q, c, hard_negatives, labels, groups, scale, q_mask, c_mask, hn_mask):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<metaembed backend {self.name!r}>"


def _split(groups) -> Tuple[list, list]:
    return [g[0] for g in groups], [g[1] for g in groups]


class ReferenceBackend(Backend):
    name = "reference"

    def unavailable_reason(self, device, dtype, groups=None):
        return None

    def maxsim_grouped(self, q, c, groups, q_mask, c_mask):
        return reference.maxsim_grouped(q, c, groups, q_mask, c_mask)

    def infonce_terms(self, q, c, hard_negatives, labels, groups, scale, q_mask, c_mask, hn_mask):
        logits = reference.infonce_logits(q, c, groups, 1.0 / scale, hard_negatives, hn_mask, q_mask, c_mask)
        positive = logits.gather(-1, labels.view(1, -1, 1).expand(len(groups), -1, 1)).squeeze(-1)
        return torch.logsumexp(logits, dim=-1) - positive


class OpBackend(Backend):
    """A backend whose kernels are a registered op pair with the schemas of csrc/ops.cpp:
    ``<op_namespace>::<op_prefix>maxsim_grouped`` and ``...matryoshka_infonce``."""

    op_namespace = "metaembed"
    op_prefix = ""

    def _op(self, name: str):
        return getattr(getattr(torch.ops, self.op_namespace), self.op_prefix + name)

    def maxsim_grouped(self, q, c, groups, q_mask, c_mask):
        rq, rc = _split(groups)
        return self._op("maxsim_grouped")(q, c, rq, rc, q_mask, c_mask)

    def infonce_terms(self, q, c, hard_negatives, labels, groups, scale, q_mask, c_mask, hn_mask):
        rq, rc = _split(groups)
        op = self._op("matryoshka_infonce")
        terms, _lse = op(q, c, hard_negatives, labels, rq, rc, float(scale), q_mask, c_mask, hn_mask)
        return terms


class ExtensionBackend(OpBackend):
    """The compiled extension: csrc/cpu kernels for CPU tensors, csrc/cuda for CUDA tensors.

    Both register under the same op names; torch's dispatcher picks the device kernel.
    """

    def __init__(self, device_type: str):
        self.name = device_type
        self.device_type = device_type

    def unavailable_reason(self, device, dtype, groups=None):
        if device.type != self.device_type:
            return f"backend {self.name!r} runs {self.device_type} tensors, got tensors on {device}"
        if not _extension.is_loaded():
            return f"the C++ extension is not built ({_extension.load_error()})"
        if not _extension.has_kernel(self.device_type):
            return f"the C++ extension was built without {self.device_type.upper()} kernels"
        allowed = _KERNEL_DTYPES + ((torch.float64,) if self.device_type == "cpu" else ())
        if dtype not in allowed:
            return f"backend {self.name!r} does not support {dtype}"
        return None


# Looked up once: dynamo (torch 2.11) refuses to trace importlib.util.find_spec, so a lookup
# per call broke torch.compile(fullgraph=True) of any call that dispatches here.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


class TritonBackend(OpBackend):
    """Triton kernels (metaembed_kernels/triton), registered as ``metaembed::triton_*`` ops
    when that module is first imported."""

    name = "triton"
    op_prefix = "triton_"

    @functools.cached_property
    def _ops(self):
        return importlib.import_module("metaembed_kernels.triton.ops")

    def unavailable_reason(self, device, dtype, groups=None):
        if not _TRITON_INSTALLED:
            return "triton is not installed"
        if device.type == "cpu" and not triton_interpret_enabled():
            return "triton runs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"
        if device.type not in ("cpu", "cuda"):
            return f"triton does not run {device.type} tensors"
        if dtype not in _KERNEL_DTYPES:
            return f"backend 'triton' does not support {dtype}"
        try:
            self._ops  # registers the ops
        except ImportError as err:  # pragma: no cover - depends on the install
            return f"the triton kernels failed to import: {err}"
        if groups is not None:  # the verified tiles bound the largest group
            from .triton.heuristics import unsupported_reason

            return unsupported_reason(max(g[0] for g in groups), max(g[1] for g in groups))
        return None


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


def select_backend(requested: Optional[str], device: torch.device, dtype: torch.dtype, groups=None) -> Backend:
    """Resolve ``backend=`` (or METAEMBED_BACKEND) to a backend that can run these tensors
    (and, when given, these groups: auto skips a backend that cannot run them)."""
    if requested is not None and not isinstance(requested, str):
        raise TypeError(f"backend must be a string or None, got {type(requested).__name__}")
    name = requested if requested is not None else os.environ.get("METAEMBED_BACKEND", "")
    name = name or "auto"
    if name != "auto":
        backend = get_backend(name)
        reason = backend.unavailable_reason(device, dtype, groups)
        if reason is not None:
            raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
        return backend
    for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
        backend = _BACKENDS[candidate]
        if backend.unavailable_reason(device, dtype, groups) is None:
            return backend
    return _BACKENDS["reference"]


def available_backends(device="cpu", dtype=torch.float32) -> Tuple[str, ...]:
    """Names of the backends that can run tensors of this device and dtype."""
    device = torch.device(device)
    return tuple(n for n in BACKEND_NAMES if _BACKENDS[n].unavailable_reason(device, dtype) is None)
