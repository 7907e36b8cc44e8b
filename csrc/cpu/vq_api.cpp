// C ABI entry points of the CPU vq kernels (csrc/include/kernelkit/vq.h): format, size, pointer and
// stride checks, the code check (every code < K, as an unsigned value, before any kernel reads
// through one), the outputs of degenerate sizes (batch, n_out or n_in = 0: zeros where the math
// says so), then dispatch to the kernels compiled for the best instruction set this CPU has (vq.cpp,
// one copy per ISA).  A pointer is required only when its array has elements and the requested
// outputs read it (torch hands out NULL data pointers for empty tensors).
#include <omp.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <new>

#include "api_common.h"
#include "isa.h"
#include "status.h"
#include "vq_impl.h"

namespace kk {
namespace {

kk_status check_dtype(kk_dtype dtype) {
  return dtype == KK_FLOAT32 || dtype == KK_FLOAT64
             ? KK_OK
             : fail(KK_ERR_UNSUPPORTED_DTYPE, "vq cpu: dtype %d unsupported (float32, float64)",
                    (int)dtype);
}

// a * b * ... without overflowing int64 (the element counts the kernels index with).
kk_status checked_mul(int64_t a, int64_t b, int64_t* r, const char* what) {
  if (__builtin_mul_overflow(a, b, r))
    return fail(KK_ERR_INVALID_SIZE, "vq: %s overflows int64 (%lld * %lld)", what, (long long)a,
                (long long)b);
  return KK_OK;
}

struct Counts {
  int64_t groups, n_sets, n_codes, n_cb;  // G, sets, elements of codes, elements of codebooks
};

// The format's fields, and the element counts of codes and codebooks without overflow.
kk_status check_format(const kk_vq_format* f, Counts* c) {
  KK_TRY(check_ptr(f, "format"));
  KK_TRY(check_size(f->n_out, "n_out"));
  KK_TRY(check_size(f->n_in, "n_in"));
  const int d = f->group_size;
  if (d != 1 && d != 2 && d != 4 && d != 8 && d != 16)
    return fail(KK_ERR_INVALID_ARGUMENT, "group_size must be 1, 2, 4, 8 or 16, got %d", d);
  if (f->n_in % d != 0)
    return fail(KK_ERR_INVALID_SIZE, "n_in (%lld) must be a multiple of group_size (%d)",
                (long long)f->n_in, d);
  if (f->num_codebooks < 1 || f->num_codebooks > 16)
    return fail(KK_ERR_INVALID_ARGUMENT, "num_codebooks must be in [1, 16], got %d", f->num_codebooks);
  if (f->code_bits != 8 && f->code_bits != 16)
    return fail(KK_ERR_INVALID_ARGUMENT, "code_bits must be 8 (uint8 codes) or 16 (int16 codes), got %d",
                f->code_bits);
  const int64_t kmax = int64_t(1) << f->code_bits;
  if (f->codebook_size < 1 || f->codebook_size > kmax)
    return fail(KK_ERR_INVALID_SIZE, "codebook_size must be in [1, 2^code_bits = %lld], got %lld",
                (long long)kmax, (long long)f->codebook_size);
  if (f->rows_per_codebook < 1)
    return fail(KK_ERR_INVALID_SIZE, "rows_per_codebook must be >= 1, got %lld",
                (long long)f->rows_per_codebook);
  if (f->flags != 0 && f->flags != KK_VQ_CODES_CHECKED)
    return fail(KK_ERR_INVALID_ARGUMENT, "flags must be 0 or KK_VQ_CODES_CHECKED (1), got %d", f->flags);
  c->groups = f->n_in / d;
  c->n_sets = f->n_out == 0 ? 0 : (f->n_out - 1) / f->rows_per_codebook + 1;
  KK_TRY(checked_mul(f->n_out, c->groups, &c->n_codes, "n_out * n_in/group_size"));
  KK_TRY(checked_mul(c->n_codes, f->num_codebooks, &c->n_codes, "the number of codes"));
  KK_TRY(checked_mul(c->n_sets, f->num_codebooks, &c->n_cb, "n_sets * num_codebooks"));
  KK_TRY(checked_mul(c->n_cb, f->codebook_size, &c->n_cb, "n_sets * num_codebooks * codebook_size"));
  KK_TRY(checked_mul(c->n_cb, d, &c->n_cb, "the number of codebook elements"));
  return KK_OK;
}

// Every code < K (unsigned).  A row at a time: a vectorizable max, and the position only on failure;
// the first bad code (lowest flat index) is reported whatever the thread count.
template <typename C>
int64_t first_bad_code(const C* codes, int64_t rows, int64_t per_row, int64_t K, int nt) {
  int64_t bad = INT64_MAX;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(min : bad)
  for (int64_t r = 0; r < rows; ++r) {
    const C* p = codes + r * per_row;
    C mx = 0;
    for (int64_t j = 0; j < per_row; ++j) mx = p[j] > mx ? p[j] : mx;
    if (static_cast<int64_t>(mx) >= K)
      for (int64_t j = 0; j < per_row; ++j)
        if (static_cast<int64_t>(p[j]) >= K) {
          bad = std::min(bad, r * per_row + j);
          break;
        }
  }
  return bad;
}

kk_status check_codes(const kk_vq_format* f, const Counts& c, const void* codes, int nt, bool force) {
  if (c.n_codes == 0) return KK_OK;
  KK_TRY(check_ptr(codes, "codes"));
  if (!force && (f->flags & KK_VQ_CODES_CHECKED)) return KK_OK;
  const int64_t K = f->codebook_size;
  if (K == (int64_t(1) << f->code_bits)) return KK_OK;  // every code is valid
  const int64_t per_row = c.groups * f->num_codebooks;
  int64_t bad, value = 0;
  if (f->code_bits == 8) {
    bad = first_bad_code(static_cast<const uint8_t*>(codes), f->n_out, per_row, K, nt);
    if (bad != INT64_MAX) value = static_cast<const uint8_t*>(codes)[bad];
  } else {
    bad = first_bad_code(static_cast<const uint16_t*>(codes), f->n_out, per_row, K, nt);
    if (bad != INT64_MAX) value = static_cast<const uint16_t*>(codes)[bad];
  }
  if (bad == INT64_MAX) return KK_OK;
  const int64_t row = bad / per_row, group = (bad % per_row) / f->num_codebooks;
  const int m = static_cast<int>(bad % f->num_codebooks);
  return fail(KK_ERR_INVALID_ARGUMENT,
              "codes[row %lld, group %lld, codebook %d] = %lld (as unsigned %d-bit) is out of range "
              "[0, codebook_size = %lld)",
              (long long)row, (long long)group, m, (long long)value, f->code_bits, (long long)K);
}

int threads(int32_t requested) { return requested > 0 ? requested : omp_get_max_threads(); }

size_t esize(kk_dtype dtype) { return dtype == KK_FLOAT32 ? sizeof(float) : sizeof(double); }

VqArgs make_args(const kk_vq_format* f, int64_t batch) {
  VqArgs a;
  std::memset(&a, 0, sizeof(a));
  a.n_out = f->n_out;
  a.n_in = f->n_in;
  a.K = f->codebook_size;
  a.rpc = f->rows_per_codebook;
  a.d = f->group_size;
  a.M = f->num_codebooks;
  a.code_bits = f->code_bits;
  a.batch = batch;
  return a;
}

// Zero rows x cols of a strided matrix.
void zero_rows(void* p, int64_t rows, int64_t cols, int64_t ld, size_t es) {
  for (int64_t r = 0; r < rows; ++r)
    std::memset(static_cast<char*>(p) + static_cast<size_t>(r * ld) * es, 0, static_cast<size_t>(cols) * es);
}

template <typename Fn>
kk_status guarded(Fn&& fn) {
  return run_guarded("vq", "out of host memory for work buffers", fn);
}

}  // namespace
}  // namespace kk

