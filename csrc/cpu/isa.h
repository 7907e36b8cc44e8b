// Internal: run-time choice among the ISA variants the CPU kernels are compiled for.
#pragma once

namespace kk {
enum class Isa { base = 0, avx2 = 1, avx512 = 2 };
// The best ISA this CPU supports, capped by the environment variable KERNELKIT_CPU_ISA
// (base | avx2 | avx512), which tests use to exercise every compiled variant.
Isa active_isa();
const char* isa_name(Isa isa);
}  // namespace kk
