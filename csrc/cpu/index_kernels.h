// Interface between the index host glue (index_ops.cpp) and the index kernels compiled per
// instruction set (index_isa_*.cpp). Like kernels.h, nothing here includes torch.
//
// A search scans rows of one or more segments (storage.py): segment s holds n rows; token
// j < rc of row b lives in slab tok_slab[j] at element (b * tok_width[j] * D + tok_off[j]),
// its mask byte (if any) and int8 (scale, norm) pair at slot b * tok_width[j] + tok_off[j]
// (tok_off[j] = j - bounds[slab], in vectors).
#pragma once
#include <cstddef>
#include <cstdint>

#include "kernels.h"

namespace metaembed {
namespace cpu {

constexpr int kIndexMaxSlabs = 64;
constexpr int32_t kIndexInt8 = 100;  // IndexProblem::cdtype of an int8 index

struct IndexSegment {
  int64_t n;     // rows
  int64_t row0;  // global row number of row 0
  const void* data[kIndexMaxSlabs];      // slab s: (n, w_s, D) elements of the stored dtype
  const float* scales[kIndexMaxSlabs];   // int8: (n, w_s, 2) per-vector (scale, norm) pairs
  const uint8_t* masks[kIndexMaxSlabs];  // (n, w_s) or all nullptr (every vector valid)
  const int64_t* ids;                    // (n,)
  const uint8_t* allowed;                // (n,) 1 = may be returned; nullptr = all rows
};

// Per-thread top-k state: for each (group g, query a), x = g * nq + a, up to k entries (a
// binary heap, worst first, or with AVX-512 / AVX2 and k <= 16 unordered lanes: index_order.h;
// readers take every entry and sort); thr[x] is the worst entry's score once k are held
// (-inf before), the bar a candidate must reach to be offered.
struct TopK {
  int64_t k;
  float* score;    // [G * nq][k]
  int64_t* id;     // [G * nq][k]
  int64_t* row;    // [G * nq][k] global rows
  int64_t* count;  // [G * nq]
  float* thr;      // [G * nq]
};

struct IndexProblem {
  Problem p;  // queries, groups, blocking and packed queries; the candidate fields are unused
  int32_t cdtype;                // kF32, kBF16 or kIndexInt8
  const int64_t* tok_slab;       // [rc_eff]
  const int64_t* tok_width;      // [rc_eff]
  const int64_t* tok_off;        // [rc_eff] vectors: j - bounds[slab]
  const IndexSegment* segs;
  int64_t num_segs;
  int64_t total_rows;
  bool masked;
  // int8 only: per token t = a * rq_eff + i of the queries, the quantisation (index_engine.h,
  // "int8 filter"; QInfo). p.qpack then holds the int8 query panels.
  const void* qinfo;
  const int8_t* qy;  // (nq, rq_eff, D) the quantised query tokens
};

struct IndexKernelSet {
  int nr, mr;           // query lanes per panel, candidate rows per register tile
  int pack_elem_bytes;  // bytes per packed query element (blocking)
  int32_t int8_offset;  // int8: the integer kernels compute sum_d (x_d + offset) * y_d
  size_t (*workspace_bytes)(const IndexProblem&);
  size_t (*qpack_bytes)(const IndexProblem&);
  // Packs query block `qblock` into p.qpack (the engine's panels, or int8 panels).
  void (*pack_queries)(const IndexProblem&, int64_t qblock);
  // Global rows [r0, r1) against query block `qblock`, into this thread's top-k state.
  void (*search)(const IndexProblem&, int64_t qblock, int64_t r0, int64_t r1, void* ws, TopK& top);
  // out[g][a][x] = s_g(a, row rows[a * K + x]) for queries [a0, a1) and x in [x0, x1) (rows
  // out of range, e.g. -1, are skipped: their slots keep what they held).
  void (*score_rows)(const IndexProblem&, const int64_t* rows, int64_t K, int64_t a0, int64_t a1, int64_t x0,
                     int64_t x1, void* ws, float* out);
};

struct IndexIsaKernels {
  const char* name;
  IndexKernelSet f32, bf16, int8;
  // Optional (nr == 0: none): bf16 with wider query panels, for query blocks of at least
  // bf16_wide.nr tokens (a narrower block would leave lanes of every panel idle).
  IndexKernelSet bf16_wide;
  // Optional (nr == 0: none): int8 with narrower query panels, for query blocks of at most
  // int8_narrow.nr tokens.
  IndexKernelSet int8_narrow;
};

// index_isa_*.cpp; the SIMD variants return nullptr when the compiler could not target them.
const IndexIsaKernels* index_generic_kernels();
const IndexIsaKernels* index_avx2_kernels();
const IndexIsaKernels* index_avx512_kernels();      // int8 through AVX512-VNNI
const IndexIsaKernels* index_avx512bf16_kernels();  // bf16 through AVX512-BF16
const IndexIsaKernels* index_amx_kernels();         // bf16 through AMX-BF16 tiles

}  // namespace cpu
}  // namespace metaembed
