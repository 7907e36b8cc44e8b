"""The CUDA host emulation itself (tests/cuda_emu): each semantic it claims, checked on small kernels
(tests/cuda_emu/selftest.cu), and each misuse it must report instead of hanging.  Runs without a GPU."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from cuda_emu import load

INVALID_CONFIGURATION, INVALID_VALUE, LAUNCH_FAILURE = 9, 1, 719


@pytest.fixture(scope="module")
def emu():
    e = load()
    e.set_device("h100")
    yield e
    e.set_device("h100")
    e.set_schedule("forward")


def _ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def _shfl(emu, n, mode, arg, width=32, mask=0xFFFFFFFF):
    out = np.full(n, -7, dtype=np.int32)
    rc = emu.lib.kkemu_selftest_shfl(_ptr(out), n, mode, arg, width, ctypes.c_uint(mask))
    return rc, out


def _expected_shfl(n, mode, arg, width, mask):
    v = 10 * np.arange(n) + 1
    out = np.full(n, -1)
    for t in range(n):
        lane, seg = t % 32, (t % 32) // width * width
        if not (mask >> lane) & 1:
            continue
        if mode == 0:
            src = seg + (arg % width)
        elif mode == 1:
            src = lane - arg if lane - seg >= arg else lane
        elif mode == 2:
            src = lane + arg if lane - seg + arg < width else lane
        else:
            src = lane ^ arg if (lane ^ arg) < seg + width else lane
        out[t] = v[t - lane + src]
    return out


@pytest.mark.parametrize("schedule", ["forward", "reverse", "shuffle"])
@pytest.mark.parametrize("mode,arg,width", [(0, 3, 32), (0, 37, 32), (0, 5, 8), (1, 1, 32), (1, 4, 16),
                                            (2, 1, 32), (2, 7, 8), (3, 1, 32), (3, 16, 32), (3, 2, 4)])
def test_shuffles_follow_the_ptx_lane_rules(emu, schedule, mode, arg, width):
    emu.set_schedule(schedule, seed=3)
    try:
        rc, out = _shfl(emu, 64, mode, arg, width)
    finally:
        emu.set_schedule("forward")
    assert rc == 0, emu.lib.kkemu_selftest_error()
    np.testing.assert_array_equal(out, _expected_shfl(64, mode, arg, width, 0xFFFFFFFF))


def test_shuffle_with_a_partial_mask_exchanges_only_within_it(emu):
    rc, out = _shfl(emu, 32, 3, 1, 32, 0x0000FFFF)  # lanes 0-15 swap pairs; 16-31 do not take part
    assert rc == 0, emu.lib.kkemu_selftest_error()
    np.testing.assert_array_equal(out, _expected_shfl(32, 3, 1, 32, 0x0000FFFF))


def test_votes_and_syncthreads_count(emu):
    n = 70  # a partial last warp
    out = np.zeros(4 * n, dtype=np.uint32)
    assert emu.lib.kkemu_selftest_vote(_ptr(out), n) == 0, emu.lib.kkemu_selftest_error()
    out = out.reshape(n, 4)
    for t in range(n):
        w0, nl = t // 32 * 32, min(32, n - t // 32 * 32)
        ballot = sum(1 << j for j in range(nl) if (w0 + j) % 3 == 0)
        assert out[t, 0] == ballot
        assert out[t, 1] == int(w0 <= 37 < w0 + nl)
        assert out[t, 2] == 1
        assert out[t, 3] == (n + 1) // 2


def test_barriers_in_loops_and_atomics_across_blocks(emu):
    n = 1000
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    s, c, m = np.zeros(1, np.float32), np.zeros(1, np.int32), np.full(1, -1, np.int32)
    assert emu.lib.kkemu_selftest_reduce(_ptr(x), _ptr(s), _ptr(c), _ptr(m), n) == 0
    assert abs(float(s[0]) - float(x.astype(np.float64).sum())) < 1e-3
    assert int(c[0]) == n and int(m[0]) == n - 1


def test_half_and_bfloat16_round_to_nearest_even_like_torch(emu):
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(2000) * 10.0 ** rng.integers(-9, 6, 2000),
                        [0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e9, -1e9, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26,
                         np.inf, -np.inf, np.nan, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, 1.0 + 2.0 ** -8,
                         1.0 + 3 * 2.0 ** -8, 5.9604645e-08, 6.1035156e-05]]).astype(np.float32)
    n = len(x)
    h, b, back = np.zeros(n, np.uint16), np.zeros(n, np.uint16), np.zeros(2 * n, np.float32)
    assert emu.lib.kkemu_selftest_convert(_ptr(x), _ptr(h), _ptr(b), _ptr(back), n) == 0
    t = torch.from_numpy(x)
    want_h = t.to(torch.float16).view(torch.int16).numpy().view(np.uint16)
    want_b = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(h[~nan], want_h[~nan])
    np.testing.assert_array_equal(b[~nan], want_b[~nan])
    assert np.isnan(back[0::2][nan]).all() and np.isnan(back[1::2][nan]).all()
    np.testing.assert_array_equal(back[0::2][~nan], t.to(torch.float16).float().numpy()[~nan])
    np.testing.assert_array_equal(back[1::2][~nan], t.to(torch.bfloat16).float().numpy()[~nan])


def test_shared_memory_is_poisoned_per_block(emu):
    out = np.zeros(2 * 128, dtype=np.float32)
    assert emu.lib.kkemu_selftest_poison(_ptr(out)) == 0, emu.lib.kkemu_selftest_error()
    out = out.reshape(2, 2, 64)  # block, static/dynamic, thread
    for blk in range(2):
        for arr in range(2):
            assert (out[blk, arr, :32] == blk + 1).all()
            assert np.isnan(out[blk, arr, 32:]).all(), "unwritten shared memory must read as NaN"


@pytest.mark.parametrize("which,needle", [
    (0, "divergent barrier"),
    (1, "never reached by 1 of the block's 64 threads"),
    (2, "lane 0 reads lane 16, which has exited"),
    (3, "does not include the calling lane"),
    (4, "reads lane 7, which is not in the mask"),
    (5, "deadlock"),
    (6, "__trap()"),
])
def test_misuse_is_reported_instead_of_hanging(emu, which, needle):
    out = np.zeros(64, dtype=np.int32)
    rc = emu.lib.kkemu_selftest_bad(_ptr(out), which)
    msg = emu.lib.kkemu_selftest_error().decode()
    assert rc == LAUNCH_FAILURE, msg
    assert needle in msg and "bad_kernel" in msg, msg
    assert needle in emu.last_fault()


@pytest.mark.parametrize("grid,block,dyn,attr,rc,needle", [
    ((1, 1, 1), (1024, 1, 1), 0, -1, 0, ""),
    ((1, 1, 1), (1025, 1, 1), 0, -1, INVALID_CONFIGURATION, "block (1025, 1, 1)"),
    ((1, 1, 1), (32, 32, 2), 0, -1, INVALID_CONFIGURATION, "block (32, 32, 2)"),
    ((1, 1, 1), (1, 1, 65), 0, -1, INVALID_CONFIGURATION, "block (1, 1, 65)"),
    ((1, 65536, 1), (32, 1, 1), 0, -1, INVALID_CONFIGURATION, "grid (1, 65536, 1)"),
    ((1, 1, 65536), (32, 1, 1), 0, -1, INVALID_CONFIGURATION, "grid (1, 1, 65536)"),
    ((1, 65535, 1), (1, 1, 1), 0, -1, 0, ""),
    # 32 KiB static: 16 KiB dynamic fit in 48 KiB without the opt-in, 16 KiB + 1 do not
    ((1, 1, 1), (32, 1, 1), 16384, -1, 0, ""),
    ((1, 1, 1), (32, 1, 1), 16385, -1, INVALID_VALUE, "exceed the kernel's limit of 16384"),
    ((1, 1, 1), (32, 1, 1), 100000, 100000, 0, ""),
    ((1, 1, 1), (32, 1, 1), 100001, 100000, INVALID_VALUE, "exceed the kernel's limit of 100000"),
    # the opt-in limit is 227 KiB per block on sm_90, static included
    ((1, 1, 1), (32, 1, 1), 0, 232448 - 32768 + 1, INVALID_VALUE, "MaxDynamicSharedMemorySize"),
])
def test_launches_are_checked_against_the_card_limits(emu, grid, block, dyn, attr, rc, needle):
    emu.set_device("h100")  # resets the kernel's attribute
    out = np.zeros(1, dtype=np.int32)
    got = emu.lib.kkemu_selftest_launch(_ptr(out), *grid, *block, dyn, attr)
    msg = emu.lib.kkemu_selftest_error().decode()
    assert got == rc, msg
    assert needle in msg
    if rc == 0:
        assert out[0] == 7
    emu.set_device("h100")


def test_the_a100_preset_has_its_smaller_opt_in_limit(emu):
    emu.set_device("a100")
    try:
        out = np.zeros(1, dtype=np.int32)
        assert emu.lib.kkemu_selftest_launch(_ptr(out), 1, 1, 1, 32, 1, 1, 0, 166912 - 32768) == 0
        assert emu.lib.kkemu_selftest_launch(_ptr(out), 1, 1, 1, 32, 1, 1, 0, 166912 - 32768 + 1) == INVALID_VALUE
    finally:
        emu.set_device("h100")


# ---- kk::ptx (csrc/cuda/ptx.cuh): mma, ldmatrix and cp.async under the emulation -----------------

def _bits16(x: np.ndarray, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """float32 data rounded to bf16/f16: (bit patterns as uint16, the rounded values as float64)."""
    t = torch.from_numpy(x).to(dtype)
    return t.view(torch.int16).numpy().view(np.uint16).copy(), t.double().numpy()


def _mma_data(rng, tiles, k):
    a = rng.standard_normal((tiles, 16, k)).astype(np.float32)
    b = rng.standard_normal((tiles, k, 8)).astype(np.float32)
    c = rng.standard_normal((tiles, 16, 8)).astype(np.float32)
    return a, b, c


def _tol(reference: np.ndarray, d: np.ndarray) -> None:
    # the emulation rounds each (nearly exact) dot product once to float
    np.testing.assert_allclose(d, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("schedule", ["forward", "shuffle"])
@pytest.mark.parametrize("dtype,kind", [(torch.bfloat16, 0), (torch.float16, 1)])
def test_mma_m16n8k16_with_fragments_loaded_by_the_documented_layout(emu, dtype, kind, schedule):
    blocks, warps = 2, 3  # every warp its own tile
    tiles = blocks * warps
    a, b, c = _mma_data(np.random.default_rng(10 + kind), tiles, 16)
    (abits, a64), (bbits, b64) = _bits16(a, dtype), _bits16(b, dtype)
    d = np.full((tiles, 16, 8), -7.0, np.float32)
    emu.set_schedule(schedule, seed=5)
    try:
        rc = emu.lib.kkemu_selftest_mma_k16(_ptr(abits), _ptr(bbits), _ptr(c), _ptr(d), kind, blocks, warps)
    finally:
        emu.set_schedule("forward")
    assert rc == 0, emu.lib.kkemu_selftest_error()
    _tol(a64 @ b64 + c, d)
    # the product itself matters, not only C: a layout bug in A or B cannot hide in the tolerance
    assert np.abs(d - c).max() > 1.0


@pytest.mark.parametrize("b_layout", [0, 1], ids=["B[k][n]+x2.trans", "B[n][k]+x2"])
@pytest.mark.parametrize("dtype,kind", [(torch.bfloat16, 0), (torch.float16, 1)])
def test_mma_m16n8k16_with_fragments_loaded_by_ldmatrix(emu, dtype, kind, b_layout):
    blocks = 2  # two warps each
    a, b, c = _mma_data(np.random.default_rng(20 + kind), 2 * blocks, 16)
    (abits, a64), (bbits, b64) = _bits16(a, dtype), _bits16(b, dtype)
    d = np.full((2 * blocks, 16, 8), -7.0, np.float32)
    rc = emu.lib.kkemu_selftest_mma_ldmatrix(_ptr(abits), _ptr(bbits), _ptr(c), _ptr(d), kind, b_layout, blocks)
    assert rc == 0, emu.lib.kkemu_selftest_error()
    _tol(a64 @ b64 + c, d)


def test_mma_m16n8k8_tf32_truncates_the_operands(emu):
    blocks, warps = 1, 2
    a, b, c = _mma_data(np.random.default_rng(30), blocks * warps, 8)
    d = np.full((blocks * warps, 16, 8), -7.0, np.float32)
    rc = emu.lib.kkemu_selftest_mma_tf32(_ptr(a), _ptr(b), _ptr(c), _ptr(d), blocks, warps)
    assert rc == 0, emu.lib.kkemu_selftest_error()

    def tf32(x):  # the low 13 mantissa bits ignored
        return (x.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32).astype(np.float64)

    _tol(tf32(a) @ tf32(b) + c, d)
    full = a.astype(np.float64) @ b.astype(np.float64) + c
    assert np.abs(d - full).max() > 1e-4, "operands must not be used at full float precision"


def _ldmatrix_expected(image, perm, num, trans):
    """r[lane, i] per the PTX ISA: matrix i's row j is image row perm[8i + j]; lane l gets row l/4,
    columns 2(l%4), 2(l%4)+1 (low half first); with .trans, column l/4 of rows 2(l%4), 2(l%4)+1."""
    out = np.zeros((32, 4), np.uint32)
    for i in range(num):
        m = image[perm[8 * i: 8 * i + 8], :8].astype(np.uint32)  # the 8x8 matrix as stored
        if trans:
            m = m.T
        for lane in range(32):
            r, c = lane // 4, 2 * (lane % 4)
            out[lane, i] = m[r, c] | (m[r, c + 1] << 16)
    return out


@pytest.mark.parametrize("trans", [0, 1])
@pytest.mark.parametrize("num", [1, 2, 4])
@pytest.mark.parametrize("stride", [8, 24, 40])
def test_ldmatrix_element_by_element(emu, num, trans, stride):
    rng = np.random.default_rng(100 * num + 10 * trans + stride)
    image = rng.integers(0, 1 << 16, size=(32, stride), dtype=np.uint16)
    perm = rng.permutation(32).astype(np.int32)  # rows in any order and place
    out = np.zeros((32, 4), np.uint32)
    rc = emu.lib.kkemu_selftest_ldmatrix(_ptr(image), _ptr(perm), _ptr(out), num, trans, stride)
    assert rc == 0, emu.lib.kkemu_selftest_error()
    np.testing.assert_array_equal(out, _ldmatrix_expected(image, perm, num, trans))


def test_cp_async_lands_only_when_wait_group_completes_its_group(emu):
    src = np.random.default_rng(40).standard_normal(64 * 16).astype(np.float32)
    out = np.zeros((64, 6, 16), np.float32)
    assert emu.lib.kkemu_selftest_cp_async(_ptr(src), _ptr(out)) == 0, emu.lib.kkemu_selftest_error()
    src = src.reshape(64, 16)
    # slots: group 1 -> [0, 4), group 2 -> [4, 8), group 3 -> [8, 12), uncommitted -> [12, 16)
    landed = {0: 0, 1: 4, 2: 8, 3: 12, 4: 16, 5: 16}  # snapshot -> floats that must have arrived
    for snap, n in landed.items():
        np.testing.assert_array_equal(out[:, snap, :n], src[:, :n], err_msg=f"snapshot {snap}")
        assert np.isnan(out[:, snap, n:]).all(), f"snapshot {snap}: data read before its wait must be poison"


@pytest.mark.parametrize("schedule", ["forward", "reverse", "shuffle"])
def test_cp_async_data_reaches_other_threads_only_after_wait_and_barrier(emu, schedule):
    src = np.arange(256, dtype=np.float32)
    out = np.zeros(256, np.float32)
    emu.set_schedule(schedule, seed=3)
    try:
        assert emu.lib.kkemu_selftest_cp_async_share(_ptr(src), _ptr(out), 1) == 0, emu.lib.kkemu_selftest_error()
        np.testing.assert_array_equal(out.reshape(64, 4), np.roll(src.reshape(64, 4), -1, axis=0))
        # without the wait the barrier does not cover the copies: the neighbour's data is still in
        # flight (old contents), and threads may exit with copies pending
        out[:] = 0
        assert emu.lib.kkemu_selftest_cp_async_share(_ptr(src), _ptr(out), 0) == 0, emu.lib.kkemu_selftest_error()
        assert np.isnan(out).all()
    finally:
        emu.set_schedule("forward")


@pytest.mark.parametrize("which,needle", [
    (0, "lane 7 has exited, and the instruction needs all 32 lanes"),
    (1, "lane 16 waits in mma.sync.aligned at"),
    (2, "the warp has only 16 threads"),
    (3, "shared-memory destination"),
    (4, "global source"),
    (5, "is not in the block's shared memory"),
    (6, "is not 16-byte aligned"),
    (7, "is not in the block's shared memory"),
    (8, "was modified before the copy completed"),
    (9, "two copies of one cp.async-group write the same shared memory"),
    (10, "deadlock"),
    (11, "lane 16 executes it as ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 (the warp's lanes must use the "
         "same qualifiers)"),
])
def test_ptx_misuse_is_reported(emu, which, needle):
    g = np.zeros(64, np.float32)
    rc = emu.lib.kkemu_selftest_bad_ptx(_ptr(g), which)
    msg = emu.lib.kkemu_selftest_error().decode()
    assert rc == LAUNCH_FAILURE, msg
    assert needle in msg and "bad_ptx_kernel" in msg, msg
    if which in (3, 4):
        assert "misaligned (needs 16-byte alignment)" in msg, msg
