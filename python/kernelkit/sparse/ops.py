"""Sparse linear layer as torch.library custom ops (fake + autograd registered), backend dispatch.

    kernelkit::sparse_linear_fwd(x, values, row_ptr, col_idx, col_ptr, row_idx, perm, bias, backend)
        -> out                                   out[b, r] = bias[r] + sum_k values[k] x[b, col_idx[k]]
    kernelkit::sparse_linear_bwd(x, values, row_ptr, col_idx, col_ptr, row_idx, perm, dout, backend,
                                 need_dx, need_dvalues) -> (dx, dvalues)
        dx = dout W (SpMM over the transposed index, values read through perm), dvalues = (dout^T x)
        sampled at the nonzeros (SDDMM).  Gradients not asked for come back empty.

x and dout are 2-D row-major (unit inner stride); the index tensors are a SparseLayout's (format.py).
The bias gradient (a column sum of dout) is plain torch.  The backward op is differentiable too
(double backward) through the same two ops.  The user-facing entry point is :func:`sparse_linear`:
it validates, flattens the batch, picks the backend, and below the device's break-even sparsity
runs the dense path instead (a sparse kernel cannot beat a dense GEMM there).
"""
from __future__ import annotations

import numbers
import weakref
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .. import _backend, _checks, _lib

from .format import SparseLayout, rows_of
from .reference import reference_bwd, reference_fwd

_stream = _lib.stream
_ptr = _lib.ptr

_KK_DTYPE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_SUPPORTED = {
    "torch": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "cpu": (torch.float32, torch.float64),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}

# The sparsity below which the dense path (F.linear on the scattered weight) is faster than the sparse
# kernels, per backend: measured with `python -m kernelkit.bench --family sparse` (bench/NOTES.md,
# "sparse: break-even").  "torch" computes densely either way.  The GPU values are the goal
# (faster than cuBLAS from 90% up) until a GPU run measures them.
BREAK_EVEN_SPARSITY = {"torch": 0.0, "cpu": 0.75, "triton": 0.9, "cuda": 0.9}


def _supports(dtype: torch.dtype, device: torch.device | None = None):
    def check(name: str) -> str | None:
        ok = _SUPPORTED[name]
        if name == "triton" and device is not None and device.type == "cpu":
            ok = ok + (torch.float64,)  # the interpreter runs float64 (gradcheck through the kernels)
        if dtype in ok:
            return None
        return f"dtype {dtype} not supported (it handles {', '.join(str(d).replace('torch.', '') for d in ok)})"
    return check


def _triton():
    from kernelkit.kernels import sparse as tk  # imported lazily: triton is optional
    return tk


@torch.library.custom_op("kernelkit::sparse_linear_fwd", mutates_args=())
def sparse_linear_fwd(x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, col_ptr: Tensor,
                      row_idx: Tensor, perm: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
    B, n_in = x.shape
    n_out, nnz = row_ptr.numel() - 1, col_idx.numel()
    if backend == "torch":
        return reference_fwd(x, values, row_ptr, col_idx, n_in, bias).contiguous()
    if backend == "triton":
        return _triton().sparse_linear_fwd(x, values, row_ptr, col_idx, bias, n_out)
    out = x.new_empty(B, n_out)
    args = (_KK_DTYPE[x.dtype], B, n_out, n_in, nnz, row_ptr.data_ptr(), col_idx.data_ptr(), values.data_ptr(),
            x.data_ptr(), x.stride(0), _ptr(bias), out.data_ptr(), out.stride(0))
    if backend == "cpu":
        _lib.C().sparse_linear_fwd_cpu(*args, torch.get_num_threads())
    elif backend == "cuda":
        with torch.cuda.device(x.device):
            nbytes = _lib.C().sparse_linear_fwd_cuda_workspace_size(*args[:5])
            ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=x.device)
            _lib.C().sparse_linear_fwd_cuda(*args, ws.data_ptr(), nbytes, _stream(x))
    else:
        raise ValueError(f"kernelkit::sparse_linear_fwd: unknown backend {backend!r}")
    return out


