/* A C99 program using libkernelkit's public header for the rbf family: every CPU entry point
 * (kk_rbf_grid_layout, kk_rbf_grid_build_cpu, kk_rbf_knn_cpu, kk_rbf_features_fwd_cpu / _bwd_cpu)
 * against naive references: the grid's invariants (header, cell_start, order a permutation stable
 * inside each cell, coordinates in sorted order), knn bit for bit against a brute force written in the
 * header's order (this file is C99, so GCC does not contract a*b+c into FMAs), clustered / duplicated
 * centres (ties), queries outside the box, k > m, a NaN query; the features forward and backward
 * against a naive double loop for every kernel, full and diagonal shapes, normalize 0/1/2, omegas or
 * none, float32 / float64 and float16 / bfloat16 weights, padded rows, missing neighbours, a NaN query;
 * the float32 sine against double sin over |t| <= 2^17 (|err| <= 2^-21, rbf.h), through a one-RBF
 * "nlin" field whose phi is exactly 1; and the error paths (status and a message naming the argument).
 * Outputs are NaN-poisoned before each call.  Built and run by tests/test_rbf_cabi.py and by .ci/run
 * under ASan+UBSan for every ISA variant.  Prints "ok <version> <isa> <count>" and exits 0 on success. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernelkit/kernelkit.h"

static int g_checks = 0;
#define FAIL(...)                       \
  do {                                  \
    printf("FAIL line %d: ", __LINE__); \
    printf(__VA_ARGS__);                \
    printf("\n");                       \
    exit(1);                            \
  } while (0)
#define CHECK(cond, ...)            \
  do {                              \
    ++g_checks;                     \
    if (!(cond)) FAIL(__VA_ARGS__); \
  } while (0)
#define EXPECT_ERR(call, status, needle)                                                                      \
  do {                                                                                                        \
    kk_status st_ = (call);                                                                                   \
    CHECK(st_ == (status), "%s: status %d, expected %d (%s)", #call, (int)st_, (int)(status), kk_last_error()); \
    CHECK(strstr(kk_last_error(), (needle)) != NULL, "%s: message '%s' lacks '%s'", #call, kk_last_error(),     \
          (needle));                                                                                          \
  } while (0)
#define EXPECT_OK(call)                                                                   \
  do {                                                                                    \
    kk_status st_ = (call);                                                               \
    CHECK(st_ == KK_OK, "%s: status %d (%s)", #call, (int)st_, kk_last_error());          \
  } while (0)

static uint64_t g_rng = 0x2545f4914f6cdd1dull;
static uint64_t rnd_u64(void) {
  uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
static double rnd(void) { return (double)(rnd_u64() >> 11) / 9007199254740992.0; } /* [0, 1) */
static double rnds(void) { return 2.0 * rnd() - 1.0; }

static void* xmalloc(size_t n) {
  void* p = malloc(n ? n : 1);
  if (!p) FAIL("out of memory (%zu bytes)", n);
  return p;
}

