"""The sparse family's CUDA kernels (csrc/cuda/sparse.cu) under the CUDA host emulation (tests/cuda_emu):
kk_sparse_linear_{fwd,bwd}_cuda against a float64 reference computed here from the dense weight, in
float32, float16 and bfloat16, on every code path of the launch plan.  No GPU needed: the emulation runs
each CUDA thread as a fiber with real barriers and NaN-poisoned shared memory (tests/cuda_emu/include/kkemu.h).

The plan (SpMM: vec kernel or tiled with 2 or 8 rows per warp and a chunk width of 32..256 columns;
SDDMM: vec kernel, one tile written directly, or batch splits reduced from float32 partials, with more
tiles than splits or not) depends on the batch, the density, the shapes and the device's SM count and
shared memory; CASES pick shapes and emulated devices that reach each variant, and
test_every_plan_variant_is_reached checks from the launch records that they do.  The CSR / CSC index is
built here with plain torch, independent of kernelkit.sparse."""
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
I64, PTR = ctypes.c_int64, ctypes.c_void_p
OK, NULL_POINTER, INVALID_SIZE, INVALID_ARGUMENT, UNSUPPORTED_DTYPE, CUDA_ERROR = 0, 1, 2, 3, 4, 6
DEFAULT = ("h100", 0, 0)
VEC_MAX_BATCH = 16  # kVecMaxBatch in sparse.cu


@pytest.fixture(scope="module")
def emu():
    e = load()
    yield e
    e.set_device("h100")
    e.set_schedule("forward")


