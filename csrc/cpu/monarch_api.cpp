// C ABI entry points of the CPU Monarch kernels: argument checks, then dispatch to the kernel
// compiled for the best instruction set this CPU has (monarch.cpp, one copy per ISA).
#include <omp.h>

#include <cstring>
#include <new>

#include "isa.h"
#include "monarch_impl.h"
#include "status.h"

namespace kk {
namespace {

#define KK_TRY(expr)                   \
  do {                                 \
    kk_status st_ = (expr);            \
    if (st_ != KK_OK) return st_;      \
  } while (0)


// Checks shared by the CPU and CUDA entry points' contract (see kernelkit.h).
kk_status check_dims(int64_t batch, int64_t k, int64_t q, int64_t p, int64_t l, int64_t s,
                     int64_t r) {
  if (batch < 0) return fail(KK_ERR_INVALID_SIZE, "batch must be >= 0, got %lld", (long long)batch);
  const int64_t dims[6] = {k, q, p, l, s, r};
  const char* names[6] = {"k", "q", "p", "l", "s", "r"};
  for (int i = 0; i < 6; ++i)
    if (dims[i] <= 0)
      return fail(KK_ERR_INVALID_SIZE, "%s must be > 0, got %lld", names[i], (long long)dims[i]);
  if (l * r != k * q)
    return fail(KK_ERR_INVALID_SIZE,
                "w2 blocks must consume the intermediate: l*r (%lld*%lld) != k*q (%lld*%lld)",
                (long long)l, (long long)r, (long long)k, (long long)q);
  return KK_OK;
}

kk_status check_ptr(const void* ptr, const char* name) {
  return ptr ? KK_OK : fail(KK_ERR_NULL_POINTER, "%s is NULL", name);
}

kk_status check_ld(int64_t ld, int64_t width, const char* name) {
  return ld >= width ? KK_OK
                     : fail(KK_ERR_INVALID_ARGUMENT, "%s (%lld) must be >= the row width %lld",
                            name, (long long)ld, (long long)width);
}

// What the forward and backward entry points check first: dtype, sizes, the weights.
kk_status check_common(kk_dtype dtype, int64_t batch, int64_t k, int64_t q, int64_t p, int64_t l,
                       int64_t s, int64_t r, const void* w1, const void* w2) {
  if (dtype != KK_FLOAT32 && dtype != KK_FLOAT64)
    return fail(KK_ERR_UNSUPPORTED_DTYPE, "monarch cpu: dtype %d unsupported (float32, float64)",
                (int)dtype);
  KK_TRY(check_dims(batch, k, q, p, l, s, r));
  KK_TRY(check_ptr(w1, "w1"));
  return check_ptr(w2, "w2");
}

int threads(int32_t requested) { return requested > 0 ? requested : omp_get_max_threads(); }

template <typename Fn>
kk_status run_isa(Fn&& fn) {
  try {
    return fn(active_isa());
  } catch (const std::bad_alloc&) {
    return fail(KK_ERR_OUT_OF_MEMORY, "monarch: out of host memory for packed weights/tiles");
  } catch (...) {
    return fail(KK_ERR_INTERNAL, "monarch: unexpected C++ exception");
  }
}

#if defined(__x86_64__) || defined(_M_X64)
#define KK_DISPATCH(isa, fn, ...)                                        \
  ((isa) == Isa::avx512 ? isa_avx512::fn(__VA_ARGS__)                    \
   : (isa) == Isa::avx2 ? isa_avx2::fn(__VA_ARGS__) : isa_base::fn(__VA_ARGS__))
#else
#define KK_DISPATCH(isa, fn, ...) isa_base::fn(__VA_ARGS__)
#endif

}  // namespace
}  // namespace kk

using namespace kk;

extern "C" {

KK_API kk_status kk_monarch_fwd_cpu(kk_dtype dtype, int64_t batch, int64_t k, int64_t q, int64_t p,
                                    int64_t l, int64_t s, int64_t r, const void* x, int64_t ldx,
                                    const void* w1, const void* w2, void* out, int64_t ldo,
                                    int32_t num_threads) {
  clear_error();
  KK_TRY(check_common(dtype, batch, k, q, p, l, s, r, w1, w2));
  if (batch == 0) return KK_OK;
  KK_TRY(check_ptr(x, "x"));
  KK_TRY(check_ptr(out, "out"));
  KK_TRY(check_ld(ldx, k * p, "ldx"));
  KK_TRY(check_ld(ldo, l * s, "ldo"));
  MonarchArgs a{batch, k, q, p, l, s, r, x, ldx, w1, w2, out, ldo,
                nullptr, 0, nullptr, 0, nullptr, nullptr};
  const int nt = threads(num_threads);
  return run_isa([&](Isa isa) { return KK_DISPATCH(isa, monarch_fwd, dtype, a, nt); });
}

KK_API kk_status kk_monarch_bwd_cpu(kk_dtype dtype, int64_t batch, int64_t k, int64_t q, int64_t p,
                                    int64_t l, int64_t s, int64_t r, const void* x, int64_t ldx,
                                    const void* w1, const void* w2, const void* dout, int64_t lddo,
                                    void* dx, int64_t lddx, void* dw1, void* dw2,
                                    int32_t num_threads) {
  clear_error();
  KK_TRY(check_common(dtype, batch, k, q, p, l, s, r, w1, w2));
  if (!dx && !dw1 && !dw2) return KK_OK;  // nothing requested
  const size_t esize = dtype == KK_FLOAT32 ? sizeof(float) : sizeof(double);
  if (batch == 0) {  // empty batch: the weight gradients are zero
    if (dw1) std::memset(dw1, 0, static_cast<size_t>(k * q * p) * esize);
    if (dw2) std::memset(dw2, 0, static_cast<size_t>(l * s * r) * esize);
    return KK_OK;
  }
  KK_TRY(check_ptr(x, "x"));
  KK_TRY(check_ptr(dout, "dout"));
  KK_TRY(check_ld(ldx, k * p, "ldx"));
  KK_TRY(check_ld(lddo, l * s, "lddo"));
  if (dx) KK_TRY(check_ld(lddx, k * p, "lddx"));
  MonarchArgs a{batch, k, q, p, l, s, r, x, ldx, w1, w2, nullptr, 0,
                dout, lddo, dx, lddx, dw1, dw2};
  const int nt = threads(num_threads);
  return run_isa([&](Isa isa) { return KK_DISPATCH(isa, monarch_bwd, dtype, a, nt); });
}

}  // extern "C"
