"""One jitted kernelkit.jax call per family against the torch op (backend="cpu") on the same inputs:
prints the largest absolute difference of each output (and of the gradients where the op has a
backward) and exits 1 if any is above float32 rounding.  Both sides run the same C kernels, so the
differences are 0 or a few ulps.

    python -m kernelkit.examples.jax_vs_torch
"""
from __future__ import annotations

import sys

import numpy as np
import torch

import jax
import jax.numpy as jnp

import kernelkit
import kernelkit.jax as kj


def _t(a, grad=False):
    return torch.from_numpy(np.array(a)).requires_grad_(grad)


def _diff(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = b.detach().double().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, np.float64)
    return float(np.abs(a - b).max()) if a.size else 0.0


def _scale(b) -> float:
    b = b.detach().double().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, np.float64)
    return float(np.abs(b).max()) if b.size else 0.0


def monarch(rng):
    x = rng.standard_normal((4, 33, 512)).astype(np.float32)
    w1 = (rng.standard_normal((8, 64, 64)) / 8).astype(np.float32)
    w2 = (rng.standard_normal((8, 64, 64)) / 8).astype(np.float32)
    gout = rng.standard_normal((4, 33, 512)).astype(np.float32)
    y, vjp = jax.vjp(jax.jit(kj.monarch_matmul), x, w1, w2)
    grads = vjp(jnp.asarray(gout))
    ts = [_t(a, True) for a in (x, w1, w2)]
    yt = kernelkit.monarch.monarch_matmul(*ts, backend="cpu")
    yt.backward(_t(gout))
    return "monarch_matmul x (4, 33, 512), 8 blocks", [("out", y, yt)] + [
        (n, g, t.grad) for n, g, t in zip(("dx", "dw1", "dw2"), grads, ts)]


def sparse(rng):
    mask = rng.random((256, 512)) < 0.1
    layout = kj.SparseLayout.from_mask(mask)
    tl = kernelkit.sparse.SparseLayout.from_mask(torch.from_numpy(mask))
    x = rng.standard_normal((4, 33, 512)).astype(np.float32)
    v = rng.standard_normal(int(mask.sum())).astype(np.float32)
    b = rng.standard_normal(256).astype(np.float32)
    y = jax.jit(kj.sparse_linear)(x, v, layout, b)
    yt = kernelkit.sparse.sparse_linear(_t(x), _t(v), tl, _t(b), backend="cpu", min_sparsity=0.0)
    return f"sparse_linear x (4, 33, 512), W 256x512 at 90 % (nnz {int(mask.sum())})", [("out", y, yt)]


def vq(rng):
    n_out, n_in, d, M, K = 256, 512, 4, 2, 256
    codes = rng.integers(0, K, (n_out, n_in // d, M)).astype(np.uint8)
    cb = (rng.standard_normal((1, M, K, d)) / 8).astype(np.float32)
    s = (0.5 + rng.random(n_out)).astype(np.float32)
    x = rng.standard_normal((4, 33, n_in)).astype(np.float32)
    y = jax.jit(lambda x, cb, s: kj.vq_linear(x, codes, cb, s))(x, cb, s)
    yt = kernelkit.vq.vq_linear(_t(x), _t(codes), _t(cb), _t(s), backend="cpu")
    return f"vq_linear x (4, 33, {n_in}), W {n_out}x{n_in}, 2 codebooks of {K} x {d}", [("out", y, yt)]


def ot(rng):
    n, m, reg = 300, 200, 0.05
    x = rng.random((2, n, 2)).astype(np.float32)
    y = rng.random((2, m, 2)).astype(np.float32)
    a, b = np.full((2, n), 1 / n, np.float32), np.full((2, m), 1 / m, np.float32)
    res = jax.jit(lambda c: kj.sinkhorn(c, a, b, reg, numItermax=1000, stopThr=1e-6))(
        kj.OTCost.points(jnp.asarray(x), jnp.asarray(y)))
    tr = kernelkit.ot.solve(kernelkit.ot.Cost.points(_t(x), _t(y)), _t(a), _t(b), reg, numItermax=1000,
                            stopThr=1e-6, progress=False, backend="cpu")
    same = list(np.array(res.niter)) == list(tr.niter)
    return (f"sinkhorn (log-domain solver) 2 problems {n}x{m} points, reg {reg}: niter {np.array(res.niter).tolist()} "
            f"{'=' if same else '!='} torch's {list(tr.niter)}", [("f", res.f, tr.f), ("g", res.g, tr.g)], same)


def mfac(rng):
    G = rng.standard_normal((32, 4001)).astype(np.float32)
    v = rng.standard_normal((8, 4001)).astype(np.float32)
    out = jax.jit(lambda G, v: kj.ihvp(G, v, 1e-3, 512))(G, v)
    ot_ = kernelkit.mfac.StaticIHVP(_t(G), 1e-3, 512, backend="cpu").mul(_t(v))
    return "ihvp (static M-FAC) G (32, 4001), block 512, 8 vectors", [("out", out, ot_)]


def rbf(rng):
    N, Mc, C, k = 4096, 1000, 16, 8
    x = rng.random((N, 2)).astype(np.float32)
    c = rng.random((Mc, 2)).astype(np.float32)
    A = np.tile(np.eye(2, dtype=np.float32) * 400.0, (Mc, 1, 1))
    w = (rng.standard_normal((Mc, C)) / 4).astype(np.float32)
    om = np.linspace(1.0, 8.0, C).astype(np.float32)
    cot = rng.standard_normal((N, C)).astype(np.float32)
    f = jax.jit(lambda x, c, A, w, om: kj.rbf_features(x, c, A, w, om, k=k))
    y, vjp = jax.vjp(f, x, c, A, w, om)
    grads = vjp(jnp.asarray(cot))
    ts = [_t(a, True) for a in (x, c, A, w, om)]
    yt = kernelkit.rbf.rbf_features(*ts, k=k, backend="cpu")
    yt.backward(_t(cot))
    return f"rbf_features N {N}, M {Mc}, C {C}, k {k}, full shapes", [("out", y, yt)] + [
        (n, g, t.grad) for n, g, t in zip(("dx", "dcenters", "dshapes", "dweights", "domegas"), grads, ts)]


def main() -> int:
    rng = np.random.default_rng(0)
    print(f"kernelkit {kernelkit.__version__}, jax {jax.__version__} ({', '.join(kj.registered_platforms())}), "
          f"torch {torch.__version__}; float32, max |jax - torch| per output (relative to max |torch|)")
    bad = 0
    for fam in (monarch, sparse, vq, ot, mfac, rbf):
        got = fam(rng)
        what, pairs = got[0], got[1]
        ok = got[2] if len(got) > 2 else True
        parts = []
        for name, mine, theirs in pairs:
            d, s = _diff(mine, theirs), _scale(theirs)
            ok = ok and d <= 1e-5 * max(s, 1.0)
            parts.append(f"{name} {d:.1e} ({d / s if s else 0.0:.1e})")
        bad += not ok
        print(f"{fam.__name__:8s} {'ok  ' if ok else 'FAIL'} {what}: " + ", ".join(parts))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
