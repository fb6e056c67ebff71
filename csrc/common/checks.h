// Host-side argument checks and group analysis shared by the CPU and CUDA op
// implementations: the C++ half of the one validator (metaembed_kernels/_validation.py,
// "Op arguments", holds the same checks with the same messages for the Python-defined
// backends and the fake kernels; tests/test_validation.py runs every bad case through every
// backend). The public Python API checks first with friendlier messages; these make a
// direct torch.ops.metaembed.* call equally safe. TORCH_CHECK_VALUE and TORCH_CHECK_TYPE
// surface in Python as ValueError and TypeError. Nothing here synchronises with a device.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace metaembed {

inline void check_operand(const at::Tensor& t, const char* name, int64_t ndim, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == ndim, name, " must have shape ", layout, ", got ", t.sizes());
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, name,
                   " must be float32, float16 or bfloat16, got ", s);
}

// q (Nq, Rq, D) and a candidate operand whose last dim is D, same dtype and device.
inline void check_pair(const at::Tensor& q, const at::Tensor& c, const char* cname, int64_t cdim,
                       const char* clayout) {
  check_operand(q, "q", 3, "(Nq, Rq, D)");
  check_operand(c, cname, cdim, clayout);
  TORCH_CHECK_VALUE(q.size(2) >= 1, "q must have D >= 1, got ", q.sizes());
  TORCH_CHECK_VALUE(c.size(-1) == q.size(2), cname, " must have the embedding dim D=", q.size(2), " of q, got ",
                    c.sizes());
  TORCH_CHECK_TYPE(c.scalar_type() == q.scalar_type(), cname, " must have the dtype of q (", q.scalar_type(),
                   "), got ", c.scalar_type());
  TORCH_CHECK_VALUE(c.device() == q.device(), cname, " must be on the device of q (", q.device(), "), got ",
                    c.device());
}

inline void check_mask(const c10::optional<at::Tensor>& mask, const char* name, at::IntArrayRef shape,
                       const at::Tensor& like) {
  if (!mask.has_value()) return;
  TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, name, " must be a bool tensor, got ", mask->scalar_type());
  TORCH_CHECK_VALUE(mask->sizes() == shape, name, " must have shape ", shape, ", got ", mask->sizes());
  TORCH_CHECK_VALUE(mask->device() == like.device(), name, " must be on device ", like.device(), ", got ",
                    mask->device());
}

// All argument checks of the maxsim_grouped ops (forward and backward); paired: c is
// (B, N, Rc, D), one row of candidates per query (maxsim_paired_grouped).
inline void check_maxsim_args(const at::Tensor& q, const at::Tensor& c, const c10::optional<at::Tensor>& q_mask,
                              const c10::optional<at::Tensor>& c_mask, bool paired = false) {
  if (paired) {
    check_pair(q, c, "c", 4, "(B, N, Rc, D)");
    TORCH_CHECK_VALUE(c.size(0) == q.size(0), "c must have shape (B, N, Rc, D) with B=", q.size(0), ", got ",
                      c.sizes());
  } else {
    check_pair(q, c, "c", 3, "(Nc, Rc, D)");
  }
  check_mask(q_mask, "q_mask", {q.size(0), q.size(1)}, q);
  check_mask(c_mask, "c_mask", c.sizes().slice(0, c.dim() - 1), q);
}

// The (G, Nq, Nc) (or (G, B, N) paired) gradient of the scores.
inline void check_scores_grad(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& c, int64_t G,
                              bool paired = false) {
  const int64_t cols = paired ? c.size(1) : c.size(0);
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef({G, q.size(0), cols}), "grad must have shape (G, ",
                    paired ? "B, N" : "Nq, Nc", ") = (", G, ", ", q.size(0), ", ", cols, "), got ", grad.sizes());
}

// Groups as the kernels consume them: distinct r_c boundaries in increasing order, each
// group pointing at its boundary. s_g needs the running max at bounds[bound_index[g]].
struct GroupPlan {
  std::vector<int64_t> rq, bound_index, bounds;
  int64_t rq_eff = 0, rc_eff = 0;
  int64_t size() const { return int64_t(rq.size()); }
};

