/* A C99 program using libkernelkit's public header for the mfac family: every CPU entry point
 * (kk_mfac_static_rows, kk_mfac_dots_cpu with and without an insert, _combine_cpu, _diag_cpu,
 * _static_setup_cpu in both forms and in place, _window_update_cpu, _window_rebuild_cpu,
 * _window_coef_cpu) against a naive reference in double, for float32 / bfloat16 / float64 buffers,
 * padded rows, blocks (small, crossing the kernels' 2048-column chunks, one block wider than d),
 * several vectors, thread counts 0..3, empty sizes with NULL pointers; and the error paths (status and
 * a message naming the argument; a rejected insert leaves G unchanged).  Outputs are NaN-poisoned
 * before each call.  Built and run by tests/test_mfac_cabi.py and by .ci/run under ASan+UBSan for every
 * ISA variant.  Prints "ok <version> <isa> <count>" and exits 0 on success; on the first failure it
 * prints what failed and exits 1. */
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
#define EXPECT_ERR(call, status, needle)                                                              \
  do {                                                                                                \
    kk_status st_ = (call);                                                                           \
    CHECK(st_ == (status), "%s: status %d, expected %d (%s)", #call, (int)st_, (int)(status),         \
          kk_last_error());                                                                           \
    CHECK(strstr(kk_last_error(), (needle)) != NULL, "%s: message '%s' lacks '%s'", #call, kk_last_error(), \
          (needle));                                                                                  \
  } while (0)
