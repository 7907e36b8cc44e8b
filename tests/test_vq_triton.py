"""Triton vq kernels (kernels/vq.py) against the float64 reference (python/kernelkit/vq/reference.py).

Without a CUDA GPU the kernels run under the Triton interpreter: TRITON_INTERPRET=1 must be set before
triton is first imported (tests/conftest.py does it; when this file runs alone it sets it itself unless
triton was already imported without it, in which case the module is skipped).  The interpreter runs the
GPU's own tile choices (kernels/vq.py picks tiles from shapes and dtypes only), so the batch sizes here
reach every GEMV batch tile.  Inputs are rounded to the tested dtype first and the reference runs in
float64 on the rounded values.
"""
from __future__ import annotations

import itertools
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from triton_family import CUDA as _CUDA, load  # noqa: E402

kv, ref = load("vq")
from helpers import TOL, rel_err  # noqa: E402

DEVICE = "cuda" if _CUDA else "cpu"
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
GEMV, GEMM = 1, 2

# (d, K, M, code dtype): VQ4DiT 2-bit / 3-bit, AQLM 1x16g8 / 2x8g8 / 8x8 / 1x16g16, a tiny K, int16 K=4096
FORMATS = {
    "vq4dit_d4_k256": (4, 256, 1, torch.uint8),
    "vq4dit_d2_k64": (2, 64, 1, torch.uint8),
    "aqlm_1x16g8": (8, 65536, 1, torch.int16),
    "aqlm_2x8g8": (8, 256, 2, torch.uint8),
    "aqlm_8x8g8": (8, 256, 8, torch.uint8),
    "aqlm_1x16g16": (16, 65536, 1, torch.int16),
    "d1_k3": (1, 3, 1, torch.uint8),
    "d2_k4096_m2": (2, 4096, 2, torch.int16),
}


# every format in float32; the float64 / 16-bit dtypes on a 1-, 2- and 8-codebook format, uint8 and int16
CASES = ([(torch.float32, f) for f in FORMATS] +
         [(dt, f) for dt in (torch.float64, torch.float16, torch.bfloat16)
          for f in ("vq4dit_d4_k256", "aqlm_8x8g8", "aqlm_1x16g16")])
CASE_IDS = [f"{str(dt)[6:]}-{f}" for dt, f in CASES]


def _tol(dtype):
    # the interpreter truncates fp32 -> bf16 casts (Triton 3.9) instead of rounding: ~2x the error
    return TOL[dtype] * (2 if dtype == torch.bfloat16 and not _CUDA else 1)


def _codes(n_out, G, M, K, cdt, g):
    """Random codes in [0, K) stored as uint8 / int16 (values >= 2^15 stored negative, AQLM's way)."""
    c = torch.randint(0, K, (n_out, G, M), generator=g)
    if cdt == torch.int16:
        c = torch.where(c >= 32768, c - 65536, c)
    return c.to(cdt)


