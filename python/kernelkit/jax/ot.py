"""ot for JAX: the log-domain Sinkhorn half-step on kk_ot_sinkhorn_step_{cpu,cuda}, the plan's marginals and
dual objective (kk_ot_marginals), and on them a Sinkhorn solver (``lax.while_loop``) and the regularized
OT cost with its envelope-theorem gradients (``sinkhorn_cost`` for a cost matrix, ``sinkhorn_points`` for
point clouds through kk_ot_points_grad).

Conventions are those of :mod:`kernelkit.ot` (POT's ``sinkhorn_log``): potentials in cost units,
P_ij = exp((f_i + g_j - C_ij) / reg).  A :class:`Cost` is a dense matrix (B, n, m) or two point clouds
x (B, n, D), y (B, m, D) (the cost computed on the fly, never stored); a cost with batch 1 is shared by
every problem.  Weights and potentials are (B, n) / (B, m).  All of it works under ``jax.jit``, and
``jax.vmap`` adds leading batch dimensions to any argument.

Differentiation mirrors the torch ops: :func:`sinkhorn_step` has the exact vjp in w, other and the
cost (matrix or points; the err output is not differentiable); :func:`dual_value` (the dual objective
D(f, g) = <a, f> + <b, g> - reg sum P) has its exact vjp in the cost, a, b, f and g; the solvers
:func:`solve` do not differentiate the iterations, and :func:`sinkhorn_cost` / :func:`sinkhorn_points`
give the envelope-theorem gradient at the solution (d/dC = P, d/da = f, d/db = g, d/dx = sum_j P_ij
dC/dx_i), as ``kernelkit.ot.sinkhorn_cost`` / ``sinkhorn_points`` do.  :func:`marginals` itself has no
derivative rule (differentiating it raises JAX's error for ffi_call).
"""
from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._common import call, check_array, check_float, spec

MATRIX, SQEUCLIDEAN, EUCLIDEAN_POW, MINKOWSKI_POW = 0, 1, 2, 3
KINDS = {"sqeuclidean": SQEUCLIDEAN, "euclidean_pow": EUCLIDEAN_POW, "minkowski_pow": MINKOWSKI_POW}
NORMS = {"inf": 0, "l1": 1, "l2": 2, 0: 0, 1: 1, 2: 2}
MAX_DIM = 1024
CHECK_EVERY = 10  # as kernelkit.ot.solvers (POT checks the error every 10 iterations)


