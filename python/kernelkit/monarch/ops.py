"""Monarch product as torch.library custom ops (fake + autograd registered), backend dispatch.

    kernelkit::monarch_fwd(x, w1, w2, backend) -> out            x (B, k*p) rows, out (B, l*s)
    kernelkit::monarch_bwd(x, w1, w2, dout, backend, need_dx, need_dw1, need_dw2) -> (dx, dw1, dw2)

The backward saves only x, w1, w2 and recomputes the intermediate inside the kernels.  Gradients
that were not asked for come back as empty tensors (custom ops cannot return None).  The backward
op is itself differentiable (double backward), through the same two ops.  The user-facing
entry point is :func:`monarch_matmul`; it validates, flattens the batch and picks the backend.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _checks, _lib

from .reference import monarch_reference, monarch_reference_bwd

_stream = _lib.stream

_KK_DTYPE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_SUPPORTED = {
    "torch": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "cpu": (torch.float32, torch.float64),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}


def _supports(dtype: torch.dtype, device: torch.device | None = None):
    def check(name: str) -> str | None:
        ok = _SUPPORTED[name]
        if name == "triton" and device is not None and device.type == "cpu":
            # Under the interpreter the Triton kernels also run float64 (gradcheck through them);
            # float64 on a real GPU has not been run on hardware yet, so it goes to torch there.
            ok = ok + (torch.float64,)
        if dtype in ok:
            return None
        return f"dtype {dtype} not supported (it handles {', '.join(str(d).replace('torch.', '') for d in ok)})"
    return check


def _dims(w1: Tensor, w2: Tensor):
    return (*w1.shape, *w2.shape)


def _triton():
    from kernelkit.kernels import monarch as tk  # imported lazily: triton is optional
    return tk


@torch.library.custom_op("kernelkit::monarch_fwd", mutates_args=())
def monarch_fwd(x: Tensor, w1: Tensor, w2: Tensor, backend: str) -> Tensor:
    k, q, p, l, s, r = _dims(w1, w2)
    B = x.shape[0]
    if backend == "torch":
        return monarch_reference(x, w1, w2).contiguous()
    if backend == "triton":
        return _triton().monarch_fwd(x, w1, w2, allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    out = x.new_empty(B, l * s)
    if backend == "cpu":
        _lib.C().monarch_fwd_cpu(_KK_DTYPE[x.dtype], B, k, q, p, l, s, r, x.data_ptr(), x.stride(0),
                                 w1.data_ptr(), w2.data_ptr(), out.data_ptr(), out.stride(0),
                                 torch.get_num_threads())
    elif backend == "cuda":
        with torch.cuda.device(x.device):
            _lib.C().monarch_fwd_cuda(_KK_DTYPE[x.dtype], B, k, q, p, l, s, r, x.data_ptr(), x.stride(0),
                                      w1.data_ptr(), w2.data_ptr(), out.data_ptr(), out.stride(0), _stream(x))
    else:
        raise ValueError(f"kernelkit::monarch_fwd: unknown backend {backend!r}")
    return out


@monarch_fwd.register_fake
def _(x, w1, w2, backend):
    return x.new_empty(x.shape[0], w2.shape[0] * w2.shape[1])


@torch.library.custom_op("kernelkit::monarch_bwd", mutates_args=())
def monarch_bwd(x: Tensor, w1: Tensor, w2: Tensor, dout: Tensor, backend: str,
                need_dx: bool, need_dw1: bool, need_dw2: bool) -> tuple[Tensor, Tensor, Tensor]:
    k, q, p, l, s, r = _dims(w1, w2)
    B = x.shape[0]
    empty = x.new_empty(0)
    if backend == "torch":
        dx, dw1, dw2 = monarch_reference_bwd(x, w1, w2, dout)
        return (dx.contiguous() if need_dx else empty, dw1 if need_dw1 else empty.clone(),
                dw2 if need_dw2 else empty.clone())
    if backend == "triton":
        dx, dw1, dw2 = _triton().monarch_bwd(x, w1, w2, dout, need_dx=need_dx, need_dw1=need_dw1,
                                             need_dw2=need_dw2, allow_tf32=torch.backends.cuda.matmul.allow_tf32)
        return (dx if need_dx else empty, dw1 if need_dw1 else empty.clone(), dw2 if need_dw2 else empty.clone())
    dx = x.new_empty(B, k * p) if need_dx else x.new_empty(0)
    dw1 = torch.empty_like(w1) if need_dw1 else x.new_empty(0)
    dw2 = torch.empty_like(w2) if need_dw2 else x.new_empty(0)
    ptr = lambda t, need: t.data_ptr() if need else 0  # noqa: E731 (NULL = not wanted)
    args = (_KK_DTYPE[x.dtype], B, k, q, p, l, s, r, x.data_ptr(), x.stride(0), w1.data_ptr(), w2.data_ptr(),
            dout.data_ptr(), dout.stride(0), ptr(dx, need_dx), k * p, ptr(dw1, need_dw1), ptr(dw2, need_dw2))
    if backend == "cpu":
        _lib.C().monarch_bwd_cpu(*args, torch.get_num_threads())
    elif backend == "cuda":
        with torch.cuda.device(x.device):
            nbytes = _lib.C().monarch_bwd_cuda_workspace_size(*args[:8])
            ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=x.device)
            _lib.C().monarch_bwd_cuda(*args, ws.data_ptr(), nbytes, _stream(x))
    else:
        raise ValueError(f"kernelkit::monarch_bwd: unknown backend {backend!r}")
    return dx, dw1, dw2


@monarch_bwd.register_fake
def _(x, w1, w2, dout, backend, need_dx, need_dw1, need_dw2):
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            w1.new_empty(w1.shape) if need_dw1 else x.new_empty(0),
            w2.new_empty(w2.shape) if need_dw2 else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, w1, w2, backend = inputs
    ctx.save_for_backward(x, w1, w2)
    ctx.backend = backend


def _backward(ctx, grad):
    x, w1, w2 = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    dx, dw1, dw2 = torch.ops.kernelkit.monarch_bwd(x, w1, w2, _checks.rows(grad), ctx.backend, *need)
    return (dx if need[0] else None, dw1 if need[1] else None, dw2 if need[2] else None, None)


monarch_fwd.register_autograd(_backward, setup_context=_setup_context)


# Double backward.  monarch_bwd's outputs are dx = J_x^T dout, dw1, dw2: linear in dout, and each
# linear in the factor it does not differentiate.  So their vector-Jacobian products are again
# Monarch products and gradients, e.g. for upstream (gdx, gdw1, gdw2):
#   grad_dout = M(gdx; w1, w2) + M(x; gdw1, w2) + M(x; w1, gdw2)
#   grad_x    = dx(x; gdw1, w2 | dout) + dx(x; w1, gdw2 | dout)
#   grad_w1   = dw1(gdx; w1, w2 | dout) + dw1(x; w1, gdw2 | dout)
#   grad_w2   = dw2(gdx; w1, w2 | dout) + dw2(x; gdw1, w2 | dout)
# (M = monarch_fwd, dx/dw1/dw2 = monarch_bwd's outputs for the given inputs and upstream dout),
# built from the same two ops, so every order of derivative works on every backend.
def _bwd_setup_context(ctx, inputs, output):
    x, w1, w2, dout, backend, *_ = inputs
    ctx.save_for_backward(x, w1, w2, dout)
    ctx.backend = backend


def _given(g):
    return g is not None and g.numel() > 0


def _bwd_backward(ctx, gdx, gdw1, gdw2):
    saved = ctx.saved_tensors
    dout = saved[3]
    need, need_dout = ctx.needs_input_grad[:3], ctx.needs_input_grad[3]
    grads, gd = [None, None, None], None
    # Each upstream gradient replaces the input it belongs to (slot); the product with that
    # substitution gives its grad_dout term, and its gradients w.r.t. the other two inputs give
    # the terms of theirs (see the formulas above).
    for slot, g in enumerate((gdx, gdw1, gdw2)):
        if not _given(g):
            continue
        args = list(saved[:3])
        args[slot] = _checks.rows(g) if slot == 0 else g.contiguous()
        if need_dout:
            term = torch.ops.kernelkit.monarch_fwd(*args, ctx.backend)
            gd = term if gd is None else gd + term
        want = [bool(need[i]) and i != slot for i in range(3)]
        if any(want):
            out = torch.ops.kernelkit.monarch_bwd(*args, dout, ctx.backend, *want)
            for i in range(3):
                if want[i]:
                    grads[i] = out[i] if grads[i] is None else grads[i] + out[i]
    return (*grads, gd, None, None, None, None)


monarch_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup_context)


def check_factors(w1: Tensor, w2: Tensor, fn: str) -> None:
    _checks.tensor(w1, "w1", fn, ndim=3)
    _checks.tensor(w2, "w2", fn, ndim=3)
    for name, w in (("w1", w1), ("w2", w2)):
        if 0 in w.shape:
            raise ValueError(f"{fn}: {name} must have no empty dimension, got shape {tuple(w.shape)}")
    k, q, p = w1.shape
    l, s, r = w2.shape
    if l * r != k * q:
        raise ValueError(f"{fn}: w2 must consume w1's output: w2.shape[0]*w2.shape[2] (= {l}*{r} = {l * r}) "
                         f"must equal w1.shape[0]*w1.shape[1] (= {k}*{q} = {k * q})")


_INT32_MAX = 2**31 - 1
_GRID_YZ_MAX = 65535  # CUDA's limit on a launch grid's y and z dimensions
_OFFSETS, _GRID = "32-bit offsets", "blocks on a grid axis"


def _index_limits(backend: str, rows: int, k: int, q: int, p: int, l: int, s: int, r: int):
    """(what, value, limit, why) for each size that ``backend`` cannot take past ``limit``.

    cuda: the checks of csrc/cuda/monarch.cu (check_shapes).  triton: kernels/monarch.py keeps
    in-row offsets (< k*p, k*q, l*s and the factor sizes) and the batch-reduction trip count in
    int32, and puts k or l on a launch grid axis.  torch and cpu (int64 throughout) have no limit."""
    if backend == "cuda":
        dims = [(f"w1.shape[{i}]", v) for i, v in enumerate((k, q, p))]
        dims += [(f"w2.shape[{i}]", v) for i, v in enumerate((l, s, r))]
        return [(what, v, _INT32_MAX, _OFFSETS) for what, v in dims] + [
            ("x.shape[-1] (= k*p)", k * p, _INT32_MAX, _OFFSETS),
            ("w1.shape[0]*w1.shape[1] (= k*q)", k * q, _INT32_MAX, _OFFSETS),
            ("w2.shape[0]*w2.shape[1] (= l*s, the output width)", l * s, _INT32_MAX, _OFFSETS),
            ("the number of rows of x (the product of x.shape[:-1])", rows, 16 * _INT32_MAX, _OFFSETS),
        ]
    if backend == "triton":
        return [
            ("x.shape[-1] (= k*p)", k * p, _INT32_MAX, _OFFSETS),
            ("w1.shape[0]*w1.shape[1] (= k*q)", k * q, _INT32_MAX, _OFFSETS),
            ("w2.shape[0]*w2.shape[1] (= l*s, the output width)", l * s, _INT32_MAX, _OFFSETS),
            ("w1.numel() (= k*q*p)", k * q * p, _INT32_MAX, _OFFSETS),
            ("w2.numel() (= l*s*r)", l * s * r, _INT32_MAX, _OFFSETS),
            ("the number of rows of x (the product of x.shape[:-1])", rows, _INT32_MAX, _OFFSETS),
            # the launchers put the block index (k or l) on grid axis 1: at most 65535 programs
            ("w1.shape[0] (= k, a launch grid axis)", k, _GRID_YZ_MAX, _GRID),
            ("w2.shape[0] (= l, a launch grid axis)", l, _GRID_YZ_MAX, _GRID),
        ]
    return []


def check_index_range(fn: str, backend: str, rows: int, w1_shape, w2_shape) -> None:
    """ValueError, naming the argument, when ``backend`` cannot index a problem this large (before
    anything is allocated or launched: inputs may be expanded views of huge logical size)."""
    for what, value, limit, why in _index_limits(backend, rows, *w1_shape, *w2_shape):
        if value > limit:
            raise ValueError(f"{fn}: {what} = {value} exceeds {limit}, the largest size backend {backend!r} "
                             f"handles ({why}); use backend='torch' for a problem this large")


def _autocast(x: Tensor, w1: Tensor, w2: Tensor):
    """Like F.linear under torch.autocast: every float16/bfloat16/float32 input is cast to the
    autocast dtype (custom ops are not cast by autocast itself); float64 is left alone, as autocast
    leaves it.  Gradients still reach float32 parameters through the casts."""
    dev = x.device.type
    if not (torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)):
        return x, w1, w2
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t.dtype != torch.float64 else t for t in (x, w1, w2))


def monarch_matmul(x: Tensor, w1: Tensor, w2: Tensor, *, backend: str | None = None) -> Tensor:
    """Generalized Monarch product ``y = P2 · blockdiag(w2) · P1 · blockdiag(w1) · x`` (fly layout).

    Args:
        x: ``(..., k*p)`` input.  Any strides (copied to rows only if the inner stride is not 1).
        w1: ``(k, q, p)`` first block-diagonal factor (k blocks of q x p, out x in).
        w2: ``(l, s, r)`` second factor, with ``l*r == k*q``.
        backend: ``"torch" | "cpu" | "triton" | "cuda"`` or None for the default (see kernelkit.backend).
    Returns:
        ``(..., l*s)`` tensor, same dtype and device as x.  Differentiable in x, w1 and w2.
    Raises:
        TypeError: x, w1 or w2 is not a dense (strided) torch.Tensor of dtype float32, float64,
            float16 or bfloat16, or their dtypes differ (after autocast), or backend is not a str.
        ValueError: a wrong rank (x needs >= 1 dimension, w1 and w2 exactly 3), an empty factor
            dimension, ``l*r != k*q``, ``x.shape[-1] != k*p``, inputs on different devices, an
            unknown backend name, or a problem too large for the chosen backend: ``"triton"`` and
            ``"cuda"`` index with 32-bit integers, so k*p, k*q and l*s must be < 2**31, and so must
            w1.numel(), w2.numel() and the number of rows of x for triton (whose launch grids
            also put k and l on an axis of at most 65535 blocks), and each factor
            dimension for cuda (whose rows must be < 16 * (2**31 - 1)).  ``"torch"`` and ``"cpu"``
            have no such limit.  Checked before anything is copied or launched.
        kernelkit.BackendUnavailableError: the requested backend cannot run here or this dtype.
    Under ``torch.autocast`` the inputs are cast to the autocast dtype first, as F.linear's are
    (float64 inputs are not cast, as autocast does not cast them).
    NaN/inf in the inputs propagate to the outputs they touch (as in a dense matmul); they are not
    checked, so that the op costs no extra pass over x.
    """
    fn = "monarch_matmul"
    _checks.tensor(x, "x", fn, min_ndim=1)
    check_factors(w1, w2, fn)
    x, w1, w2 = _autocast(x, w1, w2)
    _checks.same(fn, "x", x, w1=w1, w2=w2)
    k, q, p = w1.shape
    l, s, r = w2.shape
    if x.shape[-1] != k * p:
        raise ValueError(f"{fn}: x.shape[-1] must equal w1.shape[0]*w1.shape[2] (= {k}*{p} = {k * p}), "
                         f"got x of shape {tuple(x.shape)}")
    name = _backend.select(fn, x.device, backend, _supports(x.dtype, x.device))
    check_index_range(fn, name, x.numel() // (k * p), w1.shape, w2.shape)
    x2 = _checks.rows(x.reshape(-1, k * p))
    out = torch.ops.kernelkit.monarch_fwd(x2, w1.contiguous(), w2.contiguous(), name)
    return out.reshape(*x.shape[:-1], l * s)
