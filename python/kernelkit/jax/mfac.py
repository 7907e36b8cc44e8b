"""mfac for JAX: the M-FAC kernels on kk_mfac_{dots,combine,static_setup}_{cpu,cuda} and the static
inverse-Fisher-vector product.

:func:`ihvp` computes F^-1 v for the damped empirical Fisher F = damp I + (1/m) sum_i g_i g_i^T of a
fixed gradient buffer G (m, d), the way ``kernelkit.mfac.StaticIHVP(G, damp, block_size).mul(v)`` does:
the static factor Z (kk_mfac_static_setup), then q = Z v (kk_mfac_dots), c = beta q, out = alpha v + Z^T c
(kk_mfac_combine).  :func:`static_mul` runs those three steps in one custom call with q and c in float64
handler scratch, so it works without ``jax_enable_x64``; its result equals the torch path's.

:func:`dots` and :func:`combine` are the raw kernels; their q / c are float64 (as in the C ABI), so they
need ``jax.config.update("jax_enable_x64", True)`` (or ``with jax.enable_x64(True):``) and raise a
RuntimeError saying so otherwise.

Dtypes: the buffer G / Z is float32, bfloat16 or float64; vectors are float32 (float64 with a float64
buffer); other vector dtypes are converted, as the torch functions do.  Differentiation mirrors the torch
ops: dots and combine have their exact vjps (in x / c and in G); static_mul in v and Z; static_setup is not
differentiable (its vjp raises, as kernelkit::mfac_static_setup's backward does); :func:`ihvp` treats G as
a constant (StaticIHVP detaches it), so its gradient flows to v only.  Everything works under jax.jit and
jax.vmap (e.g. over several vectors: ``jax.vmap(lambda v: ihvp(G, v, damp))(V)``).
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from kernelkit.mfac.reference import nblocks, static_rows  # noqa: F401  (the torch side's rules)

from . import _common
from ._common import call, check_array, spec

BUFFER_DTYPES = (np.dtype("float32"), np.dtype(jnp.bfloat16), np.dtype("float64"))


def vector_dtype(gdtype):
    """float64 vectors with a float64 buffer, float32 otherwise."""
    return jnp.float64 if np.dtype(gdtype) == np.dtype("float64") else jnp.float32


def static_coefficients(m: int, d: int, block: int, damp: float) -> tuple[float, float]:
    """(alpha, beta) of F_b^-1 = alpha I + beta Z_b^T Z_b for the form (m, d, block) selects."""
    if m <= min(block, d):
        return 1.0 / damp, -1.0 / damp
    return 0.0, float(m)


# ---- checks ------------------------------------------------------------------------------------------
def _buffer(G, name: str, fn: str):
    check_array(G, name, fn, ndim=2)
    if np.dtype(G.dtype) not in BUFFER_DTYPES:
        raise TypeError(f"{fn}: {name} must be float32, bfloat16 or float64, got {np.dtype(G.dtype).name}")
    _common.check_platform(fn)
    return G


def _block(block, d: int, fn: str) -> int:
    if block is None:
        return max(d, 1)
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)):
        raise TypeError(f"{fn}: block_size must be an int or None, got {type(block).__name__}")
    if block < 1:
        raise ValueError(f"{fn}: block_size must be >= 1, got {block}")
    return int(block)


def _damp(damp, fn: str) -> float:
    if isinstance(damp, bool) or not isinstance(damp, (int, float, np.floating, np.integer)):
        raise TypeError(f"{fn}: damp must be a float, got {type(damp).__name__}")
    damp = float(damp)
    if not (math.isfinite(damp) and damp > 0):
        raise ValueError(f"{fn}: damp must be finite and > 0, got {damp}")
    return damp


def _vectors(x, d: int, vdt, name: str, fn: str):
    """(n, d) rows of the vector dtype; returns (rows, was_1d)."""
    check_array(x, name, fn)
    if x.ndim not in (1, 2):
        raise ValueError(f"{fn}: {name} must be 1-D (d,) or 2-D (n, d), got shape {tuple(x.shape)}")
    if x.shape[-1] != d:
        raise ValueError(f"{fn}: {name} has {x.shape[-1]} entries per vector, the buffer has d = {d}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{fn}: {name} must be a float array, got {np.dtype(x.dtype).name}")
    one = x.ndim == 1
    return (x.reshape(1, d) if one else x).astype(vdt), one


def _need_x64(fn: str) -> None:
    if jax.dtypes.canonicalize_dtype(jnp.float64) != np.dtype("float64"):
        raise RuntimeError(f"{fn}: q and c are float64 (as in the C ABI), which needs JAX's 64-bit mode: "
                           "jax.config.update('jax_enable_x64', True) or `with jax.enable_x64(True):` "
                           "(kernelkit.jax.mfac.ihvp / static_mul work without it)")


def _blocked(t, block: int):
    """(..., d) -> (..., nblocks, block), zero padded."""
    d = t.shape[-1]
    nb = nblocks(d, block)
    pad = nb * block - d
    if pad:
        t = jnp.pad(t, [(0, 0)] * (t.ndim - 1) + [(0, pad)])
    return t.reshape(*t.shape[:-1], nb, block)


def _outer_blocks(c, x, block: int, d: int, dtype):
    """sum_v c[v, b(j), i] x[v, j] as (r, d): the buffer gradient of dots / combine."""
    xb = _blocked(x.astype(c.dtype), block)                    # (n, nb, block)
    out = jnp.einsum("vbi,vbk->ibk", c, xb)                    # (r, nb, block)
    return out.reshape(out.shape[0], -1)[:, :d].astype(dtype)


# ---- raw custom calls ----------------------------------------------------------------------------------
def _dots_call(G, x, block):
    r, d = G.shape
    return call("kernelkit_mfac_dots", spec((x.shape[0], nblocks(d, block), r), jnp.float64), G, x,
                block=np.int64(block))


def _combine_call(G, c, x, alpha, block):
    r, d = G.shape
    has_x = x is not None
    xx = x if has_x else jnp.zeros((c.shape[0], d), vector_dtype(G.dtype))
    return call("kernelkit_mfac_combine", spec((c.shape[0], d), vector_dtype(G.dtype)), G, c, xx,
                block=np.int64(block), alpha=np.float64(alpha), has_x=np.int32(has_x))


# ---- dots / combine with their vjps -------------------------------------------------------------------
@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dots(G, x, block):
    return _dots_call(G, x, block)


def _dots_fwd(G, x, block):
    return _dots_call(G, x, block), (G, x)


def _dots_bwd(block, res, dq):
    G, x = res
    dx = _combine_call(G, dq, None, 0.0, block).astype(x.dtype)
    dG = _outer_blocks(dq, x, block, G.shape[1], G.dtype)
    return dG, dx


_dots.defvjp(_dots_fwd, _dots_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _combine(G, c, x, alpha, block):
    return _combine_call(G, c, x, alpha, block)


def _combine_fwd(G, c, x, alpha, block):
    return _combine_call(G, c, x, alpha, block), (G, c, x)


def _combine_bwd(alpha, block, res, dout):
    G, c, x = res
    dc = _dots_call(G, dout.astype(vector_dtype(G.dtype)), block)
    dx = None if x is None else (alpha * dout).astype(x.dtype)
    dG = _outer_blocks(c, dout, block, G.shape[1], G.dtype)
    return dG, dc, dx


_combine.defvjp(_combine_fwd, _combine_bwd)


def dots(G, x, block_size: int | None = None):
    """q = G x per block of ``block_size`` coordinates: (n, nblocks, r) float64 for x (n, d); for a 1-D x
    and one block, (r,) (``kernelkit.mfac.dots``).  Needs JAX's 64-bit mode."""
    fn = "kernelkit.jax.mfac.dots"
    G = _buffer(G, "G", fn)
    _need_x64(fn)
    r, d = G.shape
    block = _block(block_size, d, fn)
    xs, one = _vectors(x, d, vector_dtype(G.dtype), "x", fn)
    q = _dots(G, xs, block)
    return q.reshape(-1) if (one and nblocks(d, block) == 1) else q


