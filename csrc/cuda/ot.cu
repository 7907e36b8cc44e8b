/*
 * Entropic optimal transport on CUDA: log-domain Sinkhorn half-steps and the pieces of the
 * Sinkhorn-Newton-Sparse solver (Tang et al., ICLR 2024, Algorithm 1).  C ABI, conventions and the
 * math of every op: csrc/include/kernelkit/ot.h.  Per problem b (blockIdx.y, looping past 65535):
 *
 *   P_ij = exp((f_i + g_j - C_ij) / reg),   C (n, m) a dense matrix or computed from points x (n, D), y (m, D)
 *   sinkhorn_step  s_k = LSE_l((other_l - C_kl) / reg),  pot_new_k = reg (log w_k - s_k),  err = ||exp(pot/reg + s) - w||
 *   marginals      r = P wc, c = P^T wr, obj = <a, f> + <b, g> - reg sum P
 *   plan           P;   sparsify: per row the k largest keys g_j - C_ij;   points_grad: sum_ij W_ij dC
 *   hvp / cg       (diag(r) + shift, S; S^T, diag(c) + shift) v, and Jacobi-preconditioned CG on it
 *
 * T is float or double; the exponent, the cost and the per-lane sums are in T (expf / exp, no fast
 * math, no TF32), block and problem reductions (errors, objective, CG dot products) in double.
 * Every product of sizes is formed in int64.
 *
 * Row engine (ot_rows_kernel<T, OP, PTS>): a CTA of 8 warps owns 8 output rows k (warp w: row
 * 8*blk + w) and sweeps the reduced index l in tiles of 32 (lane = column of the tile), so a dense
 * row-major C is read coalesced along j.  OP_LSE keeps an online log-sum-exp per lane (running max
 * + rescaled sum, merged over the warp by shuffles), OP_SUM plain sums of P (and of P * weight),
 * OP_GRAD the point gradient.  With point clouds (PTS) the 8 rows' coordinates and the 32 tile
 * columns' coordinates are staged in shared memory in chunks of 32 coordinates (D up to 1024:
 * loop the chunks), so each column's coordinates are read from global memory once per 8 rows, and
 * the cost is never stored.  The column direction of a point cloud problem is the same kernel on
 * the swapped clouds (every cost kind is symmetric): sinkhorn axis 1, the c marginal and dy.
 * Column engine (ot_cols_kernel<T, OP>, dense C only: axis 1 and c): a CTA owns 32 columns (lane =
 * column, coalesced along j) and its 8 warps stride the rows with per-column online states, merged
 * through shared memory.  Neither engine needs a workspace; the per-problem error / objective is a
 * block reduction plus one atomic per CTA into the zeroed output (L2: a sqrt kernel afterwards; inf
 * norm: atomicMax on the bit pattern of a non-negative value).
 *
 * OP_GRAD, per tile: the 32 x 8 scalar weights wt = P (s + u + v) dC-factor go to shared memory;
 * then lane t of warp w adds sum_l wt[w][l] h(x_kt - y_lt) onto dpts[k, t] for the tile (the warp
 * owns row k, so plain read-modify-writes: no atomics; dpts is zeroed first).
 *
 * sparsify (ot_sparsify_kernel<T>): a CTA per row.  Radix select (8-bit digits, 4 passes for
 * float32, 8 for float64, a 256-bin shared histogram each, the bin found by one warp's scan) on
 * the order-preserving integer of key = g_j - C_ij (NaN -> -inf, -0 -> +0) finds the k-th largest
 * key K*; then one ordered pass over the columns keeps key > K* and the first (k - #greater) columns
 * with key == K* (the tie rule), with block-wide ballot scans giving each kept column its slot, so
 * the output comes out in increasing column order.  The cost is recomputed in every pass.
 *
 * hvp: ot_hvp_init_kernel sets yy = c vy + shift vy; ot_hvp_rows_kernel (a warp per row) writes
 * yx = r vx + S vy + shift vx and scatters S^T vx into yy with atomics (T).  cg: the host loop of
 * ot.h (kernels per iteration: hvp (2), <p, q>, z/r update with <r, r> and <r, s>, a per-problem
 * scalar step, p update); per-problem convergence flags in the workspace are read back every
 * kCgCheck iterations; finished problems are skipped by every kernel.
 *
 * Not tuned (unmeasured on a GPU yet): the column engine has m / 32 CTAs per problem (low occupancy
 * for small m and batch 1), sparsify recomputes point costs in every radix pass, and the point
 * gradient re-stages the coordinate chunks when D > 32.
 */
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../cpu/status.h"
#include "api_common.cuh"
#include "common.cuh"
#include "kernelkit/ot.h"

namespace {

using kk::ceil_div;
using kk::imax64;
using kk::imin64;

constexpr unsigned kFull = 0xffffffffu;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 32;  // columns per tile (a lane each)
constexpr int kDC = 32;    // point coordinates per staged chunk
constexpr int kMaxGrid = 65535;
constexpr int kCgCheck = 4;  // cg: read the convergence flags back every kCgCheck iterations

enum { OP_LSE = 0, OP_SUM = 1, OP_GRAD = 2 };

// ---- math in T ------------------------------------------------------------------------------------
__device__ __forceinline__ float xexp(float v) { return expf(v); }
__device__ __forceinline__ double xexp(double v) { return exp(v); }
__device__ __forceinline__ float xlog(float v) { return logf(v); }
__device__ __forceinline__ double xlog(double v) { return log(v); }
__device__ __forceinline__ float xpow(float a, float b) { return powf(a, b); }
__device__ __forceinline__ double xpow(double a, double b) { return pow(a, b); }
__device__ __forceinline__ float xsqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double xsqrt(double v) { return sqrt(v); }
__device__ __forceinline__ float xabs(float v) { return fabsf(v); }
__device__ __forceinline__ double xabs(double v) { return fabs(v); }
template <typename T>
__device__ __forceinline__ T ninf() { return -static_cast<T>(INFINITY); }
template <typename T>
__device__ __forceinline__ T tiny();
template <>
__device__ __forceinline__ float tiny<float>() { return 1.17549435e-38f; }
template <>
__device__ __forceinline__ double tiny<double>() { return 2.2250738585072014e-308; }

// The cost as the kernels see it (pointers already typed).
template <typename T>
struct CostD {
  int kind, dim;
  T p;
  const T* mat;
  int64_t ld, bs;
  const T* x;
  int64_t xbs;
  const T* y;
  int64_t ybs;
};

// One coordinate's term of a point cost and the cost from the sum of the terms.
template <typename T>
__device__ __forceinline__ T coord_term(int kind, T p, T d) {
  if (kind != KK_OT_COST_MINKOWSKI_POW || p == T(2)) return d * d;
  const T a = xabs(d);
  return p == T(1) ? a : xpow(a, p);
}
template <typename T>
__device__ __forceinline__ T finish_cost(int kind, T p, T acc) {
  if (kind != KK_OT_COST_EUCLIDEAN_POW || p == T(2)) return acc;
  return p == T(1) ? xsqrt(acc) : xpow(acc, p / T(2));
}
// dC/d(first point) = factor * h(first - second) per coordinate (the subgradient 0 where undefined).
template <typename T>
__device__ __forceinline__ T grad_factor(int kind, T p, T acc) {
  if (kind == KK_OT_COST_SQEUCLIDEAN) return T(2);
  if (kind == KK_OT_COST_MINKOWSKI_POW) return p;
  return acc > T(0) ? p * xpow(acc, p / T(2) - T(1)) : T(0);
}
template <typename T>
__device__ __forceinline__ T grad_h(int kind, T p, T d) {
  if (kind != KK_OT_COST_MINKOWSKI_POW || p == T(2)) return d;
  if (d == T(0)) return T(0);
  const T s = d > T(0) ? T(1) : T(-1);
  return p == T(1) ? s : s * xpow(xabs(d), p - T(1));
}

// C_ij read (dense) or computed from global memory (points): the paths that touch each entry once.
template <typename T>
__device__ __forceinline__ T cost_at(const CostD<T>& c, int64_t b, int64_t i, int64_t j) {
  if (c.kind == KK_OT_COST_MATRIX) return c.mat[b * c.bs + i * c.ld + j];
  const T* xi = c.x + b * c.xbs + i * c.dim;
  const T* yj = c.y + b * c.ybs + j * c.dim;
  T acc = 0;
  for (int t = 0; t < c.dim; ++t) acc += coord_term(c.kind, c.p, xi[t] - yj[t]);
  return finish_cost(c.kind, c.p, acc);
}

// Online log-sum-exp state: M the running max, S = sum exp(z - M).
template <typename T>
__device__ __forceinline__ void lse_push(T& M, T& S, T z) {
  if (z > M) {
    S = S * xexp(M - z) + T(1);
    M = z;
  } else if (z != ninf<T>()) {
    S += xexp(z - M);
  }
}
template <typename T>
__device__ __forceinline__ void lse_merge(T& M, T& S, T M2, T S2) {
  if (M2 > M) {
    S = S * xexp(M - M2) + S2;
    M = M2;
  } else if (M2 != ninf<T>()) {
    S += S2 * xexp(M2 - M);
  }
}

// Sum (or max) of one double per thread over the block; the result in thread 0.  `red` holds kWarps.
__device__ __forceinline__ double block_reduce(double v, bool is_max, double* red) {
  for (int o = 16; o > 0; o >>= 1) {
    const double u = __shfl_xor_sync(kFull, v, o);
    v = is_max ? (u > v ? u : v) : v + u;
  }
  __syncthreads();  // red may still be read by a previous reduction
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  double t = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kWarps; ++w) t = is_max ? (red[w] > t ? red[w] : t) : t + red[w];
  return t;
}

