/*
 * kernelkit public C ABI, ot family: log-domain Sinkhorn and the pieces of the Sinkhorn-Newton-Sparse
 * (SNS) solver for entropic optimal transport.  Included by kernelkit.h (and includes it).
 *
 * Problem (POT's convention).  For each of `batch` problems: weights a (n) >= 0, b (m) >= 0, a cost
 * C (n x m) and reg > 0.  The dual potentials f (n) and g (m), in cost units, define the plan
 *
 *     P_ij = exp((f_i + g_j - C_ij) / reg)
 *
 * (POT's sinkhorn_log: u = f / reg, v = g / reg).  The dual objective (concave in (f, g)) is
 *
 *     D(f, g) = sum_i a_i f_i + sum_j b_j g_j - reg * sum_ij P_ij,
 *
 * its gradient is (a - P 1, b - P^T 1) and its Hessian is -(1/reg) [[diag(P 1), P], [P^T, diag(P^T 1)]].
 * At the optimum D equals the regularized cost <C, P> + reg * sum_ij P_ij (log P_ij - 1).
 *
 * The cost (kk_ot_cost) is a dense matrix or is computed on the fly from two point clouds, so a
 * point-cloud problem never stores an n x m array:
 *   KK_OT_COST_MATRIX         C[b, i, j] = matrix[b * batch_stride + i * ld + j]   (ld >= m; batch_stride
 *                             >= 0, and 0 shares one matrix between all problems)
 *   KK_OT_COST_SQEUCLIDEAN    C_ij = sum_t (x_it - y_jt)^2
 *   KK_OT_COST_EUCLIDEAN_POW  C_ij = (sum_t (x_it - y_jt)^2)^(p/2),   p > 0   (p = 1: the distance)
 *   KK_OT_COST_MINKOWSKI_POW  C_ij = sum_t |x_it - y_jt|^p,            p >= 1  (||x - y||_p^p)
 * with x[b, i, t] = x[b * x_batch_stride + i * dim + t] and y likewise (rows contiguous; a batch stride
 * of 0 shares the points).  Differences are formed directly (no |x|^2 + |y|^2 - 2 x.y cancellation).
 * 1 <= dim <= KK_OT_MAX_DIM.  reg must be finite and > 0, p finite.
 *
 * Arrays other than the cost are contiguous per problem and packed over the batch: a, f, r, vx (batch,
 * n); b, g, c, vy (batch, m); cols / vals (batch, n, k); err, obj, resid (batch).  Zero weights are
 * allowed: log 0 = -inf, so the potential there is -inf and that row (column) of P is 0; every kernel
 * treats 0 * (-inf) as 0 and exp(-inf) as 0 and never produces NaN from them.  Every size may be 0
 * (batch, n, m: nothing is read, outputs of length 0; the LSE of an empty set is -inf).
 *
 * Sums over the plan accumulate in at least the dtype's precision (float32 problems may accumulate
 * in float64); the log-sum-exp subtracts a running maximum, so no exp overflows or underflows to
 * a wrong result at any reg.  CPU dtypes: KK_FLOAT32, KK_FLOAT64.  num_threads <= 0 uses the
 * OpenMP default.  CUDA dtypes: KK_FLOAT32, KK_FLOAT64 (no TF32 anywhere).
 *
 * Names follow kk_ot_<op>_<cpu|cuda>; the ops are "sinkhorn_step", "marginals", "plan", "sparsify",
 * "hvp", "cg" and "points_grad".
 */
#ifndef KERNELKIT_OT_H_
#define KERNELKIT_OT_H_

#include "kernelkit/kernelkit.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KK_OT_COST_MATRIX 0
#define KK_OT_COST_SQEUCLIDEAN 1
#define KK_OT_COST_EUCLIDEAN_POW 2
#define KK_OT_COST_MINKOWSKI_POW 3

#define KK_OT_MAX_DIM 1024  /* the largest point dimension */
#define KK_OT_MAX_KEEP 4096 /* the largest k of kk_ot_sparsify */

/* err_norm of kk_ot_sinkhorn_step */
#define KK_OT_NORM_INF 0
#define KK_OT_NORM_L1 1
#define KK_OT_NORM_L2 2

typedef struct kk_ot_cost {
  int32_t kind;         /* KK_OT_COST_* */
  int32_t dim;          /* point-cloud kinds: D, 1 .. KK_OT_MAX_DIM (ignored for MATRIX) */
  double p;             /* EUCLIDEAN_POW / MINKOWSKI_POW: the power (ignored otherwise) */
  const void* matrix;   /* MATRIX: C, the dtype */
  int64_t ld;           /* MATRIX: row stride (elements), >= m */
  int64_t batch_stride; /* MATRIX: stride between problems (elements), >= 0 */
  const void* x;        /* point kinds: (n, dim) per problem, the dtype */
  int64_t x_batch_stride;
  const void* y;        /* point kinds: (m, dim) per problem */
  int64_t y_batch_stride;
} kk_ot_cost;

