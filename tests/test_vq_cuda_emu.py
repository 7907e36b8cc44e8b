"""The vq family's CUDA kernels (csrc/cuda/vq.cu) under the CUDA host emulation (tests/cuda_emu):
kk_vq_dequantize_cuda, kk_vq_linear_{fwd,bwd}_cuda and kk_vq_assign_cuda against a float64 reference
computed here from the dequantized weight, in float32, float16 and bfloat16, NaN-poisoned outputs, on
every variant of the launch plan.  No GPU needed: the emulation runs each CUDA thread as a fiber with
real barriers and NaN-poisoned shared memory (tests/cuda_emu/include/kkemu.h).

The plan: forward GEMV (vq_gemv_kernel<T, d, codebooks-in-shared-memory>, one or more batch tiles of 8
rows, one or more x chunks) or GEMM (vq_gemm_kernel<T>: tensor cores for 16-bit types, FMA for float32);
dx always through the GEMM kernel on W^T tiles; codebook / scale gradients through vq_dw_kernel and
vq_finish_kernel.  CASES reach each variant; test_every_plan_variant_is_reached checks it from the launch
records.  The reference (dequantize in float64, dense matmuls, index_add for the codebooks) is written
here with plain torch, independent of kernelkit.vq."""
from __future__ import annotations

import ctypes
import math
import os
import re

import pytest
import torch

from cuda_emu import Emulator, build, load, mutant_dir
from helpers import assert_close

KK = {torch.float32: 0, torch.float16: 2, torch.bfloat16: 3}
I64, I32, PTR = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
OK, NULL_POINTER, INVALID_SIZE, INVALID_ARGUMENT, UNSUPPORTED_DTYPE, CUDA_ERROR = 0, 1, 2, 3, 4, 6
AUTO, GEMV, GEMM = 0, 1, 2
DEFAULT = ("h100", 0, 0)
GEMV_B = 8  # kGemvB in vq.cu: batch rows per GEMV tile


class Format(ctypes.Structure):
    _fields_ = [("n_out", ctypes.c_int64), ("n_in", ctypes.c_int64), ("codebook_size", ctypes.c_int64),
                ("rows_per_codebook", ctypes.c_int64), ("group_size", ctypes.c_int32),
                ("num_codebooks", ctypes.c_int32), ("code_bits", ctypes.c_int32), ("flags", ctypes.c_int32)]


@pytest.fixture(scope="module")
def emu():
    e = load()
    L = e.lib
    fmt = ctypes.POINTER(Format)
    L.kk_vq_dequantize_cuda.argtypes = [I32, fmt, PTR, PTR, PTR, PTR, I64, PTR]
    L.kk_vq_linear_fwd_cuda_workspace_size.argtypes = [I32, fmt, I64, I32, ctypes.POINTER(I64)]
    L.kk_vq_linear_fwd_cuda.argtypes = [I32, fmt, I64, PTR, PTR, PTR, PTR, I64, PTR, PTR, I64, I32, PTR, I64, PTR]
    L.kk_vq_linear_bwd_cuda_workspace_size.argtypes = [I32, fmt, I64, ctypes.POINTER(I64)]
    L.kk_vq_linear_bwd_cuda.argtypes = [I32, fmt, I64, PTR, PTR, PTR, PTR, I64, PTR, I64, PTR, I64, PTR, PTR, PTR,
                                        I64, PTR]
    L.kk_vq_assign_cuda.argtypes = [I32, I64, I64, I32, PTR, PTR, I32, PTR, PTR, PTR]
    yield e
    e.set_device("h100")
    e.set_schedule("forward")


def _p(t):
    return PTR(0 if t is None else t.data_ptr())