template <typename T>
__device__ __forceinline__ void atomic_max_nonneg(T* p, T v);
template <>
__device__ __forceinline__ void atomic_max_nonneg<float>(float* p, float v) {
  atomicMax(reinterpret_cast<unsigned*>(p), __float_as_uint(v));
}
template <>
__device__ __forceinline__ void atomic_max_nonneg<double>(double* p, double v) {
  atomicMax(reinterpret_cast<unsigned long long*>(p), (unsigned long long)__double_as_longlong(v));
}

// Adds one output index's error term to the problem's (norm: KK_OT_NORM_*): |e|, e^2 or max |e|.
template <typename T>
__device__ __forceinline__ double err_term(T pot, T s, T w, T inv_reg, int norm) {
  const T marg = pot == ninf<T>() ? T(0) : xexp(pot * inv_reg + s);
  const double e = (double)xabs(marg - w);
  return norm == KK_OT_NORM_L2 ? e * e : e;
}
template <typename T>
__device__ __forceinline__ void err_commit(T* err, double total, int norm) {
  if (norm == KK_OT_NORM_INF)
    atomic_max_nonneg(err, (T)total);
  else
    atomicAdd(err, (T)total);
}

// =================================================================================================
// Row engine
// =================================================================================================
template <typename T>
struct RowP {
  CostD<T> cost;
  int swap;                 // points: the output rows are y (the column direction)
  int64_t batch, nr, nc;    // output rows, reduced columns
  T inv_reg, reg;
  const T* w;               // LSE: weights of the output rows
  const T* pr;              // potentials of the output rows (LSE: pot, may be NULL; SUM / GRAD: f or g)
  const T* pc;              // potentials of the reduced index (LSE: other)
  const T* wc;              // SUM: column weights (NULL: ones)
  const T* scale;           // GRAD: per problem (NULL: 1)
  const T* ur;              // GRAD: u of the rows (NULL: 0)
  const T* uc;              // GRAD: v of the columns (NULL: 0)
  T* out;                   // LSE: pot_new; SUM: r or c (may be NULL); GRAD: dpts (nr, dim), zeroed
  T* acc;                   // LSE: err (zeroed); SUM: obj (holds <a,f> + <b,g>), may be NULL
  int err_norm;
};