# ---- problems --------------------------------------------------------------------------------------------
def _mask(n_out, n_in, density, seed, special=True):
    """Uniform random mask; with ``special`` also the shapes that stress the index walk: row 0 empty,
    row 1 full (longer than one 32-entry window and than any chunk), the last column full (a long row
    of W^T for dx) and the last row holding only the last column (its first chunk starts late)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_out, n_in, generator=g) < density
    if special and 0.0 < density < 1.0 and n_out >= 3 and n_in >= 2:
        mask[:, -1] = True
        mask[1, :] = True
        mask[-1, :] = False
        mask[-1, -1] = True
        mask[0, :] = False
    return mask


def _index(mask):
    """CSR (row_ptr int64, col_idx int32) and its transpose (col_ptr, row_idx, perm) of a bool mask."""
    n_out, n_in = mask.shape
    r, c = mask.nonzero(as_tuple=True)  # row-major order: CSR
    row_ptr = torch.zeros(n_out + 1, dtype=torch.int64)
    row_ptr[1:] = torch.bincount(r, minlength=n_out).cumsum(0)
    ct, rt = mask.t().nonzero(as_tuple=True)  # column-major order: CSC
    col_ptr = torch.zeros(n_in + 1, dtype=torch.int64)
    col_ptr[1:] = torch.bincount(ct, minlength=n_in).cumsum(0)
    perm = torch.searchsorted(r * n_in + c, rt * n_in + ct)  # position of each CSC entry in CSR order
    return row_ptr, c.to(torch.int32).contiguous(), col_ptr, rt.to(torch.int32).contiguous(), perm


class Problem:
    """A sparse W (as CSR values and as the dense float64 matrix the reference uses), x, dout, bias in
    `dtype`, x and dout as row-strided views when pad > 0.  The reference sees the rounded inputs."""

    def __init__(self, n_out, n_in, density, batch, dtype, seed=0, pad=0, special=True):
        self.n_out, self.n_in, self.batch, self.dtype, self.pad = n_out, n_in, batch, dtype, pad
        self.mask = _mask(n_out, n_in, density, seed, special)
        self.row_ptr, self.col_idx, self.col_ptr, self.row_idx, self.perm = _index(self.mask)
        self.nnz = self.col_idx.numel()
        g = torch.Generator().manual_seed(seed + 1)
        w = (torch.randn(n_out, n_in, generator=g) / math.sqrt(max(1.0, density * n_in))).to(dtype)
        self.values = w[self.mask].contiguous()
        self.x = torch.randn(batch, n_in + pad, generator=g).to(dtype)[:, :n_in]
        self.dout = torch.randn(batch, n_out + pad, generator=g).to(dtype)[:, :n_out]
        self.bias = torch.randn(n_out, generator=g).to(dtype)
        self.w64 = torch.zeros(n_out, n_in, dtype=torch.float64)
        self.w64[self.mask] = self.values.double()

    def ref_fwd(self, bias=True):
        out = self.x.double() @ self.w64.t()
        return out + self.bias.double() if bias else out

    def ref_bwd(self):
        d64 = self.dout.double()
        return d64 @ self.w64, (d64.t() @ self.x.double())[self.mask]

    def ld(self, t, width):
        return max(t.stride(0), width) if t.dim() == 2 and t.shape[0] > 0 else width


def _nan_rows(batch, width, pad, dtype):
    """A NaN-filled (batch, width + pad) buffer and its (batch, width) view."""
    buf = torch.full((batch, width + pad), float("nan"), dtype=dtype)
    return buf, buf[:, :width]


def _p(t):
    return PTR(0 if t is None else t.data_ptr())


def fwd(emu: Emulator, pb: Problem, bias=True):
    buf, out = _nan_rows(pb.batch, pb.n_out, pb.pad, pb.dtype)
    st = emu.lib.kk_sparse_linear_fwd_cuda(
        KK[pb.dtype], I64(pb.batch), I64(pb.n_out), I64(pb.n_in), I64(pb.nnz), _p(pb.row_ptr), _p(pb.col_idx),
        _p(pb.values), _p(pb.x), I64(pb.ld(pb.x, pb.n_in)), _p(pb.bias if bias else None), _p(out),
        I64(buf.stride(0)), PTR(0), I64(0), PTR(0))
    assert st == OK, emu.last_error()
    return buf, out


def bwd_workspace(emu: Emulator, pb: Problem) -> int:
    n = ctypes.c_int64(-1)
    st = emu.lib.kk_sparse_linear_bwd_cuda_workspace_size(KK[pb.dtype], I64(pb.batch), I64(pb.n_out), I64(pb.n_in),
                                                          I64(pb.nnz), ctypes.byref(n))
    assert st == OK, emu.last_error()
    return n.value


def bwd(emu: Emulator, pb: Problem, need=(True, True)):
    ws_bytes = bwd_workspace(emu, pb)
    ws = torch.full((max(ws_bytes, 1),), 255, dtype=torch.uint8)  # garbage workspace (NaN as float32)
    dx_buf, dx = _nan_rows(pb.batch, pb.n_in, pb.pad, pb.dtype)
    dv = torch.full((pb.nnz,), float("nan"), dtype=pb.dtype)
    st = emu.lib.kk_sparse_linear_bwd_cuda(
        KK[pb.dtype], I64(pb.batch), I64(pb.n_out), I64(pb.n_in), I64(pb.nnz), _p(pb.row_ptr), _p(pb.col_idx),
        _p(pb.col_ptr), _p(pb.row_idx), _p(pb.perm), _p(pb.values), _p(pb.x), I64(pb.ld(pb.x, pb.n_in)),
        _p(pb.dout), I64(pb.ld(pb.dout, pb.n_out)), _p(dx if need[0] else None), I64(dx_buf.stride(0)),
        _p(dv if need[1] else None), _p(ws), I64(ws_bytes), PTR(0))
    assert st == OK, emu.last_error()
    return dx_buf, dx, dv


def _check(dtype, what, got, want, buf=None):
    if got.numel() == 0:
        return
    assert_close(got, want, dtype, what)
    if buf is not None and buf.shape[1] > got.shape[1]:  # the padding past each row stays untouched
        assert torch.isnan(buf[:, got.shape[1]:].float()).all(), f"{what}: written past the row"


# ---- the cases -------------------------------------------------------------------------------------------
# (id, n_out, n_in, density, batch, device (preset, SMs, opt-in shared memory bytes)): the plan reached.
CASES = [
    ("vec-b1", 33, 70, 0.2, 1, DEFAULT),                 # vec SpMM and SDDMM, one batch row
    ("vec-b13", 45, 40, 0.3, 13, DEFAULT),               # vec SpMM over two batch groups (grid.y = 2)
    ("tile-kc64", 40, 100, 0.5, 40, DEFAULT),            # tiled, 2 rows/warp, KC 64; SDDMM one tile (direct), KC 32
    ("tile-kc128-tiles", 40, 300, 0.1, 300, DEFAULT),    # KC 128, several batch tiles; SDDMM split, KC 64
    ("tile-kc256", 40, 600, 0.02, 70, DEFAULT),          # KC 256 (density 0.047 with the special rows)
    ("tile-rpw8", 150, 90, 0.15, 150, ("h100", 2, 0)),   # 2 SMs: 8 rows per warp (fwd and dx)
    ("sddmm-tiles>splits", 8, 24, 0.3, 2100, DEFAULT),   # float32: 17 SDDMM tiles over 16 splits; KC 32 (24 columns)
    ("small-optin", 40, 600, 0.02, 70, ("h100", 0, 40000)),  # opt-in too small for KC 256 / SDDMM KC 64
    ("a100", 64, 128, 0.1, 200, ("a100", 0, 0)),         # the A100's limits
    ("very-sparse", 70, 2000, 0.002, 40, DEFAULT),       # most chunks skipped (CTA-wide next column)
    ("dense", 20, 40, 1.0, 50, DEFAULT),                 # sparsity 0
    ("empty-tile", 20, 40, 0.0, 50, DEFAULT),            # nnz = 0: out = bias, dx = 0 (tiled)
    ("empty-vec", 20, 40, 0.0, 3, DEFAULT),              # nnz = 0 (vec)
    ("n_in-0", 10, 0, 0.0, 20, DEFAULT),                 # no inputs at all: out = bias
    ("batch-0", 20, 40, 0.2, 0, DEFAULT),                # empty batch: dvalues = 0
]
CASE_IDS = [c[0] for c in CASES]
DTYPES = list(KK)
DTYPE_IDS = [str(d).replace("torch.", "") for d in DTYPES]


def _problem(case, dtype, seed=None):
    _, n_out, n_in, density, batch, _ = case
    return Problem(n_out, n_in, density, batch, dtype, seed=batch if seed is None else seed,
                   pad=3 if batch % 2 else 0)  # odd batches: row strides larger than the rows


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_emulated_cuda_fwd_and_bwd_match_reference(emu, case, dtype):
    emu.set_device(*case[5])
    pb = _problem(case, dtype)
    buf, out = fwd(emu, pb)
    _check(dtype, "out", out, pb.ref_fwd(), buf)
    dx_buf, dx, dv = bwd(emu, pb)
    rdx, rdv = pb.ref_bwd()
    _check(dtype, "dx", dx, rdx, dx_buf)
    if pb.batch == 0:  # empty batch: the value gradients are zero
        assert (dv == 0).all()
        return
    _check(dtype, "dvalues", dv, rdv)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=lambda c: c[0])
def test_emulated_cuda_fwd_without_bias(emu, case):
    emu.set_device(*case[5])
    pb = _problem(case, torch.float32)
    buf, out = fwd(emu, pb, bias=False)
    _check(torch.float32, "out", out, pb.ref_fwd(bias=False), buf)


@pytest.mark.parametrize("need", [(True, False), (False, True), (False, False)], ids=["dx", "dvalues", "none"])
@pytest.mark.parametrize("batch", [5, 300])
def test_emulated_cuda_bwd_computes_only_the_requested_gradients(emu, need, batch):
    emu.set_device("h100")
    pb = Problem(40, 300, 0.1, batch, torch.float32, seed=7)
    _, dx, dv = bwd(emu, pb, need)
    for want, got, ref, what in zip(need, (dx, dv), pb.ref_bwd(), ("dx", "dvalues")):
        if want:
            _check(torch.float32, what, got, ref)
        else:
            assert torch.isnan(got).all(), f"{what} was not requested but was written"


@pytest.mark.parametrize("schedule", ["reverse", "shuffle"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5], CASES[6], CASES[9]], ids=lambda c: c[0])
def test_emulated_cuda_is_independent_of_thread_order(emu, case, schedule):
    """Between two barriers the threads of a block run in another order (last first, or shuffled):
    a missing barrier or __syncwarp shows up whichever side of it the reads and writes fall."""
    emu.set_device(*case[5])
    emu.set_schedule(schedule, seed=11)
    try:
        pb = _problem(case, torch.bfloat16, seed=3)
        _, out = fwd(emu, pb)
        _check(torch.bfloat16, "out", out, pb.ref_fwd())
        _, dx, dv = bwd(emu, pb)
        rdx, rdv = pb.ref_bwd()
        _check(torch.bfloat16, "dx", dx, rdx)
        _check(torch.bfloat16, "dvalues", dv, rdv)
    finally:
        emu.set_schedule("forward")


# ---- the launch plan ---------------------------------------------------------------------------------------
XS_ROW_BYTES = 264     # SpMM: one shared-memory row of the x chunk (256 bytes of batch + 8 pad)
SDDMM_ROW_BYTES = 528  # SDDMM: one row of the dout / x tiles (512 + 16 pad)
SDDMM_ROWS = 32


def _spmm_plan(launch, dtype):
    """('vec', batch groups) or ('tile', rows per warp, chunk width KC or None when the shared memory
    size does not tell it apart, batch tiles) of an SpMM launch."""
    if "sparse_spmm_vec_kernel" in launch["name"]:
        return ("vec", launch["grid"][1])
    rpw = int(re.search(r"sparse_spmm_tile_kernel<[^,]+, (\d+)>", launch["name"]).group(1))
    esz = torch.tensor([], dtype=dtype).element_size()
    bm = 256 // esz
    os_bytes = bm * (8 * rpw + (1 if esz == 4 else 2)) * esz  # the output stage shares the buffer
    dyn = launch["dyn_smem"]  # max(KC * XS_ROW_BYTES, os_bytes)
    assert dyn == os_bytes or dyn % XS_ROW_BYTES == 0, f"unexpected shared memory size {launch}"
    return ("tile", rpw, dyn // XS_ROW_BYTES if dyn > os_bytes else None, launch["grid"][1])


def _sddmm_plan(launches, dtype, batch):
    """('vec',) or ('tile', mode, KC) of the SDDMM launches of a backward call."""
    sd = [la for la in launches if "sparse_sddmm" in la["name"]]
    assert len(sd) == 1, launches
    if "vec" in sd[0]["name"]:
        return ("vec",)
    bs = 512 // torch.tensor([], dtype=dtype).element_size()
    tiles, nsplit = -(-batch // bs), sd[0]["grid"][1]
    reduced = any("reduce_splits" in la["name"] for la in launches)
    assert reduced == (tiles > 1), "partials must be reduced exactly when the batch spans several tiles"
    mode = "direct" if tiles == 1 else ("one tile per split" if tiles == nsplit else "tiles > splits")
    return ("tile", mode, sd[0]["dyn_smem"] // SDDMM_ROW_BYTES - SDDMM_ROWS)


def test_every_plan_variant_is_reached(emu):
    """The CASES reach each SpMM variant (vec with one or two batch groups; tiled with 2 and 8 rows per
    warp, chunk widths 32/64/128/256, one or several batch tiles) for the forward and for dx, each SDDMM
    variant (vec; tiled with one tile, one tile per split, several tiles per split; chunk widths 32 and
    64), and every kernel instantiation of the three element types runs."""
    seen, names = set(), set()
    for case in CASES:
        _, n_out, n_in, density, batch, dev = case
        if batch == 0:
            continue
        emu.set_device(*dev)
        for dtype in DTYPES:
            pb = _problem(case, dtype)
            emu.clear_launches()
            fwd(emu, pb)
            (f,) = emu.launches()
            emu.clear_launches()
            bwd(emu, pb)
            launches = emu.launches()
            names.update(la["name"] for la in launches + [f])
            spmm = [("fwd", f)] + ([("dx", launches[0])] if n_in > 0 else [])  # n_in = 0: dx is empty
            for what, la in spmm:
                plan = _spmm_plan(la, dtype)
                seen.add((what, plan[0]) if plan[0] == "vec" else (what, "tile", plan[1]))
                if plan[0] == "vec":
                    seen.add(("vec batch groups > 1", plan[1] > 1))
                else:
                    seen.add(("tile batch tiles > 1", plan[3] > 1))
                    if plan[1] == 2:
                        seen.add(("kc", plan[2]))
            if pb.nnz > 0:
                sd = _sddmm_plan(launches, dtype, batch)
                seen.add(("sddmm",) + sd[:2])
                if sd[0] == "tile":
                    seen.add(("sddmm kc", sd[2]))
    emu.set_device("h100")
    want = {("fwd", "vec"), ("fwd", "tile", 2), ("fwd", "tile", 8), ("dx", "vec"), ("dx", "tile", 2),
            ("dx", "tile", 8), ("vec batch groups > 1", True), ("vec batch groups > 1", False),
            ("tile batch tiles > 1", True), ("tile batch tiles > 1", False),
            ("kc", 32), ("kc", 64), ("kc", 128), ("kc", 256),
            ("sddmm", "vec"), ("sddmm", "tile", "direct"), ("sddmm", "tile", "one tile per split"),
            ("sddmm", "tile", "tiles > splits"), ("sddmm kc", 32), ("sddmm kc", 64)}
    assert want <= seen, f"plan variants not reached: {sorted(want - seen, key=str)}"
    expected = set()
    for t in ("float", "__half", "__nv_bfloat16"):
        expected |= {f"sparse_spmm_tile_kernel<{t}, {r}>(SpmmParams)" for r in (2, 8)}
        expected |= {f"sparse_spmm_vec_kernel<{t}>(SpmmParams)", f"sparse_sddmm_tile_kernel<{t}>(SddmmParams)",
                     f"sparse_sddmm_vec_kernel<{t}>(SddmmParams)",
                     f"sparse_reduce_splits_kernel<{t}>(float const*, long, int, {t}*)"}
    assert expected <= names, f"kernels never launched: {sorted(expected - names)}"


def test_the_small_opt_in_narrows_the_chunks(emu):
    """The same problem on a device with 40000 bytes of opt-in shared memory runs with half the chunk
    width (SpMM 256 -> 128 columns) and the narrower SDDMM tile (64 -> 32 columns)."""
    case = CASES[CASE_IDS.index("tile-kc256")]
    got = {}
    for dev in (DEFAULT, ("h100", 0, 40000)):
        emu.set_device(*dev)
        pb = _problem(case, torch.float32)
        emu.clear_launches()
        fwd(emu, pb)
        bwd(emu, pb)
        la = emu.launches()
        got[dev] = (_spmm_plan(la[0], torch.float32)[2], _sddmm_plan(la[1:], torch.float32, pb.batch)[2])
    emu.set_device("h100")
    assert got == {DEFAULT: (256, 64), ("h100", 0, 40000): (128, 32)}, got


def test_workspace_depends_on_the_shapes_only(emu):
    """The backward's workspace (float32 SDDMM partials) is the same on every device, zero when the
    batch fits one SDDMM tile or the vec kernel runs, and splits * nnz * 4 bytes (rounded to 256) else."""
    sizes = set()
    pb = Problem(40, 300, 0.1, 300, torch.float32, seed=1)
    for dev in (DEFAULT, ("h100", 2, 0), ("a100", 0, 0), ("h100", 0, 40000)):
        emu.set_device(*dev)
        sizes.add(bwd_workspace(emu, pb))
    emu.set_device("h100")
    assert sizes == {-(-3 * pb.nnz * 4 // 256) * 256}, sizes  # 3 tiles of 128 rows, 2 row blocks: 3 splits
    for batch, dtype in ((16, torch.float32), (128, torch.float32), (256, torch.bfloat16)):
        assert bwd_workspace(emu, Problem(40, 300, 0.1, batch, dtype, seed=1)) == 0


@pytest.mark.skipif(bool(os.environ.get("KKEMU_LIB")), reason="8 GiB of address space: not under ASan")
def test_row_offsets_past_2_31_elements(emu):
    """b * ldx and b * ldo in 64 bits: row strides of 2^31 + 8 elements (the buffers are mostly
    untouched virtual memory)."""
    emu.set_device("h100")
    pb = Problem(6, 40, 0.3, 2, torch.float16, seed=2)
    ld = 2 ** 31 + 8
    try:
        xbig = torch.empty(ld + pb.n_in, dtype=torch.float16)
        obig = torch.empty(ld + pb.n_out, dtype=torch.float16)
    except RuntimeError as e:  # no room for the address space
        pytest.skip(f"cannot reserve the buffers: {e}")
    xbig[:pb.n_in] = pb.x[0]
    xbig[ld:] = pb.x[1]
    obig[:pb.n_out] = float("nan")
    obig[ld:] = float("nan")
    st = emu.lib.kk_sparse_linear_fwd_cuda(KK[torch.float16], I64(2), I64(pb.n_out), I64(pb.n_in), I64(pb.nnz),
                                           _p(pb.row_ptr), _p(pb.col_idx), _p(pb.values), _p(xbig), I64(ld),
                                           _p(pb.bias), _p(obig), I64(ld), PTR(0), I64(0), PTR(0))
    assert st == OK, emu.last_error()
    out = torch.stack([obig[:pb.n_out], obig[ld:]])
    _check(torch.float16, "out", out, pb.ref_fwd())


# ---- bad arguments ------------------------------------------------------------------------------------------
def _fwd_args(pb, ws=None, **over):
    a = dict(dtype=KK[pb.dtype], batch=pb.batch, n_out=pb.n_out, n_in=pb.n_in, nnz=pb.nnz, row_ptr=pb.row_ptr,
             col_idx=pb.col_idx, values=pb.values, x=pb.x, ldx=pb.n_in, bias=pb.bias, out="out", ldo=pb.n_out,
             workspace=None, workspace_bytes=0)
    a.update(over)
    return a


def _call_fwd(emu, a, out):
    ptr = lambda v: out if isinstance(v, str) else v  # noqa: E731
    return emu.lib.kk_sparse_linear_fwd_cuda(
        a["dtype"], I64(a["batch"]), I64(a["n_out"]), I64(a["n_in"]), I64(a["nnz"]), _p(a["row_ptr"]),
        _p(a["col_idx"]), _p(a["values"]), _p(a["x"]), I64(a["ldx"]), _p(a["bias"]), _p(ptr(a["out"])),
        I64(a["ldo"]), _p(a["workspace"]), I64(a["workspace_bytes"]), PTR(0))


FWD_BAD = [
    (dict(dtype=1), UNSUPPORTED_DTYPE, "dtype 1"),
    (dict(dtype=9), UNSUPPORTED_DTYPE, "dtype 9"),
    (dict(batch=-1), INVALID_SIZE, "batch"),
    (dict(n_out=-1), INVALID_SIZE, "n_out"),
    (dict(n_in=-2), INVALID_SIZE, "n_in"),
    (dict(nnz=-1), INVALID_SIZE, "nnz"),
    (dict(nnz=20 * 30 + 1), INVALID_SIZE, "nnz (601) must be <= n_out * n_in"),
    (dict(n_in=2 ** 31), INVALID_SIZE, "int32"),
    (dict(out=None), NULL_POINTER, "out is NULL"),
    (dict(x=None), NULL_POINTER, "x is NULL"),
    (dict(row_ptr=None), NULL_POINTER, "row_ptr is NULL"),
    (dict(col_idx=None), NULL_POINTER, "col_idx is NULL"),
    (dict(values=None), NULL_POINTER, "values is NULL"),
    (dict(ldx=29), INVALID_ARGUMENT, "ldx (29) must be >= the row width n_in = 30"),
    (dict(ldo=19), INVALID_ARGUMENT, "ldo (19) must be >= the row width n_out = 20"),
    (dict(workspace_bytes=-1), INVALID_SIZE, "workspace_bytes"),
]


@pytest.mark.parametrize("over,status,needle", FWD_BAD, ids=[f"{next(iter(o))}={next(iter(o.values()))}"
                                                             for o, _, _ in FWD_BAD])
def test_bad_forward_arguments_return_a_status_and_write_nothing(emu, over, status, needle):
    emu.set_device("h100")
    pb = Problem(20, 30, 0.3, 40, torch.float32, seed=4)
    out = torch.full((pb.batch, pb.n_out), float("nan"))
    st = _call_fwd(emu, _fwd_args(pb, **over), out)
    assert st == status, emu.last_error()
    assert needle in emu.last_error() and "kk_sparse_linear_fwd_cuda" in emu.last_error()
    assert torch.isnan(out).all()


def test_forward_with_nothing_to_write_needs_no_pointers(emu):
    emu.set_device("h100")
    pb = Problem(20, 30, 0.3, 0, torch.float32, seed=4)
    a = _fwd_args(pb, row_ptr=None, col_idx=None, values=None, x=None, bias=None, out=None, ldx=0, ldo=0)
    assert _call_fwd(emu, a, None) == OK, emu.last_error()
    pb = Problem(20, 30, 0.0, 5, torch.float32, seed=4)  # nnz = 0: x, col_idx and values are not read
    out = torch.full((5, 20), float("nan"))
    assert _call_fwd(emu, _fwd_args(pb, col_idx=None, values=None, x=None, ldx=0, bias=None), out) == OK
    assert (out == 0).all()


def _call_bwd(emu, pb, ws, ws_bytes, dx, dv, **over):
    a = dict(dtype=KK[pb.dtype], batch=pb.batch, n_out=pb.n_out, n_in=pb.n_in, nnz=pb.nnz, row_ptr=pb.row_ptr,
             col_idx=pb.col_idx, col_ptr=pb.col_ptr, row_idx=pb.row_idx, perm=pb.perm, values=pb.values, x=pb.x,
             ldx=pb.n_in, dout=pb.dout, lddo=pb.n_out, dx=dx, lddx=pb.n_in, dvalues=dv, workspace=ws,
             workspace_bytes=ws_bytes)
    a.update(over)
    return emu.lib.kk_sparse_linear_bwd_cuda(
        a["dtype"], I64(a["batch"]), I64(a["n_out"]), I64(a["n_in"]), I64(a["nnz"]), _p(a["row_ptr"]),
        _p(a["col_idx"]), _p(a["col_ptr"]), _p(a["row_idx"]), _p(a["perm"]), _p(a["values"]), _p(a["x"]),
        I64(a["ldx"]), _p(a["dout"]), I64(a["lddo"]), _p(a["dx"]), I64(a["lddx"]), _p(a["dvalues"]),
        PTR(a["workspace"]), I64(a["workspace_bytes"]), PTR(0))


BWD_BAD = [
    (dict(dtype=1), UNSUPPORTED_DTYPE, "dtype 1"),
    (dict(batch=-3), INVALID_SIZE, "batch"),
    (dict(nnz=20 * 30 + 1), INVALID_SIZE, "nnz"),
    (dict(workspace_bytes="need-1"), INVALID_ARGUMENT, "smaller than the"),
    (dict(workspace=0), NULL_POINTER, "workspace is NULL"),
    (dict(workspace="misaligned"), INVALID_ARGUMENT, "16-byte aligned"),
    (dict(dout=None), NULL_POINTER, "dout is NULL"),
    (dict(lddo=19), INVALID_ARGUMENT, "lddo (19) must be >= the row width n_out = 20"),
    (dict(lddx=29), INVALID_ARGUMENT, "lddx (29) must be >= the row width n_in = 30"),
    (dict(ldx=29), INVALID_ARGUMENT, "ldx (29) must be >= the row width n_in = 30"),
    (dict(x=None), NULL_POINTER, "x is NULL"),
    (dict(row_ptr=None), NULL_POINTER, "row_ptr is NULL"),
    (dict(col_idx=None), NULL_POINTER, "col_idx is NULL"),
    (dict(col_ptr=None), NULL_POINTER, "col_ptr is NULL"),
    (dict(row_idx=None), NULL_POINTER, "row_idx is NULL"),
    (dict(perm=None), NULL_POINTER, "perm is NULL"),
    (dict(values=None), NULL_POINTER, "values is NULL"),
]


@pytest.mark.parametrize("over,status,needle", BWD_BAD, ids=[f"{next(iter(o))}={next(iter(o.values()))}"
                                                             for o, _, _ in BWD_BAD])
def test_bad_backward_arguments_return_a_status_and_write_nothing(emu, over, status, needle):
    emu.set_device("h100")
    pb = Problem(20, 30, 0.3, 300, torch.float32, seed=4)  # 3 SDDMM tiles: a workspace is needed
    need = bwd_workspace(emu, pb)
    assert need > 0
    ws = torch.zeros(need + 64, dtype=torch.uint8)
    base = ws.data_ptr() + (-ws.data_ptr()) % 16
    over = dict(over)
    if over.get("workspace_bytes") == "need-1":
        over["workspace_bytes"] = need - 1
    if over.get("workspace") == "misaligned":
        over["workspace"] = base + 4
    dx = torch.full((pb.batch, pb.n_in), float("nan"))
    dv = torch.full((pb.nnz,), float("nan"))
    st = _call_bwd(emu, pb, base, need, dx, dv, **over)
    assert st == status, emu.last_error()
    assert needle in emu.last_error() and "kk_sparse_linear_bwd_cuda" in emu.last_error()
    assert torch.isnan(dx).all() and torch.isnan(dv).all()


def test_workspace_size_arguments_are_checked(emu):
    n = ctypes.c_int64(-1)
    L = emu.lib
    assert L.kk_sparse_linear_bwd_cuda_workspace_size(0, I64(5), I64(4), I64(4), I64(3), None) == NULL_POINTER
    assert L.kk_sparse_linear_fwd_cuda_workspace_size(0, I64(5), I64(4), I64(4), I64(3), None) == NULL_POINTER
    assert L.kk_sparse_linear_bwd_cuda_workspace_size(1, I64(5), I64(4), I64(4), I64(3), ctypes.byref(n)) == UNSUPPORTED_DTYPE
    assert n.value == 0
    assert L.kk_sparse_linear_fwd_cuda_workspace_size(0, I64(5), I64(4), I64(4), I64(17), ctypes.byref(n)) == INVALID_SIZE
    assert L.kk_sparse_linear_fwd_cuda_workspace_size(3, I64(5000), I64(4), I64(4), I64(3), ctypes.byref(n)) == OK
    assert n.value == 0  # the forward needs no workspace


def test_backward_with_nothing_requested_or_empty_outputs_needs_no_pointers(emu):
    emu.set_device("h100")
    pb = Problem(20, 30, 0.3, 40, torch.float32, seed=4)
    assert _call_bwd(emu, pb, 0, 0, None, None, x=None, dout=None, values=None, row_ptr=None, col_idx=None,
                     col_ptr=None, row_idx=None, perm=None) == OK, emu.last_error()
    # dx only: x, row_ptr and col_idx are not read
    dx = torch.full((pb.batch, pb.n_in), float("nan"))
    assert _call_bwd(emu, pb, 0, 0, dx, None, x=None, row_ptr=None, col_idx=None) == OK, emu.last_error()
    _check(torch.float32, "dx", dx, pb.ref_bwd()[0])
    # dvalues only: the CSC index and the values are not read
    dv = torch.full((pb.nnz,), float("nan"))
    assert _call_bwd(emu, pb, 0, 0, None, dv, values=None, col_ptr=None, row_idx=None, perm=None) == OK
    _check(torch.float32, "dvalues", dv, pb.ref_bwd()[1])


def test_a_device_without_room_for_the_tiles_is_an_error_not_a_crash(emu):
    emu.set_device("h100", 0, 10000)  # less than the smallest SpMM tile plan (32 columns) needs
    try:
        pb = Problem(200, 40, 0.3, 40, torch.float32, seed=4)
        out = torch.full((pb.batch, pb.n_out), float("nan"))
        st = _call_fwd(emu, _fwd_args(pb), out)
        assert st == CUDA_ERROR and "allows only 10000 bytes" in emu.last_error()
        assert torch.isnan(out).all()
    finally:
        emu.set_device("h100")


# ---- the emulation catches real kernel bugs -------------------------------------------------------------
# Each mutant is a scratch copy of csrc/cuda with one deliberate bug in sparse.cu; the emulation must
# make the tests above fail on it.
MUTANTS = {
    # the __syncwarp between staging a run of (column, value) pairs and the lanes that read all of it
    "missing __syncwarp after the SpMM run staging": (
        "          if (in) meta[warp][lane - off[i]] = make_int2(wc[i] - c0, __float_as_int(wv[i]));\n"
        "          __syncwarp();\n",
        "          if (in) meta[warp][lane - off[i]] = make_int2(wc[i] - c0, __float_as_int(wv[i]));\n"),
    # the barrier between the output stage's shared-memory stores and the coalesced copy-out
    "missing __syncthreads before the SpMM copy-out": (
        "      for (int v = 0; v < V; ++v) os[(lane * V + v) * OS + rl] = from_f<T>(acc[i][v] + bv);\n    }\n"
        "    __syncthreads();\n",
        "      for (int v = 0; v < V; ++v) os[(lane * V + v) * OS + rl] = from_f<T>(acc[i][v] + bv);\n    }\n"),
    # the window refill skips one entry of every row longer than 32 nonzeros
    "off-by-one in the SpMM window refill": (
        "          kb[i] += 32;\n          off[i] = 0;\n          const int64_t r = r0",
        "          kb[i] += 33;\n          off[i] = 0;\n          const int64_t r = r0"),
    # a split's later tiles overwrite its partial sums instead of adding to them
    "SDDMM partials overwritten across tiles": (
        "part[k] = first ? mine : part[k] + mine;", "part[k] = mine;"),
}
# Not among them, because the emulation cannot catch it: a missing __syncthreads between the x chunk's
# stores and the first reads.  A sweep runs every thread up to its next blocking point, and the first
# thing each warp does after its stores is a __ballot_sync, so all stores are done before any warp reads.


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_the_emulation_catches_a_deliberate_bug(tmp_path, mutant):
    emu = Emulator(build(cuda_dir=mutant_dir(tmp_path, "sparse.cu", *MUTANTS[mutant]), opt="-O1"))
    emu.set_device("h100")
    failures = []
    for case in (CASES[CASE_IDS.index("tile-kc128-tiles")], CASES[CASE_IDS.index("sddmm-tiles>splits")]):
        pb = _problem(case, torch.float32)
        try:
            _, out = fwd(emu, pb)
            _check(torch.float32, "out", out, pb.ref_fwd())
            _, dx, dv = bwd(emu, pb)
            rdx, rdv = pb.ref_bwd()
            _check(torch.float32, "dx", dx, rdx)
            _check(torch.float32, "dvalues", dv, rdv)
        except AssertionError as e:
            failures.append(f"{case[0]}: {e}")
    print(f"{mutant}: caught: {failures}")
    assert failures, f"the emulation did not catch: {mutant}"
