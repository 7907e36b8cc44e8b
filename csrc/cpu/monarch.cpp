// Fused Monarch product on the CPU: forward and backward, OpenMP, float32 / float64.
//
// Math (Dao et al., "Monarch", ICML 2022; the generalized (k,q,p)/(l,s,r) layout of
// HazyResearch/fly, see csrc/include/kernelkit/kernelkit.h):
//   t[b, a*q + i]   = sum_j w1[a, i, j] x[b, a*p + j]           stage 1, k GEMMs  (B x p)(p x q)
//   h[b, c, m]      = t[b, m*l + c]                              permutation P1 (never copied)
//   out[b, n*l + c] = sum_m w2[c, n, m] h[b, c, m]               stage 2, l GEMMs  (B x r)(r x s)
//
// Why this is faster than the usual bmm path: the bmm path writes the intermediate, copies it
// through a permute, and copies the output through another one (each a full pass over memory).
// Here the batch is cut into tiles of BM rows; a tile's intermediate t stays in one cache-resident
// buffer, and both permutations are folded into strides: the packing of the micro-kernel's A operand
// reads h[b, c, :] as t + c with column stride l, and C is written to output columns n*l + c.
// Weights are packed once per call into register-panel order (gemm.h).
//
// Backward recomputes t per tile (nothing but x, w1, w2 is saved), then per tile:
//   dt[b, m*l + c] = sum_n dout[b, n*l + c] w2[c, n, m]        (dO read in place, strided)
//   dw2[c, n, m]  += sum_b dout[b, n*l + c] t[b, m*l + c]
//   dx[b, a*p + j] = sum_i dt[b, a*q + i] w1[a, i, j]
//   dw1[a, i, j]  += sum_b dt[b, a*q + i] x[b, a*p + j]
// Threads split each stage's (block, group of column panels) work items, so every weight-gradient
// element has exactly one writer: no atomics and no per-thread copies to reduce.  Accumulation is in
// the element type (fp32 or fp64).
//
// This file is compiled once per ISA (KK_ISA_NS = isa_avx512 / isa_avx2 / isa_base);
// monarch_api.cpp validates arguments and picks the variant at run time.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "gemm.h"
#include "monarch_impl.h"

