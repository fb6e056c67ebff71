"""Budgeted multi-vector retrieval: one scan serves every Matryoshka budget.

    from metaembed_kernels import MultiVectorIndex

    index = MultiVectorIndex(dim, num_vectors, dtype="bfloat16", device="cpu")
    ids = index.add(c)                                   # c (N, Rc, D)
    scores, ids = index.search(q, k, budget=(2, 4))      # exact top-k at a budget
    scores, ids = index.search_grouped(q, k, DEFAULT_GROUPS)   # every budget, one pass

    storage.py      prefix slabs, int8 quantisation (byte layout), segments, tombstones
    search.py       top-k scans per backend and the (score desc, id asc) merge
    persistence.py  atomic save, verified and memory-mapped load (directory layout)
    distributed.py  sharded search over torch.distributed (all-gather of local top-k)
    index.py        the MultiVectorIndex class: argument checks and orchestration

Importing this package imports neither tqdm nor torch.distributed: they load when
``add(progress=True)`` or ``process_group=`` first needs them.
"""
from .index import MultiVectorIndex
from .persistence import FORMAT_VERSION, IndexCorruptedError

__all__ = ["MultiVectorIndex", "IndexCorruptedError", "FORMAT_VERSION"]