// grid = (min(ceil(nr / 8), 65535), min(batch, 65535)), block = 256, no dynamic smem.
template <typename T, int OP, bool PTS>
__global__ void __launch_bounds__(kThreads, 1) ot_rows_kernel(const RowP<T> P) {
  __shared__ T xs[kWarps][kDC];      // PTS: the CTA's 8 rows, one coordinate chunk
  __shared__ T ys[kTile][kDC + 1];   // PTS: the tile's 32 columns, same chunk (+1: no bank conflicts)
  __shared__ T wt[kWarps][kTile];    // GRAD: the tile's weights
  __shared__ double red[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const CostD<T>& C = P.cost;
  const int D = PTS ? C.dim : 0;
  const int nchunk = PTS ? (D + kDC - 1) / kDC : 0;
  const T* rpts = PTS ? (P.swap ? C.y : C.x) : nullptr;
  const T* cpts = PTS ? (P.swap ? C.x : C.y) : nullptr;
  const int64_t rbs = P.swap ? C.ybs : C.xbs, cbs = P.swap ? C.xbs : C.ybs;
  const int64_t nrb = ceil_div(P.nr, kWarps);
  for (int64_t b = blockIdx.y; b < P.batch; b += gridDim.y) {
    for (int64_t rb = blockIdx.x; rb < nrb; rb += gridDim.x) {
      const int64_t k = rb * kWarps + warp;
      const bool rv = k < P.nr;
      const int64_t kb = b * P.nr + k;
      const T prk = (OP != OP_LSE && rv) ? P.pr[kb] : T(0);
      const T urk = (OP == OP_GRAD && rv && P.ur != nullptr) ? P.ur[kb] : T(0);
      const T sck = (OP == OP_GRAD && P.scale != nullptr) ? P.scale[b] : T(1);
      T M = ninf<T>(), S = 0;  // LSE state; SUM: M unused, S = sum P * wc, S0 = sum P
      T S0 = 0;
      // stage coordinate chunk ch of the CTA's rows and of the tile at l0 (every thread)
      auto stage = [&](int64_t l0, int ch) {
        const int t0 = ch * kDC;
        {
          const int rw = threadIdx.x / kDC, t = threadIdx.x % kDC;
          const int64_t kr = rb * kWarps + rw;
          xs[rw][t] = (kr < P.nr && t0 + t < D) ? rpts[b * rbs + kr * D + t0 + t] : T(0);
        }
        for (int e = threadIdx.x; e < kTile * kDC; e += kThreads) {
          const int ll = e / kDC, t = e % kDC;
          ys[ll][t] = (l0 + ll < P.nc && t0 + t < D) ? cpts[b * cbs + (l0 + ll) * D + t0 + t] : T(0);
        }
      };
      for (int64_t l0 = 0; l0 < P.nc; l0 += kTile) {
        const int64_t l = l0 + lane;
        const bool v = rv && l < P.nc;
        T c = 0, facc = 0;
        if (PTS) {
          for (int ch = 0; ch < nchunk; ++ch) {
            stage(l0, ch);
            __syncthreads();
            if (v) {
              const int cnt = min(kDC, D - ch * kDC);
              for (int t = 0; t < cnt; ++t) facc += coord_term(C.kind, C.p, xs[warp][t] - ys[lane][t]);
            }
            __syncthreads();
          }
          c = finish_cost(C.kind, C.p, facc);
        } else if (v) {
          c = C.mat[b * C.bs + k * C.ld + l];
        }
        if constexpr (OP == OP_LSE) {
          if (v) lse_push(M, S, (P.pc[b * P.nc + l] - c) * P.inv_reg);
        } else if constexpr (OP == OP_SUM) {
          if (v) {
            const T pe = xexp((prk + P.pc[b * P.nc + l] - c) * P.inv_reg);
            S0 += pe;
            S += P.wc != nullptr ? pe * P.wc[b * P.nc + l] : pe;
          }
        } else {  // OP_GRAD
          T wv = 0;
          if (v) {
            const T pe = xexp((prk + P.pc[b * P.nc + l] - c) * P.inv_reg);
            const T ucl = P.uc != nullptr ? P.uc[b * P.nc + l] : T(0);
            if (pe != T(0)) wv = pe * (sck + urk + ucl) * grad_factor(C.kind, C.p, facc);
          }
          wt[warp][lane] = wv;
          const int ntile = (int)imin64(kTile, P.nc - l0);
          for (int ch = 0; ch < nchunk; ++ch) {
            if (nchunk > 1) stage(l0, ch);  // one chunk: still staged from the cost pass
            __syncthreads();                // wt (and the re-staged chunk) visible
            const int t = ch * kDC + lane;
            if (rv && t < D) {
              const T xt = xs[warp][lane];
              T g = 0;
              for (int ll = 0; ll < ntile; ++ll) g += wt[warp][ll] * grad_h(C.kind, C.p, xt - ys[ll][lane]);
              P.out[kb * D + t] += g;
            }
            __syncthreads();  // before the next staging / wt store
          }
        }
      }
      // ---- finish the row: merge the lanes, write, reduce the problem's error / objective
      if constexpr (OP == OP_LSE) {
        for (int o = 16; o > 0; o >>= 1) {
          const T M2 = __shfl_xor_sync(kFull, M, o), S2 = __shfl_xor_sync(kFull, S, o);
          lse_merge(M, S, M2, S2);
        }
        double e = 0;
        if (rv && lane == 0) {
          const T s = M == ninf<T>() ? M : M + xlog(S);
          const T wk = P.w[kb];
          if (P.pr != nullptr) e = err_term(P.pr[kb], s, wk, P.inv_reg, P.err_norm);  // before the write: aliasing
          P.out[kb] = wk > T(0) ? P.reg * (xlog(wk > tiny<T>() ? wk : tiny<T>()) - s) : ninf<T>();
        }
        if (P.acc != nullptr) {  // block-uniform
          const double tot = block_reduce(e, P.err_norm == KK_OT_NORM_INF, red);
          if (threadIdx.x == 0) err_commit(P.acc + b, tot, P.err_norm);
        }
      } else if constexpr (OP == OP_SUM) {
        for (int o = 16; o > 0; o >>= 1) {
          S += __shfl_xor_sync(kFull, S, o);
          S0 += __shfl_xor_sync(kFull, S0, o);
        }
        if (rv && lane == 0 && P.out != nullptr) P.out[kb] = S;
        if (P.acc != nullptr) {
          const double tot = block_reduce((rv && lane == 0) ? (double)S0 : 0.0, false, red);
          if (threadIdx.x == 0) atomicAdd(P.acc + b, (T)(-(double)P.reg * tot));
        }
      }
    }
  }
}

// =================================================================================================
// Column engine (dense C): output index j = a column, reduced over the rows i.
// =================================================================================================
// grid = (min(ceil(nr / 32), 65535), min(batch, 65535)), block = 256 (32 columns x 8 row strides).
template <typename T, int OP>
__global__ void __launch_bounds__(kThreads, 1) ot_cols_kernel(const RowP<T> P) {
  __shared__ T s0[kWarps][kTile];
  __shared__ T s1[kWarps][kTile];
  __shared__ double red[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const CostD<T>& C = P.cost;
  const int64_t ntb = ceil_div(P.nr, kTile);
  for (int64_t b = blockIdx.y; b < P.batch; b += gridDim.y) {
    for (int64_t tb = blockIdx.x; tb < ntb; tb += gridDim.x) {
      const int64_t j = tb * kTile + lane;
      const bool jv = j < P.nr;
      const int64_t jb = b * P.nr + j;
      const T prj = (OP == OP_SUM && jv) ? P.pr[jb] : T(0);
      T M = ninf<T>(), S = 0;
      if (jv) {
        const T* col = C.mat + b * C.bs + j;
        for (int64_t i = warp; i < P.nc; i += kWarps) {
          const T c = col[i * C.ld];
          if (OP == OP_LSE) {
            lse_push(M, S, (P.pc[b * P.nc + i] - c) * P.inv_reg);
          } else {
            const T pe = xexp((P.pc[b * P.nc + i] + prj - c) * P.inv_reg);
            S += P.wc != nullptr ? pe * P.wc[b * P.nc + i] : pe;
          }
        }
      }
      s0[warp][lane] = M;
      s1[warp][lane] = S;
      __syncthreads();
      double e = 0;
      if (warp == 0) {
        M = s0[0][lane];
        S = s1[0][lane];
        for (int w = 1; w < kWarps; ++w) {
          if (OP == OP_LSE)
            lse_merge(M, S, s0[w][lane], s1[w][lane]);
          else
            S += s1[w][lane];
        }
        if (jv) {
          if (OP == OP_LSE) {
            const T s = M == ninf<T>() ? M : M + xlog(S);
            const T wj = P.w[jb];
            if (P.pr != nullptr) e = err_term(P.pr[jb], s, wj, P.inv_reg, P.err_norm);
            P.out[jb] = wj > T(0) ? P.reg * (xlog(wj > tiny<T>() ? wj : tiny<T>()) - s) : ninf<T>();
          } else {
            P.out[jb] = S;
          }
        }
      }
      if (OP == OP_LSE && P.acc != nullptr) {
        const double tot = block_reduce(e, P.err_norm == KK_OT_NORM_INF, red);
        if (threadIdx.x == 0) err_commit(P.acc + b, tot, P.err_norm);
      }
      __syncthreads();  // s0 / s1 reused by the next tile
    }
  }
}

// err = sqrt(err) (L2 norm) per problem.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) ot_sqrt_kernel(T* err, int64_t batch) {
  for (int64_t b = (int64_t)blockIdx.x * kThreads + threadIdx.x; b < batch; b += (int64_t)gridDim.x * kThreads)
    err[b] = xsqrt(err[b]);
}

// obj[b] = sum_i a_i f_i + sum_j b_j g_j (a zero weight contributes 0, whatever the potential).
// grid = (1, min(batch, 65535)).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) ot_obj_init_kernel(int64_t batch, int64_t n, int64_t m, const T* a,
                                                               const T* f, const T* bw, const T* g, T* obj) {
  __shared__ double red[kWarps];
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    double s = 0;
    for (int64_t e = threadIdx.x; e < n + m; e += kThreads) {
      const T w = e < n ? a[b * n + e] : bw[b * m + (e - n)];
      const T p = e < n ? f[b * n + e] : g[b * m + (e - n)];
      if (w != T(0)) s += (double)(w * p);
    }
    const double tot = block_reduce(s, false, red);
    if (threadIdx.x == 0) obj[b] = (T)tot;
  }
}

// =================================================================================================
// plan: P[b, i, j] (row stride ldp).  grid = (ceil(m / 256) capped, min(batch * n, 65535)).
// =================================================================================================
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) ot_plan_kernel(const CostD<T> C, int64_t batch, int64_t n, int64_t m,
                                                           T inv_reg, const T* f, const T* g, T* plan, int64_t ldp) {
  for (int64_t row = blockIdx.y; row < batch * n; row += gridDim.y) {
    const int64_t b = row / n, i = row % n;
    const T fi = f[row];
    for (int64_t j = (int64_t)blockIdx.x * kThreads + threadIdx.x; j < m; j += (int64_t)gridDim.x * kThreads)
      plan[row * ldp + j] = xexp((fi + g[b * m + j] - cost_at(C, b, i, j)) * inv_reg);
  }
}

// =================================================================================================
// sparsify
// =================================================================================================
template <typename T>
struct KeyBits;
template <>
struct KeyBits<float> {
  using U = unsigned;
  static constexpr int kBits = 32;
  static __device__ __forceinline__ U of(float v) {
    const U u = __float_as_uint(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
};
template <>
struct KeyBits<double> {
  using U = unsigned long long;
  static constexpr int kBits = 64;
  static __device__ __forceinline__ U of(double v) {
    const U u = (U)__double_as_longlong(v);
    return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
  }
};

// The order-preserving integer of the key g_j - C_ij (NaN ranks as -inf; -0 as +0).
template <typename T>
__device__ __forceinline__ typename KeyBits<T>::U key_of(T gj, T c) {
  T key = gj - c;
  if (key != key) key = ninf<T>();
  if (key == T(0)) key = T(0);
  return KeyBits<T>::of(key);
}

// Exclusive prefix count of `flag` over the CTA's threads (in thread order) and the CTA's total.
__device__ __forceinline__ int block_scan(bool flag, int* warp_tot, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned bal = __ballot_sync(kFull, flag);
  __syncthreads();  // warp_tot may still be read by a previous scan
  if (lane == 0) warp_tot[warp] = __popc(bal);
  __syncthreads();
  int before = __popc(bal & ((1u << lane) - 1u)), tot = 0;
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) before += warp_tot[w];
    tot += warp_tot[w];
  }
  *total = tot;
  return before;
}

