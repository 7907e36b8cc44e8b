/* A C99 program using libkernelkit's public header for the ot family: every CPU entry point
 * (kk_ot_sinkhorn_step_cpu, _marginals_cpu, _plan_cpu, _sparsify_cpu, _hvp_cpu, _cg_cpu,
 * _points_grad_cpu) against a naive reference in double, in float32 and float64, for the dense cost
 * (padded rows, a shared matrix with batch stride 0) and the three point-cloud costs (shared y),
 * shapes around the kernels' tiles (row tiles of 2048 columns, strips of 256 columns, split rows),
 * zero weights and -inf potentials, thread counts 0..3, empty sizes; and the error paths (status and
 * a message naming the argument).  Outputs are NaN-poisoned before each call.  Built and run by
 * tests/test_ot_cabi.py and by .ci/run under ASan+UBSan for every ISA variant.  Prints
 * "ok <version> <isa> <count>" and exits 0 on success; on the first failure it prints what failed and
 * exits 1. */
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
static double rnd01(void) { return (double)(rnd_u64() >> 11) / 9007199254740992.0; }

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
/* a typed copy of src; src is overwritten with the rounded values (the reference sees what the kernel sees) */
static void* typed(double* src, int64_t n, kk_dtype dt) {
  void* p = xmalloc((size_t)n * esz(dt));
  for (int64_t i = 0; i < n; ++i) {
    set(p, i, src[i], dt);
    src[i] = get(p, i, dt);
  }
  return p;
}
static void* poisoned(int64_t n, kk_dtype dt) {
  void* p = xmalloc((size_t)n * esz(dt));
  for (int64_t i = 0; i < n; ++i) set(p, i, NAN, dt);
  return p;
}
static double* dvec(int64_t n) { return (double*)xmalloc((size_t)n * sizeof(double)); }
/* relative Frobenius error over the finite reference entries; infinities must match exactly */
static double rel_err(const void* got, int64_t n, kk_dtype dt, const double* ref) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double g = get(got, i, dt), r = ref[i];
    if (isinf(r)) {
      if (g != r) return INFINITY;
      continue;
    }
    if (g != g) return INFINITY;
    num += (g - r) * (g - r);
    den += r * r;
  }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}
static double tol(kk_dtype dt) { return dt == KK_FLOAT32 ? 2e-5 : 1e-12; }

/* ---- the naive reference -------------------------------------------------------------------- */
typedef struct {
  int kind, dim, shared;
  double p;
  int64_t B, n, m, ld;
  double *C, *x, *y; /* double copies as the kernel sees them */
  kk_ot_cost cost;   /* pointing at the typed arrays */
} Prob;

static double ref_cost(const Prob* P, int64_t b, int64_t i, int64_t j) {
  if (P->kind == KK_OT_COST_MATRIX) return P->C[(P->shared ? 0 : b * P->n * P->ld) + i * P->ld + j];
  const double* xi = P->x + (b * P->n + i) * P->dim;
  const double* yj = P->y + (P->shared ? 0 : b * P->m * P->dim) + j * P->dim;
  double s = 0;
  for (int t = 0; t < P->dim; ++t) {
    const double d = xi[t] - yj[t];
    s += P->kind == KK_OT_COST_MINKOWSKI_POW ? pow(fabs(d), P->p) : d * d;
  }
  return P->kind == KK_OT_COST_EUCLIDEAN_POW ? pow(s, P->p / 2) : s;
}

static Prob make_prob(int kind, double p, int dim, int64_t B, int64_t n, int64_t m, int shared, kk_dtype dt,
                      void** store1, void** store2) {
  Prob P;
  memset(&P, 0, sizeof(P));
  P.kind = kind;
  P.p = p;
  P.dim = dim;
  P.B = B;
  P.n = n;
  P.m = m;
  P.shared = shared;
  P.cost.kind = kind;
  P.cost.dim = dim;
  P.cost.p = p;
  *store1 = *store2 = NULL;
  if (kind == KK_OT_COST_MATRIX) {
    P.ld = m + 3;
    const int64_t nb = shared ? 1 : B, total = nb * n * P.ld;
    P.C = dvec(total);
    for (int64_t e = 0; e < total; ++e) P.C[e] = 2 * rnd01();
    *store1 = typed(P.C, total, dt);
    P.cost.matrix = *store1;
    P.cost.ld = P.ld;
    P.cost.batch_stride = shared ? 0 : n * P.ld;
  } else {
    const int64_t nx = B * n * dim, ny = (shared ? 1 : B) * m * dim;
    P.x = dvec(nx);
    P.y = dvec(ny);
    for (int64_t e = 0; e < nx; ++e) P.x[e] = rnd01();
    for (int64_t e = 0; e < ny; ++e) P.y[e] = rnd01();
    if (ny > 0) P.y[0] = P.x[0]; /* a zero distance (the subgradient rules) */
    *store1 = typed(P.x, nx, dt);
    *store2 = typed(P.y, ny, dt);
    P.cost.x = *store1;
    P.cost.x_batch_stride = n * dim;
    P.cost.y = *store2;
    P.cost.y_batch_stride = shared ? 0 : m * dim;
  }
  return P;
}

