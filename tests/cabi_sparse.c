/* A C99 program using libkernelkit's public header for the sparse family: every CPU entry point
 * (kk_sparse_check_csr, kk_sparse_csr_transpose_cpu, kk_sparse_linear_fwd_cpu / _bwd_cpu) against a
 * naive reference in double, on random CSR weights with empty rows and columns, padded row strides,
 * batches around the kernels' chunk sizes, thread counts 0..7, nnz = 0, batch = 0, offsets past
 * 2^31 elements; and every error path (status, a message naming the argument, outputs untouched).
 * Outputs are NaN-poisoned before each call; padding columns of strided outputs hold a sentinel that
 * must survive.  Built and run by tests/test_sparse_cabi.py and by .ci/run under ASan+UBSan for every
 * ISA variant.  Prints "ok <version> <isa> <count>" and exits 0 on success; on the first failure it
 * prints what failed and exits 1. */
#define _DEFAULT_SOURCE /* MAP_ANONYMOUS / MAP_NORESERVE under -std=c99 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "kernelkit/kernelkit.h"

static int g_checks = 0;
#define FAIL(...)                                          \
  do {                                                     \
    printf("FAIL line %d: ", __LINE__);                    \
    printf(__VA_ARGS__);                                   \
    printf("\n");                                          \
    exit(1);                                               \
  } while (0)
#define CHECK(cond, ...)          \
  do {                                 \
    ++g_checks;                        \
    if (!(cond)) FAIL(__VA_ARGS__);    \
  } while (0)

static const double kSentinel = 12345.0; /* padding columns of strided outputs: must survive */

/* ---- random numbers (splitmix64) ---------------------------------------------------------- */
static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static uint64_t rnd_u64(void) {
  uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
static double rnd_unit(void) { return (double)(rnd_u64() >> 11) / 9007199254740992.0; } /* [0,1) */
static double rnd_val(void) { return 2.0 * rnd_unit() - 1.0; }

static void* xmalloc(size_t n) {
  void* p = malloc(n ? n : 1);
  if (!p) FAIL("out of memory (%zu bytes)", n);
  return p;
}

/* ---- a CSR weight and its reference transpose ----------------------------------------------- */
typedef struct {
  int64_t n_out, n_in, nnz;
  int64_t* row_ptr; /* n_out + 1 */
  int32_t* col_idx; /* nnz */
  double* val;      /* nnz */
  int64_t* col_ptr; /* n_in + 1: reference transpose */
  int32_t* row_idx;
  int64_t* perm;
} Csr;

/* Each entry nonzero with probability `density`; rows listed in every `empty_every`-th position
 * are forced empty (0 = none). */
static Csr make_csr(int64_t n_out, int64_t n_in, double density, int empty_every) {
  Csr w;
  int64_t cap = n_out * n_in, k = 0;
  w.n_out = n_out;
  w.n_in = n_in;
  w.row_ptr = (int64_t*)xmalloc(sizeof(int64_t) * (size_t)(n_out + 1));
  w.col_idx = (int32_t*)xmalloc(sizeof(int32_t) * (size_t)cap);
  w.val = (double*)xmalloc(sizeof(double) * (size_t)cap);
  w.row_ptr[0] = 0;
  for (int64_t r = 0; r < n_out; ++r) {
    int empty = empty_every > 0 && r % empty_every == empty_every - 1;
    for (int64_t c = 0; c < n_in; ++c)
      if (!empty && rnd_unit() < density) {
        w.col_idx[k] = (int32_t)c;
        w.val[k] = rnd_val();
        ++k;
      }
    w.row_ptr[r + 1] = k;
  }
  w.nnz = k;
  /* reference transpose: scan columns, then rows (row_idx ascending within a column), through a
   * dense map of positions (another algorithm than the library's counting sort) */
  int64_t* at = (int64_t*)xmalloc(sizeof(int64_t) * (size_t)cap);
  for (int64_t i = 0; i < cap; ++i) at[i] = -1;
  for (int64_t r = 0; r < n_out; ++r)
    for (int64_t q = w.row_ptr[r]; q < w.row_ptr[r + 1]; ++q) at[r * n_in + w.col_idx[q]] = q;
  w.col_ptr = (int64_t*)xmalloc(sizeof(int64_t) * (size_t)(n_in + 1));
  w.row_idx = (int32_t*)xmalloc(sizeof(int32_t) * (size_t)(k + 1));
  w.perm = (int64_t*)xmalloc(sizeof(int64_t) * (size_t)(k + 1));
  int64_t pos = 0;
  w.col_ptr[0] = 0;
  for (int64_t c = 0; c < n_in; ++c) {
    for (int64_t r = 0; r < n_out; ++r)
      if (at[r * n_in + c] >= 0) {
        w.row_idx[pos] = (int32_t)r;
        w.perm[pos] = at[r * n_in + c];
        ++pos;
      }
    w.col_ptr[c + 1] = pos;
  }
  free(at);
  return w;
}

static void free_csr(Csr* w) {
  free(w->row_ptr);
  free(w->col_idx);
  free(w->val);
  free(w->col_ptr);
  free(w->row_idx);
  free(w->perm);
}

/* ---- typed buffers: the library sees float or double, the checks see double --------------- */
typedef struct {
  kk_dtype dt;
  int64_t n;
  void* p;
} Buf;

static size_t esize(kk_dtype dt) { return dt == KK_FLOAT32 ? sizeof(float) : sizeof(double); }
static Buf buf_new(kk_dtype dt, int64_t n) {
  Buf b;
  b.dt = dt;
  b.n = n;
  b.p = xmalloc(esize(dt) * (size_t)n);
  return b;
}
static double buf_get(const Buf* b, int64_t i) {
  return b->dt == KK_FLOAT32 ? (double)((const float*)b->p)[i] : ((const double*)b->p)[i];
}
static void buf_set(Buf* b, int64_t i, double v) {
  if (b->dt == KK_FLOAT32) ((float*)b->p)[i] = (float)v;
  else ((double*)b->p)[i] = v;
}
/* Buffer of the dtype, holding src (rounded to the dtype) and sets src to the rounded values, so
 * that the reference computes in double with exactly the library's inputs. */
static Buf buf_from(kk_dtype dt, double* src, int64_t n) {
  Buf b = buf_new(dt, n);
  for (int64_t i = 0; i < n; ++i) {
    buf_set(&b, i, src[i]);
    src[i] = buf_get(&b, i);
  }
  return b;
}

/* A rows x width matrix with row stride ld: random values in the first width columns, the
 * sentinel in the padding. */
static double* rand_matrix(int64_t rows, int64_t width, int64_t ld) {
  double* m = (double*)xmalloc(sizeof(double) * (size_t)(rows * ld));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < ld; ++j) m[i * ld + j] = j < width ? rnd_val() : kSentinel;
  return m;
}