/* ---- typed buffers ------------------------------------------------------------------------------ */
static size_t esz(kk_dtype dt) { return dt == KK_FLOAT64 ? 8 : dt == KK_FLOAT32 ? 4 : 2; }
static uint16_t f2bf(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
static float h2f(uint16_t h) { /* float16 -> float */
  const int e = (h >> 10) & 0x1f, mnt = h & 0x3ff;
  if (e == 31) return mnt ? NAN : ((h & 0x8000) ? -INFINITY : INFINITY);
  const float v = e == 0 ? ldexpf((float)mnt, -24) : ldexpf((float)(mnt | 0x400), e - 25);
  return (h & 0x8000) ? -v : v;
}
static uint16_t f2h(float f) { /* float -> float16, round to nearest even (finite values) */
  const uint16_t sign = f < 0 ? 0x8000 : 0;
  const double a = fabs((double)f);
  if (a < ldexp(1.0, -14)) return (uint16_t)(sign | (uint16_t)rint(a * ldexp(1.0, 24)));
  int ex;
  const double fr = frexp(a, &ex); /* a = fr 2^ex, fr in [0.5, 1) */
  double mnt = rint(fr * 2048.0);
  if (mnt == 2048.0) mnt = 1024.0, ++ex;
  const int E = ex - 1 + 15;
  if (E >= 31) return (uint16_t)(sign | 0x7c00);
  return (uint16_t)(sign | (E << 10) | ((int)mnt - 1024));
}
static double get(const void* p, kk_dtype dt, int64_t i) {
  if (dt == KK_FLOAT64) return ((const double*)p)[i];
  if (dt == KK_FLOAT32) return (double)((const float*)p)[i];
  if (dt == KK_FLOAT16) return (double)h2f(((const uint16_t*)p)[i]);
  uint32_t u = (uint32_t)((const uint16_t*)p)[i] << 16;
  float f;
  memcpy(&f, &u, 4);
  return (double)f;
}
static void set(void* p, kk_dtype dt, int64_t i, double v) {
  if (dt == KK_FLOAT64) ((double*)p)[i] = v;
  else if (dt == KK_FLOAT32) ((float*)p)[i] = (float)v;
  else if (dt == KK_FLOAT16) ((uint16_t*)p)[i] = f2h((float)v);
  else ((uint16_t*)p)[i] = f2bf((float)v);
}
static void* poisoned(int64_t n, kk_dtype dt) {
  void* p = xmalloc((size_t)n * esz(dt));
  for (int64_t i = 0; i < n; ++i) {
    if (dt == KK_FLOAT64) ((double*)p)[i] = NAN;
    else if (dt == KK_FLOAT32) ((float*)p)[i] = NAN;
    else ((uint16_t*)p)[i] = dt == KK_FLOAT16 ? 0x7e00 : 0x7fc0;
  }
  return p;
}

/* ---- grid and knn ------------------------------------------------------------------------------- */
static double dist2_f(const float* x, const float* c, int dim) {
  float a = x[0] - c[0], b = x[1] - c[1];
  float d = a * a;
  float bb = b * b;
  d = d + bb;
  if (dim == 3) {
    float e = x[2] - c[2];
    float ee = e * e;
    d = d + ee;
  }
  return d;
}
static double dist2_d(const double* x, const double* c, int dim) {
  double a = x[0] - c[0], b = x[1] - c[1];
  double d = a * a;
  double bb = b * b;
  d = d + bb;
  if (dim == 3) {
    double e = x[2] - c[2];
    double ee = e * e;
    d = d + ee;
  }
  return d;
}

static void test_knn(kk_dtype dt, int dim, int64_t m, int clustered, int k, int nt) {
  const int64_t n = 257, ldx = dim + 1;
  void* c = xmalloc((size_t)(m * dim) * esz(dt));
  for (int64_t i = 0; i < m; ++i)
    for (int d = 0; d < dim; ++d) {
      double v = clustered ? 0.3 + 0.02 * rnds() + 0.4 * (double)(i % 3) : rnd();
      if (clustered && i % 7 == 0 && i > 0) v = get(c, dt, (i - 1) * dim + d); /* duplicates: ties */
      set(c, dt, i * dim + d, v);
    }
  kk_rbf_grid_layout_t l;
  EXPECT_OK(kk_rbf_grid_layout(dt, dim, m, &l));
  CHECK(l.bytes >= l.coords_off + (int64_t)(m * dim * esz(dt)) && l.bytes % 8 == 0, "layout bytes");
  int64_t* gbuf = (int64_t*)xmalloc((size_t)l.bytes + 64);
  memset(gbuf, 0xab, (size_t)l.bytes + 64);
  EXPECT_OK(kk_rbf_grid_build_cpu(dt, dim, m, c, dim, gbuf, l.bytes + 64, nt));
  const int64_t* h = gbuf;
  CHECK(h[0] == dim && h[1] == m && h[6] == (int64_t)dt && h[7] == l.cells_max && h[8] == 0, "grid header");
  CHECK(h[2] == h[3] * h[4] * h[5] && h[2] <= l.cells_max && (dim == 3 || h[5] == 1), "grid resolution");
  const char* base = (const char*)gbuf;
  const int64_t* st = (const int64_t*)(base + l.cell_start_off);
  const int64_t* order = (const int64_t*)(base + l.order_off);
  CHECK(st[0] == 0 && st[h[2]] == m && st[l.cells_max] == m, "cell_start ends");
  char* seen = (char*)xmalloc((size_t)m);
  memset(seen, 0, (size_t)m);
  for (int64_t cc = 0; cc < h[2]; ++cc) {
    CHECK(st[cc] <= st[cc + 1], "cell_start monotone");
    for (int64_t p = st[cc]; p < st[cc + 1]; ++p) {
      CHECK(order[p] >= 0 && order[p] < m && !seen[order[p]], "order is a permutation");
      seen[order[p]] = 1;
      if (p > st[cc]) CHECK(order[p] > order[p - 1], "stable inside a cell");
      for (int d = 0; d < dim; ++d)
        CHECK(get(base + l.coords_off, dt, p * dim + d) == get(c, dt, order[p] * dim + d), "sorted coords");
    }
  }
  free(seen);
  CHECK(((const unsigned char*)gbuf)[l.bytes] == 0xab, "wrote past the layout's bytes");

  void* x = xmalloc((size_t)(n * ldx) * esz(dt));
  for (int64_t q = 0; q < n; ++q)
    for (int d = 0; d < ldx; ++d) set(x, dt, q * ldx + d, 1.6 * rnd() - 0.3); /* some outside the box */
  if (m > 0) for (int d = 0; d < dim; ++d) set(x, dt, 5 * ldx + d, get(c, dt, d)); /* exactly on a centre */
  set(x, dt, 7 * ldx + 1, NAN);
  int64_t* idx = (int64_t*)xmalloc((size_t)(n * k) * 8);
  for (int64_t e = 0; e < n * k; ++e) idx[e] = -7;
  void* d2 = poisoned(n * k, dt);
  EXPECT_OK(kk_rbf_knn_cpu(dt, dim, n, x, ldx, gbuf, k, idx, d2, nt));
  /* brute force: the k smallest (dist2, index) by selection */
  double* bd = (double*)xmalloc((size_t)(m ? m : 1) * 8);
  for (int64_t q = 0; q < n; ++q) {
    if (q == 7) {
      for (int s = 0; s < k; ++s) CHECK(idx[q * k + s] == -1 && isnan(get(d2, dt, q * k + s)), "NaN query");
      continue;
    }
    for (int64_t i = 0; i < m; ++i)
      bd[i] = dt == KK_FLOAT32 ? dist2_f((const float*)x + q * ldx, (const float*)c + i * dim, dim)
                               : dist2_d((const double*)x + q * ldx, (const double*)c + i * dim, dim);
    double prev = -1;
    int64_t previ = -1;
    for (int s = 0; s < k; ++s) {
      int64_t bi = -1;
      for (int64_t i = 0; i < m; ++i) {
        const int after = bd[i] > prev || (bd[i] == prev && i > previ);
        if (after && (bi < 0 || bd[i] < bd[bi])) bi = i;
      }
      if (bi < 0) {
        CHECK(idx[q * k + s] == -1 && isinf(get(d2, dt, q * k + s)), "k > m padding (q %lld slot %d)", (long long)q, s);
        continue;
      }
      CHECK(idx[q * k + s] == bi, "knn idx (dt %d dim %d m %lld k %d q %lld slot %d): %lld vs %lld", (int)dt, dim,
            (long long)m, k, (long long)q, s, (long long)idx[q * k + s], (long long)bi);
      CHECK(get(d2, dt, q * k + s) == bd[bi], "knn dist2 bit-exact");
      prev = bd[bi];
      previ = bi;
    }
  }
  free(bd);
  free(idx);
  free(d2);
  free(x);
  free(gbuf);
  free(c);
}

/* ---- features: naive double reference ------------------------------------------------------------ */
typedef struct {
  int dim, kernel, full, k, norm;
  int64_t n, m, C, ldx, ldw, ldo;
  double *x, *c, *s, *w, *om, *g; /* double copies of what the library sees (after rounding) */
  int64_t* idx;
} Prob;

static double phi_d(const Prob* P, const double* o, const double* A) {
  const int dim = P->dim;
  if (P->kernel == 2) {
    double p = 1;
    for (int d = 0; d < dim; ++d) {
      double h = 1 - fabs(o[d]) * A[d];
      p *= h < 0 ? 0 : h > 1 ? 1 : h;
    }
    return p;
  }
  double q = 0;
  if (P->full)
    for (int a = 0; a < dim; ++a)
      for (int b = 0; b < dim; ++b) q += o[a] * A[a * dim + b] * o[b];
  else
    for (int d = 0; d < dim; ++d) q += A[d] * o[d] * o[d];
  return P->kernel == 0 ? 1 / (1 + q) : exp(-0.5 * q);
}

/* out (n x C) and, when g is set, the five gradients, all in double. */
static void naive(const Prob* P, double* out, double* dx, double* dc, double* ds, double* dw, double* dom) {
  const int dim = P->dim, k = P->k, sw = P->full ? dim * dim : dim;
  const int64_t C = P->C;
  if (dx) memset(dx, 0, sizeof(double) * P->n * dim);
  if (dc) memset(dc, 0, sizeof(double) * P->m * dim);
  if (ds) memset(ds, 0, sizeof(double) * P->m * sw);
  if (dw) memset(dw, 0, sizeof(double) * P->m * C);
  if (dom) memset(dom, 0, sizeof(double) * C);
  for (int64_t q = 0; q < P->n; ++q) {
    const double* xr = P->x + q * P->ldx;
    int fin = 1;
    for (int d = 0; d < dim; ++d) fin = fin && isfinite(xr[d]);
    if (!fin) {
      for (int64_t j = 0; j < C; ++j) out[q * C + j] = NAN;
      continue;
    }
    double phi[32], ph[32], a[32], o[32][3], sum = 0;
    for (int s = 0; s < k; ++s) {
      const int64_t i = P->idx[q * k + s];
      phi[s] = 0;
      if (i < 0) continue;
      for (int d = 0; d < dim; ++d) o[s][d] = xr[d] - P->c[i * dim + d];
      phi[s] = phi_d(P, o[s], P->s + i * sw);
      sum += phi[s];
    }
    const double den = P->norm ? sum + 1e-8 : 1;
    for (int s = 0; s < k; ++s) ph[s] = phi[s] / den;
    for (int64_t j = 0; j < C; ++j) {
      double acc = 0;
      for (int s = 0; s < k; ++s) {
        const int64_t i = P->idx[q * k + s];
        if (i >= 0) acc += P->w[i * C + j] * (P->om ? sin(P->om[j] * ph[s]) : ph[s]);
      }
      out[q * C + j] = acc;
    }
    if (!P->g) continue;
    const double* g = P->g + q * C;
    double corr = 0;
    for (int s = 0; s < k; ++s) {
      const int64_t i = P->idx[q * k + s];
      a[s] = 0;
      if (i < 0) continue;
      for (int64_t j = 0; j < C; ++j) {
        const double t = P->om ? P->om[j] * ph[s] : 0;
        a[s] += g[j] * P->w[i * C + j] * (P->om ? P->om[j] * cos(t) : 1.0);
        if (dw) dw[i * C + j] += g[j] * (P->om ? sin(t) : ph[s]);
        if (dom && P->om) dom[j] += g[j] * P->w[i * C + j] * ph[s] * cos(t);
      }
      corr += a[s] * ph[s];
    }
    for (int s = 0; s < k; ++s) {
      const int64_t i = P->idx[q * k + s];
      if (i < 0) continue;
      const double sd = P->norm == 0 ? a[s] : P->norm == 1 ? a[s] / den : (a[s] - corr) / den;
      const double* A = P->s + i * sw;
      double go[3] = {0, 0, 0}, gA[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
      if (P->kernel == 2) {
        double hh[3], cl[3];
        for (int d = 0; d < dim; ++d) {
          hh[d] = 1 - fabs(o[s][d]) * A[d];
          cl[d] = hh[d] < 0 ? 0 : hh[d] > 1 ? 1 : hh[d];
        }
        for (int d = 0; d < dim; ++d) {
          if (hh[d] < 0 || hh[d] > 1) continue;
          double oth = 1;
          for (int e = 0; e < dim; ++e) if (e != d) oth *= cl[e];
          const double sg = o[s][d] > 0 ? 1 : o[s][d] < 0 ? -1 : 0;
          go[d] = -sd * oth * A[d] * sg;
          gA[d] = -sd * oth * fabs(o[s][d]);
        }
      } else {
        const double dq = P->kernel == 0 ? -phi[s] * phi[s] * sd : -0.5 * phi[s] * sd;
        for (int a2 = 0; a2 < dim; ++a2) {
          if (P->full) {
            for (int b = 0; b < dim; ++b) {
              go[a2] += dq * (A[a2 * dim + b] + A[b * dim + a2]) * o[s][b];
              gA[a2 * dim + b] = dq * o[s][a2] * o[s][b];
            }
          } else {
            go[a2] = dq * 2 * A[a2] * o[s][a2];
            gA[a2] = dq * o[s][a2] * o[s][a2];
          }
        }
      }
      for (int d = 0; d < dim; ++d) {
        if (dx) dx[q * dim + d] += go[d];
        if (dc) dc[i * dim + d] -= go[d];
      }
      if (ds) for (int e = 0; e < sw; ++e) ds[i * sw + e] += gA[e];
    }
  }
}

/* relative Frobenius error of a (dtype dt, rows x cols at stride ld) against ref (rows x cols), skipping
 * rows whose ref is NaN (those must be NaN in a). */
static double relerr(const void* a, kk_dtype dt, int64_t ld, const double* ref, int64_t rows, int64_t cols) {
  double num = 0, den = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) {
      const double v = get(a, dt, r * ld + j), t = ref[r * cols + j];
      if (isnan(t)) {
        if (!isnan(v)) return 1e300;
        continue;
      }
      num += (v - t) * (v - t);
      den += t * t;
    }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

static void test_features(kk_dtype dt, kk_dtype wdt, int dim, int kernel, int full, int norm, int use_om, int nt) {
  Prob P;
  P.dim = dim, P.kernel = kernel, P.full = full, P.norm = norm, P.k = 6;
  P.n = 70, P.m = 23, P.C = 13, P.ldx = dim + 2, P.ldw = P.C + 3, P.ldo = P.C + 1;
  const int sw = full ? dim * dim : dim, k = P.k;
  const int64_t n = P.n, m = P.m, C = P.C;
  void* x = xmalloc((size_t)(n * P.ldx) * esz(dt));
  void* c = xmalloc((size_t)(m * dim) * esz(dt));
  void* s = xmalloc((size_t)(m * sw) * esz(dt));
  void* w = xmalloc((size_t)(m * P.ldw) * esz(wdt));
  void* om = xmalloc((size_t)C * esz(dt));
  void* g = xmalloc((size_t)(n * P.ldo) * esz(wdt));
  P.x = (double*)xmalloc(sizeof(double) * n * P.ldx);
  P.c = (double*)xmalloc(sizeof(double) * m * dim);
  P.s = (double*)xmalloc(sizeof(double) * m * sw);
  P.w = (double*)xmalloc(sizeof(double) * m * C);
  P.om = use_om ? (double*)xmalloc(sizeof(double) * C) : NULL;
  P.g = (double*)xmalloc(sizeof(double) * n * C);
  P.idx = (int64_t*)xmalloc(8 * (size_t)(n * k));
  for (int64_t e = 0; e < n * P.ldx; ++e) set(x, dt, e, rnd());
  set(x, dt, 9 * P.ldx, NAN);
  for (int64_t e = 0; e < m * dim; ++e) set(c, dt, e, rnd());
  for (int64_t i = 0; i < m; ++i) {
    if (full) {
      double B[9], A[9];
      for (int e = 0; e < dim * dim; ++e) B[e] = rnds();
      for (int a = 0; a < dim; ++a)
        for (int b = 0; b < dim; ++b) {
          A[a * dim + b] = a == b ? 2.0 : 0.0;
          for (int t = 0; t < dim; ++t) A[a * dim + b] += B[a * dim + t] * B[b * dim + t];
        }
      for (int e = 0; e < dim * dim; ++e) set(s, dt, i * sw + e, 4 * A[e]);
    } else {
      for (int d = 0; d < dim; ++d) set(s, dt, i * sw + d, kernel == 2 ? 1 + 2 * rnd() : 1 + 10 * rnd());
    }
  }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < P.ldw; ++j) set(w, wdt, i * P.ldw + j, rnds());
  for (int64_t j = 0; j < C; ++j) set(om, dt, j, pow(2.0, -3 + 15.0 * (double)j / (double)(C - 1)));
  for (int64_t q = 0; q < n; ++q)
    for (int64_t j = 0; j < P.ldo; ++j) set(g, wdt, q * P.ldo + j, rnds());
  for (int64_t e = 0; e < n * k; ++e) P.idx[e] = (int64_t)(rnd_u64() % (uint64_t)m);
  P.idx[3 * k + 2] = -1;
  for (int s2 = 0; s2 < k; ++s2) P.idx[4 * k + s2] = -1; /* no neighbour at all */
  for (int64_t e = 0; e < n * P.ldx; ++e) P.x[e] = get(x, dt, e);
  for (int64_t e = 0; e < m * dim; ++e) P.c[e] = get(c, dt, e);
  for (int64_t e = 0; e < m * sw; ++e) P.s[e] = get(s, dt, e);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < C; ++j) P.w[i * C + j] = get(w, wdt, i * P.ldw + j);
  if (use_om) for (int64_t j = 0; j < C; ++j) P.om[j] = get(om, dt, j);
  for (int64_t q = 0; q < n; ++q)
    for (int64_t j = 0; j < C; ++j) P.g[q * C + j] = get(g, wdt, q * P.ldo + j);
  double* ro = (double*)xmalloc(sizeof(double) * n * C);
  double *rdx = (double*)xmalloc(sizeof(double) * n * dim), *rdc = (double*)xmalloc(sizeof(double) * m * dim);
  double *rds = (double*)xmalloc(sizeof(double) * m * sw), *rdw = (double*)xmalloc(sizeof(double) * m * C);
  double* rdom = (double*)xmalloc(sizeof(double) * C);
  naive(&P, ro, rdx, rdc, rds, rdw, rdom);
  const double maxom = use_om ? 4096.0 : 0.0;
  const double tol = dt == KK_FLOAT64 ? 1e-12 : (wdt == KK_FLOAT32 ? 2e-6 * maxom + 1e-5 : 1e-2);

  void* out = poisoned(n * P.ldo, wdt);
  EXPECT_OK(kk_rbf_features_fwd_cpu(dt, wdt, dim, kernel, full, n, x, P.ldx, m, c, s, w, P.ldw, C,
                                    use_om ? om : NULL, k, P.idx, norm, out, P.ldo, nt));
  const double e = relerr(out, wdt, P.ldo, ro, n, C);
  CHECK(e < tol, "fwd dt %d wdt %d dim %d kernel %d full %d norm %d om %d: rel %g", (int)dt, (int)wdt, dim, kernel,
        full, norm, use_om, e);
  for (int64_t j = 0; j < C; ++j) CHECK(get(out, wdt, 4 * P.ldo + j) == 0.0, "no neighbour: 0");
  for (int64_t q = 0; q < n; ++q) CHECK(isnan(get(out, wdt, q * P.ldo + C)), "ldo padding untouched");
  free(out);

  /* the backward (float32 math for half weights; dweights in the coordinate dtype) */
  void* dx = poisoned(n * dim, dt);
  void* dc = poisoned(m * dim, dt);
  void* ds = poisoned(m * sw, dt);
  void* dw = poisoned(m * C, dt);
  void* dom = poisoned(C, dt);
  const int bnorm = norm;
  EXPECT_OK(kk_rbf_features_bwd_cpu(dt, wdt, dim, kernel, full, n, x, P.ldx, m, c, s, w, P.ldw, C,
                                    use_om ? om : NULL, k, P.idx, bnorm, g, P.ldo, dx, dc, ds, dw,
                                    use_om ? dom : NULL, nt));
  /* row 9 (NaN query): dx NaN, no contribution elsewhere; compare the other rows */
  for (int d = 0; d < dim; ++d) CHECK(isnan(get(dx, dt, 9 * dim + d)), "NaN query: dx NaN");
  const double tb = dt == KK_FLOAT64 ? 1e-11 : (wdt == KK_FLOAT32 ? 10 * (2e-6 * maxom + 1e-5) : 3e-2);
  double ed;
  for (int d = 0; d < dim; ++d) rdx[9 * dim + d] = NAN;
  CHECK((ed = relerr(dx, dt, dim, rdx, n, dim)) < tb, "dx rel %g (kernel %d full %d norm %d om %d dt %d wdt %d)", ed,
        kernel, full, norm, use_om, (int)dt, (int)wdt);
  CHECK((ed = relerr(dc, dt, dim, rdc, m, dim)) < tb, "dcenters rel %g (kernel %d full %d norm %d)", ed, kernel, full, norm);
  CHECK((ed = relerr(ds, dt, sw, rds, m, sw)) < tb, "dshapes rel %g (kernel %d full %d norm %d)", ed, kernel, full, norm);
  CHECK((ed = relerr(dw, dt, C, rdw, m, C)) < tb, "dweights rel %g", ed);
  if (use_om) CHECK((ed = relerr(dom, dt, C, rdom, 1, C)) < tb, "domegas rel %g", ed);
  /* only some gradients asked for: the same values */
  void* dw2 = poisoned(m * C, dt);
  EXPECT_OK(kk_rbf_features_bwd_cpu(dt, wdt, dim, kernel, full, n, x, P.ldx, m, c, s, w, P.ldw, C,
                                    use_om ? om : NULL, k, P.idx, bnorm, g, P.ldo, NULL, NULL, NULL, dw2, NULL, nt));
  CHECK(memcmp(dw, dw2, (size_t)(m * C) * esz(dt)) == 0, "dweights alone: same bits");
  free(dw2);
  free(dx), free(dc), free(ds), free(dw), free(dom);
  free(ro), free(rdx), free(rdc), free(rds), free(rdw), free(rdom);
  free(x), free(c), free(s), free(w), free(om), free(g);
  free(P.x), free(P.c), free(P.s), free(P.w), free(P.om), free(P.g), free(P.idx);
}

