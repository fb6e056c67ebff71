// The index scan: grouped MaxSim scoring fused with top-k selection, over prefix slabs.
//
// Included by the index ISA translation units (index_isa_*.cpp) after their target pragmas;
// everything has internal linkage, as in engine.h.
//
// Scoring reuses the engine (engine.h): queries are packed into its NR-lane panels, the
// policy's register micro-kernel produces the similarity tile, and running maxima are
// snapshotted at every distinct r_c, so every group comes out of one pass. What is new:
//
// * Rows come from prefix slabs: token j of row b is read from slab tok_slab[j] (storage.py),
//   so a budget reads only its first r_c vectors of each candidate.
// * Multi-candidate register tiles: when r_c < MR, one tile holds floor(MR / r_c) candidates
//   (r_c rows each), so small budgets (r_c = 1: a plain GEMM) keep the micro-kernel's full
//   MR x NR accumulator block busy instead of running 1-row tiles. A tail tile repeats its last
//   real row: a row's arithmetic never depends on its neighbours, so scores are bitwise the
//   same whatever the tiling, the thread split or the segment boundaries.
// * Few query tokens (<= kDotTokens: one query at a small budget) take dot products along D
//   (Ops::dots, vectorised per ISA), reading each candidate row once: a memory-bound GEMV.
// * Fused top-k: per thread, per (group, query), the best k so far (TopK, index_order.h). The
//   scores of a finished candidate are compared, a vector of queries at a time, with the
//   bars thr (the k-th score once k are held, -inf before); only scores that reach the bar
//   are offered, so the working set is O(G Nq k + one tile).
//
// int8 filter (kIndexInt8). An int8 index scores the dequantised vectors v = x * s exactly,
// but scans with integer dot products first. Query token t (float32) is quantised per token,
//   y_t = round(q_t / sq_t),  sq_t = max|q_t| / 127,  residual e_t = q_t - sq_t y_t,
// and the approximate similarity is A_tj = sq_t * s_j * <y_t, x_j> (an exact integer dot:
// VNNI vpdpbusd, AVX2 vpmaddubsw or scalar, then two float multiplies). By Cauchy-Schwarz
//   |<q_t, v_j> - A_tj| = |<e_t, v_j>| <= ||e_t||_2 ||v_j||_2,
// and a max over j moves by at most the largest such term, so a candidate's approximate
// score A is within  Bound = N_max * sum_t err_t  of its exact score S, where N_max is the
// largest stored norm ||v_j||_2 (rounded up) among its first r_c vectors and err_t =
// ||e_t||_2 plus an allowance for the float rounding of both computations (index_ops.cpp).
// A candidate is rescored exactly (exact_scores: float32 dots with the dequantised values
// x_jd * s_j) only when A + Bound >= thr; below, it cannot enter the top k. Every returned
// score is exact; the integer scan only decides who is rescored.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#include "engine.h"
#include "index_kernels.h"
#include "index_order.h"

namespace metaembed {
namespace cpu {
namespace {

// ---- slab addressing -------------------------------------------------------------------

template <class Tc>
inline const Tc* token_row(const IndexProblem& IP, const IndexSegment& seg, int64_t b, int64_t j) {
  return static_cast<const Tc*>(seg.data[IP.tok_slab[j]]) + (b * IP.tok_width[j] + IP.tok_off[j]) * IP.p.d;
}

inline int64_t token_slot(const IndexProblem& IP, int64_t b, int64_t j) {
  return b * IP.tok_width[j] + IP.tok_off[j];
}

inline bool token_valid(const IndexProblem& IP, const IndexSegment& seg, int64_t b, int64_t j) {
  return !IP.masked || seg.masks[IP.tok_slab[j]][token_slot(IP, b, j)] != 0;
}

// int8: (scale, norm) of token j of row b.
inline const float* token_scale(const IndexProblem& IP, const IndexSegment& seg, int64_t b, int64_t j) {
  return seg.scales[IP.tok_slab[j]] + 2 * token_slot(IP, b, j);
}

// A candidate: segment and local row.
struct Cand {
  const IndexSegment* seg;
  int64_t b;
};

// fn(seg, b0, b1) for every segment's local rows [b0, b1) within global rows [r0, r1).
template <class Fn>
inline void for_segment_rows(const IndexProblem& IP, int64_t r0, int64_t r1, Fn&& fn) {
  for (int64_t s = 0; s < IP.num_segs; ++s) {
    const IndexSegment& seg = IP.segs[s];
    const int64_t b0 = std::max<int64_t>(r0 - seg.row0, 0), b1 = std::min<int64_t>(r1 - seg.row0, seg.n);
    if (b0 < b1) fn(seg, b0, b1);
  }
}

// The candidates of a segment's rows [b0, b1) that may be returned, in groups of up to m (<= 64),
// handed to fn(const Cand* cands, int count).
template <class Fn>
inline void for_segment_candidate_groups(const IndexSegment& seg, int64_t b0, int64_t b1, int m, Fn&& fn) {
  Cand buf[64];
  int count = 0;
  for (int64_t b = b0; b < b1; ++b) {
    if (seg.allowed && !seg.allowed[b]) continue;
    buf[count++] = Cand{&seg, b};
    if (count == m) {
      fn(buf, count);
      count = 0;
    }
  }
  if (count) fn(buf, count);
}

// Candidates of global rows [r0, r1) that may be returned, in groups of up to m (<= 64) of one
// segment, handed to fn(const Cand* cands, int count).
template <class Fn>
inline void for_candidate_groups(const IndexProblem& IP, int64_t r0, int64_t r1, int m, Fn&& fn) {
  for_segment_rows(IP, r0, r1, [&](const IndexSegment& seg, int64_t b0, int64_t b1) {
    for_segment_candidate_groups(seg, b0, b1, m, fn);
  });
}

// A group of up to 16 candidates of one segment: the rows in `cands`, or, when `cands` is
// nullptr, the `count` consecutive rows from b0 (a segment with nothing removed or filtered:
// no per-row list to build or read).
struct RowGroup {
  const IndexSegment* seg;
  int64_t b0;
  const Cand* cands;
  int count;
  // row of lane c; lanes past count repeat the last row
  int64_t row(int c) const {
    c = c < count ? c : count - 1;
    return cands ? cands[c].b : b0 + c;
  }
  bool consecutive16() const { return count == 16 && (!cands || cands[15].b == b0 + 15); }
  Cand cand(int c) const { return Cand{seg, row(c)}; }
};

// for_candidate_groups as RowGroups, fn(const RowGroup&): runs of consecutive rows where a
// segment has no filter (the single-group few-token scans: building the list cost 5-10% of a
// (1, 1) scan on a Zen 3).
template <class Fn>
inline void for_row_groups(const IndexProblem& IP, int64_t r0, int64_t r1, int m, Fn&& fn) {
  for_segment_rows(IP, r0, r1, [&](const IndexSegment& seg, int64_t b0, int64_t b1) {
    if (seg.allowed) {
      for_segment_candidate_groups(seg, b0, b1, m,
                                   [&](const Cand* cands, int count) { fn(RowGroup{&seg, cands[0].b, cands, count}); });
      return;
    }
    for (int64_t b = b0; b < b1; b += m) fn(RowGroup{&seg, b, nullptr, int(std::min<int64_t>(m, b1 - b))});
  });
}

// Global row -> candidate (binary search over the segments); false for a row out of range.
inline bool candidate_of_row(const IndexProblem& IP, int64_t row, Cand& out) {
  if (row < 0 || row >= IP.total_rows) return false;
  int64_t lo = 0, hi = IP.num_segs - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (IP.segs[mid].row0 <= row) lo = mid;
    else hi = mid - 1;
  }
  out = Cand{&IP.segs[lo], row - IP.segs[lo].row0};
  return true;
}

// Candidates per register tile: floor(MR / r_c) when r_c < MR, else 1 (tiles along j).
inline int tile_candidates(int64_t rc, int mr) { return rc >= mr ? 1 : int(mr / rc); }

// ---- folding tiles into group scores, for one query block --------------------------------
//
// Tiles are [panels][MR][NR] (micro-kernel) or one panel whose first L lanes hold the tokens
// (few-token dots). Query token t = al * rq_eff + i of the block is lane t.
template <int NR, int MR>
struct BlockFold {
  const IndexProblem& IP;
  int64_t a0, n, panels, lanes;
  int L;                  // lanes used per panel: NR, or the token count of the dots
  int64_t fold_lanes;     // lanes folded per row
  const uint8_t* qvalid;  // [n * rq_eff] 0/1, or nullptr (every token valid)
  float* runmax;          // [lanes]
  float* bmax;            // [num_bounds][lanes]
  uint8_t* bvalid;        // [num_bounds]
  float* scores;          // [G][n]
  bool any_valid = false;
  int64_t kb = 0;
  int panel_rows = MR;    // tile rows per panel (16: the AMX tiles of ExactScan::scan)

  // Fold straight into the only snapshot when there is one bound (no copy).
  float* run() const { return IP.p.groups.num_bounds == 1 ? bmax : runmax; }

  void begin() {
    float* m = run();
    for (int64_t t = 0; t < fold_lanes; ++t) m[t] = -INFINITY;
    any_valid = false;
    kb = 0;
  }

  // Rows [r0, r0 + count) of `tile` are tokens j0 .. j0 + count - 1 of candidate c.
  void fold(const Cand& c, const float* tile, int r0, int count, int64_t j0) {
    uint32_t valid, snap;
    int64_t bound_at[32];  // count <= 32: one tile's rows
    row_bits(c, j0, count, valid, snap, bound_at);
    float* m = run();
    for (int r = 0; r < count; ++r) {
      if (valid >> r & 1u) {
        if (L == NR) {
          for (int64_t p = 0; p < panels; ++p) {
            const float* row = tile + (p * panel_rows + r0 + r) * NR;
            float* mp = m + p * NR;
            for (int l = 0; l < NR; ++l) mp[l] = row[l] > mp[l] ? row[l] : mp[l];
          }
        } else {
          const float* row = tile + (r0 + r) * NR;
          for (int l = 0; l < L; ++l) m[l] = row[l] > m[l] ? row[l] : m[l];
        }
      }
      if ((snap >> r & 1u) && m != bmax) std::memcpy(bmax + bound_at[r] * lanes, m, sizeof(float) * fold_lanes);
    }
  }

  // The bookkeeping of rows j0 .. j0 + count - 1 (count <= 32) of candidate c, for fold() and
  // for callers that fold rows from registers (ExactScan::fold_tile_rows, Int8Scan::fold_int_rows):
  // bit r of `valid` where token j0 + r is valid, bit r of `snap` where row r closes bound
  // bound_at[r] (whose snapshot the caller takes after folding row r); any_valid, bvalid[bound]
  // (whether a row up to the bound was valid) and kb advance.
  void row_bits(const Cand& c, int64_t j0, int count, uint32_t& valid, uint32_t& snap, int64_t* bound_at) {
    const Groups& G = IP.p.groups;
    valid = snap = 0;
    for (int r = 0; r < count; ++r) {
      const int64_t j = j0 + r;
      if (token_valid(IP, *c.seg, c.b, j)) {
        valid |= uint32_t(1) << r;
        any_valid = true;
      }
      if (j + 1 == G.bounds[kb]) {
        snap |= uint32_t(1) << r;
        bound_at[r] = kb;
        bvalid[kb] = any_valid;
        ++kb;
      }
    }
  }

  // scores[g * n + al] = s_g(a0 + al, candidate): query tokens summed in order; a token facing
  // no valid candidate vector in the prefix (bvalid 0) contributes 0, as a masked token does.
  void finish() {
    const Problem& P = IP.p;
    const int64_t G = P.groups.num_groups, rq = P.groups.rq_eff;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k = P.groups.bound_index[g], grq = P.groups.rq[g];
      float* out = scores + g * n;
      if (!bvalid[k]) {
        for (int64_t al = 0; al < n; ++al) out[al] = 0;
        continue;
      }
      const float* m = bmax + k * lanes;
      if (rq == 1) {
        if (qvalid)
          for (int64_t al = 0; al < n; ++al) out[al] = qvalid[al] ? m[al] : 0.f;
        else
          for (int64_t al = 0; al < n; ++al) out[al] = m[al];
      } else {
        for (int64_t al = 0; al < n; ++al) {
          float sum = 0;
          for (int64_t i = 0; i < grq; ++i)
            if (!qvalid || qvalid[al * rq + i]) sum += m[al * rq + i];
          out[al] = sum;
        }
      }
    }
  }
};

#if defined(METAEMBED_INDEX_ZMM)
// The lanes of `live` whose query token t0 + l is valid (qvalid[t0 + l] != 0; all of `live`
// when qvalid is nullptr, i.e. q has no mask).
inline __mmask16 valid_tokens16(const uint8_t* qvalid, int64_t t0, __mmask16 live) {
  if (!qvalid) return live;
  const __m128i q8 = _mm_maskz_loadu_epi8(live, qvalid + t0);
  return _mm_mask_test_epi8_mask(live, q8, q8);
}

// v with the lanes of masked query tokens zeroed (a masked token adds 0 to its query's sum),
// those outside `live` too; v as it is when q has no mask.
inline __m512 zero_masked_tokens16(__m512 v, const uint8_t* qvalid, int64_t t0, __mmask16 live) {
  return qvalid ? _mm512_maskz_mov_ps(valid_tokens16(qvalid, t0, live), v) : v;
}

// Token i of 16 consecutive queries whose rq (2 or 4) tokens fill lanes q * rq + i of the rq
// chunks v[0..rq): lane q of the result is lane q * rq + i of the concatenated chunks.
inline __m512 query_token16(const __m512* v, int rq, int i) {
  if (rq == 2) {  // lanes 2q + i of v0 | v1
    const __m512i idx = _mm512_add_epi32(_mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
                                         _mm512_set1_epi32(i));
    return _mm512_permutex2var_ps(v[0], idx, v[1]);
  }
  // rq == 4: queries 0..7 from v0 | v1 and 8..15 from v2 | v3 (lanes 4q + i), then the halves
  const __m512i idx = _mm512_add_epi32(_mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28),
                                       _mm512_set1_epi32(i));
  const __m512 lo = _mm512_permutex2var_ps(v[0], idx, v[1]), hi = _mm512_permutex2var_ps(v[2], idx, v[3]);
  return _mm512_permutex2var_ps(lo, _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23), hi);
}
#endif

// m[0, W) = max(v, m) lane by lane, W the vector's lanes: BlockFold's `row > m ? row : m`
// (MAXPS returns its second operand when the first is not greater, NaN included).
#if defined(METAEMBED_INDEX_ZMM)
inline void max_into(float* m, __m512 v) { _mm512_storeu_ps(m, _mm512_max_ps(v, _mm512_loadu_ps(m))); }
#endif
#if defined(METAEMBED_INDEX_ZMM) || defined(METAEMBED_INDEX_AVX2)
inline void max_into(float* m, __m256 v) { _mm256_storeu_ps(m, _mm256_max_ps(v, _mm256_loadu_ps(m))); }
#define METAEMBED_INDEX_MAX_INTO 1
#endif