# ---- the cost ----------------------------------------------------------------------------------------
@jax.tree_util.register_pytree_node_class
class Cost:
    """A batch of costs: ``Cost.matrix(C)`` (C (n, m) or (B, n, m)) or ``Cost.points(x, y, kind, p)``
    (x (n, D) / (B, n, D), y (m, D) / (B, m, D)).  A pytree: pass it through jit / vmap."""

    def __init__(self, kind: int, p: float, mat, x, y):
        self.kind, self.p, self.mat, self.x, self.y = kind, p, mat, x, y

    def tree_flatten(self):
        return (self.mat, self.x, self.y), (self.kind, self.p)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(aux[0], aux[1], *children)

    @staticmethod
    def matrix(C, fn: str = "kernelkit.jax.ot.Cost.matrix") -> "Cost":
        check_array(C, "the cost matrix", fn)
        if C.ndim not in (2, 3):
            raise ValueError(f"{fn}: the cost matrix must be (n, m) or (B, n, m), got shape {tuple(C.shape)}")
        return Cost(MATRIX, 2.0, C[None] if C.ndim == 2 else C, None, None)

    @staticmethod
    def points(x, y, kind: str = "sqeuclidean", p: float = 2.0, fn: str = "kernelkit.jax.ot.Cost.points") -> "Cost":
        if kind not in KINDS:
            raise ValueError(f"{fn}: cost must be 'sqeuclidean', 'euclidean_pow' or 'minkowski_pow', got {kind!r}")
        for name, t in (("x", x), ("y", y)):
            check_array(t, name, fn)
            if t.ndim not in (2, 3):
                raise ValueError(f"{fn}: {name} must be (n, D) or (B, n, D), got shape {tuple(t.shape)}")
        if x.ndim != y.ndim:
            raise ValueError(f"{fn}: x and y must both be 2-D or both 3-D, got {x.ndim}-D and {y.ndim}-D")
        if x.dtype != y.dtype:
            raise TypeError(f"{fn}: x and y must have one dtype, got {np.dtype(x.dtype).name} and "
                            f"{np.dtype(y.dtype).name}")
        if x.ndim == 2:
            x, y = x[None], y[None]
        if x.shape[2] != y.shape[2]:
            raise ValueError(f"{fn}: x and y must have the same dimension D, got {x.shape[2]} and {y.shape[2]}")
        if not 1 <= x.shape[2] <= MAX_DIM:
            raise ValueError(f"{fn}: the point dimension D must be in 1..{MAX_DIM}, got {x.shape[2]}")
        if x.shape[0] != y.shape[0]:
            if x.shape[0] == 1:
                x = jnp.broadcast_to(x, (y.shape[0],) + x.shape[1:])
            elif y.shape[0] == 1:
                y = jnp.broadcast_to(y, (x.shape[0],) + y.shape[1:])
            else:
                raise ValueError(f"{fn}: x and y batch sizes differ: {x.shape[0]} and {y.shape[0]}")
        kd = KINDS[kind]
        p = float(p)
        if kd == SQEUCLIDEAN:
            p = 2.0
        elif kd == EUCLIDEAN_POW and not (math.isfinite(p) and p > 0):
            raise ValueError(f"{fn}: p must be finite and > 0 for 'euclidean_pow', got {p}")
        elif kd == MINKOWSKI_POW and not (math.isfinite(p) and p >= 1):
            raise ValueError(f"{fn}: p must be finite and >= 1 for 'minkowski_pow', got {p}")
        return Cost(kd, p, None, x, y)

    @property
    def shape(self) -> tuple[int, int, int]:
        if self.kind == MATRIX:
            return tuple(self.mat.shape)
        return self.x.shape[0], self.x.shape[1], self.y.shape[1]

    @property
    def dtype(self):
        return (self.mat if self.kind == MATRIX else self.x).dtype

    def arrays(self) -> tuple:
        return (self.mat,) if self.kind == MATRIX else (self.x, self.y)

    def dense(self):
        """The cost matrix (B, n, m) (materialized for point clouds; for tests and small problems)."""
        if self.kind == MATRIX:
            return self.mat
        return _point_cost(self.kind, self.p, self.x, self.y)


def _point_cost(kind, p, x, y):
    diff = x[:, :, None, :] - y[:, None, :, :]
    if kind == SQEUCLIDEAN:
        return (diff * diff).sum(-1)
    if kind == EUCLIDEAN_POW:
        return (diff * diff).sum(-1) ** (p / 2)
    return (jnp.abs(diff) ** p).sum(-1)


def _check_reg(reg, fn: str) -> float:
    if isinstance(reg, bool) or not isinstance(reg, (int, float, np.floating, np.integer)):
        raise TypeError(f"{fn}: reg must be a Python float (a static value), got {type(reg).__name__}")
    reg = float(reg)
    if not (math.isfinite(reg) and reg > 0):
        raise ValueError(f"{fn}: reg must be finite and > 0, got {reg}")
    return reg


def _vec(t, name: str, B: int, length: int, dtype, fn: str, optional: bool = False):
    if t is None:
        if optional:
            return None
        raise ValueError(f"{fn}: {name} is required")
    check_array(t, name, fn)
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[1] != length or t.shape[0] not in (1, B):
        raise ValueError(f"{fn}: {name} must have shape ({B}, {length}) (or ({length},)), got {tuple(t.shape)}")
    if np.dtype(t.dtype) != np.dtype(dtype):
        raise TypeError(f"{fn}: {name} must have the cost's dtype {np.dtype(dtype).name}, got "
                        f"{np.dtype(t.dtype).name}")
    return jnp.broadcast_to(t, (B, length))


