"""mfac ops (python/kernelkit/mfac/ops.py) and the two IHVP algorithms (python/kernelkit/mfac/ihvp.py) on
every backend that runs here, against the float64 references (python/kernelkit/mfac/reference.py):

- each op's forward for float32 / bfloat16 / float64 buffers (a row stride wider than d), odd sizes, one
  and several blocks (a short last block), nvec 0 / 1 / 3, r = 0, d = 0, NaN-poisoned outputs;
- the IHVP of both algorithms against the explicit float64 inverse of damp I + G^T G / m (relative error
  <= 1e-9), the diagonal against the explicit inverse's, the window after many replacements against a
  rebuild from its current rows;
- gradients (gradcheck in float64 of every differentiable op, torch and cpu backends), custom-op
  registration (opcheck of the eight ops, torch.compile fullgraph forward + backward);
- bad input through the user functions and objects (the argument named, nothing changed).

The Triton backend (interpreted on CPU) runs small problems only; tests/test_mfac_triton.py covers its
kernels in depth.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import kernelkit
from kernelkit.mfac import SlidingWindowIHVP, StaticIHVP, ops
from kernelkit.mfac import reference as R
from helpers import TOL, assert_close, rel_err

GDTYPES = [torch.float32, torch.bfloat16, torch.float64]
CPU_BACKENDS = ["torch", "cpu"]


def _triton_ok() -> bool:
    return (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"
            and kernelkit.backends("cpu").get("triton") == "available")


def _backends(tiny: bool):
    out = list(CPU_BACKENDS)
    if tiny:
        out.append(pytest.param("triton", marks=pytest.mark.skipif(not _triton_ok(), reason="no Triton interpreter")))
    return out


def _tol(gdtype: torch.dtype) -> float:
    # the reference runs on the rounded buffer values: only the accumulation differs, float32 or better
    return TOL[torch.float64] if gdtype == torch.float64 else TOL[torch.float32]


def _buffer(r: int, d: int, gdtype, seed: int, pad: int = 3) -> torch.Tensor:
    """(r, d) in gdtype with a row stride of d + pad (a column slice of a wider buffer)."""
    gen = torch.Generator().manual_seed(seed)
    full = torch.randn(r, d + pad, generator=gen, dtype=torch.float64).to(gdtype)
    return full[:, :d]


def _vectors(n: int, d: int, dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)


# (r, d, block or None, nvec): odd sizes, several blocks with a short last one, block 1, r = 0, d = 0,
# nvec = 0
SHAPES = [(5, 37, None, 1), (7, 130, 16, 3), (1, 1, None, 1), (4, 50, 7, 2), (6, 64, 64, 1), (3, 29, 1, 2),
          (0, 10, None, 2), (3, 0, None, 1), (6, 21, 8, 0)]
TINY = [(5, 37, None, 1), (4, 50, 7, 2), (3, 0, None, 1)]


def _shape_params(tiny_for_triton=True):
    out = []
    for be in CPU_BACKENDS:
        for s in SHAPES:
            out.append((be, s))
    if tiny_for_triton:
        for s in TINY:
            out.append(pytest.param("triton", s, marks=pytest.mark.skipif(not _triton_ok(),
                                                                          reason="no Triton interpreter")))
    return out


# ---- the ops against the reference ---------------------------------------------------------------------

@pytest.mark.parametrize("gdtype", GDTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("backend,shape", _shape_params())
def test_mfac_dots_matches_reference(poison, backend, shape, gdtype):
    r, d, block, nvec = shape
    G = _buffer(r, d, gdtype, 1)
    x = _vectors(nvec, d, R.vector_dtype(gdtype), 2)
    blk = ops.check_block(block, d, "test")
    q = ops.mfac_dots(G, x, blk, backend)
    want = R.dots_reference(G, x, blk)
    assert q.dtype == torch.float64 and q.shape == want.shape == (nvec, R.nblocks(d, blk), r)
    assert rel_err(q, want) <= _tol(gdtype), f"dots {backend} {shape}"


@pytest.mark.parametrize("gdtype", GDTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("backend,shape", _shape_params())
def test_mfac_combine_matches_reference(poison, backend, shape, gdtype):
    r, d, block, nvec = shape
    G = _buffer(r, d, gdtype, 3)
    blk = ops.check_block(block, d, "test")
    c = _vectors(nvec * R.nblocks(d, blk) * r, 1, torch.float64, 4).reshape(nvec, R.nblocks(d, blk), r)
    vdt = R.vector_dtype(gdtype)
    x = _vectors(nvec, d, vdt, 5)
    for xx, alpha in ((x, 0.75), (None, 0.0)):
        out = ops.mfac_combine(G, c, xx, alpha, blk, backend)
        want = R.combine_reference(G, c, xx, alpha, blk, torch.float64)
        assert out.dtype == vdt and out.shape == (nvec, d)
        assert rel_err(out, want) <= _tol(gdtype), f"combine {backend} {shape} x={xx is not None}"


@pytest.mark.parametrize("gdtype", [torch.float32, torch.float64], ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("backend", _backends(tiny=True))
def test_mfac_diag_matches_reference(poison, backend, gdtype):
    for r, d in ((5, 37), (1, 1), (0, 4), (3, 0), (9, 200)):
        Z = _buffer(r, d, gdtype, 6)
        out = ops.mfac_diag(Z, 0.5, -0.25, backend)
        assert_close(out, R.diag_reference(Z, 0.5, -0.25, torch.float64), gdtype, f"diag {r}x{d}")


@pytest.mark.parametrize("gdtype", GDTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("backend", _backends(tiny=True))
def test_mfac_insert_dots(poison, backend, gdtype):
    r, d = 6, 45
    G = _buffer(r, d, gdtype, 7).contiguous()
    x = _vectors(1, d, R.vector_dtype(gdtype), 8)
    before = G.clone()
    q, qr = ops.mfac_insert_dots(G, x, 2, backend)
    G_ref = before.clone()
    q_ref, qr_ref = R.insert_dots_reference(G_ref, x[0], 2)
    assert torch.equal(G, G_ref), "the inserted row must be x rounded to the buffer dtype, the rest unchanged"
    assert rel_err(q, q_ref) <= _tol(gdtype) and rel_err(qr, qr_ref) <= _tol(gdtype)
    if gdtype != torch.bfloat16:
        assert torch.equal(q, qr)
    bad = x.clone()
    bad[0, 11] = float("nan")
    snapshot = G.clone()
    with pytest.raises(ValueError, match="non-finite|not finite"):
        ops.mfac_insert_dots(G, bad, 4, backend)
    assert torch.equal(G, snapshot), "a rejected insertion must leave the buffer unchanged"


@pytest.mark.parametrize("gdtype", GDTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("backend", _backends(tiny=True))
def test_mfac_static_setup_matches_reference(poison, backend, gdtype):
    # (m, d, block): W form one block, W form with blocks (short last), E form blocks, E form one block
    # (d < m), block 1
    cases = [(4, 23, None), (3, 20, 6), (9, 22, 4), (8, 5, None), (2, 7, 1)]
    if backend == "triton":
        cases = cases[:3]
    for m, d, block in cases:
        G = _buffer(m, d, gdtype, 9)
        blk = ops.check_block(block, d, "test")
        Z = ops.mfac_static_setup(G, 0.05, blk, backend)
        want = R.static_setup_reference(G, 0.05, blk)
        assert Z.shape == want.shape == (R.static_rows(m, d, blk), d) and Z.dtype == R.vector_dtype(gdtype)
        assert rel_err(Z, want) <= 10 * _tol(gdtype), f"static setup {backend} m={m} d={d} block={block}"


@pytest.mark.parametrize("backend", _backends(tiny=True))
def test_mfac_window_ops_match_reference(poison, backend):
    m, damp = 7, 0.3
    G = _vectors(m, 19, torch.float64, 10)
    gram = G @ G.T
    kinv = ops.mfac_window_rebuild(gram, damp, backend)
    assert_close(kinv, R.window_rebuild_reference(gram, damp), torch.float64, "rebuild")
    # the upper triangle is not read
    junk = torch.tril(gram) + torch.triu(torch.full_like(gram, 1e6), 1)
    assert_close(ops.mfac_window_rebuild(junk, damp, backend), kinv, torch.float64, "rebuild reads the lower triangle")
    q = _vectors(3, m, torch.float64, 11)
    assert_close(ops.mfac_window_coef(kinv, q, -2.5, backend), R.window_coef_reference(kinv, q, -2.5),
                 torch.float64, "coef")
    assert ops.mfac_window_coef(kinv, q[:0], 1.0, backend).shape == (0, m)
    # rank-2 updates of every row in turn, twice round, against the exact inverse of the new Gram matrix
    gram_t, kinv_t = gram.clone(), kinv.clone()
    for step in range(2 * m):
        row = (3 * step) % m
        g = _vectors(1, 19, torch.float64, 100 + step)[0]
        G[row] = g
        newcol = G @ g
        ops.mfac_window_update(gram_t, kinv_t, row, newcol, damp, backend)
        assert torch.equal(gram_t[row], newcol) and torch.equal(gram_t[:, row], newcol)
        assert rel_err(kinv_t, R.window_rebuild_reference(G @ G.T, damp)) <= 1e-11, f"update step {step}"


@pytest.mark.parametrize("backend", _backends(tiny=True))
def test_mfac_window_update_hard_cases(backend):
    """Replacing a row by a copy of another row (K' near singular at a tiny damp) and by a gradient 1e8
    times larger: the result stays the inverse of the new K (whether the rank-2 step or its rebuild
    fallback computed it)."""
    m, d = 5, 12
    G = _vectors(m, d, torch.float64, 12)
    for damp, new in ((1e-10, G[1].clone()), (1e-3, 1e8 * _vectors(1, d, torch.float64, 13)[0]),
                      (1e-3, torch.zeros(d, dtype=torch.float64))):
        Gt = G.clone()
        gram = Gt @ Gt.T
        kinv = R.window_rebuild_reference(gram, damp)
        Gt[3] = new
        ops.mfac_window_update(gram, kinv, 3, Gt @ new, damp, backend)
        exact = R.window_rebuild_reference(Gt @ Gt.T, damp)
        K = Gt @ Gt.T + m * damp * torch.eye(m, dtype=torch.float64)
        ev = torch.linalg.eigvalsh(K)
        cond = float(ev[-1] / ev[0])
        # as accurate as the condition number allows: || K kinv - I || and the forward error ~ cond * eps
        assert torch.isfinite(kinv).all()
        resid = float((K @ kinv - torch.eye(m, dtype=torch.float64)).abs().max())
        assert resid < 100 * 2.2e-16 * cond, f"damp {damp}: residual {resid:.1e}, cond {cond:.1e}"
        assert rel_err(kinv, exact) < max(1e-10, 100 * 2.2e-16 * cond), f"damp {damp}"


# ---- the two algorithms against the explicit inverse ------------------------------------------------------

@pytest.mark.parametrize("backend", _backends(tiny=True))
def test_mfac_sliding_window_matches_explicit_inverse(backend):
    d, m, damp = 40 if backend == "triton" else 97, 6, 1e-2
    w = SlidingWindowIHVP(d, m, damp, dtype=torch.float64, backend=backend)
    x = _vectors(3, d, torch.float64, 14)
    errs = []
    for step in range(3 * m + 1):
        g = _vectors(1, d, torch.float64, 200 + step)[0] * (1 + step % 3)
        u = w.update_mul(g)
        rows = min(step + 1, m)
        assert w.count == step + 1 and rows == min(w.count, m)
        want = R.ihvp_explicit(w.G, damp, g)
        errs.append(rel_err(u, want))
        if step in (1, m - 1, 3 * m):  # before the window fills: the empty slots are zero gradients
            errs.append(rel_err(w.mul(x), R.ihvp_explicit(w.G, damp, x)))
    assert max(errs) <= 1e-9, f"max relative error {max(errs):.2e}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mfac_sliding_window_equals_rebuild_after_many_replacements(backend):
    d, m, damp = 301, 8, 1e-3
    for refresh in (0, m):  # never refreshed: only the rank-2 updates; refreshed every m updates
        w = SlidingWindowIHVP(d, m, damp, dtype=torch.float64, refresh=refresh, backend=backend)
        for step in range(10 * m + 3):
            w.update(_vectors(1, d, torch.float64, 300 + step)[0])
        x = _vectors(2, d, torch.float64, 15)
        got = w.mul(x)
        kinv_before = w.kinv.clone()
        w.rebuild()
        assert rel_err(kinv_before, w.kinv) <= 1e-10, f"refresh={refresh}"
        assert rel_err(got, w.mul(x)) <= 1e-10
        assert rel_err(got, R.ihvp_explicit(w.G, damp, x)) <= 1e-9


@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mfac_sliding_window_low_precision_buffers(backend, gdtype):
    """A float32 / bfloat16 buffer: the IHVP is that of the stored (rounded) gradients, to float32 accuracy;
    mul of an unrounded vector too."""
    d, m, damp = 203, 5, 1e-1
    w = SlidingWindowIHVP(d, m, damp, dtype=gdtype, backend=backend)
    for step in range(2 * m + 1):
        g = _vectors(1, d, torch.float32, 400 + step)[0]
        u = w.update_mul(g)
        assert u.dtype == torch.float32
        # a bfloat16 window preconditions the gradient as stored (see SlidingWindowIHVP.update_mul)
        assert rel_err(u, R.ihvp_explicit(w.G, damp, g.to(gdtype).double())) <= 1e-5
    x = _vectors(2, d, torch.float32, 450)
    assert rel_err(w.mul(x), R.ihvp_explicit(w.G, damp, x.double())) <= 1e-5


@pytest.mark.parametrize("backend", _backends(tiny=True))
def test_mfac_static_matches_explicit_inverse(backend):
    m, d, damp = 6, 30 if backend == "triton" else 53, 1e-2
    G = _vectors(m, d, torch.float64, 16)
    x = _vectors(2, d, torch.float64, 17)
    for block in (None, 4, 7, 6, 16, 1, d + 5):
        s = StaticIHVP(G, damp, block, backend=backend)
        inv = R.explicit_inverse(G, damp, block)
        assert rel_err(s.mul(x), x @ inv.T) <= 1e-9, f"block {block}"
        assert rel_err(s.mul(x[0]), inv @ x[0]) <= 1e-9
        assert rel_err(s.diag(), inv.diagonal()) <= 1e-9, f"diag block {block}"
        idx = torch.tensor([0, d - 1, d // 2])
        assert rel_err(s.diag(idx), inv.diagonal()[idx]) <= 1e-9


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mfac_static_float32_and_bfloat16_gradients(backend):
    m, d, damp = 16, 300, 1e-2
    for gdtype in (torch.float32, torch.bfloat16):
        G = _vectors(m, d, gdtype, 18)
        for block in (None, 64, 8):
            s = StaticIHVP(G, damp, block, backend=backend)
            inv = R.explicit_inverse(G, damp, block)
            x = _vectors(1, d, torch.float32, 19)[0]
            assert rel_err(s.mul(x), inv @ x.double()) <= 1e-4, f"{gdtype} block {block}"
            assert rel_err(s.diag(), inv.diagonal()) <= 1e-4


def test_mfac_paper_window_is_the_same_inverse():
    """The published algorithm (reference.PaperWindow) and ours give the same IHVPs: the baseline of the
    benchmarks and of the optimizer tests computes what we compute."""
    d, m, damp = 50, 4, 1e-2
    ours = SlidingWindowIHVP(d, m, damp, dtype=torch.float64, backend="cpu")
    paper = R.PaperWindow(d, m, damp, dtype=torch.float64)
    for step in range(2 * m + 1):
        g = _vectors(1, d, torch.float64, 500 + step)[0]
        assert rel_err(ours.update_mul(g), paper.update_mul(g)) <= 1e-9


# ---- gradients --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mfac_gradcheck_dots_combine_diag(backend):
    gc = torch.autograd.gradcheck
    G = _vectors(3, 11, torch.float64, 20).requires_grad_()
    x = _vectors(2, 11, torch.float64, 21).requires_grad_()
    for block in (11, 4):
        nb = R.nblocks(11, block)
        c = _vectors(2 * nb * 3, 1, torch.float64, 22).reshape(2, nb, 3).requires_grad_()
        assert gc(lambda G, x: ops.mfac_dots(G, x, block, backend), (G, x))
        assert gc(lambda G, c, x: ops.mfac_combine(G, c, x, 0.7, block, backend), (G, c, x))
        assert gc(lambda G, c: ops.mfac_combine(G, c, None, 0.0, block, backend), (G, c))
    assert gc(lambda Z: ops.mfac_diag(Z, 0.5, -1.5, backend), (G,))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mfac_gradcheck_window_ops(backend):
    gc = torch.autograd.gradcheck
    A = _vectors(4, 9, torch.float64, 23)
    gram = (A @ A.T).requires_grad_()
    assert gc(lambda g: ops.mfac_window_rebuild(g, 0.2, backend), (gram,))
    kinv = R.window_rebuild_reference(gram.detach(), 0.2).requires_grad_()
    q = _vectors(2, 4, torch.float64, 24).requires_grad_()
    assert gc(lambda k, q: ops.mfac_window_coef(k, q, -1.3, backend), (kinv, q))


def test_mfac_ihvp_composed_from_ops_is_differentiable():
    """F^-1 x built from dots -> coef -> combine: its gradient with respect to x is F^-1 (symmetric)."""
    d, m, damp = 13, 3, 0.1
    G = _vectors(m, d, torch.float64, 25)
    kinv = R.window_rebuild_reference(G @ G.T, damp)

    def ihvp(x):
        q = ops.mfac_dots(G, x, d, "cpu")
        c = ops.mfac_window_coef(kinv, q.reshape(x.shape[0], m), -1 / damp, "cpu")
        return ops.mfac_combine(G, c.reshape(x.shape[0], 1, m), x, 1 / damp, d, "cpu")

    x = _vectors(1, d, torch.float64, 26).requires_grad_()
    assert torch.autograd.gradcheck(ihvp, (x,))
    y = _vectors(1, d, torch.float64, 27)
    (ihvp(x) * y).sum().backward()
    assert rel_err(x.grad, y @ R.explicit_inverse(G, damp)) <= 1e-10


def test_mfac_static_setup_is_not_differentiable():
    G = _vectors(3, 8, torch.float64, 28).requires_grad_()
    Z = ops.mfac_static_setup(G, 0.1, 8, "cpu")
    with pytest.raises(RuntimeError, match="not differentiable"):
        Z.sum().backward()


# ---- custom-op registration -------------------------------------------------------------------------------

def test_mfac_opcheck_every_op():
    op = torch.ops.kernelkit
    G = _vectors(4, 21, torch.float64, 29).requires_grad_()
    x = _vectors(2, 21, torch.float64, 30).requires_grad_()
    c = _vectors(2 * 3 * 4, 1, torch.float64, 31).reshape(2, 3, 4).requires_grad_()
    torch.library.opcheck(op.mfac_dots, (G, x, 8, "cpu"))
    torch.library.opcheck(op.mfac_combine, (G, c, x, 0.5, 8, "cpu"))
    torch.library.opcheck(op.mfac_combine, (G, c, None, 0.0, 8, "cpu"))
    torch.library.opcheck(op.mfac_diag, (G, 1.0, -0.5, "cpu"))
    for dt in (torch.float32, torch.bfloat16):
        torch.library.opcheck(op.mfac_dots, (G.detach().to(dt), x.detach().float(), 21, "cpu"))
    torch.library.opcheck(op.mfac_static_setup, (G.detach(), 0.1, 21, "cpu"))
    torch.library.opcheck(op.mfac_insert_dots, (G.detach().clone(), x.detach()[:1].clone(), 2, "cpu"))
    gram = (G.detach() @ G.detach().T)
    kinv = R.window_rebuild_reference(gram, 0.1)
    torch.library.opcheck(op.mfac_window_rebuild, (gram.clone().requires_grad_(), 0.1, "cpu"))
    torch.library.opcheck(op.mfac_window_coef, (kinv.clone().requires_grad_(), c.detach()[:, 0].clone(), -2.0, "cpu"))
    G2 = G.detach().clone()
    G2[1] = _vectors(1, 21, torch.float64, 36)[0]
    torch.library.opcheck(op.mfac_window_update, (gram.clone(), kinv.clone(), 1, G2 @ G2[1], 0.1, "cpu"))


def test_mfac_torch_compile_fullgraph_fwd_bwd():
    """An IHVP from the ops (dots, coef, combine, diag) in one compiled graph (cpu backend), forward and
    backward, against the eager float64 reference backend."""
    torch._dynamo.reset()
    d, m, damp = 17, 4, 0.1
    G = _vectors(m, d, torch.float32, 32)
    kinv = R.window_rebuild_reference(G.double() @ G.double().T, damp)

    def f(x, backend):
        q = ops.mfac_dots(G, x, d, backend)
        cc = ops.mfac_window_coef(kinv, q.reshape(x.shape[0], m), -1 / damp, backend)
        u = ops.mfac_combine(G, cc.reshape(x.shape[0], 1, m), x, 1 / damp, d, backend)
        return (u * x).sum() + ops.mfac_diag(G, 1.0, 0.5, backend).sum()

    compiled = torch.compile(lambda x: f(x, "cpu"), fullgraph=True)
    x = _vectors(2, d, torch.float32, 33).requires_grad_()
    out = compiled(x)
    out.backward()
    xr = x.detach().clone().requires_grad_()
    want = f(xr, "torch")
    want.backward()
    assert_close(out, want, torch.float32, "compiled value")
    assert_close(x.grad, xr.grad, torch.float32, "compiled grad")


# ---- bad input ----------------------------------------------------------------------------------------------

def _bad_cases():
    G = _vectors(3, 10, torch.float32, 34)
    x = _vectors(1, 10, torch.float32, 35)
    gram = torch.eye(3, dtype=torch.float64)
    return [
        ("G not a tensor", lambda: ops.dots(G.tolist(), x), TypeError, "G must be a torch.Tensor"),
        ("G 1-D", lambda: ops.dots(G[0], x), ValueError, "G must be 2-D"),
        ("G float16", lambda: ops.dots(G.half(), x), TypeError, "G must be float32, bfloat16 or float64"),
        ("G int", lambda: ops.dots(G.int(), x), TypeError, "G must be"),
        ("x wrong d", lambda: ops.dots(G, x[:, :9]), ValueError, "x has 9 entries per vector"),
        ("x 3-D", lambda: ops.dots(G, x[None]), ValueError, "x must be 1-D"),
        ("block 0", lambda: ops.dots(G, x, 0), ValueError, "block_size must be >= 1"),
        ("block float", lambda: ops.dots(G, x, 2.5), TypeError, "block_size must be an int"),
        ("c shape", lambda: ops.combine(G, torch.zeros(1, 2, 3, dtype=torch.float64)), ValueError, "c must be"),
        ("combine x count", lambda: ops.combine(G, torch.zeros(2, 1, 3, dtype=torch.float64), x), ValueError,
         "x has 1 vectors but c has 2"),
        ("alpha nan", lambda: ops.combine(G, torch.zeros(1, 1, 3, dtype=torch.float64), x, float("nan")),
         ValueError, "alpha must be a finite float"),
        ("diag beta", lambda: ops.diag(G, 1.0, float("inf")), ValueError, "beta must be a finite float"),
        ("setup m = 0", lambda: ops.static_setup(G[:0], 0.1), ValueError, "m = 0"),
        ("setup damp 0", lambda: ops.static_setup(G, 0.0), ValueError, "damp must be finite and > 0"),
        ("setup damp str", lambda: ops.static_setup(G, "1"), TypeError, "damp must be a float"),
        ("setup nan", lambda: ops.static_setup(torch.full((2, 3), float("nan")), 0.1), ValueError, "non-finite"),
        ("rebuild dtype", lambda: ops.window_rebuild(gram.float(), 0.1), TypeError, "gram must be float64"),
        ("rebuild square", lambda: ops.window_rebuild(gram[:2], 0.1), ValueError, "square"),
        ("rebuild damp", lambda: ops.window_rebuild(gram, -1.0), ValueError, "damp must be finite and > 0"),
        ("coef q", lambda: ops.window_coef(gram, torch.zeros(4, dtype=torch.float64)), ValueError, "q must be"),
        ("window m = 0", lambda: SlidingWindowIHVP(10, 0, 1e-3), ValueError, "m (the number of gradients) must be >= 1"),
        ("window d = 0", lambda: SlidingWindowIHVP(0, 4, 1e-3), ValueError, "d (the gradient size) must be >= 1"),
        ("window damp", lambda: SlidingWindowIHVP(10, 4, 0.0), ValueError, "damp must be finite and > 0"),
        ("window dtype", lambda: SlidingWindowIHVP(10, 4, 1e-3, dtype=torch.float16), TypeError, "dtype must be"),
        ("window refresh", lambda: SlidingWindowIHVP(10, 4, 1e-3, refresh=-1), ValueError, "refresh must be"),
        ("window g size", lambda: SlidingWindowIHVP(10, 4, 1e-3).update(torch.zeros(9)), ValueError,
         "g has 9 entries per vector, the buffer has d = 10"),
        ("window g 2-D", lambda: SlidingWindowIHVP(10, 4, 1e-3).update(torch.zeros(2, 10)), ValueError,
         "g must be 1-D"),
        ("window mul size", lambda: SlidingWindowIHVP(10, 4, 1e-3).mul(torch.zeros(11)), ValueError, "v has 11"),
        ("static m = 0", lambda: StaticIHVP(G[:0], 1e-3), ValueError, "m = 0"),
        ("static d = 0", lambda: StaticIHVP(G[:, :0], 1e-3), ValueError, "d = 0"),
        ("static damp", lambda: StaticIHVP(G, float("nan")), ValueError, "damp must be finite and > 0"),
        ("static block", lambda: StaticIHVP(G, 1e-3, block_size=0), ValueError, "block_size must be >= 1"),
        ("static diag idx", lambda: StaticIHVP(G, 1e-3).diag(torch.tensor([10])), ValueError, r"\[0, 10\)"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_mfac_bad_input(case):
    name, thunk, exc, text = case
    with pytest.raises(exc) as info:
        thunk()
    assert text in str(info.value) or __import__("re").search(text, str(info.value)), str(info.value)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mfac_nan_gradient_rejected_window_unchanged(backend):
    w = SlidingWindowIHVP(20, 3, 1e-3, backend=backend)
    for s in range(4):
        w.update(_vectors(1, 20, torch.float32, 600 + s)[0])
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in w.state_dict().items()}
    for bad in (float("nan"), float("inf"), -float("inf")):
        g = _vectors(1, 20, torch.float32, 700)[0]
        g[7] = bad
        with pytest.raises(ValueError, match="non-finite"):
            w.update(g)
        with pytest.raises(ValueError, match="non-finite"):
            w.update_mul(g)
    for k, v in w.state_dict().items():
        assert (torch.equal(v, state[k]) if isinstance(v, torch.Tensor) else v == state[k]), k


def test_mfac_window_state_dict_round_trip():
    w = SlidingWindowIHVP(33, 4, 1e-3, backend="cpu")
    for s in range(6):
        w.update(_vectors(1, 33, torch.float32, 800 + s)[0])
    w2 = SlidingWindowIHVP(33, 4, 1e-3, backend="cpu")
    w2.load_state_dict(w.state_dict())
    for s in range(5):
        g = _vectors(1, 33, torch.float32, 900 + s)[0]
        assert torch.equal(w.update_mul(g), w2.update_mul(g))
    with pytest.raises(ValueError, match="d = 33"):
        SlidingWindowIHVP(34, 4, 1e-3).load_state_dict(w.state_dict())
    assert "filled=4/4" in repr(w)


def test_mfac_empty_sizes_are_fine():
    G = torch.zeros(0, 5)
    assert ops.dots(G, torch.zeros(2, 5)).shape == (2, 1, 0)
    assert ops.combine(torch.zeros(3, 0), torch.zeros(1, 0, 3, dtype=torch.float64)).shape == (1, 0)
    assert ops.diag(torch.zeros(0, 4), 2.0, 1.0).tolist() == [2.0] * 4
    assert math.isclose(float(StaticIHVP(torch.zeros(2, 3), 0.5).diag()[0]), 2.0)
