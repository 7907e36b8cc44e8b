"""Property-based tests (hypothesis) of the public rbf functions (kernelkit.rbf: build_grid, knn,
rbf_features) on the backends that run here.

The rule (as in tests/test_mfac_properties.py):
  * valid input -- random N, M in {0, 1, 2, ...}, 2-D and 3-D, k from 1 to 32 (past M included),
    float32 / float64, centres uniform, clustered, on a lattice (exact ties), on a line (zero extents),
    far from the origin or at tiny scales, queries inside and outside the centres' box, x and weights
    contiguous, column slices or transposed -- gives exactly the brute-force neighbours, and features and
    gradients matching the float64 reference on the same inputs, never NaN although every torch.empty
    starts NaN-filled (`poison`);
  * bad input of every kind raises ValueError or TypeError naming the argument, never a crash.
Example counts scale with the hypothesis profile (tests/conftest.py).
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import given, note  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kernelkit.rbf import knn, ops, rbf_features  # noqa: E402
from kernelkit.rbf import reference as R  # noqa: E402
from properties import FAST, IDS, N, SEEDS, _one_thread, poisoned  # noqa: E402,F401

# The torch backend is the reference itself (tests/test_rbf.py covers it): only the kernels here.
FAST = [c for c in FAST if c[0] != "torch"]

SIZES = [0, 1, 2, 3, 5, 9, 17, 40, 77]
KINDS = ["uniform", "clustered", "lattice", "line", "far", "tiny"]
LAYOUTS = ["contiguous", "sliced", "transposed"]


def _centers(m, dim, dtype, kind, gen):
    if kind == "lattice":
        side = max(1, math.ceil(m ** (1 / dim)))
        axes = torch.meshgrid(*[torch.arange(side, dtype=torch.float64) / side] * dim, indexing="ij")
        c = torch.stack([a.reshape(-1) for a in axes], 1)[:m]
    elif kind == "clustered":
        mu = torch.rand(2, dim, generator=gen, dtype=torch.float64)
        c = mu[torch.randint(0, 2, (m,), generator=gen)] + 1e-3 * torch.randn(m, dim, generator=gen, dtype=torch.float64)
    elif kind == "line":
        c = torch.zeros(m, dim, dtype=torch.float64)
        c[:, -1] = torch.rand(m, generator=gen, dtype=torch.float64)
    else:
        c = torch.rand(m, dim, generator=gen, dtype=torch.float64)
    if kind == "far":
        c = c + 1000.0
    if kind == "tiny":
        c = c * 1e-5
    return c.to(dtype)


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "sliced":
        wide = torch.empty(t.shape[0], t.shape[1] + 2, dtype=t.dtype)
        wide[:, 1:-1] = t
        return wide[:, 1:-1]
    if layout == "transposed":
        return t.T.contiguous().T
    return t


@pytest.mark.parametrize("case", FAST, ids=IDS)
@poisoned(max(N // 4, 20))
@given(n=st.sampled_from(SIZES), m=st.sampled_from(SIZES), dim=st.sampled_from([2, 3]), k=st.integers(1, 32),
       dtype=st.sampled_from([torch.float32, torch.float64]), kind=st.sampled_from(KINDS),
       inside=st.booleans(), dup=st.booleans(), layout=st.sampled_from(LAYOUTS), seed=SEEDS)
def test_knn_is_exact(poison, case, n, m, dim, k, dtype, kind, inside, dup, layout, seed):
    backend, _ = case
    gen = torch.Generator().manual_seed(seed)
    c = _centers(m, dim, dtype, kind, gen)
    if dup and m > 2:
        c[m // 2] = c[0]                     # a duplicated centre: equal distances, ties by index
    lo, hi = (c.min(0).values.double(), c.max(0).values.double()) if m else (torch.zeros(dim), torch.ones(dim))
    span = (hi - lo).clamp_min(1e-6)
    u = torch.rand(n, dim, generator=gen, dtype=torch.float64)
    x = (lo + (u if inside else 3 * u - 1) * span).to(dtype)
    if n and m and dup:
        x[0] = c[min(1, m - 1)]              # a query exactly on a centre
    x = _layout(x, layout)
    note(f"x {tuple(x.shape)} strides {x.stride()}, c {tuple(c.shape)} {kind}")
    idx, d2 = knn(x, c, k, backend=backend)
    ridx, rd2 = R.knn_reference(x.contiguous(), c, k)
    assert torch.equal(idx, ridx)
    assert torch.equal(d2, rd2)


def _shapes(m, dim, kernel, full, gen, dtype):
    spacing = max(m, 1) ** (-1.0 / dim)
    if kernel == "nlin":
        return ((0.3 + torch.rand(m, dim, generator=gen, dtype=torch.float64)) / (2 * spacing)).to(dtype)
    if full:
        L = torch.randn(m, dim, dim, generator=gen, dtype=torch.float64)
        return ((L @ L.transpose(1, 2) + 0.3 * torch.eye(dim, dtype=torch.float64)) / (4 * spacing ** 2)).to(dtype)
    return ((0.2 + torch.rand(m, dim, generator=gen, dtype=torch.float64)) / spacing ** 2).to(dtype)


@pytest.mark.parametrize("case", FAST, ids=IDS)
@poisoned(max(N // 5, 20))
@given(n=st.sampled_from(SIZES), m=st.sampled_from(SIZES), dim=st.sampled_from([2, 3]), k=st.integers(1, 12),
       C=st.sampled_from([0, 1, 3, 8, 17, 32]), kernel=st.sampled_from(["ivq", "gauss", "nlin"]), full=st.booleans(),
       norm=st.sampled_from([0, 1, 2]), omegas=st.sampled_from([None, "low", "neurbf"]),
       coord=st.sampled_from([torch.float32, torch.float64]), xlayout=st.sampled_from(LAYOUTS),
       wlayout=st.sampled_from(LAYOUTS), needs=st.integers(1, 31), seed=SEEDS)
def test_features_and_gradients_match_the_reference(poison, case, n, m, dim, k, C, kernel, full, norm, omegas, coord,
                                                    xlayout, wlayout, needs, seed):
    backend, _ = case
    gen = torch.Generator().manual_seed(seed)
    full = full and kernel != "nlin"
    c = _centers(m, dim, coord, "uniform", gen)
    x = _layout(torch.rand(n, dim, generator=gen, dtype=torch.float64).to(coord), xlayout)
    A = _shapes(m, dim, kernel, full, gen, coord)
    w = _layout(torch.randn(m, C, generator=gen, dtype=torch.float64).to(coord), wlayout)
    om = None if omegas is None else R.log_omegas(C, *((1.0, 8.0) if omegas == "low" else ()), dtype=coord)
    idx = R.knn_reference(x.contiguous(), c, k)[0]
    note(f"kernel {kernel} full {full} norm {norm} n {n} m {m} C {C} k {k}")
    out = ops.rbf_features_op(x, c, A, w, om, idx, kernel, norm, backend)
    ref = R.features_reference(x.double(), c.double(), A.double(), w.double(), None if om is None else om.double(),
                               idx, kernel, norm)
    # errors relative to the same sum of |terms| (a cancelling sum has no relative accuracy of its own)
    absref = R.features_reference(x.double(), c.double(), A.double(), w.double().abs(), None, idx, kernel, norm)
    wmax = 1.0 if om is None or not C else float(om.max())
    tol = 1e-12 * wmax if coord == torch.float64 else 2e-6 * wmax + 1e-6
    assert torch.isfinite(out).all()
    assert float((out.double() - ref).norm()) <= tol * max(float(absref.norm()), 1e-30) + 1e-30
    g = torch.randn(n, C, generator=gen, dtype=torch.float64).to(coord)
    res = ops.rbf_features_backward(g, x, c, A, w, om, idx, kernel, norm, needs, backend)
    flags = tuple(bool(needs & (1 << i)) for i in range(5))
    want = R.features_backward_reference(g.double(), x.double(), c.double(), A.double(), w.double(),
                                         None if om is None else om.double(), idx, kernel, norm, flags)
    # with the denominator differentiated the two terms of dphi cancel (exactly, for k = 1): measure the
    # error against the detached convention's gradient, which bounds both terms
    det = R.features_backward_reference(g.double(), x.double(), c.double(), A.double(), w.double(),
                                        None if om is None else om.double(), idx, kernel, 1, flags) if norm == 2 else want
    for name, r, e, e1 in zip(("dx", "dcenters", "dshapes", "dweights", "domegas"), res, want, det):
        if e is None:
            assert r.numel() == 0, name
            continue
        assert torch.isfinite(r).all(), name
        scale = float(e.abs().sum()) + float(e1.abs().sum())
        err = float((r.double() - e).abs().sum())
        # float32: a phase error omega * delta(phih) in every sine / cosine
        bound = (1e-11 * wmax if coord == torch.float64 else 4e-6 * wmax + 2e-5) * max(scale, 1e-30)
        assert err <= bound + 1e-30, f"{name}: |err| {err:.3e} > {bound:.3e}"


BAD_SHAPES = ["asym", "notpd", "nan", "neg_diag", "zero_scale"]


@pytest.mark.parametrize("case", FAST, ids=IDS)
@poisoned(max(N // 10, 20))
@given(bad=st.sampled_from(BAD_SHAPES), m=st.integers(1, 12), dim=st.sampled_from([2, 3]), seed=SEEDS)
def test_bad_shapes_raise(poison, case, bad, m, dim, seed):
    backend, _ = case
    gen = torch.Generator().manual_seed(seed)
    c = _centers(m, dim, torch.float32, "uniform", gen)
    x = torch.rand(5, dim, generator=gen)
    w = torch.randn(m, 4, generator=gen)
    i = int(torch.randint(0, m, (1,), generator=gen))
    kernel, A = "ivq", _shapes(m, dim, "ivq", True, gen, torch.float32)
    if bad == "asym":
        A[i, 0, 1] += 1e-3 * float(A[i].abs().max()) + 1e-3
    elif bad == "notpd":
        A[i] = -A[i]
    elif bad == "nan":
        A[i, -1, -1] = math.nan
    elif bad == "neg_diag":
        A = A.diagonal(dim1=1, dim2=2).contiguous()
        A[i, 0] = -1.0
    else:
        kernel, A = "nlin", _shapes(m, dim, "nlin", False, gen, torch.float32)
        A[i, -1] = 0.0
    with pytest.raises(ValueError, match=r"shapes|scales"):
        rbf_features(x, c, A, w, None, k=2, kernel=kernel, backend=backend)


BAD_ARGS = [
    ("x", torch.zeros(3, 4)), ("x", torch.zeros(3)), ("x", torch.zeros(3, 2, dtype=torch.int64)),
    ("x", [[0.0, 0.0]]), ("centers", torch.zeros(4, 3)), ("centers", torch.zeros(4, 2, dtype=torch.float16)),
    ("weights", torch.zeros(5, 4)), ("weights", torch.zeros(4)), ("omegas", torch.zeros(5)),
    ("omegas", torch.zeros(4, 1)), ("k", 0), ("k", 33), ("k", -1), ("k", 1.0), ("k", "4"), ("kernel", "IVQ"),
    ("kernel", None), ("normalize", 1), ("detach_denominator", None), ("idx", torch.zeros(3, 2)),
    ("idx", torch.full((3, 2), -2, dtype=torch.int64)), ("idx", torch.zeros(2, 2, dtype=torch.int64)),
    ("idx", torch.zeros(3, 40, dtype=torch.int64)), ("backend", "tpu"), ("backend", 3),
]


@pytest.mark.parametrize("case", FAST, ids=IDS)
@pytest.mark.parametrize("arg,value", BAD_ARGS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(BAD_ARGS)])
def test_bad_arguments_name_the_argument(case, arg, value):
    backend, _ = case
    kw = dict(x=torch.rand(3, 2), centers=torch.rand(4, 2), shapes=torch.ones(4, 2) * 10.0, weights=torch.randn(4, 4),
              omegas=torch.ones(4), k=2, kernel="ivq", normalize=True, detach_denominator=True, backend=backend)
    kw[arg] = value
    with pytest.raises((ValueError, TypeError)) as ei:
        rbf_features(**kw)
    assert arg in str(ei.value) or (arg == "kernel" and "kernel" in str(ei.value)), str(ei.value)
