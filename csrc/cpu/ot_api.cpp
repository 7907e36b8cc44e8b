// C ABI entry points of the CPU ot kernels (csrc/include/kernelkit/ot.h): dtype, size, cost, scalar,
// pointer and column-index checks (every message names the argument), the int64 extents of every
// array, then dispatch to the kernels compiled for the best instruction set this CPU has (ot.cpp,
// one copy per ISA).  A pointer is required only when its array has elements the call reads or
// writes (torch hands out NULL data pointers for empty tensors).
#include <omp.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>

#include "api_common.h"
#include "isa.h"
#include "ot_impl.h"
#include "status.h"

namespace kk {
namespace {

kk_status check_dtype(kk_dtype dtype) {
  return dtype == KK_FLOAT32 || dtype == KK_FLOAT64
             ? KK_OK
             : fail(KK_ERR_UNSUPPORTED_DTYPE, "ot cpu: dtype %d unsupported (float32, float64)", (int)dtype);
}

int threads(int32_t requested) { return requested > 0 ? requested : omp_get_max_threads(); }

kk_status checked_mul(int64_t a, int64_t b, int64_t* r, const char* what) {
  if (__builtin_mul_overflow(a, b, r))
    return fail(KK_ERR_INVALID_SIZE, "ot: %s overflows int64 (%lld * %lld)", what, (long long)a, (long long)b);
  return KK_OK;
}

kk_status check_sizes(int64_t batch, int64_t n, int64_t m) {
  KK_TRY(check_size(batch, "batch"));
  KK_TRY(check_size(n, "n"));
  KK_TRY(check_size(m, "m"));
  int64_t t;
  KK_TRY(checked_mul(batch, n, &t, "batch * n"));
  KK_TRY(checked_mul(batch, m, &t, "batch * m"));
  KK_TRY(checked_mul(n, m, &t, "n * m"));
  return KK_OK;
}

kk_status check_reg(double reg) {
  return std::isfinite(reg) && reg > 0 ? KK_OK
                                       : fail(KK_ERR_INVALID_ARGUMENT, "reg must be finite and > 0, got %g", reg);
}

bool is_points(int32_t kind) {
  return kind == KK_OT_COST_SQEUCLIDEAN || kind == KK_OT_COST_EUCLIDEAN_POW || kind == KK_OT_COST_MINKOWSKI_POW;
}

// The cost's fields and the extents it addresses; its arrays are required when n * m > 0 (batch > 0).
kk_status check_cost(const kk_ot_cost* c, int64_t batch, int64_t n, int64_t m) {
  KK_TRY(check_ptr(c, "cost"));
  const bool read = batch > 0 && n > 0 && m > 0;
  if (c->kind == KK_OT_COST_MATRIX) {
    KK_TRY(check_ld(c->ld, m, "cost->ld", "m"));
    if (c->batch_stride < 0)
      return fail(KK_ERR_INVALID_ARGUMENT, "cost->batch_stride must be >= 0, got %lld", (long long)c->batch_stride);
    if (!read) return KK_OK;
    KK_TRY(check_ptr(c->matrix, "cost->matrix"));
    int64_t a, b, e;  // the last element read: (batch-1)*batch_stride + (n-1)*ld + m - 1
    KK_TRY(checked_mul(batch - 1, c->batch_stride, &a, "(batch - 1) * cost->batch_stride"));
    KK_TRY(checked_mul(n - 1, c->ld, &b, "(n - 1) * cost->ld"));
    if (__builtin_add_overflow(a, b, &e) || __builtin_add_overflow(e, m, &e))
      return fail(KK_ERR_INVALID_SIZE, "ot: the cost matrix extent overflows int64");
    return KK_OK;
  }
  if (!is_points(c->kind))
    return fail(KK_ERR_INVALID_ARGUMENT,
                "cost->kind must be KK_OT_COST_MATRIX (0), _SQEUCLIDEAN (1), _EUCLIDEAN_POW (2) or "
                "_MINKOWSKI_POW (3), got %d",
                (int)c->kind);
  if (c->dim < 1 || c->dim > KK_OT_MAX_DIM)
    return fail(KK_ERR_INVALID_ARGUMENT, "cost->dim must be in [1, KK_OT_MAX_DIM = %d] for a point-cloud cost, got %d",
                KK_OT_MAX_DIM, (int)c->dim);
  if (c->kind == KK_OT_COST_EUCLIDEAN_POW && !(std::isfinite(c->p) && c->p > 0))
    return fail(KK_ERR_INVALID_ARGUMENT, "cost->p must be finite and > 0 for KK_OT_COST_EUCLIDEAN_POW, got %g", c->p);
  if (c->kind == KK_OT_COST_MINKOWSKI_POW && !(std::isfinite(c->p) && c->p >= 1))
    return fail(KK_ERR_INVALID_ARGUMENT, "cost->p must be finite and >= 1 for KK_OT_COST_MINKOWSKI_POW, got %g", c->p);
  if (c->x_batch_stride < 0)
    return fail(KK_ERR_INVALID_ARGUMENT, "cost->x_batch_stride must be >= 0, got %lld", (long long)c->x_batch_stride);
  if (c->y_batch_stride < 0)
    return fail(KK_ERR_INVALID_ARGUMENT, "cost->y_batch_stride must be >= 0, got %lld", (long long)c->y_batch_stride);
  int64_t t, a, b;
  KK_TRY(checked_mul(batch, std::max(n, m), &t, "batch * max(n, m)"));
  KK_TRY(checked_mul(t, c->dim, &t, "batch * max(n, m) * cost->dim"));
  KK_TRY(checked_mul(std::max<int64_t>(batch - 1, 0), std::max(c->x_batch_stride, c->y_batch_stride), &a,
                     "(batch - 1) * the point batch stride"));
  KK_TRY(checked_mul(std::max(n, m), c->dim, &b, "max(n, m) * cost->dim"));
  if (__builtin_add_overflow(a, b, &t)) return fail(KK_ERR_INVALID_SIZE, "ot: the point-cloud extent overflows int64");
  if (!read) return KK_OK;
  KK_TRY(check_ptr(c->x, "cost->x"));
  KK_TRY(check_ptr(c->y, "cost->y"));
  return KK_OK;
}

kk_status check_shift(double shift) {
  return std::isfinite(shift) && shift >= 0
             ? KK_OK
             : fail(KK_ERR_INVALID_ARGUMENT, "shift must be finite and >= 0, got %g", shift);
}

// Every column index in [0, m): the first bad one (lowest flat index) is reported.
kk_status check_cols(const int32_t* cols, int64_t batch, int64_t n, int64_t m, int64_t k, int nt) {
  const int64_t total = batch * n * k;
  if (total == 0) return KK_OK;
  int64_t bad = INT64_MAX;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(min : bad) if (total > 65536)
  for (int64_t q = 0; q < batch * n; ++q) {
    const int32_t* p = cols + q * k;
    bool ok = true;
    for (int64_t e = 0; e < k; ++e) ok &= p[e] >= 0 && p[e] < m;
    if (!ok)
      for (int64_t e = 0; e < k; ++e)
        if (!(p[e] >= 0 && p[e] < m)) {
          bad = std::min(bad, q * k + e);
          break;
        }
  }
  if (bad == INT64_MAX) return KK_OK;
  const int64_t q = bad / k;
  return fail(KK_ERR_INVALID_ARGUMENT, "cols[problem %lld, row %lld, entry %lld] = %d is out of range [0, m = %lld)",
              (long long)(q / n), (long long)(q % n), (long long)(bad % k), (int)cols[bad], (long long)m);
}

// The sparse arguments of hvp / cg.
kk_status check_sparse(int64_t batch, int64_t n, int64_t m, int64_t k, const int32_t* cols, const void* vals,
                       const void* r, const void* c, double shift, int nt) {
  KK_TRY(check_sizes(batch, n, m));
  KK_TRY(check_size(k, "k"));
  int64_t t;
  KK_TRY(checked_mul(batch * n, k, &t, "batch * n * k"));
  KK_TRY(check_shift(shift));
  if (batch > 0 && n > 0) KK_TRY(check_ptr(r, "r"));
  if (batch > 0 && m > 0) KK_TRY(check_ptr(c, "c"));
  if (batch > 0 && n > 0 && k > 0) {
    KK_TRY(check_ptr(cols, "cols"));
    KK_TRY(check_ptr(vals, "vals"));
    KK_TRY(check_cols(cols, batch, n, m, k, nt));
  }
  return KK_OK;
}

template <typename Fn>
kk_status guarded(Fn&& fn) {
  return run_guarded("ot", "out of host memory for work buffers", fn);
}

}  // namespace
}  // namespace kk

