// CUDA implementations of the metaembed ops: argument checks, workspaces and the order of
// kernel launches around kernels.cu. Compiled by the host compiler (no device code here).
// Argument checks are csrc/common/checks.h (the messages of every other backend); label
// values are checked there too, by a device-side assert for CUDA tensors (no host sync).
//
// Forward (maxsim_grouped): one launch of score_kernel writing (G, Nq, Nc) scores.
// Forward (maxsim_paired_grouped): the same kernel in its per-query mode (the hard-negative
//   machinery): each query against its own N candidates, writing (G, B, N).
// Fused loss forward: score_kernel folds scale*s_g into an online log-sum-exp per
//   (split, group, query); the splits are merged here in split order (like the CPU
//   backend's chunks), then each query's hard negatives are folded in. Memory O(G*Nq).
// Backward (all ops): per candidate chunk (in-batch) or query chunk (per-query items),
//   score_kernel records the argmax token of every (candidate, query token, bound); dL/ds
//   becomes per-entry weights (weights_kernel) and grad_q_kernel / grad_c_kernel gather
//   them into fp32 dq / dc. For the loss, dL/ds needs the scores, so the chunk's scores
//   (G x Nq x chunk) are kept and turned into grad * scale * (softmax - onehot) here.
//   Chunks are sized so these buffers stay under kWorkspaceBytes (one chunk for
//   training-sized batches); nothing of size Nq*Nc*Rq*Rc is ever allocated.
// output_mask: a gradient whose flag is false is neither allocated nor launched (its
//   gather is skipped; the score/weight launches run only if another gradient needs them)
//   and comes back as an empty (0,) tensor of the input's dtype.
// Groups beyond kMaxGroups are processed in batches (each batch its own launches).
// Everything runs on the current CUDA stream of the inputs' device, with no host sync;
// no atomics, so all results are deterministic.
//
// With METAEMBED_CUDA_EMULATE this file builds the test-only extension that runs the same
// kernels on the CPU (ops "metaembed_emu::*", CPU tensors).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <string>
#include <vector>

#ifndef METAEMBED_CUDA_EMULATE
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "../common/checks.h"
#include "../common/nonfinite.h"
#include "../common/schemas.h"
#include "kernels.h"

