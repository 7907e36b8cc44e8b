// CSR <-> dense conversions of the sparse family's dense path (csrc/include/kernelkit/sparse.h):
//   to_dense  out[r, c] = values[k] at the nonzeros (k in row r, c = col_idx[k]), 0 elsewhere
//   gather    values[k] = dense[r, col_idx[k]]              (to_dense's adjoint)
// Below the break-even sparsity the layer runs a dense GEMM on the scattered weight; these make the
// scatter (and its gradient) one streaming pass over the dense rows, parallel over rows, instead of
// an index_put through a materialised int64 flat index.  Element copies are bit copies, so one
// kernel per element size serves every dtype.  Memory-bound: one write (to_dense) or one sparse
// read (gather) of the dense matrix.
#include <omp.h>

#include <cstdint>
#include <cstring>

#include "kernelkit/sparse.h"
#include "status.h"

namespace {

template <typename T>
void to_dense(int64_t n_out, int64_t n_in, const int64_t* row_ptr, const int32_t* col_idx, const T* values,
              T* out, int64_t ldo, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < n_out; ++r) {
    T* row = out + r * ldo;
    std::memset(static_cast<void*>(row), 0, static_cast<size_t>(n_in) * sizeof(T));
    for (int64_t k = row_ptr[r]; k < row_ptr[r + 1]; ++k) row[col_idx[k]] = values[k];
  }
}

template <typename T>
void gather(int64_t n_out, const int64_t* row_ptr, const int32_t* col_idx, const T* dense, int64_t ldd,
            T* values, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < n_out; ++r) {
    const T* row = dense + r * ldd;
    for (int64_t k = row_ptr[r]; k < row_ptr[r + 1]; ++k) values[k] = row[col_idx[k]];
  }
}

size_t elem_size(kk_dtype dtype) {
  switch (dtype) {
    case KK_FLOAT32: return 4;
    case KK_FLOAT64: return 8;
    case KK_FLOAT16:
    case KK_BFLOAT16: return 2;
    default: return 0;
  }
}

// Checks shared by both conversions: dtype, sizes, the index, pointers, the dense row stride.
kk_status check(kk_dtype dtype, int64_t n_out, int64_t n_in, int64_t nnz, const int64_t* row_ptr,
                const int32_t* col_idx, const void* values, const void* dense, int64_t ld,
                const char* dense_name, const char* ld_name) {
  if (elem_size(dtype) == 0)
    return kk::fail(KK_ERR_UNSUPPORTED_DTYPE, "sparse conversion: dtype %d unsupported", (int)dtype);
  kk_status st = kk_sparse_check_csr(n_out, n_in, nnz, row_ptr, col_idx);
  if (st != KK_OK) return st;
  if (nnz > 0 && !values) return kk::fail(KK_ERR_NULL_POINTER, "values is NULL");
  if (n_out > 0 && n_in > 0 && !dense) return kk::fail(KK_ERR_NULL_POINTER, "%s is NULL", dense_name);
  if (ld < n_in)
    return kk::fail(KK_ERR_INVALID_ARGUMENT, "%s (%lld) must be >= the row width n_in = %lld", ld_name,
                    (long long)ld, (long long)n_in);
  return KK_OK;
}

int threads(int32_t requested) { return requested > 0 ? requested : omp_get_max_threads(); }

}  // namespace

extern "C" {

KK_API kk_status kk_sparse_to_dense_cpu(kk_dtype dtype, int64_t n_out, int64_t n_in, int64_t nnz,
                                        const int64_t* row_ptr, const int32_t* col_idx,
                                        const void* values, void* out, int64_t ldo, int32_t num_threads) {
  kk::clear_error();
  kk_status st = check(dtype, n_out, n_in, nnz, row_ptr, col_idx, values, out, ldo, "out", "ldo");
  if (st != KK_OK) return st;
  const int nt = threads(num_threads);
  switch (elem_size(dtype)) {
    case 8: to_dense(n_out, n_in, row_ptr, col_idx, static_cast<const uint64_t*>(values), static_cast<uint64_t*>(out), ldo, nt); break;
    case 4: to_dense(n_out, n_in, row_ptr, col_idx, static_cast<const uint32_t*>(values), static_cast<uint32_t*>(out), ldo, nt); break;
    default: to_dense(n_out, n_in, row_ptr, col_idx, static_cast<const uint16_t*>(values), static_cast<uint16_t*>(out), ldo, nt); break;
  }
  return KK_OK;
}

KK_API kk_status kk_sparse_gather_cpu(kk_dtype dtype, int64_t n_out, int64_t n_in, int64_t nnz,
                                      const int64_t* row_ptr, const int32_t* col_idx, const void* dense,
                                      int64_t ldd, void* values, int32_t num_threads) {
  kk::clear_error();
  kk_status st = check(dtype, n_out, n_in, nnz, row_ptr, col_idx, values, dense, ldd, "dense", "ldd");
  if (st != KK_OK) return st;
  const int nt = threads(num_threads);
  switch (elem_size(dtype)) {
    case 8: gather(n_out, row_ptr, col_idx, static_cast<const uint64_t*>(dense), ldd, static_cast<uint64_t*>(values), nt); break;
    case 4: gather(n_out, row_ptr, col_idx, static_cast<const uint32_t*>(dense), ldd, static_cast<uint32_t*>(values), nt); break;
    default: gather(n_out, row_ptr, col_idx, static_cast<const uint16_t*>(dense), ldd, static_cast<uint16_t*>(values), nt); break;
  }
  return KK_OK;
}

}  // extern "C"
