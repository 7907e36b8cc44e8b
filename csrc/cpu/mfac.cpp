// M-FAC kernels on the CPU (Frantar, Kurtic, Alistarh, NeurIPS 2021; ../shared/papers/mfac.md): the
// passes over the gradient buffer G (r x d, float32 / bfloat16 / float64 storage) of the Woodbury
// form F^-1 x = (1/damp)(x - G^T K^-1 G x), K = m*damp*I + G G^T, and the small float64 m x m algebra
// around them (csrc/include/kernelkit/mfac.h has the math and the layouts).  Everything accumulates in
// float64: buffer elements are widened (bfloat16 by a 16-bit shift), products are exact in float64.
//
//   dots     q[v, b, i] = sum_{j in b} G[i, j] x[v, j]      one pass over G, OpenMP over column chunks
//   combine  out[v, j] = alpha x[v, j] + sum_i c[v, b(j), i] G[i, j]                   one pass
//   diag     out[j] = alpha + beta sum_i Z[i, j]^2                                     one pass
//   static_setup   per block: float64 Gram (SYRK), + m*damp I, Cholesky, Z = L^-1 G_b or L^-1
//   window_update  row/column replacement of kinv by bordering, O(m^2) (fallback: rebuild)
//   window_rebuild Cholesky + L^-1 + L^-T L^-1, O(m^3);  window_coef  c = scale kinv q
//
// Streaming passes (dots / combine / diag): the columns are cut into chunks of kCH = 2048 (also cut at
// block boundaries); a thread takes a chunk and runs all r rows over it, 4 rows per pass.  For dots
// the x chunk is widened once to float64 (16 KB, L1) and meets 4 rows at a time (4 dot products, one
// accumulator vector each); for combine / diag a float64 accumulator row of the chunk stays in L1 while
// 4 rows at a time are added into it.  So G is read from memory exactly once, the vector operands live
// in L1, and the per-element work (widen + FMA) is far below the memory time: the passes run at the
// memory bandwidth.  q of a plain (one-block) dots is reduced from per-group partials in a fixed order
// (64 groups of chunks at most), so results do not depend on the thread count.  The insert of
// kk_mfac_dots writes the new row's chunk just before the chunk's dots read it (same pass).
//
// Dense float64 algebra: a register-blocked SYRK (C += P^T P for P stored K x n row-major, the
// micro-tile of gemm.h: MR rows x 2 vectors, broadcasts from P's row k), a right-looking blocked
// Cholesky (64-wide panels, trailing update by the SYRK), and a forward substitution over column
// strips of 2 vectors with 4 rows per pass.  OpenMP over blocks when a static setup has many, else
// inside the block.
//
// This file is compiled once per ISA (KK_ISA_NS = isa_avx512 / isa_avx2 / isa_base): the width of
// the GCC vector types follows the ISA.  mfac_api.cpp has checked every argument.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

#include "gemm.h"
#include "mfac_impl.h"
#include "status.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KK_MFAC_AVX2 1
#endif