/* An output: NaN in the first width columns of each row (poison), the sentinel in the padding. */
static Buf poisoned(kk_dtype dt, int64_t rows, int64_t width, int64_t ld) {
  Buf b = buf_new(dt, rows * ld);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < ld; ++j) buf_set(&b, i * ld + j, j < width ? NAN : kSentinel);
  return b;
}

/* ||got - ref|| / ||ref|| over a rows x width block (row strides ld_got, ld_ref); fails on any
 * non-finite entry (an unwritten, NaN-poisoned element) and on a changed padding sentinel. */
static double rel_err(const Buf* got, int64_t ld_got, const double* ref, int64_t ld_ref, int64_t rows,
                      int64_t width, const char* what) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < width; ++j) {
      double g = buf_get(got, i * ld_got + j), r = ref[i * ld_ref + j];
      CHECK(isfinite(g), "%s[%lld, %lld] is not finite (%g): an element left unwritten?", what,
            (long long)i, (long long)j, g);
      num += (g - r) * (g - r);
      den += r * r;
    }
    for (int64_t j = width; j < ld_got && i < rows; ++j)
      CHECK(buf_get(got, i * ld_got + j) == kSentinel, "%s[%lld, %lld]: padding overwritten", what,
            (long long)i, (long long)j);
  }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

static double tol_of(kk_dtype dt) { return dt == KK_FLOAT32 ? 1e-5 : 1e-12; }

/* ---- the reference ------------------------------------------------------------------------------ */
static void ref_fwd(const Csr* w, const double* v, int64_t batch, const double* x, int64_t ldx,
                    const double* bias, double* out /* batch x n_out, dense */) {
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t r = 0; r < w->n_out; ++r) {
      double s = bias ? bias[r] : 0.0;
      for (int64_t k = w->row_ptr[r]; k < w->row_ptr[r + 1]; ++k) s += v[k] * x[b * ldx + w->col_idx[k]];
      out[b * w->n_out + r] = s;
    }
}

static void ref_bwd(const Csr* w, const double* v, int64_t batch, const double* x, int64_t ldx,
                    const double* dout, int64_t lddo, double* dx /* batch x n_in */, double* dv) {
  for (int64_t i = 0; i < batch * w->n_in; ++i) dx[i] = 0;
  for (int64_t r = 0; r < w->n_out; ++r)
    for (int64_t k = w->row_ptr[r]; k < w->row_ptr[r + 1]; ++k) {
      int64_t c = w->col_idx[k];
      double s = 0;
      for (int64_t b = 0; b < batch; ++b) {
        dx[b * w->n_in + c] += v[k] * dout[b * lddo + r];
        s += dout[b * lddo + r] * x[b * ldx + c];
      }
      dv[k] = s;
    }
}

