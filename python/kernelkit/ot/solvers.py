"""Entropic OT solvers on the ot kernels: log-domain Sinkhorn and Sinkhorn-Newton-Sparse (SNS).

:func:`solve` is the batched engine (a :class:`~kernelkit.ot.ops.Cost`, weights (B, n) / (B, m), torch in
and out); :mod:`kernelkit.ot.pot` wraps it in POT's call signatures (numpy or torch).

Sinkhorn (``method="sinkhorn_log"``) is POT's ``sinkhorn_log`` iteration, step for step: the g update,
then the f update; every 10th iteration the L2 error of the column marginal is checked against
``stopThr``.  The check costs nothing extra: the next g update's log-sum-exp is the column marginal of
the current plan, so the error comes out of that kernel (the result and ``niter`` are those of the
iteration that was checked).  Problems of a batch stop independently (a converged problem is frozen).

SNS (``method="sns"``, Tang et al., ICLR 2024): ``n_sinkhorn`` Sinkhorn iterations, then Newton ascent
on the concave dual D(f, g) = <a, f> + <b, g> - reg sum P.  Each Newton step keeps the ``k`` largest
plan entries of every row (plus the full row and column sums: the Hessian's diagonal blocks), solves
H z = grad by Jacobi-preconditioned CG to a relative residual tied to the current error, and runs a
backtracking line search on D (Armijo; near machine precision, where D's increments vanish in float64,
a step that does not decrease D and reduces the gradient is accepted).  When a step does not at least
halve the gradient norm, k doubles (a fixed k that is too small turns the convergence linear); the
log reports k per step.  SNS stops when the L2 norm of the whole gradient (a - P 1, b - P^T 1) is below
``stopThr``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from . import ops
from .ops import Cost

CHECK_EVERY = 10  # POT's sinkhorn_log checks the error every 10 iterations
LAM_MIN, LAM_MAX = 1e-6, 1e6  # SNS: bounds of the Levenberg-Marquardt factor
FALLBACK_SWEEPS = 10  # SNS: Sinkhorn sweeps when the line search finds no step


def _progress(enabled: bool, total: int, desc: str):
    from tqdm.auto import tqdm
    # delay: a solve that ends within 2 s shows nothing (a training loop calling it is not flooded).
    return tqdm(total=total, desc=desc, disable=not enabled, delay=2.0, leave=False)


@dataclass
class SolveResult:
    """Potentials f (B, n), g (B, m) in cost units (P = exp((f_i + g_j - C_ij) / reg)) and the history."""
    f: Tensor
    g: Tensor
    niter: list
    err: list = field(default_factory=list)       # per check: the (B,) error tensor
    converged: Optional[Tensor] = None            # (B,) bool
    n_sinkhorn: int = 0
    n_newton: int = 0
    keep: list = field(default_factory=list)      # SNS: k per Newton step
    obj: list = field(default_factory=list)       # SNS: the dual objective (B,) per Newton step
    cg_iters: list = field(default_factory=list)  # SNS: CG iterations (B,) per Newton step
    alpha: list = field(default_factory=list)     # SNS: the accepted step (B,) per Newton step
    dropped: list = field(default_factory=list)   # SNS: the plan mass share left out of the Hessian per step


def sinkhorn_loop(cost: Cost, a: Tensor, b: Tensor, reg: float, numItermax: int, stopThr: float,
                  f: Tensor, g: Tensor, verbose: bool = False, progress: bool = True, backend=None,
                  err_norm: int = 2, check_every: int = CHECK_EVERY) -> SolveResult:
    """POT's sinkhorn_log loop on the fused kernels; returns the potentials of the last checked iteration
    for converged problems, of the last iteration otherwise."""
    B = a.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=a.device)
    niter = [numItermax - 1] * B
    errs: list = []
    pending = False
    ii = -1
    bar = _progress(progress, numItermax, "sinkhorn")

    def check(err: Tensor, it: int):
        errs.append(err)
        if verbose:
            if it % 200 == 0:
                print("{:5s}|{:12s}".format("It.", "Err") + "\n" + "-" * 19)
            print("{:5d}|{:8e}|".format(it, float(err.max())))
        newly = (err < stopThr) & ~done
        for bi in newly.nonzero().flatten().tolist():
            niter[bi] = it
        bar.set_postfix(err=f"{float(err[~done].max()) if bool((~done).any()) else 0.0:.2e}", refresh=False)
        return newly

    try:
        for ii in range(numItermax):
            g_new, err = ops.sinkhorn_step(cost, 1, reg, b, f, g if pending else None, err_norm, backend=backend)
            if pending:
                done = done | check(err, ii - 1)
                if bool(done.all()):
                    break
            g = torch.where(done[:, None], g, g_new)
            f_new, _ = ops.sinkhorn_step(cost, 0, reg, a, g, None, err_norm, backend=backend)
            f = torch.where(done[:, None], f, f_new)
            pending = ii % check_every == 0
            bar.update(1)
        else:
            if pending:  # the last iteration's check (POT checks inside its loop)
                _, err = ops.sinkhorn_step(cost, 1, reg, b, f, g, err_norm, backend=backend)
                done = done | check(err, numItermax - 1)
    finally:
        bar.close()
    return SolveResult(f, g, niter, errs, done, n_sinkhorn=ii + 1)


def _dot(u: Tensor, v: Tensor) -> Tensor:
    return (u * v).sum(1)


def _keep_of(keep, m: int) -> int:
    if keep is None or keep == "auto":
        k = 32
    elif isinstance(keep, float):
        if not 0 < keep <= 1:
            raise ValueError(f"kernelkit.ot: keep as a ratio must be in (0, 1], got {keep}")
        k = math.ceil(keep * m)
    elif isinstance(keep, int) and not isinstance(keep, bool) and keep >= 1:
        k = keep
    else:
        raise ValueError(f"kernelkit.ot: keep must be 'auto', an int >= 1 (entries per row) or a ratio in (0, 1], "
                         f"got {keep!r}")
    return max(1, min(k, m, ops.MAX_KEEP))


def sns_loop(cost: Cost, a: Tensor, b: Tensor, reg: float, numItermax: int, stopThr: float, f: Tensor, g: Tensor,
             keep="auto", cg_max_iter: int = 500, verbose: bool = False, progress: bool = True, backend=None,
             res: Optional[SolveResult] = None, keep_tol: float = 1e-3, lam0: float = 1e-4) -> SolveResult:
    """Newton steps on the dual from (f, g) (see the module docstring)."""
    B, n = a.shape
    m = b.shape[1]
    res = res or SolveResult(f, g, [0] * B)
    k = _keep_of(keep, m)
    kmax = max(1, min(m, ops.MAX_KEEP))
    adaptive = keep is None or keep == "auto"
    r, c, obj = ops.marginals(cost, reg, f, g, a, b, backend=backend)
    done = torch.zeros(B, dtype=torch.bool, device=a.device)
    niter = [numItermax] * B
    bar = _progress(progress, numItermax, "sns")
    tiny = torch.finfo(a.dtype).eps
    lam = lam0
    try:
        for it in range(numItermax):
            gx, gy = a - r, b - c
            err = torch.sqrt(_dot(gx, gx) + _dot(gy, gy))
            err = torch.where(torch.isfinite(err), err, torch.full_like(err, float("inf")))
            res.err.append(err)
            newly = (err < stopThr) & ~done
            for bi in newly.nonzero().flatten().tolist():
                niter[bi] = it
            done |= newly
            if verbose:
                if it % 200 == 0:
                    print("{:5s}|{:12s}|{:6s}".format("It.", "Err", "keep") + "\n" + "-" * 26)
                print("{:5d}|{:8e}|{:6d}|".format(it, float(err.max()), k))
            bar.set_postfix(err=f"{float(err[~done].max()) if bool((~done).any()) else 0.0:.2e}", keep=k,
                            refresh=False)
            if bool(done.all()):
                break
            cols, vals = ops.sparsify(cost, reg, f, g, k, backend=backend)
            if adaptive:
                # The Hessian's error is the plan mass the sparsification drops: keep k entries per row so
                # that at most keep_tol of it is dropped (a k that is too small turns convergence linear).
                while k < kmax:
                    dropped = float(((1 - vals.sum((1, 2)) / r.sum(1).clamp_min(tiny))[~done]).max())
                    if not dropped > keep_tol:
                        break
                    k = min(2 * k, kmax)
                    cols, vals = ops.sparsify(cost, reg, f, g, k, backend=backend)
            res.dropped.append(float(((1 - vals.sum((1, 2)) / r.sum(1).clamp_min(tiny))[~done]).max()))
            # Inexact Newton: the CG tolerance follows the error (superlinear near the optimum).
            mass = a.sum(1).clamp_min(tiny)
            rel = float((err / mass)[~done].max())
            tol = min(0.1, max(rel, 1e-15))
            # Levenberg-Marquardt shift mu = lam * ||grad|| (as SSNS): far from the optimum, where some row sums
            # are tiny and a plain Newton step overshoots by orders of magnitude, it damps the step toward
            # gradient ascent; near the optimum mu -> 0 and the step is Newton's (superlinear).
            mu = lam * float(err[~done].max())
            zx, zy, iters, _ = ops.cg(cols, vals, r, c, gx, gy, mu, tol, cg_max_iter, backend=backend)
            dx, dy = reg * zx, reg * zy
            dx = torch.where(done[:, None] | ~torch.isfinite(dx), torch.zeros_like(dx), dx)
            dy = torch.where(done[:, None] | ~torch.isfinite(dy), torch.zeros_like(dy), dy)
            slope = _dot(torch.where(torch.isfinite(gx), gx, 0 * gx), dx) + _dot(gy, dy)
            alpha = torch.ones(B, dtype=a.dtype, device=a.device)
            accepted = done.clone()
            f_new, g_new, r_new, c_new, obj_new = f, g, r, c, obj
            for _ in range(30):
                ft = f + alpha[:, None] * dx
                gt = g + alpha[:, None] * dy
                rt, ct, ot_ = ops.marginals(cost, reg, ft, gt, a, b, backend=backend)
                gxt, gyt = a - rt, b - ct
                errt = torch.sqrt(_dot(gxt, gxt) + _dot(gyt, gyt))
                armijo = ot_ >= obj + 1e-4 * alpha * slope
                flat = (ot_ >= obj - 64 * tiny * (obj.abs() + reg * mass)) & (errt < err)
                ok = (armijo | flat) & torch.isfinite(ot_) & torch.isfinite(errt) & ~accepted
                sel = ok[:, None]
                f_new = torch.where(sel, ft, f_new)
                g_new = torch.where(sel, gt, g_new)
                r_new = torch.where(sel, rt, r_new)
                c_new = torch.where(sel, ct, c_new)
                obj_new = torch.where(ok, ot_, obj_new)
                accepted |= ok
                if bool(accepted.all()):
                    break
                alpha = torch.where(accepted, alpha, alpha * 0.5)
            full = bool((alpha[~done] == 1).all())
            lam = max(lam / 4, LAM_MIN) if full else min(lam * 4, LAM_MAX)
            if not bool(accepted.all()):
                # No step found for some problem: Sinkhorn sweeps (each increases the dual) and go on.
                sk = sinkhorn_loop(cost, a, b, reg, FALLBACK_SWEEPS, 0.0, f, g, False, False, backend)
                keep_old = (accepted & ~done)[:, None] | done[:, None]
                f_new = torch.where(keep_old, f_new, sk.f)
                g_new = torch.where(keep_old, g_new, sk.g)
                r_new, c_new, obj_new = ops.marginals(cost, reg, f_new, g_new, a, b, backend=backend)
                res.n_sinkhorn += FALLBACK_SWEEPS
            alpha = torch.where(accepted & ~done, alpha, torch.zeros_like(alpha))
            res.keep.append(k)
            res.obj.append(obj_new)
            res.cg_iters.append(iters)
            res.alpha.append(alpha)
            errt_all = torch.sqrt(_dot(a - r_new, a - r_new) + _dot(b - c_new, b - c_new))
            stalled = bool(((errt_all > 0.5 * err) & ~done).any())
            f, g, r, c, obj = f_new, g_new, r_new, c_new, obj_new
            # A full, barely damped step that did not halve the gradient: the kept entries are too few.
            if adaptive and stalled and full and lam < 1e-3 and k < kmax:
                k = min(2 * k, kmax)
            bar.update(1)
        else:
            gx, gy = a - r, b - c
            err = torch.sqrt(_dot(gx, gx) + _dot(gy, gy))
            newly = (err < stopThr) & ~done
            for bi in newly.nonzero().flatten().tolist():
                niter[bi] = numItermax
            done |= newly
    finally:
        bar.close()
    res.f, res.g = f, g
    res.niter = [res.n_sinkhorn + nt for nt in niter]
    res.converged = done
    res.n_newton = len(res.keep)
    return res


METHODS = ("sinkhorn_log", "sinkhorn", "sns")


def solve(cost: Cost, a: Tensor, b: Tensor, reg: float, method: str = "sinkhorn_log", numItermax: int = 1000,
          stopThr: float = 1e-9, verbose: bool = False, warmstart=None, progress: bool = True, backend=None,
          n_sinkhorn: int = 20, keep="auto", cg_max_iter: int = 500) -> SolveResult:
    """Solve a batch of entropic OT problems; a (B, n), b (B, m), the cost for B problems (or one shared).
    warmstart: (f, g) in cost units, or None (zeros).  Returns the potentials and the history."""
    if method not in METHODS:
        raise ValueError(f"kernelkit.ot: unknown method {method!r}; kernelkit has {', '.join(METHODS)} "
                         "(POT's other methods, e.g. 'sinkhorn_stabilized' or 'greenkhorn', are not implemented)")
    B, n = a.shape
    m = b.shape[1]
    if warmstart is None:
        f = a.new_zeros(B, n)
        g = b.new_zeros(B, m)
    else:
        f, g = warmstart
    cost = cost.expand(B)
    if method in ("sinkhorn_log", "sinkhorn"):
        return sinkhorn_loop(cost, a, b, reg, numItermax, stopThr, f, g, verbose, progress, backend)
    res = sinkhorn_loop(cost, a, b, reg, n_sinkhorn, 0.0, f, g, False, progress, backend)
    res.err = []
    return sns_loop(cost, a, b, reg, numItermax, stopThr, res.f, res.g, keep, cg_max_iter, verbose, progress,
                    backend, res)


def dual_value(cost: Cost, reg: float, f: Tensor, g: Tensor, a: Tensor, b: Tensor, backend=None) -> Tensor:
    """The regularized OT cost at converged potentials (B,), differentiable by the envelope theorem:
    d/dC = P, d/da = f, d/db = g, d/dx = sum_j P_ij dC/dx_i (f and g are held fixed)."""
    _, _, obj = ops.marginals(cost, reg, f.detach(), g.detach(), a, b, backend=backend)
    return obj
