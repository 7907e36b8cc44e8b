"""Triton rbf kernels (kernels/rbf.py) against the reference (python/kernelkit/rbf/reference.py): the grid
buffer's header and cells, the search bit for bit against brute force, the field forward / backward in
float64 against torch autograd and in float32 (float16 / bfloat16 weights) against the float64 reference.

Without a CUDA GPU the kernels run under the Triton interpreter: TRITON_INTERPRET=1 must be set before
triton is first imported (tests/conftest.py does it; when this file runs alone it sets it itself unless
triton was already imported without it, in which case the module is skipped).  The interpreter is slow
(about 1 ms per op, and the search loop runs once per centre or cell visited), so problems are tiny:
N <= 40, M <= 30, C <= 9.
"""
from __future__ import annotations

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from triton_family import CUDA as _CUDA, load  # noqa: E402

kr, R = load("rbf")
from helpers import rel_err  # noqa: E402

DEVICE = "cuda" if _CUDA else "cpu"
KERNELS = R.KERNELS


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, dtype, seed, lo=0.0, hi=1.0):
    return (lo + (hi - lo) * torch.rand(*shape, generator=_gen(seed), dtype=torch.float64)).to(dtype).to(DEVICE)


def _centers(m, dim, dtype, seed):
    """Uniform centres plus a tight cluster and exact duplicates (distance ties)."""
    c = _rand(m, dim, dtype=dtype, seed=seed)
    if m >= 10:
        c[: m // 3] = 0.3 + 0.02 * c[: m // 3]
        c[m - 3:] = c[1:4]
    return c


def _queries(n, dim, dtype, seed):
    """Queries over a box larger than the centres' (some outside), one NaN row and one inf row."""
    x = _rand(n, dim, dtype=dtype, seed=seed, lo=-0.4, hi=1.4)
    if n >= 8:
        x[5, 1] = float("nan")
        x[7, 0] = float("inf")
    return x


def _shapes(m, dim, full, kernel, dtype, seed):
    g = _gen(seed)
    if full:
        L = 0.7 * torch.randn(m, dim, dim, generator=g, dtype=torch.float64)
        s = L @ L.transpose(1, 2) + 1.5 * torch.eye(dim, dtype=torch.float64)
    elif kernel == "nlin":
        s = 1.0 + 3.0 * torch.rand(m, dim, generator=g, dtype=torch.float64)   # hats ~ 0.25 .. 1 wide
    else:
        s = 2.0 + 20.0 * torch.rand(m, dim, generator=g, dtype=torch.float64)
    return s.to(dtype).to(DEVICE).contiguous()


# ---- grid -----------------------------------------------------------------------------------------------
def _check_grid(centers):
    m, dim = centers.shape
    g = kr.rbf_grid_build(centers)
    want = R.grid_build_reference(centers.cpu())
    assert g.dtype == torch.uint8 and g.numel() == want.numel()
    assert R.grid_header(g) == R.grid_header(want)
    cm, cs_off, order_off, coords_off, _ = R.grid_layout(centers.dtype, dim, m)
    g, want = g.cpu(), want.cpu()
    assert torch.equal(g[:order_off], want[:order_off]), "header / geometry / cell_start differ"
    order = g[order_off:coords_off].view(torch.int64)
    order_ref = want[order_off:coords_off].view(torch.int64)
    cs = want[cs_off:order_off].view(torch.int64)
    for c in range(R.grid_header(want)["ncells"]):   # same centres per cell (the order inside may differ)
        a, b = int(cs[c]), int(cs[c + 1])
        assert torch.equal(order[a:b].sort().values, order_ref[a:b].sort().values), f"cell {c}"
    if m and not R.grid_header(want)["flags"]:
        coords = g[coords_off:coords_off + m * dim * centers.element_size()].view(centers.dtype).view(m, dim)
        assert torch.equal(coords, centers.cpu()[order]), "coordinates not in sorted order"
    return g


@pytest.mark.parametrize("dtype, dim, m", [(torch.float32, 2, 30), (torch.float64, 3, 29), (torch.float32, 3, 1)],
                         ids=str)
def test_rbf_grid_build_matches_reference(dtype, dim, m):
    """Header (dim, m, ncells, res, dtype, cells_max, flags, lo, cell), cell_start bit for bit, the same
    centres in every cell, and the coordinates copied in sorted order."""
    _check_grid(_centers(m, dim, dtype, seed=m))


def test_rbf_grid_build_degenerate_inputs():
    """M = 0; all centres on a line (a zero extent gets one cell); a NaN centre sets flag 1 (and every
    search on that grid returns -1 / NaN)."""
    _check_grid(torch.empty(0, 2, dtype=torch.float32, device=DEVICE))
    line = _rand(12, 3, dtype=torch.float64, seed=3)
    line[:, 1] = 0.25
    _check_grid(line)
    bad = _rand(8, 2, dtype=torch.float32, seed=4)
    bad[2, 0] = float("nan")
    g = _check_grid(bad)
    assert R.grid_header(g)["flags"] == 1
    idx, d2 = kr.rbf_knn(_rand(3, 2, dtype=torch.float32, seed=5), g.to(DEVICE), 8, 2)
    assert (idx == -1).all() and torch.isnan(d2).all()


# ---- knn ------------------------------------------------------------------------------------------------
def _check_knn(x, centers, k):
    g = kr.rbf_grid_build(centers)
    idx, d2 = kr.rbf_knn(x, g, centers.shape[0], k)
    ir, dr = R.knn_reference(x.cpu(), centers.cpu(), k)
    assert idx.dtype == torch.int64 and d2.dtype == x.dtype and idx.shape == d2.shape == (x.shape[0], k)
    assert torch.equal(idx.cpu(), ir), f"indices differ:\n{idx.cpu()}\n{ir}"
    same = (d2.cpu() == dr) | (torch.isnan(d2.cpu()) & torch.isnan(dr))
    assert same.all(), "dist2 not bit-equal to brute force"


@pytest.mark.parametrize("dtype, dim, n, m, k", [(torch.float32, 2, 40, 30, 5), (torch.float64, 3, 24, 20, 4),
                                                 (torch.float32, 3, 12, 6, 9), (torch.float64, 2, 67, 18, 17)],
                         ids=str)
def test_rbf_knn_equals_brute_force(dtype, dim, n, m, k):
    """Bit-equal to reference.knn_reference: clustered and duplicated centres (ties go to the smaller
    index), queries outside the box, NaN / inf query rows (-1 / NaN), and k > M (-1 / +inf padding);
    KP = 8, 16 and 32, and (the last case) more queries than one program's tile."""
    _check_knn(_queries(n, dim, dtype, seed=10 + n), _centers(m, dim, dtype, seed=m), k)


def test_rbf_knn_empty_sizes():
    c = _centers(10, 2, torch.float32, seed=1)
    g = kr.rbf_grid_build(c)
    idx, d2 = kr.rbf_knn(torch.empty(0, 2, device=DEVICE), g, 10, 3)
    assert idx.shape == d2.shape == (0, 3)
    _check_knn(_queries(9, 2, torch.float32, seed=2), torch.empty(0, 2, device=DEVICE), 2)   # M = 0


# ---- features ---------------------------------------------------------------------------------------------
# (kernel, full shapes, normalize, dim, omegas): every kernel, shape form and normalization at least once
FEATURE_CASES = [("ivq", True, 1, 2, True), ("ivq", False, 0, 3, False), ("gauss", True, 2, 3, True),
                 ("gauss", False, 1, 2, False), ("nlin", False, 2, 2, True), ("nlin", False, 0, 3, True)]
# float32 coordinates: the rounding of t = omega phih (|t| 2^-24) and of phih is amplified by omega
TOL32 = 2e-6


def _problem(case, cdt, wdt, seed, n=20, m=16, C=9, k=4, omax=64.0):
    kernel, full, norm, dim, with_om = case
    x = _queries(n, dim, cdt, seed)
    c = _centers(m, dim, cdt, seed + 1)
    s = _shapes(m, dim, full, kernel, cdt, seed + 2)
    w = (torch.randn(m, C, generator=_gen(seed + 3), dtype=torch.float64)).to(wdt).to(DEVICE)
    om = R.log_omegas(C, 0.5, omax, dtype=cdt).to(DEVICE) if with_om else None
    idx, _ = R.knn_reference(x.cpu(), c.cpu(), k)
    idx[0, 1] = -1                          # a missing neighbour in a finite row
    return x, c, s, w, om, idx.to(DEVICE)


def _ref64(*a):
    return tuple(t.double() if t is not None and t.is_floating_point() else t for t in a)


@pytest.mark.parametrize("case", FEATURE_CASES, ids=lambda c: f"{c[0]}-{'full' if c[1] else 'diag'}-n{c[2]}-d{c[3]}"
                         f"{'-om' if c[4] else ''}")
def test_rbf_features_fwd_bwd_float64_match_autograd(poison, case):
    """out and all five gradients against torch autograd on the reference in float64 (1e-12); NaN rows
    give NaN features and no gradient."""
    kernel, _, norm, _, _ = case
    x, c, s, w, om, idx = _problem(case, torch.float64, torch.float64, seed=30)
    out = kr.rbf_features_fwd(x, c, s, w, om, idx, KERNELS[kernel], norm)
    ref = R.features_reference(x, c, s, w, om, idx, kernel, norm)
    bad = ~torch.isfinite(x).all(1)
    assert torch.isnan(out[bad]).all()
    assert rel_err(out[~bad], ref[~bad]) <= 1e-12
    g = torch.randn(out.shape, generator=_gen(31), dtype=torch.float64).to(DEVICE)
    # the reference's gradients of a non-finite row are autograd artifacts (0 * NaN through the gather of
    # the clamped index of a missing neighbour reaches centre 0): compared on the finite rows, and the
    # kernels' non-finite rows must add nothing (dx NaN)
    ok = ~bad
    got = kr.rbf_features_bwd(g, x, c, s, w, om, idx, KERNELS[kernel], norm, (True,) * 5)
    got_ok = kr.rbf_features_bwd(g[ok], x[ok], c, s, w, om, idx[ok], KERNELS[kernel], norm, (True,) * 5)
    want = R.features_backward_reference(g[ok], x[ok], c, s, w, om, idx[ok], kernel, norm)
    assert torch.isnan(got[0][bad]).all()
    for name, a, a_ok, b in zip(("dx", "dcenters", "dshapes", "dweights", "domegas"), got, got_ok, want):
        if b is None:
            assert a is None, name
            continue
        if name == "dx":
            a = a[ok]
        assert a.dtype == torch.float64 and a.shape == b.shape, name
        assert rel_err(a, b) <= 1e-12, f"{name}: {rel_err(a, b):.2e}"
        assert rel_err(a, a_ok) <= 1e-14, f"{name}: the non-finite rows contributed"


def test_rbf_features_float64_large_k_several_programs(poison):
    """k = 17 (the backward's KP = 32 tile) with more queries than one backward program takes: out and all
    five gradients against autograd in float64 (1e-12)."""
    case = ("gauss", False, 2, 3, True)
    n = kr._bwd_cfg(torch.float64, torch.float64, 32)[0] + 5
    x, c, s, w, om, idx = _problem(case, torch.float64, torch.float64, seed=60, n=n, m=18, C=3, k=17)
    ok = torch.isfinite(x).all(1)
    x, idx = x[ok], idx[ok]
    out = kr.rbf_features_fwd(x, c, s, w, om, idx, KERNELS["gauss"], 2)
    assert rel_err(out, R.features_reference(x, c, s, w, om, idx, "gauss", 2)) <= 1e-12
    g = torch.randn(out.shape, generator=_gen(61), dtype=torch.float64).to(DEVICE)
    got = kr.rbf_features_bwd(g, x, c, s, w, om, idx, KERNELS["gauss"], 2, (True,) * 5)
    want = R.features_backward_reference(g, x, c, s, w, om, idx, "gauss", 2)
    for name, a, b in zip(("dx", "dcenters", "dshapes", "dweights", "domegas"), got, want):
        assert rel_err(a, b) <= 1e-12, f"{name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("wdt", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_rbf_features_float32_with_large_omegas(poison, wdt):
    """float32 coordinates with NeuRBF's image frequencies (up to 4096) against the float64 reference on
    the same rounded inputs: the error scales with max |omega| (TOL32 x 4096 for float32 weights, plus the
    output rounding for float16 / bfloat16); dweights (float32) and domegas / dx from the backward."""
    case = ("ivq", True, 1, 2, True)
    x, c, s, w, om, idx = _problem(case, torch.float32, wdt, seed=40, omax=4096.0)
    omax = float(om.abs().max())
    out = kr.rbf_features_fwd(x, c, s, w, om, idx, 0, 1)
    assert out.dtype == wdt
    ref = R.features_reference(*_ref64(x, c, s, w, om), idx, "ivq", 1)
    bad = ~torch.isfinite(x).all(1)
    assert torch.isnan(out[bad].float()).all()
    tol = TOL32 * omax + (0 if wdt == torch.float32 else {torch.float16: 1e-3, torch.bfloat16: 8e-3}[wdt])
    assert rel_err(out[~bad], ref[~bad]) <= tol, rel_err(out[~bad], ref[~bad])
    g = torch.randn(out.shape, generator=_gen(41), dtype=torch.float64).to(wdt).to(DEVICE)
    got = kr.rbf_features_bwd(g, x, c, s, w, om, idx, 0, 1, (True, False, False, True, True))
    want = R.features_backward_reference(*_ref64(g, x, c, s, w, om), idx, "ivq", 1, (True, False, False, True, True))
    assert got[1] is None and got[2] is None
    for name, a, b, scale in (("dx", got[0], want[0], omax), ("dweights", got[3], want[3], omax),
                              ("domegas", got[4], want[4], omax)):
        assert a.dtype == torch.float32, name
        if name == "dx":
            a, b = a[~bad], b[~bad]
        assert rel_err(a, b) <= TOL32 * scale * 4, f"{name}: {rel_err(a, b):.2e}"


def test_rbf_features_empty_sizes_and_needs():
    """N = 0, C = 0, k > M with every slot missing (zeros); gradients not asked for are None."""
    case = ("gauss", False, 1, 2, True)
    x, c, s, w, om, idx = _problem(case, torch.float64, torch.float64, seed=50, n=10, C=3)
    assert kr.rbf_features_fwd(x[:0], c, s, w, om, idx[:0], 1, 1).shape == (0, 3)
    assert kr.rbf_features_fwd(x, c, s, w[:, :0], om[:0], idx, 1, 1).shape == (10, 0)
    none = torch.full_like(idx, -1)
    out = kr.rbf_features_fwd(x, c, s, w, om, none, 1, 1)
    bad = ~torch.isfinite(x).all(1)
    assert torch.equal(out[~bad], torch.zeros_like(out[~bad]))
    g = torch.ones(10, 3, dtype=torch.float64, device=DEVICE)
    res = kr.rbf_features_bwd(g, x, c, s, w, None, idx, 1, 1, (False, False, False, True, True))
    assert res[0] is None and res[1] is None and res[2] is None and res[4] is None
    want = R.features_backward_reference(g, x, c, s, w, None, idx, "gauss", 1, (False, False, False, True, False))
    assert rel_err(res[3], want[3]) <= 1e-12
    dx = kr.rbf_features_bwd(g[:0], x[:0], c, s, w, om, idx[:0], 1, 1, (True,) * 5)
    assert dx[0].shape == (0, 2) and torch.equal(dx[3], torch.zeros_like(dx[3]))


# ---- ahead-of-time sweep ----------------------------------------------------------------------------
_KERNEL_NAMES = ("_bbox_kernel", "_cellid_kernel", "_scatter_kernel", "_knn_kernel", "_fwd_kernel", "_bwd_kernel")


def test_rbf_aot_sweep_reaches_every_kernel_and_dtype(monkeypatch):
    """tests/triton_aot.py compiles what aot_sweep() launches: every kernel, both coordinate dtypes, every
    (coordinate, weights) dtype pair of the features, every KP of the search and the backward, the
    search without FMA; meta tensors, a non-empty 1-D grid; at most 30 distinct variants."""
    launches = []
    for name in _KERNEL_NAMES:
        kernel = getattr(kr, name)

        def record(*args, grid, warmup, _name=name, _kernel=kernel, **kwargs):
            bound = dict(zip(_kernel.arg_names, args))
            bound.update(kwargs)
            launches.append((_name, bound, grid))
        monkeypatch.setattr(kernel, "run", record)
    monkeypatch.setattr(kr, "_INTERPRET", False)
    assert kr.aot_sweep() > 0
    by = {}
    for name, a, grid in launches:
        by.setdefault(name, []).append(a)
        assert len(grid) == 1 and 0 < grid[0] <= 2 ** 31 - 1, name
        assert all(v.device.type == "meta" for v in a.values() if isinstance(v, torch.Tensor)), name
    assert set(by) == set(_KERNEL_NAMES)
    for name in ("_bbox_kernel", "_cellid_kernel", "_scatter_kernel", "_knn_kernel"):
        assert {a["c_ptr" if name != "_knn_kernel" else "x_ptr"].dtype for a in by[name]} == \
            {torch.float32, torch.float64}, name
    assert {(a["x_ptr"].dtype, a["KP"]) for a in by["_knn_kernel"]} == \
        {(dt, kp) for dt in (torch.float32, torch.float64) for kp in (4, 8, 16, 32)}
    assert all(a["enable_fp_fusion"] is False for a in by["_knn_kernel"])
    for name, kps in (("_fwd_kernel", None), ("_bwd_kernel", {8, 32})):
        pairs = {(a["x_ptr"].dtype, a["w_ptr"].dtype) for a in by[name]}
        assert pairs == set(kr.AOT_DTYPES), name
        if kps:
            assert {a["KP"] for a in by[name]} == kps
    variants = set()
    for name, a, _ in launches:
        variants.add((name,) + tuple(sorted((k, repr(v.dtype) if isinstance(v, torch.Tensor) else repr(v))
                                            for k, v in a.items()
                                            if k.isupper() or k in ("num_warps", "num_stages")
                                            or isinstance(v, torch.Tensor))))
    assert len(variants) <= 30, len(variants)
