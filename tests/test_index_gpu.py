"""MultiVectorIndex on CUDA tensors (the Triton scan + blockwise top-k) against the same index
on the CPU: identical ids and scores on exact-arithmetic vectors, every dtype, masks, removed
ids, filters, budgets, the cascade and search_grouped. Marked `gpu`: skipped without a CUDA
device (`make gpu-check` runs them)."""
import pytest
import torch

import helpers
from metaembed_kernels import MultiVectorIndex

pytestmark = helpers.requires_gpu

DTYPES = ["float32", "bfloat16", "int8"]


def corpus(dtype, gen, n=300, rc=16, d=72):
    """Vectors every dtype stores exactly (int8: multiples of 2^-7 with a 127 in each vector,
    so the per-vector scale is exactly 2^-7), with non-prefix masks and empty rows."""
    if dtype == "int8":
        values = torch.randint(-127, 128, (n, rc, d), generator=gen).float()
        values[..., 0] = 127
        values = values / 128
    else:
        values = helpers.exact_values((n, rc, d), gen)
    mask = torch.rand(n, rc, generator=gen) > 0.3
    mask[::17] = False  # candidates with no valid vector
    return values, mask


def build(dtype, device, values, mask):
    index = MultiVectorIndex(values.shape[2], values.shape[1], dtype=dtype, device=device)
    half = values.shape[0] // 2
    index.add(values[:half].to(device))
    index.add(values[half:].to(device), c_mask=mask[half:].to(device))
    index.remove(list(range(3, values.shape[0], 29)))
    return index


def same(got, expected, what):
    scores, ids = (t.cpu() for t in got)
    assert torch.equal(ids, expected[1]), f"{what}: ids differ"
    torch.testing.assert_close(scores, expected[0], rtol=0, atol=1e-5, msg=what)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_index_returns_what_the_cpu_index_returns(dtype):
    gen = torch.Generator().manual_seed(61)
    values, mask = corpus(dtype, gen)
    cpu, gpu = build(dtype, "cpu", values, mask), build(dtype, "cuda", values, mask)
    assert gpu.device.type == "cuda" and len(gpu) == len(cpu) and gpu.nbytes == cpu.nbytes
    q = helpers.exact_values((5, 16, 72), gen)
    q_mask = torch.rand(5, 16, generator=gen) > 0.2
    q_mask[1] = False  # a query with no valid vector
    qg, mg = q.cuda(), q_mask.cuda()
    for budget in [(1, 1), (2, 4), (16, 16), (5, 9)]:
        same(gpu.search(qg, 7, budget=budget, q_mask=mg), cpu.search(q, 7, budget=budget, q_mask=q_mask),
             f"{dtype} search {budget}")
    same(gpu.search(qg, 400, q_mask=mg), cpu.search(q, 400, q_mask=q_mask), f"{dtype} k > live")
    allowed = list(range(0, 300, 3))
    same(gpu.search(qg, 5, budget=(4, 8), filter_ids=allowed), cpu.search(q, 5, budget=(4, 8), filter_ids=allowed),
         f"{dtype} filter_ids")
    cascade = ((1, 2), 40)
    same(gpu.search(qg, 5, shortlist=cascade), cpu.search(q, 5, shortlist=cascade), f"{dtype} shortlist")
    groups = ((1, 1), (2, 4), (4, 8), (8, 16), (16, 16))
    got, expected = gpu.search_grouped(qg, 6, groups, q_mask=mg), cpu.search_grouped(q, 6, groups, q_mask=q_mask)
    same(got, expected, f"{dtype} search_grouped")


def test_cuda_index_round_trips_through_save_and_load(tmp_path):
    gen = torch.Generator().manual_seed(62)
    values, mask = corpus("bfloat16", gen)
    gpu = build("bfloat16", "cuda", values, mask)
    q = helpers.exact_values((3, 16, 72), gen).cuda()
    before = gpu.search(q, 9, budget=(8, 16))
    gpu.save(tmp_path / "index")
    loaded = MultiVectorIndex.load(tmp_path / "index")
    after = loaded.search(q.to(loaded.device), 9, budget=(8, 16))
    assert torch.equal(after[1].cpu(), before[1].cpu()) and torch.equal(after[0].cpu(), before[0].cpu())
