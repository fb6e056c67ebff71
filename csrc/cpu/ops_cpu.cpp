// CPU implementations of the metaembed ops: argument checks, blocking, threading and
// dtype handling around the ISA kernels of engine.h.
//
// Threading (at::parallel_for) and determinism:
//  * forward: work items are (query block, candidate) pairs, split into contiguous ranges;
//    every output element is written by exactly one thread.
//  * backward: candidates are split into one contiguous chunk per thread. A chunk owns the
//    dc rows of its candidates and a private dq buffer; the dq buffers are summed in chunk
//    order. Hard negatives and per-query (paired) candidates are split by query, which owns
//    its dq rows and its candidates' gradient rows. Results are bitwise reproducible for a
//    given thread count; no atomics anywhere.
//  * output_mask: a gradient that is not wanted is neither computed nor allocated (an empty
//    (0,) tensor is returned in its place); with no gradient wanted nothing runs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <memory>

#include "../common/checks.h"
#include "../common/nonfinite.h"
#include "isa_select.h"
#include "kernels.h"

namespace metaembed {
namespace cpu {
namespace {

using nonfinite::census;
using nonfinite::poison_gradient;

inline int64_t ceil_div_host(int64_t a, int64_t b) { return (a + b - 1) / b; }

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kF32;
    case at::kHalf:
      return kF16;
    case at::kBFloat16:
      return kBF16;
    default:
      return kF64;
  }
}

// The kernels need the embedding dim contiguous; other dims may have any stride.
at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

struct Mask {
  at::Tensor t;  // keeps a contiguous copy alive when needed
  const uint8_t* ptr = nullptr;
};

Mask mask_of(const c10::optional<at::Tensor>& m) {
  Mask out;
  if (m.has_value()) {
    out.t = m->contiguous();
    out.ptr = reinterpret_cast<const uint8_t*>(out.t.data_ptr<bool>());
  }
  return out;
}

// Everything one call needs, kept alive for its duration.
struct Prepared {
  GroupPlan plan;
  at::Tensor q, c, qpack;
  Mask q_mask, c_mask;
  const IsaKernels* isa = nullptr;
  const KernelSet* ks = nullptr;
  Problem p{};
};

// Blocking: D in chunks of kc (whole D up to 768), and query blocks sized by how much
// work each packed-query load feeds. A register tile of mr candidate rows does mr FMAs
// per query vector it loads: with the full tile (r_c >= min(mr, 4)) a block's packed
// queries may fill 256 KiB of L2 per D chunk while every candidate streams past it; for
// tiny budgets (r_c = 1, 2, ...) the loads would outrun L2, so the block shrinks to
// 16 KiB (L1) and candidates are re-read per block from L2/L3 instead.
// min_blocks > 1 caps the block size so that work split by query block has at least that
// many blocks (the fused loss forward runs one thread per query block).
//
// lanes_ok (maxsim_grouped's forward): small budgets with many query tokens take the
// candidate-lane layout (kernels.h, Layout) when D fits one chunk and whole queries fit a
// register tile. Not when the query-panel layout would end a candidate on a 1-row tile of
// a later token (r_c = MR k + 1 > 1: that tile splits D, see the policies), so that a saved
// argmax always equals the query-panel backward's recompute. Query blocks are then chunks
// of queries whose rows fill at most 256 KiB of L2, reused by every candidate block.
void choose_blocking(Problem& p, const IsaKernels& isa, const KernelSet& ks, int64_t min_blocks = 1,
                     bool lanes_ok = false) {
  const int64_t D = p.d;
  p.kc = D <= 768 ? D : 8 * ceil_div_host(D, 8 * ceil_div_host(D, 512));
  const int64_t rq = p.groups.rq_eff, rc = p.groups.rc_eff;
  if (lanes_ok && p.kc == D && rq <= isa.mr && rc <= kLanesMaxRc && (rc == 1 || rc % isa.mr != 1) &&
      p.nq * rq > kFewQueryTokens) {
    const int64_t qpt = isa.mr / rq;  // whole queries per register tile
    const int64_t fit = (int64_t(256) << 10) / (rq * D * ks.row_elem_bytes);
    p.layout = kCandidateLanes;
    p.queries_per_block = std::min(p.nq, std::max<int64_t>(qpt, fit / qpt * qpt));
    p.num_qblocks = ceil_div_host(p.nq, p.queries_per_block);
    p.panels_per_block = ceil_div_host(p.queries_per_block * rq, isa.nr);
    return;
  }
  const int64_t block_bytes = p.groups.rc_eff >= std::min(isa.mr, 4) ? (int64_t(256) << 10) : (int64_t(16) << 10);
  const int64_t target_tokens = std::max<int64_t>(isa.nr, block_bytes / (p.kc * ks.pack_elem_bytes));
  p.queries_per_block = std::max<int64_t>(1, std::min<int64_t>(p.nq, target_tokens / p.groups.rq_eff));
  p.queries_per_block = std::min(p.queries_per_block, std::max<int64_t>(1, ceil_div_host(p.nq, min_blocks)));
  p.num_qblocks = ceil_div_host(p.nq, p.queries_per_block);
  p.panels_per_block = ceil_div_host(p.queries_per_block * p.groups.rq_eff, isa.nr);
}

// Fills P (P.plan must be set) and packs the queries (not with pack = false: the paired
// ops pack each query alone, Engine::paired_forward / paired_backward).
void prepare(Prepared& P, const at::Tensor& q, const at::Tensor& c, const c10::optional<at::Tensor>& q_mask,
             const c10::optional<at::Tensor>& c_mask, int64_t min_blocks = 1, bool lanes_ok = false,
             bool pack = true) {
  P.q = last_dim_contiguous(q);
  P.c = last_dim_contiguous(c);
  P.q_mask = mask_of(q_mask);
  P.c_mask = mask_of(c_mask);
  const DType dt = dtype_of(q);
  P.isa = dt == kF64 ? generic_kernels() : active_kernels();
  P.ks = &P.isa->by_dtype[dt];
  const GroupPlan& g = P.plan;
  Problem& p = P.p;
  p.dtype = dt;
  p.nq = q.size(0);
  p.rq = q.size(1);
  p.d = q.size(2);
  p.nc = c.size(0);
  p.rc = c.size(1);
  p.q = Tokens{P.q.data_ptr(), P.q.stride(0), P.q.stride(1), 0, P.q_mask.ptr, p.rq, 1, 0};
  p.c = Tokens{P.c.data_ptr(), P.c.stride(0), P.c.stride(1), 0, P.c_mask.ptr, p.rc, 1, 0};
  p.groups = Groups{g.size(), g.rq.data(), g.bound_index.data(), int64_t(g.bounds.size()), g.bounds.data(),
                    g.rq_eff, g.rc_eff};
  choose_blocking(p, *P.isa, *P.ks, min_blocks, lanes_ok);
  if (!pack) return;
  P.qpack = at::empty({int64_t(P.ks->qpack_bytes(p)) + 64}, q.options().dtype(at::kByte));
  p.qpack = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(P.qpack.data_ptr()) + 63) & ~uintptr_t(63));
  at::parallel_for(0, p.num_qblocks, 1, [&](int64_t b, int64_t e) {
    for (int64_t qb = b; qb < e; ++qb) P.ks->pack_queries(p, qb);
  });
}

