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
// Masked tokens and tokens past the budget are never looked at and their gradients stay
// 0. CPU tensors are scanned by one plain loop (no temporaries; nothing else runs when all
// values are finite, the usual case); other devices use ATen ops on the device and never
// read anything on the host (no sync).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace metaembed {
namespace nonfinite {

// Per-dimension census of the non-finite values of the valid tokens r < r_eff of x
// (lead..., R, D) with mask (lead..., R) or none. `lead_keep` leading dims are kept (0: one
// census for all tokens; 1: one per leading index, e.g. per query of (Nq, K, Rc, D)).
struct Census {
  bool clean = false;  // known on the host to hold no non-finite value (CPU only)
  at::Tensor has_nan;  // (kept..., D) bool
  at::Tensor n_inf;    // (kept..., D) int32: number of infinite values
};

namespace detail {

// x contiguous, viewed as (outer, inner, R, D): `outer` kept rows of inner * R tokens each.
template <class T>
bool census_cpu(const T* x, const uint8_t* mask, int64_t outer, int64_t inner, int64_t R, int64_t r_eff, int64_t D,
                bool* has_nan, int32_t* n_inf) {
  bool any = false;
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t n = 0; n < inner; ++n) {
      for (int64_t r = 0; r < r_eff; ++r) {
        const int64_t token = (o * inner + n) * R + r;
        if (mask && !mask[token]) continue;
        const T* row = x + token * D;
        for (int64_t d = 0; d < D; ++d) {
          const float v = static_cast<float>(row[d]);
          if (std::isfinite(v)) continue;
          any = true;
          if (std::isnan(v))
            has_nan[o * D + d] = true;
          else
            ++n_inf[o * D + d];
        }
      }
    }
  }
  return any;
}

}  // namespace detail

inline Census census(const at::Tensor& x, const c10::optional<at::Tensor>& mask, int64_t r_eff, int64_t lead_keep) {
  const int64_t tok = x.dim() - 2, D = x.size(-1);
  std::vector<int64_t> kept(x.sizes().begin(), x.sizes().begin() + lead_keep);
  kept.push_back(D);
  if (x.is_cpu()) {
    int64_t outer = 1, inner = 1;
    for (int64_t k = 0; k < lead_keep; ++k) outer *= x.size(k);
    for (int64_t k = lead_keep; k < tok; ++k) inner *= x.size(k);
    const at::Tensor xc = x.contiguous();  // a no-op for the usual contiguous inputs
    const at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
    Census out;
    out.has_nan = at::zeros(kept, x.options().dtype(at::kBool));
    out.n_inf = at::zeros(kept, x.options().dtype(at::kInt));
    bool any = false;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nonfinite_census", [&] {
      const uint8_t* mp = m.defined() ? reinterpret_cast<const uint8_t*>(m.data_ptr<bool>()) : nullptr;
      any = detail::census_cpu<scalar_t>(xc.data_ptr<scalar_t>(), mp, outer, inner, x.size(tok), r_eff, D,
                                         out.has_nan.data_ptr<bool>(), out.n_inf.data_ptr<int32_t>());
    });
    out.clean = !any;
    return out;
  }
  const at::Tensor v = x.narrow(tok, 0, r_eff);
  at::Tensor nan = at::isnan(v), inf = at::isinf(v);
  if (mask.has_value()) {
    const at::Tensor mv = mask->narrow(tok, 0, r_eff).unsqueeze(-1);
    nan = nan.logical_and(mv);
    inf = inf.logical_and(mv);
  }
  std::vector<int64_t> dims;
  for (int64_t d = lead_keep; d <= tok; ++d) dims.push_back(d);
  return Census{false, at::amax(nan.to(at::kByte), dims).to(at::kBool), at::sum(inf, dims, false, at::kInt)};
}

// Adds the dense formulation's NaNs (see above) to grad (lead..., R, D), in place, in the
// valid rows r < r_eff, from the census of the other side of the product.
inline void poison_gradient(at::Tensor& grad, const Census& other, const c10::optional<at::Tensor>& mask,
                            int64_t r_eff) {
  if (!grad.defined() || grad.numel() == 0 || other.clean) return;
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
