/*
 * M-FAC on CUDA (Frantar, Kurtic, Alistarh, NeurIPS 2021): the kernels of csrc/include/kernelkit/mfac.h
 * (read it first: the Woodbury formulation, K = m*damp*I + G G^T, the blocks and the two static forms).
 *
 *   G (r, d) buffer, row stride ldg, float32 / bfloat16 / float64; x, out (nvec, d) float32 (float64 with
 *   a float64 buffer); q, c (nvec, nblocks, r), gram, kinv (m, m) float64.
 *
 * dots   q[v, b, i] = sum_{j in block b} G[i, j] x[v, j].  Bound by the one pass over G.  A CTA (8 warps)
 *        owns a column tile [c0, c1) and a range of rows (grid.y splits the rows when the column tiles
 *        alone do not fill the GPU); the tile's x columns (up to kVG vectors at a time) are staged in
 *        shared memory; warps take rows, lanes stride over the columns (coalesced), and a butterfly of
 *        double shuffles sums the lanes.  Per lane the products are summed in float32 (float64 for a
 *        float64 buffer) over at most cw/32 <= 64 terms, then in float64.  The plan (dots_plan):
 *          - block <= cw ("owned"): a CTA owns whole blocks (cw / block of them) and writes q directly,
 *            deterministic;
 *          - block >  cw ("split"): each block is cut into chunks of cw columns, q is zeroed on the stream
 *            and the chunks' sums land with double atomicAdd (last bits may vary from run to run).
 *        cw = 128..2048 columns, chosen so that about 4 CTAs per SM exist.
 *        Insert (insert_row >= 0, nvec == 1): mfac_check_kernel first scans x for a non-finite entry and
 *        marks the call's slot of a device flag ring (g_insert_flag[seq % 1024] = seq, seq unique per
 *        call, so no clearing kernel is needed).  The dots kernel stages x and round(x) (the buffer's
 *        rounding: RNE to bfloat16) as two vectors, writes round(x) into row insert_row as it passes it
 *        and uses it as that row's values, so q = G_new x and qr = G_new round(x) in the same pass; with
 *        the flag set it reads and writes no G and stores NaN into q and qr.
 * combine out[v, j] = alpha x[v, j] + sum_i c[v, b(j), i] G[i, j].  A thread per column (coalesced), the
 *        CTA's 256 columns span blocks bA..bB whose coefficients are staged in shared memory in chunks
 *        of rows (32 KiB); float32 partial sums over a row chunk (<= 1024 rows), float64 across chunks
 *        (float64 throughout for a float64 buffer).  out may alias x (each element is read and then
 *        written by one thread).
 * diag   out[j] = alpha + beta sum_i Z[i, j]^2: a thread per column, float64 sums.
 * window_coef  c[v] = scale kinv q[v]: a warp per (row, vector), float64.
 * window_rebuild  kinv = (m damp I + gram)^-1 (gram's lower triangle), float64, a few-kernel blocked
 *        algorithm on 32 x 32 tiles (P = ceil(m / 32) panels; padded rows/columns act as identity):
 *          Cholesky, left-looking, two kernels per panel p: rb_panel_kernel forms S = K[:, p] -
 *          L[:, <p] L[p, <p]^T for the tiles ti >= p (the diagonal tile into a scratch D), rb_factor_kernel
 *          factors D in shared memory (every CTA, redundantly: 32 steps) and solves its tile's rows
 *          L[ti, p] = S[ti, p] L_pp^-T (a thread per row);
 *          Y = L^-1, one kernel per panel (rb_trinv_kernel): Y[p, tj] = L_pp^-1 (E - L[p, tj..p-1] Y[tj..p-1, tj]);
 *          kinv = Y^T Y (rb_gram_kernel, every tile, into the workspace) and a copy (rb_copy_kernel).
 *        L lives in the workspace, Y in kinv.  Not positive definite: sqrt of a negative pivot, NaN results.
 *        3P + 2 launches; O(m^3) flops in 32 x 32 tile products (not tuned: it runs every ~m updates).
 * window_update  gram row/column `row` = newcol and kinv updated by bordering in O(m^2) (mfac.h; the model is
 *        mfac_window_update in csrc/cpu/mfac.cpp): with k = row, a = kinv[k, :], bz = newcol with bz_k = 0
 *        and c = newcol_k + m damp, w = P^-1 b = kinv bz - a (a . bz) / a_k (w_k = 0; P = K without row and
 *        column k), s = c - bz . w, then kinv'_ij = kinv_ij + w_i w_j / s - a_i a_j / a_k (i, j != k),
 *        kinv'_ik = kinv'_ki = -w_i / s, kinv'_kk = 1 / s.  Every term is bounded by ||kinv|| or ||kinv'||.
 *        Kernels: wu_prep_kernel (a, bz), wu_matvec_kernel (kinv bz, a warp per row; gram's row and
 *        column), wu_coef_kernel (one CTA: w, s and the decision), wu_apply_kernel (a thread per entry, a
 *        function of the unordered pair (i, j): kinv stays exactly symmetric).  kinv is rebuilt instead
 *        when a_k or s is not positive and finite or s is lost to cancellation (s <= 64 eps (|c|
 *        + sum |bz_i w_i|)): wu_coef_kernel decides ON THE DEVICE and sets a flag in the workspace;
 *        wu_apply_kernel runs when it is clear, the rebuild kernels (launched every time) when it is set
 *        (they return at once otherwise), so the host never synchronizes.
 * static_setup  per block b (width w_b) a float64 Gram (W form: m x m of G_b's rows; E form: w_b x w_b of
 *        its columns) plus m damp I (ss_gram_kernel, 32 x 32 lower tiles, blocks batched on grid.y), its
 *        Cholesky (ss_chol_kernel, a CTA per block, right-looking), then Z_b = L^-1 G_b (W form) or
 *        L^-1 (E form) by forward substitution (ss_solve_kernel, a thread per column, L's row staged in
 *        shared memory, the solution in float64 in the workspace), written rounded; rows w_b..r-1 of a
 *        short E-form block are zero.  Blocks are processed in chunks whose workspace stays <= 256 MiB
 *        (or one block's need).  Z may alias G: each column is read and written by its own thread, and
 *        a chunk's Grams are complete before its columns are overwritten.
 *
 * Non-finite inputs and non-positive-definite matrices are not reported (nothing synchronizes): they
 * give NaN results (mfac.h).  Launch bounds: 256 threads everywhere.
 */
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "../cpu/status.h"
#include "api_common.cuh"
#include "common.cuh"
#include "kernelkit/mfac.h"

namespace {

using kk::ceil_div;
using kk::from_f;
using kk::imax64;
using kk::imin64;
using kk::to_f;

constexpr unsigned kFull = 0xffffffffu;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGridX = int64_t(1) << 20;  // CTAs loop beyond this (grid-stride)
constexpr int kMaxGridY = 65535;
constexpr int64_t kCwMin = 128, kCwMax = 2048;  // dots: columns per CTA tile
constexpr int kCombineCols = kThreads;          // combine: columns per CTA
constexpr int kCombineSmem = 4096;              // combine: doubles of staged coefficients
constexpr int kTile = 32;                       // rebuild / static Gram tiles
constexpr int kStage = 1024;                    // static solve: doubles of L's row staged at a time
constexpr int kFlagRing = 1024;
constexpr int64_t kWsTarget = int64_t(256) << 20;  // static setup: workspace bound
constexpr double kCancel = 64 * 2.220446049250313e-16;  // window update: s must be > this * its terms

// Insert calls' non-finite flags: slot seq % kFlagRing holds seq when call seq's x had a non-finite entry.
__device__ unsigned long long g_insert_flag[kFlagRing];

// ---- element access ------------------------------------------------------------------------------
template <typename T>
struct Acc {  // the per-lane accumulation type of a buffer dtype, and the vector dtype
  using A = float;
  using V = float;
};
template <>
struct Acc<double> {
  using A = double;
  using V = double;
};

__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p) { return to_f(*p); }
__device__ __forceinline__ double ld(const double* p) { return *p; }

