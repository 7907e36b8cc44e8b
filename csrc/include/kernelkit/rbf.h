/*
 * kernelkit public C ABI, rbf family: adaptive radial-basis fields (NeuRBF, Chen et al., ICCV 2023):
 * the k nearest RBF centres of each query point through a uniform grid (cell list), and the fused
 * evaluation of the k kernels, their normalization, the multi-frequency sinusoids and the weighted sum
 * over the C output channels, with its backward.  Included by kernelkit.h (and includes it).
 *
 * Problem.  M RBFs in D = 2 or 3 dimensions, RBF i with centre mu_i (centers[i, :], M x D), a shape
 * and a feature row w_i (weights[i, :], M x C).  For a query x (N x D) and its k neighbours
 * idx[n, 0..k-1] (the k nearest centres; -1 marks a missing one), with o = x - mu_i:
 *
 *     "ivq"   (KK_RBF_IVQ)    phi_i = 1 / (1 + o^T A_i o)
 *     "gauss" (KK_RBF_GAUSS)  phi_i = exp(-0.5 * o^T A_i o)                 (the 1/2 as in NeuRBF)
 *     "nlin"  (KK_RBF_NLIN)   phi_i = prod_d clamp(1 - |o_d| * s_i[d], 0, 1)  (compact hat, SDFs)
 *
 * A_i is NeuRBF's `ks`, the inverse covariance: shapes[i] is D x D (shape_full = 1, symmetric positive
 * definite; o^T A o = sum_a sum_b o_a A[a, b] o_b) or its diagonal, M x D (shape_full = 0,
 * o^T A o = sum_d A[d] o_d^2, entries > 0).  For "nlin" shapes are the per-RBF scales s (M x D,
 * shape_full = 0, entries > 0).  A missing neighbour (idx -1) has phi = 0.
 *
 *     normalize != KK_RBF_NORM_NONE:  phih_i = phi_i / (sum_{l < k} phi_l + 1e-8),   else phih_i = phi_i
 *     omegas (C) given:               out[n, j] = sum_{i < k} w[idx_i, j] * sin(omegas[j] * phih_i)
 *     omegas NULL:                    out[n, j] = sum_{i < k} w[idx_i, j] * phih_i
 *
 * The backward (kk_rbf_features_bwd_*) takes g = dL/dout and gives, each only where its pointer is
 * not NULL:
 *     dweights[i, j] = sum over (n, slot) with idx[n, slot] = i of g[n, j] * sin(omegas[j] phih)  (or phih)
 *     dx[n, :]        (for SDF normals), dcenters = -(the same per-neighbour terms, summed per RBF),
 *     dshapes         (same layout as shapes), domegas[j] = sum_{n, i} g[n, j] w[idx_i, j] phih_i cos(omegas[j] phih_i).
 * The normalization's denominator is a constant in the backward with KK_RBF_NORM_DETACHED (NeuRBF's
 * convention), and differentiated with KK_RBF_NORM_FULL.  Derivative conventions (those of torch
 * autograd on the formulas above): d|o|/do = sign(o) (0 at 0); clamp(h, 0, 1) passes the gradient for
 * 0 <= h <= 1; the neighbour choice is piecewise constant (no gradient).  The functions zero every
 * gradient they are given, then accumulate (scatter-add) into dweights, dcenters, dshapes, domegas.
 *
 * Sine accuracy.  The argument t = omegas[j] * phih is formed in the coordinate dtype (float32:
 * |t| up to ~4e3 with NeuRBF's frequencies) and its sine is computed with a range reduction exact
 * enough that |sin_kk(t) - sin(t)| <= 2^-21 for |t| <= 2^17 (the exact sine of the float32 value t);
 * no fast-math sine without reduction.  The rounding of t itself (|t| * 2^-24) is inherent to float32.
 *
 * dtypes.  The coordinate dtype `dtype` (x, centers, shapes, omegas, dist2, dx, dcenters, dshapes,
 * domegas) is KK_FLOAT32 or KK_FLOAT64.  The feature dtype `wdtype` (weights, out, grad_out) is the
 * coordinate dtype, or KK_FLOAT16 / KK_BFLOAT16 with float32 coordinates (math in float32, out rounded
 * to nearest even); dweights is in the coordinate dtype (float32 for half weights: the caller casts).
 * idx is int64.  Every size and index is 64-bit.
 *
 * Layouts.  x (N x D) and out / grad_out (N x C) have row strides ldx >= D, ldo >= C, unit inner
 * stride; weights (M x C) row stride ldw >= C; centers (M x D), shapes, omegas, idx (N x k), dist2
 * (N x k) and every gradient are contiguous.  Pointers of arrays with no element may be NULL.
 *
 * Sizes.  D in {2, 3}; 1 <= k <= 32; N, M, C >= 0.  M < 2^31.  num_threads <= 0 uses the OpenMP
 * default.  Names follow kk_rbf_<op>_<cpu|cuda>.
 *
 * Neighbour search.  kk_rbf_knn_* returns, for each query, the k nearest centres sorted by
 * (dist2, index) ascending (ties go to the smaller index), where
 *     dist2 = ((x_0 - mu_0)^2 + (x_1 - mu_1)^2) [+ (x_2 - mu_2)^2]
 * is evaluated in the coordinate dtype in exactly that order, each operation rounded (no fused
 * multiply-add), so the result equals a brute-force search written the same way.  k > M: slots
 * M..k-1 are idx -1, dist2 +inf.  A query with a non-finite coordinate gets idx -1 and dist2 NaN in
 * every slot (and NaN features).  Queries outside the centres' bounding box are fine.
 *
 * The grid.  kk_rbf_grid_build_* writes a grid over the centres into a caller-owned buffer of
 * kk_rbf_grid_layout(...).bytes bytes (8-byte aligned; host memory for the CPU, device memory for
 * CUDA), which kk_rbf_knn_* then reads; it stays valid while the centres do not change (the
 * centres' coordinates are copied into it).  Layout (all offsets in bytes from the start):
 *     [0, 128)       int64 header[16]: dim, m, ncells (= res0*res1*res2), res0, res1, res2 (1 for an
 *                    unused dimension), dtype (kk_dtype), cells_max, flags (0 ok, 1 a non-finite centre),
 *                    the rest 0;
 *     [128, 256)     double geom[16]: lo0, lo1, lo2 (the box's low corner), cell (the cell's edge), the
 *                    rest 0;
 *     cell_start     int64[cells_max + 1]: the centres of cell c are sorted positions
 *                    cell_start[c] .. cell_start[c+1]-1 (cells in row-major order, dimension 0 slowest);
 *     order          int64[m]: order[p] = the centre index at sorted position p;
 *     coords         dtype[m * dim]: the centres' coordinates in sorted order.
 * A centre's cell is floor((mu_d - lo_d) / cell) clamped to [0, res_d - 1] per dimension.  The number of
 * cells is at most cells_max (kk_rbf_grid_layout; about m / 2).  Searches stop only when every
 * unvisited cell is provably farther than the k-th neighbour found (the bound keeps a margin for
 * rounding), so the grid changes the speed, never the result.
 */
