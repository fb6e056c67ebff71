// The result order of the index, (score descending, id ascending), and the per-thread
// top-k entry lists. Included by the index ISA translation units and the host glue; internal
// linkage (a function compiled under an AVX-512 target pragma must never be the copy the
// linker picks for generic code).
#pragma once
#include <cmath>
#include <cstdint>

#include "index_kernels.h"

namespace metaembed {
namespace cpu {
namespace {

// NaN (only reachable through a direct op call with non-finite data) ranks as -inf, so the
// order stays total and every comparison-based loop stays well defined.
inline float rank_key(float s) { return s == s ? s : -INFINITY; }

// (score desc, id asc): is a strictly better than b?
inline bool ranks_before(float sa, int64_t ia, float sb, int64_t ib) {
  const float ka = rank_key(sa), kb = rank_key(sb);
  return ka > kb || (ka == kb && ia < ib);
}

// The k slots of entry list x of `top` (index_kernels.h, TopK) and its fill count.
struct Slots {
  float* s;
  int64_t* id;
  int64_t* row;
  int64_t& n;
  Slots(TopK& top, int64_t x)
      : s(top.score + x * top.k), id(top.id + x * top.k), row(top.row + x * top.k), n(top.count[x]) {}
  void put(int64_t i, float sv, int64_t idv, int64_t rowv) {
    s[i] = sv;
    id[i] = idv;
    row[i] = rowv;
  }
  void move(int64_t to, int64_t from) { put(to, s[from], id[from], row[from]); }
};

// Offer (s, id, row) to entry list x of `top` kept as a binary heap, worst entry at the root.
inline void heap_offer(TopK& top, int64_t x, float s, int64_t id, int64_t row) {
  const int64_t k = top.k;
  Slots e(top, x);
  int64_t& n = e.n;
  if (n < k) {  // sift up from the end
    int64_t i = n++;
    while (i > 0) {
      const int64_t parent = (i - 1) / 2;
      if (!ranks_before(e.s[parent], e.id[parent], s, id)) break;  // parent already worse
      e.move(i, parent);
      i = parent;
    }
    e.put(i, s, id, row);
  } else {
    if (!ranks_before(s, id, e.s[0], e.id[0])) return;
    int64_t i = 0;  // sift down from the root
    for (;;) {
      int64_t c = 2 * i + 1;
      if (c >= k) break;
      if (c + 1 < k && ranks_before(e.s[c], e.id[c], e.s[c + 1], e.id[c + 1])) ++c;  // the worse child
      if (!ranks_before(s, id, e.s[c], e.id[c])) break;  // s no better than the worse child: stop
      e.move(i, c);
      i = c;
    }
    e.put(i, s, id, row);
  }
  if (n == k) top.thr[x] = rank_key(e.s[0]);
}

// k <= 16 on AVX-512 and AVX2: the entries unordered in one vector's lanes (two on AVX2). The
// worst is the minimum score (thr), ties going to the largest id; an offer finds it with one
// compare, replaces it, and takes the new minimum with one reduction: no data-dependent sift
// branches (half the time of the heap's offer at k = 10 and a third at k = 16 with AVX-512, on
// a replayed (1, 1) search's offers). Lanes >= k are never loaded.
// The 512-bit index paths (this top-k, index_engine.h's fused threshold tests and lane folds):
// in the translation units compiled for AVX-512 (index_isa_avx512*.cpp, index_isa_amx.cpp).
#if defined(METAEMBED_INDEX_AVX512) || defined(METAEMBED_INDEX_AVX512BF16) || defined(METAEMBED_INDEX_AMX)
#define METAEMBED_INDEX_ZMM 1
#endif
#if defined(METAEMBED_INDEX_ZMM)
#define METAEMBED_INDEX_LANE_TOPK 1
// Bit i set for each i < k with hs[i] == v.
inline uint32_t lanes_equal(const float* hs, int64_t k, float v) {
  const __mmask16 lanes = __mmask16((1u << k) - 1);
  return _mm512_mask_cmp_ps_mask(lanes, _mm512_maskz_loadu_ps(lanes, hs), _mm512_set1_ps(v), _CMP_EQ_OQ);
}
// min over i < k of hs[i].
inline float lanes_min(const float* hs, int64_t k) {
  const __mmask16 lanes = __mmask16((1u << k) - 1);
  return _mm512_mask_reduce_min_ps(lanes, _mm512_maskz_loadu_ps(lanes, hs));
}
#elif defined(METAEMBED_INDEX_AVX2)
#define METAEMBED_INDEX_LANE_TOPK 1
// hs[i] for i < n (n <= 8), +inf in the lanes past n (not loaded).
inline __m256 load_lanes8(const float* hs, int64_t n) {
  const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_blendv_ps(_mm256_set1_ps(INFINITY), _mm256_maskload_ps(hs, m), _mm256_castsi256_ps(m));
}
inline uint32_t lanes_equal(const float* hs, int64_t k, float v) {
  const __m256 vv = _mm256_set1_ps(v);
  const uint32_t lo = uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(load_lanes8(hs, k < 8 ? k : 8), vv, _CMP_EQ_OQ)));
  const uint32_t hi = k > 8 ? uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(load_lanes8(hs + 8, k - 8), vv, _CMP_EQ_OQ)))
                            : 0u;
  return (lo | hi << 8) & ((1u << k) - 1);  // +inf padding equals v only if v is +inf
}
inline float lanes_min(const float* hs, int64_t k) {
  __m256 m = load_lanes8(hs, k < 8 ? k : 8);
  if (k > 8) m = _mm256_min_ps(m, load_lanes8(hs + 8, k - 8));
  __m128 h = _mm_min_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_min_ps(h, _mm_movehl_ps(h, h));
  h = _mm_min_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
}
#endif

#if defined(METAEMBED_INDEX_LANE_TOPK)
constexpr int64_t kLaneTopK = 16;

inline void lane_offer(TopK& top, int64_t x, float s, int64_t id, int64_t row) {
  const int64_t k = top.k;
  Slots e(top, x);
  if (e.n < k) {
    e.put(e.n, s, id, row);
    if (++e.n < k) return;
  } else {
    // Offered scores passed s >= thr, so none is NaN and thr is the lanes' exact minimum.
    uint32_t at = lanes_equal(e.s, k, top.thr[x]);
    int w = __builtin_ctz(at);
    for (at &= at - 1; at; at &= at - 1) {  // tied minima: the largest id is the worst
      const int j = __builtin_ctz(at);
      if (e.id[j] > e.id[w]) w = j;
    }
    if (!ranks_before(s, id, e.s[w], e.id[w])) return;
    e.put(w, s, id, row);
  }
  top.thr[x] = lanes_min(e.s, k);
}
#endif

// Offer (s, id, row) to the top-k entries x of `top`; callers offer only s >= thr[x].
inline void topk_offer(TopK& top, int64_t x, float s, int64_t id, int64_t row) {
#if defined(METAEMBED_INDEX_LANE_TOPK)
  if (top.k <= kLaneTopK) return lane_offer(top, x, s, id, row);
#endif
  heap_offer(top, x, s, id, row);
}

}  // namespace
}  // namespace cpu
}  // namespace metaembed
