// CUDA runtime API of the host emulation (tests/cuda_emu): the subset kernelkit's sources use,
// over host memory ("device" pointers are host pointers).  See kkemu.h.
#pragma once

#include "kkemu.h"

#include <cuda_fp16.h>

extern "C" {
KKEMU_EXPORT cudaError_t cudaGetLastError(void);
KKEMU_EXPORT cudaError_t cudaPeekAtLastError(void);
KKEMU_EXPORT const char* cudaGetErrorString(cudaError_t err);
KKEMU_EXPORT const char* cudaGetErrorName(cudaError_t err);
KKEMU_EXPORT cudaError_t cudaGetDevice(int* dev);
KKEMU_EXPORT cudaError_t cudaSetDevice(int dev);
KKEMU_EXPORT cudaError_t cudaGetDeviceCount(int* n);
KKEMU_EXPORT cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev);
KKEMU_EXPORT cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int dev);
KKEMU_EXPORT cudaError_t cudaDeviceSynchronize(void);
KKEMU_EXPORT cudaError_t cudaStreamSynchronize(cudaStream_t stream);
KKEMU_EXPORT cudaError_t cudaStreamCreate(cudaStream_t* stream);
KKEMU_EXPORT cudaError_t cudaStreamDestroy(cudaStream_t stream);
KKEMU_EXPORT cudaError_t cudaMalloc(void** ptr, size_t bytes);
KKEMU_EXPORT cudaError_t cudaFree(void* ptr);
KKEMU_EXPORT cudaError_t cudaMemset(void* ptr, int value, size_t bytes);
KKEMU_EXPORT cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream);
KKEMU_EXPORT cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
KKEMU_EXPORT cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                                         cudaStream_t stream);
KKEMU_EXPORT cudaError_t kkemu_func_set_attribute(const void* func, cudaFuncAttribute attr, int value);
}

template <typename T>
inline cudaError_t cudaFuncSetAttribute(T* func, cudaFuncAttribute attr, int value) {
  return kkemu_func_set_attribute(reinterpret_cast<const void*>(func), attr, value);
}
