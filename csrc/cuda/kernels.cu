// CUDA kernels of the metaembed ops. No torch headers here (they would dominate nvcc time);
// ops_cuda.cpp does the checks, allocation and orchestration. With METAEMBED_CUDA_EMULATE
// this file compiles as plain C++ against emulate.h and runs on the CPU (tests only).
//
// Maths, for query a, item (candidate) x and group g = (r_q, r_c):
//   S[t][j]  = <q[a, i], item_x[j]>                       (row t = a*rq_eff + i)
//   s_g(a,x) = sum_{i < r_q, q valid} max_{j < r_c, item valid} S[t][j]   (0 if no valid j)
//
// score_kernel: a CTA owns a block of whole queries (<= 128 query-token rows; a query
// with more tokens spans several row tiles) and a range of items. Per tile it computes
// S for 128 rows x 64 item tokens (several items when rc_eff < 64; items with
// rc_eff > 64 are split into 64-token chunks with the running max carried across chunks)
// over D in 32-wide (16-bit) or 16-wide (fp32) slices, double-buffered through registers:
//   bf16/fp16: tensor cores via WMMA 16x16x16 (mma.sync), fp32 accumulation;
//   fp32:      FFMA on CUDA cores, 8x8 outputs per thread. TF32 tensor cores would round
//              the inputs to 10-bit mantissas and lose fp32 parity, so they are not used.
// The fp32 tile goes to shared memory transposed (S^T[col][row], conflict-free for the
// scan), then each thread scans one row of one item in token order: running max and
// argmax, snapshotted at every distinct r_c bound in place (slot s <= the column being
// read). The fold follows torch.amax / torch.argmax over the valid tokens (validity comes
// from the masks only; -inf is an ordinary value):
//   take token j  iff  it is the first valid one, or S > m, or (S is NaN and m is not)
// so ties go to the lowest index and a NaN is the (sticky) maximum at its lowest index.
// A snapshot holds what the row contributes: the max, or 0 for a masked row or a prefix
// without a valid token. Per group, the snapshots of the query's rows i < r_q are summed
// (prefix sums over rows) and either written as scores or folded into an online
// log-sum-exp that matches torch.logsumexp on infinities. Masked tokens are multiplied in
// the tile product like any other (a NaN there only spoils its own row or column of S),
// but never taken, so they change nothing. Nothing of size Nq*Nc*Rq*Rc exists anywhere.
//
// Per-query items (hard negatives, maxsim_paired_grouped): a CTA owns one query and a
// range of that query's own items; everything else is the same code.
//
// Backward: score_kernel records, per (item, row, bound), the argmax token; the host turns
// dL/ds into per-entry weights (weights_kernel), and two gather kernels apply them:
//   grad_q_kernel: dq[a, i] += w * item_x[j*]   (a warp owns 8 rows x 128 dims, registers)
//   grad_c_kernel: dc_x[j*] += w * q[a, i]      (a CTA owns one item's 64 tokens x 128 dims)
// Both accumulate in fp32 and in a fixed order: no atomics anywhere, results are bitwise
// reproducible. The gradients are sparse (at most one token per row, item and bound), so
// gathering costs nb/rc of a dense P*C product and stays in fp32 on CUDA cores, matching
// the fp32-accumulation bound of the other backends.
#include "kernels.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef METAEMBED_CUDA_EMULATE
#include "../common/half.h"
#include "emulate.h"
#define DEV inline
#define SHARED_ARRAY(type, name, count) type* name = ::emu::shared_array<type>(__LINE__, (count))
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#define DEV __device__ __forceinline__
#define SHARED_ARRAY(type, name, count) __shared__ __align__(128) type name[(count)]
#endif

