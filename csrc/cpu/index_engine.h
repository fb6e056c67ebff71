// The index scan: grouped MaxSim scoring fused with top-k selection, over prefix slabs.
//
// Included by the index ISA translation units (index_isa_*.cpp) after their target pragmas;
// everything has internal linkage, as in engine.h.
//
// Scoring reuses the engine (engine.h): queries are packed into its NR-lane panels, the
// policy's register micro-kernel produces the similarity tile, and the running maxima are
// snapshotted at every distinct r_c, so every group comes out of one pass. What is new:
//
// * Rows come from prefix slabs: token j of row b is read from slab tok_slab[j] (storage.py),
//   so a budget reads only its first r_c vectors of each candidate.
// * Multi-candidate register tiles: when r_c < MR, one tile holds floor(MR / r_c) candidates
//   (r_c rows each), so small budgets (r_c = 1: a plain GEMM) keep the micro-kernel's full
//   MR x NR accumulator block busy instead of running 1-row tiles. A tail tile repeats its last
//   real row, so a row's arithmetic never depends on its neighbours (scores are bitwise the
//   same whatever the tiling, thread split or segment boundaries).
// * Few query tokens (<= kDotTokens: one query at a small budget) take dot products along D
//   (Ops::dots, vectorised per ISA), reading each candidate row once: a memory-bound GEMV.
// * Fused top-k: per thread, per (group, query), a heap of k (TopK). Each finished score is
//   compared with the heap's bar thr (its k-th score once full, -inf before); only scores
//   that reach it touch the heap, so the working set is O(G Nq k + one tile).
//
// int8 filter (kIndexInt8). An int8 index scores the dequantised vectors v = x * s exactly,
// but scans with integer dot products first. Query token t (float32) is quantised per token,
//   y_t = round(q_t / sq_t), sq_t = max|q_t| / 127, residual e_t = q_t - sq_t y_t,
// and the approximate similarity is A_tj = sq_t * s_j * <y_t, x_j> (an exact integer dot,
// VNNI vpdpbusd / AVX2 vpmaddubsw / scalar, then two float multiplies). Since |x_jd| <= 127,
//   |<q_t, s_j x_j> - A_tj| <= s_j <|e_t|, |x_j|> <= 127 s_j ||e_t||_1,
// and a max over j moves by at most the largest such bound, so the approximate score A of a
// candidate is within  Bound = s_max * sum_t 127 (||e_t||_1 + rounding)  (+ float rounding of
// both computations, accounted generously) of its exact score S. A candidate is rescored
// exactly (exact_scores: float32 dots with x_jd * s_j, the dequantised values) only when
// A + Bound >= thr: anything below cannot enter the top k. Every returned score is exact; the
// integer scan only decides who gets rescored.
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
  const int64_t s = IP.tok_slab[j];
  return static_cast<const Tc*>(seg.data[s]) + (b * IP.tok_width[j] + IP.tok_off[j]) * IP.p.d;
}

inline int64_t token_slot(const IndexProblem& IP, int64_t b, int64_t j) {
  return b * IP.tok_width[j] + IP.tok_off[j];
}

inline bool token_valid(const IndexProblem& IP, const IndexSegment& seg, int64_t b, int64_t j) {
  return !IP.masked || seg.masks[IP.tok_slab[j]][token_slot(IP, b, j)] != 0;
}

// ExactScan's Ops for ISAs without their own few-token dots: the engine's, row by row.
struct UseEngineDots {};

// A candidate: segment and local row.
struct Cand {
  const IndexSegment* seg;
  int64_t b;
};

// ---- folding a tile into group scores --------------------------------------------------
//
// tile: [panels][MR][NR] similarities (or approximations); rows [r0, r0 + count) of it are
// candidate tokens j0 .. j0 + count - 1. runmax/bmax/bvalid are the candidate's state.
template <class Acc, int NR, int MR>
struct Fold {
  static void reset(Acc* runmax, int64_t lanes, bool& any_valid) {
    for (int64_t t = 0; t < lanes; ++t) runmax[t] = -INFINITY;
    any_valid = false;
  }

