"""Vector-quantized linear layer as torch.library custom ops (fake + autograd registered), backend dispatch.

    kernelkit::vq_linear_fwd(x, codes, codebooks, scales, bias, rows_per_codebook, path, backend) -> out
        out = x W^T + bias,  W[o, g*d + t] = scales[o] * sum_m codebooks[o // rows_per_codebook, m, codes[o, g, m], t]
    kernelkit::vq_linear_bwd(x, codes, codebooks, scales, dout, rows_per_codebook, backend,
                             need_dx, need_dcodebooks, need_dscales) -> (dx, dcodebooks, dscales)
        dx = dout W; dcodebooks = the weight gradient dout^T x (times the scale) summed over the entries
        of each codeword; dscales = rowsum(dout^T x * U).  Gradients not asked for come back empty.
    kernelkit::vq_dequantize(codes, codebooks, scales, rows_per_codebook, backend) -> W (n_out, n_in)
    kernelkit::vq_assign(vectors, centroids, topn, backend) -> (idx int32 (n, topn), dist (n, topn))
        the k-means assignment step: the topn nearest centroids, nearest first.

Shapes: x (B, n_in) with unit inner stride, codes (n_out, G, M) uint8 or int16 (read as unsigned),
codebooks (S, M, K, d) contiguous in x's dtype, scales / bias (n_out,) or None (csrc/include/kernelkit/vq.h).
``path`` is 0 (auto: by batch size), 1 (the GEMV path: lookup tables / codebooks on chip) or 2 (the
GEMM path: tiles of W dequantized into a blocked matmul).  Every code is checked against K before a
kernel reads through it; the check is remembered per codes tensor (address, version counter, shape),
so a layer pays it once, not per call.

The user-facing functions are :func:`vq_linear`, :func:`dequantize` and :func:`assign`: they validate
(naming the argument), flatten the batch, cast the codebooks, scales and bias to x's dtype and pick
the backend.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _checks, _lib

from .reference import assign_reference, dequantize_reference, reference_bwd, reference_fwd, unsigned_codes

_stream = _lib.stream
_ptr = _lib.ptr

_KK_DTYPE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_SUPPORTED = {
    "torch": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "cpu": (torch.float32, torch.float64),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}
_ASSIGN_SUPPORTED = {
    "torch": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "cpu": (torch.float32, torch.float64),
    "triton": (torch.float32,),
    "cuda": (torch.float32,),
}
PATHS = {"auto": 0, "gemv": 1, "gemm": 2}
GROUP_SIZES = (1, 2, 4, 8, 16)
MAX_CODEBOOKS = 16
MAX_TOPN = 8
CODES_CHECKED = 1  # KK_VQ_CODES_CHECKED
# The triton backend's choice for path "auto" (the C libraries choose for themselves).
TRITON_GEMV_MAX_BATCH = 16


def _supports(table, dtype: torch.dtype, device: torch.device | None = None):
    def check(name: str) -> str | None:
        ok = table[name]
        if name == "triton" and device is not None and device.type == "cpu":
            ok = ok + (torch.float64,)  # the interpreter runs float64 (gradcheck through the kernels)
        if dtype in ok:
            return None
        return f"dtype {dtype} not supported (it handles {', '.join(str(d).replace('torch.', '') for d in ok)})"
    return check


def _triton():
    from kernelkit.kernels import vq as tk  # imported lazily: triton is optional
    return tk


def code_bits(codes: Tensor) -> int:
    return 8 if codes.dtype == torch.uint8 else 16


def _fmt(codes: Tensor, codebooks: Tensor, rows_per_codebook: int) -> tuple:
    """The kk_vq_format fields, in struct order; the codes are checked (see check_codes)."""
    _, M, K, d = codebooks.shape
    return (codes.shape[0], codes.shape[1] * d, K, rows_per_codebook, d, M, code_bits(codes), CODES_CHECKED)


# ---- the code check, remembered on the codes tensor ------------------------------------------------
def _code_key(codes: Tensor, K: int):
    try:
        version = codes._version
    except RuntimeError:  # inference tensors have no version counter: check every time
        return None
    return (version, codes.data_ptr(), tuple(codes.shape), tuple(codes.stride()), K)


def check_codes(codes: Tensor, K: int, fn: str = "kernelkit.vq") -> None:
    """Raise ValueError naming the first code >= K (read as unsigned), before any kernel reads through
    the codes.  Free when K = 2^bits; otherwise one pass over the codes, remembered on the codes tensor
    object itself until it changes (its version counter moves with every in-place write), so a layer's
    forward pays it once.  (Writes through ``.data`` bypass the version counter: call ``check_codes``
    again after such a write; the CPU library still refuses a code it would read out of bounds.)"""
    if not isinstance(codes, torch.Tensor) or codes.dtype not in (torch.uint8, torch.int16):
        got = type(codes).__name__ if not isinstance(codes, torch.Tensor) else codes.dtype
        raise TypeError(f"{fn}: codes must be uint8 or int16 (read as unsigned), got {got}")
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"{fn}: K must be an int >= 1, got {K!r}")
    if codes.numel() == 0 or K >= (1 << code_bits(codes)):
        return
    key = _code_key(codes, K)
    if key is not None and getattr(codes, "_kk_vq_checked", None) == key:
        return
    bad = unsigned_codes(codes) >= K
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        value = int(unsigned_codes(codes[pos]))
        raise ValueError(f"{fn}: codes{list(pos)} = {value} (as an unsigned {code_bits(codes)}-bit code) is out of "
                         f"range for a codebook of K = {K} codewords")
    if key is not None:
        codes._kk_vq_checked = key


# ---- kernelkit::vq_linear_fwd -----------------------------------------------------------------------
@torch.library.custom_op("kernelkit::vq_linear_fwd", mutates_args=())
def vq_linear_fwd(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Optional[Tensor], bias: Optional[Tensor],
                  rows_per_codebook: int, path: int, backend: str) -> Tensor:
    B = x.shape[0]
    n_out = codes.shape[0]
    check_codes(codes, codebooks.shape[2], "kernelkit::vq_linear_fwd")
    if backend == "torch":
        return reference_fwd(x, codes, codebooks, scales, bias, rows_per_codebook).contiguous()
    if backend == "triton":
        return _triton().vq_linear_fwd(x, codes, codebooks, scales, bias, rows_per_codebook, path)
    out = x.new_empty(B, n_out)
    fmt = _fmt(codes, codebooks, rows_per_codebook)
    args = (_KK_DTYPE[x.dtype], fmt, B, codes.data_ptr(), codebooks.data_ptr(), _ptr(scales), x.data_ptr(),
            x.stride(0), _ptr(bias), out.data_ptr(), out.stride(0), path)
    if backend == "cpu":
        _lib.C().vq_linear_fwd_cpu(*args, torch.get_num_threads())
    elif backend == "cuda":
        with torch.cuda.device(x.device):
            nbytes = _lib.C().vq_linear_fwd_cuda_workspace_size(_KK_DTYPE[x.dtype], fmt, B, path)
            ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=x.device)
            _lib.C().vq_linear_fwd_cuda(*args, ws.data_ptr(), nbytes, _stream(x))
    else:
        raise ValueError(f"kernelkit::vq_linear_fwd: unknown backend {backend!r}")
    return out


@vq_linear_fwd.register_fake
def _(x, codes, codebooks, scales, bias, rows_per_codebook, path, backend):
    return x.new_empty(x.shape[0], codes.shape[0])


# ---- kernelkit::vq_linear_bwd -----------------------------------------------------------------------
@torch.library.custom_op("kernelkit::vq_linear_bwd", mutates_args=())
def vq_linear_bwd(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Optional[Tensor], dout: Tensor,
                  rows_per_codebook: int, backend: str, need_dx: bool, need_dcodebooks: bool,
                  need_dscales: bool) -> tuple[Tensor, Tensor, Tensor]:
    B, n_in = x.shape
    need_dscales = need_dscales and scales is not None
    check_codes(codes, codebooks.shape[2], "kernelkit::vq_linear_bwd")
    empty = x.new_empty(0)
    if backend == "torch":
        dx, dcb, ds = reference_bwd(x, codes, codebooks, scales, dout, rows_per_codebook)
        return (dx.contiguous() if need_dx else empty, dcb if need_dcodebooks else empty.clone(),
                ds if need_dscales else empty.clone())
    if backend == "triton":
        dx, dcb, ds = _triton().vq_linear_bwd(x, codes, codebooks, scales, dout, rows_per_codebook,
                                              need_dx=need_dx, need_dcodebooks=need_dcodebooks,
                                              need_dscales=need_dscales)
        return (dx if need_dx else empty, dcb if need_dcodebooks else empty.clone(),
                ds if need_dscales else empty.clone())
    dx = x.new_empty(B, n_in) if need_dx else x.new_empty(0)
    dcb = torch.empty_like(codebooks) if need_dcodebooks else x.new_empty(0)
    ds = torch.empty_like(scales) if need_dscales else x.new_empty(0)
    fmt = _fmt(codes, codebooks, rows_per_codebook)
    args = (_KK_DTYPE[x.dtype], fmt, B, codes.data_ptr(), codebooks.data_ptr(), _ptr(scales), x.data_ptr(),
            x.stride(0), dout.data_ptr(), dout.stride(0), dx.data_ptr() if need_dx else 0, n_in,
            dcb.data_ptr() if need_dcodebooks else 0, ds.data_ptr() if need_dscales else 0)
    if codes.shape[0] == 0:  # no output row: nothing reaches the codebooks (the C format has no set then)
        if need_dcodebooks:
            dcb.zero_()
        args = args[:12] + (0,) + args[13:]
    if backend == "cpu":
        _lib.C().vq_linear_bwd_cpu(*args, torch.get_num_threads())
    elif backend == "cuda":
        with torch.cuda.device(x.device):
            nbytes = _lib.C().vq_linear_bwd_cuda_workspace_size(_KK_DTYPE[x.dtype], fmt, B)
            ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=x.device)
            _lib.C().vq_linear_bwd_cuda(*args, ws.data_ptr(), nbytes, _stream(x))
    else:
        raise ValueError(f"kernelkit::vq_linear_bwd: unknown backend {backend!r}")
    return dx, dcb, ds


@vq_linear_bwd.register_fake
def _(x, codes, codebooks, scales, dout, rows_per_codebook, backend, need_dx, need_dcodebooks, need_dscales):
    need_dscales = need_dscales and scales is not None
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            codebooks.new_empty(codebooks.shape) if need_dcodebooks else x.new_empty(0),
            scales.new_empty(scales.shape) if need_dscales else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, codes, codebooks, scales, bias, rows_per_codebook, path, backend = inputs
    ctx.save_for_backward(x, codes, codebooks, scales)
    ctx.rows_per_codebook = rows_per_codebook
    ctx.backend = backend
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, codes, codebooks, scales = ctx.saved_tensors
    need_dx, _, need_dcb, need_ds, need_db = ctx.needs_input_grad[:5]
    need_ds = need_ds and scales is not None
    need_db = need_db and ctx.has_bias
    grad = _checks.rows(grad)
    dx = dcb = ds = None
    if need_dx or need_dcb or need_ds:
        dx, dcb, ds = torch.ops.kernelkit.vq_linear_bwd(x, codes, codebooks, scales, grad, ctx.rows_per_codebook,
                                                        ctx.backend, need_dx, need_dcb, need_ds)
    db = grad.sum(0) if need_db else None
    return (dx if need_dx else None, None, dcb if need_dcb else None, ds if need_ds else None, db,
            None, None, None)


vq_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


# Double backward.  With dW = dout^T x and U = W without the scale, the bwd op's outputs are
#   dx = dout W(C, s),   dC = scatter(s * dW),   ds = rowsum(dW * U(C)),
# linear in dout and in x.  For upstream gradients (gdx, gdC, gds), with W' = W(gdC, s) and W'' = W(C, gds):
#   grad_dout = gdx W^T + x W'^T + x W''^T                        -> fwd(gdx; C, s) + fwd(x; gdC, s) + fwd(x; C, gds)
#   grad_x    = dout W' + dout W''                                -> bwd_dx(dout; gdC, s) + bwd_dx(dout; C, gds)
#   grad_C    = scatter(s * dout^T gdx) + scatter(gds * dW)       -> bwd_dC(x := gdx) + bwd_dC(scales := gds)
#   grad_s    = rowsum(dout^T gdx * U) + rowsum(dW * U(gdC))      -> bwd_ds(x := gdx) + bwd_ds(C := gdC)
# all built from the same two ops, so every order of derivative runs on every backend.
def _bwd_setup_context(ctx, inputs, output):
    x, codes, codebooks, scales, dout, rows_per_codebook, backend, *_ = inputs
    ctx.save_for_backward(x, codes, codebooks, scales, dout)
    ctx.rows_per_codebook = rows_per_codebook
    ctx.backend = backend


def _given(g):
    return g is not None and g.numel() > 0


def _add(a, b):
    return b if a is None else (a if b is None else a + b)


def _bwd_backward(ctx, gdx, gdcb, gds):
    x, codes, C, s, dout = ctx.saved_tensors
    need_x, _, need_C, need_s, need_dout = ctx.needs_input_grad[:5]
    need_s = need_s and s is not None
    rpc, be = ctx.rows_per_codebook, ctx.backend
    fwd, bwd = torch.ops.kernelkit.vq_linear_fwd, torch.ops.kernelkit.vq_linear_bwd
    gx = gC = gs = gd = None
    if _given(gdx):
        gdx = _checks.rows(gdx)
        if need_dout:
            gd = _add(gd, fwd(gdx, codes, C, s, None, rpc, 0, be))
        if need_C or need_s:
            _, c_, s_ = bwd(gdx, codes, C, s, dout, rpc, be, False, need_C, need_s)
            gC = _add(gC, c_ if need_C else None)
            gs = _add(gs, s_ if need_s else None)
    if _given(gdcb):
        gdcb = gdcb.contiguous()
        if need_dout:
            gd = _add(gd, fwd(x, codes, gdcb, s, None, rpc, 0, be))
        if need_x or need_s:
            x_, _, s_ = bwd(x, codes, gdcb, s, dout, rpc, be, need_x, False, need_s)
            gx = _add(gx, x_ if need_x else None)
            gs = _add(gs, s_ if need_s else None)
    if _given(gds) and s is not None:
        gds = gds.contiguous()
        if need_dout:
            gd = _add(gd, fwd(x, codes, C, gds, None, rpc, 0, be))
        if need_x or need_C:
            x_, c_, _ = bwd(x, codes, C, gds, dout, rpc, be, need_x, need_C, False)
            gx = _add(gx, x_ if need_x else None)
            gC = _add(gC, c_ if need_C else None)
    return (gx, None, gC, gs, gd, None, None, None, None, None)


vq_linear_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup_context)


# ---- kernelkit::vq_dequantize -----------------------------------------------------------------------
@torch.library.custom_op("kernelkit::vq_dequantize", mutates_args=())
def vq_dequantize(codes: Tensor, codebooks: Tensor, scales: Optional[Tensor], rows_per_codebook: int,
                  backend: str) -> Tensor:
    check_codes(codes, codebooks.shape[2], "kernelkit::vq_dequantize")
    if backend == "torch":
        return dequantize_reference(codes, codebooks, scales, rows_per_codebook).contiguous()
    if backend == "triton":
        return _triton().vq_dequantize(codes, codebooks, scales, rows_per_codebook)
    n_out, G, _ = codes.shape
    d = codebooks.shape[3]
    w = codebooks.new_empty(n_out, G * d)
    fmt = _fmt(codes, codebooks, rows_per_codebook)
    args = (_KK_DTYPE[codebooks.dtype], fmt, codes.data_ptr(), codebooks.data_ptr(), _ptr(scales), w.data_ptr(),
            G * d)
    if backend == "cpu":
        _lib.C().vq_dequantize_cpu(*args, torch.get_num_threads())
    elif backend == "cuda":
        with torch.cuda.device(codes.device):
            _lib.C().vq_dequantize_cuda(*args, _stream(codes))
    else:
        raise ValueError(f"kernelkit::vq_dequantize: unknown backend {backend!r}")
    return w


@vq_dequantize.register_fake
def _(codes, codebooks, scales, rows_per_codebook, backend):
    return codebooks.new_empty(codes.shape[0], codes.shape[1] * codebooks.shape[3])


def _deq_setup(ctx, inputs, output):
    codes, codebooks, scales, rows_per_codebook, backend = inputs
    ctx.save_for_backward(codes, codebooks, scales)
    ctx.rows_per_codebook = rows_per_codebook


def _deq_backward(ctx, grad):
    # W = s * U(C): dC = scatter(s * dW), ds = rowsum(dW * U).  Plain torch: a gather and an index_add,
    # differentiable again.
    codes, C, s = ctx.saved_tensors
    _, need_C, need_s = ctx.needs_input_grad[:3]
    # a codeword collects thousands of terms: accumulate 16-bit dtypes in float32, as vq_linear's backward does
    acc = torch.float32 if C.dtype in (torch.float16, torch.bfloat16) else C.dtype
    with torch.enable_grad():
        Cd = C.detach().to(acc).requires_grad_(need_C)
        sd = None if s is None else s.detach().to(acc).requires_grad_(need_s)
        w = dequantize_reference(codes, Cd, sd, ctx.rows_per_codebook)
    wanted = [t for t, n in ((Cd, need_C), (sd, need_s)) if n and t is not None]
    grads = iter(torch.autograd.grad(w, wanted, grad.to(acc), create_graph=torch.is_grad_enabled()) if wanted else ())
    gC = next(grads).to(C.dtype) if need_C else None
    gs = next(grads).to(s.dtype) if (need_s and s is not None) else None
    return None, gC, gs, None, None


vq_dequantize.register_autograd(_deq_backward, setup_context=_deq_setup)


# ---- kernelkit::vq_assign ---------------------------------------------------------------------------
@torch.library.custom_op("kernelkit::vq_assign", mutates_args=())
def vq_assign(vectors: Tensor, centroids: Tensor, topn: int, backend: str) -> tuple[Tensor, Tensor]:
    n, d = vectors.shape
    K = centroids.shape[0]
    if backend == "torch":
        idx, dist = assign_reference(vectors, centroids, topn)
        return idx.contiguous(), dist.contiguous()
    if backend == "triton":
        return _triton().vq_assign(vectors, centroids, topn)
    idx = torch.empty(n, topn, dtype=torch.int32, device=vectors.device)
    dist = vectors.new_empty(n, topn)
    args = (_KK_DTYPE[vectors.dtype], n, K, d, vectors.data_ptr(), centroids.data_ptr(), topn, idx.data_ptr(),
            dist.data_ptr())
    if backend == "cpu":
        _lib.C().vq_assign_cpu(*args, torch.get_num_threads())
    elif backend == "cuda":
        with torch.cuda.device(vectors.device):
            _lib.C().vq_assign_cuda(*args, _stream(vectors))
    else:
        raise ValueError(f"kernelkit::vq_assign: unknown backend {backend!r}")
    return idx, dist


@vq_assign.register_fake
def _(vectors, centroids, topn, backend):
    n = vectors.shape[0]
    return (torch.empty(n, topn, dtype=torch.int32, device=vectors.device), vectors.new_empty(n, topn))


# ---- user-facing functions ----------------------------------------------------------------------------
def _check_codes_tensor(codes, fn: str) -> Tensor:
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"{fn}: codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.layout != torch.strided or codes.is_nested:
        kind = "nested" if codes.is_nested else str(codes.layout).replace("torch.", "")
        raise TypeError(f"{fn}: codes must be a dense (strided) tensor, got a {kind} tensor")
    if codes.dtype not in (torch.uint8, torch.int16):
        raise TypeError(f"{fn}: codes must be uint8 (K <= 256) or int16 (K <= 65536, read as unsigned), "
                        f"got {codes.dtype}")
    if codes.dim() == 2:
        codes = codes.unsqueeze(-1)  # (n_out, G): one codebook
    if codes.dim() != 3:
        raise ValueError(f"{fn}: codes must be (n_out, n_in / d, M) (or (n_out, n_in / d) for M = 1), "
                         f"got shape {tuple(codes.shape)}")
    return codes


def _check_format(codes: Tensor, codebooks, scales, rows_per_codebook, fn: str):
    """Validated (codes (n_out, G, M), codebooks (S, M, K, d), scales (n_out,) | None, rows_per_codebook)."""
    codes = _check_codes_tensor(codes, fn)
    codebooks = _checks.tensor(codebooks, "codebooks", fn)
    if codebooks.dim() == 3:
        codebooks = codebooks.unsqueeze(0)
    if codebooks.dim() != 4:
        raise ValueError(f"{fn}: codebooks must be (M, K, d) or (S, M, K, d), got shape {tuple(codebooks.shape)}")
    S, M, K, d = codebooks.shape
    n_out, G, Mc = codes.shape
    if d not in GROUP_SIZES:
        raise ValueError(f"{fn}: the codebooks' group size d = codebooks.shape[-1] must be one of {GROUP_SIZES}, got {d}")
    if not 1 <= M <= MAX_CODEBOOKS:
        raise ValueError(f"{fn}: the number of codebooks M must be in [1, {MAX_CODEBOOKS}], got {M}")
    if Mc != M:
        raise ValueError(f"{fn}: codes has {Mc} code(s) per group (codes.shape[2]) but codebooks has M = {M}")
    limit = 1 << code_bits(codes)
    if not 1 <= K <= limit:
        raise ValueError(f"{fn}: codebook size K = {K} does not fit {str(codes.dtype).replace('torch.', '')} codes "
                         f"(1 <= K <= {limit}); use int16 codes for K > 256")
    if S < 1:
        raise ValueError(f"{fn}: codebooks must hold at least one set (codebooks.shape[0] >= 1)")
    if rows_per_codebook is None:
        rows_per_codebook = -(-n_out // S) if n_out else 1
    if not isinstance(rows_per_codebook, int) or isinstance(rows_per_codebook, bool) or rows_per_codebook < 1:
        raise ValueError(f"{fn}: rows_per_codebook must be an int >= 1, got {rows_per_codebook!r}")
    if max(1, -(-n_out // rows_per_codebook)) != S:
        raise ValueError(f"{fn}: codebooks has {S} set(s) (codebooks.shape[0]) but n_out = {n_out} rows in sets of "
                         f"rows_per_codebook = {rows_per_codebook} need {max(1, -(-n_out // rows_per_codebook))}")
    if codes.device != codebooks.device:
        raise ValueError(f"{fn}: codes is on {codes.device} but codebooks is on {codebooks.device}")
    if scales is not None:
        scales = _checks.tensor(scales, "scales", fn)
        if scales.numel() != n_out or (scales.dim() > 1 and scales.shape[0] != n_out):
            raise ValueError(f"{fn}: scales must have n_out = {n_out} entries ((n_out,) or AQLM's (n_out, 1, 1, 1)), "
                             f"got shape {tuple(scales.shape)}")
        if scales.device != codebooks.device:
            raise ValueError(f"{fn}: scales is on {scales.device} but codebooks is on {codebooks.device}")
        scales = scales.reshape(n_out)
    return codes, codebooks, scales, rows_per_codebook


def _path(path, fn: str) -> int:
    if not isinstance(path, str) or path not in PATHS:
        raise ValueError(f"{fn}: path must be one of {', '.join(map(repr, PATHS))}, got {path!r}")
    return PATHS[path]


def vq_linear(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Optional[Tensor] = None,
              bias: Optional[Tensor] = None, *, rows_per_codebook: Optional[int] = None, path: str = "auto",
              backend: Optional[str] = None) -> Tensor:
    """``x W^T + bias`` with W given by its codes (see the module docstring and vq.h), never dense.

    x (..., n_in); codes (n_out, n_in/d, M) uint8/int16; codebooks (S, M, K, d) or (M, K, d), any float
    dtype (cast to x's dtype, as are scales and bias); scales (n_out,) or None.  Differentiable in x,
    codebooks, scales and bias (the codes are integers).  ``path``: "auto", "gemv" or "gemm".
    """
    fn = "kernelkit.vq.vq_linear"
    x = _checks.tensor(x, "x", fn, min_ndim=1)
    codes, codebooks, scales, rpc = _check_format(codes, codebooks, scales, rows_per_codebook, fn)
    n_out, G, _ = codes.shape
    d = codebooks.shape[3]
    if x.shape[-1] != G * d:
        raise ValueError(f"{fn}: x has {x.shape[-1]} features (x.shape[-1]) but the codes describe n_in = "
                         f"{G} groups x d = {d} = {G * d}")
    if x.device != codes.device:
        raise ValueError(f"{fn}: x is on {x.device} but codes is on {codes.device}")
    if bias is not None:
        bias = _checks.tensor(bias, "bias", fn, ndim=1)
        if bias.shape[0] != n_out:
            raise ValueError(f"{fn}: bias must have n_out = {n_out} entries, got shape {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"{fn}: bias is on {bias.device} but x is on {x.device}")
        bias = bias.to(x.dtype).contiguous()
    p = _path(path, fn)
    codebooks = codebooks.to(x.dtype).contiguous()
    scales = None if scales is None else scales.to(x.dtype).contiguous()
    name = _backend.select("vq_linear", x.device, backend, _supports(_SUPPORTED, x.dtype, x.device))
    lead = x.shape[:-1]
    x2 = _checks.rows(x.reshape(math.prod(lead), G * d))
    out = torch.ops.kernelkit.vq_linear_fwd(x2, codes.contiguous(), codebooks, scales, bias, rpc, p, name)
    return out.view(*lead, n_out)


def dequantize(codes: Tensor, codebooks: Tensor, scales: Optional[Tensor] = None, *,
               rows_per_codebook: Optional[int] = None, dtype: Optional[torch.dtype] = None,
               backend: Optional[str] = None) -> Tensor:
    """The dense W (n_out, n_in) in ``dtype`` (default: the codebooks').  Differentiable in the codebooks
    and scales."""
    fn = "kernelkit.vq.dequantize"
    codes, codebooks, scales, rpc = _check_format(codes, codebooks, scales, rows_per_codebook, fn)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or dtype not in _checks.FLOAT_DTYPES):
        raise TypeError(f"{fn}: dtype must be one of torch.float32/float64/float16/bfloat16 or None, got {dtype!r}")
    dtype = dtype or codebooks.dtype
    codebooks = codebooks.to(dtype).contiguous()
    scales = None if scales is None else scales.to(dtype).contiguous()
    name = _backend.select("vq_dequantize", codes.device, backend, _supports(_SUPPORTED, dtype, codes.device))
    return torch.ops.kernelkit.vq_dequantize(codes.contiguous(), codebooks, scales, rpc, name)


def assign(vectors: Tensor, centroids: Tensor, topn: int = 1, *, backend: Optional[str] = None
           ) -> tuple[Tensor, Tensor]:
    """The k-means assignment step: (idx int32 (n, topn), squared distances (n, topn)) of the topn nearest
    centroids (K, d) to each vector (n, d), nearest first, ties to the smaller index.  Not differentiable."""
    fn = "kernelkit.vq.assign"
    vectors = _checks.tensor(vectors, "vectors", fn, ndim=2)
    centroids = _checks.tensor(centroids, "centroids", fn, ndim=2)
    _checks.same(fn, "vectors", vectors, centroids=centroids)
    if vectors.shape[1] != centroids.shape[1]:
        raise ValueError(f"{fn}: vectors have d = {vectors.shape[1]} but centroids have d = {centroids.shape[1]}")
    if vectors.shape[1] < 1:
        raise ValueError(f"{fn}: vectors must have d >= 1 columns")
    K = centroids.shape[0]
    if not isinstance(topn, int) or isinstance(topn, bool) or not 1 <= topn <= min(MAX_TOPN, K):
        raise ValueError(f"{fn}: topn must be an int in [1, min({MAX_TOPN}, K = {K})], got {topn!r}")
    name = _backend.select("vq_assign", vectors.device, backend,
                           _supports(_ASSIGN_SUPPORTED, vectors.dtype, vectors.device))
    return torch.ops.kernelkit.vq_assign(vectors.detach().contiguous(), centroids.detach().contiguous(), topn, name)


def bits_per_weight(d: int, K: int, M: int = 1) -> float:
    """Index bits per weight of the format (codebooks and scales excluded): M log2(K) / d."""
    return M * math.log2(K) / d
