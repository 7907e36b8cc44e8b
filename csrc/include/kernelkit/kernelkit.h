/*
 * kernelkit public C ABI.
 *
 * Plain C: raw pointers, int64_t sizes, a dtype enum, status codes.  Nothing here depends on
 * libtorch, so one build of libkernelkit (CPU) and libkernelkit_cuda (CUDA) serves every torch
 * version and any other caller (numpy via ctypes, JAX custom calls, C/C++ programs).
 *
 * Conventions
 *  - Every entry point returns a kk_status.  On failure a human-readable message naming the bad
 *    argument is stored in a thread-local buffer, read with kk_last_error().
 *  - Names are kk_<family>_<op>_<fwd|bwd>_<cpu|cuda>; the element type is a kk_dtype argument.
 *  - Matrices are row-major.  A "row stride" is the distance, in elements, between the starts of
 *    two consecutive rows; the innermost dimension is always contiguous.
 *  - CUDA entry points take the caller's stream as a void* (cudaStream_t); pointers are device
 *    pointers.  They never synchronise the stream.
 *  - kk_abi_version() changes only on an incompatible change of this header.
 */
#ifndef KERNELKIT_KERNELKIT_H_
#define KERNELKIT_KERNELKIT_H_

#include <stdint.h>

#if defined(_WIN32)
#define KK_API __declspec(dllexport)
#else
#define KK_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define KK_ABI_VERSION 1

/* In C++ the enums get a fixed underlying type (int), so any integer a C caller passes is a
 * valid value that the library can reject with a status, rather than undefined behaviour. */
#ifdef __cplusplus
#define KK_ENUM(name) enum name : int
#else
#define KK_ENUM(name) enum name
#endif

typedef KK_ENUM(kk_status) {
  KK_OK = 0,
  KK_ERR_NULL_POINTER = 1,     /* a required pointer was NULL */
  KK_ERR_INVALID_SIZE = 2,     /* a size was negative, zero where it must not be, or inconsistent */
  KK_ERR_INVALID_ARGUMENT = 3, /* any other bad argument (stride, thread count, ...) */
  KK_ERR_UNSUPPORTED_DTYPE = 4,/* the dtype is not implemented by this backend */
  KK_ERR_OUT_OF_MEMORY = 5,    /* a host or device allocation failed */
  KK_ERR_CUDA = 6,             /* a CUDA runtime call or kernel launch failed */
  KK_ERR_INTERNAL = 7          /* a bug: please report it with kk_last_error() */
} kk_status;

typedef KK_ENUM(kk_dtype) {
  KK_FLOAT32 = 0,
  KK_FLOAT64 = 1,
  KK_FLOAT16 = 2,
  KK_BFLOAT16 = 3
} kk_dtype;

/* ---- library information (both libraries export these) ------------------------------------ */
KK_API int32_t kk_abi_version(void);
KK_API const char* kk_version(void);
/* Message of the last failed call on this thread ("" if none).  Valid until the next call. */
KK_API const char* kk_last_error(void);
KK_API const char* kk_status_string(kk_status status);
/* CPU library only: the instruction set its kernels run with ("avx512", "avx2" or "base"); the
 * environment variable KERNELKIT_CPU_ISA caps it. */
KK_API const char* kk_cpu_isa(void);

/* ---- monarch: generalized Monarch product (HazyResearch/fly layout) -----------------------
 *
 *   x   (batch, k*p)     row stride ldx   >= k*p
 *   w1  (k, q, p)        contiguous       block a maps input slice a (p wide) to q outputs
 *   w2  (l, s, r)        contiguous       requires l*r == k*q
 *   out (batch, l*s)     row stride ldo   >= l*s
 *
 *   t[b, a*q + i]      = sum_j w1[a, i, j] * x[b, a*p + j]          (block-diagonal B1)
 *   h[b, c, m]         = t[b, m*l + c]                               (permutation P1)
 *   out[b, n*l + c]    = sum_m w2[c, n, m] * h[b, c, m]              (B2, then permutation P2)
 *
 * The intermediate t/h never goes to memory outside a per-thread tile.
 * Backward computes any subset of dx (batch, k*p; row stride lddx), dw1 (k,q,p) and dw2 (l,s,r);
 * pass NULL for a gradient that is not wanted.  dw1/dw2 are overwritten, not accumulated.
 * CPU dtypes: KK_FLOAT32, KK_FLOAT64.  num_threads <= 0 uses the OpenMP default.
 */
KK_API kk_status kk_monarch_fwd_cpu(kk_dtype dtype, int64_t batch, int64_t k, int64_t q, int64_t p,
                                    int64_t l, int64_t s, int64_t r, const void* x, int64_t ldx,
                                    const void* w1, const void* w2, void* out, int64_t ldo,
                                    int32_t num_threads);

KK_API kk_status kk_monarch_bwd_cpu(kk_dtype dtype, int64_t batch, int64_t k, int64_t q, int64_t p,
                                    int64_t l, int64_t s, int64_t r, const void* x, int64_t ldx,
                                    const void* w1, const void* w2, const void* dout, int64_t lddo,
                                    void* dx, int64_t lddx, void* dw1, void* dw2,
                                    int32_t num_threads);

/* CUDA versions (libkernelkit_cuda).  dtypes: KK_FLOAT32, KK_FLOAT16, KK_BFLOAT16, accumulation
 * in float32.  The backward needs a device workspace of kk_monarch_bwd_cuda_workspace_size()
 * bytes (may be 0, then workspace may be NULL), 16-byte aligned (cudaMalloc/torch allocations are);
 * the caller owns it. */
KK_API kk_status kk_monarch_fwd_cuda(kk_dtype dtype, int64_t batch, int64_t k, int64_t q, int64_t p,
                                     int64_t l, int64_t s, int64_t r, const void* x, int64_t ldx,
                                     const void* w1, const void* w2, void* out, int64_t ldo,
                                     void* stream);

KK_API kk_status kk_monarch_bwd_cuda_workspace_size(kk_dtype dtype, int64_t batch, int64_t k,
                                                    int64_t q, int64_t p, int64_t l, int64_t s,
                                                    int64_t r, int64_t* bytes);

KK_API kk_status kk_monarch_bwd_cuda(kk_dtype dtype, int64_t batch, int64_t k, int64_t q, int64_t p,
                                     int64_t l, int64_t s, int64_t r, const void* x, int64_t ldx,
                                     const void* w1, const void* w2, const void* dout, int64_t lddo,
                                     void* dx, int64_t lddx, void* dw1, void* dw2,
                                     void* workspace, int64_t workspace_bytes, void* stream);

#ifdef __cplusplus
}
#endif

/* ---- the other families, one header each ---------------------------------------------------- */
#include "kernelkit/sparse.h"
#include "kernelkit/vq.h"
#include "kernelkit/ot.h"
#include "kernelkit/mfac.h"
#include "kernelkit/rbf.h"

#endif /* KERNELKIT_KERNELKIT_H_ */
