/*
 * kernelkit public C ABI, mfac family: the kernels of M-FAC (Frantar, Kurtic, Alistarh, NeurIPS 2021),
 * matrix-free inverse-Hessian-vector products (IHVPs) with the damped empirical Fisher.  Included by
 * kernelkit.h (and includes it).
 *
 * Problem.  m gradients g_i (d each) are the rows of a buffer G (m x d, row stride ldg >= d) and
 *
 *     F = damp * I + (1/m) sum_i g_i g_i^T,        damp > 0.
 *
 * F (d x d) is never formed.  With the m x m matrix K = m * damp * I + G G^T (symmetric positive
 * definite), the Woodbury identity gives
 *
 *     F^-1 x = (1/damp) * (x - G^T K^-1 G x).
 *
 * Dynamic (sliding-window) algorithm, for the M-FAC optimizer: the caller keeps the Gram matrix
 * gram = G G^T and kinv = K^-1 in float64 (m x m, row-major, contiguous).  Replacing row `row` of G by
 * a new gradient is kk_mfac_dots with insert_row = row (one pass over G: the new row is written and
 * its dot products with every row come back) followed by kk_mfac_window_update (O(m^2): the Gram row
 * and column, and kinv updated by bordering).  An IHVP is
 *     q = G x (kk_mfac_dots),  c = -(1/damp) kinv q (kk_mfac_window_coef),
 *     out = (1/damp) x + G^T c (kk_mfac_combine):
 * two passes over G plus O(m^2).  kk_mfac_window_rebuild recomputes kinv from gram in O(m^3) (callers
 * may do it every m updates or so, to bound the rounding drift of the updates).
 *
 * Static algorithm, for pruning: kk_mfac_static_setup factors F once into a matrix Z (r x d) with
 *
 *     F_b^-1 = alpha * I + beta * Z_b^T Z_b       for every block b,
 *
 * where the coordinates are split into blocks of `block` consecutive columns, [b*block, min(d,
 * (b+1)*block)) (the last block may be shorter), F_b is F restricted to block b (F is taken
 * block-diagonal; block >= d: one block, the full F) and Z_b = Z[:, block b].  Then an IHVP is
 * kk_mfac_dots + kk_mfac_combine on Z (per block, c = beta * q) and the diagonal of F^-1 is
 * kk_mfac_diag, O(r) per entry.  Two forms, by B = min(block, d):
 *   m <= B ("W form"):  r = m, alpha = 1/damp, beta = -1/damp,
 *                       Z_b = L_b^-1 G_b with L_b L_b^T = m*damp*I + G_b G_b^T (m x m Cholesky);
 *   m >  B ("E form"):  r = B, alpha = 0, beta = m,
 *                       Z_b = L_b^-1 (w_b x w_b lower triangular, in block b's columns; rows w_b..r-1
 *                       of a shorter last block are zero) with L_b L_b^T = m*damp*I + G_b^T G_b.
 * kk_mfac_static_rows gives r.  With the W form this is the paper's static algorithm (its v_k /
 * sqrt(d_k) are the rows of Z for one block) computed with a Cholesky factorization instead of the
 * O(d m^2) sequential recursion; the E form is the explicit block inverse of oBERT.
 *
 * Blocks in kk_mfac_dots / kk_mfac_combine: nblocks = ceil(d / block) (0 when d = 0), and
 *     q[v, b, i] = sum_{j in block b} G[i, j] * x[v, j]                       (nvec, nblocks, r)
 *     out[v, j]  = alpha * x[v, j] + sum_i c[v, b(j), i] * G[i, j]            (nvec, d)
 * block >= d gives the plain q = G x and out = alpha x + G^T c.  nvec vectors share one pass over G.
 *
 * dtypes.  The buffer (G or Z) is KK_FLOAT32, KK_BFLOAT16 or KK_FLOAT64 (the `gdtype` argument); the
 * vectors x / out are float32 with a float32 or bfloat16 buffer and float64 with a float64 buffer; q, c,
 * gram and kinv are always float64.  Products are accumulated in at least float32 in partial sums of
 * at most 4096 terms, combined in float64 (the CPU library accumulates in float64 throughout).  A
 * static Z is float32 for a float32 / bfloat16 G and float64 for a float64 G.
 *
 * Sizes: r (or m), d, nvec >= 0 (0: nothing is read or written); block >= 1; row strides >= d.
 * Pointers of arrays with no element may be NULL.  Every index is 64-bit.  num_threads <= 0 uses the
 * OpenMP default.  Names follow kk_mfac_<op>_<cpu|cuda>.
 */
