// Sparse linear layer on the CPU (unstructured sparsity, CSR weight): forward SpMM, backward SpMM
// to x and SDDMM to the values, OpenMP, float32 / float64, accumulation in the element type.
//
// Math (W is n_out x n_in in CSR: row_ptr, col_idx, values; the CSC index col_ptr, row_idx, perm
// lists the same nonzeros by column; see csrc/include/kernelkit/sparse.h):
//   out[b, r]  = bias[r] + sum_{k in row r} values[k] * x[b, col_idx[k]]          (SpMM)
//   dx[b, c]   = sum_{k in col c} values[perm[k]] * dout[b, row_idx[k]]          (SpMM on W^T)
//   dvalues[k] = sum_b dout[b, r_k] * x[b, col_idx[k]]                           (SDDMM)
// x (batch, n_in; row stride ldx), out / dout (batch, n_out; ldo / lddo), dx (batch, n_in; lddx).
// Sparse-IFT (Thangarasa et al., ICML 2024) trains such layers with RigL/SET masks at 50-99%
// sparsity.  Measured on a 2-core AMD EPYC (Zen 3, AVX2), fp32, batch 2048, weights 4096x4096,
// 1024x4096, 4096x1024 at 90%: forward 3.7-5.0x dense MKL F.linear on the masked weight and
// 3.8-8.8x torch's CSR SpMM; forward + both gradients 3.5-4.1x the three dense GEMMs.  At 75% the
// forward is 1.1-2x dense; dense wins below a break-even of ~70% (4096x4096, 1024x4096) to ~60%
// (4096x1024) for the forward, ~65-70% for forward + backward.
//
// Layout: the batch is the vector dimension.  A chunk of BC batch rows of x is packed transposed,
// xT (n_in x BC, one contiguous 128-256 byte "panel row" per input column), so every nonzero
// (r, c) costs one broadcast of values[k] and NV vector FMAs against the panel row of c, with the
// BC accumulators of output row r in registers: no gathers, no atomics, and the random access is
// two (AVX2) or four (AVX-512) whole cache lines per nonzero, prefetched 16 nonzeros ahead.  The
// packed chunk (n_in * BC * 4 bytes, 512 KiB at n_in = 4096 in fp32) lives in L2/L3; W streams once
// per chunk.  Batches of one or two vectors of rows get one- or two-vector panels.
//   - dx is the same kernel on the CSC index, over the packed chunk of dout, with the values
//     gathered once per call into column order (vT[k] = values[perm[k]]), so the inner loop has
//     no second indirection.
//   - dvalues: per nonzero the dot product doutT[r] . xT[c] over the chunk, kept as one vector of
//     lane partial sums; VL such vectors (consecutive nonzeros) are reduced together by a
//     transposing add tree into VL sums, added into dvalues over the chunks.
//   - dx and dvalues together are fused in one pass over the CSC index: each dout panel row is
//     loaded once and feeds both the dx accumulators (times the value) and the dvalues dot (with
//     the column's x panel row, held in registers).  dvalues is accumulated in column order and
//     scattered through perm at the end.
// Threads: the forward and dx-only SpMM split batch chunks when there are plenty (no shared
// writes, no redundant packing), otherwise output rows balanced by nonzeros; the kernels that
// accumulate dvalues split rows / columns (each nonzero has one writer), each thread packing the
// chunks it needs privately: no barriers anywhere.
//
// This file is compiled once per ISA (KK_ISA_NS = isa_avx512 / isa_avx2 / isa_base);
// sparse_api.cpp has already checked every size, pointer and index, so the kernels trust them.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>
#include <utility>

#include "sparse_impl.h"

