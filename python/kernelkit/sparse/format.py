"""The sparse weight format: CSR of W (n_out x n_in) plus the transposed index, values kept apart.

    row_ptr  int64 (n_out + 1)   row r's entries are k = row_ptr[r] .. row_ptr[r+1]-1
    col_idx  int32 (nnz)         their columns, strictly increasing within a row
    col_ptr  int64 (n_in + 1)    the same entries by column (CSC) ...
    row_idx  int32 (nnz)         ... their rows, increasing within a column
    perm     int64 (nnz)         ... and where each sits in CSR order: the k-th entry by column is
                                 values[perm[k]]

The values (nnz,) are a separate tensor (the trainable parameter), in CSR order.  The transposed
index lets the backward to x run as a row-parallel SpMM over W^T that reads the same values through
``perm``: nothing is copied or transposed when the values change, and there are no atomics.
int32 column indices halve the index traffic of the kernels; 64-bit offsets let nnz pass 2**31.
See csrc/include/kernelkit/sparse.h for the same contract in C.
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

_INT32_MAX = 2**31 - 1


def rows_of(row_ptr: Tensor, nnz: int) -> Tensor:
    """The row of each of the nnz entries of a CSR index, int64, in CSR order."""
    return torch.repeat_interleave(torch.arange(row_ptr.numel() - 1, device=row_ptr.device),
                                   row_ptr[1:] - row_ptr[:-1], output_size=nnz)


def _counts_to_ptr(counts: Tensor) -> Tensor:
    ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=ptr[1:])
    return ptr


class SparseLayout:
    """The index of an unstructured-sparse matrix of shape ``(n_out, n_in)`` (no values).

    Build it with :meth:`from_mask` (a dense boolean mask) or :meth:`from_csr` (a user CSR index,
    checked), never from the constructor.  All tensors live on one device; :meth:`to` moves them.
    """

    __slots__ = ("shape", "row_ptr", "col_idx", "col_ptr", "row_idx", "perm", "_dense_cache", "__weakref__")

    def __init__(self, shape, row_ptr: Tensor, col_idx: Tensor, col_ptr: Tensor, row_idx: Tensor, perm: Tensor):
        self.shape = (int(shape[0]), int(shape[1]))
        self.row_ptr, self.col_idx = row_ptr, col_idx
        self.col_ptr, self.row_idx, self.perm = col_ptr, row_idx, perm
        # the dense path's weight for values that do not change (inference): see ops.sparse_linear
        self._dense_cache = None

    # ---- construction -----------------------------------------------------------------------------
    @staticmethod
    def _check_shape(shape, fn: str):
        if not isinstance(shape, (tuple, list, torch.Size)):
            raise TypeError(f"{fn}: shape must be a (n_out, n_in) tuple of ints, got {shape!r}")
        if len(shape) != 2:
            raise ValueError(f"{fn}: the weight must be 2-D (n_out, n_in), got shape {tuple(shape)}")
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in shape):
            raise TypeError(f"{fn}: shape must be a (n_out, n_in) tuple of ints, got {tuple(shape)!r}")
        n_out, n_in = (int(s) for s in shape)
        if n_out <= 0 or n_in <= 0:
            raise ValueError(f"{fn}: the weight's dimensions must be > 0, got shape {(n_out, n_in)}")
        if n_out > _INT32_MAX or n_in > _INT32_MAX:
            raise ValueError(f"{fn}: each dimension must be < 2**31 (32-bit indices), got shape {(n_out, n_in)}")
        return n_out, n_in

    @classmethod
    def _from_coo(cls, shape, rows: Tensor, cols: Tensor) -> "SparseLayout":
        """rows/cols int64 in row-major order (sorted by row, then column)."""
        n_out, n_in = shape
        row_ptr = _counts_to_ptr(torch.bincount(rows, minlength=n_out))
        # CSC: a stable sort by column keeps rows increasing within each column
        perm = torch.sort(cols, stable=True).indices
        col_ptr = _counts_to_ptr(torch.bincount(cols, minlength=n_in))
        return cls((n_out, n_in), row_ptr, cols.to(torch.int32), col_ptr, rows[perm].to(torch.int32), perm)

    @classmethod
    def from_mask(cls, mask: Tensor) -> "SparseLayout":
        """The layout of the True (nonzero) entries of a 2-D mask (any dtype: nonzero = kept)."""
        fn = "SparseLayout.from_mask"
        if not isinstance(mask, Tensor):
            raise TypeError(f"{fn}: mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.layout != torch.strided:
            raise TypeError(f"{fn}: mask must be a dense (strided) tensor, got {mask.layout}")
        shape = cls._check_shape(mask.shape, fn)
        rows, cols = torch.nonzero(mask, as_tuple=True)  # row-major order
        return cls._from_coo(shape, rows, cols)

    @classmethod
    def from_csr(cls, row_ptr: Tensor, col_idx: Tensor, shape) -> "SparseLayout":
        """A layout from a user CSR index, checked first: ``row_ptr`` (n_out+1) starts at 0, never
        decreases and ends at nnz = len(col_idx); ``col_idx`` entries are in [0, n_in) and strictly
        increasing within each row.  ValueError naming the array and the first bad position."""
        fn = "SparseLayout.from_csr"
        n_out, n_in = cls._check_shape(shape, fn)
        for name, t in (("row_ptr", row_ptr), ("col_idx", col_idx)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"{fn}: {name} must be an int32 or int64 tensor, got {t.dtype}")
            if t.dim() != 1:
                raise ValueError(f"{fn}: {name} must be 1-D, got shape {tuple(t.shape)}")
        if row_ptr.device != col_idx.device:
            raise ValueError(f"{fn}: row_ptr is on {row_ptr.device} but col_idx is on {col_idx.device}")
        if row_ptr.numel() != n_out + 1:
            raise ValueError(f"{fn}: row_ptr must have n_out+1 = {n_out + 1} entries, got {row_ptr.numel()}")
        rp = row_ptr.to(torch.int64)
        nnz = col_idx.numel()
        if int(rp[0]) != 0:
            raise ValueError(f"{fn}: row_ptr[0] must be 0, got {int(rp[0])}")
        steps = rp[1:] - rp[:-1]
        if n_out and bool((steps < 0).any()):
            r = int(torch.nonzero(steps < 0)[0])
            raise ValueError(f"{fn}: row_ptr must not decrease, but row_ptr[{r + 1}] = {int(rp[r + 1])} < "
                             f"row_ptr[{r}] = {int(rp[r])}")
        if int(rp[-1]) != nnz:
            raise ValueError(f"{fn}: row_ptr[-1] must equal len(col_idx) = {nnz}, got {int(rp[-1])}")
        ci = col_idx.to(torch.int64)
        bad = (ci < 0) | (ci >= n_in)
        if bool(bad.any()):
            k = int(torch.nonzero(bad)[0])
            raise ValueError(f"{fn}: col_idx[{k}] = {int(ci[k])} is out of range [0, {n_in})")
        rows = rows_of(rp, nnz)
        if nnz > 1:
            same_row = rows[1:] == rows[:-1]
            unsorted = same_row & (ci[1:] <= ci[:-1])
            if bool(unsorted.any()):
                k = int(torch.nonzero(unsorted)[0]) + 1
                raise ValueError(f"{fn}: col_idx must be strictly increasing within each row, but in row "
                                 f"{int(rows[k])} col_idx[{k}] = {int(ci[k])} follows {int(ci[k - 1])}")
        return cls._from_coo((n_out, n_in), rows, ci)

    def __getstate__(self):  # pickling / deepcopy: the index, not the dense path's cache (a weakref)
        return {k: getattr(self, k) for k in ("shape", "row_ptr", "col_idx", "col_ptr", "row_idx", "perm")}

    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)
        self._dense_cache = None

    # ---- properties -------------------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return self.col_idx.numel()

    @property
    def n_out(self) -> int:
        return self.shape[0]

    @property
    def n_in(self) -> int:
        return self.shape[1]

    @property
    def density(self) -> float:
        return self.nnz / (self.shape[0] * self.shape[1])

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    @property
    def device(self) -> torch.device:
        return self.row_ptr.device

    def index_tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(row_ptr, col_idx, col_ptr, row_idx, perm), the arguments of the kernelkit::sparse ops."""
        return self.row_ptr, self.col_idx, self.col_ptr, self.row_idx, self.perm

    def to(self, device) -> "SparseLayout":
        device = torch.device(device)
        if device == self.device:
            return self
        return SparseLayout(self.shape, *(t.to(device) for t in self.index_tensors()))

    def rows(self) -> Tensor:
        """The row of each entry, int64 (nnz), in CSR order."""
        return rows_of(self.row_ptr, self.nnz)

    def flat_index(self) -> Tensor:
        """row * n_in + col of each entry, int64 (nnz), in CSR order (increasing)."""
        return self.rows() * self.shape[1] + self.col_idx.to(torch.int64)

    # ---- conversions ------------------------------------------------------------------------------
    def to_dense(self, values: Tensor) -> Tensor:
        """The dense (n_out, n_in) matrix with ``values`` at the layout's positions, zeros elsewhere.
        Differentiable in ``values`` (the gradient is the dense gradient sampled at the nonzeros)."""
        if values.dim() != 1 or values.shape[0] != self.nnz:
            raise ValueError(f"SparseLayout.to_dense: values must be 1-D with nnz = {self.nnz} entries, "
                             f"got shape {tuple(values.shape)}")
        n_out, n_in = self.shape
        flat = values.new_zeros(n_out * n_in)
        flat = flat.index_put((self.flat_index(),), values)
        return flat.view(n_out, n_in)

    def values_from_dense(self, weight: Tensor) -> Tensor:
        """The entries of a dense (n_out, n_in) ``weight`` at the layout's positions, in CSR order."""
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"SparseLayout.values_from_dense: weight must have shape {self.shape}, "
                             f"got {tuple(weight.shape)}")
        return weight.reshape(-1)[self.flat_index().to(weight.device)]

    def mask(self) -> Tensor:
        """The dense boolean mask (n_out, n_in) of this layout."""
        m = torch.zeros(self.shape[0] * self.shape[1], dtype=torch.bool, device=self.device)
        m[self.flat_index()] = True
        return m.view(self.shape)

    def __repr__(self) -> str:
        return (f"SparseLayout(shape={self.shape}, nnz={self.nnz}, sparsity={self.sparsity:.4f}, "
                f"device={self.device})")


def mask_from_scores(scores: Tensor, sparsity: float) -> Tensor:
    """Boolean mask keeping exactly round((1 - sparsity) * numel) entries with the largest scores
    (ties broken by position, lowest first)."""
    if not 0.0 <= sparsity < 1.0 and sparsity != 1.0:
        raise ValueError(f"mask_from_scores: sparsity must be in [0, 1], got {sparsity}")
    n = scores.numel()
    keep = int(round((1.0 - sparsity) * n))
    mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if keep > 0:
        # topk on floats in float64: ties resolve deterministically by a stable sort
        order = torch.sort(scores.reshape(-1).double(), descending=True, stable=True).indices
        mask[order[:keep]] = True
    return mask.view(scores.shape)