#ifndef KERNELKIT_MFAC_H_
#define KERNELKIT_MFAC_H_

#include "kernelkit/kernelkit.h"

#ifdef __cplusplus
extern "C" {
#endif

/* r, the rows of the static factor Z: m if m <= min(block, d), else min(block, d) (0 if d = 0 or
 * m = 0; -1 if a size is negative or block < 1). */
KK_API int64_t kk_mfac_static_rows(int64_t m, int64_t d, int64_t block);

/* q (nvec, nblocks, r), float64: the per-block dot products of every row of G with every x (layout
 * above).  x: nvec rows, row stride ldx >= d, the vector dtype.
 * insert_row >= 0 (needs nvec == 1 and insert_row < r): first row insert_row of G is overwritten with
 * x rounded to the buffer dtype (round to nearest even), in the same pass; then q = G_new x and, if qr is
 * not NULL, qr = G_new round(x) (the new row's Gram column, equal to q for float32 / float64 buffers;
 * same layout as q).  A non-finite entry of x with insert_row >= 0 leaves G unchanged: the CPU
 * function returns KK_ERR_INVALID_ARGUMENT, the CUDA function fills q and qr with NaN.  insert_row < 0:
 * G is only read (qr ignored). */
KK_API kk_status kk_mfac_dots_cpu(kk_dtype gdtype, int64_t r, int64_t d, int64_t block, void* G,
                                  int64_t ldg, int64_t nvec, const void* x, int64_t ldx,
                                  int64_t insert_row, double* q, double* qr, int32_t num_threads);

/* out (nvec rows, row stride ldo >= d, the vector dtype) = alpha * x + G^T c per block (layout above);
 * c (nvec, nblocks, r) float64.  x may be NULL (the alpha term is dropped); out may be x itself (same
 * pointer and ldo == ldx), other overlaps are not allowed. */
KK_API kk_status kk_mfac_combine_cpu(kk_dtype gdtype, int64_t r, int64_t d, int64_t block, const void* G,
                                     int64_t ldg, int64_t nvec, double alpha, const void* x, int64_t ldx,
                                     const double* c, void* out, int64_t ldo, int32_t num_threads);

/* out[j] = alpha + beta * sum_i Z[i, j]^2 for j < d (the diagonal of alpha I + beta Z^T Z; with the
 * static factor, the diagonal of F^-1), the vector dtype; sums of squares in float64. */
KK_API kk_status kk_mfac_diag_cpu(kk_dtype zdtype, int64_t r, int64_t d, const void* Z, int64_t ldz,
                                  double alpha, double beta, void* out, int32_t num_threads);

/* The static factor Z (r x d, row stride ldz >= d; float32, or float64 for a float64 G) of the damped
 * Fisher of G (m x d) over blocks of `block` columns (forms above).  Z may be G itself (same pointer,
 * gdtype float32 or float64, ldz == ldg): the factor then overwrites the first r rows block by block.
 * The Gram matrices, their Cholesky factors and the triangular solves are float64.  A Gram matrix
 * that is not numerically positive definite after the shift (damp far too small for the scale of G)
 * or a non-finite entry of G is KK_ERR_INVALID_ARGUMENT (Z is then unspecified).  damp > 0, finite. */
KK_API kk_status kk_mfac_static_setup_cpu(kk_dtype gdtype, int64_t m, int64_t d, int64_t block,
                                          const void* G, int64_t ldg, double damp, void* Z, int64_t ldz,
                                          int32_t num_threads);

/* Sliding window, one row replaced: newcol (m) holds the dot products of the new row of G with every
 * row, the new row included (qr of kk_mfac_dots with insert_row = row; q for float32 / float64
 * buffers).  Sets gram[row, :] = gram[:, row] = newcol and updates kinv = (m*damp*I + gram)^-1 in O(m^2)
 * by bordering: with P the matrix without row and column `row` (unchanged), a = kinv[:, row],
 *     P^-1 = kinv_{-row,-row} - a a^T / a_row,   w = P^-1 b,   s = c - b^T w
 *     (b = newcol without entry `row`, c = newcol[row] + m*damp; s >= m*damp in exact arithmetic),
 *     kinv'_{-row,-row} = P^-1 + w w^T / s,   kinv'_{-row,row} = -w / s,   kinv'_{row,row} = 1 / s.
 * Every term is bounded by ||kinv|| or ||kinv'||, so the rounding error stays at the conditioning of
 * the new K (a rank-2 Woodbury step instead has terms that grow with the replaced gradients).  kinv
 * stays exactly symmetric.  When a_row or s is not positive and finite, or s is lost to cancellation
 * (s <= 64 eps (|c| + sum |b_j w_j|)), kinv is recomputed as in kk_mfac_window_rebuild (the CUDA
 * version decides on the device, without synchronizing).  kinv must hold (m*damp*I + gram)^-1 on entry.
 * 0 <= row < m, damp > 0; newcol finite (else KK_ERR_INVALID_ARGUMENT, nothing changed). */
KK_API kk_status kk_mfac_window_update_cpu(int64_t m, double damp, double* gram, double* kinv, int64_t row,
                                           const double* newcol, int32_t num_threads);

/* kinv = (m*damp*I + gram)^-1 by a Cholesky factorization (float64, O(m^3)); gram is symmetric (only
 * its lower triangle is read).  Not positive definite: KK_ERR_INVALID_ARGUMENT. */
KK_API kk_status kk_mfac_window_rebuild_cpu(int64_t m, double damp, const double* gram, double* kinv,
                                            int32_t num_threads);

/* c[v] = scale * kinv q[v] for v < nvec (q, c: (nvec, m) float64; c must not overlap q). */
KK_API kk_status kk_mfac_window_coef_cpu(int64_t m, int64_t nvec, double scale, const double* kinv,
                                         const double* q, double* c, int32_t num_threads);

/* CUDA versions (libkernelkit_cuda): device pointers and a cudaStream_t `stream` (NULL: the legacy
 * default stream) instead of num_threads; nothing synchronizes the stream.  Buffer dtypes: KK_FLOAT32,
 * KK_BFLOAT16, KK_FLOAT64.  kk_mfac_dots_cuda may accumulate q with atomics (last bits may differ
 * from run to run).  kk_mfac_window_update_cuda and kk_mfac_window_rebuild_cuda need a device
 * workspace of kk_mfac_window_cuda_workspace_size bytes, kk_mfac_static_setup_cuda one of
 * kk_mfac_static_setup_cuda_workspace_size bytes (16-byte aligned; the caller owns them).  The CUDA
 * functions cannot report a non-positive-definite matrix or a non-finite input (they do not
 * synchronize): the results are then NaN. */
KK_API kk_status kk_mfac_dots_cuda(kk_dtype gdtype, int64_t r, int64_t d, int64_t block, void* G,
                                   int64_t ldg, int64_t nvec, const void* x, int64_t ldx,
                                   int64_t insert_row, double* q, double* qr, void* stream);
KK_API kk_status kk_mfac_combine_cuda(kk_dtype gdtype, int64_t r, int64_t d, int64_t block, const void* G,
                                      int64_t ldg, int64_t nvec, double alpha, const void* x, int64_t ldx,
                                      const double* c, void* out, int64_t ldo, void* stream);
KK_API kk_status kk_mfac_diag_cuda(kk_dtype zdtype, int64_t r, int64_t d, const void* Z, int64_t ldz,
                                   double alpha, double beta, void* out, void* stream);
KK_API kk_status kk_mfac_static_setup_cuda_workspace_size(kk_dtype gdtype, int64_t m, int64_t d,
                                                          int64_t block, int64_t* bytes);
KK_API kk_status kk_mfac_static_setup_cuda(kk_dtype gdtype, int64_t m, int64_t d, int64_t block,
                                           const void* G, int64_t ldg, double damp, void* Z, int64_t ldz,
                                           void* workspace, int64_t workspace_bytes, void* stream);
KK_API kk_status kk_mfac_window_cuda_workspace_size(int64_t m, int64_t* bytes);
KK_API kk_status kk_mfac_window_update_cuda(int64_t m, double damp, double* gram, double* kinv, int64_t row,
                                            const double* newcol, void* workspace, int64_t workspace_bytes,
                                            void* stream);
KK_API kk_status kk_mfac_window_rebuild_cuda(int64_t m, double damp, const double* gram, double* kinv,
                                             void* workspace, int64_t workspace_bytes, void* stream);
KK_API kk_status kk_mfac_window_coef_cuda(int64_t m, int64_t nvec, double scale, const double* kinv,
                                          const double* q, double* c, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* KERNELKIT_MFAC_H_ */
