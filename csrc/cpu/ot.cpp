// Entropic optimal transport on the CPU: log-domain Sinkhorn half-steps and the pieces of the
// Sinkhorn-Newton-Sparse solver (Tang et al., ICLR 2024; ../shared/papers/ot.md).  OpenMP, float32 /
// float64 in and out; every exponent argument, log-sum-exp and plan sum is computed in float64 (a
// float32 problem is read as float32 and converted), so both dtypes match the float64 reference.
//
// Math (csrc/include/kernelkit/ot.h): P_ij = exp((f_i + g_j - C_ij) / reg),
//   sinkhorn_step axis 0: f_i = reg (log a_i - LSE_j((g_j - C_ij)/reg)), axis 1 the column version,
//     with the marginal error of the plan before the update fused into the same pass;
//   marginals: r = P wc, c = P^T wr, the dual objective; plan: P; sparsify: per row the top-k of
//   g_j - C_ij; hvp / cg: the sparsified Hessian (diag(r), S; S^T, diag(c)) + shift and Jacobi PCG;
//   points_grad: sum_ij P_ij (s + u_i + v_j) dC(x_i, y_j).
//
// The cost is read a row segment at a time (CostRows::row): a pointer into a float64 matrix, a
// converted copy of a float32 one, or computed on the fly from the point clouds (y transposed to
// (D, m) once per call so the inner loop over columns is contiguous; differences formed directly).
// Exponent arguments are divided by reg exactly like the reference ((g - C) / reg, rounded once):
// with FMA a multiply by 1/reg plus one Newton correction, which gives the correctly rounded quotient
// at a third of a division's cost.  exp is our own vectorized polynomial (vexp: Cody-Waite reduction,
// degree-13 Taylor on |r| <= ln2/2, 2^k applied as two halves so results down to the subnormal range
// and -inf -> 0 come out right; about 1 ulp).
//
// Log-sum-exp: rows (axis 0) are processed in tiles of kTW columns, each tile in two passes over an
// L1-resident buffer: the tile's max, one rescale of the running sum if it grew, then one exp per
// element.  Columns (axis 1): each thread owns a strip of kSW columns and streams the rows of its
// problem in blocks of kRB rows; per block the column maxima, one rescale per column, one exp per
// element (when there are fewer strips than threads the rows are split too and the partial (max, sum)
// pairs merged).  The marginal error is computed from s in the same call (one pass over C).
//
// Measured (AVX2, n = m = 2000 float64, one Sinkhorn iteration = both half-steps, on the shared 2-core
// machine at load ~5, so wall times are upper bounds): dense cost 41 ms with 1 thread (72 ms median
// with 2 contended threads), 2-D points 32 ms; POT's numpy sinkhorn_log 695 ms per iteration on the
// same problem (10-17x).  Floors per half-step: 32 MB of C at ~10 GB/s = 3.3 ms; 4M exps at the
// measured 3.5 ns/exp/thread under that load = 14 ms: the kernels run near the exp floor.
//
// This file is compiled once per ISA (KK_ISA_NS = isa_avx512 / isa_avx2 / isa_base): the vector
// width of the GCC vector types below follows the ISA.  ot_api.cpp has checked every argument.
#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include "ot_impl.h"