def combine(G, c, x=None, alpha: float = 0.0, block_size: int | None = None):
    """out = alpha x + G^T c per block (``kernelkit.mfac.combine``); c (n, nblocks, r) float64, or (r,)
    for one vector and one block (then out is (d,)).  Needs JAX's 64-bit mode."""
    fn = "kernelkit.jax.mfac.combine"
    G = _buffer(G, "G", fn)
    _need_x64(fn)
    r, d = G.shape
    block = _block(block_size, d, fn)
    nb = nblocks(d, block)
    check_array(c, "c", fn)
    one = c.ndim == 1
    c3 = c.reshape(1, 1, -1) if one else c
    if c3.ndim != 3 or tuple(c3.shape[1:]) != (nb, r):
        raise ValueError(f"{fn}: c must be (n, nblocks, r) = (n, {nb}, {r}) (or ({r},) with one block), got "
                         f"shape {tuple(c.shape)}")
    c3 = c3.astype(jnp.float64)
    xs = None
    if x is not None:
        xs, _ = _vectors(x, d, vector_dtype(G.dtype), "x", fn)
        if xs.shape[0] != c3.shape[0]:
            raise ValueError(f"{fn}: x has {xs.shape[0]} vectors but c has {c3.shape[0]}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not math.isfinite(alpha):
        raise ValueError(f"{fn}: alpha must be a finite float, got {alpha!r}")
    out = _combine(G, c3, xs, float(alpha), block)
    return out.reshape(d) if one else out


# ---- the static algorithm ------------------------------------------------------------------------------
@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _setup(G, damp, block):
    m, d = G.shape
    return call("kernelkit_mfac_static_setup", spec((static_rows(m, d, block), d), vector_dtype(G.dtype)), G,
                damp=np.float64(damp), block=np.int64(block))


def _setup_fwd(G, damp, block):
    return _setup(G, damp, block), None


def _setup_bwd(damp, block, res, dZ):
    raise TypeError("kernelkit.jax.mfac.static_setup is not differentiable (the factor of a Fisher estimate); "
                    "apply jax.lax.stop_gradient to the gradients G (kernelkit.jax.mfac.ihvp does)")


_setup.defvjp(_setup_fwd, _setup_bwd)


def static_setup(G, damp: float, block_size: int | None = None):
    """The static factor Z (r, d) of the damped empirical Fisher of G's rows (``kernelkit.mfac.static_setup``;
    forms in csrc/include/kernelkit/mfac.h).  A G that is not finite or a damp far too small for its scale
    makes the C call fail with an XLA error carrying kk_last_error()."""
    fn = "kernelkit.jax.mfac.static_setup"
    G = _buffer(G, "G", fn)
    m, d = G.shape
    if m == 0:
        raise ValueError(f"{fn}: G has no gradient (m = 0)")
    if d == 0:
        raise ValueError(f"{fn}: G has no coordinate (d = 0)")
    return _setup(G, _damp(damp, fn), _block(block_size, d, fn))


def _mul_call(Z, x, alpha, beta, block):
    bits = jnp.asarray(np.array([beta], np.float64).view(np.uint32))
    return call("kernelkit_mfac_static_mul", spec(x.shape, x.dtype), Z, x, bits, block=np.int64(block),
                alpha=np.float64(alpha), beta=np.float64(beta))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _mul(Z, x, alpha, beta, block):
    return _mul_call(Z, x, alpha, beta, block)


def _mul_fwd(Z, x, alpha, beta, block):
    return _mul_call(Z, x, alpha, beta, block), (Z, x)


def _mul_bwd(alpha, beta, block, res, dout):
    Z, x = res
    dx = _mul_call(Z, dout.astype(x.dtype), alpha, beta, block)  # alpha I + beta Z^T Z is symmetric
    # out_v = alpha x_v + beta sum_b Z_b^T Z_b x_v: dZ_b = beta (Z_b x_v dout_v^T + Z_b dout_v x_v^T)
    Zb = _blocked(Z.astype(x.dtype), block)                     # (r, nb, block)
    xb, db = _blocked(x, block), _blocked(dout.astype(x.dtype), block)
    qx = jnp.einsum("ibk,vbk->vbi", Zb, xb)
    qd = jnp.einsum("ibk,vbk->vbi", Zb, db)
    dZ = beta * (_outer_blocks(qx, dout.astype(x.dtype), block, Z.shape[1], x.dtype)
                 + _outer_blocks(qd, x, block, Z.shape[1], x.dtype))
    return dZ.astype(Z.dtype), dx


_mul.defvjp(_mul_fwd, _mul_bwd)


def static_mul(Z, v, alpha: float, beta: float, block_size: int | None = None):
    """alpha v + beta Z_b^T Z_b v per block (F^-1 v with the static factor Z and its coefficients), for v
    (d,) or (n, d): one custom call (dots, c = beta q, combine), float64 q and c inside."""
    fn = "kernelkit.jax.mfac.static_mul"
    Z = _buffer(Z, "Z", fn)
    r, d = Z.shape
    block = _block(block_size, d, fn)
    for name, val in (("alpha", alpha), ("beta", beta)):
        if isinstance(val, bool) or not isinstance(val, (int, float, np.floating)) or not math.isfinite(val):
            raise ValueError(f"{fn}: {name} must be a finite float, got {val!r}")
    x, one = _vectors(v, d, vector_dtype(Z.dtype), "v", fn)
    out = _mul(Z, x, float(alpha), float(beta), block)
    return out.reshape(d) if one else out


def ihvp(G, v, damp: float, block_size: int | None = None):
    """F^-1 v for F = damp I + (1/m) sum_i g_i g_i^T over the rows of G (m, d), F taken block-diagonal over
    blocks of ``block_size`` coordinates when given: ``kernelkit.mfac.StaticIHVP(G, damp, block_size)
    .mul(v)``.  v (d,) or (n, d); returns the same shape in the vector dtype (float32; float64 with a
    float64 G).  Differentiable in v (G is held constant, as StaticIHVP detaches it)."""
    fn = "kernelkit.jax.mfac.ihvp"
    G = _buffer(G, "G", fn)
    m, d = G.shape
    damp = _damp(damp, fn)
    block = _block(block_size, d, fn)
    Z = static_setup(jax.lax.stop_gradient(G), damp, block)
    alpha, beta = static_coefficients(m, d, block, damp)
    return static_mul(Z, v, alpha, beta, block)
