// CPU implementation of the index ops (csrc/index_schemas.h): argument checks, query
// packing (and int8 quantisation), threading and the final merge of the per-thread top-k
// heaps, around the kernels of index_engine.h.
//
// Threading and determinism: with many query tokens (>= kSplitTokens per thread) the queries
// are cut into one block per thread and each block scans every row (each query's heap then
// sees every candidate once, so it fills once: half the heap offers of a row split on two
// threads); otherwise the rows are cut into one contiguous chunk per thread and a chunk scans
// every query block. Each chunk keeps its own heaps. The chunks' heaps are merged by
// (score desc, id asc), a total order, and every candidate's score is computed by the same
// arithmetic whatever chunk, tile or segment it falls in, so the result is the same for any
// thread count. No atomics.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "../common/half.h"
#include "index_kernels.h"
#include "index_order.h"
#include "isa_select.h"

namespace metaembed {
namespace cpu {
namespace {

bool cpu_has_vnni() {
#if defined(__GNUC__) && defined(__x86_64__)
  return __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// The index kernels for the engine's active instruction set (METAEMBED_CPU_ISA applies), for
// query blocks of `block_tokens` query tokens.
const IndexKernelSet& index_kernels_for(int32_t cdtype, int64_t block_tokens) {
  const std::string isa = active_kernels()->name;
  const IndexIsaKernels* k = index_generic_kernels();
  if (isa == "avx2" && index_avx2_kernels()) k = index_avx2_kernels();
  if (isa == "avx512" || isa == "avx512_bf16" || isa == "amx") {
    const bool vnni = cpu_has_vnni() && index_avx512_kernels();
    if (cdtype == kIndexInt8) {
      k = vnni ? index_avx512_kernels() : (index_avx2_kernels() ? index_avx2_kernels() : k);
    } else if (cdtype == kBF16 && isa == "avx512_bf16" && index_avx512bf16_kernels()) {
      k = index_avx512bf16_kernels();
    } else if (cdtype == kBF16 && isa == "amx" && index_amx_kernels()) {
      k = index_amx_kernels();
    } else if (vnni) {
      k = index_avx512_kernels();
    } else if (index_avx2_kernels()) {
      k = index_avx2_kernels();
    }
  }
  if (cdtype == kBF16 && k->bf16_wide.nr > 0 && block_tokens >= k->bf16_wide.nr) return k->bf16_wide;
  if (cdtype == kIndexInt8 && k->int8_narrow.nr > 0 && block_tokens <= k->int8_narrow.nr) return k->int8_narrow;
  return cdtype == kIndexInt8 ? k->int8 : (cdtype == kBF16 ? k->bf16 : k->f32);
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Query tokens per thread from which threads split the queries instead of the rows: a block of
// 128 tokens keeps 4 AVX-512 (8 AVX2) query panels per candidate row, so the tile stays
// compute-bound, and the candidates, read once per thread, come from the shared cache.
constexpr int64_t kSplitTokens = 128;

bool splits_queries(int64_t query_tokens) {
  const int64_t threads = at::get_num_threads();
  return threads > 1 && query_tokens >= threads * kSplitTokens;
}

// Everything one call needs, kept alive for its duration.
struct Prepared {
  GroupPlan plan;
  bool split_queries = false;  // one query block per thread, each against every row
  at::Tensor q, q_mask, qpack, qy, qinfo;
  std::vector<at::Tensor> keep;  // contiguous copies of masks
  std::vector<IndexSegment> segs;
  std::vector<int64_t> tok_slab, tok_width, tok_off;
  const IndexKernelSet* ks = nullptr;
  IndexProblem ip{};
};

int32_t stored_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kF32;
    case at::kBFloat16:
      return kBF16;
    case at::kChar:
      return kIndexInt8;
    default:
      TORCH_CHECK_TYPE(false, "index data must be float32, bfloat16 or int8, got ", t.scalar_type());
  }
  return kF32;
}

// True when no element of the valid tokens i < rq_eff of q (Nq, >= rq_eff, D), D contiguous, is
// NaN or infinite: all exponent bits set (a bit test the compiler vectorises; NaN compares
// would not).
template <class Bits>
bool tokens_finite(const at::Tensor& q, const uint8_t* mask, int64_t mask_row, int64_t rq_eff, Bits exponent) {
  const int64_t nq = q.size(0), D = q.size(2), s0 = q.stride(0), s1 = q.stride(1);
  const Bits* x = reinterpret_cast<const Bits*>(q.data_ptr());
  std::atomic<bool> finite{true};
  at::parallel_for(0, nq * rq_eff, std::max<int64_t>(1, (int64_t(1) << 16) / D), [&](int64_t t0, int64_t t1) {
    Bits special = 0;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t a = t / rq_eff, i = t % rq_eff;
      if (mask && !mask[a * mask_row + i]) continue;
      const Bits* row = x + a * s0 + i * s1;
      for (int64_t d = 0; d < D; ++d) special |= Bits((row[d] & exponent) == exponent);
    }
    if (special) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

// One query element as float32 bits: exact from float32, float16 and bfloat16.
template <class Src>
inline uint32_t element_bits(const Src* p) {
  if constexpr (std::is_same_v<Src, uint32_t>) return *p;                    // float32
  else if constexpr (std::is_same_v<Src, uint16_t>) return uint32_t(*p) << 16;  // bfloat16
  else return f16_to_f32_bits(p->x);                                         // float16
}

// x (Nq, rq_eff, D) of any strides converted to `compute` (float32 or bfloat16, rounding to
// nearest even as torch's .to()), D contiguous; masked tokens are zeros and never read. Done
// here because a torch .to() costs more than the scan of a small index (about 7 us against a
// whole search of 20 us for 64 rows).
template <class Src>
at::Tensor convert_queries(const at::Tensor& x, const uint8_t* mask, int64_t mask_row, at::ScalarType compute) {
  const int64_t nq = x.size(0), rq = x.size(1), D = x.size(2);
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2);
  at::Tensor out = at::empty({nq, rq, D}, x.options().dtype(compute));
  const Src* src = reinterpret_cast<const Src*>(x.data_ptr());
  const bool to_bf16 = compute == at::kBFloat16;
  uint32_t* o32 = to_bf16 ? nullptr : reinterpret_cast<uint32_t*>(out.data_ptr());
  uint16_t* o16 = to_bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr()) : nullptr;
  at::parallel_for(0, nq * rq, std::max<int64_t>(1, (int64_t(1) << 14) / D), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t a = t / rq, i = t % rq;
      const bool valid = !mask || mask[a * mask_row + i];
      const Src* row = src + a * s0 + i * s1;
      if (to_bf16) {
        for (int64_t d = 0; d < D; ++d) o16[t * D + d] = valid ? f32_to_bf16_bits(element_bits(row + d * s2)) : 0;
      } else {
        for (int64_t d = 0; d < D; ++d) o32[t * D + d] = valid ? element_bits(row + d * s2) : 0;
      }
    }
  });
  return out;
}

// The queries as the kernels read them: the first rq_eff tokens (all any group reads) in the
// compute dtype, D contiguous. Each valid one must be finite: a NaN or infinite query vector
// cannot be ranked. Tokens past rq_eff and masked tokens are never checked.
at::Tensor read_queries(const at::Tensor& q, const uint8_t* mask, int64_t rq_eff, at::ScalarType compute) {
  at::Tensor x = q.narrow(1, 0, rq_eff);
  const bool exact_in_place = x.scalar_type() == compute && x.stride(2) == 1;
  if (!exact_in_place) {
    switch (x.scalar_type()) {
      case at::kFloat:
        x = convert_queries<uint32_t>(x, mask, q.size(1), compute);
        break;
      case at::kBFloat16:
        x = convert_queries<uint16_t>(x, mask, q.size(1), compute);
        break;
      case at::kHalf:
        x = convert_queries<c10::Half>(x, mask, q.size(1), compute);
        break;
      default:  // float64: torch's rounding, straight from double
        x = x.to(compute).contiguous();
    }
  }
  const bool finite = compute == at::kBFloat16 ? tokens_finite<uint16_t>(x, mask, q.size(1), rq_eff, 0x7f80)
                                               : tokens_finite<uint32_t>(x, mask, q.size(1), rq_eff, 0x7f800000u);
  TORCH_CHECK_VALUE(finite, "q holds NaN or infinite values in vectors the search reads (the budget's first r_q "
                    "valid ones): no ranking can be made from them");
  return x;
}

// Checks what memory safety depends on and lays out the segments; fills P.ip and packs the
// queries. Returns the number of slabs read per segment.
void prepare(Prepared& P, const at::Tensor& q, const c10::optional<at::Tensor>& q_mask, at::TensorList data,
             at::TensorList scales, at::TensorList masks, at::TensorList ids, at::TensorList allowed,
             at::IntArrayRef segment_rows, at::IntArrayRef bounds, at::IntArrayRef group_rq,
             at::IntArrayRef group_rc, bool one_query_blocks = false) {
  TORCH_CHECK_VALUE(q.dim() == 3, "q must have shape (Nq, Rq, D), got ", q.sizes());
  TORCH_CHECK_VALUE(q.device().is_cpu(), "the CPU index ops take CPU tensors, got q on ", q.device());
  const int64_t nq = q.size(0), rq = q.size(1), D = q.size(2);
  TORCH_CHECK_VALUE(D >= 1 && rq >= 1, "q must have Rq >= 1 and D >= 1, got ", q.sizes());
  const int64_t num_segs = int64_t(segment_rows.size());
  TORCH_CHECK_VALUE(bounds.size() >= 2 && bounds[0] == 0, "bounds must start at 0 and hold >= 2 values, got ",
                    bounds);
  for (size_t s = 1; s < bounds.size(); ++s)
    TORCH_CHECK_VALUE(bounds[s] > bounds[s - 1], "bounds must be strictly increasing, got ", bounds);
  TORCH_CHECK_VALUE(num_segs >= 1 && int64_t(data.size()) % num_segs == 0 && !data.empty(),
                    "data must hold the same number of slabs for each of the ", num_segs, " segments, got ",
                    data.size(), " tensors");
  const int64_t S = int64_t(data.size()) / num_segs;
  TORCH_CHECK_VALUE(S <= int64_t(bounds.size()) - 1 && S <= kIndexMaxSlabs, "data holds ", S,
                    " slabs per segment but bounds describe ", bounds.size() - 1);
  const int64_t rc_avail = bounds[S];
  P.plan = make_group_plan(group_rq, group_rc, rq, rc_avail);
  const int32_t cdtype = stored_dtype(data[0]);
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()), "q must be a floating-point tensor, got ", q.scalar_type());
  TORCH_CHECK_VALUE(cdtype != kIndexInt8 || D <= 65536, "int8 indexes support D <= 65536 (int32 dot products), "
                    "got D=", D);
  const bool masked = !masks.empty();
  TORCH_CHECK_VALUE(!masked || masks.size() == data.size(), "masks must be empty or match data, got ", masks.size(),
                    " and ", data.size());
  TORCH_CHECK_VALUE(cdtype == kIndexInt8 ? scales.size() == data.size() : scales.empty(),
                    "scales must match data for an int8 index and be empty otherwise, got ", scales.size());
  TORCH_CHECK_VALUE(int64_t(ids.size()) == num_segs, "ids must hold one tensor per segment, got ", ids.size());
  TORCH_CHECK_VALUE(allowed.empty() || int64_t(allowed.size()) == num_segs,
                    "allowed must be empty or hold one tensor per segment, got ", allowed.size());

  P.segs.resize(size_t(num_segs));
  int64_t row0 = 0;
  for (int64_t g = 0; g < num_segs; ++g) {
    const int64_t n = segment_rows[g];
    TORCH_CHECK_VALUE(n >= 0, "segment_rows must be >= 0, got ", segment_rows);
    IndexSegment& seg = P.segs[size_t(g)];
    std::memset(&seg, 0, sizeof(seg));
    seg.n = n;
    seg.row0 = row0;
    row0 += n;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t w = bounds[s + 1] - bounds[s];
      const at::Tensor& d = data[size_t(g * S + s)];
      TORCH_CHECK_VALUE(d.device().is_cpu() && stored_dtype(d) == cdtype && d.sizes() == at::IntArrayRef({n, w, D})
                        && d.is_contiguous(), "data[", g * S + s, "] must be a contiguous CPU tensor of shape (", n,
                        ", ", w, ", ", D, ") and the dtype of data[0], got ", d.sizes(), " ", d.scalar_type());
      seg.data[s] = d.data_ptr();
      if (cdtype == kIndexInt8) {
        const at::Tensor& x = scales[size_t(g * S + s)];
        TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && x.sizes() == at::IntArrayRef({n, w, 2})
                          && x.is_contiguous() && x.device().is_cpu(), "scales[", g * S + s,
                          "] must be contiguous float32 (", n, ", ", w, ", 2) (scale, norm) pairs, got ", x.sizes(),
                          " ", x.scalar_type());
        seg.scales[s] = x.data_ptr<float>();
      }
      if (masked) {
        const at::Tensor& m = masks[size_t(g * S + s)];
        TORCH_CHECK_VALUE(m.scalar_type() == at::kBool && m.sizes() == at::IntArrayRef({n, w}) && m.is_contiguous()
                          && m.device().is_cpu(), "masks[", g * S + s, "] must be contiguous bool (", n, ", ", w,
                          "), got ", m.sizes(), " ", m.scalar_type());
        seg.masks[s] = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
      }
    }
    const at::Tensor& id = ids[size_t(g)];
    TORCH_CHECK_VALUE(id.scalar_type() == at::kLong && id.dim() == 1 && id.size(0) == n && id.is_contiguous()
                      && id.device().is_cpu(), "ids[", g, "] must be contiguous int64 (", n, ",), got ", id.sizes());
    seg.ids = id.data_ptr<int64_t>();
    if (!allowed.empty()) {
      const at::Tensor& a = allowed[size_t(g)];
      TORCH_CHECK_VALUE(a.scalar_type() == at::kBool && a.dim() == 1 && a.size(0) == n && a.is_contiguous()
                        && a.device().is_cpu(), "allowed[", g, "] must be contiguous bool (", n, ",), got ",
                        a.sizes());
      seg.allowed = reinterpret_cast<const uint8_t*>(a.data_ptr<bool>());
    }
  }

  // Token table: token j of a row is vector tok_off[j] of slab tok_slab[j].
  const int64_t rc = P.plan.rc_eff;
  for (int64_t j = 0, s = 0; j < rc; ++j) {
    while (bounds[s + 1] <= j) ++s;
    P.tok_slab.push_back(s);
    P.tok_width.push_back(bounds[s + 1] - bounds[s]);
    P.tok_off.push_back(j - bounds[s]);
  }

  if (q_mask.has_value()) {
    check_mask(q_mask, "q_mask", {nq, rq}, q);
    P.q_mask = q_mask->contiguous();
  }
  const uint8_t* qm = P.q_mask.defined() ? reinterpret_cast<const uint8_t*>(P.q_mask.data_ptr<bool>()) : nullptr;
  P.q = read_queries(q, qm, P.plan.rq_eff, cdtype == kBF16 ? at::kBFloat16 : at::kFloat);
  // The kernels for the query blocks the scan will see (score_rows scores one query at a time).
  const int64_t query_tokens = nq * P.plan.rq_eff;
  P.split_queries = !one_query_blocks && splits_queries(query_tokens);
  P.ks = &index_kernels_for(cdtype, one_query_blocks  ? P.plan.rq_eff
                                    : P.split_queries ? cdiv(nq, at::get_num_threads()) * P.plan.rq_eff
                                                      : query_tokens);
  IndexProblem& ip = P.ip;
  Problem& p = ip.p;
  p.dtype = cdtype == kBF16 ? kBF16 : kF32;
  p.nq = nq;
  p.rq = rq;
  p.d = D;
  p.nc = row0;
  p.rc = rc_avail;
  p.q = Tokens{P.q.data_ptr(), P.q.stride(0), P.q.stride(1), 0, qm, rq, 1, 0};
  p.c = Tokens{nullptr, 0, 0, 0, nullptr, 0, 0, 0};
  const GroupPlan& g = P.plan;
  p.groups = Groups{g.size(), g.rq.data(), g.bound_index.data(), int64_t(g.bounds.size()), g.bounds.data(),
                    g.rq_eff, g.rc_eff};
  // Blocking as the engine's (ops_cpu.cpp): D in chunks of kc, query blocks of about 256 KiB
  // of packed queries per D chunk (multi-candidate tiles keep every budget's tile full).
  p.kc = cdtype == kIndexInt8 ? D : (D <= 768 ? D : 8 * cdiv(D, 8 * cdiv(D, 512)));
  const int64_t target_tokens = std::max<int64_t>(P.ks->nr, (int64_t(256) << 10) / (p.kc * P.ks->pack_elem_bytes));
  p.queries_per_block = std::max<int64_t>(1, std::min<int64_t>(std::max<int64_t>(nq, 1), target_tokens / g.rq_eff));
  if (P.split_queries) p.queries_per_block = std::min(p.queries_per_block, cdiv(nq, at::get_num_threads()));
  p.num_qblocks = cdiv(nq, p.queries_per_block);
  p.panels_per_block = cdiv(p.queries_per_block * g.rq_eff, P.ks->nr);

  ip.cdtype = cdtype;
  ip.tok_slab = P.tok_slab.data();
  ip.tok_width = P.tok_width.data();
  ip.tok_off = P.tok_off.data();
  ip.segs = P.segs.data();
  ip.num_segs = num_segs;
  ip.total_rows = row0;
  ip.masked = masked;

  if (cdtype == kIndexInt8 && nq > 0) {
    // Per token (a, i < rq_eff): y = round(q / sq), sq = max|q| / 127, and the bound term
    //   err = ||e||_2 (1 + 2^-10) + (4 D + 2 rq_eff + 32) 2^-24 (||q||_2 + ||e||_2)
    // (e = q - sq y; index_engine.h, "int8 filter"): the rounding allowance covers the float32
    // dequantisation, dot products and token sums of the exact scores, and the conversions and
    // products of the approximate ones (each within (D + 2 rq + 8) u of ||q|| N_max).
    const int64_t rqe = g.rq_eff;
    P.qy = at::empty({nq, rqe, D}, q.options().dtype(at::kChar));
    P.qinfo = at::empty({nq * rqe, 4}, q.options().dtype(at::kFloat));
    int8_t* y = P.qy.data_ptr<int8_t>();
    float* info = P.qinfo.data_ptr<float>();
    const float* qd = P.q.data_ptr<float>();
    const int32_t offset = P.ks->int8_offset;
    const int64_t qs0 = P.q.stride(0), qs1 = P.q.stride(1);
    at::parallel_for(0, nq * rqe, 64, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const float* src = qd + (t / rqe) * qs0 + (t % rqe) * qs1;
        float amax = 0;
        for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(src[d]));
        const float sq = amax / 127.f;
        double e2 = 0, q2 = 0;
        int64_t ysum = 0;
        for (int64_t d = 0; d < D; ++d) {
          float v = sq > 0 ? std::nearbyint(src[d] / sq) : 0.f;
          v = std::min(127.f, std::max(-127.f, v));
          y[t * D + d] = int8_t(v);
          ysum += int64_t(v);
          const double e = double(src[d]) - double(sq) * double(v);
          e2 += e * e;
          q2 += double(src[d]) * double(src[d]);
        }
        const double en = std::sqrt(e2), qn = std::sqrt(q2);
        const double err = en * (1 + 0x1p-10) + double(4 * D + 2 * rqe + 32) * 0x1p-24 * (qn + en);
        info[t * 4 + 0] = sq;
        info[t * 4 + 1] = float(err * (1 + 0x1p-12));
        const int32_t corr = int32_t(int64_t(offset) * ysum);
        std::memcpy(&info[t * 4 + 2], &corr, 4);
        info[t * 4 + 3] = 0;
      }
    });
    ip.qy = y;
    ip.qinfo = info;
  }
  P.qpack = at::empty({int64_t(P.ks->qpack_bytes(ip)) + 64}, q.options().dtype(at::kByte));
  p.qpack = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(P.qpack.data_ptr()) + 63) & ~uintptr_t(63));
  at::parallel_for(0, p.num_qblocks, 1, [&](int64_t b, int64_t e) {
    for (int64_t qb = b; qb < e; ++qb) P.ks->pack_queries(ip, qb);
  });
}

