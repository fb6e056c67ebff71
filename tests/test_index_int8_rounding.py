"""Score-aware int8 codes (metaembed_kernels/index/int8_rounding.py): at the same per-vector
scales, error feedback against the added vectors' second moment H keeps the rounding error out
of the directions the vectors (and so the queries) share."""
import pytest
import torch

from metaembed_kernels import MultiVectorIndex
from metaembed_kernels.index import int8_rounding as R
from metaembed_kernels.index.storage import dequantize_int8, quantize_int8

from test_index import brute_force, assert_same_results, stored_vectors


def shared_directions(n, rc, d, gen, seed=7):
    """Vectors as trained embeddings are: a common direction, four strong ones (the same for
    every call with one `seed`: queries and candidates share them), some noise."""
    basis = torch.linalg.qr(torch.randn(d, 5, generator=torch.Generator().manual_seed(seed)))[0].T
    coef = torch.randn(n, rc, 5, generator=gen) * torch.tensor([0.5, 3.0, 2.0, 1.5, 1.0])
    coef[..., 0] += 4.0
    return coef @ basis + 0.3 * torch.randn(n, rc, d, generator=gen)


def factor_for(c, mask=None):
    return R.rounding_factor(*R.second_moment(c, mask))


def test_codes_cut_the_error_that_queries_see():
    gen = torch.Generator().manual_seed(0)
    d = 96
    c, q = shared_directions(300, 8, d, gen), shared_directions(40, 8, d, gen)
    (x0, s0), (x1, s1) = quantize_int8(c), quantize_int8(c, factor_for(c))
    assert torch.equal(s0[..., 0], s1[..., 0]), "the per-vector scales must not change"
    assert int(x1.abs().max()) <= 127
    e0, e1 = dequantize_int8(x0, s0) - c, dequantize_int8(x1, s1) - c

    def seen(e):  # mean squared <q, e> over query and candidate vectors
        return (q.reshape(-1, d) @ e.reshape(-1, d).T).pow(2).mean().item()

    assert seen(e1) < 0.7 * seen(e0), (seen(e1), seen(e0))
    steps = (e1.abs() / s1[..., :1]).amax().item()  # in steps of the scale: a few at most, never runaway
    assert 0.5 < steps < 4, steps
    # the stored norm is the dequantised vector's, rounded up (the int8 scan's bound relies on it)
    norm64 = dequantize_int8(x1, s1).double().norm(dim=-1)
    assert (s1[..., 1].double() >= norm64).all() and (s1[..., 1].double() <= norm64 * (1 + 2 ** -23)).all()


def test_integral_vectors_and_identity_factor_round_to_nearest():
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(-127, 128, (30, 4, 33), generator=gen)
    x[..., 5] = -127  # scale exactly 1/128: v / scale is integral, so no error to feed back
    v = x.float() / 128
    assert torch.equal(quantize_int8(v, factor_for(v))[0], x.to(torch.int8))
    w = torch.randn(50, 20, generator=gen) * 60
    identity = R.rounding_factor(torch.eye(20, dtype=torch.float64) * 40, 40)  # H = I: no feedback
    assert torch.equal(R.feedback_round(w.clone(), identity), torch.round(w).clamp(-127, 127))


def test_second_moment_skips_masked_and_zero_vectors():
    gen = torch.Generator().manual_seed(2)
    c = torch.randn(6, 5, 7, generator=gen)
    mask = torch.rand(6, 5, generator=gen) > 0.4
    c[0, 0] = 0
    mask[0, 0] = True
    m, k = R.second_moment(c, mask)
    valid = c[mask & (c.norm(dim=-1) > 0)]
    u = valid / valid.norm(dim=-1, keepdim=True)
    assert k == valid.shape[0]
    torch.testing.assert_close(m, (u.T @ u).double())
    assert R.rounding_factor(m, 6) is None  # fewer vectors than D = 7: plain rounding


def test_index_add_stores_score_aware_codes_and_searches_them_exactly():
    """add() uses the batch's own second moment (masked vectors left out), and the search
    scores exactly the dequantised vectors it stored."""
    gen = torch.Generator().manual_seed(3)
    n, rc, d = 120, 12, 40
    c = shared_directions(n, rc, d, gen)
    mask = torch.rand(n, rc, generator=gen) > 0.3
    c[~mask] = 1e3  # masked vectors: stored, never scored, never in H
    index = MultiVectorIndex(d, rc, dtype="int8")
    index.add(c, c_mask=mask)
    stored, _, _, _ = stored_vectors(index)
    x, s = quantize_int8(c, factor_for(c, mask))
    assert torch.equal(stored, dequantize_int8(x, s))
    plain = dequantize_int8(*quantize_int8(c))
    assert not torch.equal(stored[mask], plain[mask])
    q = shared_directions(4, 6, d, gen)
    groups = ((1, 1), (2, 4), (6, 12))
    assert_same_results(index.search_grouped(q, 9, groups), brute_force(index, q, groups, 9), exact=False,
                        name="int8 score-aware")


@pytest.mark.parametrize("batches", [1, 3])
def test_each_add_batch_brings_its_own_moment(batches):
    gen = torch.Generator().manual_seed(4)
    c = shared_directions(90, 8, 24, gen)
    index = MultiVectorIndex(24, 8, dtype="int8")
    parts = torch.chunk(c, batches)
    index.add(iter(parts)) if batches > 1 else index.add(c)
    expected = torch.cat([dequantize_int8(*quantize_int8(p, factor_for(p))) for p in parts])
    assert torch.equal(stored_vectors(index)[0], expected)


def test_codes_do_not_depend_on_the_thread_count():
    """H is summed in fixed slices of MOMENT_ROWS vectors: one product over the whole batch
    (BLAS splits a long sum between threads) gave other codes on 1 and 2 threads."""
    gen = torch.Generator().manual_seed(5)
    c = shared_directions(3000, 8, 32, gen)  # 24,000 vectors of D = 32
    threads = torch.get_num_threads()
    stored = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            index = MultiVectorIndex(32, 8, dtype="int8")
            index.add(c)
            stored.append(stored_vectors(index)[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(stored[0], stored[1])
