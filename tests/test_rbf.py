"""rbf ops (python/kernelkit/rbf/ops.py) on every backend that runs here, against the references
(python/kernelkit/rbf/reference.py):

- the neighbour grid: the CPU library's buffer equals the reference's byte for byte;
- knn equals brute force exactly (indices and distances; ties to the smaller index) for uniform and
  clustered centres, queries outside the centres' box, duplicated centres, k > M, non-finite queries,
  N = 0, M = 0, 2-D and 3-D, float32 and float64;
- the fused features against the float64 reference: the three kernels, full and diagonal shapes, the
  three normalization modes, with and without sinusoids (NeuRBF's frequencies up to 4096), float16 /
  bfloat16 weights, strided x / weights, missing neighbours, non-finite queries, empty sizes; outputs
  NaN-poisoned;
- the backward (dx, dcenters, dshapes, dweights, domegas, any subset) against the written-out float64
  vjp (itself checked against torch autograd), gradcheck in float64, opcheck of the four ops,
  torch.compile(fullgraph=True) forward and backward;
- bad input through the user functions: a clear exception naming the argument.

The Triton backend (interpreted on CPU) runs small problems only; tests/test_rbf_triton.py covers its
kernels in depth.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import kernelkit
from kernelkit.rbf import build_grid, knn, ops, rbf_features
from kernelkit.rbf import reference as R
from helpers import rel_err

CPU_BACKENDS = ["torch", "cpu"]


def _triton_ok() -> bool:
    return (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"
            and kernelkit.backends("cpu").get("triton") == "available")


TRITON = pytest.param("triton", marks=pytest.mark.skipif(not _triton_ok(), reason="no Triton interpreter"))


# ---- inputs --------------------------------------------------------------------------------------------
def _centers(m: int, dim: int, dtype, seed: int, kind: str = "uniform") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        c = torch.rand(m, dim, generator=g, dtype=torch.float64)
    elif kind == "clustered":  # three tight blobs and a few stragglers
        mu = torch.rand(3, dim, generator=g, dtype=torch.float64)
        c = mu[torch.randint(0, 3, (m,), generator=g)] + 0.01 * torch.randn(m, dim, generator=g, dtype=torch.float64)
        c[: max(1, m // 10)] = torch.rand(max(1, m // 10), dim, generator=g, dtype=torch.float64)
    elif kind == "grid":       # centres on a lattice: many exactly equal distances (ties)
        side = math.ceil(m ** (1 / dim))
        axes = torch.meshgrid(*[torch.arange(side, dtype=torch.float64) / side] * dim, indexing="ij")
        c = torch.stack([a.reshape(-1) for a in axes], 1)[:m]
    elif kind == "line":       # a degenerate box: zero extent in every dimension but one
        c = torch.zeros(m, dim, dtype=torch.float64)
        c[:, 0] = torch.rand(m, generator=g, dtype=torch.float64)
    else:
        raise ValueError(kind)
    return c.to(dtype)


def _queries(n: int, dim: int, dtype, seed: int, outside: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-0.5, 1.5) if outside else (0.0, 1.0)
    return (lo + (hi - lo) * torch.rand(n, dim, generator=g, dtype=torch.float64)).to(dtype)


def _shapes(m: int, dim: int, kernel: str, full: bool, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Inverse covariances at about the centres' spacing (so several neighbours matter), or nlin scales."""
    g = torch.Generator().manual_seed(seed)
    spacing = max(m, 1) ** (-1.0 / dim)
    if kernel == "nlin":
        return ((0.3 + torch.rand(m, dim, generator=g, dtype=torch.float64)) / (2 * spacing)).to(dtype)
    if full:
        L = torch.randn(m, dim, dim, generator=g, dtype=torch.float64)
        A = L @ L.transpose(1, 2) + 0.5 * torch.eye(dim, dtype=torch.float64)
        return (A / (spacing ** 2 * 4)).to(dtype)
    return ((0.2 + torch.rand(m, dim, generator=g, dtype=torch.float64)) / spacing ** 2).to(dtype)