/* ---- one correctness case -------------------------------------------------------------------- */
static void run_case(kk_dtype dt, int64_t batch, int64_t n_out, int64_t n_in, double density,
                     int empty_every, int64_t pad, int with_bias, int32_t nthreads) {
  char what[160];
  snprintf(what, sizeof what, "case dtype=%d batch=%lld n_out=%lld n_in=%lld density=%.2f pad=%lld bias=%d threads=%d",
           (int)dt, (long long)batch, (long long)n_out, (long long)n_in, density, (long long)pad,
           with_bias, (int)nthreads);
  Csr w = make_csr(n_out, n_in, density, empty_every);
  const int64_t nnz = w.nnz, ldx = n_in + pad, ldo = n_out + pad, lddo = n_out + 2 * pad,
                lddx = n_in + 3 * pad;
  const double tol = tol_of(dt);
  double* x = rand_matrix(batch, n_in, ldx);
  double* dout = rand_matrix(batch, n_out, lddo);
  double* bias = rand_matrix(1, n_out, n_out);
  Buf bx = buf_from(dt, x, batch * ldx), bdo = buf_from(dt, dout, batch * lddo);
  Buf bb = buf_from(dt, bias, n_out), bv = buf_from(dt, w.val, nnz);

  /* the transpose, exactly */
  int64_t* col_ptr = (int64_t*)xmalloc(sizeof(int64_t) * (size_t)(n_in + 1));
  int32_t* row_idx = (int32_t*)xmalloc(sizeof(int32_t) * (size_t)(nnz + 1));
  int64_t* perm = (int64_t*)xmalloc(sizeof(int64_t) * (size_t)(nnz + 1));
  memset(col_ptr, 0xff, sizeof(int64_t) * (size_t)(n_in + 1));
  kk_status st = kk_sparse_csr_transpose_cpu(n_out, n_in, nnz, w.row_ptr, w.col_idx, col_ptr, row_idx, perm);
  CHECK(st == KK_OK, "%s: transpose: %s", what, kk_last_error());
  CHECK(memcmp(col_ptr, w.col_ptr, sizeof(int64_t) * (size_t)(n_in + 1)) == 0, "%s: col_ptr differs", what);
  CHECK(nnz == 0 || memcmp(row_idx, w.row_idx, sizeof(int32_t) * (size_t)nnz) == 0, "%s: row_idx differs", what);
  CHECK(nnz == 0 || memcmp(perm, w.perm, sizeof(int64_t) * (size_t)nnz) == 0, "%s: perm differs", what);
  CHECK(kk_sparse_check_csr(n_out, n_in, nnz, w.row_ptr, w.col_idx) == KK_OK, "%s: check_csr: %s", what, kk_last_error());
  CHECK(kk_sparse_check_csr(n_in, n_out, nnz, col_ptr, row_idx) == KK_OK, "%s: check_csr (CSC): %s", what, kk_last_error());

  /* forward */
  double* ref = (double*)xmalloc(sizeof(double) * (size_t)(batch * n_out + 1));
  ref_fwd(&w, w.val, batch, x, ldx, with_bias ? bias : NULL, ref);
  Buf out = poisoned(dt, batch, n_out, ldo);
  st = kk_sparse_linear_fwd_cpu(dt, batch, n_out, n_in, nnz, w.row_ptr, w.col_idx, bv.p, bx.p, ldx,
                                with_bias ? bb.p : NULL, out.p, ldo, nthreads);
  CHECK(st == KK_OK, "%s: fwd: %s", what, kk_last_error());
  double e = rel_err(&out, ldo, ref, n_out, batch, n_out, "out");
  CHECK(e <= tol, "%s: fwd relative error %.3e > %.0e", what, e, tol);

  /* backward, in every combination of wanted outputs */
  double* rdx = (double*)xmalloc(sizeof(double) * (size_t)(batch * n_in + 1));
  double* rdv = (double*)xmalloc(sizeof(double) * (size_t)(nnz + 1));
  ref_bwd(&w, w.val, batch, x, ldx, dout, lddo, rdx, rdv);
  for (int mode = 0; mode < 4; ++mode) {
    const int want_dx = mode & 1, want_dv = mode & 2;
    Buf dx = poisoned(dt, batch, n_in, lddx), dv = poisoned(dt, 1, nnz, nnz);
    /* pointers only the other output reads are NULL: x only feeds dvalues, values and the column
     * index only feed dx, the row index only dvalues */
    st = kk_sparse_linear_bwd_cpu(dt, batch, n_out, n_in, nnz, want_dv ? w.row_ptr : NULL,
                                  want_dv ? w.col_idx : NULL, want_dx ? col_ptr : NULL,
                                  want_dx ? row_idx : NULL, want_dx ? perm : NULL, want_dx ? bv.p : NULL,
                                  want_dv ? bx.p : NULL, ldx, bdo.p, lddo, want_dx ? dx.p : NULL, lddx,
                                  want_dv ? dv.p : NULL, nthreads);
    CHECK(st == KK_OK, "%s: bwd mode %d: %s", what, mode, kk_last_error());
    if (want_dx) {
      e = rel_err(&dx, lddx, rdx, n_in, batch, n_in, "dx");
      CHECK(e <= tol, "%s: dx (mode %d) relative error %.3e > %.0e", what, mode, e, tol);
    } else {
      for (int64_t i = 0; i < batch; ++i)
        CHECK(isnan(buf_get(&dx, i * lddx)) || n_in == 0, "%s: dx written though not requested", what);
    }
    if (want_dv) {
      e = rel_err(&dv, nnz, rdv, nnz, 1, nnz, "dvalues");
      CHECK(e <= tol, "%s: dvalues (mode %d) relative error %.3e > %.0e", what, mode, e, tol);
    } else {
      CHECK(nnz == 0 || isnan(buf_get(&dv, 0)), "%s: dvalues written though not requested", what);
    }
    free(dx.p);
    free(dv.p);
  }
  free(out.p);
  free(ref);
  free(rdx);
  free(rdv);
  free(col_ptr);
  free(row_idx);
  free(perm);
  free(bx.p);
  free(bdo.p);
  free(bb.p);
  free(bv.p);
  free(x);
  free(dout);
  free(bias);
  free_csr(&w);
}

