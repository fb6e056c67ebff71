// The result order of the index, (score descending, id ascending), and the per-thread
// top-k heaps. Included by the index ISA translation units and the host glue; internal
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

// Offer (s, id, row) to heap x of `top` (worst entry at the root).
inline void heap_offer(TopK& top, int64_t x, float s, int64_t id, int64_t row) {
  const int64_t k = top.k;
  float* hs = top.score + x * k;
  int64_t* hi = top.id + x * k;
  int64_t* hr = top.row + x * k;
  int64_t& n = top.count[x];
  if (n < k) {  // sift up from the end
    int64_t i = n++;
    while (i > 0) {
      const int64_t parent = (i - 1) / 2;
      if (!ranks_before(hs[parent], hi[parent], s, id)) break;  // parent already worse
      hs[i] = hs[parent];
      hi[i] = hi[parent];
      hr[i] = hr[parent];
      i = parent;
    }
    hs[i] = s;
    hi[i] = id;
    hr[i] = row;
  } else {
    if (!ranks_before(s, id, hs[0], hi[0])) return;
    int64_t i = 0;  // sift down from the root
    for (;;) {
      int64_t c = 2 * i + 1;
      if (c >= k) break;
      if (c + 1 < k && ranks_before(hs[c], hi[c], hs[c + 1], hi[c + 1])) ++c;  // the worse child
      if (!ranks_before(s, id, hs[c], hi[c])) break;  // s no better than the worse child: stop
      hs[i] = hs[c];
      hi[i] = hi[c];
      hr[i] = hr[c];
      i = c;
    }
    hs[i] = s;
    hi[i] = id;
    hr[i] = row;
  }
  if (n == k) top.thr[x] = rank_key(hs[0]);
}

}  // namespace
}  // namespace cpu
}  // namespace metaembed