inline GroupPlan make_group_plan(at::IntArrayRef group_rq, at::IntArrayRef group_rc, int64_t Rq, int64_t Rc) {
  TORCH_CHECK_VALUE(group_rq.size() == group_rc.size(), "group_rq and group_rc must have the same length, got ",
                    group_rq.size(), " and ", group_rc.size());
  TORCH_CHECK_VALUE(!group_rq.empty(), "groups must contain at least one (r_q, r_c) pair");
  GroupPlan plan;
  for (size_t g = 0; g < group_rq.size(); ++g) {
    TORCH_CHECK_VALUE(group_rq[g] >= 1 && group_rq[g] <= Rq && group_rc[g] >= 1 && group_rc[g] <= Rc, "groups[", g,
                      "] = (", group_rq[g], ", ", group_rc[g], ") is out of range: need 1 <= r_q <= Rq=", Rq,
                      " and 1 <= r_c <= Rc=", Rc);
    plan.rq.push_back(group_rq[g]);
    plan.bounds.push_back(group_rc[g]);
    plan.rq_eff = std::max(plan.rq_eff, group_rq[g]);
    plan.rc_eff = std::max(plan.rc_eff, group_rc[g]);
  }
  std::sort(plan.bounds.begin(), plan.bounds.end());
  plan.bounds.erase(std::unique(plan.bounds.begin(), plan.bounds.end()), plan.bounds.end());
  for (int64_t rc : group_rc)
    plan.bound_index.push_back(std::lower_bound(plan.bounds.begin(), plan.bounds.end(), rc) - plan.bounds.begin());
  return plan;
}

// labels (Nq,) int64 with 0 <= labels < Nc. Values are read on the host only for CPU
// tensors (free); for device tensors a device-side assert checks them without a sync (the
// kernels compare labels with candidate indices and never use them as addresses, so a bad
// label cannot cause an out-of-bounds access before the assert fires).
inline void check_labels(const at::Tensor& labels, const at::Tensor& q, int64_t nc) {
  const int64_t nq = q.size(0);
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == nq, "labels must have shape (Nq,) = (", nq, ",), got ",
                    labels.sizes());
  TORCH_CHECK_VALUE(labels.device() == q.device(), "labels must be on device ", q.device(), ", got ",
                    labels.device());
  if (nq == 0) return;
  if (labels.is_cpu()) {
    const at::Tensor lab = labels.contiguous();
    const int64_t* v = lab.data_ptr<int64_t>();
    int64_t lo = v[0], hi = v[0];
    for (int64_t a = 1; a < nq; ++a) {
      lo = std::min(lo, v[a]);
      hi = std::max(hi, v[a]);
    }
    TORCH_CHECK_VALUE(lo >= 0 && hi < nc, "labels must index the candidates c: need 0 <= labels < Nc=", nc,
                      ", got values in [", lo, ", ", hi, "]");
  } else {
    at::_assert_async(((labels >= 0) & (labels < nc)).all(),
                      "labels must index the candidates c: 0 <= labels < Nc");
  }
}

// All argument checks of the matryoshka_infonce ops (forward and backward).
inline GroupPlan check_infonce_args(const at::Tensor& q, const at::Tensor& c, const at::Tensor& hn,
                                    const at::Tensor& labels, at::IntArrayRef group_rq, at::IntArrayRef group_rc,
                                    double scale, const c10::optional<at::Tensor>& q_mask,
                                    const c10::optional<at::Tensor>& c_mask,
                                    const c10::optional<at::Tensor>& hn_mask) {
  check_pair(q, c, "c", 3, "(Nc, Rc, D)");
  check_pair(q, hn, "hard_negatives", 4, "(Nq, K, Rc, D)");
  TORCH_CHECK_VALUE(hn.size(0) == q.size(0) && hn.size(2) == c.size(1),
                    "hard_negatives must have shape (Nq, K, Rc, D) = (", q.size(0), ", K, ", c.size(1), ", ",
                    q.size(2), "), got ", hn.sizes());
  TORCH_CHECK_VALUE(scale > 0 && std::isfinite(scale), "scale must be finite and > 0 (1 / temperature), got ",
                    scale);
  check_mask(q_mask, "q_mask", {q.size(0), q.size(1)}, q);
  check_mask(c_mask, "c_mask", {c.size(0), c.size(1)}, q);
  check_mask(hn_mask, "hard_negatives_mask", {hn.size(0), hn.size(1), hn.size(2)}, q);
  check_labels(labels, q, c.size(0));
  return make_group_plan(group_rq, group_rc, q.size(1), c.size(1));
}