# ---- problems --------------------------------------------------------------------------------------------
class Problem:
    """codes / codebooks / scales / bias / x / dout in `dtype` (x and dout row-strided when pad > 0) and
    the float64 W the reference uses, built from the same rounded values."""

    def __init__(self, n_out, n_in, d, K, M, bits, batch, dtype, rpc=None, scales=True, bias=True, seed=0, pad=0):
        self.n_out, self.n_in, self.d, self.K, self.M, self.bits = n_out, n_in, d, K, M, bits
        self.batch, self.dtype, self.pad = batch, dtype, pad
        self.rpc = rpc if rpc is not None else max(n_out, 1)
        self.S = -(-n_out // self.rpc) if n_out else 1
        G = n_in // d
        g = torch.Generator().manual_seed(seed)
        self.ucodes = torch.randint(0, K, (n_out, G, M), generator=g)
        if bits == 8:
            self.codes = self.ucodes.to(torch.uint8)
        else:  # int16, values >= 2^15 stored negative (AQLM)
            self.codes = torch.where(self.ucodes >= 32768, self.ucodes - 65536, self.ucodes).to(torch.int16)
        self.codebooks = (torch.randn(self.S, M, K, d, generator=g) / math.sqrt(M)).to(dtype)
        self.scales = (0.5 + torch.rand(n_out, generator=g)).to(dtype) if scales else None
        self.bias = torch.randn(n_out, generator=g).to(dtype) if bias else None
        self.x = (torch.randn(batch, n_in + pad, generator=g) / math.sqrt(max(n_in, 1))).to(dtype)[:, :n_in]
        self.dout = torch.randn(batch, n_out + pad, generator=g).to(dtype)[:, :n_out]
        # reference
        s_of = torch.arange(n_out) // self.rpc
        self.flat = ((s_of.view(-1, 1, 1) * M + torch.arange(M).view(1, 1, -1)) * K + self.ucodes).reshape(-1)
        cb64 = self.codebooks.double().reshape(-1, d)
        self.u64 = cb64[self.flat].view(n_out, G, M, d).sum(2).reshape(n_out, n_in)
        self.w64 = self.u64 * (self.scales.double().view(-1, 1) if scales else 1.0)

    def fmt(self, **over):
        f = dict(n_out=self.n_out, n_in=self.n_in, codebook_size=self.K, rows_per_codebook=self.rpc,
                 group_size=self.d, num_codebooks=self.M, code_bits=self.bits, flags=0)
        f.update(over)
        return Format(**f)

    def ref_fwd(self):
        out = self.x.double() @ self.w64.t()
        return out + self.bias.double() if self.bias is not None else out

    def ref_bwd(self):
        d64, x64 = self.dout.double(), self.x.double()
        dx = d64 @ self.w64
        dw = d64.t() @ x64
        dws = dw * (self.scales.double().view(-1, 1) if self.scales is not None else 1.0)
        src = dws.view(self.n_out, -1, 1, self.d).expand(-1, -1, self.M, -1).reshape(-1, self.d)
        dcb = torch.zeros(self.S * self.M * self.K, self.d, dtype=torch.float64).index_add_(0, self.flat, src)
        dsc = (dw * self.u64).sum(1) if self.scales is not None else None
        return dx, dcb.view(self.S, self.M, self.K, self.d), dsc

    def ld(self, t, width):
        return max(t.stride(0), width) if t.dim() == 2 and t.shape[0] > 0 else width


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def _nan_rows(batch, width, pad, dtype):
    buf = _nan((batch, width + pad), dtype)
    return buf, buf[:, :width]


def fwd(emu, pb, path=AUTO):
    buf, out = _nan_rows(pb.batch, pb.n_out, pb.pad, pb.dtype)
    f = pb.fmt()
    st = emu.lib.kk_vq_linear_fwd_cuda(KK[pb.dtype], ctypes.byref(f), pb.batch, _p(pb.codes), _p(pb.codebooks),
                                       _p(pb.scales), _p(pb.x), pb.ld(pb.x, pb.n_in), _p(pb.bias), _p(out),
                                       buf.stride(0), path, None, 0, None)
    assert st == OK, emu.last_error()
    return buf, out


def bwd_workspace(emu, pb):
    n = I64(-1)
    f = pb.fmt()
    st = emu.lib.kk_vq_linear_bwd_cuda_workspace_size(KK[pb.dtype], ctypes.byref(f), pb.batch, ctypes.byref(n))
    assert st == OK, emu.last_error()
    return n.value


def _workspace(nbytes):
    ws = torch.full((nbytes + 16,), 255, dtype=torch.uint8)  # garbage (NaN as float32), 16-byte aligned view
    off = (-ws.data_ptr()) % 16
    return ws, ws.data_ptr() + off


def bwd(emu, pb, need=(True, True, True)):
    nbytes = bwd_workspace(emu, pb)
    ws, base = _workspace(nbytes)
    dx_buf, dx = _nan_rows(pb.batch, pb.n_in, pb.pad, pb.dtype)
    dcb = _nan(tuple(pb.codebooks.shape), pb.dtype)
    dsc = _nan((pb.n_out,), pb.dtype)
    want_ds = need[2] and pb.scales is not None
    f = pb.fmt()
    st = emu.lib.kk_vq_linear_bwd_cuda(KK[pb.dtype], ctypes.byref(f), pb.batch, _p(pb.codes), _p(pb.codebooks),
                                       _p(pb.scales), _p(pb.x), pb.ld(pb.x, pb.n_in), _p(pb.dout),
                                       pb.ld(pb.dout, pb.n_out), _p(dx if need[0] else None), dx_buf.stride(0),
                                       _p(dcb if need[1] else None), _p(dsc if want_ds else None), PTR(base),
                                       nbytes, None)
    assert st == OK, emu.last_error()
    return dx_buf, dx, dcb, dsc


def dequant(emu, pb, pad=3):
    buf = _nan((pb.n_out, pb.n_in + pad), pb.dtype)
    f = pb.fmt()
    st = emu.lib.kk_vq_dequantize_cuda(KK[pb.dtype], ctypes.byref(f), _p(pb.codes), _p(pb.codebooks),
                                       _p(pb.scales), _p(buf), buf.stride(0), None)
    assert st == OK, emu.last_error()
    return buf


def _check(dtype, what, got, want, buf=None):
    if got.numel() == 0:
        return
    if float(want.abs().max()) == 0.0:
        assert float(got.float().abs().max()) == 0.0, f"{what} must be zero"
    else:
        assert_close(got, want, dtype, what)
    if buf is not None and buf.shape[1] > got.shape[1]:  # the padding past each row stays untouched
        assert torch.isnan(buf[:, got.shape[1]:].float()).all(), f"{what}: written past the row"


# ---- the cases -------------------------------------------------------------------------------------------
# (id, n_out, n_in, d, K, M, code bits, rows_per_codebook, batch, device): the plan reached (AUTO path).
CASES = [
    ("vq4dit-2bit-b1", 33, 64, 4, 256, 1, 8, None, 1, DEFAULT),      # GEMV d=4, codebook in smem
    ("3bit-d2-K64-b7", 17, 32, 2, 64, 1, 8, None, 7, DEFAULT),       # GEMV d=2, odd n_out
    ("aqlm-2x8g8-b16", 40, 64, 8, 256, 2, 8, None, 16, DEFAULT),     # GEMV d=8, M=2 (smem), two batch tiles
    ("aqlm-8x8-d1-b2", 24, 16, 1, 256, 8, 8, None, 2, DEFAULT),      # GEMV d=1, M=8 (smem)
    ("aqlm-1x16g8-b3", 9, 32, 8, 65536, 1, 16, None, 3, DEFAULT),    # GEMV int16 codes, K=65536: codebook from cache
    ("K4096-d16-b2", 10, 64, 16, 4096, 1, 16, None, 2, DEFAULT),     # GEMV d=16, 256 KiB codebook: from cache
    ("per-set-b5", 40, 32, 4, 64, 2, 8, 16, 5, DEFAULT),             # 3 codebook sets (last partial), smem
    ("per-row-b4", 5, 16, 4, 16, 1, 8, 1, 4, DEFAULT),               # one set per row: not worth staging
    ("x-chunks-b2", 3, 1040, 16, 64, 1, 8, None, 2, DEFAULT),        # GEMV: two x chunks (1024 + 16)
    ("small-optin-b1", 33, 64, 4, 256, 1, 8, None, 1, ("h100", 0, 20000)),  # 512-column chunks, no smem codebook
    ("a100-b9", 21, 48, 4, 256, 1, 8, None, 9, ("a100", 0, 0)),      # the A100's limits
    ("gemm-b17", 37, 64, 4, 256, 1, 8, None, 17, DEFAULT),           # GEMM, one tile, two k steps
    ("gemm-b300", 70, 96, 8, 256, 2, 8, None, 300, DEFAULT),         # GEMM, 5 x 2 tiles, partial k step
    ("gemm-K65536-b20", 9, 48, 8, 65536, 1, 16, None, 20, DEFAULT),  # GEMM with int16 codes
    ("gemm-per-set-b33", 50, 32, 2, 64, 1, 8, 7, 33, DEFAULT),       # GEMM, 8 sets
    ("n_in-0-b3", 7, 0, 4, 16, 1, 8, None, 3, DEFAULT),              # out = bias, dx empty, gradients zero
    ("batch-0", 20, 32, 4, 64, 1, 8, None, 0, DEFAULT),              # nothing to write; gradients zero
]
CASE_IDS = [c[0] for c in CASES]
DTYPES = list(KK)
DTYPE_IDS = [str(d).replace("torch.", "") for d in DTYPES]


def _problem(case, dtype, seed=None, scales=True, bias=True):
    _, n_out, n_in, d, K, M, bits, rpc, batch, _ = case
    return Problem(n_out, n_in, d, K, M, bits, batch, dtype, rpc=rpc, scales=scales, bias=bias,
                   seed=batch if seed is None else seed, pad=3 if batch % 2 else 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_emulated_cuda_matches_reference(emu, case, dtype):
    emu.set_device(*case[9])
    pb = _problem(case, dtype)
    buf, out = fwd(emu, pb)
    _check(dtype, "out", out, pb.ref_fwd(), buf)
    dx_buf, dx, dcb, dsc = bwd(emu, pb)
    rdx, rdcb, rdsc = pb.ref_bwd()
    _check(dtype, "dx", dx, rdx, dx_buf)
    _check(dtype, "dcodebooks", dcb, rdcb)
    _check(dtype, "dscales", dsc, rdsc)
    w = dequant(emu, pb)
    _check(dtype, "dequantize", w[:, :pb.n_in], pb.w64, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("path,batch", [(GEMM, 1), (GEMM, 5), (GEMV, 40)], ids=["gemm-b1", "gemm-b5", "gemv-b40"])
def test_emulated_cuda_forced_paths(emu, path, batch, dtype):
    """Each path gives the same result at batch sizes AUTO would not pick it for."""
    emu.set_device("h100")
    pb = Problem(19, 48, 4, 64, 2, 8, batch, dtype, seed=5, pad=1)
    emu.clear_launches()
    buf, out = fwd(emu, pb, path)
    (la,) = emu.launches()
    assert ("vq_gemm_kernel" if path == GEMM else "vq_gemv_kernel") in la["name"]
    _check(dtype, "out", out, pb.ref_fwd(), buf)


@pytest.mark.parametrize("case", [CASES[0], CASES[6], CASES[12]], ids=lambda c: c[0])
def test_emulated_cuda_without_scales_and_bias(emu, case):
    emu.set_device(*case[9])
    pb = _problem(case, torch.float32, scales=False, bias=False)
    buf, out = fwd(emu, pb)
    _check(torch.float32, "out", out, pb.ref_fwd(), buf)
    _, dx, dcb, dsc = bwd(emu, pb)
    rdx, rdcb, _ = pb.ref_bwd()
    _check(torch.float32, "dx", dx, rdx)
    _check(torch.float32, "dcodebooks", dcb, rdcb)
    assert torch.isnan(dsc).all()


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, False, False)], ids=["dx", "dcodebooks", "dscales", "none"])
def test_emulated_cuda_bwd_computes_only_the_requested_gradients(emu, need):
    emu.set_device("h100")
    pb = Problem(21, 32, 4, 64, 2, 8, 6, torch.float32, seed=7)
    _, dx, dcb, dsc = bwd(emu, pb, need)
    for want, got, ref, what in zip(need, (dx, dcb, dsc), pb.ref_bwd(), ("dx", "dcodebooks", "dscales")):
        if want:
            _check(torch.float32, what, got, ref)
        else:
            assert torch.isnan(got).all(), f"{what} was not requested but was written"


