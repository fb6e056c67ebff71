// Interface between the torch-facing host code (maxsim_cpu.cpp) and the ISA-specific
// kernel translation units (isa_*.cpp). Nothing here includes torch: the ISA units compile
// in seconds and can be built with different target flags without ODR hazards.
#pragma once
#include <cstddef>
#include <cstdint>

namespace metaembed {
namespace cpu {

enum DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3, kNumDTypes = 4 };

// Matryoshka groups, pre-analysed by the host. Group g scores query tokens i < rq[g]
// against candidate tokens j < bounds[bound_index[g]]. `bounds` are the distinct r_c
// values, strictly increasing; the last one is rc_eff = max_g r_c.
struct Groups {
  int64_t num_groups;
  const int64_t* rq;           // [G]
  const int64_t* bound_index;  // [G]
  int64_t num_bounds;
  const int64_t* bounds;       // [num_bounds]
  int64_t rq_eff;              // max_g r_q
  int64_t rc_eff;              // max_g r_c

  int64_t rc(int64_t g) const { return bounds[bound_index[g]]; }
  // Group g fits the budget (rq_lim, rc_lim): it reads no token past it.
  bool within(int64_t g, int64_t rq_lim, int64_t rc_lim) const { return rq[g] <= rq_lim && rc(g) <= rc_lim; }
};

// A set of multi-vector items: token r of item n starts at data + n*s0 + r*s1 (elements),
// its D values contiguous. mask (nullable, bool bytes): item n token r valid iff
// mask[n*m0 + r*m1] != 0. Hard negatives (Nq, K, Rc, D) are two-level: token r of
// negative k of query a is at data + a*s0 + k*s1 + r*s2, its mask at a*m0 + k*m1 + r*m2.
struct Tokens {
  const void* data;
  int64_t s0, s1, s2;
  const uint8_t* mask;
  int64_t m0, m1, m2;
};

// Query blocks of at most this many tokens (one query at a small budget: test-time retrieval)
// take dot products along D instead of the register micro-kernel (Engine::dots).
constexpr int64_t kFewQueryTokens = 4;

// How a forward lays its work out (Problem::layout):
//  * kQueryPanels: a query block's tokens are packed in NR-lane panels, candidate tokens are
//    broadcast (MR candidate tokens x NR query tokens per register tile). Every op.
//  * kCandidateLanes: maxsim_grouped at small budgets (r_c <= kLanesMaxRc, r_q <= MR) with
//    many query tokens: NR candidates are packed per token j into lanes and query tokens are
//    broadcast (MR query tokens x NR candidates per tile), so the max over j, the sum over i
//    and the score stores are all lane-parallel (Engine::maxsim_forward_lanes).
enum Layout : int32_t { kQueryPanels = 0, kCandidateLanes = 1 };
constexpr int64_t kLanesMaxRc = 8;

// One (queries x candidates) scoring problem, plus the blocking chosen by the host.
// kQueryPanels: queries are packed into blocks of `queries_per_block` whole queries; a block's
// tokens (query-major) are laid out in panels of NR lanes, in a format the ISA's kernel
// set owns (qpack_bytes tells the host how much to allocate). kCandidateLanes: qpack holds
// the query tokens as rows of D elements the micro-kernel reads directly (masked tokens zero),
// and query blocks are chunks of queries that stay in L2 while candidate blocks pass.
struct Problem {
  DType dtype;
  int64_t nq, nc, rq, rc, d;  // full sizes; gradients use the (n, rq|rc, d) layout
  Tokens q, c;
  Groups groups;
  int64_t kc;                 // D is processed in chunks of kc (cache blocking)
  int64_t queries_per_block;
  int64_t num_qblocks;
  int64_t panels_per_block;
  void* qpack;                // packed queries, see above
  int32_t layout = kQueryPanels;
};

// Argmax tokens saved by a forward for its backward, which then scatters the gradient
// without recomputing any similarity tile. Element ((row * cols + col) * rq_eff + i) *
// num_bounds + k is the lowest maximising valid candidate token of query token i against
// bound k (-1 when the prefix has no valid token); (row, col) = (query, candidate), or
// (query, own candidate) for per-query candidates. int16 elements unless `wide` (int32,
// needed when max r_c >= 2^15). A null `data`: nothing saved (the backward recomputes).
struct SavedArgmax {
  void* data = nullptr;
  bool wide = false;
};

// Entry points of one ISA. "Acc" is float for fp32/fp16/bf16 inputs, double for fp64.
// Gradient buffers are zero-initialised by the host. Query-side ones (dq_partial, dq, jq) are
// Acc-typed (summed over candidates; the host converts them); candidate-side ones (dc, dhn)
// have the input's type: each candidate's rows are summed in Acc scratch and stored once.
struct KernelSet {
  size_t (*workspace_bytes)(const Problem&);
  size_t (*qpack_bytes)(const Problem&);  // the packed-query buffer the host allocates
  int pack_elem_bytes;                    // bytes per packed query element (blocking)
  int row_elem_bytes;                     // bytes per query row element (kCandidateLanes)
  void (*pack_queries)(const Problem&, int64_t qblock);
  // scores (G, nq, nc): candidates [b0, b1) against query block `qblock`.
  void (*maxsim_forward)(const Problem&, int64_t qblock, int64_t b0, int64_t b1, void* ws, void* scores,
                         SavedArgmax save);
  // kCandidateLanes: items [x0, x1) of (candidate block x / num_qblocks of NR candidates,
  // query block x % num_qblocks); each scores element is written by exactly one item.
  void (*maxsim_forward_lanes)(const Problem&, int64_t x0, int64_t x1, void* ws, void* scores, SavedArgmax save);
  // grad (G, nq, nc) -> dq_partial (nq, rq, d) += ..., dc (nc, rc, d) rows of [b0, b1).
  void (*maxsim_backward)(const Problem&, const void* grad, int64_t b0, int64_t b1, void* ws,
                          void* dq_partial, void* dc, SavedArgmax saved);
  // Online log-sum-exp over candidates [b0, b1): per (g, a) running max m and sum l of
  // exp(logit - m) (chunk-local arrays, G*nq), and the positive's logit (global array).
  void (*infonce_forward)(const Problem&, const int64_t* labels, double scale, int64_t b0, int64_t b1,
                          void* ws, void* m, void* l, void* pos);
  // Hard negatives of queries [a0, a1): folds into the (global, merged) m and l.
  void (*infonce_forward_hard)(const Problem&, const Tokens& hn, int64_t k, double scale, int64_t a0,
                               int64_t a1, void* ws, void* m, void* l);
  // dS_g(a, b) = grad[g, a] * scale * (softmax - onehot), recomputed from lse (G, nq).
  void (*infonce_backward)(const Problem&, const int64_t* labels, double scale, const void* grad,
                           const void* lse, int64_t b0, int64_t b1, void* ws, void* dq_partial, void* dc);
  void (*infonce_backward_hard)(const Problem&, const Tokens& hn, int64_t k, double scale, const void* grad,
                                const void* lse, int64_t a0, int64_t a1, void* ws, void* dq, void* dhn);
  // Per-query candidates (B, N, Rc, D) in the hard-negative Tokens layout: queries [a0, a1).
  // scores (G, nq, N); grad (G, nq, N) -> dq (nq, rq, d) rows of those queries, dc (nq, N, rc, d).
  void (*paired_forward)(const Problem&, const Tokens& cand, int64_t n, int64_t a0, int64_t a1, void* ws,
                         void* scores, SavedArgmax save);
  void (*paired_backward)(const Problem&, const Tokens& cand, int64_t n, const void* grad, int64_t a0, int64_t a1,
                          void* ws, void* dq, void* dc, SavedArgmax saved);
  // The loss forward of query block `qblock` (all in-batch candidates, then its queries'
  // own k hard negatives) into m, l, pos (G, nq), with the query gradient of every group in
  // jq (nq, rows, d): see Engine::infonce_forward_query_gradient.
  void (*infonce_forward_query_gradient)(const Problem&, const int64_t* labels, double scale, const Tokens& hn,
                                         int64_t k, int64_t qblock, void* ws, void* m, void* l, void* pos, void* jq,
                                         const int64_t* goff, int64_t rows);
  // Gradient pointers (dq_partial, dq, dc, dhn) may be null: that gradient is not wanted.
};

// Peak calibration: `iters` iterations of independent chains of the one instruction an
// ISA's micro-kernel spends its time in (enough chains to cover latency x throughput);
// returns the floating-point operations performed. Benchmarks report "% of peak" against
// the loop of the ISA and dtype that ran, so no kernel can exceed it except by noise.
struct PeakLoop {
  double (*run)(int64_t iters);  // nullptr: no calibration for this ISA
  const char* instruction;       // what it issues, for reports
};

struct IsaKernels {
  const char* name;
  int nr;  // lanes per query panel
  int mr;  // candidate tokens per register tile
  KernelSet by_dtype[kNumDTypes];
  // fp32 (and fp16, converted to fp32): the FMA of the micro-kernel's width; bf16: the
  // instruction that consumes bf16 (vdpbf16ps on avx512_bf16, else the fp32 FMA after conversion).
  PeakLoop peak_fp32, peak_bf16;
};

// Defined in isa_generic.cpp / isa_avx2.cpp / isa_avx512.cpp / isa_avx512bf16.cpp / isa_amx.cpp. The
// SIMD variants return nullptr when the compiler could not target them.
const IsaKernels* generic_kernels();
const IsaKernels* avx2_kernels();
const IsaKernels* avx512_kernels();
const IsaKernels* avx512bf16_kernels();
const IsaKernels* amx_kernels();

}  // namespace cpu
}  // namespace metaembed
