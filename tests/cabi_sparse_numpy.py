"""Calls libkernelkit's sparse C ABI with numpy arrays through ctypes -- no torch import.

Every CPU entry point of csrc/include/kernelkit/sparse.h against a numpy float64 reference: random
CSR weights (empty rows and columns, densities 1-100%), float32/float64, row strides wider than the
rows, batches around the kernels' chunk sizes, thread counts, nnz = 0, batch = 0; the transpose
against numpy's stable sort; every error path (status, a message naming the argument, outputs left
untouched).  Outputs are NaN-poisoned before each call.

Run as a script by tests/test_sparse_cabi.py (in a fresh interpreter, so that "torch was never
imported" can be asserted, once per ISA via KERNELKIT_CPU_ISA) and, in .ci/run, against the
AddressSanitizer/UBSan build of the library.
Usage: python cabi_sparse_numpy.py LIBRARY_PATH   (prints "ok <isa> <cases>" and exits 0 on success)
"""
import ctypes
import os
import sys

import numpy as np

KK_FLOAT32, KK_FLOAT64, KK_FLOAT16, KK_BFLOAT16 = 0, 1, 2, 3
KK_OK, KK_ERR_NULL_POINTER, KK_ERR_INVALID_SIZE, KK_ERR_INVALID_ARGUMENT, KK_ERR_UNSUPPORTED_DTYPE = 0, 1, 2, 3, 4
KK_ERR_OUT_OF_MEMORY = 5
TOL = {np.float64: 1e-12, np.float32: 1e-5}
CODE = {np.float64: KK_FLOAT64, np.float32: KK_FLOAT32}


def load(path):
    lib = ctypes.CDLL(path)
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
    lib.kk_sparse_check_csr.argtypes = [i64, i64, i64, ptr, ptr]
    lib.kk_sparse_csr_transpose_cpu.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr]
    lib.kk_sparse_linear_fwd_cpu.argtypes = [ctypes.c_int, i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr,
                                             i64, i32]
    lib.kk_sparse_linear_bwd_cpu.argtypes = [ctypes.c_int, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr,
                                             i64, ptr, i64, ptr, i64, ptr, i32]
    lib.kk_sparse_to_dense_cpu.argtypes = [ctypes.c_int, i64, i64, i64, ptr, ptr, ptr, ptr, i64, i32]
    lib.kk_sparse_gather_cpu.argtypes = [ctypes.c_int, i64, i64, i64, ptr, ptr, ptr, i64, ptr, i32]
    for f in (lib.kk_sparse_check_csr, lib.kk_sparse_csr_transpose_cpu, lib.kk_sparse_linear_fwd_cpu,
              lib.kk_sparse_linear_bwd_cpu, lib.kk_sparse_to_dense_cpu, lib.kk_sparse_gather_cpu):
        f.restype = ctypes.c_int
    lib.kk_last_error.restype = ctypes.c_char_p
    lib.kk_status_string.restype = ctypes.c_char_p
    lib.kk_cpu_isa.restype = ctypes.c_char_p
    lib.kk_abi_version.restype = ctypes.c_int32
    return lib


def p(a):
    return None if a is None else a.ctypes.data_as(ctypes.c_void_p)


def strided(rng, rows, width, pad, dtype, fill=None):
    """A (rows, width) view with row stride width + pad of a buffer whose padding holds a sentinel;
    returns (view, buffer).  fill=None: random values, else the fill value (NaN = poison)."""
    buf = np.full((rows, width + pad), 777.0, dtype)
    buf[:, :width] = rng.standard_normal((rows, width)) if fill is None else fill
    return buf[:, :width], buf


def random_csr(rng, n_out, n_in, density, empty_rows=0):
    mask = rng.random((n_out, n_in)) < density
    if empty_rows and n_out:
        mask[rng.choice(n_out, size=min(empty_rows, n_out), replace=False)] = False
    rows, cols = np.nonzero(mask)  # row-major order: CSR order
    row_ptr = np.zeros(n_out + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n_out), out=row_ptr[1:])
    return row_ptr, cols.astype(np.int32), rows


def rel_err(got, want):
    assert np.isfinite(got).all(), "non-finite entries: an output element left unwritten"
    den = np.linalg.norm(want)
    return np.linalg.norm(got.astype(np.float64) - want) / (den if den > 0 else 1.0)


