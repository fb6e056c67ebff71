"""Drop-in adapters for the training and retrieval libraries people already use.

One module per host library, each reproducing that host's own scoring contract (shapes, mask
convention, output dtype) on our fused kernels, plus ``patch()`` / ``unpatch()`` to swap the
host's scoring functions in place::

    from metaembed_kernels.integrations import pylate as me_pylate
    me_pylate.patch()          # PyLate 1.6: losses, rerank, retrieve and evaluators on our kernels

    from metaembed_kernels.integrations import colpali as me_colpali
    me_colpali.patch()         # colpali-engine 0.3.18: score_multi_vector and the ColBERT losses

    from metaembed_kernels.integrations import sentence_transformers as me_st
    me_st.patch()              # sentence-transformers 6.2: util.maxsim and the multi-vector losses

Mask conventions differ between hosts and each adapter keeps its host's:

* PyLate and colpali-engine: a padded or masked document token is a zero vector (similarity 0),
  so it *can* win a max when every real similarity is negative; masked query tokens add 0.
* sentence-transformers 6 ``util.maxsim``: masked document tokens are excluded from the max, a
  document with no valid token scores the sentinel -1e9, and query masks weight the sum.

Importing ``metaembed_kernels`` (or this package, or an adapter module) never imports a host
library: only ``patch()`` does.
"""
__all__ = ["colpali", "pylate", "sentence_transformers"]
