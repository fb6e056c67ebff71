// Interface between the torch-facing host code (ops_cuda.cpp) and the CUDA kernels
// (kernels.cu). Nothing here includes torch or CUDA headers: kernels.cu compiles in
// seconds with nvcc, and the same file also compiles as plain C++ against emulate.h so the
// kernels can run (slowly, on the CPU) in tests on machines without a GPU.
//
// Index conventions. A "row" is one query token: row t = a * rq_eff + i of query a,
// token i < rq_eff (tokens past the largest group prefix never matter). Candidates are
// "items" of tokens; an item x has tokens j < rc_eff.
#pragma once
#include <cstddef>
#include <cstdint>

namespace metaembed {
namespace cuda {

// Groups handled by one launch; the host splits longer group lists into batches.
constexpr int kMaxGroups = 32;

enum DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

// One launch's groups, analysed like make_group_plan: bounds are the distinct r_c values in
// increasing order, and group g scores tokens i < rq[g] against j < bounds[bidx[g]].
struct GroupBatch {
  int32_t G = 0, nb = 0;
  int32_t rq[kMaxGroups] = {};
  int32_t bidx[kMaxGroups] = {};
  int32_t bounds[kMaxGroups] = {};
  int32_t rq_eff = 0, rc_eff = 0;
};

// Items of tokens, in elements: token j of item x (belonging to query a when the items are
// per query) starts at data + a*s_q + x*s0 + j*s1 and its D values are contiguous.
// mask (nullable, bool bytes): valid iff mask[a*m_q + x*m0 + j*m1] != 0.
struct TokenSet {
  const void* data = nullptr;
  int64_t s_q = 0, s0 = 0, s1 = 0;
  const uint8_t* mask = nullptr;
  int64_t m_q = 0, m0 = 0, m1 = 0;
};

// The scoring kernel: similarity tiles on tensor cores (bf16/fp16) or FFMA (fp32), one
// pass over each candidate's tokens with running maxima snapshotted at every bound.
// Modes (runtime flags):
//   scores != nullptr: scores[g*sc_gstride + a*sc_ld + x] = s_g(a, x)
//   argmax != nullptr: argmax[(x*tb + t_rel)*nb + k] = lowest valid j maximising over
//                      j < bounds[k] (the lowest NaN if any, as torch.argmax; -1 if no valid
//                      token or a masked query token), t_rel = row (in-batch) or token i
//                      (per query)
//   lse:               online log-sum-exp of scale*s_g(a, x) over the items, into
//                      m/l[split*state_split_stride + g*nq + a]; pos[g*nq + a] = the logit of
//                      item labels[a] (labels nullable; compared, never used as an address).
struct ScoreArgs {
  DType dtype = kF32;
  int64_t D = 0;
  TokenSet q;  // (Nq, Rq, D): s0 per query, s1 per token
  TokenSet c;  // in-batch candidates (s_q = 0) or the hard negatives of each query
  int64_t nq = 0, ncand = 0;  // ncand: items (per query when per_query)
  bool per_query = false;
  GroupBatch groups;

  float* scores = nullptr;
  int64_t sc_ld = 0, sc_gstride = 0;
  int32_t* argmax = nullptr;
  int64_t tb = 0;  // rows per item in the argmax layout
  bool lse = false;
  float scale = 1.f;
  float* m = nullptr;
  float* l = nullptr;
  int64_t state_split_stride = 0;
  float* pos = nullptr;
  const int64_t* labels = nullptr;

  // Blocking, filled by plan_scores().
  int32_t qb = 1, rct = 1, cb = 1, nchunks = 1;
  int64_t num_qblocks = 0, num_ctiles = 0, tiles_per_split = 1, num_splits = 0;
  bool vec = false;
};

// dS weights per (item, row, bound): w = sum over the groups g of the bound with i < rq[g]
// of ds[g*ds_gstride + a*ds_ld + col], zero for masked query tokens and for argmax -1.
// Runs of equal argmax (consecutive bounds) are merged into their first entry.
struct WeightArgs {
  int64_t nitems = 0, tb = 0, nq = 0, K = 0;
  int32_t rq_eff = 1, nb = 0;
  bool per_query = false;
  const int32_t* argmax = nullptr;
  float* w = nullptr;
  const float* ds = nullptr;
  int64_t ds_ld = 0, ds_gstride = 0;
  const uint8_t* qmask = nullptr;
  int64_t qm0 = 0, qm1 = 0;
  GroupBatch groups;
};

// Gradients from the (argmax, weight) entries:
//   dq[a, i] += w * item_x[j],  dc_x[j] += w * q[a, i]      (fp32 buffers, added to)
// dq is (Nq, Rq, D); dc holds item x's tokens at dc + (x*Rc + j)*D. An entry with w == 0
// (masked query token, no valid item token, merged run, zero gradient) is skipped, so a
// masked token is never read. launch_grad_q needs dq, launch_grad_c needs dc; the host
// leaves a gradient nobody asked for null and does not launch its kernel.
struct GradArgs {
  DType dtype = kF32;
  int64_t D = 0, Rq = 0, Rc = 0;
  TokenSet q, c;
  bool per_query = false;
  int64_t nq = 0, ncand = 0, tb = 0;  // ncand: items (per query when per_query)
  int32_t rq_eff = 1, rc_eff = 1, nb = 0;
  const int32_t* argmax = nullptr;
  const float* w = nullptr;
  float* dq = nullptr;
  float* dc = nullptr;
  bool vec4 = false;
};

// Fills the blocking of `a` (call before sizing workspaces). `num_sms` sizes LSE splits.
void plan_scores(ScoreArgs& a, int num_sms);

// Launchers: return nullptr on success, else an error message. `stream` is a cudaStream_t.
const char* launch_scores(const ScoreArgs& a, void* stream);
const char* launch_weights(const WeightArgs& a, void* stream);
const char* launch_grad_q(const GradArgs& a, void* stream);
const char* launch_grad_c(const GradArgs& a, void* stream);

#ifdef METAEMBED_CUDA_EMULATE
// Emulation only: the memory kernels may touch (checked on every global access), the
// order fibers run in between barriers (0 forward, 1 reverse, 2+ shuffled with that seed),
// and the number of kernel launches so far.
void emu_clear_ranges();
void emu_add_range(const void* p, size_t bytes);
int emu_set_schedule(int mode);
int64_t emu_launch_count();
#endif

}  // namespace cuda
}  // namespace metaembed
