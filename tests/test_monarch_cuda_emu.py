"""Monarch's CUDA kernels (csrc/cuda/monarch.cu) under the CUDA host emulation (tests/cuda_emu): the
kk_monarch_*_cuda entry points against the float64 reference in float32, float16 and bfloat16, on
every code path of the launch plan.  No GPU needed: the emulation runs each CUDA thread as a fiber
with real barriers and NaN-poisoned shared memory (see tests/cuda_emu/include/kkemu.h).

The plan (BM, C, h cached or not, n-split, backward batch splits) depends on the shape, the batch
and the device's SM count and shared memory; CASES pick emulated devices and shapes that reach each
variant, and test_every_plan_variant_is_reached checks from the launch records that they do."""
from __future__ import annotations

import ctypes
import re

import pytest
import torch

from cuda_emu import Emulator, build, load, mutant_dir
from helpers import assert_close
from kernelkit.monarch.reference import monarch_reference, monarch_reference_bwd

KK = {torch.float32: 0, torch.float16: 2, torch.bfloat16: 3}
I64, PTR = ctypes.c_int64, ctypes.c_void_p
DEFAULT = ("h100", 0, 0)

# (shape (k, q, p, l, s, r), batch, device (preset, SMs, opt-in shared memory bytes)), plan reached
CASES = [
    ((4, 6, 5, 3, 7, 8), 37, DEFAULT),              # BM 16, h cached, one CTA column
    ((3, 10, 7, 5, 9, 6), 300, ("h100", 4, 0)),     # BM 64, cached
    ((4, 33, 17, 4, 33, 33), 100, ("h100", 4, 0)),  # BM 32, cached, C = 2 (two CTA groups over l = 4)
    ((16, 8, 8, 16, 12, 8), 17, ("h100", 4, 0)),    # uncached, C = 4
    ((16, 8, 8, 16, 12, 8), 300, DEFAULT),          # BM 32, cached, C = 1
    ((2, 16, 9, 8, 40, 4), 17, DEFAULT),            # uncached, n split over grid.z = 3
    ((2, 16, 9, 8, 40, 4), 300, ("h100", 4, 0)),    # BM 64, uncached
    ((5, 12, 11, 15, 13, 4), 300, DEFAULT),         # cached with an n split (grid.z = 2)
    ((6, 10, 7, 20, 5, 3), 17, ("h100", 4, 0)),     # cached, C = 8 with a partial last group
    ((6, 10, 7, 20, 5, 3), 300, DEFAULT),           # BM 32, uncached
    ((4, 64, 64, 4, 64, 64), 100, ("a100", 0, 0)),  # the A100's limits
    ((3, 10, 7, 5, 9, 6), 45, ("h100", 0, 23000)),  # opt-in too small for the cache or BM > 16
    ((4, 6, 5, 3, 7, 8), 1100, DEFAULT),            # backward: batch split of both weight grads
    ((5, 12, 11, 15, 13, 4), 1, DEFAULT),
    ((4, 6, 5, 3, 7, 8), 0, DEFAULT),
]


@pytest.fixture(scope="module")
def emu():
    e = load()
    yield e
    e.set_device("h100")
    e.set_schedule("forward")


def _data(shape, batch, dtype, seed, pad=0):
    """x, w1, w2, dout in `dtype` (x and dout as row-strided views when pad > 0), and their float64
    copies (the reference sees the same rounded inputs)."""
    k, q, p, l, s, r = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, k * p + pad, generator=g).to(dtype)[:, : k * p]
    w1 = (torch.randn(k, q, p, generator=g) / p ** 0.5).to(dtype)
    w2 = (torch.randn(l, s, r, generator=g) / r ** 0.5).to(dtype)
    dout = torch.randn(batch, l * s + pad, generator=g).to(dtype)[:, : l * s]
    return (x, w1, w2, dout), tuple(t.double() for t in (x, w1, w2, dout))


def _rows_nan(batch, width, pad, dtype):
    """A NaN-filled (batch, width + pad) buffer; returns it and its (batch, width) view."""
    buf = torch.full((batch, width + pad), float("nan"), dtype=dtype)
    return buf, buf[:, :width]