// 16 float lanes, one per candidate of a few-token group (kFewC): one zmm, or two ymm on AVX2.
// The single-group few-token scans keep their running values in these. max(a, b) is MAXPS's
// `a > b ? a : b` (b when either is NaN), the order BlockFold folds in.
#if defined(METAEMBED_INDEX_ZMM) || defined(METAEMBED_INDEX_AVX2)
#define METAEMBED_INDEX_LANES16 1
struct Lanes16 {
#if defined(METAEMBED_INDEX_ZMM)
  __m512 v;
  static Lanes16 set1(float x) { return {_mm512_set1_ps(x)}; }
  static Lanes16 load(const float* p) { return {_mm512_load_ps(p)}; }  // 64-byte aligned
  // float(p[l] - minus), p 64-byte aligned
  static Lanes16 from_i32(const int32_t* p, int32_t minus) {
    return {_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(p), _mm512_set1_epi32(minus)))};
  }
  void store(float* p) const { _mm512_store_ps(p, v); }
  // bit l set for the lanes of `live` with v[l] >= bar (false for NaN)
  uint32_t reaching(float bar, uint32_t live) const {
    return _mm512_mask_cmp_ps_mask(__mmask16(live), v, _mm512_set1_ps(bar), _CMP_GE_OQ);
  }
#else
  __m256 lo, hi;
  static Lanes16 set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
  static Lanes16 load(const float* p) { return {_mm256_load_ps(p), _mm256_load_ps(p + 8)}; }
  static Lanes16 from_i32(const int32_t* p, int32_t minus) {
    const __m256i m = _mm256_set1_epi32(minus);
    auto half = [&](const int32_t* h) {
      return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(h)), m));
    };
    return {half(p), half(p + 8)};
  }
  void store(float* p) const {
    _mm256_store_ps(p, lo);
    _mm256_store_ps(p + 8, hi);
  }
  uint32_t reaching(float bar, uint32_t live) const {
    const __m256 b = _mm256_set1_ps(bar);
    const uint32_t bits = uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(lo, b, _CMP_GE_OQ))) |
                          uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(hi, b, _CMP_GE_OQ))) << 8;
    return bits & live;
  }
