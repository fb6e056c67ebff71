"""Sharded search with process_group=: 2 and 3 gloo processes, each holding a shard with global
ids, return exactly what one index over the union of the shards returns, on every rank."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import helpers
from metaembed_kernels import DEFAULT_GROUPS, MultiVectorIndex

N, RC, D = 90, 16, 24
GROUPS = DEFAULT_GROUPS[:4]


def corpus():
    gen = torch.Generator().manual_seed(0)
    c = helpers.exact_values((N, RC, D), gen)  # exact scores: ties across shards included
    c[N - 1] = c[0]
    ids = torch.randperm(5 * N, generator=gen)[:N]
    q = helpers.exact_values((4, 8, D), gen)
    return c, ids, q


def shard_rows(rank, world):
    return torch.arange(N)[rank::world]  # interleaved: every shard holds low and high ids


def worker(rank, world, port, out_dir, dtype):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        c, ids, q = corpus()
        rows = shard_rows(rank, world)
        index = MultiVectorIndex(D, RC, dtype=dtype)
        index.add(c[rows], ids=ids[rows])
        if rank == 0:
            index.remove([ids[0].item()])
        pg = dist.group.WORLD
        grouped = index.search_grouped(q, 7, GROUPS, process_group=pg)
        single = index.search(q, N + 5, budget=(2, 4), process_group=pg)  # k > N: padding
        torch.save({"grouped": grouped, "single": single}, os.path.join(out_dir, f"{rank}.pt"))
        try:
            index.search(q[: rank + 1], 3, process_group=pg)  # ranks disagree on Nq
        except ValueError as err:
            torch.save(str(err), os.path.join(out_dir, f"err{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("world,dtype", [(2, "bfloat16"), (3, "float32")])
def test_sharded_search_equals_one_index(tmp_path, world, dtype):
    mp.spawn(worker, args=(world, free_port(), str(tmp_path), dtype), nprocs=world, join=True)
    c, ids, q = corpus()
    union = MultiVectorIndex(D, RC, dtype=dtype)
    union.add(c, ids=ids)
    union.remove([ids[0].item()])
    expected_grouped = union.search_grouped(q, 7, GROUPS)
    expected_single = union.search(q, N + 5, budget=(2, 4))
    for rank in range(world):
        got = torch.load(tmp_path / f"{rank}.pt")
        for a, b in zip(got["grouped"], expected_grouped):
            assert torch.equal(a, b), rank
        for a, b in zip(got["single"], expected_single):
            assert torch.equal(a, b), rank
        assert "same number of queries" in torch.load(tmp_path / f"err{rank}.pt")
