// kk::ptx: the tensor-core and asynchronous-copy instructions of sm_80 / sm_90, one wrapper each.
//
// Kernels call these wrappers and never write these instructions as inline asm themselves: with
// nvcc each wrapper is exactly the PTX instruction named below; under the CUDA host emulation
// (tests/cuda_emu, KK_CUDA_EMU defined) it calls the emulator, which moves every element by the
// PTX ISA's fragment layouts and checks the instruction's rules, so a kernel's layout or
// synchronisation bug fails its tests on a machine without a GPU.  Raw asm cannot run there.
// Section names below are those of the PTX ISA (docs.nvidia.com/cuda/parallel-thread-execution).
//
// ---- warp-wide matrix multiply-accumulate (mma.sync.aligned) ------------------------------------
// Every lane of the warp must call the same wrapper at the same point (.sync.aligned); a lane that
// exited or took another branch is undefined behaviour on the device and an error in the emulation.
//   mma_m16n8k16_bf16(d, a, b, c)  D = A*B + C, A 16x16 bf16, B 16x8 bf16, C and D 16x8 float:
//                                  mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32
//   mma_m16n8k16_f16(d, a, b, c)   the same with f16 A and B: ...m16n8k16.row.col.f32.f16.f16.f32
//   mma_m16n8k8_tf32(d, a, b, c)   D = A*B + C, A 16x8 tf32, B 8x8 tf32, C and D 16x8 float:
//                                  mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32
// Fragments: each lane holds some elements of each matrix, by its group g = lane >> 2 and its
// index in the group t = lane % 4 ("Matrix Fragments for mma.m16n8k16 with floating point type",
// "Matrix Fragments for mma.m16n8k8"):
//   m16n8k16 A: elements a0..a7, two per register, low half first (a[0] = a0 | a1 << 16, ...);
//               a_i is A[g + 8*((i>>1)&1)][2t + (i&1) + 8*(i>>2)]
//            B: b0..b3 likewise packed in b[0], b[1]; b_i is B[2t + (i&1) + 8*(i>>1)][g] (B[k][n])
//   m16n8k8 tf32 A: a[i] is A[g + 8*(i&1)][t + 4*(i>>1)];  B: b[i] is B[t + 4i][g]
//   C and D (both shapes): c[i] is C[g + 8*(i>>1)][2t + (i&1)]
// A tf32 operand is a float's bit pattern.  The ISA ("Alternate Floating-Point Data Formats") only
// says tf32 has float's range and at least 10 mantissa bits and that its layout is implementation
// defined, with cvt.rna.tf32.f32 to convert.  The sm_80 / sm_90 tensor cores are known to use the
// top 19 bits of the register (sign, exponent, 10 mantissa bits) and ignore the low 13, i.e. to
// truncate a plain float (hardware behaviour, not an ISA guarantee).  The emulation truncates too
// (keeping a NaN a NaN); a kernel that needs round-to-nearest must convert its operands itself.
// Accumulation is in float; the ISA leaves its order and rounding unspecified (see the
// "Precision and rounding" paragraph of mma and tests/cuda_emu/kkemu_ptx.cpp), so compare results
// with a tolerance, not bit for bit.
//
// ---- warp-wide shared-memory matrix load (ldmatrix.sync.aligned.m8n8.shared.b16) ----------------
//   ldmatrix_x1 / _x2 / _x4(r, row)        ldmatrix.sync.aligned.m8n8.x{1,2,4}.shared.b16
//   ldmatrix_x1_trans / _x2_trans / _x4_trans(r, row)    the same with .trans
// Loads 1, 2 or 4 8x8 matrices of 16-bit elements from shared memory; all 32 lanes call it (as for
// mma).  Lanes 8i .. 8i+7 give in `row` the addresses of rows 0..7 of matrix i (16 bytes each,
// 16-byte aligned, anywhere in shared memory); the other lanes' addresses are ignored.  r[i] of
// lane l receives row l/4, columns 2(l%4) and 2(l%4)+1 of matrix i (low half first), the shape of
// an mma fragment: x4 gives an m16n8k16 A fragment, x2 a B fragment.  With .trans each matrix is
// read transposed: r[i] of lane l receives rows 2(l%4) and 2(l%4)+1 of column l/4 (so x2.trans of
// a row-major [k][n] B gives its B fragment).
//
// ---- asynchronous copies, global -> shared (per thread) ---------------------------------------
//   cp_async_4 / _8(dst, src)   cp.async.ca.shared.global [dst], [src], 4 / 8
//   cp_async_16(dst, src)       cp.async.cg.shared.global [dst], [src], 16 (.cg: not cached in L1;
//                               only 16 bytes may use .cg; the cache operator is only a hint)
//   cp_async_commit()           cp.async.commit_group: this thread's copies since the last commit
//                               become one group (possibly empty)
//   cp_async_wait<N>()          cp.async.wait_group N: waits until at most the N most recently
//                               committed groups are pending; copies not yet committed are not
//                               waited for
//   cp_async_wait_all()         cp.async.wait_all (= commit_group, then wait_group 0)
// dst must be in shared memory, src in global memory, both aligned to the copy's size.  The data
// is in dst only once a wait has completed its group, and then only for the issuing thread: other
// threads see it after a __syncthreads that follows that wait.  Until then dst must not be read
// and src not modified (undefined; the emulation shows the old contents of dst, and reports a
// source that changed).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kk {
namespace ptx {

#if !defined(KK_CUDA_EMU)

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                  const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

// The "memory" clobbers keep the compiler from moving ordinary shared-memory accesses of this
// thread across the loads and the waits (the asm does not tell it which bytes it touches).
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr(row)) : "memory");
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0])
               : "r"(smem_addr(row))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row))
               : "memory");
}