// grid = (min(n, 65535), min(batch, 65535)), block = 256.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) ot_sparsify_kernel(const CostD<T> C, int64_t batch, int64_t n, int64_t m,
                                                               int k, T inv_reg, const T* f, const T* g, int32_t* cols,
                                                               T* vals) {
  using U = typename KeyBits<T>::U;
  __shared__ unsigned hist[256];
  __shared__ int warp_tot[kWarps];
  __shared__ U sh_prefix;
  __shared__ int sh_need;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
      const T* gb = g + b * m;
      // radix select: the k-th largest key, digit by digit from the top
      U prefix = 0, mask = 0;
      int need = k;  // how many of the keys matching `prefix` (in the bits of `mask`) are still to take
      for (int shift = KeyBits<T>::kBits - 8; shift >= 0; shift -= 8) {
        __syncthreads();  // the previous pass's readers of hist / sh_*
        hist[threadIdx.x] = 0;
        __syncthreads();
        for (int64_t j = threadIdx.x; j < m; j += kThreads) {
          const U u = key_of(gb[j], cost_at(C, b, i, j));
          if ((u & mask) == prefix) atomicAdd(&hist[(unsigned)(u >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (warp == 0) {  // lane l owns bins 255 - 8l ... 248 - 8l (from the top)
          unsigned own = 0;
          for (int q = 0; q < 8; ++q) own += hist[255 - 8 * lane - q];
          unsigned incl = own;  // inclusive prefix over lanes (from the top bins)
          for (int o = 1; o < 32; o <<= 1) {
            const unsigned u2 = __shfl_up_sync(kFull, incl, o);
            if (lane >= o) incl += u2;
          }
          const unsigned excl = incl - own;
          const bool here = excl < (unsigned)need && incl >= (unsigned)need;
          if (here) {
            unsigned cum = excl;
            int bin = 255 - 8 * lane;
            for (int q = 0; q < 8; ++q, --bin) {
              if (cum + hist[bin] >= (unsigned)need) break;
              cum += hist[bin];
            }
            sh_prefix = prefix | ((U)bin << shift);
            sh_need = need - (int)cum;
          }
        }
        __syncthreads();
        prefix = sh_prefix;
        need = sh_need;
        mask |= (U)255 << shift;
      }
      // gather in column order: key > K*, and the first `need` columns with key == K*
      const T fi = f[b * n + i];
      int32_t* crow = cols + (b * n + i) * (int64_t)k;
      T* vrow = vals + (b * n + i) * (int64_t)k;
      int taken = 0, eq_seen = 0;
      for (int64_t j0 = 0; j0 < m && taken < k; j0 += kThreads) {
        const int64_t j = j0 + threadIdx.x;
        T c = 0;
        U u = 0;
        if (j < m) {
          c = cost_at(C, b, i, j);
          u = key_of(gb[j], c);
        }
        const bool eq = j < m && u == prefix;
        int eq_tot;
        const int eq_before = block_scan(eq, warp_tot, &eq_tot);
        const bool sel = j < m && (u > prefix || (eq && eq_seen + eq_before < need));
        int sel_tot;
        const int pos = taken + block_scan(sel, warp_tot, &sel_tot);
        if (sel) {
          crow[pos] = (int32_t)j;
          vrow[pos] = fi == ninf<T>() ? T(0) : xexp((fi + gb[j] - c) * inv_reg);
        }
        taken += sel_tot;
        eq_seen += eq_tot;
      }
    }
  }
}

// =================================================================================================
// hvp (and the cg matvec): yy = c vy + shift vy;  yx = r vx + S vy + shift vx;  yy += S^T vx.
// `active` (cg: per-problem flags) may be NULL.
// =================================================================================================
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) ot_hvp_init_kernel(int64_t batch, int64_t m, const T* c, T shift,
                                                               const T* vy, T* yy, const int* active) {
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    if (active != nullptr && !active[b]) continue;
    for (int64_t j = (int64_t)blockIdx.x * kThreads + threadIdx.x; j < m; j += (int64_t)gridDim.x * kThreads)
      yy[b * m + j] = c[b * m + j] * vy[b * m + j] + shift * vy[b * m + j];
  }
}

// grid = (min(ceil(n / 8), 65535), min(batch, 65535)); a warp per row.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) ot_hvp_rows_kernel(int64_t batch, int64_t n, int64_t m, int64_t k,
                                                               const int32_t* cols, const T* vals, const T* r, T shift,
                                                               const T* vx, const T* vy, T* yx, T* yy,
                                                               const int* active) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t nrb = ceil_div(n, kWarps);
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    if (active != nullptr && !active[b]) continue;
    for (int64_t rb = blockIdx.x; rb < nrb; rb += gridDim.x) {
      const int64_t i = rb * kWarps + warp;
      if (i >= n) continue;  // warp-uniform; no barrier below
      const int64_t row = b * n + i;
      const T xi = vx[row];
      T s = 0;
      for (int64_t e = lane; e < k; e += 32) {
        const int64_t col = cols[row * k + e];
        const T v = vals[row * k + e];
        s += v * vy[b * m + col];
        atomicAdd(yy + b * m + col, v * xi);
      }
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(kFull, s, o);
      if (lane == 0) yx[row] = r[row] * xi + s + shift * xi;
    }
  }
}

// =================================================================================================
// cg (ot.h: Jacobi-preconditioned CG per problem).  Per-problem doubles in the workspace:
// =================================================================================================
enum { SC_BN = 0, SC_RZ = 1, SC_PQ = 2, SC_RN2 = 3, SC_RZNEW = 4, SC_BETA = 5, SC_RN = 6, SC_N = 8 };
template <typename T>
struct CgP {
  int64_t batch, n, m;
  const T *r, *c, *rhs_x, *rhs_y;
  T shift;
  double tol;
  T *zx, *zy, *rx, *ry, *px, *py, *qx, *qy;
  double* sc;   // (batch, SC_N)
  int* active;  // (batch)
  int* iters;   // (batch)
  int max_iter;
};

// The combined vector of problem b: index e < n is the x part, else the y part.
template <typename T>
__device__ __forceinline__ int64_t cg_at(const CgP<T>& P, int64_t b, int64_t e, bool* isx) {
  *isx = e < P.n;
  return *isx ? b * P.n + e : b * P.m + (e - P.n);
}
template <typename T>
__device__ __forceinline__ T cg_diag(const CgP<T>& P, bool isx, int64_t o) {
  const T d = (isx ? P.r[o] : P.c[o]) + P.shift;
  return d > T(0) ? d : T(1);
}

