// C ABI entry points of the CPU sparse-linear kernels (csrc/include/kernelkit/sparse.h): argument
// and index checks, the CSR -> CSC transpose, then dispatch to the kernels compiled for the best
// instruction set this CPU has (sparse.cpp, one copy per ISA).
//
// Every index array is checked in O(nnz + n_out + n_in) before any kernel reads through it, so a
// bad index returns KK_ERR_INVALID_ARGUMENT naming the array and the position instead of reading
// or writing out of bounds.  A pointer is required only when its array has elements (torch hands
// out NULL data pointers for empty tensors) and the requested outputs read it.
#include <omp.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <new>
#include <vector>

#include "api_common.h"
#include "isa.h"
#include "sparse_impl.h"
#include "status.h"

namespace kk {
namespace {

// How one compressed index is named in messages: CSR (row_ptr/col_idx, rows of W, n_in wide) or
// its transpose (col_ptr/row_idx, columns of W, n_out high), or the neutral ptr/idx of
// kk_sparse_check_csr.
struct IndexNames {
  const char* ptr;    // "row_ptr"
  const char* idx;    // "col_idx"
  const char* line;   // "row": what one ptr segment is
  const char* n_cols; // "n_in": the bound of idx
};
constexpr IndexNames kCsr{"row_ptr", "col_idx", "row", "n_in"};
constexpr IndexNames kCsc{"col_ptr", "row_idx", "column", "n_out"};
constexpr IndexNames kGeneric{"ptr", "idx", "row", "n_cols"};

// nnz <= n_rows * n_cols without overflowing the product.
kk_status check_nnz(int64_t n_rows, int64_t n_cols, int64_t nnz, const char* rows_name,
                    const char* cols_name) {
  KK_TRY(check_size(n_rows, rows_name));
  KK_TRY(check_size(n_cols, cols_name));
  KK_TRY(check_size(nnz, "nnz"));
  int64_t cap;
  if (!__builtin_mul_overflow(n_rows, n_cols, &cap) && nnz > cap)
    return fail(KK_ERR_INVALID_SIZE, "nnz (%lld) must be <= %s * %s = %lld * %lld", (long long)nnz,
                rows_name, cols_name, (long long)n_rows, (long long)n_cols);
  return KK_OK;
}

// The contents of a compressed index (sizes already checked): ptr[0] = 0, nondecreasing,
// ptr[n_rows] = nnz, idx in [0, n_cols) and strictly increasing within each line.  ptr is
// validated entirely before idx is read, so a bad ptr never leads to an out-of-range idx read.
kk_status check_index(const IndexNames& nm, int64_t n_rows, int64_t n_cols, int64_t nnz,
                      const int64_t* ptr, const int32_t* idx) {
  KK_TRY(check_ptr(ptr, nm.ptr));
  if (nnz > 0) KK_TRY(check_ptr(idx, nm.idx));
  if (ptr[0] != 0)
    return fail(KK_ERR_INVALID_ARGUMENT, "%s[0] must be 0, got %lld", nm.ptr, (long long)ptr[0]);
  for (int64_t r = 0; r < n_rows; ++r) {
    if (ptr[r + 1] < ptr[r])
      return fail(KK_ERR_INVALID_ARGUMENT, "%s must be nondecreasing: %s[%lld] = %lld < %s[%lld] = %lld",
                  nm.ptr, nm.ptr, (long long)(r + 1), (long long)ptr[r + 1], nm.ptr, (long long)r,
                  (long long)ptr[r]);
    if (ptr[r + 1] > nnz)
      return fail(KK_ERR_INVALID_ARGUMENT, "%s[%lld] = %lld is past nnz = %lld", nm.ptr,
                  (long long)(r + 1), (long long)ptr[r + 1], (long long)nnz);
  }
  if (ptr[n_rows] != nnz)
    return fail(KK_ERR_INVALID_ARGUMENT, "%s[%lld] (the last entry) must be nnz = %lld, got %lld",
                nm.ptr, (long long)n_rows, (long long)nnz, (long long)ptr[n_rows]);
  for (int64_t r = 0; r < n_rows; ++r) {
    int64_t prev = -1;
    for (int64_t k = ptr[r]; k < ptr[r + 1]; ++k) {
      const int64_t c = idx[k];
      if (c < 0 || c >= n_cols)
        return fail(KK_ERR_INVALID_ARGUMENT, "%s[%lld] = %lld (%s %lld) is out of range [0, %s = %lld)",
                    nm.idx, (long long)k, (long long)c, nm.line, (long long)r, nm.n_cols,
                    (long long)n_cols);
      if (c <= prev)
        return fail(KK_ERR_INVALID_ARGUMENT,
                    "%s must be strictly increasing within a %s: %s[%lld] = %lld follows %lld (%s %lld)",
                    nm.idx, nm.line, nm.idx, (long long)k, (long long)c, (long long)prev, nm.line,
                    (long long)r);
      prev = c;
    }
  }
  return KK_OK;
}

kk_status check_perm(int64_t nnz, const int64_t* perm) {
  if (nnz > 0) KK_TRY(check_ptr(perm, "perm"));
  for (int64_t k = 0; k < nnz; ++k)
    if (perm[k] < 0 || perm[k] >= nnz)
      return fail(KK_ERR_INVALID_ARGUMENT, "perm[%lld] = %lld is out of range [0, nnz = %lld)",
                  (long long)k, (long long)perm[k], (long long)nnz);
  return KK_OK;
}

// With both indexes given (dx and dvalues wanted: the fused backward writes dvalues through perm),
// perm must send each column-ordered entry (row_idx[k], column c) to the CSR entry of the same
// position: row_ptr[row] <= perm[k] < row_ptr[row + 1] and col_idx[perm[k]] = c.  With both indexes
// valid this also makes perm a permutation (positions are unique in each index), so every
// dvalues entry is written exactly once.
kk_status check_perm_matches(int64_t n_in, const int64_t* row_ptr, const int32_t* col_idx,
                             const int64_t* col_ptr, const int32_t* row_idx, const int64_t* perm,
                             int nt) {
  // Random reads of col_idx: the one check that is not a streaming pass, so it runs on the call's
  // threads (at batch 32 it was a sixth of the backward); the first bad position is reported.
  int64_t bad = INT64_MAX;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(min : bad)
  for (int64_t c = 0; c < n_in; ++c)
    for (int64_t k = col_ptr[c]; k < col_ptr[c + 1]; ++k) {
      const int64_t r = row_idx[k], p = perm[k];
      if (p < row_ptr[r] || p >= row_ptr[r + 1] || col_idx[p] != c) {
        bad = std::min(bad, k);
        break;
      }
    }
  if (bad == INT64_MAX) return KK_OK;
  const int64_t c = std::upper_bound(col_ptr, col_ptr + n_in + 1, bad) - col_ptr - 1;
  return fail(KK_ERR_INVALID_ARGUMENT,
              "perm[%lld] = %lld does not point at the CSR entry of (row %lld, column %lld): "
              "the column index (col_ptr, row_idx, perm) does not transpose (row_ptr, col_idx)",
              (long long)bad, (long long)perm[bad], (long long)row_idx[bad], (long long)c);
}

kk_status check_dtype(kk_dtype dtype) {
  return dtype == KK_FLOAT32 || dtype == KK_FLOAT64
             ? KK_OK
             : fail(KK_ERR_UNSUPPORTED_DTYPE, "sparse cpu: dtype %d unsupported (float32, float64)",
                    (int)dtype);
}

// The sizes every linear entry point checks first (batch, n_out, n_in, nnz).
kk_status check_sizes(int64_t batch, int64_t n_out, int64_t n_in, int64_t nnz) {
  KK_TRY(check_size(batch, "batch"));
  return check_nnz(n_out, n_in, nnz, "n_out", "n_in");
}

int threads(int32_t requested) { return requested > 0 ? requested : omp_get_max_threads(); }

template <typename Fn>
kk_status guarded(Fn&& fn) {
  return run_guarded("sparse", "out of host memory for packed tiles", fn);
}

}  // namespace
}  // namespace kk

