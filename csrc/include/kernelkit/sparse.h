/*
 * kernelkit public C ABI, sparse family: a linear layer whose weight is unstructured-sparse.
 * Included by kernelkit.h (and includes it), so either header gives the whole ABI.
 *
 * The weight W (n_out x n_in) is stored in CSR, with 64-bit row offsets and 32-bit column indices:
 *
 *   row_ptr  int64 [n_out + 1]   row_ptr[0] = 0, nondecreasing, row_ptr[n_out] = nnz
 *   col_idx  int32 [nnz]         in [0, n_in), strictly increasing within each row
 *   values   dtype [nnz]         W[r, col_idx[k]] = values[k] for row_ptr[r] <= k < row_ptr[r+1]
 *
 * The backward to x needs W^T by rows, i.e. W by columns (CSC).  It is kept as an index into the
 * same values, so the values are never copied or transposed and there are no atomics:
 *
 *   col_ptr  int64 [n_in + 1]    col_ptr[0] = 0, nondecreasing, col_ptr[n_in] = nnz
 *   row_idx  int32 [nnz]         in [0, n_out), strictly increasing within each column
 *   perm     int64 [nnz]         the k-th entry in column order is values[perm[k]] (a permutation)
 *
 * kk_sparse_csr_transpose_cpu builds (col_ptr, row_idx, perm) from (row_ptr, col_idx).
 *
 * Math (b over the batch rows; accumulation in float32 for float16/bfloat16, else in the dtype):
 *   forward     out[b, r]   = bias[r] + sum_k values[k] * x[b, col_idx[k]]       (k in row r)
 *   backward    dx[b, c]    = sum_k values[perm[k]] * dout[b, row_idx[k]]         (k in column c)
 *               dvalues[k]  = sum_b dout[b, r] * x[b, col_idx[k]]                 (k in row r: SDDMM)
 * x (batch, n_in), out and dout (batch, n_out), dx (batch, n_in): row-major, inner stride 1, row
 * strides ldx / ldo / lddo / lddx >= the width.  bias may be NULL (no bias).  In the backward, dx
 * or dvalues may be NULL (not wanted); pointers only the wanted outputs read may be NULL too.
 * dx and dvalues are overwritten, not accumulated.  nnz = 0 (an all-zero weight) is valid: the
 * forward writes bias (or zeros), dx is zero.  batch = 0 is valid: dvalues is zero.
 *
 * The CPU entry points check the index arrays (bounds, order, ptr[0] = 0, ptr[end] = nnz, perm in
 * range) in O(nnz + n_out + n_in) before any kernel reads through them, and return
 * KK_ERR_INVALID_ARGUMENT naming the array and the position.  The CUDA entry points cannot read
 * device memory from the host and trust the indices: check them with kk_sparse_check_csr on the
 * host before copying them to the device.
 *
 * Names follow kk_<family>_<op>_<fwd|bwd>_<cpu|cuda>; the op is "linear".
 */
#ifndef KERNELKIT_SPARSE_H_
#define KERNELKIT_SPARSE_H_

#include "kernelkit/kernelkit.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Checks a CSR (or CSC) index of an n_rows x n_cols matrix with nnz entries, on the host:
 * ptr[0] = 0, nondecreasing, ptr[n_rows] = nnz, every idx in [0, n_cols) and strictly increasing
 * within a row.  KK_OK or KK_ERR_INVALID_ARGUMENT / KK_ERR_INVALID_SIZE / KK_ERR_NULL_POINTER with
 * the first violation in kk_last_error().  idx may be NULL when nnz = 0. */
KK_API kk_status kk_sparse_check_csr(int64_t n_rows, int64_t n_cols, int64_t nnz, const int64_t* ptr,
                                     const int32_t* idx);

/* Builds the transposed index (col_ptr [n_in+1], row_idx [nnz], perm [nnz]) of a CSR matrix
 * n_out x n_in, after checking it as kk_sparse_check_csr does.  Outputs are caller-allocated. */
KK_API kk_status kk_sparse_csr_transpose_cpu(int64_t n_out, int64_t n_in, int64_t nnz,
                                             const int64_t* row_ptr, const int32_t* col_idx,
                                             int64_t* col_ptr, int32_t* row_idx, int64_t* perm);

