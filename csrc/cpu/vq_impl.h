// Internal: the per-ISA vq CPU kernels (vq.cpp is compiled once per ISA namespace); vq_api.cpp
// checks every size, pointer and code before calling them, so the kernels trust their input.
#pragma once
#include <cstdint>

#include "kernelkit/kernelkit.h"
#include "kernelkit/vq.h"

namespace kk {

struct VqArgs {
  // The format, widened: n_out, n_in, K, rows per codebook set, d, M, code_bits.
  int64_t n_out, n_in, K, rpc;
  int d, M, code_bits;
  int64_t batch;
  const void* codes;                  // [n_out, n_in/d, M] uint8 or int16 (read as uint16)
  const void* codebooks;              // [n_sets, M, K, d]
  const void* scales;                 // [n_out] or NULL
  const void* x; int64_t ldx;         // (batch, n_in)
  const void* bias;                   // forward: [n_out] or NULL
  void* out; int64_t ldo;             // forward: (batch, n_out)
  int path;                           // forward: KK_VQ_PATH_*
  const void* dout; int64_t lddo;     // backward: (batch, n_out)
  void* dx; int64_t lddx;             // backward: (batch, n_in) or NULL
  void* dcodebooks;                   // backward: [n_sets, M, K, d] or NULL
  void* dscales;                      // backward: [n_out] or NULL
  void* w; int64_t ldw;               // dequantize: (n_out, n_in)
};

#define KK_DECLARE_VQ_ISA(ns)                                                                   \
  namespace ns {                                                                                \
  kk_status vq_dequantize(kk_dtype dtype, const VqArgs& a, int nthreads);                       \
  kk_status vq_fwd(kk_dtype dtype, const VqArgs& a, int nthreads);                              \
  kk_status vq_bwd(kk_dtype dtype, const VqArgs& a, int nthreads);                              \
  kk_status vq_assign(kk_dtype dtype, int64_t n, int64_t K, int d, const void* vectors,         \
                      const void* centroids, int topn, int32_t* idx, void* dist, int nthreads); \
  }
KK_DECLARE_VQ_ISA(isa_base)
#if defined(__x86_64__) || defined(_M_X64)
KK_DECLARE_VQ_ISA(isa_avx2)
KK_DECLARE_VQ_ISA(isa_avx512)
#endif
#undef KK_DECLARE_VQ_ISA

}  // namespace kk