/* The float32 sine: one nlin RBF at the query (phi = 1 exactly, normalize 0), w = 1: out[j] = sin(om[j]). */
static void test_sine(void) {
  const int64_t C = 4099;
  float* om = (float*)xmalloc(4 * (size_t)C);
  const float edges[] = {0.f, 1e-30f, 0.78539819f, 1.5707964f, 3.1415927f, 4.712389f, 131072.f, -131072.f,
                         102943.71f, 4096.f, 8388607.f / 64.f, -0.5f, 1.0f, 2.0f, 3.0f};
  const int ne = (int)(sizeof(edges) / sizeof(edges[0]));
  for (int64_t j = 0; j < C; ++j) {
    if (j < ne) om[j] = edges[j];
    else if (j < 2000) om[j] = (float)(131072.0 * rnds());
    else if (j < 3000) om[j] = (float)(4096.0 * rnds());
    else om[j] = (float)((double)(j - 3000) * 1.5707963267948966 + 1e-4 * rnds()); /* near multiples of pi/2 */
  }
  for (int64_t j = 0; j < C; ++j)
    if (fabsf(om[j]) > 131072.f) om[j] = 131072.f;
  float xq[2] = {0.25f, 0.5f}, cen[2] = {0.25f, 0.5f}, sc[2] = {3.f, 3.f};
  float* w = (float*)xmalloc(4 * (size_t)C);
  for (int64_t j = 0; j < C; ++j) w[j] = 1.f;
  int64_t idx = 0;
  float* out = (float*)poisoned(C, KK_FLOAT32);
  EXPECT_OK(kk_rbf_features_fwd_cpu(KK_FLOAT32, KK_FLOAT32, 2, 2, 0, 1, xq, 2, 1, cen, sc, w, C, C, om, 1, &idx, 0,
                                    out, C, 1));
  double worst = 0;
  for (int64_t j = 0; j < C; ++j) {
    const double err = fabs((double)out[j] - sin((double)om[j]));
    if (err > worst) worst = err;
    CHECK(err <= ldexp(1.0, -21), "sin(%.9g): %.9g vs %.17g (err %g > 2^-21)", (double)om[j], (double)out[j],
          sin((double)om[j]), err);
  }
  /* the backward's sincos: domegas = g w phih cos(om phih) = cos(om) with g = 1 */
  float* g = w;
  float* dom = (float*)poisoned(C, KK_FLOAT32);
  EXPECT_OK(kk_rbf_features_bwd_cpu(KK_FLOAT32, KK_FLOAT32, 2, 2, 0, 1, xq, 2, 1, cen, sc, w, C, C, om, 1, &idx, 0,
                                    g, C, NULL, NULL, NULL, NULL, dom, 1));
  for (int64_t j = 0; j < C; ++j) {
    const double err = fabs((double)dom[j] - cos((double)om[j]));
    CHECK(err <= ldexp(1.0, -21), "cos(%.9g): %.9g vs %.17g (err %g)", (double)om[j], (double)dom[j],
          cos((double)om[j]), err);
  }
  printf("sine: max |sin_kk - sin| = %.3g over %lld arguments (bound 2^-21 = %.3g)\n", worst, (long long)C,
         ldexp(1.0, -21));
  free(om), free(w), free(out), free(dom);
}

