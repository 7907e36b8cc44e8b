"""kernelkit.jax.ot (XLA FFI custom calls on kk_ot_{sinkhorn_step,marginals,points_grad}_cpu) against the torch
ops and solvers on the same inputs and against the float64 reference: the Sinkhorn half-step under
jax.jit (dense and point-cloud costs, a shared cost, an empty batch), the lax.while_loop solver against
kernelkit.ot.solve (same potentials, niter, convergence), the custom_vjp gradients against torch autograd
(the step; the envelope gradients of sinkhorn_cost / sinkhorn_points), jax.vmap against a loop, and bad
arguments raising errors that name them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
pytest.importorskip("kernelkit.jax", reason="kernelkit built without its JAX module")

import kernelkit.ot as tot  # noqa: E402
from kernelkit.jax import ot as jot  # noqa: E402
from kernelkit.ot import reference as R  # noqa: E402

from helpers import TOL, rel_err  # noqa: E402

B, N, M, D = 2, 5, 7, 3
REG = 0.25


def _t(a):
    return torch.from_numpy(np.array(a))


def _problem(dtype, seed=0, B=B, n=N, m=M):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, n, D)).astype(dtype)
    y = rng.standard_normal((B, m, D)).astype(dtype)
    C = rng.random((B, n, m)).astype(dtype)
    a = rng.random((B, n)).astype(dtype) + 0.5
    b = rng.random((B, m)).astype(dtype) + 0.5
    a /= a.sum(1, keepdims=True)
    b /= b.sum(1, keepdims=True)
    f = (0.3 * rng.standard_normal((B, n))).astype(dtype)
    g = (0.3 * rng.standard_normal((B, m))).astype(dtype)
    return dict(x=x, y=y, C=C, a=a, b=b, f=f, g=g)


def _costs(P, kind, shared=False):
    """(jax Cost, torch Cost, float64 dense torch C) for 'matrix' or a point-cloud kind."""
    if kind == "matrix":
        C = P["C"][:1] if shared else P["C"]
        return jot.Cost.matrix(jnp.asarray(C)), tot.Cost.matrix(_t(C)), _t(C).double()
    x, y = (P["x"][:1], P["y"][:1]) if shared else (P["x"], P["y"])
    p = 1.5 if kind == "euclidean_pow" else 2.0
    Cd = R.point_cost(tot.ops.KINDS[kind], p, _t(x).double(), _t(y).double())
    return (jot.Cost.points(jnp.asarray(x), jnp.asarray(y), kind, p), tot.Cost.points(_t(x), _t(y), kind, p), Cd)


@pytest.mark.parametrize("kind,shared,dtype", [("matrix", False, "float32"), ("matrix", False, "float64"),
                                               ("matrix", True, "float64"), ("sqeuclidean", False, "float32"),
                                               ("sqeuclidean", False, "float64"), ("euclidean_pow", True, "float32")])
def test_step_matches_torch_and_reference(kind, shared, dtype):
    P = _problem(dtype)
    tol = TOL[getattr(torch, dtype)]
    with jax.enable_x64(dtype == "float64"):
        jc, tc, Cd = _costs(P, kind, shared)
        for axis, w, other, pot in ((0, "a", "g", "f"), (1, "b", "f", "g")):
            fn = jax.jit(lambda c, w_, o_, p_, axis=axis: jot.sinkhorn_step(c, axis, REG, w_, o_, p_, err_norm=2))
            pn, err = (np.array(t) for t in fn(jc, P[w], P[other], P[pot]))
            assert pn.dtype == np.dtype(dtype) and pn.shape == P[w].shape and err.shape == (B,)
            tp, te = tot.sinkhorn_step(tc, axis, REG, _t(P[w]), _t(P[other]), _t(P[pot]), 2, backend="cpu")
            # the same C kernel on the same inputs
            assert rel_err(_t(pn), tp) <= tol and rel_err(_t(err), te) <= tol
            rp, re = R.sinkhorn_step_reference(Cd.expand(B, -1, -1), axis, REG, _t(P[w]).double(),
                                               _t(P[other]).double(), _t(P[pot]).double(), R.NORM_L2)
            assert rel_err(_t(pn), rp) <= 10 * tol and rel_err(_t(err), re) <= 10 * tol
            # without pot: no error output, the same update
            pn2, none = jot.sinkhorn_step(jc, axis, REG, P[w], P[other])
            assert none is None and np.array_equal(np.array(pn2), pn)


def test_step_empty_batch_and_zero_weight():
    P = _problem("float32", B=1)
    C = jnp.zeros((0, N, M), jnp.float32)
    pn, err = jax.jit(lambda c, a, g, f: jot.sinkhorn_step(jot.Cost.matrix(c), 0, REG, a, g, f))(
        C, jnp.zeros((0, N)), jnp.zeros((0, M)), jnp.zeros((0, N)))
    assert pn.shape == (0, N) and err.shape == (0,)
    a = P["a"].copy()
    a[0, 2] = 0.0
    pn, _ = jot.sinkhorn_step(jot.Cost.matrix(jnp.asarray(P["C"])), 0, REG, a, P["g"])
    tp, _ = tot.sinkhorn_step(tot.Cost.matrix(_t(P["C"])), 0, REG, _t(a), _t(P["g"]), backend="cpu")
    pn = np.array(pn)
    assert pn[0, 2] == -np.inf and bool(torch.isneginf(tp[0, 2]))
    assert np.abs(np.delete(pn, 2, 1) - np.delete(tp.numpy(), 2, 1)).max() <= 1e-6


@pytest.mark.parametrize("dtype,kind", [("float32", "matrix"), ("float64", "matrix"), ("float64", "sqeuclidean")])
def test_solve_matches_torch_solver(dtype, kind):
    P = _problem(dtype, seed=1)
    with jax.enable_x64(dtype == "float64"):
        jc, tc, _ = _costs(P, kind)
        thr = 1e-5 if dtype == "float32" else 1e-10
        for iters in (300, 4):  # converged (each problem at its own check), and stopped by numItermax
            res = jax.jit(lambda c, a, b, it=iters: jot.solve(c, a, b, REG, numItermax=it, stopThr=thr))(
                jc, P["a"], P["b"])
            tr = tot.solve(tc, _t(P["a"]), _t(P["b"]), REG, numItermax=iters, stopThr=thr, progress=False,
                           backend="cpu")
            assert np.array(res.niter).tolist() == list(tr.niter)
            conv = np.array(res.converged).tolist()
            assert conv == tr.converged.tolist() and any(conv) == (iters == 300)
            assert int(res.n_sinkhorn) == tr.n_sinkhorn
            # same kernels, same order of operations: equal up to rounding
            assert rel_err(_t(res.f), tr.f) <= 1e-12 and rel_err(_t(res.g), tr.g) <= 1e-12
            assert rel_err(_t(res.err), tr.err[-1]) <= 1e-12
            if iters == 300 and kind == "matrix":
                # against an independent computation: the float64 plan of the solution has the marginals
                Pl = R.plan_reference(_t(P["C"]).double(), REG, _t(res.f).double(), _t(res.g).double())
                assert rel_err(Pl.sum(1), _t(P["b"])) <= 10 * thr


@pytest.mark.parametrize("kind", ["matrix", "sqeuclidean", "euclidean_pow"])
def test_step_grads_match_torch_autograd(kind):
    P = _problem("float64", seed=3)
    rng = np.random.default_rng(4)
    for axis, w, other in ((0, "a", "g"), (1, "b", "f")):
        gout = rng.standard_normal(P[w].shape)
        with jax.enable_x64(True):
            jc, _, _ = _costs(P, kind)
            arrs = jc.arrays()

            def loss(arrs, w_, o_):
                c = jot.Cost(jc.kind, jc.p, *((arrs[0], None, None) if jc.kind == 0 else (None, *arrs)))
                return (jot.sinkhorn_step(c, axis, REG, w_, o_)[0] * gout).sum()
            g_arrs, gw, go = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(arrs, P[w], P[other])
        ts = [_t(a).requires_grad_(True) for a in arrs]
        tw, to = _t(P[w]).requires_grad_(True), _t(P[other]).requires_grad_(True)
        tc = tot.Cost.matrix(ts[0]) if kind == "matrix" else tot.Cost.points(ts[0], ts[1], kind, jc.p)
        (tot.sinkhorn_step(tc, axis, REG, tw, to, backend="cpu")[0] * _t(gout)).sum().backward()
        for gj, tt in ((gw, tw), (go, to), *zip(g_arrs, ts)):
            assert rel_err(_t(gj), tt.grad) <= 1e-12


def test_check_grads_float64():
    from jax.test_util import check_grads
    P = _problem("float64", seed=5, B=1, n=3, m=4)
    with jax.enable_x64(True):
        check_grads(jax.jit(lambda C, w, o: jot.sinkhorn_step(jot.Cost.matrix(C), 1, REG, w, o)[0]),
                    (jnp.asarray(P["C"]), jnp.asarray(P["b"]), jnp.asarray(P["f"])), order=1, modes=("rev",),
                    atol=1e-6, rtol=1e-6)
        check_grads(jax.jit(lambda x, y, f, g: jot.dual_value(jot.Cost.points(x, y), REG, f, g, P["a"], P["b"])),
                    tuple(jnp.asarray(P[k]) for k in ("x", "y", "f", "g")), order=1, modes=("rev",),
                    atol=1e-6, rtol=1e-6)


def test_sinkhorn_cost_and_points_envelope_grads_match_torch():
    P = _problem("float64", seed=6, B=1)
    a, b, C, x, y = P["a"][0], P["b"][0], P["C"][0], P["x"][0], P["y"][0]
    with jax.enable_x64(True):
        v, (gM, ga, gb) = jax.jit(jax.value_and_grad(lambda M, a, b: jot.sinkhorn_cost(a, b, M, REG), (0, 1, 2)))(
            C, a, b)
        vp, (gx, gy) = jax.jit(jax.value_and_grad(lambda x, y: jot.sinkhorn_points(x, y, REG, a, b), (0, 1)))(x, y)
    tM, ta, tb = (_t(t).requires_grad_(True) for t in (C, a, b))
    tv = tot.sinkhorn_cost(ta, tb, tM, REG, backend="cpu")
    tv.backward()
    assert abs(float(v) - tv.item()) <= 1e-12 * abs(tv.item())
    for gj, tt in ((gM, tM), (ga, ta), (gb, tb)):
        assert rel_err(_t(gj), tt.grad) <= 1e-12
    tx, ty = _t(x).requires_grad_(True), _t(y).requires_grad_(True)
    tvp = tot.sinkhorn_points(tx, ty, REG, _t(a), _t(b), backend="cpu")
    tvp.backward()
    assert abs(float(vp) - tvp.item()) <= 1e-12 * abs(tvp.item())
    assert rel_err(_t(gx), tx.grad) <= 1e-12 and rel_err(_t(gy), ty.grad) <= 1e-12


def test_vmap_equals_a_loop():
    P = _problem("float32", seed=7)
    rng = np.random.default_rng(8)
    Cs = np.stack([P["C"] + 0.1 * i * rng.random(P["C"].shape).astype(np.float32) for i in range(3)])
    fs = np.stack([P["f"] * (1 + 0.2 * i) for i in range(3)]).astype(np.float32)
    step = jax.jit(jax.vmap(lambda C, f: jot.sinkhorn_step(jot.Cost.matrix(C), 1, REG, P["b"], f)[0]))
    out = np.array(step(Cs, fs))
    sol = jax.jit(jax.vmap(lambda C: jot.solve(jot.Cost.matrix(C), P["a"], P["b"], REG, 300, 1e-5)))(Cs)
    for i in range(3):
        tp, _ = tot.sinkhorn_step(tot.Cost.matrix(_t(Cs[i])), 1, REG, _t(P["b"]), _t(fs[i]), backend="cpu")
        assert rel_err(_t(out[i]), tp) <= 1e-6, i
        tr = tot.solve(tot.Cost.matrix(_t(Cs[i])), _t(P["a"]), _t(P["b"]), REG, numItermax=300, stopThr=1e-5,
                       progress=False, backend="cpu")
        assert np.array(sol.niter[i]).tolist() == list(tr.niter)
        assert rel_err(_t(sol.f[i]), tr.f) <= 1e-6 and rel_err(_t(sol.g[i]), tr.g) <= 1e-6


def test_bad_arguments_name_themselves():
    P = _problem("float32")
    c = jot.Cost.matrix(jnp.asarray(P["C"]))
    with pytest.raises(ValueError, match="axis"):
        jot.sinkhorn_step(c, 2, REG, P["a"], P["g"])
    with pytest.raises(ValueError, match="reg"):
        jot.sinkhorn_step(c, 0, -1.0, P["a"], P["g"])
    with pytest.raises(ValueError, match="w must have shape"):
        jot.sinkhorn_step(c, 0, REG, P["b"], P["g"])
    with pytest.raises(ValueError, match="other must have shape"):
        jot.sinkhorn_step(c, 0, REG, P["a"], P["f"])
    with pytest.raises(TypeError, match="pot must have the cost's dtype"):
        jot.sinkhorn_step(c, 0, REG, P["a"], P["g"], P["f"].astype(np.float16))
    with pytest.raises(ValueError, match="err_norm"):
        jot.sinkhorn_step(c, 0, REG, P["a"], P["g"], err_norm=3)
    with pytest.raises(TypeError, match="cost must be a kernelkit.jax.ot.Cost"):
        jot.sinkhorn_step(P["C"], 0, REG, P["a"], P["g"])
    with pytest.raises(TypeError, match="the cost must have dtype"):
        jot.sinkhorn_step(jot.Cost.matrix(jnp.asarray(P["C"]).astype(jnp.float16)), 0, REG, P["a"], P["g"])
    with pytest.raises(ValueError, match="cost must be 'sqeuclidean'"):
        jot.Cost.points(P["x"], P["y"], "cosine")
    with pytest.raises(ValueError, match="same dimension D"):
        jot.Cost.points(P["x"], P["y"][..., :2])
    with pytest.raises(ValueError, match="numItermax"):
        jot.solve(c, P["a"], P["b"], REG, numItermax=-1)
    with pytest.raises(ValueError, match="empty point cloud"):
        jot.sinkhorn_points(P["x"][0], P["y"][0, :0], REG)
