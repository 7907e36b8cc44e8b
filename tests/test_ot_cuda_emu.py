"""The ot family's CUDA kernels (csrc/cuda/ot.cu) under the CUDA host emulation (tests/cuda_emu):
every kk_ot_*_cuda entry point of csrc/include/kernelkit/ot.h against the float64 oracle of
python/kernelkit/ot/reference.py, in float32 and float64, outputs NaN-poisoned, on every variant of the
launch plan.  No GPU needed: the emulation runs each CUDA thread as a fiber with real barriers and
NaN-poisoned shared memory (tests/cuda_emu/include/kkemu.h).

The plan: the row engine ot_rows_kernel<T, OP, PTS> (8 rows per CTA, 32-column tiles; PTS: point
coordinates staged in chunks of 32) for the LSE / sum / gradient ops on rows, and on the columns of point
clouds (swapped clouds); the column engine ot_cols_kernel<T, OP> for the columns of a dense C; the radix
select of ot_sparsify_kernel; the hvp and cg kernels.  The cases are small but odd and cross every tile:
n, m up to 41 (more than one 8-row block and one 32-column tile), D = 40 (two coordinate chunks), batch
2-3 with shared (batch stride 0) and padded (ld > m) costs.  test_every_plan_variant_is_reached checks
the launch records.  The reference module is loaded from its file, so this test needs no kernelkit build.
"""
from __future__ import annotations

import ctypes
import importlib.util
import re
from pathlib import Path

import pytest
import torch

from cuda_emu import load
from helpers import TOL, assert_close

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("ot_reference", ROOT / "python" / "kernelkit" / "ot" / "reference.py")
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)

KK = {torch.float32: 0, torch.float64: 1}
I64, I32, PTR, DBL = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p, ctypes.c_double
OK, NULL_POINTER, INVALID_SIZE, INVALID_ARGUMENT, UNSUPPORTED_DTYPE = 0, 1, 2, 3, 4
MATRIX, SQEUCLIDEAN, EUCLIDEAN_POW, MINKOWSKI_POW = 0, 1, 2, 3
NORM_INF, NORM_L1, NORM_L2 = 0, 1, 2
DTYPES = [torch.float32, torch.float64]
DTYPE_IDS = ["float32", "float64"]
INF = float("inf")


class Cost(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("dim", ctypes.c_int32), ("p", ctypes.c_double), ("matrix", PTR),
                ("ld", I64), ("batch_stride", I64), ("x", PTR), ("x_batch_stride", I64), ("y", PTR),
                ("y_batch_stride", I64)]


@pytest.fixture(scope="module")
def emu():
    e = load()
    L = e.lib
    C = ctypes.POINTER(Cost)
    L.kk_ot_sinkhorn_step_cuda.argtypes = [I32, C, I64, I64, I64, I32, DBL, PTR, PTR, PTR, PTR, PTR, I32, PTR]
    L.kk_ot_marginals_cuda.argtypes = [I32, C, I64, I64, I64, DBL, PTR, PTR, PTR, PTR, PTR, PTR, PTR, PTR, PTR, PTR]
    L.kk_ot_plan_cuda.argtypes = [I32, C, I64, I64, I64, DBL, PTR, PTR, PTR, I64, PTR]
    L.kk_ot_sparsify_cuda.argtypes = [I32, C, I64, I64, I64, I64, DBL, PTR, PTR, PTR, PTR, PTR]
    L.kk_ot_hvp_cuda.argtypes = [I32, I64, I64, I64, I64, PTR, PTR, PTR, PTR, DBL, PTR, PTR, PTR, PTR, PTR]
    L.kk_ot_cg_cuda_workspace_size.argtypes = [I32, I64, I64, I64, ctypes.POINTER(I64)]
    L.kk_ot_cg_cuda.argtypes = [I32, I64, I64, I64, I64, PTR, PTR, PTR, PTR, DBL, PTR, PTR, PTR, PTR, DBL, I32, PTR,
                                PTR, PTR, I64, PTR]
    L.kk_ot_points_grad_cuda.argtypes = [I32, C, I64, I64, I64, DBL, PTR, PTR, PTR, PTR, PTR, PTR, PTR, PTR]
    e.set_device("h100")
    yield e
    e.set_device("h100")
    e.set_schedule("forward")


def _p(t):
    return PTR(0 if t is None else t.data_ptr())


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


