"""The ot family's C ABI: numpy through ctypes (fresh interpreter, no torch import) and a C99 program
compiled against the installed header and library, each once per CPU ISA variant (KERNELKIT_CPU_ISA
caps the variant the library dispatches to); and the CPU entry points through kernelkit._C against the
float64 reference (python/kernelkit/ot/reference.py) where the reference's own algorithm matters: the
vectorized exp over its whole range, CG step for step, tiny reg, the tiles of the column step."""
from __future__ import annotations

import math

import pytest
import torch

from cabi_common import ISAS, make_cabi_tests
from kernelkit import _C
from kernelkit.ot import reference as R

OT_SYMBOLS = tuple(f"kk_ot_{op}_cpu" for op in ("sinkhorn_step", "marginals", "plan", "sparsify", "hvp", "cg",
                                                 "points_grad"))
DT = {torch.float32: 0, torch.float64: 1}
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


(test_ot_header_is_installed_and_symbols_exported, test_ot_cabi_from_numpy_ctypes_without_torch,
 cabi_exe, test_ot_cabi_from_a_c_program) = make_cabi_tests(
    "ot", OT_SYMBOLS, lambda n: "_ot_" in n and not n.startswith("kk_ot_"))


# ---- through kernelkit._C, in this process (the library reads KERNELKIT_CPU_ISA at every call) ----------
@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("KERNELKIT_CPU_ISA", request.param)
    return request.param


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _matrix(C, shared=False):
    return (0, 1, 0.0, C.data_ptr(), C.stride(1), 0 if shared else C.stride(0), 0, 0, 0, 0)


def _rel(got, want):
    got, want = got.double(), want.double()
    fin = torch.isfinite(want)
    assert torch.equal(got[~fin], want[~fin])
    den = want[fin].norm()
    return ((got[fin] - want[fin]).norm() / (den if den > 0 else 1)).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ot_cpu_exp_over_its_whole_range(isa, dtype):
    """plan with C = 0, g = 0, reg = 1 is exp(f): every element within a few ulp of torch.exp, -inf -> 0,
    overflow -> inf, NaN -> NaN; arguments below -708 (results under 3.3e-307, at the bottom of the normal
    range) are flushed to exactly 0, so no subnormal is produced (they made the kernels 5x slower);
    float32 results rounded from float64."""
    f = torch.cat([torch.linspace(-760, 720, 30001, dtype=torch.float64), torch.linspace(-1, 1, 2001, dtype=torch.float64),
                   torch.tensor([-math.inf, math.inf, -745.2, -745.13, -708.4, -708.0, -707.99, 709.78, 709.79, 1e-300,
                                 -1e-300, 0.0], dtype=torch.float64)]).to(dtype)
    n = f.numel()
    z = torch.zeros(1, n, 1, dtype=dtype)
    P = torch.full((1, n, 1), math.nan, dtype=dtype)
    g = torch.zeros(1, 1, dtype=dtype)
    _C.ot_plan_cpu(DT[dtype], _matrix(z), 1, n, 1, 1.0, f.data_ptr(), g.data_ptr(), P.data_ptr(), 1, 2)
    got, want = P.flatten(), torch.exp(f.double()).to(dtype)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and not torch.isnan(got).any()
    flushed = f.double() < -708.0
    assert bool((got[flushed] == 0).all())
    normal = ~flushed & (want >= torch.finfo(dtype).tiny) & torch.isfinite(want)
    ulp = torch.finfo(dtype).eps
    assert ((got[normal] - want[normal]).abs() / want[normal]).max().item() <= 2 * ulp
    if dtype == torch.float32:  # float64 results below float32's normal range round to float32 subnormals / 0
        sub = ~flushed & (want < torch.finfo(dtype).tiny)
        assert ((got[sub].double() - want[sub].double()).abs() <= 2 * float(torch.finfo(dtype).smallest_normal) * ulp).all()
    nanv = torch.tensor([math.nan], dtype=dtype)
    P1 = torch.zeros(1, 1, 1, dtype=dtype)
    _C.ot_plan_cpu(DT[dtype], _matrix(z), 1, 1, 1, 1.0, nanv.data_ptr(), g.data_ptr(), P1.data_ptr(), 1, 1)
    assert torch.isnan(P1).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("axis", [0, 1])
def test_ot_cpu_sinkhorn_step_tiny_reg_and_tiles(isa, dtype, axis):
    """reg = 1e-4 of the cost scale: finite, matching the reference; shapes crossing the row tile (2048
    columns), several column strips (256) and split rows (one problem, few strips, 3 threads)."""
    torch.manual_seed(1)
    for B, n, m, nt in ((1, 5, 2500, 2), (1, 600, 300, 3), (2, 130, 40, 2)):
        C = torch.rand(B, n, m, dtype=torch.float64).to(dtype)
        a = torch.rand(B, n, dtype=dtype) + 0.1
        b = torch.rand(B, m, dtype=dtype) + 0.1
        f = (torch.rand(B, n, dtype=torch.float64) * 0.01).to(dtype)
        g = (torch.rand(B, m, dtype=torch.float64) * 0.01).to(dtype)
        w, other, pot = (a, g, f) if axis == 0 else (b, f, g)
        for reg in (1e-4, 0.3):
            out = torch.full_like(pot, math.nan)
            err = torch.full((B,), math.nan, dtype=dtype)
            _C.ot_sinkhorn_step_cpu(DT[dtype], _matrix(C), B, n, m, axis, reg, w.data_ptr(), other.data_ptr(),
                                    pot.data_ptr(), out.data_ptr(), err.data_ptr(), 2, nt)
            want, werr = R.sinkhorn_step_reference(C.double(), axis, reg, w.double(), other.double(), pot.double(), 2)
            assert torch.isfinite(out).all()
            assert _rel(out, want) <= TOL[dtype], (B, n, m, reg)
            if reg > 1e-3:  # at reg = 1e-4 the plan's marginal is exp(huge): inf in both
                assert _rel(err, werr) <= 10 * TOL[dtype], (B, n, m, reg)


