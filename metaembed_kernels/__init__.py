"""Fused kernels for MetaEmbed-style Matryoshka multi-vector retrieval (arXiv 2509.18095).

    from metaembed_kernels import (maxsim, maxsim_grouped, matryoshka_infonce,
                                   MatryoshkaInfoNCELoss, DEFAULT_GROUPS)
"""
from . import _extension  # loads the C++ ops (or warns and falls back)
from .backends import BackendUnavailableError, available_backends, select_backend
from .functional import DEFAULT_GROUPS, matryoshka_infonce, maxsim, maxsim_grouped
from .loss import MatryoshkaInfoNCELoss

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_GROUPS",
    "BackendUnavailableError",
    "MatryoshkaInfoNCELoss",
    "available_backends",
    "matryoshka_infonce",
    "maxsim",
    "maxsim_grouped",
    "select_backend",
]