namespace kk {
namespace KK_ISA_NS {
namespace {

struct Dims {
  int64_t B, k, q, p, l, s, r;
  int64_t kq() const { return k * q; }
};

// Scratch blocks are recycled per calling thread: large malloc blocks are fresh mmaps, and their
// first-touch page faults cost milliseconds per call once the packed weights reach tens of MB.
// The cache keeps at most kCachedBlocks blocks (those of the last calls) and frees the rest.
constexpr size_t kCachedBlocks = 24;

struct BlockCache {
  std::vector<std::pair<void*, size_t>> free_blocks;
  ~BlockCache() {
    for (auto& b : free_blocks) std::free(b.first);
  }
  void* take(size_t bytes) {
    size_t best = free_blocks.size();
    for (size_t i = 0; i < free_blocks.size(); ++i)  // smallest cached block that fits
      if (free_blocks[i].second >= bytes && (best == free_blocks.size() || free_blocks[i].second < free_blocks[best].second))
        best = i;
    if (best < free_blocks.size()) {
      void* p = free_blocks[best].first;
      free_blocks.erase(free_blocks.begin() + static_cast<std::ptrdiff_t>(best));
      return p;
    }
    void* p = std::aligned_alloc(64, bytes);
    if (!p) throw std::bad_alloc();
    return p;
  }
  void give(void* p, size_t bytes) {
    free_blocks.emplace_back(p, bytes);
    if (free_blocks.size() > kCachedBlocks) {  // drop the oldest
      std::free(free_blocks.front().first);
      free_blocks.erase(free_blocks.begin());
    }
  }
};
thread_local BlockCache t_cache;

// 64-byte aligned scratch, returned to the calling thread's cache on destruction.
template <typename T>
struct Buffer {
  T* ptr = nullptr;
  size_t bytes = 0;
  explicit Buffer(int64_t n) {
    bytes = static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T);
    bytes = (bytes + 4095) / 4096 * 4096;  // page multiples: fewer distinct sizes to match
    ptr = static_cast<T*>(t_cache.take(bytes));
  }
  ~Buffer() { t_cache.give(ptr, bytes); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Batch tile: the tile's intermediate t (bm x k*q) should stay in L2 (forward) or L3 (backward,
// where bigger tiles amortise the read-modify-write of the weight gradients).
template <typename T>
int64_t batch_tile(const Dims& d, bool backward) {
  constexpr int MR = Tile<T>::MR;
  const int64_t budget = (backward ? 2048 : 1024) * 1024;  // bytes for the t tile
  int64_t bm = budget / (std::max<int64_t>(d.kq(), 1) * static_cast<int64_t>(sizeof(T)));
  bm = std::min<int64_t>(std::max<int64_t>(bm, 4 * MR), 512) / MR * MR;
  return std::min(bm, std::max<int64_t>(d.B, 1));
}

// Runs f with the micro-kernel width (std::integral_constant NV = 1 or 2) chosen for N columns.
template <typename T, typename F>
inline void with_tile(bool narrow, F&& f) {
  if (narrow)
    f(std::integral_constant<int, 1>{});
  else
    f(std::integral_constant<int, 2>{});
}

template <typename T>
inline int64_t nr_of(bool narrow) { return narrow ? Tile<T, 1>::NR : Tile<T, 2>::NR; }

// A weight packed once per call as the B operand (K x N) of one stage, in the tile width that
// suits N.
template <typename T>
struct PackedWeight {
  bool narrow;
  int64_t per_block;  // elements per block
  Buffer<T> buf;
  PackedWeight(int64_t nblk, int64_t K, int64_t N, bool needed)
      : narrow(use_narrow<T>(N)),
        per_block(narrow ? packed_size<T, 1>(K, N) : packed_size<T, 2>(K, N)),
        buf(needed ? nblk * per_block : 0) {}
  // Packs block `blk` whose element (kk, j) is src[kk*rs_k + j*cs_n].
  void pack(int64_t blk, int64_t K, int64_t N, const T* src, int64_t rs_k, int64_t cs_n) {
    with_tile<T>(narrow, [&](auto nv) {
      pack_b<T, decltype(nv)::value>(K, N, src, rs_k, cs_n, buf.ptr + blk * per_block);
    });
  }
  const T* block(int64_t blk) const { return buf.ptr + blk * per_block; }
};

// Work items of one stage: `nblk` blocks x `ngroup` groups of column panels of an N-wide output.
// Groups exist so that a few big blocks still give every thread work at small batch.
struct Split {
  int64_t ngroup, per;  // groups per block, columns per group (a multiple of the panel width)
  Split(int64_t nblk, int64_t N, int64_t nr, int64_t workers) {
    const int64_t npan = cdiv(N, nr);
    ngroup = std::min(std::max<int64_t>(cdiv(2 * workers, nblk), 1), npan);
    per = cdiv(npan, ngroup) * nr;
  }
  int64_t items(int64_t nblk) const { return nblk * ngroup; }
};

// Per-thread packing scratch, sized for either tile width.
template <typename T>
struct Scratch {
  Buffer<T> a, at, b;
  static int64_t asz(int64_t M, int64_t K) {
    return std::max(packed_a_size<T, 1>(M, K), packed_a_size<T, 2>(M, K));
  }
  Scratch(const Dims& d, int64_t bm)
      : a(asz(bm, std::max({d.p, d.q, d.r, d.s}))),
        at(asz(std::max(d.s, d.q), bm)),
        b(std::max(packed_size<T, 1>(bm, std::max(d.r, d.p)), packed_size<T, 2>(bm, std::max(d.r, d.p)))) {}
};

// The Monarch permutations, applied to one batch tile of rows [b0, b1) at a time:
//   to_blocks:   blk[c][b][m] = rows[b*ld + m*l + c]     (mt, w, l) -> (l, mt, w)
//   from_blocks: rows[b*ld + m*l + c] = blk[c][b][m]
// One streaming pass each.  Reading the permuted operands in place instead (stride l) touches a
// new cache line per element once l >= 16, and every block c touches them all again.
template <typename T>
inline void to_blocks(const T* rows, int64_t ld, int64_t mt, int64_t l, int64_t w, T* blk,
                      int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const T* row = rows + b * ld;
    for (int64_t c = 0; c < l; ++c) {
      T* dst = blk + (c * mt + b) * w;
      for (int64_t m = 0; m < w; ++m) dst[m] = row[m * l + c];
    }
  }
}

template <typename T>
inline void from_blocks(const T* blk, int64_t mt, int64_t l, int64_t w, T* rows, int64_t ld,
                        int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    T* row = rows + b * ld;
    for (int64_t c = 0; c < l; ++c) {
      const T* src = blk + (c * mt + b) * w;
      for (int64_t m = 0; m < w; ++m) row[m * l + c] = src[m];
    }
  }
}

// Rows [b0, b1) of `mt` for thread `tid` of `nt` (static split, used inside parallel regions).
inline void row_range(int64_t mt, int tid, int nt, int64_t* b0, int64_t* b1) {
  const int64_t per = cdiv(mt, nt);
  *b0 = std::min(mt, tid * per);
  *b1 = std::min(mt, *b0 + per);
}

// One Scratch per OpenMP thread, allocated by the calling thread (outside the parallel region,
// so an allocation failure surfaces as std::bad_alloc in the entry point).
template <typename T>
std::vector<std::unique_ptr<Scratch<T>>> make_scratch(const Dims& d, int64_t bm, int nthreads) {
  std::vector<std::unique_ptr<Scratch<T>>> v;
  for (int i = 0; i < nthreads; ++i) v.push_back(std::make_unique<Scratch<T>>(d, bm));
  return v;
}

// C = A B with A (M x K) at (src, rs_m, cs_k) and a packed weight's block, columns [j0, j1).
template <typename T>
inline void gemm_weight(const PackedWeight<T>& w, int64_t blk, int64_t M, int64_t N, int64_t K,
                        const T* a_src, int64_t rs_m, int64_t cs_k, T* abuf, int64_t j0, int64_t j1,
                        T* C, int64_t c_rs, int64_t c_cs) {
  with_tile<T>(w.narrow, [&](auto nv) {
    constexpr int NV = decltype(nv)::value;
    // A rows contiguous in k and not too long: read them in place (micro_rows) instead of packing
    // them -- the packing pass cost 10-25% on small blocks (nb16) and one broadcast still feeds NV
    // FMAs either way.  Long rows (K > 512) stream better from a packed panel: 4096 nb4's forward
    // measured 5% slower in place.
    if (cs_k == 1 && K <= 512) {
      constexpr int MR = RowTile<T, NV>::MR, NR = Tile<T, NV>::NR;
      for (int64_t j = j0; j < j1 && j < N; j += NR) {
        const int nr = static_cast<int>(std::min<int64_t>(NR, N - j));
        for (int64_t i0 = 0; i0 < M; i0 += MR)
          micro_rows<T, NV>(K, a_src + i0 * rs_m, rs_m, static_cast<int>(std::min<int64_t>(MR, M - i0)),
                            w.block(blk) + j * K, C + i0 * c_rs + j * c_cs, c_rs, c_cs, nr);
      }
      return;
    }
    pack_a<T, NV>(M, K, a_src, rs_m, cs_k, abuf);
    gemm_packed<T, NV>(M, N, K, abuf, w.block(blk), j0, j1, C, c_rs, c_cs, false);
  });
}

// C (M x n) += A B over the tile's rows (K = rows): A^T and B both packed from activations.
template <typename T>
inline void gemm_grad(bool narrow, int64_t M, int64_t n, int64_t K, const T* a_src, int64_t rs_m,
                      int64_t cs_k, const T* b_src, int64_t rs_k, int64_t cs_n, Scratch<T>& sc, T* C,
                      int64_t c_rs) {
  with_tile<T>(narrow, [&](auto nv) {
    constexpr int NV = decltype(nv)::value;
    pack_a<T, NV>(M, K, a_src, rs_m, cs_k, sc.at.ptr);
    pack_b<T, NV>(K, n, b_src, rs_k, cs_n, sc.b.ptr);
    gemm_packed<T, NV>(M, n, K, sc.at.ptr, sc.b.ptr, 0, n, C, c_rs, 1, true);
  });
}

// Small batches (inference): packing the weights would cost more than the product itself (it
// reads and writes every weight once more), so both small-batch forwards read each weight once,
// in place, and write t straight into block layout h[c][b][m] = t[b, m*l + c]:
//  - fwd_dot (batch <= kDotBatch): one dot product per (weight row, activation row); a vector
//    lane per weight element, so it runs at memory speed, but every dot ends in a horizontal sum;
//  - fwd_small (see small_batch): weight rows are the A operand of micro_rows against the
//    activation rows packed as B panels (N = batch), so each weight element is broadcast once per
//    panel and meets its activation rows -- lanes idle when the batch is much narrower than a vector.
// Crossovers measured in bench/NOTES.md (small-batch table).
constexpr int64_t kDotBatch = 3;

// Up to one 2-vector panel of batch columns always; up to 4 panels when the weights are big
// (> 8 MB), where packing them costs as much as the product (measured: 4096 -> 4096 nb4 at batch
// 64, 6.8 ms in place vs 13.0 ms packed; small blocks lose in place past one panel).
template <typename T>
inline bool small_batch(const Dims& d) {
  const int64_t weight_bytes = (d.k * d.q * d.p + d.l * d.s * d.r) * static_cast<int64_t>(sizeof(T));
  const int64_t panels = weight_bytes > (int64_t(8) << 20) ? 4 : 1;
  return d.B <= panels * Tile<T, 2>::NR;
}

template <typename T>
void fwd_dot(const Dims& d, const T* x, int64_t ldx, const T* w1, const T* w2, T* out,
             int64_t ldo, int nthreads) {
  const int64_t kq = d.kq(), B = d.B;
  Buffer<T> h(B * kq);
#pragma omp parallel num_threads(nthreads)
  {
#pragma omp for schedule(static)
    for (int64_t J = 0; J < kq; ++J) {  // row J = a*q + i of w1 viewed as (k*q, p)
      const T* w = w1 + J * d.p;
      const T* xa = x + (J / d.q) * d.p;
      T* hj = h.ptr + (J % d.l) * B * d.r + J / d.l;
      for (int64_t b = 0; b < B; ++b) {
        const T* xb = xa + b * ldx;
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < d.p; ++j) acc += w[j] * xb[j];
        hj[b * d.r] = acc;
      }
    }
#pragma omp for schedule(static)
    for (int64_t R = 0; R < d.l * d.s; ++R) {  // row R = c*s + n of w2 viewed as (l*s, r)
      const int64_t c = R / d.s, n = R % d.s;
      const T* w = w2 + R * d.r;
      for (int64_t b = 0; b < B; ++b) {
        const T* hb = h.ptr + (c * B + b) * d.r;
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t m = 0; m < d.r; ++m) acc += w[m] * hb[m];
        out[b * ldo + n * d.l + c] = acc;
      }
    }
  }
}


