"""Triton kernels for grouped MaxSim and the fused Matryoshka InfoNCE loss.

Notation. A program owns a tile of BLOCK_Q queries x BLOCK_C candidates. Query a's tokens
occupy RQ_TILE consecutive rows (RQ_TILE = a power of two >= max r_q), candidate b's tokens
RC_TILE consecutive columns, so the similarity tile is

    S[r, n] = <q[a0 + r // RQ_TILE, r % RQ_TILE], c[b0 + n // RC_TILE, n % RC_TILE]>,
    M = BLOCK_Q * RQ_TILE rows,  N = BLOCK_C * RC_TILE columns,

computed with tl.dot over chunks of D (fp32 accumulation). Padding rows/columns (token
index past max r_q / max r_c, query/candidate index past Nq/Nc, d past D) load as zeros and
are masked out of every reduction. Viewing S as S3[r, b, j] (a reshape, no data movement),
every group g = (r_q, r_c) comes out of the same tile:

    best_g[r, b]  = max_{j < r_c, c valid} S3[r, b, j]                (none: see below)
    s_g(a, b)     = sum_{i < r_q, q valid, some valid j < r_c} best_g[(a, i), b]

so the candidate tensor is read once per query block whatever the number of groups.

Backward (recompute, never store the tile): with dS_g = dL/ds_g,

    W[r, n] = sum_g  dS_g(a, b) * [i < r_q(g), q valid] * [j == lowest argmax_g(r, b)]
    dq_block += W @ c_block,      dc_block += W^T @ q_block

Both products run on tensor cores. W is fp32; to keep fp32-faithful gradients it is split
into three 16-bit pieces, W = hi + mid + lo (each piece is the rounding of what the previous
ones left), and W @ x = lo @ x + mid @ x + hi @ x. With 16-bit inputs x is exact in its
dtype, each piece-times-x product is exact in fp32, and |W - (hi + mid + lo)| <= 2^-24 |W|
for bf16 pieces (8-bit significands, round-to-nearest; < 2^-21 |W| with the interpreter's
truncating conversion) and far below for fp16 pieces, i.e. at fp32's own rounding level.
fp16 pieces also need range: W is scaled by a power of two (exact) so that the largest finite
|W| lands in [2^14, 2^15) before splitting, and the product is scaled back (a NaN or inf
weight -- a NaN loss, an inf grad -- must not rescale the finite rows sharing its tile). For fp32 inputs x is split
into bf16 pieces as well and the six cross products above 2^-24 relative are summed
("bf16x6"); fp32 FMA dots, whose reduction length here is a whole tile dimension, spilled
registers.

Determinism: no atomics. dq is produced by a pass parallel over query blocks (each program
loops over all candidate blocks), dc by a pass parallel over candidate blocks (looping over
all query blocks); each program is the only writer of its fp32 accumulator rows, which it
updates with a read-modify-write per D chunk, separated by a CTA barrier between reuses.

Fused loss: per query block, stream the candidate blocks and keep an online log-sum-exp
(m, l) per (group, query) -- (GROUPS_PAD, BLOCK_Q) registers -- plus the positive's logit.
A second kernel, one program per query, folds in that query's own hard negatives. Only
(G, Nq) numbers (lse, positive logit) ever reach memory. The fold matches torch.logsumexp
on infinities (see _lse_fold): all -inf -> -inf, any +inf -> +inf, NaN -> NaN.

Per-query candidates ("own candidates": the loss's hard negatives, paired MaxSim). Query a
has its own list x[a] (K, Rc, D): hard_negatives[a] of the loss, c[a] (N, Rc, D) of
maxsim_paired_grouped. A tile is one query (RQ_TILE rows, >= 16 for tl.dot) against BLOCK_K
of its own candidates; the candidate base pointer is x + a * stride_a (int64), everything else
is the in-batch machinery with BLOCK_Q = 1. Paired forward: one program per (query, candidate
block). Backward (own_candidates_backward_kernel, shared by the loss and paired MaxSim):
one program per query loops over its candidate blocks and is the only writer of dq[a] and of
dx[a] (deterministic, no atomics); when dq is not wanted the candidate blocks are split over
several programs per query (each still the only writer of its dx rows).

Non-finite values and masks (the op contract). A masked token never counts: its similarity
entries get the invalid max key (below -inf) or its row takes nothing, whatever they hold. In
the gradient products, where a zero weight times a NaN operand would leak (0 * NaN = NaN),
masked tokens are not loaded at all (their operand rows load as zeros) and their gradient
rows are never stored (they stay exactly 0); the similarity loads every existing token, and
the column flags for the products are read next to them (_column_validity): masks loaded
with the similarity tiles and held through S and W made ptxas spill. Validity comes from
the masks only: -inf is an ordinary value. NaN follows torch.amax / torch.argmax: a NaN similarity is the maximum and the argmax
is the lowest NaN index. A float max does not give that on the GPU (tl.max / tl.maximum
lower to max.f32 / maxnum, which return the non-NaN operand; Triton 3.9's interpreter reduces
with np.nanmax, likewise), so NaN never relies on it: per tile, nan_j[r, b] = the lowest
valid j with S[r, b, j] NaN (one integer min, shared by the groups); group g's maximum is NaN
iff nan_j < r_c(g), and its argmax is then nan_j (no == finds a NaN). "No valid token in the
prefix" comes from the masks, so a prefix of valid -inf similarities scores -inf and its
argmax is its lowest valid j. Across column chunks the carried maxima are int32 "max keys"
(_max_keys): an order-preserving map of the fp32 bits in which every NaN is one key above
+inf, -0.0 and +0.0 are one key, and "no valid token yet" is a key below -inf, so that a
later chunk takes over iff its key is strictly larger -- NaN sticky, ties to the lowest j,
the first valid token taken whatever its value -- in one integer compare. (Keys for whole
tiles cost registers that several kernels did not have.)
The online log-sum-exp never needs a NaN-aware max: a NaN logit makes its exp term, hence l,
NaN for good (_lse_fold).

Token chunks (any budget). Tiles hold RQ_TILE <= 64 query tokens x RC_TILE <= 128 candidate
tokens, RQ_TILE * RC_TILE <= 4096 (what compiles without spills; smaller for some chunked
kernels, see heuristics.py). A longer query is cut into row chunks of RQ_TILE consecutive
tokens (i0 = 0, RQ_TILE, 2 RQ_TILE, ...), a longer candidate into column chunks of RC_TILE
tokens (j0 = 0, RC_TILE, ...); chunk pair (i0, j0) is an ordinary tile whose rows / columns
carry the token offsets i0 / j0. Why chunks rather than bigger tiles: a tile's S, W and
per-group epilogue live in registers, and bigger tiles spill. The reductions split over chunks:

    best_g[r, b] = max_{j0 < r_c} ( max_{j0 <= j < min(j0 + RC_TILE, r_c), valid} S3[r, b, j] )
    s_g(a, b)    = sum_{i0 < r_q} ( sum of best_g over query a's rows in row chunk i0 )

A program loops row chunks (outer) and column chunks (inner) and carries, for every row of
the current row chunk and every group, the running max, the lowest maximising global j and
whether the prefix has a valid token: (GROUPS_PAD, M, BLOCK_C) registers, GROUPS_PAD = 8
(more groups are split into launches of 8 by the launcher). Columns are visited in increasing
j and a later chunk takes over the argmax only if its max is strictly larger, so ties go to
the lowest global j, as within a chunk (tl.min over the maximising j). A group whose prefix
has ended (r_c <= j0, or r_q <= i0) skips the chunk. Row-chunk partial sums add up in
(GROUPS_PAD, BLOCK_Q, BLOCK_C) registers.

Backward, per (query block, candidate block) pair and row chunk: pass 1 over the column chunks
computes S and carries (max, argmax) as above; pass 2 over them again builds each chunk's W --
nonzero only at those carried argmaxes that fall in the chunk -- from the argmax alone (S is
not recomputed), and runs the usual products on the chunk: dq rows of the row chunk += W @ c
chunk, dc rows of the column chunk += W^T @ q rows. The loss's dS_g needs the whole s_g(a, b):
with one row chunk pass 1 provides it, with several a pre-pass recomputes the pair's scores
(the only duplicated work: one more similarity pass for loss gradients of > 64-token queries).
Nothing new reaches memory (no stored argmax or scores; the loss keeps O(Nq G)), and each
program is still the only writer of its dq / dc rows (no atomics).

Budgets that fit one tile take the CHUNKED=False branch: the code they compiled to before
(the chunk offsets are constant zeros there), so the common shapes pay nothing.

Similarity tiles: fp32 inputs use input_precision="ieee" (exact fp32 products on CUDA
cores): TF32's 10-bit mantissa would change which candidate token wins a max, i.e. both
scores and where the gradient goes, and break parity with the reference. bf16/fp16 use
tensor cores with fp32 accumulation (products of 16-bit values are exact in fp32).

Interpreter: Triton 3.9's interpreter stores bf16 as uint16 and its tl.dot multiplies the
bit patterns (triton-lang/triton#11584; bf16 arithmetic is unsupported there). With
INTERPRET=True every tl.dot upcasts its operands to fp32 first, which is exact for bf16/fp16
and equals what a tensor core computes up to fp32 summation order. No other arithmetic is
done on 16-bit values (only loads, conversions and dots). The interpreter converts fp32 to
bf16 by truncation (the GPU rounds to nearest); the W split is exact enough either way.
"""
import triton
import triton.language as tl

# Runtime ints that are never specialised (Triton would make a value of 1 a constant): every
# group count, group batch, candidate count and split of a launch runs the code the compile
# gate verified.
GROUP_COUNT = ["n_groups"]

