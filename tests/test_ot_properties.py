"""Property-based tests (hypothesis) of the public ot ops (kernelkit.ot.ops: sinkhorn_step, marginals, plan,
sparsify, hvp, cg, points_grad) and of the solvers on tiny problems.

The rule for every op (as in tests/test_vq_properties.py):
  * valid input -- random sizes B in {0..3}, n, m in {0, 1, 2, ..., 17} (empty included), dense costs
    (contiguous, transposed, column-sliced, one matrix shared by the batch with stride 0) and the point
    kinds (sqeuclidean, euclidean_pow p in (0, 3], minkowski_pow p in [1, 3], D = 1..5, x shared by
    the batch), float32 / float64, reg from 1e-4 to 10 (log-uniform), weights with zeros and potentials
    with -inf at those entries, potentials at a realistic scale (a float64 Sinkhorn sweep, then a
    perturbation of a few reg), k from 1 to m, shifts and tolerances -- matches the float64 reference on
    the same rounded inputs, never NaN where the reference is finite, although every torch.empty starts
    NaN-filled (`poison`).  The tolerance is TOL[dtype] plus the rounding a float computation of the
    exponent (f_i + g_j - C_ij) / reg cannot avoid (eps * its condition number); sums of signed terms
    are compared relative to the same sum of absolute values (tests/properties.py's rule);
  * bad input of every kind raises ValueError or TypeError (exactly the documented type) with a message
    naming the argument, never a crash or a hang.
Solvers: kernelkit.ot.sinkhorn (cpu) returns a plan whose marginals match stopThr; SNS's dual objective
never decreases; numpy in gives numpy out.  Example counts scale with the hypothesis profile
(tests/conftest.py): the ci profile runs >= 1000 examples per op over the backends here.
"""
from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import event, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import kernelkit.ot as kot  # noqa: E402
from kernelkit.ot import ops  # noqa: E402
from kernelkit.ot import reference as ref  # noqa: E402
from helpers import TOL  # noqa: E402
from properties import FAST, IDS, N, SEEDS, _one_thread, poisoned  # noqa: E402,F401

INF = float("inf")
DTYPES = [torch.float64, torch.float32]
SIZES = [5, 1, 2, 3, 7, 0, 13, 17]
BATCHES = [1, 2, 0, 3]
REGS = st.floats(-4.0, 1.0).map(lambda e: 10.0 ** e)   # 1e-4 .. 10, log-uniform
MATRIX_LAYOUTS = ["contiguous", "transposed", "sliced", "shared"]
POINT_KINDS = [("sqeuclidean", st.just(2.0)), ("euclidean_pow", st.sampled_from([1.0, 0.5, 1.5, 2.0, 3.0])),
               ("minkowski_pow", st.sampled_from([1.0, 1.5, 2.0, 3.0]))]


def _eps(dtype):
    return torch.finfo(dtype).eps


class P:
    """One random problem: the cost (in the tested dtype, in its layout) and its float64 dense matrix, the
    weights and potentials in the dtype (t) and the same values in float64 (r)."""

    def __repr__(self):
        return (f"P(kind={self.kind_name} p={self.p} layout={self.layout} B={self.B} n={self.n} m={self.m} D={self.D} "
                f"dtype={self.dtype} reg={self.reg:.3g} zeros={self.zeros})")