#define EXPECT_OK(call) \
  do { kk_status st_ = (call); CHECK(st_ == KK_OK, "%s: status %d (%s)", #call, (int)st_, kk_last_error()); } while (0)

static uint64_t g_rng = 0x2545f4914f6cdd1dull;
static uint64_t rnd_u64(void) {
  uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
static double rnd(void) { return 2.0 * (double)(rnd_u64() >> 11) / 9007199254740992.0 - 1.0; }

static void* xmalloc(size_t n) {
  void* p = malloc(n ? n : 1);
  if (!p) FAIL("out of memory (%zu bytes)", n);
  return p;
}

/* ---- typed buffers: float32, bfloat16 (uint16 bits), float64 ------------------------------------ */
static size_t esz(kk_dtype dt) { return dt == KK_FLOAT64 ? 8 : dt == KK_FLOAT32 ? 4 : 2; }
static kk_dtype vdt(kk_dtype dt) { return dt == KK_FLOAT64 ? KK_FLOAT64 : KK_FLOAT32; }
static const char* dname(kk_dtype dt) { return dt == KK_FLOAT64 ? "f64" : dt == KK_FLOAT32 ? "f32" : "bf16"; }
static uint16_t bf16_rne(float f) { /* round to nearest even (finite inputs) */
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
static double get(const void* p, int64_t i, kk_dtype dt) {
  if (dt == KK_FLOAT64) return ((const double*)p)[i];
  if (dt == KK_FLOAT32) return (double)((const float*)p)[i];
  uint32_t u = (uint32_t)((const uint16_t*)p)[i] << 16;
  float f;
  memcpy(&f, &u, 4);
  return (double)f;
}
static void set(void* p, int64_t i, double v, kk_dtype dt) {
  if (dt == KK_FLOAT64) ((double*)p)[i] = v;
  else if (dt == KK_FLOAT32) ((float*)p)[i] = (float)v;
  else ((uint16_t*)p)[i] = bf16_rne((float)v);
}
static void* rand_buf(int64_t n, kk_dtype dt) {
  void* p = xmalloc((size_t)n * esz(dt));
  for (int64_t i = 0; i < n; ++i) set(p, i, rnd(), dt);
  return p;
}
static void* poisoned(int64_t n, kk_dtype dt) {
  void* p = xmalloc((size_t)n * esz(dt));
  for (int64_t i = 0; i < n; ++i) set(p, i, NAN, dt == KK_BFLOAT16 ? KK_FLOAT32 : dt);
  return p;
}
static double* dpoisoned(int64_t n) { return (double*)poisoned(n, KK_FLOAT64); }

/* max |got - want| / (scale), scale = the largest |term sum| given; every element must be finite */
static void close_to(const void* got, kk_dtype gdt, const double* want, const double* scale, int64_t n, double tol,
                     const char* what) {
  for (int64_t i = 0; i < n; ++i) {
    const double g = get(got, i, gdt);
    CHECK(isfinite(g), "%s[%lld] not written (%g)", what, (long long)i, g);
    const double s = scale ? scale[i] : fabs(want[i]);
    CHECK(fabs(g - want[i]) <= tol * (s > 1e-300 ? s : 1.0), "%s[%lld]: %.17g vs %.17g (scale %g)", what, (long long)i,
          g, want[i], s);
  }
}
static double tol_of(kk_dtype dt) { return dt == KK_FLOAT64 ? 1e-12 : 1e-6; }
static int64_t nblk(int64_t d, int64_t block) { return d == 0 ? 0 : (d - 1) / block + 1; }

/* ---- dots / insert / combine / diag ------------------------------------------------------------- */
static void test_dots(kk_dtype dt, int64_t r, int64_t d, int64_t block, int64_t nvec, int64_t pad, int nt) {
  const int64_t ldg = d + pad, ldx = d + 2 * pad, nb = nblk(d, block), nq = nvec * nb * r;
  void* G = rand_buf(r * ldg, dt);
  void* x = rand_buf(nvec * ldx, vdt(dt));
  double* q = dpoisoned(nq);
  double* want = (double*)xmalloc((size_t)nq * 8);
  double* scale = (double*)xmalloc((size_t)nq * 8);
  EXPECT_OK(kk_mfac_dots_cpu(dt, r, d, block, G, ldg, nvec, x, ldx, -1, q, NULL, nt));
  for (int64_t v = 0; v < nvec; ++v)
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t i = 0; i < r; ++i) {
        double s = 0, a = 0;
        for (int64_t j = b * block; j < d && j < (b + 1) * block; ++j) {
          const double t = get(G, i * ldg + j, dt) * get(x, v * ldx + j, vdt(dt));
          s += t;
          a += fabs(t);
        }
        want[(v * nb + b) * r + i] = s;
        scale[(v * nb + b) * r + i] = a;
      }
  char what[96];
  snprintf(what, sizeof what, "dots %s r=%lld d=%lld block=%lld nvec=%lld", dname(dt), (long long)r, (long long)d,
           (long long)block, (long long)nvec);
  close_to(q, KK_FLOAT64, want, scale, nq, tol_of(dt) * 1e-3, what);

  /* combine with the same shapes: out = alpha x + G^T c, with x, without x, in place */
  double* c = (double*)xmalloc((size_t)nq * 8);
  for (int64_t i = 0; i < nq; ++i) c[i] = rnd();
  const int64_t ldo = d + pad;
  double* wantc = (double*)xmalloc((size_t)(nvec * d + 1) * 8);
  double* scalec = (double*)xmalloc((size_t)(nvec * d + 1) * 8);
  for (int mode = 0; mode < 3; ++mode) {
    const double alpha = mode == 1 ? 0.0 : -0.75;
    void* xin = mode == 1 ? NULL : x;
    void* out = mode == 2 ? x : poisoned(nvec * ldo, vdt(dt));
    const int64_t ld_out = mode == 2 ? ldx : ldo;
    for (int64_t v = 0; v < nvec; ++v)
      for (int64_t j = 0; j < d; ++j) {
        const int64_t b = j / block;
        double s = xin ? alpha * get(x, v * ldx + j, vdt(dt)) : 0.0, a = fabs(s);
        for (int64_t i = 0; i < r; ++i) {
          const double t = c[(v * nb + b) * r + i] * get(G, i * ldg + j, dt);
          s += t;
          a += fabs(t);
        }
        wantc[v * d + j] = s;
        scalec[v * d + j] = a + (dt == KK_FLOAT64 ? 0 : fabs(s));  /* float32 output rounding */
      }
    EXPECT_OK(kk_mfac_combine_cpu(dt, r, d, block, G, ldg, nvec, alpha, xin, ldx, c, out, ld_out, nt));
    for (int64_t v = 0; v < nvec; ++v) {
      snprintf(what, sizeof what, "combine %s mode %d r=%lld d=%lld block=%lld", dname(dt), mode, (long long)r,
               (long long)d, (long long)block);
      close_to((char*)out + (size_t)(v * ld_out) * esz(vdt(dt)), vdt(dt), wantc + v * d, scalec + v * d, d,
               tol_of(dt), what);
    }
    if (mode != 2) free(out);
  }

  /* diag of alpha I + beta G^T G */
  void* dg = poisoned(d, vdt(dt));
  EXPECT_OK(kk_mfac_diag_cpu(dt, r, d, G, ldg, 0.5, -0.25, dg, nt));
  for (int64_t j = 0; j < d; ++j) {
    double s = 0;
    for (int64_t i = 0; i < r; ++i) s += get(G, i * ldg + j, dt) * get(G, i * ldg + j, dt);
    wantc[j] = 0.5 - 0.25 * s;
    scalec[j] = 0.5 + 0.25 * s;
  }
  close_to(dg, vdt(dt), wantc, scalec, d, tol_of(dt), "diag");
  free(dg);
  free(G); free(x); free(q); free(want); free(scale); free(c); free(wantc); free(scalec);
}

static void test_insert(kk_dtype dt, int64_t r, int64_t d, int64_t block, int64_t row, int nt) {
  const int64_t ldg = d + 3, nb = nblk(d, block);
  void* G = rand_buf(r * ldg, dt);
  float* x32 = NULL;
  double* x64 = NULL;
  void* x;
  if (dt == KK_FLOAT64) {
    x64 = (double*)xmalloc((size_t)d * 8);
    for (int64_t j = 0; j < d; ++j) x64[j] = rnd() * 3.0;
    x = x64;
  } else {
    x32 = (float*)xmalloc((size_t)d * 4);
    for (int64_t j = 0; j < d; ++j) x32[j] = (float)(rnd() * 3.0);
    x = x32;
  }
  double* q = dpoisoned(nb * r);
  double* qr = dpoisoned(nb * r);
  EXPECT_OK(kk_mfac_dots_cpu(dt, r, d, block, G, ldg, 1, x, d, row, q, qr, nt));
  for (int64_t j = 0; j < d; ++j) {  /* the row holds x rounded to the buffer dtype, bit for bit */
    const double xv = x64 ? x64[j] : (double)x32[j];
    if (dt == KK_BFLOAT16)
      CHECK(((uint16_t*)G)[row * ldg + j] == bf16_rne(x32[j]), "insert bf16 rounding at %lld", (long long)j);
    else
      CHECK(get(G, row * ldg + j, dt) == xv, "insert at %lld", (long long)j);
  }
  double* want = (double*)xmalloc((size_t)(2 * nb * r + 1) * 8);
  double* scale = (double*)xmalloc((size_t)(2 * nb * r + 1) * 8);
  for (int k = 0; k < 2; ++k) {
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t i = 0; i < r; ++i) {
        double s = 0, a = 0;
        for (int64_t j = b * block; j < d && j < (b + 1) * block; ++j) {
          const double xv = k == 0 ? (x64 ? x64[j] : (double)x32[j]) : get(G, row * ldg + j, dt);
          const double t = get(G, i * ldg + j, dt) * xv;
          s += t;
          a += fabs(t);
        }
        want[b * r + i] = s;
        scale[b * r + i] = a;
      }
    close_to(k == 0 ? q : qr, KK_FLOAT64, want, scale, nb * r, 1e-12, k == 0 ? "insert q" : "insert qr");
  }
  /* a non-finite x: rejected before anything is written */
  void* G0 = xmalloc((size_t)(r * ldg) * esz(dt));
  memcpy(G0, G, (size_t)(r * ldg) * esz(dt));
  if (x64) x64[d / 2] = NAN; else x32[d / 2] = INFINITY;
  EXPECT_ERR(kk_mfac_dots_cpu(dt, r, d, block, G, ldg, 1, x, d, (row + 1) % r, q, qr, nt), KK_ERR_INVALID_ARGUMENT,
             "not finite");
  CHECK(memcmp(G0, G, (size_t)(r * ldg) * esz(dt)) == 0, "a rejected insert changed G");
  free(G0); free(G); free(x32); free(x64); free(q); free(qr); free(want); free(scale);
}

/* ---- naive dense float64 algebra ---------------------------------------------------------------- */
static int chol(double* A, int64_t n) { /* in place, lower; 0 if not PD */
  for (int64_t j = 0; j < n; ++j) {
    double s = A[j * n + j];
    for (int64_t k = 0; k < j; ++k) s -= A[j * n + k] * A[j * n + k];
    if (!(s > 0)) return 0;
    A[j * n + j] = sqrt(s);
    for (int64_t i = j + 1; i < n; ++i) {
      double t = A[i * n + j];
      for (int64_t k = 0; k < j; ++k) t -= A[i * n + k] * A[j * n + k];
      A[i * n + j] = t / A[j * n + j];
    }
  }
  return 1;
}
static void fwd(const double* L, int64_t n, double* b) { /* b = L^-1 b */
  for (int64_t i = 0; i < n; ++i) {
    double s = b[i];
    for (int64_t k = 0; k < i; ++k) s -= L[i * n + k] * b[k];
    b[i] = s / L[i * n + i];
  }
}
/* kinv = (m damp I + gram)^-1 via L^-T L^-1 */
static void naive_kinv(const double* gram, int64_t m, double damp, double* kinv) {
  double* L = (double*)xmalloc((size_t)(m * m) * 8);
  double* Li = (double*)xmalloc((size_t)(m * m) * 8);
  for (int64_t i = 0; i < m * m; ++i) L[i] = gram[i];
  for (int64_t i = 0; i < m; ++i) L[i * m + i] += (double)m * damp;
  if (!chol(L, m)) FAIL("naive_kinv: not PD");
  double* col = (double*)xmalloc((size_t)m * 8);
  for (int64_t c = 0; c < m; ++c) {
    for (int64_t i = 0; i < m; ++i) col[i] = i == c;
    fwd(L, m, col);
    for (int64_t i = 0; i < m; ++i) Li[i * m + c] = col[i];
  }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < m; ++j) {
      double s = 0;
      for (int64_t k = 0; k < m; ++k) s += Li[k * m + i] * Li[k * m + j];
      kinv[i * m + j] = s;
    }
  free(L); free(Li); free(col);
}

static void test_setup(kk_dtype dt, int64_t m, int64_t d, int64_t block, int alias, int nt) {
  const int64_t ldg = d + 1, r = kk_mfac_static_rows(m, d, block), B = block < d ? block : d;
  const double damp = 0.05;
  void* G = rand_buf(m * ldg, dt);
  void* G0 = xmalloc((size_t)(m * ldg) * esz(dt));
  memcpy(G0, G, (size_t)(m * ldg) * esz(dt));
  const kk_dtype zdt = vdt(dt);
  void* Z = alias ? G : poisoned(r * ldg, zdt);
  EXPECT_OK(kk_mfac_static_setup_cpu(dt, m, d, block, G, ldg, damp, Z, ldg, nt));
  const int w_form = m <= B;
  CHECK(r == (w_form ? m : B), "static_rows");
  for (int64_t lo = 0; lo < d; lo += block) {
    const int64_t w = d - lo < block ? d - lo : block, n = w_form ? m : w;
    double* K = (double*)xmalloc((size_t)(n * n) * 8);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double s = i == j ? (double)m * damp : 0.0;
        if (w_form)
          for (int64_t k = 0; k < w; ++k) s += get(G0, i * ldg + lo + k, dt) * get(G0, j * ldg + lo + k, dt);
        else
          for (int64_t k = 0; k < m; ++k) s += get(G0, k * ldg + lo + i, dt) * get(G0, k * ldg + lo + j, dt);
        K[i * n + j] = s;
      }
    CHECK(chol(K, n), "setup reference not PD");
    double* col = (double*)xmalloc((size_t)n * 8);
    const int64_t ncols = w;
    for (int64_t c = 0; c < ncols; ++c) {
      for (int64_t i = 0; i < n; ++i) col[i] = w_form ? get(G0, i * ldg + lo + c, dt) : (double)(i == c);
      fwd(K, n, col);
      for (int64_t i = 0; i < r; ++i) {
        const double want = i < n ? col[i] : 0.0;
        const double got = get(Z, i * ldg + lo + c, zdt);
        CHECK(isfinite(got) && fabs(got - want) <= (zdt == KK_FLOAT64 ? 1e-11 : 1e-6) * (1.0 + fabs(want)),
              "setup %s m=%lld d=%lld block=%lld alias=%d Z[%lld, %lld] = %.17g, want %.17g", dname(dt), (long long)m,
              (long long)d, (long long)block, alias, (long long)i, (long long)(lo + c), got, want);
      }
    }
    free(K); free(col);
  }
  if (!alias) free(Z);
  free(G); free(G0);
}

