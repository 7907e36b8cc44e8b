// Register-blocked GEMM building blocks for the CPU kernels (internal; header-only).
//
// C[M x N] (+)= A[M x K] * B[K x N] with both operands "packed" (GotoBLAS/BLIS style):
//   - A is split into panels of MR rows, each stored K-major (MR elements per k), zero padded;
//   - B is split into panels of NR columns, each stored K-major (NR elements per k), zero padded.
// Packing reads the source through two arbitrary strides, so transposed, permuted and strided
// operands (the Monarch permutations, dO^T, h = t[:, c::l], ...) cost one pass each, and the
// micro-kernel always streams two contiguous panels: MR broadcasts from one pointer and NV vector
// loads per k, feeding MR x NV vector accumulators.  C is written through (c_rs, c_cs);
// c_cs == 1 takes the vector path.
// GCC vector extensions let one source serve SSE, AVX2 and AVX-512: this file is compiled once per
// ISA (see setup.py and monarch_api.cpp), and the register tile is sized to the ISA's registers.
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

// Register tile of the micro-kernel: MR rows x NV vectors.  NV = 2 is the main shape; NV = 1 (a
// taller, narrower tile) serves GEMMs whose N leaves half a wide panel empty (N = 48 = 32 + 16 with
// 16-lane vectors), which small Monarch blocks hit in every stage.
template <typename T, int NV_ = 2>
struct Tile {
  typedef T vec __attribute__((vector_size(kVecBytes)));
  static constexpr int VL = kVecBytes / sizeof(T);  // lanes per vector
  static constexpr int NV = NV_;                      // vectors per row of the micro-tile
  static constexpr int NR = VL * NV;                  // columns per B panel
  // Rows per micro-tile: MR*NV accumulators + NV B vectors + 1 broadcast must fit the register
  // file (32 zmm with AVX-512, 16 ymm/xmm otherwise).
  static constexpr int MR = kVecBytes == 64 ? (NV == 2 ? 12 : 24) : (NV == 2 ? 6 : 12);
};

// The tile width for an N-column output: the narrow tile when a wide one would waste more lanes.
template <typename T>
inline bool use_narrow(int64_t N) {
  constexpr int VL = Tile<T>::VL;
  const int64_t rem = N % (2 * VL);
  return rem != 0 && rem <= VL;
}

// Packs B (K x N, element (kk, j) at src[kk*rs_k + j*cs_n]) into ceil(N/NR) panels, each K x NR.
template <typename T, int NV>
inline void pack_b(int64_t K, int64_t N, const T* src, int64_t rs_k, int64_t cs_n, T* dst) {
  constexpr int NR = Tile<T, NV>::NR;
  for (int64_t j0 = 0; j0 < N; j0 += NR) {
    const int64_t nr = N - j0 < NR ? N - j0 : NR;
    T* panel = dst + j0 * K;  // panel j0/NR starts at (j0/NR) * K * NR
    if (rs_k == 1) {  // B is a transposed row-major matrix (the weights in the forward): read its
                      // rows contiguously, not one cache line per element
      for (int64_t j = 0; j < nr; ++j) {
        const T* s = src + (j0 + j) * cs_n;
        for (int64_t kk = 0; kk < K; ++kk) panel[kk * NR + j] = s[kk];
      }
      for (int64_t kk = 0; kk < K; ++kk)
        for (int64_t j = nr; j < NR; ++j) panel[kk * NR + j] = T(0);
      continue;
    }
    for (int64_t kk = 0; kk < K; ++kk) {
      const T* s = src + kk * rs_k + j0 * cs_n;
      T* d = panel + kk * NR;
      int64_t j = 0;
      for (; j < nr; ++j) d[j] = s[j * cs_n];
      for (; j < NR; ++j) d[j] = T(0);
    }
  }
}

template <typename T, int NV>
inline int64_t packed_size(int64_t K, int64_t N) {
  constexpr int NR = Tile<T, NV>::NR;
  return ((N + NR - 1) / NR) * NR * K;
}

// Packs A (M x K, element (i, kk) at src[i*rs_m + kk*cs_k]) into ceil(M/MR) panels, each K x MR.
template <typename T, int NV>
inline void pack_a(int64_t M, int64_t K, const T* src, int64_t rs_m, int64_t cs_k, T* dst) {
  constexpr int MR = Tile<T, NV>::MR;
  for (int64_t i0 = 0; i0 < M; i0 += MR) {
    const int64_t mr = M - i0 < MR ? M - i0 : MR;
    T* panel = dst + i0 * K;
    const T* s = src + i0 * rs_m;
    if (cs_k == 1) {  // rows contiguous in k: transpose 16-column slabs through a small buffer
      constexpr int KB = 16;
      int64_t k0 = 0;
      if (mr == MR) {
        for (; k0 + KB <= K; k0 += KB) {
          T slab[MR][KB];  // row i, columns k0 .. k0+KB: contiguous loads
#pragma GCC unroll 32
          for (int i = 0; i < MR; ++i) std::memcpy(slab[i], s + i * rs_m + k0, sizeof(slab[i]));
          for (int kk = 0; kk < KB; ++kk)
#pragma GCC unroll 32
            for (int i = 0; i < MR; ++i) panel[(k0 + kk) * MR + i] = slab[i][kk];
        }
      }
      for (int64_t i = 0; i < mr; ++i)
        for (int64_t kk = k0; kk < K; ++kk) panel[kk * MR + i] = s[i * rs_m + kk];
    } else {
      for (int64_t kk = 0; kk < K; ++kk)
        for (int64_t i = 0; i < mr; ++i) panel[kk * MR + i] = s[i * rs_m + kk * cs_k];
    }
    for (int64_t i = mr; i < MR; ++i)
      for (int64_t kk = 0; kk < K; ++kk) panel[kk * MR + i] = T(0);
  }
}

