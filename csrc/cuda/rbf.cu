/*
 * Adaptive radial-basis fields on CUDA (NeuRBF, Chen et al., ICCV 2023): the kernels of
 * csrc/include/kernelkit/rbf.h (read it first: kernels ivq / gauss / nlin, full or diagonal shapes, the
 * normalization modes, the grid buffer's layout and the knn semantics).  T is the coordinate dtype
 * (float / double: x, centers, shapes, omegas, dist2 and every gradient but dweights' storage for half
 * weights), W the feature dtype (weights, out, grad_out: T, or __half / bf16 with float coordinates);
 * math in T throughout.
 *
 * grid build (no host synchronization; 7 launches + 2 memsets on the stream):
 *   memset     the workspace's 64-byte head (bbox keys, non-finite flag) and the grid's cell_start
 *              (used as the per-cell counters first);
 *   bbox       per dimension the min / max of the centres as order-preserving uint64 keys of the double
 *              value (min as the key's complement, so both are atomicMax on zeroed memory), a CTA reduces
 *              through shared memory first; a non-finite coordinate sets the flag;
 *   geom       one thread: lo / hi from the keys, the cell edge and resolutions with EXACTLY the rule of
 *              reference.grid_geometry (double; the 1/len(pos) power through a correctly rounded root,
 *              see root_exact), the header (flag 1 when a centre was non-finite);
 *   cellid     a thread per centre: its cell (floor((mu - lo) / cell) clamped, in double as the CPU build)
 *              and its rank inside the cell (atomicAdd on the cell's counter: the order inside a cell is
 *              unspecified; the search breaks ties by index, so results do not depend on it);
 *   scan       cell_start = exclusive prefix sum of the counters (cells_max + 1 entries): tiles of
 *              threads x items, tile sums, one CTA scanning the tile sums, tiles rescanned with their
 *              offset (in place);
 *   scatter    a thread per centre: order[p] and coords[p] at p = cell_start[cell] + rank.
 *   With the flag set, cellid and scatter write no cells: cell_start stays 0, order / coords are zeroed.
 *
 * knn (a thread per query; k <= 32 kept sorted in registers: templates K = 4 / 8 / 16 / 32 >= k, slots
 *   K - k .. K - 1 live, the first K - k hold a -inf sentinel so the k-th is always D[K - 1] and no array
 *   is indexed dynamically).  Cells are visited ring by ring (Chebyshev rings around the query's clamped
 *   cell); a run of cells along the last dimension is one contiguous range of sorted positions.  After
 *   ring r the unvisited cells are farther than the gap b from x to the visited box (per dimension and
 *   side, only where cells remain); b is reduced by an absolute slack for the double rounding of the cell
 *   boundaries and cell ids, and the search stops when dist2_k < b^2 (1 - 2^-18) (float; 2^-46 double):
 *   the computed dist2 of any unvisited centre is at least that (5 roundings of relative 2^-24), so the
 *   grid never changes the result.  dist2 is formed with __fsub_rn / __fmul_rn / __fadd_rn (no FMA),
 *   in the header's order, ties by (dist2, index).  The order array is read only for candidates that
 *   can enter the list.
 *
 * features (fwd / bwd): a group of G lanes per query, G = clamp(next_pow2(C), 4, 32) (a template): the k
 *   neighbours' kernel values are computed lane-parallel (slot i by lane i mod G) into shared memory,
 *   normalized with a group reduction (shuffles), then lane j takes channels j, j + G, ...: the weight
 *   rows w[idx_i, :] and the output row are read / written coalesced (a warp reads 128 B of one row per
 *   neighbour for C = 32), and the sine loop has no divergence.  Chosen over a thread per query, whose
 *   C-strided weight and output accesses touch 32 rows per instruction.  sin / cos are the accurate
 *   sinf / sincosf (full range reduction, <= 2 ulp: far inside the header's 2^-21 for |t| <= 2^17; the
 *   build has no --use_fast_math).
 *   The backward recomputes the kernel values, then per channel chunk and slot: dweights (atomicAdd,
 *   coalesced), the lane's domegas term (registers for C <= G, else shared atomics; one global atomic per
 *   channel and CTA at the end), and dphih_i = sum_j g_j w_ij om_j cos(om_j phih_i) (group reduction).
 *   Then per slot (lane-parallel) the normalization's chain rule (detached: / den; full: (dphih_i -
 *   sum_l dphih_l phih_l) / den), the kernel derivative, dcenters / dshapes atomics and the dx partials,
 *   reduced over the group and stored by its first lane (no atomics: one group owns a query).  Queries
 *   with a non-finite coordinate: NaN output rows; in the backward a NaN dx row and no contribution.
 *   Expected bottleneck on an H100 / H200: the k*C sines (sinf ~ 20-30 FP32 instructions) and the
 *   weight-row gathers from L2 (k rows of C elements per query, random over M rows); the knn search is
 *   bound by the cell visits (about (2 ring)^D cells of ~2 centres for k <= 8).
 *
 * Launch bounds: 256 threads (grid build, knn), 128 (features).
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "../cpu/status.h"
#include "api_common.cuh"
#include "common.cuh"
#include "kernelkit/rbf.h"

namespace {

using kk::ceil_div;
using kk::imax64;
using kk::imin64;

constexpr unsigned kFull = 0xffffffffu;
constexpr int kThreads = 256;       // grid build, knn
constexpr int kFeatThreads = 128;   // features
constexpr int64_t kMaxGridX = int64_t(1) << 20;
constexpr int kScanThreads = 256, kScanItems = 8;  // scan tile: 2048 counters
constexpr int64_t kDomSmemMax = 2048;              // bwd: domegas accumulated in shared memory up to C
constexpr int kMaxK = 32;
constexpr int64_t kHeaderBytes = 256;
constexpr int64_t kWsHead = 64;  // bbox keys (6 x uint64), non-finite flag, pad

// ---- the grid layout (kk_rbf_grid_layout lives in the CPU library: the same rule) --------------------
struct Layout {
  int64_t cells_max, cell_start_off, order_off, coords_off, bytes;
};

Layout layout_of(int64_t esize, int64_t dim, int64_t m) {
  Layout l{};
  l.cells_max = imax64(1, imin64(int64_t(1) << 24, m / 2));
  l.cell_start_off = kHeaderBytes;
  l.order_off = l.cell_start_off + 8 * (l.cells_max + 1);
  l.coords_off = l.order_off + 8 * m;
  l.bytes = l.coords_off + ceil_div(esize * m * dim, 8) * 8;
  return l;
}

// ---- element helpers ----------------------------------------------------------------------------------
__device__ __forceinline__ float ldw(const float* p) { return *p; }
__device__ __forceinline__ float ldw(const __half* p) { return kk::to_f(*p); }
__device__ __forceinline__ float ldw(const __nv_bfloat16* p) { return kk::to_f(*p); }
__device__ __forceinline__ double ldw(const double* p) { return *p; }
__device__ __forceinline__ void stw(float* p, float v) { *p = v; }
__device__ __forceinline__ void stw(__half* p, float v) { *p = kk::from_f<__half>(v); }
__device__ __forceinline__ void stw(__nv_bfloat16* p, float v) { *p = kk::from_f<__nv_bfloat16>(v); }
__device__ __forceinline__ void stw(double* p, double v) { *p = v; }

// Rounded operations, never contracted into an FMA (the knn distance of rbf.h).
#if defined(KK_CUDA_EMU)
__device__ __forceinline__ float sub_rn(float a, float b) { return a - b; }
__device__ __forceinline__ float mul_rn(float a, float b) { return a * b; }
__device__ __forceinline__ float add_rn(float a, float b) { return a + b; }
__device__ __forceinline__ double sub_rn(double a, double b) { return a - b; }
__device__ __forceinline__ double mul_rn(double a, double b) { return a * b; }
__device__ __forceinline__ double add_rn(double a, double b) { return a + b; }
#else
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
#endif

// Accurate sine / cosine (full range reduction; never the __sinf approximation).
__device__ __forceinline__ float sin_acc(float t) { return sinf(t); }
__device__ __forceinline__ double sin_acc(double t) { return sin(t); }
__device__ __forceinline__ void sincos_acc(float t, float* s, float* c) { sincosf(t, s, c); }
__device__ __forceinline__ void sincos_acc(double t, double* s, double* c) { sincos(t, s, c); }
__device__ __forceinline__ float exp_acc(float t) { return expf(t); }
__device__ __forceinline__ double exp_acc(double t) { return exp(t); }

__device__ __forceinline__ float absv(float v) { return fabsf(v); }
__device__ __forceinline__ double absv(double v) { return fabs(v); }
__device__ __forceinline__ unsigned long long umax64(unsigned long long a, unsigned long long b) { return a > b ? a : b; }

// 1 / y without the IEEE division's out-of-line slow path (its call makes ptxas spill the live registers
// around it): the approximate reciprocal refined by Newton steps, within an ulp.  y > 0 (ivq's 1 + q,
// the normalization's sum + 1e-8); +inf gives 0.
__device__ __forceinline__ float recip(float y) {
  const float r = __fdividef(1.0f, y);
  const float e = __fmaf_rn(-y, r, 1.0f);
  return e - e == 0.0f ? __fmaf_rn(r, e, r) : r;
}
__device__ __forceinline__ double recip(double y) {
  // a float seed (~22 bits; y scaled into float range), two Newton steps in double (~88 bits, rounded);
  // y in [1e-37, 1e68] (ivq's 1 + q, the normalization's sum + 1e-8, a cell edge) is exact to an ulp
  const double s = y > 1e30 ? 1e-30 : 1.0;
  const double ys = y * s;
  if (!(ys < 1e38)) return ys > 1e38 ? (ys - ys == 0.0 ? 1e-38 * s : 0.0) : ys;  // +inf: 0, NaN: NaN
  if (!(ys > 1e-37)) return 1e37;  // a degenerate cell edge only (then any large value orders the cells)
  double r = (double)__fdividef(1.0f, (float)ys);
  r = fma(r, fma(-ys, r, 1.0), r);
  r = fma(r, fma(-ys, r, 1.0), r);
  return r * s;
}

__host__ __device__ __forceinline__ bool finite_d(double v) { return v - v == 0.0; }

template <typename T>
__device__ __forceinline__ T nan_of();
template <>
__device__ __forceinline__ float nan_of<float>() { return __int_as_float(0x7fc00000); }
template <>
__device__ __forceinline__ double nan_of<double>() { return __longlong_as_double(0x7ff8000000000000LL); }

template <typename T>
__device__ __forceinline__ T inf_of();
template <>
__device__ __forceinline__ float inf_of<float>() { return __int_as_float(0x7f800000); }
template <>
__device__ __forceinline__ double inf_of<double>() { return __longlong_as_double(0x7ff0000000000000LL); }

// Order-preserving uint64 key of a double (larger value, larger key).
__device__ __forceinline__ unsigned long long dkey(double v) {
  const unsigned long long b = (unsigned long long)__double_as_longlong(v);
  return (b >> 63) ? ~b : (b | 0x8000000000000000ULL);
}
__device__ __forceinline__ double dkey_value(unsigned long long k) {
  const unsigned long long b = (k >> 63) ? (k & 0x7fffffffffffffffULL) : ~k;
  return __longlong_as_double((long long)b);
}

// =================================================================================================
// grid build
// =================================================================================================
struct BuildP {
  int64_t m, ldc, cm;
  int dim, dtype;
  const void* centers;
  char* grid;
  unsigned long long* head;  // [0, 3): ~key(min), [3, 6): key(max), [6]: non-finite flag
  int32_t* cid;              // per centre: cell id
  int32_t* rank;             // per centre: rank inside its cell
  long long* tile_sums;
  int64_t ntiles, items;     // scan plan (threads = blockDim.x)
  Layout L;
};

__device__ __forceinline__ const int64_t* hdr_of(const char* g) { return reinterpret_cast<const int64_t*>(g); }

// grid = ceil(m / kThreads) (grid-stride), block = kThreads.
template <typename T>
__global__ void __launch_bounds__(kThreads) rbf_bbox_kernel(const BuildP P) {
  __shared__ unsigned long long s_key[6][kThreads / 32];
  __shared__ int s_bad;
  const T* c = static_cast<const T*>(P.centers);
  unsigned long long k[6] = {0, 0, 0, 0, 0, 0};
  bool bad = false;
  if (threadIdx.x == 0) s_bad = 0;
  for (int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x; i < P.m; i += (int64_t)gridDim.x * kThreads) {
#pragma unroll
    for (int d = 0; d < 3; ++d) {
      if (d >= P.dim) break;
      const double v = (double)c[i * P.ldc + d];
      if (!finite_d(v)) {
        bad = true;
        continue;
      }
      const unsigned long long kv = dkey(v);
      k[d] = umax64(k[d], ~kv);
      k[3 + d] = umax64(k[3 + d], kv);
    }
  }
#pragma unroll
  for (int j = 0; j < 6; ++j)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) k[j] = umax64(k[j], (unsigned long long)__shfl_xor_sync(kFull, k[j], o));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // s_bad initialized
  if (bad) atomicOr(&s_bad, 1);
  if (lane == 0)
    for (int j = 0; j < 6; ++j) s_key[j][warp] = k[j];
  __syncthreads();
  if (threadIdx.x < 6) {
    unsigned long long v = 0;
    for (int w = 0; w < kThreads / 32; ++w) v = umax64(v, s_key[threadIdx.x][w]);
    if (v != 0) atomicMax(&P.head[threadIdx.x], v);
  }
  if (threadIdx.x == 0 && s_bad) atomicOr(&P.head[6], 1ULL);
}

// The double nearest to p^(1/n) as Python's `p ** (1.0 / n)` computes it (n = 1, 2, 3; p > 0 finite):
// 1.0 / 3 is 1/3 - 1/(3 * 2^54), so p^fl(1/3) = cbrt(p) * exp(-ln(p) / (3 * 2^54)); cbrt (<= 1 ulp) is
// refined by one Newton step in double-double and the tiny factor applied to the residual, leaving one
// rounding: correctly rounded except in hard cases (< 0.02 ulp from a midpoint), as glibc's pow.
// n = 2: sqrt, correctly rounded.  CUDA's pow (2 ulp) would put the cell edge an ulp off the CPU's.
__device__ double root_exact(double p, int n) {
  if (n == 1) return p;
  if (n == 2) return sqrt(p);
  const double r = cbrt(p);
  const double r2 = r * r, r2e = fma(r, r, -r2);
  const double r3 = r2 * r, r3e = fma(r2, r, -r3) + r2e * r;
  const double resid = (p - r3) - r3e;  // p - r3 is exact (Sterbenz: r3 within a few ulps of p)
  const double corr = resid / (3.0 * r2);
  const double f = -log(p) / (3.0 * 18014398509481984.0);
  return r + (corr + r * f);
}

// One thread: header, geometry, the reference's cell rule.
__global__ void __launch_bounds__(32) rbf_geom_kernel(const BuildP P) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  int64_t* hdr = reinterpret_cast<int64_t*>(P.grid);
  double* geom = reinterpret_cast<double*>(P.grid + 128);
  const bool bad = P.head[6] != 0;
  double lo[3] = {0, 0, 0}, hi[3] = {0, 0, 0};
  if (P.m > 0 && !bad)
    for (int d = 0; d < P.dim; ++d) {
      lo[d] = dkey_value(~P.head[d]);
      hi[d] = dkey_value(P.head[3 + d]);
    }
  const int64_t cm_geo = bad ? 1 : P.cm;  // grid_geometry(lo, hi, 0) when flagged (every extent is 0 then)
  double ext[3];
  int npos = 0;
  double prod = 1.0;
  for (int d = 0; d < P.dim; ++d) {
    ext[d] = hi[d] - lo[d];
    if (ext[d] > 0.0) {
      ++npos;
      prod = prod * ext[d];
    }
  }
  double cell = 1.0;
  int64_t res[3] = {1, 1, 1};
  if (npos > 0) {
    cell = root_exact(prod / (double)cm_geo, npos);
    bool ok = false;
    // Degenerate boxes (a zero or overflowing cell) fall back to one cell after 4096 steps: results stay
    // exact, only the search is slower.  Python would raise there.
    for (int it = 0; it < 4096 && finite_d(cell) && cell > 0.0; ++it) {
      int64_t p = 1;
      bool over = false;
      for (int d = 0; d < P.dim; ++d) {
        int64_t r = 1;
        if (ext[d] > 0.0) {
          double v = ceil(ext[d] / cell);
          v = v < 1.0 ? 1.0 : v;
          v = v > (double)cm_geo ? (double)cm_geo : v;
          r = (int64_t)v;
        }
        res[d] = r;
        if (!over) {
          p *= r;  // <= cm * cm < 2^48 before the check below stops it
          over = p > cm_geo;
        }
      }
      if (!over) {
        ok = true;
        break;
      }
      cell *= 1.0625;
    }
    if (!ok) {
      cell = 1.0;
      res[0] = res[1] = res[2] = 1;
    }
  }
  const int64_t ncells = res[0] * res[1] * res[2];
  const int64_t h[16] = {P.dim, P.m, ncells, res[0], res[1], res[2], P.dtype, P.cm, bad ? 1 : 0, 0, 0, 0, 0, 0, 0, 0};
  for (int j = 0; j < 16; ++j) hdr[j] = h[j];
  for (int j = 0; j < 16; ++j) geom[j] = 0.0;
  for (int d = 0; d < P.dim; ++d) geom[d] = lo[d];
  geom[3] = cell;
}

// Cell id and rank inside the cell of each centre.  grid = ceil(m / kThreads) (grid-stride).
template <typename T>
__global__ void __launch_bounds__(kThreads) rbf_cellid_kernel(const BuildP P) {
  const int64_t* hdr = hdr_of(P.grid);
  if (hdr[8] != 0) return;
  const double* geom = reinterpret_cast<const double*>(P.grid + 128);
  const double cell = geom[3];
  const T* c = static_cast<const T*>(P.centers);
  unsigned long long* counts = reinterpret_cast<unsigned long long*>(P.grid + P.L.cell_start_off);
  for (int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x; i < P.m; i += (int64_t)gridDim.x * kThreads) {
    int64_t id = 0;
    for (int d = 0; d < P.dim; ++d) {
      const int64_t rd = hdr[3 + d];
      double v = floor(((double)c[i * P.ldc + d] - geom[d]) / cell);
      v = v < 0.0 ? 0.0 : (v > (double)(rd - 1) ? (double)(rd - 1) : v);
      id = id * rd + (int64_t)v;
    }
    P.cid[i] = (int32_t)id;
    P.rank[i] = (int32_t)atomicAdd(&counts[id], 1ULL);
  }
}

// Block-wide exclusive scan of one value per thread (blockDim.x a multiple of 32, <= kScanThreads);
// returns the exclusive prefix, *total the block's sum.
__device__ long long block_exclusive_scan(long long v, long long* total) {
  __shared__ long long s_warp[kScanThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  long long inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const long long u = __shfl_up_sync(kFull, inc, o);
    if (lane >= o) inc += u;
  }
  __syncthreads();  // s_warp free (a previous call's readers are done)
  if (lane == 31) s_warp[warp] = inc;
  __syncthreads();
  long long before = 0, sum = 0;
  for (int w = 0; w < nwarps; ++w) {
    if (w < warp) before += s_warp[w];
    sum += s_warp[w];
  }
  *total = sum;
  return before + inc - v;
}

// Tile sums of the counters.  grid = ntiles, block = scan threads.
__global__ void __launch_bounds__(kScanThreads) rbf_scan_reduce_kernel(const BuildP P) {
  const long long* cnt = reinterpret_cast<const long long*>(P.grid + P.L.cell_start_off);
  const int64_t n = P.cm + 1;
  for (int64_t t = blockIdx.x; t < P.ntiles; t += gridDim.x) {
    const int64_t base = (t * blockDim.x + threadIdx.x) * P.items;
    long long s = 0;
    for (int64_t j = 0; j < P.items; ++j)
      if (base + j < n) s += cnt[base + j];
    long long total;
    block_exclusive_scan(s, &total);
    if (threadIdx.x == 0) P.tile_sums[t] = total;
  }
}

// Exclusive scan of the tile sums in place.  grid = 1, block = scan threads.
__global__ void __launch_bounds__(kScanThreads) rbf_scan_tiles_kernel(const BuildP P) {
  long long carry = 0;
  for (int64_t b = 0; b < P.ntiles; b += blockDim.x) {
    const int64_t t = b + threadIdx.x;
    const long long v = t < P.ntiles ? P.tile_sums[t] : 0;
    long long total;
    const long long ex = block_exclusive_scan(v, &total);
    if (t < P.ntiles) P.tile_sums[t] = carry + ex;
    carry += total;
  }
}

// cell_start = exclusive prefix of the counters (in place).  grid = ntiles, block = scan threads.
__global__ void __launch_bounds__(kScanThreads) rbf_scan_apply_kernel(const BuildP P) {
  long long* cs = reinterpret_cast<long long*>(P.grid + P.L.cell_start_off);
  const int64_t n = P.cm + 1;
  for (int64_t t = blockIdx.x; t < P.ntiles; t += gridDim.x) {
    const int64_t base = (t * blockDim.x + threadIdx.x) * P.items;
    long long s = 0;
    for (int64_t j = 0; j < P.items; ++j)
      if (base + j < n) s += cs[base + j];
    long long total;
    long long run = P.tile_sums[t] + block_exclusive_scan(s, &total);
    for (int64_t j = 0; j < P.items; ++j)
      if (base + j < n) {
        const long long c = cs[base + j];
        cs[base + j] = run;
        run += c;
      }
  }
}

// order / coords at the sorted positions.  grid = ceil(m / kThreads) (grid-stride).
template <typename T>
__global__ void __launch_bounds__(kThreads) rbf_scatter_kernel(const BuildP P) {
  const bool bad = hdr_of(P.grid)[8] != 0;
  const long long* cs = reinterpret_cast<const long long*>(P.grid + P.L.cell_start_off);
  long long* order = reinterpret_cast<long long*>(P.grid + P.L.order_off);
  T* coords = reinterpret_cast<T*>(P.grid + P.L.coords_off);
  const T* c = static_cast<const T*>(P.centers);
  for (int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x; i < P.m; i += (int64_t)gridDim.x * kThreads) {
    if (bad) {  // as the CPU build leaves it: zeros
      order[i] = 0;
      for (int d = 0; d < P.dim; ++d) coords[i * P.dim + d] = T(0);
      continue;
    }
    const int64_t p = cs[P.cid[i]] + P.rank[i];
    order[p] = i;
    for (int d = 0; d < P.dim; ++d) coords[p * P.dim + d] = c[i * P.ldc + d];
  }
}

// =================================================================================================
// knn
// =================================================================================================
struct KnnP {
  int64_t n, ldx;
  int k, dtype;
  const void* x;
  const char* grid;
  int64_t* idx;
  void* dist2;
};

template <typename T>
__device__ __forceinline__ bool knn_less(T da, int32_t ia, T db, int32_t ib) {
  return da < db || (da == db && ia < ib);
}

template <typename T, int DIM>
__device__ __forceinline__ T dist2_of(const T* xq, const T* c) {
  T t = sub_rn(xq[0], c[0]);
  T acc = mul_rn(t, t);
#pragma unroll
  for (int d = 1; d < DIM; ++d) {
    t = sub_rn(xq[d], c[d]);
    acc = add_rn(acc, mul_rn(t, t));
  }
  return acc;
}

// Scan sorted positions [p0, p1) into the sorted list (D, I).
template <typename T, int DIM, int K>
__device__ __forceinline__ void knn_scan(const T* xq, const T* coords, const long long* order, int64_t p0, int64_t p1,
                                         T (&D)[K], int32_t (&I)[K]) {
  for (int64_t p = p0; p < p1; ++p) {
    T c[DIM];
#pragma unroll
    for (int d = 0; d < DIM; ++d) c[d] = coords[p * DIM + d];
    const T d2 = dist2_of<T, DIM>(xq, c);
    if (!(d2 <= D[K - 1])) continue;  // cannot enter (and +inf > everything but +inf)
    const int32_t id = (int32_t)order[p];
    if (!knn_less(d2, id, D[K - 1], I[K - 1])) continue;
    D[K - 1] = d2;
    I[K - 1] = id;
#pragma unroll
    for (int j = K - 1; j > 0; --j) {  // one bubble pass, unrolled: registers only
      const bool sw = knn_less(D[j], I[j], D[j - 1], I[j - 1]);
      const T td = D[j];
      const int32_t ti = I[j];
      D[j] = sw ? D[j - 1] : D[j];
      I[j] = sw ? I[j - 1] : I[j];
      D[j - 1] = sw ? td : D[j - 1];
      I[j - 1] = sw ? ti : I[j - 1];
    }
  }
}

// grid = ceil(n / kThreads) (grid-stride), block = kThreads.
template <typename T, int DIM, int K>
__global__ void __launch_bounds__(kThreads, 1) rbf_knn_kernel(const KnnP P) {
  const int64_t* hdr = hdr_of(P.grid);
  const double* geom = reinterpret_cast<const double*>(P.grid + 128);
  const int64_t m = hdr[1], cm = hdr[7];
  const bool bad_grid = hdr[0] != DIM || hdr[6] != P.dtype || hdr[8] != 0;
  int64_t res[3] = {hdr[3], hdr[4], hdr[5]};
  const long long* cs = reinterpret_cast<const long long*>(P.grid + kHeaderBytes);
  const long long* order = cs + cm + 1;
  const T* coords = reinterpret_cast<const T*>(order + m);
  const double cell = geom[3];
  const double inv_cell = recip(cell);
  const T* x = static_cast<const T*>(P.x);
  T* dist2 = static_cast<T*>(P.dist2);
  const int k = P.k;
  // relative margin on dist2 (5 roundings of 2^-24 / 2^-53, with room)
  const double rel = sizeof(T) == 4 ? 1.0 / (1 << 18) : 1.0 / 70368744177664.0;
  for (int64_t n = (int64_t)blockIdx.x * kThreads + threadIdx.x; n < P.n; n += (int64_t)gridDim.x * kThreads) {
    T xq[DIM];
    bool finite = true;
#pragma unroll
    for (int d = 0; d < DIM; ++d) {
      xq[d] = x[n * P.ldx + d];
      finite = finite && finite_d((double)xq[d]);
    }
    int64_t* io = P.idx + n * k;
    T* dout = dist2 + n * k;
    if (!finite || bad_grid) {
      for (int j = 0; j < k; ++j) {
        io[j] = -1;
        dout[j] = nan_of<T>();
      }
      continue;
    }
    T D[K];
    int32_t I[K];
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const bool live = j >= K - k;
      D[j] = live ? inf_of<T>() : -inf_of<T>();
      I[j] = live ? 0x7fffffff : -1;
    }
    int64_t q[3] = {0, 0, 0};
    double slack = 0.0;
#pragma unroll
    for (int d = 0; d < DIM; ++d) {
      // the query's cell only orders the visits (the bound below does not assume x lies in it): a
      // multiplication by 1 / cell (no division slow path) is enough
      double v = floor(((double)xq[d] - geom[d]) * inv_cell);
      v = v < 0.0 ? 0.0 : (v > (double)(res[d] - 1) ? (double)(res[d] - 1) : v);
      q[d] = (int64_t)v;
      slack = fmax(slack, fabs(geom[d]) + fabs((double)xq[d]) + (double)(res[d] + 1) * cell);
    }
    slack *= 1.0 / 281474976710656.0;  // 2^-48: the double rounding of boundaries and cell ids
    int64_t maxr = 0;
#pragma unroll
    for (int d = 0; d < DIM; ++d) maxr = imax64(maxr, imax64(q[d], res[d] - 1 - q[d]));
    const int64_t Q[3] = {DIM == 2 ? 0 : q[0], DIM == 2 ? q[0] : q[1], DIM == 2 ? q[1] : q[2]};
    const int64_t R3[3] = {DIM == 2 ? 1 : res[0], DIM == 2 ? res[0] : res[1], DIM == 2 ? res[1] : res[2]};
    for (int64_t r = 0; r <= maxr; ++r) {
      // the ring's cells in (a, b, c) index space (2-D: a dummy first dimension of one cell); a run along
      // the last dimension is one range of sorted positions
      const int64_t a0 = imax64(0, Q[0] - r), a1 = imin64(R3[0] - 1, Q[0] + r);
      const int64_t b0 = imax64(0, Q[1] - r), b1 = imin64(R3[1] - 1, Q[1] + r);
      const int64_t c0 = imax64(0, Q[2] - r), c1 = imin64(R3[2] - 1, Q[2] + r);
      for (int64_t a = a0; a <= a1; ++a) {
        const bool ea = a == Q[0] - r || a == Q[0] + r;
        for (int64_t b = b0; b <= b1; ++b) {
          const int64_t row = (a * R3[1] + b) * R3[2];
          const bool whole = ea || b == Q[1] - r || b == Q[1] + r;
#pragma unroll 1
          for (int s = 0; s < 2; ++s) {
            int64_t lo_c, hi_c;  // cells [lo_c, hi_c] of the row
            if (whole) {
              if (s == 1) break;
              lo_c = c0;
              hi_c = c1;
            } else {
              lo_c = hi_c = s == 0 ? Q[2] - r : Q[2] + r;
              if (lo_c < 0 || lo_c > R3[2] - 1) continue;
            }
            knn_scan<T, DIM, K>(xq, coords, order, cs[row + lo_c], cs[row + hi_c + 1], D, I);
          }
        }
      }
      if (r == maxr) break;
      // The gap from x to the unvisited cells (rings > r), per dimension and side where cells remain.
      double b = inf_of<double>();
#pragma unroll
      for (int d = 0; d < DIM; ++d) {
        if (q[d] + r + 1 <= res[d] - 1) b = fmin(b, geom[d] + (double)(q[d] + r + 1) * cell - (double)xq[d]);
        if (q[d] - r - 1 >= 0) b = fmin(b, (double)xq[d] - (geom[d] + (double)(q[d] - r) * cell));
      }
      b -= slack;
      if (b > 0.0 && (double)D[K - 1] < b * b * (1.0 - rel)) break;
    }
#pragma unroll
    for (int j = 0; j < K; ++j)
      if (j >= K - k) {
        const bool missing = I[j] == 0x7fffffff;
        io[j - (K - k)] = missing ? -1 : (int64_t)I[j];
        dout[j - (K - k)] = missing ? inf_of<T>() : D[j];
      }
  }
}

// =================================================================================================
// features
// =================================================================================================
struct FeatP {
  int64_t n, ldx, m, ldw, C, ldo, ldg;
  int dim, kernel, full, k, norm;
  const void* x;
  const void* centers;
  const void* shapes;
  const void* weights;
  const void* omegas;
  const int64_t* idx;
  void* out;
  const void* grad_out;
  void* dx;
  void* dcenters;
  void* dshapes;
  void* dweights;
  void* domegas;
  bool dom_smem;  // bwd: domegas summed in shared memory first
};

// The kernel value of (x, RBF r) and, for the backward, o and the pieces of its derivative.
template <typename T>
struct Phi {
  T phi;
  T o[3];
  T q;  // ivq / gauss: o^T A o
};

template <typename T>
__device__ __forceinline__ Phi<T> eval_phi(const FeatP& P, const T* xq, int64_t r) {
  const T* c = static_cast<const T*>(P.centers) + r * P.dim;
  Phi<T> f;
#pragma unroll
  for (int d = 0; d < 3; ++d) f.o[d] = d < P.dim ? xq[d] - c[d] : T(0);
  f.q = T(0);
  if (P.kernel == KK_RBF_NLIN) {
    const T* s = static_cast<const T*>(P.shapes) + r * P.dim;
    T p = T(1);
#pragma unroll
    for (int d = 0; d < 3; ++d)
      if (d < P.dim) {
        T h = T(1) - absv(f.o[d]) * s[d];
        h = h < T(0) ? T(0) : (h > T(1) ? T(1) : h);
        p *= h;
      }
    f.phi = p;
    return f;
  }
  if (P.full) {
    const T* A = static_cast<const T*>(P.shapes) + r * P.dim * P.dim;
#pragma unroll
    for (int a = 0; a < 3; ++a)
#pragma unroll
      for (int b = 0; b < 3; ++b)
        if (a < P.dim && b < P.dim) f.q += f.o[a] * A[a * P.dim + b] * f.o[b];
  } else {
    const T* A = static_cast<const T*>(P.shapes) + r * P.dim;
#pragma unroll
    for (int d = 0; d < 3; ++d)
      if (d < P.dim) f.q += A[d] * f.o[d] * f.o[d];
  }
  f.phi = P.kernel == KK_RBF_IVQ ? recip(T(1) + f.q) : exp_acc(T(-0.5) * f.q);
  return f;
}

template <typename T, int G>
__device__ __forceinline__ T group_sum(T v) {
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o, G);
  return v;
}

__device__ __forceinline__ bool valid_id(int64_t r, int64_t m) { return r >= 0 && r < m; }

// Shared memory per group: phih[k] (T), then (bwd) phi[k], dphih[k] (T); rid[k] (int32) after all T arrays.
// grid = ceil(n / groups per CTA) (grid-stride), block = kFeatThreads; G lanes per query.
template <typename T, typename W, int G>
__global__ void __launch_bounds__(kFeatThreads, 1) rbf_fwd_kernel(const FeatP P) {
  constexpr int kGroups = kFeatThreads / G;
  const int k = P.k;
  T* s_ph = kk::dynamic_smem<T>();
  int32_t* s_r = reinterpret_cast<int32_t*>(s_ph + kGroups * k);
  const int lane = threadIdx.x % G, grp = threadIdx.x / G;
  T* ph = s_ph + grp * k;
  int32_t* rid = s_r + grp * k;
  const T* x = static_cast<const T*>(P.x);
  const T* om = static_cast<const T*>(P.omegas);
  const W* w = static_cast<const W*>(P.weights);
  W* out = static_cast<W*>(P.out);
  // the loop bound is uniform over the warp (its groups are consecutive queries): full-mask shuffles
  const int64_t warp_base = ((int64_t)blockIdx.x * kFeatThreads + (threadIdx.x & ~31)) / G;
  const int64_t stride = (int64_t)gridDim.x * kGroups;
  for (int64_t n0 = warp_base; n0 < P.n; n0 += stride) {
    const int64_t n = n0 + (threadIdx.x % 32) / G;
    const bool active = n < P.n;
    T xq[3] = {T(0), T(0), T(0)};
    bool finite = true;
    if (active)
#pragma unroll
      for (int d = 0; d < 3; ++d) {
        if (d >= P.dim) break;
        xq[d] = x[n * P.ldx + d];
        finite = finite && finite_d((double)xq[d]);
      }
    T psum = T(0);
    if (active && finite)
      for (int i = lane; i < k; i += G) {
        const int64_t r = P.idx[n * k + i];
        const bool ok = valid_id(r, P.m);
        const T v = ok ? eval_phi<T>(P, xq, r).phi : T(0);
        ph[i] = v;
        rid[i] = ok ? (int32_t)r : -1;
        psum += v;
      }
    const T sum = group_sum<T, G>(psum);
    const T inv = P.norm != KK_RBF_NORM_NONE ? recip(sum + T(1e-8)) : T(1);
    __syncwarp();
    if (active && finite && P.norm != KK_RBF_NORM_NONE)
      for (int i = lane; i < k; i += G) ph[i] = ph[i] * inv;
    __syncwarp();
    if (active)
      for (int64_t j = lane; j < P.C; j += G) {
        T acc = T(0);
        if (finite) {
          const T oj = om != nullptr ? om[j] : T(0);
          for (int i = 0; i < k; ++i) {
            const int32_t r = rid[i];
            if (r < 0) continue;  // uniform over the group
            const T b = om != nullptr ? sin_acc(oj * ph[i]) : ph[i];
            acc += (T)ldw(w + (int64_t)r * P.ldw + j) * b;
          }
        } else {
          acc = nan_of<T>();
        }
        stw(out + n * P.ldo + j, acc);
      }
    __syncwarp();  // ph / rid are rewritten by the next query
  }
}

template <typename T, typename W, int G>
__global__ void __launch_bounds__(kFeatThreads, 1) rbf_bwd_kernel(const FeatP P) {
  constexpr int kGroups = kFeatThreads / G;
  const int k = P.k;
  T* s_ph = kk::dynamic_smem<T>();
  T* s_phi = s_ph + kGroups * k;
  T* s_dph = s_phi + kGroups * k;
  T* s_dom = s_dph + kGroups * k;  // C entries when dom_smem
  int32_t* s_r = reinterpret_cast<int32_t*>(s_dom + (P.dom_smem ? P.C : 0));
  const int lane = threadIdx.x % G, grp = threadIdx.x / G;
  T* ph = s_ph + grp * k;
  T* phr = s_phi + grp * k;
  T* dph = s_dph + grp * k;
  int32_t* rid = s_r + grp * k;
  const T* x = static_cast<const T*>(P.x);
  const T* om = static_cast<const T*>(P.omegas);
  const W* w = static_cast<const W*>(P.weights);
  const W* g = static_cast<const W*>(P.grad_out);
  T* dx = static_cast<T*>(P.dx);
  T* dcen = static_cast<T*>(P.dcenters);
  T* dsh = static_cast<T*>(P.dshapes);
  T* dw = static_cast<T*>(P.dweights);
  T* dom = om != nullptr ? static_cast<T*>(P.domegas) : nullptr;
  const bool need_phi_grad = dx != nullptr || dcen != nullptr || dsh != nullptr;
  if (dom != nullptr && P.dom_smem) {
    for (int64_t j = threadIdx.x; j < P.C; j += kFeatThreads) s_dom[j] = T(0);
    __syncthreads();
  }
  T dom_reg = T(0);  // C <= G: the lane's channel, summed over its queries
  const int64_t warp_base = ((int64_t)blockIdx.x * kFeatThreads + (threadIdx.x & ~31)) / G;
  const int64_t stride = (int64_t)gridDim.x * kGroups;
  for (int64_t n0 = warp_base; n0 < P.n; n0 += stride) {
    const int64_t n = n0 + (threadIdx.x % 32) / G;
    bool live = n < P.n;
    T xq[3] = {T(0), T(0), T(0)};
    bool finite = true;
    if (live)
#pragma unroll
      for (int d = 0; d < 3; ++d) {
        if (d >= P.dim) break;
        xq[d] = x[n * P.ldx + d];
        finite = finite && finite_d((double)xq[d]);
      }
    if (live && !finite) {  // NaN dx row, no contribution elsewhere
      if (dx != nullptr && lane == 0)
        for (int d = 0; d < P.dim; ++d) dx[n * P.dim + d] = nan_of<T>();
      live = false;
    }
    T psum = T(0);
    if (live)
      for (int i = lane; i < k; i += G) {
        const int64_t r = P.idx[n * k + i];
        const bool ok = valid_id(r, P.m);
        const T v = ok ? eval_phi<T>(P, xq, r).phi : T(0);
        phr[i] = v;
        rid[i] = ok ? (int32_t)r : -1;
        psum += v;
      }
    const T sum = group_sum<T, G>(psum);
    const T den = sum + T(1e-8);
    const T inv = P.norm != KK_RBF_NORM_NONE ? recip(den) : T(1);
    __syncwarp();
    if (live)
      for (int i = lane; i < k; i += G) {
        ph[i] = P.norm != KK_RBF_NORM_NONE ? phr[i] * inv : phr[i];
        dph[i] = T(0);
      }
    __syncwarp();
    // channels: dweights, domegas, dphih
    for (int64_t j0 = 0; j0 < P.C; j0 += G) {
      const int64_t j = j0 + lane;
      const bool jok = live && j < P.C;
      const T gj = jok ? (T)ldw(g + n * P.ldg + j) : T(0);
      const T oj = jok && om != nullptr ? om[j] : T(0);
      T dom_acc = T(0);
      for (int i = 0; i < k; ++i) {
        const int32_t r = live ? rid[i] : -1;  // uniform over the group
        T part = T(0);
        if (r >= 0 && jok) {
          const T p = ph[i];
          T b, db;  // basis and d basis / d phih
          if (om != nullptr) {
            T s, c;
            sincos_acc(oj * p, &s, &c);
            b = s;
            db = oj * c;
            const T wj = (T)ldw(w + (int64_t)r * P.ldw + j);
            part = gj * wj * db;
            dom_acc += gj * wj * c * p;
          } else {
            b = p;
            part = gj * (T)ldw(w + (int64_t)r * P.ldw + j);
          }
          if (dw != nullptr) atomicAdd(dw + (int64_t)r * P.C + j, gj * b);
        }
        if (need_phi_grad) {
          const T tot = group_sum<T, G>(part);  // every lane of the warp takes part
          if (lane == 0 && r >= 0) dph[i] += tot;
        }
      }
      if (dom != nullptr && jok) {
        if (P.C <= G)
          dom_reg += dom_acc;
        else if (P.dom_smem)
          atomicAdd(s_dom + j, dom_acc);
        else
          atomicAdd(dom + j, dom_acc);
      }
    }
    __syncwarp();
    if (need_phi_grad) {
      // normalization: dphi_i
      T corr = T(0);
      if (P.norm == KK_RBF_NORM_FULL) {
        T part = T(0);
        if (live)
          for (int i = lane; i < k; i += G) part += dph[i] * ph[i];
        corr = group_sum<T, G>(part);
      }
      T dxa[3] = {T(0), T(0), T(0)};
      if (live)
        for (int i = lane; i < k; i += G) {
          const int32_t r = rid[i];
          if (r < 0) continue;
          T dphi = dph[i];
          if (P.norm == KK_RBF_NORM_DETACHED) dphi = dphi * inv;
          if (P.norm == KK_RBF_NORM_FULL) dphi = (dphi - corr) * inv;
          const Phi<T> f = eval_phi<T>(P, xq, r);
          T dov[3] = {T(0), T(0), T(0)};
          if (P.kernel == KK_RBF_NLIN) {
            const T* s = static_cast<const T*>(P.shapes) + (int64_t)r * P.dim;
            T h[3] = {T(1), T(1), T(1)};
            bool pass[3] = {false, false, false};
#pragma unroll
            for (int d = 0; d < 3; ++d)
              if (d < P.dim) {
                const T raw = T(1) - absv(f.o[d]) * s[d];
                pass[d] = raw >= T(0) && raw <= T(1);
                h[d] = raw < T(0) ? T(0) : (raw > T(1) ? T(1) : raw);
              }
#pragma unroll
            for (int d = 0; d < 3; ++d)
              if (d < P.dim) {
                T other = T(1);
#pragma unroll
                for (int e = 0; e < 3; ++e)
                  if (e != d && e < P.dim) other *= h[e];
                const T dh = pass[d] ? dphi * other : T(0);  // d L / d raw_d
                const T sg = f.o[d] > T(0) ? T(1) : (f.o[d] < T(0) ? T(-1) : T(0));
                dov[d] = -dh * sg * s[d];
                if (dsh != nullptr) atomicAdd(dsh + (int64_t)r * P.dim + d, -dh * absv(f.o[d]));
              }
          } else {
            const T dq = P.kernel == KK_RBF_IVQ ? -dphi * f.phi * f.phi : T(-0.5) * dphi * f.phi;  // d L / d q
            if (P.full) {
              const T* A = static_cast<const T*>(P.shapes) + (int64_t)r * P.dim * P.dim;
#pragma unroll
              for (int a = 0; a < 3; ++a)
#pragma unroll
                for (int b = 0; b < 3; ++b)
                  if (a < P.dim && b < P.dim) {
                    dov[a] += dq * (A[a * P.dim + b] + A[b * P.dim + a]) * f.o[b];
                    if (dsh != nullptr)
                      atomicAdd(dsh + ((int64_t)r * P.dim + a) * P.dim + b, dq * f.o[a] * f.o[b]);
                  }
            } else {
              const T* A = static_cast<const T*>(P.shapes) + (int64_t)r * P.dim;
#pragma unroll
              for (int d = 0; d < 3; ++d)
                if (d < P.dim) {
                  dov[d] = dq * T(2) * A[d] * f.o[d];
                  if (dsh != nullptr) atomicAdd(dsh + (int64_t)r * P.dim + d, dq * f.o[d] * f.o[d]);
                }
            }
          }
#pragma unroll
          for (int d = 0; d < 3; ++d)
            if (d < P.dim) {
              dxa[d] += dov[d];
              if (dcen != nullptr) atomicAdd(dcen + (int64_t)r * P.dim + d, -dov[d]);
            }
        }
      if (dx != nullptr) {
#pragma unroll
        for (int d = 0; d < 3; ++d) dxa[d] = group_sum<T, G>(dxa[d]);
        if (live && lane == 0)
#pragma unroll
          for (int d = 0; d < 3; ++d)
            if (d < P.dim) dx[n * P.dim + d] = dxa[d];
      }
    }
    __syncwarp();
  }
  if (dom != nullptr) {
    if (P.C <= G && lane < P.C) atomicAdd(s_dom + lane, dom_reg);  // C <= G <= 32: dom_smem is set
    if (P.dom_smem) {
      __syncthreads();
      for (int64_t j = threadIdx.x; j < P.C; j += kFeatThreads) atomicAdd(dom + j, s_dom[j]);
    }
  }
}

// =================================================================================================
// host side
// =================================================================================================
using kk::check_launch;
using kk::cuda_call;
using kk::kSizeLimit;
using kk::need_ptr;

unsigned grid1(int64_t n) { return (unsigned)imax64(1, imin64(n, kMaxGridX)); }

int64_t esize_of(kk_dtype dt) { return dt == KK_FLOAT64 ? 8 : (dt == KK_FLOAT32 ? 4 : 2); }

kk_status check_coord_dtype(const char* fn, kk_dtype dt) {
  if (dt != KK_FLOAT32 && dt != KK_FLOAT64)
    return kk::fail(KK_ERR_UNSUPPORTED_DTYPE, "%s: dtype must be KK_FLOAT32 or KK_FLOAT64, got %d", fn, (int)dt);
  return KK_OK;
}

kk_status check_dim(const char* fn, int32_t dim) {
  if (dim != 2 && dim != 3) return kk::fail(KK_ERR_INVALID_SIZE, "%s: dim must be 2 or 3, got %d", fn, (int)dim);
  return KK_OK;
}

kk_status check_m(const char* fn, int64_t m) {
  if (m < 0 || m >= (int64_t(1) << 31))
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: m must be in [0, 2^31), got %lld", fn, (long long)m);
  return KK_OK;
}

kk_status check_n(const char* fn, int64_t v, const char* name) {
  if (v < 0 || v > kSizeLimit)
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: %s must be in [0, 2^40], got %lld", fn, name, (long long)v);
  return KK_OK;
}

// k and grid_bytes use the CPU API's statuses (csrc/cpu/rbf_api.cpp): INVALID_ARGUMENT, INVALID_SIZE.
kk_status check_k(const char* fn, int32_t k) {
  if (k < 1 || k > kMaxK) return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: k must be in [1, 32], got %d", fn, (int)k);
  return KK_OK;
}

kk_status need_ld(const char* fn, int64_t ld, int64_t min, const char* name) {
  if (ld < min)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: %s (%lld) must be >= %lld", fn, name, (long long)ld, (long long)min);
  return KK_OK;
}

kk_status check_aligned(const char* fn, const void* p, int align, const char* name) {
  if (reinterpret_cast<uintptr_t>(p) % align != 0)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: %s must be %d-byte aligned", fn, name, align);
  return KK_OK;
}

// The scan plan: threads per CTA and counters per thread.  The host emulation's tests shrink the tile
// (KKEMU_RBF_SCAN_THREADS, a multiple of 32; one counter per thread) to reach several tiles with a few
// dozen centres.
struct ScanPlan {
  int threads;
  int64_t items, ntiles;
};

ScanPlan scan_plan(int64_t cm) {
  ScanPlan s{kScanThreads, kScanItems, 0};
#if defined(KK_CUDA_EMU)
  if (const char* e = std::getenv("KKEMU_RBF_SCAN_THREADS")) {
    s.threads = (int)imax64(32, imin64(kScanThreads, std::atoll(e) / 32 * 32));
    s.items = 1;
  }
#endif
  s.ntiles = ceil_div(cm + 1, s.threads * s.items);
  return s;
}

int64_t ws_bytes(int64_t m, int64_t cm) {
  return kWsHead + 8 * ceil_div(4 * m, 8) * 2 + 8 * scan_plan(cm).ntiles;
}

// Features: argument checks shared by fwd and bwd (everything but the outputs).
kk_status check_features(const char* fn, kk_dtype dtype, kk_dtype wdtype, int32_t dim, int32_t kernel,
                         int32_t shape_full, int64_t n, const void* x, int64_t ldx, int64_t m, const void* centers,
                         const void* shapes, const void* weights, int64_t ldw, int64_t channels, int32_t k,
                         const int64_t* idx, int32_t normalize) {
  KK_TRY(check_coord_dtype(fn, dtype));
  if (!(wdtype == dtype || (dtype == KK_FLOAT32 && (wdtype == KK_FLOAT16 || wdtype == KK_BFLOAT16))))
    return kk::fail(KK_ERR_UNSUPPORTED_DTYPE,
                    "%s: wdtype must be the coordinate dtype, or KK_FLOAT16 / KK_BFLOAT16 with KK_FLOAT32 "
                    "coordinates, got wdtype %d with dtype %d", fn, (int)wdtype, (int)dtype);
  KK_TRY(check_dim(fn, dim));
  KK_TRY(check_n(fn, n, "n"));
  KK_TRY(check_m(fn, m));
  KK_TRY(check_n(fn, channels, "channels"));
  KK_TRY(check_k(fn, k));
  if (kernel < KK_RBF_IVQ || kernel > KK_RBF_NLIN)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: kernel must be 0 (ivq), 1 (gauss) or 2 (nlin), got %d", fn,
                    (int)kernel);
  if (normalize < KK_RBF_NORM_NONE || normalize > KK_RBF_NORM_FULL)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: normalize must be 0, 1 or 2, got %d", fn, (int)normalize);
  if (shape_full != 0 && shape_full != 1)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: shape_full must be 0 or 1, got %d", fn, (int)shape_full);
  if (shape_full && kernel == KK_RBF_NLIN)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: nlin takes per-dimension scales (shape_full = 0)", fn);
  if (n > 0) KK_TRY(need_ld(fn, ldx, dim, "ldx"));
  if (m > 0 && channels > 0) KK_TRY(need_ld(fn, ldw, channels, "ldw"));
  if (n > 0) {
    KK_TRY(need_ptr(fn, x, "x"));
    KK_TRY(need_ptr(fn, idx, "idx"));
  }
  if (m > 0) {
    KK_TRY(need_ptr(fn, centers, "centers"));
    KK_TRY(need_ptr(fn, shapes, "shapes"));
    if (channels > 0) KK_TRY(need_ptr(fn, weights, "weights"));
  }
  return KK_OK;
}

template <typename F>
kk_status dispatch_w(kk_dtype dtype, kk_dtype wdtype, F&& f) {
  if (dtype == KK_FLOAT64) return f(double{}, double{});
  if (wdtype == KK_FLOAT16) return f(float{}, __half{});
  if (wdtype == KK_BFLOAT16) return f(float{}, __nv_bfloat16{});
  return f(float{}, float{});
}

template <typename F>
kk_status dispatch_g(int64_t C, F&& f) {
  if (C <= 4) return f(std::integral_constant<int, 4>{});
  if (C <= 8) return f(std::integral_constant<int, 8>{});
  if (C <= 16) return f(std::integral_constant<int, 16>{});
  return f(std::integral_constant<int, 32>{});
}

FeatP feat_params(int32_t dim, int32_t kernel, int32_t shape_full, int64_t n, const void* x, int64_t ldx, int64_t m,
                  const void* centers, const void* shapes, const void* weights, int64_t ldw, int64_t channels,
                  const void* omegas, int32_t k, const int64_t* idx, int32_t normalize) {
  FeatP P{};
  P.n = n;
  P.ldx = ldx;
  P.m = m;
  P.ldw = ldw;
  P.C = channels;
  P.dim = dim;
  P.kernel = kernel;
  P.full = shape_full;
  P.k = k;
  P.norm = normalize;
  P.x = x;
  P.centers = centers;
  P.shapes = shapes;
  P.weights = weights;
  P.omegas = omegas;
  P.idx = idx;
  return P;
}

}  // namespace

// =================================================================================================
// C ABI
// =================================================================================================
extern "C" {

KK_API kk_status kk_rbf_grid_build_cuda_workspace_size(kk_dtype dtype, int32_t dim, int64_t m, int64_t* bytes) {
  static const char* fn = "kk_rbf_grid_build_cuda_workspace_size";
  kk::clear_error();
  KK_TRY(need_ptr(fn, bytes, "bytes"));
  KK_TRY(check_coord_dtype(fn, dtype));
  KK_TRY(check_dim(fn, dim));
  KK_TRY(check_m(fn, m));
  *bytes = ws_bytes(m, layout_of(esize_of(dtype), dim, m).cells_max);
  return KK_OK;
}

KK_API kk_status kk_rbf_grid_build_cuda(kk_dtype dtype, int32_t dim, int64_t m, const void* centers, int64_t ldc,
                                        void* grid, int64_t grid_bytes, void* workspace, int64_t workspace_bytes,
                                        void* stream) {
  static const char* fn = "kk_rbf_grid_build_cuda";
  kk::clear_error();
  KK_TRY(check_coord_dtype(fn, dtype));
  KK_TRY(check_dim(fn, dim));
  KK_TRY(check_m(fn, m));
  if (m > 0) {
    KK_TRY(need_ld(fn, ldc, dim, "ldc"));
    KK_TRY(need_ptr(fn, centers, "centers"));
  }
  const Layout L = layout_of(esize_of(dtype), dim, m);
  KK_TRY(need_ptr(fn, grid, "grid"));
  KK_TRY(check_aligned(fn, grid, 8, "grid"));
  if (grid_bytes < L.bytes)
    return kk::fail(KK_ERR_INVALID_SIZE, "%s: grid_bytes (%lld) is smaller than the layout's %lld bytes", fn,
                    (long long)grid_bytes, (long long)L.bytes);
  const int64_t need = ws_bytes(m, L.cells_max);
  KK_TRY(need_ptr(fn, workspace, "workspace"));
  KK_TRY(check_aligned(fn, workspace, 16, "workspace"));
  if (workspace_bytes < need)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s: workspace_bytes (%lld) is smaller than the %lld bytes needed", fn,
                    (long long)workspace_bytes, (long long)need);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const ScanPlan sp = scan_plan(L.cells_max);
  BuildP P{};
  P.m = m;
  P.ldc = m > 0 ? ldc : dim;
  P.cm = L.cells_max;
  P.dim = dim;
  P.dtype = (int)dtype;
  P.centers = centers;
  P.grid = static_cast<char*>(grid);
  char* ws = static_cast<char*>(workspace);
  P.head = reinterpret_cast<unsigned long long*>(ws);
  P.cid = reinterpret_cast<int32_t*>(ws + kWsHead);
  P.rank = reinterpret_cast<int32_t*>(ws + kWsHead + 8 * ceil_div(4 * m, 8));
  P.tile_sums = reinterpret_cast<long long*>(ws + kWsHead + 16 * ceil_div(4 * m, 8));
  P.ntiles = sp.ntiles;
  P.items = sp.items;
  P.L = L;
  KK_TRY(cuda_call(fn, cudaMemsetAsync(ws, 0, kWsHead, st), "cudaMemsetAsync"));
  KK_TRY(cuda_call(fn, cudaMemsetAsync(P.grid + L.cell_start_off, 0, (size_t)(8 * (L.cells_max + 1)), st),
                   "cudaMemsetAsync"));
  const unsigned gm = grid1(ceil_div(m, kThreads));
  const unsigned gt = grid1(sp.ntiles);
  auto run = [&](auto t) -> kk_status {
    using T = decltype(t);
    kk::launch(rbf_bbox_kernel<T>, dim3(gm), dim3(kThreads), 0, st, P);
    kk::launch(rbf_geom_kernel, dim3(1), dim3(32), 0, st, P);
    kk::launch(rbf_cellid_kernel<T>, dim3(gm), dim3(kThreads), 0, st, P);
    kk::launch(rbf_scan_reduce_kernel, dim3(gt), dim3(sp.threads), 0, st, P);
    kk::launch(rbf_scan_tiles_kernel, dim3(1), dim3(sp.threads), 0, st, P);
    kk::launch(rbf_scan_apply_kernel, dim3(gt), dim3(sp.threads), 0, st, P);
    kk::launch(rbf_scatter_kernel<T>, dim3(gm), dim3(kThreads), 0, st, P);
    return check_launch(fn);
  };
  return dtype == KK_FLOAT64 ? run(double{}) : run(float{});
}

KK_API kk_status kk_rbf_knn_cuda(kk_dtype dtype, int32_t dim, int64_t n, const void* x, int64_t ldx, const void* grid,
                                 int32_t k, int64_t* idx, void* dist2, void* stream) {
  static const char* fn = "kk_rbf_knn_cuda";
  kk::clear_error();
  KK_TRY(check_coord_dtype(fn, dtype));
  KK_TRY(check_dim(fn, dim));
  KK_TRY(check_n(fn, n, "n"));
  KK_TRY(check_k(fn, k));
  if (n == 0) return KK_OK;
  KK_TRY(need_ld(fn, ldx, dim, "ldx"));
  KK_TRY(need_ptr(fn, x, "x"));
  KK_TRY(need_ptr(fn, grid, "grid"));
  KK_TRY(check_aligned(fn, grid, 8, "grid"));
  KK_TRY(need_ptr(fn, idx, "idx"));
  KK_TRY(need_ptr(fn, dist2, "dist2"));
  KnnP P{};
  P.n = n;
  P.ldx = ldx;
  P.k = k;
  P.dtype = (int)dtype;
  P.x = x;
  P.grid = static_cast<const char*>(grid);
  P.idx = idx;
  P.dist2 = dist2;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const dim3 gr(grid1(ceil_div(n, kThreads))), bl(kThreads);
  auto run = [&](auto t) {
    using T = decltype(t);
    if (dim == 2) {
      if (k <= 4) kk::launch(rbf_knn_kernel<T, 2, 4>, gr, bl, 0, st, P);
      else if (k <= 8) kk::launch(rbf_knn_kernel<T, 2, 8>, gr, bl, 0, st, P);
      else if (k <= 16) kk::launch(rbf_knn_kernel<T, 2, 16>, gr, bl, 0, st, P);
      else kk::launch(rbf_knn_kernel<T, 2, 32>, gr, bl, 0, st, P);
    } else {
      if (k <= 4) kk::launch(rbf_knn_kernel<T, 3, 4>, gr, bl, 0, st, P);
      else if (k <= 8) kk::launch(rbf_knn_kernel<T, 3, 8>, gr, bl, 0, st, P);
      else if (k <= 16) kk::launch(rbf_knn_kernel<T, 3, 16>, gr, bl, 0, st, P);
      else kk::launch(rbf_knn_kernel<T, 3, 32>, gr, bl, 0, st, P);
    }
  };
  if (dtype == KK_FLOAT64)
    run(double{});
  else
    run(float{});
  return check_launch(fn);
}

KK_API kk_status kk_rbf_features_fwd_cuda(kk_dtype dtype, kk_dtype wdtype, int32_t dim, int32_t kernel,
                                          int32_t shape_full, int64_t n, const void* x, int64_t ldx, int64_t m,
                                          const void* centers, const void* shapes, const void* weights,
                                          int64_t ldw, int64_t channels, const void* omegas, int32_t k,
                                          const int64_t* idx, int32_t normalize, void* out, int64_t ldo,
                                          void* stream) {
  static const char* fn = "kk_rbf_features_fwd_cuda";
  kk::clear_error();
  KK_TRY(check_features(fn, dtype, wdtype, dim, kernel, shape_full, n, x, ldx, m, centers, shapes, weights, ldw,
                        channels, k, idx, normalize));
  if (n == 0 || channels == 0) return KK_OK;
  KK_TRY(need_ld(fn, ldo, channels, "ldo"));
  KK_TRY(need_ptr(fn, out, "out"));
  FeatP P = feat_params(dim, kernel, shape_full, n, x, ldx, m, centers, shapes, weights, ldw, channels, omegas, k,
                        idx, normalize);
  P.out = out;
  P.ldo = ldo;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch_w(dtype, wdtype, [&](auto t, auto wt) -> kk_status {
    using T = decltype(t);
    using W = decltype(wt);
    return dispatch_g(channels, [&](auto gc) -> kk_status {
      constexpr int G = decltype(gc)::value;
      constexpr int kGroups = kFeatThreads / G;
      const size_t smem = (size_t)kGroups * k * (sizeof(T) + 4);
      kk::launch(rbf_fwd_kernel<T, W, G>, dim3(grid1(ceil_div(n, kGroups))), dim3(kFeatThreads), smem, st, P);
      return check_launch(fn);
    });
  });
}

KK_API kk_status kk_rbf_features_bwd_cuda(kk_dtype dtype, kk_dtype wdtype, int32_t dim, int32_t kernel,
                                          int32_t shape_full, int64_t n, const void* x, int64_t ldx, int64_t m,
                                          const void* centers, const void* shapes, const void* weights,
                                          int64_t ldw, int64_t channels, const void* omegas, int32_t k,
                                          const int64_t* idx, int32_t normalize, const void* grad_out,
                                          int64_t ldg, void* dx, void* dcenters, void* dshapes, void* dweights,
                                          void* domegas, void* stream) {
  static const char* fn = "kk_rbf_features_bwd_cuda";
  kk::clear_error();
  KK_TRY(check_features(fn, dtype, wdtype, dim, kernel, shape_full, n, x, ldx, m, centers, shapes, weights, ldw,
                        channels, k, idx, normalize));
  if (n > 0 && channels > 0) {
    KK_TRY(need_ld(fn, ldg, channels, "ldg"));
    KK_TRY(need_ptr(fn, grad_out, "grad_out"));
  }
  if (omegas == nullptr) domegas = nullptr;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t es = esize_of(dtype);
  const int64_t shape_elems = shape_full ? (int64_t)dim * dim : dim;
  // zero every gradient given (then scatter-add)
  struct Z {
    void* p;
    int64_t elems;
  } zs[5] = {{dx, n * dim}, {dcenters, m * dim}, {dshapes, m * shape_elems}, {dweights, m * channels},
             {domegas, channels}};
  for (const Z& z : zs)
    if (z.p != nullptr && z.elems > 0)
      KK_TRY(cuda_call(fn, cudaMemsetAsync(z.p, 0, (size_t)(z.elems * es), st), "cudaMemsetAsync"));
  if (n == 0 || channels == 0) return KK_OK;  // the output has no element: every gradient is 0
  if (dx == nullptr && dcenters == nullptr && dshapes == nullptr && dweights == nullptr && domegas == nullptr)
    return KK_OK;
  FeatP P = feat_params(dim, kernel, shape_full, n, x, ldx, m, centers, shapes, weights, ldw, channels, omegas, k,
                        idx, normalize);
  P.grad_out = grad_out;
  P.ldg = ldg;
  P.dx = dx;
  P.dcenters = dcenters;
  P.dshapes = dshapes;
  P.dweights = dweights;
  P.domegas = domegas;
  P.dom_smem = domegas != nullptr && channels <= kDomSmemMax;
  return dispatch_w(dtype, wdtype, [&](auto t, auto wt) -> kk_status {
    using T = decltype(t);
    using W = decltype(wt);
    return dispatch_g(channels, [&](auto gc) -> kk_status {
      constexpr int G = decltype(gc)::value;
      constexpr int kGroups = kFeatThreads / G;
      const size_t smem = (size_t)kGroups * k * (3 * sizeof(T) + 4) + (P.dom_smem ? (size_t)channels * sizeof(T) : 0);
      kk::launch(rbf_bwd_kernel<T, W, G>, dim3(grid1(ceil_div(n, kGroups))), dim3(kFeatThreads), smem, st, P);
      return check_launch(fn);
    });
  });
}

}  // extern "C"