// mode 0: sc[BN] += |rhs|^2.  mode 1 (q = H z): r = rhs - q, p = r / d, sc[RZ] += <r, p>, sc[RN2] += |r|^2.
// mode 2: sc[PQ] += <p, q>.  mode 3: z += alpha p, r -= alpha q, sc[RN2] += |r|^2, sc[RZNEW] += <r, r / d>.
// mode 4: p = r / d + beta p.  mode 5 (final): z = 0 where rhs = 0.
// grid = (min(ceil((n + m) / 256), 65535), min(batch, 65535)).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) ot_cg_vec_kernel(const CgP<T> P, int mode) {
  __shared__ double red[kWarps];
  const int64_t len = P.n + P.m;
  for (int64_t b = blockIdx.y; b < P.batch; b += gridDim.y) {
    double* sc = P.sc + b * SC_N;
    if (mode >= 2 && mode <= 4 && !P.active[b]) continue;  // block-uniform
    if (mode == 5 && sc[SC_BN] != 0.0) continue;
    T alpha = 0, beta = 0;
    if (mode == 3) {
      const double pq = sc[SC_PQ];
      if (!(pq > 0.0)) continue;  // the scalar step ends this problem
      alpha = (T)(sc[SC_RZ] / pq);
    }
    if (mode == 4) beta = (T)sc[SC_BETA];
    double a0 = 0, a1 = 0;
    for (int64_t e = (int64_t)blockIdx.x * kThreads + threadIdx.x; e < len; e += (int64_t)gridDim.x * kThreads) {
      bool isx;
      const int64_t o = cg_at(P, b, e, &isx);
      T* rr = isx ? P.rx : P.ry;
      T* pp = isx ? P.px : P.py;
      T* qq = isx ? P.qx : P.qy;
      if (mode == 0) {
        const double h = (double)(isx ? P.rhs_x[o] : P.rhs_y[o]);
        a0 += h * h;
      } else if (mode == 1) {
        const T res = (isx ? P.rhs_x[o] : P.rhs_y[o]) - qq[o];
        const T s = res / cg_diag(P, isx, o);
        rr[o] = res;
        pp[o] = s;
        a0 += (double)res * (double)s;
        a1 += (double)res * (double)res;
      } else if (mode == 2) {
        a0 += (double)pp[o] * (double)qq[o];
      } else if (mode == 3) {
        T* zz = isx ? P.zx : P.zy;
        zz[o] += alpha * pp[o];
        const T res = rr[o] - alpha * qq[o];
        rr[o] = res;
        a0 += (double)res * (double)res;
        a1 += (double)res * (double)(res / cg_diag(P, isx, o));
      } else if (mode == 4) {
        pp[o] = rr[o] / cg_diag(P, isx, o) + beta * pp[o];
      } else {
        (isx ? P.zx : P.zy)[o] = T(0);
      }
    }
    if (mode == 0 || mode == 1 || mode == 2 || mode == 3) {  // block-uniform
      const double t0 = block_reduce(a0, false, red);
      const double t1 = (mode == 1 || mode == 3) ? block_reduce(a1, false, red) : 0.0;
      if (threadIdx.x == 0) {
        if (mode == 0) atomicAdd(sc + SC_BN, t0);
        if (mode == 1) {
          atomicAdd(sc + SC_RZ, t0);
          atomicAdd(sc + SC_RN2, t1);
        }
        if (mode == 2) atomicAdd(sc + SC_PQ, t0);
        if (mode == 3) {
          atomicAdd(sc + SC_RN2, t0);
          atomicAdd(sc + SC_RZNEW, t1);
        }
      }
    }
  }
}

// The per-problem scalar step.  mode 0 (after the initial residual): bn = |rhs|, rn = |r|, active =
// rn > tol bn and max_iter > 0.  mode 1 (after an update): stop on !(pq > 0); else count the
// iteration, rn = |r|, beta = rz_new / rz, stop when converged or out of iterations.  A thread per
// problem, grid-stride.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) ot_cg_scalar_kernel(const CgP<T> P, int mode) {
  for (int64_t b = (int64_t)blockIdx.x * kThreads + threadIdx.x; b < P.batch; b += (int64_t)gridDim.x * kThreads) {
    double* sc = P.sc + b * SC_N;
    const double tol = P.tol;
    if (mode == 0) {
      sc[SC_BN] = sqrt(sc[SC_BN]);
      sc[SC_RN] = sqrt(sc[SC_RN2]);
      P.iters[b] = 0;
      P.active[b] = sc[SC_BN] != 0.0 && sc[SC_RN] > tol * sc[SC_BN] && P.max_iter > 0;
    } else if (P.active[b]) {
      if (!(sc[SC_PQ] > 0.0)) {
        P.active[b] = 0;
      } else {
        const int it = ++P.iters[b];
        sc[SC_RN] = sqrt(sc[SC_RN2]);
        sc[SC_BETA] = sc[SC_RZNEW] / sc[SC_RZ];
        sc[SC_RZ] = sc[SC_RZNEW];
        if (!(sc[SC_RN] > tol * sc[SC_BN]) || it >= P.max_iter) P.active[b] = 0;
      }
    }
    sc[SC_PQ] = 0.0;
    sc[SC_RN2] = 0.0;
    sc[SC_RZNEW] = 0.0;
  }
}

// iters and resid = rn / bn (0 for a zero rhs).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) ot_cg_final_kernel(const CgP<T> P, int32_t* iters, T* resid) {
  for (int64_t b = (int64_t)blockIdx.x * kThreads + threadIdx.x; b < P.batch; b += (int64_t)gridDim.x * kThreads) {
    const double* sc = P.sc + b * SC_N;
    if (iters != nullptr) iters[b] = P.iters[b];
    if (resid != nullptr) resid[b] = sc[SC_BN] == 0.0 ? T(0) : (T)(sc[SC_RN] / sc[SC_BN]);
  }
}

// =================================================================================================
// Host side
// =================================================================================================
using kk::check_launch;  // api_common.cuh
using kk::cuda_call;
using kk::kSizeLimit;
using kk::need_ptr;

kk_status check_dtype(const char* fn, kk_dtype dtype) {
  if (dtype != KK_FLOAT32 && dtype != KK_FLOAT64)
    return kk::fail(KK_ERR_UNSUPPORTED_DTYPE, "%s: dtype %d is not supported by the ot CUDA kernels (float32, float64 are)",
                    fn, (int)dtype);
  return KK_OK;
}

kk_status check_sizes(const char* fn, int64_t batch, int64_t n, int64_t m) {
  if (batch < 0 || n < 0 || m < 0)
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: batch (%lld), n (%lld) and m (%lld) must be >= 0", fn, (long long)batch,
                    (long long)n, (long long)m);
  if (batch > kSizeLimit || n > kSizeLimit || m > kSizeLimit || (n > 0 && m > kSizeLimit * 16 / n))
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: batch = %lld, n = %lld, m = %lld is too large", fn, (long long)batch,
                    (long long)n, (long long)m);
  return KK_OK;
}

kk_status check_reg(const char* fn, double reg) {
  if (!(reg > 0.0) || !std::isfinite(reg))
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: reg must be finite and > 0, got %g", fn, reg);
  return KK_OK;
}

// The cost's fields; the pointers are required only when entries are read (reads = batch, n, m > 0).
kk_status check_cost(const char* fn, const kk_ot_cost* c, int64_t m, bool reads) {
  KK_TRY(need_ptr(fn, c, "cost"));
  if (c->kind == KK_OT_COST_MATRIX) {
    if (c->ld < m)
      return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: cost.ld (%lld) must be >= the row width m = %lld", fn,
                      (long long)c->ld, (long long)m);
    if (c->batch_stride < 0)
      return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: cost.batch_stride must be >= 0, got %lld", fn,
                      (long long)c->batch_stride);
    if (reads) KK_TRY(need_ptr(fn, c->matrix, "cost.matrix"));
    return KK_OK;
  }
  if (c->kind != KK_OT_COST_SQEUCLIDEAN && c->kind != KK_OT_COST_EUCLIDEAN_POW && c->kind != KK_OT_COST_MINKOWSKI_POW)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: unknown cost.kind %d (0 matrix, 1 sqeuclidean, 2 euclidean_pow, "
                    "3 minkowski_pow)", fn, (int)c->kind);
  if (c->dim < 1 || c->dim > KK_OT_MAX_DIM)
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: cost.dim must be in 1..%d, got %d", fn, KK_OT_MAX_DIM, (int)c->dim);
  if (c->kind == KK_OT_COST_EUCLIDEAN_POW && !(c->p > 0.0 && std::isfinite(c->p)))
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: cost.p must be finite and > 0 for euclidean_pow, got %g", fn, c->p);
  if (c->kind == KK_OT_COST_MINKOWSKI_POW && !(c->p >= 1.0 && std::isfinite(c->p)))
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: cost.p must be finite and >= 1 for minkowski_pow, got %g", fn, c->p);
  if (c->x_batch_stride < 0 || c->y_batch_stride < 0)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: cost.x_batch_stride (%lld) and cost.y_batch_stride (%lld) must be >= 0",
                    fn, (long long)c->x_batch_stride, (long long)c->y_batch_stride);
  if (reads) {
    KK_TRY(need_ptr(fn, c->x, "cost.x"));
    KK_TRY(need_ptr(fn, c->y, "cost.y"));
  }
  return KK_OK;
}

