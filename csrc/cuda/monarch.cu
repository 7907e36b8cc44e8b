/*
 * Monarch (block-diagonal) product on CUDA: fused forward, recomputing backward.
 *
 * Source: Dao et al., "Monarch: Expressive Structured Matrices for Efficient and Accurate
 * Training", ICML 2022; layout of HazyResearch/fly (blockdiag_butterfly_multiply.py).
 *
 *   x   (B, k*p)  row stride ldx      w1 (k, q, p) contiguous     w2 (l, s, r) contiguous
 *   out (B, l*s)  row stride ldo      l*r == k*q (the intermediate width)
 *
 *   t[b, a*q + i]   = sum_j w1[a, i, j] x[b, a*p + j]       B1: row J = a*q+i of w1 as (k*q, p)
 *   h[b, c, m]      = t[b, m*l + c]                          P1
 *   out[b, n*l + c] = sum_m w2[c, n, m] h[b, c, m]           B2 then P2
 *
 * Backward (each output optional; dw1/dw2 overwritten), with dO[b, c, n] = dout[b, n*l + c]:
 *   dw2[c, n, m] = sum_b dO[b, c, n] h[b, c, m]      dh[b, c, m] = sum_n dO[b, c, n] w2[c, n, m]
 *   dt[b, m*l + c] = dh[b, c, m]
 *   dx[b, a*p + j] = sum_i dt[b, a*q + i] w1[a, i, j]    dw1[a, i, j] = sum_b dt[b, a*q+i] x[b, a*p+j]
 *
 * Element types float / __half / __nv_bfloat16; every product accumulates in float32 (fp32 FMA,
 * no tensor cores), and the intermediate h never leaves the chip in the forward.
 *
 * Forward: one fused kernel.  A CTA owns BM batch rows, a group of C consecutive output blocks
 * c (cg0 .. cg0+C-1) and n-tiles of BN rows of w2.  The h entries it needs are the "columns"
 *   v = m*C + cl  (m < r, cl < C)  <->  row J(v) = m*l + cg0 + cl of w1,
 * listed in increasing J.  Stage 1 computes h for a chunk of at most kFwdR consecutive columns that
 * all lie in one input block a = J/q, so the chunk is a plain GEMM x[:, a*p : a*p+p] * w1rows^T
 * (x tile shared by every column).  Stage 2 accumulates out tile += h_chunk * w2 chunk in
 * registers; a thread only meets the columns of its own c.  C is chosen on the host: C = 1 when
 * q >= l (long runs of rows per input block, e.g. MonarchLinear nblocks=4), larger C when q < l
 * (the square n = m^2 case, where an input block gives only q/l rows to each c).
 * If the CTA's whole h (BM x C*r floats) fits in shared memory ("cached"), stage 1 runs once and
 * the CTA loops over its n-tiles; otherwise h is recomputed per n-tile, chunk by chunk.  The batch
 * tile BM is 64, 32 or 16 rows (a template parameter): small tiles let the cache hold large r and
 * fill the GPU at small batch.  BM, C, caching and the n-split come from a cost model (plan_fwd).
 *
 * Backward: the same math as five strided, grouped GEMMs (one generic tiled kernel) through
 * float32 buffers in the caller's workspace; h is recomputed from x and w1, nothing else saved.
 * Weight gradients reduce over the batch, so they are split along it (deterministic: partial
 * sums go to the workspace and one kernel adds them in a fixed order).  Workspace layout is
 * described at bwd_layout() below.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>

#include "../cpu/status.h"
#include "common.cuh"
#include "kernelkit/kernelkit.h"

namespace {

// element conversion and 64-bit index helpers: csrc/cuda/common.cuh
using kk::ceil_div;
using kk::from_f;
using kk::imax64;
using kk::imin64;
using kk::to_f;

// =================================================================================================
// Forward
// =================================================================================================
constexpr int kFwdThreads = 256;
constexpr int kFwdSlots = 128;  // output columns (cl, n) per CTA: C * BN <= kFwdSlots
constexpr int kFwdR = 32;       // h columns per chunk
constexpr int kFwdBK = 16;      // stage-1 step along p
constexpr int kWS = kFwdR + 2;  // ws[kk][vl]: float2 reads; 34 makes the transposing stores conflict-free
constexpr int kW2S = kFwdSlots + 4;  // w2s[vl][n]: float4 reads

// Everything that depends on the batch tile BM (64, 32 or 16 rows per CTA).  Smaller tiles let
// the h cache hold more columns (large r) and waste less work at small batch; larger tiles reuse
// each weight over more rows.  Stage 1 covers BM x kFwdR with TM1 x 2 per thread (16 x 16 threads),
// stage 2 covers BM x kFwdSlots with TM2 rows x 4 slots per thread (8 x 32 threads).
template <int BM>
struct FwdTile {
  static constexpr int kXS = BM + 4;  // xs[kk][bb], rows read as TM1-vectors
  static constexpr int kHS = BM + 4;  // hs[v][bb] (dynamic), rows read as TM2-vectors
  static constexpr int kTM1 = BM / 16;
  static constexpr int kTM2 = BM / 8;
  static constexpr int kXLoads = kFwdBK * BM / kFwdThreads;
  static constexpr int kStaticSmemBytes = (kFwdBK * kXS + kFwdBK * kWS + kFwdR * kW2S) * 4;
  static_assert(BM % 16 == 0 && kXLoads >= 1, "tile");
};
static_assert(kFwdThreads == 16 * (kFwdR / 2) && kFwdThreads == 8 * (kFwdSlots / 4), "thread tiles");
static_assert(kFwdBK * kFwdR == 2 * kFwdThreads, "two w1 loads per thread");

// N consecutive floats from shared memory (aligned to N floats for N <= 4, to 4 for N = 8).
template <int N>
__device__ __forceinline__ void lds_vec(const float* p, float (&v)[N]) {
  if constexpr (N == 1) {
    v[0] = p[0];
  } else if constexpr (N == 2) {
    const float2 a = *reinterpret_cast<const float2*>(p);
    v[0] = a.x; v[1] = a.y;
  } else {
    static_assert(N % 4 == 0, "vector width");
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const float4 a = *reinterpret_cast<const float4*>(p + i);
      v[i] = a.x; v[i + 1] = a.y; v[i + 2] = a.z; v[i + 3] = a.w;
    }
  }
}

struct FwdParams {
  const void* x;
  const void* w1;
  const void* w2;
  void* out;
  int64_t batch, ldx, ldo;
  int k, q, p, l, s, r;
  int C;       // output blocks per CTA (grid.y = ceil(l / C))
  int BN;      // rows n of w2 per tile, multiple of 4, C * BN <= kFwdSlots
  int ntiles;  // ceil(s / BN); CTA z does tiles z, z + gridDim.z, ...
  int cached;  // 1: the CTA's whole h lives in shared memory, computed once
};

// Chunk of columns starting at vs: [vs, end) all in one input block *a, at most kFwdR long.
// The first column past block a is the first v with J(v) >= (a+1)*q; with d = (a+1)*q - cg0,
// that is v = (d / l) * Cg + min(d % l, Cg), because J(v) - cg0 = (v / Cg) * l + v % Cg, Cg <= l.
__device__ __forceinline__ int fwd_chunk_end(int vs, int total_v, int Cg, int cg0, int l, int q,
                                             int* a) {
  const int64_t J0 = (int64_t)(vs / Cg) * l + cg0 + vs % Cg;
  const int64_t aa = J0 / q;
  const int64_t d = (aa + 1) * q - cg0;  // >= 1 since J0 >= cg0
  const int64_t mf = d / l;
  const int64_t run_end = mf * Cg + imin64(d - mf * l, Cg);
  *a = (int)aa;
  return (int)imin64(imin64(run_end, total_v), (int64_t)vs + kFwdR);
}

// Stage 1: hdst[vl * kHS + bb] = h of column vs + vl for batch row b0 + bb, vl < ve - vs.
template <typename T, int BM>
__device__ __forceinline__ void fwd_stage1(const FwdParams& P, const T* __restrict__ x,
                                           const T* __restrict__ w1, int64_t b0, int cg0, int Cg,
                                           int vs, int ve, int a, float* xs, float* ws,
                                           float* hdst) {
  using Tile = FwdTile<BM>;
  constexpr int TM = Tile::kTM1;
  constexpr int kRowStep = kFwdThreads / kFwdBK;  // 16
  const int tid = threadIdx.x;
  const int nv = ve - vs;
  // Load slots: element kk_t of the K-step, rows row_t + kRowStep * it of the x tile and of the
  // w1 tile (columns v).  x rows are equally spaced; the w1 rows J(v) are resolved once per chunk.
  const int kk_t = tid % kFwdBK, row_t = tid / kFwdBK;
  const int64_t xoff = (b0 + row_t) * P.ldx + (int64_t)a * P.p + kk_t;
  const int64_t xstep = kRowStep * P.ldx;
  // Slot it is inside the batch iff kRowStep*it < xrows.  Clamped to BM (> every kRowStep*it) to fit
  // 32 bits: the register this saves is what lets BM = 64 stay within 128 without a spill.
  const int xrows = (int)imin64(P.batch - b0 - row_t, BM);
  int64_t woff[2];
#pragma unroll
  for (int it = 0; it < 2; ++it) {
    const int vl = row_t + kRowStep * it;
    const int v = vs + vl;
    woff[it] = vl < nv ? ((int64_t)(v / Cg) * P.l + cg0 + v % Cg) * P.p + kk_t : -1;  // J*p + kk_t
  }
  const int cgp = tid % (kFwdR / 2), rgp = tid / (kFwdR / 2);  // columns 2*cgp+j, rows TM*rgp+i
  float hacc[TM][2];
#pragma unroll
  for (int i = 0; i < TM; ++i) hacc[i][0] = hacc[i][1] = 0.f;

  __syncthreads();  // earlier readers of xs / ws / hdst are done
  for (int j0 = 0; j0 < P.p; j0 += kFwdBK) {
    const bool kin = j0 + kk_t < P.p;
#pragma unroll
    for (int it = 0; it < Tile::kXLoads; ++it)
      xs[kk_t * Tile::kXS + row_t + kRowStep * it] =
          (kin && kRowStep * it < xrows) ? to_f(x[xoff + it * xstep + j0]) : 0.f;
#pragma unroll
    for (int it = 0; it < 2; ++it)
      ws[kk_t * kWS + row_t + kRowStep * it] = (kin && woff[it] >= 0) ? to_f(w1[woff[it] + j0]) : 0.f;
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kFwdBK; ++kk) {
      float xv[TM], wv[2];
      lds_vec<TM>(xs + kk * Tile::kXS + rgp * TM, xv);
      lds_vec<2>(ws + kk * kWS + cgp * 2, wv);
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) hacc[i][jj] = fmaf(xv[i], wv[jj], hacc[i][jj]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int jj = 0; jj < 2; ++jj) {
    const int vl = cgp * 2 + jj;
    if (vl < nv) {
#pragma unroll
      for (int i = 0; i < TM; ++i) hdst[vl * Tile::kHS + rgp * TM + i] = hacc[i][jj];
    }
  }
}

// Stage 2: acc += h[:, columns vs..ve) * w2 for this thread's TM2 rows and 4 slots (one c).
// hsrc points at column vs.
template <typename T, int BM>
__device__ __forceinline__ void fwd_stage2(const FwdParams& P, const T* __restrict__ w2, int cg0,
                                           int Cg, int n0, int vs, int ve, const float* hsrc,
                                           float* w2s, float (&acc)[FwdTile<BM>::kTM2][4]) {
  using Tile = FwdTile<BM>;
  constexpr int TM = Tile::kTM2;
  const int tid = threadIdx.x;
  const int nv = ve - vs;
  __syncthreads();  // earlier readers of w2s are done; hsrc writes are visible
  // w2s[vl][n] = w2[c, n0 + n, m] for column v = vs + vl (c = cg0 + v % Cg, m = v / Cg).
  // vl runs fastest: for C == 1 that is contiguous m in memory.
  for (int e = tid; e < kFwdR * P.BN; e += kFwdThreads) {
    const int vl = e % kFwdR, n = e / kFwdR;
    float val = 0.f;
    if (vl < nv && n0 + n < P.s) {
      const int v = vs + vl;
      const int64_t c = cg0 + v % Cg;
      val = to_f(w2[(c * P.s + n0 + n) * P.r + v / Cg]);
    }
    w2s[vl * kW2S + n] = val;
  }
  __syncthreads();
  const int slot = (tid % 32) * 4, rg = tid / 32;
  const int cl = slot / P.BN, nb = slot % P.BN;
  if (cl >= Cg) return;  // idle slots (no barrier follows inside this function)
  // This thread's columns: v = vs .. ve-1 with v % Cg == cl.
  for (int v = vs + ((cl - vs % Cg) + Cg) % Cg; v < ve; v += Cg) {
    const int vl = v - vs;
    float hv[TM], wv[4];
    lds_vec<TM>(hsrc + vl * Tile::kHS + rg * TM, hv);
    lds_vec<4>(w2s + vl * kW2S + nb, wv);
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) acc[i][jj] = fmaf(hv[i], wv[jj], acc[i][jj]);
  }
}

// grid = (ceil(batch / BM), ceil(l / C), nz); block = kFwdThreads;
// dynamic smem = (cached ? C * r : kFwdR) * kHS floats.
// 2 CTAs per SM: for BM = 64 ptxas then keeps 128 registers without spilling (tests/cuda_resources.py
// checks it); unbounded it takes ~150 and only one CTA fits.
template <typename T, int BM>
__global__ void __launch_bounds__(kFwdThreads, 2) monarch_fwd_kernel(const FwdParams P) {
  using Tile = FwdTile<BM>;
  constexpr int TM = Tile::kTM2;
  __shared__ __align__(16) float xs[kFwdBK * Tile::kXS];
  __shared__ __align__(16) float ws[kFwdBK * kWS];
  __shared__ __align__(16) float w2s[kFwdR * kW2S];
  float* hs = kk::dynamic_smem<float>();  // the h cache

  const T* __restrict__ x = static_cast<const T*>(P.x);
  const T* __restrict__ w1 = static_cast<const T*>(P.w1);
  const T* __restrict__ w2 = static_cast<const T*>(P.w2);
  T* __restrict__ out = static_cast<T*>(P.out);
  const int tid = threadIdx.x;
  const int64_t b0 = (int64_t)blockIdx.x * BM;
  const int cg0 = (int)blockIdx.y * P.C;
  const int Cg = (int)imin64(P.C, P.l - cg0);  // output blocks of this CTA (fewer at the edge)
  const int total_v = P.r * Cg;
  // Stage-2 ownership, also used by the store.
  const int slot = (tid % 32) * 4, rg = tid / 32;
  const int cl = slot / P.BN, nb = slot % P.BN;

  bool first = true;
  for (int tile = blockIdx.z; tile < P.ntiles; tile += gridDim.z) {
    const int n0 = tile * P.BN;
    float acc[TM][4];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) acc[i][jj] = 0.f;

    if (P.cached) {
      if (first) {  // all of h once; chunks follow input-block runs
        for (int vs = 0, a = 0, ve; vs < total_v; vs = ve) {
          ve = fwd_chunk_end(vs, total_v, Cg, cg0, P.l, P.q, &a);
          fwd_stage1<T, BM>(P, x, w1, b0, cg0, Cg, vs, ve, a, xs, ws, hs + (int64_t)vs * Tile::kHS);
        }
      }
      for (int vs = 0; vs < total_v; vs += kFwdR) {
        const int ve = (int)imin64(vs + kFwdR, total_v);
        fwd_stage2<T, BM>(P, w2, cg0, Cg, n0, vs, ve, hs + (int64_t)vs * Tile::kHS, w2s, acc);
      }
    } else {
      for (int vs = 0, a = 0, ve; vs < total_v; vs = ve) {
        ve = fwd_chunk_end(vs, total_v, Cg, cg0, P.l, P.q, &a);
        fwd_stage1<T, BM>(P, x, w1, b0, cg0, Cg, vs, ve, a, xs, ws, hs);
        fwd_stage2<T, BM>(P, w2, cg0, Cg, n0, vs, ve, hs, w2s, acc);
      }
    }
    first = false;

    if (cl < Cg) {  // out[b, n*l + c]
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const int64_t b = b0 + rg * TM + i;
        if (b >= P.batch) continue;
        T* orow = out + b * P.ldo + cg0 + cl;
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          const int64_t n = n0 + nb + jj;
          if (n < P.s) orow[n * P.l] = from_f<T>(acc[i][jj]);
        }
      }
    }
  }
}

// =================================================================================================
// Backward building block: grouped, strided, optionally batch-split GEMM
//   C[g][m][n] (+ split * sCsplit) = sum_{k in split} A[g][m][k] * B[g][k][n]
// Every operand is addressed by (group, row, col) element strides, so the permutations P1/P2 are
// folded into the strides instead of being materialised.
// =================================================================================================
constexpr int kGThreads = 256;
constexpr int kGBM = 64, kGBN = 64, kGBK = 16;
constexpr int kGAS = kGBM + 4, kGBS = kGBN + 4;  // As[kk][m], Bs[kk][n]; float4-aligned rows
static_assert(kGThreads == (kGBM / 4) * (kGBN / 4), "4x4 per thread");

struct GemmParams {
  const void* A;
  const void* B;
  void* C;
  int64_t M, N, K;
  int64_t sAg, sAm, sAk;
  int64_t sBg, sBk, sBn;
  int64_t sCg, sCm, sCn;
  int64_t sCsplit;      // offset between the partial outputs of consecutive splits
  int64_t k_per_split;  // multiple of kGBK
  int64_t tiles_m, tiles_n;
  int a_m_fast;  // load A with m fastest across threads (else k): whichever stride is smaller
  int b_n_fast;
};

// One operand tile into shared memory: S[kk * STRIDE + xx] = G[(x0 + xx) * sx + (k0 + kk) * sk]
// for xx < BX, kk < kGBK, zero outside [x, X) x [k0, ke).  x_fast picks which index varies fastest
// across threads, so that consecutive threads read consecutive addresses (the smaller stride).
template <int BX, int STRIDE, typename TIn>
__device__ __forceinline__ void load_tile(float* S, const TIn* __restrict__ G, int64_t x0, int64_t X,
                                          int64_t sx, int64_t sk, int64_t k0, int64_t ke,
                                          int x_fast, int tid) {
#pragma unroll
  for (int it = 0; it < BX * kGBK / kGThreads; ++it) {
    const int e = tid + it * kGThreads;
    const int xx = x_fast ? e % BX : e / kGBK;
    const int kk = x_fast ? e / BX : e % kGBK;
    const int64_t x = x0 + xx, kx = k0 + kk;
    S[kk * STRIDE + xx] = (x < X && kx < ke) ? to_f(G[x * sx + kx * sk]) : 0.f;
  }
}

// grid = (groups * tiles_m * tiles_n, nsplit); block = kGThreads.
template <typename TA, typename TB, typename TC>
__global__ void __launch_bounds__(kGThreads) monarch_gemm_kernel(const GemmParams P) {
  __shared__ __align__(16) float As[kGBK * kGAS];
  __shared__ __align__(16) float Bs[kGBK * kGBS];
  const int tid = threadIdx.x;
  int64_t bid = blockIdx.x;
  const int64_t tm = bid % P.tiles_m;  // m fastest: neighbouring CTAs share the B tile
  bid /= P.tiles_m;
  const int64_t tn = bid % P.tiles_n;
  const int64_t g = bid / P.tiles_n;
  const int64_t m0 = tm * kGBM, n0 = tn * kGBN;
  const int64_t kb = (int64_t)blockIdx.y * P.k_per_split;
  const int64_t ke = imin64(P.K, kb + P.k_per_split);  // may be <= kb: the split writes zeros
  const TA* __restrict__ A = static_cast<const TA*>(P.A) + g * P.sAg;
  const TB* __restrict__ B = static_cast<const TB*>(P.B) + g * P.sBg;

  const int tx = tid % (kGBN / 4), ty = tid / (kGBN / 4);  // cols 4*tx+j, rows 4*ty+i
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int64_t k0 = kb; k0 < ke; k0 += kGBK) {
    load_tile<kGBM, kGAS>(As, A, m0, P.M, P.sAm, P.sAk, k0, ke, P.a_m_fast, tid);
    load_tile<kGBN, kGBS>(Bs, B, n0, P.N, P.sBn, P.sBk, k0, ke, P.b_n_fast, tid);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kGBK; ++kk) {
      const float4 av = *reinterpret_cast<const float4*>(As + kk * kGAS + ty * 4);
      const float4 bv = *reinterpret_cast<const float4*>(Bs + kk * kGBS + tx * 4);
      const float a4[4] = {av.x, av.y, av.z, av.w};
      const float b4[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a4[i], b4[j], acc[i][j]);
    }
    __syncthreads();
  }

  TC* __restrict__ C = static_cast<TC*>(P.C) + g * P.sCg + (int64_t)blockIdx.y * P.sCsplit;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty * 4 + i;
    if (m >= P.M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx * 4 + j;
      if (n < P.N) C[m * P.sCm + n * P.sCn] = from_f<TC>(acc[i][j]);
    }
  }
}

// dst[i] = sum over splits (in split order) of part[split * size + i].
template <typename T>
__global__ void monarch_reduce_splits_kernel(const float* __restrict__ part, int64_t size,
                                             int nsplit, T* __restrict__ dst) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < size; i += stride) {
    float sum = 0.f;
    for (int sp = 0; sp < nsplit; ++sp) sum += part[sp * size + i];
    dst[i] = from_f<T>(sum);
  }
}

// =================================================================================================
// Host side
// =================================================================================================
size_t dtype_size(kk_dtype dtype) {
  switch (dtype) {
    case KK_FLOAT32: return 4;
    case KK_FLOAT16:
    case KK_BFLOAT16: return 2;
    default: return 0;
  }
}

kk_status check_launch(const char* fn) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return kk::fail(KK_ERR_CUDA, "%s: kernel launch failed: %s", fn, cudaGetErrorString(err));
  return KK_OK;
}

// Checks shared by all entry points: dtype, sizes, the shape constraint, int32 widths.
kk_status check_shapes(const char* fn, kk_dtype dtype, int64_t batch, int64_t k, int64_t q,
                       int64_t p, int64_t l, int64_t s, int64_t r) {
  if (dtype_size(dtype) == 0)
    return kk::fail(KK_ERR_UNSUPPORTED_DTYPE,
                    "%s: dtype %d is not supported on CUDA (float32, float16, bfloat16 are)", fn,
                    (int)dtype);
  if (batch < 0) return kk::fail(KK_ERR_INVALID_SIZE, "%s: batch must be >= 0, got %lld", fn, (long long)batch);
  const int64_t dims[6] = {k, q, p, l, s, r};
  const char* names[6] = {"k", "q", "p", "l", "s", "r"};
  for (int i = 0; i < 6; ++i) {
    if (dims[i] <= 0)
      return kk::fail(KK_ERR_INVALID_SIZE, "%s: %s must be > 0, got %lld", fn, names[i],
                      (long long)dims[i]);
    if (dims[i] > INT_MAX)
      return kk::fail(KK_ERR_INVALID_SIZE, "%s: %s = %lld is too large (max %d)", fn, names[i],
                      (long long)dims[i], INT_MAX);
  }
  // Each factor <= INT_MAX, so these products cannot overflow int64.
  if (l * r != k * q)
    return kk::fail(KK_ERR_INVALID_SIZE,
                    "%s: l*r must equal k*q, got l=%lld r=%lld (l*r=%lld) and k=%lld q=%lld (k*q=%lld)",
                    fn, (long long)l, (long long)r, (long long)(l * r), (long long)k, (long long)q,
                    (long long)(k * q));
  if (k * q > INT_MAX || k * p > INT_MAX || l * s > INT_MAX)
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: widths k*q=%lld, k*p=%lld, l*s=%lld must be <= %d", fn,
                    (long long)(k * q), (long long)(k * p), (long long)(l * s), INT_MAX);
  if (ceil_div(batch, 16) > INT_MAX)
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: batch = %lld is too large", fn, (long long)batch);
  return KK_OK;
}

kk_status device_attr(const char* fn, cudaDeviceAttr attr, int* value) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(value, attr, dev);
  if (err != cudaSuccess)
    return kk::fail(KK_ERR_CUDA, "%s: cannot query the device: %s", fn, cudaGetErrorString(err));
  return KK_OK;
}

// ---- forward plan -----------------------------------------------------------------------------
struct FwdPlan {
  int BM, C, BN, ntiles, cached, nz;
  int64_t groups;      // ceil(l / C)
  int64_t smem_bytes;  // dynamic
};

// Shared-memory facts of the device, for the plan.
struct SmemInfo {
  int64_t optin;     // max per block (opt-in)
  int64_t per_sm;    // per multiprocessor
  int64_t reserved;  // reserved by the system per block
};

int64_t fwd_static_smem(int BM) {
  return BM == 64 ? FwdTile<64>::kStaticSmemBytes
                  : BM == 32 ? FwdTile<32>::kStaticSmemBytes : FwdTile<16>::kStaticSmemBytes;
}

// Chooses the batch tile BM, C (output blocks per CTA), whether h is cached and the n-split nz
// with a rough model: time = waves of CTAs x per-CTA work, per-thread work counted in FMAs.
// Stage 1 is paid per chunk at full tile width even when an input-block run is shorter than
// kFwdR; stage 2 per column of the thread's own c; each barrier costs kBarrier.  Without the
// cache stage 1 is repeated for every n-tile; with it, once per z-slice.
FwdPlan plan_fwd(int64_t batch, int64_t q, int64_t p, int64_t l, int64_t s, int64_t r, int sms,
                 const SmemInfo& sm) {
  constexpr int64_t kBarrier = 40;
  FwdPlan best{};
  int64_t best_time = -1;
  for (int BM : {64, 32, 16}) {  // ties keep the larger tile (fewer weight reads)
    const int64_t tm1 = BM / 16, tm2 = BM / 8, kHS = BM + 4, stat = fwd_static_smem(BM);
    const int64_t row_tiles = ceil_div(batch, BM);
    for (int64_t C = 1;; C *= 2) {
      if (C > l) C = l;  // last candidate: every c in one CTA
      const int64_t BN = imin64(ceil_div(s, 4) * 4, (kFwdSlots / C) / 4 * 4);
      const int64_t groups = ceil_div(l, C);
      const int64_t ntiles = ceil_div(s, BN);
      const int64_t total_v = C * r;
      const int64_t run = C >= l ? q : imax64(1, q * C / l);  // rows of one input block per CTA
      const int64_t width1 = imin64(run, kFwdR);
      const int64_t chunks1 = ceil_div(total_v, width1);
      const int64_t s1 = chunks1 * (ceil_div(p, kFwdBK) * (kFwdBK * tm1 * 2 + 2 * kBarrier + 2 * (tm1 + 2)) + kBarrier);
      for (int cached = 1; cached >= 0; --cached) {
        const int64_t dyn = (cached ? total_v : kFwdR) * kHS * 4;
        if (dyn + stat > sm.optin) continue;
        const int64_t occ = imax64(1, imin64(2, sm.per_sm / (dyn + stat + sm.reserved)));
        const int64_t width2 = cached ? kFwdR : width1;
        const int64_t chunks2 = cached ? ceil_div(total_v, kFwdR) : chunks1;
        const int64_t s2 = chunks2 * (ceil_div(width2, C) * (tm2 * 4 + 3) + kFwdR * BN / kFwdThreads * 2 + 2 * kBarrier);
        for (int64_t nz = cached ? 1 : ntiles;; nz = imin64(nz * 2, ntiles)) {
          const int64_t per_cta = cached ? s1 + ceil_div(ntiles, nz) * s2 : s1 + s2;
          const int64_t ctas = row_tiles * groups * nz;
          const int64_t time = ceil_div(ctas, (int64_t)sms * occ) * per_cta;
          if (best_time < 0 || time < best_time) {
            best_time = time;
            best = FwdPlan{BM, (int)C, (int)BN, (int)ntiles, cached, (int)nz, groups, dyn};
          }
          if (nz >= ntiles) break;
        }
      }
      if (C >= l || C * 4 >= kFwdSlots) break;  // BN must stay >= 4
    }
  }
  return best;
}

template <typename T, int BM>
kk_status fwd_launch_bm(const char* fn, const FwdParams& P, const FwdPlan& plan, int64_t batch,
                        int64_t optin, cudaStream_t stream) {
  // The opt-in limit is a property of the kernel, not of the launch: always set the same
  // (largest) value, so host threads launching different shapes cannot undercut each other.
  const int64_t smem_limit = optin - FwdTile<BM>::kStaticSmemBytes;
  const cudaError_t err = cudaFuncSetAttribute(
      monarch_fwd_kernel<T, BM>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_limit);
  if (err != cudaSuccess)
    return kk::fail(KK_ERR_CUDA, "%s: cannot reserve %lld bytes of shared memory: %s", fn,
                    (long long)smem_limit, cudaGetErrorString(err));
  const dim3 grid((unsigned)ceil_div(batch, BM), (unsigned)plan.groups, (unsigned)plan.nz);
  kk::launch(monarch_fwd_kernel<T, BM>, grid, dim3(kFwdThreads), (size_t)plan.smem_bytes, stream, P);
  return check_launch(fn);
}

template <typename T>
kk_status fwd_launch(const char* fn, int64_t batch, int64_t k, int64_t q, int64_t p, int64_t l,
                     int64_t s, int64_t r, const void* x, int64_t ldx, const void* w1,
                     const void* w2, void* out, int64_t ldo, cudaStream_t stream) {
  int sms = 0, optin = 0, per_sm = 0, reserved = 0;
  kk_status st = device_attr(fn, cudaDevAttrMultiProcessorCount, &sms);
  if (st == KK_OK) st = device_attr(fn, cudaDevAttrMaxSharedMemoryPerBlockOptin, &optin);
  if (st == KK_OK) st = device_attr(fn, cudaDevAttrMaxSharedMemoryPerMultiprocessor, &per_sm);
  if (st == KK_OK) st = device_attr(fn, cudaDevAttrReservedSharedMemoryPerBlock, &reserved);
  if (st != KK_OK) return st;
  const FwdPlan plan = plan_fwd(batch, q, p, l, s, r, sms, SmemInfo{optin, per_sm, reserved});
  if (plan.BM == 0)  // not even the uncached plan (~30 KiB) fits: not a supported GPU
    return kk::fail(KK_ERR_CUDA, "%s: the device allows only %d bytes of shared memory per block",
                    fn, optin);
  if (plan.groups > 65535 || plan.nz > 65535)
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: l = %lld or s = %lld needs more than 65535 CTAs per grid axis",
                    fn, (long long)l, (long long)s);
  FwdParams P;
  P.x = x;
  P.w1 = w1;
  P.w2 = w2;
  P.out = out;
  P.batch = batch;
  P.ldx = ldx;
  P.ldo = ldo;
  P.k = (int)k;
  P.q = (int)q;
  P.p = (int)p;
  P.l = (int)l;
  P.s = (int)s;
  P.r = (int)r;
  P.C = plan.C;
  P.BN = plan.BN;
  P.ntiles = plan.ntiles;
  P.cached = plan.cached;
  switch (plan.BM) {
    case 64: return fwd_launch_bm<T, 64>(fn, P, plan, batch, optin, stream);
    case 32: return fwd_launch_bm<T, 32>(fn, P, plan, batch, optin, stream);
    default: return fwd_launch_bm<T, 16>(fn, P, plan, batch, optin, stream);
  }
}

// ---- backward ---------------------------------------------------------------------------------
// Batch splits for a weight gradient (groups x M x N outputs, reduction over the batch): enough
// CTAs to fill ~2 waves of a large GPU, each split >= 512 rows, at most 16.  Depends on shapes
// only, so the workspace size and the summation order are device independent.
int64_t weight_grad_splits(int64_t batch, int64_t groups, int64_t M, int64_t N) {
  const int64_t tiles = groups * ceil_div(M, kGBM) * ceil_div(N, kGBN);
  const int64_t want = ceil_div(264, tiles);
  return imax64(1, imin64(imin64(want, batch / 512), 16));
}

int64_t align256(int64_t bytes) { return ceil_div(bytes, 256) * 256; }

// Workspace layout (byte offsets from the workspace pointer, each region 256-byte aligned):
//   [off_t , +B*k*q*4)          t  = x w1^T, float32, (B, k*q) row-major   (recomputed h = P1 t)
//   [off_dt, +B*k*q*4)          dt = P1^T dh, float32, (B, k*q) row-major
//   [off_p2, +ns2*l*s*r*4)      dw2 partial sums per batch split, float32  (only if ns2 > 1)
//   [off_p1, +ns1*k*q*p*4)      dw1 partial sums per batch split, float32  (only if ns1 > 1)
// total = align256(4*B*k*q) * 2 + [ns2 > 1] align256(4*ns2*l*s*r) + [ns1 > 1] align256(4*ns1*k*q*p)
// The size does not depend on which gradients are requested.
struct BwdLayout {
  int64_t off_t, off_dt, off_p2, off_p1, total;
  int64_t ns1, ns2;
};

kk_status bwd_layout(const char* fn, int64_t batch, int64_t k, int64_t q, int64_t p, int64_t l,
                     int64_t s, int64_t r, BwdLayout* L) {
  const int64_t kq = k * q;
  L->ns1 = weight_grad_splits(batch, k, q, p);
  L->ns2 = weight_grad_splits(batch, l, s, r);
  const int64_t max_ok = INT64_MAX / 64;
  int64_t tb = 0, p2 = 0, p1 = 0;
  if (batch > max_ok / kq || l * s > max_ok / r || k * q > max_ok / p)  // ns <= 16
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: workspace size overflows (batch = %lld)", fn,
                    (long long)batch);
  tb = align256(batch * kq * 4);
  p2 = L->ns2 > 1 ? align256(L->ns2 * l * s * r * 4) : 0;
  p1 = L->ns1 > 1 ? align256(L->ns1 * k * q * p * 4) : 0;
  L->off_t = 0;
  L->off_dt = tb;
  L->off_p2 = 2 * tb;
  L->off_p1 = 2 * tb + p2;
  L->total = 2 * tb + p2 + p1;
  return KK_OK;
}

template <typename TA, typename TB, typename TC>
kk_status gemm_launch(const char* fn, GemmParams P, int64_t groups, int64_t nsplit,
                      cudaStream_t stream) {
  P.tiles_m = ceil_div(P.M, kGBM);
  P.tiles_n = ceil_div(P.N, kGBN);
  P.k_per_split = ceil_div(ceil_div(P.K, nsplit), kGBK) * kGBK;
  const int64_t blocks = groups * P.tiles_m * P.tiles_n;
  if (blocks > INT_MAX)
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: problem too large (%lld CTAs)", fn, (long long)blocks);
  // Across threads, walk the operand dimension with the smaller stride (coalescing).
  P.a_m_fast = P.sAm < P.sAk ? 1 : 0;
  P.b_n_fast = P.sBn < P.sBk ? 1 : 0;
  kk::launch(monarch_gemm_kernel<TA, TB, TC>, dim3((unsigned)blocks, (unsigned)nsplit), dim3(kGThreads), 0,
             stream, P);
  return check_launch(fn);
}

// A weight gradient: straight into dst (type T) when unsplit, else partials + ordered reduction.
template <typename TA, typename TB, typename T>
kk_status weight_grad_launch(const char* fn, GemmParams P, int64_t groups, int64_t nsplit,
                             float* partial, int64_t size, T* dst, cudaStream_t stream) {
  if (nsplit == 1) {
    P.C = dst;
    P.sCsplit = 0;
    return gemm_launch<TA, TB, T>(fn, P, groups, 1, stream);
  }
  P.C = partial;
  P.sCsplit = size;
  kk_status st = gemm_launch<TA, TB, float>(fn, P, groups, nsplit, stream);
  if (st != KK_OK) return st;
  const int64_t blocks = imin64(ceil_div(size, 256), 4096);
  kk::launch(monarch_reduce_splits_kernel<T>, dim3((unsigned)blocks), dim3(256), 0, stream,
             static_cast<const float*>(partial), size, (int)nsplit, dst);
  return check_launch(fn);
}

template <typename T>
kk_status bwd_launch(const char* fn, int64_t batch, int64_t k, int64_t q, int64_t p, int64_t l,
                     int64_t s, int64_t r, const void* x, int64_t ldx, const void* w1,
                     const void* w2, const void* dout, int64_t lddo, void* dx, int64_t lddx,
                     void* dw1, void* dw2, const BwdLayout& L, void* workspace,
                     cudaStream_t stream) {
  const int64_t kq = k * q;
  char* wsb = static_cast<char*>(workspace);
  float* tbuf = reinterpret_cast<float*>(wsb + L.off_t);
  float* dtbuf = reinterpret_cast<float*>(wsb + L.off_dt);
  float* part2 = reinterpret_cast<float*>(wsb + L.off_p2);
  float* part1 = reinterpret_cast<float*>(wsb + L.off_p1);
  kk_status st = KK_OK;

  if (dw2 != nullptr) {
    // t[b, a*q+i] = sum_j x[b, a*p+j] w1[a, i, j]      groups a; M = B, N = q, K = p
    GemmParams G{};
    G.A = x;    G.sAg = p;      G.sAm = ldx; G.sAk = 1;
    G.B = w1;   G.sBg = q * p;  G.sBk = 1;   G.sBn = p;
    G.C = tbuf; G.sCg = q;      G.sCm = kq;  G.sCn = 1;
    G.M = batch; G.N = q; G.K = p;
    st = gemm_launch<T, T, float>(fn, G, k, 1, stream);
    if (st != KK_OK) return st;
    // dw2[c, n, m] = sum_b dout[b, n*l+c] t[b, m*l+c]   groups c; M = s, N = r, K = B
    GemmParams W{};
    W.A = dout; W.sAg = 1;     W.sAm = l;   W.sAk = lddo;
    W.B = tbuf; W.sBg = 1;     W.sBk = kq;  W.sBn = l;
    W.sCg = s * r; W.sCm = r;  W.sCn = 1;
    W.M = s; W.N = r; W.K = batch;
    st = weight_grad_launch<T, float, T>(fn, W, l, L.ns2, part2, l * s * r, static_cast<T*>(dw2),
                                         stream);
    if (st != KK_OK) return st;
  }
  if (dx != nullptr || dw1 != nullptr) {
    // dt[b, m*l+c] = sum_n dout[b, n*l+c] w2[c, n, m]   groups c; M = B, N = r, K = s
    GemmParams D{};
    D.A = dout;  D.sAg = 1;     D.sAm = lddo; D.sAk = l;
    D.B = w2;    D.sBg = s * r; D.sBk = r;    D.sBn = 1;
    D.C = dtbuf; D.sCg = 1;     D.sCm = kq;   D.sCn = l;
    D.M = batch; D.N = r; D.K = s;
    st = gemm_launch<T, T, float>(fn, D, l, 1, stream);
    if (st != KK_OK) return st;
  }
  if (dx != nullptr) {
    // dx[b, a*p+j] = sum_i dt[b, a*q+i] w1[a, i, j]     groups a; M = B, N = p, K = q
    GemmParams X{};
    X.A = dtbuf; X.sAg = q;     X.sAm = kq;   X.sAk = 1;
    X.B = w1;    X.sBg = q * p; X.sBk = p;    X.sBn = 1;
    X.C = dx;    X.sCg = p;     X.sCm = lddx; X.sCn = 1;
    X.M = batch; X.N = p; X.K = q;
    st = gemm_launch<float, T, T>(fn, X, k, 1, stream);
    if (st != KK_OK) return st;
  }
  if (dw1 != nullptr) {
    // dw1[a, i, j] = sum_b dt[b, a*q+i] x[b, a*p+j]     groups a; M = q, N = p, K = B
    GemmParams W{};
    W.A = dtbuf; W.sAg = q;     W.sAm = 1;   W.sAk = kq;
    W.B = x;     W.sBg = p;     W.sBk = ldx; W.sBn = 1;
    W.sCg = q * p; W.sCm = p;   W.sCn = 1;
    W.M = q; W.N = p; W.K = batch;
    st = weight_grad_launch<float, T, T>(fn, W, k, L.ns1, part1, k * q * p, static_cast<T*>(dw1),
                                         stream);
    if (st != KK_OK) return st;
  }
  return KK_OK;
}

}  // namespace

// =================================================================================================
// C ABI
// =================================================================================================
extern "C" {

KK_API kk_status kk_monarch_fwd_cuda(kk_dtype dtype, int64_t batch, int64_t k, int64_t q, int64_t p,
                                     int64_t l, int64_t s, int64_t r, const void* x, int64_t ldx,
                                     const void* w1, const void* w2, void* out, int64_t ldo,
                                     void* stream) {
  static const char* fn = "kk_monarch_fwd_cuda";
  kk::clear_error();
  kk_status st = check_shapes(fn, dtype, batch, k, q, p, l, s, r);
  if (st != KK_OK) return st;
  if (w1 == nullptr) return kk::fail(KK_ERR_NULL_POINTER, "%s: w1 is NULL", fn);
  if (w2 == nullptr) return kk::fail(KK_ERR_NULL_POINTER, "%s: w2 is NULL", fn);
  if (batch == 0) return KK_OK;  // x / out (and their strides) are not used: may be NULL
  if (x == nullptr) return kk::fail(KK_ERR_NULL_POINTER, "%s: x is NULL", fn);
  if (out == nullptr) return kk::fail(KK_ERR_NULL_POINTER, "%s: out is NULL", fn);
  if (ldx < k * p)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: ldx = %lld must be >= k*p = %lld", fn,
                    (long long)ldx, (long long)(k * p));
  if (ldo < l * s)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: ldo = %lld must be >= l*s = %lld", fn,
                    (long long)ldo, (long long)(l * s));
  cudaStream_t st_ = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case KK_FLOAT32: return fwd_launch<float>(fn, batch, k, q, p, l, s, r, x, ldx, w1, w2, out, ldo, st_);
    case KK_FLOAT16: return fwd_launch<__half>(fn, batch, k, q, p, l, s, r, x, ldx, w1, w2, out, ldo, st_);
    case KK_BFLOAT16:
      return fwd_launch<__nv_bfloat16>(fn, batch, k, q, p, l, s, r, x, ldx, w1, w2, out, ldo, st_);
    default: return kk::fail(KK_ERR_INTERNAL, "%s: unreachable dtype %d", fn, (int)dtype);
  }
}

KK_API kk_status kk_monarch_bwd_cuda_workspace_size(kk_dtype dtype, int64_t batch, int64_t k,
                                                    int64_t q, int64_t p, int64_t l, int64_t s,
                                                    int64_t r, int64_t* bytes) {
  static const char* fn = "kk_monarch_bwd_cuda_workspace_size";
  kk::clear_error();
  if (bytes == nullptr) return kk::fail(KK_ERR_NULL_POINTER, "%s: bytes is NULL", fn);
  *bytes = 0;
  kk_status st = check_shapes(fn, dtype, batch, k, q, p, l, s, r);
  if (st != KK_OK) return st;
  BwdLayout L;
  st = bwd_layout(fn, batch, k, q, p, l, s, r, &L);
  if (st != KK_OK) return st;
  *bytes = L.total;
  return KK_OK;
}

KK_API kk_status kk_monarch_bwd_cuda(kk_dtype dtype, int64_t batch, int64_t k, int64_t q, int64_t p,
                                     int64_t l, int64_t s, int64_t r, const void* x, int64_t ldx,
                                     const void* w1, const void* w2, const void* dout, int64_t lddo,
                                     void* dx, int64_t lddx, void* dw1, void* dw2,
                                     void* workspace, int64_t workspace_bytes, void* stream) {
  static const char* fn = "kk_monarch_bwd_cuda";
  kk::clear_error();
  kk_status st = check_shapes(fn, dtype, batch, k, q, p, l, s, r);
  if (st != KK_OK) return st;
  if (w1 == nullptr) return kk::fail(KK_ERR_NULL_POINTER, "%s: w1 is NULL", fn);
  if (w2 == nullptr) return kk::fail(KK_ERR_NULL_POINTER, "%s: w2 is NULL", fn);
  if (workspace_bytes < 0)
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: workspace_bytes must be >= 0, got %lld", fn,
                    (long long)workspace_bytes);
  BwdLayout L;
  st = bwd_layout(fn, batch, k, q, p, l, s, r, &L);
  if (st != KK_OK) return st;
  if (workspace_bytes < L.total)
    return kk::fail(KK_ERR_INVALID_ARGUMENT,
                    "%s: workspace_bytes = %lld is smaller than the %lld bytes required "
                    "(kk_monarch_bwd_cuda_workspace_size)",
                    fn, (long long)workspace_bytes, (long long)L.total);
  if (L.total > 0 && workspace == nullptr)
    return kk::fail(KK_ERR_NULL_POINTER, "%s: workspace is NULL (%lld bytes required)", fn,
                    (long long)L.total);
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0)  // a misaligned access would kill the context
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: workspace must be 16-byte aligned", fn);
  cudaStream_t st_ = static_cast<cudaStream_t>(stream);
  const size_t esz = dtype_size(dtype);
  if (batch == 0) {  // empty batch: the weight gradients are zero, dx is empty
    cudaError_t err = cudaSuccess;
    if (dw1 != nullptr) err = cudaMemsetAsync(dw1, 0, (size_t)(k * q * p) * esz, st_);
    if (err == cudaSuccess && dw2 != nullptr)
      err = cudaMemsetAsync(dw2, 0, (size_t)(l * s * r) * esz, st_);
    if (err != cudaSuccess)
      return kk::fail(KK_ERR_CUDA, "%s: cudaMemsetAsync failed: %s", fn, cudaGetErrorString(err));
    return KK_OK;
  }
  if (dx == nullptr && dw1 == nullptr && dw2 == nullptr) return KK_OK;
  if (dout == nullptr) return kk::fail(KK_ERR_NULL_POINTER, "%s: dout is NULL", fn);
  if (x == nullptr && (dw1 != nullptr || dw2 != nullptr))
    return kk::fail(KK_ERR_NULL_POINTER, "%s: x is NULL", fn);
  if (ldx < k * p)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: ldx = %lld must be >= k*p = %lld", fn,
                    (long long)ldx, (long long)(k * p));
  if (lddo < l * s)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: lddo = %lld must be >= l*s = %lld", fn,
                    (long long)lddo, (long long)(l * s));
  if (dx != nullptr && lddx < k * p)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: lddx = %lld must be >= k*p = %lld", fn,
                    (long long)lddx, (long long)(k * p));
  switch (dtype) {
    case KK_FLOAT32:
      return bwd_launch<float>(fn, batch, k, q, p, l, s, r, x, ldx, w1, w2, dout, lddo, dx, lddx,
                               dw1, dw2, L, workspace, st_);
    case KK_FLOAT16:
      return bwd_launch<__half>(fn, batch, k, q, p, l, s, r, x, ldx, w1, w2, dout, lddo, dx, lddx,
                                dw1, dw2, L, workspace, st_);
    case KK_BFLOAT16:
      return bwd_launch<__nv_bfloat16>(fn, batch, k, q, p, l, s, r, x, ldx, w1, w2, dout, lddo, dx,
                                       lddx, dw1, dw2, L, workspace, st_);
    default: return kk::fail(KK_ERR_INTERNAL, "%s: unreachable dtype %d", fn, (int)dtype);
  }
}

}  // extern "C"