template <typename T, int NV>
void fwd_small(const Dims& d, const T* x, int64_t ldx, const T* w1, const T* w2, T* out,
               int64_t ldo, int nthreads) {
  constexpr int MR = RowTile<T, NV>::MR, NR = Tile<T, NV>::NR;
  const int64_t kq = d.kq(), B = d.B;
  const int64_t ps1 = packed_size<T, NV>(d.p, B), ps2 = packed_size<T, NV>(d.r, B);
  Buffer<T> h(B * kq), X(d.k * ps1), H(d.l * ps2);
  const int64_t rows1 = cdiv(d.q, MR), rows2 = cdiv(d.s, MR);  // row chunks per block
#pragma omp parallel num_threads(nthreads)
  {
#pragma omp for schedule(static)
    for (int64_t a = 0; a < d.k; ++a)  // B operand: x_a^T (K = p, N = batch)
      pack_b<T, NV>(d.p, B, x + a * d.p, 1, ldx, X.ptr + a * ps1);
    // Stage 1, item (a, chunk of MR rows i of w1[a]): tmp[i][b] = w1[a, i, :] . x[b, a*p : +p]
#pragma omp for schedule(dynamic, 4)
    for (int64_t it = 0; it < d.k * rows1; ++it) {
      const int64_t a = it / rows1, i0 = (it % rows1) * MR;
      const int mr = static_cast<int>(std::min<int64_t>(MR, d.q - i0));
      for (int64_t b0 = 0; b0 < B; b0 += NR) {  // one panel of NR batch columns at a time
        const int nb = static_cast<int>(std::min<int64_t>(NR, B - b0));
        T tmp[MR * NR];
        micro_rows<T, NV>(d.p, w1 + (a * d.q + i0) * d.p, d.p, mr, X.ptr + a * ps1 + b0 * d.p,
                          tmp, NR, 1, nb);
        for (int i = 0; i < mr; ++i) {  // J = a*q + i  ->  h[J % l][b][J / l]
          const int64_t J = a * d.q + i0 + i;
          T* dst = h.ptr + (J % d.l) * B * d.r + J / d.l;
          for (int b = 0; b < nb; ++b) dst[(b0 + b) * d.r] = tmp[i * NR + b];
        }
      }
    }
#pragma omp for schedule(static)
    for (int64_t c = 0; c < d.l; ++c)  // B operand: h[c]^T (K = r, N = batch)
      pack_b<T, NV>(d.r, B, h.ptr + c * B * d.r, 1, d.r, H.ptr + c * ps2);
    // Stage 2, item (c, chunk of MR rows n of w2[c]): out[b, n*l + c] = w2[c, n, :] . h[c][b][:]
#pragma omp for schedule(dynamic, 4)
    for (int64_t it = 0; it < d.l * rows2; ++it) {
      const int64_t c = it / rows2, n0 = (it % rows2) * MR;
      const int mr = static_cast<int>(std::min<int64_t>(MR, d.s - n0));
      for (int64_t b0 = 0; b0 < B; b0 += NR)
        micro_rows<T, NV>(d.r, w2 + (c * d.s + n0) * d.r, d.r, mr, H.ptr + c * ps2 + b0 * d.r,
                          out + b0 * ldo + n0 * d.l + c, d.l, ldo,
                          static_cast<int>(std::min<int64_t>(NR, B - b0)));
    }
  }
}