namespace kk {
namespace KK_ISA_NS {
namespace {

constexpr int VB = kVecBytes;  // bytes per vector register (gemm.h)
constexpr int VW = VB / 8;     // float64 lanes
typedef double vd __attribute__((vector_size(VB)));
typedef float vfh __attribute__((vector_size(VB / 2)));       // VW float32
typedef uint32_t vuh __attribute__((vector_size(VB / 2)));    // VW uint32
typedef uint16_t vuq __attribute__((vector_size(VB / 4)));    // VW uint16 (bfloat16 bits)

constexpr int64_t kCH = 2048;        // columns per streaming chunk
constexpr int64_t kSerial = 1 << 16; // below this many buffer elements: one thread

// ---- element access --------------------------------------------------------------------------------
inline double to_d(float v) { return v; }
inline double to_d(double v) { return v; }
inline double to_d(uint16_t v) {
  const uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// float -> bfloat16 bits, round to nearest even, NaN kept NaN (quieted).
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
inline void put(float* p, double v) { *p = float(v); }
inline void put(double* p, double v) { *p = v; }
inline void put_elem(float* g, float x) { *g = x; }
inline void put_elem(double* g, double x) { *g = x; }
inline void put_elem(uint16_t* g, float x) { *g = to_bf16(x); }

inline vd vload(const double* p) {
  vd v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vd vload(const float* p) {
  vfh f;
  std::memcpy(&f, p, sizeof f);
  return __builtin_convertvector(f, vd);
}
inline vd vload(const uint16_t* p) {  // bfloat16: zero-extend to 32 bits, shift into the high half
  vuq h;
  std::memcpy(&h, p, sizeof h);
  const vuh w = __builtin_convertvector(h, vuh) << 16;
  vfh f;
  std::memcpy(&f, &w, sizeof f);
  return __builtin_convertvector(f, vd);
}
inline void vstore(double* p, vd v) { std::memcpy(p, &v, sizeof v); }
inline vd vbcast(double s) { return vd{} + s; }
inline double hsum(vd v) {
  double s = 0;
  for (int i = 0; i < VW; ++i) s += v[i];
  return s;
}

inline int64_t nblocks_of(int64_t d, int64_t block) { return d == 0 ? 0 : (d - 1) / block + 1; }
inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// The vector dtype of a buffer element type.
template <typename T> struct Vec { typedef float type; };
template <> struct Vec<double> { typedef double type; };

#ifdef KK_MFAC_AVX2
// ---- AVX2 streaming kernels for float32 / bfloat16 buffers --------------------------------------------
// Measured on this repo's 2-core Zen 3 VM (d = 1e6, m = 256): the GCC vector-extension loops ran the
// bfloat16 buffer at the float32 speed (compute-bound), and 8 KB row segments per chunk left the
// hardware prefetchers cold.  These loops widen 8 elements at a time (bfloat16: zero-extend + shift)
// into float64 FMAs and software-prefetch kPF elements ahead in every row they stream.
constexpr int64_t kPF = 2048;  // elements prefetched ahead (8 KB of float32)

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline __m256d lo4(__m256 v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
inline __m256d hi4(__m256 v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }
inline double hsum4(__m256d v) {
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
inline float elem_f(const float* p) { return *p; }
inline float elem_f(const uint16_t* p) {
  const uint32_t w = uint32_t(*p) << 16;
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}

// o0[ii] += sum_j g[ii*ld + j] x0[j] (and o1 with x1 when X1) for ii < R, j < n: R rows streamed
// together over a long range (x in float32, widened per 8 elements; float64 accumulation).
template <int R, bool X1, typename T>
void dot_long(const T* g, int64_t ld, const float* x0, const float* x1, int64_t n, double* o0, double* o1) {
  __m256d a[R][2], b[R][2];
  for (int i = 0; i < R; ++i) a[i][0] = a[i][1] = b[i][0] = b[i][1] = _mm256_setzero_pd();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    if ((j & 15) == 0)
      for (int i = 0; i < R; ++i) _mm_prefetch((const char*)(g + i * ld + j + kPF), _MM_HINT_T0);
    const __m256 xv = _mm256_loadu_ps(x0 + j);
    const __m256d xl = lo4(xv), xh = hi4(xv);
    __m256d yl = xl, yh = xh;
    if (X1) {
      const __m256 yv = _mm256_loadu_ps(x1 + j);
      yl = lo4(yv);
      yh = hi4(yv);
    }
    for (int i = 0; i < R; ++i) {
      const __m256 gv = load8(g + i * ld + j);
      const __m256d gl = lo4(gv), gh = hi4(gv);
      a[i][0] = _mm256_fmadd_pd(gl, xl, a[i][0]);
      a[i][1] = _mm256_fmadd_pd(gh, xh, a[i][1]);
      if (X1) {
        b[i][0] = _mm256_fmadd_pd(gl, yl, b[i][0]);
        b[i][1] = _mm256_fmadd_pd(gh, yh, b[i][1]);
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    double s = hsum4(_mm256_add_pd(a[i][0], a[i][1])), t = X1 ? hsum4(_mm256_add_pd(b[i][0], b[i][1])) : 0.0;
    for (int64_t jj = j; jj < n; ++jj) {
      const double e = elem_f(g + i * ld + jj);
      s += e * double(x0[jj]);
      if (X1) t += e * double(x1[jj]);
    }
    o0[i] += s;
    if (X1) o1[i] += t;
  }
}

// acc[j] += sum_ii cc[ii] g[ii*ld + j] (4 rows), prefetching the next 4 rows' segment when pf.
template <typename T>
inline void axpy4_avx2(const T* g, int64_t ld, const double* cc, double* acc, int64_t n, bool pf) {
  const __m256d c0 = _mm256_set1_pd(cc[0]), c1 = _mm256_set1_pd(cc[1]), c2 = _mm256_set1_pd(cc[2]),
                c3 = _mm256_set1_pd(cc[3]);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    if (pf && (j & 15) == 0)
      for (int i = 4; i < 8; ++i) _mm_prefetch((const char*)(g + i * ld + j), _MM_HINT_T0);
    __m256d s0 = _mm256_loadu_pd(acc + j), s1 = _mm256_loadu_pd(acc + j + 4);
    __m256 v = load8(g + j);
    s0 = _mm256_fmadd_pd(lo4(v), c0, s0);
    s1 = _mm256_fmadd_pd(hi4(v), c0, s1);
    v = load8(g + ld + j);
    s0 = _mm256_fmadd_pd(lo4(v), c1, s0);
    s1 = _mm256_fmadd_pd(hi4(v), c1, s1);
    v = load8(g + 2 * ld + j);
    s0 = _mm256_fmadd_pd(lo4(v), c2, s0);
    s1 = _mm256_fmadd_pd(hi4(v), c2, s1);
    v = load8(g + 3 * ld + j);
    s0 = _mm256_fmadd_pd(lo4(v), c3, s0);
    s1 = _mm256_fmadd_pd(hi4(v), c3, s1);
    _mm256_storeu_pd(acc + j, s0);
    _mm256_storeu_pd(acc + j + 4, s1);
  }
  for (; j < n; ++j) {
    double s = acc[j];
    for (int ii = 0; ii < 4; ++ii) s += cc[ii] * double(elem_f(g + ii * ld + j));
    acc[j] = s;
  }
}
#endif

// ---- dots ------------------------------------------------------------------------------------------
// out[ii] = sum_{j < n} g[ii*ldg + j] * x[j] for ii < R (x float64).
template <int R, typename T>
inline void dot_rows(const T* __restrict__ g, int64_t ldg, const double* __restrict__ x, int64_t n, double* out) {
  vd acc[R];
  for (int ii = 0; ii < R; ++ii) acc[ii] = vd{};
  int64_t j = 0;
  for (; j + VW <= n; j += VW) {
    const vd xv = vload(x + j);
#pragma GCC unroll 8
    for (int ii = 0; ii < R; ++ii) acc[ii] += vload(g + ii * ldg + j) * xv;
  }
  for (int ii = 0; ii < R; ++ii) {
    double s = hsum(acc[ii]);
    for (int64_t jj = j; jj < n; ++jj) s += to_d(g[ii * ldg + jj]) * x[jj];
    out[ii] = s;
  }
}

template <typename T>
struct DotsArgs {
  int64_t r, d, block;
  T* G;
  int64_t ldg, nvec;
  const typename Vec<T>::type* x;
  int64_t ldx, insert_row;
  bool qr_vec;  // a second vector: the inserted row as stored (bfloat16 qr)
};

// Adds the dot products over columns [lo, hi) (inside one block) to out[v*vstride + i] (v < nvec,
// plus the rounded-row vector at out2 when qr_vec), chunk by chunk; writes the inserted row first.
template <typename T>
void range_dots(const DotsArgs<T>& a, int64_t lo, int64_t hi, double* out, int64_t vstride, double* out2,
                std::vector<double>& xbuf) {
  constexpr int VG = 4;  // vectors sharing one pass of 4 rows
  const int64_t nv = a.nvec + (a.qr_vec ? 1 : 0);
  xbuf.resize(size_t(VG * kCH));
  double tmp[4];
  for (int64_t c0 = lo; c0 < hi; c0 += kCH) {
    const int64_t n = std::min(kCH, hi - c0);
    if (a.insert_row >= 0) {
      T* g = a.G + a.insert_row * a.ldg + c0;
      for (int64_t j = 0; j < n; ++j) put_elem(g + j, a.x[c0 + j]);
    }
    for (int64_t v0 = 0; v0 < nv; v0 += VG) {
      const int nvg = int(std::min<int64_t>(VG, nv - v0));
      const double* xs[VG];
      double* os[VG];
      for (int k = 0; k < nvg; ++k) {
        const int64_t v = v0 + k;
        double* xb = xbuf.data() + k * kCH;
        if (v < a.nvec) {
          const auto* xv = a.x + v * a.ldx + c0;
          if constexpr (std::is_same<T, double>::value) {
            xs[k] = xv;
          } else {
            for (int64_t j = 0; j < n; ++j) xb[j] = xv[j];
            xs[k] = xb;
          }
          os[k] = out + v * vstride;
        } else {  // the stored (rounded) new row
          const T* g = a.G + a.insert_row * a.ldg + c0;
          for (int64_t j = 0; j < n; ++j) xb[j] = to_d(g[j]);
          xs[k] = xb;
          os[k] = out2;
        }
      }
      const T* G = a.G + c0;
      int64_t i = 0;
      for (; i + 4 <= a.r; i += 4)
        for (int k = 0; k < nvg; ++k) {
          dot_rows<4>(G + i * a.ldg, a.ldg, xs[k], n, tmp);
          for (int ii = 0; ii < 4; ++ii) os[k][i + ii] += tmp[ii];
        }
      for (; i < a.r; ++i)
        for (int k = 0; k < nvg; ++k) {
          dot_rows<1>(G + i * a.ldg, a.ldg, xs[k], n, tmp);
          os[k][i] += tmp[0];
        }
    }
  }
}

#ifdef KK_MFAC_AVX2
// One vector (plus the rounded row for a bfloat16 qr) over columns [lo, hi) of one block: rows 4 at a
// time, each streamed over the whole range (long prefetch-friendly streams; x from L2/L3).
template <typename T>
void range_dots_long(const DotsArgs<T>& a, int64_t lo, int64_t hi, double* p, double* pr, std::vector<float>& xr) {
  const int64_t n = hi - lo;
  if (a.insert_row >= 0) {
    T* g = a.G + a.insert_row * a.ldg + lo;
    for (int64_t j = 0; j < n; ++j) put_elem(g + j, a.x[lo + j]);
  }
  const float* x0 = a.x + lo;
  const T* G = a.G + lo;
  if (a.qr_vec) {
    xr.resize(size_t(n));
    const T* g = a.G + a.insert_row * a.ldg + lo;
    for (int64_t j = 0; j < n; ++j) xr[j] = elem_f(g + j);
    // two vectors: 2 rows at a time (2 x 2 x 2 accumulators; 4 rows would spill the 16 ymm registers)
    int64_t i = 0;
    for (; i + 2 <= a.r; i += 2) dot_long<2, true>(G + i * a.ldg, a.ldg, x0, xr.data(), n, p + i, pr + i);
    for (; i < a.r; ++i) dot_long<1, true>(G + i * a.ldg, a.ldg, x0, xr.data(), n, p + i, pr + i);
  } else {
    int64_t i = 0;
    for (; i + 4 <= a.r; i += 4) dot_long<4, false>(G + i * a.ldg, a.ldg, x0, nullptr, n, p + i, nullptr);
    for (; i < a.r; ++i) dot_long<1, false>(G + i * a.ldg, a.ldg, x0, nullptr, n, p + i, nullptr);
  }
}
#endif

template <typename T>
void dots_impl(const DotsArgs<T>& a, double* q, double* qr, int nt) {
  const int64_t r = a.r, d = a.d, block = a.block;
  const int64_t nb = nblocks_of(d, block);
  const int64_t nv = a.nvec;
  const bool bf_qr = a.qr_vec;
  if (r * d < kSerial) nt = 1;
  const int64_t vstride = nb * r;  // q[v, b, i]
  if (block <= kCH || nb > 1) {
    // Every block's q in one thread, in column order: whole blocks grouped into ~kCH-column items.
    const int64_t per = block <= kCH ? std::max<int64_t>(1, kCH / block) : 1;
    const int64_t nitems = (nb + per - 1) / per;
    std::atomic<bool> oom{false};
#pragma omp parallel num_threads(nt) if (nt > 1 && nitems > 1)
    {
      try {
        std::vector<double> xbuf;
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < nitems; ++it) {
          for (int64_t b = it * per; b < std::min(nb, (it + 1) * per); ++b) {
            const int64_t lo = b * block, hi = std::min(d, lo + block);
            for (int64_t v = 0; v < nv; ++v) std::fill(q + v * vstride + b * r, q + v * vstride + b * r + r, 0.0);
            if (bf_qr) std::fill(qr + b * r, qr + b * r + r, 0.0);
            range_dots(a, lo, hi, q + b * r, vstride, bf_qr ? qr + b * r : nullptr, xbuf);
          }
        }
      } catch (const std::bad_alloc&) {
        oom = true;
      }
    }
    if (oom) throw std::bad_alloc();
  } else {
    // One block wider than a chunk: NG groups of chunks, each summed into its own partial, the
    // partials added in group order (independent of the thread count).
    const int64_t nch = (d + kCH - 1) / kCH;
    const int64_t nvv = nv + (bf_qr ? 1 : 0);
#ifdef KK_MFAC_AVX2
    // one vector on a float32 / bfloat16 buffer: 16 long column groups (fixed: the sums do not depend on
    // the thread count up to 16 threads), rows streamed over each
    const bool longpath = nv == 1 && !std::is_same<T, double>::value;
#else
    const bool longpath = false;
#endif
    int64_t ng = longpath ? std::max<int64_t>(16, nt)
                          : std::max<int64_t>(nt, (int64_t(1) << 22) / std::max<int64_t>(1, nvv * r));
    ng = std::min<int64_t>({ng, longpath ? ng : 64, nch});
    std::vector<double> part(size_t(ng * nvv * r), 0.0);
    std::atomic<bool> oom{false};
#pragma omp parallel num_threads(nt) if (nt > 1 && ng > 1)
    {
      try {
        std::vector<double> xbuf;
        std::vector<float> xr;
#pragma omp for schedule(dynamic, 1)
        for (int64_t g = 0; g < ng; ++g) {
          const int64_t lo = (g * nch / ng) * kCH, hi = std::min(d, ((g + 1) * nch / ng) * kCH);
          double* p = part.data() + g * nvv * r;
#ifdef KK_MFAC_AVX2
          if (longpath) {
            if constexpr (!std::is_same<T, double>::value)
              range_dots_long(a, lo, hi, p, bf_qr ? p + nv * r : nullptr, xr);
            continue;
          }
#endif
          (void)xr;
          range_dots(a, lo, hi, p, r, bf_qr ? p + nv * r : nullptr, xbuf);
        }
      } catch (const std::bad_alloc&) {
        oom = true;
      }
    }
    if (oom) throw std::bad_alloc();
    for (int64_t v = 0; v < nvv; ++v) {
      double* dst = v < nv ? q + v * r : qr;
      for (int64_t i = 0; i < r; ++i) {
        double s = 0;
        for (int64_t g = 0; g < ng; ++g) s += part[(g * nvv + v) * r + i];
        dst[i] = s;
      }
    }
  }
}

template <typename T>
kk_status dots_typed(int64_t r, int64_t d, int64_t block, void* G, int64_t ldg, int64_t nvec, const void* x,
                     int64_t ldx, int64_t insert_row, double* q, double* qr, int nt) {
  typedef typename Vec<T>::type V;
  DotsArgs<T> a{r, d, block, static_cast<T*>(G), ldg, nvec, static_cast<const V*>(x), ldx, insert_row,
                insert_row >= 0 && qr != nullptr && std::is_same<T, uint16_t>::value};
  if (d == 0 || r == 0 || nvec == 0) return KK_OK;
  dots_impl(a, q, qr, nt);
  if (insert_row >= 0 && qr && !a.qr_vec) std::memcpy(qr, q, size_t(nblocks_of(d, block) * r) * sizeof(double));
  return KK_OK;
}

// ---- combine / diag ----------------------------------------------------------------------------------
// acc[j] += sum_ii cc[ii] * g[ii*ldg + j] for j < n.
template <int R, typename T>
inline void axpy_rows(const T* __restrict__ g, int64_t ldg, const double* cc, double* __restrict__ acc, int64_t n) {
  vd cv[R];
  for (int ii = 0; ii < R; ++ii) cv[ii] = vbcast(cc[ii]);
  int64_t j = 0;
  for (; j + VW <= n; j += VW) {
    vd s = vload(acc + j);
#pragma GCC unroll 8
    for (int ii = 0; ii < R; ++ii) s += cv[ii] * vload(g + ii * ldg + j);
    vstore(acc + j, s);
  }
  for (; j < n; ++j) {
    double s = acc[j];
    for (int ii = 0; ii < R; ++ii) s += cc[ii] * to_d(g[ii * ldg + j]);
    acc[j] = s;
  }
}

// acc[j] += sum_ii g[ii*ldg + j]^2.
template <int R, typename T>
inline void sq_rows(const T* __restrict__ g, int64_t ldg, double* __restrict__ acc, int64_t n) {
  int64_t j = 0;
  for (; j + VW <= n; j += VW) {
    vd s = vload(acc + j);
#pragma GCC unroll 8
    for (int ii = 0; ii < R; ++ii) {
      const vd e = vload(g + ii * ldg + j);
      s += e * e;
    }
    vstore(acc + j, s);
  }
  for (; j < n; ++j) {
    double s = acc[j];
    for (int ii = 0; ii < R; ++ii) {
      const double e = to_d(g[ii * ldg + j]);
      s += e * e;
    }
    acc[j] = s;
  }
}

template <typename T>
kk_status combine_typed(int64_t r, int64_t d, int64_t block, const void* Gv, int64_t ldg, int64_t nvec, double alpha,
                        const void* xv, int64_t ldx, const double* c, void* outv, int64_t ldo, int nt) {
  typedef typename Vec<T>::type V;
  const T* G = static_cast<const T*>(Gv);
  const V* x = static_cast<const V*>(xv);
  V* out = static_cast<V*>(outv);
  if (d == 0 || nvec == 0) return KK_OK;
  const int64_t nb = nblocks_of(d, block);
  const int64_t nch = (d + kCH - 1) / kCH;
  if (r * d * nvec < kSerial) nt = 1;
  constexpr int VG = 4;
  std::atomic<bool> oom{false};
#pragma omp parallel num_threads(nt) if (nt > 1 && nch > 1)
  {
    try {
      std::vector<double> accb(size_t(VG * kCH));
#pragma omp for schedule(static)
      for (int64_t ch = 0; ch < nch; ++ch) {
        const int64_t c0 = ch * kCH, n = std::min(kCH, d - c0);
        for (int64_t v0 = 0; v0 < nvec; v0 += VG) {
          const int nvg = int(std::min<int64_t>(VG, nvec - v0));
          std::fill(accb.begin(), accb.begin() + nvg * kCH, 0.0);
          // sub-ranges of the chunk inside one block each
          for (int64_t s0 = c0; s0 < c0 + n;) {
            const int64_t b = s0 / block;
            const int64_t s1 = std::min(c0 + n, std::min(d, (b + 1) * block));
            const T* Gs = G + s0;
            int64_t i = 0;
#ifdef KK_MFAC_AVX2
            if constexpr (!std::is_same<T, double>::value) {
              for (; i + 4 <= r; i += 4)
                for (int k = 0; k < nvg; ++k)
                  axpy4_avx2(Gs + i * ldg, ldg, c + ((v0 + k) * nb + b) * r + i, accb.data() + k * kCH + (s0 - c0),
                             s1 - s0, k == nvg - 1 && i + 8 <= r);
            }
#endif
            for (; i + 4 <= r; i += 4)
              for (int k = 0; k < nvg; ++k)
                axpy_rows<4>(Gs + i * ldg, ldg, c + ((v0 + k) * nb + b) * r + i, accb.data() + k * kCH + (s0 - c0),
                             s1 - s0);
            for (; i < r; ++i)
              for (int k = 0; k < nvg; ++k)
                axpy_rows<1>(Gs + i * ldg, ldg, c + ((v0 + k) * nb + b) * r + i, accb.data() + k * kCH + (s0 - c0),
                             s1 - s0);
            s0 = s1;
          }
          for (int k = 0; k < nvg; ++k) {
            const double* acc = accb.data() + k * kCH;
            V* o = out + (v0 + k) * ldo + c0;
            if (x) {
              const V* xx = x + (v0 + k) * ldx + c0;
              for (int64_t j = 0; j < n; ++j) put(o + j, acc[j] + alpha * double(xx[j]));
            } else {
              for (int64_t j = 0; j < n; ++j) put(o + j, acc[j]);
            }
          }
        }
      }
    } catch (const std::bad_alloc&) {
      oom = true;
    }
  }
  if (oom) throw std::bad_alloc();
  return KK_OK;
}

template <typename T>
kk_status diag_typed(int64_t r, int64_t d, const void* Zv, int64_t ldz, double alpha, double beta, void* outv, int nt) {
  typedef typename Vec<T>::type V;
  const T* Z = static_cast<const T*>(Zv);
  V* out = static_cast<V*>(outv);
  const int64_t nch = (d + kCH - 1) / kCH;
  if (r * d < kSerial) nt = 1;
  std::atomic<bool> oom{false};
#pragma omp parallel num_threads(nt) if (nt > 1 && nch > 1)
  {
    try {
      std::vector<double> acc(static_cast<size_t>(kCH));
#pragma omp for schedule(static)
      for (int64_t ch = 0; ch < nch; ++ch) {
        const int64_t c0 = ch * kCH, n = std::min(kCH, d - c0);
        std::fill(acc.begin(), acc.begin() + n, 0.0);
        int64_t i = 0;
        for (; i + 4 <= r; i += 4) sq_rows<4>(Z + i * ldz + c0, ldz, acc.data(), n);
        for (; i < r; ++i) sq_rows<1>(Z + i * ldz + c0, ldz, acc.data(), n);
        for (int64_t j = 0; j < n; ++j) put(out + c0 + j, alpha + beta * acc[j]);
      }
    } catch (const std::bad_alloc&) {
      oom = true;
    }
  }
  if (oom) throw std::bad_alloc();
  return KK_OK;
}

// ---- dense float64 algebra ---------------------------------------------------------------------------
constexpr int SMR = Tile<double, 2>::MR;  // SYRK micro-tile rows
constexpr int SNR = Tile<double, 2>::NR;  // SYRK micro-tile columns (2 vectors)
constexpr int64_t kPad = 48;              // padded row length of P: a multiple of SMR and SNR on every ISA
static_assert(kPad % SMR == 0 && kPad % SNR == 0, "kPad must be a multiple of the SYRK tile");

// C[i, j] += sign * sum_{k in [kb, K)} P[k, i] P[k, j] for i in [i0, i0+SMR), j in [j0, j0+SNR), i < n,
// j <= i.  P (K x >= j0+SNR, ld ldp, zero padded past n).
inline void syrk_tile(const double* __restrict__ P, int64_t ldp, int64_t kb, int64_t K, int64_t i0, int64_t j0,
                      int64_t n, double* C, int64_t ldc, double sign) {
  vd acc[SMR][2];
  for (int i = 0; i < SMR; ++i) acc[i][0] = acc[i][1] = vd{};
  for (int64_t k = kb; k < K; ++k) {
    const double* p = P + k * ldp;
    const vd b0 = vload(p + j0), b1 = vload(p + j0 + VW);
#pragma GCC unroll 32
    for (int i = 0; i < SMR; ++i) {
      const vd a = vbcast(p[i0 + i]);
      acc[i][0] += a * b0;
      acc[i][1] += a * b1;
    }
  }
  for (int i = 0; i < SMR; ++i) {
    const int64_t gi = i0 + i;
    if (gi >= n) break;
    double t[SNR];
    std::memcpy(t, &acc[i][0], sizeof t);
    double* crow = C + gi * ldc;
    const int64_t jend = std::min<int64_t>(SNR, gi - j0 + 1);
    for (int64_t j = 0; j < jend; ++j) crow[j0 + j] += sign * t[j];
  }
}

// The lower triangle of C (n x n, ld ldc) += sign * P^T P, P (K x n, ld ldp >= round_up(n, kPad), zero
// padded).  tri_k: P is lower triangular (P[k, i] = 0 for k < i), so tile row i0 starts at k = i0.
void syrk_lower(int64_t n, int64_t K, const double* P, int64_t ldp, double* C, int64_t ldc, double sign, bool tri_k,
                int nt) {
  const int64_t ntr = (n + SMR - 1) / SMR;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (nt > 1 && ntr > 1)
  for (int64_t t = 0; t < ntr; ++t) {
    const int64_t i0 = (ntr - 1 - t) * SMR;  // longest rows first
    for (int64_t j0 = 0; j0 <= std::min(n - 1, i0 + SMR - 1); j0 += SNR)
      syrk_tile(P, ldp, tri_k ? std::min(i0, K) : 0, K, i0, j0, n, C, ldc, sign);
  }
}

inline double dot(const double* __restrict__ a, const double* __restrict__ b, int64_t n) {
  vd s0 = vd{}, s1 = vd{};
  int64_t j = 0;
  for (; j + 2 * VW <= n; j += 2 * VW) {
    s0 += vload(a + j) * vload(b + j);
    s1 += vload(a + j + VW) * vload(b + j + VW);
  }
  double s = hsum(s0 + s1);
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// In-place Cholesky of the lower triangle of A (n x n, ld lda): A = L L^T.  False if a pivot is not
// positive and finite (not numerically positive definite, or a non-finite entry).  Right-looking with
// kNB-wide panels: the diagonal block and the panel below it by dot products, the trailing matrix by
// the SYRK (work: a packed copy of the panel, transposed).
bool cholesky(double* A, int64_t n, int64_t lda, int nt, std::vector<double>& work) {
  constexpr int64_t kNB = 64;
  if (n * n * n < (int64_t(1) << 21)) nt = 1;
  for (int64_t k0 = 0; k0 < n; k0 += kNB) {
    const int64_t kb = std::min(kNB, n - k0);
    for (int64_t i = k0; i < k0 + kb; ++i) {
      double* Li = A + i * lda;
      for (int64_t j = k0; j <= i; ++j) {
        const double* Lj = A + j * lda;
        const double s = Li[j] - dot(Li + k0, Lj + k0, j - k0);
        if (i == j) {
          if (!(s > 0) || !std::isfinite(s)) return false;
          Li[i] = std::sqrt(s);
        } else {
          Li[j] = s / Lj[j];
        }
      }
    }
    const int64_t r0 = k0 + kb, n2 = n - r0;
    if (n2 == 0) break;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && n2 > 64)
    for (int64_t i = r0; i < n; ++i) {
      double* Li = A + i * lda;
      for (int64_t j = k0; j < k0 + kb; ++j) {
        const double* Lj = A + j * lda;
        Li[j] = (Li[j] - dot(Li + k0, Lj + k0, j - k0)) / Lj[j];
      }
    }
    const int64_t ldp = round_up(n2, kPad);
    work.assign(size_t(kb * ldp), 0.0);
    for (int64_t i = 0; i < n2; ++i)
      for (int64_t k = 0; k < kb; ++k) work[k * ldp + i] = A[(r0 + i) * lda + k0 + k];
    syrk_lower(n2, kb, work.data(), ldp, A + r0 * lda + r0, lda, -1.0, false, nt);
  }
  return true;
}

// X = L^-1 X for X (n x SNR, ld ldx): forward substitution, 4 rows per pass.  Rows < start of X are
// zero (and stay zero): they are skipped.
void trsm_strip(const double* L, int64_t ldl, int64_t n, double* X, int64_t ldx, int64_t start) {
  for (int64_t i0 = start; i0 < n; i0 += 4) {
    const int rr = int(std::min<int64_t>(4, n - i0));
    const double* Lr[4];
    for (int ii = 0; ii < 4; ++ii) Lr[ii] = L + (i0 + std::min(ii, rr - 1)) * ldl;
    vd acc[4][2];
    for (int ii = 0; ii < 4; ++ii) {
      const double* xr = X + (i0 + std::min(ii, rr - 1)) * ldx;
      acc[ii][0] = vload(xr);
      acc[ii][1] = vload(xr + VW);
    }
    for (int64_t k = start; k < i0; ++k) {
      const double* xk = X + k * ldx;
      const vd x0 = vload(xk), x1 = vload(xk + VW);
#pragma GCC unroll 4
      for (int ii = 0; ii < 4; ++ii) {
        const vd l = vbcast(Lr[ii][k]);
        acc[ii][0] -= l * x0;
        acc[ii][1] -= l * x1;
      }
    }
    for (int ii = 0; ii < rr; ++ii) {
      for (int kk = 0; kk < ii; ++kk) {
        const vd l = vbcast(Lr[ii][i0 + kk]);
        acc[ii][0] -= l * acc[kk][0];
        acc[ii][1] -= l * acc[kk][1];
      }
      const vd piv = vbcast(Lr[ii][i0 + ii]);
      acc[ii][0] /= piv;
      acc[ii][1] /= piv;
      double* xr = X + (i0 + ii) * ldx;
      vstore(xr, acc[ii][0]);
      vstore(xr + VW, acc[ii][1]);
    }
  }
}

// Linv (n x ldp, ldp >= round_up(n, kPad)) = L^-1, exactly lower triangular (zero above and in the pad).
void tri_inverse(const double* L, int64_t ldl, int64_t n, double* Linv, int64_t ldp, int nt) {
  const int64_t ns = (n + SNR - 1) / SNR;
  if (n * n * n < (int64_t(1) << 21)) nt = 1;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (nt > 1 && ns > 1)
  for (int64_t s = 0; s < ns; ++s) {
    const int64_t c0 = s * SNR;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < SNR; ++j) Linv[i * ldp + c0 + j] = (i == c0 + j) ? 1.0 : 0.0;
    trsm_strip(L, ldl, n, Linv + c0, ldp, c0);
  }
}

std::vector<double>& tls_work() {
  static thread_local std::vector<double> w;
  return w;
}

// kinv = (A)^-1 for A = m*damp*I + the lower triangle of gram, via Cholesky; false if not PD.
bool spd_inverse(int64_t m, double damp, const double* gram, double* kinv, int nt) {
  const int64_t ldp = round_up(m, kPad);
  std::vector<double> A(size_t(m * ldp));
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j <= i; ++j) A[i * ldp + j] = gram[i * m + j];
    A[i * ldp + i] += double(m) * damp;
  }
  if (!cholesky(A.data(), m, ldp, nt, tls_work())) return false;
  std::vector<double> Linv(size_t(m * ldp));
  tri_inverse(A.data(), ldp, m, Linv.data(), ldp, nt);
  // kinv = Linv^T Linv: the lower triangle by the SYRK (P = Linv, lower triangular), then mirrored.
  std::vector<double>& C = A;  // reuse: m x ldp
  std::fill(C.begin(), C.end(), 0.0);
  syrk_lower(m, m, Linv.data(), ldp, C.data(), ldp, 1.0, true, m * m * m < (int64_t(1) << 21) ? 1 : nt);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j <= i; ++j) kinv[i * m + j] = kinv[j * m + i] = C[i * ldp + j];
  return true;
}

kk_status not_pd(const char* what, double damp) {
  return fail(KK_ERR_INVALID_ARGUMENT,
              "mfac: %s is not numerically positive definite (or has a non-finite entry) with damp = %g: "
              "increase damp",
              what, damp);
}

// ---- static setup -----------------------------------------------------------------------------------
template <typename T, typename Z>
struct SetupArgs {
  int64_t m, d, block, r;
  const T* G;
  int64_t ldg;
  double damp;
  Z* Zp;
  int64_t ldz;
};

// One block [lo, lo+w).  False: not positive definite.
template <typename T, typename Z>
bool setup_block(const SetupArgs<T, Z>& a, int64_t lo, int64_t w, int nt) {
  const int64_t m = a.m;
  constexpr int64_t kKC = 128;  // Gram chunk (columns of G_b for W, rows for E)
  if (m <= std::min(a.block, a.d)) {
    // W form: K = G_b G_b^T + m*damp*I (m x m), L L^T = K, Z_b = L^-1 G_b.
    const int64_t ldp = round_up(m, kPad);
    std::vector<double> K(size_t(m * ldp), 0.0), P(size_t(kKC * ldp), 0.0);
    const int nti = (m * m * w < (int64_t(1) << 22)) ? 1 : nt;
#pragma omp parallel num_threads(nti) if (nti > 1)
    {
      for (int64_t k0 = 0; k0 < w; k0 += kKC) {
        const int64_t kc = std::min(kKC, w - k0);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; ++i) {
          const T* g = a.G + i * a.ldg + lo + k0;
          for (int64_t k = 0; k < kc; ++k) P[k * ldp + i] = to_d(g[k]);
        }
        const int64_t ntr = (m + SMR - 1) / SMR;
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < ntr; ++t) {
          const int64_t i0 = (ntr - 1 - t) * SMR;
          for (int64_t j0 = 0; j0 <= std::min(m - 1, i0 + SMR - 1); j0 += SNR)
            syrk_tile(P.data(), ldp, 0, kc, i0, j0, m, K.data(), ldp, 1.0);
        }
      }
    }
    for (int64_t i = 0; i < m; ++i) K[i * ldp + i] += double(m) * a.damp;
    if (!cholesky(K.data(), m, ldp, nti, tls_work())) return false;
    // Z_b = L^-1 G_b over strips of SNR columns (the strip read before it is written: Z may be G).
    const int64_t ns = (w + SNR - 1) / SNR;
#pragma omp parallel num_threads(nti) if (nti > 1 && ns > 1)
    {
      std::vector<double> X(size_t(m * SNR));
#pragma omp for schedule(dynamic, 4)
      for (int64_t s = 0; s < ns; ++s) {
        const int64_t c0 = lo + s * SNR, cw = std::min<int64_t>(SNR, lo + w - c0);
        for (int64_t i = 0; i < m; ++i) {
          const T* g = a.G + i * a.ldg + c0;
          double* xr = X.data() + i * SNR;
          for (int64_t j = 0; j < cw; ++j) xr[j] = to_d(g[j]);
          for (int64_t j = cw; j < SNR; ++j) xr[j] = 0.0;
        }
        trsm_strip(K.data(), ldp, m, X.data(), SNR, 0);
        for (int64_t i = 0; i < m; ++i) {
          Z* z = a.Zp + i * a.ldz + c0;
          const double* xr = X.data() + i * SNR;
          for (int64_t j = 0; j < cw; ++j) put(z + j, xr[j]);
        }
      }
    }
  } else {
    // E form: A = G_b^T G_b + m*damp*I (w x w), L L^T = A, Z_b = L^-1 (rows w..r-1 zero).
    const int64_t ldp = round_up(w, kPad);
    std::vector<double> A(size_t(w * ldp), 0.0), P(size_t(kKC * ldp), 0.0);
    const int nti = (w * w * m < (int64_t(1) << 22)) ? 1 : nt;
    for (int64_t k0 = 0; k0 < m; k0 += kKC) {
      const int64_t kc = std::min(kKC, m - k0);
      for (int64_t k = 0; k < kc; ++k) {
        const T* g = a.G + (k0 + k) * a.ldg + lo;
        double* p = P.data() + k * ldp;
        for (int64_t j = 0; j < w; ++j) p[j] = to_d(g[j]);
      }
      syrk_lower(w, kc, P.data(), ldp, A.data(), ldp, 1.0, false, nti);
    }
    for (int64_t i = 0; i < w; ++i) A[i * ldp + i] += double(m) * a.damp;
    if (!cholesky(A.data(), w, ldp, nti, tls_work())) return false;
    std::vector<double>& Linv = P;
    Linv.assign(size_t(w * ldp), 0.0);
    tri_inverse(A.data(), ldp, w, Linv.data(), ldp, nti);
    for (int64_t i = 0; i < a.r; ++i) {
      Z* z = a.Zp + i * a.ldz + lo;
      for (int64_t j = 0; j < w; ++j) put(z + j, i < w ? Linv[i * ldp + j] : 0.0);
    }
  }
  return true;
}

