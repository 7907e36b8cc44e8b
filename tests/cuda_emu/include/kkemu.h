// kkemu: a host emulation of the CUDA execution model, for testing kernelkit's CUDA kernels on a
// machine without a GPU.  Test tool only: the product library is built by nvcc.
//
// A .cu file is compiled as host C++ with this directory first on the include path, so
// <cuda_runtime.h>, <cuda_fp16.h> and <cuda_bf16.h> resolve to the emulation's headers.  Kernel
// bodies are unchanged; launches go through kk::launch (csrc/cuda/common.cuh) instead of <<<>>>.
//
// What is modelled (the places GPU bugs live):
//  - every thread of a block runs as its own fiber; blocks run one after another;
//  - __syncthreads() is a real barrier of the block; a barrier that some threads never reach (they
//    exited, wait at another barrier, or wait in a warp collective) is reported as an error
//    instead of hanging;
//  - static __shared__ arrays and dynamic shared memory are per block and NaN-poisoned (all bytes
//    0xFF) at the start of every block, so a read before the write that should precede it yields
//    NaN;
//  - warp intrinsics (__shfl*_sync, __ballot_sync, __any_sync, __all_sync, __syncwarp) exchange
//    within groups of 32 lanes, honour the mask, and report a lane of the mask that never arrives;
//  - atomics are atomic; __half / __nv_bfloat16 convert with round-to-nearest-even;
//  - launches are checked against the card's limits (threads per block, block and grid
//    dimensions, static + dynamic shared memory with and without the opt-in attribute);
//  - the tensor-core and asynchronous-copy instructions of csrc/cuda/ptx.cuh (mma, ldmatrix,
//    cp.async; kkemu_ptx.cpp) move data by the PTX ISA's exact fragment layouts, need all 32 lanes
//    of the warp for mma and ldmatrix, fault on misaligned or non-shared addresses, and land a
//    cp.async in shared memory only at the wait_group that completes it, so reading it earlier
//    yields the poisoned old contents.
// Fiber order between barriers is forward, reverse or shuffled (kkemu_set_schedule), so both
// read-after-write and write-after-read hazards of a missing barrier show up.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

// ---- CUDA keywords ------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __constant__
// A static __shared__ array is a function-local static: blocks run one at a time, so one instance
// is per-block memory.  The runtime finds a kernel's arrays in the library's symbol table (their
// names are "<kernel>::<array>") and poisons them at every block start.  An array declared in a
// device helper rather than in the kernel itself is not found, hence not poisoned: declare shared
// arrays in the kernel.  Dynamic shared memory: kk::dynamic_smem (csrc/cuda/common.cuh).
#define __shared__ static __attribute__((used))
#define __CUDA_ARCH__ 900
#define KKEMU_EXPORT __attribute__((visibility("default")))

// ---- vector types -----------------------------------------------------------------------------
#define KKEMU_VEC2(T, N, A) \
  struct __attribute__((aligned(A))) N { T x, y; };                                    \
  inline N make_##N(T x, T y) { return N{x, y}; }
#define KKEMU_VEC4(T, N, A) \
  struct __attribute__((aligned(A))) N { T x, y, z, w; };                              \
  inline N make_##N(T x, T y, T z, T w) { return N{x, y, z, w}; }
KKEMU_VEC2(float, float2, 8)
KKEMU_VEC4(float, float4, 16)
KKEMU_VEC2(double, double2, 16)
KKEMU_VEC2(int, int2, 8)
KKEMU_VEC4(int, int4, 16)
KKEMU_VEC2(unsigned, uint2, 8)
KKEMU_VEC4(unsigned, uint4, 16)
KKEMU_VEC2(short, short2, 4)
KKEMU_VEC4(short, short4, 8)
KKEMU_VEC2(unsigned short, ushort2, 4)
KKEMU_VEC4(unsigned short, ushort4, 8)
KKEMU_VEC4(signed char, char4, 4)
KKEMU_VEC4(unsigned char, uchar4, 4)
KKEMU_VEC2(long long, longlong2, 16)
KKEMU_VEC2(unsigned long long, ulonglong2, 16)
#undef KKEMU_VEC2
#undef KKEMU_VEC4

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

// ---- runtime types ----------------------------------------------------------------------------
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorNoDevice = 100,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
  cudaErrorUnknown = 999,
};
typedef cudaError_t cudaError;

enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxBlockDimX = 2,
  cudaDevAttrMaxBlockDimY = 3,
  cudaDevAttrMaxBlockDimZ = 4,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxGridDimZ = 7,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMaxRegistersPerBlock = 12,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrL2CacheSize = 38,
  cudaDevAttrMaxThreadsPerMultiProcessor = 39,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxRegistersPerMultiprocessor = 82,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrMaxBlocksPerMultiprocessor = 106,
  cudaDevAttrReservedSharedMemoryPerBlock = 111,
};

enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};

enum cudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

struct cudaDeviceProp {
  char name[256];
  int major, minor;
  int multiProcessorCount;
  size_t sharedMemPerBlock, sharedMemPerBlockOptin, sharedMemPerMultiprocessor, reservedSharedMemPerBlock;
  int maxThreadsPerBlock, maxThreadsPerMultiProcessor, warpSize, regsPerBlock, regsPerMultiprocessor;
  int maxThreadsDim[3], maxGridSize[3];
  int l2CacheSize;
};

constexpr int warpSize = 32;

// ---- the emulator core ------------------------------------------------------------------------
namespace kkemu {

struct BlockState {
  uint3 block_idx;
  dim3 block_dim, grid_dim;
  void* dyn_smem;
};

// Set by the scheduler each time it switches to a fiber.
extern thread_local uint3 t_tid;          // threadIdx of the running emulated thread
extern thread_local BlockState* t_block;  // its block

using Body = std::function<void()>;
KKEMU_EXPORT void launch_impl(const void* kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                              const Body& body);

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
            const Args&... args) {
  launch_impl(reinterpret_cast<const void*>(kernel), grid, block, smem, stream,
              [&]() { kernel(args...); });
}

KKEMU_EXPORT void* dynamic_smem();
KKEMU_EXPORT void syncthreads(const char* file, int line);
KKEMU_EXPORT int syncthreads_count(int pred, const char* file, int line);

// Warp collectives.  kind: see kkemu.cpp; value: the lane's operand as raw bits.
// kMma and kLdmatrix are the .sync.aligned matrix instructions (kkemu_ptx.cpp): value points to the
// lane's operands, arg encodes the instruction's qualifiers.
enum WarpOp : int { kShfl, kShflUp, kShflDown, kShflXor, kBallot, kSyncwarp, kMatchAny, kMma, kLdmatrix };
KKEMU_EXPORT uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width,
                                      const char* file, int line);
KKEMU_EXPORT unsigned lane_id();
KKEMU_EXPORT unsigned active_mask();
// A kernel-side error (e.g. __trap): fails the launch with `what`.
[[noreturn]] KKEMU_EXPORT void kernel_fault(const char* what, const char* file, int line);

// The PTX instructions behind kk::ptx (csrc/cuda/ptx.cuh), emulated in kkemu_ptx.cpp.  mma_sync and
// ldmatrix_sync are warp collectives; file and line are the calling kernel's.
enum MmaType : int { kMmaBf16, kMmaF16, kMmaTf32 };
KKEMU_EXPORT void mma_sync(MmaType type, float* d, const uint32_t* a, const uint32_t* b, const float* c,
                           const char* file, int line);
KKEMU_EXPORT void ldmatrix_sync(int num, bool trans, uint32_t* r, const void* row, const char* file, int line);
KKEMU_EXPORT void cp_async(void* dst, const void* src, int bytes, const char* file, int line);
KKEMU_EXPORT void cp_async_commit();
KKEMU_EXPORT void cp_async_wait(int pending);

