"""monarch for JAX: ``monarch_matmul`` on kk_monarch_{fwd,bwd}_{cpu,cuda} (custom_vjp)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ._common import call, check_array, check_float, spec


@jax.custom_vjp
def _monarch(x2, w1, w2):
    l, s, _ = w2.shape
    return call("kernelkit_monarch_fwd", spec((x2.shape[0], l * s), x2.dtype), x2, w1, w2)


def _fwd(x2, w1, w2):
    return _monarch(x2, w1, w2), (x2, w1, w2)


def _bwd(res, g):
    x2, w1, w2 = res
    outs = (spec(x2.shape, x2.dtype), spec(w1.shape, w1.dtype), spec(w2.shape, w2.dtype))
    return tuple(call("kernelkit_monarch_bwd", outs, x2, w1, w2, g))


_monarch.defvjp(_fwd, _bwd)


def monarch_matmul(x, w1, w2):
    """The generalized Monarch product of ``kernelkit.monarch.monarch_matmul`` (fly layout), in JAX.

    Args:
        x: ``(..., k*p)``; w1: ``(k, q, p)``; w2: ``(l, s, r)`` with ``l*r == k*q``; one dtype
            (cpu: float32/float64, cuda: float32/float16/bfloat16).
    Returns:
        ``(..., l*s)``.  Differentiable in x, w1 and w2 (``jax.grad``, ``jax.vjp``); works under
        ``jax.jit`` and ``jax.vmap`` (any argument batched).
    Raises:
        TypeError / ValueError naming the argument, at trace time.
    """
    fn = "monarch_matmul"
    check_array(x, "x", fn, min_ndim=1)
    check_array(w1, "w1", fn, ndim=3)
    check_array(w2, "w2", fn, ndim=3)
    check_float(fn, "x", x, w1=w1, w2=w2)
    k, q, p = w1.shape
    l, s, r = w2.shape
    if 0 in w1.shape or 0 in w2.shape:
        raise ValueError(f"{fn}: w1 and w2 must have no empty dimension, got {tuple(w1.shape)} and {tuple(w2.shape)}")
    if l * r != k * q:
        raise ValueError(f"{fn}: w2.shape[0]*w2.shape[2] (= {l * r}) must equal w1.shape[0]*w1.shape[1] (= {k * q})")
    if x.shape[-1] != k * p:
        raise ValueError(f"{fn}: x.shape[-1] must equal w1.shape[0]*w1.shape[2] (= {k * p}), got x of shape "
                         f"{tuple(x.shape)}")
    rows = math.prod(x.shape[:-1])
    x, w1, w2 = (jnp.asarray(a) for a in (x, w1, w2))  # numpy inputs become JAX arrays (custom_vjp residuals)
    out = _monarch(x.reshape(rows, k * p), w1, w2)
    return out.reshape(*x.shape[:-1], l * s)
