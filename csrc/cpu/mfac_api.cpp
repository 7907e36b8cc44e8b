// C ABI entry points of the CPU mfac kernels (csrc/include/kernelkit/mfac.h): dtype, size, block,
// stride, scalar, pointer and aliasing checks (every message names the argument), the int64 extents
// of every array, the finiteness of an inserted row (checked in a first pass, before G is written)
// and of newcol, then dispatch to the kernels compiled for the best instruction set this CPU has
// (mfac.cpp, one copy per ISA).  A pointer is required only when its array has elements the call
// reads or writes (torch hands out NULL data pointers for empty tensors).
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "api_common.h"
#include "isa.h"
#include "mfac_impl.h"
#include "status.h"

namespace kk {
namespace {

int threads(int32_t requested) { return requested > 0 ? requested : omp_get_max_threads(); }

kk_status check_gdtype(kk_dtype dt, const char* name) {
  return dt == KK_FLOAT32 || dt == KK_BFLOAT16 || dt == KK_FLOAT64
             ? KK_OK
             : fail(KK_ERR_UNSUPPORTED_DTYPE, "mfac cpu: %s %d unsupported (KK_FLOAT32, KK_BFLOAT16, KK_FLOAT64)",
                    name, (int)dt);
}

int64_t elem_size(kk_dtype dt) { return dt == KK_FLOAT64 ? 8 : dt == KK_FLOAT32 ? 4 : 2; }
kk_dtype vec_dtype(kk_dtype gdt) { return gdt == KK_FLOAT64 ? KK_FLOAT64 : KK_FLOAT32; }

kk_status checked_mul(int64_t a, int64_t b, int64_t* r, const char* what) {
  if (__builtin_mul_overflow(a, b, r))
    return fail(KK_ERR_INVALID_SIZE, "mfac: %s overflows int64 (%lld * %lld)", what, (long long)a, (long long)b);
  return KK_OK;
}

// Elements spanned by `rows` rows of `width` at stride ld (0 when empty), overflow-checked.
kk_status extent(int64_t rows, int64_t width, int64_t ld, int64_t* e, const char* what) {
  *e = 0;
  if (rows == 0 || width == 0) return KK_OK;
  KK_TRY(checked_mul(rows - 1, ld, e, what));
  if (__builtin_add_overflow(*e, width, e)) return fail(KK_ERR_INVALID_SIZE, "mfac: %s overflows int64", what);
  return KK_OK;
}

kk_status check_block(int64_t block) {
  return block >= 1 ? KK_OK : fail(KK_ERR_INVALID_ARGUMENT, "block must be >= 1, got %lld", (long long)block);
}

kk_status check_damp(double damp) {
  return std::isfinite(damp) && damp > 0 ? KK_OK
                                         : fail(KK_ERR_INVALID_ARGUMENT, "damp must be finite and > 0, got %g", damp);
}

int64_t nblocks_of(int64_t d, int64_t block) { return d == 0 ? 0 : (d - 1) / block + 1; }

bool overlap(const void* a, int64_t abytes, const void* b, int64_t bbytes) {
  if (!a || !b || abytes == 0 || bbytes == 0) return false;
  const uintptr_t pa = (uintptr_t)a, pb = (uintptr_t)b;
  return pa < pb + (uintptr_t)bbytes && pb < pa + (uintptr_t)abytes;
}

// The (nvec, nblocks, r) float64 array size, overflow-checked.
kk_status qsize(int64_t nvec, int64_t d, int64_t block, int64_t r, int64_t* n) {
  int64_t t;
  KK_TRY(checked_mul(nvec, nblocks_of(d, block), &t, "nvec * nblocks"));
  KK_TRY(checked_mul(t, r, n, "nvec * nblocks * r"));
  KK_TRY(checked_mul(*n, 8, &t, "the q / c byte size"));
  return KK_OK;
}

template <typename Fn>
kk_status guarded(Fn&& fn) {
  return run_guarded("mfac", "out of host memory for work buffers", fn);
}

}  // namespace
}  // namespace kk

using namespace kk;

