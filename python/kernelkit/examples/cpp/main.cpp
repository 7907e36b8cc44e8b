// kernelkit from C++ through its installed CMake package: one CPU entry point of every family, called
// on this program's own buffers and checked against a naive loop written here.  No Python, no libtorch.
//
// Each check prints one line, "<family> ok|FAIL <entry point> <sizes>: <relative error> (tolerance)",
// where the relative error is max |kernelkit - naive| / max |naive| over the outputs; the "errors" line
// is one deliberately bad call (a status, and kk_last_error() naming the argument).  Exits 1 on any
// failure, else prints "all checks passed".  Build: see CMakeLists.txt.
#include <kernelkit/kernelkit.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace {
int failures = 0;
std::mt19937 rng(0);

std::vector<double> normal(size_t n, double scale = 1.0) {
  std::normal_distribution<double> nd(0.0, scale);
  std::vector<double> v(n);
  for (auto& e : v) e = nd(rng);
  return v;
}

std::vector<double> uniform(size_t n, double lo, double hi) {
  std::uniform_real_distribution<double> ud(lo, hi);
  std::vector<double> v(n);
  for (auto& e : v) e = ud(rng);
  return v;
}

// A failed call is a failure of its family's check; it prints the library's message.
bool call_ok(kk_status st, const char* what) {
  if (st == KK_OK) return true;
  std::printf("  %s: %s: %s\n", what, kk_status_string(st), kk_last_error());
  ++failures;
  return false;
}

// max |got - ref| / max |ref|
template <class T>
double rel_error(const std::vector<T>& got, const std::vector<double>& ref) {
  double diff = 0.0, mag = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isnan(double(got[i]))) return INFINITY;  // an output never written
    diff = std::max(diff, std::fabs(double(got[i]) - ref[i]));
    mag = std::max(mag, std::fabs(ref[i]));
  }
  return diff / (mag > 0.0 ? mag : 1.0);
}

// One line per family; `ok` is the call's status and the error within the tolerance.
void report(const char* family, bool ok, const char* op, const char* fmt, ...) {
  char detail[256];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(detail, sizeof detail, fmt, args);
  va_end(args);
  std::printf("%-8s %-4s %-26s %s\n", family, ok ? "ok" : "FAIL", op, detail);
  if (!ok) ++failures;
}

// monarch: out = P2 B2 P1 B1 x with block-diagonal B1 (k blocks q x p) and B2 (l blocks s x r)
void check_monarch() {
  const int64_t batch = 5, k = 4, q = 6, p = 5, l = 3, s = 7, r = 8;  // l * r == k * q
  const int64_t n_in = k * p, n_out = l * s;
  std::vector<double> x = normal(batch * n_in), w1 = normal(k * q * p), w2 = normal(l * s * r);
  std::vector<double> out(batch * n_out, NAN);
  bool ok = call_ok(kk_monarch_fwd_cpu(KK_FLOAT64, batch, k, q, p, l, s, r, x.data(), n_in, w1.data(),
                                       w2.data(), out.data(), n_out, 0), "kk_monarch_fwd_cpu");
  std::vector<double> ref(batch * n_out, 0.0), t(k * q);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t a = 0; a < k; ++a)  // t = B1 x
      for (int64_t i = 0; i < q; ++i) {
        t[a * q + i] = 0.0;
        for (int64_t j = 0; j < p; ++j) t[a * q + i] += w1[(a * q + i) * p + j] * x[b * n_in + a * p + j];
      }
    for (int64_t c = 0; c < l; ++c)  // block c of B2 reads h[c, m] = t[m * l + c], writes out[n * l + c]
      for (int64_t n = 0; n < s; ++n)
        for (int64_t m = 0; m < r; ++m) ref[b * n_out + n * l + c] += w2[(c * s + n) * r + m] * t[m * l + c];
  }
  const double err = rel_error(out, ref), tol = 1e-13;
  report("monarch", ok && err <= tol, "kk_monarch_fwd_cpu",
         "float64 batch=%lld k=%lld q=%lld p=%lld l=%lld s=%lld r=%lld: rel. error %.1e (tol %.0e)", (long long)batch,
         (long long)k, (long long)q, (long long)p, (long long)l, (long long)s, (long long)r, err, tol);
}

