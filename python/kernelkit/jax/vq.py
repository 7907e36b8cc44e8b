"""vq for JAX: ``vq_linear`` on kk_vq_linear_{fwd,bwd}_{cpu,cuda} (custom_vjp), the JAX form of
``kernelkit.vq.vq_linear``.

Format (csrc/include/kernelkit/vq.h): W (n_out, n_in) in groups of d inputs, M additive codebooks of K
codewords, output rows in sets of ``rows_per_codebook`` sharing one set of codebooks:

    codes      (n_out, G, M)   uint8 (K <= 256), or int16 / uint16 read as unsigned (K <= 65536)
    codebooks  (S, M, K, d)    S = ceil(n_out / rows_per_codebook); (M, K, d) for S = 1
    scales     (n_out,) or None (AQLM's (n_out, 1, 1, 1) is accepted too)
    W[o, g*d + t] = scales[o] * sum_m codebooks[o // rows_per_codebook, m, codes[o, g, m], t]

The kk_vq_format is built in the handler from the shapes and the static ``rows_per_codebook``.
Codes: the CPU kernels check every code against K on each call (a traced array cannot be checked once
beforehand, as the torch op does) and a bad code fails the call at run time with the C library's
message (row, group, codebook, value).  The CUDA kernels trust the codes: check them on the host with
:func:`check_codes` first.  Gradients (first order) reach x, the codebooks, the scales and the bias.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ._common import FLOATS, call, check_array, check_float, spec

PATHS = {"auto": 0, "gemv": 1, "gemm": 2}
GROUP_SIZES = (1, 2, 4, 8, 16)
MAX_CODEBOOKS = 16
_CODE_DTYPES = {np.dtype(np.uint8): 8, np.dtype(np.int16): 16, np.dtype(np.uint16): 16}


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _vq(x2, codes, codebooks, scales, bias, rows_per_codebook, path):
    return call("kernelkit_vq_linear_fwd", spec((x2.shape[0], codes.shape[0]), x2.dtype), x2, codes, codebooks,
                scales, bias, rows_per_codebook=np.int64(rows_per_codebook), path=np.int32(path))


def _fwd(x2, codes, codebooks, scales, bias, rows_per_codebook, path):
    return _vq(x2, codes, codebooks, scales, bias, rows_per_codebook, path), (x2, codes, codebooks, scales, bias)


def _bwd(rows_per_codebook, path, res, g):
    x2, codes, codebooks, scales, bias = res
    outs = (spec(x2.shape, x2.dtype), spec(codebooks.shape, codebooks.dtype), spec(scales.shape, scales.dtype))
    dx, dcb, ds = call("kernelkit_vq_linear_bwd", outs, x2, codes, codebooks, scales, g,
                       rows_per_codebook=np.int64(rows_per_codebook))
    db = g.sum(0) if bias.shape[0] else jnp.zeros_like(bias)  # scales / bias of shape (0,): none
    return dx, None, dcb, ds, db


_vq.defvjp(_fwd, _bwd)


def _check_format(codes, codebooks, scales, rows_per_codebook, fn: str):
    """(codes (n_out, G, M), codebooks (S, M, K, d), scales (n_out,) | None, rows_per_codebook), checked
    as kernelkit.vq's _check_format does."""
    check_array(codes, "codes", fn)
    if np.dtype(codes.dtype) not in _CODE_DTYPES:
        raise TypeError(f"{fn}: codes must be uint8 (K <= 256) or int16 / uint16 (K <= 65536, read as unsigned), "
                        f"got {np.dtype(codes.dtype).name}")
    if codes.ndim == 2:
        codes = codes[:, :, None]  # (n_out, G): one codebook
    if codes.ndim != 3:
        raise ValueError(f"{fn}: codes must be (n_out, n_in / d, M) (or (n_out, n_in / d) for M = 1), "
                         f"got shape {tuple(codes.shape)}")
    check_array(codebooks, "codebooks", fn, dtypes=FLOATS)
    if codebooks.ndim == 3:
        codebooks = codebooks[None]
    if codebooks.ndim != 4:
        raise ValueError(f"{fn}: codebooks must be (M, K, d) or (S, M, K, d), got shape {tuple(codebooks.shape)}")
    S, M, K, d = codebooks.shape
    n_out, G, Mc = codes.shape
    if d not in GROUP_SIZES:
        raise ValueError(f"{fn}: the codebooks' group size d = codebooks.shape[-1] must be one of {GROUP_SIZES}, "
                         f"got {d}")
    if not 1 <= M <= MAX_CODEBOOKS:
        raise ValueError(f"{fn}: the number of codebooks M must be in [1, {MAX_CODEBOOKS}], got {M}")
    if Mc != M:
        raise ValueError(f"{fn}: codes has {Mc} code(s) per group (codes.shape[2]) but codebooks has M = {M}")
    limit = 1 << _CODE_DTYPES[np.dtype(codes.dtype)]
    if not 1 <= K <= limit:
        raise ValueError(f"{fn}: codebook size K = {K} does not fit {np.dtype(codes.dtype).name} codes "
                         f"(1 <= K <= {limit}); use int16 codes for K > 256")
    if S < 1:
        raise ValueError(f"{fn}: codebooks must hold at least one set (codebooks.shape[0] >= 1)")
    if rows_per_codebook is None:
        rows_per_codebook = -(-n_out // S) if n_out else 1
    if not isinstance(rows_per_codebook, (int, np.integer)) or isinstance(rows_per_codebook, (bool, np.bool_)) \
            or rows_per_codebook < 1:
        raise ValueError(f"{fn}: rows_per_codebook must be an int >= 1, got {rows_per_codebook!r}")
    rows_per_codebook = int(rows_per_codebook)
    if max(1, -(-n_out // rows_per_codebook)) != S:
        raise ValueError(f"{fn}: codebooks has {S} set(s) (codebooks.shape[0]) but n_out = {n_out} rows in sets of "
                         f"rows_per_codebook = {rows_per_codebook} need {max(1, -(-n_out // rows_per_codebook))}")
    if scales is not None:
        check_array(scales, "scales", fn, dtypes=FLOATS)
        if scales.size != n_out or (scales.ndim > 1 and scales.shape[0] != n_out) or scales.ndim == 0:
            raise ValueError(f"{fn}: scales must have n_out = {n_out} entries ((n_out,) or AQLM's (n_out, 1, 1, 1)), "
                             f"got shape {tuple(scales.shape)}")
        scales = scales.reshape(n_out)
    return codes, codebooks, scales, rows_per_codebook


def vq_linear(x, codes, codebooks, scales=None, bias=None, *, rows_per_codebook=None, path: str = "auto"):
    """``x W^T + bias`` with W given by its codes (module docstring), never dense, in JAX.

    Args:
        x: ``(..., n_in)`` (cpu: float32/float64, cuda: float32/float16/bfloat16).
        codes: ``(n_out, n_in/d, M)`` or ``(n_out, n_in/d)``: uint8, int16 or uint16.
        codebooks: ``(S, M, K, d)`` or ``(M, K, d)``, any float dtype (cast to x's dtype, as are scales
            and bias).
        scales: ``(n_out,)`` or None; bias: ``(n_out,)`` or None.
        rows_per_codebook: rows sharing one set of codebooks (default: ceil(n_out / S)).
        path: "auto", "gemv" or "gemm" (the C library's choice of kernel; the same result).
    Returns:
        ``(..., n_out)`` in x's dtype.  Differentiable in x, codebooks, scales and bias (``jax.grad``);
        works under ``jax.jit`` and ``jax.vmap`` (any of them batched, codes included).
    Raises:
        TypeError / ValueError naming the argument, at trace time.
    """
    fn = "vq_linear"
    check_array(x, "x", fn, min_ndim=1)
    codes, codebooks, scales, rpc = _check_format(codes, codebooks, scales, rows_per_codebook, fn)
    check_float(fn, "x", x)
    n_out, G, _ = codes.shape
    d = codebooks.shape[3]
    if x.shape[-1] != G * d:
        raise ValueError(f"{fn}: x has {x.shape[-1]} features (x.shape[-1]) but the codes describe n_in = "
                         f"{G} groups x d = {d} = {G * d}")
    if bias is not None:
        check_array(bias, "bias", fn, ndim=1, dtypes=FLOATS)
        if bias.shape[0] != n_out:
            raise ValueError(f"{fn}: bias must have n_out = {n_out} entries, got shape {tuple(bias.shape)}")
    if not isinstance(path, str) or path not in PATHS:
        raise ValueError(f"{fn}: path must be one of {', '.join(map(repr, PATHS))}, got {path!r}")
    lead = x.shape[:-1]
    if n_out == 0:  # no output column (the C format has no set of codebooks then): nothing to run
        return jnp.zeros((*lead, 0), x.dtype)
    dt = x.dtype
    codebooks = codebooks.astype(dt)
    s = jnp.zeros((0,), dt) if scales is None else scales.astype(dt)
    b = jnp.zeros((0,), dt) if bias is None else bias.astype(dt)
    out = _vq(x.reshape(math.prod(lead), G * d), codes, codebooks, s, b, rpc, PATHS[path])
    return out.reshape(*lead, n_out)


def check_codes(codes, K: int) -> None:
    """ValueError naming the first code >= K (read as unsigned), on the host: what the CPU kernels check
    on every call and the CUDA kernels trust.  ``codes`` must be concrete (not traced)."""
    fn = "kernelkit.jax.vq.check_codes"
    check_array(codes, "codes", fn)
    if np.dtype(codes.dtype) not in _CODE_DTYPES:
        raise TypeError(f"{fn}: codes must be uint8, int16 or uint16, got {np.dtype(codes.dtype).name}")
    if isinstance(codes, jax.core.Tracer):
        raise TypeError(f"{fn}: codes must be concrete (call it outside jax.jit)")
    c = np.asarray(codes)
    u = c.astype(np.int64) & 0xFFFF if c.dtype != np.uint8 else c.astype(np.int64)
    bad = u >= K
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{fn}: codes{list(pos)} = {int(u[pos])} (as an unsigned {_CODE_DTYPES[c.dtype]}-bit code) "
                         f"is out of range for a codebook of K = {K} codewords")
