"""The rbf family on the GPU: the CUDA C++ backend (csrc/cuda/rbf.cu) through kernelkit.rbf.ops with
backend="cuda" against python/kernelkit/rbf/reference.py: the grid (header, geometry and cell starts bit for
bit, the order inside each cell as a set), the search against brute force at N = 2^16, M = 1e4 (uniform,
clustered, outside the box, ties, k > M), the fused features and their gradients against the float64
oracle, the sine's accuracy bound.  Marked `cuda`: skipped without a GPU, run on the device machine by
bench/device_check.sh (the same kernels run without a GPU under the host emulation in
tests/test_rbf_cuda_emu.py)."""
from __future__ import annotations

import pytest
import torch

from helpers import TOL, rel_err
from kernelkit.rbf import ops
from kernelkit.rbf import reference as R

pytestmark = pytest.mark.cuda

DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.float16), (torch.float32, torch.bfloat16),
          (torch.float64, torch.float64)]
DTYPE_IDS = ["f32", "f32-f16", "f32-bf16", "f64"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _points(n, dim, dtype, seed, kind="uniform"):
    g = _gen(seed)
    if kind == "uniform":
        p = torch.rand(n, dim, generator=g, dtype=torch.float64)
    elif kind == "clustered":
        c = torch.rand(8, dim, generator=g, dtype=torch.float64)
        p = c[torch.randint(0, 8, (n,), generator=g)] + 0.003 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    elif kind == "outside":
        p = torch.rand(n, dim, generator=g, dtype=torch.float64) * 3 - 1
    elif kind == "lattice":
        p = torch.randint(0, 30, (n, dim), generator=g).double() / 29
    else:
        raise ValueError(kind)
    return p.to("cuda", dtype)


def _check_grid(grid, centers):
    m, dim = centers.shape
    want = R.grid_build_reference(centers.cpu())
    got = grid.cpu()
    cm, cs_off, order_off, coords_off, total = R.grid_layout(centers.dtype, dim, m)
    assert got.numel() == total
    assert torch.equal(got[:256], want[:256]), (R.grid_header(got), R.grid_header(want))
    assert torch.equal(got[cs_off:order_off], want[cs_off:order_off]), "cell_start"
    cs = want[cs_off:order_off].view(torch.int64)
    h = R.grid_header(want)
    order = got[order_off:coords_off].view(torch.int64)
    cell = torch.repeat_interleave(torch.arange(h["ncells"]), cs[1:h["ncells"] + 1] - cs[:h["ncells"]])
    # the order inside a cell is unspecified: sort by (cell, index) and compare with the stable reference
    key = cell * max(m, 1) + order
    assert torch.equal(order[key.argsort()], want[order_off:coords_off].view(torch.int64)), "order"
    coords = got[coords_off:coords_off + centers.element_size() * m * dim].view(centers.dtype).reshape(m, dim)
    assert torch.equal(coords, centers.cpu()[order])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("kind", ["uniform", "clustered", "lattice"])
def test_cuda_rbf_grid_matches_reference(dtype, dim, kind):
    centers = _points(10_000, dim, dtype, dim, kind)
    grid = ops.rbf_grid_build(centers, "cuda")
    _check_grid(grid, centers)


F32, F64 = torch.float32, torch.float64
KNN_CASES = [  # (dtype, dim, k, centres, queries): K = 4 / 8 / 16 / 32 kernels, both dims, ties on lattices
    (F32, 2, 4, "uniform", "uniform"), (F32, 2, 32, "clustered", "outside"), (F32, 3, 8, "uniform", "outside"),
    (F32, 3, 1, "clustered", "clustered"), (F32, 3, 17, "lattice", "lattice"), (F32, 2, 9, "lattice", "lattice"),
    (F64, 3, 5, "clustered", "outside"), (F64, 2, 12, "lattice", "lattice"),
]


@pytest.mark.parametrize("case", KNN_CASES, ids=[f"{str(c[0])[6:]}-d{c[1]}-k{c[2]}-{c[3]}-{c[4]}" for c in KNN_CASES])
def test_cuda_rbf_knn_equals_brute_force_2e16_queries_1e4_centres(poison, case):
    dtype, dim, k, ckind, qkind = case
    centers = _points(10_000, dim, dtype, 10 + k, ckind)
    x = _points(1 << 16, dim, dtype, 20 + k, qkind)
    x[5, 0] = float("nan")
    x[77, dim - 1] = float("inf")
    idx, d2 = ops.knn(x, centers, k, backend="cuda")
    wi, wd = R.knn_reference(x, centers, k, chunk=1 << 26)
    bad = (idx != wi).any(1)
    assert not bad.any(), f"{int(bad.sum())} queries differ, e.g. {bad.nonzero()[:3].flatten().tolist()}"
    assert torch.equal(d2.nan_to_num(-1.0), wd.nan_to_num(-1.0))


def test_cuda_rbf_knn_k_greater_than_m_and_a_prebuilt_grid(poison):
    centers = _points(20, 3, torch.float32, 3)
    grid = ops.build_grid(centers, backend="cuda")
    x = _points(1000, 3, torch.float32, 4, "outside")
    idx, d2 = ops.knn(x, centers, 32, grid=grid, backend="cuda")
    wi, wd = R.knn_reference(x, centers, 32)
    assert torch.equal(idx, wi) and torch.equal(d2, wd)
    assert (idx[:, 20:] == -1).all() and torch.isinf(d2[:, 20:]).all()


def test_cuda_rbf_non_finite_centre_flags_the_grid():
    centers = _points(100, 2, torch.float32, 5)
    centers[17, 0] = float("nan")
    grid = ops.rbf_grid_build(centers, "cuda")
    assert R.grid_header(grid)["flags"] == 1
    d2, idx = ops.rbf_knn(_points(50, 2, torch.float32, 6), centers, grid, 4, "cuda")
    assert (idx == -1).all() and torch.isnan(d2).all()


def _field(n, m, dim, C, kernel, full, dtype, wdtype, seed, k):
    g = _gen(seed)
    centers = torch.rand(m, dim, generator=g, dtype=torch.float64)
    spacing = m ** (-1.0 / dim)
    if kernel == "nlin":
        shapes = (0.5 + torch.rand(m, dim, generator=g, dtype=torch.float64)) / spacing
    elif full:
        B = torch.randn(m, dim, dim, generator=g, dtype=torch.float64)
        shapes = (B @ B.transpose(1, 2) / dim + 0.5 * torch.eye(dim, dtype=torch.float64)) / spacing ** 2
    else:
        shapes = (0.5 + torch.rand(m, dim, generator=g, dtype=torch.float64)) / spacing ** 2
    w = torch.randn(m, C, generator=g).to(wdtype)
    x = torch.rand(n, dim, generator=g, dtype=torch.float64)
    idx, _ = R.knn_reference(x, centers, k)
    cvt = lambda t: t.to("cuda", dtype)  # noqa: E731
    return cvt(x), cvt(centers), cvt(shapes).contiguous(), w.cuda(), idx.cuda()


FEAT_CASES = [  # (dim, kernel, full, normalize, detach, omegas (max log2), C, k)
    (2, "ivq", True, True, True, 12, 32, 4),     # NeuRBF's image setting
    (3, "nlin", False, True, True, 3, 16, 8),    # SDF
    (3, "ivq", False, False, True, None, 32, 5),  # NeRF: no sinusoids, no normalization
    (2, "gauss", True, True, False, 4, 9, 6),
    (3, "gauss", False, True, False, 4, 40, 32),
]


@pytest.mark.parametrize("dt", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", FEAT_CASES, ids=[f"{c[1]}-d{c[0]}-C{c[6]}-k{c[7]}-n{int(c[3])}{int(c[4])}"
                                                  for c in FEAT_CASES])
