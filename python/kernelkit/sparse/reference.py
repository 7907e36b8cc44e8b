"""Pure-torch reference of the sparse linear layer (the oracle every backend is tested against,
in float64, and the ``torch`` backend).

    W        = the dense (n_out, n_in) matrix with values at the layout's positions
    forward  out     = x W^T + bias                       x (B, n_in), out (B, n_out)
    backward dx      = dout W                             (B, n_in)
             dvalues = (dout^T x) at the nonzeros         (nnz,) in CSR order  (SDDMM)
             dbias   = sum_b dout[b]

It scatters the values into a dense W and uses dense matmuls: readable, exact in float64, and on
every device.  It is also what the published Sparse-IFT code computes (masked dense weights).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .format import SparseLayout, rows_of


def _flat(row_ptr: Tensor, col_idx: Tensor, n_in: int) -> Tensor:
    return rows_of(row_ptr, col_idx.numel()) * n_in + col_idx.long()


def _dense(values: Tensor, flat: Tensor, n_out: int, n_in: int) -> Tensor:
    return values.new_zeros(n_out * n_in).index_put((flat,), values).view(n_out, n_in)


def sparse_linear_reference(x: Tensor, values: Tensor, layout: SparseLayout, bias: Tensor | None = None) -> Tensor:
    """``x W^T + bias`` with W = layout.to_dense(values); x (..., n_in).  Differentiable."""
    return torch.nn.functional.linear(x, layout.to_dense(values), bias)


def reference_fwd(x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, n_in: int,
                  bias: Tensor | None) -> Tensor:
    """The forward on the raw index (x 2-D)."""
    return torch.nn.functional.linear(x, _dense(values, _flat(row_ptr, col_idx, n_in), row_ptr.numel() - 1, n_in),
                                      bias)


def reference_bwd(x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, dout: Tensor):
    """(dx, dvalues) on the raw index (x, dout 2-D)."""
    n_out, n_in = row_ptr.numel() - 1, x.shape[1]
    flat = _flat(row_ptr, col_idx, n_in)
    dx = dout @ _dense(values, flat, n_out, n_in)
    # SDDMM as the dense gradient dout^T x sampled at the nonzeros (memory of one dense W, like dx's)
    dvalues = (dout.t() @ x).reshape(-1)[flat]
    return dx, dvalues
