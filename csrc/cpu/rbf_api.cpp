// C ABI entry points of the CPU rbf kernels (csrc/include/kernelkit/rbf.h): dtype, enum, size, stride and
// pointer checks (every message names the argument), the int64 extents of every array, the values the
// kernels trust (idx entries in [-1, m), the shapes finite / symmetric / positive definite, the centres
// of a build finite, the grid's header matching the call), then dispatch to the kernels compiled for the
// best instruction set this CPU has (rbf.cpp, one copy per ISA).  A pointer is required only when its
// array has elements the call reads or writes (torch hands out NULL data pointers for empty tensors).
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "api_common.h"
#include "isa.h"
#include "rbf_impl.h"
#include "status.h"

namespace kk {
namespace {

int threads(int32_t requested) { return requested > 0 ? requested : omp_get_max_threads(); }

kk_status check_dtype(kk_dtype dt) {
  return dt == KK_FLOAT32 || dt == KK_FLOAT64
             ? KK_OK
             : fail(KK_ERR_UNSUPPORTED_DTYPE, "rbf cpu: dtype %d unsupported (KK_FLOAT32, KK_FLOAT64)", (int)dt);
}

kk_status check_wdtype(kk_dtype dt, kk_dtype wdt) {
  if (wdt == dt) return KK_OK;
  if ((wdt == KK_FLOAT16 || wdt == KK_BFLOAT16) && dt == KK_FLOAT32) return KK_OK;
  return fail(KK_ERR_UNSUPPORTED_DTYPE,
              "rbf cpu: wdtype %d unsupported with dtype %d (wdtype must be dtype, or KK_FLOAT16 / KK_BFLOAT16 "
              "with KK_FLOAT32 coordinates)",
              (int)wdt, (int)dt);
}

kk_status check_dim(int32_t dim) {
  return dim == 2 || dim == 3 ? KK_OK : fail(KK_ERR_INVALID_SIZE, "rbf: dim must be 2 or 3, got %d", (int)dim);
}

kk_status check_k(int32_t k) {
  return k >= 1 && k <= 32 ? KK_OK : fail(KK_ERR_INVALID_ARGUMENT, "rbf: k must be in [1, 32], got %d", (int)k);
}

kk_status check_m(int64_t m) {
  KK_TRY(check_size(m, "m"));
  return m < (int64_t(1) << 31) ? KK_OK
                                : fail(KK_ERR_INVALID_SIZE, "rbf: m must be < 2^31, got %lld", (long long)m);
}

int64_t esize(kk_dtype dt) { return dt == KK_FLOAT64 ? 8 : dt == KK_FLOAT32 ? 4 : 2; }

// Elements spanned by `rows` rows of `width` at stride ld, times `es` bytes, overflow-checked.
kk_status extent(int64_t rows, int64_t width, int64_t ld, int64_t es, const char* what) {
  if (rows == 0 || width == 0) return KK_OK;
  int64_t e;
  if (__builtin_mul_overflow(rows - 1, ld, &e) || __builtin_add_overflow(e, width, &e) ||
      __builtin_mul_overflow(e, es, &e))
    return fail(KK_ERR_INVALID_SIZE, "rbf: the extent of %s overflows int64", what);
  return KK_OK;
}

void layout_of(kk_dtype dtype, int32_t dim, int64_t m, kk_rbf_grid_layout_t* l) {
  const int64_t cm = rbf_cells_max(m);
  l->cells_max = cm;
  l->cell_start_off = kRbfHeaderBytes;
  l->order_off = l->cell_start_off + 8 * (cm + 1);
  l->coords_off = l->order_off + 8 * m;
  l->bytes = l->coords_off + ((esize(dtype) * m * dim + 7) / 8) * 8;
}

template <typename T>
kk_status check_finite_rows(const T* c, int64_t rows, int64_t width, int64_t ld, const char* name) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t d = 0; d < width; ++d)
      if (!std::isfinite(c[i * ld + d]))
        return fail(KK_ERR_INVALID_ARGUMENT, "rbf: %s[%lld, %lld] = %g is not finite", name, (long long)i, (long long)d,
                    (double)c[i * ld + d]);
  return KK_OK;
}

