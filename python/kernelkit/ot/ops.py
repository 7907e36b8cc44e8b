"""Entropic optimal transport kernels as torch.library custom ops (fake + autograd registered), backend dispatch.

Every op takes the cost as (matrix, x, y, kind, p): a dense cost ``matrix`` (B, n, m) (inner stride 1,
any batch stride, 0 included) or two point clouds ``x`` (B, n, D), ``y`` (B, m, D) with the cost computed
on the fly (``kind`` 1 squared Euclidean, 2 Euclidean distance to the power p, 3 the p-th power of the
p-norm; csrc/include/kernelkit/ot.h).  Potentials are in cost units: P_ij = exp((f_i + g_j - C_ij) / reg).

    kernelkit::ot_sinkhorn_step(..., axis, reg, w, other, pot, err_norm, backend) -> (pot_new, err)
    kernelkit::ot_marginals(..., reg, f, g, a, b, wr, wc, want_r, want_c, want_obj, backend) -> (r, c, obj)
    kernelkit::ot_plan(..., reg, f, g, backend) -> P (B, n, m)
    kernelkit::ot_sparsify(..., reg, f, g, k, backend) -> (cols int32 (B, n, k), vals (B, n, k))
    kernelkit::ot_hvp(cols, vals, r, c, vx, vy, shift, backend) -> (yx, yy)
    kernelkit::ot_cg(cols, vals, r, c, rhs_x, rhs_y, zx0, zy0, shift, tol, max_iter, backend)
        -> (zx, zy, iters int32 (B,), resid (B,))
    kernelkit::ot_points_grad(x, y, kind, p, reg, f, g, scale, u, v, backend) -> (dx, dy)

Autograd: every floating input gets its exact gradient (the step's LSE, the marginals' and the plan's
exp, the sparsified values, the linear hvp, CG as the solve H^-1 rhs), built from the same ops, so the
gradients run on every backend.  The envelope-theorem gradient of the regularized cost is the
marginals op's gradient of ``obj`` at converged, detached potentials (kernelkit.ot.solvers).  The
second derivatives of ``ot_points_grad`` (the cost's Hessian) go through the torch reference and take
O(B n m D) memory.  Integer outputs, the step's ``err`` and CG's ``iters`` / ``resid`` are not
differentiable.

The user-facing functions below (:class:`Cost`, :func:`sinkhorn_step`, ...) validate their arguments
(naming them) and pick the backend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _lib

from . import reference as R

_stream = _lib.stream

_KK_DTYPE = {torch.float32: 0, torch.float64: 1}
_SUPPORTED = {
    "torch": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "cpu": (torch.float32, torch.float64),
    "triton": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64),
}
KINDS = R.KINDS
NORMS = {"inf": R.NORM_INF, "l1": R.NORM_L1, "l2": R.NORM_L2, 0: R.NORM_INF, 1: R.NORM_L1, 2: R.NORM_L2}
MAX_DIM = 1024
MAX_KEEP = 4096


def _supports(dtype: torch.dtype):
    def check(name: str) -> str | None:
        ok = _SUPPORTED[name]
        if dtype in ok:
            return None
        return f"dtype {dtype} not supported (it handles {', '.join(str(d).replace('torch.', '') for d in ok)})"
    return check


def _triton():
    from kernelkit.kernels import ot as tk  # imported lazily: triton is optional
    return tk


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


SERIAL_WORK = 1 << 15  # below this many plan entries a CPU call runs on one thread (no OpenMP team)


def _nt(work: int = SERIAL_WORK) -> int:
    """Threads for a CPU call over ``work`` plan entries: one for small problems, whose OpenMP fork/join
    (and, on a loaded machine, its spin-waiting barriers: 18 ms instead of 0.3 ms per call measured with
    two threads on two busy cores) costs more than the work."""
    return 1 if work < SERIAL_WORK else torch.get_num_threads()


def _cost_tuple(matrix: Optional[Tensor], x: Optional[Tensor], y: Optional[Tensor], kind: int, p: float) -> tuple:
    if kind == R.MATRIX:
        if matrix.numel() == 0:  # an empty tensor's strides are arbitrary (a transposed empty is "contiguous")
            return (kind, 0, float(p), 0, max(matrix.shape[2], 1), 0, 0, 0, 0, 0)
        return (kind, 0, float(p), _ptr(matrix), matrix.stride(1) if matrix.dim() == 3 and matrix.shape[1] > 1
                else max(matrix.shape[2], 1), matrix.stride(0), 0, 0, 0, 0)
    D = x.shape[2]
    return (kind, D, float(p), 0, 0, 0, _ptr(x), x.stride(0), _ptr(y), y.stride(0))


def _dims(matrix, x, y):
    if matrix is not None:
        return matrix.shape
    return x.shape[0], x.shape[1], y.shape[1]


def _cost_dense(matrix, x, y, kind, p) -> Tensor:
    return matrix if kind == R.MATRIX else R.point_cost(kind, p, x, y)


# ---- kernelkit::ot_sinkhorn_step ----------------------------------------------------------------------
@torch.library.custom_op("kernelkit::ot_sinkhorn_step", mutates_args=())
def ot_sinkhorn_step(matrix: Optional[Tensor], x: Optional[Tensor], y: Optional[Tensor], kind: int, p: float,
                     axis: int, reg: float, w: Tensor, other: Tensor, pot: Optional[Tensor], err_norm: int,
                     backend: str) -> tuple[Tensor, Tensor]:
    B, n, m = _dims(matrix, x, y)
    w, other, pot = [None if t is None else t.contiguous() for t in (w, other, pot)]
    if backend == "torch":
        C = _cost_dense(matrix, x, y, kind, p)
        pot_new, err = R.sinkhorn_step_reference(C, axis, reg, w, other, pot, err_norm)
        return pot_new.contiguous(), (err if err is not None else w.new_empty(0))
    if backend == "triton":
        pot_new, err = _triton().sinkhorn_step(kind, p, matrix, x, y, axis, reg, w, other, pot, err_norm)
        return pot_new, (err if err is not None else w.new_empty(0))
    pot_new = torch.empty_like(w)
    err = w.new_empty(B) if pot is not None else w.new_empty(0)
    args = (_KK_DTYPE[w.dtype], _cost_tuple(matrix, x, y, kind, p), B, n, m, axis, float(reg), _ptr(w), _ptr(other),
            _ptr(pot), _ptr(pot_new), _ptr(err), err_norm)
    if backend == "cpu":
        _lib.C().ot_sinkhorn_step_cpu(*args, _nt(B * n * m))
    elif backend == "cuda":
        with torch.cuda.device(w.device):
            _lib.C().ot_sinkhorn_step_cuda(*args, _stream(w))
    else:
        raise ValueError(f"kernelkit::ot_sinkhorn_step: unknown backend {backend!r}")
    return pot_new, err


@ot_sinkhorn_step.register_fake
def _(matrix, x, y, kind, p, axis, reg, w, other, pot, err_norm, backend):
    return torch.empty_like(w), (w.new_empty(w.shape[0]) if pot is not None else w.new_empty(0))


def _step_setup(ctx, inputs, output):
    matrix, x, y, kind, p, axis, reg, w, other, pot, err_norm, backend = inputs
    pot_new, err = output
    ctx.mark_non_differentiable(err)
    ctx.save_for_backward(matrix, x, y, w, other, pot_new)
    ctx.kind, ctx.p, ctx.axis, ctx.reg, ctx.backend = kind, p, axis, reg, backend


def _zero_where(mask: Tensor, t: Tensor) -> Tensor:
    return torch.where(mask, torch.zeros_like(t), t)


def _step_backward(ctx, gpot, gerr):
    matrix, x, y, w, other, pot_new = ctx.saved_tensors
    kind, p, axis, reg, be = ctx.kind, ctx.p, ctx.axis, ctx.reg, ctx.backend
    need = ctx.needs_input_grad
    if gpot is None:
        return (None,) * 12
    # pot_new_k = reg log w_k - reg LSE(...): the softmax weights are P(pot_new, other) / w_k.
    zero_w = w <= 0
    u = _zero_where(zero_w, gpot / torch.where(zero_w, torch.ones_like(w), w))
    f, g = (pot_new, other) if axis == 0 else (other, pot_new)
    pot_fin = torch.where(zero_w, torch.zeros_like(pot_new), pot_new)  # -inf rows carry no mass
    f, g = (pot_fin, g) if axis == 0 else (f, pot_fin)
    gm = gx = gy = gw = gother = None
    if need[8]:
        if axis == 0:
            _, c, _ = torch.ops.kernelkit.ot_marginals(matrix, x, y, kind, p, reg, f, g, None, None, u, None,
                                                       False, True, False, be)
            gother = -c
        else:
            r, _, _ = torch.ops.kernelkit.ot_marginals(matrix, x, y, kind, p, reg, f, g, None, None, None, u,
                                                       True, False, False, be)
            gother = -r
    if need[7]:
        gw = _zero_where(zero_w, reg * u)
    if kind == R.MATRIX and need[0]:
        P = torch.ops.kernelkit.ot_plan(matrix, x, y, kind, p, reg, f, g, be)
        P = _zero_where(zero_w[:, :, None] if axis == 0 else zero_w[:, None, :], P)
        gm = P * (u[:, :, None] if axis == 0 else u[:, None, :])
    if kind != R.MATRIX and (need[1] or need[2]):
        zero = w.new_zeros(w.shape[0])
        uu, vv = (u, None) if axis == 0 else (None, u)
        gx, gy = torch.ops.kernelkit.ot_points_grad(x, y, kind, p, reg, f, g, zero, uu, vv, be)
    return gm, gx, gy, None, None, None, None, gw, gother, None, None, None


ot_sinkhorn_step.register_autograd(_step_backward, setup_context=_step_setup)


# ---- kernelkit::ot_marginals --------------------------------------------------------------------------
@torch.library.custom_op("kernelkit::ot_marginals", mutates_args=())
def ot_marginals(matrix: Optional[Tensor], x: Optional[Tensor], y: Optional[Tensor], kind: int, p: float, reg: float,
                 f: Tensor, g: Tensor, a: Optional[Tensor], b: Optional[Tensor], wr: Optional[Tensor],
                 wc: Optional[Tensor], want_r: bool, want_c: bool, want_obj: bool,
                 backend: str) -> tuple[Tensor, Tensor, Tensor]:
    B, n, m = _dims(matrix, x, y)
    f, g, a, b, wr, wc = [None if t is None else t.contiguous() for t in (f, g, a, b, wr, wc)]
    empty = f.new_empty(0)
    if backend == "torch":
        C = _cost_dense(matrix, x, y, kind, p)
        r, c, obj = R.marginals_reference(C, reg, f, g, a if want_obj else None, b if want_obj else None, wr, wc)
        return (r.contiguous() if want_r else empty, c.contiguous() if want_c else empty.clone(),
                obj if want_obj else empty.clone())
    if backend == "triton":
        r, c, obj = _triton().marginals(kind, p, matrix, x, y, reg, f, g, a, b, wr, wc, want_r, want_c, want_obj)
        return (r if want_r else empty, c if want_c else empty.clone(), obj if want_obj else empty.clone())
    r = f.new_empty(B, n) if want_r else f.new_empty(0)
    c = f.new_empty(B, m) if want_c else f.new_empty(0)
    obj = f.new_empty(B) if want_obj else f.new_empty(0)
    args = (_KK_DTYPE[f.dtype], _cost_tuple(matrix, x, y, kind, p), B, n, m, float(reg), _ptr(f), _ptr(g),
            _ptr(a) if want_obj else 0, _ptr(b) if want_obj else 0, _ptr(wr), _ptr(wc),
            _ptr(r) if want_r else 0, _ptr(c) if want_c else 0, _ptr(obj) if want_obj else 0)
    if backend == "cpu":
        _lib.C().ot_marginals_cpu(*args, _nt(B * n * m))
    elif backend == "cuda":
        with torch.cuda.device(f.device):
            _lib.C().ot_marginals_cuda(*args, _stream(f))
    else:
        raise ValueError(f"kernelkit::ot_marginals: unknown backend {backend!r}")
    return r, c, obj


@ot_marginals.register_fake
def _(matrix, x, y, kind, p, reg, f, g, a, b, wr, wc, want_r, want_c, want_obj, backend):
    return (f.new_empty(f.shape) if want_r else f.new_empty(0), g.new_empty(g.shape) if want_c else f.new_empty(0),
            f.new_empty(f.shape[0]) if want_obj else f.new_empty(0))


def _marg_setup(ctx, inputs, output):
    matrix, x, y, kind, p, reg, f, g, a, b, wr, wc, want_r, want_c, want_obj, backend = inputs
    ctx.save_for_backward(matrix, x, y, f, g, a, b, wr, wc)
    ctx.kind, ctx.p, ctx.reg, ctx.backend = kind, p, reg, backend
    ctx.want = (want_r, want_c, want_obj)


def _fin(t: Tensor) -> Tensor:
    """t with -inf (a zero weight's potential) as 0: its gradient terms carry no mass."""
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


def _given(t) -> bool:
    return t is not None and t.numel() > 0


def _marg_backward(ctx, gr, gc, go):
    matrix, x, y, f, g, a, b, wr, wc = ctx.saved_tensors
    kind, p, reg, be = ctx.kind, ctx.p, ctx.reg, ctx.backend
    need = ctx.needs_input_grad
    want_r, want_c, want_obj = ctx.want
    B = f.shape[0]
    gr = gr if (want_r and _given(gr)) else None
    gc = gc if (want_c and _given(gc)) else None
    go = go if (want_obj and _given(go)) else None
    marg = torch.ops.kernelkit.ot_marginals
    # dL/dP_ij = gr_i wc_j + wr_i gc_j - reg go;  Q = P .* dL/dP;  dlogit = Q, logit = (f + g - C) / reg.
    ones_f, ones_g = torch.ones_like(f), torch.ones_like(g)
    wr_, wc_ = (wr if wr is not None else ones_f), (wc if wc is not None else ones_g)
    Pg = PTgr = None
    if gr is not None or gc is not None:
        Pg, PTgr, _ = marg(matrix, x, y, kind, p, reg, f, g, None, None, gr, gc, gc is not None, gr is not None,
                           False, be)
        Pg = Pg if gc is not None else None
        PTgr = PTgr if gr is not None else None
    Pw = PTw = P1 = PT1 = None
    if gr is not None or gc is not None:
        Pw, PTw, _ = marg(matrix, x, y, kind, p, reg, f, g, None, None, wr, wc, gr is not None, gc is not None, False,
                          be)
    if go is not None:
        P1, PT1, _ = marg(matrix, x, y, kind, p, reg, f, g, None, None, None, None, True, True, False, be)
    Qr = f.new_zeros(f.shape)  # sum_j Q_ij
    Qc = g.new_zeros(g.shape)  # sum_i Q_ij
    if gr is not None:
        Qr = Qr + gr * Pw
        Qc = Qc + PTgr * wc_
    if gc is not None:
        Qr = Qr + wr_ * Pg
        Qc = Qc + gc * PTw
    if go is not None:
        Qr = Qr - reg * go[:, None] * P1
        Qc = Qc - reg * go[:, None] * PT1
    gf = Qr / reg + (go[:, None] * a if go is not None and a is not None else 0) if need[6] else None
    gg = Qc / reg + (go[:, None] * b if go is not None and b is not None else 0) if need[7] else None
    ga = go[:, None] * _fin(f) if (need[8] and go is not None) else None
    gb = go[:, None] * _fin(g) if (need[9] and go is not None) else None
    gwr = gwc = None
    if need[10] and gc is not None:
        gwr = Pg
    if need[11] and gr is not None:
        gwc = PTgr
    gm = gx = gy = None
    if kind == R.MATRIX and need[0]:
        P = torch.ops.kernelkit.ot_plan(matrix, x, y, kind, p, reg, f, g, be)
        dP = P.new_zeros(P.shape)
        if gr is not None:
            dP = dP + gr[:, :, None] * wc_[:, None, :]
        if gc is not None:
            dP = dP + wr_[:, :, None] * gc[:, None, :]
        if go is not None:
            dP = dP - reg * go[:, None, None]
        gm = -(P * dP) / reg
    if kind != R.MATRIX and (need[1] or need[2]):
        # W = -Q / reg = P * (go - (gr_i wc_j + wr_i gc_j) / reg): separable (s + u_i + v_j) without weights.
        if (gr is None or wc is None) and (gc is None or wr is None):
            s = go if go is not None else f.new_zeros(B)
            u = -gr / reg if gr is not None else None
            v = -gc / reg if gc is not None else None
            gx, gy = torch.ops.kernelkit.ot_points_grad(x, y, kind, p, reg, f, g, s, u, v, be)
        else:
            C = R.point_cost(kind, p, x, y)
            P = R.plan_reference(C, reg, f, g)
            W = P * (go[:, None, None] if go is not None else 0)
            if gr is not None:
                W = W - P * gr[:, :, None] * wc_[:, None, :] / reg
            if gc is not None:
                W = W - P * wr_[:, :, None] * gc[:, None, :] / reg
            gx, gy = _points_vjp(kind, p, x, y, W)
    return (gm, gx, gy, None, None, None, gf, gg, ga, gb, gwr, gwc, None, None, None, None)


ot_marginals.register_autograd(_marg_backward, setup_context=_marg_setup)


# ---- kernelkit::ot_plan --------------------------------------------------------------------------------
@torch.library.custom_op("kernelkit::ot_plan", mutates_args=())
def ot_plan(matrix: Optional[Tensor], x: Optional[Tensor], y: Optional[Tensor], kind: int, p: float, reg: float,
            f: Tensor, g: Tensor, backend: str) -> Tensor:
    B, n, m = _dims(matrix, x, y)
    f, g = f.contiguous(), g.contiguous()
    if backend == "torch":
        return R.plan_reference(_cost_dense(matrix, x, y, kind, p), reg, f, g).contiguous()
    if backend == "triton":
        return _triton().plan(kind, p, matrix, x, y, reg, f, g)
    P = f.new_empty(B, n, m)
    args = (_KK_DTYPE[f.dtype], _cost_tuple(matrix, x, y, kind, p), B, n, m, float(reg), _ptr(f), _ptr(g), _ptr(P),
            max(m, 1))
    if backend == "cpu":
        _lib.C().ot_plan_cpu(*args, _nt(B * n * m))
    elif backend == "cuda":
        with torch.cuda.device(f.device):
            _lib.C().ot_plan_cuda(*args, _stream(f))
    else:
        raise ValueError(f"kernelkit::ot_plan: unknown backend {backend!r}")
    return P


@ot_plan.register_fake
def _(matrix, x, y, kind, p, reg, f, g, backend):
    return f.new_empty(f.shape[0], f.shape[1], g.shape[1])


def _plan_setup(ctx, inputs, output):
    matrix, x, y, kind, p, reg, f, g, backend = inputs
    ctx.save_for_backward(matrix, x, y, output)
    ctx.kind, ctx.p, ctx.reg = kind, p, reg


def _points_vjp(kind: int, p: float, x: Tensor, y: Tensor, W: Tensor):
    """(dx, dy) of sum_ij W_ij C(x_i, y_j) for a dense W (B, n, m)."""
    if kind == R.SQEUCLIDEAN:
        rw, cw = W.sum(2), W.sum(1)
        dx = 2 * (rw[:, :, None] * x - W @ y)
        dy = 2 * (cw[:, :, None] * y - W.transpose(1, 2) @ x)
        return dx, dy
    G = R.cost_grad_terms(kind, p, x, y)
    return (W[..., None] * G).sum(2), -(W[..., None] * G).sum(1)


def _plan_backward(ctx, gP):
    matrix, x, y, P = ctx.saved_tensors
    need = ctx.needs_input_grad
    Q = P * gP
    Q = torch.where(torch.isfinite(Q), Q, torch.zeros_like(Q))
    reg = ctx.reg
    gm = -Q / reg if (ctx.kind == R.MATRIX and need[0]) else None
    gx = gy = None
    if ctx.kind != R.MATRIX and (need[1] or need[2]):
        gx, gy = _points_vjp(ctx.kind, ctx.p, x, y, -Q / reg)
    gf = Q.sum(2) / reg if need[6] else None
    gg = Q.sum(1) / reg if need[7] else None
    return gm, gx, gy, None, None, None, gf, gg, None


ot_plan.register_autograd(_plan_backward, setup_context=_plan_setup)


# ---- kernelkit::ot_sparsify ----------------------------------------------------------------------------
@torch.library.custom_op("kernelkit::ot_sparsify", mutates_args=())
def ot_sparsify(matrix: Optional[Tensor], x: Optional[Tensor], y: Optional[Tensor], kind: int, p: float, reg: float,
                f: Tensor, g: Tensor, k: int, backend: str) -> tuple[Tensor, Tensor]:
    B, n, m = _dims(matrix, x, y)
    f, g = f.contiguous(), g.contiguous()
    if backend == "torch":
        cols, vals = R.sparsify_reference(_cost_dense(matrix, x, y, kind, p), reg, f, g, k)
        return cols.contiguous(), vals.contiguous()
    if backend == "triton":
        return _triton().sparsify(kind, p, matrix, x, y, reg, f, g, k)
    cols = torch.empty(B, n, k, dtype=torch.int32, device=f.device)
    vals = f.new_empty(B, n, k)
    args = (_KK_DTYPE[f.dtype], _cost_tuple(matrix, x, y, kind, p), B, n, m, k, float(reg), _ptr(f), _ptr(g),
            _ptr(cols), _ptr(vals))
    if backend == "cpu":
        _lib.C().ot_sparsify_cpu(*args, _nt(B * n * m))
    elif backend == "cuda":
        with torch.cuda.device(f.device):
            _lib.C().ot_sparsify_cuda(*args, _stream(f))
    else:
        raise ValueError(f"kernelkit::ot_sparsify: unknown backend {backend!r}")
    return cols, vals


@ot_sparsify.register_fake
def _(matrix, x, y, kind, p, reg, f, g, k, backend):
    B, n = f.shape
    return torch.empty(B, n, k, dtype=torch.int32, device=f.device), f.new_empty(B, n, k)


def _spars_setup(ctx, inputs, output):
    matrix, x, y, kind, p, reg, f, g, k, backend = inputs
    cols, vals = output
    ctx.mark_non_differentiable(cols)
    ctx.save_for_backward(matrix, x, y, cols, vals)
    ctx.kind, ctx.p, ctx.reg = kind, p, reg
    ctx.m = g.shape[1]


def _spars_backward(ctx, gcols, gvals):
    matrix, x, y, cols, vals = ctx.saved_tensors
    need = ctx.needs_input_grad
    reg, m = ctx.reg, ctx.m
    if gvals is None:
        return (None,) * 10
    Q = vals * gvals
    Q = torch.where(torch.isfinite(Q), Q, torch.zeros_like(Q))
    B, n, k = cols.shape
    idx = cols.long()
    gf = Q.sum(2) / reg if need[6] else None
    gg = None
    if need[7]:
        gg = Q.new_zeros(B, m).scatter_add_(1, idx.flatten(1), Q.flatten(1)) / reg
    gm = gx = gy = None
    if ctx.kind == R.MATRIX and need[0]:
        gm = Q.new_zeros(B, n, m).scatter_add_(2, idx, -Q / reg)
    if ctx.kind != R.MATRIX and (need[1] or need[2]):
        D = x.shape[2]
        yk = torch.gather(y[:, None, :, :].expand(B, n, m, D), 2, idx[..., None].expand(B, n, k, D))  # (B,n,k,D)
        G = R.cost_grad_terms(ctx.kind, ctx.p, x[:, :, None, :].expand(B, n, 1, D).reshape(B * n, 1, D),
                              yk.reshape(B * n, k, D)).reshape(B, n, k, D)
        W = (-Q / reg)[..., None] * G
        gx = W.sum(2)
        gy = Q.new_zeros(B, m, D).scatter_add_(1, idx.reshape(B, n * k)[..., None].expand(B, n * k, D),
                                               -W.reshape(B, n * k, D))
    return gm, gx, gy, None, None, None, gf, gg, None, None


ot_sparsify.register_autograd(_spars_backward, setup_context=_spars_setup)


# ---- kernelkit::ot_hvp ---------------------------------------------------------------------------------
@torch.library.custom_op("kernelkit::ot_hvp", mutates_args=())
def ot_hvp(cols: Tensor, vals: Tensor, r: Tensor, c: Tensor, vx: Tensor, vy: Tensor, shift: float,
           backend: str) -> tuple[Tensor, Tensor]:
    B, n, k = cols.shape
    cols, vals, r, c, vx, vy = [t.contiguous() for t in (cols, vals, r, c, vx, vy)]
    m = c.shape[1]
    if backend == "torch":
        yx, yy = R.hvp_reference(cols, vals, r, c, shift, vx, vy)
        return yx.contiguous(), yy.contiguous()
    if backend == "triton":
        return _triton().hvp(cols, vals, r, c, shift, vx, vy)
    yx, yy = torch.empty_like(vx), torch.empty_like(vy)
    args = (_KK_DTYPE[vals.dtype], B, n, m, k, _ptr(cols), _ptr(vals), _ptr(r), _ptr(c), float(shift), _ptr(vx),
            _ptr(vy), _ptr(yx), _ptr(yy))
    if backend == "cpu":
        _lib.C().ot_hvp_cpu(*args, _nt(B * n * k // 4))
    elif backend == "cuda":
        with torch.cuda.device(vals.device):
            _lib.C().ot_hvp_cuda(*args, _stream(vals))
    else:
        raise ValueError(f"kernelkit::ot_hvp: unknown backend {backend!r}")
    return yx, yy


@ot_hvp.register_fake
def _(cols, vals, r, c, vx, vy, shift, backend):
    return torch.empty_like(vx), torch.empty_like(vy)


def _hvp_setup(ctx, inputs, output):
    cols, vals, r, c, vx, vy, shift, backend = inputs
    ctx.save_for_backward(cols, vals, r, c, vx, vy)
    ctx.shift, ctx.backend = shift, backend


def _sym_grads(cols, vals, wx, wy, zx, zy, need_vals, need_r, need_c, sign=1.0):
    """Gradients of sign * <w, H z> with respect to H's entries: vals, r, c."""
    idx = cols.long()
    gvals = gr = gc = None
    if need_vals:
        gvals = sign * (wx[:, :, None] * torch.gather(zy[:, None, :].expand(-1, cols.shape[1], -1), 2, idx)
                        + zx[:, :, None] * torch.gather(wy[:, None, :].expand(-1, cols.shape[1], -1), 2, idx))
    if need_r:
        gr = sign * wx * zx
    if need_c:
        gc = sign * wy * zy
    return gvals, gr, gc


def _hvp_backward(ctx, gyx, gyy):
    cols, vals, r, c, vx, vy = ctx.saved_tensors
    need = ctx.needs_input_grad
    gyx = gyx if gyx is not None else torch.zeros_like(vx)
    gyy = gyy if gyy is not None else torch.zeros_like(vy)
    gvx = gvy = None
    if need[4] or need[5]:
        gvx, gvy = torch.ops.kernelkit.ot_hvp(cols, vals, r, c, gyx, gyy, ctx.shift, ctx.backend)
    gvals, gr, gc = _sym_grads(cols, vals, gyx, gyy, vx, vy, need[1], need[2], need[3])
    return None, gvals, gr, gc, gvx, gvy, None, None


ot_hvp.register_autograd(_hvp_backward, setup_context=_hvp_setup)


# ---- kernelkit::ot_cg ----------------------------------------------------------------------------------
@torch.library.custom_op("kernelkit::ot_cg", mutates_args=())
def ot_cg(cols: Tensor, vals: Tensor, r: Tensor, c: Tensor, rhs_x: Tensor, rhs_y: Tensor, zx0: Tensor, zy0: Tensor,
          shift: float, tol: float, max_iter: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, n, k = cols.shape
    cols, vals, r, c, rhs_x, rhs_y, zx0, zy0 = [t.contiguous() for t in (cols, vals, r, c, rhs_x, rhs_y, zx0, zy0)]
    m = c.shape[1]
    if backend == "torch":
        zx, zy, iters, resid = R.cg_reference(cols, vals, r, c, shift, rhs_x, rhs_y, zx0, zy0, tol, max_iter)
        return zx.contiguous(), zy.contiguous(), iters.to(rhs_x.device), resid.to(rhs_x.device)
    if backend == "triton":
        return _triton().cg(cols, vals, r, c, shift, rhs_x, rhs_y, zx0.clone(), zy0.clone(), tol, max_iter)
    zx, zy = zx0.clone(), zy0.clone()
    iters = torch.empty(B, dtype=torch.int32, device=rhs_x.device)
    resid = rhs_x.new_empty(B)
    args = (_KK_DTYPE[vals.dtype], B, n, m, k, _ptr(cols), _ptr(vals), _ptr(r), _ptr(c), float(shift), _ptr(rhs_x),
            _ptr(rhs_y), _ptr(zx), _ptr(zy), float(tol), int(max_iter), _ptr(iters), _ptr(resid))
    if backend == "cpu":
        # CG synchronizes its threads several times per iteration: worth it only for large systems (at
        # n = 1000, k = 64, two threads took 264 ms where one took 70 ms, over 8 solves).
        _lib.C().ot_cg_cpu(*args, _nt(B * n * k // 32))
    elif backend == "cuda":
        with torch.cuda.device(vals.device):
            nbytes = _lib.C().ot_cg_cuda_workspace_size(_KK_DTYPE[vals.dtype], B, n, m)
            ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=vals.device)
            _lib.C().ot_cg_cuda(*args, ws.data_ptr(), nbytes, _stream(vals))
    else:
        raise ValueError(f"kernelkit::ot_cg: unknown backend {backend!r}")
    return zx, zy, iters, resid


@ot_cg.register_fake
def _(cols, vals, r, c, rhs_x, rhs_y, zx0, zy0, shift, tol, max_iter, backend):
    B = rhs_x.shape[0]
    return (torch.empty_like(rhs_x), torch.empty_like(rhs_y), torch.empty(B, dtype=torch.int32, device=rhs_x.device),
            rhs_x.new_empty(B))


def _cg_setup(ctx, inputs, output):
    cols, vals, r, c, rhs_x, rhs_y, zx0, zy0, shift, tol, max_iter, backend = inputs
    zx, zy, iters, resid = output
    ctx.mark_non_differentiable(iters, resid)
    ctx.save_for_backward(cols, vals, r, c, zx, zy)
    ctx.shift, ctx.tol, ctx.max_iter, ctx.backend = shift, tol, max_iter, backend


def _cg_backward(ctx, gzx, gzy, giters, gresid):
    # z = H^-1 rhs: dL/drhs = w = H^-1 gz (H symmetric), dL/dH = -w z^T.
    cols, vals, r, c, zx, zy = ctx.saved_tensors
    need = ctx.needs_input_grad
    gzx = gzx if gzx is not None else torch.zeros_like(zx)
    gzy = gzy if gzy is not None else torch.zeros_like(zy)
    wx, wy, _, _ = torch.ops.kernelkit.ot_cg(cols, vals, r, c, gzx, gzy, torch.zeros_like(zx), torch.zeros_like(zy),
                                             ctx.shift, ctx.tol, ctx.max_iter, ctx.backend)
    gvals, gr, gc = _sym_grads(cols, vals, wx, wy, zx, zy, need[1], need[2], need[3], sign=-1.0)
    return (None, gvals, gr, gc, wx if need[4] else None, wy if need[5] else None, None, None, None, None, None, None)


ot_cg.register_autograd(_cg_backward, setup_context=_cg_setup)


# ---- kernelkit::ot_points_grad -------------------------------------------------------------------------
@torch.library.custom_op("kernelkit::ot_points_grad", mutates_args=())
def ot_points_grad(x: Tensor, y: Tensor, kind: int, p: float, reg: float, f: Tensor, g: Tensor,
                   scale: Optional[Tensor], u: Optional[Tensor], v: Optional[Tensor],
                   backend: str) -> tuple[Tensor, Tensor]:
    B, n, D = x.shape
    f, g, scale, u, v = [None if t is None else t.contiguous() for t in (f, g, scale, u, v)]
    m = y.shape[1]
    if backend == "torch":
        dx, dy = R.points_grad_reference(kind, p, x, y, reg, f, g, scale, u, v)
        return dx.contiguous(), dy.contiguous()
    if backend == "triton":
        return _triton().points_grad(kind, p, x, y, reg, f, g, scale, u, v)
    dx, dy = x.new_empty(B, n, D), x.new_empty(B, m, D)
    args = (_KK_DTYPE[x.dtype], _cost_tuple(None, x, y, kind, p), B, n, m, float(reg), _ptr(f), _ptr(g), _ptr(scale),
            _ptr(u), _ptr(v), _ptr(dx), _ptr(dy))
    if backend == "cpu":
        _lib.C().ot_points_grad_cpu(*args, _nt(B * n * m * D))
    elif backend == "cuda":
        with torch.cuda.device(x.device):
            _lib.C().ot_points_grad_cuda(*args, _stream(x))
    else:
        raise ValueError(f"kernelkit::ot_points_grad: unknown backend {backend!r}")
    return dx, dy


@ot_points_grad.register_fake
def _(x, y, kind, p, reg, f, g, scale, u, v, backend):
    return x.new_empty(x.shape[0], x.shape[1], x.shape[2]), y.new_empty(y.shape[0], y.shape[1], y.shape[2])


def _pg_setup(ctx, inputs, output):
    x, y, kind, p, reg, f, g, scale, u, v, backend = inputs
    ctx.save_for_backward(x, y, f, g, scale, u, v)
    ctx.kind, ctx.p, ctx.reg = kind, p, reg


def _pg_backward(ctx, gdx, gdy):
    # Second derivatives through the torch reference (O(B n m D) memory; documented in the module docstring).
    x, y, f, g, scale, u, v = ctx.saved_tensors
    inputs = [t for t in (x, y, f, g, scale, u, v)]
    req = [t is not None and ctx.needs_input_grad[i] for i, t in zip((0, 1, 5, 6, 7, 8, 9), inputs)]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(r) if t is not None else None for t, r in zip(inputs, req)]
        dx, dy = R.points_grad_reference(ctx.kind, ctx.p, leaves[0], leaves[1], ctx.reg, leaves[2], leaves[3],
                                         leaves[4], leaves[5], leaves[6])
        outs, gos = [], []
        for o, go in ((dx, gdx), (dy, gdy)):
            if go is not None and o.requires_grad:
                outs.append(o)
                gos.append(go)
        wrt = [t for t, r in zip(leaves, req) if r]
        grads = torch.autograd.grad(outs, wrt, gos, allow_unused=True) if outs and wrt else [None] * len(wrt)
    it = iter(grads)
    gx, gy, gf, gg, gs, gu, gv = [next(it) if r else None for r in req]
    return gx, gy, None, None, None, gf, gg, gs, gu, gv, None


ot_points_grad.register_autograd(_pg_backward, setup_context=_pg_setup)


# ---- the user-facing layer -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cost:
    """A batch of cost matrices: dense (``Cost.matrix``) or two point clouds (``Cost.points``)."""
    kind: int
    p: float
    mat: Optional[Tensor]
    x: Optional[Tensor]
    y: Optional[Tensor]

    @staticmethod
    def matrix(C: Tensor, fn: str = "kernelkit.ot.Cost.matrix") -> "Cost":
        if not isinstance(C, Tensor):
            raise TypeError(f"{fn}: the cost matrix must be a torch.Tensor, got {type(C).__name__}")
        if C.dim() not in (2, 3):
            raise ValueError(f"{fn}: the cost matrix must be (n, m) or (B, n, m), got shape {tuple(C.shape)}")
        if not C.is_floating_point():
            raise TypeError(f"{fn}: the cost matrix must be floating point, got {C.dtype}")
        if C.dim() == 2:
            C = C[None]
        if C.stride(2) != 1 and C.shape[2] > 1:
            C = C.contiguous()
        if C.shape[1] > 1 and C.stride(1) < max(C.shape[2], 1):
            C = C.contiguous()
        return Cost(R.MATRIX, 2.0, C, None, None)

    @staticmethod
    def points(x: Tensor, y: Tensor, kind: str = "sqeuclidean", p: float = 2.0,
               fn: str = "kernelkit.ot.Cost.points") -> "Cost":
        if kind not in ("sqeuclidean", "euclidean_pow", "minkowski_pow"):
            raise ValueError(f"{fn}: cost must be 'sqeuclidean', 'euclidean_pow' or 'minkowski_pow', got {kind!r}")
        for name, t in (("x", x), ("y", y)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() not in (2, 3):
                raise ValueError(f"{fn}: {name} must be (n, D) or (B, n, D), got shape {tuple(t.shape)}")
            if not t.is_floating_point():
                raise TypeError(f"{fn}: {name} must be floating point, got {t.dtype}")
        if x.dim() != y.dim():
            raise ValueError(f"{fn}: x and y must both be 2-D or both 3-D, got {x.dim()}-D and {y.dim()}-D")
        if x.dtype != y.dtype or x.device != y.device:
            raise ValueError(f"{fn}: x and y must have one dtype and device, got {x.dtype}/{x.device} and "
                             f"{y.dtype}/{y.device}")
        if x.dim() == 2:
            x, y = x[None], y[None]
        if x.shape[2] != y.shape[2]:
            raise ValueError(f"{fn}: x and y must have the same dimension D, got {x.shape[2]} and {y.shape[2]}")
        if not 1 <= x.shape[2] <= MAX_DIM:
            raise ValueError(f"{fn}: the point dimension D must be in 1..{MAX_DIM}, got {x.shape[2]}")
        if x.shape[0] != y.shape[0]:
            if x.shape[0] == 1:
                x = x.expand(y.shape[0], -1, -1)
            elif y.shape[0] == 1:
                y = y.expand(x.shape[0], -1, -1)
            else:
                raise ValueError(f"{fn}: x and y batch sizes differ: {x.shape[0]} and {y.shape[0]}")
        kd = KINDS[kind]
        p = float(p)
        if kd == R.SQEUCLIDEAN:
            p = 2.0
        elif kd == R.EUCLIDEAN_POW and not (math.isfinite(p) and p > 0):
            raise ValueError(f"{fn}: p must be finite and > 0 for 'euclidean_pow', got {p}")
        elif kd == R.MINKOWSKI_POW and not (math.isfinite(p) and p >= 1):
            raise ValueError(f"{fn}: p must be finite and >= 1 for 'minkowski_pow', got {p}")

        def rows(t):
            return t if (t.stride(2) == 1 or t.shape[2] == 1) and (t.stride(1) == t.shape[2] or t.shape[1] <= 1) \
                else t.contiguous()
        return Cost(kd, p, None, rows(x), rows(y))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(_dims(self.mat, self.x, self.y))

    @property
    def dtype(self) -> torch.dtype:
        return (self.mat if self.mat is not None else self.x).dtype

    @property
    def device(self) -> torch.device:
        return (self.mat if self.mat is not None else self.x).device

    def expand(self, B: int) -> "Cost":
        """This cost for B problems (a single one shared with batch stride 0)."""
        if self.shape[0] == B:
            return self
        if self.shape[0] != 1:
            raise ValueError(f"kernelkit.ot: the cost has batch {self.shape[0]}, the weights {B}")
        if self.kind == R.MATRIX:
            return Cost(self.kind, self.p, self.mat.expand(B, -1, -1), None, None)
        return Cost(self.kind, self.p, None, self.x.expand(B, -1, -1), self.y.expand(B, -1, -1))

    def dense(self) -> Tensor:
        """The cost matrix (B, n, m), materialized for point clouds."""
        return _cost_dense(self.mat, self.x, self.y, self.kind, self.p)

    def args(self) -> tuple:
        return (self.mat, self.x, self.y, self.kind, self.p)


def _check_reg(reg, fn: str, scalar_types: tuple = (int, float)) -> float:
    """reg as a float: a number of ``scalar_types`` (kernelkit.ot.pot adds numpy's) or a one-element
    tensor, finite and > 0; TypeError / ValueError naming it otherwise."""
    if isinstance(reg, Tensor):
        if reg.numel() != 1:
            raise ValueError(f"{fn}: reg must be a scalar, got shape {tuple(reg.shape)}")
        reg = reg.item()
    if isinstance(reg, bool) or type(reg).__name__ == "bool_" or not isinstance(reg, scalar_types):
        raise TypeError(f"{fn}: reg must be a float, got {type(reg).__name__}")
    reg = float(reg)
    if not (math.isfinite(reg) and reg > 0):
        raise ValueError(f"{fn}: reg must be finite and > 0, got {reg}")
    return reg


def _vec(t, name: str, B: int, length: int, cost: Cost, fn: str, optional: bool = False) -> Optional[Tensor]:
    if t is None:
        if optional:
            return None
        raise ValueError(f"{fn}: {name} is required")
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[1] != length or t.shape[0] not in (1, B):
        raise ValueError(f"{fn}: {name} must have shape ({B}, {length}) (or ({length},)), got {tuple(t.shape)}")
    if t.dtype != cost.dtype or t.device != cost.device:
        raise ValueError(f"{fn}: {name} must have the cost's dtype and device ({cost.dtype}, {cost.device}), got "
                         f"{t.dtype}, {t.device}")
    return t.expand(B, length).contiguous()


def _batch(cost: Cost, *vs) -> int:
    B = cost.shape[0]
    for v in vs:
        if isinstance(v, Tensor) and v.dim() == 2 and v.shape[0] != 1:
            B = max(B, v.shape[0]) if B == 1 else B
    return B


def _select(op: str, cost_or_t, backend: Optional[str]) -> str:
    dtype = cost_or_t.dtype
    device = cost_or_t.device
    return _backend.select(op, device, backend, _supports(dtype))


def sinkhorn_step(cost: Cost, axis: int, reg: float, w: Tensor, other: Tensor, pot: Optional[Tensor] = None,
                  err_norm=1, backend: Optional[str] = None):
    """One log-domain half-step (axis 0: the f update from g; 1: the g update from f), with the marginal
    error of the plan (pot, other) on this axis fused in: (pot_new, err or None)."""
    fn = "kernelkit.ot.sinkhorn_step"
    if axis not in (0, 1):
        raise ValueError(f"{fn}: axis must be 0 or 1, got {axis!r}")
    if err_norm not in NORMS:
        raise ValueError(f"{fn}: err_norm must be 1, 2 or 'inf', got {err_norm!r}")
    reg = _check_reg(reg, fn)
    _, n, m = cost.shape
    B = _batch(cost, w, other, pot)
    lw, lo = (n, m) if axis == 0 else (m, n)
    w = _vec(w, "w", B, lw, cost, fn)
    other = _vec(other, "other", B, lo, cost, fn)
    pot = _vec(pot, "pot", B, lw, cost, fn, optional=True)
    cost = cost.expand(B)
    be = _select(fn, cost, backend)
    pot_new, err = torch.ops.kernelkit.ot_sinkhorn_step(*cost.args(), axis, reg, w, other, pot, NORMS[err_norm], be)
    return pot_new, (err if pot is not None else None)


def marginals(cost: Cost, reg: float, f: Tensor, g: Tensor, a: Optional[Tensor] = None, b: Optional[Tensor] = None,
              wr: Optional[Tensor] = None, wc: Optional[Tensor] = None, backend: Optional[str] = None):
    """(r, c, obj): r = P wc, c = P^T wr (None weights: ones) and the dual objective (None without a, b)."""
    fn = "kernelkit.ot.marginals"
    reg = _check_reg(reg, fn)
    _, n, m = cost.shape
    B = _batch(cost, f, g)
    f, g = _vec(f, "f", B, n, cost, fn), _vec(g, "g", B, m, cost, fn)
    a, b = _vec(a, "a", B, n, cost, fn, True), _vec(b, "b", B, m, cost, fn, True)
    wr, wc = _vec(wr, "wr", B, n, cost, fn, True), _vec(wc, "wc", B, m, cost, fn, True)
    want_obj = a is not None and b is not None
    if (a is None) != (b is None):
        raise ValueError(f"{fn}: give both a and b (for the objective) or neither")
    cost = cost.expand(B)
    be = _select(fn, cost, backend)
    r, c, obj = torch.ops.kernelkit.ot_marginals(*cost.args(), reg, f, g, a, b, wr, wc, True, True, want_obj, be)
    return r, c, (obj if want_obj else None)


def plan(cost: Cost, reg: float, f: Tensor, g: Tensor, backend: Optional[str] = None) -> Tensor:
    """The dense plan P (B, n, m)."""
    fn = "kernelkit.ot.plan"
    reg = _check_reg(reg, fn)
    _, n, m = cost.shape
    B = _batch(cost, f, g)
    f, g = _vec(f, "f", B, n, cost, fn), _vec(g, "g", B, m, cost, fn)
    cost = cost.expand(B)
    return torch.ops.kernelkit.ot_plan(*cost.args(), reg, f, g, _select(fn, cost, backend))


def sparsify(cost: Cost, reg: float, f: Tensor, g: Tensor, k: int, backend: Optional[str] = None):
    """Per row the k largest plan entries: (cols int32 (B, n, k) in increasing order, vals (B, n, k))."""
    fn = "kernelkit.ot.sparsify"
    reg = _check_reg(reg, fn)
    _, n, m = cost.shape
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{fn}: k must be an int, got {type(k).__name__}")
    if n > 0 and m > 0 and not 1 <= k <= min(m, MAX_KEEP):
        raise ValueError(f"{fn}: k must be in 1..min(m, {MAX_KEEP}) = {min(m, MAX_KEEP)}, got {k}")
    B = _batch(cost, f, g)
    f, g = _vec(f, "f", B, n, cost, fn), _vec(g, "g", B, m, cost, fn)
    cost = cost.expand(B)
    if n == 0 or m == 0:
        k = min(max(k, 0), m)
    return torch.ops.kernelkit.ot_sparsify(*cost.args(), reg, f, g, k, _select(fn, cost, backend))


def _check_sparse(cols, vals, r, c, fn):
    if not isinstance(cols, Tensor) or cols.dtype != torch.int32 or cols.dim() != 3:
        raise ValueError(f"{fn}: cols must be an int32 tensor (B, n, k)")
    if not isinstance(vals, Tensor) or vals.shape != cols.shape:
        raise ValueError(f"{fn}: vals must have cols' shape {tuple(cols.shape)}")
    B, n, k = cols.shape
    if not isinstance(r, Tensor) or r.shape != (B, n):
        raise ValueError(f"{fn}: r must have shape ({B}, {n}), got {tuple(getattr(r, 'shape', ()))}")
    if not isinstance(c, Tensor) or c.dim() != 2 or c.shape[0] != B:
        raise ValueError(f"{fn}: c must have shape ({B}, m)")
    m = c.shape[1]
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= m):
        raise ValueError(f"{fn}: cols has an entry outside [0, m = {m})")
    for name, t in (("vals", vals), ("r", r), ("c", c)):
        if t.dtype != vals.dtype or t.device != vals.device:
            raise ValueError(f"{fn}: {name} must have vals' dtype and device")
    return B, n, m, k


def _check_shift(shift, fn):
    shift = float(shift)
    if not (math.isfinite(shift) and shift >= 0):
        raise ValueError(f"{fn}: shift must be finite and >= 0, got {shift}")
    return shift


def hvp(cols: Tensor, vals: Tensor, r: Tensor, c: Tensor, vx: Tensor, vy: Tensor, shift: float = 0.0,
        backend: Optional[str] = None):
    """(yx, yy) = H (vx, vy), H = [[diag(r), S], [S^T, diag(c)]] + shift I, S the sparsified plan."""
    fn = "kernelkit.ot.hvp"
    B, n, m, k = _check_sparse(cols, vals, r, c, fn)
    shift = _check_shift(shift, fn)
    for name, t, L in (("vx", vx, n), ("vy", vy, m)):
        if not isinstance(t, Tensor) or t.shape != (B, L) or t.dtype != vals.dtype:
            raise ValueError(f"{fn}: {name} must be ({B}, {L}) in {vals.dtype}")
    be = _backend.select(fn, vals.device, backend, _supports(vals.dtype))
    return torch.ops.kernelkit.ot_hvp(cols.contiguous(), vals.contiguous(), r.contiguous(), c.contiguous(),
                                      vx.contiguous(), vy.contiguous(), shift, be)


def cg(cols: Tensor, vals: Tensor, r: Tensor, c: Tensor, rhs_x: Tensor, rhs_y: Tensor, shift: float = 0.0,
       tol: float = 1e-10, max_iter: int = 1000, z0=None, backend: Optional[str] = None):
    """Solve H z = rhs by Jacobi-preconditioned CG: (zx, zy, iters, resid)."""
    fn = "kernelkit.ot.cg"
    B, n, m, k = _check_sparse(cols, vals, r, c, fn)
    shift = _check_shift(shift, fn)
    tol = float(tol)
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"{fn}: tol must be finite and > 0, got {tol}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"{fn}: max_iter must be an int >= 0, got {max_iter!r}")
    for name, t, L in (("rhs_x", rhs_x, n), ("rhs_y", rhs_y, m)):
        if not isinstance(t, Tensor) or t.shape != (B, L) or t.dtype != vals.dtype:
            raise ValueError(f"{fn}: {name} must be ({B}, {L}) in {vals.dtype}")
    zx0, zy0 = (torch.zeros_like(rhs_x), torch.zeros_like(rhs_y)) if z0 is None else z0
    be = _backend.select(fn, vals.device, backend, _supports(vals.dtype))
    return torch.ops.kernelkit.ot_cg(cols.contiguous(), vals.contiguous(), r.contiguous(), c.contiguous(),
                                     rhs_x.contiguous(), rhs_y.contiguous(), zx0.contiguous(), zy0.contiguous(),
                                     shift, tol, min(max_iter, 2**31 - 1), be)


def points_grad(cost: Cost, reg: float, f: Tensor, g: Tensor, scale: Optional[Tensor] = None,
                u: Optional[Tensor] = None, v: Optional[Tensor] = None, backend: Optional[str] = None):
    """(dx, dy): the gradient of sum_ij W_ij C(x_i, y_j) with W = P * (scale_b + u_i + v_j) held fixed."""
    fn = "kernelkit.ot.points_grad"
    if cost.kind == R.MATRIX:
        raise ValueError(f"{fn}: needs a point-cloud cost (Cost.points), got a cost matrix")
    reg = _check_reg(reg, fn)
    _, n, m = cost.shape
    B = _batch(cost, f, g)
    f, g = _vec(f, "f", B, n, cost, fn), _vec(g, "g", B, m, cost, fn)
    u, v = _vec(u, "u", B, n, cost, fn, True), _vec(v, "v", B, m, cost, fn, True)
    if scale is not None:
        if not isinstance(scale, Tensor) or scale.shape not in ((B,), (1,)):
            raise ValueError(f"{fn}: scale must have shape ({B},)")
        scale = scale.to(cost.dtype).expand(B).contiguous()
    cost = cost.expand(B)
    return torch.ops.kernelkit.ot_points_grad(cost.x, cost.y, cost.kind, cost.p, reg, f, g, scale, u, v,
                                              _select(fn, cost, backend))