#endif
};
// Free functions, not hidden friends: g++ does not apply `#pragma GCC target` to those.
#if defined(METAEMBED_INDEX_ZMM)
inline Lanes16 max(Lanes16 a, Lanes16 b) { return {_mm512_max_ps(a.v, b.v)}; }
inline Lanes16 operator+(Lanes16 a, Lanes16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Lanes16 operator*(Lanes16 a, Lanes16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
#else
inline Lanes16 max(Lanes16 a, Lanes16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline Lanes16 operator+(Lanes16 a, Lanes16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline Lanes16 operator*(Lanes16 a, Lanes16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
#endif
#endif

// Query-token validity of a block as 0/1 bytes (nullptr when q has no mask).
inline const uint8_t* block_qvalid(const IndexProblem& IP, int64_t a0, int64_t n, uint8_t* buf) {
  const Problem& P = IP.p;
  if (!P.q.mask) return nullptr;
  const int64_t rq = P.groups.rq_eff;
  for (int64_t al = 0; al < n; ++al)
    for (int64_t i = 0; i < rq; ++i) buf[al * rq + i] = P.q.mask[(a0 + al) * P.q.m0 + i * P.q.m1] ? 1 : 0;
  return buf;
}

// Bit l set where s[l] >= bar_l, l < 16, with bar_l = thr[l] (Bar = const float*: one bar per
// query) or thr (Bar = float: one bar for 16 candidates of one query). One vector compare
// where the including ISA file (index_isa_*.cpp, its METAEMBED_INDEX_* macro) targets one;
// GCC kept the plain loop scalar. (Not __AVX512F__: g++ does not define it under
// `#pragma GCC target`.)
template <class Bar>
inline uint32_t lanes_reaching16(const float* s, Bar thr) {
  constexpr bool kPerLane = std::is_pointer_v<Bar>;
#if defined(METAEMBED_INDEX_ZMM)
  __m512 bar;
  if constexpr (kPerLane) bar = _mm512_loadu_ps(thr);
  else bar = _mm512_set1_ps(thr);
  return _mm512_cmp_ps_mask(_mm512_loadu_ps(s), bar, _CMP_GE_OQ);
#elif defined(METAEMBED_INDEX_AVX2)
  uint32_t bits = 0;
  for (int h = 0; h < 2; ++h) {
    __m256 bar;
    if constexpr (kPerLane) bar = _mm256_loadu_ps(thr + 8 * h);
    else bar = _mm256_set1_ps(thr);
    bits |= uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + 8 * h), bar, _CMP_GE_OQ))) << (8 * h);
  }
  return bits;
#else
  uint32_t bits = 0;
  for (int l = 0; l < 16; ++l) {
    float bar;
    if constexpr (kPerLane) bar = thr[l];
    else bar = thr;
    bits |= uint32_t(s[l] >= bar) << l;
  }
  return bits;
#endif
}

// The threshold test of one candidate when every query has one token and there is one group:
// the score of query lane l is s[l] = max over the candidate's valid tile rows of row[l], folded
// from -inf as BlockFold does (0 when no row is valid), then 0 where qvalid[l] == 0 (qvalid may
// be nullptr); offer(l, s[l]) runs for every lane with s[l] >= thr[l], re-read before each
// offer because the bar rises as the top k fills. Lane l of tile row r is at
// tile[(l / NR) * panel + r * NR + l % NR]. Scores are stored only for 16 lanes with a hit.
template <int NR, class Offer>
inline void one_token_offers(const float* tile, int64_t panel, const int* rows, int nv, int64_t n,
                             const uint8_t* qvalid, const float* thr, Offer&& offer) {
  static_assert(NR % 16 == 0, "16 query lanes never straddle two panels");
#if defined(METAEMBED_INDEX_ZMM)
  // Scores of lanes [l0, l0 + 16) and the lanes that reach their bars (live: lanes < n).
  auto lanes16 = [&](int64_t l0, __m512& v) -> __mmask16 {
    const float* base = tile + (l0 / NR) * panel + l0 % NR;
    const int64_t lanes = min64(16, n - l0);
    const __mmask16 live = lanes == 16 ? __mmask16(0xFFFF) : __mmask16((1u << lanes) - 1);
    v = _mm512_setzero_ps();
    if (nv) {
      v = _mm512_set1_ps(-INFINITY);
      for (int r = 0; r < nv; ++r) v = _mm512_max_ps(_mm512_loadu_ps(base + rows[r] * NR), v);  // row > v ? row : v
      v = zero_masked_tokens16(v, qvalid, l0, live);
    }
    return _mm512_mask_cmp_ps_mask(live, v, _mm512_maskz_loadu_ps(live, thr + l0), _CMP_GE_OQ);
  };
  // Most candidates reach no bar: test every lane first with one branch per candidate.
  __mmask16 any = 0;
  for (int64_t l0 = 0; l0 < n; l0 += 16) {
    __m512 v;
    any |= lanes16(l0, v);
  }
  if (!any) return;
  for (int64_t l0 = 0; l0 < n; l0 += 16) {
    __m512 v;
    uint32_t hits = lanes16(l0, v);
    if (!hits) continue;
    alignas(64) float s[16];
    _mm512_store_ps(s, v);
    for (int l = 0; hits; ++l, hits >>= 1)
      if ((hits & 1) && s[l] >= thr[l0 + l]) offer(l0 + l, s[l]);
  }
#else
  for (int64_t l0 = 0; l0 < n; l0 += 16) {
    const float* base = tile + (l0 / NR) * panel + l0 % NR;
    const int lanes = int(min64(16, n - l0));
    alignas(64) float s[16];
    uint32_t hits = 0;
    for (int l = 0; l < lanes; ++l) {
      float v = nv ? -INFINITY : 0.f;
      for (int r = 0; r < nv; ++r) v = base[rows[r] * NR + l] > v ? base[rows[r] * NR + l] : v;
      s[l] = (nv && qvalid && !qvalid[l0 + l]) ? 0.f : v;
      hits |= uint32_t(s[l] >= thr[l0 + l]) << l;
    }
    for (int l = 0; hits; ++l, hits >>= 1)
      if ((hits & 1) && s[l] >= thr[l0 + l]) offer(l0 + l, s[l]);
  }
#endif
}

// The threshold test: offer the candidate to the top k of the queries whose bar it reaches.
// Queries go 16 at a time through one vector compare (a bool-or over all n queries stayed
// scalar, and with many queries per block it cost as much as a 1-token budget's tile).
inline void offer_scores(TopK& top, const IndexProblem& IP, int64_t a0, int64_t n, const float* scores, int64_t id,
                         int64_t row) {
  constexpr int kLanes = 16;
  const int64_t G = IP.p.groups.num_groups, nq = IP.p.nq;
  for (int64_t g = 0; g < G; ++g) {
    const float* s = scores + g * n;
    const float* thr = top.thr + g * nq + a0;
    for (int64_t c0 = 0; c0 < n; c0 += kLanes) {
      uint32_t hits = 0;
      if (c0 + kLanes <= n) {
        hits = lanes_reaching16(s + c0, thr + c0);
      } else {
        for (int l = 0; c0 + l < n; ++l) hits |= uint32_t(s[c0 + l] >= thr[c0 + l]) << l;
      }
      for (int l = 0; hits; ++l, hits >>= 1) {
        const int64_t al = c0 + l;
        if ((hits & 1) && s[al] >= thr[al])  // the bar rises as the top k fills
          topk_offer(top, g * nq + a0 + al, s[al], id, row);
      }
    }
  }
}

// ---- few query tokens: 16 candidates at a time -------------------------------------------
//
// One query at a small budget (<= kDotTokens query tokens) is a memory-bound GEMV: the work per
// candidate is a few dot products, so everything around them must cost a few instructions per
// candidate too. Candidates go 16 at a time: for each token j, the dot products of the 16 rows
// (Ops::dots) land in sims[t][c], and the fold, the snapshots, the group scores and the
// threshold test are loops over the 16 candidate lanes (vectorised by the compiler).
constexpr int kFewC = 16;
constexpr int kFewT = 4;
static_assert(kFewC == 16, "the threshold tests (lanes_reaching16) compare 16 candidates at once");

struct FewBuffers {
  float* bm;      // [num_bounds][kFewT][kFewC]
  uint8_t* bval;  // [num_bounds][kFewC]
  float* sc;      // [G][n][kFewC]
  static size_t bytes(const Problem& P) {
    return align64(sizeof(float) * P.groups.num_bounds * kFewT * kFewC) + align64(P.groups.num_bounds * kFewC) +
           align64(sizeof(float) * P.groups.num_groups * kFewT * kFewC) + 64;
  }
  static FewBuffers carve(const Problem& P, void* at) {
    uintptr_t p = (reinterpret_cast<uintptr_t>(at) + 63) & ~uintptr_t(63);
    FewBuffers f;
    f.bm = reinterpret_cast<float*>(p);
    p += align64(sizeof(float) * P.groups.num_bounds * kFewT * kFewC);
    f.bval = reinterpret_cast<uint8_t*>(p);
    p += align64(P.groups.num_bounds * kFewC);
    f.sc = reinterpret_cast<float*>(p);
    return f;
  }
};

// Prefetch (into L2) token j of the next 16 rows of a slab that holds several vectors per row:
// those rows sit a stride apart, read one token at a time, a pattern the hardware prefetcher
// follows too slowly (int8 at (4, 8), one query: 26 ms without, 19 ms into L1, 13 ms into L2).
// A slab of one vector per row is one sequential stream, left to the hardware.
template <class T>
inline void few_token_prefetch(const T* const* src, int64_t rstride, int64_t D) {
  for (int c = 0; c < kFewC; ++c)
    for (int64_t d = 0; d < D * int64_t(sizeof(T)); d += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(src[c] + kFewC * rstride) + d, 0, 1);
}

// dots(cands, count, j, sims[kFewT][kFewC]) fills token j's similarities of the group's
// candidates (lanes >= count: anything finite); emit(cands, count, sc[G][n][kFewC]).
template <class Dots, class Emit>
inline void few_token_scan(const IndexProblem& IP, int64_t n, int nt, const uint8_t* qvalid, int64_t r0, int64_t r1,
                           FewBuffers& fb, Dots&& dots, Emit&& emit) {
  const Problem& P = IP.p;
  const int64_t rc = P.groups.rc_eff, rq = P.groups.rq_eff, G = P.groups.num_groups;
  const int64_t* bounds = P.groups.bounds;
  for_candidate_groups(IP, r0, r1, kFewC, [&](const Cand* cands, int count) {
    alignas(64) float run[kFewT][kFewC];
    alignas(64) float sims[kFewT][kFewC];
    alignas(64) uint8_t valid[kFewC];
    alignas(64) uint8_t any[kFewC];
    for (int t = 0; t < nt; ++t)
      for (int c = 0; c < kFewC; ++c) run[t][c] = -INFINITY;
    for (int c = 0; c < kFewC; ++c) any[c] = 0;
    for (int c = 0; c < kFewC; ++c) valid[c] = c < count;
    int64_t kb = 0;
    for (int64_t j = 0; j < rc; ++j) {
      dots(cands, count, j, sims);
      if (IP.masked)
        for (int c = 0; c < count; ++c) valid[c] = token_valid(IP, *cands[c].seg, cands[c].b, j);
      for (int t = 0; t < nt; ++t)
        for (int c = 0; c < kFewC; ++c) run[t][c] = (valid[c] && sims[t][c] > run[t][c]) ? sims[t][c] : run[t][c];
      for (int c = 0; c < kFewC; ++c) any[c] |= valid[c];
      if (j + 1 == bounds[kb]) {
        std::memcpy(fb.bm + kb * kFewT * kFewC, run, sizeof(float) * nt * kFewC);
        std::memcpy(fb.bval + kb * kFewC, any, kFewC);
        ++kb;
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k = P.groups.bound_index[g], grq = P.groups.rq[g];
      const float* bm = fb.bm + k * kFewT * kFewC;
      const uint8_t* bv = fb.bval + k * kFewC;
      for (int64_t al = 0; al < n; ++al) {
        float* o = fb.sc + (g * n + al) * kFewC;
        for (int c = 0; c < kFewC; ++c) o[c] = 0.f;
        for (int64_t i = 0; i < grq; ++i) {
          if (qvalid && !qvalid[al * rq + i]) continue;
          const float* m = bm + (al * rq + i) * kFewC;
          for (int c = 0; c < kFewC; ++c) o[c] += m[c];
        }
        for (int c = 0; c < kFewC; ++c) o[c] = bv[c] ? o[c] : 0.f;
      }
    }
    emit(cands, count, fb.sc);
  });
}

// <row, q> over n elements with kW partial sums (vectorised by lane) for ISAs without Ops dots.
template <class T>
inline float few_dot(const T* row, const float* q, int64_t n) {
  constexpr int kW = 16;
  float part[kW] = {};
  int64_t d = 0;
  for (; d + kW <= n; d += kW)
    for (int l = 0; l < kW; ++l) part[l] += scalar_to_float(row[d + l]) * q[d + l];
  float sum = 0;
  for (int l = 0; l < kW; ++l) sum += part[l];
  for (; d < n; ++d) sum += scalar_to_float(row[d]) * q[d];
  return sum;
}

// ---- float32 / bfloat16 index: exact scores from the engine's micro-kernel -----------------

// ExactScan's Ops for ISAs without their own few-token dots: the engine's, row by row.
struct UseEngineDots {};

// Whether Ops has bfloat16 few-token dots over query rows in pair order (Avx2Dots: its
// kPairOrder). C++17 detection: test-compat builds with torch 2.11's -std=c++17.
template <class Ops, class = void>
struct PairOrderOf : std::false_type {};
template <class Ops>
struct PairOrderOf<Ops, std::void_t<decltype(Ops::kPairOrder)>> : std::bool_constant<Ops::kPairOrder> {};
template <class Ops>
constexpr bool ops_pair_order() {
  return PairOrderOf<Ops>::value;
}

template <class Policy, class T, class Ops>
struct ExactScan {
  using E = Engine<Policy, T>;
  using Acc = typename Policy::Acc;
  using RowT = typename E::RowT;
  static constexpr int NR = Policy::NR;
  static constexpr int MR = Policy::MR;
  static_assert(std::is_same_v<Acc, float>, "the index scores in float32");

  struct Extra {
    float* scores;    // [G][qpb]
    uint8_t* bvalid;  // [num_bounds]
    uint8_t* qvalid;  // [qpb * rq_eff]
    float* tile16;    // [16][NR]: the 16 x 16 tile's rows (tile16)
    FewBuffers few;
  };

  static size_t extra_bytes(const Problem& P) {
    return align64(sizeof(float) * P.queries_per_block * P.groups.num_groups) + align64(P.groups.num_bounds) +
           align64(P.queries_per_block * P.groups.rq_eff) + align64(sizeof(float) * 16 * NR) + FewBuffers::bytes(P) +
           64;
  }

  static size_t workspace_bytes(const IndexProblem& IP) { return E::workspace_bytes(IP.p) + extra_bytes(IP.p); }

  static Extra carve_extra(const Problem& P, void* ws) {
    uintptr_t p = (reinterpret_cast<uintptr_t>(ws) + E::workspace_bytes(P) + 63) & ~uintptr_t(63);
    Extra x;
    x.scores = reinterpret_cast<float*>(p);
    p += align64(sizeof(float) * P.queries_per_block * P.groups.num_groups);
    x.bvalid = reinterpret_cast<uint8_t*>(p);
    p += align64(P.groups.num_bounds);
    x.qvalid = reinterpret_cast<uint8_t*>(p);
    p += align64(P.queries_per_block * P.groups.rq_eff);
    x.tile16 = reinterpret_cast<float*>(p);
    p += align64(sizeof(float) * 16 * NR);
    x.few = FewBuffers::carve(P, reinterpret_cast<void*>(p));
    return x;
  }

  static size_t qpack_bytes(const IndexProblem& IP) { return E::qpack_bytes(IP.p); }
  static void pack_queries(const IndexProblem& IP, int64_t qblock) { E::pack_queries(IP.p, qblock); }

  // The similarity tile for tokens [j0, j0 + per) of candidates cands[0, count), tile rows
  // r = ci * per + jj (m candidates; rows of missing candidates repeat the last real row).
  static void tile(const IndexProblem& IP, const typename E::QView& qv, typename E::Work& w, const Cand* cands,
                   int count, int m, int64_t j0, int per, const Acc* const* qrows, int nt) {
    const Problem& P = IP.p;
    const int64_t D = P.d, KC = P.kc, pe = E::panel_elems(P);
    const int M = m * per;
    const T* src[MR];
    int r = 0;
    for (int ci = 0; ci < count; ++ci)
      for (int jj = 0; jj < per; ++jj) src[r++] = token_row<T>(IP, *cands[ci].seg, cands[ci].b, j0 + jj);
    for (; r < MR; ++r) src[r] = src[count * per - 1];
    if constexpr (E::kAmxPath) {  // bf16 on AMX tiles: all of D at once, rows past M zero
      if (nt == 0) return E::amx_tile_rows(P, qv, src, M, w, w.tile);
    }
    for (int64_t k0 = 0; k0 < D; k0 += KC) {
      const int64_t kc = min64(KC, D - k0);
      const RowT* rows[MR];
      for (int rr = 0; rr < MR; ++rr) {
        if constexpr (E::kDirectRows) {
          rows[rr] = src[rr] + k0;
        } else {
          if (rr < count * per) Policy::convert(src[rr] + k0, w.crows + rr * KC, kc);
          rows[rr] = w.crows + std::min(rr, count * per - 1) * KC;
        }
      }
      if (nt > 0) {
        if constexpr (std::is_same_v<Ops, UseEngineDots>) {
          for (int rr = 0; rr < M; ++rr) E::dots(rows[rr], qrows, nt, k0, kc, w.tile + rr * NR, k0 > 0);
        } else {
          Ops::dots(rows, M, qrows, nt, k0, kc, w.tile, NR, k0 > 0);
        }
      } else {
        for (int64_t p = 0; p < qv.panels; ++p)
          E::template micro_dispatch<MR>(M, rows, qv.pack + p * pe + k0 * NR, kc, w.tile + p * MR * NR, k0 > 0);
      }
    }
  }

  // Tiles of r_c > MR rows over all of D at once fold on registers: the micro-kernel hands each
  // finished row to BlockFold's max (max_into) and snapshot instead of storing the tile for
  // fold() to read back. Same arithmetic and order, so scores are bitwise the stored path's;
  // exact search at (16, 64), 16 queries, on the 64-lane bf16 tile: the stored tile and its
  // fold were 8% of the scan.
#if defined(METAEMBED_INDEX_MAX_INTO)
  static constexpr bool kRegisterFold = Policy::kFoldMax && !E::kAmxPath;
#else
  static constexpr bool kRegisterFold = false;
#endif

  template <int M, class Epi>
  static void micro_fold(int mr, const RowT* const* rows, const typename E::PackT* qp, int64_t kc, Epi&& epi) {
    if constexpr (M > 1) {
      if (mr < M) return micro_fold<M - 1>(mr, rows, qp, kc, epi);
    }
    Policy::template micro_epilogue<M>(rows, qp, kc, nullptr, false, epi);
  }

  // Rows j0 .. j0 + mr (mr <= MR) of candidate c against every panel of the view, folded into
  // f (BlockFold::fold's effect) from registers. Needs P.kc == P.d and nt == 0.
  static void fold_tile_rows(const IndexProblem& IP, const typename E::QView& qv, typename E::Work& w,
                             BlockFold<NR, MR>& f, const Cand& c, int64_t j0, int mr) {
    if constexpr (kRegisterFold) {
      const int64_t D = IP.p.d, pe = E::panel_elems(IP.p);
      const RowT* rows[MR];
      for (int r = 0; r < mr; ++r) {
        const T* src = token_row<T>(IP, *c.seg, c.b, j0 + r);
        if constexpr (E::kDirectRows) {
          rows[r] = src;
        } else {
          Policy::convert(src, w.crows + r * D, D);
          rows[r] = w.crows + r * D;
        }
      }
      uint32_t valid, snap;
      int64_t bound_at[MR];  // read only where snap has the row's bit
      f.row_bits(c, j0, mr, valid, snap, bound_at);
      float* run = f.run();
      const bool copy = run != f.bmax;  // one bound: the fold runs in its snapshot already
      for (int64_t p = 0; p < qv.panels; ++p) {
        float* m = run + p * NR;
        float* snapshots = f.bmax + p * NR;
        micro_fold<MR>(mr, rows, qv.pack + p * pe, D, [&](int r, const auto* v) {
          constexpr int W = int(sizeof(*v) / sizeof(float));
          if (valid >> r & 1u) {
            for (int h = 0; h < NR / W; ++h) max_into(m + h * W, v[h]);
          }
          if (copy && (snap >> r & 1u)) std::memcpy(snapshots + bound_at[r] * f.lanes, m, sizeof(float) * NR);
        });
      }
    }
  }

  // Prefetch (into L2) of a 16 x 16 tile's rows, spread over the loop of the tile before it
  // (Policy::micro16x16's beside()). A 16-row tile reads its rows a pair of dims at a time, so
  // each row's next line is a demand miss; one query at a large budget, streamed from DRAM,
  // waited on them (search at (16, 64), Nq = 1: a third of the memory bandwidth). The rows of
  // one slab are contiguous per candidate: a tile's 16 rows are at most 16 runs of lines.
  struct TileRowsPrefetch {
    const char* next[16];  // line-aligned
    const char* end[16];
    int runs = 0, cur = 0;
    int64_t per = 0;  // lines per step()

    // Rows j0 .. j0 + mr of candidate c.
    void add_rows(const IndexProblem& IP, const Cand& c, int64_t j0, int mr) {
      const int64_t row_bytes = int64_t(sizeof(T)) * IP.p.d;
      for (int64_t j = j0; j < j0 + mr;) {
        int64_t j1 = j + 1;  // rows j .. j1 of one slab: contiguous
        while (j1 < j0 + mr && IP.tok_slab[j1] == IP.tok_slab[j]) ++j1;
        const char* b = reinterpret_cast<const char*>(token_row<T>(IP, *c.seg, c.b, j));
        next[runs] = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(b) & ~uintptr_t(63));
        end[runs++] = b + (j1 - j) * row_bytes;
        j = j1;
      }
    }
    // Spread the lines over `calls` calls of step().
    void spread(int64_t calls) {
      int64_t lines = 0;
      for (int r = 0; r < runs; ++r) lines += (end[r] - next[r] + 63) / 64;
      per = (lines + calls - 1) / (calls > 0 ? calls : 1);
    }
    __attribute__((always_inline)) void step() {
      for (int64_t i = 0; i < per && cur < runs; ++i) {
        __builtin_prefetch(next[cur], 0, 2);
        next[cur] += 64;
        if (next[cur] >= end[cur]) ++cur;
      }
    }
    void finish() {
      while (cur < runs) step();
    }
  };

  // Rows j0 .. j0 + mr (mr <= 16) of candidate c against a view of <= 16 query tokens on the
  // engine's 16 x 16 tile (E::tile16_path), into out [16][NR] (lanes 16-31 repeat 0-15; rows past mr
  // come from zero rows), prefetching `ahead`'s rows meanwhile. The rows are read in place when
  // 16 of them sit at the tile's stride in one slab (RowT, D = RS), else converted or copied
  // into w.rows16. Values bitwise tile()'s for rows in tiles of 2 or more (sequential chains
  // over d).
  template <int RS>
  static void tile16(const IndexProblem& IP, const typename E::QView& qv, typename E::Work& w, const Cand& c,
                     int64_t j0, int mr, float* out, TileRowsPrefetch& ahead) {
    const int64_t D = IP.p.d;
    const bool in_place = E::kDirectRows && D == RS && mr == 16 && IP.tok_slab[j0] == IP.tok_slab[j0 + 15];
    const RowT* rows = E::template tile16_rows_at<RS>(
        in_place ? reinterpret_cast<const RowT*>(token_row<T>(IP, *c.seg, c.b, j0)) : nullptr,
        [&](int r) { return token_row<T>(IP, *c.seg, c.b, j0 + r); }, mr, D, w);
    if constexpr (Policy::kTile16) {
      ahead.spread(D / Policy::kBesideSteps);
      Policy::template micro16x16<RS>(rows, qv.pack, D, [out](int r, const auto* v) {
        std::memcpy(out + r * NR, &v[0], sizeof(v[0]));
        std::memcpy(out + r * NR + NR / 2, &v[1], sizeof(v[1]));
      }, [&ahead] { ahead.step(); });
      ahead.finish();
    }
  }

  // BlockFold over a candidate of r_c > MR rows on 16 x 16 tiles: bitwise the MR-row tiles'
  // fold, the lone last row of r_c = MR m + 1 (a 1-row tile, summed in 4 interleaved chains)
  // included, through tile() as there. Each tile prefetches the next one's rows: the
  // candidate's, then the first tile of the next row of its segment (the scan's next
  // candidate unless a filter skips it).
  template <int RS>
  static void fold_tiles16(const IndexProblem& IP, const typename E::QView& qv, typename E::Work& w, Extra& x,
                           BlockFold<NR, MR>& f, const Cand& c, const Acc* const* qrows, int nt) {
    const int64_t rc = IP.p.groups.rc_eff, rc16 = E::tile16_rows(rc);
    for (int64_t j0 = 0; j0 < rc16; j0 += 16) {
      const int mr = int(min64(16, rc16 - j0));
      TileRowsPrefetch ahead;
      if (j0 + 16 < rc16)
        ahead.add_rows(IP, c, j0 + 16, int(min64(16, rc16 - j0 - 16)));
      else if (c.b + 1 < c.seg->n)
        ahead.add_rows(IP, Cand{c.seg, c.b + 1}, 0, int(min64(16, rc16)));
      tile16<RS>(IP, qv, w, c, j0, mr, x.tile16, ahead);
      f.fold(c, x.tile16, 0, mr, j0);
    }
    if (rc16 < rc) {
      tile(IP, qv, w, &c, 1, 1, rc - 1, 1, qrows, nt);
      f.fold(c, w.tile, 0, 1, rc - 1);
    }
  }

#if defined(METAEMBED_INDEX_ZMM)
  static constexpr bool kLaneFold = NR % 16 == 0;
  // BlockFold's begin / fold / finish for one group and a candidate whose r_c rows are tile rows
  // [r0, r0 + r_c), 16 query tokens at a time: token maxima over the valid rows from -inf (as
  // BlockFold: row > m ? row : m), masked tokens zeroed (adding +0 leaves a sum as it is; a
  // sum from +0 is never -0), then each query's sum 0 + A_0 + A_1 + ... in order, gathered
  // across lanes. scores[al] (0 for every query when no row is valid): bitwise BlockFold's.
  static void fold_one_group(const IndexProblem& IP, const typename E::QView& qv, const Cand& c, const float* tile,
                             int r0, const uint8_t* qvalid, float* tmax, float* scores) {
    const Problem& P = IP.p;
    const int64_t rc = P.groups.rc_eff, rq = P.groups.rq_eff, grq = P.groups.rq[0], n = qv.n, ntok = n * rq;
    int rows[MR];
    int nv = 0;
    for (int j = 0; j < int(rc); ++j)
      if (token_valid(IP, *c.seg, c.b, j)) rows[nv++] = r0 + j;
    if (!nv) {
      for (int64_t al = 0; al < n; ++al) scores[al] = 0.f;
      return;
    }
    float* dst = rq == 1 ? scores : tmax;  // one token per query: the maxima are the scores
    for (int64_t t0 = 0; t0 < ntok; t0 += 16) {
      const __mmask16 live = __mmask16((1u << min64(16, ntok - t0)) - 1);
      const float* base = tile + (t0 / NR) * MR * NR + t0 % NR;
      __m512 v = _mm512_set1_ps(-INFINITY);
      for (int k = 0; k < nv; ++k) v = _mm512_max_ps(_mm512_loadu_ps(base + rows[k] * NR), v);
      _mm512_mask_storeu_ps(dst + t0, live, zero_masked_tokens16(v, qvalid, t0, live));
    }
    if (rq == 1) return;
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t l0 = 0; l0 < n; l0 += 16) {
      const __mmask16 live = __mmask16((1u << min64(16, n - l0)) - 1);
      const __m512i first =
          _mm512_mullo_epi32(_mm512_add_epi32(iota, _mm512_set1_epi32(int32_t(l0))), _mm512_set1_epi32(int32_t(rq)));
      __m512 a = _mm512_setzero_ps();
      for (int64_t i = 0; i < grq; ++i)
        a = _mm512_add_ps(a, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live,
                                                      _mm512_add_epi32(first, _mm512_set1_epi32(int32_t(i))), tmax, 4));
      _mm512_mask_storeu_ps(scores + l0, live, a);
    }
  }