// A CSR matrix, built from a dense one.
struct Csr {
  std::vector<int64_t> row_ptr{0};
  std::vector<int32_t> col_idx;
  std::vector<double> values;
};

Csr to_csr(const std::vector<double>& dense, int64_t rows, int64_t cols) {
  Csr a;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j)
      if (dense[i * cols + j] != 0.0) {
        a.col_idx.push_back(int32_t(j));
        a.values.push_back(dense[i * cols + j]);
      }
    a.row_ptr.push_back(int64_t(a.values.size()));
  }
  return a;
}

// sparse: out = bias + W x with W (n_out x n_in) in CSR, about 30% nonzero; the naive loop uses dense W.
// Then the error path: an out-of-range column index gives KK_ERR_INVALID_ARGUMENT naming col_idx.
void check_sparse() {
  const int64_t batch = 6, n_out = 12, n_in = 40;
  std::vector<double> W = normal(n_out * n_in), keep = uniform(n_out * n_in, 0.0, 1.0);
  for (size_t i = 0; i < W.size(); ++i)
    if (keep[i] > 0.3) W[i] = 0.0;
  const Csr a = to_csr(W, n_out, n_in);
  const int64_t nnz = int64_t(a.values.size());
  std::vector<double> x = normal(batch * n_in), bias = normal(n_out), out(batch * n_out, NAN);
  bool ok = call_ok(kk_sparse_linear_fwd_cpu(KK_FLOAT64, batch, n_out, n_in, nnz, a.row_ptr.data(), a.col_idx.data(),
                                             a.values.data(), x.data(), n_in, bias.data(), out.data(), n_out, 0),
                    "kk_sparse_linear_fwd_cpu");
  std::vector<double> ref(batch * n_out);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t o = 0; o < n_out; ++o) {
      ref[b * n_out + o] = bias[o];
      for (int64_t i = 0; i < n_in; ++i) ref[b * n_out + o] += W[o * n_in + i] * x[b * n_in + i];
    }
  const double err = rel_error(out, ref), tol = 1e-13;
  report("sparse", ok && err <= tol, "kk_sparse_linear_fwd_cpu", "float64 batch=%lld %lldx%lld nnz=%lld: "
         "rel. error %.1e (tol %.0e)", (long long)batch, (long long)n_out, (long long)n_in, (long long)nnz, err, tol);

  // The error path, once: the last stored column index made out of range (n_in).
  std::vector<int32_t> bad = a.col_idx;
  bad.back() = int32_t(n_in);
  const kk_status st = kk_sparse_linear_fwd_cpu(KK_FLOAT64, batch, n_out, n_in, nnz, a.row_ptr.data(), bad.data(),
                                                a.values.data(), x.data(), n_in, bias.data(), out.data(), n_out, 0);
  const std::string msg = kk_last_error();
  report("errors", st == KK_ERR_INVALID_ARGUMENT && msg.find("col_idx") != std::string::npos,
         "kk_sparse_linear_fwd_cpu", "col_idx[%lld] = %lld: status %d (%s), kk_last_error() \"%s\"",
         (long long)(nnz - 1), (long long)n_in, int(st), kk_status_string(st), msg.c_str());
}

