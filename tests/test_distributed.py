"""MatryoshkaInfoNCELoss(gather_across_ranks=True) on a real 2-process gloo group."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metaembed_kernels import MatryoshkaInfoNCELoss, reference

GROUPS = ((1, 1), (2, 4), (4, 6))
WORLD = 2


def shard(rank):
    gen = torch.Generator().manual_seed(100 + rank)
    q = torch.randn(3, 4, 8, generator=gen)
    c = torch.randn(3, 6, 8, generator=gen)
    hn = torch.randn(3, 1, 6, 8, generator=gen)
    c_mask = torch.rand(3, 6, generator=gen) > 0.2
    labels = torch.tensor([2, 0, 1])
    return q, c, hn, c_mask, labels


def worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        q, c, hn, c_mask, labels = shard(rank)
        q.requires_grad_()
        c.requires_grad_()
        loss = MatryoshkaInfoNCELoss(GROUPS, temperature=0.1, gather_across_ranks=True)(
            q, c, hn, c_mask=c_mask, labels=labels
        )
        loss.backward()
        torch.save({"loss": loss.detach(), "dq": q.grad, "dc": c.grad}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_gather_across_ranks_matches_single_process(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    shards = [shard(r) for r in range(WORLD)]
    qs = [s[0].double().requires_grad_() for s in shards]
    c_all = torch.cat([s[1] for s in shards]).double().requires_grad_()
    c_mask = torch.cat([s[3] for s in shards])
    total = 0
    for r, (q, (_, _, hn, _, labels)) in enumerate(zip(qs, shards)):
        loss_r = reference.matryoshka_infonce(
            q, c_all, GROUPS, temperature=0.1, hard_negatives=hn.double(), c_mask=c_mask, labels=labels + 3 * r
        )
        got = torch.load(tmp_path / f"{r}.pt")
        assert abs(got["loss"].item() - loss_r.item()) < 1e-4, r
        total = total + loss_r
    total.backward()  # DDP averages over ranks; here each rank's local grads are checked
    for r in range(WORLD):
        got = torch.load(tmp_path / f"{r}.pt")
        torch.testing.assert_close(got["dq"].double(), qs[r].grad, atol=1e-4, rtol=1e-4)
        # a rank's candidate shard receives the gradient of every rank's loss
        torch.testing.assert_close(got["dc"].double(), c_all.grad[3 * r: 3 * r + 3], atol=1e-4, rtol=1e-4)