def _batch(cost: Cost, *vs) -> int:
    B = cost.shape[0]
    for v in vs:
        if v is not None and getattr(v, "ndim", 0) == 2 and v.shape[0] != 1 and B == 1:
            B = v.shape[0]
    return B


def _check_cost(cost, fn: str) -> Cost:
    if not isinstance(cost, Cost):
        raise TypeError(f"{fn}: cost must be a kernelkit.jax.ot.Cost (Cost.matrix / Cost.points), got "
                        f"{type(cost).__name__}")
    check_float(fn, "the cost", cost.arrays()[0], **({"y": cost.y} if cost.kind != MATRIX else {}))
    return cost


def _suffix(kind: int) -> str:
    return "m" if kind == MATRIX else "p"


def _i32(v) -> np.int32:
    return np.int32(v)


def _f64(v) -> np.float64:
    return np.float64(v)


# ---- raw custom calls ----------------------------------------------------------------------------------
def _step_call(kind, p, axis, reg, err_norm, has_pot, carr, w, other, pot):
    B = w.shape[0]
    outs = (spec(w.shape, w.dtype), spec((B,), w.dtype))
    return call(f"kernelkit_ot_step_{_suffix(kind)}", outs, *carr, w, other, pot, kind=_i32(kind), p=_f64(p),
                axis=_i32(axis), reg=_f64(reg), err_norm=_i32(err_norm), has_pot=_i32(has_pot))


def _marg_call(kind, p, reg, carr, f, g, a=None, b=None, wr=None, wc=None):
    B, n = f.shape
    m = g.shape[1]
    flags = (1 if a is not None else 0) | (2 if wr is not None else 0) | (4 if wc is not None else 0)
    a = f if a is None else a
    b = g if b is None else b
    wr = f if wr is None else wr
    wc = g if wc is None else wc
    outs = (spec((B, n), f.dtype), spec((B, m), f.dtype), spec((B,), f.dtype))
    return call(f"kernelkit_ot_marginals_{_suffix(kind)}", outs, *carr, f, g, a, b, wr, wc, kind=_i32(kind),
                p=_f64(p), reg=_f64(reg), flags=_i32(flags))


def _pg_call(kind, p, reg, x, y, f, g, scale=None, u=None, v=None):
    flags = (1 if scale is not None else 0) | (2 if u is not None else 0) | (4 if v is not None else 0)
    B = f.shape[0]
    scale = jnp.zeros((B,), f.dtype) if scale is None else scale
    u = f if u is None else u
    v = g if v is None else v
    outs = (spec((B,) + x.shape[1:], x.dtype), spec((B,) + y.shape[1:], y.dtype))
    return call("kernelkit_ot_points_grad", outs, x, y, f, g, scale, u, v, kind=_i32(kind), p=_f64(p),
                reg=_f64(reg), flags=_i32(flags))


def _unbroadcast(t, B_src: int):
    """A gradient computed per problem (B, ...) for a cost array with batch B_src (1: shared)."""
    return t.sum(0, keepdims=True) if (B_src == 1 and t.shape[0] != 1) else t


def _plan_dense(C, reg, f, g):
    """P (B, n, m) in jnp (for the gradients of a dense cost matrix)."""
    return jnp.exp((f[:, :, None] + g[:, None, :] - C) / reg)


def _fin(t):
    return jnp.where(jnp.isfinite(t), t, jnp.zeros_like(t))


# ---- sinkhorn_step with its vjp -----------------------------------------------------------------------
@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _step(static, carr, w, other, pot):
    kind, p, axis, reg, err_norm, has_pot = static
    return _step_call(kind, p, axis, reg, err_norm, has_pot, carr, w, other, pot)


