// monarch: kernelkit_monarch_fwd / kernelkit_monarch_bwd (kk_monarch_{fwd,bwd}_{cpu,cuda}).
//   x (rows, k*p), w1 (k, q, p), w2 (l, s, r) -> out (rows, l*s); bwd: + dout -> dx, dw1, dw2.
#include "common.h"

namespace kkjax {
namespace {

struct Dims {
  int64_t rows, k, q, p, l, s, r;
};

ffi::Error dims_of(const ffi::AnyBuffer& x, const ffi::AnyBuffer& w1, const ffi::AnyBuffer& w2, Dims* d) {
  auto xd = x.dimensions(), ad = w1.dimensions(), bd = w2.dimensions();
  if (xd.size() < 2 || ad.size() < 3 || bd.size() < 3)
    return ffi::Error::InvalidArgument("kernelkit: monarch: x must be 2-D, w1 and w2 3-D");
  d->rows = xd[xd.size() - 2];
  d->k = ad[ad.size() - 3], d->q = ad[ad.size() - 2], d->p = ad[ad.size() - 1];
  d->l = bd[bd.size() - 3], d->s = bd[bd.size() - 2], d->r = bd[bd.size() - 1];
  if (xd[xd.size() - 1] != d->k * d->p) return ffi::Error::InvalidArgument("kernelkit: monarch: x's last dim must be k*p");
  return ffi::Error::Success();
}

ffi::Error Fwd(ffi::AnyBuffer x, ffi::AnyBuffer w1, ffi::AnyBuffer w2, ffi::Result<ffi::AnyBuffer> out KK_JAX_DEVICE_PARAMS) {
  kk_dtype dt;
  if (!to_kk(x.element_type(), &dt)) return dtype_error("monarch x");
  Dims d;
  if (auto e = dims_of(x, w1, w2, &d); e.failure()) return e;
  Lead lead;
  if (!lead.add(x, 2, "x") || !lead.add(w1, 3, "w1") || !lead.add(w2, 3, "w2") || !lead.add(out, 2, "out"))
    return lead.as_error();
  for (int64_t b = 0; b < lead.count(); ++b) {
#if KK_JAX_CUDA
    KK_JAX_CHECK(kk_monarch_fwd_cuda(dt, d.rows, d.k, d.q, d.p, d.l, d.s, d.r, lead.ptr(0, b), d.k * d.p,
                                     lead.ptr(1, b), lead.ptr(2, b), lead.ptr(3, b), d.l * d.s, stream),
                 "monarch_fwd");
#else
    KK_JAX_CHECK(kk_monarch_fwd_cpu(dt, d.rows, d.k, d.q, d.p, d.l, d.s, d.r, lead.ptr(0, b), d.k * d.p,
                                    lead.ptr(1, b), lead.ptr(2, b), lead.ptr(3, b), d.l * d.s, 0),
                 "monarch_fwd");
#endif
  }
  return ffi::Error::Success();
}

ffi::Error Bwd(ffi::AnyBuffer x, ffi::AnyBuffer w1, ffi::AnyBuffer w2, ffi::AnyBuffer dout,
               ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dw1,
               ffi::Result<ffi::AnyBuffer> dw2 KK_JAX_DEVICE_PARAMS) {
  kk_dtype dt;
  if (!to_kk(x.element_type(), &dt)) return dtype_error("monarch x");
  Dims d;
  if (auto e = dims_of(x, w1, w2, &d); e.failure()) return e;
  Lead lead;
  if (!lead.add(x, 2, "x") || !lead.add(w1, 3, "w1") || !lead.add(w2, 3, "w2") || !lead.add(dout, 2, "dout") ||
      !lead.add(dx, 2, "dx") || !lead.add(dw1, 3, "dw1") || !lead.add(dw2, 3, "dw2"))
    return lead.as_error();
#if KK_JAX_CUDA
  int64_t ws_bytes = 0;
  KK_JAX_CHECK(kk_monarch_bwd_cuda_workspace_size(dt, d.rows, d.k, d.q, d.p, d.l, d.s, d.r, &ws_bytes),
               "monarch_bwd");
  void* ws = scratch_bytes(scratch, ws_bytes);
  if (ws_bytes > 0 && ws == nullptr) return ffi::Error::Internal("kernelkit: monarch_bwd: scratch allocation failed");
#endif
  for (int64_t b = 0; b < lead.count(); ++b) {
#if KK_JAX_CUDA
    KK_JAX_CHECK(kk_monarch_bwd_cuda(dt, d.rows, d.k, d.q, d.p, d.l, d.s, d.r, lead.ptr(0, b), d.k * d.p,
                                     lead.ptr(1, b), lead.ptr(2, b), lead.ptr(3, b), d.l * d.s, lead.ptr(4, b),
                                     d.k * d.p, lead.ptr(5, b), lead.ptr(6, b), ws, ws_bytes, stream),
                 "monarch_bwd");
#else
    KK_JAX_CHECK(kk_monarch_bwd_cpu(dt, d.rows, d.k, d.q, d.p, d.l, d.s, d.r, lead.ptr(0, b), d.k * d.p,
                                    lead.ptr(1, b), lead.ptr(2, b), lead.ptr(3, b), d.l * d.s, lead.ptr(4, b),
                                    d.k * d.p, lead.ptr(5, b), lead.ptr(6, b), 0),
                 "monarch_bwd");
#endif
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace kkjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(KkJaxMonarchFwd, kkjax::Fwd,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>() KK_JAX_DEVICE_CTX);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KkJaxMonarchBwd, kkjax::Bwd,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>() KK_JAX_DEVICE_CTX);
KK_JAX_TARGET("kernelkit_monarch_fwd", KkJaxMonarchFwd);
KK_JAX_TARGET("kernelkit_monarch_bwd", KkJaxMonarchBwd);
