"""M-FAC kernels as torch.library custom ops (fake + autograd registered) with backend dispatch.

    kernelkit::mfac_dots(G, x, block, backend) -> q                 q[v, b, i] = sum_{j in b} G[i, j] x[v, j]
    kernelkit::mfac_insert_dots(G!, x, row, backend) -> (q, qr)     G[row] = x (rounded), then q = G x,
                                                                    qr = G round(x)   (mutates G)
    kernelkit::mfac_combine(G, c, x, alpha, block, backend) -> out  out = alpha x + G^T c per block
    kernelkit::mfac_diag(Z, alpha, beta, backend) -> out            alpha + beta * colsum(Z^2)
    kernelkit::mfac_static_setup(G, damp, block, backend) -> Z      the static factor (mfac.h)
    kernelkit::mfac_window_update(gram!, kinv!, row, newcol, damp, backend)   (mutates gram, kinv)
    kernelkit::mfac_window_rebuild(gram, damp, backend) -> kinv     (m damp I + gram)^-1
    kernelkit::mfac_window_coef(kinv, q, scale, backend) -> c       c[v] = scale kinv q[v]

Shapes and dtypes (csrc/include/kernelkit/mfac.h): G / Z (r, d) float32, bfloat16 or float64 with unit
inner stride; x / out (nvec, d) float32 (float64 with a float64 buffer); q, c (nvec, nblocks, r),
gram, kinv (m, m), newcol (m,) float64.  The two mutating ops have no autograd formula (torch refuses
one for ops that write their inputs; they only ever touch optimizer / pruner state); the static setup
is not differentiable (its backward raises).  Every other op has its exact vjp.

The user-facing functions (:func:`dots`, :func:`combine`, :func:`diag`, :func:`static_setup`,
:func:`window_rebuild`, :func:`window_coef`) validate their arguments, naming the one at fault, and
pick the backend; the objects in ``kernelkit.mfac.ihvp`` build the two algorithms from them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _checks, _lib

from . import reference as R

_stream = _lib.stream
_ptr = _lib.ptr

_KK_DTYPE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
BUFFER_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_SUPPORTED = {name: BUFFER_DTYPES for name in _backend.BACKENDS}
# Below this many buffer elements a CPU call runs on one thread: one thread streams 1M float32 in
# ~0.1 ms, while an OpenMP fork/join costs 0.02 ms on a quiet 2-core machine and milliseconds on a
# loaded one (spin-waiting barriers), which made the example's small steps 10x slower.
SERIAL_WORK = 1 << 20


def _supports(dtype: torch.dtype):
    def check(name: str) -> str | None:
        if dtype in _SUPPORTED[name]:
            return None
        return (f"dtype {dtype} not supported (it handles "
                f"{', '.join(str(d).replace('torch.', '') for d in _SUPPORTED[name])})")
    return check


def _triton():
    from kernelkit.kernels import mfac as tk  # imported lazily: triton is optional
    return tk


def _nt(work: int) -> int:
    return 1 if work < SERIAL_WORK else torch.get_num_threads()


def _nb(d: int, block: int) -> int:
    return R.nblocks(d, block)


def _rows(t: Tensor) -> Tensor:
    """Unit inner stride and non-overlapping rows (what the kernels read); a copy only if needed."""
    return _checks.rows(t) if t.numel() else t.contiguous()


def _writable(t: Tensor, name: str, op: str, contiguous: bool = False) -> None:
    ok = t.is_contiguous() if contiguous else (t.numel() == 0 or (t.stride(1) == 1 and t.stride(0) >= t.shape[1]))
    if not ok:
        raise ValueError(f"kernelkit::{op}: {name} is written in place and must be "
                         f"{'contiguous' if contiguous else 'a row-major buffer with unit inner stride'}; "
                         f"got strides {tuple(t.stride())}")


# ---- kernelkit::mfac_dots ---------------------------------------------------------------------------
@torch.library.custom_op("kernelkit::mfac_dots", mutates_args=())
def mfac_dots(G: Tensor, x: Tensor, block: int, backend: str) -> Tensor:
    r, d = G.shape
    nvec = x.shape[0]
    if backend == "torch":
        return R.dots_reference(G, x, block)
    G, x = _rows(G), _rows(x)
    if backend == "triton":
        return _triton().mfac_dots(G, x, block)
    q = torch.empty(nvec, _nb(d, block), r, dtype=torch.float64, device=G.device)
    args = (_KK_DTYPE[G.dtype], r, d, block, G.data_ptr(), G.stride(0), nvec, x.data_ptr(), x.stride(0), -1,
            q.data_ptr(), 0)
    if backend == "cpu":
        _lib.C().mfac_dots_cpu(*args, _nt(r * d * max(nvec, 1)))
    elif backend == "cuda":
        with torch.cuda.device(G.device):
            _lib.C().mfac_dots_cuda(*args, _stream(G))
    else:
        raise ValueError(f"kernelkit::mfac_dots: unknown backend {backend!r}")
    return q


@mfac_dots.register_fake
def _(G, x, block, backend):
    return G.new_empty(x.shape[0], _nb(G.shape[1], block), G.shape[0], dtype=torch.float64)


def _dots_setup(ctx, inputs, output):
    G, x, block, backend = inputs
    ctx.save_for_backward(G, x)
    ctx.block, ctx.backend = block, backend


def _dots_backward(ctx, dq):
    G, x = ctx.saved_tensors
    dx = dG = None
    if ctx.needs_input_grad[1]:
        dx = mfac_combine(G, dq.contiguous(), None, 0.0, ctx.block, ctx.backend).to(x.dtype)
    if ctx.needs_input_grad[0]:  # dG[i, j] = sum_v dq[v, b(j), i] x[v, j]
        dG = R.combine_reference(x.double(), dq.permute(2, 1, 0).contiguous(), None, 0.0,
                                 ctx.block, torch.float64).to(G.dtype)
    return dG, dx, None, None


mfac_dots.register_autograd(_dots_backward, setup_context=_dots_setup)


# ---- kernelkit::mfac_insert_dots (mutates G) --------------------------------------------------------
@torch.library.custom_op("kernelkit::mfac_insert_dots", mutates_args=("G",))
def mfac_insert_dots(G: Tensor, x: Tensor, row: int, backend: str) -> tuple[Tensor, Tensor]:
    r, d = G.shape
    _writable(G, "G", "mfac_insert_dots")
    x = _rows(x)
    if backend == "torch":
        if not bool(torch.isfinite(x).all()):  # the C libraries refuse it before writing; so does this
            raise ValueError("kernelkit::mfac_insert_dots: x has a non-finite entry; G is unchanged")
        return R.insert_dots_reference(G, x[0], row)
    if backend == "triton":
        return _triton().mfac_insert_dots(G, x, row)
    q = torch.empty(1, 1 if d else 0, r, dtype=torch.float64, device=G.device)
    qr = torch.empty_like(q)
    args = (_KK_DTYPE[G.dtype], r, d, max(d, 1), G.data_ptr(), G.stride(0), 1, x.data_ptr(), x.stride(0), row,
            q.data_ptr(), qr.data_ptr())
    if backend == "cpu":
        _lib.C().mfac_dots_cpu(*args, _nt(r * d))
    elif backend == "cuda":
        with torch.cuda.device(G.device):
            _lib.C().mfac_dots_cuda(*args, _stream(G))
    else:
        raise ValueError(f"kernelkit::mfac_insert_dots: unknown backend {backend!r}")
    return q, qr


@mfac_insert_dots.register_fake
def _(G, x, row, backend):
    q = G.new_empty(1, 1 if G.shape[1] else 0, G.shape[0], dtype=torch.float64)
    return q, torch.empty_like(q)


# ---- kernelkit::mfac_combine ------------------------------------------------------------------------
@torch.library.custom_op("kernelkit::mfac_combine", mutates_args=())
def mfac_combine(G: Tensor, c: Tensor, x: Optional[Tensor], alpha: float, block: int, backend: str) -> Tensor:
    r, d = G.shape
    nvec = c.shape[0]
    vdt = R.vector_dtype(G.dtype)
    if backend == "torch":
        return R.combine_reference(G, c, x, alpha, block, vdt)
    G, c = _rows(G), c.contiguous()
    x = None if x is None else _rows(x)
    if backend == "triton":
        return _triton().mfac_combine(G, c, x, alpha, block)
    out = torch.empty(nvec, d, dtype=vdt, device=G.device)
    args = (_KK_DTYPE[G.dtype], r, d, block, G.data_ptr(), G.stride(0), nvec, float(alpha), _ptr(x),
            x.stride(0) if x is not None else d, c.data_ptr(), out.data_ptr(), out.stride(0))
    if backend == "cpu":
        _lib.C().mfac_combine_cpu(*args, _nt(r * d * max(nvec, 1)))
    elif backend == "cuda":
        with torch.cuda.device(G.device):
            _lib.C().mfac_combine_cuda(*args, _stream(G))
    else:
        raise ValueError(f"kernelkit::mfac_combine: unknown backend {backend!r}")
    return out


@mfac_combine.register_fake
def _(G, c, x, alpha, block, backend):
    return G.new_empty(c.shape[0], G.shape[1], dtype=R.vector_dtype(G.dtype))


def _combine_setup(ctx, inputs, output):
    G, c, x, alpha, block, backend = inputs
    ctx.save_for_backward(G, c)
    ctx.alpha, ctx.block, ctx.backend = alpha, block, backend
    ctx.x_dtype = x.dtype if x is not None else None


def _combine_backward(ctx, dout):
    G, c = ctx.saved_tensors
    dout = _checks.rows(dout)
    dG = dc = dx = None
    if ctx.needs_input_grad[1]:
        dc = mfac_dots(G, dout, ctx.block, ctx.backend)
    if ctx.needs_input_grad[2]:
        dx = (ctx.alpha * dout).to(ctx.x_dtype)
    if ctx.needs_input_grad[0]:  # dG[i, j] = sum_v c[v, b(j), i] dout[v, j]
        dG = R.combine_reference(dout.double(), c.permute(2, 1, 0).contiguous(), None, 0.0,
                                 ctx.block, torch.float64).to(G.dtype)
    return dG, dc, dx, None, None, None


mfac_combine.register_autograd(_combine_backward, setup_context=_combine_setup)


# ---- kernelkit::mfac_diag ---------------------------------------------------------------------------
@torch.library.custom_op("kernelkit::mfac_diag", mutates_args=())
def mfac_diag(Z: Tensor, alpha: float, beta: float, backend: str) -> Tensor:
    r, d = Z.shape
    vdt = R.vector_dtype(Z.dtype)
    if backend == "torch":
        return R.diag_reference(Z, alpha, beta, vdt)
    Z = _rows(Z)
    if backend == "triton":
        return _triton().mfac_diag(Z, alpha, beta)
    out = torch.empty(d, dtype=vdt, device=Z.device)
    args = (_KK_DTYPE[Z.dtype], r, d, Z.data_ptr(), Z.stride(0), float(alpha), float(beta), out.data_ptr())
    if backend == "cpu":
        _lib.C().mfac_diag_cpu(*args, _nt(r * d))
    elif backend == "cuda":
        with torch.cuda.device(Z.device):
            _lib.C().mfac_diag_cuda(*args, _stream(Z))
    else:
        raise ValueError(f"kernelkit::mfac_diag: unknown backend {backend!r}")
    return out


@mfac_diag.register_fake
def _(Z, alpha, beta, backend):
    return Z.new_empty(Z.shape[1], dtype=R.vector_dtype(Z.dtype))


def _diag_setup(ctx, inputs, output):
    Z, alpha, beta, backend = inputs
    ctx.save_for_backward(Z)
    ctx.beta = beta


def _diag_backward(ctx, dout):
    (Z,) = ctx.saved_tensors
    return (2.0 * ctx.beta) * Z * dout.to(Z.dtype)[None, :], None, None, None


mfac_diag.register_autograd(_diag_backward, setup_context=_diag_setup)


# ---- kernelkit::mfac_static_setup -------------------------------------------------------------------
@torch.library.custom_op("kernelkit::mfac_static_setup", mutates_args=())
def mfac_static_setup(G: Tensor, damp: float, block: int, backend: str) -> Tensor:
    m, d = G.shape
    r = R.static_rows(m, d, block)
    if backend == "torch":
        return R.static_setup_reference(G, damp, block)
    G = _rows(G)
    if backend == "triton":
        return _triton().mfac_static_setup(G, damp, block)
    Z = torch.empty(r, d, dtype=R.vector_dtype(G.dtype), device=G.device)
    if r == 0:
        return Z
    args = (_KK_DTYPE[G.dtype], m, d, block, G.data_ptr(), G.stride(0), float(damp), Z.data_ptr(), Z.stride(0))
    if backend == "cpu":
        _lib.C().mfac_static_setup_cpu(*args, _nt(m * d))
    elif backend == "cuda":
        with torch.cuda.device(G.device):
            nbytes = _lib.C().mfac_static_setup_cuda_workspace_size(_KK_DTYPE[G.dtype], m, d, block)
            ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=G.device)
            _lib.C().mfac_static_setup_cuda(*args, ws.data_ptr(), nbytes, _stream(G))
    else:
        raise ValueError(f"kernelkit::mfac_static_setup: unknown backend {backend!r}")
    return Z


@mfac_static_setup.register_fake
def _(G, damp, block, backend):
    m, d = G.shape
    return G.new_empty(R.static_rows(m, d, block), d, dtype=R.vector_dtype(G.dtype))


def _setup_setup(ctx, inputs, output):
    pass


def _setup_backward(ctx, dZ):
    raise RuntimeError("kernelkit::mfac_static_setup is not differentiable (the factor of a Fisher estimate); "
                       "detach the gradients before building a StaticIHVP")


mfac_static_setup.register_autograd(_setup_backward, setup_context=_setup_setup)


# ---- kernelkit::mfac_window_update (mutates gram, kinv) ---------------------------------------------
def _window_ws(m: int, device) -> tuple[Tensor, int]:
    nbytes = _lib.C().mfac_window_cuda_workspace_size(m)
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device), nbytes


@torch.library.custom_op("kernelkit::mfac_window_update", mutates_args=("gram", "kinv"))
def mfac_window_update(gram: Tensor, kinv: Tensor, row: int, newcol: Tensor, damp: float, backend: str) -> None:
    m = gram.shape[0]
    _writable(gram, "gram", "mfac_window_update", contiguous=True)
    _writable(kinv, "kinv", "mfac_window_update", contiguous=True)
    newcol = newcol.contiguous()
    if backend == "torch":
        R.window_update_reference(gram, kinv, row, newcol, damp)
        return
    if backend == "triton":
        _triton().mfac_window_update(gram, kinv, row, newcol, damp)
        return
    if backend == "cpu":
        _lib.C().mfac_window_update_cpu(m, float(damp), gram.data_ptr(), kinv.data_ptr(), row, newcol.data_ptr(),
                                        _nt(m * m))
    elif backend == "cuda":
        with torch.cuda.device(gram.device):
            ws, nbytes = _window_ws(m, gram.device)
            _lib.C().mfac_window_update_cuda(m, float(damp), gram.data_ptr(), kinv.data_ptr(), row,
                                             newcol.data_ptr(), ws.data_ptr(), nbytes, _stream(gram))
    else:
        raise ValueError(f"kernelkit::mfac_window_update: unknown backend {backend!r}")


@mfac_window_update.register_fake
def _(gram, kinv, row, newcol, damp, backend):
    return None


# ---- kernelkit::mfac_window_rebuild -----------------------------------------------------------------
@torch.library.custom_op("kernelkit::mfac_window_rebuild", mutates_args=())
def mfac_window_rebuild(gram: Tensor, damp: float, backend: str) -> Tensor:
    m = gram.shape[0]
    if backend == "torch":
        return R.window_rebuild_reference(gram, damp)
    gram = gram.contiguous()
    if backend == "triton":
        return _triton().mfac_window_rebuild(gram, damp)
    kinv = torch.empty(m, m, dtype=torch.float64, device=gram.device)
    if backend == "cpu":
        _lib.C().mfac_window_rebuild_cpu(m, float(damp), gram.data_ptr(), kinv.data_ptr(), _nt(m * m * 16))
    elif backend == "cuda":
        with torch.cuda.device(gram.device):
            ws, nbytes = _window_ws(m, gram.device)
            _lib.C().mfac_window_rebuild_cuda(m, float(damp), gram.data_ptr(), kinv.data_ptr(), ws.data_ptr(),
                                              nbytes, _stream(gram))
    else:
        raise ValueError(f"kernelkit::mfac_window_rebuild: unknown backend {backend!r}")
    return kinv


@mfac_window_rebuild.register_fake
def _(gram, damp, backend):
    return gram.new_empty(gram.shape)


def _rebuild_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _rebuild_backward(ctx, dkinv):
    # kinv = K^-1 with K = m damp I + tril(gram) + tril(gram, -1)^T: dK = -kinv dkinv kinv, folded onto
    # the lower triangle that the kernels read.
    (kinv,) = ctx.saved_tensors
    A = -(kinv @ dkinv @ kinv)
    dgram = torch.tril(A + A.T, -1) + torch.diag(torch.diagonal(A))
    return dgram, None, None


mfac_window_rebuild.register_autograd(_rebuild_backward, setup_context=_rebuild_setup)


# ---- kernelkit::mfac_window_coef --------------------------------------------------------------------
@torch.library.custom_op("kernelkit::mfac_window_coef", mutates_args=())
def mfac_window_coef(kinv: Tensor, q: Tensor, scale: float, backend: str) -> Tensor:
    m = kinv.shape[0]
    nvec = q.shape[0]
    if backend == "torch":
        return R.window_coef_reference(kinv, q, scale)
    kinv, q = kinv.contiguous(), q.contiguous()
    if backend == "triton":
        return _triton().mfac_window_coef(kinv, q, scale)
    c = torch.empty(nvec, m, dtype=torch.float64, device=kinv.device)
    if backend == "cpu":
        _lib.C().mfac_window_coef_cpu(m, nvec, float(scale), kinv.data_ptr(), q.data_ptr(), c.data_ptr(),
                                      _nt(m * m * max(nvec, 1)))
    elif backend == "cuda":
        with torch.cuda.device(kinv.device):
            _lib.C().mfac_window_coef_cuda(m, nvec, float(scale), kinv.data_ptr(), q.data_ptr(), c.data_ptr(),
                                           _stream(kinv))
    else:
        raise ValueError(f"kernelkit::mfac_window_coef: unknown backend {backend!r}")
    return c


@mfac_window_coef.register_fake
def _(kinv, q, scale, backend):
    return kinv.new_empty(q.shape[0], kinv.shape[0])


def _coef_setup(ctx, inputs, output):
    kinv, q, scale, backend = inputs
    ctx.save_for_backward(kinv, q)
    ctx.scale, ctx.backend = scale, backend


def _coef_backward(ctx, dc):
    kinv, q = ctx.saved_tensors
    dkinv = dq = None
    if ctx.needs_input_grad[1]:  # q_v -> scale kinv q_v: dq_v = scale kinv^T dc_v
        dq = mfac_window_coef(kinv.T.contiguous(), dc.contiguous(), ctx.scale, ctx.backend)
    if ctx.needs_input_grad[0]:
        dkinv = ctx.scale * (dc.T @ q)
    return dkinv, dq, None, None


mfac_window_coef.register_autograd(_coef_backward, setup_context=_coef_setup)


# ---- validated user functions -----------------------------------------------------------------------
def check_buffer(G, name: str, fn: str, writable: bool = False) -> Tensor:
    """A 2-D float32 / bfloat16 / float64 buffer with unit inner stride (a copy if it has another
    layout, unless the op writes it: then ValueError)."""
    if not isinstance(G, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(G).__name__}")
    _checks.tensor(G, name, fn, ndim=2)
    if G.dtype not in BUFFER_DTYPES:
        raise TypeError(f"{fn}: {name} must be float32, bfloat16 or float64, got {G.dtype}")
    if writable:
        if not (G.stride(1) == 1 and G.stride(0) >= G.shape[1]) and G.numel() > 0:
            raise ValueError(f"{fn}: {name} must have unit inner stride and rows that do not overlap (it is "
                             f"written in place); got strides {tuple(G.stride())}")
        return G
    return _checks.rows(G) if G.numel() else G.contiguous()


def check_block(block, d: int, fn: str) -> int:
    if block is None:
        return max(d, 1)
    if isinstance(block, bool) or not isinstance(block, int):
        raise TypeError(f"{fn}: block_size must be an int or None, got {type(block).__name__}")
    if block < 1:
        raise ValueError(f"{fn}: block_size must be >= 1, got {block}")
    return block


def check_damp(damp, fn: str) -> float:
    if isinstance(damp, bool) or not isinstance(damp, (int, float)):
        raise TypeError(f"{fn}: damp must be a float, got {type(damp).__name__}")
    damp = float(damp)
    if not (math.isfinite(damp) and damp > 0):
        raise ValueError(f"{fn}: damp must be finite and > 0, got {damp}")
    return damp


def _vectors(x, d: int, vdt: torch.dtype, device, name: str, fn: str) -> tuple[Tensor, bool]:
    """(nvec, d) rows of the vector dtype; returns (rows, was_1d)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    _checks.tensor(x, name, fn)
    if x.dim() not in (1, 2):
        raise ValueError(f"{fn}: {name} must be 1-D (d,) or 2-D (n, d), got shape {tuple(x.shape)}")
    if x.shape[-1] != d:
        raise ValueError(f"{fn}: {name} has {x.shape[-1]} entries per vector, the buffer has d = {d}")
    if x.device != device:
        raise ValueError(f"{fn}: {name} is on {x.device} but the buffer is on {device}")
    one = x.dim() == 1
    x2 = x.reshape(1, d) if one else x
    x2 = x2.to(vdt)
    return (_checks.rows(x2) if x2.numel() else x2.contiguous()), one


