/*
 * Unstructured-sparse linear layer on CUDA: SpMM forward, SpMM backward to x, SDDMM backward to
 * the values.  C ABI and conventions: csrc/include/kernelkit/sparse.h.
 *
 * Source: Sparse-IFT (Thangarasa et al., ICML 2024) trains layers whose weight W (n_out x n_in) is
 * unstructured-sparse; the kernels follow Sputnik (Gale et al., "Sparse GPU Kernels for Deep
 * Learning", SC'20): treat out^T = W x^T, a CTA owns a few rows of W and a tile of the batch,
 * the row's (column, value) chunk is staged in shared memory and every lane of a warp works on
 * a different batch element of the same nonzero, so the nonzeros are read once per batch tile.
 *
 *   W     CSR: row_ptr int64 [n_out+1], col_idx int32 [nnz], values T [nnz]
 *         CSC of the same values: col_ptr int64 [n_in+1], row_idx int32 [nnz], perm int64 [nnz]
 *   x     (batch, n_in)   row stride ldx       out, dout (batch, n_out)  row strides ldo, lddo
 *   dx    (batch, n_in)   row stride lddx      bias T [n_out] or NULL
 *
 *   forward    out[b, r]  = bias[r] + sum_{k in row r} values[k] x[b, col_idx[k]]
 *   dx         dx[b, c]   = sum_{k in column c} values[perm[k]] dout[b, row_idx[k]]
 *   dvalues    dvalues[k] = sum_b dout[b, r_k] x[b, col_idx[k]]                    (SDDMM)
 *
 * T is float, __half or __nv_bfloat16; every sum accumulates in float32 (fp32 FMA, no tensor
 * cores) and is rounded to nearest once, at the store.  Indices are trusted (the host cannot read
 * device memory; sparse.h says to check them with kk_sparse_check_csr before the upload).
 *
 * One SpMM kernel family serves the forward and dx: dx = dout W is the forward of W^T, whose CSR
 * is (col_ptr, row_idx) with the values read through perm, so no values are transposed and no
 * atomics are needed ("rows" below are rows of the matrix being applied: n_out rows for the
 * forward, n_in for dx).
 *
 * SpMM, tiled (sparse_spmm_tile_kernel, batch > kVecMaxBatch).  A CTA of 8 warps owns RB = 8*RPW
 * rows (row warp + 8*i, interleaved so that a band of long rows spreads over the warps) and a
 * batch tile of BM = 32*V rows, V = 8 bytes / sizeof(T) (64 fp32 or 128 half rows): lane l holds
 * the V accumulators of batch rows l*V .. l*V+V-1 for each of its warp's RPW rows.  The CTA
 * sweeps the columns in chunks of KC: the chunk x[b0 : b0+BM, c0 : c0+KC] is copied into shared
 * memory transposed, xs[c][b] (global reads coalesced along the row of x, one 8-byte vector store
 * per thread, conflict-free with the 8-byte row pad), and for every nonzero of its rows that falls
 * in the chunk a warp reads one 256-byte row xs[c][:] (lane l: 8 bytes, conflict-free) and does
 * V FMAs per lane.  Why a dense tile rather than Sputnik's per-nonzero reads of a transposed x:
 * each x element loaded into shared memory serves every row of the CTA that has that column
 * (RB * density of them, 6.4 for RB = 64 at 90% sparsity), so global/L2 traffic is
 * n_rows/RB * batch * n_in elements whatever the density, against nnz * batch for per-nonzero
 * reads; and x needs no transpose pass (no workspace).  The chunks are not aligned: each starts at
 * the smallest column any of the CTA's rows still needs (a CTA-wide min), so empty column ranges
 * are skipped and the sweep ends when every row is exhausted.
 *   Each row keeps a 32-entry window of its (column, value) pairs in registers (one per lane,
 *   values read through perm for dx); per chunk the entries below c0+KC are a contiguous run of
 *   the window (columns increase), found with one ballot, staged as (column - c0, value) in
 *   shared memory and read back as warp-wide broadcasts; the window refills when used up.  The
 *   index arrays are thus read once per batch tile.  KC (32..256) grows as the density falls, so
 *   a chunk holds ~8 nonzeros per row; RPW (8, or 2 when 64-row blocks would not give two CTAs
 *   per SM) trades parallelism for x reuse.  The results leave through shared memory,
 *   os[b][r], so the stores to out are runs of RB contiguous elements instead of scattered ones.
 * SpMM, small batch (sparse_spmm_vec_kernel, batch <= kVecMaxBatch): a warp per row, the lanes
 * split the row's nonzeros, each lane accumulates up to 8 batch rows, then a butterfly
 * reduction (the decode / fine-tuning case, where a batch tile would leave most lanes idle).
 *
 * SDDMM, tiled (sparse_sddmm_tile_kernel, batch > kVecMaxBatch).  A CTA owns 32 rows (4 per warp)
 * and a batch tile of BS = 32*VS rows, VS = 16 bytes / sizeof(T): dout[b0 : b0+BS, r0 : r0+32] is
 * staged transposed, ds[r][b], then the same chunked sweep over the columns with the x chunk
 * xs[c][b] (16-byte vectors).  For a nonzero (r, c) lane l forms sum over its VS batch rows of
 * ds[r][b] xs[c][b] and a 5-step butterfly sums the lanes; lane j keeps the j-th result of the
 * staged run and the run is stored as one coalesced write.  The batch is split into S groups of
 * tiles (grid.y = S): split s handles tiles s, s+S, ... and accumulates its float32 partial sum of
 * each nonzero in the workspace (written by its first tile, added to by the next ones: the same
 * CTA, a fixed order); sparse_reduce_splits_kernel then adds the S partials in split order and
 * rounds.  Deterministic, no float atomics.  With a single tile the CTA writes dvalues directly.
 * S depends on the shapes only (about kSddmmTargetCtas CTAs, at most kMaxSplits), so the
 * workspace size and the summation order do not depend on the device.
 * SDDMM, small batch (sparse_sddmm_vec_kernel): a lane per nonzero, looping over the batch.
 *
 * Workspace: the forward needs none; the backward needs S * nnz float32 partials (256-byte
 * rounded) when the SDDMM batch spans more than one tile, else none.
 *
 * Expected cost (a model, not a measurement: no GPU was available when this was written).  Per
 * nonzero a warp reads one 8-byte broadcast and one 256-byte xs row (3 shared-memory wavefronts)
 * for 32*V FMAs: ~43 FMA/clock/SM in bf16, a third of the fp32 FMA peak, so shared-memory
 * bandwidth bounds the SpMM.  At the issue's shape (4096 x 4096, batch 2048, 90% sparse, bf16) that
 * is ~0.35 ms on an H100/H200 against ~0.1 ms for cuBLAS's dense bf16 GEMM on tensor cores: the
 * break-even with dense would be near 97% sparsity, not 90%.  To be measured (bench_sparse.py).
 *
 * Not done: row reordering by length (the host cannot read the indices; the CTA-wide sweep waits
 * for its longest row per chunk), tensor cores, cp.async double buffering and 16-byte global
 * loads for the x chunk.
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

constexpr unsigned kFull = 0xffffffffu;
constexpr int kThreads = 256;  // every kernel: 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kVecMaxBatch = 16;  // up to this batch the vec kernels run (no batch tile)
constexpr int kVecB = 8;          // batch rows per vec SpMM CTA (grid.y covers the rest)
constexpr int kSddmmRpw = 4;      // SDDMM rows per warp
constexpr int kSddmmRows = kWarps * kSddmmRpw;
constexpr int kSddmmTargetCtas = 512;  // SDDMM batch splits aim at about this many CTAs ...
constexpr int kMaxSplits = 16;         // ... with at most this many splits
constexpr int kMaxGridY = 65535;

// N elements of T moved as one vector (8 or 16 bytes).
template <typename T, int N>
struct alignas(N * sizeof(T)) Pack {
  T v[N];
};

// =================================================================================================
// SpMM: forward (CSR) and dx (CSC through perm)
// =================================================================================================
struct SpmmParams {
  const int64_t* ptr;   // [n_rows + 1]
  const int32_t* idx;   // [nnz] column of each entry, in [0, n_cols)
  const int64_t* perm;  // [nnz] or NULL: entry k has value values[perm ? perm[k] : k]
  const void* values;
  const void* x;        // (batch, n_cols), row stride ldx
  const void* bias;     // [n_rows] or NULL
  void* out;            // (batch, n_rows), row stride ldo
  int64_t batch, ldx, ldo;
  int64_t batch_tiles;  // tile kernel: ceil(batch / BM); grid.y strides over them
  int n_rows, n_cols;
  int kc;               // tile kernel: columns per chunk
};

// Tile geometry of the SpMM tile kernel for element type T and RPW rows per warp.
template <typename T, int RPW>
struct SpmmTile {
  static constexpr int kV = 8 / (int)sizeof(T);      // batch rows per lane (one 8-byte vector)
  static constexpr int kBM = 32 * kV;                // batch rows per CTA
  static constexpr int kXS = kBM + kV;               // xs row stride: 8-byte pad, conflict-free stores
  static constexpr int kRB = kWarps * RPW;           // rows per CTA
  static constexpr int kOS = kRB + (sizeof(T) == 4 ? 1 : 2);  // os row stride: an odd word count
  static constexpr int64_t kXsRowBytes = (int64_t)kXS * sizeof(T);  // 264
  static constexpr int64_t kOsBytes = (int64_t)kBM * kOS * sizeof(T);
  static constexpr int64_t kStaticSmemBytes = kWarps * 32 * 8 + 2 * kWarps * 4;  // meta + wmin
  static int64_t dyn_smem(int kc) { return imax64((int64_t)kc * kXsRowBytes, kOsBytes); }
};

// Value of entry k (through perm for dx).
template <typename T>
__device__ __forceinline__ float entry_value(const SpmmParams& P, int64_t k) {
  const T* __restrict__ values = static_cast<const T*>(P.values);
  return to_f(values[P.perm != nullptr ? P.perm[k] : k]);
}

// The 32-entry window starting at entry kb of a row ending at kend: lane l holds entry kb + l,
// or column INT_MAX past the end of the row.
template <typename T>
__device__ __forceinline__ void load_window(const SpmmParams& P, int64_t kb, int64_t kend, int lane,
                                            int& wc, float& wv) {
  const int64_t k = kb + lane;
  if (k < kend) {
    wc = P.idx[k];
    wv = entry_value<T>(P, k);
  } else {
    wc = INT_MAX;
    wv = 0.f;
  }
}

// The smallest of every warp's `mine` (a CTA-wide min through shared memory).  Also the barrier
// that separates one chunk's readers of the tiles from the next chunk's writers.  wmin holds two
// buffers used in turn (`phase` flips): a warp that has read the result of one call can only write
// this buffer again after the next call's barrier, which every other warp reaches only after
// reading it too.  (With one buffer, a fast warp could start the next batch tile and overwrite its
// entry before a slow warp has read it, and the two would disagree on whether the sweep is over.)
__device__ __forceinline__ int cta_min(int mine, int (*wmin)[kWarps], int& phase, int warp, int lane) {
  int* buf = wmin[phase];
  phase ^= 1;
  if (lane == 0) buf[warp] = mine;
  __syncthreads();
  int m = INT_MAX;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) m = min(m, buf[w]);
  return m;
}

// grid = (ceil(n_rows / RB), min(batch_tiles, 65535)); block = kThreads;
// dynamic smem = SpmmTile<T, RPW>::dyn_smem(kc).
template <typename T, int RPW>
__global__ void __launch_bounds__(kThreads, 2) sparse_spmm_tile_kernel(const SpmmParams P) {
  using Tile = SpmmTile<T, RPW>;
  constexpr int V = Tile::kV, BM = Tile::kBM, XS = Tile::kXS, RB = Tile::kRB, OS = Tile::kOS;
  using VecT = Pack<T, V>;
  __shared__ __align__(8) int2 meta[kWarps][32];  // staged run: (column - c0, value bits)
  __shared__ int wmin[2][kWarps];
  T* xs = kk::dynamic_smem<T>();  // xs[c][b] (KC x XS); after the sweep: os[b][r] (BM x OS)

  const T* __restrict__ x = static_cast<const T*>(P.x);
  const T* __restrict__ bias = static_cast<const T*>(P.bias);
  T* __restrict__ out = static_cast<T*>(P.out);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t r0 = (int64_t)blockIdx.x * RB;
  int phase = 0;  // cta_min's buffer

  for (int64_t bt = blockIdx.y; bt < P.batch_tiles; bt += gridDim.y) {
    const int64_t b0 = bt * BM;
    // Row i of this warp is r0 + warp + kWarps*i: its window base kb, consumed count off (< 32
    // between chunks: a used-up window is refilled at once), and the window itself.
    int64_t kb[RPW];
    int off[RPW], wc[RPW];
    float wv[RPW], acc[RPW][V];
    int next = INT_MAX;  // smallest column the warp's rows still need
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      const int64_t r = r0 + warp + kWarps * i;
      int64_t kend = 0;
      kb[i] = 0;
      if (r < P.n_rows) {
        kb[i] = P.ptr[r];
        kend = P.ptr[r + 1];
      }
      load_window<T>(P, kb[i], kend, lane, wc[i], wv[i]);
      off[i] = 0;
      next = min(next, __shfl_sync(kFull, wc[i], 0));
#pragma unroll
      for (int v = 0; v < V; ++v) acc[i][v] = 0.f;
    }
    int c0 = cta_min(next, wmin, phase, warp, lane);

    while (c0 != INT_MAX) {
      const int kc = (int)imin64(P.kc, (int64_t)P.n_cols - c0);  // columns of this chunk
      const int climit = c0 + kc;
      // xs[cc][bv*V .. bv*V+V) = x[b0 + bv*V .. , c0 + cc]: consecutive lanes read consecutive
      // columns of one row of x (coalesced), each thread stores one V-vector.
      for (int bv = warp; bv < BM / V; bv += kWarps) {
        for (int cc = lane; cc < kc; cc += 32) {
          VecT p;
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const int64_t b = b0 + bv * V + v;
            p.v[v] = b < P.batch ? x[b * P.ldx + c0 + cc] : from_f<T>(0.f);
          }
          *reinterpret_cast<VecT*>(xs + cc * XS + bv * V) = p;
        }
      }
      __syncthreads();

      next = INT_MAX;
#pragma unroll
      for (int i = 0; i < RPW; ++i) {
        while (true) {
          // The window's entries in this chunk: a contiguous run from lane off[i] (wc >= c0 holds
          // for every remaining entry since c0 is the CTA's smallest remaining column).
          const bool in = lane >= off[i] && wc[i] < climit;
          const int cnt = __popc(__ballot_sync(kFull, in));
          if (cnt == 0) break;
          if (in) meta[warp][lane - off[i]] = make_int2(wc[i] - c0, __float_as_int(wv[i]));
          __syncwarp();
          // Unrolled by 4: four independent xs loads in flight (and no spill at 128 registers).
#pragma unroll 4
          for (int j = 0; j < cnt; ++j) {
            const int2 m = meta[warp][j];  // broadcast
            const float w = __int_as_float(m.y);
            const VecT xv = *reinterpret_cast<const VecT*>(xs + m.x * XS + lane * V);
#pragma unroll
            for (int v = 0; v < V; ++v) acc[i][v] = fmaf(w, to_f(xv.v[v]), acc[i][v]);
          }
          __syncwarp();  // meta is rewritten by the next run
          off[i] += cnt;
          if (off[i] < 32) break;
          // window used up: the next 32 entries (the run may go on into them)
          kb[i] += 32;
          off[i] = 0;
          const int64_t r = r0 + warp + kWarps * i;
          load_window<T>(P, kb[i], P.ptr[r + 1], lane, wc[i], wv[i]);
        }
        next = min(next, __shfl_sync(kFull, wc[i], off[i]));
      }
      c0 = cta_min(next, wmin, phase, warp, lane);  // also: every warp is done with xs
    }

    // Epilogue: os[b][r] = acc + bias, rounded; then runs of RB contiguous outputs per batch row.
    T* os = xs;
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      const int rl = warp + kWarps * i;
      const int64_t r = r0 + rl;
      const float bv = (bias != nullptr && r < P.n_rows) ? to_f(bias[r]) : 0.f;
#pragma unroll
      for (int v = 0; v < V; ++v) os[(lane * V + v) * OS + rl] = from_f<T>(acc[i][v] + bv);
    }
    __syncthreads();
    for (int e = tid; e < BM * RB; e += kThreads) {
      const int rl = e % RB, bl = e / RB;
      const int64_t b = b0 + bl, r = r0 + rl;
      if (b < P.batch && r < P.n_rows) out[b * P.ldo + r] = os[bl * OS + rl];
    }
    // The next tile's first cta_min is the barrier before xs is overwritten.
  }
}

// grid = (ceil(n_rows / kWarps), ceil(batch / kVecB)); block = kThreads.  A warp per row; no barriers.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) sparse_spmm_vec_kernel(const SpmmParams P) {
  const T* __restrict__ x = static_cast<const T*>(P.x);
  const T* __restrict__ bias = static_cast<const T*>(P.bias);
  T* __restrict__ out = static_cast<T*>(P.out);
  const int lane = threadIdx.x % 32;
  const int64_t r = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  if (r >= P.n_rows) return;  // the whole warp
  const int64_t b0 = (int64_t)blockIdx.y * kVecB;
  const int nb = (int)imin64(kVecB, P.batch - b0);
  float acc[kVecB];
#pragma unroll
  for (int b = 0; b < kVecB; ++b) acc[b] = 0.f;
  const int64_t kend = P.ptr[r + 1];
  for (int64_t k = P.ptr[r] + lane; k < kend; k += 32) {
    const float w = entry_value<T>(P, k);
    const T* xc = x + b0 * P.ldx + P.idx[k];
#pragma unroll
    for (int b = 0; b < kVecB; ++b)
      if (b < nb) acc[b] = fmaf(w, to_f(xc[b * P.ldx]), acc[b]);
  }
  float mine = 0.f;  // lane b keeps batch row b's sum
#pragma unroll
  for (int b = 0; b < kVecB; ++b) {
    float s = acc[b];
#pragma unroll
    for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(kFull, s, o);
    if (lane == b) mine = s;
  }
  if (lane < nb) {
    const float bv = bias != nullptr ? to_f(bias[r]) : 0.f;
    out[(b0 + lane) * P.ldo + r] = from_f<T>(mine + bv);
  }
}

// =================================================================================================
// SDDMM: dvalues
// =================================================================================================
struct SddmmParams {
  const int64_t* row_ptr;  // [n_rows + 1]
  const int32_t* col_idx;  // [nnz]
  const void* x;           // (batch, n_cols), row stride ldx
  const void* dout;        // (batch, n_rows), row stride lddo
  void* dvalues;           // [nnz] (direct) ...
  float* partial;          // ... or [nsplit][nnz] float32 partial sums
  int64_t batch, ldx, lddo, nnz;
  int64_t batch_tiles;     // tile kernel: ceil(batch / BS); split s takes tiles s, s + nsplit, ...
  int n_rows, n_cols;
  int kc;                  // tile kernel: columns per chunk
  int direct;              // 1: one tile, results go straight to dvalues
};

template <typename T>
struct SddmmTile {
  static constexpr int kV = 16 / (int)sizeof(T);  // batch rows per lane (one 16-byte vector)
  static constexpr int kBS = 32 * kV;             // batch rows per tile (128 fp32, 256 half)
  static constexpr int kXS = kBS + kV;            // 16-byte row pad: conflict-free vector stores
  static constexpr int64_t kRowBytes = (int64_t)kXS * sizeof(T);  // 528
  static constexpr int64_t kStaticSmemBytes = kWarps * 32 * 4 + 2 * kWarps * 4;  // meta + wmin
  static int64_t dyn_smem(int kc) { return (int64_t)(kSddmmRows + kc) * kRowBytes; }
};

// grid = (ceil(n_rows / 32), nsplit); block = kThreads; dynamic smem = SddmmTile<T>::dyn_smem(kc):
// ds[32][XS] then xs[kc][XS].
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) sparse_sddmm_tile_kernel(const SddmmParams P) {
  using Tile = SddmmTile<T>;
  constexpr int V = Tile::kV, BS = Tile::kBS, XS = Tile::kXS, RPW = kSddmmRpw;
  using VecT = Pack<T, V>;
  __shared__ int meta[kWarps][32];  // staged run: column - c0
  __shared__ int wmin[2][kWarps];
  T* ds = kk::dynamic_smem<T>();  // ds[r][b]
  T* xs = ds + kSddmmRows * XS;   // xs[c][b]

  const T* __restrict__ x = static_cast<const T*>(P.x);
  const T* __restrict__ dout = static_cast<const T*>(P.dout);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t r0 = (int64_t)blockIdx.x * kSddmmRows;
  float* __restrict__ part = P.direct ? nullptr : P.partial + (int64_t)blockIdx.y * P.nnz;
  int phase = 0;  // cta_min's buffer

  for (int64_t bt = blockIdx.y; bt < P.batch_tiles; bt += gridDim.y) {
    const int64_t b0 = bt * BS;
    const bool first = bt == blockIdx.y;
    int64_t kb[RPW];
    int off[RPW], wc[RPW];
    int next = INT_MAX;
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      const int64_t r = r0 + warp + kWarps * i;
      int64_t kend = 0;
      kb[i] = 0;
      if (r < P.n_rows) {
        kb[i] = P.row_ptr[r];
        kend = P.row_ptr[r + 1];
      }
      wc[i] = kb[i] + lane < kend ? P.col_idx[kb[i] + lane] : INT_MAX;
      off[i] = 0;
      next = min(next, __shfl_sync(kFull, wc[i], 0));
    }
    // ds[rl][bv*V .. +V) = dout[b0 + bv*V .., r0 + rl]: lanes read consecutive columns of dout.
    for (int bv = warp; bv < BS / V; bv += kWarps) {
      const int rl = lane;  // kSddmmRows == 32
      const int64_t r = r0 + rl;
      VecT p;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const int64_t b = b0 + bv * V + v;
        p.v[v] = (b < P.batch && r < P.n_rows) ? dout[b * P.lddo + r] : from_f<T>(0.f);
      }
      *reinterpret_cast<VecT*>(ds + rl * XS + bv * V) = p;
    }
    int c0 = cta_min(next, wmin, phase, warp, lane);  // also publishes ds

    while (c0 != INT_MAX) {
      const int kc = (int)imin64(P.kc, (int64_t)P.n_cols - c0);
      const int climit = c0 + kc;
      for (int bv = warp; bv < BS / V; bv += kWarps) {
        for (int cc = lane; cc < kc; cc += 32) {
          VecT p;
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const int64_t b = b0 + bv * V + v;
            p.v[v] = b < P.batch ? x[b * P.ldx + c0 + cc] : from_f<T>(0.f);
          }
          *reinterpret_cast<VecT*>(xs + cc * XS + bv * V) = p;
        }
      }
      __syncthreads();

      next = INT_MAX;
#pragma unroll
      for (int i = 0; i < RPW; ++i) {
        const int rl = warp + kWarps * i;
        while (true) {
          const bool in = lane >= off[i] && wc[i] < climit;
          const int cnt = __popc(__ballot_sync(kFull, in));
          if (cnt == 0) break;
          if (in) meta[warp][lane - off[i]] = wc[i] - c0;
          __syncwarp();
          const VecT dv = *reinterpret_cast<const VecT*>(ds + rl * XS + lane * V);
          float dr[V];
#pragma unroll
          for (int v = 0; v < V; ++v) dr[v] = to_f(dv.v[v]);
          float mine = 0.f;  // lane j keeps the run's j-th result
          for (int j = 0; j < cnt; ++j) {
            const VecT xv = *reinterpret_cast<const VecT*>(xs + meta[warp][j] * XS + lane * V);
            float s = 0.f;
#pragma unroll
            for (int v = 0; v < V; ++v) s = fmaf(dr[v], to_f(xv.v[v]), s);
#pragma unroll
            for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(kFull, s, o);
            if (lane == j) mine = s;
          }
          __syncwarp();
          if (lane < cnt) {  // the run's entries are consecutive: one coalesced store
            const int64_t k = kb[i] + off[i] + lane;
            if (P.direct)
              static_cast<T*>(P.dvalues)[k] = from_f<T>(mine);
            else
              part[k] = first ? mine : part[k] + mine;
          }
          off[i] += cnt;
          if (off[i] < 32) break;
          kb[i] += 32;
          off[i] = 0;
          const int64_t kend = P.row_ptr[r0 + rl + 1];
          wc[i] = kb[i] + lane < kend ? P.col_idx[kb[i] + lane] : INT_MAX;
        }
        next = min(next, __shfl_sync(kFull, wc[i], off[i]));
      }
      c0 = cta_min(next, wmin, phase, warp, lane);
    }
    // The next tile's ds stores follow this tile's last cta_min: every reader of ds is done.  (Its
    // readers of wmin may not be: hence cta_min's two buffers.)
  }
}

// grid = (ceil(n_rows / kWarps)); block = kThreads.  A warp per row, a lane per nonzero, the whole
// batch in a loop (dout[b, r] is the same address for every lane: a broadcast).
template <typename T>
__global__ void __launch_bounds__(kThreads) sparse_sddmm_vec_kernel(const SddmmParams P) {
  const T* __restrict__ x = static_cast<const T*>(P.x);
  const T* __restrict__ dout = static_cast<const T*>(P.dout);
  T* __restrict__ dvalues = static_cast<T*>(P.dvalues);
  const int lane = threadIdx.x % 32;
  const int64_t r = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  if (r >= P.n_rows) return;
  const int64_t kend = P.row_ptr[r + 1];
  for (int64_t k = P.row_ptr[r] + lane; k < kend; k += 32) {
    const int c = P.col_idx[k];
    float s = 0.f;
    for (int64_t b = 0; b < P.batch; ++b) s = fmaf(to_f(dout[b * P.lddo + r]), to_f(x[b * P.ldx + c]), s);
    dvalues[k] = from_f<T>(s);
  }
}

// dst[k] = sum over splits (in split order) of part[split * n + k], rounded.
template <typename T>
__global__ void __launch_bounds__(kThreads) sparse_reduce_splits_kernel(const float* __restrict__ part,
                                                                        int64_t n, int nsplit,
                                                                        T* __restrict__ dst) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += stride) {
    float s = 0.f;
    for (int sp = 0; sp < nsplit; ++sp) s += part[sp * n + k];
    dst[k] = from_f<T>(s);
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

kk_status device_attr(const char* fn, cudaDeviceAttr attr, int* value) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(value, attr, dev);
  if (err != cudaSuccess)
    return kk::fail(KK_ERR_CUDA, "%s: cannot query the device: %s", fn, cudaGetErrorString(err));
  return KK_OK;
}

// Sizes every entry point checks: dtype, batch / n_out / n_in / nnz >= 0, nnz <= n_out * n_in,
// n_out and n_in within int32 (the index arrays are int32).
kk_status check_sizes(const char* fn, kk_dtype dtype, int64_t batch, int64_t n_out, int64_t n_in,
                      int64_t nnz) {
  if (dtype_size(dtype) == 0)
    return kk::fail(KK_ERR_UNSUPPORTED_DTYPE,
                    "%s: dtype %d is not supported on CUDA (float32, float16, bfloat16 are)", fn, (int)dtype);
  const int64_t sizes[4] = {batch, n_out, n_in, nnz};
  const char* names[4] = {"batch", "n_out", "n_in", "nnz"};
  for (int i = 0; i < 4; ++i)
    if (sizes[i] < 0)
      return kk::fail(KK_ERR_INVALID_SIZE, "%s: %s must be >= 0, got %lld", fn, names[i], (long long)sizes[i]);
  if (n_out > INT_MAX || n_in > INT_MAX)
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: n_out = %lld and n_in = %lld must be <= %d (int32 indices)",
                    fn, (long long)n_out, (long long)n_in, INT_MAX);
  if (nnz > n_out * n_in)  // both <= INT_MAX: no overflow
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: nnz (%lld) must be <= n_out * n_in = %lld * %lld", fn,
                    (long long)nnz, (long long)n_out, (long long)n_in);
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

kk_status check_workspace(const char* fn, const void* ws, int64_t ws_bytes, int64_t need) {
  if (ws_bytes < 0)
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: workspace_bytes must be >= 0, got %lld", fn, (long long)ws_bytes);
  if (ws_bytes < need)
    return kk::fail(KK_ERR_INVALID_ARGUMENT,
                    "%s: workspace_bytes = %lld is smaller than the %lld bytes required (%s_workspace_size)",
                    fn, (long long)ws_bytes, (long long)need, fn);
  if (need > 0 && ws == nullptr)
    return kk::fail(KK_ERR_NULL_POINTER, "%s: workspace is NULL (%lld bytes required)", fn, (long long)need);
  if (reinterpret_cast<uintptr_t>(ws) % 16 != 0)  // a misaligned access would kill the context
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: workspace must be 16-byte aligned", fn);
  return KK_OK;
}

#define KK_TRY(expr)              \
  do {                            \
    const kk_status st_ = (expr); \
    if (st_ != KK_OK) return st_; \
  } while (0)

// Columns per chunk for a density: about 8 nonzeros per row per chunk (the per-chunk cost per row
// is a ballot and a barrier's share), a power of two in [kc_min, kc_max], then no wider than the
// matrix (rounded up to 32 columns).
int chunk_width(int64_t n_rows, int64_t n_cols, int64_t nnz, int kc_min, int kc_max) {
  int kc = kc_min;
  // density < 8 / kc, i.e. nnz < 8 * n_rows * n_cols / kc (n_rows * n_cols < 2^62: no overflow)
  const int64_t cells = n_rows * n_cols;
  while (kc < kc_max && nnz < cells / kc * 8) kc *= 2;
  const int64_t need = imax64(32, ceil_div(n_cols, 32) * 32);
  return (int)imin64(kc, need);
}

// ---- SpMM launch plan ---------------------------------------------------------------------------
struct SpmmPlan {
  int vec;      // 1: sparse_spmm_vec_kernel
  int rpw;      // tile: rows per warp (2 or 8)
  int kc;       // tile: columns per chunk
  int64_t smem;  // tile: dynamic shared memory bytes
};

template <typename T, int RPW>
int64_t spmm_smem(int kc) { return SpmmTile<T, RPW>::dyn_smem(kc); }

template <typename T>
kk_status plan_spmm(const char* fn, int64_t batch, int64_t n_rows, int64_t n_cols, int64_t nnz, int sms,
                    int optin, SpmmPlan* plan) {
  *plan = SpmmPlan{};
  if (batch <= kVecMaxBatch) {
    plan->vec = 1;
    return KK_OK;
  }
  const int64_t tiles = ceil_div(batch, SpmmTile<T, 8>::kBM);
  // 64-row blocks unless they would leave the GPU with fewer than two CTAs per SM.
  plan->rpw = ceil_div(n_rows, SpmmTile<T, 8>::kRB) * tiles >= 2 * (int64_t)sms ? 8 : 2;
  plan->kc = chunk_width(n_rows, n_cols, nnz, 64, 256);
  for (;;) {
    plan->smem = plan->rpw == 8 ? spmm_smem<T, 8>(plan->kc) : spmm_smem<T, 2>(plan->kc);
    const int64_t stat = plan->rpw == 8 ? SpmmTile<T, 8>::kStaticSmemBytes : SpmmTile<T, 2>::kStaticSmemBytes;
    if (plan->smem + stat <= optin) return KK_OK;
    if (plan->kc <= 32)
      return kk::fail(KK_ERR_CUDA, "%s: the device allows only %d bytes of shared memory per block", fn, optin);
    plan->kc /= 2;  // a smaller device: narrower chunks
  }
}

// The opt-in limit is a property of the kernel, not of the launch: always set the same (largest)
// value, so host threads launching different shapes cannot undercut each other.
template <typename K>
kk_status allow_smem(const char* fn, K kernel, int optin, int64_t static_bytes) {
  const int64_t limit = optin - static_bytes;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)limit);
  if (err != cudaSuccess)
    return kk::fail(KK_ERR_CUDA, "%s: cannot reserve %lld bytes of shared memory: %s", fn, (long long)limit,
                    cudaGetErrorString(err));
  return KK_OK;
}

template <typename T, int RPW>
kk_status spmm_tile_launch(const char* fn, SpmmParams P, const SpmmPlan& plan, int optin, cudaStream_t stream) {
  using Tile = SpmmTile<T, RPW>;
  KK_TRY(allow_smem(fn, sparse_spmm_tile_kernel<T, RPW>, optin, Tile::kStaticSmemBytes));
  P.kc = plan.kc;
  P.batch_tiles = ceil_div(P.batch, Tile::kBM);
  const dim3 grid((unsigned)ceil_div(P.n_rows, Tile::kRB), (unsigned)imin64(P.batch_tiles, kMaxGridY));
  kk::launch(sparse_spmm_tile_kernel<T, RPW>, grid, dim3(kThreads), (size_t)plan.smem, stream, P);
  return check_launch(fn);
}

// out (batch, n_rows) = x (batch, n_cols) applied to the compressed rows (ptr, idx, perm, values).
template <typename T>
kk_status spmm_run(const char* fn, SpmmParams P, int64_t nnz, cudaStream_t stream) {
  int sms = 0, optin = 0;
  KK_TRY(device_attr(fn, cudaDevAttrMultiProcessorCount, &sms));
  KK_TRY(device_attr(fn, cudaDevAttrMaxSharedMemoryPerBlockOptin, &optin));
  SpmmPlan plan;
  KK_TRY(plan_spmm<T>(fn, P.batch, P.n_rows, P.n_cols, nnz, sms, optin, &plan));
  if (plan.vec) {
    const dim3 grid((unsigned)ceil_div(P.n_rows, kWarps), (unsigned)ceil_div(P.batch, kVecB));
    kk::launch(sparse_spmm_vec_kernel<T>, grid, dim3(kThreads), 0, stream, P);
    return check_launch(fn);
  }
  if (plan.rpw == 8) return spmm_tile_launch<T, 8>(fn, P, plan, optin, stream);
  return spmm_tile_launch<T, 2>(fn, P, plan, optin, stream);
}

// ---- SDDMM plan and workspace ---------------------------------------------------------------------
// Depends on the shapes only: the workspace size and the summation order are the same on every
// device.  Workspace: float32 partials [nsplit][nnz] unless the batch fits one tile.
struct SddmmPlan {
  int vec;
  int64_t tiles, nsplit;
  int direct;
  int64_t workspace;
};

template <typename T>
SddmmPlan plan_sddmm(int64_t batch, int64_t n_out, int64_t nnz) {
  SddmmPlan p{};
  if (batch <= kVecMaxBatch || nnz == 0) {
    p.vec = 1;
    return p;
  }
  p.tiles = ceil_div(batch, SddmmTile<T>::kBS);
  const int64_t row_blocks = ceil_div(n_out, kSddmmRows);
  p.nsplit = imax64(1, imin64(imin64(p.tiles, ceil_div(kSddmmTargetCtas, row_blocks)), kMaxSplits));
  p.direct = p.tiles == 1;
  p.workspace = p.direct ? 0 : ceil_div(p.nsplit * nnz * 4, 256) * 256;
  return p;
}

kk_status sddmm_plan_checked(const char* fn, kk_dtype dtype, int64_t batch, int64_t n_out, int64_t nnz,
                             SddmmPlan* p) {
  if (nnz > INT64_MAX / (4 * kMaxSplits) - 256)
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: nnz = %lld is too large for the workspace", fn, (long long)nnz);
  *p = dtype == KK_FLOAT32 ? plan_sddmm<float>(batch, n_out, nnz) : plan_sddmm<__half>(batch, n_out, nnz);
  return KK_OK;
}

template <typename T>
kk_status sddmm_run(const char* fn, SddmmParams P, const SddmmPlan& plan, void* workspace, cudaStream_t stream) {
  if (plan.vec) {
    kk::launch(sparse_sddmm_vec_kernel<T>, dim3((unsigned)ceil_div(P.n_rows, kWarps)), dim3(kThreads), 0, stream, P);
    return check_launch(fn);
  }
  int optin = 0;
  KK_TRY(device_attr(fn, cudaDevAttrMaxSharedMemoryPerBlockOptin, &optin));
  using Tile = SddmmTile<T>;
  P.kc = chunk_width(P.n_rows, P.n_cols, P.nnz, 32, 64);
  while (Tile::dyn_smem(P.kc) + Tile::kStaticSmemBytes > optin) {
    if (P.kc <= 32)
      return kk::fail(KK_ERR_CUDA, "%s: the device allows only %d bytes of shared memory per block", fn, optin);
    P.kc /= 2;
  }
  KK_TRY(allow_smem(fn, sparse_sddmm_tile_kernel<T>, optin, Tile::kStaticSmemBytes));
  P.batch_tiles = plan.tiles;
  P.direct = plan.direct;
  P.partial = static_cast<float*>(workspace);
  const dim3 grid((unsigned)ceil_div(P.n_rows, kSddmmRows), (unsigned)plan.nsplit);
  kk::launch(sparse_sddmm_tile_kernel<T>, grid, dim3(kThreads), (size_t)Tile::dyn_smem(P.kc), stream, P);
  KK_TRY(check_launch(fn));
  if (plan.direct) return KK_OK;
  const int64_t blocks = imax64(1, imin64(ceil_div(P.nnz, kThreads), 4096));
  kk::launch(sparse_reduce_splits_kernel<T>, dim3((unsigned)blocks), dim3(kThreads), 0, stream,
             static_cast<const float*>(P.partial), P.nnz, (int)plan.nsplit, static_cast<T*>(P.dvalues));
  return check_launch(fn);
}

template <typename F>
kk_status dispatch(const char* fn, kk_dtype dtype, F&& f) {
  switch (dtype) {
    case KK_FLOAT32: return f(float{});
    case KK_FLOAT16: return f(__half{});
    case KK_BFLOAT16: return f(__nv_bfloat16{});
    default: return kk::fail(KK_ERR_INTERNAL, "%s: unreachable dtype %d", fn, (int)dtype);
  }
}

}  // namespace

// =================================================================================================
// C ABI
// =================================================================================================
extern "C" {

KK_API kk_status kk_sparse_linear_fwd_cuda_workspace_size(kk_dtype dtype, int64_t batch, int64_t n_out,
                                                          int64_t n_in, int64_t nnz, int64_t* bytes) {
  static const char* fn = "kk_sparse_linear_fwd_cuda_workspace_size";
  kk::clear_error();
  KK_TRY(need_ptr(fn, bytes, "bytes"));
  *bytes = 0;
  return check_sizes(fn, dtype, batch, n_out, n_in, nnz);  // the forward needs no workspace
}

KK_API kk_status kk_sparse_linear_fwd_cuda(kk_dtype dtype, int64_t batch, int64_t n_out, int64_t n_in,
                                           int64_t nnz, const int64_t* row_ptr, const int32_t* col_idx,
                                           const void* values, const void* x, int64_t ldx,
                                           const void* bias, void* out, int64_t ldo, void* workspace,
                                           int64_t workspace_bytes, void* stream) {
  static const char* fn = "kk_sparse_linear_fwd_cuda";
  kk::clear_error();
  KK_TRY(check_sizes(fn, dtype, batch, n_out, n_in, nnz));
  KK_TRY(check_workspace(fn, workspace, workspace_bytes, 0));
  if (batch == 0 || n_out == 0) return KK_OK;  // nothing to write
  KK_TRY(need_ptr(fn, out, "out"));
  KK_TRY(need_ld(fn, ldo, n_out, "ldo", "n_out"));
  KK_TRY(need_ptr(fn, row_ptr, "row_ptr"));
  if (nnz > 0) {
    KK_TRY(need_ptr(fn, col_idx, "col_idx"));
    KK_TRY(need_ptr(fn, values, "values"));
    KK_TRY(need_ptr(fn, x, "x"));  // nnz > 0 implies n_in > 0
    KK_TRY(need_ld(fn, ldx, n_in, "ldx", "n_in"));
  }
  SpmmParams P{};
  P.ptr = row_ptr;
  P.idx = col_idx;
  P.perm = nullptr;
  P.values = values;
  P.x = x;
  P.bias = bias;
  P.out = out;
  P.batch = batch;
  P.ldx = ldx;
  P.ldo = ldo;
  P.n_rows = (int)n_out;
  P.n_cols = (int)n_in;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch(fn, dtype, [&](auto t) { return spmm_run<decltype(t)>(fn, P, nnz, st); });
}

KK_API kk_status kk_sparse_linear_bwd_cuda_workspace_size(kk_dtype dtype, int64_t batch, int64_t n_out,
                                                          int64_t n_in, int64_t nnz, int64_t* bytes) {
  static const char* fn = "kk_sparse_linear_bwd_cuda_workspace_size";
  kk::clear_error();
  KK_TRY(need_ptr(fn, bytes, "bytes"));
  *bytes = 0;
  KK_TRY(check_sizes(fn, dtype, batch, n_out, n_in, nnz));
  SddmmPlan plan;
  KK_TRY(sddmm_plan_checked(fn, dtype, batch, n_out, nnz, &plan));
  *bytes = plan.workspace;  // the same whichever gradients are requested
  return KK_OK;
}

KK_API kk_status kk_sparse_linear_bwd_cuda(kk_dtype dtype, int64_t batch, int64_t n_out, int64_t n_in,
                                           int64_t nnz, const int64_t* row_ptr, const int32_t* col_idx,
                                           const int64_t* col_ptr, const int32_t* row_idx,
                                           const int64_t* perm, const void* values, const void* x,
                                           int64_t ldx, const void* dout, int64_t lddo, void* dx,
                                           int64_t lddx, void* dvalues, void* workspace,
                                           int64_t workspace_bytes, void* stream) {
  static const char* fn = "kk_sparse_linear_bwd_cuda";
  kk::clear_error();
  KK_TRY(check_sizes(fn, dtype, batch, n_out, n_in, nnz));
  SddmmPlan plan;
  KK_TRY(sddmm_plan_checked(fn, dtype, batch, n_out, nnz, &plan));
  KK_TRY(check_workspace(fn, workspace, workspace_bytes, plan.workspace));
  const bool want_dx = dx != nullptr && batch > 0 && n_in > 0;  // dx has elements to write
  const bool want_dv = dvalues != nullptr && nnz > 0;
  if (!want_dx && !want_dv) return KK_OK;
  // dout is read by both outputs (nnz > 0 or n_out > 0 with batch > 0); x by dvalues only; the CSC
  // index and the values by dx only.
  if (batch > 0 && n_out > 0) {
    KK_TRY(need_ptr(fn, dout, "dout"));
    KK_TRY(need_ld(fn, lddo, n_out, "lddo", "n_out"));
  }
  if (want_dv && batch > 0) {
    KK_TRY(need_ptr(fn, row_ptr, "row_ptr"));
    KK_TRY(need_ptr(fn, col_idx, "col_idx"));
    KK_TRY(need_ptr(fn, x, "x"));
    KK_TRY(need_ld(fn, ldx, n_in, "ldx", "n_in"));
  }
  if (want_dx) {
    KK_TRY(need_ld(fn, lddx, n_in, "lddx", "n_in"));
    KK_TRY(need_ptr(fn, col_ptr, "col_ptr"));
    if (nnz > 0) {
      KK_TRY(need_ptr(fn, row_idx, "row_idx"));
      KK_TRY(need_ptr(fn, perm, "perm"));
      KK_TRY(need_ptr(fn, values, "values"));
    }
  }
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (want_dv && batch == 0) {  // empty batch: the value gradients are zero
    const cudaError_t err = cudaMemsetAsync(dvalues, 0, (size_t)nnz * dtype_size(dtype), st);
    if (err != cudaSuccess)
      return kk::fail(KK_ERR_CUDA, "%s: cudaMemsetAsync failed: %s", fn, cudaGetErrorString(err));
  }
  if (want_dx) {  // dx = dout W: the SpMM of W^T (rows = columns of W, values through perm)
    SpmmParams P{};
    P.ptr = col_ptr;
    P.idx = row_idx;
    P.perm = perm;
    P.values = values;
    P.x = dout;
    P.bias = nullptr;
    P.out = dx;
    P.batch = batch;
    P.ldx = lddo;
    P.ldo = lddx;
    P.n_rows = (int)n_in;
    P.n_cols = (int)n_out;
    KK_TRY(dispatch(fn, dtype, [&](auto t) { return spmm_run<decltype(t)>(fn, P, nnz, st); }));
  }
  if (want_dv && batch > 0) {
    SddmmParams P{};
    P.row_ptr = row_ptr;
    P.col_idx = col_idx;
    P.x = x;
    P.dout = dout;
    P.dvalues = dvalues;
    P.batch = batch;
    P.ldx = ldx;
    P.lddo = lddo;
    P.nnz = nnz;
    P.n_rows = (int)n_out;
    P.n_cols = (int)n_in;
    KK_TRY(dispatch(fn, dtype, [&](auto t) { return sddmm_run<decltype(t)>(fn, P, plan, workspace, st); }));
  }
  return KK_OK;
}

}  // extern "C"
