"""Triton Monarch kernels (kernels/monarch.py) against the float64 reference.

Without a CUDA GPU the kernels run under the Triton interpreter: TRITON_INTERPRET=1 must be set
before triton is first imported (tests/conftest.py does it; when this file runs alone it sets it
itself unless triton was already imported without it, in which case the module is skipped).
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
    from kernelkit.kernels import monarch as tk
except ImportError:
    sys.path.insert(0, str(_REPO))
    from kernels import monarch as tk
try:
    from kernelkit.monarch.reference import monarch_reference
except ImportError:
    sys.path.insert(0, str(_REPO / "python"))
    from kernelkit.monarch.reference import monarch_reference

DEVICE = "cuda" if _CUDA else "cpu"

# (k, q, p, l, s, r) with l*r == k*q; none of the dims need to be multiples of 16
SHAPES = [
    (4, 6, 5, 3, 7, 8),
    (2, 8, 3, 4, 5, 4),
    (3, 10, 7, 5, 9, 6),
    (4, 16, 16, 4, 16, 16),
    (4, 8, 8, 4, 24, 8),      # MonarchLinear-like, rectangular (s > r): several n tiles
    (5, 12, 9, 3, 11, 20),    # r > 16: several m chunks, segments q/l = 4 shorter than a tile
    (2, 9, 4, 6, 5, 3),       # q % l != 0: irregular segments
    (3, 4, 5, 6, 7, 2),       # q < l: every h row in its own input block
    (1, 2, 3, 2, 3, 1),       # r == 1, k == 1
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a = a.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert a.shape == ref.shape
    assert torch.isfinite(a).all(), "non-finite entries (unwritten output?)"
    den = ref.norm().item()
    return (a - ref).norm().item() / (den if den > 0 else 1.0)


def _make(shape, B, dtype, seed=0):
    """Inputs rounded to `dtype`, plus their exact float64 copies for the reference."""
    k, q, p, l, s, r = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, k * p, generator=g, dtype=torch.float64)
    w1 = torch.randn(k, q, p, generator=g, dtype=torch.float64) / p ** 0.5
    w2 = torch.randn(l, s, r, generator=g, dtype=torch.float64) / r ** 0.5
    dout = torch.randn(B, l * s, generator=g, dtype=torch.float64)
    lo = [t.to(dtype) for t in (x, w1, w2, dout)]
    return [t.to(DEVICE) for t in lo], [t.double() for t in lo]


def _ref_all(x, w1, w2, dout):
    xr, w1r, w2r = (t.clone().requires_grad_() for t in (x, w1, w2))
    out = monarch_reference(xr, w1r, w2r)
    out.backward(dout)
    return out.detach(), xr.grad, w1r.grad, w2r.grad


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _check_fwd(shape, B, dtype, allow_tf32=False, tol=None, also_alloc=False):
    (x, w1, w2, _), (xd, w1d, w2d, _) = _make(shape, B, dtype)
    k, q, p, l, s, r = shape
    poison = _nan((B, l * s), dtype)
    out = tk.monarch_fwd(x, w1, w2, allow_tf32=allow_tf32, out=poison)
    assert out.data_ptr() == poison.data_ptr() and out.dtype == dtype
    ref = monarch_reference(xd, w1d, w2d)
    if B == 0:
        assert out.shape == (0, l * s)
        return
    assert _rel(out, ref) < (tol or TOL[dtype])
    if not also_alloc:
        return
    # default path allocates
    out2 = tk.monarch_fwd(x, w1, w2, allow_tf32=allow_tf32)
    assert out2.shape == (B, l * s) and out2.dtype == dtype and out2.device == x.device
    assert _rel(out2, ref) < (tol or TOL[dtype])


def _check_bwd(shape, B, dtype, allow_tf32=False, tol=None):
    (x, w1, w2, dout), ref_in = _make(shape, B, dtype, seed=1)
    k, q, p, l, s, r = shape
    bufs = dict(dx=_nan((B, k * p), dtype), dw1=_nan((k, q, p), dtype), dw2=_nan((l, s, r), dtype))
    dx, dw1, dw2 = tk.monarch_bwd(x, w1, w2, dout, allow_tf32=allow_tf32, **bufs)
    assert dx.data_ptr() == bufs["dx"].data_ptr()
    assert dw1.data_ptr() == bufs["dw1"].data_ptr() and dw2.data_ptr() == bufs["dw2"].data_ptr()
    _, gx, gw1, gw2 = _ref_all(*ref_in)
    t = tol or TOL[dtype]
    if B == 0:
        assert dx.shape == (0, k * p)
        assert (dw1 == 0).all() and (dw2 == 0).all()
        return
    assert _rel(dx, gx) < t
    assert _rel(dw1, gw1) < t
    assert _rel(dw2, gw2) < t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fwd(shape, dtype):
    _check_fwd(shape, 37, dtype)


@pytest.mark.parametrize("B", [0, 1])
@pytest.mark.parametrize("shape", SHAPES[:5], ids=str)
def test_fwd_tiny_batch(shape, B):
    _check_fwd(shape, B, torch.float32, also_alloc=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bwd(shape, dtype):
    _check_bwd(shape, 37, dtype)


@pytest.mark.parametrize("B", [0, 1])
@pytest.mark.parametrize("shape", SHAPES[:5], ids=str)
def test_bwd_tiny_batch(shape, B):
    _check_bwd(shape, B, torch.float16 if B else torch.float32)


def test_float64():
    shape = (3, 10, 7, 5, 9, 6)
    _check_fwd(shape, 37, torch.float64)
    _check_bwd(shape, 37, torch.float64)


def test_allow_tf32():
    shape = (4, 8, 8, 4, 24, 8)
    _check_fwd(shape, 37, torch.float32, allow_tf32=True, tol=1e-2)
    _check_bwd(shape, 37, torch.float32, allow_tf32=True, tol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_strided(dtype):
    """x and dout are column slices of wider buffers (row stride > width, unit inner stride)."""
    shape = (3, 10, 7, 5, 9, 6)
    k, q, p, l, s, r = shape
    B = 21
    (x, w1, w2, dout), ref_in = _make(shape, B, dtype, seed=2)
    xw = torch.full((B, k * p + 13), float("nan"), dtype=dtype, device=DEVICE)
    dw = torch.full((B, l * s + 5), float("nan"), dtype=dtype, device=DEVICE)
    xs = xw[:, 3:3 + k * p]
    ds = dw[:, 2:2 + l * s]
    xs.copy_(x)
    ds.copy_(dout)
    assert xs.stride() == (k * p + 13, 1) and ds.stride() == (l * s + 5, 1)
    ref, gx, gw1, gw2 = _ref_all(*ref_in)
    out = tk.monarch_fwd(xs, w1, w2)
    assert out.is_contiguous()
    assert _rel(out, ref) < TOL[dtype]
    dx, dw1, dw2 = tk.monarch_bwd(xs, w1, w2, ds)
    assert dx.is_contiguous()
    assert _rel(dx, gx) < TOL[dtype]
    assert _rel(dw1, gw1) < TOL[dtype]
    assert _rel(dw2, gw2) < TOL[dtype]


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, True, True), (True, False, True), (False, False, False)])
def test_partial_grads(need):
    shape = (5, 12, 9, 3, 11, 20)
    (x, w1, w2, dout), ref_in = _make(shape, 37, torch.float32, seed=3)
    _, gx, gw1, gw2 = _ref_all(*ref_in)
    got = tk.monarch_bwd(x, w1, w2, dout, need_dx=need[0], need_dw1=need[1], need_dw2=need[2])
    for want, g, ref in zip(need, got, (gx, gw1, gw2)):
        if want:
            assert g is not None and _rel(g, ref) < 1e-5
        else:
            assert g is None


@pytest.mark.skipif(_CUDA, reason="the GPU run already uses these tile sizes")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gpu_tile_heuristics_interpreted(monkeypatch, dtype):
    """Run the tile sizes chosen for real GPUs (BN up to 256, BR dividing q/l, batch splits for the
    weight-gradient reduction) under the interpreter, so the GPU configurations are checked here."""
    monkeypatch.setattr(tk, "_INTERPRET", False)
    for shape, B in [((3, 40, 33, 5, 20, 24), 150), ((2, 32, 20, 2, 260, 32), 20)]:
        _check_fwd(shape, B, dtype)
        _check_bwd(shape, B, dtype)


@pytest.mark.parametrize("shape", [(4, 8, 8, 4, 40, 8), (2, 10, 6, 5, 70, 4), (3, 20, 9, 4, 33, 15)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_pass_forward_for_wide_s(shape, dtype):
    """s wider than one fused n tile: h is written once in block layout, then one per-block matmul."""
    assert tk._fwd_two_pass(shape[4], tk._mode(dtype, False))
    (x, w1, w2, _), (x64, w164, w264, _) = _make(shape, 45, dtype)
    out = torch.full((45, shape[3] * shape[4]), float("nan"), device=DEVICE, dtype=dtype)
    tk.monarch_fwd(x, w1, w2, out=out)
    assert _rel(out, monarch_reference(x64, w164, w264)) < TOL[dtype]


def test_aot_sweep_compiles_every_dtype_the_gpu_sends_to_triton():
    """tests/triton_aot.py compiles the dtypes in kernels/monarch.py's AOT_DTYPES: they must be the
    ones kernelkit.monarch.ops sends to the Triton kernels on a GPU (float64 runs only here, under
    the interpreter), or a dtype could reach a GPU without ever having been compiled for it."""
    from kernelkit.monarch.ops import _SUPPORTED
    assert set(tk.AOT_DTYPES) == set(_SUPPORTED["triton"])