/* ---- nnz = 0, batch = 0, empty dimensions: everything written, NULL allowed where empty ----- */
static void run_degenerate(kk_dtype dt) {
  enum { B = 5, NO = 7, NI = 9 };
  int64_t row_ptr[NO + 1] = {0}, col_ptr[NI + 1] = {0};
  double xs[B * NI], bias_d[NO], g[B * NO];
  for (int i = 0; i < B * NI; ++i) xs[i] = rnd_val();
  for (int i = 0; i < NO; ++i) bias_d[i] = rnd_val();
  for (int i = 0; i < B * NO; ++i) g[i] = rnd_val();
  Buf x = buf_from(dt, xs, B * NI), bias = buf_from(dt, bias_d, NO), dout = buf_from(dt, g, B * NO);
  /* nnz = 0: out = bias, or zeros without bias; col_idx / values may be NULL */
  for (int with_bias = 0; with_bias < 2; ++with_bias) {
    Buf out = poisoned(dt, B, NO, NO);
    kk_status st = kk_sparse_linear_fwd_cpu(dt, B, NO, NI, 0, row_ptr, NULL, NULL, x.p, NI,
                                            with_bias ? bias.p : NULL, out.p, NO, 2);
    CHECK(st == KK_OK, "nnz=0 fwd: %s", kk_last_error());
    for (int b = 0; b < B; ++b)
      for (int r = 0; r < NO; ++r)
        CHECK(buf_get(&out, b * NO + r) == (with_bias ? bias_d[r] : 0.0), "nnz=0 fwd: out[%d, %d] = %g", b,
              r, buf_get(&out, b * NO + r));
    free(out.p);
  }
  /* nnz = 0 backward: dx = 0 */
  {
    Buf dx = poisoned(dt, B, NI, NI);
    Buf dv = buf_new(dt, 1);
    kk_status st = kk_sparse_linear_bwd_cpu(dt, B, NO, NI, 0, row_ptr, NULL, col_ptr, NULL, NULL, NULL,
                                            x.p, NI, dout.p, NO, dx.p, NI, dv.p, 3);
    CHECK(st == KK_OK, "nnz=0 bwd: %s", kk_last_error());
    for (int i = 0; i < B * NI; ++i) CHECK(buf_get(&dx, i) == 0.0, "nnz=0 bwd: dx[%d] = %g", i, buf_get(&dx, i));
    free(dx.p);
    free(dv.p);
  }
  /* batch = 0: x, out, dout, dx may be NULL; dvalues is zero */
  {
    int64_t rp[3] = {0, 2, 3};
    int32_t ci[3] = {1, 4, 0};
    int64_t cp[6], pm[3];
    int32_t ri[3];
    double vd[3] = {0.5, -1.5, 2.0};
    Buf v = buf_from(dt, vd, 3);
    CHECK(kk_sparse_csr_transpose_cpu(2, 5, 3, rp, ci, cp, ri, pm) == KK_OK, "transpose: %s", kk_last_error());
    CHECK(cp[0] == 0 && cp[1] == 1 && cp[2] == 2 && cp[3] == 2 && cp[4] == 2 && cp[5] == 3, "col_ptr");
    CHECK(ri[0] == 1 && ri[1] == 0 && ri[2] == 0 && pm[0] == 2 && pm[1] == 0 && pm[2] == 1, "row_idx/perm");
    kk_status st = kk_sparse_linear_fwd_cpu(dt, 0, 2, 5, 3, rp, ci, v.p, NULL, 5, NULL, NULL, 2, 0);
    CHECK(st == KK_OK, "batch=0 fwd: %s", kk_last_error());
    Buf dv = poisoned(dt, 1, 3, 3);
    st = kk_sparse_linear_bwd_cpu(dt, 0, 2, 5, 3, rp, ci, cp, ri, pm, v.p, NULL, 5, NULL, 2, NULL, 5, dv.p, 0);
    CHECK(st == KK_OK, "batch=0 bwd: %s", kk_last_error());
    for (int k = 0; k < 3; ++k) CHECK(buf_get(&dv, k) == 0.0, "batch=0: dvalues[%d] = %g", k, buf_get(&dv, k));
    /* the index is still checked with batch = 0 */
    ci[1] = 5;
    st = kk_sparse_linear_fwd_cpu(dt, 0, 2, 5, 3, rp, ci, v.p, NULL, 5, NULL, NULL, 2, 0);
    CHECK(st == KK_ERR_INVALID_ARGUMENT && strstr(kk_last_error(), "col_idx[1]"), "batch=0 bad index: %d %s",
          (int)st, kk_last_error());
    free(dv.p);
    free(v.p);
  }
  /* n_in = 0 (out = bias, x may be NULL), n_out = 0 (nothing to write, dx = 0) */
  {
    int64_t zp[NO + 1] = {0};
    Buf out = poisoned(dt, B, NO, NO);
    kk_status st = kk_sparse_linear_fwd_cpu(dt, B, NO, 0, 0, zp, NULL, NULL, NULL, 0, bias.p, out.p, NO, 2);
    CHECK(st == KK_OK, "n_in=0 fwd: %s", kk_last_error());
    for (int i = 0; i < B * NO; ++i) CHECK(buf_get(&out, i) == bias_d[i % NO], "n_in=0: out[%d]", i);
    int64_t one[1] = {0};
    st = kk_sparse_linear_fwd_cpu(dt, B, 0, NI, 0, one, NULL, NULL, x.p, NI, NULL, NULL, 0, 2);
    CHECK(st == KK_OK, "n_out=0 fwd: %s", kk_last_error());
    Buf dx = poisoned(dt, B, NI, NI);
    st = kk_sparse_linear_bwd_cpu(dt, B, 0, NI, 0, NULL, NULL, col_ptr, NULL, NULL, NULL, NULL, NI, NULL, 0,
                                  dx.p, NI, NULL, 2);
    CHECK(st == KK_OK, "n_out=0 bwd: %s", kk_last_error());
    for (int i = 0; i < B * NI; ++i) CHECK(buf_get(&dx, i) == 0.0, "n_out=0: dx[%d]", i);
    /* nothing requested: OK, nothing read */
    st = kk_sparse_linear_bwd_cpu(dt, B, NO, NI, 3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 0, NULL, 0, NULL,
                                  0, NULL, 1);
    CHECK(st == KK_OK, "bwd with no output: %s", kk_last_error());
    free(out.p);
    free(dx.p);
  }
  free(x.p);
  free(bias.p);
  free(dout.p);
}