template <typename T>
void fwd(const Dims& d, const T* x, int64_t ldx, const T* w1, const T* w2, T* out, int64_t ldo,
         int nthreads) {
  if (d.B <= kDotBatch) return fwd_dot<T>(d, x, ldx, w1, w2, out, ldo, nthreads);
  if (small_batch<T>(d)) {
    if (d.B <= Tile<T, 1>::NR) return fwd_small<T, 1>(d, x, ldx, w1, w2, out, ldo, nthreads);
    return fwd_small<T, 2>(d, x, ldx, w1, w2, out, ldo, nthreads);
  }
  const int64_t kq = d.kq();
  // w1[a] as B = (K=p) x (N=q), element (j, i) = w1[a, i, j]; w2[c] as (K=r) x (N=s).
  PackedWeight<T> P1(d.k, d.p, d.q, true), P2(d.l, d.r, d.s, true);
  const int64_t bm = batch_tile<T>(d, false);
  const int64_t ntiles = cdiv(d.B, bm);
  // Many tiles: each thread owns whole tiles (no barriers).  Few: threads share a tile's items.
  const bool tile_parallel = ntiles >= 2 * static_cast<int64_t>(nthreads);
  const int64_t workers = tile_parallel ? 1 : nthreads;
  const Split g1(d.k, d.q, nr_of<T>(P1.narrow), workers), g2(d.l, d.s, nr_of<T>(P2.narrow), workers);
  // Per tile: t (natural rows), h = t in block layout (l, mt, r), o = output blocks (l, mt, s).
  const int64_t tsz = bm * kq, osz = bm * d.l * d.s, nbuf = tile_parallel ? nthreads : 1;
  Buffer<T> tbuf(nbuf * tsz), hbuf(nbuf * tsz), obuf(nbuf * osz);
  const auto scratch = make_scratch<T>(d, bm, nthreads);

#pragma omp parallel num_threads(nthreads)
  {
#pragma omp for schedule(static) nowait
    for (int64_t a = 0; a < d.k; ++a) P1.pack(a, d.p, d.q, w1 + a * d.q * d.p, 1, d.p);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < d.l; ++c) P2.pack(c, d.r, d.s, w2 + c * d.s * d.r, 1, d.r);
    const int tid = omp_get_thread_num();
    Scratch<T>& sc = *scratch[tid];

    // Stage 1, item (a, group): t[:, a*q + cols] = x[:, a*p : a*p + p] w1[a]^T
    auto stage1 = [&](int64_t b0, int64_t mt, T* t, int64_t it) {
      const int64_t a = it / g1.ngroup, j0 = (it % g1.ngroup) * g1.per;
      gemm_weight<T>(P1, a, mt, d.q, d.p, x + b0 * ldx + a * d.p, ldx, 1, sc.a.ptr, j0,
                     j0 + g1.per, t + a * d.q, kq, 1);
    };
    // Stage 2, item (c, group): o[c] = h[c] w2[c]^T  (h[c][b][m] = t[b, m*l + c], P1)
    auto stage2 = [&](int64_t mt, const T* h, T* o, int64_t it) {
      const int64_t c = it / g2.ngroup, j0 = (it % g2.ngroup) * g2.per;
      gemm_weight<T>(P2, c, mt, d.s, d.r, h + c * mt * d.r, d.r, 1, sc.a.ptr, j0, j0 + g2.per,
                     o + c * mt * d.s, d.s, 1);
    };

    if (tile_parallel) {
      T *t = tbuf.ptr + tid * tsz, *h = hbuf.ptr + tid * tsz, *o = obuf.ptr + tid * osz;
#pragma omp for schedule(dynamic, 1)
      for (int64_t tile = 0; tile < ntiles; ++tile) {
        const int64_t b0 = tile * bm, mt = std::min(bm, d.B - b0);
        for (int64_t it = 0; it < g1.items(d.k); ++it) stage1(b0, mt, t, it);
        to_blocks<T>(t, kq, mt, d.l, d.r, h, 0, mt);
        for (int64_t it = 0; it < g2.items(d.l); ++it) stage2(mt, h, o, it);
        from_blocks<T>(o, mt, d.l, d.s, out + b0 * ldo, ldo, 0, mt);  // P2: out[b, n*l + c]
      }
    } else {
      const int nt = omp_get_num_threads();
      for (int64_t tile = 0; tile < ntiles; ++tile) {
        const int64_t b0 = tile * bm, mt = std::min(bm, d.B - b0);
        int64_t r0, r1;
        row_range(mt, tid, nt, &r0, &r1);
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < g1.items(d.k); ++it) stage1(b0, mt, tbuf.ptr, it);
        to_blocks<T>(tbuf.ptr, kq, mt, d.l, d.r, hbuf.ptr, r0, r1);
#pragma omp barrier
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < g2.items(d.l); ++it) stage2(mt, hbuf.ptr, obuf.ptr, it);
        from_blocks<T>(obuf.ptr, mt, d.l, d.s, out + b0 * ldo, ldo, r0, r1);
#pragma omp barrier
      }
    }
  }
}

