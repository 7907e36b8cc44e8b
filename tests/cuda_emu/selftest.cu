// Kernels that check the emulator itself (tests/test_cuda_emu.py): warp intrinsics, barriers,
// shared-memory poisoning, atomics, conversions, launch limits, the PTX instructions of kk::ptx
// (mma, ldmatrix, cp.async), and the misuses it must report.
// Compiled into the emulation library only (never by nvcc); entry points return the launch's
// cudaError_t and leave its message in kkemu_selftest_error().
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

#include "common.cuh"
#include "ptx.cuh"

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

// ---- kk::ptx ----------------------------------------------------------------------------------
// Tile data: A row-major (16 x K), B as B[k][n] row-major (K x 8), C and D row-major 16 x 8 floats;
// 16-bit elements as bf16/f16 bit patterns, tf32 elements as floats.  Warp w of block b computes
// tile b * (warps per block) + w.  The fragment positions are written out below as the PTX ISA
// states them ("Matrix Fragments for mma.m16n8k16 with floating point type" / "... mma.m16n8k8"),
// independently of the emulator's own tables; the ldmatrix variant reaches the same fragments
// through ldmatrix's layout instead, so the three descriptions check one another.

__device__ int tile_of_warp() { return (int)(blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32); }

__device__ void store_c_fragment(float* D, const float (&d)[4]) {
  const int lane = threadIdx.x % 32, g = lane >> 2, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = i < 2 ? g : g + 8;  // c0, c1 in row g; c2, c3 in row g + 8
    D[row * 8 + 2 * t + (i & 1)] = d[i];
  }
}

__device__ void load_c_fragment(const float* C, float (&c)[4]) {
  const int lane = threadIdx.x % 32, g = lane >> 2, t = lane % 4;
  for (int i = 0; i < 4; ++i) c[i] = C[(i < 2 ? g : g + 8) * 8 + 2 * t + (i & 1)];
}

__device__ void mma_k16(int type, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  if (type == 0) {
    kk::ptx::mma_m16n8k16_bf16(d, a, b, c);
  } else {
    kk::ptx::mma_m16n8k16_f16(d, a, b, c);
  }
}

// m16n8k16 (type 0: bf16, 1: f16), fragments loaded from global memory.
__global__ void mma_k16_global_kernel(const uint16_t* A, const uint16_t* B, const float* C, float* D, int type) {
  const int tile = tile_of_warp(), lane = threadIdx.x % 32, g = lane >> 2, t = lane % 4;
  A += tile * 16 * 16;
  B += tile * 16 * 8;
  uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  for (int i = 0; i < 8; ++i) {
    const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
    const int col = i < 4 ? t * 2 + (i & 1) : t * 2 + (i & 1) + 8;
    a[i / 2] |= (uint32_t)A[row * 16 + col] << (16 * (i % 2));  // a0 in the low half of a[0]
  }
  for (int i = 0; i < 4; ++i) {
    const int k = i < 2 ? t * 2 + (i & 1) : t * 2 + (i & 1) + 8;
    b[i / 2] |= (uint32_t)B[k * 8 + g] << (16 * (i % 2));
  }
  float c[4], d[4];
  load_c_fragment(C + tile * 128, c);
  mma_k16(type, d, a, b, c);
  store_c_fragment(D + tile * 128, d);
}

// m16n8k8 tf32: A 16 x 8, B 8 x 8 floats, passed as their bit patterns.
__global__ void mma_tf32_kernel(const float* A, const float* B, const float* C, float* D) {
  const int tile = tile_of_warp(), lane = threadIdx.x % 32, g = lane >> 2, t = lane % 4;
  A += tile * 16 * 8;
  B += tile * 8 * 8;
  uint32_t a[4], b[2];
  for (int i = 0; i < 4; ++i) {
    const int row = (i == 0 || i == 2) ? g : g + 8;  // a0, a2 in row g; a1, a3 in row g + 8
    const int col = i < 2 ? t : t + 4;                // a0, a1 in column t; a2, a3 in column t + 4
    a[i] = __float_as_uint(A[row * 8 + col]);
  }
  b[0] = __float_as_uint(B[t * 8 + g]);
  b[1] = __float_as_uint(B[(t + 4) * 8 + g]);
  float c[4];
  load_c_fragment(C + tile * 128, c);
  kk::ptx::mma_m16n8k8_tf32(c, a, b, c);  // d aliases c, as in an accumulation loop
  store_c_fragment(D + tile * 128, c);
}

