"""Calls libkernelkit's rbf C ABI with numpy arrays through ctypes -- no torch import.

The grid buffer byte for byte against a numpy transcription of reference.grid_build_reference (the
geometry rule in double, stable sort by cell); knn against a numpy brute force (dist2 formed in the
header's order, one numpy op per rounding) bit for bit, with k > m and a NaN query; the features forward
against numpy float64 for the three kernels (float32 / float64, omegas or none, padded rows) and the
backward's dweights (a scatter-add in numpy); a few error paths (status and a message naming the argument).
Outputs are NaN-poisoned before each call.

Run as a script by tests/test_rbf_cabi.py (in a fresh interpreter, once per ISA via KERNELKIT_CPU_ISA)
and, in .ci/run, against the AddressSanitizer/UBSan build of the library.
Usage: python cabi_rbf_numpy.py LIBRARY_PATH   (prints "ok <isa> <cases>" and exits 0 on success)
"""
import ctypes
import math
import sys

import numpy as np

KK_FLOAT32, KK_FLOAT64 = 0, 1
KK_OK, KK_ERR_NULL_POINTER, KK_ERR_INVALID_SIZE, KK_ERR_INVALID_ARGUMENT = 0, 1, 2, 3
DT = {np.float32: KK_FLOAT32, np.float64: KK_FLOAT64}


class Layout(ctypes.Structure):
    _fields_ = [(f, ctypes.c_int64) for f in ("cells_max", "cell_start_off", "order_off", "coords_off", "bytes")]


def load(path):
    lib = ctypes.CDLL(path)
    i64, i32, p, dt = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int
    lib.kk_rbf_grid_layout.argtypes = [dt, i32, i64, ctypes.POINTER(Layout)]
    lib.kk_rbf_grid_build_cpu.argtypes = [dt, i32, i64, p, i64, p, i64, i32]
    lib.kk_rbf_knn_cpu.argtypes = [dt, i32, i64, p, i64, p, i32, p, p, i32]
    common = [dt, dt, i32, i32, i32, i64, p, i64, i64, p, p, p, i64, i64, p, i32, p, i32]
    lib.kk_rbf_features_fwd_cpu.argtypes = common + [p, i64, i32]
    lib.kk_rbf_features_bwd_cpu.argtypes = common + [p, i64, p, p, p, p, p, i32]
    for name in ("grid_layout", "grid_build_cpu", "knn_cpu", "features_fwd_cpu", "features_bwd_cpu"):
        getattr(lib, f"kk_rbf_{name}").restype = ctypes.c_int
    lib.kk_last_error.restype = ctypes.c_char_p
    lib.kk_cpu_isa.restype = ctypes.c_char_p
    return lib


def ptr(a):
    return None if a is None else a.ctypes.data