template <typename T>
void bwd(const Dims& d, const T* x, int64_t ldx, const T* w1, const T* w2, const T* dout,
         int64_t lddo, T* dx, int64_t lddx, T* dw1, T* dw2, int nthreads) {
  const int64_t kq = d.kq();
  const bool need_dt = dx || dw1;
  PackedWeight<T> P1(d.k, d.p, d.q, true);      // w1[a] as K=p x N=q (recompute t)
  PackedWeight<T> P2(d.l, d.s, d.r, need_dt);   // w2[c] as K=s x N=r (dt = dO w2)
  PackedWeight<T> P3(d.k, d.q, d.p, dx);        // w1[a] as K=q x N=p (dx = dt w1)
  const int64_t bm = batch_tile<T>(d, true);
  const int64_t ntiles = cdiv(d.B, bm);
  const Split g1(d.k, d.q, nr_of<T>(P1.narrow), nthreads), g2(d.l, d.r, nr_of<T>(P2.narrow), nthreads),
      g3(d.k, d.p, nr_of<T>(P3.narrow), nthreads);
  // Per tile: t (natural rows), h = t in blocks (l, mt, r), dO = dout in blocks (l, mt, s),
  // dh = dt in blocks (l, mt, r), dt (natural rows, what stage 3 reads).
  const int64_t tsz = bm * kq, osz = bm * d.l * d.s;
  Buffer<T> tbuf(tsz), hbuf(tsz), dobuf(osz), dhbuf(need_dt ? tsz : 0), dtbuf(need_dt ? tsz : 0);
  const auto scratch = make_scratch<T>(d, bm, nthreads);

#pragma omp parallel num_threads(nthreads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    Scratch<T>& sc = *scratch[tid];
#pragma omp for schedule(static) nowait
    for (int64_t a = 0; a < d.k; ++a) P1.pack(a, d.p, d.q, w1 + a * d.q * d.p, 1, d.p);
    if (need_dt) {
#pragma omp for schedule(static) nowait
      for (int64_t c = 0; c < d.l; ++c) P2.pack(c, d.s, d.r, w2 + c * d.s * d.r, d.r, 1);
    }
    if (dx) {
#pragma omp for schedule(static) nowait
      for (int64_t a = 0; a < d.k; ++a) P3.pack(a, d.q, d.p, w1 + a * d.q * d.p, d.p, 1);
    }
    if (dw1) {
#pragma omp for schedule(static) nowait
      for (int64_t i = 0; i < d.k * d.q * d.p; ++i) dw1[i] = T(0);
    }
    if (dw2) {
#pragma omp for schedule(static) nowait
      for (int64_t i = 0; i < d.l * d.s * d.r; ++i) dw2[i] = T(0);
    }
#pragma omp barrier

    for (int64_t tile = 0; tile < ntiles; ++tile) {
      const int64_t b0 = tile * bm, mt = std::min(bm, d.B - b0);
      const T* xt = x + b0 * ldx;
      int64_t r0, r1;
      row_range(mt, tid, nt, &r0, &r1);
      T *t = tbuf.ptr, *h = hbuf.ptr, *dO = dobuf.ptr, *dh = dhbuf.ptr, *dt = dtbuf.ptr;

      // Stage 1: recompute t for this tile (nothing but x, w1, w2 was saved).
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < g1.items(d.k); ++it) {
        const int64_t a = it / g1.ngroup, j0 = (it % g1.ngroup) * g1.per;
        gemm_weight<T>(P1, a, mt, d.q, d.p, xt + a * d.p, ldx, 1, sc.a.ptr, j0, j0 + g1.per,
                       t + a * d.q, kq, 1);
      }
      // Block layouts: h[c][b][m] = t[b, m*l + c] (P1), dO[c][b][n] = dout[b, n*l + c] (P2^T).
      if (dw2) to_blocks<T>(t, kq, mt, d.l, d.r, h, r0, r1);
      to_blocks<T>(dout + b0 * lddo, lddo, mt, d.l, d.s, dO, r0, r1);
#pragma omp barrier
      // Stage 2, item (c, group of m columns).
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < g2.items(d.l); ++it) {
        const int64_t c = it / g2.ngroup, j0 = (it % g2.ngroup) * g2.per;
        const int64_t j1 = std::min(j0 + g2.per, d.r);
        if (j0 >= j1) continue;
        const T* dOc = dO + c * mt * d.s;
        if (need_dt)  // dh[c][b][m] = sum_n dO[c][b][n] w2[c, n, m]
          gemm_weight<T>(P2, c, mt, d.r, d.s, dOc, d.s, 1, sc.a.ptr, j0, j1, dh + c * mt * d.r, d.r, 1);
        if (dw2)  // dw2[c, n, m] += sum_b dO[c][b][n] h[c][b][m]:  A = dO[c]^T, B = h[c][:, j0:j1]
          gemm_grad<T>(use_narrow<T>(d.r), d.s, j1 - j0, mt, dOc, 1, d.s, h + c * mt * d.r + j0, d.r,
                       1, sc, dw2 + c * d.s * d.r + j0, d.r);
      }
      if (!need_dt) continue;  // the loop above ended with a barrier
      from_blocks<T>(dh, mt, d.l, d.r, dt, kq, r0, r1);  // dt[b, m*l + c] = dh[c][b][m]
