// Status codes, the thread-local last-error message and version queries.  Compiled into both
// libkernelkit and libkernelkit_cuda, so each library answers for its own calls.
#include "status.h"

#include <cstdarg>
#include <cstdio>

#ifndef KERNELKIT_VERSION
#define KERNELKIT_VERSION "0.0.0"
#endif

namespace {
thread_local char g_last_error[1024] = "";
}

namespace kk {
kk_status fail(kk_status code, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(g_last_error, sizeof(g_last_error), fmt, args);
  va_end(args);
  return code;
}
void clear_error() { g_last_error[0] = '\0'; }
}  // namespace kk

extern "C" {
KK_API int32_t kk_abi_version(void) { return KK_ABI_VERSION; }
KK_API const char* kk_version(void) { return KERNELKIT_VERSION; }
KK_API const char* kk_last_error(void) { return g_last_error; }
KK_API const char* kk_status_string(kk_status status) {
  switch (status) {
    case KK_OK: return "ok";
    case KK_ERR_NULL_POINTER: return "null pointer";
    case KK_ERR_INVALID_SIZE: return "invalid size";
    case KK_ERR_INVALID_ARGUMENT: return "invalid argument";
    case KK_ERR_UNSUPPORTED_DTYPE: return "unsupported dtype";
    case KK_ERR_OUT_OF_MEMORY: return "out of memory";
    case KK_ERR_CUDA: return "CUDA error";
    case KK_ERR_INTERNAL: return "internal error";
  }
  return "unknown status";
}
}
