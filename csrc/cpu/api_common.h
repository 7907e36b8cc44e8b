// Internal: what the C entry points of the CPU families share (argument checks, the exception guard,
// the ISA dispatch).  Included by <family>_api.cpp after isa.h and status.h; not part of the ABI.
#pragma once
#include <cstdint>
#include <new>

#include "isa.h"
#include "status.h"

#define KK_TRY(expr)              \
  do {                            \
    kk_status st_ = (expr);       \
    if (st_ != KK_OK) return st_; \
  } while (0)

#if defined(__x86_64__) || defined(_M_X64)
#define KK_DISPATCH(isa, fn, ...)                                        \
  ((isa) == Isa::avx512 ? isa_avx512::fn(__VA_ARGS__)                    \
   : (isa) == Isa::avx2 ? isa_avx2::fn(__VA_ARGS__) : isa_base::fn(__VA_ARGS__))
#else
#define KK_DISPATCH(isa, fn, ...) isa_base::fn(__VA_ARGS__)
#endif

namespace kk {

inline kk_status check_size(int64_t v, const char* name) {
  return v >= 0 ? KK_OK : fail(KK_ERR_INVALID_SIZE, "%s must be >= 0, got %lld", name, (long long)v);
}

inline kk_status check_ptr(const void* ptr, const char* name) {
  return ptr ? KK_OK : fail(KK_ERR_NULL_POINTER, "%s is NULL", name);
}

inline kk_status check_ld(int64_t ld, int64_t width, const char* name, const char* width_name) {
  return ld >= width ? KK_OK
                     : fail(KK_ERR_INVALID_ARGUMENT, "%s (%lld) must be >= the row width %s = %lld",
                            name, (long long)ld, width_name, (long long)width);
}

// fn() with a C++ exception turned into a status: bad_alloc -> KK_ERR_OUT_OF_MEMORY with `oom_message`,
// anything else -> KK_ERR_INTERNAL naming the family.
template <typename Fn>
kk_status run_guarded(const char* family, const char* oom_message, Fn&& fn) {
  try {
    return fn();
  } catch (const std::bad_alloc&) {
    return fail(KK_ERR_OUT_OF_MEMORY, "%s: %s", family, oom_message);
  } catch (...) {
    return fail(KK_ERR_INTERNAL, "%s: unexpected C++ exception", family);
  }
}

}  // namespace kk
