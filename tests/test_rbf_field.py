"""RBFField (python/kernelkit/rbf/field.py), its initialisation (rbf/init.py) and the fit_image example.

Lean on purpose (CI has 2 cores): small images, few steps.  Every test runs on the device's default
backend (the cpu library when built, else the torch reference).
"""
import math
import struct
import zlib

import pytest
import torch

from kernelkit.rbf import ops
from kernelkit.rbf.field import DenseGrid, GridConfig, RBFField
from kernelkit.rbf.init import init_from_samples, weighted_kmeans


@pytest.fixture(autouse=True)
def one_thread():
    """These sizes are far below any threading break-even, and on a loaded machine OpenMP / torch
    worker threads that wait on busy cores made a 4 ms training step take 200 ms: one thread here."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def pixel_grid(n: int, dtype=torch.float32) -> torch.Tensor:
    t = (torch.arange(n, dtype=dtype) + 0.5) / n
    y, x = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([x, y], -1).reshape(-1, 2)


def synthetic_target(n: int) -> torch.Tensor:
    """(n*n, 1): a smooth gradient, a sharp-edged disc and a sinusoidal stripe patch."""
    p = pixel_grid(n, torch.float64)
    x, y = p[:, 0], p[:, 1]
    v = 0.2 + 0.3 * x + 0.2 * y
    v = torch.where((x - 0.35) ** 2 + (y - 0.4) ** 2 < 0.18 ** 2, torch.full_like(v, 0.9), v)
    stripes = (x > 0.6) & (y > 0.55)
    v = torch.where(stripes, 0.5 + 0.3 * torch.sin(2 * math.pi * 6 * (x + y)), v)
    return v[:, None].float()


def psnr(out, target) -> float:
    return -10 * math.log10((out.clamp(0, 1) - target).pow(2).mean().item())


def small_field(**kw) -> RBFField:
    torch.manual_seed(0)
    args = dict(in_dim=2, num_rbfs=48, out_features=2, rbf_channels=8, hidden=16)
    args.update(kw)
    return RBFField(**args)


def test_rbf_field_fits_synthetic_image_to_psnr():
    # 32x32 (1024 values), 96 RBFs x 16 channels + a small grid: >= 38 dB within 150 full-batch steps
    # (measured 45 dB at 200 steps; the initial output gives ~6 dB)
    n, steps, goal = 32, 150, 38.0
    pts, target = pixel_grid(n), synthetic_target(n)
    torch.manual_seed(0)
    m = RBFField(2, 96, 1, rbf_channels=16, grid=GridConfig(levels=2, features=2, base_resolution=4,
                                                            max_resolution=8))
    p = target.reshape(n, n)
    gy, gx = torch.gradient(p)
    m.init_from_samples(pts, (gx * gx + gy * gy).sqrt().reshape(-1), progress=False,
                        generator=torch.Generator().manual_seed(0))
    idx = m.precompute_neighbors(pts)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    start = psnr(m(pts, idx=idx).detach(), target)
    for _ in range(steps):
        loss = (m(pts, idx=idx) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    end = psnr(m(pts, idx=idx).detach(), target)
    print(f"PSNR {start:.2f} -> {end:.2f} dB in {steps} steps")
    assert end >= goal, f"PSNR {end:.2f} dB after {steps} steps (start {start:.2f}); expected >= {goal}"


def test_kmeans_centres_concentrate_where_weights_are_high():
    # weights 100x higher in the strip x < 0.25 (a quarter of the area): most centres go there
    pts = pixel_grid(40)
    w = torch.where(pts[:, 0] < 0.25, 100.0, 1.0)
    centers, hist, idx, d2 = weighted_kmeans(pts, 64, w, iters=10, progress=False,
                                             generator=torch.Generator().manual_seed(1))
    frac = (centers[:, 0] < 0.25).float().mean().item()
    assert frac >= 0.6, f"only {frac:.2f} of the centres in the heavy strip (area 0.25)"
    # the objective never increases (Lloyd + re-seeding) and drops clearly from the seeds
    assert len(hist) == 11
    for a, b in zip(hist, hist[1:]):
        assert b <= a * (1 + 1e-6), hist
    assert hist[-1] < 0.8 * hist[0], hist
    # the returned assignment is the nearest centre
    ref_idx, _ = ops.knn(pts, centers, 1, backend="torch")
    assert torch.equal(idx, ref_idx[:, 0])


@pytest.mark.parametrize("kernel,shape", [("ivq", "full"), ("gauss", "diag"), ("nlin", "diag")])
def test_init_shapes_pass_the_ops_checks(kernel, shape):
    pts = pixel_grid(24)
    x = pts[:, 0] - 0.5
    w = torch.exp(-(x / 0.05) ** 2) + 1e-3           # an edge along x = 0.5: elongated clusters there
    res = init_from_samples(pts, 40, w, kernel=kernel, shape=shape, progress=False,
                            generator=torch.Generator().manual_seed(0))
    s = res.shapes
    assert s.shape == ((40, 2, 2) if shape == "full" else (40, 2)) and s.dtype == torch.float32
    ops.check_shapes(s, kernel, 40, 2, "test")       # finite, symmetric, positive definite / > 0
    if shape == "full":
        assert torch.equal(s, s.transpose(1, 2))
        assert bool((torch.linalg.eigvalsh(s.double()) > 0).all())
    # the kernels read them: every pixel gets finite features
    f = ops.rbf_features(pts, res.centers, s, torch.randn(40, 4), None, k=4, kernel=kernel)
    assert torch.isfinite(f).all()
    assert int(res.counts.sum()) == pts.shape[0]


def test_trainable_geometry_gets_finite_gradients():
    m = small_field(trainable_geometry=True)
    assert isinstance(m.centers, torch.nn.Parameter) and isinstance(m.shapes, torch.nn.Parameter)
    pts = torch.rand(200, 2, generator=torch.Generator().manual_seed(0))
    m(pts).square().sum().backward()
    for name in ("centers", "shapes", "weights"):
        g = getattr(m, name).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    # frozen geometry: buffers, no gradient
    f = small_field()
    assert "centers" not in dict(f.named_parameters()) and "centers" in dict(f.named_buffers())


def test_grid_cache_is_rebuilt_when_centres_change():
    m = small_field()
    g1 = m.neighbor_grid()
    assert m.neighbor_grid() is g1                   # cached
    x = torch.rand(100, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        m.centers[:5] += 0.3                         # moved in place
    g2 = m.neighbor_grid()
    assert g2 is not g1
    assert torch.equal(g2, ops.build_grid(m.centers))
    idx, _ = ops.knn(x, m.centers, m.k, backend="torch")
    assert torch.equal(m(x), m(x, idx=idx))          # the forward searched the new centres
    m.double()                                       # dtype change: rebuilt for float64 centres
    assert m.neighbor_grid().numel() == ops.build_grid(m.centers).numel()
    assert m.neighbor_grid() is not g2


def test_precomputed_neighbours_give_the_searched_output():
    m = small_field(grid={"levels": 2, "features": 2, "base_resolution": 4, "max_resolution": 8})
    x = torch.rand(300, 2, generator=torch.Generator().manual_seed(3))
    idx = m.precompute_neighbors(x)
    assert idx.shape == (300, 4) and idx.dtype == torch.int64
    assert torch.equal(idx, ops.knn(x, m.centers, 4, backend="torch")[0])
    assert torch.equal(m(x, idx=idx), m(x))


@pytest.mark.parametrize("kw,name", [
    (dict(in_dim=4), "in_dim"),
    (dict(k=0), "k"),
    (dict(k=33), "k"),
    (dict(kernel="foo"), "kernel"),
    (dict(kernel="nlin", shape="full"), "shape"),
    (dict(omegas=torch.ones(3)), "omegas"),
    (dict(grid={"level": 2}), "grid"),
    (dict(num_rbfs=0), "num_rbfs"),
])
def test_bad_arguments_raise_naming_the_argument(kw, name):
    args = dict(in_dim=2, num_rbfs=16, out_features=1)
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        RBFField(**args)


def test_bad_forward_inputs_raise():
    m = small_field()
    with pytest.raises(ValueError, match="x must be an"):
        m(torch.rand(10, 3))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.rand(10, 2, dtype=torch.float64))


def test_state_dict_round_trip():
    m = small_field(grid={"levels": 2, "features": 2, "base_resolution": 4, "max_resolution": 8})
    pts = pixel_grid(16)
    m.init_from_samples(pts, progress=False, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.weights.normal_()
    x = torch.rand(50, 2, generator=torch.Generator().manual_seed(4))
    m2 = small_field(grid={"levels": 2, "features": 2, "base_resolution": 4, "max_resolution": 8})
    m2(x)                                            # builds a grid over m2's own (lattice) centres first
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2(x), m(x))
    assert set(m.state_dict()) >= {"centers", "shapes", "weights", "bias", "omegas"}


def test_float64_module_runs():
    m = small_field(grid={"levels": 2, "features": 2, "base_resolution": 4, "max_resolution": 8}).double()
    x = torch.rand(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out = m(x)
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    out.sum().backward()
    assert m.weights.grad.dtype == torch.float64 and torch.isfinite(m.weights.grad).all()
    m32 = small_field(grid={"levels": 2, "features": 2, "base_resolution": 4, "max_resolution": 8})
    assert (m32(x.float()).double() - out).abs().max() < 1e-4   # the same function in both precisions


def test_dense_grid_interpolates_its_lattice():
    # level values sit at lo + (i, j) / (r - 1) * (hi - lo), x[:, 0] along the first axis; midpoints average
    cfg = GridConfig(levels=1, features=1, base_resolution=5, max_resolution=5)
    g = DenseGrid(2, cfg, torch.tensor([[0.0, -1.0], [2.0, 1.0]]))
    with torch.no_grad():
        g.levels[0].copy_(torch.randn(1, 1, 5, 5))
    v = g.levels[0][0, 0]
    x = torch.tensor([[0.5, -0.5], [1.5, 1.0], [0.75, 0.0]])
    want = torch.stack([v[1, 1], v[3, 4], 0.5 * (v[1, 2] + v[2, 2])])
    assert torch.allclose(g(x)[:, 0], want, atol=1e-6)


def test_fit_image_example_quick(tmp_path):
    from kernelkit.examples import fit_image
    out = tmp_path / "fit.png"
    r = fit_image.main(["--quick", "--quiet", "--steps", "60", "--out", str(out)])
    assert out.exists()
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    assert (w, h) == (3 * 48 + 2 * 4, 48)            # target | RBFField | baseline
    assert zlib.crc32(data[12:29]) & 0xFFFFFFFF == struct.unpack(">I", data[29:33])[0]
    psnrs = [row["rbf"] for row in r["table"]]
    assert psnrs[-1] > psnrs[0] and psnrs[-1] > 20.0, psnrs
    assert r["psnr_baseline"] is not None


def test_3d_nlin_field_initialises_and_trains():
    # NeuRBF's SDF setting: 3-D, compact "nlin" hats with per-dimension scales, k = 8, omegas in [1, 8]
    g = torch.Generator().manual_seed(6)
    pts = torch.rand(600, 3, generator=g)
    sdf = (pts - 0.5).norm(dim=1, keepdim=True) - 0.3
    m = small_field(in_dim=3, out_features=1, kernel="nlin", shape="diag", num_rbfs=40)
    assert m.k == 8 and float(m.omegas.max()) == pytest.approx(8.0)
    res = m.init_from_samples(pts, 1.0 / (sdf[:, 0].abs() + 1e-2), progress=False, generator=g)
    ops.check_shapes(m.shapes, "nlin", 40, 3, "test")
    assert res.objective[-1] < res.objective[0]
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (m(pts) - sdf).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