// m16n8k16 with A and B staged in shared memory (padded rows) and loaded with ldmatrix: A by .x4
// (matrices: rows 0-7 / 8-15 of columns 0-7, then of columns 8-15, i.e. a0a1, a2a3, a4a5, a6a7);
// B either stored [k][n] and loaded by .x2.trans (b_layout 0), or stored [n][k] and loaded by .x2
// (b_layout 1).  Two warps per block.
__global__ void mma_ldmatrix_kernel(const uint16_t* A, const uint16_t* B, const float* C, float* D, int type,
                                    int b_layout) {
  constexpr int SA = 24, SB = 16, SBT = 24;  // row strides in elements (48, 32, 48 bytes)
  __shared__ __align__(16) uint16_t sA[2][16 * SA];
  __shared__ __align__(16) uint16_t sB[2][16 * SB];
  __shared__ __align__(16) uint16_t sBt[2][8 * SBT];
  const int tile0 = blockIdx.x * 2;
  for (int i = threadIdx.x; i < 2 * 256; i += blockDim.x) {
    const int w = i / 256, e = i % 256;
    sA[w][(e / 16) * SA + e % 16] = A[(tile0 + w) * 256 + e];
  }
  for (int i = threadIdx.x; i < 2 * 128; i += blockDim.x) {
    const int w = i / 128, k = (i % 128) / 8, n = i % 8;
    sB[w][k * SB + n] = B[(tile0 + w) * 128 + k * 8 + n];
    sBt[w][n * SBT + k] = B[(tile0 + w) * 128 + k * 8 + n];
  }
  __syncthreads();
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32, mat = lane / 8, r = lane % 8;
  uint32_t a[4], b[2];
  kk::ptx::ldmatrix_x4(a, &sA[w][(r + 8 * (mat & 1)) * SA + 8 * (mat >> 1)]);
  if (b_layout == 0) {
    kk::ptx::ldmatrix_x2_trans(b, &sB[w][(lane % 16) * SB]);  // rows k = 0..15; lanes 16-31 unused
  } else {
    kk::ptx::ldmatrix_x2(b, &sBt[w][r * SBT + 8 * (mat & 1)]);  // rows n, k from 0 then from 8
  }
  float c[4], d[4];
  load_c_fragment(C + tile_of_warp() * 128, c);
  mma_k16(type, d, a, b, c);
  store_c_fragment(D + tile_of_warp() * 128, d);
}

// ldmatrix element by element: `image` (32 rows of `stride` 16-bit elements) is copied to shared
// memory; row j of matrix i is image row perm[8i + j], whose address lane 8i + j passes.  Lanes not
// used by .x1 / .x2 pass a misaligned address, which must be ignored.  out[4 * lane + i] = r[i].
__global__ void ldmatrix_kernel(const uint16_t* image, const int* perm, uint32_t* out, int num, int trans,
                                int stride) {
  __shared__ __align__(16) uint16_t s[32 * 40];
  const int lane = threadIdx.x;
  for (int i = lane; i < 32 * stride; i += 32) s[i] = image[i];
  __syncwarp();
  const void* row = lane < 8 * num ? static_cast<const void*>(&s[perm[lane] * stride])
                                   : static_cast<const void*>(reinterpret_cast<const char*>(s) + 1);
  uint32_t r[4] = {0, 0, 0, 0};
  uint32_t(&r1)[1] = *reinterpret_cast<uint32_t(*)[1]>(r);
  uint32_t(&r2)[2] = *reinterpret_cast<uint32_t(*)[2]>(r);
  switch (num * 2 + trans) {
    case 2: kk::ptx::ldmatrix_x1(r1, row); break;
    case 3: kk::ptx::ldmatrix_x1_trans(r1, row); break;
    case 4: kk::ptx::ldmatrix_x2(r2, row); break;
    case 5: kk::ptx::ldmatrix_x2_trans(r2, row); break;
    case 8: kk::ptx::ldmatrix_x4(r, row); break;
    default: kk::ptx::ldmatrix_x4_trans(r, row); break;
  }
  for (int i = 0; i < 4; ++i) out[4 * lane + i] = r[i];
}

