/* A C99 program using libkernelkit's public header for the vq family: every CPU entry point
 * (kk_vq_check_codes, kk_vq_dequantize_cpu, kk_vq_linear_fwd_cpu / _bwd_cpu, kk_vq_assign_cpu)
 * against a naive reference in double, in float32 and float64, over group sizes 1..16, 1..8
 * codebooks, K from 3 to 65536 (uint8 and int16 codes, codes >= 2^15 stored negative), per-set
 * codebooks, with and without scales and bias, padded row strides, batches around the kernels'
 * tiles, every path and thread counts 0..3, batch / n_out / n_in = 0; and every error path (status, a
 * message naming the argument, the bad code's row/group/codebook/value).  Outputs are NaN-poisoned
 * before each call; padding columns of strided outputs hold a sentinel that must survive.  Built and
 * run by tests/test_vq_cabi.py and by .ci/run under ASan+UBSan for every ISA variant.  Prints
 * "ok <version> <isa> <count>" and exits 0 on success; on the first failure it prints what failed
 * and exits 1. */
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

static const double kSentinel = 12345.0;

static uint64_t g_rng = 0x2545f4914f6cdd1dull;
static uint64_t rnd_u64(void) {
  uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
static double rnd_val(void) { return 2.0 * ((double)(rnd_u64() >> 11) / 9007199254740992.0) - 1.0; }
static int64_t rnd_int(int64_t n) { return (int64_t)(rnd_u64() % (uint64_t)n); }

static void* xmalloc(size_t n) {
  void* p = malloc(n ? n : 1);
  if (!p) FAIL("out of memory (%zu bytes)", n);
  return p;
}

/* ---- typed buffers --------------------------------------------------------------------------- */
static size_t esz(kk_dtype dt) { return dt == KK_FLOAT32 ? 4 : 8; }
static double get(const void* p, int64_t i, kk_dtype dt) {
  return dt == KK_FLOAT32 ? (double)((const float*)p)[i] : ((const double*)p)[i];
}
static void set(void* p, int64_t i, double v, kk_dtype dt) {
  if (dt == KK_FLOAT32) ((float*)p)[i] = (float)v;
  else ((double*)p)[i] = v;
}
/* A typed copy of n doubles, and those values rounded back to double (the reference's inputs). */
static void* typed(const double* src, int64_t n, kk_dtype dt, double* rounded) {
  void* p = xmalloc((size_t)n * esz(dt));
  for (int64_t i = 0; i < n; ++i) {
    set(p, i, src[i], dt);
    if (rounded) rounded[i] = get(p, i, dt);
  }
  return p;
}
static void* poisoned(int64_t rows, int64_t cols, int64_t ld, kk_dtype dt) {
  void* p = xmalloc((size_t)(rows * ld) * esz(dt));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < ld; ++c) set(p, r * ld + c, c < cols ? NAN : kSentinel, dt);
  return p;
}
/* Relative Frobenius error of a strided typed matrix against a dense double one; the padding must
 * still hold the sentinel and every element must be finite. */
static double rel_err(const void* got, int64_t rows, int64_t cols, int64_t ld, kk_dtype dt, const double* ref,
                      const char* what) {
  double num = 0, den = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < ld; ++c) {
      const double g = get(got, r * ld + c, dt);
      if (c >= cols) {
        CHECK(g == kSentinel, "%s: padding (%lld, %lld) overwritten", what, (long long)r, (long long)c);
        continue;
      }
      CHECK(isfinite(g), "%s: element (%lld, %lld) not written (%g)", what, (long long)r, (long long)c, g);
      const double e = ref[r * cols + c];
      num += (g - e) * (g - e);
      den += e * e;
    }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}
static double tol(kk_dtype dt) { return dt == KK_FLOAT32 ? 2e-5 : 1e-12; }

/* ---- a quantized weight ---------------------------------------------------------------------- */
typedef struct {
  kk_vq_format f;
  int64_t G, S, ncodes, ncb;
  void* codes;      /* uint8 or int16 */
  uint32_t* ucode;  /* the codes as unsigned values */
  double* cb;       /* [S, M, K, d] */
  double* sc;       /* [n_out] */
  double* bias;     /* [n_out] */
} Weight;