def grid_reference(c):
    """reference.grid_build_reference in numpy."""
    m, dim = c.shape
    cm = max(1, min(1 << 24, m // 2))
    cs = 256
    order_off = cs + 8 * (cm + 1)
    coords_off = order_off + 8 * m
    total = coords_off + ((c.itemsize * m * dim + 7) // 8) * 8
    buf = np.zeros(total, np.uint8)
    lo = [float(v) for v in c.min(0)] if m else [0.0] * dim
    hi = [float(v) for v in c.max(0)] if m else [0.0] * dim
    ext = [h - l for l, h in zip(lo, hi)]
    pos = [e for e in ext if e > 0.0]
    if not pos:
        cell, res = 1.0, [1] * dim
    else:
        cell = (math.prod(pos) / cm) ** (1.0 / len(pos))
        while True:
            res = [min(cm, max(1, math.ceil(e / cell))) if e > 0.0 else 1 for e in ext]
            if math.prod(res) <= cm:
                break
            cell *= 1.0625
    ncells = math.prod(res)
    buf[:128].view(np.int64)[:9] = [dim, m, ncells, *(res + [1] * (3 - dim)), DT[c.dtype.type], cm, 0]
    buf[128:256].view(np.float64)[:4] = lo + [0.0] * (3 - dim) + [cell]
    if m == 0:
        return buf
    cid = np.zeros(m, np.int64)
    for d in range(dim):
        cc = np.clip(np.floor((c[:, d].astype(np.float64) - lo[d]) / cell), 0, res[d] - 1).astype(np.int64)
        cid = cid * res[d] + cc
    perm = np.argsort(cid, kind="stable")
    counts = np.bincount(cid, minlength=cm + 1)[: cm + 1]
    st = buf[cs:order_off].view(np.int64)
    st[1:] = np.cumsum(counts)[:cm]
    buf[order_off:coords_off].view(np.int64)[:] = perm
    buf[coords_off:coords_off + c.itemsize * m * dim].view(c.dtype)[:] = c[perm].reshape(-1)
    return buf


def knn_reference(x, c, k):
    n, dim = x.shape
    m = c.shape[0]
    acc = None
    for d in range(dim):
        t = x[:, None, d] - c[None, :, d]
        t = t * t
        acc = t if acc is None else acc + t
    idx = np.full((n, k), -1, np.int64)
    dist = np.full((n, k), np.inf, x.dtype)
    kk = min(k, m)
    if kk:
        order = np.argsort(acc, axis=1, kind="stable")[:, :kk]
        idx[:, :kk] = order
        dist[:, :kk] = np.take_along_axis(acc, order, 1)
    bad = ~np.isfinite(x).all(1)
    idx[bad] = -1
    dist[bad] = np.nan
    return idx, dist


def features_reference(x, c, s, w, om, idx, kernel, norm):
    """numpy float64; s diagonal (M, D)."""
    x, c, s, w = (a.astype(np.float64) for a in (x, c, s, w))
    valid = idx >= 0
    ii = np.maximum(idx, 0)
    o = x[:, None, :] - c[ii]
    if kernel == 2:
        phi = np.clip(1.0 - np.abs(o) * s[ii], 0, 1).prod(-1)
    else:
        q = (s[ii] * o * o).sum(-1)
        phi = 1.0 / (1.0 + q) if kernel == 0 else np.exp(-0.5 * q)
    phi = np.where(valid, phi, 0.0)
    if norm:
        phi = phi / (phi.sum(-1, keepdims=True) + 1e-8)
    basis = np.sin(om.astype(np.float64) * phi[..., None]) if om is not None else phi[..., None]
    basis = np.where(valid[..., None], basis, 0.0)
    return (w[ii] * basis).sum(1), basis


def rel(a, b):
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b), 1e-300))


