"""The mfac family's CUDA kernels (csrc/cuda/mfac.cu) under the CUDA host emulation (tests/cuda_emu):
every kk_mfac_*_cuda entry point of csrc/include/kernelkit/mfac.h against the float64 oracle of
python/kernelkit/mfac/reference.py, with float32, bfloat16 and float64 buffers, outputs NaN-poisoned,
on every variant of the launch plan.  No GPU needed.

The plan on the emulated H100 (132 SMs): the dots column tile is cw = 128 columns for d <= 67584, so
d = 300 has several tiles; block <= 128 is the "owned" variant (mfac_dots_kernel<T, false>: a CTA owns
cw / block whole blocks, direct stores), block > 128 the "split" one (<T, true>: chunks of a block summed
with atomics into a zeroed q); few tiles make grid.y split the rows.  combine stages the coefficients of
the blocks its 256 columns touch in row chunks of 4096 / (vectors * blocks) rows: block = 1 with 4
vectors gives 4-row chunks.  Static setup runs its blocks in chunks bounded by the workspace target,
lowered here through KKEMU_MFAC_WS_TARGET to reach several chunks.  The window rebuild tiles by 32, so
m = 70 has 3 panels with a ragged last one.  The reference module is loaded from its file, so this test
needs no kernelkit build.
"""
from __future__ import annotations

import ctypes
import importlib.util
import re
from pathlib import Path

import pytest
import torch

from cuda_emu import load
from helpers import assert_close, rel_err

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("mfac_reference",
                                               ROOT / "python" / "kernelkit" / "mfac" / "reference.py")
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)

KK = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 3}
I64, PTR, DBL = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
OK, NULL_POINTER, INVALID_SIZE, INVALID_ARGUMENT, UNSUPPORTED_DTYPE = 0, 1, 2, 3, 4
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
DTYPE_IDS = ["float32", "bfloat16", "float64"]
NAN = float("nan")


@pytest.fixture(scope="module")
def emu():
    e = load()
    L = e.lib
    L.kk_mfac_dots_cuda.argtypes = [ctypes.c_int, I64, I64, I64, PTR, I64, I64, PTR, I64, I64, PTR, PTR, PTR]
    L.kk_mfac_combine_cuda.argtypes = [ctypes.c_int, I64, I64, I64, PTR, I64, I64, DBL, PTR, I64, PTR, PTR, I64, PTR]
    L.kk_mfac_diag_cuda.argtypes = [ctypes.c_int, I64, I64, PTR, I64, DBL, DBL, PTR, PTR]
    L.kk_mfac_static_setup_cuda_workspace_size.argtypes = [ctypes.c_int, I64, I64, I64, ctypes.POINTER(I64)]
    L.kk_mfac_static_setup_cuda.argtypes = [ctypes.c_int, I64, I64, I64, PTR, I64, DBL, PTR, I64, PTR, I64, PTR]
    L.kk_mfac_window_cuda_workspace_size.argtypes = [I64, ctypes.POINTER(I64)]
    L.kk_mfac_window_update_cuda.argtypes = [I64, DBL, PTR, PTR, I64, PTR, PTR, I64, PTR]
    L.kk_mfac_window_rebuild_cuda.argtypes = [I64, DBL, PTR, PTR, PTR, I64, PTR]
    L.kk_mfac_window_coef_cuda.argtypes = [I64, I64, DBL, PTR, PTR, PTR, PTR]
    e.set_device("h100")
    yield e
    e.set_device("h100")
    e.set_schedule("forward")


def _p(t):
    return PTR(0 if t is None else t.data_ptr())


def _nan(shape, dtype):
    return torch.full(shape, NAN, dtype=dtype)


def _vdt(gdt):
    return R.vector_dtype(gdt)