@pytest.mark.parametrize("schedule", ["reverse", "shuffle"])
@pytest.mark.parametrize("case", [CASES[2], CASES[6], CASES[8], CASES[12]], ids=lambda c: c[0])
def test_emulated_cuda_is_independent_of_thread_order(emu, case, schedule):
    """Threads of a block run last-first or shuffled between barriers: a missing barrier shows up."""
    emu.set_device(*case[9])
    emu.set_schedule(schedule, seed=11)
    try:
        pb = _problem(case, torch.bfloat16, seed=3)
        _, out = fwd(emu, pb)
        _check(torch.bfloat16, "out", out, pb.ref_fwd())
        _, dx, dcb, dsc = bwd(emu, pb)
        rdx, rdcb, rdsc = pb.ref_bwd()
        _check(torch.bfloat16, "dx", dx, rdx)
        _check(torch.bfloat16, "dcodebooks", dcb, rdcb)
        _check(torch.bfloat16, "dscales", dsc, rdsc)
    finally:
        emu.set_schedule("forward")


# ---- the launch plan ---------------------------------------------------------------------------------------
_GEMV = re.compile(r"vq_gemv_kernel<([^,]+), (\d+), (true|false)>")


def test_every_plan_variant_is_reached(emu):
    """The CASES reach: the GEMV kernel for d = 1, 2, 4, 8, 16, with the codebook set in shared memory and
    read through the cache, one and several batch tiles, one and several x chunks, 1024- and 512-column
    chunks, one and several codebook sets; the GEMM kernel for the forward and dx; the gradient kernels;
    every kernel instantiation of the three element types."""
    seen, names = set(), set()
    for case in CASES:
        _, n_out, n_in, d, K, M, bits, rpc, batch, dev = case
        emu.set_device(*dev)
        for dtype in DTYPES:
            pb = _problem(case, dtype)
            emu.clear_launches()
            fwd(emu, pb)
            f = emu.launches()
            emu.clear_launches()
            bwd(emu, pb)
            b = emu.launches()
            names.update(la["name"] for la in f + b)
            for la in f:
                m = _GEMV.search(la["name"])
                if m:
                    cbs = m.group(3) == "true"
                    seen.add(("gemv d", int(m.group(2))))
                    seen.add(("gemv smem codebook", cbs))
                    seen.add(("gemv batch tiles > 1", la["grid"][1] > 1))
                    seen.add(("gemv sets > 1", pb.S > 1))
                    cb_bytes = -(-M * K * d // 4) * 16 if cbs else 0
                    ic = (la["dyn_smem"] - cb_bytes) // (GEMV_B * 4)
                    seen.add(("gemv chunk", ic))
                    seen.add(("gemv chunks > 1", n_in > ic))
                elif "vq_gemm_kernel" in la["name"]:
                    seen.add(("fwd gemm", la["grid"][0] > 1, la["grid"][1] > 1))
            if any("vq_gemm_kernel" in la["name"] for la in b):
                seen.add(("dx gemm",))
            if any("vq_dw_kernel" in la["name"] for la in b):
                seen.add(("dw",))
    emu.set_device("h100")
    want = {("gemv d", d) for d in (1, 2, 4, 8, 16)}
    want |= {("gemv smem codebook", True), ("gemv smem codebook", False), ("gemv batch tiles > 1", True),
             ("gemv batch tiles > 1", False), ("gemv sets > 1", True), ("gemv chunk", 1024), ("gemv chunk", 512),
             ("gemv chunks > 1", True), ("gemv chunks > 1", False), ("fwd gemm", True, True),
             ("fwd gemm", False, False), ("dx gemm",), ("dw",)}
    assert want <= seen, f"never reached: {sorted(want - seen, key=str)}"
    expected = set()
    for t in ("float", "__half", "__nv_bfloat16"):
        expected |= {f"vq_gemm_kernel<{t}>(GemmParams)", f"vq_dw_kernel<{t}>(DwParams)"}
        expected |= {f"vq_finish_kernel<{t}>(float const*, long, {t}*)"}
        expected |= {f"vq_gemv_kernel<{t}, {d}, {c}>(GemvParams)" for d in (4, 8) for c in ("true", "false")}
    missing = {e for e in expected if e not in names}
    assert not missing, f"kernels never launched: {sorted(missing)}; launched: {sorted(names)}"


def test_workspace_depends_on_the_format_only(emu):
    """float32 codebook sums (S*M*K*d) and scale sums (n_out), each rounded to 256 bytes; the same on
    every device and batch; the forward needs none."""
    pb = Problem(40, 32, 4, 64, 2, 8, 5, torch.float16, rpc=16)
    sizes = set()
    for dev in (DEFAULT, ("a100", 0, 0), ("h100", 0, 20000)):
        emu.set_device(dev[0], dev[1], dev[2])
        for batch in (0, 1, 300):
            pb.batch = batch
            sizes.add(bwd_workspace(emu, pb))
    emu.set_device("h100")
    assert sizes == {-(-3 * 2 * 64 * 4 * 4 // 256) * 256 + 256}, sizes
    n = I64(-1)
    f = pb.fmt()
    assert emu.lib.kk_vq_linear_fwd_cuda_workspace_size(2, ctypes.byref(f), 5000, AUTO, ctypes.byref(n)) == OK
    assert n.value == 0


@pytest.mark.skipif(bool(os.environ.get("KKEMU_LIB")), reason="8 GiB of address space: not under ASan")
@pytest.mark.parametrize("path", [GEMV, GEMM])
def test_row_offsets_past_2_31_elements(emu, path):
    """b * ldx, b * ldo and b * lddx in 64 bits: row strides of 2^31 + 8 elements."""
    emu.set_device("h100")
    pb = Problem(6, 32, 4, 16, 1, 8, 2, torch.float16, seed=2)
    ld = 2 ** 31 + 8
    try:
        xbig = torch.empty(ld + pb.n_in, dtype=torch.float16)
        obig = torch.empty(ld + pb.n_out, dtype=torch.float16)
        dbig = torch.empty(ld + pb.n_out, dtype=torch.float16)
        dxbig = torch.empty(ld + pb.n_in, dtype=torch.float16)
    except RuntimeError as e:
        pytest.skip(f"cannot reserve the buffers: {e}")
    xbig[:pb.n_in], xbig[ld:] = pb.x[0], pb.x[1]
    dbig[:pb.n_out], dbig[ld:] = pb.dout[0], pb.dout[1]
    for t, w in ((obig, pb.n_out), (dxbig, pb.n_in)):
        t[:w] = float("nan")
        t[ld:] = float("nan")
    f = pb.fmt()
    st = emu.lib.kk_vq_linear_fwd_cuda(2, ctypes.byref(f), 2, _p(pb.codes), _p(pb.codebooks), _p(pb.scales),
                                       _p(xbig), ld, _p(pb.bias), _p(obig), ld, path, None, 0, None)
    assert st == OK, emu.last_error()
    _check(torch.float16, "out", torch.stack([obig[:pb.n_out], obig[ld:]]), pb.ref_fwd())
    nbytes = bwd_workspace(emu, pb)
    ws, base = _workspace(nbytes)
    dcb = _nan(tuple(pb.codebooks.shape), torch.float16)
    st = emu.lib.kk_vq_linear_bwd_cuda(2, ctypes.byref(f), 2, _p(pb.codes), _p(pb.codebooks), _p(pb.scales),
                                       _p(xbig), ld, _p(dbig), ld, _p(dxbig), ld, _p(dcb), None, PTR(base), nbytes,
                                       None)
    assert st == OK, emu.last_error()
    rdx, rdcb, _ = pb.ref_bwd()
    _check(torch.float16, "dx", torch.stack([dxbig[:pb.n_in], dxbig[ld:]]), rdx)
    _check(torch.float16, "dcodebooks", dcb, rdcb)


# ---- assign --------------------------------------------------------------------------------------------------
def _assign(emu, V, C, topn, dist=True):
    n, d = V.shape
    idx = torch.full((n, topn), -7, dtype=torch.int32)
    dd = _nan((n, topn), torch.float32)
    st = emu.lib.kk_vq_assign_cuda(0, n, C.shape[0], d, _p(V), _p(C), topn, _p(idx), _p(dd if dist else None), None)
    assert st == OK, emu.last_error()
    return idx, dd


@pytest.mark.parametrize("n,K,d,topn", [(300, 256, 4, 1), (37, 600, 16, 8), (5, 64, 1, 3), (9, 5000, 2, 2),
                                        (20, 70, 20, 4), (1, 8, 8, 8)])
def test_emulated_cuda_assign_matches_reference(emu, n, K, d, topn):
    """idx and dist against float64 distances; K = 600 with d = 16 and K = 5000 with d = 2 span several
    centroid chunks; d = 20 takes the global-memory kernel."""
    emu.set_device("h100")
    g = torch.Generator().manual_seed(n + K)
    V = torch.randn(n, d, generator=g)
    C = torch.randn(K, d, generator=g)
    idx, dist = _assign(emu, V, C, topn)
    d64 = ((V.double().unsqueeze(1) - C.double().unsqueeze(0)) ** 2).sum(-1)
    ref = torch.sort(d64, dim=1, stable=True)
    got64 = d64.gather(1, idx.long())
    assert_close(dist, got64, torch.float32, "dist (as returned vs float64 at the returned idx)")
    assert_close(got64, ref.values[:, :topn], torch.float32, "dist (the nearest topn)")
    top = ref.values[:, :topn + 1]
    clear = (top[:, 1:] - top[:, :-1]).min(1).values > 1e-4 if top.shape[1] > 1 else torch.ones(n, dtype=torch.bool)
    assert (idx[clear] == ref.indices[clear, :topn].int()).all()
    assert (idx >= 0).all() and (idx < K).all()


def test_emulated_cuda_assign_ties_take_the_smaller_index(emu):
    emu.set_device("h100")
    C = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [3.0, 3.0]])
    V = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 0.0]])
    idx, dist = _assign(emu, V, C, 4)
    assert idx.tolist() == [[1, 3, 0, 2], [0, 2, 1, 3], [0, 1, 2, 3]]
    idx2, dist2 = _assign(emu, V, C, 2, dist=False)
    assert idx2.tolist() == [[1, 3], [0, 2], [0, 1]] and torch.isnan(dist2).all()


