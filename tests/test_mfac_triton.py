"""Triton mfac kernels (kernels/mfac.py) against the float64 reference (python/kernelkit/mfac/reference.py).

Without a CUDA GPU the kernels run under the Triton interpreter: TRITON_INTERPRET=1 must be set before
triton is first imported (tests/conftest.py does it; when this file runs alone it sets it itself unless
triton was already imported without it, in which case the module is skipped).  Inputs are drawn in
float64 and rounded to the tested dtype; the reference runs in float64 on the rounded values.  The
interpreter is slow, so problems are tiny (r <= 12 but one r = 40 case, d <= 200); one test shrinks the
4096-term partial-sum chunks so that the multi-chunk atomics of dots and the float64 combination of
combine's partial sums run too.
"""
from __future__ import annotations

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from triton_family import CUDA as _CUDA, load  # noqa: E402

km, R = load("mfac")
from helpers import rel_err  # noqa: E402

DEVICE = "cuda" if _CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
# Buffer dtype -> tolerance on the relative error: float64 1e-12; float32 / bfloat16 buffers accumulate
# in float32 (partial sums <= 4096 terms) and round the output once to float32.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5}


def _randn(*shape, dtype, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype).to(DEVICE)


def _buffer(r, d, dtype, seed, ld=None):
    """(r, d) buffer of dtype, as a column slice of a wider NaN-filled one when ld > d (row stride ld)."""
    g = _randn(r, d, dtype=dtype, seed=seed)
    if ld is None:
        return g
    wide = torch.full((r, ld), float("nan"), dtype=dtype, device=DEVICE)
    wide[:, 2:2 + d] = g
    out = wide[:, 2:2 + d]
    assert out.stride(0) == ld
    return out


def _check(out, want, tol, what):
    assert out.shape == want.shape, f"{what}: shape {tuple(out.shape)} != {tuple(want.shape)}"
    err = rel_err(out, want)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


