// The CPU engine for grouped MaxSim and fused Matryoshka InfoNCE, templated over a SIMD
// policy (isa_*.cpp) and the input element type.
//
// Included by ISA translation units compiled under different target pragmas, so every
// symbol lives in an anonymous namespace: code generated for AVX-512 can never be picked
// by the linker for a call made from generic code (the classic multi-ISA ODR trap).
//
// Algorithm. For one query block (whole queries, tokens in NR-lane panels) and one
// candidate b, the tile S[j][t] = <c[b, j], q[t]> is produced MR candidate tokens at a
// time by the policy's register micro-kernel (broadcast c[b, j, d], FMA with the packed
// query lanes), D streamed in chunks of kc. Each finished row j folds into a running max
// per query token (and argmax, for the backward); when j + 1 reaches a distinct r_c
// boundary, the running max is snapshotted. All groups thus come out of one pass:
//
//   s_g(a, b) = sum_{i < r_q(g), q valid} bmax[bound(g)][token(a, i)]
//
// The Nq x Nc x Rq x Rc similarity tensor never exists: per thread, only one query
// block's MR x NR tiles and the per-boundary maxima are live.
#pragma once
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../common/half.h"
#include "kernels.h"

namespace metaembed {
namespace cpu {
namespace {

struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

// The AMX tile configurations (simd_amx.h): none loaded; amx_tile16 / amx_tile8's (tiles 5-7
// of 8 rows); amx_halves_dot's (every tile 16 rows).
enum AmxTiles : int { kAmxNoTiles = 0, kAmxRows8 = 1, kAmxHalves = 2 };

// f(std::integral_constant<int, NT>{}) with NT = nt, 1 <= nt <= kFewQueryTokens: the
// few-token dot kernels are unrolled over the query tokens, one instantiation per count.
template <class F>
inline decltype(auto) with_token_count(int nt, F&& f) {
  static_assert(kFewQueryTokens == 4, "one case per few-token count");
  switch (nt) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 4>{});
  }
}

inline float scalar_to_float(float x) { return x; }
inline double scalar_to_float(double x) { return x; }
inline float scalar_to_float(bf16_t h) {
  uint32_t u = uint32_t(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float scalar_to_float(f16_t h) {
  const uint32_t bits = f16_to_f32_bits(h.bits);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Acc -> input type, rounding to nearest even as torch's .to(dtype) does.
template <class T>
inline T scalar_from_float(float x);
template <>
inline float scalar_from_float<float>(float x) { return x; }
template <>
inline bf16_t scalar_from_float<bf16_t>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return bf16_t{f32_to_bf16_bits(u)};
}
template <>
inline f16_t scalar_from_float<f16_t>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return f16_t{f32_to_f16_bits(u)};
}

template <class T>
inline const T* typed(const void* p) {
  return static_cast<const T*>(p);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
inline size_t align64(size_t n) { return (n + 63) & ~size_t(63); }

// A policy micro_epilogue's beside() job when there is none (Policy::kWorkBeside).
struct NoBeside {
  void operator()() const {}
};
template <class Beside>
inline constexpr bool kHasBeside = !std::is_same_v<std::decay_t<Beside>, NoBeside>;

template <class Policy, class T>
struct Engine {
  using Acc = typename Policy::Acc;
  // Packed query element: Acc by default; a policy may keep a narrower format (e.g.
  // bf16 pairs for a dot-product instruction). A panel holds d_pack(D) * NR elements,
  // and D offset k0 (even) starts at element k0 * NR.
  using PackT = typename Policy::template Pack<T>;
  // Candidate rows are read in place when the micro-kernel consumes T directly;
  // otherwise each MR x kc chunk is converted into Acc scratch first.
  static constexpr bool kDirectRows = Policy::template kDirectRows<T>;
  using RowT = std::conditional_t<kDirectRows, T, Acc>;
  static constexpr int NR = Policy::NR;
  static constexpr int MR = Policy::MR;

  static int64_t panel_elems(const Problem& P) { return Policy::template d_pack<T>(P.d) * NR; }

  // Per-thread scratch, carved from one host-allocated buffer.
  struct Work {
    Acc* tile;        // [panels][MR][NR]   register-tile spill between D chunks
    Acc* runmax;      // [panels * NR]
    int32_t* runidx;  // [panels * NR]
    Acc* bmax;        // [num_bounds][panels * NR]
    int32_t* bidx;    // [num_bounds][panels * NR]
    uint8_t* bvalid;  // [num_bounds]        the prefix holds a valid candidate token
    Acc* crows;       // [MR][kc]           candidate rows converted to Acc
    RowT* rows16;     // [16][rows16_stride] candidate rows for the 16 x 16 tile (Policy::kTile16)
    Acc* scores;      // [queries_per_block][G]
    Acc* dscores;     // [queries_per_block][G]
    Acc* bound_w;     // [num_bounds]
    PackT* qpack1;    // one query packed alone (hard negatives)
    Acc* qrows;       // [kDotTokens][D]    query tokens as Acc rows (few-token path)
    Acc* dcand;       // [rc_eff][D]        one candidate's gradient rows (only when T is not Acc)
    // kAmxPath only (empty otherwise): a query view's B blocks, 16 padded rows, one C tile pair.
    uint16_t* amx_b;     // [max_panels][amx_ksteps][2][16 * 32]  (Policy::amx_tile16's `b`)
    uint16_t* amx_rows;  // [16][amx_ksteps * 32]                  rows copied and zero-padded
    float* amx_out;      // [16][32] (amx_tile16), or [4][16][16] (amx_halves_store)
    const void* amx_b_of;  // the view amx_b holds: pack pointer and first query (null: none yet)
    int64_t amx_b_a0;
    AmxTiles amx_config;   // the tile configuration loaded on this thread until AmxScope ends
    uint16_t* amx_lanes_b; // [rc_eff][amx_panel_blocks]  kCandidateLanes: token j of the block's candidates
    // kCandidateLanes only (empty otherwise): one candidate block and one row group's tiles.
    PackT* lpanel;    // [rc_eff][panel_elems]  token j of NR candidates, lane = candidate
    int32_t* lvalid;  // [rc_eff][NR]           candidate token j valid (0 for padding lanes)
    int32_t* lseen;   // [rc_eff][NR]           some candidate token before j is valid
    int32_t* lbvalid; // [num_bounds][NR]       the candidate's prefix holds a valid token
    Acc* ltile;       // [rc_eff][MR][NR]       S[t][b, j], row = query token t
    Acc* lbmax;       // [num_bounds][MR][NR]
    int32_t* lbidx;   // [num_bounds][MR][NR]
  };

  struct QView {  // packed panels of queries [a0, a0 + n)
    const PackT* pack;
    int64_t a0, n, panels;
  };

  static int64_t max_panels(const Problem& P) {
    return max64(P.panels_per_block, ceil_div(P.groups.rq_eff, NR));
  }

  static size_t workspace_bytes(const Problem& P) {
    const int64_t np = max_panels(P), lanes = np * NR, nb = P.groups.num_bounds;
    const int64_t G = P.groups.num_groups, qpb = P.queries_per_block;
    size_t n = 0;
    n += align64(sizeof(Acc) * np * kTileRows * NR);
    n += align64(sizeof(Acc) * lanes) + align64(sizeof(int32_t) * lanes);
    n += align64(sizeof(Acc) * nb * lanes) + align64(sizeof(int32_t) * nb * lanes) + align64(nb);
    n += align64(sizeof(Acc) * MR * P.kc);
    n += align64(rows16_bytes(P));
    n += 2 * align64(sizeof(Acc) * qpb * G);
    n += align64(sizeof(Acc) * nb);
    n += align64(sizeof(PackT) * ceil_div(P.groups.rq_eff, NR) * panel_elems(P));
    n += align64(sizeof(Acc) * kDotTokens * P.d);
    n += align64(candidate_grad_bytes(P));
    for (size_t b : lanes_bytes(P)) n += align64(b);
    for (size_t b : amx_bytes(P)) n += align64(b);
    return n + 64;
  }

  // Sizes of the kCandidateLanes buffers of Work (all zero for the other layout).
  static std::array<size_t, 7> lanes_bytes(const Problem& P) {
    if (P.layout != kCandidateLanes) return {};
    const size_t rc = size_t(P.groups.rc_eff), nb = size_t(P.groups.num_bounds), i32 = sizeof(int32_t);
    return {sizeof(PackT) * rc * size_t(panel_elems(P)), i32 * rc * NR, i32 * rc * NR, i32 * nb * NR,
            sizeof(Acc) * rc * MR * NR, sizeof(Acc) * nb * MR * NR, i32 * nb * MR * NR};
  }

  // bf16 candidates on AMX tiles (Policy::kAmx): score_candidate_amx.
  static constexpr bool kAmxPath = Policy::kAmx && std::is_same_v<T, bf16_t>;
  // Rows per panel that Work::tile holds: MR, or 16 on AMX (amx_tile16_rows).
  static constexpr int kTileRows = kAmxPath ? 16 : MR;
  static int64_t amx_ksteps(const Problem& P) { return ceil_div(P.d, 32); }
  static int64_t amx_panel_blocks(const Problem& P) { return amx_ksteps(P) * 2 * 16 * 32; }  // uint16 per panel
  static std::array<size_t, 4> amx_bytes(const Problem& P) {
    if constexpr (!kAmxPath) return {};
    const size_t ks = size_t(amx_ksteps(P)), pb = sizeof(uint16_t) * size_t(amx_panel_blocks(P));
    const size_t lanes = P.layout == kCandidateLanes ? pb * size_t(P.groups.rc_eff) : 0;
    return {pb * size_t(max_panels(P)), sizeof(uint16_t) * 16 * ks * 32, sizeof(float) * 4 * 16 * 16, lanes};
  }

  // The 16 x 16 tile's row stride for D <= 512: the smallest of 64, 128, 256, 512 that holds D.
  // A compile-time stride lets the micro-kernel address its 16 rows off one pointer.
  static constexpr int64_t tile16_stride(int64_t d) { return d <= 64 ? 64 : d <= 128 ? 128 : d <= 256 ? 256 : 512; }

  // Calls body(std::integral_constant<int, tile16_stride(d)>{}): the one place that turns D into
  // the template stride (score_candidate16 here, the index's fold_tiles16).
  template <class Body>
  static decltype(auto) with_tile16_stride(int64_t d, Body&& body) {
    switch (tile16_stride(d)) {
      case 64: return body(std::integral_constant<int, 64>{});
      case 128: return body(std::integral_constant<int, 128>{});
      case 256: return body(std::integral_constant<int, 256>{});
      default: return body(std::integral_constant<int, 512>{});
    }
  }

  // Rows of a candidate's r_c that go through 16 x 16 tiles: all but the lone last row of
  // r_c = MR m + 1, which the MR-row tiling computes in a 1-row tile (4 interleaved chains) and
  // which stays there, so that every value is bitwise the MR-row tiling's.
  static constexpr int64_t tile16_rows(int64_t rc) { return rc % MR == 1 ? rc - 1 : rc; }

  // A 16 x 16 tile's rows (RowT) at stride RS: `in_place` when non-null (16 rows there
  // already), else row_at(r) for r < mr copied (kDirectRows) or converted into w.rows16,
  // followed by zero rows up to 16 (computed, never folded: no uninitialised memory is read).
  template <int RS, class RowAt>
  static const RowT* tile16_rows_at(const RowT* in_place, RowAt&& row_at, int mr, int64_t D, Work& w) {
    if (in_place) return in_place;
    for (int r = 0; r < mr; ++r) {
      if constexpr (kDirectRows)
        std::memcpy(static_cast<void*>(w.rows16 + r * RS), row_at(r), sizeof(RowT) * D);
      else
        Policy::convert(row_at(r), w.rows16 + r * RS, D);
    }
    for (int r = mr; r < 16; ++r) std::memset(static_cast<void*>(w.rows16 + r * RS), 0, sizeof(RowT) * D);
    return w.rows16;
  }

  // w.rows16: 16 rows at the tile's stride.
  static size_t rows16_bytes(const Problem& P) {
    if (!Policy::kTile16 || P.d > 512) return 0;
    return sizeof(RowT) * 16 * size_t(tile16_stride(P.d));
  }

  static size_t candidate_grad_bytes(const Problem& P) {
    return std::is_same_v<T, Acc> ? 0 : sizeof(Acc) * size_t(P.groups.rc_eff) * size_t(P.d);
  }

  static size_t qpack_bytes(const Problem& P) {
    if (P.layout == kCandidateLanes) return sizeof(RowT) * P.nq * P.groups.rq_eff * P.d;
    return sizeof(PackT) * P.num_qblocks * P.panels_per_block * panel_elems(P);
  }

  static Work carve(const Problem& P, void* ws) {
    const int64_t np = max_panels(P), lanes = np * NR, nb = P.groups.num_bounds;
    const int64_t G = P.groups.num_groups, qpb = P.queries_per_block;
    uintptr_t p = (reinterpret_cast<uintptr_t>(ws) + 63) & ~uintptr_t(63);
    auto take = [&p](size_t bytes) {
      void* r = reinterpret_cast<void*>(p);
      p += align64(bytes);
      return r;
    };
    Work w;
    w.tile = static_cast<Acc*>(take(sizeof(Acc) * np * kTileRows * NR));
    w.runmax = static_cast<Acc*>(take(sizeof(Acc) * lanes));
    w.runidx = static_cast<int32_t*>(take(sizeof(int32_t) * lanes));
    w.bmax = static_cast<Acc*>(take(sizeof(Acc) * nb * lanes));
    w.bidx = static_cast<int32_t*>(take(sizeof(int32_t) * nb * lanes));
    w.bvalid = static_cast<uint8_t*>(take(nb));
    w.crows = static_cast<Acc*>(take(sizeof(Acc) * MR * P.kc));
    w.rows16 = static_cast<RowT*>(take(rows16_bytes(P)));
    w.scores = static_cast<Acc*>(take(sizeof(Acc) * qpb * G));
    w.dscores = static_cast<Acc*>(take(sizeof(Acc) * qpb * G));
    w.bound_w = static_cast<Acc*>(take(sizeof(Acc) * nb));
    w.qpack1 = static_cast<PackT*>(take(sizeof(PackT) * ceil_div(P.groups.rq_eff, NR) * panel_elems(P)));
    w.qrows = static_cast<Acc*>(take(sizeof(Acc) * kDotTokens * P.d));
    w.dcand = static_cast<Acc*>(take(candidate_grad_bytes(P)));
    const std::array<size_t, 7> lb = lanes_bytes(P);
    w.lpanel = static_cast<PackT*>(take(lb[0]));
    w.lvalid = static_cast<int32_t*>(take(lb[1]));
    w.lseen = static_cast<int32_t*>(take(lb[2]));
    w.lbvalid = static_cast<int32_t*>(take(lb[3]));
    w.ltile = static_cast<Acc*>(take(lb[4]));
    w.lbmax = static_cast<Acc*>(take(lb[5]));
    w.lbidx = static_cast<int32_t*>(take(lb[6]));
    const std::array<size_t, 4> ab = amx_bytes(P);
    w.amx_b = static_cast<uint16_t*>(take(ab[0]));
    w.amx_rows = static_cast<uint16_t*>(take(ab[1]));
    w.amx_out = static_cast<float*>(take(ab[2]));
    w.amx_lanes_b = static_cast<uint16_t*>(take(ab[3]));
    w.amx_b_of = nullptr;
    w.amx_b_a0 = -1;
    w.amx_config = kAmxNoTiles;
    return w;
  }

  // ---- packing ------------------------------------------------------------------------

  // Pack queries [a0, a0 + n) into `dst` (panels of NR lanes, zero-padded).
  static void pack_range(const Problem& P, int64_t a0, int64_t n, PackT* dst) {
    const int64_t rq = P.groups.rq_eff, ntok = n * rq, pe = panel_elems(P);
    const T* q = typed<T>(P.q.data);
    auto token = [&](int64_t t) { return q + (a0 + t / rq) * P.q.s0 + (t % rq) * P.q.s1; };
    if constexpr (Policy::kPackLanesWidth == NR) {
      // A panel at a time through the policy's lane packing (the candidate-lane layout's,
      // 16 x 16 transposes on AVX-512): token t is lane t % NR, tokens past ntok zero lanes.
      // Element by element (pack_token) this took half of a small paired call: at B = N = 32,
      // r_q = 32, r_c = 1, D = 128, bf16, 309 us against 168 with this (and no block packing).
      for (int64_t t0 = 0; t0 < ntok; t0 += NR) {
        const T* src[NR];
        for (int l = 0; l < NR; ++l) src[l] = t0 + l < ntok ? token(t0 + l) : nullptr;
        Policy::pack_lanes(src, P.d, dst + (t0 / NR) * pe);
      }
    } else {
      std::memset(dst, 0, sizeof(PackT) * ceil_div(ntok, NR) * pe);
      for (int64_t t = 0; t < ntok; ++t) Policy::pack_token(token(t), P.d, dst + (t / NR) * pe, int(t % NR));
    }
  }

  static QView block_view(const Problem& P, int64_t qblock) {
    const int64_t a0 = qblock * P.queries_per_block;
    const int64_t n = min64(P.queries_per_block, P.nq - a0);
    const PackT* pack = static_cast<const PackT*>(P.qpack) + qblock * P.panels_per_block * panel_elems(P);
    return QView{pack, a0, n, ceil_div(n * P.groups.rq_eff, NR)};
  }

  static void pack_queries(const Problem& P, int64_t qblock) {
    const int64_t a0 = qblock * P.queries_per_block;
    const int64_t n = min64(P.queries_per_block, P.nq - a0);
    if (P.layout == kCandidateLanes) return lane_query_rows(P, a0, n);
    pack_range(P, a0, n, static_cast<PackT*>(P.qpack) + qblock * P.panels_per_block * panel_elems(P));
  }

  // ---- one candidate against one query view ------------------------------------------

  template <int M>
  static void micro_dispatch(int mr, const RowT* const* rows, const PackT* qp, int64_t kc, Acc* tile, bool acc) {
    if constexpr (M > 1) {
      if (mr < M) return micro_dispatch<M - 1>(mr, rows, qp, kc, tile, acc);
    }
    Policy::template micro<M>(rows, qp, kc, tile, acc);
  }

  // Software prefetch (into L2) of a contiguous byte range, the next candidate's rows of a
  // tile, spread over the first half of the micro-kernel's loop (Policy::kWorkBeside): `per`
  // lines after every Policy::kBesideSteps steps of d, so that they arrive while the second
  // half computes. Issued in one burst before the tile (32 lines of bf16, 64 of fp32 at
  // D = 128), the prefetches ran out of line fill buffers and stalled the tile's own loads:
  // spread, the paired op (candidates streamed from DRAM) ran 9% (bf16) and 15% (fp32)
  // faster on AVX-512. The AVX2 micro-kernel ran 8-12% slower in the blocked loop that
  // beside() needs, so it keeps the burst: without kWorkBeside, finish() issues it.
  struct LinePrefetch {
    const char* p = nullptr;  // next line to prefetch (line-aligned)
    const char* end = nullptr;
    int64_t per = 0;
    static LinePrefetch range(const void* begin, int64_t bytes) {
      const char* b = static_cast<const char*>(begin);
      return {reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(b) & ~uintptr_t(63)), b + bytes, 0};
    }
    // Spread what is left over `calls` calls of step().
    void spread(int64_t calls) { per = ceil_div(ceil_div(end - p, 64), calls > 0 ? calls : 1); }
    __attribute__((always_inline)) void step() {
      for (int64_t i = 0; i < per && p < end; ++i, p += 64) __builtin_prefetch(p, 0, 2);
    }
    void finish() {
      for (; p < end; p += 64) __builtin_prefetch(p, 0, 2);
    }
  };

  // fold_tile's fold of the rows that micro(epi) hands to epi(r, v) in registers (shared with
  // fold_tile16).
  template <bool kArgmax, class Micro>
  static inline void fold_rows(Micro&& micro, int64_t j0, uint32_t valid, bool seen, Acc* runmax, int32_t* runidx,
                               uint32_t snap, const int64_t* bound_at, Acc* bmax, int32_t* bidx, int64_t lanes) {
    if constexpr (kArgmax) {
      typename Policy::ArgmaxFold f(runmax, runidx);
      micro([&](int r, const auto* v) {
        if (valid >> r & 1u) {
          f.fold(v, int32_t(j0 + r), !seen);
          seen = true;
        }
        if (snap >> r & 1u) f.store(bmax + bound_at[r] * lanes, bidx + bound_at[r] * lanes);
      });
      f.store(runmax, runidx);
    } else {
      typename Policy::MaxFold f(runmax);
      micro([&](int r, const auto* v) {
        if (valid >> r & 1u) f.fold(v);
        if (snap >> r & 1u) f.store(bmax + bound_at[r] * lanes);
      });
      f.store(runmax);
    }
  }

  // runmax[l] = max(runmax[l], S[r][l]) over the rows r < M whose bit of `valid` is set (and,
  // with kArgmax, runidx[l] = the lowest maximising row index j0 + r, NaN first), the rows never
  // leaving registers (Policy::MaxFold / ArgmaxFold): score_candidate's fold for a tile computed
  // over all of D at once. `seen` says whether the candidate had a valid row before the tile.
  // After row r, when bit r of `snap` is set, the state so far is also stored in row
  // bound_at[r] of bmax (and bidx), rows `lanes` apart: a boundary's snapshot. Out of line:
  // inlined into score_candidate, the AVX2 fp32 argmax fold (12 accumulators and 4 fold
  // registers of the 16 ymm) ran 10% slower than the stored tile it replaces; out of line, 25%
  // faster (maxsim_grouped under autograd).
  template <int M, bool kArgmax>
  __attribute__((noinline)) static void fold_tile(int mr, const RowT* const* rows, const PackT* qp, int64_t kc, int64_t j0, uint32_t valid,
                        bool seen, Acc* runmax, int32_t* runidx, uint32_t snap, const int64_t* bound_at,
                        Acc* bmax, int32_t* bidx, int64_t lanes, LinePrefetch& prefetch) {
    if constexpr (M > 1) {
      if (mr < M)
        return fold_tile<M - 1, kArgmax>(mr, rows, qp, kc, j0, valid, seen, runmax, runidx, snap, bound_at, bmax,
                                         bidx, lanes, prefetch);
    }
    if constexpr (Policy::kFoldMax) {
      // The micro-kernel, `prefetch` spread over its loop where the policy can.
      auto micro = [&](auto&& epi) {
        if constexpr (Policy::kWorkBeside) {
          LinePrefetch pf = prefetch;  // a local, so that the compiler may keep it in registers
          pf.spread(kc / Policy::kBesideSteps / 2);
          Policy::template micro_epilogue<M>(rows, qp, kc, nullptr, false, epi, [&pf] { pf.step(); });
          pf.finish();
          prefetch = pf;
        } else {
          prefetch.finish();
          Policy::template micro_epilogue<M>(rows, qp, kc, nullptr, false, epi);
        }
      };
      fold_rows<kArgmax>(micro, j0, valid, seen, runmax, runidx, snap, bound_at, bmax, bidx, lanes);
    }
  }

  // ---- few query tokens: dot products along D -----------------------------------------
  //
  // The micro-kernel spreads query tokens over NR SIMD lanes; a query block with only a few
  // tokens (one query at budget (1, 1) or (2, 4): test-time retrieval at a small budget)
  // would leave most lanes idle and run far below memory speed. Those blocks instead take
  //   S[j][t] = <c[b, j], q[t]>,  vectorised along D,
  // which reads each candidate row once for all of the block's tokens (a GEMV: memory-bound).
  static constexpr int kDotTokens = int(kFewQueryTokens);
  static constexpr int kDotWidth = 32;  // independent partial sums: two 16-lane FMA chains

  template <int NT>
  static void dots_n(const RowT* row, const Acc* const* q, int64_t k0, int64_t n, Acc* out, bool accumulate) {
    Acc part[NT][kDotWidth] = {};
    int64_t d = 0;
    for (; d + kDotWidth <= n; d += kDotWidth) {
      for (int l = 0; l < kDotWidth; ++l) {
        const Acc x = Acc(scalar_to_float(row[d + l]));
        for (int t = 0; t < NT; ++t) part[t][l] += x * q[t][k0 + d + l];
      }
    }
    for (int t = 0; t < NT; ++t) {
      Acc sum = 0;
      for (int l = 0; l < kDotWidth; ++l) sum += part[t][l];
      for (int64_t e = d; e < n; ++e) sum += Acc(scalar_to_float(row[e])) * q[t][k0 + e];
      out[t] = accumulate ? out[t] + sum : sum;
    }
  }

  // out[t] (+)= <row[0, n), q[t][k0, k0 + n)> for t < nt <= kDotTokens.
  static void dots(const RowT* row, const Acc* const* q, int nt, int64_t k0, int64_t n, Acc* out, bool accumulate) {
    return with_token_count(nt, [&](auto t) { return dots_n<decltype(t)::value>(row, q, k0, n, out, accumulate); });
  }

  // When the view's tokens are few enough, converts them to Acc rows in w.qrows, points
  // `qrows` at them and returns how many; else returns 0 (use the micro-kernel).
  static int prepare_query_rows(const Problem& P, const QView& qv, Work& w, const Acc** qrows) {
    const int64_t rq = P.groups.rq_eff, ntok = qv.n * rq;
    if (ntok > kDotTokens) return 0;
    const T* q = typed<T>(P.q.data);
    for (int64_t t = 0; t < ntok; ++t) {
      const int64_t a = qv.a0 + t / rq, i = t % rq;
      Policy::convert(q + a * P.q.s0 + i * P.q.s1, w.qrows + t * P.d, P.d);
      qrows[t] = w.qrows + t * P.d;
    }
    std::memset(w.tile, 0, sizeof(Acc) * MR * NR);  // lanes >= ntok are folded, never read
    return int(ntok);
  }

  // rows[r] = candidate row j0 + r, dims [k0, k0 + kc): in place, or converted to Acc in
  // w.crows (row stride KC). Rows r >= mr (padding) repeat the last real row.
  static void tile_rows(const T* cand, int64_t cs1, int64_t j0, int mr, int64_t k0, int64_t kc, int64_t KC,
                        Work& w, const RowT** rows) {
    for (int r = 0; r < MR; ++r) {
      const int rr = r < mr ? r : mr - 1;
      const T* src = cand + (j0 + rr) * cs1 + k0;
      if constexpr (kDirectRows) {
        rows[r] = src;
      } else {
        if (r < mr) Policy::convert(src, w.crows + r * KC, kc);
        rows[r] = w.crows + rr * KC;
      }
    }
  }

  // A candidate's running maxima from -inf (and argmax -1) over `lanes` lanes.
  template <bool kArgmax>
  static void reset_running(Work& w, int64_t lanes) {
    for (int64_t t = 0; t < lanes; ++t) w.runmax[t] = -INFINITY;
    if (kArgmax)
      for (int64_t t = 0; t < lanes; ++t) w.runidx[t] = -1;
  }

  // Prefetch (into L2) of the next candidate's rows j0 .. j0 + mr: a range to spread over the
  // tile's FMAs when the rows are contiguous, else issued at once (nothing without a next).
  static LinePrefetch next_rows_prefetch(const T* next, int64_t cs1, int64_t D, int64_t j0, int mr) {
    LinePrefetch prefetch;
    if (next && cs1 == D) {
      prefetch = LinePrefetch::range(next + j0 * cs1, int64_t(sizeof(T)) * mr * D);
    } else if (next) {
      for (int r = 0; r < mr; ++r) {
        const char* row = reinterpret_cast<const char*>(next + (j0 + r) * cs1);
        for (int64_t off = 0; off < int64_t(sizeof(T)) * D; off += 64) __builtin_prefetch(row + off, 0, 2);
      }
    }
    return prefetch;
  }

  // A tile's rows j0 .. j0 + mr: bit r of `valid` = row r's token is valid; bit r of `snap` =
  // a boundary ends after row r, whose snapshot goes to row bound_at[r] (w.bvalid set here; kb
  // advances past it). `seen_valid`: a valid row before the tile.
  static void tile_row_bits(const uint8_t* cmask, int64_t cm1, int64_t j0, int mr, const int64_t* bounds,
                            bool seen_valid, Work& w, int64_t& kb, uint32_t& valid, uint32_t& snap,
                            int64_t* bound_at) {
    valid = snap = 0;
    for (int r = 0; r < mr; ++r) {
      valid |= uint32_t(!cmask || cmask[(j0 + r) * cm1]) << r;
      if (j0 + r + 1 == bounds[kb]) {
        snap |= 1u << r;
        w.bvalid[kb] = seen_valid || valid != 0;  // valid holds rows 0 .. r so far
        bound_at[r] = kb++;
      }
    }
  }

  // fold_tile for a 16-row tile of the 16 x 16 kernel (Policy::micro16x16): rows at stride RS
  // from `rows`, the first 16 lanes of one panel.
  template <int RS, bool kArgmax>
  __attribute__((noinline)) static void fold_tile16(const RowT* rows, const PackT* qp, int64_t kc, int64_t j0,
                                                    uint32_t valid, bool seen, Acc* runmax, int32_t* runidx,
                                                    uint32_t snap, const int64_t* bound_at, Acc* bmax, int32_t* bidx,
                                                    int64_t lanes, LinePrefetch& prefetch) {
    if constexpr (Policy::kTile16) {
      auto micro = [&](auto&& epi) {
        LinePrefetch pf = prefetch;  // a local, so that the compiler may keep it in registers
        pf.spread(kc / Policy::kBesideSteps / 2);
        Policy::template micro16x16<RS>(rows, qp, kc, epi, [&pf] { pf.step(); });
        pf.finish();
        prefetch = pf;
      };
      fold_rows<kArgmax>(micro, j0, valid, seen, runmax, runidx, snap, bound_at, bmax, bidx, lanes);
    }
  }

  // Whether score_candidate takes score_candidate16: a policy with the 16 x 16 tile (for its
  // rows and panels: float, or the avx512_bf16 policy's bf16 pairs), one panel whose tokens fit
  // 16 lanes, and D in one chunk of at most 512 (the tile's row stride).
  static bool tile16_path(const Problem& P, const QView& qv, int nt) {
    if constexpr (Policy::kTile16 && Policy::kFoldMax) {
      return nt == 0 && P.kc == P.d && P.d <= 512 && qv.panels == 1 && qv.n * P.groups.rq_eff <= 16;
    }
    return false;
  }

  // score_candidate on 16 x 16 tiles (tile16_path): rows j0 .. j0 + 15 at the fixed stride RS,
  // read in place when they already are (RowT rows of stride RS), else converted or copied
  // into w.rows16, a partial tile padded with zero rows (never folded). Every element is the
  // value the 8 x 32 tiles give it, bitwise: a sequential FMA chain over d, except a row that
  // the 8-row tiling leaves alone in a 1-row tile (rc = 8 m + 1: the last row), which that tile
  // sums in 4 interleaved chains; that row goes through fold_tile<1> here too.
  template <int RS, bool kArgmax>
  static void score_candidate16(const Problem& P, const QView& qv, const T* cand, int64_t cs1, const uint8_t* cmask,
                                int64_t cm1, Work& w, const T* next) {
    const int64_t D = P.d, rc = P.groups.rc_eff, lanes = NR;
    const int64_t* bounds = P.groups.bounds;
    reset_running<kArgmax>(w, lanes);
    int64_t kb = 0;  // next boundary to snapshot
    bool seen_valid = false;
    const int64_t rc16 = tile16_rows(rc);
    for (int64_t j0 = 0; j0 < rc16; j0 += 16) {
      const int mr = int(min64(16, rc16 - j0));
      LinePrefetch prefetch = next_rows_prefetch(next, cs1, D, j0, mr);
      const bool in_place = kDirectRows && cs1 == RS && mr == 16;
      const RowT* rows = tile16_rows_at<RS>(in_place ? reinterpret_cast<const RowT*>(cand + j0 * cs1) : nullptr,
                                           [&](int r) { return cand + (j0 + r) * cs1; }, mr, D, w);
      uint32_t valid, snap;
      int64_t bound_at[16];  // read only where snap has the row's bit
      tile_row_bits(cmask, cm1, j0, mr, bounds, seen_valid, w, kb, valid, snap, bound_at);
      fold_tile16<RS, kArgmax>(rows, qv.pack, D, j0, valid, seen_valid, w.runmax, w.runidx, snap, bound_at, w.bmax,
                               w.bidx, lanes, prefetch);
      seen_valid = seen_valid || valid != 0;
    }
    if (rc16 < rc) {  // the lone last row, as the 8-row tiling computes it
      const int64_t j = rc - 1;
      const RowT* rows[MR];
      tile_rows(cand, cs1, j, 1, 0, D, P.kc, w, rows);
      uint32_t valid, snap;
      int64_t bound_at[1];
      tile_row_bits(cmask, cm1, j, 1, bounds, seen_valid, w, kb, valid, snap, bound_at);
      LinePrefetch prefetch = next_rows_prefetch(next, cs1, D, j, 1);
      fold_tile<MR, kArgmax>(1, rows, qv.pack, D, j, valid, seen_valid, w.runmax, w.runidx, snap, bound_at, w.bmax,
                             w.bidx, lanes, prefetch);
    }
  }

  // Tile state is per thread and other AMX users (torch's oneDNN) reconfigure it between our
  // calls, so a kernel call configures the tiles at its first AMX tile (amx_begin: ldtilecfg
  // costs about 100 ns with its release, as much as a 128-dim 8 x 32 tile) and releases them
  // when it ends: an AmxScope lives beside each carved Work.
  static void amx_begin(Work& w, AmxTiles which = kAmxRows8) {
    if constexpr (kAmxPath) {
      if (w.amx_config != which) {
        Policy::amx_configure(which);
        w.amx_config = which;
      }
    }
  }
  struct AmxScope {
    Work& w;
    ~AmxScope() {
      if constexpr (kAmxPath) {
        if (w.amx_config) Policy::amx_release();
        w.amx_config = kAmxNoTiles;
      }
    }
  };

  // The B blocks (Policy::amx_tile16's layout) of one float panel of NR lanes (bf16 widened
  // exactly, so the top halves are the bf16 bits), dims past D zero.
  static void amx_blocks(const PackT* panel, int64_t D, int64_t ks, uint16_t* dst) {
    for (int64_t s = 0; s < ks; ++s)
      for (int h = 0; h < 2; ++h)
        for (int pr = 0; pr < 16; ++pr) {
          uint16_t* row = dst + ((2 * s + h) * 16 + pr) * 32;
          for (int e = 0; e < 2; ++e) {
            const int64_t k = 32 * s + 2 * pr + e;
            for (int l = 0; l < 16; ++l) {
              uint32_t bits = 0;
              if (k < D) std::memcpy(&bits, panel + k * NR + 16 * h + l, 4);
              row[2 * l + e] = uint16_t(bits >> 16);
            }
          }
        }
  }

  // The B blocks of view qv's panels, kept while the view stays (a query block, or one query in
  // w.qpack1: the key is the pack and first query).
  static void amx_pack_view(const Problem& P, const QView& qv, Work& w) {
    if (w.amx_b_of == qv.pack && w.amx_b_a0 == qv.a0) return;
    for (int64_t p = 0; p < qv.panels; ++p)
      amx_blocks(qv.pack + p * panel_elems(P), P.d, amx_ksteps(P), w.amx_b + p * amx_panel_blocks(P));
    w.amx_b_of = qv.pack;
    w.amx_b_a0 = qv.a0;
  }

  // A tile of MR float rows (exact bf16 values; rows past `real` repeat the last real one, as
  // the micro-kernel's tiles do) as bf16 in w.amx_rows, zero dims up to the 32 multiple.
  static void amx_rows_from_float(const Acc* const* rows, int64_t D, Work& w) {
    const int64_t dp = ceil_div(D, 32) * 32;
    for (int r = 0; r < MR; ++r) {
      uint16_t* dst = w.amx_rows + r * dp;
      for (int64_t k = 0; k < D; ++k) {
        uint32_t bits;
        std::memcpy(&bits, rows[r] + k, 4);
        dst[k] = uint16_t(bits >> 16);
      }
      for (int64_t k = D; k < dp; ++k) dst[k] = 0;
    }
  }

  // score_candidate for bf16 on AMX tiles (kAmxPath): rows j0 .. j0 + 15 against each panel's
  // 32 lanes (16 when the panel holds no more tokens), all of D per tile; the rows are read in
  // place when D is a multiple of 32 and the tile is full, else copied into w.amx_rows with zero
  // dims up to the 32 multiple and zero rows up to 16 (computed, never folded). Folded by
  // fold_rows like every register tile. An element's value does not depend on its row's place
  // in the tile, or on the tiling: one sum over D in TDPBF16PS's order.
  template <bool kArgmax>
  static void score_candidate_amx(const Problem& P, const QView& qv, const T* cand, int64_t cs1, const uint8_t* cmask,
                                  int64_t cm1, Work& w, const T* next) {
    if constexpr (kAmxPath) {
      const int64_t D = P.d, rc = P.groups.rc_eff, np = qv.panels, lanes = np * NR;
      const int64_t ks = amx_ksteps(P), dp = ks * 32, tokens = qv.n * P.groups.rq_eff;
      const int64_t* bounds = P.groups.bounds;
      amx_pack_view(P, qv, w);
      amx_begin(w);
      reset_running<kArgmax>(w, lanes);
      int64_t kb = 0;  // next boundary to snapshot
      bool seen_valid = false;
      for (int64_t j0 = 0; j0 < rc; j0 += 16) {
        const int mr = int(min64(16, rc - j0));
        next_rows_prefetch(next, cs1, D, j0, mr).finish();
        const uint16_t* rows = reinterpret_cast<const uint16_t*>(cand + j0 * cs1);
        int64_t stride = int64_t(sizeof(T)) * cs1;
        if (D != dp || mr < 16) {
          for (int r = 0; r < 16; ++r) {
            uint16_t* dst = w.amx_rows + r * dp;
            const int64_t n = r < mr ? D : 0;
            if (n) std::memcpy(dst, cand + (j0 + r) * cs1, sizeof(T) * n);
            std::memset(dst + n, 0, sizeof(uint16_t) * (dp - n));
          }
          rows = w.amx_rows;
          stride = int64_t(sizeof(uint16_t)) * dp;
        }
        uint32_t valid, snap;
        int64_t bound_at[16];  // read only where snap has the row's bit
        tile_row_bits(cmask, cm1, j0, mr, bounds, seen_valid, w, kb, valid, snap, bound_at);
        for (int64_t p = 0; p < np; ++p) {
          const int halves = tokens - p * NR > 16 ? 2 : 1;
          Policy::amx_tile16(rows, stride, w.amx_b + p * ks * 2 * 16 * 32, ks, halves, w.amx_out);
          auto micro = [&](auto&& epi) { Policy::amx_rows(w.amx_out, mr, halves, epi); };
          fold_rows<kArgmax>(micro, j0, valid, seen_valid, w.runmax + p * NR, w.runidx + p * NR, snap, bound_at,
                             w.bmax + p * NR, w.bidx + p * NR, lanes);
        }
        seen_valid = seen_valid || valid != 0;
      }
    }
  }

  // Rows src[0, M) (M <= MR; D bf16 each) as the A tile of amx_panel8 (kAmxPath), with view qv's
  // B blocks: read in place when MR rows sit at one stride and D is a multiple of 32, else
  // copied into w.amx_rows with zero dims up to the multiple and zero rows up to MR (computed,
  // never read). Returns the row stride in bytes; the rows' pointer goes to *rows.
  static int64_t amx_load_rows(const Problem& P, const QView& qv, const T* const* src, int M, Work& w,
                               const uint16_t** rows) {
    amx_pack_view(P, qv, w);
    amx_begin(w);
    return amx_a_rows<MR>(P, src, M, w, rows);
  }

  // The A rows of an R-row AMX tile (R = MR or 16): rows src[0, m) (m <= R; D bf16 each) read
  // in place when all R sit at one stride and D is a multiple of 32, else copied into
  // w.amx_rows with zero dims up to the multiple and zero rows up to R (computed, never read).
  // Returns the row stride in bytes; the rows' pointer goes to *a.
  template <int R>
  static int64_t amx_a_rows(const Problem& P, const T* const* src, int m, Work& w, const uint16_t** a) {
    const int64_t D = P.d, dp = amx_ksteps(P) * 32;
    if (D == dp && m == R) {
      const int64_t step = src[1] - src[0];
      bool uniform = step > 0;
      for (int r = 2; r < R && uniform; ++r) uniform = src[r] - src[r - 1] == step;
      if (uniform) {
        *a = reinterpret_cast<const uint16_t*>(src[0]);
        return int64_t(sizeof(T)) * step;
      }
    }
    for (int r = 0; r < R; ++r) {
      uint16_t* dst = w.amx_rows + r * dp;
      const int64_t n = r < m ? D : 0;
      if (n) std::memcpy(dst, src[r], sizeof(T) * n);
      std::memset(dst + n, 0, sizeof(uint16_t) * (dp - n));
    }
    *a = w.amx_rows;
    return int64_t(sizeof(uint16_t)) * dp;
  }

  // The MR x NR tile of amx_load_rows' rows against panel p, into out [MR][NR].
  static void amx_panel8(const Problem& P, const uint16_t* rows, int64_t stride, int64_t p, Work& w, Acc* out) {
    if constexpr (kAmxPath) {
      const int64_t ks = amx_ksteps(P);
      Policy::amx_tile8(rows, stride, w.amx_b + p * ks * 2 * 16 * 32, ks, out);
    }
  }

  // 16 x NR tiles of rows src[0, mr) (mr <= 16; D bf16 each, amx_a_rows<16>) against every
  // panel of view qv, into tile [panel][16][NR] (kAmxPath). Each element is
  // score_candidate_amx's value.
  static void amx_tile16_rows(const Problem& P, const QView& qv, const T* const* src, int mr, Work& w, Acc* tile) {
    if constexpr (kAmxPath) {
      static_assert(NR == 32, "amx_tile16 stores 16 x 32 tiles");
      amx_pack_view(P, qv, w);
      amx_begin(w);
      const uint16_t* a;
      const int64_t a_stride = amx_a_rows<16>(P, src, mr, w, &a);
      for (int64_t p = 0; p < qv.panels; ++p)
        Policy::amx_tile16(a, a_stride, w.amx_b + p * amx_panel_blocks(P), amx_ksteps(P), 2, tile + p * 16 * NR);
    }
  }

  // MR x NR tiles of rows src[0, M) against every panel of view qv, into tile [panel][MR][NR]
  // (w.tile's layout), on AMX: the index's multi-candidate tiles. Each element is
  // score_candidate_amx's value.
  static void amx_tile_rows(const Problem& P, const QView& qv, const T* const* src, int M, Work& w, Acc* tile) {
    const uint16_t* rows;
    const int64_t stride = amx_load_rows(P, qv, src, M, w, &rows);
    for (int64_t p = 0; p < qv.panels; ++p) amx_panel8(P, rows, stride, p, w, tile + p * MR * NR);
  }

  // Fills w.bmax[k][t] = max_{j < bounds[k], c valid} S[j][t], w.bvalid[k] = whether any
  // j < bounds[k] is valid (validity comes from the mask alone: -inf is an ordinary value)
  // and, when kArgmax, w.bidx[k][t] = the lowest maximising valid j (-1 when none).
  // NaN follows torch.amax / torch.argmax: a NaN similarity is the maximum, and the lowest
  // NaN index is the argmax. The fold below is therefore
  //   take row j  iff  S > m  or  (S is NaN and m is not)  [or no valid j seen yet, kArgmax]
  // (strict '>' keeps the lowest index on ties; a NaN m stays: NaN is sticky).
  // `next` (nullable) is the candidate processed after this one: its rows are prefetched
  // one chunk at a time, so that candidates stream from DRAM behind the computation.
  template <bool kArgmax>
  // `qrows` (nt of them, from prepare_query_rows) selects the few-token dot path.
  static void score_candidate(const Problem& P, const QView& qv, const T* cand, int64_t cs1,
                              const uint8_t* cmask, int64_t cm1, Work& w, const T* next = nullptr,
                              const Acc* const* qrows = nullptr, int nt = 0) {
    if (kAmxPath && nt == 0) return score_candidate_amx<kArgmax>(P, qv, cand, cs1, cmask, cm1, w, next);
    if (tile16_path(P, qv, nt)) {
      return with_tile16_stride(P.d, [&](auto rs) {
        score_candidate16<decltype(rs)::value, kArgmax>(P, qv, cand, cs1, cmask, cm1, w, next);
      });
    }
    const int64_t D = P.d, KC = P.kc, rc = P.groups.rc_eff, np = qv.panels, lanes = np * NR;
    const int64_t pe = panel_elems(P);
    const int64_t* bounds = P.groups.bounds;
    reset_running<kArgmax>(w, lanes);
    int64_t kb = 0;  // next boundary to snapshot
    bool seen_valid = false;
    for (int64_t j0 = 0; j0 < rc; j0 += MR) {
      const int mr = int(min64(MR, rc - j0));
      // The next candidate's rows j0 .. j0 + mr, into L2: spread over the tile's FMAs when the
      // rows are contiguous and the tile folds on registers, else at once.
      LinePrefetch prefetch = next_rows_prefetch(next, cs1, D, j0, mr);
      // The whole tile in one D chunk: fold on registers, snapshotting at the bounds in it.
      if (Policy::kFoldMax && nt == 0 && KC == D) {
        const RowT* rows[MR];
        tile_rows(cand, cs1, j0, mr, 0, D, KC, w, rows);
        uint32_t valid, snap;
        int64_t bound_at[MR];  // read only where snap has the row's bit
        tile_row_bits(cmask, cm1, j0, mr, bounds, seen_valid, w, kb, valid, snap, bound_at);
        for (int64_t p = 0; p < np; ++p)
          fold_tile<MR, kArgmax>(mr, rows, qv.pack + p * pe, D, j0, valid, seen_valid, w.runmax + p * NR,
                                 w.runidx + p * NR, snap, bound_at, w.bmax + p * NR, w.bidx + p * NR, lanes,
                                 prefetch);
        seen_valid = seen_valid || valid != 0;
        continue;
      }
      prefetch.finish();
      for (int64_t k0 = 0; k0 < D; k0 += KC) {
        const int64_t kc = min64(KC, D - k0);
        const RowT* rows[MR];
        tile_rows(cand, cs1, j0, mr, k0, kc, KC, w, rows);
        if (nt > 0) {
          for (int r = 0; r < mr; ++r) dots(rows[r], qrows, nt, k0, kc, w.tile + r * NR, k0 > 0);
        } else {
          for (int64_t p = 0; p < np; ++p)
            micro_dispatch<MR>(mr, rows, qv.pack + p * pe + k0 * NR, kc, w.tile + p * MR * NR, k0 > 0);
        }
      }
      for (int r = 0; r < mr; ++r) {
        const int64_t j = j0 + r;
        if (!cmask || cmask[j * cm1]) {
          for (int64_t p = 0; p < np; ++p) {
            const Acc* row = w.tile + (p * MR + r) * NR;
            Acc* m = w.runmax + p * NR;
            if (kArgmax) {
              int32_t* ix = w.runidx + p * NR;
              if (seen_valid) {
                for (int l = 0; l < NR; ++l) {
                  const bool take = row[l] > m[l] || (row[l] != row[l] && m[l] == m[l]);
                  m[l] = take ? row[l] : m[l];
                  ix[l] = take ? int32_t(j) : ix[l];
                }
              } else {  // the first valid row is the maximum so far, whatever its value
                for (int l = 0; l < NR; ++l) {
                  m[l] = row[l];
                  ix[l] = int32_t(j);
                }
              }
            } else {
              for (int l = 0; l < NR; ++l) m[l] = (row[l] > m[l] || row[l] != row[l]) ? row[l] : m[l];
            }
          }
          seen_valid = true;
        }
        if (j + 1 == bounds[kb]) {
          w.bvalid[kb] = seen_valid;
          std::memcpy(w.bmax + kb * lanes, w.runmax, sizeof(Acc) * lanes);
          if (kArgmax) std::memcpy(w.bidx + kb * lanes, w.runidx, sizeof(int32_t) * lanes);
          ++kb;
        }
      }
    }
  }

  static bool query_token_valid(const Problem& P, int64_t a, int64_t i) {
    return !P.q.mask || P.q.mask[a * P.q.m0 + i * P.q.m1];
  }

  // scores[a_local][g] = s_g(a, b) from the boundary maxima (tokens summed in order).
  static void block_scores(const Problem& P, const QView& qv, const Work& w, Acc* scores) {
    const int64_t G = P.groups.num_groups, rq = P.groups.rq_eff, lanes = qv.panels * NR;
    const int64_t* grq = P.groups.rq;
    const int64_t* gbound = P.groups.bound_index;
    for (int64_t x = 0; x < qv.n * G; ++x) scores[x] = 0;
    for (int64_t t = 0; t < qv.n * rq; ++t) {
      const int64_t al = t / rq, i = t % rq;
      if (!query_token_valid(P, qv.a0 + al, i)) continue;
      for (int64_t g = 0; g < G; ++g) {
        if (i >= grq[g]) continue;
        if (w.bvalid[gbound[g]]) scores[al * G + g] += w.bmax[gbound[g] * lanes + t];  // none valid -> 0
      }
    }
  }

  // Backward of the scores for one candidate: with dS[a_local][g] = dL/ds_g(a, b),
  //   dq[a, i]  += w * c[b, j*],   dc[b, j*] += w * q[a, i]
  // for each boundary's argmax j*, w summing dS over the groups that share it. A null dq
  // or dc_b is a gradient nobody asked for (output_mask): it is skipped.
  static void scatter(const Problem& P, const QView& qv, const Work& w, const Acc* dS, const T* cand,
                      int64_t cs1, Acc* dq, Acc* dc_b) {
    const int64_t G = P.groups.num_groups, rq = P.groups.rq_eff, D = P.d;
    const int64_t nb = P.groups.num_bounds, lanes = qv.panels * NR;
    const int64_t* grq = P.groups.rq;
    const int64_t* gbound = P.groups.bound_index;
    const T* q = typed<T>(P.q.data);
    for (int64_t t = 0; t < qv.n * rq; ++t) {
      const int64_t al = t / rq, i = t % rq, a = qv.a0 + al;
      if (!query_token_valid(P, a, i)) continue;
      for (int64_t k = 0; k < nb; ++k) w.bound_w[k] = 0;
      bool any = false;
      for (int64_t g = 0; g < G; ++g) {
        if (i < grq[g] && dS[al * G + g] != Acc(0)) {
          w.bound_w[gbound[g]] += dS[al * G + g];
          any = true;
        }
      }
      if (!any) continue;
      const T* qrow = q + a * P.q.s0 + i * P.q.s1;
      Acc* dqrow = dq ? dq + (a * P.rq + i) * D : nullptr;
      // Argmaxes are non-decreasing in k (a longer prefix keeps its max or finds a later
      // one), so equal ones are adjacent: merge them into one pair of axpys.
      int32_t cur = -1;
      Acc wcur = 0;
      for (int64_t k = 0; k <= nb; ++k) {
        const int32_t j = k < nb ? w.bidx[k * lanes + t] : -2;
        const Acc wk = k < nb ? w.bound_w[k] : Acc(0);
        if (j == cur) {
          wcur += wk;
          continue;
        }
        if (cur >= 0 && wcur != Acc(0)) {
          if (dq) Policy::axpy(wcur, cand + cur * cs1, dqrow, D);
          if (dc_b) Policy::axpy(wcur, qrow, dc_b + cur * D, D);
        }
        cur = j;
        wcur = wk;
      }
    }
  }

  // Candidate-side gradients (dc[b], dhn[a, k], the paired dc[a, n]) are written in the input
  // type T. A candidate's rows are complete once its last scatter is done, so they are summed
  // in Acc and stored once: for bf16 / fp16 inputs no Acc copy of the gradient, twice its size,
  // exists at any time. With T == Acc the rows are summed in place. Rows j >= rc_eff are never
  // written (the host zeroes the buffer).
  static Acc* candidate_grad_begin(const Problem& P, const Work& w, T* rows) {
    if constexpr (std::is_same_v<T, Acc>) {
      return rows;
    } else {
      std::memset(static_cast<void*>(w.dcand), 0, candidate_grad_bytes(P));
      return w.dcand;
    }
  }
  static void candidate_grad_end(const Problem& P, const Work& w, T* rows) {
    if constexpr (!std::is_same_v<T, Acc>) {
      const int64_t n = P.groups.rc_eff * P.d;
      for (int64_t e = 0; e < n; ++e) rows[e] = scalar_from_float<T>(w.dcand[e]);
    }
  }

  // ---- entry points -------------------------------------------------------------------

  static const T* candidate(const Problem& P, int64_t b) { return typed<T>(P.c.data) + b * P.c.s0; }
  static const T* next_candidate(const Problem& P, int64_t b, int64_t b_end) {
    return b + 1 < b_end ? candidate(P, b + 1) : nullptr;
  }
  static const uint8_t* candidate_mask(const Problem& P, int64_t b) {
    return P.c.mask ? P.c.mask + b * P.c.m0 : nullptr;
  }

  // In-batch candidate b (of the range [.., b1)) against query block qb; the next candidate
  // is prefetched while the last query block scores this one.
  template <bool kArgmax>
  static void score_block_candidate(const Problem& P, const QView& qv, int64_t qb, int64_t b, int64_t b1, Work& w) {
    score_candidate<kArgmax>(P, qv, candidate(P, b), P.c.s1, candidate_mask(P, b), P.c.m1, w,
                             qb + 1 == P.num_qblocks ? next_candidate(P, b, b1) : nullptr);
  }

  // ---- saved argmax (SavedArgmax in kernels.h) ------------------------------------------
  // The view's queries against column `col` of `cols`: w.bidx <-> the saved elements.
  static int64_t saved_index(const Problem& P, int64_t a, int64_t col, int64_t cols, int64_t i, int64_t k) {
    return ((a * cols + col) * P.groups.rq_eff + i) * P.groups.num_bounds + k;
  }

  static void save_argmax(const Problem& P, const QView& qv, const Work& w, SavedArgmax sa, int64_t col,
                          int64_t cols) {
    const int64_t rq = P.groups.rq_eff, nb = P.groups.num_bounds, lanes = qv.panels * NR;
    for (int64_t t = 0; t < qv.n * rq; ++t)
      for (int64_t k = 0; k < nb; ++k) {
        const int64_t e = saved_index(P, qv.a0 + t / rq, col, cols, t % rq, k);
        const int32_t j = w.bidx[k * lanes + t];
        if (sa.wide)
          static_cast<int32_t*>(sa.data)[e] = j;
        else
          static_cast<int16_t*>(sa.data)[e] = int16_t(j);
      }
  }

  static void load_argmax(const Problem& P, const QView& qv, Work& w, SavedArgmax sa, int64_t col, int64_t cols) {
    const int64_t rq = P.groups.rq_eff, nb = P.groups.num_bounds, lanes = qv.panels * NR;
    for (int64_t t = 0; t < qv.n * rq; ++t)
      for (int64_t k = 0; k < nb; ++k) {
        const int64_t e = saved_index(P, qv.a0 + t / rq, col, cols, t % rq, k);
        w.bidx[k * lanes + t] = sa.wide ? static_cast<const int32_t*>(sa.data)[e]
                                        : int32_t(static_cast<const int16_t*>(sa.data)[e]);
      }
  }

  static void maxsim_forward(const Problem& P, int64_t qblock, int64_t b0, int64_t b1, void* ws, void* out_,
                             SavedArgmax save) {
    Work w = carve(P, ws);
    const AmxScope amx_scope{w};
    const QView qv = block_view(P, qblock);
    const int64_t G = P.groups.num_groups;
    Acc* out = static_cast<Acc*>(out_);
    const Acc* qrows[kDotTokens];
    const int nt = prepare_query_rows(P, qv, w, qrows);
    for (int64_t b = b0; b < b1; ++b) {
      if (save.data) {
        score_candidate<true>(P, qv, candidate(P, b), P.c.s1, candidate_mask(P, b), P.c.m1, w,
                              next_candidate(P, b, b1), qrows, nt);
        save_argmax(P, qv, w, save, b, P.nc);
      } else {
        score_candidate<false>(P, qv, candidate(P, b), P.c.s1, candidate_mask(P, b), P.c.m1, w,
                               next_candidate(P, b, b1), qrows, nt);
      }
      block_scores(P, qv, w, w.scores);
      for (int64_t al = 0; al < qv.n; ++al)
        for (int64_t g = 0; g < G; ++g) out[(g * P.nq + qv.a0 + al) * P.nc + b] = w.scores[al * G + g];
    }
  }

  // ---- candidate lanes: batched queries at small budgets (Problem::layout) -------------
  //
  // At r_c = 1 a register tile of MR tokens of ONE candidate has one real row, so the
  // query-panel layout runs its micro-kernel on 1-row tiles and pays a fold, a group sum and
  // one strided store per query for every candidate. Here the roles swap: token j of NR
  // candidates is packed into one panel (lane = candidate), and MR query tokens (whole
  // queries: MR / r_q of them) are broadcast, so the same micro-kernel produces
  //   tile_j[t][l] = <q[t], c[b0 + l, j]>      (t: query token, l: candidate lane).
  // The max over j is then a lane-wise fold across the r_c tiles, the sum over i a lane-wise
  // sum across rows, and the scores of one query land as NR consecutive b: contiguous stores.
  // Each element is the same sequential FMA chain over D as in the query-panel layout (tiles
  // of >= 2 rows, see the policies), so scores and argmaxes agree with every other path, and
  // the fixed tile height (a short row group repeats its last row) keeps every element's
  // arithmetic independent of the thread split.

  static int lane_queries(const Problem& P) { return int(MR / P.groups.rq_eff); }  // whole queries per tile
  static int lane_rows(const Problem& P) { return lane_queries(P) * int(P.groups.rq_eff); }

  // Query rows of queries [a0, a0 + n) into qpack (RowT rows of D; a masked token is zero).
  static void lane_query_rows(const Problem& P, int64_t a0, int64_t n) {
    const int64_t rq = P.groups.rq_eff, D = P.d;
    const T* q = typed<T>(P.q.data);
    RowT* dst = static_cast<RowT*>(P.qpack) + a0 * rq * D;
    for (int64_t t = 0; t < n * rq; ++t, dst += D) {
      const int64_t a = a0 + t / rq, i = t % rq;
      const T* src = q + a * P.q.s0 + i * P.q.s1;
      if (!query_token_valid(P, a, i))
        std::memset(static_cast<void*>(dst), 0, sizeof(RowT) * D);
      else if constexpr (kDirectRows)
        std::memcpy(static_cast<void*>(dst), src, sizeof(T) * D);
      else
        Policy::convert(src, dst, D);
    }
  }

  // Candidates [b0, b0 + nl) into w.lpanel (Policy::pack_lanes: lanes >= nl and masked
  // tokens are zero), and per lane (candidate): w.lvalid[j] whether token j is valid,
  // w.lseen[j] whether some token before j is, w.lbvalid[k] whether prefix k holds one.
  static void pack_candidate_block(const Problem& P, int64_t b0, int nl, Work& w) {
    const int64_t rc = P.groups.rc_eff, pe = panel_elems(P);
    const T* c = typed<T>(P.c.data);
    int32_t any[NR] = {};
    int64_t kb = 0;
    for (int64_t j = 0; j < rc; ++j) {
      int32_t* v = w.lvalid + j * NR;
      const T* src[NR];
      for (int l = 0; l < NR; ++l) {
        const int64_t b = b0 + l;
        v[l] = l < nl && (!P.c.mask || P.c.mask[b * P.c.m0 + j * P.c.m1]);
        src[l] = v[l] ? c + b * P.c.s0 + j * P.c.s1 : nullptr;
        w.lseen[j * NR + l] = any[l];
        any[l] |= v[l];
      }
      Policy::pack_lanes(src, P.d, w.lpanel + j * pe);
      if constexpr (kAmxPath) amx_blocks(w.lpanel + j * pe, P.d, amx_ksteps(P), w.amx_lanes_b + j * amx_panel_blocks(P));
      if (j + 1 == P.groups.bounds[kb]) std::memcpy(w.lbvalid + NR * kb++, any, sizeof(any));
    }
  }

  // Tiles of the row group of queries [ag, ag + nqg) against the packed block: w.ltile[j].
  static void lane_tiles(const Problem& P, int64_t ag, int nqg, Work& w) {
    const int64_t rq = P.groups.rq_eff, D = P.d, pe = panel_elems(P);
    const int real = nqg * int(rq);
    const RowT* base = static_cast<const RowT*>(P.qpack) + ag * rq * D;
    const RowT* rows[MR];
    for (int r = 0; r < MR; ++r) rows[r] = base + (r < real ? r : real - 1) * D;
    if constexpr (kAmxPath) {  // bf16 on AMX: all MR rows (past lane_rows(P): repeats, never stored)
      amx_rows_from_float(rows, D, w);
      amx_begin(w);
      const int64_t ks = amx_ksteps(P);
      for (int64_t j = 0; j < P.groups.rc_eff; ++j)
        Policy::amx_tile8(w.amx_rows, int64_t(sizeof(uint16_t)) * ks * 32, w.amx_lanes_b + j * amx_panel_blocks(P), ks,
                          w.ltile + j * MR * NR);
      return;
    }
    for (int64_t j = 0; j < P.groups.rc_eff; ++j)
      micro_dispatch<MR>(lane_rows(P), rows, w.lpanel + j * pe, D, w.ltile + j * MR * NR, false);
  }

  // Fold over j, lane-wise and for all MR rows at once (the NaN-propagating fold of
  // score_candidate: take S iff valid and (S > m, or S is NaN and m is not, or no valid token
  // before it, the last two only when tracking the argmax; without it, a NaN S is taken and
  // stays), snapshotted at the bounds into w.lbmax[k] / w.lbidx[k]; then the group sums,
  // stored as rows of consecutive b.
  template <bool kArgmax>
  static void lane_epilogue(const Problem& P, int64_t ag, int nqg, int64_t b0, int nl, Work& w, Acc* out,
                            SavedArgmax save, bool stream) {
    constexpr int T_ = MR * NR;
    const int64_t rq = P.groups.rq_eff, rc = P.groups.rc_eff, nb = P.groups.num_bounds, G = P.groups.num_groups;
    const int64_t* bounds = P.groups.bounds;
    // r_c = 1 without the argmax: the only snapshot is the tile itself (its invalid lanes
    // are the candidates whose prefix is empty: they score 0 below), so nothing is folded.
    const bool fold = kArgmax || rc > 1;
    const Acc* bmax = fold ? w.lbmax : w.ltile;
    int64_t kb = 0;
    for (int64_t j = 0; j < (fold ? rc : 0); ++j) {
      const Acc* s = w.ltile + j * T_;
      const int32_t* v = w.lvalid + j * NR;
      Acc* m = w.lbmax + kb * T_;
      int32_t* ix = w.lbidx + kb * T_;
      if (j == 0) {
        for (int r = 0; r < MR; ++r)
          for (int l = 0; l < NR; ++l) {
            const Acc x = s[r * NR + l];  // loaded unconditionally: the loop vectorises
            m[r * NR + l] = v[l] ? x : Acc(-INFINITY);
            if (kArgmax) ix[r * NR + l] = v[l] ? 0 : -1;
          }
      } else if (kArgmax) {
        const int32_t* seen = w.lseen + j * NR;
        const int32_t jj = int32_t(j);
        for (int r = 0; r < MR; ++r)
          for (int l = 0; l < NR; ++l) {
            const Acc x = s[r * NR + l], y = m[r * NR + l];
            const bool take = v[l] && (!seen[l] || x > y || (x != x && y == y));
            m[r * NR + l] = take ? x : y;
            ix[r * NR + l] = take ? jj : ix[r * NR + l];
          }
      } else {
        for (int r = 0; r < MR; ++r)
          for (int l = 0; l < NR; ++l) {
            const Acc x = s[r * NR + l], y = m[r * NR + l];
            m[r * NR + l] = (v[l] && (x > y || x != x)) ? x : y;
          }
      }
      if (j + 1 == bounds[kb]) {  // snapshot: later tokens fold into the next bound's copy
        if (kb + 1 < nb) {
          std::memcpy(m + T_, m, sizeof(Acc) * T_);
          if (kArgmax) std::memcpy(ix + T_, ix, sizeof(int32_t) * T_);
        }
        ++kb;
      }
    }
    if (kArgmax) {  // saved element ((a * nc + b) * rq_eff + i) * nb + k
      const int64_t step = rq * nb;
      for (int r = 0; r < nqg * int(rq); ++r) {
        const int64_t a = ag + r / rq, i = r % rq;
        for (int64_t k = 0; k < nb; ++k) {
          const int32_t* bi = w.lbidx + k * T_ + r * NR;
          const int64_t e0 = saved_index(P, a, b0, P.nc, i, k);
          if (save.wide)
            for (int l = 0; l < nl; ++l) static_cast<int32_t*>(save.data)[e0 + l * step] = bi[l];
          else
            for (int l = 0; l < nl; ++l) static_cast<int16_t*>(save.data)[e0 + l * step] = int16_t(bi[l]);
        }
      }
    }
    for (int al = 0; al < nqg; ++al) {
      const int64_t a = ag + al;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t k = P.groups.bound_index[g];
        alignas(64) Acc sum[NR] = {};
        for (int64_t i = 0; i < P.groups.rq[g]; ++i) {  // tokens summed in order, as block_scores
          if (!query_token_valid(P, a, i)) continue;
          const Acc* bm = bmax + k * T_ + (al * rq + i) * NR;
          for (int l = 0; l < NR; ++l) sum[l] += bm[l];
        }
        const int32_t* bv = w.lbvalid + k * NR;  // no valid token in the prefix -> 0
        Acc* o = out + (g * P.nq + a) * P.nc + b0;
        if (nl == NR) {
          for (int l = 0; l < NR; ++l) sum[l] = bv[l] ? sum[l] : Acc(0);
          if (stream)
            Policy::stream_row(o, sum);
          else
            std::memcpy(static_cast<void*>(o), sum, sizeof(sum));
        } else {
          for (int l = 0; l < nl; ++l) o[l] = bv[l] ? sum[l] : Acc(0);
        }
      }
    }
  }

  // Memory behind the computation: a tile takes ~1k cycles and writes a few lines of scores
  // to distinct rows of a (G, Nq, Nc) output far larger than the caches, and each candidate
  // block is read once. Without help both stall on DRAM latency (the stores on their
  // read-for-ownership): the next row group's score lines and, spread over the last query
  // block's row groups, the next candidate block are prefetched.
  static void prefetch_scores(const Problem& P, const Acc* out, int64_t ag, int nqg, int64_t b0, int nl) {
    for (int64_t g = 0; g < P.groups.num_groups; ++g)
      for (int al = 0; al < nqg; ++al) {
        const char* o = reinterpret_cast<const char*>(out + (g * P.nq + ag + al) * P.nc + b0);
        const int64_t bytes = int64_t(sizeof(Acc)) * nl;
        for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(o + off, 1, 3);
        __builtin_prefetch(o + bytes - 1, 1, 3);
      }
  }

  static void prefetch_candidates(const Problem& P, int64_t cb, int64_t part, int64_t parts) {
    const int64_t b0 = cb * NR, nl = min64(NR, P.nc - b0);
    const T* c = typed<T>(P.c.data);
    for (int64_t l = part * nl / parts; l < (part + 1) * nl / parts; ++l)
      for (int64_t j = 0; j < P.groups.rc_eff; ++j) {
        const char* row = reinterpret_cast<const char*>(c + (b0 + l) * P.c.s0 + j * P.c.s1);
        for (int64_t off = 0; off < int64_t(sizeof(T)) * P.d; off += 64) __builtin_prefetch(row + off, 0, 3);
      }
  }

  template <bool kArgmax>
  static void lane_items(const Problem& P, int64_t x0, int64_t x1, Work& w, Acc* out, SavedArgmax save) {
    const int qpt = lane_queries(P);
    // Full blocks of scores are 64-byte aligned rows of NR: where the policy can and the
    // output is past the private caches, they are stored non-temporally (no read for
    // ownership of lines this pass never reads; the stores stalled the tiles before).
    const bool stream = Policy::kStreamScores && reinterpret_cast<uintptr_t>(out) % 64 == 0 &&
                        (P.nc * int64_t(sizeof(Acc))) % 64 == 0 && (NR * sizeof(Acc)) % 64 == 0 &&
                        P.groups.num_groups * P.nq * P.nc * int64_t(sizeof(Acc)) >= (int64_t(4) << 20);
    const bool direct = lane_direct(P);
    int64_t packed = -1;
    for (int64_t x = x0; x < x1; ++x) {
      const int64_t cb = x / P.num_qblocks, qb = x % P.num_qblocks;
      const int64_t b0 = cb * NR;
      const int nl = int(min64(NR, P.nc - b0));
      if (cb != packed) {
        pack_candidate_block(P, b0, nl, w);
        packed = cb;
      }
      const bool next_block = qb + 1 == P.num_qblocks && x + 1 < x1;  // this thread packs cb + 1 next
      const int64_t a0 = qb * P.queries_per_block, a1 = min64(P.nq, a0 + P.queries_per_block);
      const int64_t groups = ceil_div(a1 - a0, qpt);
      for (int64_t ag = a0, gi = 0; ag < a1; ag += qpt, ++gi) {
        const int nqg = int(min64(qpt, a1 - ag));
        if (!stream && ag + qpt < a1) prefetch_scores(P, out, ag + qpt, int(min64(qpt, a1 - ag - qpt)), b0, nl);
        if (next_block) prefetch_candidates(P, cb + 1, gi, groups);
        if constexpr (!kArgmax && Policy::kDirectScoreRows) {
          if (direct) {
            lane_direct_tile(P, ag, nqg, b0, nl, w, out, stream);
            continue;
          }
        }
        lane_tiles(P, ag, nqg, w);
        lane_epilogue<kArgmax>(P, ag, nqg, b0, nl, w, out, save, stream);
      }
    }
    if (stream) Policy::stream_fence();
  }

  // r_q = r_c = 1 in one group (a plain GEMM: a score is one similarity): the micro-kernel's
  // finished rows are stored as scores from its registers (Policy::store_score_row), without
  // the tile and lane_epilogue's pass over it. Same values: 0 + S where the candidate's token
  // and the query's token are valid, else 0.
  static bool lane_direct(const Problem& P) {
    return P.groups.rq_eff == 1 && P.groups.rc_eff == 1 && P.groups.num_groups == 1 && lane_rows(P) == MR;
  }

  static void lane_direct_tile(const Problem& P, int64_t ag, int nqg, int64_t b0, int nl, Work& w, Acc* out,
                               bool stream) {
    if constexpr (Policy::kDirectScoreRows) {
      const RowT* base = static_cast<const RowT*>(P.qpack) + ag * P.d;
      const RowT* rows[MR];
      for (int r = 0; r < MR; ++r) rows[r] = base + (r < nqg ? r : nqg - 1) * P.d;
      uint32_t keep = 0;  // lanes whose candidate token is valid (padding lanes are not)
      for (int l = 0; l < NR; ++l) keep |= uint32_t(w.lvalid[l] != 0) << l;
      auto store = [&](int r, const auto* v) {
        if (r >= nqg) return;
        const int64_t a = ag + r;
        Policy::store_score_row(v, query_token_valid(P, a, 0) ? keep : 0u, out + a * P.nc + b0, nl, stream);
      };
      if constexpr (kAmxPath) {  // bf16 on AMX: the tile through w.amx_out
        amx_rows_from_float(rows, P.d, w);
        amx_begin(w);
        const int64_t ks = amx_ksteps(P);
        Policy::amx_tile8(w.amx_rows, int64_t(sizeof(uint16_t)) * ks * 32, w.amx_lanes_b, ks, w.amx_out);
        Policy::amx_rows(w.amx_out, nqg, 2, store);
      } else {
        Policy::template micro_epilogue<MR>(rows, w.lpanel, P.d, nullptr, false, store);
      }
    }
  }

  static void maxsim_forward_lanes(const Problem& P, int64_t x0, int64_t x1, void* ws, void* out, SavedArgmax save) {
    Work w = carve(P, ws);
    const AmxScope amx_scope{w};
    // rows past lane_rows(P) of each tile are never written by the micro-kernel; the
    // epilogue folds all MR rows (fixed trip counts), so they start as defined zeros
    std::memset(static_cast<void*>(w.ltile), 0, sizeof(Acc) * P.groups.rc_eff * MR * NR);
    if (save.data)
      lane_items<true>(P, x0, x1, w, static_cast<Acc*>(out), save);
    else
      lane_items<false>(P, x0, x1, w, static_cast<Acc*>(out), save);
  }

  // With a saved argmax no similarity is recomputed: the backward is the scatter alone.
  static void maxsim_backward(const Problem& P, const void* grad_, int64_t b0, int64_t b1, void* ws,
                              void* dq_, void* dc_, SavedArgmax saved) {
    Work w = carve(P, ws);
    const AmxScope amx_scope{w};
    const Acc* grad = static_cast<const Acc*>(grad_);
    const int64_t G = P.groups.num_groups;
    for (int64_t b = b0; b < b1; ++b) {
      T* dc_out = dc_ ? static_cast<T*>(dc_) + b * P.rc * P.d : nullptr;
      Acc* dc_b = dc_out ? candidate_grad_begin(P, w, dc_out) : nullptr;
      for (int64_t qb = 0; qb < P.num_qblocks; ++qb) {
        const QView qv = block_view(P, qb);
        if (saved.data)
          load_argmax(P, qv, w, saved, b, P.nc);
        else
          score_block_candidate<true>(P, qv, qb, b, b1, w);
        for (int64_t al = 0; al < qv.n; ++al)
          for (int64_t g = 0; g < G; ++g) w.dscores[al * G + g] = grad[(g * P.nq + qv.a0 + al) * P.nc + b];
        scatter(P, qv, w, w.dscores, candidate(P, b), P.c.s1, static_cast<Acc*>(dq_), dc_b);
      }
      if (dc_out) candidate_grad_end(P, w, dc_out);
    }
  }

  // Online log-sum-exp: (m, l) <- (max(m, x), l * exp(m - max) + exp(x - max)), with
  // lse = m + log(l) at the end. x == m adds exactly 1, so equal infinite logits behave as
  // in torch.logsumexp (all -inf -> -inf, any +inf -> +inf) instead of exp(inf - inf) = NaN;
  // a NaN logit (or a NaN m) makes l NaN, so the loss is NaN, as in torch.
  static void lse_update(Acc& m, Acc& l, Acc x) {
    if (x > m) {
      l = l * std::exp(m - x) + Acc(1);
      m = x;
    } else {
      l += x == m ? Acc(1) : std::exp(x - m);
    }
  }

  static void infonce_forward(const Problem& P, const int64_t* labels, double scale, int64_t b0, int64_t b1,
                              void* ws, void* m_, void* l_, void* pos_) {
    Work w = carve(P, ws);
    const AmxScope amx_scope{w};
    Acc* m = static_cast<Acc*>(m_);
    Acc* l = static_cast<Acc*>(l_);
    Acc* pos = static_cast<Acc*>(pos_);
    const int64_t G = P.groups.num_groups;
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t qb = 0; qb < P.num_qblocks; ++qb) {
        const QView qv = block_view(P, qb);
        score_block_candidate<false>(P, qv, qb, b, b1, w);
        block_scores(P, qv, w, w.scores);
        for (int64_t al = 0; al < qv.n; ++al) {
          const int64_t a = qv.a0 + al;
          for (int64_t g = 0; g < G; ++g) {
            const Acc x = Acc(scale) * w.scores[al * G + g];
            lse_update(m[g * P.nq + a], l[g * P.nq + a], x);
            if (labels[a] == b) pos[g * P.nq + a] = x;
          }
        }
      }
    }
  }

  static const T* hard_negative(const Problem& P, const Tokens& hn, int64_t a, int64_t k) {
    return typed<T>(hn.data) + a * hn.s0 + k * hn.s1;
  }

  static void infonce_forward_hard(const Problem& P, const Tokens& hn, int64_t K, double scale, int64_t a0,
                                   int64_t a1, void* ws, void* m_, void* l_) {
    Work w = carve(P, ws);
    const AmxScope amx_scope{w};
    Acc* m = static_cast<Acc*>(m_);
    Acc* l = static_cast<Acc*>(l_);
    const int64_t G = P.groups.num_groups;
    for (int64_t a = a0; a < a1; ++a) {
      pack_range(P, a, 1, w.qpack1);
      const QView qv{w.qpack1, a, 1, ceil_div(P.groups.rq_eff, NR)};
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t* mask = hn.mask ? hn.mask + a * hn.m0 + k * hn.m1 : nullptr;
        score_candidate<false>(P, qv, hard_negative(P, hn, a, k), hn.s2, mask, hn.m2, w);
        block_scores(P, qv, w, w.scores);
        for (int64_t g = 0; g < G; ++g) lse_update(m[g * P.nq + a], l[g * P.nq + a], Acc(scale) * w.scores[g]);
      }
    }
  }

  static void infonce_backward(const Problem& P, const int64_t* labels, double scale, const void* grad_,
                               const void* lse_, int64_t b0, int64_t b1, void* ws, void* dq_, void* dc_) {
    Work w = carve(P, ws);
    const AmxScope amx_scope{w};
    const Acc* grad = static_cast<const Acc*>(grad_);
    const Acc* lse = static_cast<const Acc*>(lse_);
    const int64_t G = P.groups.num_groups;
    const Acc sc = Acc(scale);
    for (int64_t b = b0; b < b1; ++b) {
      T* dc_out = dc_ ? static_cast<T*>(dc_) + b * P.rc * P.d : nullptr;
      Acc* dc_b = dc_out ? candidate_grad_begin(P, w, dc_out) : nullptr;
      for (int64_t qb = 0; qb < P.num_qblocks; ++qb) {
        const QView qv = block_view(P, qb);
        score_block_candidate<true>(P, qv, qb, b, b1, w);
        block_scores(P, qv, w, w.scores);
        for (int64_t al = 0; al < qv.n; ++al) {
          const int64_t a = qv.a0 + al;
          for (int64_t g = 0; g < G; ++g) {
            const int64_t x = g * P.nq + a;
            const Acc p = std::exp(sc * w.scores[al * G + g] - lse[x]) - (labels[a] == b ? Acc(1) : Acc(0));
            w.dscores[al * G + g] = grad[x] * sc * p;
          }
        }
        scatter(P, qv, w, w.dscores, candidate(P, b), P.c.s1, static_cast<Acc*>(dq_), dc_b);
      }
      if (dc_out) candidate_grad_end(P, w, dc_out);
    }
  }

  static void infonce_backward_hard(const Problem& P, const Tokens& hn, int64_t K, double scale,
                                    const void* grad_, const void* lse_, int64_t a0, int64_t a1, void* ws,
                                    void* dq_, void* dhn_) {
    Work w = carve(P, ws);
    const AmxScope amx_scope{w};
    const Acc* grad = static_cast<const Acc*>(grad_);
    const Acc* lse = static_cast<const Acc*>(lse_);
    const int64_t G = P.groups.num_groups;
    const Acc sc = Acc(scale);
    for (int64_t a = a0; a < a1; ++a) {
      pack_range(P, a, 1, w.qpack1);
      const QView qv{w.qpack1, a, 1, ceil_div(P.groups.rq_eff, NR)};
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t* mask = hn.mask ? hn.mask + a * hn.m0 + k * hn.m1 : nullptr;
        const T* cand = hard_negative(P, hn, a, k);
        score_candidate<true>(P, qv, cand, hn.s2, mask, hn.m2, w);
        block_scores(P, qv, w, w.scores);
        for (int64_t g = 0; g < G; ++g) {
          const int64_t x = g * P.nq + a;
          w.dscores[g] = grad[x] * sc * std::exp(sc * w.scores[g] - lse[x]);
        }
        T* dhn_out = dhn_ ? static_cast<T*>(dhn_) + (a * K + k) * P.rc * P.d : nullptr;
        scatter(P, qv, w, w.dscores, cand, hn.s2, static_cast<Acc*>(dq_),
                dhn_out ? candidate_grad_begin(P, w, dhn_out) : nullptr);
        if (dhn_out) candidate_grad_end(P, w, dhn_out);
      }
    }
  }

  // ---- fused loss forward with the query gradient --------------------------------------
  // When q needs a gradient, the loss forward also produces it, in the same pass over the
  // similarity tiles (the backward then needs no recompute for dq). For the queries of one
  // block, owned by the calling thread, next to the online log-sum-exp (m, l) it keeps per
  // group g the softmax-weighted sum of the score gradients, rescaled whenever the running
  // max moves (as flash-attention rescales its output):
  //
  //   J[a, g] = sum_b exp(scale s_g(a, b) - m) ds_g(a, b)/dq[a]      (b: in-batch, then own negatives)
  //   dterms_g(a)/dq[a] = scale * (J[a, g] / l - ds_g(a, labels[a])/dq[a])
  //
  // ds_g(a, b)/dq[a, i] = c[b, argmax_g(a, i, b)] for the valid tokens i < r_q(g) whose prefix
  // holds a valid token. Group g's rows i < r_q(g) of query a are jq[a, goff[g] + i, :] (jq is
  // (nq, sum_g r_q(g), d), zeroed by the host). The positive's term is folded in last, as
  // -l times its gradient, before the rows are scaled by scale / l.

  // jq rows += weight[al][g] * c[argmax_g] for every (token, group) of the view.
  static void scatter_query_groups(const Problem& P, const QView& qv, const Work& w, const Acc* weight,
                                   const T* cand, int64_t cs1, Acc* jq, const int64_t* goff, int64_t rows) {
    const int64_t G = P.groups.num_groups, rq = P.groups.rq_eff, D = P.d, lanes = qv.panels * NR;
    for (int64_t t = 0; t < qv.n * rq; ++t) {
      const int64_t al = t / rq, i = t % rq, a = qv.a0 + al;
      if (!query_token_valid(P, a, i)) continue;
      for (int64_t g = 0; g < G; ++g) {
        const Acc wt = weight[al * G + g];
        if (i >= P.groups.rq[g] || wt == Acc(0)) continue;
        const int32_t j = w.bidx[P.groups.bound_index[g] * lanes + t];  // -1: no valid token in the prefix
        if (j >= 0) Policy::axpy(wt, cand + j * cs1, jq + (a * rows + goff[g] + i) * D, D);
      }
    }
  }

  // Online update of (m, l) for logit x, rescaling group g's rows of query a; returns the
  // weight exp(x - m) of x (1 when x sets the max).
  static Acc lse_update_rows(Acc& m, Acc& l, Acc x, Acc* rows, int64_t n) {
    if (x > m) {
      const Acc f = std::exp(m - x);
      if (l != Acc(0))
        for (int64_t e = 0; e < n; ++e) rows[e] *= f;
      l = l * f + Acc(1);
      m = x;
      return Acc(1);
    }
    const Acc weight = x == m ? Acc(1) : std::exp(x - m);
    l += weight;
    return weight;
  }

  static void infonce_forward_query_gradient(const Problem& P, const int64_t* labels, double scale,
                                             const Tokens& hn, int64_t K, int64_t qblock, void* ws, void* m_,
                                             void* l_, void* pos_, void* jq_, const int64_t* goff, int64_t rows) {
    Work w = carve(P, ws);
    const AmxScope amx_scope{w};
    Acc* m = static_cast<Acc*>(m_);
    Acc* l = static_cast<Acc*>(l_);
    Acc* pos = static_cast<Acc*>(pos_);
    Acc* jq = static_cast<Acc*>(jq_);
    const int64_t G = P.groups.num_groups, D = P.d;
    const Acc sc = Acc(scale);
    auto fold = [&](const QView& qv, int64_t b, bool in_batch) {  // w.scores -> (m, l), weights
      for (int64_t al = 0; al < qv.n; ++al) {
        const int64_t a = qv.a0 + al;
        for (int64_t g = 0; g < G; ++g) {
          const Acc x = sc * w.scores[al * G + g];
          Acc* group_rows = jq + (a * rows + goff[g]) * D;
          w.dscores[al * G + g] = lse_update_rows(m[g * P.nq + a], l[g * P.nq + a], x, group_rows, P.groups.rq[g] * D);
          if (in_batch && labels[a] == b) pos[g * P.nq + a] = x;
        }
      }
    };
    // In-batch candidates, streamed past this block's packed queries.
    const QView qv = block_view(P, qblock);
    for (int64_t b = 0; b < P.nc; ++b) {
      score_candidate<true>(P, qv, candidate(P, b), P.c.s1, candidate_mask(P, b), P.c.m1, w,
                            next_candidate(P, b, P.nc));
      block_scores(P, qv, w, w.scores);
      fold(qv, b, true);
      scatter_query_groups(P, qv, w, w.dscores, candidate(P, b), P.c.s1, jq, goff, rows);
    }
    // Each query's own hard negatives, then its positive (weight -l), then the scale / l.
    for (int64_t a = qv.a0; a < qv.a0 + qv.n; ++a) {
      pack_range(P, a, 1, w.qpack1);
      const QView one{w.qpack1, a, 1, ceil_div(P.groups.rq_eff, NR)};
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t* mask = hn.mask ? hn.mask + a * hn.m0 + k * hn.m1 : nullptr;
        const T* cand = hard_negative(P, hn, a, k);
        score_candidate<true>(P, one, cand, hn.s2, mask, hn.m2, w);
        block_scores(P, one, w, w.scores);
        fold(one, -1, false);
        scatter_query_groups(P, one, w, w.dscores, cand, hn.s2, jq, goff, rows);
      }
      const int64_t b = labels[a];
      score_candidate<true>(P, one, candidate(P, b), P.c.s1, candidate_mask(P, b), P.c.m1, w);
      for (int64_t g = 0; g < G; ++g) w.dscores[g] = -l[g * P.nq + a];
      scatter_query_groups(P, one, w, w.dscores, candidate(P, b), P.c.s1, jq, goff, rows);
      for (int64_t g = 0; g < G; ++g) {
        const Acc f = sc / l[g * P.nq + a];
        Acc* group_rows = jq + (a * rows + goff[g]) * D;
        for (int64_t e = 0; e < P.groups.rq[g] * D; ++e) group_rows[e] *= f;
      }
    }
  }

  // ---- per-query candidates (maxsim_paired_grouped) ------------------------------------
  // Query a against its own candidates cand[a, n], n < N (the hard-negative layout):
  //   out[g, a, n] = s_g(q[a], cand[a, n]).
  // Work is split by query; each query owns its dq rows and its candidates' dc rows.

  static void paired_forward(const Problem& P, const Tokens& cand, int64_t N, int64_t a0, int64_t a1, void* ws,
                             void* out_, SavedArgmax save) {
    Work w = carve(P, ws);
    const AmxScope amx_scope{w};
    Acc* out = static_cast<Acc*>(out_);
    const int64_t G = P.groups.num_groups;
    for (int64_t a = a0; a < a1; ++a) {
      pack_range(P, a, 1, w.qpack1);
      const QView qv{w.qpack1, a, 1, ceil_div(P.groups.rq_eff, NR)};
      for (int64_t n = 0; n < N; ++n) {
        const uint8_t* mask = cand.mask ? cand.mask + a * cand.m0 + n * cand.m1 : nullptr;
        const T* next = n + 1 < N ? hard_negative(P, cand, a, n + 1) : nullptr;
        if (save.data) {
          score_candidate<true>(P, qv, hard_negative(P, cand, a, n), cand.s2, mask, cand.m2, w, next);
          save_argmax(P, qv, w, save, n, N);
        } else {
          score_candidate<false>(P, qv, hard_negative(P, cand, a, n), cand.s2, mask, cand.m2, w, next);
        }
        block_scores(P, qv, w, w.scores);
        for (int64_t g = 0; g < G; ++g) out[(g * P.nq + a) * N + n] = w.scores[g];
      }
    }
  }

  static void paired_backward(const Problem& P, const Tokens& cand, int64_t N, const void* grad_, int64_t a0,
                              int64_t a1, void* ws, void* dq_, void* dc_, SavedArgmax saved) {
    Work w = carve(P, ws);
    const AmxScope amx_scope{w};
    const Acc* grad = static_cast<const Acc*>(grad_);
    const int64_t G = P.groups.num_groups;
    for (int64_t a = a0; a < a1; ++a) {
      pack_range(P, a, 1, w.qpack1);
      const QView qv{w.qpack1, a, 1, ceil_div(P.groups.rq_eff, NR)};
      for (int64_t n = 0; n < N; ++n) {
        bool any = false;
        for (int64_t g = 0; g < G; ++g) {
          w.dscores[g] = grad[(g * P.nq + a) * N + n];
          any = any || w.dscores[g] != Acc(0);
        }
        if (!any) continue;  // zero gradient for this pair: nothing to scatter
        const uint8_t* mask = cand.mask ? cand.mask + a * cand.m0 + n * cand.m1 : nullptr;
        const T* c_an = hard_negative(P, cand, a, n);
        if (saved.data)
          load_argmax(P, qv, w, saved, n, N);
        else
          score_candidate<true>(P, qv, c_an, cand.s2, mask, cand.m2, w);
        T* dc_out = dc_ ? static_cast<T*>(dc_) + (a * N + n) * P.rc * P.d : nullptr;
        scatter(P, qv, w, w.dscores, c_an, cand.s2, static_cast<Acc*>(dq_),
                dc_out ? candidate_grad_begin(P, w, dc_out) : nullptr);
        if (dc_out) candidate_grad_end(P, w, dc_out);
      }
    }
  }

  static KernelSet kernel_set() {
    KernelSet s;
    s.workspace_bytes = &workspace_bytes;
    s.qpack_bytes = &qpack_bytes;
    s.pack_elem_bytes = int(sizeof(PackT));
    s.row_elem_bytes = int(sizeof(RowT));
    s.pack_queries = &pack_queries;
    s.maxsim_forward = &maxsim_forward;
    s.maxsim_forward_lanes = &maxsim_forward_lanes;
    s.maxsim_backward = &maxsim_backward;
    s.infonce_forward = &infonce_forward;
    s.infonce_forward_hard = &infonce_forward_hard;
    s.infonce_backward = &infonce_backward;
    s.infonce_backward_hard = &infonce_backward_hard;
    s.paired_forward = &paired_forward;
    s.infonce_forward_query_gradient = &infonce_forward_query_gradient;
    s.paired_backward = &paired_backward;
    return s;
  }
};