@sparse_linear_fwd.register_fake
def _(x, values, row_ptr, col_idx, col_ptr, row_idx, perm, bias, backend):
    return x.new_empty(x.shape[0], row_ptr.shape[0] - 1)


@torch.library.custom_op("kernelkit::sparse_linear_bwd", mutates_args=())
def sparse_linear_bwd(x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, col_ptr: Tensor,
                      row_idx: Tensor, perm: Tensor, dout: Tensor, backend: str, need_dx: bool,
                      need_dvalues: bool) -> tuple[Tensor, Tensor]:
    B, n_in = x.shape
    n_out, nnz = row_ptr.numel() - 1, col_idx.numel()
    empty = x.new_empty(0)
    if backend == "torch":
        dx, dv = reference_bwd(x, values, row_ptr, col_idx, dout)
        return (dx.contiguous() if need_dx else empty, dv if need_dvalues else empty.clone())
    if backend == "triton":
        dx, dv = _triton().sparse_linear_bwd(x, values, row_ptr, col_idx, col_ptr, row_idx, perm, dout,
                                             need_dx=need_dx, need_dvalues=need_dvalues)
        return (dx if need_dx else empty, dv if need_dvalues else empty.clone())
    dx = x.new_empty(B, n_in) if need_dx else x.new_empty(0)
    dv = torch.empty_like(values) if need_dvalues else x.new_empty(0)
    args = (_KK_DTYPE[x.dtype], B, n_out, n_in, nnz, row_ptr.data_ptr(), col_idx.data_ptr(), col_ptr.data_ptr(),
            row_idx.data_ptr(), perm.data_ptr(), values.data_ptr(), x.data_ptr(), x.stride(0), dout.data_ptr(),
            dout.stride(0), dx.data_ptr() if need_dx else 0, n_in, dv.data_ptr() if need_dvalues else 0)
    if backend == "cpu":
        _lib.C().sparse_linear_bwd_cpu(*args, torch.get_num_threads())
    elif backend == "cuda":
        with torch.cuda.device(x.device):
            nbytes = _lib.C().sparse_linear_bwd_cuda_workspace_size(*args[:5])
            ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=x.device)
            _lib.C().sparse_linear_bwd_cuda(*args, ws.data_ptr(), nbytes, _stream(x))
    else:
        raise ValueError(f"kernelkit::sparse_linear_bwd: unknown backend {backend!r}")
    return dx, dv


@sparse_linear_bwd.register_fake
def _(x, values, row_ptr, col_idx, col_ptr, row_idx, perm, dout, backend, need_dx, need_dvalues):
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            values.new_empty(values.shape) if need_dvalues else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, values, row_ptr, col_idx, col_ptr, row_idx, perm, bias, backend = inputs
    ctx.save_for_backward(x, values, row_ptr, col_idx, col_ptr, row_idx, perm)
    ctx.backend = backend
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, values, *index = ctx.saved_tensors
    need_dx, need_dv = ctx.needs_input_grad[:2]
    need_db = ctx.has_bias and ctx.needs_input_grad[7]
    grad = _checks.rows(grad)
    dx = dv = None
    if need_dx or need_dv:
        dx, dv = torch.ops.kernelkit.sparse_linear_bwd(x, values, *index, grad, ctx.backend, need_dx, need_dv)
    db = grad.sum(0) if need_db else None
    return (dx if need_dx else None, dv if need_dv else None, None, None, None, None, None, db, None)


sparse_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


# Double backward.  sparse_linear_bwd's outputs dx = dout W and dvalues = (dout^T x)|nz are linear in
# dout, dx in the values and dvalues in x.  For upstream gradients (gdx, gdv):
#   grad_dout   = fwd(gdx; values) + fwd(x; gdv)        (no bias)
#   grad_x      = dx(dout; gdv)                          i.e. the bwd op with values := gdv
#   grad_values = dvalues(dout; x := gdx)                i.e. the bwd op with x := gdx
# built from the same two ops, so every order of derivative runs on every backend.
def _bwd_setup_context(ctx, inputs, output):
    x, values, row_ptr, col_idx, col_ptr, row_idx, perm, dout, backend, *_ = inputs
    ctx.save_for_backward(x, values, row_ptr, col_idx, col_ptr, row_idx, perm, dout)
    ctx.backend = backend


