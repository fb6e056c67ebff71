// CUDA implementations of the metaembed ops: argument checks, workspaces and the order of
// kernel launches around kernels.cu. Compiled by the host compiler (no device code here).
//
// Forward (maxsim_grouped): one launch of score_kernel writing (G, Nq, Nc) scores.
// Fused loss forward: score_kernel folds scale*s_g into an online log-sum-exp per
//   (split, group, query); the splits are merged here in split order (like the CPU
//   backend's chunks), then each query's hard negatives are folded in. Memory O(G*Nq).
// Backward (both ops): per candidate chunk, score_kernel records the argmax token of every
//   (candidate, query token, bound); dL/ds becomes per-entry weights (weights_kernel) and
//   grad_q_kernel / grad_c_kernel gather them into fp32 dq / dc. For the loss, dL/ds needs
//   the scores, so the chunk's scores (G x Nq x chunk) are kept and turned into
//   grad * scale * (softmax - onehot) here. Chunks are sized so these buffers stay under
//   kWorkspaceBytes (one chunk for training-sized batches); nothing of size
//   Nq*Nc*Rq*Rc is ever allocated.
// Groups beyond kMaxGroups are processed in batches (each batch its own launches).
// Everything runs on the current CUDA stream of the inputs' device; no atomics, so all
// results are deterministic.
//
// With METAEMBED_CUDA_EMULATE this file builds the test-only extension that runs the same
// kernels on the CPU (ops "metaembed_emu::*", CPU tensors).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#ifndef METAEMBED_CUDA_EMULATE
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "../common/checks.h"
#include "../common/schemas.h"
#include "kernels.h"