// Default packing: queries converted to Acc, panel layout [d][NR]; candidate rows read in
// place when they already are Acc, converted chunk by chunk otherwise.
template <class Acc, int NR>
struct AccPacking {
  template <class T>
  using Pack = Acc;
  // Lanes per panel that pack_lanes writes (a policy with wider panels packs token by token).
  static constexpr int kPackLanesWidth = NR;
  // Non-temporal stores of one row of NR scores (candidate lanes); none by default.
  static constexpr bool kStreamScores = false;
  static void stream_row(Acc* dst, const Acc* src) { std::memcpy(static_cast<void*>(dst), src, sizeof(Acc) * NR); }
  static void stream_fence() {}
  // Whether the policy has store_score_row (Engine::lane_direct_tile); none by default.
  static constexpr bool kDirectScoreRows = false;
  // Whether the policy has micro_epilogue, MaxFold and ArgmaxFold (Engine::fold_tile); none by default.
  static constexpr bool kFoldMax = false;
  // Whether micro_epilogue also takes a beside() job, called after every Policy::kBesideSteps
  // steps of d (Engine::LinePrefetch); none by default.
  static constexpr bool kWorkBeside = false;
  // Whether the policy has micro16x16, a 16 x 16 tile for query views of <= 16 tokens
  // (Engine::fold_tile16); none by default.
  static constexpr bool kTile16 = false;
  // Whether the policy has AMX tiles for bf16 (simd_amx.h; Engine::score_candidate_amx); none by default.
  static constexpr bool kAmx = false;
  template <class T>
  static constexpr bool kDirectRows = std::is_same_v<T, Acc>;
  template <class T>
  static constexpr int64_t d_pack(int64_t d) {
    return d;
  }
  template <class T>
  static void pack_token(const T* src, int64_t d, Acc* panel, int lane) {
    for (int64_t k = 0; k < d; ++k) panel[k * NR + lane] = Acc(scalar_to_float(src[k]));
  }
  // A whole panel of NR tokens (candidate lanes); a null source is a zero lane.
  template <class T>
  static void pack_lanes(const T* const* src, int64_t d, Acc* panel) {
    for (int l = 0; l < NR; ++l) {
      if (src[l])
        pack_token(src[l], d, panel, l);
      else
        for (int64_t k = 0; k < d; ++k) panel[k * NR + l] = Acc(0);
    }
  }
};

