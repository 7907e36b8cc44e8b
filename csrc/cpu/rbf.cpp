// rbf kernels on the CPU: adaptive radial-basis fields (NeuRBF, Chen et al., ICCV 2023;
// ../shared/papers/rbf.md).  csrc/include/kernelkit/rbf.h has the math, the layouts and the grid buffer.
//
//   grid_build  centres binned into a uniform grid (reference.grid_geometry's cell rule, in double),
//               stable counting sort by cell, coordinates copied in sorted order (contiguous per cell).
//   knn         per query: its (clamped) cell, then Chebyshev rings of cells around it; each ring's cells
//               of one grid row are one contiguous range of sorted centres.  A sorted top-k (insertion,
//               k <= 32, ties to the smaller index) is kept; the search stops once the k-th dist2 is below
//               the squared distance to the nearest unvisited cell, shrunk by a margin (1e-5 float32,
//               1e-12 float64, and an absolute slack for the double rounding of the cell edges and for
//               underflow) that covers the rounding of dist2, so the result equals brute force bit for
//               bit.  dist2 = ((x0-c0)^2 + (x1-c1)^2) + (x2-c2)^2 with every operation rounded: this file
//               is compiled with -ffp-contract=off (setup.py) and uses FMA only through explicit
//               intrinsics, in the sine.  OpenMP over queries (dynamic chunks).
//   features    fused per query: gather the k centres / shapes, phi, normalize, then for the C channels
//               sum_i w[i, j] sin(omega_j phih_i) in vector registers (float32: 4 / 8 / 16 channels per
//               vector for base / avx2 / avx512, vectorized range-reduced sine).
//   backward    per chunk of queries, pass 1 over queries: phih and dL/dphi per (query, slot) stored, dx,
//               domegas from per-block partials (blocks of 256 queries, reduced in block order in
//               double); then a counting sort of the chunk's (query, slot) entries by RBF (CSR) and pass
//               2 over RBFs gathering g[n, :] sin(omega phih) into dweights[i, :] and the stored per-slot
//               factors into dcenters / dshapes.  Every gradient row has one writer and a fixed order.
//               dweights itself, whenever (threads - 1) * M * C fits in kPrivBytes and threads * M <= N * k,
//               comes from dweights_private_t instead (per-thread accumulators over a static partition of
//               the queries, reduced in thread order: deterministic for a given thread count, the same bits
//               whether or not other gradients are asked); pass 1's cosines run only when dx, dcenters,
//               dshapes or domegas is asked (NeuRBF's training asks dweights alone: one forward's sines).
//               Forward and backward prefetch the gathered rows (weights / accumulators, centres, shapes)
//               kPf queries ahead.
//
// Sine (float32): t = omega * phih (float32, as the header says), n = rint(t 2/pi), r = t - n pi/2 by
// Cody-Waite with pi/2 split in 3 float parts, each step one FMA (the first one exact); the base ISA
// (no FMA) reduces in double (pi/2 in 33 + 53 bits).  Then cephes' minimax polynomials on [-pi/4, pi/4].
// Error <= ~2.5e-7 < 2^-21 for |t| <= 2^17 (tested against double sin); calls whose max|omega| exceeds
// 2^17 (so |t| could pass 2^17) take a scalar double std::sin per element.  float64 uses std::sin.
//
// This file is compiled once per ISA (KK_ISA_NS = isa_avx512 / isa_avx2 / isa_base).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#include "rbf_impl.h"
#include "status.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KK_RBF_FMA 1
#endif