#else
  static constexpr bool kLaneFold = false;
  static void fold_one_group(const IndexProblem&, const typename E::QView&, const Cand&, const float*, int,
                             const uint8_t*, float*, float*) {}
#endif

  // Scores every candidate the source hands out against the view; emit(cand, scores[G][n]).
  template <class Source, class Emit>
  static void scan(const IndexProblem& IP, const typename E::QView& qv, typename E::Work& w, Extra& x,
                   Source&& source, Emit&& emit) {
    const Problem& P = IP.p;
    const int64_t rc = P.groups.rc_eff;
    const Acc* qrows[E::kDotTokens];
    const int nt = E::prepare_query_rows(P, qv, w, qrows);
    BlockFold<NR, MR> f{IP, qv.a0, qv.n, nt > 0 ? 1 : qv.panels, (nt > 0 ? 1 : qv.panels) * NR, nt > 0 ? nt : NR,
                        nt > 0 ? nt : qv.panels * NR, block_qvalid(IP, qv.a0, qv.n, x.qvalid), w.runmax, w.bmax,
                        x.bvalid, x.scores};
    const int m = tile_candidates(rc, MR);
    // A candidate whose r_c rows are tile rows [r0, r0 + r_c): its scores into x.scores.
    const bool one_group_lanes = kLaneFold && nt == 0 && P.groups.num_groups == 1;
    auto fold_candidate = [&](const Cand& c, int r0) {
      if (one_group_lanes) {
        fold_one_group(IP, qv, c, w.tile, r0, f.qvalid, w.runmax, x.scores);
      } else {
        f.begin();
        f.fold(c, w.tile, r0, int(rc), 0);
        f.finish();
      }
    };
    source(m, [&](const Cand* cands, int count) {
      if (m > 1) {
        tile(IP, qv, w, cands, count, m, 0, int(rc), qrows, nt);
        for (int c = 0; c < count; ++c) {
          fold_candidate(cands[c], c * int(rc));
          emit(cands[c], x.scores);
        }
      } else if (rc <= MR) {
        tile(IP, qv, w, cands, 1, 1, 0, int(rc), qrows, nt);
        fold_candidate(cands[0], 0);
        emit(cands[0], x.scores);
      } else if (E::tile16_path(P, qv, nt)) {  // <= 16 query tokens: the 16 x 16 tile
        f.begin();
        E::with_tile16_stride(P.d, [&](auto rs) {
          fold_tiles16<decltype(rs)::value>(IP, qv, w, x, f, cands[0], qrows, nt);
        });
        f.finish();
        emit(cands[0], x.scores);
      } else if (kRegisterFold && nt == 0 && P.kc == P.d) {
        f.begin();
        for (int64_t j0 = 0; j0 < rc; j0 += MR) fold_tile_rows(IP, qv, w, f, cands[0], j0, int(min64(MR, rc - j0)));
        f.finish();
        emit(cands[0], x.scores);
      } else if (E::kAmxPath && nt == 0) {  // 16-row AMX tiles: an 8-row one costs nearly as much
        f.begin();
        f.panel_rows = 16;
        for (int64_t j0 = 0; j0 < rc; j0 += 16) {
          const int mr = int(min64(16, rc - j0));
          const Cand& c = cands[0];
          const T* src[16];
          for (int r = 0; r < mr; ++r) src[r] = token_row<T>(IP, *c.seg, c.b, j0 + r);
          E::amx_tile16_rows(P, qv, src, mr, w, w.tile);
          f.fold(c, w.tile, 0, mr, j0);
        }
        f.panel_rows = MR;
        f.finish();
        emit(cands[0], x.scores);
      } else {
        f.begin();
        for (int64_t j0 = 0; j0 < rc; j0 += MR) {
          const int mr = int(min64(MR, rc - j0));
          tile(IP, qv, w, cands, 1, 1, j0, mr, qrows, nt);
          f.fold(cands[0], w.tile, 0, mr, j0);
        }
        f.finish();
        emit(cands[0], x.scores);
      }
    });
  }

  // One token per query and one group, r_c < MR (budget (1, r_c): the first stage of a cascade;
  // at (1, 1) a plain GEMM): the score of query lane l is the max of tile[row][l] over the
  // candidate's valid rows (0 for a masked query token, 0 when no row is valid), compared with
  // the bars straight from the tile, 16 queries at a time. This skips BlockFold's buffers (its
  // begin / fold / finish passes over every query lane cost a third of a (1, 1) scan) but keeps
  // its arithmetic, so scores are bitwise the general path's.
  static constexpr bool kOneTokenPath = NR % 16 == 0;

  static bool one_token_path(const Problem& P) {
    return kOneTokenPath && P.groups.num_groups == 1 && P.groups.rq_eff == 1 && tile_candidates(P.groups.rc_eff, MR) > 1;
  }

  static void search_one_token(const IndexProblem& IP, const typename E::QView& qv, typename E::Work& w, Extra& x,
                               TopK& top, int64_t r0, int64_t r1) {
    const Problem& P = IP.p;
    const int rc = int(P.groups.rc_eff), m = tile_candidates(rc, MR);
    const int64_t n = qv.n;
    const uint8_t* qvalid = block_qvalid(IP, qv.a0, n, x.qvalid);
    const float* thr = top.thr + qv.a0;  // group 0
    const Acc* qrows[E::kDotTokens] = {};
    for_candidate_groups(IP, r0, r1, m, [&](const Cand* cands, int count) {
      tile(IP, qv, w, cands, count, m, 0, rc, qrows, 0);
      for (int c = 0; c < count; ++c) {
        const Cand& cc = cands[c];
        int valid_rows[MR];
        int nv = 0;
        for (int r = 0; r < rc; ++r)
          if (token_valid(IP, *cc.seg, cc.b, r)) valid_rows[nv++] = c * rc + r;
        const int64_t id = cc.seg->ids[cc.b], row = cc.seg->row0 + cc.b;
        one_token_offers<NR>(w.tile, MR * NR, valid_rows, nv, n, qvalid, thr,
                             [&](int64_t al, float score) { topk_offer(top, qv.a0 + al, score, id, row); });
      }
    });
  }

#if defined(METAEMBED_INDEX_ZMM) || defined(METAEMBED_INDEX_AVX2)
  // Token 0 of a group's MR candidates for the fused test: srcs[r] as stored, rows[r] as the
  // micro-kernel reads it (in place, or converted once into w.crows). Padding rows r >= count
  // repeat the last real row. (AMX: search_fused_test_amx.)
  static void fused_test_rows(const IndexProblem& IP, typename E::Work& w, const Cand* cands, int count,
                              const typename E::RowT** rows, const T** srcs) {
    const Problem& P = IP.p;
    for (int r = 0; r < MR; ++r) {
      const Cand& c = cands[r < count ? r : count - 1];
      const T* src = token_row<T>(IP, *c.seg, c.b, 0);
      srcs[r] = src;
      if constexpr (E::kDirectRows) {
        rows[r] = src;
      } else {
        if (r < count) Policy::convert(src, w.crows + r * P.kc, P.d);
        rows[r] = w.crows + (r < count ? r : count - 1) * P.kc;
      }
    }
  }

  // Offers the hits of one panel (bit l of hits[r]: lane l0 + l of tile row r reached its bar;
  // the row's scores stored in w.tile), re-reading the bar that rises as the top k fills.
  static void offer_panel_hits(TopK& top, const typename E::QView& qv, const float* tile, const Cand* cands,
                               int count, const uint64_t* hits, int64_t l0) {
    const float* thr = top.thr + qv.a0;  // group 0
    for (int r = 0; r < count; ++r) {
      const Cand& c = cands[r];
      for (uint64_t h = hits[r]; h; h &= h - 1) {
        const int l = __builtin_ctzll(h);
        const float s = tile[r * NR + l];
        if (s >= thr[l0 + l]) topk_offer(top, qv.a0 + l0 + l, s, c.seg->ids[c.b], c.seg->row0 + c.b);
      }
    }
  }
#endif

#if defined(METAEMBED_INDEX_ZMM)
  // The plain GEMM case of the one-token path (r_c = 1, no candidate mask, D in one chunk: every
  // (1, 1) search and cascade first stage): the threshold test runs on the micro-kernel's
  // accumulators (Policy::micro_epilogue), so a candidate that reaches no bar, nearly all of
  // them, is never stored or re-read. Scores are those of the tile path: max(-inf, dot), then 0
  // for a masked query token. A policy that widens its rows (bf16 on the avx512 kernels)
  // converts each group's MR rows once, for every query panel of the block.
  static constexpr bool kFusedTest = NR % 16 == 0 && NR <= 64;

  static void search_fused_test(const IndexProblem& IP, const typename E::QView& qv, typename E::Work& w, Extra& x,
                                TopK& top, int64_t r0, int64_t r1) {
    constexpr int V = NR / 16;  // vectors per tile row
    const Problem& P = IP.p;
    if constexpr (E::kAmxPath) {
      search_fused_test_amx(IP, qv, w, x, top, r0, r1);
      return;
    }
    const int64_t n = qv.n, D = P.d, pe = E::panel_elems(P);
    const uint8_t* qvalid = block_qvalid(IP, qv.a0, n, x.qvalid);
    const float* thr = top.thr + qv.a0;  // group 0
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
    for_candidate_groups(IP, r0, r1, MR, [&](const Cand* cands, int count) {
      const typename E::RowT* rows[MR];
      const T* srcs[MR];
      fused_test_rows(IP, w, cands, count, rows, srcs);
      // The tile's rows handed to epi(r, acc) in the micro-kernel's registers.
      auto panel_rows = [&](int64_t p, auto&& epi) {
        Policy::template micro_epilogue<MR>(rows, qv.pack + p * pe, D, nullptr, false, epi);
      };
      for (int64_t p = 0; p < qv.panels; ++p) {
        const int64_t l0 = p * NR, lanes = min64(NR, n - l0);
        const uint64_t live = lanes >= 64 ? ~uint64_t(0) : (uint64_t(1) << lanes) - 1;
        uint64_t keep = ~uint64_t(0);  // lanes whose query token is valid
        if (qvalid) {
          const __m512i q8 = _mm512_maskz_loadu_epi8(live, qvalid + l0);
          keep = _mm512_test_epi8_mask(q8, q8);
        }
        __m512 bar[V];
        for (int h = 0; h < V; ++h) bar[h] = _mm512_maskz_loadu_ps(__mmask16(live >> (16 * h)), thr + l0 + 16 * h);
        uint64_t hits[MR];
        uint64_t any = 0;
        panel_rows(p, [&](int r, const __m512* acc) {
          __m512 v[V];
          uint64_t h = 0;
#pragma GCC unroll 4
          for (int i = 0; i < V; ++i) {
            v[i] = _mm512_maskz_mov_ps(__mmask16(keep >> (16 * i)), _mm512_max_ps(acc[i], minus_inf));  // dot > -inf ? dot : -inf
            h |= uint64_t(_mm512_mask_cmp_ps_mask(__mmask16(live >> (16 * i)), v[i], bar[i], _CMP_GE_OQ)) << (16 * i);
          }
          if (h)
            for (int i = 0; i < V; ++i) _mm512_storeu_ps(w.tile + r * NR + 16 * i, v[i]);
          hits[r] = h;
          any |= h;
        });
        if (any) offer_panel_hits(top, qv, w.tile, cands, count, hits, l0);
      }
    });
  }

  // search_fused_test on AMX tiles: groups of 16 candidates (one A tile: the rows in place when
  // they are consecutive and D is a multiple of 32, else copied and zero-padded) against up to
  // four 16-query halves at a time (Policy::amx_halves_dot), then the same test as above on the
  // stored tiles, 16 lanes per compare. Scores are bitwise score_candidate_amx's: max(-inf,
  // dot), 0 for a masked query token.
  static void search_fused_test_amx(const IndexProblem& IP, const typename E::QView& qv, typename E::Work& w,
                                    Extra& x, TopK& top, int64_t r0, int64_t r1) {
    if constexpr (E::kAmxPath) {
      const Problem& P = IP.p;
      const int64_t n = qv.n, ks = E::amx_ksteps(P), halves = ceil_div(n, 16);
      const uint8_t* qvalid = block_qvalid(IP, qv.a0, n, x.qvalid);
      const float* thr = top.thr + qv.a0;  // group 0
      const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
      E::amx_pack_view(P, qv, w);
      E::amx_begin(w, kAmxHalves);
      // Half h's B block at k-step 0 (panel h / 2's blocks, amx_tile16's layout); k-step s's
      // is two blocks further per step.
      constexpr int64_t kBlock = Policy::kAmxBlock;
      auto half_b = [&](int64_t h) { return w.amx_b + (h / 2) * E::amx_panel_blocks(P) + (h % 2) * kBlock; };
      for_row_groups(IP, r0, r1, 16, [&](const RowGroup& g) {
        const T* src[16];
        for (int r = 0; r < 16; ++r) src[r] = token_row<T>(IP, *g.seg, g.row(r), 0);
        const uint16_t* a;
        const int64_t a_stride = E::template amx_a_rows<16>(P, src, g.count, w, &a);
        const uint32_t real = (uint32_t(1) << g.count) - 1;  // tile rows that hold a candidate
        for (int64_t h0 = 0; h0 < halves; h0 += 4) {
          const int nh = int(min64(4, halves - h0));
          const uint16_t* b[4];
          for (int i = 0; i < nh; ++i) b[i] = half_b(h0 + i);
          auto run = [&](auto nh_c) {
            constexpr int NH = decltype(nh_c)::value;
            Policy::template amx_halves_dot<NH>(a, a_stride, b, 2 * kBlock, ks);
            Policy::template amx_halves_store<NH>(w.amx_out);
          };
          switch (nh) {
            case 1: run(std::integral_constant<int, 1>{}); break;
            case 2: run(std::integral_constant<int, 2>{}); break;
            case 3: run(std::integral_constant<int, 3>{}); break;
            default: run(std::integral_constant<int, 4>{}); break;
          }
          for (int i = 0; i < nh; ++i) {
            const int64_t l0 = 16 * (h0 + i), lanes = min64(16, n - l0);
            const __mmask16 live = __mmask16((uint32_t(1) << lanes) - 1);
            __mmask16 keep = live;  // lanes whose query token is valid
            if (qvalid) {
              const __m128i q8 = _mm_maskz_loadu_epi8(live, qvalid + l0);
              keep = _mm_test_epi8_mask(q8, q8);
            }
            const __m512 bar = _mm512_maskz_loadu_ps(live, thr + l0);
            const float* tile = w.amx_out + 256 * i;
            for (uint32_t rows = real; rows; rows &= rows - 1) {
              const int r = __builtin_ctz(rows);
              const __m512 v = _mm512_maskz_mov_ps(keep, _mm512_max_ps(_mm512_loadu_ps(tile + 16 * r), minus_inf));
              uint32_t hits = _mm512_mask_cmp_ps_mask(live, v, bar, _CMP_GE_OQ);
              if (!hits) continue;
              alignas(64) float sc[16];
              _mm512_store_ps(sc, v);
              const int64_t row = g.row(r), id = g.seg->ids[row], grow = g.seg->row0 + row;
              for (; hits; hits &= hits - 1) {
                const int l = __builtin_ctz(hits);
                if (sc[l] >= thr[l0 + l]) topk_offer(top, qv.a0 + l0 + l, sc[l], id, grow);  // the bar rises
              }
            }
          }
        }
      });
    }
  }
