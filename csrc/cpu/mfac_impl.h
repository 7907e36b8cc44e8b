// Internal: the per-ISA mfac CPU kernels (mfac.cpp is compiled once per ISA namespace); mfac_api.cpp
// checks every size, pointer, stride, scalar and dtype (and the finiteness of inserted rows and of
// newcol) before calling them, so the kernels trust their input.  The arguments are those of the C
// entry points (csrc/include/kernelkit/mfac.h) with the thread count resolved (nt >= 1).  Kernels
// that can find a matrix not positive definite return KK_ERR_INVALID_ARGUMENT with the message set
// on the calling thread.
#pragma once
#include <cstdint>

#include "kernelkit/kernelkit.h"
#include "kernelkit/mfac.h"

namespace kk {

#define KK_DECLARE_MFAC_ISA(ns)                                                                          \
  namespace ns {                                                                                         \
  kk_status mfac_dots(kk_dtype gdtype, int64_t r, int64_t d, int64_t block, void* G, int64_t ldg,        \
                      int64_t nvec, const void* x, int64_t ldx, int64_t insert_row, double* q, double* qr, \
                      int nt);                                                                           \
  kk_status mfac_combine(kk_dtype gdtype, int64_t r, int64_t d, int64_t block, const void* G, int64_t ldg, \
                         int64_t nvec, double alpha, const void* x, int64_t ldx, const double* c, void* out, \
                         int64_t ldo, int nt);                                                           \
  kk_status mfac_diag(kk_dtype zdtype, int64_t r, int64_t d, const void* Z, int64_t ldz, double alpha,     \
                      double beta, void* out, int nt);                                                   \
  kk_status mfac_static_setup(kk_dtype gdtype, int64_t m, int64_t d, int64_t block, const void* G,        \
                              int64_t ldg, double damp, void* Z, int64_t ldz, int nt);                   \
  kk_status mfac_window_update(int64_t m, double damp, double* gram, double* kinv, int64_t row,          \
                               const double* newcol, int nt);                                            \
  kk_status mfac_window_rebuild(int64_t m, double damp, const double* gram, double* kinv, int nt);       \
  kk_status mfac_window_coef(int64_t m, int64_t nvec, double scale, const double* kinv, const double* q,  \
                             double* c, int nt);                                                         \
  }
KK_DECLARE_MFAC_ISA(isa_base)
#if defined(__x86_64__) || defined(_M_X64)
KK_DECLARE_MFAC_ISA(isa_avx2)
KK_DECLARE_MFAC_ISA(isa_avx512)
#endif
#undef KK_DECLARE_MFAC_ISA

}  // namespace kk
