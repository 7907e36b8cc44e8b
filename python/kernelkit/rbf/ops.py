"""RBF kernels as torch.library custom ops (fake + autograd registered) with backend dispatch.

    kernelkit::rbf_grid_build(centers, backend) -> grid            the neighbour grid (uint8 buffer, rbf.h)
    kernelkit::rbf_knn(x, centers, grid, k, backend) -> (dist2, idx)   (dist2 first: see rbf_knn)
    kernelkit::rbf_features(x, centers, shapes, weights, omegas?, idx, kernel, normalize, backend) -> out
    kernelkit::rbf_features_backward(grad, x, centers, shapes, weights, omegas?, idx, kernel, normalize,
                                     needs, backend) -> (dx, dcenters, dshapes, dweights, domegas)

Shapes and dtypes (csrc/include/kernelkit/rbf.h): x (N, D), centers (M, D), shapes (M, D, D) or (M, D),
omegas (C,) in the coordinate dtype (float32 or float64); weights (M, C) in the coordinate dtype or
float16 / bfloat16 with float32 coordinates; out (N, C) in the weights' dtype; idx (N, k) int64 (-1: no
neighbour).  The grid's torch backend is :func:`reference.grid_build_reference` (the bytes the CPU
library writes); the torch backend of the search is brute force (the grid is not read).

rbf_knn's dist2 is differentiable (w.r.t. x and centers; the indices are not).  rbf_features is
differentiable w.r.t. x, centers, shapes, weights and omegas through rbf_features_backward, whose
``needs`` bitmask (1 dx, 2 dcenters, 4 dshapes, 8 dweights, 16 domegas) skips what autograd does not
ask for; gradients it does not compute come back as empty tensors.  A second derivative raises.

The user-facing functions (:func:`build_grid`, :func:`knn`, :func:`rbf_features`) validate their
arguments, naming the one at fault, and pick the backend.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _checks, _lib
from . import reference as R

_stream = _lib.stream
_ptr = _lib.ptr

_KK_DTYPE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
COORD_DTYPES = (torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)
KERNELS = R.KERNELS
MAX_K = 32
NEEDS_DX, NEEDS_DCENTERS, NEEDS_DSHAPES, NEEDS_DWEIGHTS, NEEDS_DOMEGAS = 1, 2, 4, 8, 16
# Below this much work (query-neighbour-channel terms) a CPU call runs on one thread (an OpenMP fork/join
# costs more than the work; see the mfac family's note).
SERIAL_WORK = 1 << 16


def _triton():
    from kernelkit.kernels import rbf as tk  # imported lazily: triton is optional
    return tk


def _nt(work: int) -> int:
    return 1 if work < SERIAL_WORK else torch.get_num_threads()


def _unknown(op: str, backend: str):
    return ValueError(f"kernelkit::{op}: unknown backend {backend!r}")


# ---- kernelkit::rbf_grid_build ------------------------------------------------------------------------
@torch.library.custom_op("kernelkit::rbf_grid_build", mutates_args=())
def rbf_grid_build(centers: Tensor, backend: str) -> Tensor:
    m, dim = centers.shape
    if backend == "torch":
        return R.grid_build_reference(centers)
    centers = centers.contiguous()
    if backend == "triton":
        return _triton().rbf_grid_build(centers)
    nbytes = R.grid_layout(centers.dtype, dim, m)[4]
    grid = torch.empty(nbytes, dtype=torch.uint8, device=centers.device)
    args = (_KK_DTYPE[centers.dtype], dim, m, centers.data_ptr(), dim, grid.data_ptr(), nbytes)
    if backend == "cpu":
        _lib.C().rbf_grid_build_cpu(*args, _nt(m * 64))
    elif backend == "cuda":
        with torch.cuda.device(centers.device):
            ws_bytes = _lib.C().rbf_grid_build_cuda_workspace_size(_KK_DTYPE[centers.dtype], dim, m)
            ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=centers.device)
            _lib.C().rbf_grid_build_cuda(*args, ws.data_ptr(), ws_bytes, _stream(centers))
    else:
        raise _unknown("rbf_grid_build", backend)
    return grid


@rbf_grid_build.register_fake
def _(centers, backend):
    m, dim = centers.shape
    return centers.new_empty(R.grid_layout(centers.dtype, dim, m)[4], dtype=torch.uint8)


def _grid_setup(ctx, inputs, output):
    pass


def _grid_backward(ctx, dgrid):
    raise RuntimeError("kernelkit::rbf_grid_build is not differentiable (an index structure)")


rbf_grid_build.register_autograd(_grid_backward, setup_context=_grid_setup)


# ---- kernelkit::rbf_knn ----------------------------------------------------------------------------------
@torch.library.custom_op("kernelkit::rbf_knn", mutates_args=())
def rbf_knn(x: Tensor, centers: Tensor, grid: Tensor, k: int, backend: str) -> tuple[Tensor, Tensor]:
    """(dist2, idx): the differentiable output first (torch's opcheck sums the outputs in order and
    cannot add a float to an int64 sum); :func:`knn` returns (idx, dist2)."""
    n, dim = x.shape
    m = centers.shape[0]
    if backend == "torch":
        idx, dist2 = R.knn_reference(x, centers, k)
        return dist2, idx
    x = _checks.rows(x) if n else x.contiguous()
    if backend == "triton":
        idx, dist2 = _triton().rbf_knn(x, grid, m, k)
        return dist2, idx
    idx = torch.empty(n, k, dtype=torch.int64, device=x.device)
    dist2 = torch.empty(n, k, dtype=x.dtype, device=x.device)
    args = (_KK_DTYPE[x.dtype], dim, n, x.data_ptr(), x.stride(0) if n else dim, grid.data_ptr(), k,
            idx.data_ptr(), dist2.data_ptr())
    if backend == "cpu":
        _lib.C().rbf_knn_cpu(*args, _nt(n * k * 16))
    elif backend == "cuda":
        with torch.cuda.device(x.device):
            _lib.C().rbf_knn_cuda(*args, _stream(x))
    else:
        raise _unknown("rbf_knn", backend)
    return dist2, idx


@rbf_knn.register_fake
def _(x, centers, grid, k, backend):
    n = x.shape[0]
    return x.new_empty(n, k), x.new_empty(n, k, dtype=torch.int64)


def _knn_setup(ctx, inputs, output):
    x, centers, grid, k, backend = inputs
    _, idx = output
    ctx.mark_non_differentiable(idx)
    ctx.save_for_backward(x, centers, idx)


def _knn_backward(ctx, ddist2, didx):
    x, centers, idx = ctx.saved_tensors
    dx = dc = None
    if ddist2 is None:
        return None, None, None, None, None
    valid = idx >= 0
    ii = idx.clamp_min(0)
    diff = x[:, None, :] - centers[ii]                                       # (N, k, D)
    g = torch.where(valid, ddist2, torch.zeros((), dtype=ddist2.dtype, device=ddist2.device))
    g = torch.where(torch.isfinite(g), g, torch.zeros((), dtype=g.dtype, device=g.device))
    term = 2.0 * g[..., None] * diff
    term = torch.where(valid[..., None], term, torch.zeros((), dtype=term.dtype, device=term.device))
    if ctx.needs_input_grad[0]:
        dx = term.sum(1)
    if ctx.needs_input_grad[1]:
        dc = torch.zeros_like(centers).index_add_(0, ii.reshape(-1), -term.reshape(-1, x.shape[1]))
    return dx, dc, None, None, None


rbf_knn.register_autograd(_knn_backward, setup_context=_knn_setup)


# ---- kernelkit::rbf_features ----------------------------------------------------------------------------
def _shape_full(shapes: Tensor) -> int:
    return 1 if shapes.dim() == 3 else 0


def _feature_args(x, centers, shapes, weights, omegas, idx, kernel, normalize):
    n, dim = x.shape
    m, C = weights.shape
    return (_KK_DTYPE[x.dtype], _KK_DTYPE[weights.dtype], dim, KERNELS[kernel], _shape_full(shapes), n,
            x.data_ptr(), x.stride(0) if n else dim, m, centers.data_ptr(), shapes.data_ptr(), weights.data_ptr(),
            weights.stride(0) if m else C, C, _ptr(omegas), idx.shape[1], idx.data_ptr(), normalize)


def _prep(x, centers, shapes, weights, omegas, idx):
    x = _checks.rows(x) if x.shape[0] else x.contiguous()
    weights = _checks.rows(weights) if weights.shape[0] and weights.shape[1] else weights.contiguous()
    return (x, centers.contiguous(), shapes.contiguous(), weights, None if omegas is None else omegas.contiguous(),
            idx.contiguous())


@torch.library.custom_op("kernelkit::rbf_features", mutates_args=())
def rbf_features_op(x: Tensor, centers: Tensor, shapes: Tensor, weights: Tensor, omegas: Optional[Tensor],
                    idx: Tensor, kernel: str, normalize: int, backend: str) -> Tensor:
    n = x.shape[0]
    C = weights.shape[1]
    if backend == "torch":
        return R.features_reference(x, centers, shapes, weights, omegas, idx, kernel, normalize)
    x, centers, shapes, weights, omegas, idx = _prep(x, centers, shapes, weights, omegas, idx)
    if backend == "triton":
        return _triton().rbf_features_fwd(x, centers, shapes, weights, omegas, idx, KERNELS[kernel], normalize)
    out = torch.empty(n, C, dtype=weights.dtype, device=x.device)
    args = _feature_args(x, centers, shapes, weights, omegas, idx, kernel, normalize) + (out.data_ptr(), max(C, 1))
    if backend == "cpu":
        _lib.C().rbf_features_fwd_cpu(*args, _nt(n * idx.shape[1] * max(C, 1)))
    elif backend == "cuda":
        with torch.cuda.device(x.device):
            _lib.C().rbf_features_fwd_cuda(*args, _stream(x))
    else:
        raise _unknown("rbf_features", backend)
    return out


@rbf_features_op.register_fake
def _(x, centers, shapes, weights, omegas, idx, kernel, normalize, backend):
    return x.new_empty(x.shape[0], weights.shape[1], dtype=weights.dtype)


def _features_setup(ctx, inputs, output):
    x, centers, shapes, weights, omegas, idx, kernel, normalize, backend = inputs
    ctx.save_for_backward(x, centers, shapes, weights, omegas, idx)
    ctx.kernel, ctx.normalize, ctx.backend = kernel, normalize, backend
    ctx.has_omegas = omegas is not None


def _features_backward(ctx, dout):
    x, centers, shapes, weights, omegas, idx = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs = ((NEEDS_DX if need[0] else 0) | (NEEDS_DCENTERS if need[1] else 0) | (NEEDS_DSHAPES if need[2] else 0)
             | (NEEDS_DWEIGHTS if need[3] else 0) | (NEEDS_DOMEGAS if (need[4] and ctx.has_omegas) else 0))
    if not needs:
        return (None,) * 9
    dx, dc, ds, dw, do = rbf_features_backward(dout, x, centers, shapes, weights, omegas, idx, ctx.kernel,
                                               ctx.normalize, needs, ctx.backend)
    return (dx if need[0] else None, dc if need[1] else None, ds if need[2] else None,
            dw.to(weights.dtype) if need[3] else None, do if (need[4] and ctx.has_omegas) else None,
            None, None, None, None)


rbf_features_op.register_autograd(_features_backward, setup_context=_features_setup)


# ---- kernelkit::rbf_features_backward -------------------------------------------------------------------
def _grad_shapes(x, centers, shapes, weights, omegas, needs):
    """(shape, dtype) of each of the five gradients ((0,) when not needed)."""
    cd = x.dtype
    have = (needs & NEEDS_DX, needs & NEEDS_DCENTERS, needs & NEEDS_DSHAPES, needs & NEEDS_DWEIGHTS,
            (needs & NEEDS_DOMEGAS) and omegas is not None)
    full = (tuple(x.shape), tuple(centers.shape), tuple(shapes.shape), tuple(weights.shape),
            (weights.shape[1],))
    return [(full[i] if have[i] else (0,), cd) for i in range(5)]


@torch.library.custom_op("kernelkit::rbf_features_backward", mutates_args=())
def rbf_features_backward(grad: Tensor, x: Tensor, centers: Tensor, shapes: Tensor, weights: Tensor,
                          omegas: Optional[Tensor], idx: Tensor, kernel: str, normalize: int, needs: int,
                          backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    specs = _grad_shapes(x, centers, shapes, weights, omegas, needs)
    if backend == "torch":
        flags = (bool(needs & NEEDS_DX), bool(needs & NEEDS_DCENTERS), bool(needs & NEEDS_DSHAPES),
                 bool(needs & NEEDS_DWEIGHTS), bool(needs & NEEDS_DOMEGAS) and omegas is not None)
        res = R.features_backward_reference(grad, x, centers, shapes, weights, omegas, idx, kernel, normalize, flags)
        return tuple(r.contiguous() if r is not None else x.new_empty(0) for r in res)
    x, centers, shapes, weights, omegas, idx = _prep(x, centers, shapes, weights, omegas, idx)
    grad = _checks.rows(grad) if grad.shape[0] and grad.shape[1] else grad.contiguous()
    if backend == "triton":
        flags = tuple(s[0] != (0,) for s in specs)
        res = _triton().rbf_features_bwd(grad, x, centers, shapes, weights, omegas, idx, KERNELS[kernel],
                                         normalize, flags)
        return tuple(r if r is not None else x.new_empty(0) for r in res)
    outs = [torch.empty(s, dtype=dt, device=x.device) for s, dt in specs]
    ptrs = [o.data_ptr() if s != (0,) else 0 for o, (s, _) in zip(outs, specs)]   # NULL: not needed
    args = (_feature_args(x, centers, shapes, weights, omegas, idx, kernel, normalize)
            + (grad.data_ptr(), grad.stride(0) if grad.shape[0] else max(weights.shape[1], 1), *ptrs))
    if backend == "cpu":
        _lib.C().rbf_features_bwd_cpu(*args, _nt(x.shape[0] * idx.shape[1] * max(weights.shape[1], 1)))
    elif backend == "cuda":
        with torch.cuda.device(x.device):
            _lib.C().rbf_features_bwd_cuda(*args, _stream(x))
    else:
        raise _unknown("rbf_features_backward", backend)
    return tuple(outs)


@rbf_features_backward.register_fake
def _(grad, x, centers, shapes, weights, omegas, idx, kernel, normalize, needs, backend):
    return tuple(x.new_empty(s, dtype=dt) for s, dt in _grad_shapes(x, centers, shapes, weights, omegas, needs))


def _bwd_setup(ctx, inputs, output):
    pass


def _bwd_backward(ctx, *grads):
    raise RuntimeError("kernelkit.rbf: the features are differentiable once; a second derivative (e.g. an "
                       "eikonal loss on the normals) is not implemented")


rbf_features_backward.register_autograd(_bwd_backward, setup_context=_bwd_setup)


# ---- user-facing functions --------------------------------------------------------------------------------
def _supports(coord: torch.dtype, wdtype: torch.dtype | None = None):
    def check(name: str) -> str | None:
        if coord not in COORD_DTYPES:
            return f"coordinate dtype {coord} not supported (float32, float64)"
        if wdtype is not None and wdtype != coord and not (coord == torch.float32 and wdtype in HALF_DTYPES):
            return f"weights dtype {wdtype} with {coord} coordinates not supported"
        return None
    return check


def _pick(fn: str, t: Tensor, coord, wdtype, backend):
    return _backend.select(fn, t.device, backend, _supports(coord, wdtype))


def _points(t, name: str, fn: str, dim: int | None = None) -> Tensor:
    t = _checks.tensor(t, name, fn, ndim=2)
    if t.dtype not in COORD_DTYPES:
        raise TypeError(f"{fn}: {name} must be float32 or float64, got {t.dtype}")
    if t.shape[1] not in (2, 3):
        raise ValueError(f"{fn}: {name} must be (n, 2) or (n, 3) points, got shape {tuple(t.shape)}")
    if dim is not None and t.shape[1] != dim:
        raise ValueError(f"{fn}: {name} has {t.shape[1]} coordinates per point but centers have {dim}")
    return t


def _check_k(k, fn: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{fn}: k must be an int, got {type(k).__name__}")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"{fn}: k must be in [1, {MAX_K}], got {k}")
    return k


_SKIP_VALUES = [False]


def _values_checked() -> bool:
    """Value checks read the data (a device sync on CUDA); skipped under torch.compile and for
    ``check_values=False``."""
    return not torch.compiler.is_compiling() and not _SKIP_VALUES[-1]


def check_centers(centers: Tensor, fn: str) -> None:
    if _values_checked() and centers.numel() and not bool(torch.isfinite(centers).all()):
        bad = int((~torch.isfinite(centers)).any(1).nonzero()[0, 0])
        raise ValueError(f"{fn}: centers has a non-finite coordinate (RBF {bad})")
    if centers.shape[0] >= 2 ** 31:
        raise ValueError(f"{fn}: centers has {centers.shape[0]} rows; at most 2^31 - 1 RBFs")


def check_shapes_layout(shape: tuple, kernel: str, m: int, dim: int, fn: str) -> None:
    """The layout of ``shapes`` (its shape tuple) by kernel: (M, D) scales for nlin, else (M, D, D) inverse
    covariances or their (M, D) diagonals (also used by kernelkit.jax.rbf)."""
    shape = tuple(shape)
    if kernel == "nlin":
        if shape != (m, dim):
            raise ValueError(f"{fn}: shapes for kernel='nlin' are the per-RBF scales (M, D) = ({m}, {dim}), got "
                             f"shape {shape}")
    elif shape not in ((m, dim, dim), (m, dim)):
        raise ValueError(f"{fn}: shapes must be (M, D, D) = ({m}, {dim}, {dim}) inverse covariances or their "
                         f"diagonals (M, D) = ({m}, {dim}), got shape {shape}")


def check_shapes(shapes: Tensor, kernel: str, m: int, dim: int, fn: str) -> None:
    """Layout by kernel, then values: finite; full shapes symmetric to a relative 1e-5 and positive
    definite; diagonal shapes and nlin scales > 0."""
    check_shapes_layout(shapes.shape, kernel, m, dim, fn)
    if not _values_checked() or not shapes.numel():
        return
    s = shapes.detach()
    finite = torch.isfinite(s.reshape(m, -1)).all(1)
    if not bool(finite.all()):
        raise ValueError(f"{fn}: shapes has a non-finite entry (RBF {int((~finite).nonzero()[0, 0])})")
    if s.dim() == 2:
        pos = (s > 0).all(1)
        if not bool(pos.all()):
            what = "scales" if kernel == "nlin" else "diagonal shapes"
            raise ValueError(f"{fn}: {what} must be > 0 (RBF {int((~pos).nonzero()[0, 0])} has "
                             f"{s[int((~pos).nonzero()[0, 0])].tolist()})")
        return
    asym = (s - s.transpose(1, 2)).abs().amax((1, 2))
    scale = s.abs().amax((1, 2))
    bad = asym > 1e-5 * scale
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{fn}: shapes[{i}] is not symmetric (max |A - A^T| = {float(asym[i]):.3g}, "
                         f"|A|max = {float(scale[i]):.3g}; allowed 1e-5 relative)")
    _, info = torch.linalg.cholesky_ex(s.double())
    if bool((info != 0).any()):
        i = int((info != 0).nonzero()[0, 0])
        raise ValueError(f"{fn}: shapes[{i}] is not positive definite ({s[i].tolist()})")


def build_grid(centers: Tensor, *, backend: str | None = None) -> Tensor:
    """The neighbour grid over ``centers`` (M, 2 or 3): a uint8 buffer (layout in rbf.h) to pass to
    :func:`knn` / :func:`rbf_features` while the centres do not change."""
    fn = "kernelkit.rbf.build_grid"
    centers = _points(centers, "centers", fn)
    check_centers(centers, fn)
    return rbf_grid_build(centers.detach(), _pick(fn, centers, centers.dtype, None, backend))


def _check_grid(grid: Tensor, centers: Tensor, fn: str) -> None:
    if not isinstance(grid, Tensor) or grid.dtype != torch.uint8 or grid.dim() != 1:
        raise TypeError(f"{fn}: grid must be the uint8 tensor from kernelkit.rbf.build_grid")
    m, dim = centers.shape
    need = R.grid_layout(centers.dtype, dim, m)[4]
    if grid.numel() != need:
        raise ValueError(f"{fn}: grid has {grid.numel()} bytes but a grid over {m} centres of dim {dim} "
                         f"({centers.dtype}) has {need}: was it built from these centers?")
    if grid.device != centers.device:
        raise ValueError(f"{fn}: grid is on {grid.device} but centers is on {centers.device}")


def knn(queries: Tensor, centers: Tensor, k: int, *, grid: Tensor | None = None,
        backend: str | None = None) -> tuple[Tensor, Tensor]:
    """The k nearest centres of each query: (indices int64 (N, k), squared distances (N, k)), sorted by
    (distance, index); k > M pads with -1 / +inf; a non-finite query gets -1 / NaN.  ``grid`` (from
    :func:`build_grid`) saves rebuilding it when the centres are fixed.  dist2 is differentiable."""
    fn = "kernelkit.rbf.knn"
    centers = _points(centers, "centers", fn)
    queries = _points(queries, "queries", fn, dim=centers.shape[1])
    _checks.same(fn, "centers", centers, queries=queries)
    k = _check_k(k, fn)
    be = _pick(fn, centers, centers.dtype, None, backend)
    if grid is None:
        check_centers(centers, fn)
        grid = rbf_grid_build(centers.detach(), be)
    else:
        _check_grid(grid, centers, fn)
    dist2, idx = rbf_knn(queries, centers, grid, k, be)
    return idx, dist2


def _normalize_mode(normalize, detach_denominator, fn: str) -> int:
    if not isinstance(normalize, bool):
        raise TypeError(f"{fn}: normalize must be a bool, got {type(normalize).__name__}")
    if not isinstance(detach_denominator, bool):
        raise TypeError(f"{fn}: detach_denominator must be a bool, got {type(detach_denominator).__name__}")
    if not normalize:
        return R.NORM_NONE
    return R.NORM_DETACHED if detach_denominator else R.NORM_FULL


def rbf_features(x: Tensor, centers: Tensor, shapes: Tensor, weights: Tensor, omegas: Tensor | None = None,
                 k: int = 8, kernel: str = "ivq", normalize: bool = True, *, idx: Tensor | None = None,
                 grid: Tensor | None = None, detach_denominator: bool = True, check_values: bool = True,
                 backend: str | None = None) -> Tensor:
    """NeuRBF's adaptive RBF features, fused: out[n, j] = sum over the k nearest RBFs i of
    weights[i, j] * sin(omegas[j] * phih_i(x_n)) (or weights[i, j] * phih_i without omegas), with
    phih the kernel values ("ivq" 1/(1 + o^T A o), "gauss" exp(-o^T A o / 2), "nlin" prod_d clamp(1 -
    |o_d| s_d, 0, 1); o = x - mu_i) divided by their sum + 1e-8 when ``normalize`` (the denominator
    detached in the backward as NeuRBF does unless ``detach_denominator=False``).

    x (N, D), centers (M, D), shapes (M, D, D) / (M, D) (the inverse covariances, NeuRBF's ``ks``; for
    "nlin" the scales (M, D)), weights (M, C), omegas (C,).  ``idx`` (N, k) int64 gives precomputed
    neighbours (else they are searched, through ``grid`` when given).  Differentiable w.r.t. x,
    centers, shapes, weights and omegas.  Returns (N, C) in the weights' dtype.

    ``check_values=False`` skips the checks that read the data (finite centres and omegas, symmetric
    positive definite shapes, idx in range: a Cholesky of every shape and, on a GPU, a sync) for callers
    that validated them already (RBFField with frozen geometry checks once); layouts and dtypes are
    always checked, and the CPU library still checks the shapes and idx itself.
    """
    fn = "kernelkit.rbf.rbf_features"
    _SKIP_VALUES.append(not check_values)
    try:
        return _rbf_features(fn, x, centers, shapes, weights, omegas, k, kernel, normalize, idx, grid,
                             detach_denominator, backend)
    finally:
        _SKIP_VALUES.pop()


def _rbf_features(fn, x, centers, shapes, weights, omegas, k, kernel, normalize, idx, grid, detach_denominator,
                  backend):
    centers = _points(centers, "centers", fn)
    m, dim = centers.shape
    x = _points(x, "x", fn, dim=dim)
    _checks.same(fn, "x", x, centers=centers)
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise ValueError(f"{fn}: kernel must be one of {', '.join(repr(s) for s in KERNELS)}, got {kernel!r}")
    shapes = _checks.tensor(shapes, "shapes", fn)
    _checks.same(fn, "x", x, shapes=shapes)
    check_shapes(shapes, kernel, m, dim, fn)
    weights = _checks.tensor(weights, "weights", fn, ndim=2)
    if weights.shape[0] != m:
        raise ValueError(f"{fn}: weights must be (M, C) with M = {m} (the centers' rows), got shape "
                         f"{tuple(weights.shape)}")
    if weights.device != x.device:
        raise ValueError(f"{fn}: weights is on {weights.device} but x is on {x.device}")
    C = weights.shape[1]
    if omegas is not None:
        omegas = _checks.tensor(omegas, "omegas", fn, ndim=1)
        _checks.same(fn, "x", x, omegas=omegas)
        if omegas.shape[0] != C:
            raise ValueError(f"{fn}: omegas must have C = {C} entries (weights' columns), got {omegas.shape[0]}")
        if _values_checked() and C and not bool(torch.isfinite(omegas).all()):
            raise ValueError(f"{fn}: omegas has a non-finite entry")
    mode = _normalize_mode(normalize, detach_denominator, fn)
    be = _pick(fn, x, x.dtype, weights.dtype, backend)
    if idx is None:
        k = _check_k(k, fn)
        with torch.no_grad():
            if grid is None:
                check_centers(centers, fn)
                grid = rbf_grid_build(centers.detach(), be)
            else:
                _check_grid(grid, centers, fn)
            idx = rbf_knn(x.detach(), centers.detach(), grid, k, be)[1]
    else:
        if not isinstance(idx, Tensor) or idx.dtype != torch.int64 or idx.dim() != 2 or idx.shape[0] != x.shape[0]:
            raise ValueError(f"{fn}: idx must be an (N, k) = ({x.shape[0]}, k) int64 tensor, got "
                             f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}")
        _check_k(idx.shape[1], fn + " (idx.shape[1])")
        if idx.device != x.device:
            raise ValueError(f"{fn}: idx is on {idx.device} but x is on {x.device}")
        if _values_checked() and idx.numel() and bool(((idx < -1) | (idx >= m)).any()):
            raise ValueError(f"{fn}: idx entries must be -1 (no neighbour) or in [0, {m})")
    return rbf_features_op(x, centers, shapes, weights, omegas, idx, kernel, mode, be)
