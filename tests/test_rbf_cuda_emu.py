"""The rbf family's CUDA kernels (csrc/cuda/rbf.cu) under the CUDA host emulation (tests/cuda_emu): every
kk_rbf_*_cuda entry point of csrc/include/kernelkit/rbf.h against python/kernelkit/rbf/reference.py, with
float32 / float64 coordinates and float32 / float16 / bfloat16 weights, outputs NaN-poisoned.  No GPU needed.

The launch plan: the grid build is bbox, geom, cellid, three scan kernels (tiles of 2048 counters; the
tests shrink the tile to 32 through KKEMU_RBF_SCAN_THREADS to reach several tiles) and scatter; knn is
rbf_knn_kernel<T, dim, K> with K = 4 / 8 / 16 / 32 the smallest >= k; the features kernels take a group
of G = clamp(next_pow2(C), 4, 32) lanes per query (C = 3, 5, 9, 40: G = 4, 8, 16, 32, and C = 40 > G
loops over channel chunks).  The reference module is loaded from its file: no kernelkit build needed.
"""
from __future__ import annotations

import ctypes
import importlib.util
import re
from pathlib import Path

import pytest
import torch

from cuda_emu import load
from helpers import assert_close

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("rbf_reference", ROOT / "python" / "kernelkit" / "rbf" / "reference.py")
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)

KK = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
I64, I32, PTR = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
OK, NULL_POINTER, INVALID_SIZE, INVALID_ARGUMENT, UNSUPPORTED_DTYPE = 0, 1, 2, 3, 4
NAN = float("nan")
NORM_NONE, NORM_DET, NORM_FULL = 0, 1, 2
# (coordinate dtype, weight dtype)
DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.float16), (torch.float32, torch.bfloat16),
          (torch.float64, torch.float64)]
DTYPE_IDS = ["f32", "f32-f16", "f32-bf16", "f64"]


@pytest.fixture(scope="module")
def emu():
    e = load()
    L = e.lib
    L.kk_rbf_grid_build_cuda_workspace_size.argtypes = [ctypes.c_int, I32, I64, ctypes.POINTER(I64)]
    L.kk_rbf_grid_build_cuda.argtypes = [ctypes.c_int, I32, I64, PTR, I64, PTR, I64, PTR, I64, PTR]
    L.kk_rbf_knn_cuda.argtypes = [ctypes.c_int, I32, I64, PTR, I64, PTR, I32, PTR, PTR, PTR]
    feat = [ctypes.c_int, ctypes.c_int, I32, I32, I32, I64, PTR, I64, I64, PTR, PTR, PTR, I64, I64, PTR, I32, PTR, I32]
    L.kk_rbf_features_fwd_cuda.argtypes = feat + [PTR, I64, PTR]
    L.kk_rbf_features_bwd_cuda.argtypes = feat + [PTR, I64, PTR, PTR, PTR, PTR, PTR, PTR]
    e.set_device("h100")
    yield e
    e.set_schedule("forward")


def _p(t):
    return PTR(0 if t is None else t.data_ptr())


def _aligned(nbytes, align=16):
    raw = torch.zeros(max(nbytes, 1) + align, dtype=torch.uint8)
    off = (-raw.data_ptr()) % align
    return raw[off:off + nbytes]


# ---- calls ---------------------------------------------------------------------------------------------
def build(emu, centers, poison=True):
    """The grid buffer (uint8 tensor) built by kk_rbf_grid_build_cuda; centers may be a row-strided view."""
    m, dim = centers.shape
    total = R.grid_layout(centers.dtype, dim, m)[4]
    grid = _aligned(total)
    if poison:
        grid.fill_(0xFF)
    nb = I64(-1)
    assert emu.lib.kk_rbf_grid_build_cuda_workspace_size(KK[centers.dtype], dim, m, ctypes.byref(nb)) == OK
    ws = _aligned(nb.value)
    ws.fill_(0xAB)
    st = emu.lib.kk_rbf_grid_build_cuda(KK[centers.dtype], dim, m, _p(centers), centers.stride(0) if m else dim,
                                        _p(grid), total, _p(ws), nb.value, None)
    assert st == OK, emu.last_error()
    return grid