def test_assign_bad_arguments(emu):
    L = emu.lib
    V, C = torch.zeros(4, 2), torch.zeros(5, 2)
    idx = torch.zeros(4, 8, dtype=torch.int32)
    call = lambda dtype=0, n=4, K=5, d=2, v=V, c=C, topn=1, i=idx: L.kk_vq_assign_cuda(  # noqa: E731
        dtype, n, K, d, _p(v), _p(c), topn, _p(i), None, None)
    assert call(dtype=2) == UNSUPPORTED_DTYPE
    assert call(n=-1) == INVALID_SIZE
    assert call(K=0) == INVALID_SIZE
    assert call(d=0) == INVALID_SIZE
    assert call(topn=0) == INVALID_ARGUMENT
    assert call(topn=9) == INVALID_ARGUMENT
    assert call(topn=6) == INVALID_ARGUMENT and "min(8, K)" in emu.last_error()
    assert call(v=None) == NULL_POINTER
    assert call(c=None) == NULL_POINTER
    assert call(i=None) == NULL_POINTER
    assert call(n=0, v=None, c=None, i=None) == OK


# ---- bad arguments ------------------------------------------------------------------------------------------
FMT_BAD = [
    (dict(group_size=3), INVALID_ARGUMENT, "group_size"),
    (dict(group_size=32), INVALID_ARGUMENT, "group_size"),
    (dict(num_codebooks=0), INVALID_ARGUMENT, "num_codebooks"),
    (dict(num_codebooks=17), INVALID_ARGUMENT, "num_codebooks"),
    (dict(code_bits=12), INVALID_ARGUMENT, "code_bits"),
    (dict(codebook_size=257), INVALID_SIZE, "codebook_size"),
    (dict(codebook_size=0), INVALID_SIZE, "codebook_size"),
    (dict(code_bits=16, codebook_size=65537), INVALID_SIZE, "codebook_size"),
    (dict(rows_per_codebook=0), INVALID_SIZE, "rows_per_codebook"),
    (dict(n_in=30), INVALID_SIZE, "multiple of group_size"),
    (dict(n_out=-1), INVALID_SIZE, "n_out"),
    (dict(n_in=-4), INVALID_SIZE, "n_in"),
    (dict(flags=4), INVALID_ARGUMENT, "flags"),
]
FMT_IDS = [f"{next(iter(o))}={next(iter(o.values()))}" for o, _, _ in FMT_BAD]