def _fwd(emu: Emulator, shape, x, w1, w2, pad=0):
    k, q, p, l, s, r = shape
    buf, out = _rows_nan(x.shape[0], l * s, pad, x.dtype)
    st = emu.lib.kk_monarch_fwd_cuda(KK[x.dtype], I64(x.shape[0]), *map(I64, shape), PTR(x.data_ptr()),
                                     I64(max(x.stride(0), k * p)), PTR(w1.data_ptr()), PTR(w2.data_ptr()),
                                     PTR(out.data_ptr()), I64(buf.stride(0)), PTR(0))
    assert st == 0, emu.last_error()
    return buf, out


def _bwd(emu: Emulator, shape, x, w1, w2, dout, need=(True, True, True), pad=0):
    k, q, p, l, s, r = shape
    B, dt = x.shape[0], x.dtype
    ws_bytes = ctypes.c_int64(-1)
    assert emu.lib.kk_monarch_bwd_cuda_workspace_size(KK[dt], I64(B), *map(I64, shape), ctypes.byref(ws_bytes)) == 0
    ws = torch.full((max(ws_bytes.value, 1),), 255, dtype=torch.uint8)  # garbage workspace
    dx_buf, dx = _rows_nan(B, k * p, pad, dt)
    dw1 = torch.full(w1.shape, float("nan"), dtype=dt)
    dw2 = torch.full(w2.shape, float("nan"), dtype=dt)
    ptr = lambda t, want: PTR(t.data_ptr() if want else 0)  # noqa: E731
    st = emu.lib.kk_monarch_bwd_cuda(KK[dt], I64(B), *map(I64, shape), PTR(x.data_ptr()), I64(max(x.stride(0), k * p)),
                                     PTR(w1.data_ptr()), PTR(w2.data_ptr()), PTR(dout.data_ptr()),
                                     I64(max(dout.stride(0), l * s)), ptr(dx, need[0]), I64(dx_buf.stride(0)),
                                     ptr(dw1, need[1]), ptr(dw2, need[2]), PTR(ws.data_ptr()), I64(ws_bytes.value),
                                     PTR(0))
    assert st == 0, emu.last_error()
    return dx_buf, dx, dw1, dw2


def _check(dtype, what, got, want, buf=None):
    if got.shape[0] == 0:
        return
    assert_close(got, want, dtype, what)
    if buf is not None and buf.shape[1] > got.shape[1]:  # the padding past each row stays untouched
        assert torch.isnan(buf[:, got.shape[1]:].float()).all(), f"{what}: written past the row"


def _case_id(c):
    (shape, batch, dev) = c
    return f"{'x'.join(map(str, shape))}-B{batch}-{dev[0]}{'-sm' + str(dev[1]) if dev[1] else ''}" \
           f"{'-optin' + str(dev[2]) if dev[2] else ''}"


@pytest.mark.parametrize("dtype", list(KK), ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_emulated_cuda_fwd_and_bwd_match_reference(emu, case, dtype):
    shape, batch, (preset, sms, optin) = case
    emu.set_device(preset, sms, optin)
    pad = 3 if batch % 2 else 0  # odd batches: row strides larger than the rows
    (x, w1, w2, dout), (x64, w164, w264, d64) = _data(shape, batch, dtype, seed=batch, pad=pad)
    buf, out = _fwd(emu, shape, x, w1, w2, pad)
    _check(dtype, "out", out, monarch_reference(x64, w164, w264), buf)
    dx_buf, dx, dw1, dw2 = _bwd(emu, shape, x, w1, w2, dout, pad=pad)
    rdx, rdw1, rdw2 = monarch_reference_bwd(x64, w164, w264, d64)
    _check(dtype, "dx", dx, rdx, dx_buf)
    if batch == 0:  # empty batch: the weight gradients are zero
        assert (dw1 == 0).all() and (dw2 == 0).all()
        return
    _check(dtype, "dw1", dw1, rdw1)
    _check(dtype, "dw2", dw2, rdw2)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, True, True), (False, False, False)])
def test_emulated_cuda_bwd_computes_only_the_requested_gradients(emu, need):
    emu.set_device("h100")
    shape = (6, 10, 7, 20, 5, 3)
    (x, w1, w2, dout), (x64, w164, w264, d64) = _data(shape, 41, torch.float32, seed=7)
    _, dx, dw1, dw2 = _bwd(emu, shape, x, w1, w2, dout, need)
    for want, got, ref, what in zip(need, (dx, dw1, dw2), monarch_reference_bwd(x64, w164, w264, d64),
                                    ("dx", "dw1", "dw2")):
        if want:
            _check(torch.float32, what, got, ref)
        else:
            assert torch.isnan(got).all(), f"{what} was not requested but was written"