// Per-thread workspace for one parallel_for body.
struct Workspace {
  explicit Workspace(const Prepared& P) : buf(new uint8_t[P.ks->workspace_bytes(P.p)]) {}
  void* get() { return buf.get(); }
  std::unique_ptr<uint8_t[]> buf;
};

// Grain so that tiny problems do not pay for waking threads (~1 MFLOP per task minimum).
int64_t grain_for(double flops_per_item) {
  return std::max<int64_t>(1, int64_t(std::ceil(1e6 / std::max(flops_per_item, 1.0))));
}

// Contiguous candidate chunk i of n over [0, nc).
inline int64_t chunk_begin(int64_t i, int64_t n, int64_t nc) { return i * nc / n; }

int64_t num_candidate_chunks(int64_t nc) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nc));
}

// Sum per-chunk dq buffers (n, nq, rq, d) in chunk order: deterministic.
at::Tensor reduce_chunks(const at::Tensor& partial) {
  at::Tensor out = partial[0].clone();
  for (int64_t i = 1; i < partial.size(0); ++i) out.add_(partial[i]);
  return out;
}

// The argmax a forward saves for its backward when asked (save_argmax), else the empty
// placeholder; and the view the kernels write through.
at::Tensor saved_argmax_output(const GroupPlan& plan, int64_t rows, int64_t cols, bool save, const at::Tensor& like) {
  return save ? at::empty(saved_argmax_shape(plan, rows, cols), like.options().dtype(saved_argmax_type(plan)))
              : at::empty({0}, like.options().dtype(saved_argmax_type(plan)));
}

