// Internal helpers shared by the CUDA sources (not part of the public ABI).
//
// Kernels are launched through kk::launch and reach dynamic shared memory through
// kk::dynamic_smem<T>() instead of `<<<...>>>` and `extern __shared__` directly.  With nvcc these
// are exactly those constructs; compiled as host C++ under the CUDA host emulation
// (tests/cuda_emu, KK_CUDA_EMU defined) they run every thread of a block as a fiber, so the same
// kernel bodies are tested on a machine without a GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace kk {

#if defined(KK_CUDA_EMU)

template <typename... KArgs, typename... Args>
inline void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   const Args&... args) {
  ::kkemu::launch(kernel, grid, block, smem, stream, args...);
}

template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  return static_cast<T*>(::kkemu::dynamic_smem());
}

#else

template <typename... KArgs, typename... Args>
inline void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   const Args&... args) {
  kernel<<<grid, block, smem, stream>>>(args...);
}

// One extern array for every kernel of the translation unit; float4 makes it 16-byte aligned.
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ float4 kk_dynamic_smem_[];
  return reinterpret_cast<T*>(kk_dynamic_smem_);
}

#endif

// ---- element conversion (loads widen to float, stores round to nearest) and 64-bit index helpers,
// shared by every family's kernels ------------------------------------------------------------------
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__host__ __device__ __forceinline__ int64_t imin64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t imax64(int64_t a, int64_t b) { return a > b ? a : b; }
__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace kk
