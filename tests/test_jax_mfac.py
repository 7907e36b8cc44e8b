"""kernelkit.jax.mfac (XLA FFI custom calls on kk_mfac_{dots,combine,static_setup}_cpu) against the torch path
on the same inputs and against the float64 reference: the static IHVP (``ihvp`` = StaticIHVP(G, damp,
block).mul) under jax.jit in both static forms (W: m <= block, E: m > block), float32 / bfloat16 / float64
buffers, odd sizes, no vectors; the raw dots / combine (float64 q / c, JAX's 64-bit mode); jax.vmap over
several vectors against a loop; the custom_vjp gradients against torch autograd; bad arguments raising
errors that name them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
pytest.importorskip("kernelkit.jax", reason="kernelkit built without its JAX module")

import kernelkit.mfac as tm  # noqa: E402
from kernelkit.jax import mfac as jm  # noqa: E402
from kernelkit.mfac import reference as R  # noqa: E402

from helpers import TOL, rel_err  # noqa: E402

DAMP = 0.05
D = 37  # odd: the last block is short
CASES = [(5, None), (6, 8), (3, 8)]  # (m, block): one block; E form (m > block); W form per block


def _t(a):
    return torch.from_numpy(np.array(a))


def _data(m, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((m, D)).astype(dtype)
    V = rng.standard_normal((n, D)).astype(dtype)
    return G, V


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_ihvp_matches_torch_and_reference(case, dtype):
    m, block = CASES[case]
    G, V = _data(m, 4, dtype, seed=case)
    with jax.enable_x64(dtype == "float64"):
        out = np.array(jax.jit(lambda G, V: jm.ihvp(G, V, DAMP, block))(G, V))
        one = np.array(jm.ihvp(G, V[1], DAMP, block))
    assert out.dtype == np.dtype(dtype) and out.shape == V.shape and one.shape == (D,)
    t = tm.StaticIHVP(_t(G), DAMP, block, backend="cpu").mul(_t(V))
    # the same kernels in the same order: the torch path's result
    assert rel_err(_t(out), t) <= TOL[getattr(torch, dtype)]
    assert rel_err(_t(one), t[1]) <= TOL[getattr(torch, dtype)]
    # the float64 reference: the explicit (block-diagonal) inverse of the damped Fisher
    ref = R.ihvp_explicit(_t(G).double(), DAMP, _t(V).double(), block)
    tol = 1e-4 if dtype == "float32" else 1e-10  # the inverse amplifies rounding by cond(F) = O(|G|^2 / damp)
    assert rel_err(_t(out), ref) <= tol


def test_ihvp_bfloat16_buffer_and_no_vectors():
    G, V = _data(5, 3, "float32", seed=3)
    Gb = jnp.asarray(G).astype(jnp.bfloat16)
    out = np.array(jax.jit(lambda G, V: jm.ihvp(G, V, DAMP, 8))(Gb, V))
    assert out.dtype == np.float32
    t = tm.StaticIHVP(_t(G).to(torch.bfloat16), DAMP, 8, backend="cpu").mul(_t(V))
    assert rel_err(_t(out), t) <= 1e-5
    empty = jm.ihvp(G, jnp.zeros((0, D), jnp.float32), DAMP)
    assert empty.shape == (0, D)


@pytest.mark.parametrize("block", [None, 8])
def test_dots_combine_match_torch_x64(block):
    G, V = _data(5, 3, "float64", seed=4)
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        q = np.array(jax.jit(lambda G, V: jm.dots(G, V, block))(G, V))
        nb = 1 if block is None else -(-D // block)
        c = rng.standard_normal((3, nb, 5))
        o = np.array(jax.jit(lambda G, c, V: jm.combine(G, c, V, 0.5, block))(G, c, V))
        o0 = np.array(jm.combine(G, c, None, 0.0, block))
        Z = np.array(jm.static_setup(G, DAMP, block))
    bs = D if block is None else block
    assert q.dtype == np.float64 and q.shape == (3, nb, 5)
    assert rel_err(_t(q), tm.dots(_t(G), _t(V), block, backend="cpu").reshape(3, nb, 5)) <= 1e-12
    assert rel_err(_t(q), R.dots_reference(_t(G), _t(V), bs)) <= 1e-12
    assert rel_err(_t(o), tm.combine(_t(G), _t(c), _t(V), 0.5, block, backend="cpu")) <= 1e-12
    assert rel_err(_t(o), R.combine_reference(_t(G), _t(c), _t(V), 0.5, bs, torch.float64)) <= 1e-12
    assert rel_err(_t(o0), R.combine_reference(_t(G), _t(c), None, 0.0, bs, torch.float64)) <= 1e-12
    assert rel_err(_t(Z), tm.static_setup(_t(G), DAMP, block, backend="cpu")) <= 1e-12


def test_vmap_over_vectors_equals_a_loop():
    G, V = _data(6, 5, "float32", seed=6)
    out = np.array(jax.jit(jax.vmap(lambda v: jm.ihvp(G, v, DAMP, 8)))(V))
    Gs = np.stack([G * (1 + 0.1 * i) for i in range(3)]).astype(np.float32)  # a batch of buffers too
    outg = np.array(jax.jit(jax.vmap(lambda g: jm.ihvp(g, V, DAMP)))(Gs))
    for i in range(5):
        assert rel_err(_t(out[i]), tm.StaticIHVP(_t(G), DAMP, 8, backend="cpu").mul(_t(V[i]))) <= 1e-6, i
    for i in range(3):
        assert rel_err(_t(outg[i]), tm.StaticIHVP(_t(Gs[i]), DAMP, backend="cpu").mul(_t(V))) <= 1e-6, i


def test_grads_match_torch_autograd():
    G, V = _data(6, 3, "float64", seed=7)
    rng = np.random.default_rng(8)
    gout = rng.standard_normal(V.shape)
    with jax.enable_x64(True):
        gv = np.array(jax.jit(jax.grad(lambda v: (jm.ihvp(G, v, DAMP, 8) * gout).sum()))(V))
        Z = jm.static_setup(G, DAMP, 8)
        a, b = jm.static_coefficients(6, D, 8, DAMP)
        gZ, gV2 = jax.jit(jax.grad(lambda Z, v: (jm.static_mul(Z, v, a, b, 8) * gout).sum(), (0, 1)))(Z, V)
        c = rng.standard_normal((3, 5, 6))
        gG, gx = jax.grad(lambda G, x: (jm.dots(G, x, 8) * c).sum(), (0, 1))(G, V)
        gG2, gc = jax.grad(lambda G, c: (jm.combine(G, c, V, 0.5, 8) * gout).sum(), (0, 1))(G, c)
    # torch: StaticIHVP.mul (v only; G detached) and the ops' autograd on the factor
    tv = _t(V).requires_grad_(True)
    (tm.StaticIHVP(_t(G), DAMP, 8, backend="cpu").mul(tv) * _t(gout)).sum().backward()
    assert rel_err(_t(gv), tv.grad) <= 1e-12 and rel_err(_t(gV2), tv.grad) <= 1e-12
    tZ, tv2 = _t(Z).requires_grad_(True), _t(V).requires_grad_(True)
    q = tm.dots(tZ, tv2, 8, backend="cpu")
    (tm.combine(tZ, b * q, tv2, a, 8, backend="cpu") * _t(gout)).sum().backward()
    assert rel_err(_t(gZ), tZ.grad) <= 1e-12
    tG, tx = _t(G).requires_grad_(True), _t(V).requires_grad_(True)
    (tm.dots(tG, tx, 8, backend="cpu") * _t(c)).sum().backward()
    assert rel_err(_t(gG), tG.grad) <= 1e-12 and rel_err(_t(gx), tx.grad) <= 1e-12
    tG, tc = _t(G).requires_grad_(True), _t(c).requires_grad_(True)
    (tm.combine(tG, tc, _t(V), 0.5, 8, backend="cpu") * _t(gout)).sum().backward()
    assert rel_err(_t(gG2), tG.grad) <= 1e-12 and rel_err(_t(gc), tc.grad) <= 1e-12


def test_check_grads_float64_and_setup_not_differentiable():
    from jax.test_util import check_grads
    G, V = _data(3, 2, "float64", seed=9)
    with jax.enable_x64(True):
        Z = jm.static_setup(G, DAMP, 8)
        check_grads(jax.jit(lambda Z, v: jm.static_mul(Z, v, 1 / DAMP, -1 / DAMP, 8)), (Z, jnp.asarray(V)),
                    order=1, modes=("rev",), atol=1e-6, rtol=1e-6)
        with pytest.raises(TypeError, match="not differentiable"):
            jax.grad(lambda G: jm.static_setup(G, DAMP).sum())(jnp.asarray(G))
        # ihvp holds G constant (as StaticIHVP detaches it)
        assert not np.any(np.array(jax.grad(lambda G: jm.ihvp(G, V, DAMP).sum())(jnp.asarray(G))))


def test_bad_arguments_name_themselves():
    G, V = _data(4, 2, "float32")
    with pytest.raises(ValueError, match="G must have 2 dimensions"):
        jm.ihvp(G[0], V, DAMP)
    with pytest.raises(TypeError, match="G must be float32, bfloat16 or float64"):
        jm.ihvp(G.astype(np.float16), V, DAMP)
    with pytest.raises(ValueError, match="v has 36 entries per vector"):
        jm.ihvp(G, V[:, 1:], DAMP)
    with pytest.raises(ValueError, match="damp must be finite and > 0"):
        jm.ihvp(G, V, 0.0)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        jm.ihvp(G, V, DAMP, 0)
    with pytest.raises(ValueError, match="G has no gradient"):
        jm.ihvp(G[:0], V, DAMP)
    with pytest.raises(RuntimeError, match="jax_enable_x64"):
        jm.dots(G, V)
    with jax.enable_x64(True):
        with pytest.raises(ValueError, match="c must be"):
            jm.combine(G, np.zeros((2, 1, 3)), V)
        with pytest.raises(ValueError, match="x has 2 vectors but c has 1"):
            jm.combine(G, np.zeros((1, 1, 4)), V)
