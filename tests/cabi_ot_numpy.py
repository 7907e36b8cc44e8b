"""Calls libkernelkit's ot C ABI with numpy arrays through ctypes -- no torch import.

Every CPU entry point of csrc/include/kernelkit/ot.h against a numpy float64 reference: the dense cost
(padded rows, a matrix shared by the batch) and the three point-cloud costs, float32/float64, zero
weights with -inf potentials, thread counts; the top-k of kk_ot_sparsify_cpu against numpy's stable
argsort (ties broken by the smaller column, exact duplicates included); CG against a direct solve;
the error paths (status and a message naming the argument).  Outputs are NaN-poisoned before each call.

Run as a script by tests/test_ot_cabi.py (in a fresh interpreter, once per ISA via KERNELKIT_CPU_ISA)
and, in .ci/run, against the AddressSanitizer/UBSan build of the library.
Usage: python cabi_ot_numpy.py LIBRARY_PATH   (prints "ok <isa> <cases>" and exits 0 on success)
"""
import ctypes
import sys

import numpy as np

KK_FLOAT32, KK_FLOAT64, KK_FLOAT16 = 0, 1, 2
KK_OK, KK_ERR_NULL_POINTER, KK_ERR_INVALID_SIZE, KK_ERR_INVALID_ARGUMENT, KK_ERR_UNSUPPORTED_DTYPE = 0, 1, 2, 3, 4
MATRIX, SQEUCLIDEAN, EUCLIDEAN_POW, MINKOWSKI_POW = 0, 1, 2, 3
TOL = {np.float64: 1e-12, np.float32: 2e-5}
CODE = {np.float64: KK_FLOAT64, np.float32: KK_FLOAT32}


class Cost(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("dim", ctypes.c_int32), ("p", ctypes.c_double),
                ("matrix", ctypes.c_void_p), ("ld", ctypes.c_int64), ("batch_stride", ctypes.c_int64),
                ("x", ctypes.c_void_p), ("x_batch_stride", ctypes.c_int64), ("y", ctypes.c_void_p),
                ("y_batch_stride", ctypes.c_int64)]


def load(path):
    lib = ctypes.CDLL(path)
    i64, i32, d, ptr, cp = ctypes.c_int64, ctypes.c_int32, ctypes.c_double, ctypes.c_void_p, ctypes.POINTER(Cost)
    dt = ctypes.c_int
    lib.kk_ot_sinkhorn_step_cpu.argtypes = [dt, cp, i64, i64, i64, i32, d, ptr, ptr, ptr, ptr, ptr, i32, i32]
    lib.kk_ot_marginals_cpu.argtypes = [dt, cp, i64, i64, i64, d, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32]
    lib.kk_ot_plan_cpu.argtypes = [dt, cp, i64, i64, i64, d, ptr, ptr, ptr, i64, i32]
    lib.kk_ot_sparsify_cpu.argtypes = [dt, cp, i64, i64, i64, i64, d, ptr, ptr, ptr, ptr, i32]
    lib.kk_ot_hvp_cpu.argtypes = [dt, i64, i64, i64, i64, ptr, ptr, ptr, ptr, d, ptr, ptr, ptr, ptr, i32]
    lib.kk_ot_cg_cpu.argtypes = [dt, i64, i64, i64, i64, ptr, ptr, ptr, ptr, d, ptr, ptr, ptr, ptr, d, i32, ptr, ptr,
                                 i32]
    lib.kk_ot_points_grad_cpu.argtypes = [dt, cp, i64, i64, i64, d, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32]
    for name in ("sinkhorn_step", "marginals", "plan", "sparsify", "hvp", "cg", "points_grad"):
        getattr(lib, f"kk_ot_{name}_cpu").restype = ctypes.c_int
    lib.kk_last_error.restype = ctypes.c_char_p
    lib.kk_cpu_isa.restype = ctypes.c_char_p
    return lib


def p(a):
    return None if a is None else a.ctypes.data_as(ctypes.c_void_p)