static double lse(const double* t, int64_t len) {
  double mx = -INFINITY, s = 0;
  for (int64_t e = 0; e < len; ++e) mx = t[e] > mx ? t[e] : mx;
  if (mx == -INFINITY) return -INFINITY;
  for (int64_t e = 0; e < len; ++e) s += exp(t[e] - mx);
  return mx + log(s);
}

static double plan_ref(const Prob* P, double reg, const double* f, const double* g, int64_t b, int64_t i, int64_t j) {
  return exp((f[b * P->n + i] + g[b * P->m + j] - ref_cost(P, b, i, j)) / reg);
}

/* ---- the tests --------------------------------------------------------------------------------- */
static void test_problem(int kind, double p, int dim, int64_t B, int64_t n, int64_t m, int shared, kk_dtype dt, int nt) {
  void *s1, *s2;
  Prob P = make_prob(kind, p, dim, B, n, m, shared, dt, &s1, &s2);
  const double reg = 0.07;
  double *a = dvec(B * n), *bw = dvec(B * m), *f = dvec(B * n), *g = dvec(B * m);
  for (int64_t e = 0; e < B * n; ++e) {
    a[e] = rnd01() + 0.1;
    f[e] = 0.2 * rnd01() - 0.1;
  }
  for (int64_t e = 0; e < B * m; ++e) {
    bw[e] = rnd01() + 0.1;
    g[e] = 0.2 * rnd01() - 0.1;
  }
  if (n > 1) { a[1] = 0; f[1] = -INFINITY; } /* a zero weight and its -inf potential */
  if (m > 2) { bw[2] = 0; g[2] = -INFINITY; }
  void *ta = typed(a, B * n, dt), *tb = typed(bw, B * m, dt), *tf = typed(f, B * n, dt), *tg = typed(g, B * m, dt);
  const char* what = kind == 0 ? "matrix" : kind == 1 ? "sqeuclidean" : kind == 2 ? "euclidean_pow" : "minkowski_pow";

  /* sinkhorn_step, both axes, every norm */
  for (int axis = 0; axis < 2; ++axis) {
    const int64_t len = axis ? m : n, olen = axis ? n : m;
    const double* pot = axis ? g : f;
    const double* oth = axis ? f : g;
    const double* w = axis ? bw : a;
    double* want = dvec(B * len);
    double* werr = dvec(3 * B);
    double* t = dvec(olen > 0 ? olen : 1);
    for (int norm = 0; norm < 3; ++norm)
      for (int64_t b = 0; b < B; ++b) werr[norm * B + b] = 0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < len; ++k) {
        for (int64_t o = 0; o < olen; ++o) {
          const int64_t i = axis ? o : k, j = axis ? k : o;
          t[o] = (oth[b * olen + o] - ref_cost(&P, b, i, j)) / reg;
        }
        const double s = lse(t, olen), wk = w[b * len + k], pk = pot[b * len + k];
        want[b * len + k] = wk > 0 ? reg * (log(wk) - s) : -INFINITY;
        double mg = exp(pk / reg + s);
        if (mg != mg && !(pk > -INFINITY)) mg = 0;
        const double d = fabs(mg - wk);
        werr[0 * B + b] = d > werr[b] ? d : werr[b];
        werr[1 * B + b] += d;
        werr[2 * B + b] += d * d;
      }
    for (int64_t b = 0; b < B; ++b) werr[2 * B + b] = sqrt(werr[2 * B + b]);
    for (int norm = 0; norm < 3; ++norm) {
      void* out = poisoned(B * len, dt);
      void* err = poisoned(B, dt);
      void* tp = axis ? tg : tf;
      EXPECT_OK(kk_ot_sinkhorn_step_cpu(dt, &P.cost, B, n, m, axis, reg, axis ? tb : ta, axis ? tf : tg, tp, out, err,
                                        norm, nt));
      double e1 = rel_err(out, B * len, dt, want), e2 = rel_err(err, B, dt, werr + norm * B);
      CHECK(e1 <= tol(dt) && e2 <= tol(dt) * 10, "sinkhorn_step %s axis %d norm %d B%lld n%lld m%lld dt%d nt%d: %g %g",
            what, axis, norm, (long long)B, (long long)n, (long long)m, (int)dt, nt, e1, e2);
      /* in place (pot_new aliasing pot), no error */
      void* inplace = typed(axis ? g : f, B * len, dt);
      EXPECT_OK(kk_ot_sinkhorn_step_cpu(dt, &P.cost, B, n, m, axis, reg, axis ? tb : ta, axis ? tf : tg, inplace,
                                        inplace, NULL, norm, nt));
      CHECK(rel_err(inplace, B * len, dt, want) <= tol(dt), "sinkhorn_step in place %s axis %d", what, axis);
      free(inplace);
      free(out);
      free(err);
    }
    free(want);
    free(werr);
    free(t);
  }

  /* marginals with weights, plan */
  {
    double *wr = dvec(B * n), *wc = dvec(B * m);
    for (int64_t e = 0; e < B * n; ++e) wr[e] = rnd01();
    for (int64_t e = 0; e < B * m; ++e) wc[e] = rnd01();
    void *twr = typed(wr, B * n, dt), *twc = typed(wc, B * m, dt);
    double *rr = dvec(B * n), *cr = dvec(B * m), *ob = dvec(B), *pl = dvec(B * n * m);
    for (int64_t e = 0; e < B * m; ++e) cr[e] = 0;
    for (int64_t b = 0; b < B; ++b) {
      double ps = 0, dot = 0;
      for (int64_t i = 0; i < n; ++i) {
        double rs = 0;
        for (int64_t j = 0; j < m; ++j) {
          const double v = plan_ref(&P, reg, f, g, b, i, j);
          pl[(b * n + i) * m + j] = v;
          rs += v * wc[b * m + j];
          cr[b * m + j] += wr[b * n + i] * v;
          ps += v;
        }
        rr[b * n + i] = rs;
        if (a[b * n + i] != 0) dot += a[b * n + i] * f[b * n + i];
      }
      for (int64_t j = 0; j < m; ++j)
        if (bw[b * m + j] != 0) dot += bw[b * m + j] * g[b * m + j];
      ob[b] = dot - reg * ps;
    }
    void *r = poisoned(B * n, dt), *c = poisoned(B * m, dt), *o = poisoned(B, dt);
    EXPECT_OK(kk_ot_marginals_cpu(dt, &P.cost, B, n, m, reg, tf, tg, ta, tb, twr, twc, r, c, o, nt));
    CHECK(rel_err(r, B * n, dt, rr) <= tol(dt) && rel_err(c, B * m, dt, cr) <= tol(dt) &&
              rel_err(o, B, dt, ob) <= tol(dt) * 10,
          "marginals %s B%lld n%lld m%lld dt%d nt%d", what, (long long)B, (long long)n, (long long)m, (int)dt, nt);
    const int64_t ldp = m + 2;
    void* plan = poisoned(B * n * ldp, dt);
    for (int64_t e = 0; e < B * n; ++e) {
      set(plan, e * ldp + m, 777.0, dt);
      set(plan, e * ldp + m + 1, 777.0, dt);
    }
    EXPECT_OK(kk_ot_plan_cpu(dt, &P.cost, B, n, m, reg, tf, tg, plan, ldp, nt));
    double num = 0, den = 0;
    for (int64_t e = 0; e < B * n; ++e) {
      for (int64_t j = 0; j < m; ++j) {
        const double d = get(plan, e * ldp + j, dt) - pl[e * m + j];
        num += d * d;
        den += pl[e * m + j] * pl[e * m + j];
      }
      CHECK(get(plan, e * ldp + m, dt) == 777.0 && get(plan, e * ldp + m + 1, dt) == 777.0, "plan wrote padding");
    }
    CHECK(sqrt(num / (den > 0 ? den : 1)) <= tol(dt), "plan %s dt%d: %g", what, (int)dt, sqrt(num / den));
    free(twr), free(twc), free(wr), free(wc), free(rr), free(cr), free(ob), free(pl), free(r), free(c), free(o);
    free(plan);
  }

  /* sparsify -> hvp -> cg; points_grad */
  if (n > 0 && m > 0) {
    const int64_t k = m < 5 ? m : 5;
    int32_t* cols = (int32_t*)xmalloc((size_t)(B * n * k) * 4);
    for (int64_t e = 0; e < B * n * k; ++e) cols[e] = -7;
    void* vals = poisoned(B * n * k, dt);
    EXPECT_OK(kk_ot_sparsify_cpu(dt, &P.cost, B, n, m, k, reg, tf, tg, cols, vals, nt));
    double* wv = dvec(B * n * k);
    char* taken = (char*)xmalloc((size_t)m);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < n; ++i) {
        memset(taken, 0, (size_t)m);
        for (int64_t e = 0; e < k; ++e) { /* the e-th best remaining column: largest key, then smallest j */
          int64_t best = -1;
          double bk = 0;
          for (int64_t j = 0; j < m; ++j) {
            if (taken[j]) continue;
            double key = g[b * m + j] - ref_cost(&P, b, i, j);
            if (key != key) key = -INFINITY;
            if (best < 0 || key > bk) best = j, bk = key;
          }
          taken[best] = 1;
        }
        int64_t e = 0;
        for (int64_t j = 0; j < m; ++j)
          if (taken[j]) {
            CHECK(cols[(b * n + i) * k + e] == j, "sparsify %s row %lld entry %lld: col %d, expected %lld", what,
                  (long long)i, (long long)e, cols[(b * n + i) * k + e], (long long)j);
            wv[(b * n + i) * k + e] = f[b * n + i] == -INFINITY ? 0.0 : plan_ref(&P, reg, f, g, b, i, j);
            ++e;
          }
      }
    CHECK(rel_err(vals, B * n * k, dt, wv) <= tol(dt), "sparsify vals %s", what);
    /* hvp: r, c the row / column sums of S plus a positive margin (H then is positive definite) */
    double *r = dvec(B * n), *c = dvec(B * m), *vx = dvec(B * n), *vy = dvec(B * m);
    double* sv = dvec(B * n * k);
    for (int64_t e = 0; e < B * n * k; ++e) sv[e] = get(vals, e, dt);
    for (int64_t e = 0; e < B * n; ++e) r[e] = 0.1 + 0.5 * rnd01(), vx[e] = rnd01() - 0.5;
    for (int64_t e = 0; e < B * m; ++e) c[e] = 0.1 + 0.5 * rnd01(), vy[e] = rnd01() - 0.5;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t e = 0; e < k; ++e) {
          r[b * n + i] += sv[(b * n + i) * k + e];
          c[b * m + cols[(b * n + i) * k + e]] += sv[(b * n + i) * k + e];
        }
    void *tr = typed(r, B * n, dt), *tc = typed(c, B * m, dt), *tvx = typed(vx, B * n, dt), *tvy = typed(vy, B * m, dt);
    const double shift = 0.25;
    double *hx = dvec(B * n), *hy = dvec(B * m);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t j = 0; j < m; ++j) hy[b * m + j] = 0;
      for (int64_t i = 0; i < n; ++i) {
        double s = 0;
        for (int64_t e = 0; e < k; ++e) {
          const int64_t q = (b * n + i) * k + e;
          s += sv[q] * vy[b * m + cols[q]];
          hy[b * m + cols[q]] += sv[q] * vx[b * n + i];
        }
        hx[b * n + i] = r[b * n + i] * vx[b * n + i] + s + shift * vx[b * n + i];
      }
      for (int64_t j = 0; j < m; ++j) hy[b * m + j] += (c[b * m + j] + shift) * vy[b * m + j];
    }
    void *yx = poisoned(B * n, dt), *yy = poisoned(B * m, dt);
    EXPECT_OK(kk_ot_hvp_cpu(dt, B, n, m, k, cols, vals, tr, tc, shift, tvx, tvy, yx, yy, nt));
    CHECK(rel_err(yx, B * n, dt, hx) <= tol(dt) && rel_err(yy, B * m, dt, hy) <= tol(dt), "hvp %s", what);
    /* cg: solve H z = (hx, hy) from z = 0; the solution is (vx, vy) (H is positive definite with the shift) */
    void *rx = typed(hx, B * n, dt), *ry = typed(hy, B * m, dt);
    void *zx = xmalloc((size_t)(B * n) * esz(dt)), *zy = xmalloc((size_t)(B * m) * esz(dt));
    for (int64_t e = 0; e < B * n; ++e) set(zx, e, 0, dt);
    for (int64_t e = 0; e < B * m; ++e) set(zy, e, 0, dt);
    int32_t* iters = (int32_t*)xmalloc((size_t)B * 4);
    void* resid = poisoned(B, dt);
    EXPECT_OK(kk_ot_cg_cpu(dt, B, n, m, k, cols, vals, tr, tc, shift, rx, ry, zx, zy, 1e-12, 500, iters, resid, nt));
    const double ctol = dt == KK_FLOAT32 ? 1e-4 : 1e-9;
    CHECK(rel_err(zx, B * n, dt, vx) <= ctol && rel_err(zy, B * m, dt, vy) <= ctol, "cg %s: %g %g", what,
          rel_err(zx, B * n, dt, vx), rel_err(zy, B * m, dt, vy));
    for (int64_t b = 0; b < B; ++b)
      CHECK(iters[b] >= 1 && iters[b] <= n + m + 1 && get(resid, b, dt) <= 1e-12 * 10, "cg iters %d resid %g", iters[b],
            get(resid, b, dt));
    /* max_iter = 0: z unchanged (0), the initial relative residual 1 */
    for (int64_t e = 0; e < B * n; ++e) set(zx, e, 0, dt);
    for (int64_t e = 0; e < B * m; ++e) set(zy, e, 0, dt);
    EXPECT_OK(kk_ot_cg_cpu(dt, B, n, m, k, cols, vals, tr, tc, shift, rx, ry, zx, zy, 1e-12, 0, iters, resid, nt));
    for (int64_t b = 0; b < B; ++b) CHECK(iters[b] == 0 && fabs(get(resid, b, dt) - 1) < 1e-6, "cg max_iter 0");
    free(cols), free(vals), free(wv), free(taken), free(r), free(c), free(vx), free(vy), free(tr), free(tc);
    free(tvx), free(tvy), free(sv), free(hx), free(hy), free(yx), free(yy), free(rx), free(ry), free(zx), free(zy);
    free(iters), free(resid);
  }
  if (kind != KK_OT_COST_MATRIX) {
    const int D = dim;
    double *sc = dvec(B), *u = dvec(B * n), *v = dvec(B * m), *wx = dvec(B * n * D), *wy = dvec(B * m * D);
    for (int64_t e = 0; e < B; ++e) sc[e] = 1 + rnd01();
    for (int64_t e = 0; e < B * n; ++e) u[e] = rnd01();
    for (int64_t e = 0; e < B * m; ++e) v[e] = rnd01();
    void *tsc = typed(sc, B, dt), *tu = typed(u, B * n, dt), *tv = typed(v, B * m, dt);
    for (int64_t e = 0; e < B * n * D; ++e) wx[e] = 0;
    for (int64_t e = 0; e < B * m * D; ++e) wy[e] = 0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < m; ++j) {
          const double W = plan_ref(&P, reg, f, g, b, i, j) * (sc[b] + u[b * n + i] + v[b * m + j]);
          const double* xi = P.x + (b * n + i) * D;
          const double* yj = P.y + (shared ? 0 : b * m * D) + j * D;
          double d2 = 0;
          for (int t = 0; t < D; ++t) d2 += (xi[t] - yj[t]) * (xi[t] - yj[t]);
          for (int t = 0; t < D; ++t) {
            const double d = xi[t] - yj[t];
            double G;
            if (kind == KK_OT_COST_SQEUCLIDEAN) G = 2 * d;
            else if (kind == KK_OT_COST_EUCLIDEAN_POW) G = d2 > 0 ? p * pow(d2, p / 2 - 1) * d : 0;
            else G = fabs(d) > 0 ? p * pow(fabs(d), p - 1) * (d > 0 ? 1 : -1) : 0;
            wx[(b * n + i) * D + t] += W * G;
            wy[(b * m + j) * D + t] -= W * G;
          }
        }
    void *dx = poisoned(B * n * D, dt), *dy = poisoned(B * m * D, dt);
    EXPECT_OK(kk_ot_points_grad_cpu(dt, &P.cost, B, n, m, reg, tf, tg, tsc, tu, tv, dx, dy, nt));
    CHECK(rel_err(dx, B * n * D, dt, wx) <= tol(dt) && rel_err(dy, B * m * D, dt, wy) <= tol(dt),
          "points_grad %s p %g dt%d: %g %g", what, p, (int)dt, rel_err(dx, B * n * D, dt, wx),
          rel_err(dy, B * m * D, dt, wy));
    free(sc), free(u), free(v), free(wx), free(wy), free(tsc), free(tu), free(tv), free(dx), free(dy);
  }
  free(a), free(bw), free(f), free(g), free(ta), free(tb), free(tf), free(tg), free(s1), free(s2);
  free(P.C), free(P.x), free(P.y);
}