namespace kk {
namespace KK_ISA_NS {
namespace {

#if defined(KK_SPARSE_VEC_BYTES)  // test hook: another ISA's vector width (and so its tiling) run
constexpr int kVecBytes = KK_SPARSE_VEC_BYTES;  // on this CPU, e.g. the AVX-512 logic on AVX2
#elif defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX2__) || defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

// One panel row holds NV vectors of VL lanes: BC = NV*VL batch rows per chunk.  kMaxNV = 4 vectors
// (128 bytes with AVX2, 256 with AVX-512) keep NV accumulators + NV panel loads + the broadcasts
// within 16 registers in the fused backward, and make every random access two or four whole cache
// lines; SSE gets 8 vectors (128 bytes) for the same access size.  Batches of at most 1 or 2
// vectors of rows (inference) get panels of that width instead, not 4-8x the work in padding.
constexpr int kMaxNV = kVecBytes == 16 ? 8 : 4;
template <typename T, int NV_ = kMaxNV>
struct Panel {
  typedef T vec __attribute__((vector_size(kVecBytes)));
  static constexpr int VL = kVecBytes / static_cast<int>(sizeof(T));
  static constexpr int NV = NV_;
  static constexpr int BC = NV * VL;
  static constexpr int kLines = (BC * static_cast<int>(sizeof(T)) + 63) / 64;  // cache lines per row
};

// Runs f(std::integral_constant<int, NV>) with the panel width for a batch of `batch` rows.
template <typename T, typename F>
inline void with_panel(int64_t batch, F&& f) {
  constexpr int VL = Panel<T>::VL;
  if (batch <= VL) f(std::integral_constant<int, 1>{});
  else if (batch <= 2 * VL) f(std::integral_constant<int, 2>{});
  else f(std::integral_constant<int, kMaxNV>{});
}

// Nonzeros ahead whose panel rows are prefetched: the panel rows come from L2 or L3 in a random
// order, so the hardware prefetchers cannot help.  16 measured best of 4/8/16/32 (Zen 3).
constexpr int kPrefetch = 16;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename V>
inline V load(const void* p) {  // unaligned vector load (dvalues is only element-aligned)
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
inline void store(void* p, V v) { std::memcpy(p, &v, sizeof(V)); }

// ---- scratch ---------------------------------------------------------------------------------
// Per-thread scratch that grows and is kept for the next call: the per-chunk panels are
// rewritten every chunk, and fresh large blocks would cost their first-touch page faults on every
// call.  A thread holds at most kSlots blocks: slots 0-2 are the per-thread panels inside parallel
// regions, 3-4 the calling thread's per-call arrays (the calling thread is also thread 0 of every
// team, so the two sets must not share slots).  Blocks over kKeepBytes are freed after each use
// (release_large), so what stays allocated between calls is bounded; at that size the page faults
// of a fresh block are noise next to the kernel that fills it.
constexpr int kSlots = 5;
constexpr size_t kKeepBytes = size_t(16) << 20;
constexpr int kSlotValuesT = 3, kSlotDvT = 4;
struct Slot {
  void* ptr = nullptr;
  size_t bytes = 0;
  ~Slot() { std::free(ptr); }
  void* get(size_t want) {
    if (want > bytes) {
      std::free(ptr);
      bytes = 0;
      want = (std::max<size_t>(want, 64) + 4095) / 4096 * 4096;
      ptr = std::aligned_alloc(64, want);
      if (!ptr) throw std::bad_alloc();
      bytes = want;
    }
    return ptr;
  }
};
thread_local Slot t_slots[kSlots];

// Frees this thread's blocks over kKeepBytes among slots [first, last).  A parallel body releases
// only the panels (slots below kSlotValuesT): thread 0 is the calling thread, whose per-call arrays
// outlive the region.  The calling thread releases everything when the call ends.
inline void release_large(int first, int last) {
  for (int i = first; i < last; ++i)
    if (t_slots[i].bytes > kKeepBytes) {
      std::free(t_slots[i].ptr);
      t_slots[i].ptr = nullptr;
      t_slots[i].bytes = 0;
    }
}

template <typename T>
T* scratch(int slot, int64_t n) {
  return static_cast<T*>(t_slots[slot].get(static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T)));
}

// ---- packing -----------------------------------------------------------------------------------
// Panel rows [c0, c1) of a chunk of bc <= BC rows: pT[c*BC + j] = src[(b0+j)*ld + c] for j < bc,
// zero for the padding lanes (they are computed and never stored, and must stay finite).
// Blocks of CB columns keep the strided writes (CB panel rows, 16-32 KiB) in L1 while each of the
// bc source rows is read CB elements at a time, the next block's lines prefetched: bc concurrent
// streams are more than the hardware prefetchers follow (CB = 16 without the prefetch was 1.35x
// slower at 99% sparsity, where packing is a third of the forward).
template <typename T, int NV>
void pack_t(const T* src, int64_t ld, int64_t b0, int64_t bc, int64_t c0, int64_t c1, T* pT) {
  constexpr int BC = Panel<T, NV>::BC, CB = 128;
  for (int64_t cc = c0; cc < c1; cc += CB) {
    const int64_t ce = std::min<int64_t>(cc + CB, c1);
    for (int64_t j = 0; j < bc; ++j) {
      const T* s = src + (b0 + j) * ld;
      if (ce < c1)
        for (int64_t c = ce; c < std::min<int64_t>(ce + CB, c1); c += 64 / sizeof(T)) __builtin_prefetch(s + c);
      for (int64_t c = cc; c < ce; ++c) pT[c * BC + j] = s[c];
    }
    for (int64_t j = bc; j < BC; ++j)
      for (int64_t c = cc; c < ce; ++c) pT[c * BC + j] = T(0);
  }
}

// Writes accumulator rows (BC lanes each) for consecutive r to columns r of a row-major
// (batch x ld) matrix, rows b0 .. b0+bc-1.  Storing each row's lanes straight to memory would be bc
// scalar stores to bc different cache lines per r; instead G consecutive r are collected in a small
// transposed tile (L1) and written as bc contiguous runs of G elements (two cache lines): 1.4x
// faster at 99% sparsity, where those stores were a third of the forward.
template <typename T, int NV>
struct ColWriter {
  static constexpr int BC = Panel<T, NV>::BC;
  static constexpr int G = 128 / static_cast<int>(sizeof(T));  // r per flush
  alignas(64) T tile[BC][G];
  T* dst;
  int64_t ld, bc, r_first = 0;
  int n = 0;
  ColWriter(T* d, int64_t ld_, int64_t b0, int64_t bc_) : dst(d + b0 * ld_), ld(ld_), bc(bc_) {}
  inline void put(const typename Panel<T, NV>::vec* acc, int64_t r) {
    alignas(64) T tmp[BC];
    std::memcpy(tmp, acc, sizeof(tmp));
    if (n == 0) r_first = r;
    for (int j = 0; j < BC; ++j) tile[j][n] = tmp[j];
    if (++n == G) flush();
  }
  void flush() {
    for (int64_t j = 0; j < bc; ++j) std::memcpy(dst + j * ld + r_first, tile[j], sizeof(T) * static_cast<size_t>(n));
    n = 0;
  }
};

// ---- transposing reduction: VL vectors -> one vector of their lane sums ------------------------
// Level step: lanes [a0+a1, a2+a3, ..., b0+b1, ...] (full-width pairs; any VL).
template <typename V, int... Is>
inline V pair_sums(V a, V b, std::integer_sequence<int, Is...>) {
  return __builtin_shufflevector(a, b, (2 * Is)...) + __builtin_shufflevector(a, b, (2 * Is + 1)...);
}

// p[0..VL) -> s with s[j] = sum of the lanes of p[j].
template <typename T>
inline typename Panel<T>::vec reduce_lanes(typename Panel<T>::vec* p) {
  constexpr int VL = Panel<T>::VL;
  using vec = typename Panel<T>::vec;
  if constexpr (kVecBytes == 32 && VL == 8) {
    // In-lane pair sums (one vshufps each) on the two 128-bit halves, then one cross-half add:
    // 3 instructions per step instead of the ~7 of a full-width shuffle on AVX2.
    auto h = [](vec a, vec b) {
      return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
             __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
    };
    const vec g0 = h(h(p[0], p[1]), h(p[2], p[3]));  // [s0 s1 s2 s3 | s0' s1' s2' s3'] (halves)
    const vec g1 = h(h(p[4], p[5]), h(p[6], p[7]));
    return __builtin_shufflevector(g0, g1, 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(g0, g1, 4, 5, 6, 7, 12, 13, 14, 15);
  } else if constexpr (kVecBytes == 32 && VL == 4) {
    auto h = [](vec a, vec b) {  // unpacklo/hi: [a0+a1, b0+b1 | a2+a3, b2+b3]
      return __builtin_shufflevector(a, b, 0, 4, 2, 6) + __builtin_shufflevector(a, b, 1, 5, 3, 7);
    };
    const vec q0 = h(p[0], p[1]), q1 = h(p[2], p[3]);
    return __builtin_shufflevector(q0, q1, 0, 1, 4, 5) + __builtin_shufflevector(q0, q1, 2, 3, 6, 7);
  } else {  // any width: log2(VL) levels of full-width pair sums
    constexpr auto seq = std::make_integer_sequence<int, VL>{};
    for (int w = VL; w > 1; w /= 2)
      for (int i = 0; i < w / 2; ++i) p[i] = pair_sums(p[2 * i], p[2 * i + 1], seq);
    return p[0];
  }
}

// Collects one lane-partial vector per nonzero, in nonzero order from `k`, and adds (or, on the
// first chunk, stores) their sums into dst[k ...] every VL nonzeros.
template <typename T>
struct DotSink {
  using vec = typename Panel<T>::vec;
  static constexpr int VL = Panel<T>::VL;
  vec part[VL];
  int n = 0;
  T* dst;
  bool first;
  DotSink(T* d, bool f) : dst(d), first(f) {}
  inline void push(vec s) {
    part[n++] = s;
    if (n == VL) {
      const vec t = reduce_lanes<T>(part);
      store(dst, first ? t : load<vec>(dst) + t);
      dst += VL;
      n = 0;
    }
  }
  void flush() {
    if (n == 0) return;
    for (int i = n; i < VL; ++i) part[i] = vec{};
    alignas(64) T t[VL];
    const vec s = reduce_lanes<T>(part);
    std::memcpy(t, &s, sizeof(t));
    for (int i = 0; i < n; ++i) dst[i] = first ? t[i] : dst[i] + t[i];
    n = 0;
  }
};

// ---- the kernels on one packed chunk -------------------------------------------------------------

// SpMM rows [r0, r1): out[b0 + j, r] = bias[r] + sum_k vals[k] * pT[idx[k]][j], j < bc.
template <typename T, int NV>
void spmm_rows(int64_t r0, int64_t r1, const int64_t* ptr, const int32_t* idx, const T* vals,
               const T* pT, const T* bias, T* out, int64_t ldo, int64_t b0, int64_t bc) {
  using P = Panel<T, NV>;
  using vec = typename P::vec;
  constexpr int BC = P::BC;
  const int64_t kend = ptr[r1];
  ColWriter<T, NV> w(out, ldo, b0, bc);
  for (int64_t r = r0; r < r1; ++r) {
    vec a[NV], c[NV];  // two accumulator sets: 2*NV independent FMA chains
    for (int v = 0; v < NV; ++v) a[v] = c[v] = vec{};
    int64_t k = ptr[r];
    const int64_t ke = ptr[r + 1];
    for (; k + 2 <= ke; k += 2) {
      if (k + kPrefetch + 1 < kend) {
        const T* f0 = pT + static_cast<int64_t>(idx[k + kPrefetch]) * BC;
        const T* f1 = pT + static_cast<int64_t>(idx[k + kPrefetch + 1]) * BC;
        for (int l = 0; l < P::kLines; ++l) {
          __builtin_prefetch(f0 + l * (64 / sizeof(T)));
          __builtin_prefetch(f1 + l * (64 / sizeof(T)));
        }
      }
      const vec* x0 = reinterpret_cast<const vec*>(pT + static_cast<int64_t>(idx[k]) * BC);
      const vec* x1 = reinterpret_cast<const vec*>(pT + static_cast<int64_t>(idx[k + 1]) * BC);
      const T v0 = vals[k], v1 = vals[k + 1];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) {
        a[v] += v0 * x0[v];
        c[v] += v1 * x1[v];
      }
    }
    if (k < ke) {
      const vec* x0 = reinterpret_cast<const vec*>(pT + static_cast<int64_t>(idx[k]) * BC);
      const T v0 = vals[k];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) a[v] += v0 * x0[v];
    }
    const T b = bias ? bias[r] : T(0);
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) a[v] = a[v] + c[v] + b;
    w.put(a, r);
  }
  w.flush();
}

// SDDMM rows [r0, r1): dv[k] (+)= sum_j gT[r - r0][j] * pT[idx[k]][j] for the nonzeros of those
// rows (gT holds the chunk's dout panel rows of these rows only).
template <typename T, int NV>
void sddmm_rows(int64_t r0, int64_t r1, const int64_t* ptr, const int32_t* idx, const T* gT,
                const T* pT, T* dv, bool first) {
  using P = Panel<T, NV>;
  using vec = typename P::vec;
  constexpr int BC = P::BC;
  const int64_t kend = ptr[r1];
  DotSink<T> sink(dv + ptr[r0], first);
  for (int64_t r = r0; r < r1; ++r) {
    vec g[NV];
    const vec* gr = reinterpret_cast<const vec*>(gT + (r - r0) * BC);
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) g[v] = gr[v];
    for (int64_t k = ptr[r]; k < ptr[r + 1]; ++k) {
      if (k + kPrefetch < kend) {
        const T* f = pT + static_cast<int64_t>(idx[k + kPrefetch]) * BC;
        for (int l = 0; l < P::kLines; ++l) __builtin_prefetch(f + l * (64 / sizeof(T)));
      }
      const vec* xr = reinterpret_cast<const vec*>(pT + static_cast<int64_t>(idx[k]) * BC);
      vec s0 = vec{}, s1 = vec{};  // two chains
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) {
        if (v % 2 == 0) s0 += g[v] * xr[v];
        else s1 += g[v] * xr[v];
      }
      sink.push(s0 + s1);
    }
  }
  sink.flush();
}