#elif defined(METAEMBED_INDEX_AVX2)
  // The same fused test on the AVX2 policy's 16-lane tile rows (two ymm per row): lane masks
  // from compares and MOVMSKPS instead of mask registers. A (1, 1) search of 256 queries over
  // 20,000 float32 candidates spent half its time storing and re-reading tiles without it.
  static constexpr bool kFusedTest = NR == 16;

  static void search_fused_test(const IndexProblem& IP, const typename E::QView& qv, typename E::Work& w, Extra& x,
                                TopK& top, int64_t r0, int64_t r1) {
    const Problem& P = IP.p;
    const int64_t n = qv.n, D = P.d, pe = E::panel_elems(P);
    const uint8_t* qvalid = block_qvalid(IP, qv.a0, n, x.qvalid);
    const float* thr = top.thr + qv.a0;  // group 0
    const __m256 minus_inf = _mm256_set1_ps(-INFINITY);
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for_candidate_groups(IP, r0, r1, MR, [&](const Cand* cands, int count) {
      const typename E::RowT* rows[MR];
      const T* srcs[MR];
      fused_test_rows(IP, w, cands, count, rows, srcs);
      for (int64_t p = 0; p < qv.panels; ++p) {
        const int64_t l0 = p * NR, lanes = min64(NR, n - l0);
        const uint64_t live = (uint64_t(1) << lanes) - 1;
        __m256 keep[2], bar[2];  // keep: lanes whose query token is valid (and live)
        for (int h = 0; h < 2; ++h) {
          const __m256i in = _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(lanes - 8 * h)), iota);
          keep[h] = _mm256_castsi256_ps(in);
          bar[h] = _mm256_maskload_ps(thr + l0 + 8 * h, in);  // lanes past n: never loaded
        }
        if (qvalid) {
          alignas(16) uint8_t q8[16] = {};
          std::memcpy(q8, qvalid + l0, size_t(lanes));
          const __m128i qb = _mm_load_si128(reinterpret_cast<const __m128i*>(q8));
          for (int h = 0; h < 2; ++h) {
            const __m256i qi = _mm256_cvtepu8_epi32(h ? _mm_srli_si128(qb, 8) : qb);
            keep[h] = _mm256_and_ps(keep[h], _mm256_castsi256_ps(_mm256_cmpgt_epi32(qi, _mm256_setzero_si256())));
          }
        }
        uint64_t hits[MR];
        uint64_t any = 0;
        Policy::template micro_epilogue<MR>(rows, qv.pack + p * pe, D, nullptr, false, [&](int r, const __m256* acc) {
          __m256 v[2];
          uint64_t h = 0;
          for (int i = 0; i < 2; ++i) {
            v[i] = _mm256_and_ps(_mm256_max_ps(acc[i], minus_inf), keep[i]);  // dot > -inf ? dot : -inf; masked: 0
            h |= uint64_t(_mm256_movemask_ps(_mm256_cmp_ps(v[i], bar[i], _CMP_GE_OQ))) << (8 * i);
          }
          h &= live;
          if (h)
            for (int i = 0; i < 2; ++i) _mm256_storeu_ps(w.tile + r * NR + 8 * i, v[i]);
          hits[r] = h;
          any |= h;
        });
        if (any) offer_panel_hits(top, qv, w.tile, cands, count, hits, l0);
      }
    });
  }
#else
  static constexpr bool kFusedTest = false;
  static void search_fused_test(const IndexProblem&, const typename E::QView&, typename E::Work&, Extra&, TopK&,
                                int64_t, int64_t) {}
#endif

  static bool fused_test_path(const IndexProblem& IP) {
    return kFusedTest && one_token_path(IP.p) && !IP.masked && IP.p.groups.rc_eff == 1 && IP.p.kc >= IP.p.d;
  }

  static void search(const IndexProblem& IP, int64_t qblock, int64_t r0, int64_t r1, void* ws, TopK& top) {
    const Problem& P = IP.p;
    typename E::Work w = E::carve(P, ws);
    const typename E::AmxScope amx_scope{w};
    Extra x = carve_extra(P, ws);
    const typename E::QView qv = E::block_view(P, qblock);
    const Acc* qrows[E::kDotTokens];
    const int nt = E::prepare_query_rows(P, qv, w, qrows);
    if (nt > 0) {  // few query tokens: 16 candidates at a time
      const int64_t D = P.d, nq = P.nq, G = P.groups.num_groups;
      const uint8_t* qvalid = block_qvalid(IP, qv.a0, qv.n, x.qvalid);
      // Token j of a group's 16 candidates (lanes past count repeat the last row).
      auto token_rows = [&](const RowGroup& g, int64_t j, const T** rows) {
        // A group's candidates share one segment: token j of row b is at a fixed stride.
        const T* row0 = token_row<T>(IP, *g.seg, 0, j);
        const int64_t rstride = IP.tok_width[j] * D;
        if (g.consecutive16()) {
          for (int c = 0; c < kFewC; ++c) rows[c] = row0 + (g.b0 + c) * rstride;
        } else {
          for (int c = 0; c < kFewC; ++c) rows[c] = row0 + g.row(c) * rstride;
        }
        if (IP.tok_width[j] > 1) few_token_prefetch(rows, rstride, D);
      };
      // bfloat16 rows where the Ops read them in pair order: the query rows put in it
      // (prepare_query_rows wrote them for this call alone). One query over 200k rows, 2 cores
      // of a Zen 3 (medians of 5 alternating process pairs): (1, 1) 3.47 -> 3.05 ms, (2, 4)
      // 16.1 -> 13.8 ms; at 3-4 tokens no faster (16 accumulators and the decoded halves spill).
      bool pairs = false;
      if constexpr (std::is_same_v<T, bf16_t> && ops_pair_order<Ops>()) {
        pairs = D % 16 == 0 && nt <= 2;
        if (pairs)
          for (int t = 0; t < nt; ++t) Ops::to_pair_order(const_cast<Acc*>(qrows[t]), D);
      }
      // sims[t][c] = <rows[c], q_t> for the 16 rows
      auto dots16 = [&](const T* const* rows, float (*sims)[kFewC]) {
        if constexpr (std::is_same_v<Ops, UseEngineDots>) {
          for (int c = 0; c < kFewC; ++c)
            for (int t = 0; t < nt; ++t) sims[t][c] = few_dot(rows[c], qrows[t], D);
        } else if constexpr (std::is_same_v<T, bf16_t> && ops_pair_order<Ops>()) {
          if (pairs) Ops::dots16_pairs(rows, qrows, nt, D, &sims[0][0]);
          else Ops::dots16(rows, qrows, nt, D, &sims[0][0]);
        } else {
          Ops::dots16(rows, qrows, nt, D, &sims[0][0]);
        }
      };
#if defined(METAEMBED_INDEX_LANES16)
      if constexpr (!std::is_same_v<Ops, UseEngineDots>) {
        // One group and no candidate mask (a single-budget search): the few-token scan with
        // the running maxima in registers. Same arithmetic as few_token_scan: per token, the
        // max over j of the dot products from -inf; a query's score = 0 + its valid tokens'
        // maxima in order.
        if (G == 1 && !IP.masked) {
          const int64_t grq = P.groups.rq[0], rq = P.groups.rq_eff, rc = P.groups.rc_eff;
          for_row_groups(IP, r0, r1, kFewC, [&](const RowGroup& g) {
            alignas(64) float sims[kFewT][kFewC];
            Lanes16 run[kFewT];
            for (int t = 0; t < nt; ++t) run[t] = Lanes16::set1(-INFINITY);
            for (int64_t j = 0; j < rc; ++j) {
              const T* rows[kFewC];
              token_rows(g, j, rows);
              dots16(rows, sims);
              for (int t = 0; t < nt; ++t) run[t] = max(Lanes16::load(sims[t]), run[t]);  // s > run ? s : run
            }
            const uint32_t real = (1u << g.count) - 1;
            for (int64_t al = 0; al < qv.n; ++al) {
              Lanes16 a = Lanes16::set1(0.f);
              for (int64_t i = 0; i < grq; ++i)
                if (!qvalid || qvalid[al * rq + i]) a = a + run[al * rq + i];
              const int64_t xi = qv.a0 + al;
              uint32_t hits = a.reaching(top.thr[xi], real);
              if (!hits) continue;
              alignas(64) float sc[kFewC];
              a.store(sc);
              for (; hits; hits &= hits - 1) {
                const int c = __builtin_ctz(hits);
                const int64_t b = g.row(c);
                if (sc[c] >= top.thr[xi])  // the bar rises as the top k fills
                  topk_offer(top, xi, sc[c], g.seg->ids[b], g.seg->row0 + b);
              }
            }
          });
          return;
        }
      }
#endif
      few_token_scan(
          IP, qv.n, nt, qvalid, r0, r1, x.few,
          [&](const Cand* cands, int count, int64_t j, float (*sims)[kFewC]) {
            const T* rows[kFewC];
            token_rows(RowGroup{cands[0].seg, cands[0].b, cands, count}, j, rows);
            dots16(rows, sims);
          },
          [&](const Cand* cands, int count, const float* sc) {
            for (int64_t g = 0; g < G; ++g)
              for (int64_t al = 0; al < qv.n; ++al) {
                const float* s = sc + (g * qv.n + al) * kFewC;
                const int64_t xi = g * nq + qv.a0 + al;
                uint32_t hits = lanes_reaching16(s, top.thr[xi]) & ((uint32_t(1) << count) - 1);
                for (int c = 0; hits; ++c, hits >>= 1)
                  if ((hits & 1) && s[c] >= top.thr[xi])  // the bar rises as the top k fills
                    topk_offer(top, xi, s[c], cands[c].seg->ids[cands[c].b], cands[c].seg->row0 + cands[c].b);
              }
          });
      return;
    }
    if constexpr (kFusedTest) {
      if (fused_test_path(IP)) {
        search_fused_test(IP, qv, w, x, top, r0, r1);
        return;
      }
    }
    if (one_token_path(P)) {
      search_one_token(IP, qv, w, x, top, r0, r1);
      return;
    }
    scan(IP, qv, w, x, [&](int m, auto&& fn) { for_candidate_groups(IP, r0, r1, m, fn); },
         [&](const Cand& c, const float* scores) {
           offer_scores(top, IP, qv.a0, qv.n, scores, c.seg->ids[c.b], c.seg->row0 + c.b);
         });
  }

  static void score_rows(const IndexProblem& IP, const int64_t* rows, int64_t K, int64_t a0, int64_t a1, int64_t x0,
                         int64_t x1, void* ws, float* out) {
    const Problem& P = IP.p;
    typename E::Work w = E::carve(P, ws);
    const typename E::AmxScope amx_scope{w};
    Extra x = carve_extra(P, ws);
    const int64_t G = P.groups.num_groups;
    for (int64_t a = a0; a < a1; ++a) {
      E::pack_range(P, a, 1, w.qpack1);
      const typename E::QView qv{w.qpack1, a, 1, ceil_div(P.groups.rq_eff, NR)};
      int64_t xk = 0;
      scan(IP, qv, w, x,
           [&](int, auto&& fn) {
             for (int64_t xx = x0; xx < x1; ++xx) {
               Cand c;
               if (candidate_of_row(IP, rows[a * K + xx], c)) {
                 xk = xx;
                 fn(&c, 1);
               }
             }
           },
           [&](const Cand&, const float* scores) {
             for (int64_t g = 0; g < G; ++g) out[(g * P.nq + a) * K + xk] = scores[g];
           });
    }
  }

  static IndexKernelSet kernel_set() {
    IndexKernelSet s;
    s.nr = NR;
    s.mr = MR;
    s.pack_elem_bytes = int(sizeof(typename E::PackT));
    s.int8_offset = 0;
    s.workspace_bytes = &workspace_bytes;
    s.qpack_bytes = &qpack_bytes;
    s.pack_queries = &pack_queries;
    s.search = &search;
    s.score_rows = &score_rows;
    return s;
  }
};

// ---- int8 index: integer scan, exact rescoring of the candidates that can enter ------------

// The (scale, norm) pairs of 16 consecutive rows' token, `stride` floats apart (2 * the slab's
// vectors per row), deinterleaved: scale[c] = sn[c * stride], norm[c] = sn[c * stride + 1].
inline void scale_norm16(const float* sn, int64_t stride, float* scale, float* norm) {
#if defined(METAEMBED_INDEX_ZMM)
  if (stride == 2) {  // one vector per row: 32 contiguous floats
    const __m512 lo = _mm512_loadu_ps(sn), hi = _mm512_loadu_ps(sn + 16);
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    _mm512_store_ps(scale, _mm512_permutex2var_ps(lo, even, hi));
    _mm512_store_ps(norm, _mm512_permutex2var_ps(lo, _mm512_add_epi32(even, _mm512_set1_epi32(1)), hi));
    return;
  }
  const __m512i at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                        _mm512_set1_epi32(int32_t(stride)));
  _mm512_store_ps(scale, _mm512_i32gather_ps(at, sn, 4));
  _mm512_store_ps(norm, _mm512_i32gather_ps(at, sn + 1, 4));
#else
#if defined(METAEMBED_INDEX_AVX2)
  if (stride == 2) {  // 8 rows at a time: even floats (scales) and odd ones (norms), then in order
    for (int h = 0; h < 2; ++h) {
      const __m256 a = _mm256_loadu_ps(sn + 16 * h), b = _mm256_loadu_ps(sn + 16 * h + 8);
      auto in_order = [](__m256 v) {  // [0 1 4 5 | 2 3 6 7] -> [0 .. 7]
        return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), 0xD8));
      };
      _mm256_store_ps(scale + 8 * h, in_order(_mm256_shuffle_ps(a, b, 0x88)));
      _mm256_store_ps(norm + 8 * h, in_order(_mm256_shuffle_ps(a, b, 0xDD)));
    }
    return;
  }
