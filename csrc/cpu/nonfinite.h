// Non-finite inputs in the gradients of the CPU ops: the NaNs of the dense formulation.
//
// The reference (and every tensor-core backend) computes the gradients as dense products
// over the budget, dq = W . c and dc = W^T . q, where W holds dL/ds at each selected
// (argmax) pair and 0 elsewhere. Every valid token pair within the budget thus contributes
// 0 * x, so a NaN or inf in dimension d of a valid token makes dimension d of every valid
// gradient row on the other side of the product NaN (0 * inf = NaN). The CPU kernels
// scatter only the selected pairs; this pass adds exactly those NaNs afterwards, so that
// gradients follow the reference bit for bit in where they are NaN. It costs one isfinite
// pass over the inputs, in the backward only; masked tokens and tokens past the budget
// are never looked at and their gradients stay 0.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <vector>

namespace metaembed {
namespace cpu {

// x (lead..., R, D), mask (lead..., R) or none: returns flags (lead..., D), true where some
// valid token r < r_eff has a non-finite value in that dimension. `lead_keep` leading dims
// are kept (0: reduce over everything but D; 1: one flag row per leading index, e.g. per
// query for hard negatives (Nq, K, Rc, D)).
inline at::Tensor nonfinite_dims(const at::Tensor& x, const c10::optional<at::Tensor>& mask, int64_t r_eff,
                                 int64_t lead_keep) {
  const int64_t tok = x.dim() - 2;
  at::Tensor bad = at::isfinite(x.narrow(tok, 0, r_eff)).logical_not_();
  if (mask.has_value()) bad.logical_and_(mask->narrow(tok, 0, r_eff).unsqueeze(-1));
  std::vector<int64_t> dims;
  for (int64_t d = lead_keep; d <= tok; ++d) dims.push_back(d);
  return at::amax(bad.to(at::kByte), dims).to(at::kBool);
}

// Sets grad (lead..., R, D) rows r < r_eff that are valid (mask) to NaN in the dimensions
// flagged by `flags` ((D) or (lead_keep dims..., D), broadcast over the rest).
inline void poison_gradient(at::Tensor& grad, const at::Tensor& flags, const c10::optional<at::Tensor>& mask,
                            int64_t r_eff) {
  if (!grad.defined() || grad.numel() == 0) return;
  // Nothing flagged (the usual case): no work. Read on the host (a CPU tensor: no sync).
  const at::Tensor any = flags.any();
  if (!*any.data_ptr<bool>()) return;
  const int64_t tok = grad.dim() - 2;
  at::Tensor f = flags;
  while (f.dim() < grad.dim() - 1) f = f.unsqueeze(f.dim() - 1);  // (lead..., 1.., D)
  f = f.unsqueeze(-2);                                             // token dim
  if (mask.has_value()) f = f.logical_and(mask->narrow(tok, 0, r_eff).unsqueeze(-1));
  grad.narrow(tok, 0, r_eff).masked_fill_(f, std::numeric_limits<double>::quiet_NaN());
}

}  // namespace cpu
}  // namespace metaembed