// Fused backward over columns [c0, c1) of the CSC index:
//   dx[b0 + j, c] = sum_k vT[k] * gT[row_idx[k]][j]
//   dvT[k]       (+)= sum_j gT[row_idx[k]][j] * xT[c - c0][j]
// gT: the chunk's dout panel rows (all n_out); xT: this column range's x panel rows.
template <typename T, int NV>
void fused_cols(int64_t c0, int64_t c1, const int64_t* cptr, const int32_t* ridx, const T* vT,
                const T* gT, const T* xT, T* dx, int64_t lddx, int64_t b0, int64_t bc, T* dvT,
                bool first) {
  using P = Panel<T, NV>;
  using vec = typename P::vec;
  constexpr int BC = P::BC;
  const int64_t kend = cptr[c1];
  DotSink<T> sink(dvT + cptr[c0], first);
  ColWriter<T, NV> wr(dx, lddx, b0, bc);
  for (int64_t c = c0; c < c1; ++c) {
    vec xr[NV], a[NV];
    const vec* xs = reinterpret_cast<const vec*>(xT + (c - c0) * BC);
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      xr[v] = xs[v];
      a[v] = vec{};
    }
    for (int64_t k = cptr[c]; k < cptr[c + 1]; ++k) {
      if (k + kPrefetch < kend) {
        const T* f = gT + static_cast<int64_t>(ridx[k + kPrefetch]) * BC;
        for (int l = 0; l < P::kLines; ++l) __builtin_prefetch(f + l * (64 / sizeof(T)));
      }
      const vec* gr = reinterpret_cast<const vec*>(gT + static_cast<int64_t>(ridx[k]) * BC);
      const T w = vT[k];
      vec s0 = vec{}, s1 = vec{};
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) {
        const vec gv = gr[v];  // loaded once, used twice
        a[v] += w * gv;
        if (v % 2 == 0) s0 += gv * xr[v];
        else s1 += gv * xr[v];
      }
      sink.push(s0 + s1);
    }
    wr.put(a, c);
  }
  wr.flush();
  sink.flush();
}

