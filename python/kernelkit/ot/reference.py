"""Pure-torch reference of every ot kernel (csrc/include/kernelkit/ot.h), in the inputs' dtype.

Tests run it in float64 as the ground truth; the ``torch`` backend runs it in any dtype.  Shapes:
a, f (B, n); b, g (B, m); a cost is a dense C (B, n, m) (any strides, e.g. an expanded shared matrix)
or two point clouds x (B, n, D), y (B, m, D) with ``kind`` and ``p``.
"""
from __future__ import annotations

import torch
from torch import Tensor

MATRIX, SQEUCLIDEAN, EUCLIDEAN_POW, MINKOWSKI_POW = 0, 1, 2, 3
KINDS = {"matrix": MATRIX, "sqeuclidean": SQEUCLIDEAN, "euclidean_pow": EUCLIDEAN_POW, "minkowski_pow": MINKOWSKI_POW}
NORM_INF, NORM_L1, NORM_L2 = 0, 1, 2


def point_cost(kind: int, p: float, x: Tensor, y: Tensor) -> Tensor:
    """C (B, n, m) from x (B, n, D), y (B, m, D), differences formed directly."""
    diff = x[:, :, None, :] - y[:, None, :, :]
    if kind == SQEUCLIDEAN:
        return (diff * diff).sum(-1)
    if kind == EUCLIDEAN_POW:
        return (diff * diff).sum(-1) ** (p / 2)
    if kind == MINKOWSKI_POW:
        return (diff.abs() ** p).sum(-1)
    raise ValueError(f"point_cost: unknown cost kind {kind}")


def cost_of(kind: int, p: float, matrix, x, y) -> Tensor:
    return matrix if kind == MATRIX else point_cost(kind, p, x, y)


def _log(w: Tensor) -> Tensor:
    return torch.where(w > 0, w.clamp_min(torch.finfo(w.dtype).tiny).log(), torch.full_like(w, -float("inf")))


def _norm(v: Tensor, err_norm: int) -> Tensor:
    if v.shape[-1] == 0:
        return v.new_zeros(v.shape[:-1])
    if err_norm == NORM_L1:
        return v.abs().sum(-1)
    if err_norm == NORM_L2:
        return v.pow(2).sum(-1).sqrt()
    return v.abs().amax(-1)


def _lse(t: Tensor, dim: int) -> Tensor:
    if t.shape[dim] == 0:
        shape = list(t.shape)
        del shape[dim]
        return t.new_full(shape, -float("inf"))
    return torch.logsumexp(t, dim)


def sinkhorn_step_reference(C: Tensor, axis: int, reg: float, w: Tensor, other: Tensor, pot=None,
                            err_norm: int = NORM_L1):
    """(pot_new, err or None): one log-domain half-step on ``axis`` (0: f from g, 1: g from f)."""
    if axis == 0:
        s = _lse((other[:, None, :] - C) / reg, 2)
    else:
        s = _lse((other[:, :, None] - C) / reg, 1)
    pot_new = torch.where(w > 0, reg * (_log(w) - s), torch.full_like(s, -float("inf")))
    err = None
    if pot is not None:
        marg = torch.exp(pot / reg + s)
        marg = torch.where(torch.isnan(marg) & ~(pot > -float("inf")), torch.zeros_like(marg), marg)
        err = _norm(marg - w, err_norm)
    return pot_new, err


def plan_reference(C: Tensor, reg: float, f: Tensor, g: Tensor) -> Tensor:
    return torch.exp((f[:, :, None] + g[:, None, :] - C) / reg)


def _dot0(w: Tensor, pot: Tensor) -> Tensor:
    return torch.where(w == 0, torch.zeros_like(pot), w * pot).sum(-1)


def marginals_reference(C: Tensor, reg: float, f: Tensor, g: Tensor, a=None, b=None, wr=None, wc=None):
    """(r, c, obj): r = P wc, c = P^T wr (weights None: ones) and the dual objective (None without a, b)."""
    P = plan_reference(C, reg, f, g)
    r = P.sum(2) if wc is None else (P * wc[:, None, :]).sum(2)
    c = P.sum(1) if wr is None else (P * wr[:, :, None]).sum(1)
    obj = None
    if a is not None and b is not None:
        obj = _dot0(a, f) + _dot0(b, g) - reg * P.sum((1, 2))
    return r, c, obj


def sparsify_reference(C: Tensor, reg: float, f: Tensor, g: Tensor, k: int):
    """(cols int32 (B, n, k), vals (B, n, k)): per row the k largest keys g_j - C_ij (ties: the smaller
    column first; NaN as -inf), in increasing column order, with vals = P_ij."""
    key = g[:, None, :] - C
    key = torch.where(torch.isnan(key), torch.full_like(key, -float("inf")), key)
    order = torch.sort(key, dim=2, descending=True, stable=True).indices[..., :k]
    cols = order.sort(dim=2).values
    P = plan_reference(C, reg, f, g)
    vals = torch.gather(P, 2, cols)
    return cols.to(torch.int32), vals