static Weight make_weight(int64_t n_out, int64_t n_in, int64_t K, int64_t rpc, int d, int M, int bits) {
  Weight w;
  memset(&w, 0, sizeof(w));
  w.f.n_out = n_out;
  w.f.n_in = n_in;
  w.f.codebook_size = K;
  w.f.rows_per_codebook = rpc;
  w.f.group_size = d;
  w.f.num_codebooks = M;
  w.f.code_bits = bits;
  w.f.flags = 0;
  w.G = n_in / d;
  w.S = n_out == 0 ? 0 : (n_out - 1) / rpc + 1;
  w.ncodes = n_out * w.G * M;
  w.ncb = w.S * M * K * d;
  w.codes = xmalloc((size_t)w.ncodes * (bits / 8));
  w.ucode = (uint32_t*)xmalloc((size_t)w.ncodes * 4);
  for (int64_t i = 0; i < w.ncodes; ++i) {
    /* the largest code often: it is the one a bad unsigned read would break (2^16 - 1 is -1) */
    const uint32_t c = (uint32_t)(rnd_int(4) == 0 ? K - 1 : rnd_int(K));
    w.ucode[i] = c;
    if (bits == 8) ((uint8_t*)w.codes)[i] = (uint8_t)c;
    else ((int16_t*)w.codes)[i] = (int16_t)(c >= 32768 ? (int32_t)c - 65536 : (int32_t)c);
  }
  w.cb = (double*)xmalloc((size_t)w.ncb * 8);
  for (int64_t i = 0; i < w.ncb; ++i) w.cb[i] = rnd_val();
  w.sc = (double*)xmalloc((size_t)n_out * 8);
  w.bias = (double*)xmalloc((size_t)n_out * 8);
  for (int64_t i = 0; i < n_out; ++i) {
    w.sc[i] = 0.5 + rnd_val() * 0.4;
    w.bias[i] = rnd_val();
  }
  return w;
}
static void free_weight(Weight* w) {
  free(w->codes);
  free(w->ucode);
  free(w->cb);
  free(w->sc);
  free(w->bias);
}

/* U (n_out, n_in): W without the scale, from the given (rounded) codebooks. */
static double* ref_unscaled(const Weight* w, const double* cb) {
  const int64_t n_out = w->f.n_out, n_in = w->f.n_in, K = w->f.codebook_size;
  const int d = w->f.group_size, M = w->f.num_codebooks;
  double* U = (double*)xmalloc((size_t)(n_out * n_in) * 8);
  for (int64_t o = 0; o < n_out; ++o)
    for (int64_t g = 0; g < w->G; ++g)
      for (int t = 0; t < d; ++t) {
        double s = 0;
        for (int m = 0; m < M; ++m) {
          const int64_t k = w->ucode[(o * w->G + g) * M + m];
          s += cb[(((o / w->f.rows_per_codebook) * M + m) * K + k) * d + t];
        }
        U[o * n_in + g * d + t] = s;
      }
  return U;
}

