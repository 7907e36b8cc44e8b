"""Triton kernels of the rbf family: NeuRBF's adaptive radial-basis fields (Chen et al., "NeuRBF: A Neural
Fields Representation with Adaptive Radial Basis Functions", ICCV 2023), neighbour grid, k-nearest search
and the fused field evaluation with its backward.  Math, layouts, dtypes and the grid buffer: the C ABI
csrc/include/kernelkit/rbf.h; float64 oracle: python/kernelkit/rbf/reference.py.  The launchers below are
what kernelkit.rbf.ops calls with backend="triton" (plain tensors, already validated there).

    o = x - mu_i,  ivq: phi = 1 / (1 + o^T A o),  gauss: phi = exp(-0.5 o^T A o),
                   nlin: phi = prod_d clamp(1 - |o_d| s_d, 0, 1)          (A full (M, D, D) or diagonal (M, D))
    phih_i = phi_i / (sum_l phi_l + 1e-8)  (normalize 1, 2) or phi_i  (normalize 0)
    out[n, j] = sum_i w[idx_i, j] sin(omegas[j] phih_i)   (or w[idx_i, j] phih_i without omegas)

    rbf_grid_build(centers (M, D))           -> uint8 grid buffer, rbf.h's layout
    rbf_knn(x (N, D), grid, m, k)            -> idx int64 (N, k), dist2 (N, k) coordinate dtype
    rbf_features_fwd(x, centers, shapes, weights, omegas, idx, kernel, normalize)          -> out (N, C)
    rbf_features_bwd(grad_out, ..., needs)   -> (dx, dcenters, dshapes, dweights, domegas), None if not needed

Kernels (1-D grids; offsets that scale with a size product are int64; D = 2 or 3 is a runtime argument:
the third coordinate of a 2-D problem is loaded as 0, which leaves every sum, product and distance
bit-identical, so one compiled kernel serves both):
    _bbox_kernel     per program (BLOCK centres) the min / max of each coordinate and the count of
        non-finite ones; the launcher reduces the few partials with torch and reads them back (the one
        host sync of the build): the geometry rule (reference.grid_geometry, a loop) runs on the host.
    _cellid_kernel   cell = floor((mu_d - lo_d) / cell) clamped per dimension, in float64 as the reference
        does (the division is exact-rounded in float64, so cells equal the CPU build's), counts by
        tl.atomic_add; cell_start = the exclusive scan of the counts (torch.cumsum as glue).
    _scatter_kernel  the position inside its cell from tl.atomic_add on a cursor per cell (the order
        inside a cell is unspecified, as rbf.h allows; the search breaks ties by index, not position),
        then order[] and the sorted coordinates.
    _knn_kernel      a program per BLOCK_N queries, one lane per query; each lane walks its own state
        machine in a data-dependent while loop: the cells of ring r (Chebyshev distance r from the query's
        clamped cell, enumerated by a closed-form decode of the ring's t-th cell) one at a time, the
        centres of a cell one per iteration.  The top-k is a (BLOCK_N, KP) tile of (dist2, index):
        a candidate replaces the current worst when smaller by (dist2, index), then the worst is found
        again (no sort in the loop); the tile is sorted once at the end by selection.  After ring r the
        lane stops when the grid is covered or when every unvisited cell is provably farther than the
        k-th: gap = the distance from x to the nearest unvisited slab (float64), shrunk by
        2^-40 (|x| + |lo| + res cell) for the float64 rounding of the cell boundaries, and
        gap^2 (1 - 2^-18) > dist2_k (a margin far above the few float32 roundings of dist2), so the
        result equals brute force.  dist2 = ((x0-c0)^2 + (x1-c1)^2) + (x2-c2)^2 in the coordinate dtype,
        launched with enable_fp_fusion=False so that no FMA fuses it (rbf.h): bit-equal to
        reference.knn_reference.
    _fwd_kernel      a program per (BLOCK_N queries, BLOCK_C channels): pass 1 sums phi over the k slots
        (normalization), pass 2 recomputes phi_i per slot, gathers w[idx_i, c-tile] and adds
        w * sin(omega * phih_i) into a (BLOCK_N, BLOCK_C) accumulator in the coordinate dtype (float32 for
        half weights); out is rounded once to the weights' dtype (bfloat16 by hand, to nearest even).
    _bwd_kernel      a program per BLOCK_N queries: phi of the k slots kept in a (BLOCK_N, KP) tile; over
        the channel tiles: dweights[idx, c] += g sin(omega phih) (tl.atomic_add), dphih_i += sum_c g w omega
        cos(omega phih) (a (BLOCK_N, KP) tile), domegas[c] += sum g w phih cos (one atomic per tile and
        program); then per slot the chain through the normalization (detached or full: dphi_l =
        (dphih_l - sum_i dphih_i phih_i) / S) and the kernel: dx stored per query, dcenters / dshapes
        scatter-added.  Derivative conventions of torch autograd (d|o| = sign(o), clamp passes 0 <= h <= 1,
        the product rule as products of the other factors).  Rows with a non-finite x contribute nothing
        to the scatter-added gradients and get dx = NaN (what autograd gives them).

Numerics.  The sine: tl.sin / tl.cos lower to libdevice's __nv_sinf / __nv_cosf (and __nv_sin / __nv_cos
for float64) on the GPU, not the approximate sin.approx.f32: those reduce the argument exactly (Payne-Hanek
for large |t|) and are within 2 ulp, far inside rbf.h's 2^-21 for |t| <= 2^17 (tests/test_rbf_triton.py
checks the compiled PTX has no sin.approx / cos.approx); the interpreter uses numpy's correctly reduced
sin.  Divisions in float32 use tl.div_rn (Triton's plain `/` is the 2-ulp div.full.f32; phih's error is
multiplied by omega ~ 4096).  exp (gauss) is Triton's ex2-based exp (about 2 ulp).  Only pointer
arithmetic and masks (no block pointers), so the same source runs on Triton 3.6 .. 3.9 and under
TRITON_INTERPRET=1.
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
EPS = 1e-8                      # the normalization's additive constant (NeuRBF)
_EPS = tl.constexpr(EPS)         # (the kernels' copy: a jit function reads only constexpr globals)
HEADER_BYTES = 256              # int64 header[16] + double geom[16]
_KK_DTYPE = {torch.float32: 0, torch.float64: 1}

# Tiles, chosen by the launchers from the dtypes and KP; aot_sweep() drives every choice, so
# tests/triton_aot.py compiles each one (all spill-free on sm_80 and sm_90 with Triton 3.9's ptxas; the
# previous single choice spilled up to 720 B in the float64 backward).  knn: KP = the next power of two
# >= max(k, 4); its (BLOCK_N, KP) top-k tile (dist2 + int64 index) is what fills the registers, so every
# KP >= 16 and float64 take 64 queries on 4 warps.  features: float64 (libdevice's double sin / cos and
# 8-byte tiles) takes twice the warps for the same tiles; the float32 forward takes 128 queries on 8
# warps (64 on 4 spilled 28 B with bfloat16 weights).
_BBOX_BLOCK, _BBOX_WARPS = 1024, 8      # 4 warps spilled 4 B for float64 on sm_80
_CELL_BLOCK = 1024


def _bbox_cfg(dtype):
    """(BLOCK, num_warps) of _bbox_kernel."""
    return _BBOX_BLOCK, _BBOX_WARPS


def _knn_cfg(dtype, kp):
    """(BLOCK_N, num_warps) of _knn_kernel for a coordinate dtype and KP."""
    return (128, 4) if dtype == torch.float32 and kp <= 8 else (64, 4)


def _fwd_cfg(cdt, wdt):
    """(BLOCK_N, BLOCK_C, num_warps) of _fwd_kernel for the coordinate and weights dtypes."""
    return (64, 32, 8) if cdt == torch.float64 else (128, 32, 8)


def _bwd_cfg(cdt, wdt, kp):
    """(BLOCK_N, BLOCK_C, num_warps) of _bwd_kernel for the coordinate and weights dtypes and KP."""
    return (32, 32, 8) if cdt == torch.float64 else (32, 32, 4)


# ----------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _div(a, b):
    # exact-rounded division: tl.div_rn for float32 (plain `/` is div.full.f32 on the GPU), `/` for float64
    if a.dtype == tl.float32:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _round_to(v, DT: tl.constexpr):
    # v (float32 / float64) rounded to DT to nearest even; bfloat16 by hand on the float32 bits (add 0x7fff
    # + the lowest kept bit, drop 16 bits): the interpreter's cast truncates
    if DT == tl.bfloat16:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DT)


@triton.jit
def _and3(mask, dim):
    # mask & (dim > 2), built at the mask's shape (the interpreter turns bool & 0-d bool into int32)
    return mask & ((tl.zeros(mask.shape, tl.int32) + dim) > 2)


@triton.jit
def _finite(v):
    return tl.abs(v) < float("inf")          # false for +-inf and NaN


@triton.jit
def _load_x(x_ptr, rows, rmask, ldx, dim):
    # the query coordinates, the third 0 for a 2-D problem
    x0 = tl.load(x_ptr + rows * ldx, mask=rmask, other=0.0)
    x1 = tl.load(x_ptr + rows * ldx + 1, mask=rmask, other=0.0)
    x2 = tl.load(x_ptr + rows * ldx + 2, mask=_and3(rmask, dim), other=0.0)
    return x0, x1, x2


@triton.jit
def _gather3(p, base, mask, dim):
    # p[base + 0 .. 2], the third 0 when dim == 2
    v0 = tl.load(p + base, mask=mask, other=0.0)
    v1 = tl.load(p + base + 1, mask=mask, other=0.0)
    v2 = tl.load(p + base + 2, mask=_and3(mask, dim), other=0.0)
    return v0, v1, v2


@triton.jit
def _shape_full(s_ptr, i, mask, dim):
    # the 3 x 3 block of A_i (dim x dim, row-major, zero-padded)
    b = i * dim * dim
    m3 = _and3(mask, dim)
    a00 = tl.load(s_ptr + b, mask=mask, other=0.0)
    a01 = tl.load(s_ptr + b + 1, mask=mask, other=0.0)
    a10 = tl.load(s_ptr + b + dim, mask=mask, other=0.0)
    a11 = tl.load(s_ptr + b + dim + 1, mask=mask, other=0.0)
    a02 = tl.load(s_ptr + b + 2, mask=m3, other=0.0)
    a12 = tl.load(s_ptr + b + dim + 2, mask=m3, other=0.0)
    a20 = tl.load(s_ptr + b + 2 * dim, mask=m3, other=0.0)
    a21 = tl.load(s_ptr + b + 2 * dim + 1, mask=m3, other=0.0)
    a22 = tl.load(s_ptr + b + 2 * dim + 2, mask=m3, other=0.0)
    return a00, a01, a02, a10, a11, a12, a20, a21, a22


@triton.jit
def _phi(x0, x1, x2, c_ptr, s_ptr, i, valid, dim, kernel, full):
    # phi of the neighbour i (per lane), 0 where not valid
    c0, c1, c2 = _gather3(c_ptr, i * dim, valid, dim)
    o0 = x0 - c0
    o1 = x1 - c1
    o2 = x2 - c2
    if kernel == 2:
        s0, s1, s2 = _gather3(s_ptr, i * dim, valid, dim)
        h0 = tl.minimum(tl.maximum(1.0 - tl.abs(o0) * s0, 0.0), 1.0)
        h1 = tl.minimum(tl.maximum(1.0 - tl.abs(o1) * s1, 0.0), 1.0)
        h2 = tl.minimum(tl.maximum(1.0 - tl.abs(o2) * s2, 0.0), 1.0)
        phi = h0 * h1 * h2
    else:
        if full:
            a00, a01, a02, a10, a11, a12, a20, a21, a22 = _shape_full(s_ptr, i, valid, dim)
            q = (o0 * (a00 * o0 + a01 * o1 + a02 * o2) + o1 * (a10 * o0 + a11 * o1 + a12 * o2)
                 + o2 * (a20 * o0 + a21 * o1 + a22 * o2))
        else:
            s0, s1, s2 = _gather3(s_ptr, i * dim, valid, dim)
            q = s0 * o0 * o0 + s1 * o1 * o1 + s2 * o2 * o2
        if kernel == 0:
            phi = _div(tl.full(q.shape, 1.0, q.dtype), 1.0 + q)
        else:
            phi = tl.exp(-0.5 * q)
    return tl.where(valid, phi, 0.0)


@triton.jit
def _f64(v):
    # a scalar argument (a Python int under the interpreter, maybe a constexpr 1 when compiled) as float64
    return tl.zeros((), tl.float64) + v


@triton.jit
def _dq(q, dphi, kernel):
    # dL/dq from dL/dphi: ivq phi = 1 / (1 + q), dphi/dq = -phi^2; gauss phi = exp(-q / 2), dphi/dq = -phi / 2
    if kernel == 0:
        ph = _div(tl.full(q.shape, 1.0, q.dtype), 1.0 + q)
        dq = -dphi * ph * ph
    else:
        dq = -0.5 * dphi * tl.exp(-0.5 * q)
    return dq


@triton.jit
def _col(t, slot, j):
    # column j of a (BLOCK_N, KP) tile
    return tl.sum(tl.where(slot[None, :] == j, t, 0), axis=1)


# ----------------------------------------------------------------------------------------------------
# Grid build: bbox, cell ids + counts, scatter
# ----------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["dim"])
def _bbox_kernel(c_ptr, ldc, m, dim, lo_ptr, hi_ptr, bad_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < m
    bad = tl.zeros((BLOCK,), tl.int32)
    for d in tl.static_range(3):
        dm = rmask & ((tl.zeros(rows.shape, tl.int32) + d) < dim)
        v = tl.load(c_ptr + rows * ldc + d, mask=dm, other=0.0)
        bad += (dm & ~_finite(v)).to(tl.int32)
        tl.store(lo_ptr + pid * 3 + d, tl.min(tl.where(dm, v, float("inf")), axis=0))
        tl.store(hi_ptr + pid * 3 + d, tl.max(tl.where(dm, v, -float("inf")), axis=0))
    tl.store(bad_ptr + pid, tl.sum(bad, axis=0))


@triton.jit(do_not_specialize=["dim"])
def _cellid_kernel(c_ptr, ldc, m, dim, res0, res1, res2, lo0: tl.float64, lo1: tl.float64, lo2: tl.float64,
                   cell: tl.float64, cid_ptr, cnt_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < m
    v0, v1, v2 = _gather3(c_ptr, rows * ldc, rmask, dim)
    f0 = tl.floor((v0.to(tl.float64) - lo0) / cell)
    f1 = tl.floor((v1.to(tl.float64) - lo1) / cell)
    f2 = tl.floor((v2.to(tl.float64) - lo2) / cell)   # 2-D: v2 = lo2 = 0, res2 = 1: always 0
    c0 = tl.minimum(tl.maximum(f0, 0.0), _f64(res0 - 1)).to(tl.int64)
    c1 = tl.minimum(tl.maximum(f1, 0.0), _f64(res1 - 1)).to(tl.int64)
    c2 = tl.minimum(tl.maximum(f2, 0.0), _f64(res2 - 1)).to(tl.int64)
    cid = (c0 * res1 + c1) * res2 + c2
    tl.store(cid_ptr + rows, cid, mask=rmask)
    tl.atomic_add(cnt_ptr + cid, 1, mask=rmask, sem="relaxed")


@triton.jit(do_not_specialize=["dim"])
def _scatter_kernel(c_ptr, ldc, m, dim, cid_ptr, cs_ptr, cur_ptr, order_ptr, coords_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < m
    cid = tl.load(cid_ptr + rows, mask=rmask, other=0)
    slot = tl.atomic_add(cur_ptr + cid, 1, mask=rmask, sem="relaxed")
    pos = tl.load(cs_ptr + cid, mask=rmask, other=0) + slot.to(tl.int64)
    tl.store(order_ptr + pos, rows, mask=rmask)
    for d in tl.static_range(3):
        dm = rmask & ((tl.zeros(rows.shape, tl.int32) + d) < dim)
        tl.store(coords_ptr + pos * dim + d, tl.load(c_ptr + rows * ldc + d, mask=dm), mask=dm)


# ----------------------------------------------------------------------------------------------------
# k nearest centres
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _query_cell(x, lo, cell, res):
    f = tl.floor((x - lo) / cell)
    return tl.minimum(tl.maximum(f, 0.0), (res - 1).to(tl.float64)).to(tl.int64)


# (The search loop below is written out without calls to @triton.jit helpers and with its three phases
# under uniform branches: under the interpreter each helper call and each op costs ~1 ms, and the loop
# runs once per centre or cell visited.)
@triton.jit(do_not_specialize=["dim", "k", "m"])
def _knn_kernel(x_ptr, ldx, n, dim, hdr_ptr, geom_ptr, cs_ptr, order_ptr, coords_ptr, m, k, idx_ptr, dist_ptr,
                BLOCK_N: tl.constexpr, KP: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n
    x0, x1, x2 = _load_x(x_ptr, rows, rmask, ldx, dim)
    DT = x0.dtype
    finite = _finite(x0) & _finite(x1) & _finite(x2)
    flags = tl.load(hdr_ptr + 8)
    res0 = tl.load(hdr_ptr + 3)
    res1 = tl.load(hdr_ptr + 4)
    res2 = tl.load(hdr_ptr + 5)
    lo0 = tl.load(geom_ptr + 0)
    lo1 = tl.load(geom_ptr + 1)
    lo2 = tl.load(geom_ptr + 2)
    cell = tl.load(geom_ptr + 3)
    # (scalars are broadcast to the lanes first: the interpreter makes bool & 0-d bool an int32 array)
    zl = tl.zeros((BLOCK_N,), tl.int64)
    nanrow = ~finite | ((zl + flags) != 0)
    active = rmask & ~nanrow & ((zl + m) > 0)
    three = (zl + dim) > 2
    xd0 = tl.where(finite, x0, 0.0).to(tl.float64)
    xd1 = tl.where(finite, x1, 0.0).to(tl.float64)
    xd2 = tl.where(finite, x2, 0.0).to(tl.float64)
    q0 = _query_cell(xd0, lo0, cell, res0)
    q1 = _query_cell(xd1, lo1, cell, res1)
    q2 = _query_cell(xd2, lo2, cell, res2)
    # After ring r, the unvisited cells along dimension d lie at >= up_d + r cell above x (when
    # r <= upr_d) and >= dn_d + r cell below (when r <= dnr_d); the grid is covered once r >= cover.
    up0 = lo0 + (q0 + 1).to(tl.float64) * cell - xd0
    up1 = lo1 + (q1 + 1).to(tl.float64) * cell - xd1
    up2 = lo2 + (q2 + 1).to(tl.float64) * cell - xd2
    dn0 = xd0 - (lo0 + q0.to(tl.float64) * cell)
    dn1 = xd1 - (lo1 + q1.to(tl.float64) * cell)
    dn2 = xd2 - (lo2 + q2.to(tl.float64) * cell)
    upr0 = res0 - 2 - q0
    upr1 = res1 - 2 - q1
    upr2 = res2 - 2 - q2
    cover = tl.maximum(tl.maximum(tl.maximum(q0, res0 - 1 - q0), tl.maximum(q1, res1 - 1 - q1)),
                       tl.maximum(q2, res2 - 1 - q2))
    # the absolute rounding margin of the float64 cell boundaries (see the module docstring)
    scale = tl.maximum(tl.maximum(tl.abs(xd0) + tl.abs(lo0) + res0.to(tl.float64) * cell,
                                  tl.abs(xd1) + tl.abs(lo1) + res1.to(tl.float64) * cell),
                       tl.abs(xd2) + tl.abs(lo2) + res2.to(tl.float64) * cell)
    margin = scale * (2.0 ** -40)

    slot = tl.arange(0, KP)
    sval = slot < k
    big = tl.zeros((), tl.int64) + m          # index of an empty slot: loses every tie to a real centre
    td = tl.where(sval[None, :], float("inf"), -float("inf")).to(DT) + tl.zeros((BLOCK_N, KP), DT)
    ti = tl.zeros((BLOCK_N, KP), tl.int64) + big
    wd = tl.full((BLOCK_N,), float("inf"), DT)  # the worst (dist2, index) and its slot
    wi = zl + big
    wpos = zl
    r = zl                                      # ring, next cell of the ring, centre range of the cell
    t = zl
    p = zl
    e = zl
    while tl.max(active.to(tl.int32), axis=0) > 0:
        # lanes inside a cell: one centre each, (dist2, index) against the current worst
        proc = active & (p < e)
        if tl.max(proc.to(tl.int32), axis=0) > 0:
            gi = tl.load(order_ptr + p, mask=proc, other=0)
            cb = p * dim
            d0 = x0 - tl.load(coords_ptr + cb, mask=proc, other=0.0)
            d1 = x1 - tl.load(coords_ptr + cb + 1, mask=proc, other=0.0)
            d2 = x2 - tl.load(coords_ptr + cb + 2, mask=proc & three, other=0.0)   # 0 in 2-D: s + 0 = s
            s = d0 * d0
            s = s + d1 * d1
            s = s + d2 * d2
            better = proc & ((s < wd) | ((s == wd) & (gi < wi)))
            hit = better[:, None] & (slot[None, :] == wpos[:, None])
            td = tl.where(hit, s[:, None], td)
            ti = tl.where(hit, gi[:, None], ti)
            wd = tl.max(td, axis=1)
            atw = td == wd[:, None]
            wi = tl.max(tl.where(atw, ti, -1), axis=1)
            wpos = tl.min(tl.where(atw & (ti == wi[:, None]), slot[None, :], KP), axis=1).to(tl.int64)
            p = tl.where(proc, p + 1, p)
        # lanes done with their cell: the ring's next cell, or after the whole ring the stopping test
        adv = active & ~proc
        if tl.max(adv.to(tl.int32), axis=0) > 0:
            rr = tl.maximum(r, 1)
            w = 2 * rr + 1
            if dim == 2:
                rsz = 8 * rr
                u = t
            else:   # the faces a2 = -r, +r ((2r+1)^2 cells each), then the 2r-1 square rings between
                rsz = 2 * w * w + (2 * rr - 1) * 8 * rr
                u = tl.maximum(t - 2 * w * w, 0) % (8 * rr)
            rsz = tl.where(r == 0, 1, rsz)
            load = adv & (t < rsz)
            side = u // (2 * rr)                # the u-th cell of the square ring, from (-r, -r)
            v = u % (2 * rr)
            a0 = tl.where(side == 0, -rr + v, tl.where(side == 1, rr, tl.where(side == 2, rr - v, -rr)))
            a1 = tl.where(side == 0, -rr, tl.where(side == 1, -rr + v, tl.where(side == 2, rr, rr - v)))
            if dim == 2:
                a2 = zl
            else:
                face = t < 2 * w * w
                fu = t % (w * w)
                a0 = tl.where(face, fu // w - rr, a0)
                a1 = tl.where(face, fu % w - rr, a1)
                a2 = tl.where(face, tl.where(t < w * w, -rr, rr), -rr + 1 + tl.maximum(t - 2 * w * w, 0) // (8 * rr))
            g0 = q0 + tl.where(r == 0, 0, a0)
            g1 = q1 + tl.where(r == 0, 0, a1)
            g2 = q2 + tl.where(r == 0, 0, a2)
            ing = load & (g0 >= 0) & (g0 < res0) & (g1 >= 0) & (g1 < res1) & (g2 >= 0) & (g2 < res2)
            cidx = (g0 * res1 + g1) * res2 + g2
            p = tl.where(adv, tl.load(cs_ptr + cidx, mask=ing, other=0), p)
            e = tl.where(adv, tl.load(cs_ptr + cidx + 1, mask=ing, other=0), e)
            t = tl.where(load, t + 1, t)
            ringdone = adv & ~load
            if tl.max(ringdone.to(tl.int32), axis=0) > 0:
                rc = r.to(tl.float64) * cell
                gap = tl.minimum(tl.minimum(tl.where(r <= upr0, up0 + rc, float("inf")),
                                            tl.where(r <= q0 - 1, dn0 + rc, float("inf"))),
                                 tl.minimum(tl.where(r <= upr1, up1 + rc, float("inf")),
                                            tl.where(r <= q1 - 1, dn1 + rc, float("inf"))))
                gap = tl.minimum(gap, tl.minimum(tl.where(r <= upr2, up2 + rc, float("inf")),
                                                 tl.where(r <= q2 - 1, dn2 + rc, float("inf")))) - margin
                far = (gap > 0) & (gap * gap * (1.0 - 2.0 ** -18) > wd.to(tl.float64))
                stop = ringdone & ((r >= cover) | far)
                active = active & ~stop
                nxt = ringdone & ~stop
                r = tl.where(nxt, r + 1, r)
                t = tl.where(nxt, 0, t)
    # sort the k kept by (dist2, index): k selections of the smallest remaining
    taken = tl.zeros((BLOCK_N, KP), tl.int1) | ~sval[None, :]
    for j in range(k):
        md = tl.min(tl.where(taken, float("inf"), td), axis=1)
        atm = ~taken & (td == md[:, None])
        mi = tl.min(tl.where(atm, ti, big), axis=1)
        pos = tl.min(tl.where(atm & (ti == mi[:, None]), slot[None, :], KP), axis=1)
        taken = taken | (slot[None, :] == pos[:, None])
        oi = tl.where(nanrow | (mi >= big), -1, mi)
        od = tl.where(nanrow, float("nan"), md)
        tl.store(idx_ptr + rows * k + j, oi, mask=rmask)
        tl.store(dist_ptr + rows * k + j, od.to(DT), mask=rmask)


# ----------------------------------------------------------------------------------------------------
# Field evaluation
# ----------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["dim", "k", "kernel", "full", "normalize", "has_om"])
def _fwd_kernel(x_ptr, ldx, n, dim, c_ptr, s_ptr, w_ptr, ldw, C, om_ptr, has_om, idx_ptr, k, m,
                kernel, full, normalize, out_ptr, ldo, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    nct = tl.cdiv(C, BLOCK_C)
    rows = (pid // nct) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = (pid % nct) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < n
    cmask = cols < C
    x0, x1, x2 = _load_x(x_ptr, rows, rmask, ldx, dim)
    DT = x0.dtype
    finite = _finite(x0) & _finite(x1) & _finite(x2)
    ssum = tl.zeros((BLOCK_N,), DT)
    if normalize != 0:
        for j in range(k):
            i = tl.load(idx_ptr + rows * k + j, mask=rmask, other=-1)
            valid = rmask & (i >= 0) & (i < m)
            ssum += _phi(x0, x1, x2, c_ptr, s_ptr, i, valid, dim, kernel, full)
    den = ssum + _EPS
    om = tl.load(om_ptr + cols, mask=cmask & ((tl.zeros(cols.shape, tl.int32) + has_om) != 0), other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_C), DT)
    for j in range(k):
        i = tl.load(idx_ptr + rows * k + j, mask=rmask, other=-1)
        valid = rmask & (i >= 0) & (i < m)
        ph = _phi(x0, x1, x2, c_ptr, s_ptr, i, valid, dim, kernel, full)
        if normalize != 0:
            ph = _div(ph, den)
        w = tl.load(w_ptr + i[:, None] * ldw + cols[None, :], mask=valid[:, None] & cmask[None, :],
                    other=0.0).to(DT)
        if has_om != 0:
            acc += w * tl.sin(om[None, :] * ph[:, None])
        else:
            acc += w * ph[:, None]
    acc = tl.where(finite[:, None], acc, float("nan"))
    tl.store(out_ptr + rows[:, None] * ldo + cols[None, :], _round_to(acc, out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit(do_not_specialize=["dim", "k", "kernel", "full", "normalize", "has_om", "need_dx", "need_dc",
                               "need_ds", "need_dw", "need_dom"])
def _bwd_kernel(x_ptr, ldx, n, dim, c_ptr, s_ptr, w_ptr, ldw, C, om_ptr, has_om, idx_ptr, k, m,
                kernel, full, normalize, g_ptr, ldg, dx_ptr, dc_ptr, ds_ptr, dw_ptr, dom_ptr,
                need_dx, need_dc, need_ds, need_dw, need_dom,
                BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, KP: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n
    x0, x1, x2 = _load_x(x_ptr, rows, rmask, ldx, dim)
    DT = x0.dtype
    act = rmask & _finite(x0) & _finite(x1) & _finite(x2)     # rows with a non-finite x contribute nothing
    slot = tl.arange(0, KP)
    # pass 1: phi of every slot (the tile), the normalization's denominator
    PH = tl.zeros((BLOCK_N, KP), DT)
    for j in range(k):
        i = tl.load(idx_ptr + rows * k + j, mask=rmask, other=-1)
        valid = act & (i >= 0) & (i < m)
        ph = _phi(x0, x1, x2, c_ptr, s_ptr, i, valid, dim, kernel, full)
        PH = tl.where(slot[None, :] == j, ph[:, None], PH)
    den = tl.sum(PH, axis=1) + _EPS
    if normalize != 0:
        PH = _div(PH, den[:, None])            # phih
    # pass 2, over channel tiles: dweights, domegas, dphih
    geo = (need_dx != 0) | (need_dc != 0) | (need_ds != 0)
    DPH = tl.zeros((BLOCK_N, KP), DT)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        g = tl.load(g_ptr + rows[:, None] * ldg + cols[None, :], mask=act[:, None] & cmask[None, :],
                    other=0.0).to(DT)
        om = tl.load(om_ptr + cols, mask=cmask & ((tl.zeros(cols.shape, tl.int32) + has_om) != 0), other=0.0)
        dom = tl.zeros((BLOCK_C,), DT)
        for j in range(k):
            i = tl.load(idx_ptr + rows * k + j, mask=rmask, other=-1)
            valid = act & (i >= 0) & (i < m)
            ph = _col(PH, slot, j)
            vm = valid[:, None] & cmask[None, :]
            w = tl.load(w_ptr + i[:, None] * ldw + cols[None, :], mask=vm, other=0.0).to(DT)
            if has_om != 0:
                tt = om[None, :] * ph[:, None]
                b = tl.sin(tt)
                gwc = g * w * tl.cos(tt)
                if need_dom != 0:
                    dom += tl.sum(gwc * ph[:, None], axis=0)
                if geo:
                    dph = tl.sum(gwc * om[None, :], axis=1)
                    DPH = tl.where(slot[None, :] == j, DPH + dph[:, None], DPH)
            else:
                b = tl.zeros((BLOCK_N, BLOCK_C), DT) + ph[:, None]
                if geo:
                    dph = tl.sum(g * w, axis=1)
                    DPH = tl.where(slot[None, :] == j, DPH + dph[:, None], DPH)
            if need_dw != 0:
                tl.atomic_add(dw_ptr + i[:, None] * C + cols[None, :], g * b, mask=vm, sem="relaxed")
        if need_dom != 0:
            tl.atomic_add(dom_ptr + cols, dom, mask=cmask, sem="relaxed")
    # pass 3, per slot: the chain through the normalization and the kernel
    if geo:
        tsum = tl.sum(DPH * PH, axis=1)        # sum_i dphih_i phih_i (normalize 2)
        gx0 = tl.zeros((BLOCK_N,), DT)
        gx1 = tl.zeros((BLOCK_N,), DT)
        gx2 = tl.zeros((BLOCK_N,), DT)
        for j in range(k):
            i = tl.load(idx_ptr + rows * k + j, mask=rmask, other=-1)
            valid = act & (i >= 0) & (i < m)
            dph = _col(DPH, slot, j)
            if normalize == 1:
                dphi = _div(dph, den)
            elif normalize == 2:
                dphi = _div(dph - tsum, den)
            else:
                dphi = dph
            dphi = tl.where(valid, dphi, 0.0)
            c0_, c1_, c2_ = _gather3(c_ptr, i * dim, valid, dim)
            o0 = x0 - c0_
            o1 = x1 - c1_
            o2 = x2 - c2_
            if kernel == 2:
                s0, s1, s2 = _gather3(s_ptr, i * dim, valid, dim)
                r0 = 1.0 - tl.abs(o0) * s0
                r1 = 1.0 - tl.abs(o1) * s1
                r2 = 1.0 - tl.abs(o2) * s2
                h0 = tl.minimum(tl.maximum(r0, 0.0), 1.0)
                h1 = tl.minimum(tl.maximum(r1, 0.0), 1.0)
                h2 = tl.minimum(tl.maximum(r2, 0.0), 1.0)
                e0 = tl.where((r0 >= 0.0) & (r0 <= 1.0), dphi * (h1 * h2), 0.0)   # d/d(raw h_d)
                e1 = tl.where((r1 >= 0.0) & (r1 <= 1.0), dphi * (h0 * h2), 0.0)
                e2 = tl.where((r2 >= 0.0) & (r2 <= 1.0), dphi * (h0 * h1), 0.0)
                do0 = -(s0 * e0) * tl.where(o0 > 0, 1.0, tl.where(o0 < 0, -1.0, 0.0))
                do1 = -(s1 * e1) * tl.where(o1 > 0, 1.0, tl.where(o1 < 0, -1.0, 0.0))
                do2 = -(s2 * e2) * tl.where(o2 > 0, 1.0, tl.where(o2 < 0, -1.0, 0.0))
                if need_ds != 0:
                    sb = i * dim
                    tl.atomic_add(ds_ptr + sb, -tl.abs(o0) * e0, mask=valid, sem="relaxed")
                    tl.atomic_add(ds_ptr + sb + 1, -tl.abs(o1) * e1, mask=valid, sem="relaxed")
                    tl.atomic_add(ds_ptr + sb + 2, -tl.abs(o2) * e2, mask=_and3(valid, dim), sem="relaxed")
            else:
                if full:
                    a00, a01, a02, a10, a11, a12, a20, a21, a22 = _shape_full(s_ptr, i, valid, dim)
                    q = (o0 * (a00 * o0 + a01 * o1 + a02 * o2) + o1 * (a10 * o0 + a11 * o1 + a12 * o2)
                         + o2 * (a20 * o0 + a21 * o1 + a22 * o2))
                    dq = _dq(q, dphi, kernel)
                    do0 = dq * ((a00 + a00) * o0 + (a01 + a10) * o1 + (a02 + a20) * o2)
                    do1 = dq * ((a10 + a01) * o0 + (a11 + a11) * o1 + (a12 + a21) * o2)
                    do2 = dq * ((a20 + a02) * o0 + (a21 + a12) * o1 + (a22 + a22) * o2)
                    if need_ds != 0:
                        sb = i * dim * dim
                        m3 = _and3(valid, dim)
                        tl.atomic_add(ds_ptr + sb, dq * o0 * o0, mask=valid, sem="relaxed")
                        tl.atomic_add(ds_ptr + sb + 1, dq * o0 * o1, mask=valid, sem="relaxed")
                        tl.atomic_add(ds_ptr + sb + dim, dq * o1 * o0, mask=valid, sem="relaxed")
                        tl.atomic_add(ds_ptr + sb + dim + 1, dq * o1 * o1, mask=valid, sem="relaxed")
                        tl.atomic_add(ds_ptr + sb + 2, dq * o0 * o2, mask=m3, sem="relaxed")
                        tl.atomic_add(ds_ptr + sb + dim + 2, dq * o1 * o2, mask=m3, sem="relaxed")
                        tl.atomic_add(ds_ptr + sb + 2 * dim, dq * o2 * o0, mask=m3, sem="relaxed")
                        tl.atomic_add(ds_ptr + sb + 2 * dim + 1, dq * o2 * o1, mask=m3, sem="relaxed")
                        tl.atomic_add(ds_ptr + sb + 2 * dim + 2, dq * o2 * o2, mask=m3, sem="relaxed")
                else:
                    s0, s1, s2 = _gather3(s_ptr, i * dim, valid, dim)
                    q = s0 * o0 * o0 + s1 * o1 * o1 + s2 * o2 * o2
                    dq = _dq(q, dphi, kernel)
                    do0 = 2.0 * dq * s0 * o0
                    do1 = 2.0 * dq * s1 * o1
                    do2 = 2.0 * dq * s2 * o2
                    if need_ds != 0:
                        sb = i * dim
                        tl.atomic_add(ds_ptr + sb, dq * o0 * o0, mask=valid, sem="relaxed")
                        tl.atomic_add(ds_ptr + sb + 1, dq * o1 * o1, mask=valid, sem="relaxed")
                        tl.atomic_add(ds_ptr + sb + 2, dq * o2 * o2, mask=_and3(valid, dim), sem="relaxed")
            gx0 += tl.where(valid, do0, 0.0)
            gx1 += tl.where(valid, do1, 0.0)
            gx2 += tl.where(valid, do2, 0.0)
            if need_dc != 0:
                cb = i * dim
                tl.atomic_add(dc_ptr + cb, -do0, mask=valid, sem="relaxed")
                tl.atomic_add(dc_ptr + cb + 1, -do1, mask=valid, sem="relaxed")
                tl.atomic_add(dc_ptr + cb + 2, -do2, mask=_and3(valid, dim), sem="relaxed")
        if need_dx != 0:   # a non-finite x: NaN (as autograd's 0 * NaN through the kernel)
            bad = rmask & ~act
            gx0 = tl.where(bad, float("nan"), gx0)
            gx1 = tl.where(bad, float("nan"), gx1)
            gx2 = tl.where(bad, float("nan"), gx2)
            tl.store(dx_ptr + rows * dim, gx0, mask=rmask)
            tl.store(dx_ptr + rows * dim + 1, gx1, mask=rmask)
            tl.store(dx_ptr + rows * dim + 2, gx2, mask=_and3(rmask, dim))


# ----------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------
def grid_cells_max(m: int) -> int:
    """The most cells a grid over m centres may use (reference.grid_cells_max)."""
    return max(1, min(1 << 24, m // 2))


def grid_layout(dtype: torch.dtype, dim: int, m: int) -> tuple[int, int, int, int, int]:
    """(cells_max, cell_start_off, order_off, coords_off, bytes), as kk_rbf_grid_layout (reference.grid_layout)."""
    cm = grid_cells_max(m)
    cs = HEADER_BYTES
    order = cs + 8 * (cm + 1)
    coords = order + 8 * m
    esize = 4 if dtype == torch.float32 else 8
    return cm, cs, order, coords, coords + ((esize * m * dim + 7) // 8) * 8


def grid_geometry(lo: list, hi: list, m: int) -> tuple[float, list]:
    """(cell, res): the rule of reference.grid_geometry (rbf.h), on the host: positive extents share the
    cell budget, a zero extent gets one cell, the cell grows by 1/16 until the product fits."""
    cm = grid_cells_max(m)
    ext = [float(h) - float(l) for l, h in zip(lo, hi)]
    pos = [e for e in ext if e > 0.0]
    if not pos:
        return 1.0, [1] * len(lo)
    cell = (math.prod(pos) / cm) ** (1.0 / len(pos))
    while True:
        res = [min(cm, max(1, math.ceil(e / cell))) if e > 0.0 else 1 for e in ext]
        if math.prod(res) <= cm:
            return cell, res
        cell *= 1.0625


def _device_ctx(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _grid1(count: int) -> tuple:
    assert 0 < count <= _PROGRAMS_MAX, "rbf: too many programs for one launch"
    return (int(count),)


def _ld(t: torch.Tensor, width: int) -> int:
    # row stride of a (rows, width) matrix with unit inner stride (any value >= width with <= 1 row)
    return t.stride(0) if t.shape[0] > 1 else max(width, 1)


def _is_meta(t: torch.Tensor) -> bool:
    return t.device.type == "meta"


def _views(grid: torch.Tensor, dtype: torch.dtype, dim: int, m: int):
    """(header int64[32 incl. geom bits], geom float64[32], cell_start, order, coords) views of the buffer."""
    cm, cs_off, order_off, coords_off, _ = grid_layout(dtype, dim, m)
    esize = 4 if dtype == torch.float32 else 8
    hdr = grid[:HEADER_BYTES].view(torch.int64)
    geom = grid[:HEADER_BYTES].view(torch.float64)[16:]
    cs = grid[cs_off:order_off].view(torch.int64)
    order = grid[order_off:coords_off].view(torch.int64)
    coords = grid[coords_off:coords_off + esize * m * dim].view(dtype)
    return hdr, geom, cs, order, coords


def rbf_grid_build(centers: torch.Tensor) -> torch.Tensor:
    """The grid buffer (uint8, rbf.h's layout) over centers (M, D) float32 / float64 (rows with unit inner
    stride).  One host sync: the bounding box and the count of non-finite centres, for the geometry.
    A non-finite centre sets header flag 1 (as the CUDA build; every search then returns -1 / NaN)."""
    m, dim = centers.shape
    dtype, dev = centers.dtype, centers.device
    cm, _, _, _, total = grid_layout(dtype, dim, m)
    buf = torch.zeros(total, dtype=torch.uint8, device=dev)
    hdr, geom, cs, order, coords = _views(buf, dtype, dim, m)
    ldc = _ld(centers, dim)
    flags = 0
    lo, hi = [0.0] * dim, [0.0] * dim
    if m:
        bblock, bwarps = _bbox_cfg(dtype)
        nprog = triton.cdiv(m, bblock)
        plo = torch.empty(nprog, 3, dtype=dtype, device=dev)
        phi = torch.empty(nprog, 3, dtype=dtype, device=dev)
        pbad = torch.empty(nprog, dtype=torch.int32, device=dev)
        with _device_ctx(dev):
            _bbox_kernel[_grid1(nprog)](centers, ldc, m, dim, plo, phi, pbad, BLOCK=bblock, num_warps=bwarps)
        if _is_meta(centers):   # aot_sweep: any box (the sizes, not the values, pick the kernels)
            lo, hi = [0.0] * dim, [1.0] * dim
        else:
            box = torch.cat([plo.amin(0)[:dim].double(), phi.amax(0)[:dim].double(), pbad.sum().double()[None]])
            box = box.tolist()
            flags = 1 if box[-1] else 0
            if not flags:
                lo, hi = box[:dim], box[dim:2 * dim]
    cell, res = grid_geometry(lo, hi, m if not flags else 0)
    res3 = list(res) + [1] * (3 - dim)
    h = torch.zeros(16, dtype=torch.int64)
    h[:9] = torch.tensor([dim, m, math.prod(res), *res3, _KK_DTYPE[dtype], cm, flags], dtype=torch.int64)
    g = torch.zeros(16, dtype=torch.float64)
    g[:4] = torch.tensor(list(lo) + [0.0] * (3 - dim) + [cell], dtype=torch.float64)
    hdr[:16].copy_(h)
    geom.copy_(g)
    if m == 0 or flags:
        return buf
    lo3 = list(lo) + [0.0] * (3 - dim)
    cid = torch.empty(m, dtype=torch.int64, device=dev)
    counts = torch.zeros(cm, dtype=torch.int32, device=dev)
    nprog = triton.cdiv(m, _CELL_BLOCK)
    with _device_ctx(dev):
        _cellid_kernel[_grid1(nprog)](centers, ldc, m, dim, res3[0], res3[1], res3[2], float(lo3[0]),
                                      float(lo3[1]), float(lo3[2]), float(cell), cid, counts,
                                      BLOCK=_CELL_BLOCK, num_warps=4)
        torch.cumsum(counts, 0, dtype=torch.int64, out=cs[1:])   # cs[0] = 0 (zeroed buffer)
        counts.zero_()                                           # now the per-cell cursors
        _scatter_kernel[_grid1(nprog)](centers, ldc, m, dim, cid, cs, counts, order, coords,
                                       BLOCK=_CELL_BLOCK, num_warps=4)
    return buf


def _kp(k: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(max(k, 1)))


def rbf_knn(x: torch.Tensor, grid: torch.Tensor, m: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx int64 (N, k), dist2 (N, k) in x's dtype): the k nearest centres of the grid, sorted by
    (dist2, index); k > m pads with -1 / +inf; a non-finite query (or a flagged grid) gets -1 / NaN."""
    n, dim = x.shape
    idx = torch.empty(n, k, dtype=torch.int64, device=x.device)
    dist2 = torch.empty(n, k, dtype=x.dtype, device=x.device)
    if n == 0 or k == 0:
        return idx, dist2
    assert k <= 32, "rbf_knn: k <= 32"
    hdr, geom, cs, order, coords = _views(grid, x.dtype, dim, m)
    if m == 0:   # no centre to gather: still launched (the kernel writes -1 / +inf, NaN for bad rows)
        order = hdr
        coords = torch.zeros(1, dtype=x.dtype, device=x.device) if not _is_meta(x) else coords
    kp = _kp(k, 4)
    bn, warps = _knn_cfg(x.dtype, kp)
    with _device_ctx(x.device):
        _knn_kernel[_grid1(triton.cdiv(n, bn))](
            x, _ld(x, dim), n, dim, hdr, geom, cs, order, coords, m, k, idx, dist2,
            BLOCK_N=bn, KP=kp, num_warps=warps, enable_fp_fusion=False)
    return idx, dist2