// The buffer's rounding of a vector entry, returned in the vector dtype.
__device__ __forceinline__ float round_to(float v, const float*) { return v; }
__device__ __forceinline__ float round_to(float v, const __nv_bfloat16*) { return to_f(from_f<__nv_bfloat16>(v)); }
__device__ __forceinline__ double round_to(double v, const double*) { return v; }

__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, float v) { *p = from_f<__nv_bfloat16>(v); }
__device__ __forceinline__ void st(double* p, double v) { *p = v; }

__host__ __device__ __forceinline__ bool is_finite(double v) { return v - v == 0.0; }

__device__ __forceinline__ double warp_sum(double s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(kFull, s, o);
  return s;
}

// =================================================================================================
// dots
// =================================================================================================
struct DotsP {
  int64_t r, d, block, ldg, nvec, ldx, ir, nb;
  void* G;
  const void* x;
  double* q;
  double* qr;
  int64_t cw;          // columns of the staged x tile (smem: kVG * cw vector elements)
  int64_t bpc;         // owned: blocks per tile
  int64_t nchunk;      // split: chunks per block
  int64_t ntiles;
  int64_t rows_per_y;  // rows per grid.y slice
  unsigned long long seq;  // insert: this call's flag value (slot seq % kFlagRing)
};

// Insert pre-kernel: any non-finite x[j] marks the call's flag slot.
template <typename V>
__global__ void __launch_bounds__(kThreads) mfac_check_kernel(const V* x, int64_t d, unsigned long long seq) {
  bool bad = false;
  for (int64_t j = (int64_t)blockIdx.x * kThreads + threadIdx.x; j < d; j += (int64_t)gridDim.x * kThreads)
    bad |= !is_finite((double)x[j]);
  if (bad) g_insert_flag[seq % kFlagRing] = seq;
}

// grid = (min(ntiles, kMaxGridX), ceil(r / rows_per_y)); block = kThreads; smem = kVG * cw * sizeof(V).
template <typename T, bool SPLIT>
__global__ void __launch_bounds__(kThreads, 1) mfac_dots_kernel(const DotsP P) {
  using A = typename Acc<T>::A;
  using V = typename Acc<T>::V;
  constexpr int kVG = sizeof(V) == 4 ? 4 : 2;  // vectors per pass (insert: x and round(x))
  V* xs = kk::dynamic_smem<V>();
  T* G = static_cast<T*>(P.G);
  const V* x = static_cast<const V*>(P.x);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const bool insert = P.ir >= 0;
  const bool bad = insert && *(volatile const unsigned long long*)&g_insert_flag[P.seq % kFlagRing] == P.seq;
  const int64_t row_lo = (int64_t)blockIdx.y * P.rows_per_y, row_hi = imin64(P.r, row_lo + P.rows_per_y);
  const double nan = __longlong_as_double(0x7ff8000000000000LL);

  for (int64_t t = blockIdx.x; t < P.ntiles; t += gridDim.x) {
    int64_t c0, c1, b_lo, b_hi;
    if (SPLIT) {
      b_lo = b_hi = t / P.nchunk;
      c0 = b_lo * P.block + (t % P.nchunk) * P.cw;
      c1 = imin64(P.d, imin64((b_lo + 1) * P.block, c0 + P.cw));
      if (c0 >= c1) continue;  // a chunk past the end of the short last block (uniform over the CTA)
    } else {
      b_lo = t * P.bpc;
      b_hi = imin64(P.nb, b_lo + P.bpc) - 1;
      c0 = b_lo * P.block;
      c1 = imin64(P.d, (b_hi + 1) * P.block);
    }
    const int64_t w = c1 - c0;
    const int64_t ngroups = insert ? 1 : ceil_div(P.nvec, kVG);
    for (int64_t g = 0; g < ngroups; ++g) {
      const int64_t v0 = g * kVG;
      const int nv = insert ? 2 : (int)imin64(kVG, P.nvec - v0);
      __syncthreads();  // the previous tile / group is done with xs
      for (int64_t e = tid; e < nv * w; e += kThreads) {
        const int u = (int)(e / w);
        const int64_t j = e % w;
        if (insert) {
          const V xv = x[c0 + j];
          xs[u * P.cw + j] = u == 0 ? xv : round_to(xv, G);
        } else {
          xs[u * P.cw + j] = x[(v0 + u) * P.ldx + c0 + j];
        }
      }
      __syncthreads();
      for (int64_t i = row_lo + warp; i < row_hi; i += kWarps) {
        const bool ins = insert && i == P.ir;
        T* Gi = G + i * P.ldg;
        for (int64_t b = b_lo; b <= b_hi; ++b) {
          const int64_t lo = imax64(c0, b * P.block), hi = imin64(c1, (b + 1) * P.block);
          A acc[kVG];
#pragma unroll
          for (int u = 0; u < kVG; ++u) acc[u] = A(0);
          if (!bad) {
            for (int64_t j = lo + lane; j < hi; j += 32) {
              A gv;
              if (ins) {  // the new row: round(x), written as it is used
                const V xr = xs[P.cw + (j - c0)];
                st(Gi + j, xr);
                gv = (A)xr;
              } else {
                gv = (A)ld(Gi + j);
              }
#pragma unroll
              for (int u = 0; u < kVG; ++u)
                if (u < nv) acc[u] += gv * (A)xs[u * P.cw + (j - c0)];
            }
          }
#pragma unroll
          for (int u = 0; u < kVG; ++u) {  // predicated, not broken out of: acc stays in registers
            const double s = warp_sum((double)acc[u]);
            double* dst = insert ? (u == 0 ? P.q : (u == 1 ? P.qr : nullptr)) : P.q;
            if (lane == 0 && u < nv && dst != nullptr) {
              dst += insert ? b * P.r + i : ((v0 + u) * P.nb + b) * P.r + i;
              const double val = bad ? nan : s;
              if (SPLIT)
                atomicAdd(dst, val);
              else
                *dst = val;
            }
          }
        }
      }
    }
  }
}

// =================================================================================================
// combine
// =================================================================================================
struct CombineP {
  int64_t r, d, block, ldg, nvec, ldx, ldo, nb;
  const void* G;
  const void* x;
  const double* c;
  void* out;
  double alpha;
  int64_t ntiles;
};

// grid = min(ceil(d / kCombineCols), kMaxGridX); block = kThreads; smem = kCombineSmem doubles.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) mfac_combine_kernel(const CombineP P) {
  using A = typename Acc<T>::A;
  using V = typename Acc<T>::V;
  constexpr int kVG = 4;
  double* cs = kk::dynamic_smem<double>();
  const T* G = static_cast<const T*>(P.G);
  const V* x = static_cast<const V*>(P.x);
  V* out = static_cast<V*>(P.out);
  const int tid = threadIdx.x;
  for (int64_t t = blockIdx.x; t < P.ntiles; t += gridDim.x) {
    const int64_t c0 = t * kCombineCols, c1 = imin64(P.d, c0 + kCombineCols);
    const int64_t bA = c0 / P.block, bB = (c1 - 1) / P.block;
    const int nbc = (int)(bB - bA + 1);  // <= kCombineCols
    const int64_t j = c0 + tid;
    const bool own = j < c1;
    const int bj = own ? (int)(j / P.block - bA) : 0;
    for (int64_t v0 = 0; v0 < P.nvec; v0 += kVG) {
      const int nv = (int)imin64(kVG, P.nvec - v0);
      const int rc = (int)imax64(1, imin64(P.r, kCombineSmem / (nv * nbc)));  // rows per staged chunk
      double acc[kVG];
#pragma unroll
      for (int u = 0; u < kVG; ++u) acc[u] = 0.0;
      for (int64_t i0 = 0; i0 < P.r; i0 += rc) {
        const int n = (int)imin64(rc, P.r - i0);
        __syncthreads();  // the previous chunk is consumed
        for (int e = tid; e < nv * nbc * n; e += kThreads) {
          const int ii = e % n, bb = (e / n) % nbc, u = e / (n * nbc);
          cs[(u * nbc + bb) * rc + ii] = P.c[((v0 + u) * P.nb + bA + bb) * P.r + i0 + ii];
        }
        __syncthreads();
        if (own) {
          A part[kVG];
#pragma unroll
          for (int u = 0; u < kVG; ++u) part[u] = A(0);
          const T* Gj = G + i0 * P.ldg + j;
#pragma unroll 4
          for (int ii = 0; ii < n; ++ii) {
            const A gv = (A)ld(Gj + ii * P.ldg);
#pragma unroll
            for (int u = 0; u < kVG; ++u)
              if (u < nv) part[u] += (A)cs[(u * nbc + bj) * rc + ii] * gv;
          }
#pragma unroll
          for (int u = 0; u < kVG; ++u) acc[u] += (double)part[u];
        }
      }
      if (own) {
#pragma unroll
        for (int u = 0; u < kVG; ++u) {
          if (u < nv) {
            double o = acc[u];
            if (x != nullptr) o += P.alpha * (double)x[(v0 + u) * P.ldx + j];
            out[(v0 + u) * P.ldo + j] = (V)o;
          }
        }
      }
    }
  }
}

