"""ot ops (python/kernelkit/ot/ops.py) through the user functions, on every backend that runs here, against
the float64 reference (python/kernelkit/ot/reference.py): the seven ops' forward for dense costs (own and
shared with batch stride 0, row stride > m) and the three point kinds (p = 1, 1.5, 3), odd sizes, batch 1
and 3, empty batch / n = 0 / m = 0, zero weights (-inf potentials, never NaN), NaN-poisoned outputs;
gradients (gradcheck in float64 of every differentiable op, torch and cpu backends); custom-op
registration (opcheck, torch.compile fullgraph forward + backward); bad input through the user functions.

Inputs are drawn in float64, rounded to the tested dtype, and the reference runs in float64 on the rounded
values.  The Triton backend (interpreted on CPU) runs tiny problems only; tests/test_ot_triton.py covers
its kernels in depth.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch

import kernelkit
from kernelkit.ot import ops
from kernelkit.ot import reference as ref
from helpers import TOL, assert_close

INF = float("inf")
DTYPES = [torch.float32, torch.float64]
CPU_BACKENDS = ["torch", "cpu"]

# (name, kind, p): a dense cost per problem (a column slice of a wider buffer: row stride > m), one dense
# cost shared by the batch (batch stride 0), and the point kinds
COSTS = [("matrix", "matrix", 0.0), ("matrix_shared", "matrix", 0.0), ("sqeuclidean", "sqeuclidean", 2.0),
         ("euclidean_pow_1", "euclidean_pow", 1.0), ("euclidean_pow_1.5", "euclidean_pow", 1.5),
         ("minkowski_pow_1", "minkowski_pow", 1.0), ("minkowski_pow_3", "minkowski_pow", 3.0)]
COST_IDS = [c[0] for c in COSTS]
POINT_COSTS = [c for c in COSTS if c[1] != "matrix"]

# (B, n, m, zero weights): odd sizes, batch 1 and 3, 1 x 1, empty batch, n = 0, m = 0
SHAPES = [(1, 7, 13, False), (3, 33, 17, False), (1, 1, 1, False), (3, 5, 4, True), (2, 9, 6, True),
          (0, 3, 4, False), (2, 0, 5, False), (2, 5, 0, False)]
TINY_SHAPES = [(1, 7, 5, False), (2, 4, 3, True), (2, 0, 3, False)]


def _interp() -> bool:
    return not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"


def _triton_ok() -> bool:
    return kernelkit.backends("cpu").get("triton") == "available" and _interp()


@dataclass
class Problem:
    """B problems: the cost (ops.Cost in the tested dtype) and its float64 dense matrix C, weights a, b
    (zeros at some entries when asked), potentials f, g (-inf where the weight is 0), weights wr, wc,
    u, v, scale; ``t`` in the tested dtype, ``r`` the same rounded values in float64."""
    cost: ops.Cost
    C: torch.Tensor
    t: dict
    r: dict
    reg: float
    dtype: torch.dtype
    B: int
    n: int
    m: int


def make_problem(cost, dtype, B, n, m, zeros=False, reg=0.5, D=3, seed=0, grad=False) -> Problem:
    name, kind, p = cost
    gen = torch.Generator().manual_seed(seed)
    r64 = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    v = dict(a=r64(B, n) + 0.1, b=r64(B, m) + 0.1, f=r64(B, n) - 0.5, g=r64(B, m) - 0.5, wr=r64(B, n) + 0.1,
             wc=r64(B, m) + 0.1, u=r64(B, n) - 0.5, v=r64(B, m) - 0.5, scale=r64(B) + 0.5)
    if zeros:
        if n > 1:
            v["a"][:, ::3] = 0.0
            v["f"][:, ::3] = -INF
        if m > 1:
            v["b"][:, 1::4] = 0.0
            v["g"][:, 1::4] = -INF
    v = {k: t.to(dtype) for k, t in v.items()}
    r = {k: t.double() for k, t in v.items()}
    if kind == "matrix":
        if name == "matrix_shared":
            M = (2 * r64(n, m)).to(dtype)
            Mt = M[None].expand(B, n, m)
        else:
            buf = torch.full((B, n, m + 5), float("nan"), dtype=dtype)
            buf[:, :, 2:2 + m] = (2 * r64(B, n, m)).to(dtype)
            Mt = buf[:, :, 2:2 + m]
        if grad:
            Mt = Mt.detach().requires_grad_()
        c = ops.Cost.matrix(Mt)
        C = Mt.detach().double()
    else:
        x = r64(1 if name == "sqeuclidean" else B, n, D).to(dtype)   # sqeuclidean: x shared by the batch
        y = r64(B, m, D).to(dtype)
        c = ops.Cost.points(x, y, kind=kind, p=p)
        C = ref.point_cost(c.kind, c.p, c.x.double(), c.y.double())
    return Problem(c, C, v, r, reg, dtype, B, n, m)


def check(out, want, dtype, what):
    """out == want to TOL[dtype] (relative Frobenius), no NaN, the same infinities at the same places."""
    assert out.shape == want.shape, f"{what}: shape {tuple(out.shape)} != {tuple(want.shape)}"
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}"
    o = out.detach().double().cpu()
    assert not torch.isnan(o).any(), f"{what}: NaN in the output (an unwritten, poisoned element?)"
    assert not torch.isnan(want).any(), f"{what}: NaN in the reference"
    io, iw = torch.isinf(o), torch.isinf(want)
    assert torch.equal(io, iw) and torch.equal(o[io], want[iw]), f"{what}: infinities differ"
    assert_close(torch.where(io, 0.0, o), torch.where(iw, 0.0, want), dtype, what)


def backends_and_shapes(backend):
    return TINY_SHAPES if backend == "triton" else SHAPES


BACKEND_PARAMS = CPU_BACKENDS + [pytest.param("triton", marks=pytest.mark.skipif(
    not _triton_ok(), reason="triton on CPU tensors needs the interpreter (GPU: tests/test_ot_cuda.py)"))]


def _costs_for(backend):
    # the interpreter is slow: a dense, a shared dense and one point kind of each family
    return COSTS if backend != "triton" else [COSTS[0], COSTS[1], COSTS[4], COSTS[6]]


# ---- forward against the reference ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ot_sinkhorn_step_matches_reference(poison, backend, dtype):
    """Both axes, each error norm (0 inf, 1 L1, 2 L2 and the names), with and without the old potential."""
    for cost in _costs_for(backend):
        for i, (B, n, m, zeros) in enumerate(backends_and_shapes(backend)):
            pr = make_problem(cost, dtype, B, n, m, zeros, seed=i)
            T, R = pr.t, pr.r
            norms = ((0, 1), (1, 2), (0, "inf"), (1, "l1"), (1, 0), (0, "l2"))
            for axis, norm in (norms if backend != "triton" else norms[1:3]):
                w, other, pot = ("a", "g", "f") if axis == 0 else ("b", "f", "g")
                new, err = ops.sinkhorn_step(pr.cost, axis, pr.reg, T[w], T[other], T[pot], norm, backend=backend)
                rnew, rerr = ref.sinkhorn_step_reference(pr.C, axis, pr.reg, R[w], R[other], R[pot],
                                                         ops.NORMS[norm])
                what = f"{cost[0]} {(B, n, m)} axis {axis} norm {norm}"
                check(new, rnew, dtype, "pot_new " + what)
                check(err, rerr, dtype, "err " + what)
                new2, err2 = ops.sinkhorn_step(pr.cost, axis, pr.reg, T[w], T[other], backend=backend)
                assert err2 is None
                check(new2, rnew, dtype, "pot_new without pot " + what)
            if zeros and n > 1 and m > 1:   # a zero weight gives -inf, never NaN
                assert torch.isneginf(new[:, 0]).all() if axis == 0 else torch.isneginf(new[:, 1]).all()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ot_marginals_matches_reference(poison, backend, dtype):
    """Plain and weighted marginals, the dual objective with and without zero weights."""
    for cost in _costs_for(backend):
        for i, (B, n, m, zeros) in enumerate(backends_and_shapes(backend)):
            pr = make_problem(cost, dtype, B, n, m, zeros, seed=10 + i)
            T, R = pr.t, pr.r
            what = f"{cost[0]} {(B, n, m)}"
            r, c, obj = ops.marginals(pr.cost, pr.reg, T["f"], T["g"], T["a"], T["b"], backend=backend)
            rr, rc, ro = ref.marginals_reference(pr.C, pr.reg, R["f"], R["g"], R["a"], R["b"])
            check(r, rr, dtype, "r " + what)
            check(c, rc, dtype, "c " + what)
            check(obj, ro, dtype, "obj " + what)
            r, c, obj = ops.marginals(pr.cost, pr.reg, T["f"], T["g"], wr=T["wr"], wc=T["wc"], backend=backend)
            rr, rc, _ = ref.marginals_reference(pr.C, pr.reg, R["f"], R["g"], wr=R["wr"], wc=R["wc"])
            assert obj is None
            check(r, rr, dtype, "r weighted " + what)
            check(c, rc, dtype, "c weighted " + what)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ot_plan_matches_reference(poison, backend, dtype):
    for cost in _costs_for(backend):
        for i, (B, n, m, zeros) in enumerate(backends_and_shapes(backend)):
            pr = make_problem(cost, dtype, B, n, m, zeros, seed=20 + i)
            P = ops.plan(pr.cost, pr.reg, pr.t["f"], pr.t["g"], backend=backend)
            check(P, ref.plan_reference(pr.C, pr.reg, pr.r["f"], pr.r["g"]), dtype, f"P {cost[0]} {(B, n, m)}")
            assert P.is_contiguous()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ot_sparsify_matches_reference(poison, backend, dtype):
    """The reference's columns (random keys: no near-ties at these sizes), in increasing order, values
    P_ij; k = 1, a middle k and k = m; -inf keys (g_j = -inf) rank last, the smaller column first."""
    triton = backend == "triton"   # (its select passes are slow under the interpreter)
    for cost in (_costs_for(backend) if not triton else [COSTS[1]]):
        for i, (B, n, m, zeros) in enumerate(backends_and_shapes(backend)):
            pr = make_problem(cost, dtype, B, n, m, zeros, seed=30 + i)
            for k in sorted({1, max(1, (m + 1) // 2), max(m, 1)} if not triton else {max(1, (m + 1) // 2)}):
                cols, vals = ops.sparsify(pr.cost, pr.reg, pr.t["f"], pr.t["g"], k, backend=backend)
                rcols, rvals = ref.sparsify_reference(pr.C, pr.reg, pr.r["f"], pr.r["g"], k)
                what = f"{cost[0]} {(B, n, m)} k={k}"
                if n == 0 or m == 0 or B == 0:
                    assert cols.numel() == 0 and vals.numel() == 0, what
                    continue
                assert cols.dtype == torch.int32 and cols.shape == (B, n, k), what
                assert torch.equal(cols, rcols), "cols " + what
                check(vals, rvals, dtype, "vals " + what)


def _sparse(dtype, B, n, m, k, seed, zeros=False, cost=COSTS[0]):
    pr = make_problem(cost, dtype, B, n, m, zeros, seed=seed)
    cols, vals64 = ref.sparsify_reference(pr.C, pr.reg, pr.r["f"], pr.r["g"], k)
    r64, c64, _ = ref.marginals_reference(pr.C, pr.reg, pr.r["f"], pr.r["g"])
    gen = torch.Generator().manual_seed(seed + 1)
    vx, vy = torch.randn(B, n, generator=gen, dtype=torch.float64), torch.randn(B, m, generator=gen,
                                                                                 dtype=torch.float64)
    t = {k_: v_.to(dtype) for k_, v_ in dict(vals=vals64, r=r64, c=c64, vx=vx, vy=vy).items()}
    return cols, t, {k_: v_.double() for k_, v_ in t.items()}


HVP_SHAPES = [(1, 7, 13, 4), (3, 33, 17, 17), (1, 1, 1, 1), (2, 9, 6, 2), (0, 3, 4, 2), (2, 0, 5, 3), (2, 5, 0, 0)]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ot_hvp_matches_reference(poison, backend, dtype):
    shapes = HVP_SHAPES if backend != "triton" else [(2, 7, 5, 3), (1, 1, 1, 1)]
    for i, (B, n, m, k) in enumerate(shapes):
        cols, T, R = _sparse(dtype, B, n, m, k, 40 + i, zeros=(i == 3))
        for shift in (0.0, 0.3):
            yx, yy = ops.hvp(cols, T["vals"], T["r"], T["c"], T["vx"], T["vy"], shift, backend=backend)
            rx, ry = ref.hvp_reference(cols, R["vals"], R["r"], R["c"], shift, R["vx"], R["vy"])
            check(yx, rx, dtype, f"yx {(B, n, m, k)} shift {shift}")
            check(yy, ry, dtype, f"yy {(B, n, m, k)} shift {shift}")


def _dense_H(cols, vals, r, c, shift):
    """The operator of kk_ot_hvp as dense (B, n + m, n + m) float64 matrices."""
    B, n, k = cols.shape
    m = c.shape[1]
    S = torch.zeros(B, n, m, dtype=torch.float64).scatter_add_(2, cols.long(), vals.double())
    H = torch.zeros(B, n + m, n + m, dtype=torch.float64)
    H[:, :n, :n] = torch.diag_embed(r.double() + shift)
    H[:, n:, n:] = torch.diag_embed(c.double() + shift)
    H[:, :n, n:] = S
    H[:, n:, :n] = S.transpose(1, 2)
    return H


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ot_cg_solves_the_system(poison, backend, dtype):
    """z solves H z = rhs (a dense float64 solve) to the accuracy the tolerance and the conditioning
    allow; the reported residual is the true one; float64 iterations agree with the reference's
    algorithm; a zero rhs gives z = 0 in 0 iterations; max_iter = 0 returns the initial guess."""
    shapes = HVP_SHAPES[:4] if backend != "triton" else [(2, 7, 5, 3)]
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    for i, (B, n, m, k) in enumerate(shapes):
        cols, T, R = _sparse(dtype, B, n, m, k, 50 + i)
        shift = 0.2
        gen = torch.Generator().manual_seed(i)
        rx, ry = (torch.randn(B, n, generator=gen, dtype=torch.float64).to(dtype),
                  torch.randn(B, m, generator=gen, dtype=torch.float64).to(dtype))
        rx[0] = 0.0 if B > 1 else rx[0]
        if B > 1:
            ry[0] = 0.0                      # a zero right-hand side in problem 0
        zx, zy, iters, resid = ops.cg(cols, T["vals"], T["r"], T["c"], rx, ry, shift, tol, 1000, backend=backend)
        H = _dense_H(cols, R["vals"], R["r"], R["c"], shift)
        rhs = torch.cat([rx, ry], 1).double()
        z = torch.linalg.solve(H, rhs[..., None])[..., 0]
        cond = torch.linalg.cond(H).max().item()
        got = torch.cat([zx, zy], 1)
        assert not torch.isnan(got).any()
        err = (got.double() - z).norm().item() / z.norm().item()
        assert err <= 4 * cond * max(tol, torch.finfo(dtype).eps), f"{(B, n, m, k)}: error {err:.3e} cond {cond:.1f}"
        true_res = ((rhs - (H @ got.double()[..., None])[..., 0]).norm(dim=1) /
                    rhs.norm(dim=1).clamp_min(1e-300))
        assert iters.dtype == torch.int32 and iters.shape == (B,) and resid.shape == (B,)
        assert (resid <= tol).all() and (true_res <= 10 * tol + 8 * torch.finfo(dtype).eps * cond).all()
        if B > 1:
            assert iters[0] == 0 and resid[0] == 0 and (got[0] == 0).all()
        if dtype == torch.float64:
            _, _, ri, _ = ref.cg_reference(cols, R["vals"], R["r"], R["c"], shift, rx.double(), ry.double(),
                                           torch.zeros_like(rx, dtype=torch.float64),
                                           torch.zeros_like(ry, dtype=torch.float64), tol, 1000)
            assert (iters.long() - ri.long()).abs().max() <= 1, (iters, ri)
        z0 = (torch.ones_like(rx), torch.ones_like(ry))
        zx0, zy0, it0, _ = ops.cg(cols, T["vals"], T["r"], T["c"], rx + 1, ry + 1, shift, tol, 0, z0=z0,
                                  backend=backend)
        assert (it0 == 0).all() and torch.equal(zx0, z0[0]) and torch.equal(zy0, z0[1])


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ot_points_grad_matches_reference(poison, backend, dtype):
    """The envelope gradient (scale and u, v absent) and the weighted one (scale, u, v)."""
    costs = POINT_COSTS if backend != "triton" else [COSTS[4], COSTS[6]]
    for cost in costs:
        for i, (B, n, m, zeros) in enumerate(backends_and_shapes(backend)):
            pr = make_problem(cost, dtype, B, n, m, zeros, seed=60 + i)
            T, R = pr.t, pr.r
            c = pr.cost.expand(B) if B > 0 else pr.cost
            x64, y64 = c.x.double(), c.y.double()
            if x64.shape[0] != B:
                x64 = x64.expand(B, -1, -1)
            what = f"{cost[0]} {(B, n, m)}"
            for extra in ({}, dict(scale=T["scale"], u=T["u"], v=T["v"])):
                dx, dy = ops.points_grad(pr.cost, pr.reg, T["f"], T["g"], backend=backend, **extra)
                rx, ry = ref.points_grad_reference(pr.cost.kind, pr.cost.p, x64, y64, pr.reg, R["f"], R["g"],
                                                   *(R[k] if extra else None for k in ("scale", "u", "v")))
                check(dx, rx, dtype, "dx " + what)
                check(dy, ry, dtype, "dy " + what)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ot_empty_batch_of_a_transposed_cost(poison, backend):
    """An empty (B = 0) transposed cost: torch calls an empty tensor contiguous whatever its strides, so
    the row stride handed to the kernel must not come from them."""
    M = torch.rand(0, 4, 5, dtype=torch.float64).transpose(1, 2)   # (0, 5, 4), strides (20, 1, 5)
    cost = ops.Cost.matrix(M)
    f, g = torch.zeros(0, 5, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.float64)
    new, err = ops.sinkhorn_step(cost, 0, 0.5, f + 1, g, f, backend=backend)
    assert new.shape == (0, 5) and err.shape == (0,)
    r, c, obj = ops.marginals(cost, 0.5, f, g, f, g, backend=backend)
    assert r.shape == (0, 5) and c.shape == (0, 4) and obj.shape == (0,)
    assert ops.plan(cost, 0.5, f, g, backend=backend).shape == (0, 5, 4)
    cols, vals = ops.sparsify(cost, 0.5, f, g, 2, backend=backend)
    assert cols.shape == (0, 5, 2) and vals.shape == (0, 5, 2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ot_points_subgradient_zero_at_coincident_points(poison, backend):
    """Where the cost is not differentiable (x_i = y_j with euclidean_pow p = 1; a zero coordinate
    difference with minkowski_pow p = 1) the subgradient 0 is used: finite, the reference's."""
    x = torch.tensor([[[0.0, 0.0], [1.0, 0.5]]], dtype=torch.float64)
    y = torch.tensor([[[0.0, 0.0], [1.0, 0.2], [0.3, 0.5]]], dtype=torch.float64)
    f, g = torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64)
    for kind, p in (("euclidean_pow", 1.0), ("minkowski_pow", 1.0), ("euclidean_pow", 0.5)):
        cost = ops.Cost.points(x, y, kind=kind, p=p)
        dx, dy = ops.points_grad(cost, 0.5, f, g, backend=backend)
        rx, ry = ref.points_grad_reference(cost.kind, p, x, y, 0.5, f, g)
        check(dx, rx, torch.float64, f"dx {kind} {p}")
        check(dy, ry, torch.float64, f"dy {kind} {p}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ot_tiny_reg_and_far_potentials_never_nan(poison, backend):
    """reg = 1e-4 of the cost scale: the log-sum-exp keeps every step finite; a far-off trial point
    (overflowing P) gives inf sums, not an error."""
    pr = make_problem(COSTS[2], torch.float64, 2, 9, 7, reg=1e-4)
    T = pr.t
    g = torch.zeros_like(T["g"])
    for _ in range(3):
        f, _ = ops.sinkhorn_step(pr.cost, 0, 1e-4, T["a"], g, backend=backend)
        g, err = ops.sinkhorn_step(pr.cost, 1, 1e-4, T["b"], f, g, backend=backend)
        assert torch.isfinite(f).all() and torch.isfinite(g).all() and torch.isfinite(err).all()
    r, c, obj = ops.marginals(pr.cost, 1e-4, f, g, T["a"], T["b"], backend=backend)
    assert torch.isfinite(r).all() and torch.isfinite(c).all() and torch.isfinite(obj).all()
    r, c, obj = ops.marginals(pr.cost, 1e-4, f + 1.0, g, T["a"], T["b"], backend=backend)
    assert not torch.isnan(r).any() and torch.isinf(r).any()


# ---- gradients -----------------------------------------------------------------------------------------

def _gp(cost, B=2, n=4, m=5, seed=0):
    """A float64 problem for gradcheck (n, m <= 6): leaves that require grad."""
    pr = make_problem(cost, torch.float64, B, n, m, seed=seed)
    leaves = {k: v.clone().requires_grad_() for k, v in pr.t.items()}
    if cost[1] == "matrix":
        mat = pr.cost.mat
        base = mat[0].detach().clone() if cost[0] == "matrix_shared" else mat.detach().clone()
        leaves["M"] = base.requires_grad_()
        shared = cost[0] == "matrix_shared"
        mk = lambda M, *_: ops.Cost.matrix(M[None].expand(B, n, m) if shared else M)  # noqa: E731
    else:
        leaves["x"] = pr.cost.x.detach().clone().requires_grad_()
        leaves["y"] = pr.cost.y.detach().clone().requires_grad_()
        mk = lambda x, y: ops.Cost.points(x, y, kind=cost[1], p=cost[2])  # noqa: E731
    return pr, leaves, mk


GRAD_COSTS = [COSTS[0], COSTS[1], COSTS[2], COSTS[4], COSTS[6]]
GRAD_IDS = [c[0] for c in GRAD_COSTS]


def _cost_leaves(cost, L):
    return (L["M"],) if cost[1] == "matrix" else (L["x"], L["y"])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cost", GRAD_COSTS, ids=GRAD_IDS)
def test_ot_sinkhorn_step_gradcheck(backend, cost):
    """pot_new with respect to other, w and the cost (matrix or points), both axes."""
    pr, L, mk = _gp(cost)
    cl = _cost_leaves(cost, L)
    nc = len(cl)
    for axis, w, other in ((0, "a", "g"), (1, "b", "f")):
        def fn(*args):
            return ops.sinkhorn_step(mk(*args[:nc]), axis, pr.reg, args[nc], args[nc + 1], backend=backend)[0]
        assert torch.autograd.gradcheck(fn, (*cl, L[w], L[other]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cost", GRAD_COSTS, ids=GRAD_IDS)
def test_ot_marginals_gradcheck(backend, cost):
    """r, c and obj with respect to f, g, a, b, wr, wc and the cost: no weights, wr only (separable for
    the r cotangent only) and both (non-separable: the points' gradient through the dense path)."""
    pr, L, mk = _gp(cost, seed=1)
    cl = _cost_leaves(cost, L)
    nc = len(cl)

    def fn(*args):
        c = mk(*args[:nc])
        f, g, a, b, wr, wc = (list(args[nc:]) + [None, None])[:6]
        return ops.marginals(c, pr.reg, f, g, a, b, wr, wc, backend=backend)
    base = (*cl, L["f"], L["g"], L["a"], L["b"])
    assert torch.autograd.gradcheck(fn, base)
    assert torch.autograd.gradcheck(fn, (*base, L["wr"]))
    assert torch.autograd.gradcheck(fn, (*base, L["wr"], L["wc"]))
    # only the column marginal with wc (no objective): the other separable case
    assert torch.autograd.gradcheck(
        lambda *args: ops.marginals(mk(*args[:nc]), pr.reg, args[nc], args[nc + 1], wc=args[nc + 2],
                                    backend=backend)[1], (*cl, L["f"], L["g"], L["wc"]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cost", GRAD_COSTS, ids=GRAD_IDS)
def test_ot_plan_and_sparsify_gradcheck(backend, cost):
    pr, L, mk = _gp(cost, seed=2)
    cl = _cost_leaves(cost, L)
    nc = len(cl)
    assert torch.autograd.gradcheck(
        lambda *a: ops.plan(mk(*a[:nc]), pr.reg, a[nc], a[nc + 1], backend=backend), (*cl, L["f"], L["g"]))
    for k in (1, 3):
        assert torch.autograd.gradcheck(
            lambda *a: ops.sparsify(mk(*a[:nc]), pr.reg, a[nc], a[nc + 1], k, backend=backend)[1],
            (*cl, L["f"], L["g"]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ot_hvp_and_cg_gradcheck(backend):
    """hvp with respect to vals, r, c, vx, vy; cg (tight tol) with respect to vals, r, c and the rhs."""
    cols, T, _ = _sparse(torch.float64, 2, 4, 5, 3, 70)
    L = {k: v.clone().requires_grad_() for k, v in T.items()}
    args = (L["vals"], L["r"], L["c"], L["vx"], L["vy"])
    for shift in (0.0, 0.4):
        assert torch.autograd.gradcheck(
            lambda vals, r, c, vx, vy: ops.hvp(cols, vals, r, c, vx, vy, shift, backend=backend), args)
    assert torch.autograd.gradcheck(
        lambda vals, r, c, bx, by: ops.cg(cols, vals, r, c, bx, by, 0.3, 1e-14, 1000, backend=backend)[:2], args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cost", [COSTS[2], COSTS[4], COSTS[6]], ids=["sqeuclidean", "euclidean_pow_1.5",
                                                                       "minkowski_pow_3"])
def test_ot_points_grad_gradcheck(backend, cost):
    """The second derivatives: dx, dy with respect to x, y, f, g, scale, u, v."""
    pr, L, mk = _gp(cost, B=2, n=3, m=4, seed=3)
    fn = lambda x, y, f, g, s, u, v: ops.points_grad(mk(x, y), pr.reg, f, g, s, u, v, backend=backend)  # noqa
    assert torch.autograd.gradcheck(fn, (L["x"], L["y"], L["f"], L["g"], L["scale"], L["u"], L["v"]))
    assert torch.autograd.gradcheck(lambda x, y, f, g: ops.points_grad(mk(x, y), pr.reg, f, g, backend=backend),
                                    (L["x"], L["y"], L["f"], L["g"]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ot_zero_weight_gradients_are_finite(backend):
    """Zero weights (-inf potentials): the gradients of a step and of the objective carry no NaN."""
    pr = make_problem(COSTS[0], torch.float64, 2, 6, 5, zeros=True, seed=4)
    M = pr.cost.mat.detach().clone().requires_grad_()
    a, b, f, g = (pr.t[k].clone().requires_grad_() for k in ("a", "b", "f", "g"))
    g2 = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    fn, _ = ops.sinkhorn_step(ops.Cost.matrix(M), 0, pr.reg, a, g2, backend=backend)
    _, _, obj = ops.marginals(ops.Cost.matrix(M), pr.reg, f, g, a, b, backend=backend)
    (torch.where(torch.isfinite(fn), fn, 0 * fn).sum() + obj.sum()).backward()
    for name, t in (("M", M), ("a", a), ("b", b), ("f", f), ("g", g)):
        assert t.grad is not None and not torch.isnan(t.grad).any(), name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cost", [COSTS[1], COSTS[4]], ids=["matrix_shared", "euclidean_pow_1.5"])
def test_ot_gradients_of_a_sum_stride_zero_cotangents(backend, cost):
    """loss = out.sum() hands every backward an expanded (all strides 0) cotangent, which the ops called
    inside the backward must read as a (B, n) array: each op's input gradients against the float64
    reference's autograd."""
    pr, L, mk = _gp(cost, B=2, n=4, m=5, seed=8)
    cl = _cost_leaves(cost, L)
    keys = ("f", "g", "a", "b", "wr", "wc", "u", "v", "scale")

    def run(use_ref):
        leaves = [t.detach().clone().requires_grad_() for t in cl] + [L[k].detach().clone().requires_grad_()
                                                                       for k in keys]
        cost_, (f, g, a, b, wr, wc, u, v, s) = mk(*leaves[:len(cl)]), leaves[len(cl):]
        C = cost_.dense()
        outs = []
        if use_ref:
            outs += [ref.sinkhorn_step_reference(C, 0, pr.reg, a, g)[0], ref.sinkhorn_step_reference(C, 1, pr.reg, b, f)[0]]
            outs += list(ref.marginals_reference(C, pr.reg, f, g, a, b, wr, wc))
            outs += list(ref.marginals_reference(C, pr.reg, f, g, a, b))
            outs += [ref.plan_reference(C, pr.reg, f, g), ref.sparsify_reference(C, pr.reg, f, g, 2)[1]]
            if cost_.kind != ref.MATRIX:
                outs += list(ref.points_grad_reference(cost_.kind, cost_.p, cost_.x, cost_.y, pr.reg, f, g, s, u, v))
        else:
            outs += [ops.sinkhorn_step(cost_, 0, pr.reg, a, g, backend=backend)[0],
                     ops.sinkhorn_step(cost_, 1, pr.reg, b, f, backend=backend)[0]]
            outs += list(ops.marginals(cost_, pr.reg, f, g, a, b, wr, wc, backend=backend))
            outs += list(ops.marginals(cost_, pr.reg, f, g, a, b, backend=backend))
            outs += [ops.plan(cost_, pr.reg, f, g, backend=backend), ops.sparsify(cost_, pr.reg, f, g, 2, backend=backend)[1]]
            if cost_.kind != ref.MATRIX:
                outs += list(ops.points_grad(cost_, pr.reg, f, g, s, u, v, backend=backend))
        grads = []
        for o in outs:   # one op's output at a time: its .sum() (a stride-0 cotangent)
            gs = torch.autograd.grad(o.sum(), leaves, retain_graph=True, allow_unused=True)
            grads.append([torch.zeros_like(lf) if gr is None else gr for lf, gr in zip(leaves, gs)])
        return grads
    got, want = run(False), run(True)
    names = [f"cost{i}" for i in range(len(cl))] + list(keys)
    for i, (go, wa) in enumerate(zip(got, want)):
        for name, a_, b_ in zip(names, go, wa):
            assert_close(a_, b_, torch.float64, f"output {i} d/d{name}")
    cols, T, R = _sparse(torch.float64, 2, 4, 5, 3, 73)
    Lh = [T[k].clone().requires_grad_() for k in ("vals", "r", "c", "vx", "vy")]
    Lr = [R[k].clone().requires_grad_() for k in ("vals", "r", "c", "vx", "vy")]
    def grad(out, wrt):
        gs = torch.autograd.grad(out, wrt, allow_unused=True)
        return [torch.zeros_like(w) if g_ is None else g_ for w, g_ in zip(wrt, gs)]
    for j in range(2):
        gh = grad(ops.hvp(cols, *Lh, 0.3, backend=backend)[j].sum(), Lh)
        gr = grad(ref.hvp_reference(cols, Lr[0], Lr[1], Lr[2], 0.3, Lr[3], Lr[4])[j].sum(), Lr)
        for a_, b_ in zip(gh, gr):
            assert_close(a_, b_, torch.float64, f"hvp output {j}")
        gc = grad(ops.cg(cols, *Lh, 0.3, 1e-14, 1000, backend=backend)[j].sum(), Lh)
        H = _dense_H(cols, Lr[0], Lr[1], Lr[2], 0.3)   # differentiable dense solve as the reference
        z = torch.linalg.solve(H, torch.cat([Lr[3], Lr[4]], 1)[..., None])[..., 0]
        gs = grad((z[:, :4] if j == 0 else z[:, 4:]).sum(), Lr)
        for a_, b_ in zip(gc, gs):
            assert_close(a_, b_, torch.float64, f"cg output {j}")


# ---- custom-op registration ----------------------------------------------------------------------------

def test_ot_opcheck_every_op():
    op = torch.ops.kernelkit
    for cost in (COSTS[0], COSTS[1], COSTS[4]):
        pr = make_problem(cost, torch.float64, 2, 4, 5, seed=5)
        T = {k: v.clone().requires_grad_() for k, v in pr.t.items()}
        c = pr.cost
        mat = None if c.mat is None else c.mat.detach().clone().requires_grad_()
        x = None if c.x is None else c.x.expand(2, -1, -1).detach().clone().requires_grad_()
        y = None if c.y is None else c.y.detach().clone().requires_grad_()
        ca = (mat, x, y, c.kind, c.p)
        for axis, w, other, pot in ((0, "a", "g", "f"), (1, "b", "f", None)):
            torch.library.opcheck(op.ot_sinkhorn_step, (*ca, axis, pr.reg, T[w], T[other],
                                                        None if pot is None else T[pot].detach(), 1, "cpu"))
        for wr, wc, want in ((None, None, (True, True, True)), (T["wr"], T["wc"], (True, False, False)),
                             (T["wr"], None, (False, True, True))):
            torch.library.opcheck(op.ot_marginals, (*ca, pr.reg, T["f"], T["g"], T["a"], T["b"], wr, wc, *want, "cpu"))
        torch.library.opcheck(op.ot_plan, (*ca, pr.reg, T["f"], T["g"], "cpu"))
        # (inputs without grad: opcheck's own loss, sum(out.sum().abs()), fails on an int32 first output;
        # the gradient of the values is gradcheck'ed above)
        torch.library.opcheck(op.ot_sparsify, tuple(t.detach() if isinstance(t, torch.Tensor) else t
                                                    for t in (*ca, pr.reg, T["f"], T["g"], 3, "cpu")))
        if x is not None:
            torch.library.opcheck(op.ot_points_grad, (x, y, c.kind, c.p, pr.reg, T["f"], T["g"], T["scale"],
                                                      T["u"], T["v"], "cpu"))
            torch.library.opcheck(op.ot_points_grad, (x, y, c.kind, c.p, pr.reg, T["f"], T["g"], None, None, None,
                                                      "cpu"))
    cols, T, _ = _sparse(torch.float64, 2, 4, 5, 3, 71)
    L = {k: v.clone().requires_grad_() for k, v in T.items()}
    torch.library.opcheck(op.ot_hvp, (cols, L["vals"], L["r"], L["c"], L["vx"], L["vy"], 0.3, "cpu"))
    torch.library.opcheck(op.ot_cg, (cols, L["vals"], L["r"], L["c"], L["vx"], L["vy"], torch.zeros_like(T["vx"]),
                                     torch.zeros_like(T["vy"]), 0.3, 1e-14, 1000, "cpu"))


def test_ot_torch_compile_fullgraph_fwd_bwd():
    """sinkhorn_step + marginals + plan in one compiled graph (cpu backend), forward and backward, against
    the eager float64 reference backend."""
    torch._dynamo.reset()
    pr = make_problem(COSTS[0], torch.float32, 2, 7, 5, seed=6)
    reg = pr.reg

    def loss(M, a, b, f, backend):
        cost = ops.Cost.matrix(M)
        g1, _ = ops.sinkhorn_step(cost, 1, reg, b, f, backend=backend)
        f1, err = ops.sinkhorn_step(cost, 0, reg, a, g1, f, err_norm=2, backend=backend)
        r, c, obj = ops.marginals(cost, reg, f1, g1, a, b, backend=backend)
        P = ops.plan(cost, reg, f1, g1, backend=backend)
        return obj.sum() + (P * M).sum() + r.square().sum() + c.sum() + err.sum().detach()

    compiled = torch.compile(lambda M, a, b, f: loss(M, a, b, f, "cpu"), fullgraph=True)
    base = (pr.cost.mat.detach().contiguous(), pr.t["a"], pr.t["b"], pr.t["f"])
    leaves = [t.clone().requires_grad_() for t in base]
    out = compiled(*leaves)
    out.backward()
    refl = [t.clone().double().requires_grad_() for t in base]
    want = loss(*refl, "torch")
    want.backward()
    assert_close(out, want, torch.float32, "compiled loss")
    for a, r, name in zip(leaves, refl, ("M", "a", "b", "f")):
        assert_close(a.grad, r.grad, torch.float32, f"compiled grad {name}")


# ---- bad input -----------------------------------------------------------------------------------------

def _bad_cases():
    """(name, thunk, exception type, text the message must contain)."""
    pr = make_problem(COSTS[0], torch.float64, 2, 4, 5, seed=7)
    c, T = pr.cost, pr.t
    a, b, f, g = T["a"], T["b"], T["f"], T["g"]
    x, y = torch.rand(2, 4, 3, dtype=torch.float64), torch.rand(2, 5, 3, dtype=torch.float64)
    pc = ops.Cost.points(x, y)
    cols, S, _ = _sparse(torch.float64, 2, 4, 5, 3, 72)
    vals, r, cc, vx, vy = S["vals"], S["r"], S["c"], S["vx"], S["vy"]
    bad_cols = cols.clone()
    bad_cols[1, 2, 0] = 5
    neg_cols = cols.clone()
    neg_cols[0, 0, 0] = -1
    st = ops.sinkhorn_step
    cases = [
        ("matrix not a tensor", lambda: ops.Cost.matrix([[1.0]]), TypeError, "cost matrix must be a torch.Tensor"),
        ("matrix 1-D", lambda: ops.Cost.matrix(torch.zeros(3)), ValueError, "cost matrix must be (n, m) or (B, n, m)"),
        ("matrix int", lambda: ops.Cost.matrix(torch.zeros(3, 3, dtype=torch.int64)), TypeError, "floating point"),
        ("points kind", lambda: ops.Cost.points(x, y, kind="l2"), ValueError, "cost must be 'sqeuclidean'"),
        ("points x not tensor", lambda: ops.Cost.points(x.tolist(), y), TypeError, "x must be a torch.Tensor"),
        ("points y rank", lambda: ops.Cost.points(x, y[0, 0]), ValueError, "y must be (n, D) or (B, n, D)"),
        ("points dim mismatch", lambda: ops.Cost.points(x, y[..., :2]), ValueError, "same dimension D"),
        ("points dim 0", lambda: ops.Cost.points(x[..., :0], y[..., :0]), ValueError, "point dimension D"),
        ("points dim > 1024", lambda: ops.Cost.points(torch.zeros(1, 2, 1025), torch.zeros(1, 3, 1025)), ValueError,
         "point dimension D must be in 1..1024"),
        ("points dtype", lambda: ops.Cost.points(x, y.float()), ValueError, "one dtype and device"),
        ("points int", lambda: ops.Cost.points(x.long(), y.long()), TypeError, "x must be floating point"),
        ("points batch", lambda: ops.Cost.points(x, torch.rand(3, 5, 3, dtype=torch.float64)), ValueError,
         "batch sizes differ"),
        ("euclidean p 0", lambda: ops.Cost.points(x, y, kind="euclidean_pow", p=0.0), ValueError, "p must be finite"),
        ("euclidean p nan", lambda: ops.Cost.points(x, y, kind="euclidean_pow", p=float("nan")), ValueError,
         "p must be finite and > 0"),
        ("minkowski p 0.5", lambda: ops.Cost.points(x, y, kind="minkowski_pow", p=0.5), ValueError,
         "p must be finite and >= 1"),
        ("minkowski p inf", lambda: ops.Cost.points(x, y, kind="minkowski_pow", p=INF), ValueError,
         "p must be finite and >= 1"),
        ("reg 0", lambda: st(c, 0, 0.0, a, g), ValueError, "reg must be finite and > 0"),
        ("reg negative", lambda: ops.plan(c, -1.0, f, g), ValueError, "reg must be finite and > 0"),
        ("reg nan", lambda: ops.marginals(c, float("nan"), f, g), ValueError, "reg must be finite and > 0"),
        ("reg inf", lambda: ops.sparsify(c, INF, f, g, 2), ValueError, "reg must be finite and > 0"),
        ("reg str", lambda: ops.plan(c, "0.5", f, g), TypeError, "reg must be a float"),
        ("axis", lambda: st(c, 2, 0.5, a, g), ValueError, "axis must be 0 or 1"),
        ("err_norm", lambda: st(c, 0, 0.5, a, g, f, err_norm=3), ValueError, "err_norm must be"),
        ("err_norm str", lambda: st(c, 0, 0.5, a, g, f, err_norm="l3"), ValueError, "err_norm must be"),
        ("w shape", lambda: st(c, 0, 0.5, b, g), ValueError, "w must have shape (2, 4)"),
        ("other shape", lambda: st(c, 1, 0.5, b, g), ValueError, "other must have shape (2, 4)"),
        ("pot shape", lambda: st(c, 0, 0.5, a, g, g), ValueError, "pot must have shape (2, 4)"),
        ("w dtype", lambda: st(c, 0, 0.5, a.float(), g), ValueError, "w must have the cost's dtype"),
        ("w not tensor", lambda: st(c, 0, 0.5, a.tolist(), g), TypeError, "w must be a torch.Tensor"),
        ("f batch", lambda: ops.plan(c, 0.5, torch.zeros(3, 4, dtype=torch.float64), g), ValueError,
         "f must have shape"),
        ("g shape", lambda: ops.marginals(c, 0.5, f, f), ValueError, "g must have shape (2, 5)"),
        ("a without b", lambda: ops.marginals(c, 0.5, f, g, a), ValueError, "give both a and b"),
        ("wc shape", lambda: ops.marginals(c, 0.5, f, g, wc=a), ValueError, "wc must have shape"),
        ("k 0", lambda: ops.sparsify(c, 0.5, f, g, 0), ValueError, "k must be in 1..min(m, 4096)"),
        ("k > m", lambda: ops.sparsify(c, 0.5, f, g, 6), ValueError, "k must be in 1..min(m, 4096) = 5"),
        ("k float", lambda: ops.sparsify(c, 0.5, f, g, 2.0), TypeError, "k must be an int"),
        ("k bool", lambda: ops.sparsify(c, 0.5, f, g, True), TypeError, "k must be an int"),
        ("shift < 0", lambda: ops.hvp(cols, vals, r, cc, vx, vy, -0.1), ValueError, "shift must be finite and >= 0"),
        ("shift nan", lambda: ops.cg(cols, vals, r, cc, vx, vy, float("nan")), ValueError, "shift must be finite"),
        ("tol 0", lambda: ops.cg(cols, vals, r, cc, vx, vy, tol=0.0), ValueError, "tol must be finite and > 0"),
        ("tol nan", lambda: ops.cg(cols, vals, r, cc, vx, vy, tol=float("nan")), ValueError, "tol must be finite"),
        ("max_iter", lambda: ops.cg(cols, vals, r, cc, vx, vy, max_iter=-1), ValueError, "max_iter must be an int"),
        ("cols too big", lambda: ops.hvp(bad_cols, vals, r, cc, vx, vy), ValueError, "cols has an entry outside"),
        ("cols negative", lambda: ops.cg(neg_cols, vals, r, cc, vx, vy), ValueError, "cols has an entry outside"),
        ("cols int64", lambda: ops.hvp(cols.long(), vals, r, cc, vx, vy), ValueError, "cols must be an int32"),
        ("vals shape", lambda: ops.hvp(cols, vals[..., :2], r, cc, vx, vy), ValueError, "vals must have cols' shape"),
        ("r shape", lambda: ops.hvp(cols, vals, cc, cc, vx, vy), ValueError, "r must have shape (2, 4)"),
        ("vy shape", lambda: ops.hvp(cols, vals, r, cc, vx, vx), ValueError, "vy must be (2, 5)"),
        ("rhs dtype", lambda: ops.cg(cols, vals, r, cc, vx.float(), vy), ValueError, "rhs_x must be (2, 4)"),
        ("r dtype", lambda: ops.hvp(cols, vals, r.float(), cc, vx, vy), ValueError, "r must have vals' dtype"),
        ("points_grad matrix", lambda: ops.points_grad(c, 0.5, f, g), ValueError, "needs a point-cloud cost"),
        ("points_grad u", lambda: ops.points_grad(pc, 0.5, f, g, u=g), ValueError, "u must have shape (2, 4)"),
        ("points_grad scale", lambda: ops.points_grad(pc, 0.5, f, g, scale=torch.ones(3, dtype=torch.float64)),
         ValueError, "scale must have shape (2,)"),
        ("backend", lambda: ops.plan(c, 0.5, f, g, backend="gpu"), ValueError, "backend must be one of"),
    ]
    return cases


BAD = _bad_cases()


@pytest.mark.parametrize("case", BAD, ids=[c_[0] for c_ in BAD])
def test_ot_bad_input_raises_naming_the_argument(case):
    name, thunk, exc, text = case
    with pytest.raises(Exception) as e:
        thunk()
    assert e.type is exc, f"{name}: {e.type.__name__} instead of {exc.__name__}: {e.value}"
    assert text in str(e.value), f"{name}: message does not name the argument ({text!r}): {e.value}"