/* One log-domain Sinkhorn half-step per problem, with the marginal error of the current plan fused in.
 *   axis 0 (rows):    s_i = LSE_j((other_j - C_ij) / reg),   pot_new_i = reg * (log w_i - s_i)
 *                     (w = a, pot = f, other = g: the f update)
 *   axis 1 (columns): s_j = LSE_i((other_i - C_ij) / reg),   pot_new_j = reg * (log w_j - s_j)
 *                     (w = b, pot = g, other = f: the g update)
 * w_k = 0 gives pot_new_k = -inf.  err (may be NULL) receives, per problem, the error on this axis of
 * the plan (pot, other) BEFORE the update: || exp(pot_k / reg + s_k) - w_k ||  in the norm err_norm
 * (KK_OT_NORM_L1 / _L2 / _INF); it needs pot (else pot may be NULL).  pot_new may alias pot. */
KK_API kk_status kk_ot_sinkhorn_step_cpu(kk_dtype dtype, const kk_ot_cost* cost, int64_t batch, int64_t n,
                                         int64_t m, int32_t axis, double reg, const void* w,
                                         const void* other, const void* pot, void* pot_new, void* err,
                                         int32_t err_norm, int32_t num_threads);

/* The plan's (weighted) marginals and the dual objective at (f, g):
 *   r_i = sum_j P_ij * wc_j  (batch, n),   c_j = sum_i wr_i * P_ij  (batch, m),
 *   obj[b] = D(f, g) = <a, f> + <b, g> - reg * sum_ij P_ij   (unweighted; needs a and b).
 * wr (batch, n) and wc (batch, m) may be NULL (all ones: the plain marginals P 1 and P^T 1).  Any of
 * r, c, obj may be NULL (a, b may be NULL when obj is).  A non-finite P (overflow at a far-off trial
 * point) gives inf / NaN sums, never an error. */
KK_API kk_status kk_ot_marginals_cpu(kk_dtype dtype, const kk_ot_cost* cost, int64_t batch, int64_t n,
                                     int64_t m, double reg, const void* f, const void* g, const void* a,
                                     const void* b, const void* wr, const void* wc, void* r, void* c,
                                     void* obj, int32_t num_threads);

/* The dense plan P (batch, n, m), row stride ldp >= m, problem stride n * ldp. */
KK_API kk_status kk_ot_plan_cpu(kk_dtype dtype, const kk_ot_cost* cost, int64_t batch, int64_t n, int64_t m,
                                double reg, const void* f, const void* g, void* plan, int64_t ldp,
                                int32_t num_threads);

/* The sparsified plan of SNS: in each row i, the k largest entries of P_i., ranked by the key
 * g_j - C_ij (the same order as P_ij for a finite f_i; ties, -inf included: the smaller column first; a
 * NaN key ranks as -inf), stored in increasing column order: cols int32 (batch, n, k), vals (batch, n, k)
 * = P_ij (0 in a row whose f_i is -inf).  1 <= k <= min(m, KK_OT_MAX_KEEP) when n, m >= 1; with
 * batch, n or m = 0 nothing is read or written and k is not checked. */
KK_API kk_status kk_ot_sparsify_cpu(kk_dtype dtype, const kk_ot_cost* cost, int64_t batch, int64_t n,
                                    int64_t m, int64_t k, double reg, const void* f, const void* g,
                                    int32_t* cols, void* vals, int32_t num_threads);

/* The sparsified Hessian (sign flipped and times reg) applied to v = (vx, vy), per problem:
 *   yx = r .* vx + S vy + shift * vx,     yy = S^T vx + c .* vy + shift * vy,
 * S (n x m) the sparse matrix (cols, vals) of kk_ot_sparsify (k entries per row; a column index
 * outside [0, m) is KK_ERR_INVALID_ARGUMENT on the CPU; the CUDA version trusts them).  r and c are
 * the FULL plan's marginals (kk_ot_marginals), shift >= 0.  y must not alias v. */
KK_API kk_status kk_ot_hvp_cpu(kk_dtype dtype, int64_t batch, int64_t n, int64_t m, int64_t k,
                               const int32_t* cols, const void* vals, const void* r, const void* c,
                               double shift, const void* vx, const void* vy, void* yx, void* yy,
                               int32_t num_threads);

/* Solves H z = rhs for each problem (H as in kk_ot_hvp) by conjugate gradient with the Jacobi
 * preconditioner diag(r + shift, c + shift) (a diagonal entry <= 0 is taken as 1).  (zx, zy) holds
 * the initial guess on entry and the solution on exit.  Stops when ||rhs - H z||_2 <= tol * ||rhs||_2
 * (tol > 0) or after max_iter >= 0 iterations; a zero rhs gives z = 0 in 0 iterations.  iters (int32,
 * batch) and resid (batch, the final relative residual ||rhs - H z|| / ||rhs||, 0 for a zero rhs) may
 * be NULL.  H is positive semidefinite; it is singular only when S holds all of P, and then the system
 * is consistent when sum(rhs_x) = sum(rhs_y), which the SNS gradient satisfies. */