template <typename T, typename Z>
kk_status setup_typed(int64_t m, int64_t d, int64_t block, const void* G, int64_t ldg, double damp, void* Zv,
                      int64_t ldz, int nt) {
  const int64_t r = kk_mfac_static_rows(m, d, block);
  if (r <= 0) return KK_OK;
  SetupArgs<T, Z> a{m, d, block, r, static_cast<const T*>(G), ldg, damp, static_cast<Z*>(Zv), ldz};
  const int64_t nb = nblocks_of(d, block);
  std::atomic<bool> bad{false}, oom{false};
  if (nb >= 4 * int64_t(nt) || nt == 1) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (nt > 1)
    for (int64_t b = 0; b < nb; ++b) {
      if (bad || oom) continue;
      try {
        const int64_t lo = b * block;
        if (!setup_block(a, lo, std::min(block, d - lo), 1)) bad = true;
      } catch (const std::bad_alloc&) {
        oom = true;
      }
    }
  } else {
    for (int64_t b = 0; b < nb && !bad; ++b) {
      const int64_t lo = b * block;
      if (!setup_block(a, lo, std::min(block, d - lo), nt)) bad = true;
    }
  }
  if (oom) throw std::bad_alloc();
  if (bad) return not_pd("a block's Gram matrix (+ m*damp*I)", damp);
  return KK_OK;
}

}  // namespace