/* Conversions for the dense path (below the break-even sparsity a dense GEMM is faster), checked
 * like kk_sparse_check_csr:
 *   to_dense  out[r, c] = values[k] at the nonzeros, 0 elsewhere      out (n_out, n_in), row stride ldo
 *   gather    values[k] = dense[r, col_idx[k]]                          dense (n_out, n_in), row stride ldd
 * (gather is to_dense's adjoint: the gradient of a dense weight sampled at the nonzeros).
 * dtypes KK_FLOAT32, KK_FLOAT64, KK_FLOAT16, KK_BFLOAT16 (bit copies). */
KK_API kk_status kk_sparse_to_dense_cpu(kk_dtype dtype, int64_t n_out, int64_t n_in, int64_t nnz,
                                        const int64_t* row_ptr, const int32_t* col_idx,
                                        const void* values, void* out, int64_t ldo, int32_t num_threads);

KK_API kk_status kk_sparse_gather_cpu(kk_dtype dtype, int64_t n_out, int64_t n_in, int64_t nnz,
                                      const int64_t* row_ptr, const int32_t* col_idx, const void* dense,
                                      int64_t ldd, void* values, int32_t num_threads);

/* CPU dtypes: KK_FLOAT32, KK_FLOAT64.  num_threads <= 0 uses the OpenMP default. */
KK_API kk_status kk_sparse_linear_fwd_cpu(kk_dtype dtype, int64_t batch, int64_t n_out, int64_t n_in,
                                          int64_t nnz, const int64_t* row_ptr, const int32_t* col_idx,
                                          const void* values, const void* x, int64_t ldx,
                                          const void* bias, void* out, int64_t ldo,
                                          int32_t num_threads);

KK_API kk_status kk_sparse_linear_bwd_cpu(kk_dtype dtype, int64_t batch, int64_t n_out, int64_t n_in,
                                          int64_t nnz, const int64_t* row_ptr, const int32_t* col_idx,
                                          const int64_t* col_ptr, const int32_t* row_idx,
                                          const int64_t* perm, const void* values, const void* x,
                                          int64_t ldx, const void* dout, int64_t lddo, void* dx,
                                          int64_t lddx, void* dvalues, int32_t num_threads);

/* CUDA versions (libkernelkit_cuda).  dtypes: KK_FLOAT32, KK_FLOAT16, KK_BFLOAT16 (float32
 * accumulation).  Index arrays are device pointers and are trusted (see above).  Each call needs a
 * device workspace of the bytes its *_workspace_size reports (may be 0, then workspace may be
 * NULL), 16-byte aligned; the caller owns it. */
KK_API kk_status kk_sparse_linear_fwd_cuda_workspace_size(kk_dtype dtype, int64_t batch, int64_t n_out,
                                                          int64_t n_in, int64_t nnz, int64_t* bytes);

KK_API kk_status kk_sparse_linear_fwd_cuda(kk_dtype dtype, int64_t batch, int64_t n_out, int64_t n_in,
                                           int64_t nnz, const int64_t* row_ptr, const int32_t* col_idx,
                                           const void* values, const void* x, int64_t ldx,
                                           const void* bias, void* out, int64_t ldo, void* workspace,
                                           int64_t workspace_bytes, void* stream);

KK_API kk_status kk_sparse_linear_bwd_cuda_workspace_size(kk_dtype dtype, int64_t batch, int64_t n_out,
                                                          int64_t n_in, int64_t nnz, int64_t* bytes);

KK_API kk_status kk_sparse_linear_bwd_cuda(kk_dtype dtype, int64_t batch, int64_t n_out, int64_t n_in,
                                           int64_t nnz, const int64_t* row_ptr, const int32_t* col_idx,
                                           const int64_t* col_ptr, const int32_t* row_idx,
                                           const int64_t* perm, const void* values, const void* x,
                                           int64_t ldx, const void* dout, int64_t lddo, void* dx,
                                           int64_t lddx, void* dvalues, void* workspace,
                                           int64_t workspace_bytes, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* KERNELKIT_SPARSE_H_ */