// ---- work splitting --------------------------------------------------------------------------
// Splits lines [0, n) of a compressed index into nt ranges of about equal cost, a line costing its
// nonzeros plus a fixed overhead (its accumulator setup and store ~ kLineCost nonzeros).
constexpr int64_t kLineCost = 4;
inline int64_t split_point(const int64_t* ptr, int64_t n, int t, int nt) {
  if (t <= 0) return 0;
  if (t >= nt) return n;
  const int64_t total = ptr[n] + kLineCost * n;
  const int64_t target = static_cast<int64_t>(static_cast<double>(total) * t / nt);
  int64_t lo = 0, hi = n;  // first line whose start cost reaches the target
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (ptr[mid] + kLineCost * mid < target) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// Splitting batch chunks instead of rows: when there are enough chunks to balance dynamically.
inline bool split_chunks(int64_t nchunks, int nt) { return nt == 1 || nchunks >= 4 * nt; }

// Runs body(thread, team size) on a team of nt threads.  An exception must not leave an OpenMP
// region, so a failed scratch allocation is carried out of it and rethrown (the entry point turns
// it into KK_ERR_OUT_OF_MEMORY); bodies use no barriers or worksharing constructs, so a thread
// that stops early cannot hang the others.
template <typename F>
void parallel(int nt, F&& body) {
  bool oom = false;
#pragma omp parallel num_threads(nt) reduction(|| : oom)
  {
    try {
      body(omp_get_thread_num(), omp_get_num_threads());
    } catch (const std::bad_alloc&) {
      oom = true;
    }
    release_large(0, kSlotValuesT);
  }
  if (oom) throw std::bad_alloc();
}

// dst[b0 + j, r] for r in [0, n_rows): out = a SpMM of the rows of (ptr, idx, vals) against the
// packed chunks of src (batch x n_cols); the forward and the dx-only backward.
template <typename T, int NV>
void spmm(int64_t batch, int64_t n_rows, int64_t n_cols, const int64_t* ptr, const int32_t* idx,
          const T* vals, const T* src, int64_t lds, const T* bias, T* dst, int64_t ldd, int nt) {
  constexpr int BC = Panel<T, NV>::BC;
  const int64_t nchunks = cdiv(batch, BC);
  if (split_chunks(nchunks, nt)) {
    std::atomic<int64_t> next{0};  // dynamic schedule over chunks
    parallel(nt, [&](int, int) {
      T* pT = scratch<T>(0, n_cols * BC);
      for (int64_t ch; (ch = next.fetch_add(1, std::memory_order_relaxed)) < nchunks;) {
        const int64_t b0 = ch * BC, bc = std::min<int64_t>(BC, batch - b0);
        pack_t<T, NV>(src, lds, b0, bc, 0, n_cols, pT);
        spmm_rows<T, NV>(0, n_rows, ptr, idx, vals, pT, bias, dst, ldd, b0, bc);
      }
    });
    return;
  }
  parallel(nt, [&](int t, int nteam) {
    const int64_t r0 = split_point(ptr, n_rows, t, nteam), r1 = split_point(ptr, n_rows, t + 1, nteam);
    if (r0 >= r1) return;
    T* pT = scratch<T>(0, n_cols * BC);
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      const int64_t b0 = ch * BC, bc = std::min<int64_t>(BC, batch - b0);
      pack_t<T, NV>(src, lds, b0, bc, 0, n_cols, pT);  // every thread reads all columns
      spmm_rows<T, NV>(r0, r1, ptr, idx, vals, pT, bias, dst, ldd, b0, bc);
    }
  });
}

