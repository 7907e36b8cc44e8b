"""The ot family on the GPU: the CUDA C++ backend (csrc/cuda/ot.cu) through the op API
(kernelkit.ot.ops with backend="cuda") against the float64 oracle of python/kernelkit/ot/reference.py.
Marked `cuda`: skipped without a GPU, run on the device machine by bench/device_check.sh (the same kernels
run without a GPU under the host emulation in tests/test_ot_cuda_emu.py)."""
from __future__ import annotations

import pytest
import torch

from helpers import assert_close
from kernelkit.ot import ops
from kernelkit.ot import reference as R

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float64]
DTYPE_IDS = ["float32", "float64"]
KINDS = {"sqeuclidean": R.SQEUCLIDEAN, "euclidean_pow": R.EUCLIDEAN_POW, "minkowski_pow": R.MINKOWSKI_POW}


def _close(got, want, dtype, what):
    inf = torch.isinf(want)
    got = got.double().cpu()
    want = want.cpu()
    inf = inf.cpu()
    assert torch.equal(got[inf], want[inf]), f"{what}: infinite entries differ"
    if (~inf).any():
        assert_close(got[~inf], want[~inf], dtype, what)


def _problem(kind, B, n, m, D, p, dtype, seed=0, zeros=True):
    g = torch.Generator().manual_seed(seed)
    if kind == "matrix":
        C = torch.rand(B, n, m, generator=g).to("cuda", dtype)
        cost, C64 = ops.Cost.matrix(C), C.double()
        x = y = None
    else:
        x = torch.rand(B, n, D, generator=g).to("cuda", dtype)
        y = torch.rand(B, m, D, generator=g).to("cuda", dtype)
        cost, C64 = ops.Cost.points(x, y, kind=kind, p=p), R.point_cost(KINDS[kind], p, x.double(), y.double())
    a = (0.5 + torch.rand(B, n, generator=g)) / n
    b = (0.5 + torch.rand(B, m, generator=g)) / m
    if zeros:
        a[:, 3::17] = 0
        b[:, 5::19] = 0
    sc = float(C64.mean())
    f = 0.5 * sc + 0.3 * torch.randn(B, n, generator=g)
    gg = 0.5 * sc + 0.3 * torch.randn(B, m, generator=g)
    f[a == 0] = -float("inf")
    gg[b == 0] = -float("inf")
    dev = lambda t: t.to("cuda", dtype)  # noqa: E731
    return cost, C64, x, y, dev(a), dev(b), dev(f), dev(gg)