__device__ __forceinline__ void cp_async_4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(dst)),
               "l"(__cvta_generic_to_global(src))
               : "memory");
}
__device__ __forceinline__ void cp_async_8(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(smem_addr(dst)),
               "l"(__cvta_generic_to_global(src))
               : "memory");
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)),
               "l"(__cvta_generic_to_global(src))
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  static_assert(N >= 0, "cp.async.wait_group takes a count of groups >= 0");
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

#else  // KK_CUDA_EMU: the emulator (tests/cuda_emu/kkemu_ptx.cpp).  The defaulted file and line
       // arguments are the caller's (GCC evaluates __builtin_FILE/LINE at the call site), so a
       // fault names the kernel's line and lanes at different calls are told apart.

__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                  const float (&c)[4], const char* file = __builtin_FILE(),
                                                  int line = __builtin_LINE()) {
  ::kkemu::mma_sync(::kkemu::kMmaBf16, d, a, b, c, file, line);
}
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 const float (&c)[4], const char* file = __builtin_FILE(),
                                                 int line = __builtin_LINE()) {
  ::kkemu::mma_sync(::kkemu::kMmaF16, d, a, b, c, file, line);
}
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 const float (&c)[4], const char* file = __builtin_FILE(),
                                                 int line = __builtin_LINE()) {
  ::kkemu::mma_sync(::kkemu::kMmaTf32, d, a, b, c, file, line);
}

#define KK_PTX_EMU_LDMATRIX(NAME, N, TRANS)                                                              \
  __device__ __forceinline__ void NAME(uint32_t (&r)[N], const void* row, const char* file = __builtin_FILE(), \
                                       int line = __builtin_LINE()) {                                   \
    ::kkemu::ldmatrix_sync(N, TRANS, r, row, file, line);                                              \
  }
KK_PTX_EMU_LDMATRIX(ldmatrix_x1, 1, false)
KK_PTX_EMU_LDMATRIX(ldmatrix_x2, 2, false)
KK_PTX_EMU_LDMATRIX(ldmatrix_x4, 4, false)
KK_PTX_EMU_LDMATRIX(ldmatrix_x1_trans, 1, true)
KK_PTX_EMU_LDMATRIX(ldmatrix_x2_trans, 2, true)
KK_PTX_EMU_LDMATRIX(ldmatrix_x4_trans, 4, true)
#undef KK_PTX_EMU_LDMATRIX

__device__ __forceinline__ void cp_async_4(void* dst, const void* src, const char* file = __builtin_FILE(),
                                           int line = __builtin_LINE()) {
  ::kkemu::cp_async(dst, src, 4, file, line);
}
__device__ __forceinline__ void cp_async_8(void* dst, const void* src, const char* file = __builtin_FILE(),
                                           int line = __builtin_LINE()) {
  ::kkemu::cp_async(dst, src, 8, file, line);
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, const char* file = __builtin_FILE(),
                                            int line = __builtin_LINE()) {
  ::kkemu::cp_async(dst, src, 16, file, line);
}
__device__ __forceinline__ void cp_async_commit() { ::kkemu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  static_assert(N >= 0, "cp.async.wait_group takes a count of groups >= 0");
  ::kkemu::cp_async_wait(N);
}
__device__ __forceinline__ void cp_async_wait_all() {
  ::kkemu::cp_async_commit();
  ::kkemu::cp_async_wait(0);
}

#endif

}  // namespace ptx
}  // namespace kk