namespace metaembed {
namespace cuda {
namespace {

constexpr int NT = 128;       // threads per CTA (4 warps)
constexpr int BM = 128;       // rows (query tokens) per tile; == NT: thread t scans row t
constexpr int BN = 64;        // item tokens per tile
constexpr int LDS = BM + 4;   // S^T row pitch (floats); multiple of 4 for WMMA stores
constexpr int BKH = 32;       // D slice per stage, 16-bit inputs
constexpr int BKP = BKH + 8;  // staged row pitch (elements): 80 bytes, spreads banks
constexpr int BKF = 16;       // D slice per stage, fp32 inputs
constexpr int kStageBytesH = (BM + BN) * BKP * 2;                // 15360
constexpr int kStageBytesF = BKF * ((BM + 4) + (BN + 4)) * 4;    // 12800
constexpr int kSTBytes = BN * LDS * 4;                           // 33792
constexpr int kUnionBytes = kSTBytes > 2 * kStageBytesH ? kSTBytes : 2 * kStageBytesH;
static_assert(2 * kStageBytesF <= kUnionBytes, "fp32 stages must fit the union");
static_assert(kUnionBytes + kMaxGroups * BN * 4 + BM + BN + 3 * kMaxGroups * 4 <= 48 * 1024,
              "score_kernel static shared memory must stay under 48 KiB");
static_assert(BM == NT, "the scan maps thread t to row t");
static_assert((BM + BN) * 4 == 6 * NT, "the loader gives each thread six 16-byte chunks");
constexpr int kGradStage = 1024;  // (argmax, weight) entries staged per round in grad_c
constexpr int64_t kMaxGrid = int64_t(1) << 24;

DEV int imin(int a, int b) { return a < b ? a : b; }
DEV int imax(int a, int b) { return a > b ? a : b; }
DEV int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- element types (storage only; arithmetic is fp32) ----------------------------------
struct bf16s {
  uint16_t x;
};
struct f16s {
  uint16_t x;
};

DEV float to_float(float v) { return v; }
DEV float to_float(bf16s v) { return __uint_as_float(uint32_t(v.x) << 16); }
DEV float to_float(f16s v) {
#ifdef METAEMBED_CUDA_EMULATE
  return __uint_as_float(f16_to_f32_bits(v.x));
#else
  return __half2float(__ushort_as_half(v.x));
#endif
}

template <class T>
struct Tr;
template <>
struct Tr<float> {
  static constexpr int VE = 4, BK = BKF;
  static constexpr bool kTC = false;
};
template <>
struct Tr<bf16s> {
  static constexpr int VE = 8, BK = BKH;
  static constexpr bool kTC = true;
};
template <>
struct Tr<f16s> {
  static constexpr int VE = 8, BK = BKH;
  static constexpr bool kTC = true;
};

// ---- checked global memory access (the checks exist only in the emulator) --------------
template <class T>
DEV T gld(const T* p) {
#ifdef METAEMBED_CUDA_EMULATE
  if (!::emu::check_global(p, sizeof(T), "load")) return T{};
#endif
  return *p;
}
template <class T>
DEV void gst(T* p, T v) {
#ifdef METAEMBED_CUDA_EMULATE
  if (!::emu::check_global(p, sizeof(T), "store")) return;
#endif
  *p = v;
}

// Four consecutive elements d..d+3 of a row as floats (zeros past D). vec4: D % 4 == 0 and
// the row is 4-element aligned, so one 8- or 16-byte load does it.
template <class T>
DEV float4 load4(const T* row, int64_t d, int64_t D, bool vec4) {
  if (vec4 && d < D) {
    if constexpr (sizeof(T) == 4) {
      return gld(reinterpret_cast<const float4*>(row + d));
    } else {
      const uint2 v = gld(reinterpret_cast<const uint2*>(row + d));
      return float4{to_float(T{uint16_t(v.x & 0xffffu)}), to_float(T{uint16_t(v.x >> 16)}),
                    to_float(T{uint16_t(v.y & 0xffffu)}), to_float(T{uint16_t(v.y >> 16)})};
    }
  }
  return float4{d < D ? to_float(gld(row + d)) : 0.f, d + 1 < D ? to_float(gld(row + d + 1)) : 0.f,
                d + 2 < D ? to_float(gld(row + d + 2)) : 0.f, d + 3 < D ? to_float(gld(row + d + 3)) : 0.f};
}

// ---- tile loader: each thread moves six 16-byte chunks per D slice ----------------------
// Chunk c = tid + s*NT: c < 4*BM is A row c/4 (query token), else B column (c-4*BM)/4 (item
// token); the chunk covers D-slice elements [4*(c%4) .. +4) * VE/4 of that row.
template <class T>
struct Loader {
  const T* ptr[6];  // row start, nullptr for padding rows / columns
  uint4 v[6];

  DEV void fetch(int64_t k0, int64_t D, bool vec) {
    constexpr int VE = Tr<T>::VE;
    for (int s = 0; s < 6; ++s) {
      const int kc = (threadIdx.x + s * NT) & 3;
      const int64_t kb = k0 + kc * VE;
      uint4 r = {0u, 0u, 0u, 0u};
      if (ptr[s] != nullptr && kb < D) {
        if (vec) {  // D % VE == 0 and 16-byte aligned rows: the chunk is whole
          r = gld(reinterpret_cast<const uint4*>(ptr[s] + kb));
        } else {
          T tmp[VE];
          for (int e = 0; e < VE; ++e) tmp[e] = kb + e < D ? gld(ptr[s] + kb + e) : T{};
          memcpy(&r, tmp, sizeof(r));
        }
      }
      v[s] = r;
    }
  }