CASES = [("matrix", 2, 300, 257, 0, 2.0, 0.2), ("sqeuclidean", 2, 301, 190, 2, 2.0, 0.05),
         ("euclidean_pow", 1, 129, 333, 40, 1.0, 0.5), ("minkowski_pow", 2, 70, 65, 3, 1.5, 0.3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cuda_ot_ops_match_reference(poison, case, dtype):
    kind, B, n, m, D, p, reg = case
    cost, C64, x, y, a, b, f, g = _problem(kind, B, n, m, D, p, dtype)
    d = lambda t: t.double()  # noqa: E731
    for axis, w, other, pot in ((0, a, g, f), (1, b, f, g)):
        for norm in (0, 1, 2):
            out, err = ops.sinkhorn_step(cost, axis, reg, w, other, pot=pot, err_norm=norm, backend="cuda")
            want, werr = R.sinkhorn_step_reference(C64, axis, reg, d(w), d(other), d(pot), norm)
            _close(out, want, dtype, f"{kind} axis {axis} pot_new")
            _close(err, werr, dtype, f"{kind} axis {axis} err {norm}")
    wr, wc = torch.rand_like(f) + 0.5, torch.rand_like(g) + 0.5
    for weights in ((None, None), (wr, wc)):
        r, c, obj = ops.marginals(cost, reg, f, g, a, b, *weights, backend="cuda")
        rr, rc, robj = R.marginals_reference(C64, reg, d(f), d(g), d(a), d(b),
                                             *[None if t is None else d(t) for t in weights])
        _close(r, rr, dtype, f"{kind} r")
        _close(c, rc, dtype, f"{kind} c")
        _close(obj, robj, dtype, f"{kind} obj")
    P = ops.plan(cost, reg, f, g, backend="cuda")
    _close(P, R.plan_reference(C64, reg, d(f), d(g)), dtype, f"{kind} plan")
    for k in (1, 13, m):
        cols, vals = ops.sparsify(cost, reg, f, g, k, backend="cuda")
        assert (cols[..., 1:] > cols[..., :-1]).all()
        key = d(g)[:, None, :] - C64
        kept = torch.zeros_like(key, dtype=torch.bool).scatter_(2, cols.long(), True)
        lo, hi = key.masked_fill(~kept, float("inf")).amin(2), key.masked_fill(kept, -float("inf")).amax(2)
        slack = 1e-12 if dtype == torch.float64 else 1e-5 * (1 + float(C64.abs().max()))
        assert (lo >= hi - slack).all(), f"{kind} k={k}: not the top k"
        _close(vals, torch.gather(R.plan_reference(C64, reg, d(f), d(g)), 2, cols.long()), dtype, f"{kind} vals")
    if kind != "matrix":
        scale = torch.rand(B, device="cuda", dtype=dtype) + 1
        u, v = 0.1 * torch.randn_like(f), 0.1 * torch.randn_like(g)
        for extra in ((None, None, None), (scale, u, v)):
            dx, dy = ops.points_grad(cost, reg, f, g, *extra, backend="cuda")
            wdx, wdy = R.points_grad_reference(KINDS[kind], p, d(x), d(y), reg, d(f), d(g),
                                               *[None if t is None else d(t) for t in extra])
            _close(dx, wdx, dtype, f"{kind} dx")
            _close(dy, wdy, dtype, f"{kind} dy")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_ot_hvp_and_cg_match_reference(poison, dtype):
    B, n, m, k, reg = 3, 200, 150, 9, 0.1
    cost, C64, _, _, a, b, f, g = _problem("matrix", B, n, m, 0, 2.0, dtype, seed=1, zeros=False)
    cols, vals = ops.sparsify(cost, reg, f, g, k, backend="cuda")
    r, c, _ = ops.marginals(cost, reg, f, g, backend="cuda")
    d = lambda t: t.double()  # noqa: E731
    vx, vy = torch.randn_like(f), torch.randn_like(g)
    yx, yy = ops.hvp(cols, vals, r, c, vx, vy, shift=0.01, backend="cuda")
    rx, ry = R.hvp_reference(cols.cpu(), d(vals).cpu(), d(r).cpu(), d(c).cpu(), 0.01, d(vx).cpu(), d(vy).cpu())
    _close(yx, rx, dtype, "yx")
    _close(yy, ry, dtype, "yy")
    rhs_x, rhs_y = a - r, b - c
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    zx, zy, iters, resid = ops.cg(cols, vals, r, c, rhs_x, rhs_y, shift=1e-3, tol=tol, max_iter=500, backend="cuda")
    assert (resid.double() <= tol).all(), resid
    hx, hy = R.hvp_reference(cols.cpu(), d(vals).cpu(), d(r).cpu(), d(c).cpu(), 1e-3, d(zx).cpu(), d(zy).cpu())
    res = torch.cat([d(rhs_x).cpu() - hx, d(rhs_y).cpu() - hy], 1).norm(dim=1)
    bn = torch.cat([d(rhs_x), d(rhs_y)], 1).norm(dim=1).cpu()
    assert (res <= 10 * tol * bn).all(), f"residual {res / bn}"


def test_cuda_ot_100k_points_without_the_cost_matrix():
    """n = m = 100k points in [0,1]^2 (a float32 cost matrix would take 40 GB): Sinkhorn half-steps and the
    marginals run in O(n + m) memory; rows and columns sampled against the float64 reference."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    n = m = 100_000
    reg = 0.01
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(1, n, 2, device="cuda", generator=gen)
    y = torch.rand(1, m, 2, device="cuda", generator=gen)
    a = torch.full((1, n), 1.0 / n, device="cuda")
    b = torch.full((1, m), 1.0 / m, device="cuda")
    cost = ops.Cost.points(x, y, kind="sqeuclidean")
    f, g = torch.zeros_like(a), torch.zeros_like(b)
    base = torch.cuda.memory_allocated()
    for _ in range(3):
        f, _ = ops.sinkhorn_step(cost, 0, reg, a, g, backend="cuda")
        g, err = ops.sinkhorn_step(cost, 1, reg, b, f, pot=g, err_norm=1, backend="cuda")
    r, c, obj = ops.marginals(cost, reg, f, g, a, b, backend="cuda")
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 64 << 20, "the n x m cost was materialised"
    assert torch.isfinite(err).all() and torch.isfinite(obj).all()
    assert abs(float(c.sum()) - 1.0) < 1e-3  # after a column step the column marginal is b up to rounding
    rows = torch.randint(0, n, (64,), device="cuda", generator=gen)
    Cs = R.point_cost(R.SQEUCLIDEAN, 2.0, x[:, rows].double(), y.double())
    want_r = torch.exp((f[:, rows, None].double() + g[:, None, :].double() - Cs) / reg).sum(2)
    assert_close(r[:, rows], want_r, torch.float32, "r (sampled rows)")
    f2, _ = ops.sinkhorn_step(cost, 0, reg, a, g, backend="cuda")
    want_f = reg * (torch.log(a[:, rows].double()) - torch.logsumexp((g[:, None, :].double() - Cs) / reg, 2))
    assert_close(f2[:, rows], want_f, torch.float32, "f (sampled rows)")


# Small enough to run under compute-sanitizer (memcheck, racecheck, synccheck) on the device machine.
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", [("matrix", 2, 37, 41, 0, 2.0, 0.3), ("euclidean_pow", 2, 17, 39, 40, 1.0, 0.5)],
                         ids=["matrix", "points-d40"])
def test_cuda_sanitizer_cases(case, dtype):
    kind, B, n, m, D, p, reg = case
    cost, C64, x, y, a, b, f, g = _problem(kind, B, n, m, D, p, dtype)
    for axis, w, other, pot in ((0, a, g, f), (1, b, f, g)):
        out, err = ops.sinkhorn_step(cost, axis, reg, w, other, pot=pot, err_norm=2, backend="cuda")
        want, _ = R.sinkhorn_step_reference(C64, axis, reg, w.double(), other.double(), pot.double(), 2)
        _close(out, want, dtype, f"axis {axis}")
    r, c, obj = ops.marginals(cost, reg, f, g, a, b, backend="cuda")
    ops.plan(cost, reg, f, g, backend="cuda")
    cols, vals = ops.sparsify(cost, reg, f, g, 5, backend="cuda")
    yx, yy = ops.hvp(cols, vals, r, c, a, b, backend="cuda")
    ops.cg(cols, vals, r, c, a - r, b - c, shift=1e-3, tol=1e-6, max_iter=20, backend="cuda")
    if kind != "matrix":
        ops.points_grad(cost, reg, f, g, backend="cuda")
    torch.cuda.synchronize()
