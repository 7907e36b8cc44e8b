// Shared pieces of kernelkit's XLA FFI handlers (the kernelkit._jax / kernelkit._jax_cuda modules).
//
// Every family file (csrc/jax/<family>.cpp) defines its handlers with XLA_FFI_DEFINE_HANDLER_SYMBOL
// and registers them with KK_JAX_TARGET; module.cpp hands the registry to Python as capsules, which
// kernelkit.jax registers with jax.ffi.register_ffi_target.  The same sources are compiled twice:
// without KK_JAX_CUDA into kernelkit._jax (links libkernelkit, platform "cpu") and, where the CUDA
// library is built, with KK_JAX_CUDA=1 into kernelkit._jax_cuda (links libkernelkit_cuda, platform
// "CUDA": the handlers take XLA's stream and device scratch memory).  Neither links libtorch.
//
// vmap: the Python wrappers call jax.ffi.ffi_call with vmap_method="expand_dims", so under jax.vmap
// every operand gets the same number of extra leading dimensions, of the batch size where batched
// and of size 1 where not.  `Lead` walks those dimensions; each handler runs its kernel once per
// batch element (or once in all, when the family can fold the batch into its rows).
#ifndef KERNELKIT_JAX_COMMON_H_
#define KERNELKIT_JAX_COMMON_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "kernelkit/kernelkit.h"
#include "xla/ffi/api/ffi.h"

namespace kkjax {

namespace ffi = xla::ffi;

#if KK_JAX_CUDA
inline constexpr const char* kPlatform = "CUDA";
#else
inline constexpr const char* kPlatform = "cpu";
#endif

// ---- registry ------------------------------------------------------------------------------
inline std::vector<std::pair<std::string, void*>>& registry() {
  static std::vector<std::pair<std::string, void*>> r;
  return r;
}
struct Register {
  Register(const char* name, void* fn) { registry().emplace_back(name, fn); }
};
#define KK_JAX_CAT2(a, b) a##b
#define KK_JAX_CAT(a, b) KK_JAX_CAT2(a, b)
// KK_JAX_TARGET("kernelkit_monarch_fwd", MonarchFwd): the handler symbol under the target name.
#define KK_JAX_TARGET(name, fn) \
  static ::kkjax::Register KK_JAX_CAT(kk_jax_reg_, __LINE__)(name, reinterpret_cast<void*>(&fn))

// ---- dtypes and errors ---------------------------------------------------------------------
inline bool to_kk(ffi::DataType t, kk_dtype* out) {
  switch (t) {
    case ffi::DataType::F32: *out = KK_FLOAT32; return true;
    case ffi::DataType::F64: *out = KK_FLOAT64; return true;
    case ffi::DataType::F16: *out = KK_FLOAT16; return true;
    case ffi::DataType::BF16: *out = KK_BFLOAT16; return true;
    default: return false;
  }
}

inline ffi::Error dtype_error(const char* what) {
  return ffi::Error::InvalidArgument(std::string("kernelkit: unsupported dtype for ") + what);
}

// A failed kk_* call as an XLA error carrying kk_last_error() (the message names the argument).
inline ffi::Error check(kk_status s, const char* op) {
  if (s == KK_OK) return ffi::Error::Success();
  std::string msg = std::string("kernelkit: ") + op + ": " + kk_status_string(s) + ": " + kk_last_error();
  return s == KK_ERR_INTERNAL || s == KK_ERR_CUDA || s == KK_ERR_OUT_OF_MEMORY
             ? ffi::Error::Internal(std::move(msg))
             : ffi::Error::InvalidArgument(std::move(msg));
}
#define KK_JAX_CHECK(call, op)                   \
  do {                                           \
    ffi::Error kk_jax_err_ = ::kkjax::check((call), (op)); \
    if (kk_jax_err_.failure()) return kk_jax_err_; \
  } while (0)

// ---- small shared pieces -----------------------------------------------------------------------
// A buffer's last dimension (1 for a scalar).
inline int64_t last_dim(const ffi::AnyBuffer& b) {
  auto d = b.dimensions();
  return d.size() == 0 ? 1 : d[d.size() - 1];
}

// The CPU kernels' thread count for `work`: one thread below the family's serial threshold (as its
// torch op does), else 0 = the OpenMP default.
inline int32_t threads_for(int64_t work, int64_t serial_work) { return work < serial_work ? 1 : 0; }

// The int64 view of n indices of type t (S64: p itself; S32: widened into tmp).  The C ABI takes int64
// indices; JAX without x64 has only int32 (CPU handlers only: the CUDA ones take int64).
inline const int64_t* as_int64(ffi::DataType t, const void* p, int64_t n, std::vector<int64_t>& tmp) {
  if (t == ffi::DataType::S64) return static_cast<const int64_t*>(p);
  const int32_t* s = static_cast<const int32_t*>(p);
  tmp.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) tmp[static_cast<size_t>(i)] = s[i];
  return tmp.data();
}