using namespace kk;

extern "C" {

KK_API kk_status kk_ot_sinkhorn_step_cpu(kk_dtype dtype, const kk_ot_cost* cost, int64_t batch, int64_t n,
                                         int64_t m, int32_t axis, double reg, const void* w, const void* other,
                                         const void* pot, void* pot_new, void* err, int32_t err_norm,
                                         int32_t num_threads) {
  clear_error();
  KK_TRY(check_dtype(dtype));
  KK_TRY(check_sizes(batch, n, m));
  KK_TRY(check_cost(cost, batch, n, m));
  KK_TRY(check_reg(reg));
  if (axis != 0 && axis != 1)
    return fail(KK_ERR_INVALID_ARGUMENT, "axis must be 0 (rows: the f update) or 1 (columns: the g update), got %d",
                (int)axis);
  if (err_norm != KK_OT_NORM_INF && err_norm != KK_OT_NORM_L1 && err_norm != KK_OT_NORM_L2)
    return fail(KK_ERR_INVALID_ARGUMENT,
                "err_norm must be KK_OT_NORM_INF (0), KK_OT_NORM_L1 (1) or KK_OT_NORM_L2 (2), got %d", (int)err_norm);
  const int64_t len = axis == 0 ? n : m, olen = axis == 0 ? m : n;
  if (batch > 0 && len > 0) {
    KK_TRY(check_ptr(w, "w"));
    KK_TRY(check_ptr(pot_new, "pot_new"));
    if (olen > 0) KK_TRY(check_ptr(other, "other"));
    if (err && !pot)
      return fail(KK_ERR_NULL_POINTER, "pot is NULL but err is not: the error is that of the plan at pot (pass both)");
  }
  const int nt = threads(num_threads);
  const Isa isa = active_isa();
  return guarded([&]() {
    return KK_DISPATCH(isa, ot_sinkhorn_step, dtype, *cost, batch, n, m, axis, reg, w, other, pot, pot_new, err,
                       err_norm, nt);
  });
}

KK_API kk_status kk_ot_marginals_cpu(kk_dtype dtype, const kk_ot_cost* cost, int64_t batch, int64_t n, int64_t m,
                                     double reg, const void* f, const void* g, const void* a, const void* b,
                                     const void* wr, const void* wc, void* r, void* c, void* obj,
                                     int32_t num_threads) {
  clear_error();
  KK_TRY(check_dtype(dtype));
  KK_TRY(check_sizes(batch, n, m));
  KK_TRY(check_cost(cost, batch, n, m));
  KK_TRY(check_reg(reg));
  if (batch == 0 || (!r && !c && !obj)) return KK_OK;
  if (n > 0) KK_TRY(check_ptr(f, "f"));
  if (m > 0) KK_TRY(check_ptr(g, "g"));
  if (obj) {
    if (n > 0 && !a) return fail(KK_ERR_NULL_POINTER, "a is NULL but obj is not (the objective needs a and b)");
    if (m > 0 && !b) return fail(KK_ERR_NULL_POINTER, "b is NULL but obj is not (the objective needs a and b)");
  }
  if (r && n == 0) r = nullptr;
  if (c && m == 0) c = nullptr;
  if (!r && !c && !obj) return KK_OK;
  const int nt = threads(num_threads);
  const Isa isa = active_isa();
  return guarded([&]() {
    return KK_DISPATCH(isa, ot_marginals, dtype, *cost, batch, n, m, reg, f, g, a, b, wr, wc, r, c, obj, nt);
  });
}

KK_API kk_status kk_ot_plan_cpu(kk_dtype dtype, const kk_ot_cost* cost, int64_t batch, int64_t n, int64_t m,
                                double reg, const void* f, const void* g, void* plan, int64_t ldp,
                                int32_t num_threads) {
  clear_error();
  KK_TRY(check_dtype(dtype));
  KK_TRY(check_sizes(batch, n, m));
  KK_TRY(check_cost(cost, batch, n, m));
  KK_TRY(check_reg(reg));
  KK_TRY(check_ld(ldp, m, "ldp", "m"));
  int64_t t;
  KK_TRY(checked_mul(batch * n, ldp, &t, "batch * n * ldp"));
  if (batch == 0 || n == 0 || m == 0) return KK_OK;
  KK_TRY(check_ptr(f, "f"));
  KK_TRY(check_ptr(g, "g"));
  KK_TRY(check_ptr(plan, "plan"));
  const int nt = threads(num_threads);
  const Isa isa = active_isa();
  return guarded([&]() { return KK_DISPATCH(isa, ot_plan, dtype, *cost, batch, n, m, reg, f, g, plan, ldp, nt); });
}

KK_API kk_status kk_ot_sparsify_cpu(kk_dtype dtype, const kk_ot_cost* cost, int64_t batch, int64_t n, int64_t m,
                                    int64_t k, double reg, const void* f, const void* g, int32_t* cols, void* vals,
                                    int32_t num_threads) {
  clear_error();
  KK_TRY(check_dtype(dtype));
  KK_TRY(check_sizes(batch, n, m));
  KK_TRY(check_cost(cost, batch, n, m));
  KK_TRY(check_reg(reg));
  if (batch == 0 || n == 0 || m == 0) return KK_OK;
  if (m > INT32_MAX)
    return fail(KK_ERR_INVALID_SIZE, "m (%lld) must fit int32 for sparsify (cols is int32)", (long long)m);
  const int64_t kmax = std::min<int64_t>(m, KK_OT_MAX_KEEP);
  if (k < 1 || k > kmax)
    return fail(KK_ERR_INVALID_ARGUMENT, "k must be in [1, min(m, KK_OT_MAX_KEEP) = %lld], got %lld", (long long)kmax,
                (long long)k);
  int64_t t;
  KK_TRY(checked_mul(batch * n, k, &t, "batch * n * k"));
  KK_TRY(check_ptr(f, "f"));
  KK_TRY(check_ptr(g, "g"));
  KK_TRY(check_ptr(cols, "cols"));
  KK_TRY(check_ptr(vals, "vals"));
  const int nt = threads(num_threads);
  const Isa isa = active_isa();
  return guarded(
      [&]() { return KK_DISPATCH(isa, ot_sparsify, dtype, *cost, batch, n, m, k, reg, f, g, cols, vals, nt); });
}

KK_API kk_status kk_ot_hvp_cpu(kk_dtype dtype, int64_t batch, int64_t n, int64_t m, int64_t k, const int32_t* cols,
                               const void* vals, const void* r, const void* c, double shift, const void* vx,
                               const void* vy, void* yx, void* yy, int32_t num_threads) {
  clear_error();
  KK_TRY(check_dtype(dtype));
  const int nt = threads(num_threads);
  KK_TRY(check_sparse(batch, n, m, k, cols, vals, r, c, shift, nt));
  if (batch == 0) return KK_OK;
  if (n > 0) {
    KK_TRY(check_ptr(vx, "vx"));
    KK_TRY(check_ptr(yx, "yx"));
  }
  if (m > 0) {
    KK_TRY(check_ptr(vy, "vy"));
    KK_TRY(check_ptr(yy, "yy"));
  }
  if ((n > 0 && (yx == vx || (m > 0 && yx == vy))) || (m > 0 && (yy == vy || (n > 0 && yy == vx))))
    return fail(KK_ERR_INVALID_ARGUMENT, "the output (yx, yy) must not alias the input (vx, vy)");
  const Isa isa = active_isa();
  return guarded(
      [&]() { return KK_DISPATCH(isa, ot_hvp, dtype, batch, n, m, k, cols, vals, r, c, shift, vx, vy, yx, yy, nt); });
}

KK_API kk_status kk_ot_cg_cpu(kk_dtype dtype, int64_t batch, int64_t n, int64_t m, int64_t k, const int32_t* cols,
                              const void* vals, const void* r, const void* c, double shift, const void* rhs_x,
                              const void* rhs_y, void* zx, void* zy, double tol, int32_t max_iter, int32_t* iters,
                              void* resid, int32_t num_threads) {
  clear_error();
  KK_TRY(check_dtype(dtype));
  const int nt = threads(num_threads);
  KK_TRY(check_sparse(batch, n, m, k, cols, vals, r, c, shift, nt));
  if (!(tol > 0)) return fail(KK_ERR_INVALID_ARGUMENT, "tol must be > 0, got %g", tol);
  if (max_iter < 0) return fail(KK_ERR_INVALID_ARGUMENT, "max_iter must be >= 0, got %d", (int)max_iter);
  if (batch == 0) return KK_OK;
  if (n > 0) {
    KK_TRY(check_ptr(rhs_x, "rhs_x"));
    KK_TRY(check_ptr(zx, "zx"));
  }
  if (m > 0) {
    KK_TRY(check_ptr(rhs_y, "rhs_y"));
    KK_TRY(check_ptr(zy, "zy"));
  }
  const Isa isa = active_isa();
  return guarded([&]() {
    return KK_DISPATCH(isa, ot_cg, dtype, batch, n, m, k, cols, vals, r, c, shift, rhs_x, rhs_y, zx, zy, tol,
                       max_iter, iters, resid, nt);
  });
}

KK_API kk_status kk_ot_points_grad_cpu(kk_dtype dtype, const kk_ot_cost* cost, int64_t batch, int64_t n, int64_t m,
                                       double reg, const void* f, const void* g, const void* scale, const void* u,
                                       const void* v, void* dx, void* dy, int32_t num_threads) {
  clear_error();
  KK_TRY(check_dtype(dtype));
  KK_TRY(check_sizes(batch, n, m));
  KK_TRY(check_ptr(cost, "cost"));
  if (!is_points(cost->kind))
    return fail(KK_ERR_INVALID_ARGUMENT,
                "points_grad needs a point-cloud cost (cost->kind 1, 2 or 3: the gradient is with respect to the "
                "points), got kind %d",
                (int)cost->kind);
  KK_TRY(check_cost(cost, batch, n, m));
  KK_TRY(check_reg(reg));
  if (dx && (batch == 0 || n == 0)) dx = nullptr;
  if (dy && (batch == 0 || m == 0)) dy = nullptr;
  if (!dx && !dy) return KK_OK;
  if (n > 0 && m > 0) {
    KK_TRY(check_ptr(f, "f"));
    KK_TRY(check_ptr(g, "g"));
  }
  const int nt = threads(num_threads);
  const Isa isa = active_isa();
  return guarded([&]() {
    return KK_DISPATCH(isa, ot_points_grad, dtype, *cost, batch, n, m, reg, f, g, scale, u, v, dx, dy, nt);
  });
}

}  // extern "C"