#endif
  for (int c = 0; c < 16; ++c) {
    scale[c] = sn[c * stride];
    norm[c] = sn[c * stride + 1];
  }
#endif
}

// Per query token t = a * rq_eff + i, computed by the host glue (index_ops.cpp).
struct QInfo {
  float scale;   // sq_t
  float err;     // err_t: the bound per unit N_max (see the file comment)
  int32_t corr;  // what the integer kernels add to <y_t, x>: Ops::kOffset * sum_d y_td
  float unused;
};

// The rows an integer micro-kernel reads in groups of 4 bytes: the stored rows in place when D
// is a multiple of 4 (the last group ends at D), else copies zero-padded to dpad bytes.
inline void int8_tile_rows(const int8_t* const* src, int M, int64_t D, int8_t* scratch, int64_t dpad,
                           const int8_t** rows) {
  for (int r = 0; r < M; ++r) {
    if (D % 4 == 0) {
      rows[r] = src[r];
      continue;
    }
    int8_t* dst = scratch + r * dpad;
    std::memcpy(dst, src[r], size_t(D));
    std::memset(dst + D, 0, size_t(dpad - D));
    rows[r] = dst;
  }
}

// Ops: NR lanes and MR rows of the integer micro-kernel; kOffset (128 when the kernels bias
// candidate bytes to unsigned, else 0); micro(M, rows (int8_tile_rows), panel, groups of 4
// dims, int32 tile [M][NR]); dots for few tokens. Query panels are [ceil(D/4)][NR][4] int8.
template <class Ops>
struct Int8Scan {
  static constexpr int NR = Ops::NR;
  static constexpr int MR = Ops::MR;
  static constexpr int kDotTokens = 4;
  static constexpr int kDotWidth = 16;  // partial sums of the exact dots (vectorised by lane)

  static int64_t groups4(int64_t d) { return (d + 3) / 4; }
  static int64_t dpad(int64_t d) { return (d + 63) / 64 * 64; }
  static int64_t panel_bytes(const Problem& P) { return groups4(P.d) * 4 * NR; }
  static int64_t max_panels(const Problem& P) { return max64(P.panels_per_block, ceil_div(P.groups.rq_eff, NR)); }

  struct Work {
    int32_t* itile;       // [panels][MR][NR]
    float* tile;          // [panels][MR][NR] approximate similarities
    float* runmax;        // [lanes]
    float* bmax;          // [nb][lanes]
    uint8_t* bvalid;      // [nb]
    float* scores;        // [G][qpb] approximate
    float* err_sum;       // [G][qpb] sum of err_t over each group's valid tokens
    float* exact;         // [G]
    int8_t* xrows;        // [MR][dpad] padded candidate rows (D not a multiple of 4)
    int8_t* qrows8;       // [kDotTokens][dpad] few-token query rows
    float* lane_scale;    // [lanes] sq per lane
    int32_t* lane_corr;   // [lanes]
    uint8_t* qvalid;      // [qpb * rq_eff]
    float* exact_max;     // [nb][rq_eff]
    float* vbuf;          // [dpad] one dequantised row
    FewBuffers few;
  };

  static size_t workspace_bytes(const IndexProblem& IP) {
    const Problem& P = IP.p;
    const int64_t np = max_panels(P), lanes = np * NR, nb = P.groups.num_bounds, G = P.groups.num_groups;
    const int64_t qpb = P.queries_per_block, rq = P.groups.rq_eff;
    size_t n = 0;
    n += align64(sizeof(int32_t) * np * MR * NR) + align64(sizeof(float) * np * MR * NR);
    n += align64(sizeof(float) * lanes) + align64(sizeof(float) * nb * lanes) + align64(nb);
    n += 2 * align64(sizeof(float) * qpb * G) + align64(sizeof(float) * G);
    n += align64(MR * dpad(P.d)) + align64(kDotTokens * dpad(P.d));
    n += align64(sizeof(float) * lanes) + align64(sizeof(int32_t) * lanes) + align64(qpb * rq);
    n += align64(sizeof(float) * rq * nb) + align64(sizeof(float) * dpad(P.d)) + FewBuffers::bytes(P);
    return n + 64;
  }

  static Work carve(const Problem& P, void* ws) {
    const int64_t np = max_panels(P), lanes = np * NR, nb = P.groups.num_bounds, G = P.groups.num_groups;
    const int64_t qpb = P.queries_per_block, rq = P.groups.rq_eff;
    uintptr_t p = (reinterpret_cast<uintptr_t>(ws) + 63) & ~uintptr_t(63);
    auto take = [&p](size_t bytes) {
      void* r = reinterpret_cast<void*>(p);
      p += align64(bytes);
      return r;
    };
    Work w;
    w.itile = static_cast<int32_t*>(take(sizeof(int32_t) * np * MR * NR));
    w.tile = static_cast<float*>(take(sizeof(float) * np * MR * NR));
    w.runmax = static_cast<float*>(take(sizeof(float) * lanes));
    w.bmax = static_cast<float*>(take(sizeof(float) * nb * lanes));
    w.bvalid = static_cast<uint8_t*>(take(nb));
    w.scores = static_cast<float*>(take(sizeof(float) * qpb * G));
    w.err_sum = static_cast<float*>(take(sizeof(float) * qpb * G));
    w.exact = static_cast<float*>(take(sizeof(float) * G));
    w.xrows = static_cast<int8_t*>(take(MR * dpad(P.d)));
    w.qrows8 = static_cast<int8_t*>(take(kDotTokens * dpad(P.d)));
    w.lane_scale = static_cast<float*>(take(sizeof(float) * lanes));
    w.lane_corr = static_cast<int32_t*>(take(sizeof(int32_t) * lanes));
    w.qvalid = static_cast<uint8_t*>(take(qpb * rq));
    w.exact_max = static_cast<float*>(take(sizeof(float) * rq * nb));
    w.vbuf = static_cast<float*>(take(sizeof(float) * dpad(P.d)));
    w.few = FewBuffers::carve(P, take(FewBuffers::bytes(P)));
    return w;
  }

  static size_t qpack_bytes(const IndexProblem& IP) {
    const Problem& P = IP.p;
    return size_t(P.num_qblocks) * P.panels_per_block * panel_bytes(P);
  }

  static const QInfo* qinfo(const IndexProblem& IP) { return static_cast<const QInfo*>(IP.qinfo); }
  static const int8_t* qy_row(const IndexProblem& IP, int64_t a, int64_t i) {
    return IP.qy + (a * IP.p.groups.rq_eff + i) * IP.p.d;
  }
  static const int8_t* block_pack(const IndexProblem& IP, int64_t qblock) {
    return static_cast<const int8_t*>(IP.p.qpack) + qblock * IP.p.panels_per_block * panel_bytes(IP.p);
  }

  static void pack_queries(const IndexProblem& IP, int64_t qblock) {
    const Problem& P = IP.p;
    const int64_t a0 = qblock * P.queries_per_block, n = min64(P.queries_per_block, P.nq - a0);
    const int64_t rq = P.groups.rq_eff, ntok = n * rq, pb = panel_bytes(P);
    int8_t* dst = const_cast<int8_t*>(block_pack(IP, qblock));
    std::memset(dst, 0, size_t(ceil_div(ntok, NR) * pb));
    for (int64_t t = 0; t < ntok; ++t) {
      const int8_t* y = qy_row(IP, a0 + t / rq, t % rq);
      int8_t* panel = dst + (t / NR) * pb + (t % NR) * 4;
      for (int64_t d = 0; d < P.d; ++d) panel[(d / 4) * 4 * NR + (d & 3)] = y[d];
    }
  }

  // <a, b> over n floats with kDotWidth independent partial sums (vectorised by lane).
  static float dot(const float* a, const float* b, int64_t n) {
    float part[kDotWidth] = {};
    int64_t d = 0;
    for (; d + kDotWidth <= n; d += kDotWidth)
      for (int l = 0; l < kDotWidth; ++l) part[l] += a[d + l] * b[d + l];
    float sum = 0;
    for (int l = 0; l < kDotWidth; ++l) sum += part[l];
    for (; d < n; ++d) sum += a[d] * b[d];
    return sum;
  }

  // m[i] = max(m[i], dot(q_i, v, D)) for the valid query tokens i0 <= i < i1 of query a.
  static void token_maxima_by_dot(const Problem& P, int64_t a, int64_t i0, int64_t i1, const float* v, float* m) {
    const float* q = static_cast<const float*>(P.q.data) + a * P.q.s0;
    for (int64_t i = i0; i < i1; ++i) {
      if (P.q.mask && !P.q.mask[a * P.q.m0 + i * P.q.m1]) continue;
      const float x = dot(q + i * P.q.s1, v, P.d);
      m[i] = x > m[i] ? x : m[i];
    }
  }

#if defined(METAEMBED_INDEX_ZMM)
  // The same for i < rq_used, 16 tokens at a time, bitwise dot()'s values: lane l of token i's
  // accumulator is dot()'s part[l] (the same products and sums, each rounded: this file
  // compiles without FP contraction, -std=c++20), a transpose puts the 16 tokens' lane l in one
  // register, and the lanes are summed in dot()'s order from +0, then the tail past the last
  // full 16 elements element by element. One pass over v for 16 tokens, where dot() is a
  // latency-bound chain and a horizontal sum per token (an int8 cascade to (16, 64) with 16
  // queries, whose rerank is this, ran 1.5x faster end to end). Below 8 tokens the transpose
  // costs more than it saves: dot().
  static void token_maxima(const Problem& P, int64_t a, int64_t rq_used, const float* v, float* m) {
    static_assert(kDotWidth == 16, "lane l of a 16-lane accumulator is dot()'s part[l]");
    const int64_t D = P.d, D16 = D / kDotWidth * kDotWidth;
    const float* q = static_cast<const float*>(P.q.data) + a * P.q.s0;
    for (int64_t i0 = 0; i0 < rq_used; i0 += 16) {
      const int nl = int(min64(16, rq_used - i0));
      if (nl < 8) return token_maxima_by_dot(P, a, i0, rq_used, v, m);
      const float* qi[16];
      for (int l = 0; l < 16; ++l) qi[l] = q + (i0 + (l < nl ? l : 0)) * P.q.s1;  // lanes >= nl: unused
      __m512 acc[16];
#pragma GCC unroll 16
      for (int l = 0; l < 16; ++l) acc[l] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D16; d += 16) {
        const __m512 vd = _mm512_loadu_ps(v + d);
#pragma GCC unroll 16
        for (int l = 0; l < 16; ++l) acc[l] = _mm512_add_ps(acc[l], _mm512_mul_ps(_mm512_loadu_ps(qi[l] + d), vd));
      }
      transpose16x16(acc);  // acc[e] lane l = part[e] of token i0 + l
      __m512 sum = _mm512_setzero_ps();
#pragma GCC unroll 16
      for (int e = 0; e < 16; ++e) sum = _mm512_add_ps(sum, acc[e]);
      alignas(64) float sums[16];
      _mm512_store_ps(sums, sum);
      for (int l = 0; l < nl; ++l) {
        const int64_t i = i0 + l;
        if (P.q.mask && !P.q.mask[a * P.q.m0 + i * P.q.m1]) continue;
        float x = sums[l];
        for (int64_t d = D16; d < D; ++d) x += qi[l][d] * v[d];
        m[i] = x > m[i] ? x : m[i];
      }
    }
  }
