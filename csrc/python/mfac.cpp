// kernelkit._C bindings of the mfac family (csrc/include/kernelkit/mfac.h): pointers as ints, the GIL
// released around CPU kernels; the arguments follow the C functions exactly (the CUDA stream as an int).
#include <cstdint>

#include "bindings.h"

namespace kkpy {

namespace {
inline double* dptr(uintptr_t p) { return reinterpret_cast<double*>(p); }
inline const double* cdptr(uintptr_t p) { return reinterpret_cast<const double*>(p); }
}  // namespace

void bind_mfac(py::module_& m) {
  using I = int64_t;
  using P = uintptr_t;
  auto dt = [](int d) { return static_cast<kk_dtype>(d); };

  m.def("mfac_static_rows", [](I mm, I d, I block) { return kk_mfac_static_rows(mm, d, block); });

  // ---- CPU ----------------------------------------------------------------------------------------
  m.def("mfac_dots_cpu", [=](int gdtype, I r, I d, I block, P G, I ldg, I nvec, P x, I ldx, I insert_row, P q,
                             P qr, int32_t nthreads) {
    cpu_call([&] {
      return kk_mfac_dots_cpu(dt(gdtype), r, d, block, mptr(G), ldg, nvec, cptr(x), ldx, insert_row, dptr(q),
                              dptr(qr), nthreads);
    });
  });
  m.def("mfac_combine_cpu", [=](int gdtype, I r, I d, I block, P G, I ldg, I nvec, double alpha, P x, I ldx, P c,
                                P out, I ldo, int32_t nthreads) {
    cpu_call([&] {
      return kk_mfac_combine_cpu(dt(gdtype), r, d, block, cptr(G), ldg, nvec, alpha, cptr(x), ldx, cdptr(c),
                                 mptr(out), ldo, nthreads);
    });
  });
  m.def("mfac_diag_cpu", [=](int zdtype, I r, I d, P Z, I ldz, double alpha, double beta, P out,
                             int32_t nthreads) {
    cpu_call([&] { return kk_mfac_diag_cpu(dt(zdtype), r, d, cptr(Z), ldz, alpha, beta, mptr(out), nthreads); });
  });
  m.def("mfac_static_setup_cpu", [=](int gdtype, I mm, I d, I block, P G, I ldg, double damp, P Z, I ldz,
                                     int32_t nthreads) {
    cpu_call([&] {
      return kk_mfac_static_setup_cpu(dt(gdtype), mm, d, block, cptr(G), ldg, damp, mptr(Z), ldz, nthreads);
    });
  });
  m.def("mfac_window_update_cpu", [](I mm, double damp, P gram, P kinv, I row, P newcol, int32_t nthreads) {
    cpu_call([&] { return kk_mfac_window_update_cpu(mm, damp, dptr(gram), dptr(kinv), row, cdptr(newcol), nthreads); });
  });
  m.def("mfac_window_rebuild_cpu", [](I mm, double damp, P gram, P kinv, int32_t nthreads) {
    cpu_call([&] { return kk_mfac_window_rebuild_cpu(mm, damp, cdptr(gram), dptr(kinv), nthreads); });
  });
  m.def("mfac_window_coef_cpu", [](I mm, I nvec, double scale, P kinv, P q, P c, int32_t nthreads) {
    cpu_call([&] { return kk_mfac_window_coef_cpu(mm, nvec, scale, cdptr(kinv), cdptr(q), dptr(c), nthreads); });
  });

  // ---- CUDA (stream as an int) --------------------------------------------------------------------
  m.def("mfac_dots_cuda", [=](int gdtype, I r, I d, I block, P G, I ldg, I nvec, P x, I ldx, I insert_row, P q,
                              P qr, P stream) {
    check_cuda(cuda_fn(kk_mfac_dots_cuda)(dt(gdtype), r, d, block, mptr(G), ldg, nvec, cptr(x), ldx, insert_row,
                                          dptr(q), dptr(qr), mptr(stream)));
  });
  m.def("mfac_combine_cuda", [=](int gdtype, I r, I d, I block, P G, I ldg, I nvec, double alpha, P x, I ldx,
                                 P c, P out, I ldo, P stream) {
    check_cuda(cuda_fn(kk_mfac_combine_cuda)(dt(gdtype), r, d, block, cptr(G), ldg, nvec, alpha, cptr(x), ldx,
                                             cdptr(c), mptr(out), ldo, mptr(stream)));
  });
  m.def("mfac_diag_cuda", [=](int zdtype, I r, I d, P Z, I ldz, double alpha, double beta, P out, P stream) {
    check_cuda(cuda_fn(kk_mfac_diag_cuda)(dt(zdtype), r, d, cptr(Z), ldz, alpha, beta, mptr(out), mptr(stream)));
  });
  m.def("mfac_static_setup_cuda_workspace_size", [=](int gdtype, I mm, I d, I block) {
    int64_t bytes = 0;
    check_cuda(cuda_fn(kk_mfac_static_setup_cuda_workspace_size)(dt(gdtype), mm, d, block, &bytes));
    return bytes;
  });
  m.def("mfac_static_setup_cuda", [=](int gdtype, I mm, I d, I block, P G, I ldg, double damp, P Z, I ldz, P ws,
                                      I ws_bytes, P stream) {
    check_cuda(cuda_fn(kk_mfac_static_setup_cuda)(dt(gdtype), mm, d, block, cptr(G), ldg, damp, mptr(Z), ldz,
                                                  mptr(ws), ws_bytes, mptr(stream)));
  });
  m.def("mfac_window_cuda_workspace_size", [](I mm) {
    int64_t bytes = 0;
    check_cuda(cuda_fn(kk_mfac_window_cuda_workspace_size)(mm, &bytes));
    return bytes;
  });
  m.def("mfac_window_update_cuda", [](I mm, double damp, P gram, P kinv, I row, P newcol, P ws, I ws_bytes,
                                      P stream) {
    check_cuda(cuda_fn(kk_mfac_window_update_cuda)(mm, damp, dptr(gram), dptr(kinv), row, cdptr(newcol), mptr(ws),
                                                   ws_bytes, mptr(stream)));
  });
  m.def("mfac_window_rebuild_cuda", [](I mm, double damp, P gram, P kinv, P ws, I ws_bytes, P stream) {
    check_cuda(cuda_fn(kk_mfac_window_rebuild_cuda)(mm, damp, cdptr(gram), dptr(kinv), mptr(ws), ws_bytes,
                                                    mptr(stream)));
  });
  m.def("mfac_window_coef_cuda", [](I mm, I nvec, double scale, P kinv, P q, P c, P stream) {
    check_cuda(cuda_fn(kk_mfac_window_coef_cuda)(mm, nvec, scale, cdptr(kinv), cdptr(q), dptr(c), mptr(stream)));
  });
}

}  // namespace kkpy
