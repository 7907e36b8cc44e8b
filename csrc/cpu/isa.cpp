// Run-time ISA selection for the CPU kernels (see isa.h).
#include "isa.h"

#include <cstdlib>
#include <cstring>

#include "kernelkit/kernelkit.h"

namespace kk {
namespace {
Isa detect() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::base;
}
}  // namespace

Isa active_isa() {
  static const Isa best = detect();
  const char* env = std::getenv("KERNELKIT_CPU_ISA");
  Isa want = best;
  if (env && std::strcmp(env, "base") == 0) want = Isa::base;
  else if (env && std::strcmp(env, "avx2") == 0) want = Isa::avx2;
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "base";
  }
}
}  // namespace kk

extern "C" KK_API const char* kk_cpu_isa(void) { return kk::isa_name(kk::active_isa()); }