/* ---- the linear entry points ------------------------------------------------------------------ */
static void test_linear(const Weight* w, int64_t batch, kk_dtype dt, int use_scales, int use_bias, int path,
                        int nt, int64_t pad) {
  const int64_t n_out = w->f.n_out, n_in = w->f.n_in;
  const int64_t ldx = n_in + pad, ldo = n_out + pad;
  double* cbr = (double*)xmalloc((size_t)w->ncb * 8);
  double* scr = (double*)xmalloc((size_t)n_out * 8);
  double* br = (double*)xmalloc((size_t)n_out * 8);
  void* cb = typed(w->cb, w->ncb, dt, cbr);
  void* sc = use_scales ? typed(w->sc, n_out, dt, scr) : NULL;
  void* bias = use_bias ? typed(w->bias, n_out, dt, br) : NULL;
  for (int64_t o = 0; o < n_out; ++o) {
    if (!use_scales) scr[o] = 1;
    if (!use_bias) br[o] = 0;
  }
  double* xd = (double*)xmalloc((size_t)(batch * ldx) * 8);
  double* dod = (double*)xmalloc((size_t)(batch * ldo) * 8);
  for (int64_t i = 0; i < batch * ldx; ++i) xd[i] = rnd_val();
  for (int64_t i = 0; i < batch * ldo; ++i) dod[i] = rnd_val();
  void* x = typed(xd, batch * ldx, dt, xd);
  void* dout = typed(dod, batch * ldo, dt, dod);
  double* U = ref_unscaled(w, cbr);
  kk_vq_format f = w->f;
  char what[256];
  snprintf(what, sizeof what, "n_out=%lld n_in=%lld K=%lld rpc=%lld d=%d M=%d bits=%d batch=%lld dt=%d scales=%d bias=%d path=%d nt=%d pad=%lld",
           (long long)n_out, (long long)n_in, (long long)f.codebook_size, (long long)f.rows_per_codebook,
           f.group_size, f.num_codebooks, f.code_bits, (long long)batch, (int)dt, use_scales, use_bias, path, nt,
           (long long)pad);

  /* dequantize */
  {
    double* W = (double*)xmalloc((size_t)(n_out * n_in) * 8 + 8);
    for (int64_t o = 0; o < n_out; ++o)
      for (int64_t i = 0; i < n_in; ++i) W[o * n_in + i] = scr[o] * U[o * n_in + i];
    void* got = poisoned(n_out, n_in, n_in + pad, dt);
    kk_status st = kk_vq_dequantize_cpu(dt, &f, w->codes, cb, sc, got, n_in + pad, nt);
    CHECK(st == KK_OK, "dequantize %s: %s", what, kk_last_error());
    const double e = rel_err(got, n_out, n_in, n_in + pad, dt, W, "dequantize");
    CHECK(e <= tol(dt), "dequantize %s: rel err %g", what, e);
    free(got);
    free(W);
  }
  /* forward */
  double* ref = (double*)xmalloc((size_t)(batch * n_out) * 8 + 8);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t o = 0; o < n_out; ++o) {
      double s = 0;
      for (int64_t i = 0; i < n_in; ++i) s += xd[b * ldx + i] * U[o * n_in + i];
      ref[b * n_out + o] = scr[o] * s + br[o];
    }
  {
    void* out = poisoned(batch, n_out, ldo, dt);
    kk_status st = kk_vq_linear_fwd_cpu(dt, &f, batch, w->codes, cb, sc, x, ldx, bias, out, ldo, path, nt);
    CHECK(st == KK_OK, "fwd %s: %s", what, kk_last_error());
    const double e = rel_err(out, batch, n_out, ldo, dt, ref, "fwd");
    CHECK(e <= tol(dt), "fwd %s: rel err %g", what, e);
    /* the same codes, declared checked: the same result */
    f.flags = KK_VQ_CODES_CHECKED;
    void* out2 = poisoned(batch, n_out, ldo, dt);
    st = kk_vq_linear_fwd_cpu(dt, &f, batch, w->codes, cb, sc, x, ldx, bias, out2, ldo, path, nt);
    CHECK(st == KK_OK, "fwd checked %s: %s", what, kk_last_error());
    CHECK(memcmp(out, out2, (size_t)(batch * ldo) * esz(dt)) == 0, "fwd %s: flags changed the result", what);
    f.flags = 0;
    free(out);
    free(out2);
  }
  /* backward: dx = dout W, dW = dout^T x, dcb scatter of scale*dW, dscales = <dW, U> per row */
  {
    double* rdx = (double*)xmalloc((size_t)(batch * n_in) * 8 + 8);
    double* rdcb = (double*)calloc((size_t)w->ncb + 1, 8);
    double* rds = (double*)xmalloc((size_t)n_out * 8 + 8);
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t i = 0; i < n_in; ++i) {
        double s = 0;
        for (int64_t o = 0; o < n_out; ++o) s += dod[b * ldo + o] * scr[o] * U[o * n_in + i];
        rdx[b * n_in + i] = s;
      }
    const int d = f.group_size, M = f.num_codebooks;
    const int64_t K = f.codebook_size;
    for (int64_t o = 0; o < n_out; ++o) {
      double ds = 0;
      for (int64_t i = 0; i < n_in; ++i) {
        double dw = 0;
        for (int64_t b = 0; b < batch; ++b) dw += dod[b * ldo + o] * xd[b * ldx + i];
        ds += dw * U[o * n_in + i];
        const int64_t g = i / d;
        for (int m = 0; m < M; ++m) {
          const int64_t k = w->ucode[(o * w->G + g) * M + m];
          rdcb[(((o / f.rows_per_codebook) * M + m) * K + k) * d + i % d] += scr[o] * dw;
        }
      }
      rds[o] = ds;
    }
    for (int want = 1; want < 8; ++want) {
      if ((want & 4) && !use_scales) continue;
      void* dx = (want & 1) ? poisoned(batch, n_in, n_in + pad, dt) : NULL;
      void* dcb = (want & 2) ? poisoned(1, w->ncb, w->ncb, dt) : NULL;
      void* ds = (want & 4) ? poisoned(1, n_out, n_out, dt) : NULL;
      kk_status st = kk_vq_linear_bwd_cpu(dt, &f, batch, w->codes, cb, sc, x, ldx, dout, ldo, dx, n_in + pad, dcb,
                                          ds, nt);
      CHECK(st == KK_OK, "bwd(%d) %s: %s", want, what, kk_last_error());
      if (dx) {
        const double e = rel_err(dx, batch, n_in, n_in + pad, dt, rdx, "dx");
        CHECK(e <= tol(dt), "dx %s: rel err %g", what, e);
      }
      if (dcb) {
        const double e = rel_err(dcb, 1, w->ncb, w->ncb, dt, rdcb, "dcodebooks");
        CHECK(e <= tol(dt), "dcodebooks %s: rel err %g", what, e);
      }
      if (ds) {
        const double e = rel_err(ds, 1, n_out, n_out, dt, rds, "dscales");
        CHECK(e <= tol(dt), "dscales %s: rel err %g", what, e);
      }
      free(dx);
      free(dcb);
      free(ds);
    }
    free(rdx);
    free(rdcb);
    free(rds);
  }
  free(ref);
  free(U);
  free(cb);
  free(sc);
  free(bias);
  free(cbr);
  free(scr);
  free(br);
  free(x);
  free(xd);
  free(dout);
  free(dod);
}

