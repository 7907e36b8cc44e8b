"""POT-compatible entry points: ``sinkhorn`` and ``sinkhorn2`` take POT's arguments (numpy arrays, lists or
torch tensors) and return the same types, values, log keys and warning as POT's ``method="sinkhorn_log"``,
so ``import kernelkit.ot as ot`` can replace ``import ot`` for these calls; plus ``sinkhorn_cost`` and
``sinkhorn_points`` (no cost matrix), whose value is the regularized OT cost with envelope-theorem
gradients.

Extra keyword arguments (all optional): ``backend`` (torch / cpu / triton / cuda), ``progress`` (the
tqdm bar, shown for solves longer than 2 s; False silences it), and for ``method="sns"``:
``n_sinkhorn`` (warm-start iterations, 20), ``keep`` ('auto', entries per row, or a ratio of m) and
``cg_max_iter`` (500).  Other keyword arguments (POT's options of methods we do not have) are ignored
with a warning.
"""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import ops, solvers
from .ops import Cost
from .reference import KINDS

_EXTRA = ("backend", "progress", "n_sinkhorn", "keep", "cg_max_iter")
NOT_CONVERGED = ("Sinkhorn did not converge. You might want to increase the number of iterations `numItermax` "
                 "or the regularization parameter `reg`.")


def _split_kwargs(fn: str, kwargs: dict) -> dict:
    extra = {k: kwargs[k] for k in _EXTRA if k in kwargs}
    unknown = sorted(set(kwargs) - set(_EXTRA))
    if unknown:
        warnings.warn(f"{fn}: ignoring keyword arguments {', '.join(unknown)} (kernelkit has no use for them)",
                      UserWarning, stacklevel=3)
    return extra


def _is_torch(*xs) -> bool:
    return any(isinstance(x, Tensor) for x in xs)


def _as_tensor(x, name: str, fn: str, like: Optional[Tensor] = None) -> Tensor:
    if isinstance(x, Tensor):
        t = x
    else:
        try:
            arr = np.asarray(x)
        except Exception as e:  # noqa: BLE001
            raise TypeError(f"{fn}: {name} must be an array or tensor, got {type(x).__name__}") from e
        if arr.dtype == object:
            raise TypeError(f"{fn}: {name} must be numeric, got an object array")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if like is not None:
        if t.numel() and not t.is_floating_point() and t.dtype != torch.bool:
            t = t.to(like.dtype)
        t = t.to(device=like.device, dtype=like.dtype)
    elif not t.is_floating_point():
        t = t.to(torch.float64)
    return t


def _check_reg(reg, fn: str) -> float:
    return ops._check_reg(reg, fn, (int, float, np.floating, np.integer))  # POT users pass numpy scalars


def _check_weights(w: Tensor, name: str, length: int, fn: str, allow_2d: bool) -> Tensor:
    if w.dim() == 0 or w.dim() > (2 if allow_2d else 1):
        raise ValueError(f"{fn}: {name} must be a 1-D histogram of length {length}"
                         + (" (or (m, n_hists))" if allow_2d else "") + f", got shape {tuple(w.shape)}")
    if w.shape[0] != length:
        raise ValueError(f"{fn}: {name} has length {w.shape[0]} but the cost has {length} "
                         f"{'rows' if name == 'a' else 'columns'}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{fn}: {name} contains NaN or inf")
    if bool((w < 0).any()):
        raise ValueError(f"{fn}: {name} has negative entries (masses must be >= 0)")
    return w


def _check_masses(a: Tensor, b: Tensor, fn: str) -> None:
    sa, sb = a.sum(-1, dtype=torch.float64), b.sum(-1, dtype=torch.float64)
    if bool((sa <= 0).any()) or bool((sb <= 0).any()):
        raise ValueError(f"{fn}: a and b must have positive total mass")
    tol = 1e-6 if a.dtype == torch.float64 else 1e-4
    if bool(((sa - sb).abs() > tol * torch.maximum(sa, sb)).any()):
        bad = int(((sa - sb).abs() > tol * torch.maximum(sa, sb)).nonzero()[0])
        raise ValueError(f"{fn}: a and b must have the same total mass (balanced OT), got sum(a) = "
                         f"{float(sa[bad]):.10g} and sum(b) = {float(sb[bad]):.10g}"
                         + (f" for histogram {bad}" if sb.numel() > 1 else ""))