// `chunks` arrays of n elements each (initialised to `fill`), each starting on a cache line of
// its own, so that threads writing different chunks never share a line.
template <class V>
struct ChunkBuffer {
  ChunkBuffer(int64_t chunks, int64_t n, V fill = V())
      : stride(cdiv(std::max<int64_t>(n, 1) * int64_t(sizeof(V)), 64) * 64 / int64_t(sizeof(V))),
        buf(size_t(chunks * stride + 64 / int64_t(sizeof(V))), fill),
        base(reinterpret_cast<V*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63))) {}
  V* chunk(int64_t c) const { return base + c * stride; }
  int64_t stride;
  std::vector<V> buf;
  V* base;  // buf's first 64-byte aligned element
};

struct Workspace {
  explicit Workspace(const Prepared& P) : buf(new uint8_t[P.ks->workspace_bytes(P.ip)]) {}
  void* get() { return buf.get(); }
  std::unique_ptr<uint8_t[]> buf;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> index_search_cpu(
    const at::Tensor& q, const c10::optional<at::Tensor>& q_mask, at::TensorList data, at::TensorList scales,
    at::TensorList masks, at::TensorList ids, at::TensorList allowed, at::IntArrayRef segment_rows,
    at::IntArrayRef bounds, at::IntArrayRef group_rq, at::IntArrayRef group_rc, int64_t k) {
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
  Prepared P;
  prepare(P, q, q_mask, data, scales, masks, ids, allowed, segment_rows, bounds, group_rq, group_rc);
  const IndexProblem& ip = P.ip;
  const int64_t G = P.plan.size(), nq = q.size(0), X = G * nq;
  const auto f32 = q.options().dtype(at::kFloat), i64 = q.options().dtype(at::kLong);
  // Filled by the merge below: every slot past a query's results gets score -inf, id and row -1.
  at::Tensor out_s = at::empty({G, nq, k}, f32);
  at::Tensor out_id = at::empty({G, nq, k}, i64);
  at::Tensor out_row = at::empty({G, nq, k}, i64);
  const int64_t N = ip.total_rows;
  if (nq == 0 || N == 0) return {out_s.fill_(-INFINITY), out_id.fill_(-1), out_row.fill_(-1)};

  const int64_t kk = std::min(k, N);  // a heap never holds more than every row
  const double work = 2.0 * nq * P.plan.rq_eff * P.plan.rc_eff * q.size(2) * double(N);
  const int64_t nqb = ip.p.num_qblocks;
  const bool by_queries = P.split_queries && nqb > 1;
  const int64_t chunks =
      by_queries ? std::min<int64_t>(at::get_num_threads(), nqb)
                 : std::max<int64_t>(1, std::min<int64_t>({int64_t(at::get_num_threads()), N, int64_t(work / 2e6) + 1}));
  // Each chunk's top-k state (index_order.h) in plain buffers, not tensors (a search of a
  // small index is mostly fixed costs), every chunk's part on cache lines of its own: the
  // threads write their bars and heaps all through the scan.
  ChunkBuffer<float> hs(chunks, X * kk), hthr(chunks, X, -INFINITY);
  ChunkBuffer<int64_t> hid(chunks, X * kk), hrow(chunks, X * kk), hcount(chunks, X, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    Workspace ws(P);
    for (int64_t c = c0; c < c1; ++c) {
      TopK top{kk, hs.chunk(c), hid.chunk(c), hrow.chunk(c), hcount.chunk(c), hthr.chunk(c)};
      if (by_queries) {  // query blocks [qb0, qb1) against every row
        for (int64_t qb = c * nqb / chunks; qb < (c + 1) * nqb / chunks; ++qb) P.ks->search(ip, qb, 0, N, ws.get(), top);
      } else {  // rows [r0, r1) against every query block
        const int64_t r0 = c * N / chunks, r1 = (c + 1) * N / chunks;
        for (int64_t qb = 0; qb < nqb; ++qb) P.ks->search(ip, qb, r0, r1, ws.get(), top);
      }
    }
  });