class Case:
    """One random problem: CSR weight, its transpose, inputs, the float64 reference."""

    def __init__(self, lib, rng, dtype, batch, n_out, n_in, density, pad, empty_rows=0):
        self.lib, self.dtype, self.code = lib, dtype, CODE[dtype]
        self.batch, self.n_out, self.n_in, self.pad = batch, n_out, n_in, pad
        self.row_ptr, self.col_idx, rows = random_csr(rng, n_out, n_in, density, empty_rows)
        self.nnz = int(self.row_ptr[-1])
        self.values = rng.standard_normal(self.nnz).astype(dtype)
        self.x, self.xbuf = strided(rng, batch, n_in, pad, dtype)
        self.dout, self.dobuf = strided(rng, batch, n_out, 2 * pad, dtype)
        self.bias = rng.standard_normal(n_out).astype(dtype)
        W = np.zeros((n_out, n_in))
        W[rows, self.col_idx] = self.values
        self.W, self.rows = W, rows
        # the transpose by a stable sort on the column: row order kept within a column
        order = np.argsort(self.col_idx, kind="stable")
        self.ref_col_ptr = np.zeros(n_in + 1, np.int64)
        np.cumsum(np.bincount(self.col_idx, minlength=n_in), out=self.ref_col_ptr[1:])
        self.ref_row_idx, self.ref_perm = rows[order].astype(np.int32), order.astype(np.int64)

    def transpose(self):
        cp = np.full(self.n_in + 1, -7, np.int64)
        ri = np.full(max(self.nnz, 1), -7, np.int32)
        pm = np.full(max(self.nnz, 1), -7, np.int64)
        st = self.lib.kk_sparse_csr_transpose_cpu(self.n_out, self.n_in, self.nnz, p(self.row_ptr), p(self.col_idx),
                                                  p(cp), p(ri), p(pm))
        assert st == KK_OK, self.lib.kk_last_error()
        assert (cp == self.ref_col_ptr).all()
        assert (ri[:self.nnz] == self.ref_row_idx).all() and (pm[:self.nnz] == self.ref_perm).all()
        self.col_ptr, self.row_idx, self.perm = cp, ri, pm

    def fwd(self, bias, threads):
        out, obuf = strided(None, self.batch, self.n_out, self.pad, self.dtype, fill=np.nan)
        st = self.lib.kk_sparse_linear_fwd_cpu(self.code, self.batch, self.n_out, self.n_in, self.nnz, p(self.row_ptr),
                                               p(self.col_idx), p(self.values), p(self.xbuf), self.xbuf.shape[1],
                                               p(self.bias) if bias else None, p(obuf), obuf.shape[1], threads)
        assert st == KK_OK, self.lib.kk_last_error()
        assert (obuf[:, self.n_out:] == 777.0).all(), "padding of out overwritten"
        ref = self.x.astype(np.float64) @ self.W.T + (self.bias.astype(np.float64) if bias else 0.0)
        err = rel_err(out, ref)
        assert err <= TOL[self.dtype], f"fwd error {err:.3e}"

    def bwd(self, want_dx, want_dv, threads):
        dx, dxbuf = strided(None, self.batch, self.n_in, 3 * self.pad, self.dtype, fill=np.nan)
        dv = np.full(self.nnz, np.nan, self.dtype)
        st = self.lib.kk_sparse_linear_bwd_cpu(
            self.code, self.batch, self.n_out, self.n_in, self.nnz,
            p(self.row_ptr) if want_dv else None, p(self.col_idx) if want_dv else None,
            p(self.col_ptr) if want_dx else None, p(self.row_idx) if want_dx else None,
            p(self.perm) if want_dx else None, p(self.values) if want_dx else None,
            p(self.xbuf) if want_dv else None, self.xbuf.shape[1], p(self.dobuf), self.dobuf.shape[1],
            p(dxbuf) if want_dx else None, dxbuf.shape[1], p(dv) if want_dv else None, threads)
        assert st == KK_OK, self.lib.kk_last_error()
        g = self.dout.astype(np.float64)
        if want_dx:
            assert (dxbuf[:, self.n_in:] == 777.0).all(), "padding of dx overwritten"
            err = rel_err(dx, g @ self.W)
            assert err <= TOL[self.dtype], f"dx error {err:.3e}"
        else:
            assert np.isnan(dx).all(), "dx written though not requested"
        if want_dv:
            ref = (g.T @ self.x.astype(np.float64))[self.rows, self.col_idx]
            err = rel_err(dv, ref)
            assert err <= TOL[self.dtype], f"dvalues error {err:.3e}"
        else:
            assert np.isnan(dv).all(), "dvalues written though not requested"