# Max keys (see _max_keys): NaN above +inf (bits 0x7F800000), invalid tokens below -inf.
NAN_KEY = tl.constexpr(0x7F800001)
INVALID_KEY = tl.constexpr(-2**31)
NO_NAN = tl.constexpr(2**30)  # "no NaN" token index: past every budget (heuristics.MAX_TOKENS)


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------
@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b in fp32 (tensor cores for 16-bit operands)."""
    if INTERPRET:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _query_rows(a0, i0, n_q, rq_eff, mask_ptr, stride_mask_a, stride_mask_i, stride_a, stride_i,
                BLOCK_Q: tl.constexpr, RQ_TILE: tl.constexpr):
    """Row r of a tile is token i = i0 + r % RQ_TILE of query a = a0 + r // RQ_TILE (i0 = the
    row chunk's first token, 0 unless queries are chunked).

    Returns (a, i, element offset of the row (int64), row exists (a < Nq, i < max r_q: what
    the similarity loads), valid = exists and the mask says True: what counts, and what the
    gradient products load and store). Loading the similarity rows by validity instead made
    ptxas spill (the loaded flags held through the D loop); a masked row's S is never used.
    """
    rows = tl.arange(0, BLOCK_Q * RQ_TILE)
    a = a0 + rows // RQ_TILE
    i = i0 + rows % RQ_TILE
    in_range = (a < n_q) & (i < rq_eff)
    a64 = a.to(tl.int64)
    flags = tl.load(mask_ptr + a64 * stride_mask_a + i * stride_mask_i, mask=in_range, other=0)
    offset = a64 * stride_a + i.to(tl.int64) * stride_i
    return a, i, offset, in_range, in_range & (flags != 0)


@triton.jit
def _row_validity(a0, i0, n_q, rq_eff, mask_ptr, stride_mask_a, stride_mask_i,
                  BLOCK_Q: tl.constexpr, RQ_TILE: tl.constexpr):
    """_query_rows' valid, re-read next to the gradient products that need it (a few cached
    bytes) rather than held in registers through the passes before them."""
    rows = tl.arange(0, BLOCK_Q * RQ_TILE)
    a = a0 + rows // RQ_TILE
    i = i0 + rows % RQ_TILE
    in_range = (a < n_q) & (i < rq_eff)
    flags = tl.load(mask_ptr + a.to(tl.int64) * stride_mask_a + i * stride_mask_i, mask=in_range, other=0)
    return in_range & (flags != 0)


@triton.jit
def _column_tokens(b0, j0, n_c, rc_eff, BLOCK_C: tl.constexpr, RC_TILE: tl.constexpr):
    """(candidate (int64), token, token exists) of each tile column (see _candidate_columns)."""
    cols = tl.arange(0, BLOCK_C * RC_TILE)
    col_b = (b0 + cols // RC_TILE).to(tl.int64)
    col_j = j0 + cols % RC_TILE
    return col_b, col_j, (col_b < n_c) & (col_j < rc_eff)


@triton.jit
def _candidate_columns(b0, j0, n_c, rc_eff, mask_ptr, stride_mask_b, stride_mask_j, stride_b, stride_j,
                       BLOCK_C: tl.constexpr, RC_TILE: tl.constexpr):
    """Column n of a tile is token j = j0 + n % RC_TILE of candidate b = b0 + n // RC_TILE
    (j0 = the column chunk's first token, 0 unless candidates are chunked).

    Returns (element offset of each column (int64), column exists (b < Nc, j < max r_c: what
    the similarity loads), candidate index (BLOCK_C,), token validity -- exists and the mask
    says True -- as a (BLOCK_C, RC_TILE) grid for the epilogue). A masked token's similarity
    is loaded but never used (its max key is the invalid one); the gradient products, where
    it would matter, load and store valid columns only (_column_validity).
    """
    col_b, col_j, col_in = _column_tokens(b0, j0, n_c, rc_eff, BLOCK_C, RC_TILE)
    offset = col_b * stride_b + col_j.to(tl.int64) * stride_j
    b = b0 + tl.arange(0, BLOCK_C)
    j = j0 + tl.arange(0, RC_TILE)
    tok_in = (b < n_c)[:, None] & (j < rc_eff)[None, :]
    flags = tl.load(mask_ptr + b.to(tl.int64)[:, None] * stride_mask_b + j[None, :] * stride_mask_j,
                    mask=tok_in, other=0)
    return offset, col_in, b, tok_in & (flags != 0)


@triton.jit
def _column_validity(b0, j0, n_c, rc_eff, mask_ptr, stride_mask_b, stride_mask_j,
                     BLOCK_C: tl.constexpr, RC_TILE: tl.constexpr):
    """Column n is a valid token (exists, mask True), in the columns' own layout: what the
    gradient products load (masked columns as zeros: a zero weight never meets their NaN) and
    store (masked tokens' gradients stay exactly 0). Read from the mask next to the products
    (a few bytes, cached), so that the flags are not held in registers through S and W."""
    col_b, col_j, col_in = _column_tokens(b0, j0, n_c, rc_eff, BLOCK_C, RC_TILE)
    flags = tl.load(mask_ptr + col_b * stride_mask_b + col_j * stride_mask_j, mask=col_in, other=0)
    return col_in & (flags != 0)


@triton.jit
def _similarity(q_ptr, q_offset, q_in, c_ptr, c_offset, c_in, D,
                M: tl.constexpr, N: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """S = Q_tile @ C_tile^T over D in BLOCK_D chunks, fp32 (M, N). The d stride is 1.
    Rows / columns that do not exist (q_in / c_in False) load as zeros."""
    acc = tl.zeros((M, N), dtype=tl.float32)
    dd = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dd
        d_in = d < D
        q_chunk = tl.load(q_ptr + q_offset[:, None] + d[None, :], mask=q_in[:, None] & d_in[None, :], other=0.0)
        c_chunk = tl.load(c_ptr + c_offset[:, None] + d[None, :], mask=c_in[:, None] & d_in[None, :], other=0.0)
        acc = _mma(q_chunk, tl.trans(c_chunk), acc, DOT_PRECISION, INTERPRET)
    return acc


@triton.jit
def _lowest_nan(S3, c_valid, RC_TILE: tl.constexpr):
    """nan_j[r, b] = the lowest tile-local j of a valid token with S3[r, b, j] NaN, NO_NAN if
    none: one integer min per tile, shared by every group (see "Non-finite values"). NO_NAN
    exceeds every prefix end, also a chunk-local one past the chunk (r_c - j0 > RC_TILE)."""
    j3 = tl.arange(0, RC_TILE)[None, None, :]
    return tl.min(tl.where(c_valid[None, :, :] & (S3 != S3), j3, NO_NAN), axis=2)


@triton.jit
def _group_best(S3, c_valid, r_c, nan_j, RC_TILE: tl.constexpr):
    """best[r, b] = max_{j < r_c, valid} S3[r, b, j] -- NaN if one of them is NaN (nan_j < r_c:
    the float max may drop it), -inf if none is valid; also the prefix mask and whether the
    prefix holds a valid token (a query token facing none contributes 0)."""
    j = tl.arange(0, RC_TILE)
    in_prefix = c_valid & (j[None, :] < r_c)  # (BLOCK_C, RC_TILE)
    best = tl.max(tl.where(in_prefix[None, :, :], S3, float("-inf")), axis=2)  # (M, BLOCK_C)
    best = tl.where(nan_j < r_c, float("nan"), best)
    has_valid = tl.max(in_prefix.to(tl.int32), axis=1) > 0  # (BLOCK_C,)
    return best, in_prefix, has_valid


@triton.jit
def _group_scores(best, takes, BLOCK_Q: tl.constexpr, RQ_TILE: tl.constexpr, BLOCK_C: tl.constexpr):
    """s_g(a, b) = sum over query a's rows of the kept maxima -> (BLOCK_Q, BLOCK_C)."""
    contrib = tl.where(takes, best, 0.0)
    return tl.sum(tl.reshape(contrib, (BLOCK_Q, RQ_TILE, BLOCK_C)), axis=1)


@triton.jit
def _lowest_argmax(S3, best, in_prefix, nan_j, RC_TILE: tl.constexpr):
    """Lowest tile-local j in the prefix with S3[r, b, j] == best[r, b] (ties: the lowest index;
    a valid -inf is found like any value); the lowest NaN j (nan_j) when best is NaN, which no
    == finds; RC_TILE if the prefix holds no valid token."""
    j3 = tl.arange(0, RC_TILE)[None, None, :]
    is_max = in_prefix[None, :, :] & (S3 == best[:, :, None])
    arg = tl.min(tl.where(is_max, j3, RC_TILE), axis=2)
    return tl.where(best != best, nan_j, arg)


@triton.jit
def _add_argmax_weights(W3, S3, best, in_prefix, nan_j, takes, dS,
                        BLOCK_Q: tl.constexpr, RQ_TILE: tl.constexpr, BLOCK_C: tl.constexpr,
                        RC_TILE: tl.constexpr):
    """W3[r, b, j*] += dS(a, b) where j* is the lowest maximising index of row r against b."""
    j3 = tl.arange(0, RC_TILE)[None, None, :]
    argmax = _lowest_argmax(S3, best, in_prefix, nan_j, RC_TILE)
    M: tl.constexpr = BLOCK_Q * RQ_TILE
    w_rows = tl.reshape(tl.broadcast_to(dS[:, None, :], (BLOCK_Q, RQ_TILE, BLOCK_C)), (M, BLOCK_C))
    w_rows = tl.where(takes, w_rows, 0.0)
    return W3 + tl.where(j3 == argmax[:, :, None], w_rows[:, :, None], 0.0)


@triton.jit
def _max_keys(best, valid):
    """int32 keys whose integer order is torch.amax's order of the values `best`: a value with
    the sign bit set that is not NaN (bits <= bits(-inf)) -> -(bits & 0x7FFFFFFF), anything
    else -> bits & 0x7FFFFFFF, capped at NAN_KEY. So -0.0 and +0.0 share key 0 (they compare
    equal as floats), -inf is the lowest value, every NaN (either sign, any payload) is
    NAN_KEY, above +inf, and invalid entries get INVALID_KEY, below every value. The carried
    state of the column-chunk fold (_chunk_maxima): one integer compare does its rules."""
    bits = best.to(tl.int32, bitcast=True)
    magnitude = bits & 0x7FFFFFFF
    key = tl.minimum(tl.where(bits <= -0x800000, -magnitude, magnitude), NAN_KEY)
    return tl.where(valid, key, INVALID_KEY)


@triton.jit
def _key_values(key):
    """The value a max key stands for (NaN for NAN_KEY; INVALID_KEY is never used as a value)."""
    bits = tl.where(key < 0, (0 - key) | INVALID_KEY, key)  # INVALID_KEY is the sign bit
    return tl.where(key == NAN_KEY, float("nan"), bits.to(tl.float32, bitcast=True))


@triton.jit
def _power_of_two(k):
    """2^k as fp32, exactly, for integer k in [-126, 127] (built from the exponent bits)."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _split3(x, PIECE_DTYPE: tl.constexpr):
    """x (fp32) ~= hi + mid + lo, each piece the rounding of what the previous ones left."""
    hi = x.to(PIECE_DTYPE)
    rest = x - hi.to(tl.float32)
    mid = rest.to(PIECE_DTYPE)
    rest = rest - mid.to(tl.float32)
    lo = rest.to(PIECE_DTYPE)
    return hi, mid, lo


@triton.jit
def _split_weights(W, PIECE_DTYPE: tl.constexpr, SCALE_TO_FP16_RANGE: tl.constexpr):
    """W (fp32) ~= (hi + mid + lo) * unscale, pieces in PIECE_DTYPE."""
    if SCALE_TO_FP16_RANGE:
        # The largest finite |W| -> [2^14, 2^15): its exponent read from its bits, k clamped so
        # that 2^k and 2^-k are normal fp32 numbers. Powers of two scale exactly. NaN / inf
        # weights are left out of the maximum (they stay NaN / inf when scaled), so that they
        # cannot push the finite weights sharing the tile out of fp16's range.
        w_abs = tl.abs(W)
        w_max = tl.max(tl.max(tl.where(w_abs < float("inf"), w_abs, 0.0), axis=1), axis=0)
        exponent = ((w_max.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        k = tl.minimum(tl.maximum(14 - exponent, -120), 120)
        W = W * _power_of_two(k)
        unscale = _power_of_two(-k)
    else:
        unscale = 1.0
    hi, mid, lo = _split3(W, PIECE_DTYPE)
    return hi, mid, lo, unscale


@triton.jit
def _product_chunk(hi, mid, lo, x, OUT_ROWS: tl.constexpr, BLOCK_DO: tl.constexpr,
                   SPLIT_FP32_OPERANDS: tl.constexpr, INTERPRET: tl.constexpr):
    """(hi + mid + lo) @ x for one D chunk of x, fp32 (OUT_ROWS, BLOCK_DO).

    16-bit x is exact in its own dtype: A @ x = lo @ x + mid @ x + hi @ x (3 MMAs).
    fp32 x is split into bf16 pieces too, and the six products above 2^-24 relative are
    summed (the "bf16x6" scheme): tensor cores at fp32-level accuracy, where fp32 FMA dots
    with a whole tile dimension as reduction length would spill registers.
    Small terms are accumulated first."""
    part = tl.zeros((OUT_ROWS, BLOCK_DO), dtype=tl.float32)
    if SPLIT_FP32_OPERANDS:
        x_hi, x_mid, x_lo = _split3(x, tl.bfloat16)
        part = _mma(hi, x_lo, part, "tf32", INTERPRET)
        part = _mma(mid, x_mid, part, "tf32", INTERPRET)
        part = _mma(lo, x_hi, part, "tf32", INTERPRET)
        part = _mma(hi, x_mid, part, "tf32", INTERPRET)
        part = _mma(mid, x_hi, part, "tf32", INTERPRET)
        part = _mma(hi, x_hi, part, "tf32", INTERPRET)
    else:
        part = _mma(lo, x, part, "tf32", INTERPRET)
        part = _mma(mid, x, part, "tf32", INTERPRET)
        part = _mma(hi, x, part, "tf32", INTERPRET)
    return part


@triton.jit
def _accumulate_product(out_ptr, out_offset, out_in, hi, mid, lo, unscale, x_ptr, x_offset, x_in, D,
                        OUT_ROWS: tl.constexpr, BLOCK_DO: tl.constexpr, SPLIT_FP32_OPERANDS: tl.constexpr,
                        INTERPRET: tl.constexpr):
    """out[rows, :] += A @ x[rows', :] (fp32 read-modify-write, D in BLOCK_DO chunks), with
    A = (hi + mid + lo) * unscale given as its pieces (_product_chunk). Only valid x rows are
    loaded (x_in; the others are zeros, so a zero weight never meets a NaN of a masked token)
    and only valid out rows are stored (out_in; masked tokens' gradients stay exactly 0).

    The caller must be the only writer of these output rows; it must separate two calls on
    the same rows by a barrier (the store and the next load may be done by other threads).
    """
    dd = tl.arange(0, BLOCK_DO)
    for d0 in range(0, D, BLOCK_DO):
        d = d0 + dd
        d_in = d < D
        x = tl.load(x_ptr + x_offset[:, None] + d[None, :], mask=x_in[:, None] & d_in[None, :], other=0.0)
        part = _product_chunk(hi, mid, lo, x, OUT_ROWS, BLOCK_DO, SPLIT_FP32_OPERANDS, INTERPRET)
        out_ptrs = out_ptr + out_offset[:, None] + d[None, :]
        out_mask = out_in[:, None] & d_in[None, :]
        acc = tl.load(out_ptrs, mask=out_mask, other=0.0)
        tl.store(out_ptrs, acc + part * unscale, mask=out_mask)


@triton.jit
def _write_product(out_ptr, out_offset, out_in, out_range, hi, mid, lo, unscale, x_ptr, x_offset, x_in, D,
                   OUT_ROWS: tl.constexpr, BLOCK_DO: tl.constexpr, SPLIT_FP32_OPERANDS: tl.constexpr,
                   INTERPRET: tl.constexpr):
    """out[rows, :] = A @ x[rows', :], rounded once to out's dtype: for rows that get exactly
    one contribution, so no fp32 accumulator (zeroing it, reading it back, converting it) is
    needed. Every existing row (out_range) is written, the invalid ones with exact zeros."""
    dd = tl.arange(0, BLOCK_DO)
    for d0 in range(0, D, BLOCK_DO):
        d = d0 + dd
        d_in = d < D
        x = tl.load(x_ptr + x_offset[:, None] + d[None, :], mask=x_in[:, None] & d_in[None, :], other=0.0)
        part = _product_chunk(hi, mid, lo, x, OUT_ROWS, BLOCK_DO, SPLIT_FP32_OPERANDS, INTERPRET)
        value = tl.where(out_in[:, None], part * unscale, 0.0)
        tl.store(out_ptr + out_offset[:, None] + d[None, :], value.to(out_ptr.dtype.element_ty),
                 mask=out_range[:, None] & d_in[None, :])


@triton.jit
def _lse_fold(m, l, x, AXIS: tl.constexpr):
    """Fold logits x into the running (max m, scaled sum l) along AXIS, as torch.logsumexp:

        m' = max(m, max x),  l' = l * exp(m - m') + sum_x exp(x - m'),  lse = m + log(l),

    except that a term whose exponent would be inf - inf (equal infinities) counts exp(0) = 1:
    all -inf -> m = -inf, l = count (lse = -inf); any +inf -> m = +inf, l >= 1 (lse = +inf).
    A NaN logit makes its term NaN, hence l NaN for good (lse NaN), whatever tl.max /
    tl.maximum (NaN-dropping on the GPU) make of m. l >= 1 once a non-NaN logit was seen."""
    m_new = tl.maximum(m, tl.max(x, axis=AXIS))
    alpha = tl.where(m == m_new, 1.0, tl.exp(m - m_new))
    m_x = tl.expand_dims(m_new, AXIS)
    terms = tl.where(x == m_x, 1.0, tl.exp(x - m_x))
    return m_new, l * alpha + tl.sum(terms, axis=AXIS)


@triton.jit
def _online_lse_update(m, l, pos, logits, is_positive, g, GROUPS_PAD: tl.constexpr):
    """Fold a (BLOCK_Q, BLOCK_C) block of group g's logits into the running state.

    State rows are groups: m[g, a] = running max, l[g, a] = sum exp(logit - m), pos[g, a]
    = the positive's logit. Row g is read with a masked sum (exact for any value, NaN and
    infinities included; a masked max would drop a NaN m)."""
    is_g = (tl.arange(0, GROUPS_PAD) == g)[:, None]  # (GROUPS_PAD, 1)
    m_old = tl.sum(tl.where(is_g, m, 0.0), axis=0)  # (BLOCK_Q,)
    l_old = tl.sum(tl.where(is_g, l, 0.0), axis=0)
    m_new, l_new = _lse_fold(m_old, l_old, logits, 1)
    pos_block = tl.sum(tl.where(is_positive, logits, 0.0), axis=1)  # the positive lies in one block
    m = tl.where(is_g, m_new[None, :], m)
    l = tl.where(is_g, l_new[None, :], l)
    pos = pos + tl.where(is_g, pos_block[None, :], 0.0)
    return m, l, pos


@triton.jit
def _online_lse_update_groups(m, l, pos, logits, is_positive):
    """_online_lse_update for every group at once: m, l, pos (GROUPS_PAD, BLOCK_Q), logits
    (GROUPS_PAD, BLOCK_Q, BLOCK_C), is_positive (BLOCK_Q, BLOCK_C). Padded group rows see
    finite logits (their scores are 0) and are never stored."""
    m, l = _lse_fold(m, l, logits, 2)
    pos = pos + tl.sum(tl.where(is_positive[None, :, :], logits, 0.0), axis=2)
    return m, l, pos


# ---------------------------------------------------------------------------------------
# Token chunks (budgets beyond one tile; see "Token chunks" in the module docstring)
# ---------------------------------------------------------------------------------------
@triton.jit
def _chunk_maxima(q_ptr, q_offset, q_in, i0, c_ptr, c_mask_ptr, b0, n_c, rc_eff, D,
                  group_rq_ptr, group_rc_ptr, n_groups, stride_cb, stride_cj, stride_mcb, stride_mcj,
                  M: tl.constexpr, BLOCK_C: tl.constexpr, RC_TILE: tl.constexpr, BLOCK_D: tl.constexpr,
                  GROUPS_PAD: tl.constexpr, WITH_ARGMAX: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  INTERPRET: tl.constexpr):
    """One row chunk (M rows starting at token i0) against candidates b0 + [0, BLOCK_C), over
    every column chunk j0 = 0, RC_TILE, 2 RC_TILE, ... < rc_eff, carrying per group g:

        best[g, r, b] = max key (_max_keys) over j < r_c(g) of S[r, (b, j)]  (INVALID_KEY: none valid)
        arg[g, r, b]  = lowest global j attaining it                        (-1 if none; WITH_ARGMAX)

    Each chunk's maximum comes from the float path (_group_best: NaN-aware), as its key.
    Chunks are visited in increasing j and a later chunk takes over iff its key is strictly
    larger: ties resolve to the lowest global j, as within a chunk, a NaN (the largest key)
    sticks, and the prefix's first valid token wins over INVALID_KEY whatever its value (-inf
    included: validity comes from the masks). A group whose prefix ends before j0 (r_c <= j0),
    or whose query tokens end before i0, skips the chunk: its state is final (or unused).
    """
    best = tl.full((GROUPS_PAD, M, BLOCK_C), INVALID_KEY, dtype=tl.int32)
    arg = tl.full((GROUPS_PAD, M, BLOCK_C), -1, dtype=tl.int32)
    slot = tl.arange(0, GROUPS_PAD)
    for j0 in range(0, rc_eff, RC_TILE):
        c_offset, c_in, b, c_valid = _candidate_columns(b0, j0, n_c, rc_eff, c_mask_ptr, stride_mcb, stride_mcj,
                                                        stride_cb, stride_cj, BLOCK_C, RC_TILE)
        S = _similarity(q_ptr, q_offset, q_in, c_ptr, c_offset, c_in, D, M, BLOCK_C * RC_TILE, BLOCK_D,
                        DOT_PRECISION, INTERPRET)
        S3 = tl.reshape(S, (M, BLOCK_C, RC_TILE))
        nan_j = _lowest_nan(S3, c_valid, RC_TILE)
        for g in range(n_groups):
            r_q = tl.load(group_rq_ptr + g)
            r_c = tl.load(group_rc_ptr + g)
            if (r_c > j0) & (r_q > i0):
                chunk_best, in_prefix, chunk_has = _group_best(S3, c_valid, r_c - j0, nan_j, RC_TILE)
                chunk_key = _max_keys(chunk_best, chunk_has[None, :])
                wins = (slot == g)[:, None, None] & (chunk_key[None, :, :] > best)
                best = tl.where(wins, chunk_key[None, :, :], best)
                if WITH_ARGMAX:
                    chunk_arg = j0 + _lowest_argmax(S3, chunk_best, in_prefix, nan_j, RC_TILE)
                    arg = tl.where(wins, chunk_arg[None, :, :], arg)
    return best, arg


@triton.jit
def _row_takes(qi, q_valid, best, group_rq_ptr, n_groups, GROUPS_PAD: tl.constexpr):
    """takes[g, r, b]: row r's maximum counts in s_g(a, b) -- a valid token with i < r_q(g),
    facing a candidate with a valid token in g's prefix. Padded group slots take nothing."""
    slot = tl.arange(0, GROUPS_PAD)
    r_q = tl.load(group_rq_ptr + slot, mask=slot < n_groups, other=0)
    row_ok = q_valid[None, :] & (qi[None, :] < r_q[:, None])  # (GROUPS_PAD, M)
    return row_ok[:, :, None] & (best != INVALID_KEY)


@triton.jit
def _add_chunk_scores(scores, best, takes, BLOCK_Q: tl.constexpr, RQ_TILE: tl.constexpr, BLOCK_C: tl.constexpr,
                      GROUPS_PAD: tl.constexpr):
    """scores[g, a, b] += sum over query a's rows in this row chunk of the kept maxima."""
    contrib = tl.reshape(tl.where(takes, _key_values(best), 0.0), (GROUPS_PAD, BLOCK_Q, RQ_TILE, BLOCK_C))
    return scores + tl.sum(contrib, axis=2)


@triton.jit
def _pair_scores(a0, b0, q_ptr, q_mask_ptr, n_q, rq_eff, stride_qa, stride_qi, stride_mqa, stride_mqi,
                 c_ptr, c_mask_ptr, n_c, rc_eff, stride_cb, stride_cj, stride_mcb, stride_mcj, D,
                 group_rq_ptr, group_rc_ptr, n_groups,
                 BLOCK_Q: tl.constexpr, RQ_TILE: tl.constexpr, BLOCK_C: tl.constexpr, RC_TILE: tl.constexpr,
                 BLOCK_D: tl.constexpr, GROUPS_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 INTERPRET: tl.constexpr):
    """s_g(a, b) for queries a0 + [0, BLOCK_Q) x candidates b0 + [0, BLOCK_C), every group at
    once -> (GROUPS_PAD, BLOCK_Q, BLOCK_C): the row-chunk partial sums add up."""
    M: tl.constexpr = BLOCK_Q * RQ_TILE
    scores = tl.zeros((GROUPS_PAD, BLOCK_Q, BLOCK_C), dtype=tl.float32)
    for i0 in range(0, rq_eff, RQ_TILE):
        qa, qi, q_offset, q_in, q_valid = _query_rows(a0, i0, n_q, rq_eff, q_mask_ptr, stride_mqa, stride_mqi,
                                                stride_qa, stride_qi, BLOCK_Q, RQ_TILE)
        best, arg = _chunk_maxima(q_ptr, q_offset, q_in, i0, c_ptr, c_mask_ptr, b0, n_c, rc_eff, D,
                                  group_rq_ptr, group_rc_ptr, n_groups, stride_cb, stride_cj, stride_mcb,
                                  stride_mcj, M, BLOCK_C, RC_TILE, BLOCK_D, GROUPS_PAD, False,
                                  DOT_PRECISION, INTERPRET)
        takes = _row_takes(qi, q_valid, best, group_rq_ptr, n_groups, GROUPS_PAD)
        scores = _add_chunk_scores(scores, best, takes, BLOCK_Q, RQ_TILE, BLOCK_C, GROUPS_PAD)
    return scores


@triton.jit
def _pair_gradients(a0, b0, q_ptr, q_mask_ptr, n_q, rq_eff, stride_qa, stride_qi, stride_mqa, stride_mqi,
                    c_ptr, c_mask_ptr, n_c, rc_eff, stride_cb, stride_cj, stride_mcb, stride_mcj, D,
                    group_rq_ptr, group_rc_ptr, n_groups, grad_ptr, lse_ptr, labels_ptr, scale, dq_ptr, dc_ptr,
                    IS_LOSS: tl.constexpr, HAS_LABELS: tl.constexpr, WRITE_DQ: tl.constexpr,
                    WRITE_DC: tl.constexpr, DC_DIRECT: tl.constexpr, Q_CHUNKED: tl.constexpr,
                    BLOCK_Q: tl.constexpr, RQ_TILE: tl.constexpr, BLOCK_C: tl.constexpr, RC_TILE: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, GROUPS_PAD: tl.constexpr,
                    PIECE_DTYPE: tl.constexpr, SPLIT_FP32_OPERANDS: tl.constexpr,
                    SCALE_TO_FP16_RANGE: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """Chunked backward of one (query block, candidate block) pair: dq rows += W @ c and/or
    dc rows += W^T @ q, chunk by chunk.

    Per row chunk: pass 1 runs over the column chunks and carries each group's max and its
    lowest global argmax (_chunk_maxima); pass 2 runs over them again and builds each chunk's
    W (nonzero only at that chunk's argmax columns) from the carried argmax -- S is not
    recomputed, only the operand chunk is loaded for the products. The loss's dS needs the
    whole score s_g(a, b): with one row chunk it comes from pass 1, with several from a
    pre-pass over every (row chunk, column chunk) (_pair_scores).
    IS_LOSS: dS_g = grad[g, a] * scale * (softmax_g(a, b) - [b == label_a]) (no label term
    without HAS_LABELS: hard negatives); else dS_g = grad[g, a, b] (grad (G, n_q, n_c)).
    The caller must be the only writer of these dq / dc rows (barrier after each update).
    DC_DIRECT (one row chunk, one launch: each dc row gets one contribution): dc is written
    once in its own dtype (_write_product) instead of accumulated in fp32.
    """
    M: tl.constexpr = BLOCK_Q * RQ_TILE
    N: tl.constexpr = BLOCK_C * RC_TILE
    slot = tl.arange(0, GROUPS_PAD)
    a = a0 + tl.arange(0, BLOCK_Q)
    b = b0 + tl.arange(0, BLOCK_C)
    pair_in = (slot < n_groups)[:, None, None] & (a < n_q)[None, :, None] & (b < n_c)[None, None, :]
    if IS_LOSS:
        if Q_CHUNKED:
            scores = _pair_scores(a0, b0, q_ptr, q_mask_ptr, n_q, rq_eff, stride_qa, stride_qi, stride_mqa,
                                  stride_mqi, c_ptr, c_mask_ptr, n_c, rc_eff, stride_cb, stride_cj, stride_mcb,
                                  stride_mcj, D, group_rq_ptr, group_rc_ptr, n_groups, BLOCK_Q, RQ_TILE, BLOCK_C,
                                  RC_TILE, BLOCK_D, GROUPS_PAD, DOT_PRECISION, INTERPRET)
        row = slot.to(tl.int64)[:, None] * n_q + a[None, :]
        row_in = (slot < n_groups)[:, None] & (a < n_q)[None, :]
        lse = tl.load(lse_ptr + row, mask=row_in, other=0.0)
        grad = tl.load(grad_ptr + row, mask=row_in, other=0.0)
        if HAS_LABELS:
            label = tl.load(labels_ptr + a, mask=a < n_q, other=-1)
            positive = (b[None, :] == label[:, None]).to(tl.float32)
        else:
            positive = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float32)
    else:
        offset = (slot.to(tl.int64)[:, None, None] * n_q + a.to(tl.int64)[None, :, None]) * n_c + b[None, None, :]
        dS = tl.load(grad_ptr + offset, mask=pair_in, other=0.0)  # 0 outside the pair
    for i0 in range(0, rq_eff, RQ_TILE):
        qa, qi, q_offset, q_in, q_valid = _query_rows(a0, i0, n_q, rq_eff, q_mask_ptr, stride_mqa, stride_mqi,
                                                stride_qa, stride_qi, BLOCK_Q, RQ_TILE)
        best, arg = _chunk_maxima(q_ptr, q_offset, q_in, i0, c_ptr, c_mask_ptr, b0, n_c, rc_eff, D,
                                  group_rq_ptr, group_rc_ptr, n_groups, stride_cb, stride_cj, stride_mcb,
                                  stride_mcj, M, BLOCK_C, RC_TILE, BLOCK_D, GROUPS_PAD, True,
                                  DOT_PRECISION, INTERPRET)
        takes = _row_takes(qi, q_valid, best, group_rq_ptr, n_groups, GROUPS_PAD)
        if IS_LOSS:
            if not Q_CHUNKED:  # one row chunk: pass 1 saw every token of these queries
                scores = _add_chunk_scores(tl.zeros((GROUPS_PAD, BLOCK_Q, BLOCK_C), dtype=tl.float32), best,
                                           takes, BLOCK_Q, RQ_TILE, BLOCK_C, GROUPS_PAD)
            softmax = tl.exp(scores * scale - lse[:, :, None])
            dS = tl.where(pair_in, grad[:, :, None] * scale * (softmax - positive[None, :, :]), 0.0)
        # Each row's weight per group: dS of its query, where its maximum counts.
        w_rows = tl.reshape(tl.broadcast_to(dS[:, :, None, :], (GROUPS_PAD, BLOCK_Q, RQ_TILE, BLOCK_C)),
                            (GROUPS_PAD, M, BLOCK_C))
        w_rows = tl.where(takes, w_rows, 0.0)
        for j0 in range(0, rc_eff, RC_TILE):
            c_offset, c_in, bb, c_valid = _candidate_columns(b0, j0, n_c, rc_eff, c_mask_ptr, stride_mcb, stride_mcj,
                                                             stride_cb, stride_cj, BLOCK_C, RC_TILE)
            j3 = j0 + tl.arange(0, RC_TILE)[None, None, :]
            W3 = tl.zeros((M, BLOCK_C, RC_TILE), dtype=tl.float32)
            for g in range(n_groups):
                r_q = tl.load(group_rq_ptr + g)
                r_c = tl.load(group_rc_ptr + g)
                if (r_c > j0) & (r_q > i0):
                    is_g = (slot == g)[:, None, None]
                    arg_g = tl.max(tl.where(is_g, arg, -1), axis=0)
                    w_g = tl.sum(tl.where(is_g, w_rows, 0.0), axis=0)  # a masked sum keeps a NaN weight
                    W3 += tl.where(j3 == arg_g[:, :, None], w_g[:, :, None], 0.0)
            W = tl.reshape(W3, (M, N))
            hi, mid, lo, unscale = _split_weights(W, PIECE_DTYPE, SCALE_TO_FP16_RANGE)
            c_ok = _column_validity(b0, j0, n_c, rc_eff, c_mask_ptr, stride_mcb, stride_mcj, BLOCK_C, RC_TILE)
            if WRITE_DQ:
                _accumulate_product(dq_ptr, q_offset, q_valid, hi, mid, lo, unscale, c_ptr, c_offset, c_ok, D,
                                    M, BLOCK_DO, SPLIT_FP32_OPERANDS, INTERPRET)
            if WRITE_DC:  # (the query flags re-read here: held from pass 1 they spilled, fp16 64 x 64)
                q_ok = _row_validity(a0, i0, n_q, rq_eff, q_mask_ptr, stride_mqa, stride_mqi, BLOCK_Q, RQ_TILE)
                if DC_DIRECT:
                    _write_product(dc_ptr, c_offset, c_ok, c_in, tl.trans(hi), tl.trans(mid), tl.trans(lo), unscale,
                                   q_ptr, q_offset, q_ok, D, N, BLOCK_DO, SPLIT_FP32_OPERANDS, INTERPRET)
                else:
                    _accumulate_product(dc_ptr, c_offset, c_ok, tl.trans(hi), tl.trans(mid), tl.trans(lo), unscale,
                                        q_ptr, q_offset, q_ok, D, N, BLOCK_DO, SPLIT_FP32_OPERANDS, INTERPRET)
            tl.debug_barrier()  # these dq / dc stores before the next chunk's loads


# ---------------------------------------------------------------------------------------
# grouped MaxSim, forward
# ---------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=GROUP_COUNT)
def maxsim_forward_kernel(
    q_ptr, c_ptr, q_mask_ptr, c_mask_ptr, group_rq_ptr, group_rc_ptr, out_ptr,
    n_q, n_c, rq_eff, rc_eff, D, n_groups, num_q_blocks,
    stride_qa, stride_qi, stride_cb, stride_cj,
    stride_mqa, stride_mqi, stride_mcb, stride_mcj,
    BLOCK_Q: tl.constexpr, RQ_TILE: tl.constexpr, BLOCK_C: tl.constexpr, RC_TILE: tl.constexpr,
    BLOCK_D: tl.constexpr, CHUNKED: tl.constexpr, GROUPS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    """out[g, a, b] = s_g(a, b) for one (query block, candidate block) tile.

    1-D grid, query block fastest: programs running together share a candidate block, so
    each candidate block comes from HBM once and from L2 for the other query blocks.
    CHUNKED: the budget spans several row and/or column chunks (at most GROUPS_PAD groups
    per launch); otherwise one tile holds every token and GROUPS_PAD is unused.
    """
    pid = tl.program_id(0)
    a0 = (pid % num_q_blocks) * BLOCK_Q
    b0 = (pid // num_q_blocks) * BLOCK_C
    M: tl.constexpr = BLOCK_Q * RQ_TILE
    N: tl.constexpr = BLOCK_C * RC_TILE
    if CHUNKED:
        scores = _pair_scores(a0, b0, q_ptr, q_mask_ptr, n_q, rq_eff, stride_qa, stride_qi, stride_mqa, stride_mqi,
                              c_ptr, c_mask_ptr, n_c, rc_eff, stride_cb, stride_cj, stride_mcb, stride_mcj, D,
                              group_rq_ptr, group_rc_ptr, n_groups, BLOCK_Q, RQ_TILE, BLOCK_C, RC_TILE, BLOCK_D,
                              GROUPS_PAD, DOT_PRECISION, INTERPRET)
        slot = tl.arange(0, GROUPS_PAD)
        a = a0 + tl.arange(0, BLOCK_Q)
        b = b0 + tl.arange(0, BLOCK_C)
        offset = (slot.to(tl.int64)[:, None, None] * n_q + a.to(tl.int64)[None, :, None]) * n_c + b[None, None, :]
        out_in = (slot < n_groups)[:, None, None] & (a < n_q)[None, :, None] & (b < n_c)[None, None, :]
        tl.store(out_ptr + offset, scores, mask=out_in)
    else:
        qa, qi, q_offset, q_in, q_valid = _query_rows(a0, 0, n_q, rq_eff, q_mask_ptr, stride_mqa, stride_mqi,
                                                stride_qa, stride_qi, BLOCK_Q, RQ_TILE)
        c_offset, c_in, b, c_valid = _candidate_columns(b0, 0, n_c, rc_eff, c_mask_ptr, stride_mcb, stride_mcj,
                                                        stride_cb, stride_cj, BLOCK_C, RC_TILE)
        S = _similarity(q_ptr, q_offset, q_in, c_ptr, c_offset, c_in, D, M, N, BLOCK_D, DOT_PRECISION,
                        INTERPRET)
        S3 = tl.reshape(S, (M, BLOCK_C, RC_TILE))
        nan_j = _lowest_nan(S3, c_valid, RC_TILE)

        a = a0 + tl.arange(0, BLOCK_Q)
        out_offset = a.to(tl.int64)[:, None] * n_c + b[None, :]
        out_in = (a < n_q)[:, None] & (b < n_c)[None, :]
        for g in range(n_groups):
            r_q = tl.load(group_rq_ptr + g)
            r_c = tl.load(group_rc_ptr + g)
            best, in_prefix, has_valid = _group_best(S3, c_valid, r_c, nan_j, RC_TILE)
            takes = (q_valid & (qi < r_q))[:, None] & has_valid[None, :]
            scores = _group_scores(best, takes, BLOCK_Q, RQ_TILE, BLOCK_C)
            tl.store(out_ptr + tl.cast(g, tl.int64) * n_q * n_c + out_offset, scores, mask=out_in)


# ---------------------------------------------------------------------------------------
# Backward passes (shared by grouped MaxSim and the fused loss)
# ---------------------------------------------------------------------------------------
@triton.jit
def _score_gradients(S3, qi, q_valid, c_valid, nan_j, a, b, n_q, n_c, g,
                     group_rq_ptr, group_rc_ptr, grad_ptr, lse_ptr, labels_ptr, scale,
                     IS_LOSS: tl.constexpr, HAS_LABELS: tl.constexpr, BLOCK_Q: tl.constexpr,
                     RQ_TILE: tl.constexpr, BLOCK_C: tl.constexpr, RC_TILE: tl.constexpr):
    """dS_g (BLOCK_Q, BLOCK_C) for group g, with the per-group max data W needs.

    MaxSim:  dS_g(a, b) = grad[g, a, b]  (grad (G, n_q, n_c)).
    Loss:    terms[g, a] = lse_g(a) - scale * s_g(a, label_a), so
             dS_g(a, b) = grad[g, a] * scale * (softmax_g(a, b) - [b == label_a]),
             softmax_g(a, b) = exp(scale * s_g(a, b) - lse_g(a)) (lse saved by the forward);
             no label term without HAS_LABELS (hard negatives never are the positive).
    """
    r_q = tl.load(group_rq_ptr + g)
    r_c = tl.load(group_rc_ptr + g)
    best, in_prefix, has_valid = _group_best(S3, c_valid, r_c, nan_j, RC_TILE)
    takes = (q_valid & (qi < r_q))[:, None] & has_valid[None, :]
    tile_in = (a < n_q)[:, None] & (b < n_c)[None, :]
    if IS_LOSS:
        scores = _group_scores(best, takes, BLOCK_Q, RQ_TILE, BLOCK_C)
        row = tl.cast(g, tl.int64) * n_q + a
        lse = tl.load(lse_ptr + row, mask=a < n_q, other=0.0)
        grad = tl.load(grad_ptr + row, mask=a < n_q, other=0.0)
        softmax = tl.exp(scores * scale - lse[:, None])
        if HAS_LABELS:
            label = tl.load(labels_ptr + a, mask=a < n_q, other=-1)
            dS = grad[:, None] * scale * (softmax - (b[None, :] == label[:, None]).to(tl.float32))
        else:
            dS = grad[:, None] * scale * softmax
    else:
        offset = (tl.cast(g, tl.int64) * n_q + a.to(tl.int64))[:, None] * n_c + b[None, :]
        dS = tl.load(grad_ptr + offset, mask=tile_in, other=0.0)
    dS = tl.where(tile_in, dS, 0.0)
    return dS, best, in_prefix, takes


@triton.jit
def _weights_tile(S, qi, q_valid, c_valid, a, b, n_q, n_c, n_groups,
                  group_rq_ptr, group_rc_ptr, grad_ptr, lse_ptr, labels_ptr, scale,
                  IS_LOSS: tl.constexpr, HAS_LABELS: tl.constexpr, BLOCK_Q: tl.constexpr, RQ_TILE: tl.constexpr,
                  BLOCK_C: tl.constexpr, RC_TILE: tl.constexpr):
    """W (M, N): every group's dS placed at that group's argmax, summed over groups."""
    M: tl.constexpr = BLOCK_Q * RQ_TILE
    S3 = tl.reshape(S, (M, BLOCK_C, RC_TILE))
    nan_j = _lowest_nan(S3, c_valid, RC_TILE)
    W3 = tl.zeros((M, BLOCK_C, RC_TILE), dtype=tl.float32)
    for g in range(n_groups):
        dS, best, in_prefix, takes = _score_gradients(
            S3, qi, q_valid, c_valid, nan_j, a, b, n_q, n_c, g, group_rq_ptr, group_rc_ptr, grad_ptr, lse_ptr,
            labels_ptr, scale, IS_LOSS, HAS_LABELS, BLOCK_Q, RQ_TILE, BLOCK_C, RC_TILE)
        W3 = _add_argmax_weights(W3, S3, best, in_prefix, nan_j, takes, dS, BLOCK_Q, RQ_TILE, BLOCK_C, RC_TILE)
    return tl.reshape(W3, (M, BLOCK_C * RC_TILE))


@triton.jit(do_not_specialize=GROUP_COUNT)
def grad_query_kernel(
    q_ptr, c_ptr, q_mask_ptr, c_mask_ptr, group_rq_ptr, group_rc_ptr,
    grad_ptr, lse_ptr, labels_ptr, dq_ptr,
    n_q, n_c, rq_eff, rc_eff, D, n_groups, scale,
    stride_qa, stride_qi, stride_cb, stride_cj,
    stride_mqa, stride_mqi, stride_mcb, stride_mcj,
    IS_LOSS: tl.constexpr,
    BLOCK_Q: tl.constexpr, RQ_TILE: tl.constexpr, BLOCK_C: tl.constexpr, RC_TILE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, PIECE_DTYPE: tl.constexpr, SPLIT_FP32_OPERANDS: tl.constexpr,
    SCALE_TO_FP16_RANGE: tl.constexpr, CHUNKED: tl.constexpr, Q_CHUNKED: tl.constexpr, GROUPS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    """dq (fp32, layout of q) for one query block: loop over every candidate block,
    recompute S, build W, dq_block += W @ c_block. Sole writer of these rows: deterministic.
    CHUNKED: _pair_gradients per candidate block (at most GROUPS_PAD groups per launch)."""
    a0 = tl.program_id(0) * BLOCK_Q
    M: tl.constexpr = BLOCK_Q * RQ_TILE
    N: tl.constexpr = BLOCK_C * RC_TILE
    if CHUNKED:
        for b0 in range(0, n_c, BLOCK_C):
            _pair_gradients(a0, b0, q_ptr, q_mask_ptr, n_q, rq_eff, stride_qa, stride_qi, stride_mqa, stride_mqi,
                            c_ptr, c_mask_ptr, n_c, rc_eff, stride_cb, stride_cj, stride_mcb, stride_mcj, D,
                            group_rq_ptr, group_rc_ptr, n_groups, grad_ptr, lse_ptr, labels_ptr, scale, dq_ptr, dq_ptr,
                            IS_LOSS, True, True, False, False, Q_CHUNKED, BLOCK_Q, RQ_TILE, BLOCK_C, RC_TILE, BLOCK_D,
                            BLOCK_DO, GROUPS_PAD, PIECE_DTYPE, SPLIT_FP32_OPERANDS, SCALE_TO_FP16_RANGE,
                            DOT_PRECISION, INTERPRET)
    else:
        a = a0 + tl.arange(0, BLOCK_Q)
        for b0 in range(0, n_c, BLOCK_C):
            qa, qi, q_offset, q_in, q_valid = _query_rows(a0, 0, n_q, rq_eff, q_mask_ptr, stride_mqa, stride_mqi,
                                                          stride_qa, stride_qi, BLOCK_Q, RQ_TILE)
            c_offset, c_in, b, c_valid = _candidate_columns(b0, 0, n_c, rc_eff, c_mask_ptr, stride_mcb, stride_mcj,
                                                            stride_cb, stride_cj, BLOCK_C, RC_TILE)
            S = _similarity(q_ptr, q_offset, q_in, c_ptr, c_offset, c_in, D, M, N, BLOCK_D, DOT_PRECISION,
                            INTERPRET)
            W = _weights_tile(S, qi, q_valid, c_valid, a, b, n_q, n_c, n_groups, group_rq_ptr, group_rc_ptr,
                              grad_ptr, lse_ptr, labels_ptr, scale, IS_LOSS, True, BLOCK_Q, RQ_TILE, BLOCK_C,
                              RC_TILE)
            hi, mid, lo, unscale = _split_weights(W, PIECE_DTYPE, SCALE_TO_FP16_RANGE)
            c_ok = _column_validity(b0, 0, n_c, rc_eff, c_mask_ptr, stride_mcb, stride_mcj, BLOCK_C, RC_TILE)
            _accumulate_product(dq_ptr, q_offset, q_valid, hi, mid, lo, unscale, c_ptr, c_offset, c_ok, D,
                                M, BLOCK_DO, SPLIT_FP32_OPERANDS, INTERPRET)
            tl.debug_barrier()  # this iteration's dq stores before the next iteration's loads


@triton.jit(do_not_specialize=GROUP_COUNT)
def grad_candidate_kernel(
    q_ptr, c_ptr, q_mask_ptr, c_mask_ptr, group_rq_ptr, group_rc_ptr,
    grad_ptr, lse_ptr, labels_ptr, dc_ptr,
    n_q, n_c, rq_eff, rc_eff, D, n_groups, scale,
    stride_qa, stride_qi, stride_cb, stride_cj,
    stride_mqa, stride_mqi, stride_mcb, stride_mcj,
    IS_LOSS: tl.constexpr,
    BLOCK_Q: tl.constexpr, RQ_TILE: tl.constexpr, BLOCK_C: tl.constexpr, RC_TILE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, PIECE_DTYPE: tl.constexpr, SPLIT_FP32_OPERANDS: tl.constexpr,
    SCALE_TO_FP16_RANGE: tl.constexpr, CHUNKED: tl.constexpr, Q_CHUNKED: tl.constexpr, GROUPS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    """dc (fp32, layout of c) for one candidate block: loop over every query block,
    recompute S, build W, dc_block += W^T @ q_block. Sole writer of these rows.
    CHUNKED: _pair_gradients per query block (at most GROUPS_PAD groups per launch)."""
    b0 = tl.program_id(0) * BLOCK_C
    M: tl.constexpr = BLOCK_Q * RQ_TILE
    N: tl.constexpr = BLOCK_C * RC_TILE
    if CHUNKED:
        for a0 in range(0, n_q, BLOCK_Q):
            _pair_gradients(a0, b0, q_ptr, q_mask_ptr, n_q, rq_eff, stride_qa, stride_qi, stride_mqa, stride_mqi,
                            c_ptr, c_mask_ptr, n_c, rc_eff, stride_cb, stride_cj, stride_mcb, stride_mcj, D,
                            group_rq_ptr, group_rc_ptr, n_groups, grad_ptr, lse_ptr, labels_ptr, scale, dc_ptr, dc_ptr,
                            IS_LOSS, True, False, True, False, Q_CHUNKED, BLOCK_Q, RQ_TILE, BLOCK_C, RC_TILE,
                            BLOCK_D, BLOCK_DO, GROUPS_PAD, PIECE_DTYPE, SPLIT_FP32_OPERANDS, SCALE_TO_FP16_RANGE,
                            DOT_PRECISION, INTERPRET)
    else:
        c_offset, c_in, b, c_valid = _candidate_columns(b0, 0, n_c, rc_eff, c_mask_ptr, stride_mcb, stride_mcj,
                                                        stride_cb, stride_cj, BLOCK_C, RC_TILE)
        for a0 in range(0, n_q, BLOCK_Q):
            qa, qi, q_offset, q_in, q_valid = _query_rows(a0, 0, n_q, rq_eff, q_mask_ptr, stride_mqa, stride_mqi,
                                                    stride_qa, stride_qi, BLOCK_Q, RQ_TILE)
            a = a0 + tl.arange(0, BLOCK_Q)
            S = _similarity(q_ptr, q_offset, q_in, c_ptr, c_offset, c_in, D, M, N, BLOCK_D, DOT_PRECISION,
                            INTERPRET)
            W = _weights_tile(S, qi, q_valid, c_valid, a, b, n_q, n_c, n_groups, group_rq_ptr, group_rc_ptr,
                              grad_ptr, lse_ptr, labels_ptr, scale, IS_LOSS, True, BLOCK_Q, RQ_TILE, BLOCK_C,
                              RC_TILE)
            hi, mid, lo, unscale = _split_weights(W, PIECE_DTYPE, SCALE_TO_FP16_RANGE)
            c_ok = _column_validity(b0, 0, n_c, rc_eff, c_mask_ptr, stride_mcb, stride_mcj, BLOCK_C, RC_TILE)
            _accumulate_product(dc_ptr, c_offset, c_ok, tl.trans(hi), tl.trans(mid), tl.trans(lo), unscale,
                                q_ptr, q_offset, q_valid, D, N, BLOCK_DO, SPLIT_FP32_OPERANDS, INTERPRET)
            tl.debug_barrier()


# ---------------------------------------------------------------------------------------
# Fused Matryoshka InfoNCE
# ---------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=GROUP_COUNT)
def infonce_forward_kernel(
    q_ptr, c_ptr, q_mask_ptr, c_mask_ptr, group_rq_ptr, group_rc_ptr, labels_ptr,
    lse_ptr, pos_ptr,
    n_q, n_c, rq_eff, rc_eff, D, n_groups, scale,
    stride_qa, stride_qi, stride_cb, stride_cj,
    stride_mqa, stride_mqi, stride_mcb, stride_mcj,
    BLOCK_Q: tl.constexpr, RQ_TILE: tl.constexpr, BLOCK_C: tl.constexpr, RC_TILE: tl.constexpr,
    BLOCK_D: tl.constexpr, GROUPS_PAD: tl.constexpr, CHUNKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    """In-batch part of the loss for one query block: lse[g, a] = logsumexp_b scale * s_g(a, b)
    and pos[g, a] = scale * s_g(a, labels[a]), streaming every candidate block once.
    CHUNKED: each block's scores come from _pair_scores, all groups updated at once."""
    a0 = tl.program_id(0) * BLOCK_Q
    M: tl.constexpr = BLOCK_Q * RQ_TILE
    N: tl.constexpr = BLOCK_C * RC_TILE
    a = a0 + tl.arange(0, BLOCK_Q)
    label = tl.load(labels_ptr + a, mask=a < n_q, other=-1)
    m = tl.full((GROUPS_PAD, BLOCK_Q), float("-inf"), dtype=tl.float32)
    l = tl.zeros((GROUPS_PAD, BLOCK_Q), dtype=tl.float32)
    pos = tl.zeros((GROUPS_PAD, BLOCK_Q), dtype=tl.float32)
    if CHUNKED:
        for b0 in range(0, n_c, BLOCK_C):
            scores = _pair_scores(a0, b0, q_ptr, q_mask_ptr, n_q, rq_eff, stride_qa, stride_qi, stride_mqa,
                                  stride_mqi, c_ptr, c_mask_ptr, n_c, rc_eff, stride_cb, stride_cj, stride_mcb,
                                  stride_mcj, D, group_rq_ptr, group_rc_ptr, n_groups, BLOCK_Q, RQ_TILE, BLOCK_C,
                                  RC_TILE, BLOCK_D, GROUPS_PAD, DOT_PRECISION, INTERPRET)
            b = b0 + tl.arange(0, BLOCK_C)
            logits = tl.where((b < n_c)[None, None, :], scores * scale, float("-inf"))
            m, l, pos = _online_lse_update_groups(m, l, pos, logits, b[None, :] == label[:, None])
    else:
        qa, qi, q_offset, q_in, q_valid = _query_rows(a0, 0, n_q, rq_eff, q_mask_ptr, stride_mqa, stride_mqi,
                                                stride_qa, stride_qi, BLOCK_Q, RQ_TILE)
        for b0 in range(0, n_c, BLOCK_C):
            c_offset, c_in, b, c_valid = _candidate_columns(b0, 0, n_c, rc_eff, c_mask_ptr, stride_mcb, stride_mcj,
                                                            stride_cb, stride_cj, BLOCK_C, RC_TILE)
            S = _similarity(q_ptr, q_offset, q_in, c_ptr, c_offset, c_in, D, M, N, BLOCK_D, DOT_PRECISION,
                            INTERPRET)
            S3 = tl.reshape(S, (M, BLOCK_C, RC_TILE))
            nan_j = _lowest_nan(S3, c_valid, RC_TILE)
            is_positive = b[None, :] == label[:, None]
            for g in range(n_groups):
                r_q = tl.load(group_rq_ptr + g)
                r_c = tl.load(group_rc_ptr + g)
                best, in_prefix, has_valid = _group_best(S3, c_valid, r_c, nan_j, RC_TILE)
                takes = (q_valid & (qi < r_q))[:, None] & has_valid[None, :]
                logits = _group_scores(best, takes, BLOCK_Q, RQ_TILE, BLOCK_C) * scale
                logits = tl.where((b < n_c)[None, :], logits, float("-inf"))
                m, l, pos = _online_lse_update(m, l, pos, logits, is_positive, g, GROUPS_PAD)
    rows = tl.arange(0, GROUPS_PAD)
    offset = rows.to(tl.int64)[:, None] * n_q + a[None, :]
    out_in = (rows < n_groups)[:, None] & (a < n_q)[None, :]
    # l >= 1 (or NaN) for real rows (the maximum's own term is 1); padded group rows hold l = 0.
    tl.store(lse_ptr + offset, m + tl.log(tl.where(out_in, l, 1.0)), mask=out_in)
    tl.store(pos_ptr + offset, pos, mask=out_in)


@triton.jit(do_not_specialize=["n_groups", "n_k"])
def infonce_hard_negatives_forward_kernel(
    q_ptr, x_ptr, q_mask_ptr, x_mask_ptr, group_rq_ptr, group_rc_ptr, lse_ptr,
    n_q, n_k, rq_eff, rc_eff, D, n_groups, scale,
    stride_qa, stride_qi, stride_xa, stride_xk, stride_xj,
    stride_mqa, stride_mqi, stride_mxa, stride_mxk, stride_mxj,
    RQ_TILE: tl.constexpr, BLOCK_K: tl.constexpr, RC_TILE: tl.constexpr,
    BLOCK_D: tl.constexpr, GROUPS_PAD: tl.constexpr, CHUNKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Fold query a's own K hard negatives x[a] into lse[:, a] (one program per query):
    the in-batch lse is the starting state (m = lse, l = 1) of the same online update."""
    a0 = tl.program_id(0)
    M: tl.constexpr = RQ_TILE
    N: tl.constexpr = BLOCK_K * RC_TILE
    x_base = x_ptr + tl.cast(a0, tl.int64) * stride_xa
    x_mask_base = x_mask_ptr + tl.cast(a0, tl.int64) * stride_mxa
    rows = tl.arange(0, GROUPS_PAD)
    offset = rows.to(tl.int64)[:, None] * n_q + a0
    state_in = (rows < n_groups)[:, None]
    m = tl.load(lse_ptr + offset, mask=state_in, other=float("-inf"))  # (GROUPS_PAD, 1)
    l = tl.where(state_in, 1.0, 0.0)
    pos = tl.zeros((GROUPS_PAD, 1), dtype=tl.float32)
    no_positive = tl.zeros((1, BLOCK_K), dtype=tl.int1)
    if CHUNKED:
        for k0 in range(0, n_k, BLOCK_K):
            scores = _pair_scores(a0, k0, q_ptr, q_mask_ptr, n_q, rq_eff, stride_qa, stride_qi, stride_mqa,
                                  stride_mqi, x_base, x_mask_base, n_k, rc_eff, stride_xk, stride_xj, stride_mxk,
                                  stride_mxj, D, group_rq_ptr, group_rc_ptr, n_groups, 1, RQ_TILE, BLOCK_K,
                                  RC_TILE, BLOCK_D, GROUPS_PAD, DOT_PRECISION, INTERPRET)
            k = k0 + tl.arange(0, BLOCK_K)
            logits = tl.where((k < n_k)[None, None, :], scores * scale, float("-inf"))
            m, l, pos = _online_lse_update_groups(m, l, pos, logits, no_positive)
    else:
        qa, qi, q_offset, q_in, q_valid = _query_rows(a0, 0, n_q, rq_eff, q_mask_ptr, stride_mqa, stride_mqi,
                                                stride_qa, stride_qi, 1, RQ_TILE)
        for k0 in range(0, n_k, BLOCK_K):
            x_offset, x_in, k, x_valid = _candidate_columns(k0, 0, n_k, rc_eff, x_mask_base, stride_mxk,
                                                            stride_mxj, stride_xk, stride_xj, BLOCK_K, RC_TILE)
            S = _similarity(q_ptr, q_offset, q_in, x_base, x_offset, x_in, D, M, N, BLOCK_D, DOT_PRECISION,
                            INTERPRET)
            S3 = tl.reshape(S, (M, BLOCK_K, RC_TILE))
            nan_j = _lowest_nan(S3, x_valid, RC_TILE)
            for g in range(n_groups):
                r_q = tl.load(group_rq_ptr + g)
                r_c = tl.load(group_rc_ptr + g)
                best, in_prefix, has_valid = _group_best(S3, x_valid, r_c, nan_j, RC_TILE)
                takes = (q_valid & (qi < r_q))[:, None] & has_valid[None, :]
                logits = _group_scores(best, takes, 1, RQ_TILE, BLOCK_K) * scale
                logits = tl.where((k < n_k)[None, :], logits, float("-inf"))
                m, l, pos = _online_lse_update(m, l, pos, logits, no_positive, g, GROUPS_PAD)
    tl.store(lse_ptr + offset, m + tl.log(tl.where(state_in, l, 1.0)), mask=state_in)


# ---------------------------------------------------------------------------------------
# Per-query candidates: paired MaxSim forward, and the backward it shares with the loss's
# hard negatives (see "Per-query candidates" in the module docstring)
# ---------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["n_groups", "n_k", "num_k_blocks"])
def maxsim_paired_forward_kernel(
    q_ptr, x_ptr, q_mask_ptr, x_mask_ptr, group_rq_ptr, group_rc_ptr, out_ptr,
    n_q, n_k, rq_eff, rc_eff, D, n_groups, num_k_blocks,
    stride_qa, stride_qi, stride_xa, stride_xk, stride_xj,
    stride_mqa, stride_mqi, stride_mxa, stride_mxk, stride_mxj,
    RQ_TILE: tl.constexpr, BLOCK_K: tl.constexpr, RC_TILE: tl.constexpr,
    BLOCK_D: tl.constexpr, CHUNKED: tl.constexpr, GROUPS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    """out[g, a, k] = s_g(q[a], x[a, k]) for query a and its candidate block k0 + [0, BLOCK_K):
    1-D grid of n_q * num_k_blocks programs, a query's blocks adjacent (its q rows stay in
    L2). The in-batch forward with BLOCK_Q = 1 and a per-query candidate base; CHUNKED: the
    token-chunk path (_pair_scores), at most GROUPS_PAD groups per launch."""
    pid = tl.program_id(0)
    a0 = pid // num_k_blocks
    k0 = (pid % num_k_blocks) * BLOCK_K
    M: tl.constexpr = RQ_TILE
    N: tl.constexpr = BLOCK_K * RC_TILE
    x_base = x_ptr + tl.cast(a0, tl.int64) * stride_xa
    x_mask_base = x_mask_ptr + tl.cast(a0, tl.int64) * stride_mxa
    if CHUNKED:
        scores = _pair_scores(a0, k0, q_ptr, q_mask_ptr, n_q, rq_eff, stride_qa, stride_qi, stride_mqa, stride_mqi,
                              x_base, x_mask_base, n_k, rc_eff, stride_xk, stride_xj, stride_mxk, stride_mxj, D,
                              group_rq_ptr, group_rc_ptr, n_groups, 1, RQ_TILE, BLOCK_K, RC_TILE, BLOCK_D,
                              GROUPS_PAD, DOT_PRECISION, INTERPRET)  # (GROUPS_PAD, 1, BLOCK_K)
        slot = tl.arange(0, GROUPS_PAD)
        k = k0 + tl.arange(0, BLOCK_K)
        offset = (slot.to(tl.int64)[:, None, None] * n_q + a0) * n_k + k[None, None, :]
        out_in = (slot < n_groups)[:, None, None] & (k < n_k)[None, None, :]
        tl.store(out_ptr + offset, scores, mask=out_in)
    else:
        qa, qi, q_offset, q_in, q_valid = _query_rows(a0, 0, n_q, rq_eff, q_mask_ptr, stride_mqa, stride_mqi,
                                                stride_qa, stride_qi, 1, RQ_TILE)
        x_offset, x_in, k, x_valid = _candidate_columns(k0, 0, n_k, rc_eff, x_mask_base, stride_mxk, stride_mxj,
                                                        stride_xk, stride_xj, BLOCK_K, RC_TILE)
        S = _similarity(q_ptr, q_offset, q_in, x_base, x_offset, x_in, D, M, N, BLOCK_D, DOT_PRECISION,
                        INTERPRET)
        S3 = tl.reshape(S, (M, BLOCK_K, RC_TILE))
        nan_j = _lowest_nan(S3, x_valid, RC_TILE)
        out_offset = (tl.cast(a0, tl.int64) * n_k + k)[None, :]  # (1, BLOCK_K)
        out_in = (k < n_k)[None, :]
        for g in range(n_groups):
            r_q = tl.load(group_rq_ptr + g)
            r_c = tl.load(group_rc_ptr + g)
            best, in_prefix, has_valid = _group_best(S3, x_valid, r_c, nan_j, RC_TILE)
            takes = (q_valid & (qi < r_q))[:, None] & has_valid[None, :]
            scores = _group_scores(best, takes, 1, RQ_TILE, BLOCK_K)
            tl.store(out_ptr + tl.cast(g, tl.int64) * n_q * n_k + out_offset, scores, mask=out_in)


@triton.jit
def _own_block_gradient(a0, k0, q_ptr, q_mask_ptr, n_q, rq_eff, stride_qa, stride_qi, stride_mqa, stride_mqi,
                        x_base, x_mask_base, n_k, rc_eff, stride_xk, stride_xj, stride_mxk, stride_mxj, D,
                        group_rq_ptr, group_rc_ptr, n_groups, grad_ptr, lse_ptr, scale, out_ptr,
                        IS_LOSS: tl.constexpr, OUTPUT: tl.constexpr, DIRECT: tl.constexpr,
                        RQ_TILE: tl.constexpr, BLOCK_K: tl.constexpr,
                        RC_TILE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
                        PIECE_DTYPE: tl.constexpr, SPLIT_FP32_OPERANDS: tl.constexpr,
                        SCALE_TO_FP16_RANGE: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """Query a0 against its candidates k0 + [0, BLOCK_K) in one tile: S, W, then
    dq[a0] += W @ x (OUTPUT "dq", out = dq) or dx[a0, k] += W^T @ q[a0] (OUTPUT "dx", out = the
    query's dx base; DIRECT: = instead of +=, in dx's dtype)."""
    M: tl.constexpr = RQ_TILE
    N: tl.constexpr = BLOCK_K * RC_TILE
    qa, qi, q_offset, q_in, q_valid = _query_rows(a0, 0, n_q, rq_eff, q_mask_ptr, stride_mqa, stride_mqi,
                                            stride_qa, stride_qi, 1, RQ_TILE)
    x_offset, x_in, k, x_valid = _candidate_columns(k0, 0, n_k, rc_eff, x_mask_base, stride_mxk, stride_mxj,
                                                    stride_xk, stride_xj, BLOCK_K, RC_TILE)
    S = _similarity(q_ptr, q_offset, q_in, x_base, x_offset, x_in, D, M, N, BLOCK_D, DOT_PRECISION, INTERPRET)
    W = _weights_tile(S, qi, q_valid, x_valid, a0 + tl.arange(0, 1), k, n_q, n_k, n_groups, group_rq_ptr,
                      group_rc_ptr, grad_ptr, lse_ptr, lse_ptr, scale, IS_LOSS, False, 1, RQ_TILE, BLOCK_K, RC_TILE)
    hi, mid, lo, unscale = _split_weights(W, PIECE_DTYPE, SCALE_TO_FP16_RANGE)
    x_ok = _column_validity(k0, 0, n_k, rc_eff, x_mask_base, stride_mxk, stride_mxj, BLOCK_K, RC_TILE)
    if OUTPUT == "dq":
        _accumulate_product(out_ptr, q_offset, q_valid, hi, mid, lo, unscale, x_base, x_offset, x_ok, D,
                            M, BLOCK_DO, SPLIT_FP32_OPERANDS, INTERPRET)
    elif DIRECT:
        _write_product(out_ptr, x_offset, x_ok, x_in, tl.trans(hi), tl.trans(mid), tl.trans(lo), unscale,
                       q_ptr, q_offset, q_valid, D, N, BLOCK_DO, SPLIT_FP32_OPERANDS, INTERPRET)
    else:
        _accumulate_product(out_ptr, x_offset, x_ok, tl.trans(hi), tl.trans(mid), tl.trans(lo), unscale,
                            q_ptr, q_offset, q_valid, D, N, BLOCK_DO, SPLIT_FP32_OPERANDS, INTERPRET)


@triton.jit(do_not_specialize=["n_groups", "n_k", "num_k_blocks"])
def own_candidates_backward_kernel(
    q_ptr, x_ptr, q_mask_ptr, x_mask_ptr, group_rq_ptr, group_rc_ptr,
    grad_ptr, lse_ptr, out_ptr,
    n_q, n_k, num_k_blocks, rq_eff, rc_eff, D, n_groups, scale,
    stride_qa, stride_qi, stride_xa, stride_xk, stride_xj,
    stride_mqa, stride_mqi, stride_mxa, stride_mxk, stride_mxj,
    IS_LOSS: tl.constexpr, OUTPUT: tl.constexpr, DIRECT: tl.constexpr,
    RQ_TILE: tl.constexpr, BLOCK_K: tl.constexpr, RC_TILE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, PIECE_DTYPE: tl.constexpr, SPLIT_FP32_OPERANDS: tl.constexpr,
    SCALE_TO_FP16_RANGE: tl.constexpr, CHUNKED: tl.constexpr, Q_CHUNKED: tl.constexpr, GROUPS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Gradients of each query against its own candidates x[a] (K or N of them), W built from
    dS per group:

        IS_LOSS (the loss's hard negatives): dS_g(a, k) = grad[g, a] * scale * softmax_g(a, k),
            softmax from the saved lse (grad, lse (G, n_q)); hard negatives are never the positive;
        else (paired MaxSim): dS_g(a, k) = grad[g, a, k] (grad (G, n_q, n_k)).

    Two passes, like the in-batch backward, each compiled with only its own product (OUTPUT):
      "dq": one program per query walks all its candidate blocks, dq[a] += W @ x[a, k]
            (out = dq, fp32, q's layout): the only writer of dq[a]. The loss runs it after
            grad_query_kernel (stream order): both add into the same dq rows.
      "dx": one program per (query, candidate block), dx[a, k] += W^T @ q[a] (out = dx, x's
            layout): the only writer of those rows, and every block in parallel. DIRECT (one
            row chunk, one launch: each dx row gets exactly one contribution): out is the
            gradient itself, written once in x's dtype -- no fp32 accumulator to zero, read
            back and convert, which would be ~4/5 of the pass's memory traffic -- else an fp32
            accumulator.
    Deterministic, no atomics. Recomputing S in both passes costs one similarity tile per pair
    (S is 1/7 of the bf16 backward's MMA work); computing both products in one program spilled.
    """
    pid = tl.program_id(0)
    if OUTPUT == "dq":
        a0 = pid
        k_first = 0
        k_last = n_k
    else:
        a0 = pid // num_k_blocks
        k_first = (pid % num_k_blocks) * BLOCK_K
        k_last = k_first + 1  # this block only
    x_base = x_ptr + tl.cast(a0, tl.int64) * stride_xa
    x_mask_base = x_mask_ptr + tl.cast(a0, tl.int64) * stride_mxa
    if OUTPUT == "dq":
        out_base = out_ptr
    else:
        out_base = out_ptr + tl.cast(a0, tl.int64) * stride_xa
    for k0 in range(k_first, k_last, BLOCK_K):
        if CHUNKED:
            _pair_gradients(a0, k0, q_ptr, q_mask_ptr, n_q, rq_eff, stride_qa, stride_qi, stride_mqa, stride_mqi,
                            x_base, x_mask_base, n_k, rc_eff, stride_xk, stride_xj, stride_mxk, stride_mxj, D,
                            group_rq_ptr, group_rc_ptr, n_groups, grad_ptr, lse_ptr, lse_ptr, scale, out_base,
                            out_base, IS_LOSS, False, OUTPUT == "dq", OUTPUT == "dx", DIRECT, Q_CHUNKED, 1, RQ_TILE,
                            BLOCK_K, RC_TILE, BLOCK_D, BLOCK_DO, GROUPS_PAD, PIECE_DTYPE, SPLIT_FP32_OPERANDS,
                            SCALE_TO_FP16_RANGE, DOT_PRECISION, INTERPRET)
        else:
            _own_block_gradient(a0, k0, q_ptr, q_mask_ptr, n_q, rq_eff, stride_qa, stride_qi, stride_mqa, stride_mqi,
                                x_base, x_mask_base, n_k, rc_eff, stride_xk, stride_xj, stride_mxk, stride_mxj, D,
                                group_rq_ptr, group_rc_ptr, n_groups, grad_ptr, lse_ptr, scale, out_base, IS_LOSS,
                                OUTPUT, DIRECT, RQ_TILE, BLOCK_K, RC_TILE, BLOCK_D, BLOCK_DO, PIECE_DTYPE,
                                SPLIT_FP32_OPERANDS, SCALE_TO_FP16_RANGE, DOT_PRECISION, INTERPRET)
            tl.debug_barrier()  # this block's stores before the next block's loads of the same rows