// Scalar policy: plain loops the compiler vectorises for whatever the baseline ISA is.
template <class AccT>
struct GenericPolicy : AccPacking<AccT, 16> {
  using Acc = AccT;
  static constexpr int NR = 16;
  static constexpr int MR = 4;

  template <int M>
  static void micro(const Acc* const* rows, const Acc* qp, int64_t kc, Acc* tile, bool accumulate) {
    Acc acc[M][NR];
    for (int r = 0; r < M; ++r)
      for (int l = 0; l < NR; ++l) acc[r][l] = accumulate ? tile[r * NR + l] : Acc(0);
    for (int64_t k = 0; k < kc; ++k) {
      const Acc* qk = qp + k * NR;
      for (int r = 0; r < M; ++r) {
        const Acc c = rows[r][k];
        for (int l = 0; l < NR; ++l) acc[r][l] += c * qk[l];
      }
    }
    for (int r = 0; r < M; ++r)
      for (int l = 0; l < NR; ++l) tile[r * NR + l] = acc[r][l];
  }

  template <class T>
  static void convert(const T* src, Acc* dst, int64_t n) {
    for (int64_t k = 0; k < n; ++k) dst[k] = Acc(scalar_to_float(src[k]));
  }

  template <class T>
  static void axpy(Acc w, const T* x, Acc* y, int64_t n) {
    for (int64_t k = 0; k < n; ++k) y[k] += w * Acc(scalar_to_float(x[k]));
  }
};

template <class Policy>
KernelSet kernel_set_for(DType dtype) {
  switch (dtype) {
    case kF32:
      return Engine<Policy, float>::kernel_set();
    case kF16:
      return Engine<Policy, f16_t>::kernel_set();
    case kBF16:
      return Engine<Policy, bf16_t>::kernel_set();
    default:
      return KernelSet{};
  }
}

}  // namespace
}  // namespace cpu
}  // namespace metaembed