// ---- vmap's leading dimensions ---------------------------------------------------------------
// Operands are added with their buffer's dims and core rank (the rank the op itself takes); the
// dims before the core are the leading (vmap) dims, the same count for every operand, each of
// size 1 or the batch size.  count() is the number of batch elements; ptr(i, b) the address of
// operand i's core array at flat batch element b (a size-1 leading dim broadcasts).
class Lead {
 public:
  // Returns false (and sets error()) on inconsistent leading dims.
  bool add(ffi::AnyBuffer::Dimensions dims, int core, void* data, size_t elem_bytes, const char* name) {
    const int64_t rank = static_cast<int64_t>(dims.size());
    if (rank < core) return fail(std::string(name) + " has rank " + std::to_string(rank) + " < " + std::to_string(core));
    const int64_t nl = rank - core;
    if (ops_.empty()) {
      shape_.assign(nl, 1);
    } else if (nl != static_cast<int64_t>(shape_.size())) {
      return fail(std::string(name) + ": inconsistent number of leading (vmap) dimensions");
    }
    Op op;
    op.data = static_cast<char*>(data);
    op.lead.assign(dims.begin(), dims.begin() + nl);
    size_t core_bytes = elem_bytes;
    for (int64_t d = nl; d < rank; ++d) core_bytes *= static_cast<size_t>(dims[d]);
    op.core_bytes = core_bytes;
    for (int64_t d = 0; d < nl; ++d) {
      if (op.lead[d] != 1) {
        if (shape_[d] != 1 && shape_[d] != op.lead[d])
          return fail(std::string(name) + ": leading (vmap) dimension " + std::to_string(d) + " mismatch");
        shape_[d] = op.lead[d];
      }
    }
    ops_.push_back(std::move(op));
    return true;
  }
  bool add(const ffi::AnyBuffer& b, int core, const char* name) {
    return add(b.dimensions(), core, b.untyped_data(), ffi::ByteWidth(b.element_type()), name);
  }
  bool add(ffi::Result<ffi::AnyBuffer>& b, int core, const char* name) {
    return add(b->dimensions(), core, b->untyped_data(), ffi::ByteWidth(b->element_type()), name);
  }
  int64_t count() const {
    int64_t n = 1;
    for (int64_t s : shape_) n *= s;
    return n;
  }
  // True when operand i has a leading dim > 1 (is batched by vmap).
  bool batched(size_t i) const {
    for (int64_t s : ops_[i].lead) if (s != 1) return true;
    return false;
  }
  void* ptr(size_t i, int64_t b) const {
    const Op& op = ops_[i];
    int64_t off = 0, mult = 1;
    for (int64_t d = static_cast<int64_t>(shape_.size()) - 1; d >= 0; --d) {
      const int64_t idx = b % shape_[d];
      b /= shape_[d];
      if (op.lead[d] != 1) off += idx * mult;
      mult *= op.lead[d];
    }
    return op.data + static_cast<size_t>(off) * op.core_bytes;
  }
  const std::string& error() const { return err_; }
  ffi::Error as_error() const { return ffi::Error::InvalidArgument("kernelkit: " + err_); }

 private:
  struct Op {
    char* data;
    std::vector<int64_t> lead;
    size_t core_bytes;
  };
  bool fail(std::string m) {
    err_ = std::move(m);
    return false;
  }
  std::vector<int64_t> shape_;
  std::vector<Op> ops_;
  std::string err_;
};

// ---- scratch memory --------------------------------------------------------------------------
#if KK_JAX_CUDA
// Device scratch from XLA's allocator (freed when the handler returns).
#define KK_JAX_DEVICE_CTX .Ctx<::xla::ffi::PlatformStream<void*>>().Ctx<::xla::ffi::ScratchAllocator>()
#define KK_JAX_DEVICE_PARAMS , [[maybe_unused]] void* stream, [[maybe_unused]] ::xla::ffi::ScratchAllocator scratch
inline void* scratch_bytes(ffi::ScratchAllocator& s, int64_t bytes) {
  if (bytes <= 0) return nullptr;
  auto p = s.Allocate(static_cast<size_t>(bytes), 256);
  return p.has_value() ? *p : nullptr;
}
#else
#define KK_JAX_DEVICE_CTX
#define KK_JAX_DEVICE_PARAMS
#endif

}  // namespace kkjax

#endif  // KERNELKIT_JAX_COMMON_H_