SavedArgmax saved_view(const at::Tensor& argmax) {
  SavedArgmax sa;
  if (argmax.defined() && argmax.numel() > 0) {
    sa.data = argmax.data_ptr();
    sa.wide = argmax.scalar_type() == at::kInt;
  }
  return sa;
}

// The saved argmax handed to a backward (optional; empty means "recompute").
SavedArgmax saved_input(const c10::optional<at::Tensor>& argmax, const GroupPlan& plan, int64_t rows, int64_t cols) {
  if (!argmax.has_value() || argmax->numel() == 0) return SavedArgmax{};
  check_saved_argmax(*argmax, plan, rows, cols);
  return saved_view(*argmax);
}

std::tuple<at::Tensor, at::Tensor> maxsim_grouped_cpu(const at::Tensor& q, const at::Tensor& c,
                                                      at::IntArrayRef group_rq, at::IntArrayRef group_rc,
                                                      const c10::optional<at::Tensor>& q_mask,
                                                      const c10::optional<at::Tensor>& c_mask, bool save_argmax) {
  check_maxsim_args(q, c, q_mask, c_mask);
  Prepared P;
  P.plan = make_group_plan(group_rq, group_rc, q.size(1), c.size(1));
  const int64_t G = P.plan.size();
  // every element is written by the kernels (no zero-fill: the output can be large)
  at::Tensor out = at::empty({G, q.size(0), c.size(0)}, q.options().dtype(score_type(q)));
  at::Tensor argmax = saved_argmax_output(P.plan, q.size(0), c.size(0), save_argmax, q);
  if (q.size(0) == 0 || c.size(0) == 0) return {out, argmax};
  prepare(P, q, c, q_mask, c_mask, 1, /*lanes_ok=*/true);
  const Problem& p = P.p;
  const SavedArgmax save = saved_view(argmax);
  if (p.layout == kCandidateLanes) {  // item x = (candidate block x / num_qblocks, query block)
    const int64_t items = ceil_div_host(p.nc, P.isa->nr) * p.num_qblocks;
    const double item_flops = 2.0 * p.queries_per_block * p.groups.rq_eff * P.isa->nr * p.groups.rc_eff * p.d;
    at::parallel_for(0, items, grain_for(item_flops), [&](int64_t x0, int64_t x1) {
      Workspace ws(P);
      P.ks->maxsim_forward_lanes(p, x0, x1, ws.get(), out.data_ptr(), save);
    });
    return {out, argmax};
  }
  const int64_t items = p.num_qblocks * p.nc;  // item x = (query block x / nc, candidate x % nc)
  const double item_flops = 2.0 * p.queries_per_block * p.groups.rq_eff * p.groups.rc_eff * p.d;
  at::parallel_for(0, items, grain_for(item_flops), [&](int64_t x0, int64_t x1) {
    Workspace ws(P);
    for (int64_t x = x0; x < x1;) {
      const int64_t qb = x / p.nc, b0 = x % p.nc, b1 = std::min(p.nc, b0 + (x1 - x));
      P.ks->maxsim_forward(p, qb, b0, b1, ws.get(), out.data_ptr(), save);
      x += b1 - b0;
    }
  });
  return {out, argmax};
}