  // L: lanes used per panel (NR for the micro-kernel's panels; the token count, <= NR, for
  // the one panel of the few-token dots).
  static void rows(const IndexProblem& IP, const Cand& c, const Acc* tile, int64_t panels, int L, int r0, int count,
                   int64_t j0, Acc* runmax, bool& any_valid, Acc* bmax, uint8_t* bvalid, int64_t& kb) {
    const Groups& G = IP.p.groups;
    const int64_t lanes = panels * NR;
    for (int r = 0; r < count; ++r) {
      const int64_t j = j0 + r;
      if (token_valid(IP, *c.seg, c.b, j)) {
        any_valid = true;
        if (L == NR) {
          for (int64_t p = 0; p < panels; ++p) {
            const Acc* row = tile + (p * MR + r0 + r) * NR;
            Acc* m = runmax + p * NR;
            for (int l = 0; l < NR; ++l) m[l] = row[l] > m[l] ? row[l] : m[l];
          }
        } else {
          const Acc* row = tile + (r0 + r) * NR;
          for (int l = 0; l < L; ++l) runmax[l] = row[l] > runmax[l] ? row[l] : runmax[l];
        }
      }
      if (j + 1 == G.bounds[kb]) {
        std::memcpy(bmax + kb * lanes, runmax, sizeof(Acc) * (L == NR ? lanes : L));
        bvalid[kb] = any_valid;
        ++kb;
      }
    }
  }

  // scores[al * G + g] = s_g(a, candidate) for the view's queries (tokens summed in order).
  static void scores(const IndexProblem& IP, int64_t a0, int64_t n, int64_t panels, const Acc* bmax,
                     const uint8_t* bvalid, Acc* out) {
    const Problem& P = IP.p;
    const int64_t G = P.groups.num_groups, rq = P.groups.rq_eff, lanes = panels * NR;
    for (int64_t x = 0; x < n * G; ++x) out[x] = 0;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k = P.groups.bound_index[g];
      if (!bvalid[k]) continue;  // no valid candidate vector in the prefix: every token gives 0
      const Acc* m = bmax + k * lanes;
      const int64_t grq = P.groups.rq[g];
      for (int64_t al = 0; al < n; ++al) {
        const int64_t a = a0 + al;
        Acc sum = 0;
        for (int64_t i = 0; i < grq; ++i)
          if (!P.q.mask || P.q.mask[a * P.q.m0 + i * P.q.m1]) sum += m[al * rq + i];
        out[al * G + g] = sum;
      }
    }
  }
};