// cp.async groups, per thread: 16 floats of src go to the thread's 16 floats of shared memory as
// group 1 (one 16-byte copy), group 2 (two 8-byte copies), group 3 (four 4-byte copies) and a last
// 16-byte copy left uncommitted.  The thread's shared floats are snapshotted into out (6 x 16 per
// thread) right after issuing, after wait_group 2, 1 and 0, after wait_all, and after an empty
// group and another wait_group 0.
__global__ void cp_async_kernel(const float* src, float* out) {
  __shared__ __align__(16) float s[64 * 16];
  const int t = threadIdx.x;
  float* my = s + 16 * t;
  const float* g = src + 16 * t;
  float* o = out + t * 6 * 16;
  const auto snap = [&](int k) {
    for (int i = 0; i < 16; ++i) o[16 * k + i] = my[i];
  };
  kk::ptx::cp_async_16(my, g);
  kk::ptx::cp_async_commit();
  kk::ptx::cp_async_8(my + 4, g + 4);
  kk::ptx::cp_async_8(my + 6, g + 6);
  kk::ptx::cp_async_commit();
  for (int j = 8; j < 12; ++j) kk::ptx::cp_async_4(my + j, g + j);
  kk::ptx::cp_async_commit();
  kk::ptx::cp_async_16(my + 12, g + 12);
  snap(0);
  kk::ptx::cp_async_wait<2>();
  snap(1);
  kk::ptx::cp_async_wait<1>();
  snap(2);
  kk::ptx::cp_async_wait<0>();
  snap(3);
  kk::ptx::cp_async_wait_all();
  snap(4);
  kk::ptx::cp_async_commit();
  kk::ptx::cp_async_wait<0>();
  snap(5);
}

// Thread t copies src[4t .. 4t+3] to shared memory and, after a barrier, reads its neighbour's
// four floats.  With `wait` the copy is waited for before the barrier (right); without, the
// neighbour's data is still in flight at the read (the bug: old contents), and every thread exits
// with its copy pending, which is allowed.  Dynamic shared memory (4 floats per thread).
__global__ void cp_async_share_kernel(const float* src, float* out, int wait) {
  float* s = kk::dynamic_smem<float>();
  const int t = threadIdx.x, n = blockDim.x;
  kk::ptx::cp_async_16(&s[4 * t], &src[4 * t]);
  kk::ptx::cp_async_commit();
  if (wait) kk::ptx::cp_async_wait<0>();
  __syncthreads();
  for (int i = 0; i < 4; ++i) out[4 * t + i] = s[4 * ((t + 1) % n) + i];
}

