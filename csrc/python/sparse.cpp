// kernelkit._C bindings of the sparse family (csrc/include/kernelkit/sparse.h): pointers as ints,
// the GIL released around CPU kernels.  Argument order follows the C functions exactly.
#include <cstdint>

#include "bindings.h"

namespace kkpy {

void bind_sparse(py::module_& m) {
  using I = int64_t;
  using P = uintptr_t;
  auto i64 = [](P p) { return cptr<int64_t>(p); };
  auto i32 = [](P p) { return cptr<int32_t>(p); };

  m.def("sparse_check_csr", [=](I n_rows, I n_cols, I nnz, P ptr, P idx) {
    check(kk_sparse_check_csr(n_rows, n_cols, nnz, i64(ptr), i32(idx)));
  });
  m.def("sparse_csr_transpose_cpu", [=](I n_out, I n_in, I nnz, P row_ptr, P col_idx, P col_ptr,
                                        P row_idx, P perm) {
    kk_status st;
    {
      py::gil_scoped_release nogil;
      st = kk_sparse_csr_transpose_cpu(n_out, n_in, nnz, i64(row_ptr), i32(col_idx),
                                       reinterpret_cast<int64_t*>(col_ptr),
                                       reinterpret_cast<int32_t*>(row_idx),
                                       reinterpret_cast<int64_t*>(perm));
    }
    check(st);
  });
  m.def("sparse_to_dense_cpu", [=](int dtype, I n_out, I n_in, I nnz, P row_ptr, P col_idx, P values,
                                   P out, I ldo, int32_t nthreads) {
    kk_status st;
    {
      py::gil_scoped_release nogil;
      st = kk_sparse_to_dense_cpu(static_cast<kk_dtype>(dtype), n_out, n_in, nnz, i64(row_ptr), i32(col_idx),
                                  cptr(values), mptr(out), ldo, nthreads);
    }
    check(st);
  });
  m.def("sparse_gather_cpu", [=](int dtype, I n_out, I n_in, I nnz, P row_ptr, P col_idx, P dense, I ldd,
                                 P values, int32_t nthreads) {
    kk_status st;
    {
      py::gil_scoped_release nogil;
      st = kk_sparse_gather_cpu(static_cast<kk_dtype>(dtype), n_out, n_in, nnz, i64(row_ptr), i32(col_idx),
                                cptr(dense), ldd, mptr(values), nthreads);
    }
    check(st);
  });
  m.def("sparse_linear_fwd_cpu", [=](int dtype, I batch, I n_out, I n_in, I nnz, P row_ptr,
                                     P col_idx, P values, P x, I ldx, P bias, P out, I ldo,
                                     int32_t nthreads) {
    kk_status st;
    {
      py::gil_scoped_release nogil;
      st = kk_sparse_linear_fwd_cpu(static_cast<kk_dtype>(dtype), batch, n_out, n_in, nnz,
                                    i64(row_ptr), i32(col_idx), cptr(values), cptr(x), ldx,
                                    cptr(bias), mptr(out), ldo, nthreads);
    }
    check(st);
  });
  m.def("sparse_linear_bwd_cpu", [=](int dtype, I batch, I n_out, I n_in, I nnz, P row_ptr,
                                     P col_idx, P col_ptr, P row_idx, P perm, P values, P x, I ldx,
                                     P dout, I lddo, P dx, I lddx, P dvalues, int32_t nthreads) {
    kk_status st;
    {
      py::gil_scoped_release nogil;
      st = kk_sparse_linear_bwd_cpu(static_cast<kk_dtype>(dtype), batch, n_out, n_in, nnz,
                                    i64(row_ptr), i32(col_idx), i64(col_ptr), i32(row_idx),
                                    i64(perm), cptr(values), cptr(x), ldx, cptr(dout), lddo,
                                    mptr(dx), lddx, mptr(dvalues), nthreads);
    }
    check(st);
  });

  m.def("sparse_linear_fwd_cuda_workspace_size", [](int dtype, I batch, I n_out, I n_in, I nnz) {
    int64_t bytes = 0;
    check_cuda(cuda_fn(kk_sparse_linear_fwd_cuda_workspace_size)(static_cast<kk_dtype>(dtype), batch,
                                                                   n_out, n_in, nnz, &bytes));
    return bytes;
  });
  m.def("sparse_linear_fwd_cuda", [=](int dtype, I batch, I n_out, I n_in, I nnz, P row_ptr,
                                      P col_idx, P values, P x, I ldx, P bias, P out, I ldo, P ws,
                                      I ws_bytes, P stream) {
    check_cuda(cuda_fn(kk_sparse_linear_fwd_cuda)(
        static_cast<kk_dtype>(dtype), batch, n_out, n_in, nnz, i64(row_ptr), i32(col_idx),
        cptr(values), cptr(x), ldx, cptr(bias), mptr(out), ldo, mptr(ws), ws_bytes, mptr(stream)));
  });
  m.def("sparse_linear_bwd_cuda_workspace_size", [](int dtype, I batch, I n_out, I n_in, I nnz) {
    int64_t bytes = 0;
    check_cuda(cuda_fn(kk_sparse_linear_bwd_cuda_workspace_size)(static_cast<kk_dtype>(dtype), batch,
                                                                   n_out, n_in, nnz, &bytes));
    return bytes;
  });
  m.def("sparse_linear_bwd_cuda", [=](int dtype, I batch, I n_out, I n_in, I nnz, P row_ptr,
                                      P col_idx, P col_ptr, P row_idx, P perm, P values, P x, I ldx,
                                      P dout, I lddo, P dx, I lddx, P dvalues, P ws, I ws_bytes,
                                      P stream) {
    check_cuda(cuda_fn(kk_sparse_linear_bwd_cuda)(
        static_cast<kk_dtype>(dtype), batch, n_out, n_in, nnz, i64(row_ptr), i32(col_idx),
        i64(col_ptr), i32(row_idx), i64(perm), cptr(values), cptr(x), ldx, cptr(dout), lddo,
        mptr(dx), lddx, mptr(dvalues), mptr(ws), ws_bytes, mptr(stream)));
  });
}

}  // namespace kkpy
