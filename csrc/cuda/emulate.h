// A CPU emulator for the subset of CUDA that kernels.cu uses, so its kernels can be tested
// where no GPU exists (tests/test_cuda.py builds kernels.cu as C++ with
// METAEMBED_CUDA_EMULATE and runs the parity sweep through it).
//
// Every CUDA thread is a fiber (ucontext); blocks run one after another. A fiber runs until
// it reaches __syncthreads(), and the barrier opens when every thread of the block waits at
// the *same* barrier. What it checks, besides the numbers:
//   * barrier divergence (threads at different barriers, or some exited while others wait);
//   * races between barriers: the order fibers run in is selectable (forward, reverse,
//     shuffled), so a read that depends on another thread's write in the same barrier
//     interval changes the result between orders; the tests require bitwise equality;
//   * every global load/store is inside a tensor the host registered, and aligned;
//   * WMMA pointer alignment (256 bits) and leading dimensions;
//   * shared memory starts filled with NaN bytes, so reading unwritten shared memory shows.
// Failures are recorded (the first message wins) and returned by the launcher; the access
// itself is replaced by a harmless one so the block can finish.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

namespace emu {

// ---- errors -------------------------------------------------------------------------
inline std::string g_error;
inline void fail(const std::string& msg) {
  if (g_error.empty()) g_error = msg;
}

// ---- global memory ranges -----------------------------------------------------------
inline std::vector<std::pair<uintptr_t, uintptr_t>> g_ranges;

inline bool check_global(const void* p, size_t bytes, const char* what) {
  const uintptr_t b = reinterpret_cast<uintptr_t>(p), e = b + bytes;
  if (bytes > 1 && (b % std::min<size_t>(bytes, 16)) != 0) {
    fail(std::string("misaligned global ") + what + " of " + std::to_string(bytes) + " bytes");
    return false;
  }
  for (const auto& r : g_ranges)
    if (b >= r.first && e <= r.second) return true;
  char buf[160];
  std::snprintf(buf, sizeof buf, "out-of-bounds global %s of %zu bytes at %p (block %u, thread %u)", what, bytes, p,
                blockIdx.x, threadIdx.x);
  fail(buf);
  return false;
}

// ---- fibers -------------------------------------------------------------------------
enum State { kRunnable, kAtBarrier, kDone };
struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  State state = kRunnable;
  int line = 0;
};

inline ucontext_t g_sched;
inline std::vector<Fiber> g_fibers;
inline int g_current = 0;
inline std::function<void()>* g_body = nullptr;
inline int g_schedule = 0;
inline int64_t g_launches = 0;

// Shared memory of the running block: one buffer per declaration site.
inline std::map<int, std::vector<unsigned char>> g_shared;

template <class T>
T* shared_array(int site, size_t count) {
  auto it = g_shared.find(site);
  if (it == g_shared.end()) {
    it = g_shared.emplace(site, std::vector<unsigned char>(sizeof(T) * count + 128, 0xff)).first;
  }
  uintptr_t p = reinterpret_cast<uintptr_t>(it->second.data());
  p = (p + 127) & ~uintptr_t(127);
  return reinterpret_cast<T*>(p);
}

inline void fiber_entry() {
  (*g_body)();
  g_fibers[g_current].state = kDone;  // returns to uc_link (the scheduler)
}

inline void syncthreads(int line) {
  Fiber& f = g_fibers[g_current];
  f.state = kAtBarrier;
  f.line = line;
  swapcontext(&f.ctx, &g_sched);
}

inline unsigned lane_id() { return threadIdx.x % 32; }

// Runs body() as every thread of every block of the grid.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body_in) {
  std::function<void()> body = body_in;
  g_body = &body;
  ++g_launches;
  const unsigned nt = block.x * block.y * block.z;
  if (block.y != 1 || block.z != 1) {
    fail("emulator: only 1-D blocks are supported");
    return;
  }
  g_fibers.resize(nt);
  for (auto& f : g_fibers)
    if (f.stack.size() < (size_t(256) << 10)) f.stack.resize(size_t(256) << 10);
  std::vector<int> order(nt);
  std::iota(order.begin(), order.end(), 0);
  if (g_schedule == 1) std::reverse(order.begin(), order.end());
  std::mt19937 rng(g_schedule);
  gridDim = grid;
  blockDim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx.x = bx;
        blockIdx.y = by;
        blockIdx.z = bz;
        g_shared.clear();
        for (unsigned t = 0; t < nt; ++t) {
          Fiber& f = g_fibers[t];
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &g_sched;
          f.state = kRunnable;
          makecontext(&f.ctx, fiber_entry, 0);
        }
        for (;;) {
          if (g_schedule >= 2) std::shuffle(order.begin(), order.end(), rng);
          for (int t : order) {
            if (g_fibers[t].state != kRunnable) continue;
            g_current = t;
            threadIdx.x = t;
            swapcontext(&g_sched, &g_fibers[t].ctx);
          }
          int done = 0, waiting = 0, line = -1;
          bool same = true;
          for (auto& f : g_fibers) {
            if (f.state == kDone) ++done;
            if (f.state == kAtBarrier) {
              ++waiting;
              if (line >= 0 && f.line != line) same = false;
              line = f.line;
            }
          }
          if (done == int(nt)) break;
          if (done > 0 || !same) {
            fail("barrier divergence at line " + std::to_string(line) + " (block " + std::to_string(bx) + ")");
            return;  // the fibers are abandoned; their stacks are reused by the next launch
          }
          for (auto& f : g_fibers) f.state = kRunnable;
        }
        if (!g_error.empty()) return;
      }
}

// ---- WMMA (16x16x16, fp32 accumulate) ---------------------------------------------------
// Lane l owns accumulator elements e = 8l .. 8l+7 of the row-major 16x16 tile, so the
// arithmetic is done once (like the hardware), while A and B are loaded whole per lane.
struct FragAB {
  float v[16][16];
};
struct FragC {
  float v[8];
};

inline bool check_wmma(const void* p, int ld, int elem_bytes) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
    fail("wmma pointer not 256-bit aligned");
    return false;
  }
  if ((ld * elem_bytes) % 16 != 0) {
    fail("wmma leading dimension not a multiple of 16 bytes");
    return false;
  }
  return true;
}

}  // namespace emu

#define __syncthreads() ::emu::syncthreads(__LINE__)
