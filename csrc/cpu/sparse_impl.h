// Internal: the per-ISA sparse-linear CPU kernels (sparse.cpp is compiled once per ISA namespace);
// sparse_api.cpp checks every argument and index array before calling them, so the kernels trust
// their input.
#pragma once
#include <cstdint>

#include "kernelkit/kernelkit.h"

namespace kk {

struct SparseArgs {
  int64_t batch, n_out, n_in, nnz;
  const int64_t* row_ptr; const int32_t* col_idx;                         // CSR
  const int64_t* col_ptr; const int32_t* row_idx; const int64_t* perm;    // CSC index (dx only)
  const void* values;
  const void* x; int64_t ldx;
  const void* bias;                  // forward, may be NULL
  void* out; int64_t ldo;            // forward
  const void* dout; int64_t lddo;    // backward
  void* dx; int64_t lddx;            // backward, NULL = not wanted
  void* dvalues;                     // backward, NULL = not wanted
};

#define KK_DECLARE_SPARSE_ISA(ns)                                           \
  namespace ns {                                                            \
  kk_status sparse_fwd(kk_dtype dtype, const SparseArgs& a, int nthreads);  \
  kk_status sparse_bwd(kk_dtype dtype, const SparseArgs& a, int nthreads);  \
  }
KK_DECLARE_SPARSE_ISA(isa_base)
#if defined(__x86_64__) || defined(_M_X64)
KK_DECLARE_SPARSE_ISA(isa_avx2)
KK_DECLARE_SPARSE_ISA(isa_avx512)
#endif
#undef KK_DECLARE_SPARSE_ISA

}  // namespace kk