def _step_fwd(static, carr, w, other, pot):
    out = _step(static, carr, w, other, pot)
    return out, (carr, w, other, pot, out[0])


def _step_bwd(static, res, cts):
    kind, p, axis, reg, err_norm, has_pot = static
    carr, w, other, pot, pot_new = res
    gpot = cts[0]
    # pot_new_k = reg log w_k - reg LSE(...): the softmax weights are P(pot_new, other) / w_k.
    zero_w = w <= 0
    u = jnp.where(zero_w, 0, gpot / jnp.where(zero_w, 1, w))
    pot_fin = jnp.where(zero_w, 0, pot_new)
    f, g = (pot_fin, other) if axis == 0 else (other, pot_fin)
    if axis == 0:
        _, c, _ = _marg_call(kind, p, reg, carr, f, g, wr=u)
        gother = -c
    else:
        r, _, _ = _marg_call(kind, p, reg, carr, f, g, wc=u)
        gother = -r
    gw = jnp.where(zero_w, 0, reg * u)
    if kind == MATRIX:
        (mat,) = carr
        P = _plan_dense(mat, reg, f, g)
        if axis == 0:
            gm = jnp.where(zero_w[:, :, None], 0, P * u[:, :, None])
        else:
            gm = jnp.where(zero_w[:, None, :], 0, P * u[:, None, :])
        gcarr = (_unbroadcast(gm, mat.shape[0]).astype(mat.dtype),)
    else:
        x, y = carr
        uu, vv = (u, None) if axis == 0 else (None, u)
        gx, gy = _pg_call(kind, p, reg, x, y, f, g, jnp.zeros((w.shape[0],), w.dtype), uu, vv)
        gcarr = (_unbroadcast(gx, x.shape[0]), _unbroadcast(gy, y.shape[0]))
    return gcarr, gw, gother, jnp.zeros_like(pot)


_step.defvjp(_step_fwd, _step_bwd)


def sinkhorn_step(cost: Cost, axis: int, reg: float, w, other, pot=None, err_norm=1):
    """One log-domain half-step, as ``kernelkit.ot.sinkhorn_step``: axis 0 updates f from g (w = a, other
    = g), axis 1 updates g from f (w = b, other = f); with ``pot`` (the potential being replaced) the
    marginal error of the plan (pot, other) on this axis comes out too, in the norm ``err_norm`` (1, 2 or
    'inf').  Returns (pot_new (B, len), err (B,) or None).  Differentiable in w, other and the cost."""
    fn = "kernelkit.jax.ot.sinkhorn_step"
    cost = _check_cost(cost, fn)
    if axis not in (0, 1):
        raise ValueError(f"{fn}: axis must be 0 or 1, got {axis!r}")
    if err_norm not in NORMS:
        raise ValueError(f"{fn}: err_norm must be 1, 2 or 'inf', got {err_norm!r}")
    reg = _check_reg(reg, fn)
    _, n, m = cost.shape
    B = _batch(cost, w, other, pot)
    if cost.shape[0] not in (1, B):
        raise ValueError(f"{fn}: the cost has batch {cost.shape[0]}, the weights {B}")
    lw, lo = (n, m) if axis == 0 else (m, n)
    w = _vec(w, "w", B, lw, cost.dtype, fn)
    other = _vec(other, "other", B, lo, cost.dtype, fn)
    pot = _vec(pot, "pot", B, lw, cost.dtype, fn, optional=True)
    has_pot = pot is not None
    static = (cost.kind, cost.p, axis, reg, NORMS[err_norm], int(has_pot))
    pot_new, err = _step(static, cost.arrays(), w, other, pot if has_pot else w)
    return pot_new, (err if has_pot else None)