def _problem(B, n, m, dtype, reg, kind_pick, layout, D, zeros, jitter, seed):
    gen = torch.Generator().manual_seed(seed)
    r64 = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    pr = P()
    kind_name, p = kind_pick
    pr.kind_name, pr.p, pr.layout, pr.B, pr.n, pr.m, pr.D, pr.dtype, pr.reg, pr.zeros = (
        kind_name, p, layout, B, n, m, D, dtype, reg, zeros)
    if kind_name == "matrix":
        if layout == "transposed":
            M = (2 * r64(B, m, n)).to(dtype).transpose(1, 2)
        elif layout == "sliced":
            M = (2 * r64(B, n, m + 3)).to(dtype)[:, :, 1:m + 1]
        elif layout == "shared":
            M = (2 * r64(1, n, m)).to(dtype).expand(B, n, m)
        else:
            M = (2 * r64(B, n, m)).to(dtype)
        pr.cost = ops.Cost.matrix(M)
        pr.C = M.double()
    else:
        x = r64(1 if layout == "shared" else B, n, D).to(dtype)
        y = r64(B, m, D).to(dtype)
        pr.cost = ops.Cost.points(x, y, kind=kind_name, p=p)
        pr.C = ref.point_cost(pr.cost.kind, pr.cost.p, x.double().expand(B, n, D), y.double())
    a, b = r64(B, n) + 0.05, r64(B, m) + 0.05
    if zeros:   # a random subset of weights set to 0 (never all of them)
        za, zb = r64(B, n) < 0.3, r64(B, m) < 0.3
        za[:, :1] = False
        zb[:, :1] = False
        a, b = torch.where(za, 0.0, a), torch.where(zb, 0.0, b)
    a, b = a.to(dtype).double(), b.to(dtype).double()
    # potentials at a realistic scale: one float64 Sinkhorn sweep from g = 0, then jitter of a few reg
    f, _ = ref.sinkhorn_step_reference(pr.C, 0, reg, a, torch.zeros(B, m, dtype=torch.float64))
    if m == 0:
        f = torch.where(a > 0, torch.zeros_like(f), f)
    g, _ = ref.sinkhorn_step_reference(pr.C, 1, reg, b, f)
    if n == 0:
        g = torch.where(b > 0, torch.zeros_like(g), g)
    f = f + jitter * reg * (2 * r64(B, n) - 1)
    g = g + jitter * reg * (2 * r64(B, m) - 1)
    v = dict(a=a, b=b, f=f, g=g, wr=r64(B, n), wc=r64(B, m), u=r64(B, n) - 0.5, v=r64(B, m) - 0.5,
             scale=r64(B) + 0.5)
    pr.t = {k: t.to(dtype) for k, t in v.items()}
    pr.r = {k: t.double() for k, t in pr.t.items()}
    fin = lambda t: t[torch.isfinite(t)].abs().max().item() if torch.isfinite(t).any() else 0.0  # noqa: E731
    # condition number of the exponent (f_i + g_j - C_ij) / reg with respect to rounding of its terms
    pr.K = (fin(pr.r["f"]) + fin(pr.r["g"]) + fin(pr.C)) / reg + 1.0
    note(repr(pr))
    event(f"{kind_name} {dtype}".replace("torch.", ""))
    event("empty" if B * n * m == 0 else ("zero weights" if zeros else "positive weights"))
    return pr


@functools.lru_cache(maxsize=None)
def problems():
    kinds = st.one_of(st.tuples(st.just("matrix"), st.just(0.0)), *[st.tuples(st.just(k), ps) for k, ps in POINT_KINDS])
    return st.tuples(st.sampled_from(BATCHES), st.sampled_from(SIZES), st.sampled_from(SIZES), st.sampled_from(DTYPES),
                     REGS, kinds, st.sampled_from(MATRIX_LAYOUTS), st.integers(1, 5), st.booleans(),
                     st.sampled_from([0.0, 1.0, 3.0]), SEEDS).map(lambda t: _problem(*t))


def tol(pr, backend) -> float:
    """TOL[dtype] + the exponent's unavoidable rounding, eps * K (the torch backend computes in the dtype;
    the cpu kernels may accumulate float32 in float64, which only helps)."""
    return TOL[pr.dtype] + 16 * _eps(pr.dtype) * pr.K


