"""kernelkit.jax.rbf (csrc/jax/rbf.cpp): the grid build, the k-NN search and the fused RBF features as XLA
FFI custom calls, against the torch path (kernelkit.rbf with backend="cpu", the same C entry points) and
the float64 reference (kernelkit.rbf.reference):

- the grid's bytes equal the torch/CPU grid's; knn's idx equal torch's exactly (padding -1 / +inf for
  k > M), dist2 and its gradient (x, centers) match torch autograd;
- rbf_features under jax.jit, float32 (int32 indices, x64 off) and float64 (int64 indices, under
  jax.enable_x64), three kernels / shape layouts / normalization modes, with and without omegas, odd
  sizes: output vs torch and vs the float64 reference; gradients w.r.t. x, centers, shapes, weights,
  omegas vs torch autograd and the reference vjp; check_grads in float64;
- explicit idx (int32 and int64, with missing neighbours), float16 weights, N = 0 and a vmap batch of 0;
- jax.vmap (x / weights / centers batched) equals a Python loop, also for per-example gradients and
  the gradient of a batched sum;
- bad arguments raise TypeError / ValueError naming the argument at trace time; bad values (a shape that
  is not positive definite) fail when the call runs with kernelkit's message.
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("kernelkit.jax")  # skipped when kernelkit was built without its JAX module

import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

from helpers import TOL, rel_err  # noqa: E402
from kernelkit.jax import rbf as jr  # noqa: E402
from kernelkit.rbf import build_grid, knn, rbf_features  # noqa: E402
from kernelkit.rbf import reference as R  # noqa: E402

N, M, C, K = 37, 23, 5, 6
DTYPES = [np.float32, np.float64]
TDT = {np.float32: torch.float32, np.float64: torch.float64, np.float16: torch.float16}
# (dim, kernel, full shapes, omegas, normalize, detach_denominator)
CASES = {
    "ivq-full-omegas-detached": (3, "ivq", True, True, True, True),
    "gauss-diag-plain-full": (2, "gauss", False, False, True, False),
    "nlin-omegas-none": (2, "nlin", False, True, False, True),
}


def _mode(dtype):
    """float64 runs with x64 enabled (int64 indices); float32 without (int32 indices)."""
    return jax.enable_x64(True) if dtype == np.float64 else contextlib.nullcontext()


def _problem(dim, kernel, full, seed, n=N, m=M, c=C):
    rng = np.random.default_rng(seed)
    spacing = max(m, 1) ** (-1.0 / dim)
    if kernel == "nlin":
        A = (0.3 + rng.random((m, dim))) / (2 * spacing)
    elif full:
        L = rng.standard_normal((m, dim, dim))
        A = (L @ L.transpose(0, 2, 1) + 0.5 * np.eye(dim)) / (4 * spacing ** 2)
    else:
        A = (0.2 + rng.random((m, dim))) / spacing ** 2
    return dict(x=rng.random((n, dim)), centers=rng.random((m, dim)), shapes=A,
                weights=rng.standard_normal((m, c)), omegas=np.exp(np.linspace(0.0, np.log(30.0), c)),
                cot=rng.standard_normal((n, c)))


def _norm_mode(normalize, detach):
    return R.NORM_NONE if not normalize else (R.NORM_DETACHED if detach else R.NORM_FULL)


def _t(a, dtype=torch.float64, grad=False):
    return torch.tensor(np.asarray(a, np.float64), dtype=dtype, requires_grad=grad)


def _np(a):
    return torch.from_numpy(np.asarray(a).astype(np.float64))


# ---- grid and search ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_grid_and_knn_match_torch(dtype):
    with _mode(dtype):
        for dim in (2, 3):
            p = _problem(dim, "ivq", True, 1)
            c, x = jnp.asarray(p["centers"], dtype), jnp.asarray(p["x"], dtype)
            grid = jax.jit(jr.build_grid)(c)
            ct, xt = _t(p["centers"], TDT[dtype]), _t(p["x"], TDT[dtype])
            assert np.array_equal(np.asarray(grid), build_grid(ct, backend="cpu").numpy())
            for m, k in ((M, K), (5, 8)):            # k > M: slots M.. are -1 / +inf
                idx, d2 = jax.jit(functools.partial(jr.knn, k=k))(x, c[:m])
                assert idx.dtype == (jnp.int64 if dtype == np.float64 else jnp.int32)
                it, d2t = knn(xt, ct[:m], k, backend="cpu")
                assert np.array_equal(np.asarray(idx), it.numpy())
                assert np.array_equal(np.isinf(np.asarray(d2)), np.isinf(d2t.numpy()))
                fin = np.isfinite(d2t.numpy())
                assert rel_err(_np(np.asarray(d2)[fin]), d2t[fin]) <= TOL[TDT[dtype]]
                ref_i, ref_d = R.knn_reference(xt.double(), ct[:m].double(), k)
                assert rel_err(_np(np.asarray(d2)[fin]), ref_d[fin]) <= TOL[TDT[dtype]]
            # a grid passed in gives the same search
            idx2, _ = jax.jit(lambda x, c, g: jr.knn(x, c, K, grid=g))(x, c, grid)
            assert np.array_equal(np.asarray(idx2), knn(xt, ct, K, backend="cpu")[0].numpy())


@pytest.mark.parametrize("dtype", DTYPES)
def test_knn_dist2_gradient_matches_torch(dtype):
    with _mode(dtype):
        p = _problem(3, "ivq", True, 2)
        cot = np.random.default_rng(3).standard_normal((N, K))
        x, c = jnp.asarray(p["x"], dtype), jnp.asarray(p["centers"], dtype)
        dx, dc = jax.jit(jax.grad(lambda x, c: jnp.sum(jr.knn(x, c, K)[1] * cot), argnums=(0, 1)))(x, c)
        xt, ct = _t(p["x"], TDT[dtype], True), _t(p["centers"], TDT[dtype], True)
        (knn(xt, ct, K, backend="cpu")[1] * _t(cot, TDT[dtype])).sum().backward()
        assert rel_err(_np(dx), xt.grad) <= TOL[TDT[dtype]]
        assert rel_err(_np(dc), ct.grad) <= TOL[TDT[dtype]]
        assert np.abs(np.asarray(dc)).max() > 0


# ---- features --------------------------------------------------------------------------------------------------
def _jargs(p, dtype, omegas):
    return (jnp.asarray(p["x"], dtype), jnp.asarray(p["centers"], dtype), jnp.asarray(p["shapes"], dtype),
            jnp.asarray(p["weights"], dtype), jnp.asarray(p["omegas"], dtype) if omegas else None)


def _torch_run(p, dtype, kernel, omegas, normalize, detach, idx=None, backward=True):
    """torch/CPU output and gradients (x, centers, shapes, weights, omegas) and the idx it searched."""
    td = TDT[dtype]
    ts = [_t(p[k], td, True) for k in ("x", "centers", "shapes", "weights")]
    om = _t(p["omegas"], td, True) if omegas else None
    out = rbf_features(*ts, om, k=K, kernel=kernel, normalize=normalize, detach_denominator=detach, idx=idx,
                       backend="cpu")
    if backward:
        (out * _t(p["cot"], td)).sum().backward()
    grads = [t.grad for t in ts] + ([om.grad] if omegas else [])
    used = idx if idx is not None else knn(ts[0].detach(), ts[1].detach(), K, backend="cpu")[0]
    return out.detach(), grads, used


def _fn(kernel, normalize, detach, **kw):
    return functools.partial(jr.rbf_features, k=K, kernel=kernel, normalize=normalize, detach_denominator=detach,
                             **kw)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_features_forward_and_grad(dtype, case):
    dim, kernel, full, omegas, normalize, detach = CASES[case]
    p = _problem(dim, kernel, full, 10)
    mode = _norm_mode(normalize, detach)
    tol = TOL[TDT[dtype]]
    with _mode(dtype):
        args = _jargs(p, dtype, omegas)
        f = _fn(kernel, normalize, detach)
        out = jax.jit(f)(*args)
        nargs = 5 if omegas else 4
        loss = lambda *a: jnp.sum(f(*a) * p["cot"].astype(dtype))  # noqa: E731
        grads = jax.jit(jax.grad(loss, argnums=tuple(range(nargs))))(*args)
    out_t, grads_t, idx = _torch_run(p, dtype, kernel, omegas, normalize, detach)
    assert out.shape == (N, C) and out.dtype == dtype
    assert rel_err(_np(out), out_t) <= tol                       # the torch path, same inputs
    f64 = [_t(p[k]) for k in ("x", "centers", "shapes", "weights")] + [_t(p["omegas"]) if omegas else None]
    ref = R.features_reference(*f64, idx, kernel, mode)
    assert rel_err(_np(out), ref) <= tol                         # the float64 reference
    ref_g = R.features_backward_reference(_t(p["cot"]), *f64, idx, kernel, mode)
    names = ("dx", "dcenters", "dshapes", "dweights", "domegas")
    for i in range(nargs):
        assert grads[i].shape == args[i].shape and grads[i].dtype == dtype
        err_t, err_r = rel_err(_np(grads[i]), grads_t[i]), rel_err(_np(grads[i]), ref_g[i])
        # float32: the sine's phase error carries into the non-weight gradients (as tests/test_rbf.py)
        tol_r = tol * (1 if names[i] == "dweights" or not omegas else 10)
        assert err_t <= tol and err_r <= tol_r, f"{names[i]}: vs torch {err_t:.2e}, vs reference {err_r:.2e}"
        assert np.abs(np.asarray(grads[i])).max() > 0, names[i]


def test_check_grads_float64():
    """Numerical vs custom_vjp gradients, denominator differentiated (normalize, detach_denominator=False);
    full shapes through a symmetrization so the perturbed matrices stay symmetric."""
    p = _problem(3, "ivq", True, 20, n=6, m=7, c=3)
    with jax.enable_x64(True):
        x, c, A, w, om = _jargs(p, np.float64, True)
        idx = jr.knn(x, c, 4)[0]
        f = lambda x, c, S, w, om: jr.rbf_features(x, c, 0.5 * (S + jnp.swapaxes(S, 1, 2)), w, om,  # noqa: E731
                                                   kernel="ivq", detach_denominator=False, idx=idx)
        check_grads(f, (x, c, A, w, om), order=1, modes=["rev"], atol=1e-7, rtol=1e-7, eps=1e-6)
        g = lambda x, c, S, w: jr.rbf_features(x, c, S, w, kernel="gauss", normalize=False, idx=idx)  # noqa: E731
        check_grads(g, (x, c, jnp.abs(A[:, :, 0]) + 1.0, w), order=1, modes=["rev"], atol=1e-7, rtol=1e-7, eps=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_explicit_idx_and_missing_neighbours(dtype):
    p = _problem(2, "gauss", True, 30)
    with _mode(dtype):
        args = _jargs(p, dtype, True)
        f = jax.jit(_fn("gauss", True, True))
        searched = f(*args)
        idx = np.asarray(jr.knn(args[0], args[1], K)[0]).astype(np.int64)
        idx[::3, 2:] = -1                                       # missing neighbours
        idx[5] = -1
        outs = [f(*args, idx=jnp.asarray(idx, it)) for it in ((np.int32, np.int64) if dtype == np.float64
                                                               else (np.int32,))]
        full_idx = jnp.asarray(np.asarray(jr.knn(args[0], args[1], K)[0]))
        assert np.array_equal(np.asarray(f(*args, idx=full_idx)), np.asarray(searched))
    out_t, _, _ = _torch_run(p, dtype, "gauss", True, True, True, idx=torch.from_numpy(idx), backward=False)
    for out in outs:
        assert rel_err(_np(out), out_t) <= TOL[TDT[dtype]]
        assert np.array_equal(np.asarray(outs[0]), np.asarray(out))
    assert np.all(np.asarray(outs[0])[5] == 0)                   # no neighbour: zero features


def test_half_weights():
    p = _problem(3, "ivq", False, 40)
    x, c, A, _, om = _jargs(p, np.float32, True)
    w = jnp.asarray(p["weights"], jnp.float16)
    f = _fn("ivq", True, True)
    out = jax.jit(f)(x, c, A, w, om)
    dw = jax.jit(jax.grad(lambda w: jnp.sum(f(x, c, A, w, om).astype(jnp.float32) * p["cot"].astype(np.float32))))(w)
    assert out.dtype == jnp.float16 and dw.dtype == jnp.float16
    ts = [_t(p[k], torch.float32) for k in ("x", "centers", "shapes")]
    wt = _t(p["weights"], torch.float16, True)
    out_t = rbf_features(*ts, wt, _t(p["omegas"], torch.float32), k=K, backend="cpu")
    (out_t.float() * _t(p["cot"], torch.float32)).sum().backward()
    assert rel_err(_np(out), out_t) <= TOL[torch.float16]
    assert rel_err(_np(dw), wt.grad) <= TOL[torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty(dtype):
    p = _problem(3, "ivq", True, 50, n=0)
    with _mode(dtype):
        x, c, A, w, om = _jargs(p, dtype, True)
        f = _fn("ivq", True, True)
        out = jax.jit(f)(x, c, A, w, om)
        dx, dc, dw = jax.grad(lambda x, c, w: jnp.sum(f(x, c, A, w, om)), argnums=(0, 1, 2))(x, c, w)
        assert out.shape == (0, C) and dx.shape == (0, 3)
        assert not np.any(np.asarray(dc)) and not np.any(np.asarray(dw))
        xb = jnp.zeros((0, 4, 3), dtype)                         # a vmap batch of 0
        assert jax.vmap(lambda x: f(x, c, A, w, om))(xb).shape == (0, 4, C)
    out_t, _, _ = _torch_run(p, dtype, "ivq", True, True, True, backward=False)
    assert out_t.shape == (0, C)


# ---- vmap ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_vmap_equals_loop(dtype):
    B = 2
    p = _problem(3, "ivq", True, 60)
    rng = np.random.default_rng(61)
    with _mode(dtype):
        x, c, A, w, om = _jargs(p, dtype, True)
        xb = jnp.asarray(rng.random((B, N, 3)), dtype)
        wb = jnp.asarray(rng.standard_normal((B, M, C)), dtype)
        cb = jnp.asarray(rng.random((B, M, 3)), dtype)
        f = _fn("ivq", True, True)
        fj = jax.jit(f)
        same = lambda a, b: np.array_equal(np.asarray(a), np.asarray(b))  # noqa: E731
        # x and weights batched, the rest shared
        got = jax.jit(jax.vmap(lambda x, w: f(x, c, A, w, om)))(xb, wb)
        assert same(got, jnp.stack([fj(xb[i], c, A, wb[i], om) for i in range(B)]))
        # centers batched (one grid per element), x shared
        got = jax.jit(jax.vmap(lambda c: f(x, c, A, w, om)))(cb)
        assert same(got, jnp.stack([fj(x, cb[i], A, w, om) for i in range(B)]))
        # per-example gradients w.r.t. the shared centers and shapes, and the gradient of a batched sum
        loss = lambda x, c, A: jnp.sum(jnp.sin(f(x, c, A, w, om)))  # noqa: E731
        gc, gA = jax.jit(jax.vmap(jax.grad(loss, argnums=(1, 2)), in_axes=(0, None, None)))(xb, c, A)
        gj = jax.jit(jax.grad(loss, argnums=(1, 2)))
        loop = [gj(xb[i], c, A) for i in range(B)]
        assert rel_err(_np(gc), _np(jnp.stack([g[0] for g in loop]))) <= TOL[TDT[dtype]]
        assert rel_err(_np(gA), _np(jnp.stack([g[1] for g in loop]))) <= TOL[TDT[dtype]]
        total = jax.jit(jax.grad(lambda c: jnp.sum(jax.vmap(lambda x: loss(x, c, A))(xb))))(c)
        assert rel_err(_np(total), _np(loop[0][0] + loop[1][0])) <= TOL[TDT[dtype]]


# ---- bad input -------------------------------------------------------------------------------------------------
def _bad_cases():
    p = _problem(3, "ivq", True, 70)
    x, c, A, w, om = _jargs(p, np.float32, True)
    f = jr.rbf_features
    return [
        (lambda: f(x[:, :2], c, A, w, om), ValueError, "x has 2 coordinates"),
        (lambda: f(x, c[:, :, None], A, w, om), ValueError, "centers must have 2 dimensions"),
        (lambda: f(x.astype(jnp.float16), c, A, w, om), TypeError, "x must be float32 or float64"),
        (lambda: f(x, c, A, w[:-1], om), ValueError, "weights must be (M, C)"),
        (lambda: f(x, c, A, w.astype(jnp.int32), om), TypeError, "weights must have x's dtype"),
        (lambda: f(x, c, A, w, om, kernel="nlin"), ValueError, "shapes for kernel='nlin'"),
        (lambda: f(x, c, A[:-1], w, om), ValueError, "shapes must be (M, D, D)"),
        (lambda: f(x, c, A, w, om[:-1]), ValueError, "omegas must have C = 5"),
        (lambda: f(x, c, A, w, om, kernel="cubic"), ValueError, "kernel must be one of"),
        (lambda: f(x, c, A, w, om, k=33), ValueError, "k must be in [1, 32]"),
        (lambda: f(x, c, A, w, om, normalize=1), TypeError, "normalize must be a bool"),
        (lambda: f(x, c, A, w, om, idx=jnp.zeros((N, 4), jnp.float32)), TypeError, "idx must be int32 or int64"),
        (lambda: f(x, c, A, w, om, idx=jnp.zeros((N + 1, 4), jnp.int32)), ValueError, "idx must be (N, k)"),
        (lambda: f(x, c, A, w, om, grid=jnp.zeros(8, jnp.uint8)), ValueError, "grid has 8 bytes"),
        (lambda: jr.knn(x, c, 0), ValueError, "k must be in [1, 32]"),
        (lambda: jr.knn(x.astype(jnp.bfloat16), c, 4), TypeError, "queries must be float32 or float64"),
        (lambda: jr.build_grid([[0.0, 0.0, 0.0]] * 4), TypeError, "centers must be a JAX array"),
        (lambda: jax.jit(lambda x: f(x, c, A, w, om))(x[:, :2]), ValueError, "x has 2 coordinates"),
    ]


def test_bad_arguments():
    for fn, exc, msg in _bad_cases():
        with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            fn()


def test_bad_values_fail_at_run_time():
    p = _problem(3, "ivq", False, 80)
    x, c, A, w, om = _jargs(p, np.float32, True)
    with pytest.raises(Exception, match="kernelkit: rbf_features_fwd: .*RBF 3"):
        jax.block_until_ready(jax.jit(_fn("ivq", True, True))(x, c, A.at[3, 1].set(-1.0), w, om))