// ---- entry points (arguments checked by mfac_api.cpp) ----------------------------------------------------
kk_status mfac_dots(kk_dtype gdtype, int64_t r, int64_t d, int64_t block, void* G, int64_t ldg, int64_t nvec,
                    const void* x, int64_t ldx, int64_t insert_row, double* q, double* qr, int nt) {
  switch (gdtype) {
    case KK_FLOAT32: return dots_typed<float>(r, d, block, G, ldg, nvec, x, ldx, insert_row, q, qr, nt);
    case KK_BFLOAT16: return dots_typed<uint16_t>(r, d, block, G, ldg, nvec, x, ldx, insert_row, q, qr, nt);
    default: return dots_typed<double>(r, d, block, G, ldg, nvec, x, ldx, insert_row, q, qr, nt);
  }
}

kk_status mfac_combine(kk_dtype gdtype, int64_t r, int64_t d, int64_t block, const void* G, int64_t ldg,
                       int64_t nvec, double alpha, const void* x, int64_t ldx, const double* c, void* out,
                       int64_t ldo, int nt) {
  switch (gdtype) {
    case KK_FLOAT32: return combine_typed<float>(r, d, block, G, ldg, nvec, alpha, x, ldx, c, out, ldo, nt);
    case KK_BFLOAT16: return combine_typed<uint16_t>(r, d, block, G, ldg, nvec, alpha, x, ldx, c, out, ldo, nt);
    default: return combine_typed<double>(r, d, block, G, ldg, nvec, alpha, x, ldx, c, out, ldo, nt);
  }
}