  // Into one stage: 16-bit inputs row-major [row][BKP]; fp32 transposed [k][row] so that
  // the FFMA tile reads 8 consecutive rows with two 16-byte loads.
  DEV void store(unsigned char* stage) const {
    for (int s = 0; s < 6; ++s) {
      const int c = threadIdx.x + s * NT, kc = c & 3;
      const bool is_a = c < 4 * BM;
      const int rc = is_a ? c >> 2 : (c - 4 * BM) >> 2;
      if constexpr (Tr<T>::kTC) {
        uint16_t* base = reinterpret_cast<uint16_t*>(stage) + (is_a ? 0 : BM * BKP);
        *reinterpret_cast<uint4*>(base + rc * BKP + kc * 8) = v[s];
      } else {
        float* base = reinterpret_cast<float*>(stage) + (is_a ? 0 : BKF * (BM + 4));
        const int ld = is_a ? BM + 4 : BN + 4;
        float f[4];
        memcpy(f, &v[s], sizeof(f));
        for (int e = 0; e < 4; ++e) base[(kc * 4 + e) * ld + rc] = f[e];
      }
    }
  }
};

// ---- tile products ------------------------------------------------------------------------
// Tensor cores: warp w computes rows [32w, 32w+32) x all 64 columns as 2x4 16x16 fragments.
#ifndef METAEMBED_CUDA_EMULATE
template <class T>
struct WmmaType;
template <>
struct WmmaType<bf16s> {
  using type = __nv_bfloat16;
};
template <>
struct WmmaType<f16s> {
  using type = __half;
};
#endif

template <class T, bool kTC = Tr<T>::kTC>
struct TileMMA;

template <class T>
struct TileMMA<T, true> {
#ifdef METAEMBED_CUDA_EMULATE
  ::emu::FragC acc[2][4];
  DEV void zero() {
    for (auto& row : acc)
      for (auto& f : row)
        for (float& x : f.v) x = 0.f;
  }
  static DEV void load_a(::emu::FragAB& f, const uint16_t* p) {  // row-major A[m][k]
    ::emu::check_wmma(p, BKP, 2);
    for (int m = 0; m < 16; ++m)
      for (int k = 0; k < 16; ++k) f.v[m][k] = to_float(T{p[m * BKP + k]});
  }
  static DEV void load_b(::emu::FragAB& f, const uint16_t* p) {  // col-major B: (k, n) at n*ld + k
    ::emu::check_wmma(p, BKP, 2);
    for (int k = 0; k < 16; ++k)
      for (int n = 0; n < 16; ++n) f.v[k][n] = to_float(T{p[n * BKP + k]});
  }
  DEV void compute(const unsigned char* stage) {
    const uint16_t* As = reinterpret_cast<const uint16_t*>(stage);
    const uint16_t* Bs = As + BM * BKP;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int kk = 0; kk < BKH; kk += 16) {
      ::emu::FragAB a[2], b[4];
      for (int mi = 0; mi < 2; ++mi) load_a(a[mi], As + (warp * 32 + mi * 16) * BKP + kk);
      for (int ni = 0; ni < 4; ++ni) load_b(b[ni], Bs + (ni * 16) * BKP + kk);
      for (int mi = 0; mi < 2; ++mi)
        for (int ni = 0; ni < 4; ++ni)
          for (int q = 0; q < 8; ++q) {
            const int e = lane * 8 + q, m = e / 16, n = e % 16;
            float s = acc[mi][ni].v[q];
            for (int k = 0; k < 16; ++k) s = fmaf(a[mi].v[m][k], b[ni].v[k][n], s);
            acc[mi][ni].v[q] = s;
          }
    }
  }
  DEV void store(float* st) const {  // S^T[col][row]: col-major store of the (row, col) tile
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int mi = 0; mi < 2; ++mi)
      for (int ni = 0; ni < 4; ++ni) {
        float* p = st + (ni * 16) * LDS + warp * 32 + mi * 16;
        ::emu::check_wmma(p, LDS, 4);
        for (int q = 0; q < 8; ++q) {
          const int e = lane * 8 + q, m = e / 16, n = e % 16;
          p[n * LDS + m] = acc[mi][ni].v[q];
        }
      }
  }
#else
  using W = typename WmmaType<T>::type;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][4];
  DEV void zero() {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) nvcuda::wmma::fill_fragment(acc[mi][ni], 0.f);
  }
  DEV void compute(const unsigned char* stage) {
    using namespace nvcuda;
    const W* As = reinterpret_cast<const W*>(stage);
    const W* Bs = As + BM * BKP;
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int kk = 0; kk < BKH; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, W, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, W, wmma::col_major> b[4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) wmma::load_matrix_sync(a[mi], As + (warp * 32 + mi * 16) * BKP + kk, BKP);
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) wmma::load_matrix_sync(b[ni], Bs + (ni * 16) * BKP + kk, BKP);
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) wmma::mma_sync(acc[mi][ni], a[mi], b[ni], acc[mi][ni]);
    }
  }
  DEV void store(float* st) const {
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
        nvcuda::wmma::store_matrix_sync(st + (ni * 16) * LDS + warp * 32 + mi * 16, acc[mi][ni], LDS,
                                        nvcuda::wmma::mem_col_major);
  }
#endif
};

// FFMA: thread (tx = tid/16, ty = tid%16) owns rows 8ty..8ty+7 x columns 8tx..8tx+7.
template <class T>
struct TileMMA<T, false> {
  float acc[8][8];
  DEV void zero() {
#pragma unroll
    for (int m = 0; m < 8; ++m)
#pragma unroll
      for (int n = 0; n < 8; ++n) acc[m][n] = 0.f;
  }
  DEV void compute(const unsigned char* stage) {
    const float* As = reinterpret_cast<const float*>(stage);
    const float* Bs = As + BKF * (BM + 4);
    const int ty = threadIdx.x % 16, tx = threadIdx.x / 16;
#pragma unroll 4
    for (int k = 0; k < BKF; ++k) {
      const float4 a0 = *reinterpret_cast<const float4*>(As + k * (BM + 4) + ty * 8);
      const float4 a1 = *reinterpret_cast<const float4*>(As + k * (BM + 4) + ty * 8 + 4);
      const float4 b0 = *reinterpret_cast<const float4*>(Bs + k * (BN + 4) + tx * 8);
      const float4 b1 = *reinterpret_cast<const float4*>(Bs + k * (BN + 4) + tx * 8 + 4);
      const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int m = 0; m < 8; ++m)
#pragma unroll
        for (int n = 0; n < 8; ++n) acc[m][n] = fmaf(a[m], b[n], acc[m][n]);
    }
  }
  DEV void store(float* st) const {
    const int ty = threadIdx.x % 16, tx = threadIdx.x / 16;
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      float* p = st + (tx * 8 + n) * LDS + ty * 8;
      *reinterpret_cast<float4*>(p) = float4{acc[0][n], acc[1][n], acc[2][n], acc[3][n]};
      *reinterpret_cast<float4*>(p + 4) = float4{acc[4][n], acc[5][n], acc[6][n], acc[7][n]};
    }
  }
};