/* ---- assign ---------------------------------------------------------------------------------- */
static void test_assign(int64_t n, int64_t K, int d, int topn, kk_dtype dt, int nt) {
  double* v = (double*)xmalloc((size_t)(n * d) * 8 + 8);
  double* c = (double*)xmalloc((size_t)(K * d) * 8);
  /* values on a coarse grid, and some duplicate centroids: ties happen and must go to the smaller index */
  for (int64_t i = 0; i < K * d; ++i) c[i] = (double)rnd_int(5) - 2;
  for (int64_t k = 1; k < K; k += 3) memcpy(c + k * d, c + (k - 1) * d, (size_t)d * 8);
  for (int64_t i = 0; i < n * d; ++i) v[i] = i % 2 ? (double)rnd_int(5) - 2 : rnd_val() * 3;
  void* vt = typed(v, n * d, dt, v);
  void* ct = typed(c, K * d, dt, c);
  int32_t* idx = (int32_t*)xmalloc((size_t)(n * topn) * 4 + 4);
  void* dist = poisoned(1, n * topn, n * topn, dt);
  for (int64_t i = 0; i < n * topn; ++i) idx[i] = -7;
  kk_status st = kk_vq_assign_cpu(dt, n, K, d, vt, ct, topn, idx, dist, nt);
  CHECK(st == KK_OK, "assign n=%lld K=%lld d=%d topn=%d: %s", (long long)n, (long long)K, d, topn, kk_last_error());
  double* dd = (double*)xmalloc((size_t)K * 8);
  char* used = (char*)xmalloc((size_t)K);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k = 0; k < K; ++k) {
      double s = 0;
      for (int t = 0; t < d; ++t) s += (v[i * d + t] - c[k * d + t]) * (v[i * d + t] - c[k * d + t]);
      dd[k] = s;
      used[k] = 0;
    }
    for (int j = 0; j < topn; ++j) {  /* the j-th nearest, ties to the smaller index */
      int64_t best = -1;
      for (int64_t k = 0; k < K; ++k)
        if (!used[k] && (best < 0 || dd[k] < dd[best])) best = k;
      used[best] = 1;
      const int32_t got = idx[i * topn + j];
      /* in float32 two distances may round to the same value: accept either order then */
      const int same = got >= 0 && got < K &&
                       (got == best || (dt == KK_FLOAT32 && fabs(dd[got] - dd[best]) <= 1e-5 * (1 + dd[best])));
      CHECK(same, "assign K=%lld d=%d topn=%d: vector %lld rank %d: index %d, expected %lld", (long long)K, d,
            topn, (long long)i, j, got, (long long)best);
      const double g = get(dist, i * topn + j, dt);
      CHECK(fabs(g - dd[best]) <= tol(dt) * 10 * (1 + dd[best]), "assign dist %g, expected %g", g, dd[best]);
    }
  }
  /* dist may be NULL */
  int32_t* idx2 = (int32_t*)xmalloc((size_t)(n * topn) * 4 + 4);
  st = kk_vq_assign_cpu(dt, n, K, d, vt, ct, topn, idx2, NULL, nt);
  CHECK(st == KK_OK && memcmp(idx, idx2, (size_t)(n * topn) * 4) == 0, "assign without dist differs");
  free(idx2);
  free(dd);
  free(used);
  free(idx);
  free(dist);
  free(vt);
  free(ct);
  free(v);
  free(c);
}

