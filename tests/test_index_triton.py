"""The index's GPU path (triton/index_kernels.py + blockwise top-k) under TRITON_INTERPRET=1 on
CPU tensors: the same results as the CPU scan; and the compile gate covers its launches."""
import os

import pytest
import torch

import helpers
from metaembed_kernels import MultiVectorIndex, backends
from metaembed_kernels.index import search as S

pytestmark = pytest.mark.skipif(
    backends.get_backend("triton").unavailable_reason("cpu", torch.float32) is not None,
    reason="triton unavailable on CPU tensors (needs TRITON_INTERPRET=1 and triton)")


def build(dtype, gen, d=40, rc=9):
    index = MultiVectorIndex(d, rc, dtype=dtype)
    values = helpers.exact_values((30, rc, d), gen)
    if dtype == "int8":  # exactly representable after quantisation (scale 2^-7)
        values = torch.randint(-127, 128, (30, rc, d), generator=gen).float()
        values[..., 0] = 127
        values = values / 128
    mask = torch.rand(30, rc, generator=gen) > 0.3
    index.add(values[:12])
    index.add(values[12:], c_mask=mask[12:])
    index.remove([4])
    return index


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_triton_scan_matches_cpu_scan(dtype, monkeypatch):
    gen = torch.Generator().manual_seed(4)
    index = build(dtype, gen)
    q = helpers.exact_values((3, 5, 40), gen)
    q_mask = torch.rand(3, 5, generator=gen) > 0.2
    groups = ((1, 1), (5, 9), (2, 4))
    expected = index.search_grouped(q, 6, groups, q_mask=q_mask)
    filtered = index.search(q, 4, budget=(3, 7), filter_ids=list(range(0, 30, 2)))
    monkeypatch.setenv("METAEMBED_BACKEND", "triton")
    assert S.scanner_for(index._store, groups) == "triton"
    monkeypatch.setattr(S, "BLOCK_SCORE_BYTES", 3 * 5 * 4 * 7)  # several blocks: the running merge
    got = index.search_grouped(q, 6, groups, q_mask=q_mask)
    assert torch.equal(got[1], expected[1])
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=2e-6)
    got = index.search(q, 4, budget=(3, 7), filter_ids=list(range(0, 30, 2)))
    assert torch.equal(got[1], filtered[1])


def test_triton_block_scores_equal_maxsim_grouped(monkeypatch):
    """One block's scores (before the top-k) against maxsim_grouped on the gathered vectors."""
    from metaembed_kernels import maxsim_grouped
    from metaembed_kernels.triton import index_launch

    gen = torch.Generator().manual_seed(8)
    index = build("int8", gen, d=33, rc=16)
    st = index._store
    seg = st.segments[-1]
    q = helpers.exact_values((2, 4, 33), gen)
    groups = ((1, 1), (4, 16), (2, 5))
    out = index_launch.score_block(st, seg, q, None, groups, 3, seg.n)
    vectors, mask = st.gather_vectors(seg, torch.arange(3, seg.n), 16)
    torch.testing.assert_close(out, maxsim_grouped(q, vectors, groups, c_mask=mask, backend="reference"),
                               rtol=0, atol=2e-6)


def test_index_launches_are_in_the_compile_gate():
    """Every tile the index launcher picks (any Nq, every gate shape and dtype) is compiled by
    the gate (verify.py), which checks it for spills and shared memory."""
    from metaembed_kernels.triton import index_launch, verify
    from metaembed_kernels.index.storage import slab_bounds

    for dtype in (torch.float32, torch.bfloat16):
        for rq, rc in verify.SINGLE_TILE_SHAPES:
            compiled = {(p.kernel.__name__, p.config, p.constexprs["INT8"]) for _, p in verify.candidate_plans(dtype, rq, rc, 128)
                        if p.kernel.__name__ == "index_scores_kernel"}
            bounds = slab_bounds(rc)
            widths = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])]
            for cdtype in ([torch.float32, torch.int8] if dtype == torch.float32 else [dtype]):
                data = [torch.empty(10, w, 128, dtype=cdtype, device="meta") for w in widths]
                scales = [torch.empty(10, w, 2, device="meta") for w in widths] if cdtype == torch.int8 else None
                for nq in (1, 2, 3, 5, 8, 17, 64, 300, 1000):
                    q = torch.empty(nq, rq, 128, dtype=dtype, device="meta")
                    _, plans = index_launch.plan_index_scores(q, None, data, None, scales, bounds, ((rq, rc),),
                                                              10, 0, 10, interpret=False)
                    key = (plans[0].kernel.__name__, plans[0].config, cdtype == torch.int8)
                    assert key in compiled, (dtype, cdtype, rq, rc, nq, plans[0].config)
