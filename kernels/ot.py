"""Triton kernels for entropic optimal transport: log-domain Sinkhorn half-steps and the pieces of the
Sinkhorn-Newton-Sparse (SNS) solver.

Source: Tang et al., "Accelerating Sinkhorn algorithm with sparse Newton iterations" (ICLR 2024); the
log-domain Sinkhorn of POT's ``sinkhorn_log``.  Math, conventions and the -inf / zero-weight rules: the C
ABI csrc/include/kernelkit/ot.h.  Float64 reference: python/kernelkit/ot/reference.py.

Per problem b of B (all arrays but the cost contiguous and packed over the batch):
    P_ij = exp((f_i + g_j - C_ij) / reg)
    sinkhorn_step  axis 0: s_i = LSE_j((g_j - C_ij) / reg), f_new_i = reg (log a_i - s_i)   (a_i = 0: -inf)
                   axis 1: s_j = LSE_i((f_i - C_ij) / reg), g_new_j = reg (log b_j - s_j)
                   err = || exp(pot_k / reg + s_k) - w_k ||  (L1 / L2 / inf) of the plan BEFORE the update
    marginals      r = P wc, c = P^T wr, obj = <a, f> + <b, g> - reg sum_ij P_ij
    plan           P (B, n, m)
    sparsify       per row the k largest keys g_j - C_ij (ties: smaller column; NaN as -inf), by column
    hvp            yx = r vx + S vy + shift vx,  yy = S^T vx + c vy + shift vy   (S = (cols, vals))
    cg             Jacobi-preconditioned CG on that operator (reference.cg_reference's algorithm)
    points_grad    dx_i = sum_j W_ij dC/dx_i, dy_j = -sum_i W_ij dC/dx_i, W = P (scale_b + u_i + v_j)
The cost C (B, n, m) is a matrix (inner stride 1, row stride ld, batch stride >= 0) or is computed on
the fly from points x (B, n, D), y (B, m, D) (rows contiguous, batch stride >= 0):
    kind 1  sum_t (x_it - y_jt)^2,   kind 2  (sum_t (x_it - y_jt)^2)^(p/2),   kind 3  sum_t |x_it - y_jt|^p
with the differences formed directly (no |x|^2 + |y|^2 - 2 x.y cancellation).

Kernels (1-D grids, batch outermost; a program owns a block of rows or columns of one problem):
    _sinkhorn_kernel   a block of BO rows (axis 0) or columns (axis 1); streams over the other axis in
        tiles, keeping a running maximum and a rescaled running sum (online log-sum-exp), so one pass
        reads the cost once.  The marginal error of the old potential is fused in: a per-block partial
        (sum |d|, sum d^2 or max |d|) that torch reduces over the blocks in a fixed order.
    _marginals_kernel  a block of rows; r and the row sums of P in registers, the column sums of the
        tile added to c with tl.atomic_add (so c's last bits may vary from run to run), sum P per block
        into a partials buffer.
    _plan_kernel       one (BI, BJ) tile of P.
    _sparsify_kernel   a block of rows; exact top-k by radix select on the order-preserving integer view
        of the key (fp32 -> int32, fp64 -> int64): NBITS / 4 passes over the row, each counting, among
        the entries whose key matches the threshold's bits found so far, how many have each next 4-bit
        digit >= q (q = 0..15), which fixes 4 more bits of the k-th largest key T and the number of
        entries equal to T still to take.  A last pass takes key > T and the first such ties by column
        (running counts + tl.cumsum give each taken entry its slot), so the output is in column order.
        The cost is recomputed each pass (no n x m storage): 9 passes for fp32, 17 for fp64.
    _hvp_cols_kernel / _hvp_rows_kernel   yy = (c + ..) vy per column block; then per row block yx from
        a gather of vy at the row's k columns, and S^T vx added into yy with tl.atomic_add.  In CG mode
        they first form the new direction p = s + beta p (s = res / diag) and add their parts of <p, Hp>
        (<p, Hp> = sum (r + shift) px^2 + sum (c + shift) py^2 + 2 <px, S py>, all row / column local).
    _cg_update_kernel / _cg_scalar_kernel  z += alpha p, res -= alpha q with the sums for |res|^2 and
        <res, s>; then per problem alpha / beta / the stopping test on the device.  The Python loop
        launches 4 kernels an iteration and reads the "active" flags back every CG_CHECK_EVERY
        iterations; a converged problem's programs do nothing.
    _points_grad_kernel  a block of rows; W tile, then per chunk of coordinates the (BI, BJ, BD)
        gradient terms, summed over j into dx and over i into dy with tl.atomic_add.

Numerics: float32 problems accumulate in float32, float64 in float64 (no tl.dot anywhere, so no TF32).
Scalars (reg, p, shift) are passed as float64 (annotated) and rounded once to the accumulation dtype.
Point costs: powers as exp(e log x) with exact special cases (p = 1, 2; sqrt_rn for the distance).
Offsets that scale with a row, a batch or a product of sizes are int64.  Only pointer arithmetic + masks
(no block pointers), so the same source runs on Triton 3.6 .. 3.9 and under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MATRIX, SQEUCLIDEAN, EUCLIDEAN_POW, MINKOWSKI_POW = 0, 1, 2, 3
NORM_INF, NORM_L1, NORM_L2 = 0, 1, 2
MAX_DIM = 1024    # KK_OT_MAX_DIM
MAX_KEEP = 4096   # KK_OT_MAX_KEEP
CG_CHECK_EVERY = 8   # CG iterations between two reads of the per-problem "active" flags
_PROGRAMS_MAX = 2 ** 31 - 1
_NEG_INF = tl.constexpr(float("-inf"))


# ----------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _as(v, DT: tl.constexpr):
    # a float64 scalar argument (a Python float under the interpreter) in the accumulation dtype
    return (tl.zeros((), DT) + v).to(DT)


@triton.jit
def _sqrt(x, ACC_DT: tl.constexpr):
    # correctly rounded: tl.sqrt is approximate for fp32 on the GPU, sqrt_rn is fp32-only
    if ACC_DT == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _pow_pos(x, e):
    # x >= 0, e > 0: x^e, and 0 at x = 0
    return tl.where(x > 0, tl.exp(e * tl.log(x)), 0.0)


@triton.jit
def _raw_cost(mat_ptr, ld, x_ptr, y_ptr, offs_i, offs_j, mask_i, mask_j, kind, p, D,
              BI: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr, IS_POINTS: tl.constexpr,
              ACC_DT: tl.constexpr):
    """The (BI, BJ) tile before the final power: C for the matrix and kinds 1 / 3, sum_t d^2 for kind 2.
    Pointers are already at problem b; offs_i / offs_j are int64; masked-off entries are finite."""
    if IS_POINTS:
        acc = tl.zeros((BI, BJ), dtype=ACC_DT)
        for d0 in range(0, D, BD):
            offs_d = d0 + tl.arange(0, BD)
            mask_d = offs_d < D
            xt = tl.load(x_ptr + offs_i[:, None] * D + offs_d[None, :], mask=mask_i[:, None] & mask_d[None, :],
                         other=0.0).to(ACC_DT)
            yt = tl.load(y_ptr + offs_j[:, None] * D + offs_d[None, :], mask=mask_j[:, None] & mask_d[None, :],
                         other=0.0).to(ACC_DT)
            diff = xt[:, None, :] - yt[None, :, :]                                  # (BI, BJ, BD)
            if kind == 3:   # uniform runtime branches: the kind and p are per launch
                if p == 1.0:
                    t = tl.abs(diff)
                elif p == 2.0:
                    t = diff * diff
                else:
                    t = _pow_pos(tl.abs(diff), _as(p, ACC_DT))
            else:
                t = diff * diff
            acc += tl.sum(t, axis=2)
        return acc
    else:
        c = tl.load(mat_ptr + offs_i[:, None] * ld + offs_j[None, :], mask=mask_i[:, None] & mask_j[None, :],
                    other=0.0)
        return c.to(ACC_DT)


@triton.jit
def _finish_cost(s, kind, p, ACC_DT: tl.constexpr):
    # kind 2: (sum d^2)^(p/2); the others are done
    if kind == 2:
        if p == 1.0:
            s = _sqrt(s, ACC_DT)
        elif p != 2.0:
            s = _pow_pos(s, _as(0.5 * p, ACC_DT))
    return s


@triton.jit
def _cost(mat_ptr, ld, x_ptr, y_ptr, offs_i, offs_j, mask_i, mask_j, kind, p, D,
          BI: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr, IS_POINTS: tl.constexpr, ACC_DT: tl.constexpr):
    c = _raw_cost(mat_ptr, ld, x_ptr, y_ptr, offs_i, offs_j, mask_i, mask_j, kind, p, D,
                  BI, BJ, BD, IS_POINTS, ACC_DT)
    if IS_POINTS:
        c = _finish_cost(c, kind, p, ACC_DT)
    return c


# ----------------------------------------------------------------------------------------------------
# Sinkhorn half-step
# ----------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["kind", "has_err", "err_norm"])
def _sinkhorn_kernel(mat_ptr, x_ptr, y_ptr, w_ptr, other_ptr, pot_ptr, out_ptr, part_ptr,
                     n, m, D, ld, mat_bs, x_bs, y_bs, n_blocks, kind, has_err, err_norm,
                     p: tl.float64, reg: tl.float64, inv_reg: tl.float64,
                     AXIS: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BO: tl.constexpr, BL: tl.constexpr,
                     BD: tl.constexpr, IS_POINTS: tl.constexpr, TINY: tl.constexpr, ACC_DT: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // n_blocks).to(tl.int64)
    blk = (pid % n_blocks).to(tl.int64)
    mat_ptr += b * mat_bs
    x_ptr += b * x_bs
    y_ptr += b * y_bs
    ir = _as(inv_reg, ACC_DT)
    if AXIS == 0:   # own BO = BI rows, stream the columns in tiles of BL = BJ
        L = n
        K = m
    else:           # own BO = BJ columns, stream the rows in tiles of BL = BI
        L = m
        K = n
    offs_o = blk * BO + tl.arange(0, BO)
    mask_o = offs_o < L
    run_max = tl.full((BO,), float("-inf"), ACC_DT)
    run_sum = tl.zeros((BO,), ACC_DT)
    for k0 in range(0, K, BL):
        offs_k = k0 + tl.arange(0, BL).to(tl.int64)
        mask_k = offs_k < K
        o = tl.load(other_ptr + b * K + offs_k, mask=mask_k, other=float("-inf")).to(ACC_DT)
        if AXIS == 0:
            c = _cost(mat_ptr, ld, x_ptr, y_ptr, offs_o, offs_k, mask_o, mask_k, kind, p, D,
                      BI, BJ, BD, IS_POINTS, ACC_DT)
            z = tl.where(mask_k[None, :], (o[None, :] - c) * ir, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(z, axis=1))
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            tile = tl.sum(tl.exp(z - safe[:, None]), axis=1)
        else:
            c = _cost(mat_ptr, ld, x_ptr, y_ptr, offs_k, offs_o, mask_k, mask_o, kind, p, D,
                      BI, BJ, BD, IS_POINTS, ACC_DT)
            z = tl.where(mask_k[:, None], (o[:, None] - c) * ir, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(z, axis=0))
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            tile = tl.sum(tl.exp(z - safe[None, :]), axis=0)
        run_sum = run_sum * tl.exp(run_max - safe) + tile
        run_max = new_max
    # s = LSE (-inf for an empty set or an all -inf row)
    s = tl.where(run_max == float("-inf"), float("-inf"), run_max + tl.log(run_sum))
    w = tl.load(w_ptr + b * L + offs_o, mask=mask_o, other=0.0).to(ACC_DT)
    logw = tl.log(tl.maximum(w, TINY))   # the reference's clamp (a subnormal weight is read as TINY)
    new = tl.where(w > 0, _as(reg, ACC_DT) * (logw - s), float("-inf"))
    if has_err:
        pot = tl.load(pot_ptr + b * L + offs_o, mask=mask_o, other=0.0).to(ACC_DT)
        marg = tl.exp(pot * ir + s)
        # 0 * (-inf): a -inf potential against s = +inf is an empty row, not NaN
        marg = tl.where((marg != marg) & ~(pot > float("-inf")), 0.0, marg)
        d = tl.where(mask_o, marg - w, 0.0)
        if err_norm == 0:
            e = tl.max(tl.abs(d), axis=0)
        elif err_norm == 2:
            e = tl.sum(d * d, axis=0)
        else:
            e = tl.sum(tl.abs(d), axis=0)
        tl.store(part_ptr + pid, e)
    tl.store(out_ptr + b * L + offs_o, new.to(out_ptr.dtype.element_ty), mask=mask_o)


# ----------------------------------------------------------------------------------------------------
# Marginals, plan
# ----------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["kind", "want_r", "want_c", "has_wr", "has_wc"])
def _marginals_kernel(mat_ptr, x_ptr, y_ptr, f_ptr, g_ptr, wr_ptr, wc_ptr, r_ptr, c_ptr, part_ptr,
                      n, m, D, ld, mat_bs, x_bs, y_bs, n_blocks, kind, want_r, want_c, has_wr, has_wc,
                      p: tl.float64, inv_reg: tl.float64,
                      BI: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr, IS_POINTS: tl.constexpr,
                      ACC_DT: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // n_blocks).to(tl.int64)
    blk = (pid % n_blocks).to(tl.int64)
    mat_ptr += b * mat_bs
    x_ptr += b * x_bs
    y_ptr += b * y_bs
    ir = _as(inv_reg, ACC_DT)
    offs_i = blk * BI + tl.arange(0, BI)
    mask_i = offs_i < n
    f = tl.load(f_ptr + b * n + offs_i, mask=mask_i, other=float("-inf")).to(ACC_DT)
    if has_wr:
        wr = tl.load(wr_ptr + b * n + offs_i, mask=mask_i, other=0.0).to(ACC_DT)
    else:
        wr = tl.full((BI,), 1.0, ACC_DT)
    r = tl.zeros((BI,), ACC_DT)
    tot = tl.zeros((BI,), ACC_DT)
    for j0 in range(0, m, BJ):
        offs_j = j0 + tl.arange(0, BJ).to(tl.int64)
        mask_j = offs_j < m
        g = tl.load(g_ptr + b * m + offs_j, mask=mask_j, other=float("-inf")).to(ACC_DT)
        c = _cost(mat_ptr, ld, x_ptr, y_ptr, offs_i, offs_j, mask_i, mask_j, kind, p, D,
                  BI, BJ, BD, IS_POINTS, ACC_DT)
        mask = mask_i[:, None] & mask_j[None, :]
        P = tl.where(mask, tl.exp((f[:, None] + g[None, :] - c) * ir), 0.0)
        tot += tl.sum(P, axis=1)
        if want_r:
            if has_wc:
                wc = tl.load(wc_ptr + b * m + offs_j, mask=mask_j, other=0.0).to(ACC_DT)
                r += tl.sum(P * wc[None, :], axis=1)
            else:
                r += tl.sum(P, axis=1)
        if want_c:
            cs = tl.sum(tl.where(mask, P * wr[:, None], 0.0), axis=0)
            tl.atomic_add(c_ptr + b * m + offs_j, cs.to(c_ptr.dtype.element_ty), mask=mask_j, sem="relaxed")
    if want_r:
        tl.store(r_ptr + b * n + offs_i, r.to(r_ptr.dtype.element_ty), mask=mask_i)
    tl.store(part_ptr + pid, tl.sum(tot, axis=0))


@triton.jit(do_not_specialize=["kind"])
def _plan_kernel(mat_ptr, x_ptr, y_ptr, f_ptr, g_ptr, P_ptr, n, m, D, ld, mat_bs, x_bs, y_bs, n_it, n_jt,
                 kind, p: tl.float64, inv_reg: tl.float64,
                 BI: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr, IS_POINTS: tl.constexpr,
                 ACC_DT: tl.constexpr):
    pid = tl.program_id(0)
    per = n_it * n_jt
    b = (pid // per).to(tl.int64)
    t = pid % per
    offs_i = (t // n_jt).to(tl.int64) * BI + tl.arange(0, BI)
    offs_j = (t % n_jt).to(tl.int64) * BJ + tl.arange(0, BJ)
    mask_i = offs_i < n
    mask_j = offs_j < m
    f = tl.load(f_ptr + b * n + offs_i, mask=mask_i, other=0.0).to(ACC_DT)
    g = tl.load(g_ptr + b * m + offs_j, mask=mask_j, other=0.0).to(ACC_DT)
    c = _cost(mat_ptr + b * mat_bs, ld, x_ptr + b * x_bs, y_ptr + b * y_bs, offs_i, offs_j, mask_i, mask_j,
              kind, p, D, BI, BJ, BD, IS_POINTS, ACC_DT)
    P = tl.exp((f[:, None] + g[None, :] - c) * _as(inv_reg, ACC_DT))
    tl.store(P_ptr + (b * n + offs_i[:, None]) * m + offs_j[None, :], P.to(P_ptr.dtype.element_ty),
             mask=mask_i[:, None] & mask_j[None, :])


# ----------------------------------------------------------------------------------------------------
# Sparsify: exact per-row top-k by radix select
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _key_bits(g, c, mask, IDT: tl.constexpr, NBITS: tl.constexpr):
    """(signed-order, unsigned-order) integer views of key = g - C: NaN -> -inf, -0 -> +0; the signed view
    orders like the float, the unsigned one (sign bit flipped) like the float as unsigned bits."""
    key = g[None, :] - c
    key = tl.where(key != key, float("-inf"), key)
    key = tl.where(key == 0, 0.0, key)
    key = tl.where(mask, key, float("-inf"))
    bits = key.to(IDT, bitcast=True)
    maxpos = tl.full((), (1 << (NBITS - 1)) - 1, IDT)
    s = tl.where(bits >= 0, bits, bits ^ maxpos)
    u = s ^ ~maxpos
    return s, u


@triton.jit(do_not_specialize=["kind"])
def _sparsify_kernel(mat_ptr, x_ptr, y_ptr, f_ptr, g_ptr, cols_ptr, vals_ptr,
                     n, m, k, D, ld, mat_bs, x_bs, y_bs, n_blocks, kind, p: tl.float64, inv_reg: tl.float64,
                     BI: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr, IS_POINTS: tl.constexpr,
                     ACC_DT: tl.constexpr, IDT: tl.constexpr, NBITS: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // n_blocks).to(tl.int64)
    blk = (pid % n_blocks).to(tl.int64)
    mat_ptr += b * mat_bs
    x_ptr += b * x_bs
    y_ptr += b * y_bs
    offs_i = blk * BI + tl.arange(0, BI)
    mask_i = offs_i < n
    q = tl.arange(0, 16)
    prefix = tl.zeros((BI,), IDT)            # the bits of T (unsigned order) found so far
    need = tl.zeros((BI,), tl.int32) + k     # entries still to take among those matching the prefix
    for ps in tl.static_range(NBITS // 4):
        SH = NBITS - 4 * (ps + 1)   # constexpr: the digit's lowest bit
        cnt = tl.zeros((BI, 16), tl.int32)   # cnt[i, q] = #{matching j: next digit >= q}
        for j0 in range(0, m, BJ):
            offs_j = j0 + tl.arange(0, BJ).to(tl.int64)
            mask_j = offs_j < m
            mask = mask_i[:, None] & mask_j[None, :]
            g = tl.load(g_ptr + b * m + offs_j, mask=mask_j, other=0.0).to(ACC_DT)
            c = _cost(mat_ptr, ld, x_ptr, y_ptr, offs_i, offs_j, mask_i, mask_j, kind, p, D,
                      BI, BJ, BD, IS_POINTS, ACC_DT)
            s, u = _key_bits(g, c, mask, IDT, NBITS)
            if ps == 0:
                match = mask
            else:
                # the bits above SH + 4 equal the prefix's (an arithmetic shift of a nonzero xor is nonzero)
                match = mask & (((u ^ prefix[:, None]) >> (SH + 4)) == 0)
            digit = ((u >> SH) & 15).to(tl.int32)
            hit = match[:, :, None] & (digit[:, :, None] >= q[None, None, :])
            cnt += tl.sum(hit.to(tl.int32), axis=1)
        # the largest digit d with cnt[d] >= need (cnt[0] = #matching >= need keeps d >= 0)
        dstar = tl.sum((cnt >= need[:, None]).to(tl.int32), axis=1) - 1
        above = tl.sum(tl.where(q[None, :] == dstar[:, None] + 1, cnt, 0), axis=1)
        need -= above
        prefix = prefix | (dstar.to(IDT) << SH)
    # prefix is T, the k-th largest key (unsigned order); take key > T and the first `need` ties
    t_s = prefix ^ ~tl.full((), (1 << (NBITS - 1)) - 1, IDT)
    taken = tl.zeros((BI,), tl.int32)
    ties = tl.zeros((BI,), tl.int32)
    f = tl.load(f_ptr + b * n + offs_i, mask=mask_i, other=0.0).to(ACC_DT)
    ir = _as(inv_reg, ACC_DT)
    row = (b * n + offs_i) * k
    for j0 in range(0, m, BJ):
        offs_j = j0 + tl.arange(0, BJ).to(tl.int64)
        mask_j = offs_j < m
        mask = mask_i[:, None] & mask_j[None, :]
        g = tl.load(g_ptr + b * m + offs_j, mask=mask_j, other=0.0).to(ACC_DT)
        c = _cost(mat_ptr, ld, x_ptr, y_ptr, offs_i, offs_j, mask_i, mask_j, kind, p, D,
                  BI, BJ, BD, IS_POINTS, ACC_DT)
        s, u = _key_bits(g, c, mask, IDT, NBITS)
        gt = mask & (s > t_s[:, None])
        eq = (mask & (s == t_s[:, None])).to(tl.int32)
        tie_rank = ties[:, None] + tl.cumsum(eq, axis=1) - eq
        take = (gt | ((eq != 0) & (tie_rank < need[:, None]))).to(tl.int32)
        pos = taken[:, None] + tl.cumsum(take, axis=1) - take
        P = tl.exp((f[:, None] + g[None, :] - c) * ir)
        dst = row[:, None] + pos
        tl.store(cols_ptr + dst, (offs_j[None, :] + 0 * pos).to(tl.int32), mask=take != 0)
        tl.store(vals_ptr + dst, P.to(vals_ptr.dtype.element_ty), mask=take != 0)
        taken += tl.sum(take, axis=1)
        ties += tl.sum(eq, axis=1)


# ----------------------------------------------------------------------------------------------------
# Hessian-vector product and conjugate gradient
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _direction(p_ptr, res_ptr, dg_ptr, off, mask, beta, ACC_DT: tl.constexpr):
    # CG: p = s + beta p with s = res / diag, stored back; returns p
    pv = tl.load(p_ptr + off, mask=mask, other=0.0).to(ACC_DT)
    rv = tl.load(res_ptr + off, mask=mask, other=0.0).to(ACC_DT)
    dv = tl.load(dg_ptr + off, mask=mask, other=1.0).to(ACC_DT)
    pv = rv / dv + beta * pv
    tl.store(p_ptr + off, pv.to(p_ptr.dtype.element_ty), mask=mask)
    return pv


@triton.jit
def _hvp_cols_kernel(c_ptr, vy_ptr, yy_ptr, resy_ptr, dgy_ptr, act_ptr, beta_ptr, pq_ptr,
                     m, vy_bs, n_blocks, shift: tl.float64,
                     BC: tl.constexpr, CG: tl.constexpr, ACC_DT: tl.constexpr):
    # yy = c vy + shift vy (the S^T vx part is added by _hvp_rows_kernel)
    pid = tl.program_id(0)
    b = (pid // n_blocks).to(tl.int64)
    offs = (pid % n_blocks).to(tl.int64) * BC + tl.arange(0, BC)
    mask = offs < m
    sh = _as(shift, ACC_DT)
    cv = tl.load(c_ptr + b * m + offs, mask=mask, other=0.0).to(ACC_DT)
    if CG:
        if tl.load(act_ptr + b) != 0:
            v = _direction(vy_ptr, resy_ptr, dgy_ptr, b * vy_bs + offs, mask, tl.load(beta_ptr + b), ACC_DT)
            y = cv * v + sh * v
            tl.store(yy_ptr + b * vy_bs + offs, y.to(yy_ptr.dtype.element_ty), mask=mask)
            tl.atomic_add(pq_ptr + b, tl.sum(tl.where(mask, v * y, 0.0), axis=0), sem="relaxed")
    else:
        v = tl.load(vy_ptr + b * vy_bs + offs, mask=mask, other=0.0).to(ACC_DT)
        y = cv * v + sh * v
        tl.store(yy_ptr + b * vy_bs + offs, y.to(yy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _hvp_rows_body(cols_ptr, vals_ptr, r_ptr, vx_ptr, vy_ptr, yx_ptr, yy_ptr, pq_ptr, b, offs, mask, v,
                   n, m, k, vx_bs, vy_bs, sh, BR: tl.constexpr, BK: tl.constexpr, CG: tl.constexpr,
                   ACC_DT: tl.constexpr):
    acc = tl.zeros((BR,), ACC_DT)
    row = (b * n + offs) * k
    for k0 in range(0, k, BK):
        offs_k = k0 + tl.arange(0, BK)
        mk = mask[:, None] & (offs_k < k)[None, :]
        cj = tl.load(cols_ptr + row[:, None] + offs_k[None, :], mask=mk, other=0).to(tl.int64)
        sv = tl.load(vals_ptr + row[:, None] + offs_k[None, :], mask=mk, other=0.0).to(ACC_DT)
        gy = tl.load(vy_ptr + b * vy_bs + cj, mask=mk, other=0.0).to(ACC_DT)
        acc += tl.sum(sv * gy, axis=1)
        tl.atomic_add(yy_ptr + b * vy_bs + cj, (sv * v[:, None]).to(yy_ptr.dtype.element_ty), mask=mk,
                      sem="relaxed")
    rv = tl.load(r_ptr + b * n + offs, mask=mask, other=0.0).to(ACC_DT)
    y = rv * v + acc + sh * v
    tl.store(yx_ptr + b * vx_bs + offs, y.to(yx_ptr.dtype.element_ty), mask=mask)
    if CG:   # <px, qx> + <px, S py> (= <py, S^T px>)
        tl.atomic_add(pq_ptr + b, tl.sum(tl.where(mask, v * (y + acc), 0.0), axis=0), sem="relaxed")


@triton.jit
def _hvp_rows_kernel(cols_ptr, vals_ptr, r_ptr, vx_ptr, vy_ptr, yx_ptr, yy_ptr, resx_ptr, dgx_ptr, act_ptr,
                     beta_ptr, pq_ptr, n, m, k, vx_bs, vy_bs, n_blocks, shift: tl.float64,
                     BR: tl.constexpr, BK: tl.constexpr, CG: tl.constexpr, ACC_DT: tl.constexpr):
    # yx = r vx + S vy + shift vx, and yy += S^T vx (atomics); vx / yx and vy / yy share their strides
    pid = tl.program_id(0)
    b = (pid // n_blocks).to(tl.int64)
    offs = (pid % n_blocks).to(tl.int64) * BR + tl.arange(0, BR)
    mask = offs < n
    sh = _as(shift, ACC_DT)
    if CG:
        if tl.load(act_ptr + b) != 0:
            v = _direction(vx_ptr, resx_ptr, dgx_ptr, b * vx_bs + offs, mask, tl.load(beta_ptr + b), ACC_DT)
            _hvp_rows_body(cols_ptr, vals_ptr, r_ptr, vx_ptr, vy_ptr, yx_ptr, yy_ptr, pq_ptr, b, offs, mask, v,
                           n, m, k, vx_bs, vy_bs, sh, BR, BK, CG, ACC_DT)
    else:
        v = tl.load(vx_ptr + b * vx_bs + offs, mask=mask, other=0.0).to(ACC_DT)
        _hvp_rows_body(cols_ptr, vals_ptr, r_ptr, vx_ptr, vy_ptr, yx_ptr, yy_ptr, pq_ptr, b, offs, mask, v,
                       n, m, k, vx_bs, vy_bs, sh, BR, BK, CG, ACC_DT)


@triton.jit
def _cg_update_kernel(z_ptr, res_ptr, p_ptr, q_ptr, dg_ptr, act_ptr, rz_ptr, pq_ptr, rn2_ptr, rzn_ptr,
                      N, n_blocks, BN: tl.constexpr, ACC_DT: tl.constexpr):
    # over the concatenated (x | y) vectors of length N = n + m: z += alpha p, res -= alpha q
    pid = tl.program_id(0)
    b = (pid // n_blocks).to(tl.int64)
    offs = b * N + (pid % n_blocks).to(tl.int64) * BN + tl.arange(0, BN)
    mask = offs < (b + 1) * N
    pq = tl.load(pq_ptr + b)
    if (tl.load(act_ptr + b) != 0) & (pq > 0):
        alpha = tl.load(rz_ptr + b) / pq
        pv = tl.load(p_ptr + offs, mask=mask, other=0.0).to(ACC_DT)
        qv = tl.load(q_ptr + offs, mask=mask, other=0.0).to(ACC_DT)
        zv = tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC_DT)
        rv = tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC_DT)
        dv = tl.load(dg_ptr + offs, mask=mask, other=1.0).to(ACC_DT)
        zv += alpha * pv
        rv = rv - alpha * qv
        tl.store(z_ptr + offs, zv.to(z_ptr.dtype.element_ty), mask=mask)
        tl.store(res_ptr + offs, rv.to(res_ptr.dtype.element_ty), mask=mask)
        tl.atomic_add(rn2_ptr + b, tl.sum(tl.where(mask, rv * rv, 0.0), axis=0), sem="relaxed")
        tl.atomic_add(rzn_ptr + b, tl.sum(tl.where(mask, rv * (rv / dv), 0.0), axis=0), sem="relaxed")


@triton.jit
def _cg_scalar_kernel(act_ptr, iters_ptr, rz_ptr, pq_ptr, rn2_ptr, rzn_ptr, beta_ptr, rn_ptr, thr_ptr,
                      B, max_iter, BB: tl.constexpr, ACC_DT: tl.constexpr):
    # per problem, after an update: the iteration count, beta, the stopping test; accumulators reset
    offs = tl.program_id(0) * BB + tl.arange(0, BB)
    mask = offs < B
    act = tl.load(act_ptr + offs, mask=mask, other=0)
    pq = tl.load(pq_ptr + offs, mask=mask, other=0.0)
    ok = (act != 0) & (pq > 0)
    it = tl.load(iters_ptr + offs, mask=mask, other=0) + ok.to(tl.int32)
    rn = _sqrt(tl.load(rn2_ptr + offs, mask=mask, other=0.0), ACC_DT)
    rzn = tl.load(rzn_ptr + offs, mask=mask, other=0.0)
    rz = tl.load(rz_ptr + offs, mask=mask, other=1.0)
    go = ok & (rn > tl.load(thr_ptr + offs, mask=mask, other=0.0)) & (it < max_iter)
    tl.store(iters_ptr + offs, it, mask=mask)
    tl.store(act_ptr + offs, go.to(tl.int32), mask=mask)
    tl.store(rn_ptr + offs, rn, mask=mask & ok)
    tl.store(beta_ptr + offs, rzn / rz, mask=mask & ok)
    tl.store(rz_ptr + offs, rzn, mask=mask & ok)
    zero = tl.zeros((BB,), pq.dtype)
    tl.store(pq_ptr + offs, zero, mask=mask)
    tl.store(rn2_ptr + offs, zero, mask=mask)
    tl.store(rzn_ptr + offs, zero, mask=mask)


# ----------------------------------------------------------------------------------------------------
# Gradient with respect to the points
# ----------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["kind", "has_scale", "has_u", "has_v"])
def _points_grad_kernel(x_ptr, y_ptr, f_ptr, g_ptr, scale_ptr, u_ptr, v_ptr, dx_ptr, dy_ptr,
                        n, m, D, x_bs, y_bs, n_blocks, kind, has_scale, has_u, has_v,
                        p: tl.float64, inv_reg: tl.float64,
                        BI: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr, ACC_DT: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // n_blocks).to(tl.int64)
    blk = (pid % n_blocks).to(tl.int64)
    x_ptr += b * x_bs
    y_ptr += b * y_bs
    ir = _as(inv_reg, ACC_DT)
    pp = _as(p, ACC_DT)
    offs_i = blk * BI + tl.arange(0, BI)
    mask_i = offs_i < n
    f = tl.load(f_ptr + b * n + offs_i, mask=mask_i, other=float("-inf")).to(ACC_DT)
    wi = tl.zeros((BI,), ACC_DT)
    if has_scale:
        wi += tl.load(scale_ptr + b).to(ACC_DT)
    else:
        wi += 1.0
    if has_u:
        wi += tl.load(u_ptr + b * n + offs_i, mask=mask_i, other=0.0).to(ACC_DT)
    for j0 in range(0, m, BJ):
        offs_j = j0 + tl.arange(0, BJ).to(tl.int64)
        mask_j = offs_j < m
        mask = mask_i[:, None] & mask_j[None, :]
        g = tl.load(g_ptr + b * m + offs_j, mask=mask_j, other=float("-inf")).to(ACC_DT)
        raw = _raw_cost(x_ptr, 0, x_ptr, y_ptr, offs_i, offs_j, mask_i, mask_j, kind, p, D,
                        BI, BJ, BD, True, ACC_DT)
        c = _finish_cost(raw, kind, p, ACC_DT)
        P = tl.where(mask, tl.exp((f[:, None] + g[None, :] - c) * ir), 0.0)
        if has_v:
            vj = tl.load(v_ptr + b * m + offs_j, mask=mask_j, other=0.0).to(ACC_DT)
            W = P * (wi[:, None] + vj[None, :])
        else:
            W = P * wi[:, None]
        W = tl.where(mask, W, 0.0)
        # kinds 1 / 2: dC/dx = factor_ij (x_i - y_j); kind 3 elementwise below
        if kind == 2:
            if p == 2.0:
                fac = tl.full((BI, BJ), 2.0, ACC_DT)
            else:
                fac = tl.where(raw > 0, pp * tl.exp((0.5 * pp - 1.0) * tl.log(raw)), 0.0)
        else:
            fac = tl.full((BI, BJ), 2.0, ACC_DT)
        Wf = W * fac
        for d0 in range(0, D, BD):
            offs_d = d0 + tl.arange(0, BD)
            mask_d = offs_d < D
            xt = tl.load(x_ptr + offs_i[:, None] * D + offs_d[None, :], mask=mask_i[:, None] & mask_d[None, :],
                         other=0.0).to(ACC_DT)
            yt = tl.load(y_ptr + offs_j[:, None] * D + offs_d[None, :], mask=mask_j[:, None] & mask_d[None, :],
                         other=0.0).to(ACC_DT)
            diff = xt[:, None, :] - yt[None, :, :]
            if kind == 3:
                ad = tl.abs(diff)
                if p == 1.0:
                    gt = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0)).to(ACC_DT)
                elif p == 2.0:
                    gt = 2.0 * diff
                else:
                    mag = tl.where(ad > 0, pp * tl.exp((pp - 1.0) * tl.log(ad)), 0.0)
                    gt = tl.where(diff > 0, mag, -mag)
                t = W[:, :, None] * gt
            else:
                t = Wf[:, :, None] * diff
            tl.atomic_add(dx_ptr + (b * n + offs_i[:, None]) * D + offs_d[None, :],
                          tl.sum(t, axis=1).to(dx_ptr.dtype.element_ty),
                          mask=mask_i[:, None] & mask_d[None, :], sem="relaxed")
            tl.atomic_add(dy_ptr + (b * m + offs_j[:, None]) * D + offs_d[None, :],
                          (-tl.sum(t, axis=0)).to(dy_ptr.dtype.element_ty),
                          mask=mask_j[:, None] & mask_d[None, :], sem="relaxed")


# ----------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------
def _acc(dtype: torch.dtype):
    if dtype == torch.float64:
        return tl.float64
    if dtype == torch.float32:
        return tl.float32
    raise TypeError(f"ot triton kernels: dtype must be float32 or float64, got {dtype}")


def _tiny(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny


def _bd(D: int) -> int:
    # coordinates per chunk: 2 for D <= 2 (the plane), else 4 (chunks looped for larger D)
    return 2 if D <= 2 else 4


# Tiles (BI, BJ, num_warps) by kernel and cost input; a point tile is (BI, BJ, BD) in registers, so its
# (BI, BJ) is smaller than the matrix one.  Sinkhorn axis 0 owns BI rows, axis 1 owns BJ columns; the
# owned side is small so that moderate n, m still give enough programs.  Sizes checked with
# tests/triton_aot.py (Triton 3.9, sm_80 / sm_90): larger point tiles spilled in fp64 ((64, 32) on axis 1,
# (16, 32) for the gradient, (8, 32) in the select passes of sparsify).
_SINK_CFG = {(0, False): (16, 128, 4), (0, True): (16, 64, 4), (1, False): (128, 32, 4), (1, True): (32, 32, 4)}
_MARG_CFG = {False: (32, 64, 4), True: (16, 64, 4)}
_PLAN_CFG = {False: (32, 64, 4), True: (32, 32, 4)}
_SPARSE_CFG = {False: (8, 32, 4), True: (8, 16, 4)}   # x 16 digit counters in the select passes
_GRAD_CFG = (16, 16, 4)
_HVP_ROWS = (32, 32, 4)    # (BR rows, BK entries a chunk, warps)
_HVP_COLS = (256, 4)
_CG_UPDATE = (256, 4)
_CG_SCALAR = 128


def _device_ctx(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _grid1(*counts) -> tuple:
    g = 1
    for c in counts:
        g *= int(c)
    assert g <= _PROGRAMS_MAX, "ot: too many programs for one launch"
    return (g,)


class _CostArgs:
    """Pointer / size / stride arguments of a cost; the unused pointers are dummies never read."""

    def __init__(self, kind: int, p: float, matrix, x, y, dtype: torch.dtype):
        assert kind in (MATRIX, SQEUCLIDEAN, EUCLIDEAN_POW, MINKOWSKI_POW), f"ot: unknown cost kind {kind}"
        self.kind, self.p = int(kind), float(p)
        self.points = kind != MATRIX
        if self.points:
            assert x is not None and y is not None and x.dim() == 3 and y.dim() == 3, "ot: x, y must be (B, n, D), (B, m, D)"
            assert x.dtype == dtype and y.dtype == dtype, "ot: points must be in the potentials' dtype"
            self.B, self.n, self.D = x.shape
            self.m = y.shape[1]
            assert y.shape[2] == self.D and 1 <= self.D <= MAX_DIM, "ot: x and y need the same D in [1, 1024]"
            x, y = _rows(x), _rows(y)
            self.x, self.y, self.mat = x, y, x
            self.x_bs, self.y_bs, self.ld, self.mat_bs = x.stride(0), y.stride(0), 0, 0
        else:
            assert matrix is not None and matrix.dim() == 3 and matrix.dtype == dtype, "ot: matrix must be (B, n, m)"
            self.B, self.n, self.m = matrix.shape
            if matrix.stride(2) != 1 and self.m > 1:
                matrix = matrix.contiguous()
            self.D = 1
            self.mat, self.x, self.y = matrix, matrix, matrix
            self.ld = matrix.stride(1) if self.n > 1 else max(self.m, 1)
            self.mat_bs = matrix.stride(0) if self.B > 1 else 0
            self.x_bs = self.y_bs = 0

    def ptrs(self):
        return self.mat, self.x, self.y

    def sizes(self):
        return self.D, self.ld, self.mat_bs, self.x_bs, self.y_bs


def _rows(t: torch.Tensor) -> torch.Tensor:
    # rows contiguous (stride(2) == 1, stride(1) == D); the batch stride may be anything (0: shared)
    B, L, D = t.shape
    if (t.stride(2) != 1 and D > 1) or (t.stride(1) != D and L > 1):
        t = t.contiguous()
    return t


def _vec(t, B, L, dtype, what):
    assert t is not None and t.shape == (B, L) and t.dtype == dtype, f"ot: {what} must be ({B}, {L}) {dtype}"
    return t.contiguous()


def _check_reg(reg: float) -> float:
    reg = float(reg)
    assert reg > 0 and reg < float("inf"), "ot: reg must be finite and > 0"
    return reg


# ----------------------------------------------------------------------------------------------------
# Public launchers (plain tensors; kernelkit.ot.ops validates the arguments with messages)
# ----------------------------------------------------------------------------------------------------
def sinkhorn_step(kind, p, matrix, x, y, axis, reg, w, other, pot, err_norm):
    """(pot_new (B, n or m), err (B,) or None): one log-domain half-step on `axis` with the error of the
    plan (pot, other) on that axis before the update (None without pot)."""
    dtype = w.dtype
    cost = _CostArgs(kind, p, matrix, x, y, dtype)
    reg = _check_reg(reg)
    assert axis in (0, 1) and err_norm in (NORM_INF, NORM_L1, NORM_L2), "ot: axis 0 / 1, err_norm 0 / 1 / 2"
    B, n, m = w.shape[0], cost.n, cost.m
    L, K = (n, m) if axis == 0 else (m, n)
    w = _vec(w, B, L, dtype, "w")
    other = _vec(other, B, K, dtype, "other")
    if pot is not None:
        pot = _vec(pot, B, L, dtype, "pot")
    out = torch.empty((B, L), device=w.device, dtype=dtype)
    err = None
    BI, BJ, nw = _SINK_CFG[(axis, cost.points)]
    n_blocks = triton.cdiv(L, BI if axis == 0 else BJ)
    part = torch.empty((B, n_blocks), device=w.device, dtype=dtype) if pot is not None else None
    if B > 0 and L > 0:
        with _device_ctx(w.device):
            _sinkhorn_kernel[_grid1(B, n_blocks)](
                *cost.ptrs(), w, other, pot if pot is not None else w, out, part if part is not None else w,
                n, m, *cost.sizes(), n_blocks, cost.kind, int(pot is not None), int(err_norm),
                cost.p, reg, 1.0 / reg, AXIS=axis, BI=BI, BJ=BJ,
                BO=BI if axis == 0 else BJ, BL=BJ if axis == 0 else BI, BD=_bd(cost.D), IS_POINTS=cost.points,
                TINY=_tiny(dtype), ACC_DT=_acc(dtype), num_warps=nw, num_stages=2)
    if pot is not None:
        if part.shape[1] == 0:
            err = torch.zeros(B, device=w.device, dtype=dtype)
        elif err_norm == NORM_INF:
            err = part.amax(1)
        elif err_norm == NORM_L2:
            err = part.sum(1).sqrt()
        else:
            err = part.sum(1)
    return out, err


def marginals(kind, p, matrix, x, y, reg, f, g, a, b, wr, wc, want_r, want_c, want_obj):
    """(r (B, n) | None, c (B, m) | None, obj (B,) | None); obj needs a and b."""
    dtype = f.dtype
    cost = _CostArgs(kind, p, matrix, x, y, dtype)
    reg = _check_reg(reg)
    B, n, m = f.shape[0], cost.n, cost.m
    f = _vec(f, B, n, dtype, "f")
    g = _vec(g, B, m, dtype, "g")
    wr = None if wr is None else _vec(wr, B, n, dtype, "wr")
    wc = None if wc is None else _vec(wc, B, m, dtype, "wc")
    dev = f.device
    r = torch.empty((B, n), device=dev, dtype=dtype) if want_r else None
    c = torch.zeros((B, m), device=dev, dtype=dtype) if want_c else None
    BI, BJ, nw = _MARG_CFG[cost.points]
    n_blocks = triton.cdiv(n, BI)
    part = torch.empty((B, n_blocks), device=dev, dtype=dtype)
    if B > 0 and n > 0 and (want_r or want_c or want_obj):
        if m == 0 and r is not None:
            r.zero_()
        else:
            with _device_ctx(dev):
                _marginals_kernel[_grid1(B, n_blocks)](
                    *cost.ptrs(), f, g, wr if wr is not None else f, wc if wc is not None else g,
                    r if r is not None else f, c if c is not None else g, part, n, m, *cost.sizes(), n_blocks,
                    cost.kind, int(bool(want_r)), int(bool(want_c)), int(wr is not None), int(wc is not None),
                    cost.p, 1.0 / reg, BI=BI, BJ=BJ, BD=_bd(cost.D), IS_POINTS=cost.points, ACC_DT=_acc(dtype),
                    num_warps=nw, num_stages=2)
    obj = None
    if want_obj:
        assert a is not None and b is not None, "ot: the objective needs a and b"
        a = _vec(a, B, n, dtype, "a")
        b = _vec(b, B, m, dtype, "b")
        total = part.sum(1) if m > 0 else torch.zeros(B, device=dev, dtype=dtype)
        dot = (torch.where(a == 0, torch.zeros_like(f), a * f).sum(1)
               + torch.where(b == 0, torch.zeros_like(g), b * g).sum(1))
        obj = dot - reg * total
    return r, c, obj


def plan(kind, p, matrix, x, y, reg, f, g):
    """P (B, n, m), contiguous."""
    dtype = f.dtype
    cost = _CostArgs(kind, p, matrix, x, y, dtype)
    reg = _check_reg(reg)
    B, n, m = f.shape[0], cost.n, cost.m
    f = _vec(f, B, n, dtype, "f")
    g = _vec(g, B, m, dtype, "g")
    P = torch.empty((B, n, m), device=f.device, dtype=dtype)
    if P.numel() == 0:
        return P
    BI, BJ, nw = _PLAN_CFG[cost.points]
    n_it, n_jt = triton.cdiv(n, BI), triton.cdiv(m, BJ)
    with _device_ctx(f.device):
        _plan_kernel[_grid1(B, n_it, n_jt)](*cost.ptrs(), f, g, P, n, m, *cost.sizes(), n_it, n_jt, cost.kind,
                                            cost.p, 1.0 / reg, BI=BI, BJ=BJ, BD=_bd(cost.D),
                                            IS_POINTS=cost.points, ACC_DT=_acc(dtype), num_warps=nw, num_stages=2)
    return P


def sparsify(kind, p, matrix, x, y, reg, f, g, k):
    """(cols int32 (B, n, k), vals (B, n, k)): per row the k largest keys g_j - C_ij (ties: the smaller
    column; NaN as -inf), in increasing column order, vals = P_ij."""
    dtype = f.dtype
    cost = _CostArgs(kind, p, matrix, x, y, dtype)
    reg = _check_reg(reg)
    B, n, m = f.shape[0], cost.n, cost.m
    k = int(k)
    f = _vec(f, B, n, dtype, "f")
    g = _vec(g, B, m, dtype, "g")
    if B == 0 or n == 0 or m == 0:
        k = max(k, 0)
        return (torch.empty((B, n, k), device=f.device, dtype=torch.int32),
                torch.empty((B, n, k), device=f.device, dtype=dtype))
    assert 1 <= k <= min(m, MAX_KEEP), f"ot: k must be in [1, min(m, {MAX_KEEP})], got {k}"
    cols = torch.empty((B, n, k), device=f.device, dtype=torch.int32)
    vals = torch.empty((B, n, k), device=f.device, dtype=dtype)
    BI, BJ, nw = _SPARSE_CFG[cost.points]
    n_blocks = triton.cdiv(n, BI)
    wide = dtype == torch.float64
    with _device_ctx(f.device):
        _sparsify_kernel[_grid1(B, n_blocks)](
            *cost.ptrs(), f, g, cols, vals, n, m, k, *cost.sizes(), n_blocks, cost.kind, cost.p, 1.0 / reg,
            BI=BI, BJ=BJ, BD=_bd(cost.D), IS_POINTS=cost.points, ACC_DT=_acc(dtype),
            IDT=tl.int64 if wide else tl.int32, NBITS=64 if wide else 32, num_warps=nw, num_stages=2)
    return cols, vals


def _sparse_args(cols, vals, r, c):
    dtype = vals.dtype
    assert cols.dim() == 3 and cols.dtype == torch.int32 and vals.shape == cols.shape, "ot: cols int32 / vals (B, n, k)"
    B, n, k = cols.shape
    m = c.shape[1]
    return (cols.contiguous(), vals.contiguous(), _vec(r, B, n, dtype, "r"), _vec(c, B, m, dtype, "c"),
            B, n, m, k, dtype)


def _hvp_launch(cols, vals, r, c, shift, vx, vy, yx, yy, B, n, m, k, vx_bs, vy_bs, dtype, cg=None):
    """yx, yy = H (vx, vy) (plain), or in CG mode (cg = dict of the state) the direction update, q = H p
    and <p, q>.  vx / yx share the batch stride vx_bs, vy / yy vy_bs."""
    acc = _acc(dtype)
    if cg is None:
        dummy_i = torch.empty(0, device=vals.device, dtype=torch.int32)
        st = dict(resx=vx, resy=vy, dgx=vx, dgy=vy, act=dummy_i, beta=r, pq=r)
    else:
        st = cg
    BC, nwc = _HVP_COLS
    if m > 0:
        nbc = triton.cdiv(m, BC)
        _hvp_cols_kernel[_grid1(B, nbc)](c, vy, yy, st["resy"], st["dgy"], st["act"], st["beta"], st["pq"],
                                         m, vy_bs, nbc, shift, BC=BC, CG=cg is not None, ACC_DT=acc,
                                         num_warps=nwc, num_stages=1)
    BR, BK, nwr = _HVP_ROWS
    if n > 0:
        nbr = triton.cdiv(n, BR)
        _hvp_rows_kernel[_grid1(B, nbr)](cols, vals, r, vx, vy, yx, yy, st["resx"], st["dgx"], st["act"],
                                         st["beta"], st["pq"], n, m, k, vx_bs, vy_bs, nbr, shift,
                                         BR=BR, BK=BK, CG=cg is not None, ACC_DT=acc, num_warps=nwr,
                                         num_stages=2)


def hvp(cols, vals, r, c, shift, vx, vy):
    """(yx (B, n), yy (B, m)) = (r vx + S vy + shift vx, S^T vx + c vy + shift vy); fresh outputs.  The
    column sums use atomics (last bits may vary from run to run)."""
    cols, vals, r, c, B, n, m, k, dtype = _sparse_args(cols, vals, r, c)
    vx = _vec(vx, B, n, dtype, "vx")
    vy = _vec(vy, B, m, dtype, "vy")
    yx = torch.empty((B, n), device=vals.device, dtype=dtype)
    yy = torch.empty((B, m), device=vals.device, dtype=dtype)
    if B == 0 or (n == 0 and m == 0):
        return yx, yy
    if n > 0 and m == 0:
        k = 0
    with _device_ctx(vals.device):
        _hvp_launch(cols, vals, r, c, float(shift), vx, vy, yx, yy, B, n, m, k, n, m, dtype)
    return yx, yy


def cg(cols, vals, r, c, shift, rhs_x, rhs_y, zx, zy, tol, max_iter):
    """Solve H z = rhs per problem by Jacobi-preconditioned CG from the guess (zx, zy) (None: 0), the
    algorithm of reference.cg_reference: (zx, zy, iters int32 (B,), resid (B,)), fresh outputs."""
    cols, vals, r, c, B, n, m, k, dtype = _sparse_args(cols, vals, r, c)
    dev = vals.device
    rhs_x = _vec(rhs_x, B, n, dtype, "rhs_x")
    rhs_y = _vec(rhs_y, B, m, dtype, "rhs_y")
    zx = torch.zeros_like(rhs_x) if zx is None else _vec(zx, B, n, dtype, "zx")
    zy = torch.zeros_like(rhs_y) if zy is None else _vec(zy, B, m, dtype, "zy")
    tol, max_iter, shift = float(tol), int(max_iter), float(shift)
    assert tol > 0 and max_iter >= 0, "ot: cg needs tol > 0 and max_iter >= 0"
    N = n + m
    iters = torch.zeros(B, device=dev, dtype=torch.int32)
    if B == 0 or N == 0:
        return zx.clone(), zy.clone(), iters, torch.zeros(B, device=dev, dtype=dtype)
    if m == 0:
        k = 0
    # state over the concatenated (x | y) vectors, (B, N)
    z = torch.cat([zx, zy], 1)
    rhs = torch.cat([rhs_x, rhs_y], 1)
    dg = torch.cat([r, c], 1) + shift
    dg = torch.where(dg > 0, dg, torch.ones_like(dg))
    h = torch.empty_like(z)
    with _device_ctx(dev):
        _hvp_launch(cols, vals, r, c, shift, z, z[:, n:], h, h[:, n:], B, n, m, k, N, N, dtype)
        res = rhs - h
        bn = rhs.norm(dim=1)
        rn = res.norm(dim=1)
        rz = (res * (res / dg)).sum(1)
        thr = tol * bn
        act = ((bn > 0) & (rn > thr) & (max_iter > 0)).to(torch.int32)
        z = torch.where((bn > 0)[:, None], z, torch.zeros_like(z))
        pvec = torch.zeros_like(z)
        q = torch.empty_like(z)
        beta = torch.zeros(B, device=dev, dtype=dtype)
        pq = torch.zeros(B, device=dev, dtype=dtype)
        rn2n = torch.zeros(B, device=dev, dtype=dtype)
        rzn = torch.zeros(B, device=dev, dtype=dtype)
        st = dict(resx=res, resy=res[:, n:], dgx=dg, dgy=dg[:, n:], act=act, beta=beta, pq=pq)
        BN, nwu = _CG_UPDATE
        nbu = triton.cdiv(N, BN)
        nbs = triton.cdiv(B, _CG_SCALAR)
        done = 0
        while done < max_iter:
            for _ in range(min(CG_CHECK_EVERY, max_iter - done)):
                _hvp_launch(cols, vals, r, c, shift, pvec, pvec[:, n:], q, q[:, n:], B, n, m, k, N, N, dtype, cg=st)
                _cg_update_kernel[_grid1(B, nbu)](z, res, pvec, q, dg, act, rz, pq, rn2n, rzn, N, nbu,
                                                  BN=BN, ACC_DT=_acc(dtype), num_warps=nwu, num_stages=1)
                _cg_scalar_kernel[_grid1(nbs)](act, iters, rz, pq, rn2n, rzn, beta, rn, thr, B, max_iter,
                                               BB=_CG_SCALAR, ACC_DT=_acc(dtype), num_warps=4, num_stages=1)
                done += 1
            if dev.type == "meta" or not bool(act.any()):
                break
    resid = torch.where(bn > 0, rn / torch.where(bn > 0, bn, torch.ones_like(bn)), torch.zeros_like(bn))
    return z[:, :n].contiguous(), z[:, n:].contiguous(), iters, resid


def points_grad(kind, p, x, y, reg, f, g, scale, u, v):
    """(dx (B, n, D), dy (B, m, D)): the gradient of sum_ij W_ij C(x_i, y_j), W = P (scale_b + u_i + v_j)
    held fixed (scale None: 1, u / v None: 0).  Sums with atomics (last bits may vary run to run)."""
    dtype = f.dtype
    assert kind != MATRIX, "ot: points_grad needs a point-cloud cost"
    cost = _CostArgs(kind, p, None, x, y, dtype)
    reg = _check_reg(reg)
    B, n, m, D = f.shape[0], cost.n, cost.m, cost.D
    f = _vec(f, B, n, dtype, "f")
    g = _vec(g, B, m, dtype, "g")
    if scale is not None:
        assert scale.numel() == B and scale.dtype == dtype, f"ot: scale must be ({B},) {dtype}"
        scale = scale.reshape(B).contiguous()
    u = None if u is None else _vec(u, B, n, dtype, "u")
    v = None if v is None else _vec(v, B, m, dtype, "v")
    dx = torch.zeros((B, n, D), device=f.device, dtype=dtype)
    dy = torch.zeros((B, m, D), device=f.device, dtype=dtype)
    if B == 0 or n == 0 or m == 0:
        return dx, dy
    BI, BJ, nw = _GRAD_CFG
    n_blocks = triton.cdiv(n, BI)
    with _device_ctx(f.device):
        _points_grad_kernel[_grid1(B, n_blocks)](
            cost.x, cost.y, f, g, scale if scale is not None else f, u if u is not None else f,
            v if v is not None else g, dx, dy, n, m, D, cost.x_bs, cost.y_bs, n_blocks, cost.kind,
            int(scale is not None), int(u is not None), int(v is not None), cost.p, 1.0 / reg,
            BI=BI, BJ=BJ, BD=_bd(D), ACC_DT=_acc(dtype), num_warps=nw, num_stages=2)
    return dx, dy


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile coverage (tests/triton_aot.py)
# ----------------------------------------------------------------------------------------------------
# The dtypes kernelkit.ot.ops sends to these kernels on a GPU (float64 too: no tensor cores involved).
AOT_DTYPES = (torch.float32, torch.float64)
# Sweep: 1024 x 1024 problems (multiples of 16, so Triton specializes the sizes as for real ones), a dense
# cost shared by a batch of 2 (batch stride 0) and per problem, points in the plane (D = 2, the BD = 2
# tiles) and in D = 3 / 64 (BD = 4, one and several coordinate chunks), every cost kind, both axes.
_AOT_N = 1024
_AOT_DIMS = (2, 3, 64)


def aot_sweep() -> int:
    """Drive every launcher over every dtype and cost input on meta tensors (nothing is allocated or
    run).  tests/triton_aot.py intercepts the kernel launches this makes and compiles each distinct one
    for the GPU targets.  Returns the number of points driven."""
    if _INTERPRET:
        raise RuntimeError("aot_sweep: TRITON_INTERPRET=1 selects the interpreter, not the GPU's compiler")
    meta = dict(device="meta")
    N, B, k = _AOT_N, 2, 64
    points = 0
    for dtype in AOT_DTYPES:
        vec_n = torch.empty(B, N, dtype=dtype, **meta)
        vec_m = torch.empty(B, N, dtype=dtype, **meta)
        costs = [(MATRIX, 0.0, torch.empty(N, N, dtype=dtype, **meta).expand(B, N, N), None, None),
                 (MATRIX, 0.0, torch.empty(B, N, N, dtype=dtype, **meta), None, None)]
        for D in _AOT_DIMS:
            x = torch.empty(B, N, D, dtype=dtype, **meta)
            y = torch.empty(B, N, D, dtype=dtype, **meta)
            costs += [(SQEUCLIDEAN, 0.0, None, x, y), (EUCLIDEAN_POW, 1.0, None, x, y), (MINKOWSKI_POW, 1.5, None, x, y)]
        for kind, p, M, x, y in costs:
            for axis in (0, 1):
                sinkhorn_step(kind, p, M, x, y, axis, 0.1, vec_n, vec_m, vec_n, NORM_L1)
            marginals(kind, p, M, x, y, 0.1, vec_n, vec_m, vec_n, vec_m, None, None, True, True, True)
            plan(kind, p, M, x, y, 0.1, vec_n, vec_m)
            sparsify(kind, p, M, x, y, 0.1, vec_n, vec_m, k)
            if kind != MATRIX:
                points_grad(kind, p, x, y, 0.1, vec_n, vec_m, None, None, None)
            points += 1
        cols = torch.empty(B, N, k, dtype=torch.int32, **meta)
        vals = torch.empty(B, N, k, dtype=dtype, **meta)
        hvp(cols, vals, vec_n, vec_m, 0.0, vec_n, vec_m)
        cg(cols, vals, vec_n, vec_m, 1e-8, vec_n, vec_m, None, None, 1e-10, 100)
        points += 2
    return points


__all__ = ["sinkhorn_step", "marginals", "plan", "sparsify", "hvp", "cg", "points_grad", "aot_sweep"]
