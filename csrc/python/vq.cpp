// kernelkit._C bindings of the vq family (csrc/include/kernelkit/vq.h): pointers as ints, the GIL
// released around CPU kernels.  The format crosses as a tuple of its eight fields in struct order
// (n_out, n_in, codebook_size, rows_per_codebook, group_size, num_codebooks, code_bits, flags);
// the other arguments follow the C functions exactly.
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "bindings.h"

namespace kkpy {

namespace {
using Fmt = std::array<int64_t, 8>;

kk_vq_format to_format(const Fmt& f) {
  kk_vq_format v;
  v.n_out = f[0];
  v.n_in = f[1];
  v.codebook_size = f[2];
  v.rows_per_codebook = f[3];
  // The 32-bit fields: a value that does not fit becomes an invalid one the library rejects.
  auto i32 = [](int64_t x) { return (x < INT32_MIN || x > INT32_MAX) ? int32_t(-1) : int32_t(x); };
  v.group_size = i32(f[4]);
  v.num_codebooks = i32(f[5]);
  v.code_bits = i32(f[6]);
  v.flags = i32(f[7]);
  return v;
}
}  // namespace

void bind_vq(py::module_& m) {
  using I = int64_t;
  using P = uintptr_t;
  auto dt = [](int d) { return static_cast<kk_dtype>(d); };

  m.def("vq_check_codes", [](const Fmt& f, P codes) {
    kk_vq_format fmt = to_format(f);
    kk_status st;
    {
      py::gil_scoped_release nogil;
      st = kk_vq_check_codes(&fmt, cptr(codes));
    }
    check(st);
  });
  m.def("vq_dequantize_cpu", [=](int dtype, const Fmt& f, P codes, P codebooks, P scales, P w, I ldw,
                                 int32_t nthreads) {
    kk_vq_format fmt = to_format(f);
    kk_status st;
    {
      py::gil_scoped_release nogil;
      st = kk_vq_dequantize_cpu(dt(dtype), &fmt, cptr(codes), cptr(codebooks), cptr(scales), mptr(w), ldw,
                                nthreads);
    }
    check(st);
  });
  m.def("vq_linear_fwd_cpu", [=](int dtype, const Fmt& f, I batch, P codes, P codebooks, P scales, P x, I ldx,
                                 P bias, P out, I ldo, int32_t path, int32_t nthreads) {
    kk_vq_format fmt = to_format(f);
    kk_status st;
    {
      py::gil_scoped_release nogil;
      st = kk_vq_linear_fwd_cpu(dt(dtype), &fmt, batch, cptr(codes), cptr(codebooks), cptr(scales), cptr(x),
                                ldx, cptr(bias), mptr(out), ldo, path, nthreads);
    }
    check(st);
  });
  m.def("vq_linear_bwd_cpu", [=](int dtype, const Fmt& f, I batch, P codes, P codebooks, P scales, P x, I ldx,
                                 P dout, I lddo, P dx, I lddx, P dcodebooks, P dscales, int32_t nthreads) {
    kk_vq_format fmt = to_format(f);
    kk_status st;
    {
      py::gil_scoped_release nogil;
      st = kk_vq_linear_bwd_cpu(dt(dtype), &fmt, batch, cptr(codes), cptr(codebooks), cptr(scales), cptr(x),
                                ldx, cptr(dout), lddo, mptr(dx), lddx, mptr(dcodebooks), mptr(dscales),
                                nthreads);
    }
    check(st);
  });
  m.def("vq_assign_cpu", [=](int dtype, I n, I K, int32_t d, P vectors, P centroids, int32_t topn, P idx,
                             P dist, int32_t nthreads) {
    kk_status st;
    {
      py::gil_scoped_release nogil;
      st = kk_vq_assign_cpu(dt(dtype), n, K, d, cptr(vectors), cptr(centroids), topn,
                            reinterpret_cast<int32_t*>(idx), mptr(dist), nthreads);
    }
    check(st);
  });

  m.def("vq_dequantize_cuda", [=](int dtype, const Fmt& f, P codes, P codebooks, P scales, P w, I ldw,
                                  P stream) {
    kk_vq_format fmt = to_format(f);
    check_cuda(cuda_fn(kk_vq_dequantize_cuda)(dt(dtype), &fmt, cptr(codes), cptr(codebooks), cptr(scales),
                                              mptr(w), ldw, mptr(stream)));
  });
  m.def("vq_linear_fwd_cuda_workspace_size", [=](int dtype, const Fmt& f, I batch, int32_t path) {
    kk_vq_format fmt = to_format(f);
    int64_t bytes = 0;
    check_cuda(cuda_fn(kk_vq_linear_fwd_cuda_workspace_size)(dt(dtype), &fmt, batch, path, &bytes));
    return bytes;
  });
  m.def("vq_linear_fwd_cuda", [=](int dtype, const Fmt& f, I batch, P codes, P codebooks, P scales, P x,
                                  I ldx, P bias, P out, I ldo, int32_t path, P ws, I ws_bytes, P stream) {
    kk_vq_format fmt = to_format(f);
    check_cuda(cuda_fn(kk_vq_linear_fwd_cuda)(dt(dtype), &fmt, batch, cptr(codes), cptr(codebooks),
                                              cptr(scales), cptr(x), ldx, cptr(bias), mptr(out), ldo, path,
                                              mptr(ws), ws_bytes, mptr(stream)));
  });
  m.def("vq_linear_bwd_cuda_workspace_size", [=](int dtype, const Fmt& f, I batch) {
    kk_vq_format fmt = to_format(f);
    int64_t bytes = 0;
    check_cuda(cuda_fn(kk_vq_linear_bwd_cuda_workspace_size)(dt(dtype), &fmt, batch, &bytes));
    return bytes;
  });
  m.def("vq_linear_bwd_cuda", [=](int dtype, const Fmt& f, I batch, P codes, P codebooks, P scales, P x,
                                  I ldx, P dout, I lddo, P dx, I lddx, P dcodebooks, P dscales, P ws,
                                  I ws_bytes, P stream) {
    kk_vq_format fmt = to_format(f);
    check_cuda(cuda_fn(kk_vq_linear_bwd_cuda)(dt(dtype), &fmt, batch, cptr(codes), cptr(codebooks),
                                              cptr(scales), cptr(x), ldx, cptr(dout), lddo, mptr(dx), lddx,
                                              mptr(dcodebooks), mptr(dscales), mptr(ws), ws_bytes,
                                              mptr(stream)));
  });
  m.def("vq_assign_cuda", [=](int dtype, I n, I K, int32_t d, P vectors, P centroids, int32_t topn, P idx,
                              P dist, P stream) {
    check_cuda(cuda_fn(kk_vq_assign_cuda)(dt(dtype), n, K, d, cptr(vectors), cptr(centroids), topn,
                                          reinterpret_cast<int32_t*>(idx), mptr(dist), mptr(stream)));
  });
}

}  // namespace kkpy