def _prepare(a, b, M, reg, fn: str):
    """(M (n, m) tensor, a (n,), b (m,) or (m, nh), reg, to_numpy)."""
    to_numpy = not _is_torch(a, b, M)
    M = _as_tensor(M, "M", fn)
    if M.dim() != 2:
        raise ValueError(f"{fn}: M must be a 2-D cost matrix (n, m), got shape {tuple(M.shape)}")
    n, m = M.shape
    if n == 0 or m == 0:
        raise ValueError(f"{fn}: empty problem: M has shape {tuple(M.shape)}")
    if M.dtype not in (torch.float32, torch.float64):
        M = M.to(torch.float64 if M.dtype not in (torch.float16, torch.bfloat16) else torch.float32)
    if not bool(torch.isfinite(M).all()):
        raise ValueError(f"{fn}: M contains NaN or inf")
    a = _as_tensor(a, "a", fn, M)
    b = _as_tensor(b, "b", fn, M)
    if a.numel() == 0 and a.dim() <= 1:
        a = M.new_full((n,), 1.0 / n)
    if b.numel() == 0 and b.dim() <= 1:
        b = M.new_full((m,), 1.0 / m)
    a = _check_weights(a, "a", n, fn, False)
    b = _check_weights(b, "b", m, fn, True)
    _check_masses(a[None], b.T if b.dim() == 2 else b[None], fn)
    return M, a, b, _check_reg(reg, fn), to_numpy


def _out(x, to_numpy: bool):
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy() if to_numpy else x
    if isinstance(x, list):
        return [_out(v, to_numpy) for v in x]
    if isinstance(x, dict):
        return {k: _out(v, to_numpy) for k, v in x.items()}
    return x


def _solve(a, b, M, reg, method, numItermax, stopThr, verbose, warmstart, fn, extra):
    """Shared by sinkhorn / sinkhorn2: (M, a (B, n), b (B, m), result, multi, to_numpy, reg)."""
    M, a, b, reg, to_numpy = _prepare(a, b, M, reg, fn)
    if isinstance(method, str) and method.lower() not in solvers.METHODS:
        raise ValueError(f"{fn}: unknown method {method!r}; kernelkit has {', '.join(solvers.METHODS)} "
                         "(POT's 'sinkhorn_stabilized', 'sinkhorn_epsilon_scaling', 'greenkhorn' and "
                         "'screenkhorn' are not implemented: 'sinkhorn_log' or 'sns' solve the same problem in "
                         "the log domain)")
    method = method.lower()
    multi = b.dim() == 2
    bb = b.T.contiguous() if multi else b[None]
    B = bb.shape[0]
    aa = a[None].expand(B, -1).contiguous()
    ws = None
    if warmstart is not None:
        if not (isinstance(warmstart, (tuple, list)) and len(warmstart) == 2):
            raise ValueError(f"{fn}: warmstart must be (log_u, log_v), as POT's")
        lu = _as_tensor(warmstart[0], "warmstart[0]", fn, M)
        lv = _as_tensor(warmstart[1], "warmstart[1]", fn, M)
        lu = lu.T if multi and lu.dim() == 2 else lu.reshape(1, -1).expand(B, -1)
        lv = lv.T if multi and lv.dim() == 2 else lv.reshape(1, -1).expand(B, -1)
        if lu.shape != aa.shape or lv.shape != bb.shape:
            raise ValueError(f"{fn}: warmstart shapes {tuple(lu.shape)}, {tuple(lv.shape)} do not match the problem")
        ws = (reg * lu.contiguous(), reg * lv.contiguous())
    if isinstance(numItermax, bool) or not isinstance(numItermax, (int, np.integer)) or numItermax < 1:
        raise ValueError(f"{fn}: numItermax must be an int >= 1, got {numItermax!r}")
    stopThr = float(stopThr)
    if not stopThr >= 0:
        raise ValueError(f"{fn}: stopThr must be >= 0, got {stopThr}")
    cost = Cost.matrix(M.detach(), fn)
    with torch.no_grad():
        res = solvers.solve(cost, aa.detach(), bb.detach(), reg, method, int(numItermax), stopThr, verbose, ws,
                            **extra)
    return M, aa, bb, res, multi, to_numpy, reg, cost


def _log_dict(res: solvers.SolveResult, reg: float, multi: bool, method: str):
    lu, lv = res.f / reg, res.g / reg
    if multi:
        log = {"log_u": lu.T, "log_v": lv.T}
    else:
        log = {"err": [e[0] for e in res.err], "niter": res.niter[0], "log_u": lu[0], "log_v": lv[0]}
    log["u"] = torch.exp(log["log_u"])
    log["v"] = torch.exp(log["log_v"])
    if method == "sns":
        log.update(n_sinkhorn=res.n_sinkhorn, n_newton=res.n_newton, keep=list(res.keep),
                   cg_iters=[c if multi else int(c[0]) for c in res.cg_iters],
                   obj=[o if multi else o[0] for o in res.obj])
    return log