template <typename T>
CostD<T> cost_d(const kk_ot_cost* c) {
  CostD<T> d{};
  d.kind = c->kind;
  d.dim = c->kind == KK_OT_COST_MATRIX ? 0 : c->dim;
  d.p = (T)c->p;
  d.mat = static_cast<const T*>(c->matrix);
  d.ld = c->ld;
  d.bs = c->batch_stride;
  d.x = static_cast<const T*>(c->x);
  d.xbs = c->x_batch_stride;
  d.y = static_cast<const T*>(c->y);
  d.ybs = c->y_batch_stride;
  return d;
}

template <typename F>
kk_status dispatch(kk_dtype dtype, F&& f) {
  return dtype == KK_FLOAT64 ? f(double{}) : f(float{});
}

dim3 grid2(int64_t x, int64_t batch) {
  return dim3((unsigned)imax64(1, imin64(x, kMaxGrid)), (unsigned)imax64(1, imin64(batch, kMaxGrid)));
}

kk_status memset0(const char* fn, void* p, int64_t bytes, cudaStream_t st) {
  if (bytes <= 0) return KK_OK;
  return cuda_call(fn, cudaMemsetAsync(p, 0, (size_t)bytes, st), "cudaMemsetAsync");
}

// Runs the row engine (or, for a dense C on the column direction, the column engine).
template <typename T, int OP>
kk_status run_reduce(const char* fn, const RowP<T>& P, bool columns, cudaStream_t st) {
  const bool pts = P.cost.kind != KK_OT_COST_MATRIX;
  if (pts) {  // both directions: the swapped clouds for the columns
    kk::launch(ot_rows_kernel<T, OP, true>, grid2(ceil_div(P.nr, kWarps), P.batch), dim3(kThreads), 0, st, P);
  } else if constexpr (OP != OP_GRAD) {  // the point gradient has no dense-matrix form
    if (columns)
      kk::launch(ot_cols_kernel<T, OP>, grid2(ceil_div(P.nr, kTile), P.batch), dim3(kThreads), 0, st, P);
    else
      kk::launch(ot_rows_kernel<T, OP, false>, grid2(ceil_div(P.nr, kWarps), P.batch), dim3(kThreads), 0, st, P);
  }
  return check_launch(fn);
}

template <typename T>
kk_status hvp_run(const char* fn, int64_t batch, int64_t n, int64_t m, int64_t k, const int32_t* cols, const T* vals,
                  const T* r, const T* c, T shift, const T* vx, const T* vy, T* yx, T* yy, const int* active,
                  cudaStream_t st) {
  if (m > 0) {
    kk::launch(ot_hvp_init_kernel<T>, grid2(ceil_div(m, kThreads), batch), dim3(kThreads), 0, st, batch, m, c, shift,
               vy, yy, active);
    KK_TRY(check_launch(fn));
  }
  if (n > 0) {
    kk::launch(ot_hvp_rows_kernel<T>, grid2(ceil_div(n, kWarps), batch), dim3(kThreads), 0, st, batch, n, m, k, cols,
               vals, r, shift, vx, vy, yx, yy, active);
    KK_TRY(check_launch(fn));
  }
  return KK_OK;
}

int64_t align256(int64_t b) { return (b + 255) / 256 * 256; }

// Workspace layout of kk_ot_cg_cuda: rx, ry, px, py, qx, qy (T), sc (double, batch x SC_N), active, iters (int).
int64_t cg_workspace(int64_t es, int64_t batch, int64_t n, int64_t m) {
  return 3 * align256(es * batch * (n + m)) + align256(8 * SC_N * batch) + 2 * align256(4 * batch);
}

}  // namespace

// =================================================================================================
// C ABI
// =================================================================================================
extern "C" {

KK_API kk_status kk_ot_sinkhorn_step_cuda(kk_dtype dtype, const kk_ot_cost* cost, int64_t batch, int64_t n,
                                          int64_t m, int32_t axis, double reg, const void* w, const void* other,
                                          const void* pot, void* pot_new, void* err, int32_t err_norm, void* stream) {
  static const char* fn = "kk_ot_sinkhorn_step_cuda";
  kk::clear_error();
  KK_TRY(check_dtype(fn, dtype));
  KK_TRY(check_sizes(fn, batch, n, m));
  KK_TRY(check_reg(fn, reg));
  if (axis != 0 && axis != 1) return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: axis must be 0 or 1, got %d", fn, axis);
  if (err_norm != KK_OT_NORM_INF && err_norm != KK_OT_NORM_L1 && err_norm != KK_OT_NORM_L2)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: err_norm must be 0 (inf), 1 (L1) or 2 (L2), got %d", fn, err_norm);
  const int64_t nr = axis == 0 ? n : m, nc = axis == 0 ? m : n;
  KK_TRY(check_cost(fn, cost, m, batch > 0 && n > 0 && m > 0));
  if (err != nullptr && batch > 0 && nr > 0) KK_TRY(need_ptr(fn, pot, "pot (needed for err)"));
  if (batch > 0 && nr > 0) {
    KK_TRY(need_ptr(fn, w, "w"));
    KK_TRY(need_ptr(fn, pot_new, "pot_new"));
    if (nc > 0) KK_TRY(need_ptr(fn, other, "other"));
  }
  if (batch == 0) return KK_OK;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch(dtype, [&](auto t) -> kk_status {
    using T = decltype(t);
    if (err != nullptr) KK_TRY(memset0(fn, err, batch * (int64_t)sizeof(T), st));
    if (nr == 0) return KK_OK;  // err = 0 (an empty norm)
    RowP<T> P{};
    P.cost = cost_d<T>(cost);
    P.swap = axis;
    P.batch = batch;
    P.nr = nr;
    P.nc = nc;
    P.reg = (T)reg;
    P.inv_reg = (T)(1.0 / reg);
    P.w = static_cast<const T*>(w);
    P.pr = err != nullptr ? static_cast<const T*>(pot) : nullptr;
    P.pc = static_cast<const T*>(other);
    P.out = static_cast<T*>(pot_new);
    P.acc = static_cast<T*>(err);
    P.err_norm = err_norm;
    KK_TRY(run_reduce<T, OP_LSE>(fn, P, axis == 1, st));
    if (err != nullptr && err_norm == KK_OT_NORM_L2) {
      kk::launch(ot_sqrt_kernel<T>, dim3((unsigned)imin64(ceil_div(batch, kThreads), kMaxGrid)), dim3(kThreads), 0, st,
                 static_cast<T*>(err), batch);
      KK_TRY(check_launch(fn));
    }
    return KK_OK;
  });
}

KK_API kk_status kk_ot_marginals_cuda(kk_dtype dtype, const kk_ot_cost* cost, int64_t batch, int64_t n, int64_t m,
                                      double reg, const void* f, const void* g, const void* a, const void* b,
                                      const void* wr, const void* wc, void* r, void* c, void* obj, void* stream) {
  static const char* fn = "kk_ot_marginals_cuda";
  kk::clear_error();
  KK_TRY(check_dtype(fn, dtype));
  KK_TRY(check_sizes(fn, batch, n, m));
  KK_TRY(check_reg(fn, reg));
  const bool reads = batch > 0 && n > 0 && m > 0;
  KK_TRY(check_cost(fn, cost, m, reads));
  const bool want_r = r != nullptr && n > 0, want_c = c != nullptr && m > 0, want_obj = obj != nullptr;
  if (batch == 0 || (!want_r && !want_c && !want_obj)) return KK_OK;
  if (reads) {
    KK_TRY(need_ptr(fn, f, "f"));
    KK_TRY(need_ptr(fn, g, "g"));
  }
  if (want_obj) {
    if (n > 0) KK_TRY(need_ptr(fn, f, "f"));
    if (m > 0) KK_TRY(need_ptr(fn, g, "g"));
    if (n > 0) KK_TRY(need_ptr(fn, a, "a (needed for obj)"));
    if (m > 0) KK_TRY(need_ptr(fn, b, "b (needed for obj)"));
  }
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch(dtype, [&](auto t) -> kk_status {
    using T = decltype(t);
    const int64_t es = sizeof(T);
    if (!reads) {  // an empty plan: zero marginals, obj = <a, f> + <b, g>
      if (want_r) KK_TRY(memset0(fn, r, batch * n * es, st));
      if (want_c) KK_TRY(memset0(fn, c, batch * m * es, st));
    }
    if (want_obj) {
      kk::launch(ot_obj_init_kernel<T>, grid2(1, batch), dim3(kThreads), 0, st, batch, n, m, static_cast<const T*>(a),
                 static_cast<const T*>(f), static_cast<const T*>(b), static_cast<const T*>(g), static_cast<T*>(obj));
      KK_TRY(check_launch(fn));
    }
    if (!reads) return KK_OK;
    RowP<T> P{};
    P.cost = cost_d<T>(cost);
    P.batch = batch;
    P.reg = (T)reg;
    P.inv_reg = (T)(1.0 / reg);
    if (want_r || want_obj) {  // rows: r and sum P
      P.swap = 0;
      P.nr = n;
      P.nc = m;
      P.pr = static_cast<const T*>(f);
      P.pc = static_cast<const T*>(g);
      P.wc = static_cast<const T*>(wc);
      P.out = want_r ? static_cast<T*>(r) : nullptr;
      P.acc = static_cast<T*>(obj);
      KK_TRY(run_reduce<T, OP_SUM>(fn, P, false, st));
    }
    if (want_c) {
      P.swap = 1;
      P.nr = m;
      P.nc = n;
      P.pr = static_cast<const T*>(g);
      P.pc = static_cast<const T*>(f);
      P.wc = static_cast<const T*>(wr);
      P.out = static_cast<T*>(c);
      P.acc = nullptr;
      KK_TRY(run_reduce<T, OP_SUM>(fn, P, true, st));
    }
    return KK_OK;
  });
}

KK_API kk_status kk_ot_plan_cuda(kk_dtype dtype, const kk_ot_cost* cost, int64_t batch, int64_t n, int64_t m,
                                 double reg, const void* f, const void* g, void* plan, int64_t ldp, void* stream) {
  static const char* fn = "kk_ot_plan_cuda";
  kk::clear_error();
  KK_TRY(check_dtype(fn, dtype));
  KK_TRY(check_sizes(fn, batch, n, m));
  KK_TRY(check_reg(fn, reg));
  const bool reads = batch > 0 && n > 0 && m > 0;
  KK_TRY(check_cost(fn, cost, m, reads));
  if (ldp < m)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: ldp (%lld) must be >= the row width m = %lld", fn, (long long)ldp,
                    (long long)m);
  if (!reads) return KK_OK;
  KK_TRY(need_ptr(fn, f, "f"));
  KK_TRY(need_ptr(fn, g, "g"));
  KK_TRY(need_ptr(fn, plan, "plan"));
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch(dtype, [&](auto t) -> kk_status {
    using T = decltype(t);
    kk::launch(ot_plan_kernel<T>, grid2(ceil_div(m, kThreads), batch * n), dim3(kThreads), 0, st, cost_d<T>(cost), batch,
               n, m, (T)(1.0 / reg), static_cast<const T*>(f), static_cast<const T*>(g), static_cast<T*>(plan), ldp);
    return check_launch(fn);
  });
}