static void test_window(int64_t m, int nt) {
  const int64_t d = 2 * m + 3;
  const double damp = 0.1;
  double* A = (double*)xmalloc((size_t)(m * d) * 8);
  for (int64_t i = 0; i < m * d; ++i) A[i] = rnd();
  double* gram = (double*)xmalloc((size_t)(m * m) * 8);
  double* kinv = dpoisoned(m * m);
  double* want = (double*)xmalloc((size_t)(m * m) * 8);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < m; ++j) {
      double s = 0;
      for (int64_t k = 0; k < d; ++k) s += A[i * d + k] * A[j * d + k];
      gram[i * m + j] = s;
    }
  EXPECT_OK(kk_mfac_window_rebuild_cpu(m, damp, gram, kinv, nt));
  naive_kinv(gram, m, damp, want);
  double mx = 0;
  for (int64_t i = 0; i < m * m; ++i) mx = fmax(mx, fabs(want[i]));
  close_to(kinv, KK_FLOAT64, want, NULL, 0, 0, "");
  for (int64_t i = 0; i < m * m; ++i)
    CHECK(fabs(kinv[i] - want[i]) <= 1e-12 * mx, "rebuild m=%lld [%lld]: %g vs %g", (long long)m, (long long)i,
          kinv[i], want[i]);
  double* newcol = (double*)xmalloc((size_t)m * 8);
  for (int step = 0; step < 2 * m + 1 && step < 9; ++step) {
    const int64_t row = (step * 7) % m;
    for (int64_t k = 0; k < d; ++k) A[row * d + k] = step == 3 ? A[((row + 1) % m) * d + k] : rnd();
    for (int64_t i = 0; i < m; ++i) {
      double s = 0;
      for (int64_t k = 0; k < d; ++k) s += A[i * d + k] * A[row * d + k];
      newcol[i] = s;
    }
    EXPECT_OK(kk_mfac_window_update_cpu(m, damp, gram, kinv, row, newcol, nt));
    for (int64_t i = 0; i < m; ++i)
      CHECK(gram[row * m + i] == newcol[i] && gram[i * m + row] == newcol[i], "update: gram row/column");
    naive_kinv(gram, m, damp, want);
    mx = 0;
    for (int64_t i = 0; i < m * m; ++i) mx = fmax(mx, fabs(want[i]));
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < m; ++j) {
        CHECK(kinv[i * m + j] == kinv[j * m + i], "update: kinv not exactly symmetric");
        CHECK(fabs(kinv[i * m + j] - want[i * m + j]) <= 1e-10 * mx, "update m=%lld step %d kinv[%lld,%lld]: %g vs %g",
              (long long)m, step, (long long)i, (long long)j, kinv[i * m + j], want[i * m + j]);
      }
  }
  /* coef: c = scale kinv q for 3 vectors */
  double* q = (double*)xmalloc((size_t)(3 * m) * 8);
  double* c = dpoisoned(3 * m);
  double* wc = (double*)xmalloc((size_t)(3 * m) * 8);
  double* sc = (double*)xmalloc((size_t)(3 * m) * 8);
  for (int64_t i = 0; i < 3 * m; ++i) q[i] = rnd();
  EXPECT_OK(kk_mfac_window_coef_cpu(m, 3, -2.5, kinv, q, c, nt));
  for (int64_t v = 0; v < 3; ++v)
    for (int64_t i = 0; i < m; ++i) {
      double s = 0, a = 0;
      for (int64_t k = 0; k < m; ++k) {
        s += kinv[i * m + k] * q[v * m + k];
        a += fabs(kinv[i * m + k] * q[v * m + k]);
      }
      wc[v * m + i] = -2.5 * s;
      sc[v * m + i] = 2.5 * a;
    }
  close_to(c, KK_FLOAT64, wc, sc, 3 * m, 1e-13, "coef");
  /* errors that change nothing */
  memcpy(want, kinv, (size_t)(m * m) * 8);
  newcol[m - 1] = INFINITY;
  EXPECT_ERR(kk_mfac_window_update_cpu(m, damp, gram, kinv, 0, newcol, nt), KK_ERR_INVALID_ARGUMENT, "newcol");
  CHECK(memcmp(want, kinv, (size_t)(m * m) * 8) == 0, "a rejected update changed kinv");
  EXPECT_ERR(kk_mfac_window_update_cpu(m, damp, gram, kinv, m, newcol, nt), KK_ERR_INVALID_ARGUMENT, "row");
  EXPECT_ERR(kk_mfac_window_update_cpu(m, 0.0, gram, kinv, 0, newcol, nt), KK_ERR_INVALID_ARGUMENT, "damp");
  EXPECT_ERR(kk_mfac_window_rebuild_cpu(m, -1.0, gram, kinv, nt), KK_ERR_INVALID_ARGUMENT, "damp");
  EXPECT_ERR(kk_mfac_window_rebuild_cpu(m, damp, NULL, kinv, nt), KK_ERR_NULL_POINTER, "gram");
  EXPECT_ERR(kk_mfac_window_coef_cpu(m, 1, 1.0, kinv, q, q, nt), KK_ERR_INVALID_ARGUMENT, "overlaps");
  for (int64_t i = 0; i < m * m; ++i) gram[i] = 0;
  gram[0] = -2.0 * (double)m * damp; /* K[0, 0] < 0: not positive definite */
  EXPECT_ERR(kk_mfac_window_rebuild_cpu(m, damp, gram, kinv, nt), KK_ERR_INVALID_ARGUMENT, "increase damp");
  free(A); free(gram); free(kinv); free(want); free(newcol); free(q); free(c); free(wc); free(sc);
}

