"""Calls libkernelkit's vq C ABI with numpy arrays through ctypes -- no torch import.

Every CPU entry point of csrc/include/kernelkit/vq.h against a numpy float64 reference: VQ4DiT and
AQLM formats (d 1..16, M 1..8, K 3..65536 with uint8 / int16 codes, codes >= 2^15 stored negative),
per-set codebooks, float32/float64, row strides wider than the rows, batches around the LUT tiles,
every path and thread counts; kk_vq_assign_cpu against numpy's stable argsort; the error paths
(status and a message naming the argument or the bad code).  Outputs are NaN-poisoned before each call.

Run as a script by tests/test_vq_cabi.py (in a fresh interpreter, once per ISA via KERNELKIT_CPU_ISA)
and, in .ci/run, against the AddressSanitizer/UBSan build of the library.
Usage: python cabi_vq_numpy.py LIBRARY_PATH   (prints "ok <isa> <cases>" and exits 0 on success)
"""
import ctypes
import sys

import numpy as np

KK_FLOAT32, KK_FLOAT64, KK_FLOAT16 = 0, 1, 2
KK_OK, KK_ERR_NULL_POINTER, KK_ERR_INVALID_SIZE, KK_ERR_INVALID_ARGUMENT, KK_ERR_UNSUPPORTED_DTYPE = 0, 1, 2, 3, 4
TOL = {np.float64: 1e-12, np.float32: 2e-5}
CODE = {np.float64: KK_FLOAT64, np.float32: KK_FLOAT32}


class Format(ctypes.Structure):
    _fields_ = [("n_out", ctypes.c_int64), ("n_in", ctypes.c_int64), ("codebook_size", ctypes.c_int64),
                ("rows_per_codebook", ctypes.c_int64), ("group_size", ctypes.c_int32),
                ("num_codebooks", ctypes.c_int32), ("code_bits", ctypes.c_int32), ("flags", ctypes.c_int32)]


def load(path):
    lib = ctypes.CDLL(path)
    i64, i32, ptr, fmt = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p, ctypes.POINTER(Format)
    lib.kk_vq_check_codes.argtypes = [fmt, ptr]
    lib.kk_vq_dequantize_cpu.argtypes = [ctypes.c_int, fmt, ptr, ptr, ptr, ptr, i64, i32]
    lib.kk_vq_linear_fwd_cpu.argtypes = [ctypes.c_int, fmt, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, i32, i32]
    lib.kk_vq_linear_bwd_cpu.argtypes = [ctypes.c_int, fmt, i64, ptr, ptr, ptr, ptr, i64, ptr, i64, ptr, i64, ptr,
                                         ptr, i32]
    lib.kk_vq_assign_cpu.argtypes = [ctypes.c_int, i64, i64, i32, ptr, ptr, i32, ptr, ptr, i32]
    for f in (lib.kk_vq_check_codes, lib.kk_vq_dequantize_cpu, lib.kk_vq_linear_fwd_cpu, lib.kk_vq_linear_bwd_cpu,
              lib.kk_vq_assign_cpu):
        f.restype = ctypes.c_int
    lib.kk_last_error.restype = ctypes.c_char_p
    lib.kk_cpu_isa.restype = ctypes.c_char_p
    return lib


def p(a):
    return None if a is None else a.ctypes.data_as(ctypes.c_void_p)


def rel(got, ref):
    assert np.isfinite(got).all(), "an output element was not written"
    den = np.linalg.norm(ref)
    return np.linalg.norm(got.astype(np.float64) - ref) / (den if den > 0 else 1.0)


