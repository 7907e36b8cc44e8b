"""sparse for JAX: ``sparse_linear`` on kk_sparse_linear_{fwd,bwd}_{cpu,cuda} (custom_vjp), and
:class:`SparseLayout`, the CSR index of the weight as a pytree of JAX arrays.

The index follows csrc/include/kernelkit/sparse.h (and kernelkit.sparse.SparseLayout):

    row_ptr  (n_out + 1)   int64, or int32 without x64     row r's entries are row_ptr[r] .. row_ptr[r+1]-1
    col_idx  (nnz)         int32                           their columns, increasing within a row
    col_ptr  (n_in + 1)    int64, or int32 without x64     the same entries by column ...
    row_idx  (nnz)         int32                           ... their rows ...
    perm     (nnz)         int64, or int32 without x64     ... and where each sits in CSR order

Index dtypes: the C ABI takes 64-bit offsets (row_ptr, col_ptr, perm).  JAX without x64 has no int64,
so a layout built while x64 is off holds them as int32 (nnz < 2**31 is then required) and the CPU
handler widens them into host vectors before each call (O(n_out + n_in + nnz), small next to the
kernel's O(rows * nnz)).  The CUDA handlers cannot widen device memory: on a GPU build the layout with
x64 on (``jax.config.update("jax_enable_x64", True)`` or inside ``jax.enable_x64(True)``); an int32
layout there raises a TypeError at trace time.

Unlike the torch function there is no dense path (``min_sparsity``): the sparse kernels always run.
Gradients are first order (the backward is one custom call, not itself differentiable).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ._common import call, check_array, check_float, platform, spec

_INT32_MAX = 2**31 - 1


def _offset_dtype() -> np.dtype:
    """int64 when JAX has x64 on, else int32 (what jnp.asarray would make of int64)."""
    return np.dtype(jax.dtypes.canonicalize_dtype(np.int64))


@jax.tree_util.register_pytree_node_class
class SparseLayout:
    """The CSR index (and its transpose) of a sparse ``(n_out, n_in)`` weight, no values: a pytree
    (its five arrays are the leaves, the shape is static), so it passes through ``jax.jit`` as an
    argument; under ``jax.vmap`` give it ``in_axes=None``.

    Build it with :meth:`from_mask` or :meth:`from_csr` (on the host, with numpy), not the constructor.
    """

    __slots__ = ("shape", "row_ptr", "col_idx", "col_ptr", "row_idx", "perm")

    def __init__(self, shape, row_ptr, col_idx, col_ptr, row_idx, perm):
        self.shape = (int(shape[0]), int(shape[1]))
        self.row_ptr, self.col_idx, self.col_ptr, self.row_idx, self.perm = row_ptr, col_idx, col_ptr, row_idx, perm

    # ---- pytree ---------------------------------------------------------------------------------
    def tree_flatten(self):
        return (self.row_ptr, self.col_idx, self.col_ptr, self.row_idx, self.perm), self.shape

    @classmethod
    def tree_unflatten(cls, shape, leaves):
        return cls(shape, *leaves)

    # ---- construction ---------------------------------------------------------------------------
    @staticmethod
    def _check_shape(shape, fn: str):
        if not isinstance(shape, (tuple, list)) or len(shape) != 2:
            raise ValueError(f"{fn}: shape must be a (n_out, n_in) pair, got {shape!r}")
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in shape):
            raise TypeError(f"{fn}: shape must be a (n_out, n_in) pair of ints, got {tuple(shape)!r}")
        n_out, n_in = (int(v) for v in shape)
        if n_out <= 0 or n_in <= 0:
            raise ValueError(f"{fn}: the weight's dimensions must be > 0, got shape {(n_out, n_in)}")
        if n_out > _INT32_MAX or n_in > _INT32_MAX:
            raise ValueError(f"{fn}: each dimension must be < 2**31 (32-bit indices), got shape {(n_out, n_in)}")
        return n_out, n_in

    @classmethod
    def _from_coo(cls, shape, rows: np.ndarray, cols: np.ndarray, fn: str) -> "SparseLayout":
        """rows / cols int64 in row-major order (by row, then column)."""
        n_out, n_in = shape
        nnz = rows.shape[0]
        off = _offset_dtype()
        if off != np.int64 and nnz > _INT32_MAX:
            raise ValueError(f"{fn}: nnz = {nnz} needs 64-bit offsets: enable jax_enable_x64 first")
        row_ptr = np.zeros(n_out + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=n_out), out=row_ptr[1:])
        perm = np.argsort(cols, kind="stable")  # by column; rows stay increasing within a column
        col_ptr = np.zeros(n_in + 1, np.int64)
        np.cumsum(np.bincount(cols, minlength=n_in), out=col_ptr[1:])
        return cls((n_out, n_in), jnp.asarray(row_ptr.astype(off)), jnp.asarray(cols.astype(np.int32)),
                   jnp.asarray(col_ptr.astype(off)), jnp.asarray(rows[perm].astype(np.int32)),
                   jnp.asarray(perm.astype(off)))

    @classmethod
    def from_mask(cls, mask) -> "SparseLayout":
        """The layout of the nonzero (True) entries of a 2-D mask (numpy or JAX array, any dtype)."""
        fn = "SparseLayout.from_mask"
        if not hasattr(mask, "shape"):
            raise TypeError(f"{fn}: mask must be an array, got {type(mask).__name__}")
        if isinstance(mask, jax.core.Tracer):
            raise TypeError(f"{fn}: mask must be concrete (build the layout outside jax.jit)")
        m = np.asarray(mask)
        if m.ndim != 2:
            raise ValueError(f"{fn}: the weight must be 2-D (n_out, n_in), got shape {m.shape}")
        shape = cls._check_shape(m.shape, fn)
        rows, cols = np.nonzero(m)
        return cls._from_coo(shape, rows.astype(np.int64), cols.astype(np.int64), fn)

    @classmethod
    def from_csr(cls, row_ptr, col_idx, shape) -> "SparseLayout":
        """A layout from a CSR index (numpy or JAX integer arrays), checked first: ``row_ptr`` (n_out+1)
        starts at 0, never decreases and ends at nnz = len(col_idx); ``col_idx`` entries are in
        [0, n_in) and strictly increasing within each row.  ValueError naming the array and position."""
        fn = "SparseLayout.from_csr"
        n_out, n_in = cls._check_shape(shape, fn)
        arrs = {}
        for name, a in (("row_ptr", row_ptr), ("col_idx", col_idx)):
            if not hasattr(a, "shape") or not hasattr(a, "dtype"):
                raise TypeError(f"{fn}: {name} must be an array, got {type(a).__name__}")
            if np.dtype(a.dtype) not in (np.dtype(np.int32), np.dtype(np.int64)):
                raise TypeError(f"{fn}: {name} must be int32 or int64, got {np.dtype(a.dtype).name}")
            if len(a.shape) != 1:
                raise ValueError(f"{fn}: {name} must be 1-D, got shape {tuple(a.shape)}")
            arrs[name] = np.asarray(a).astype(np.int64)
        rp, ci = arrs["row_ptr"], arrs["col_idx"]
        nnz = ci.shape[0]
        if rp.shape[0] != n_out + 1:
            raise ValueError(f"{fn}: row_ptr must have n_out+1 = {n_out + 1} entries, got {rp.shape[0]}")
        if rp[0] != 0:
            raise ValueError(f"{fn}: row_ptr[0] must be 0, got {int(rp[0])}")
        steps = np.diff(rp)
        if (steps < 0).any():
            r = int(np.nonzero(steps < 0)[0][0])
            raise ValueError(f"{fn}: row_ptr must not decrease, but row_ptr[{r + 1}] = {int(rp[r + 1])} < "
                             f"row_ptr[{r}] = {int(rp[r])}")
        if rp[-1] != nnz:
            raise ValueError(f"{fn}: row_ptr[-1] must equal len(col_idx) = {nnz}, got {int(rp[-1])}")
        bad = (ci < 0) | (ci >= n_in)
        if bad.any():
            k = int(np.nonzero(bad)[0][0])
            raise ValueError(f"{fn}: col_idx[{k}] = {int(ci[k])} is out of range [0, {n_in})")
        rows = np.repeat(np.arange(n_out, dtype=np.int64), steps)
        if nnz > 1:
            unsorted = (rows[1:] == rows[:-1]) & (ci[1:] <= ci[:-1])
            if unsorted.any():
                k = int(np.nonzero(unsorted)[0][0]) + 1
                raise ValueError(f"{fn}: col_idx must be strictly increasing within each row, but in row "
                                 f"{int(rows[k])} col_idx[{k}] = {int(ci[k])} follows {int(ci[k - 1])}")
        return cls._from_coo((n_out, n_in), rows, ci, fn)

    # ---- properties -----------------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return int(self.col_idx.shape[0])

    @property
    def n_out(self) -> int:
        return self.shape[0]

    @property
    def n_in(self) -> int:
        return self.shape[1]

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.shape[0] * self.shape[1])

    def index_arrays(self):
        """(row_ptr, col_idx, col_ptr, row_idx, perm)."""
        return self.row_ptr, self.col_idx, self.col_ptr, self.row_idx, self.perm

    def to_dense(self, values):
        """The dense ``(n_out, n_in)`` matrix with ``values`` at the nonzeros (plain jnp, differentiable)."""
        return _to_dense(self, values)

    def __repr__(self) -> str:
        return f"SparseLayout(shape={self.shape}, nnz={self.nnz}, sparsity={self.sparsity:.4f})"


@jax.jit
def _to_dense(layout: SparseLayout, values):
    # the row of each entry: the last r with row_ptr[r] <= k (one jitted function: eager jnp compiles per op)
    k = jnp.arange(layout.nnz, dtype=layout.row_ptr.dtype)
    rows = jnp.searchsorted(layout.row_ptr, k, side="right") - 1
    return jnp.zeros(layout.shape, values.dtype).at[rows, layout.col_idx].set(values)


# ---- the op ------------------------------------------------------------------------------------------
@jax.custom_vjp
def _sparse(x2, values, bias, row_ptr, col_idx, col_ptr, row_idx, perm):
    n_out = row_ptr.shape[0] - 1
    return call("kernelkit_sparse_linear_fwd", spec((x2.shape[0], n_out), x2.dtype), x2, values, bias, row_ptr, col_idx)


def _fwd(x2, values, bias, row_ptr, col_idx, col_ptr, row_idx, perm):
    return _sparse(x2, values, bias, row_ptr, col_idx, col_ptr, row_idx, perm), \
        (x2, values, bias, row_ptr, col_idx, col_ptr, row_idx, perm)


def _bwd(res, g):
    x2, values, bias, row_ptr, col_idx, col_ptr, row_idx, perm = res
    dx, dv = call("kernelkit_sparse_linear_bwd", (spec(x2.shape, x2.dtype), spec(values.shape, values.dtype)),
                  x2, values, row_ptr, col_idx, col_ptr, row_idx, perm, g)
    db = g.sum(0) if bias.shape[0] else jnp.zeros_like(bias)  # bias (0,): none
    return dx, dv, db, None, None, None, None, None


_sparse.defvjp(_fwd, _bwd)

_INDEX = (("row_ptr", "off"), ("col_idx", "i32"), ("col_ptr", "off"), ("row_idx", "i32"), ("perm", "off"))


def _check_layout(layout, fn: str) -> None:
    if not isinstance(layout, SparseLayout):
        raise TypeError(f"{fn}: layout must be a kernelkit.jax.sparse.SparseLayout, got {type(layout).__name__}")
    n_out, n_in = layout.shape
    nnz = layout.nnz
    sizes = {"row_ptr": n_out + 1, "col_idx": nnz, "col_ptr": n_in + 1, "row_idx": nnz, "perm": nnz}
    on_cuda = platform() == "cuda"
    for name, kind in _INDEX:
        a = getattr(layout, name)
        ok = (np.int32,) if kind == "i32" else ((np.int64,) if on_cuda else (np.int64, np.int32))
        check_array(a, f"layout.{name}", fn, ndim=1)
        if np.dtype(a.dtype) not in [np.dtype(t) for t in ok]:
            hint = " (on CUDA the offsets must be int64: build the layout with jax_enable_x64 on)" \
                if on_cuda and kind == "off" else ""
            raise TypeError(f"{fn}: layout.{name} must be {' or '.join(np.dtype(t).name for t in ok)}, got "
                            f"{np.dtype(a.dtype).name}{hint}")
        if a.shape[0] != sizes[name]:
            raise ValueError(f"{fn}: layout.{name} must have {sizes[name]} entries for shape {layout.shape} and "
                             f"nnz = {nnz}, got {a.shape[0]}")


def sparse_linear(x, values, layout: SparseLayout, bias=None):
    """``y = x W^T + bias`` for the sparse W = ``layout.to_dense(values)``, on kernelkit's sparse kernels
    (the JAX form of ``kernelkit.sparse.sparse_linear``).

    Args:
        x: ``(..., n_in)``; values: ``(nnz,)`` in the layout's CSR order; layout: a :class:`SparseLayout`;
            bias: ``(n_out,)`` or None.  One float dtype (cpu: float32/float64, cuda: float32/float16/
            bfloat16).
    Returns:
        ``(..., n_out)``.  Differentiable in x, values and bias (``jax.grad``, ``jax.vjp``); works under
        ``jax.jit`` and ``jax.vmap`` (x, values and bias may be batched; the layout takes ``in_axes=None``).
    Raises:
        TypeError / ValueError naming the argument, at trace time.  Invalid index contents (a layout
        not made by from_mask / from_csr) fail in the CPU kernel's own check, at run time.
    """
    fn = "sparse_linear"
    _check_layout(layout, fn)
    check_array(x, "x", fn, min_ndim=1)
    check_array(values, "values", fn, ndim=1)
    if bias is not None:
        check_array(bias, "bias", fn, ndim=1)
    check_float(fn, "x", x, values=values, **({} if bias is None else {"bias": bias}))
    n_out, n_in = layout.shape
    if values.shape[0] != layout.nnz:
        raise ValueError(f"{fn}: values must have the layout's nnz = {layout.nnz} entries, got {values.shape[0]}")
    if bias is not None and bias.shape[0] != n_out:
        raise ValueError(f"{fn}: bias must have n_out = {n_out} entries, got shape {tuple(bias.shape)}")
    if x.shape[-1] != n_in:
        raise ValueError(f"{fn}: x.shape[-1] must equal the weight's n_in = {n_in}, got x of shape {tuple(x.shape)}")
    rows = math.prod(x.shape[:-1])
    b = jnp.zeros((0,), x.dtype) if bias is None else bias
    out = _sparse(x.reshape(rows, n_in), values, b, *layout.index_arrays())
    return out.reshape(*x.shape[:-1], n_out)
