// Internal: the host-side argument and status helpers of the CUDA entry points (kk_<family>_*_cuda),
// shared by the .cu files that include it (ot.cu, mfac.cu).  Not part of the ABI.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../cpu/status.h"

#define KK_TRY(...)                      \
  do {                                   \
    const kk_status st_ = (__VA_ARGS__); \
    if (st_ != KK_OK) return st_;        \
  } while (0)

namespace kk {

// The largest size any single dimension may have (the kernels' 64-bit products stay far from overflow).
constexpr int64_t kSizeLimit = int64_t(1) << 40;

// KK_ERR_CUDA naming `fn` when the last kernel launch failed.
inline kk_status check_launch(const char* fn) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return fail(KK_ERR_CUDA, "%s: kernel launch failed: %s", fn, cudaGetErrorString(err));
  return KK_OK;
}

// KK_ERR_CUDA naming `fn` and `what` when a CUDA runtime call failed.
inline kk_status cuda_call(const char* fn, cudaError_t err, const char* what) {
  if (err != cudaSuccess) return fail(KK_ERR_CUDA, "%s: %s failed: %s", fn, what, cudaGetErrorString(err));
  return KK_OK;
}

inline kk_status need_ptr(const char* fn, const void* p, const char* name) {
  return p != nullptr ? KK_OK : fail(KK_ERR_NULL_POINTER, "%s: %s is NULL", fn, name);
}

}  // namespace kk
