"""Triton kernel of the retrieval index (metaembed_kernels/index): grouped MaxSim scores of a
block of stored candidates, read in place from their prefix slabs.

A program owns BLOCK_Q queries x BLOCK_C candidates (rows r0 + [0, BLOCK_C) of a segment).
Column n of the tile is token j = n % RC_TILE of candidate b = n // RC_TILE; token j lives in
slab tok_slab(j) (storage.py), at element

    tok_base[j] + b * tok_stride[j] + tok_local[j]        (relative to slab 0's pointer)

tok_base[j] = (slab pointer - slab 0 pointer) / element size, tok_stride[j] = w * D,
tok_local[j] = (j - bounds[slab]) * D: three small int64 tables, so the slabs of a budget are
read where they are (a budget with r_c reads only its first r_c vectors per candidate) and
the tile is the same S[r, n] = <q row r, c column n> as the MaxSim kernel's (kernels.py), whose
building blocks (_query_rows, _lowest_nan, _group_best, _group_scores, _mma, _split3) it reuses:

    out[g, a, b] = sum_{i < r_q(g), q valid, some valid j < r_c(g)} max_{j < r_c(g), valid} S

int8 (INT8=True): the candidate chunk is converted to bfloat16 (exact: |x| <= 127 fits bf16's
8-bit significand), the float32 query chunk is split into three bfloat16 pieces
(q = hi + mid + lo to 2^-24 relative, kernels._split3), and S = sum of the three piece
products (tensor cores, float32 accumulation), then each column is multiplied by its vector's
scale: s_j * <q, x_j>, the dequantised vector's similarity up to float32 rounding.

The top-k selection runs on the scores of one block at a time (index/search.py's blockwise
loop: merge into the running top-k by (score desc, id asc)), so memory is O(G Nq (k + block)),
never (Nq, N). Budgets past one tile (r_q > 64 or r_c > 128) use the MaxSim kernel's chunked
path through the generic blockwise loop instead.
"""
import triton
import triton.language as tl

from .kernels import _group_best, _group_scores, _lowest_nan, _mma, _query_rows, _split3


@triton.jit
def _index_columns(tok_base_ptr, tok_stride_ptr, tok_local_ptr, r0, n_rows, rc_eff, mask_base_ptr,
                   mask_ptr, scale_ptr, HAS_MASK: tl.constexpr, INT8: tl.constexpr,
                   BLOCK_C: tl.constexpr, RC_TILE: tl.constexpr):
    """Element offset of every tile column (int64), whether it loads data, and per (candidate,
    token): validity (BLOCK_C, RC_TILE) and, for int8, the scale of every column."""
    cols = tl.arange(0, BLOCK_C * RC_TILE)
    col_b = r0 + cols // RC_TILE
    col_j = cols % RC_TILE
    col_in = (col_b < n_rows) & (col_j < rc_eff)
    base = tl.load(tok_base_ptr + col_j, mask=col_j < rc_eff, other=0)
    stride = tl.load(tok_stride_ptr + col_j, mask=col_j < rc_eff, other=0)
    local = tl.load(tok_local_ptr + col_j, mask=col_j < rc_eff, other=0)
    offset = base + col_b.to(tl.int64) * stride + local
    b = r0 + tl.arange(0, BLOCK_C)
    j = tl.arange(0, RC_TILE)
    tok_in = (b < n_rows)[:, None] & (j < rc_eff)[None, :]
    # masks and scales: slot (b * w + v) of the token's slab = offset / D, kept as offsets
    # relative to slab 0's mask / scale arrays by the launcher (mask_base / scale tables).
    valid = tok_in
    if HAS_MASK:
        mbase = tl.load(mask_base_ptr + 2 * j, mask=j < rc_eff, other=0)
        mstride = tl.load(mask_base_ptr + 2 * j + 1, mask=j < rc_eff, other=0)
        flags = tl.load(mask_ptr + mbase[None, :] + b.to(tl.int64)[:, None] * mstride[None, :], mask=tok_in, other=0)
        valid = tok_in & (flags != 0)
    scale = tl.zeros((BLOCK_C * RC_TILE,), dtype=tl.float32)
    if INT8:
        sbase = tl.load(mask_base_ptr + 2 * RC_TILE + 2 * col_j, mask=col_j < rc_eff, other=0)
        sstride = tl.load(mask_base_ptr + 2 * RC_TILE + 2 * col_j + 1, mask=col_j < rc_eff, other=0)
        scale = tl.load(scale_ptr + sbase + col_b.to(tl.int64) * sstride, mask=col_in, other=0.0)
    return offset, col_in, valid, scale