// Sum of the snapshots in column `col` over the rows i in [0, rq_g) of one query whose
// token 0 sits at tile row `base` (possibly outside the tile: only rows in [0, BM) count).
// Masked rows and prefixes without a valid token hold 0; NaN and infinities add as usual.
DEV float tile_prefix_sum(const float* st, int col, int base, int rq_g) {
  const int i_lo = imax(0, -base), i_hi = imin(rq_g, BM - base);
  float s = 0.f;
  for (int i = i_lo; i < i_hi; ++i) s += st[col * LDS + base + i];
  return s;
}

// The running-max fold of the scan (see the file comment): whether valid token value v
// replaces the running max m; `none` = no valid token seen yet.
DEV bool takes_max(float v, float m, bool none) { return none || v > m || (v != v && m == m); }

// Online log-sum-exp: (m, l) <- (max(m, x), l e^{m - max} + e^{x - max}), lse = m + log(l).
// x == m adds exactly 1, so equal infinities behave as in torch.logsumexp (all -inf -> -inf,
// any +inf -> +inf) instead of giving exp(inf - inf) = NaN; a NaN x makes l NaN for good.
DEV void lse_update(float& m, float& l, float x) {
  if (x > m) {
    l = l * expf(m - x) + 1.f;
    m = x;
  } else {
    l += x == m ? 1.f : expf(x - m);
  }
}

// Number of bounds <= limit (bounds are strictly increasing).
DEV int bounds_upto(const int32_t* bounds, int nb, int limit) {
  int k = 0;
  while (k < nb && bounds[k] <= limit) ++k;
  return k;
}