def _weights(m: int, C: int, dtype, seed: int, pad: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, C + pad, generator=g, dtype=torch.float64).to(dtype)
    return w[:, :C]


def _tol(coord, wdtype, omegas) -> float:
    if coord == torch.float64:
        return 1e-11
    if wdtype in (torch.float16, torch.bfloat16):
        return 1e-2
    wmax = float(omegas.abs().max()) if omegas is not None and omegas.numel() else 1.0
    # float32: phih carries a few ulps; the phase error omega * delta grows with the frequency (rbf.h)
    return 1e-5 + 5e-7 * wmax


def _problem(n, m, dim, C, kernel, full, coord, wdtype, seed, omegas="neurbf", k=4, xpad=0):
    c = _centers(m, dim, coord, seed)
    x_full = _queries(n, dim + xpad, coord, seed + 1, outside=False)
    x = x_full[:, :dim]
    A = _shapes(m, dim, kernel, full, seed + 2, coord)
    w = _weights(m, C, wdtype, seed + 3, pad=2)
    if omegas == "neurbf":
        om = R.log_omegas(C, dtype=coord)
    elif omegas == "low":
        om = R.log_omegas(C, 1.0, 8.0, dtype=coord)
    else:
        om = None
    idx = R.knn_reference(x.contiguous(), c, k)[0]
    return x, c, A, w, om, idx


def _ref_out(x, c, A, w, om, idx, kernel, norm):
    return R.features_reference(x.double(), c.double(), A.double(), w.double(), None if om is None else om.double(),
                                idx, kernel, norm)


# ---- the grid ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,kind", [(0, "uniform"), (1, "uniform"), (2, "uniform"), (57, "uniform"),
                                    (300, "clustered"), (64, "grid"), (40, "line")])
def test_grid_cpu_equals_reference(poison, dim, dtype, m, kind):
    c = _centers(m, dim, dtype, 5, kind)
    ref = R.grid_build_reference(c)
    out = ops.rbf_grid_build(c, "cpu")
    assert out.shape == ref.shape
    hdr = R.grid_header(out)
    assert hdr == R.grid_header(ref), (hdr, R.grid_header(ref))
    assert hdr["ncells"] <= hdr["cells_max"] and hdr["m"] == m and hdr["dim"] == dim
    assert torch.equal(out, ref), "grid bytes differ from the reference"


def test_grid_layout_matches_c():
    for dtype in (torch.float32, torch.float64):
        for dim in (2, 3):
            for m in (0, 1, 7, 1000, 123457):
                assert tuple(kernelkit._lib.C().rbf_grid_layout(ops._KK_DTYPE[dtype], dim, m)) == \
                    R.grid_layout(dtype, dim, m)


