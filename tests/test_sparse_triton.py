"""Triton sparse-linear kernels (kernels/sparse.py) against a float64 dense reference.

Without a CUDA GPU the kernels run under the Triton interpreter: TRITON_INTERPRET=1 must be set
before triton is first imported (tests/conftest.py does it; when this file runs alone it sets it
itself unless triton was already imported without it, in which case the module is skipped).  The
interpreter runs the GPU's own tile choices (kernels/sparse.py picks tiles from shapes only), so the
shapes here are chosen to reach every one of them.
"""
from __future__ import annotations

import os
import pathlib
import sys

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
if not _CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA GPU and the Triton interpreter is not enabled", allow_module_level=True)

pytest.importorskip("triton")

_REPO = pathlib.Path(__file__).resolve().parents[1]
try:
    from kernelkit.kernels import sparse as ks
except ImportError:
    sys.path.insert(0, str(_REPO))
    from kernels import sparse as ks
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from helpers import TOL, rel_err  # noqa: E402

DEVICE = "cuda" if _CUDA else "cpu"
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]


def _tol(dtype):
    # the interpreter truncates fp32 -> bf16 casts (Triton 3.9) instead of rounding: ~2x the error
    return TOL[dtype] * (2 if dtype == torch.bfloat16 and not _CUDA else 1)


def _csr(mask: torch.Tensor):
    """(row_ptr, col_idx, col_ptr, row_idx, perm) of a boolean (n_out, n_in) mask, built with torch."""
    n_out, n_in = mask.shape
    rows, cols = mask.nonzero(as_tuple=True)            # row-major: CSR order, columns increasing
    row_ptr = torch.zeros(n_out + 1, dtype=torch.int64)
    row_ptr[1:] = torch.bincount(rows, minlength=n_out).cumsum(0)
    col_ptr = torch.zeros(n_in + 1, dtype=torch.int64)
    col_ptr[1:] = torch.bincount(cols, minlength=n_in).cumsum(0)
    perm = torch.sort(cols, stable=True).indices        # stable: rows stay increasing in a column
    return row_ptr, cols.to(torch.int32), col_ptr, rows[perm].to(torch.int32), perm.to(torch.int64)


class Problem:
    """Random inputs rounded to `dtype` (on DEVICE), their exact float64 copies, and the reference."""

    def __init__(self, mask, B, dtype, seed=0, bias=True):
        g = torch.Generator().manual_seed(seed)
        n_out, n_in = mask.shape
        self.mask, self.n_out, self.n_in, self.B, self.dtype = mask, n_out, n_in, B, dtype
        self.nnz = int(mask.sum())
        idx = _csr(mask)
        self.row_ptr, self.col_idx, self.col_ptr, self.row_idx, self.perm = (t.to(DEVICE) for t in idx)
        scale = max(1.0, self.nnz / max(n_out, 1)) ** -0.5
        lo = dict(values=torch.randn(self.nnz, generator=g, dtype=torch.float64) * scale,
                  x=torch.randn(B, n_in, generator=g, dtype=torch.float64),
                  dout=torch.randn(B, n_out, generator=g, dtype=torch.float64),
                  bias=torch.randn(n_out, generator=g, dtype=torch.float64) if bias else None)
        lo = {k: (v.to(dtype) if v is not None else None) for k, v in lo.items()}
        self.values, self.x, self.dout, self.bias = (lo[k].to(DEVICE) if lo[k] is not None else None
                                                     for k in ("values", "x", "dout", "bias"))
        v64, x64, d64 = (lo[k].double() for k in ("values", "x", "dout"))
        W = torch.zeros(n_out, n_in, dtype=torch.float64)
        W[mask] = v64                                    # mask order == CSR order
        self.ref_out = x64 @ W.T + (lo["bias"].double() if bias else 0.0)
        self.ref_dx = d64 @ W
        self.ref_dvalues = (d64.T @ x64)[mask]

    def fwd(self, x=None):
        return ks.sparse_linear_fwd(self.x if x is None else x, self.values, self.row_ptr, self.col_idx,
                                    self.bias, self.n_out)

    def bwd(self, x=None, dout=None, **need):
        need = {"need_dx": True, "need_dvalues": True, **need}
        return ks.sparse_linear_bwd(self.x if x is None else x, self.values, self.row_ptr, self.col_idx,
                                    self.col_ptr, self.row_idx, self.perm,
                                    self.dout if dout is None else dout, **need)

    def check_out(self, out):
        assert out.shape == (self.B, self.n_out) and out.dtype == self.dtype and out.is_contiguous()
        assert rel_err(out, self.ref_out) <= _tol(self.dtype)

    def check_dx(self, dx):
        assert dx.shape == (self.B, self.n_in) and dx.dtype == self.dtype and dx.is_contiguous()
        assert rel_err(dx, self.ref_dx) <= _tol(self.dtype)

    def check_dvalues(self, dv):
        assert dv.shape == (self.nnz,) and dv.dtype == self.dtype
        assert rel_err(dv, self.ref_dvalues) <= _tol(self.dtype)