extern "C" {

KK_API int64_t kk_mfac_static_rows(int64_t m, int64_t d, int64_t block) {
  if (m < 0 || d < 0 || block < 1) return -1;
  if (m == 0 || d == 0) return 0;
  const int64_t B = block < d ? block : d;
  return m <= B ? m : B;
}

KK_API kk_status kk_mfac_dots_cpu(kk_dtype gdtype, int64_t r, int64_t d, int64_t block, void* G, int64_t ldg,
                                  int64_t nvec, const void* x, int64_t ldx, int64_t insert_row, double* q,
                                  double* qr, int32_t num_threads) {
  clear_error();
  KK_TRY(check_gdtype(gdtype, "gdtype"));
  KK_TRY(check_size(r, "r"));
  KK_TRY(check_size(d, "d"));
  KK_TRY(check_size(nvec, "nvec"));
  KK_TRY(check_block(block));
  KK_TRY(check_ld(ldg, d, "ldg", "d"));
  KK_TRY(check_ld(ldx, d, "ldx", "d"));
  int64_t eg, ex, nq, t;
  KK_TRY(extent(r, d, ldg, &eg, "the extent of G"));
  KK_TRY(checked_mul(eg, elem_size(gdtype), &t, "the byte extent of G"));
  KK_TRY(extent(nvec, d, ldx, &ex, "the extent of x"));
  KK_TRY(checked_mul(ex, 8, &t, "the byte extent of x"));
  KK_TRY(qsize(nvec, d, block, r, &nq));
  if (insert_row >= 0) {
    if (nvec != 1)
      return fail(KK_ERR_INVALID_ARGUMENT, "insert_row = %lld needs nvec == 1, got nvec = %lld", (long long)insert_row,
                  (long long)nvec);
    if (insert_row >= r)
      return fail(KK_ERR_INVALID_ARGUMENT, "insert_row (%lld) must be < r = %lld", (long long)insert_row, (long long)r);
  }
  if (nq == 0 && insert_row < 0) return KK_OK;  // nothing is read or written
  if (d > 0) {
    KK_TRY(check_ptr(G, "G"));
    KK_TRY(check_ptr(x, "x"));
  }
  if (nq > 0) KK_TRY(check_ptr(q, "q"));
  if (insert_row >= 0 && d > 0) {  // first pass: the new row must be finite before G is written
    if (gdtype == KK_FLOAT64) {
      const double* xv = static_cast<const double*>(x);
      for (int64_t j = 0; j < d; ++j)
        if (!std::isfinite(xv[j]))
          return fail(KK_ERR_INVALID_ARGUMENT, "x[%lld] = %g is not finite: the row is not inserted (G unchanged)",
                      (long long)j, xv[j]);
    } else {
      const float* xv = static_cast<const float*>(x);
      for (int64_t j = 0; j < d; ++j)
        if (!std::isfinite(xv[j]))
          return fail(KK_ERR_INVALID_ARGUMENT, "x[%lld] = %g is not finite: the row is not inserted (G unchanged)",
                      (long long)j, (double)xv[j]);
    }
  }
  const int nt = threads(num_threads);
  const Isa isa = active_isa();
  return guarded([&]() {
    return KK_DISPATCH(isa, mfac_dots, gdtype, r, d, block, G, ldg, nvec, x, ldx, insert_row, q,
                       insert_row >= 0 ? qr : nullptr, nt);
  });
}

KK_API kk_status kk_mfac_combine_cpu(kk_dtype gdtype, int64_t r, int64_t d, int64_t block, const void* G,
                                     int64_t ldg, int64_t nvec, double alpha, const void* x, int64_t ldx,
                                     const double* c, void* out, int64_t ldo, int32_t num_threads) {
  clear_error();
  KK_TRY(check_gdtype(gdtype, "gdtype"));
  KK_TRY(check_size(r, "r"));
  KK_TRY(check_size(d, "d"));
  KK_TRY(check_size(nvec, "nvec"));
  KK_TRY(check_block(block));
  KK_TRY(check_ld(ldg, d, "ldg", "d"));
  KK_TRY(check_ld(ldo, d, "ldo", "d"));
  if (x) KK_TRY(check_ld(ldx, d, "ldx", "d"));
  int64_t eg, ex = 0, eo, nc, t;
  const int64_t vs = elem_size(vec_dtype(gdtype));
  KK_TRY(extent(r, d, ldg, &eg, "the extent of G"));
  KK_TRY(checked_mul(eg, elem_size(gdtype), &t, "the byte extent of G"));
  if (x) KK_TRY(extent(nvec, d, ldx, &ex, "the extent of x"));
  KK_TRY(checked_mul(ex, vs, &t, "the byte extent of x"));
  KK_TRY(extent(nvec, d, ldo, &eo, "the extent of out"));
  KK_TRY(checked_mul(eo, vs, &t, "the byte extent of out"));
  KK_TRY(qsize(nvec, d, block, r, &nc));
  if (nvec == 0 || d == 0) return KK_OK;
  KK_TRY(check_ptr(out, "out"));
  if (r > 0) {
    KK_TRY(check_ptr(G, "G"));
    KK_TRY(check_ptr(c, "c"));
  }
  if (x == out) {
    if (ldx != ldo)
      return fail(KK_ERR_INVALID_ARGUMENT, "out is x but ldo (%lld) != ldx (%lld): in place needs the same stride",
                  (long long)ldo, (long long)ldx);
  } else if (overlap(x, ex * vs, out, eo * vs)) {
    return fail(KK_ERR_INVALID_ARGUMENT, "out overlaps x (only out == x with ldo == ldx is allowed)");
  }
  if (overlap(c, nc * 8, out, eo * vs)) return fail(KK_ERR_INVALID_ARGUMENT, "out overlaps c");
  if (r > 0 && overlap(G, eg * elem_size(gdtype), out, eo * vs))
    return fail(KK_ERR_INVALID_ARGUMENT, "out overlaps G");
  const int nt = threads(num_threads);
  const Isa isa = active_isa();
  return guarded([&]() {
    return KK_DISPATCH(isa, mfac_combine, gdtype, r, d, block, G, ldg, nvec, alpha, x, ldx, c, out, ldo, nt);
  });
}

KK_API kk_status kk_mfac_diag_cpu(kk_dtype zdtype, int64_t r, int64_t d, const void* Z, int64_t ldz, double alpha,
                                  double beta, void* out, int32_t num_threads) {
  clear_error();
  KK_TRY(check_gdtype(zdtype, "zdtype"));
  KK_TRY(check_size(r, "r"));
  KK_TRY(check_size(d, "d"));
  KK_TRY(check_ld(ldz, d, "ldz", "d"));
  int64_t ez, t;
  KK_TRY(extent(r, d, ldz, &ez, "the extent of Z"));
  KK_TRY(checked_mul(ez, elem_size(zdtype), &t, "the byte extent of Z"));
  if (d == 0) return KK_OK;
  KK_TRY(check_ptr(out, "out"));
  if (r > 0) KK_TRY(check_ptr(Z, "Z"));
  if (r > 0 && overlap(Z, ez * elem_size(zdtype), out, d * elem_size(vec_dtype(zdtype))))
    return fail(KK_ERR_INVALID_ARGUMENT, "out overlaps Z");
  const int nt = threads(num_threads);
  const Isa isa = active_isa();
  return guarded([&]() { return KK_DISPATCH(isa, mfac_diag, zdtype, r, d, Z, ldz, alpha, beta, out, nt); });
}

KK_API kk_status kk_mfac_static_setup_cpu(kk_dtype gdtype, int64_t m, int64_t d, int64_t block, const void* G,
                                          int64_t ldg, double damp, void* Z, int64_t ldz, int32_t num_threads) {
  clear_error();
  KK_TRY(check_gdtype(gdtype, "gdtype"));
  KK_TRY(check_size(m, "m"));
  KK_TRY(check_size(d, "d"));
  KK_TRY(check_block(block));
  KK_TRY(check_ld(ldg, d, "ldg", "d"));
  KK_TRY(check_ld(ldz, d, "ldz", "d"));
  KK_TRY(check_damp(damp));
  const int64_t r = kk_mfac_static_rows(m, d, block);
  const kk_dtype zdt = vec_dtype(gdtype);
  int64_t eg, ez, t;
  KK_TRY(extent(m, d, ldg, &eg, "the extent of G"));
  KK_TRY(checked_mul(eg, elem_size(gdtype), &t, "the byte extent of G"));
  KK_TRY(extent(r, d, ldz, &ez, "the extent of Z"));
  KK_TRY(checked_mul(ez, elem_size(zdt), &t, "the byte extent of Z"));
  KK_TRY(checked_mul(m, m, &t, "m * m"));
  if (r == 0) return KK_OK;
  KK_TRY(check_ptr(G, "G"));
  KK_TRY(check_ptr(Z, "Z"));
  if (Z == G) {
    if (gdtype == KK_BFLOAT16)
      return fail(KK_ERR_INVALID_ARGUMENT,
                  "Z is G but gdtype is bfloat16 (Z is float32): Z may alias G only for float32 / float64");
    if (ldz != ldg)
      return fail(KK_ERR_INVALID_ARGUMENT, "Z is G but ldz (%lld) != ldg (%lld): aliasing needs the same stride",
                  (long long)ldz, (long long)ldg);
  } else if (overlap(G, eg * elem_size(gdtype), Z, ez * elem_size(zdt))) {
    return fail(KK_ERR_INVALID_ARGUMENT, "Z overlaps G (only Z == G with ldz == ldg is allowed)");
  }
  const int nt = threads(num_threads);
  const Isa isa = active_isa();
  return guarded([&]() { return KK_DISPATCH(isa, mfac_static_setup, gdtype, m, d, block, G, ldg, damp, Z, ldz, nt); });
}

KK_API kk_status kk_mfac_window_update_cpu(int64_t m, double damp, double* gram, double* kinv, int64_t row,
                                           const double* newcol, int32_t num_threads) {
  clear_error();
  KK_TRY(check_size(m, "m"));
  KK_TRY(check_damp(damp));
  int64_t t;
  KK_TRY(checked_mul(m, m, &t, "m * m"));
  KK_TRY(checked_mul(t, 8, &t, "the byte size of gram"));
  if (row < 0 || row >= m)
    return fail(KK_ERR_INVALID_ARGUMENT, "row must be in [0, m = %lld), got %lld", (long long)m, (long long)row);
  KK_TRY(check_ptr(gram, "gram"));
  KK_TRY(check_ptr(kinv, "kinv"));
  KK_TRY(check_ptr(newcol, "newcol"));
  if (gram == kinv || overlap(gram, m * m * 8, kinv, m * m * 8))
    return fail(KK_ERR_INVALID_ARGUMENT, "gram and kinv overlap");
  for (int64_t i = 0; i < m; ++i)
    if (!std::isfinite(newcol[i]))
      return fail(KK_ERR_INVALID_ARGUMENT, "newcol[%lld] = %g is not finite (nothing changed)", (long long)i, newcol[i]);
  const int nt = threads(num_threads);
  const Isa isa = active_isa();
  return guarded([&]() { return KK_DISPATCH(isa, mfac_window_update, m, damp, gram, kinv, row, newcol, nt); });
}

KK_API kk_status kk_mfac_window_rebuild_cpu(int64_t m, double damp, const double* gram, double* kinv,
                                            int32_t num_threads) {
  clear_error();
  KK_TRY(check_size(m, "m"));
  KK_TRY(check_damp(damp));
  int64_t t;
  KK_TRY(checked_mul(m, m, &t, "m * m"));
  KK_TRY(checked_mul(t, 8, &t, "the byte size of gram"));
  if (m == 0) return KK_OK;
  KK_TRY(check_ptr(gram, "gram"));
  KK_TRY(check_ptr(kinv, "kinv"));
  const int nt = threads(num_threads);
  const Isa isa = active_isa();
  return guarded([&]() { return KK_DISPATCH(isa, mfac_window_rebuild, m, damp, gram, kinv, nt); });
}

KK_API kk_status kk_mfac_window_coef_cpu(int64_t m, int64_t nvec, double scale, const double* kinv, const double* q,
                                         double* c, int32_t num_threads) {
  clear_error();
  KK_TRY(check_size(m, "m"));
  KK_TRY(check_size(nvec, "nvec"));
  int64_t mm, nq, t;
  KK_TRY(checked_mul(m, m, &mm, "m * m"));
  KK_TRY(checked_mul(mm, 8, &t, "the byte size of kinv"));
  KK_TRY(checked_mul(nvec, m, &nq, "nvec * m"));
  KK_TRY(checked_mul(nq, 8, &t, "the byte size of q"));
  if (nq == 0) return KK_OK;
  KK_TRY(check_ptr(kinv, "kinv"));
  KK_TRY(check_ptr(q, "q"));
  KK_TRY(check_ptr(c, "c"));
  if (overlap(q, nq * 8, c, nq * 8)) return fail(KK_ERR_INVALID_ARGUMENT, "c overlaps q");
  if (overlap(kinv, mm * 8, c, nq * 8)) return fail(KK_ERR_INVALID_ARGUMENT, "c overlaps kinv");
  const int nt = threads(num_threads);
  const Isa isa = active_isa();
  return guarded([&]() { return KK_DISPATCH(isa, mfac_window_coef, m, nvec, scale, kinv, q, c, nt); });
}

}  // extern "C"