def _given(g):
    return g is not None and g.numel() > 0


def _bwd_backward(ctx, gdx, gdv):
    x, values, *index, dout = ctx.saved_tensors
    need_x, need_v = ctx.needs_input_grad[:2]
    need_dout = ctx.needs_input_grad[7]
    op_f, op_b = torch.ops.kernelkit.sparse_linear_fwd, torch.ops.kernelkit.sparse_linear_bwd
    gx = gv = gd = None
    if _given(gdx):
        gdx = _checks.rows(gdx)
        if need_dout:
            gd = op_f(gdx, values, *index, None, ctx.backend)
        if need_v:
            gv = op_b(gdx, values, *index, dout, ctx.backend, False, True)[1]
    if _given(gdv):
        gdv = gdv.contiguous()
        if need_dout:
            term = op_f(x, gdv, *index, None, ctx.backend)
            gd = term if gd is None else gd + term
        if need_x:
            gx = op_b(x, gdv, *index, dout, ctx.backend, True, False)[0]
    return (gx, gv, None, None, None, None, None, gd, None, None, None)


sparse_linear_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup_context)


# ---- the dense path: W scattered from the values, and its adjoint ----------------------------------
# Below the break-even sparsity, sparse_linear runs F.linear on W = to_dense(values).  The scatter and
# its gradient (the dense gradient gathered at the nonzeros) are two more custom ops so that on CPU they
# are one streaming pass each (csrc/cpu/sparse_convert.cpp) rather than an index_put through a fresh
# int64 flat index, which cost about half of a 4096x4096 GEMM here.  Other backends use torch's
# indexing (on the GPU it is a small fraction of the GEMM).

@torch.library.custom_op("kernelkit::sparse_to_dense", mutates_args=())
def sparse_to_dense(values: Tensor, row_ptr: Tensor, col_idx: Tensor, n_in: int, backend: str) -> Tensor:
    n_out, nnz = row_ptr.numel() - 1, col_idx.numel()
    if backend != "cpu":
        flat = values.new_zeros(n_out * n_in)
        return flat.index_put_((rows_of(row_ptr, nnz) * n_in + col_idx.long(),), values).view(n_out, n_in)
    out = values.new_empty(n_out, n_in)
    _lib.C().sparse_to_dense_cpu(_KK_DTYPE[values.dtype], n_out, n_in, nnz, row_ptr.data_ptr(), col_idx.data_ptr(),
                                 values.data_ptr(), out.data_ptr(), n_in, torch.get_num_threads())
    return out


@sparse_to_dense.register_fake
def _(values, row_ptr, col_idx, n_in, backend):
    return values.new_empty(row_ptr.shape[0] - 1, n_in)


@torch.library.custom_op("kernelkit::sparse_gather", mutates_args=())
def sparse_gather(dense: Tensor, row_ptr: Tensor, col_idx: Tensor, backend: str) -> Tensor:
    n_out, n_in = dense.shape
    nnz = col_idx.numel()
    if backend != "cpu":
        return dense[rows_of(row_ptr, nnz), col_idx.long()]
    dense = _checks.rows(dense)
    out = dense.new_empty(nnz)
    _lib.C().sparse_gather_cpu(_KK_DTYPE[dense.dtype], n_out, n_in, nnz, row_ptr.data_ptr(), col_idx.data_ptr(),
                               dense.data_ptr(), dense.stride(0), out.data_ptr(), torch.get_num_threads())
    return out


@sparse_gather.register_fake
def _(dense, row_ptr, col_idx, backend):
    return dense.new_empty(col_idx.shape[0])


def _to_dense_setup(ctx, inputs, output):
    _, row_ptr, col_idx, _, backend = inputs
    ctx.save_for_backward(row_ptr, col_idx)
    ctx.backend = backend


def _to_dense_backward(ctx, grad):
    row_ptr, col_idx = ctx.saved_tensors
    return torch.ops.kernelkit.sparse_gather(grad, row_ptr, col_idx, ctx.backend), None, None, None, None