class Problem:
    """Random VQ layer + inputs rounded to `dtype` (on DEVICE), and the float64 references."""

    def __init__(self, fmt, dtype, B=7, n_out=37, G=5, rpc=None, scales=True, bias=True, seed=0):
        d, K, M, cdt = FORMATS[fmt] if isinstance(fmt, str) else fmt
        g = torch.Generator().manual_seed(seed)
        rpc = rpc or n_out or 1
        S = max(1, -(-n_out // rpc))
        self.B, self.n_out, self.n_in, self.rpc, self.dtype, self.K = B, n_out, G * d, rpc, dtype, K
        self.codes = _codes(n_out, G, M, K, cdt, g).to(DEVICE)
        lo = dict(cb=torch.randn(S, M, K, d, generator=g, dtype=torch.float64),
                  scales=torch.rand(n_out, generator=g, dtype=torch.float64) + 0.5 if scales else None,
                  bias=torch.randn(n_out, generator=g, dtype=torch.float64) if bias else None,
                  x=torch.randn(B, G * d, generator=g, dtype=torch.float64),
                  dout=torch.randn(B, n_out, generator=g, dtype=torch.float64))
        lo = {k: (v.to(dtype) if v is not None else None) for k, v in lo.items()}
        self.cb, self.scales, self.bias, self.x, self.dout = (
            lo[k].to(DEVICE) if lo[k] is not None else None for k in ("cb", "scales", "bias", "x", "dout"))
        self.lo64 = {k: (v.double() if v is not None else None) for k, v in lo.items()}

    # the float64 oracle on the rounded inputs
    def ref_out(self, x=None):
        L = self.lo64
        x = L["x"] if x is None else x.double().cpu()
        return ref.reference_fwd(x, self.codes.cpu(), L["cb"], L["scales"], L["bias"], self.rpc)

    def ref_bwd(self):
        L = self.lo64
        return ref.reference_bwd(L["x"], self.codes.cpu(), L["cb"], L["scales"], L["dout"], self.rpc)

    def ref_w(self):
        return ref.dequantize_reference(self.codes.cpu(), self.lo64["cb"], self.lo64["scales"], self.rpc)

    def fwd(self, path, x=None):
        return kv.vq_linear_fwd(self.x if x is None else x, self.codes, self.cb, self.scales, self.bias,
                                self.rpc, path)

    def bwd(self, x=None, dout=None, **need):
        return kv.vq_linear_bwd(self.x if x is None else x, self.codes, self.cb, self.scales,
                                self.dout if dout is None else dout, self.rpc, **need)

    def check(self, out, want, what):
        assert out.dtype == self.dtype and out.is_contiguous(), what
        err = rel_err(out, want)
        assert err <= _tol(self.dtype), f"{what}: relative error {err:.3e} > {_tol(self.dtype):.0e}"


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [GEMV, GEMM], ids=["gemv", "gemm"])
@pytest.mark.parametrize("dtype,fmt", CASES, ids=CASE_IDS)
def test_vq_fwd_matches_reference(poison, dtype, fmt, path):
    """Odd n_out, per-set codebooks (rows_per_codebook 16 of 37 rows: 3 sets), scales and bias."""
    p = Problem(fmt, dtype, B=7, n_out=37, G=5, rpc=16)
    out = p.fwd(path)
    assert out.shape == (7, 37)
    p.check(out, p.ref_out(), "out")


@pytest.mark.parametrize("dtype,fmt", CASES, ids=CASE_IDS)
def test_vq_bwd_matches_reference(poison, dtype, fmt):
    p = Problem(fmt, dtype, B=9, n_out=37, G=5, rpc=16, seed=1)
    dx, dcb, ds = p.bwd()
    rdx, rdcb, rds = p.ref_bwd()
    assert dx.shape == (9, p.n_in) and dcb.shape == p.cb.shape and ds.shape == (37,)
    p.check(dx, rdx, "dx")
    p.check(dcb, rdcb, "dcodebooks")
    p.check(ds, rds, "dscales")


@pytest.mark.parametrize("dtype,fmt", CASES, ids=CASE_IDS)
def test_vq_dequantize_matches_reference(poison, dtype, fmt):
    p = Problem(fmt, dtype, n_out=37, G=5, rpc=16, seed=2)
    w = kv.vq_dequantize(p.codes, p.cb, p.scales, p.rpc)
    assert w.shape == (37, p.n_in)
    p.check(w, p.ref_w(), "W")
    p.scales = p.lo64["scales"] = None
    p.check(kv.vq_dequantize(p.codes, p.cb, None, p.rpc), p.ref_w(), "W without scales")


_NEEDS = [dict(need_dx=a, need_dcodebooks=b, need_dscales=c) for a, b, c in itertools.product((False, True), repeat=3)]


@pytest.mark.parametrize("scales", [True, False], ids=["scales", "no_scales"])
@pytest.mark.parametrize("need", _NEEDS, ids=lambda n: "-".join(k[5:] for k, v in n.items() if v) or "none")
def test_vq_bwd_each_gradient_subset(poison, need, scales):
    """Only what is asked for comes back (dscales never without scales); what comes back is right."""
    p = Problem("aqlm_2x8g8", torch.float32, B=11, n_out=23, G=6, scales=scales, seed=3)
    got = p.bwd(**need)
    want = p.ref_bwd()
    for (name, asked), g, w in zip(need.items(), got, want):
        if name == "need_dscales":
            asked = asked and scales
        if asked:
            p.check(g, w, name)
        else:
            assert g is None, name


@pytest.mark.parametrize("B", [0, 1, 2, 7, 16, 17])
def test_vq_batch_sizes_both_paths(poison, B):
    """Batch 0 (empty outputs, zero codebook / scale gradients), 1 / 2 / 7 (each GEMV batch tile), 16
    (the last auto-GEMV batch) and 17 (auto GEMM), through path auto, GEMV and GEMM."""
    p = Problem("vq4dit_d4_k256", torch.float32, B=B, n_out=37, G=9, seed=4 + B)
    for path in (0, GEMV, GEMM):
        out = p.fwd(path)
        assert out.shape == (B, 37)
        if B:
            p.check(out, p.ref_out(), f"out path {path}")
    dx, dcb, ds = p.bwd()
    assert dx.shape == (B, p.n_in)
    if B == 0:
        assert (dcb == 0).all() and dcb.shape == p.cb.shape and (ds == 0).all() and ds.shape == (37,)
        return
    rdx, rdcb, rds = p.ref_bwd()
    p.check(dx, rdx, "dx")
    p.check(dcb, rdcb, "dcodebooks")
    p.check(ds, rds, "dscales")


class _GridRecorder:
    """Stands in for a kernel in kernels/vq.py, records each launch's constexpr tiles and runs it."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("B,want", [(1, 1), (2, 2), (3, 4), (16, 4)])
def test_vq_auto_path_is_gemv_up_to_16_with_batch_tile(poison, monkeypatch, B, want):
    gemv, gemm = _GridRecorder(kv._gemv_kernel), _GridRecorder(kv._gemm_fwd_kernel)
    monkeypatch.setattr(kv, "_gemv_kernel", gemv)
    monkeypatch.setattr(kv, "_gemm_fwd_kernel", gemm)
    p = Problem("aqlm_2x8g8", torch.float32, B=B, n_out=19, G=4, seed=5)
    p.check(p.fwd(0), p.ref_out(), "out")
    assert [c["BB"] for c in gemv.calls] == [want] and not gemm.calls
    q = Problem("aqlm_2x8g8", torch.float32, B=kv.GEMV_MAX_BATCH + 1, n_out=19, G=4, seed=5)
    q.check(q.fwd(0), q.ref_out(), "out")
    assert len(gemv.calls) == 1 and len(gemm.calls) == 1


@pytest.mark.parametrize("scales,bias", list(itertools.product((False, True), repeat=2)))
@pytest.mark.parametrize("path", [GEMV, GEMM], ids=["gemv", "gemm"])
def test_vq_fwd_scales_and_bias_none_and_given(poison, path, scales, bias):
    p = Problem("aqlm_1x16g8", torch.float32, B=5, n_out=21, G=3, scales=scales, bias=bias, seed=6)
    assert (p.scales is None) != scales and (p.bias is None) != bias
    p.check(p.fwd(path), p.ref_out(), "out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_vq_row_strided_x_and_dout(poison, dtype):
    """x and dout are column slices of wider NaN-filled buffers (row stride > width, unit inner)."""
    p = Problem("aqlm_2x8g8", dtype, B=19, n_out=29, G=6, rpc=10, seed=7)
    xw = torch.full((19, p.n_in + 13), float("nan"), dtype=dtype, device=DEVICE)
    dw = torch.full((19, 29 + 7), float("nan"), dtype=dtype, device=DEVICE)
    xs, ds_ = xw[:, 5:5 + p.n_in], dw[:, 2:31]
    xs.copy_(p.x)
    ds_.copy_(p.dout)
    assert xs.stride() == (p.n_in + 13, 1) and ds_.stride() == (36, 1)
    for path in (GEMV, GEMM):
        p.check(p.fwd(path, x=xs), p.ref_out(), f"out path {path}")
    dx, dcb, ds = p.bwd(x=xs, dout=ds_)
    rdx, rdcb, rds = p.ref_bwd()
    p.check(dx, rdx, "dx")
    p.check(dcb, rdcb, "dcodebooks")
    p.check(ds, rds, "dscales")


def test_vq_int16_codes_at_and_above_2_15_read_unsigned(poison):
    """K = 65536 with codes 32768 .. 65535 (stored negative) and the extremes 0 / 32767 / 65535: the
    kernels read them as unsigned, both in the gathers and in the codebook-gradient scatter."""
    p = Problem("aqlm_1x16g8", torch.float64, B=6, n_out=17, G=4, seed=8)
    hi = torch.tensor([32768, 65535, 32767, 0, 40000, 65534], dtype=torch.int64)
    c = p.codes.cpu().long() & 0xFFFF
    c[:6, 0, 0] = hi
    c[6:, 1, 0] = torch.randint(32768, 65536, (11,))
    p.codes = torch.where(c >= 32768, c - 65536, c).to(torch.int16).to(DEVICE)
    assert (p.codes < 0).sum() >= 12
    for path in (GEMV, GEMM):
        p.check(p.fwd(path), p.ref_out(), f"out path {path}")
    dx, dcb, ds = p.bwd()
    rdx, rdcb, rds = p.ref_bwd()
    p.check(dx, rdx, "dx")
    p.check(dcb, rdcb, "dcodebooks")
    p.check(ds, rds, "dscales")
    assert (dcb[0, 0, 65535] != 0).all() and (dcb[0, 0, 32768] != 0).all()


def test_vq_empty_layer_sizes(poison):
    """n_out = 0 (empty output) and n_in = 0 (no groups: out = bias, dx empty, zero gradients)."""
    p = Problem("vq4dit_d4_k256", torch.float32, B=5, n_out=0, G=3, seed=9)
    for path in (GEMV, GEMM):
        assert p.fwd(path).shape == (5, 0)
    dx, dcb, _ = p.bwd(need_dscales=False)
    assert dx.shape == (5, 12) and (dx == 0).all() and (dcb == 0).all()
    q = Problem("vq4dit_d4_k256", torch.float32, B=5, n_out=7, G=0, seed=9)
    for path in (GEMV, GEMM):
        torch.testing.assert_close(q.fwd(path), q.bias.expand(5, 7), rtol=0, atol=0)
    dx, dcb, ds = q.bwd()
    assert dx.shape == (5, 0) and (dcb == 0).all() and (ds == 0).all()
    assert kv.vq_dequantize(q.codes, q.cb, q.scales, q.rpc).shape == (7, 0)


def test_vq_bwd_dx_and_dscales_are_deterministic(poison):
    """dx and dscales have a fixed sum order (no atomics): bitwise equal on every call."""
    p = Problem("aqlm_2x8g8", torch.float32, B=40, n_out=40, G=5, rpc=32, seed=10)
    a, b = p.bwd(need_dcodebooks=False), p.bwd(need_dcodebooks=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


# ----------------------------------------------------------------------------------------------------
def _assign_problem(n, K, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    c = torch.randn(K, d, generator=g, dtype=torch.float64).to(dtype)
    return v, c


@pytest.mark.parametrize("n,K,d,topn", [(130, 3, 1, 1), (130, 3, 1, 3), (70, 64, 4, 2), (65, 130, 3, 8),
                                         (33, 70, 16, 3), (70, 256, 4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_vq_assign_matches_reference(poison, dtype, n, K, d, topn):
    """Indices equal the reference's (float64 distances, a stable sort) wherever the neighbours are
    separated by more than rounding; distances within the dtype's tolerance."""
    v, c = _assign_problem(n, K, d, dtype, seed=n + K + d)
    idx, dist = kv.vq_assign(v.to(DEVICE), c.to(DEVICE), topn)
    assert idx.dtype == torch.int32 and idx.shape == (n, topn) and dist.dtype == dtype and dist.shape == (n, topn)
    ridx, rdist = ref.assign_reference(v.double(), c.double(), topn)
    full = ((v.double()[:, None, :] - c.double()[None]) ** 2).sum(-1)          # (n, K)
    srt = full.sort(1).values
    gap = (srt[:, 1:topn + 1] - srt[:, :topn]).min(1).values if K > topn else srt[:, 0] * 0 + 1
    clear = gap > 1e-4 * (1 + srt[:, topn - 1])
    assert clear.float().mean() > 0.9
    assert torch.equal(idx.cpu()[clear].long(), ridx[clear].long())
    assert rel_err(dist, rdist) <= TOL[dtype]
    # every returned distance is the exact one of the returned index
    assert rel_err(dist, full.gather(1, idx.cpu().long())) <= TOL[dtype]


def test_vq_assign_ties_go_to_the_smaller_index(poison):
    """Duplicate centroids give bitwise-equal distances: nearest first, equal ones by increasing index,
    across chunk boundaries of the kernel's centroid loop."""
    v, c = _assign_problem(50, 150, 4, torch.float32, seed=11)
    c[7] = c[100] = c[149] = c[3]          # one centroid four times, in three of the 64-wide chunks
    v[:10] = c[3]                          # rows exactly on it
    idx, dist = kv.vq_assign(v.to(DEVICE), c.to(DEVICE), 5)
    assert (idx[:10, :4].cpu() == torch.tensor([3, 7, 100, 149], dtype=torch.int32)).all()
    assert (dist[:10, :4] == 0).all() and (dist[:10, 4] > 0).all()
    ridx, _ = ref.assign_reference(v, c, 5)
    assert torch.equal(idx.cpu(), ridx)


# ----------------------------------------------------------------------------------------------------
def _record_sweep(monkeypatch):
    """Run aot_sweep() (meant for the GPU compiler) with every kernel launch recorded, not run."""
    launches = []
    for name in ("_gemv_kernel", "_gemm_fwd_kernel", "_gemm_dx_kernel", "_dw_kernel", "_dequant_kernel",
                 "_assign_kernel"):
        kernel = getattr(kv, name)

        def record(*args, grid, warmup, _name=name, _kernel=kernel, **kwargs):
            bound = dict(zip(_kernel.arg_names, args))
            bound.update(kwargs)
            launches.append((_name, bound))
        monkeypatch.setattr(kernel, "run", record)
    monkeypatch.setattr(kv, "_INTERPRET", False)
    monkeypatch.setattr(kv, "_UPCAST_BF16", False)
    points = kv.aot_sweep()
    assert points > 0
    return launches


def test_aot_sweep_reaches_every_dtype_path_and_format(monkeypatch):
    """tests/triton_aot.py compiles what aot_sweep() launches: for every dtype, both forward paths with
    every GEMV batch tile and scale / bias combination, every d, both code widths, M = 1 / 2 / 8, every
    backward kernel flag set, dequantize and assign must be among those launches."""
    launches = _record_sweep(monkeypatch)
    by = {}
    for name, a in launches:
        by.setdefault(name, []).append(a)
    fwd_keys = {(a["x_ptr"].dtype, a["codes_ptr"].dtype, a.get("BB"), a["HAS_SCALE"], a["HAS_BIAS"])
                for a in by["_gemv_kernel"]}
    gemm_keys = {(a["x_ptr"].dtype, a["codes_ptr"].dtype, a["HAS_SCALE"], a["HAS_BIAS"])
                 for a in by["_gemm_fwd_kernel"]}
    dx_keys = {(a["dout_ptr"].dtype, a["codes_ptr"].dtype, a["HAS_SCALE"]) for a in by["_gemm_dx_kernel"]}
    dw_keys = {(a["x_ptr"].dtype, a["codes_ptr"].dtype, a["NEED_DCB"], a["NEED_DS"], a["HAS_SCALE"])
               for a in by["_dw_kernel"]}
    deq_keys = {(a["w_ptr"].dtype, a["codes_ptr"].dtype, a["HAS_SCALE"]) for a in by["_dequant_kernel"]}
    for dtype, cdt in itertools.product(kv.AOT_DTYPES, (torch.uint8, torch.int16)):
        for s, b in itertools.product((False, True), repeat=2):
            for BB in kv._GEMV_CFGS:
                assert (dtype, cdt, BB, s, b) in fwd_keys
            assert (dtype, cdt, s, b) in gemm_keys
        for s in (False, True):
            assert (dtype, cdt, s) in dx_keys and (dtype, cdt, s) in deq_keys
            assert (dtype, cdt, True, False, s) in dw_keys
        assert (dtype, cdt, True, True, True) in dw_keys and (dtype, cdt, False, True, True) in dw_keys
    for name in ("_gemv_kernel", "_gemm_fwd_kernel", "_gemm_dx_kernel", "_dw_kernel", "_dequant_kernel"):
        assert {a["LOG2D"] for a in by[name]} == {0, 1, 2, 3, 4}, name
        assert {1, 2, 8} <= {a["M"] for a in by[name]}, name
    assert {a["v_ptr"].dtype for a in by["_assign_kernel"]} == set(kv.AOT_ASSIGN_DTYPES)


def test_aot_dtypes_and_gemv_batch_are_what_the_ops_use():
    """AOT_DTYPES / AOT_ASSIGN_DTYPES must be what kernelkit.vq.ops sends to the Triton kernels on a GPU,
    and the auto path's GEMV batch limit the one ops documents."""
    ops = pytest.importorskip("kernelkit.vq.ops")
    assert set(kv.AOT_DTYPES) == set(ops._SUPPORTED["triton"])
    assert set(kv.AOT_ASSIGN_DTYPES) == set(ops._ASSIGN_SUPPORTED["triton"])
    assert kv.GEMV_MAX_BATCH == ops.TRITON_GEMV_MAX_BATCH