def test_cuda_rbf_features_and_gradients_match_reference(poison, dt, case):
    dtype, wdtype = dt
    dim, kernel, full, normalize, detach, omax, C, k = case
    x, c, s, w, idx = _field(4099, 2000, dim, C, kernel, full, dtype, wdtype, 1, k)
    om = None if omax is None else R.log_omegas(C, 2.0 ** -3, 2.0 ** omax, dtype).cuda()
    mode = R.NORM_NONE if not normalize else (R.NORM_DETACHED if detach else R.NORM_FULL)
    leaves = [x, c, s, w] + ([om] if om is not None else [])
    for t in leaves:
        t.requires_grad_(True)
    out = ops.rbf_features(x, c, s, w, om, kernel=kernel, normalize=normalize, idx=idx,
                           detach_denominator=detach, backend="cuda")
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    want = R.features_reference(d(x), d(c), d(s), d(w), d(om), idx, kernel, mode)
    # the phase omega * phih carries |t| eps of rounding (float32: 4096 * 6e-8 at omega = 2^12), which the
    # sine turns into an absolute error: the tolerance grows with the largest frequency
    big = (omax or 0) > 4
    tol_c = (2e-3 if big else TOL[dtype]) if dtype == torch.float32 else (1e-11 if big else TOL[dtype])
    tol = TOL[wdtype] if wdtype in (torch.float16, torch.bfloat16) else tol_c
    assert rel_err(out, want) <= tol, rel_err(out, want)
    g = torch.randn(out.shape, device="cuda").to(wdtype)
    out.backward(g)
    ref = R.features_backward_reference(g.double(), d(x), d(c), d(s), d(w), d(om), idx, kernel, mode)
    gtol = tol_c
    for name, t, r in zip(("dx", "dcenters", "dshapes", "dweights", "domegas"), leaves + [None], ref):
        if r is None:
            continue
        assert t.grad is not None, name
        assert rel_err(t.grad, r) <= gtol, (name, rel_err(t.grad, r))