namespace metaembed {
namespace cuda {
namespace {

constexpr int64_t kWorkspaceBytes = int64_t(256) << 20;
#ifdef METAEMBED_CUDA_EMULATE
int64_t g_workspace_bytes = kWorkspaceBytes;  // tests shrink it to reach the chunked paths
int64_t workspace_bytes() { return g_workspace_bytes; }
#else
constexpr int64_t workspace_bytes() { return kWorkspaceBytes; }
#endif
constexpr int64_t kMaxTokens = int64_t(1) << 22;  // Rq, Rc: 32-bit tile indices, grid.y of grad_c
constexpr int64_t kMaxDim = int64_t(1) << 23;     // D: grid.y / grid.z of the gradient kernels

// ---- device context -------------------------------------------------------------------
#ifndef METAEMBED_CUDA_EMULATE
constexpr const char* kDeviceName = "CUDA";
bool on_device(const at::Tensor& t) { return t.is_cuda(); }
struct Ctx {
  c10::cuda::CUDAGuard guard;
  explicit Ctx(const at::Tensor& t) : guard(t.device()) {}
  void* stream() const { return at::cuda::getCurrentCUDAStream().stream(); }
  int num_sms() const { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
  void track(const at::Tensor&) const {}
  template <class... Ts>
  void track_all(const Ts&...) const {}
};
#else
constexpr const char* kDeviceName = "CPU (emulated CUDA)";
bool on_device(const at::Tensor& t) { return t.is_cpu(); }
struct Ctx {  // the emulator checks every global access against the tensors tracked here
  explicit Ctx(const at::Tensor&) { emu_clear_ranges(); }
  void* stream() const { return nullptr; }
  int num_sms() const { return 3; }
  void track(const at::Tensor& t) const {
    if (!t.defined() || t.numel() == 0) return;
    int64_t span = 1;
    for (int64_t d = 0; d < t.dim(); ++d) span += (t.size(d) - 1) * t.stride(d);
    emu_add_range(t.data_ptr(), size_t(span) * t.element_size());
  }
  template <class... Ts>
  void track_all(const Ts&... ts) const {
    (track(ts), ...);
  }
};
#endif

void check_launch(const char* err, const char* what) {
  TORCH_CHECK(err == nullptr, "metaembed CUDA kernel ", what, " failed: ", err ? err : "");
}

// ---- argument handling ----------------------------------------------------------------
void check_device_inputs(const at::Tensor& q, std::initializer_list<const at::Tensor*> others) {
  TORCH_CHECK_TYPE(q.scalar_type() != at::kDouble,
                   "the CUDA backend supports float32, float16 and bfloat16, got float64");
  TORCH_CHECK_VALUE(on_device(q), "the metaembed CUDA kernels need ", kDeviceName, " tensors, got ", q.device());
  for (const at::Tensor* t : others)
    TORCH_CHECK_VALUE(t->device() == q.device(), "all tensors must be on device ", q.device(), ", got ",
                      t->device());
  TORCH_CHECK_VALUE(q.size(1) < kMaxTokens, "the CUDA backend needs Rq < 2^22, got ", q.size(1));
  TORCH_CHECK_VALUE(q.size(2) < kMaxDim, "the CUDA backend needs D < 2^23, got ", q.size(2));
}

DType dtype_of(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? kF32 : (t.scalar_type() == at::kHalf ? kF16 : kBF16);
}

// The kernels read each token's D values contiguously; other dims may have any stride.
at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.size(-1) == 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// Stride of dim d for addressing; 0 for size-1 dims (whose index is always 0), so an
// arbitrary stride there cannot defeat the vectorised path.
int64_t stride_of(const at::Tensor& t, int64_t d) { return t.size(d) > 1 ? t.stride(d) : 0; }

const uint8_t* mask_ptr(const c10::optional<at::Tensor>& m) {
  return m.has_value() ? reinterpret_cast<const uint8_t*>(m->data_ptr<bool>()) : nullptr;
}

// (N, R, D) items with an optional (N, R) mask.
TokenSet tokens3(const at::Tensor& t, const c10::optional<at::Tensor>& mask) {
  TokenSet s;
  s.data = t.data_ptr();
  s.s0 = stride_of(t, 0);
  s.s1 = stride_of(t, 1);
  s.mask = mask_ptr(mask);
  if (mask.has_value()) {
    s.m0 = stride_of(*mask, 0);
    s.m1 = stride_of(*mask, 1);
  }
  return s;
}

// (Nq, K, Rc, D) hard negatives with an optional (Nq, K, Rc) mask: items per query.
TokenSet tokens4(const at::Tensor& t, const c10::optional<at::Tensor>& mask) {
  TokenSet s;
  s.data = t.data_ptr();
  s.s_q = stride_of(t, 0);
  s.s0 = stride_of(t, 1);
  s.s1 = stride_of(t, 2);
  s.mask = mask_ptr(mask);
  if (mask.has_value()) {
    s.m_q = stride_of(*mask, 0);
    s.m0 = stride_of(*mask, 1);
    s.m1 = stride_of(*mask, 2);
  }
  return s;
}

// Items [b0, b0 + n) of an in-batch token set (a view: pointers advanced).
TokenSet chunk_of(const TokenSet& s, int64_t b0, int64_t elem_bytes) {
  TokenSet r = s;
  r.data = static_cast<const char*>(s.data) + b0 * s.s0 * elem_bytes;
  if (s.mask) r.mask = s.mask + b0 * s.m0;
  return r;
}

struct Batch {
  int64_t g0 = 0;
  GroupBatch gb;
};

// Groups in batches of at most kMaxGroups, each analysed like make_group_plan.
std::vector<Batch> group_batches(at::IntArrayRef grq, at::IntArrayRef grc, int64_t Rq, int64_t Rc) {
  make_group_plan(grq, grc, Rq, Rc);  // validates the whole list first
  std::vector<Batch> out;
  for (int64_t g0 = 0; g0 < int64_t(grq.size()); g0 += kMaxGroups) {
    const int64_t n = std::min<int64_t>(kMaxGroups, int64_t(grq.size()) - g0);
    const GroupPlan p = make_group_plan(grq.slice(g0, n), grc.slice(g0, n), Rq, Rc);
    Batch b;
    b.g0 = g0;
    b.gb.G = int32_t(n);
    b.gb.nb = int32_t(p.bounds.size());
    for (int64_t g = 0; g < n; ++g) {
      b.gb.rq[g] = int32_t(p.rq[g]);
      b.gb.bidx[g] = int32_t(p.bound_index[g]);
    }
    for (size_t k = 0; k < p.bounds.size(); ++k) b.gb.bounds[k] = int32_t(p.bounds[k]);
    b.gb.rq_eff = int32_t(p.rq_eff);
    b.gb.rc_eff = int32_t(p.rc_eff);
    out.push_back(b);
  }
  return out;
}

// Candidates per backward chunk: argmax + weight entries (8 bytes per row and bound) and,
// for the loss, scores / probabilities / dS (G*Nq floats, a few times) per candidate.
int64_t chunk_size(int64_t nc, int64_t rows, int64_t nb, int64_t G, int64_t nq, bool loss) {
  const int64_t per = rows * nb * 8 + (loss ? 16 * G * nq : 0);
  return std::max<int64_t>(1, std::min<int64_t>(nc, workspace_bytes() / std::max<int64_t>(per, 1)));
}

ScoreArgs score_args(const at::Tensor& q, const TokenSet& qt, const TokenSet& ct, int64_t ncand, bool per_query,
                     const GroupBatch& gb) {
  ScoreArgs a;
  a.dtype = dtype_of(q);
  a.D = q.size(2);
  a.q = qt;
  a.c = ct;
  a.nq = q.size(0);
  a.ncand = ncand;
  a.per_query = per_query;
  a.groups = gb;
  return a;
}

// The score launch writes s_g(a, b) to scores[g * Nq * ld + a * ld + b] ...
void set_score_output(ScoreArgs& a, float* scores, int64_t ld) {
  a.scores = scores;
  a.sc_ld = ld;
  a.sc_gstride = a.nq * ld;
}

// ... and/or each (item, token row, boundary)'s argmax to J (n, rows, nb).
void set_argmax_output(ScoreArgs& a, at::Tensor& J, int64_t rows) {
  a.argmax = J.data_ptr<int32_t>();
  a.tb = rows;
}

// Token set of per-query items advanced to query a0 (its data and mask pointers).
TokenSet queries_from(const TokenSet& s, int64_t a0, int64_t elem_bytes) {
  TokenSet r = s;
  r.data = static_cast<const char*>(s.data) + a0 * s.s_q * elem_bytes;
  if (s.mask) r.mask = s.mask + a0 * s.m_q;
  return r;
}

// The gradient launches' arguments; a null dq / dc is a gradient nobody asked for.
GradArgs grad_args(const at::Tensor& q, const TokenSet& qt, const TokenSet& ct, int64_t nq, int64_t Rc,
                   int64_t ncand, bool per_query, const GroupBatch& gb, const at::Tensor& J, const at::Tensor& W,
                   float* dq, float* dc) {
  GradArgs g;
  g.dtype = dtype_of(q);
  g.D = q.size(2);
  g.Rq = q.size(1);
  g.Rc = Rc;
  g.q = qt;
  g.c = ct;
  g.per_query = per_query;
  g.nq = nq;
  g.ncand = ncand;
  g.tb = J.size(1);
  g.rq_eff = gb.rq_eff;
  g.rc_eff = gb.rc_eff;
  g.nb = gb.nb;
  g.argmax = J.data_ptr<int32_t>();
  g.w = W.data_ptr<float>();
  g.dq = dq;
  g.dc = dc;
  return g;
}

// dS (G', nq, ncols) float, contiguous from `ds` on: row a of group g at ds + g*ds_gstride + a*ds_ld.
// q_mask is advanced to query a0 (the first query of J's items).
WeightArgs weight_args(const at::Tensor& J, const at::Tensor& W, const float* ds, int64_t ds_ld, int64_t ds_gstride,
                       int64_t nq, int64_t K, bool per_query, const GroupBatch& gb,
                       const c10::optional<at::Tensor>& q_mask, int64_t a0 = 0) {
  WeightArgs w;
  w.nitems = J.size(0);
  w.tb = J.size(1);
  w.nq = nq;
  w.K = K;
  w.rq_eff = gb.rq_eff;
  w.nb = gb.nb;
  w.per_query = per_query;
  w.argmax = J.data_ptr<int32_t>();
  w.w = W.data_ptr<float>();
  w.ds = ds;
  w.ds_ld = ds_ld;
  w.ds_gstride = ds_gstride;
  w.qmask = mask_ptr(q_mask);
  if (q_mask.has_value()) {
    w.qm0 = stride_of(*q_mask, 0);
    w.qm1 = stride_of(*q_mask, 1);
    w.qmask += a0 * w.qm0;
  }
  w.groups = gb;
  return w;
}

// The (0,) placeholder returned for a gradient whose output_mask flag is false.
at::Tensor not_wanted(const at::Tensor& x) { return at::empty({0}, x.options()); }

// A wanted gradient: the fp32 accumulation buffer converted to x's dtype (contiguous).
at::Tensor gradient_out(const at::Tensor& acc, const at::Tensor& x, bool wanted) {
  return wanted ? acc.to(x.scalar_type()) : not_wanted(x);
}

// fp32 zeros of x's shape when wanted (else undefined: nothing is allocated).
at::Tensor accumulator(const at::Tensor& x, bool wanted) {
  return wanted ? at::zeros(x.sizes(), x.options().dtype(at::kFloat)) : at::Tensor();
}

float* ptr_or_null(at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// ---- backward over per-query items (paired candidates, hard negatives) ------------------
// Item k of query a is ct's (a, k), K per query; dq rows (Nq, Rq, D) and item gradients
// (Nq, K, Rc, D), both fp32, either nullable. Queries go in chunks that keep the argmax /
// weight buffers (and the chunk's scores) under kWorkspaceBytes; each chunk: one score
// launch (argmax, and scores when with_scores), dS = ds_of(a0, n, S) as a contiguous
// (Gb, n, K) float tensor, weights, then the wanted gradient gathers.
template <class DsFn>
void per_query_backward(const Ctx& ctx, const at::Tensor& q, const TokenSet& qt, const TokenSet& ct, int64_t K,
                        int64_t Rc, const Batch& b, const c10::optional<at::Tensor>& q_mask, bool with_scores,
                        const DsFn& ds_of, float* dq, float* dc, const char* what) {
  const int64_t nq = q.size(0), Rq = q.size(1), D = q.size(2), esize = q.element_size();
  const int64_t rows = b.gb.rq_eff, nb = b.gb.nb, Gb = b.gb.G;
  if (nq == 0 || K == 0 || !(dq || dc)) return;
  const int64_t per_query_bytes = K * rows * nb * 8 + (with_scores ? 16 * Gb * K : 0);
  const int64_t qchunk = std::max<int64_t>(1, std::min<int64_t>(nq, workspace_bytes() / per_query_bytes));
  const auto opts = q.options();
  const std::string w = what;
  for (int64_t a0 = 0; a0 < nq; a0 += qchunk) {
    const int64_t n = std::min(qchunk, nq - a0);
    const TokenSet qtc = chunk_of(qt, a0, esize), ctc = queries_from(ct, a0, esize);
    at::Tensor J = at::empty({n * K, rows, nb}, opts.dtype(at::kInt)), W = at::empty({n * K, rows, nb}, opts.dtype(at::kFloat));
    ctx.track_all(J, W);
    ScoreArgs a = score_args(q, qtc, ctc, K, true, b.gb);
    a.nq = n;
    at::Tensor S;
    if (with_scores) {
      S = at::empty({Gb, n, K}, opts.dtype(at::kFloat));
      ctx.track(S);
      set_score_output(a, S.data_ptr<float>(), K);
    }
    set_argmax_output(a, J, rows);
    plan_scores(a, ctx.num_sms());
    check_launch(launch_scores(a, ctx.stream()), (w + " (scores)").c_str());
    const at::Tensor ds = ds_of(a0, n, S);
    ctx.track(ds);
    check_launch(launch_weights(weight_args(J, W, ds.data_ptr<float>(), K, n * K, n, K, true, b.gb, q_mask, a0),
                                ctx.stream()),
                 (w + " (weights)").c_str());
    const GradArgs g = grad_args(q, qtc, ctc, n, Rc, K, true, b.gb, J, W, dq ? dq + a0 * Rq * D : nullptr,
                                 dc ? dc + a0 * K * Rc * D : nullptr);
    if (dq) check_launch(launch_grad_q(g, ctx.stream()), (w + " (dq)").c_str());
    if (dc) check_launch(launch_grad_c(g, ctx.stream()), (w + " (item gradients)").c_str());
  }
}

// ---- maxsim_grouped -------------------------------------------------------------------
// The argmax is not saved on CUDA (save_argmax is ignored): the backward recomputes the
// tiles; the second output is the empty placeholder of the schema's dtype.
at::Tensor no_saved_argmax(at::IntArrayRef group_rc, const at::Tensor& like) {
  const int64_t rc_max = *std::max_element(group_rc.begin(), group_rc.end());
  return at::empty({0}, like.options().dtype(rc_max < (int64_t(1) << 15) ? at::kShort : at::kInt));
}

void check_no_saved_argmax(const c10::optional<at::Tensor>& argmax) {
  TORCH_CHECK_VALUE(!argmax.has_value() || argmax->numel() == 0,
                    "argmax: the CUDA backend's forward saves none (the backward recomputes the tiles)");
}

at::Tensor maxsim_grouped_scores_cuda(const at::Tensor& q, const at::Tensor& c, at::IntArrayRef group_rq,
                                      at::IntArrayRef group_rc, const c10::optional<at::Tensor>& q_mask,
                                      const c10::optional<at::Tensor>& c_mask) {
  check_maxsim_args(q, c, q_mask, c_mask);
  check_device_inputs(q, {&c});
  TORCH_CHECK_VALUE(c.size(1) < kMaxTokens, "the CUDA backend needs Rc < 2^22, got ", c.size(1));
  const auto batches = group_batches(group_rq, group_rc, q.size(1), c.size(1));
  Ctx ctx(q);
  const int64_t G = int64_t(group_rq.size()), nq = q.size(0), nc = c.size(0);
  at::Tensor out = at::empty({G, nq, nc}, q.options().dtype(at::kFloat));
  if (nq == 0 || nc == 0) return out.zero_();
  const at::Tensor qc = last_dim_contiguous(q), cc = last_dim_contiguous(c);
  ctx.track_all(qc, cc, out);
  if (q_mask) ctx.track(*q_mask);
  if (c_mask) ctx.track(*c_mask);
  const TokenSet qt = tokens3(qc, q_mask), ct = tokens3(cc, c_mask);
  for (const Batch& b : batches) {
    ScoreArgs a = score_args(q, qt, ct, nc, false, b.gb);
    set_score_output(a, out.data_ptr<float>() + b.g0 * nq * nc, nc);
    plan_scores(a, ctx.num_sms());
    check_launch(launch_scores(a, ctx.stream()), "maxsim_grouped");
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> maxsim_grouped_cuda(const at::Tensor& q, const at::Tensor& c,
                                                       at::IntArrayRef group_rq, at::IntArrayRef group_rc,
                                                       const c10::optional<at::Tensor>& q_mask,
                                                       const c10::optional<at::Tensor>& c_mask, bool /*save_argmax*/) {
  at::Tensor scores = maxsim_grouped_scores_cuda(q, c, group_rq, group_rc, q_mask, c_mask);
  return {scores, no_saved_argmax(group_rc, q)};
}

std::tuple<at::Tensor, at::Tensor> maxsim_grouped_backward_cuda(const at::Tensor& grad, const at::Tensor& q,
                                                                const at::Tensor& c, at::IntArrayRef group_rq,
                                                                at::IntArrayRef group_rc,
                                                                const c10::optional<at::Tensor>& q_mask,
                                                                const c10::optional<at::Tensor>& c_mask,
                                                                std::array<bool, 2> output_mask,
                                                                const c10::optional<at::Tensor>& argmax) {
  check_maxsim_args(q, c, q_mask, c_mask);
  check_no_saved_argmax(argmax);
  check_device_inputs(q, {&c, &grad});
  TORCH_CHECK_VALUE(c.size(1) < kMaxTokens, "the CUDA backend needs Rc < 2^22, got ", c.size(1));
  const auto batches = group_batches(group_rq, group_rc, q.size(1), c.size(1));
  const int64_t G = int64_t(group_rq.size()), nq = q.size(0), nc = c.size(0), Rc = c.size(1), D = q.size(2);
  check_scores_grad(grad, q, c, G);
  const auto [want_dq, want_dc] = output_mask;
  Ctx ctx(q);
  at::Tensor dq = accumulator(q, want_dq), dc = accumulator(c, want_dc);
  if (nq == 0 || nc == 0 || !(want_dq || want_dc)) return {gradient_out(dq, q, want_dq), gradient_out(dc, c, want_dc)};
  const at::Tensor qc = last_dim_contiguous(q), cc = last_dim_contiguous(c);
  const at::Tensor ds = grad.to(at::kFloat).contiguous();
  ctx.track_all(qc, cc, ds, dq, dc);
  if (q_mask) ctx.track(*q_mask);
  if (c_mask) ctx.track(*c_mask);
  const TokenSet qt = tokens3(qc, q_mask), ct = tokens3(cc, c_mask);
  const int64_t esize = q.element_size();
  for (const Batch& b : batches) {
    const int64_t rows = nq * b.gb.rq_eff, nb = b.gb.nb;
    const int64_t chunk = chunk_size(nc, rows, nb, b.gb.G, nq, false);
    const float* dsb = ds.data_ptr<float>() + b.g0 * nq * nc;
    for (int64_t cb0 = 0; cb0 < nc; cb0 += chunk) {
      const int64_t n = std::min(chunk, nc - cb0);
      const TokenSet cht = chunk_of(ct, cb0, esize);
      at::Tensor J = at::empty({n, rows, nb}, q.options().dtype(at::kInt));
      at::Tensor W = at::empty({n, rows, nb}, q.options().dtype(at::kFloat));
      ctx.track_all(J, W);
      ScoreArgs a = score_args(q, qt, cht, n, false, b.gb);
      set_argmax_output(a, J, rows);
      plan_scores(a, ctx.num_sms());
      check_launch(launch_scores(a, ctx.stream()), "maxsim_grouped_backward (argmax)");
      // dS of this chunk: grad's rows (length Nc) from column cb0 on.
      check_launch(launch_weights(weight_args(J, W, dsb + cb0, nc, nq * nc, nq, 0, false, b.gb, q_mask), ctx.stream()),
                   "maxsim_grouped_backward (weights)");
      const GradArgs g = grad_args(q, qt, cht, nq, Rc, n, false, b.gb, J, W, ptr_or_null(dq),
                                   want_dc ? dc.data_ptr<float>() + cb0 * Rc * D : nullptr);
      if (want_dq) check_launch(launch_grad_q(g, ctx.stream()), "maxsim_grouped_backward (dq)");
      if (want_dc) check_launch(launch_grad_c(g, ctx.stream()), "maxsim_grouped_backward (dc)");
    }
  }
  const int64_t rq_eff = *std::max_element(group_rq.begin(), group_rq.end());
  const int64_t rc_eff = *std::max_element(group_rc.begin(), group_rc.end());
  if (want_dq) nonfinite::poison_gradient(dq, nonfinite::census(c, c_mask, rc_eff, 0), q_mask, rq_eff);
  if (want_dc) nonfinite::poison_gradient(dc, nonfinite::census(q, q_mask, rq_eff, 0), c_mask, rc_eff);
  return {gradient_out(dq, q, want_dq), gradient_out(dc, c, want_dc)};
}

// ---- maxsim_paired_grouped: each query against its own N candidates -------------------
// score_kernel's per-query mode (the hard-negative machinery): a CTA owns one query and a
// tile of its candidates, so scores (G, B, N) are written directly; the backward is
// per_query_backward with dS = grad.
void check_paired_device(const at::Tensor& q, const at::Tensor& c) {
  check_device_inputs(q, {&c});
  TORCH_CHECK_VALUE(c.size(2) < kMaxTokens, "the CUDA backend needs Rc < 2^22, got ", c.size(2));
}

at::Tensor maxsim_paired_grouped_scores_cuda(const at::Tensor& q, const at::Tensor& c, at::IntArrayRef group_rq,
                                             at::IntArrayRef group_rc, const c10::optional<at::Tensor>& q_mask,
                                             const c10::optional<at::Tensor>& c_mask) {
  check_maxsim_args(q, c, q_mask, c_mask, /*paired=*/true);
  check_paired_device(q, c);
  const auto batches = group_batches(group_rq, group_rc, q.size(1), c.size(2));
  Ctx ctx(q);
  const int64_t G = int64_t(group_rq.size()), B = q.size(0), N = c.size(1);
  at::Tensor out = at::empty({G, B, N}, q.options().dtype(at::kFloat));
  if (B == 0 || N == 0) return out.zero_();
  const at::Tensor qc = last_dim_contiguous(q), cc = last_dim_contiguous(c);
  ctx.track_all(qc, cc, out);
  if (q_mask) ctx.track(*q_mask);
  if (c_mask) ctx.track(*c_mask);
  const TokenSet qt = tokens3(qc, q_mask), ct = tokens4(cc, c_mask);
  for (const Batch& b : batches) {
    ScoreArgs a = score_args(q, qt, ct, N, true, b.gb);
    set_score_output(a, out.data_ptr<float>() + b.g0 * B * N, N);
    plan_scores(a, ctx.num_sms());
    check_launch(launch_scores(a, ctx.stream()), "maxsim_paired_grouped");
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> maxsim_paired_grouped_cuda(const at::Tensor& q, const at::Tensor& c,
                                                              at::IntArrayRef group_rq, at::IntArrayRef group_rc,
                                                              const c10::optional<at::Tensor>& q_mask,
                                                              const c10::optional<at::Tensor>& c_mask,
                                                              bool /*save_argmax*/) {
  at::Tensor scores = maxsim_paired_grouped_scores_cuda(q, c, group_rq, group_rc, q_mask, c_mask);
  return {scores, no_saved_argmax(group_rc, q)};
}

std::tuple<at::Tensor, at::Tensor> maxsim_paired_grouped_backward_cuda(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& c, at::IntArrayRef group_rq,
    at::IntArrayRef group_rc, const c10::optional<at::Tensor>& q_mask, const c10::optional<at::Tensor>& c_mask,
    std::array<bool, 2> output_mask, const c10::optional<at::Tensor>& argmax) {
  check_maxsim_args(q, c, q_mask, c_mask, /*paired=*/true);
  check_no_saved_argmax(argmax);
  check_paired_device(q, c);
  check_device_inputs(q, {&grad});
  const auto batches = group_batches(group_rq, group_rc, q.size(1), c.size(2));
  const int64_t G = int64_t(group_rq.size()), B = q.size(0), N = c.size(1), Rc = c.size(2);
  check_scores_grad(grad, q, c, G, /*paired=*/true);
  const auto [want_dq, want_dc] = output_mask;
  Ctx ctx(q);
  at::Tensor dq = accumulator(q, want_dq), dc = accumulator(c, want_dc);
  if (B == 0 || N == 0 || !(want_dq || want_dc)) return {gradient_out(dq, q, want_dq), gradient_out(dc, c, want_dc)};
  const at::Tensor qc = last_dim_contiguous(q), cc = last_dim_contiguous(c);
  const at::Tensor ds = grad.to(at::kFloat).contiguous();
  ctx.track_all(qc, cc, dq, dc);
  if (q_mask) ctx.track(*q_mask);
  if (c_mask) ctx.track(*c_mask);
  const TokenSet qt = tokens3(qc, q_mask), ct = tokens4(cc, c_mask);
  for (const Batch& b : batches) {
    const at::Tensor dsb = ds.narrow(0, b.g0, b.gb.G);
    auto ds_of = [&](int64_t a0, int64_t n, const at::Tensor&) { return dsb.narrow(1, a0, n).contiguous(); };
    per_query_backward(ctx, q, qt, ct, N, Rc, b, q_mask, /*with_scores=*/false, ds_of, ptr_or_null(dq),
                       ptr_or_null(dc), "maxsim_paired_grouped_backward");
  }
  const int64_t rq_eff = *std::max_element(group_rq.begin(), group_rq.end());
  const int64_t rc_eff = *std::max_element(group_rc.begin(), group_rc.end());
  if (want_dq) nonfinite::poison_gradient(dq, nonfinite::census(c, c_mask, rc_eff, 1), q_mask, rq_eff);
  if (want_dc) nonfinite::poison_gradient(dc, nonfinite::census(q, q_mask, rq_eff, 1), c_mask, rc_eff);
  return {gradient_out(dq, q, want_dq), gradient_out(dc, c, want_dc)};
}

// ---- matryoshka_infonce ---------------------------------------------------------------
void check_infonce_device(const at::Tensor& q, const at::Tensor& c, const at::Tensor& hn) {
  check_device_inputs(q, {&c, &hn});
  TORCH_CHECK_VALUE(c.size(1) < kMaxTokens, "the CUDA backend needs Rc < 2^22, got ", c.size(1));
}

// query_gradient (the cpu backend's fused dq) is not fused here: the third output is the
// empty (0,) placeholder and the backward computes dq from the tiles.
std::tuple<at::Tensor, at::Tensor, at::Tensor> matryoshka_infonce_cuda(
    const at::Tensor& q, const at::Tensor& c, const at::Tensor& hard_negatives, const at::Tensor& labels,
    at::IntArrayRef group_rq, at::IntArrayRef group_rc, double scale, const c10::optional<at::Tensor>& q_mask,
    const c10::optional<at::Tensor>& c_mask, const c10::optional<at::Tensor>& hn_mask, bool /*query_gradient*/) {
  // Label values: on the host for CPU tensors, by a device-side assert otherwise (no sync).
  check_infonce_args(q, c, hard_negatives, labels, group_rq, group_rc, scale, q_mask, c_mask, hn_mask);
  check_infonce_device(q, c, hard_negatives);
  const auto batches = group_batches(group_rq, group_rc, q.size(1), c.size(1));
  Ctx ctx(q);
  const auto f32 = q.options().dtype(at::kFloat);
  const int64_t G = int64_t(group_rq.size()), nq = q.size(0), nc = c.size(0), K = hard_negatives.size(1);
  if (nq == 0) return {at::zeros({G, 0}, f32), at::zeros({G, 0}, f32), at::empty({0}, f32)};
  const at::Tensor qc = last_dim_contiguous(q), cc = last_dim_contiguous(c);
  const at::Tensor hc = last_dim_contiguous(hard_negatives), lab = labels.contiguous();
  at::Tensor m_all = at::full({G, nq}, -INFINITY, f32), l_all = at::zeros({G, nq}, f32), pos = at::zeros({G, nq}, f32);
  ctx.track_all(qc, cc, hc, lab, m_all, l_all, pos);
  for (const auto* m : {&q_mask, &c_mask, &hn_mask})
    if (m->has_value()) ctx.track(**m);
  const TokenSet qt = tokens3(qc, q_mask), ct = tokens3(cc, c_mask), ht = tokens4(hc, hn_mask);
  for (const Batch& b : batches) {
    const int64_t Gb = b.gb.G;
    if (nc > 0) {
      // In-batch candidates: per-split (m, l), merged in split order.
      ScoreArgs a = score_args(q, qt, ct, nc, false, b.gb);
      a.lse = true;
      a.scale = float(scale);
      plan_scores(a, ctx.num_sms());
      const int64_t splits = a.num_splits;
      at::Tensor m = at::full({splits, Gb, nq}, -INFINITY, f32), l = at::zeros({splits, Gb, nq}, f32);
      ctx.track_all(m, l);
      a.m = m.data_ptr<float>();
      a.l = l.data_ptr<float>();
      a.state_split_stride = Gb * nq;
      a.pos = pos.data_ptr<float>() + b.g0 * nq;
      a.labels = lab.data_ptr<int64_t>();
      check_launch(launch_scores(a, ctx.stream()), "matryoshka_infonce");
      // (m, l) (+) (m_i, l_i) with torch.logsumexp's guard: an infinite max is shifted by 0,
      // so equal infinities do not produce exp(inf - inf) = NaN. NaN in l stays NaN.
      at::Tensor mb = m[0].clone(), lb = l[0].clone();
      for (int64_t i = 1; i < splits; ++i) {
        const at::Tensor mx = at::maximum(mb, m[i]);
        const at::Tensor safe = at::where(at::isinf(mx), at::zeros_like(mx), mx);
        lb = lb * at::exp(mb - safe) + l[i] * at::exp(m[i] - safe);
        mb = mx;
      }
      m_all.narrow(0, b.g0, Gb).copy_(mb);
      l_all.narrow(0, b.g0, Gb).copy_(lb);
    }
    // Hard negatives: each query against its own K, folded into its merged state.
    if (K > 0) {
      ScoreArgs h = score_args(q, qt, ht, K, true, b.gb);
      h.lse = true;
      h.scale = float(scale);
      plan_scores(h, ctx.num_sms());
      h.m = m_all.data_ptr<float>() + b.g0 * nq;
      h.l = l_all.data_ptr<float>() + b.g0 * nq;
      check_launch(launch_scores(h, ctx.stream()), "matryoshka_infonce (hard negatives)");
    }
  }
  at::Tensor lse = m_all + at::log(l_all);
  return {lse - pos, lse, at::empty({0}, f32)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> matryoshka_infonce_backward_cuda(
    const at::Tensor& grad, const at::Tensor& lse, const at::Tensor& q, const at::Tensor& c,
    const at::Tensor& hard_negatives, const at::Tensor& labels, at::IntArrayRef group_rq, at::IntArrayRef group_rc,
    double scale, const c10::optional<at::Tensor>& q_mask, const c10::optional<at::Tensor>& c_mask,
    const c10::optional<at::Tensor>& hn_mask, std::array<bool, 3> output_mask,
    const c10::optional<at::Tensor>& query_gradient) {
  check_infonce_args(q, c, hard_negatives, labels, group_rq, group_rc, scale, q_mask, c_mask, hn_mask);
  TORCH_CHECK_VALUE(!query_gradient.has_value() || query_gradient->numel() == 0,
                    "query_gradient: the CUDA backend computes dq in the backward, so its forward returns an "
                    "empty query_gradient; got shape ", query_gradient.has_value() ? query_gradient->sizes() : at::IntArrayRef{});
  check_infonce_device(q, c, hard_negatives);
  check_device_inputs(q, {&grad, &lse});
  const auto batches = group_batches(group_rq, group_rc, q.size(1), c.size(1));
  const int64_t G = int64_t(group_rq.size()), nq = q.size(0), nc = c.size(0), K = hard_negatives.size(1);
  const int64_t Rc = c.size(1), D = q.size(2);
  check_infonce_grad(grad, lse, G, nq);
  const auto [want_dq, want_dc, want_dhn] = output_mask;
  Ctx ctx(q);
  at::Tensor dq = accumulator(q, want_dq), dc = accumulator(c, want_dc), dhn = accumulator(hard_negatives, want_dhn);
  auto result = [&] {
    return std::make_tuple(gradient_out(dq, q, want_dq), gradient_out(dc, c, want_dc),
                           gradient_out(dhn, hard_negatives, want_dhn));
  };
  if (nq == 0 || !(want_dq || want_dc || want_dhn)) return result();
  const auto f32 = q.options().dtype(at::kFloat);
  const at::Tensor qc = last_dim_contiguous(q), cc = last_dim_contiguous(c);
  const at::Tensor hc = last_dim_contiguous(hard_negatives), lab = labels.contiguous();
  const at::Tensor gr = grad.to(at::kFloat).contiguous(), ls = lse.to(at::kFloat).contiguous();
  ctx.track_all(qc, cc, hc, dq, dc, dhn);
  for (const auto* m : {&q_mask, &c_mask, &hn_mask})
    if (m->has_value()) ctx.track(**m);
  const TokenSet qt = tokens3(qc, q_mask), ct = tokens3(cc, c_mask), ht = tokens4(hc, hn_mask);
  const int64_t esize = q.element_size();
  for (const Batch& b : batches) {
    const int64_t Gb = b.gb.G, rows = nq * b.gb.rq_eff, nb = b.gb.nb;
    const at::Tensor gsl = gr.narrow(0, b.g0, Gb).unsqueeze(-1) * scale;  // (Gb, Nq, 1)
    const at::Tensor lsl = ls.narrow(0, b.g0, Gb).unsqueeze(-1);
    // In-batch candidates: only for dq or dc.
    const int64_t chunk = (want_dq || want_dc) ? chunk_size(nc, rows, nb, Gb, nq, true) : nc;
    for (int64_t cb0 = 0; (want_dq || want_dc) && cb0 < nc; cb0 += chunk) {
      const int64_t n = std::min(chunk, nc - cb0);
      const TokenSet cht = chunk_of(ct, cb0, esize);
      at::Tensor S = at::empty({Gb, nq, n}, f32);
      at::Tensor J = at::empty({n, rows, nb}, q.options().dtype(at::kInt)), W = at::empty({n, rows, nb}, f32);
      ctx.track_all(S, J, W);
      ScoreArgs a = score_args(q, qt, cht, n, false, b.gb);
      set_score_output(a, S.data_ptr<float>(), n);
      set_argmax_output(a, J, rows);
      plan_scores(a, ctx.num_sms());
      check_launch(launch_scores(a, ctx.stream()), "matryoshka_infonce_backward (scores)");
      // dL/ds_g(a, b) = grad[g, a] * scale * (softmax_g(a)[b] - [b == labels[a]])
      const at::Tensor onehot =
          (lab.view({1, nq, 1}) == at::arange(cb0, cb0 + n, lab.options()).view({1, 1, n})).to(at::kFloat);
      const at::Tensor ds = (gsl * (at::exp(S * scale - lsl) - onehot)).contiguous();
      ctx.track(ds);
      check_launch(launch_weights(weight_args(J, W, ds.data_ptr<float>(), n, nq * n, nq, 0, false, b.gb, q_mask),
                                  ctx.stream()),
                   "matryoshka_infonce_backward (weights)");
      const GradArgs g = grad_args(q, qt, cht, nq, Rc, n, false, b.gb, J, W, ptr_or_null(dq),
                                   want_dc ? dc.data_ptr<float>() + cb0 * Rc * D : nullptr);
      if (want_dq) check_launch(launch_grad_q(g, ctx.stream()), "matryoshka_infonce_backward (dq)");
      if (want_dc) check_launch(launch_grad_c(g, ctx.stream()), "matryoshka_infonce_backward (dc)");
    }
    // Hard negatives (never positives): dL/ds = grad * scale * softmax; only for dq or dhn.
    auto ds_of = [&](int64_t a0, int64_t n, const at::Tensor& S) {
      return (gsl.narrow(1, a0, n) * at::exp(S * scale - lsl.narrow(1, a0, n))).contiguous();
    };
    per_query_backward(ctx, q, qt, ht, K, Rc, b, q_mask, /*with_scores=*/true, ds_of, ptr_or_null(dq),
                       ptr_or_null(dhn), "matryoshka_infonce_backward (hard negatives)");
  }
  // The NaNs of the dense formulation (common/nonfinite.h), as the CPU backend adds them.
  const int64_t rq_eff = *std::max_element(group_rq.begin(), group_rq.end());
  const int64_t rc_eff = *std::max_element(group_rc.begin(), group_rc.end());
  if (nc > 0 && want_dq) nonfinite::poison_gradient(dq, nonfinite::census(c, c_mask, rc_eff, 0), q_mask, rq_eff);
  if (nc > 0 && want_dc) nonfinite::poison_gradient(dc, nonfinite::census(q, q_mask, rq_eff, 0), c_mask, rc_eff);
  if (K > 0 && want_dq)
    nonfinite::poison_gradient(dq, nonfinite::census(hard_negatives, hn_mask, rc_eff, 1), q_mask, rq_eff);
  if (K > 0 && want_dhn)
    nonfinite::poison_gradient(dhn, nonfinite::census(q, q_mask, rq_eff, 1), hn_mask, rc_eff);
  return result();
}

#ifdef METAEMBED_CUDA_EMULATE
int64_t emu_set_schedule_op(int64_t mode) { return emu_set_schedule(int(mode)); }
int64_t emu_launch_count_op() { return emu_launch_count(); }
int64_t emu_set_workspace_bytes_op(int64_t bytes) {
  const int64_t prev = g_workspace_bytes;
  g_workspace_bytes = bytes > 0 ? bytes : kWorkspaceBytes;
  return prev;
}
#endif

}  // namespace
}  // namespace cuda
}  // namespace metaembed

#define METAEMBED_CUDA_IMPLS(m)                                                                      \
  m.impl("maxsim_grouped", &metaembed::cuda::maxsim_grouped_cuda);                                   \
  m.impl("maxsim_grouped_backward", &metaembed::cuda::maxsim_grouped_backward_cuda);                 \
  m.impl("maxsim_paired_grouped", &metaembed::cuda::maxsim_paired_grouped_cuda);                     \
  m.impl("maxsim_paired_grouped_backward", &metaembed::cuda::maxsim_paired_grouped_backward_cuda);   \
  m.impl("matryoshka_infonce", &metaembed::cuda::matryoshka_infonce_cuda);                           \
  m.impl("matryoshka_infonce_backward", &metaembed::cuda::matryoshka_infonce_backward_cuda)

#ifndef METAEMBED_CUDA_EMULATE
TORCH_LIBRARY_IMPL(metaembed, CUDA, m) { METAEMBED_CUDA_IMPLS(m); }
#else
// Test-only: the schemas of csrc/ops.cpp (common/schemas.h) under their own namespace,
// with the emulated kernels as CPU implementations.
TORCH_LIBRARY(metaembed_emu, m) {
  metaembed::define_ops(m);
  m.def("set_schedule(int mode) -> int", &metaembed::cuda::emu_set_schedule_op);
  m.def("launch_count() -> int", &metaembed::cuda::emu_launch_count_op);
  m.def("set_workspace_bytes(int bytes) -> int", &metaembed::cuda::emu_set_workspace_bytes_op);
}
TORCH_LIBRARY_IMPL(metaembed_emu, CPU, m) { METAEMBED_CUDA_IMPLS(m); }
#endif