@pytest.mark.parametrize("schedule", ["reverse", "shuffle"])
@pytest.mark.parametrize("case", [CASES[2], CASES[5], CASES[8], CASES[12]], ids=_case_id)
def test_emulated_cuda_is_independent_of_thread_order(emu, case, schedule):
    """Between two barriers the threads of a block run in another order (last first, or shuffled):
    a missing barrier shows up whichever side of it the reads and writes fall."""
    shape, batch, (preset, sms, optin) = case
    emu.set_device(preset, sms, optin)
    emu.set_schedule(schedule, seed=11)
    try:
        (x, w1, w2, dout), (x64, w164, w264, d64) = _data(shape, batch, torch.float32, seed=3)
        _, out = _fwd(emu, shape, x, w1, w2)
        _check(torch.float32, "out", out, monarch_reference(x64, w164, w264))
        _, dx, dw1, dw2 = _bwd(emu, shape, x, w1, w2, dout)
        for got, ref, what in zip((dx, dw1, dw2), monarch_reference_bwd(x64, w164, w264, d64), ("dx", "dw1", "dw2")):
            _check(torch.float32, what, got, ref)
    finally:
        emu.set_schedule("forward")


def _fwd_plan(launch, shape):
    """(BM, C, cached, nz) of a forward launch, from its kernel name, grid and dynamic shared memory."""
    k, q, p, l, s, r = shape
    bm = int(re.search(r"monarch_fwd_kernel<[^,]+, (\d+)>", launch["name"]).group(1))
    groups, nz = launch["grid"][1], launch["grid"][2]
    hs = (bm + 4) * 4  # bytes per cached h column
    cached = launch["dyn_smem"] != 32 * hs
    c = launch["dyn_smem"] // hs // r if cached else None
    return bm, c, cached, nz, groups


def test_every_plan_variant_is_reached(emu):
    """The CASES above reach each forward variant (batch tile 16/32/64, h cached or recomputed, one
    or several output blocks per CTA with a partial last group, n split over grid.z) and both
    backward variants (weight gradients straight or split over the batch and reduced), and every
    kernel instantiation of the three element types runs."""
    seen, names = set(), set()
    for shape, batch, (preset, sms, optin) in CASES:
        if batch == 0:
            continue
        emu.set_device(preset, sms, optin)
        for dtype in KK:
            (x, w1, w2, dout), _ = _data(shape, batch, dtype, seed=0)
            emu.clear_launches()
            _fwd(emu, shape, x, w1, w2)
            _bwd(emu, shape, x, w1, w2, dout)
            launches = emu.launches()
            names.update(la["name"] for la in launches)
            bm, c, cached, nz, groups = _fwd_plan(launches[0], shape)
            seen.add(("BM", bm))
            seen.add(("cached", cached))
            seen.add(("BM, cached", bm, cached))
            seen.add(("nz > 1, cached", nz > 1, cached))
            l = shape[3]
            if cached and c is not None and c > 1:
                seen.add(("C > 1", True))
                seen.add(("partial group", l % c != 0))
            seen.add(("batch-split backward", any("reduce_splits" in la["name"] for la in launches)))
    emu.set_device("h100")
    want = {("BM", 16), ("BM", 32), ("BM", 64), ("cached", True), ("cached", False),
            ("BM, cached", 16, False), ("BM, cached", 32, False), ("BM, cached", 64, False),
            ("BM, cached", 16, True), ("BM, cached", 32, True), ("BM, cached", 64, True),
            ("nz > 1, cached", True, True), ("nz > 1, cached", True, False), ("C > 1", True),
            ("partial group", True), ("batch-split backward", True), ("batch-split backward", False)}
    assert want <= seen, f"plan variants not reached: {sorted(want - seen)}"
    expected = set()
    for t in ("float", "__half", "__nv_bfloat16"):
        expected |= {f"monarch_fwd_kernel<{t}, {bm}>(FwdParams)" for bm in (16, 32, 64)}
        expected.add(f"monarch_reduce_splits_kernel<{t}>(float const*, long, int, {t}*)")
        for ta, tb, tc in ((t, t, "float"), (t, "float", t), (t, "float", "float"), ("float", t, t),
                           ("float", t, "float")):
            expected.add(f"monarch_gemm_kernel<{ta}, {tb}, {tc}>(GemmParams)")
    assert expected <= names, f"kernels never launched: {sorted(expected - names)}"


