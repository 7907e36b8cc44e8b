// mfac: the M-FAC kernels (kk_mfac_{dots,combine,static_setup}_{cpu,cuda}) and the static IHVP fused
// into one call (dots, c = beta q, combine: what kernelkit.mfac.StaticIHVP.mul does with three ops, with
// the float64 q and c in handler scratch, so it works without jax_enable_x64).
//   kernelkit_mfac_dots:          G (r, d), x (nvec, d) -> q (nvec, nblocks, r) float64; attr block
//   kernelkit_mfac_combine:       G (r, d), c (nvec, nblocks, r) float64, x (nvec, d) -> out (nvec, d);
//                                 attrs block, alpha, has_x (0: x is a dummy, the alpha term is dropped)
//   kernelkit_mfac_static_setup:  G (m, d) -> Z (r, d); attrs damp, block
//   kernelkit_mfac_static_mul:    Z (r, d), x (nvec, d), beta_bits (2,) uint32 (beta's float64 bits, for
//                                 the device) -> out (nvec, d) = alpha x + beta Z^T Z x per block;
//                                 attrs block, alpha, beta
// G / Z float32, bfloat16 or float64; x / out float32 (float64 with a float64 buffer).
#include <cstring>

#include "common.h"

namespace kkjax {
namespace {

constexpr int64_t kSerialWork = int64_t{1} << 20;  // as kernelkit.mfac.ops.SERIAL_WORK

int64_t nblocks(int64_t d, int64_t block) { return d == 0 ? 0 : (d + block - 1) / block; }

bool buffer_dtype(ffi::DataType t, kk_dtype* out) {
  if (t == ffi::DataType::F32) *out = KK_FLOAT32;
  else if (t == ffi::DataType::F64) *out = KK_FLOAT64;
  else if (t == ffi::DataType::BF16) *out = KK_BFLOAT16;
  else return false;
  return true;
}

ffi::DataType vector_type(kk_dtype g) { return g == KK_FLOAT64 ? ffi::DataType::F64 : ffi::DataType::F32; }

struct RD {
  int64_t r, d;
};
bool core2(ffi::AnyBuffer::Dimensions dims, RD* out) {
  if (dims.size() < 2) return false;
  out->r = dims[dims.size() - 2];
  out->d = dims[dims.size() - 1];
  return true;
}

ffi::Error Dots(ffi::AnyBuffer G, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> q, int64_t block KK_JAX_DEVICE_PARAMS) {
  kk_dtype gd;
  if (!buffer_dtype(G.element_type(), &gd)) return dtype_error("mfac_dots G");
  RD g, v;
  if (!core2(G.dimensions(), &g) || !core2(x.dimensions(), &v) || v.d != g.d)
    return ffi::Error::InvalidArgument("kernelkit: mfac_dots: G must be (r, d) and x (nvec, d)");
  if (x.element_type() != vector_type(gd)) return dtype_error("mfac_dots x (the vector dtype of G)");
  if (block < 1) return ffi::Error::InvalidArgument("kernelkit: mfac_dots: block must be >= 1");
  Lead lead;
  if (!lead.add(G, 2, "G") || !lead.add(x, 2, "x") || !lead.add(q, 3, "q")) return lead.as_error();
  for (int64_t b = 0; b < lead.count(); ++b) {
#if KK_JAX_CUDA
    (void)scratch;
    KK_JAX_CHECK(kk_mfac_dots_cuda(gd, g.r, g.d, block, lead.ptr(0, b), g.d, v.r, lead.ptr(1, b), g.d, -1,
                                   static_cast<double*>(lead.ptr(2, b)), nullptr, stream),
                 "mfac_dots");
#else
    KK_JAX_CHECK(kk_mfac_dots_cpu(gd, g.r, g.d, block, lead.ptr(0, b), g.d, v.r, lead.ptr(1, b), g.d, -1,
                                  static_cast<double*>(lead.ptr(2, b)), nullptr, threads_for(g.r * g.d * (v.r > 1 ? v.r : 1), kSerialWork)),
                 "mfac_dots");
#endif
  }
  return ffi::Error::Success();
}

ffi::Error Combine(ffi::AnyBuffer G, ffi::AnyBuffer c, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out, int64_t block,
                   double alpha, int32_t has_x KK_JAX_DEVICE_PARAMS) {
  kk_dtype gd;
  if (!buffer_dtype(G.element_type(), &gd)) return dtype_error("mfac_combine G");
  RD g, v;
  if (!core2(G.dimensions(), &g) || !core2(out->dimensions(), &v) || v.d != g.d)
    return ffi::Error::InvalidArgument("kernelkit: mfac_combine: G must be (r, d) and out (nvec, d)");
  if (c.element_type() != ffi::DataType::F64) return dtype_error("mfac_combine c (float64)");
  if (block < 1) return ffi::Error::InvalidArgument("kernelkit: mfac_combine: block must be >= 1");
  Lead lead;
  if (!lead.add(G, 2, "G") || !lead.add(c, 3, "c") || !lead.add(x, 2, "x") || !lead.add(out, 2, "out"))
    return lead.as_error();
  for (int64_t b = 0; b < lead.count(); ++b) {
    const void* xp = has_x ? lead.ptr(2, b) : nullptr;
#if KK_JAX_CUDA
    (void)scratch;
    KK_JAX_CHECK(kk_mfac_combine_cuda(gd, g.r, g.d, block, lead.ptr(0, b), g.d, v.r, alpha, xp, g.d,
                                      static_cast<const double*>(lead.ptr(1, b)), lead.ptr(3, b), g.d, stream),
                 "mfac_combine");
#else
    KK_JAX_CHECK(kk_mfac_combine_cpu(gd, g.r, g.d, block, lead.ptr(0, b), g.d, v.r, alpha, xp, g.d,
                                     static_cast<const double*>(lead.ptr(1, b)), lead.ptr(3, b), g.d,
                                     threads_for(g.r * g.d * (v.r > 1 ? v.r : 1), kSerialWork)),
                 "mfac_combine");
#endif
  }
  return ffi::Error::Success();
}

// kk_mfac_static_rows lives in the CPU library only; libkernelkit_jax_cuda links the CUDA library
// alone, so the CUDA handlers use the header's rule (mfac.h: m when m <= min(block, d), else min(block, d)).
int64_t static_rows(int64_t m, int64_t d, int64_t block) {
#if KK_JAX_CUDA
  if (m < 0 || d < 0 || block < 1) return -1;
  if (m == 0 || d == 0) return 0;
  const int64_t b = block < d ? block : d;
  return m <= b ? m : b;
#else
  return kk_mfac_static_rows(m, d, block);
#endif
}

ffi::Error StaticSetup(ffi::AnyBuffer G, ffi::Result<ffi::AnyBuffer> Z, double damp, int64_t block KK_JAX_DEVICE_PARAMS) {
  kk_dtype gd;
  if (!buffer_dtype(G.element_type(), &gd)) return dtype_error("mfac_static_setup G");
  RD g, z;
  if (!core2(G.dimensions(), &g) || !core2(Z->dimensions(), &z) || z.d != g.d)
    return ffi::Error::InvalidArgument("kernelkit: mfac_static_setup: G must be (m, d), Z (r, d)");
  if (block < 1) return ffi::Error::InvalidArgument("kernelkit: mfac_static_setup: block must be >= 1");
  if (z.r != static_rows(g.r, g.d, block))
    return ffi::Error::InvalidArgument("kernelkit: mfac_static_setup: Z has the wrong number of rows");
  Lead lead;
  if (!lead.add(G, 2, "G") || !lead.add(Z, 2, "Z")) return lead.as_error();
  if (z.r == 0) return ffi::Error::Success();
#if KK_JAX_CUDA
  int64_t ws_bytes = 0;
  KK_JAX_CHECK(kk_mfac_static_setup_cuda_workspace_size(gd, g.r, g.d, block, &ws_bytes), "mfac_static_setup");
  void* ws = scratch_bytes(scratch, ws_bytes);
  if (ws_bytes > 0 && ws == nullptr) return ffi::Error::Internal("kernelkit: mfac_static_setup: scratch allocation failed");
#endif
  for (int64_t b = 0; b < lead.count(); ++b) {
#if KK_JAX_CUDA
    KK_JAX_CHECK(kk_mfac_static_setup_cuda(gd, g.r, g.d, block, lead.ptr(0, b), g.d, damp, lead.ptr(1, b), g.d, ws,
                                           ws_bytes, stream),
                 "mfac_static_setup");
#else
    KK_JAX_CHECK(kk_mfac_static_setup_cpu(gd, g.r, g.d, block, lead.ptr(0, b), g.d, damp, lead.ptr(1, b), g.d,
                                          threads_for(g.r * g.d, kSerialWork)),
                 "mfac_static_setup");
#endif
  }
  return ffi::Error::Success();
}

ffi::Error StaticMul(ffi::AnyBuffer Z, ffi::AnyBuffer x, ffi::AnyBuffer beta_bits, ffi::Result<ffi::AnyBuffer> out,
                     int64_t block, double alpha, double beta KK_JAX_DEVICE_PARAMS) {
  kk_dtype zd;
  if (!buffer_dtype(Z.element_type(), &zd)) return dtype_error("mfac_static_mul Z");
  RD z, v;
  if (!core2(Z.dimensions(), &z) || !core2(x.dimensions(), &v) || v.d != z.d)
    return ffi::Error::InvalidArgument("kernelkit: mfac_static_mul: Z must be (r, d) and x (nvec, d)");
  if (x.element_type() != vector_type(zd)) return dtype_error("mfac_static_mul x (the vector dtype of Z)");
  if (block < 1) return ffi::Error::InvalidArgument("kernelkit: mfac_static_mul: block must be >= 1");
  Lead lead;
  if (!lead.add(Z, 2, "Z") || !lead.add(x, 2, "x") || !lead.add(beta_bits, 1, "beta_bits") || !lead.add(out, 2, "out"))
    return lead.as_error();
  const int64_t L = v.r * nblocks(z.d, block) * z.r;
#if KK_JAX_CUDA
  (void)beta;
  double* q = static_cast<double*>(scratch_bytes(scratch, L * 2 * static_cast<int64_t>(sizeof(double))));
  if (L > 0 && q == nullptr) return ffi::Error::Internal("kernelkit: mfac_static_mul: scratch allocation failed");
  double* c = q + L;
#else
  std::vector<double> qv(static_cast<size_t>(L));
  double* q = qv.data();
  double* c = q;
  const int32_t nt = threads_for(z.r * z.d * (v.r > 1 ? v.r : 1), kSerialWork);
#endif
  for (int64_t b = 0; b < lead.count(); ++b) {
#if KK_JAX_CUDA
    KK_JAX_CHECK(kk_mfac_dots_cuda(zd, z.r, z.d, block, lead.ptr(0, b), z.d, v.r, lead.ptr(1, b), z.d, -1, q, nullptr,
                                   stream),
                 "mfac_static_mul");
    // c = beta * q on the device: combine over a one-row float64 "buffer" q with the coefficient beta
    // (the operand holding beta's bits): out[j] = 0 * . + q[j] * beta.
    if (L > 0)
      KK_JAX_CHECK(kk_mfac_combine_cuda(KK_FLOAT64, 1, L, L, q, L, 1, 0.0, nullptr, L,
                                        static_cast<const double*>(lead.ptr(2, b)), c, L, stream),
                   "mfac_static_mul");
    KK_JAX_CHECK(kk_mfac_combine_cuda(zd, z.r, z.d, block, lead.ptr(0, b), z.d, v.r, alpha, lead.ptr(1, b), z.d, c,
                                      lead.ptr(3, b), z.d, stream),
                 "mfac_static_mul");
#else
    KK_JAX_CHECK(kk_mfac_dots_cpu(zd, z.r, z.d, block, lead.ptr(0, b), z.d, v.r, lead.ptr(1, b), z.d, -1, q, nullptr, nt),
                 "mfac_static_mul");
    for (int64_t i = 0; i < L; ++i) c[i] = beta * q[i];
    KK_JAX_CHECK(kk_mfac_combine_cpu(zd, z.r, z.d, block, lead.ptr(0, b), z.d, v.r, alpha, lead.ptr(1, b), z.d, c,
                                     lead.ptr(3, b), z.d, nt),
                 "mfac_static_mul");
#endif
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace kkjax

namespace ffi = xla::ffi;  // KK_JAX_DEVICE_CTX names ffi:: unqualified

XLA_FFI_DEFINE_HANDLER_SYMBOL(KkJaxMfacDots, kkjax::Dots,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("block") KK_JAX_DEVICE_CTX);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KkJaxMfacCombine, kkjax::Combine,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("block")
                                  .Attr<double>("alpha")
                                  .Attr<int32_t>("has_x") KK_JAX_DEVICE_CTX);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KkJaxMfacStaticSetup, kkjax::StaticSetup,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<double>("damp")
                                  .Attr<int64_t>("block") KK_JAX_DEVICE_CTX);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KkJaxMfacStaticMul, kkjax::StaticMul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("block")
                                  .Attr<double>("alpha")
                                  .Attr<double>("beta") KK_JAX_DEVICE_CTX);
KK_JAX_TARGET("kernelkit_mfac_dots", KkJaxMfacDots);
KK_JAX_TARGET("kernelkit_mfac_combine", KkJaxMfacCombine);
KK_JAX_TARGET("kernelkit_mfac_static_setup", KkJaxMfacStaticSetup);
KK_JAX_TARGET("kernelkit_mfac_static_mul", KkJaxMfacStaticMul);