template <typename T, int NV>
inline int64_t packed_a_size(int64_t M, int64_t K) {
  constexpr int MR = Tile<T, NV>::MR;
  return ((M + MR - 1) / MR) * MR * K;
}

// The register tile: C[0:mr, 0:nr] (+)= A[0:MR, 0:K] * Bpanel (K x NR), where A's element (i, kk)
// comes from `a(i, kk)` (a packed panel, or weight rows read in place) and is broadcast once.
template <typename T, int NV, int MR, typename ARead>
inline void micro_tile(int64_t K, const ARead& a, const T* __restrict__ bp, T* C, int64_t c_rs,
                       int64_t c_cs, int mr, int nr, bool accumulate) {
  using V = typename Tile<T, NV>::vec;
  constexpr int VL = Tile<T, NV>::VL, NR = Tile<T, NV>::NR;
  V acc[MR][NV];
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = V{};

  for (int64_t kk = 0; kk < K; ++kk) {
    V b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) std::memcpy(&b[v], bp + kk * NR + v * VL, sizeof(V));
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) {
      const T ai = a(i, kk);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] += ai * b[v];
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

// A from a packed panel (K x MR, MR elements per k).
template <typename T, int MR>
struct PackedA {
  const T* __restrict__ ap;
  T operator()(int i, int64_t kk) const { return ap[kk * MR + i]; }
};

// One MR x NR micro-tile: C[0:mr, 0:nr] (+)= Apanel (K x MR) * Bpanel (K x NR).
template <typename T, int NV>
inline void micro_kernel(int64_t K, const T* __restrict__ ap, const T* __restrict__ bp, T* C,
                         int64_t c_rs, int64_t c_cs, int mr, int nr, bool accumulate) {
  constexpr int MR = Tile<T, NV>::MR;
  micro_tile<T, NV, MR>(K, PackedA<T, MR>{ap}, bp, C, c_rs, c_cs, mr, nr, accumulate);
}

// Small-batch kernel: C[0:mr, 0:nr] = A[0:mr, 0:K] * panel with A read in place (rows at stride
// lda, contiguous in k) -- A is a weight matrix used once, so packing it would double its traffic.
// Each weight element is broadcast once and meets all (<= NR) activation columns of the panel.
template <typename T, int NV>
struct RowTile {
  static constexpr int MR = (kVecBytes == 64 || NV == 1) ? 8 : 4;  // row pointers stay in registers
};

template <typename T, int MR>
struct RowsA {
  const T* rows[MR];
  T operator()(int i, int64_t kk) const { return rows[i][kk]; }
};

template <typename T, int NV>
inline void micro_rows(int64_t K, const T* A, int64_t lda, int mr, const T* __restrict__ bp, T* C,
                       int64_t c_rs, int64_t c_cs, int nr) {
  constexpr int MR = RowTile<T, NV>::MR;
  RowsA<T, MR> a;
  for (int i = 0; i < MR; ++i) a.rows[i] = A + (i < mr ? i : mr - 1) * lda;  // extra rows repeat the last
  micro_tile<T, NV, MR>(K, a, bp, C, c_rs, c_cs, mr, nr, false);
}

// C[0:M, 0:N] (+)= A * B for packed A (all M rows) and packed B panels [j0/NR, j1/NR) of N.
// Panel-outer order: one B panel (K x NR) stays in L1/L2 while all A panels stream past it.
template <typename T, int NV>
inline void gemm_packed(int64_t M, int64_t N, int64_t K, const T* ap, const T* bp, int64_t j0,
                        int64_t j1, T* C, int64_t c_rs, int64_t c_cs, bool accumulate) {
  constexpr int MR = Tile<T, NV>::MR, NR = Tile<T, NV>::NR;
  for (int64_t j = j0; j < j1 && j < N; j += NR) {
    const int nr = static_cast<int>(N - j < NR ? N - j : NR);
    for (int64_t i0 = 0; i0 < M; i0 += MR) {
      const int mr = static_cast<int>(M - i0 < MR ? M - i0 : MR);
      micro_kernel<T, NV>(K, ap + i0 * K, bp + j * K, C + i0 * c_rs + j * c_cs, c_rs, c_cs, mr, nr,
                      accumulate);
    }
  }
}

}  // namespace KK_ISA_NS
}  // namespace kk
