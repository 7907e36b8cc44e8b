/*
 * kernelkit public C ABI, vq family: a linear layer whose weight is vector-quantized with one or more
 * additive codebooks (VQ4DiT, AQLM).  Included by kernelkit.h (and includes it).
 *
 * Format (kk_vq_format).  W is n_out x n_in; each row is cut into G = n_in / d groups of d consecutive
 * inputs; group g of row o stores M codes, each an index into one of M codebooks of K codewords of d
 * values.  Output rows are split into sets of rows_per_codebook consecutive rows; each set s has its
 * own M codebooks (rows_per_codebook >= n_out: one set for the layer):
 *
 *   codes      [n_out, G, M]          code_bits 8: uint8 (K <= 256); 16: int16 read as unsigned
 *                                     (AQLM's convention: a code >= 2^15 is stored negative), K <= 65536
 *   codebooks  [n_sets, M, K, d]      dtype, contiguous; n_sets = ceil(n_out / rows_per_codebook)
 *   scales     [n_out]                dtype, may be NULL (all ones)
 *   bias       [n_out]                dtype, may be NULL
 *
 *   W[o, g*d + t] = scale[o] * sum_m codebooks[o / rows_per_codebook, m, codes[o, g, m], t]
 *
 * Math (b over batch rows; accumulation in float32 for float16/bfloat16, else in the dtype):
 *   forward     out[b, o]    = bias[o] + sum_i x[b, i] * W[o, i]
 *   backward    dx[b, i]     = sum_o dout[b, o] * W[o, i]
 *               dcodebooks[s, m, k, t] = sum over (o in set s, g) with codes[o, g, m] = k of
 *                                        scale[o] * dW[o, g*d + t],   dW[o, i] = sum_b dout[b, o] x[b, i]
 *               dscales[o]   = sum_i dW[o, i] * U[o, i],   U = W without the scale (scale[o] = 1)
 * x (batch, n_in), out and dout (batch, n_out), dx (batch, n_in): row-major, inner stride 1, row
 * strides ldx / ldo / lddo / lddx >= the width.  In the backward, dx, dcodebooks and dscales may each
 * be NULL (not wanted; dscales must be NULL when scales is); they are overwritten, not accumulated.
 * The dense W is never materialized by the matmul entry points.  batch = 0 is valid (gradients of
 * the codebooks and scales are zero), and so are n_out = 0 and n_in = 0.
 *
 * Paths (the `path` argument of the forward): KK_VQ_PATH_AUTO picks by batch size and format;
 * KK_VQ_PATH_GEMV is the small-batch path (CPU: per-group lookup tables of <x_g, codeword> for every
 * codeword; GPU: codebooks held on chip); KK_VQ_PATH_GEMM dequantizes tiles of W on the fly into a
 * blocked matmul.  Both give the same result up to rounding.
 *
 * Codes are checked (every code < K as an unsigned value) by kk_vq_check_codes and, on the CPU, by
 * every entry point before a kernel reads through them, unless format.flags has KK_VQ_CODES_CHECKED
 * (the caller checked them once, e.g. when the layer was built).  When K = 2^code_bits every code is
 * valid and nothing is read.  The CUDA entry points cannot read device memory from the host and trust
 * the codes: check them on the host first.
 *
 * Names follow kk_<family>_<op>_<fwd|bwd>_<cpu|cuda>; the ops are "linear", "dequantize", "assign".
 */
#ifndef KERNELKIT_VQ_H_
#define KERNELKIT_VQ_H_

#include "kernelkit/kernelkit.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KK_VQ_PATH_AUTO 0
#define KK_VQ_PATH_GEMV 1
#define KK_VQ_PATH_GEMM 2

/* format.flags */
#define KK_VQ_CODES_CHECKED 1

typedef struct kk_vq_format {
  int64_t n_out;             /* rows of W, >= 0 */
  int64_t n_in;              /* columns of W, >= 0, a multiple of group_size */
  int64_t codebook_size;     /* K, 1 .. 2^code_bits */
  int64_t rows_per_codebook; /* >= 1: output rows sharing one set of M codebooks */
  int32_t group_size;        /* d: 1, 2, 4, 8 or 16 */
  int32_t num_codebooks;     /* M: 1 .. 16 (additive) */
  int32_t code_bits;         /* 8 (uint8 codes) or 16 (int16 codes, read as unsigned) */
  int32_t flags;             /* 0 or KK_VQ_CODES_CHECKED */
} kk_vq_format;

