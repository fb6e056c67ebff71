// Non-finite inputs in the gradients of the C++ ops (CPU and CUDA): the NaNs of the dense
// formulation.
//
// The reference (and every tensor-core backend) computes the gradients as dense products
// over the budget, dq = W . c and dc = W^T . q, where W holds dL/ds at each selected
// (argmax) pair and 0 elsewhere. Every valid token pair within the budget thus contributes
// W * x, and 0 * x = NaN for a non-finite x. The CPU and CUDA kernels scatter only the
// selected pairs (W != 0), which already gives W * x for those; this pass adds the 0 * x
// terms afterwards, per output dimension d, for the valid rows within the budget:
//
//   * some valid token on the other side has NaN in dimension d    -> NaN (exact: W * NaN
//     and 0 * NaN are both NaN, whatever was selected);
//   * only infinities in dimension d (n of them), and the row's value is finite -> NaN (the
//     row selected none of them, so it met 0 * inf);
//   * only infinities, the row is already +-inf (it selected an infinity with W != 0): NaN
//     if n >= 2, else kept. Exact unless one row selected every one of several infinities
//     of that dimension, where the dense sum could be +-inf instead of NaN.
//
// It costs one isfinite pass over the inputs, in the backward only; masked tokens and
// tokens past the budget are never looked at and their gradients stay 0. Everything is
// ATen ops on the inputs' device; nothing is read on the host except for CPU tensors, so
// there is no device sync.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <utility>
#include <vector>

namespace metaembed {
namespace nonfinite {

// Per-dimension census of the non-finite values of the valid tokens r < r_eff of x
// (lead..., R, D) with mask (lead..., R) or none. `lead_keep` leading dims are kept (0: one
// census for all tokens; 1: one per leading index, e.g. per query of (Nq, K, Rc, D)).
struct Census {
  at::Tensor has_nan;  // (kept..., D) bool
  at::Tensor n_inf;    // (kept..., D) int32: number of infinite values
};

inline Census census(const at::Tensor& x, const c10::optional<at::Tensor>& mask, int64_t r_eff, int64_t lead_keep) {
  const int64_t tok = x.dim() - 2;
  const at::Tensor v = x.narrow(tok, 0, r_eff);
  at::Tensor nan = at::isnan(v), inf = at::isinf(v);
  if (mask.has_value()) {
    const at::Tensor m = mask->narrow(tok, 0, r_eff).unsqueeze(-1);
    nan = nan.logical_and(m);
    inf = inf.logical_and(m);
  }
  std::vector<int64_t> dims;
  for (int64_t d = lead_keep; d <= tok; ++d) dims.push_back(d);
  return Census{at::amax(nan.to(at::kByte), dims).to(at::kBool), at::sum(inf, dims, false, at::kInt)};
}

// Adds the dense formulation's NaNs (see above) to grad (lead..., R, D), in place, in the
// valid rows r < r_eff, from the census of the other side of the product.
inline void poison_gradient(at::Tensor& grad, const Census& other, const c10::optional<at::Tensor>& mask,
                            int64_t r_eff) {
  if (!grad.defined() || grad.numel() == 0) return;
  if (grad.is_cpu()) {  // nothing non-finite (the usual case): no work. A host read, but no sync on CPU.
    const at::Tensor any = other.has_nan.any().logical_or(other.n_inf.gt(0).any());
    if (!*any.data_ptr<bool>()) return;
  }
  const int64_t tok = grad.dim() - 2;
  auto broadcast = [&](at::Tensor f) {  // (kept..., D) -> (kept..., 1.., 1, D) against grad
    while (f.dim() < grad.dim() - 1) f = f.unsqueeze(f.dim() - 1);
    return f.unsqueeze(-2);
  };
  at::Tensor rows = grad.narrow(tok, 0, r_eff);
  const at::Tensor n_inf = broadcast(other.n_inf);
  at::Tensor poison = broadcast(other.has_nan)
                          .logical_or(n_inf.ge(1).logical_and(at::isfinite(rows).logical_or(n_inf.ge(2))));
  if (mask.has_value()) poison = poison.logical_and(mask->narrow(tok, 0, r_eff).unsqueeze(-1));
  rows.masked_fill_(poison, std::numeric_limits<double>::quiet_NaN());
}

}  // namespace nonfinite
}  // namespace metaembed
