// Vector-quantized linear layer on the CPU (VQ4DiT, AQLM): dequantize, forward, backward, k-means
// assignment.  OpenMP, float32 / float64, accumulation in the element type.
//
// Math (csrc/include/kernelkit/vq.h): W[o, g*d + t] = scale[o] * sum_m C[s(o), m, codes[o, g, m], t],
//   out = x W^T + bias,  dx = dout W,  dcodebooks[s, m, k, t] = sum_{o in s, g: codes[o,g,m] = k}
//   scale[o] dW[o, g*d+t],  dscales[o] = sum_i dW[o, i] U[o, i],  dW = dout^T x,  U = W / scale.
//
// Forward paths.  GEMV (KK_VQ_PATH_GEMV): lookup tables.  A tile of BT in {1,2,4,8,16} batch rows;
// per block of input groups LUT[g][m][k][0:BT] = <x[b, g*d:(g+1)*d], C_m[k]>, then each output row
// adds one table entry per (group, codebook) it codes (one code byte + BT/VL vector loads).  Threads
// own contiguous output rows and build the tables they need themselves (no barriers: on this shared
// 2-core machine an OpenMP barrier with a descheduled partner cost more than the whole kernel).
// GEMM (KK_VQ_PATH_GEMM): panels of W^T (256 inputs x NR rows) dequantized, scale folded in, straight
// into the packed layout of gemm.h's register-blocked micro-kernel; x packed per 256-input block.
// AUTO: a cost model (use_lut) weighing the table build (batch*n_sets*n_in*K*M/8) plus the lookups
// (batch*n_out*G*M) against the dequantization (n_out*n_in*M) plus the matmul at 1/16 the cost per
// MAC: it picks the tables for K <= 256 at small batches (crossing over near batch 8-16 at 4096^2)
// and the GEMM for K = 65536 and large batches.  Measured (CPU time, 1 thread, loaded machine,
// 4096x4096 fp32): tables at batch 1 are 1.3-2.3x faster than dense F.linear (goal 4x: not met), at
// batch 16 0.6-0.85x (goal 2x: not met); GEMM at batch 256 0.8-1.1x of dense.
// Backward (simple version): dx by column chunks of dequantized rows, dW rows per thread scattered
// into per-thread codebook gradients reduced in thread order (deterministic for a thread count).
//
// This file is compiled once per ISA (KK_ISA_NS = isa_avx512 / isa_avx2 / isa_base); vq_api.cpp
// has checked every size, pointer and code, so the kernels trust them.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "gemm.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include "vq_impl.h"