# ---- problems --------------------------------------------------------------------------------------------
class Problem:
    """A batch of problems in `dtype`: the cost (a dense C, possibly row-padded or shared by the batch, or point
    clouds), weights a, b (zeros: some zero weights, whose potentials are -inf) and potentials f, g; the
    float64 copies the reference uses are made from the same rounded values."""

    def __init__(self, kind, B, n, m, dtype, D=0, p=2.0, reg=0.5, seed=0, zeros=False, shared=False, pad=0):
        g = torch.Generator().manual_seed(seed)
        self.kind, self.B, self.n, self.m, self.D, self.p, self.reg, self.dtype = kind, B, n, m, D, p, reg, dtype
        self.mat = self.x = self.y = None
        if kind == MATRIX:
            buf = torch.rand(1 if shared else B, n, m + pad, generator=g).to(dtype)
            self.mat = buf
            self.C64 = buf[:, :, :m].double().expand(B, n, m)
            self.cost = Cost(kind=MATRIX, dim=0, p=0.0, matrix=buf.data_ptr(), ld=m + pad,
                             batch_stride=0 if shared else n * (m + pad))
        else:
            self.x = torch.rand(B, n, D, generator=g).to(dtype)
            self.y = torch.rand(1 if shared else B, m, D, generator=g).to(dtype)
            self.y64 = self.y.double().expand(B, m, D)
            self.C64 = R.point_cost(kind, p, self.x.double(), self.y64)
            self.cost = Cost(kind=kind, dim=D, p=p, x=self.x.data_ptr(), x_batch_stride=n * D,
                             y=self.y.data_ptr(), y_batch_stride=0 if shared else m * D)
        self.a = (0.5 + torch.rand(B, n, generator=g)) / n
        self.b = (0.5 + torch.rand(B, m, generator=g)) / m
        if zeros:
            self.a[:, 1::5] = 0
            self.b[0, 2] = 0
        self.a, self.b = self.a.to(dtype), self.b.to(dtype)
        scale = float(self.C64.mean()) if self.C64.numel() else 0.0
        self.f = (0.5 * scale + 0.3 * torch.randn(B, n, generator=g)).to(dtype)
        self.g = (0.5 * scale + 0.3 * torch.randn(B, m, generator=g)).to(dtype)
        self.f[self.a == 0] = -INF
        self.g[self.b == 0] = -INF

    def d(self, name):
        t = getattr(self, name)
        return None if t is None else t.double()

    def ref_points(self):
        return self.x.double(), self.y64


def _close(got, want, dtype, what, tol=None):
    """Infinite entries must match exactly (sign included); the finite ones by relative error."""
    got64 = got.double()
    inf = torch.isinf(want)
    assert torch.equal(got64[inf], want[inf]), f"{what}: infinite entries differ"
    got64, want = got64[~inf], want[~inf]
    if want.numel() == 0:
        return
    if float(want.abs().max()) == 0.0:
        assert float(got64.abs().max()) == 0.0, f"{what} must be zero"
    elif tol is None:
        assert_close(got64, want, dtype, what)
    else:
        from helpers import rel_err
        err = rel_err(got64, want)
        assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


# (id, kind, B, n, m, D, p, reg, zeros, shared, pad)
CASES = [
    ("matrix", MATRIX, 2, 37, 41, 0, 2.0, 0.3, False, False, 0),
    ("matrix-pad-shared-zeros", MATRIX, 3, 9, 20, 0, 2.0, 0.1, True, True, 5),
    ("sqeuclid-d2", SQEUCLIDEAN, 2, 41, 35, 2, 2.0, 0.05, True, False, 0),
    ("euclid-p1-d40", EUCLIDEAN_POW, 2, 17, 39, 40, 1.0, 0.5, False, False, 0),
    ("euclid-p3-shared", EUCLIDEAN_POW, 2, 12, 7, 3, 3.0, 0.2, False, True, 0),
    ("minkowski-p1.5-d40", MINKOWSKI_POW, 1, 33, 9, 40, 1.5, 2.0, True, False, 0),
    ("minkowski-p1", MINKOWSKI_POW, 2, 8, 40, 5, 1.0, 0.3, False, False, 0),
]
CASE_IDS = [c[0] for c in CASES]
POINT_CASES = [c for c in CASES if c[1] != MATRIX]


def _problem(case, dtype, seed=0):
    _, kind, B, n, m, D, p, reg, zeros, shared, pad = case
    return Problem(kind, B, n, m, dtype, D=D, p=p, reg=reg, seed=seed, zeros=zeros, shared=shared, pad=pad)


# ---- calls -----------------------------------------------------------------------------------------------
def step(emu, pb, axis, err_norm=NORM_L1, with_err=True, alias=False):
    nr = pb.n if axis == 0 else pb.m
    w, other, pot = (pb.a, pb.g, pb.f) if axis == 0 else (pb.b, pb.f, pb.g)
    out = pot.clone() if alias else _nan((pb.B, nr), pb.dtype)
    err = _nan((pb.B,), pb.dtype) if with_err else None
    st = emu.lib.kk_ot_sinkhorn_step_cuda(KK[pb.dtype], ctypes.byref(pb.cost), pb.B, pb.n, pb.m, axis, pb.reg, _p(w),
                                          _p(other), _p(out if alias else pot), _p(out), _p(err), err_norm, None)
    assert st == OK, emu.last_error()
    return out, err


def marginals(emu, pb, weights=False, want=(True, True, True)):
    g = torch.Generator().manual_seed(7)
    wr = (0.5 + torch.rand(pb.B, pb.n, generator=g)).to(pb.dtype) if weights else None
    wc = (0.5 + torch.rand(pb.B, pb.m, generator=g)).to(pb.dtype) if weights else None
    r, c, obj = _nan((pb.B, pb.n), pb.dtype), _nan((pb.B, pb.m), pb.dtype), _nan((pb.B,), pb.dtype)
    st = emu.lib.kk_ot_marginals_cuda(KK[pb.dtype], ctypes.byref(pb.cost), pb.B, pb.n, pb.m, pb.reg, _p(pb.f),
                                      _p(pb.g), _p(pb.a), _p(pb.b), _p(wr), _p(wc), _p(r if want[0] else None),
                                      _p(c if want[1] else None), _p(obj if want[2] else None), None)
    assert st == OK, emu.last_error()
    return r, c, obj, wr, wc


