"""Tile sizes and launch options for the Triton kernels: a small table, no autotuning.

All tiles are M x N fp32 similarity tiles, M = BLOCK_Q * RQ_TILE query-token rows and
N = BLOCK_C * RC_TILE candidate-token columns, where RQ_TILE / RC_TILE are max r_q / max r_c
over the groups rounded up to a power of two (extra tokens are padding, masked), capped to
the token tile below. Keys are (Rq, Rc, D, dtype) and, for the MaxSim forward only, how many
queries there are.

Token chunks (any budget). A budget fits one tile when pow2(max r_q) <= 64, pow2(max r_c) <= 128
and their product <= 4096 (the largest token tiles the backward compiles without spills:
(32, 128) and (64, 64)); it then gets RQ_TILE = pow2(max r_q), RC_TILE = pow2(max r_c) and the
code it always had: the chunked code is a separate constexpr branch (CHUNKED), and the
single-tile kernels compile to the same PTX as before it existed. A larger budget is cut into
chunks of RQ_TILE query tokens / RC_TILE candidate tokens that the kernels loop over
(kernels.py, "Token chunks"). Chunk tiles start from RQ_TILE = min(pow2(max r_q), 64) and
RC_TILE = min(pow2(max r_c), 128, 4096 / RQ_TILE), then, per kernel:
* RC_TILE >= 64 (CHUNK_MIN_RC): a chunked tile carries (max, argmax) per group for
  GROUPS_PAD x M x BLOCK_C (row, candidate) pairs, so it holds at most 2 candidates;
* backward kernels (dq, dc, hard negatives): RC_TILE <= 64 (32 x 128 spilled), 8 warps;
* fp32: backward and hard-negative kernels RQ_TILE <= 32 (64-row fp32 tiles spilled), the
  forward tiles M*N <= 32*128 with 16-wide D chunks (the FMA dots spilled at 64 x 128);
* the ptxas register limit is set to 255 (maxnreg): left alone, ptxas capped some chunked
  kernels at 128 registers and spilled.

| (max r_q, max r_c)                        | RQ_TILE x RC_TILE: forward | backward         | chunks  |
|-------------------------------------------|----------------------------|------------------|---------|
| (16, 64), (32, 128), (64, 64) (MetaEmbed)  | one tile                   | one tile         | none    |
| (32, 300), (32, 1030) (ColBERT, ColPali)   | 32 x 128                   | 32 x 64          | r_c     |
| (64, 128), (64, 300)                      | 64 x 64                    | 64 x 64 [1]      | r_c     |
| (96, 64) (long queries)                   | 64 x 64                    | 64 x 64 [1]      | r_q     |
| (96, 300)                                 | 64 x 64                    | 64 x 64 [1]      | r_q+r_c |

[1] fp32: 32 x 64 (so r_q is chunked too).

A chunked launch handles at most CHUNK_GROUPS = 8 groups: the launcher splits more into
launches of 8 (each recomputes the similarities; the usual G <= 8 is one launch). Chunked
tiles are never larger (in M, N, M*N, M*BLOCK_C) than the largest the compile gate compiles
for the same kernel and branch (tests/test_triton.py checks it over a grid of budgets).
Cost of a chunked budget: the same similarity FLOPs as one big tile (each (row chunk, column
chunk) pair is computed once; the loss backward with r_q chunks computes it twice), plus the
carried state's updates, which are skipped for groups whose prefix has ended.

| kernel            | M (query-token rows)         | N (cand.-token cols) | M*N cap        | 8 warps if M*N >= | stages |
|-------------------|------------------------------|----------------------|----------------|-------------------|--------|
| maxsim forward    | pow2(Nq*RQ_TILE) in 16..128  | max(128, RC_TILE)    | 128*128 (fp32: 32*128) | 128*128 (fp32: 32*128) | 3 |
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
  MaxSim forward tile is capped at 32 x 128 (128 x 128 spilled; 64 x 128 spilled with
  triton 3.6), and the backward uses 16-wide D chunks (its bf16x6 gradient products spilled
  with 32) with the full register file (maxnreg 255: triton 3.6 spilled the 32 x 128 dc pass
  at 128). Every triton in the tested range (README, "Versions") passes the compile gate.
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
from typing import Tuple

import torch

SIXTEEN_BIT = (torch.bfloat16, torch.float16)
MIN_DOT = 16  # tl.dot needs every dimension >= 16


def next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class TileConfig:
    block_q: int  # queries per tile
    rq_tile: int  # token rows per query (power of two >= max r_q, or the row chunk)
    block_c: int  # candidates per tile
    rc_tile: int  # token columns per candidate (power of two >= max r_c, or the column chunk)
    block_d: int  # D chunk of the similarity loop
    block_do: int  # D chunk of the gradient products (backward kernels)
    num_warps: int
    num_stages: int
    q_chunked: bool = False  # max r_q > rq_tile: queries span several row chunks
    c_chunked: bool = False  # max r_c > rc_tile: candidates span several column chunks
    max_registers: int = 0  # ptxas register limit (maxnreg) when set; see options()

    @property
    def chunked(self) -> bool:
        return self.q_chunked or self.c_chunked

    @property
    def m(self) -> int:
        return self.block_q * self.rq_tile

    @property
    def n(self) -> int:
        return self.block_c * self.rc_tile

    def options(self) -> dict:
        """Launch / compile options. Chunked tiles and the fp32 gradient passes let ptxas use
        every register a thread can have (255 at 8 warps): left alone, it capped some at 128
        and spilled."""
        options = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        limit = self.max_registers or (CHUNK_MAX_REGISTERS if self.chunked else 0)
        if limit:
            options["maxnreg"] = limit
        return options

    def describe(self) -> str:
        chunks = "+".join(name for name, on in (("rq", self.q_chunked), ("rc", self.c_chunked)) if on)
        return (f"{self.m}x{self.n} (q {self.block_q}x{self.rq_tile}, c {self.block_c}x{self.rc_tile}) "
                f"BD{self.block_d} w{self.num_warps} s{self.num_stages}" + (f" chunks:{chunks}" if chunks else "")
                + (f" r{self.max_registers}" if self.max_registers else ""))


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


# Token tiles: every kernel keeps RQ_TILE query-token rows against RC_TILE candidate-token
# columns in registers; the backward tiles (<= 64 x 64 or 32 x 128) are what compiles without
# spills ((16, 256) spilled in the backward). Larger budgets are chunked to these tiles.
MAX_RQ_TILE, MAX_RC_TILE, MAX_TOKEN_TILE = 64, 128, 4096
MAX_TOKENS = 2**30  # token indices and chunk loops are int32
STATE_GROUPS = 16  # groups per unchunked loss-forward launch (its (m, l) state rows)
# Chunked tiles carry (max, argmax) per group for GROUPS_PAD x M x BLOCK_C (row, candidate)
# pairs on top of the single-tile work, so where a single-tile size spilled with it (verify.py)
# the chunked tile is one step smaller:
CHUNK_GROUPS = 8  # groups per chunked launch
CHUNK_MIN_RC = 64  # candidate columns per chunked tile: BLOCK_C <= 2 (pads only r_q > 64, r_c <= 32)
CHUNK_BACKWARD_RC = 64  # backward column chunks (32 x 128 spilled on sm_90, and with both hn products)
CHUNK_FP32_RQ = 32  # fp32 backward and hard-negative row chunks (64-row fp32 tiles spilled)
CHUNK_FP32_TILE = 32 * 128  # fp32 forward M x N (64 x 128 FMA tiles spilled)
# Single-tile fp32 MaxSim forward M x N: 64 x 128 (BD32, 8 warps) compiled without spills
# with triton 3.9 but spilled with triton 3.6 (STACK 24 on sm_80); 32 x 128 passes both.
FP32_FORWARD_TILE = 32 * 128
# fp32 gradient passes: ptxas register limit. Left to choose, triton 3.6's ptxas held the
# 32 x 128 dc pass (Rc = 128, BD16, 8 warps) to 128 registers and spilled (STACK 16).
FP32_GRADIENT_REGISTERS = 255
# 8-warp tiles of the per-query-candidate forward and the index scan: ptxas 12.8 (triton 3.6)
# capped them at 128 registers and spilled 8-24 bytes; ptxas 13 (triton 3.9) did not.
WIDE_FORWARD_REGISTERS = 255
CHUNK_MAX_REGISTERS = 255  # ptxas register limit of chunked launches (TileConfig.options)


def _forward_block_d(d: int, dtype: torch.dtype, chunked: bool) -> int:
    """fp32 chunked forward tiles: 16-wide D chunks (the FMA dot holds its operand chunks in
    registers; 32-wide spilled at 64 x 64 next to the carried maxima)."""
    return MIN_DOT if chunked and dtype not in SIXTEEN_BIT else _block_d(d, dtype)


def token_tiles(rq_eff: int, rc_eff: int, rq_floor: int = 1) -> Tuple[int, int]:
    """(RQ_TILE, RC_TILE) for these budgets: powers of two, capped to the token tile."""
    rq_tile = min(max(rq_floor, next_power_of_two(rq_eff)), MAX_RQ_TILE)
    rc_tile = min(next_power_of_two(rc_eff), MAX_RC_TILE, max(1, MAX_TOKEN_TILE // rq_tile))
    return rq_tile, rc_tile


def _chunks(rq_eff: int, rc_eff: int, rq_tile: int, rc_tile: int) -> dict:
    return dict(q_chunked=rq_eff > rq_tile, c_chunked=rc_eff > rc_tile)


def _tiles(rq_eff: int, rc_eff: int, rq_floor: int = 1, chunk_rq: int = 0, chunk_rc: int = 0):
    """(RQ_TILE, RC_TILE, chunk flags). Budgets that fit one tile keep token_tiles' sizes; a
    chunked kernel then applies its chunk caps (chunk_rq / chunk_rc, 0 = none) and gives each
    candidate >= CHUNK_MIN_RC columns, so that few candidates (BLOCK_C) share the tile."""
    rq_tile, rc_tile = token_tiles(rq_eff, rc_eff, rq_floor)
    chunks = _chunks(rq_eff, rc_eff, rq_tile, rc_tile)
    if any(chunks.values()):
        rq_tile = min(rq_tile, chunk_rq or rq_tile)
        rc_tile = min(max(rc_tile, min(CHUNK_MIN_RC, MAX_RC_TILE)), chunk_rc or MAX_RC_TILE)
        chunks = _chunks(rq_eff, rc_eff, rq_tile, rc_tile)
    return rq_tile, rc_tile, chunks


def _fit_columns(block_c: int, m: int, rc_tile: int, cap: int, chunked: bool) -> int:
    """Chunked tiles whose rows cannot shrink (one query's chunk) drop candidates instead."""
    while chunked and block_c > 1 and m * block_c * rc_tile > cap:
        block_c //= 2
    return block_c


def maxsim_forward_config(nq: int, rq_eff: int, rc_eff: int, d: int, dtype: torch.dtype) -> TileConfig:
    rq_tile, rc_tile, chunks = _tiles(rq_eff, rc_eff)
    chunked, sixteen_bit = any(chunks.values()), dtype in SIXTEEN_BIT
    cap = 128 * 128 if sixteen_bit else (CHUNK_FP32_TILE if chunked else FP32_FORWARD_TILE)
    block_c = _per_block(rc_tile, 128)
    m_want = min(128, next_power_of_two(max(nq, 1) * rq_tile))
    block_q = _fit_rows(rq_tile, m_want, block_c * rc_tile, cap)
    m = block_q * rq_tile
    block_c = _fit_columns(block_c, m, rc_tile, cap, chunked)
    n = block_c * rc_tile
    # chunked 16-bit tiles get 8 warps from 64 x 128 (4 spilled with the carried maxima)
    eight_from = 32 * 128 if not sixteen_bit else (64 * 128 if chunked else 128 * 128)
    warps = 8 if m * n >= eight_from else 4
    return TileConfig(block_q, rq_tile, block_c, rc_tile, _forward_block_d(d, dtype, chunked), 0, warps, 3,
                      **chunks)


def infonce_forward_config(rq_eff: int, rc_eff: int, d: int, dtype: torch.dtype) -> TileConfig:
    rq_tile, rc_tile, chunks = _tiles(rq_eff, rc_eff)
    chunked = any(chunks.values())
    cap = CHUNK_FP32_TILE if chunked and dtype not in SIXTEEN_BIT else 64 * 128
    block_c = _per_block(rc_tile, 128)
    block_q = _fit_rows(rq_tile, 64, block_c * rc_tile, cap)
    block_c = _fit_columns(block_c, block_q * rq_tile, rc_tile, cap, chunked)
    warps = 8 if block_q * rq_tile * block_c * rc_tile >= 32 * 128 else 4
    return TileConfig(block_q, rq_tile, block_c, rc_tile, _forward_block_d(d, dtype, chunked), 0, warps, 3,
                      **chunks)


def gradient_config(rq_eff: int, rc_eff: int, d: int, dtype: torch.dtype) -> TileConfig:
    """dq and dc passes (MaxSim and loss backward share them)."""
    fp32 = dtype not in SIXTEEN_BIT
    rq_tile, rc_tile, chunks = _tiles(rq_eff, rc_eff, chunk_rq=CHUNK_FP32_RQ if fp32 else 0,
                                      chunk_rc=CHUNK_BACKWARD_RC)
    cap = 32 * 64 if fp32 and any(chunks.values()) else 64 * 64
    block_c = _per_block(rc_tile, 64)
    block_q = _fit_rows(rq_tile, 64, block_c * rc_tile, cap)
    block_d = _backward_block_d(d, dtype)
    if rc_tile >= 128:  # 16-bit dc pass of a 32 x 128 tile spilled 8 B at BD64 (sm_80, triton 3.6)
        block_d = min(block_d, 32)
    return TileConfig(block_q, rq_tile, block_c, rc_tile, block_d, block_d, 8, 2, **chunks,
                      max_registers=FP32_GRADIENT_REGISTERS if fp32 else 0)


def hard_negative_config(rq_eff: int, rc_eff: int, d: int, dtype: torch.dtype, backward: bool) -> TileConfig:
    """One query (padded to 16 token rows) against a block of its own hard negatives."""
    fp32 = dtype not in SIXTEEN_BIT
    rq_tile, rc_tile, chunks = _tiles(rq_eff, rc_eff, rq_floor=MIN_DOT, chunk_rq=CHUNK_FP32_RQ if fp32 else 0,
                                      chunk_rc=CHUNK_BACKWARD_RC if backward else 0)
    if backward and fp32 and rc_tile > CHUNK_BACKWARD_RC:
        # fp32 per-query-candidate backward: 64-column chunks past 64 tokens (the paired dq
        # pass of a 32 x 128 tile spilled 8-16 B on sm_90 with triton 3.6 at any register limit)
        rc_tile = CHUNK_BACKWARD_RC
        chunks = _chunks(rq_eff, rc_eff, rq_tile, rc_tile)
    chunked = any(chunks.values())
    block_k = _per_block(rc_tile, 64)
    block_d = _backward_block_d(d, dtype) if backward else _forward_block_d(d, dtype, chunked)
    # the chunked backward does both products per chunk: 8 warps (32 x 64 fp16 spilled at 4)
    warps = 8 if rq_tile * block_k * rc_tile >= 32 * 128 or (chunked and backward) else 4
    wide_forward = warps == 8 and not backward and not chunked
    return TileConfig(1, rq_tile, block_k, rc_tile, block_d, block_d if backward else 0, warps,
                      2 if backward else 3, **chunks,
                      max_registers=WIDE_FORWARD_REGISTERS if wide_forward else 0)


def unsupported_reason(rq_eff: int, rc_eff: int):
    """None: every budget runs (chunked beyond one tile), short of int32 token indices."""
    if max(rq_eff, rc_eff) < MAX_TOKENS:
        return None
    return (f"the triton backend indexes tokens in int32 and needs max r_q, max r_c < 2^30; the groups need "
            f"max r_q={rq_eff}, max r_c={rc_eff}")


def groups_per_launch(num_groups: int, chunked: bool, carries_state: bool) -> int:
    """How many groups one launch handles: CHUNK_GROUPS when chunked (per-group running
    maxima), STATE_GROUPS for the unchunked loss forward's (m, l) rows, else all of them."""
    if chunked:
        return CHUNK_GROUPS
    return STATE_GROUPS if carries_state else num_groups


def groups_pad(num_groups: int) -> int:
    """Rows of the loss forward's per-group state; >= 8 so the usual G <= 8 shares one build
    (launches carry at most STATE_GROUPS = 16 groups: 8 or 16 rows)."""
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