def marginals(cost: Cost, reg: float, f, g, a=None, b=None, wr=None, wc=None):
    """(r, c, obj): r = P wc, c = P^T wr (None weights: ones) and the dual objective D(f, g) (None without
    a and b), as ``kernelkit.ot.marginals``.  Not differentiable (see :func:`dual_value`)."""
    fn = "kernelkit.jax.ot.marginals"
    cost = _check_cost(cost, fn)
    reg = _check_reg(reg, fn)
    _, n, m = cost.shape
    B = _batch(cost, f, g)
    if cost.shape[0] not in (1, B):
        raise ValueError(f"{fn}: the cost has batch {cost.shape[0]}, the potentials {B}")
    f, g = _vec(f, "f", B, n, cost.dtype, fn), _vec(g, "g", B, m, cost.dtype, fn)
    a, b = _vec(a, "a", B, n, cost.dtype, fn, True), _vec(b, "b", B, m, cost.dtype, fn, True)
    wr, wc = _vec(wr, "wr", B, n, cost.dtype, fn, True), _vec(wc, "wc", B, m, cost.dtype, fn, True)
    if (a is None) != (b is None):
        raise ValueError(f"{fn}: give both a and b (for the objective) or neither")
    r, c, obj = _marg_call(cost.kind, cost.p, reg, cost.arrays(), f, g, a, b, wr, wc)
    return r, c, (obj if a is not None else None)


# ---- the dual objective with its vjp (the envelope theorem at the optimum) ------------------------------
@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dual(static, carr, f, g, a, b):
    kind, p, reg = static
    return _marg_call(kind, p, reg, carr, f, g, a, b)[2]


def _dual_fwd(static, carr, f, g, a, b):
    kind, p, reg = static
    r, c, obj = _marg_call(kind, p, reg, carr, f, g, a, b)
    return obj, (carr, f, g, a, b, r, c)


def _dual_bwd(static, res, go):
    kind, p, reg = static
    carr, f, g, a, b, r, c = res
    # D = <a, f> + <b, g> - reg sum P:  dD/df = a - P 1, dD/dg = b - P^T 1, dD/da = f, dD/db = g,
    # dD/dC_ij = P_ij, and through C(x, y) the points gradient with the weights P (scale = go).
    gf = go[:, None] * (a - r)
    gg = go[:, None] * (b - c)
    ga = go[:, None] * _fin(f)
    gb = go[:, None] * _fin(g)
    if kind == MATRIX:
        (mat,) = carr
        gm = go[:, None, None] * _plan_dense(mat, reg, f, g)
        gcarr = (_unbroadcast(gm, mat.shape[0]).astype(mat.dtype),)
    else:
        x, y = carr
        gx, gy = _pg_call(kind, p, reg, x, y, f, g, go)
        gcarr = (_unbroadcast(gx, x.shape[0]), _unbroadcast(gy, y.shape[0]))
    return gcarr, gf, gg, ga, gb


_dual.defvjp(_dual_fwd, _dual_bwd)


def dual_value(cost: Cost, reg: float, f, g, a, b):
    """D(f, g) = <a, f> + <b, g> - reg sum_ij P_ij (B,), with its exact vjp in the cost, f, g, a and b.  At
    converged potentials (held fixed) this is the regularized OT cost and its gradient the envelope
    theorem's: d/dC = P, d/da = f, d/db = g, d/dx = sum_j P_ij dC/dx_i."""
    fn = "kernelkit.jax.ot.dual_value"
    cost = _check_cost(cost, fn)
    reg = _check_reg(reg, fn)
    _, n, m = cost.shape
    B = _batch(cost, f, g, a, b)
    if cost.shape[0] not in (1, B):
        raise ValueError(f"{fn}: the cost has batch {cost.shape[0]}, the weights {B}")
    f, g = _vec(f, "f", B, n, cost.dtype, fn), _vec(g, "g", B, m, cost.dtype, fn)
    a, b = _vec(a, "a", B, n, cost.dtype, fn), _vec(b, "b", B, m, cost.dtype, fn)
    return _dual((cost.kind, cost.p, reg), cost.arrays(), f, g, a, b)


