// Register-blocked GEMM building blocks for the CPU kernels (internal; header-only).
//
// C[M x N] (+)= A[M x K] * B[K x N], where
//   - A is read in place through two strides (a_rs between rows, a_cs between the K entries), so
//     transposed, permuted and strided operands (the Monarch permutations!) cost nothing extra:
//     the micro-kernel only ever broadcasts single elements of A;
//   - B is "packed": split into panels of NR columns, each panel stored K-major and contiguous
//     (NR elements per k), zero padded past N.  Packing is where we pay for B's layout, once;
//   - C is written through (c_rs, c_cs); c_cs == 1 takes the vector path.
// The accumulators live in MR x NV vector registers (GCC vector extensions, so one source serves
// SSE, AVX2 and AVX-512: this file is compiled once per ISA, see setup.py and monarch_api.cpp).
// Classic GotoBLAS/BLIS blocking, minus the A packing: A tiles of this library are small and hot
// in L1/L2 because the callers tile the batch dimension.
#pragma once

#include <cstdint>
#include <cstring>

namespace kk {
namespace KK_ISA_NS {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX2__) || defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

template <typename T>
struct Tile {
  typedef T vec __attribute__((vector_size(kVecBytes)));
  static constexpr int VL = kVecBytes / sizeof(T);  // lanes per vector
  static constexpr int NV = 2;                        // vectors per row of the micro-tile
  static constexpr int NR = VL * NV;                  // columns per B panel
  // Rows per micro-tile: MR*NV accumulators + NV B vectors + 1 broadcast must fit the register
  // file (32 zmm with AVX-512, 16 ymm/xmm otherwise).
  static constexpr int MR = kVecBytes == 64 ? 12 : 6;
};

// Packs B (K x N, element (kk, j) at src[kk*rs_k + j*cs_n]) into ceil(N/NR) panels, each K x NR.
template <typename T>
inline void pack_b(int64_t K, int64_t N, const T* src, int64_t rs_k, int64_t cs_n, T* dst) {
  constexpr int NR = Tile<T>::NR;
  for (int64_t j0 = 0; j0 < N; j0 += NR) {
    const int64_t nr = N - j0 < NR ? N - j0 : NR;
    T* panel = dst + j0 * K;  // panel j0/NR starts at (j0/NR) * K * NR
    for (int64_t kk = 0; kk < K; ++kk) {
      const T* s = src + kk * rs_k + j0 * cs_n;
      T* d = panel + kk * NR;
      int64_t j = 0;
      for (; j < nr; ++j) d[j] = s[j * cs_n];
      for (; j < NR; ++j) d[j] = T(0);
    }
  }
}

template <typename T>
inline int64_t packed_size(int64_t K, int64_t N) {
  constexpr int NR = Tile<T>::NR;
  return ((N + NR - 1) / NR) * NR * K;
}

// One MR x NR micro-tile: C[0:mr, 0:nr] (+)= A[0:mr, 0:K] * panel[0:K, 0:nr].
template <typename T>
inline void micro_kernel(int64_t K, const T* A, int64_t a_rs, int64_t a_cs, int mr,
                         const T* __restrict__ panel, T* C, int64_t c_rs, int64_t c_cs, int nr,
                         bool accumulate) {
  using V = typename Tile<T>::vec;
  constexpr int MR = Tile<T>::MR, NV = Tile<T>::NV, VL = Tile<T>::VL, NR = Tile<T>::NR;
  // Rows past mr re-read the last valid row (never out of bounds); their results are dropped.
  const T* arow[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) arow[i] = A + (i < mr ? i : mr - 1) * a_rs;

  V acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = V{} ;

  for (int64_t kk = 0; kk < K; ++kk) {
    V b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) std::memcpy(&b[v], panel + kk * NR + v * VL, sizeof(V));
    const int64_t off = kk * a_cs;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const T a = arow[i][off];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] += a * b[v];
    }
  }

  if (c_cs == 1 && nr == NR) {
    for (int i = 0; i < mr; ++i) {
      T* c = C + i * c_rs;
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        V out = acc[i][v];
        if (accumulate) {
          V old;
          std::memcpy(&old, c + v * VL, sizeof(V));
          out += old;
        }
        std::memcpy(c + v * VL, &out, sizeof(V));
      }
    }
  } else {
    for (int i = 0; i < mr; ++i) {
      T tmp[NR];
      std::memcpy(tmp, &acc[i][0], sizeof(tmp));
      T* c = C + i * c_rs;
      for (int j = 0; j < nr; ++j) {
        if (accumulate)
          c[j * c_cs] += tmp[j];
        else
          c[j * c_cs] = tmp[j];
      }
    }
  }
}

// C[0:M, 0:nr] (+)= A[0:M, 0:K] * panel, one packed panel (nr <= NR columns), all M rows.
template <typename T>
inline void gemm_panel(int64_t M, int64_t K, const T* A, int64_t a_rs, int64_t a_cs,
                       const T* panel, T* C, int64_t c_rs, int64_t c_cs, int nr, bool accumulate) {
  constexpr int MR = Tile<T>::MR;
  for (int64_t i0 = 0; i0 < M; i0 += MR) {
    const int mr = static_cast<int>(M - i0 < MR ? M - i0 : MR);
    micro_kernel<T>(K, A + i0 * a_rs, a_rs, a_cs, mr, panel, C + i0 * c_rs, c_rs, c_cs, nr,
                    accumulate);
  }
}

}  // namespace KK_ISA_NS
}  // namespace kk