def _spmv(cols: Tensor, vals: Tensor, v: Tensor) -> Tensor:  # S v: (B, n)
    return (vals * torch.gather(v[:, None, :].expand(-1, cols.shape[1], -1), 2, cols.long())).sum(2)


def _spmv_t(cols: Tensor, vals: Tensor, u: Tensor, m: int) -> Tensor:  # S^T u: (B, m)
    out = u.new_zeros(u.shape[0], m)
    out.scatter_add_(1, cols.long().flatten(1), (vals * u[:, :, None]).flatten(1))
    return out


def hvp_reference(cols: Tensor, vals: Tensor, r: Tensor, c: Tensor, shift: float, vx: Tensor, vy: Tensor):
    m = c.shape[1]
    yx = r * vx + _spmv(cols, vals, vy) + shift * vx
    yy = _spmv_t(cols, vals, vx, m) + c * vy + shift * vy
    return yx, yy


def cg_reference(cols: Tensor, vals: Tensor, r: Tensor, c: Tensor, shift: float, rhs_x: Tensor, rhs_y: Tensor,
                 zx: Tensor, zy: Tensor, tol: float, max_iter: int):
    """Jacobi-preconditioned CG per problem, the C entry point's algorithm: (zx, zy, iters, resid)."""
    B = rhs_x.shape[0]
    dx, dy = r + shift, c + shift
    dx = torch.where(dx > 0, dx, torch.ones_like(dx))
    dy = torch.where(dy > 0, dy, torch.ones_like(dy))
    zx, zy = zx.clone(), zy.clone()
    iters = torch.zeros(B, dtype=torch.int32)
    resid = rhs_x.new_zeros(B)
    for bi in range(B):
        sl = slice(bi, bi + 1)
        args = (cols[sl], vals[sl], r[sl], c[sl], shift)
        bn = torch.cat([rhs_x[sl], rhs_y[sl]], 1).norm()
        if bn == 0:
            zx[sl] = 0
            zy[sl] = 0
            continue
        hx, hy = hvp_reference(*args, zx[sl], zy[sl])
        rx, ry = rhs_x[sl] - hx, rhs_y[sl] - hy
        sx, sy = rx / dx[sl], ry / dy[sl]
        px, py = sx.clone(), sy.clone()
        rz = (rx * sx).sum() + (ry * sy).sum()
        it = 0
        rn = torch.cat([rx, ry], 1).norm()
        while rn > tol * bn and it < max_iter:
            qx, qy = hvp_reference(*args, px, py)
            pq = (px * qx).sum() + (py * qy).sum()
            if not pq > 0:
                break
            alpha = rz / pq
            zx[sl] += alpha * px
            zy[sl] += alpha * py
            rx = rx - alpha * qx
            ry = ry - alpha * qy
            it += 1
            rn = torch.cat([rx, ry], 1).norm()
            sx, sy = rx / dx[sl], ry / dy[sl]
            rz_new = (rx * sx).sum() + (ry * sy).sum()
            beta = rz_new / rz
            rz = rz_new
            px = sx + beta * px
            py = sy + beta * py
        iters[bi] = it
        resid[bi] = rn / bn
    return zx, zy, iters, resid


def cost_grad_terms(kind: int, p: float, x: Tensor, y: Tensor) -> Tensor:
    """dC(x_i, y_j)/dx_i (B, n, m, D) (the y gradient is its negative); subgradient 0 where undefined."""
    diff = x[:, :, None, :] - y[:, None, :, :]
    if kind == SQEUCLIDEAN:
        return 2 * diff
    if kind == EUCLIDEAN_POW:
        d2 = (diff * diff).sum(-1, keepdim=True)
        safe = torch.where(d2 > 0, d2, torch.ones_like(d2))
        return torch.where(d2 > 0, p * safe ** (p / 2 - 1) * diff, torch.zeros_like(diff))
    if kind == MINKOWSKI_POW:
        ad = diff.abs()
        safe = torch.where(ad > 0, ad, torch.ones_like(ad))
        return torch.where(ad > 0, p * safe ** (p - 1) * torch.sign(diff), torch.zeros_like(diff))
    raise ValueError(f"cost_grad_terms: unknown cost kind {kind}")


def points_grad_reference(kind: int, p: float, x: Tensor, y: Tensor, reg: float, f: Tensor, g: Tensor, scale=None,
                          u=None, v=None):
    """(dx, dy): the gradient of sum_ij W_ij C(x_i, y_j), W = P * (scale_b + u_i + v_j) held fixed."""
    C = point_cost(kind, p, x, y)
    P = plan_reference(C, reg, f, g)
    w = (torch.ones_like(f[:, :1]) if scale is None else scale[:, None])[:, :, None]
    if u is not None:
        w = w + u[:, :, None]
    if v is not None:
        w = w + v[:, None, :]
    P = P * w
    G = cost_grad_terms(kind, p, x, y)
    dx = (P[..., None] * G).sum(2)
    dy = -(P[..., None] * G).sum(1)
    return dx, dy