def _gather_setup(ctx, inputs, output):
    dense, row_ptr, col_idx, backend = inputs
    ctx.save_for_backward(row_ptr, col_idx)
    ctx.backend, ctx.n_in = backend, dense.shape[1]


def _gather_backward(ctx, grad):
    row_ptr, col_idx = ctx.saved_tensors
    return (torch.ops.kernelkit.sparse_to_dense(grad.contiguous(), row_ptr, col_idx, ctx.n_in, ctx.backend),
            None, None, None)


sparse_to_dense.register_autograd(_to_dense_backward, setup_context=_to_dense_setup)
sparse_gather.register_autograd(_gather_backward, setup_context=_gather_setup)


_INT32_MAX = 2**31 - 1


def check_index_range(fn: str, backend: str, rows: int, layout: SparseLayout) -> None:
    """ValueError, naming the size, when ``backend`` cannot index a problem this large.  cuda and triton
    keep in-row offsets (< n_in, n_out) in int32 (the layout already guarantees that) and index the
    batch rows with int64; the triton launchers put the batch tiles on grid axis 1 (a batch past 65535
    tiles is split into several launches) and the SDDMM counts its batch loop in int32."""
    if backend in ("triton", "cuda") and rows > _INT32_MAX:
        raise ValueError(f"{fn}: the number of rows of x (the product of x.shape[:-1]) = {rows} exceeds "
                         f"{_INT32_MAX}, the largest backend {backend!r} handles; use backend='cpu' or 'torch'")


def _autocast(*ts):
    """Like F.linear under torch.autocast: float16/bfloat16/float32 inputs are cast to the autocast
    dtype (custom ops are not cast by autocast itself); float64 and None are left alone."""
    dev = ts[0].device.type
    if not (torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)):
        return ts
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t is not None and t.dtype != torch.float64 else t for t in ts)


def check_min_sparsity(min_sparsity, fn: str) -> None:
    """None or a real number (not a bool) in [0, 1], else ValueError naming min_sparsity."""
    if min_sparsity is None:
        return
    ok = (isinstance(min_sparsity, numbers.Real) and not isinstance(min_sparsity, (bool, np.bool_))
          and 0.0 <= float(min_sparsity) <= 1.0)
    if not ok:
        raise ValueError(f"{fn}: min_sparsity must be a number in [0, 1] or None, got {min_sparsity!r}")


def check_layout_args(fn: str, values, layout, bias=None) -> None:
    if not isinstance(layout, SparseLayout):
        raise TypeError(f"{fn}: layout must be a kernelkit.sparse.SparseLayout, got {type(layout).__name__}")
    _checks.tensor(values, "values", fn, ndim=1)
    if values.shape[0] != layout.nnz:
        raise ValueError(f"{fn}: values must have the layout's nnz = {layout.nnz} entries, got {values.shape[0]}")
    if bias is not None:
        _checks.tensor(bias, "bias", fn, ndim=1)
        if bias.shape[0] != layout.n_out:
            raise ValueError(f"{fn}: bias must have n_out = {layout.n_out} entries, got shape {tuple(bias.shape)}")