namespace kk {
namespace KK_ISA_NS {
namespace {

#if defined(__AVX512F__)
constexpr int VB = 64;
#elif defined(__AVX2__)
constexpr int VB = 32;
#else
constexpr int VB = 16;
#endif
constexpr int VL = VB / 4;  // float32 lanes
typedef float vf __attribute__((vector_size(VB)));
typedef int32_t vi __attribute__((vector_size(VB)));

constexpr int64_t kBlock = 256;       // queries per domegas partial (fixed: results independent of threads)
constexpr int64_t kChunk = 1 << 16;   // queries per backward chunk (bounds the per-slot buffers)

inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf vsplat(float a) { return vf{} + a; }

inline vf vfma(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(KK_RBF_FMA)
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

inline float hsum(vf v) {
  float s = 0.f;
  for (int l = 0; l < VL; ++l) s += v[l];
  return s;
}

// ---- sine ------------------------------------------------------------------------------------------
// r = t - n pi/2 (|r| <~ pi/4) and the quadrant n.
inline void reduce(vf t, vf& r, vi& q) {
#if defined(KK_RBF_FMA)
  const float magic = 12582912.0f;  // 1.5 * 2^23: (u + magic) - magic rounds u to an integer
  const vf nf = (t * vsplat(0.636619772367581343f) + vsplat(magic)) - vsplat(magic);
  // pi/2 = P1 + P2 + P3 (24 + 24 + 24 bits); n * P1 is exact in the FMA and t - n P1 is exact (both
  // multiples of 2^-23 below 1 in magnitude... for |t| >= 1; for |t| < 1, n is 0 or +-1 and exactness
  // holds as well), the next two steps round once each (<= 2^-25 absolute).
  r = vfma(nf, vsplat(-1.5707963705062866f), t);
  r = vfma(nf, vsplat(4.371138828673793e-08f), r);
  r = vfma(nf, vsplat(1.7151245100058819e-15f), r);
  q = __builtin_convertvector(nf, vi);
#else
  // No FMA: the reduction in double, pi/2 = 1.5707963267341256 (33 bits: n * it is exact for n < 2^20)
  // + 6.077100506506192e-11.
  for (int l = 0; l < VL; ++l) {
    const double td = t[l];
    const double nd = (td * 0.6366197723675814 + 6755399441055744.0) - 6755399441055744.0;
    r[l] = (float)((td - nd * 1.5707963267341256) - nd * 6.077100506506192e-11);
    q[l] = (int32_t)nd;
  }
#endif
}

inline vf sin_poly(vf r, vf z) {  // sin r, |r| <= pi/4 (cephes sinf)
  vf p = vfma(vsplat(-1.9515295891e-4f), z, vsplat(8.3321608736e-3f));
  p = vfma(p, z, vsplat(-1.6666654611e-1f));
  return vfma(p * z, r, r);
}
inline vf cos_poly(vf z) {  // cos r (cephes cosf)
  vf p = vfma(vsplat(2.443315711809948e-5f), z, vsplat(-1.388731625493765e-3f));
  p = vfma(p, z, vsplat(4.166664568298827e-2f));
  return vfma(p * z, z, vsplat(1.0f) - vsplat(0.5f) * z);
}

inline vf vsin(vf t) {
  vf r;
  vi q;
  reduce(t, r, q);
  const vf z = r * r;
  const vf s = sin_poly(r, z), c = cos_poly(z);
  const vi odd = (q & 1) != 0;
  const vf res = odd ? c : s;
  return (vf)((vi)res ^ ((q & 2) << 30));
}

inline void vsincos(vf t, vf& so, vf& co) {
  vf r;
  vi q;
  reduce(t, r, q);
  const vf z = r * r;
  const vf s = sin_poly(r, z), c = cos_poly(z);
  const vi odd = (q & 1) != 0;
  // sin(r + q pi/2): s, c, -s, -c;  cos(r + q pi/2): c, -s, -c, s
  so = (vf)((vi)(odd ? c : s) ^ ((q & 2) << 30));
  co = (vf)((vi)(odd ? s : c) ^ (((q + 1) & 2) << 30));
}

// The slow exact path (max|omega| > 2^16): double sine per lane.
inline vf vsin_exact(vf t) {
  vf s;
  for (int l = 0; l < VL; ++l) s[l] = (float)std::sin((double)t[l]);
  return s;
}
inline void vsincos_exact(vf t, vf& s, vf& c) {
  for (int l = 0; l < VL; ++l) {
    s[l] = (float)std::sin((double)t[l]);
    c[l] = (float)std::cos((double)t[l]);
  }
}

// ---- half precision --------------------------------------------------------------------------------
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  uint32_t u;
  if (em >= 0x7c00u) {
    u = sign | 0x7f800000u | ((em & 0x3ffu) << 13);
  } else {
    float f;
    u = em << 13;
    std::memcpy(&f, &u, 4);
    f *= 5.192296858534828e+33f;  // 2^112: rebias (subnormals come out right too)
    std::memcpy(&u, &f, 4);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_f16(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return uint16_t(sign | 0x7e00u);           // NaN
  if (u >= 0x477ff000u) return uint16_t(sign | 0x7c00u);          // overflow (>= 65520) -> inf
  if (u < 0x38800000u) {                                           // subnormal half (or zero)
    float a;
    std::memcpy(&a, &u, 4);
    a += 0.5f;  // 0.5 = 2^-1: the sum's low mantissa bits are the half subnormal, rounded to even
    uint32_t b;
    std::memcpy(&b, &a, 4);
    return uint16_t(sign | (b - 0x3f000000u));
  }
  const uint32_t mant_odd = (u >> 13) & 1u;
  u += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round
  return uint16_t(sign | (u >> 13));
}
inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// A row of `c` feature-dtype values as float32 (f16 / bf16 / f32).
inline void row_to_f32(kk_dtype wdt, const void* src, int64_t c, float* dst) {
  if (wdt == KK_FLOAT32) {
    std::memcpy(dst, src, sizeof(float) * c);
  } else if (wdt == KK_FLOAT16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t j = 0; j < c; ++j) dst[j] = f16_to_f32(s[j]);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t j = 0; j < c; ++j) dst[j] = bf16_to_f32(s[j]);
  }
}
inline void row_from_f32(kk_dtype wdt, const float* src, int64_t c, void* dst) {
  if (wdt == KK_FLOAT32) {
    std::memcpy(dst, src, sizeof(float) * c);
  } else if (wdt == KK_FLOAT16) {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t j = 0; j < c; ++j) d[j] = f32_to_f16(src[j]);
  } else {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t j = 0; j < c; ++j) d[j] = f32_to_bf16(src[j]);
  }
}
inline int64_t wsize(kk_dtype wdt) { return wdt == KK_FLOAT64 ? 8 : wdt == KK_FLOAT32 ? 4 : 2; }

// ---- the grid --------------------------------------------------------------------------------------
struct GridView {
  int dim;
  int64_t m, ncells, res[3];
  double lo[3], cell;
  const int64_t* start;
  const int64_t* order;
  const void* coords;
};

GridView view_of(const void* grid) {
  const int64_t* h = static_cast<const int64_t*>(grid);
  const double* g = reinterpret_cast<const double*>(static_cast<const char*>(grid) + 128);
  GridView v;
  v.dim = (int)h[0];
  v.m = h[1];
  v.ncells = h[2];
  for (int d = 0; d < 3; ++d) {
    v.res[d] = h[3 + d];
    v.lo[d] = g[d];
  }
  v.cell = g[3];
  kk_rbf_grid_layout_t l;
  const int64_t cm = rbf_cells_max(v.m);
  l.cell_start_off = kRbfHeaderBytes;
  l.order_off = l.cell_start_off + 8 * (cm + 1);
  l.coords_off = l.order_off + 8 * v.m;
  const char* base = static_cast<const char*>(grid);
  v.start = reinterpret_cast<const int64_t*>(base + l.cell_start_off);
  v.order = reinterpret_cast<const int64_t*>(base + l.order_off);
  v.coords = base + l.coords_off;
  return v;
}

template <typename T>
void grid_build_t(int dim, int64_t m, const T* c, int64_t ldc, void* grid, int nt) {
  const int64_t cm = rbf_cells_max(m);
  const int64_t cs_off = kRbfHeaderBytes, order_off = cs_off + 8 * (cm + 1), coords_off = order_off + 8 * m;
  const int64_t total = coords_off + ((int64_t(sizeof(T)) * m * dim + 7) / 8) * 8;
  char* base = static_cast<char*>(grid);
  std::memset(base, 0, (size_t)total);
  int64_t* hdr = reinterpret_cast<int64_t*>(base);
  double* geom = reinterpret_cast<double*>(base + 128);
  double lo[3] = {0, 0, 0}, hi[3] = {0, 0, 0};
  if (m > 0) {
    for (int d = 0; d < dim; ++d) {
      T a = c[d], b = c[d];
      for (int64_t i = 1; i < m; ++i) {
        const T v = c[i * ldc + d];
        a = v < a ? v : a;
        b = v > b ? v : b;
      }
      lo[d] = (double)a;
      hi[d] = (double)b;
    }
  }
  double cell;
  int64_t res[3];
  rbf_grid_geometry(dim, lo, hi, m, &cell, res);
  const int64_t ncells = res[0] * res[1] * res[2];
  hdr[0] = dim;
  hdr[1] = m;
  hdr[2] = ncells;
  hdr[3] = res[0];
  hdr[4] = res[1];
  hdr[5] = res[2];
  hdr[6] = sizeof(T) == 4 ? KK_FLOAT32 : KK_FLOAT64;
  hdr[7] = cm;
  hdr[8] = 0;
  for (int d = 0; d < 3; ++d) geom[d] = lo[d];
  geom[3] = cell;
  if (m == 0) return;
  int64_t* start = reinterpret_cast<int64_t*>(base + cs_off);
  int64_t* order = reinterpret_cast<int64_t*>(base + order_off);
  T* coords = reinterpret_cast<T*>(base + coords_off);
  std::vector<int64_t> cid((size_t)m);
#pragma omp parallel for num_threads(nt) schedule(static) if (m > 4096)
  for (int64_t i = 0; i < m; ++i) {
    int64_t id = 0;
    for (int d = 0; d < dim; ++d) {
      double f = std::floor(((double)c[i * ldc + d] - lo[d]) / cell);
      if (!(f >= 0.0)) f = 0.0;
      if (f > (double)(res[d] - 1)) f = (double)(res[d] - 1);
      id = id * res[d] + (int64_t)f;
    }
    cid[i] = id;
  }
  // stable counting sort by cell: start[c + 1] counts, prefix sums, then placement in index order
  for (int64_t i = 0; i < m; ++i) ++start[cid[i] + 1];
  for (int64_t cc = 0; cc < cm; ++cc) start[cc + 1] += start[cc];
  std::vector<int64_t> fill(start, start + ncells);
  for (int64_t i = 0; i < m; ++i) order[fill[cid[i]]++] = i;
#pragma omp parallel for num_threads(nt) schedule(static) if (m > 4096)
  for (int64_t p = 0; p < m; ++p)
    for (int d = 0; d < dim; ++d) coords[p * dim + d] = c[order[p] * ldc + d];
}

// ---- neighbour search ------------------------------------------------------------------------------
template <typename T>
struct TopK {
  T d[33];
  int64_t i[33];
  int k;
  void init(int kk) {
    k = kk;
    for (int s = 0; s < k; ++s) {
      d[s] = std::numeric_limits<T>::infinity();
      i[s] = INT64_MAX;  // sentinel: any real centre (even at +inf) sorts first
    }
  }
  inline void push(T dist, int64_t id) {
    int s = k - 1;
    if (dist > d[s] || (dist == d[s] && id > i[s])) return;
    while (s > 0 && (d[s - 1] > dist || (d[s - 1] == dist && i[s - 1] > id))) {
      d[s] = d[s - 1];
      i[s] = i[s - 1];
      --s;
    }
    d[s] = dist;
    i[s] = id;
  }
};

template <typename T, int DIM>
inline void scan_range(const T* __restrict co, const int64_t* __restrict order, int64_t p0, int64_t p1, const T* q,
                       TopK<T>& top) {
  for (int64_t p = p0; p < p1; ++p) {
    const T* cp = co + p * DIM;
    const T a = q[0] - cp[0], b = q[1] - cp[1];
    T d2 = a * a;
    const T bb = b * b;
    d2 = d2 + bb;
    if (DIM == 3) {
      const T e = q[2] - cp[2];
      const T ee = e * e;
      d2 = d2 + ee;
    }
    const T kth = top.d[top.k - 1];
    if (d2 <= kth) top.push(d2, order[p]);
  }
}

template <typename T, int DIM>
void knn_t(int64_t n, const T* x, int64_t ldx, const GridView& g, int k, int64_t* idx, T* dist2, int nt) {
  const T* co = static_cast<const T*>(g.coords);
  const double margin = sizeof(T) == 4 ? 1e-5 : 1e-12;
  const double tiny = 8.0 * (double)std::numeric_limits<T>::denorm_min();
#pragma omp parallel for num_threads(nt) schedule(dynamic, 256)
  for (int64_t nq = 0; nq < n; ++nq) {
    const T* xr = x + nq * ldx;
    int64_t* ir = idx + nq * k;
    T* dr = dist2 + nq * k;
    T q[3] = {0, 0, 0};
    bool finite = true;
    for (int d = 0; d < DIM; ++d) {
      q[d] = xr[d];
      finite = finite && std::isfinite(q[d]);
    }
    if (!finite) {
      for (int s = 0; s < k; ++s) {
        ir[s] = -1;
        dr[s] = std::numeric_limits<T>::quiet_NaN();
      }
      continue;
    }
    TopK<T> top;
    top.init(k);
    int64_t qc[3] = {0, 0, 0};
    double slack = 0.0;
    for (int d = 0; d < DIM; ++d) {
      double f = std::floor(((double)q[d] - g.lo[d]) / g.cell);
      if (!(f >= 0.0)) f = 0.0;
      if (f > (double)(g.res[d] - 1)) f = (double)(g.res[d] - 1);
      qc[d] = (int64_t)f;
      slack += std::fabs((double)q[d]) + std::fabs(g.lo[d]) + (double)g.res[d] * g.cell;
    }
    slack *= 1e-15;  // the double rounding of cell edges and of the centres' cell assignment
    const int64_t* st = g.start;
    for (int64_t r = 0;; ++r) {
      if (DIM == 2) {
        const int64_t i0 = std::max<int64_t>(0, qc[0] - r), i1 = std::min<int64_t>(g.res[0] - 1, qc[0] + r);
        const int64_t j0 = std::max<int64_t>(0, qc[1] - r), j1 = std::min<int64_t>(g.res[1] - 1, qc[1] + r);
        for (int64_t i = i0; i <= i1; ++i) {
          const int64_t row = i * g.res[1];
          if (i == qc[0] - r || i == qc[0] + r) {
            scan_range<T, 2>(co, g.order, st[row + j0], st[row + j1 + 1], q, top);
          } else {
            if (qc[1] - r >= 0) scan_range<T, 2>(co, g.order, st[row + qc[1] - r], st[row + qc[1] - r + 1], q, top);
            if (r > 0 && qc[1] + r < g.res[1])
              scan_range<T, 2>(co, g.order, st[row + qc[1] + r], st[row + qc[1] + r + 1], q, top);
          }
        }
      } else {
        const int64_t i0 = std::max<int64_t>(0, qc[0] - r), i1 = std::min<int64_t>(g.res[0] - 1, qc[0] + r);
        const int64_t j0 = std::max<int64_t>(0, qc[1] - r), j1 = std::min<int64_t>(g.res[1] - 1, qc[1] + r);
        const int64_t l0 = std::max<int64_t>(0, qc[2] - r), l1 = std::min<int64_t>(g.res[2] - 1, qc[2] + r);
        for (int64_t i = i0; i <= i1; ++i) {
          const bool iface = i == qc[0] - r || i == qc[0] + r;
          for (int64_t j = j0; j <= j1; ++j) {
            const int64_t row = (i * g.res[1] + j) * g.res[2];
            if (iface || j == qc[1] - r || j == qc[1] + r) {
              scan_range<T, 3>(co, g.order, st[row + l0], st[row + l1 + 1], q, top);
            } else {
              if (qc[2] - r >= 0) scan_range<T, 3>(co, g.order, st[row + qc[2] - r], st[row + qc[2] - r + 1], q, top);
              if (r > 0 && qc[2] + r < g.res[2])
                scan_range<T, 3>(co, g.order, st[row + qc[2] + r], st[row + qc[2] + r + 1], q, top);
            }
          }
        }
      }
      // the distance from q to the nearest unvisited cell: the nearest open side of the visited box
      double bmin = std::numeric_limits<double>::infinity();
      bool open = false;
      for (int d = 0; d < DIM; ++d) {
        if (qc[d] - r > 0) {
          open = true;
          bmin = std::min(bmin, (double)q[d] - (g.lo[d] + (double)(qc[d] - r) * g.cell));
        }
        if (qc[d] + r < g.res[d] - 1) {
          open = true;
          bmin = std::min(bmin, g.lo[d] + (double)(qc[d] + r + 1) * g.cell - (double)q[d]);
        }
      }
      if (!open) break;
      const double b = bmin - slack;
      if (b > 0.0 && (double)top.d[k - 1] < b * b * (1.0 - margin) - tiny) break;
    }
    for (int s = 0; s < k; ++s) {
      ir[s] = top.i[s] == INT64_MAX ? -1 : top.i[s];
      dr[s] = top.d[s];
    }
  }
}

// ---- the kernels phi and their derivatives ---------------------------------------------------------
// phi of one (query, RBF) pair; o = x - mu (dim), A = the RBF's shape row (dim*dim full, dim diagonal or
// nlin scales).  Also returns q (the quadratic form) for ivq / gauss.
template <typename T>
inline T phi_of(int kernel, int full, int dim, const T* o, const T* A) {
  if (kernel == KK_RBF_NLIN) {
    T p = 1;
    for (int d = 0; d < dim; ++d) {
      T h = T(1) - std::fabs(o[d]) * A[d];
      h = h < T(0) ? T(0) : (h > T(1) ? T(1) : h);
      p *= h;
    }
    return p;
  }
  T q = 0;
  if (full) {
    for (int a = 0; a < dim; ++a)
      for (int b = 0; b < dim; ++b) q += o[a] * A[a * dim + b] * o[b];
  } else {
    for (int d = 0; d < dim; ++d) q += A[d] * o[d] * o[d];
  }
  return kernel == KK_RBF_IVQ ? T(1) / (T(1) + q) : std::exp(T(-0.5) * q);
}

// go[d] += s dphi/do_d; gA (when not NULL) += s dphi/dA (torch autograd's conventions: d|o|/do = sign(o),
// clamp passes the gradient on [0, 1], dq/dA[a, b] = o_a o_b unsymmetrized).
template <typename T>
inline void phi_grad(int kernel, int full, int dim, const T* o, const T* A, T phi, T s, T* go, T* gA) {
  if (kernel == KK_RBF_NLIN) {
    T h[3], cl[3];
    bool pass[3];
    for (int d = 0; d < dim; ++d) {
      h[d] = T(1) - std::fabs(o[d]) * A[d];
      cl[d] = h[d] < T(0) ? T(0) : (h[d] > T(1) ? T(1) : h[d]);
      pass[d] = h[d] >= T(0) && h[d] <= T(1);
    }
    for (int d = 0; d < dim; ++d) {
      if (!pass[d]) continue;
      T others = 1;
      for (int e = 0; e < dim; ++e)
        if (e != d) others *= cl[e];
      const T dh = s * others;  // dL/dh_d
      const T sg = o[d] > T(0) ? T(1) : (o[d] < T(0) ? T(-1) : T(0));
      go[d] -= dh * A[d] * sg;
      if (gA) gA[d] -= dh * std::fabs(o[d]);
    }
    return;
  }
  const T dq = kernel == KK_RBF_IVQ ? -phi * phi * s : T(-0.5) * phi * s;  // dL/dq
  if (full) {
    for (int a = 0; a < dim; ++a) {
      T t = 0;
      for (int b = 0; b < dim; ++b) t += (A[a * dim + b] + A[b * dim + a]) * o[b];
      go[a] += dq * t;
    }
    if (gA)
      for (int a = 0; a < dim; ++a)
        for (int b = 0; b < dim; ++b) gA[a * dim + b] += dq * o[a] * o[b];
  } else {
    for (int d = 0; d < dim; ++d) go[d] += dq * T(2) * A[d] * o[d];
    if (gA)
      for (int d = 0; d < dim; ++d) gA[d] += dq * o[d] * o[d];
  }
}

// Per query: phi of the k slots (0 for a missing one), phih, and the denominator.  Returns false for a
// query with a non-finite coordinate.
template <typename T>
inline bool query_phi(const RbfArgs& a, int64_t nq, T* phi, T* phih, T* den_out) {
  const T* xr = static_cast<const T*>(a.x) + nq * a.ldx;
  const T* C = static_cast<const T*>(a.centers);
  const T* S = static_cast<const T*>(a.shapes);
  const int dim = a.dim;
  const int sw = a.shape_full ? dim * dim : dim;
  for (int d = 0; d < dim; ++d)
    if (!std::isfinite(xr[d])) return false;
  const int64_t* ir = a.idx + nq * a.k;
  T sum = 0;
  for (int s = 0; s < a.k; ++s) {
    const int64_t i = ir[s];
    if (i < 0) {
      phi[s] = 0;
      continue;
    }
    T o[3];
    for (int d = 0; d < dim; ++d) o[d] = xr[d] - C[i * dim + d];
    phi[s] = phi_of<T>(a.kernel, a.shape_full, dim, o, S + i * sw);
    sum += phi[s];
  }
  T den = 1;
  if (a.normalize != KK_RBF_NORM_NONE) den = sum + T(1e-8);
  for (int s = 0; s < a.k; ++s) phih[s] = a.normalize != KK_RBF_NORM_NONE ? phi[s] / den : phi[s];
  *den_out = den;
  return true;
}

// ---- channel loops ---------------------------------------------------------------------------------
// float32: out[j] = sum_s w_s[j] sin(om[j] ph[s]) (or w_s[j] ph[s]) for the nv valid slots.  om is
// padded to a multiple of VL (zeros), w rows are read with a zero-padded copy of the tail.
struct ChanF {
  int64_t C, Cv;  // channels, full vectors
  const float* om;  // padded, or NULL
  bool exact;       // slow exact sine
};

inline vf wload(const float* w, int64_t c0, int64_t C) {
  if (c0 + VL <= C) return vload(w + c0);
  vf v = vf{};
  for (int64_t j = c0; j < C; ++j) v[j - c0] = w[j];
  return v;
}

void fwd_row_f(const ChanF& ch, int nv, const float* ph, const float* const* wr, float* out) {
  for (int64_t c0 = 0; c0 < ch.C; c0 += VL) {
    vf acc = vf{};
    if (ch.om) {
      const vf om = vload(ch.om + c0);
      for (int s = 0; s < nv; ++s) {
        const vf t = om * vsplat(ph[s]);
        const vf sv = ch.exact ? vsin_exact(t) : vsin(t);
        acc = vfma(wload(wr[s], c0, ch.C), sv, acc);
      }
    } else {
      for (int s = 0; s < nv; ++s) acc = vfma(wload(wr[s], c0, ch.C), vsplat(ph[s]), acc);
    }
    if (c0 + VL <= ch.C) {
      vstore(out + c0, acc);
    } else {
      for (int64_t j = c0; j < ch.C; ++j) out[j] = acc[j - c0];
    }
  }
}

// Backward per query: a[s] = dL/dphih_s = sum_j g[j] w_s[j] om[j] cos(om[j] ph[s]) (or sum_j g[j] w_s[j]),
// dom[j] += sum_s g[j] w_s[j] ph[s] cos(om[j] ph[s]).
void bwd_row_f(const ChanF& ch, int nv, const float* ph, const float* const* wr, const float* g, float* a,
               float* dom) {
  vf av[32];
  for (int s = 0; s < nv; ++s) av[s] = vf{};
  for (int64_t c0 = 0; c0 < ch.C; c0 += VL) {
    const vf gv = wload(g, c0, ch.C);
    if (ch.om) {
      const vf om = vload(ch.om + c0);
      vf dacc = vf{};
      for (int s = 0; s < nv; ++s) {
        const vf ps = vsplat(ph[s]);
        vf sv, cv;
        if (ch.exact)
          vsincos_exact(om * ps, sv, cv);
        else
          vsincos(om * ps, sv, cv);
        const vf gwc = gv * wload(wr[s], c0, ch.C) * cv;
        av[s] = vfma(gwc, om, av[s]);
        dacc = vfma(gwc, ps, dacc);
      }
      if (dom) {
        if (c0 + VL <= ch.C)
          vstore(dom + c0, vload(dom + c0) + dacc);
        else
          for (int64_t j = c0; j < ch.C; ++j) dom[j] += dacc[j - c0];
      }
    } else {
      for (int s = 0; s < nv; ++s) av[s] = vfma(gv, wload(wr[s], c0, ch.C), av[s]);
    }
  }
  for (int s = 0; s < nv; ++s) a[s] = hsum(av[s]);
}

// dweights row of one RBF: dw[j] += sum over its entries e of g_e[j] sin(om[j] ph_e) (or g_e[j] ph_e).
void dw_row_f(const ChanF& ch, int64_t ne, const float* const* grow, const float* ph, float* dw) {
  for (int64_t c0 = 0; c0 < ch.C; c0 += VL) {
    vf acc = vf{};
    if (ch.om) {
      const vf om = vload(ch.om + c0);
      for (int64_t e = 0; e < ne; ++e) {
        const vf t = om * vsplat(ph[e]);
        acc = vfma(wload(grow[e], c0, ch.C), ch.exact ? vsin_exact(t) : vsin(t), acc);
      }
    } else {
      for (int64_t e = 0; e < ne; ++e) acc = vfma(wload(grow[e], c0, ch.C), vsplat(ph[e]), acc);
    }
    if (c0 + VL <= ch.C)
      vstore(dw + c0, vload(dw + c0) + acc);
    else
      for (int64_t j = c0; j < ch.C; ++j) dw[j] += acc[j - c0];
  }
}

// float64: plain loops, std::sin / std::cos.
void fwd_row_d(int64_t C, const double* om, int nv, const double* ph, const double* const* wr, double* out) {
  for (int64_t j = 0; j < C; ++j) out[j] = 0;
  for (int s = 0; s < nv; ++s) {
    const double* w = wr[s];
    if (om)
      for (int64_t j = 0; j < C; ++j) out[j] += w[j] * std::sin(om[j] * ph[s]);
    else
      for (int64_t j = 0; j < C; ++j) out[j] += w[j] * ph[s];
  }
}

// The feature rows (M x C, random order: at M = 1e4..1e5 they live in L3, not L2) of the query kPf ahead are
// prefetched; without it the gathers' latency, not the sines, bounds the forward and the backward.
constexpr int64_t kPf = 8;
inline void prefetch_rows(const int64_t* ir, int k, const void* base, int64_t row_bytes, int64_t bytes, bool write) {
  const int64_t nb = bytes < 1024 ? bytes : 1024;
  for (int s = 0; s < k; ++s) {
    if (ir[s] < 0) continue;
    const char* r = static_cast<const char*>(base) + ir[s] * row_bytes;
    for (int64_t b = 0; b < nb; b += 64) {
      if (write)
        __builtin_prefetch(r + b, 1, 3);
      else
        __builtin_prefetch(r + b, 0, 3);
    }
  }
}
// The centre and shape rows of a query's neighbours (query_phi's gathers; also random at large M).
template <typename T>
inline void prefetch_geom(const RbfArgs& a, const int64_t* ir) {
  const int sw = a.shape_full ? a.dim * a.dim : a.dim;
  const T* C = static_cast<const T*>(a.centers);
  const T* S = static_cast<const T*>(a.shapes);
  for (int s = 0; s < a.k; ++s) {
    if (ir[s] < 0) continue;
    __builtin_prefetch(C + ir[s] * a.dim, 0, 3);
    __builtin_prefetch(S + ir[s] * sw, 0, 3);
    if (sw * sizeof(T) > 8) __builtin_prefetch(S + ir[s] * sw + sw - 1, 0, 3);
  }
}

// ---- forward ---------------------------------------------------------------------------------------
template <typename T>
struct FeatCtx {
  const T* wts;  // weights in the coordinate dtype (converted for f16 / bf16)
  int64_t ldw;
  std::vector<float> wconv;
  std::vector<float> ompad;
  bool exact = false;
};

// Half weights -> a float32 copy (M x C); float32 / float64 weights are used in place.
template <typename T>
void prepare(const RbfArgs& a, FeatCtx<T>& cx, int nt) {
  cx.wts = static_cast<const T*>(a.weights);
  cx.ldw = a.ldw;
  if (a.wdtype != a.dtype) {  // f16 / bf16 with float32 coordinates
    cx.wconv.resize((size_t)(a.m * a.channels));
    const int64_t es = wsize(a.wdtype);
#pragma omp parallel for num_threads(nt) schedule(static) if (a.m * a.channels > 65536)
    for (int64_t i = 0; i < a.m; ++i)
      row_to_f32(a.wdtype, static_cast<const char*>(a.weights) + i * a.ldw * es, a.channels,
                 cx.wconv.data() + i * a.channels);
    cx.wts = reinterpret_cast<const T*>(cx.wconv.data());
    cx.ldw = a.channels;
  }
  if (a.omegas && sizeof(T) == 4) {
    const float* om = static_cast<const float*>(a.omegas);
    const int64_t cp = (a.channels + VL - 1) / VL * VL;
    cx.ompad.assign((size_t)cp, 0.f);
    float mx = 0.f;
    for (int64_t j = 0; j < a.channels; ++j) {
      cx.ompad[j] = om[j];
      const float v = std::fabs(om[j]);
      if (!(v <= mx)) mx = v;  // NaN counts as large
    }
    cx.exact = !(mx <= 131072.f);  // |t| <= 2^17 (phih <= 1 up to rounding)
  }
}

template <typename T>
void features_fwd_t(const RbfArgs& a, void* out, int64_t ldo, int nt) {
  FeatCtx<T> cx;
  prepare<T>(a, cx, nt);
  const int64_t C = a.channels;
  const int64_t es = wsize(a.wdtype);
  ChanF ch{C, C / VL, cx.ompad.empty() ? nullptr : cx.ompad.data(), cx.exact};
#pragma omp parallel num_threads(nt)
  {
    std::vector<T> orow((size_t)C + VL);
    T phi[32], phih[32], den;
    T ph[32];
    const T* wr[32];
#pragma omp for schedule(dynamic, 64)
    for (int64_t nq = 0; nq < a.n; ++nq) {
      if (nq + kPf < a.n) {
        prefetch_rows(a.idx + (nq + kPf) * a.k, a.k, cx.wts, cx.ldw * (int64_t)sizeof(T), C * (int64_t)sizeof(T),
                      false);
        prefetch_geom<T>(a, a.idx + (nq + kPf) * a.k);
      }
      char* orow_dst = static_cast<char*>(out) + nq * ldo * es;
      if (!query_phi<T>(a, nq, phi, phih, &den)) {
        for (int64_t j = 0; j < C; ++j) orow[j] = std::numeric_limits<T>::quiet_NaN();
      } else {
        int nv = 0;
        const int64_t* ir = a.idx + nq * a.k;
        for (int s = 0; s < a.k; ++s)
          if (ir[s] >= 0) {
            ph[nv] = phih[s];
            wr[nv++] = cx.wts + ir[s] * cx.ldw;
          }
        if constexpr (sizeof(T) == 4)
          fwd_row_f(ch, nv, ph, wr, orow.data());
        else
          fwd_row_d(C, static_cast<const double*>(a.omegas), nv, ph, wr, orow.data());
      }
      if constexpr (sizeof(T) == 4)
        row_from_f32(a.wdtype, orow.data(), C, orow_dst);
      else
        std::memcpy(orow_dst, orow.data(), sizeof(T) * C);
    }
  }
}

// ---- backward --------------------------------------------------------------------------------------
// dweights alone (NeuRBF trains only the features): no cosines, no dL/dphi.  Each thread walks a fixed,
// contiguous range of queries (static partition) and scatter-adds g[n, :] * sin(omega phih) into its own
// M x C accumulator (thread 0 into dweights itself), then the rows are reduced in thread order: the same
// sines as the forward and no transpose.  Deterministic for a given thread count; the extra memory is
// (threads - 1) * M * C * sizeof(T) bytes, so the caller takes this path only while that stays within
// kPrivBytes and the reduction (threads * M * C adds) is small next to the N * k * C sines.
constexpr int64_t kPrivBytes = int64_t(512) << 20;

template <typename T>
void dweights_private_t(const RbfArgs& a, const ChanF& ch, const void* grad_out, int64_t ldg,
                        T* dweights, int nt) {
  const int64_t C = a.channels, M = a.m, MC = a.m * a.channels;
  const int k = a.k;
  const T* om = static_cast<const T*>(a.omegas);
  const bool conv_g = a.wdtype != a.dtype;
  const int64_t es = wsize(a.wdtype);
  std::vector<T> priv((size_t)((nt - 1) * MC));
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), tn = omp_get_num_threads();
    T* acc = t == 0 ? dweights : priv.data() + (t - 1) * MC;  // dweights is zeroed by the caller
    if (t > 0) std::memset(acc, 0, sizeof(T) * MC);
    std::vector<float> grow(conv_g ? (size_t)C : 0);
    T phi[32], phih[32], den;
    const int64_t q0 = a.n * t / tn, q1 = a.n * (t + 1) / tn;
    for (int64_t nq = q0; nq < q1; ++nq) {
      if (nq + kPf < q1) {
        prefetch_rows(a.idx + (nq + kPf) * k, k, acc, C * (int64_t)sizeof(T), C * (int64_t)sizeof(T), true);
        prefetch_geom<T>(a, a.idx + (nq + kPf) * k);
      }
      if (!query_phi<T>(a, nq, phi, phih, &den)) continue;  // NaN output: contributes nothing
      const T* g;
      if (conv_g) {
        row_to_f32(a.wdtype, static_cast<const char*>(grad_out) + nq * ldg * es, C, grow.data());
        g = reinterpret_cast<const T*>(grow.data());
      } else {
        g = reinterpret_cast<const T*>(static_cast<const char*>(grad_out) + nq * ldg * es);
      }
      const int64_t* ir = a.idx + nq * k;
      for (int s = 0; s < k; ++s) {
        if (ir[s] < 0) continue;
        T* dw = acc + ir[s] * C;
        const T ph = phih[s];
        if constexpr (sizeof(T) == 4) {
          const float* gf = reinterpret_cast<const float*>(g);
          float* dwf = reinterpret_cast<float*>(dw);
          const vf pv = vsplat(ph);
          int64_t c0 = 0;
          for (; c0 + VL <= C; c0 += VL) {
            const vf v = ch.om ? (ch.exact ? vsin_exact(vload(ch.om + c0) * pv) : vsin(vload(ch.om + c0) * pv)) : pv;
            vstore(dwf + c0, vfma(vload(gf + c0), v, vload(dwf + c0)));
          }
          if (c0 < C) {
            const vf v = ch.om ? (ch.exact ? vsin_exact(vload(ch.om + c0) * pv) : vsin(vload(ch.om + c0) * pv)) : pv;
            const vf r = vfma(wload(gf, c0, C), v, wload(dwf, c0, C));
            for (int64_t j = c0; j < C; ++j) dwf[j] = r[j - c0];
          }
        } else {
          if (om)
            for (int64_t j = 0; j < C; ++j) dw[j] += g[j] * std::sin(om[j] * ph);
          else
            for (int64_t j = 0; j < C; ++j) dw[j] += g[j] * ph;
        }
      }
    }
#pragma omp barrier
    if (tn > 1) {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < M; ++i) {
        T* dst = dweights + i * C;
        for (int u = 1; u < tn; ++u) {
          const T* src = priv.data() + (u - 1) * MC + i * C;
          for (int64_t j = 0; j < C; ++j) dst[j] += src[j];
        }
      }
    }
  }
}