/* ---- errors ---------------------------------------------------------------------------------- */
#define EXPECT_ERR(call, code, needle)                                                                        \
  do {                                                                                                        \
    kk_status st_ = (call);                                                                                   \
    CHECK(st_ == (code), "%s: status %d, expected %d (%s)", #call, (int)st_, (int)(code), kk_last_error());   \
    CHECK(strstr(kk_last_error(), (needle)) != NULL, "%s: message '%s' lacks '%s'", #call, kk_last_error(), \
          (needle));                                                                                          \
  } while (0)

static void test_errors(void) {
  Weight w = make_weight(5, 8, 200, 1000, 4, 2, 8);
  float cb[2 * 200 * 4], sc[5], x[3 * 8], out[3 * 5], dx[3 * 8], dcb[2 * 200 * 4], ds[5], dout[3 * 5];
  for (int i = 0; i < 2 * 200 * 4; ++i) cb[i] = (float)rnd_val();
  for (int i = 0; i < 5; ++i) sc[i] = 1;
  for (int i = 0; i < 24; ++i) x[i] = dx[i] = 0;
  for (int i = 0; i < 15; ++i) dout[i] = out[i] = 0;
  kk_vq_format f = w.f, g;
  const kk_dtype F = KK_FLOAT32;
  CHECK(kk_vq_check_codes(&f, w.codes) == KK_OK, "check_codes on good codes: %s", kk_last_error());
  EXPECT_ERR(kk_vq_check_codes(NULL, w.codes), KK_ERR_NULL_POINTER, "format");
  EXPECT_ERR(kk_vq_check_codes(&f, NULL), KK_ERR_NULL_POINTER, "codes");
  g = f; g.n_out = -1; EXPECT_ERR(kk_vq_check_codes(&g, w.codes), KK_ERR_INVALID_SIZE, "n_out");
  g = f; g.n_in = -4; EXPECT_ERR(kk_vq_check_codes(&g, w.codes), KK_ERR_INVALID_SIZE, "n_in");
  g = f; g.group_size = 3; EXPECT_ERR(kk_vq_check_codes(&g, w.codes), KK_ERR_INVALID_ARGUMENT, "group_size");
  g = f; g.group_size = 16; EXPECT_ERR(kk_vq_check_codes(&g, w.codes), KK_ERR_INVALID_SIZE, "multiple of group_size");
  g = f; g.num_codebooks = 0; EXPECT_ERR(kk_vq_check_codes(&g, w.codes), KK_ERR_INVALID_ARGUMENT, "num_codebooks");
  g = f; g.num_codebooks = 17; EXPECT_ERR(kk_vq_check_codes(&g, w.codes), KK_ERR_INVALID_ARGUMENT, "num_codebooks");
  g = f; g.code_bits = 4; EXPECT_ERR(kk_vq_check_codes(&g, w.codes), KK_ERR_INVALID_ARGUMENT, "code_bits");
  g = f; g.codebook_size = 0; EXPECT_ERR(kk_vq_check_codes(&g, w.codes), KK_ERR_INVALID_SIZE, "codebook_size");
  g = f; g.codebook_size = 257; EXPECT_ERR(kk_vq_check_codes(&g, w.codes), KK_ERR_INVALID_SIZE, "codebook_size");
  g = f; g.rows_per_codebook = 0; EXPECT_ERR(kk_vq_check_codes(&g, w.codes), KK_ERR_INVALID_SIZE, "rows_per_codebook");
  g = f; g.flags = 2; EXPECT_ERR(kk_vq_check_codes(&g, w.codes), KK_ERR_INVALID_ARGUMENT, "flags");
  g = f; g.n_out = INT64_MAX / 2; g.n_in = 1 << 20; g.group_size = 1;
  EXPECT_ERR(kk_vq_check_codes(&g, w.codes), KK_ERR_INVALID_SIZE, "overflows");
  /* a bad code: row 3, group 1, codebook 1, value 250 >= K = 200 (and a later one, not reported) */
  uint8_t* c8 = (uint8_t*)w.codes;
  c8[(3 * 2 + 1) * 2 + 1] = 250;
  c8[(4 * 2 + 1) * 2 + 0] = 255;
  EXPECT_ERR(kk_vq_check_codes(&f, w.codes), KK_ERR_INVALID_ARGUMENT, "codes[row 3, group 1, codebook 1] = 250");
  for (int i = 0; i < 15; ++i) out[i] = (float)kSentinel;
  EXPECT_ERR(kk_vq_linear_fwd_cpu(F, &f, 3, w.codes, cb, sc, x, 8, NULL, out, 5, 0, 0), KK_ERR_INVALID_ARGUMENT,
             "row 3, group 1, codebook 1");
  for (int i = 0; i < 15; ++i) CHECK(out[i] == (float)kSentinel, "fwd wrote out before failing the code check");
  EXPECT_ERR(kk_vq_linear_bwd_cpu(F, &f, 3, w.codes, cb, sc, x, 8, dout, 5, dx, 8, dcb, ds, 0),
             KK_ERR_INVALID_ARGUMENT, "codebook 1");
  EXPECT_ERR(kk_vq_dequantize_cpu(F, &f, w.codes, cb, sc, x, 8, 0), KK_ERR_INVALID_ARGUMENT, "= 250");
  /* declared checked: the caller vouches; run with a valid code set again */
  c8[(3 * 2 + 1) * 2 + 1] = 7;
  c8[(4 * 2 + 1) * 2 + 0] = 9;
  /* int16 codes: -1 is 65535 */
  {
    Weight w16 = make_weight(4, 8, 1000, 1000, 8, 1, 16);
    ((int16_t*)w16.codes)[2] = -1;
    EXPECT_ERR(kk_vq_check_codes(&w16.f, w16.codes), KK_ERR_INVALID_ARGUMENT, "codes[row 2, group 0, codebook 0] = 65535");
    w16.f.codebook_size = 65536;  /* every code valid */
    CHECK(kk_vq_check_codes(&w16.f, w16.codes) == KK_OK, "K = 65536: %s", kk_last_error());
    free_weight(&w16);
  }
  /* dtype, path, strides, pointers */
  EXPECT_ERR(kk_vq_linear_fwd_cpu(KK_FLOAT16, &f, 3, w.codes, cb, sc, x, 8, NULL, out, 5, 0, 0),
             KK_ERR_UNSUPPORTED_DTYPE, "dtype");
  EXPECT_ERR(kk_vq_linear_fwd_cpu(F, &f, 3, w.codes, cb, sc, x, 8, NULL, out, 5, 3, 0), KK_ERR_INVALID_ARGUMENT, "path");
  EXPECT_ERR(kk_vq_linear_fwd_cpu(F, &f, -1, w.codes, cb, sc, x, 8, NULL, out, 5, 0, 0), KK_ERR_INVALID_SIZE, "batch");
  EXPECT_ERR(kk_vq_linear_fwd_cpu(F, &f, 3, w.codes, cb, sc, x, 7, NULL, out, 5, 0, 0), KK_ERR_INVALID_ARGUMENT, "ldx");
  EXPECT_ERR(kk_vq_linear_fwd_cpu(F, &f, 3, w.codes, cb, sc, x, 8, NULL, out, 4, 0, 0), KK_ERR_INVALID_ARGUMENT, "ldo");
  EXPECT_ERR(kk_vq_linear_fwd_cpu(F, &f, 3, w.codes, cb, sc, NULL, 8, NULL, out, 5, 0, 0), KK_ERR_NULL_POINTER, "x");
  EXPECT_ERR(kk_vq_linear_fwd_cpu(F, &f, 3, w.codes, NULL, sc, x, 8, NULL, out, 5, 0, 0), KK_ERR_NULL_POINTER, "codebooks");
  EXPECT_ERR(kk_vq_linear_fwd_cpu(F, &f, 3, NULL, cb, sc, x, 8, NULL, out, 5, 0, 0), KK_ERR_NULL_POINTER, "codes");
  EXPECT_ERR(kk_vq_linear_fwd_cpu(F, &f, 3, w.codes, cb, sc, x, 8, NULL, NULL, 5, 0, 0), KK_ERR_NULL_POINTER, "out");
  EXPECT_ERR(kk_vq_linear_fwd_cpu(F, NULL, 3, w.codes, cb, sc, x, 8, NULL, out, 5, 0, 0), KK_ERR_NULL_POINTER, "format");
  EXPECT_ERR(kk_vq_linear_bwd_cpu(F, &f, 3, w.codes, cb, NULL, x, 8, dout, 5, dx, 8, dcb, ds, 0),
             KK_ERR_INVALID_ARGUMENT, "dscales");
  EXPECT_ERR(kk_vq_linear_bwd_cpu(F, &f, 3, w.codes, cb, sc, x, 8, dout, 5, dx, 7, NULL, NULL, 0),
             KK_ERR_INVALID_ARGUMENT, "lddx");
  EXPECT_ERR(kk_vq_linear_bwd_cpu(F, &f, 3, w.codes, cb, sc, x, 8, dout, 4, dx, 8, NULL, NULL, 0),
             KK_ERR_INVALID_ARGUMENT, "lddo");
  EXPECT_ERR(kk_vq_linear_bwd_cpu(F, &f, 3, w.codes, cb, sc, x, 8, NULL, 5, dx, 8, NULL, NULL, 0),
             KK_ERR_NULL_POINTER, "dout");
  EXPECT_ERR(kk_vq_linear_bwd_cpu(F, &f, 3, w.codes, cb, sc, NULL, 8, dout, 5, NULL, 8, dcb, NULL, 0),
             KK_ERR_NULL_POINTER, "x");
  EXPECT_ERR(kk_vq_dequantize_cpu(F, &f, w.codes, cb, sc, NULL, 8, 0), KK_ERR_NULL_POINTER, "w");
  EXPECT_ERR(kk_vq_dequantize_cpu(F, &f, w.codes, cb, sc, x, 7, 0), KK_ERR_INVALID_ARGUMENT, "ldw");
  EXPECT_ERR(kk_vq_dequantize_cpu(KK_BFLOAT16, &f, w.codes, cb, sc, x, 8, 0), KK_ERR_UNSUPPORTED_DTYPE, "dtype");
  /* dx alone does not read x: NULL x is fine then */
  CHECK(kk_vq_linear_bwd_cpu(F, &f, 3, w.codes, cb, sc, NULL, 8, dout, 5, dx, 8, NULL, NULL, 0) == KK_OK,
        "bwd dx only with x NULL: %s", kk_last_error());
  /* assign */
  int32_t idx[16];
  float dist[16];
  EXPECT_ERR(kk_vq_assign_cpu(F, -1, 4, 2, x, cb, 1, idx, dist, 0), KK_ERR_INVALID_SIZE, "n");
  EXPECT_ERR(kk_vq_assign_cpu(F, 2, 0, 2, x, cb, 1, idx, dist, 0), KK_ERR_INVALID_SIZE, "K");
  EXPECT_ERR(kk_vq_assign_cpu(F, 2, 4, 0, x, cb, 1, idx, dist, 0), KK_ERR_INVALID_SIZE, "d");
  EXPECT_ERR(kk_vq_assign_cpu(F, 2, 4, 2, x, cb, 0, idx, dist, 0), KK_ERR_INVALID_ARGUMENT, "topn");
  EXPECT_ERR(kk_vq_assign_cpu(F, 2, 4, 2, x, cb, 5, idx, dist, 0), KK_ERR_INVALID_ARGUMENT, "topn");
  EXPECT_ERR(kk_vq_assign_cpu(F, 2, 40, 2, x, cb, 9, idx, dist, 0), KK_ERR_INVALID_ARGUMENT, "topn");
  EXPECT_ERR(kk_vq_assign_cpu(F, 2, 4, 2, NULL, cb, 1, idx, dist, 0), KK_ERR_NULL_POINTER, "vectors");
  EXPECT_ERR(kk_vq_assign_cpu(F, 2, 4, 2, x, NULL, 1, idx, dist, 0), KK_ERR_NULL_POINTER, "centroids");
  EXPECT_ERR(kk_vq_assign_cpu(F, 2, 4, 2, x, cb, 1, NULL, dist, 0), KK_ERR_NULL_POINTER, "idx");
  EXPECT_ERR(kk_vq_assign_cpu(KK_FLOAT16, 2, 4, 2, x, cb, 1, idx, dist, 0), KK_ERR_UNSUPPORTED_DTYPE, "dtype");
  CHECK(kk_vq_assign_cpu(F, 0, 4, 2, NULL, cb, 1, NULL, NULL, 0) == KK_OK, "assign n = 0: %s", kk_last_error());
  free_weight(&w);
}

/* ---- empty sizes: every output element with a value is written ------------------------------ */
static void test_empty(kk_dtype dt) {
  const int64_t shapes[][3] = {{0, 5, 8}, {3, 0, 8}, {3, 5, 0}, {0, 0, 0}};  /* batch, n_out, n_in */
  for (int s = 0; s < 4; ++s) {
    const int64_t B = shapes[s][0], n_out = shapes[s][1], n_in = shapes[s][2];
    Weight w = make_weight(n_out, n_in, 16, 2, 4, 2, 8);
    void* cb = typed(w.cb, w.ncb, dt, NULL);
    void* sc = typed(w.sc, n_out, dt, NULL);
    void* bias = typed(w.bias, n_out, dt, NULL);
    double* xd = (double*)xmalloc((size_t)(B * n_in) * 8 + 8);
    for (int64_t i = 0; i < B * n_in; ++i) xd[i] = rnd_val();
    double* dod = (double*)xmalloc((size_t)(B * n_out) * 8 + 8);
    for (int64_t i = 0; i < B * n_out; ++i) dod[i] = rnd_val();
    void* x = typed(xd, B * n_in, dt, NULL);
    void* dout = typed(dod, B * n_out, dt, NULL);
    void* out = poisoned(B, n_out, n_out, dt);
    kk_status st = kk_vq_linear_fwd_cpu(dt, &w.f, B, w.codes, cb, sc, x, n_in, bias, out, n_out, 0, 0);
    CHECK(st == KK_OK, "fwd empty %d: %s", s, kk_last_error());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t o = 0; o < n_out; ++o)
        CHECK(get(out, b * n_out + o, dt) == get(bias, o, dt), "fwd n_in = 0: out != bias");
    void* dx = poisoned(B, n_in, n_in, dt);
    void* dcb = poisoned(1, w.ncb, w.ncb, dt);
    void* ds = poisoned(1, n_out, n_out, dt);
    st = kk_vq_linear_bwd_cpu(dt, &w.f, B, w.codes, cb, sc, x, n_in, dout, n_out, dx, n_in, dcb, ds, 0);
    CHECK(st == KK_OK, "bwd empty %d: %s", s, kk_last_error());
    for (int64_t i = 0; i < B * n_in; ++i) CHECK(get(dx, i, dt) == 0, "bwd empty %d: dx not zero", s);
    for (int64_t i = 0; i < w.ncb; ++i) CHECK(get(dcb, i, dt) == 0, "bwd empty %d: dcodebooks not zero", s);
    for (int64_t i = 0; i < n_out; ++i) CHECK(get(ds, i, dt) == 0, "bwd empty %d: dscales not zero", s);
    st = kk_vq_dequantize_cpu(dt, &w.f, w.codes, cb, sc, NULL, n_in, 0);
    CHECK(st == KK_OK || n_out * n_in > 0, "dequantize empty: %s", kk_last_error());
    free(out); free(dx); free(dcb); free(ds); free(cb); free(sc); free(bias); free(x); free(xd); free(dout); free(dod);
    free_weight(&w);
  }
}