static void test_errors(void) {
  float G[64], x[16], out[16];
  double q[64], c[64];
  for (int i = 0; i < 64; ++i) G[i] = (float)rnd(), q[i] = c[i] = 0;
  for (int i = 0; i < 16; ++i) x[i] = (float)rnd();
  CHECK(kk_mfac_static_rows(10, 100, 5) == 5 && kk_mfac_static_rows(10, 100, 50) == 10 &&
            kk_mfac_static_rows(10, 4, 50) == 4 && kk_mfac_static_rows(0, 4, 5) == 0 &&
            kk_mfac_static_rows(3, 0, 5) == 0 && kk_mfac_static_rows(-1, 4, 5) == -1 &&
            kk_mfac_static_rows(3, 4, 0) == -1,
        "static_rows");
  EXPECT_ERR(kk_mfac_dots_cpu(KK_FLOAT16, 4, 16, 16, G, 16, 1, x, 16, -1, q, NULL, 1), KK_ERR_UNSUPPORTED_DTYPE, "gdtype");
  EXPECT_ERR(kk_mfac_dots_cpu(KK_FLOAT32, -1, 16, 16, G, 16, 1, x, 16, -1, q, NULL, 1), KK_ERR_INVALID_SIZE, "r");
  EXPECT_ERR(kk_mfac_dots_cpu(KK_FLOAT32, 4, 16, 0, G, 16, 1, x, 16, -1, q, NULL, 1), KK_ERR_INVALID_ARGUMENT, "block");
  EXPECT_ERR(kk_mfac_dots_cpu(KK_FLOAT32, 4, 16, 16, G, 15, 1, x, 16, -1, q, NULL, 1), KK_ERR_INVALID_ARGUMENT, "ldg");
  EXPECT_ERR(kk_mfac_dots_cpu(KK_FLOAT32, 4, 16, 16, G, 16, 1, x, 8, -1, q, NULL, 1), KK_ERR_INVALID_ARGUMENT, "ldx");
  EXPECT_ERR(kk_mfac_dots_cpu(KK_FLOAT32, 4, 16, 16, NULL, 16, 1, x, 16, -1, q, NULL, 1), KK_ERR_NULL_POINTER, "G");
  EXPECT_ERR(kk_mfac_dots_cpu(KK_FLOAT32, 4, 16, 16, G, 16, 1, x, 16, -1, NULL, NULL, 1), KK_ERR_NULL_POINTER, "q");
  EXPECT_ERR(kk_mfac_dots_cpu(KK_FLOAT32, 4, 8, 8, G, 8, 2, x, 8, 0, q, NULL, 1), KK_ERR_INVALID_ARGUMENT, "nvec");
  EXPECT_ERR(kk_mfac_dots_cpu(KK_FLOAT32, 4, 16, 16, G, 16, 1, x, 16, 4, q, NULL, 1), KK_ERR_INVALID_ARGUMENT,
             "insert_row");
  EXPECT_ERR(kk_mfac_combine_cpu(KK_FLOAT32, 4, 16, 16, G, 16, 1, 1.0, x, 16, c, NULL, 16, 1), KK_ERR_NULL_POINTER, "out");
  EXPECT_ERR(kk_mfac_combine_cpu(KK_FLOAT32, 4, 16, 16, G, 16, 1, 1.0, x, 16, NULL, out, 16, 1), KK_ERR_NULL_POINTER, "c");
  EXPECT_ERR(kk_mfac_combine_cpu(KK_FLOAT32, 4, 16, 16, G, 16, 1, 1.0, x, 16, c, out, 3, 1), KK_ERR_INVALID_ARGUMENT, "ldo");
  EXPECT_ERR(kk_mfac_combine_cpu(KK_FLOAT32, 4, 8, 8, G, 8, 1, 1.0, x, 8, c, x + 1, 8, 1), KK_ERR_INVALID_ARGUMENT,
             "overlaps x");
  EXPECT_ERR(kk_mfac_combine_cpu(KK_FLOAT32, 4, 8, 8, G, 8, 1, 1.0, x, 8, c, x, 9, 1), KK_ERR_INVALID_ARGUMENT, "ldo");
  EXPECT_ERR(kk_mfac_diag_cpu(KK_FLOAT32, 4, 16, G, 10, 1.0, 1.0, out, 1), KK_ERR_INVALID_ARGUMENT, "ldz");
  EXPECT_ERR(kk_mfac_diag_cpu(KK_FLOAT16, 4, 16, G, 16, 1.0, 1.0, out, 1), KK_ERR_UNSUPPORTED_DTYPE, "zdtype");
  EXPECT_ERR(kk_mfac_diag_cpu(KK_FLOAT32, 4, 16, NULL, 16, 1.0, 1.0, out, 1), KK_ERR_NULL_POINTER, "Z");
  float Z[64];
  EXPECT_ERR(kk_mfac_static_setup_cpu(KK_FLOAT32, 4, 16, 16, G, 16, 0.0, Z, 16, 1), KK_ERR_INVALID_ARGUMENT, "damp");
  EXPECT_ERR(kk_mfac_static_setup_cpu(KK_FLOAT32, 4, 16, 16, G, 16, NAN, Z, 16, 1), KK_ERR_INVALID_ARGUMENT, "damp");
  EXPECT_ERR(kk_mfac_static_setup_cpu(KK_FLOAT32, 4, 16, 0, G, 16, 1.0, Z, 16, 1), KK_ERR_INVALID_ARGUMENT, "block");
  EXPECT_ERR(kk_mfac_static_setup_cpu(KK_FLOAT32, 4, 16, 16, G, 16, 1.0, NULL, 16, 1), KK_ERR_NULL_POINTER, "Z");
  EXPECT_ERR(kk_mfac_static_setup_cpu(KK_FLOAT32, 4, 8, 8, G, 8, 1.0, G, 16, 1), KK_ERR_INVALID_ARGUMENT, "ldz");
  EXPECT_ERR(kk_mfac_static_setup_cpu(KK_FLOAT32, 4, 8, 8, G, 8, 1.0, G + 3, 8, 1), KK_ERR_INVALID_ARGUMENT, "overlaps");
  EXPECT_ERR(kk_mfac_static_setup_cpu(KK_BFLOAT16, 4, 8, 8, G, 8, 1.0, G, 8, 1), KK_ERR_INVALID_ARGUMENT, "bfloat16");
  G[5] = NAN;
  EXPECT_ERR(kk_mfac_static_setup_cpu(KK_FLOAT32, 4, 16, 16, G, 16, 1.0, Z, 16, 1), KK_ERR_INVALID_ARGUMENT,
             "increase damp");
  /* empty sizes: NULL pointers are fine, nothing is written */
  EXPECT_OK(kk_mfac_dots_cpu(KK_FLOAT32, 0, 16, 4, NULL, 16, 1, x, 16, -1, NULL, NULL, 1));
  EXPECT_OK(kk_mfac_dots_cpu(KK_FLOAT32, 4, 0, 4, NULL, 0, 1, NULL, 0, -1, NULL, NULL, 1));
  EXPECT_OK(kk_mfac_dots_cpu(KK_BFLOAT16, 4, 16, 4, NULL, 16, 0, NULL, 16, -1, NULL, NULL, 1));
  EXPECT_OK(kk_mfac_combine_cpu(KK_FLOAT32, 4, 16, 4, G, 16, 0, 1.0, NULL, 16, NULL, NULL, 16, 1));
  EXPECT_OK(kk_mfac_combine_cpu(KK_FLOAT64, 4, 0, 4, NULL, 0, 2, 1.0, NULL, 0, NULL, NULL, 0, 1));
  for (int i = 0; i < 16; ++i) out[i] = NAN;
  EXPECT_OK(kk_mfac_combine_cpu(KK_FLOAT32, 0, 16, 4, NULL, 16, 1, 2.0, x, 16, NULL, out, 16, 1)); /* r = 0: 2x */
  for (int i = 0; i < 16; ++i) CHECK(out[i] == 2.0f * x[i], "combine r = 0");
  EXPECT_OK(kk_mfac_diag_cpu(KK_FLOAT32, 0, 16, NULL, 16, 3.0, 1.0, out, 1));
  for (int i = 0; i < 16; ++i) CHECK(out[i] == 3.0f, "diag r = 0");
  EXPECT_OK(kk_mfac_static_setup_cpu(KK_FLOAT32, 0, 16, 4, NULL, 16, 1.0, NULL, 16, 1));
  EXPECT_OK(kk_mfac_window_rebuild_cpu(0, 1.0, NULL, NULL, 1));
  EXPECT_OK(kk_mfac_window_coef_cpu(0, 3, 1.0, NULL, NULL, NULL, 1));
  EXPECT_ERR(kk_mfac_window_update_cpu(0, 1.0, NULL, NULL, 0, NULL, 1), KK_ERR_INVALID_ARGUMENT, "row");
}

