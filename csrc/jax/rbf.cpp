// rbf: kernelkit_rbf_grid_build / kernelkit_rbf_knn / kernelkit_rbf_features_fwd / kernelkit_rbf_features_bwd
// (kk_rbf_grid_build_*, kk_rbf_knn_*, kk_rbf_features_{fwd,bwd}_*; csrc/include/kernelkit/rbf.h).
//   grid_build:    centers (m, D) -> grid (bytes,) uint8 (bytes = kk_rbf_grid_layout(...).bytes)
//   knn:           x (n, D), grid (bytes,); attr k -> idx (n, k) int32|int64, dist2 (n, k)
//   features_fwd:  x (n, D), centers (m, D), shapes (m, D, D)|(m, D), weights (m, C), omegas (C,)|(0,),
//                  idx (n, k) int32|int64; attrs kernel, normalize, shape_full, has_omegas -> out (n, C)
//   features_bwd:  the same + grad (n, C) -> dx, dcenters, dshapes, dweights (coordinate dtype), domegas
//                  ((C,) or (0,) without omegas)
// Index dtype: the C ABI takes int64 indices.  JAX without x64 has only int32, so the CPU handlers also
// take / give int32 idx, widened into (narrowed from) a host scratch vector; the CUDA handlers take int64
// only (kernelkit.jax.rbf raises at trace time when x64 is off on a GPU).
#include <algorithm>
#include <cstring>
#include <vector>

#include "common.h"