/* ---- row offsets past 2^31 elements: 64-bit index arithmetic on every strided matrix -------- */
static void run_large_ld(void) {
#if defined(__linux__)
  const int64_t B = 3, NO = 24, NI = 40, ld = ((int64_t)1 << 31) + 64;
  const size_t bytes = (size_t)((B - 1) * ld + NI + 64) * sizeof(float);
  float* m[4];
  for (int i = 0; i < 4; ++i) {
    void* p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      printf("note: large-stride case skipped (mmap of %zu bytes refused)\n", bytes);
      for (int j = 0; j < i; ++j) munmap(m[j], bytes);
      return;
    }
    m[i] = (float*)p; /* untouched pages stay unallocated: only B rows are used */
  }
  float *x = m[0], *out = m[1], *dout = m[2], *dx = m[3];
  Csr w = make_csr(NO, NI, 0.3, 5);
  float* v = (float*)xmalloc(sizeof(float) * (size_t)(w.nnz + 1));
  double* vd = (double*)xmalloc(sizeof(double) * (size_t)(w.nnz + 1));
  for (int64_t k = 0; k < w.nnz; ++k) vd[k] = v[k] = (float)w.val[k];
  double xd[3 * 40], gd[3 * 24], ref[3 * 24], rdx[3 * 40];
  double* rdv = (double*)xmalloc(sizeof(double) * (size_t)(w.nnz + 1));
  float* dv = (float*)xmalloc(sizeof(float) * (size_t)(w.nnz + 1));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < NI; ++c) xd[b * NI + c] = x[b * ld + c] = (float)rnd_val();
    for (int64_t r = 0; r < NO; ++r) {
      gd[b * NO + r] = dout[b * ld + r] = (float)rnd_val();
      out[b * ld + r] = NAN;
    }
    for (int64_t c = 0; c < NI; ++c) dx[b * ld + c] = NAN;
  }
  ref_fwd(&w, vd, B, xd, NI, NULL, ref);
  ref_bwd(&w, vd, B, xd, NI, gd, NO, rdx, rdv);
  kk_status st = kk_sparse_linear_fwd_cpu(KK_FLOAT32, B, NO, NI, w.nnz, w.row_ptr, w.col_idx, v, x, ld, NULL,
                                          out, ld, 2);
  CHECK(st == KK_OK, "large ld fwd: %s", kk_last_error());
  st = kk_sparse_linear_bwd_cpu(KK_FLOAT32, B, NO, NI, w.nnz, w.row_ptr, w.col_idx, w.col_ptr, w.row_idx, w.perm,
                                v, x, ld, dout, ld, dx, ld, dv, 2);
  CHECK(st == KK_OK, "large ld bwd: %s", kk_last_error());
  double num = 0, den = 0, num2 = 0, den2 = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t r = 0; r < NO; ++r) {
      double d = out[b * ld + r] - ref[b * NO + r];
      CHECK(isfinite(out[b * ld + r]), "large ld: out[%lld, %lld] unwritten", (long long)b, (long long)r);
      num += d * d;
      den += ref[b * NO + r] * ref[b * NO + r];
    }
    for (int64_t c = 0; c < NI; ++c) {
      double d = dx[b * ld + c] - rdx[b * NI + c];
      CHECK(isfinite(dx[b * ld + c]), "large ld: dx[%lld, %lld] unwritten", (long long)b, (long long)c);
      num2 += d * d;
      den2 += rdx[b * NI + c] * rdx[b * NI + c];
    }
  }
  CHECK(sqrt(num / den) <= 1e-5, "large ld: fwd error %.3e", sqrt(num / den));
  CHECK(sqrt(num2 / den2) <= 1e-5, "large ld: dx error %.3e", sqrt(num2 / den2));
  num = den = 0;
  for (int64_t k = 0; k < w.nnz; ++k) {
    num += (dv[k] - rdv[k]) * (dv[k] - rdv[k]);
    den += rdv[k] * rdv[k];
  }
  CHECK(sqrt(num / den) <= 1e-5, "large ld: dvalues error %.3e", sqrt(num / den));
  for (int i = 0; i < 4; ++i) munmap(m[i], bytes);
  free(v);
  free(vd);
  free(rdv);
  free(dv);
  free_csr(&w);
#endif
}

/* ---- error paths ------------------------------------------------------------------------------- */
static void expect(kk_status st, kk_status want, const char* word, const char* what) {
  CHECK(st == want, "%s: status %d (%s), want %d; message: %s", what, (int)st, kk_status_string(st), (int)want,
        kk_last_error());
  CHECK(strstr(kk_last_error(), word) != NULL, "%s: message \"%s\" does not name \"%s\"", what, kk_last_error(),
        word);
}