// ================================ score_kernel ==========================================
template <class T>
__global__ void __launch_bounds__(NT) score_kernel(const ScoreArgs p) {
  SHARED_ARRAY(unsigned char, sm_u, kUnionBytes);  // 2 load stages, or S^T after the product
  SHARED_ARRAY(float, sm_psc, kMaxGroups * BN);    // partial scores of queries spanning tiles
  SHARED_ARRAY(uint8_t, sm_rowok, BM);
  SHARED_ARRAY(uint8_t, sm_colok, BN);
  SHARED_ARRAY(int32_t, sm_grp, 3 * kMaxGroups);
  const int tid = threadIdx.x;
  if (tid < kMaxGroups) {
    sm_grp[tid] = p.groups.rq[tid];
    sm_grp[kMaxGroups + tid] = p.groups.bidx[tid];
    sm_grp[2 * kMaxGroups + tid] = p.groups.bounds[tid];
  }
  __syncthreads();
  const int32_t* g_rq = sm_grp;
  const int32_t* g_bidx = sm_grp + kMaxGroups;
  const int32_t* g_bounds = sm_grp + 2 * kMaxGroups;
  const int G = p.groups.G, nb = p.groups.nb, rq = p.groups.rq_eff, rc = p.groups.rc_eff;
  const T* qd = static_cast<const T*>(p.q.data);
  const T* cd = static_cast<const T*>(p.c.data);
  float* st = reinterpret_cast<float*>(sm_u);
  constexpr int BK = Tr<T>::BK;
  constexpr int kStage = Tr<T>::kTC ? kStageBytesH : kStageBytesF;
  const int nk = int((p.D + BK - 1) / BK);

  const int64_t items = p.num_qblocks * p.num_splits;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t qblk = item % p.num_qblocks, split = item / p.num_qblocks;
    const int64_t a0 = qblk * p.qb;
    const int qn = int(min64(p.qb, p.nq - a0));
    const int tblk = qn * rq;  // rows of this query block (host: <= max(BM, rq_eff) < 2^30)
    const int nrt = (tblk + BM - 1) / BM;
    const int64_t ct_lo = split * p.tiles_per_split;
    const int64_t ct_hi = min64(p.num_ctiles, ct_lo + p.tiles_per_split);
    const T* cbase = cd + (p.per_query ? a0 * p.c.s_q : 0);
    const uint8_t* cmask = p.c.mask ? p.c.mask + (p.per_query ? a0 * p.c.m_q : 0) : nullptr;
    const int64_t x_base = p.per_query ? a0 * p.ncand : 0;  // argmax item of b0 + bl
    const int64_t trel_base = p.per_query ? 0 : a0 * rq;    // argmax row of tile row 0

    for (int64_t ct = ct_lo; ct < ct_hi; ++ct) {
      const int64_t b0 = ct * p.cb;
      const int cn = int(min64(p.cb, p.ncand - b0));
      for (int rt = 0; rt < nrt; ++rt) {
        const int r0 = rt * BM;
        // Running state carried across item-token chunks (only when nchunks > 1, where
        // cb == 1: thread t scans exactly one (row, item) pair per chunk).
        float carry_m = -INFINITY;
        int carry_arg = -1, carry_kb = 0;
        for (int jc = 0; jc < p.nchunks; ++jc) {
          const int jbase = jc * p.rct;
          const int ncol = imin(p.rct, rc - jbase);

          // 1. Tile metadata: which rows / columns are real and unmasked.
          {
            const int t = r0 + tid;
            bool ok = t < tblk;
            if (ok && p.q.mask) ok = gld(p.q.mask + (a0 + t / rq) * p.q.m0 + int64_t(t % rq) * p.q.m1) != 0;
            sm_rowok[tid] = ok;
            if (tid < BN) {
              const int bl = tid / p.rct, jl = tid % p.rct;
              bool cok = bl < cn && jl < ncol;
              if (cok && cmask) cok = gld(cmask + (b0 + bl) * p.c.m0 + int64_t(jbase + jl) * p.c.m1) != 0;
              sm_colok[tid] = cok;
            }
          }

          // 2. S = Q_tile . C_tile^T over D, two stages through registers.
          {
            Loader<T> L;
            for (int s = 0; s < 6; ++s) {
              const int c = tid + s * NT;
              if (c < 4 * BM) {
                const int t = r0 + (c >> 2);
                L.ptr[s] = t < tblk ? qd + (a0 + t / rq) * p.q.s0 + int64_t(t % rq) * p.q.s1 : nullptr;
              } else {
                const int n = (c - 4 * BM) >> 2, bl = n / p.rct, jl = n % p.rct;
                L.ptr[s] = (bl < cn && jl < ncol) ? cbase + (b0 + bl) * p.c.s0 + int64_t(jbase + jl) * p.c.s1 : nullptr;
              }
            }
            TileMMA<T> mma;
            mma.zero();
            L.fetch(0, p.D, p.vec);
            L.store(sm_u);
            __syncthreads();
            for (int kt = 0; kt < nk; ++kt) {
              const bool more = kt + 1 < nk;
              if (more) L.fetch(int64_t(kt + 1) * BK, p.D, p.vec);  // in flight during the MMAs
              mma.compute(sm_u + (kt & 1) * kStage);
              if (more) L.store(sm_u + ((kt + 1) & 1) * kStage);
              __syncthreads();
            }
            mma.store(st);  // the stages are dead: S^T overwrites them
            __syncthreads();
          }

          // 3. Scan: thread t, row r0 + t, each item of the tile in token order.
          const int kb_lo = bounds_upto(g_bounds, nb, jbase);  // bounds crossed before this chunk
          if (r0 + tid < tblk) {
            const bool rok = sm_rowok[tid];
            for (int bl = 0; bl < cn; ++bl) {
              float m = jc ? carry_m : -INFINITY;
              int arg = jc ? carry_arg : -1, kb = jc ? carry_kb : 0;
              int next = kb < nb ? g_bounds[kb] : INT_MAX;
              const int col0 = bl * p.rct;
              for (int jl = 0; jl < ncol; ++jl) {
                const float v = st[(col0 + jl) * LDS + tid];
                if (rok && sm_colok[col0 + jl] && takes_max(v, m, arg < 0)) {
                  m = v;
                  arg = jbase + jl;
                }
                if (jbase + jl + 1 == next) {  // prefix j < bounds[kb] complete
                  // In place: slot kb - kb_lo <= jl, a column this thread has already read.
                  // arg < 0: masked row or no valid token yet -> contributes 0.
                  st[(col0 + kb - kb_lo) * LDS + tid] = arg >= 0 ? m : 0.f;
                  if (p.argmax)
                    gst(p.argmax + ((x_base + b0 + bl) * p.tb + trel_base + r0 + tid) * nb + kb, arg);
                  ++kb;
                  next = kb < nb ? g_bounds[kb] : INT_MAX;
                }
              }
              carry_m = m;
              carry_arg = arg;
              carry_kb = kb;
            }
          }
          __syncthreads();

          // 4. Reduce: s_g = sum over the query's rows i < r_q of the snapshot of g's bound.
          if (p.scores || p.lse) {
            const int kb_hi = bounds_upto(g_bounds, nb, jbase + ncol);
            const int al_lo = r0 / rq, al_hi = imin(qn, (r0 + BM + rq - 1) / rq);
            const int nqa = al_hi - al_lo;
            const bool first = rt == 0, last = rt == nrt - 1;  // nrt > 1 only when qn == 1
            if (!p.lse) {
              const int n_items = G * nqa * cn;
              for (int it = tid; it < n_items; it += NT) {
                const int bl = it % cn, rest = it / cn, al = al_lo + rest % nqa, g = rest / nqa;
                const int k = g_bidx[g];
                if (k < kb_lo || k >= kb_hi) continue;
                float s = tile_prefix_sum(st, bl * p.rct + k - kb_lo, al * rq - r0, g_rq[g]);
                if (nrt > 1) {
                  if (!first) s += sm_psc[g * BN + bl];
                  if (!last) {
                    sm_psc[g * BN + bl] = s;
                    continue;
                  }
                }
                gst(p.scores + g * p.sc_gstride + (a0 + al) * p.sc_ld + b0 + bl, s);
              }
            } else {
              // One thread per (group, query): items in order, so the log-sum-exp state
              // sees the same sequence on every run.
              const int n_items = G * nqa;
              for (int it = tid; it < n_items; it += NT) {
                const int al = al_lo + it % nqa, g = it / nqa;
                const int k = g_bidx[g];
                if (k < kb_lo || k >= kb_hi) continue;
                const int64_t a = a0 + al;
                const int64_t si = split * p.state_split_stride + g * p.nq + a;
                float m = 0.f, l = 0.f;
                int64_t label = -1;
                if (last) {
                  m = gld(p.m + si);
                  l = gld(p.l + si);
                  if (p.labels) label = gld(p.labels + a);
                }
                for (int bl = 0; bl < cn; ++bl) {
                  float s = tile_prefix_sum(st, bl * p.rct + k - kb_lo, al * rq - r0, g_rq[g]);
                  if (nrt > 1) {
                    if (!first) s += sm_psc[g * BN + bl];
                    if (!last) {
                      sm_psc[g * BN + bl] = s;
                      continue;
                    }
                  }
                  const float x = p.scale * s;
                  lse_update(m, l, x);
                  if (label == b0 + bl) gst(p.pos + g * p.nq + a, x);
                }
                if (last) {
                  gst(p.m + si, m);
                  gst(p.l + si, l);
                }
              }
            }
          }
          __syncthreads();  // S^T and psc are reused by the next tile
        }
      }
    }
  }
}

