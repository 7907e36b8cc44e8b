// Fused Monarch product on the CPU: forward and backward, OpenMP, float32 / float64.
//
// Math (Dao et al., "Monarch", ICML 2022; the generalized (k,q,p)/(l,s,r) layout of
// HazyResearch/fly, see csrc/include/kernelkit/kernelkit.h):
//   t[b, a*q + i]   = sum_j w1[a, i, j] x[b, a*p + j]           stage 1, k GEMMs  (B x p)(p x q)
//   h[b, c, m]      = t[b, m*l + c]                              permutation P1 (never copied)
//   out[b, n*l + c] = sum_m w2[c, n, m] h[b, c, m]               stage 2, l GEMMs  (B x r)(r x s)
//
// Why this is faster than the usual bmm path: the bmm path writes the intermediate, copies it
// through a permute, and copies the output through another one (each a full pass over memory).
// Here the batch is cut into tiles of BM rows; a tile's intermediate t stays in one cache-resident
// buffer, and both permutations are folded into strides: the packing of the micro-kernel's A operand
// reads h[b, c, :] as t + c with column stride l, and C is written to output columns n*l + c.
// Weights are packed once per call into register-panel order (gemm.h).
//
// Backward recomputes t per tile (nothing but x, w1, w2 is saved), then per tile:
//   dt[b, m*l + c] = sum_n dout[b, n*l + c] w2[c, n, m]        (dO read in place, strided)
//   dw2[c, n, m]  += sum_b dout[b, n*l + c] t[b, m*l + c]
//   dx[b, a*p + j] = sum_i dt[b, a*q + i] w1[a, i, j]
//   dw1[a, i, j]  += sum_b dt[b, a*q + i] x[b, a*p + j]
// Threads split each stage's (block, group of column panels) work items, so every weight-gradient
// element has exactly one writer: no atomics and no per-thread copies to reduce.  Accumulation is in
// the element type (fp32 or fp64).
//
// This file is compiled once per ISA (KK_ISA_NS = isa_avx512 / isa_avx2 / isa_base);
// monarch_api.cpp validates arguments and picks the variant at run time.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <vector>

#include "gemm.h"
#include "monarch_impl.h"