static void run_errors(void) {
  /* W (3 x 4):  row 0: cols 0, 2;  row 1: none;  row 2: cols 1, 2, 3 */
  enum { B = 2, NO = 3, NI = 4, NNZ = 5 };
  int64_t rp[NO + 1] = {0, 2, 2, 5};
  int32_t ci[NNZ] = {0, 2, 1, 2, 3};
  int64_t cp[NI + 1], pm[NNZ];
  int32_t ri[NNZ];
  double v[NNZ] = {1, 2, 3, 4, 5}, x[B * NI], out[B * NO], g[B * NO], dx[B * NI], dv[NNZ], bias[NO] = {1, 1, 1};
  for (int i = 0; i < B * NI; ++i) x[i] = rnd_val();
  for (int i = 0; i < B * NO; ++i) g[i] = rnd_val();
  CHECK(kk_sparse_csr_transpose_cpu(NO, NI, NNZ, rp, ci, cp, ri, pm) == KK_OK, "transpose: %s", kk_last_error());
  const kk_dtype D = KK_FLOAT64;
#define FWD(dt, b, no, ni, nnz, rp_, ci_, v_, x_, ldx, out_, ldo) \
  kk_sparse_linear_fwd_cpu(dt, b, no, ni, nnz, rp_, ci_, v_, x_, ldx, bias, out_, ldo, 2)
#define BWD(b, nnz, rp_, ci_, cp_, ri_, pm_, v_, x_, ldx, g_, lddo, dx_, lddx, dv_) \
  kk_sparse_linear_bwd_cpu(D, b, NO, NI, nnz, rp_, ci_, cp_, ri_, pm_, v_, x_, ldx, g_, lddo, dx_, lddx, dv_, 2)

  for (int i = 0; i < B * NO; ++i) out[i] = NAN;
  expect(FWD(KK_FLOAT16, B, NO, NI, NNZ, rp, ci, v, x, NI, out, NO), KK_ERR_UNSUPPORTED_DTYPE, "dtype", "fp16");
  expect(FWD((kk_dtype)77, B, NO, NI, NNZ, rp, ci, v, x, NI, out, NO), KK_ERR_UNSUPPORTED_DTYPE, "dtype", "dtype 77");
  expect(FWD(D, -1, NO, NI, NNZ, rp, ci, v, x, NI, out, NO), KK_ERR_INVALID_SIZE, "batch", "batch < 0");
  expect(FWD(D, B, -3, NI, NNZ, rp, ci, v, x, NI, out, NO), KK_ERR_INVALID_SIZE, "n_out", "n_out < 0");
  expect(FWD(D, B, NO, -4, NNZ, rp, ci, v, x, NI, out, NO), KK_ERR_INVALID_SIZE, "n_in", "n_in < 0");
  expect(FWD(D, B, NO, NI, -5, rp, ci, v, x, NI, out, NO), KK_ERR_INVALID_SIZE, "nnz", "nnz < 0");
  expect(FWD(D, B, NO, NI, 13, rp, ci, v, x, NI, out, NO), KK_ERR_INVALID_SIZE, "nnz", "nnz > n_out*n_in");
  expect(FWD(D, B, NO, NI, NNZ, NULL, ci, v, x, NI, out, NO), KK_ERR_NULL_POINTER, "row_ptr", "row_ptr NULL");
  expect(FWD(D, B, NO, NI, NNZ, rp, NULL, v, x, NI, out, NO), KK_ERR_NULL_POINTER, "col_idx", "col_idx NULL");
  expect(FWD(D, B, NO, NI, NNZ, rp, ci, NULL, x, NI, out, NO), KK_ERR_NULL_POINTER, "values", "values NULL");
  expect(FWD(D, B, NO, NI, NNZ, rp, ci, v, NULL, NI, out, NO), KK_ERR_NULL_POINTER, "x", "x NULL");
  expect(FWD(D, B, NO, NI, NNZ, rp, ci, v, x, NI, NULL, NO), KK_ERR_NULL_POINTER, "out", "out NULL");
  expect(FWD(D, B, NO, NI, NNZ, rp, ci, v, x, NI - 1, out, NO), KK_ERR_INVALID_ARGUMENT, "ldx", "ldx < n_in");
  expect(FWD(D, B, NO, NI, NNZ, rp, ci, v, x, NI, out, NO - 1), KK_ERR_INVALID_ARGUMENT, "ldo", "ldo < n_out");
  /* index contents: each corruption names the array and the position */
  struct { int which; int64_t pos, value; kk_status want; const char* word; } bad[] = {
      {0, 0, 1, KK_ERR_INVALID_ARGUMENT, "row_ptr[0]"},          /* ptr[0] != 0 */
      {0, 1, 3, KK_ERR_INVALID_ARGUMENT, "row_ptr[2]"},          /* decreasing: 3 then 2 */
      {0, 2, 6, KK_ERR_INVALID_ARGUMENT, "row_ptr[2]"},          /* past nnz */
      {0, 3, 4, KK_ERR_INVALID_ARGUMENT, "row_ptr[3]"},          /* last != nnz */
      {1, 2, 4, KK_ERR_INVALID_ARGUMENT, "col_idx[2]"},          /* == n_in */
      {1, 0, -1, KK_ERR_INVALID_ARGUMENT, "col_idx[0]"},         /* negative */
      {1, 3, 1, KK_ERR_INVALID_ARGUMENT, "col_idx[3]"},          /* not increasing (1 after 1) */
      {1, 4, 2, KK_ERR_INVALID_ARGUMENT, "strictly increasing"}, /* duplicate column */
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; ++i) {
    int64_t rp2[NO + 1];
    int32_t ci2[NNZ];
    memcpy(rp2, rp, sizeof rp);
    memcpy(ci2, ci, sizeof ci);
    if (bad[i].which == 0) rp2[bad[i].pos] = bad[i].value;
    else ci2[bad[i].pos] = (int32_t)bad[i].value;
    char what[64];
    snprintf(what, sizeof what, "bad index case %d", (int)i);
    expect(FWD(D, B, NO, NI, NNZ, rp2, ci2, v, x, NI, out, NO), bad[i].want, bad[i].word, what);
    expect(kk_sparse_check_csr(NO, NI, NNZ, rp2, ci2), bad[i].want,
           bad[i].which == 0 ? "ptr[" : "idx[", what);
    expect(kk_sparse_csr_transpose_cpu(NO, NI, NNZ, rp2, ci2, cp, ri, pm), bad[i].want, bad[i].word, what);
    /* the backward checks the row index when dvalues is wanted */
    expect(BWD(B, NNZ, rp2, ci2, cp, ri, pm, v, x, NI, g, NO, NULL, NI, dv), bad[i].want, bad[i].word, what);
  }
  for (int i = 0; i < B * NO; ++i) CHECK(isnan(out[i]), "out written by a failing call");
  CHECK(kk_sparse_csr_transpose_cpu(NO, NI, NNZ, rp, ci, cp, ri, pm) == KK_OK, "transpose: %s", kk_last_error());

  /* kk_sparse_check_csr */
  expect(kk_sparse_check_csr(-1, NI, 0, rp, ci), KK_ERR_INVALID_SIZE, "n_rows", "check n_rows < 0");
  expect(kk_sparse_check_csr(NO, -1, 0, rp, ci), KK_ERR_INVALID_SIZE, "n_cols", "check n_cols < 0");
  expect(kk_sparse_check_csr(NO, NI, NNZ, NULL, ci), KK_ERR_NULL_POINTER, "ptr", "check ptr NULL");
  expect(kk_sparse_check_csr(NO, NI, NNZ, rp, NULL), KK_ERR_NULL_POINTER, "idx", "check idx NULL");
  {
    int64_t zp[NO + 1] = {0, 0, 0, 0};
    CHECK(kk_sparse_check_csr(NO, NI, 0, zp, NULL) == KK_OK, "check nnz=0 with idx NULL: %s", kk_last_error());
    CHECK(kk_sparse_check_csr(0, 0, 0, zp, NULL) == KK_OK, "check empty matrix: %s", kk_last_error());
    expect(kk_sparse_check_csr(1, 0, 1, zp, ci), KK_ERR_INVALID_SIZE, "nnz", "check nnz > n_rows*n_cols");
  }
  /* transpose outputs */
  expect(kk_sparse_csr_transpose_cpu(NO, NI, NNZ, rp, ci, NULL, ri, pm), KK_ERR_NULL_POINTER, "col_ptr", "tr col_ptr");
  expect(kk_sparse_csr_transpose_cpu(NO, NI, NNZ, rp, ci, cp, NULL, pm), KK_ERR_NULL_POINTER, "row_idx", "tr row_idx");
  expect(kk_sparse_csr_transpose_cpu(NO, NI, NNZ, rp, ci, cp, ri, NULL), KK_ERR_NULL_POINTER, "perm", "tr perm");

  /* backward */
  for (int i = 0; i < B * NI; ++i) dx[i] = NAN;
  for (int i = 0; i < NNZ; ++i) dv[i] = NAN;
  expect(BWD(B, NNZ, rp, ci, cp, ri, pm, v, x, NI, NULL, NO, dx, NI, dv), KK_ERR_NULL_POINTER, "dout", "bwd dout");
  expect(BWD(B, NNZ, rp, ci, cp, ri, pm, v, NULL, NI, g, NO, dx, NI, dv), KK_ERR_NULL_POINTER, "x", "bwd x");
  expect(BWD(B, NNZ, rp, ci, cp, ri, pm, NULL, x, NI, g, NO, dx, NI, dv), KK_ERR_NULL_POINTER, "values", "bwd values");
  expect(BWD(B, NNZ, rp, ci, NULL, ri, pm, v, x, NI, g, NO, dx, NI, dv), KK_ERR_NULL_POINTER, "col_ptr", "bwd col_ptr");
  expect(BWD(B, NNZ, rp, ci, cp, NULL, pm, v, x, NI, g, NO, dx, NI, dv), KK_ERR_NULL_POINTER, "row_idx", "bwd row_idx");
  expect(BWD(B, NNZ, rp, ci, cp, ri, NULL, v, x, NI, g, NO, dx, NI, dv), KK_ERR_NULL_POINTER, "perm", "bwd perm");
  expect(BWD(B, NNZ, NULL, ci, cp, ri, pm, v, x, NI, g, NO, dx, NI, dv), KK_ERR_NULL_POINTER, "row_ptr", "bwd row_ptr");
  expect(BWD(B, NNZ, rp, ci, cp, ri, pm, v, x, NI, g, NO - 1, dx, NI, dv), KK_ERR_INVALID_ARGUMENT, "lddo", "lddo");
  expect(BWD(B, NNZ, rp, ci, cp, ri, pm, v, x, NI - 1, g, NO, dx, NI, dv), KK_ERR_INVALID_ARGUMENT, "ldx", "bwd ldx");
  expect(BWD(B, NNZ, rp, ci, cp, ri, pm, v, x, NI, g, NO, dx, NI - 1, dv), KK_ERR_INVALID_ARGUMENT, "lddx", "lddx");
  expect(kk_sparse_linear_bwd_cpu(KK_BFLOAT16, B, NO, NI, NNZ, rp, ci, cp, ri, pm, v, x, NI, g, NO, dx, NI, dv, 1),
         KK_ERR_UNSUPPORTED_DTYPE, "dtype", "bwd bf16");
  expect(BWD(-2, NNZ, rp, ci, cp, ri, pm, v, x, NI, g, NO, dx, NI, dv), KK_ERR_INVALID_SIZE, "batch", "bwd batch");
  {
    int64_t cp2[NI + 1], pm2[NNZ];
    int32_t ri2[NNZ];
    memcpy(cp2, cp, sizeof cp);
    memcpy(pm2, pm, sizeof pm);
    memcpy(ri2, ri, sizeof ri);
    cp2[2] = 0; /* col_ptr decreasing (cp = 0 1 2 4 5) */
    expect(BWD(B, NNZ, rp, ci, cp2, ri, pm, v, x, NI, g, NO, dx, NI, NULL), KK_ERR_INVALID_ARGUMENT, "col_ptr[",
           "bwd col_ptr order");
    memcpy(cp2, cp, sizeof cp);
    ri2[3] = 3; /* row index == n_out */
    expect(BWD(B, NNZ, rp, ci, cp, ri2, pm, v, x, NI, g, NO, dx, NI, NULL), KK_ERR_INVALID_ARGUMENT, "row_idx[3]",
           "bwd row_idx range");
    memcpy(ri2, ri, sizeof ri);
    pm2[4] = NNZ; /* perm out of range */
    expect(BWD(B, NNZ, rp, ci, cp, ri, pm2, v, x, NI, g, NO, dx, NI, NULL), KK_ERR_INVALID_ARGUMENT, "perm[4]",
           "bwd perm range");
    pm2[4] = -1;
    expect(BWD(B, NNZ, rp, ci, cp, ri, pm2, v, x, NI, g, NO, dx, NI, NULL), KK_ERR_INVALID_ARGUMENT, "perm[4]",
           "bwd perm negative");
    memcpy(pm2, pm, sizeof pm);
    pm2[0] = pm[1]; /* in range but not the transpose: accepted for dx alone, refused with dvalues */
    pm2[1] = pm[0];
    expect(BWD(B, NNZ, rp, ci, cp, ri, pm2, v, x, NI, g, NO, dx, NI, dv), KK_ERR_INVALID_ARGUMENT, "perm[0]",
           "bwd perm mismatch");
    for (int i = 0; i < B * NI; ++i) CHECK(isnan(dx[i]), "dx written by a failing call");
    for (int i = 0; i < NNZ; ++i) CHECK(isnan(dv[i]), "dvalues written by a failing call");
    CHECK(BWD(B, NNZ, rp, ci, cp, ri, pm2, v, x, NI, g, NO, dx, NI, NULL) == KK_OK, "dx with a permuted perm: %s",
          kk_last_error());
  }
  /* a scratch allocation that fails is a status, not a crash (n_in = 2^50: the packed x chunk would
   * need 2^57 bytes; x itself is never read).  ASan's allocator aborts on such a request instead of
   * returning NULL, so the sanitizer build skips this case. */
#if !defined(__SANITIZE_ADDRESS__)
  {
    int64_t rp1[2] = {0, 1};
    int32_t ci1[1] = {0};
    float v1[1] = {1.0f}, x1[4] = {0}, o1[1] = {NAN};
    const int64_t huge = (int64_t)1 << 50;
    expect(kk_sparse_linear_fwd_cpu(KK_FLOAT32, 1, 1, huge, 1, rp1, ci1, v1, x1, huge, NULL, o1, 1, 2),
           KK_ERR_OUT_OF_MEMORY, "memory", "huge n_in");
    CHECK(isnan(o1[0]), "out written by a failing call");
  }
#endif
  /* x is only read for dvalues, the column index and values only for dx */
  CHECK(BWD(B, NNZ, NULL, NULL, cp, ri, pm, v, NULL, 0, g, NO, dx, NI, NULL) == KK_OK, "dx only: %s", kk_last_error());
  CHECK(BWD(B, NNZ, rp, ci, NULL, NULL, NULL, NULL, x, NI, g, NO, NULL, 0, dv) == KK_OK, "dv only: %s",
        kk_last_error());
  /* a successful call clears the message */
  CHECK(kk_last_error()[0] == '\0', "last error not cleared: %s", kk_last_error());
#undef FWD
#undef BWD
}