KK_API kk_status kk_ot_sparsify_cuda(kk_dtype dtype, const kk_ot_cost* cost, int64_t batch, int64_t n, int64_t m,
                                     int64_t k, double reg, const void* f, const void* g, int32_t* cols, void* vals,
                                     void* stream) {
  static const char* fn = "kk_ot_sparsify_cuda";
  kk::clear_error();
  KK_TRY(check_dtype(fn, dtype));
  KK_TRY(check_sizes(fn, batch, n, m));
  KK_TRY(check_reg(fn, reg));
  const bool reads = batch > 0 && n > 0 && m > 0;
  KK_TRY(check_cost(fn, cost, m, reads));
  if (!reads) return KK_OK;
  if (k < 1 || k > m || k > KK_OT_MAX_KEEP)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: k must be in 1..min(m = %lld, %d), got %lld", fn, (long long)m,
                    KK_OT_MAX_KEEP, (long long)k);
  KK_TRY(need_ptr(fn, f, "f"));
  KK_TRY(need_ptr(fn, g, "g"));
  KK_TRY(need_ptr(fn, cols, "cols"));
  KK_TRY(need_ptr(fn, vals, "vals"));
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch(dtype, [&](auto t) -> kk_status {
    using T = decltype(t);
    kk::launch(ot_sparsify_kernel<T>, grid2(n, batch), dim3(kThreads), 0, st, cost_d<T>(cost), batch, n, m, (int)k,
               (T)(1.0 / reg), static_cast<const T*>(f), static_cast<const T*>(g), cols, static_cast<T*>(vals));
    return check_launch(fn);
  });
}

KK_API kk_status kk_ot_hvp_cuda(kk_dtype dtype, int64_t batch, int64_t n, int64_t m, int64_t k, const int32_t* cols,
                                const void* vals, const void* r, const void* c, double shift, const void* vx,
                                const void* vy, void* yx, void* yy, void* stream) {
  static const char* fn = "kk_ot_hvp_cuda";
  kk::clear_error();
  KK_TRY(check_dtype(fn, dtype));
  KK_TRY(check_sizes(fn, batch, n, m));
  if (k < 0 || k > imax64(m, 0) || k > KK_OT_MAX_KEEP)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: k must be in 0..min(m = %lld, %d), got %lld", fn, (long long)m,
                    KK_OT_MAX_KEEP, (long long)k);
  if (!(shift >= 0.0) || !std::isfinite(shift))
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: shift must be finite and >= 0, got %g", fn, shift);
  if (batch == 0) return KK_OK;
  if (n > 0) {
    KK_TRY(need_ptr(fn, r, "r"));
    KK_TRY(need_ptr(fn, vx, "vx"));
    KK_TRY(need_ptr(fn, yx, "yx"));
    if (k > 0) {
      KK_TRY(need_ptr(fn, cols, "cols"));
      KK_TRY(need_ptr(fn, vals, "vals"));
    }
  }
  if (m > 0) {
    KK_TRY(need_ptr(fn, c, "c"));
    KK_TRY(need_ptr(fn, vy, "vy"));
    KK_TRY(need_ptr(fn, yy, "yy"));
  }
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch(dtype, [&](auto t) -> kk_status {
    using T = decltype(t);
    return hvp_run<T>(fn, batch, n, m, k, cols, static_cast<const T*>(vals), static_cast<const T*>(r),
                      static_cast<const T*>(c), (T)shift, static_cast<const T*>(vx), static_cast<const T*>(vy),
                      static_cast<T*>(yx), static_cast<T*>(yy), nullptr, st);
  });
}

KK_API kk_status kk_ot_cg_cuda_workspace_size(kk_dtype dtype, int64_t batch, int64_t n, int64_t m, int64_t* bytes) {
  static const char* fn = "kk_ot_cg_cuda_workspace_size";
  kk::clear_error();
  KK_TRY(need_ptr(fn, bytes, "bytes"));
  *bytes = 0;
  KK_TRY(check_dtype(fn, dtype));
  KK_TRY(check_sizes(fn, batch, n, m));
  *bytes = cg_workspace(dtype == KK_FLOAT64 ? 8 : 4, batch, n, m);
  return KK_OK;
}

