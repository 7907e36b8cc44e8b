// Internal: the per-ISA ot CPU kernels (ot.cpp is compiled once per ISA namespace); ot_api.cpp checks
// every size, pointer, stride, scalar and column index before calling them, so the kernels trust
// their input.  The arguments are those of the C entry points (csrc/include/kernelkit/ot.h).
#pragma once
#include <cstdint>

#include "kernelkit/kernelkit.h"
#include "kernelkit/ot.h"

namespace kk {

#define KK_DECLARE_OT_ISA(ns)                                                                              \
  namespace ns {                                                                                           \
  kk_status ot_sinkhorn_step(kk_dtype dtype, const kk_ot_cost& cost, int64_t batch, int64_t n, int64_t m,  \
                             int axis, double reg, const void* w, const void* other, const void* pot,      \
                             void* pot_new, void* err, int err_norm, int nt);                              \
  kk_status ot_marginals(kk_dtype dtype, const kk_ot_cost& cost, int64_t batch, int64_t n, int64_t m,      \
                         double reg, const void* f, const void* g, const void* a, const void* b,           \
                         const void* wr, const void* wc, void* r, void* c, void* obj, int nt);             \
  kk_status ot_plan(kk_dtype dtype, const kk_ot_cost& cost, int64_t batch, int64_t n, int64_t m,           \
                    double reg, const void* f, const void* g, void* plan, int64_t ldp, int nt);            \
  kk_status ot_sparsify(kk_dtype dtype, const kk_ot_cost& cost, int64_t batch, int64_t n, int64_t m,       \
                        int64_t k, double reg, const void* f, const void* g, int32_t* cols, void* vals,    \
                        int nt);                                                                           \
  kk_status ot_hvp(kk_dtype dtype, int64_t batch, int64_t n, int64_t m, int64_t k, const int32_t* cols,    \
                   const void* vals, const void* r, const void* c, double shift, const void* vx,           \
                   const void* vy, void* yx, void* yy, int nt);                                            \
  kk_status ot_cg(kk_dtype dtype, int64_t batch, int64_t n, int64_t m, int64_t k, const int32_t* cols,     \
                  const void* vals, const void* r, const void* c, double shift, const void* rhs_x,         \
                  const void* rhs_y, void* zx, void* zy, double tol, int32_t max_iter, int32_t* iters,     \
                  void* resid, int nt);                                                                    \
  kk_status ot_points_grad(kk_dtype dtype, const kk_ot_cost& cost, int64_t batch, int64_t n, int64_t m,    \
                           double reg, const void* f, const void* g, const void* scale, const void* u,     \
                           const void* v, void* dx, void* dy, int nt);                                     \
  }
KK_DECLARE_OT_ISA(isa_base)
#if defined(__x86_64__) || defined(_M_X64)
KK_DECLARE_OT_ISA(isa_avx2)
KK_DECLARE_OT_ISA(isa_avx512)
#endif
#undef KK_DECLARE_OT_ISA

}  // namespace kk
