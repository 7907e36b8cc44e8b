// kernelkit._C bindings of the rbf family (csrc/include/kernelkit/rbf.h): pointers as ints, the GIL
// released around CPU kernels; the arguments follow the C functions exactly (the CUDA stream as an int).
#include <cstdint>

#include "bindings.h"

namespace kkpy {

void bind_rbf(py::module_& m) {
  using I = int64_t;
  using P = uintptr_t;
  auto dt = [](int d) { return static_cast<kk_dtype>(d); };
  auto iptr = [](P p) { return reinterpret_cast<int64_t*>(p); };
  auto ciptr = [](P p) { return reinterpret_cast<const int64_t*>(p); };

  // (cells_max, cell_start_off, order_off, coords_off, bytes)
  m.def("rbf_grid_layout", [=](int dtype, int32_t dim, I mm) {
    kk_rbf_grid_layout_t l{};
    check(kk_rbf_grid_layout(dt(dtype), dim, mm, &l));
    return py::make_tuple(l.cells_max, l.cell_start_off, l.order_off, l.coords_off, l.bytes);
  });

  // ---- CPU ----------------------------------------------------------------------------------------
  m.def("rbf_grid_build_cpu", [=](int dtype, int32_t dim, I mm, P centers, I ldc, P grid, I grid_bytes,
                                  int32_t nthreads) {
    cpu_call([&] { return kk_rbf_grid_build_cpu(dt(dtype), dim, mm, cptr(centers), ldc, mptr(grid), grid_bytes, nthreads); });
  });
  m.def("rbf_knn_cpu", [=](int dtype, int32_t dim, I n, P x, I ldx, P grid, int32_t k, P idx, P dist2,
                           int32_t nthreads) {
    cpu_call([&] { return kk_rbf_knn_cpu(dt(dtype), dim, n, cptr(x), ldx, cptr(grid), k, iptr(idx), mptr(dist2), nthreads); });
  });
  m.def("rbf_features_fwd_cpu", [=](int dtype, int wdtype, int32_t dim, int32_t kernel, int32_t shape_full, I n, P x,
                                    I ldx, I mm, P centers, P shapes, P weights, I ldw, I channels, P omegas,
                                    int32_t k, P idx, int32_t normalize, P out, I ldo, int32_t nthreads) {
    cpu_call([&] {
      return kk_rbf_features_fwd_cpu(dt(dtype), dt(wdtype), dim, kernel, shape_full, n, cptr(x), ldx, mm,
                                     cptr(centers), cptr(shapes), cptr(weights), ldw, channels, cptr(omegas), k,
                                     ciptr(idx), normalize, mptr(out), ldo, nthreads);
    });
  });
  m.def("rbf_features_bwd_cpu", [=](int dtype, int wdtype, int32_t dim, int32_t kernel, int32_t shape_full, I n, P x,
                                    I ldx, I mm, P centers, P shapes, P weights, I ldw, I channels, P omegas,
                                    int32_t k, P idx, int32_t normalize, P grad_out, I ldg, P dx, P dcenters,
                                    P dshapes, P dweights, P domegas, int32_t nthreads) {
    cpu_call([&] {
      return kk_rbf_features_bwd_cpu(dt(dtype), dt(wdtype), dim, kernel, shape_full, n, cptr(x), ldx, mm,
                                     cptr(centers), cptr(shapes), cptr(weights), ldw, channels, cptr(omegas), k,
                                     ciptr(idx), normalize, cptr(grad_out), ldg, mptr(dx), mptr(dcenters),
                                     mptr(dshapes), mptr(dweights), mptr(domegas), nthreads);
    });
  });

  // ---- CUDA (stream as an int) --------------------------------------------------------------------
  m.def("rbf_grid_build_cuda_workspace_size", [=](int dtype, int32_t dim, I mm) {
    int64_t bytes = 0;
    check_cuda(cuda_fn(kk_rbf_grid_build_cuda_workspace_size)(dt(dtype), dim, mm, &bytes));
    return bytes;
  });
  m.def("rbf_grid_build_cuda", [=](int dtype, int32_t dim, I mm, P centers, I ldc, P grid, I grid_bytes, P ws,
                                   I ws_bytes, P stream) {
    check_cuda(cuda_fn(kk_rbf_grid_build_cuda)(dt(dtype), dim, mm, cptr(centers), ldc, mptr(grid), grid_bytes,
                                               mptr(ws), ws_bytes, mptr(stream)));
  });
  m.def("rbf_knn_cuda", [=](int dtype, int32_t dim, I n, P x, I ldx, P grid, int32_t k, P idx, P dist2, P stream) {
    check_cuda(cuda_fn(kk_rbf_knn_cuda)(dt(dtype), dim, n, cptr(x), ldx, cptr(grid), k, iptr(idx), mptr(dist2),
                                        mptr(stream)));
  });
  m.def("rbf_features_fwd_cuda", [=](int dtype, int wdtype, int32_t dim, int32_t kernel, int32_t shape_full, I n, P x,
                                     I ldx, I mm, P centers, P shapes, P weights, I ldw, I channels, P omegas,
                                     int32_t k, P idx, int32_t normalize, P out, I ldo, P stream) {
    check_cuda(cuda_fn(kk_rbf_features_fwd_cuda)(dt(dtype), dt(wdtype), dim, kernel, shape_full, n, cptr(x), ldx, mm,
                                                 cptr(centers), cptr(shapes), cptr(weights), ldw, channels,
                                                 cptr(omegas), k, ciptr(idx), normalize, mptr(out), ldo,
                                                 mptr(stream)));
  });
  m.def("rbf_features_bwd_cuda", [=](int dtype, int wdtype, int32_t dim, int32_t kernel, int32_t shape_full, I n, P x,
                                     I ldx, I mm, P centers, P shapes, P weights, I ldw, I channels, P omegas,
                                     int32_t k, P idx, int32_t normalize, P grad_out, I ldg, P dx, P dcenters,
                                     P dshapes, P dweights, P domegas, P stream) {
    check_cuda(cuda_fn(kk_rbf_features_bwd_cuda)(dt(dtype), dt(wdtype), dim, kernel, shape_full, n, cptr(x), ldx, mm,
                                                 cptr(centers), cptr(shapes), cptr(weights), ldw, channels,
                                                 cptr(omegas), k, ciptr(idx), normalize, cptr(grad_out), ldg,
                                                 mptr(dx), mptr(dcenters), mptr(dshapes), mptr(dweights),
                                                 mptr(domegas), mptr(stream)));
  });
}

}  // namespace kkpy
