"""rbf for JAX: NeuRBF's adaptive RBF features on kk_rbf_* (csrc/include/kernelkit/rbf.h).

* :func:`build_grid` (kk_rbf_grid_build_*): the neighbour grid over the centres, a uint8 array;
* :func:`knn` (kk_rbf_knn_*): the k nearest centres of each query (idx, dist2); dist2 is
  differentiable w.r.t. the queries and the centres (its vjp is written in jax.numpy: the C ABI has no
  backward for the search, and the indices are piecewise constant);
* :func:`rbf_features` (kk_rbf_features_{fwd,bwd}_*): the fused field evaluation, a ``jax.custom_vjp``
  whose backward is the C backward, differentiable w.r.t. x, centers, shapes, weights and omegas.  When
  ``idx`` is not given the neighbours are searched through the grid, as the torch function does.

All work under ``jax.jit`` and ``jax.vmap`` (any argument batched: each batch element runs the kernel
on its own slices).

Index dtype.  The C ABI takes int64 indices, which JAX has only with x64 enabled
(``jax.config.update("jax_enable_x64", True)`` or ``with jax.enable_x64(True):``).  On the CPU the
custom calls take and give int32 indices as well (widened into / narrowed from a host scratch vector):
:func:`knn` returns int64 idx when x64 is enabled, int32 otherwise, and :func:`rbf_features` takes
either.  On a GPU the indices must be int64 (there is no device-side conversion): without x64 the
functions raise a TypeError at trace time saying so.

Values.  Arguments are checked at trace time for types, ranks, shapes and dtypes (errors name the
argument).  Values cannot be read at trace time under ``jax.jit``: the CPU library checks them when
the call runs (finite centres; shapes symmetric positive definite / scales > 0; idx in [-1, M)) and
the call then fails with an XLA runtime error carrying kernelkit's message; the CUDA library does not
check them (rbf.h).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernelkit.rbf.ops import check_shapes_layout  # the torch op's layout rule

from ._common import call, check_array, check_platform, spec

KERNELS = {"ivq": 0, "gauss": 1, "nlin": 2}
NORM_NONE, NORM_DETACHED, NORM_FULL = 0, 1, 2
MAX_K = 32
_KK_DTYPE = {np.dtype("float32"): 0, np.dtype("float64"): 1}
_COORD = (np.dtype("float32"), np.dtype("float64"))
_HALF = (np.dtype(jnp.float16), np.dtype(jnp.bfloat16))
_INDEX = (np.dtype("int32"), np.dtype("int64"))


# ---- argument checks ----------------------------------------------------------------------------------
def _index_dtype(fn: str, plat: str) -> np.dtype:
    """int64 with x64 enabled, else int32 (CPU only)."""
    dt = np.dtype(jax.dtypes.canonicalize_dtype(np.int64))
    if dt != np.dtype("int64") and plat == "cuda":
        raise TypeError(f"{fn}: on a GPU the neighbour indices must be int64: enable x64 "
                        "(jax.config.update('jax_enable_x64', True))")
    return dt


def _points(t, name: str, fn: str, dim: int | None = None, dtype=None) -> None:
    check_array(t, name, fn, ndim=2)
    if np.dtype(t.dtype) not in _COORD:
        raise TypeError(f"{fn}: {name} must be float32 or float64, got {np.dtype(t.dtype).name}")
    if t.shape[1] not in (2, 3):
        raise ValueError(f"{fn}: {name} must be (n, 2) or (n, 3) points, got shape {tuple(t.shape)}")
    if dim is not None and t.shape[1] != dim:
        raise ValueError(f"{fn}: {name} has {t.shape[1]} coordinates per point but centers have {dim}")
    if dtype is not None and np.dtype(t.dtype) != np.dtype(dtype):
        raise TypeError(f"{fn}: {name} must have centers' dtype {np.dtype(dtype).name}, got {np.dtype(t.dtype).name}")


def _centers(centers, fn: str) -> None:
    _points(centers, "centers", fn)
    if centers.shape[0] >= 2 ** 31:
        raise ValueError(f"{fn}: centers has {centers.shape[0]} rows; at most 2^31 - 1 RBFs")


def _check_k(k, fn: str) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{fn}: k must be an int, got {type(k).__name__}")
    if not 1 <= int(k) <= MAX_K:
        raise ValueError(f"{fn}: k must be in [1, {MAX_K}], got {k}")
    return int(k)


def grid_bytes(dtype, dim: int, m: int) -> int:
    """Bytes of the grid over m centres of ``dtype`` in ``dim`` dimensions (kk_rbf_grid_layout)."""
    from kernelkit import _lib
    return int(_lib.C().rbf_grid_layout(_KK_DTYPE[np.dtype(dtype)], int(dim), int(m))[4])


def _check_grid(grid, centers, fn: str) -> None:
    check_array(grid, "grid", fn, ndim=1)
    if np.dtype(grid.dtype) != np.dtype("uint8"):
        raise TypeError(f"{fn}: grid must be the uint8 array from kernelkit.jax.rbf.build_grid, got "
                        f"{np.dtype(grid.dtype).name}")
    m, dim = centers.shape
    need = grid_bytes(centers.dtype, dim, m)
    if grid.shape[0] != need:
        raise ValueError(f"{fn}: grid has {grid.shape[0]} bytes but a grid over {m} centres of dim {dim} "
                         f"({np.dtype(centers.dtype).name}) has {need}: was it built from these centers?")


# ---- grid and search -----------------------------------------------------------------------------------
def _grid_call(centers):
    m, dim = centers.shape
    return call("kernelkit_rbf_grid_build", spec((grid_bytes(centers.dtype, dim, m),), jnp.uint8),
                jax.lax.stop_gradient(centers))


def _knn_call(x, grid, k: int, idx_dtype):
    n = x.shape[0]
    return call("kernelkit_rbf_knn", (spec((n, k), idx_dtype), spec((n, k), x.dtype)),
                jax.lax.stop_gradient(x), grid, k=np.int64(k))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _knn(x, centers, grid, k, idx_dtype):
    return tuple(_knn_call(x, grid, k, idx_dtype))


def _knn_fwd(x, centers, grid, k, idx_dtype):
    idx, dist2 = _knn_call(x, grid, k, idx_dtype)
    return (idx, dist2), (x, centers, idx)


def _knn_bwd(k, idx_dtype, res, cts):
    # d dist2[n, s] / d x[n] = 2 (x[n] - mu_idx), / d mu_idx = -2 (x[n] - mu_idx); missing slots (-1) and
    # non-finite cotangents contribute nothing (as kernelkit.rbf.ops' rbf_knn backward)
    x, centers, idx = res
    g = cts[1]
    valid = idx >= 0
    ii = jnp.where(valid, idx, 0)
    g = jnp.where(valid & jnp.isfinite(g), g, jnp.zeros((), g.dtype))
    term = 2 * g[..., None] * (x[:, None, :] - centers[ii])
    term = jnp.where(valid[..., None], term, jnp.zeros((), term.dtype))
    dx = term.sum(1)
    dc = jnp.zeros_like(centers).at[ii.reshape(-1)].add(-term.reshape(-1, x.shape[1]))
    return dx, dc, None


_knn.defvjp(_knn_fwd, _knn_bwd)


def build_grid(centers):
    """The neighbour grid over ``centers`` (M, 2 or 3), float32/float64: a uint8 array (layout in rbf.h)
    to pass to :func:`knn` / :func:`rbf_features` while the centres do not change.  Not differentiable
    (an index structure).  A non-finite centre fails when the call runs (CPU)."""
    fn = "kernelkit.jax.rbf.build_grid"
    _centers(centers, fn)
    check_platform(fn)
    return _grid_call(centers)


def knn(queries, centers, k: int, *, grid=None):
    """The k nearest centres of each query, as ``kernelkit.rbf.knn``: (idx (N, k), dist2 (N, k)) sorted by
    (distance, index); k > M pads with -1 / +inf; a non-finite query gets -1 / NaN.  idx is int64 with
    x64 enabled, else int32 (CPU).  ``grid`` (from :func:`build_grid`) saves rebuilding it.  dist2 is
    differentiable w.r.t. queries and centers."""
    fn = "kernelkit.jax.rbf.knn"
    _centers(centers, fn)
    _points(queries, "queries", fn, dim=centers.shape[1], dtype=centers.dtype)
    k = _check_k(k, fn)
    idt = _index_dtype(fn, check_platform(fn))
    if grid is None:
        grid = _grid_call(centers)
    else:
        _check_grid(grid, centers, fn)
    return _knn(queries, centers, grid, k, idt)


# ---- features ------------------------------------------------------------------------------------------
def _feat_call(x, centers, shapes, weights, omegas, idx, kernel, normalize, shape_full, has_omegas):
    return call("kernelkit_rbf_features_fwd", spec((x.shape[0], weights.shape[1]), weights.dtype),
                x, centers, shapes, weights, omegas, idx, kernel=np.int64(kernel), normalize=np.int64(normalize),
                shape_full=np.int64(shape_full), has_omegas=np.int64(has_omegas))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _features(x, centers, shapes, weights, omegas, idx, kernel, normalize, shape_full, has_omegas):
    return _feat_call(x, centers, shapes, weights, omegas, idx, kernel, normalize, shape_full, has_omegas)


def _features_fwd(x, centers, shapes, weights, omegas, idx, kernel, normalize, shape_full, has_omegas):
    out = _feat_call(x, centers, shapes, weights, omegas, idx, kernel, normalize, shape_full, has_omegas)
    return out, (x, centers, shapes, weights, omegas, idx)


def _features_bwd(kernel, normalize, shape_full, has_omegas, res, g):
    x, centers, shapes, weights, omegas, idx = res
    cd = x.dtype
    outs = (spec(x.shape, cd), spec(centers.shape, cd), spec(shapes.shape, cd), spec(weights.shape, cd),
            spec(omegas.shape, cd))
    dx, dc, ds, dw, do = call("kernelkit_rbf_features_bwd", outs, x, centers, shapes, weights, omegas, idx,
                              g.astype(weights.dtype), kernel=np.int64(kernel), normalize=np.int64(normalize),
                              shape_full=np.int64(shape_full), has_omegas=np.int64(has_omegas))
    return dx, dc, ds, dw.astype(weights.dtype), do, None


_features.defvjp(_features_fwd, _features_bwd)


def rbf_features(x, centers, shapes, weights, omegas=None, k: int = 8, kernel: str = "ivq", normalize: bool = True,
                 *, idx=None, grid=None, detach_denominator: bool = True):
    """NeuRBF's adaptive RBF features, fused, as ``kernelkit.rbf.rbf_features``: out[n, j] = sum over the
    k nearest RBFs i of weights[i, j] * sin(omegas[j] * phih_i(x_n)) (weights[i, j] * phih_i without
    omegas), phih the kernel ("ivq", "gauss", "nlin") normalized by its sum + 1e-8 when ``normalize``
    (the denominator constant in the backward unless ``detach_denominator=False``).

    Args:
        x: (N, D) queries, D = 2 or 3, float32/float64.  centers: (M, D), x's dtype.
        shapes: (M, D, D) inverse covariances or their diagonals (M, D); for "nlin" the scales (M, D).
        weights: (M, C), x's dtype (or float16 / bfloat16 with float32 x).  omegas: (C,) or None.
        idx: (N, k) int32/int64 precomputed neighbours (-1: none); else the k nearest centres are
            searched (through ``grid`` from :func:`build_grid` when given).
    Returns:
        (N, C) in the weights' dtype.  Differentiable w.r.t. x, centers, shapes, weights, omegas
        (``jax.grad`` / ``jax.vjp``, the C backward); works under ``jax.jit`` and ``jax.vmap``.
    Raises:
        TypeError / ValueError naming the argument, at trace time (see the module docstring for values).
    """
    fn = "kernelkit.jax.rbf.rbf_features"
    _centers(centers, fn)
    m, dim = centers.shape
    _points(x, "x", fn, dim=dim, dtype=centers.dtype)
    cd = np.dtype(x.dtype)
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise ValueError(f"{fn}: kernel must be one of {', '.join(repr(s) for s in KERNELS)}, got {kernel!r}")
    check_array(shapes, "shapes", fn)
    if np.dtype(shapes.dtype) != cd:
        raise TypeError(f"{fn}: shapes must have x's dtype {cd.name}, got {np.dtype(shapes.dtype).name}")
    check_shapes_layout(shapes.shape, kernel, m, dim, fn)
    check_array(weights, "weights", fn, ndim=2)
    if weights.shape[0] != m:
        raise ValueError(f"{fn}: weights must be (M, C) with M = {m} (the centers' rows), got shape "
                         f"{tuple(weights.shape)}")
    wd = np.dtype(weights.dtype)
    if wd != cd and not (cd == np.dtype("float32") and wd in _HALF):
        raise TypeError(f"{fn}: weights must have x's dtype {cd.name} (or float16 / bfloat16 with float32 x), "
                        f"got {wd.name}")
    C = weights.shape[1]
    if omegas is not None:
        check_array(omegas, "omegas", fn, ndim=1)
        if np.dtype(omegas.dtype) != cd:
            raise TypeError(f"{fn}: omegas must have x's dtype {cd.name}, got {np.dtype(omegas.dtype).name}")
        if omegas.shape[0] != C:
            raise ValueError(f"{fn}: omegas must have C = {C} entries (weights' columns), got {omegas.shape[0]}")
    if not isinstance(normalize, bool):
        raise TypeError(f"{fn}: normalize must be a bool, got {type(normalize).__name__}")
    if not isinstance(detach_denominator, bool):
        raise TypeError(f"{fn}: detach_denominator must be a bool, got {type(detach_denominator).__name__}")
    mode = NORM_NONE if not normalize else (NORM_DETACHED if detach_denominator else NORM_FULL)
    plat = check_platform(fn)
    if idx is None:
        k = _check_k(k, fn)
        idt = _index_dtype(fn, plat)
        if grid is None:
            grid = _grid_call(centers)
        else:
            _check_grid(grid, centers, fn)
        idx = _knn_call(x, grid, k, idt)[0]
    else:
        check_array(idx, "idx", fn, ndim=2)
        if np.dtype(idx.dtype) not in _INDEX:
            raise TypeError(f"{fn}: idx must be int32 or int64, got {np.dtype(idx.dtype).name}")
        if plat == "cuda" and np.dtype(idx.dtype) != np.dtype("int64"):
            raise TypeError(f"{fn}: on a GPU idx must be int64 (enable x64: jax.config.update('jax_enable_x64', "
                            "True))")
        if idx.shape[0] != x.shape[0]:
            raise ValueError(f"{fn}: idx must be (N, k) with N = {x.shape[0]} (x's rows), got shape "
                             f"{tuple(idx.shape)}")
        _check_k(idx.shape[1], fn + " (idx.shape[1])")
    has_omegas = omegas is not None
    om = omegas if has_omegas else jnp.zeros((0,), cd)
    return _features(x, centers, shapes, weights, om, idx, KERNELS[kernel], mode, int(shapes.ndim == 3),
                     int(has_omegas))