def _bad_problem():
    return Problem(20, 32, 4, 64, 1, 8, 40, torch.float32, seed=4)


def _call_fwd(emu, pb, out, fmt=None, **over):
    a = dict(dtype=0, batch=pb.batch, codes=pb.codes, codebooks=pb.codebooks, scales=pb.scales, x=pb.x,
             ldx=pb.n_in, bias=pb.bias, out=out, ldo=pb.n_out, path=AUTO, ws=None, ws_bytes=0)
    a.update(over)
    f = fmt or pb.fmt()
    return emu.lib.kk_vq_linear_fwd_cuda(a["dtype"], ctypes.byref(f) if f is not None else None, a["batch"],
                                         _p(a["codes"]), _p(a["codebooks"]), _p(a["scales"]), _p(a["x"]), a["ldx"],
                                         _p(a["bias"]), _p(a["out"]), a["ldo"], a["path"], a["ws"], a["ws_bytes"],
                                         None)


@pytest.mark.parametrize("over,status,needle", FMT_BAD, ids=FMT_IDS)
def test_bad_format_is_rejected_by_every_entry_point(emu, over, status, needle):
    emu.set_device("h100")
    pb = _bad_problem()
    f = pb.fmt(**over)
    out = _nan((pb.batch, pb.n_out), torch.float32)
    assert _call_fwd(emu, pb, out, fmt=f) == status, emu.last_error()
    assert needle in emu.last_error() and "kk_vq_linear_fwd_cuda" in emu.last_error()
    assert torch.isnan(out).all()
    n = I64(-1)
    assert emu.lib.kk_vq_linear_bwd_cuda_workspace_size(0, ctypes.byref(f), 5, ctypes.byref(n)) == status
    assert emu.lib.kk_vq_linear_fwd_cuda_workspace_size(0, ctypes.byref(f), 5, AUTO, ctypes.byref(n)) == status
    w = _nan((pb.n_out, pb.n_in), torch.float32)
    assert emu.lib.kk_vq_dequantize_cuda(0, ctypes.byref(f), _p(pb.codes), _p(pb.codebooks), None, _p(w), pb.n_in,
                                         None) == status
    assert torch.isnan(w).all()
    dx = _nan((pb.batch, pb.n_in), torch.float32)
    assert emu.lib.kk_vq_linear_bwd_cuda(0, ctypes.byref(f), pb.batch, _p(pb.codes), _p(pb.codebooks), None,
                                         _p(pb.x), pb.n_in, _p(pb.dout), pb.n_out, _p(dx), pb.n_in, None, None,
                                         None, 0, None) == status
    assert torch.isnan(dx).all()