// The header of a grid buffer against the call (dim, dtype) and itself (sizes, cell_start).
kk_status check_grid(const void* grid, kk_dtype dtype, int32_t dim) {
  KK_TRY(check_ptr(grid, "grid"));
  if (reinterpret_cast<uintptr_t>(grid) % 8)
    return fail(KK_ERR_INVALID_ARGUMENT, "rbf: grid must be 8-byte aligned");
  const int64_t* h = static_cast<const int64_t*>(grid);
  const double* g = reinterpret_cast<const double*>(static_cast<const char*>(grid) + 128);
  if (h[0] != dim)
    return fail(KK_ERR_INVALID_ARGUMENT, "rbf: grid was built for dim %lld, got dim = %d", (long long)h[0], (int)dim);
  if (h[6] != (int64_t)dtype)
    return fail(KK_ERR_INVALID_ARGUMENT, "rbf: grid was built for dtype %lld, got dtype = %d", (long long)h[6],
                (int)dtype);
  const int64_t m = h[1];
  if (m < 0 || m >= (int64_t(1) << 31))
    return fail(KK_ERR_INVALID_ARGUMENT, "rbf: grid header m = %lld is invalid", (long long)m);
  const int64_t cm = rbf_cells_max(m);
  if (h[7] != cm) return fail(KK_ERR_INVALID_ARGUMENT, "rbf: grid header cells_max = %lld != %lld", (long long)h[7], (long long)cm);
  __int128 p = 1;
  for (int d = 0; d < 3; ++d) {
    if (h[3 + d] < 1 || (d >= dim && h[3 + d] != 1) || h[3 + d] > cm)
      return fail(KK_ERR_INVALID_ARGUMENT, "rbf: grid header res%d = %lld is invalid", d, (long long)h[3 + d]);
    p *= h[3 + d];
  }
  if (p != h[2] || h[2] > cm)
    return fail(KK_ERR_INVALID_ARGUMENT, "rbf: grid header ncells = %lld does not match its resolution", (long long)h[2]);
  if (h[8] != 0 && h[8] != 1) return fail(KK_ERR_INVALID_ARGUMENT, "rbf: grid header flags = %lld", (long long)h[8]);
  if (h[8] == 0) {
    if (!(g[3] > 0.0)) return fail(KK_ERR_INVALID_ARGUMENT, "rbf: grid cell edge %g is not > 0", g[3]);
    for (int d = 0; d < dim; ++d)
      if (!std::isfinite(g[d])) return fail(KK_ERR_INVALID_ARGUMENT, "rbf: grid lo%d = %g is not finite", d, g[d]);
    const int64_t* st = reinterpret_cast<const int64_t*>(static_cast<const char*>(grid) + kRbfHeaderBytes);
    if (st[0] != 0 || st[h[2]] != m)
      return fail(KK_ERR_INVALID_ARGUMENT, "rbf: grid cell_start does not span [0, m]: not a built grid?");
    for (int64_t c = 0; c < h[2]; ++c)
      if (st[c + 1] < st[c]) return fail(KK_ERR_INVALID_ARGUMENT, "rbf: grid cell_start decreases at cell %lld", (long long)c);
  }
  return KK_OK;
}

