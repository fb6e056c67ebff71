"""Analytic bytes and FLOPs per call, and the roofline they imply.

    python benchmarks/roofline.py        # the paper's retrieval setting on H100 and A100

Traffic is the compulsory minimum: every input token the kernels read (only the first
max r_q / max r_c tokens of each item), read once from HBM, plus every output written once.
The Triton kernels meet it: each candidate block is fetched once per query block, and the
query blocks of one candidate block run next to each other (1-D grid, query block fastest),
so the re-reads are L2 hits.

FLOPs are those of the top-budget tile, 2 * Nq * Nc * r_q * r_c * D (all groups come out of
that one tile; the epilogue's max/sum work is not counted). A loss step (forward + backward)
counts three tiles: the forward similarity and the two gradient products W @ c, W^T @ q
(the backward's recomputation of the similarity is overhead, as in FlashAttention's counts).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Optional, Sequence, Tuple

import torch


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    hbm_bytes_per_s: float
    tensor_flops: float  # dense bf16/fp16 tensor-core peak
    fp32_flops: float  # CUDA-core fp32 FMA peak (our fp32 similarity path)

    def peak_flops(self, dtype: torch.dtype) -> float:
        return self.fp32_flops if dtype == torch.float32 else self.tensor_flops


# Vendor figures (SXM parts): H100 3.35 TB/s, 989 dense bf16 TFLOP/s, 67 fp32 TFLOP/s;
# A100 80GB 2.0 TB/s (2.04), 312 dense bf16 TFLOP/s, 19.5 fp32 TFLOP/s.
GPUS = {
    "H100": Gpu("H100", 3.35e12, 989e12, 67e12),
    "A100": Gpu("A100", 2.0e12, 312e12, 19.5e12),
}


def gpu_for(device_name: str) -> Optional[Gpu]:
    for key, gpu in GPUS.items():
        if key in device_name:
            return gpu
    return None


def element_size(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def _budget(groups: Sequence[Tuple[int, int]]) -> Tuple[int, int]:
    return max(g[0] for g in groups), max(g[1] for g in groups)


def maxsim_cost(nq: int, nc: int, d: int, groups, dtype: torch.dtype) -> Tuple[float, float]:
    """(bytes, flops) of one grouped-MaxSim forward call."""
    rq, rc = _budget(groups)
    item = element_size(dtype)
    read = item * d * (nq * rq + nc * rc)
    written = 4 * len(groups) * nq * nc  # float32 scores
    return float(read + written), 2.0 * nq * nc * rq * rc * d


def loss_step_cost(nq: int, nc: int, k: int, d: int, groups, dtype: torch.dtype) -> Tuple[float, float]:
    """(bytes, flops) of one fused-loss forward + backward: inputs read, gradients written,
    once each (the (G, Nq) numbers are negligible); three tiles of FLOPs."""
    rq, rc = _budget(groups)
    item = element_size(dtype)
    tokens = nq * rq + (nc + nq * k) * rc
    tile_flops = 2.0 * nq * (nc + k) * rq * rc * d
    return float(2 * item * d * tokens), 3.0 * tile_flops


@dataclasses.dataclass(frozen=True)
class Roofline:
    bytes: float
    flops: float
    gpu: Gpu
    dtype: torch.dtype

    @property
    def memory_seconds(self) -> float:
        return self.bytes / self.gpu.hbm_bytes_per_s

    @property
    def compute_seconds(self) -> float:
        return self.flops / self.gpu.peak_flops(self.dtype)

    @property
    def seconds(self) -> float:
        """The floor: no kernel moving these bytes and doing these FLOPs can be faster."""
        return max(self.memory_seconds, self.compute_seconds)

    @property
    def bound(self) -> str:
        return "memory" if self.memory_seconds >= self.compute_seconds else "compute"

    def fraction(self, measured_seconds: float) -> float:
        return self.seconds / measured_seconds


def compute_bound_batch(nc: int, d: int, groups, dtype: torch.dtype, gpu: Gpu) -> int:
    """Smallest query batch for which the MaxSim forward is compute-bound.

    FLOPs grow as Nq * 2 r_q r_c D Nc while the bytes are dominated by the index
    (Nc r_c D * itemsize), so the intensity is ~Nq * r_q FLOP/byte for 16-bit inputs and the
    crossover is the GPU's ridge point (peak / bandwidth) divided by r_q.
    """
    nq = 1
    while True:
        r = Roofline(*maxsim_cost(nq, nc, d, groups, dtype), gpu, dtype)
        if r.compute_seconds >= r.memory_seconds:
            return nq
        nq += 1


PAPER = dict(nq=1, nc=100_000, d=3584, groups=((16, 64),), dtype=torch.bfloat16)


def paper_report() -> str:
    p = PAPER
    nbytes, flops = maxsim_cost(p["nq"], p["nc"], p["d"], p["groups"], p["dtype"])
    index = p["nc"] * 64 * p["d"] * 2
    lines = [
        "Paper setting: 1 query (r_q=16) x 100,000 candidates (r_c=64), D=3584, bf16",
        f"  index bytes   {index:,} B = {index / 2**30:.2f} GiB",
        f"  bytes read    {nbytes:,.0f} B (index + query + scores)",
        f"  FLOPs         {flops:,.0f} = {flops / 1e9:.2f} GFLOP  (intensity {flops / nbytes:.2f} FLOP/B)",
    ]
    for gpu in GPUS.values():
        r = Roofline(nbytes, flops, gpu, p["dtype"])
        nq_star = compute_bound_batch(p["nc"], p["d"], p["groups"], p["dtype"], gpu)
        batch = Roofline(*maxsim_cost(1000, p["nc"], p["d"], p["groups"], p["dtype"]), gpu, p["dtype"])
        lines.append(
            f"  {gpu.name}: memory floor {r.memory_seconds * 1e3:.2f} ms, compute {r.compute_seconds * 1e3:.3f} ms"
            f" -> {r.bound}-bound; ridge {gpu.tensor_flops / gpu.hbm_bytes_per_s:.0f} FLOP/B"
            f" -> compute-bound from Nq = {nq_star} queries; a batch of 1000 takes >= {batch.seconds:.2f} s"
            f" = {batch.seconds:.2f} ms/query"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(paper_report())
    sys.exit(0)