namespace kkjax {
namespace {

// The CPU kernels run on one thread below this much work, as python/kernelkit/rbf/ops.py does.
constexpr int64_t kSerialWork = int64_t{1} << 16;

bool coord_dtype(ffi::DataType t, kk_dtype* out) {
  if (t == ffi::DataType::F32) return *out = KK_FLOAT32, true;
  if (t == ffi::DataType::F64) return *out = KK_FLOAT64, true;
  return false;
}

int64_t last(const ffi::AnyBuffer::Dimensions& d, size_t from_end) {
  return d.size() >= from_end ? d[d.size() - from_end] : -1;
}

ffi::Error bad(const std::string& m) { return ffi::Error::InvalidArgument("kernelkit: " + m); }

// ---- grid build ------------------------------------------------------------------------------------
ffi::Error GridBuild(ffi::AnyBuffer centers, ffi::Result<ffi::AnyBuffer> grid KK_JAX_DEVICE_PARAMS) {
  kk_dtype dt;
  if (!coord_dtype(centers.element_type(), &dt)) return dtype_error("rbf_grid_build centers");
  if (grid->element_type() != ffi::DataType::U8) return dtype_error("rbf_grid_build grid (uint8)");
  auto cd = centers.dimensions();
  if (cd.size() < 2) return bad("rbf_grid_build: centers must be 2-D");
  const int64_t m = last(cd, 2);
  const int32_t dim = static_cast<int32_t>(last(cd, 1));
  const int64_t grid_bytes = last(grid->dimensions(), 1);
#if !KK_JAX_CUDA  // kk_rbf_grid_layout is in the CPU library only; kk_rbf_grid_build_cuda checks grid_bytes itself
  kk_rbf_grid_layout_t layout{};
  KK_JAX_CHECK(kk_rbf_grid_layout(dt, dim, m, &layout), "rbf_grid_build");
  if (grid_bytes != layout.bytes) return bad("rbf_grid_build: grid has the wrong number of bytes");
#endif
  Lead lead;
  if (!lead.add(centers, 2, "centers") || !lead.add(grid, 1, "grid")) return lead.as_error();
#if KK_JAX_CUDA
  int64_t ws_bytes = 0;
  KK_JAX_CHECK(kk_rbf_grid_build_cuda_workspace_size(dt, dim, m, &ws_bytes), "rbf_grid_build");
  void* ws = scratch_bytes(scratch, ws_bytes);
  if (ws_bytes > 0 && ws == nullptr)
    return ffi::Error::Internal("kernelkit: rbf_grid_build: scratch allocation failed");
#endif
  for (int64_t b = 0; b < lead.count(); ++b) {
#if KK_JAX_CUDA
    KK_JAX_CHECK(kk_rbf_grid_build_cuda(dt, dim, m, lead.ptr(0, b), dim, lead.ptr(1, b), grid_bytes, ws,
                                        ws_bytes, stream),
                 "rbf_grid_build");
#else
    KK_JAX_CHECK(kk_rbf_grid_build_cpu(dt, dim, m, lead.ptr(0, b), dim, lead.ptr(1, b), grid_bytes,
                                       threads_for(m * 64, kSerialWork)),
                 "rbf_grid_build");
#endif
  }
  return ffi::Error::Success();
}

// ---- knn -------------------------------------------------------------------------------------------
ffi::Error Knn(ffi::AnyBuffer x, ffi::AnyBuffer grid, ffi::Result<ffi::AnyBuffer> idx,
               ffi::Result<ffi::AnyBuffer> dist2, int64_t k KK_JAX_DEVICE_PARAMS) {
  kk_dtype dt;
  if (!coord_dtype(x.element_type(), &dt)) return dtype_error("rbf_knn x");
  if (grid.element_type() != ffi::DataType::U8) return dtype_error("rbf_knn grid (uint8)");
  if (dist2->element_type() != x.element_type()) return dtype_error("rbf_knn dist2 (x's dtype)");
  const ffi::DataType it = idx->element_type();
#if KK_JAX_CUDA
  if (it != ffi::DataType::S64) return dtype_error("rbf_knn idx on CUDA (int64: enable jax_enable_x64)");
#else
  if (it != ffi::DataType::S64 && it != ffi::DataType::S32) return dtype_error("rbf_knn idx (int32 or int64)");
#endif
  auto xd = x.dimensions();
  if (xd.size() < 2) return bad("rbf_knn: x must be 2-D");
  const int64_t n = last(xd, 2);
  const int32_t dim = static_cast<int32_t>(last(xd, 1));
  if (last(idx->dimensions(), 1) != k || last(idx->dimensions(), 2) != n) return bad("rbf_knn: idx must be (n, k)");
  Lead lead;
  if (!lead.add(x, 2, "x") || !lead.add(grid, 1, "grid") || !lead.add(idx, 2, "idx") || !lead.add(dist2, 2, "dist2"))
    return lead.as_error();
  const int32_t kk = static_cast<int32_t>(k);
#if KK_JAX_CUDA
  (void)scratch;
#else
  std::vector<int64_t> wide(it == ffi::DataType::S32 ? static_cast<size_t>(n * k) : 0);
#endif
  for (int64_t b = 0; b < lead.count(); ++b) {
#if KK_JAX_CUDA
    KK_JAX_CHECK(kk_rbf_knn_cuda(dt, dim, n, lead.ptr(0, b), dim, lead.ptr(1, b), kk,
                                 static_cast<int64_t*>(lead.ptr(2, b)), lead.ptr(3, b), stream),
                 "rbf_knn");
#else
    int64_t* out = it == ffi::DataType::S64 ? static_cast<int64_t*>(lead.ptr(2, b)) : wide.data();
    KK_JAX_CHECK(kk_rbf_knn_cpu(dt, dim, n, lead.ptr(0, b), dim, lead.ptr(1, b), kk, out, lead.ptr(3, b),
                                threads_for(n * k * 16, kSerialWork)),
                 "rbf_knn");
    if (it == ffi::DataType::S32) {  // indices are in [-1, 2^31): exact in int32
      int32_t* narrow = static_cast<int32_t*>(lead.ptr(2, b));
      for (size_t i = 0; i < wide.size(); ++i) narrow[i] = static_cast<int32_t>(wide[i]);
    }
#endif
  }
  return ffi::Error::Success();
}

// ---- features ----------------------------------------------------------------------------------------
struct Feat {
  kk_dtype dt, wdt;
  int32_t dim, k;
  int64_t n, m, C;
  bool idx32;
};

ffi::Error feat_of(const ffi::AnyBuffer& x, const ffi::AnyBuffer& centers, const ffi::AnyBuffer& shapes,
                   const ffi::AnyBuffer& weights, const ffi::AnyBuffer& omegas, const ffi::AnyBuffer& idx,
                   int64_t shape_full, int64_t has_omegas, Feat* f) {
  if (!coord_dtype(x.element_type(), &f->dt)) return dtype_error("rbf_features x");
  if (centers.element_type() != x.element_type() || shapes.element_type() != x.element_type() ||
      omegas.element_type() != x.element_type())
    return dtype_error("rbf_features centers / shapes / omegas (x's dtype)");
  if (!to_kk(weights.element_type(), &f->wdt)) return dtype_error("rbf_features weights");
  if (f->wdt != f->dt && !(f->dt == KK_FLOAT32 && (f->wdt == KK_FLOAT16 || f->wdt == KK_BFLOAT16)))
    return dtype_error("rbf_features weights (x's dtype, or float16 / bfloat16 with float32 x)");
  const ffi::DataType it = idx.element_type();
#if KK_JAX_CUDA
  if (it != ffi::DataType::S64) return dtype_error("rbf_features idx on CUDA (int64: enable jax_enable_x64)");
#else
  if (it != ffi::DataType::S64 && it != ffi::DataType::S32) return dtype_error("rbf_features idx (int32 or int64)");
#endif
  f->idx32 = it == ffi::DataType::S32;
  auto xd = x.dimensions(), cd = centers.dimensions(), wd = weights.dimensions(), id = idx.dimensions();
  if (xd.size() < 2 || cd.size() < 2 || wd.size() < 2 || id.size() < 2 || omegas.dimensions().size() < 1 ||
      shapes.dimensions().size() < static_cast<size_t>(shape_full ? 3 : 2))
    return bad("rbf_features: operand ranks (x, centers, weights, idx 2-D; shapes 2-D or 3-D; omegas 1-D)");
  f->n = last(xd, 2), f->dim = static_cast<int32_t>(last(xd, 1));
  f->m = last(cd, 2), f->C = last(wd, 1), f->k = static_cast<int32_t>(last(id, 1));
  if (last(cd, 1) != f->dim || last(wd, 2) != f->m || last(id, 2) != f->n)
    return bad("rbf_features: inconsistent x / centers / weights / idx shapes");
  if (last(omegas.dimensions(), 1) != (has_omegas ? f->C : 0)) return bad("rbf_features: omegas must be (C,)");
  return ffi::Error::Success();
}

// Lead over the common operands (0 x, 1 centers, 2 shapes, 3 weights, 4 omegas, 5 idx).
bool lead_common(Lead& lead, const ffi::AnyBuffer& x, const ffi::AnyBuffer& centers, const ffi::AnyBuffer& shapes,
                 const ffi::AnyBuffer& weights, const ffi::AnyBuffer& omegas, const ffi::AnyBuffer& idx,
                 int64_t shape_full) {
  return lead.add(x, 2, "x") && lead.add(centers, 2, "centers") && lead.add(shapes, shape_full ? 3 : 2, "shapes") &&
         lead.add(weights, 2, "weights") && lead.add(omegas, 1, "omegas") && lead.add(idx, 2, "idx");
}

#if !KK_JAX_CUDA
// The int64 idx of batch element b (widened into `wide` when idx is int32).
const int64_t* idx64(const Lead& lead, int64_t b, const Feat& f, std::vector<int64_t>& wide) {
  return as_int64(f.idx32 ? ffi::DataType::S32 : ffi::DataType::S64, lead.ptr(5, b), f.n * f.k, wide);
}
#endif

ffi::Error FeaturesFwd(ffi::AnyBuffer x, ffi::AnyBuffer centers, ffi::AnyBuffer shapes, ffi::AnyBuffer weights,
                       ffi::AnyBuffer omegas, ffi::AnyBuffer idx, ffi::Result<ffi::AnyBuffer> out, int64_t kernel,
                       int64_t normalize, int64_t shape_full, int64_t has_omegas KK_JAX_DEVICE_PARAMS) {
  Feat f;
  if (auto e = feat_of(x, centers, shapes, weights, omegas, idx, shape_full, has_omegas, &f); e.failure()) return e;
  if (out->element_type() != weights.element_type()) return dtype_error("rbf_features out (weights' dtype)");
  Lead lead;
  if (!lead_common(lead, x, centers, shapes, weights, omegas, idx, shape_full) || !lead.add(out, 2, "out"))
    return lead.as_error();
  const int64_t ldo = std::max<int64_t>(f.C, 1);
#if KK_JAX_CUDA
  (void)scratch;
#else
  std::vector<int64_t> wide;
#endif
  for (int64_t b = 0; b < lead.count(); ++b) {
    const void* om = has_omegas ? lead.ptr(4, b) : nullptr;
#if KK_JAX_CUDA
    KK_JAX_CHECK(kk_rbf_features_fwd_cuda(f.dt, f.wdt, f.dim, static_cast<int32_t>(kernel),
                                          static_cast<int32_t>(shape_full), f.n, lead.ptr(0, b), f.dim, f.m,
                                          lead.ptr(1, b), lead.ptr(2, b), lead.ptr(3, b), f.C, f.C, om, f.k,
                                          static_cast<const int64_t*>(lead.ptr(5, b)), static_cast<int32_t>(normalize),
                                          lead.ptr(6, b), ldo, stream),
                 "rbf_features_fwd");
#else
    const int64_t* ip = idx64(lead, b, f, wide);
    KK_JAX_CHECK(kk_rbf_features_fwd_cpu(f.dt, f.wdt, f.dim, static_cast<int32_t>(kernel),
                                         static_cast<int32_t>(shape_full), f.n, lead.ptr(0, b), f.dim, f.m,
                                         lead.ptr(1, b), lead.ptr(2, b), lead.ptr(3, b), f.C, f.C, om, f.k, ip,
                                         static_cast<int32_t>(normalize), lead.ptr(6, b), ldo,
                                         threads_for(f.n * f.k * ldo, kSerialWork)),
                 "rbf_features_fwd");
#endif
  }
  return ffi::Error::Success();
}

ffi::Error FeaturesBwd(ffi::AnyBuffer x, ffi::AnyBuffer centers, ffi::AnyBuffer shapes, ffi::AnyBuffer weights,
                       ffi::AnyBuffer omegas, ffi::AnyBuffer idx, ffi::AnyBuffer grad, ffi::Result<ffi::AnyBuffer> dx,
                       ffi::Result<ffi::AnyBuffer> dcenters, ffi::Result<ffi::AnyBuffer> dshapes,
                       ffi::Result<ffi::AnyBuffer> dweights, ffi::Result<ffi::AnyBuffer> domegas, int64_t kernel,
                       int64_t normalize, int64_t shape_full, int64_t has_omegas KK_JAX_DEVICE_PARAMS) {
  Feat f;
  if (auto e = feat_of(x, centers, shapes, weights, omegas, idx, shape_full, has_omegas, &f); e.failure()) return e;
  if (grad.element_type() != weights.element_type()) return dtype_error("rbf_features grad (weights' dtype)");
  for (auto* r : {&dx, &dcenters, &dshapes, &dweights, &domegas})
    if ((*r)->element_type() != x.element_type()) return dtype_error("rbf_features gradients (x's dtype)");
  Lead lead;
  if (!lead_common(lead, x, centers, shapes, weights, omegas, idx, shape_full) || !lead.add(grad, 2, "grad") ||
      !lead.add(dx, 2, "dx") || !lead.add(dcenters, 2, "dcenters") ||
      !lead.add(dshapes, shape_full ? 3 : 2, "dshapes") || !lead.add(dweights, 2, "dweights") ||
      !lead.add(domegas, 1, "domegas"))
    return lead.as_error();
  const int64_t ldg = std::max<int64_t>(f.C, 1);
#if KK_JAX_CUDA
  (void)scratch;
#else
  std::vector<int64_t> wide;
#endif
  for (int64_t b = 0; b < lead.count(); ++b) {
    const void* om = has_omegas ? lead.ptr(4, b) : nullptr;
    void* dom = has_omegas ? lead.ptr(11, b) : nullptr;
#if KK_JAX_CUDA
    KK_JAX_CHECK(kk_rbf_features_bwd_cuda(f.dt, f.wdt, f.dim, static_cast<int32_t>(kernel),
                                          static_cast<int32_t>(shape_full), f.n, lead.ptr(0, b), f.dim, f.m,
                                          lead.ptr(1, b), lead.ptr(2, b), lead.ptr(3, b), f.C, f.C, om, f.k,
                                          static_cast<const int64_t*>(lead.ptr(5, b)), static_cast<int32_t>(normalize),
                                          lead.ptr(6, b), ldg, lead.ptr(7, b), lead.ptr(8, b), lead.ptr(9, b),
                                          lead.ptr(10, b), dom, stream),
                 "rbf_features_bwd");
#else
    const int64_t* ip = idx64(lead, b, f, wide);
    KK_JAX_CHECK(kk_rbf_features_bwd_cpu(f.dt, f.wdt, f.dim, static_cast<int32_t>(kernel),
                                         static_cast<int32_t>(shape_full), f.n, lead.ptr(0, b), f.dim, f.m,
                                         lead.ptr(1, b), lead.ptr(2, b), lead.ptr(3, b), f.C, f.C, om, f.k, ip,
                                         static_cast<int32_t>(normalize), lead.ptr(6, b), ldg, lead.ptr(7, b),
                                         lead.ptr(8, b), lead.ptr(9, b), lead.ptr(10, b), dom,
                                         threads_for(f.n * f.k * ldg, kSerialWork)),
                 "rbf_features_bwd");
#endif
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace kkjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(KkJaxRbfGridBuild, kkjax::GridBuild,
                              xla::ffi::Ffi::Bind().Arg<xla::ffi::AnyBuffer>().Ret<xla::ffi::AnyBuffer>()
                                  KK_JAX_DEVICE_CTX);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KkJaxRbfKnn, kkjax::Knn,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Attr<int64_t>("k") KK_JAX_DEVICE_CTX);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KkJaxRbfFeaturesFwd, kkjax::FeaturesFwd,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Attr<int64_t>("kernel")
                                  .Attr<int64_t>("normalize")
                                  .Attr<int64_t>("shape_full")
                                  .Attr<int64_t>("has_omegas") KK_JAX_DEVICE_CTX);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KkJaxRbfFeaturesBwd, kkjax::FeaturesBwd,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Attr<int64_t>("kernel")
                                  .Attr<int64_t>("normalize")
                                  .Attr<int64_t>("shape_full")
                                  .Attr<int64_t>("has_omegas") KK_JAX_DEVICE_CTX);
KK_JAX_TARGET("kernelkit_rbf_grid_build", KkJaxRbfGridBuild);
KK_JAX_TARGET("kernelkit_rbf_knn", KkJaxRbfKnn);
KK_JAX_TARGET("kernelkit_rbf_features_fwd", KkJaxRbfFeaturesFwd);
KK_JAX_TARGET("kernelkit_rbf_features_bwd", KkJaxRbfFeaturesBwd);
