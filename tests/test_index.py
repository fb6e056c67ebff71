"""MultiVectorIndex: search parity with brute force (maxsim_grouped + sort), ordering and ties,
padding, removal, filters, the cascade, every bad input of the issue, and the API's small print."""
import itertools
import random

import pytest
import torch

import helpers
from metaembed_kernels import DEFAULT_GROUPS, MultiVectorIndex, _extension, maxsim_grouped
from metaembed_kernels.index import search as S
from metaembed_kernels.index.storage import dequantize_int8, slab_bounds

DTYPES = ("float32", "bfloat16", "int8")


# ---- data whose every score is exact in float32 (ties included) ---------------------------

def exact_candidates(n, rc, d, dtype, gen):
    """float32/bfloat16: multiples of 1/4 in [-1, 1]. int8: integers in [-127, 127] / 128 with a
    127 in every vector, so the int8 scale is exactly 2^-7 and dequantising is exact."""
    if dtype != "int8":
        return helpers.exact_values((n, rc, d), gen)
    x = torch.randint(-127, 128, (n, rc, d), generator=gen)
    x[..., torch.randint(0, d, (1,), generator=gen).item()] = 127
    return x.float() / 128


def stored_vectors(index):
    """Every stored row's vectors as the index scores them (dequantised), its mask, ids, live."""
    st = index._store
    vecs, masks = [], []
    for seg in st.segments:
        v, m = st.gather_vectors(seg, torch.arange(seg.n), st.num_vectors)
        vecs.append(v)
        masks.append(m)
    c = torch.cat(vecs) if vecs else torch.empty(0, st.num_vectors, st.dim)
    cm = torch.cat(masks) if st.masked else None
    return c, cm, st.all_ids(), st.all_live()


def brute_force(index, q, groups, k, q_mask=None, allowed_ids=None):
    """maxsim_grouped (float64 reference) of every live row, sorted by (score desc, id asc)."""
    c, cm, ids, live = stored_vectors(index)
    compute = torch.bfloat16 if index.dtype == "bfloat16" else torch.float32
    scores = maxsim_grouped(q.to(compute).double(), c.double(), groups, q_mask=q_mask, c_mask=cm,
                            backend="reference")
    keep = live.clone()
    if allowed_ids is not None:
        keep &= torch.isin(ids, torch.as_tensor(allowed_ids, dtype=torch.int64))
    G, nq = scores.shape[:2]
    out_s = torch.full((G, nq, k), float("-inf"), dtype=torch.float64)
    out_i = torch.full((G, nq, k), -1, dtype=torch.int64)
    rows = keep.nonzero().squeeze(1).tolist()
    for g in range(G):
        for a in range(nq):
            ranked = sorted(rows, key=lambda r: (-scores[g, a, r].item(), ids[r].item()))[:k]
            for x, r in enumerate(ranked):
                out_s[g, a, x] = scores[g, a, r]
                out_i[g, a, x] = ids[r]
    return out_s, out_i


def assert_same_results(got, expected, exact: bool, name=""):
    (gs, gi), (es, ei) = got, expected
    if exact:
        assert torch.equal(gi, ei), f"{name}: ids differ\n{gi}\n{ei}"
        assert torch.equal(gs.double(), es), f"{name}: scores differ"
    else:  # random values: scores within float32 tolerance, ids equal unless a near tie
        helpers.assert_close(gs.nan_to_num(neginf=-1e30), es.nan_to_num(neginf=-1e30), 1e-4, name, rtol=1e-4)
        diff = gi != ei
        if diff.any():
            near = (es[diff] - gs[diff]).abs() <= 1e-4 * (1 + es[diff].abs())
            assert near.all(), f"{name}: ids differ beyond near ties"


def cases():
    """Awkward shapes: 1-vector candidates, Rc not a power of two, D not a multiple of 16 / 4,
    1-token queries, k around N."""
    return [
        # nq, rq, rc, d, n
        (1, 1, 1, 1, 5),
        (3, 5, 7, 24, 40),
        (2, 16, 64, 129, 23),
        (17, 3, 9, 33, 61),
        (1, 2, 4, 130, 300),
        (3, 8, 40, 64, 30),  # AMX: 16 rows of one slab read in place (D % 32 == 0), the rest copied
    ]


@pytest.fixture(params=_extension.supported_cpu_isas() or ["reference"])
def scan_isa(request):
    """Every instruction set the CPU scan can use here (or the reference scanner without the
    extension)."""
    if request.param == "reference":
        yield "reference"
        return
    previous = _extension.set_cpu_isa(request.param)
    yield request.param
    _extension.set_cpu_isa(previous)