namespace metaembed {
namespace cuda {
namespace {

constexpr int64_t kWorkspaceBytes = int64_t(256) << 20;
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
  return std::max<int64_t>(1, std::min<int64_t>(nc, kWorkspaceBytes / std::max<int64_t>(per, 1)));
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

GradArgs grad_args(const at::Tensor& q, const TokenSet& qt, const TokenSet& ct, int64_t Rc, int64_t ncand,
                   bool per_query, const GroupBatch& gb, const at::Tensor& J, const at::Tensor& W, at::Tensor& dq,
                   float* dc) {
  GradArgs g;
  g.dtype = dtype_of(q);
  g.D = q.size(2);
  g.Rq = q.size(1);
  g.Rc = Rc;
  g.q = qt;
  g.c = ct;
  g.per_query = per_query;
  g.nq = q.size(0);
  g.ncand = ncand;
  g.tb = J.size(1);
  g.rq_eff = gb.rq_eff;
  g.rc_eff = gb.rc_eff;
  g.nb = gb.nb;
  g.argmax = J.data_ptr<int32_t>();
  g.w = W.data_ptr<float>();
  g.dq = dq.data_ptr<float>();
  g.dc = dc;
  return g;
}

WeightArgs weight_args(const at::Tensor& J, const at::Tensor& W, const at::Tensor& ds, int64_t nq, int64_t K,
                       bool per_query, const GroupBatch& gb, const c10::optional<at::Tensor>& q_mask) {
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
  w.ds = ds.data_ptr<float>();
  w.ds_ld = ds.size(2);
  w.ds_gstride = ds.size(1) * ds.size(2);
  w.qmask = mask_ptr(q_mask);
  if (q_mask.has_value()) {
    w.qm0 = stride_of(*q_mask, 0);
    w.qm1 = stride_of(*q_mask, 1);
  }
  w.groups = gb;
  return w;
}

// ---- maxsim_grouped -------------------------------------------------------------------
at::Tensor maxsim_grouped_cuda(const at::Tensor& q, const at::Tensor& c, at::IntArrayRef group_rq,
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

std::tuple<at::Tensor, at::Tensor> maxsim_grouped_backward_cuda(const at::Tensor& grad, const at::Tensor& q,
                                                                const at::Tensor& c, at::IntArrayRef group_rq,
                                                                at::IntArrayRef group_rc,
                                                                const c10::optional<at::Tensor>& q_mask,
                                                                const c10::optional<at::Tensor>& c_mask) {
  check_maxsim_args(q, c, q_mask, c_mask);
  check_device_inputs(q, {&c, &grad});
  TORCH_CHECK_VALUE(c.size(1) < kMaxTokens, "the CUDA backend needs Rc < 2^22, got ", c.size(1));
  const auto batches = group_batches(group_rq, group_rc, q.size(1), c.size(1));
  const int64_t G = int64_t(group_rq.size()), nq = q.size(0), nc = c.size(0), Rc = c.size(1), D = q.size(2);
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef({G, nq, nc}), "grad must have shape (G, Nq, Nc), got ",
                    grad.sizes());
  Ctx ctx(q);
  if (nq == 0 || nc == 0) return {at::zeros_like(q), at::zeros_like(c)};
  const at::Tensor qc = last_dim_contiguous(q), cc = last_dim_contiguous(c);
  const at::Tensor ds = grad.to(at::kFloat).contiguous();
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq = at::zeros({nq, q.size(1), D}, f32), dc = at::zeros({nc, Rc, D}, f32);
  ctx.track_all(qc, cc, ds, dq, dc);
  if (q_mask) ctx.track(*q_mask);
  if (c_mask) ctx.track(*c_mask);
  const TokenSet qt = tokens3(qc, q_mask), ct = tokens3(cc, c_mask);
  const int64_t esize = q.element_size();
  for (const Batch& b : batches) {
    const int64_t rows = nq * b.gb.rq_eff, nb = b.gb.nb;
    const int64_t chunk = chunk_size(nc, rows, nb, b.gb.G, nq, false);
    const at::Tensor dsb = ds.narrow(0, b.g0, b.gb.G);
    for (int64_t cb0 = 0; cb0 < nc; cb0 += chunk) {
      const int64_t n = std::min(chunk, nc - cb0);
      const TokenSet cht = chunk_of(ct, cb0, esize);
      at::Tensor J = at::empty({n, rows, nb}, q.options().dtype(at::kInt));
      at::Tensor W = at::empty({n, rows, nb}, f32);
      ctx.track(J);
      ctx.track(W);
      ScoreArgs a = score_args(q, qt, cht, n, false, b.gb);
      set_argmax_output(a, J, rows);
      plan_scores(a, ctx.num_sms());
      check_launch(launch_scores(a, ctx.stream()), "maxsim_grouped_backward (argmax)");
      // dS of this chunk: a view of grad with row length Nc, advanced to column cb0.
      WeightArgs w = weight_args(J, W, dsb, nq, 0, false, b.gb, q_mask);
      w.ds = dsb.data_ptr<float>() + cb0;
      check_launch(launch_weights(w, ctx.stream()), "maxsim_grouped_backward (weights)");
      GradArgs g = grad_args(q, qt, cht, Rc, n, false, b.gb, J, W, dq, dc.data_ptr<float>() + cb0 * Rc * D);
      check_launch(launch_grad_q(g, ctx.stream()), "maxsim_grouped_backward (dq)");
      check_launch(launch_grad_c(g, ctx.stream()), "maxsim_grouped_backward (dc)");
    }
  }
  return {dq.to(q.scalar_type()), dc.to(c.scalar_type())};
}

// ---- matryoshka_infonce ---------------------------------------------------------------
void check_infonce_device(const at::Tensor& q, const at::Tensor& c, const at::Tensor& hn) {
  check_device_inputs(q, {&c, &hn});
  TORCH_CHECK_VALUE(c.size(1) < kMaxTokens, "the CUDA backend needs Rc < 2^22, got ", c.size(1));
}

std::tuple<at::Tensor, at::Tensor> matryoshka_infonce_cuda(
    const at::Tensor& q, const at::Tensor& c, const at::Tensor& hard_negatives, const at::Tensor& labels,
    at::IntArrayRef group_rq, at::IntArrayRef group_rc, double scale, const c10::optional<at::Tensor>& q_mask,
    const c10::optional<at::Tensor>& c_mask, const c10::optional<at::Tensor>& hn_mask) {
  check_infonce_args(q, c, hard_negatives, labels, group_rq, group_rc, scale, q_mask, c_mask, hn_mask);
  check_infonce_device(q, c, hard_negatives);
  const auto batches = group_batches(group_rq, group_rc, q.size(1), c.size(1));
  Ctx ctx(q);
  const auto f32 = q.options().dtype(at::kFloat);
  const int64_t G = int64_t(group_rq.size()), nq = q.size(0), nc = c.size(0), K = hard_negatives.size(1);
  if (nq == 0) return {at::zeros({G, 0}, f32), at::zeros({G, 0}, f32)};
  const at::Tensor qc = last_dim_contiguous(q), cc = last_dim_contiguous(c);
  const at::Tensor hc = last_dim_contiguous(hard_negatives), lab = labels.contiguous();
  at::Tensor m_all = at::empty({G, nq}, f32), l_all = at::empty({G, nq}, f32), pos = at::zeros({G, nq}, f32);
  ctx.track_all(qc, cc, hc, lab, m_all, l_all, pos);
  for (const auto* m : {&q_mask, &c_mask, &hn_mask})
    if (m->has_value()) ctx.track(**m);
  const TokenSet qt = tokens3(qc, q_mask), ct = tokens3(cc, c_mask), ht = tokens4(hc, hn_mask);
  for (const Batch& b : batches) {
    // In-batch candidates: per-split (m, l), merged in split order.
    ScoreArgs a = score_args(q, qt, ct, nc, false, b.gb);
    a.lse = true;
    a.scale = float(scale);
    plan_scores(a, ctx.num_sms());
    const int64_t Gb = b.gb.G, splits = a.num_splits;
    at::Tensor m = at::full({splits, Gb, nq}, -INFINITY, f32), l = at::zeros({splits, Gb, nq}, f32);
    ctx.track(m);
    ctx.track(l);
    a.m = m.data_ptr<float>();
    a.l = l.data_ptr<float>();
    a.state_split_stride = Gb * nq;
    a.pos = pos.data_ptr<float>() + b.g0 * nq;
    a.labels = lab.data_ptr<int64_t>();
    check_launch(launch_scores(a, ctx.stream()), "matryoshka_infonce");
    at::Tensor mb = m[0].clone(), lb = l[0].clone();
    for (int64_t i = 1; i < splits; ++i) {  // (m, l) (+) (m_i, l_i)
      const at::Tensor mx = at::maximum(mb, m[i]);
      const at::Tensor safe = at::where(at::isinf(mx), at::zeros_like(mx), mx);
      lb = lb * at::exp(mb - safe) + l[i] * at::exp(m[i] - safe);
      mb = mx;
    }
    m_all.narrow(0, b.g0, Gb).copy_(mb);
    l_all.narrow(0, b.g0, Gb).copy_(lb);
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
  return {lse - pos, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> matryoshka_infonce_backward_cuda(
    const at::Tensor& grad, const at::Tensor& lse, const at::Tensor& q, const at::Tensor& c,
    const at::Tensor& hard_negatives, const at::Tensor& labels, at::IntArrayRef group_rq, at::IntArrayRef group_rc,
    double scale, const c10::optional<at::Tensor>& q_mask, const c10::optional<at::Tensor>& c_mask,
    const c10::optional<at::Tensor>& hn_mask) {
  check_infonce_args(q, c, hard_negatives, labels, group_rq, group_rc, scale, q_mask, c_mask, hn_mask);
  check_infonce_device(q, c, hard_negatives);
  check_device_inputs(q, {&grad, &lse});
  const auto batches = group_batches(group_rq, group_rc, q.size(1), c.size(1));
  const int64_t G = int64_t(group_rq.size()), nq = q.size(0), nc = c.size(0), K = hard_negatives.size(1);
  const int64_t Rc = c.size(1), D = q.size(2);
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef({G, nq}) && lse.sizes() == grad.sizes(),
                    "grad and lse must have shape (G, Nq), got ", grad.sizes(), " and ", lse.sizes());
  Ctx ctx(q);
  if (nq == 0) return {at::zeros_like(q), at::zeros_like(c), at::zeros_like(hard_negatives)};
  const auto f32 = q.options().dtype(at::kFloat);
  const at::Tensor qc = last_dim_contiguous(q), cc = last_dim_contiguous(c);
  const at::Tensor hc = last_dim_contiguous(hard_negatives), lab = labels.contiguous();
  const at::Tensor gr = grad.to(at::kFloat).contiguous(), ls = lse.to(at::kFloat).contiguous();
  at::Tensor dq = at::zeros({nq, q.size(1), D}, f32), dc = at::zeros({nc, Rc, D}, f32);
  at::Tensor dhn = at::zeros({nq, K, Rc, D}, f32);
  ctx.track_all(qc, cc, hc, dq, dc, dhn);
  for (const auto* m : {&q_mask, &c_mask, &hn_mask})
    if (m->has_value()) ctx.track(**m);
  const TokenSet qt = tokens3(qc, q_mask), ct = tokens3(cc, c_mask), ht = tokens4(hc, hn_mask);
  const int64_t esize = q.element_size();
  for (const Batch& b : batches) {
    const int64_t Gb = b.gb.G, rows = nq * b.gb.rq_eff, nb = b.gb.nb;
    const at::Tensor gsl = gr.narrow(0, b.g0, Gb).unsqueeze(-1) * scale;  // (Gb, Nq, 1)
    const at::Tensor lsl = ls.narrow(0, b.g0, Gb).unsqueeze(-1);
    const int64_t chunk = chunk_size(nc, rows, nb, Gb, nq, true);
    for (int64_t cb0 = 0; cb0 < nc; cb0 += chunk) {
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
      check_launch(launch_weights(weight_args(J, W, ds, nq, 0, false, b.gb, q_mask), ctx.stream()),
                   "matryoshka_infonce_backward (weights)");
      GradArgs g = grad_args(q, qt, cht, Rc, n, false, b.gb, J, W, dq, dc.data_ptr<float>() + cb0 * Rc * D);
      check_launch(launch_grad_q(g, ctx.stream()), "matryoshka_infonce_backward (dq)");
      check_launch(launch_grad_c(g, ctx.stream()), "matryoshka_infonce_backward (dc)");
    }
    if (K > 0) {  // hard negatives: never positives, dL/ds = grad * scale * softmax
      const int64_t hrows = b.gb.rq_eff;
      at::Tensor S = at::empty({Gb, nq, K}, f32);
      at::Tensor J = at::empty({nq * K, hrows, nb}, q.options().dtype(at::kInt));
      at::Tensor W = at::empty({nq * K, hrows, nb}, f32);
      ctx.track_all(S, J, W);
      ScoreArgs a = score_args(q, qt, ht, K, true, b.gb);
      set_score_output(a, S.data_ptr<float>(), K);
      set_argmax_output(a, J, hrows);
      plan_scores(a, ctx.num_sms());
      check_launch(launch_scores(a, ctx.stream()), "matryoshka_infonce_backward (hard negative scores)");
      const at::Tensor ds = (gsl * at::exp(S * scale - lsl)).contiguous();
      ctx.track(ds);
      check_launch(launch_weights(weight_args(J, W, ds, nq, K, true, b.gb, q_mask), ctx.stream()),
                   "matryoshka_infonce_backward (hard negative weights)");
      GradArgs g = grad_args(q, qt, ht, Rc, K, true, b.gb, J, W, dq, dhn.data_ptr<float>());
      check_launch(launch_grad_q(g, ctx.stream()), "matryoshka_infonce_backward (hard negative dq)");
      check_launch(launch_grad_c(g, ctx.stream()), "matryoshka_infonce_backward (dhn)");
    }
  }
  return {dq.to(q.scalar_type()), dc.to(c.scalar_type()), dhn.to(hard_negatives.scalar_type())};
}

#ifdef METAEMBED_CUDA_EMULATE
int64_t emu_set_schedule_op(int64_t mode) { return emu_set_schedule(int(mode)); }
int64_t emu_launch_count_op() { return emu_launch_count(); }
#endif

}  // namespace
}  // namespace cuda
}  // namespace metaembed

#ifndef METAEMBED_CUDA_EMULATE
TORCH_LIBRARY_IMPL(metaembed, CUDA, m) {
  m.impl("maxsim_grouped", &metaembed::cuda::maxsim_grouped_cuda);
  m.impl("maxsim_grouped_backward", &metaembed::cuda::maxsim_grouped_backward_cuda);
  m.impl("matryoshka_infonce", &metaembed::cuda::matryoshka_infonce_cuda);
  m.impl("matryoshka_infonce_backward", &metaembed::cuda::matryoshka_infonce_backward_cuda);
}
#else
// Test-only: the schemas of csrc/ops.cpp (common/schemas.h) under their own namespace,
// with the emulated kernels as CPU implementations.
TORCH_LIBRARY(metaembed_emu, m) {
  metaembed::define_ops(m);
  m.def("set_schedule(int mode) -> int", &metaembed::cuda::emu_set_schedule_op);
  m.def("launch_count() -> int", &metaembed::cuda::emu_launch_count_op);
}
TORCH_LIBRARY_IMPL(metaembed_emu, CPU, m) {
  m.impl("maxsim_grouped", &metaembed::cuda::maxsim_grouped_cuda);
  m.impl("maxsim_grouped_backward", &metaembed::cuda::maxsim_grouped_backward_cuda);
  m.impl("matryoshka_infonce", &metaembed::cuda::matryoshka_infonce_cuda);
  m.impl("matryoshka_infonce_backward", &metaembed::cuda::matryoshka_infonce_backward_cuda);
}
#endif