// Candidates [b0, b1) of a segment that may be returned, in groups of up to m, handed to
// `fn(const Cand* cands, int count)`.
template <class Fn>
inline void for_candidate_groups(const IndexProblem& IP, int64_t r0, int64_t r1, int m, Fn&& fn) {
  Cand buf[64];
  for (int64_t s = 0; s < IP.num_segs; ++s) {
    const IndexSegment& seg = IP.segs[s];
    const int64_t b0 = std::max<int64_t>(r0 - seg.row0, 0), b1 = std::min<int64_t>(r1 - seg.row0, seg.n);
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
}

// Global row -> candidate (binary search over the segments); false for row < 0.
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

// ---- float32 / bfloat16 index: exact scores from the engine's micro-kernel -----------------

template <class Policy, class T, class Ops>
struct ExactScan {
  using E = Engine<Policy, T>;
  using Acc = typename Policy::Acc;
  using RowT = typename E::RowT;
  using F = Fold<Acc, Policy::NR, Policy::MR>;
  static constexpr int NR = Policy::NR;
  static constexpr int MR = Policy::MR;

  struct Extra {
    Acc* scores;      // [qpb][G]
    uint8_t* bvalid;  // [num_bounds]
  };

  static size_t extra_bytes(const Problem& P) {
    return align64(sizeof(Acc) * P.queries_per_block * P.groups.num_groups) + align64(P.groups.num_bounds) + 64;
  }

  static size_t workspace_bytes(const IndexProblem& IP) { return E::workspace_bytes(IP.p) + extra_bytes(IP.p); }

  static Extra carve_extra(const Problem& P, void* ws) {
    uintptr_t p = (reinterpret_cast<uintptr_t>(ws) + E::workspace_bytes(P) + 63) & ~uintptr_t(63);
    Extra x;
    x.scores = reinterpret_cast<Acc*>(p);
    p += align64(sizeof(Acc) * P.queries_per_block * P.groups.num_groups);
    x.bvalid = reinterpret_cast<uint8_t*>(p);
    return x;
  }

  static size_t qpack_bytes(const IndexProblem& IP) { return E::qpack_bytes(IP.p); }

  static void pack_queries(const IndexProblem& IP, int64_t qblock) { E::pack_queries(IP.p, qblock); }

  // Candidates per register tile: floor(MR / r_c) when r_c < MR, else 1.
  static int tile_candidates(const IndexProblem& IP) {
    const int64_t rc = IP.p.groups.rc_eff;
    return rc >= MR ? 1 : int(MR / rc);
  }

  // Fills the tile rows [0, M) for tokens [j0, j0 + per) of candidates cands[0, count) (rows
  // of missing candidates repeat the last real row) and runs the micro-kernel (or the dots).
  static void tile(const IndexProblem& IP, const typename E::QView& qv, typename E::Work& w, const Cand* cands,
                   int count, int m, int64_t j0, int per, const Acc* const* qrows, int nt) {
    const Problem& P = IP.p;
    const int64_t D = P.d, KC = P.kc, pe = E::panel_elems(P);
    const int M = m * per;
    const T* src[MR];
    for (int r = 0; r < M; ++r) {
      const int ci = std::min(r / per, count - 1);
      const int jj = ci == r / per ? r % per : per - 1;
      src[r] = token_row<T>(IP, *cands[ci].seg, cands[ci].b, j0 + jj);
    }
    for (int64_t k0 = 0; k0 < D; k0 += KC) {
      const int64_t kc = min64(KC, D - k0);
      const RowT* rows[MR];
      for (int r = 0; r < MR; ++r) {
        const int rr = r < M ? r : M - 1;
        if constexpr (E::kDirectRows) {
          rows[r] = src[rr] + k0;
        } else {
          if (r < M) Policy::convert(src[r] + k0, w.crows + r * KC, kc);
          rows[r] = w.crows + rr * KC;
        }
      }
      if (nt > 0) {
        if constexpr (std::is_same_v<Ops, UseEngineDots>) {
          for (int r = 0; r < M; ++r) E::dots(rows[r], qrows, nt, k0, kc, w.tile + r * NR, k0 > 0);
        } else {
          Ops::dots(rows, M, qrows, nt, k0, kc, w.tile, NR, k0 > 0);
        }
      } else {
        for (int64_t p = 0; p < qv.panels; ++p)
          E::template micro_dispatch<MR>(M, rows, qv.pack + p * pe + k0 * NR, kc, w.tile + p * MR * NR, k0 > 0);
      }
    }
  }

  // Scores every candidate of [r0, r1) (or of a row list) against the view and hands
  // (candidate, scores[al * G + g]) to `emit`.
  template <class CandSource, class Emit>
  static void scan(const IndexProblem& IP, const typename E::QView& qv, typename E::Work& w, Extra& x,
                   CandSource&& source, Emit&& emit) {
    const Problem& P = IP.p;
    const int64_t rc = P.groups.rc_eff;
    const Acc* qrows[E::kDotTokens];
    const int nt = E::prepare_query_rows(P, qv, w, qrows);
    const int L = nt > 0 ? nt : NR;
    const int64_t fold_lanes = nt > 0 ? nt : qv.panels * NR;
    const int m = tile_candidates(IP);
    source(m, [&](const Cand* cands, int count) {
      if (m > 1) {
        tile(IP, qv, w, cands, count, m, 0, int(rc), qrows, nt);
        for (int c = 0; c < count; ++c) {
          bool any;
          int64_t kb = 0;
          F::reset(w.runmax, fold_lanes, any);
          F::rows(IP, cands[c], w.tile, qv.panels, L, c * int(rc), int(rc), 0, w.runmax, any, w.bmax, x.bvalid, kb);
          F::scores(IP, qv.a0, qv.n, qv.panels, w.bmax, x.bvalid, x.scores);
          emit(cands[c], x.scores);
        }
      } else {
        bool any;
        int64_t kb = 0;
        F::reset(w.runmax, fold_lanes, any);
        for (int64_t j0 = 0; j0 < rc; j0 += MR) {
          const int mr = int(min64(MR, rc - j0));
          tile(IP, qv, w, cands, 1, 1, j0, mr, qrows, nt);
          F::rows(IP, cands[0], w.tile, qv.panels, L, 0, mr, j0, w.runmax, any, w.bmax, x.bvalid, kb);
        }
        F::scores(IP, qv.a0, qv.n, qv.panels, w.bmax, x.bvalid, x.scores);
        emit(cands[0], x.scores);
      }
    });
  }

  static void search(const IndexProblem& IP, int64_t qblock, int64_t r0, int64_t r1, void* ws, TopK& top) {
    const Problem& P = IP.p;
    typename E::Work w = E::carve(P, ws);
    Extra x = carve_extra(P, ws);
    const typename E::QView qv = E::block_view(P, qblock);
    const int64_t G = P.groups.num_groups;
    scan(IP, qv, w, x,
         [&](int m, auto&& fn) { for_candidate_groups(IP, r0, r1, m, fn); },
         [&](const Cand& c, const Acc* scores) {
           const int64_t id = c.seg->ids[c.b], row = c.seg->row0 + c.b;
           for (int64_t al = 0; al < qv.n; ++al)
             for (int64_t g = 0; g < G; ++g) {
               const int64_t xi = g * P.nq + qv.a0 + al;
               const float s = float(scores[al * G + g]);
               if (s >= top.thr[xi]) heap_offer(top, xi, s, id, row);  // the threshold test
             }
         });
  }

  static void score_rows(const IndexProblem& IP, const int64_t* rows, int64_t K, int64_t a0, int64_t a1, void* ws,
                         float* out) {
    const Problem& P = IP.p;
    typename E::Work w = E::carve(P, ws);
    Extra x = carve_extra(P, ws);
    const int64_t G = P.groups.num_groups;
    for (int64_t a = a0; a < a1; ++a) {
      E::pack_range(P, a, 1, w.qpack1);
      const typename E::QView qv{w.qpack1, a, 1, ceil_div(P.groups.rq_eff, NR)};
      int64_t xk = 0;
      scan(IP, qv, w, x,
           [&](int, auto&& fn) {
             for (int64_t xx = 0; xx < K; ++xx) {
               Cand c;
               if (candidate_of_row(IP, rows[a * K + xx], c)) {
                 xk = xx;
                 fn(&c, 1);
               }
             }
           },
           [&](const Cand&, const Acc* scores) {
             for (int64_t g = 0; g < G; ++g) out[(g * P.nq + a) * K + xk] = float(scores[g]);
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

// Per query token of the (nq x rq_eff) grid, computed once per search by the host glue.
struct QInfo {
  float scale;    // sq_t
  float err;      // 127 * (||e_t||_1 + rounding allowance): Bound contribution per unit s_max
  int32_t corr;   // what the integer kernel adds to <y_t, x> (Ops::kOffset * sum_d y_td)
  float unused;
};

// Ops: NR, MR lanes / rows of the integer micro-kernel; kOffset (128 when candidates are
// biased to unsigned bytes, else 0); micro<M>(xrows, qp, groups4, int32 tile, accumulate),
// prepare_rows(src rows, M, D, scratch) -> rows the micro-kernel reads; dots(...) for few
// tokens; qpanel layout [ceil(D/4)][NR][4] int8.
template <class Ops>
struct Int8Scan {
  static constexpr int NR = Ops::NR;
  static constexpr int MR = Ops::MR;
  static constexpr int kDotTokens = 4;
  using F = Fold<float, NR, MR>;

  static int64_t groups4(int64_t d) { return (d + 3) / 4; }
  static int64_t dpad(int64_t d) { return (d + 63) / 64 * 64; }
  static int64_t panel_bytes(const Problem& P) { return groups4(P.d) * 4 * NR; }

  struct Work {
    int32_t* itile;  // [panels][MR][NR]
    float* tile;     // [panels][MR][NR] approximate similarities
    float* runmax;   // [lanes]
    float* bmax;     // [nb][lanes]
    uint8_t* bvalid; // [nb]
    float* scores;   // [qpb][G]
    float* bound;    // [qpb][G]
    uint8_t* xrows;  // [MR][dpad] biased candidate rows
    int8_t* qrows8;  // [kDotTokens][dpad] few-token query rows
    float* lane_scale;   // [lanes] sq per lane
    int32_t* lane_corr;  // [lanes]
    float* exact_max;    // [rq_eff * num_bounds] (exact rescoring)
    float* vbuf;         // [dpad] one dequantised row
  };

  static int64_t max_panels(const Problem& P) { return max64(P.panels_per_block, ceil_div(P.groups.rq_eff, NR)); }

  static size_t workspace_bytes(const IndexProblem& IP) {
    const Problem& P = IP.p;
    const int64_t np = max_panels(P), lanes = np * NR, nb = P.groups.num_bounds, G = P.groups.num_groups;
    const int64_t qpb = P.queries_per_block;
    size_t n = 0;
    n += align64(sizeof(int32_t) * np * MR * NR) + align64(sizeof(float) * np * MR * NR);
    n += align64(sizeof(float) * lanes) + align64(sizeof(float) * nb * lanes) + align64(nb);
    n += 2 * align64(sizeof(float) * qpb * G);
    n += align64(MR * dpad(P.d)) + align64(kDotTokens * dpad(P.d));
    n += align64(sizeof(float) * lanes) + align64(sizeof(int32_t) * lanes);
    n += align64(sizeof(float) * P.groups.rq_eff * nb) + align64(sizeof(float) * dpad(P.d));
    return n + 64;
  }

  static Work carve(const Problem& P, void* ws) {
    const int64_t np = max_panels(P), lanes = np * NR, nb = P.groups.num_bounds, G = P.groups.num_groups;
    const int64_t qpb = P.queries_per_block;
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
    w.bound = static_cast<float*>(take(sizeof(float) * qpb * G));
    w.xrows = static_cast<uint8_t*>(take(MR * dpad(P.d)));
    w.qrows8 = static_cast<int8_t*>(take(kDotTokens * dpad(P.d)));
    w.lane_scale = static_cast<float*>(take(sizeof(float) * lanes));
    w.lane_corr = static_cast<int32_t*>(take(sizeof(int32_t) * lanes));
    w.exact_max = static_cast<float*>(take(sizeof(float) * P.groups.rq_eff * nb));
    w.vbuf = static_cast<float*>(take(sizeof(float) * dpad(P.d)));
    return w;
  }

  static size_t qpack_bytes(const IndexProblem& IP) {
    const Problem& P = IP.p;
    return size_t(P.num_qblocks) * P.panels_per_block * panel_bytes(P);
  }

  static const QInfo* qinfo(const IndexProblem& IP) { return static_cast<const QInfo*>(static_cast<const void*>(IP.qinfo)); }

  // The quantised token t = (a, i) (computed by the host: y_td = round(q_td / sq_t)).
  static int8_t quantised(const IndexProblem& IP, int64_t a, int64_t i, int64_t d) {
    const Problem& P = IP.p;
    return IP.qy[(a * P.groups.rq_eff + i) * P.d + d];
  }

  static const int8_t* block_pack(const IndexProblem& IP, int64_t qblock) {
    return static_cast<const int8_t*>(IP.p.qpack) + qblock * IP.p.panels_per_block * panel_bytes(IP.p);
  }

  static void pack_queries(const IndexProblem& IP, int64_t qblock) {
    const Problem& P = IP.p;
    const int64_t a0 = qblock * P.queries_per_block, n = min64(P.queries_per_block, P.nq - a0);
    const int64_t rq = P.groups.rq_eff, ntok = n * rq, g4 = groups4(P.d), pb = panel_bytes(P);
    int8_t* dst = const_cast<int8_t*>(block_pack(IP, qblock));
    std::memset(dst, 0, size_t(ceil_div(ntok, NR) * pb));
    for (int64_t t = 0; t < ntok; ++t) {
      const int64_t a = a0 + t / rq, i = t % rq, lane = t % NR;
      int8_t* panel = dst + (t / NR) * pb;
      for (int64_t d = 0; d < P.d; ++d) panel[(d / 4) * 4 * NR + lane * 4 + (d & 3)] = quantised(IP, a, i, d);
    }
    (void)g4;
  }

  // The exact scores of one query against one candidate, every group: float32 dots of q with
  // the dequantised vectors x_jd * s_j.
  static void exact_scores(const IndexProblem& IP, int64_t a, const Cand& c, Work& w, float* out) {
    const Problem& P = IP.p;
    const int64_t D = P.d, rq = P.groups.rq_eff, rc = P.groups.rc_eff, nb = P.groups.num_bounds;
    const float* q = static_cast<const float*>(P.q.data);
    for (int64_t x = 0; x < rq * nb; ++x) w.exact_max[x] = -INFINITY;
    bool valid_at[64];
    bool* bv = nb <= 64 ? valid_at : reinterpret_cast<bool*>(w.bvalid);
    bool any = false;
    int64_t kb = 0;
    for (int64_t j = 0; j < rc; ++j) {
      if (token_valid(IP, *c.seg, c.b, j)) {
        any = true;
        const int8_t* xr = token_row<int8_t>(IP, *c.seg, c.b, j);
        const float s = c.seg->scales[IP.tok_slab[j]][token_slot(IP, c.b, j)];
        for (int64_t d = 0; d < D; ++d) w.vbuf[d] = float(xr[d]) * s;  // the dequantised vector
        for (int64_t i = 0; i < rq; ++i) {
          const float* qi = q + a * P.q.s0 + i * P.q.s1;
          float dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += qi[d] * w.vbuf[d];
          float& m = w.exact_max[kb * rq + i];
          m = dot > m ? dot : m;
        }
      }
      if (j + 1 == P.groups.bounds[kb]) {
        bv[kb] = any;
        if (kb + 1 < nb)
          for (int64_t i = 0; i < rq; ++i) w.exact_max[(kb + 1) * rq + i] = w.exact_max[kb * rq + i];
        ++kb;
      }
    }
    for (int64_t g = 0; g < P.groups.num_groups; ++g) {
      const int64_t k = P.groups.bound_index[g];
      float sum = 0;
      if (bv[k])
        for (int64_t i = 0; i < P.groups.rq[g]; ++i)
          if (!P.q.mask || P.q.mask[a * P.q.m0 + i * P.q.m1]) sum += w.exact_max[k * rq + i];
      out[g] = sum;
    }
  }

  static void search(const IndexProblem& IP, int64_t qblock, int64_t r0, int64_t r1, void* ws, TopK& top) {
    const Problem& P = IP.p;
    Work w = carve(P, ws);
    const int64_t a0 = qblock * P.queries_per_block, n = min64(P.queries_per_block, P.nq - a0);
    const int64_t rq = P.groups.rq_eff, rc = P.groups.rc_eff, ntok = n * rq;
    const int64_t panels = ceil_div(ntok, NR), lanes = panels * NR, G = P.groups.num_groups;
    const int64_t D = P.d, g4 = groups4(D), pb = panel_bytes(P);
    const QInfo* info = qinfo(IP);
    for (int64_t t = 0; t < lanes; ++t) {
      w.lane_scale[t] = t < ntok ? info[a0 * rq + t].scale : 0.f;
      w.lane_corr[t] = t < ntok ? info[a0 * rq + t].corr : 0;
    }
    // Bound per unit s_max: err summed over each group's valid tokens (fixed per block).
    float* err_sum = w.bound;
    for (int64_t al = 0; al < n; ++al)
      for (int64_t g = 0; g < G; ++g) {
        float e = 0;
        for (int64_t i = 0; i < P.groups.rq[g]; ++i)
          if (!P.q.mask || P.q.mask[(a0 + al) * P.q.m0 + i * P.q.m1]) e += info[(a0 + al) * rq + i].err;
        err_sum[al * G + g] = e;
      }
    const int nt = ntok <= kDotTokens ? int(ntok) : 0;
    if (nt) std::memset(w.itile, 0, sizeof(int32_t) * MR * NR);
    if (nt)
      for (int t = 0; t < nt; ++t)
        for (int64_t d = 0; d < dpad(D); ++d)
          w.qrows8[t * dpad(D) + d] = d < D ? quantised(IP, a0 + t / rq, t % rq, d) : 0;
    const int8_t* qpack = block_pack(IP, qblock);
    const int m = rc >= MR ? 1 : int(MR / rc);
    float exact[256];
    float* exact_out = G <= 256 ? exact : nullptr;
    std::unique_ptr<float[]> exact_heap;
    if (!exact_out) {
      exact_heap.reset(new float[G]);
      exact_out = exact_heap.get();
    }

    // Integer tile for tokens [j0, j0 + per) of candidates cands[0, count) -> approximate
    // similarities in w.tile.
    auto run_tile = [&](const Cand* cands, int count, int64_t j0, int per) {
      const int M = m * per;
      const int8_t* src[MR];
      float scl[MR];
      for (int r = 0; r < M; ++r) {
        const int ci = std::min(r / per, count - 1);
        const int jj = ci == r / per ? r % per : per - 1;
        src[r] = token_row<int8_t>(IP, *cands[ci].seg, cands[ci].b, j0 + jj);
        scl[r] = cands[ci].seg->scales[IP.tok_slab[j0 + jj]][token_slot(IP, cands[ci].b, j0 + jj)];
      }
      if (nt) {
        Ops::dots(src, M, w.qrows8, dpad(D), nt, D, w.itile, NR);
      } else {
        const uint8_t* rows[MR];
        Ops::prepare_rows(src, M, D, w.xrows, dpad(D), rows);
        for (int r = M; r < MR; ++r) rows[r] = rows[M - 1];
        for (int64_t p = 0; p < panels; ++p) Ops::micro(M, rows, qpack + p * pb, g4, w.itile + p * MR * NR);
      }
      for (int64_t p = 0; p < (nt ? 1 : panels); ++p)
        for (int r = 0; r < M; ++r) {
          const int32_t* it = w.itile + (p * MR + r) * NR;
          float* ft = w.tile + (p * MR + r) * NR;
          const float* ls = w.lane_scale + p * NR;
          const int32_t* lc = w.lane_corr + p * NR;
          for (int l = 0; l < (nt ? nt : NR); ++l) ft[l] = float(it[l] - lc[l]) * (ls[l] * scl[r]);
        }
    };

    auto finish = [&](const Cand& c, float smax) {
      // Approximate scores, then the bar: A + Bound >= thr -> rescore exactly.
      F::scores(IP, a0, n, nt ? 1 : panels, w.bmax, w.bvalid, w.scores);
      const int64_t id = c.seg->ids[c.b], row = c.seg->row0 + c.b;
      for (int64_t al = 0; al < n; ++al) {
        bool need = false;
        for (int64_t g = 0; g < G && !need; ++g) {
          const float A = w.scores[al * G + g];
          // float rounding of both the approximation and the exact sum: a relative 2^-18 of
          // |A| plus the token bound (already a generous upper bound)
          const float bound = 2.f * (smax * err_sum[al * G + g]) + std::fabs(A) * 0x1p-18f + 1e-30f;
          need = A + bound >= top.thr[g * P.nq + a0 + al];
        }
        if (!need) continue;
        exact_scores(IP, a0 + al, c, w, exact_out);
        for (int64_t g = 0; g < G; ++g) {
          const int64_t xi = g * P.nq + a0 + al;
          if (exact_out[g] >= top.thr[xi]) heap_offer(top, xi, exact_out[g], id, row);
        }
      }
    };

    auto scale_max = [&](const Cand& c) {
      float s = 0;
      for (int64_t j = 0; j < rc; ++j) s = std::max(s, c.seg->scales[IP.tok_slab[j]][token_slot(IP, c.b, j)]);
      return s;
    };

    const int L = nt ? nt : NR;
    for_candidate_groups(IP, r0, r1, m, [&](const Cand* cands, int count) {
      const int64_t fl = nt ? nt : lanes;
      if (m > 1) {
        run_tile(cands, count, 0, int(rc));
        for (int c = 0; c < count; ++c) {
          bool any;
          int64_t kb = 0;
          F::reset(w.runmax, fl, any);
          F::rows(IP, cands[c], w.tile, nt ? 1 : panels, L, c * int(rc), int(rc), 0, w.runmax, any, w.bmax,
                  w.bvalid, kb);
          finish(cands[c], scale_max(cands[c]));
        }
      } else {
        bool any;
        int64_t kb = 0;
        F::reset(w.runmax, fl, any);
        for (int64_t j0 = 0; j0 < rc; j0 += MR) {
          const int mr = int(min64(MR, rc - j0));
          run_tile(cands, 1, j0, mr);
          F::rows(IP, cands[0], w.tile, nt ? 1 : panels, L, 0, mr, j0, w.runmax, any, w.bmax, w.bvalid, kb);
        }
        finish(cands[0], scale_max(cands[0]));
      }
    });
  }

  static void score_rows(const IndexProblem& IP, const int64_t* rows, int64_t K, int64_t a0, int64_t a1, void* ws,
                         float* out) {
    const Problem& P = IP.p;
    Work w = carve(P, ws);
    const int64_t G = P.groups.num_groups;
    float exact[256];
    std::unique_ptr<float[]> heap_buf;
    float* ex = exact;
    if (G > 256) {
      heap_buf.reset(new float[G]);
      ex = heap_buf.get();
    }
    for (int64_t a = a0; a < a1; ++a)
      for (int64_t x = 0; x < K; ++x) {
        Cand c;
        if (!candidate_of_row(IP, rows[a * K + x], c)) continue;
        exact_scores(IP, a, c, w, ex);
        for (int64_t g = 0; g < G; ++g) out[(g * P.nq + a) * K + x] = ex[g];
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

  static void prepare_rows(const int8_t* const* src, int M, int64_t D, uint8_t* scratch, int64_t dpad,
                           const uint8_t** rows) {
    for (int r = 0; r < M; ++r) {
      uint8_t* dst = scratch + r * dpad;
      std::memcpy(dst, src[r], size_t(D));
      std::memset(dst + D, 0, size_t(dpad - D));
      rows[r] = dst;
    }
  }

  // tile[r][l] = sum_d x_r[d] * y_l[d]  (panel [g4][NR][4]).
  static void micro(int M, const uint8_t* const* rows, const int8_t* qp, int64_t g4, int32_t* tile) {
    for (int r = 0; r < M; ++r) {
      const int8_t* x = reinterpret_cast<const int8_t*>(rows[r]);
      int32_t acc[NR] = {};
      for (int64_t p = 0; p < g4; ++p)
        for (int l = 0; l < NR; ++l)
          for (int e = 0; e < 4; ++e) acc[l] += int32_t(x[4 * p + e]) * int32_t(qp[(p * NR + l) * 4 + e]);
      for (int l = 0; l < NR; ++l) tile[r * NR + l] = acc[l];
    }
  }

  static void dots(const int8_t* const* src, int M, const int8_t* qrows, int64_t dpad, int nt, int64_t D,
                   int32_t* tile, int nr) {
    for (int r = 0; r < M; ++r)
      for (int t = 0; t < nt; ++t) {
        int32_t acc = 0;
        for (int64_t d = 0; d < D; ++d) acc += int32_t(src[r][d]) * int32_t(qrows[t * dpad + d]);
        tile[r * nr + t] = acc;
      }
  }
};

}  // namespace
}  // namespace cpu
}  // namespace metaembed
