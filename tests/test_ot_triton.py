"""Triton ot kernels (kernels/ot.py) against the float64 reference (python/kernelkit/ot/reference.py).

Without a CUDA GPU the kernels run under the Triton interpreter: TRITON_INTERPRET=1 must be set before
triton is first imported (tests/conftest.py does it; when this file runs alone it sets it itself unless
triton was already imported without it, in which case the module is skipped).  Inputs are drawn in
float64, rounded to the tested dtype, and the reference runs in float64 on the rounded values.  The
interpreter is slow, so problems are tiny (n, m <= 24); one test reruns everything with tiles shrunk
below the problem sizes, so that the streamed loops, the cross-tile log-sum-exp rescaling, the atomics
of several blocks and the tie counting across tiles run too.
"""
from __future__ import annotations

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from triton_family import CUDA as _CUDA, load  # noqa: E402

ko, ref = load("ot")
from helpers import TOL, rel_err  # noqa: E402

DEVICE = "cuda" if _CUDA else "cpu"
DTYPES = [torch.float32, torch.float64]
INF = float("inf")

# (name, kind, p, D): a dense cost per problem with a row stride > m, one shared by the batch (batch
# stride 0), and the point kinds (shared x in sqeuclidean; D = 5 takes two coordinate chunks)
COSTS = [("matrix", ref.MATRIX, 0.0, 0), ("matrix_shared", ref.MATRIX, 0.0, 0),
         ("sqeuclidean", ref.SQEUCLIDEAN, 0.0, 3), ("euclidean_pow_1.5", ref.EUCLIDEAN_POW, 1.5, 5),
         ("minkowski_3", ref.MINKOWSKI_POW, 3.0, 2)]
POINT_COSTS = [c for c in COSTS if c[1] != ref.MATRIX]


class Problem:
    """B problems with a cost of one kind, potentials near the optimum's scale, weights; all rounded to
    `dtype` on DEVICE (self.t) and kept in float64 for the reference (self.r)."""

    def __init__(self, cost, dtype, B=2, n=13, m=21, reg=0.3, seed=0):
        name, kind, p, D = cost
        gen = torch.Generator().manual_seed(seed)
        r64 = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)   # noqa: E731
        self.kind, self.p, self.reg, self.dtype, self.B, self.n, self.m = kind, p, reg, dtype, B, n, m
        v = dict(f=0.2 * torch.randn(B, n, generator=gen, dtype=torch.float64) - 0.3,
                 g=0.2 * torch.randn(B, m, generator=gen, dtype=torch.float64) - 0.3,
                 a=r64(B, n) + 0.1, b=r64(B, m) + 0.1, wr=r64(B, n), wc=r64(B, m), u=r64(B, n) - 0.5,
                 v=r64(B, m) - 0.5, scale=r64(B) + 0.5)
        v = {k: t.to(dtype).double() for k, t in v.items()}
        self.r = dict(v)
        self.t = {k: t.to(DEVICE, dtype) for k, t in v.items()}
        self.r["M"] = self.t["M"] = self.r["x"] = self.t["x"] = self.r["y"] = self.t["y"] = None
        if kind == ref.MATRIX:
            if name == "matrix_shared":
                M = r64(1, n, m).to(dtype)
                self.t["M"] = M.to(DEVICE).expand(B, n, m)
                assert self.t["M"].stride(0) == 0
            else:   # a column slice of a wider NaN-filled buffer: row stride m + 7
                buf = torch.full((B, n, m + 7), float("nan"), dtype=dtype)
                buf[:, :, 3:3 + m] = r64(B, n, m).to(dtype)
                self.t["M"] = buf.to(DEVICE)[:, :, 3:3 + m]
                assert self.t["M"].stride(1) == m + 7
            self.r["M"] = self.t["M"].double().cpu()
        else:
            x = r64(1 if name == "sqeuclidean" else B, n, D).to(dtype).expand(B, n, D)
            y = r64(B, m, D).to(dtype)
            self.r["x"], self.r["y"] = x.double(), y.double()
            self.t["x"], self.t["y"] = x.to(DEVICE), y.to(DEVICE)
        self.C = ref.cost_of(kind, p, self.r["M"], self.r["x"], self.r["y"])

    def cost_args(self):
        return self.kind, self.p, self.t["M"], self.t["x"], self.t["y"]

    def check(self, out, want, what):
        assert out.dtype == self.dtype and out.shape == want.shape, what
        err = rel_err(out, want)
        assert err <= TOL[self.dtype], f"{what}: relative error {err:.3e} > {TOL[self.dtype]:.0e}"