// =================================================================================================
// diag, window_coef
// =================================================================================================
template <typename T>
__global__ void __launch_bounds__(kThreads) mfac_diag_kernel(int64_t r, int64_t d, const T* Z, int64_t ldz,
                                                             double alpha, double beta,
                                                             typename Acc<T>::V* out) {
  using V = typename Acc<T>::V;
  for (int64_t j = (int64_t)blockIdx.x * kThreads + threadIdx.x; j < d; j += (int64_t)gridDim.x * kThreads) {
    double s = 0.0;
    for (int64_t i = 0; i < r; ++i) {
      const double z = (double)ld(Z + i * ldz + j);
      s += z * z;
    }
    out[j] = (V)(alpha + beta * s);
  }
}

// grid = (ceil(m / kWarps) capped, min(nvec, 65535)); a warp per (row k, vector v).
__global__ void __launch_bounds__(kThreads) mfac_coef_kernel(int64_t m, int64_t nvec, double scale, const double* kinv,
                                                             const double* q, double* c) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t v = blockIdx.y; v < nvec; v += gridDim.y)
    for (int64_t k = (int64_t)blockIdx.x * kWarps + warp; k < m; k += (int64_t)gridDim.x * kWarps) {
      double s = 0.0;
      for (int64_t j = lane; j < m; j += 32) s += kinv[k * m + j] * q[v * m + j];
      s = warp_sum(s);
      if (lane == 0) c[v * m + k] = scale * s;
    }
}

// =================================================================================================
// 32 x 32 float64 tile products: acc[q] += sum_{t in [t_lo, t_hi)} A(ty + 8q, t) * B(t, tx)
// =================================================================================================
// As / Bs are the kernel's own __shared__ arrays (so the emulation poisons them); thread (tx, ty) =
// (tid % 32, tid / 32) owns rows ty, ty + 8, ty + 16, ty + 24 of column tx.
template <typename LA, typename LB>
__device__ __forceinline__ void tile_product(double acc[4], double (*As)[kTile + 1], double (*Bs)[kTile + 1],
                                             int64_t t_lo, int64_t t_hi, const LA& la, const LB& lb) {
  const int tid = threadIdx.x, tx = tid % 32, ty = tid / 32;
  for (int64_t t0 = t_lo; t0 < t_hi; t0 += kTile) {
    __syncthreads();  // the previous step is done with As / Bs
    for (int e = tid; e < kTile * kTile; e += kThreads) {
      const int kk = e % kTile, rr = e / kTile;
      const int64_t t = t0 + kk;
      As[kk][rr] = t < t_hi ? la(rr, t) : 0.0;
      Bs[kk][rr] = t < t_hi ? lb(t, rr) : 0.0;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kTile; ++kk) {
      const double bv = Bs[kk][tx];
#pragma unroll
      for (int qq = 0; qq < 4; ++qq) acc[qq] += As[kk][ty + 8 * qq] * bv;
    }
  }
}

// Row-major matrix, ld, rows/cols < lim, zero outside; A(i, t) = M[(i0 + i) * ld + t] ("rows") or
// M[t * ld + i0 + i] ("cols").
struct RowLoad {
  const double* M;
  int64_t ld, i0, lim;
  __device__ double operator()(int i, int64_t t) const {
    return (i0 + i < lim && t < lim) ? M[(i0 + i) * ld + t] : 0.0;
  }
};
struct ColLoad {  // B(t, j) = M[t * ld + j0 + j]
  const double* M;
  int64_t ld, j0, lim;
  __device__ double operator()(int64_t t, int j) const {
    return (j0 + j < lim && t < lim) ? M[t * ld + j0 + j] : 0.0;
  }
};
struct RowLoadT {  // B(t, j) = M[(j0 + j) * ld + t]
  const double* M;
  int64_t ld, j0, lim;
  __device__ double operator()(int64_t t, int j) const {
    return (j0 + j < lim && t < lim) ? M[(j0 + j) * ld + t] : 0.0;
  }
};
struct ColLoadA {  // A(i, t) = M[t * ld + i0 + i]
  const double* M;
  int64_t ld, i0, lim;
  __device__ double operator()(int i, int64_t t) const {
    return (i0 + i < lim && t < lim) ? M[t * ld + i0 + i] : 0.0;
  }
};

// In-place Cholesky of the 32 x 32 tile S (lower triangle used) by the CTA.
__device__ __forceinline__ void chol32(double (*S)[kTile + 1]) {
  const int tid = threadIdx.x;
  for (int k = 0; k < kTile; ++k) {
    __syncthreads();
    if (tid == 0) S[k][k] = sqrt(S[k][k]);
    __syncthreads();
    if (tid > k && tid < kTile) S[tid][k] /= S[k][k];
    __syncthreads();
    for (int e = tid; e < kTile * kTile; e += kThreads) {
      const int i = e / kTile, j = e % kTile;
      if (j > k && j <= i) S[i][j] -= S[i][k] * S[j][k];
    }
  }
  __syncthreads();
}

__device__ __forceinline__ bool skip(const int64_t* flag) {
  return flag != nullptr && *(volatile const int64_t*)flag == 0;
}

// ---- window rebuild (see the header comment); flag: nullptr = always run, else run when *flag != 0 ----
// Panel p, tiles ti = p + blockIdx.x: S = K[ti, p] - L[ti, <p] L[p, <p]^T; diagonal tile -> D.
__global__ void __launch_bounds__(kThreads) rb_panel_kernel(int64_t m, double shift, const double* gram, double* L,
                                                            double* D, int64_t p, const int64_t* flag) {
  __shared__ double As[kTile][kTile + 1];
  __shared__ double Bs[kTile][kTile + 1];
  if (skip(flag)) return;
  const int64_t ti = p + blockIdx.x, k0 = p * kTile;
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  tile_product(acc, As, Bs, 0, k0, RowLoad{L, m, ti * kTile, m}, RowLoadT{L, m, k0, m});
  const int64_t j = k0 + tx;
  for (int qq = 0; qq < 4; ++qq) {
    const int rr = ty + 8 * qq;
    const int64_t i = ti * kTile + rr;
    double k;
    if (i < m && j < m)
      k = (i >= j ? gram[i * m + j] : gram[j * m + i]) + (i == j ? shift : 0.0);
    else
      k = i == j ? 1.0 : 0.0;  // padding: identity
    const double s = k - acc[qq];
    if (ti == p)
      D[rr * kTile + tx] = s;
    else if (i < m && j < m)
      L[i * m + j] = s;
  }
}