int main(void) {
  const kk_dtype dts[3] = {KK_FLOAT32, KK_BFLOAT16, KK_FLOAT64};
  for (int k = 0; k < 3; ++k) {
    const kk_dtype dt = dts[k];
    test_dots(dt, 5, 37, 1000, 1, 0, 1);       /* one block wider than d */
    test_dots(dt, 7, 4500, 4500, 2, 3, 2);     /* one block over three chunks, padded rows */
    test_dots(dt, 6, 2100, 64, 3, 1, 3);       /* small blocks, 4 vectors per pass + 1 */
    test_dots(dt, 9, 5000, 2500, 5, 0, 0);     /* blocks wider than a chunk, 5 vectors */
    test_dots(dt, 3, 130, 7, 1, 2, 2);         /* odd block */
    test_insert(dt, 6, 4200, 5000, 2, 2);
    test_insert(dt, 5, 33, 10, 4, 1);
    test_setup(dt, 6, 50, 100, 0, 1);          /* W form, one block */
    test_setup(dt, 9, 70, 20, 0, 2);           /* E form, short last block */
    test_setup(dt, 5, 23, 8, 0, 3);            /* W form over blocks */
    if (dt != KK_BFLOAT16) {
      test_setup(dt, 7, 40, 100, 1, 2);        /* in place */
      test_setup(dt, 9, 70, 20, 1, 2);
    }
  }
  test_window(1, 1);
  test_window(6, 2);
  test_window(70, 2);
  test_errors();
  printf("ok %s %s %d\n", kk_version(), kk_cpu_isa(), g_checks);
  return 0;
}