KK_API kk_status kk_ot_cg_cuda(kk_dtype dtype, int64_t batch, int64_t n, int64_t m, int64_t k, const int32_t* cols,
                               const void* vals, const void* r, const void* c, double shift, const void* rhs_x,
                               const void* rhs_y, void* zx, void* zy, double tol, int32_t max_iter, int32_t* iters,
                               void* resid, void* workspace, int64_t workspace_bytes, void* stream) {
  static const char* fn = "kk_ot_cg_cuda";
  kk::clear_error();
  KK_TRY(check_dtype(fn, dtype));
  KK_TRY(check_sizes(fn, batch, n, m));
  if (k < 0 || k > imax64(m, 0) || k > KK_OT_MAX_KEEP)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: k must be in 0..min(m = %lld, %d), got %lld", fn, (long long)m,
                    KK_OT_MAX_KEEP, (long long)k);
  if (!(shift >= 0.0) || !std::isfinite(shift))
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: shift must be finite and >= 0, got %g", fn, shift);
  if (!(tol > 0.0) || !std::isfinite(tol))
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: tol must be finite and > 0, got %g", fn, tol);
  if (max_iter < 0) return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: max_iter must be >= 0, got %d", fn, max_iter);
  const int64_t es = dtype == KK_FLOAT64 ? 8 : 4;
  const int64_t need = cg_workspace(es, batch, n, m);
  if (workspace_bytes < need)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: workspace_bytes (%lld) is less than the %lld bytes needed "
                    "(kk_ot_cg_cuda_workspace_size)", fn, (long long)workspace_bytes, (long long)need);
  if (batch == 0) return KK_OK;
  KK_TRY(need_ptr(fn, workspace, "workspace"));
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: workspace must be 16-byte aligned", fn);
  if (n > 0) {
    KK_TRY(need_ptr(fn, r, "r"));
    KK_TRY(need_ptr(fn, rhs_x, "rhs_x"));
    KK_TRY(need_ptr(fn, zx, "zx"));
    if (k > 0) {
      KK_TRY(need_ptr(fn, cols, "cols"));
      KK_TRY(need_ptr(fn, vals, "vals"));
    }
  }
  if (m > 0) {
    KK_TRY(need_ptr(fn, c, "c"));
    KK_TRY(need_ptr(fn, rhs_y, "rhs_y"));
    KK_TRY(need_ptr(fn, zy, "zy"));
  }
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch(dtype, [&](auto t) -> kk_status {
    using T = decltype(t);
    char* ws = static_cast<char*>(workspace);
    const int64_t vb = align256(es * batch * (n + m));
    CgP<T> P{};
    P.batch = batch;
    P.n = n;
    P.m = m;
    P.r = static_cast<const T*>(r);
    P.c = static_cast<const T*>(c);
    P.rhs_x = static_cast<const T*>(rhs_x);
    P.rhs_y = static_cast<const T*>(rhs_y);
    P.shift = (T)shift;
    P.tol = tol;
    P.zx = static_cast<T*>(zx);
    P.zy = static_cast<T*>(zy);
    P.rx = reinterpret_cast<T*>(ws);
    P.ry = P.rx + batch * n;
    P.px = reinterpret_cast<T*>(ws + vb);
    P.py = P.px + batch * n;
    P.qx = reinterpret_cast<T*>(ws + 2 * vb);
    P.qy = P.qx + batch * n;
    P.sc = reinterpret_cast<double*>(ws + 3 * vb);
    P.active = reinterpret_cast<int*>(ws + 3 * vb + align256(8 * SC_N * batch));
    P.iters = reinterpret_cast<int*>(ws + 3 * vb + align256(8 * SC_N * batch) + align256(4 * batch));
    P.max_iter = max_iter;
    const T* vl = static_cast<const T*>(vals);
    const dim3 gv = grid2(ceil_div(n + m, kThreads), batch);
    const dim3 gs((unsigned)imin64(ceil_div(batch, kThreads), kMaxGrid));
    auto vec = [&](int mode) {
      kk::launch(ot_cg_vec_kernel<T>, gv, dim3(kThreads), 0, st, P, mode);
      return check_launch(fn);
    };
    auto scalar = [&](int mode) {
      kk::launch(ot_cg_scalar_kernel<T>, gs, dim3(kThreads), 0, st, P, mode);
      return check_launch(fn);
    };
    KK_TRY(memset0(fn, P.sc, 8 * SC_N * batch, st));
    // r0 = rhs - H z0, p0 = r0 / d
    KK_TRY(vec(0));
    KK_TRY(hvp_run<T>(fn, batch, n, m, k, cols, vl, P.r, P.c, P.shift, P.zx, P.zy, P.qx, P.qy, nullptr, st));
    KK_TRY(vec(1));
    KK_TRY(scalar(0));
    std::vector<int> host_active((size_t)batch);
    auto any_active = [&](bool* any) -> kk_status {
      KK_TRY(cuda_call(fn, cudaMemcpyAsync(host_active.data(), P.active, sizeof(int) * (size_t)batch,
                                           cudaMemcpyDeviceToHost, st), "cudaMemcpyAsync"));
      KK_TRY(cuda_call(fn, cudaStreamSynchronize(st), "cudaStreamSynchronize"));
      *any = false;
      for (int v : host_active) *any = *any || v != 0;
      return KK_OK;
    };
    bool any = true;
    KK_TRY(any_active(&any));
    for (int it = 0; any && it < max_iter; ++it) {
      KK_TRY(hvp_run<T>(fn, batch, n, m, k, cols, vl, P.r, P.c, P.shift, P.px, P.py, P.qx, P.qy, P.active, st));
      KK_TRY(vec(2));  // <p, q>
      KK_TRY(vec(3));  // z, r and their dots
      KK_TRY(scalar(1));
      KK_TRY(vec(4));  // p
      if ((it + 1) % kCgCheck == 0) KK_TRY(any_active(&any));
    }
    KK_TRY(vec(5));  // zero rhs: z = 0
    kk::launch(ot_cg_final_kernel<T>, gs, dim3(kThreads), 0, st, P, iters, static_cast<T*>(resid));
    KK_TRY(check_launch(fn));
    return cuda_call(fn, cudaStreamSynchronize(st), "cudaStreamSynchronize");
  });
}

KK_API kk_status kk_ot_points_grad_cuda(kk_dtype dtype, const kk_ot_cost* cost, int64_t batch, int64_t n, int64_t m,
                                        double reg, const void* f, const void* g, const void* scale, const void* u,
                                        const void* v, void* dx, void* dy, void* stream) {
  static const char* fn = "kk_ot_points_grad_cuda";
  kk::clear_error();
  KK_TRY(check_dtype(fn, dtype));
  KK_TRY(check_sizes(fn, batch, n, m));
  KK_TRY(check_reg(fn, reg));
  const bool reads = batch > 0 && n > 0 && m > 0;
  KK_TRY(check_cost(fn, cost, m, reads));
  if (cost->kind == KK_OT_COST_MATRIX)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: the point gradient needs a point-cloud cost, got a matrix", fn);
  const bool want_x = dx != nullptr && n > 0, want_y = dy != nullptr && m > 0;
  if (batch == 0 || (!want_x && !want_y)) return KK_OK;
  if (reads) {
    KK_TRY(need_ptr(fn, f, "f"));
    KK_TRY(need_ptr(fn, g, "g"));
  }
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch(dtype, [&](auto t) -> kk_status {
    using T = decltype(t);
    const int64_t es = sizeof(T), D = cost->dim;
    if (want_x) KK_TRY(memset0(fn, dx, batch * n * D * es, st));
    if (want_y) KK_TRY(memset0(fn, dy, batch * m * D * es, st));
    if (!reads) return KK_OK;
    RowP<T> P{};
    P.cost = cost_d<T>(cost);
    P.batch = batch;
    P.reg = (T)reg;
    P.inv_reg = (T)(1.0 / reg);
    P.scale = static_cast<const T*>(scale);
    if (want_x) {
      P.swap = 0;
      P.nr = n;
      P.nc = m;
      P.pr = static_cast<const T*>(f);
      P.pc = static_cast<const T*>(g);
      P.ur = static_cast<const T*>(u);
      P.uc = static_cast<const T*>(v);
      P.out = static_cast<T*>(dx);
      KK_TRY(run_reduce<T, OP_GRAD>(fn, P, false, st));
    }
    if (want_y) {
      P.swap = 1;
      P.nr = m;
      P.nc = n;
      P.pr = static_cast<const T*>(g);
      P.pc = static_cast<const T*>(f);
      P.ur = static_cast<const T*>(v);
      P.uc = static_cast<const T*>(u);
      P.out = static_cast<T*>(dy);
      KK_TRY(run_reduce<T, OP_GRAD>(fn, P, true, st));
    }
    return KK_OK;
  });
}

}  // extern "C"
