// Internal: the per-ISA rbf CPU kernels (rbf.cpp is compiled once per ISA namespace) and what they
// share with rbf_api.cpp (the grid's geometry rule).  rbf_api.cpp checks every size, pointer, stride,
// enum, dtype, index and shape before calling them, so the kernels trust their input.  The arguments
// are those of the C entry points (csrc/include/kernelkit/rbf.h) with the thread count resolved.
#pragma once
#include <cmath>
#include <cstdint>

#include "kernelkit/kernelkit.h"
#include "kernelkit/rbf.h"

namespace kk {

// The features' arguments (kk_rbf_features_fwd_cpu / _bwd_cpu), gathered once.
struct RbfArgs {
  kk_dtype dtype, wdtype;
  int dim, kernel, shape_full;
  int64_t n;
  const void* x;
  int64_t ldx, m;
  const void* centers;
  const void* shapes;
  const void* weights;
  int64_t ldw, channels;
  const void* omegas;
  int k;
  const int64_t* idx;
  int normalize;
};

inline int64_t rbf_cells_max(int64_t m) {
  const int64_t h = m / 2;
  return h < 1 ? 1 : h > (int64_t(1) << 24) ? (int64_t(1) << 24) : h;
}

// reference.grid_geometry, operation for operation (the same libm pow): the cell edge and the cells per
// dimension for the box [lo, hi] and m centres.  Positive extents share the budget cells_max(m); a zero
// extent gets one cell; the cell grows by 1/16 until the product of the resolutions fits.
inline void rbf_grid_geometry(int dim, const double* lo, const double* hi, int64_t m, double* cell_out,
                              int64_t* res) {
  const int64_t cm = rbf_cells_max(m);
  double ext[3];
  double prod = 1.0;
  int npos = 0;
  for (int d = 0; d < dim; ++d) {
    ext[d] = hi[d] - lo[d];
    if (ext[d] > 0.0) {
      prod *= ext[d];
      ++npos;
    }
  }
  for (int d = 0; d < 3; ++d) res[d] = 1;
  if (npos == 0) {
    *cell_out = 1.0;
    return;
  }
  double cell = std::pow(prod / (double)cm, 1.0 / npos);
  // Degenerate geometry (the reference raises there): keep the loop finite.
  if (!(cell > 0.0)) cell = 2.2250738585072014e-308;
  for (;;) {
    __int128 p = 1;
    for (int d = 0; d < dim; ++d) {
      int64_t r = 1;
      if (ext[d] > 0.0) {
        const double v = std::ceil(ext[d] / cell);
        r = v > (double)cm ? cm : (v >= 1.0 ? (int64_t)v : 1);
      }
      res[d] = r;
      p *= r;
    }
    if (p <= cm) break;
    cell *= 1.0625;
  }
  *cell_out = cell;
}

constexpr int64_t kRbfHeaderBytes = 256;

#define KK_DECLARE_RBF_ISA(ns)                                                                              \
  namespace ns {                                                                                            \
  kk_status rbf_grid_build(kk_dtype dtype, int dim, int64_t m, const void* centers, int64_t ldc, void* grid, \
                           int nt);                                                                         \
  kk_status rbf_knn(kk_dtype dtype, int dim, int64_t n, const void* x, int64_t ldx, const void* grid, int k,   \
                    int64_t* idx, void* dist2, int nt);                                                     \
  kk_status rbf_features_fwd(const RbfArgs& a, void* out, int64_t ldo, int nt);                             \
  kk_status rbf_features_bwd(const RbfArgs& a, const void* grad_out, int64_t ldg, void* dx, void* dcenters,  \
                             void* dshapes, void* dweights, void* domegas, int nt);                         \
  }
KK_DECLARE_RBF_ISA(isa_base)
#if defined(__x86_64__) || defined(_M_X64)
KK_DECLARE_RBF_ISA(isa_avx2)
KK_DECLARE_RBF_ISA(isa_avx512)
#endif
#undef KK_DECLARE_RBF_ISA

}  // namespace kk