def sparsify(emu, pb, k):
    cols = torch.full((pb.B, pb.n, k), -7, dtype=torch.int32)
    vals = _nan((pb.B, pb.n, k), pb.dtype)
    st = emu.lib.kk_ot_sparsify_cuda(KK[pb.dtype], ctypes.byref(pb.cost), pb.B, pb.n, pb.m, k, pb.reg, _p(pb.f),
                                     _p(pb.g), _p(cols), _p(vals), None)
    assert st == OK, emu.last_error()
    return cols, vals


def points_grad(emu, pb, scale=None, u=None, v=None):
    dx, dy = _nan((pb.B, pb.n, pb.D), pb.dtype), _nan((pb.B, pb.m, pb.D), pb.dtype)
    st = emu.lib.kk_ot_points_grad_cuda(KK[pb.dtype], ctypes.byref(pb.cost), pb.B, pb.n, pb.m, pb.reg, _p(pb.f),
                                        _p(pb.g), _p(scale), _p(u), _p(v), _p(dx), _p(dy), None)
    assert st == OK, emu.last_error()
    return dx, dy


# ---- sinkhorn_step, marginals, plan ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_emulated_cuda_sinkhorn_step_matches_reference(emu, case, dtype):
    pb = _problem(case, dtype)
    for axis in (0, 1):
        w, other, pot = (pb.a, pb.g, pb.f) if axis == 0 else (pb.b, pb.f, pb.g)
        for norm in (NORM_L1, NORM_L2, NORM_INF) if axis == 1 else (NORM_L1,):
            out, err = step(emu, pb, axis, norm)
            want, werr = R.sinkhorn_step_reference(pb.C64, axis, pb.reg, w.double(), other.double(), pot.double(),
                                                   norm)
            _close(out, want, dtype, f"{case[0]} axis {axis} pot_new")
            _close(err, werr, dtype, f"{case[0]} axis {axis} err (norm {norm})")


@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=[CASES[0][0], CASES[2][0]])
def test_emulated_cuda_sinkhorn_step_in_place_and_without_err(emu, case):
    pb = _problem(case, torch.float64, seed=3)
    for axis in (0, 1):
        w, other, pot = (pb.a, pb.g, pb.f) if axis == 0 else (pb.b, pb.f, pb.g)
        want, werr = R.sinkhorn_step_reference(pb.C64, axis, pb.reg, w.double(), other.double(), pot.double(), NORM_L1)
        out, err = step(emu, pb, axis, alias=True)  # pot_new aliases pot
        _close(out, want, pb.dtype, "in place")
        _close(err, werr, pb.dtype, "in place err")
        out, _ = step(emu, pb, axis, with_err=False)
        _close(out, want, pb.dtype, "no err")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_emulated_cuda_marginals_match_reference(emu, case, dtype):
    pb = _problem(case, dtype, seed=1)
    for weights in (False, True):
        r, c, obj, wr, wc = marginals(emu, pb, weights)
        rr, rc, robj = R.marginals_reference(pb.C64, pb.reg, pb.d("f"), pb.d("g"), pb.d("a"), pb.d("b"),
                                             None if wr is None else wr.double(), None if wc is None else wc.double())
        _close(r, rr, dtype, f"{case[0]} r")
        _close(c, rc, dtype, f"{case[0]} c")
        _close(obj, robj, dtype, f"{case[0]} obj")


def test_emulated_cuda_marginals_compute_only_what_is_asked(emu):
    pb = _problem(CASES[0], torch.float64)
    rr, rc, robj = R.marginals_reference(pb.C64, pb.reg, pb.d("f"), pb.d("g"), pb.d("a"), pb.d("b"))
    for want in ((True, False, False), (False, True, False), (False, False, True)):
        r, c, obj, _, _ = marginals(emu, pb, want=want)
        for got, ref, asked in ((r, rr, want[0]), (c, rc, want[1]), (obj, robj, want[2])):
            if asked:
                _close(got, ref, pb.dtype, f"{want}")
            else:
                assert torch.isnan(got).all(), f"{want}: wrote an output it was not asked for"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=[CASES[1][0], CASES[3][0], CASES[5][0]])
def test_emulated_cuda_plan_matches_reference(emu, case, dtype):
    pb = _problem(case, dtype, seed=2)
    ldp = pb.m + 3
    buf = _nan((pb.B, pb.n, ldp), dtype)
    st = emu.lib.kk_ot_plan_cuda(KK[dtype], ctypes.byref(pb.cost), pb.B, pb.n, pb.m, pb.reg, _p(pb.f), _p(pb.g),
                                 _p(buf), ldp, None)
    assert st == OK, emu.last_error()
    _close(buf[:, :, :pb.m], R.plan_reference(pb.C64, pb.reg, pb.d("f"), pb.d("g")), dtype, f"{case[0]} plan")
    assert torch.isnan(buf[:, :, pb.m:]).all(), "plan: written past the row"