#pragma omp barrier
      // Stage 3, item (a, group of j columns).
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < g3.items(d.k); ++it) {
        const int64_t a = it / g3.ngroup, j0 = (it % g3.ngroup) * g3.per;
        const int64_t j1 = std::min(j0 + g3.per, d.p);
        if (j0 >= j1) continue;
        if (dx)  // dx[b, a*p + j] = sum_i dt[b, a*q + i] w1[a, i, j]
          gemm_weight<T>(P3, a, mt, d.p, d.q, dt + a * d.q, kq, 1, sc.a.ptr, j0, j1,
                         dx + b0 * lddx + a * d.p, lddx, 1);
        if (dw1)  // dw1[a, i, j] += sum_b dt[b, a*q + i] x[b, a*p + j]:  A = dt_a^T, B = x_a
          gemm_grad<T>(use_narrow<T>(d.p), d.q, j1 - j0, mt, dt + a * d.q, 1, kq, xt + a * d.p + j0,
                       ldx, 1, sc, dw1 + a * d.q * d.p + j0, d.p);
      }
    }
  }
}

}  // namespace

kk_status monarch_fwd(kk_dtype dtype, const MonarchArgs& a, int nthreads) {
  const Dims d{a.batch, a.k, a.q, a.p, a.l, a.s, a.r};
  if (dtype == KK_FLOAT32)
    fwd<float>(d, static_cast<const float*>(a.x), a.ldx, static_cast<const float*>(a.w1),
               static_cast<const float*>(a.w2), static_cast<float*>(a.out), a.ldo, nthreads);
  else
    fwd<double>(d, static_cast<const double*>(a.x), a.ldx, static_cast<const double*>(a.w1),
                static_cast<const double*>(a.w2), static_cast<double*>(a.out), a.ldo, nthreads);
  return KK_OK;
}

kk_status monarch_bwd(kk_dtype dtype, const MonarchArgs& a, int nthreads) {
  const Dims d{a.batch, a.k, a.q, a.p, a.l, a.s, a.r};
  if (dtype == KK_FLOAT32)
    bwd<float>(d, static_cast<const float*>(a.x), a.ldx, static_cast<const float*>(a.w1),
               static_cast<const float*>(a.w2), static_cast<const float*>(a.dout), a.lddo,
               static_cast<float*>(a.dx), a.lddx, static_cast<float*>(a.dw1),
               static_cast<float*>(a.dw2), nthreads);
  else
    bwd<double>(d, static_cast<const double*>(a.x), a.ldx, static_cast<const double*>(a.w1),
                static_cast<const double*>(a.w2), static_cast<const double*>(a.dout), a.lddo,
                static_cast<double*>(a.dx), a.lddx, static_cast<double*>(a.dw1),
                static_cast<double*>(a.dw2), nthreads);
  return KK_OK;
}

}  // namespace KK_ISA_NS
}  // namespace kk