// An empty (0,) tensor of x's dtype: the placeholder for a gradient nobody asked for.
at::Tensor not_wanted(const at::Tensor& x) { return at::empty({0}, x.options()); }

std::tuple<at::Tensor, at::Tensor> maxsim_grouped_backward_cpu(const at::Tensor& grad, const at::Tensor& q,
                                                               const at::Tensor& c, at::IntArrayRef group_rq,
                                                               at::IntArrayRef group_rc,
                                                               const c10::optional<at::Tensor>& q_mask,
                                                               const c10::optional<at::Tensor>& c_mask,
                                                               std::array<bool, 2> output_mask,
                                                               const c10::optional<at::Tensor>& argmax) {
  check_maxsim_args(q, c, q_mask, c_mask);
  Prepared P;
  P.plan = make_group_plan(group_rq, group_rc, q.size(1), c.size(1));
  check_scores_grad(grad, q, c, P.plan.size());
  const SavedArgmax saved = saved_input(argmax, P.plan, q.size(0), c.size(0));
  const auto [want_dq, want_dc] = output_mask;
  const auto acc = q.options().dtype(score_type(q));
  const bool empty = q.size(0) == 0 || c.size(0) == 0;
  if (empty || !(want_dq || want_dc))
    return {want_dq ? at::zeros_like(q, at::MemoryFormat::Contiguous) : not_wanted(q),
            want_dc ? at::zeros_like(c, at::MemoryFormat::Contiguous) : not_wanted(c)};
  prepare(P, q, c, q_mask, c_mask);
  const Problem& p = P.p;
  const at::Tensor g = grad.to(acc.dtype()).contiguous();
  const int64_t chunks = num_candidate_chunks(p.nc);
  at::Tensor dq_partial = want_dq ? at::zeros({chunks, p.nq, p.rq, p.d}, acc) : at::Tensor();
  at::Tensor dc = want_dc ? at::zeros({p.nc, p.rc, p.d}, c.options()) : at::Tensor();  // input type
  at::parallel_for(0, chunks, 1, [&](int64_t i0, int64_t i1) {
    Workspace ws(P);
    for (int64_t i = i0; i < i1; ++i)
      P.ks->maxsim_backward(p, g.data_ptr(), chunk_begin(i, chunks, p.nc), chunk_begin(i + 1, chunks, p.nc),
                            ws.get(), want_dq ? dq_partial[i].data_ptr() : nullptr,
                            want_dc ? dc.data_ptr() : nullptr, saved);
  });
  at::Tensor dq = want_dq ? reduce_chunks(dq_partial) : at::Tensor();
  if (want_dq) poison_gradient(dq, census(c, c_mask, p.groups.rc_eff, 0), q_mask, p.groups.rq_eff);
  if (want_dc) poison_gradient(dc, census(q, q_mask, p.groups.rq_eff, 0), c_mask, p.groups.rc_eff);
  return {want_dq ? dq.to(q.scalar_type()) : not_wanted(q), want_dc ? dc : not_wanted(c)};
}

Tokens hard_negative_tokens(const at::Tensor& hn, const Mask& m) {
  return Tokens{hn.data_ptr(), hn.stride(0), hn.stride(1), hn.stride(2), m.ptr, hn.size(1) * hn.size(2),
                hn.size(2), 1};
}

// ---- per-query candidates: maxsim_paired_grouped ----------------------------------------
// The engine's hard-negative path (one query packed alone against its own candidates),
// parallel over queries: each query owns its output column, dq rows and dc rows.