static void test_errors(void) {
  kk_rbf_grid_layout_t l;
  float c[6] = {0, 0, 1, 1, 0.5f, 0.25f}, x[4] = {0.1f, 0.2f, 0.3f, 0.4f}, d2[8];
  int64_t idx[8];
  EXPECT_ERR(kk_rbf_grid_layout(KK_FLOAT32, 4, 3, &l), KK_ERR_INVALID_SIZE, "dim");
  EXPECT_ERR(kk_rbf_grid_layout(KK_FLOAT16, 2, 3, &l), KK_ERR_UNSUPPORTED_DTYPE, "dtype");
  EXPECT_ERR(kk_rbf_grid_layout(KK_FLOAT32, 2, -1, &l), KK_ERR_INVALID_SIZE, "m");
  EXPECT_ERR(kk_rbf_grid_layout(KK_FLOAT32, 2, (int64_t)1 << 31, &l), KK_ERR_INVALID_SIZE, "2^31");
  EXPECT_ERR(kk_rbf_grid_layout(KK_FLOAT32, 2, 3, NULL), KK_ERR_NULL_POINTER, "layout");
  EXPECT_OK(kk_rbf_grid_layout(KK_FLOAT32, 2, 3, &l));
  int64_t* grid = (int64_t*)xmalloc((size_t)l.bytes);
  EXPECT_ERR(kk_rbf_grid_build_cpu(KK_FLOAT32, 2, 3, c, 2, grid, l.bytes - 8, 1), KK_ERR_INVALID_SIZE, "grid_bytes");
  EXPECT_ERR(kk_rbf_grid_build_cpu(KK_FLOAT32, 2, 3, c, 1, grid, l.bytes, 1), KK_ERR_INVALID_ARGUMENT, "ldc");
  EXPECT_ERR(kk_rbf_grid_build_cpu(KK_FLOAT32, 2, 3, NULL, 2, grid, l.bytes, 1), KK_ERR_NULL_POINTER, "centers");
  EXPECT_ERR(kk_rbf_grid_build_cpu(KK_FLOAT32, 2, 3, c, 2, NULL, l.bytes, 1), KK_ERR_NULL_POINTER, "grid");
  c[3] = INFINITY;
  EXPECT_ERR(kk_rbf_grid_build_cpu(KK_FLOAT32, 2, 3, c, 2, grid, l.bytes, 1), KK_ERR_INVALID_ARGUMENT, "centers[1, 1]");
  c[3] = 1;
  EXPECT_OK(kk_rbf_grid_build_cpu(KK_FLOAT32, 2, 3, c, 2, grid, l.bytes, 1));
  EXPECT_ERR(kk_rbf_knn_cpu(KK_FLOAT32, 2, 2, x, 2, grid, 0, idx, d2, 1), KK_ERR_INVALID_ARGUMENT, "k");
  EXPECT_ERR(kk_rbf_knn_cpu(KK_FLOAT32, 2, 2, x, 2, grid, 33, idx, d2, 1), KK_ERR_INVALID_ARGUMENT, "k");
  EXPECT_ERR(kk_rbf_knn_cpu(KK_FLOAT32, 3, 1, x, 3, grid, 2, idx, d2, 1), KK_ERR_INVALID_ARGUMENT, "dim");
  EXPECT_ERR(kk_rbf_knn_cpu(KK_FLOAT64, 2, 2, x, 2, grid, 2, idx, d2, 1), KK_ERR_INVALID_ARGUMENT, "dtype");
  EXPECT_ERR(kk_rbf_knn_cpu(KK_FLOAT32, 2, 2, x, 1, grid, 2, idx, d2, 1), KK_ERR_INVALID_ARGUMENT, "ldx");
  EXPECT_ERR(kk_rbf_knn_cpu(KK_FLOAT32, 2, -2, x, 2, grid, 2, idx, d2, 1), KK_ERR_INVALID_SIZE, "n");
  EXPECT_ERR(kk_rbf_knn_cpu(KK_FLOAT32, 2, 2, x, 2, grid, 2, NULL, d2, 1), KK_ERR_NULL_POINTER, "idx");
  EXPECT_ERR(kk_rbf_knn_cpu(KK_FLOAT32, 2, 2, x, 2, NULL, 2, idx, d2, 1), KK_ERR_NULL_POINTER, "grid");
  grid[1] = 5; /* header m changed: cell_start no longer spans [0, m] */
  EXPECT_ERR(kk_rbf_knn_cpu(KK_FLOAT32, 2, 2, x, 2, grid, 2, idx, d2, 1), KK_ERR_INVALID_ARGUMENT, "grid");
  grid[1] = 3;
  EXPECT_OK(kk_rbf_knn_cpu(KK_FLOAT32, 2, 0, NULL, 2, grid, 2, NULL, NULL, 1)); /* n = 0 */
  free(grid);

  /* features */
  float s[12] = {2, 0, 0, 2, 1, 0.5f, 0.5f, 1, 3, 0, 0, 3}, w[6] = {1, 2, 3, 4, 5, 6}, out[4];
  int64_t id[4] = {0, 1, 2, 0};
#define FWD(dt, wdt, dim, kern, full, n, xx, ldx, m, ss, ldw, C, k, ii, norm, ldo) \
  kk_rbf_features_fwd_cpu(dt, wdt, dim, kern, full, n, xx, ldx, m, c, ss, w, ldw, C, NULL, k, ii, norm, out, ldo, 1)
  EXPECT_OK(FWD(KK_FLOAT32, KK_FLOAT32, 2, 0, 1, 2, x, 2, 3, s, 2, 2, 2, id, 1, 2));
  EXPECT_ERR(FWD(KK_FLOAT32, KK_FLOAT32, 4, 0, 1, 2, x, 2, 3, s, 2, 2, 2, id, 1, 2), KK_ERR_INVALID_SIZE, "dim");
  EXPECT_ERR(FWD(KK_FLOAT32, KK_FLOAT32, 2, 3, 1, 2, x, 2, 3, s, 2, 2, 2, id, 1, 2), KK_ERR_INVALID_ARGUMENT, "kernel");
  EXPECT_ERR(FWD(KK_FLOAT32, KK_FLOAT32, 2, 2, 1, 2, x, 2, 3, s, 2, 2, 2, id, 1, 2), KK_ERR_INVALID_ARGUMENT, "nlin");
  EXPECT_ERR(FWD(KK_FLOAT32, KK_FLOAT32, 2, 0, 1, 2, x, 2, 3, s, 2, 2, 2, id, 3, 2), KK_ERR_INVALID_ARGUMENT, "normalize");
  EXPECT_ERR(FWD(KK_FLOAT32, KK_FLOAT32, 2, 0, 1, 2, x, 2, 3, s, 2, 2, 0, id, 1, 2), KK_ERR_INVALID_ARGUMENT, "k");
  EXPECT_ERR(FWD(KK_FLOAT32, KK_FLOAT32, 2, 0, 1, -1, x, 2, 3, s, 2, 2, 2, id, 1, 2), KK_ERR_INVALID_SIZE, "n");
  EXPECT_ERR(FWD(KK_FLOAT32, KK_FLOAT32, 2, 0, 1, 2, x, 1, 3, s, 2, 2, 2, id, 1, 2), KK_ERR_INVALID_ARGUMENT, "ldx");
  EXPECT_ERR(FWD(KK_FLOAT32, KK_FLOAT32, 2, 0, 1, 2, x, 2, 3, s, 1, 2, 2, id, 1, 2), KK_ERR_INVALID_ARGUMENT, "ldw");
  EXPECT_ERR(FWD(KK_FLOAT32, KK_FLOAT32, 2, 0, 1, 2, x, 2, 3, s, 2, 2, 2, id, 1, 1), KK_ERR_INVALID_ARGUMENT, "ldo");
  EXPECT_ERR(FWD(KK_FLOAT32, KK_FLOAT32, 2, 0, 1, 2, NULL, 2, 3, s, 2, 2, 2, id, 1, 2), KK_ERR_NULL_POINTER, "x");
  EXPECT_ERR(FWD(KK_FLOAT32, KK_FLOAT32, 2, 0, 1, 2, x, 2, 3, NULL, 2, 2, 2, id, 1, 2), KK_ERR_NULL_POINTER, "shapes");
  EXPECT_ERR(FWD(KK_FLOAT64, KK_FLOAT16, 2, 0, 1, 2, x, 2, 3, s, 2, 2, 2, id, 1, 2), KK_ERR_UNSUPPORTED_DTYPE, "wdtype");
  EXPECT_ERR(FWD(KK_FLOAT16, KK_FLOAT16, 2, 0, 1, 2, x, 2, 3, s, 2, 2, 2, id, 1, 2), KK_ERR_UNSUPPORTED_DTYPE, "dtype");
  EXPECT_ERR(FWD(KK_FLOAT32, KK_FLOAT32, 2, 0, 1, 2, x, 2, (int64_t)1 << 31, s, 2, 2, 2, id, 1, 2), KK_ERR_INVALID_SIZE, "m");
  id[3] = 3;
  EXPECT_ERR(FWD(KK_FLOAT32, KK_FLOAT32, 2, 0, 1, 2, x, 2, 3, s, 2, 2, 2, id, 1, 2), KK_ERR_INVALID_ARGUMENT, "idx[1, 1]");
  id[3] = -2;
  EXPECT_ERR(FWD(KK_FLOAT32, KK_FLOAT32, 2, 0, 1, 2, x, 2, 3, s, 2, 2, 2, id, 1, 2), KK_ERR_INVALID_ARGUMENT, "idx[1, 1]");
  id[3] = -1;
  EXPECT_OK(FWD(KK_FLOAT32, KK_FLOAT32, 2, 0, 1, 2, x, 2, 3, s, 2, 2, 2, id, 1, 2));
  s[5] = 0.6f; /* RBF 1 not symmetric */
  EXPECT_ERR(FWD(KK_FLOAT32, KK_FLOAT32, 2, 0, 1, 2, x, 2, 3, s, 2, 2, 2, id, 1, 2), KK_ERR_INVALID_ARGUMENT, "RBF 1 are not symmetric");
  s[5] = 0.5f * (1 + 5e-7f); /* within 1e-5 relative: accepted */
  EXPECT_OK(FWD(KK_FLOAT32, KK_FLOAT32, 2, 0, 1, 2, x, 2, 3, s, 2, 2, 2, id, 1, 2));
  s[5] = 0.5f;
  s[9] = 4, s[10] = 4; /* RBF 2 = [[3, 4], [4, 3]]: indefinite */
  EXPECT_ERR(FWD(KK_FLOAT32, KK_FLOAT32, 2, 0, 1, 2, x, 2, 3, s, 2, 2, 2, id, 1, 2), KK_ERR_INVALID_ARGUMENT, "RBF 2 are not positive definite");
  s[9] = 0, s[10] = 0;
  s[0] = NAN;
  EXPECT_ERR(FWD(KK_FLOAT32, KK_FLOAT32, 2, 0, 1, 2, x, 2, 3, s, 2, 2, 2, id, 1, 2), KK_ERR_INVALID_ARGUMENT, "not finite");
  s[0] = 2;
  s[1] = 1, s[2] = 1, s[3] = 0; /* diagonal shapes (3 x 2): RBF 1's second entry 0 */
  EXPECT_ERR(FWD(KK_FLOAT32, KK_FLOAT32, 2, 1, 0, 2, x, 2, 3, s, 2, 2, 2, id, 1, 2), KK_ERR_INVALID_ARGUMENT, "RBF 1: diagonal entry 1 = 0 must be > 0");
  EXPECT_ERR(FWD(KK_FLOAT32, KK_FLOAT32, 2, 2, 0, 2, x, 2, 3, s, 2, 2, 2, id, 1, 2), KK_ERR_INVALID_ARGUMENT, "RBF 1");
  s[3] = 2;
  /* empty sizes with NULL pointers */
  EXPECT_OK(kk_rbf_features_fwd_cpu(KK_FLOAT32, KK_FLOAT32, 2, 0, 1, 0, NULL, 2, 0, NULL, NULL, NULL, 0, 4, NULL, 2,
                                    NULL, 1, NULL, 4, 1));
  EXPECT_OK(kk_rbf_features_fwd_cpu(KK_FLOAT32, KK_FLOAT32, 2, 0, 1, 2, x, 2, 3, c, s, NULL, 0, 0, NULL, 2, id, 1,
                                    NULL, 0, 1)); /* C = 0 */
  EXPECT_ERR(kk_rbf_features_bwd_cpu(KK_FLOAT32, KK_FLOAT32, 2, 0, 1, 2, x, 2, 3, c, s, w, 2, 2, NULL, 2, id, 1, NULL,
                                     2, NULL, NULL, NULL, NULL, NULL, 1), KK_ERR_NULL_POINTER, "grad_out");
  EXPECT_ERR(kk_rbf_features_bwd_cpu(KK_FLOAT32, KK_FLOAT32, 2, 0, 1, 2, x, 2, 3, c, s, w, 2, 2, NULL, 2, id, 1, out,
                                     1, NULL, NULL, NULL, NULL, NULL, 1), KK_ERR_INVALID_ARGUMENT, "ldg");
  /* m = 0: every neighbour missing, out 0, gradients 0 */
  int64_t none[4] = {-1, -1, -1, -1};
  float dx[4] = {NAN, NAN, NAN, NAN};
  EXPECT_OK(kk_rbf_features_fwd_cpu(KK_FLOAT32, KK_FLOAT32, 2, 0, 1, 2, x, 2, 0, NULL, NULL, NULL, 2, 2, NULL, 2,
                                    none, 1, out, 2, 1));
  CHECK(out[0] == 0 && out[3] == 0, "m = 0: out 0");
  EXPECT_OK(kk_rbf_features_bwd_cpu(KK_FLOAT32, KK_FLOAT32, 2, 0, 1, 2, x, 2, 0, NULL, NULL, NULL, 2, 2, NULL, 2,
                                    none, 1, out, 2, dx, NULL, NULL, NULL, NULL, 1));
  CHECK(dx[0] == 0 && dx[3] == 0, "m = 0: dx 0");
#undef FWD
}