def _buffer(r, d, dtype, seed, pad=0):
    """G (r, d) as a view of an (r, d + pad) buffer; values rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(r, d + pad, generator=g).to(dtype)
    return full[:, :d]


def _vectors(n, d, dtype, seed, pad=0):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(n, d + pad, generator=g).to(dtype)[:, :d]


def _workspace(nbytes):
    """A 16-byte aligned host buffer of nbytes (the emulation's 'device' memory is host memory)."""
    raw = torch.zeros(max(nbytes, 1) + 16, dtype=torch.uint8)
    off = (-raw.data_ptr()) % 16
    return raw, PTR(raw.data_ptr() + off), off


# ---- calls -----------------------------------------------------------------------------------------
def dots(emu, G, x, block, insert_row=-1, want_qr=True):
    r, d = G.shape
    nvec = x.shape[0]
    nb = R.nblocks(d, block)
    q = _nan((nvec, nb, r), torch.float64)
    qr = _nan((nvec, nb, r), torch.float64) if want_qr else None
    st = emu.lib.kk_mfac_dots_cuda(KK[G.dtype], r, d, block, _p(G), G.stride(0), nvec, _p(x),
                                   x.stride(0) if nvec else d, insert_row, _p(q), _p(qr), None)
    assert st == OK, emu.last_error()
    return q, qr


def combine(emu, G, c, x, alpha, block, out=None):
    r, d = G.shape
    nvec = c.shape[0]
    if out is None:
        out = _nan((nvec, d), _vdt(G.dtype))
    st = emu.lib.kk_mfac_combine_cuda(KK[G.dtype], r, d, block, _p(G), G.stride(0), nvec, alpha, _p(x),
                                      x.stride(0) if x is not None else d, _p(c), _p(out), out.stride(0), None)
    assert st == OK, emu.last_error()
    return out


def window_ws(emu, m):
    nb = I64(-1)
    assert emu.lib.kk_mfac_window_cuda_workspace_size(m, ctypes.byref(nb)) == OK
    return _workspace(nb.value) + (nb.value,)


def rebuild(emu, gram, damp):
    m = gram.shape[0]
    raw, base, _, nbytes = window_ws(emu, m)
    kinv = _nan((m, m), torch.float64)
    st = emu.lib.kk_mfac_window_rebuild_cuda(m, damp, _p(gram), _p(kinv), base, nbytes, None)
    assert st == OK, emu.last_error()
    return kinv


def static_setup(emu, G, damp, block, alias=False):
    m, d = G.shape
    r = R.static_rows(m, d, block)
    nb = I64(-1)
    assert emu.lib.kk_mfac_static_setup_cuda_workspace_size(KK[G.dtype], m, d, block, ctypes.byref(nb)) == OK
    raw, base, _ = _workspace(nb.value)
    Z = G if alias else _nan((r, d), _vdt(G.dtype))
    st = emu.lib.kk_mfac_static_setup_cuda(KK[G.dtype], m, d, block, _p(G), G.stride(0), damp, _p(Z), Z.stride(0),
                                           base, nb.value, None)
    assert st == OK, emu.last_error()
    return Z[:r], nb.value


# ---- dots --------------------------------------------------------------------------------------------
# (id, r, d, block, nvec, pad): owned (block <= 128) and split (block > 128) plans, ragged last blocks,
# more vectors than one pass holds (4 float / 2 double), padded rows, block = 1.
DOTS_CASES = [
    ("owned-2-blocks-per-tile", 13, 300, 50, 5, 3),
    ("owned-one-block", 7, 100, 100, 1, 0),
    ("owned-block-1", 5, 37, 1, 2, 0),
    ("split-one-block-rows-y", 19, 300, 300, 3, 0),
    ("split-ragged", 11, 290, 200, 1, 2),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", DOTS_CASES, ids=[c[0] for c in DOTS_CASES])
def test_dots_matches_reference(emu, dtype, case):
    _, r, d, block, nvec, pad = case
    G = _buffer(r, d, dtype, 1, pad)
    x = _vectors(nvec, d, _vdt(dtype), 2, pad)
    q, _ = dots(emu, G, x, block)
    # the reference reads the same rounded values: only the accumulation differs
    assert_close(q, R.dots_reference(G, x, block), _vdt(dtype), "q")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d", [100, 300], ids=["owned", "split"])
def test_insert_writes_the_rounded_row_and_returns_both_columns(emu, dtype, d):
    r, row = 9, 4
    G = _buffer(r, d, dtype, 3, pad=2)
    x = _vectors(1, d, _vdt(dtype), 4)
    Gref = G.clone()
    want_q, want_qr = R.insert_dots_reference(Gref, x[0], row)
    q, qr = dots(emu, G, x, d, insert_row=row)
    assert torch.equal(G, Gref), "the inserted row differs from round(x) (or another row changed)"
    assert_close(q, want_q, _vdt(dtype), "q")
    assert_close(qr, want_qr, _vdt(dtype), "qr")
    if dtype == torch.bfloat16:  # the rounding is visible: qr != q
        assert not torch.equal(q, qr)
    # qr may be NULL
    x2 = _vectors(1, d, _vdt(dtype), 5)
    q2, _ = dots(emu, G, x2, d, insert_row=0, want_qr=False)
    R.insert_dots_reference(Gref, x2[0], 0)
    assert torch.equal(G, Gref)
    assert_close(q2, (Gref.double() @ x2[0].double()).reshape(1, 1, -1), _vdt(dtype), "q (qr NULL)")


@pytest.mark.parametrize("d", [100, 300], ids=["owned", "split"])
def test_insert_of_a_non_finite_x_leaves_G_and_gives_nan(emu, d):
    G = _buffer(6, d, torch.bfloat16, 5)
    before = G.clone()
    for bad in (NAN, float("inf")):
        x = _vectors(1, d, torch.float32, 6)
        x[0, d - 3] = bad
        q, qr = dots(emu, G, x, d, insert_row=2)
        assert torch.equal(G, before), "a rejected insert changed G"
        assert torch.isnan(q).all() and torch.isnan(qr).all()
    # the next (finite) insert is not affected by the previous call's flag
    x = _vectors(1, d, torch.float32, 7)
    q, _ = dots(emu, G, x, d, insert_row=2)
    assert torch.isfinite(q).all() and not torch.equal(G, before)


# ---- combine, diag, coef -----------------------------------------------------------------------------
# (id, r, d, block, nvec, pad): blocks per CTA from 1 to 256 (block = 1: 4-row coefficient chunks).
COMBINE_CASES = [
    ("blocks-50-5-vectors", 13, 300, 50, 5, 3),
    ("one-block", 7, 290, 290, 2, 0),
    ("block-1-row-chunks", 13, 300, 1, 4, 0),
    ("block-200", 3, 300, 200, 1, 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", COMBINE_CASES, ids=[c[0] for c in COMBINE_CASES])
def test_combine_matches_reference(emu, dtype, case):
    _, r, d, block, nvec, pad = case
    G = _buffer(r, d, dtype, 8, pad)
    vdt = _vdt(dtype)
    c = torch.randn(nvec, R.nblocks(d, block), r, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    x = _vectors(nvec, d, vdt, 10, pad)
    out = combine(emu, G, c, x, 0.7, block)
    assert_close(out, R.combine_reference(G, c, x, 0.7, block, torch.float64), vdt, "out")
    out = combine(emu, G, c, None, 0.0, block)
    assert_close(out, R.combine_reference(G, c, None, 0.0, block, torch.float64), vdt, "out (x NULL)")
    # out aliasing x
    xa = x.clone()
    want = R.combine_reference(G, c, xa, -1.5, block, torch.float64)
    combine(emu, G, c, xa, -1.5, block, out=xa)
    assert_close(xa, want, vdt, "out == x")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_diag_matches_reference(emu, dtype):
    Z = _buffer(11, 300, dtype, 11, pad=5)
    out = _nan((300,), _vdt(dtype))
    assert emu.lib.kk_mfac_diag_cuda(KK[dtype], 11, 300, _p(Z), Z.stride(0), 0.5, -0.25, _p(out), None) == OK
    assert_close(out, R.diag_reference(Z, 0.5, -0.25, torch.float64), _vdt(dtype), "diag")


def test_window_coef_matches_reference(emu):
    g = torch.Generator().manual_seed(12)
    m, nvec = 37, 3
    kinv = torch.randn(m, m, dtype=torch.float64, generator=g)
    q = torch.randn(nvec, m, dtype=torch.float64, generator=g)
    c = _nan((nvec, m), torch.float64)
    assert emu.lib.kk_mfac_window_coef_cuda(m, nvec, -2.0, _p(kinv), _p(q), _p(c), None) == OK
    assert_close(c, R.window_coef_reference(kinv, q, -2.0), torch.float64, "c")


# ---- window rebuild / update -----------------------------------------------------------------------
def _window(m, d, seed, damp=1e-2):
    G = torch.randn(m, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return G, G @ G.T


@pytest.mark.parametrize("m", [1, 40, 70])
def test_window_rebuild_matches_reference(emu, m):
    _, gram = _window(m, 50, 13)
    damp = 0.05
    junk = gram.clone()
    junk.triu_(1).add_(torch.tril(gram))  # the upper triangle is never read: poison it
    junk += torch.triu(torch.full_like(gram, NAN), 1)
    kinv = rebuild(emu, junk, damp)
    assert_close(kinv, R.window_rebuild_reference(gram, damp), torch.float64, "kinv")


def _read_flag(raw, off):
    return int(raw[off:off + 8].view(torch.int64)[0])


def _update(emu, gram, kinv, row, newcol, damp, ws):
    raw, base, off, nbytes = ws
    st = emu.lib.kk_mfac_window_update_cuda(gram.shape[0], damp, _p(gram), _p(kinv), row, _p(newcol), base, nbytes,
                                            None)
    assert st == OK, emu.last_error()
    return _read_flag(raw, off)


@pytest.mark.parametrize("damp", [1e-2, 1e-5])
def test_window_update_follows_the_exact_inverse(emu, damp):
    """2m bordering updates by rows scaled 1..1e3 stay at the exact inverse (no fallback), kinv exactly
    symmetric."""
    m, d = 12, 40
    g = torch.Generator().manual_seed(14)
    G, _ = _window(m, d, 14)
    gram = G @ G.T
    kinv = R.window_rebuild_reference(gram, damp)
    kinv = (kinv + kinv.T) / 2  # exactly symmetric on entry
    ws = window_ws(emu, m)
    for step in range(2 * m):
        row = (5 * step + 3) % m
        G[row] = torch.randn(d, dtype=torch.float64, generator=g) * 10 ** (3 * torch.rand(1, generator=g).item())
        newcol = (G @ G[row]).contiguous()
        assert _update(emu, gram, kinv, row, newcol, damp, ws) == 0, step
        assert torch.equal(gram[row], newcol) and torch.equal(gram[:, row], newcol)
        err = rel_err(kinv, R.window_rebuild_reference(G @ G.T, damp))
        assert err <= 1e-11, (step, err)
    assert torch.equal(kinv, kinv.T)


def test_window_update_falls_back_to_the_rebuild_on_the_device(emu):
    """The device decides: s lost to cancellation (a copy of another row, at a scale where m damp / |g|^2 ~
    4e-15 < 64 eps) or a_row <= 0 (kinv not an inverse: a zero row) set the workspace flag, and kinv is then
    bit for bit the rebuild of the new gram; a well-conditioned replacement leaves the flag clear."""
    m, d, damp = 5, 12, 1e-2
    G, _ = _window(m, d, 15)
    G *= 1e6
    ws = window_ws(emu, m)
    for case in ("cancel", "a_row", "ok"):
        Gt = G.clone()
        gram = Gt @ Gt.T
        kinv = R.window_rebuild_reference(gram, damp)
        if case == "a_row":
            kinv[2].zero_()
            kinv[:, 2].zero_()
        Gt[2] = Gt[1] if case == "cancel" else 1e-6 * _window(1, d, 16)[0][0]
        newcol = (Gt @ Gt[2]).contiguous()
        flag = _update(emu, gram, kinv, 2, newcol, damp, ws)
        assert flag == (case != "ok"), case
        if flag:
            assert torch.equal(kinv, rebuild(emu, gram, damp)), case
        else:
            assert rel_err(kinv, R.window_rebuild_reference(Gt @ Gt.T, damp)) <= 1e-11


def test_window_update_with_non_finite_newcol_gives_nan(emu):
    m = 9
    _, gram = _window(m, 12, 16)
    kinv = R.window_rebuild_reference(gram, 0.1)
    raw, base, off, nbytes = window_ws(emu, m)
    newcol = gram[2].clone()
    newcol[5] = NAN
    assert emu.lib.kk_mfac_window_update_cuda(m, 0.1, _p(gram), _p(kinv), 2, _p(newcol), base, nbytes, None) == OK
    assert _read_flag(raw, off) == 1 and torch.isnan(kinv).all()


# ---- static setup -------------------------------------------------------------------------------------
# (id, m, d, block, pad): W form (m <= min(block, d)) and E form (m > min(block, d), a short last block).
STATIC_CASES = [
    ("W-3-blocks", 5, 100, 40, 2),
    ("W-one-block", 9, 37, 100, 0),
    ("E-short-last", 12, 50, 8, 1),
    ("E-one-block", 40, 33, 64, 0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", STATIC_CASES, ids=[c[0] for c in STATIC_CASES])
def test_static_setup_matches_reference(emu, dtype, case):
    _, m, d, block, pad = case
    G = _buffer(m, d, dtype, 17, pad)
    damp = 0.05
    Z, _ = static_setup(emu, G, damp, block)
    assert_close(Z, R.static_setup_reference(G, damp, block).double(), _vdt(dtype), "Z")
    if dtype != torch.bfloat16:  # Z may be G itself
        Ga = G.clone()
        Za, _ = static_setup(emu, Ga, damp, block, alias=True)
        assert_close(Za, R.static_setup_reference(G, damp, block).double(), _vdt(dtype), "Z (aliasing G)")


def test_static_setup_in_chunks_of_blocks(emu, monkeypatch):
    m, d, block = 10, 90, 8   # E form: 12 blocks, 8 x 8 (+ 8 x 8) doubles each = 1 KiB
    G = _buffer(m, d, torch.float32, 18)
    want = R.static_setup_reference(G, 0.1, block).double()
    _, full = static_setup(emu, G, 0.1, block)
    monkeypatch.setenv("KKEMU_MFAC_WS_TARGET", str(3 * 1024))
    emu.clear_launches()
    Z, chunked = static_setup(emu, G, 0.1, block)
    grams = [la for la in emu.launches() if "ss_gram_kernel" in la["name"]]
    assert chunked == 3 * 1024 and chunked < full and len(grams) == 4
    assert_close(Z, want, torch.float32, "Z (chunked)")


# ---- thread order, device --------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["reverse", "shuffle"])
def test_emulated_cuda_is_independent_of_thread_order(emu, schedule):
    """Fibers between barriers run backwards or shuffled: a missing __syncthreads shows up as a wrong or
    NaN (poisoned shared memory) result."""
    emu.set_schedule(schedule, seed=5)
    try:
        G, x = _buffer(13, 300, torch.float32, 23, pad=3), _vectors(5, 300, torch.float32, 24)
        for block in (50, 300):
            q, _ = dots(emu, G, x, block)
            assert_close(q, R.dots_reference(G, x, block), torch.float32, f"{schedule} q")
            c = torch.randn(5, R.nblocks(300, block), 13, dtype=torch.float64)
            out = combine(emu, G, c, x, 0.5, block)
            assert_close(out, R.combine_reference(G, c, x, 0.5, block, torch.float64), torch.float32, "out")
        Gd = _buffer(12, 50, torch.float64, 25)
        for block in (8, 50):
            Z, _ = static_setup(emu, Gd, 0.05, block)
            assert_close(Z, R.static_setup_reference(Gd, 0.05, block), torch.float64, f"{schedule} Z")
        Gw, gram = _window(70, 80, 26)
        kinv = rebuild(emu, gram, 0.05)
        assert_close(kinv, R.window_rebuild_reference(gram, 0.05), torch.float64, "kinv")
        Gw[9] = 3 * Gw[40] - Gw[9]
        assert _update(emu, gram, kinv, 9, (Gw @ Gw[9]).contiguous(), 0.05, window_ws(emu, 70)) == 0
        assert rel_err(kinv, R.window_rebuild_reference(Gw @ Gw.T, 0.05)) <= 1e-11, f"{schedule} update"
    finally:
        emu.set_schedule("forward")


def test_a_small_device_changes_the_plan_not_the_result(emu):
    """On an A100 with 4 SMs the dots tile is wider (fewer CTAs wanted): d = 3000 then has 128-column
    tiles on the H100 (split for block 1000) and wider ones here (still split), block 200 owned here."""
    G, x = _buffer(9, 3000, torch.bfloat16, 27), _vectors(2, 3000, torch.float32, 28)
    try:
        for preset, sms in (("h100", 0), ("a100", 4)):
            emu.set_device(preset, sms=sms)
            for block in (200, 1000):
                emu.clear_launches()
                q, _ = dots(emu, G, x, block)
                assert_close(q, R.dots_reference(G, x, block), torch.float32, f"{preset} block {block}")
                (la,) = [la for la in emu.launches() if "mfac_dots_kernel" in la["name"]]
                split = ", true>" in la["name"]
                assert split == (block == 1000 or preset == "h100"), (preset, block, la)
    finally:
        emu.set_device("h100")


# ---- launch plan coverage -------------------------------------------------------------------------
_NAME = re.compile(r"(mfac_\w+_kernel|rb_\w+_kernel|wu_\w+_kernel|ss_\w+_kernel)(?:<([\w:]+)(?:, (true|false))?>)?")


def test_every_plan_variant_is_reached(emu):
    seen = set()

    def record():
        for la in emu.launches():
            mt = _NAME.search(la["name"])
            assert mt, la["name"]
            t = mt.group(2)
            t = t and t.replace("__nv_bfloat16", "bf16")
            seen.add((mt.group(1), t, mt.group(3)))
            if mt.group(1) == "mfac_dots_kernel":
                seen.add(("dots tiles > 1", la["grid"][0] > 1))
                seen.add(("dots grid.y > 1", la["grid"][1] > 1))
    for dtype in DTYPES:
        emu.clear_launches()
        for _, r, d, block, nvec, pad in DOTS_CASES:
            dots(emu, _buffer(r, d, dtype, 1, pad), _vectors(nvec, d, _vdt(dtype), 2, pad), block)
        dots(emu, _buffer(5, 300, dtype, 1), _vectors(1, 300, _vdt(dtype), 2), 300, insert_row=1)
        for _, r, d, block, nvec, pad in COMBINE_CASES[:1]:
            G = _buffer(r, d, dtype, 8, pad)
            combine(emu, G, torch.ones(nvec, R.nblocks(d, block), r, dtype=torch.float64), None, 0.0, block)
        static_setup(emu, _buffer(5, 20, dtype, 3), 0.1, 40)
        Zd, od = _buffer(3, 10, dtype, 3), _nan((10,), _vdt(dtype))
        assert emu.lib.kk_mfac_diag_cuda(KK[dtype], 3, 10, _p(Zd), 10, 0.0, 1.0, _p(od), None) == OK
        record()
    emu.clear_launches()
    _, gram = _window(33, 10, 19)
    kinv = rebuild(emu, gram, 0.1)
    raw, base, off, nbytes = window_ws(emu, 33)
    newcol, q0, c = gram[3].clone(), gram[0].clone(), _nan((1, 33), torch.float64)
    assert emu.lib.kk_mfac_window_update_cuda(33, 0.1, _p(gram), _p(kinv), 3, _p(newcol), base, nbytes, None) == OK
    assert emu.lib.kk_mfac_window_coef_cuda(33, 1, 1.0, _p(kinv), _p(q0), _p(c), None) == OK
    record()
    want = {("dots tiles > 1", True), ("dots tiles > 1", False), ("dots grid.y > 1", True),
            ("dots grid.y > 1", False)}
    for t in ("float", "bf16", "double"):
        for split in ("true", "false"):
            want.add(("mfac_dots_kernel", t, split))
        for k in ("mfac_combine_kernel", "mfac_diag_kernel", "ss_gram_kernel", "ss_solve_kernel"):
            want.add((k, t, None))
    want.add(("mfac_check_kernel", "float", None))
    want.add(("mfac_check_kernel", "double", None))
    for k in ("rb_panel_kernel", "rb_factor_kernel", "rb_trinv_kernel", "rb_gram_kernel", "rb_copy_kernel",
              "wu_prep_kernel", "wu_matvec_kernel", "wu_coef_kernel", "wu_apply_kernel", "mfac_coef_kernel",
              "ss_chol_kernel"):
        want.add((k, None, None))
    assert want <= seen, f"never reached: {sorted(want - seen, key=str)}"


# ---- empty sizes and bad arguments --------------------------------------------------------------------
def test_empty_sizes_need_no_pointers(emu):
    L = emu.lib
    x3 = torch.randn(3, 10)
    assert L.kk_mfac_dots_cuda(0, 0, 10, 4, None, 10, 3, _p(x3), 10, -1, None, None, None) == OK  # r = 0: no G, q
    assert L.kk_mfac_dots_cuda(0, 5, 0, 4, None, 0, 3, None, 0, -1, None, None, None) == OK
    assert L.kk_mfac_dots_cuda(3, 5, 10, 4, None, 10, 0, None, 10, -1, None, None, None) == OK
    assert L.kk_mfac_combine_cuda(0, 5, 10, 4, None, 10, 0, 1.0, None, 10, None, None, 10, None) == OK
    assert L.kk_mfac_diag_cuda(1, 4, 0, None, 0, 1.0, 1.0, None, None) == OK
    assert L.kk_mfac_window_rebuild_cuda(0, 1.0, None, None, None, 0, None) == OK
    assert L.kk_mfac_window_coef_cuda(4, 0, 1.0, None, None, None, None) == OK
    nb = I64(-1)
    assert L.kk_mfac_static_setup_cuda_workspace_size(0, 0, 10, 4, ctypes.byref(nb)) == OK and nb.value == 0
    assert L.kk_mfac_static_setup_cuda(0, 0, 10, 4, None, 10, 1.0, None, 10, None, 0, None) == OK
    # r = 0 rows in combine: out = alpha x
    x = torch.randn(2, 7)
    out = _nan((2, 7), torch.float32)
    assert L.kk_mfac_combine_cuda(0, 0, 7, 3, None, 7, 2, 2.0, _p(x), 7, None, _p(out), 7, None) == OK
    assert torch.equal(out, 2.0 * x)


def test_bad_arguments_return_a_status_and_write_nothing(emu):
    L = emu.lib
    r, d = 6, 20
    G = _buffer(r, d, torch.float32, 20)
    x = _vectors(2, d, torch.float32, 21)
    q = _nan((2, 1, r), torch.float64)
    Gs = G.clone()

    def dots_call(**over):
        a = dict(dt=0, r=r, d=d, block=d, G=_p(G), ldg=d, nvec=2, x=_p(x), ldx=d, row=-1, q=_p(q), qr=None)
        a.update(over)
        return L.kk_mfac_dots_cuda(*a.values(), None)

    for over, status, needle in [
        (dict(dt=2), UNSUPPORTED_DTYPE, "gdtype"),
        (dict(r=-1), INVALID_SIZE, ">= 0"),
        (dict(block=0), INVALID_ARGUMENT, "block"),
        (dict(ldg=d - 1), INVALID_ARGUMENT, "ldg"),
        (dict(ldx=d - 1), INVALID_ARGUMENT, "ldx"),
        (dict(G=PTR(0)), NULL_POINTER, "G"),
        (dict(x=PTR(0)), NULL_POINTER, "x"),
        (dict(q=PTR(0)), NULL_POINTER, "q"),
        (dict(row=0), INVALID_ARGUMENT, "nvec == 1"),
        (dict(row=r, nvec=1), INVALID_ARGUMENT, "insert_row"),
    ]:
        st = dots_call(**over)
        assert st == status and needle in emu.last_error(), (over, st, emu.last_error())
    assert torch.isnan(q).all() and torch.equal(G, Gs), "a rejected call wrote"

    c = torch.ones(2, 1, r, dtype=torch.float64)
    out = _nan((2, d), torch.float32)
    for over, status, needle in [
        (dict(ldo=d - 1), INVALID_ARGUMENT, "ldo"),
        (dict(c=PTR(0)), NULL_POINTER, "c"),
        (dict(out=PTR(0)), NULL_POINTER, "out"),
        (dict(alpha=NAN), INVALID_ARGUMENT, "alpha"),
        (dict(x=PTR(out.data_ptr() + 4)), INVALID_ARGUMENT, "overlaps"),
        (dict(x=_p(out), ldx=d + 1), INVALID_ARGUMENT, "alias"),
    ]:
        a = dict(dt=0, r=r, d=d, block=d, G=_p(G), ldg=d, nvec=2, alpha=1.0, x=_p(x), ldx=d, c=_p(c), out=_p(out),
                 ldo=d)
        a.update(over)
        st = L.kk_mfac_combine_cuda(*a.values(), None)
        assert st == status and needle in emu.last_error(), (over, st, emu.last_error())
    assert torch.isnan(out).all()
    assert L.kk_mfac_diag_cuda(0, r, d, _p(G), d - 1, 1.0, 1.0, _p(out), None) == INVALID_ARGUMENT
    assert L.kk_mfac_diag_cuda(2, r, d, _p(G), d, 1.0, 1.0, _p(out), None) == UNSUPPORTED_DTYPE

    # static setup: damp, workspace (NULL, small, misaligned), aliasing a bfloat16 G
    nb = I64(-1)
    assert L.kk_mfac_static_setup_cuda_workspace_size(0, r, d, 8, ctypes.byref(nb)) == OK and nb.value > 0
    assert L.kk_mfac_static_setup_cuda_workspace_size(0, r, d, 8, None) == NULL_POINTER
    raw, base, _ = _workspace(nb.value)
    Z = _nan((8, d), torch.float32)
    Gb = G.to(torch.bfloat16)
    for over, status, needle in [
        (dict(damp=0.0), INVALID_ARGUMENT, "damp"),
        (dict(damp=float("inf")), INVALID_ARGUMENT, "damp"),
        (dict(block=0), INVALID_ARGUMENT, "block"),
        (dict(ws=PTR(0)), NULL_POINTER, "workspace"),
        (dict(wsb=nb.value - 1), INVALID_ARGUMENT, "workspace_bytes"),
        (dict(ws=PTR(base.value + 8)), INVALID_ARGUMENT, "aligned"),
        (dict(ldz=d - 1), INVALID_ARGUMENT, "ldz"),
        (dict(dt=3, G=_p(Gb), Z=_p(Gb)), INVALID_ARGUMENT, "Z may be G"),
    ]:
        a = dict(dt=0, m=r, d=d, block=8, G=_p(G), ldg=d, damp=0.1, Z=_p(Z), ldz=d, ws=base, wsb=nb.value)
        a.update(over)
        st = L.kk_mfac_static_setup_cuda(*a.values(), None)
        assert st == status and needle in emu.last_error(), (over, st, emu.last_error())
    assert torch.isnan(Z).all()

    # window: m, damp, row, NULLs, workspace; coef: overlap
    m = 5
    _, gram = _window(m, 4, 22)
    kinv = _nan((m, m), torch.float64)
    rawm, basem, offm, nbm = window_ws(emu, m)
    newcol = gram[1].clone()
    for args, status, needle in [
        ((0, 0.1, _p(gram), _p(kinv), 0, _p(newcol), basem, nbm), INVALID_SIZE, "m must be"),
        ((m, -1.0, _p(gram), _p(kinv), 0, _p(newcol), basem, nbm), INVALID_ARGUMENT, "damp"),
        ((m, NAN, _p(gram), _p(kinv), 0, _p(newcol), basem, nbm), INVALID_ARGUMENT, "damp"),
        ((m, 0.1, _p(gram), _p(kinv), m, _p(newcol), basem, nbm), INVALID_ARGUMENT, "row"),
        ((m, 0.1, _p(gram), _p(kinv), -1, _p(newcol), basem, nbm), INVALID_ARGUMENT, "row"),
        ((m, 0.1, _p(gram), _p(kinv), 0, None, basem, nbm), NULL_POINTER, "newcol"),
        ((m, 0.1, _p(gram), _p(kinv), 0, _p(newcol), basem, nbm - 1), INVALID_ARGUMENT, "workspace_bytes"),
    ]:
        st = L.kk_mfac_window_update_cuda(*args, None)
        assert st == status and needle in emu.last_error(), (args, st, emu.last_error())
    assert L.kk_mfac_window_rebuild_cuda(m, 0.0, _p(gram), _p(kinv), basem, nbm, None) == INVALID_ARGUMENT
    assert L.kk_mfac_window_rebuild_cuda(m, 0.1, _p(gram), _p(kinv), None, nbm, None) == NULL_POINTER
    assert L.kk_mfac_window_rebuild_cuda(-1, 0.1, _p(gram), _p(kinv), basem, nbm, None) == INVALID_SIZE
    assert torch.isnan(kinv).all()
    qv = torch.ones(2, m, dtype=torch.float64)
    assert L.kk_mfac_window_coef_cuda(m, 2, 1.0, _p(gram), _p(qv), PTR(qv.data_ptr() + 8 * m), None) == INVALID_ARGUMENT
    assert L.kk_mfac_window_coef_cuda(m, 2, 1.0, None, _p(qv), _p(kinv), None) == NULL_POINTER
    assert L.kk_mfac_window_cuda_workspace_size(-1, ctypes.byref(nb)) == INVALID_SIZE
