"""Fused kernels for MetaEmbed-style Matryoshka multi-vector retrieval (arXiv 2509.18095).

    from metaembed_kernels import (maxsim, maxsim_grouped, maxsim_paired, maxsim_paired_grouped,
                                   matryoshka_infonce, MatryoshkaInfoNCELoss, DEFAULT_GROUPS)
    from metaembed_kernels import MetaEmbed   # model wrapper on transformers backbones
    from metaembed_kernels import MultiVectorIndex, IndexCorruptedError   # retrieval index

``MetaEmbed`` and the index are loaded on first access (module ``__getattr__``), so
importing the kernels never imports the model code, transformers or the index.
"""
from . import _extension  # loads the C++ ops (or warns and falls back)
from .backends import BackendUnavailableError, available_backends, select_backend
from .functional import (
    DEFAULT_GROUPS,
    matryoshka_infonce,
    maxsim,
    maxsim_grouped,
    maxsim_paired,
    maxsim_paired_grouped,
)
from .loss import MatryoshkaInfoNCELoss

from ._version import __version__  # noqa: E402  (the one version number)

__all__ = [
    "DEFAULT_GROUPS",
    "BackendUnavailableError",
    "IndexCorruptedError",
    "MatryoshkaInfoNCELoss",
    "MetaEmbed",
    "MultiVectorIndex",
    "available_backends",
    "matryoshka_infonce",
    "maxsim",
    "maxsim_grouped",
    "maxsim_paired",
    "maxsim_paired_grouped",
    "select_backend",
]


def __getattr__(name):
    # PEP 562 lazy attribute: the model wrapper (and whatever it pulls in) loads on first use.
    if name == "MetaEmbed":
        from .model import MetaEmbed

        return MetaEmbed
    if name in ("MultiVectorIndex", "IndexCorruptedError"):
        from . import index

        return getattr(index, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