#ifndef KERNELKIT_RBF_H_
#define KERNELKIT_RBF_H_

#include "kernelkit/kernelkit.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef KK_ENUM(kk_rbf_kernel) {
  KK_RBF_IVQ = 0,
  KK_RBF_GAUSS = 1,
  KK_RBF_NLIN = 2
} kk_rbf_kernel;

typedef KK_ENUM(kk_rbf_norm) {
  KK_RBF_NORM_NONE = 0,
  KK_RBF_NORM_DETACHED = 1, /* normalized; the denominator is a constant in the backward (NeuRBF) */
  KK_RBF_NORM_FULL = 2      /* normalized; the backward differentiates the denominator too */
} kk_rbf_norm;

typedef struct kk_rbf_grid_layout_t {
  int64_t cells_max;       /* the most cells the grid may use */
  int64_t cell_start_off;  /* byte offsets of the arrays (see the layout above) */
  int64_t order_off;
  int64_t coords_off;
  int64_t bytes;           /* the whole buffer */
} kk_rbf_grid_layout_t;

/* The layout of the grid buffer for m centres in dim dimensions of dtype (KK_FLOAT32 / KK_FLOAT64).
 * Bad arguments: KK_ERR_INVALID_SIZE / KK_ERR_UNSUPPORTED_DTYPE. */
KK_API kk_status kk_rbf_grid_layout(kk_dtype dtype, int32_t dim, int64_t m, kk_rbf_grid_layout_t* layout);

/* Build the grid of m centres (row stride ldc >= dim) into `grid` (grid_bytes >= the layout's bytes).
 * A non-finite centre: KK_ERR_INVALID_ARGUMENT (CPU); the CUDA version sets header flag 1 instead, and
 * every search on that grid returns idx -1 and dist2 NaN. */
KK_API kk_status kk_rbf_grid_build_cpu(kk_dtype dtype, int32_t dim, int64_t m, const void* centers, int64_t ldc,
                                       void* grid, int64_t grid_bytes, int32_t num_threads);

/* The k nearest centres of n queries (row stride ldx >= dim) from a grid built for dtype / dim:
 * idx (n x k, int64) and dist2 (n x k, dtype), sorted as described above. */