template <typename T>
void features_bwd_t(const RbfArgs& a, const void* grad_out, int64_t ldg, T* dx, T* dcenters, T* dshapes,
                    T* dweights, T* domegas, int nt) {
  const int dim = a.dim, k = a.k;
  const int64_t C = a.channels, M = a.m;
  const int sw = a.shape_full ? dim * dim : dim;
  const T* om = static_cast<const T*>(a.omegas);
  if (!om) domegas = nullptr;
  if (dx) std::memset(dx, 0, sizeof(T) * a.n * dim);
  if (dcenters) std::memset(dcenters, 0, sizeof(T) * M * dim);
  if (dshapes) std::memset(dshapes, 0, sizeof(T) * M * sw);
  if (dweights) std::memset(dweights, 0, sizeof(T) * M * C);
  if (domegas) std::memset(domegas, 0, sizeof(T) * C);
  if (a.n == 0 || C == 0) return;  // out is empty (or 0): every gradient is 0
  if (!dx && !dcenters && !dshapes && !dweights && !domegas) return;
  FeatCtx<T> cx;
  prepare<T>(a, cx, nt);
  ChanF ch{C, C / VL, cx.ompad.empty() ? nullptr : cx.ompad.data(), cx.exact};
  // dweights through per-thread accumulators whenever they fit, whatever else is asked (so dweights has the
  // same bits alone or with the other gradients); else it comes from the CSR pass below.
  if (dweights && ((int64_t)nt - 1) * M * C <= kPrivBytes / (int64_t)sizeof(T) && (int64_t)nt * M <= a.n * k) {
    dweights_private_t<T>(a, ch, grad_out, ldg, dweights, nt);
    dweights = nullptr;
    if (!dx && !dcenters && !dshapes && !domegas) return;
  }
  // dL/dphih (the cosines) only when a gradient other than dweights needs it
  const bool need_a = dx || dcenters || dshapes || domegas;
  const T* X = static_cast<const T*>(a.x);
  const T* Cn = static_cast<const T*>(a.centers);
  const T* Sh = static_cast<const T*>(a.shapes);
  const bool need_rbf = dcenters || dshapes || dweights;
  const bool conv_g = a.wdtype != a.dtype;
  const int64_t es = wsize(a.wdtype);
  const int64_t nchunk = std::min<int64_t>(a.n, kChunk);
  std::vector<T> phs, sds;       // per (query, slot) of the chunk: phih and dL/dphi
  std::vector<float> gconv;      // the chunk's grad_out as float32 (half weights)
  std::vector<int64_t> cnt;      // CSR of the chunk's entries by RBF
  std::vector<int32_t> ent;
  if (need_rbf) {
    phs.resize((size_t)(nchunk * k));
    sds.resize((size_t)(nchunk * k));
    cnt.resize((size_t)M + 1);
    ent.resize((size_t)(nchunk * k));
  }
  if (conv_g) gconv.resize((size_t)(nchunk * C));
  const int64_t nblk_max = (nchunk + kBlock - 1) / kBlock;
  std::vector<double> dom_part;
  std::vector<double> dom_acc;
  if (domegas) {
    dom_part.resize((size_t)(nblk_max * C));
    dom_acc.assign((size_t)C, 0.0);
  }
  for (int64_t n0 = 0; n0 < a.n; n0 += nchunk) {
    const int64_t nc = std::min(nchunk, a.n - n0);
    const int64_t nblk = (nc + kBlock - 1) / kBlock;
    auto grow = [&](int64_t nq) -> const T* {  // nq global
      if (conv_g) return reinterpret_cast<const T*>(gconv.data() + (nq - n0) * C);
      return reinterpret_cast<const T*>(static_cast<const char*>(grad_out) + nq * ldg * es);
    };
    // pass 1 over the chunk's queries, in blocks of kBlock (domegas partial per block)
#pragma omp parallel num_threads(nt)
    {
      std::vector<T> domrow(domegas ? (size_t)C + VL : 0);
      T phi[32], phih[32], den, ph[32], av[32];
      const T* wr[32];
      int sl[32];
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < nblk; ++b) {
        if (domegas) std::fill(domrow.begin(), domrow.end(), T(0));
        const int64_t q0 = n0 + b * kBlock, q1 = std::min(n0 + nc, q0 + kBlock);
        if (conv_g)
          for (int64_t nq = q0; nq < q1; ++nq)
            row_to_f32(a.wdtype, static_cast<const char*>(grad_out) + nq * ldg * es, C, gconv.data() + (nq - n0) * C);
        for (int64_t nq = q0; nq < q1; ++nq) {
          const int64_t* ir = a.idx + nq * k;
          T* phr = need_rbf ? phs.data() + (nq - n0) * k : nullptr;
          T* sdr = need_rbf ? sds.data() + (nq - n0) * k : nullptr;
          if (!query_phi<T>(a, nq, phi, phih, &den)) {
            // a non-finite query: its output is NaN whatever the inputs, so it contributes nothing
            if (dx)
              for (int d = 0; d < dim; ++d) dx[nq * dim + d] = std::numeric_limits<T>::quiet_NaN();
            if (need_rbf)
              for (int s = 0; s < k; ++s) phr[s] = sdr[s] = 0;
            continue;
          }
          if (!need_a) {  // dweights alone: pass 2 needs only phih
            if (need_rbf)
              for (int s = 0; s < k; ++s) {
                phr[s] = ir[s] >= 0 ? phih[s] : T(0);
                sdr[s] = 0;
              }
            continue;
          }
          int nv = 0;
          for (int s = 0; s < k; ++s)
            if (ir[s] >= 0) {
              sl[nv] = s;
              ph[nv] = phih[s];
              wr[nv++] = cx.wts + ir[s] * cx.ldw;
            }
          const T* g = grow(nq);
          if constexpr (sizeof(T) == 4) {
            bwd_row_f(ch, nv, ph, wr, g, av, domegas ? domrow.data() : nullptr);
          } else {
            for (int v = 0; v < nv; ++v) {
              T acc = 0;
              const T* w = wr[v];
              if (om) {
                for (int64_t j = 0; j < C; ++j) {
                  const T t = om[j] * ph[v];
                  const T gwc = g[j] * w[j] * std::cos(t);
                  acc += gwc * om[j];
                  if (domegas) domrow[j] += gwc * ph[v];
                }
              } else {
                for (int64_t j = 0; j < C; ++j) acc += g[j] * w[j];
              }
              av[v] = acc;
            }
          }
          // dL/dphi per slot from dL/dphih
          T corr = 0;
          if (a.normalize == KK_RBF_NORM_FULL)
            for (int v = 0; v < nv; ++v) corr += av[v] * ph[v];
          T sd[32];
          for (int v = 0; v < nv; ++v) {
            sd[v] = a.normalize == KK_RBF_NORM_NONE ? av[v]
                    : a.normalize == KK_RBF_NORM_DETACHED ? av[v] / den
                                                           : (av[v] - corr) / den;
          }
          if (need_rbf) {
            for (int s = 0; s < k; ++s) phr[s] = sdr[s] = 0;
            for (int v = 0; v < nv; ++v) {
              phr[sl[v]] = ph[v];
              sdr[sl[v]] = sd[v];
            }
          }
          if (dx) {
            T go[3] = {0, 0, 0};
            const T* xr = X + nq * a.ldx;
            for (int v = 0; v < nv; ++v) {
              const int64_t i = ir[sl[v]];
              T o[3];
              for (int d = 0; d < dim; ++d) o[d] = xr[d] - Cn[i * dim + d];
              phi_grad<T>(a.kernel, a.shape_full, dim, o, Sh + i * sw, phi[sl[v]], sd[v], go, nullptr);
            }
            for (int d = 0; d < dim; ++d) dx[nq * dim + d] = go[d];
          }
        }
        if (domegas)
          for (int64_t j = 0; j < C; ++j) dom_part[b * C + j] = (double)domrow[j];
      }
    }
    if (domegas)
      for (int64_t b = 0; b < nblk; ++b)
        for (int64_t j = 0; j < C; ++j) dom_acc[j] += dom_part[b * C + j];
    if (!need_rbf) continue;
    // CSR of the chunk's valid, finite entries by RBF (stable: entries of an RBF in (query, slot) order)
    std::fill(cnt.begin(), cnt.end(), 0);
    const int64_t* ic = a.idx + n0 * k;
    for (int64_t e = 0; e < nc * k; ++e)
      if (ic[e] >= 0) ++cnt[ic[e] + 1];
    for (int64_t i = 0; i < M; ++i) cnt[i + 1] += cnt[i];
    {
      std::vector<int64_t> fill(cnt.begin(), cnt.end() - 1);
      for (int64_t e = 0; e < nc * k; ++e)
        if (ic[e] >= 0) ent[fill[ic[e]]++] = (int32_t)e;
    }
    // pass 2 over RBFs
#pragma omp parallel num_threads(nt)
    {
      std::vector<const T*> gr;
      std::vector<T> pe;
      std::vector<float> dwf(dweights && sizeof(T) == 4 ? (size_t)C + VL : 0);
#pragma omp for schedule(dynamic, 16)
      for (int64_t i = 0; i < M; ++i) {
        const int64_t e0 = cnt[i], e1 = cnt[i + 1];
        if (e0 == e1) continue;
        if (dweights) {
          gr.resize((size_t)(e1 - e0));
          pe.resize((size_t)(e1 - e0));
          for (int64_t e = e0; e < e1; ++e) {
            const int64_t loc = ent[e];
            gr[e - e0] = grow(n0 + loc / k);
            pe[e - e0] = phs[loc];
          }
          T* dwr = dweights + i * C;
          if constexpr (sizeof(T) == 4) {
            dw_row_f(ch, e1 - e0, reinterpret_cast<const float* const*>(gr.data()),
                     reinterpret_cast<const float*>(pe.data()), dwr);
          } else {
            for (int64_t e = 0; e < e1 - e0; ++e) {
              const T* g = gr[e];
              if (om)
                for (int64_t j = 0; j < C; ++j) dwr[j] += g[j] * std::sin(om[j] * pe[e]);
              else
                for (int64_t j = 0; j < C; ++j) dwr[j] += g[j] * pe[e];
            }
          }
        }
        if (dcenters || dshapes) {
          T gc[3] = {0, 0, 0}, gA[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
          const T* A = Sh + i * sw;
          for (int64_t e = e0; e < e1; ++e) {
            const int64_t loc = ent[e];
            const T s = sds[loc];
            if (s == T(0)) continue;  // includes non-finite queries (stored 0)
            const T* xr = X + (n0 + loc / k) * a.ldx;
            T o[3];
            for (int d = 0; d < dim; ++d) o[d] = xr[d] - Cn[i * dim + d];
            const T ph = phi_of<T>(a.kernel, a.shape_full, dim, o, A);
            phi_grad<T>(a.kernel, a.shape_full, dim, o, A, ph, s, gc, gA);
          }
          if (dcenters)
            for (int d = 0; d < dim; ++d) dcenters[i * dim + d] -= gc[d];
          if (dshapes)
            for (int d = 0; d < sw; ++d) dshapes[i * sw + d] += gA[d];
        }
      }
    }
  }
  if (domegas)
    for (int64_t j = 0; j < C; ++j) domegas[j] = (T)dom_acc[j];
}

}  // namespace

