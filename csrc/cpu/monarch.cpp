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
// buffer, and both permutations are folded into the strides with which the micro-kernel reads A
// (stage 2 reads h[b, c, :] as t + c with column stride l) and writes C (output columns n*l + c).
// Weights are packed once per call into register-panel order (gemm.h).
//
// Backward recomputes t per tile (nothing but x, w1, w2 is saved), then per tile:
//   dt[b, m*l + c] = sum_n dout[b, n*l + c] w2[c, n, m]        (dO read in place, strided)
//   dw2[c, n, m]  += sum_b dout[b, n*l + c] t[b, m*l + c]
//   dx[b, a*p + j] = sum_i dt[b, a*q + i] w1[a, i, j]
//   dw1[a, i, j]  += sum_b dt[b, a*q + i] x[b, a*p + j]
// Threads split each stage's (block, column panel) work items, so every weight-gradient element
// has exactly one writer: no atomics and no per-thread copies to reduce.  Accumulation is in the
// element type (fp32 or fp64).
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

// Batch tile: the tile buffers (t, dt and the x/dout rows they read) should stay in L2/L3.
template <typename T>
int64_t batch_tile(const Dims& d, int64_t widest, bool backward) {
  constexpr int MR = Tile<T>::MR;
  int64_t budget = (backward ? 512 : 256) * 1024;  // bytes for one tile buffer
  if (const char* e = std::getenv(backward ? "KK_TUNE_BWD" : "KK_TUNE_FWD")) budget = std::atoll(e) * 1024;
  int64_t minbm = 2 * MR;
  if (const char* e = std::getenv("KK_TUNE_MINBM")) minbm = std::atoll(e);
  int64_t bm = budget / (std::max<int64_t>(widest, 1) * static_cast<int64_t>(sizeof(T)));
  bm = std::max<int64_t>(bm, minbm);
  bm = std::min<int64_t>(bm, 512);
  bm = bm / MR * MR;
  return std::min(bm, std::max<int64_t>(d.B, 1));
}

template <typename T>
void fwd(const Dims& d, const T* x, int64_t ldx, const T* w1, const T* w2, T* out, int64_t ldo,
         int nthreads) {
  constexpr int NR = Tile<T>::NR;
  const int64_t kq = d.kq();
  const int64_t np1 = cdiv(d.q, NR), np2 = cdiv(d.s, NR);  // column panels per block
  const int64_t ps1 = packed_size<T>(d.p, d.q), ps2 = packed_size<T>(d.r, d.s);
  Buffer<T> P1(d.k * ps1), P2(d.l * ps2);
  const int64_t bm = batch_tile<T>(d, std::max({kq, d.k * d.p, d.l * d.s}), false);
  const int64_t ntiles = cdiv(d.B, bm);
  // Many tiles: each thread owns whole tiles (no barriers).  Few: threads share a tile's items.
  const bool tile_parallel = ntiles >= 4 * static_cast<int64_t>(nthreads);
  Buffer<T> tbuf((tile_parallel ? nthreads : 1) * bm * kq);

#pragma omp parallel num_threads(nthreads)
  {
    // Pack weights: w1[a] as K=p x N=q (element (j, i) at w1[a, i, j]); w2[c] as K=r x N=s.
#pragma omp for schedule(static) nowait
    for (int64_t a = 0; a < d.k; ++a) pack_b<T>(d.p, d.q, w1 + a * d.q * d.p, 1, d.p, P1.ptr + a * ps1);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < d.l; ++c) pack_b<T>(d.r, d.s, w2 + c * d.s * d.r, 1, d.r, P2.ptr + c * ps2);

    auto stage1 = [&](int64_t b0, int64_t mt, T* t, int64_t it) {  // item = (a, panel)
      const int64_t a = it / np1, jp = it % np1;
      const int nr = static_cast<int>(std::min<int64_t>(NR, d.q - jp * NR));
      gemm_panel<T>(mt, d.p, x + b0 * ldx + a * d.p, ldx, 1, P1.ptr + a * ps1 + jp * NR * d.p,
                    t + a * d.q + jp * NR, kq, 1, nr, false);
    };
    auto stage2 = [&](int64_t b0, int64_t mt, const T* t, int64_t it) {  // item = (c, panel)
      const int64_t c = it / np2, jp = it % np2;
      const int nr = static_cast<int>(std::min<int64_t>(NR, d.s - jp * NR));
      gemm_panel<T>(mt, d.r, t + c, kq, d.l, P2.ptr + c * ps2 + jp * NR * d.r,
                    out + b0 * ldo + jp * NR * d.l + c, ldo, d.l, nr, false);
    };

    if (tile_parallel) {
      T* t = tbuf.ptr + omp_get_thread_num() * bm * kq;
#pragma omp for schedule(dynamic, 1)
      for (int64_t tile = 0; tile < ntiles; ++tile) {
        const int64_t b0 = tile * bm, mt = std::min(bm, d.B - b0);
        for (int64_t it = 0; it < d.k * np1; ++it) stage1(b0, mt, t, it);
        for (int64_t it = 0; it < d.l * np2; ++it) stage2(b0, mt, t, it);
      }
    } else {
      for (int64_t tile = 0; tile < ntiles; ++tile) {
        const int64_t b0 = tile * bm, mt = std::min(bm, d.B - b0);
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < d.k * np1; ++it) stage1(b0, mt, tbuf.ptr, it);
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < d.l * np2; ++it) stage2(b0, mt, tbuf.ptr, it);
      }
    }
  }
}