def _warn(res: solvers.SolveResult, warn: bool):
    if warn and res.converged is not None and not bool(res.converged.all()):
        warnings.warn(NOT_CONVERGED, UserWarning, stacklevel=3)


def _plan(cost: Cost, reg: float, res: solvers.SolveResult, extra: dict) -> Tensor:
    from . import ops
    return ops.plan(cost.expand(res.f.shape[0]), reg, res.f, res.g, backend=extra.get("backend"))


class _EnvelopeLoss(torch.autograd.Function):
    """<M, P> with POT's envelope gradients (ot.solve(..., grad='envelope')): d/dM = P, d/da = f, d/db = g."""

    @staticmethod
    def forward(ctx, M, a, b, P, f, g):  # M (n, m), a (B, n), b (B, m), P (B, n, m)
        ctx.save_for_backward(P, f, g)
        return (M[None] * P).sum((1, 2))

    @staticmethod
    def backward(ctx, go):
        P, f, g = ctx.saved_tensors
        fin = lambda t: torch.where(torch.isfinite(t), t, torch.zeros_like(t))  # noqa: E731
        gM = (go[:, None, None] * P).sum(0)
        ga = go[:, None] * fin(f)
        gb = go[:, None] * fin(g)
        return gM, ga, gb, None, None, None


def sinkhorn(a, b, M, reg, method="sinkhorn_log", numItermax=1000, stopThr=1e-9, verbose=False, log=False,
             warn=True, warmstart=None, **kwargs):
    """POT's ``ot.sinkhorn``: the entropic OT plan (n, m) for histograms a (n,), b (m,) and cost M (n, m)
    (``[]`` for a or b: uniform).  With b (m, n_hists), the n_hists losses <M, P_k> are returned instead,
    as POT's sinkhorn_log does.  ``log=True`` adds POT's log dict (err, niter, log_u, log_v, u, v; SNS
    adds n_sinkhorn, n_newton, keep, cg_iters, obj).  Methods: "sinkhorn_log" and "sinkhorn" (the same
    log-domain iteration), "sns" (Sinkhorn-Newton-Sparse).  numpy in, numpy out; torch in, torch out.
    The plan is not differentiable (use sinkhorn2 or sinkhorn_cost for gradients)."""
    fn = "kernelkit.ot.sinkhorn"
    extra = _split_kwargs(fn, kwargs)
    M_, aa, bb, res, multi, to_numpy, reg, cost = _solve(a, b, M, reg, method, numItermax, stopThr, verbose,
                                                         warmstart, fn, extra)
    _warn(res, warn)
    with torch.no_grad():
        P = _plan(cost, reg, res, extra)
    if multi:
        out = (M_.detach() * P).sum((1, 2))
    else:
        out = P[0]
    if log:
        return _out(out, to_numpy), _out(_log_dict(res, reg, multi, method.lower()), to_numpy)
    return _out(out, to_numpy)


def sinkhorn2(a, b, M, reg, method="sinkhorn_log", numItermax=1000, stopThr=1e-9, verbose=False, log=False,
              warn=False, warmstart=None, **kwargs):
    """POT's ``ot.sinkhorn2``: the loss <M, P> (a scalar, or (n_hists,) for b (m, n_hists)).  With torch
    inputs that require grad, the loss is differentiable as POT's envelope gradients: d/dM = P,
    d/da = f (= reg log_u), d/db = g, the iterations not differentiated."""
    fn = "kernelkit.ot.sinkhorn2"
    extra = _split_kwargs(fn, kwargs)
    M_, aa, bb, res, multi, to_numpy, reg, cost = _solve(a, b, M, reg, method, numItermax, stopThr, verbose,
                                                         warmstart, fn, extra)
    _warn(res, warn)
    with torch.no_grad():
        P = _plan(cost, reg, res, extra)
    loss = _EnvelopeLoss.apply(M_, aa, bb, P, res.f, res.g)
    out = loss if multi else loss[0]
    if log:
        return _out(out, to_numpy), _out(_log_dict(res, reg, multi, method.lower()), to_numpy)
    return _out(out, to_numpy)


def sinkhorn_cost(a, b, M, reg, method="sinkhorn_log", numItermax=1000, stopThr=1e-9, log=False, warn=True,
                  **kwargs):
    """The regularized OT cost OT_reg = min_P <M, P> + reg sum P (log P - 1) (= the dual at the optimum),
    differentiable in M, a and b by the envelope theorem (d/dM = P, d/da = f, d/db = g; the iterations are
    not differentiated).  Same arguments and batching as :func:`sinkhorn2`."""
    fn = "kernelkit.ot.sinkhorn_cost"
    extra = _split_kwargs(fn, kwargs)
    M_, aa, bb, res, multi, to_numpy, reg, cost = _solve(a, b, M, reg, method, numItermax, stopThr, False, None,
                                                         fn, extra)
    _warn(res, warn)
    B = aa.shape[0]
    live_cost = Cost.matrix(M_, fn).expand(B)
    val = solvers.dual_value(live_cost, reg, res.f, res.g, aa, bb, backend=extra.get("backend"))
    out = val if multi else val[0]
    if log:
        return _out(out, to_numpy), _out(_log_dict(res, reg, multi, method.lower()), to_numpy)
    return _out(out, to_numpy)


