"""Calls libkernelkit's mfac C ABI with numpy arrays through ctypes -- no torch import.

Every CPU entry point of csrc/include/kernelkit/mfac.h against numpy float64: dots (blocks, several
vectors, padded rows) and the insert (bfloat16 rounding to nearest even, qr), combine, diag, the static
factor in both forms (against numpy's Cholesky and solve), and the sliding-window Gram inverse
(rebuild, rank-2 updates, coefficients) against numpy's inverse; float32 / bfloat16 (uint16 storage) /
float64 buffers; a few error paths (status and a message naming the argument).  Outputs are
NaN-poisoned before each call.

Run as a script by tests/test_mfac_cabi.py (in a fresh interpreter, once per ISA via KERNELKIT_CPU_ISA)
and, in .ci/run, against the AddressSanitizer/UBSan build of the library.
Usage: python cabi_mfac_numpy.py LIBRARY_PATH   (prints "ok <isa> <cases>" and exits 0 on success)
"""
import ctypes
import sys

import numpy as np

KK_FLOAT32, KK_FLOAT64, KK_FLOAT16, KK_BFLOAT16 = 0, 1, 2, 3
KK_OK, KK_ERR_NULL_POINTER, KK_ERR_INVALID_SIZE, KK_ERR_INVALID_ARGUMENT, KK_ERR_UNSUPPORTED_DTYPE = 0, 1, 2, 3, 4
BF16 = "bf16"


def load(path):
    lib = ctypes.CDLL(path)
    i64, i32, d, ptr, dt = ctypes.c_int64, ctypes.c_int32, ctypes.c_double, ctypes.c_void_p, ctypes.c_int
    lib.kk_mfac_static_rows.argtypes = [i64, i64, i64]
    lib.kk_mfac_static_rows.restype = i64
    lib.kk_mfac_dots_cpu.argtypes = [dt, i64, i64, i64, ptr, i64, i64, ptr, i64, i64, ptr, ptr, i32]
    lib.kk_mfac_combine_cpu.argtypes = [dt, i64, i64, i64, ptr, i64, i64, d, ptr, i64, ptr, ptr, i64, i32]
    lib.kk_mfac_diag_cpu.argtypes = [dt, i64, i64, ptr, i64, d, d, ptr, i32]
    lib.kk_mfac_static_setup_cpu.argtypes = [dt, i64, i64, i64, ptr, i64, d, ptr, i64, i32]
    lib.kk_mfac_window_update_cpu.argtypes = [i64, d, ptr, ptr, i64, ptr, i32]
    lib.kk_mfac_window_rebuild_cpu.argtypes = [i64, d, ptr, ptr, i32]
    lib.kk_mfac_window_coef_cpu.argtypes = [i64, i64, d, ptr, ptr, ptr, i32]
    for name in ("dots", "combine", "diag", "static_setup", "window_update", "window_rebuild", "window_coef"):
        getattr(lib, f"kk_mfac_{name}_cpu").restype = ctypes.c_int
    lib.kk_last_error.restype = ctypes.c_char_p
    lib.kk_cpu_isa.restype = ctypes.c_char_p
    return lib


def p(a):
    return None if a is None else a.ctypes.data_as(ctypes.c_void_p)