def _pick(fn: str, t: Tensor, dtype: torch.dtype, backend: str | None) -> str:
    return _backend.select(fn, t.device, backend, _supports(dtype))


def dots(G: Tensor, x: Tensor, block_size: int | None = None, *, backend: str | None = None) -> Tensor:
    """q = G x per block of ``block_size`` coordinates: (n, nblocks, r) float64 for x (n, d); for a 1-D
    x and one block, (r,)."""
    fn = "kernelkit.mfac.dots"
    G = check_buffer(G, "G", fn)
    r, d = G.shape
    block = check_block(block_size, d, fn)
    xs, one = _vectors(x, d, R.vector_dtype(G.dtype), G.device, "x", fn)
    q = mfac_dots(G, xs, block, _pick(fn, G, G.dtype, backend))
    return q.reshape(-1) if (one and _nb(d, block) == 1) else q


def combine(G: Tensor, c: Tensor, x: Tensor | None = None, alpha: float = 0.0, block_size: int | None = None, *,
            backend: str | None = None) -> Tensor:
    """out = alpha x + G^T c per block.  c: (n, nblocks, r) float64, or (r,) for one vector and one
    block (then out is (d,))."""
    fn = "kernelkit.mfac.combine"
    G = check_buffer(G, "G", fn)
    r, d = G.shape
    block = check_block(block_size, d, fn)
    nb = _nb(d, block)
    if not isinstance(c, Tensor):
        raise TypeError(f"{fn}: c must be a torch.Tensor, got {type(c).__name__}")
    one = c.dim() == 1
    c3 = c.reshape(1, 1, -1) if one else c
    if c3.dim() != 3 or c3.shape[1:] != (nb, r):
        raise ValueError(f"{fn}: c must be (n, nblocks, r) = (n, {nb}, {r}) (or ({r},) with one block), got "
                         f"shape {tuple(c.shape)}")
    if c3.device != G.device:
        raise ValueError(f"{fn}: c is on {c3.device} but G is on {G.device}")
    c3 = c3.to(torch.float64).contiguous()
    xs = None
    if x is not None:
        xs, _ = _vectors(x, d, R.vector_dtype(G.dtype), G.device, "x", fn)
        if xs.shape[0] != c3.shape[0]:
            raise ValueError(f"{fn}: x has {xs.shape[0]} vectors but c has {c3.shape[0]}")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)):
        raise ValueError(f"{fn}: alpha must be a finite float, got {alpha!r}")
    out = mfac_combine(G, c3, xs, float(alpha), block, _pick(fn, G, G.dtype, backend))
    return out.reshape(d) if one else out