namespace kk {
namespace KK_ISA_NS {
namespace {

#if defined(__AVX512F__)
#define KK_OT_VB 64
#elif defined(__AVX2__)
#define KK_OT_VB 32
#else
#define KK_OT_VB 16
#endif
typedef double vd __attribute__((vector_size(KK_OT_VB)));
typedef int64_t vl __attribute__((vector_size(KK_OT_VB)));
constexpr int ND = KK_OT_VB / 8;  // float64 lanes
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int64_t kTW = 2048;  // row tile (columns): a whole row of m <= 2048 is one exact two-pass LSE
constexpr int64_t kSW = 256;   // column strip of the axis-1 step
constexpr int64_t kRB = 32;    // rows per block of the axis-1 step

inline vd bcast(double x) { return vd{} + x; }
inline vd loadv(const double* p) {
  vd v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void storev(double* p, vd v) { std::memcpy(p, &v, sizeof(v)); }
inline vd load_tail(const double* p, int64_t len, double fill) {
  vd v = bcast(fill);
  for (int64_t l = 0; l < len; ++l) v[l] = p[l];
  return v;
}
inline double hsum(vd v) {
  double s = 0;
  for (int l = 0; l < ND; ++l) s += v[l];
  return s;
}
inline double hmax(vd v) {
  double s = v[0];
  for (int l = 1; l < ND; ++l) s = v[l] > s ? v[l] : s;
  return s;
}
inline vd vmaxv(vd a, vd b) { return a > b ? a : b; }  // NaN in a gives b

inline vd fmadd(vd a, vd b, vd c) {
#if defined(__AVX512F__)
  return (vd)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
#elif defined(__FMA__)
  return (vd)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#else
  return a * b + c;
#endif
}

// exp(x) for every lane: x clamped to [-708, 710] (NaN passes), k = round(x / ln2), r = x - k ln2
// (Cody-Waite: k * kLn2Hi is exact), e^r by its degree-13 Taylor polynomial (truncation < 0.03 ulp on
// |r| <= 0.347), times 2^k1 * 2^k2 with k1 + k2 = k so both factors are normal numbers; x >= 709.79
// gives inf.  Results for x < -708 (below 3.3e-307, near the smallest normal double; -inf included) are 0:
// no subnormal is ever produced or multiplied.  (They were: at small reg most log-plan entries lie far
// below -708, and the subnormal products made a half-step 5x slower on this machine, 27 instead of
// 5 ns per entry at n = 600, reg = 1e-3.)  A flushed term is < 3.3e-307 of its LSE's maximum.
inline vd vexp(vd x0) {
  const vd lo = bcast(-708.0), hi = bcast(710.0);
  vd x = x0 < lo ? lo : x0;
  x = x > hi ? hi : x;
  const vd sh = bcast(0x1.8p52);  // adding it rounds to an integer held in the low mantissa bits
  const vd kf = fmadd(x, bcast(1.4426950408889634074), sh) - sh;
  vd r = fmadd(kf, bcast(-6.93147180369123816490e-01), x);
  r = fmadd(kf, bcast(-1.90821492927058770002e-10), r);
  vd p = bcast(1.0 / 6227020800.0);
  p = fmadd(p, r, bcast(1.0 / 479001600.0));
  p = fmadd(p, r, bcast(1.0 / 39916800.0));
  p = fmadd(p, r, bcast(1.0 / 3628800.0));
  p = fmadd(p, r, bcast(1.0 / 362880.0));
  p = fmadd(p, r, bcast(1.0 / 40320.0));
  p = fmadd(p, r, bcast(1.0 / 5040.0));
  p = fmadd(p, r, bcast(1.0 / 720.0));
  p = fmadd(p, r, bcast(1.0 / 120.0));
  p = fmadd(p, r, bcast(1.0 / 24.0));
  p = fmadd(p, r, bcast(1.0 / 6.0));
  p = fmadd(p, r, bcast(0.5));
  p = fmadd(p, r, bcast(1.0));
  p = fmadd(p, r, bcast(1.0));
  const vd k1 = (kf * 0.5 + sh) - sh, k2 = kf - k1;  // |k1|, |k2| <= 539
  const vl e1 = ((vl)(k1 + sh) - (vl)sh + 1023) << 52;
  const vl e2 = ((vl)(k2 + sh) - (vl)sh + 1023) << 52;
  const vd y = p * (vd)e1 * (vd)e2;
  return x0 < lo ? bcast(0.0) : y;  // exp(-708) = 3.3e-307, a normal number
}

// d / reg rounded like the division (ireg = 1 / reg): one Newton correction with an exact FMA
// remainder; without FMA (base ISA) the division itself.
inline double qdiv(double d, double reg, double ireg) {
#if defined(__FMA__)
  const double q = d * ireg;
  const double e = __builtin_fma(-q, reg, d);  // the exact remainder; NaN when q is infinite
  return e == e ? __builtin_fma(e, ireg, q) : q;
#else
  (void)ireg;
  return d / reg;
#endif
}

// Per-thread work memory, allocated before a parallel region (no allocation inside one).
struct Work {
  std::vector<double> buf;
  int64_t per;
  Work(int nt, int64_t per_thread) : buf(static_cast<size_t>(nt) * static_cast<size_t>(per_thread + 8)), per(per_thread + 8) {}
  double* get() { return buf.data() + static_cast<size_t>(omp_get_thread_num()) * static_cast<size_t>(per); }
};

// ---------------------------------------------------------------------------------------------
// The cost, a row segment at a time, in float64.
template <typename T>
struct CostRows {
  int kind = KK_OT_COST_MATRIX, dim = 1;
  double p = 2;
  const T* mat = nullptr;
  int64_t ld = 0, bs = 0;
  const T* x = nullptr;
  int64_t xbs = 0;
  const T* y = nullptr;
  int64_t ybs = 0;
  int64_t m = 0;
  std::vector<double> yT;  // (nb, dim, m): y transposed, nb = 1 when y is shared
  int64_t yTbs = 0;

  CostRows(const kk_ot_cost& c, int64_t batch, int64_t m_, int nt) : m(m_) {
    kind = c.kind;
    dim = kind == KK_OT_COST_MATRIX ? 1 : c.dim;
    p = c.p;
    mat = static_cast<const T*>(c.matrix);
    ld = c.ld;
    bs = c.batch_stride;
    x = static_cast<const T*>(c.x);
    xbs = c.x_batch_stride;
    y = static_cast<const T*>(c.y);
    ybs = c.y_batch_stride;
    if (kind == KK_OT_COST_MATRIX || batch == 0 || m == 0) return;
    const int64_t nb = ybs == 0 ? 1 : batch;
    yTbs = ybs == 0 ? 0 : m * dim;
    yT.resize(static_cast<size_t>(nb * m * dim));
    double* out = yT.data();
    const T* yy = y;
    const int64_t D = dim, mm = m, ys = ybs;
#pragma omp parallel for num_threads(nt) schedule(static) if (nb * mm * D > 65536)
    for (int64_t q = 0; q < nb * mm; ++q) {
      const int64_t b = q / mm, j = q % mm;
      const T* src = yy + b * ys + j * D;
      double* dst = out + b * mm * D + j;
      for (int64_t t = 0; t < D; ++t) dst[t * mm] = static_cast<double>(src[t]);
    }
  }

  const T* xrow(int64_t b, int64_t i) const { return x + b * xbs + i * dim; }
  const double* ycol(int64_t b, int64_t t) const { return yT.data() + b * yTbs + t * m; }  // y[b, :, t]

  // C[b, i, j0 : j0 + len) as float64: into the matrix itself (float64) or buf (len elements).
  const double* row(int64_t b, int64_t i, int64_t j0, int64_t len, double* __restrict__ buf) const {
    if (kind == KK_OT_COST_MATRIX) {
      const T* src = mat + b * bs + i * ld + j0;
      if constexpr (std::is_same<T, double>::value) {
        (void)buf;
        return src;
      } else {
        for (int64_t j = 0; j < len; ++j) buf[j] = static_cast<double>(src[j]);
        return buf;
      }
    }
    const T* xi = xrow(b, i);
    const double* yt = yT.data() + b * yTbs + j0;
    if (kind == KK_OT_COST_MINKOWSKI_POW) {
      for (int t = 0; t < dim; ++t) {
        const double xt = static_cast<double>(xi[t]);
        const double* __restrict__ yr = yt + t * m;
        if (p == 1.0) {
          if (t == 0)
            for (int64_t j = 0; j < len; ++j) buf[j] = std::fabs(xt - yr[j]);
          else
            for (int64_t j = 0; j < len; ++j) buf[j] += std::fabs(xt - yr[j]);
        } else if (p == 2.0) {
          if (t == 0)
            for (int64_t j = 0; j < len; ++j) {
              const double d = xt - yr[j];
              buf[j] = d * d;
            }
          else
            for (int64_t j = 0; j < len; ++j) {
              const double d = xt - yr[j];
              buf[j] += d * d;
            }
        } else {
          for (int64_t j = 0; j < len; ++j) {
            const double v = std::pow(std::fabs(xt - yr[j]), p);
            buf[j] = t == 0 ? v : buf[j] + v;
          }
        }
      }
      return buf;
    }
    // squared Euclidean distance, then the power for EUCLIDEAN_POW
    {
      const double x0 = static_cast<double>(xi[0]);
      const double* __restrict__ yr = yt;
      for (int64_t j = 0; j < len; ++j) {
        const double d = x0 - yr[j];
        buf[j] = d * d;
      }
    }
    for (int t = 1; t < dim; ++t) {
      const double xt = static_cast<double>(xi[t]);
      const double* __restrict__ yr = yt + t * m;
      for (int64_t j = 0; j < len; ++j) {
        const double d = xt - yr[j];
        buf[j] += d * d;
      }
    }
    if (kind == KK_OT_COST_EUCLIDEAN_POW && p != 2.0) {
      if (p == 1.0)
        for (int64_t j = 0; j < len; ++j) buf[j] = std::sqrt(buf[j]);
      else {
        const double h = p / 2;
        for (int64_t j = 0; j < len; ++j) buf[j] = std::pow(buf[j], h);
      }
    }
    return buf;
  }
};

// ---------------------------------------------------------------------------------------------
// Vector helpers over float64 buffers.
inline double max_of(const double* t, int64_t len) {
  vd a = bcast(-kInf), b = bcast(-kInf);
  int64_t j = 0;
  for (; j + 2 * ND <= len; j += 2 * ND) {
    a = vmaxv(loadv(t + j), a);
    b = vmaxv(loadv(t + j + ND), b);
  }
  for (; j + ND <= len; j += ND) a = vmaxv(loadv(t + j), a);
  if (j < len) b = vmaxv(load_tail(t + j, len - j, -kInf), b);
  return hmax(vmaxv(a, b));
}

// sum_j exp(t_j - sh), sh finite.
inline double sum_exp(const double* t, int64_t len, double sh) {
  const vd s = bcast(sh);
  vd a = vd{}, b = vd{};
  int64_t j = 0;
  for (; j + 2 * ND <= len; j += 2 * ND) {
    a += vexp(loadv(t + j) - s);
    b += vexp(loadv(t + j + ND) - s);
  }
  for (; j + ND <= len; j += ND) a += vexp(loadv(t + j) - s);
  if (j < len) b += vexp(load_tail(t + j, len - j, -kInf) - s);
  return hsum(a + b);
}

// t[j] = exp(t[j]) in place.
inline void exp_inplace(double* t, int64_t len) {
  int64_t j = 0;
  for (; j + ND <= len; j += ND) storev(t + j, vexp(loadv(t + j)));
  if (j < len) {
    const vd e = vexp(load_tail(t + j, len - j, -kInf));
    for (int64_t l = 0; l < len - j; ++l) t[j + l] = e[l];
  }
}

// A streaming log-sum-exp: value M + log S.
struct Lse {
  double M = -kInf, S = 0;
  void add(const double* t, int64_t len) {
    const double bm = max_of(t, len);
    if (bm > M) {
      S *= std::exp(M - bm);  // M = -inf: S = 0 stays 0
      M = bm;
    }
    if (M > -kInf) S += sum_exp(t, len, std::isinf(M) ? 0.0 : M);
  }
  double value() const { return M + std::log(S); }
};

// ---------------------------------------------------------------------------------------------
// sinkhorn_step: the per-element finish (new potential, the error term) and the per-problem norm.
template <typename T>
inline void finish_step(int64_t q, double s, double reg, const T* w, const T* pot, T* pot_new, double* eterm) {
  const double wk = static_cast<double>(w[q]);
  if (eterm) {
    const double pk = static_cast<double>(pot[q]);
    double mg = std::exp(pk / reg + s);
    if (std::isnan(mg) && !(pk > -kInf)) mg = 0;  // a -inf potential has no mass
    eterm[q] = mg - wk;
  }
  pot_new[q] = static_cast<T>(wk > 0 ? reg * (std::log(std::max(wk, DBL_MIN)) - s) : -kInf);
}

template <typename T>
void reduce_err(const double* eterm, int64_t batch, int64_t len, int err_norm, T* err, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) if (batch * len > 65536)
  for (int64_t b = 0; b < batch; ++b) {
    const double* e = eterm + b * len;
    double acc = 0;
    if (err_norm == KK_OT_NORM_L1) {
      for (int64_t k = 0; k < len; ++k) acc += std::fabs(e[k]);
    } else if (err_norm == KK_OT_NORM_L2) {
      for (int64_t k = 0; k < len; ++k) acc += e[k] * e[k];
      acc = std::sqrt(acc);
    } else {
      for (int64_t k = 0; k < len; ++k) {
        const double v = std::fabs(e[k]);
        if (!(v <= acc)) acc = v;  // NaN propagates
      }
    }
    err[b] = static_cast<T>(acc);
  }
}

// axis 0: one row of C per work item, tiles of kTW columns.
template <typename T>
void step_rows(const CostRows<T>& cr, int64_t batch, int64_t n, int64_t m, double reg, const T* w, const T* other,
               const T* pot, T* pot_new, double* eterm, int nt) {
  const double ireg = 1.0 / reg;
  const int64_t tw = std::min<int64_t>(kTW, std::max<int64_t>(m, 1));
  Work work(nt, 2 * tw);
#pragma omp parallel num_threads(nt)
  {
    double* cbuf = work.get();
    double* tb = cbuf + tw;
#pragma omp for schedule(static)
    for (int64_t q = 0; q < batch * n; ++q) {
      const int64_t b = q / n, i = q % n;
      const T* o = other + b * m;
      Lse st;
      for (int64_t j0 = 0; j0 < m; j0 += tw) {
        const int64_t len = std::min(tw, m - j0);
        const double* __restrict__ c = cr.row(b, i, j0, len, cbuf);
        const T* __restrict__ oj = o + j0;
        for (int64_t j = 0; j < len; ++j) tb[j] = qdiv(static_cast<double>(oj[j]) - c[j], reg, ireg);
        st.add(tb, len);
      }
      finish_step(q, st.value(), reg, w, pot, pot_new, eterm);
    }
  }
}

// axis 1: work items (problem, strip of kSW columns, chunk of rows); each keeps per-column (M, S).
template <typename T>
void step_cols(const CostRows<T>& cr, int64_t batch, int64_t n, int64_t m, double reg, const T* w, const T* other,
               const T* pot, T* pot_new, double* eterm, int nt) {
  const double ireg = 1.0 / reg;
  const int64_t nstrip = (m + kSW - 1) / kSW;
  const int64_t items0 = batch * nstrip;
  int64_t rch = 1;
  if (items0 < nt) rch = std::max<int64_t>(1, std::min<int64_t>((nt + items0 - 1) / items0, n / 64));
  const int64_t rlen = (n + rch - 1) / std::max<int64_t>(rch, 1);
  std::vector<double> PM(static_cast<size_t>(batch * rch * m)), PS(static_cast<size_t>(batch * rch * m));
  Work work(nt, kRB * kSW + 2 * kSW + kSW);
#pragma omp parallel num_threads(nt)
  {
    double* tile = work.get();        // kRB x kSW
    double* cbuf = tile + kRB * kSW;  // kSW
    double* bm = cbuf + kSW;          // kSW
    double* shv = bm + kSW;           // kSW
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items0 * rch; ++it) {
      const int64_t rc = it % rch, sb = it / rch;
      const int64_t b = sb / nstrip, j0 = (sb % nstrip) * kSW;
      const int64_t len = std::min(kSW, m - j0), lenp = (len + ND - 1) / ND * ND;
      const int64_t i_begin = rc * rlen, i_end = std::min(n, i_begin + rlen);
      double* M = PM.data() + (b * rch + rc) * m + j0;
      double* S = PS.data() + (b * rch + rc) * m + j0;
      alignas(64) double Ml[kSW], Sl[kSW];
      for (int64_t j = 0; j < lenp; ++j) {
        Ml[j] = -kInf;
        Sl[j] = 0;
      }
      const T* fo = other + b * n;
      for (int64_t i0 = i_begin; i0 < i_end; i0 += kRB) {
        const int64_t rb = std::min(kRB, i_end - i0);
        for (int64_t r = 0; r < rb; ++r) {
          const double fi = static_cast<double>(fo[i0 + r]);
          const double* __restrict__ c = cr.row(b, i0 + r, j0, len, cbuf);
          double* __restrict__ tr = tile + r * kSW;
          for (int64_t j = 0; j < len; ++j) tr[j] = qdiv(fi - c[j], reg, ireg);
          for (int64_t j = len; j < lenp; ++j) tr[j] = -kInf;
        }
        // column maxima of the block, one rescale per column, the shift used by the exps
        for (int64_t j = 0; j < lenp; j += ND) {
          vd mx = loadv(tile + j);
          for (int64_t r = 1; r < rb; ++r) mx = vmaxv(loadv(tile + r * kSW + j), mx);
          const vd Mo = loadv(Ml + j);
          const vd Mn = vmaxv(mx, Mo);
          vd d = Mo - Mn;
          d = d != d ? vd{} : d;  // -inf - -inf: nothing to rescale
          storev(Sl + j, loadv(Sl + j) * vexp(d));
          storev(Ml + j, Mn);
          const vd fin = (Mn == bcast(-kInf)) | (Mn == bcast(kInf)) ? vd{} : Mn;
          storev(shv + j, fin);
        }
        for (int64_t r = 0; r < rb; ++r) {
          const double* tr = tile + r * kSW;
          for (int64_t j = 0; j < lenp; j += ND) storev(Sl + j, loadv(Sl + j) + vexp(loadv(tr + j) - loadv(shv + j)));
        }
      }
      std::memcpy(M, Ml, static_cast<size_t>(len) * sizeof(double));
      std::memcpy(S, Sl, static_cast<size_t>(len) * sizeof(double));
    }
    // merge the row chunks, finish
#pragma omp for schedule(static)
    for (int64_t q = 0; q < batch * m; ++q) {
      const int64_t b = q / m, j = q % m;
      double Mx = -kInf;
      for (int64_t rc = 0; rc < rch; ++rc) Mx = std::max(Mx, PM[(b * rch + rc) * m + j]);
      double S = 0;
      for (int64_t rc = 0; rc < rch; ++rc) {
        const double Mr = PM[(b * rch + rc) * m + j], Sr = PS[(b * rch + rc) * m + j];
        if (rch == 1 || Mr == Mx) S += Sr;
        else if (Mr > -kInf) S += Sr * std::exp(Mr - Mx);
      }
      finish_step(q, Mx + std::log(S), reg, w, pot, pot_new, eterm);
    }
  }
}

template <typename T>
void sinkhorn_step_t(const kk_ot_cost& cost, int64_t batch, int64_t n, int64_t m, int axis, double reg,
                     const void* w, const void* other, const void* pot, void* pot_new, void* err, int err_norm,
                     int nt) {
  const int64_t len = axis == 0 ? n : m;
  if (batch == 0) return;
  std::vector<double> eterm(err ? static_cast<size_t>(batch * len) : 0);
  double* et = err ? eterm.data() : nullptr;
  if (len > 0) {
    const CostRows<T> cr(cost, batch, m, nt);
    if (axis == 0)
      step_rows<T>(cr, batch, n, m, reg, static_cast<const T*>(w), static_cast<const T*>(other),
                   static_cast<const T*>(pot), static_cast<T*>(pot_new), et, nt);
    else
      step_cols<T>(cr, batch, n, m, reg, static_cast<const T*>(w), static_cast<const T*>(other),
                   static_cast<const T*>(pot), static_cast<T*>(pot_new), et, nt);
  }
  if (err) reduce_err<T>(et, batch, len, err_norm, static_cast<T*>(err), nt);
}

// ---------------------------------------------------------------------------------------------
// marginals: rows of P; r_i and the plan sum per row, c through per-thread column accumulators.
template <typename T>
void marginals_t(const kk_ot_cost& cost, int64_t batch, int64_t n, int64_t m, double reg, const T* f, const T* g,
                 const T* a, const T* b, const T* wr, const T* wc, T* r, T* c, T* obj, int nt) {
  if (batch == 0) return;
  const double ireg = 1.0 / reg;
  const CostRows<T> cr(cost, batch, m, nt);
  const int64_t tw = std::min<int64_t>(kTW, std::max<int64_t>(m, 1));
  const bool by_problem = batch >= nt;  // else the rows of one problem are split between threads
  const int ntc = by_problem ? nt : std::max(1, nt);
  const bool need_c = c != nullptr;
  Work work(ntc, 2 * tw + (need_c ? m : 0));
  std::vector<double> psum(static_cast<size_t>(batch * n));  // sum_j P_ij per row
  // The rows [i0, i1) of problem bb: r, the row sums, and (if c) cacc += wr_i P_i.
  auto rows = [&](int64_t bb, int64_t i0, int64_t i1, double* cacc, double* cbuf, double* tb) {
    const T* gb = g + bb * m;
    for (int64_t i = i0; i < i1; ++i) {
      const double fi = static_cast<double>(f[bb * n + i]);
      const double wri = wr ? static_cast<double>(wr[bb * n + i]) : 1.0;
      double rs = 0, ps = 0;
      for (int64_t j0 = 0; j0 < m; j0 += tw) {
        const int64_t len = std::min(tw, m - j0);
        const double* __restrict__ cc = cr.row(bb, i, j0, len, cbuf);
        const T* __restrict__ gj = gb + j0;
        for (int64_t j = 0; j < len; ++j) tb[j] = qdiv((fi + static_cast<double>(gj[j])) - cc[j], reg, ireg);
        exp_inplace(tb, len);
        if (wc) {
          const T* __restrict__ wcj = wc + bb * m + j0;
          for (int64_t j = 0; j < len; ++j) {
            rs += tb[j] * static_cast<double>(wcj[j]);
            ps += tb[j];
          }
        } else {
          for (int64_t j = 0; j < len; ++j) ps += tb[j];
          rs = ps;
        }
        if (cacc) {
          double* __restrict__ ca = cacc + j0;
          for (int64_t j = 0; j < len; ++j) ca[j] += wri * tb[j];
        }
      }
      if (r) r[bb * n + i] = static_cast<T>(rs);
      psum[bb * n + i] = ps;
    }
  };
  if (by_problem) {
#pragma omp parallel num_threads(nt)
    {
      double* cbuf = work.get();
      double* tb = cbuf + tw;
      double* cacc = need_c ? tb + tw : nullptr;
#pragma omp for schedule(dynamic)
      for (int64_t bb = 0; bb < batch; ++bb) {
        if (cacc) std::fill(cacc, cacc + m, 0.0);
        rows(bb, 0, n, cacc, cbuf, tb);
        if (cacc)
          for (int64_t j = 0; j < m; ++j) c[bb * m + j] = static_cast<T>(cacc[j]);
      }
    }
  } else {
    for (int64_t bb = 0; bb < batch; ++bb) {
      int used = 1;
#pragma omp parallel num_threads(nt)
      {
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
#pragma omp single
        used = nth;
        double* cbuf = work.get();
        double* tb = cbuf + tw;
        double* cacc = need_c ? tb + tw : nullptr;
        if (cacc) std::fill(cacc, cacc + m, 0.0);
        const int64_t per = (n + nth - 1) / nth;
        const int64_t i0 = std::min(n, tid * per), i1 = std::min(n, i0 + per);
        rows(bb, i0, i1, cacc, cbuf, tb);
#pragma omp barrier
        if (need_c) {
#pragma omp for schedule(static)
          for (int64_t j = 0; j < m; ++j) {
            double s = 0;
            for (int th = 0; th < used; ++th) s += work.buf[static_cast<size_t>(th) * work.per + 2 * tw + j];
            c[bb * m + j] = static_cast<T>(s);
          }
        }
      }
    }
  }
  if (obj) {
    for (int64_t bb = 0; bb < batch; ++bb) {
      double da = 0, db = 0, ps = 0;
      for (int64_t i = 0; i < n; ++i) {
        const double ai = static_cast<double>(a[bb * n + i]);
        if (ai != 0) da += ai * static_cast<double>(f[bb * n + i]);
        ps += psum[bb * n + i];
      }
      for (int64_t j = 0; j < m; ++j) {
        const double bj = static_cast<double>(b[bb * m + j]);
        if (bj != 0) db += bj * static_cast<double>(g[bb * m + j]);
      }
      obj[bb] = static_cast<T>(da + db - reg * ps);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// plan
template <typename T>
void plan_t(const kk_ot_cost& cost, int64_t batch, int64_t n, int64_t m, double reg, const T* f, const T* g, T* P,
            int64_t ldp, int nt) {
  if (batch == 0 || n == 0 || m == 0) return;
  const double ireg = 1.0 / reg;
  const CostRows<T> cr(cost, batch, m, nt);
  const int64_t tw = std::min<int64_t>(kTW, m);
  Work work(nt, 2 * tw);
#pragma omp parallel num_threads(nt)
  {
    double* cbuf = work.get();
    double* tb = cbuf + tw;
#pragma omp for schedule(static)
    for (int64_t q = 0; q < batch * n; ++q) {
      const int64_t bb = q / n, i = q % n;
      const double fi = static_cast<double>(f[q]);
      T* prow = P + (bb * n + i) * ldp;
      for (int64_t j0 = 0; j0 < m; j0 += tw) {
        const int64_t len = std::min(tw, m - j0);
        const double* __restrict__ cc = cr.row(bb, i, j0, len, cbuf);
        const T* __restrict__ gj = g + bb * m + j0;
        for (int64_t j = 0; j < len; ++j) tb[j] = qdiv((fi + static_cast<double>(gj[j])) - cc[j], reg, ireg);
        exp_inplace(tb, len);
        T* __restrict__ out = prow + j0;
        for (int64_t j = 0; j < len; ++j) out[j] = static_cast<T>(tb[j]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// sparsify: per row the exact top-k of key_j = g_j - C_ij (NaN -> -inf; ties: the smaller column).
// Candidates: keys >= a threshold that at least k keys reach (the k-th largest of a strided sample of
// max(256, 4k) keys bounds it from below), then nth_element on the candidates only; with few candidates
// left, all.
template <typename T>
void sparsify_t(const kk_ot_cost& cost, int64_t batch, int64_t n, int64_t m, int64_t k, double reg, const T* f,
                const T* g, int32_t* cols, T* vals, int nt) {
  if (batch == 0 || n == 0 || m == 0) return;
  const CostRows<T> cr(cost, batch, m, nt);
  std::vector<int32_t> idxs(static_cast<size_t>(nt) * static_cast<size_t>(m));
  Work work(nt, 3 * m);
#pragma omp parallel num_threads(nt)
  {
    double* cbuf = work.get();
    double* key = cbuf + m;  // then the sample (<= m)
    int32_t* idx = idxs.data() + static_cast<size_t>(omp_get_thread_num()) * static_cast<size_t>(m);
#pragma omp for schedule(static)
    for (int64_t q = 0; q < batch * n; ++q) {
      const int64_t bb = q / n, i = q % n;
      const double* __restrict__ cc = cr.row(bb, i, 0, m, cbuf);
      const T* __restrict__ gb = g + bb * m;
      for (int64_t j = 0; j < m; ++j) {
        const double kv = static_cast<double>(gb[j]) - cc[j];
        key[j] = kv != kv ? -kInf : kv;
      }
      // Candidates: keys >= thr, where at least k keys reach thr.  thr is the q-th largest key of a
      // strided sample of s keys, q ~ 2 k s / m (about 2k candidates expected); if fewer than k keys
      // reach it, the k-th largest of the sample (or, for a sample smaller than k, -inf: every
      // column) is a guaranteed bound, since a subset's k-th largest is at most the full set's.
      // A sample of 4k keys (at least 256): the sample's own selection is then ~4k element moves instead
      // of m (a 1024-key sample made sparsify 4x the cost of a Sinkhorn half-step at m = 1000, k = 64).
      const int64_t ns = std::min<int64_t>(m, std::max<int64_t>(256, 4 * k)), stride = m / ns;
      double* smp = key + m;
      for (int64_t e = 0; e < ns; ++e) smp[e] = key[e * stride];
      auto kth_of_sample = [&](int64_t q) {  // the q-th largest (1-based) of the sample, q <= ns
        std::nth_element(smp, smp + (q - 1), smp + ns, [](double u, double v) { return u > v; });
        return smp[q - 1];
      };
      int64_t nc = 0;
      if (ns > k) {
        const int64_t q = std::min<int64_t>(ns, std::max<int64_t>(1, (2 * k * ns + m - 1) / m + 4));
        double thr = kth_of_sample(q);
        for (int64_t j = 0; j < m; ++j)
          if (key[j] >= thr) idx[nc++] = static_cast<int32_t>(j);
        if (nc < k) {
          for (int64_t e = 0; e < ns; ++e) smp[e] = key[e * stride];
          thr = kth_of_sample(k);
          nc = 0;
          for (int64_t j = 0; j < m; ++j)
            if (key[j] >= thr) idx[nc++] = static_cast<int32_t>(j);
        }
      } else {
        for (int64_t j = 0; j < m; ++j) idx[nc++] = static_cast<int32_t>(j);
      }
      auto better = [key](int32_t u, int32_t v) { return key[u] > key[v] || (key[u] == key[v] && u < v); };
      if (nc > k) std::nth_element(idx, idx + k, idx + nc, better);
      std::sort(idx, idx + k);
      const double fi = static_cast<double>(f[q]);
      int32_t* co = cols + q * k;
      T* vo = vals + q * k;
      for (int64_t e = 0; e < k; ++e) {
        const int32_t j = idx[e];
        co[e] = j;
        vo[e] = static_cast<T>(fi == -kInf ? 0.0 : std::exp(((fi + static_cast<double>(gb[j])) - cc[j]) / reg));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// hvp: yx = r vx + S vy + shift vx (rows), yy = S^T vx + c vy + shift vy (per-thread column sums).
template <typename T>
void hvp_t(int64_t batch, int64_t n, int64_t m, int64_t k, const int32_t* cols, const T* vals, const T* r,
           const T* c, double shift, const T* vx, const T* vy, T* yx, T* yy, int nt) {
  if (batch == 0) return;
  const bool par_rows = batch < nt && n * (k + 1) + m > 32768;
  const bool by_problem = !par_rows && batch >= 2 && batch * (n * (k + 1) + m) > 32768;
  Work work(nt, m);
  auto spmv_rows = [&](int64_t bb, int64_t i) {
    const int32_t* ci = cols + (bb * n + i) * k;
    const T* vi = vals + (bb * n + i) * k;
    const T* vyb = vy + bb * m;
    double s = 0;
    for (int64_t e = 0; e < k; ++e) s += static_cast<double>(vi[e]) * static_cast<double>(vyb[ci[e]]);
    const double x = static_cast<double>(vx[bb * n + i]);
    yx[bb * n + i] = static_cast<T>((static_cast<double>(r[bb * n + i]) * x + s) + shift * x);
  };
  auto scatter = [&](int64_t bb, int64_t i0, int64_t i1, double* acc) {
    for (int64_t i = i0; i < i1; ++i) {
      const int32_t* ci = cols + (bb * n + i) * k;
      const T* vi = vals + (bb * n + i) * k;
      const double x = static_cast<double>(vx[bb * n + i]);
      for (int64_t e = 0; e < k; ++e) acc[ci[e]] += static_cast<double>(vi[e]) * x;
    }
  };
  auto finish_y = [&](int64_t bb, int64_t j, double s) {
    const double v = static_cast<double>(vy[bb * m + j]);
    yy[bb * m + j] = static_cast<T>((s + static_cast<double>(c[bb * m + j]) * v) + shift * v);
  };
  if (!par_rows) {
#pragma omp parallel num_threads(by_problem ? nt : 1)
    {
      double* acc = work.get();
#pragma omp for schedule(dynamic)
      for (int64_t bb = 0; bb < batch; ++bb) {
        for (int64_t i = 0; i < n; ++i) spmv_rows(bb, i);
        std::fill(acc, acc + m, 0.0);
        scatter(bb, 0, n, acc);
        for (int64_t j = 0; j < m; ++j) finish_y(bb, j, acc[j]);
      }
    }
    return;
  }
  for (int64_t bb = 0; bb < batch; ++bb) {
    int used = 1;
#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
#pragma omp single
      used = nth;
      double* acc = work.get();
      std::fill(acc, acc + m, 0.0);
      const int64_t per = (n + nth - 1) / nth;
      const int64_t i0 = std::min(n, tid * per), i1 = std::min(n, i0 + per);
      for (int64_t i = i0; i < i1; ++i) spmv_rows(bb, i);
      scatter(bb, i0, i1, acc);
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t j = 0; j < m; ++j) {
        double s = 0;
        for (int th = 0; th < used; ++th) s += work.buf[static_cast<size_t>(th) * work.per + j];
        finish_y(bb, j, s);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// cg: Jacobi-preconditioned CG per problem in float64, the reference's algorithm step for step.  S^T
// is built once per problem as a column-major copy (counting sort), so both halves of H p are
// gathers that split over threads without per-thread accumulators.  All memory is allocated before
// the iterations.
struct CgWork {
  std::vector<double> v;  // zx rx px qx dx | zy ry py qy dy
  std::vector<int64_t> tptr;
  std::vector<int32_t> trow;
  std::vector<double> tval;
  void init(int64_t n, int64_t m, int64_t k) {
    v.resize(static_cast<size_t>(5 * (n + m)));
    tptr.resize(static_cast<size_t>(m + 1));
    trow.resize(static_cast<size_t>(n * k));
    tval.resize(static_cast<size_t>(n * k));
  }
};

template <typename T>
void cg_one(int64_t n, int64_t m, int64_t k, const int32_t* cols, const T* vals, const T* r, const T* c, double shift,
            const T* rhs_x, const T* rhs_y, T* zx_io, T* zy_io, double tol, int32_t max_iter, int32_t* iters,
            T* resid, CgWork& W, int nt) {
  const bool par = nt > 1 && n * (k + 1) + m > 32768;
  const int nth = par ? nt : 1;
  double bn2 = 0;
  for (int64_t i = 0; i < n; ++i) bn2 += static_cast<double>(rhs_x[i]) * static_cast<double>(rhs_x[i]);
  for (int64_t j = 0; j < m; ++j) bn2 += static_cast<double>(rhs_y[j]) * static_cast<double>(rhs_y[j]);
  const double bn = std::sqrt(bn2);
  if (bn == 0) {
    for (int64_t i = 0; i < n; ++i) zx_io[i] = T(0);
    for (int64_t j = 0; j < m; ++j) zy_io[j] = T(0);
    if (iters) *iters = 0;
    if (resid) *resid = T(0);
    return;
  }
  W.init(n, m, k);
  double* zx = W.v.data();
  double* rx = zx + n;
  double* px = rx + n;
  double* qx = px + n;
  double* dx = qx + n;
  double* zy = dx + n;
  double* ry = zy + m;
  double* py = ry + m;
  double* qy = py + m;
  double* dy = qy + m;
  // S^T by a counting sort (rows in increasing order within a column)
  int64_t* tp = W.tptr.data();
  int32_t* tr = W.trow.data();
  double* tv = W.tval.data();
  std::fill(tp, tp + m + 1, int64_t(0));
  for (int64_t e = 0; e < n * k; ++e) ++tp[cols[e] + 1];
  for (int64_t j = 0; j < m; ++j) tp[j + 1] += tp[j];
  {
    std::vector<int64_t> pos(tp, tp + m);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t e = 0; e < k; ++e) {
        const int64_t j = cols[i * k + e];
        const int64_t at = pos[j]++;
        tr[at] = static_cast<int32_t>(i);
        tv[at] = static_cast<double>(vals[i * k + e]);
      }
  }
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(r[i]) + shift;
    dx[i] = d > 0 ? d : 1.0;
    zx[i] = static_cast<double>(zx_io[i]);
  }
  for (int64_t j = 0; j < m; ++j) {
    const double d = static_cast<double>(c[j]) + shift;
    dy[j] = d > 0 ? d : 1.0;
    zy[j] = static_cast<double>(zy_io[j]);
  }
  // q = H p; returns p . q
  auto apply = [&](const double* ux, const double* uy, double* ox, double* oy) {
    double pq = 0;
#pragma omp parallel num_threads(nth)
    {
#pragma omp for schedule(static) reduction(+ : pq) nowait
      for (int64_t i = 0; i < n; ++i) {
        const int32_t* ci = cols + i * k;
        const T* vi = vals + i * k;
        double s = 0;
        for (int64_t e = 0; e < k; ++e) s += static_cast<double>(vi[e]) * uy[ci[e]];
        const double x = ux[i];
        ox[i] = (static_cast<double>(r[i]) * x + s) + shift * x;
        pq += x * ox[i];
      }
#pragma omp for schedule(static) reduction(+ : pq)
      for (int64_t j = 0; j < m; ++j) {
        double s = 0;
        for (int64_t e = tp[j]; e < tp[j + 1]; ++e) s += tv[e] * ux[tr[e]];
        const double y = uy[j];
        oy[j] = (s + static_cast<double>(c[j]) * y) + shift * y;
        pq += y * oy[j];
      }
    }
    return pq;
  };
  apply(zx, zy, qx, qy);
  double rn2 = 0, rz = 0;
  for (int64_t i = 0; i < n; ++i) {
    rx[i] = static_cast<double>(rhs_x[i]) - qx[i];
    px[i] = rx[i] / dx[i];
    rz += rx[i] * px[i];
    rn2 += rx[i] * rx[i];
  }
  for (int64_t j = 0; j < m; ++j) {
    ry[j] = static_cast<double>(rhs_y[j]) - qy[j];
    py[j] = ry[j] / dy[j];
    rz += ry[j] * py[j];
    rn2 += ry[j] * ry[j];
  }
  double rn = std::sqrt(rn2);
  int32_t it = 0;
  while (rn > tol * bn && it < max_iter) {
    const double pq = apply(px, py, qx, qy);
    if (!(pq > 0)) break;
    const double alpha = rz / pq;
    double rn2n = 0, rzn = 0;
#pragma omp parallel num_threads(nth)
    {
#pragma omp for schedule(static) reduction(+ : rn2n, rzn) nowait
      for (int64_t i = 0; i < n; ++i) {
        zx[i] += alpha * px[i];
        rx[i] -= alpha * qx[i];
        rn2n += rx[i] * rx[i];
        rzn += rx[i] * (rx[i] / dx[i]);
      }
#pragma omp for schedule(static) reduction(+ : rn2n, rzn)
      for (int64_t j = 0; j < m; ++j) {
        zy[j] += alpha * py[j];
        ry[j] -= alpha * qy[j];
        rn2n += ry[j] * ry[j];
        rzn += ry[j] * (ry[j] / dy[j]);
      }
    }
    ++it;
    rn = std::sqrt(rn2n);
    const double beta = rzn / rz;
    rz = rzn;
#pragma omp parallel for num_threads(nth) schedule(static)
    for (int64_t i = 0; i < n; ++i) px[i] = rx[i] / dx[i] + beta * px[i];
#pragma omp parallel for num_threads(nth) schedule(static)
    for (int64_t j = 0; j < m; ++j) py[j] = ry[j] / dy[j] + beta * py[j];
  }
  for (int64_t i = 0; i < n; ++i) zx_io[i] = static_cast<T>(zx[i]);
  for (int64_t j = 0; j < m; ++j) zy_io[j] = static_cast<T>(zy[j]);
  if (iters) *iters = it;
  if (resid) *resid = static_cast<T>(rn / bn);
}

template <typename T>
void cg_t(int64_t batch, int64_t n, int64_t m, int64_t k, const int32_t* cols, const T* vals, const T* r, const T* c,
          double shift, const T* rhs_x, const T* rhs_y, T* zx, T* zy, double tol, int32_t max_iter, int32_t* iters,
          T* resid, int nt) {
  if (batch == 0) return;
  const bool by_problem = batch > 1 && nt > 1;
  const int nth = by_problem ? static_cast<int>(std::min<int64_t>(nt, batch)) : 1;
  std::vector<CgWork> works(static_cast<size_t>(nth));
#pragma omp parallel for num_threads(nth) schedule(dynamic) if (by_problem)
  for (int64_t bb = 0; bb < batch; ++bb) {
    CgWork& W = works[static_cast<size_t>(omp_get_thread_num())];
    cg_one<T>(n, m, k, cols + bb * n * k, vals + bb * n * k, r + bb * n, c + bb * m, shift, rhs_x + bb * n,
              rhs_y + bb * m, zx + bb * n, zy + bb * m, tol, max_iter, iters ? iters + bb : nullptr,
              resid ? resid + bb : nullptr, W, by_problem ? 1 : nt);
  }
}

// ---------------------------------------------------------------------------------------------
// points_grad: dx by rows (each thread owns rows, streams the columns), dy by strips of columns (each
// thread owns a strip, streams the rows; accumulators dim x strip width).  W_ij = P_ij (s + u_i + v_j).
template <typename T>
void points_grad_t(const kk_ot_cost& cost, int64_t batch, int64_t n, int64_t m, double reg, const T* f, const T* g,
                   const T* scale, const T* u, const T* v, T* dx, T* dy, int nt) {
  if (batch == 0 || n == 0 || m == 0) {
    if (dx) std::fill(dx, dx + batch * n * cost.dim, T(0));
    if (dy) std::fill(dy, dy + batch * m * cost.dim, T(0));
    return;
  }
  const double ireg = 1.0 / reg;
  const CostRows<T> cr(cost, batch, m, nt);
  const int D = cost.dim;
  const int kind = cost.kind;
  const double p = cost.p;
  // W_ij * (the scalar factor of dC/dx_i for EUCLIDEAN_POW; 2 for SQEUCLIDEAN; 1 for MINKOWSKI) over
  // the columns [j0, j0 + len) of row i, into wt.
  auto weights = [&](int64_t bb, int64_t i, int64_t j0, int64_t len, double* cbuf, double* wt) {
    const double fi = static_cast<double>(f[bb * n + i]);
    const double* __restrict__ cc = cr.row(bb, i, j0, len, cbuf);
    const T* __restrict__ gj = g + bb * m + j0;
    for (int64_t j = 0; j < len; ++j) wt[j] = qdiv((fi + static_cast<double>(gj[j])) - cc[j], reg, ireg);
    exp_inplace(wt, len);
    const double wi = (scale ? static_cast<double>(scale[bb]) : 1.0) + (u ? static_cast<double>(u[bb * n + i]) : 0.0);
    if (v) {
      const T* vj = v + bb * m + j0;
      for (int64_t j = 0; j < len; ++j) wt[j] *= wi + static_cast<double>(vj[j]);
    } else {
      for (int64_t j = 0; j < len; ++j) wt[j] *= wi;
    }
    if (kind == KK_OT_COST_SQEUCLIDEAN || (kind == KK_OT_COST_EUCLIDEAN_POW && p == 2.0)) {
      for (int64_t j = 0; j < len; ++j) wt[j] *= 2.0;
    } else if (kind == KK_OT_COST_EUCLIDEAN_POW) {
      // dC/dx = p d2^(p/2 - 1) diff (0 where d2 = 0); d2 recomputed from C = d2^(p/2)
      const T* xi = cr.xrow(bb, i);
      const double h = p / 2 - 1;
      for (int64_t j = 0; j < len; ++j) {
        double d2 = 0;
        for (int t = 0; t < D; ++t) {
          const double d = static_cast<double>(xi[t]) - cr.ycol(bb, t)[j0 + j];
          d2 += d * d;
        }
        wt[j] = d2 > 0 ? wt[j] * (p * std::pow(d2, h)) : 0.0;
      }
    }
  };
  // the term of coordinate t: MINKOWSKI needs p |diff|^(p-1) sign(diff) per coordinate
  auto coord = [&](double diff) {
    if (kind != KK_OT_COST_MINKOWSKI_POW) return diff;
    const double ad = std::fabs(diff);
    if (!(ad > 0)) return 0.0;
    const double s = diff > 0 ? 1.0 : -1.0;
    return p == 1.0 ? p * s : (p == 2.0 ? p * ad * s : p * std::pow(ad, p - 1) * s);
  };
  const int64_t tw = std::min<int64_t>(kTW, m);
  if (dx) {
    Work work(nt, 2 * tw + D);
#pragma omp parallel num_threads(nt)
    {
      double* cbuf = work.get();
      double* wt = cbuf + tw;
      double* acc = wt + tw;
#pragma omp for schedule(static)
      for (int64_t q = 0; q < batch * n; ++q) {
        const int64_t bb = q / n, i = q % n;
        const T* xi = cr.xrow(bb, i);
        std::fill(acc, acc + D, 0.0);
        for (int64_t j0 = 0; j0 < m; j0 += tw) {
          const int64_t len = std::min(tw, m - j0);
          weights(bb, i, j0, len, cbuf, wt);
          for (int t = 0; t < D; ++t) {
            const double xt = static_cast<double>(xi[t]);
            const double* __restrict__ yr = cr.ycol(bb, t) + j0;
            double s = 0;
            if (kind == KK_OT_COST_MINKOWSKI_POW)
              for (int64_t j = 0; j < len; ++j) s += wt[j] * coord(xt - yr[j]);
            else
              for (int64_t j = 0; j < len; ++j) s += wt[j] * (xt - yr[j]);
            acc[t] += s;
          }
        }
        for (int t = 0; t < D; ++t) dx[q * D + t] = static_cast<T>(acc[t]);
      }
    }
  }
  if (dy) {
    const int64_t sw = std::max<int64_t>(8, std::min<int64_t>(kSW, 32768 / D));
    const int64_t nstrip = (m + sw - 1) / sw;
    Work work(nt, 2 * sw + D * sw);
#pragma omp parallel num_threads(nt)
    {
      double* cbuf = work.get();
      double* wt = cbuf + sw;
      double* acc = wt + sw;  // D x sw
#pragma omp for schedule(static)
      for (int64_t it = 0; it < batch * nstrip; ++it) {
        const int64_t bb = it / nstrip, j0 = (it % nstrip) * sw, len = std::min(sw, m - j0);
        std::fill(acc, acc + D * sw, 0.0);
        for (int64_t i = 0; i < n; ++i) {
          weights(bb, i, j0, len, cbuf, wt);
          const T* xi = cr.xrow(bb, i);
          for (int t = 0; t < D; ++t) {
            const double xt = static_cast<double>(xi[t]);
            const double* __restrict__ yr = cr.ycol(bb, t) + j0;
            double* __restrict__ at = acc + t * sw;
            if (kind == KK_OT_COST_MINKOWSKI_POW)
              for (int64_t j = 0; j < len; ++j) at[j] += wt[j] * coord(xt - yr[j]);
            else
              for (int64_t j = 0; j < len; ++j) at[j] += wt[j] * (xt - yr[j]);
          }
        }
        for (int64_t j = 0; j < len; ++j)
          for (int t = 0; t < D; ++t) dy[(bb * m + j0 + j) * D + t] = static_cast<T>(-acc[t * sw + j]);
      }
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points of this ISA (dtype already checked: float32 or float64).

kk_status ot_sinkhorn_step(kk_dtype dtype, const kk_ot_cost& cost, int64_t batch, int64_t n, int64_t m, int axis,
                           double reg, const void* w, const void* other, const void* pot, void* pot_new, void* err,
                           int err_norm, int nt) {
  if (dtype == KK_FLOAT32)
    sinkhorn_step_t<float>(cost, batch, n, m, axis, reg, w, other, pot, pot_new, err, err_norm, nt);
  else
    sinkhorn_step_t<double>(cost, batch, n, m, axis, reg, w, other, pot, pot_new, err, err_norm, nt);
  return KK_OK;
}

template <typename T>
static kk_status marginals_d(const kk_ot_cost& cost, int64_t batch, int64_t n, int64_t m, double reg, const void* f,
                             const void* g, const void* a, const void* b, const void* wr, const void* wc, void* r,
                             void* c, void* obj, int nt) {
  marginals_t<T>(cost, batch, n, m, reg, static_cast<const T*>(f), static_cast<const T*>(g),
                 static_cast<const T*>(a), static_cast<const T*>(b), static_cast<const T*>(wr),
                 static_cast<const T*>(wc), static_cast<T*>(r), static_cast<T*>(c), static_cast<T*>(obj), nt);
  return KK_OK;
}

kk_status ot_marginals(kk_dtype dtype, const kk_ot_cost& cost, int64_t batch, int64_t n, int64_t m, double reg,
                       const void* f, const void* g, const void* a, const void* b, const void* wr, const void* wc,
                       void* r, void* c, void* obj, int nt) {
  return dtype == KK_FLOAT32 ? marginals_d<float>(cost, batch, n, m, reg, f, g, a, b, wr, wc, r, c, obj, nt)
                             : marginals_d<double>(cost, batch, n, m, reg, f, g, a, b, wr, wc, r, c, obj, nt);
}

kk_status ot_plan(kk_dtype dtype, const kk_ot_cost& cost, int64_t batch, int64_t n, int64_t m, double reg,
                  const void* f, const void* g, void* plan, int64_t ldp, int nt) {
  if (dtype == KK_FLOAT32)
    plan_t<float>(cost, batch, n, m, reg, static_cast<const float*>(f), static_cast<const float*>(g),
                  static_cast<float*>(plan), ldp, nt);
  else
    plan_t<double>(cost, batch, n, m, reg, static_cast<const double*>(f), static_cast<const double*>(g),
                   static_cast<double*>(plan), ldp, nt);
  return KK_OK;
}

kk_status ot_sparsify(kk_dtype dtype, const kk_ot_cost& cost, int64_t batch, int64_t n, int64_t m, int64_t k,
                      double reg, const void* f, const void* g, int32_t* cols, void* vals, int nt) {
  if (dtype == KK_FLOAT32)
    sparsify_t<float>(cost, batch, n, m, k, reg, static_cast<const float*>(f), static_cast<const float*>(g), cols,
                      static_cast<float*>(vals), nt);
  else
    sparsify_t<double>(cost, batch, n, m, k, reg, static_cast<const double*>(f), static_cast<const double*>(g),
                       cols, static_cast<double*>(vals), nt);
  return KK_OK;
}

kk_status ot_hvp(kk_dtype dtype, int64_t batch, int64_t n, int64_t m, int64_t k, const int32_t* cols,
                 const void* vals, const void* r, const void* c, double shift, const void* vx, const void* vy,
                 void* yx, void* yy, int nt) {
  if (dtype == KK_FLOAT32)
    hvp_t<float>(batch, n, m, k, cols, static_cast<const float*>(vals), static_cast<const float*>(r),
                 static_cast<const float*>(c), shift, static_cast<const float*>(vx), static_cast<const float*>(vy),
                 static_cast<float*>(yx), static_cast<float*>(yy), nt);
  else
    hvp_t<double>(batch, n, m, k, cols, static_cast<const double*>(vals), static_cast<const double*>(r),
                  static_cast<const double*>(c), shift, static_cast<const double*>(vx),
                  static_cast<const double*>(vy), static_cast<double*>(yx), static_cast<double*>(yy), nt);
  return KK_OK;
}

kk_status ot_cg(kk_dtype dtype, int64_t batch, int64_t n, int64_t m, int64_t k, const int32_t* cols,
                const void* vals, const void* r, const void* c, double shift, const void* rhs_x, const void* rhs_y,
                void* zx, void* zy, double tol, int32_t max_iter, int32_t* iters, void* resid, int nt) {
  if (dtype == KK_FLOAT32)
    cg_t<float>(batch, n, m, k, cols, static_cast<const float*>(vals), static_cast<const float*>(r),
                static_cast<const float*>(c), shift, static_cast<const float*>(rhs_x),
                static_cast<const float*>(rhs_y), static_cast<float*>(zx), static_cast<float*>(zy), tol, max_iter,
                iters, static_cast<float*>(resid), nt);
  else
    cg_t<double>(batch, n, m, k, cols, static_cast<const double*>(vals), static_cast<const double*>(r),
                 static_cast<const double*>(c), shift, static_cast<const double*>(rhs_x),
                 static_cast<const double*>(rhs_y), static_cast<double*>(zx), static_cast<double*>(zy), tol,
                 max_iter, iters, static_cast<double*>(resid), nt);
  return KK_OK;
}

kk_status ot_points_grad(kk_dtype dtype, const kk_ot_cost& cost, int64_t batch, int64_t n, int64_t m, double reg,
                         const void* f, const void* g, const void* scale, const void* u, const void* v, void* dx,
                         void* dy, int nt) {
  if (dtype == KK_FLOAT32)
    points_grad_t<float>(cost, batch, n, m, reg, static_cast<const float*>(f), static_cast<const float*>(g),
                         static_cast<const float*>(scale), static_cast<const float*>(u),
                         static_cast<const float*>(v), static_cast<float*>(dx), static_cast<float*>(dy), nt);
  else
    points_grad_t<double>(cost, batch, n, m, reg, static_cast<const double*>(f), static_cast<const double*>(g),
                          static_cast<const double*>(scale), static_cast<const double*>(u),
                          static_cast<const double*>(v), static_cast<double*>(dx), static_cast<double*>(dy), nt);
  return KK_OK;
}

}  // namespace KK_ISA_NS
}  // namespace kk