// vq: out = bias + W x with W[o, g*d + t] = scale[o] * sum_m codebooks[o / rows_per_codebook, m, codes[o, g, m], t]
// (two additive codebooks of 16 codewords of 4 values, uint8 codes, two sets of 5 rows); every path.
void check_vq() {
  kk_vq_format f{};
  f.n_out = 10;
  f.n_in = 32;
  f.codebook_size = 16;
  f.rows_per_codebook = 5;
  f.group_size = 4;
  f.num_codebooks = 2;
  f.code_bits = 8;
  f.flags = 0;  // the library checks every code < 16
  const int64_t batch = 3, groups = f.n_in / f.group_size;
  const int64_t n_sets = (f.n_out + f.rows_per_codebook - 1) / f.rows_per_codebook;
  const int64_t M = f.num_codebooks, K = f.codebook_size, d = f.group_size;
  std::vector<uint8_t> codes(f.n_out * groups * M);
  std::uniform_int_distribution<int> code(0, int(K) - 1);
  for (auto& c : codes) c = uint8_t(code(rng));
  std::vector<double> codebooks = normal(n_sets * M * K * d), scales = uniform(f.n_out, 0.5, 2.0);
  std::vector<double> bias = normal(f.n_out), x = normal(batch * f.n_in);

  std::vector<double> W(f.n_out * f.n_in, 0.0), ref(batch * f.n_out);  // decode, then a plain matmul
  for (int64_t o = 0; o < f.n_out; ++o)
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t m = 0; m < M; ++m) {
        const double* cw = &codebooks[(((o / f.rows_per_codebook) * M + m) * K + codes[(o * groups + g) * M + m]) * d];
        for (int64_t t = 0; t < d; ++t) W[o * f.n_in + g * d + t] += scales[o] * cw[t];
      }
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t o = 0; o < f.n_out; ++o) {
      ref[b * f.n_out + o] = bias[o];
      for (int64_t i = 0; i < f.n_in; ++i) ref[b * f.n_out + o] += W[o * f.n_in + i] * x[b * f.n_in + i];
    }
  bool ok = true;
  double err = 0.0;
  for (int32_t path : {KK_VQ_PATH_AUTO, KK_VQ_PATH_GEMV, KK_VQ_PATH_GEMM}) {
    std::vector<double> out(batch * f.n_out, NAN);
    ok &= call_ok(kk_vq_linear_fwd_cpu(KK_FLOAT64, &f, batch, codes.data(), codebooks.data(), scales.data(), x.data(),
                                       f.n_in, bias.data(), out.data(), f.n_out, path, 0), "kk_vq_linear_fwd_cpu");
    err = std::max(err, rel_error(out, ref));
  }
  const double tol = 1e-13;
  report("vq", ok && err <= tol, "kk_vq_linear_fwd_cpu", "float64 batch=%lld %lldx%lld d=%lld M=%lld K=%lld, 3 paths: "
         "rel. error %.1e (tol %.0e)", (long long)batch, (long long)f.n_out, (long long)f.n_in, (long long)d,
         (long long)M, (long long)K, err, tol);
}

// log(sum_j exp(v_j)), shifted by the maximum so that nothing overflows or underflows
double logsumexp(const std::vector<double>& v) {
  const double mx = *std::max_element(v.begin(), v.end());
  double s = 0.0;
  for (double e : v) s += std::exp(e - mx);
  return mx + std::log(s);
}