#endif

  // The one-group bar test's rescores: each lane l set in hits (query a + l, bar thr[l]) whose
  // upper bound us[l] still reaches its bar -- bars rise as the top k fills, so an earlier
  // lane's offer can lift a later one's -- gets c's exact score offered to its top k.
  static void rescore_hits(const IndexProblem& IP, TopK& top, int64_t a, const float* thr, uint32_t hits,
                           const float* us, const Cand& c, Work& w) {
    const int64_t id = c.seg->ids[c.b], row = c.seg->row0 + c.b;
    for (; hits; hits &= hits - 1) {
      const int l = __builtin_ctz(hits);
      if (us[l] < thr[l]) continue;
      exact_scores(IP, a + l, c, w, w.exact);
      if (w.exact[0] >= thr[l]) topk_offer(top, a + l, w.exact[0], id, row);
    }
  }

  // Exact scores of query a against candidate c: float32 dots of q with the dequantised
  // vectors x_jd * s_j, out[g] for the groups with r_q <= rq_lim and r_c <= rc_lim (every group
  // by default; the others are not computed, out[g] left as is). A
  // rescore that only small budgets' bars asked for (search_grouped) then reads and multiplies
  // only their prefix, not the largest budget's; the values are those of a full computation.
  static void exact_scores(const IndexProblem& IP, int64_t a, const Cand& c, Work& w, float* out,
                           int64_t rq_lim = INT64_MAX, int64_t rc_lim = INT64_MAX) {
    const Problem& P = IP.p;
    const int64_t D = P.d, rq = P.groups.rq_eff, nb = P.groups.num_bounds;
    const int64_t rq_used = min64(rq, rq_lim), rc = min64(P.groups.rc_eff, rc_lim);
    for (int64_t x = 0; x < rq; ++x) w.exact_max[x] = -INFINITY;
    bool any = false;
    int64_t kb = 0;
    float* m = w.exact_max;  // the running max, snapshotted at bound k into row k
    for (int64_t j = 0; j < rc; ++j) {
      if (token_valid(IP, *c.seg, c.b, j)) {
        any = true;
        const int8_t* xr = token_row<int8_t>(IP, *c.seg, c.b, j);
        const float s = token_scale(IP, *c.seg, c.b, j)[0];
        for (int64_t d = 0; d < D; ++d) w.vbuf[d] = float(xr[d]) * s;  // the dequantised vector
#if defined(METAEMBED_INDEX_ZMM)
        token_maxima(P, a, rq_used, w.vbuf, m);
#else
        token_maxima_by_dot(P, a, 0, rq_used, w.vbuf, m);
#endif
      }
      if (j + 1 == P.groups.bounds[kb]) {
        w.bvalid[kb] = any;
        if (kb + 1 < nb) {
          std::memcpy(m + rq, m, sizeof(float) * rq);
          m += rq;
        }
        ++kb;
      }
    }
    for (int64_t g = 0; g < P.groups.num_groups; ++g) {
      if (!P.groups.within(g, rq_lim, rc_lim)) continue;
      const int64_t k = P.groups.bound_index[g];
      float sum = 0;
      if (w.bvalid[k])
        for (int64_t i = 0; i < P.groups.rq[g]; ++i)
          if (!P.q.mask || P.q.mask[a * P.q.m0 + i * P.q.m1]) sum += w.exact_max[k * rq + i];
      out[g] = sum;
    }
  }

  static void search(const IndexProblem& IP, int64_t qblock, int64_t r0, int64_t r1, void* ws, TopK& top) {
    const Problem& P = IP.p;
    Work w = carve(P, ws);
    const int64_t a0 = qblock * P.queries_per_block, n = min64(P.queries_per_block, P.nq - a0);
    const int64_t rq = P.groups.rq_eff, rc = P.groups.rc_eff, ntok = n * rq, G = P.groups.num_groups;
    const int64_t D = P.d, g4 = groups4(D), pb = panel_bytes(P), nq = P.nq;
    const int nt = ntok <= kDotTokens ? int(ntok) : 0;
    const int64_t panels = nt ? 1 : ceil_div(ntok, NR), lanes = panels * NR;
    const QInfo* info = qinfo(IP);
    for (int64_t t = 0; t < lanes; ++t) {
      w.lane_scale[t] = t < ntok ? info[a0 * rq + t].scale : 0.f;
      w.lane_corr[t] = t < ntok ? info[a0 * rq + t].corr : 0;
    }
    const uint8_t* qvalid = block_qvalid(IP, a0, n, w.qvalid);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t al = 0; al < n; ++al) {
        float e = 0;
        for (int64_t i = 0; i < P.groups.rq[g]; ++i)
          if (!qvalid || qvalid[al * rq + i]) e += info[(a0 + al) * rq + i].err;
        w.err_sum[g * n + al] = e * (1 + 0x1p-16f);
      }
    if (nt) {  // few query tokens: 16 candidates at a time
      for (int t = 0; t < nt; ++t) {
        const int8_t* y = qy_row(IP, a0 + t / rq, t % rq);
        for (int64_t d = 0; d < dpad(D); ++d) w.qrows8[t * dpad(D) + d] = d < D ? y[d] : 0;
      }
      const float* lscale = w.lane_scale;
      const int32_t* lcorr = w.lane_corr;
      // Token j of a group's 16 candidates (lanes past count repeat the last): the integer dots
      // it[t][c] with the query tokens, the rows' scales and norms.
      auto token_dots = [&](const RowGroup& g, int64_t j, int32_t (*it)[kFewC], float* scl, float* nrm) {
        // A group's candidates share one segment: token j of row b is at a fixed stride.
        const int8_t* rows = token_row<int8_t>(IP, *g.seg, 0, j);
        const float* sn = token_scale(IP, *g.seg, 0, j);  // (scale, norm) pairs
        const int64_t rstride = IP.tok_width[j] * D, sstride = 2 * IP.tok_width[j];
        const int8_t* src[kFewC];
        const int64_t b0 = g.b0;
        if (g.consecutive16()) {
          for (int c = 0; c < kFewC; ++c) src[c] = rows + (b0 + c) * rstride;
          scale_norm16(sn + b0 * sstride, sstride, scl, nrm);
        } else {
          for (int c = 0; c < kFewC; ++c) {
            const int64_t b = g.row(c);
            src[c] = rows + b * rstride;
            scl[c] = sn[b * sstride];
            nrm[c] = sn[b * sstride + 1];
          }
        }
        if (IP.tok_width[j] > 1) few_token_prefetch(src, rstride, D);
        Ops::dots(src, w.qrows8, dpad(D), nt, D, &it[0][0]);
      };
      // Rescore candidate c for query al when its bound reaches the bar of some group.
      auto rescore = [&](int64_t al, const Cand& c) {
        exact_scores(IP, a0 + al, c, w, w.exact);
        const int64_t id = c.seg->ids[c.b], row = c.seg->row0 + c.b;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t xi = g * nq + a0 + al;
          if (w.exact[g] >= top.thr[xi]) topk_offer(top, xi, w.exact[g], id, row);
        }
      };
#if defined(METAEMBED_INDEX_LANES16)
      // One group and no candidate mask (a single-budget search): the few-token scan with every
      // running value in registers. Same arithmetic as few_token_scan below: per token, the max
      // over j of float(it - corr) * (sq * s_j) from -inf; a query's A = 0 + its valid tokens'
      // maxima in order; bound A + N_max * err.
      if (G == 1 && !IP.masked) {
        const int64_t grq = P.groups.rq[0];
        for_row_groups(IP, r0, r1, kFewC, [&](const RowGroup& g) {
          alignas(64) int32_t it[kFewT][kFewC];
          alignas(64) float scl[kFewC], nrm[kFewC];
          Lanes16 run[kFewT], vnmax = Lanes16::set1(0.f);
          for (int t = 0; t < nt; ++t) run[t] = Lanes16::set1(-INFINITY);
          for (int64_t j = 0; j < rc; ++j) {
            token_dots(g, j, it, scl, nrm);
            const Lanes16 vs = Lanes16::load(scl);
            vnmax = max(Lanes16::load(nrm), vnmax);
            for (int t = 0; t < nt; ++t) {
              const Lanes16 a = Lanes16::from_i32(it[t], lcorr[t]) * (Lanes16::set1(lscale[t]) * vs);
              run[t] = max(a, run[t]);  // a > run ? a : run
            }
          }
          const uint32_t real = (1u << g.count) - 1;
          for (int64_t al = 0; al < n; ++al) {
            Lanes16 a = Lanes16::set1(0.f);
            for (int64_t i = 0; i < grq; ++i)
              if (!qvalid || qvalid[al * rq + i]) a = a + run[al * rq + i];
            const Lanes16 ub = a + vnmax * Lanes16::set1(w.err_sum[al]);
            uint32_t hits = ub.reaching(top.thr[a0 + al], real);
            if (!hits) continue;
            alignas(64) float u[kFewC];
            ub.store(u);
            for (; hits; hits &= hits - 1) {
              const int c = __builtin_ctz(hits);
              if (u[c] >= top.thr[a0 + al]) rescore(al, g.cand(c));  // the bar rises as the top k fills
            }
          }
        });
        return;
      }
#endif
      alignas(64) float nmax[kFewC];  // per candidate: the largest norm of its first r_c vectors
      few_token_scan(
          IP, n, nt, qvalid, r0, r1, w.few,
          [&](const Cand* cands, int count, int64_t j, float (*sims)[kFewC]) {
            alignas(64) int32_t it[kFewT][kFewC];
            alignas(64) float scl[kFewC], nrm[kFewC];
            token_dots(RowGroup{cands[0].seg, cands[0].b, cands, count}, j, it, scl, nrm);
            for (int c = 0; c < kFewC; ++c) nmax[c] = j == 0 || nrm[c] > nmax[c] ? nrm[c] : nmax[c];
            for (int t = 0; t < nt; ++t)
              for (int c = 0; c < kFewC; ++c) sims[t][c] = float(it[t][c] - lcorr[t]) * (lscale[t] * scl[c]);
          },
          [&](const Cand* cands, int count, const float* sc) {
            // candidates whose upper bound (approximate score + scale-weighted error) reaches
            // the bar of some group, per query: bit c of need[al]
            uint32_t need[kFewT] = {}, any = 0;
            const uint32_t real = (uint32_t(1) << count) - 1;
            for (int64_t g = 0; g < G; ++g)
              for (int64_t al = 0; al < n; ++al) {
                const float* s = sc + (g * n + al) * kFewC;
                const float e = w.err_sum[g * n + al];
                alignas(64) float bound[kFewC];
                for (int c = 0; c < kFewC; ++c) bound[c] = s[c] + nmax[c] * e;
                const uint32_t h = lanes_reaching16(bound, top.thr[g * nq + a0 + al]) & real;
                need[al] |= h;
                any |= h;
              }
            if (!any) return;
            for (int64_t al = 0; al < n; ++al)
              for (int c = 0; c < count; ++c)
                if ((need[al] >> c) & 1) rescore(al, cands[c]);
          });
      return;
    }
    const int8_t* qpack = block_pack(IP, qblock);
    const int m = tile_candidates(rc, MR);
    BlockFold<NR, MR> f{IP, a0, n, panels, lanes, NR, lanes, qvalid, w.runmax, w.bmax, w.bvalid, w.scores};

    // Integer tile for tokens [j0, j0 + per) of candidates cands[0, count) -> approximate
    // similarities in w.tile (rows r = ci * per + jj).
    float scl[MR], nrm[MR];  // the tile rows' scales and norms
    auto run_tile = [&](const Cand* cands, int count, int64_t j0, int per, bool to_float = true) {
      const int M = m * per;
      const int8_t* src[MR];
      const IndexSegment& seg = *cands[0].seg;  // a group's candidates share one segment
      for (int jj = 0; jj < per; ++jj) {        // token j of row b is at a fixed stride
        const int64_t j = j0 + jj, rs = IP.tok_width[j] * D, ss = 2 * IP.tok_width[j];
        const int8_t* base = token_row<int8_t>(IP, seg, 0, j);
        const float* sn = token_scale(IP, seg, 0, j);
        for (int ci = 0; ci < count; ++ci) {
          const int64_t b = cands[ci].b;
          src[ci * per + jj] = base + b * rs;
          scl[ci * per + jj] = sn[b * ss];
          nrm[ci * per + jj] = sn[b * ss + 1];
        }
      }
      // The next tile's rows (those of the next `count` candidates, where rows are consecutive),
      // into L2: the micro-kernel reads rows in place (about 5% at (1, 1), 16 queries).
      for (int r = 0; r < count * per; ++r) {
        const int8_t* next = src[r] + int64_t(count) * IP.tok_width[j0 + r % per] * D;
        for (int64_t d = 0; d < D; d += 64) __builtin_prefetch(next + d, 0, 1);
      }
      for (int r = count * per; r < M; ++r) {
        src[r] = src[count * per - 1];
        scl[r] = scl[count * per - 1];
      }
      const int8_t* rows[MR];
      int8_tile_rows(src, count * per, D, w.xrows, dpad(D), rows);
      for (int rr = count * per; rr < MR; ++rr) rows[rr] = rows[count * per - 1];
      for (int64_t p = 0; p < panels; ++p) Ops::micro(M, rows, qpack + p * pb, g4, w.itile + p * MR * NR);
      if (!to_float) return;
      for (int64_t p = 0; p < panels; ++p)
        for (int rr = 0; rr < count * per; ++rr) {
          const int32_t* it = w.itile + (p * MR + rr) * NR;
          float* ft = w.tile + (p * MR + rr) * NR;
          const float* ls = w.lane_scale + p * NR;
          const int32_t* lc = w.lane_corr + p * NR;
          for (int l = 0; l < NR; ++l) ft[l] = float(it[l] - lc[l]) * (ls[l] * scl[rr]);
        }
    };

    // Approximate scores are in w.scores: rescore exactly where A + Bound reaches a bar. The
    // upper bounds replace the scores in place (computed once, so the early-out and the
    // per-query decision see the same values); bars are compared 16 queries at a time.
    auto finish = [&](const Cand& c) {
      float nmax = 0;
      for (int64_t j = 0; j < rc; ++j) nmax = std::max(nmax, token_scale(IP, *c.seg, c.b, j)[1]);
      float* ub = w.scores;
      for (int64_t x = 0; x < G * n; ++x) ub[x] += nmax * w.err_sum[x];
      bool any = false;
      for (int64_t g = 0; g < G && !any; ++g) {
        const float* u = ub + g * n;
        const float* thr = top.thr + g * nq + a0;
        int64_t al = 0;
        for (; al + 16 <= n && !any; al += 16) any = lanes_reaching16(u + al, thr + al) != 0;
        for (; al < n && !any; ++al) any = u[al] >= thr[al];
      }
      if (!any) return;
      const int64_t id = c.seg->ids[c.b], row = c.seg->row0 + c.b;
      for (int64_t al = 0; al < n; ++al) {
        // the groups whose bound reaches their bar: only their prefix is rescored (a group
        // below its bar has exact <= bound < bar, so it could not enter its top k anyway)
        int64_t rq_lim = 0, rc_lim = 0;
        for (int64_t g = 0; g < G; ++g)
          if (ub[g * n + al] >= top.thr[g * nq + a0 + al]) {
            rq_lim = max64(rq_lim, P.groups.rq[g]);
            rc_lim = max64(rc_lim, P.groups.rc(g));
          }
        if (rc_lim == 0) continue;
        exact_scores(IP, a0 + al, c, w, w.exact, rq_lim, rc_lim);
        for (int64_t g = 0; g < G; ++g) {
          const int64_t xi = g * nq + a0 + al;
          if (!P.groups.within(g, rq_lim, rc_lim)) continue;
          if (w.exact[g] >= top.thr[xi]) topk_offer(top, xi, w.exact[g], id, row);
        }
      }
    };