# ---- the solver -----------------------------------------------------------------------------------------
class SolveResult(NamedTuple):
    """Potentials f (B, n), g (B, m) in cost units; per problem the iteration it converged at (POT's
    niter: numItermax - 1 when it did not), whether it converged and the last checked error (the L2
    norm of b - P^T 1); n_sinkhorn the iterations run (as kernelkit.ot.SolveResult.n_sinkhorn)."""
    f: jax.Array
    g: jax.Array
    niter: jax.Array
    converged: jax.Array
    err: jax.Array
    n_sinkhorn: jax.Array


def _sinkhorn_loop(cost: Cost, a, b, reg: float, numItermax: int, stopThr: float, f, g) -> SolveResult:
    """kernelkit.ot.solvers.sinkhorn_loop (POT's sinkhorn_log) as a lax.while_loop, step for step: the g
    update, then the f update; every CHECK_EVERY-th iteration the L2 error of the column marginal (out of
    the next g step) is checked against stopThr; converged problems are frozen."""
    carr = cost.arrays()
    kind, p = cost.kind, cost.p
    B = a.shape[0]

    def step(axis, w, other, pot):
        return _step_call(kind, p, axis, reg, 2, 1, carr, w, other, pot)

    def cond(s):
        ii, _, _, _, _, _, stop, _ = s
        return (ii < numItermax) & ~stop

    def body(s):
        ii, f, g, done, niter, pending, _, err_last = s
        g_new, err = step(1, b, f, g)
        newly = pending & (err < stopThr) & ~done
        niter = jnp.where(newly, ii - 1, niter)
        done = done | newly
        err_last = jnp.where(pending, err, err_last)
        stop = pending & jnp.all(done)
        g = jnp.where(done[:, None], g, g_new)
        f_new, _ = step(0, a, g, f)
        f = jnp.where(done[:, None], f, f_new)
        return ii + 1, f, g, done, niter, ii % CHECK_EVERY == 0, stop, err_last

    init = (jnp.asarray(0, jnp.int32), f, g, jnp.zeros((B,), bool), jnp.full((B,), numItermax - 1, jnp.int32),
            jnp.asarray(False), jnp.asarray(False), jnp.full((B,), jnp.inf, a.dtype))
    ii, f, g, done, niter, pending, stop, err_last = jax.lax.while_loop(cond, body, init)
    # the last iteration's check (POT checks inside its loop)
    _, err = step(1, b, f, g)
    final = pending & ~stop
    newly = final & (err < stopThr) & ~done
    niter = jnp.where(newly, numItermax - 1, niter)
    done = done | newly
    err_last = jnp.where(final, err, err_last)
    return SolveResult(f, g, niter, done, err_last, ii)