def _feature_common(x, centers, shapes, weights, omegas, idx):
    n, dim = x.shape
    m = centers.shape[0]
    C = weights.shape[1]
    k = idx.shape[1]
    om = omegas if omegas is not None else x.new_empty(1)
    return n, dim, m, C, k, om, _ld(x, dim), _ld(weights, C)


def rbf_features_fwd(x, centers, shapes, weights, omegas, idx, kernel: int, normalize: int) -> torch.Tensor:
    """out (N, C) in the weights' dtype (rbf.h's field evaluation; kernel 0 ivq, 1 gauss, 2 nlin)."""
    n, dim, m, C, k, om, ldx, ldw = _feature_common(x, centers, shapes, weights, omegas, idx)
    out = torch.empty(n, C, dtype=weights.dtype, device=x.device)
    if n == 0 or C == 0:
        return out
    bn, bc, warps = _fwd_cfg(x.dtype, weights.dtype)
    nprog = triton.cdiv(n, bn) * triton.cdiv(C, bc)
    with _device_ctx(x.device):
        _fwd_kernel[_grid1(nprog)](x, ldx, n, dim, centers, shapes, weights, ldw, C, om, int(omegas is not None),
                                   idx, k, m, int(kernel), int(shapes.dim() == 3), int(normalize), out, C,
                                   BLOCK_N=bn, BLOCK_C=bc, num_warps=warps)
    return out