def _mask(n_out, n_in, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n_out, n_in, generator=g) >= sparsity


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_fwd_matches_reference(poison, dtype, sparsity):
    p = Problem(_mask(37, 53, sparsity), 19, dtype)
    assert (p.nnz == 0) == (sparsity == 1.0) and (p.nnz == 37 * 53) == (sparsity == 0.0)
    p.check_out(p.fwd())


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_bwd_matches_reference(poison, dtype, sparsity):
    p = Problem(_mask(37, 53, sparsity), 19, dtype, seed=1)
    dx, dv = p.bwd()
    p.check_dx(dx)
    p.check_dvalues(dv)


def test_sparse_all_zero_weight_gives_bias_and_zero_dx(poison):
    """nnz = 0: the forward is bias broadcast (or zeros), dx is zero, dvalues is empty."""
    p = Problem(_mask(9, 11, 1.0), 5, torch.float32)
    assert p.nnz == 0
    torch.testing.assert_close(p.fwd(), p.bias.expand(5, 9), rtol=0, atol=0)
    p.bias = None
    assert (p.fwd() == 0).all()
    dx, dv = p.bwd()
    assert (dx == 0).all() and dv.shape == (0,)


@pytest.mark.parametrize("B", [0, 1, 7, 33])
def test_sparse_batch_sizes(poison, B):
    """Batch 0 (empty outputs, dvalues zero), 1, odd, and just past one 32-row tile."""
    for sparsity in {0: (0.5, 0.99), 1: (0.5, 0.99), 7: (0.99,), 33: (0.5,)}[B]:
        p = Problem(_mask(37, 53, sparsity, seed=B), B, torch.float32, seed=B)
        out = p.fwd()
        dx, dv = p.bwd()
        if B == 0:
            assert out.shape == (0, 37) and dx.shape == (0, 53)
            assert dv.shape == (p.nnz,) and (dv == 0).all()
            continue
        p.check_out(out)
        p.check_dx(dx)
        p.check_dvalues(dv)


# Each row-kernel tile choice (kernels/sparse.py _ROWS_CFGS) with partial row groups and several
# chunks per row / group: (n_out, n_in, density) -> mean nonzeros per row ~ n_in * density.
BUCKETS = {"long": (13, 130, 0.5), "medium": (13, 200, 0.15), "short4": (37, 200, 0.05),
           "short8": (37, 200, 0.012)}


