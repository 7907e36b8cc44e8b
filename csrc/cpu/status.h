// Internal: error reporting shared by the CPU and CUDA libraries (not part of the public ABI).
#pragma once
#include "kernelkit/kernelkit.h"

namespace kk {
// Formats the message into this thread's last-error buffer and returns `code`.
kk_status fail(kk_status code, const char* fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void clear_error();
}  // namespace kk