kk_status mfac_diag(kk_dtype zdtype, int64_t r, int64_t d, const void* Z, int64_t ldz, double alpha, double beta,
                    void* out, int nt) {
  switch (zdtype) {
    case KK_FLOAT32: return diag_typed<float>(r, d, Z, ldz, alpha, beta, out, nt);
    case KK_BFLOAT16: return diag_typed<uint16_t>(r, d, Z, ldz, alpha, beta, out, nt);
    default: return diag_typed<double>(r, d, Z, ldz, alpha, beta, out, nt);
  }
}

kk_status mfac_static_setup(kk_dtype gdtype, int64_t m, int64_t d, int64_t block, const void* G, int64_t ldg,
                            double damp, void* Z, int64_t ldz, int nt) {
  switch (gdtype) {
    case KK_FLOAT32: return setup_typed<float, float>(m, d, block, G, ldg, damp, Z, ldz, nt);
    case KK_BFLOAT16: return setup_typed<uint16_t, float>(m, d, block, G, ldg, damp, Z, ldz, nt);
    default: return setup_typed<double, double>(m, d, block, G, ldg, damp, Z, ldz, nt);
  }
}

kk_status mfac_window_rebuild(int64_t m, double damp, const double* gram, double* kinv, int nt) {
  if (m == 0) return KK_OK;
  std::vector<double> k(size_t(m * m));
  if (!spd_inverse(m, damp, gram, k.data(), nt)) return not_pd("m*damp*I + gram", damp);
  std::memcpy(kinv, k.data(), size_t(m * m) * sizeof(double));
  return KK_OK;
}