std::tuple<at::Tensor, at::Tensor> maxsim_paired_grouped_cpu(const at::Tensor& q, const at::Tensor& c,
                                                             at::IntArrayRef group_rq, at::IntArrayRef group_rc,
                                                             const c10::optional<at::Tensor>& q_mask,
                                                             const c10::optional<at::Tensor>& c_mask,
                                                             bool save_argmax) {
  check_maxsim_args(q, c, q_mask, c_mask, /*paired=*/true);
  Prepared P;
  P.plan = make_group_plan(group_rq, group_rc, q.size(1), c.size(2));
  const int64_t G = P.plan.size(), B = q.size(0), N = c.size(1);
  at::Tensor out = at::zeros({G, B, N}, q.options().dtype(score_type(q)));
  at::Tensor argmax = saved_argmax_output(P.plan, B, N, save_argmax, q);
  if (B == 0 || N == 0) return {out, argmax};
  const SavedArgmax save = saved_view(argmax);
  const at::Tensor cc = last_dim_contiguous(c);
  const Mask cm = mask_of(c_mask);
  // queries and sizes (rc, d); candidates below
  prepare(P, q, cc.select(1, 0), q_mask, c10::nullopt, 1, false, /*pack=*/false);
  const Problem& p = P.p;
  const Tokens ct = hard_negative_tokens(cc, cm);
  const double item_flops = 2.0 * N * p.groups.rq_eff * p.groups.rc_eff * p.d;
  at::parallel_for(0, B, grain_for(item_flops), [&](int64_t a0, int64_t a1) {
    Workspace ws(P);
    P.ks->paired_forward(p, ct, N, a0, a1, ws.get(), out.data_ptr(), save);
  });
  return {out, argmax};
}

std::tuple<at::Tensor, at::Tensor> maxsim_paired_grouped_backward_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& c, at::IntArrayRef group_rq,
    at::IntArrayRef group_rc, const c10::optional<at::Tensor>& q_mask, const c10::optional<at::Tensor>& c_mask,
    std::array<bool, 2> output_mask, const c10::optional<at::Tensor>& argmax) {
  check_maxsim_args(q, c, q_mask, c_mask, /*paired=*/true);
  Prepared P;
  P.plan = make_group_plan(group_rq, group_rc, q.size(1), c.size(2));
  check_scores_grad(grad, q, c, P.plan.size(), /*paired=*/true);
  const SavedArgmax saved = saved_input(argmax, P.plan, q.size(0), c.size(1));
  const auto [want_dq, want_dc] = output_mask;
  const auto acc = q.options().dtype(score_type(q));
  const int64_t B = q.size(0), N = c.size(1);
  if (B == 0 || N == 0 || !(want_dq || want_dc))
    return {want_dq ? at::zeros_like(q, at::MemoryFormat::Contiguous) : not_wanted(q),
            want_dc ? at::zeros_like(c, at::MemoryFormat::Contiguous) : not_wanted(c)};
  const at::Tensor cc = last_dim_contiguous(c);
  const Mask cm = mask_of(c_mask);
  prepare(P, q, cc.select(1, 0), q_mask, c10::nullopt, 1, false, /*pack=*/false);
  const Problem& p = P.p;
  const Tokens ct = hard_negative_tokens(cc, cm);
  const at::Tensor g = grad.to(acc.dtype()).contiguous();
  at::Tensor dq = want_dq ? at::zeros({B, p.rq, p.d}, acc) : at::Tensor();
  at::Tensor dc = want_dc ? at::zeros({B, N, p.rc, p.d}, c.options()) : at::Tensor();  // input type
  const double item_flops = 2.0 * N * p.groups.rq_eff * p.groups.rc_eff * p.d;
  at::parallel_for(0, B, grain_for(item_flops), [&](int64_t a0, int64_t a1) {
    Workspace ws(P);
    P.ks->paired_backward(p, ct, N, g.data_ptr(), a0, a1, ws.get(), want_dq ? dq.data_ptr() : nullptr,
                          want_dc ? dc.data_ptr() : nullptr, saved);
  });
  if (want_dq) poison_gradient(dq, census(c, c_mask, p.groups.rc_eff, 1), q_mask, p.groups.rq_eff);
  if (want_dc) poison_gradient(dc, census(q, q_mask, p.groups.rq_eff, 1), c_mask, p.groups.rc_eff);
  return {want_dq ? dq.to(q.scalar_type()) : not_wanted(q), want_dc ? dc : not_wanted(c)};
}