def rbf_features_bwd(grad_out, x, centers, shapes, weights, omegas, idx, kernel: int, normalize: int, needs):
    """(dx, dcenters, dshapes, dweights, domegas), None where needs (5 bools) is False (domegas also when
    omegas is None); every one in the coordinate dtype (dweights too)."""
    n, dim, m, C, k, om, ldx, ldw = _feature_common(x, centers, shapes, weights, omegas, idx)
    needs = tuple(bool(v) for v in needs)
    needs = needs[:4] + (needs[4] and omegas is not None,)
    like = (x, centers, shapes, weights, om)
    outs = [torch.zeros(t.shape, dtype=x.dtype, device=x.device) if need else None for t, need in zip(like, needs)]
    if n == 0 or not any(needs):
        return tuple(outs)
    dummy = x.new_empty(1)
    ptrs = [o if o is not None else dummy for o in outs]
    ldg = _ld(grad_out, C)
    kp = _kp(k, 8)
    bn, bc, warps = _bwd_cfg(x.dtype, weights.dtype, kp)
    with _device_ctx(x.device):
        _bwd_kernel[_grid1(triton.cdiv(n, bn))](
            x, ldx, n, dim, centers, shapes, weights, ldw, C, om, int(omegas is not None), idx, k, m,
            int(kernel), int(shapes.dim() == 3), int(normalize), grad_out, ldg, *ptrs, *(int(v) for v in needs),
            BLOCK_N=bn, BLOCK_C=bc, KP=kp, num_warps=warps)
    return tuple(outs)


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time sweep
# ----------------------------------------------------------------------------------------------------
# (coordinate dtype, weights dtype) pairs the launchers accept
AOT_DTYPES = ((torch.float32, torch.float32), (torch.float32, torch.float16), (torch.float32, torch.bfloat16),
              (torch.float64, torch.float64))