@pytest.mark.parametrize("dtype", DTYPES)
def test_search_grouped_matches_brute_force_with_ties(scan_isa, dtype):
    gen = torch.Generator().manual_seed(7)
    rng = random.Random(7)
    for nq, rq, rc, d, n in cases():
        index = MultiVectorIndex(d, rc, dtype=dtype)
        c = exact_candidates(n, rc, d, dtype, gen)
        c[n // 2] = c[0]  # a duplicate candidate: an exact tie broken by id
        perm_ids = torch.randperm(10 * n, generator=gen)[:n]  # ids not in row order
        index.add(c, ids=perm_ids)
        q = helpers.exact_values((nq, rq, d), gen)
        groups = helpers.random_groups(rq, rc, rng)
        for k in (1, 3, 16, 17, n, n + 4):  # 16 / 17: the largest lane list and the smallest heap (index_order.h)
            got = index.search_grouped(q, k, groups)
            assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64
            assert got[0].shape == (len(groups), nq, k)
            assert_same_results(got, brute_force(index, q, groups, k), exact=True,
                                name=f"{scan_isa} {dtype} {(nq, rq, rc, d, n)} k={k}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_query_of_16_tokens_or_fewer(scan_isa, dtype):
    """One query of <= 16 tokens at r_c > 8 takes the engine's 16 x 16 tile on AVX-512: rows
    read in place where 16 of them share a slab at the tile's stride (float32 at D = 64 and
    128: tokens 16-31, 32-47, 48-63), converted or copied elsewhere, zero-padded partial tiles,
    the lone last row of r_c = 8 m + 1 (33, 17, 25, 41); exact against brute force, as a search
    and as a cascade's rerank of every row."""
    gen = torch.Generator().manual_seed(8)
    for rq, rc, d, budgets in ((16, 64, 64, [(16, 64), (16, 40), (7, 33)]),
                               (12, 64, 128, [(12, 64), (12, 17), (5, 25)]),
                               (16, 41, 300, [(16, 41), (9, 24)])):
        index = MultiVectorIndex(d, rc, dtype=dtype)
        index.add(exact_candidates(60, rc, d, dtype, gen))
        q = helpers.exact_values((1, rq, d), gen)
        for budget in budgets:
            expected = brute_force(index, q, [budget], 7)
            for shortlist in (None, ((1, 1), 60)):
                s, i = index.search(q, 7, budget=budget, shortlist=shortlist)
                assert_same_results((s[None], i[None]), expected, exact=True,
                                    name=f"{scan_isa} {dtype} D={d} {budget} shortlist={shortlist}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_masks_removed_filtered_and_segments(scan_isa, dtype, monkeypatch):
    from metaembed_kernels.index import storage

    monkeypatch.setattr(storage, "MIN_SEGMENT_ROWS", 16)  # several segments from small adds
    gen = torch.Generator().manual_seed(11)
    nq, rq, rc, d, n = 4, 6, 13, 40, 50
    index = MultiVectorIndex(d, rc, dtype=dtype)
    c = exact_candidates(n, rc, d, dtype, gen)
    q_mask, c_mask = helpers.random_masks(nq, rq, n, rc, gen)
    index.add(c[:20])  # unmasked rows first: masks are switched on by the second batch
    index.add(iter([c[20:35], c[35:]]), c_mask=iter([c_mask[20:35], c_mask[35:]]))
    extra = exact_candidates(7, rc, d, dtype, gen)
    index.add(extra, ids=torch.arange(1000, 1007))
    assert len(index._store.segments) >= 2
    removed = [3, 21, 1003]
    index.remove(removed)
    q = helpers.exact_values((nq, rq, d), gen)
    groups = ((1, 1), (rq, rc), (2, 5), (3, 13))
    for k in (1, 5, 80):
        got = index.search_grouped(q, k, groups, q_mask=q_mask)
        exp = brute_force(index, q, groups, k, q_mask)
        assert_same_results(got, exp, exact=True, name=f"{scan_isa} {dtype} k={k}")
        assert not torch.isin(got[1], torch.tensor(removed)).any()
    allowed = [0, 1, 2, 3, 22, 23, 40, 1001, 1003, 99999]  # removed and unknown ids are ignored
    got = index.search(q, 10, budget=(rq, rc), q_mask=q_mask, filter_ids=allowed)
    exp = brute_force(index, q, ((rq, rc),), 10, q_mask, allowed_ids=allowed)
    assert_same_results((got[0][None], got[1][None]), exp, exact=True, name="filter")
    # 7 allowed live ids (3 and 1003 are removed, 99999 unknown): 7 results, then padding
    assert ((got[1] >= 0).sum(1) == 7).all() and (got[1][:, 7:] == -1).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_queries(scan_isa, dtype, num_threads):
    """Batched search: >= 128 query tokens per thread (the threads split the queries), the
    one-token budgets that take the fused threshold test ((1, 1) without a candidate mask) and
    the one-token fold ((1, r_c) with r_c below the tile height, or a candidate mask), the wide
    bfloat16 panels (blocks of >= 64 query tokens) with tiles along r_c and a short last tile,
    the narrow int8 panels (blocks of <= 16 query tokens, 16-row tiles), int8's bar test on the
    integer tile (one budget with r_c <= the tile height, any r_q; r_q = 2 and 4 sum their tokens by
    permutes), and one query at small
    budgets (the few-token scan: groups of 16 consecutive rows, or not around removed ids, slabs of
    one and of several vectors per row, D past 2 x 64 bytes); equal to brute force, with query counts that leave partial panels, non-prefix query masks
    with empty rows, removed ids, and the same bits on 1 and 2 threads."""
    gen = torch.Generator().manual_seed(21)
    for nq, rq, rc, d, n, budgets in ((301, 3, 5, 37, 70, ((1, 1), (1, 3), (1, 5), (3, 5))),
                                      (70, 2, 13, 20, 40, ((1, 1), (2, 13), (2, 7))),
                                      (16, 1, 17, 37, 70, ((1, 1), (1, 3), (1, 17))),
                                      (5, 3, 17, 20, 40, ((3, 5), (3, 17), (2, 1))),
                                      (1, 16, 9, 33, 40, ((16, 9), (16, 2), (13, 5))),
                                      # r_q = 2 and 4 with r_c <= the tile height: the int8 query
                                      # sums by permutes, 16 queries per chunk, partial chunks
                                      (15, 4, 8, 36, 40, ((4, 8), (4, 3), (2, 5))),
                                      (17, 2, 6, 20, 40, ((2, 6), (2, 2))),
                                      (1, 4, 13, 130, 70, ((1, 1), (2, 4), (4, 8), (3, 13), (1, 5))),
                                      # the few-token dots' D tails: all of D one (AVX2 int8:
                                      # 32 bytes, float32: 8 dims), and 45 = 32 + 8 + 5; 1-4 tokens
                                      (1, 4, 8, 20, 70, ((1, 1), (3, 8), (4, 2))),
                                      (2, 2, 5, 45, 70, ((1, 1), (2, 5), (1, 3))),
                                      # D a multiple of 16: AVX2 reads bfloat16 rows in pair
                                      # order (even dims, odd dims) against a permuted query
                                      (1, 4, 13, 64, 70, ((1, 1), (2, 4), (4, 8), (3, 13))),
                                      (2, 2, 5, 32, 70, ((1, 1), (2, 5))),
                                      # D a multiple of 32: AMX reads 16 consecutive rows in
                                      # place (else copies them); 3 and 4 + 2 query halves per
                                      # block, 2 and 3 k-steps
                                      (40, 1, 3, 64, 70, ((1, 1), (1, 3))),
                                      (90, 2, 2, 96, 70, ((1, 1),))):
        q = helpers.exact_values((nq, rq, d), gen)
        q_mask, c_mask = helpers.random_masks(nq, rq, n, rc, gen)
        c = exact_candidates(n, rc, d, dtype, gen)
        c[9] = c[4]  # exact ties, broken by id
        for masked in (False, True):
            index = MultiVectorIndex(d, rc, dtype=dtype)
            index.add(c, ids=torch.randperm(5 * n, generator=gen)[:n], c_mask=c_mask if masked else None)
            index.remove(index._store.all_ids()[[2, 33]].tolist())
            for budget, qm in itertools.product(budgets, (None, q_mask)):
                exp = brute_force(index, q, (budget,), 4, qm)
                results = []
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    got = index.search(q, 4, budget=budget, q_mask=qm)
                    assert_same_results((got[0][None], got[1][None]), exp, exact=True,
                                        name=f"{scan_isa} {dtype} {(nq, rq, rc)} masked={masked} {budget} "
                                             f"q_mask={qm is not None} threads={threads}")
                    results.append(got)
                assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_int8_near_ties_need_the_error_bound(scan_isa):
    """int8 candidates one integer step apart: their exact scores differ by less than the query's
    quantisation error, so the integer scan's approximate order is not the exact one and only
    the bound (approximate score + N_max * err >= bar) keeps every true top-k candidate for the
    exact rescore. One query at small budgets (the few-token scans, single group and grouped)
    and 16 queries (the integer tiles); exact against brute force."""
    gen = torch.Generator().manual_seed(31)
    n, rc, d = 400, 8, 64
    base = torch.randint(-100, 101, (1, rc, d), generator=gen)
    x = (base + torch.randint(-1, 2, (n, rc, d), generator=gen)).clamp(-127, 127)
    x[..., 0] = 127  # every scale exactly 2^-7: dequantising is exact
    c = x.float() / 128
    index = MultiVectorIndex(d, rc, dtype="int8")
    index.add(c)
    # quarters in [-1, 1] with a 1 in every token: sq = 1/127, so y = round(127 q) leaves a
    # residual on every quarter that is not 0 or +-1
    for nq in (1, 16):
        q = helpers.exact_values((nq, 4, d), gen)
        q[..., 1] = 1.0
        for budget in ((1, 1), (2, 4), (4, 8)):
            got = index.search(q, 10, budget=budget)
            assert_same_results((got[0][None], got[1][None]), brute_force(index, q, (budget,), 10), exact=True,
                                name=f"{scan_isa} nq={nq} {budget}")
        groups = ((1, 1), (2, 4), (4, 8))
        assert_same_results(index.search_grouped(q, 10, groups), brute_force(index, q, groups, 10), exact=True,
                            name=f"{scan_isa} nq={nq} grouped")


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_values_within_tolerance(dtype):
    gen = torch.Generator().manual_seed(3)
    index = MultiVectorIndex(64, 16, dtype=dtype)
    index.add(torch.randn(300, 16, 64, generator=gen))
    q = torch.randn(5, 8, 64, generator=gen)
    got = index.search_grouped(q, 10, ((1, 1), (2, 4), (8, 16)))
    assert_same_results(got, brute_force(index, q, ((1, 1), (2, 4), (8, 16)), 10), exact=False, name=dtype)


def test_padding_and_empty_index():
    index = MultiVectorIndex(8, 4, dtype="float32")
    q = torch.randn(2, 3, 8)
    scores, ids = index.search(q, 5)
    assert ids.shape == (2, 5) and (ids == -1).all() and torch.isinf(scores).all() and (scores < 0).all()
    index.add(torch.randn(3, 4, 8))
    scores, ids = index.search(q, 5)
    assert (ids[:, :3] >= 0).all() and (ids[:, 3:] == -1).all()
    assert torch.isfinite(scores[:, :3]).all() and (scores[:, 3:] == float("-inf")).all()
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    index.remove(index.ids())
    assert len(index) == 0
    assert (index.search(q, 2)[1] == -1).all()
    assert index.search(q[:0], 2)[0].shape == (0, 2)


def test_all_candidates_masked_score_zero():
    index = MultiVectorIndex(4, 3, dtype="float32")
    c = -torch.ones(2, 3, 4)
    mask = torch.tensor([[False, False, False], [True, True, True]])
    index.add(c, c_mask=mask)
    scores, ids = index.search(torch.ones(1, 2, 4), 2)
    # fully masked candidate scores 0 (every query vector faces no valid vector), beating -8
    assert ids.tolist() == [[0, 1]] and scores.tolist() == [[0.0, -8.0]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_shortlist_cascade_reranks_exactly(dtype):
    gen = torch.Generator().manual_seed(5)
    index = MultiVectorIndex(32, 8, dtype=dtype)
    index.add(exact_candidates(200, 8, 32, dtype, gen))
    q = helpers.exact_values((3, 4, 32), gen)
    scores, ids = index.search(q, 5, budget=(4, 8), shortlist=((1, 1), 40))
    first_s, first_i = index.search(q, 40, budget=(1, 1))
    c, _, all_ids, _ = stored_vectors(index)
    compute = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    for a in range(3):
        rows = [int((all_ids == i).nonzero()) for i in first_i[a].tolist()]
        full = maxsim_grouped(q[a:a + 1].to(compute).double(), c[rows].double(), ((4, 8),), backend="reference")[0, 0]
        ranked = sorted(range(40), key=lambda x: (-full[x].item(), first_i[a, x].item()))[:5]
        assert ids[a].tolist() == [first_i[a, x].item() for x in ranked]
        assert scores[a].double().tolist() == [full[x].item() for x in ranked]
    # the full shortlist (k1 >= N) is the exact search
    exact = index.search(q, 5, budget=(4, 8))
    assert torch.equal(index.search(q, 5, budget=(4, 8), shortlist=((1, 1), 500))[1], exact[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_query_rerank_splits_its_rows_across_threads(dtype, num_threads):
    """A cascade serving one query reranks its k1 rows on every thread, each thread a slice of
    them (index_ops.cpp: slices of >= ~1 MFLOP, so 2-3 here at (8, 16), D = 64): every slot holds
    the exact score whatever the thread count, and the slots past the live candidates stay
    empty (id -1, score -inf)."""
    gen = torch.Generator().manual_seed(6)
    index = MultiVectorIndex(64, 16, dtype=dtype)
    index.add(exact_candidates(300, 16, 64, dtype, gen))
    index.remove(torch.arange(0, 300, 3))  # 200 live
    q = helpers.exact_values((1, 8, 64), gen)
    c, _, all_ids, _ = stored_vectors(index)
    compute = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    full = maxsim_grouped(q.to(compute).double(), c.double(), ((8, 16),), backend="reference")[0, 0]
    score_of = dict(zip(all_ids.tolist(), full.tolist()))
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        for k1 in (150, 250):  # 250 > 200 live: 50 empty rows in the shortlist
            scores, ids = index.search(q, k1, budget=(8, 16), shortlist=((1, 1), k1))
            first = [i for i in index.search(q, k1, budget=(1, 1))[1][0].tolist() if i >= 0]
            ranked = sorted(first, key=lambda i: (-score_of[i], i))
            live = len(ranked)
            assert live == min(k1, 200)
            assert ids[0, :live].tolist() == ranked, f"threads={threads} k1={k1}"
            assert scores[0, :live].double().tolist() == [score_of[i] for i in ranked]
            assert ids[0, live:].tolist() == [-1] * (k1 - live)
            assert bool(torch.isneginf(scores[0, live:]).all())


def test_thread_counts_and_bitwise_determinism(num_threads):
    gen = torch.Generator().manual_seed(9)
    index = MultiVectorIndex(48, 16, dtype="bfloat16")
    index.add(torch.randn(700, 16, 48, generator=gen))
    q = torch.randn(9, 16, 48, generator=gen)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(index.search_grouped(q, 7, DEFAULT_GROUPS[:4]))
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][0], results[1][0])


def test_search_grouped_equals_separate_searches():
    gen = torch.Generator().manual_seed(2)
    index = MultiVectorIndex(32, 64, dtype="int8")
    index.add(torch.randn(150, 64, 32, generator=gen))
    q = torch.randn(4, 16, 32, generator=gen)
    scores, ids = index.search_grouped(q, 6, DEFAULT_GROUPS)
    for g, budget in enumerate(DEFAULT_GROUPS):
        s, i = index.search(q, 6, budget=budget)
        assert torch.equal(i, ids[g]) and torch.equal(s, scores[g])


def test_add_ids_and_lengths():
    index = MultiVectorIndex(4, 2, dtype="float32")
    assert index.add(torch.randn(3, 2, 4)).tolist() == [0, 1, 2]
    assert index.add(torch.randn(2, 2, 4), ids=[10, 7]).tolist() == [10, 7]
    assert index.add(torch.randn(1, 2, 4)).tolist() == [11]  # after the largest id ever given
    index.remove([1, 10])
    assert len(index) == 4 and sorted(index.ids().tolist()) == [0, 2, 7, 11]
    assert index.add(torch.randn(1, 2, 4), ids=[10]).tolist() == [10]  # a removed id may return
    assert index.add(torch.randn(0, 2, 4)).numel() == 0
    ids = index.add(iter([torch.randn(2, 2, 4), torch.randn(3, 2, 4)]), progress=True)
    assert ids.tolist() == [12, 13, 14, 15, 16]


def test_progress_bar_uses_tqdm(capsys):
    index = MultiVectorIndex(4, 2, dtype="int8")
    index.add([torch.randn(5, 2, 4) for _ in range(3)], progress=True)
    err = capsys.readouterr().err
    assert "MultiVectorIndex.add" in err and "3/3" in err


def test_nbytes_and_estimate_bytes():
    for dtype in DTYPES:
        index = MultiVectorIndex(128, 64, dtype=dtype)
        index.add(torch.randn(10, 64, 128))
        assert index.nbytes == MultiVectorIndex.estimate_bytes(10, 64, 128, dtype)
    bf16 = MultiVectorIndex.estimate_bytes(1000, 64, 128, "bfloat16")
    int8 = MultiVectorIndex.estimate_bytes(1000, 64, 128, "int8")
    assert int8 <= 0.55 * bf16
    assert MultiVectorIndex.estimate_bytes(1000, 64, 128, "float32") == 1000 * (64 * 128 * 4 + 9)


def test_slab_layout_reads_only_the_prefix():
    """A budget's scan reads the first r_c vectors only: poisoning the slabs past r_c (after
    add's checks) changes nothing at that budget."""
    assert slab_bounds(64) == [0, 1, 2, 4, 8, 16, 32, 64]
    assert slab_bounds(7) == [0, 1, 2, 4, 7]
    gen = torch.Generator().manual_seed(1)
    for dtype in DTYPES:
        index = MultiVectorIndex(16, 64, dtype=dtype)
        index.add(torch.randn(30, 64, 16, generator=gen))
        q = torch.randn(2, 4, 16, generator=gen)
        before = index.search_grouped(q, 5, ((1, 1), (2, 4), (4, 8)))
        seg = index._store.segments[0]
        for s in range(4, len(seg.data)):  # slabs 4.. hold vectors 8..63
            seg.data[s].fill_(1 if dtype != "int8" else 127)
            if seg.scales is not None:
                seg.scales[s].fill_(float("nan"))
        after = index.search_grouped(q, 5, ((1, 1), (2, 4), (4, 8)))
        assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_rows_are_tested_only_when_something_is_removed_or_filtered(monkeypatch):
    """The op gets no live-row lists while every row of every segment may be returned (the
    scan then never tests a row), one list per segment once any segment has a removal or a
    filter, and the results stay exact either way."""
    seen = []
    real_op_lists = S._op_lists

    def spy(store, r_c, allowed):
        out = real_op_lists(store, r_c, allowed)
        seen.append(out[4])
        return out

    monkeypatch.setattr(S, "_op_lists", spy)
    index = MultiVectorIndex(8, 2, dtype="float32")
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):  # two adds
        index.add(helpers.exact_values((9, 2, 8), gen))
    q = helpers.exact_values((2, 2, 8), gen)
    index.search(q, 4)
    assert seen[-1] == [], "nothing removed or filtered: no row lists"
    index.search(q, 4, filter_ids=[0, 3])
    assert len(seen[-1]) == len(index._store.segments)
    index.remove([1])
    got = index.search(q, 20)
    assert len(seen[-1]) == len(index._store.segments) and 1 not in got[1].tolist()
    assert_same_results(index.search_grouped(q, 20, [(2, 2)]), brute_force(index, q, [(2, 2)], 20), exact=True)


def test_import_is_light():
    """Importing MultiVectorIndex loads no host library, tqdm or triton beyond what importing
    the kernels loads, and importing the kernels does not import the index."""
    import subprocess
    import sys

    code = ("import sys, metaembed_kernels; before = set(sys.modules); "
            "assert 'metaembed_kernels.index' not in sys.modules; "
            "from metaembed_kernels import MultiVectorIndex; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "bad = new & {'tqdm', 'transformers', 'safetensors', 'triton', 'pylate', 'colpali_engine'}; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# ---- bad input --------------------------------------------------------------------------

@pytest.fixture
def small_index():
    index = MultiVectorIndex(8, 4, dtype="bfloat16")
    index.add(torch.randn(5, 4, 8), ids=[1, 2, 3, 4, 5])
    return index


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(dim=0, num_vectors=4), ValueError, "dim"),
    (dict(dim=8.0, num_vectors=4), TypeError, "dim"),
    (dict(dim=8, num_vectors=-1), ValueError, "num_vectors"),
    (dict(dim=8, num_vectors=4, dtype="float16"), ValueError, "dtype"),
    (dict(dim=8, num_vectors=4, dtype=3), TypeError, "dtype"),
    (dict(dim=8, num_vectors=4, device="meta"), ValueError, "device"),
])
def test_bad_constructor_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        MultiVectorIndex(kwargs.pop("dim"), kwargs.pop("num_vectors"), **kwargs)


def test_bad_add_inputs_change_nothing(small_index):
    index = small_index
    before = (index.nbytes, len(index), index.ids().tolist())
    bad = [
        (dict(c=torch.randn(2, 4, 9)), ValueError, "D=9"),
        (dict(c=torch.randn(2, 5, 8)), ValueError, "Rc=5"),
        (dict(c=torch.randn(4, 8)), ValueError, r"\(N, Rc, D\)"),
        (dict(c=torch.ones(2, 4, 8, dtype=torch.int32)), TypeError, "float"),
        (dict(c="no"), TypeError, "c must be"),
        (dict(c=torch.randn(2, 4, 8), ids=[7, 7]), ValueError, "duplicate"),
        (dict(c=torch.randn(2, 4, 8), ids=[3, 9]), ValueError, "already in the index"),
        (dict(c=torch.randn(2, 4, 8), ids=[-1, 9]), ValueError, ">= 0"),
        (dict(c=torch.randn(2, 4, 8), ids=[1.5, 9.0]), TypeError, "integers"),
        (dict(c=torch.randn(2, 4, 8), ids=[9]), ValueError, "one id per candidate"),
        (dict(c=torch.randn(2, 4, 8), c_mask=torch.ones(2, 4)), TypeError, "bool"),
        (dict(c=torch.randn(2, 4, 8), c_mask=torch.ones(2, 3, dtype=torch.bool)), ValueError, "c_mask"),
        (dict(c=torch.tensor(float("nan")).expand(2, 4, 8)), ValueError, "NaN or infinite"),
        (dict(c=torch.full((2, 4, 8), float("inf"))), ValueError, "NaN or infinite"),
        (dict(c=torch.full((2, 4, 8), 3.4e38)), ValueError, "bfloat16 range"),
    ]
    for kwargs, err, match in bad:
        with pytest.raises(err, match=match):
            index.add(kwargs.pop("c"), **kwargs)
        assert (index.nbytes, len(index), index.ids().tolist()) == before, kwargs
    # a streamed add whose third batch is bad rolls back the first two
    batches = [torch.randn(2, 4, 8), torch.randn(3, 4, 8), torch.full((1, 4, 8), float("nan"))]
    with pytest.raises(ValueError, match="batch 2"):
        index.add(iter(batches))
    assert (index.nbytes, len(index), index.ids().tolist()) == before
    with pytest.raises(ValueError, match="already in the index"):  # duplicates across batches
        index.add([torch.randn(1, 4, 8), torch.randn(1, 4, 8)], ids=[[40], [40]])
    assert (index.nbytes, len(index), index.ids().tolist()) == before
    q = torch.randn(1, 2, 8)
    assert index.search(q, 3)[1].tolist() == index.search(q, 3)[1].tolist()


def test_bad_remove(small_index):
    with pytest.raises(ValueError, match="not in the index"):
        small_index.remove([2, 99])
    assert len(small_index) == 5  # nothing removed
    small_index.remove([2])
    with pytest.raises(ValueError, match="not in the index"):
        small_index.remove([2])  # already removed
    with pytest.raises(ValueError, match="duplicate"):
        small_index.remove([3, 3])
    with pytest.raises(TypeError):
        small_index.remove("3")


def test_bad_search_inputs(small_index):
    index = small_index
    q = torch.randn(2, 3, 8)
    bad = [
        (dict(q=q, k=0), ValueError, "k must be >= 1"),
        (dict(q=q, k=-2), ValueError, "k must be >= 1"),
        (dict(q=q, k=2.0), TypeError, "k must be"),
        (dict(q=q, k=True), TypeError, "k must be"),
        (dict(q=torch.randn(2, 3, 7), k=1), ValueError, "D=7"),
        (dict(q=torch.randn(3, 8), k=1), ValueError, "q must have shape"),
        (dict(q=q, k=1, budget=(1, 5)), ValueError, "budget"),
        (dict(q=q, k=1, budget=(4, 1)), ValueError, "budget"),
        (dict(q=q, k=1, budget=(0, 1)), ValueError, "budget"),
        (dict(q=q, k=1, budget=(1,)), TypeError, "budget"),
        (dict(q=q, k=1, budget=(1.0, 2)), TypeError, "budget"),
        (dict(q=q, k=1, q_mask=torch.ones(2, 3)), TypeError, "q_mask"),
        (dict(q=q, k=1, q_mask=torch.ones(2, 2, dtype=torch.bool)), ValueError, "q_mask"),
        (dict(q=torch.full((1, 2, 8), float("nan")), k=1), ValueError, "NaN"),
        (dict(q=q, k=3, shortlist=((1, 1), 2)), ValueError, "k1 must be >= k"),
        (dict(q=q, k=1, shortlist=((1, 9), 2)), ValueError, "shortlist budget"),
        (dict(q=q, k=1, shortlist=(1, 1)), TypeError, "shortlist"),
        (dict(q=q, k=1, filter_ids=[0.5]), TypeError, "filter_ids"),
        (dict(q=q, k=1, process_group="world"), (TypeError, ValueError), "process_group|torch.distributed"),
    ]
    for kwargs, err, match in bad:
        with pytest.raises(err, match=match):
            index.search(kwargs.pop("q"), kwargs.pop("k"), **kwargs)
    with pytest.raises(ValueError, match="groups"):
        index.search_grouped(q, 1, [(1, 1), (1, 5)])
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search_grouped(q, 0, [(1, 1)])
    with pytest.raises(ValueError, match="NaN"):
        index.search_grouped(torch.cat([q[:, :1], torch.full_like(q[:, :1], float("inf"))], 1), 1, [(1, 1), (2, 4)])


@pytest.mark.parametrize("scanner", ["auto", "reference"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_non_finite_query_vectors_the_search_never_reads_are_accepted(small_index, dtype, scanner, monkeypatch):
    """NaN in a masked query vector or past the budget's r_q is never read (the search's
    NaN check covers only the vectors it reads), and the results equal a clean query's; the
    same whether the C++ op checks the queries as it packs them or the blockwise scan's
    Python side does (search.read_queries)."""
    monkeypatch.setenv("METAEMBED_BACKEND", scanner)
    index = MultiVectorIndex(8, 4, dtype=dtype)
    index.add(torch.randn(7, 4, 8, generator=torch.Generator().manual_seed(3)))
    clean = torch.randn(3, 3, 8, generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[True, False, True], [True, True, False], [False, True, True]])
    dirty = clean.clone()
    dirty[~mask] = float("nan")
    for kwargs in (dict(q_mask=mask), dict(q_mask=mask, budget=(2, 2)), dict(q_mask=mask, shortlist=((1, 1), 4))):
        s0, i0 = index.search(clean, 3, **kwargs)
        s1, i1 = index.search(dirty, 3, **kwargs)
        assert torch.equal(i0, i1) and torch.equal(s0, s1), kwargs
    past = clean.clone()
    past[:, 2] = float("nan")  # the third vector is past r_q = 2
    assert torch.equal(index.search(past, 3, budget=(2, 4))[1], index.search(clean, 3, budget=(2, 4))[1])
    g0 = index.search_grouped(clean, 3, [(1, 1), (2, 4)], q_mask=mask)
    g1 = index.search_grouped(dirty, 3, [(1, 1), (2, 4)], q_mask=mask)
    assert torch.equal(g0[1], g1[1]) and torch.equal(g0[0], g1[0])
    with pytest.raises(ValueError, match="NaN"):  # a valid vector the search reads
        index.search(past, 3, budget=(3, 4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_query_dtypes_and_strides_convert_as_torch(dtype):
    """The C++ op converts the queries itself (float16 / bfloat16 / float32 of any strides; float64
    through torch): the results equal those of the same queries converted by torch's .to() and
    made contiguous first, bit for bit, masked vectors (NaN here) included; a float32 value past
    bfloat16's range rounds to inf, as torch's, and is rejected for a bfloat16 index."""
    gen = torch.Generator().manual_seed(11)
    index = MultiVectorIndex(24, 4, dtype=dtype)
    index.add(torch.randn(40, 4, 24, generator=gen))
    compute = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    wide = torch.randn(3, 10, 72, generator=gen) * torch.logspace(-3, 3, 72)  # every magnitude rounds
    mask = torch.tensor([[True, False, True, True, True], [False, True, True, False, True],
                         [True, True, False, True, True]])
    forms = {"D-major": wide[:, :5, :24].transpose(1, 2).contiguous().transpose(1, 2)}
    for qdtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        forms[f"{qdtype} contiguous"] = wide[:, :5, :24].to(qdtype, copy=True)
        forms[f"{qdtype} strided"] = wide.to(qdtype, copy=True)[:, ::2, ::3]  # a fresh copy's view: every stride > 1
    for name, q in forms.items():
        assert q.stride(2) != 1 or "contiguous" in name, name
        q[~mask] = float("nan")  # in place: the strides stay
        reference = q.to(compute).contiguous()
        for kwargs in (dict(), dict(budget=(2, 1)), dict(budget=(5, 3))):
            got = index.search(q, 6, q_mask=mask, **kwargs)
            expected = index.search(reference, 6, q_mask=mask, **kwargs)
            assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0]), (name, kwargs)
        grouped = index.search_grouped(q, 6, [(1, 1), (5, 4)], q_mask=mask)
        expected = index.search_grouped(reference, 6, [(1, 1), (5, 4)], q_mask=mask)
        assert torch.equal(grouped[1], expected[1]) and torch.equal(grouped[0], expected[0]), name
    past_bf16 = torch.full((1, 2, 24), 3.3999e38)  # finite in float32, inf in bfloat16
    if dtype == "bfloat16":
        with pytest.raises(ValueError, match="infinite"):
            index.search(past_bf16, 3)
    else:
        index.search(past_bf16, 3)


def test_op_rejects_inconsistent_arguments():
    """The op re-checks what memory safety depends on (a direct torch.ops call)."""
    if not S._has_cpu_ops():
        pytest.skip("C++ index ops not built")
    q = torch.randn(1, 2, 8)
    data = [torch.randn(3, 1, 8), torch.randn(3, 1, 8)]
    ids = [torch.arange(3)]
    op = torch.ops.metaembed.index_search
    with pytest.raises(ValueError, match="data"):
        op(q, None, [torch.randn(3, 1, 8), torch.randn(2, 1, 8)], [], [], ids, [], [3], [0, 1, 2], [1], [2], 1)
    with pytest.raises(ValueError, match="out of range"):
        op(q, None, data, [], [], ids, [], [3], [0, 1, 2], [1], [3], 1)
    with pytest.raises(ValueError, match="k must be"):
        op(q, None, data, [], [], ids, [], [3], [0, 1, 2], [1], [2], 0)
    with pytest.raises(TypeError, match="q must be a floating-point"):
        op(q.int(), None, data, [], [], ids, [], [3], [0, 1, 2], [1], [2], 1)
    with pytest.raises(ValueError, match="NaN or infinite"):  # the op reads, converts and checks the queries
        op(torch.full_like(q, float("inf")), None, data, [], [], ids, [], [3], [0, 1, 2], [1], [2], 1)
    with pytest.raises(ValueError, match="scales"):
        op(q, None, [d.to(torch.int8) for d in data], [], [], ids, [], [3], [0, 1, 2], [1], [2], 1)
    rows = torch.tensor([[5, -1, 2]])  # out-of-range rows score -inf, never read
    out = torch.ops.metaembed.index_score_rows(q, None, data, [], [], [3], [0, 1, 2], [1], [2], rows)
    assert out[0, 0, 0] == float("-inf") and out[0, 0, 1] == float("-inf") and torch.isfinite(out[0, 0, 2])