int main(void) {
  test_errors();
  const kk_dtype dts[2] = {KK_FLOAT32, KK_FLOAT64};
  for (int t = 0; t < 2; ++t) {
    const kk_dtype dt = dts[t];
    test_empty(dt);
    /* n_out, n_in, K, rows_per_codebook, d, M, code_bits, batch */
    const int64_t cases[][8] = {
        {33, 64, 256, 1 << 30, 4, 1, 8, 7},     /* VQ4DiT 2-bit, odd n_out */
        {20, 64, 256, 1 << 30, 8, 2, 8, 17},    /* AQLM 2x8g8 */
        {9, 32, 65536, 1 << 30, 8, 1, 16, 3},   /* AQLM 1x16g8 (int16 codes) */
        {7, 32, 4096, 3, 16, 1, 16, 16},        /* per-set codebooks, d = 16 */
        {12, 24, 64, 5, 2, 8, 8, 1},            /* M = 8, d = 2 */
        {5, 6, 3, 1, 1, 3, 8, 33},              /* d = 1, K = 3, a set per row */
        {70, 48, 256, 32, 4, 1, 8, 300},        /* several batch tiles */
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; ++c) {
      const int64_t* p = cases[c];
      Weight w = make_weight(p[0], p[1], p[2], p[3], (int)p[4], (int)p[5], (int)p[6]);
      for (int path = 0; path < 3; ++path)
        test_linear(&w, p[7], dt, (int)(c % 2 == 0), (int)(c % 3 != 1), path, path, (c + path) % 2 ? 3 : 0);
      test_linear(&w, 1, dt, 1, 1, 0, 2, 1);
      test_linear(&w, 4, dt, 0, 0, 1, 3, 0);
      free_weight(&w);
    }
    test_assign(300, 256, 4, 1, dt, 2);
    test_assign(101, 37, 3, 8, dt, 0);
    test_assign(50, 5, 16, 5, dt, 1);
    test_assign(17, 1, 2, 1, dt, 3);
  }
  printf("ok %s %s %d\n", kk_version(), kk_cpu_isa(), g_checks);
  return 0;
}