def check_correctness(lib, rng):
    n = 0
    shapes = [  # batch, n_out, n_in, density, pad, empty rows
        (1, 8, 12, 0.5, 0, 0), (7, 30, 45, 0.2, 3, 5), (16, 64, 64, 0.1, 0, 3), (33, 20, 90, 0.05, 1, 0),
        (65, 100, 40, 0.3, 0, 10), (130, 48, 300, 0.03, 2, 4), (257, 40, 64, 0.12, 0, 0),
        (50, 16, 16, 1.0, 1, 0), (90, 60, 70, 0.01, 0, 0), (40, 1, 500, 0.2, 0, 0), (40, 500, 1, 0.5, 4, 0),
        (2, 1500, 1500, 1.0, 0, 0),  # float64: 18 MB per-call arrays, past what the library keeps cached
    ]
    for dtype in (np.float64, np.float32):
        for i, (batch, n_out, n_in, density, pad, empty) in enumerate(shapes):
            c = Case(lib, rng, dtype, batch, n_out, n_in, density, pad, empty)
            c.transpose()
            st = lib.kk_sparse_check_csr(n_out, n_in, c.nnz, p(c.row_ptr), p(c.col_idx))
            assert st == KK_OK, lib.kk_last_error()
            threads = (0, 1, 2, 3)[i % 4]
            c.fwd(bias=i % 2 == 0, threads=threads)
            for want_dx, want_dv in ((True, True), (True, False), (False, True), (False, False)):
                c.bwd(want_dx, want_dv, threads)
            n += 1
    return n


def check_degenerate(lib):
    for dtype in (np.float64, np.float32):
        code = CODE[dtype]
        b, n_out, n_in = 4, 6, 5
        x = np.ones((b, n_in), dtype)
        bias = np.arange(n_out, dtype=dtype)
        zp = np.zeros(n_out + 1, np.int64)
        zc = np.zeros(n_in + 1, np.int64)
        # nnz = 0: out = bias, or zeros; col_idx and values may be NULL
        for with_bias in (False, True):
            out = np.full((b, n_out), np.nan, dtype)
            st = lib.kk_sparse_linear_fwd_cpu(code, b, n_out, n_in, 0, p(zp), None, None, p(x), n_in,
                                              p(bias) if with_bias else None, p(out), n_out, 2)
            assert st == KK_OK, lib.kk_last_error()
            assert (out == (bias if with_bias else 0)).all()
        dx = np.full((b, n_in), np.nan, dtype)
        st = lib.kk_sparse_linear_bwd_cpu(code, b, n_out, n_in, 0, p(zp), None, p(zc), None, None, None, p(x), n_in,
                                          p(np.ones((b, n_out), dtype)), n_out, p(dx), n_in, None, 2)
        assert st == KK_OK, lib.kk_last_error()
        assert (dx == 0).all()
        # batch = 0: dvalues zero, x / dout / out / dx may be NULL
        rp = np.array([0, 2, 2, 3, 3, 3, 4], np.int64)
        ci = np.array([1, 3, 0, 4], np.int32)
        v = np.ones(4, dtype)
        dv = np.full(4, np.nan, dtype)
        st = lib.kk_sparse_linear_bwd_cpu(code, 0, n_out, n_in, 4, p(rp), p(ci), None, None, None, None, None, n_in,
                                          None, n_out, None, n_in, p(dv), 0)
        assert st == KK_OK and (dv == 0).all(), lib.kk_last_error()
        st = lib.kk_sparse_linear_fwd_cpu(code, 0, n_out, n_in, 4, p(rp), p(ci), p(v), None, n_in, None, None, n_out, 0)
        assert st == KK_OK, lib.kk_last_error()