/* every size may be 0: nothing read, the outputs of nonzero length as the math says */
static void test_empty(kk_dtype dt) {
  double one[4] = {1, 1, 1, 1};
  void* w = typed(one, 4, dt);
  kk_ot_cost c;
  memset(&c, 0, sizeof(c));
  c.kind = KK_OT_COST_MATRIX;
  c.ld = 0;
  /* n = 3, m = 0: LSE of the empty set is -inf, so f = +inf where a > 0; the error is ||0 - a|| */
  void *out = poisoned(3, dt), *err = poisoned(1, dt), *pot = typed(one, 3, dt);
  EXPECT_OK(kk_ot_sinkhorn_step_cpu(dt, &c, 1, 3, 0, 0, 1.0, w, NULL, pot, out, err, KK_OT_NORM_L1, 0));
  for (int i = 0; i < 3; ++i) CHECK(get(out, i, dt) == INFINITY, "empty m: f = +inf");
  CHECK(get(err, 0, dt) == 3.0, "empty m: err = |a|_1, got %g", get(err, 0, dt));
  /* axis 1 with n = 3, m = 0: nothing; batch = 0: nothing */
  EXPECT_OK(kk_ot_sinkhorn_step_cpu(dt, &c, 1, 3, 0, 1, 1.0, NULL, NULL, NULL, NULL, err, 1, 0));
  CHECK(get(err, 0, dt) == 0.0, "empty axis: err 0");
  c.ld = 5; /* checked even when nothing is read */
  EXPECT_OK(kk_ot_sinkhorn_step_cpu(dt, &c, 0, 3, 5, 0, 1.0, NULL, NULL, NULL, NULL, NULL, 1, 0));
  c.ld = 0;
  /* marginals n = 2, m = 0: r = 0, obj = <a, f> */
  void *r = poisoned(2, dt), *ob = poisoned(1, dt);
  EXPECT_OK(kk_ot_marginals_cpu(dt, &c, 1, 2, 0, 1.0, pot, NULL, w, NULL, NULL, NULL, r, NULL, ob, 0));
  CHECK(get(r, 0, dt) == 0 && get(r, 1, dt) == 0 && get(ob, 0, dt) == 2.0, "empty marginals");
  EXPECT_OK(kk_ot_plan_cpu(dt, &c, 1, 2, 0, 1.0, NULL, NULL, NULL, 0, 0));
  EXPECT_OK(kk_ot_sparsify_cpu(dt, &c, 1, 2, 0, 0, 1.0, NULL, NULL, NULL, NULL, 0));
  EXPECT_OK(kk_ot_hvp_cpu(dt, 0, 2, 2, 1, NULL, NULL, NULL, NULL, 0, NULL, NULL, NULL, NULL, 0));
  int32_t it = -1;
  void* res = poisoned(1, dt);
  void *zx = typed(one, 2, dt), *zero = poisoned(2, dt);
  set(zero, 0, 0, dt), set(zero, 1, 0, dt);
  /* a zero rhs: z = 0 in 0 iterations, resid 0 */
  EXPECT_OK(kk_ot_cg_cpu(dt, 1, 2, 0, 0, NULL, NULL, w, NULL, 0, zero, NULL, zx, NULL, 1e-8, 10, &it, res, 0));
  CHECK(it == 0 && get(res, 0, dt) == 0 && get(zx, 0, dt) == 0 && get(zx, 1, dt) == 0, "cg zero rhs");
  c.kind = KK_OT_COST_SQEUCLIDEAN;
  c.dim = 2;
  void* dx = poisoned(4, dt);
  EXPECT_OK(kk_ot_points_grad_cpu(dt, &c, 1, 2, 0, 1.0, NULL, NULL, NULL, NULL, NULL, dx, NULL, 0));
  for (int i = 0; i < 4; ++i) CHECK(get(dx, i, dt) == 0, "points_grad with m = 0: dx = 0");
  free(w), free(out), free(err), free(pot), free(r), free(ob), free(res), free(zx), free(zero), free(dx);
}