def rel(got, ref):
    got = np.asarray(got, np.float64)
    fin = np.isfinite(ref)
    assert np.array_equal(got[~fin], ref[~fin]), "infinities differ"
    assert np.isfinite(got[fin]).all(), "an output element was not written"
    den = np.linalg.norm(ref[fin])
    return np.linalg.norm(got[fin] - ref[fin]) / (den if den > 0 else 1.0)


def nan(shape, dt):
    return np.full(shape, np.nan, dt)


class Problem:
    """A batch of problems, its typed arrays (what the library reads) and the float64 cost."""

    def __init__(self, rng, kind, p_, B, n, m, D, dt, shared):
        self.B, self.n, self.m, self.dt = B, n, m, dt
        self.cost = Cost(kind=kind, dim=D, p=p_)
        if kind == MATRIX:
            ld = m + 2
            nb = 1 if shared else B
            self.store = (2 * rng.random((nb, n, ld))).astype(dt)
            self.C = np.broadcast_to(self.store[:, :, :m].astype(np.float64), (B, n, m))
            self.cost.matrix, self.cost.ld, self.cost.batch_stride = self.store.ctypes.data, ld, 0 if shared else n * ld
        else:
            self.x = rng.random((B, n, D)).astype(dt)
            self.y = rng.random((1 if shared else B, m, D)).astype(dt)
            self.y[0, 0] = self.x[0, 0]  # a zero distance
            self.cost.x, self.cost.x_batch_stride = self.x.ctypes.data, n * D
            self.cost.y, self.cost.y_batch_stride = self.y.ctypes.data, 0 if shared else m * D
            diff = self.x.astype(np.float64)[:, :, None, :] - self.y.astype(np.float64)[:, None, :, :]
            if kind == SQEUCLIDEAN:
                self.C = (diff * diff).sum(-1)
            elif kind == EUCLIDEAN_POW:
                self.C = (diff * diff).sum(-1) ** (p_ / 2)
            else:
                self.C = (np.abs(diff) ** p_).sum(-1)
            self.diff = np.broadcast_to(diff, (B, n, m, D))


def lse(t, axis):
    mx = t.max(axis=axis, keepdims=True)
    sh = np.where(np.isfinite(mx), mx, 0.0)
    with np.errstate(divide="ignore"):
        return (np.log(np.exp(t - sh).sum(axis=axis, keepdims=True)) + sh).squeeze(axis)