// shapes: finite; full ones symmetric to 1e-5 relative and positive definite (Cholesky of the symmetric
// part in double); diagonal ones and nlin scales > 0.
template <typename T>
kk_status check_shapes_t(const T* s, int64_t m, int dim, int full) {
  const int w = full ? dim * dim : dim;
  for (int64_t i = 0; i < m; ++i) {
    const T* A = s + i * w;
    double mx = 0;
    for (int e = 0; e < w; ++e) {
      if (!std::isfinite(A[e]))
        return fail(KK_ERR_INVALID_ARGUMENT, "rbf: shapes of RBF %lld: entry %d = %g is not finite", (long long)i, e,
                    (double)A[e]);
      mx = std::fmax(mx, std::fabs((double)A[e]));
    }
    if (!full) {
      for (int e = 0; e < w; ++e)
        if (!(A[e] > 0))
          return fail(KK_ERR_INVALID_ARGUMENT, "rbf: shapes of RBF %lld: diagonal entry %d = %g must be > 0",
                      (long long)i, e, (double)A[e]);
      continue;
    }
    double S[9], L[9] = {0};
    for (int a = 0; a < dim; ++a)
      for (int b = 0; b < dim; ++b) {
        const double x = A[a * dim + b], y = A[b * dim + a];
        if (std::fabs(x - y) > 1e-5 * mx)
          return fail(KK_ERR_INVALID_ARGUMENT,
                      "rbf: shapes of RBF %lld are not symmetric: |A[%d,%d] - A[%d,%d]| = %g > 1e-5 * max|A| = %g",
                      (long long)i, a, b, b, a, std::fabs(x - y), 1e-5 * mx);
        S[a * dim + b] = 0.5 * (x + y);
      }
    for (int j = 0; j < dim; ++j) {
      double d = S[j * dim + j];
      for (int p = 0; p < j; ++p) d -= L[j * dim + p] * L[j * dim + p];
      if (!(d > 0))
        return fail(KK_ERR_INVALID_ARGUMENT, "rbf: shapes of RBF %lld are not positive definite", (long long)i);
      L[j * dim + j] = std::sqrt(d);
      for (int r = j + 1; r < dim; ++r) {
        double v = S[r * dim + j];
        for (int p = 0; p < j; ++p) v -= L[r * dim + p] * L[j * dim + p];
        L[r * dim + j] = v / L[j * dim + j];
      }
    }
  }
  return KK_OK;
}

// idx (n x k) entries in [-1, m), checked in parallel; the first bad entry (lowest position) is reported.
kk_status check_idx(const int64_t* idx, int64_t n, int32_t k, int64_t m, int nt) {
  const int64_t total = n * k;
  int64_t bad = total;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(min : bad) if (total > 65536)
  for (int64_t e = 0; e < total; ++e)
    if ((idx[e] < -1 || idx[e] >= m) && e < bad) bad = e;
  if (bad < total)
    return fail(KK_ERR_INVALID_ARGUMENT, "rbf: idx[%lld, %lld] = %lld is outside [-1, m = %lld)", (long long)(bad / k),
                (long long)(bad % k), (long long)idx[bad], (long long)m);
  return KK_OK;
}

// The checks shared by the forward and the backward of the features.
kk_status check_features(const RbfArgs& a, int nt) {
  KK_TRY(check_dtype(a.dtype));
  KK_TRY(check_wdtype(a.dtype, a.wdtype));
  KK_TRY(check_dim(a.dim));
  if (a.kernel < 0 || a.kernel > 2)
    return fail(KK_ERR_INVALID_ARGUMENT, "rbf: kernel must be 0 (ivq), 1 (gauss) or 2 (nlin), got %d", a.kernel);
  if (a.shape_full != 0 && a.shape_full != 1)
    return fail(KK_ERR_INVALID_ARGUMENT, "rbf: shape_full must be 0 or 1, got %d", a.shape_full);
  if (a.shape_full && a.kernel == KK_RBF_NLIN)
    return fail(KK_ERR_INVALID_ARGUMENT, "rbf: shape_full = 1 is not defined for kernel nlin (per-axis scales)");
  if (a.normalize < 0 || a.normalize > 2)
    return fail(KK_ERR_INVALID_ARGUMENT, "rbf: normalize must be 0, 1 or 2, got %d", a.normalize);
  KK_TRY(check_k(a.k));
  KK_TRY(check_size(a.n, "n"));
  KK_TRY(check_m(a.m));
  KK_TRY(check_size(a.channels, "channels"));
  const int64_t es = esize(a.dtype), ws = esize(a.wdtype);
  const int sw = a.shape_full ? a.dim * a.dim : a.dim;
  if (a.n > 0) KK_TRY(check_ld(a.ldx, a.dim, "ldx", "dim"));
  if (a.m > 0 && a.channels > 0) KK_TRY(check_ld(a.ldw, a.channels, "ldw", "channels"));
  KK_TRY(extent(a.n, a.dim, a.ldx, es, "x"));
  KK_TRY(extent(a.m, a.channels, a.ldw, ws, "weights"));
  KK_TRY(extent(a.n, a.k, a.k, 8, "idx"));
  KK_TRY(extent(a.n, a.channels, a.channels, 8, "out"));
  if (a.n > 0) {
    KK_TRY(check_ptr(a.x, "x"));
    KK_TRY(check_ptr(a.idx, "idx"));
  }
  if (a.m > 0) {
    KK_TRY(check_ptr(a.centers, "centers"));
    KK_TRY(check_ptr(a.shapes, "shapes"));
    if (a.channels > 0) KK_TRY(check_ptr(a.weights, "weights"));
  }
  if (a.n > 0) KK_TRY(check_idx(a.idx, a.n, a.k, a.m, nt));
  if (a.m > 0) {
    if (a.dtype == KK_FLOAT32) {
      KK_TRY(check_finite_rows(static_cast<const float*>(a.centers), a.m, a.dim, a.dim, "centers"));
      KK_TRY(check_shapes_t(static_cast<const float*>(a.shapes), a.m, a.dim, a.shape_full));
    } else {
      KK_TRY(check_finite_rows(static_cast<const double*>(a.centers), a.m, a.dim, a.dim, "centers"));
      KK_TRY(check_shapes_t(static_cast<const double*>(a.shapes), a.m, a.dim, a.shape_full));
    }
  }
  (void)sw;
  return KK_OK;
}