// Rows of the fused query gradient: group g's r_q(g) rows start at goff[g].
std::vector<int64_t> query_gradient_offsets(const GroupPlan& plan, int64_t* rows) {
  std::vector<int64_t> goff;
  int64_t total = 0;
  for (int64_t r : plan.rq) {
    goff.push_back(total);
    total += r;
  }
  *rows = total;
  return goff;
}

// The loss forward fused with the query gradient (Engine::infonce_forward_query_gradient):
// one thread per query block streams every candidate, so no state is merged across threads.
std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_with_query_gradient(
    Prepared& P, const at::Tensor& q, const at::Tensor& c, const at::Tensor& lab, const Tokens& hnt, int64_t K,
    double scale, const c10::optional<at::Tensor>& q_mask, const c10::optional<at::Tensor>& c_mask) {
  prepare(P, q, c, q_mask, c_mask, /*min_blocks=*/at::get_num_threads());
  const Problem& p = P.p;
  const auto acc = q.options().dtype(score_type(q));
  const int64_t G = P.plan.size(), nq = q.size(0);
  int64_t rows = 0;
  const std::vector<int64_t> goff = query_gradient_offsets(P.plan, &rows);
  at::Tensor m = at::full({G, nq}, -INFINITY, acc), l = at::zeros({G, nq}, acc), pos = at::zeros({G, nq}, acc);
  at::Tensor jq = at::zeros({nq, rows, p.d}, acc);
  at::parallel_for(0, p.num_qblocks, 1, [&](int64_t b0, int64_t b1) {
    Workspace ws(P);
    for (int64_t qb = b0; qb < b1; ++qb)
      P.ks->infonce_forward_query_gradient(p, lab.data_ptr<int64_t>(), scale, hnt, K, qb, ws.get(), m.data_ptr(),
                                           l.data_ptr(), pos.data_ptr(), jq.data_ptr(), goff.data(), rows);
  });
  at::Tensor lse = m + at::log(l);
  return {lse - pos, lse, jq};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> matryoshka_infonce_cpu(
    const at::Tensor& q, const at::Tensor& c, const at::Tensor& hard_negatives, const at::Tensor& labels,
    at::IntArrayRef group_rq, at::IntArrayRef group_rc, double scale, const c10::optional<at::Tensor>& q_mask,
    const c10::optional<at::Tensor>& c_mask, const c10::optional<at::Tensor>& hn_mask, bool query_gradient) {
  Prepared P;
  P.plan = check_infonce_args(q, c, hard_negatives, labels, group_rq, group_rc, scale, q_mask, c_mask, hn_mask);
  const auto acc = q.options().dtype(score_type(q));
  const int64_t G = P.plan.size(), nq = q.size(0);
  if (nq == 0) {
    int64_t rows = 0;
    query_gradient_offsets(P.plan, &rows);
    return {at::zeros({G, 0}, acc), at::zeros({G, 0}, acc),
            query_gradient ? at::zeros({0, rows, q.size(2)}, acc) : at::empty({0}, acc)};
  }
  const at::Tensor lab = labels.contiguous();
  const at::Tensor hn = last_dim_contiguous(hard_negatives);
  const Mask hm = mask_of(hn_mask);
  const Tokens hnt = hard_negative_tokens(hn, hm);
  const int64_t K = hn.size(1);
  if (query_gradient) return infonce_with_query_gradient(P, q, c, lab, hnt, K, scale, q_mask, c_mask);
  prepare(P, q, c, q_mask, c_mask);
  const Problem& p = P.p;

  // In-batch candidates: per-chunk online log-sum-exp states, merged in chunk order.
  const int64_t chunks = num_candidate_chunks(p.nc);
  at::Tensor m = at::full({chunks, G, nq}, -INFINITY, acc);
  at::Tensor l = at::zeros({chunks, G, nq}, acc);
  at::Tensor pos = at::zeros({G, nq}, acc);
  at::parallel_for(0, chunks, 1, [&](int64_t i0, int64_t i1) {
    Workspace ws(P);
    for (int64_t i = i0; i < i1; ++i)
      P.ks->infonce_forward(p, lab.data_ptr<int64_t>(), scale, chunk_begin(i, chunks, p.nc),
                            chunk_begin(i + 1, chunks, p.nc), ws.get(), m[i].data_ptr(), l[i].data_ptr(),
                            pos.data_ptr());
  });
  at::Tensor m_all = m[0].clone(), l_all = l[0].clone();
  for (int64_t i = 1; i < chunks; ++i) {  // (m, l) (+) (m_i, l_i)
    const at::Tensor mx = at::maximum(m_all, m[i]);
    const at::Tensor safe = at::where(at::isinf(mx), at::zeros_like(mx), mx);
    l_all = l_all * at::exp(m_all - safe) + l[i] * at::exp(m[i] - safe);
    m_all = mx;
  }
  m_all = m_all.contiguous();
  l_all = l_all.contiguous();
  // Hard negatives: each query against its own K, folded into its merged state.
  if (K > 0) {
    const double item_flops = 2.0 * K * p.groups.rq_eff * p.groups.rc_eff * p.d;
    at::parallel_for(0, nq, grain_for(item_flops), [&](int64_t a0, int64_t a1) {
      Workspace ws(P);
      P.ks->infonce_forward_hard(p, hnt, K, scale, a0, a1, ws.get(), m_all.data_ptr(), l_all.data_ptr());
    });
  }
  at::Tensor lse = m_all + at::log(l_all);
  return {lse - pos, lse, at::empty({0}, acc)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> matryoshka_infonce_backward_cpu(
    const at::Tensor& grad, const at::Tensor& lse, const at::Tensor& q, const at::Tensor& c,
    const at::Tensor& hard_negatives, const at::Tensor& labels, at::IntArrayRef group_rq, at::IntArrayRef group_rc,
    double scale, const c10::optional<at::Tensor>& q_mask, const c10::optional<at::Tensor>& c_mask,
    const c10::optional<at::Tensor>& hn_mask, std::array<bool, 3> output_mask,
    const c10::optional<at::Tensor>& query_gradient) {
  Prepared P;
  P.plan = check_infonce_args(q, c, hard_negatives, labels, group_rq, group_rc, scale, q_mask, c_mask, hn_mask);
  const auto acc = q.options().dtype(score_type(q));
  const int64_t G = P.plan.size(), nq = q.size(0);
  check_infonce_grad(grad, lse, G, nq);
  // dq from the forward's fused query gradient when it is there; else from the tiles here.
  const bool fused_dq = query_gradient.has_value() && query_gradient->numel() > 0;
  if (fused_dq) check_query_gradient(*query_gradient, P.plan, q);
  const auto [want_dq, want_dc, want_dhn] = output_mask;
  const bool dq_pass = want_dq && !fused_dq;
  auto result = [&](at::Tensor dq, at::Tensor dc, at::Tensor dhn) {
    return std::make_tuple(want_dq ? dq.to(q.scalar_type()) : not_wanted(q),
                           want_dc ? dc : not_wanted(c), want_dhn ? dhn : not_wanted(hard_negatives));
  };
  const int64_t K = hard_negatives.size(1);
  at::Tensor dq = want_dq ? at::zeros({nq, q.size(1), q.size(2)}, acc) : at::Tensor();
  // Candidate-side gradients are written in the input type by the kernels (kernels.h).
  at::Tensor dc = want_dc ? at::zeros({c.size(0), c.size(1), c.size(2)}, c.options()) : at::Tensor();
  at::Tensor dhn = want_dhn ? at::zeros({nq, K, c.size(1), q.size(2)}, hard_negatives.options()) : at::Tensor();
  if (nq == 0 || !(want_dq || want_dc || want_dhn)) return result(dq, dc, dhn);
  const at::Tensor g = grad.to(acc.dtype()).contiguous(), ls = lse.to(acc.dtype()).contiguous();
  if (fused_dq && want_dq) {  // dq[a, i] = sum_{g: i < r_q(g)} grad[g, a] * jq[a, goff[g] + i]
    int64_t offset = 0;
    for (int64_t k = 0; k < G; ++k) {
      const int64_t r = P.plan.rq[k];
      dq.narrow(1, 0, r).add_(query_gradient->narrow(1, offset, r) * g[k].view({nq, 1, 1}));
      offset += r;
    }
  }
  const bool in_batch = (dq_pass || want_dc) && c.size(0) > 0;
  const bool own_negatives = K > 0 && (dq_pass || want_dhn);
  if (in_batch || own_negatives) {
    prepare(P, q, c, q_mask, c_mask);
    const Problem& p = P.p;
    const at::Tensor lab = labels.contiguous();
    if (in_batch) {  // in-batch candidates: dq (unless fused) and dc
      const int64_t chunks = num_candidate_chunks(p.nc);
      at::Tensor dq_partial = dq_pass ? at::zeros({chunks, nq, p.rq, p.d}, acc) : at::Tensor();
      at::parallel_for(0, chunks, 1, [&](int64_t i0, int64_t i1) {
        Workspace ws(P);
        for (int64_t i = i0; i < i1; ++i)
          P.ks->infonce_backward(p, lab.data_ptr<int64_t>(), scale, g.data_ptr(), ls.data_ptr(),
                                 chunk_begin(i, chunks, p.nc), chunk_begin(i + 1, chunks, p.nc), ws.get(),
                                 dq_pass ? dq_partial[i].data_ptr() : nullptr, want_dc ? dc.data_ptr() : nullptr);
      });
      if (dq_pass) dq = reduce_chunks(dq_partial);
    }
    if (own_negatives) {  // each query's own hard negatives: dq (unless fused) and dhn
      const at::Tensor hn = last_dim_contiguous(hard_negatives);
      const Mask hm = mask_of(hn_mask);
      const Tokens hnt = hard_negative_tokens(hn, hm);
      const double item_flops = 2.0 * K * p.groups.rq_eff * p.groups.rc_eff * p.d;
      at::parallel_for(0, nq, grain_for(item_flops), [&](int64_t a0, int64_t a1) {
        Workspace ws(P);
        P.ks->infonce_backward_hard(p, hnt, K, scale, g.data_ptr(), ls.data_ptr(), a0, a1, ws.get(),
                                    dq_pass ? dq.data_ptr() : nullptr, want_dhn ? dhn.data_ptr() : nullptr);
      });
    }
  }
  // The dense formulation's NaNs (common/nonfinite.h), once every contribution is in.
  const int64_t rq_eff = P.plan.rq_eff, rc_eff = P.plan.rc_eff;
  if (want_dq && c.size(0) > 0) poison_gradient(dq, census(c, c_mask, rc_eff, 0), q_mask, rq_eff);
  if (want_dq && K > 0) poison_gradient(dq, census(hard_negatives, hn_mask, rc_eff, 1), q_mask, rq_eff);
  if (want_dc) poison_gradient(dc, census(q, q_mask, rq_eff, 0), c_mask, rc_eff);
  if (want_dhn && K > 0) poison_gradient(dhn, census(q, q_mask, rq_eff, 1), hn_mask, rc_eff);
  return result(dq, dc, dhn);
}

}  // namespace
}  // namespace cpu
}  // namespace metaembed

TORCH_LIBRARY_IMPL(metaembed, CPU, m) {
  m.impl("maxsim_grouped", &metaembed::cpu::maxsim_grouped_cpu);
  m.impl("maxsim_grouped_backward", &metaembed::cpu::maxsim_grouped_backward_cpu);
  m.impl("matryoshka_infonce", &metaembed::cpu::matryoshka_infonce_cpu);
  m.impl("matryoshka_infonce_backward", &metaembed::cpu::matryoshka_infonce_backward_cpu);
  m.impl("maxsim_paired_grouped", &metaembed::cpu::maxsim_paired_grouped_cpu);
  m.impl("maxsim_paired_grouped_backward", &metaembed::cpu::maxsim_paired_grouped_backward_cpu);
}