// Panel p: factor D (every CTA) and write L[ti, p] = S[ti, p] L_pp^-T (ti > p) or L_pp (ti == p).
__global__ void __launch_bounds__(kThreads) rb_factor_kernel(int64_t m, double* L, const double* D, int64_t p,
                                                             const int64_t* flag) {
  __shared__ double Ls[kTile][kTile + 1];
  __shared__ double Rs[kTile][kTile + 1];
  if (skip(flag)) return;
  const int tid = threadIdx.x;
  const int64_t ti = p + blockIdx.x, k0 = p * kTile;
  for (int e = tid; e < kTile * kTile; e += kThreads) Ls[e / kTile][e % kTile] = D[e];
  chol32(Ls);
  if (ti == p) {
    for (int e = tid; e < kTile * kTile; e += kThreads) {
      const int rr = e / kTile, cc = e % kTile;
      const int64_t i = k0 + rr, j = k0 + cc;
      if (i < m && j < m) L[i * m + j] = cc <= rr ? Ls[rr][cc] : 0.0;
    }
    return;
  }
  for (int e = tid; e < kTile * kTile; e += kThreads) {
    const int rr = e / kTile, cc = e % kTile;
    const int64_t i = ti * kTile + rr, j = k0 + cc;
    Rs[rr][cc] = (i < m && j < m) ? L[i * m + j] : 0.0;
  }
  __syncthreads();
  if (tid < kTile) {  // row tid: x L_pp^T = s, forward over the columns
    for (int cc = 0; cc < kTile; ++cc) {
      double s = Rs[tid][cc];
      for (int c2 = 0; c2 < cc; ++c2) s -= Rs[tid][c2] * Ls[cc][c2];
      Rs[tid][cc] = s / Ls[cc][cc];
    }
  }
  __syncthreads();
  for (int e = tid; e < kTile * kTile; e += kThreads) {
    const int rr = e / kTile, cc = e % kTile;
    const int64_t i = ti * kTile + rr, j = k0 + cc;
    if (i < m && j < m) L[i * m + j] = Rs[rr][cc];
  }
}

// Y = L^-1, panel p (row tile p), tiles tj = blockIdx.x <= p: Y[p, tj] = L_pp^-1 (E - L[p, tj..p-1] Y[tj..p-1, tj]).
__global__ void __launch_bounds__(kThreads) rb_trinv_kernel(int64_t m, const double* L, double* Y, int64_t p,
                                                            const int64_t* flag) {
  __shared__ double As[kTile][kTile + 1];
  __shared__ double Bs[kTile][kTile + 1];
  __shared__ double Ls[kTile][kTile + 1];
  __shared__ double Ts[kTile][kTile + 1];
  if (skip(flag)) return;
  const int tid = threadIdx.x, tx = tid % 32, ty = tid / 32;
  const int64_t tj = blockIdx.x, k0 = p * kTile;
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  tile_product(acc, As, Bs, tj * kTile, k0, RowLoad{L, m, k0, m}, ColLoad{Y, m, tj * kTile, m});
  for (int qq = 0; qq < 4; ++qq) {
    const int rr = ty + 8 * qq;
    Ts[rr][tx] = (k0 + rr == tj * kTile + tx ? 1.0 : 0.0) - acc[qq];
  }
  for (int e = tid; e < kTile * kTile; e += kThreads) {
    const int rr = e / kTile, cc = e % kTile;
    const int64_t i = k0 + rr, j = k0 + cc;
    Ls[rr][cc] = (i < m && j < m) ? (cc <= rr ? L[i * m + j] : 0.0) : (rr == cc ? 1.0 : 0.0);
  }
  __syncthreads();
  if (tid < kTile) {  // column tid: L_pp y = t
    for (int rr = 0; rr < kTile; ++rr) {
      double s = Ts[rr][tid];
      for (int s2 = 0; s2 < rr; ++s2) s -= Ls[rr][s2] * Ts[s2][tid];
      Ts[rr][tid] = s / Ls[rr][rr];
    }
  }
  __syncthreads();
  for (int e = tid; e < kTile * kTile; e += kThreads) {
    const int rr = e / kTile, cc = e % kTile;
    const int64_t i = k0 + rr, j = tj * kTile + cc;
    if (i < m && j < m) Y[i * m + j] = Ts[rr][cc];
  }
}

// W[ti, tj] = sum_{t >= max(ti, tj) * 32} Y[t, i] Y[t, j]  (Y lower triangular: the rest is zero).
__global__ void __launch_bounds__(kThreads) rb_gram_kernel(int64_t m, const double* Y, double* W, const int64_t* flag) {
  __shared__ double As[kTile][kTile + 1];
  __shared__ double Bs[kTile][kTile + 1];
  if (skip(flag)) return;
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int64_t ti = blockIdx.y, tj = blockIdx.x;
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  tile_product(acc, As, Bs, imax64(ti, tj) * kTile, m, ColLoadA{Y, m, ti * kTile, m}, ColLoad{Y, m, tj * kTile, m});
  for (int qq = 0; qq < 4; ++qq) {
    const int64_t i = ti * kTile + ty + 8 * qq, j = tj * kTile + tx;
    if (i < m && j < m) W[i * m + j] = acc[qq];
  }
}

__global__ void __launch_bounds__(kThreads) rb_copy_kernel(int64_t n, const double* src, double* dst,
                                                           const int64_t* flag) {
  if (skip(flag)) return;
  for (int64_t e = (int64_t)blockIdx.x * kThreads + threadIdx.x; e < n; e += (int64_t)gridDim.x * kThreads)
    dst[e] = src[e];
}

// ---- window update ---------------------------------------------------------------------------------
// Workspace: [0, 256) header (flag, coefficients), D (32 x 32), a, bz, wv (m each), L / W (m x m).
struct WinWs {
  int64_t* flag;
  double* coef;  // 1 / a_row, 1 / s
  double* D;
  double *a, *bz, *wv, *W;
};

int64_t align256(int64_t b) { return (b + 255) / 256 * 256; }

int64_t window_ws_bytes(int64_t m) {
  return 256 + align256(8 * kTile * kTile) + 3 * align256(8 * m) + 8 * m * m;
}

WinWs window_ws(void* ws, int64_t m) {
  char* p = static_cast<char*>(ws);
  WinWs w;
  w.flag = reinterpret_cast<int64_t*>(p);
  w.coef = reinterpret_cast<double*>(p + 64);
  p += 256;
  w.D = reinterpret_cast<double*>(p);
  p += align256(8 * kTile * kTile);
  w.a = reinterpret_cast<double*>(p);
  p += align256(8 * m);
  w.bz = reinterpret_cast<double*>(p);
  p += align256(8 * m);
  w.wv = reinterpret_cast<double*>(p);
  p += align256(8 * m);
  w.W = reinterpret_cast<double*>(p);
  return w;
}

// a = kinv[row, :] (= column row: kinv is symmetric) and bz = newcol with bz[row] = 0.
__global__ void __launch_bounds__(kThreads) wu_prep_kernel(int64_t m, int64_t row, const double* kinv,
                                                           const double* newcol, WinWs w) {
  for (int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x; i < m; i += (int64_t)gridDim.x * kThreads) {
    w.a[i] = kinv[row * m + i];
    w.bz[i] = i == row ? 0.0 : newcol[i];
  }
}

// t = kinv bz into wv (a warp per row), and gram's row and column `row` = newcol.
__global__ void __launch_bounds__(kThreads) wu_matvec_kernel(int64_t m, int64_t row, double* gram, const double* kinv,
                                                             const double* newcol, WinWs w) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t k = (int64_t)blockIdx.x * kWarps + warp; k < m; k += (int64_t)gridDim.x * kWarps) {
    double s = 0.0;
    for (int64_t j = lane; j < m; j += 32) s += kinv[k * m + j] * w.bz[j];
    s = warp_sum(s);
    if (lane == 0) {
      w.wv[k] = s;
      gram[row * m + k] = newcol[k];
      gram[k * m + row] = newcol[k];
    }
  }
}

// Sum over the CTA (every thread gets the total); part: kWarps doubles of shared memory.
__device__ __forceinline__ double cta_sum(double s, double* part) {
  s = warp_sum(s);
  __syncthreads();  // part's previous use is done
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = s;
  __syncthreads();
  double t = 0.0;
#pragma unroll
  for (int i = 0; i < kWarps; ++i) t += part[i];
  return t;
}