FWD_BAD = [
    (dict(dtype=1), UNSUPPORTED_DTYPE, "dtype 1"),
    (dict(dtype=9), UNSUPPORTED_DTYPE, "dtype 9"),
    (dict(batch=-1), INVALID_SIZE, "batch"),
    (dict(path=3), INVALID_ARGUMENT, "path"),
    (dict(out=None), NULL_POINTER, "out is NULL"),
    (dict(x=None), NULL_POINTER, "x is NULL"),
    (dict(codes=None), NULL_POINTER, "codes is NULL"),
    (dict(codebooks=None), NULL_POINTER, "codebooks is NULL"),
    (dict(ldx=31), INVALID_ARGUMENT, "ldx (31) must be >= the row width n_in = 32"),
    (dict(ldo=19), INVALID_ARGUMENT, "ldo (19) must be >= the row width n_out = 20"),
    (dict(ws_bytes=-1), INVALID_SIZE, "workspace_bytes"),
]


@pytest.mark.parametrize("over,status,needle", FWD_BAD, ids=[f"{next(iter(o))}={next(iter(o.values()))}"
                                                             for o, _, _ in FWD_BAD])
def test_bad_forward_arguments_return_a_status_and_write_nothing(emu, over, status, needle):
    emu.set_device("h100")
    pb = _bad_problem()
    out = _nan((pb.batch, pb.n_out), torch.float32)
    over = dict(over)
    over.setdefault("out", out)
    assert _call_fwd(emu, pb, **over) == status, emu.last_error()
    assert needle in emu.last_error() and "kk_vq_linear_fwd_cuda" in emu.last_error()
    assert torch.isnan(out).all()


