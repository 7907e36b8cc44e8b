"""The ot solvers: POT compatibility (values, iteration counts, log keys, warning, numpy/torch in and out,
several histograms), the exact LP at small reg, SNS (machine-precision marginals, a non-decreasing dual,
agreement with Sinkhorn), batched = looped, envelope gradients against finite differences, point clouds
without a cost matrix, and bad input."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import kernelkit.ot as kot
from kernelkit.ot import Cost

ot = pytest.importorskip("ot")  # POT, the reference implementation (a test dependency)

BACKENDS = ["torch", "cpu"]


def _points(n, m, seed=0, dtype=torch.float64, D=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, D, generator=g, dtype=torch.float64).to(dtype)
    y = torch.rand(m, D, generator=g, dtype=torch.float64).to(dtype)
    return x, y


def _problem(n, m, seed=0, dtype=torch.float64, uniform=False):
    g = torch.Generator().manual_seed(seed + 100)
    x, y = _points(n, m, seed, dtype)
    M = ((x[:, None] - y[None]) ** 2).sum(-1)
    if uniform:
        a = torch.full((n,), 1.0 / n, dtype=dtype)
        b = torch.full((m,), 1.0 / m, dtype=dtype)
    else:
        a = torch.rand(n, generator=g, dtype=torch.float64).to(dtype) + 0.1
        b = torch.rand(m, generator=g, dtype=torch.float64).to(dtype) + 0.1
        a, b = a / a.sum(), b / b.sum()
    return a, b, M


# ---- POT compatibility ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["sinkhorn_log", "sinkhorn"])
def test_matches_pot_sinkhorn_log_numpy(backend, method):
    a, b, M = _problem(23, 31, seed=1)
    an, bn, Mn = a.numpy(), b.numpy(), M.numpy()
    P_pot, log_pot = ot.sinkhorn(an, bn, Mn, 0.02, method="sinkhorn_log", log=True)
    P, log = kot.sinkhorn(an, bn, Mn, 0.02, method=method, log=True, backend=backend)
    assert isinstance(P, np.ndarray) and P.shape == (23, 31) and P.dtype == np.float64
    assert np.abs(P - P_pot).max() <= 1e-12 * np.abs(P_pot).max()
    assert set(log) == set(log_pot), (set(log), set(log_pot))
    assert log["niter"] == log_pot["niter"]
    assert len(log["err"]) == len(log_pot["err"])
    np.testing.assert_allclose(np.array(log["err"], dtype=float), np.array(log_pot["err"], dtype=float),
                               rtol=1e-6, atol=1e-15)
    for key in ("log_u", "log_v", "u", "v"):
        assert isinstance(log[key], np.ndarray) and log[key].shape == log_pot[key].shape
    # potentials agree up to the gauge shift (log_u + t, log_v - t)
    shift = (log["log_u"] - log_pot["log_u"]).mean()
    np.testing.assert_allclose(log["log_u"] - shift, log_pot["log_u"], atol=1e-9)
    np.testing.assert_allclose(log["log_v"] + shift, log_pot["log_v"], atol=1e-9)
    loss = kot.sinkhorn2(an, bn, Mn, 0.02, backend=backend)
    loss_pot = ot.sinkhorn2(an, bn, Mn, 0.02, method="sinkhorn_log")
    assert abs(float(loss) - float(loss_pot)) <= 1e-12 * abs(float(loss_pot))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_in_torch_out_and_float32(backend):
    a, b, M = _problem(17, 12, seed=2, dtype=torch.float32)
    P = kot.sinkhorn(a, b, M, 0.05, backend=backend, warn=False)  # float32 cannot reach stopThr = 1e-9
    assert isinstance(P, torch.Tensor) and P.dtype == torch.float32 and P.shape == (17, 12)
    P_pot = ot.sinkhorn(a.double().numpy(), b.double().numpy(), M.double().numpy(), 0.05, method="sinkhorn_log",
                        warn=False)
    assert float((P.double() - torch.from_numpy(P_pot)).norm() / torch.from_numpy(P_pot).norm()) < 1e-4
    loss = kot.sinkhorn2(a, b, M, 0.05, backend=backend)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.dtype == torch.float32


def test_uniform_defaults_lists_and_warmstart():
    a, b, M = _problem(9, 14, seed=3, uniform=True)
    P1 = kot.sinkhorn([], [], M.numpy(), 0.1)
    P2 = ot.sinkhorn([], [], M.numpy(), 0.1, method="sinkhorn_log")
    np.testing.assert_allclose(P1, P2, rtol=1e-10, atol=1e-15)
    _, log = kot.sinkhorn(a.tolist(), b.tolist(), M.numpy(), 0.1, log=True)
    _, log2 = kot.sinkhorn(a.numpy(), b.numpy(), M.numpy(), 0.1, log=True, warmstart=(log["log_u"], log["log_v"]))
    assert log2["niter"] == 0  # warm-started at the solution: converged at the first check


def test_not_converged_warning_matches_pot():
    a, b, M = _problem(20, 20, seed=4)
    with pytest.warns(UserWarning, match="Sinkhorn did not converge"):
        kot.sinkhorn(a.numpy(), b.numpy(), M.numpy(), 1e-3, numItermax=15)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kot.sinkhorn(a.numpy(), b.numpy(), M.numpy(), 1e-3, numItermax=15, warn=False)
        kot.sinkhorn2(a.numpy(), b.numpy(), M.numpy(), 1e-3, numItermax=15)  # sinkhorn2: warn=False default


def test_several_histograms_like_pot():
    a, b, M = _problem(15, 11, seed=5)
    g = torch.Generator().manual_seed(0)
    bs = torch.rand(11, 3, generator=g, dtype=torch.float64) + 0.2
    bs = bs / bs.sum(0)
    want, want_log = ot.sinkhorn2(a.numpy(), bs.numpy(), M.numpy(), 0.05, method="sinkhorn_log", log=True)
    got, log = kot.sinkhorn2(a.numpy(), bs.numpy(), M.numpy(), 0.05, log=True)
    assert got.shape == (3,)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert set(log) == set(want_log)
    assert log["log_u"].shape == want_log["log_u"].shape == (15, 3)
    got1 = kot.sinkhorn(a.numpy(), bs.numpy(), M.numpy(), 0.05)  # POT's sinkhorn_log returns the losses too
    np.testing.assert_allclose(got1, want, rtol=1e-10)


def test_unknown_method_and_kwargs():
    a, b, M = _problem(5, 6)
    with pytest.raises(ValueError, match="sinkhorn_stabilized.*not implemented|unknown method"):
        kot.sinkhorn(a, b, M, 0.1, method="sinkhorn_stabilized")
    with pytest.warns(UserWarning, match="ignoring keyword arguments tau"):
        kot.sinkhorn(a, b, M, 0.1, tau=1e3)


# ---- against the exact LP and between methods ------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_small_reg_approaches_exact_lp(backend):
    a, b, M = _problem(30, 25, seed=6)
    lp = float(ot.emd2(a.numpy(), b.numpy(), M.numpy()))
    for reg in (1e-2, 1e-3, 1e-4):
        loss = float(kot.sinkhorn2(a, b, M, reg, method="sns", backend=backend, numItermax=200))
        # entropic bias: 0 <= <M, P_reg> - LP <= reg * (log n + log m)-ish; checked against a tight bound
        assert -1e-9 <= loss - lp <= reg * (math.log(30) + math.log(25)), (reg, loss, lp)
    P = kot.sinkhorn(a, b, M, 1e-4, method="sns", backend=backend, numItermax=200)
    P_lp = torch.from_numpy(ot.emd(a.numpy(), b.numpy(), M.numpy()))
    assert float((P - P_lp).abs().sum()) < 0.05


@pytest.mark.parametrize("backend", BACKENDS)
def test_sns_machine_precision_monotone_dual_and_agrees_with_sinkhorn(backend):
    a, b, M = _problem(60, 45, seed=7)
    reg = 2e-3
    res = kot.solve(Cost.matrix(M), a[None], b[None], reg, method="sns", numItermax=100, stopThr=1e-14,
                    backend=backend)
    r, c, _ = kot.marginals(Cost.matrix(M), reg, res.f, res.g, backend="torch")
    l1 = float((r - a).abs().sum() + (c - b).abs().sum())
    assert bool(res.converged.all()) and l1 < 1e-13, l1
    assert res.n_newton <= 30
    objs = torch.stack(res.obj)[:, 0]
    assert bool((objs[1:] >= objs[:-1] - 1e-14 * objs.abs().max()).all()), objs
    ref = kot.solve(Cost.matrix(M), a[None], b[None], reg, method="sinkhorn_log", numItermax=100000, stopThr=1e-13,
                    backend="cpu", progress=False)
    shift = (res.f - ref.f).mean()
    assert float((res.f - shift - ref.f).abs().max()) < 1e-9
    assert float((res.g + shift - ref.g).abs().max()) < 1e-9
    P1 = kot.plan(Cost.matrix(M), reg, res.f, res.g, backend="torch")
    P2 = kot.plan(Cost.matrix(M), reg, ref.f, ref.g, backend="torch")
    assert float((P1 - P2).abs().sum()) < 1e-10


def test_sns_fixed_keep_and_log():
    a, b, M = _problem(40, 40, seed=8, uniform=True)
    P, log = kot.sinkhorn(a, b, M, 5e-3, method="sns", log=True, keep=8, stopThr=1e-12)
    assert {"err", "niter", "log_u", "log_v", "u", "v", "n_sinkhorn", "n_newton", "keep", "cg_iters",
            "obj"} <= set(log)
    assert all(k == 8 for k in log["keep"])
    assert float(log["err"][-1]) < 1e-12
    assert float((P.sum(1) - a).abs().sum()) < 1e-11


@pytest.mark.parametrize("method", ["sinkhorn_log", "sns"])
def test_batched_equals_looped(method):
    g = torch.Generator().manual_seed(9)
    B, n, m = 3, 14, 19
    x = torch.rand(B, n, 2, generator=g, dtype=torch.float64)
    y = torch.rand(B, m, 2, generator=g, dtype=torch.float64)
    a = torch.rand(B, n, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(B, m, generator=g, dtype=torch.float64) + 0.1
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    vals, log = kot.sinkhorn_points(x, y, 0.01, a, b, method=method, log=True)
    assert vals.shape == (B,)
    for i in range(B):
        v, lg = kot.sinkhorn_points(x[i], y[i], 0.01, a[i], b[i], method=method, log=True)
        assert abs(float(v) - float(vals[i])) <= 1e-12 * abs(float(v))
        if method == "sinkhorn_log":  # SNS shares one keep / damping schedule across a batch
            assert lg["niter"] == log["niter"][i]


def test_points_match_dense_cost():
    for kind, p in (("sqeuclidean", 2.0), ("euclidean_pow", 1.0), ("euclidean_pow", 1.5), ("minkowski_pow", 1.0),
                    ("minkowski_pow", 3.0)):
        x, y = _points(13, 17, seed=10, D=3)
        C = kot.reference.point_cost(kot.reference.KINDS[kind], p, x[None], y[None])[0]
        want = kot.sinkhorn_cost([], [], C, 0.05)
        got = kot.sinkhorn_points(x, y, 0.05, cost=kind, p=p)
        assert abs(float(got) - float(want)) <= 1e-10 * abs(float(want)), kind


# ---- gradients --------------------------------------------------------------------------------------------
def _fd(fn, t, eps=1e-6):
    g = torch.zeros_like(t)
    flat = t.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + eps
        hi = float(fn())
        flat[i] = old - eps
        lo = float(fn())
        flat[i] = old
        g.view(-1)[i] = (hi - lo) / (2 * eps)
    return g


@pytest.mark.parametrize("backend", BACKENDS)
def test_envelope_gradients_match_finite_differences(backend):
    a, b, M = _problem(6, 7, seed=11)
    reg = 0.1
    kw = dict(stopThr=1e-13, numItermax=200, method="sns", backend=backend, progress=False)
    Mg = M.clone().requires_grad_()
    ag = a.clone().requires_grad_()
    val = kot.sinkhorn_cost(ag, b, Mg, reg, **kw)
    val.backward()
    gM = _fd(lambda: kot.sinkhorn_cost(a, b, M, reg, **kw), M)
    assert float((Mg.grad - gM).abs().max()) < 1e-7
    # a: only balanced directions (sum 0) are defined; compare the gradient's projection
    da = ag.grad - ag.grad.mean()
    d = torch.zeros_like(a)
    d[0], d[3] = 1.0, -1.0
    eps = 1e-6
    num = (float(kot.sinkhorn_cost(a + eps * d, b, M, reg, **kw))
           - float(kot.sinkhorn_cost(a - eps * d, b, M, reg, **kw))) / (2 * eps)
    assert abs(float((da * d).sum()) - num) < 1e-7


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,p", [("sqeuclidean", 2.0), ("euclidean_pow", 1.5), ("minkowski_pow", 2.5)])
def test_points_gradients_match_finite_differences(backend, kind, p):
    x, y = _points(5, 6, seed=12)
    kw = dict(stopThr=1e-13, numItermax=200, method="sns", cost=kind, p=p, backend=backend, progress=False)
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    kot.sinkhorn_points(xg, yg, 0.05, **kw).backward()
    gx = _fd(lambda: kot.sinkhorn_points(x, y, 0.05, **kw), x)
    gy = _fd(lambda: kot.sinkhorn_points(x, y, 0.05, **kw), y)
    assert float((xg.grad - gx).abs().max()) < 1e-7
    assert float((yg.grad - gy).abs().max()) < 1e-7


def test_sinkhorn2_envelope_gradient_is_the_plan():
    a, b, M = _problem(8, 9, seed=13)
    Mg = M.clone().requires_grad_()
    loss = kot.sinkhorn2(a, b, Mg, 0.05)
    loss.backward()
    P = kot.sinkhorn(a, b, M, 0.05)
    assert float((Mg.grad - P).abs().max()) < 1e-15


# ---- bad input -------------------------------------------------------------------------------------------
def test_bad_input_raises_clear_errors():
    a, b, M = _problem(5, 6)
    cases = [
        (dict(a=-a), "negative"),
        (dict(a=torch.where(torch.arange(5) == 2, torch.nan, a)), "NaN"),
        (dict(b=b * 2), "same total mass"),
        (dict(reg=0.0), "reg must be finite and > 0"),
        (dict(reg=-1.0), "reg must be finite and > 0"),
        (dict(reg=float("nan")), "reg must be finite"),
        (dict(a=a[:4]), "a has length 4"),
        (dict(M=M[:, :5]), "b has length 6"),
        (dict(M=M.new_zeros(0, 6), a=[], b=[]), "empty"),
        (dict(M=M.masked_fill(M > 0.5, float("inf"))), "M contains NaN or inf"),
        (dict(M=M[None]), "2-D"),
        (dict(a=torch.zeros(5, dtype=torch.float64), b=torch.zeros(6, dtype=torch.float64)), "positive total mass"),
    ]
    for over, msg in cases:
        args = dict(a=a, b=b, M=M, reg=0.1)
        args.update(over)
        with pytest.raises(ValueError, match=msg):
            kot.sinkhorn(args["a"], args["b"], args["M"], args["reg"])
    with pytest.raises(ValueError, match="empty point cloud"):
        kot.sinkhorn_points(torch.zeros(0, 2), torch.rand(3, 2), 0.1)
    with pytest.raises(ValueError, match="same dimension"):
        kot.sinkhorn_points(torch.rand(3, 2), torch.rand(3, 3), 0.1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["sinkhorn_log", "sns"])
def test_tiny_reg_never_nan(backend, method):
    a, b, M = _problem(25, 30, seed=14)
    M = M * 50.0  # cost scale ~ 50
    reg = 1e-4 * float(M.max())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        P, log = kot.sinkhorn(a, b, M, reg, method=method, numItermax=300, log=True, backend=backend)
    assert bool(torch.isfinite(P).all())
    assert bool(torch.isfinite(log["log_u"]).all()) and bool(torch.isfinite(log["log_v"]).all())
    assert float(P.sum()) == pytest.approx(1.0, abs=1e-6)


def test_zero_weights():
    a, b, M = _problem(10, 12, seed=15)
    a = a.clone()
    a[3] = 0
    a = a / a.sum()
    for method in ("sinkhorn_log", "sns"):
        P, log = kot.sinkhorn(a, b, M, 0.02, method=method, log=True, stopThr=1e-12)
        assert bool(torch.isfinite(P).all()) and float(P[3].abs().max()) == 0.0
        assert float((P.sum(1) - a).abs().sum() + (P.sum(0) - b).abs().sum()) < 1e-10
        P_pot = ot.sinkhorn(a.numpy(), b.numpy(), M.numpy(), 0.02, method="sinkhorn_log", stopThr=1e-12)
        assert float((P - torch.from_numpy(P_pot)).abs().max()) < 1e-9
