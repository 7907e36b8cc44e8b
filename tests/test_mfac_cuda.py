"""The mfac family on the GPU: the CUDA C++ backend (csrc/cuda/mfac.cu) through the op API
(kernelkit.mfac.ops with backend="cuda") against the float64 oracle of python/kernelkit/mfac/reference.py,
and the two IHVP objects against the explicit float64 inverse.  Marked `cuda`: skipped without a GPU, run
on the device machine by bench/device_check.sh (the same kernels run without a GPU under the host
emulation in tests/test_mfac_cuda_emu.py)."""
from __future__ import annotations

import pytest
import torch

from helpers import assert_close, rel_err
from kernelkit.mfac import ops
from kernelkit.mfac import reference as R

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
DTYPE_IDS = ["float32", "bfloat16", "float64"]


def _buf(r, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, d, generator=g).to("cuda", dtype)


def _vec(n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed + 100)
    return torch.randn(n, d, generator=g).to("cuda", R.vector_dtype(dtype))


# (r, d, block, nvec): the owned plan (small blocks), the split plan (large blocks, atomics), one block,
# many rows with few columns (grid.y splits the rows), more vectors than a pass holds.
CASES = [(64, 100_003, 512, 1), (33, 70_001, 10_000, 3), (200, 4099, None, 5), (7, 300, 1, 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=[f"r{c[0]}-d{c[1]}-b{c[2]}-n{c[3]}" for c in CASES])
def test_cuda_mfac_dots_combine_diag_match_reference(poison, dtype, case):
    r, d, block, nvec = case
    G, x = _buf(r, d, dtype, 1), _vec(nvec, d, dtype, 2)
    vdt = R.vector_dtype(dtype)
    b = block or d
    q = ops.mfac_dots(G, x, b, "cuda")
    assert_close(q, R.dots_reference(G, x, b), vdt, "q")
    c = torch.randn(nvec, R.nblocks(d, b), r, dtype=torch.float64, device="cuda")
    out = ops.mfac_combine(G, c, x, 0.3, b, "cuda")
    assert_close(out, R.combine_reference(G, c, x, 0.3, b, torch.float64), vdt, "out")
    out = ops.mfac_combine(G, c, None, 0.0, b, "cuda")
    assert_close(out, R.combine_reference(G, c, None, 0.0, b, torch.float64), vdt, "out (no x)")
    dg = ops.mfac_diag(G, 0.5, -0.25, "cuda")
    assert_close(dg, R.diag_reference(G, 0.5, -0.25, torch.float64), vdt, "diag")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_mfac_insert_dots_matches_reference(poison, dtype):
    for d in (1000, 300_001):  # owned and split plans
        G = _buf(17, d, dtype, 3)
        x = _vec(1, d, dtype, 4)
        Gref = G.clone()
        want_q, want_qr = R.insert_dots_reference(Gref, x[0], 5)
        q, qr = ops.mfac_insert_dots(G, x, 5, "cuda")
        assert torch.equal(G, Gref)
        assert_close(q, want_q, R.vector_dtype(dtype), "q")
        assert_close(qr, want_qr, R.vector_dtype(dtype), "qr")
        x[0, 7] = float("nan")
        q, qr = ops.mfac_insert_dots(G, x, 3, "cuda")
        assert torch.equal(G, Gref), "a non-finite insert changed G"
        assert torch.isnan(q).all() and torch.isnan(qr).all()


def test_cuda_mfac_window_ops_match_reference(poison):
    for m in (1, 64, 257, 1024):
        g = torch.Generator().manual_seed(m)
        G = torch.randn(m, m + 50, generator=g, dtype=torch.float64).cuda()
        gram = G @ G.T
        damp = 1e-2
        kinv = ops.mfac_window_rebuild(gram, damp, "cuda")
        assert_close(kinv, R.window_rebuild_reference(gram, damp), torch.float64, f"rebuild m={m}")
        q = torch.randn(3, m, dtype=torch.float64, device="cuda")
        c = ops.mfac_window_coef(kinv, q, -2.0, "cuda")
        assert_close(c, R.window_coef_reference(kinv, q, -2.0), torch.float64, f"coef m={m}")
        for step in range(3):
            row = (5 * step + 1) % m
            G[row] = G[(row + 1) % m] if step == 1 else torch.randn(m + 50, dtype=torch.float64, device="cuda")
            newcol = (G @ G[row]).contiguous()
            ops.mfac_window_update(gram, kinv, row, newcol, damp, "cuda")
            err = rel_err(kinv, R.window_rebuild_reference(G @ G.T, damp))
            assert err <= 1e-11, f"update m={m} step {step}: {err:.2e}"


@pytest.mark.parametrize("damp", [1e-2, 1e-5])
def test_cuda_mfac_window_update_many_scaled_rows(damp):
    """2m bordering updates by rows scaled 1..1e3 against the exact inverse; kinv stays exactly symmetric.
    Then a copy of another row at scale 1e6 (s lost to cancellation): the device falls back to the
    rebuild, bit for bit the rebuild of the new gram."""
    m, d = 96, 160
    g = torch.Generator().manual_seed(31)
    G = torch.randn(m, d, generator=g, dtype=torch.float64).cuda()
    gram = G @ G.T
    kinv = ops.mfac_window_rebuild(gram, damp, "cuda")
    kinv = (kinv + kinv.T) / 2
    for step in range(2 * m):
        row = (7 * step + 2) % m
        scale = 10 ** (3 * torch.rand(1, generator=g).item())
        G[row] = (scale * torch.randn(d, generator=g, dtype=torch.float64)).cuda()
        ops.mfac_window_update(gram, kinv, row, (G @ G[row]).contiguous(), damp, "cuda")
        if step % 16 == 15 or step == 2 * m - 1:
            err = rel_err(kinv, R.window_rebuild_reference(G @ G.T, damp))
            assert err <= 1e-11, f"step {step}: {err:.2e}"
    assert torch.equal(kinv, kinv.T)
    G = torch.randn(8, 20, generator=g, dtype=torch.float64).cuda() * 1e6
    gram = G @ G.T
    kinv = R.window_rebuild_reference(gram, 1e-2)
    G[2] = G[1]
    ops.mfac_window_update(gram, kinv, 2, (G @ G[2]).contiguous(), 1e-2, "cuda")
    assert torch.equal(kinv, ops.mfac_window_rebuild(gram, 1e-2, "cuda"))


def test_cuda_mfac_window_rebuild_m8192():
    m = 8192
    A = torch.randn(m, 64, dtype=torch.float64, device="cuda")
    gram = A @ A.T
    kinv = ops.mfac_window_rebuild(gram, 1.0, "cuda")
    K = gram + m * torch.eye(m, dtype=torch.float64, device="cuda")
    resid = (K @ kinv - torch.eye(m, dtype=torch.float64, device="cuda")).norm() / m ** 0.5
    assert float(resid) < 1e-10


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(16, 3000, 1000), (64, 2000, 128), (200, 777, None)],
                         ids=["W-3-blocks", "E-blocks-128", "W-one-block"])