def test_null_format_and_null_bytes(emu):
    pb = _bad_problem()
    out = _nan((pb.batch, pb.n_out), torch.float32)
    assert emu.lib.kk_vq_linear_fwd_cuda(0, None, pb.batch, _p(pb.codes), _p(pb.codebooks), None, _p(pb.x),
                                         pb.n_in, None, _p(out), pb.n_out, AUTO, None, 0, None) == NULL_POINTER
    f = pb.fmt()
    assert emu.lib.kk_vq_linear_bwd_cuda_workspace_size(0, ctypes.byref(f), 5, None) == NULL_POINTER
    assert emu.lib.kk_vq_linear_fwd_cuda_workspace_size(0, ctypes.byref(f), 5, AUTO, None) == NULL_POINTER
    n = I64(-1)
    assert emu.lib.kk_vq_linear_fwd_cuda_workspace_size(0, ctypes.byref(f), 5, 7, ctypes.byref(n)) == INVALID_ARGUMENT


def test_forward_with_nothing_to_write_needs_no_pointers(emu):
    emu.set_device("h100")
    pb = Problem(20, 32, 4, 64, 1, 8, 0, torch.float32, seed=4)
    f = pb.fmt()
    assert emu.lib.kk_vq_linear_fwd_cuda(0, ctypes.byref(f), 0, None, None, None, None, 0, None, None, 0, AUTO,
                                         None, 0, None) == OK, emu.last_error()
    pb = Problem(20, 0, 4, 64, 1, 8, 5, torch.float32, seed=4)  # n_in = 0: out = bias; nothing else is read
    f = pb.fmt()
    out = _nan((5, 20), torch.float32)
    assert emu.lib.kk_vq_linear_fwd_cuda(0, ctypes.byref(f), 5, None, None, None, None, 0, _p(pb.bias), _p(out),
                                         20, AUTO, None, 0, None) == OK, emu.last_error()
    assert (out == pb.bias).all()


BWD_BAD = [
    (dict(dtype=1), UNSUPPORTED_DTYPE, "dtype 1"),
    (dict(batch=-3), INVALID_SIZE, "batch"),
    (dict(ws_bytes="need-1"), INVALID_ARGUMENT, "smaller than the"),
    (dict(ws=0), NULL_POINTER, "workspace is NULL"),
    (dict(ws="misaligned"), INVALID_ARGUMENT, "16-byte aligned"),
    (dict(dout=None), NULL_POINTER, "dout is NULL"),
    (dict(x=None), NULL_POINTER, "x is NULL"),
    (dict(codes=None), NULL_POINTER, "codes is NULL"),
    (dict(codebooks=None), NULL_POINTER, "codebooks is NULL"),
    (dict(lddo=19), INVALID_ARGUMENT, "lddo (19) must be >= the row width n_out = 20"),
    (dict(lddx=31), INVALID_ARGUMENT, "lddx (31) must be >= the row width n_in = 32"),
    (dict(ldx=31), INVALID_ARGUMENT, "ldx (31) must be >= the row width n_in = 32"),
    (dict(scales=None), INVALID_ARGUMENT, "dscales must be NULL when scales is NULL"),
]


@pytest.mark.parametrize("over,status,needle", BWD_BAD, ids=[f"{next(iter(o))}={next(iter(o.values()))}"
                                                             for o, _, _ in BWD_BAD])