template <typename T>
void fill_zero(T* dst, int64_t ld, int64_t rows, int64_t cols) {
  for (int64_t b = 0; b < rows; ++b) std::memset(dst + b * ld, 0, static_cast<size_t>(cols) * sizeof(T));
}

template <typename T>
void fwd(const SparseArgs& a, int nt) {
  const T* bias = static_cast<const T*>(a.bias);
  T* out = static_cast<T*>(a.out);
  if (a.nnz == 0) {  // W = 0: out = bias (or 0), and x (maybe NULL when n_in = 0) is not read
    for (int64_t b = 0; b < a.batch; ++b)
      for (int64_t r = 0; r < a.n_out; ++r) out[b * a.ldo + r] = bias ? bias[r] : T(0);
    return;
  }
  with_panel<T>(a.batch, [&](auto nv) {
    spmm<T, decltype(nv)::value>(a.batch, a.n_out, a.n_in, a.row_ptr, a.col_idx,
                                 static_cast<const T*>(a.values), static_cast<const T*>(a.x), a.ldx,
                                 bias, out, a.ldo, nt);
  });
}

// vT[k] = values[perm[k]]: the values in the CSC index's order.
template <typename T>
const T* gather_values(const SparseArgs& a, int nt) {
  const T* vals = static_cast<const T*>(a.values);
  T* vT = scratch<T>(kSlotValuesT, a.nnz);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t k = 0; k < a.nnz; ++k) vT[k] = vals[a.perm[k]];
  return vT;
}