def test_cuda_mfac_static_setup_matches_reference(poison, dtype, shape):
    m, d, block = shape
    G = _buf(m, d, dtype, 5)
    b = block or d
    Z = ops.mfac_static_setup(G, 0.05, b, "cuda")
    assert_close(Z, R.static_setup_reference(G, 0.05, b).double(), R.vector_dtype(dtype), "Z")


def test_cuda_sliding_window_ihvp_matches_the_explicit_inverse():
    from kernelkit.mfac import SlidingWindowIHVP
    d, m, damp = 300, 16, 1e-2
    for dtype in DTYPES:
        win = SlidingWindowIHVP(d, m, damp, dtype=dtype, device="cuda", refresh=7, backend="cuda")
        gen = torch.Generator().manual_seed(6)
        grads = [torch.randn(d, generator=gen).cuda() for _ in range(m + 9)]
        for gr in grads:
            win.update(gr)
        v = torch.randn(2, d, generator=gen).cuda()
        Gw = win.G.double()
        want = R.ihvp_explicit(Gw, damp, v)
        got = win.mul(v)
        tol = 1e-9 if dtype == torch.float64 else 1e-4
        assert rel_err(got, want) <= tol, (dtype, rel_err(got, want))


def test_cuda_static_ihvp_matches_the_explicit_inverse():
    from kernelkit.mfac import StaticIHVP
    gen = torch.Generator().manual_seed(7)
    for m, d, block in ((20, 150, None), (20, 150, 50), (30, 150, 16)):
        G = torch.randn(m, d, generator=gen, dtype=torch.float64).cuda()
        S = StaticIHVP(G, 0.1, block_size=block, backend="cuda")
        inv = R.explicit_inverse(G, 0.1, block)
        v = torch.randn(3, d, generator=gen, dtype=torch.float64).cuda()
        assert rel_err(S.mul(v), v @ inv.T) <= 1e-9
        assert rel_err(S.diag(), torch.diagonal(inv)) <= 1e-9


def test_cuda_sliding_window_bf16_d1e7_m64():
    """d = 1e7, m = 64 bfloat16 window: 1.28 GB of buffer, updates and an IHVP without materialising
    anything of size m x d besides the buffer; finite results."""
    from kernelkit.mfac import SlidingWindowIHVP
    torch.cuda.empty_cache()
    d, m = 10_000_000, 64
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    win = SlidingWindowIHVP(d, m, 1e-4, dtype=torch.bfloat16, device="cuda", backend="cuda")
    gen = torch.Generator(device="cuda").manual_seed(8)
    for _ in range(3):
        win.update(torch.randn(d, device="cuda", generator=gen))
    u = win.update_mul(torch.randn(d, device="cuda", generator=gen))
    torch.cuda.synchronize()
    buf = m * d * 2
    assert torch.cuda.max_memory_allocated() - base < buf + (512 << 20), "more than the buffer + a few vectors"
    assert torch.isfinite(u).all()
    # the IHVP of the last gradient, checked on the subspace: g^T F^-1 g > 0
    assert float(u.double().norm()) > 0


# Small enough to run under compute-sanitizer (memcheck, racecheck, synccheck) on the device machine.
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_sanitizer_cases(dtype):
    G, x = _buf(13, 300, dtype, 9), _vec(5, 300, dtype, 10)
    vdt = R.vector_dtype(dtype)
    for block in (50, 300):
        q = ops.mfac_dots(G, x, block, "cuda")
        assert_close(q, R.dots_reference(G, x, block), vdt, "q")
        c = torch.randn(5, R.nblocks(300, block), 13, dtype=torch.float64, device="cuda")
        ops.mfac_combine(G, c, x, 0.5, block, "cuda")
    ops.mfac_insert_dots(G, x[:1].contiguous(), 2, "cuda")
    ops.mfac_diag(G, 0.0, 1.0, "cuda")
    ops.mfac_static_setup(G, 0.1, 8, "cuda")
    ops.mfac_static_setup(G, 0.1, 100, "cuda")
    gram = (G.double() @ G.double().T).contiguous()
    kinv = ops.mfac_window_rebuild(gram, 0.1, "cuda")
    ops.mfac_window_update(gram, kinv, 4, gram[4].clone(), 0.1, "cuda")  # the same row again
    ops.mfac_window_coef(kinv, torch.randn(2, 13, dtype=torch.float64, device="cuda"), 1.0, "cuda")
    torch.cuda.synchronize()
