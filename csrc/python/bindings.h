// Internal to kernelkit._C: what the per-family binding files share (module.cpp defines it).
// Tensors cross as raw addresses (uintptr_t); no libtorch.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>

#include "kernelkit/kernelkit.h"

namespace kkpy {
namespace py = pybind11;

// Raise the Python exception for a failed status: ValueError for bad sizes/arguments/NULL,
// TypeError for a dtype, MemoryError, else RuntimeError; the message is the library's.
[[noreturn]] void raise_status(kk_status st, const char* msg);
void check(kk_status st);       // after a CPU library call
void check_cuda(kk_status st);  // after a CUDA library call (its own kk_last_error)

// A function of the lazily loaded CUDA library; throws RuntimeError when it is not loaded.
void* cuda_symbol(const char* name);
#define cuda_fn(fn) (reinterpret_cast<decltype(&fn)>(::kkpy::cuda_symbol(#fn)))

// Runs a CPU library call with the GIL released, then raises the Python exception for a failed status.
template <typename Fn>
void cpu_call(Fn&& fn) {
  kk_status st;
  {
    py::gil_scoped_release nogil;
    st = fn();
  }
  check(st);
}

template <typename T = void>
inline const T* cptr(uintptr_t p) { return reinterpret_cast<const T*>(p); }
inline void* mptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

// One per family, each in csrc/python/<family>.cpp, called from module.cpp.
void bind_sparse(py::module_& m);
void bind_vq(py::module_& m);
void bind_ot(py::module_& m);
void bind_mfac(py::module_& m);
void bind_rbf(py::module_& m);
}  // namespace kkpy