// dvalues alone: threads split the CSR rows; each packs the x chunk and its rows of dout.
template <typename T, int NV>
void sddmm(const SparseArgs& a, int nt) {
  constexpr int BC = Panel<T, NV>::BC;
  const T* x = static_cast<const T*>(a.x);
  const T* dout = static_cast<const T*>(a.dout);
  T* dv = static_cast<T*>(a.dvalues);
  const int64_t nchunks = cdiv(a.batch, BC);
  parallel(nt, [&](int t, int nteam) {
    const int64_t r0 = split_point(a.row_ptr, a.n_out, t, nteam);
    const int64_t r1 = split_point(a.row_ptr, a.n_out, t + 1, nteam);
    if (a.row_ptr[r1] == a.row_ptr[r0]) return;  // no nonzeros: nothing to write
    T* pT = scratch<T>(0, a.n_in * BC);
    T* gT = scratch<T>(2, (r1 - r0) * BC);
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      const int64_t b0 = ch * BC, bc = std::min<int64_t>(BC, a.batch - b0);
      pack_t<T, NV>(x, a.ldx, b0, bc, 0, a.n_in, pT);
      pack_t<T, NV>(dout + r0, a.lddo, b0, bc, 0, r1 - r0, gT);
      sddmm_rows<T, NV>(r0, r1, a.row_ptr, a.col_idx, gT, pT, dv, ch == 0);
    }
  });
}

