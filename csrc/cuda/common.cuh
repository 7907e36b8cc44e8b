// Internal helpers shared by the CUDA sources (not part of the public ABI).
//
// Kernels are launched through kk::launch and reach dynamic shared memory through
// kk::dynamic_smem<T>() instead of `<<<...>>>` and `extern __shared__` directly.  With nvcc these
// are exactly those constructs; compiled as host C++ under the CUDA host emulation
// (tests/cuda_emu, KK_CUDA_EMU defined) they run every thread of a block as a fiber, so the same
// kernel bodies are tested on a machine without a GPU.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

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

}  // namespace kk
