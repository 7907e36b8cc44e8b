/*
 * Vector-quantized linear layer on CUDA (VQ4DiT, AQLM): dequantize, forward (GEMV and GEMM paths),
 * backward to x, to the codebooks and to the scales, and the k-means assignment step.  C ABI and
 * conventions: csrc/include/kernelkit/vq.h.
 *
 *   codes      [n_out, G, M]      uint8 (code_bits 8) or int16 read as unsigned (code_bits 16), G = n_in/d
 *   codebooks  [S, M, K, d]       T, S = ceil(n_out / rows_per_codebook)
 *   scales     [n_out] T or NULL  bias [n_out] T or NULL
 *   W[o, g*d + t] = scale[o] * sum_m codebooks[o / rpc, m, codes[o, g, m], t]
 *
 *   forward   out[b, o] = bias[o] + sum_i x[b, i] W[o, i]
 *   dx        dx[b, i]  = sum_o dout[b, o] W[o, i]
 *   dcb       dcodebooks[s, m, k, t] = sum_{(o in s, g): codes[o,g,m] = k} scale[o] dW[o, g*d+t],
 *             dW = dout^T x
 *   dscales   dscales[o] = sum_i dW[o, i] U[o, i]   (U = W with scale 1)
 *
 * T is float, __half or __nv_bfloat16; every sum accumulates in float32 and is rounded to nearest
 * once, at the store.  Codes are trusted (the host cannot read device memory; check them with
 * kk_vq_check_codes before the upload).  The dense W is only written by kk_vq_dequantize_cuda.
 *
 * GEMV path (vq_gemv_kernel<T, D, CBS>, AUTO for batch <= kGemvMaxBatch = 16).  The decode case is
 * bound by the bytes of the codes (2 bits/weight for d=4, K=256), so the kernel reads each code
 * once per batch tile of kGemvB = 8 rows (one tile for batch <= 8, two for 16): a CTA of 8 warps
 * owns kGemvRows = 16 output rows of one codebook set (a warp per row, 2 rows per warp; CTAs never
 * straddle two sets, so each stages at most one set), the lanes of a warp walk the row's groups
 * (lane l: groups l, l+32, ...: consecutive lanes read consecutive code bytes), rebuild the
 * group's d weights in registers (D is a template parameter: d in {1,2,4,8,16}) from M codewords
 * and dot them with the tile's 8 x rows, which are staged as float32 in shared memory in chunks of
 * IC input columns (1024, less on a device with little shared memory); a butterfly sums the lanes.
 * The codebook set is staged in shared memory as float32 (CBS = true) when it fits in
 * kCbSmemMax = 48 KiB and the set's rows use every codeword at least once on average (rows * G >=
 * K; else staging would read more than the codes do); otherwise (K = 4096 with d >= 4, K = 65536,
 * per-row codebooks) the codewords are read through the L1/L2 cache (CBS = false).
 *   Why not the per-group lookup table of <x_g, codeword> (what the CPU does): on the GPU the table
 *   for one group is K floats per batch row, built by the whole CTA and read once per output row
 *   of the CTA, so it pays only when a CTA covers >> K/d rows; at K = 256, d = 4 a warp-per-row
 *   reconstruction costs d FMAs per weight per batch row out of registers, which the FMA units
 *   hide behind the code loads.  Not done (to measure on a GPU): 16-byte code loads, codebook
 *   replication across banks (AQLM rotates 8 copies; here lanes that hit the same codeword
 *   broadcast, different codewords in one bank serialize), and split-K for short/wide layers.
 *
 * GEMM path (vq_gemm_kernel<T>, batch > 16, and dx for every batch).  C[b, n] = sum_k A[b, k] B(n, k)
 * with A = x, B(n, k) = W[n, k] for the forward, and A = dout, B(n, k) = W[k, n] (W^T tiles) for dx.
 * A CTA of 256 threads owns a 64 x 64 tile of C and sweeps k in steps of 32: the A tile is copied
 * into shared memory and the W tile is dequantized on the fly into shared memory (scale folded in;
 * d divides 32, so a tile holds whole groups), never the dense W in global memory.  float16 and
 * bfloat16 multiply on the tensor cores (mma.sync m16n8k16 with float32 accumulation, kk::ptx;
 * a warp computes 32 x 16, fragments read as 32-bit words from rows padded to 40 elements: the
 * eight rows of a fragment fall in distinct banks); float32 uses plain FMA (4 x 4 per thread) so
 * results keep float32 accuracy (tf32 would not meet 1e-5).  Not done: cp.async double buffering,
 * larger tiles / ldmatrix, which a cuBLAS-class GEMM needs (goal 0.9x of cuBLAS, unmeasured).
 *
 * Codebook and scale gradients (vq_dw_kernel<T>).  A CTA computes a 64 (rows o) x 64 (inputs i)
 * tile of dW = dout^T x in registers (float32 FMA over the batch in steps of 32 rows staged in
 * shared memory), parks it in shared memory, and then each thread takes whole groups (o, g) of the
 * tile: for every codebook m it adds scale[o] * dW[o, g*d .. g*d+d) onto the codeword
 * codes[o, g, m] with float32 atomicAdd into the workspace, and it adds sum_t dW U onto dscales[o]
 * (U rebuilt from the codebooks).  vq_finish_kernel<T> then rounds the float32 sums into
 * dcodebooks / dscales.  The atomics make the last bits of the codebook gradient run-dependent
 * (vq.h says so).  Not done: shared-memory partial histograms when the set's codebooks fit.
 *
 * Launch bounds: 256 threads everywhere; the GEMV and GEMM kernels declare a minimum of 1 CTA per SM,
 * without which ptxas (CUDA 13) capped them at 64 (sm_80) / 48 (sm_90) registers and spilled.
 *
 * Workspace: the forward needs none; the backward needs float32 [S*M*K*d] (256-byte rounded) plus
 * float32 [n_out] (256-byte rounded), whatever gradients are requested.
 *
 * Assign (vq_assign_kernel<REG>, float32): a thread per vector, the vector in registers (d <= 16,
 * REG) and the centroids staged through shared memory in chunks of 4096 floats, a sorted top-8 in
 * registers (strict comparisons over increasing indices: ties keep the smaller index first).
 * d > 16 reads both from global memory (correct, not tuned).
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../cpu/status.h"
#include "common.cuh"
#include "kernelkit/vq.h"
#include "ptx.cuh"

namespace {

// element conversion and 64-bit index helpers: csrc/cuda/common.cuh
using kk::ceil_div;
using kk::from_f;
using kk::imax64;
using kk::imin64;
using kk::to_f;

constexpr unsigned kFull = 0xffffffffu;
constexpr int kThreads = 256;  // every kernel: 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kMaxGrid = 65535;       // grid.y / grid.z limit; grid.x is capped at this too (loops)
constexpr int kGemvMaxBatch = 16;     // AUTO: GEMV up to this batch
constexpr int kGemvB = 8;             // GEMV batch rows per tile
constexpr int kGemvRpw = 2;           // GEMV rows per warp
constexpr int kGemvRows = kWarps * kGemvRpw;
constexpr int kGemvIC = 1024;         // GEMV x chunk (input columns), largest
constexpr int64_t kCbSmemMax = 48 * 1024;
constexpr int kBM = 64, kBN = 64, kBK = 32;  // GEMM / dW tiles
constexpr int kHS = kBK + 8;                 // 16-bit tiles: row stride (elements)
constexpr int kFS = kBM + 4;                 // float32 tiles [k][m]: row stride (floats)
constexpr int kDWS = kBN + 1;                // dW tile row stride (floats)
constexpr int kAssignSmem = 4096;            // floats of centroids per chunk
constexpr int kTop = 8;

// The format as the kernels see it.
struct Fmt {
  int64_t n_out, n_in, G, K, rpc;  // rpc: rows_per_codebook clamped to [1, max(n_out, 1)]
  int d, M, code_bits;
};

__device__ __forceinline__ uint32_t code_at(const void* codes, int bits, int64_t k) {
  return bits == 8 ? (uint32_t) static_cast<const uint8_t*>(codes)[k]
                   : (uint32_t) static_cast<const uint16_t*>(codes)[k];
}

// Element t of the unscaled group (o, g): sum_m codebooks[o / rpc, m, codes[o, g, m], t].
template <typename T>
__device__ __forceinline__ float group_value(const Fmt& F, const void* codes, const T* __restrict__ cb, int64_t o,
                                             int64_t g, int t) {
  const int64_t cbase = (o / F.rpc) * F.M;
  const int64_t kbase = (o * F.G + g) * F.M;
  float v = 0.f;
  for (int m = 0; m < F.M; ++m) {
    const uint32_t c = code_at(codes, F.code_bits, kbase + m);
    v += to_f(cb[((cbase + m) * F.K + c) * F.d + t]);
  }
  return v;
}

// =================================================================================================
// Dequantize: w[o, i] = W[o, i].  A thread per group, grid-stride.
// =================================================================================================
template <typename T>
__global__ void __launch_bounds__(kThreads) vq_dequantize_kernel(const Fmt F, const void* codes, const T* cb,
                                                                 const T* scales, T* w, int64_t ldw) {
  const int64_t total = F.n_out * F.G;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < total; j += stride) {
    const int64_t o = j / F.G, g = j % F.G;
    const float sc = scales != nullptr ? to_f(scales[o]) : 1.f;
    for (int t = 0; t < F.d; ++t) w[o * ldw + g * F.d + t] = from_f<T>(sc * group_value(F, codes, cb, o, g, t));
  }
}

// =================================================================================================
// GEMV path
// =================================================================================================
struct GemvParams {
  Fmt F;
  const void* codes;
  const void* cb;
  const void* scales;
  const void* bias;
  const void* x;
  void* out;
  int64_t batch, ldx, ldo;
  int64_t blocks_per_set;  // CTAs per codebook set
  int64_t n_blocks;        // n_sets * blocks_per_set
  int64_t batch_tiles;
  int ic;                  // x chunk width (a multiple of 16)
  int cb_floats;           // CBS: floats of one staged set (M*K*d), rounded up to 4
};

// grid = (n_blocks, min(batch_tiles, 65535)); block = kThreads;
// dynamic smem = (CBS ? cb_floats : 0) * 4 + kGemvB * ic * 4.
template <typename T, int D, bool CBS>
__global__ void __launch_bounds__(kThreads, 1) vq_gemv_kernel(const GemvParams P) {
  const Fmt& F = P.F;
  float* sm = kk::dynamic_smem<float>();
  float* cbs = sm;                               // [M*K*D] one set's codebooks (CBS)
  float* xs = sm + (CBS ? P.cb_floats : 0);      // [kGemvB][ic]
  const T* __restrict__ cbg = static_cast<const T*>(P.cb);
  const T* __restrict__ x = static_cast<const T*>(P.x);
  const T* __restrict__ scales = static_cast<const T*>(P.scales);
  const T* __restrict__ bias = static_cast<const T*>(P.bias);
  T* __restrict__ out = static_cast<T*>(P.out);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t MKD = (int64_t)F.M * F.K * D;

  {
    const int64_t blk = blockIdx.x;
    const int64_t s = blk / P.blocks_per_set;
    const int64_t row_lo = s * F.rpc + (blk % P.blocks_per_set) * kGemvRows;
    const int64_t row_hi = imin64((s + 1) * F.rpc, F.n_out);
    if (CBS) {
      const T* src = cbg + s * MKD;
      for (int64_t e = tid; e < MKD; e += kThreads) cbs[e] = to_f(src[e]);
      // published by the barrier before the first chunk's reads
    }
    int64_t rows[kGemvRpw];
#pragma unroll
    for (int i = 0; i < kGemvRpw; ++i) rows[i] = row_lo + warp + kWarps * i;

    for (int64_t bt = blockIdx.y; bt < P.batch_tiles; bt += gridDim.y) {
      const int64_t b0 = bt * kGemvB;
      const int nb = (int)imin64(kGemvB, P.batch - b0);
      float acc[kGemvRpw][kGemvB];
#pragma unroll
      for (int i = 0; i < kGemvRpw; ++i)
#pragma unroll
        for (int bb = 0; bb < kGemvB; ++bb) acc[i][bb] = 0.f;

      for (int64_t c0 = 0; c0 < F.n_in; c0 += P.ic) {
        const int icw = (int)imin64(P.ic, F.n_in - c0);
        __syncthreads();  // the previous chunk's readers of xs are done
        for (int e = tid; e < kGemvB * icw; e += kThreads) {
          const int bb = e / icw, c = e % icw;
          xs[bb * P.ic + c] = bb < nb ? to_f(x[(b0 + bb) * P.ldx + c0 + c]) : 0.f;
        }
        __syncthreads();
        const int64_t g0 = c0 / D, g1 = (c0 + icw) / D;
#pragma unroll
        for (int i = 0; i < kGemvRpw; ++i) {
          const int64_t o = rows[i];
          if (o >= row_hi) continue;  // warp-uniform
          const int64_t kbase = o * F.G * F.M;
          for (int64_t g = g0 + lane; g < g1; g += 32) {
            float w[D];
#pragma unroll
            for (int t = 0; t < D; ++t) w[t] = 0.f;
            for (int m = 0; m < F.M; ++m) {
              const uint32_t c = code_at(P.codes, F.code_bits, kbase + g * F.M + m);
              if (CBS) {
                const float* cw = cbs + ((int64_t)m * F.K + c) * D;
#pragma unroll
                for (int t = 0; t < D; ++t) w[t] += cw[t];
              } else {
                const T* cw = cbg + ((s * F.M + m) * F.K + c) * D;
#pragma unroll
                for (int t = 0; t < D; ++t) w[t] += to_f(__ldg(cw + t));
              }
            }
            const float* xg = xs + (g * D - c0);
#pragma unroll
            for (int bb = 0; bb < kGemvB; ++bb) {
              float sum = 0.f;
#pragma unroll
              for (int t = 0; t < D; ++t) sum = fmaf(xg[bb * P.ic + t], w[t], sum);
              acc[i][bb] += sum;
            }
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kGemvRpw; ++i) {
        const int64_t o = rows[i];
        if (o >= row_hi) continue;  // warp-uniform
        const float sc = scales != nullptr ? to_f(scales[o]) : 1.f;
        const float bv = bias != nullptr ? to_f(bias[o]) : 0.f;
#pragma unroll
        for (int bb = 0; bb < kGemvB; ++bb) {
          float v = acc[i][bb];
#pragma unroll
          for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(kFull, v, off);
          if (lane == 0 && bb < nb) out[(b0 + bb) * P.ldo + o] = from_f<T>(fmaf(v, sc, bv));
        }
      }
    }
  }
}

// =================================================================================================
// GEMM path: C[b, n] = sum_k A[b, k] B(n, k) (+ bias[n]); B(n, k) = W[n, k], or W[k, n] when trans.
// =================================================================================================
struct GemmParams {
  Fmt F;
  const void* codes;
  const void* cb;
  const void* scales;
  const void* bias;   // forward only
  const void* a;      // x or dout (rows, n_k), row stride lda
  void* c;            // out or dx (rows, n_n), row stride ldc
  int64_t rows, lda, ldc;
  int64_t n_n, n_k;   // columns of C and reduction length
  int64_t n_tiles, m_tiles;
  int trans;          // 0: forward (n = o, k = i); 1: dx (n = i, k = o)
};

// Dequantizes the B tile (n0.., k0..) into shared memory: put(nl, kl, value) for every element of
// the kBN x kBK tile (zero outside W).  Whole groups per work item; d divides kBK and kBN.
template <typename T, typename Put>
__device__ __forceinline__ void stage_b(const GemmParams& P, int64_t n0, int64_t k0, Put put) {
  const Fmt& F = P.F;
  const T* __restrict__ cb = static_cast<const T*>(P.cb);
  const T* __restrict__ scales = static_cast<const T*>(P.scales);
  const int d = F.d;
  // W sub-block: rows o in [wo0, wo0 + wr), columns i in [wi0, wi0 + wc)
  const int64_t wo0 = P.trans ? k0 : n0, wi0 = P.trans ? n0 : k0;
  const int wr = P.trans ? kBK : kBN, wc = P.trans ? kBN : kBK;
  const int gpr = wc / d;  // groups per row of the sub-block
  for (int j = threadIdx.x; j < wr * gpr; j += kThreads) {
    const int r = j / gpr, gl = j % gpr;
    const int64_t o = wo0 + r, i0 = wi0 + (int64_t)gl * d;
    const bool in = o < F.n_out && i0 < F.n_in;
    const float sc = in && scales != nullptr ? to_f(scales[o]) : 1.f;
    for (int t = 0; t < d; ++t) {
      const float v = in ? sc * group_value(F, P.codes, cb, o, i0 / d, t) : 0.f;
      const int il = gl * d + t;
      if (P.trans)
        put(il, r, v);
      else
        put(r, il, v);
    }
  }
}

// grid = (m_tiles, n_tiles <= 65535); block = kThreads; no dynamic smem.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) vq_gemm_kernel(const GemmParams P) {
  constexpr bool kMma = sizeof(T) == 2;
  // 16-bit: as[kBM][kHS], bs[kBN][kHS] (T).  float32: as[kBK][kFS], bs[kBK][kFS] (float, k-major).
  constexpr int kTileBytes = kMma ? kBM * kHS * 2 : kBK * kFS * 4;
  __shared__ __align__(16) unsigned char smem_ab[2 * kTileBytes];
  const T* __restrict__ A = static_cast<const T*>(P.a);
  const T* __restrict__ bias = static_cast<const T*>(P.bias);
  T* __restrict__ C = static_cast<T*>(P.c);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;

  {
    {
      const int64_t m0 = (int64_t)blockIdx.x * kBM, n0 = (int64_t)blockIdx.y * kBN;
      float acc[4][4];  // mma: acc[mi * 2 + ni] is a C fragment; FMA: acc[r][c]
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = 0.f;
      for (int64_t k0 = 0; k0 < P.n_k; k0 += kBK) {
        __syncthreads();  // the previous step's readers of the tiles are done
        if constexpr (kMma) {
          T* as = reinterpret_cast<T*>(smem_ab);
          T* bs = reinterpret_cast<T*>(smem_ab + kTileBytes);
          for (int e = tid; e < kBM * kBK; e += kThreads) {
            const int ml = e / kBK, kl = e % kBK;
            const int64_t m = m0 + ml, k = k0 + kl;
            as[ml * kHS + kl] = m < P.rows && k < P.n_k ? A[m * P.lda + k] : from_f<T>(0.f);
          }
          stage_b<T>(P, n0, k0, [&](int nl, int kl, float v) { bs[nl * kHS + kl] = from_f<T>(v); });
          __syncthreads();
          const int g = lane / 4, t4 = lane % 4;
          const int wm = warp / 4, wn = warp % 4;  // warp tile: rows wm*32 .. +32, cols wn*16 .. +16
#pragma unroll
          for (int kk = 0; kk < kBK; kk += 16) {
            uint32_t af[2][4], bf[2][2];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
              const T* base = as + (wm * 32 + mi * 16 + g) * kHS + kk + 2 * t4;
              af[mi][0] = *reinterpret_cast<const uint32_t*>(base);
              af[mi][1] = *reinterpret_cast<const uint32_t*>(base + 8 * kHS);
              af[mi][2] = *reinterpret_cast<const uint32_t*>(base + 8);
              af[mi][3] = *reinterpret_cast<const uint32_t*>(base + 8 * kHS + 8);
            }
#pragma unroll
            for (int ni = 0; ni < 2; ++ni) {
              const T* base = bs + (wn * 16 + ni * 8 + g) * kHS + kk + 2 * t4;
              bf[ni][0] = *reinterpret_cast<const uint32_t*>(base);
              bf[ni][1] = *reinterpret_cast<const uint32_t*>(base + 8);
            }
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
              for (int ni = 0; ni < 2; ++ni) {
                float(&cf)[4] = acc[mi * 2 + ni];
                if constexpr (sizeof(T) == 2 && std::is_same<T, __half>::value)
                  kk::ptx::mma_m16n8k16_f16(cf, af[mi], bf[ni], cf);
                else
                  kk::ptx::mma_m16n8k16_bf16(cf, af[mi], bf[ni], cf);
              }
          }
        } else {
          float* as = reinterpret_cast<float*>(smem_ab);
          float* bs = reinterpret_cast<float*>(smem_ab + kTileBytes);
          for (int e = tid; e < kBM * kBK; e += kThreads) {
            const int ml = e / kBK, kl = e % kBK;
            const int64_t m = m0 + ml, k = k0 + kl;
            as[kl * kFS + ml] = m < P.rows && k < P.n_k ? to_f(A[m * P.lda + k]) : 0.f;
          }
          stage_b<T>(P, n0, k0, [&](int nl, int kl, float v) { bs[kl * kFS + nl] = v; });
          __syncthreads();
          const int ty = tid / 16, tx = tid % 16;
#pragma unroll 4
          for (int kl = 0; kl < kBK; ++kl) {
            const float4 av = *reinterpret_cast<const float4*>(as + kl * kFS + ty * 4);
            const float4 bv = *reinterpret_cast<const float4*>(bs + kl * kFS + tx * 4);
            const float a4[4] = {av.x, av.y, av.z, av.w}, b4[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
              for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(a4[r], b4[c], acc[r][c]);
          }
        }
      }
      // epilogue
      if constexpr (kMma) {
        const int g = lane / 4, t4 = lane % 4;
        const int wm = warp / 4, wn = warp % 4;
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int ni = 0; ni < 2; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int64_t m = m0 + wm * 32 + mi * 16 + g + 8 * (e >> 1);
              const int64_t n = n0 + wn * 16 + ni * 8 + 2 * t4 + (e & 1);
              if (m < P.rows && n < P.n_n)
                C[m * P.ldc + n] = from_f<T>(acc[mi * 2 + ni][e] + (bias != nullptr ? to_f(bias[n]) : 0.f));
            }
      } else {
        const int ty = tid / 16, tx = tid % 16;
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int64_t m = m0 + ty * 4 + r, n = n0 + tx * 4 + c;
            if (m < P.rows && n < P.n_n)
              C[m * P.ldc + n] = from_f<T>(acc[r][c] + (bias != nullptr ? to_f(bias[n]) : 0.f));
          }
      }
    }
  }
}

// =================================================================================================
// Codebook and scale gradients: tiles of dW = dout^T x scattered onto the codewords.
// =================================================================================================
struct DwParams {
  Fmt F;
  const void* codes;
  const void* cb;
  const void* scales;
  const void* x;
  const void* dout;
  float* wcb;   // [S*M*K*d] float32 sums, or NULL (not wanted)
  float* wsc;   // [n_out] float32 sums, or NULL
  int64_t batch, ldx, lddo;
  int64_t o_tiles, i_tiles;
};

// grid = (i_tiles, o_tiles <= 65535); block = kThreads.
template <typename T>
__global__ void __launch_bounds__(kThreads) vq_dw_kernel(const DwParams P) {
  __shared__ __align__(16) float ds[kBK][kFS];   // ds[b][o] = dout[b0+b, o0+o]
  __shared__ __align__(16) float xs[kBK][kFS];   // xs[b][i] = x[b0+b, i0+i]
  __shared__ float dws[kBM][kDWS];               // the finished dW tile
  const Fmt& F = P.F;
  const T* __restrict__ x = static_cast<const T*>(P.x);
  const T* __restrict__ dout = static_cast<const T*>(P.dout);
  const T* __restrict__ cb = static_cast<const T*>(P.cb);
  const T* __restrict__ scales = static_cast<const T*>(P.scales);
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int d = F.d;

  {
    {
      const int64_t o0 = (int64_t)blockIdx.y * kBM, i0 = (int64_t)blockIdx.x * kBN;
      float acc[4][4];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = 0.f;
      for (int64_t b0 = 0; b0 < P.batch; b0 += kBK) {
        __syncthreads();  // the previous step's readers are done
        for (int e = tid; e < kBK * kBM; e += kThreads) {
          const int bl = e / kBM, l = e % kBM;
          const int64_t b = b0 + bl;
          ds[bl][l] = b < P.batch && o0 + l < F.n_out ? to_f(dout[b * P.lddo + o0 + l]) : 0.f;
          xs[bl][l] = b < P.batch && i0 + l < F.n_in ? to_f(x[b * P.ldx + i0 + l]) : 0.f;
        }
        __syncthreads();
#pragma unroll 4
        for (int bl = 0; bl < kBK; ++bl) {
          const float4 dv = *reinterpret_cast<const float4*>(&ds[bl][ty * 4]);
          const float4 xv = *reinterpret_cast<const float4*>(&xs[bl][tx * 4]);
          const float d4[4] = {dv.x, dv.y, dv.z, dv.w}, x4[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
          for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(d4[r], x4[c], acc[r][c]);
        }
      }
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) dws[ty * 4 + r][tx * 4 + c] = acc[r][c];
      __syncthreads();
      // scatter: one group (o, g) of the tile per work item
      const int gpr = kBN / d;
      for (int j = tid; j < kBM * gpr; j += kThreads) {
        const int r = j / gpr, gl = j % gpr;
        const int64_t o = o0 + r, g = (i0 + (int64_t)gl * d) / d;
        if (o >= F.n_out || g >= F.G) continue;
        const float* dwr = &dws[r][gl * d];
        if (P.wcb != nullptr) {
          const float sc = scales != nullptr ? to_f(scales[o]) : 1.f;
          const int64_t cbase = (o / F.rpc) * F.M, kbase = (o * F.G + g) * F.M;
          for (int m = 0; m < F.M; ++m) {
            const uint32_t c = code_at(P.codes, F.code_bits, kbase + m);
            float* dst = P.wcb + ((cbase + m) * F.K + c) * d;
            for (int t = 0; t < d; ++t) atomicAdd(dst + t, sc * dwr[t]);
          }
        }
        if (P.wsc != nullptr) {
          float s = 0.f;
          for (int t = 0; t < d; ++t) s = fmaf(dwr[t], group_value(F, P.codes, cb, o, g, t), s);
          atomicAdd(P.wsc + o, s);
        }
      }
    }
  }
}

// dst[k] = src[k] rounded, k < n.
template <typename T>
__global__ void __launch_bounds__(kThreads) vq_finish_kernel(const float* __restrict__ src, int64_t n,
                                                             T* __restrict__ dst) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += stride) dst[k] = from_f<T>(src[k]);
}

// =================================================================================================
// Assign (float32)
// =================================================================================================
// grid = (min(ceil(n / kThreads), 65535)); block = kThreads.
template <bool REG>
__global__ void __launch_bounds__(kThreads) vq_assign_kernel(const float* __restrict__ V, const float* __restrict__ Cn,
                                                             int64_t n, int64_t K, int d, int topn,
                                                             int32_t* __restrict__ idx, float* __restrict__ dist) {
  __shared__ __align__(16) float cs[kAssignSmem];
  const int chunk = REG ? kAssignSmem / d : 0;
  const int64_t n_blocks = ceil_div(n, kThreads);
  for (int64_t blk = blockIdx.x; blk < n_blocks; blk += gridDim.x) {
    const int64_t v = blk * kThreads + threadIdx.x;
    const bool live = v < n;
    float vr[16];
    if (REG) {
#pragma unroll
      for (int t = 0; t < 16; ++t) vr[t] = live && t < d ? V[v * d + t] : 0.f;
    }
    float bd[kTop];
    int bi[kTop];
#pragma unroll
    for (int j = 0; j < kTop; ++j) {
      bd[j] = 0.f;
      bi[j] = -1;
    }
    auto insert = [&](float dd, int k) {
      if (bi[kTop - 1] >= 0 && !(dd < bd[kTop - 1])) return;
      bd[kTop - 1] = dd;
      bi[kTop - 1] = k;
#pragma unroll
      for (int j = kTop - 1; j > 0; --j) {
        if (bi[j - 1] < 0 || bd[j] < bd[j - 1]) {
          const float tdd = bd[j];
          bd[j] = bd[j - 1];
          bd[j - 1] = tdd;
          const int tii = bi[j];
          bi[j] = bi[j - 1];
          bi[j - 1] = tii;
        }
      }
    };
    if (REG) {
      for (int64_t k0 = 0; k0 < K; k0 += chunk) {
        const int kc = (int)imin64(chunk, K - k0);
        __syncthreads();  // the previous chunk's readers are done
        for (int e = threadIdx.x; e < kc * d; e += kThreads) cs[e] = Cn[k0 * d + e];
        __syncthreads();
        if (live) {
          for (int kk = 0; kk < kc; ++kk) {
            const float* c = cs + kk * d;
            float dd = 0.f;
#pragma unroll
            for (int t = 0; t < 16; ++t) {
              if (t < d) {
                const float df = vr[t] - c[t];
                dd = fmaf(df, df, dd);
              }
            }
            insert(dd, (int)(k0 + kk));
          }
        }
      }
    } else if (live) {
      for (int64_t k = 0; k < K; ++k) {
        float dd = 0.f;
        for (int t = 0; t < d; ++t) {
          const float df = V[v * d + t] - Cn[k * d + t];
          dd = fmaf(df, df, dd);
        }
        insert(dd, (int)k);
      }
    }
    if (live) {
#pragma unroll
      for (int j = 0; j < kTop; ++j)
        if (j < topn) {
          idx[v * topn + j] = bi[j];
          if (dist != nullptr) dist[v * topn + j] = bd[j];
        }
    }
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

#define KK_TRY(expr)              \
  do {                            \
    const kk_status st_ = (expr); \
    if (st_ != KK_OK) return st_; \
  } while (0)

kk_status check_launch(const char* fn) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return kk::fail(KK_ERR_CUDA, "%s: kernel launch failed: %s", fn, cudaGetErrorString(err));
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

kk_status need_ptr(const char* fn, const void* p, const char* name) {
  return p != nullptr ? KK_OK : kk::fail(KK_ERR_NULL_POINTER, "%s: %s is NULL", fn, name);
}

kk_status need_ld(const char* fn, int64_t ld, int64_t width, const char* name, const char* width_name) {
  return ld >= width ? KK_OK
                     : kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: %s (%lld) must be >= the row width %s = %lld",
                                fn, name, (long long)ld, width_name, (long long)width);
}

kk_status check_dtype(const char* fn, kk_dtype dtype) {
  if (dtype_size(dtype) == 0)
    return kk::fail(KK_ERR_UNSUPPORTED_DTYPE,
                    "%s: dtype %d is not supported on CUDA (float32, float16, bfloat16 are)", fn, (int)dtype);
  return KK_OK;
}

kk_status check_batch(const char* fn, int64_t batch) {
  return batch >= 0 ? KK_OK : kk::fail(KK_ERR_INVALID_SIZE, "%s: batch must be >= 0, got %lld", fn, (long long)batch);
}

// The format's fields, as kk_vq_check_codes checks them (without reading the codes).
kk_status check_format(const char* fn, const kk_vq_format* f, Fmt* F) {
  KK_TRY(need_ptr(fn, f, "format"));
  if (f->n_out < 0 || f->n_in < 0)
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: n_out (%lld) and n_in (%lld) must be >= 0", fn, (long long)f->n_out,
                    (long long)f->n_in);
  const int d = f->group_size;
  if (d != 1 && d != 2 && d != 4 && d != 8 && d != 16)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: group_size (d) must be 1, 2, 4, 8 or 16, got %d", fn, d);
  if (f->num_codebooks < 1 || f->num_codebooks > 16)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: num_codebooks (M) must be in 1..16, got %d", fn, f->num_codebooks);
  if (f->code_bits != 8 && f->code_bits != 16)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: code_bits must be 8 or 16, got %d", fn, f->code_bits);
  if (f->codebook_size < 1 || f->codebook_size > (int64_t(1) << f->code_bits))
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: codebook_size (K) must be in 1..%lld for %d-bit codes, got %lld", fn,
                    (long long)(int64_t(1) << f->code_bits), f->code_bits, (long long)f->codebook_size);
  if (f->rows_per_codebook < 1)
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: rows_per_codebook must be >= 1, got %lld", fn,
                    (long long)f->rows_per_codebook);
  if (f->n_in % d != 0)
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: n_in (%lld) must be a multiple of group_size d = %d", fn,
                    (long long)f->n_in, d);
  if (f->flags != 0 && f->flags != KK_VQ_CODES_CHECKED)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: unknown format.flags %d", fn, (int)f->flags);
  // Sizes whose products must stay well inside int64 (elements of codes / codebooks).
  const int64_t lim = int64_t(1) << 46;
  if (f->n_out > lim || f->n_in > lim || (f->n_out > 0 && f->n_in / d > lim / f->n_out))
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: n_out = %lld x n_in = %lld is too large", fn, (long long)f->n_out,
                    (long long)f->n_in);
  F->n_out = f->n_out;
  F->n_in = f->n_in;
  F->G = f->n_in / d;
  F->K = f->codebook_size;
  F->rpc = imin64(f->rows_per_codebook, imax64(f->n_out, 1));
  F->d = d;
  F->M = f->num_codebooks;
  F->code_bits = f->code_bits;
  return KK_OK;
}

int64_t n_sets(const Fmt& F) { return F.n_out == 0 ? 0 : ceil_div(F.n_out, F.rpc); }
int64_t cb_elems(const Fmt& F) { return imax64(n_sets(F), 1) * F.M * F.K * F.d; }
int64_t round256(int64_t b) { return ceil_div(b, 256) * 256; }

kk_status check_workspace(const char* fn, const void* ws, int64_t ws_bytes, int64_t need) {
  if (ws_bytes < 0)
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: workspace_bytes must be >= 0, got %lld", fn, (long long)ws_bytes);
  if (ws_bytes < need)
    return kk::fail(KK_ERR_INVALID_ARGUMENT,
                    "%s: workspace_bytes = %lld is smaller than the %lld bytes required (%s_workspace_size)", fn,
                    (long long)ws_bytes, (long long)need, fn);
  if (need > 0 && ws == nullptr)
    return kk::fail(KK_ERR_NULL_POINTER, "%s: workspace is NULL (%lld bytes required)", fn, (long long)need);
  if (reinterpret_cast<uintptr_t>(ws) % 16 != 0)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: workspace must be 16-byte aligned", fn);
  return KK_OK;
}

// The backward's workspace: float32 codebook sums, then float32 scale sums.
int64_t bwd_cb_bytes(const Fmt& F) { return round256(cb_elems(F) * 4); }
int64_t bwd_workspace(const Fmt& F) { return bwd_cb_bytes(F) + round256(F.n_out * 4); }

template <typename F>
kk_status dispatch(const char* fn, kk_dtype dtype, F&& f) {
  switch (dtype) {
    case KK_FLOAT32: return f(float{});
    case KK_FLOAT16: return f(__half{});
    case KK_BFLOAT16: return f(__nv_bfloat16{});
    default: return kk::fail(KK_ERR_INTERNAL, "%s: unreachable dtype %d", fn, (int)dtype);
  }
}

// Pointers the matmuls read: codes and codebooks when W has elements.
kk_status need_weights(const char* fn, const Fmt& F, const void* codes, const void* codebooks) {
  if (F.n_out > 0 && F.n_in > 0) {
    KK_TRY(need_ptr(fn, codes, "codes"));
    KK_TRY(need_ptr(fn, codebooks, "codebooks"));
  }
  return KK_OK;
}

// ---- GEMV plan --------------------------------------------------------------------------------------
struct GemvPlan {
  bool cbs;
  int ic;
  int cb_floats;
  int64_t smem;
};

kk_status plan_gemv(const char* fn, const Fmt& F, int optin, size_t esize, GemvPlan* p) {
  *p = GemvPlan{};
  const int64_t cbf = ceil_div((int64_t)F.M * F.K * F.d, 4) * 4;
  const int64_t set_rows = imin64(F.rpc, F.n_out);
  const bool worth = set_rows * F.G >= F.K;  // every codeword used about once or more
  (void)esize;
  p->ic = kGemvIC;
  while (p->ic > 64 && (int64_t)kGemvB * p->ic * 4 > optin) p->ic /= 2;
  if ((int64_t)kGemvB * p->ic * 4 > optin)
    return kk::fail(KK_ERR_CUDA, "%s: the device allows only %d bytes of shared memory per block", fn, optin);
  p->cbs = worth && cbf * 4 <= kCbSmemMax && cbf * 4 + (int64_t)kGemvB * p->ic * 4 <= optin;
  p->cb_floats = p->cbs ? (int)cbf : 0;
  p->smem = (int64_t)p->cb_floats * 4 + (int64_t)kGemvB * p->ic * 4;
  return KK_OK;
}

template <typename K>
kk_status allow_smem(const char* fn, K kernel, int optin) {
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
  if (err != cudaSuccess)
    return kk::fail(KK_ERR_CUDA, "%s: cannot reserve %d bytes of shared memory: %s", fn, optin,
                    cudaGetErrorString(err));
  return KK_OK;
}

template <typename T, int D, bool CBS>
kk_status gemv_launch(const char* fn, const GemvParams& P, const GemvPlan& plan, int optin, cudaStream_t st) {
  KK_TRY(allow_smem(fn, vq_gemv_kernel<T, D, CBS>, optin));
  const dim3 grid((unsigned)P.n_blocks, (unsigned)imin64(P.batch_tiles, kMaxGrid));
  kk::launch(vq_gemv_kernel<T, D, CBS>, grid, dim3(kThreads), (size_t)plan.smem, st, P);
  return check_launch(fn);
}

template <typename T, bool CBS>
kk_status gemv_d(const char* fn, const GemvParams& P, const GemvPlan& plan, int optin, cudaStream_t st) {
  switch (P.F.d) {
    case 1: return gemv_launch<T, 1, CBS>(fn, P, plan, optin, st);
    case 2: return gemv_launch<T, 2, CBS>(fn, P, plan, optin, st);
    case 4: return gemv_launch<T, 4, CBS>(fn, P, plan, optin, st);
    case 8: return gemv_launch<T, 8, CBS>(fn, P, plan, optin, st);
    default: return gemv_launch<T, 16, CBS>(fn, P, plan, optin, st);
  }
}

template <typename T>
kk_status gemv_run(const char* fn, GemvParams P, cudaStream_t st) {
  int optin = 0;
  KK_TRY(device_attr(fn, cudaDevAttrMaxSharedMemoryPerBlockOptin, &optin));
  GemvPlan plan;
  KK_TRY(plan_gemv(fn, P.F, optin, sizeof(T), &plan));
  P.ic = plan.ic;
  P.cb_floats = plan.cb_floats;
  P.blocks_per_set = ceil_div(imin64(P.F.rpc, P.F.n_out), kGemvRows);
  P.n_blocks = n_sets(P.F) * P.blocks_per_set;
  P.batch_tiles = ceil_div(P.batch, kGemvB);
  if (P.n_blocks > INT_MAX)
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: n_out = %lld is too large for the GEMV grid", fn, (long long)P.F.n_out);
  return plan.cbs ? gemv_d<T, true>(fn, P, plan, optin, st) : gemv_d<T, false>(fn, P, plan, optin, st);
}

template <typename T>
kk_status gemm_run(const char* fn, GemmParams P, cudaStream_t st) {
  P.n_tiles = ceil_div(P.n_n, kBN);
  P.m_tiles = ceil_div(P.rows, kBM);
  if (P.n_tiles > kMaxGrid || P.m_tiles > INT_MAX)
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: %lld x %lld outputs exceed the GEMM grid (at most %lld columns)", fn,
                    (long long)P.rows, (long long)P.n_n, (long long)kMaxGrid * kBN);
  const dim3 grid((unsigned)P.m_tiles, (unsigned)P.n_tiles);
  kk::launch(vq_gemm_kernel<T>, grid, dim3(kThreads), 0, st, P);
  return check_launch(fn);
}

template <typename T>
kk_status finish(const char* fn, const float* src, int64_t n, void* dst, cudaStream_t st) {
  if (n == 0) return KK_OK;
  const int64_t blocks = imax64(1, imin64(ceil_div(n, kThreads), 4096));
  kk::launch(vq_finish_kernel<T>, dim3((unsigned)blocks), dim3(kThreads), 0, st, src, n, static_cast<T*>(dst));
  return check_launch(fn);
}

kk_status memset0(const char* fn, void* p, int64_t bytes, cudaStream_t st) {
  if (bytes == 0) return KK_OK;
  const cudaError_t err = cudaMemsetAsync(p, 0, (size_t)bytes, st);
  if (err != cudaSuccess) return kk::fail(KK_ERR_CUDA, "%s: cudaMemsetAsync failed: %s", fn, cudaGetErrorString(err));
  return KK_OK;
}

}  // namespace

// =================================================================================================
// C ABI
// =================================================================================================
extern "C" {

KK_API kk_status kk_vq_dequantize_cuda(kk_dtype dtype, const kk_vq_format* format, const void* codes,
                                       const void* codebooks, const void* scales, void* w, int64_t ldw,
                                       void* stream) {
  static const char* fn = "kk_vq_dequantize_cuda";
  kk::clear_error();
  KK_TRY(check_dtype(fn, dtype));
  Fmt F;
  KK_TRY(check_format(fn, format, &F));
  if (F.n_out == 0 || F.n_in == 0) return KK_OK;
  KK_TRY(need_ptr(fn, w, "w"));
  KK_TRY(need_ld(fn, ldw, F.n_in, "ldw", "n_in"));
  KK_TRY(need_weights(fn, F, codes, codebooks));
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch(fn, dtype, [&](auto t) {
    using T = decltype(t);
    const int64_t blocks = imax64(1, imin64(ceil_div(F.n_out * F.G, kThreads), 65535));
    kk::launch(vq_dequantize_kernel<T>, dim3((unsigned)blocks), dim3(kThreads), 0, st, F, codes,
               static_cast<const T*>(codebooks), static_cast<const T*>(scales), static_cast<T*>(w), ldw);
    return check_launch(fn);
  });
}

KK_API kk_status kk_vq_linear_fwd_cuda_workspace_size(kk_dtype dtype, const kk_vq_format* format, int64_t batch,
                                                      int32_t path, int64_t* bytes) {
  static const char* fn = "kk_vq_linear_fwd_cuda_workspace_size";
  kk::clear_error();
  KK_TRY(need_ptr(fn, bytes, "bytes"));
  *bytes = 0;
  KK_TRY(check_dtype(fn, dtype));
  Fmt F;
  KK_TRY(check_format(fn, format, &F));
  KK_TRY(check_batch(fn, batch));
  if (path < KK_VQ_PATH_AUTO || path > KK_VQ_PATH_GEMM)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: path must be 0 (auto), 1 (gemv) or 2 (gemm), got %d", fn, path);
  return KK_OK;  // the forward needs no workspace
}

KK_API kk_status kk_vq_linear_fwd_cuda(kk_dtype dtype, const kk_vq_format* format, int64_t batch, const void* codes,
                                       const void* codebooks, const void* scales, const void* x, int64_t ldx,
                                       const void* bias, void* out, int64_t ldo, int32_t path, void* workspace,
                                       int64_t workspace_bytes, void* stream) {
  static const char* fn = "kk_vq_linear_fwd_cuda";
  kk::clear_error();
  KK_TRY(check_dtype(fn, dtype));
  Fmt F;
  KK_TRY(check_format(fn, format, &F));
  KK_TRY(check_batch(fn, batch));
  if (path < KK_VQ_PATH_AUTO || path > KK_VQ_PATH_GEMM)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: path must be 0 (auto), 1 (gemv) or 2 (gemm), got %d", fn, path);
  KK_TRY(check_workspace(fn, workspace, workspace_bytes, 0));
  if (batch == 0 || F.n_out == 0) return KK_OK;  // nothing to write
  KK_TRY(need_ptr(fn, out, "out"));
  KK_TRY(need_ld(fn, ldo, F.n_out, "ldo", "n_out"));
  if (F.n_in > 0) {
    KK_TRY(need_ptr(fn, x, "x"));
    KK_TRY(need_ld(fn, ldx, F.n_in, "ldx", "n_in"));
    KK_TRY(need_weights(fn, F, codes, codebooks));
  }
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool gemv = path == KK_VQ_PATH_GEMV || (path == KK_VQ_PATH_AUTO && batch <= kGemvMaxBatch);
  return dispatch(fn, dtype, [&](auto t) {
    using T = decltype(t);
    if (gemv) {
      GemvParams P{};
      P.F = F;
      P.codes = codes;
      P.cb = codebooks;
      P.scales = scales;
      P.bias = bias;
      P.x = x;
      P.out = out;
      P.batch = batch;
      P.ldx = ldx;
      P.ldo = ldo;
      return gemv_run<T>(fn, P, st);
    }
    GemmParams P{};
    P.F = F;
    P.codes = codes;
    P.cb = codebooks;
    P.scales = scales;
    P.bias = bias;
    P.a = x;
    P.c = out;
    P.rows = batch;
    P.lda = ldx;
    P.ldc = ldo;
    P.n_n = F.n_out;
    P.n_k = F.n_in;
    P.trans = 0;
    return gemm_run<T>(fn, P, st);
  });
}

KK_API kk_status kk_vq_linear_bwd_cuda_workspace_size(kk_dtype dtype, const kk_vq_format* format, int64_t batch,
                                                      int64_t* bytes) {
  static const char* fn = "kk_vq_linear_bwd_cuda_workspace_size";
  kk::clear_error();
  KK_TRY(need_ptr(fn, bytes, "bytes"));
  *bytes = 0;
  KK_TRY(check_dtype(fn, dtype));
  Fmt F;
  KK_TRY(check_format(fn, format, &F));
  KK_TRY(check_batch(fn, batch));
  *bytes = bwd_workspace(F);  // the same whichever gradients are requested
  return KK_OK;
}

KK_API kk_status kk_vq_linear_bwd_cuda(kk_dtype dtype, const kk_vq_format* format, int64_t batch, const void* codes,
                                       const void* codebooks, const void* scales, const void* x, int64_t ldx,
                                       const void* dout, int64_t lddo, void* dx, int64_t lddx, void* dcodebooks,
                                       void* dscales, void* workspace, int64_t workspace_bytes, void* stream) {
  static const char* fn = "kk_vq_linear_bwd_cuda";
  kk::clear_error();
  KK_TRY(check_dtype(fn, dtype));
  Fmt F;
  KK_TRY(check_format(fn, format, &F));
  KK_TRY(check_batch(fn, batch));
  if (dscales != nullptr && scales == nullptr)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: dscales must be NULL when scales is NULL", fn);
  const int64_t need = bwd_workspace(F);
  KK_TRY(check_workspace(fn, workspace, workspace_bytes, need));
  const bool want_dx = dx != nullptr && batch > 0 && F.n_in > 0;
  const bool want_dcb = dcodebooks != nullptr && F.n_out > 0;
  const bool want_ds = dscales != nullptr && F.n_out > 0;
  if (!want_dx && !want_dcb && !want_ds) return KK_OK;
  const bool reads = batch > 0 && F.n_out > 0 && F.n_in > 0;  // a product reads x, dout and W
  if (want_dx) KK_TRY(need_ld(fn, lddx, F.n_in, "lddx", "n_in"));
  if (reads && (want_dx || want_dcb || want_ds)) {
    KK_TRY(need_ptr(fn, dout, "dout"));
    KK_TRY(need_ld(fn, lddo, F.n_out, "lddo", "n_out"));
    KK_TRY(need_ptr(fn, codes, "codes"));
    if (want_dx || want_ds) KK_TRY(need_ptr(fn, codebooks, "codebooks"));
    if (want_dcb || want_ds) {
      KK_TRY(need_ptr(fn, x, "x"));
      KK_TRY(need_ld(fn, ldx, F.n_in, "ldx", "n_in"));
    }
  }
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const size_t es = dtype_size(dtype);
  if (want_dx && F.n_out == 0) {  // W has no rows: dx = 0 (one memset, or one per row when strided)
    if (lddx == F.n_in) {
      KK_TRY(memset0(fn, dx, batch * F.n_in * (int64_t)es, st));
    } else {
      for (int64_t b = 0; b < batch; ++b)
        KK_TRY(memset0(fn, static_cast<char*>(dx) + b * lddx * (int64_t)es, F.n_in * (int64_t)es, st));
    }
  }
  return dispatch(fn, dtype, [&](auto t) -> kk_status {
    using T = decltype(t);
    if (want_dx && F.n_out > 0) {
      GemmParams P{};
      P.F = F;
      P.codes = codes;
      P.cb = codebooks;
      P.scales = scales;
      P.bias = nullptr;
      P.a = dout;
      P.c = dx;
      P.rows = batch;
      P.lda = lddo;
      P.ldc = lddx;
      P.n_n = F.n_in;
      P.n_k = F.n_out;
      P.trans = 1;
      KK_TRY(gemm_run<T>(fn, P, st));
    }
    if (!want_dcb && !want_ds) return KK_OK;
    float* wcb = static_cast<float*>(workspace);
    float* wsc = reinterpret_cast<float*>(static_cast<char*>(workspace) + bwd_cb_bytes(F));
    if (!reads) {  // empty batch or no inputs: the gradients are zero
      if (want_dcb) KK_TRY(memset0(fn, dcodebooks, n_sets(F) * F.M * F.K * F.d * (int64_t)es, st));
      if (want_ds) KK_TRY(memset0(fn, dscales, F.n_out * (int64_t)es, st));
      return KK_OK;
    }
    if (want_dcb) KK_TRY(memset0(fn, wcb, n_sets(F) * F.M * F.K * F.d * 4, st));
    if (want_ds) KK_TRY(memset0(fn, wsc, F.n_out * 4, st));
    DwParams P{};
    P.F = F;
    P.codes = codes;
    P.cb = codebooks;
    P.scales = scales;
    P.x = x;
    P.dout = dout;
    P.wcb = want_dcb ? wcb : nullptr;
    P.wsc = want_ds ? wsc : nullptr;
    P.batch = batch;
    P.ldx = ldx;
    P.lddo = lddo;
    P.o_tiles = ceil_div(F.n_out, kBM);
    P.i_tiles = ceil_div(F.n_in, kBN);
    if (P.o_tiles > kMaxGrid || P.i_tiles > INT_MAX)
      return kk::fail(KK_ERR_INVALID_SIZE, "%s: n_out = %lld is too large for the gradient grid (at most %lld)", fn,
                      (long long)F.n_out, (long long)kMaxGrid * kBM);
    const dim3 grid((unsigned)P.i_tiles, (unsigned)P.o_tiles);
    kk::launch(vq_dw_kernel<T>, grid, dim3(kThreads), 0, st, P);
    KK_TRY(check_launch(fn));
    if (want_dcb) KK_TRY(finish<T>(fn, wcb, n_sets(F) * F.M * F.K * F.d, dcodebooks, st));
    if (want_ds) KK_TRY(finish<T>(fn, wsc, F.n_out, dscales, st));
    return KK_OK;
  });
}

KK_API kk_status kk_vq_assign_cuda(kk_dtype dtype, int64_t n, int64_t K, int32_t d, const void* vectors,
                                   const void* centroids, int32_t topn, int32_t* idx, void* dist, void* stream) {
  static const char* fn = "kk_vq_assign_cuda";
  kk::clear_error();
  if (dtype != KK_FLOAT32)
    return kk::fail(KK_ERR_UNSUPPORTED_DTYPE, "%s: dtype %d is not supported (float32 is)", fn, (int)dtype);
  if (n < 0) return kk::fail(KK_ERR_INVALID_SIZE, "%s: n must be >= 0, got %lld", fn, (long long)n);
  if (K < 1 || K > INT_MAX)
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: K must be in 1..%d, got %lld", fn, INT_MAX, (long long)K);
  if (d < 1) return kk::fail(KK_ERR_INVALID_SIZE, "%s: d must be >= 1, got %d", fn, d);
  if (topn < 1 || topn > kTop || topn > K)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: topn must be in 1..min(8, K) = %lld, got %d", fn,
                    (long long)imin64(kTop, K), topn);
  if (n == 0) return KK_OK;
  KK_TRY(need_ptr(fn, vectors, "vectors"));
  KK_TRY(need_ptr(fn, centroids, "centroids"));
  KK_TRY(need_ptr(fn, idx, "idx"));
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const dim3 grid((unsigned)imin64(ceil_div(n, kThreads), kMaxGrid));
  const float* V = static_cast<const float*>(vectors);
  const float* C = static_cast<const float*>(centroids);
  float* D = static_cast<float*>(dist);
  if (d <= 16)
    kk::launch(vq_assign_kernel<true>, grid, dim3(kThreads), 0, st, V, C, n, K, (int)d, (int)topn, idx, D);
  else
    kk::launch(vq_assign_kernel<false>, grid, dim3(kThreads), 0, st, V, C, n, K, (int)d, (int)topn, idx, D);
  return check_launch(fn);
}

}  // extern "C"