static void test_errors(void) {
  const kk_dtype F = KK_FLOAT64;
  double C[12], f[3], g[4], out[4], err[1], x[6], y[8];
  for (int i = 0; i < 12; ++i) C[i] = 1;
  for (int i = 0; i < 3; ++i) f[i] = 0;
  for (int i = 0; i < 4; ++i) g[i] = 0.25;
  for (int i = 0; i < 6; ++i) x[i] = 0.1 * i;
  for (int i = 0; i < 8; ++i) y[i] = 0.2 * i;
  kk_ot_cost c, d;
  memset(&c, 0, sizeof(c));
  c.kind = KK_OT_COST_MATRIX;
  c.matrix = C;
  c.ld = 4;
  kk_ot_cost pc;
  memset(&pc, 0, sizeof(pc));
  pc.kind = KK_OT_COST_EUCLIDEAN_POW;
  pc.dim = 2;
  pc.p = 1.0;
  pc.x = x;
  pc.y = y;
  EXPECT_OK(kk_ot_sinkhorn_step_cpu(F, &c, 1, 3, 4, 0, 0.1, f, g, f, out, err, 1, 1));
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(KK_FLOAT16, &c, 1, 3, 4, 0, 0.1, f, g, f, out, err, 1, 1), KK_ERR_UNSUPPORTED_DTYPE, "dtype");
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(F, NULL, 1, 3, 4, 0, 0.1, f, g, f, out, err, 1, 1), KK_ERR_NULL_POINTER, "cost");
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(F, &c, -1, 3, 4, 0, 0.1, f, g, f, out, err, 1, 1), KK_ERR_INVALID_SIZE, "batch");
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(F, &c, 1, -3, 4, 0, 0.1, f, g, f, out, err, 1, 1), KK_ERR_INVALID_SIZE, "n");
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(F, &c, 1, 3, -4, 0, 0.1, f, g, f, out, err, 1, 1), KK_ERR_INVALID_SIZE, "m");
  d = c; d.ld = 3;
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(F, &d, 1, 3, 4, 0, 0.1, f, g, f, out, err, 1, 1), KK_ERR_INVALID_ARGUMENT, "cost->ld");
  d = c; d.batch_stride = -1;
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(F, &d, 1, 3, 4, 0, 0.1, f, g, f, out, err, 1, 1), KK_ERR_INVALID_ARGUMENT, "batch_stride");
  d = c; d.matrix = NULL;
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(F, &d, 1, 3, 4, 0, 0.1, f, g, f, out, err, 1, 1), KK_ERR_NULL_POINTER, "cost->matrix");
  d = c; d.kind = 7;
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(F, &d, 1, 3, 4, 0, 0.1, f, g, f, out, err, 1, 1), KK_ERR_INVALID_ARGUMENT, "cost->kind");
  d = pc; d.dim = 0;
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(F, &d, 1, 3, 4, 0, 0.1, f, g, f, out, err, 1, 1), KK_ERR_INVALID_ARGUMENT, "cost->dim");
  d = pc; d.dim = KK_OT_MAX_DIM + 1;
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(F, &d, 1, 3, 4, 0, 0.1, f, g, f, out, err, 1, 1), KK_ERR_INVALID_ARGUMENT, "cost->dim");
  d = pc; d.p = 0;
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(F, &d, 1, 3, 4, 0, 0.1, f, g, f, out, err, 1, 1), KK_ERR_INVALID_ARGUMENT, "cost->p");
  d = pc; d.p = INFINITY;
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(F, &d, 1, 3, 4, 0, 0.1, f, g, f, out, err, 1, 1), KK_ERR_INVALID_ARGUMENT, "cost->p");
  d = pc; d.kind = KK_OT_COST_MINKOWSKI_POW; d.p = 0.5;
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(F, &d, 1, 3, 4, 0, 0.1, f, g, f, out, err, 1, 1), KK_ERR_INVALID_ARGUMENT, "cost->p");
  d = pc; d.x = NULL;
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(F, &d, 1, 3, 4, 0, 0.1, f, g, f, out, err, 1, 1), KK_ERR_NULL_POINTER, "cost->x");
  d = pc; d.y_batch_stride = -2;
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(F, &d, 1, 3, 4, 0, 0.1, f, g, f, out, err, 1, 1), KK_ERR_INVALID_ARGUMENT, "y_batch_stride");
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(F, &c, 1, 3, 4, 0, 0.0, f, g, f, out, err, 1, 1), KK_ERR_INVALID_ARGUMENT, "reg");
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(F, &c, 1, 3, 4, 0, NAN, f, g, f, out, err, 1, 1), KK_ERR_INVALID_ARGUMENT, "reg");
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(F, &c, 1, 3, 4, 0, INFINITY, f, g, f, out, err, 1, 1), KK_ERR_INVALID_ARGUMENT, "reg");
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(F, &c, 1, 3, 4, 2, 0.1, f, g, f, out, err, 1, 1), KK_ERR_INVALID_ARGUMENT, "axis");
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(F, &c, 1, 3, 4, 0, 0.1, f, g, f, out, err, 3, 1), KK_ERR_INVALID_ARGUMENT, "err_norm");
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(F, &c, 1, 3, 4, 0, 0.1, f, g, NULL, out, err, 1, 1), KK_ERR_NULL_POINTER, "pot");
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(F, &c, 1, 3, 4, 0, 0.1, NULL, g, f, out, err, 1, 1), KK_ERR_NULL_POINTER, "w");
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(F, &c, 1, 3, 4, 0, 0.1, f, NULL, f, out, err, 1, 1), KK_ERR_NULL_POINTER, "other");
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(F, &c, 1, 3, 4, 0, 0.1, f, g, f, NULL, err, 1, 1), KK_ERR_NULL_POINTER, "pot_new");
  EXPECT_ERR(kk_ot_sinkhorn_step_cpu(F, &c, INT64_MAX / 2, 3, 4, 0, 0.1, f, g, f, out, err, 1, 1), KK_ERR_INVALID_SIZE, "overflows");
  /* marginals / plan */
  double r[3], cc[4], ob[1], P[12];
  EXPECT_ERR(kk_ot_marginals_cpu(F, &c, 1, 3, 4, 0.1, f, g, NULL, g, NULL, NULL, r, cc, ob, 1), KK_ERR_NULL_POINTER, "a is NULL");
  EXPECT_ERR(kk_ot_marginals_cpu(F, &c, 1, 3, 4, 0.1, NULL, g, NULL, NULL, NULL, NULL, r, cc, NULL, 1), KK_ERR_NULL_POINTER, "f");
  EXPECT_ERR(kk_ot_marginals_cpu(F, &c, 1, 3, 4, -1.0, f, g, NULL, NULL, NULL, NULL, r, cc, NULL, 1), KK_ERR_INVALID_ARGUMENT, "reg");
  EXPECT_ERR(kk_ot_plan_cpu(F, &c, 1, 3, 4, 0.1, f, g, P, 3, 1), KK_ERR_INVALID_ARGUMENT, "ldp");
  EXPECT_ERR(kk_ot_plan_cpu(F, &c, 1, 3, 4, 0.1, f, g, NULL, 4, 1), KK_ERR_NULL_POINTER, "plan");
  EXPECT_ERR(kk_ot_plan_cpu(F, &c, 1, 3, 4, 0.1, f, NULL, P, 4, 1), KK_ERR_NULL_POINTER, "g");
  /* sparsify */
  int32_t cols[12];
  double vals[12];
  EXPECT_ERR(kk_ot_sparsify_cpu(F, &c, 1, 3, 4, 0, 0.1, f, g, cols, vals, 1), KK_ERR_INVALID_ARGUMENT, "k must be");
  EXPECT_ERR(kk_ot_sparsify_cpu(F, &c, 1, 3, 4, 5, 0.1, f, g, cols, vals, 1), KK_ERR_INVALID_ARGUMENT, "k must be");
  EXPECT_ERR(kk_ot_sparsify_cpu(F, &c, 1, 3, 4, 2, 0.1, f, g, NULL, vals, 1), KK_ERR_NULL_POINTER, "cols");
  EXPECT_ERR(kk_ot_sparsify_cpu(F, &c, 1, 3, 4, 2, 0.1, f, g, cols, NULL, 1), KK_ERR_NULL_POINTER, "vals");
  EXPECT_OK(kk_ot_sparsify_cpu(F, &c, 1, 3, 4, 2, 0.1, f, g, cols, vals, 1));
  /* hvp / cg */
  double vx[3] = {1, 2, 3}, vy[4] = {1, 1, 1, 1}, yx[3], yy[4], zx[3] = {0, 0, 0}, zy[4] = {0, 0, 0, 0}, res;
  int32_t it;
  EXPECT_OK(kk_ot_hvp_cpu(F, 1, 3, 4, 2, cols, vals, f, g, 0.0, vx, vy, yx, yy, 1));
  EXPECT_ERR(kk_ot_hvp_cpu(F, 1, 3, 4, 2, cols, vals, f, g, -1.0, vx, vy, yx, yy, 1), KK_ERR_INVALID_ARGUMENT, "shift");
  EXPECT_ERR(kk_ot_hvp_cpu(F, 1, 3, 4, 2, cols, vals, f, g, NAN, vx, vy, yx, yy, 1), KK_ERR_INVALID_ARGUMENT, "shift");
  EXPECT_ERR(kk_ot_hvp_cpu(F, 1, 3, 4, -2, cols, vals, f, g, 0.0, vx, vy, yx, yy, 1), KK_ERR_INVALID_SIZE, "k");
  EXPECT_ERR(kk_ot_hvp_cpu(F, 1, 3, 4, 2, cols, vals, NULL, g, 0.0, vx, vy, yx, yy, 1), KK_ERR_NULL_POINTER, "r");
  EXPECT_ERR(kk_ot_hvp_cpu(F, 1, 3, 4, 2, cols, vals, f, g, 0.0, vx, vy, (void*)vx, yy, 1), KK_ERR_INVALID_ARGUMENT, "alias");
  cols[3] = 4; /* row 1, entry 1 */
  cols[5] = -1;
  EXPECT_ERR(kk_ot_hvp_cpu(F, 1, 3, 4, 2, cols, vals, f, g, 0.0, vx, vy, yx, yy, 1), KK_ERR_INVALID_ARGUMENT,
             "cols[problem 0, row 1, entry 1] = 4");
  EXPECT_ERR(kk_ot_cg_cpu(F, 1, 3, 4, 2, cols, vals, f, g, 0.0, vx, vy, zx, zy, 1e-8, 10, &it, &res, 1),
             KK_ERR_INVALID_ARGUMENT, "row 1, entry 1");
  cols[3] = 1;
  cols[5] = 2;
  EXPECT_ERR(kk_ot_cg_cpu(F, 1, 3, 4, 2, cols, vals, f, g, 0.0, vx, vy, zx, zy, 0.0, 10, &it, &res, 1), KK_ERR_INVALID_ARGUMENT, "tol");
  EXPECT_ERR(kk_ot_cg_cpu(F, 1, 3, 4, 2, cols, vals, f, g, 0.0, vx, vy, zx, zy, 1e-8, -1, &it, &res, 1), KK_ERR_INVALID_ARGUMENT, "max_iter");
  EXPECT_ERR(kk_ot_cg_cpu(F, 1, 3, 4, 2, cols, vals, f, g, 0.0, vx, vy, NULL, zy, 1e-8, 10, &it, &res, 1), KK_ERR_NULL_POINTER, "zx");
  EXPECT_ERR(kk_ot_cg_cpu(F, 1, 3, 4, 2, cols, vals, f, g, 0.0, NULL, vy, zx, zy, 1e-8, 10, &it, &res, 1), KK_ERR_NULL_POINTER, "rhs_x");
  EXPECT_ERR(kk_ot_cg_cpu(KK_BFLOAT16, 1, 3, 4, 2, cols, vals, f, g, 0.0, vx, vy, zx, zy, 1e-8, 10, &it, &res, 1), KK_ERR_UNSUPPORTED_DTYPE, "dtype");
  /* points_grad */
  double dx[6], dy[8];
  EXPECT_ERR(kk_ot_points_grad_cpu(F, &c, 1, 3, 4, 0.1, f, g, NULL, NULL, NULL, dx, dy, 1), KK_ERR_INVALID_ARGUMENT, "point-cloud");
  EXPECT_OK(kk_ot_points_grad_cpu(F, &pc, 1, 3, 4, 0.1, f, g, NULL, NULL, NULL, dx, dy, 1));
  EXPECT_ERR(kk_ot_points_grad_cpu(F, &pc, 1, 3, 4, 0.1, NULL, g, NULL, NULL, NULL, dx, dy, 1), KK_ERR_NULL_POINTER, "f");
  d = pc; d.p = -1;
  EXPECT_ERR(kk_ot_points_grad_cpu(F, &d, 1, 3, 4, 0.1, f, g, NULL, NULL, NULL, dx, dy, 1), KK_ERR_INVALID_ARGUMENT, "cost->p");
}