# ---- passes over the buffer -------------------------------------------------------------------------
# (r, d, block, nvec, ld): one block, blocks with a short last one, block > d, a row stride > d
PASS_CASES = [(7, 150, 150, 1, None), (5, 23, 10, 3, 31), (12, 200, 64, 5, None), (3, 17, 100, 2, None)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mfac_dots_matches_reference(dtype):
    for i, (r, d, block, nvec, ld) in enumerate(PASS_CASES):
        G = _buffer(r, d, dtype, seed=i, ld=ld)
        x = _randn(nvec, d, dtype=R.vector_dtype(dtype), seed=100 + i)
        q = km.mfac_dots(G, x, block)
        assert q.dtype == torch.float64
        _check(q, R.dots_reference(G.cpu(), x.cpu(), block), TOL[dtype], f"dots case {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mfac_combine_matches_reference(poison, dtype):
    """out = alpha x + G^T c per block, with x and without (alpha dropped); out is a fresh NaN-poisoned
    torch.empty, so a column a program forgets fails."""
    vdt = R.vector_dtype(dtype)
    for i, (r, d, block, nvec, ld) in enumerate(PASS_CASES):
        G = _buffer(r, d, dtype, seed=i, ld=ld)
        c = _randn(nvec, R.nblocks(d, block), r, dtype=torch.float64, seed=200 + i)
        x = _randn(nvec, d, dtype=vdt, seed=300 + i)
        for xx, alpha in ((x, -0.7), (None, 0.0)):
            out = km.mfac_combine(G, c, xx, alpha, block)
            assert out.dtype == vdt
            want = R.combine_reference(G.cpu(), c.cpu(), None if xx is None else xx.cpu(), alpha, block, vdt)
            _check(out, want.double(), TOL[dtype], f"combine case {i} x={xx is not None}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mfac_diag_matches_reference(poison, dtype):
    vdt = R.vector_dtype(dtype)
    Z = _buffer(9, 170, vdt, seed=5, ld=181)
    out = km.mfac_diag(Z, 1.25, -0.5)
    assert out.dtype == vdt
    _check(out, R.diag_reference(Z.cpu(), 1.25, -0.5).double(), TOL[dtype], "diag")


def test_mfac_dots_combine_multichunk_partial_sums(monkeypatch):
    """With the 4096-term partial-sum bound shrunk to 16, dots splits each block into several column
    chunks added with atomics, and combine sums rows in several float32 partial sums."""
    monkeypatch.setattr(km, "PARTIAL_TERMS", 16)
    r, d, block = 40, 90, 50
    G = _buffer(r, d, torch.float32, seed=7)
    x = _randn(2, d, dtype=torch.float32, seed=8)
    _check(km.mfac_dots(G, x, block), R.dots_reference(G, x, block), 1e-5, "dots multichunk")
    c = _randn(2, R.nblocks(d, block), r, dtype=torch.float64, seed=9)
    want = R.combine_reference(G, c, x, 0.3, block, torch.float32).double()
    _check(km.mfac_combine(G, c, x, 0.3, block), want, 1e-5, "combine multichunk")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mfac_insert_dots_writes_rounded_row_and_gram_column(dtype):
    """G[row] = round(x) exactly (bfloat16: round to nearest even), q = G x, qr = G round(x); a
    non-finite x raises ValueError with G unchanged."""
    vdt = R.vector_dtype(dtype)
    r, d, row = 6, 130, 4
    G = _buffer(r, d, dtype, seed=11, ld=137)
    x = _randn(1, d, dtype=vdt, seed=12)
    if dtype == torch.bfloat16:   # values halfway between two bfloat16 numbers: ties to even
        x[0, :4] = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 2 ** -8 + 2 ** -16], dtype=vdt)
    Gref = G.cpu().clone()
    q0, qr0 = R.insert_dots_reference(Gref, x[0].cpu(), row)
    q, qr = km.mfac_insert_dots(G, x, row)
    assert torch.equal(G.cpu(), Gref), "the written row differs from x rounded to nearest even"
    _check(q, q0, TOL[dtype], "insert q")
    _check(qr, qr0, TOL[dtype], "insert qr")
    if dtype == torch.bfloat16:
        assert rel_err(qr, q0) > 1e-6, "qr must use the rounded x"
    before = G.cpu().clone()
    bad = x.clone()
    bad[0, 77] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        km.mfac_insert_dots(G, bad, 1)
    bad[0, 77] = float("-inf")
    with pytest.raises(ValueError, match="non-finite"):
        km.mfac_insert_dots(G, bad, 1)
    assert torch.equal(G.cpu(), before)


# ---- static setup -----------------------------------------------------------------------------------
# (m, d, block, form): W one block, W blocks with a short last one, E blocks with a 1-wide last block
# (its rows 1..r-1 must be zero), E one block
SETUP_CASES = [(6, 30, 30, "W"), (4, 23, 10, "W"), (7, 13, 6, "E"), (9, 5, 100, "E")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mfac_static_setup_matches_reference(poison, dtype):
    """Z against the float64 reference (NaN-poisoned output: the E form's zero rows must be written), and
    in float64 the IHVP alpha x + beta Z_b^T Z_b x against the explicit block-diagonal inverse."""
    damp = 0.05
    for i, (m, d, block, form) in enumerate(SETUP_CASES):
        G = _buffer(m, d, dtype, seed=20 + i, ld=d + 3)
        assert (m <= min(block, d)) == (form == "W")
        Z = km.mfac_static_setup(G, damp, block)
        want = R.static_setup_reference(G.cpu(), damp, block)
        assert Z.dtype == R.vector_dtype(dtype) and Z.shape == (R.static_rows(m, d, block), d)
        _check(Z, want.double(), 1e-12 if dtype == torch.float64 else 1e-6, f"setup case {i} ({form})")
        if dtype == torch.float64:
            alpha, beta = R.static_coefficients(m, d, block, damp)
            x = _randn(2, d, dtype=torch.float64, seed=30 + i)
            q = km.mfac_dots(Z, x, block)
            out = km.mfac_combine(Z, beta * q, x, alpha, block)
            _check(out, R.ihvp_explicit(G.cpu(), damp, x.cpu(), block), 1e-9, f"setup ihvp case {i}")
            dg = km.mfac_diag(Z, alpha, beta)
            _check(dg, torch.diagonal(R.explicit_inverse(G.cpu(), damp, block)), 1e-9, f"setup diag case {i}")


def test_mfac_static_setup_not_positive_definite_raises():
    """A negative damp makes the shifted Gram matrices indefinite; a NaN in G poisons a pivot."""
    G = _randn(4, 10, dtype=torch.float64, seed=40)
    with pytest.raises(ValueError, match="positive definite"):
        km.mfac_static_setup(G, -100.0, 10)
    G[1, 3] = float("nan")
    with pytest.raises(ValueError, match="positive definite"):
        km.mfac_static_setup(G, 0.1, 4)


# ---- sliding window ---------------------------------------------------------------------------------
def _window(m, d, damp, seed):
    G = _randn(m, d, dtype=torch.float64, seed=seed)
    gram = (G @ G.T).contiguous()
    return G, gram, R.window_rebuild_reference(gram.cpu(), damp).contiguous().to(DEVICE)


def test_mfac_window_rebuild_and_coef_match_reference(poison):
    damp = 0.02
    for m in (1, 9):
        _, gram, _ = _window(m, 15, damp, seed=50 + m)
        gram_lower = torch.tril(gram) + torch.triu(torch.full_like(gram, float("nan")), 1)  # only tril is read
        kinv = km.mfac_window_rebuild(gram_lower, damp)
        _check(kinv, R.window_rebuild_reference(gram.cpu(), damp), 1e-12, f"rebuild m={m}")
        for nvec in (1, 3):
            q = _randn(nvec, m, dtype=torch.float64, seed=60 + nvec)
            _check(km.mfac_window_coef(kinv, q, -3.0), R.window_coef_reference(kinv.cpu(), q.cpu(), -3.0), 1e-12,
                   f"coef m={m} nvec={nvec}")
    with pytest.raises(ValueError, match="positive definite"):
        km.mfac_window_rebuild(-gram, damp)


@pytest.mark.parametrize("m, d, damp, steps", [(6, 40, 1e-2, 12), (6, 40, 1e-5, 12), (40, 60, 1e-5, 3)])
def test_mfac_window_update_bordering_tracks_the_exact_inverse(m, d, damp, steps):
    """Replacements (2m of them; a few rows in several tiles for m = 40) by gradients of scales 1..1e3 (the
    growth that cost the former rank-2 Woodbury step its digits) go by bordering, without a fallback: gram
    gets newcol exactly, kinv stays exactly symmetric and the exact inverse of the new window to 1e-11."""
    scales = torch.logspace(0, 3, m, dtype=torch.float64)
    G = _randn(m, d, dtype=torch.float64, seed=70) * scales.to(DEVICE)[:, None]
    gram = (G @ G.T).contiguous()
    kinv = R.window_rebuild_reference(gram.cpu(), damp).to(DEVICE)
    for step in range(steps):
        row = (5 * step + 1) % m if steps == 2 * m else (35, 3, 33)[step]
        G[row] = _randn(d, dtype=torch.float64, seed=80 + step) * float(scales[(7 * step) % m])
        newcol = (G @ G[row]).contiguous()
        assert km.mfac_window_update(gram, kinv, row, newcol, damp) is False, f"step {step}: fallback"
        assert torch.equal(gram[row], newcol) and torch.equal(gram[:, row], newcol)
        assert torch.equal(kinv, kinv.T), f"step {step}: kinv not exactly symmetric"
        K = (G @ G.T).cpu() + m * damp * torch.eye(m, dtype=torch.float64)
        assert torch.linalg.cond(K) < 1e8    # the premise: 1e-11 is within what cond(K) allows
        _check(kinv, R.window_rebuild_reference((G @ G.T).cpu(), damp), 1e-11, f"kinv step {step}")


def test_mfac_window_update_falls_back_when_the_schur_complement_cancels(monkeypatch):
    """A new row equal to another one with damp 1e-14: s = m damp is below 64 eps (|c| + sum |bz_i w_i|),
    so the update rebuilds: kinv is bitwise the rebuild of the new gram.  With the criterion switched off
    (UPDATE_CANCEL = 0) the same call takes bordering (s stays positive): the criterion decided."""
    m, d, damp = 5, 30, 1e-14
    G, gram, kinv = _window(m, d, damp, seed=90)
    G[3] = G[2]
    newcol = (G @ G[3]).contiguous()
    g1, k1 = gram.clone(), kinv.clone()
    assert km.mfac_window_update(g1, k1, 3, newcol, damp) is True
    assert torch.equal(g1[3], newcol) and torch.equal(g1[:, 3], newcol)
    assert torch.equal(k1, km.mfac_window_rebuild(g1, damp))
    monkeypatch.setattr(km, "UPDATE_CANCEL", 0.0)
    assert km.mfac_window_update(gram.clone(), kinv.clone(), 3, newcol, damp) is False


def test_mfac_window_update_falls_back_exactly_on_an_unusable_pivot():
    """kinv NaN-filled (a_p is not positive and finite): the update rebuilds kinv from the new gram, and
    the result is the exact inverse (to 1e-12) whatever kinv held."""
    m, d, damp = 7, 20, 1e-2
    G, gram, kinv = _window(m, d, damp, seed=92)
    G[4] = 30.0 * _randn(d, dtype=torch.float64, seed=93)
    kinv.fill_(float("nan"))
    assert km.mfac_window_update(gram, kinv, 4, (G @ G[4]).contiguous(), damp) is True
    _check(gram, G @ G.T, 1e-13, "gram after fallback")
    _check(kinv, R.window_rebuild_reference((G @ G.T).cpu(), damp), 1e-12, "kinv after fallback")


def test_mfac_window_update_nonfinite_newcol_changes_nothing():
    m, damp = 6, 0.1
    G, gram, kinv = _window(m, 12, damp, seed=95)
    newcol = (G @ G[2]).contiguous()
    newcol[4] = float("inf")
    g0, k0 = gram.clone(), kinv.clone()
    with pytest.raises(ValueError, match="non-finite"):
        km.mfac_window_update(gram, kinv, 2, newcol, damp)
    assert torch.equal(gram, g0) and torch.equal(kinv, k0)


# ---- empty sizes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mfac_empty_sizes(dtype):
    vdt = R.vector_dtype(dtype)
    G = _randn(4, 0, dtype=dtype, seed=1)                       # d = 0
    assert km.mfac_dots(G, torch.empty(2, 0, dtype=vdt, device=DEVICE), 5).shape == (2, 0, 4)
    assert km.mfac_combine(G, torch.empty(2, 0, 4, dtype=torch.float64, device=DEVICE), None, 0.0, 5).shape == (2, 0)
    assert km.mfac_diag(G.to(vdt), 1.0, 1.0).shape == (0,)
    assert km.mfac_static_setup(G, 0.1, 5).shape == (0, 0)
    q, qr = km.mfac_insert_dots(G, torch.empty(1, 0, dtype=vdt, device=DEVICE), 2)
    assert q.shape == qr.shape == (1, 0, 4)
    G = _randn(3, 20, dtype=dtype, seed=2)                      # nvec = 0
    assert km.mfac_dots(G, torch.empty(0, 20, dtype=vdt, device=DEVICE), 8).shape == (0, 3, 3)
    assert km.mfac_combine(G, torch.empty(0, 3, 3, dtype=torch.float64, device=DEVICE), None, 0.0, 8).shape == (0, 20)
    G = _randn(0, 20, dtype=dtype, seed=3)                      # r = 0: q empty, out = alpha x, diag = alpha
    x = _randn(2, 20, dtype=vdt, seed=4)
    assert km.mfac_dots(G, x, 20).shape == (2, 1, 0)
    _check(km.mfac_combine(G, torch.empty(2, 1, 0, dtype=torch.float64, device=DEVICE), x, 2.0, 20),
           2.0 * x.double(), 0.0, "combine r=0")
    _check(km.mfac_diag(G.to(vdt), 1.5, 3.0), torch.full((20,), 1.5, dtype=torch.float64), 0.0, "diag r=0")
    e = torch.empty(0, 0, dtype=torch.float64, device=DEVICE)  # m = 0
    assert km.mfac_window_rebuild(e, 0.1).shape == (0, 0)
    assert km.mfac_window_coef(e, torch.empty(3, 0, dtype=torch.float64, device=DEVICE), 1.0).shape == (3, 0)


# ---- ahead-of-time sweep ----------------------------------------------------------------------------
_KERNELS = ("_dots_kernel", "_write_row_kernel", "_combine_kernel", "_diag_kernel", "_gram_kernel", "_chol_kernel",
            "_trinv_kernel", "_apply_kernel", "_matvec_kernel", "_border_prep_kernel", "_border_kernel",
            "_set_rowcol_kernel")


def test_mfac_aot_sweep_reaches_every_kernel_and_dtype(monkeypatch):
    """tests/triton_aot.py compiles what aot_sweep() launches: every kernel, each buffer dtype through the
    buffer kernels, one and four vectors, dots with and without qr, combine with and without x, both
    static forms (the E form writing Z from the triangular inverse), both window-update paths; launches
    on meta tensors with a non-empty 1-D grid; at most 40 distinct variants."""
    launches = []
    for name in _KERNELS:
        kernel = getattr(km, name)

        def record(*args, grid, warmup, _name=name, _kernel=kernel, **kwargs):
            bound = dict(zip(_kernel.arg_names, args))
            bound.update(kwargs)
            launches.append((_name, bound, grid))
        monkeypatch.setattr(kernel, "run", record)
    monkeypatch.setattr(km, "_INTERPRET", False)
    assert km.aot_sweep() > 0
    by = {}
    for name, a, grid in launches:
        by.setdefault(name, []).append(a)
        assert len(grid) == 1 and 0 < grid[0] <= 2 ** 31 - 1, name
        assert all(v.device.type == "meta" for v in a.values() if isinstance(v, torch.Tensor)), name
    assert set(by) == set(_KERNELS)
    for name in ("_dots_kernel", "_combine_kernel", "_write_row_kernel", "_apply_kernel"):
        assert {a["g_ptr"].dtype for a in by[name]} == set(km.AOT_DTYPES), name
    assert {(a["g_ptr"].dtype, a["NV"], a["WITH_QR"]) for a in by["_dots_kernel"]} == \
        {(dt, nv, False) for dt in km.AOT_DTYPES for nv in (1, 4)} | {(torch.bfloat16, 1, True)}
    assert {(a["g_ptr"].dtype, a["NV"], a["has_x"]) for a in by["_combine_kernel"]} == \
        {(dt, nv, hx) for dt in km.AOT_DTYPES for nv in (1, 4) for hx in (0, 1)}
    assert {a["z_ptr"].dtype for a in by["_diag_kernel"]} == {torch.float32, torch.float64}
    assert {(a["a_ptr"].dtype, a["ATOMIC"]) for a in by["_gram_kernel"]} == \
        {(dt, True) for dt in km.AOT_DTYPES} | {(torch.float64, False)}
    assert {(a["STORE_Z"], a["z_ptr"].dtype) for a in by["_trinv_kernel"]} == \
        {(False, torch.float64), (True, torch.float32), (True, torch.float64)}
    variants = set()
    for name, a, _ in launches:
        variants.add((name,) + tuple(sorted((k, repr(v.dtype) if isinstance(v, torch.Tensor) else repr(v))
                                            for k, v in a.items()
                                            if k.isupper() or k in ("num_warps", "num_stages")
                                            or isinstance(v, torch.Tensor))))
    assert len(variants) <= 40, len(variants)