@triton.jit
def index_scores_kernel(
    q_ptr, q_mask_ptr, data_ptr, mask_ptr, scale_ptr, tok_base_ptr, tok_stride_ptr, tok_local_ptr,
    slot_table_ptr, group_rq_ptr, group_rc_ptr, out_ptr,
    n_q, n_rows, r_begin, n_out, rq_eff, rc_eff, D, n_groups, num_q_blocks,
    stride_qa, stride_qi, stride_mqa, stride_mqi,
    BLOCK_Q: tl.constexpr, RQ_TILE: tl.constexpr, BLOCK_C: tl.constexpr, RC_TILE: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, INT8: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """out[g, a, x] = s_g(q[a], row r_begin + x) for x < n_out (rows < n_rows of the segment)."""
    pid = tl.program_id(0)
    a0 = (pid % num_q_blocks) * BLOCK_Q
    x0 = (pid // num_q_blocks) * BLOCK_C
    M: tl.constexpr = BLOCK_Q * RQ_TILE
    N: tl.constexpr = BLOCK_C * RC_TILE
    qa, qi, q_offset, q_in, q_valid = _query_rows(a0, 0, n_q, rq_eff, q_mask_ptr, stride_mqa, stride_mqi,
                                                  stride_qa, stride_qi, BLOCK_Q, RQ_TILE)
    r0 = r_begin + x0
    n_end = tl.minimum(n_rows, r_begin + n_out)
    c_offset, c_in, c_valid, scale = _index_columns(tok_base_ptr, tok_stride_ptr, tok_local_ptr, r0, n_end, rc_eff,
                                                    slot_table_ptr, mask_ptr, scale_ptr, HAS_MASK, INT8, BLOCK_C,
                                                    RC_TILE)
    acc = tl.zeros((M, N), dtype=tl.float32)
    dd = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dd
        d_in = d < D
        q_chunk = tl.load(q_ptr + q_offset[:, None] + d[None, :], mask=q_in[:, None] & d_in[None, :], other=0.0)
        c_chunk = tl.load(data_ptr + c_offset[:, None] + d[None, :], mask=c_in[:, None] & d_in[None, :], other=0)
        if INT8:
            c16 = c_chunk.to(tl.float32).to(tl.bfloat16)  # exact
            hi, mid, lo = _split3(q_chunk, tl.bfloat16)
            acc = _mma(lo, tl.trans(c16), acc, DOT_PRECISION, INTERPRET)
            acc = _mma(mid, tl.trans(c16), acc, DOT_PRECISION, INTERPRET)
            acc = _mma(hi, tl.trans(c16), acc, DOT_PRECISION, INTERPRET)
        else:
            acc = _mma(q_chunk, tl.trans(c_chunk), acc, DOT_PRECISION, INTERPRET)
    if INT8:
        acc = acc * scale[None, :]
    S3 = tl.reshape(acc, (M, BLOCK_C, RC_TILE))
    nan_j = _lowest_nan(S3, c_valid, RC_TILE)  # a NaN similarity is the max (kernels.py, "Non-finite values")
    a = a0 + tl.arange(0, BLOCK_Q)
    xb = x0 + tl.arange(0, BLOCK_C)
    out_offset = a.to(tl.int64)[:, None] * n_out + xb[None, :]
    out_in = (a < n_q)[:, None] & (xb < n_out)[None, :]
    for g in range(n_groups):
        r_q = tl.load(group_rq_ptr + g)
        r_c = tl.load(group_rc_ptr + g)
        best, in_prefix, has_valid = _group_best(S3, c_valid, r_c, nan_j, RC_TILE)
        takes = (q_valid & (qi < r_q))[:, None] & has_valid[None, :]
        scores = _group_scores(best, takes, BLOCK_Q, RQ_TILE, BLOCK_C)
        tl.store(out_ptr + tl.cast(g, tl.int64) * n_q * n_out + out_offset, scores, mask=out_in)