def close(got, want, scale, t, what):
    """No NaN where the reference has none, the same infinities, ||got - want|| <= t * ||scale||."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g = got.detach().double()
    nan_ok = torch.isnan(want)
    assert not (torch.isnan(g) & ~nan_ok).any(), f"{what}: NaN where the reference is {want[torch.isnan(g)]}"
    ig, iw = torch.isinf(g), torch.isinf(want)
    assert torch.equal(ig, iw) and torch.equal(g[ig], want[iw]), f"{what}: infinities differ"
    keep = ~(ig | nan_ok)
    den = scale[keep].norm().item()
    err = (g[keep] - want[keep]).norm().item() / (den if den > 0 else 1.0)
    assert err <= t, f"{what}: error {err:.3e} > {t:.1e}"


# ---- forward ops ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", FAST, ids=IDS)
@poisoned(max_examples=N // 2)
@given(pr=problems(), axis=st.sampled_from([0, 1]), norm=st.sampled_from([1, 2, "inf"]), with_pot=st.booleans())
def test_sinkhorn_step_matches_reference(poison, case, pr, axis, norm, with_pot):
    backend = case[0]
    T, R = pr.t, pr.r
    w, other, pot = ("a", "g", "f") if axis == 0 else ("b", "f", "g")
    new, err = ops.sinkhorn_step(pr.cost, axis, pr.reg, T[w], T[other], T[pot] if with_pot else None, norm,
                                 backend=backend)
    rnew, rerr = ref.sinkhorn_step_reference(pr.C, axis, pr.reg, R[w], R[other], R[pot] if with_pot else None,
                                             ops.NORMS[norm])
    assert new.dtype == pr.dtype and (err is None) == (not with_pot)
    # pot_new = reg (log w - LSE): an absolute error of eps * reg * K per entry
    close(new, rnew, rnew.abs() + pr.reg, tol(pr, backend), "pot_new")
    if with_pot:
        marg = torch.exp(R[pot] / pr.reg + (torch.log(R[w]) - rnew / pr.reg))   # the plan's marginal on axis
        marg = torch.where(torch.isfinite(marg), marg, torch.zeros_like(marg))
        scale = ref._norm(marg.abs() + R[w].abs(), ops.NORMS[norm])
        close(err, rerr, scale, tol(pr, backend), "err")


@pytest.mark.parametrize("case", FAST, ids=IDS)
@poisoned(max_examples=N // 2)
@given(pr=problems(), weights=st.sampled_from(["none", "wr", "wc", "both"]), with_obj=st.booleans())
def test_marginals_matches_reference(poison, case, pr, weights, with_obj):
    backend = case[0]
    T, R = pr.t, pr.r
    wr = "wr" if weights in ("wr", "both") else None
    wc = "wc" if weights in ("wc", "both") else None
    args_t = (T["a"], T["b"]) if with_obj else (None, None)
    r, c, obj = ops.marginals(pr.cost, pr.reg, T["f"], T["g"], *args_t, T.get(wr), T.get(wc), backend=backend)
    rr, rc, ro = ref.marginals_reference(pr.C, pr.reg, R["f"], R["g"], *((R["a"], R["b"]) if with_obj else (None,
                                                                                                            None)),
                                         R.get(wr), R.get(wc))
    t = tol(pr, backend)
    close(r, rr, rr.abs(), t, "r")
    close(c, rc, rc.abs(), t, "c")
    assert (obj is None) == (not with_obj)
    if with_obj:
        P = ref.plan_reference(pr.C, pr.reg, R["f"], R["g"])
        scale = (ref._dot0(R["a"], R["f"].abs()) + ref._dot0(R["b"], R["g"].abs()) + pr.reg * P.sum((1, 2))) \
            if pr.B else ro
        close(obj, ro, scale, t, "obj")


@pytest.mark.parametrize("case", FAST, ids=IDS)
@poisoned(max_examples=N // 2)
@given(pr=problems())
def test_plan_matches_reference(poison, case, pr):
    P = ops.plan(pr.cost, pr.reg, pr.t["f"], pr.t["g"], backend=case[0])
    rP = ref.plan_reference(pr.C, pr.reg, pr.r["f"], pr.r["g"])
    assert P.shape == (pr.B, pr.n, pr.m) and P.dtype == pr.dtype
    close(P, rP, rP, tol(pr, case[0]), "P")


@pytest.mark.parametrize("case", FAST, ids=IDS)
@poisoned(max_examples=N // 2)
@given(pr=problems(), kq=st.floats(0.0, 1.0))
def test_sparsify_matches_reference(poison, case, pr, kq):
    """Columns increasing; the same columns as the reference wherever the k-th and (k+1)-th keys are
    not within rounding of each other (else the same kept key values); values P at the kept columns."""
    k = max(1, min(pr.m, 1 + int(kq * pr.m)))
    cols, vals = ops.sparsify(pr.cost, pr.reg, pr.t["f"], pr.t["g"], k, backend=case[0])
    if pr.B * pr.n * pr.m == 0:
        assert cols.numel() == 0 and vals.numel() == 0
        return
    rcols, rvals = ref.sparsify_reference(pr.C, pr.reg, pr.r["f"], pr.r["g"], k)
    assert cols.dtype == torch.int32 and cols.shape == (pr.B, pr.n, k)
    assert (cols >= 0).all() and (cols < pr.m).all()
    assert (cols[..., 1:] > cols[..., :-1]).all(), "columns not strictly increasing"
    key = pr.r["g"][:, None, :] - pr.C
    key = torch.where(torch.isnan(key), torch.full_like(key, -INF), key)
    srt = key.sort(dim=2, descending=True).values
    kth = srt[..., k - 1]
    nxt = srt[..., k] if k < pr.m else torch.full_like(kth, -INF)
    gap = (kth - nxt).abs()
    slack = 8 * _eps(pr.dtype) * (key[torch.isfinite(key)].abs().max().item() + 1)
    clear = (gap > slack) | (torch.isinf(kth) & torch.isinf(nxt))
    assert torch.equal(cols[clear], rcols[clear]), "columns differ from the reference's"
    got_keys = torch.gather(key, 2, cols.long()).sort(dim=2, descending=True).values
    want_keys = srt[..., :k]
    fin = torch.isfinite(want_keys)
    assert torch.equal(torch.isfinite(got_keys), fin)
    assert ((got_keys - want_keys)[fin].abs() <= slack).all(), "kept keys are not the k largest"
    rP = torch.gather(ref.plan_reference(pr.C, pr.reg, pr.r["f"], pr.r["g"]), 2, cols.long())
    close(vals, rP, rP, tol(pr, case[0]), "vals")


def _sparse_problem(pr, k):
    cols, vals = ref.sparsify_reference(pr.C, pr.reg, pr.r["f"], pr.r["g"], k)
    r, c, _ = ref.marginals_reference(pr.C, pr.reg, pr.r["f"], pr.r["g"])
    s = max(vals.max().item() if vals.numel() else 1.0, 1e-300)  # scaled so the largest entry is 1
    return cols, vals / s, r / s, c / s


@pytest.mark.parametrize("case", FAST, ids=IDS)
@poisoned(max_examples=N // 2)
@given(pr=problems(), kq=st.floats(0.0, 1.0), shift=st.sampled_from([0.0, 1e-3, 0.5, 10.0]), seed=SEEDS)
def test_hvp_matches_reference(poison, case, pr, kq, shift, seed):
    k = max(1, min(pr.m, 1 + int(kq * pr.m))) if pr.m else 0
    cols, vals, r, c = _sparse_problem(pr, k)
    gen = torch.Generator().manual_seed(seed)
    vx, vy = torch.randn(pr.B, pr.n, generator=gen, dtype=torch.float64), torch.randn(pr.B, pr.m, generator=gen,
                                                                                      dtype=torch.float64)
    dt = pr.dtype
    vals, r, c, vx, vy = (t.to(dt) for t in (vals, r, c, vx, vy))
    yx, yy = ops.hvp(cols, vals, r, c, vx, vy, shift, backend=case[0])
    R64 = [t.double() for t in (vals, r, c, vx, vy)]
    rx, ry = ref.hvp_reference(cols, R64[0], R64[1], R64[2], shift, R64[3], R64[4])
    sx, sy = ref.hvp_reference(cols, R64[0].abs(), R64[1].abs(), R64[2].abs(), shift, R64[3].abs(), R64[4].abs())
    close(yx, rx, sx, TOL[dt], "yx")
    close(yy, ry, sy, TOL[dt], "yy")


@pytest.mark.parametrize("case", FAST, ids=IDS)
@poisoned(max_examples=N // 2)
@given(pr=problems(), kq=st.floats(0.0, 1.0), shift=st.sampled_from([1e-2, 0.5, 3.0]), seed=SEEDS)
def test_cg_solves_the_system(poison, case, pr, kq, shift, seed):
    """The reported relative residual is <= tol (or max_iter was hit) and is the true residual of z."""
    if pr.B * pr.n * pr.m == 0:
        return
    k = max(1, min(pr.m, 1 + int(kq * pr.m)))
    cols, vals, r, c = _sparse_problem(pr, k)
    gen = torch.Generator().manual_seed(seed)
    rx, ry = torch.randn(pr.B, pr.n, generator=gen, dtype=torch.float64), torch.randn(pr.B, pr.m, generator=gen,
                                                                                      dtype=torch.float64)
    dt = pr.dtype
    vals, r, c, rx, ry = (t.to(dt) for t in (vals, r, c, rx, ry))
    tl = 1e-10 if dt == torch.float64 else 1e-4
    zx, zy, iters, resid = ops.cg(cols, vals, r, c, rx, ry, shift, tl, 500, backend=case[0])
    assert not torch.isnan(zx).any() and not torch.isnan(zy).any()
    hx, hy = ref.hvp_reference(cols, vals.double(), r.double(), c.double(), shift, zx.double(), zy.double())
    rhs = torch.cat([rx, ry], 1).double()
    true = (rhs - torch.cat([hx, hy], 1)).norm(dim=1) / rhs.norm(dim=1)
    # absolute scale of H z (the rounding of the residual itself)
    ax, ay = ref.hvp_reference(cols, vals.double(), r.double(), c.double(), shift, zx.double().abs(),
                               zy.double().abs())
    noise = 16 * _eps(dt) * torch.cat([ax, ay], 1).norm(dim=1) / rhs.norm(dim=1)
    done = iters < 500
    assert (resid[done] <= tl).all()
    assert (true <= resid.double() + noise + tl).all(), (true, resid)


@pytest.mark.parametrize("case", FAST, ids=IDS)
@poisoned(max_examples=N // 2)
@given(pr=problems().filter(lambda p: p.kind_name != "matrix"), weighted=st.booleans())
def test_points_grad_matches_reference(poison, case, pr, weighted):
    T, R = pr.t, pr.r
    extra = dict(scale=T["scale"], u=T["u"], v=T["v"]) if weighted else {}
    dx, dy = ops.points_grad(pr.cost, pr.reg, T["f"], T["g"], backend=case[0], **extra)
    c = pr.cost.expand(pr.B) if pr.B else pr.cost
    x64, y64 = c.x.double(), c.y.double()
    if x64.shape[0] != pr.B:
        x64 = x64.expand(pr.B, -1, -1)
    ex = [R["scale"], R["u"], R["v"]] if weighted else [None, None, None]
    rx, ry = ref.points_grad_reference(c.kind, c.p, x64, y64, pr.reg, R["f"], R["g"], *ex)
    # the scale: the same sums over |W| |dC/dx|
    P = ref.plan_reference(pr.C, pr.reg, R["f"], R["g"])
    W = P * ((ex[0][:, None, None] + ex[1][:, :, None] + ex[2][:, None, :]).abs() if weighted else 1.0)
    G = ref.cost_grad_terms(c.kind, c.p, x64, y64).abs()
    sx, sy = (W[..., None] * G).sum(2), (W[..., None] * G).sum(1)
    t = tol(pr, case[0]) * (1 + abs(c.p))
    close(dx, rx, sx, t, "dx")
    close(dy, ry, sy, t, "dy")


# ---- bad input ------------------------------------------------------------------------------------------

def _base(dtype=torch.float64, B=2, n=3, m=4):
    M = torch.rand(B, n, m, dtype=dtype)
    z = lambda *s: torch.rand(*s, dtype=dtype) + 0.1  # noqa: E731
    return ops.Cost.matrix(M), dict(a=z(B, n), b=z(B, m), f=z(B, n), g=z(B, m))


@st.composite
def bad_call(draw, kind):
    """(thunk, exception type, text the message must contain)."""
    c, T = _base()
    a, b, f, g = T["a"], T["b"], T["f"], T["g"]
    if kind == "reg":
        bad = draw(st.sampled_from([0.0, -1.0, -1e-300, float("nan"), INF, -INF, 0]))
        op = draw(st.sampled_from(["step", "marginals", "plan", "sparsify", "points_grad"]))
        pc = ops.Cost.points(torch.rand(2, 3, 2, dtype=torch.float64), torch.rand(2, 4, 2, dtype=torch.float64))
        call = {"step": lambda: ops.sinkhorn_step(c, 0, bad, a, g), "marginals": lambda: ops.marginals(c, bad, f, g),
                "plan": lambda: ops.plan(c, bad, f, g), "sparsify": lambda: ops.sparsify(c, bad, f, g, 2),
                "points_grad": lambda: ops.points_grad(pc, bad, f, g)}[op]
        return call, ValueError, "reg must be finite and > 0"
    if kind == "reg_type":
        bad = draw(st.sampled_from(["0.5", None, [0.5], True, 1j]))
        return lambda: ops.plan(c, bad, f, g), TypeError, "reg must be a float"
    if kind == "axis":
        bad = draw(st.sampled_from([2, -1, 3, "0", None, 0.5]))
        return lambda: ops.sinkhorn_step(c, bad, 0.5, a, g), ValueError, "axis must be 0 or 1"
    if kind == "err_norm":
        bad = draw(st.sampled_from([3, -1, "l3", "max", None, 1.5]))
        return lambda: ops.sinkhorn_step(c, 0, 0.5, a, g, f, bad), ValueError, "err_norm must be"
    if kind == "shape":
        which = draw(st.sampled_from(["w", "other", "pot", "f", "g"]))
        extra = draw(st.integers(1, 3))
        wrong = torch.rand(2, 3 + 4 + extra, dtype=torch.float64)
        if which in ("w", "other", "pot"):
            args = dict(w=a, other=g, pot=f)
            args[which] = wrong
            return lambda: ops.sinkhorn_step(c, 0, 0.5, args["w"], args["other"], args["pot"]), ValueError, \
                f"{which} must have shape"
        args = dict(f=f, g=g)
        args[which] = wrong
        return lambda: ops.marginals(c, 0.5, args["f"], args["g"]), ValueError, f"{which} must have shape"
    if kind == "dtype":
        which = draw(st.sampled_from(["f", "g", "a", "b"]))
        dt = draw(st.sampled_from([torch.float32, torch.float16]))
        args = dict(T)
        args[which] = args[which].to(dt)
        return lambda: ops.marginals(c, 0.5, args["f"], args["g"], args["a"], args["b"]), ValueError, \
            f"{which} must have the cost's dtype"
    if kind == "k":
        bad = draw(st.sampled_from([0, -1, 5, 100, 5000]))
        return lambda: ops.sparsify(c, 0.5, f, g, bad), ValueError, "k must be in 1..min(m, 4096)"
    if kind == "k_type":
        bad = draw(st.sampled_from([2.0, "2", None, True]))
        return lambda: ops.sparsify(c, 0.5, f, g, bad), TypeError, "k must be an int"
    cols, vals = ref.sparsify_reference(c.mat, 0.5, f, g, 2)
    r, cc, _ = ref.marginals_reference(c.mat, 0.5, f, g)
    if kind == "shift":
        bad = draw(st.sampled_from([-1e-3, -1.0, float("nan"), INF]))
        op = draw(st.sampled_from([ops.hvp, ops.cg]))
        return lambda: op(cols, vals, r, cc, f, g, bad), ValueError, "shift must be finite and >= 0"
    if kind == "tol":
        bad = draw(st.sampled_from([0.0, -1e-9, float("nan"), INF]))
        return lambda: ops.cg(cols, vals, r, cc, f, g, tol=bad), ValueError, "tol must be finite and > 0"
    if kind == "max_iter":
        bad = draw(st.sampled_from([-1, 1.5, "10", None, True]))
        return lambda: ops.cg(cols, vals, r, cc, f, g, max_iter=bad), ValueError, "max_iter must be an int >= 0"
    if kind == "cols":
        bad_cols = cols.clone()
        i, j, l_ = draw(st.integers(0, 1)), draw(st.integers(0, 2)), draw(st.integers(0, 1))
        bad_cols[i, j, l_] = draw(st.sampled_from([4, 5, 1000, -1, -100, 2**31 - 1]))
        op = draw(st.sampled_from([ops.hvp, ops.cg]))
        return lambda: op(bad_cols, vals, r, cc, f, g), ValueError, "cols has an entry outside"
    x, y = torch.rand(2, 3, 2, dtype=torch.float64), torch.rand(2, 4, 2, dtype=torch.float64)
    if kind == "point_dim":
        bad = draw(st.sampled_from(["mismatch", "zero", "big"]))
        if bad == "mismatch":
            return lambda: ops.Cost.points(x, torch.rand(2, 4, 3, dtype=torch.float64)), ValueError, "same dimension D"
        D = 0 if bad == "zero" else draw(st.sampled_from([1025, 2048]))
        return lambda: ops.Cost.points(torch.rand(2, 3, D), torch.rand(2, 4, D)), ValueError, \
            "the point dimension D must be in 1..1024"
    if kind == "p":
        kd = draw(st.sampled_from(["euclidean_pow", "minkowski_pow"]))
        bad = draw(st.sampled_from([0.0, -1.0, float("nan"), INF] + ([0.5, 0.999] if kd == "minkowski_pow" else [])))
        return lambda: ops.Cost.points(x, y, kind=kd, p=bad), ValueError, "p must be finite"
    if kind == "cost_kind":
        bad = draw(st.sampled_from(["l2", "matrix", "", "euclidean"]))
        return lambda: ops.Cost.points(x, y, kind=bad), ValueError, "cost must be 'sqeuclidean'"
    raise AssertionError(kind)


BAD_KINDS = ["reg", "reg_type", "axis", "err_norm", "shape", "dtype", "k", "k_type", "shift", "tol", "max_iter", "cols",
             "point_dim", "p", "cost_kind"]


@pytest.mark.parametrize("kind", BAD_KINDS)
@settings(max_examples=max(N // 50, 10))
@given(data=st.data())
def test_bad_input_raises_the_documented_error(kind, data):
    call, exc, text = data.draw(bad_call(kind))
    with pytest.raises(Exception) as e:
        call()
    assert e.type is exc, f"{e.type.__name__} instead of {exc.__name__}: {e.value}"
    assert text in str(e.value), f"message does not name the argument ({text!r}): {e.value}"


# ---- solvers on tiny problems ---------------------------------------------------------------------------

def _ot_problem(n, m, seed, reg_scale):
    rng = np.random.default_rng(seed)
    a = rng.random(n) + 0.1
    b = rng.random(m) + 0.1
    a, b = a / a.sum(), b / b.sum()
    M = rng.random((n, m))
    return a, b, M


@settings(max_examples=N // 10)
@given(n=st.integers(1, 8), m=st.integers(1, 8), reg=st.sampled_from([0.05, 0.1, 0.3, 1.0]),
       stop=st.sampled_from([1e-6, 1e-9, 1e-12]), seed=SEEDS)
def test_sinkhorn_plan_marginals_match_stopthr(n, m, reg, stop, seed):
    """kernelkit.ot.sinkhorn (cpu), numpy in: a numpy plan whose column error (POT's criterion, L2) is
    below stopThr when it converged, and whose row marginal is exact (the last update is the f one)."""
    a, b, M = _ot_problem(n, m, seed, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        P, log = kot.sinkhorn(a, b, M, reg, numItermax=5000, stopThr=stop, log=True, backend="cpu", progress=False)
    assert isinstance(P, np.ndarray) and P.dtype == np.float64 and P.shape == (n, m)
    assert np.isfinite(P).all() and (P >= 0).all()
    col = np.linalg.norm(P.sum(0) - b)
    row = np.linalg.norm(P.sum(1) - a)
    assert row <= 1e-13, row
    if log["niter"] < 4999:
        assert col <= stop, (col, stop)


@settings(max_examples=N // 20)
@given(n=st.integers(2, 8), m=st.integers(2, 8), reg=st.sampled_from([0.01, 0.03, 0.1]), seed=SEEDS)
def test_sns_dual_objective_never_decreases(n, m, reg, seed):
    """SNS (cpu): the dual objective along the Newton steps is non-decreasing (up to float64 rounding of
    an O(1) value), and it reaches the marginal accuracy asked for."""
    a, b, M = _ot_problem(n, m, seed, 1.0)
    t = lambda v: torch.from_numpy(v)[None]  # noqa: E731
    res = kot.solve(ops.Cost.matrix(torch.from_numpy(M)), t(a), t(b), reg, method="sns", numItermax=100,
                    stopThr=1e-11, progress=False, backend="cpu", n_sinkhorn=3)
    objs = torch.stack(res.obj) if res.obj else torch.zeros(0, 1, dtype=torch.float64)
    assert torch.isfinite(objs).all()
    slack = 64 * torch.finfo(torch.float64).eps * (objs.abs() + reg).max().item() if objs.numel() else 0.0
    assert (objs[1:] >= objs[:-1] - slack).all(), objs.flatten().tolist()
    assert bool(res.converged.all()), res.err[-1] if res.err else None


@settings(max_examples=N // 40)
@given(n=st.integers(1, 6), m=st.integers(1, 6), method=st.sampled_from(["sinkhorn", "sinkhorn_log", "sns"]),
       f32=st.booleans(), seed=SEEDS)
def test_numpy_in_numpy_out(n, m, method, f32, seed):
    """numpy in, numpy out (dtype kept); torch in, torch out; the same values."""
    a, b, M = _ot_problem(n, m, seed, 1.0)
    dt = np.float32 if f32 else np.float64
    a, b, M = a.astype(dt), b.astype(dt), M.astype(dt)
    kw = dict(method=method, numItermax=100, stopThr=1e-5 if f32 else 1e-9, backend="cpu", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # (float32 may stop on numItermax: the not-converged warning)
        P = kot.sinkhorn(a, b, M, 0.2, **kw)
        v = kot.sinkhorn2(a, b, M, 0.2, **kw)
        Pt = kot.sinkhorn(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(M), 0.2, **kw)
    assert isinstance(P, np.ndarray) and P.dtype == dt and P.shape == (n, m)
    assert not isinstance(v, torch.Tensor) and np.isfinite(np.asarray(v)).all()
    assert isinstance(Pt, torch.Tensor) and Pt.dtype == torch.from_numpy(a).dtype
    np.testing.assert_allclose(Pt.numpy(), P, rtol=0, atol=0)