// ================================ weights_kernel ========================================
// One thread per (item, row): w_k = sum_{g: bound k, i < r_q(g)} dS_g(a, item), then runs of
// equal argmax merged into their first bound (the rest set to 0) so each token is touched
// once.
__global__ void __launch_bounds__(NT) weights_kernel(const WeightArgs p) {
  SHARED_ARRAY(int32_t, sm_grp, 2 * kMaxGroups);
  const int tid = threadIdx.x;
  if (tid < kMaxGroups) {
    sm_grp[tid] = p.groups.rq[tid];
    sm_grp[kMaxGroups + tid] = p.groups.bidx[tid];
  }
  __syncthreads();
  const int G = p.groups.G, nb = p.nb, rq = p.rq_eff;
  const int64_t n = p.nitems * p.tb;
  for (int64_t idx = int64_t(blockIdx.x) * NT + tid; idx < n; idx += int64_t(gridDim.x) * NT) {
    const int64_t x = idx / p.tb, tr = idx % p.tb;
    const int64_t a = p.per_query ? x / p.K : tr / rq;
    const int i = int(p.per_query ? tr : tr % rq);
    const int64_t col = p.per_query ? x % p.K : x;
    const bool qok = !p.qmask || gld(p.qmask + a * p.qm0 + i * p.qm1) != 0;
    const int64_t e = idx * nb;
    int cur_j = -2, cur_k = -1;
    float cur_w = 0.f;
    for (int k = 0; k < nb; ++k) {
      const int j = gld(p.argmax + e + k);
      float w = 0.f;
      if (qok && j >= 0)
        for (int g = 0; g < G; ++g)
          if (sm_grp[kMaxGroups + g] == k && i < sm_grp[g]) w += gld(p.ds + g * p.ds_gstride + a * p.ds_ld + col);
      if (j == cur_j) {  // same token as the previous bound (argmax is non-decreasing in k)
        cur_w += w;
        gst(p.w + e + k, 0.f);
      } else {
        if (cur_k >= 0) gst(p.w + e + cur_k, cur_w);
        cur_j = j;
        cur_k = k;
        cur_w = w;
      }
    }
    if (cur_k >= 0) gst(p.w + e + cur_k, cur_w);
  }
}