KK_API kk_status kk_ot_cg_cpu(kk_dtype dtype, int64_t batch, int64_t n, int64_t m, int64_t k,
                              const int32_t* cols, const void* vals, const void* r, const void* c,
                              double shift, const void* rhs_x, const void* rhs_y, void* zx, void* zy,
                              double tol, int32_t max_iter, int32_t* iters, void* resid,
                              int32_t num_threads);

/* Gradient with respect to the points (point-cloud kinds only) of sum_ij W_ij C(x_i, y_j) with the
 * weights W_ij = P_ij * (s_b + u_i + v_j) held fixed (P at (f, g)):
 *   dx[b, i, :] = sum_j W_ij * dC(x_i, y_j)/dx_i,     dy[b, j, :] = sum_i W_ij * dC(x_i, y_j)/dy_j,
 * s_b = scale[b] (scale NULL: 1), u (batch, n) and v (batch, m) NULL: 0.  With u = v = NULL this is the
 * envelope-theorem gradient of the regularized cost, times scale.  dx (batch, n, dim) and dy (batch, m,
 * dim) are contiguous; either may be NULL.  Where the cost is not differentiable (x_i = y_j with p <= 1
 * for EUCLIDEAN_POW; a zero coordinate difference with MINKOWSKI_POW p = 1) the subgradient 0 is used. */
KK_API kk_status kk_ot_points_grad_cpu(kk_dtype dtype, const kk_ot_cost* cost, int64_t batch, int64_t n,
                                       int64_t m, double reg, const void* f, const void* g,
                                       const void* scale, const void* u, const void* v, void* dx, void* dy,
                                       int32_t num_threads);

/* CUDA versions (libkernelkit_cuda): the same arguments with device pointers and a cudaStream_t as
 * `stream` (NULL: the legacy default stream) instead of num_threads.  kk_ot_cg_cuda runs its loop on
 * the host, launching a few kernels per iteration and reading the residuals back every few
 * iterations; it synchronizes the stream before it returns.  kk_ot_hvp_cuda trusts the column
 * indices.  The column sums of kk_ot_hvp_cuda / kk_ot_cg_cuda / kk_ot_points_grad_cuda may
 * accumulate with atomics, so their last bits may differ from run to run. */
KK_API kk_status kk_ot_sinkhorn_step_cuda(kk_dtype dtype, const kk_ot_cost* cost, int64_t batch, int64_t n,
                                          int64_t m, int32_t axis, double reg, const void* w,
                                          const void* other, const void* pot, void* pot_new, void* err,
                                          int32_t err_norm, void* stream);
KK_API kk_status kk_ot_marginals_cuda(kk_dtype dtype, const kk_ot_cost* cost, int64_t batch, int64_t n,
                                      int64_t m, double reg, const void* f, const void* g, const void* a,
                                      const void* b, const void* wr, const void* wc, void* r, void* c,
                                      void* obj, void* stream);
KK_API kk_status kk_ot_plan_cuda(kk_dtype dtype, const kk_ot_cost* cost, int64_t batch, int64_t n, int64_t m,
                                 double reg, const void* f, const void* g, void* plan, int64_t ldp,
                                 void* stream);
KK_API kk_status kk_ot_sparsify_cuda(kk_dtype dtype, const kk_ot_cost* cost, int64_t batch, int64_t n,
                                     int64_t m, int64_t k, double reg, const void* f, const void* g,
                                     int32_t* cols, void* vals, void* stream);
KK_API kk_status kk_ot_hvp_cuda(kk_dtype dtype, int64_t batch, int64_t n, int64_t m, int64_t k,
                                const int32_t* cols, const void* vals, const void* r, const void* c,
                                double shift, const void* vx, const void* vy, void* yx, void* yy,
                                void* stream);
/* kk_ot_cg_cuda needs a device workspace of kk_ot_cg_cuda_workspace_size bytes (16-byte aligned; the
 * caller owns it). */
KK_API kk_status kk_ot_cg_cuda_workspace_size(kk_dtype dtype, int64_t batch, int64_t n, int64_t m,
                                              int64_t* bytes);
KK_API kk_status kk_ot_cg_cuda(kk_dtype dtype, int64_t batch, int64_t n, int64_t m, int64_t k,
                               const int32_t* cols, const void* vals, const void* r, const void* c,
                               double shift, const void* rhs_x, const void* rhs_y, void* zx, void* zy,
                               double tol, int32_t max_iter, int32_t* iters, void* resid, void* workspace,
                               int64_t workspace_bytes, void* stream);
KK_API kk_status kk_ot_points_grad_cuda(kk_dtype dtype, const kk_ot_cost* cost, int64_t batch, int64_t n,
                                        int64_t m, double reg, const void* f, const void* g,
                                        const void* scale, const void* u, const void* v, void* dx, void* dy,
                                        void* stream);

#ifdef __cplusplus
}
#endif

#endif /* KERNELKIT_OT_H_ */
