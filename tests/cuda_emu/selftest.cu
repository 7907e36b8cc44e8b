// Kernels that check the emulator itself (tests/test_cuda_emu.py): warp intrinsics, barriers,
// shared-memory poisoning, atomics, conversions, launch limits, and the misuses it must report.
// Compiled into the emulation library only (never by nvcc); entry points return the launch's
// cudaError_t and leave its message in kkemu_selftest_error().
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdio>

#include "common.cuh"

namespace {

char g_msg[2048];

int finish() {
  const cudaError_t e = cudaGetLastError();
  std::snprintf(g_msg, sizeof(g_msg), "%s", e == cudaSuccess ? "" : cudaGetErrorString(e));
  return (int)e;
}

// out[t] = the shuffle of v = 10 * t + 1 by every lane in `mask` (others write -1).
__global__ void shfl_kernel(int* out, int mode, int arg, int width, unsigned mask) {
  const int t = threadIdx.x;
  const int v = 10 * t + 1;
  int r = -1;
  if (mask >> (t % 32) & 1u) {
    switch (mode) {
      case 0: r = __shfl_sync(mask, v, arg, width); break;
      case 1: r = __shfl_up_sync(mask, v, arg, width); break;
      case 2: r = __shfl_down_sync(mask, v, arg, width); break;
      default: r = __shfl_xor_sync(mask, v, arg, width); break;
    }
  }
  out[t] = r;
}

// Votes and block reductions: out[4t..4t+3] = ballot(t % 3 == 0), any(t == 37), all(t < 1000),
// __syncthreads_count(t % 2 == 0).
__global__ void vote_kernel(unsigned* out) {
  const int t = threadIdx.x;
  out[4 * t + 0] = __ballot_sync(0xffffffffu, t % 3 == 0);
  out[4 * t + 1] = __any_sync(0xffffffffu, t == 37);
  out[4 * t + 2] = __all_sync(0xffffffffu, t < 1000);
  out[4 * t + 3] = (unsigned)__syncthreads_count(t % 2 == 0);
}

// A shared-memory tree reduction per block (barriers in a loop) and atomics across blocks.
__global__ void reduce_kernel(const float* in, float* sum, int* count, int* maxv, int n) {
  __shared__ float s[256];
  const int t = threadIdx.x;
  const int i = blockIdx.x * blockDim.x + t;
  s[t] = i < n ? in[i] : 0.f;
  __syncthreads();
  for (int h = blockDim.x / 2; h > 0; h /= 2) {
    if (t < h) s[t] += s[t + h];
    __syncthreads();
  }
  if (t == 0) atomicAdd(sum, s[0]);
  if (i < n) {
    atomicAdd(count, 1);
    atomicMax(maxv, i);
  }
}

__global__ void convert_kernel(const float* in, unsigned short* h, unsigned short* b, float* back, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const __half hv = __float2half_rn(in[i]);
  const __nv_bfloat16 bv = __float2bfloat16_rn(in[i]);
  h[i] = __half_as_ushort(hv);
  b[i] = __bfloat16_as_ushort(bv);
  back[2 * i] = __half2float(hv);
  back[2 * i + 1] = __bfloat162float(bv);
}

// Only the first half of the static and dynamic arrays is written before the barrier: the rest
// must read as NaN (poisoned), in every block (block 1 must not see block 0's writes).
__global__ void poison_kernel(float* out) {
  __shared__ float s[64];
  float* d = kk::dynamic_smem<float>();
  const int t = threadIdx.x;
  if (t < 32) {
    s[t] = (float)(blockIdx.x + 1);
    d[t] = (float)(blockIdx.x + 1);
  }
  __syncthreads();
  out[blockIdx.x * 128 + t] = s[t];
  out[blockIdx.x * 128 + 64 + t] = d[t];
}

// Misuses the emulator must report instead of hanging or computing garbage.
__global__ void bad_kernel(int* out, int which) {
  const int t = threadIdx.x;
  switch (which) {
    case 0:  // divergent barrier
      if (t < 16) {
        __syncthreads();
      } else {
        __syncthreads();
      }
      break;
    case 1:  // a thread exits before the barrier
      if (t == 5) return;
      __syncthreads();
      break;
    case 2:  // a shuffle reads a lane that has exited
      if (t >= 16 && t < 32) return;
      out[t] = __shfl_sync(0xffffffffu, t, t ^ 16);
      break;
    case 3:  // the mask does not include the calling lane
      out[t] = __shfl_sync(0x1u, t, 0);
      break;
    case 4:  // a shuffle reads a lane outside its mask
      if (t < 4) out[t] = __shfl_sync(0xfu, t, 7);
      break;
    case 5:  // lanes of the mask wait at a barrier while the others wait in a shuffle for them
      if (t < 16) out[t] = __shfl_sync(0xffffffffu, t, 0);
      __syncthreads();
      break;
    default:
      __trap();
  }
  out[t] = 1;
}

__global__ void empty_kernel(int* out) {
  __shared__ float big[8192];  // 32 KiB of static shared memory
  big[threadIdx.x] = 0.f;
  if (threadIdx.x == 0 && blockIdx.x == 0) out[0] = (int)big[0] + 7;
}

}  // namespace

extern "C" {

KKEMU_EXPORT const char* kkemu_selftest_error(void) { return g_msg; }

KKEMU_EXPORT int kkemu_selftest_shfl(int* out, int n, int mode, int arg, int width, unsigned mask) {
  kk::launch(shfl_kernel, dim3(1), dim3((unsigned)n), 0, nullptr, out, mode, arg, width, mask);
  return finish();
}

KKEMU_EXPORT int kkemu_selftest_vote(unsigned* out, int n) {
  kk::launch(vote_kernel, dim3(1), dim3((unsigned)n), 0, nullptr, out);
  return finish();
}

KKEMU_EXPORT int kkemu_selftest_reduce(const float* in, float* sum, int* count, int* maxv, int n) {
  kk::launch(reduce_kernel, dim3((unsigned)((n + 255) / 256)), dim3(256), 0, nullptr, in, sum, count, maxv, n);
  return finish();
}

KKEMU_EXPORT int kkemu_selftest_convert(const float* in, unsigned short* h, unsigned short* b, float* back, int n) {
  kk::launch(convert_kernel, dim3((unsigned)((n + 127) / 128)), dim3(128), 0, nullptr, in, h, b, back, n);
  return finish();
}

KKEMU_EXPORT int kkemu_selftest_poison(float* out) {
  kk::launch(poison_kernel, dim3(2), dim3(64), 64 * sizeof(float), nullptr, out);
  return finish();
}

KKEMU_EXPORT int kkemu_selftest_bad(int* out, int which) {
  kk::launch(bad_kernel, dim3(1), dim3(64), 0, nullptr, out, which);
  return finish();
}

// A launch of a kernel with 32 KiB of static shared memory; attr >= 0 first sets its
// MaxDynamicSharedMemorySize (the result of that call is returned if it fails).
KKEMU_EXPORT int kkemu_selftest_launch(int* out, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                       unsigned bz, int dyn, int attr) {
  if (attr >= 0) {
    const cudaError_t e = cudaFuncSetAttribute(empty_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, attr);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      std::snprintf(g_msg, sizeof(g_msg), "%s", cudaGetErrorString(e));
      return (int)e;
    }
  }
  kk::launch(empty_kernel, dim3(gx, gy, gz), dim3(bx, by, bz), (size_t)dyn, nullptr, out);
  return finish();
}

}  // extern "C"