def test_cuda_rbf_features_search_and_evaluate_2e16_points(poison):
    """The whole path (grid, search, features) at N = 2^16, M = 1e4, NeuRBF's image setting, against the
    float64 reference on the same neighbours."""
    x, c, s, w, _ = _field(8, 10_000, 2, 32, "ivq", True, torch.float32, torch.float16, 2, 4)
    x = _points(1 << 16, 2, torch.float32, 7)
    om = R.log_omegas(32).cuda()
    out = ops.rbf_features(x, c, s, w, om, k=4, kernel="ivq", backend="cuda")
    idx, _ = R.knn_reference(x, c, 4, chunk=1 << 26)
    want = R.features_reference(x.double(), c.double(), s.double(), w.double(), om.double(), idx, "ivq", 1)
    assert rel_err(out, want) <= 1e-2


def test_cuda_rbf_sine_is_accurate_to_2e21_up_to_2e17():
    """k = 1, the query on its centre: phih = 1 exactly in float32, out_j = w_j sin(omega_j) with omega up
    to 2^17: the header's bound |sin_kk(t) - sin(t)| <= 2^-21 (CUDA's sinf, not __sinf)."""
    C = 256
    om = torch.cat([torch.tensor([2.0 ** 17, -2.0 ** 17, 4096.0, 3.0e4]),
                    torch.empty(C - 4).uniform_(-2.0 ** 17, 2.0 ** 17, generator=_gen(5))]).float().cuda()
    centers = torch.rand(3, 2, generator=_gen(6)).cuda()
    x = centers[[1, 2]].clone()
    idx = torch.tensor([[1], [2]], device="cuda")
    out = ops.rbf_features(x, centers, torch.full((3, 2), 5.0, device="cuda"), torch.ones(3, C, device="cuda"), om,
                           idx=idx, backend="cuda")
    err = (out.double() - torch.sin(om.double())).abs().max().item()
    assert err <= 2.0 ** -21, err


# Small enough to run under compute-sanitizer (memcheck, racecheck, synccheck) on the device machine.
@pytest.mark.parametrize("dt", DTYPES, ids=DTYPE_IDS)
def test_cuda_sanitizer_cases(dt):
    dtype, wdtype = dt
    for dim in (2, 3):
        centers = _points(300, dim, dtype, 8, "clustered")
        grid = ops.rbf_grid_build(centers, "cuda")
        x = _points(200, dim, dtype, 9, "outside")
        for k in (3, 8, 16, 32):
            ops.rbf_knn(x, centers, grid, k, "cuda")
    for C, case in ((3, FEAT_CASES[0]), (5, FEAT_CASES[1]), (9, FEAT_CASES[3]), (40, FEAT_CASES[4])):
        dim, kernel, full, normalize, detach, omax, _, k = case
        x, c, s, w, idx = _field(100, 60, dim, C, kernel, full, dtype, wdtype, 3, min(k, 8))
        om = R.log_omegas(C, dtype=dtype).cuda()
        for t in (x, c, s, w, om):
            t.requires_grad_(True)
        out = ops.rbf_features(x, c, s, w, om, kernel=kernel, normalize=normalize, idx=idx,
                               detach_denominator=detach, backend="cuda")
        out.float().sum().backward()
    torch.cuda.synchronize()
