// sparse: kernelkit_sparse_linear_fwd / kernelkit_sparse_linear_bwd (kk_sparse_linear_{fwd,bwd}_{cpu,cuda}).
//   fwd: x (rows, n_in), values (nnz), bias (n_out) or (0) for none, row_ptr (n_out+1), col_idx (nnz)
//        -> out (rows, n_out)
//   bwd: x, values, row_ptr, col_idx, col_ptr (n_in+1), row_idx (nnz), perm (nnz), dout (rows, n_out)
//        -> dx (rows, n_in), dvalues (nnz)
// Index dtypes: col_idx and row_idx int32 (as the C ABI takes them); row_ptr, col_ptr and perm int64,
// or int32 (JAX without x64), which the CPU handlers widen into host vectors before the call (O(n_out
// + n_in + nnz), once per call when the index is not batched).  The CUDA handlers take int64 only (the
// Python wrapper says so at trace time).  n_in is x's last dim; n_out = len(row_ptr) - 1.
#include <cstring>

#include "common.h"

namespace kkjax {
namespace {

bool is_index(ffi::DataType t) { return t == ffi::DataType::S32 || t == ffi::DataType::S64; }

struct Shape {
  int64_t rows, n_in, n_out, nnz;
};

ffi::Error shape_of(const ffi::AnyBuffer& x, const ffi::AnyBuffer& values, const ffi::AnyBuffer& row_ptr,
                    const ffi::AnyBuffer& col_idx, Shape* s) {
  auto xd = x.dimensions();
  if (xd.size() < 2 || values.dimensions().size() < 1 || row_ptr.dimensions().size() < 1 ||
      col_idx.dimensions().size() < 1)
    return ffi::Error::InvalidArgument("kernelkit: sparse_linear: x must be 2-D, values and the index 1-D");
  if (col_idx.element_type() != ffi::DataType::S32)
    return ffi::Error::InvalidArgument("kernelkit: sparse_linear: col_idx must be int32");
  if (!is_index(row_ptr.element_type()))
    return ffi::Error::InvalidArgument("kernelkit: sparse_linear: row_ptr must be int64 or int32");
  s->rows = xd[xd.size() - 2];
  s->n_in = xd[xd.size() - 1];
  s->n_out = last_dim(row_ptr) - 1;
  s->nnz = last_dim(col_idx);
  if (s->n_out < 0)
    return ffi::Error::InvalidArgument("kernelkit: sparse_linear: row_ptr must have n_out+1 >= 1 entries");
  if (last_dim(values) != s->nnz)
    return ffi::Error::InvalidArgument("kernelkit: sparse_linear: values and col_idx must have nnz entries each");
  return ffi::Error::Success();
}

ffi::Error Fwd(ffi::AnyBuffer x, ffi::AnyBuffer values, ffi::AnyBuffer bias, ffi::AnyBuffer row_ptr,
               ffi::AnyBuffer col_idx, ffi::Result<ffi::AnyBuffer> out KK_JAX_DEVICE_PARAMS) {
  kk_dtype dt;
  if (!to_kk(x.element_type(), &dt)) return dtype_error("sparse_linear x");
  Shape s;
  if (auto e = shape_of(x, values, row_ptr, col_idx, &s); e.failure()) return e;
  const int64_t nb = last_dim(bias);
  if (nb != 0 && nb != s.n_out)
    return ffi::Error::InvalidArgument("kernelkit: sparse_linear: bias must have n_out entries (or 0 for none)");
  const bool has_bias = nb != 0;
  Lead lead;
  if (!lead.add(x, 2, "x") || !lead.add(values, 1, "values") || !lead.add(bias, 1, "bias") ||
      !lead.add(row_ptr, 1, "row_ptr") || !lead.add(col_idx, 1, "col_idx") || !lead.add(out, 2, "out"))
    return lead.as_error();
  // Only x (and out) batched: the batch folds into the rows, one call in all.
  const bool fold = !lead.batched(1) && !lead.batched(2) && !lead.batched(3) && !lead.batched(4);
  const int64_t calls = fold ? 1 : lead.count();
  const int64_t rows = fold ? s.rows * lead.count() : s.rows;
#if KK_JAX_CUDA
  if (row_ptr.element_type() != ffi::DataType::S64)
    return ffi::Error::InvalidArgument(
        "kernelkit: sparse_linear: on CUDA row_ptr must be int64 (enable jax_enable_x64)");
  int64_t ws_bytes = 0;
  KK_JAX_CHECK(kk_sparse_linear_fwd_cuda_workspace_size(dt, rows, s.n_out, s.n_in, s.nnz, &ws_bytes),
               "sparse_linear_fwd");
  void* ws = scratch_bytes(scratch, ws_bytes);
  if (ws_bytes > 0 && ws == nullptr)
    return ffi::Error::Internal("kernelkit: sparse_linear_fwd: scratch allocation failed");
#else
  std::vector<int64_t> rp_tmp;
  const int64_t* rp = nullptr;
#endif
  for (int64_t b = 0; b < calls; ++b) {
    const void* bp = has_bias ? lead.ptr(2, b) : nullptr;
#if KK_JAX_CUDA
    KK_JAX_CHECK(kk_sparse_linear_fwd_cuda(dt, rows, s.n_out, s.n_in, s.nnz,
                                           static_cast<const int64_t*>(lead.ptr(3, b)),
                                           static_cast<const int32_t*>(lead.ptr(4, b)), lead.ptr(1, b),
                                           lead.ptr(0, b), s.n_in, bp, lead.ptr(5, b), s.n_out, ws, ws_bytes, stream),
                 "sparse_linear_fwd");
#else
    if (rp == nullptr || lead.batched(3)) rp = as_int64(row_ptr.element_type(), lead.ptr(3, b), s.n_out + 1, rp_tmp);
    KK_JAX_CHECK(kk_sparse_linear_fwd_cpu(dt, rows, s.n_out, s.n_in, s.nnz, rp,
                                          static_cast<const int32_t*>(lead.ptr(4, b)), lead.ptr(1, b),
                                          lead.ptr(0, b), s.n_in, bp, lead.ptr(5, b), s.n_out, 0),
                 "sparse_linear_fwd");
#endif
  }
  return ffi::Error::Success();
}

ffi::Error Bwd(ffi::AnyBuffer x, ffi::AnyBuffer values, ffi::AnyBuffer row_ptr, ffi::AnyBuffer col_idx,
               ffi::AnyBuffer col_ptr, ffi::AnyBuffer row_idx, ffi::AnyBuffer perm, ffi::AnyBuffer dout,
               ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dvalues KK_JAX_DEVICE_PARAMS) {
  kk_dtype dt;
  if (!to_kk(x.element_type(), &dt)) return dtype_error("sparse_linear x");
  Shape s;
  if (auto e = shape_of(x, values, row_ptr, col_idx, &s); e.failure()) return e;
  if (row_idx.element_type() != ffi::DataType::S32)
    return ffi::Error::InvalidArgument("kernelkit: sparse_linear: row_idx must be int32");
  if (!is_index(col_ptr.element_type()) || !is_index(perm.element_type()))
    return ffi::Error::InvalidArgument("kernelkit: sparse_linear: col_ptr and perm must be int64 or int32");
  if (last_dim(col_ptr) != s.n_in + 1 || last_dim(row_idx) != s.nnz || last_dim(perm) != s.nnz)
    return ffi::Error::InvalidArgument(
        "kernelkit: sparse_linear: col_ptr must have n_in+1 entries, row_idx and perm nnz");
  Lead lead;
  if (!lead.add(x, 2, "x") || !lead.add(values, 1, "values") || !lead.add(row_ptr, 1, "row_ptr") ||
      !lead.add(col_idx, 1, "col_idx") || !lead.add(col_ptr, 1, "col_ptr") || !lead.add(row_idx, 1, "row_idx") ||
      !lead.add(perm, 1, "perm") || !lead.add(dout, 2, "dout") || !lead.add(dx, 2, "dx") ||
      !lead.add(dvalues, 1, "dvalues"))
    return lead.as_error();
#if KK_JAX_CUDA
  if (row_ptr.element_type() != ffi::DataType::S64 || col_ptr.element_type() != ffi::DataType::S64 ||
      perm.element_type() != ffi::DataType::S64)
    return ffi::Error::InvalidArgument(
        "kernelkit: sparse_linear: on CUDA row_ptr, col_ptr and perm must be int64 (enable jax_enable_x64)");
  int64_t ws_bytes = 0;
  KK_JAX_CHECK(kk_sparse_linear_bwd_cuda_workspace_size(dt, s.rows, s.n_out, s.n_in, s.nnz, &ws_bytes),
               "sparse_linear_bwd");
  void* ws = scratch_bytes(scratch, ws_bytes);
  if (ws_bytes > 0 && ws == nullptr)
    return ffi::Error::Internal("kernelkit: sparse_linear_bwd: scratch allocation failed");
#else
  std::vector<int64_t> rp_tmp, cp_tmp, pm_tmp;
  const int64_t *rp = nullptr, *cp = nullptr, *pm = nullptr;
#endif
  // dvalues is per batch element (vmap of a gradient), so no folding: one call per element.
  for (int64_t b = 0; b < lead.count(); ++b) {
#if KK_JAX_CUDA
    KK_JAX_CHECK(kk_sparse_linear_bwd_cuda(dt, s.rows, s.n_out, s.n_in, s.nnz,
                                           static_cast<const int64_t*>(lead.ptr(2, b)),
                                           static_cast<const int32_t*>(lead.ptr(3, b)),
                                           static_cast<const int64_t*>(lead.ptr(4, b)),
                                           static_cast<const int32_t*>(lead.ptr(5, b)),
                                           static_cast<const int64_t*>(lead.ptr(6, b)), lead.ptr(1, b),
                                           lead.ptr(0, b), s.n_in, lead.ptr(7, b), s.n_out, lead.ptr(8, b), s.n_in,
                                           lead.ptr(9, b), ws, ws_bytes, stream),
                 "sparse_linear_bwd");
#else
    if (rp == nullptr || lead.batched(2)) rp = as_int64(row_ptr.element_type(), lead.ptr(2, b), s.n_out + 1, rp_tmp);
    if (cp == nullptr || lead.batched(4)) cp = as_int64(col_ptr.element_type(), lead.ptr(4, b), s.n_in + 1, cp_tmp);
    if (pm == nullptr || lead.batched(6)) pm = as_int64(perm.element_type(), lead.ptr(6, b), s.nnz, pm_tmp);
    KK_JAX_CHECK(kk_sparse_linear_bwd_cpu(dt, s.rows, s.n_out, s.n_in, s.nnz, rp,
                                          static_cast<const int32_t*>(lead.ptr(3, b)), cp,
                                          static_cast<const int32_t*>(lead.ptr(5, b)), pm, lead.ptr(1, b),
                                          lead.ptr(0, b), s.n_in, lead.ptr(7, b), s.n_out, lead.ptr(8, b), s.n_in,
                                          lead.ptr(9, b), 0),
                 "sparse_linear_bwd");
#endif
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace kkjax

// KK_JAX_DEVICE_CTX names ffi:: unqualified; the handler definitions below are at global scope.
namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(KkJaxSparseLinearFwd, kkjax::Fwd,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()   // x
                                  .Arg<xla::ffi::AnyBuffer>()   // values
                                  .Arg<xla::ffi::AnyBuffer>()   // bias, (0) for none
                                  .Arg<xla::ffi::AnyBuffer>()   // row_ptr
                                  .Arg<xla::ffi::AnyBuffer>()   // col_idx
                                  .Ret<xla::ffi::AnyBuffer>()   // out
                                  KK_JAX_DEVICE_CTX);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KkJaxSparseLinearBwd, kkjax::Bwd,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()   // x
                                  .Arg<xla::ffi::AnyBuffer>()   // values
                                  .Arg<xla::ffi::AnyBuffer>()   // row_ptr
                                  .Arg<xla::ffi::AnyBuffer>()   // col_idx
                                  .Arg<xla::ffi::AnyBuffer>()   // col_ptr
                                  .Arg<xla::ffi::AnyBuffer>()   // row_idx
                                  .Arg<xla::ffi::AnyBuffer>()   // perm
                                  .Arg<xla::ffi::AnyBuffer>()   // dout
                                  .Ret<xla::ffi::AnyBuffer>()   // dx
                                  .Ret<xla::ffi::AnyBuffer>()   // dvalues
                                  KK_JAX_DEVICE_CTX);
KK_JAX_TARGET("kernelkit_sparse_linear_fwd", KkJaxSparseLinearFwd);
KK_JAX_TARGET("kernelkit_sparse_linear_bwd", KkJaxSparseLinearBwd);