# ---- sparsify --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_emulated_cuda_sparsify_matches_reference(emu, case, dtype):
    pb = _problem(case, dtype, seed=4)
    for k in sorted({1, min(5, pb.m), pb.m}):
        cols, vals = sparsify(emu, pb, k)
        assert (cols[..., 1:] > cols[..., :-1]).all(), "columns not strictly increasing"
        assert ((cols >= 0) & (cols < pb.m)).all()
        P = R.plan_reference(pb.C64, pb.reg, pb.d("f"), pb.d("g"))
        if pb.kind == MATRIX:  # one rounded subtraction per key, in the dtype: the ranking is exact
            rc, _ = R.sparsify_reference(pb.C64.to(dtype), pb.reg, pb.f, pb.g, k)
            assert torch.equal(cols, rc), f"{case[0]} k={k}: columns differ"
        else:  # keys from a float64 cost: a valid top-k (ties within rounding of the cost)
            key = pb.g.double()[:, None, :] - pb.C64
            kept = torch.zeros_like(key, dtype=torch.bool).scatter_(2, cols.long(), True)
            lo = key.masked_fill(~kept, INF).amin(2)
            hi = key.masked_fill(kept, -INF).amax(2)
            slack = 1e-12 if dtype == torch.float64 else 1e-5 * (1 + float(pb.C64.abs().max()))
            assert (lo >= hi - slack).all(), f"{case[0]} k={k}: not the top k"
        want_vals = torch.gather(P, 2, cols.long())
        _close(vals, want_vals, dtype, f"{case[0]} k={k} vals")


def test_emulated_cuda_sparsify_tie_rule(emu):
    """Equal keys: the smaller column first; NaN keys rank as -inf, -inf ties too; a -inf f_i gives 0 values."""
    for dtype in DTYPES:
        B, n, m = 1, 4, 37
        C = torch.zeros(B, n, m, dtype=dtype)
        C[0, 0] = torch.tensor([1.0, 0.5] * 18 + [0.5], dtype=dtype)      # row 0: many equal keys
        C[0, 1, ::3] = float("nan")                                        # row 1: NaN keys
        C[0, 2, :] = INF                                                   # row 2: all -inf keys
        C[0, 3] = torch.arange(m, dtype=dtype).flip(0) * 0.25              # row 3: distinct keys
        f = torch.tensor([[0.0, 0.1, 0.2, -INF]], dtype=dtype)
        g = torch.zeros(B, m, dtype=dtype)
        g[0, 30] = -INF
        g[0, 5] = -0.0
        cost = Cost(kind=MATRIX, dim=0, p=0.0, matrix=C.data_ptr(), ld=m, batch_stride=n * m)
        for k in (1, 7, 20, m):
            cols = torch.full((B, n, k), -7, dtype=torch.int32)
            vals = _nan((B, n, k), dtype)
            st = emu.lib.kk_ot_sparsify_cuda(KK[dtype], ctypes.byref(cost), B, n, m, k, 0.5, _p(f), _p(g), _p(cols),
                                             _p(vals), None)
            assert st == OK, emu.last_error()
            rc, rv = R.sparsify_reference(C, 0.5, f, g, k)
            assert torch.equal(cols, rc), f"k={k}: {cols} != {rc}"
            want = torch.nan_to_num(rv.double(), nan=0.0)
            want[0, 3] = 0.0  # f = -inf
            assert torch.equal(torch.isnan(vals), torch.isnan(rv) & (torch.arange(n).view(1, n, 1) != 3))
            ok = ~torch.isnan(vals)
            assert torch.allclose(vals[ok].double(), want[ok], rtol=TOL[dtype], atol=0), f"k={k}: vals"