namespace kk {
namespace KK_ISA_NS {
namespace {

// A work buffer (uninitialized, 64-byte aligned).
template <typename T>
struct Buf {
  T* p = nullptr;
  explicit Buf(size_t n) {
    if (n == 0) n = 1;
    p = static_cast<T*>(::operator new[](n * sizeof(T), std::align_val_t(64)));
  }
  ~Buf() { ::operator delete[](p, std::align_val_t(64)); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  T* get() const { return p; }
};

// Typed views of the arguments.
template <typename T, typename CT>
struct View {
  int64_t n_out, n_in, K, rpc, G, n_sets, batch;
  int d, M;
  const CT* codes;
  const T* cb;
  const T* scales;
  explicit View(const VqArgs& a)
      : n_out(a.n_out), n_in(a.n_in), K(a.K), rpc(a.rpc), G(a.n_in / a.d),
        n_sets(a.n_out == 0 ? 0 : (a.n_out - 1) / a.rpc + 1), batch(a.batch), d(a.d), M(a.M),
        codes(static_cast<const CT*>(a.codes)), cb(static_cast<const T*>(a.codebooks)),
        scales(static_cast<const T*>(a.scales)) {}
  const CT* row_codes(int64_t o) const { return codes + o * G * M; }
  // codebook m of the set of row o
  const T* book(int64_t o, int m) const { return cb + ((o / rpc) * M + m) * K * d; }
  const T* set_book(int64_t s, int m) const { return cb + (s * M + m) * K * d; }
  T scale(int64_t o) const { return scales ? scales[o] : T(1); }
};

// W[o, g*d : (g+ng)*d] times mult for groups [g0, g0 + ng) into dst (contiguous); the group size is a
// template argument so each codeword is a fixed-length (vectorized) copy and add.
template <int D, typename T, typename CT>
inline void dequant_row_d(const View<T, CT>& v, int64_t o, int64_t g0, int64_t ng, T mult, T* __restrict__ dst) {
  const CT* __restrict__ c = v.row_codes(o) + g0 * v.M;
  const int M = v.M;
  const T* __restrict__ b0 = v.book(o, 0);
  if (M == 1) {
    for (int64_t g = 0; g < ng; ++g) {
      const T* __restrict__ w = b0 + static_cast<int64_t>(c[g]) * D;
      for (int t = 0; t < D; ++t) dst[g * D + t] = mult * w[t];
    }
    return;
  }
  for (int64_t g = 0; g < ng; ++g) {
    T tmp[D];
    const T* __restrict__ w0 = b0 + static_cast<int64_t>(c[g * M]) * D;
    for (int t = 0; t < D; ++t) tmp[t] = w0[t];
    for (int m = 1; m < M; ++m) {
      const T* __restrict__ wm = b0 + (static_cast<int64_t>(m) * v.K + c[g * M + m]) * D;
      for (int t = 0; t < D; ++t) tmp[t] += wm[t];
    }
    for (int t = 0; t < D; ++t) dst[g * D + t] = mult * tmp[t];
  }
}

template <typename T, typename CT>
inline void dequant_row(const View<T, CT>& v, int64_t o, int64_t g0, int64_t ng, T mult, T* dst) {
  switch (v.d) {
    case 1: return dequant_row_d<1>(v, o, g0, ng, mult, dst);
    case 2: return dequant_row_d<2>(v, o, g0, ng, mult, dst);
    case 4: return dequant_row_d<4>(v, o, g0, ng, mult, dst);
    case 8: return dequant_row_d<8>(v, o, g0, ng, mult, dst);
    default: return dequant_row_d<16>(v, o, g0, ng, mult, dst);  // vq_api.cpp admits 1, 2, 4, 8, 16
  }
}

// ---------------------------------------------------------------------------------------------
// Dequantize.
template <typename T, typename CT>
void dequantize(const VqArgs& a, int nt) {
  const View<T, CT> v(a);
  T* w = static_cast<T*>(a.w);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t o = 0; o < v.n_out; ++o) dequant_row(v, o, 0, v.G, v.scale(o), w + o * a.ldw);
}

// ---------------------------------------------------------------------------------------------
// Forward, GEMM path: out (batch x n_out) = x (batch x n_in) * W^T, W^T's panels (KC inputs x NR
// output rows) dequantized with the scale folded in, straight into the packed layout the
// register-blocked micro-kernel of gemm.h streams; x is packed once per KC block and shared.
constexpr int64_t kKC = 256;  // a multiple of every group size

template <typename T, typename CT>
void fwd_gemm(const VqArgs& a, int nt) {
  using Tl = Tile<T, 2>;
  constexpr int MR = Tl::MR, NR = Tl::NR;
  const View<T, CT> v(a);
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  const T* bias = static_cast<const T*>(a.bias);
  const int64_t B = v.batch, mpan = (B + MR - 1) / MR, npan = (v.n_out + NR - 1) / NR;
  Buf<T> ap(static_cast<size_t>(mpan * MR * kKC));
#pragma omp parallel num_threads(nt)
  {
    Buf<T> bp(static_cast<size_t>(kKC * NR));
    T rowbuf[kKC];
    for (int64_t k0 = 0; k0 < v.n_in; k0 += kKC) {
      const int64_t kc = std::min(kKC, v.n_in - k0);
#pragma omp for schedule(static)
      for (int64_t p = 0; p < mpan; ++p) {
        const int64_t i0 = p * MR;
        pack_a<T, 2>(std::min<int64_t>(MR, B - i0), kc, x + i0 * a.ldx + k0, a.ldx, 1, ap.get() + i0 * kc);
      }
#pragma omp for schedule(static)
      for (int64_t q = 0; q < npan; ++q) {
        const int64_t j0 = q * NR;
        const int nr = static_cast<int>(std::min<int64_t>(NR, v.n_out - j0));
        T* b = bp.get();
        for (int j = 0; j < nr; ++j) {
          dequant_row(v, j0 + j, k0 / v.d, kc / v.d, v.scale(j0 + j), rowbuf);
          for (int64_t kk = 0; kk < kc; ++kk) b[kk * NR + j] = rowbuf[kk];
        }
        for (int j = nr; j < NR; ++j)
          for (int64_t kk = 0; kk < kc; ++kk) b[kk * NR + j] = T(0);
        for (int64_t i0 = 0; i0 < B; i0 += MR) {
          const int mr = static_cast<int>(std::min<int64_t>(MR, B - i0));
          micro_kernel<T, 2>(kc, ap.get() + i0 * kc, b, out + i0 * a.ldo + j0, a.ldo, 1, mr, nr, k0 > 0);
        }
      }
    }
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      T* o = out + b * a.ldo;
      if (bias)
        for (int64_t j = 0; j < v.n_out; ++j) o[j] += bias[j];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward, GEMV path (lookup tables).  For a tile of BT batch rows and a block of GB input groups:
// LUT[gl][m][k][0:BT] = <x[b, g*d : (g+1)*d], C_m[k]>, then every output row adds one LUT entry per
// (group, codebook) it codes.
template <typename T, int BT>
struct Lanes {
  typedef T vec __attribute__((vector_size(BT * sizeof(T))));
};
template <typename T>
struct Lanes<T, 1> {
  typedef T vec;
};

// The LUT block of one thread: groups [g0, g0 + gb) of set s, all M codebooks, all K codewords,
// BT lanes each.  BT = 1 reads the codebook transposed (cbT [S, M, d, K]) so the loop over codewords
// is the vectorized one; wider tiles vectorize over the batch rows.
template <typename T, typename CT, int BT>
inline void build_lut(const View<T, CT>& v, int64_t s, int64_t g0, int64_t gb, const T* xT, const T* cbT,
                      T* __restrict__ lut) {
  using V = typename Lanes<T, BT>::vec;
  const int d = v.d, M = v.M;
  const int64_t K = v.K;
  for (int64_t gl = 0; gl < gb; ++gl)
    for (int m = 0; m < M; ++m) {
      T* __restrict__ l = lut + (gl * M + m) * K * BT;
      const T* xg = xT + (g0 + gl) * d * BT;
      if (BT == 1) {
        const T* ct = cbT + (s * M + m) * d * K;
        const T x0 = xg[0];
        for (int64_t k = 0; k < K; ++k) l[k] = x0 * ct[k];
        for (int t = 1; t < d; ++t) {
          const T xt = xg[t];
          const T* __restrict__ c = ct + t * K;
          for (int64_t k = 0; k < K; ++k) l[k] += xt * c[k];
        }
      } else {
        const T* c = v.set_book(s, m);
#if defined(__AVX2__)
        if constexpr (std::is_same<T, float>::value && (BT == 8 || BT == 16)) {
          // explicit 256-bit FMAs: one broadcast codeword entry times the x^T row of the tile
          constexpr int NV = BT / 8;
          for (int64_t k = 0; k < K; ++k) {
            __m256 acc[NV];
            const __m256 c0 = _mm256_broadcast_ss(c + k * d);
            for (int q = 0; q < NV; ++q) acc[q] = _mm256_mul_ps(c0, _mm256_loadu_ps(xg + 8 * q));
            for (int t = 1; t < d; ++t) {
              const __m256 ct = _mm256_broadcast_ss(c + k * d + t);
              for (int q = 0; q < NV; ++q) acc[q] = _mm256_fmadd_ps(ct, _mm256_loadu_ps(xg + t * BT + 8 * q), acc[q]);
            }
            for (int q = 0; q < NV; ++q) _mm256_storeu_ps(l + k * BT + 8 * q, acc[q]);
          }
          continue;
        }
#endif
        V xv[16];
        for (int t = 0; t < d; ++t) std::memcpy(&xv[t], xg + t * BT, sizeof(V));
        for (int64_t k = 0; k < K; ++k) {
          V sum = c[k * d] * xv[0];
          for (int t = 1; t < d; ++t) sum += c[k * d + t] * xv[t];
          std::memcpy(l + k * BT, &sum, sizeof(V));
        }
      }
    }
}

// acc[0:BT] (+)= the n = gb*M LUT entries row o codes; four independent sums keep the adds off the
// critical path of the (L1/L2) table loads.
template <typename T, typename CT, int BT>
inline void lookup_row_generic(const CT* __restrict__ c, int64_t n, int64_t K, const T* __restrict__ lut, T* acc,
                       bool first) {
  using V = typename Lanes<T, BT>::vec;
  V s0 = V{}, s1 = V{}, s2 = V{}, s3 = V{};
  if (!first) std::memcpy(&s0, acc, sizeof(V));
  int64_t j = 0;
  for (; j + 3 < n; j += 4) {
    V l0, l1, l2, l3;
    std::memcpy(&l0, lut + (j * K + c[j]) * BT, sizeof(V));
    std::memcpy(&l1, lut + ((j + 1) * K + c[j + 1]) * BT, sizeof(V));
    std::memcpy(&l2, lut + ((j + 2) * K + c[j + 2]) * BT, sizeof(V));
    std::memcpy(&l3, lut + ((j + 3) * K + c[j + 3]) * BT, sizeof(V));
    s0 += l0;
    s1 += l1;
    s2 += l2;
    s3 += l3;
  }
  for (; j < n; ++j) {
    V l0;
    std::memcpy(&l0, lut + (j * K + c[j]) * BT, sizeof(V));
    s0 += l0;
  }
  s0 = (s0 + s1) + (s2 + s3);
  std::memcpy(acc, &s0, sizeof(V));
}

#if defined(__AVX2__)
// float tables 8 or 16 lanes wide: explicit 256-bit loads and adds.  (GCC's 64-byte vector type
// on AVX2 sometimes round-trips through the stack; these loops are the whole GEMV's cost.)
template <typename CT, int BT>
inline void lookup_row_avx2(const CT* __restrict__ c, int64_t n, int64_t K, const float* __restrict__ lut,
                            float* acc, bool first) {
  constexpr int NV = BT / 8;  // 1 or 2 vectors per table entry
  __m256 a[NV], b[NV];
  for (int v = 0; v < NV; ++v) {
    a[v] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + 8 * v);
    b[v] = _mm256_setzero_ps();
  }
  const int64_t step = K * BT;
  const float* base = lut;
  int64_t j = 0;
  for (; j + 1 < n; j += 2, base += 2 * step) {
    const float* p = base + static_cast<int64_t>(c[j]) * BT;
    const float* q = base + step + static_cast<int64_t>(c[j + 1]) * BT;
    for (int v = 0; v < NV; ++v) {
      a[v] = _mm256_add_ps(a[v], _mm256_loadu_ps(p + 8 * v));
      b[v] = _mm256_add_ps(b[v], _mm256_loadu_ps(q + 8 * v));
    }
  }
  if (j < n) {
    const float* p = base + static_cast<int64_t>(c[j]) * BT;
    for (int v = 0; v < NV; ++v) a[v] = _mm256_add_ps(a[v], _mm256_loadu_ps(p + 8 * v));
  }
  for (int v = 0; v < NV; ++v) _mm256_storeu_ps(acc + 8 * v, _mm256_add_ps(a[v], b[v]));
}
#endif

template <typename T, typename CT, int BT>
inline void lookup_row(const CT* __restrict__ c, int64_t n, int64_t K, const T* __restrict__ lut, T* acc,
                       bool first) {
#if defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value && (BT == 8 || BT == 16)) {
    lookup_row_avx2<CT, BT>(c, n, K, lut, acc, first);
    return;
  }
#endif
  lookup_row_generic<T, CT, BT>(c, n, K, lut, acc, first);
}

// The LUT block size (bytes) for a tile of BT rows: one vector-wide table row per lookup; the
// block spans >= 64 code bytes per row (whole cache lines of codes).
template <typename T>
int64_t lut_groups(int64_t G, int M, int64_t K, int BT) {
  const int64_t per_group = static_cast<int64_t>(M) * K * BT * static_cast<int64_t>(sizeof(T));
  const int64_t target = BT <= 4 ? 64 * 1024 : 256 * 1024;
  int64_t gb = std::max<int64_t>(1, target / per_group);
  return std::max<int64_t>(1, std::min(gb, G));
}

// One tile of BT batch rows.  No barriers: each thread owns a contiguous range of output rows and
// builds the LUT blocks its rows need itself (the build, batch*n_in*K*M MACs, is small next to the
// lookups for K <= 256; two threads building the same table costs less than syncing them, and a
// loaded machine does not stall on a descheduled partner).
template <typename T, typename CT, int BT>
void fwd_lut_tile(const View<T, CT>& v, const VqArgs& a, int64_t bt0, int bt, T* xT, const T* cbT, int nt) {
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  const T* bias = static_cast<const T*>(a.bias);
  const int M = v.M;
  const int64_t K = v.K, G = v.G;
  for (int64_t i = 0; i < v.n_in; ++i)
    for (int b = 0; b < BT; ++b) xT[i * BT + b] = b < bt ? x[(bt0 + b) * a.ldx + i] : T(0);
  const int64_t GB = lut_groups<T>(G, M, K, BT);
  const int64_t chunk = ((v.n_out + nt - 1) / nt + 15) / 16 * 16;
  const int nth = static_cast<int>(std::min<int64_t>(nt, (v.n_out + chunk - 1) / chunk));
#pragma omp parallel num_threads(nth)
  {
    const int64_t ra = std::min(v.n_out, omp_get_thread_num() * chunk), rb = std::min(v.n_out, ra + chunk);
    Buf<T> lut(static_cast<size_t>(GB * M * K * BT));
    Buf<T> acc(static_cast<size_t>((rb - ra) * BT));
    for (int64_t s = ra / v.rpc; ra < rb && s <= (rb - 1) / v.rpc; ++s) {
      const int64_t r0 = std::max(ra, s * v.rpc), r1 = std::min(rb, (s + 1) * v.rpc);
      for (int64_t g0 = 0; g0 < G; g0 += GB) {
        const int64_t gb = std::min(GB, G - g0);
        build_lut<T, CT, BT>(v, s, g0, gb, xT, cbT, lut.get());
        const int64_t seg = gb * M * static_cast<int64_t>(sizeof(CT));  // code bytes per row and block
        for (int64_t o = r0; o < r1; ++o) {
          // the code segments of rows ahead: one row's block is 64+ bytes at a stride of G*M codes,
          // a pattern the hardware prefetchers do not run far enough ahead on
          if (o + 8 < r1) {
            const char* pf = reinterpret_cast<const char*>(v.row_codes(o + 8) + g0 * M);
            for (int64_t off = 0; off < seg; off += 64) __builtin_prefetch(pf + off);
          }
          lookup_row<T, CT, BT>(v.row_codes(o) + g0 * M, gb * M, K, lut.get(), acc.get() + (o - ra) * BT, g0 == 0);
        }
      }
    }
    for (int b = 0; b < bt; ++b) {
      T* orow = out + (bt0 + b) * a.ldo;
      for (int64_t o = ra; o < rb; ++o) orow[o] = v.scale(o) * acc.get()[(o - ra) * BT + b] + (bias ? bias[o] : T(0));
    }
  }
}

template <typename T, typename CT>
void fwd_lut(const VqArgs& a, int nt) {
  const View<T, CT> v(a);
  T* out = static_cast<T*>(a.out);
  const T* bias = static_cast<const T*>(a.bias);
  if (v.G == 0) {  // n_in = 0: out = bias
    for (int64_t b = 0; b < v.batch; ++b)
      for (int64_t o = 0; o < v.n_out; ++o) out[b * a.ldo + o] = bias ? bias[o] : T(0);
    return;
  }
  constexpr int BTmax = 16;
  Buf<T> xT(static_cast<size_t>(v.n_in * BTmax));
  // the codebooks transposed, [S, M, d, K], for the one-row tables
  const bool one = v.batch % BTmax == 1 || v.batch == 1;
  Buf<T> cbT(one ? static_cast<size_t>(v.n_sets * v.M * v.d * v.K) : 1);
  if (one)
    for (int64_t sm = 0; sm < v.n_sets * v.M; ++sm)
      for (int64_t k = 0; k < v.K; ++k)
        for (int t = 0; t < v.d; ++t) cbT.get()[(sm * v.d + t) * v.K + k] = v.cb[(sm * v.K + k) * v.d + t];
  for (int64_t bt0 = 0; bt0 < v.batch; bt0 += BTmax) {
    // the narrowest tile that holds the rows left
    const int bt = static_cast<int>(std::min<int64_t>(BTmax, v.batch - bt0));
    if (bt == 1) fwd_lut_tile<T, CT, 1>(v, a, bt0, bt, xT.get(), cbT.get(), nt);
    else if (bt == 2) fwd_lut_tile<T, CT, 2>(v, a, bt0, bt, xT.get(), cbT.get(), nt);
    else if (bt <= 4) fwd_lut_tile<T, CT, 4>(v, a, bt0, bt, xT.get(), cbT.get(), nt);
    else if (bt <= 8) fwd_lut_tile<T, CT, 8>(v, a, bt0, bt, xT.get(), cbT.get(), nt);
    else fwd_lut_tile<T, CT, 16>(v, a, bt0, bt, xT.get(), cbT.get(), nt);
  }
}

// The path for KK_VQ_PATH_AUTO: a cycle model per thread, fitted to single-thread measurements on
// this repo's AVX2 machine (4096x4096, float32).  Tables: per tile of BT batch rows the build (FMAs
// over all K codewords of every group and set, 2 per cycle, 8 lanes) plus the lookups (about 2
// cycles each at BT = 1, one L1/L2 load; about 6 at BT = 16, a 64-byte entry from L2).  GEMM: the
// dequantization into the packed panels (about 1 + M cycles per weight: a codeword add per codebook
// and a strided store) plus the matmul at
// about 20 flop per cycle.  K <= 256 (VQ4DiT, AQLM 1x8 and 2x8) gives the tables at every batch;
// AQLM 1x16 (K = 65536) and many codebooks (8x8) give the GEMM.
template <typename T, typename CT>
bool use_lut(const VqArgs& a) {
  const View<T, CT> v(a);
  const double b = static_cast<double>(v.batch), M = v.M, K = static_cast<double>(v.K);
  const double bt = b >= 16 ? 16.0 : std::max(1.0, b), tiles = std::ceil(b / bt);
  const double lookups = double(v.n_out) * double(v.G) * M;
  const double lut = tiles * (v.n_sets * double(v.n_in) * M * K * bt / 16.0 + lookups * (2.0 + bt / 4.0));
  const double gemm = double(v.n_out) * double(v.n_in) * (1.0 + M) + 2.0 * b * double(v.n_out) * double(v.n_in) / 20.0;
  return lut <= gemm;
}

template <typename T, typename CT>
void fwd(const VqArgs& a, int nt) {
  bool lut = a.path == KK_VQ_PATH_GEMV || (a.path == KK_VQ_PATH_AUTO && use_lut<T, CT>(a));
  if (a.n_in == 0) lut = true;  // out = bias, handled there
  if (lut) fwd_lut<T, CT>(a, nt);
  else fwd_gemm<T, CT>(a, nt);
}

// ---------------------------------------------------------------------------------------------
// Backward (simple version): dx by input-group columns, each dequantized row used for all batch rows;
// dW rows per thread scattered into per-thread codebook gradients, reduced in thread order.
template <typename T, typename CT>
void bwd(const VqArgs& a, int nt) {
  const View<T, CT> v(a);
  const T* x = static_cast<const T*>(a.x);
  const T* dout = static_cast<const T*>(a.dout);
  const int64_t B = v.batch, n_in = v.n_in, G = v.G;
  const int d = v.d, M = v.M;
  if (a.dx) {
    T* dx = static_cast<T*>(a.dx);
    constexpr int64_t GC = 64;  // groups per column chunk
    const int64_t nchunks = (G + GC - 1) / GC;
#pragma omp parallel num_threads(nt)
    {
      std::vector<T> wrow(static_cast<size_t>(GC * d));
#pragma omp for schedule(static)
      for (int64_t q = 0; q < nchunks; ++q) {
        const int64_t g0 = q * GC, ng = std::min(GC, G - g0), c0 = g0 * d, nc = ng * d;
        for (int64_t b = 0; b < B; ++b) std::fill(dx + b * a.lddx + c0, dx + b * a.lddx + c0 + nc, T(0));
        for (int64_t o = 0; o < v.n_out; ++o) {
          dequant_row(v, o, g0, ng, v.scale(o), wrow.data());
          for (int64_t b = 0; b < B; ++b) {
            const T s = dout[b * a.lddo + o];
            T* dr = dx + b * a.lddx + c0;
            for (int64_t i = 0; i < nc; ++i) dr[i] += s * wrow[i];
          }
        }
      }
    }
  }
  if (a.dcodebooks || a.dscales) {
    const int64_t per_set = static_cast<int64_t>(M) * v.K * d, ncb = v.n_sets * per_set;
    T* dcb = static_cast<T*>(a.dcodebooks);
    T* ds = static_cast<T*>(a.dscales);
    std::vector<T> part(a.dcodebooks ? static_cast<size_t>(ncb) * nt : 0, T(0));
#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num();
      T* mine = a.dcodebooks ? part.data() + static_cast<size_t>(tid) * ncb : nullptr;
      std::vector<T> dw(static_cast<size_t>(n_in)), u(static_cast<size_t>(n_in));
#pragma omp for schedule(static)
      for (int64_t o = 0; o < v.n_out; ++o) {
        std::fill(dw.begin(), dw.end(), T(0));
        for (int64_t b = 0; b < B; ++b) {
          const T s = dout[b * a.lddo + o];
          const T* xr = x + b * a.ldx;
          for (int64_t i = 0; i < n_in; ++i) dw[i] += s * xr[i];
        }
        if (ds) {
          dequant_row(v, o, 0, G, T(1), u.data());
          T acc = 0;
          for (int64_t i = 0; i < n_in; ++i) acc += dw[i] * u[i];
          ds[o] = acc;
        }
        if (mine) {
          const T sc = v.scale(o);
          const CT* c = v.row_codes(o);
          T* ms = mine + (o / v.rpc) * per_set;
          for (int64_t g = 0; g < G; ++g)
            for (int m = 0; m < M; ++m) {
              T* dst = ms + (static_cast<int64_t>(m) * v.K + c[g * M + m]) * d;
              for (int t = 0; t < d; ++t) dst[t] += sc * dw[g * d + t];
            }
        }
      }
      if (dcb) {
#pragma omp for schedule(static)
        for (int64_t e = 0; e < ncb; ++e) {
          T acc = 0;
          for (int t = 0; t < nt; ++t) acc += part[static_cast<size_t>(t) * ncb + e];
          dcb[e] = acc;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Assignment: per vector, the distances to a chunk of centroids at once from the centroids transposed
// ([d][K], built once per call), so the inner loop runs over centroids and vectorizes; then the topn
// smallest of the chunk: a vectorized minimum for topn = 1 (the first index holding it: ties go to the
// smaller index), an insertion list fed only by distances below its current last entry otherwise.
// Each distance is the sum over t of (v_t - c_t)^2 in t order, as the scalar definition.
// No fused multiply-add here: a distance is rounded as the definition is written (a product, then a sum),
// so exact ties (symmetric points, duplicate centroids) stay ties and go to the smaller index.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <typename T>
void assign(int64_t n, int64_t K, int d, const T* vec, const T* cen, int topn, int32_t* idx, T* dist,
            int nt) {
  constexpr int64_t KC = 512;  // centroids per chunk: the distance buffer stays in L1
  Buf<T> cT(static_cast<size_t>(d * K));
  for (int64_t k = 0; k < K; ++k)
    for (int t = 0; t < d; ++t) cT.get()[t * K + k] = cen[k * d + t];
  const T* __restrict__ ct = cT.get();
#pragma omp parallel num_threads(nt)
  {
    alignas(64) T db[KC];
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const T* p = vec + i * d;
      T bd[8];
      int32_t bi[8];
      int cnt = 0;
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min(KC, K - k0);
        {
          const T p0 = p[0];
          const T* __restrict__ c0 = ct + k0;
          for (int64_t k = 0; k < kc; ++k) {
            const T df = p0 - c0[k];
            db[k] = df * df;
          }
        }
        for (int t = 1; t < d; ++t) {
          const T pt = p[t];
          const T* __restrict__ c = ct + t * K + k0;
          for (int64_t k = 0; k < kc; ++k) {
            const T df = pt - c[k];
            db[k] += df * df;
          }
        }
        if (topn == 1) {
          T m = std::numeric_limits<T>::infinity();
          for (int64_t k = 0; k < kc; ++k) m = db[k] < m ? db[k] : m;  // NaN distances never win
          if (cnt == 1 && !(m < bd[0])) continue;
          int64_t k = 0;
          while (k < kc && !(db[k] == m)) ++k;
          if (k == kc) {  // no finite distance in this chunk (NaN or infinite input): keep a defined pick
            if (cnt == 1) continue;
            k = 0;
            m = db[0];
          }
          bd[0] = m;
          bi[0] = static_cast<int32_t>(k0 + k);
          cnt = 1;
          continue;
        }
        for (int64_t k = 0; k < kc; ++k) {
          const T sd = db[k];
          if (cnt == topn && !(sd < bd[topn - 1])) continue;
          int j = cnt < topn ? cnt++ : topn - 1;
          while (j > 0 && sd < bd[j - 1]) {
            bd[j] = bd[j - 1];
            bi[j] = bi[j - 1];
            --j;
          }
          bd[j] = sd;
          bi[j] = static_cast<int32_t>(k0 + k);
        }
      }
      for (int j = 0; j < topn; ++j) {
        idx[i * topn + j] = cnt > j ? bi[j] : 0;
        if (dist) dist[i * topn + j] = cnt > j ? bd[j] : T(0);
      }
    }
  }
}

#pragma GCC pop_options

template <typename T>
kk_status by_codes(const VqArgs& a, void (*f8)(const VqArgs&, int), void (*f16)(const VqArgs&, int), int nt) {
  (a.code_bits == 8 ? f8 : f16)(a, nt);
  return KK_OK;
}

}  // namespace

kk_status vq_dequantize(kk_dtype dtype, const VqArgs& a, int nt) {
  if (dtype == KK_FLOAT32) return by_codes<float>(a, dequantize<float, uint8_t>, dequantize<float, uint16_t>, nt);
  return by_codes<double>(a, dequantize<double, uint8_t>, dequantize<double, uint16_t>, nt);
}

kk_status vq_fwd(kk_dtype dtype, const VqArgs& a, int nt) {
  if (dtype == KK_FLOAT32) return by_codes<float>(a, fwd<float, uint8_t>, fwd<float, uint16_t>, nt);
  return by_codes<double>(a, fwd<double, uint8_t>, fwd<double, uint16_t>, nt);
}

kk_status vq_bwd(kk_dtype dtype, const VqArgs& a, int nt) {
  if (dtype == KK_FLOAT32) return by_codes<float>(a, bwd<float, uint8_t>, bwd<float, uint16_t>, nt);
  return by_codes<double>(a, bwd<double, uint8_t>, bwd<double, uint16_t>, nt);
}

kk_status vq_assign(kk_dtype dtype, int64_t n, int64_t K, int d, const void* vectors, const void* centroids,
                    int topn, int32_t* idx, void* dist, int nt) {
  if (dtype == KK_FLOAT32)
    assign<float>(n, K, d, static_cast<const float*>(vectors), static_cast<const float*>(centroids), topn, idx,
                  static_cast<float*>(dist), nt);
  else
    assign<double>(n, K, d, static_cast<const double*>(vectors), static_cast<const double*>(centroids), topn,
                   idx, static_cast<double*>(dist), nt);
  return KK_OK;
}

}  // namespace KK_ISA_NS
}  // namespace kk