def solve(cost: Cost, a, b, reg: float, numItermax: int = 1000, stopThr: float = 1e-9, warmstart=None) -> SolveResult:
    """Solve a batch of entropic OT problems by log-domain Sinkhorn (``kernelkit.ot.solve`` with
    method="sinkhorn_log"; same iterates, stopping rule and niter).  a (B, n) / (n,), b (B, m) / (m,),
    the cost for B problems or one shared; warmstart (f, g) in cost units or None (zeros).  numItermax
    and stopThr are static.  The iterations are not differentiated (the inputs are stop_gradient-ed;
    use :func:`sinkhorn_cost` / :func:`sinkhorn_points` / :func:`dual_value` for gradients)."""
    fn = "kernelkit.jax.ot.solve"
    cost = _check_cost(cost, fn)
    reg = _check_reg(reg, fn)
    if isinstance(numItermax, bool) or not isinstance(numItermax, (int, np.integer)) or numItermax < 0:
        raise ValueError(f"{fn}: numItermax must be an int >= 0, got {numItermax!r}")
    if not isinstance(stopThr, (int, float, np.floating)) or isinstance(stopThr, bool):
        raise TypeError(f"{fn}: stopThr must be a float, got {type(stopThr).__name__}")
    _, n, m = cost.shape
    B = _batch(cost, a, b)
    if cost.shape[0] not in (1, B):
        raise ValueError(f"{fn}: the cost has batch {cost.shape[0]}, the weights {B}")
    a = _vec(a, "a", B, n, cost.dtype, fn)
    b = _vec(b, "b", B, m, cost.dtype, fn)
    if warmstart is None:
        f = jnp.zeros((B, n), cost.dtype)
        g = jnp.zeros((B, m), cost.dtype)
    else:
        f = _vec(warmstart[0], "warmstart[0]", B, n, cost.dtype, fn)
        g = _vec(warmstart[1], "warmstart[1]", B, m, cost.dtype, fn)
    sg = jax.lax.stop_gradient
    cost = jax.tree_util.tree_map(sg, cost)
    return _sinkhorn_loop(cost, sg(a), sg(b), reg, int(numItermax), float(stopThr), sg(f), sg(g))


def _weights(w, name, B, L, dtype, fn):
    if w is None:
        return jnp.full((B, L), 1.0 / L, dtype)
    return _vec(w, name, B, L, dtype, fn)


def sinkhorn_cost(a, b, M, reg: float, numItermax: int = 1000, stopThr: float = 1e-9):
    """The regularized OT cost min_P <M, P> + reg sum P (log P - 1) (= the dual at the optimum), as
    ``kernelkit.ot.sinkhorn_cost`` (log-domain Sinkhorn): a (n,) or (B, n) (None: uniform), b likewise,
    M (n, m) or (B, n, m).  Returns a scalar for 1-D weights and a 2-D M, else (B,).  Differentiable in
    M, a and b by the envelope theorem (d/dM = P, d/da = f, d/db = g)."""
    fn = "kernelkit.jax.ot.sinkhorn_cost"
    cost = Cost.matrix(M, fn)
    batched = M.ndim == 3 or (a is not None and a.ndim == 2) or (b is not None and b.ndim == 2)
    return _cost_value(cost, a, b, reg, numItermax, stopThr, batched, fn)


def sinkhorn_points(x, y, reg: float, a=None, b=None, cost: str = "sqeuclidean", p: float = 2.0,
                    numItermax: int = 1000, stopThr: float = 1e-9):
    """Entropic OT between point clouds x (n, D) and y (m, D) (or (B, n, D), (B, m, D)), the cost computed
    on the fly, as ``kernelkit.ot.sinkhorn_points`` (log-domain Sinkhorn): the regularized OT cost (a
    scalar, or (B,)), differentiable in x, y, a and b by the envelope theorem (kk_ot_points_grad)."""
    fn = "kernelkit.jax.ot.sinkhorn_points"
    c = Cost.points(x, y, cost, p, fn)
    if c.shape[1] == 0 or c.shape[2] == 0:
        raise ValueError(f"{fn}: empty point cloud: x has {c.shape[1]} points, y has {c.shape[2]}")
    return _cost_value(c, a, b, reg, numItermax, stopThr, x.ndim == 3, fn)


def _cost_value(cost: Cost, a, b, reg, numItermax, stopThr, batched, fn):
    cost = _check_cost(cost, fn)
    reg = _check_reg(reg, fn)
    _, n, m = cost.shape
    B = _batch(cost, a, b)
    a = _weights(a, "a", B, n, cost.dtype, fn)
    b = _weights(b, "b", B, m, cost.dtype, fn)
    res = solve(cost, a, b, reg, numItermax, stopThr)
    sg = jax.lax.stop_gradient
    val = _dual((cost.kind, cost.p, reg), cost.arrays(), sg(res.f), sg(res.g), a, b)
    return val if batched else val[0]