def to_bf16(a):
    """float32 -> bfloat16 bits (uint16), round to nearest even (finite values)."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(b):
    return (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def buffer(rng, shape, kind):
    """(storage array, its float64 values, dtype code)."""
    a = rng.standard_normal(shape)
    if kind == BF16:
        s = to_bf16(a.astype(np.float32))
        return s, from_bf16(s), KK_BFLOAT16
    s = a.astype(kind)
    return s, s.astype(np.float64), KK_FLOAT64 if kind == np.float64 else KK_FLOAT32


def vdtype(kind):
    return np.float64 if kind == np.float64 else np.float32


def check(got, want, scale, tol, what):
    got = np.asarray(got, np.float64)
    assert np.isfinite(got).all(), f"{what}: an output element was not written"
    err = np.max(np.abs(got - want) / np.maximum(scale, 1e-300)) if got.size else 0.0
    assert err <= tol, f"{what}: error {err:.3e} > {tol:.0e}"


def expect(lib, status, code, needle):
    msg = lib.kk_last_error().decode()
    assert status == code, f"status {status}, expected {code} ({msg})"
    assert needle in msg, f"message {msg!r} lacks {needle!r}"


def main():
    lib = load(sys.argv[1])
    rng = np.random.default_rng(7)
    cases = 0
    for kind in (np.float32, BF16, np.float64):
        vt = vdtype(kind)
        tol = 1e-12 if kind == np.float64 else 1e-6
        for r, d, block, nvec, pad, nt in ((7, 3000, 3000, 2, 3, 2), (5, 700, 64, 3, 0, 1), (4, 2500, 1000, 1, 1, 0)):
            G, Gd, code = buffer(rng, (r, d + pad), kind)
            x = rng.standard_normal((nvec, d)).astype(vt)
            nb = -(-d // block)
            q = np.full((nvec, nb, r), np.nan)
            assert lib.kk_mfac_dots_cpu(code, r, d, block, p(G), d + pad, nvec, p(x), d, -1, p(q), None, nt) == KK_OK
            Gb = np.pad(Gd[:, :d], ((0, 0), (0, nb * block - d))).reshape(r, nb, block)
            xb = np.pad(x.astype(np.float64), ((0, 0), (0, nb * block - d))).reshape(nvec, nb, block)
            want = np.einsum("ibk,vbk->vbi", Gb, xb)
            scale = np.einsum("ibk,vbk->vbi", np.abs(Gb), np.abs(xb))
            check(q, want, scale, 1e-12, f"dots {kind}")
            c = rng.standard_normal((nvec, nb, r))
            out = np.full((nvec, d), np.nan, vt)
            assert lib.kk_mfac_combine_cpu(code, r, d, block, p(G), d + pad, nvec, 0.5, p(x), d, p(c), p(out), d,
                                           nt) == KK_OK
            wantc = np.einsum("vbi,ibk->vbk", c, Gb).reshape(nvec, -1)[:, :d] + 0.5 * x
            scalec = np.einsum("vbi,ibk->vbk", np.abs(c), np.abs(Gb)).reshape(nvec, -1)[:, :d] + 0.5 * np.abs(x)
            check(out, wantc, scalec, tol, f"combine {kind}")
            dg = np.full(d, np.nan, vt)
            assert lib.kk_mfac_diag_cpu(code, r, d, p(G), d + pad, 1.0, -0.5, p(dg), nt) == KK_OK
            s = (Gd[:, :d] ** 2).sum(0)
            check(dg, 1.0 - 0.5 * s, 1.0 + 0.5 * s, tol, f"diag {kind}")
            cases += 3
        # insert: the row stored rounded, q = G_new x, qr = G_new round(x)
        r, d, row = 6, 2300, 4
        G, Gd, code = buffer(rng, (r, d), kind)
        x = (3 * rng.standard_normal((1, d))).astype(vt)
        q, qr = np.full((1, 1, r), np.nan), np.full((1, 1, r), np.nan)
        assert lib.kk_mfac_dots_cpu(code, r, d, d, p(G), d, 1, p(x), d, row, p(q), p(qr), 2) == KK_OK
        stored = to_bf16(x[0]) if kind == BF16 else x[0].astype(kind)
        assert np.array_equal(G[row], stored), "inserted row"
        Gn = from_bf16(G) if kind == BF16 else G.astype(np.float64)
        check(q.ravel(), Gn @ x[0].astype(np.float64), np.abs(Gn) @ np.abs(x[0].astype(np.float64)), 1e-12, "insert q")
        check(qr.ravel(), Gn @ Gn[row], np.abs(Gn) @ np.abs(Gn[row]), 1e-12, "insert qr")
        G0 = G.copy()
        x[0, 7] = np.nan
        st = lib.kk_mfac_dots_cpu(code, r, d, d, p(G), d, 1, p(x), d, 1, p(q), p(qr), 2)
        expect(lib, st, KK_ERR_INVALID_ARGUMENT, "not finite")
        assert np.array_equal(G, G0), "a rejected insert changed G"
        cases += 2
        # static factor, both forms
        damp = 0.03
        for m, d, block in ((8, 200, 1000), (12, 90, 25)):
            G, Gd, code = buffer(rng, (m, d), kind)
            rr = lib.kk_mfac_static_rows(m, d, block)
            Z = np.full((rr, d), np.nan, vt)
            assert lib.kk_mfac_static_setup_cpu(code, m, d, block, p(G), d, damp, p(Z), d, 2) == KK_OK
            for lo in range(0, d, block):
                Gb = Gd[:, lo:lo + block]
                w = Gb.shape[1]
                if m <= min(block, d):
                    L = np.linalg.cholesky(Gb @ Gb.T + m * damp * np.eye(m))
                    want = np.linalg.solve(L, Gb)
                else:
                    L = np.linalg.cholesky(Gb.T @ Gb + m * damp * np.eye(w))
                    want = np.zeros((rr, w))
                    want[:w] = np.linalg.inv(L)
                check(Z[:, lo:lo + w], want, 1 + np.abs(want), 1e-11 if kind == np.float64 else 1e-6, f"setup {kind}")
            cases += 1
    # sliding window: rebuild, updates, coefficients
    m, d, damp = 40, 83, 0.1
    A = rng.standard_normal((m, d))
    gram = A @ A.T
    kinv = np.full((m, m), np.nan)
    assert lib.kk_mfac_window_rebuild_cpu(m, damp, p(gram), p(kinv), 2) == KK_OK
    exact = np.linalg.inv(gram + m * damp * np.eye(m))
    check(kinv, exact, np.abs(exact).max(), 1e-12, "rebuild")
    for step in range(6):
        row = (5 * step) % m
        A[row] = rng.standard_normal(d)
        newcol = A @ A[row]
        assert lib.kk_mfac_window_update_cpu(m, damp, p(gram), p(kinv), row, p(newcol), 2) == KK_OK
        exact = np.linalg.inv(A @ A.T + m * damp * np.eye(m))
        check(kinv, exact, np.abs(exact).max(), 1e-10, "update")
        assert np.array_equal(kinv, kinv.T) and np.array_equal(gram[row], newcol) and np.array_equal(gram[:, row], newcol)
        cases += 1
    qv = rng.standard_normal((3, m))
    cv = np.full((3, m), np.nan)
    assert lib.kk_mfac_window_coef_cpu(m, 3, 2.0, p(kinv), p(qv), p(cv), 1) == KK_OK
    check(cv, 2.0 * qv @ kinv.T, 2.0 * np.abs(qv) @ np.abs(kinv).T, 1e-13, "coef")
    # errors
    G = np.zeros((4, 16), np.float32)
    q = np.zeros(64)
    expect(lib, lib.kk_mfac_dots_cpu(KK_FLOAT16, 4, 16, 16, p(G), 16, 1, p(G), 16, -1, p(q), None, 1),
           KK_ERR_UNSUPPORTED_DTYPE, "gdtype")
    expect(lib, lib.kk_mfac_dots_cpu(KK_FLOAT32, 4, 16, 16, p(G), 8, 1, p(G), 16, -1, p(q), None, 1),
           KK_ERR_INVALID_ARGUMENT, "ldg")
    expect(lib, lib.kk_mfac_static_setup_cpu(KK_FLOAT32, 4, 16, 16, p(G), 16, -1.0, p(G), 16, 1),
           KK_ERR_INVALID_ARGUMENT, "damp")
    expect(lib, lib.kk_mfac_window_rebuild_cpu(m, damp, None, p(kinv), 1), KK_ERR_NULL_POINTER, "gram")
    print("ok", lib.kk_cpu_isa().decode(), cases + 4)


if __name__ == "__main__":
    main()