// ================================ grad_q_kernel =========================================
// Warp w of CTA (bx, by) owns rows 32bx + 8w .. +7 and dims 128by + 4*lane .. +3, in
// registers, over every item (in order); then adds them to dq. No barriers: lanes past D
// leave early.
template <class T>
__global__ void __launch_bounds__(NT) grad_q_kernel(const GradArgs p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rq = p.rq_eff;
  const int64_t nrows = p.nq * rq;
  const int64_t t0 = int64_t(blockIdx.x) * 32 + warp * 8;
  const int64_t d = int64_t(blockIdx.y) * 128 + lane * 4;
  if (t0 >= nrows || d >= p.D) return;
  const int nr = int(min64(8, nrows - t0));
  const T* cd = static_cast<const T*>(p.c.data);
  float acc[8][4];
#pragma unroll
  for (int r = 0; r < 8; ++r)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[r][e] = 0.f;
  int64_t x_lo = 0, x_hi = p.ncand;  // per query: the items of the warp's queries
  if (p.per_query) {
    x_lo = (t0 / rq) * p.ncand;
    x_hi = ((t0 + nr - 1) / rq + 1) * p.ncand;
  }
  for (int64_t x = x_lo; x < x_hi; ++x) {
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      const int64_t t = t0 + r, a = t / rq;
      const int64_t xi = p.per_query ? x - a * p.ncand : x;  // item within its set
      if (r < nr && xi >= 0 && xi < p.ncand) {
        const int64_t e = (x * p.tb + (p.per_query ? t - a * rq : t)) * p.nb;
        const T* item = cd + (p.per_query ? a * p.c.s_q : 0) + xi * p.c.s0;
        for (int k = 0; k < p.nb; ++k) {
          const float w = gld(p.w + e + k);
          if (w == 0.f) continue;  // merged run, masked row, no valid token or zero gradient
          const float4 v = load4(item + int64_t(gld(p.argmax + e + k)) * p.c.s1, d, p.D, p.vec4);
          acc[r][0] = fmaf(w, v.x, acc[r][0]);
          acc[r][1] = fmaf(w, v.y, acc[r][1]);
          acc[r][2] = fmaf(w, v.z, acc[r][2]);
          acc[r][3] = fmaf(w, v.w, acc[r][3]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    const int64_t t = t0 + r, a = t / rq, i = t - a * rq;
    float* dst = p.dq + (a * p.Rq + i) * p.D + d;
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (r < nr && d + u < p.D) gst(dst + u, gld(dst + u) + acc[r][u]);
  }
}

// ================================ grad_c_kernel =========================================
// CTA (x, jt, dz) owns item x's tokens 64jt .. +63 and dims 128dz + 4*lane .. +3; warp w
// owns the tokens with (j - 64jt) % 4 == w. The (argmax, weight) entries of the item are
// staged through shared memory and applied in row order: every accumulator has one owner.
template <class T>
__global__ void __launch_bounds__(NT) grad_c_kernel(const GradArgs p) {
  SHARED_ARRAY(float, sm_acc, 64 * 128);
  SHARED_ARRAY(int32_t, sm_j, kGradStage);
  SHARED_ARRAY(float, sm_w, kGradStage);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t x = blockIdx.x;
  const int j0 = int(blockIdx.y) * 64;
  const int64_t d = int64_t(blockIdx.z) * 128 + lane * 4;
  const int rq = p.rq_eff;
  const T* qd = static_cast<const T*>(p.q.data);
  for (int jj = warp; jj < 64; jj += 4)
    for (int u = 0; u < 4; ++u) sm_acc[jj * 128 + lane * 4 + u] = 0.f;
  const int64_t row0 = p.per_query ? (x / p.ncand) * rq : 0;  // rows of the item's query
  const int64_t n_e = p.tb * p.nb;
  const int32_t* J = p.argmax + x * n_e;
  const float* W = p.w + x * n_e;
  for (int64_t eb = 0; eb < n_e; eb += kGradStage) {
    const int cnt = int(min64(kGradStage, n_e - eb));
    __syncthreads();  // every warp is done with the previous batch
    for (int u = tid; u < cnt; u += NT) {
      sm_j[u] = gld(J + eb + u);
      sm_w[u] = gld(W + eb + u);
    }
    __syncthreads();
    if (d < p.D) {
      for (int u = 0; u < cnt; ++u) {
        const float w = sm_w[u];
        if (w == 0.f) continue;
        const int jj = sm_j[u] - j0;
        if (jj < 0 || jj >= 64 || (jj & 3) != warp) continue;
        const int64_t t = row0 + (eb + u) / p.nb, a = t / rq, i = t - a * rq;
        const float4 v = load4(qd + a * p.q.s0 + i * p.q.s1, d, p.D, p.vec4);
        float* ac = sm_acc + jj * 128 + lane * 4;
        ac[0] = fmaf(w, v.x, ac[0]);
        ac[1] = fmaf(w, v.y, ac[1]);
        ac[2] = fmaf(w, v.z, ac[2]);
        ac[3] = fmaf(w, v.w, ac[3]);
      }
    }
  }
  if (d < p.D)
    for (int jj = warp; jj < 64 && j0 + jj < p.rc_eff; jj += 4) {
      float* dst = p.dc + (x * p.Rc + j0 + jj) * p.D + d;
      for (int u = 0; u < 4; ++u)
        if (d + u < p.D) gst(dst + u, gld(dst + u) + sm_acc[jj * 128 + lane * 4 + u]);
    }
}

// ================================ launching =============================================
const char* finish() {
#ifdef METAEMBED_CUDA_EMULATE
  return ::emu::g_error.empty() ? nullptr : ::emu::g_error.c_str();
#else
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
#endif
}

#ifdef METAEMBED_CUDA_EMULATE
#define METAEMBED_LAUNCH(kernel, grid, block, stream, arg) \
  (::emu::launch((grid), (block), [&] { kernel(arg); }), finish())
#else
#define METAEMBED_LAUNCH(kernel, grid, block, stream, arg) \
  (kernel<<<(grid), (block), 0, static_cast<cudaStream_t>(stream)>>>(arg), finish())
#endif

int elem_bytes(DType t) { return t == kF32 ? 4 : 2; }

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace

void plan_scores(ScoreArgs& a, int num_sms) {
  const int rq = a.groups.rq_eff, rc = a.groups.rc_eff;
  a.qb = a.per_query ? 1 : int(std::max<int64_t>(1, std::min<int64_t>(BM / rq, a.nq)));
  if (rc <= BN) {
    a.rct = rc;
    a.cb = BN / rc;
    a.nchunks = 1;
  } else {
    a.rct = BN;
    a.cb = 1;
    a.nchunks = (rc + BN - 1) / BN;
  }
  a.num_qblocks = (a.nq + a.qb - 1) / a.qb;
  a.num_ctiles = (a.ncand + a.cb - 1) / a.cb;
  if (!a.lse) {
    a.tiles_per_split = 1;
    a.num_splits = a.num_ctiles;
  } else if (a.per_query) {
    a.tiles_per_split = std::max<int64_t>(1, a.num_ctiles);
    a.num_splits = a.num_ctiles > 0 ? 1 : 0;
  } else {
    // Enough (query block, item split) pairs to fill the GPU; each split keeps its own
    // log-sum-exp state (num_splits x G x Nq floats), merged by the host in split order.
    const int64_t target = 4 * int64_t(std::max(num_sms, 1));
    int64_t splits = std::min<int64_t>({(target + a.num_qblocks - 1) / std::max<int64_t>(a.num_qblocks, 1),
                                        a.num_ctiles, 64});
    splits = std::max<int64_t>(splits, a.num_ctiles > 0 ? 1 : 0);
    a.tiles_per_split = splits > 0 ? (a.num_ctiles + splits - 1) / splits : 1;
    a.num_splits = splits > 0 ? (a.num_ctiles + a.tiles_per_split - 1) / a.tiles_per_split : 0;
  }
  const int ve = 16 / elem_bytes(a.dtype);
  auto ok = [ve](int64_t s) { return s % ve == 0; };
  a.vec = a.D % ve == 0 && ok(a.q.s0) && ok(a.q.s1) && ok(a.c.s0) && ok(a.c.s1) &&
          (!a.per_query || ok(a.c.s_q)) && aligned(a.q.data, 16) && aligned(a.c.data, 16);
}

const char* launch_scores(const ScoreArgs& a, void* stream) {
  const int64_t items = a.num_qblocks * a.num_splits;
  if (items == 0) return nullptr;
  const dim3 grid(unsigned(std::min(items, kMaxGrid))), block(NT);
  switch (a.dtype) {
    case kF32:
      return METAEMBED_LAUNCH(score_kernel<float>, grid, block, stream, a);
    case kF16:
      return METAEMBED_LAUNCH(score_kernel<f16s>, grid, block, stream, a);
    default:
      return METAEMBED_LAUNCH(score_kernel<bf16s>, grid, block, stream, a);
  }
}

const char* launch_weights(const WeightArgs& a, void* stream) {
  const int64_t n = a.nitems * a.tb;
  if (n == 0 || a.nb == 0) return nullptr;
  const dim3 grid(unsigned(std::min((n + NT - 1) / NT, kMaxGrid))), block(NT);
  return METAEMBED_LAUNCH(weights_kernel, grid, block, stream, a);
}

static bool grad_vec4(const GradArgs& a) {
  const int eb = elem_bytes(a.dtype);
  auto ok = [](int64_t s) { return s % 4 == 0; };
  return a.D % 4 == 0 && ok(a.q.s0) && ok(a.q.s1) && ok(a.c.s0) && ok(a.c.s1) && (!a.per_query || ok(a.c.s_q)) &&
         aligned(a.q.data, 4 * eb) && aligned(a.c.data, 4 * eb);
}

const char* launch_grad_q(const GradArgs& a_in, void* stream) {
  GradArgs a = a_in;
  a.vec4 = grad_vec4(a);
  const int64_t rows = a.nq * a.rq_eff;
  if (rows == 0 || a.ncand == 0 || a.nb == 0) return nullptr;
  if ((rows + 31) / 32 > INT_MAX || (a.D + 127) / 128 > 65535) return "grad_q: problem too large for one launch";
  const dim3 grid{unsigned((rows + 31) / 32), unsigned((a.D + 127) / 128)}, block{unsigned(NT)};
  switch (a.dtype) {
    case kF32:
      return METAEMBED_LAUNCH(grad_q_kernel<float>, grid, block, stream, a);
    case kF16:
      return METAEMBED_LAUNCH(grad_q_kernel<f16s>, grid, block, stream, a);
    default:
      return METAEMBED_LAUNCH(grad_q_kernel<bf16s>, grid, block, stream, a);
  }
}

const char* launch_grad_c(const GradArgs& a_in, void* stream) {
  GradArgs a = a_in;
  a.vec4 = grad_vec4(a);
  const int64_t n_items = a.per_query ? a.nq * a.ncand : a.ncand;
  if (n_items == 0 || a.nq == 0 || a.nb == 0) return nullptr;
  const int64_t jt = (a.rc_eff + 63) / 64, dz = (a.D + 127) / 128;
  if (n_items > INT_MAX || jt > 65535 || dz > 65535) return "grad_c: problem too large for one launch";
  const dim3 grid{unsigned(n_items), unsigned(jt), unsigned(dz)}, block{unsigned(NT)};
  switch (a.dtype) {
    case kF32:
      return METAEMBED_LAUNCH(grad_c_kernel<float>, grid, block, stream, a);
    case kF16:
      return METAEMBED_LAUNCH(grad_c_kernel<f16s>, grid, block, stream, a);
    default:
      return METAEMBED_LAUNCH(grad_c_kernel<bf16s>, grid, block, stream, a);
  }
}

#ifdef METAEMBED_CUDA_EMULATE
void emu_clear_ranges() {
  ::emu::g_ranges.clear();
  ::emu::g_error.clear();
}
void emu_add_range(const void* p, size_t bytes) {
  const uintptr_t b = reinterpret_cast<uintptr_t>(p);
  ::emu::g_ranges.emplace_back(b, b + bytes);
}
int emu_set_schedule(int mode) {
  const int prev = ::emu::g_schedule;
  ::emu::g_schedule = mode;
  return prev;
}
int64_t emu_launch_count() { return ::emu::g_launches; }
#endif

}  // namespace cuda
}  // namespace metaembed