// One CTA: ab = a . bz, w = P^-1 b = t - a (ab / a_row) (w_row = 0) into wv, s = c - bz . w, the decision
// (flag = 1: rebuild) and the coefficients 1 / a_row, 1 / s.
__global__ void __launch_bounds__(kThreads) wu_coef_kernel(int64_t m, int64_t row, double shift,
                                                           const double* newcol, WinWs w) {
  __shared__ double part[kWarps];
  const double ak = w.a[row];
  double s = 0.0;
  for (int64_t j = threadIdx.x; j < m; j += kThreads) s += w.a[j] * w.bz[j];
  const double r = cta_sum(s, part) / ak;
  double bw = 0.0, bw_abs = 0.0;
  for (int64_t i = threadIdx.x; i < m; i += kThreads) {
    const double wi = i == row ? 0.0 : w.wv[i] - w.a[i] * r;
    w.wv[i] = wi;
    const double p = w.bz[i] * wi;
    bw += p;
    bw_abs += fabs(p);
  }
  bw = cta_sum(bw, part);
  bw_abs = cta_sum(bw_abs, part);
  if (threadIdx.x == 0) {
    const double c = newcol[row] + shift, sc = c - bw;
    const bool ok = ak > 0.0 && is_finite(ak) && sc > 0.0 && is_finite(sc) && is_finite(bw_abs) &&
                    sc > kCancel * (fabs(c) + bw_abs);
    w.flag[0] = ok ? 0 : 1;
    w.coef[0] = 1.0 / ak;
    w.coef[1] = 1.0 / sc;
  }
}

// kinv' (bordering, see the header comment), when the flag is clear.  Every entry is a function of the
// unordered pair (i, j) (the products w_i w_j and a_i a_j commute exactly), so a symmetric kinv stays
// exactly symmetric.
__global__ void __launch_bounds__(kThreads) wu_apply_kernel(int64_t m, int64_t row, double* kinv, WinWs w) {
  if (*(volatile const int64_t*)w.flag != 0) return;
  const double inv_ak = w.coef[0], inv_s = w.coef[1];
  for (int64_t e = (int64_t)blockIdx.x * kThreads + threadIdx.x; e < m * m; e += (int64_t)gridDim.x * kThreads) {
    const int64_t i = e / m, j = e % m;
    double v;
    if (i == row && j == row) {
      v = inv_s;
    } else if (i == row || j == row) {
      v = -w.wv[i == row ? j : i] * inv_s;
    } else {
      const double ww = w.wv[i] * w.wv[j], aa = w.a[i] * w.a[j];
      v = (kinv[e] + ww * inv_s) - aa * inv_ak;
    }
    kinv[e] = v;
  }
}

// =================================================================================================
// static setup
// =================================================================================================
struct StaticP {
  int64_t m, d, block, ldg, ldz, r, B;  // B = min(block, d)
  bool wform;
  double shift;  // m * damp
  const void* G;
  void* Z;
  double* ws;
  int64_t per_block;  // doubles of one block's workspace: n*n (Gram / L) + n*B (solution)
  int64_t n;          // the matrix size of a full block: m (W form) or B (E form)
  int64_t b0;         // the chunk's first block
};

__device__ __forceinline__ int64_t block_width(const StaticP& P, int64_t b) {
  return imin64(P.d, (b + 1) * P.block) - b * P.block;
}

template <typename T>
struct GLoadRows {  // W form: A(i, t) = G[i0 + i, c0 + t] (t < w), i < n
  const T* G;
  int64_t ldg, c0, i0, n, w;
  __device__ double operator()(int i, int64_t t) const {
    return (i0 + i < n && t < w) ? (double)ld(G + (i0 + i) * ldg + c0 + t) : 0.0;
  }
};
template <typename T>
struct GLoadRowsT {  // W form: B(t, j) = G[j0 + j, c0 + t]
  const T* G;
  int64_t ldg, c0, j0, n, w;
  __device__ double operator()(int64_t t, int j) const {
    return (j0 + j < n && t < w) ? (double)ld(G + (j0 + j) * ldg + c0 + t) : 0.0;
  }
};
template <typename T>
struct GLoadCols {  // E form: A(i, s) = G[s, c0 + i0 + i] (i < w, s < m)
  const T* G;
  int64_t ldg, c0, i0, w, m;
  __device__ double operator()(int i, int64_t s) const {
    return (i0 + i < w && s < m) ? (double)ld(G + s * ldg + c0 + i0 + i) : 0.0;
  }
};
template <typename T>
struct GLoadColsB {  // E form: B(s, j) = G[s, c0 + j0 + j]
  const T* G;
  int64_t ldg, c0, j0, w, m;
  __device__ double operator()(int64_t s, int j) const {
    return (j0 + j < w && s < m) ? (double)ld(G + s * ldg + c0 + j0 + j) : 0.0;
  }
};

// grid = (lower tiles of the full-size matrix, blocks of the chunk): the Gram + m damp I, lower tiles.
template <typename T>
__global__ void __launch_bounds__(kThreads) ss_gram_kernel(const StaticP P) {
  __shared__ double As[kTile][kTile + 1];
  __shared__ double Bs[kTile][kTile + 1];
  const int64_t b = P.b0 + blockIdx.y;
  const int64_t w = block_width(P, b), c0 = b * P.block;
  const int64_t n = P.wform ? P.m : w;
  const int64_t nt = ceil_div(n, kTile);
  const int64_t x = blockIdx.x;
  if (x >= nt * (nt + 1) / 2) return;  // a short last block has fewer tiles (uniform over the CTA)
  int64_t ti = (int64_t)((sqrt(8.0 * (double)x + 1.0) - 1.0) / 2.0);
  while (ti * (ti + 1) / 2 > x) --ti;
  while ((ti + 1) * (ti + 2) / 2 <= x) ++ti;
  const int64_t tj = x - ti * (ti + 1) / 2;
  const T* G = static_cast<const T*>(P.G);
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  if (P.wform)
    tile_product(acc, As, Bs, 0, w, GLoadRows<T>{G, P.ldg, c0, ti * kTile, n, w},
                 GLoadRowsT<T>{G, P.ldg, c0, tj * kTile, n, w});
  else
    tile_product(acc, As, Bs, 0, P.m, GLoadCols<T>{G, P.ldg, c0, ti * kTile, w, P.m},
                 GLoadColsB<T>{G, P.ldg, c0, tj * kTile, w, P.m});
  double* K = P.ws + (b - P.b0) * P.per_block;
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  for (int qq = 0; qq < 4; ++qq) {
    const int64_t i = ti * kTile + ty + 8 * qq, j = tj * kTile + tx;
    if (i < n && j < n) K[i * n + j] = acc[qq] + (i == j ? P.shift : 0.0);
  }
}

// A CTA per block of the chunk: in-place right-looking Cholesky of the n x n lower triangle.
__global__ void __launch_bounds__(kThreads) ss_chol_kernel(const StaticP P) {
  const int64_t b = P.b0 + blockIdx.x;
  const int64_t n = P.wform ? P.m : block_width(P, b);
  double* A = P.ws + (b - P.b0) * P.per_block;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  for (int64_t k = 0; k < n; ++k) {
    if (tid == 0) A[k * n + k] = sqrt(A[k * n + k]);
    __syncthreads();
    const double piv = A[k * n + k];
    for (int64_t i = k + 1 + tid; i < n; i += kThreads) A[i * n + k] /= piv;
    __syncthreads();
    for (int64_t i = k + 1 + warp; i < n; i += kWarps) {
      const double lik = A[i * n + k];
      for (int64_t j = k + 1 + lane; j <= i; j += 32) A[i * n + j] -= lik * A[j * n + k];
    }
    __syncthreads();
  }
}