int main(void) {
  const kk_dtype dts[2] = {KK_FLOAT32, KK_FLOAT64};
  for (int a = 0; a < 2; ++a)
    for (int dim = 2; dim <= 3; ++dim) {
      test_knn(dts[a], dim, 0, 0, 3, 2);
      test_knn(dts[a], dim, 1, 0, 2, 1);
      test_knn(dts[a], dim, 9, 1, 32, 2); /* k > m */
      test_knn(dts[a], dim, 600, 0, 8, 2);
      test_knn(dts[a], dim, 700, 1, 5, 3);
    }
  for (int a = 0; a < 2; ++a)
    for (int dim = 2; dim <= 3; ++dim)
      for (int kernel = 0; kernel < 3; ++kernel)
        for (int full = 0; full <= (kernel < 2); ++full)
          for (int norm = 0; norm < 3; ++norm)
            for (int om = 0; om < 2; ++om) test_features(dts[a], dts[a], dim, kernel, full, norm, om, 1 + (norm & 1));
  test_features(KK_FLOAT32, KK_FLOAT16, 2, 0, 1, 1, 1, 2);
  test_features(KK_FLOAT32, KK_BFLOAT16, 3, 1, 0, 2, 1, 2);
  test_features(KK_FLOAT32, KK_BFLOAT16, 2, 2, 0, 0, 0, 2);
  test_sine();
  test_errors();
  printf("ok %s %s %d\n", kk_version(), kk_cpu_isa(), g_checks);
  return 0;
}