def check_errors(lib, rng):
    # W (3 x 4): row 0 -> cols 0, 2; row 1 empty; row 2 -> cols 1, 2, 3
    rp = np.array([0, 2, 2, 5], np.int64)
    ci = np.array([0, 2, 1, 2, 3], np.int32)
    v = np.arange(1.0, 6.0)
    x = rng.standard_normal((2, 4))
    g = rng.standard_normal((2, 3))
    out = np.full((2, 3), np.nan)
    dx = np.full((2, 4), np.nan)
    dv = np.full(5, np.nan)
    cp, ri, pm = np.zeros(5, np.int64), np.zeros(5, np.int32), np.zeros(5, np.int64)
    assert lib.kk_sparse_csr_transpose_cpu(3, 4, 5, p(rp), p(ci), p(cp), p(ri), p(pm)) == KK_OK

    def fwd(dtype=KK_FLOAT64, batch=2, n_out=3, n_in=4, nnz=5, row_ptr=rp, col_idx=ci, values=v, x_=x, ldx=4,
            out_=out, ldo=3):
        return lib.kk_sparse_linear_fwd_cpu(dtype, batch, n_out, n_in, nnz, p(row_ptr), p(col_idx), p(values), p(x_),
                                            ldx, None, p(out_), ldo, 2)

    def bwd(dtype=KK_FLOAT64, batch=2, nnz=5, row_ptr=rp, col_idx=ci, col_ptr=cp, row_idx=ri, perm=pm, values=v,
            x_=x, ldx=4, dout=g, lddo=3, dx_=dx, lddx=4, dv_=dv):
        return lib.kk_sparse_linear_bwd_cpu(dtype, batch, 3, 4, nnz, p(row_ptr), p(col_idx), p(col_ptr), p(row_idx),
                                            p(perm), p(values), p(x_), ldx, p(dout), lddo, p(dx_), lddx, p(dv_), 2)

    def bad(arr, i, val):
        a = arr.copy()
        a[i] = val
        return a

    cases = [
        (lambda: fwd(dtype=KK_FLOAT16), KK_ERR_UNSUPPORTED_DTYPE, b"dtype"),
        (lambda: fwd(batch=-1), KK_ERR_INVALID_SIZE, b"batch"),
        (lambda: fwd(n_out=-1), KK_ERR_INVALID_SIZE, b"n_out"),
        (lambda: fwd(n_in=-2), KK_ERR_INVALID_SIZE, b"n_in"),
        (lambda: fwd(nnz=-1), KK_ERR_INVALID_SIZE, b"nnz"),
        (lambda: fwd(nnz=13), KK_ERR_INVALID_SIZE, b"nnz"),
        (lambda: fwd(row_ptr=None), KK_ERR_NULL_POINTER, b"row_ptr"),
        (lambda: fwd(col_idx=None), KK_ERR_NULL_POINTER, b"col_idx"),
        (lambda: fwd(values=None), KK_ERR_NULL_POINTER, b"values"),
        (lambda: fwd(x_=None), KK_ERR_NULL_POINTER, b"x"),
        (lambda: fwd(out_=None), KK_ERR_NULL_POINTER, b"out"),
        (lambda: fwd(ldx=3), KK_ERR_INVALID_ARGUMENT, b"ldx"),
        (lambda: fwd(ldo=2), KK_ERR_INVALID_ARGUMENT, b"ldo"),
        (lambda: fwd(row_ptr=bad(rp, 0, 1)), KK_ERR_INVALID_ARGUMENT, b"row_ptr[0]"),
        (lambda: fwd(row_ptr=bad(rp, 1, 3)), KK_ERR_INVALID_ARGUMENT, b"row_ptr[2]"),
        (lambda: fwd(row_ptr=bad(rp, 2, 9)), KK_ERR_INVALID_ARGUMENT, b"row_ptr[2] = 9 is past nnz"),
        (lambda: fwd(row_ptr=bad(rp, 3, 4)), KK_ERR_INVALID_ARGUMENT, b"row_ptr[3]"),
        (lambda: fwd(col_idx=bad(ci, 4, 4)), KK_ERR_INVALID_ARGUMENT, b"col_idx[4]"),
        (lambda: fwd(col_idx=bad(ci, 2, -3)), KK_ERR_INVALID_ARGUMENT, b"col_idx[2]"),
        (lambda: fwd(col_idx=bad(ci, 3, 1)), KK_ERR_INVALID_ARGUMENT, b"col_idx[3]"),
        (lambda: fwd(batch=0, x_=None, out_=None, col_idx=bad(ci, 1, 7)), KK_ERR_INVALID_ARGUMENT, b"col_idx[1]"),
        (lambda: bwd(dtype=KK_BFLOAT16), KK_ERR_UNSUPPORTED_DTYPE, b"dtype"),
        (lambda: bwd(dout=None), KK_ERR_NULL_POINTER, b"dout"),
        (lambda: bwd(x_=None), KK_ERR_NULL_POINTER, b"x"),
        (lambda: bwd(values=None), KK_ERR_NULL_POINTER, b"values"),
        (lambda: bwd(row_ptr=None), KK_ERR_NULL_POINTER, b"row_ptr"),
        (lambda: bwd(col_ptr=None), KK_ERR_NULL_POINTER, b"col_ptr"),
        (lambda: bwd(row_idx=None), KK_ERR_NULL_POINTER, b"row_idx"),
        (lambda: bwd(perm=None), KK_ERR_NULL_POINTER, b"perm"),
        (lambda: bwd(lddo=2), KK_ERR_INVALID_ARGUMENT, b"lddo"),
        (lambda: bwd(ldx=3), KK_ERR_INVALID_ARGUMENT, b"ldx"),
        (lambda: bwd(lddx=3), KK_ERR_INVALID_ARGUMENT, b"lddx"),
        (lambda: bwd(col_ptr=bad(cp, 4, 4)), KK_ERR_INVALID_ARGUMENT, b"col_ptr[4]"),
        (lambda: bwd(row_idx=bad(ri, 0, 3)), KK_ERR_INVALID_ARGUMENT, b"row_idx[0]"),
        (lambda: bwd(perm=bad(pm, 2, 5)), KK_ERR_INVALID_ARGUMENT, b"perm[2]"),
        (lambda: bwd(perm=bad(bad(pm, 0, pm[1]), 1, pm[0])), KK_ERR_INVALID_ARGUMENT, b"perm[0]"),
        (lambda: bwd(col_idx=bad(ci, 1, 0)), KK_ERR_INVALID_ARGUMENT, b"col_idx[1]"),
    ]
    for i, (call, want, word) in enumerate(cases):
        st = call()  # the message belongs to the last call: check it right after
        assert st == want, (i, st, want, lib.kk_last_error())
        assert word in lib.kk_last_error(), (i, word, lib.kk_last_error())
        assert lib.kk_status_string(st) != b"ok"
    assert np.isnan(out).all() and np.isnan(dx).all() and np.isnan(dv).all(), "a failing call wrote an output"
    # kk_sparse_check_csr and the transpose report the same problems
    assert lib.kk_sparse_check_csr(3, 4, 5, p(rp), p(ci)) == KK_OK
    assert lib.kk_sparse_check_csr(3, 4, 5, p(rp), None) == KK_ERR_NULL_POINTER
    assert lib.kk_sparse_check_csr(3, 4, 0, p(np.zeros(4, np.int64)), None) == KK_OK
    assert lib.kk_sparse_check_csr(3, 4, 5, p(bad(rp, 3, 6)), p(ci)) == KK_ERR_INVALID_ARGUMENT
    assert b"ptr[3]" in lib.kk_last_error()
    assert lib.kk_sparse_check_csr(3, -4, 0, p(rp), None) == KK_ERR_INVALID_SIZE
    st = lib.kk_sparse_csr_transpose_cpu(3, 4, 5, p(rp), p(bad(ci, 0, 9)), p(cp), p(ri), p(pm))
    assert st == KK_ERR_INVALID_ARGUMENT and b"col_idx[0]" in lib.kk_last_error()
    st = lib.kk_sparse_csr_transpose_cpu(3, 4, 5, p(rp), p(ci), p(cp), None, p(pm))
    assert st == KK_ERR_NULL_POINTER and b"row_idx" in lib.kk_last_error()
    # a scratch allocation that fails is a status, not a crash: n_in = 2^50 would need 2^57 bytes for
    # the packed x chunk (x itself is never read).  ASan's allocator aborts on such a request
    # instead of returning NULL, so this is skipped when the library runs under ASan.
    n = len(cases)
    if "asan" not in os.environ.get("LD_PRELOAD", ""):
        huge = 1 << 50
        out1 = np.full(1, np.nan, np.float32)
        st = lib.kk_sparse_linear_fwd_cpu(KK_FLOAT32, 1, 1, huge, 1, p(np.array([0, 1], np.int64)),
                                          p(np.zeros(1, np.int32)), p(np.ones(1, np.float32)), p(np.zeros(4, np.float32)),
                                          huge, None, p(out1), 1, 2)
        assert st == KK_ERR_OUT_OF_MEMORY and b"memory" in lib.kk_last_error(), (st, lib.kk_last_error())
        assert np.isnan(out1).all()
        n += 1
    return n