namespace kk {
namespace KK_ISA_NS {
namespace {

struct Dims {
  int64_t B, k, q, p, l, s, r;
  int64_t kq() const { return k * q; }
};

// 64-byte aligned scratch that frees itself.
template <typename T>
struct Buffer {
  T* ptr = nullptr;
  explicit Buffer(int64_t n) {
    size_t bytes = static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T);
    bytes = (bytes + 63) / 64 * 64;
    ptr = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (!ptr) throw std::bad_alloc();
  }
  ~Buffer() { std::free(ptr); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Batch tile: the tile's intermediate t (bm x k*q) should stay in L2 (forward) or L3 (backward,
// where bigger tiles amortise the read-modify-write of the weight gradients).
template <typename T>
int64_t batch_tile(const Dims& d, bool backward) {
  constexpr int MR = Tile<T>::MR;
  const int64_t budget = (backward ? 4096 : 1024) * 1024;  // bytes for the t tile
  int64_t bm = budget / (std::max<int64_t>(d.kq(), 1) * static_cast<int64_t>(sizeof(T)));
  bm = std::min<int64_t>(std::max<int64_t>(bm, 4 * MR), 512) / MR * MR;
  return std::min(bm, std::max<int64_t>(d.B, 1));
}

// Work items of one stage: `nblk` blocks x `ngroup` groups of column panels of an N-wide output.
// Groups exist so that a few big blocks still give every thread work at small batch.
template <typename T>
struct Split {
  int64_t ngroup, per;  // groups per block, columns per group (a multiple of NR)
  Split(int64_t nblk, int64_t N, int64_t workers) {
    constexpr int NR = Tile<T>::NR;
    const int64_t npan = cdiv(N, NR);
    ngroup = std::min(std::max<int64_t>(cdiv(2 * workers, nblk), 1), npan);
    per = cdiv(npan, ngroup) * NR;
  }
  int64_t items(int64_t nblk) const { return nblk * ngroup; }
};

// Per-thread packing scratch.
template <typename T>
struct Scratch {
  Buffer<T> a, at, b;
  Scratch(const Dims& d, int64_t bm)
      : a(packed_a_size<T>(bm, std::max({d.p, d.q, d.r, d.s}))),
        at(packed_a_size<T>(std::max(d.s, d.q), bm)),
        b(packed_size<T>(bm, std::max(d.r, d.p))) {}
};

template <typename T>
void fwd(const Dims& d, const T* x, int64_t ldx, const T* w1, const T* w2, T* out, int64_t ldo,
         int nthreads) {
  const int64_t kq = d.kq();
  const int64_t ps1 = packed_size<T>(d.p, d.q), ps2 = packed_size<T>(d.r, d.s);
  Buffer<T> P1(d.k * ps1), P2(d.l * ps2);
  const int64_t bm = batch_tile<T>(d, false);
  const int64_t ntiles = cdiv(d.B, bm);
  // Many tiles: each thread owns whole tiles (no barriers).  Few: threads share a tile's items.
  const bool tile_parallel = ntiles >= 2 * static_cast<int64_t>(nthreads);
  const int64_t workers = tile_parallel ? 1 : nthreads;
  const Split<T> g1(d.k, d.q, workers), g2(d.l, d.s, workers);
  Buffer<T> tbuf((tile_parallel ? nthreads : 1) * bm * kq);
  std::vector<Scratch<T>*> scratch(nthreads, nullptr);
  struct Free { std::vector<Scratch<T>*>& v; ~Free() { for (auto* p : v) delete p; } } free_{scratch};
  for (auto& sc : scratch) sc = new Scratch<T>(d, bm);

#pragma omp parallel num_threads(nthreads)
  {
    // Pack weights: w1[a] as B = (K=p) x (N=q), element (j, i) = w1[a, i, j]; w2[c] as r x s.
#pragma omp for schedule(static) nowait
    for (int64_t a = 0; a < d.k; ++a) pack_b<T>(d.p, d.q, w1 + a * d.q * d.p, 1, d.p, P1.ptr + a * ps1);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < d.l; ++c) pack_b<T>(d.r, d.s, w2 + c * d.s * d.r, 1, d.r, P2.ptr + c * ps2);
    Scratch<T>& sc = *scratch[omp_get_thread_num()];

    // Stage 1, item (a, group): t[:, a*q + cols] = x[:, a*p : a*p + p] w1[a]^T
    auto stage1 = [&](int64_t b0, int64_t mt, T* t, int64_t it) {
      const int64_t a = it / g1.ngroup, j0 = (it % g1.ngroup) * g1.per;
      pack_a<T>(mt, d.p, x + b0 * ldx + a * d.p, ldx, 1, sc.a.ptr);
      gemm_packed<T>(mt, d.q, d.p, sc.a.ptr, P1.ptr + a * ps1, j0, j0 + g1.per, t + a * d.q, kq, 1,
                     false);
    };
    // Stage 2, item (c, group): out[:, n*l + c] = h_c w2[c]^T, with h_c = t[:, c::l] (P1 folded
    // into the packing strides, P2 into the output column stride l).
    auto stage2 = [&](int64_t b0, int64_t mt, const T* t, int64_t it) {
      const int64_t c = it / g2.ngroup, j0 = (it % g2.ngroup) * g2.per;
      pack_a<T>(mt, d.r, t + c, kq, d.l, sc.a.ptr);
      gemm_packed<T>(mt, d.s, d.r, sc.a.ptr, P2.ptr + c * ps2, j0, j0 + g2.per,
                     out + b0 * ldo + c, ldo, d.l, false);
    };

    if (tile_parallel) {
      T* t = tbuf.ptr + omp_get_thread_num() * bm * kq;
#pragma omp for schedule(dynamic, 1)
      for (int64_t tile = 0; tile < ntiles; ++tile) {
        const int64_t b0 = tile * bm, mt = std::min(bm, d.B - b0);
        for (int64_t it = 0; it < g1.items(d.k); ++it) stage1(b0, mt, t, it);
        for (int64_t it = 0; it < g2.items(d.l); ++it) stage2(b0, mt, t, it);
      }
    } else {
      for (int64_t tile = 0; tile < ntiles; ++tile) {
        const int64_t b0 = tile * bm, mt = std::min(bm, d.B - b0);
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < g1.items(d.k); ++it) stage1(b0, mt, tbuf.ptr, it);
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < g2.items(d.l); ++it) stage2(b0, mt, tbuf.ptr, it);
      }
    }
  }
}

template <typename T>
void bwd(const Dims& d, const T* x, int64_t ldx, const T* w1, const T* w2, const T* dout,
         int64_t lddo, T* dx, int64_t lddx, T* dw1, T* dw2, int nthreads) {
  const int64_t kq = d.kq();
  const int64_t ps1 = packed_size<T>(d.p, d.q);   // w1[a] as K=p x N=q (recompute t)
  const int64_t ps2 = packed_size<T>(d.s, d.r);   // w2[c] as K=s x N=r (dt = dO w2)
  const int64_t ps3 = packed_size<T>(d.q, d.p);   // w1[a] as K=q x N=p (dx = dt w1)
  const bool need_dt = dx || dw1;
  const int64_t bm = batch_tile<T>(d, true);
  const int64_t ntiles = cdiv(d.B, bm);
  const Split<T> g1(d.k, d.q, nthreads), g2(d.l, d.r, nthreads), g3(d.k, d.p, nthreads);
  Buffer<T> P1(d.k * ps1), P2(need_dt ? d.l * ps2 : 0), P3(dx ? d.k * ps3 : 0);
  Buffer<T> tbuf(bm * kq), dtbuf(need_dt ? bm * kq : 0);
  std::vector<Scratch<T>*> scratch(nthreads, nullptr);
  struct Free { std::vector<Scratch<T>*>& v; ~Free() { for (auto* p : v) delete p; } } free_{scratch};
  for (auto& sc : scratch) sc = new Scratch<T>(d, bm);

#pragma omp parallel num_threads(nthreads)
  {
    Scratch<T>& sc = *scratch[omp_get_thread_num()];
#pragma omp for schedule(static) nowait
    for (int64_t a = 0; a < d.k; ++a) pack_b<T>(d.p, d.q, w1 + a * d.q * d.p, 1, d.p, P1.ptr + a * ps1);
    if (need_dt) {
#pragma omp for schedule(static) nowait
      for (int64_t c = 0; c < d.l; ++c) pack_b<T>(d.s, d.r, w2 + c * d.s * d.r, d.r, 1, P2.ptr + c * ps2);
    }
    if (dx) {
#pragma omp for schedule(static) nowait
      for (int64_t a = 0; a < d.k; ++a) pack_b<T>(d.q, d.p, w1 + a * d.q * d.p, d.p, 1, P3.ptr + a * ps3);
    }
    if (dw1) {
#pragma omp for schedule(static) nowait
      for (int64_t i = 0; i < d.k * d.q * d.p; ++i) dw1[i] = T(0);
    }
    if (dw2) {
#pragma omp for schedule(static) nowait
      for (int64_t i = 0; i < d.l * d.s * d.r; ++i) dw2[i] = T(0);
    }
#pragma omp barrier

    for (int64_t tile = 0; tile < ntiles; ++tile) {
      const int64_t b0 = tile * bm, mt = std::min(bm, d.B - b0);
      const T* xt = x + b0 * ldx;
      const T* dot = dout + b0 * lddo;
      T* t = tbuf.ptr;
      T* dt = dtbuf.ptr;

      // Stage 1: recompute t for this tile (nothing but x, w1, w2 was saved).
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < g1.items(d.k); ++it) {
        const int64_t a = it / g1.ngroup, j0 = (it % g1.ngroup) * g1.per;
        pack_a<T>(mt, d.p, xt + a * d.p, ldx, 1, sc.a.ptr);
        gemm_packed<T>(mt, d.q, d.p, sc.a.ptr, P1.ptr + a * ps1, j0, j0 + g1.per, t + a * d.q, kq,
                       1, false);
      }
      // Stage 2, item (c, group of m columns); dO_c[b, n] = dout[b, n*l + c] is packed in place.
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < g2.items(d.l); ++it) {
        const int64_t c = it / g2.ngroup, j0 = (it % g2.ngroup) * g2.per;
        const int64_t j1 = std::min(j0 + g2.per, d.r);
        if (j0 >= j1) continue;
        if (need_dt) {  // dt[b, m*l + c] = sum_n dO_c[b, n] w2[c, n, m]
          pack_a<T>(mt, d.s, dot + c, lddo, d.l, sc.a.ptr);
          gemm_packed<T>(mt, d.r, d.s, sc.a.ptr, P2.ptr + c * ps2, j0, j1, dt + c, kq, d.l, false);
        }
        if (dw2) {  // dw2[c, n, m] += sum_b dO_c[b, n] h_c[b, m]:  A = dO_c^T, B = h_c[:, j0:j1]
          pack_a<T>(d.s, mt, dot + c, d.l, lddo, sc.at.ptr);
          pack_b<T>(mt, j1 - j0, t + j0 * d.l + c, kq, d.l, sc.b.ptr);
          gemm_packed<T>(d.s, j1 - j0, mt, sc.at.ptr, sc.b.ptr, 0, j1 - j0, dw2 + c * d.s * d.r + j0,
                         d.r, 1, true);
        }
      }
      if (!need_dt) continue;  // the loop above ended with a barrier
      // Stage 3, item (a, group of j columns).
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < g3.items(d.k); ++it) {
        const int64_t a = it / g3.ngroup, j0 = (it % g3.ngroup) * g3.per;
        const int64_t j1 = std::min(j0 + g3.per, d.p);
        if (j0 >= j1) continue;
        if (dx) {  // dx[b, a*p + j] = sum_i dt[b, a*q + i] w1[a, i, j]
          pack_a<T>(mt, d.q, dt + a * d.q, kq, 1, sc.a.ptr);
          gemm_packed<T>(mt, d.p, d.q, sc.a.ptr, P3.ptr + a * ps3, j0, j1,
                         dx + b0 * lddx + a * d.p, lddx, 1, false);
        }
        if (dw1) {  // dw1[a, i, j] += sum_b dt[b, a*q + i] x[b, a*p + j]:  A = dt_a^T, B = x_a
          pack_a<T>(d.q, mt, dt + a * d.q, 1, kq, sc.at.ptr);
          pack_b<T>(mt, j1 - j0, xt + a * d.p + j0, ldx, 1, sc.b.ptr);
          gemm_packed<T>(d.q, j1 - j0, mt, sc.at.ptr, sc.b.ptr, 0, j1 - j0, dw1 + a * d.q * d.p + j0,
                         d.p, 1, true);
        }
      }
    }
  }
}

}  // namespace

