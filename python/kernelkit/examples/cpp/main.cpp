// Calls kernelkit's CPU entry points on this program's own buffers and checks each result against a
// naive loop; exits 1 on any mismatch.  So far: mfac (per-block dot products with a gradient buffer)
// and rbf (k nearest centres through the grid).  Built by CMakeLists.txt against the installed package.
#include <kernelkit/kernelkit.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <utility>
#include <vector>

namespace {
int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAIL %s (%s)\n", what, kk_last_error());
    ++failures;
  }
}

// mfac: q[b, i] = sum_{j in block b} G[i, j] x[j]
void check_mfac(std::mt19937& rng) {
  const int64_t r = 7, d = 301, block = 64, nb = (d + block - 1) / block;
  std::normal_distribution<float> nd;
  std::vector<float> G(r * d), x(d);
  for (auto& v : G) v = nd(rng);
  for (auto& v : x) v = nd(rng);
  std::vector<double> q(nb * r, std::nan(""));
  kk_status st = kk_mfac_dots_cpu(KK_FLOAT32, r, d, block, G.data(), d, 1, x.data(), d, -1, q.data(), nullptr, 0);
  expect(st == KK_OK, "kk_mfac_dots_cpu status");
  double worst = 0.0;
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t i = 0; i < r; ++i) {
      double ref = 0.0, mag = 0.0;
      for (int64_t j = b * block; j < std::min(d, (b + 1) * block); ++j) {
        ref += double(G[i * d + j]) * x[j];
        mag += std::fabs(double(G[i * d + j]) * x[j]);
      }
      worst = std::max(worst, std::fabs(q[b * r + i] - ref) / (mag > 0 ? mag : 1.0));
    }
  expect(worst <= 1e-12, "mfac dots vs naive loop");
  std::printf("mfac  kk_mfac_dots_cpu     r=%lld d=%lld block=%lld: worst error %.2e\n", (long long)r, (long long)d,
              (long long)block, worst);
}

// rbf: the k nearest of m centres, sorted by (squared distance, index), equal to brute force
void check_rbf(std::mt19937& rng) {
  const int32_t dim = 2, k = 5;
  const int64_t m = 500, n = 300;
  std::uniform_real_distribution<float> ud(0.0f, 1.0f);
  std::vector<float> c(m * dim), x(n * dim);
  for (auto& v : c) v = ud(rng);
  for (auto& v : x) v = 1.5f * ud(rng) - 0.25f;  // some queries outside the centres' box
  kk_rbf_grid_layout_t lay{};
  expect(kk_rbf_grid_layout(KK_FLOAT32, dim, m, &lay) == KK_OK, "kk_rbf_grid_layout");
  std::vector<int64_t> grid((lay.bytes + 7) / 8);  // 8-byte aligned
  expect(kk_rbf_grid_build_cpu(KK_FLOAT32, dim, m, c.data(), dim, grid.data(), lay.bytes, 0) == KK_OK,
         "kk_rbf_grid_build_cpu");
  std::vector<int64_t> idx(n * k, -7);
  std::vector<float> d2(n * k, std::nanf(""));
  expect(kk_rbf_knn_cpu(KK_FLOAT32, dim, n, x.data(), dim, grid.data(), k, idx.data(), d2.data(), 0) == KK_OK,
         "kk_rbf_knn_cpu");
  int64_t wrong = 0;
  for (int64_t q = 0; q < n; ++q) {
    std::vector<std::pair<float, int64_t>> all(m);
    for (int64_t i = 0; i < m; ++i) {
      volatile float t0 = x[q * dim] - c[i * dim], t1 = x[q * dim + 1] - c[i * dim + 1];
      volatile float s0 = t0 * t0, s1 = t1 * t1;  // rounded separately, as rbf.h specifies (no FMA)
      all[i] = {s0 + s1, i};
    }
    std::partial_sort(all.begin(), all.begin() + k, all.end());
    for (int32_t s = 0; s < k; ++s)
      wrong += (idx[q * k + s] != all[s].second) || (d2[q * k + s] != all[s].first);
  }
  expect(wrong == 0, "rbf knn vs brute force");
  std::printf("rbf   kk_rbf_knn_cpu       n=%lld m=%lld k=%d: %lld of %lld neighbours differ from brute force\n",
              (long long)n, (long long)m, k, (long long)wrong, (long long)(n * k));
}
}  // namespace

int main() {
  std::printf("kernelkit %s (C ABI %d), CPU ISA %s\n", kk_version(), kk_abi_version(), kk_cpu_isa());
  std::mt19937 rng(0);
  check_mfac(rng);
  check_rbf(rng);
  std::printf(failures ? "FAILED (%d)\n" : "all checks passed\n", failures);
  return failures ? 1 : 0;
}
