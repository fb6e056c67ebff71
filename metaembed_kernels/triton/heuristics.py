"""Tile sizes and launch options for the Triton kernels: a small table, no autotuning.

All tiles are M x N fp32 similarity tiles, M = BLOCK_Q * RQ_TILE query-token rows and
N = BLOCK_C * RC_TILE candidate-token columns, where RQ_TILE / RC_TILE are max r_q / max r_c
over the groups rounded up to a power of two (extra tokens are padding, masked). Keys are
(Rq, Rc, D, dtype) and, for the MaxSim forward only, how many queries there are.

| kernel            | M (query-token rows)         | N (cand.-token cols) | M*N cap        | 8 warps if M*N >= | stages |
|-------------------|------------------------------|----------------------|----------------|-------------------|--------|
| maxsim forward    | pow2(Nq*RQ_TILE) in 16..128  | max(128, RC_TILE)    | 128*128 (fp32: 64*128) | 128*128 (fp32: 32*128) | 3 |
| loss forward      | 64                           | max(128, RC_TILE)    | 64*128         | 32*128            | 3      |
| dq pass, dc pass  | 64                           | max(64, RC_TILE)     | 64*64          | always            | 2      |
| hard negatives    | max(16, RQ_TILE), one query  | max(64, RC_TILE)     | -              | 32*128            | 3 fwd, 2 bwd |

* M and N never drop below RQ_TILE / RC_TILE (a query's or a candidate's tokens always share
  a tile) nor below 16 (tl.dot's minimum); "cap" = M halved while M*N exceeds the cap.
* BLOCK_D (D chunk) = 64 for bf16/fp16 and 32 for fp32 (128-byte rows), smaller when D is;
  fp32 backward kernels use 16. The gradient products use the same chunk (BLOCK_DO).

Why these numbers (every one of them is checked by `python -m metaembed_kernels.triton.verify`
for sm_80 and sm_90: no spills, <= 163 KiB shared memory, tensor-core MMA):
* MaxSim forward. With few queries (the paper's 1 query x 100k candidates) the kernel is
  bound by reading the candidate index, so M is as small as the query batch allows
  (16 = the smallest tensor-core tile) and nothing is computed for absent queries; a batch of
  >= 128 query-token rows gets 128 x 128 tiles (8 warps), the shape that issues wgmma on
  sm_90 and amortises each candidate chunk over 8 queries of 16 tokens.
* N = 128 candidate-token columns (two Rc=64 candidates) keeps the fp32 accumulator at
  <= 64 registers per thread, and leaves room for the epilogue's masked reductions.
* Shared memory per stage is (M + N) * BLOCK_D * bytes: (128 + 128) * 64 * 2 = 32 KiB, so 3
  stages fit the 163 KiB of sm_80 (and 227 KiB of sm_90) with room for the epilogue's
  layout conversions.
* Backward passes hold S, the weight tile W and W's three 16-bit pieces at once, so their
  tiles are half the size; at 64 x 128 ptxas spilled (sm_80, Rc=128).
* fp32 similarity tiles are CUDA-core FMA dots whose operands live in registers: the
  forward tile is capped at 64 x 128 (128 x 128 spilled), and the backward uses 16-wide D
  chunks (its bf16x6 gradient products spilled with 32).
* Where 4 vs 8 warps is written per kernel it is what compiled without spills: ptxas picks
  its own register target from the CTA size (e.g. 128 registers + spills for the 64 x 128
  bf16 forward at 8 warps, 186 registers and none at 4).
* The loss forward keeps M at 64 (not 128) to have more programs: one program streams all
  candidates for its query block, so the grid is only Nq / BLOCK_Q programs.

Numerics by dtype: fp32 similarity dots use input_precision="ieee" (see kernels.py for why
not tf32); bf16/fp16 use tensor cores. Gradient products always run on tensor cores with the
fp32 weights split into 3 pieces (fp16 pieces scaled into fp16's range first; fp32 inputs
split into bf16 pieces too: bf16x6).
"""
from __future__ import annotations

import dataclasses

import torch

SIXTEEN_BIT = (torch.bfloat16, torch.float16)
MIN_DOT = 16  # tl.dot needs every dimension >= 16


def next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class TileConfig:
    block_q: int  # queries per tile
    rq_tile: int  # token rows per query (power of two >= max r_q)
    block_c: int  # candidates per tile
    rc_tile: int  # token columns per candidate (power of two >= max r_c)
    block_d: int  # D chunk of the similarity loop
    block_do: int  # D chunk of the gradient products (backward kernels)
    num_warps: int
    num_stages: int

    @property
    def m(self) -> int:
        return self.block_q * self.rq_tile

    @property
    def n(self) -> int:
        return self.block_c * self.rc_tile

    def options(self) -> dict:
        """Launch / compile options."""
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)

    def describe(self) -> str:
        return (f"{self.m}x{self.n} (q {self.block_q}x{self.rq_tile}, c {self.block_c}x{self.rc_tile}) "
                f"BD{self.block_d} w{self.num_warps} s{self.num_stages}")


def _block_d(d: int, dtype: torch.dtype) -> int:
    widest = 64 if dtype in SIXTEEN_BIT else 32  # 128-byte rows
    return min(widest, max(MIN_DOT, next_power_of_two(d)))