kk_status mfac_window_update(int64_t m, double damp, double* gram, double* kinv, int64_t row, const double* newcol,
                             int nt) {
  // Row/column k = row of K = m*damp*I + gram is replaced; P = K without row and column k is unchanged.
  // Bordering (Schur complements), all in O(m^2):
  //   P^-1 = kinv_{-k,-k} - a a^T / a_k                          a = kinv[:, k]   (k removed)
  //   w = P^-1 b,  s = c - b^T w                                 b = newcol_{-k}, c = newcol[k] + m*damp
  //   kinv'_{-k,-k} = P^-1 + w w^T / s,  kinv'_{-k,k} = -w / s,  kinv'_{kk} = 1 / s
  // Every term is a piece of a positive semidefinite matrix bounded by ||kinv|| or ||kinv'|| (P and K'
  // are >= m*damp*I), so nothing cancels beyond s itself (s >= m*damp in exact arithmetic, its rounding
  // that of K'), unlike a rank-2 Woodbury step whose terms grow with the replaced gradients.
  const int64_t k = row;
  const size_t msz = static_cast<size_t>(m);
  std::vector<double> old(msz), a(msz), bz(msz), w(msz);
  for (int64_t j = 0; j < m; ++j) old[j] = j <= k ? gram[k * m + j] : gram[j * m + k];
  for (int64_t j = 0; j < m; ++j) a[j] = kinv[k * m + j];  // kinv symmetric: row k = column k
  for (int64_t j = 0; j < m; ++j) bz[j] = j == k ? 0.0 : newcol[j];
  const double ak = a[k];
  const double cc = newcol[k] + static_cast<double>(m) * damp;
  if (m * m < kSerial) nt = 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t i = 0; i < m; ++i) w[i] = dot(kinv + i * m, bz.data(), m);  // kinv b (column k of b is 0)
  const double ab = dot(a.data(), bz.data(), m);
  double bw = 0.0, bw_abs = 0.0;
  for (int64_t i = 0; i < m; ++i) {
    w[i] = i == k ? 0.0 : w[i] - a[i] * (ab / ak);  // P^-1 b
    bw += bz[i] * w[i];
    bw_abs += std::fabs(bz[i] * w[i]);
  }
  const double sc = cc - bw;
  for (int64_t j = 0; j < m; ++j) gram[k * m + j] = gram[j * m + k] = newcol[j];
  const double eps = 2.220446049250313e-16;
  if (!(ak > 0) || !std::isfinite(ak) || !(sc > 0) || !std::isfinite(sc) || !std::isfinite(bw_abs) ||
      sc <= 64 * eps * (std::fabs(cc) + bw_abs)) {
    kk_status st = mfac_window_rebuild(m, damp, gram, kinv, nt);
    if (st != KK_OK)  // restore gram: nothing changed
      for (int64_t j = 0; j < m; ++j) gram[k * m + j] = gram[j * m + k] = old[j];
    return st;
  }
  const double inv_ak = 1.0 / ak, inv_s = 1.0 / sc;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 16) if (nt > 1)
  for (int64_t i = 0; i < m; ++i) {
    double* ki = kinv + i * m;
    if (i == k) continue;
    const double pa = a[i] * inv_ak, pw = w[i] * inv_s;
    for (int64_t j = 0; j <= i; ++j) ki[j] += pw * w[j] - pa * a[j];
    ki[k] = -w[i] * inv_s;  // (column k, j = k <= i or not: set directly; mirrored below)
  }
  for (int64_t j = 0; j < m; ++j) kinv[k * m + j] = j == k ? inv_s : -w[j] * inv_s;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < i; ++j) {
      if (i == k || j == k) {
        kinv[i * m + j] = kinv[j * m + i] = -w[i == k ? j : i] * inv_s;
      } else {
        kinv[j * m + i] = kinv[i * m + j];
      }
    }
  return KK_OK;
}

kk_status mfac_window_coef(int64_t m, int64_t nvec, double scale, const double* kinv, const double* q, double* c,
                           int nt) {
  if (m * m * nvec < kSerial) nt = 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t i = 0; i < m; ++i)
    for (int64_t v = 0; v < nvec; ++v) c[v * m + i] = scale * dot(kinv + i * m, q + v * m, m);
  return KK_OK;
}

}  // namespace KK_ISA_NS
}  // namespace kk
