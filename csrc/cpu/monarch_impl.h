// Internal: the per-ISA Monarch CPU kernels (monarch.cpp is compiled once per ISA namespace).
#pragma once
#include <cstdint>

#include "kernelkit/kernelkit.h"

namespace kk {

struct MonarchArgs {
  int64_t batch, k, q, p, l, s, r;
  const void* x; int64_t ldx;
  const void* w1; const void* w2;
  void* out; int64_t ldo;           // forward
  const void* dout; int64_t lddo;   // backward
  void* dx; int64_t lddx; void* dw1; void* dw2;
};

#define KK_DECLARE_MONARCH_ISA(ns)                                        \
  namespace ns {                                                          \
  kk_status monarch_fwd(kk_dtype dtype, const MonarchArgs& a, int nthreads); \
  kk_status monarch_bwd(kk_dtype dtype, const MonarchArgs& a, int nthreads); \
  }
KK_DECLARE_MONARCH_ISA(isa_base)
#if defined(__x86_64__) || defined(_M_X64)
KK_DECLARE_MONARCH_ISA(isa_avx2)
KK_DECLARE_MONARCH_ISA(isa_avx512)
#endif
#undef KK_DECLARE_MONARCH_ISA

}  // namespace kk
