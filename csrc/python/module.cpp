// kernelkit._C: a thin pybind11 layer over the C ABI.  Tensors cross as raw addresses (ints), so
// this module does not link libtorch and one build works with any torch version.  The CUDA library
// is opened lazily with dlopen (load_cuda), so the module imports on machines without CUDA.
#include <dlfcn.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings.h"
#include "kernelkit/kernelkit.h"

namespace py = pybind11;

namespace kkpy {

[[noreturn]] void raise_status(kk_status st, const char* msg) {
  std::string text = std::string(msg && *msg ? msg : kk_status_string(st));
  switch (st) {
    case KK_ERR_NULL_POINTER:
    case KK_ERR_INVALID_SIZE:
    case KK_ERR_INVALID_ARGUMENT: throw py::value_error(text);
    case KK_ERR_UNSUPPORTED_DTYPE: throw py::type_error(text);
    case KK_ERR_OUT_OF_MEMORY: throw std::bad_alloc();
    default: throw std::runtime_error(text);
  }
}

void check(kk_status st) {
  if (st != KK_OK) raise_status(st, kk_last_error());
}

namespace {
// ---- the CUDA library, resolved with dlsym ----------------------------------------------------
struct CudaLib {
  void* handle = nullptr;
  std::string error = "not loaded";
  const char* (*last_error)() = nullptr;
} g_cuda;

// Every symbol the bindings call, one line per family: a library missing any of them (an old build)
// is refused at load time, so the cuda backend reports it as unavailable instead of failing later.
const char* const kRequiredCudaSymbols[] = {
    "kk_last_error",
    "kk_monarch_fwd_cuda", "kk_monarch_bwd_cuda_workspace_size", "kk_monarch_bwd_cuda",
    "kk_sparse_linear_fwd_cuda_workspace_size", "kk_sparse_linear_fwd_cuda",
    "kk_sparse_linear_bwd_cuda_workspace_size", "kk_sparse_linear_bwd_cuda",
    "kk_vq_dequantize_cuda", "kk_vq_linear_fwd_cuda_workspace_size", "kk_vq_linear_fwd_cuda",
    "kk_vq_linear_bwd_cuda_workspace_size", "kk_vq_linear_bwd_cuda", "kk_vq_assign_cuda",
    "kk_ot_sinkhorn_step_cuda", "kk_ot_marginals_cuda", "kk_ot_plan_cuda", "kk_ot_sparsify_cuda", "kk_ot_hvp_cuda",
    "kk_ot_cg_cuda_workspace_size", "kk_ot_cg_cuda", "kk_ot_points_grad_cuda",
    "kk_mfac_dots_cuda", "kk_mfac_combine_cuda", "kk_mfac_diag_cuda", "kk_mfac_static_setup_cuda_workspace_size",
    "kk_mfac_static_setup_cuda", "kk_mfac_window_cuda_workspace_size", "kk_mfac_window_update_cuda",
    "kk_mfac_window_rebuild_cuda", "kk_mfac_window_coef_cuda",
    "kk_rbf_grid_build_cuda_workspace_size", "kk_rbf_grid_build_cuda", "kk_rbf_knn_cuda", "kk_rbf_features_fwd_cuda",
    "kk_rbf_features_bwd_cuda",
};

bool load_cuda(const std::string& path) {
  if (g_cuda.handle) return true;
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    const char* e = dlerror();
    g_cuda.error = e ? e : "dlopen failed";
    return false;
  }
  for (const char* name : kRequiredCudaSymbols) {
    if (!dlsym(h, name)) {
      g_cuda.error = std::string("symbol ") + name + " missing (a library from an older build?)";
      dlclose(h);
      return false;
    }
  }
  g_cuda.handle = h;
  g_cuda.last_error = reinterpret_cast<const char* (*)()>(dlsym(h, "kk_last_error"));
  g_cuda.error.clear();
  return true;
}
}  // namespace

void* cuda_symbol(const char* name) {
  if (!g_cuda.handle) throw std::runtime_error("kernelkit CUDA library not loaded: " + g_cuda.error);
  void* fn = dlsym(g_cuda.handle, name);
  if (!fn) throw std::runtime_error(std::string("kernelkit CUDA library: symbol ") + name + " missing");
  return fn;
}

void check_cuda(kk_status st) {
  if (st != KK_OK) raise_status(st, g_cuda.last_error());
}

}  // namespace kkpy

using namespace kkpy;