// grid = (ceil(B / kThreads), blocks of the chunk): a thread per column, L z = rhs by forward substitution.
template <typename T>
__global__ void __launch_bounds__(kThreads) ss_solve_kernel(const StaticP P) {
  using V = typename Acc<T>::V;
  __shared__ double Ls[kStage];
  const int64_t b = P.b0 + blockIdx.y;
  const int64_t w = block_width(P, b), c0 = b * P.block;
  const int64_t n = P.wform ? P.m : w;
  const double* L = P.ws + (b - P.b0) * P.per_block;
  double* z = P.ws + (b - P.b0) * P.per_block + P.n * P.n;  // z[i * B + col]
  const T* G = static_cast<const T*>(P.G);
  V* Z = static_cast<V*>(P.Z);
  const int64_t col = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  const bool own = col < w;
  if ((int64_t)blockIdx.x * kThreads >= w) return;  // uniform over the CTA
  for (int64_t i = 0; i < n; ++i) {
    double s = 0.0;
    if (own) s = P.wform ? (double)ld(G + i * P.ldg + c0 + col) : (i == col ? 1.0 : 0.0);
    for (int64_t s0 = 0; s0 < i; s0 += kStage) {
      const int64_t ns = imin64(kStage, i - s0);
      __syncthreads();
      for (int64_t e = threadIdx.x; e < ns; e += kThreads) Ls[e] = L[i * n + s0 + e];
      __syncthreads();
      if (own)
        for (int64_t e = 0; e < ns; ++e) s -= Ls[e] * z[(s0 + e) * P.B + col];
    }
    if (own) z[i * P.B + col] = s / L[i * n + i];
  }
  if (!own) return;
  for (int64_t i = 0; i < P.r; ++i) Z[i * P.ldz + c0 + col] = i < n ? (V)z[i * P.B + col] : V(0);
}

// =================================================================================================
// Host side
// =================================================================================================
using kk::check_launch;  // api_common.cuh
using kk::cuda_call;
using kk::kSizeLimit;
using kk::need_ptr;

kk_status need_ld(const char* fn, int64_t ld, int64_t d, const char* name) {
  return ld >= d ? KK_OK
                 : kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: %s (%lld) must be >= the row width d = %lld", fn, name,
                            (long long)ld, (long long)d);
}

kk_status check_buffer_dtype(const char* fn, kk_dtype dt, const char* name) {
  if (dt != KK_FLOAT32 && dt != KK_BFLOAT16 && dt != KK_FLOAT64)
    return kk::fail(KK_ERR_UNSUPPORTED_DTYPE, "%s: %s %d is not supported (float32, bfloat16, float64 are)", fn, name,
                    (int)dt);
  return KK_OK;
}

kk_status check_sizes(const char* fn, int64_t r, const char* rname, int64_t d, int64_t nvec) {
  if (r < 0 || d < 0 || nvec < 0)
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: %s (%lld), d (%lld) and nvec (%lld) must be >= 0", fn, rname,
                    (long long)r, (long long)d, (long long)nvec);
  if (r > kSizeLimit || d > kSizeLimit || nvec > kSizeLimit)
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: %s = %lld, d = %lld, nvec = %lld is too large", fn, rname, (long long)r,
                    (long long)d, (long long)nvec);
  return KK_OK;
}

kk_status check_block(const char* fn, int64_t block) {
  return block >= 1 ? KK_OK
                    : kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: block must be >= 1, got %lld", fn, (long long)block);
}

kk_status check_damp(const char* fn, double damp) {
  if (!(damp > 0.0) || !is_finite(damp))
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: damp must be finite and > 0, got %g", fn, damp);
  return KK_OK;
}

kk_status check_workspace(const char* fn, const void* ws, int64_t have, int64_t need) {
  if (need <= 0) return KK_OK;
  KK_TRY(need_ptr(fn, ws, "workspace"));
  if (reinterpret_cast<uintptr_t>(ws) % 16 != 0)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: workspace must be 16-byte aligned", fn);
  if (have < need)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: workspace_bytes (%lld) is smaller than the %lld bytes needed", fn,
                    (long long)have, (long long)need);
  return KK_OK;
}

kk_status device_sms(const char* fn, int* sms) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return kk::fail(KK_ERR_CUDA, "%s: cannot query the device: %s", fn, cudaGetErrorString(err));
  if (*sms < 1) *sms = 1;
  return KK_OK;
}

int64_t nblocks(int64_t d, int64_t block) { return d == 0 ? 0 : ceil_div(d, block); }

unsigned grid1(int64_t n) { return (unsigned)imax64(1, imin64(n, kMaxGridX)); }

template <typename F>
kk_status dispatch(kk_dtype dt, F&& f) {
  if (dt == KK_FLOAT64) return f(double{});
  if (dt == KK_BFLOAT16) return f(__nv_bfloat16{});
  return f(float{});
}

std::atomic<unsigned long long> g_insert_seq{0};

// ---- dots plan -------------------------------------------------------------------------------------
struct DotsPlan {
  bool split;
  int64_t cw, bpc, nchunk, ntiles, rows_per_y, ny;
};

DotsPlan dots_plan(int64_t r, int64_t d, int64_t block, int sms) {
  DotsPlan p{};
  const int64_t target = 4 * (int64_t)sms;  // CTAs wanted
  const int64_t nb = nblocks(d, block);
  p.cw = imin64(kCwMax, imax64(kCwMin, ceil_div(ceil_div(d, target), kCwMin) * kCwMin));
  p.split = block > p.cw;
  if (p.split) {
    p.nchunk = ceil_div(imin64(block, d), p.cw);
    p.ntiles = nb * p.nchunk;
    p.bpc = 1;
  } else {
    p.bpc = imax64(1, p.cw / block);
    p.ntiles = ceil_div(nb, p.bpc);
    p.nchunk = 1;
  }
  const int64_t ny = imin64(imin64(imax64(1, ceil_div(target, p.ntiles)), ceil_div(r, kWarps)), kMaxGridY);
  p.rows_per_y = ceil_div(r, imax64(1, ny));
  p.ny = ceil_div(r, p.rows_per_y);
  return p;
}

// ---- window: the rebuild launch sequence (flag: nullptr = unconditional) ---------------------------
kk_status rebuild_launch(const char* fn, int64_t m, double damp, const double* gram, double* kinv, const WinWs& w,
                         const int64_t* flag, cudaStream_t st) {
  const int64_t P = ceil_div(m, kTile);
  const double shift = (double)m * damp;
  for (int64_t p = 0; p < P; ++p) {
    kk::launch(rb_panel_kernel, dim3((unsigned)(P - p)), dim3(kThreads), 0, st, m, shift, gram, w.W, w.D, p, flag);
    kk::launch(rb_factor_kernel, dim3((unsigned)(P - p)), dim3(kThreads), 0, st, m, w.W, (const double*)w.D, p, flag);
  }
  for (int64_t p = 0; p < P; ++p)
    kk::launch(rb_trinv_kernel, dim3((unsigned)(p + 1)), dim3(kThreads), 0, st, m, (const double*)w.W, kinv, p, flag);
  kk::launch(rb_gram_kernel, dim3((unsigned)P, (unsigned)P), dim3(kThreads), 0, st, m, (const double*)kinv, w.W,
             flag);
  kk::launch(rb_copy_kernel, dim3(grid1(ceil_div(m * m, kThreads))), dim3(kThreads), 0, st, m * m,
             (const double*)w.W, kinv, flag);
  return check_launch(fn);
}

// ---- static setup plan -----------------------------------------------------------------------------
struct StaticPlan {
  int64_t r, B, n, nb, per_block, chunk;
  bool wform;
};

// r of mfac.h's kk_mfac_static_rows (that function lives in the CPU library).
int64_t static_rows(int64_t m, int64_t d, int64_t block) {
  if (m <= 0 || d <= 0) return 0;
  const int64_t B = imin64(block, d);
  return m <= B ? m : B;
}

// The workspace bound; the host emulation's tests lower it (KKEMU_MFAC_WS_TARGET, bytes) to reach the
// chunked plan with small problems.
int64_t ws_target() {
#if defined(KK_CUDA_EMU)
  if (const char* e = std::getenv("KKEMU_MFAC_WS_TARGET")) return imax64(1, std::atoll(e));
#endif
  return kWsTarget;
}