/* Checks the format's fields (sizes, group size, code width) and, on the host, that every code is
 * < K.  KK_OK, or KK_ERR_INVALID_SIZE / KK_ERR_INVALID_ARGUMENT / KK_ERR_NULL_POINTER with the first
 * violation (its row, group, codebook and value) in kk_last_error().  codes may be NULL when there
 * are none. */
KK_API kk_status kk_vq_check_codes(const kk_vq_format* format, const void* codes);

/* W (n_out, n_in), row stride ldw >= n_in, from the codes.  CPU dtypes: KK_FLOAT32, KK_FLOAT64. */
KK_API kk_status kk_vq_dequantize_cpu(kk_dtype dtype, const kk_vq_format* format, const void* codes,
                                      const void* codebooks, const void* scales, void* w, int64_t ldw,
                                      int32_t num_threads);

/* CPU dtypes: KK_FLOAT32, KK_FLOAT64.  num_threads <= 0 uses the OpenMP default. */
KK_API kk_status kk_vq_linear_fwd_cpu(kk_dtype dtype, const kk_vq_format* format, int64_t batch,
                                      const void* codes, const void* codebooks, const void* scales,
                                      const void* x, int64_t ldx, const void* bias, void* out,
                                      int64_t ldo, int32_t path, int32_t num_threads);

KK_API kk_status kk_vq_linear_bwd_cpu(kk_dtype dtype, const kk_vq_format* format, int64_t batch,
                                      const void* codes, const void* codebooks, const void* scales,
                                      const void* x, int64_t ldx, const void* dout, int64_t lddo,
                                      void* dx, int64_t lddx, void* dcodebooks, void* dscales,
                                      int32_t num_threads);

/* The assignment step of k-means: for each of n vectors (n, d) the topn nearest of K centroids (K, d)
 * in squared Euclidean distance, nearest first (ties: the smaller index first).  idx int32 (n, topn),
 * dist (n, topn) in the dtype (may be NULL).  1 <= topn <= min(8, K); d >= 1; both arrays contiguous.
 * Distances are computed directly as sum_t (v_t - c_t)^2 (no |v|^2 + |c|^2 - 2 v.c cancellation).
 * CPU dtypes: KK_FLOAT32, KK_FLOAT64. */
KK_API kk_status kk_vq_assign_cpu(kk_dtype dtype, int64_t n, int64_t K, int32_t d, const void* vectors,
                                  const void* centroids, int32_t topn, int32_t* idx, void* dist,
                                  int32_t num_threads);

/* CUDA versions (libkernelkit_cuda).  dtypes: KK_FLOAT32, KK_FLOAT16, KK_BFLOAT16 with float32
 * accumulation (assign: KK_FLOAT32 only).  Pointers are device pointers; codes are trusted (see
 * above).  The linear entry points need a device workspace of the bytes their *_workspace_size
 * reports (may be 0, then workspace may be NULL), 16-byte aligned; the caller owns it.  The codebook
 * gradient accumulates with float32 atomics, so its last bits may differ from run to run. */
KK_API kk_status kk_vq_dequantize_cuda(kk_dtype dtype, const kk_vq_format* format, const void* codes,
                                       const void* codebooks, const void* scales, void* w, int64_t ldw,
                                       void* stream);

KK_API kk_status kk_vq_linear_fwd_cuda_workspace_size(kk_dtype dtype, const kk_vq_format* format,
                                                      int64_t batch, int32_t path, int64_t* bytes);

KK_API kk_status kk_vq_linear_fwd_cuda(kk_dtype dtype, const kk_vq_format* format, int64_t batch,
                                       const void* codes, const void* codebooks, const void* scales,
                                       const void* x, int64_t ldx, const void* bias, void* out,
                                       int64_t ldo, int32_t path, void* workspace,
                                       int64_t workspace_bytes, void* stream);

KK_API kk_status kk_vq_linear_bwd_cuda_workspace_size(kk_dtype dtype, const kk_vq_format* format,
                                                      int64_t batch, int64_t* bytes);

KK_API kk_status kk_vq_linear_bwd_cuda(kk_dtype dtype, const kk_vq_format* format, int64_t batch,
                                       const void* codes, const void* codebooks, const void* scales,
                                       const void* x, int64_t ldx, const void* dout, int64_t lddo,
                                       void* dx, int64_t lddx, void* dcodebooks, void* dscales,
                                       void* workspace, int64_t workspace_bytes, void* stream);

KK_API kk_status kk_vq_assign_cuda(kk_dtype dtype, int64_t n, int64_t K, int32_t d, const void* vectors,
                                   const void* centroids, int32_t topn, int32_t* idx, void* dist,
                                   void* stream);

#ifdef __cplusplus
}
#endif

#endif /* KERNELKIT_VQ_H_ */