def _ids(cases):
    return [c[0] for c in cases]


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cost", COSTS, ids=_ids(COSTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ot_sinkhorn_step_matches_reference(poison, dtype, cost):
    """Both axes, each error norm (L1 / L2 / inf), with and without the old potential."""
    pr = Problem(cost, dtype, seed=1)
    R, T = pr.r, pr.t
    for axis, norm in ((0, ref.NORM_L1), (1, ref.NORM_L2), (0, ref.NORM_INF), (1, ref.NORM_INF)):
        w, other, pot = ("a", "g", "f") if axis == 0 else ("b", "f", "g")
        new, err = ko.sinkhorn_step(*pr.cost_args(), axis, pr.reg, T[w], T[other], T[pot], norm)
        rnew, rerr = ref.sinkhorn_step_reference(pr.C, axis, pr.reg, R[w], R[other], R[pot], norm)
        pr.check(new, rnew, f"pot_new axis {axis}")
        pr.check(err, rerr, f"err axis {axis} norm {norm}")
        new2, err2 = ko.sinkhorn_step(*pr.cost_args(), axis, pr.reg, T[w], T[other], None, norm)
        assert err2 is None and torch.equal(new2, new)


@pytest.mark.parametrize("cost", COSTS, ids=_ids(COSTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ot_marginals_matches_reference(poison, dtype, cost):
    """Plain and weighted marginals and the dual objective; only what is asked for comes back."""
    pr = Problem(cost, dtype, seed=2)
    R, T = pr.r, pr.t
    r, c, obj = ko.marginals(*pr.cost_args(), pr.reg, T["f"], T["g"], T["a"], T["b"], None, None, True, True, True)
    rr, rc, ro = ref.marginals_reference(pr.C, pr.reg, R["f"], R["g"], R["a"], R["b"])
    pr.check(r, rr, "r")
    pr.check(c, rc, "c")
    pr.check(obj, ro, "obj")
    r, c, obj = ko.marginals(*pr.cost_args(), pr.reg, T["f"], T["g"], None, None, T["wr"], T["wc"], True, True, False)
    rr, rc, _ = ref.marginals_reference(pr.C, pr.reg, R["f"], R["g"], wr=R["wr"], wc=R["wc"])
    assert obj is None
    pr.check(r, rr, "r weighted")
    pr.check(c, rc, "c weighted")
    r, c, obj = ko.marginals(*pr.cost_args(), pr.reg, T["f"], T["g"], None, None, None, T["wc"], False, True, False)
    assert r is None and obj is None
    pr.check(c, ref.marginals_reference(pr.C, pr.reg, R["f"], R["g"])[1], "c alone")


@pytest.mark.parametrize("cost", COSTS, ids=_ids(COSTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ot_plan_matches_reference(poison, dtype, cost):
    pr = Problem(cost, dtype, seed=3)
    P = ko.plan(*pr.cost_args(), pr.reg, pr.t["f"], pr.t["g"])
    assert P.is_contiguous()
    pr.check(P, ref.plan_reference(pr.C, pr.reg, pr.r["f"], pr.r["g"]), "P")


# k = 1, a middle k and k = m (the whole row) spread over the costs (the interpreter is slow)
_SPARSIFY_K = {"matrix": (1, 7), "matrix_shared": (21,), "sqeuclidean": (7,), "euclidean_pow_1.5": (21,),
               "minkowski_3": (1,)}


@pytest.mark.parametrize("cost", COSTS, ids=_ids(COSTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ot_sparsify_matches_reference(poison, dtype, cost):
    """The same columns as the reference (random keys: no near-ties at this size), values P_ij."""
    pr = Problem(cost, dtype, n=8, seed=4)   # one block of rows a problem (the select passes are slow here)
    for k in _SPARSIFY_K[cost[0]]:
        cols, vals = ko.sparsify(*pr.cost_args(), pr.reg, pr.t["f"], pr.t["g"], k)
        rcols, rvals = ref.sparsify_reference(pr.C, pr.reg, pr.r["f"], pr.r["g"], k)
        assert cols.dtype == torch.int32 and cols.shape == (pr.B, pr.n, k)
        assert torch.equal(cols.cpu(), rcols), f"k = {k}"
        pr.check(vals, rvals, f"vals k = {k}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ot_sparsify_ties_nan_and_minus_inf(poison, dtype):
    """Exact ties go to the smaller column (also among -inf keys from g_j = -inf and NaN costs); a row
    with f_i = -inf keeps its columns with values 0."""
    pr = Problem(COSTS[0], dtype, B=2, n=8, m=20, seed=5)
    M = pr.t["M"].clone()                      # contiguous copy, then the special entries
    M[:, :, 5] = M[:, :, 2]
    M[:, :, 11] = M[:, :, 2]
    M[:, :, 17] = float("nan")
    M[0, 3, :] = 0.25
    g = pr.t["g"].clone()
    g[:, 5] = g[:, 2]
    g[:, 11] = g[:, 2]
    g[1, ::2] = -INF
    g[0, :] = torch.where(torch.arange(20, device=g.device) % 3 == 0, g[0, :], g[0, 0])
    f = pr.t["f"].clone()
    f[1, 4] = -INF
    Mr, gr, fr = M.double().cpu(), g.double().cpu(), f.double().cpu()
    for k in (2, 3, 11, 19):
        cols, vals = ko.sparsify(ref.MATRIX, 0.0, M, None, None, pr.reg, f, g, k)
        rcols, rvals = ref.sparsify_reference(Mr, pr.reg, fr, gr, k)
        assert torch.equal(cols.cpu(), rcols), f"k = {k}"
        # P_ij is NaN only at the NaN cost (column 17, kept for k = 19); 0 in the row with f_i = -inf
        assert not torch.isnan(vals[cols != 17]).any() and (vals[1, 4][cols[1, 4] != 17] == 0).all()
        torch.testing.assert_close(vals.double().cpu(), rvals, rtol=TOL[dtype], atol=0, equal_nan=True)


def _sparse_problem(dtype, B=2, n=13, m=21, k=6, seed=6):
    pr = Problem(COSTS[0], dtype, B=B, n=n, m=m, seed=seed)
    cols, vals = ref.sparsify_reference(pr.r["M"], pr.reg, pr.r["f"], pr.r["g"], k)
    r, c, _ = ref.marginals_reference(pr.r["M"], pr.reg, pr.r["f"], pr.r["g"])
    gen = torch.Generator().manual_seed(seed + 100)
    lo = dict(vals=vals, r=r, c=c, vx=torch.randn(B, n, generator=gen, dtype=torch.float64),
              vy=torch.randn(B, m, generator=gen, dtype=torch.float64))
    lo = {k_: v.to(dtype).double() for k_, v in lo.items()}
    t = {k_: v.to(DEVICE, dtype) for k_, v in lo.items()}
    return pr, cols, lo, t


@pytest.mark.parametrize("shift", [0.0, 0.05])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ot_hvp_matches_reference(poison, dtype, shift):
    pr, cols, lo, t = _sparse_problem(dtype)
    yx, yy = ko.hvp(cols.to(DEVICE), t["vals"], t["r"], t["c"], shift, t["vx"], t["vy"])
    rx, ry = ref.hvp_reference(cols, lo["vals"], lo["r"], lo["c"], shift, lo["vx"], lo["vy"])
    pr.check(yx, rx, "yx")
    pr.check(yy, ry, "yy")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ot_cg_matches_reference(poison, dtype):
    """Per-problem convergence in one batch: a zero right-hand side (z = 0, 0 iterations), a warm start,
    a cold start; the solution, iteration counts (float64) and residuals as the reference's.  Then
    max_iter = 0 and a max_iter that stops the solve early."""
    pr, cols, lo, t = _sparse_problem(dtype, B=3, seed=7)
    gen = torch.Generator().manual_seed(8)
    rhs_x, rhs_y = lo["vx"].clone(), lo["vy"].clone()
    rhs_x[1] = 0
    rhs_y[1] = 0
    z0x = (0.1 * torch.randn(3, pr.n, generator=gen, dtype=torch.float64)).to(dtype).double()
    z0y = (0.1 * torch.randn(3, pr.m, generator=gen, dtype=torch.float64)).to(dtype).double()
    z0x[2] = 0
    z0y[2] = 0
    dev = lambda v: v.to(DEVICE, dtype)   # noqa: E731
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    zx, zy, it, res = ko.cg(cols.to(DEVICE), t["vals"], t["r"], t["c"], 1e-3, dev(rhs_x), dev(rhs_y),
                            dev(z0x), dev(z0y), tol, 200)
    rzx, rzy, rit, rres = ref.cg_reference(cols, lo["vals"], lo["r"], lo["c"], 1e-3, rhs_x, rhs_y, z0x, z0y, tol, 200)
    assert it.dtype == torch.int32 and it.shape == (3,) and res.shape == (3,)
    assert it[1] == 0 and res[1] == 0 and (zx[1] == 0).all() and (zy[1] == 0).all()
    assert (it.cpu()[[0, 2]] > 3).all()
    if dtype == torch.float64:
        assert torch.equal(it.cpu(), rit)
    else:
        assert (it.cpu() - rit).abs().max() <= 3
    assert (res.cpu() <= tol * 1.0001).all()
    # the solution (the system is well conditioned with the shift: fp32 to a few 1e-6)
    pr.check(zx, rzx, "zx")
    pr.check(zy, rzy, "zy")
    zx0, zy0, it0, res0 = ko.cg(cols.to(DEVICE), t["vals"], t["r"], t["c"], 1e-3, dev(rhs_x), dev(rhs_y),
                                dev(z0x), dev(z0y), tol, 0)
    rr = ref.cg_reference(cols, lo["vals"], lo["r"], lo["c"], 1e-3, rhs_x, rhs_y, z0x, z0y, tol, 0)
    assert (it0 == 0).all()
    pr.check(zx0, rr[0], "zx at max_iter 0")
    pr.check(res0, rr[3], "resid at max_iter 0")
    zx3, _, it3, res3 = ko.cg(cols.to(DEVICE), t["vals"], t["r"], t["c"], 1e-3, dev(rhs_x), dev(rhs_y),
                              dev(z0x), dev(z0y), tol, 3)
    rr = ref.cg_reference(cols, lo["vals"], lo["r"], lo["c"], 1e-3, rhs_x, rhs_y, z0x, z0y, tol, 3)
    assert torch.equal(it3.cpu(), rr[2]) and torch.equal(it3.cpu(), torch.tensor([3, 0, 3], dtype=torch.int32))
    pr.check(zx3, rr[0], "zx at max_iter 3")
    pr.check(res3, rr[3], "resid at max_iter 3")


@pytest.mark.parametrize("cost", POINT_COSTS, ids=_ids(POINT_COSTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ot_points_grad_matches_reference(poison, dtype, cost):
    """The envelope gradient (no weights) and the weighted one (scale, u, v)."""
    pr = Problem(cost, dtype, seed=9)
    R, T = pr.r, pr.t
    dx, dy = ko.points_grad(pr.kind, pr.p, T["x"], T["y"], pr.reg, T["f"], T["g"], None, None, None)
    rdx, rdy = ref.points_grad_reference(pr.kind, pr.p, R["x"], R["y"], pr.reg, R["f"], R["g"])
    pr.check(dx, rdx, "dx")
    pr.check(dy, rdy, "dy")
    dx, dy = ko.points_grad(pr.kind, pr.p, T["x"], T["y"], pr.reg, T["f"], T["g"], T["scale"], T["u"], T["v"])
    rdx, rdy = ref.points_grad_reference(pr.kind, pr.p, R["x"], R["y"], pr.reg, R["f"], R["g"], R["scale"],
                                         R["u"], R["v"])
    pr.check(dx, rdx, "dx weighted")
    pr.check(dy, rdy, "dy weighted")


@pytest.mark.parametrize("kind,p", [(ref.EUCLIDEAN_POW, 1.0), (ref.EUCLIDEAN_POW, 2.0), (ref.MINKOWSKI_POW, 1.0),
                                    (ref.MINKOWSKI_POW, 2.0)], ids=["euclidean_1", "euclidean_2", "minkowski_1",
                                                                    "minkowski_2"])
def test_ot_point_cost_special_powers_and_coincident_points(poison, kind, p):
    """The exact special cases (p = 1, 2) of the powers, with some x_i = y_j and a shared coordinate, where
    the gradient takes the subgradient 0: the step, the plan and the gradient as the reference's."""
    pr = Problem(("pts", kind, p, 2), torch.float64, seed=10)
    x, y = pr.t["x"].clone(), pr.t["y"].clone()
    y[:, 4] = x[:, 2]
    y[:, 6, 0] = x[:, 1, 0]
    R = dict(pr.r, x=x.double().cpu(), y=y.double().cpu())
    C = ref.point_cost(kind, p, R["x"], R["y"])
    new, err = ko.sinkhorn_step(kind, p, None, x, y, 0, pr.reg, pr.t["a"], pr.t["g"], pr.t["f"], ref.NORM_L1)
    rnew, rerr = ref.sinkhorn_step_reference(C, 0, pr.reg, R["a"], R["g"], R["f"], ref.NORM_L1)
    pr.check(new, rnew, "pot_new")
    pr.check(err, rerr, "err")
    pr.check(ko.plan(kind, p, None, x, y, pr.reg, pr.t["f"], pr.t["g"]),
             ref.plan_reference(C, pr.reg, R["f"], R["g"]), "P")
    dx, dy = ko.points_grad(kind, p, x, y, pr.reg, pr.t["f"], pr.t["g"], None, pr.t["u"], None)
    rdx, rdy = ref.points_grad_reference(kind, p, R["x"], R["y"], pr.reg, R["f"], R["g"], u=R["u"])
    pr.check(dx, rdx, "dx")
    pr.check(dy, rdy, "dy")


def _check_with_inf(out, want, dtype, what):
    """-inf / +inf exactly where the reference has them, the finite entries within the tolerance."""
    out = out.double().cpu()
    assert not torch.isnan(out).any(), f"{what}: NaN"
    fin = torch.isfinite(want)
    assert torch.equal(out[~fin], want[~fin]), f"{what}: infinities differ"
    assert rel_err(out[fin], want[fin]) <= TOL[dtype], what


@pytest.mark.parametrize("dtype,cost", [(torch.float32, COSTS[0]), (torch.float64, COSTS[2])],
                         ids=["float32-matrix", "float64-sqeuclidean"])
def test_ot_zero_weights_and_minus_inf_potentials(poison, dtype, cost):
    """Zero weights give -inf potentials; -inf potentials give zero plan rows / columns and error terms,
    zero objective terms (0 * -inf = 0), zero gradients from those rows; never NaN.  A row whose
    column potentials are all -inf has LSE -inf, so its new potential is +inf."""
    pr = Problem(cost, dtype, seed=11)
    R, T = pr.r, pr.t
    for d in (R, T):
        d["a"] = d["a"].clone()
        d["a"][0, [1, 5]] = 0
        d["b"] = d["b"].clone()
        d["b"][1, [0, 7, 20]] = 0
        d["f"] = torch.where(d["a"] > 0, d["f"], torch.full_like(d["f"], -INF))
        d["g"] = torch.where(d["b"] > 0, d["g"], torch.full_like(d["g"], -INF))
    Tg, Rg = T["g"].clone(), R["g"].clone()
    Tg[0], Rg[0] = -INF, -INF                              # problem 0: every column potential -inf
    for axis, (w, other, pot) in ((0, ("a", "g", "f")), (1, ("b", "f", "g"))):
        o_t, o_r = (Tg, Rg) if axis == 0 else (T[other], R[other])
        new, err = ko.sinkhorn_step(*pr.cost_args(), axis, pr.reg, T[w], o_t, T[pot], ref.NORM_L1)
        rnew, rerr = ref.sinkhorn_step_reference(pr.C, axis, pr.reg, R[w], o_r, R[pot], ref.NORM_L1)
        _check_with_inf(new, rnew, dtype, f"pot_new axis {axis}")
        _check_with_inf(err, rerr, dtype, f"err axis {axis}")
    r, c, obj = ko.marginals(*pr.cost_args(), pr.reg, T["f"], T["g"], T["a"], T["b"], None, None, True, True, True)
    rr, rc, ro = ref.marginals_reference(pr.C, pr.reg, R["f"], R["g"], R["a"], R["b"])
    assert (r[0, [1, 5]] == 0).all() and (c[1, [0, 7, 20]] == 0).all()
    pr.check(r, rr, "r")
    pr.check(c, rc, "c")
    pr.check(obj, ro, "obj")
    P = ko.plan(*pr.cost_args(), pr.reg, T["f"], T["g"])
    assert (P[0, [1, 5]] == 0).all()
    pr.check(P, ref.plan_reference(pr.C, pr.reg, R["f"], R["g"]), "P")
    cols, vals = ko.sparsify(*pr.cost_args(), pr.reg, T["f"], T["g"], 4)
    rcols, rvals = ref.sparsify_reference(pr.C, pr.reg, R["f"], R["g"], 4)
    assert torch.equal(cols.cpu(), rcols)
    pr.check(vals, rvals, "vals")
    if pr.kind != ref.MATRIX:
        dx, dy = ko.points_grad(pr.kind, pr.p, T["x"], T["y"], pr.reg, T["f"], T["g"], None, None, None)
        rdx, rdy = ref.points_grad_reference(pr.kind, pr.p, R["x"], R["y"], pr.reg, R["f"], R["g"])
        assert (dx[0, [1, 5]] == 0).all()
        pr.check(dx, rdx, "dx")
        pr.check(dy, rdy, "dy")


@pytest.mark.parametrize("B,n,m", [(0, 5, 6), (2, 0, 6), (2, 5, 0)])
def test_ot_empty_sizes(poison, B, n, m):
    """batch, n or m = 0: outputs of the right (empty) shapes; the LSE of an empty set is -inf (pot_new
    +inf), empty sums are 0 (errors, marginals, objective, gradients)."""
    dt = torch.float64
    z = lambda *s: torch.rand(*s, dtype=dt, device=DEVICE) + 0.1   # noqa: E731
    M = z(B, n, m)
    x, y = z(B, n, 2), z(B, m, 2)
    f, g, a, b = z(B, n), z(B, m), z(B, n), z(B, m)
    C = M.double().cpu()
    for axis, (w, other, pot) in ((0, (a, g, f)), (1, (b, f, g))):
        for kind, args in ((ref.MATRIX, (0.0, M, None, None)), (ref.SQEUCLIDEAN, (0.0, None, x, y))):
            new, err = ko.sinkhorn_step(kind, *args, axis, 0.5, w, other, pot, ref.NORM_L2)
            rnew, rerr = ref.sinkhorn_step_reference(C if kind == ref.MATRIX else ref.point_cost(kind, 0.0, x, y),
                                                     axis, 0.5, w, other, pot, ref.NORM_L2)
            assert new.shape == rnew.shape and err.shape == (B,)
            assert torch.equal(new.cpu(), rnew.cpu())
            torch.testing.assert_close(err.cpu(), rerr.cpu(), rtol=1e-12, atol=0)
    r, c, obj = ko.marginals(ref.MATRIX, 0.0, M, None, None, 0.5, f, g, a, b, None, None, True, True, True)
    rr, rc, ro = ref.marginals_reference(C, 0.5, f, g, a, b)
    assert r.shape == (B, n) and c.shape == (B, m) and obj.shape == (B,)
    assert (r == 0).all() and (c == 0).all()
    torch.testing.assert_close(obj.cpu(), ro.cpu(), rtol=1e-12, atol=0)
    assert ko.plan(ref.SQEUCLIDEAN, 0.0, None, x, y, 0.5, f, g).shape == (B, n, m)
    cols, vals = ko.sparsify(ref.MATRIX, 0.0, M, None, None, 0.5, f, g, 3)
    assert cols.shape == (B, n, 3) and cols.dtype == torch.int32 and vals.shape == (B, n, 3)
    dx, dy = ko.points_grad(ref.SQEUCLIDEAN, 0.0, x, y, 0.5, f, g, None, None, None)
    assert dx.shape == (B, n, 2) and dy.shape == (B, m, 2) and (dx == 0).all() and (dy == 0).all()
    k = 2 if n and m else 0
    cols = torch.zeros(B, n, k, dtype=torch.int32, device=DEVICE)
    vals = z(B, n, k)
    yx, yy = ko.hvp(cols, vals, a, b, 0.1, f, g)
    rx, ry = ref.hvp_reference(cols.cpu(), vals.cpu(), a.cpu(), b.cpu(), 0.1, f.cpu(), g.cpu())
    torch.testing.assert_close(yx.cpu(), rx, rtol=1e-12, atol=0)
    torch.testing.assert_close(yy.cpu(), ry, rtol=1e-12, atol=0)
    zx, zy, it, res = ko.cg(cols, vals, a, b, 0.1, f, g, None, None, 1e-10, 50)
    assert zx.shape == (B, n) and zy.shape == (B, m) and it.shape == (B,) and res.shape == (B,)
    assert torch.isfinite(zx).all() and torch.isfinite(zy).all() and torch.isfinite(res).all()


def test_ot_multi_tile_streaming(poison, monkeypatch):
    """Every kernel with tiles below the problem (2 x 4 .. 8 x 8): several column / row tiles per program
    (online LSE rescaling), several blocks adding into the same column sums and the same CG scalars,
    the top-k selection and tie counts across tiles (dense cost); float64 against the reference."""
    monkeypatch.setattr(ko, "_SINK_CFG", {(0, False): (4, 8, 1), (0, True): (4, 8, 1), (1, False): (8, 4, 1),
                                          (1, True): (8, 4, 1)})
    monkeypatch.setattr(ko, "_MARG_CFG", {False: (4, 8, 1), True: (4, 4, 1)})
    monkeypatch.setattr(ko, "_PLAN_CFG", {False: (4, 8, 1), True: (8, 4, 1)})
    monkeypatch.setattr(ko, "_SPARSE_CFG", {False: (4, 8, 1), True: (4, 8, 1)})
    monkeypatch.setattr(ko, "_GRAD_CFG", (4, 8, 1))
    monkeypatch.setattr(ko, "_HVP_ROWS", (4, 2, 1))
    monkeypatch.setattr(ko, "_HVP_COLS", (8, 1))
    monkeypatch.setattr(ko, "_CG_UPDATE", (8, 1))
    monkeypatch.setattr(ko, "_CG_SCALAR", 2)
    dt = torch.float64
    pr = Problem(COSTS[3], dt, B=2, n=9, m=13, seed=12)    # points, D = 5: two coordinate chunks
    R, T = pr.r, pr.t
    for axis, norm in ((0, ref.NORM_L1), (1, ref.NORM_INF)):
        w, other, pot = ("a", "g", "f") if axis == 0 else ("b", "f", "g")
        new, err = ko.sinkhorn_step(*pr.cost_args(), axis, pr.reg, T[w], T[other], T[pot], norm)
        rnew, rerr = ref.sinkhorn_step_reference(pr.C, axis, pr.reg, R[w], R[other], R[pot], norm)
        pr.check(new, rnew, f"pot_new axis {axis}")
        pr.check(err, rerr, f"err axis {axis}")
    r, c, obj = ko.marginals(*pr.cost_args(), pr.reg, T["f"], T["g"], T["a"], T["b"], T["wr"], None, True, True, True)
    rr, rc, ro = ref.marginals_reference(pr.C, pr.reg, R["f"], R["g"], R["a"], R["b"], wr=R["wr"])
    pr.check(r, rr, "r")
    pr.check(c, rc, "c")
    pr.check(obj, ro, "obj")
    pr.check(ko.plan(*pr.cost_args(), pr.reg, T["f"], T["g"]), ref.plan_reference(pr.C, pr.reg, R["f"], R["g"]), "P")
    dx, dy = ko.points_grad(pr.kind, pr.p, T["x"], T["y"], pr.reg, T["f"], T["g"], T["scale"], None, T["v"])
    rdx, rdy = ref.points_grad_reference(pr.kind, pr.p, R["x"], R["y"], pr.reg, R["f"], R["g"], R["scale"], v=R["v"])
    pr.check(dx, rdx, "dx")
    pr.check(dy, rdy, "dy")
    # the dense cost through the streamed Sinkhorn loop
    pm = Problem(COSTS[0], dt, B=2, n=9, m=13, seed=14)
    for axis, (w, other) in ((0, ("a", "g")), (1, ("b", "f"))):
        new, _ = ko.sinkhorn_step(*pm.cost_args(), axis, pm.reg, pm.t[w], pm.t[other], None, 1)
        pm.check(new, ref.sinkhorn_step_reference(pm.C, axis, pm.reg, pm.r[w], pm.r[other])[0], f"dense axis {axis}")
    # the top-k with ties spread over the column tiles and rows over two blocks
    M = torch.rand(1, 5, 19, dtype=torch.float32)   # (float32: 8 select passes instead of 16)
    M[:, :, [1, 6, 9, 14, 18]] = 0.5
    g = torch.zeros(1, 19, dtype=torch.float32)
    f = torch.zeros(1, 5, dtype=torch.float32)
    cols, _ = ko.sparsify(ref.MATRIX, 0.0, M.to(DEVICE), None, None, 0.3, f.to(DEVICE), g.to(DEVICE), 9)
    assert torch.equal(cols.cpu(), ref.sparsify_reference(M, 0.3, f, g, 9)[0])
    pr, cols, lo, t = _sparse_problem(dt, B=2, n=9, m=13, k=5, seed=13)
    yx, yy = ko.hvp(cols.to(DEVICE), t["vals"], t["r"], t["c"], 0.01, t["vx"], t["vy"])
    rx, ry = ref.hvp_reference(cols, lo["vals"], lo["r"], lo["c"], 0.01, lo["vx"], lo["vy"])
    pr.check(yx, rx, "yx")
    pr.check(yy, ry, "yy")
    zero = torch.zeros_like(lo["vx"]), torch.zeros_like(lo["vy"])
    # 5 iterations (stopped by max_iter): the same iterates as the reference's
    zx, zy, it, res = ko.cg(cols.to(DEVICE), t["vals"], t["r"], t["c"], 1e-3, t["vx"], t["vy"], None, None, 1e-10, 5)
    rzx, rzy, rit, rres = ref.cg_reference(cols, lo["vals"], lo["r"], lo["c"], 1e-3, lo["vx"], lo["vy"], *zero, 1e-10, 5)
    assert torch.equal(it.cpu(), rit) and (rit == 5).all()
    pr.check(res, rres, "resid")
    pr.check(zx, rzx, "zx")
    pr.check(zy, rzy, "zy")


# ----------------------------------------------------------------------------------------------------
_KERNELS = ("_sinkhorn_kernel", "_marginals_kernel", "_plan_kernel", "_sparsify_kernel", "_hvp_cols_kernel",
            "_hvp_rows_kernel", "_cg_update_kernel", "_cg_scalar_kernel", "_points_grad_kernel")


def _record_sweep(monkeypatch):
    """Run aot_sweep() (meant for the GPU compiler) with every kernel launch recorded, not run."""
    launches = []
    for name in _KERNELS:
        kernel = getattr(ko, name)

        def record(*args, grid, warmup, _name=name, _kernel=kernel, **kwargs):
            bound = dict(zip(_kernel.arg_names, args))
            bound.update(kwargs)
            launches.append((_name, bound, grid))
        monkeypatch.setattr(kernel, "run", record)
    monkeypatch.setattr(ko, "_INTERPRET", False)
    points = ko.aot_sweep()
    assert points > 0
    return launches


def test_aot_sweep_reaches_every_kernel_dtype_and_cost_input(monkeypatch):
    """tests/triton_aot.py compiles what aot_sweep() launches: every kernel in both dtypes, each cost
    kernel with the matrix and both coordinate chunks (BD 2 and 4), both Sinkhorn axes, hvp and CG
    modes; every launch on meta tensors with a non-empty 1-D grid; the distinct variants stay <= 60."""
    launches = _record_sweep(monkeypatch)
    by = {}
    for name, a, grid in launches:
        by.setdefault(name, []).append(a)
        assert len(grid) == 1 and 0 < grid[0] <= 2 ** 31 - 1, name
        assert all(v.device.type == "meta" for v in a.values() if isinstance(v, torch.Tensor)), name
    assert set(by) == set(_KERNELS)
    acc = {torch.float32: ko.tl.float32, torch.float64: ko.tl.float64}
    want_acc = set(acc[d] for d in ko.AOT_DTYPES)
    assert set(ko.AOT_DTYPES) == {torch.float32, torch.float64}
    for name in _KERNELS:
        assert {a["ACC_DT"] for a in by[name]} == want_acc, name
    cost_inputs = {(False, 1)} | {(True, bd) for bd in (2, 4)}
    for name in ("_marginals_kernel", "_plan_kernel", "_sparsify_kernel"):
        for dt in want_acc:
            got = {(a["IS_POINTS"], a["BD"] if a["IS_POINTS"] else 1) for a in by[name] if a["ACC_DT"] == dt}
            assert got == cost_inputs, name
    sink = {(a["ACC_DT"], a["AXIS"], a["IS_POINTS"], a["BD"] if a["IS_POINTS"] else 1) for a in by["_sinkhorn_kernel"]}
    assert sink == {(dt, ax, ip, bd) for dt in want_acc for ax in (0, 1) for ip, bd in cost_inputs}
    assert {(a["ACC_DT"], a["BD"]) for a in by["_points_grad_kernel"]} == {(dt, bd) for dt in want_acc for bd in (2, 4)}
    assert {a["kind"] for a in by["_sinkhorn_kernel"]} == {0, 1, 2, 3}
    assert {(a["ACC_DT"], a["CG"]) for a in by["_hvp_rows_kernel"]} == {(dt, cg) for dt in want_acc for cg in (0, 1)}
    assert {(a["ACC_DT"], a["CG"]) for a in by["_hvp_cols_kernel"]} == {(dt, cg) for dt in want_acc for cg in (0, 1)}
    assert {a["IDT"] for a in by["_sparsify_kernel"]} == {ko.tl.int32, ko.tl.int64}
    variants = set()
    for name, a, _ in launches:
        variants.add((name,) + tuple(sorted((k, repr(v)) for k, v in a.items()
                                            if k.isupper() or k in ("num_warps", "num_stages"))))
    assert len(variants) <= 60, len(variants)