def diag(Z: Tensor, alpha: float, beta: float, *, backend: str | None = None) -> Tensor:
    """alpha + beta * sum_i Z[i, j]^2 for every column j."""
    fn = "kernelkit.mfac.diag"
    Z = check_buffer(Z, "Z", fn)
    for name, v in (("alpha", alpha), ("beta", beta)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{fn}: {name} must be a finite float, got {v!r}")
    return mfac_diag(Z, float(alpha), float(beta), _pick(fn, Z, Z.dtype, backend))


def static_setup(G: Tensor, damp: float, block_size: int | None = None, *, backend: str | None = None) -> Tensor:
    """The static factor Z (r, d) of the damped empirical Fisher of G's rows (see mfac.h)."""
    fn = "kernelkit.mfac.static_setup"
    G = check_buffer(G, "G", fn)
    m, d = G.shape
    if m == 0:
        raise ValueError(f"{fn}: G has no gradient (m = 0)")
    damp = check_damp(damp, fn)
    block = check_block(block_size, d, fn)
    if G.numel() and not bool(torch.isfinite(G).all()):
        raise ValueError(f"{fn}: G has a non-finite entry")
    return mfac_static_setup(G, damp, block, _pick(fn, G, G.dtype, backend))


def _check_square64(t, name: str, fn: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float64:
        raise TypeError(f"{fn}: {name} must be float64, got {t.dtype}")
    if t.dim() != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(f"{fn}: {name} must be a square (m, m) matrix, got shape {tuple(t.shape)}")
    return t


def window_rebuild(gram: Tensor, damp: float, *, backend: str | None = None) -> Tensor:
    """(m damp I + gram)^-1, float64 (gram's lower triangle is read)."""
    fn = "kernelkit.mfac.window_rebuild"
    gram = _check_square64(gram, "gram", fn).contiguous()
    damp = check_damp(damp, fn)
    return mfac_window_rebuild(gram, damp, _pick(fn, gram, torch.float64, backend))


def window_coef(kinv: Tensor, q: Tensor, scale: float = 1.0, *, backend: str | None = None) -> Tensor:
    """scale * kinv q for q (m,) or (n, m), float64."""
    fn = "kernelkit.mfac.window_coef"
    kinv = _check_square64(kinv, "kinv", fn).contiguous()
    if not isinstance(q, Tensor):
        raise TypeError(f"{fn}: q must be a torch.Tensor, got {type(q).__name__}")
    one = q.dim() == 1
    q2 = q.reshape(1, -1) if one else q
    if q2.dim() != 2 or q2.shape[1] != kinv.shape[0]:
        raise ValueError(f"{fn}: q must be (m,) or (n, m) with m = {kinv.shape[0]}, got shape {tuple(q.shape)}")
    c = mfac_window_coef(kinv, q2.to(torch.float64).contiguous(), float(scale),
                         _pick(fn, kinv, torch.float64, backend))
    return c.reshape(-1) if one else c