def sinkhorn_points(x, y, reg, a=None, b=None, cost="sqeuclidean", p=2.0, method="sinkhorn_log", numItermax=1000,
                    stopThr=1e-9, verbose=False, log=False, warn=True, warmstart=None, **kwargs):
    """Entropic OT between point clouds x (n, D) and y (m, D) (or batches (B, n, D), (B, m, D)) with the cost
    computed on the fly (never an n x m array): 'sqeuclidean' ||x - y||^2, 'euclidean_pow' ||x - y||^p,
    'minkowski_pow' ||x - y||_p^p.  a, b: weights (uniform when None).  Returns the regularized OT cost
    (a scalar, or (B,)), differentiable in x, y, a and b by the envelope theorem; ``log=True`` adds
    {'f', 'g' (potentials in cost units), 'err', 'niter', 'converged', ...}.  warmstart: (f, g)."""
    fn = "kernelkit.ot.sinkhorn_points"
    extra = _split_kwargs(fn, kwargs)
    to_numpy = not _is_torch(x, y, a, b)
    x = _as_tensor(x, "x", fn)
    y = _as_tensor(y, "y", fn, x)
    if cost not in KINDS or cost == "matrix":
        raise ValueError(f"{fn}: cost must be 'sqeuclidean', 'euclidean_pow' or 'minkowski_pow', got {cost!r}")
    if x.dim() not in (2, 3) or y.dim() != x.dim():
        raise ValueError(f"{fn}: x and y must both be (n, D) or both (B, n, D), got shapes {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    batched = x.dim() == 3
    if x.shape[-2] == 0 or y.shape[-2] == 0:
        raise ValueError(f"{fn}: empty point cloud: x has {x.shape[-2]} points, y has {y.shape[-2]}")
    if not bool(torch.isfinite(x).all()) or not bool(torch.isfinite(y).all()):
        raise ValueError(f"{fn}: x or y contains NaN or inf")
    reg = _check_reg(reg, fn)
    c = Cost.points(x, y, cost, p, fn)
    B, n, m = c.shape
    a = x.new_full((B, n), 1.0 / n) if a is None else _as_tensor(a, "a", fn, x)
    b = x.new_full((B, m), 1.0 / m) if b is None else _as_tensor(b, "b", fn, x)
    a = a.reshape(1, n).expand(B, n) if a.dim() == 1 and a.shape[0] == n else a
    b = b.reshape(1, m).expand(B, m) if b.dim() == 1 and b.shape[0] == m else b
    for name, w, L in (("a", a, n), ("b", b, m)):
        if w.shape != (B, L):
            raise ValueError(f"{fn}: {name} must have shape ({L},) or ({B}, {L}), got {tuple(w.shape)}")
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"{fn}: {name} contains NaN or inf")
        if bool((w < 0).any()):
            raise ValueError(f"{fn}: {name} has negative entries (masses must be >= 0)")
    _check_masses(a, b, fn)
    ws = None
    if warmstart is not None:
        ws = (_as_tensor(warmstart[0], "warmstart[0]", fn, x).reshape(B, n).contiguous(),
              _as_tensor(warmstart[1], "warmstart[1]", fn, x).reshape(B, m).contiguous())
    c_det = Cost.points(x.detach(), y.detach(), cost, p, fn)
    with torch.no_grad():
        res = solvers.solve(c_det, a.detach().contiguous(), b.detach().contiguous(), reg, method.lower(),
                            int(numItermax), float(stopThr), verbose, ws, **extra)
    _warn(res, warn)
    val = solvers.dual_value(c.expand(B), reg, res.f, res.g, a.contiguous(), b.contiguous(),
                             backend=extra.get("backend"))
    out = val if batched else val[0]
    if log:
        lg = {"f": res.f if batched else res.f[0], "g": res.g if batched else res.g[0],
              "err": [e if batched else e[0] for e in res.err], "niter": res.niter if batched else res.niter[0],
              "converged": res.converged if batched else bool(res.converged[0])}
        if method.lower() == "sns":
            lg.update(n_sinkhorn=res.n_sinkhorn, n_newton=res.n_newton, keep=list(res.keep))
        return _out(out, to_numpy), _out(lg, to_numpy)
    return _out(out, to_numpy)