StaticPlan static_plan(int64_t m, int64_t d, int64_t block) {
  StaticPlan s{};
  s.r = static_rows(m, d, block);
  if (s.r <= 0) return s;
  s.B = imin64(block, d);
  s.wform = m <= s.B;
  s.n = s.wform ? m : s.B;
  s.nb = nblocks(d, block);
  s.per_block = s.n * s.n + s.n * s.B;
  s.chunk = imax64(1, imin64(imin64(s.nb, kMaxGridY), ws_target() / (8 * s.per_block)));
  return s;
}

}  // namespace

// =================================================================================================
// C ABI
// =================================================================================================
extern "C" {

KK_API kk_status kk_mfac_dots_cuda(kk_dtype gdtype, int64_t r, int64_t d, int64_t block, void* G, int64_t ldg,
                                   int64_t nvec, const void* x, int64_t ldx, int64_t insert_row, double* q,
                                   double* qr, void* stream) {
  static const char* fn = "kk_mfac_dots_cuda";
  kk::clear_error();
  KK_TRY(check_buffer_dtype(fn, gdtype, "gdtype"));
  KK_TRY(check_sizes(fn, r, "r", d, nvec));
  KK_TRY(check_block(fn, block));
  KK_TRY(need_ld(fn, ldg, d, "ldg"));
  if (nvec > 0) KK_TRY(need_ld(fn, ldx, d, "ldx"));
  if (insert_row >= 0) {
    if (nvec != 1)
      return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: insert_row >= 0 needs nvec == 1, got nvec = %lld", fn,
                      (long long)nvec);
    if (insert_row >= r)
      return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: insert_row (%lld) must be < r = %lld", fn, (long long)insert_row,
                      (long long)r);
  }
  const int64_t nb = nblocks(d, block);
  if (nvec == 0 || nb == 0 || r == 0) return KK_OK;  // nothing is read or written
  KK_TRY(need_ptr(fn, G, "G"));
  KK_TRY(need_ptr(fn, x, "x"));
  KK_TRY(need_ptr(fn, q, "q"));
  int sms = 1;
  KK_TRY(device_sms(fn, &sms));
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool insert = insert_row >= 0;
  double* qr_ = insert ? qr : nullptr;
  const DotsPlan pl = dots_plan(r, d, block, sms);
  return dispatch(gdtype, [&](auto t) -> kk_status {
    using T = decltype(t);
    using V = typename Acc<T>::V;
    constexpr int kVG = sizeof(V) == 4 ? 4 : 2;
    DotsP P{};
    P.r = r;
    P.d = d;
    P.block = block;
    P.ldg = ldg;
    P.nvec = nvec;
    P.ldx = ldx;
    P.ir = insert ? insert_row : -1;
    P.nb = nb;
    P.G = G;
    P.x = x;
    P.q = q;
    P.qr = qr_;
    P.cw = pl.cw;
    P.bpc = pl.bpc;
    P.nchunk = pl.nchunk;
    P.ntiles = pl.ntiles;
    P.rows_per_y = pl.rows_per_y;
    if (insert) {
      P.seq = ++g_insert_seq;
      kk::launch(mfac_check_kernel<V>, dim3(grid1(imin64(ceil_div(d, kThreads), 1024))), dim3(kThreads), 0, st,
                 static_cast<const V*>(x), d, P.seq);
      KK_TRY(check_launch(fn));
    }
    if (pl.split) {
      const size_t bytes = (size_t)(nvec * nb * r) * sizeof(double);
      KK_TRY(cuda_call(fn, cudaMemsetAsync(q, 0, bytes, st), "cudaMemsetAsync"));
      if (qr_ != nullptr) KK_TRY(cuda_call(fn, cudaMemsetAsync(qr_, 0, bytes, st), "cudaMemsetAsync"));
    }
    const dim3 grid(grid1(pl.ntiles), (unsigned)pl.ny);
    const size_t smem = (size_t)(kVG * pl.cw) * sizeof(V);
    if (pl.split)
      kk::launch(mfac_dots_kernel<T, true>, grid, dim3(kThreads), smem, st, P);
    else
      kk::launch(mfac_dots_kernel<T, false>, grid, dim3(kThreads), smem, st, P);
    return check_launch(fn);
  });
}

KK_API kk_status kk_mfac_combine_cuda(kk_dtype gdtype, int64_t r, int64_t d, int64_t block, const void* G,
                                      int64_t ldg, int64_t nvec, double alpha, const void* x, int64_t ldx,
                                      const double* c, void* out, int64_t ldo, void* stream) {
  static const char* fn = "kk_mfac_combine_cuda";
  kk::clear_error();
  KK_TRY(check_buffer_dtype(fn, gdtype, "gdtype"));
  KK_TRY(check_sizes(fn, r, "r", d, nvec));
  KK_TRY(check_block(fn, block));
  KK_TRY(need_ld(fn, ldg, d, "ldg"));
  if (nvec > 0) {
    KK_TRY(need_ld(fn, ldo, d, "ldo"));
    if (x != nullptr) KK_TRY(need_ld(fn, ldx, d, "ldx"));
  }
  if (!is_finite(alpha)) return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: alpha must be finite, got %g", fn, alpha);
  const int64_t nb = nblocks(d, block);
  if (nvec == 0 || d == 0) return KK_OK;
  if (r > 0) {
    KK_TRY(need_ptr(fn, G, "G"));
    KK_TRY(need_ptr(fn, c, "c"));
  }
  KK_TRY(need_ptr(fn, out, "out"));
  if (x != nullptr && x != out) {
    const int64_t es = gdtype == KK_FLOAT64 ? 8 : 4;
    const char* xb = static_cast<const char*>(x);
    const char* ob = static_cast<const char*>(out);
    const int64_t xspan = ((nvec - 1) * ldx + d) * es, ospan = ((nvec - 1) * ldo + d) * es;
    if (xb < ob + ospan && ob < xb + xspan)
      return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: out overlaps x without being x itself", fn);
  } else if (x != nullptr && ldx != ldo) {
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: out may alias x only with ldo == ldx (%lld != %lld)", fn,
                    (long long)ldo, (long long)ldx);
  }
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch(gdtype, [&](auto t) -> kk_status {
    using T = decltype(t);
    CombineP P{};
    P.r = r;
    P.d = d;
    P.block = block;
    P.ldg = ldg;
    P.nvec = nvec;
    P.ldx = ldx;
    P.ldo = ldo;
    P.nb = nb;
    P.G = G;
    P.x = x;
    P.c = c;
    P.out = out;
    P.alpha = alpha;
    P.ntiles = ceil_div(d, kCombineCols);
    kk::launch(mfac_combine_kernel<T>, dim3(grid1(P.ntiles)), dim3(kThreads), (size_t)kCombineSmem * sizeof(double),
               st, P);
    return check_launch(fn);
  });
}

KK_API kk_status kk_mfac_diag_cuda(kk_dtype zdtype, int64_t r, int64_t d, const void* Z, int64_t ldz, double alpha,
                                   double beta, void* out, void* stream) {
  static const char* fn = "kk_mfac_diag_cuda";
  kk::clear_error();
  KK_TRY(check_buffer_dtype(fn, zdtype, "zdtype"));
  KK_TRY(check_sizes(fn, r, "r", d, 0));
  KK_TRY(need_ld(fn, ldz, d, "ldz"));
  if (!is_finite(alpha) || !is_finite(beta))
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: alpha and beta must be finite, got %g, %g", fn, alpha, beta);
  if (d == 0) return KK_OK;
  if (r > 0) KK_TRY(need_ptr(fn, Z, "Z"));
  KK_TRY(need_ptr(fn, out, "out"));
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch(zdtype, [&](auto t) -> kk_status {
    using T = decltype(t);
    using V = typename Acc<T>::V;
    kk::launch(mfac_diag_kernel<T>, dim3(grid1(ceil_div(d, kThreads))), dim3(kThreads), 0, st, r, d,
               static_cast<const T*>(Z), ldz, alpha, beta, static_cast<V*>(out));
    return check_launch(fn);
  });
}