// ot: log-domain Sinkhorn between two point clouds (squared Euclidean cost computed by the kernel, no
// cost matrix in memory), alternating row and column half-steps
//   f_i = reg * (log a_i - LSE_j((g_j - C_ij) / reg)),   g_j = reg * (log b_j - LSE_i((f_i - C_ij) / reg)),
// and the row-marginal error || sum_j P_ij - a_i ||_1 of the last row step's input plan.
void check_ot() {
  const int64_t n = 40, m = 30, dim = 2, iters = 20;
  const double reg = 0.002;  // C / reg up to 1000: exp(-C / reg) underflows to 0 in float64, so both sides use LSEs
  std::vector<double> x = uniform(n * dim, 0.0, 1.0), y = uniform(m * dim, 0.0, 1.0);
  std::vector<double> a = uniform(n, 0.5, 1.5), b = uniform(m, 0.5, 1.5);
  double sa = 0.0, sb = 0.0;
  for (double v : a) sa += v;
  for (double v : b) sb += v;
  for (double& v : a) v /= sa;
  for (double& v : b) v /= sb;
  kk_ot_cost cost{};
  cost.kind = KK_OT_COST_SQEUCLIDEAN;
  cost.dim = int32_t(dim);
  cost.x = x.data();
  cost.x_batch_stride = n * dim;
  cost.y = y.data();
  cost.y_batch_stride = m * dim;

  std::vector<double> f(n, 0.0), g(m, 0.0);
  double err_lib = NAN;
  bool ok = true;
  for (int64_t it = 0; it < iters && ok; ++it) {  // pot_new may alias pot: update in place
    ok &= call_ok(kk_ot_sinkhorn_step_cpu(KK_FLOAT64, &cost, 1, n, m, 0, reg, a.data(), g.data(), f.data(), f.data(),
                                          &err_lib, KK_OT_NORM_L1, 0), "kk_ot_sinkhorn_step_cpu (rows)");
    ok &= call_ok(kk_ot_sinkhorn_step_cpu(KK_FLOAT64, &cost, 1, n, m, 1, reg, b.data(), f.data(), g.data(), g.data(),
                                          nullptr, KK_OT_NORM_L1, 0), "kk_ot_sinkhorn_step_cpu (columns)");
  }

  auto C = [&](int64_t i, int64_t j) {
    double c = 0.0;
    for (int64_t t = 0; t < dim; ++t) c += (x[i * dim + t] - y[j * dim + t]) * (x[i * dim + t] - y[j * dim + t]);
    return c;
  };
  std::vector<double> rf(n, 0.0), rg(m, 0.0), row(m), col(n);
  double err_ref = 0.0;
  for (int64_t it = 0; it < iters; ++it) {
    err_ref = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < m; ++j) row[j] = (rg[j] - C(i, j)) / reg;
      const double s = logsumexp(row);
      err_ref += std::fabs(std::exp(rf[i] / reg + s) - a[i]);  // the row sum of the plan before the update
      rf[i] = reg * (std::log(a[i]) - s);
    }
    for (int64_t j = 0; j < m; ++j) {
      for (int64_t i = 0; i < n; ++i) col[i] = (rf[i] - C(i, j)) / reg;
      rg[j] = reg * (std::log(b[j]) - logsumexp(col));
    }
  }
  std::vector<double> pot = f, pot_ref = rf;
  pot.insert(pot.end(), g.begin(), g.end());
  pot_ref.insert(pot_ref.end(), rg.begin(), rg.end());
  const double err = std::max(rel_error(pot, pot_ref), std::fabs(err_lib - err_ref)), tol = 1e-12;  // mass 1
  report("ot", ok && err <= tol, "kk_ot_sinkhorn_step_cpu", "float64 n=%lld m=%lld reg=%g, %lld iterations "
         "(L1 row-marginal error %.2e): rel. error %.1e (tol %.0e)", (long long)n, (long long)m, reg, (long long)iters,
         err_ref, err, tol);
}

// mfac: q[b, i] = sum_{j in block b} G[i, j] x[j] for a float32 gradient buffer G (r x d), float64 q
void check_mfac() {
  const int64_t r = 7, d = 301, block = 64, nb = (d + block - 1) / block;
  std::vector<double> G64 = normal(r * d), x64 = normal(d);
  std::vector<float> G(G64.begin(), G64.end()), x(x64.begin(), x64.end());
  std::vector<double> q(nb * r, NAN);
  bool ok = call_ok(kk_mfac_dots_cpu(KK_FLOAT32, r, d, block, G.data(), d, 1, x.data(), d, -1, q.data(), nullptr, 0),
                    "kk_mfac_dots_cpu");
  std::vector<double> ref(nb * r, 0.0);
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = b * block; j < std::min(d, (b + 1) * block); ++j) ref[b * r + i] += double(G[i * d + j]) * x[j];
  const double err = rel_error(q, ref), tol = 1e-12;  // the CPU library accumulates in float64
  report("mfac", ok && err <= tol, "kk_mfac_dots_cpu", "float32 r=%lld d=%lld block=%lld: rel. error %.1e (tol %.0e)",
         (long long)r, (long long)d, (long long)block, err, tol);
}