template <typename Fn>
kk_status guarded(Fn&& fn) {
  return run_guarded("rbf", "out of host memory for work buffers", fn);
}

}  // namespace
}  // namespace kk

using namespace kk;

extern "C" {

KK_API kk_status kk_rbf_grid_layout(kk_dtype dtype, int32_t dim, int64_t m, kk_rbf_grid_layout_t* layout) {
  clear_error();
  KK_TRY(check_dtype(dtype));
  KK_TRY(check_dim(dim));
  KK_TRY(check_m(m));
  KK_TRY(check_ptr(layout, "layout"));
  layout_of(dtype, dim, m, layout);
  return KK_OK;
}

KK_API kk_status kk_rbf_grid_build_cpu(kk_dtype dtype, int32_t dim, int64_t m, const void* centers, int64_t ldc,
                                       void* grid, int64_t grid_bytes, int32_t num_threads) {
  clear_error();
  KK_TRY(check_dtype(dtype));
  KK_TRY(check_dim(dim));
  KK_TRY(check_m(m));
  if (m > 0) KK_TRY(check_ld(ldc, dim, "ldc", "dim"));
  KK_TRY(extent(m, dim, ldc, esize(dtype), "centers"));
  kk_rbf_grid_layout_t l;
  layout_of(dtype, dim, m, &l);
  KK_TRY(check_ptr(grid, "grid"));
  if (reinterpret_cast<uintptr_t>(grid) % 8) return fail(KK_ERR_INVALID_ARGUMENT, "rbf: grid must be 8-byte aligned");
  if (grid_bytes < l.bytes)
    return fail(KK_ERR_INVALID_SIZE, "rbf: grid_bytes (%lld) is smaller than the layout's %lld bytes",
                (long long)grid_bytes, (long long)l.bytes);
  if (m > 0) {
    KK_TRY(check_ptr(centers, "centers"));
    if (dtype == KK_FLOAT32)
      KK_TRY(check_finite_rows(static_cast<const float*>(centers), m, dim, ldc, "centers"));
    else
      KK_TRY(check_finite_rows(static_cast<const double*>(centers), m, dim, ldc, "centers"));
  }
  const int nt = threads(num_threads);
  const Isa isa = active_isa();
  return guarded([&]() { return KK_DISPATCH(isa, rbf_grid_build, dtype, dim, m, centers, ldc, grid, nt); });
}

KK_API kk_status kk_rbf_knn_cpu(kk_dtype dtype, int32_t dim, int64_t n, const void* x, int64_t ldx, const void* grid,
                                int32_t k, int64_t* idx, void* dist2, int32_t num_threads) {
  clear_error();
  KK_TRY(check_dtype(dtype));
  KK_TRY(check_dim(dim));
  KK_TRY(check_size(n, "n"));
  KK_TRY(check_k(k));
  if (n > 0) KK_TRY(check_ld(ldx, dim, "ldx", "dim"));
  KK_TRY(extent(n, dim, ldx, esize(dtype), "x"));
  KK_TRY(extent(n, k, k, 8, "idx"));
  KK_TRY(check_grid(grid, dtype, dim));
  if (n == 0) return KK_OK;
  KK_TRY(check_ptr(x, "x"));
  KK_TRY(check_ptr(idx, "idx"));
  KK_TRY(check_ptr(dist2, "dist2"));
  const int64_t* h = static_cast<const int64_t*>(grid);
  if (h[8] != 0) {  // a grid flagged by the CUDA build (a non-finite centre): every search -1 / NaN
    for (int64_t e = 0; e < n * k; ++e) {
      idx[e] = -1;
      if (dtype == KK_FLOAT32)
        static_cast<float*>(dist2)[e] = NAN;
      else
        static_cast<double*>(dist2)[e] = NAN;
    }
    return KK_OK;
  }
  const int nt = threads(num_threads);
  const Isa isa = active_isa();
  return guarded([&]() { return KK_DISPATCH(isa, rbf_knn, dtype, dim, n, x, ldx, grid, k, idx, dist2, nt); });
}

KK_API kk_status kk_rbf_features_fwd_cpu(kk_dtype dtype, kk_dtype wdtype, int32_t dim, int32_t kernel,
                                         int32_t shape_full, int64_t n, const void* x, int64_t ldx, int64_t m,
                                         const void* centers, const void* shapes, const void* weights, int64_t ldw,
                                         int64_t channels, const void* omegas, int32_t k, const int64_t* idx,
                                         int32_t normalize, void* out, int64_t ldo, int32_t num_threads) {
  clear_error();
  const RbfArgs a{dtype, wdtype, dim, kernel, shape_full, n, x, ldx, m, centers, shapes, weights, ldw, channels,
                  omegas, k, idx, normalize};
  const int nt = threads(num_threads);
  KK_TRY(check_features(a, nt));
  if (n > 0 && channels > 0) KK_TRY(check_ld(ldo, channels, "ldo", "channels"));
  KK_TRY(extent(n, channels, ldo, esize(wdtype), "out"));
  if (n == 0 || channels == 0) return KK_OK;
  KK_TRY(check_ptr(out, "out"));
  const Isa isa = active_isa();
  return guarded([&]() { return KK_DISPATCH(isa, rbf_features_fwd, a, out, ldo, nt); });
}

KK_API kk_status kk_rbf_features_bwd_cpu(kk_dtype dtype, kk_dtype wdtype, int32_t dim, int32_t kernel,
                                         int32_t shape_full, int64_t n, const void* x, int64_t ldx, int64_t m,
                                         const void* centers, const void* shapes, const void* weights, int64_t ldw,
                                         int64_t channels, const void* omegas, int32_t k, const int64_t* idx,
                                         int32_t normalize, const void* grad_out, int64_t ldg, void* dx,
                                         void* dcenters, void* dshapes, void* dweights, void* domegas,
                                         int32_t num_threads) {
  clear_error();
  const RbfArgs a{dtype, wdtype, dim, kernel, shape_full, n, x, ldx, m, centers, shapes, weights, ldw, channels,
                  omegas, k, idx, normalize};
  const int nt = threads(num_threads);
  KK_TRY(check_features(a, nt));
  if (n > 0 && channels > 0) {
    KK_TRY(check_ld(ldg, channels, "ldg", "channels"));
    KK_TRY(check_ptr(grad_out, "grad_out"));
  }
  KK_TRY(extent(n, channels, ldg, esize(wdtype), "grad_out"));
  KK_TRY(extent(m, channels, channels, esize(dtype), "dweights"));
  const Isa isa = active_isa();
  return guarded([&]() {
    return KK_DISPATCH(isa, rbf_features_bwd, a, grad_out, ldg, dx, dcenters, dshapes, dweights, domegas, nt);
  });
}

}  // extern "C"
