"""Calls libkernelkit's Monarch C ABI with numpy arrays through ctypes -- no torch import.

Run as a script by tests/test_monarch_cabi.py (in a fresh interpreter, so that "torch was never
imported" can be asserted) and, in .ci/run, against the AddressSanitizer/UBSan build of the library.
Usage: python cabi_monarch_numpy.py LIBRARY_PATH   (prints "ok" and exits 0 on success)
"""
import ctypes
import sys

import numpy as np

KK_FLOAT32, KK_FLOAT64 = 0, 1
KK_OK, KK_ERR_NULL_POINTER, KK_ERR_INVALID_SIZE, KK_ERR_INVALID_ARGUMENT, KK_ERR_UNSUPPORTED_DTYPE = 0, 1, 2, 3, 4


def load(path):
    lib = ctypes.CDLL(path)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.kk_monarch_fwd_cpu.argtypes = [ctypes.c_int] + [i64] * 7 + [ptr, i64, ptr, ptr, ptr, i64, ctypes.c_int32]
    lib.kk_monarch_bwd_cpu.argtypes = ([ctypes.c_int] + [i64] * 7 + [ptr, i64, ptr, ptr, ptr, i64, ptr, i64, ptr, ptr,
                                       ctypes.c_int32])
    lib.kk_monarch_fwd_cpu.restype = lib.kk_monarch_bwd_cpu.restype = ctypes.c_int
    lib.kk_last_error.restype = ctypes.c_char_p
    lib.kk_status_string.restype = ctypes.c_char_p
    lib.kk_version.restype = ctypes.c_char_p
    lib.kk_abi_version.restype = ctypes.c_int32
    return lib


def reference(x, w1, w2):
    k, q, p = w1.shape
    l, s, r = w2.shape
    t = np.einsum("bkp,kqp->bkq", x.reshape(-1, k, p), w1).reshape(-1, r, l)
    o = np.einsum("blr,lsr->bls", t.transpose(0, 2, 1), w2)
    return o.transpose(0, 2, 1).reshape(-1, s * l)


def reference_bwd(x, w1, w2, g):
    k, q, p = w1.shape
    l, s, r = w2.shape
    xb = x.reshape(-1, k, p)
    h = np.einsum("bkp,kqp->bkq", xb, w1).reshape(-1, r, l).transpose(0, 2, 1)
    do = g.reshape(-1, s, l).transpose(0, 2, 1)
    dw2 = np.einsum("bls,blr->lsr", do, h)
    dt = np.einsum("bls,lsr->blr", do, w2).transpose(0, 2, 1).reshape(-1, k, q)
    return np.einsum("bkq,kqp->bkp", dt, w1).reshape(x.shape), np.einsum("bkq,bkp->kqp", dt, xb), dw2


def p(a):
    return a.ctypes.data_as(ctypes.c_void_p) if a is not None else None


def main(path):
    assert "torch" not in sys.modules
    lib = load(path)
    assert lib.kk_abi_version() == 1, lib.kk_abi_version()
    assert lib.kk_version().decode().count(".") == 2
    rng = np.random.default_rng(0)
    for dtype, code, tol in ((np.float64, KK_FLOAT64, 1e-12), (np.float32, KK_FLOAT32, 1e-5)):
        for (B, k, q, p_, l, s, r) in [(7, 4, 6, 5, 3, 7, 8), (1, 2, 8, 3, 4, 5, 4), (65, 3, 10, 7, 5, 9, 6),
                                       (40, 4, 24, 24, 4, 24, 24), (70, 2, 8, 600, 4, 520, 4)]:
            x = rng.standard_normal((B, k * p_)).astype(dtype)
            w1 = rng.standard_normal((k, q, p_)).astype(dtype)
            w2 = rng.standard_normal((l, s, r)).astype(dtype)
            g = rng.standard_normal((B, l * s)).astype(dtype)
            out = np.full((B, l * s), np.nan, dtype)
            st = lib.kk_monarch_fwd_cpu(code, B, k, q, p_, l, s, r, p(x), k * p_, p(w1), p(w2), p(out), l * s, 2)
            assert st == KK_OK, lib.kk_last_error()
            ref = reference(x.astype(np.float64), w1.astype(np.float64), w2.astype(np.float64))
            assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < tol
            dx, dw1, dw2 = (np.full(a.shape, np.nan, dtype) for a in (x, w1, w2))
            st = lib.kk_monarch_bwd_cpu(code, B, k, q, p_, l, s, r, p(x), k * p_, p(w1), p(w2), p(g), l * s,
                                        p(dx), k * p_, p(dw1), p(dw2), 0)
            assert st == KK_OK, lib.kk_last_error()
            for got, want in zip((dx, dw1, dw2), reference_bwd(*(a.astype(np.float64) for a in (x, w1, w2, g)))):
                assert np.linalg.norm(got - want) / np.linalg.norm(want) < tol
    # Error statuses instead of crashes.
    x = np.ones((2, 20)); w1 = np.ones((4, 6, 5)); w2 = np.ones((3, 7, 8)); out = np.ones((2, 21))
    cases = [
        ((KK_FLOAT64, 2, 4, 6, 5, 3, 7, 8, None, 20, p(w1), p(w2), p(out), 21, 1), KK_ERR_NULL_POINTER, b"x"),
        ((KK_FLOAT64, 2, 4, 6, 5, 3, 7, 8, p(x), 20, None, p(w2), p(out), 21, 1), KK_ERR_NULL_POINTER, b"w1"),
        ((KK_FLOAT64, -1, 4, 6, 5, 3, 7, 8, p(x), 20, p(w1), p(w2), p(out), 21, 1), KK_ERR_INVALID_SIZE, b"batch"),
        ((KK_FLOAT64, 2, 4, -6, 5, 3, 7, 8, p(x), 20, p(w1), p(w2), p(out), 21, 1), KK_ERR_INVALID_SIZE, b"q"),
        ((KK_FLOAT64, 2, 4, 6, 5, 3, 7, 9, p(x), 20, p(w1), p(w2), p(out), 21, 1), KK_ERR_INVALID_SIZE, b"l*r"),
        ((KK_FLOAT64, 2, 4, 6, 5, 3, 7, 8, p(x), 19, p(w1), p(w2), p(out), 21, 1), KK_ERR_INVALID_ARGUMENT, b"ldx"),
        ((KK_FLOAT64, 2, 4, 6, 5, 3, 7, 8, p(x), 20, p(w1), p(w2), p(out), 20, 1), KK_ERR_INVALID_ARGUMENT, b"ldo"),
        ((KK_FLOAT16, 2, 4, 6, 5, 3, 7, 8, p(x), 20, p(w1), p(w2), p(out), 21, 1), KK_ERR_UNSUPPORTED_DTYPE, b"dtype"),
    ]
    for args, want, word in cases:
        st = lib.kk_monarch_fwd_cpu(*args)
        assert st == want, (args, st, lib.kk_last_error())
        assert word in lib.kk_last_error(), lib.kk_last_error()
        assert lib.kk_status_string(st) != b"ok"
    st = lib.kk_monarch_bwd_cpu(KK_FLOAT64, 2, 4, 6, 5, 3, 7, 8, p(x), 20, p(w1), p(w2), None, 21,
                                p(np.empty_like(x)), 20, None, None, 1)
    assert st == KK_ERR_NULL_POINTER and b"dout" in lib.kk_last_error()
    print("ok")


KK_FLOAT16 = 2

if __name__ == "__main__":
    main(sys.argv[1])