def test_ot_cpu_cg_follows_the_reference_step_for_step(isa):
    """Same iterations, same residual, same solution as cg_reference (float64), from a nonzero guess,
    with a singular H (S holds all of P, shift 0) and with a shift; zero diagonal entries take 1."""
    torch.manual_seed(2)
    B, n, m = 3, 40, 30
    C = torch.rand(B, n, m, dtype=torch.float64)
    f = torch.rand(B, n, dtype=torch.float64) * 0.1
    g = torch.rand(B, m, dtype=torch.float64) * 0.1
    f[0, 3] = -math.inf  # an empty row: r = 0 there
    reg = 0.1
    r, c, _ = R.marginals_reference(C, reg, f, g)
    for k, shift in ((m, 0.0), (5, 1e-3)):
        cols, vals = R.sparsify_reference(C, reg, f, g, k)
        rx = torch.randn(B, n, dtype=torch.float64)
        ry = torch.randn(B, m, dtype=torch.float64)
        rx[0, 3] = 0  # the empty row's equation is 0 = rhs_x
        ry += (rx.sum(1) - ry.sum(1))[:, None] / m  # consistent for the singular system
        z0x, z0y = torch.randn(B, n, dtype=torch.float64), torch.randn(B, m, dtype=torch.float64)
        for max_iter in (0, 7, 200):
            zx, zy = z0x.clone(), z0y.clone()
            it = torch.full((B,), -1, dtype=torch.int32)
            res = torch.full((B,), math.nan, dtype=torch.float64)
            _C.ot_cg_cpu(1, B, n, m, k, cols.data_ptr(), vals.data_ptr(), r.data_ptr(), c.data_ptr(), shift,
                         rx.data_ptr(), ry.data_ptr(), zx.data_ptr(), zy.data_ptr(), 1e-10, max_iter, it.data_ptr(),
                         res.data_ptr(), 2)
            wx, wy, wit, wres = R.cg_reference(cols, vals, r, c, shift, rx, ry, z0x, z0y, 1e-10, max_iter)
            if shift == 0 and max_iter == 200:
                # singular H: rounding may move the stop across the threshold by one iteration; the
                # solution must still solve the system
                assert (it - wit).abs().max() <= 1 and (res <= 1e-10).all(), (it, wit, res)
                hx, hy = R.hvp_reference(cols, vals, r, c, shift, zx, zy)
                assert _rel(torch.cat([hx, hy], 1), torch.cat([rx, ry], 1)) <= 1e-9
                continue
            assert torch.equal(it, wit), (k, max_iter, it, wit)
            assert _rel(res, wres) <= 1e-6 and _rel(zx, wx) <= 1e-9 and _rel(zy, wy) <= 1e-9, (k, max_iter)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ot_cpu_points_large_dim_and_shared_cost(dtype):
    """dim up to KK_OT_MAX_DIM, y shared by the batch (stride 0), marginals + sparsify + points_grad."""
    torch.manual_seed(3)
    for kind, p, D in ((1, 2.0, 1024), (2, 1.0, 7), (3, 1.5, 3)):
        B, n, m = 2, 9, 13
        x = torch.rand(B, n, D, dtype=dtype)
        y = torch.rand(1, m, D, dtype=dtype)
        cost = (kind, D, p, 0, 0, 0, x.data_ptr(), n * D, y.data_ptr(), 0)
        C = R.point_cost(kind, p, x.double(), y.double().expand(B, m, D))
        reg = 0.05 * C.mean().item()
        f = -(C.min(2).values).to(dtype)
        g = torch.zeros(B, m, dtype=dtype)
        r, c = torch.full((B, n), math.nan, dtype=dtype), torch.full((B, m), math.nan, dtype=dtype)
        _C.ot_marginals_cpu(DT[dtype], cost, B, n, m, reg, f.data_ptr(), g.data_ptr(), 0, 0, 0, 0, r.data_ptr(),
                            c.data_ptr(), 0, 2)
        wr, wc, _ = R.marginals_reference(C, reg, f.double(), g.double())
        assert _rel(r, wr) <= TOL[dtype] and _rel(c, wc) <= TOL[dtype], kind
        dx, dy = torch.full((B, n, D), math.nan, dtype=dtype), torch.full((B, m, D), math.nan, dtype=dtype)
        _C.ot_points_grad_cpu(DT[dtype], cost, B, n, m, reg, f.data_ptr(), g.data_ptr(), 0, 0, 0, dx.data_ptr(),
                              dy.data_ptr(), 2)
        wdx, wdy = R.points_grad_reference(kind, p, x.double(), y.double().expand(B, m, D), reg, f.double(), g.double())
        assert _rel(dx, wdx) <= TOL[dtype] and _rel(dy, wdy) <= TOL[dtype], kind