int main(void) {
  const kk_dtype dts[2] = {KK_FLOAT64, KK_FLOAT32};
  for (int di = 0; di < 2; ++di) {
    const kk_dtype dt = dts[di];
    /* kind, p, dim, B, n, m, shared, nt */
    test_problem(KK_OT_COST_MATRIX, 0, 1, 2, 5, 7, 0, dt, 1);
    test_problem(KK_OT_COST_MATRIX, 0, 1, 3, 4, 9, 1, dt, 3);
    test_problem(KK_OT_COST_MATRIX, 0, 1, 1, 3, 2100, 0, dt, 2);   /* two row tiles */
    test_problem(KK_OT_COST_MATRIX, 0, 1, 1, 140, 300, 0, dt, 3);  /* two strips, split rows */
    test_problem(KK_OT_COST_SQEUCLIDEAN, 2, 2, 2, 9, 11, 0, dt, 0);
    test_problem(KK_OT_COST_SQEUCLIDEAN, 2, 3, 1, 200, 6, 1, dt, 2);
    test_problem(KK_OT_COST_EUCLIDEAN_POW, 1.0, 2, 2, 6, 5, 1, dt, 2);
    test_problem(KK_OT_COST_EUCLIDEAN_POW, 1.5, 5, 1, 7, 8, 0, dt, 1);
    test_problem(KK_OT_COST_MINKOWSKI_POW, 1.0, 3, 1, 6, 9, 0, dt, 2);
    test_problem(KK_OT_COST_MINKOWSKI_POW, 3.0, 2, 2, 4, 4, 0, dt, 1);
    test_problem(KK_OT_COST_SQEUCLIDEAN, 2, 1, 1, 1, 1, 0, dt, 1);
    test_empty(dt);
  }
  test_errors();
  printf("ok %s %s %d\n", kk_version(), kk_cpu_isa(), g_checks);
  return 0;
}