using namespace kk;

extern "C" {

KK_API kk_status kk_vq_check_codes(const kk_vq_format* format, const void* codes) {
  clear_error();
  Counts c{};
  KK_TRY(check_format(format, &c));
  return check_codes(format, c, codes, omp_get_max_threads(), /*force=*/true);
}

KK_API kk_status kk_vq_dequantize_cpu(kk_dtype dtype, const kk_vq_format* format, const void* codes,
                                      const void* codebooks, const void* scales, void* w, int64_t ldw,
                                      int32_t num_threads) {
  clear_error();
  KK_TRY(check_dtype(dtype));
  Counts c{};
  KK_TRY(check_format(format, &c));
  if (format->n_out == 0 || format->n_in == 0) return KK_OK;  // W has no elements
  KK_TRY(check_ptr(w, "w"));
  KK_TRY(check_ld(ldw, format->n_in, "ldw", "n_in"));
  KK_TRY(check_ptr(codebooks, "codebooks"));
  const int nt = threads(num_threads);
  KK_TRY(check_codes(format, c, codes, nt, false));
  VqArgs a = make_args(format, 0);
  a.codes = codes;
  a.codebooks = codebooks;
  a.scales = scales;
  a.w = w;
  a.ldw = ldw;
  const Isa isa = active_isa();
  return guarded([&]() { return KK_DISPATCH(isa, vq_dequantize, dtype, a, nt); });
}

KK_API kk_status kk_vq_linear_fwd_cpu(kk_dtype dtype, const kk_vq_format* format, int64_t batch,
                                      const void* codes, const void* codebooks, const void* scales,
                                      const void* x, int64_t ldx, const void* bias, void* out,
                                      int64_t ldo, int32_t path, int32_t num_threads) {
  clear_error();
  KK_TRY(check_dtype(dtype));
  Counts c{};
  KK_TRY(check_format(format, &c));
  KK_TRY(check_size(batch, "batch"));
  if (path != KK_VQ_PATH_AUTO && path != KK_VQ_PATH_GEMV && path != KK_VQ_PATH_GEMM)
    return fail(KK_ERR_INVALID_ARGUMENT, "path must be KK_VQ_PATH_AUTO (0), _GEMV (1) or _GEMM (2), got %d",
                (int)path);
  const int64_t n_out = format->n_out, n_in = format->n_in;
  int64_t tmp;
  KK_TRY(checked_mul(batch, std::max(n_out, n_in), &tmp, "batch * max(n_out, n_in)"));
  const bool work = batch > 0 && n_out > 0;  // out has elements
  if (work) {
    KK_TRY(check_ptr(out, "out"));
    KK_TRY(check_ld(ldo, n_out, "ldo", "n_out"));
    if (n_in > 0) {
      KK_TRY(check_ptr(x, "x"));
      KK_TRY(check_ld(ldx, n_in, "ldx", "n_in"));
      KK_TRY(check_ptr(codebooks, "codebooks"));
    }
  }
  const int nt = threads(num_threads);
  KK_TRY(check_codes(format, c, codes, nt, false));
  if (!work) return KK_OK;
  VqArgs a = make_args(format, batch);
  a.codes = codes;
  a.codebooks = codebooks;
  a.scales = scales;
  a.x = x;
  a.ldx = ldx;
  a.bias = bias;
  a.out = out;
  a.ldo = ldo;
  a.path = path;
  const Isa isa = active_isa();
  return guarded([&]() { return KK_DISPATCH(isa, vq_fwd, dtype, a, nt); });
}

KK_API kk_status kk_vq_linear_bwd_cpu(kk_dtype dtype, const kk_vq_format* format, int64_t batch,
                                      const void* codes, const void* codebooks, const void* scales,
                                      const void* x, int64_t ldx, const void* dout, int64_t lddo,
                                      void* dx, int64_t lddx, void* dcodebooks, void* dscales,
                                      int32_t num_threads) {
  clear_error();
  KK_TRY(check_dtype(dtype));
  Counts c{};
  KK_TRY(check_format(format, &c));
  KK_TRY(check_size(batch, "batch"));
  if (dscales && !scales)
    return fail(KK_ERR_INVALID_ARGUMENT, "dscales must be NULL when scales is NULL (no scales to differentiate)");
  const int64_t n_out = format->n_out, n_in = format->n_in;
  int64_t tmp;
  KK_TRY(checked_mul(batch, std::max(n_out, n_in), &tmp, "batch * max(n_out, n_in)"));
  // What has elements to write, and what the nonzero part of each output reads.
  const bool want_dx = dx && batch > 0 && n_in > 0;
  const bool want_dcb = dcodebooks && c.n_cb > 0;
  const bool want_ds = dscales && n_out > 0;
  const bool full = batch > 0 && n_out > 0 && n_in > 0;  // the products are not all empty
  if (want_dx) KK_TRY(check_ld(lddx, n_in, "lddx", "n_in"));
  if (full && (want_dx || want_dcb || want_ds)) {
    KK_TRY(check_ptr(dout, "dout"));
    KK_TRY(check_ld(lddo, n_out, "lddo", "n_out"));
    KK_TRY(check_ptr(codebooks, "codebooks"));
    if (want_dcb || want_ds) {
      KK_TRY(check_ptr(x, "x"));
      KK_TRY(check_ld(ldx, n_in, "ldx", "n_in"));
    }
  }
  const int nt = threads(num_threads);
  KK_TRY(check_codes(format, c, codes, nt, false));
  const size_t es = esize(dtype);
  if (!full) {  // every product is empty: the gradients that have elements are zero
    if (want_dx) zero_rows(dx, batch, n_in, lddx, es);
    if (want_dcb) std::memset(dcodebooks, 0, static_cast<size_t>(c.n_cb) * es);
    if (want_ds) std::memset(dscales, 0, static_cast<size_t>(n_out) * es);
    return KK_OK;
  }
  if (!want_dx && !want_dcb && !want_ds) return KK_OK;
  VqArgs a = make_args(format, batch);
  a.codes = codes;
  a.codebooks = codebooks;
  a.scales = scales;
  a.x = x;
  a.ldx = ldx;
  a.dout = dout;
  a.lddo = lddo;
  a.dx = want_dx ? dx : nullptr;
  a.lddx = lddx;
  a.dcodebooks = want_dcb ? dcodebooks : nullptr;
  a.dscales = want_ds ? dscales : nullptr;
  const Isa isa = active_isa();
  return guarded([&]() { return KK_DISPATCH(isa, vq_bwd, dtype, a, nt); });
}

KK_API kk_status kk_vq_assign_cpu(kk_dtype dtype, int64_t n, int64_t K, int32_t d, const void* vectors,
                                  const void* centroids, int32_t topn, int32_t* idx, void* dist,
                                  int32_t num_threads) {
  clear_error();
  KK_TRY(check_dtype(dtype));
  KK_TRY(check_size(n, "n"));
  if (K < 1) return fail(KK_ERR_INVALID_SIZE, "K must be >= 1, got %lld", (long long)K);
  if (K > INT32_MAX)
    return fail(KK_ERR_INVALID_SIZE, "K (%lld) must fit int32 (idx is int32)", (long long)K);
  if (d < 1) return fail(KK_ERR_INVALID_SIZE, "d must be >= 1, got %d", (int)d);
  if (topn < 1 || topn > 8 || topn > K)
    return fail(KK_ERR_INVALID_ARGUMENT, "topn must be in [1, min(8, K = %lld)], got %d", (long long)K,
                (int)topn);
  int64_t tmp;
  KK_TRY(checked_mul(n, d, &tmp, "n * d"));
  KK_TRY(checked_mul(K, d, &tmp, "K * d"));
  KK_TRY(checked_mul(n, topn, &tmp, "n * topn"));
  if (n == 0) return KK_OK;
  KK_TRY(check_ptr(vectors, "vectors"));
  KK_TRY(check_ptr(centroids, "centroids"));
  KK_TRY(check_ptr(idx, "idx"));
  const int nt = threads(num_threads);
  const Isa isa = active_isa();
  return guarded(
      [&]() { return KK_DISPATCH(isa, vq_assign, dtype, n, K, d, vectors, centroids, topn, idx, dist, nt); });
}

}  // extern "C"