@pytest.mark.parametrize("bucket", list(BUCKETS))
def test_sparse_every_row_tile_with_empty_rows_and_columns(poison, bucket):
    n_out, n_in, density = BUCKETS[bucket]
    mask = _mask(n_out, n_in, 1 - density, seed=3)
    mask[4, : n_in // 2] = True      # one much longer row than the rest (skewed row lengths)
    mask[2] = False                  # empty rows: inside a row group, first of a group, the last row
    mask[8] = False
    mask[n_out - 1] = False
    mask[:, 5] = False               # empty columns
    mask[:, n_in - 1] = False
    p = Problem(mask, 15, torch.float32, seed=4)
    cfg_rows = ks._rows_cfg(p.nnz, n_out)
    want = dict(zip(BUCKETS, (cfg for _, cfg in ks._ROWS_CFGS)))[bucket]
    assert cfg_rows == want, "the shape no longer reaches the tile choice it is meant to test"
    p.check_out(p.fwd())
    dx, dv = p.bwd()
    p.check_dx(dx)
    p.check_dvalues(dv)
    assert (dx[:, 5] == 0).all() and (dx[:, n_in - 1] == 0).all()


def test_sparse_dx_tile_choices_cover_short_and_long_columns(poison):
    """dx runs the row kernel on the columns: a tall weight (long columns) and a wide one (short)."""
    seen = set()
    for n_out, n_in, density in [(200, 13, 0.5), (200, 37, 0.012)]:
        p = Problem(_mask(n_out, n_in, 1 - density, seed=5), 9, torch.float32, seed=5)
        seen.add(ks._rows_cfg(p.nnz, n_in)[0])
        dx, _ = p.bwd(need_dvalues=False)
        p.check_dx(dx)
    assert seen == {1, 8}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sparse_row_strided_x_and_dout(poison, dtype):
    """x and dout are column slices of wider NaN-filled buffers (row stride > width, unit inner)."""
    p = Problem(_mask(37, 53, 0.7, seed=6), 23, dtype, seed=6)
    xw = torch.full((23, 53 + 11), float("nan"), dtype=dtype, device=DEVICE)
    dw = torch.full((23, 37 + 6), float("nan"), dtype=dtype, device=DEVICE)
    xs, ds = xw[:, 4:57], dw[:, 3:40]
    xs.copy_(p.x)
    ds.copy_(p.dout)
    assert xs.stride() == (64, 1) and ds.stride() == (43, 1)
    p.check_out(p.fwd(x=xs))
    dx, dv = p.bwd(x=xs, dout=ds)
    p.check_dx(dx)
    p.check_dvalues(dv)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("sparsity", [0.5, 0.99])
def test_sparse_fwd_bias_none_and_given(poison, bias, sparsity):
    p = Problem(_mask(37, 53, sparsity, seed=7), 11, torch.float32, seed=7, bias=bias)
    assert (p.bias is None) != bias
    p.check_out(p.fwd())


@pytest.mark.parametrize("need", [(True, False), (False, True), (False, False)])
def test_sparse_bwd_partial_grads(poison, need):
    p = Problem(_mask(37, 53, 0.8, seed=8), 13, torch.float32, seed=8)
    dx, dv = p.bwd(need_dx=need[0], need_dvalues=need[1])
    if need[0]:
        p.check_dx(dx)
    else:
        assert dx is None
    if need[1]:
        p.check_dvalues(dv)
    else:
        assert dv is None


class _GridRecorder:
    """Stands in for a kernel in kernels/sparse.py, records each launch grid and runs the kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_sparse_sddmm_batch_split_is_exact_and_deterministic(poison, monkeypatch, dtype):
    """dvalues with the batch split into fp32 partials (few nonzero chunks, long batch) and without;
    the split result is bitwise the same on every call (fixed-order sum, no atomics)."""
    rec = _GridRecorder(ks._sddmm_kernel)
    monkeypatch.setattr(ks, "_sddmm_kernel", rec)
    p = Problem(_mask(17, 23, 0.7, seed=9), 150, dtype, seed=9)
    _, dv = p.bwd(need_dx=False)
    assert rec.grids[-1][1] > 1, "expected a split batch"
    p.check_dvalues(dv)
    _, dv2 = p.bwd(need_dx=False)
    assert torch.equal(dv, dv2)
    monkeypatch.setattr(ks, "_sm_count", lambda device: 0)   # target 0 programs: never split
    _, dv3 = p.bwd(need_dx=False)
    assert rec.grids[-1][1] == 1
    p.check_dvalues(dv3)


def test_sparse_batch_past_grid_axis_limit_is_sliced(poison, monkeypatch):
    """More batch tiles than grid axis 1 holds: the row kernel is launched on batch slices, and the
    SDDMM's split count is capped.  (The limit is lowered to 2 tiles so a small batch reaches it.)"""
    rows_rec, sddmm_rec = _GridRecorder(ks._spmm_rows_kernel), _GridRecorder(ks._sddmm_kernel)
    monkeypatch.setattr(ks, "_spmm_rows_kernel", rows_rec)
    monkeypatch.setattr(ks, "_sddmm_kernel", sddmm_rec)
    monkeypatch.setattr(ks, "_GRID_YZ_MAX", 2)
    p = Problem(_mask(9, 14, 0.5, seed=10), 5 * 32 + 3, torch.float32, seed=10)
    p.check_out(p.fwd())
    dx, dv = p.bwd()
    p.check_dx(dx)
    p.check_dvalues(dv)
    assert all(g[1] <= 2 for g in rows_rec.grids + sddmm_rec.grids)
    assert len(rows_rec.grids) >= 4 and sddmm_rec.grids[-1][1] == 2


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")
def test_sparse_fwd_matches_torch_sparse_csr(poison):
    """Cross-check with torch's own CSR matmul on a 99%-sparse layer (an independent implementation)."""
    p = Problem(_mask(64, 96, 0.99, seed=11), 8, torch.float64, seed=11, bias=False)
    W = torch.sparse_csr_tensor(p.row_ptr.cpu(), p.col_idx.cpu().long(), p.values.cpu(), (64, 96),
                                check_invariants=True)   # also checks the test's own CSR builder
    ref = (W @ p.x.cpu().T).T
    assert rel_err(p.fwd(), ref) <= 1e-12


# ----------------------------------------------------------------------------------------------------
def _record_sweep(monkeypatch):
    """Run aot_sweep() (meant for the GPU compiler) with both kernels' launches recorded, not run."""
    launches = []
    for name in ("_spmm_rows_kernel", "_sddmm_kernel"):
        kernel = getattr(ks, name)

        def record(*args, grid, warmup, _name=name, **kwargs):
            launches.append((_name, args, kwargs))
        monkeypatch.setattr(kernel, "run", record)
    monkeypatch.setattr(ks, "_INTERPRET", False)
    points = ks.aot_sweep()
    assert points > 0
    return launches


def _rows_config(args, kwargs):
    dtype = args[0].dtype
    return (dtype, kwargs["ROWS"], kwargs["BB"], kwargs["BK"], kwargs["HAS_PERM"], kwargs["HAS_BIAS"])


def test_aot_sweep_reaches_every_dtype_and_tile_choice(monkeypatch):
    """tests/triton_aot.py compiles what aot_sweep() launches: every dtype in AOT_DTYPES with every
    row-kernel tile (forward with / without bias, dx) and both SDDMM outputs (direct, fp32 partials)
    must be among those launches, or a GPU could meet a configuration never compiled ahead of time."""
    launches = _record_sweep(monkeypatch)
    rows = {_rows_config(a, k) for n, a, k in launches if n == "_spmm_rows_kernel"}
    sddmm = {(a[0].dtype, a[4].dtype) for n, a, k in launches if n == "_sddmm_kernel"}
    for dtype in ks.AOT_DTYPES:
        for _, (R, BB, BK, _nw) in ks._ROWS_CFGS:
            for has_perm, has_bias in [(False, False), (False, True), (True, False)]:
                assert (dtype, R, BB, BK, has_perm, has_bias) in rows
        assert (dtype, dtype) in sddmm and (dtype, torch.float32) in sddmm
    # and what random layer shapes pick is among them
    swept = {c[1:4] for c in rows}
    g = torch.Generator().manual_seed(12)
    for _ in range(200):
        n_rows = int(torch.randint(1, 70000, (1,), generator=g))
        nnz = int(torch.randint(0, 200 * n_rows, (1,), generator=g))
        assert ks._rows_cfg(nnz, n_rows)[:3] in swept


def test_aot_dtypes_are_what_the_ops_send_to_triton():
    """AOT_DTYPES must be the dtypes kernelkit.sparse.ops sends to the Triton kernels on a GPU."""
    ops = pytest.importorskip("kernelkit.sparse.ops")
    assert set(ks.AOT_DTYPES) == set(ops._SUPPORTED["triton"])