kk_status rbf_grid_build(kk_dtype dtype, int dim, int64_t m, const void* centers, int64_t ldc, void* grid, int nt) {
  if (dtype == KK_FLOAT32)
    grid_build_t<float>(dim, m, static_cast<const float*>(centers), ldc, grid, nt);
  else
    grid_build_t<double>(dim, m, static_cast<const double*>(centers), ldc, grid, nt);
  return KK_OK;
}

kk_status rbf_knn(kk_dtype dtype, int dim, int64_t n, const void* x, int64_t ldx, const void* grid, int k,
                  int64_t* idx, void* dist2, int nt) {
  const GridView g = view_of(grid);
  if (dtype == KK_FLOAT32) {
    if (dim == 2)
      knn_t<float, 2>(n, static_cast<const float*>(x), ldx, g, k, idx, static_cast<float*>(dist2), nt);
    else
      knn_t<float, 3>(n, static_cast<const float*>(x), ldx, g, k, idx, static_cast<float*>(dist2), nt);
  } else {
    if (dim == 2)
      knn_t<double, 2>(n, static_cast<const double*>(x), ldx, g, k, idx, static_cast<double*>(dist2), nt);
    else
      knn_t<double, 3>(n, static_cast<const double*>(x), ldx, g, k, idx, static_cast<double*>(dist2), nt);
  }
  return KK_OK;
}

kk_status rbf_features_fwd(const RbfArgs& a, void* out, int64_t ldo, int nt) {
  if (a.dtype == KK_FLOAT32)
    features_fwd_t<float>(a, out, ldo, nt);
  else
    features_fwd_t<double>(a, out, ldo, nt);
  return KK_OK;
}

kk_status rbf_features_bwd(const RbfArgs& a, const void* grad_out, int64_t ldg, void* dx, void* dcenters,
                           void* dshapes, void* dweights, void* domegas, int nt) {
  if (a.dtype == KK_FLOAT32)
    features_bwd_t<float>(a, grad_out, ldg, static_cast<float*>(dx), static_cast<float*>(dcenters),
                          static_cast<float*>(dshapes), static_cast<float*>(dweights), static_cast<float*>(domegas),
                          nt);
  else
    features_bwd_t<double>(a, grad_out, ldg, static_cast<double*>(dx), static_cast<double*>(dcenters),
                           static_cast<double*>(dshapes), static_cast<double*>(dweights),
                           static_cast<double*>(domegas), nt);
  return KK_OK;
}

}  // namespace KK_ISA_NS
}  // namespace kk