def test_bad_backward_arguments_return_a_status_and_write_nothing(emu, over, status, needle):
    emu.set_device("h100")
    pb = _bad_problem()
    need = bwd_workspace(emu, pb)
    ws, base = _workspace(need + 64)
    dx = _nan((pb.batch, pb.n_in), torch.float32)
    dcb = _nan(tuple(pb.codebooks.shape), torch.float32)
    dsc = _nan((pb.n_out,), torch.float32)
    a = dict(dtype=0, batch=pb.batch, codes=pb.codes, codebooks=pb.codebooks, scales=pb.scales, x=pb.x,
             ldx=pb.n_in, dout=pb.dout, lddo=pb.n_out, lddx=pb.n_in, ws=base, ws_bytes=need)
    a.update(over)
    if a["ws_bytes"] == "need-1":
        a["ws_bytes"] = need - 1
    if a["ws"] == "misaligned":
        a["ws"] = base + 4
    f = pb.fmt()
    st = emu.lib.kk_vq_linear_bwd_cuda(a["dtype"], ctypes.byref(f), a["batch"], _p(a["codes"]), _p(a["codebooks"]),
                                       _p(a["scales"]), _p(a["x"]), a["ldx"], _p(a["dout"]), a["lddo"], _p(dx),
                                       a["lddx"], _p(dcb), _p(dsc), PTR(a["ws"]), a["ws_bytes"], None)
    assert st == status, emu.last_error()
    assert needle in emu.last_error() and "kk_vq_linear_bwd_cuda" in emu.last_error()
    assert torch.isnan(dx).all() and torch.isnan(dcb).all() and torch.isnan(dsc).all()


def test_a_device_without_room_for_the_x_chunk_is_an_error_not_a_crash(emu):
    emu.set_device("h100", 0, 1000)  # less than the smallest GEMV x chunk (8 rows x 64 floats)
    try:
        pb = Problem(20, 32, 4, 64, 1, 8, 2, torch.float32, seed=4)
        out = _nan((2, 20), torch.float32)
        assert _call_fwd(emu, pb, out, path=GEMV) == CUDA_ERROR and "allows only 1000 bytes" in emu.last_error()
        assert torch.isnan(out).all()
    finally:
        emu.set_device("h100")


# ---- the emulation catches real kernel bugs -------------------------------------------------------------
# Each mutant is a scratch copy of csrc/cuda with one deliberate bug in vq.cu; the tests above must fail on it.
MUTANTS = {
    # the barrier between staging the x chunk and the warps that read all of it
    "missing __syncthreads after the GEMV x staging": (
        "          xs[bb * P.ic + c] = bb < nb ? to_f(x[(b0 + bb) * P.ldx + c0 + c]) : 0.f;\n        }\n"
        "        __syncthreads();\n",
        "          xs[bb * P.ic + c] = bb < nb ? to_f(x[(b0 + bb) * P.ldx + c0 + c]) : 0.f;\n        }\n"),
    # the codebook gradient forgets the per-row scale
    "dcodebooks without the scale": (
        "atomicAdd(dst + t, sc * dwr[t]);", "atomicAdd(dst + t, dwr[t]);"),
    # A fragment registers 1 and 2 swapped (rows g+8 / columns +8): a tensor-core layout bug
    "mma A fragment registers swapped": (
        "              af[mi][1] = *reinterpret_cast<const uint32_t*>(base + 8 * kHS);\n"
        "              af[mi][2] = *reinterpret_cast<const uint32_t*>(base + 8);\n",
        "              af[mi][2] = *reinterpret_cast<const uint32_t*>(base + 8 * kHS);\n"
        "              af[mi][1] = *reinterpret_cast<const uint32_t*>(base + 8);\n"),
    # the barrier between the dW tile's stores and the scatter that reads other threads' entries
    "missing __syncthreads before the dW scatter": (
        "        for (int c = 0; c < 4; ++c) dws[ty * 4 + r][tx * 4 + c] = acc[r][c];\n      __syncthreads();\n",
        "        for (int c = 0; c < 4; ++c) dws[ty * 4 + r][tx * 4 + c] = acc[r][c];\n"),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_the_emulation_catches_a_deliberate_bug(tmp_path, mutant):
    emu = Emulator(build(cuda_dir=mutant_dir(tmp_path, "vq.cu", *MUTANTS[mutant]), opt="-O1"))
    emu.set_device("h100")
    failures = []
    for case in (CASES[CASE_IDS.index("aqlm-2x8g8-b16")], CASES[CASE_IDS.index("gemm-b300")]):
        for dtype in (torch.float32, torch.bfloat16):
            pb = _problem(case, dtype)
            try:
                fmtp = ctypes.POINTER(Format)
                emu.lib.kk_vq_linear_fwd_cuda.argtypes = [I32, fmtp, I64, PTR, PTR, PTR, PTR, I64, PTR, PTR, I64,
                                                          I32, PTR, I64, PTR]
                emu.lib.kk_vq_linear_bwd_cuda_workspace_size.argtypes = [I32, fmtp, I64, ctypes.POINTER(I64)]
                emu.lib.kk_vq_linear_bwd_cuda.argtypes = [I32, fmtp, I64, PTR, PTR, PTR, PTR, I64, PTR, I64, PTR, I64,
                                                          PTR, PTR, PTR, I64, PTR]
                _, out = fwd(emu, pb)
                _check(dtype, "out", out, pb.ref_fwd())
                _, dx, dcb, dsc = bwd(emu, pb)
                rdx, rdcb, rdsc = pb.ref_bwd()
                _check(dtype, "dx", dx, rdx)
                _check(dtype, "dcodebooks", dcb, rdcb)
                _check(dtype, "dscales", dsc, rdsc)
            except AssertionError as e:
                failures.append(f"{case[0]} {dtype}: {e}")
    print(f"{mutant}: caught: {failures}")
    assert failures, f"the emulation did not catch: {mutant}"