def sparse_linear(x: Tensor, values: Tensor, layout: SparseLayout, bias: Tensor | None = None, *,
                  backend: str | None = None, min_sparsity: float | None = None) -> Tensor:
    """``y = x W^T + bias`` for a sparse W = ``layout.to_dense(values)``, on sparse kernels.

    Args:
        x: ``(..., n_in)`` input, any strides (copied to rows only if the inner stride is not 1).
        values: ``(nnz,)`` the nonzeros of W in the layout's CSR order.
        layout: the :class:`SparseLayout` of W (on x's device).
        bias: ``(n_out,)`` or None.
        backend: ``"torch" | "cpu" | "triton" | "cuda"`` or None for the default (kernelkit.backend).
        min_sparsity: the sparse kernels run when ``layout.sparsity >= min_sparsity``; below it the
            dense path (``F.linear`` on the scattered W, the same gradients) runs, because there a
            dense GEMM is faster.  None: the backend's measured break-even
            (:data:`BREAK_EVEN_SPARSITY`).  0 always runs the sparse kernels.
    Returns:
        ``(..., n_out)``, x's dtype and device.  Differentiable in x, values and bias (any order).
    Raises:
        TypeError: x, values or bias not a dense float tensor, dtypes that differ (after autocast),
            layout not a SparseLayout.
        ValueError: x.shape[-1] != n_in, values not (nnz,), bias not (n_out,), tensors on different
            devices, an unknown backend, more than 2**31 - 1 rows of x for triton/cuda.
        kernelkit.BackendUnavailableError: the requested backend cannot run here or this dtype.
    """
    fn = "sparse_linear"
    _checks.tensor(x, "x", fn, min_ndim=1)
    check_layout_args(fn, values, layout, bias)
    x, values, bias = _autocast(x, values, bias)
    others = {"values": values} if bias is None else {"values": values, "bias": bias}
    _checks.same(fn, "x", x, **others)
    if layout.device != x.device:
        raise ValueError(f"{fn}: layout is on {layout.device} but x is on {x.device}; move it with layout.to()")
    n_out, n_in = layout.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"{fn}: x.shape[-1] must equal the weight's n_in = {n_in}, got x of shape {tuple(x.shape)}")
    check_min_sparsity(min_sparsity, fn)
    name = _backend.select(fn, x.device, backend, _supports(x.dtype, x.device))
    threshold = BREAK_EVEN_SPARSITY[name] if min_sparsity is None else float(min_sparsity)
    if layout.sparsity < threshold:
        return torch.nn.functional.linear(x, _dense_weight(values, layout, "cpu" if name == "cpu" else "torch"), bias)
    rows = x.numel() // n_in
    check_index_range(fn, name, rows, layout)
    x2 = _checks.rows(x.reshape(rows, n_in))
    out = torch.ops.kernelkit.sparse_linear_fwd(x2, values.contiguous(), *layout.index_tensors(),
                                                None if bias is None else bias.contiguous(), name)
    return out.reshape(*x.shape[:-1], n_out)


def _dense_weight(values: Tensor, layout: SparseLayout, conv: str) -> Tensor:
    """W = to_dense(values) for the dense path.  When no gradient can flow to the values (inference,
    or frozen values) the result is kept on the layout and reused while the same values tensor is
    unchanged (same object, same version counter: an in-place update such as an optimizer step
    invalidates it): a fresh 64 MB weight per call costs its page faults and scatter, ~10% of a
    4096x4096 GEMM at batch 2048 on the CPU.  The cache holds one dense copy of W per layout."""
    n_in = layout.n_in
    cacheable = not (torch.is_grad_enabled() and values.requires_grad) and not torch.compiler.is_compiling()
    if cacheable:
        hit = layout._dense_cache
        if hit is not None and hit[0]() is values and hit[1] == values._version and hit[2] == conv:
            return hit[3]
    w = torch.ops.kernelkit.sparse_to_dense(values.contiguous(), layout.row_ptr, layout.col_idx, n_in, conv)
    if cacheable:
        layout._dense_cache = (weakref.ref(values), values._version, conv, w)
    return w


def dense_grad(x: Tensor, dout: Tensor) -> Tensor:
    """The dense weight gradient ``dout^T x`` (n_out, n_in), batch dimensions flattened: what RigL
    ranks to regrow connections, computed only on mask-update steps.  A dense result is a dense GEMM,
    so this is torch's (MKL / cuBLAS) matmul, accumulated in float32 for half inputs."""
    fn = "dense_grad"
    _checks.tensor(x, "x", fn, min_ndim=1)
    _checks.tensor(dout, "dout", fn, min_ndim=1)
    if x.shape[:-1] != dout.shape[:-1]:
        raise ValueError(f"{fn}: x and dout must have the same batch shape, got {tuple(x.shape)} and {tuple(dout.shape)}")
    x2 = x.reshape(-1, x.shape[-1])
    d2 = dout.reshape(-1, dout.shape[-1])
    if x.dtype in (torch.float16, torch.bfloat16):
        return (d2.float().t() @ x2.float())
    return d2.t() @ x2