// The (G, Nq) grad and lse of matryoshka_infonce_backward.
inline void check_infonce_grad(const at::Tensor& grad, const at::Tensor& lse, int64_t G, int64_t nq) {
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef({G, nq}), "grad must have shape (G, Nq) = (", G, ", ", nq,
                    "), got ", grad.sizes());
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef({G, nq}), "lse must have shape (G, Nq) = (", G, ", ", nq,
                    "), got ", lse.sizes());
}

// The fused query gradient of matryoshka_infonce (nq, sum_g r_q(g), d), float32 (float64 for
// float64 inputs), as the forward returned it.
inline void check_query_gradient(const at::Tensor& jq, const GroupPlan& plan, const at::Tensor& q) {
  int64_t rows = 0;
  for (int64_t r : plan.rq) rows += r;
  TORCH_CHECK_VALUE(jq.dim() == 3 && jq.size(0) == q.size(0) && jq.size(1) == rows && jq.size(2) == q.size(2),
                    "query_gradient must have shape (Nq, sum_g r_q(g), D) = (", q.size(0), ", ", rows, ", ",
                    q.size(2), "), got ", jq.sizes());
  TORCH_CHECK_TYPE(jq.scalar_type() == (q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat),
                   "query_gradient must be float32 (float64 for float64 inputs), got ", jq.scalar_type());
  TORCH_CHECK_VALUE(jq.device() == q.device(), "query_gradient must be on device ", q.device());
}

// Argmax tokens saved by a maxsim forward for its backward (cpu/kernels.h SavedArgmax):
// (rows, cols, rq_eff, num_bounds), int16 unless max r_c >= 2^15 (then int32).
inline at::ScalarType saved_argmax_type(const GroupPlan& plan) {
  return plan.rc_eff < (int64_t(1) << 15) ? at::kShort : at::kInt;
}

inline std::vector<int64_t> saved_argmax_shape(const GroupPlan& plan, int64_t rows, int64_t cols) {
  return {rows, cols, plan.rq_eff, int64_t(plan.bounds.size())};
}

// A saved argmax handed back to a backward: its values become addresses, so they are all
// checked (-1 <= j < max r_c) on the host. Only CPU tensors can hold one.
inline void check_saved_argmax(const at::Tensor& argmax, const GroupPlan& plan, int64_t rows, int64_t cols) {
  const auto shape = saved_argmax_shape(plan, rows, cols);
  TORCH_CHECK_VALUE(argmax.sizes() == at::IntArrayRef(shape), "argmax must have shape (rows, cols, max r_q, ",
                    "distinct r_c) = ", at::IntArrayRef(shape), ", got ", argmax.sizes());
  TORCH_CHECK_TYPE(argmax.scalar_type() == saved_argmax_type(plan), "argmax must be ",
                   saved_argmax_type(plan), ", got ", argmax.scalar_type());
  TORCH_CHECK_VALUE(argmax.is_cpu(), "argmax: only the cpu backend saves an argmax, got a tensor on ",
                    argmax.device());
  TORCH_CHECK_VALUE(argmax.is_contiguous(), "argmax must be contiguous");
  int64_t lo = 0, hi = -1;  // a plain loop: a host read of a CPU tensor, not a dispatched .item()
  const int64_t n = argmax.numel();
  for (int64_t e = 0; e < n; ++e) {
    const int64_t v = argmax.scalar_type() == at::kShort ? argmax.data_ptr<int16_t>()[e] : argmax.data_ptr<int32_t>()[e];
    lo = e == 0 ? v : std::min(lo, v);
    hi = e == 0 ? v : std::max(hi, v);
  }
  TORCH_CHECK_VALUE(argmax.numel() == 0 || (lo >= -1 && hi < plan.rc_eff),
                    "argmax values must be candidate tokens in [-1, ", plan.rc_eff, "), got [", lo, ", ", hi, "]");
}

inline at::ScalarType score_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace metaembed