_AOT_N, _AOT_M, _AOT_C = 1 << 16, 4096, 32


def aot_sweep() -> int:
    """Drive every launcher on meta tensors (nothing is allocated or run): the grid build and the search
    for both coordinate dtypes (D = 2 and 3 share the kernels), the search at every KP (k = 4, 8, 16, 32),
    the features forward / backward for every (coordinate, weights) dtype pair, with both KP of the
    backward (k = 8, 32); kernel, shape form, normalization, omegas and the needed gradients are runtime
    arguments, so varying them adds no variant.  Returns the number of points driven."""
    if _INTERPRET:
        raise RuntimeError("aot_sweep: TRITON_INTERPRET=1 selects the interpreter, not the GPU's compiler")
    meta = dict(device="meta")
    N, M, C = _AOT_N, _AOT_M, _AOT_C
    points = 0
    for cdt in (torch.float32, torch.float64):
        for dim in (2, 3):
            centers = torch.empty(M, dim, dtype=cdt, **meta)
            grid = rbf_grid_build(centers)
            x = torch.empty(N, dim, dtype=cdt, **meta)
            for k in (4, 8, 16, 32):
                rbf_knn(x, grid, M, k)
                points += 1
            points += 1
    for cdt, wdt in AOT_DTYPES:
        for dim, full in ((2, True), (3, False)):
            x = torch.empty(N, dim, dtype=cdt, **meta)
            centers = torch.empty(M, dim, dtype=cdt, **meta)
            shapes = torch.empty((M, dim, dim) if full else (M, dim), dtype=cdt, **meta)
            weights = torch.empty(M, C, dtype=wdt, **meta)
            omegas = torch.empty(C, dtype=cdt, **meta)
            for k in (8, 32):
                idx = torch.empty(N, k, dtype=torch.int64, **meta)
                rbf_features_fwd(x, centers, shapes, weights, omegas, idx, 0, 1)
                g = torch.empty(N, C, dtype=wdt, **meta)
                rbf_features_bwd(g, x, centers, shapes, weights, omegas, idx, 0, 1, (True,) * 5)
                points += 2
    return points


__all__ = ["rbf_grid_build", "rbf_knn", "rbf_features_fwd", "rbf_features_bwd", "aot_sweep",
           "grid_layout", "grid_geometry"]