template <typename T>
uint64_t to_bits(const T& v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle operand");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace kkemu

#define threadIdx (::kkemu::t_tid)
#define blockIdx (::kkemu::t_block->block_idx)
#define blockDim (::kkemu::t_block->block_dim)
#define gridDim (::kkemu::t_block->grid_dim)
#define __syncthreads() ::kkemu::syncthreads(__FILE__, __LINE__)
#define __syncthreads_count(p) ::kkemu::syncthreads_count((p) ? 1 : 0, __FILE__, __LINE__)
#define __syncthreads_or(p) (::kkemu::syncthreads_count((p) ? 1 : 0, __FILE__, __LINE__) != 0)
#define __syncthreads_and(p) \
  (::kkemu::syncthreads_count((p) ? 0 : 1, __FILE__, __LINE__) == 0)
#define __syncwarp(...) \
  ((void)::kkemu::warp_collective(::kkemu::kSyncwarp, ::kkemu::syncwarp_mask(__VA_ARGS__), 0, 0, 32, __FILE__, __LINE__))
#define __trap() ::kkemu::kernel_fault("__trap()", __FILE__, __LINE__)
#define __shfl_sync(mask, v, ...) ::kkemu::shfl(::kkemu::kShfl, mask, v, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(mask, v, ...) ::kkemu::shfl(::kkemu::kShflUp, mask, v, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(mask, v, ...) ::kkemu::shfl(::kkemu::kShflDown, mask, v, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(mask, v, ...) ::kkemu::shfl(::kkemu::kShflXor, mask, v, __FILE__, __LINE__, __VA_ARGS__)
#define __ballot_sync(mask, p) \
  ((unsigned)::kkemu::warp_collective(::kkemu::kBallot, mask, (p) ? 1 : 0, 0, 32, __FILE__, __LINE__))
#define __any_sync(mask, p) (__ballot_sync(mask, p) != 0u)
#define __all_sync(mask, p) (__ballot_sync(mask, !(p)) == 0u)
#define __match_any_sync(mask, v) \
  ((unsigned)::kkemu::warp_collective(::kkemu::kMatchAny, mask, ::kkemu::to_bits(v), 0, 32, __FILE__, __LINE__))
#define __activemask() (::kkemu::active_mask())

namespace kkemu {
inline unsigned syncwarp_mask() { return 0xffffffffu; }
inline unsigned syncwarp_mask(unsigned m) { return m; }
template <typename T>
T shfl(WarpOp op, unsigned mask, T v, const char* file, int line, int arg, int width = 32) {
  return from_bits<T>(warp_collective(op, mask, to_bits(v), arg, width, file, line));
}
}  // namespace kkemu

// ---- atomics (blocks run one at a time, but a real atomic costs nothing and stays right if that
// ever changes) -----------------------------------------------------------------------------------
template <typename T>
inline typename std::enable_if<std::is_integral<T>::value, T>::type atomicAdd(T* p, T v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
template <typename T>
inline typename std::enable_if<std::is_floating_point<T>::value, T>::type atomicAdd(T* p, T v) {
  T old, nv;
  __atomic_load(p, &old, __ATOMIC_SEQ_CST);
  do {
    nv = old + v;
  } while (!__atomic_compare_exchange(p, &old, &nv, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  return old;
}
template <typename T>
inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
template <typename T>
inline T atomicExch(T* p, T v) {
  T old;
  __atomic_exchange(p, &v, &old, __ATOMIC_SEQ_CST);
  return old;
}
template <typename T>
inline T atomicCAS(T* p, T cmp, T v) {
  __atomic_compare_exchange(p, &cmp, &v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return cmp;  // the old value either way
}
template <typename T>
inline T atomicMax(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (old < v && !__atomic_compare_exchange(p, &old, &v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (v < old && !__atomic_compare_exchange(p, &old, &v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
template <typename T>
inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }
template <typename T>
inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
template <typename T>
inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---- device math and bit functions that host C++ lacks ----------------------------------------
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __saturatef(float x) { return x != x ? 0.f : (x < 0.f ? 0.f : (x > 1.f ? 1.f : x)); }
inline float __int_as_float(int v) { return kkemu::from_bits<float>((uint32_t)v); }
inline int __float_as_int(float v) { return (int)(uint32_t)kkemu::to_bits(v); }
inline unsigned __float_as_uint(float v) { return (uint32_t)kkemu::to_bits(v); }
inline float __uint_as_float(unsigned v) { return kkemu::from_bits<float>(v); }
inline long long __double_as_longlong(double v) { return (long long)kkemu::to_bits(v); }
inline double __longlong_as_double(long long v) { return kkemu::from_bits<double>((uint64_t)v); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz((unsigned)v); }
inline int __clzll(long long v) { return v == 0 ? 64 : __builtin_clzll((unsigned long long)v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __ffsll(long long v) { return __builtin_ffsll(v); }
inline unsigned __brev(unsigned v) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((v >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
inline int __mul24(int a, int b) { return a * b; }
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline long long clock64() {
#if defined(__x86_64__)
  return (long long)__builtin_ia32_rdtsc();
#else
  return 0;
#endif
}
inline void __nanosleep(unsigned) {}