// dx and dvalues together (fused_cols); threads split the CSC columns.
template <typename T, int NV>
void fused_bwd(const SparseArgs& a, const T* vT, int nt) {
  constexpr int BC = Panel<T, NV>::BC;
  const T* x = static_cast<const T*>(a.x);
  const T* dout = static_cast<const T*>(a.dout);
  T* dx = static_cast<T*>(a.dx);
  T* dv = static_cast<T*>(a.dvalues);
  T* dvT = scratch<T>(kSlotDvT, a.nnz);  // dvalues in column order
  const int64_t nchunks = cdiv(a.batch, BC);
  parallel(nt, [&](int t, int nteam) {
    const int64_t c0 = split_point(a.col_ptr, a.n_in, t, nteam);
    const int64_t c1 = split_point(a.col_ptr, a.n_in, t + 1, nteam);
    if (c0 >= c1) return;
    T* gT = scratch<T>(0, a.n_out * BC);
    T* xT = scratch<T>(1, (c1 - c0) * BC);
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      const int64_t b0 = ch * BC, bc = std::min<int64_t>(BC, a.batch - b0);
      pack_t<T, NV>(dout, a.lddo, b0, bc, 0, a.n_out, gT);  // every thread reads all rows of dout
      pack_t<T, NV>(x + c0, a.ldx, b0, bc, 0, c1 - c0, xT);
      fused_cols<T, NV>(c0, c1, a.col_ptr, a.row_idx, vT, gT, xT, dx, a.lddx, b0, bc, dvT, ch == 0);
    }
  });
  // dvalues back in CSR order (perm is a permutation: checked by the entry point)
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t k = 0; k < a.nnz; ++k) dv[a.perm[k]] = dvT[k];
}

template <typename T>
void bwd(const SparseArgs& a, int nt) {
  T* dx = static_cast<T*>(a.dx);
  if (dx && a.nnz == 0) {  // W = 0: dx = 0 (dvalues is empty)
    fill_zero(dx, a.lddx, a.batch, a.n_in);
    return;
  }
  with_panel<T>(a.batch, [&](auto nv) {
    constexpr int NV = decltype(nv)::value;
    if (dx && a.dvalues) {  // (the entry point passes dvalues only with batch > 0 and nnz > 0)
      fused_bwd<T, NV>(a, gather_values<T>(a, nt), nt);
      return;
    }
    if (dx)
      spmm<T, NV>(a.batch, a.n_in, a.n_out, a.col_ptr, a.row_idx, gather_values<T>(a, nt),
                  static_cast<const T*>(a.dout), a.lddo, nullptr, dx, a.lddx, nt);
    if (a.dvalues) sddmm<T, NV>(a, nt);
  });
}

// Frees the calling thread's large per-call arrays however the call ends (bad_alloc included).
struct ReleaseLarge {
  ~ReleaseLarge() { release_large(0, kSlots); }
};

}  // namespace

kk_status sparse_fwd(kk_dtype dtype, const SparseArgs& a, int nthreads) {
  ReleaseLarge guard;
  if (dtype == KK_FLOAT32) fwd<float>(a, nthreads);
  else fwd<double>(a, nthreads);
  return KK_OK;
}

kk_status sparse_bwd(kk_dtype dtype, const SparseArgs& a, int nthreads) {
  ReleaseLarge guard;
  if (dtype == KK_FLOAT32) bwd<float>(a, nthreads);
  else bwd<double>(a, nthreads);
  return KK_OK;
}

}  // namespace KK_ISA_NS
}  // namespace kk