kk_status monarch_fwd(kk_dtype dtype, const MonarchArgs& a, int nthreads) {
  const Dims d{a.batch, a.k, a.q, a.p, a.l, a.s, a.r};
  if (dtype == KK_FLOAT32)
    fwd<float>(d, static_cast<const float*>(a.x), a.ldx, static_cast<const float*>(a.w1),
               static_cast<const float*>(a.w2), static_cast<float*>(a.out), a.ldo, nthreads);
  else
    fwd<double>(d, static_cast<const double*>(a.x), a.ldx, static_cast<const double*>(a.w1),
                static_cast<const double*>(a.w2), static_cast<double*>(a.out), a.ldo, nthreads);
  return KK_OK;
}

kk_status monarch_bwd(kk_dtype dtype, const MonarchArgs& a, int nthreads) {
  const Dims d{a.batch, a.k, a.q, a.p, a.l, a.s, a.r};
  if (dtype == KK_FLOAT32)
    bwd<float>(d, static_cast<const float*>(a.x), a.ldx, static_cast<const float*>(a.w1),
               static_cast<const float*>(a.w2), static_cast<const float*>(a.dout), a.lddo,
               static_cast<float*>(a.dx), a.lddx, static_cast<float*>(a.dw1),
               static_cast<float*>(a.dw2), nthreads);
  else
    bwd<double>(d, static_cast<const double*>(a.x), a.ldx, static_cast<const double*>(a.w1),
                static_cast<const double*>(a.w2), static_cast<const double*>(a.dout), a.lddo,
                static_cast<double*>(a.dx), a.lddx, static_cast<double*>(a.dw1),
                static_cast<double*>(a.dw2), nthreads);
  return KK_OK;
}

}  // namespace KK_ISA_NS
}  // namespace kk