  // Merge the chunks' heaps: per (g, a), every entry, sorted by (score desc, id asc).
  float* os = out_s.data_ptr<float>();
  int64_t* oid = out_id.data_ptr<int64_t>();
  int64_t* orow = out_row.data_ptr<int64_t>();
  at::parallel_for(0, X, 16, [&](int64_t x0, int64_t x1) {
    std::vector<std::pair<int64_t, int64_t>> where;  // (chunk, slot of entry x * kk + e)
    for (int64_t x = x0; x < x1; ++x) {
      where.clear();
      for (int64_t c = 0; c < chunks; ++c)
        for (int64_t e = 0; e < hcount.chunk(c)[x]; ++e) where.emplace_back(c, x * kk + e);
      const int64_t take = std::min<int64_t>(k, int64_t(where.size()));
      std::partial_sort(where.begin(), where.begin() + take, where.end(), [&](const auto& a, const auto& b) {
        return ranks_before(hs.chunk(a.first)[a.second], hid.chunk(a.first)[a.second], hs.chunk(b.first)[b.second],
                            hid.chunk(b.first)[b.second]);
      });
      for (int64_t e = 0; e < take; ++e) {
        const auto [c, slot] = where[e];
        os[x * k + e] = hs.chunk(c)[slot];
        oid[x * k + e] = hid.chunk(c)[slot];
        orow[x * k + e] = hrow.chunk(c)[slot];
      }
      std::fill(os + x * k + take, os + (x + 1) * k, -INFINITY);
      std::fill(oid + x * k + take, oid + (x + 1) * k, int64_t(-1));
      std::fill(orow + x * k + take, orow + (x + 1) * k, int64_t(-1));
    }
  });
  return {out_s, out_id, out_row};
}