// rbf: the k nearest of m centres through the grid (sorted by (squared distance, index): must equal brute
// force exactly), then the fused features at those neighbours, Gaussian kernels with diagonal shapes A,
// normalized, with sinusoids:
//   phi_i = exp(-0.5 sum_t A_i[t] (x_t - mu_i[t])^2),  out[n, c] = sum_i w[i, c] sin(omega_c phi_i / (sum phi + 1e-8))
void check_rbf() {
  const int32_t dim = 2, k = 5;
  const int64_t m = 500, n = 300, C = 4;
  std::vector<double> c64 = uniform(m * dim, 0.0, 1.0), x64 = uniform(n * dim, -0.25, 1.25);  // some queries outside
  std::vector<float> c(c64.begin(), c64.end()), x(x64.begin(), x64.end());
  kk_rbf_grid_layout_t lay{};
  bool ok = call_ok(kk_rbf_grid_layout(KK_FLOAT32, dim, m, &lay), "kk_rbf_grid_layout");
  std::vector<int64_t> grid((lay.bytes + 7) / 8);  // 8-byte aligned
  ok = ok && call_ok(kk_rbf_grid_build_cpu(KK_FLOAT32, dim, m, c.data(), dim, grid.data(), lay.bytes, 0),
                     "kk_rbf_grid_build_cpu");
  std::vector<int64_t> idx(n * k, -7);
  std::vector<float> d2(n * k, NAN);
  ok = ok && call_ok(kk_rbf_knn_cpu(KK_FLOAT32, dim, n, x.data(), dim, grid.data(), k, idx.data(), d2.data(), 0),
                     "kk_rbf_knn_cpu");
  int64_t wrong = 0;
  for (int64_t p = 0; p < n; ++p) {
    std::vector<std::pair<float, int64_t>> all(m);
    for (int64_t i = 0; i < m; ++i) {
      volatile float t0 = x[p * dim] - c[i * dim], t1 = x[p * dim + 1] - c[i * dim + 1];
      volatile float s0 = t0 * t0, s1 = t1 * t1;  // rounded separately, as rbf.h specifies (no FMA)
      all[i] = {s0 + s1, i};
    }
    std::partial_sort(all.begin(), all.begin() + k, all.end());
    for (int32_t s = 0; s < k; ++s) wrong += (idx[p * k + s] != all[s].second) || (d2[p * k + s] != all[s].first);
  }

  std::vector<double> A64 = uniform(m * dim, 200.0, 800.0), w64 = normal(m * C);
  std::vector<float> A(A64.begin(), A64.end()), w(w64.begin(), w64.end()), omegas{1.0f, 3.0f, 7.0f, 15.0f};
  std::vector<float> out(n * C, NAN);
  ok = ok && call_ok(kk_rbf_features_fwd_cpu(KK_FLOAT32, KK_FLOAT32, dim, KK_RBF_GAUSS, /*shape_full=*/0, n,
                                             x.data(), dim, m, c.data(), A.data(), w.data(), C, C, omegas.data(), k,
                                             idx.data(), KK_RBF_NORM_DETACHED, out.data(), C, 0),
                     "kk_rbf_features_fwd_cpu");
  std::vector<double> ref(n * C, 0.0), phi(k);
  for (int64_t p = 0; p < n; ++p) {
    double sum = 0.0;
    for (int32_t s = 0; s < k; ++s) {
      const int64_t i = idx[p * k + s];
      double e = 0.0;
      for (int32_t t = 0; t < dim; ++t) {
        const double o = double(x[p * dim + t]) - c[i * dim + t];
        e += A[i * dim + t] * o * o;
      }
      phi[s] = std::exp(-0.5 * e);
      sum += phi[s];
    }
    for (int32_t s = 0; s < k; ++s)
      for (int64_t j = 0; j < C; ++j)
        ref[p * C + j] += w[idx[p * k + s] * C + j] * std::sin(omegas[j] * phi[s] / (sum + 1e-8));
  }
  const double err = rel_error(out, ref), tol = 2e-5;  // float32 features: sin of a float32 argument
  report("rbf", ok && wrong == 0 && err <= tol, "kk_rbf_knn_cpu + features",
         "float32 n=%lld m=%lld k=%d C=%lld: %lld of %lld neighbours differ from brute force; features rel. error "
         "%.1e (tol %.0e)", (long long)n, (long long)m, k, (long long)C, (long long)wrong, (long long)(n * k), err,
         tol);
}
}  // namespace

int main() {
  std::printf("kernelkit %s (C ABI %d), CPU ISA %s\n", kk_version(), kk_abi_version(), kk_cpu_isa());
  check_monarch();
  check_sparse();
  check_vq();
  check_ot();
  check_mfac();
  check_rbf();
  std::printf(failures ? "FAILED (%d)\n" : "all checks passed\n", failures);
  return failures ? 1 : 0;
}