def test_a_device_without_room_for_the_forward_is_an_error_not_a_crash(emu):
    emu.set_device("h100", 0, 20000)  # less than the smallest plan's shared memory
    try:
        shape = (4, 6, 5, 3, 7, 8)
        (x, w1, w2, _), _ = _data(shape, 5, torch.float32, seed=0)
        out = torch.empty(5, 21)
        st = emu.lib.kk_monarch_fwd_cuda(0, I64(5), *map(I64, shape), PTR(x.data_ptr()), I64(20), PTR(w1.data_ptr()),
                                         PTR(w2.data_ptr()), PTR(out.data_ptr()), I64(21), PTR(0))
        assert st == 6 and "allows only 20000 bytes" in emu.last_error()
    finally:
        emu.set_device("h100")


# ---- the emulation catches real kernel bugs --------------------------------------------------------------
# Each mutant is a scratch copy of csrc/cuda with one deliberate bug; the emulation must make the
# Monarch test above fail on it (and say why, where it can).
MUTANTS = {
    # the barrier between the GEMM's shared-memory tile loads and their use: threads read tiles that
    # other threads have not written yet (poisoned NaN) or already overwrote
    "missing __syncthreads after the GEMM tile loads": (
        "    load_tile<kGBN, kGBS>(Bs, B, n0, P.N, P.sBn, P.sBk, k0, ke, P.b_n_fast, tid);\n    __syncthreads();\n",
        "    load_tile<kGBN, kGBS>(Bs, B, n0, P.N, P.sBn, P.sBk, k0, ke, P.b_n_fast, tid);\n"),
    # the stage-2 w2 tile loop stops one row early: the last row of each w2 tile stays unwritten
    "off-by-one bound in the forward's w2 tile copy": (
        "for (int e = tid; e < kFwdR * P.BN; e += kFwdThreads) {",
        "for (int e = tid; e < kFwdR * (P.BN - 1); e += kFwdThreads) {"),
    # an early return for idle threads placed before a barrier the others still reach
    "early return before a barrier": (
        "  if (cl >= Cg) return;  // idle slots (no barrier follows inside this function)\n",
        "  if (cl >= Cg) return;  // idle slots (no barrier follows inside this function)\n  __syncthreads();\n"),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_the_emulation_catches_a_deliberate_bug(tmp_path, mutant):
    emu = Emulator(build(cuda_dir=mutant_dir(tmp_path, "monarch.cu", *MUTANTS[mutant]), opt="-O1"))
    emu.set_device("h100", 4, 0)
    shape, batch = (16, 8, 8, 16, 12, 8), 17  # C = 4: some stage-2 slots are idle
    (x, w1, w2, dout), (x64, w164, w264, d64) = _data(shape, batch, torch.float32, seed=1)
    k, q, p, l, s, r = shape
    out = torch.full((batch, l * s), float("nan"))
    st = emu.lib.kk_monarch_fwd_cuda(0, I64(batch), *map(I64, shape), PTR(x.data_ptr()), I64(k * p),
                                     PTR(w1.data_ptr()), PTR(w2.data_ptr()), PTR(out.data_ptr()), I64(l * s), PTR(0))
    failures = []
    if st != 0:
        failures.append(emu.last_error())
    else:
        try:
            _check(torch.float32, "out", out, monarch_reference(x64, w164, w264))
        except AssertionError as e:
            failures.append(str(e))
        try:
            _, dx, dw1, dw2 = _bwd(emu, shape, x, w1, w2, dout)
            for got, ref, what in zip((dx, dw1, dw2), monarch_reference_bwd(x64, w164, w264, d64), ("dx", "dw1", "dw2")):
                _check(torch.float32, what, got, ref)
        except AssertionError as e:
            failures.append(str(e))
    print(f"{mutant}: caught: {failures}")
    assert failures, f"the emulation did not catch: {mutant}"
    if mutant == "early return before a barrier":
        assert "never reached" in failures[0] and "monarch_fwd_kernel" in failures[0], failures