def main():
    lib = load(sys.argv[1])
    rng = np.random.default_rng(3)
    cases = 0
    for dtype in (np.float32, np.float64):
        for dim in (2, 3):
            for m, k in ((0, 2), (3, 5), (400, 8), (900, 4)):
                c = rng.random((m, dim)).astype(dtype)
                if m > 500:
                    c[::2] = (0.5 + 0.01 * rng.standard_normal((len(c[::2]), dim))).astype(dtype)  # clustered
                    c[1::50] = c[3::50][: len(c[1::50])]  # duplicated centres: ties
                lay = Layout()
                assert lib.kk_rbf_grid_layout(DT[dtype], dim, m, ctypes.byref(lay)) == KK_OK
                ref = grid_reference(c)
                assert lay.bytes == len(ref)
                grid = np.full(lay.bytes // 8, -1, np.int64)
                assert lib.kk_rbf_grid_build_cpu(DT[dtype], dim, m, ptr(c), dim, ptr(grid), lay.bytes, 2) == KK_OK
                assert np.array_equal(grid.view(np.uint8), ref), (dtype, dim, m)
                x = np.zeros((300, dim + 1), dtype)
                x[:, :dim] = rng.random((300, dim)) * 1.6 - 0.3
                x[11, 0] = np.nan
                idx = np.full((300, k), -7, np.int64)
                d2 = np.full((300, k), np.nan, dtype)
                assert lib.kk_rbf_knn_cpu(DT[dtype], dim, 300, ptr(x), dim + 1, ptr(grid), k, ptr(idx), ptr(d2),
                                          2) == KK_OK
                ri, rd = knn_reference(np.ascontiguousarray(x[:, :dim]), c, k)
                assert np.array_equal(idx, ri), (dtype, dim, m, k)
                assert np.array_equal(d2, rd, equal_nan=True)
                cases += 2
    # features (diagonal shapes), forward and dweights
    for dtype in (np.float32, np.float64):
        for kernel in (0, 1, 2):
            for use_om in (False, True):
                n, m, C, k, dim = 90, 17, 11, 5, 2
                x = np.zeros((n, dim + 1), dtype)
                x[:, :dim] = rng.random((n, dim))
                c = rng.random((m, dim)).astype(dtype)
                s = (1 + 5 * rng.random((m, dim))).astype(dtype)
                w = np.zeros((m, C + 2), dtype)
                w[:, :C] = rng.standard_normal((m, C))
                om = (2.0 ** np.linspace(-3, 12, C)).astype(dtype) if use_om else None
                idx = rng.integers(0, m, (n, k)).astype(np.int64)
                idx[4, 1] = -1
                out = np.full((n, C + 1), np.nan, dtype)
                args = (DT[dtype], DT[dtype], dim, kernel, 0, n, ptr(x), dim + 1, m, ptr(c), ptr(s), ptr(w), C + 2, C,
                        ptr(om), k, ptr(idx), 1)
                assert lib.kk_rbf_features_fwd_cpu(*args, ptr(out), C + 1, 2) == KK_OK, lib.kk_last_error()
                ref, basis = features_reference(x[:, :dim], c, s, w[:, :C], om, idx, kernel, 1)
                tol = 1e-12 if dtype == np.float64 else (2e-6 * 4096 + 1e-5 if use_om else 1e-5)
                assert rel(out[:, :C], ref) < tol, (dtype, kernel, use_om, rel(out[:, :C], ref))
                assert np.isnan(out[:, C]).all()
                g = rng.standard_normal((n, C)).astype(dtype)
                dw = np.full((m, C), np.nan, dtype)
                assert lib.kk_rbf_features_bwd_cpu(*args, ptr(g), C, None, None, None, ptr(dw), None, 2) == KK_OK
                rdw = np.zeros((m, C))
                np.add.at(rdw, np.maximum(idx, 0).reshape(-1), (g[:, None, :] * basis).reshape(-1, C))
                assert rel(dw, rdw) < 10 * tol, (dtype, kernel, use_om, rel(dw, rdw))
                cases += 2
    # errors
    lay = Layout()
    assert lib.kk_rbf_grid_layout(KK_FLOAT32, 5, 3, ctypes.byref(lay)) == KK_ERR_INVALID_SIZE
    assert b"dim" in lib.kk_last_error()
    c = np.array([[0, 0], [1, np.inf]], np.float32)
    grid = np.zeros(64, np.int64)
    assert lib.kk_rbf_grid_build_cpu(KK_FLOAT32, 2, 2, ptr(c), 2, ptr(grid), 512, 1) == KK_ERR_INVALID_ARGUMENT
    assert b"centers[1, 1]" in lib.kk_last_error()
    c[1, 1] = 1
    assert lib.kk_rbf_grid_build_cpu(KK_FLOAT32, 2, 2, ptr(c), 2, ptr(grid), 512, 1) == KK_OK
    x = np.zeros((1, 2), np.float32)
    idx = np.zeros((1, 40), np.int64)
    d2 = np.zeros((1, 40), np.float32)
    assert lib.kk_rbf_knn_cpu(KK_FLOAT32, 2, 1, ptr(x), 2, ptr(grid), 40, ptr(idx), ptr(d2), 1) == KK_ERR_INVALID_ARGUMENT
    assert b"k must be" in lib.kk_last_error()
    assert lib.kk_rbf_knn_cpu(KK_FLOAT64, 2, 1, ptr(x), 2, ptr(grid), 2, ptr(idx), ptr(d2), 1) == KK_ERR_INVALID_ARGUMENT
    assert b"dtype" in lib.kk_last_error()
    s = np.array([[[1, 2], [0, 1]]] * 2, np.float32)  # not symmetric
    w = np.ones((2, 3), np.float32)
    ii = np.zeros((1, 2), np.int64)
    out = np.zeros((1, 3), np.float32)
    st = lib.kk_rbf_features_fwd_cpu(KK_FLOAT32, KK_FLOAT32, 2, 0, 1, 1, ptr(x), 2, 2, ptr(c), ptr(s), ptr(w), 3, 3,
                                     None, 2, ptr(ii), 1, ptr(out), 3, 1)
    assert st == KK_ERR_INVALID_ARGUMENT and b"not symmetric" in lib.kk_last_error(), lib.kk_last_error()
    print("ok", lib.kk_cpu_isa().decode(), cases + 5)


if __name__ == "__main__":
    main()