# ---- hvp and cg ------------------------------------------------------------------------------------------
def _sparse_system(B, n, m, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    cols = torch.stack([torch.stack([torch.randperm(m, generator=g)[:k].sort().values for _ in range(n)])
                        for _ in range(B)]).to(torch.int32)
    vals = (torch.rand(B, n, k, generator=g) / (n * k)).to(dtype)
    # the full plan's marginals dominate the kept entries (the SNS Hessian keeps its full diagonal)
    r = (vals.double().sum(2) * (1.5 + torch.rand(B, n, generator=g))).to(dtype)
    c = (torch.zeros(B, m, dtype=torch.float64).scatter_add_(1, cols.long().flatten(1), vals.double().flatten(1))
         * 1.5 + torch.rand(B, m, generator=g) / (n * m)).to(dtype)
    return cols, vals, r, c


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B,n,m,k,shift", [(2, 37, 41, 5, 0.0), (3, 9, 33, 33, 0.25), (1, 40, 3, 1, 1e-3)])
def test_emulated_cuda_hvp_matches_reference(emu, B, n, m, k, shift, dtype):
    cols, vals, r, c = _sparse_system(B, n, m, k, dtype, seed=n)
    g = torch.Generator().manual_seed(1)
    vx, vy = torch.randn(B, n, generator=g).to(dtype), torch.randn(B, m, generator=g).to(dtype)
    yx, yy = _nan((B, n), dtype), _nan((B, m), dtype)
    st = emu.lib.kk_ot_hvp_cuda(KK[dtype], B, n, m, k, _p(cols), _p(vals), _p(r), _p(c), shift, _p(vx), _p(vy),
                                _p(yx), _p(yy), None)
    assert st == OK, emu.last_error()
    rx, ry = R.hvp_reference(cols, vals.double(), r.double(), c.double(), shift, vx.double(), vy.double())
    _close(yx, rx, dtype, "yx")
    _close(yy, ry, dtype, "yy")


def cg(emu, dtype, cols, vals, r, c, shift, rhs_x, rhs_y, z0x, z0y, tol, max_iter):
    B, n = rhs_x.shape
    m, k = rhs_y.shape[1], cols.shape[2]
    nb = I64(-1)
    assert emu.lib.kk_ot_cg_cuda_workspace_size(KK[dtype], B, n, m, ctypes.byref(nb)) == OK
    ws = torch.full((nb.value + 16,), 255, dtype=torch.uint8)  # garbage (NaN), 16-byte aligned view
    base = ws.data_ptr() + (-ws.data_ptr()) % 16
    zx, zy = z0x.clone(), z0y.clone()
    iters = torch.full((B,), -5, dtype=torch.int32)
    resid = _nan((B,), dtype)
    st = emu.lib.kk_ot_cg_cuda(KK[dtype], B, n, m, k, _p(cols), _p(vals), _p(r), _p(c), shift, _p(rhs_x), _p(rhs_y),
                               _p(zx), _p(zy), tol, max_iter, _p(iters), _p(resid), PTR(base), nb.value, None)
    assert st == OK, emu.last_error()
    return zx, zy, iters, resid


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_emulated_cuda_cg_matches_reference(emu, dtype):
    """Three problems: a warm start, a zero rhs (z = 0 in 0 iterations), and a cold start; then the same
    with max_iter = 3 (each problem stops on its own count)."""
    B, n, m, k, shift = 3, 21, 38, 4, 0.05
    cols, vals, r, c = _sparse_system(B, n, m, k, dtype, seed=5)
    g = torch.Generator().manual_seed(2)
    rhs_x, rhs_y = torch.randn(B, n, generator=g).to(dtype), torch.randn(B, m, generator=g).to(dtype)
    rhs_x[1], rhs_y[1] = 0, 0
    z0x, z0y = (0.1 * torch.randn(B, n, generator=g)).to(dtype), (0.1 * torch.randn(B, m, generator=g)).to(dtype)
    z0x[2], z0y[2] = 0, 0
    d = lambda t: t.double()  # noqa: E731
    tol = 1e-10 if dtype == torch.float64 else 1e-6
    zx, zy, iters, resid = cg(emu, dtype, cols, vals, r, c, shift, rhs_x, rhs_y, z0x, z0y, tol, 200)
    assert iters[1] == 0 and resid[1] == 0 and (zx[1] == 0).all() and (zy[1] == 0).all()
    assert (resid[[0, 2]].double() <= tol).all(), f"not converged: {resid}"
    if dtype == torch.float64:  # the same iterations as the reference at the same tolerance
        wx, wy, wit, wres = R.cg_reference(cols, d(vals), d(r), d(c), shift, d(rhs_x), d(rhs_y), d(z0x), d(z0y),
                                           tol, 200)
        assert iters.tolist() == wit.tolist(), f"iterations {iters.tolist()} vs reference {wit.tolist()}"
    else:  # float32 to 1e-6: the float64 solution to 1e-12
        wx, wy, _, _ = R.cg_reference(cols, d(vals), d(r), d(c), shift, d(rhs_x), d(rhs_y), d(z0x), d(z0y),
                                      1e-12, 200)
    _close(torch.cat([zx, zy], 1), torch.cat([wx, wy], 1), dtype, "z")
    # a budget of 3 iterations: the reference's z after exactly 3 iterations
    zx, zy, iters, resid = cg(emu, dtype, cols, vals, r, c, shift, rhs_x, rhs_y, z0x, z0y, 1e-14, 3)
    wx, wy, wit, wres = R.cg_reference(cols, d(vals), d(r), d(c), shift, d(rhs_x), d(rhs_y), d(z0x), d(z0y), 1e-14, 3)
    assert iters.tolist() == wit.tolist() == [3, 0, 3]
    _close(torch.cat([zx, zy], 1), torch.cat([wx, wy], 1), dtype, "z after 3 iterations")
    _close(resid, wres, dtype, "resid after 3 iterations")
    # max_iter = 0: z0 back, the initial residual
    zx, zy, iters, resid = cg(emu, dtype, cols, vals, r, c, shift, rhs_x, rhs_y, z0x, z0y, 1e-14, 0)
    assert iters.tolist() == [0, 0, 0] and torch.equal(zx[0], z0x[0])
    _, _, _, wres = R.cg_reference(cols, d(vals), d(r), d(c), shift, d(rhs_x), d(rhs_y), d(z0x), d(z0y), 1e-14, 0)
    _close(resid, wres, dtype, "initial residual")


# ---- points_grad -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", POINT_CASES, ids=[c[0] for c in POINT_CASES])
def test_emulated_cuda_points_grad_matches_reference(emu, case, dtype):
    pb = _problem(case, dtype, seed=6)
    g = torch.Generator().manual_seed(3)
    scale = (1 + torch.rand(pb.B, generator=g)).to(dtype)
    u, v = (0.1 * torch.randn(pb.B, pb.n, generator=g)).to(dtype), (0.1 * torch.randn(pb.B, pb.m, generator=g)).to(dtype)
    x64, y64 = pb.ref_points()
    for extra in ((None, None, None), (scale, u, v)):
        dx, dy = points_grad(emu, pb, *extra)
        wdx, wdy = R.points_grad_reference(pb.kind, pb.p, x64, y64, pb.reg, pb.d("f"), pb.d("g"),
                                           *[None if t is None else t.double() for t in extra])
        if pb.y.shape[0] == 1 and pb.B > 1:
            pass  # dy of a shared cloud is still per problem (batch, m, dim): compared as is
        _close(dx, wdx, dtype, f"{case[0]} dx")
        _close(dy, wdy, dtype, f"{case[0]} dy")


# ---- thread order, launch plan ---------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["reverse", "shuffle"])
def test_emulated_cuda_is_independent_of_thread_order(emu, schedule):
    emu.set_schedule(schedule, seed=5)
    try:
        for case in (CASES[0], CASES[3]):
            pb = _problem(case, torch.float64)
            for axis in (0, 1):
                w, other, pot = (pb.a, pb.g, pb.f) if axis == 0 else (pb.b, pb.f, pb.g)
                out, err = step(emu, pb, axis)
                want, werr = R.sinkhorn_step_reference(pb.C64, axis, pb.reg, w.double(), other.double(),
                                                       pot.double(), NORM_L1)
                _close(out, want, pb.dtype, f"{schedule} pot_new")
                _close(err, werr, pb.dtype, f"{schedule} err")
            r, c, obj, _, _ = marginals(emu, pb)
            rr, rc, robj = R.marginals_reference(pb.C64, pb.reg, pb.d("f"), pb.d("g"), pb.d("a"), pb.d("b"))
            _close(c, rc, pb.dtype, f"{schedule} c")
            _close(obj, robj, pb.dtype, f"{schedule} obj")
            cols, vals = sparsify(emu, pb, 5)
            rc_, rv_ = R.sparsify_reference(pb.C64, pb.reg, pb.d("f"), pb.d("g"), 5)
            assert torch.equal(cols, rc_)
        pb = _problem(CASES[3], torch.float64)
        dx, dy = points_grad(emu, pb)
        wdx, wdy = R.points_grad_reference(pb.kind, pb.p, *pb.ref_points(), pb.reg, pb.d("f"), pb.d("g"))
        _close(dx, wdx, pb.dtype, f"{schedule} dx")
        _close(dy, wdy, pb.dtype, f"{schedule} dy")
    finally:
        emu.set_schedule("forward")


_NAME = re.compile(r"(ot_\w+_kernel)<(float|double)(?:, (\d), (true|false))?(?:, (\d))?>")


def test_every_plan_variant_is_reached(emu):
    """Every kernel instantiation, for both dtypes: the row engine for LSE / sums / gradient on dense and
    point costs, the column engine for LSE / sums, the L2 sqrt, the objective, plan, sparsify, hvp, cg; and
    the CASES cross the tiles (several 8-row blocks and 32-column tiles, two coordinate chunks, batch > 1)."""
    seen = set()
    for dtype in DTYPES:
        for case in CASES:
            pb = _problem(case, dtype)
            emu.clear_launches()
            for axis in (0, 1):
                step(emu, pb, axis, NORM_L2)
            marginals(emu, pb)
            sparsify(emu, pb, 3)
            if pb.kind != MATRIX:
                points_grad(emu, pb)
            B, n, m, k = pb.B, pb.n, pb.m, 3
            cols, vals, r, c = _sparse_system(B, n, m, k, dtype)
            rhs_x, rhs_y = torch.randn(B, n).to(dtype), torch.randn(B, m).to(dtype)
            cg(emu, dtype, cols, vals, r, c, 0.1, rhs_x, rhs_y, torch.zeros_like(rhs_x), torch.zeros_like(rhs_y),
               1e-6, 2)
            for la in emu.launches():
                mt = _NAME.search(la["name"])
                assert mt, la["name"]
                seen.add((mt.group(1), mt.group(2), mt.group(3) or mt.group(5), mt.group(4)))
                if mt.group(1) == "ot_rows_kernel":
                    seen.add(("row blocks > 1", la["grid"][0] > 1))
                    seen.add(("batch > 1", la["grid"][1] > 1))
                if mt.group(1) == "ot_cols_kernel":
                    seen.add(("column tiles > 1", la["grid"][0] > 1))
        seen.add(("coordinate chunks > 1", any(c[5] > 32 for c in CASES)))
        seen.add(("column tiles > 1 in the row engine", any(max(c[3], c[4]) > 32 for c in CASES)))
    want = {("row blocks > 1", True), ("row blocks > 1", False), ("batch > 1", True), ("batch > 1", False),
            ("column tiles > 1", True), ("column tiles > 1", False), ("coordinate chunks > 1", True),
            ("column tiles > 1 in the row engine", True)}
    for t in ("float", "double"):
        for op, pts in (("0", "false"), ("0", "true"), ("1", "false"), ("1", "true"), ("2", "true")):
            want.add(("ot_rows_kernel", t, op, pts))
        for op in ("0", "1"):
            want.add(("ot_cols_kernel", t, op, None))
        for kname in ("ot_sqrt_kernel", "ot_obj_init_kernel", "ot_sparsify_kernel", "ot_hvp_init_kernel",
                      "ot_hvp_rows_kernel", "ot_cg_vec_kernel", "ot_cg_scalar_kernel", "ot_cg_final_kernel"):
            want.add((kname, t, None, None))
    assert want <= seen, f"never reached: {sorted(want - seen, key=str)}"


# ---- empty sizes and bad arguments -----------------------------------------------------------------------
def test_empty_sizes_need_no_pointers_and_follow_the_conventions(emu):
    cost = Cost(kind=MATRIX, dim=0, p=0.0, matrix=None, ld=0, batch_stride=0)
    L = emu.lib
    assert L.kk_ot_sinkhorn_step_cuda(0, ctypes.byref(cost), 0, 5, 0, 0, 1.0, None, None, None, None, None, 1, None) == OK
    assert L.kk_ot_plan_cuda(1, ctypes.byref(cost), 2, 0, 0, 1.0, None, None, None, 0, None) == OK
    assert L.kk_ot_sparsify_cuda(1, ctypes.byref(cost), 2, 3, 0, 0, 1.0, None, None, None, None, None) == OK
    # m = 0: the LSE of an empty set is -inf, so pot_new = +inf (w > 0) or -inf (w = 0); err = |0 - w|
    w = torch.tensor([[0.5, 0.0, 0.25]], dtype=torch.float64)
    pot = torch.zeros(1, 3, dtype=torch.float64)
    out, err = _nan((1, 3), torch.float64), _nan((1,), torch.float64)
    assert L.kk_ot_sinkhorn_step_cuda(1, ctypes.byref(cost), 1, 3, 0, 0, 1.0, _p(w), None, _p(pot), _p(out), _p(err),
                                      NORM_L1, None) == OK, emu.last_error()
    assert out.tolist() == [[INF, -INF, INF]] and err.tolist() == [0.75]
    # n = 0 on axis 0: nothing to write but err = 0
    err = _nan((2,), torch.float32)
    cost4 = Cost(kind=MATRIX, dim=0, p=0.0, matrix=None, ld=4, batch_stride=0)
    assert L.kk_ot_sinkhorn_step_cuda(0, ctypes.byref(cost4), 2, 0, 4, 0, 1.0, None, None, None, None, _p(err), 0,
                                      None) == OK, emu.last_error()
    assert err.tolist() == [0.0, 0.0]
    # marginals with m = 0: r = 0, obj = <a, f>
    a, f = torch.tensor([[0.5, 0.0]], dtype=torch.float64), torch.tensor([[2.0, -INF]], dtype=torch.float64)
    r, obj = _nan((1, 2), torch.float64), _nan((1,), torch.float64)
    assert L.kk_ot_marginals_cuda(1, ctypes.byref(cost), 1, 2, 0, 1.0, _p(f), None, _p(a), None, None, None, _p(r),
                                  None, _p(obj), None) == OK, emu.last_error()
    assert r.tolist() == [[0.0, 0.0]] and obj.tolist() == [1.0]


def _bad_step(emu, pb, **over):
    args = dict(dtype=KK[pb.dtype], cost=ctypes.byref(pb.cost), batch=pb.B, n=pb.n, m=pb.m, axis=0, reg=pb.reg,
                w=_p(pb.a), other=_p(pb.g), pot=_p(pb.f), pot_new=None, err=None, norm=1)
    out = _nan((pb.B, pb.n), pb.dtype)
    args["pot_new"] = _p(out)
    args.update(over)
    st = emu.lib.kk_ot_sinkhorn_step_cuda(*args.values(), None)
    assert torch.isnan(out).all(), "a rejected call wrote its output"
    return st


def test_bad_arguments_return_a_status_and_write_nothing(emu):
    pb = _problem(CASES[0], torch.float64)
    pts = _problem(CASES[2], torch.float64)
    err = _nan((pb.B,), pb.dtype)
    cases = [
        (dict(dtype=2), UNSUPPORTED_DTYPE, "dtype"),
        (dict(batch=-1), INVALID_SIZE, "must be >= 0"),
        (dict(reg=0.0), INVALID_ARGUMENT, "reg"),
        (dict(reg=float("nan")), INVALID_ARGUMENT, "reg"),
        (dict(axis=2), INVALID_ARGUMENT, "axis"),
        (dict(norm=3), INVALID_ARGUMENT, "err_norm"),
        (dict(cost=None), NULL_POINTER, "cost"),
        (dict(w=PTR(0)), NULL_POINTER, "w"),
        (dict(other=PTR(0)), NULL_POINTER, "other"),
        (dict(pot=PTR(0), err=_p(err)), NULL_POINTER, "pot"),
    ]
    for over, status, needle in cases:
        st = _bad_step(emu, pb, **over)
        assert st == status and needle in emu.last_error(), (over, st, emu.last_error())
    for field, value, status, needle in [("ld", pb.m - 1, INVALID_ARGUMENT, "ld"),
                                         ("batch_stride", -1, INVALID_ARGUMENT, "batch_stride"),
                                         ("matrix", None, NULL_POINTER, "matrix"),
                                         ("kind", 7, INVALID_ARGUMENT, "kind")]:
        c = Cost.from_buffer_copy(pb.cost)
        setattr(c, field, value)
        st = _bad_step(emu, pb, cost=ctypes.byref(c))
        assert st == status and needle in emu.last_error(), (field, st, emu.last_error())
    for field, value, status, needle in [("dim", 0, INVALID_SIZE, "dim"), ("dim", 1025, INVALID_SIZE, "dim"),
                                         ("y", None, NULL_POINTER, "cost.y"),
                                         ("x_batch_stride", -2, INVALID_ARGUMENT, "batch_stride")]:
        c = Cost.from_buffer_copy(pts.cost)
        setattr(c, field, value)
        st = _bad_step(emu, pts, cost=ctypes.byref(c))
        assert st == status and needle in emu.last_error(), (field, st, emu.last_error())
    for kind, p in ((EUCLIDEAN_POW, 0.0), (MINKOWSKI_POW, 0.5), (MINKOWSKI_POW, INF)):
        c = Cost.from_buffer_copy(pts.cost)
        c.kind, c.p = kind, p
        assert _bad_step(emu, pts, cost=ctypes.byref(c)) == INVALID_ARGUMENT and "cost.p" in emu.last_error()
    L = emu.lib
    # sparsify: k out of range; plan: ldp < m; points_grad: a matrix cost; hvp / cg: shift, tol, workspace
    for k in (0, pb.m + 1):
        assert L.kk_ot_sparsify_cuda(1, ctypes.byref(pb.cost), pb.B, pb.n, pb.m, k, 0.5, _p(pb.f), _p(pb.g),
                                     _p(torch.zeros(1, dtype=torch.int32)), _p(err), None) == INVALID_ARGUMENT
        assert "k must be" in emu.last_error()
    assert L.kk_ot_plan_cuda(1, ctypes.byref(pb.cost), pb.B, pb.n, pb.m, 0.5, _p(pb.f), _p(pb.g), _p(err), pb.m - 1,
                             None) == INVALID_ARGUMENT and "ldp" in emu.last_error()
    assert L.kk_ot_points_grad_cuda(1, ctypes.byref(pb.cost), pb.B, pb.n, pb.m, 0.5, _p(pb.f), _p(pb.g), None, None,
                                    None, _p(err), None, None) == INVALID_ARGUMENT and "point" in emu.last_error()
    cols, vals, r, c = _sparse_system(1, 5, 6, 2, torch.float64)
    v5, v6 = torch.ones(1, 5, dtype=torch.float64), torch.ones(1, 6, dtype=torch.float64)
    assert L.kk_ot_hvp_cuda(1, 1, 5, 6, 2, _p(cols), _p(vals), _p(r), _p(c), -1.0, _p(v5), _p(v6), _p(v5.clone()),
                            _p(v6.clone()), None) == INVALID_ARGUMENT and "shift" in emu.last_error()
    assert L.kk_ot_hvp_cuda(1, 1, 5, 6, 2, None, _p(vals), _p(r), _p(c), 0.0, _p(v5), _p(v6), _p(v5.clone()),
                            _p(v6.clone()), None) == NULL_POINTER and "cols" in emu.last_error()
    nb = I64(-1)
    assert L.kk_ot_cg_cuda_workspace_size(1, 1, 5, 6, ctypes.byref(nb)) == OK and nb.value > 0
    assert L.kk_ot_cg_cuda_workspace_size(1, 1, 5, 6, None) == NULL_POINTER
    ws = torch.zeros(nb.value + 16, dtype=torch.uint8)
    base = PTR(ws.data_ptr() + (-ws.data_ptr()) % 16)
    zx, zy = v5.clone(), v6.clone()
    for over, status, needle in [(dict(tol=0.0), INVALID_ARGUMENT, "tol"), (dict(it=-1), INVALID_ARGUMENT, "max_iter"),
                                 (dict(wsb=nb.value - 1), INVALID_ARGUMENT, "workspace_bytes"),
                                 (dict(ws=PTR(0)), NULL_POINTER, "workspace"),
                                 (dict(ws=PTR(base.value + 4)), INVALID_ARGUMENT, "aligned")]:
        a = dict(tol=1e-8, it=10, wsb=nb.value, ws=base)
        a.update(over)
        st = L.kk_ot_cg_cuda(1, 1, 5, 6, 2, _p(cols), _p(vals), _p(r), _p(c), 0.0, _p(v5), _p(v6), _p(zx), _p(zy),
                             a["tol"], a["it"], None, None, a["ws"], a["wsb"], None)
        assert st == status and needle in emu.last_error(), (over, st, emu.last_error())
    assert torch.equal(zx, v5) and torch.equal(zy, v6), "a rejected cg call wrote z"