#if defined(METAEMBED_INDEX_ZMM)
    // One group and r_c <= MR (a candidate's rows fit one tile: every single-budget search up
    // to r_c = MR): the approximate scores, their upper bounds and the bar test come straight
    // from the integer tile, 16 lanes at a time, without the float tile or BlockFold's passes.
    // Same arithmetic as that path: per query token, A_t = max over the valid rows of
    // float(it - corr) * (sq * s_j), folded from -inf; a query's A = the sum of its valid
    // tokens' A_t in order (0 without a valid row); bound A + N_max * err.
    if constexpr (NR % 16 == 0) {
      if (G == 1 && rc <= MR) {
        const float* thr = top.thr + a0;  // group 0
        const int64_t grq = P.groups.rq[0];
        float* tmax = w.runmax;  // [lanes] A_t (r_q > 1)
        // The approximate similarities of tile row r's 16 lanes at `it`: float(it - corr) * (sq * s_r).
        auto approx16 = [&](const int32_t* it, __m512i corr, __m512 lscale, int r) {
          return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_loadu_si512(it), corr)),
                               _mm512_mul_ps(lscale, _mm512_set1_ps(scl[r])));
        };
        if (rq == 1 && n <= 16 && !IP.masked) {
          // Up to 16 one-token queries (lanes 0..15 of panel 0), every row valid: the lanes'
          // constants and the bars stay in registers across the candidates (bars reloaded
          // after a rescore, as they only rise).
          const __mmask16 live = __mmask16((1u << n) - 1);
          const __m512i corr = _mm512_loadu_si512(w.lane_corr);
          const __m512 lscale = _mm512_loadu_ps(w.lane_scale), err = _mm512_maskz_loadu_ps(live, w.err_sum);
          const __mmask16 qmask = valid_tokens16(qvalid, 0, live);
          for_candidate_groups(IP, r0, r1, m, [&](const Cand* cands, int count) {
            run_tile(cands, count, 0, int(rc), /*to_float=*/false);
            __m512 bar = _mm512_maskz_loadu_ps(live, thr);
            for (int c = 0; c < count; ++c) {
              float nmax = 0;
              __m512 v = _mm512_set1_ps(-INFINITY);
              for (int j = 0; j < int(rc); ++j) {
                const int r = c * int(rc) + j;
                nmax = std::max(nmax, nrm[r]);
                v = _mm512_max_ps(approx16(w.itile + r * NR, corr, lscale, r), v);  // a > v ? a : v
              }
              const __m512 u = _mm512_add_ps(_mm512_maskz_mov_ps(qmask, v), _mm512_mul_ps(_mm512_set1_ps(nmax), err));
              uint32_t hits = _mm512_mask_cmp_ps_mask(live, u, bar, _CMP_GE_OQ);
              if (!hits) continue;
              alignas(64) float us[16];
              _mm512_store_ps(us, u);
              rescore_hits(IP, top, a0, thr, hits, us, cands[c], w);
              bar = _mm512_maskz_loadu_ps(live, thr);
            }
          });
          return;
        }
        for_candidate_groups(IP, r0, r1, m, [&](const Cand* cands, int count) {
          run_tile(cands, count, 0, int(rc), /*to_float=*/false);
          for (int c = 0; c < count; ++c) {
            const Cand& cc = cands[c];
            int valid_rows[MR];
            int nv = 0;
            float nmax = 0;
            for (int j = 0; j < int(rc); ++j) {
              nmax = std::max(nmax, nrm[c * rc + j]);
              if (!IP.masked || token_valid(IP, *cc.seg, cc.b, j)) valid_rows[nv++] = c * int(rc) + j;
            }
            // A_t of lanes [l0, l0 + 16) (panel l0 / NR), over nv > 0 valid rows
            auto token_max16 = [&](int64_t l0) {
              const int64_t p = l0 / NR, lo = l0 % NR;
              const __m512i corr = _mm512_loadu_si512(w.lane_corr + l0);
              const __m512 lscale = _mm512_loadu_ps(w.lane_scale + l0);
              __m512 v = _mm512_set1_ps(-INFINITY);
              for (int k = 0; k < nv; ++k) {
                const int r = valid_rows[k];
                v = _mm512_max_ps(approx16(w.itile + (p * MR + r) * NR + lo, corr, lscale, r), v);  // a > v ? a : v
              }
              return v;
            };
            const __m512 vnmax = _mm512_set1_ps(nmax);
            // the bar test of queries [l0, l0 + 16) given their A (kept in registers: a masked
            // store read back at once would stall on store forwarding)
            auto test16 = [&](int64_t l0, __mmask16 live, __m512 a) {
              const __m512 u = _mm512_add_ps(a, _mm512_mul_ps(vnmax, _mm512_maskz_loadu_ps(live, w.err_sum + l0)));
              uint32_t hits = _mm512_mask_cmp_ps_mask(live, u, _mm512_maskz_loadu_ps(live, thr + l0), _CMP_GE_OQ);
              if (!hits) return;
              alignas(64) float us[16];
              _mm512_store_ps(us, u);
              rescore_hits(IP, top, a0 + l0, thr + l0, hits, us, cc, w);
            };
            if (rq == 1) {  // lane = query
              for (int64_t l0 = 0; l0 < n; l0 += 16) {
                const __mmask16 live = __mmask16((1u << min64(16, n - l0)) - 1);
                __m512 v = _mm512_setzero_ps();
                if (nv) {
                  v = zero_masked_tokens16(token_max16(l0), qvalid, l0, live);
                }
                test16(l0, live, v);
              }
            } else if (rq == 2 || rq == 4) {  // lane = token al * rq + i; sums by permutes
              // Token i of queries [l0, l0 + 16) sits at lanes (l0 + q) * rq + i of the rq 16-lane
              // chunks from lane l0 * rq: two-source permutes pick it out of the chunks' token
              // maxima (registers only), and A = ((0 + A_0) + A_1) + ... as the gathers below.
              for (int64_t l0 = 0; l0 < n; l0 += 16) {
                const __mmask16 live = __mmask16((1u << min64(16, n - l0)) - 1);
                __m512 a = _mm512_setzero_ps();
                if (nv) {
                  __m512 v[4];
                  for (int k = 0; k < int(rq); ++k) {
                    const int64_t t0 = l0 * rq + 16 * k;
                    v[k] = _mm512_setzero_ps();  // chunks past the last token: dead queries only
                    if (t0 >= ntok) continue;
                    // a masked token adds 0 (+0: the sum keeps its value)
                    const __mmask16 tl = __mmask16((1u << min64(16, ntok - t0)) - 1);
                    v[k] = zero_masked_tokens16(token_max16(t0), qvalid, t0, tl);
                  }
                  for (int64_t i = 0; i < grq; ++i) a = _mm512_add_ps(a, query_token16(v, int(rq), int(i)));
                }
                test16(l0, live, a);
              }
            } else {  // lane = token al * rq + i
              if (nv)
                for (int64_t t0 = 0; t0 < ntok; t0 += 16) {
                  // a masked token adds 0 (+0: the sum keeps its value)
                  const __mmask16 live = __mmask16((1u << min64(16, ntok - t0)) - 1);
                  _mm512_storeu_ps(tmax + t0, zero_masked_tokens16(token_max16(t0), qvalid, t0, live));
                }
              const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
              for (int64_t l0 = 0; l0 < n; l0 += 16) {
                const __mmask16 live = __mmask16((1u << min64(16, n - l0)) - 1);
                __m512 a = _mm512_setzero_ps();
                if (nv) {  // A = ((0 + A_0) + A_1) + ...: tokens i of 16 queries, gathered
                  const __m512i first = _mm512_mullo_epi32(_mm512_add_epi32(iota, _mm512_set1_epi32(int32_t(l0))),
                                                           _mm512_set1_epi32(int32_t(rq)));
                  for (int64_t i = 0; i < grq; ++i)
                    a = _mm512_add_ps(a, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live,
                                                                  _mm512_add_epi32(first, _mm512_set1_epi32(int32_t(i))),
                                                                  tmax, 4));
                }
                test16(l0, live, a);
              }
            }
          }
        });
        return;
      }
    }
#elif defined(METAEMBED_INDEX_AVX2)
    // The first case above on the AVX2 kernels' 16 lanes (two ymm): up to 16 one-token queries,
    // one budget with r_c <= MR and no candidate mask, bound and bar test from the integer tile
    // with the lanes' constants and the bars in registers. Same arithmetic. (1, 1) with 16
    // queries over 200k candidates, 2 cores of a Zen 3 EPYC: 13.9-15.2 ms through the float
    // tile and BlockFold, 7.2-8.4 ms this way (3 alternating processes each).
    if constexpr (NR == 16) {
      if (G == 1 && rc <= MR && rq == 1 && n <= 16 && !IP.masked) {
        const float* thr = top.thr + a0;  // group 0
        const uint32_t live_bits = (1u << n) - 1;
        const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        __m256i live[2], corr[2];
        __m256 lscale[2], err[2], keep[2];  // keep: live lanes whose query token is valid
        alignas(16) uint8_t q8[16] = {};
        if (qvalid) std::memcpy(q8, qvalid, size_t(n));
        const __m128i qb = _mm_load_si128(reinterpret_cast<const __m128i*>(q8));
        for (int h = 0; h < 2; ++h) {
          live[h] = _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(n - 8 * h)), iota);
          corr[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.lane_corr + 8 * h));
          lscale[h] = _mm256_loadu_ps(w.lane_scale + 8 * h);
          err[h] = _mm256_maskload_ps(w.err_sum + 8 * h, live[h]);
          keep[h] = _mm256_castsi256_ps(live[h]);
          if (qvalid) {
            const __m256i qi = _mm256_cvtepu8_epi32(h ? _mm_srli_si128(qb, 8) : qb);
            keep[h] = _mm256_and_ps(keep[h], _mm256_castsi256_ps(_mm256_cmpgt_epi32(qi, _mm256_setzero_si256())));
          }
        }
        for_candidate_groups(IP, r0, r1, m, [&](const Cand* cands, int count) {
          run_tile(cands, count, 0, int(rc), /*to_float=*/false);
          __m256 bar[2] = {_mm256_maskload_ps(thr, live[0]), _mm256_maskload_ps(thr + 8, live[1])};
          for (int c = 0; c < count; ++c) {
            float nmax = 0;
            __m256 v[2] = {_mm256_set1_ps(-INFINITY), _mm256_set1_ps(-INFINITY)};
            for (int j = 0; j < int(rc); ++j) {
              const int r = c * int(rc) + j;
              nmax = std::max(nmax, nrm[r]);
              const __m256 sr = _mm256_set1_ps(scl[r]);
              for (int h = 0; h < 2; ++h) {  // float(it - corr) * (sq * s_r)
                const __m256i it = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.itile + r * NR + 8 * h));
                const __m256 a = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(it, corr[h])),
                                               _mm256_mul_ps(lscale[h], sr));
                v[h] = _mm256_max_ps(a, v[h]);  // a > v ? a : v
              }
            }
            __m256 u[2];
            uint32_t hits = 0;
            for (int h = 0; h < 2; ++h) {
              u[h] = _mm256_add_ps(_mm256_and_ps(v[h], keep[h]), _mm256_mul_ps(_mm256_set1_ps(nmax), err[h]));
              hits |= uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(u[h], bar[h], _CMP_GE_OQ))) << (8 * h);
            }
            hits &= live_bits;
            if (!hits) continue;
            alignas(32) float us[16];
            _mm256_store_ps(us, u[0]);
            _mm256_store_ps(us + 8, u[1]);
            rescore_hits(IP, top, a0, thr, hits, us, cands[c], w);
            bar[0] = _mm256_maskload_ps(thr, live[0]);
            bar[1] = _mm256_maskload_ps(thr + 8, live[1]);
          }
        });
        return;
      }
    }
#endif
    for_candidate_groups(IP, r0, r1, m, [&](const Cand* cands, int count) {
      if (m > 1) {
        run_tile(cands, count, 0, int(rc));
        for (int c = 0; c < count; ++c) {
          f.begin();
          f.fold(cands[c], w.tile, c * int(rc), int(rc), 0);
          f.finish();
          finish(cands[c]);
        }
      } else {
        f.begin();
        for (int64_t j0 = 0; j0 < rc; j0 += MR) {
          const int mr = int(min64(MR, rc - j0));
#if defined(METAEMBED_INDEX_ZMM)
          if constexpr (NR % 16 == 0) {
            run_tile(cands, 1, j0, mr, /*to_float=*/false);
            fold_int_rows(f, w, cands[0], j0, mr, panels, scl);
            continue;
          }
#endif
          run_tile(cands, 1, j0, mr);
          f.fold(cands[0], w.tile, 0, mr, j0);
        }
        f.finish();
        finish(cands[0]);
      }
    });
  }

#if defined(METAEMBED_INDEX_ZMM)
  // BlockFold::fold of rows j0 .. j0 + mr of candidate c straight from the integer tile
  // w.itile, 16 lanes at a time: A = float(it - corr) * (sq * s_j) as run_tile's float tile
  // (the same operations in the same order, so bitwise its values), folded into the running
  // maxima (`a > m ? a : m`, as max_into) and snapshotted, without the float tile's
  // store and BlockFold's second pass over it. Exact int8 search at (16, 64), 16 queries, on
  // Zen 4: conversion and fold took 23% of the samples, this pass 20% (it is as many vector
  // operations per element as 4 dims of VPDPBUSD); the search ran 6% faster.
  static void fold_int_rows(BlockFold<NR, MR>& f, const Work& w, const Cand& c, int64_t j0, int mr,
                            int64_t panels, const float* scl) {
    uint32_t valid, snap;
    int64_t bound_at[MR];  // read only where snap has the row's bit
    f.row_bits(c, j0, mr, valid, snap, bound_at);
    float* run = f.run();
    const bool copy = run != f.bmax;  // one bound: the fold runs in its snapshot already
    const int32_t* itile = w.itile;
    // 16 lanes at a time through every row, the maximum in a register (a store per row
    // would chain each row's max on the last one's store).
    for (int64_t l0 = 0; l0 < panels * NR; l0 += 16) {
      const int64_t p = l0 / NR;
      const int32_t* it = itile + p * MR * NR + l0 % NR;
      const __m512i corr = _mm512_loadu_si512(w.lane_corr + l0);
      const __m512 lscale = _mm512_loadu_ps(w.lane_scale + l0);
      __m512 v = _mm512_loadu_ps(run + l0);
      for (int r = 0; r < mr; ++r) {
        if (valid >> r & 1u) {
          const __m512 a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_loadu_si512(it + r * NR), corr)),
                                         _mm512_mul_ps(lscale, _mm512_set1_ps(scl[r])));
          v = _mm512_max_ps(a, v);  // a > v ? a : v
        }
        if (copy && (snap >> r & 1u)) _mm512_storeu_ps(f.bmax + bound_at[r] * f.lanes + l0, v);
      }
      _mm512_storeu_ps(run + l0, v);
    }
  }
#endif

  static void score_rows(const IndexProblem& IP, const int64_t* rows, int64_t K, int64_t a0, int64_t a1, int64_t x0,
                         int64_t x1, void* ws, float* out) {
    const Problem& P = IP.p;
    Work w = carve(P, ws);
    const int64_t G = P.groups.num_groups;
    for (int64_t a = a0; a < a1; ++a)
      for (int64_t x = x0; x < x1; ++x) {
        Cand c;
        if (!candidate_of_row(IP, rows[a * K + x], c)) continue;
        exact_scores(IP, a, c, w, w.exact);
        for (int64_t g = 0; g < G; ++g) out[(g * P.nq + a) * K + x] = w.exact[g];
      }
  }

  static IndexKernelSet kernel_set() {
    IndexKernelSet s;
    s.nr = NR;
    s.mr = MR;
    s.pack_elem_bytes = 1;
    s.int8_offset = Ops::kOffset;
    s.workspace_bytes = &workspace_bytes;
    s.qpack_bytes = &qpack_bytes;
    s.pack_queries = &pack_queries;
    s.search = &search;
    s.score_rows = &score_rows;
    return s;
  }
};

// Scalar integer kernels: the portable int8 scan (and the reference for the SIMD ones).
struct GenericInt8Ops {
  static constexpr int NR = 16;
  static constexpr int MR = 4;
  static constexpr int32_t kOffset = 0;

  // tile[r][l] = sum_d x_r[d] * y_l[d]  (panel [g4][NR][4]).
  static void micro(int M, const int8_t* const* rows, const int8_t* qp, int64_t g4, int32_t* tile) {
    for (int r = 0; r < M; ++r) {
      const int8_t* x = rows[r];
      int32_t acc[NR] = {};
      for (int64_t p = 0; p < g4; ++p)
        for (int l = 0; l < NR; ++l)
          for (int e = 0; e < 4; ++e) acc[l] += int32_t(x[4 * p + e]) * int32_t(qp[(p * NR + l) * 4 + e]);
      for (int l = 0; l < NR; ++l) tile[r * NR + l] = acc[l];
    }
  }

  // out[t][r] = <x_r, y_t> for 16 rows and t < nt query rows.
  static void dots(const int8_t* const* src, const int8_t* qrows, int64_t dpad, int nt, int64_t D, int32_t* out) {
    for (int r = 0; r < 16; ++r)
      for (int t = 0; t < nt; ++t) {
        int32_t acc = 0;
        for (int64_t d = 0; d < D; ++d) acc += int32_t(src[r][d]) * int32_t(qrows[t * dpad + d]);
        out[t * 16 + r] = acc;
      }
  }
};

}  // namespace
}  // namespace cpu
}  // namespace metaembed