# ---- knn -----------------------------------------------------------------------------------------------------
KNN_CASES = [  # (n, m, dim, k, kind)
    (200, 57, 2, 4, "uniform"), (150, 300, 3, 8, "clustered"), (120, 64, 2, 9, "grid"), (90, 27, 3, 8, "grid"),
    (70, 40, 2, 5, "line"), (50, 6, 2, 9, "uniform"), (0, 10, 3, 4, "uniform"), (12, 0, 2, 3, "uniform"),
    (40, 1, 3, 1, "uniform"), (64, 500, 2, 32, "clustered"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", KNN_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knn_equals_brute_force(poison, backend, case, dtype):
    n, m, dim, k, kind = case
    c = _centers(m, dim, dtype, 11, kind)
    x = _queries(n, dim, dtype, 12, outside=True)
    if kind == "grid" and n:
        x[: n // 2] = c[torch.arange(n // 2) % max(m, 1)] if m else x[: n // 2]  # queries on centres: exact ties
    if n > 3:
        x[3, 0] = math.nan
    idx, d2 = knn(x, c, k, backend=backend)
    ridx, rd2 = R.knn_reference(x, c, k)
    assert idx.dtype == torch.int64 and d2.dtype == dtype
    assert torch.equal(idx, ridx), f"indices differ at {(idx != ridx).nonzero()[:5].tolist()}"
    assert torch.equal(d2.isnan(), rd2.isnan())
    assert torch.equal(torch.nan_to_num(d2, nan=-1.0), torch.nan_to_num(rd2, nan=-1.0))
    if m < k and n:
        ok = torch.isfinite(x).all(1)
        assert (idx[:, m:] == -1).all() and torch.isinf(d2[ok, m:]).all() and d2[~ok].isnan().all()


@pytest.mark.parametrize("backend", ["torch", "cpu", TRITON])
def test_knn_small_all_backends(poison, backend):
    c = _centers(23, 2, torch.float32, 3, "grid")
    x = torch.cat([_queries(17, 2, torch.float32, 4), c[:5]])
    idx, d2 = knn(x, c, 6, backend=backend)
    ridx, rd2 = R.knn_reference(x, c, 6)
    assert torch.equal(idx, ridx) and torch.equal(d2, rd2)


def test_knn_grid_reuse_and_dist2_grad():
    c = _centers(80, 3, torch.float64, 21)
    x = _queries(30, 3, torch.float64, 22)
    grid = build_grid(c, backend="cpu")
    i1, d1 = knn(x, c, 5, grid=grid, backend="cpu")
    i2, d2 = knn(x, c, 5, backend="cpu")
    assert torch.equal(i1, i2) and torch.equal(d1, d2)
    xr, cr = x.clone().requires_grad_(), c.clone().requires_grad_()
    _, dd = knn(xr, cr, 5, grid=grid, backend="cpu")
    gx, gc = torch.autograd.grad((dd * torch.arange(5.0, dtype=torch.float64)).sum(), (xr, cr))
    ii = i1
    ex = (2 * (x[:, None] - c[ii]) * torch.arange(5.0, dtype=torch.float64)[None, :, None]).sum(1)
    assert torch.allclose(gx, ex)
    assert torch.allclose(gc.sum(0), -ex.sum(0))


# ---- features: forward ---------------------------------------------------------------------------------------
FWD_CASES = [  # (kernel, full, norm, omegas, dim, k)
    ("ivq", True, 1, "neurbf", 2, 4), ("ivq", False, 0, None, 3, 8), ("gauss", True, 2, "low", 3, 8),
    ("gauss", False, 1, "neurbf", 2, 5), ("nlin", False, 1, "low", 3, 8), ("nlin", False, 0, None, 2, 4),
    ("ivq", True, 0, "low", 3, 3), ("gauss", True, 1, None, 2, 9),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", FWD_CASES)
@pytest.mark.parametrize("coord", [torch.float32, torch.float64])
def test_features_forward(poison, backend, case, coord):
    kernel, full, norm, omk, dim, k = case
    x, c, A, w, om, idx = _problem(97, 45, dim, 11, kernel, full, coord, coord, 7, omk, k, xpad=2)
    out = ops.rbf_features_op(x, c, A, w, om, idx, kernel, norm, backend)
    ref = _ref_out(x, c, A, w, om, idx, kernel, norm)
    assert out.dtype == coord and out.shape == (97, 11)
    err = rel_err(out, ref)
    assert err <= _tol(coord, coord, om), f"relative error {err:.3e}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("wdtype", [torch.float16, torch.bfloat16])
def test_features_half_weights(poison, backend, wdtype):
    x, c, A, w, om, idx = _problem(60, 30, 2, 32, "ivq", True, torch.float32, wdtype, 9, "neurbf", 4)
    out = rbf_features(x, c, A, w, om, idx=idx, backend=backend)
    assert out.dtype == wdtype
    err = rel_err(out, _ref_out(x, c, A, w, om, idx, "ivq", 1))
    assert err <= 1e-2, err


@pytest.mark.parametrize("backend", ["torch", "cpu", TRITON])
def test_features_missing_neighbours_nan_rows_and_empty(poison, backend):
    x, c, A, w, om, _ = _problem(13, 5, 3, 6, "gauss", True, torch.float32, torch.float32, 3, "low", 4)
    x = x.clone()
    x[4, 1] = math.inf
    idx, _ = knn(x, c, 8, backend=backend)          # k > M: slots 5..7 are -1; row 4 all -1
    assert (idx[:, 5:] == -1).all() and (idx[4] == -1).all()
    out = rbf_features(x, c, A, w, om, idx=idx, kernel="gauss", backend=backend)
    assert out[4].isnan().all()
    keep = torch.arange(13) != 4
    ref = _ref_out(x[keep], c, A, w, om, idx[keep], "gauss", 1)
    assert rel_err(out[keep], ref) <= _tol(torch.float32, torch.float32, om)
    # N = 0, M = 0, C = 0
    assert rbf_features(x[:0], c, A, w, om, idx=idx[:0], kernel="gauss", backend=backend).shape == (0, 6)
    e = rbf_features(x, c[:0], A[:0], w[:0], om, k=3, kernel="gauss", backend=backend)
    assert e.shape == (13, 6) and (e[keep] == 0).all() and e[4].isnan().all()
    z = rbf_features(x, c, A, w[:, :0], om[:0], idx=idx, kernel="gauss", backend=backend)
    assert z.shape == (13, 0)


@pytest.mark.parametrize("backend", ["cpu", TRITON])
def test_features_small_triton_and_search_inside(poison, backend):
    x, c, A, w, om, idx = _problem(21, 16, 2, 5, "ivq", False, torch.float32, torch.float32, 13, "neurbf", 4)
    out = rbf_features(x, c, A, w, om, k=4, backend=backend)      # searches its own neighbours
    assert rel_err(out, _ref_out(x, c, A, w, om, idx, "ivq", 1)) <= _tol(torch.float32, torch.float32, om)


# ---- features: backward --------------------------------------------------------------------------------------
BWD_CASES = [  # (kernel, full, norm, omegas, dim, k, needs)
    ("ivq", True, 1, "neurbf", 2, 4, 31), ("ivq", False, 2, "low", 3, 8, 31), ("gauss", True, 0, None, 3, 5, 15),
    ("gauss", False, 2, "low", 2, 4, 31), ("nlin", False, 1, "low", 3, 8, 31), ("nlin", False, 2, None, 2, 4, 15),
    ("ivq", True, 2, "low", 3, 4, 8), ("gauss", True, 1, "neurbf", 2, 6, 1 | 16),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", BWD_CASES)
@pytest.mark.parametrize("coord", [torch.float32, torch.float64])
def test_features_backward(poison, backend, case, coord):
    kernel, full, norm, omk, dim, k, needs = case
    x, c, A, w, om, idx = _problem(83, 37, dim, 9, kernel, full, coord, coord, 17, omk, k, xpad=1)
    idx = idx.clone()
    idx[2, -1] = -1
    g = torch.Generator().manual_seed(5)
    go = torch.randn(83, 9, generator=g, dtype=torch.float64).to(coord)
    res = ops.rbf_features_backward(go, x, c, A, w, om, idx, kernel, norm, needs, backend)
    flags = tuple(bool(needs & (1 << i)) for i in range(5))
    ref = R.features_backward_reference(go.double(), x.double(), c.double(), A.double(), w.double(),
                                        None if om is None else om.double(), idx, kernel, norm, flags)
    names = ("dx", "dcenters", "dshapes", "dweights", "domegas")
    for name, r, e, flag in zip(names, res, ref, flags):
        if not flag or e is None:
            assert r.numel() == 0, name
            continue
        assert r.dtype == coord and r.shape == e.shape, name
        err = rel_err(r, e)
        # the scalar gradients (dx, dcenters, dshapes, domegas) carry omega * phase errors times omega
        tol = _tol(coord, coord, om) * (1 if name == "dweights" or om is None else 10)
        assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kernel,full", [("ivq", True), ("gauss", False), ("nlin", False)])
def test_gradcheck_float64(backend, kernel, full):
    x, c, A, w, om, idx = _problem(9, 7, 3, 3, kernel, full, torch.float64, torch.float64, 31, "low", 4)
    ins = tuple(t.clone().requires_grad_() for t in (x.contiguous(), c, A, w, om))
    for normalize in (True, False):
        def f(*a):
            return rbf_features(*a, idx=idx, kernel=kernel, normalize=normalize, detach_denominator=False,
                                backend=backend)
        assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-6)


def test_detached_denominator_is_neurbf_convention():
    x, c, A, w, om, idx = _problem(20, 12, 2, 4, "ivq", True, torch.float64, torch.float64, 41, "low", 4)
    xs = x.contiguous().requires_grad_()
    out = rbf_features(xs, c, A, w, om, idx=idx, backend="cpu")
    (gx,) = torch.autograd.grad(out.sum(), xs)
    # NeuRBF: phi / (phi.sum().detach() + 1e-8)
    xr = x.contiguous().requires_grad_()
    ref = R.features_reference(xr, c, A, w, om, idx, "ivq", R.NORM_DETACHED)
    (rx,) = torch.autograd.grad(ref.sum(), xr)
    assert rel_err(gx, rx) <= 1e-11
    full = rbf_features(xs, c, A, w, om, idx=idx, detach_denominator=False, backend="cpu")
    (fx,) = torch.autograd.grad(full.sum(), xs)
    assert rel_err(fx, gx) > 1e-3  # the two conventions really differ


# ---- registration ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    x, c, A, w, om, idx = _problem(11, 9, 2, 4, "ivq", True, torch.float64, torch.float64, 51, "low", 4)
    x = x.contiguous()
    grid = ops.rbf_grid_build(c, backend)
    torch.library.opcheck(ops.rbf_grid_build, (c, backend), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.rbf_knn, (x.requires_grad_(), c, grid, 4, backend))
    torch.library.opcheck(ops.rbf_features_op, (x, c.requires_grad_(), A.requires_grad_(), w.requires_grad_(),
                                                om.requires_grad_(), idx, "ivq", 1, backend))
    go = torch.randn(11, 4, dtype=torch.float64)
    torch.library.opcheck(ops.rbf_features_backward, (go, x.detach(), c.detach(), A.detach(), w.detach(),
                                                      om.detach(), idx, "ivq", 2, 31, backend),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_forward_backward():
    x, c, A, w, om, _ = _problem(40, 25, 2, 8, "gauss", True, torch.float32, torch.float32, 61, "neurbf", 4)
    w = w.clone().requires_grad_()
    xs = x.contiguous().requires_grad_()

    def f(x_, w_):
        return rbf_features(x_, c, A, w_, om, k=4, backend="cpu").square().sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = cf(xs, w)
    gx, gw = torch.autograd.grad(loss, (xs, w))
    loss2 = f(xs, w)
    ex, ew = torch.autograd.grad(loss2, (xs, w))
    assert torch.allclose(loss, loss2) and torch.allclose(gx, ex) and torch.allclose(gw, ew)


def test_second_derivative_raises():
    x, c, A, w, om, idx = _problem(5, 6, 3, 2, "ivq", True, torch.float64, torch.float64, 71, "low", 4)
    xs = x.contiguous().requires_grad_()
    out = rbf_features(xs, c, A, w, om, idx=idx, backend="cpu")
    (gx,) = torch.autograd.grad(out.sum(), xs, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivative"):
        gx.sum().backward()


# ---- bad input -----------------------------------------------------------------------------------------------
def _good():
    x, c, A, w, om, idx = _problem(10, 8, 2, 3, "ivq", True, torch.float32, torch.float32, 81, "low", 4)
    return dict(x=x.contiguous(), centers=c, shapes=A, weights=w, omegas=om)


def _call(**kw):
    base = _good()
    extra = {k: kw.pop(k) for k in list(kw) if k not in base}
    base.update(kw)
    return rbf_features(base["x"], base["centers"], base["shapes"], base["weights"], base["omegas"],
                        **{"k": 4, "backend": "cpu", **extra})


def _asym():
    A = _good()["shapes"].clone()
    A[3, 0, 1] += 1e-3 * A[3].abs().max()
    return A


def _notpd():
    A = _good()["shapes"].clone()
    A[5] = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    return A


BAD = [
    (dict(x=torch.zeros(10, 4)), ValueError, "x"),
    (dict(x=torch.zeros(10, 3)), ValueError, "x has 3 coordinates"),
    (dict(centers=torch.zeros(8, 2, dtype=torch.int32)), TypeError, "centers"),
    (dict(x=torch.zeros(10, 2, dtype=torch.float64)), TypeError, "x"),
    (dict(k=0), ValueError, "k must be in"),
    (dict(k=33), ValueError, "k must be in"),
    (dict(k=2.5), TypeError, "k must be an int"),
    (dict(kernel="foo"), ValueError, "kernel"),
    (dict(shapes=torch.ones(8, 3, 3)), ValueError, "shapes"),
    (dict(shapes=_asym()), ValueError, r"shapes\[3\] is not symmetric"),
    (dict(shapes=_notpd()), ValueError, r"shapes\[5\] is not positive definite"),
    (dict(shapes=-torch.ones(8, 2)), ValueError, "must be > 0"),
    (dict(kernel="nlin"), ValueError, "scales"),
    (dict(weights=torch.zeros(7, 3)), ValueError, "weights"),
    (dict(omegas=torch.ones(4)), ValueError, "omegas"),
    (dict(omegas=torch.tensor([1.0, math.nan, 2.0])), ValueError, "omegas"),
    (dict(centers=torch.full((8, 2), math.nan)), ValueError, "centers has a non-finite"),
    (dict(idx=torch.full((10, 4), 8, dtype=torch.int64)), ValueError, "idx entries"),
    (dict(idx=torch.zeros(10, 4, dtype=torch.int32)), ValueError, "idx must be"),
    (dict(normalize="yes"), TypeError, "normalize"),
    (dict(backend="gpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("kw,exc,match", BAD)
def test_bad_input(kw, exc, match):
    with pytest.raises(exc, match=match):
        _call(**kw)


def test_bad_knn_and_grid():
    c = _centers(10, 2, torch.float32, 1)
    x = _queries(5, 2, torch.float32, 2)
    with pytest.raises(ValueError, match="k must be in"):
        knn(x, c, 0)
    with pytest.raises(ValueError, match="queries has 3 coordinates"):
        knn(torch.zeros(5, 3), c, 2)
    with pytest.raises(TypeError, match="grid must be"):
        knn(x, c, 2, grid=torch.zeros(10))
    with pytest.raises(ValueError, match="was it built from these centers"):
        knn(x, c, 2, grid=build_grid(c[:5]))
    with pytest.raises(ValueError, match="non-finite"):
        build_grid(torch.tensor([[0.0, 1.0], [math.inf, 0.0]]))
    with pytest.raises(TypeError, match="queries"):
        knn(x.double(), c, 2)


def test_cpu_library_rejects_bad_values_itself():
    """The C entry points check what the Python layer checks (a caller without Python gets an error
    too): an asymmetric shape and an out-of-range neighbour index reach the library directly."""
    g = _good()
    idx = R.knn_reference(g["x"], g["centers"], 4)[0]
    with pytest.raises(ValueError, match="symmetric"):
        ops.rbf_features_op(g["x"], g["centers"], _asym(), g["weights"], g["omegas"], idx, "ivq", 1, "cpu")
    with pytest.raises(ValueError, match="idx"):
        ops.rbf_features_op(g["x"], g["centers"], g["shapes"], g["weights"], g["omegas"], idx + 100, "ivq", 1, "cpu")