template <typename T>
void bwd(const Dims& d, const T* x, int64_t ldx, const T* w1, const T* w2, const T* dout,
         int64_t lddo, T* dx, int64_t lddx, T* dw1, T* dw2, int nthreads) {
  constexpr int NR = Tile<T>::NR;
  const int64_t kq = d.kq();
  const int64_t np1 = cdiv(d.q, NR);   // stage 1 panels (columns i of t per block a)
  const int64_t npr = cdiv(d.r, NR);   // stage 2 panels (columns m of h per block c)
  const int64_t npp = cdiv(d.p, NR);   // stage 3 panels (columns j of x per block a)
  const int64_t ps1 = packed_size<T>(d.p, d.q);   // w1[a] as K=p x N=q (recompute t)
  const int64_t ps2 = packed_size<T>(d.s, d.r);   // w2[c] as K=s x N=r (dt = dO w2)
  const int64_t ps3 = packed_size<T>(d.q, d.p);   // w1[a] as K=q x N=p (dx = dt w1)
  const bool need_dt = dx || dw1;
  const int64_t bm = batch_tile<T>(d, std::max({kq, d.k * d.p, d.l * d.s}), true);
  const int64_t ntiles = cdiv(d.B, bm);
  Buffer<T> P1(d.k * ps1), P2(d.l * ps2), P3(dx ? d.k * ps3 : 0);
  Buffer<T> tbuf(bm * kq), dtbuf(need_dt ? bm * kq : 0);
  // Per-item packing buffers for the weight-gradient GEMMs (K = tile rows, one NR panel).
  Buffer<T> bpack(static_cast<int64_t>(nthreads) * bm * NR);

#pragma omp parallel num_threads(nthreads)
  {
    T* myb = bpack.ptr + omp_get_thread_num() * bm * NR;
#pragma omp for schedule(static) nowait
    for (int64_t a = 0; a < d.k; ++a) pack_b<T>(d.p, d.q, w1 + a * d.q * d.p, 1, d.p, P1.ptr + a * ps1);
#pragma omp for schedule(static) nowait
    for (int64_t c = 0; c < d.l; ++c) pack_b<T>(d.s, d.r, w2 + c * d.s * d.r, d.r, 1, P2.ptr + c * ps2);
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

      // Stage 1: recompute t for this tile.
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < d.k * np1; ++it) {
        const int64_t a = it / np1, jp = it % np1;
        const int nr = static_cast<int>(std::min<int64_t>(NR, d.q - jp * NR));
        gemm_panel<T>(mt, d.p, xt + a * d.p, ldx, 1, P1.ptr + a * ps1 + jp * NR * d.p,
                      t + a * d.q + jp * NR, kq, 1, nr, false);
      }
      // Stage 2: item (c, panel of m).  dO[b, c, n] = dot[b*lddo + n*l + c] is read in place.
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < d.l * npr; ++it) {
        const int64_t c = it / npr, jp = it % npr, m0 = jp * NR;
        const int nr = static_cast<int>(std::min<int64_t>(NR, d.r - m0));
        if (need_dt)  // dt[b, m*l + c] for m in the panel
          gemm_panel<T>(mt, d.s, dot + c, lddo, d.l, P2.ptr + c * ps2 + m0 * d.s,
                        dt + m0 * d.l + c, kq, d.l, nr, false);
        if (dw2) {  // dw2[c, n, m] += sum_b dO[b, c, n] h[b, c, m]; pack h[:, c, panel] (K = b)
          pack_b<T>(mt, nr, t + m0 * d.l + c, kq, d.l, myb);
          gemm_panel<T>(d.s, mt, dot + c, d.l, lddo, myb, dw2 + c * d.s * d.r + m0, d.r, 1, nr,
                        true);
        }
      }
      if (!need_dt) continue;  // the loop above ended with a barrier
      // Stage 3: item (a, panel of j).
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < d.k * npp; ++it) {
        const int64_t a = it / npp, jp = it % npp, j0 = jp * NR;
        const int nr = static_cast<int>(std::min<int64_t>(NR, d.p - j0));
        if (dx)
          gemm_panel<T>(mt, d.q, dt + a * d.q, kq, 1, P3.ptr + a * ps3 + j0 * d.q,
                        dx + b0 * lddx + a * d.p + j0, lddx, 1, nr, false);
        if (dw1) {  // dw1[a, i, j] += sum_b dt[b, a*q + i] x[b, a*p + j]
          pack_b<T>(mt, nr, xt + a * d.p + j0, ldx, 1, myb);
          gemm_panel<T>(d.q, mt, dt + a * d.q, 1, kq, myb, dw1 + a * d.q * d.p + j0, d.p, 1, nr,
                        true);
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