KK_API kk_status kk_mfac_static_setup_cuda_workspace_size(kk_dtype gdtype, int64_t m, int64_t d, int64_t block,
                                                          int64_t* bytes) {
  static const char* fn = "kk_mfac_static_setup_cuda_workspace_size";
  kk::clear_error();
  KK_TRY(need_ptr(fn, bytes, "bytes"));
  KK_TRY(check_buffer_dtype(fn, gdtype, "gdtype"));
  KK_TRY(check_sizes(fn, m, "m", d, 0));
  KK_TRY(check_block(fn, block));
  const StaticPlan s = static_plan(m, d, block);
  *bytes = s.r > 0 ? 8 * s.chunk * s.per_block : 0;
  return KK_OK;
}

KK_API kk_status kk_mfac_static_setup_cuda(kk_dtype gdtype, int64_t m, int64_t d, int64_t block, const void* G,
                                           int64_t ldg, double damp, void* Z, int64_t ldz, void* workspace,
                                           int64_t workspace_bytes, void* stream) {
  static const char* fn = "kk_mfac_static_setup_cuda";
  kk::clear_error();
  KK_TRY(check_buffer_dtype(fn, gdtype, "gdtype"));
  KK_TRY(check_sizes(fn, m, "m", d, 0));
  KK_TRY(check_block(fn, block));
  KK_TRY(need_ld(fn, ldg, d, "ldg"));
  KK_TRY(need_ld(fn, ldz, d, "ldz"));
  KK_TRY(check_damp(fn, damp));
  const StaticPlan s = static_plan(m, d, block);
  if (s.r == 0) return KK_OK;
  KK_TRY(need_ptr(fn, G, "G"));
  KK_TRY(need_ptr(fn, Z, "Z"));
  if (Z == G && (gdtype == KK_BFLOAT16 || ldz != ldg))
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: Z may be G only for a float32 / float64 G with ldz == ldg", fn);
  KK_TRY(check_workspace(fn, workspace, workspace_bytes, 8 * s.chunk * s.per_block));
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch(gdtype, [&](auto t) -> kk_status {
    using T = decltype(t);
    StaticP P{};
    P.m = m;
    P.d = d;
    P.block = block;
    P.ldg = ldg;
    P.ldz = ldz;
    P.r = s.r;
    P.B = s.B;
    P.wform = s.wform;
    P.shift = (double)m * damp;
    P.G = G;
    P.Z = Z;
    P.ws = static_cast<double*>(workspace);
    P.per_block = s.per_block;
    P.n = s.n;
    const int64_t nt = ceil_div(s.n, kTile);
    for (int64_t b0 = 0; b0 < s.nb; b0 += s.chunk) {
      const int64_t nblk = imin64(s.chunk, s.nb - b0);
      P.b0 = b0;
      kk::launch(ss_gram_kernel<T>, dim3(grid1(nt * (nt + 1) / 2), (unsigned)nblk), dim3(kThreads), 0, st, P);
      kk::launch(ss_chol_kernel, dim3((unsigned)nblk), dim3(kThreads), 0, st, P);
      kk::launch(ss_solve_kernel<T>, dim3(grid1(ceil_div(s.B, kThreads)), (unsigned)nblk), dim3(kThreads), 0, st, P);
      KK_TRY(check_launch(fn));
    }
    return KK_OK;
  });
}

KK_API kk_status kk_mfac_window_cuda_workspace_size(int64_t m, int64_t* bytes) {
  static const char* fn = "kk_mfac_window_cuda_workspace_size";
  kk::clear_error();
  KK_TRY(need_ptr(fn, bytes, "bytes"));
  if (m < 0 || m > (int64_t(1) << 20))
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: m must be in 0..2^20, got %lld", fn, (long long)m);
  *bytes = m > 0 ? window_ws_bytes(m) : 0;
  return KK_OK;
}

KK_API kk_status kk_mfac_window_update_cuda(int64_t m, double damp, double* gram, double* kinv, int64_t row,
                                            const double* newcol, void* workspace, int64_t workspace_bytes,
                                            void* stream) {
  static const char* fn = "kk_mfac_window_update_cuda";
  kk::clear_error();
  if (m < 1 || m > (int64_t(1) << 20))
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: m must be in 1..2^20, got %lld", fn, (long long)m);
  KK_TRY(check_damp(fn, damp));
  if (row < 0 || row >= m)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: row must be in [0, m = %lld), got %lld", fn, (long long)m,
                    (long long)row);
  KK_TRY(need_ptr(fn, gram, "gram"));
  KK_TRY(need_ptr(fn, kinv, "kinv"));
  KK_TRY(need_ptr(fn, newcol, "newcol"));
  KK_TRY(check_workspace(fn, workspace, workspace_bytes, window_ws_bytes(m)));
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const WinWs w = window_ws(workspace, m);
  const unsigned gw = grid1(ceil_div(m, kWarps)), gt = grid1(ceil_div(m, kThreads));
  kk::launch(wu_prep_kernel, dim3(gt), dim3(kThreads), 0, st, m, row, (const double*)kinv, newcol, w);
  kk::launch(wu_matvec_kernel, dim3(gw), dim3(kThreads), 0, st, m, row, gram, (const double*)kinv, newcol, w);
  kk::launch(wu_coef_kernel, dim3(1), dim3(kThreads), 0, st, m, row, (double)m * damp, newcol, w);
  kk::launch(wu_apply_kernel, dim3(grid1(ceil_div(m * m, kThreads))), dim3(kThreads), 0, st, m, row, kinv, w);
  KK_TRY(check_launch(fn));
  return rebuild_launch(fn, m, damp, gram, kinv, w, w.flag, st);
}

KK_API kk_status kk_mfac_window_rebuild_cuda(int64_t m, double damp, const double* gram, double* kinv, void* workspace,
                                             int64_t workspace_bytes, void* stream) {
  static const char* fn = "kk_mfac_window_rebuild_cuda";
  kk::clear_error();
  if (m < 0 || m > (int64_t(1) << 20))
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: m must be in 0..2^20, got %lld", fn, (long long)m);
  KK_TRY(check_damp(fn, damp));
  if (m == 0) return KK_OK;
  KK_TRY(need_ptr(fn, gram, "gram"));
  KK_TRY(need_ptr(fn, kinv, "kinv"));
  if (static_cast<const void*>(gram) == static_cast<const void*>(kinv))
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: kinv must not be gram", fn);
  KK_TRY(check_workspace(fn, workspace, workspace_bytes, window_ws_bytes(m)));
  const WinWs w = window_ws(workspace, m);
  return rebuild_launch(fn, m, damp, gram, kinv, w, nullptr, static_cast<cudaStream_t>(stream));
}

KK_API kk_status kk_mfac_window_coef_cuda(int64_t m, int64_t nvec, double scale, const double* kinv, const double* q,
                                          double* c, void* stream) {
  static const char* fn = "kk_mfac_window_coef_cuda";
  kk::clear_error();
  if (m < 0 || nvec < 0 || m > (int64_t(1) << 20) || nvec > kSizeLimit)
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: m (%lld) and nvec (%lld) must be >= 0 (m <= 2^20)", fn, (long long)m,
                    (long long)nvec);
  if (!is_finite(scale)) return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: scale must be finite, got %g", fn, scale);
  if (m == 0 || nvec == 0) return KK_OK;
  KK_TRY(need_ptr(fn, kinv, "kinv"));
  KK_TRY(need_ptr(fn, q, "q"));
  KK_TRY(need_ptr(fn, c, "c"));
  if (c < q + nvec * m && q < c + nvec * m)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: c must not overlap q", fn);
  kk::launch(mfac_coef_kernel, dim3(grid1(ceil_div(m, kWarps)), (unsigned)imin64(nvec, kMaxGridY)), dim3(kThreads), 0,
             static_cast<cudaStream_t>(stream), m, nvec, scale, kinv, q, c);
  return check_launch(fn);
}

}  // extern "C"