def make(rng, n_out, n_in, K, rpc, d, M, bits, dt):
    G = n_in // d
    u = rng.integers(0, K, size=(n_out, G, M))
    u[rng.random(u.shape) < 0.25] = K - 1
    codes = u.astype(np.uint8) if bits == 8 else u.astype(np.uint16).view(np.int16)
    S = -(-n_out // rpc)
    cb = rng.standard_normal((S, M, K, d)).astype(dt)
    sc = (0.5 + rng.random(n_out)).astype(dt)
    bias = rng.standard_normal(n_out).astype(dt)
    fmt = Format(n_out, n_in, K, rpc, d, M, bits, 0)
    return fmt, u, np.ascontiguousarray(codes), cb, sc, bias


def unscaled(u, cb, rpc):
    n_out, G, M = u.shape
    s = (np.arange(n_out) // rpc)[:, None, None]
    return cb.astype(np.float64)[s, np.arange(M)[None, None, :], u].sum(2).reshape(n_out, -1)


def check_linear(lib, rng, case, dt, path, nt, pad):
    n_out, n_in, K, rpc, d, M, bits, B = case
    fmt, u, codes, cb, sc, bias = make(rng, n_out, n_in, K, rpc, d, M, bits, dt)
    code = CODE[dt]
    U = unscaled(u, cb, rpc)
    W = U * sc.astype(np.float64)[:, None]
    w = np.full((n_out, n_in + pad), np.nan, dt)
    assert lib.kk_vq_dequantize_cpu(code, fmt, p(codes), p(cb), p(sc), p(w), n_in + pad, nt) == KK_OK, lib.kk_last_error()
    assert rel(w[:, :n_in], W) <= TOL[dt], ("dequantize", case)
    assert np.isnan(w[:, n_in:]).all(), "dequantize wrote the padding"
    xfull = rng.standard_normal((B, n_in + pad)).astype(dt)
    x = xfull[:, :n_in]
    out = np.full((B, n_out + pad), np.nan, dt)
    st = lib.kk_vq_linear_fwd_cpu(code, fmt, B, p(codes), p(cb), p(sc), p(xfull), n_in + pad, p(bias), p(out),
                                  n_out + pad, path, nt)
    assert st == KK_OK, lib.kk_last_error()
    ref = x.astype(np.float64) @ W.T + bias
    assert rel(out[:, :n_out], ref) <= TOL[dt], ("fwd", case, path, rel(out[:, :n_out], ref))
    dout = rng.standard_normal((B, n_out)).astype(dt)
    dx = np.full((B, n_in), np.nan, dt)
    dcb = np.full(cb.shape, np.nan, dt)
    ds = np.full(n_out, np.nan, dt)
    st = lib.kk_vq_linear_bwd_cpu(code, fmt, B, p(codes), p(cb), p(sc), p(xfull), n_in + pad, p(dout), n_out,
                                  p(dx), n_in, p(dcb), p(ds), nt)
    assert st == KK_OK, lib.kk_last_error()
    d64, x64 = dout.astype(np.float64), x.astype(np.float64)
    assert rel(dx, d64 @ W) <= TOL[dt], ("dx", case)
    dW = d64.T @ x64
    assert rel(ds, (dW * U).sum(1)) <= TOL[dt], ("dscales", case)
    ref_cb = np.zeros(cb.shape)
    G = n_in // d
    sdw = (dW * sc.astype(np.float64)[:, None]).reshape(n_out, G, d)
    sets = np.broadcast_to((np.arange(n_out) // rpc)[:, None], (n_out, G))
    for m in range(M):
        np.add.at(ref_cb, (sets, m, u[:, :, m]), sdw)
    assert rel(dcb, ref_cb) <= TOL[dt], ("dcodebooks", case)


def check_assign(lib, rng, n, K, d, topn, dt, nt):
    v = rng.integers(-2, 3, size=(n, d)).astype(dt)  # a coarse grid: ties happen
    c = rng.integers(-2, 3, size=(K, d)).astype(dt)
    idx = np.full((n, topn), -1, np.int32)
    dist = np.full((n, topn), np.nan, dt)
    assert lib.kk_vq_assign_cpu(CODE[dt], n, K, d, p(v), p(c), topn, p(idx), p(dist), nt) == KK_OK, lib.kk_last_error()
    D = ((v[:, None, :].astype(np.float64) - c[None, :, :]) ** 2).sum(-1)
    want = np.argsort(D, axis=1, kind="stable")[:, :topn]  # ties: the smaller index first
    assert (idx == want).all(), ("assign", n, K, d, topn)
    assert np.allclose(dist, np.take_along_axis(D, want, 1)), "assign distances"


def check_errors(lib, rng):
    n = 0
    fmt, u, codes, cb, sc, bias = make(rng, 5, 8, 200, 10, 4, 2, 8, np.float32)
    x = np.zeros((3, 8), np.float32)
    out = np.zeros((3, 5), np.float32)

    def expect(st, code, needle):
        nonlocal n
        msg = lib.kk_last_error().decode()
        assert st == code and needle in msg, (st, code, msg, needle)
        n += 1

    bad = Format(5, 8, 200, 10, 3, 2, 8, 0)
    expect(lib.kk_vq_check_codes(bad, p(codes)), KK_ERR_INVALID_ARGUMENT, "group_size")
    bad = Format(5, 8, 200, 10, 4, 2, 12, 0)
    expect(lib.kk_vq_check_codes(bad, p(codes)), KK_ERR_INVALID_ARGUMENT, "code_bits")
    bad = Format(5, 8, 300, 10, 4, 2, 8, 0)
    expect(lib.kk_vq_check_codes(bad, p(codes)), KK_ERR_INVALID_SIZE, "codebook_size")
    codes[2, 1, 0] = 201
    expect(lib.kk_vq_check_codes(fmt, p(codes)), KK_ERR_INVALID_ARGUMENT, "codes[row 2, group 1, codebook 0] = 201")
    out[:] = 7
    expect(lib.kk_vq_linear_fwd_cpu(KK_FLOAT32, fmt, 3, p(codes), p(cb), p(sc), p(x), 8, None, p(out), 5, 0, 0),
           KK_ERR_INVALID_ARGUMENT, "row 2, group 1")
    assert (out == 7).all(), "fwd wrote out before failing the code check"
    codes[2, 1, 0] = 3
    expect(lib.kk_vq_linear_fwd_cpu(KK_FLOAT16, fmt, 3, p(codes), p(cb), p(sc), p(x), 8, None, p(out), 5, 0, 0),
           KK_ERR_UNSUPPORTED_DTYPE, "dtype")
    expect(lib.kk_vq_linear_fwd_cpu(KK_FLOAT32, fmt, 3, p(codes), p(cb), p(sc), p(x), 4, None, p(out), 5, 0, 0),
           KK_ERR_INVALID_ARGUMENT, "ldx")
    expect(lib.kk_vq_linear_bwd_cpu(KK_FLOAT32, fmt, 3, p(codes), p(cb), None, p(x), 8, p(out), 5, None, 8, None,
                                    p(sc), 0), KK_ERR_INVALID_ARGUMENT, "dscales")
    expect(lib.kk_vq_assign_cpu(KK_FLOAT32, 2, 4, 2, p(x), p(cb), 9, None, None, 0), KK_ERR_INVALID_ARGUMENT, "topn")
    i16 = np.array([[[-1]]], np.int16)
    expect(lib.kk_vq_check_codes(Format(1, 8, 4096, 1, 8, 1, 16, 0), p(i16)), KK_ERR_INVALID_ARGUMENT, "= 65535")
    assert lib.kk_vq_check_codes(Format(1, 8, 65536, 1, 8, 1, 16, 0), p(i16)) == KK_OK
    return n


def main(path):
    lib = load(path)
    rng = np.random.default_rng(0)
    cases = [(33, 64, 256, 1 << 30, 4, 1, 8, 1), (33, 64, 256, 1 << 30, 4, 1, 8, 18), (24, 64, 256, 8, 8, 2, 8, 5),
             (9, 32, 65536, 1 << 30, 8, 1, 16, 2), (7, 48, 4096, 3, 16, 1, 16, 16), (12, 24, 64, 5, 2, 8, 8, 3),
             (5, 6, 3, 1, 1, 3, 8, 33), (40, 32, 256, 16, 4, 1, 8, 300)]
    n = 0
    for dt in (np.float32, np.float64):
        for i, case in enumerate(cases):
            for path in (0, 1, 2):
                check_linear(lib, rng, case, dt, path, (i + path) % 4, 3 * ((i + path) % 2))
                n += 1
        for (na, K, d, topn) in ((300, 256, 4, 1), (101, 37, 3, 8), (50, 5, 16, 5), (9, 1, 2, 1)):
            check_assign(lib, rng, na, K, d, topn, dt, na % 3)
            n += 1
    n_err = check_errors(lib, rng)
    assert "torch" not in sys.modules
    print(f"ok {lib.kk_cpu_isa().decode()} {n} cases {n_err} error paths")


if __name__ == "__main__":
    main(sys.argv[1])