using namespace kk;

extern "C" {

KK_API kk_status kk_sparse_check_csr(int64_t n_rows, int64_t n_cols, int64_t nnz, const int64_t* ptr,
                                     const int32_t* idx) {
  clear_error();
  KK_TRY(check_nnz(n_rows, n_cols, nnz, "n_rows", "n_cols"));
  return check_index(kGeneric, n_rows, n_cols, nnz, ptr, idx);
}

KK_API kk_status kk_sparse_csr_transpose_cpu(int64_t n_out, int64_t n_in, int64_t nnz,
                                             const int64_t* row_ptr, const int32_t* col_idx,
                                             int64_t* col_ptr, int32_t* row_idx, int64_t* perm) {
  clear_error();
  KK_TRY(check_nnz(n_out, n_in, nnz, "n_out", "n_in"));
  KK_TRY(check_index(kCsr, n_out, n_in, nnz, row_ptr, col_idx));
  KK_TRY(check_ptr(col_ptr, "col_ptr"));
  if (nnz > 0) {
    KK_TRY(check_ptr(row_idx, "row_idx"));
    KK_TRY(check_ptr(perm, "perm"));
  }
  // row_idx is int32: every row holding a nonzero must fit.
  for (int64_t r = n_out - 1; r > INT32_MAX; --r)
    if (row_ptr[r + 1] > row_ptr[r])
      return fail(KK_ERR_INVALID_SIZE, "row %lld holds nonzeros but row_idx is int32 (rows < 2^31)",
                  (long long)r);
  return guarded([&]() {
    // Counting sort by column, stable: rows are visited in order, so row_idx ascends per column.
    std::vector<int64_t> next(static_cast<size_t>(n_in), 0);
    for (int64_t k = 0; k < nnz; ++k) ++next[col_idx[k]];
    col_ptr[0] = 0;
    for (int64_t c = 0; c < n_in; ++c) {
      col_ptr[c + 1] = col_ptr[c] + next[c];
      next[c] = col_ptr[c];
    }
    for (int64_t r = 0; r < n_out; ++r)
      for (int64_t k = row_ptr[r]; k < row_ptr[r + 1]; ++k) {
        const int64_t pos = next[col_idx[k]]++;
        row_idx[pos] = static_cast<int32_t>(r);
        perm[pos] = k;
      }
    return KK_OK;
  });
}

KK_API kk_status kk_sparse_linear_fwd_cpu(kk_dtype dtype, int64_t batch, int64_t n_out, int64_t n_in,
                                          int64_t nnz, const int64_t* row_ptr, const int32_t* col_idx,
                                          const void* values, const void* x, int64_t ldx,
                                          const void* bias, void* out, int64_t ldo,
                                          int32_t num_threads) {
  clear_error();
  KK_TRY(check_dtype(dtype));
  KK_TRY(check_sizes(batch, n_out, n_in, nnz));
  if (nnz > 0) KK_TRY(check_ptr(values, "values"));
  if (batch > 0 && n_in > 0) {
    KK_TRY(check_ptr(x, "x"));
    KK_TRY(check_ld(ldx, n_in, "ldx", "n_in"));
  }
  if (batch > 0 && n_out > 0) {
    KK_TRY(check_ptr(out, "out"));
    KK_TRY(check_ld(ldo, n_out, "ldo", "n_out"));
  }
  KK_TRY(check_index(kCsr, n_out, n_in, nnz, row_ptr, col_idx));
  if (batch == 0 || n_out == 0) return KK_OK;  // nothing to write
  SparseArgs a{batch, n_out, n_in, nnz, row_ptr, col_idx, nullptr, nullptr, nullptr, values,
               x, ldx, bias, out, ldo, nullptr, 0, nullptr, 0, nullptr};
  const int nt = threads(num_threads);
  const Isa isa = active_isa();
  return guarded([&]() { return KK_DISPATCH(isa, sparse_fwd, dtype, a, nt); });
}

KK_API kk_status kk_sparse_linear_bwd_cpu(kk_dtype dtype, int64_t batch, int64_t n_out, int64_t n_in,
                                          int64_t nnz, const int64_t* row_ptr, const int32_t* col_idx,
                                          const int64_t* col_ptr, const int32_t* row_idx,
                                          const int64_t* perm, const void* values, const void* x,
                                          int64_t ldx, const void* dout, int64_t lddo, void* dx,
                                          int64_t lddx, void* dvalues, int32_t num_threads) {
  clear_error();
  KK_TRY(check_dtype(dtype));
  KK_TRY(check_sizes(batch, n_out, n_in, nnz));
  if (!dx && !dvalues) return KK_OK;  // nothing requested
  const bool want_dx = dx != nullptr && batch > 0 && n_in > 0;  // dx has elements to write
  const bool want_dv = dvalues != nullptr && nnz > 0;
  // dout is read by both outputs; x by dvalues only; values and the CSC index by dx only.
  if (batch > 0 && n_out > 0 && (want_dx || want_dv)) {
    KK_TRY(check_ptr(dout, "dout"));
    KK_TRY(check_ld(lddo, n_out, "lddo", "n_out"));
  }
  if (want_dv && batch > 0 && n_in > 0) {
    KK_TRY(check_ptr(x, "x"));
    KK_TRY(check_ld(ldx, n_in, "ldx", "n_in"));
  }
  if (want_dx) {
    KK_TRY(check_ld(lddx, n_in, "lddx", "n_in"));
    if (nnz > 0) KK_TRY(check_ptr(values, "values"));
  }
  if (dvalues) KK_TRY(check_index(kCsr, n_out, n_in, nnz, row_ptr, col_idx));
  if (dx) {
    KK_TRY(check_index(kCsc, n_in, n_out, nnz, col_ptr, row_idx));
    KK_TRY(check_perm(nnz, perm));
    if (dvalues && batch > 0 && nnz > 0)  // the fused path below
      KK_TRY(check_perm_matches(n_in, row_ptr, col_idx, col_ptr, row_idx, perm, threads(num_threads)));
  }
  const size_t esize = dtype == KK_FLOAT32 ? sizeof(float) : sizeof(double);
  if (dvalues && (batch == 0 || nnz == 0)) {  // empty batch: the value gradients are zero
    if (nnz > 0) std::memset(dvalues, 0, static_cast<size_t>(nnz) * esize);
    dvalues = nullptr;
  }
  if (!want_dx) dx = nullptr;
  if (!dx && !dvalues) return KK_OK;
  SparseArgs a{batch, n_out, n_in, nnz, row_ptr, col_idx, col_ptr, row_idx, perm, values,
               x, ldx, nullptr, nullptr, 0, dout, lddo, dx, lddx, dvalues};
  const int nt = threads(num_threads);
  const Isa isa = active_isa();
  return guarded([&]() { return KK_DISPATCH(isa, sparse_bwd, dtype, a, nt); });
}

}  // extern "C"