at::Tensor index_score_rows_cpu(const at::Tensor& q, const c10::optional<at::Tensor>& q_mask, at::TensorList data,
                                at::TensorList scales, at::TensorList masks, at::IntArrayRef segment_rows,
                                at::IntArrayRef bounds, at::IntArrayRef group_rq, at::IntArrayRef group_rc,
                                const at::Tensor& rows) {
  TORCH_CHECK_VALUE(rows.scalar_type() == at::kLong && rows.dim() == 2 && rows.size(0) == q.size(0),
                    "rows must be int64 of shape (Nq, K), got ", rows.sizes(), " ", rows.scalar_type());
  // ids are not read by score_rows: placeholders of the right length keep prepare's checks.
  std::vector<at::Tensor> ids;
  for (int64_t n : segment_rows) ids.push_back(at::empty({std::max<int64_t>(n, 0)}, q.options().dtype(at::kLong)));
  Prepared P;
  prepare(P, q, q_mask, data, scales, masks, ids, {}, segment_rows, bounds, group_rq, group_rc,
          /*one_query_blocks=*/true);
  const int64_t G = P.plan.size(), nq = q.size(0), K = rows.size(1);
  at::Tensor out = at::full({G, nq, K}, -INFINITY, q.options().dtype(at::kFloat));
  if (nq == 0 || K == 0) return out;
  const at::Tensor r = rows.contiguous();
  // Work items: (query a, one of `pieces` slices of its K rows), so that a few queries (a
  // cascade serving one query at a time) still use every thread; each item writes only its own
  // slots of `out`. At least ~1 MFLOP per item.
  const double row_flops = 2.0 * P.plan.rq_eff * P.plan.rc_eff * q.size(2);
  const int64_t threads = at::get_num_threads();
  const int64_t rows_min = std::max<int64_t>(1, int64_t(1e6 / std::max(row_flops, 1.0)));
  const int64_t pieces = std::max<int64_t>(1, std::min<int64_t>(cdiv(threads, nq), K / rows_min));
  const int64_t items_min = std::max<int64_t>(1, cdiv(rows_min, cdiv(K, pieces)));
  at::parallel_for(0, nq * pieces, items_min, [&](int64_t i0, int64_t i1) {
    Workspace ws(P);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t a = i / pieces, piece = i % pieces;
      P.ks->score_rows(P.ip, r.data_ptr<int64_t>(), K, a, a + 1, piece * K / pieces, (piece + 1) * K / pieces,
                       ws.get(), out.data_ptr<float>());
    }
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace metaembed

TORCH_LIBRARY_IMPL(metaembed, CPU, m) {
  m.impl("index_search", &metaembed::cpu::index_search_cpu);
  m.impl("index_score_rows", &metaembed::cpu::index_score_rows_cpu);
}