def knn(emu, x, grid, k):
    n, dim = x.shape
    idx = torch.full((n, k), -7, dtype=torch.int64)
    d2 = torch.full((n, k), NAN, dtype=x.dtype)
    st = emu.lib.kk_rbf_knn_cuda(KK[x.dtype], dim, n, _p(x), x.stride(0) if n else dim, _p(grid), k, _p(idx), _p(d2),
                                 None)
    assert st == OK, emu.last_error()
    return idx, d2


def fwd(emu, x, centers, shapes, weights, omegas, idx, kernel, norm, ldo_pad=0):
    n, dim = x.shape
    m, C = weights.shape
    k = idx.shape[1]
    out = torch.full((n, C + ldo_pad), NAN, dtype=weights.dtype)
    st = emu.lib.kk_rbf_features_fwd_cuda(
        KK[x.dtype], KK[weights.dtype], dim, R.KERNELS[kernel], int(shapes.dim() == 3), n, _p(x), x.stride(0), m,
        _p(centers), _p(shapes), _p(weights), weights.stride(0), C, _p(omegas), k, _p(idx), norm, _p(out),
        out.stride(0), None)
    assert st == OK, emu.last_error()
    return out[:, :C]


def bwd(emu, g, x, centers, shapes, weights, omegas, idx, kernel, norm, needs=(True,) * 5):
    n, dim = x.shape
    m, C = weights.shape
    dt = x.dtype
    outs = [torch.full(s, NAN, dtype=dt) if need else None
            for s, need in zip([x.shape, centers.shape, shapes.shape, (m, C), (C,)], needs)]
    if omegas is None:
        outs[4] = None
    st = emu.lib.kk_rbf_features_bwd_cuda(
        KK[dt], KK[weights.dtype], dim, R.KERNELS[kernel], int(shapes.dim() == 3), n, _p(x), x.stride(0), m,
        _p(centers), _p(shapes), _p(weights), weights.stride(0), C, _p(omegas), idx.shape[1], _p(idx), norm, _p(g),
        g.stride(0), *[_p(t) for t in outs], None)
    assert st == OK, emu.last_error()
    return outs


# ---- data ----------------------------------------------------------------------------------------------
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _points(n, dim, dtype, seed, kind="uniform", pad=0):
    g = _gen(seed)
    if kind == "uniform":
        p = torch.rand(n, dim + pad, generator=g, dtype=torch.float64)
    elif kind == "clustered":  # a few tight clusters, far apart
        c = torch.rand(3, dim + pad, generator=g, dtype=torch.float64) * 10
        p = c[torch.randint(0, 3, (n,), generator=g)] + 0.01 * torch.randn(n, dim + pad, generator=g, dtype=torch.float64)
    elif kind == "lattice":  # integer lattice: many equal distances (ties by index)
        p = torch.randint(0, 4, (n, dim + pad), generator=g).double()
    else:
        raise ValueError(kind)
    return p.to(dtype)[:, :dim]


def _field(dim, m, C, kernel, full, dtype, wdtype, seed):
    """centers (M, D) in [0, 1], shapes (full SPD, diagonal or nlin scales), weights, for queries in [0, 1]."""
    g = _gen(seed)
    centers = torch.rand(m, dim, generator=g, dtype=torch.float64)
    if kernel == "nlin":
        shapes = 1.5 + 2.0 * torch.rand(m, dim, generator=g, dtype=torch.float64)
    elif full:
        B = torch.randn(m, dim, dim, generator=g, dtype=torch.float64)
        shapes = 8.0 * (B @ B.transpose(1, 2) / dim + 0.5 * torch.eye(dim, dtype=torch.float64))
    else:
        shapes = 4.0 + 12.0 * torch.rand(m, dim, generator=g, dtype=torch.float64)
    w = torch.randn(m, C + 3, generator=g).to(wdtype)[:, :C]  # padded rows: ldw > C
    return centers.to(dtype), shapes.to(dtype).contiguous(), w


def _idx(x, centers, k, m):
    idx, _ = R.knn_reference(x.double(), centers.double(), k)
    idx[1, -1] = -1  # a missing neighbour among real ones
    return idx.contiguous()