// Misuses of kk::ptx the emulator must report (g: 64 floats of global memory).
__global__ void bad_ptx_kernel(float* g, int which) {
  __shared__ __align__(16) float s[64];
  __shared__ __align__(16) uint16_t h[256];
  const int lane = threadIdx.x % 32;
  const uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float c[4] = {0.f, 0.f, 0.f, 0.f};
  uint32_t r[4];
  uint32_t(&r2)[2] = *reinterpret_cast<uint32_t(*)[2]>(r);
  switch (which) {
    case 0:  // a lane exits before the warp's mma
      if (lane == 7) return;
      kk::ptx::mma_m16n8k16_bf16(c, a, b, c);
      break;
    case 1:  // the two halves of the warp reach different mma instructions
      if (lane < 16) {
        kk::ptx::mma_m16n8k16_bf16(c, a, b, c);
      } else {
        kk::ptx::mma_m16n8k16_bf16(c, a, b, c);
      }
      break;
    case 2:  // launched with 48 threads: the second warp is partial
      kk::ptx::mma_m16n8k16_f16(c, a, b, c);
      break;
    case 3:  // 16-byte copy to a 4-byte aligned shared address
      kk::ptx::cp_async_16(&s[1], g);
      kk::ptx::cp_async_wait_all();
      break;
    case 4:  // 16-byte copy from a 4-byte aligned global address
      kk::ptx::cp_async_16(&s[0], g + 1);
      kk::ptx::cp_async_wait_all();
      break;
    case 5:  // destination in global memory
      kk::ptx::cp_async_8(g + 2, g);
      kk::ptx::cp_async_wait_all();
      break;
    case 6:  // ldmatrix row addresses 2 bytes off 16-byte alignment
      kk::ptx::ldmatrix_x4(r, &h[8 * lane + 1]);
      break;
    case 7:  // ldmatrix from global memory
      kk::ptx::ldmatrix_x2(r2, g + 4 * (lane % 16));
      break;
    case 8:  // the source changes while the copy is in flight
      if (lane == 0) {
        kk::ptx::cp_async_4(&s[0], g);
        g[0] += 1.f;
        kk::ptx::cp_async_wait_all();
      }
      break;
    case 9:  // two copies of one group to overlapping bytes
      if (lane == 0) {
        kk::ptx::cp_async_16(&s[0], g);
        kk::ptx::cp_async_8(&s[2], g + 8);
        kk::ptx::cp_async_wait_all();
      }
      break;
    case 10:  // one lane waits at a block barrier while the rest of its warp waits in an mma
      if (lane == 0) __syncthreads();
      else kk::ptx::mma_m16n8k8_tf32(c, a, b, c);
      break;
    case 11:  // one instruction site, two qualifiers: .x2 in half of the warp, .x2.trans in the other
      if (lane < 16) kk::ptx::ldmatrix_x2(r2, &h[8 * lane]); else kk::ptx::ldmatrix_x2_trans(r2, &h[8 * lane]);
      break;
    default:
      break;
  }
  g[32 + lane] = c[0];
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

KKEMU_EXPORT int kkemu_selftest_mma_k16(const uint16_t* A, const uint16_t* B, const float* C, float* D, int type,
                                       int blocks, int warps) {
  kk::launch(mma_k16_global_kernel, dim3((unsigned)blocks), dim3((unsigned)(32 * warps)), 0, nullptr, A, B, C, D,
             type);
  return finish();
}

KKEMU_EXPORT int kkemu_selftest_mma_tf32(const float* A, const float* B, const float* C, float* D, int blocks,
                                        int warps) {
  kk::launch(mma_tf32_kernel, dim3((unsigned)blocks), dim3((unsigned)(32 * warps)), 0, nullptr, A, B, C, D);
  return finish();
}

KKEMU_EXPORT int kkemu_selftest_mma_ldmatrix(const uint16_t* A, const uint16_t* B, const float* C, float* D,
                                            int type, int b_layout, int blocks) {
  kk::launch(mma_ldmatrix_kernel, dim3((unsigned)blocks), dim3(64), 0, nullptr, A, B, C, D, type, b_layout);
  return finish();
}

KKEMU_EXPORT int kkemu_selftest_ldmatrix(const uint16_t* image, const int* perm, uint32_t* out, int num, int trans,
                                        int stride) {
  kk::launch(ldmatrix_kernel, dim3(1), dim3(32), 0, nullptr, image, perm, out, num, trans, stride);
  return finish();
}

KKEMU_EXPORT int kkemu_selftest_cp_async(const float* src, float* out) {
  kk::launch(cp_async_kernel, dim3(1), dim3(64), 0, nullptr, src, out);
  return finish();
}

KKEMU_EXPORT int kkemu_selftest_cp_async_share(const float* src, float* out, int wait) {
  kk::launch(cp_async_share_kernel, dim3(1), dim3(64), 64 * 4 * sizeof(float), nullptr, src, out, wait);
  return finish();
}

KKEMU_EXPORT int kkemu_selftest_bad_ptx(float* g, int which) {
  kk::launch(bad_ptx_kernel, dim3(1), dim3(which == 2 ? 48 : 32), 0, nullptr, g, which);
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
