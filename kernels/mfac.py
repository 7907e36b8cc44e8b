"""Triton kernels of M-FAC: matrix-free inverse-Hessian-vector products with the damped empirical Fisher.

Source: Frantar, Kurtic, Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
Information" (NeurIPS 2021); the static E form is oBERT's explicit block inverse (Kurtic et al. 2022).
Math, layouts and dtypes: the C ABI csrc/include/kernelkit/mfac.h; float64 reference:
python/kernelkit/mfac/reference.py.  The launchers below are what kernelkit.mfac.ops calls with
backend="triton" (plain tensors, already validated there).

    F = damp I + (1/m) G^T G,   K = m damp I + G G^T,   F^-1 x = (1/damp) (x - G^T K^-1 G x)

    mfac_dots        q[v, b, i] = sum_{j in block b} G[i, j] x[v, j]                  (nvec, nb, r) f64
    mfac_insert_dots G[row] = round(x); q = G x, qr = G round(x)                      (1, 1, r) f64 each
    mfac_combine     out[v, j] = alpha x[v, j] + sum_i c[v, b(j), i] G[i, j]          (nvec, d)
    mfac_diag        out[j] = alpha + beta sum_i Z[i, j]^2                            (d,)
    mfac_static_setup  Z (r, d): per block, W form Z_b = L_b^-1 G_b (L_b L_b^T = m damp I + G_b G_b^T)
                     or E form Z_b = L_b^-1 (L_b L_b^T = m damp I + G_b^T G_b)
    mfac_window_rebuild  kinv = (m damp I + gram)^-1 = L^-T L^-1                        (m, m) f64
    mfac_window_update   gram row / column `row` = newcol; kinv by bordering (or a rebuild)
    mfac_window_coef     c[v] = scale kinv q[v]                                        (nvec, m) f64

Buffers G / Z: (rows, d) float32, bfloat16 or float64 with unit inner stride and row stride ld >= d;
vectors x / out float32 (float64 with a float64 buffer) with unit inner stride; q, c, gram, kinv float64.

Kernels (1-D grids; every offset that scales with a row stride or a product of sizes is int64):
    _dots_kernel     a program owns a tile of BR rows x one column chunk (<= 4096 columns, inside one
        block) x a group of NV vectors; products accumulate in the buffer's accumulation dtype (float32
        for float32 / bfloat16, so each partial sum has at most 4096 terms, as mfac.h asks; float64
        for float64) and are added into a zeroed float64 q with tl.atomic_add (last bits may vary from
        run to run).  The insertion variant also sums with round(x) for qr (bfloat16 only: for float32
        / float64, round(x) = x and qr is q).  The row write happens in a launch of its own before it
        (_write_row_kernel), so every program of the dots pass sees the new row.
    _combine_kernel  a program owns BD columns of one block and NV vectors, loops over all rows with c
        loaded per row tile; float32 partial sums over at most 4096 rows are combined in float64, alpha x
        is added in float64, and out is rounded once.
    _diag_kernel     columns tiles, loop over rows, float64 sums of squares.
    Static setup and window rebuild, all float64 (one launch each for a group of blocks):
    _gram_kernel     lower (T, T) tiles of A A^T, A = a block of G (W form: G_b, E form: G_b^T) or, for
        the rebuild, L^-T (kinv = L^-T L^-1 is the Gram matrix of L^-1's columns); the contraction is
        split in chunks of GRAM_KCHUNK added with tl.atomic_add (static) or done whole and stored in
        both triangles (rebuild).  Rows past a short last block are zero (the shift makes them m damp I,
        so the factor is block diagonal and Z's rows w_b..r-1 come out zero, as mfac.h specifies).
    _chol_kernel     one program per matrix: lower triangle + shift copied, then a right-looking
        column-by-column Cholesky in place (scale column k, rank-1 update of the trailing lower
        triangle) with tl.debug_barrier between the steps (the threads of the program exchange the
        matrix through global memory).  A pivot that is not positive and finite sets a flag that the
        launcher reads (ValueError, as the CPU library's KK_ERR_INVALID_ARGUMENT).
    _trinv_kernel    L^-1 by forward substitution on the identity: programs over column tiles, a loop
        over rows, each row from the rows above it (a barrier between rows); the E form also writes the
        rounded rows into Z.
    _apply_kernel    W form: Z_b = L_b^-1 G_b, a (BI, BD) tile by rank-1 updates over k <= the tile's
        last row (L^-1 is lower triangular).
    Window update (O(m^2), all float64), bordering (Schur complements) as mfac.h specifies: with p = row,
    a = kinv[p, :] (= column p, kinv symmetric), bz = newcol with bz_p = 0, c = newcol[p] + m damp, the
    matrix P without row and column p is unchanged and
        P^-1 = kinv_{-p,-p} - a a^T / a_p,   w = P^-1 bz = kinv bz - a (a . bz) / a_p  (w_p = 0),
        s = c - bz . w,   kinv'_{-p,-p} = P^-1 + w w^T / s,   kinv'_{-p,p} = -w / s,   kinv'_{pp} = 1 / s.
    Every term is bounded by ||kinv|| or ||kinv'|| (a rank-2 Woodbury step instead has terms that grow
    with the replaced gradient).  _border_prep_kernel computes w and a (each program its rows of
    kinv bz, plus a . bz over row p), and adds bz . w, sum |bz_i w_i| and the count of non-finite newcol
    entries into three float64 sums (atomics); the launcher reads them with a_p and newcol[p] (one
    small device-to-host copy) and either raises (non-finite newcol, nothing changed), or applies
    _border_kernel, or, when a_p or s is not positive and finite or s is lost to cancellation
    (s <= UPDATE_CANCEL (|c| + sum |bz_i w_i|)), rebuilds kinv from the new gram.
    _set_rowcol_kernel writes gram's row and column p; _matvec_kernel is window_coef.

Numerics: no tl.dot anywhere (no TF32); scalars (damp, alpha, beta, scale, coefficients) are passed as
float64 and rounded once to the accumulation dtype.  Only pointer arithmetic + masks (no block
pointers), so the same source runs on Triton 3.6 .. 3.9 and under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_PROGRAMS_MAX = 2 ** 31 - 1
# Columns per dots chunk (and rows per combine float32 partial sum): mfac.h's 4096-term bound.
PARTIAL_TERMS = 4096
# Contraction chunk of one static Gram program (float64, so only a parallelism choice).
GRAM_KCHUNK = 2048
# Float64 elements of one static-setup workspace (Gram / Cholesky factor, and L^-1): blocks are
# processed in groups that fit (2 x 128 MiB at most), one launch per kernel per group.
SETUP_WORKSPACE = 1 << 24
# The window update falls back to a rebuild when its Schur complement s <= UPDATE_CANCEL (|c| + sum |bz_i w_i|)
# (mfac.h: 64 float64 epsilons).
UPDATE_CANCEL = 64 * 2.0 ** -52


# ----------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _as(v, DT: tl.constexpr):
    # a float64 scalar argument (a Python float under the interpreter) in dtype DT
    return (tl.zeros((), DT) + v).to(DT)


@triton.jit
def _round_to(v, DT: tl.constexpr):
    # a finite vector-dtype value rounded to the buffer dtype DT, to nearest even; for bfloat16 by hand on
    # the float32 bits (add 0x7fff + the lowest kept bit, drop 16 bits): the interpreter's cast truncates
    if DT == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DT)


# ----------------------------------------------------------------------------------------------------
# Passes over the buffer: dots, insert, combine, diag
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _dots_kernel(g_ptr, x_ptr, q_ptr, qr_ptr, r, d, ldg, ldx, nvec, block, chunk, nchunk, nb, n_rt,
                 BR: tl.constexpr, BD: tl.constexpr, NV: tl.constexpr, WITH_QR: tl.constexpr,
                 ACC_DT: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rt = pid % n_rt                       # row tile fastest: neighbours share the x chunk in L2
    rest = pid // n_rt
    ch = rest % (nb * nchunk)
    vg = rest // (nb * nchunk)
    b = ch // nchunk
    lo = b * block + (ch % nchunk) * chunk
    hi = tl.minimum(tl.minimum(lo + chunk, b * block + block), d)
    rows = rt * BR + tl.arange(0, BR)
    rmask = rows < r
    vecs = vg * NV + tl.arange(0, NV)
    vmask = vecs < nvec
    acc = tl.zeros((NV, BR, BD), ACC_DT)
    accr = tl.zeros((BR, BD), ACC_DT)
    for j0 in range(lo, hi, BD):
        cols = j0 + tl.arange(0, BD)
        cmask = cols < hi
        g = tl.load(g_ptr + rows[:, None] * ldg + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                    other=0.0).to(ACC_DT)
        xv = tl.load(x_ptr + vecs[:, None] * ldx + cols[None, :], mask=vmask[:, None] & cmask[None, :],
                     other=0.0)
        acc += g[None, :, :] * xv.to(ACC_DT)[:, None, :]
        if WITH_QR:   # NV == 1: the new row's Gram column uses x rounded to the buffer dtype
            accr += g * _round_to(xv, g_ptr.dtype.element_ty).to(ACC_DT)
    s = tl.sum(acc, axis=2).to(tl.float64)                                     # (NV, BR)
    qoff = (vecs[:, None] * nb + b) * r + rows[None, :]
    qmask = vmask[:, None] & rmask[None, :]
    tl.atomic_add(q_ptr + qoff, s, mask=qmask, sem="relaxed")
    if WITH_QR:
        sr = tl.sum(accr, axis=1).to(tl.float64)
        tl.atomic_add(qr_ptr + b * r + rows, sr, mask=rmask, sem="relaxed")


@triton.jit(do_not_specialize=["row"])
def _write_row_kernel(g_ptr, x_ptr, row, ldg, d, BD: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BD + tl.arange(0, BD)
    cmask = cols < d
    xv = tl.load(x_ptr + cols, mask=cmask, other=0.0)
    tl.store(g_ptr + row.to(tl.int64) * ldg + cols, _round_to(xv, g_ptr.dtype.element_ty), mask=cmask)


@triton.jit(do_not_specialize=["has_x"])
def _combine_kernel(g_ptr, c_ptr, x_ptr, out_ptr, r, d, ldg, ldx, ldo, nvec, block, nb, ntb, has_x,
                    alpha: tl.float64, BR: tl.constexpr, BD: tl.constexpr, NV: tl.constexpr,
                    RCH: tl.constexpr, ACC_DT: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    t = pid % (nb * ntb)
    vg = pid // (nb * ntb)
    b = t // ntb
    lo = b * block + (t % ntb) * BD
    hi = tl.minimum(b * block + block, d)
    cols = lo + tl.arange(0, BD)
    cmask = cols < hi
    vecs = vg * NV + tl.arange(0, NV)
    vmask = vecs < nvec
    acc64 = tl.zeros((NV, BD), tl.float64)
    for i1 in range(0, r, RCH):          # partial sums of at most RCH terms in ACC_DT, then float64
        acc = tl.zeros((NV, BD), ACC_DT)
        iend = tl.minimum(i1 + RCH, r)
        for i0 in range(i1, iend, BR):
            rows = i0 + tl.arange(0, BR)
            rmask = rows < iend
            g = tl.load(g_ptr + rows[:, None].to(tl.int64) * ldg + cols[None, :],
                        mask=rmask[:, None] & cmask[None, :], other=0.0).to(ACC_DT)
            cv = tl.load(c_ptr + (vecs[:, None] * nb + b) * r + rows[None, :],
                         mask=vmask[:, None] & rmask[None, :], other=0.0).to(ACC_DT)
            acc += tl.sum(cv[:, :, None] * g[None, :, :], axis=1)
        acc64 += acc.to(tl.float64)
    omask = vmask[:, None] & cmask[None, :]
    if has_x:
        xv = tl.load(x_ptr + vecs[:, None] * ldx + cols[None, :], mask=omask, other=0.0).to(tl.float64)
        acc64 += _as(alpha, tl.float64) * xv
    tl.store(out_ptr + vecs[:, None] * ldo + cols[None, :], acc64.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _diag_kernel(z_ptr, out_ptr, r, d, ldz, alpha: tl.float64, beta: tl.float64,
                 BR: tl.constexpr, BD: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BD + tl.arange(0, BD)
    cmask = cols < d
    acc = tl.zeros((BR, BD), tl.float64)
    for i0 in range(0, r, BR):
        rows = i0 + tl.arange(0, BR)
        z = tl.load(z_ptr + rows[:, None].to(tl.int64) * ldz + cols[None, :],
                    mask=(rows < r)[:, None] & cmask[None, :], other=0.0).to(tl.float64)
        acc += z * z
    s = tl.sum(acc, axis=0)
    out = _as(alpha, tl.float64) + _as(beta, tl.float64) * s
    tl.store(out_ptr + cols, out.to(out_ptr.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------------------------------
# Gram matrices, Cholesky, triangular inverse, W-form apply (static setup and window rebuild)
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _gram_kernel(a_ptr, out_ptr, b0, a_bs, si, sk, n, row_lim, row_step, kmax, k_lim, k_step, nt, nkc, kch,
                 T: tl.constexpr, BK: tl.constexpr, ATOMIC: tl.constexpr):
    # out[bl] (n, n) = A_b A_b^T with A_b[i, k] = a[b * a_bs + i * si + k * sk], b = b0 + bl; valid rows
    # min(n, row_lim - b * row_step), contraction length min(kmax, k_lim - b * k_step)
    pid = tl.program_id(0).to(tl.int64)
    kc = pid % nkc
    rest = pid // nkc
    tk = rest % nt
    rest = rest // nt
    ti = rest % nt
    bl = rest // nt
    if tk <= ti:   # lower tiles only
        b = b0 + bl
        nrow = tl.minimum(n, row_lim - b * row_step)
        K = tl.minimum(kmax, k_lim - b * k_step)
        k_lo = kc * kch
        k_hi = tl.minimum(k_lo + kch, K)
        ri = ti * T + tl.arange(0, T)
        rk = tk * T + tl.arange(0, T)
        mi = ri < nrow
        mk = rk < nrow
        base = a_ptr + b * a_bs
        acc = tl.zeros((T, T), tl.float64)
        for k0 in range(k_lo, k_hi, BK):
            kk = k0 + tl.arange(0, BK)
            km = kk < k_hi
            a1 = tl.load(base + ri[:, None] * si + kk[None, :] * sk, mask=mi[:, None] & km[None, :],
                         other=0.0).to(tl.float64)
            a2 = tl.load(base + rk[:, None] * si + kk[None, :] * sk, mask=mk[:, None] & km[None, :],
                         other=0.0).to(tl.float64)
            acc += tl.sum(a1[:, None, :] * a2[None, :, :], axis=2)
        out = out_ptr + bl * n * n
        omask = (ri < n)[:, None] & (rk < n)[None, :]
        if ATOMIC:
            tl.atomic_add(out + ri[:, None] * n + rk[None, :], acc, mask=omask, sem="relaxed")
        else:   # whole contraction here: both triangles (a diagonal tile stores equal values twice)
            tl.store(out + ri[:, None] * n + rk[None, :], acc, mask=omask)
            tl.store(out + rk[None, :] * n + ri[:, None], acc, mask=omask)


@triton.jit
def _chol_kernel(src_ptr, dst_ptr, flag_ptr, n, src_bs, shift: tl.float64, BT: tl.constexpr):
    # dst[bl] = L with L L^T = tril(src[bl]) (mirrored) + shift I; only the lower triangle is written
    bl = tl.program_id(0).to(tl.int64)
    src = src_ptr + bl * src_bs
    dst = dst_ptr + bl * n * n
    sh = _as(shift, tl.float64)
    for i0 in range(0, n, BT):   # a plain copy (harmless when src is dst): the shift joins at the pivot
        ri = i0 + tl.arange(0, BT)
        for j0 in range(0, i0 + BT, BT):
            rj = j0 + tl.arange(0, BT)
            msk = (ri < n)[:, None] & (rj[None, :] <= ri[:, None])
            off = ri[:, None] * n + rj[None, :]
            tl.store(dst + off, tl.load(src + off, mask=msk, other=0.0), mask=msk)
    tl.debug_barrier()
    bad = tl.zeros((), tl.int32)
    for k in range(0, n):
        akk = tl.load(dst + k * n + k) + sh      # a_kk is read only here, as pivot k
        bad = tl.maximum(bad, 1 - ((akk > 0.0) & (akk < float("inf"))).to(tl.int32))   # NaN: bad too
        lkk = tl.sqrt(akk)
        tl.debug_barrier()                              # every thread has read a_kk before it changes
        for i0 in range(k, n, BT):
            ri = i0 + tl.arange(0, BT)
            mi = ri < n
            col = tl.load(dst + ri * n + k, mask=mi, other=0.0)
            col = tl.where(ri == k, lkk, col / lkk)
            tl.store(dst + ri * n + k, col, mask=mi)
        tl.debug_barrier()
        for i0 in range(k + 1, n, BT):
            ri = i0 + tl.arange(0, BT)
            mi = ri < n
            li = tl.load(dst + ri * n + k, mask=mi, other=0.0)
            for j0 in range(k + 1, i0 + BT, BT):
                rj = j0 + tl.arange(0, BT)
                lj = tl.load(dst + rj * n + k, mask=rj < n, other=0.0)
                msk = mi[:, None] & (rj[None, :] <= ri[:, None])
                off = ri[:, None] * n + rj[None, :]
                a = tl.load(dst + off, mask=msk, other=0.0)
                tl.store(dst + off, a - li[:, None] * lj[None, :], mask=msk)
        tl.debug_barrier()
    tl.atomic_max(flag_ptr, bad)


@triton.jit
def _trinv_kernel(l_ptr, x_ptr, z_ptr, n, ntc, ldz, zc0, zstep, zc_lim, BD: tl.constexpr, BK: tl.constexpr,
                  STORE_Z: tl.constexpr):
    # X[bl] = L[bl]^-1 (n, n, zeros above the diagonal written); STORE_Z: also Z[i, zc0 + bl * zstep + j]
    # for the valid columns j < zc_lim - (zc0 + bl * zstep) (E form)
    pid = tl.program_id(0).to(tl.int64)
    bl = pid // ntc
    c0 = (pid % ntc) * BD
    L = l_ptr + bl * n * n
    X = x_ptr + bl * n * n
    cols = c0 + tl.arange(0, BD)
    cm = cols < n
    zcol0 = zc0 + bl * zstep
    zm = cols < zc_lim - zcol0
    for i in range(0, n):
        acc = tl.zeros((BK, BD), tl.float64)
        for k0 in range(c0, i, BK):       # X[k, cols] = 0 for k < c0
            kk = k0 + tl.arange(0, BK)
            km = kk < i
            lrow = tl.load(L + i * n + kk, mask=km, other=0.0)
            xt = tl.load(X + kk[:, None] * n + cols[None, :], mask=km[:, None] & cm[None, :], other=0.0)
            acc += lrow[:, None] * xt
        s = tl.sum(acc, axis=0)
        lii = tl.load(L + i * n + i)
        e = tl.where(cols == i, 1.0, 0.0)
        xi = tl.where(cols <= i, (e - s) / lii, 0.0)
        tl.store(X + i * n + cols, xi, mask=cm)
        if STORE_Z:
            tl.store(z_ptr + i * ldz + zcol0 + cols, xi.to(z_ptr.dtype.element_ty), mask=zm)
        tl.debug_barrier()                 # row i is read by the next rows' programs' threads


@triton.jit
def _apply_kernel(l_ptr, g_ptr, z_ptr, b0, m, d, ldg, ldz, block, ntb, nrt, BI: tl.constexpr, BD: tl.constexpr):
    # W form: Z[:, block b] = L_b^-1 G[:, block b] (L_b^-1 lower triangular, m x m, float64)
    pid = tl.program_id(0).to(tl.int64)
    rt = pid % nrt
    rest = pid // nrt
    t = rest % ntb
    bl = rest // ntb
    b = b0 + bl
    lo = b * block + t * BD
    hi = tl.minimum(b * block + block, d)
    cols = lo + tl.arange(0, BD)
    cm = cols < hi
    rows = rt * BI + tl.arange(0, BI)
    rm = rows < m
    L = l_ptr + bl * m * m
    acc = tl.zeros((BI, BD), tl.float64)
    for k in range(0, tl.minimum(m, rt * BI + BI)):
        lk = tl.load(L + rows * m + k, mask=rm, other=0.0)
        gk = tl.load(g_ptr + k * ldg + cols, mask=cm, other=0.0).to(tl.float64)
        acc += lk[:, None] * gk[None, :]
    tl.store(z_ptr + rows[:, None] * ldz + cols[None, :], acc.to(z_ptr.dtype.element_ty),
             mask=rm[:, None] & cm[None, :])


# ----------------------------------------------------------------------------------------------------
# Sliding window: coefficients, bordering update
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _matvec_kernel(a_ptr, q_ptr, c_ptr, m, nrt, scale: tl.float64, BI: tl.constexpr, BK: tl.constexpr):
    # c[v, i] = scale * sum_k a[i, k] q[v, k]
    pid = tl.program_id(0).to(tl.int64)
    rt = pid % nrt
    v = pid // nrt
    rows = rt * BI + tl.arange(0, BI)
    rm = rows < m
    acc = tl.zeros((BI, BK), tl.float64)
    for k0 in range(0, m, BK):
        kk = k0 + tl.arange(0, BK)
        km = kk < m
        a = tl.load(a_ptr + rows[:, None] * m + kk[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        qv = tl.load(q_ptr + v * m + kk, mask=km, other=0.0)
        acc += a * qv[None, :]
    c = _as(scale, tl.float64) * tl.sum(acc, axis=1)
    tl.store(c_ptr + v * m + rows, c, mask=rm)


@triton.jit(do_not_specialize=["p"])
def _border_prep_kernel(kinv_ptr, newcol_ptr, w_ptr, s_ptr, p, m, BI: tl.constexpr, BK: tl.constexpr):
    # W[0] = w = kinv bz - a (a . bz) / a_p with w_p = 0, W[1] = a = kinv[p, :] (this tile's rows);
    # s[0] += bz . w, s[1] += sum |bz_i w_i|, s[2] += non-finite newcol entries (this tile's parts)
    p = p.to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BI + tl.arange(0, BI)
    rm = rows < m
    acc = tl.zeros((BI, BK), tl.float64)
    acc_ab = tl.zeros((BK,), tl.float64)
    for k0 in range(0, m, BK):
        kk = k0 + tl.arange(0, BK)
        km = kk < m
        bz = tl.load(newcol_ptr + kk, mask=km & (kk != p), other=0.0)
        kv = tl.load(kinv_ptr + rows[:, None] * m + kk[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        acc += kv * bz[None, :]
        acc_ab += tl.load(kinv_ptr + p * m + kk, mask=km, other=0.0) * bz
    t = tl.sum(acc, axis=1)
    ab = tl.sum(acc_ab, axis=0)
    ak = tl.load(kinv_ptr + p * m + p)
    a = tl.load(kinv_ptr + p * m + rows, mask=rm, other=0.0)
    w = tl.where(rm & (rows != p), t - a * (ab / ak), 0.0)
    tl.store(w_ptr + rows, w, mask=rm)
    tl.store(w_ptr + m + rows, a, mask=rm)
    nc = tl.load(newcol_ptr + rows, mask=rm, other=0.0)
    bw = tl.where(rows != p, nc, 0.0) * w
    bad = rm & ((nc != nc) | (tl.abs(nc) == float("inf")))
    tl.atomic_add(s_ptr, tl.sum(bw, axis=0), sem="relaxed")
    tl.atomic_add(s_ptr + 1, tl.sum(tl.abs(bw), axis=0), sem="relaxed")
    tl.atomic_add(s_ptr + 2, tl.sum(tl.where(bad, 1.0, 0.0), axis=0), sem="relaxed")


@triton.jit(do_not_specialize=["p"])
def _border_kernel(kinv_ptr, w_ptr, p, m, nt, inv_s: tl.float64, inv_ak: tl.float64, T: tl.constexpr):
    # i, j != p: kinv[i, j] += w_i w_j / s - a_i a_j / a_p;  kinv[i, p] = kinv[p, i] = -w_i / s;  kinv[p, p] = 1 / s.
    # Every product is formed in a commutative order, so kinv stays exactly symmetric.
    pid = tl.program_id(0).to(tl.int64)
    p = p.to(tl.int64)
    ri = (pid // nt) * T + tl.arange(0, T)
    rj = (pid % nt) * T + tl.arange(0, T)
    mi = ri < m
    mj = rj < m
    wi = tl.load(w_ptr + ri, mask=mi, other=0.0)
    ai = tl.load(w_ptr + m + ri, mask=mi, other=0.0)
    wj = tl.load(w_ptr + rj, mask=mj, other=0.0)
    aj = tl.load(w_ptr + m + rj, mask=mj, other=0.0)
    s_inv = _as(inv_s, tl.float64)
    ww = wi[:, None] * wj[None, :]
    aa = ai[:, None] * aj[None, :]
    off = ri[:, None] * m + rj[None, :]
    msk = mi[:, None] & mj[None, :]
    on_i = ri[:, None] == p
    on_j = rj[None, :] == p
    k = tl.load(kinv_ptr + off, mask=msk & ~on_i & ~on_j, other=0.0)
    inner = k + (ww * s_inv - aa * _as(inv_ak, tl.float64))
    border = -(wi[:, None] + wj[None, :]) * s_inv           # w_p = 0: -w_j / s on row p, -w_i / s on column p
    val = tl.where(on_i & on_j, s_inv, tl.where(on_i | on_j, border, inner))
    tl.store(kinv_ptr + off, val, mask=msk)


@triton.jit(do_not_specialize=["p"])
def _set_rowcol_kernel(gram_ptr, newcol_ptr, p, m, BT: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    msk = offs < m
    v = tl.load(newcol_ptr + offs, mask=msk, other=0.0)
    tl.store(gram_ptr + p.to(tl.int64) * m + offs, v, mask=msk)
    tl.store(gram_ptr + offs * m + p, v, mask=msk)


# ----------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------
# Tiles, checked with tests/triton_aot.py (sm_80 / sm_90): (rows, columns) per program; NV vectors share
# a pass (1 or 4: a (NV, BR, BD) product tile, so BD halves for NV = 4).
_DOTS_BR = 16
_DOTS_BD = {1: 128, 4: 64}
_COMBINE_BR = 16
_COMBINE_BD = {1: 128, 4: 64}
_WRITE_BD = 1024
_DIAG = (16, 128)
_GRAM = (16, 16)          # (T, BK): a (T, T, BK) float64 product tile
_CHOL_BT = 16          # 32 spilled 8 bytes on sm_90 (Triton 3.9)
_TRINV = (32, 32)         # (BD, BK)
_APPLY = (32, 64)         # (BI, BD)
_MATVEC = (32, 32)        # (BI, BK)
_BORDER_T = 32
_ROWCOL_BT = 256


def _acc(dtype: torch.dtype):
    if dtype == torch.float64:
        return tl.float64
    if dtype in (torch.float32, torch.bfloat16):
        return tl.float32
    raise TypeError(f"mfac triton kernels: buffer dtype must be float32, bfloat16 or float64, got {dtype}")


def _vdt(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _nb(d: int, block: int) -> int:
    return 0 if d == 0 else -(-d // block)


def _nv(nvec: int) -> int:
    return 1 if nvec == 1 else 4


def _device_ctx(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _grid1(*counts) -> tuple:
    g = 1
    for c in counts:
        g *= int(c)
    assert g <= _PROGRAMS_MAX, "mfac: too many programs for one launch"
    return (g,)


def _ld(t: torch.Tensor) -> int:
    # row stride of a (rows, d) matrix with unit inner stride (any value >= d when it has <= 1 row)
    assert t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] <= 1), "mfac: rows must have unit inner stride"
    return t.stride(0) if t.shape[0] > 1 else max(t.shape[1], 1)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if (t.stride(-1) == 1 or t.shape[-1] <= 1) else t.contiguous()


def _is_meta(t: torch.Tensor) -> bool:
    return t.device.type == "meta"


# ----------------------------------------------------------------------------------------------------
# Public launchers (the signatures kernelkit.mfac.ops calls with backend="triton")
# ----------------------------------------------------------------------------------------------------
def _dots_launch(G, x, q, qr, block: int) -> None:
    r, d = G.shape
    nvec = x.shape[0]
    nb = _nb(d, block)
    if r == 0 or nvec == 0 or nb == 0:
        return
    NV = 1 if qr is not None else _nv(nvec)
    BD = _DOTS_BD[NV]
    B = min(block, d)
    chunk = min(triton.cdiv(B, BD) * BD, PARTIAL_TERMS)
    nchunk = triton.cdiv(B, chunk)
    n_rt = triton.cdiv(r, _DOTS_BR)
    with _device_ctx(G.device):
        _dots_kernel[_grid1(triton.cdiv(nvec, NV), nb * nchunk, n_rt)](
            G, x, q, qr if qr is not None else q, r, d, _ld(G), _ld(x), nvec, block, chunk, nchunk, nb, n_rt,
            BR=_DOTS_BR, BD=BD, NV=NV, WITH_QR=qr is not None, ACC_DT=_acc(G.dtype), num_warps=4)


def mfac_dots(G: torch.Tensor, x: torch.Tensor, block: int) -> torch.Tensor:
    """q (nvec, nblocks, r) float64: q[v, b, i] = sum_{j in block b} G[i, j] x[v, j]."""
    r, d = G.shape
    x = _rows(x)
    q = torch.zeros(x.shape[0], _nb(d, block), r, dtype=torch.float64, device=G.device)
    _dots_launch(G, x, q, None, block)
    return q


def mfac_insert_dots(G: torch.Tensor, x: torch.Tensor, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """G[row] = x (1, d) rounded to G's dtype, then (q, qr) = (G x, G round(x)), each (1, 1, r) float64
    (one block; (1, 0, r) for d = 0).  A non-finite x raises ValueError before G is touched."""
    r, d = G.shape
    assert x.dim() == 2 and x.shape == (1, d), "mfac: insert takes one vector x (1, d)"
    assert 0 <= row < r, f"mfac: row {row} outside [0, {r})"
    x = _rows(x)
    # the host check mfac.h allows on this path: an O(d) reduction and one scalar read
    if d and not _is_meta(x) and not bool(torch.isfinite(x).all()):
        raise ValueError("kernelkit.mfac insert: x has a non-finite entry (NaN or inf); G is unchanged")
    nb = 1 if d else 0
    q = torch.zeros(1, nb, r, dtype=torch.float64, device=G.device)
    if d == 0:
        return q, torch.zeros_like(q)
    with _device_ctx(G.device):
        _write_row_kernel[(triton.cdiv(d, _WRITE_BD),)](G, x, row, _ld(G), d, BD=_WRITE_BD, num_warps=4)
    if G.dtype == torch.bfloat16:
        qr = torch.zeros_like(q)
        _dots_launch(G, x, q, qr, d)
    else:   # round(x) == x: the Gram column is q itself
        _dots_launch(G, x, q, None, d)
        qr = q.clone()
    return q, qr


def mfac_combine(G: torch.Tensor, c: torch.Tensor, x, alpha: float, block: int) -> torch.Tensor:
    """out (nvec, d) in the vector dtype: alpha x + G^T c per block (x None: no alpha term)."""
    r, d = G.shape
    nvec = c.shape[0]
    nb = _nb(d, block)
    assert c.shape == (nvec, nb, r) and c.dtype == torch.float64, "mfac: c must be (nvec, nblocks, r) float64"
    c = c.contiguous()
    out = torch.empty(nvec, d, dtype=_vdt(G.dtype), device=G.device)
    if nvec == 0 or d == 0:
        return out
    if x is not None:
        assert x.shape == (nvec, d), "mfac: x must be (nvec, d)"
        x = _rows(x)
    NV = _nv(nvec)
    BD = _COMBINE_BD[NV]
    ntb = triton.cdiv(min(block, d), BD)
    with _device_ctx(G.device):
        _combine_kernel[_grid1(triton.cdiv(nvec, NV), nb, ntb)](
            G, c, x if x is not None else out, out, r, d, _ld(G), _ld(x) if x is not None else d, _ld(out), nvec,
            block, nb, ntb, int(x is not None), float(alpha),
            BR=_COMBINE_BR, BD=BD, NV=NV, RCH=PARTIAL_TERMS, ACC_DT=_acc(G.dtype), num_warps=4)
    return out


def mfac_diag(Z: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """(d,) in the vector dtype: alpha + beta * sum_i Z[i, j]^2 (float64 sums)."""
    r, d = Z.shape
    _acc(Z.dtype)
    out = torch.empty(d, dtype=_vdt(Z.dtype), device=Z.device)
    if d == 0:
        return out
    BR, BD = _DIAG
    with _device_ctx(Z.device):
        _diag_kernel[(triton.cdiv(d, BD),)](Z, out, r, d, _ld(Z), float(alpha), float(beta),
                                           BR=BR, BD=BD, num_warps=4)
    return out


def _check_flag(flag: torch.Tensor, what: str) -> None:
    if not _is_meta(flag) and int(flag.item()):
        raise ValueError(f"kernelkit.mfac {what}: the matrix is not numerically positive definite (damp too small "
                         "for the scale of the gradients, or a non-finite entry)")


def _cholesky_inverse_launch(src, n: int, g: int, shift: float, src_bs: int, flag, Lws, Xws,
                             Z=None, ldz: int = 0, zc0: int = 0, zstep: int = 0, zc_lim: int = 0) -> None:
    """For bl < g: Lws[bl] = chol(tril(src[bl]) + shift I), Xws[bl] = its inverse (and, with Z, the
    E-form rows into Z)."""
    BD, BK = _TRINV
    ntc = triton.cdiv(n, BD)
    _chol_kernel[(g,)](src, Lws, flag, n, src_bs, float(shift), BT=_CHOL_BT, num_warps=4)
    _trinv_kernel[_grid1(g, ntc)](Lws, Xws, Z if Z is not None else Xws, n, ntc, ldz, zc0, zstep, zc_lim,
                                   BD=BD, BK=BK, STORE_Z=Z is not None, num_warps=4)


def mfac_static_setup(G: torch.Tensor, damp: float, block: int) -> torch.Tensor:
    """The static factor Z (r, d) of mfac.h (float32, float64 for a float64 G); float64 Gram matrices,
    Cholesky factors and inverses.  ValueError if a block's matrix is not positive definite."""
    m, d = G.shape
    _acc(G.dtype)
    B = min(block, d)
    r = 0 if (m == 0 or d == 0) else (m if m <= B else B)
    Z = torch.empty(r, d, dtype=_vdt(G.dtype), device=G.device)
    if r == 0:
        return Z
    w_form = m <= B
    n = m if w_form else B
    nb = _nb(d, block)
    ldg, ldz = _ld(G), _ld(Z)
    group = max(1, min(nb, SETUP_WORKSPACE // (n * n)))
    T, BK = _GRAM
    nt = triton.cdiv(n, T)
    flag = torch.zeros(1, dtype=torch.int32, device=G.device)
    with _device_ctx(G.device):
        for b0 in range(0, nb, group):
            g = min(group, nb - b0)
            gram = torch.zeros(g, n, n, dtype=torch.float64, device=G.device)
            if w_form:   # A_b = G[:, block b]: m rows (stride ldg), w_b columns
                args = (b0, block, ldg, 1, n, m, 0, block, d, block)
                K = B
            else:        # A_b = G[:, block b]^T: w_b rows (stride 1), m columns (stride ldg)
                args = (b0, block, 1, ldg, n, d, block, m, m, 0)
                K = m
            kch = min(K, GRAM_KCHUNK)
            nkc = triton.cdiv(K, kch)
            _gram_kernel[_grid1(g, nt, nt, nkc)](G, gram, *args, nt, nkc, kch, T=T, BK=BK, ATOMIC=True,
                                                  num_warps=4)
            Xws = torch.empty_like(gram)
            if w_form:
                _cholesky_inverse_launch(gram, n, g, m * damp, n * n, flag, gram, Xws)
                BI, BD = _APPLY
                ntb, nrt = triton.cdiv(B, BD), triton.cdiv(m, BI)
                _apply_kernel[_grid1(g, ntb, nrt)](Xws, G, Z, b0, m, d, ldg, ldz, block, ntb, nrt,
                                                    BI=BI, BD=BD, num_warps=4)
            else:
                _cholesky_inverse_launch(gram, n, g, m * damp, n * n, flag, gram, Xws,
                                         Z=Z, ldz=ldz, zc0=b0 * block, zstep=block, zc_lim=d)
    _check_flag(flag, "static_setup")
    return Z


def _rebuild_into(gram: torch.Tensor, damp: float, kinv: torch.Tensor) -> None:
    m = gram.shape[0]
    Lws = torch.empty(1, m, m, dtype=torch.float64, device=gram.device)
    Xws = torch.empty_like(Lws)
    flag = torch.zeros(1, dtype=torch.int32, device=gram.device)
    T, BK = _GRAM
    nt = triton.cdiv(m, T)
    with _device_ctx(gram.device):
        _cholesky_inverse_launch(gram, m, 1, m * damp, 0, flag, Lws, Xws)
        # kinv = L^-T L^-1: the Gram matrix of A = (L^-1)^T, A[i, k] = X[k, i]
        _gram_kernel[_grid1(nt, nt)](Xws, kinv, 0, 0, 1, m, m, m, 0, m, m, 0, nt, 1, m, T=T, BK=BK, ATOMIC=False,
                                     num_warps=4)
    _check_flag(flag, "window_rebuild")


def _check_square(t: torch.Tensor, what: str, symmetric: bool = False) -> int:
    # a symmetric matrix may also be stored column-major (torch.cholesky_inverse returns that layout):
    # element (i, k) at i * m + k is then (k, i), the same value, and symmetric writes stay symmetric
    dense = t.is_contiguous() or (symmetric and t.dim() == 2 and t.t().is_contiguous())
    assert t.dim() == 2 and t.shape[0] == t.shape[1] and t.dtype == torch.float64 and dense, \
        f"mfac: {what} must be a contiguous (m, m) float64 matrix"
    return t.shape[0]


def mfac_window_rebuild(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """kinv = (m damp I + gram)^-1 (gram's lower triangle is read), float64; ValueError if not positive
    definite."""
    m = _check_square(gram, "gram")
    kinv = torch.empty_like(gram)
    if m:
        _rebuild_into(gram, float(damp), kinv)
    return kinv


def mfac_window_update(gram: torch.Tensor, kinv: torch.Tensor, row: int, newcol: torch.Tensor, damp: float,
                       _force: str | None = None) -> bool:
    """In place: gram[row, :] = gram[:, row] = newcol, kinv = (m damp I + gram)^-1 by bordering, or by a
    rebuild when that step is unsafe (see the module docstring).  A non-finite newcol raises ValueError
    with nothing changed.  Returns True when it rebuilt.  (_force: "both" runs both paths' kernels, for
    aot_sweep on meta tensors.)"""
    m = _check_square(gram, "gram")
    assert _check_square(kinv, "kinv", symmetric=True) == m and 0 <= row < m, "mfac: kinv (m, m) and 0 <= row < m"
    assert newcol.shape == (m,) and newcol.dtype == torch.float64, "mfac: newcol must be (m,) float64"
    newcol = newcol.contiguous()
    dev = gram.device
    W = torch.empty(2, m, dtype=torch.float64, device=dev)      # w, a
    S = torch.zeros(3, dtype=torch.float64, device=dev)         # bz . w, sum |bz_i w_i|, non-finite count
    BI, BK = _MATVEC
    with _device_ctx(dev):
        _border_prep_kernel[(triton.cdiv(m, BI),)](kinv, newcol, W, S, row, m, BI=BI, BK=BK, num_warps=4)
    if _force == "both":
        border, rebuild, inv_s, inv_ak = True, True, 1.0, 1.0
    else:
        # the decision on the host: five numbers (the device is synchronized here)
        bw, bw_abs, bad, ak, nck = torch.cat([S, W[1, row:row + 1], newcol[row:row + 1]]).tolist()
        if bad:
            raise ValueError("kernelkit.mfac window_update: newcol has a non-finite entry; nothing changed")
        c = nck + m * float(damp)
        sc = c - bw
        safe = (math.isfinite(ak) and ak > 0 and math.isfinite(sc) and sc > 0 and math.isfinite(bw_abs)
                and sc > UPDATE_CANCEL * (abs(c) + bw_abs))
        border, rebuild = safe, not safe
        inv_s, inv_ak = (1.0 / sc, 1.0 / ak) if safe else (0.0, 0.0)
    with _device_ctx(dev):
        _set_rowcol_kernel[(triton.cdiv(m, _ROWCOL_BT),)](gram, newcol, row, m, BT=_ROWCOL_BT, num_warps=4)
        if border:
            nt = triton.cdiv(m, _BORDER_T)
            _border_kernel[_grid1(nt, nt)](kinv, W, row, m, nt, inv_s, inv_ak, T=_BORDER_T, num_warps=4)
    if rebuild:
        _rebuild_into(gram, float(damp), kinv)
    return rebuild


def mfac_window_coef(kinv: torch.Tensor, q: torch.Tensor, scale: float) -> torch.Tensor:
    """c (nvec, m) float64: c[v] = scale kinv q[v]."""
    m = _check_square(kinv, "kinv")
    nvec = q.shape[0]
    assert q.shape == (nvec, m) and q.dtype == torch.float64, "mfac: q must be (nvec, m) float64"
    q = q.contiguous()
    c = torch.empty(nvec, m, dtype=torch.float64, device=kinv.device)
    if nvec == 0 or m == 0:
        return c
    BI, BK = _MATVEC
    nrt = triton.cdiv(m, BI)
    with _device_ctx(kinv.device):
        _matvec_kernel[_grid1(nvec, nrt)](kinv, q, c, m, nrt, float(scale), BI=BI, BK=BK, num_warps=4)
    return c


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile coverage (tests/triton_aot.py)
# ----------------------------------------------------------------------------------------------------
AOT_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
# Sweep: d = 4096, r = 64 buffers (multiples of 16, as real shapes); one and four vectors, with and
# without x; the static setup in the W form (m = 64, blocks of 1024) and the E form (m = 256, blocks of
# 128); the window ops at m = 256 with both update paths.
_AOT_D, _AOT_R = 4096, 64


def aot_sweep() -> int:
    """Drive every launcher over every dtype and path on meta tensors (nothing is allocated or run).
    tests/triton_aot.py intercepts the kernel launches and compiles each distinct one.  Returns the
    number of points driven."""
    if _INTERPRET:
        raise RuntimeError("aot_sweep: TRITON_INTERPRET=1 selects the interpreter, not the GPU's compiler")
    meta = dict(device="meta")
    D, R = _AOT_D, _AOT_R
    points = 0
    for dtype in AOT_DTYPES:
        vdt = _vdt(dtype)
        G = torch.empty(R, D, dtype=dtype, **meta)
        for nvec in (1, 4):
            x = torch.empty(nvec, D, dtype=vdt, **meta)
            mfac_dots(G, x, D)
            c = torch.empty(nvec, 1, R, dtype=torch.float64, **meta)
            mfac_combine(G, c, x, 0.5, D)
            mfac_combine(G, c, None, 0.0, D)
            points += 3
        mfac_insert_dots(G, torch.empty(1, D, dtype=vdt, **meta), 3)
        mfac_diag(torch.empty(R, D, dtype=vdt, **meta), 1.0, -1.0)
        mfac_static_setup(G, 1e-3, 1024)
        mfac_static_setup(torch.empty(256, D, dtype=dtype, **meta), 1e-3, 128)
        points += 4
    m = 256
    gram = torch.empty(m, m, dtype=torch.float64, **meta)
    kinv = torch.empty(m, m, dtype=torch.float64, **meta)
    mfac_window_rebuild(gram, 1e-3)
    mfac_window_update(gram, kinv, 5, torch.empty(m, dtype=torch.float64, **meta), 1e-3, _force="both")
    for nvec in (1, 4):
        mfac_window_coef(kinv, torch.empty(nvec, m, dtype=torch.float64, **meta), -2.0)
    return points + 4


__all__ = ["mfac_dots", "mfac_insert_dots", "mfac_combine", "mfac_diag", "mfac_static_setup",
           "mfac_window_update", "mfac_window_rebuild", "mfac_window_coef", "aot_sweep"]