# ---- grid ----------------------------------------------------------------------------------------------
def _check_grid(grid, centers):
    m, dim = centers.shape
    want = R.grid_build_reference(centers)
    cm, cs_off, order_off, coords_off, total = R.grid_layout(centers.dtype, dim, m)
    assert torch.equal(grid[:256], want[:256]), (R.grid_header(grid), R.grid_header(want))
    assert torch.equal(grid[cs_off:order_off], want[cs_off:order_off]), "cell_start"
    order = grid[order_off:coords_off].view(torch.int64)
    worder = want[order_off:coords_off].view(torch.int64)
    cs = want[cs_off:order_off].view(torch.int64)
    h = R.grid_header(want)
    if h["flags"]:
        assert (order == 0).all()
        return
    for c in range(h["ncells"]):  # the order inside a cell is unspecified: compare as sets
        a, b = int(cs[c]), int(cs[c + 1])
        assert torch.equal(order[a:b].sort().values, worder[a:b]), f"cell {c}"
    coords = grid[coords_off:coords_off + centers.element_size() * m * dim].view(centers.dtype).reshape(m, dim)
    assert torch.equal(coords, centers[order]), "coords are not the centres in sorted order"


GRID_CASES = [  # (id, m, dim, kind)
    ("empty", 0, 2, "uniform"), ("one", 1, 3, "uniform"), ("uniform-2d", 50, 2, "uniform"),
    ("clustered-3d", 47, 3, "clustered"), ("lattice-3d", 40, 3, "lattice"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", GRID_CASES, ids=[c[0] for c in GRID_CASES])
def test_grid_build_matches_reference(emu, dtype, case):
    _, m, dim, kind = case
    centers = _points(m, dim, dtype, 1 + m, kind, pad=2)  # ldc = dim + 2
    _check_grid(build(emu, centers), centers.contiguous())


def test_grid_geometry_is_the_references_bit_for_bit(emu):
    """Random boxes of one, two and three positive extents over 12 orders of magnitude: the cell edge
    (through the correctly rounded root of the kernel, not pow) and the resolutions equal grid_geometry's."""
    g = _gen(7)
    for t in range(24):
        dim = 2 + t % 2
        m = int(torch.randint(2, 40, (1,), generator=g))
        scale = torch.pow(10.0, torch.empty(dim).uniform_(-6, 6, generator=g)).double()
        c = (torch.rand(m, dim, generator=g, dtype=torch.float64) - 0.3) * scale
        if t % 5 == 0:
            c[:, 0] = 1.25  # a zero extent
        for dt in (torch.float32, torch.float64):
            cd = c.to(dt)
            grid = build(emu, cd)
            assert torch.equal(grid[:256], R.grid_build_reference(cd)[:256]), (t, dt, R.grid_header(grid))


def test_grid_scan_over_several_tiles(emu, monkeypatch):
    """Scan tiles of 32 counters (KKEMU_RBF_SCAN_THREADS): m = 230 has 116 counters, 4 tiles."""
    monkeypatch.setenv("KKEMU_RBF_SCAN_THREADS", "32")
    centers = _points(230, 2, torch.float32, 3, "clustered")
    emu.clear_launches()
    grid = build(emu, centers)
    (la,) = [la for la in emu.launches() if "rbf_scan_apply_kernel" in la["name"]]
    assert la["grid"][0] == 4 and la["block"][0] == 32
    _check_grid(grid, centers)
    x = _points(30, 2, torch.float32, 4, "clustered")
    idx, d2 = knn(emu, x, grid, 6)
    wi, wd = R.knn_reference(x, centers, 6)
    assert torch.equal(idx, wi) and torch.equal(d2, wd)


@pytest.mark.parametrize("bad", [NAN, float("inf")])
def test_non_finite_centre_flags_the_grid_and_every_query_misses(emu, bad):
    centers = _points(20, 3, torch.float32, 5)
    centers[7, 1] = bad
    grid = build(emu, centers)
    _check_grid(grid, centers)
    assert R.grid_header(grid)["flags"] == 1
    idx, d2 = knn(emu, _points(9, 3, torch.float32, 6), grid, 4)
    assert (idx == -1).all() and torch.isnan(d2).all()


# ---- knn -----------------------------------------------------------------------------------------------
KNN_CASES = [  # (id, m, n, dim, k, centres kind, queries kind / outside)
    ("uniform-2d-k1", 50, 37, 2, 1, "uniform", "uniform"),
    ("uniform-3d-k5", 50, 37, 3, 5, "uniform", "outside"),
    ("clustered-2d-k8", 45, 30, 2, 8, "clustered", "clustered"),
    ("lattice-ties-3d-k9", 40, 25, 3, 9, "lattice", "lattice"),
    ("lattice-ties-2d-k17", 30, 21, 2, 17, "lattice", "lattice"),
    ("k-gt-m-3d-k32", 19, 13, 3, 32, "uniform", "outside"),
    ("k-gt-m-2d-k32", 25, 11, 2, 32, "clustered", "uniform"),
]


def _queries(n, dim, dtype, kind, seed):
    if kind == "outside":  # queries far outside the centres' bounding box on some sides
        return (_points(n, dim, torch.float64, seed) * 5 - 2).to(dtype)
    return _points(n, dim, dtype, seed, kind, pad=1)  # ldx = dim + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", KNN_CASES, ids=[c[0] for c in KNN_CASES])
def test_knn_equals_brute_force(emu, dtype, case):
    _, m, n, dim, k, ckind, qkind = case
    centers = _points(m, dim, dtype, 10 + m, ckind)
    x = _queries(n, dim, dtype, qkind, 20 + n)
    x[min(3, n - 1), dim - 1] = NAN  # a non-finite query
    idx, d2 = knn(emu, x, build(emu, centers), k)
    wi, wd = R.knn_reference(x, centers, k)
    assert torch.equal(idx, wi), (idx != wi).nonzero()[:5]
    assert torch.equal(d2.nan_to_num(-1.0), wd.nan_to_num(-1.0))


# ---- features ------------------------------------------------------------------------------------------
FEAT_CASES = [  # (id, dim, kernel, full, norm, omegas, C, k)
    ("ivq-full-2d-det-sin-C9", 2, "ivq", True, NORM_DET, True, 9, 4),
    ("gauss-full-3d-full-sin-C3", 3, "gauss", True, NORM_FULL, True, 3, 6),
    ("ivq-diag-3d-none-lin-C40", 3, "ivq", False, NORM_NONE, False, 40, 5),
    ("nlin-2d-det-sin-C5", 2, "nlin", False, NORM_DET, True, 5, 9),
    ("nlin-3d-full-lin-C33", 3, "nlin", False, NORM_FULL, False, 33, 3),
    ("gauss-diag-2d-none-sin-C4", 2, "gauss", False, NORM_NONE, True, 4, 2),
]


def _feat_inputs(case, dtype, wdtype, n=37, m=41, seed=0):
    _, dim, kernel, full, norm, use_om, C, k = case
    centers, shapes, w = _field(dim, m, C, kernel, full, dtype, wdtype, 30 + seed)
    x = _points(n, dim, dtype, 31 + seed, pad=2)
    om = R.log_omegas(C, 2.0 ** -3, 2.0 ** (4 if dtype == torch.float32 else 12), dtype) if use_om else None
    idx = _idx(x, centers, k, m)
    return x, centers, shapes, w, om, idx


def _d(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("dt", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", FEAT_CASES, ids=[c[0] for c in FEAT_CASES])
def test_features_fwd_and_bwd_match_reference(emu, dt, case):
    dtype, wdtype = dt
    kernel, norm = case[2], case[4]
    x, centers, shapes, w, om, idx = _feat_inputs(case, dtype, wdtype)
    want = R.features_reference(_d(x), _d(centers), _d(shapes), w.double(), _d(om), idx, kernel, norm)
    out = fwd(emu, x, centers, shapes, w, om, idx, kernel, norm, ldo_pad=1)
    assert_close(out, want, wdtype if wdtype != torch.float32 else dtype, "out")
    g = torch.randn(x.shape[0], w.shape[1] + 2, generator=_gen(40)).to(wdtype)[:, :w.shape[1]]
    got = bwd(emu, g, x, centers, shapes, w, om, idx, kernel, norm)
    ref = R.features_backward_reference(g.double(), _d(x), _d(centers), _d(shapes), w.double(), _d(om), idx, kernel,
                                        norm)
    for name, a, b in zip(("dx", "dcenters", "dshapes", "dweights", "domegas"), got, ref):
        if b is None:
            assert a is None
            continue
        assert_close(a, b, dtype, name)


def test_features_missing_and_out_of_range_neighbours_contribute_nothing(emu):
    """idx -1 and idx outside [0, m) (not checked on the device) are missing neighbours; a query with a
    non-finite coordinate gets a NaN row, and in the backward a NaN dx row and no other contribution."""
    case = FEAT_CASES[0]
    x, centers, shapes, w, om, idx = _feat_inputs(case, torch.float64, torch.float64)
    m = centers.shape[0]
    idx_bad = idx.clone()
    idx_bad[2, 0], idx_bad[5, 1], idx_bad[6, :] = m, -5, m + 9
    idx_ref = idx_bad.clone()
    idx_ref[(idx_ref < 0) | (idx_ref >= m)] = -1
    out = fwd(emu, x, centers, shapes, w, om, idx_bad, "ivq", NORM_DET)
    assert_close(out, R.features_reference(x, centers, shapes, w, om, idx_ref, "ivq", NORM_DET), torch.float64, "out")
    assert (out[6] == 0).all()
    xb = x.clone()
    xb[4, 1] = NAN
    out = fwd(emu, xb, centers, shapes, w, om, idx, "ivq", NORM_DET)
    assert torch.isnan(out[4]).all() and torch.isfinite(out[torch.arange(len(x)) != 4]).all()
    g = torch.randn(x.shape[0], w.shape[1], generator=_gen(3), dtype=torch.float64)
    keep = torch.arange(len(x)) != 4
    got = bwd(emu, g, xb, centers, shapes, w, om, idx, "ivq", NORM_DET)
    ref = R.features_backward_reference(g[keep], x[keep], centers, shapes, w, om, idx[keep], "ivq", NORM_DET)
    assert torch.isnan(got[0][4]).all()
    assert_close(got[0][keep], ref[0], torch.float64, "dx")
    for name, a, b in zip(("dcenters", "dshapes", "dweights", "domegas"), got[1:], ref[1:]):
        assert_close(a, b, torch.float64, name)


def test_features_bwd_computes_only_the_requested_gradients(emu):
    case = FEAT_CASES[1]
    x, centers, shapes, w, om, idx = _feat_inputs(case, torch.float32, torch.float32)
    g = torch.randn(x.shape[0], w.shape[1], generator=_gen(4))
    for needs in ((False, False, False, True, False), (True, False, False, False, True), (False,) * 5):
        got = bwd(emu, g, x, centers, shapes, w, om, idx, "gauss", NORM_FULL, needs)
        ref = R.features_backward_reference(g.double(), x.double(), centers.double(), shapes.double(), w.double(),
                                            om.double(), idx, "gauss", NORM_FULL, needs)
        for a, b in zip(got, ref):
            assert (a is None) == (b is None)
            if a is not None:
                assert_close(a, b, torch.float32, str(needs))


def test_sine_is_accurate_to_2e21_up_to_2e17(emu):
    """k = 1 with the query on the centre: phi = 1 and phih = 1 / (1 + 1e-8) = 1 exactly in float32, so
    out_j = w_j sin(omega_j): the header's bound |sin_kk(t) - sin(t)| <= 2^-21 for |t| <= 2^17."""
    C = 40
    om = torch.cat([torch.tensor([2.0 ** 17, -2.0 ** 17, 4096.0, 3.0e4]),
                    torch.empty(C - 4).uniform_(-2.0 ** 17, 2.0 ** 17, generator=_gen(5))]).float()
    centers = torch.rand(3, 2, generator=_gen(6))
    x = centers[[1, 2]].clone()
    idx = torch.tensor([[1], [2]])
    shapes = torch.full((3, 2), 5.0)
    w = torch.ones(3, C)
    out = fwd(emu, x, centers, shapes, w, om, idx, "ivq", NORM_DET)
    want = torch.sin(om.double()).expand(2, C)
    assert (out.double() - want).abs().max().item() <= 2.0 ** -21


# ---- thread order, plan coverage -------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["reverse", "shuffle"])
def test_emulated_cuda_is_independent_of_thread_order(emu, schedule, monkeypatch):
    monkeypatch.setenv("KKEMU_RBF_SCAN_THREADS", "64")
    emu.set_schedule(schedule, seed=3)
    try:
        centers = _points(150, 3, torch.float32, 8, "clustered")
        grid = build(emu, centers)
        _check_grid(grid, centers)
        x = _points(20, 3, torch.float32, 9, "clustered")
        idx, _ = knn(emu, x, grid, 5)
        assert torch.equal(idx, R.knn_reference(x, centers, 5)[0])
        for case in (FEAT_CASES[1], FEAT_CASES[2]):
            x, c, s, w, om, idx = _feat_inputs(case, torch.float64, torch.float64, n=21)
            kernel, norm = case[2], case[4]
            out = fwd(emu, x, c, s, w, om, idx, kernel, norm)
            assert_close(out, R.features_reference(x, c, s, w, om, idx, kernel, norm), torch.float64, "out")
            g = torch.randn(out.shape, generator=_gen(2), dtype=torch.float64)
            got = bwd(emu, g, x, c, s, w, om, idx, kernel, norm)
            ref = R.features_backward_reference(g, x, c, s, w, om, idx, kernel, norm)
            for a, b in zip(got, ref):
                if b is not None:
                    assert_close(a, b, torch.float64, schedule)
    finally:
        emu.set_schedule("forward")


_NAME = re.compile(r"(rbf_\w+_kernel)(?:<([^>]*)>)?")


def test_every_plan_variant_is_reached(emu):
    seen = set()
    emu.clear_launches()
    for dtype in (torch.float32, torch.float64):
        for dim in (2, 3):
            centers = _points(9, dim, dtype, 11)
            grid = build(emu, centers)
            x = _points(5, dim, dtype, 12)
            for k in (3, 8, 9, 32):
                knn(emu, x, grid, k)
    for dtype, wdtype in DTYPES:
        for C in (3, 5, 9, 40):
            case = ("v", 2, "ivq", False, NORM_FULL, True, C, 3)
            x, c, s, w, om, idx = _feat_inputs(case, dtype, wdtype, n=5, m=7)
            fwd(emu, x, c, s, w, om, idx, "ivq", NORM_FULL)
            bwd(emu, torch.ones(5, C).to(wdtype), x, c, s, w, om, idx, "ivq", NORM_FULL)
    for la in emu.launches():
        mt = _NAME.search(la["name"])
        assert mt, la["name"]
        args = mt.group(2) and mt.group(2).replace("__nv_bfloat16", "bf16").replace("__half", "half").replace(" ", "")
        seen.add((mt.group(1), args))
    want = set()
    for t in ("float", "double"):
        for k in ("rbf_bbox_kernel", "rbf_cellid_kernel", "rbf_scatter_kernel"):
            want.add((k, t))
        for dim in (2, 3):
            for K in (4, 8, 16, 32):
                want.add(("rbf_knn_kernel", f"{t},{dim},{K}"))
    for k in ("rbf_geom_kernel", "rbf_scan_reduce_kernel", "rbf_scan_tiles_kernel", "rbf_scan_apply_kernel"):
        want.add((k, None))
    for tw in ("float,float", "float,half", "float,bf16", "double,double"):
        for G in (4, 8, 16, 32):
            want.add(("rbf_fwd_kernel", f"{tw},{G}"))
            want.add(("rbf_bwd_kernel", f"{tw},{G}"))
    assert want <= seen, f"never reached: {sorted(want - seen, key=str)}; seen {sorted(seen, key=str)[:6]}"


# ---- empty sizes and bad arguments ------------------------------------------------------------------------
def test_empty_sizes_need_no_pointers(emu):
    L = emu.lib
    grid = build(emu, torch.zeros(0, 3))
    assert R.grid_header(grid)["ncells"] == 1
    assert L.kk_rbf_knn_cuda(0, 3, 0, None, 3, None, 4, None, None, None) == OK
    x = _points(4, 3, torch.float32, 1)
    idx, d2 = knn(emu, x, grid, 3)  # no centres: every slot missing
    assert (idx == -1).all() and torch.isinf(d2).all()
    args = [0, 0, 3, 0, 0, 0, None, 3, 0, None, None, None, 8, 8, None, 4, None, 1]
    assert L.kk_rbf_features_fwd_cuda(*args, None, 8, None) == OK  # n = 0, m = 0
    assert L.kk_rbf_features_bwd_cuda(*args, None, 8, None, None, None, None, None, None) == OK
    # C = 0: the gradients are zero
    x, c, s, w, om, idx = _feat_inputs(FEAT_CASES[0], torch.float32, torch.float32, n=6, m=8)
    dx, dc = torch.full_like(x, NAN).contiguous(), torch.full_like(c, NAN)
    assert L.kk_rbf_features_bwd_cuda(0, 0, 2, 0, 1, 6, _p(x), x.stride(0), 8, _p(c), _p(s), None, 0, 0, None, 4,
                                      _p(idx), 1, None, 0, _p(dx), _p(dc), None, None, None, None) == OK
    assert (dx == 0).all() and (dc == 0).all()


def test_bad_arguments_return_a_status_and_write_nothing(emu):
    L = emu.lib
    centers = _points(20, 2, torch.float32, 2)
    total = R.grid_layout(torch.float32, 2, 20)[4]
    grid = _aligned(total + 8)
    nb = I64(-1)
    assert L.kk_rbf_grid_build_cuda_workspace_size(0, 2, 20, ctypes.byref(nb)) == OK
    ws = _aligned(nb.value + 16)
    assert L.kk_rbf_grid_build_cuda_workspace_size(0, 2, 20, None) == NULL_POINTER
    assert L.kk_rbf_grid_build_cuda_workspace_size(2, 2, 20, ctypes.byref(nb)) == UNSUPPORTED_DTYPE
    assert L.kk_rbf_grid_build_cuda_workspace_size(0, 4, 20, ctypes.byref(nb)) == INVALID_SIZE
    grid.fill_(0x5A)
    for over, status, needle in [
        (dict(dt=2), UNSUPPORTED_DTYPE, "dtype"),
        (dict(dim=1), INVALID_SIZE, "dim"),
        (dict(m=-1), INVALID_SIZE, "m must"),
        (dict(m=1 << 31), INVALID_SIZE, "m must"),
        (dict(ldc=1), INVALID_ARGUMENT, "ldc"),
        (dict(c=PTR(0)), NULL_POINTER, "centers"),
        (dict(g=PTR(0)), NULL_POINTER, "grid"),
        (dict(g=PTR(grid.data_ptr() + 4)), INVALID_ARGUMENT, "aligned"),
        (dict(gb=total - 1), INVALID_SIZE, "grid_bytes"),
        (dict(ws=PTR(0)), NULL_POINTER, "workspace"),
        (dict(ws=PTR(ws.data_ptr() + 8)), INVALID_ARGUMENT, "aligned"),
        (dict(wsb=nb.value - 1), INVALID_ARGUMENT, "workspace_bytes"),
    ]:
        a = dict(dt=0, dim=2, m=20, c=_p(centers), ldc=2, g=_p(grid), gb=total, ws=_p(ws), wsb=nb.value)
        a.update(over)
        st = L.kk_rbf_grid_build_cuda(*a.values(), None)
        assert st == status and needle in emu.last_error(), (over, st, emu.last_error())
    assert (grid == 0x5A).all(), "a rejected build wrote"

    good = build(emu, centers)
    x = _points(5, 2, torch.float32, 3)
    idx = torch.full((5, 4), -7, dtype=torch.int64)
    d2 = torch.full((5, 4), NAN)
    for over, status, needle in [
        (dict(dt=3), UNSUPPORTED_DTYPE, "dtype"),
        (dict(dim=4), INVALID_SIZE, "dim"),
        (dict(n=-2), INVALID_SIZE, "n must"),
        (dict(k=0), INVALID_ARGUMENT, "k must"),
        (dict(k=33), INVALID_ARGUMENT, "k must"),
        (dict(ldx=1), INVALID_ARGUMENT, "ldx"),
        (dict(x=PTR(0)), NULL_POINTER, "x"),
        (dict(g=PTR(0)), NULL_POINTER, "grid"),
        (dict(idx=PTR(0)), NULL_POINTER, "idx"),
        (dict(d2=PTR(0)), NULL_POINTER, "dist2"),
    ]:
        a = dict(dt=0, dim=2, n=5, x=_p(x), ldx=2, g=_p(good), k=4, idx=_p(idx), d2=_p(d2))
        a.update(over)
        st = L.kk_rbf_knn_cuda(*a.values(), None)
        assert st == status and needle in emu.last_error(), (over, st, emu.last_error())
    assert (idx == -7).all() and torch.isnan(d2).all()
    # a grid built for another dtype / dim: every query misses (the kernel reads the header)
    idx64, d64 = knn(emu, x.double(), good, 4)
    assert (idx64 == -1).all() and torch.isnan(d64).all()

    case = FEAT_CASES[0]
    xf, c, s, w, om, kidx = _feat_inputs(case, torch.float32, torch.float32, n=6, m=9)
    n, m, C, k = 6, 9, w.shape[1], kidx.shape[1]
    out = torch.full((n, C), NAN)
    gout = torch.ones(n, C)
    dxx = torch.full((n, 2), NAN)
    for over, status, needle in [
        (dict(dt=2, wdt=2), UNSUPPORTED_DTYPE, "dtype"),
        (dict(dt=1, wdt=2), UNSUPPORTED_DTYPE, "wdtype"),
        (dict(wdt=1), UNSUPPORTED_DTYPE, "wdtype"),
        (dict(dim=5), INVALID_SIZE, "dim"),
        (dict(kernel=3), INVALID_ARGUMENT, "kernel"),
        (dict(kernel=2, full=1), INVALID_ARGUMENT, "nlin"),
        (dict(full=2), INVALID_ARGUMENT, "shape_full"),
        (dict(norm=3), INVALID_ARGUMENT, "normalize"),
        (dict(n=-1), INVALID_SIZE, "n must"),
        (dict(m=-1), INVALID_SIZE, "m must"),
        (dict(C=-1), INVALID_SIZE, "channels"),
        (dict(k=0), INVALID_ARGUMENT, "k must"),
        (dict(k=40), INVALID_ARGUMENT, "k must"),
        (dict(ldx=1), INVALID_ARGUMENT, "ldx"),
        (dict(ldw=C - 1), INVALID_ARGUMENT, "ldw"),
        (dict(ldo=C - 1), INVALID_ARGUMENT, "ldo"),
        (dict(x=PTR(0)), NULL_POINTER, "x"),
        (dict(c=PTR(0)), NULL_POINTER, "centers"),
        (dict(s=PTR(0)), NULL_POINTER, "shapes"),
        (dict(w=PTR(0)), NULL_POINTER, "weights"),
        (dict(idx=PTR(0)), NULL_POINTER, "idx"),
        (dict(out=PTR(0)), NULL_POINTER, "out"),
    ]:
        a = dict(dt=0, wdt=0, dim=2, kernel=0, full=1, n=n, x=_p(xf), ldx=xf.stride(0), m=m, c=_p(c), s=_p(s),
                 w=_p(w), ldw=w.stride(0), C=C, om=_p(om), k=k, idx=_p(kidx), norm=1, out=_p(out), ldo=C)
        a.update(over)
        st = L.kk_rbf_features_fwd_cuda(*a.values(), None)
        assert st == status and needle in emu.last_error(), ("fwd", over, st, emu.last_error())
        if "out" in over or "ldo" in over:
            continue
        a.pop("out"), a.pop("ldo")
        st = L.kk_rbf_features_bwd_cuda(*a.values(), _p(gout), C, _p(dxx), None, None, None, None, None)
        assert st == status and needle in emu.last_error(), ("bwd", over, st, emu.last_error())
    assert torch.isnan(out).all() and torch.isnan(dxx).all(), "a rejected call wrote"
    base = [0, 0, 2, 0, 1, n, _p(xf), xf.stride(0), m, _p(c), _p(s), _p(w), w.stride(0), C, _p(om), k, _p(kidx), 1]
    assert L.kk_rbf_features_bwd_cuda(*base, None, C, _p(dxx), None, None, None, None, None) == NULL_POINTER
    assert "grad_out" in emu.last_error()
    assert L.kk_rbf_features_bwd_cuda(*base, _p(gout), C - 1, _p(dxx), None, None, None, None, None) == INVALID_ARGUMENT
    assert "ldg" in emu.last_error()
    assert torch.isnan(dxx).all()
