"""Property-based tests (hypothesis) of the public mfac functions (kernelkit.mfac: dots, combine, diag,
static_setup, window_rebuild, window_coef, SlidingWindowIHVP, StaticIHVP) on the backends that run here.

The rule (as in tests/test_ot_properties.py):
  * valid input -- random r, d in {0, 1, 2, ...} (empty included), block sizes from 1 to past d, 0-3
    vectors, float32 / bfloat16 / float64 buffers in several layouts (contiguous, a column slice of a
    wider buffer, transposed, rows broadcast with stride 0), vectors contiguous or strided, damp
    log-uniform in [1e-4, 10] -- matches the float64 reference on the same rounded inputs, never NaN
    although every torch.empty starts NaN-filled (`poison`); signed sums are compared relative to the
    same sum of absolute values; the IHVP of both algorithms equals the explicit float64 inverse;
  * bad input of every kind raises ValueError or TypeError naming the argument, never a crash, and a
    rejected gradient leaves the window unchanged.
Example counts scale with the hypothesis profile (tests/conftest.py).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import given, note  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kernelkit.mfac import SlidingWindowIHVP, StaticIHVP, ops  # noqa: E402
from kernelkit.mfac import reference as R  # noqa: E402
from properties import FAST, IDS, N, SEEDS, _one_thread, poisoned  # noqa: E402,F401

GDTYPES = [torch.float32, torch.float64, torch.bfloat16]
SIZES = [5, 1, 2, 0, 3, 7, 13, 30, 67]
LAYOUTS = ["contiguous", "sliced", "transposed", "broadcast"]
DAMPS = st.floats(-4.0, 1.0).map(lambda e: 10.0 ** e)
# 0 or away from the float32 underflow range (a float32 output cannot hold alpha * x for alpha ~ 1e-157)
COEFS = st.one_of(st.just(0.0), st.floats(-3, 3).filter(lambda a: abs(a) > 1e-6))


def _tol(dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 2e-6


def _buffer(r: int, d: int, dtype, layout: str, gen) -> torch.Tensor:
    base = torch.randn(r, d + 3, generator=gen, dtype=torch.float64)
    if layout == "sliced":
        return base.to(dtype)[:, 1:d + 1]
    if layout == "transposed":
        return base[:, :d].T.contiguous().to(dtype).T
    if layout == "broadcast" and r > 0:
        return base[:1, :d].to(dtype).expand(r, d)
    return base[:, :d].contiguous().to(dtype)


def _vectors(n: int, d: int, dtype, strided: bool, gen) -> torch.Tensor:
    base = torch.randn(n, 2 * d, generator=gen, dtype=torch.float64).to(dtype)
    return base[:, ::2] if strided else base[:, :d].contiguous()


def _rel_abs(out, ref, absref) -> float:
    out, ref, absref = out.double(), ref.double(), absref.double()
    assert torch.isfinite(out).all(), "non-finite output (an unwritten, NaN-poisoned element?)"
    den = float(absref.norm())
    return float((out - ref).norm()) / (den if den > 0 else 1.0)


@pytest.mark.parametrize("case", FAST, ids=IDS)
@poisoned(max(N // 3, 20))
@given(r=st.sampled_from(SIZES), d=st.sampled_from(SIZES), nvec=st.sampled_from([1, 2, 0, 3]),
       block=st.one_of(st.none(), st.integers(1, 80)), gdtype=st.sampled_from(GDTYPES),
       layout=st.sampled_from(LAYOUTS), strided=st.booleans(), alpha=COEFS, seed=SEEDS)
def test_dots_and_combine_match_the_reference(poison, case, r, d, nvec, block, gdtype, layout, strided, alpha,
                                              seed):
    backend, _ = case
    gen = torch.Generator().manual_seed(seed)
    G = _buffer(r, d, gdtype, layout, gen)
    vdt = R.vector_dtype(gdtype)
    x = _vectors(nvec, d, vdt, strided, gen)
    blk = ops.check_block(block, d, "test")
    nb = R.nblocks(d, blk)
    note(f"G {tuple(G.shape)} strides {G.stride()} block {blk}")
    q = ops.dots(G, x, block, backend=backend)
    assert q.shape == (nvec, nb, r) and q.dtype == torch.float64
    want = R.dots_reference(G, x, blk)
    absref = R.dots_reference(G.abs(), x.abs(), blk)
    assert _rel_abs(q, want, absref) <= _tol(gdtype)
    c = torch.randn(nvec, nb, r, generator=gen, dtype=torch.float64)
    out = ops.combine(G, c, x, alpha, block, backend=backend)
    assert out.shape == (nvec, d) and out.dtype == vdt
    want = R.combine_reference(G, c, x, alpha, blk, torch.float64)
    absref = R.combine_reference(G.abs(), c.abs(), x.abs(), abs(alpha), blk, torch.float64)
    assert _rel_abs(out, want, absref) <= _tol(gdtype) + (6e-8 if vdt == torch.float32 else 0)


@pytest.mark.parametrize("case", FAST, ids=IDS)
@poisoned(max(N // 10, 20))
@given(r=st.sampled_from(SIZES), d=st.sampled_from(SIZES), zdtype=st.sampled_from([torch.float32, torch.float64]),
       layout=st.sampled_from(LAYOUTS), alpha=COEFS, beta=COEFS, seed=SEEDS)
def test_diag_matches_the_reference(poison, case, r, d, zdtype, layout, alpha, beta, seed):
    backend, _ = case
    gen = torch.Generator().manual_seed(seed)
    Z = _buffer(r, d, zdtype, layout, gen)
    out = ops.diag(Z, alpha, beta, backend=backend)
    want = R.diag_reference(Z, alpha, beta, torch.float64)
    absref = abs(alpha) + abs(beta) * Z.double().square().sum(0)
    assert _rel_abs(out, want, absref) <= _tol(zdtype) + (6e-8 if zdtype == torch.float32 else 0)


@pytest.mark.parametrize("case", FAST, ids=IDS)
@poisoned(max(N // 8, 20))
@given(m=st.integers(1, 9), d=st.integers(1, 40), block=st.one_of(st.none(), st.integers(1, 45)),
       damp=st.floats(-2.0, 1.0).map(lambda e: 10.0 ** e), layout=st.sampled_from(LAYOUTS[:3]), seed=SEEDS)
def test_static_ihvp_and_diagonal_equal_the_explicit_inverse(poison, case, m, d, block, damp, layout, seed):
    backend, _ = case
    gen = torch.Generator().manual_seed(seed)
    G = _buffer(m, d, torch.float64, layout, gen)
    s = StaticIHVP(G, damp, block, backend=backend)
    inv = R.explicit_inverse(G, damp, block)
    x = torch.randn(2, d, generator=gen, dtype=torch.float64)
    assert s.rows == R.static_rows(m, d, ops.check_block(block, d, "t"))
    scale = float(inv.abs().max())
    assert float((s.mul(x) - x @ inv.T).abs().max()) <= 1e-9 * scale * float(x.abs().max()) * d
    assert float((s.diag() - inv.diagonal()).abs().max()) <= 1e-9 * scale


@pytest.mark.parametrize("case", FAST, ids=IDS)
@poisoned(max(N // 10, 20))
@given(m=st.integers(1, 6), d=st.integers(1, 30), steps=st.integers(1, 14), damp=DAMPS,
       scales=st.lists(st.floats(-1.0, 2.0).map(lambda e: 10.0 ** e), min_size=14, max_size=14),
       refresh=st.sampled_from([None, 0, 1, 3]), seed=SEEDS)
def test_sliding_window_equals_the_explicit_inverse(poison, case, m, d, steps, damp, scales, refresh, seed):
    backend, _ = case
    gen = torch.Generator().manual_seed(seed)
    w = SlidingWindowIHVP(d, m, damp, dtype=torch.float64, refresh=refresh, backend=backend)
    for t in range(steps):
        g = torch.randn(d, generator=gen, dtype=torch.float64) * scales[t]
        u = w.update_mul(g)
    inv = R.explicit_inverse(w.G, damp)
    # the explicit inverse is as accurate as cond(F) allows, the Woodbury form as cond(K) allows
    # (K = m damp I + G G^T: with m > d it is rank-deficient but for the shift)
    ev = torch.linalg.eigvalsh(damp * torch.eye(d, dtype=torch.float64) + w.G.T @ w.G / m)
    evk = torch.linalg.eigvalsh(m * damp * torch.eye(m, dtype=torch.float64) + w.G @ w.G.T)
    cond = float(ev[-1] / ev[0]) + float(evk[-1] / evk[0])
    note(f"cond(F) + cond(K) = {cond:.1e}")
    err = float((u - inv @ g).norm() / (inv @ g).norm())
    assert err <= max(1e-9, 1e-12 * cond * (steps + 1)), f"relative error {err:.2e}, cond(F) + cond(K) {cond:.1e}"
    assert torch.equal(w.kinv, w.kinv.T)


# ---- bad input --------------------------------------------------------------------------------------------

BAD_BUFFERS = [("list", [[1.0]], TypeError, "G must be a torch.Tensor"),
               ("int", torch.zeros(2, 3, dtype=torch.int32), TypeError, "G must be"),
               ("float16", torch.zeros(2, 3, dtype=torch.float16), TypeError, "G must be float32, bfloat16 or float64"),
               ("complex", torch.zeros(2, 3, dtype=torch.complex64), TypeError, "G must be"),
               ("1-D", torch.zeros(3), ValueError, "G must be 2-D"),
               ("3-D", torch.zeros(1, 2, 3), ValueError, "G must be 2-D")]


@given(bad=st.sampled_from(BAD_BUFFERS), fn=st.sampled_from(["dots", "combine", "diag", "setup", "static"]))
def test_bad_buffers_raise_naming_the_argument(bad, fn):
    _, G, exc, text = bad
    x = torch.zeros(1, 3)
    calls = {"dots": lambda: ops.dots(G, x), "combine": lambda: ops.combine(G, torch.zeros(1, 1, 2, dtype=torch.float64)),
             "diag": lambda: ops.diag(G, 1.0, 1.0), "setup": lambda: ops.static_setup(G, 0.1),
             "static": lambda: StaticIHVP(G, 0.1)}
    name = "Z" if fn == "diag" else "G"
    with pytest.raises(exc) as info:
        calls[fn]()
    assert text.replace("G ", name + " ") in str(info.value)


@given(damp=st.one_of(st.sampled_from([0.0, -1e-3, float("nan"), float("inf"), -float("inf")]),
                      st.floats(max_value=0.0, allow_nan=False)),
       where=st.sampled_from(["window", "static", "setup", "rebuild"]))
def test_bad_damp_raises(damp, where):
    G = torch.randn(2, 5)
    calls = {"window": lambda: SlidingWindowIHVP(5, 2, damp), "static": lambda: StaticIHVP(G, damp),
             "setup": lambda: ops.static_setup(G, damp),
             "rebuild": lambda: ops.window_rebuild(torch.eye(2, dtype=torch.float64), damp)}
    with pytest.raises(ValueError, match="damp must be finite and > 0"):
        calls[where]()


@given(d=st.integers(1, 20), m=st.integers(1, 5), bad_d=st.integers(0, 25), seed=SEEDS,
       kind=st.sampled_from(["nan", "inf", "size", "2-D", "int"]))
def test_bad_gradients_are_rejected_and_the_window_is_unchanged(d, m, bad_d, seed, kind):
    gen = torch.Generator().manual_seed(seed)
    w = SlidingWindowIHVP(d, m, 1e-2)
    for _ in range(m + 1):
        w.update(torch.randn(d, generator=gen))
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in w.state_dict().items()}
    g = torch.randn(d, generator=gen)
    if kind == "nan":
        g[int(torch.randint(d, (1,), generator=gen))] = float("nan")
        exc = ValueError
    elif kind == "inf":
        g[int(torch.randint(d, (1,), generator=gen))] = float("inf")
        exc = ValueError
    elif kind == "size":
        if bad_d == d:
            bad_d = d + 1
        g = torch.randn(bad_d, generator=gen)
        exc = ValueError
    elif kind == "2-D":
        g = g.reshape(1, d)
        exc = ValueError
    else:
        g = torch.ones(d, dtype=torch.int64)
        exc = TypeError
    with pytest.raises(exc, match="g"):
        w.update(g)
    for k, v in w.state_dict().items():
        assert (torch.equal(v, before[k]) if isinstance(v, torch.Tensor) else v == before[k]), k


@given(block=st.one_of(st.integers(-5, 0), st.floats(0.5, 3.0), st.sampled_from(["4", True])),
       where=st.sampled_from(["dots", "static"]))
def test_bad_block_sizes_raise(block, where):
    G = torch.randn(3, 8)
    with pytest.raises((ValueError, TypeError), match="block_size"):
        (ops.dots(G, torch.zeros(8), block) if where == "dots" else StaticIHVP(G, 0.1, block))