KK_API kk_status kk_rbf_knn_cpu(kk_dtype dtype, int32_t dim, int64_t n, const void* x, int64_t ldx,
                                const void* grid, int32_t k, int64_t* idx, void* dist2, int32_t num_threads);

/* out (n x channels, row stride ldo, wdtype) = the fused field evaluation above.  kernel: kk_rbf_kernel;
 * normalize: kk_rbf_norm; omegas may be NULL.  idx entries must be -1 or in [0, m) (else
 * KK_ERR_INVALID_ARGUMENT, checked).  The CPU version also checks the shapes: finite; full ones
 * symmetric to a relative 1e-5 (|A - A^T|_max <= 1e-5 |A|_max) and positive definite, diagonal ones
 * and nlin scales > 0 (else KK_ERR_INVALID_ARGUMENT naming the RBF). */
KK_API kk_status kk_rbf_features_fwd_cpu(kk_dtype dtype, kk_dtype wdtype, int32_t dim, int32_t kernel,
                                         int32_t shape_full, int64_t n, const void* x, int64_t ldx, int64_t m,
                                         const void* centers, const void* shapes, const void* weights,
                                         int64_t ldw, int64_t channels, const void* omegas, int32_t k,
                                         const int64_t* idx, int32_t normalize, void* out, int64_t ldo,
                                         int32_t num_threads);

/* The backward of kk_rbf_features_fwd_cpu for grad_out (n x channels, row stride ldg, wdtype): any of
 * dx (n x dim), dcenters (m x dim), dshapes (as shapes), dweights (m x channels, the coordinate dtype),
 * domegas (channels; ignored when omegas is NULL) may be NULL.  normalize selects the convention for
 * the denominator (KK_RBF_NORM_DETACHED or KK_RBF_NORM_FULL).  The result does not depend on
 * num_threads' scheduling beyond float32 summation order. */
KK_API kk_status kk_rbf_features_bwd_cpu(kk_dtype dtype, kk_dtype wdtype, int32_t dim, int32_t kernel,
                                         int32_t shape_full, int64_t n, const void* x, int64_t ldx, int64_t m,
                                         const void* centers, const void* shapes, const void* weights,
                                         int64_t ldw, int64_t channels, const void* omegas, int32_t k,
                                         const int64_t* idx, int32_t normalize, const void* grad_out,
                                         int64_t ldg, void* dx, void* dcenters, void* dshapes, void* dweights,
                                         void* domegas, int32_t num_threads);

/* CUDA versions (libkernelkit_cuda): device pointers and a cudaStream_t `stream` (NULL: the legacy
 * default stream) instead of num_threads; nothing synchronizes the stream.  Values are not checked
 * (that would synchronize): a non-finite centre is flagged in the grid (above); idx entries outside
 * [-1, m) count as missing; shapes are used as given.  The grid build needs a device workspace of
 * kk_rbf_grid_build_cuda_workspace_size bytes (16-byte aligned, caller-owned).  The backward
 * scatter-adds with atomics (the last bits of dweights / dcenters / dshapes / domegas may differ from
 * run to run). */
KK_API kk_status kk_rbf_grid_build_cuda_workspace_size(kk_dtype dtype, int32_t dim, int64_t m, int64_t* bytes);
KK_API kk_status kk_rbf_grid_build_cuda(kk_dtype dtype, int32_t dim, int64_t m, const void* centers, int64_t ldc,
                                        void* grid, int64_t grid_bytes, void* workspace, int64_t workspace_bytes,
                                        void* stream);
KK_API kk_status kk_rbf_knn_cuda(kk_dtype dtype, int32_t dim, int64_t n, const void* x, int64_t ldx,
                                 const void* grid, int32_t k, int64_t* idx, void* dist2, void* stream);
KK_API kk_status kk_rbf_features_fwd_cuda(kk_dtype dtype, kk_dtype wdtype, int32_t dim, int32_t kernel,
                                          int32_t shape_full, int64_t n, const void* x, int64_t ldx, int64_t m,
                                          const void* centers, const void* shapes, const void* weights,
                                          int64_t ldw, int64_t channels, const void* omegas, int32_t k,
                                          const int64_t* idx, int32_t normalize, void* out, int64_t ldo,
                                          void* stream);
KK_API kk_status kk_rbf_features_bwd_cuda(kk_dtype dtype, kk_dtype wdtype, int32_t dim, int32_t kernel,
                                          int32_t shape_full, int64_t n, const void* x, int64_t ldx, int64_t m,
                                          const void* centers, const void* shapes, const void* weights,
                                          int64_t ldw, int64_t channels, const void* omegas, int32_t k,
                                          const int64_t* idx, int32_t normalize, const void* grad_out,
                                          int64_t ldg, void* dx, void* dcenters, void* dshapes, void* dweights,
                                          void* domegas, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* KERNELKIT_RBF_H_ */