/* ---- the dense path's conversions: kk_sparse_to_dense_cpu and its adjoint kk_sparse_gather_cpu -- */
static void run_conversions(void) {
  const int64_t shapes[3][2] = {{7, 9}, {37, 53}, {1, 300}};
  for (int i = 0; i < 3; ++i) {
    const int64_t n_out = shapes[i][0], n_in = shapes[i][1], ld = n_in + 3;
    Csr w = make_csr(n_out, n_in, 0.3, 3);
    double* dense = (double*)xmalloc(sizeof(double) * (size_t)(n_out * ld));
    for (int64_t e = 0; e < n_out * ld; ++e) dense[e] = kSentinel;
    CHECK(kk_sparse_to_dense_cpu(KK_FLOAT64, n_out, n_in, w.nnz, w.row_ptr, w.col_idx, w.val, dense, ld, 2) == KK_OK,
          "to_dense: %s", kk_last_error());
    int64_t k = 0;
    for (int64_t r = 0; r < n_out; ++r)
      for (int64_t c = 0; c < ld; ++c) {
        double want = c >= n_in ? kSentinel : 0.0;
        if (c < n_in && k < w.row_ptr[r + 1] && w.col_idx[k] == c) want = w.val[k++];
        CHECK(dense[r * ld + c] == want, "to_dense[%lld, %lld] = %g, want %g", (long long)r, (long long)c,
              dense[r * ld + c], want);
      }
    for (int64_t e = 0; e < n_out * ld; ++e) dense[e] = rnd_val();
    double* got = (double*)xmalloc(sizeof(double) * (size_t)(w.nnz + 1));
    CHECK(kk_sparse_gather_cpu(KK_FLOAT64, n_out, n_in, w.nnz, w.row_ptr, w.col_idx, dense, ld, got, 0) == KK_OK,
          "gather: %s", kk_last_error());
    for (int64_t r = 0; r < n_out; ++r)
      for (int64_t q = w.row_ptr[r]; q < w.row_ptr[r + 1]; ++q)
        CHECK(got[q] == dense[r * ld + w.col_idx[q]], "gather[%lld]", (long long)q);
    /* a column index past n_in is refused before anything is written */
    if (w.nnz > 0) {
      int32_t saved = w.col_idx[w.nnz - 1];
      w.col_idx[w.nnz - 1] = (int32_t)n_in;
      CHECK(kk_sparse_to_dense_cpu(KK_FLOAT64, n_out, n_in, w.nnz, w.row_ptr, w.col_idx, w.val, dense, ld, 1) ==
                KK_ERR_INVALID_ARGUMENT, "to_dense accepted a column out of range");
      w.col_idx[w.nnz - 1] = saved;
    }
    free(got);
    free(dense);
    free_csr(&w);
  }
}