PYBIND11_MODULE(_C, m) {
  m.doc() = "kernelkit C ABI bindings (pointers as ints; see csrc/include/kernelkit/kernelkit.h)";
  m.def("abi_version", &kk_abi_version);
  m.def("version", &kk_version);
  m.def("cpu_isa", &kk_cpu_isa);
  m.def("load_cuda", &load_cuda, py::arg("path"),
        "dlopen libkernelkit_cuda; returns False (see cuda_error()) when it cannot be loaded");
  m.def("cuda_loaded", [] { return g_cuda.handle != nullptr; });
  m.def("cuda_error", [] { return g_cuda.error; });

  // ---- monarch ----
  m.def(
      "monarch_fwd_cpu",
      [](int dtype, int64_t B, int64_t k, int64_t q, int64_t p, int64_t l, int64_t s, int64_t r,
         uintptr_t x, int64_t ldx, uintptr_t w1, uintptr_t w2, uintptr_t out, int64_t ldo,
         int32_t nthreads) {
        kk_status st;
        {
          py::gil_scoped_release nogil;
          st = kk_monarch_fwd_cpu(static_cast<kk_dtype>(dtype), B, k, q, p, l, s, r,
                                  cptr<void>(x), ldx, cptr<void>(w1), cptr<void>(w2), mptr(out),
                                  ldo, nthreads);
        }
        check(st);
      });
  m.def(
      "monarch_bwd_cpu",
      [](int dtype, int64_t B, int64_t k, int64_t q, int64_t p, int64_t l, int64_t s, int64_t r,
         uintptr_t x, int64_t ldx, uintptr_t w1, uintptr_t w2, uintptr_t dout, int64_t lddo,
         uintptr_t dx, int64_t lddx, uintptr_t dw1, uintptr_t dw2, int32_t nthreads) {
        kk_status st;
        {
          py::gil_scoped_release nogil;
          st = kk_monarch_bwd_cpu(static_cast<kk_dtype>(dtype), B, k, q, p, l, s, r,
                                  cptr<void>(x), ldx, cptr<void>(w1), cptr<void>(w2),
                                  cptr<void>(dout), lddo, mptr(dx), lddx, mptr(dw1), mptr(dw2),
                                  nthreads);
        }
        check(st);
      });
  m.def("monarch_fwd_cuda",
        [](int dtype, int64_t B, int64_t k, int64_t q, int64_t p, int64_t l, int64_t s, int64_t r,
           uintptr_t x, int64_t ldx, uintptr_t w1, uintptr_t w2, uintptr_t out, int64_t ldo,
           uintptr_t stream) {
          check_cuda(cuda_fn(kk_monarch_fwd_cuda)(static_cast<kk_dtype>(dtype), B, k, q, p, l, s, r,
                                   cptr<void>(x), ldx, cptr<void>(w1), cptr<void>(w2), mptr(out),
                                   ldo, mptr(stream)));
        });
  m.def("monarch_bwd_cuda_workspace_size",
        [](int dtype, int64_t B, int64_t k, int64_t q, int64_t p, int64_t l, int64_t s, int64_t r) {
          int64_t bytes = 0;
          check_cuda(cuda_fn(kk_monarch_bwd_cuda_workspace_size)(static_cast<kk_dtype>(dtype), B, k, q, p, l, s, r, &bytes));
          return bytes;
        });
  m.def("monarch_bwd_cuda",
        [](int dtype, int64_t B, int64_t k, int64_t q, int64_t p, int64_t l, int64_t s, int64_t r,
           uintptr_t x, int64_t ldx, uintptr_t w1, uintptr_t w2, uintptr_t dout, int64_t lddo,
           uintptr_t dx, int64_t lddx, uintptr_t dw1, uintptr_t dw2, uintptr_t ws,
           int64_t ws_bytes, uintptr_t stream) {
          check_cuda(cuda_fn(kk_monarch_bwd_cuda)(static_cast<kk_dtype>(dtype), B, k, q, p, l, s, r,
                                   cptr<void>(x), ldx, cptr<void>(w1), cptr<void>(w2),
                                   cptr<void>(dout), lddo, mptr(dx), lddx, mptr(dw1), mptr(dw2),
                                   mptr(ws), ws_bytes, mptr(stream)));
        });

  bind_sparse(m);
  bind_vq(m);
  bind_ot(m);
  bind_mfac(m);
  bind_rbf(m);
}
