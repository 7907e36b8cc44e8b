// The registry of csrc/jax/*.cpp's XLA FFI handlers as plain C exports (no Python headers, no
// libtorch): libkernelkit_jax.so (CPU handlers, links libkernelkit) and libkernelkit_jax_cuda.so
// (KK_JAX_CUDA=1, links libkernelkit_cuda).  python/kernelkit/jax/_common.py opens them with ctypes
// and registers each handler with jax.ffi.register_ffi_target under its target name.
#include "common.h"

extern "C" {
KK_API int32_t kk_jax_target_count(void) { return static_cast<int32_t>(kkjax::registry().size()); }
KK_API const char* kk_jax_target_name(int32_t i) {
  return i >= 0 && i < kk_jax_target_count() ? kkjax::registry()[i].first.c_str() : nullptr;
}
KK_API void* kk_jax_target_handler(int32_t i) {
  return i >= 0 && i < kk_jax_target_count() ? kkjax::registry()[i].second : nullptr;
}
KK_API const char* kk_jax_platform(void) { return kkjax::kPlatform; }
}