int main(void) {
  if (kk_abi_version() != KK_ABI_VERSION) FAIL("abi mismatch: %d", kk_abi_version());
  const kk_dtype dts[2] = {KK_FLOAT64, KK_FLOAT32};
  for (int d = 0; d < 2; ++d) {
    kk_dtype dt = dts[d];
    /* batches around the panel widths (1, 2 and 4-8 vectors of 2-16 lanes: 2..64 rows) and both
     * thread splits (chunks / rows) */
    run_case(dt, 1, 9, 13, 0.5, 0, 0, 1, 1);
    run_case(dt, 12, 33, 21, 0.3, 6, 1, 1, 2);
    run_case(dt, 24, 19, 40, 0.25, 0, 0, 0, 2);
    run_case(dt, 5, 40, 33, 0.3, 4, 3, 1, 2);
    run_case(dt, 33, 17, 70, 0.15, 3, 1, 0, 3);
    run_case(dt, 70, 64, 48, 0.1, 0, 0, 1, 0);
    run_case(dt, 100, 50, 120, 0.05, 7, 5, 1, 2);
    run_case(dt, 300, 96, 80, 0.2, 5, 0, 1, 2);
    run_case(dt, 129, 31, 200, 0.02, 0, 2, 0, 7);
    run_case(dt, 64, 120, 30, 0.9, 0, 0, 1, 1);
    run_case(dt, 40, 25, 25, 1.0, 0, 1, 1, 2); /* fully dense */
    run_case(dt, 48, 20, 30, 0.01, 0, 0, 1, 2); /* mostly empty rows and columns */
    /* past the 16 MiB the library keeps cached per thread: per-call arrays of nnz elements
     * (4.7M nonzeros), and packed panels of n_in rows (140000 columns) are freed after use */
    run_case(dt, 3, 2048, 2560, 0.9, 0, 0, 1, 2);
    run_case(dt, 2, 3, 140000, 0.01, 0, 1, 1, 2);
    run_degenerate(dt);
  }
  run_large_ld();
  run_errors();
  run_conversions();
  printf("ok %s %s %d\n", kk_version(), kk_cpu_isa(), g_checks);
  return 0;
}