def check_problem(lib, rng, kind, p_, B, n, m, D, dt, shared, nt):
    pr = Problem(rng, kind, p_, B, n, m, D, dt, shared)
    code, tol, reg = CODE[dt], TOL[dt], 0.06
    a = (rng.random((B, n)) + 0.1).astype(dt)
    b = (rng.random((B, m)) + 0.1).astype(dt)
    f = (0.2 * rng.random((B, n)) - 0.1).astype(dt)
    g = (0.2 * rng.random((B, m)) - 0.1).astype(dt)
    a[:, 0], f[:, 0] = 0, -np.inf
    A, Bw, F, G, C = (v.astype(np.float64) for v in (a, b, f, g, pr.C))
    cases = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        for axis in (0, 1):
            w, other, pot = (a, g, f) if axis == 0 else (b, f, g)
            W, O, Pt = (v.astype(np.float64) for v in (w, other, pot))
            s = lse((O[:, None, :] - C) / reg, 2) if axis == 0 else lse((O[:, :, None] - C) / reg, 1)
            want = np.where(W > 0, reg * (np.log(np.where(W > 0, W, 1)) - s), -np.inf)
            marg = np.exp(Pt / reg + s)
            marg = np.where(np.isnan(marg) & ~(Pt > -np.inf), 0, marg)
            for norm, fn in ((0, lambda v: np.abs(v).max(-1)), (1, lambda v: np.abs(v).sum(-1)),
                             (2, lambda v: np.sqrt((v * v).sum(-1)))):
                out, err = nan(W.shape, dt), nan(B, dt)
                st = lib.kk_ot_sinkhorn_step_cpu(code, ctypes.byref(pr.cost), B, n, m, axis, reg, p(w), p(other),
                                                 p(pot), p(out), p(err), norm, nt)
                assert st == KK_OK, lib.kk_last_error()
                assert rel(out, want) <= tol and rel(err, fn(marg - W)) <= 10 * tol, (kind, axis, norm)
                cases += 1
        P = np.exp((F[:, :, None] + G[:, None, :] - C) / reg)
    wr, wc = rng.random((B, n)).astype(dt), rng.random((B, m)).astype(dt)
    r, c, obj = nan((B, n), dt), nan((B, m), dt), nan(B, dt)
    st = lib.kk_ot_marginals_cpu(code, ctypes.byref(pr.cost), B, n, m, reg, p(f), p(g), p(a), p(b), p(wr), p(wc), p(r),
                                 p(c), p(obj), nt)
    assert st == KK_OK, lib.kk_last_error()
    with np.errstate(invalid="ignore"):
        dot = np.where(A == 0, 0, A * F).sum(1) + np.where(Bw == 0, 0, Bw * G).sum(1)
    assert rel(r, (P * wc.astype(np.float64)[:, None, :]).sum(2)) <= tol
    assert rel(c, (P * wr.astype(np.float64)[:, :, None]).sum(1)) <= tol
    assert rel(obj, dot - reg * P.sum((1, 2))) <= 10 * tol
    plan = nan((B, n, m + 1), dt)
    plan[..., m] = 7
    assert lib.kk_ot_plan_cpu(code, ctypes.byref(pr.cost), B, n, m, reg, p(f), p(g), p(plan), m + 1, nt) == KK_OK
    assert rel(plan[..., :m], P) <= tol and (plan[..., m] == 7).all()
    # sparsify: numpy's stable argsort of -key gives the larger key first, then the smaller column
    k = min(m, 4)
    cols, vals = np.full((B, n, k), -5, np.int32), nan((B, n, k), dt)
    assert lib.kk_ot_sparsify_cpu(code, ctypes.byref(pr.cost), B, n, m, k, reg, p(f), p(g), p(cols), p(vals),
                                  nt) == KK_OK, lib.kk_last_error()
    key = G[:, None, :] - C
    want_cols = np.sort(np.argsort(-key, axis=2, kind="stable")[..., :k], axis=2)
    assert np.array_equal(cols, want_cols), (kind, B, n, m)
    assert rel(vals, np.take_along_axis(P, want_cols, 2)) <= tol
    # hvp with r, c = the full marginals, and cg against a dense solve
    rr, cc = P.sum(2).astype(dt), P.sum(1).astype(dt)
    S = np.zeros((B, n, m))
    for bi in range(B):
        for i in range(n):
            S[bi, i, cols[bi, i]] = vals[bi, i].astype(np.float64)
    vx, vy = rng.standard_normal((B, n)).astype(dt), rng.standard_normal((B, m)).astype(dt)
    shift = 0.3
    Rr, Cc, Vx, Vy = (v.astype(np.float64) for v in (rr, cc, vx, vy))
    hx = Rr * Vx + np.einsum("bij,bj->bi", S, Vy) + shift * Vx
    hy = np.einsum("bij,bi->bj", S, Vx) + Cc * Vy + shift * Vy
    yx, yy = nan((B, n), dt), nan((B, m), dt)
    assert lib.kk_ot_hvp_cpu(code, B, n, m, k, p(cols), p(vals), p(rr), p(cc), shift, p(vx), p(vy), p(yx), p(yy),
                             nt) == KK_OK, lib.kk_last_error()
    assert rel(yx, hx) <= tol and rel(yy, hy) <= tol
    zx, zy = np.zeros((B, n), dt), np.zeros((B, m), dt)
    iters, resid = np.full(B, -1, np.int32), nan(B, dt)
    rx, ry = hx.astype(dt), hy.astype(dt)
    assert lib.kk_ot_cg_cpu(code, B, n, m, k, p(cols), p(vals), p(rr), p(cc), shift, p(rx), p(ry), p(zx), p(zy),
                            1e-13, 1000, p(iters), p(resid), nt) == KK_OK, lib.kk_last_error()
    for bi in range(B):
        H = np.block([[np.diag(Rr[bi] + shift), S[bi]], [S[bi].T, np.diag(Cc[bi] + shift)]])
        z = np.linalg.solve(H, np.concatenate([rx[bi], ry[bi]]).astype(np.float64))
        got = np.concatenate([zx[bi], zy[bi]]).astype(np.float64)
        assert rel(got, z) <= (1e-4 if dt == np.float32 else 1e-9), (rel(got, z), iters[bi])
        assert iters[bi] >= 1 and resid[bi] <= 1e-12
    cases += 5
    if kind != MATRIX:
        sc, u, v = (rng.random(sh).astype(dt) for sh in ((B,), (B, n), (B, m)))
        Wt = P * (sc.astype(np.float64)[:, None, None] + u.astype(np.float64)[:, :, None] + v.astype(np.float64)[:, None, :])
        diff = pr.diff
        if kind == SQEUCLIDEAN:
            Gr = 2 * diff
        elif kind == EUCLIDEAN_POW:
            d2 = (diff * diff).sum(-1, keepdims=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                Gr = np.where(d2 > 0, p_ * np.where(d2 > 0, d2, 1) ** (p_ / 2 - 1) * diff, 0)
        else:
            ad = np.abs(diff)
            Gr = np.where(ad > 0, p_ * np.where(ad > 0, ad, 1) ** (p_ - 1) * np.sign(diff), 0)
        dx, dy = nan((B, n, D), dt), nan((B, m, D), dt)
        assert lib.kk_ot_points_grad_cpu(code, ctypes.byref(pr.cost), B, n, m, reg, p(f), p(g), p(sc), p(u), p(v),
                                         p(dx), p(dy), nt) == KK_OK, lib.kk_last_error()
        assert rel(dx, (Wt[..., None] * Gr).sum(2)) <= tol and rel(dy, -(Wt[..., None] * Gr).sum(1)) <= tol, kind
        cases += 1
    return cases


def check_errors(lib):
    f, g = np.zeros((1, 3)), np.zeros((1, 4))
    C = np.ones((3, 4))
    cost = Cost(kind=MATRIX, matrix=C.ctypes.data, ld=4)
    out, err = np.zeros((1, 3)), np.zeros(1)

    def expect(st, want, needle):
        msg = lib.kk_last_error().decode()
        assert st == want and needle in msg, (st, want, msg, needle)

    step = lib.kk_ot_sinkhorn_step_cpu
    expect(step(KK_FLOAT16, ctypes.byref(cost), 1, 3, 4, 0, 0.1, p(f), p(g), p(f), p(out), p(err), 1, 0),
           KK_ERR_UNSUPPORTED_DTYPE, "dtype")
    expect(step(KK_FLOAT64, ctypes.byref(cost), 1, 3, 4, 0, -0.1, p(f), p(g), p(f), p(out), p(err), 1, 0),
           KK_ERR_INVALID_ARGUMENT, "reg")
    expect(step(KK_FLOAT64, ctypes.byref(cost), 1, 3, 4, 3, 0.1, p(f), p(g), p(f), p(out), p(err), 1, 0),
           KK_ERR_INVALID_ARGUMENT, "axis")
    expect(step(KK_FLOAT64, ctypes.byref(cost), 1, 3, 4, 0, 0.1, p(f), p(g), None, p(out), p(err), 1, 0),
           KK_ERR_NULL_POINTER, "pot")
    expect(step(KK_FLOAT64, ctypes.byref(cost), 1, 3, 5, 0, 0.1, p(f), p(g), p(f), p(out), p(err), 1, 0),
           KK_ERR_INVALID_ARGUMENT, "cost->ld")
    expect(step(KK_FLOAT64, None, 1, 3, 4, 0, 0.1, p(f), p(g), p(f), p(out), p(err), 1, 0), KK_ERR_NULL_POINTER, "cost")
    bad = Cost(kind=MINKOWSKI_POW, dim=2, p=0.5, x=C.ctypes.data, y=C.ctypes.data)
    expect(step(KK_FLOAT64, ctypes.byref(bad), 1, 3, 4, 0, 0.1, p(f), p(g), p(f), p(out), p(err), 1, 0),
           KK_ERR_INVALID_ARGUMENT, "cost->p")
    cols, vals = np.zeros((1, 3, 2), np.int32), np.ones((1, 3, 2))
    expect(lib.kk_ot_sparsify_cpu(KK_FLOAT64, ctypes.byref(cost), 1, 3, 4, 5, 0.1, p(f), p(g), p(cols), p(vals), 0),
           KK_ERR_INVALID_ARGUMENT, "k must be")
    cols[0, 2, 1] = 9
    y1, y2 = np.zeros((1, 3)), np.zeros((1, 4))
    expect(lib.kk_ot_hvp_cpu(KK_FLOAT64, 1, 3, 4, 2, p(cols), p(vals), p(f), p(g), 0.0, p(f), p(g), p(y1), p(y2), 0),
           KK_ERR_INVALID_ARGUMENT, "cols[problem 0, row 2, entry 1] = 9")
    cols[0, 2, 1] = 1
    expect(lib.kk_ot_cg_cpu(KK_FLOAT64, 1, 3, 4, 2, p(cols), p(vals), p(f), p(g), 0.0, p(f), p(g), p(y1), p(y2),
                            -1.0, 10, None, None, 0), KK_ERR_INVALID_ARGUMENT, "tol")
    expect(lib.kk_ot_points_grad_cpu(KK_FLOAT64, ctypes.byref(cost), 1, 3, 4, 0.1, p(f), p(g), None, None, None,
                                     p(y1), None, 0), KK_ERR_INVALID_ARGUMENT, "point-cloud")
    return 11


def main():
    lib = load(sys.argv[1])
    rng = np.random.default_rng(7)
    cases = 0
    for dt in (np.float64, np.float32):
        for kind, p_, B, n, m, D, shared, nt in ((MATRIX, 0.0, 2, 6, 9, 1, False, 2), (MATRIX, 0.0, 3, 5, 4, 1, True, 1),
                                                 (MATRIX, 0.0, 1, 150, 270, 1, False, 2),
                                                 (SQEUCLIDEAN, 2.0, 2, 7, 5, 2, True, 0),
                                                 (EUCLIDEAN_POW, 1.0, 1, 8, 6, 3, False, 2),
                                                 (EUCLIDEAN_POW, 2.5, 2, 4, 7, 2, False, 1),
                                                 (MINKOWSKI_POW, 1.0, 1, 6, 6, 2, False, 3),
                                                 (MINKOWSKI_POW, 1.7, 1, 5, 8, 4, True, 2)):
            cases += check_problem(lib, rng, kind, p_, B, n, m, D, dt, shared, nt)
    # exact duplicate keys: every column of a row has the same cost, the smaller columns win
    C = np.ones((1, 4, 10))
    cost = Cost(kind=MATRIX, matrix=C.ctypes.data, ld=10)
    f, g = np.zeros((1, 4)), np.zeros((1, 10))
    g[0, 7] = np.nan  # a NaN key ranks as -inf
    cols, vals = np.full((1, 4, 3), -1, np.int32), nan((1, 4, 3), np.float64)
    assert lib.kk_ot_sparsify_cpu(KK_FLOAT64, ctypes.byref(cost), 1, 4, 10, 3, 1.0, p(f), p(g), p(cols), p(vals),
                                  0) == KK_OK
    assert (cols == np.array([0, 1, 2])).all(), cols
    g[0, :] = -np.inf  # all keys -inf: still the smallest columns, values 0
    assert lib.kk_ot_sparsify_cpu(KK_FLOAT64, ctypes.byref(cost), 1, 4, 10, 3, 1.0, p(f), p(g), p(cols), p(vals),
                                  0) == KK_OK
    assert (cols == np.array([0, 1, 2])).all() and (vals == 0).all(), (cols, vals)
    cases += check_errors(lib) + 2
    print("ok", lib.kk_cpu_isa().decode(), cases)


if __name__ == "__main__":
    main()