def check_conversions(lib, rng):
    """kk_sparse_to_dense_cpu / kk_sparse_gather_cpu (the dense path's scatter and its adjoint) for
    every dtype they take (16-bit ones as raw uint16 bit patterns), padded row strides, empty rows,
    nnz = 0, and their error paths (outputs untouched)."""
    n = 0
    for np_dt, code in ((np.float64, KK_FLOAT64), (np.float32, KK_FLOAT32), (np.uint16, KK_FLOAT16),
                        (np.uint16, KK_BFLOAT16)):
        for n_out, n_in, density, pad in ((7, 9, 0.5, 0), (37, 53, 0.1, 3), (5, 4, 0.0, 1), (1, 300, 0.9, 0)):
            row_ptr, col_idx, rows = random_csr(rng, n_out, n_in, density, empty_rows=1)
            nnz = len(col_idx)
            vals = rng.integers(1, 60000, nnz).astype(np_dt) if np_dt == np.uint16 else rng.standard_normal(nnz).astype(np_dt)
            want = np.zeros((n_out, n_in), np_dt)
            want[rows, col_idx] = vals
            out = np.full((n_out, n_in + pad), 7, np_dt)   # garbage everywhere: every element is written
            st = lib.kk_sparse_to_dense_cpu(code, n_out, n_in, nnz, p(row_ptr), p(col_idx), p(vals), p(out),
                                            n_in + pad, 2)
            assert st == KK_OK, lib.kk_last_error()
            assert np.array_equal(out[:, :n_in], want) and (out[:, n_in:] == 7).all()
            dense = rng.standard_normal((n_out, n_in + pad)).astype(np.float32).view(np.uint16)[:, :n_in + pad] \
                if np_dt == np.uint16 else rng.standard_normal((n_out, n_in + pad)).astype(np_dt)
            dense = np.ascontiguousarray(dense)
            got = np.full(max(nnz, 1), 7, np_dt)
            st = lib.kk_sparse_gather_cpu(code, n_out, n_in, nnz, p(row_ptr), p(col_idx), p(dense), dense.shape[1],
                                          p(got), 1)
            assert st == KK_OK, lib.kk_last_error()
            assert np.array_equal(got[:nnz], dense[rows, col_idx])
            n += 1
    # errors: a column out of range, a stride below the width, an unknown dtype; nothing written
    row_ptr, col_idx, _ = random_csr(rng, 4, 6, 0.5)
    vals, out = np.ones(len(col_idx)), np.full((4, 6), 7.0)
    bad = col_idx.copy()
    bad[-1] = 6
    for args, status, text in (
            ((KK_FLOAT64, 4, 6, len(col_idx), p(row_ptr), p(bad), p(vals), p(out), 6, 1), KK_ERR_INVALID_ARGUMENT, b"out of range"),
            ((KK_FLOAT64, 4, 6, len(col_idx), p(row_ptr), p(col_idx), p(vals), p(out), 5, 1), KK_ERR_INVALID_ARGUMENT, b"ldo"),
            ((9, 4, 6, len(col_idx), p(row_ptr), p(col_idx), p(vals), p(out), 6, 1), KK_ERR_UNSUPPORTED_DTYPE, b"dtype"),
            ((KK_FLOAT64, 4, 6, len(col_idx), p(row_ptr), p(col_idx), None, p(out), 6, 1), KK_ERR_NULL_POINTER, b"values")):
        st = lib.kk_sparse_to_dense_cpu(*args)
        assert st == status and text in lib.kk_last_error(), (st, lib.kk_last_error())
        assert (out == 7.0).all()
    st = lib.kk_sparse_gather_cpu(KK_FLOAT64, 4, 6, len(col_idx), p(row_ptr), p(bad), p(out), 6, p(vals), 1)
    assert st == KK_ERR_INVALID_ARGUMENT and (vals == 1.0).all()
    return n


def main(path):
    assert "torch" not in sys.modules
    lib = load(path)
    assert lib.kk_abi_version() == 1, lib.kk_abi_version()
    rng = np.random.default_rng(0)
    n = check_correctness(lib, rng)
    check_degenerate(lib)
    n_err = check_errors(lib, rng)
    n_conv = check_conversions(lib, rng)
    assert "torch" not in sys.modules
    print(f"ok {lib.kk_cpu_isa().decode()} {n} cases {n_err} error paths {n_conv} conversions")


if __name__ == "__main__":
    main(sys.argv[1])