def _backward_block_d(d: int, dtype: torch.dtype) -> int:
    """fp32 gradient products hold 3 bf16 pieces of each x chunk next to W's pieces: with
    32-wide chunks ptxas spilled (Rq=32, Rc=128); 16-wide chunks fit (242 registers)."""
    return _block_d(d, dtype) if dtype in SIXTEEN_BIT else MIN_DOT


def _per_block(tile: int, target: int) -> int:
    """How many items of `tile` tokens fill `target` rows (at least one item)."""
    return max(1, target // tile)


def _fit_rows(rq_tile: int, m_want: int, n: int, cap: int) -> int:
    """Queries per tile: m_want rows, halved while M*N > cap, never below one query or 16 rows."""
    m = max(MIN_DOT, m_want)
    while m > MIN_DOT and m * n > cap:
        m //= 2
    return _per_block(rq_tile, m)


def maxsim_forward_config(nq: int, rq_eff: int, rc_eff: int, d: int, dtype: torch.dtype) -> TileConfig:
    rq_tile, rc_tile = next_power_of_two(rq_eff), next_power_of_two(rc_eff)
    block_c = _per_block(rc_tile, 128)
    n = block_c * rc_tile
    sixteen_bit = dtype in SIXTEEN_BIT
    m_want = min(128, next_power_of_two(max(nq, 1) * rq_tile))
    block_q = _fit_rows(rq_tile, m_want, n, 128 * 128 if sixteen_bit else 64 * 128)
    m = block_q * rq_tile
    warps = 8 if m * n >= (128 * 128 if sixteen_bit else 32 * 128) else 4
    return TileConfig(block_q, rq_tile, block_c, rc_tile, _block_d(d, dtype), 0, warps, 3)


def infonce_forward_config(rq_eff: int, rc_eff: int, d: int, dtype: torch.dtype) -> TileConfig:
    rq_tile, rc_tile = next_power_of_two(rq_eff), next_power_of_two(rc_eff)
    block_c = _per_block(rc_tile, 128)
    block_q = _fit_rows(rq_tile, 64, block_c * rc_tile, 64 * 128)
    warps = 8 if block_q * rq_tile * block_c * rc_tile >= 32 * 128 else 4
    return TileConfig(block_q, rq_tile, block_c, rc_tile, _block_d(d, dtype), 0, warps, 3)


def gradient_config(rq_eff: int, rc_eff: int, d: int, dtype: torch.dtype) -> TileConfig:
    """dq and dc passes (MaxSim and loss backward share them)."""
    rq_tile, rc_tile = next_power_of_two(rq_eff), next_power_of_two(rc_eff)
    block_c = _per_block(rc_tile, 64)
    block_q = _fit_rows(rq_tile, 64, block_c * rc_tile, 64 * 64)
    block_d = _backward_block_d(d, dtype)
    return TileConfig(block_q, rq_tile, block_c, rc_tile, block_d, block_d, 8, 2)


def hard_negative_config(rq_eff: int, rc_eff: int, d: int, dtype: torch.dtype, backward: bool) -> TileConfig:
    """One query (padded to 16 token rows) against a block of its own hard negatives."""
    rq_tile = max(MIN_DOT, next_power_of_two(rq_eff))
    rc_tile = next_power_of_two(rc_eff)
    block_k = _per_block(rc_tile, 64)
    block_d = _backward_block_d(d, dtype) if backward else _block_d(d, dtype)
    warps = 8 if rq_tile * block_k * rc_tile >= 32 * 128 else 4
    return TileConfig(1, rq_tile, block_k, rc_tile, block_d, block_d if backward else 0, warps,
                      2 if backward else 3)


# Largest token tiles: every kernel keeps at least one query's RQ_TILE rows against one
# candidate's RC_TILE columns in registers, and the backward tiles (<= 64 x 64 or 32 x 128)
# are what compiles without spills; (16, 256) spilled in the backward. verify.py compiles
# the corners (32, 128) and (64, 64).
MAX_RQ_TILE, MAX_RC_TILE, MAX_TOKEN_TILE = 64, 128, 4096


def unsupported_reason(rq_eff: int, rc_eff: int):
    """None if the largest group fits the verified tiles, else why not."""
    rq_tile, rc_tile = next_power_of_two(rq_eff), next_power_of_two(rc_eff)
    if rq_tile <= MAX_RQ_TILE and rc_tile <= MAX_RC_TILE and rq_tile * rc_tile <= MAX_TOKEN_TILE:
        return None
    return (f"the triton backend's tiles hold max r_q <= {MAX_RQ_TILE} and max r_c <= {MAX_RC_TILE} with "
            f"pow2(max r_q) * pow2(max r_c) <= {MAX_TOKEN_TILE}; the groups need max r_q={rq_eff}, "
            f"max r_c={rc_eff}. Use backend='cuda', 'cpu' or 'reference' for these budgets")


def groups_pad(num_groups: int) -> int:
    """Rows of the loss forward's per-group state; >= 8 so the usual G <= 8 shares one build."""
    return max(8, next_power_of_two(num_groups))


def numerics(dtype: torch.dtype) -> dict:
    """Constexprs that depend on the input dtype only (see kernels.py)."""
    import triton.language as tl

    return dict(
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",  # ignored for 16-bit operands
        PIECE_DTYPE=tl.float16 if dtype == torch.float16 else tl.bfloat16,
        SPLIT_FP32_OPERANDS=dtype == torch.float32,
        SCALE_TO_FP16_RANGE=dtype == torch.float16,
    )
