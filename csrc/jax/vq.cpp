// vq: kernelkit_vq_linear_fwd / kernelkit_vq_linear_bwd (kk_vq_linear_{fwd,bwd}_{cpu,cuda}).
//   fwd: x (rows, n_in), codes (n_out, G, M) uint8 | int16, codebooks (S, M, K, d), scales (n_out) or (0)
//        for none, bias (n_out) or (0) for none; attrs rows_per_codebook (i64), path (i32)
//        -> out (rows, n_out)
//   bwd: x, codes, codebooks, scales, dout (rows, n_out); attr rows_per_codebook
//        -> dx (rows, n_in), dcodebooks (S, M, K, d), dscales (n_out) or (0) when there are no scales
// The kk_vq_format comes from the shapes: n_out = codes' rows, n_in = G * d (= x's last dim), K and d
// from the codebooks, code_bits from the codes' dtype.  The CPU entry points check the codes against K
// on every call (flags 0: a traced array cannot be checked once beforehand); the CUDA ones trust them.
#include <cstring>

#include "common.h"

namespace kkjax {
namespace {

ffi::Error format_of(const ffi::AnyBuffer& x, const ffi::AnyBuffer& codes, const ffi::AnyBuffer& codebooks,
                     int64_t rows_per_codebook, kk_vq_format* f, int64_t* rows) {
  auto xd = x.dimensions(), cd = codes.dimensions(), bd = codebooks.dimensions();
  if (xd.size() < 2 || cd.size() < 3 || bd.size() < 4)
    return ffi::Error::InvalidArgument("kernelkit: vq_linear: x must be 2-D, codes 3-D, codebooks 4-D");
  int32_t bits;
  if (codes.element_type() == ffi::DataType::U8) {
    bits = 8;
  } else if (codes.element_type() == ffi::DataType::S16 || codes.element_type() == ffi::DataType::U16) {
    bits = 16;
  } else {
    return ffi::Error::InvalidArgument("kernelkit: vq_linear: codes must be uint8 or int16");
  }
  const size_t nc = cd.size(), nb = bd.size();
  const int64_t d = bd[nb - 1];
  std::memset(f, 0, sizeof(*f));
  f->n_out = cd[nc - 3];
  f->n_in = cd[nc - 2] * d;
  f->codebook_size = bd[nb - 2];
  f->rows_per_codebook = rows_per_codebook;
  f->group_size = static_cast<int32_t>(d);
  f->num_codebooks = static_cast<int32_t>(bd[nb - 3]);
  f->code_bits = bits;
  f->flags = 0;
  if (cd[nc - 1] != bd[nb - 3])
    return ffi::Error::InvalidArgument("kernelkit: vq_linear: codes.shape[-1] must equal the number of codebooks M");
  if (xd[xd.size() - 1] != f->n_in)
    return ffi::Error::InvalidArgument("kernelkit: vq_linear: x's last dim must be n_in = G * d");
  *rows = xd[xd.size() - 2];
  return ffi::Error::Success();
}

ffi::Error Fwd(ffi::AnyBuffer x, ffi::AnyBuffer codes, ffi::AnyBuffer codebooks, ffi::AnyBuffer scales,
               ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> out, int64_t rows_per_codebook,
               int32_t path KK_JAX_DEVICE_PARAMS) {
  kk_dtype dt;
  if (!to_kk(x.element_type(), &dt)) return dtype_error("vq_linear x");
  kk_vq_format f;
  int64_t rows;
  if (auto e = format_of(x, codes, codebooks, rows_per_codebook, &f, &rows); e.failure()) return e;
  const bool has_scales = last_dim(scales) != 0, has_bias = last_dim(bias) != 0;
  if ((has_scales && last_dim(scales) != f.n_out) || (has_bias && last_dim(bias) != f.n_out))
    return ffi::Error::InvalidArgument("kernelkit: vq_linear: scales and bias must have n_out entries (or 0 for none)");
  Lead lead;
  if (!lead.add(x, 2, "x") || !lead.add(codes, 3, "codes") || !lead.add(codebooks, 4, "codebooks") ||
      !lead.add(scales, 1, "scales") || !lead.add(bias, 1, "bias") || !lead.add(out, 2, "out"))
    return lead.as_error();
  // Only x (and out) batched: the batch folds into the rows, one call in all.
  const bool fold = !lead.batched(1) && !lead.batched(2) && !lead.batched(3) && !lead.batched(4);
  const int64_t calls = fold ? 1 : lead.count();
  const int64_t batch = fold ? rows * lead.count() : rows;
#if KK_JAX_CUDA
  int64_t ws_bytes = 0;
  KK_JAX_CHECK(kk_vq_linear_fwd_cuda_workspace_size(dt, &f, batch, path, &ws_bytes), "vq_linear_fwd");
  void* ws = scratch_bytes(scratch, ws_bytes);
  if (ws_bytes > 0 && ws == nullptr) return ffi::Error::Internal("kernelkit: vq_linear_fwd: scratch allocation failed");
#endif
  for (int64_t b = 0; b < calls; ++b) {
    const void* sp = has_scales ? lead.ptr(3, b) : nullptr;
    const void* bp = has_bias ? lead.ptr(4, b) : nullptr;
#if KK_JAX_CUDA
    KK_JAX_CHECK(kk_vq_linear_fwd_cuda(dt, &f, batch, lead.ptr(1, b), lead.ptr(2, b), sp, lead.ptr(0, b), f.n_in,
                                       bp, lead.ptr(5, b), f.n_out, path, ws, ws_bytes, stream),
                 "vq_linear_fwd");
#else
    KK_JAX_CHECK(kk_vq_linear_fwd_cpu(dt, &f, batch, lead.ptr(1, b), lead.ptr(2, b), sp, lead.ptr(0, b), f.n_in, bp,
                                      lead.ptr(5, b), f.n_out, path, 0),
                 "vq_linear_fwd");
#endif
  }
  return ffi::Error::Success();
}

ffi::Error Bwd(ffi::AnyBuffer x, ffi::AnyBuffer codes, ffi::AnyBuffer codebooks, ffi::AnyBuffer scales,
               ffi::AnyBuffer dout, ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dcodebooks,
               ffi::Result<ffi::AnyBuffer> dscales, int64_t rows_per_codebook KK_JAX_DEVICE_PARAMS) {
  kk_dtype dt;
  if (!to_kk(x.element_type(), &dt)) return dtype_error("vq_linear x");
  kk_vq_format f;
  int64_t rows;
  if (auto e = format_of(x, codes, codebooks, rows_per_codebook, &f, &rows); e.failure()) return e;
  const bool has_scales = last_dim(scales) != 0;
  if (has_scales && last_dim(scales) != f.n_out)
    return ffi::Error::InvalidArgument("kernelkit: vq_linear: scales must have n_out entries (or 0 for none)");
  Lead lead;
  if (!lead.add(x, 2, "x") || !lead.add(codes, 3, "codes") || !lead.add(codebooks, 4, "codebooks") ||
      !lead.add(scales, 1, "scales") || !lead.add(dout, 2, "dout") || !lead.add(dx, 2, "dx") ||
      !lead.add(dcodebooks, 4, "dcodebooks") || !lead.add(dscales, 1, "dscales"))
    return lead.as_error();
  // n_out = 0: no set of codebooks in the C format, nothing reaches them (the torch op does the same).
  const bool no_rows = f.n_out == 0;
#if KK_JAX_CUDA
  if (no_rows)  // the Python wrapper never calls the kernel then (it writes the zero gradients itself)
    return ffi::Error::InvalidArgument("kernelkit: vq_linear_bwd: n_out = 0 is handled in Python on CUDA");
  int64_t ws_bytes = 0;
  KK_JAX_CHECK(kk_vq_linear_bwd_cuda_workspace_size(dt, &f, rows, &ws_bytes), "vq_linear_bwd");
  void* ws = scratch_bytes(scratch, ws_bytes);
  if (ws_bytes > 0 && ws == nullptr) return ffi::Error::Internal("kernelkit: vq_linear_bwd: scratch allocation failed");
#endif
  // dcodebooks and dscales are per batch element (vmap of a gradient): one call per element.
  for (int64_t b = 0; b < lead.count(); ++b) {
    const void* sp = has_scales ? lead.ptr(3, b) : nullptr;
    void* dsp = has_scales ? lead.ptr(7, b) : nullptr;
    void* dcb = lead.ptr(6, b);
#if KK_JAX_CUDA
    KK_JAX_CHECK(kk_vq_linear_bwd_cuda(dt, &f, rows, lead.ptr(1, b), lead.ptr(2, b), sp, lead.ptr(0, b), f.n_in,
                                       lead.ptr(4, b), f.n_out, lead.ptr(5, b), f.n_in, dcb, dsp, ws, ws_bytes,
                                       stream),
                 "vq_linear_bwd");
#else
    if (no_rows) {
      auto dd = dcodebooks->dimensions();
      size_t bytes = ffi::ByteWidth(dcodebooks->element_type());
      for (size_t i = dd.size() - 4; i < dd.size(); ++i) bytes *= static_cast<size_t>(dd[i]);
      std::memset(dcb, 0, bytes);
      dcb = nullptr;
    }
    KK_JAX_CHECK(kk_vq_linear_bwd_cpu(dt, &f, rows, lead.ptr(1, b), lead.ptr(2, b), sp, lead.ptr(0, b), f.n_in,
                                      lead.ptr(4, b), f.n_out, lead.ptr(5, b), f.n_in, dcb, dsp, 0),
                 "vq_linear_bwd");
#endif
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace kkjax

// KK_JAX_DEVICE_CTX names ffi:: unqualified; the handler definitions below are at global scope.
namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(KkJaxVqLinearFwd, kkjax::Fwd,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()   // x
                                  .Arg<xla::ffi::AnyBuffer>()   // codes
                                  .Arg<xla::ffi::AnyBuffer>()   // codebooks
                                  .Arg<xla::ffi::AnyBuffer>()   // scales, (0) for none
                                  .Arg<xla::ffi::AnyBuffer>()   // bias, (0) for none
                                  .Ret<xla::ffi::AnyBuffer>()   // out
                                  .Attr<int64_t>("rows_per_codebook")
                                  .Attr<int32_t>("path") KK_JAX_DEVICE_CTX);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KkJaxVqLinearBwd, kkjax::Bwd,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()   // x
                                  .Arg<xla::ffi::AnyBuffer>()   // codes
                                  .Arg<xla::ffi::AnyBuffer>()   // codebooks
                                  .Arg<xla::ffi::AnyBuffer>()   // scales, (0) for none
                                  .Arg<xla::ffi::AnyBuffer>()   // dout
                                  .Ret<xla::ffi::AnyBuffer>()   // dx
                                  .Ret<xla::ffi::AnyBuffer>()   // dcodebooks
                                  .Ret<xla::ffi::AnyBuffer>()   // dscales, (0) without scales
                                  .Attr<int64_t>("rows_per_codebook") KK_JAX_DEVICE_CTX);
KK_JAX_TARGET("kernelkit_vq_linear_fwd", KkJaxVqLinearFwd);
KK_JAX_TARGET("kernelkit_vq_linear_bwd", KkJaxVqLinearBwd);
