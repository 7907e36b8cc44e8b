"""SparseLinear: a drop-in nn.Linear whose weight is unstructured-sparse and runs on sparse kernels.

The weight is stored as its nonzeros (``values``, the parameter, in CSR order) and the CSR index
(``row_ptr``, ``col_idx`` buffers).  The state_dict holds exactly those (plus ``bias``): the mask and
the values, never a dense copy.  The transposed index the backward needs is derived, not saved.
Mask changes (RigL, SET: kernelkit.sparse.dst) go through :meth:`SparseLinear.set_mask_`, which keeps
the ``values`` parameter object (so optimizers keep working) and says where each new entry came from.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from .. import _backend, _checks
from .format import SparseLayout, mask_from_scores
from .ops import check_min_sparsity, sparse_linear


def _positive_int(v, name: str, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
        raise ValueError(f"{where}: {name} must be a positive int, got {v!r}")
    return int(v)


def check_sparsity(sparsity, where: str) -> float:
    """A sparsity in [0, 1) (1 would remove every weight), else ValueError naming ``where``."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{where}: sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def random_mask(shape, sparsity: float, *, device=None, generator: torch.Generator | None = None) -> Tensor:
    """A boolean mask with exactly round((1 - sparsity) * numel) True entries at uniformly random
    positions."""
    scores = torch.rand(shape, generator=generator, device="cpu").to(device)
    return mask_from_scores(scores, sparsity)


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with W (out_features, in_features) sparse at ``sparsity`` (exactly
    round((1 - sparsity) * out * in) nonzeros).

    Args:
        in_features, out_features: as nn.Linear.
        bias: as nn.Linear.
        sparsity: fraction of zero weights, in [0, 1).  Ignored when ``mask`` is given.
        mask: optional boolean (out_features, in_features) mask of the kept weights (any sparsity,
            also all-False).
        device, dtype: as nn.Linear.
        backend: pin a kernelkit backend for this layer (None: the default choice per call).
        min_sparsity: see :func:`kernelkit.sparse.sparse_linear` (None: the backend's break-even).
    The mask is uniformly random (seeded by torch's global generator); the kept weights get
    nn.Linear's init, U(+-1/sqrt(in_features)), as do the biases.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, sparsity: float = 0.9, *,
                 mask: Tensor | None = None, device=None, dtype=None, backend: str | None = None,
                 min_sparsity: float | None = None):
        super().__init__()
        where = "SparseLinear"
        in_features = _positive_int(in_features, "in_features", where)
        out_features = _positive_int(out_features, "out_features", where)
        if dtype is not None and dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"{where}: dtype must be float32/float64/float16/bfloat16 (or None), got {dtype!r}")
        if backend is not None:
            _backend._check_name(backend, where)
        check_min_sparsity(min_sparsity, where)
        self.in_features, self.out_features = in_features, out_features
        self.backend, self.min_sparsity = backend, min_sparsity
        kw = {"device": device, "dtype": dtype}
        if mask is None:
            sparsity = check_sparsity(sparsity, where)
            mask = random_mask((out_features, in_features), sparsity, device=device)
        else:
            if isinstance(mask, Tensor) and (mask.layout != torch.strided or mask.is_nested):
                raise TypeError(f"{where}: mask must be a dense (strided) tensor, got a "
                                f"{'nested' if mask.is_nested else str(mask.layout).replace('torch.', '')} tensor")
            if not isinstance(mask, Tensor) or tuple(mask.shape) != (out_features, in_features):
                shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
                raise ValueError(f"{where}: mask must be a tensor of shape (out_features, in_features) = "
                                 f"{(out_features, in_features)}, got {shape}")
            mask = mask.to(device=device) != 0
        layout = SparseLayout.from_mask(mask)
        self.values = nn.Parameter(torch.empty(layout.nnz, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self._set_layout(layout)
        self.reset_parameters()

    # ---- index buffers ----------------------------------------------------------------------------
    def _set_layout(self, layout: SparseLayout) -> None:
        # row_ptr/col_idx are the state (the mask); the transposed index is derived (not persistent)
        self.register_buffer("row_ptr", layout.row_ptr)
        self.register_buffer("col_idx", layout.col_idx)
        self.register_buffer("col_ptr", layout.col_ptr, persistent=False)
        self.register_buffer("row_idx", layout.row_idx, persistent=False)
        self.register_buffer("perm", layout.perm, persistent=False)

    @property
    def layout(self) -> SparseLayout:
        # One SparseLayout object while the index buffers are the same tensors (a mask update, a load
        # or .to() replaces them), so that the dense path's inference cache (ops._dense_weight) lives
        # as long as the mask does.
        bufs = (self.row_ptr, self.col_idx, self.col_ptr, self.row_idx, self.perm)
        if torch.compiler.is_compiling():
            return SparseLayout((self.out_features, self.in_features), *bufs)
        cached = self.__dict__.get("_layout_cache")
        if cached is not None and all(a is b for a, b in zip(cached[0], bufs)):
            return cached[1]
        layout = SparseLayout((self.out_features, self.in_features), *bufs)
        self.__dict__["_layout_cache"] = (bufs, layout)
        return layout

    @property
    def nnz(self) -> int:
        return self.col_idx.numel()

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.out_features * self.in_features)

    @property
    def mask(self) -> Tensor:
        """The boolean (out_features, in_features) mask of the kept weights."""
        return self.layout.mask()

    def __getstate__(self):  # pickling (torch.save of the module): without the layout cache
        state = dict(self.__dict__)
        state.pop("_layout_cache", None)
        return state

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.values, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        _checks.tensor(x, "x", "SparseLinear", min_ndim=1)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear: x.shape[-1] must be in_features={self.in_features}, got shape {tuple(x.shape)}")
        bias = self.bias
        if bias is not None and bias.dtype != self.values.dtype:
            bias = bias.to(self.values.dtype)
        y = sparse_linear(x, self.values, self.layout, bias, backend=self.backend, min_sparsity=self.min_sparsity)
        y = _checks.not_a_view(y)  # under FSDP2 an in-place op on a view output loses the weights' re-gather
        hook = getattr(self, "_dense_grad_hook", None)
        if hook is not None and y.requires_grad:
            hook(self, x, y)
        return y

    # ---- conversions ------------------------------------------------------------------------------
    @torch.no_grad()
    def to_dense(self) -> Tensor:
        """The dense (out_features, in_features) weight (zeros off the mask), bias excluded."""
        return self.layout.to_dense(self.values.detach()).clone()

    def to_linear(self) -> nn.Linear:
        """An nn.Linear with the dense weight and the same bias."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    @classmethod
    def from_linear(cls, linear: nn.Linear, sparsity: float, method: str = "magnitude", *,
                    backend: str | None = None, min_sparsity: float | None = None,
                    generator: torch.Generator | None = None) -> "SparseLinear":
        """A SparseLinear keeping round((1 - sparsity) * numel) of linear's weights: the largest in
        magnitude (``method="magnitude"``, ties by position) or uniformly random ones
        (``"random"``), with their values; the bias is copied."""
        where = "SparseLinear.from_linear"
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{where}: linear must be an nn.Linear, got {type(linear).__name__}")
        sparsity = check_sparsity(sparsity, where)
        W = linear.weight.detach()
        if method == "magnitude":
            mask = mask_from_scores(W.abs(), sparsity)
        elif method == "random":
            mask = random_mask(W.shape, sparsity, device=W.device, generator=generator)
        else:
            raise ValueError(f"{where}: method must be 'magnitude' or 'random', got {method!r}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, mask=mask,
                    device=W.device, dtype=W.dtype, backend=backend, min_sparsity=min_sparsity)
        with torch.no_grad():
            layer.values.copy_(layer.layout.values_from_dense(W))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    # ---- mask updates -----------------------------------------------------------------------------
    @torch.no_grad()
    def set_mask_(self, mask: Tensor, new_values: Tensor | None = None) -> Tensor:
        """Replace the mask.  Entries kept from the old mask keep their values; new entries take
        ``new_values`` (a dense (out, in) tensor read at the new positions) or zero.

        Returns ``src`` (int64, new nnz): for each new entry (CSR order) its position in the old
        ``values``, or -1 for a new one — what is needed to carry optimizer state over
        (kernelkit.sparse.dst.remap_state).  The ``values`` parameter object is kept (its storage
        is replaced when nnz changes)."""
        shape = (self.out_features, self.in_features)
        if not isinstance(mask, Tensor) or tuple(mask.shape) != shape:
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"SparseLinear.set_mask_: mask must have shape {shape}, got {got}")
        old = self.layout
        old_pos = torch.full((shape[0] * shape[1],), -1, dtype=torch.int64, device=self.row_ptr.device)
        old_pos[old.flat_index()] = torch.arange(old.nnz, device=old_pos.device)
        layout = SparseLayout.from_mask(mask.to(self.row_ptr.device) != 0)
        src = old_pos[layout.flat_index()]
        vals = torch.where(src >= 0, self.values[src.clamp(min=0)], torch.zeros((), dtype=self.values.dtype,
                                                                                  device=self.values.device))
        if new_values is not None:
            fresh = layout.values_from_dense(new_values.to(self.values))
            vals = torch.where(src >= 0, vals, fresh)
        if vals.shape == self.values.shape:
            self.values.copy_(vals)
        else:
            self.values.data = vals
        self._set_layout(layout)
        return src

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A checkpoint may hold another mask (other nnz): take its index, checked, before the
        # default loader copies values into a parameter of the matching size.
        rp, ci = state_dict.get(prefix + "row_ptr"), state_dict.get(prefix + "col_idx")
        if rp is not None and ci is not None:
            try:
                layout = SparseLayout.from_csr(rp.to(self.row_ptr.device), ci.to(self.row_ptr.device),
                                               (self.out_features, self.in_features))
            except (TypeError, ValueError) as e:
                error_msgs.append(f"{prefix}row_ptr/col_idx: {e}")
                return
            if layout.nnz != self.values.shape[0]:
                self.values.data = self.values.data.new_empty(layout.nnz)
            self._set_layout(layout)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nnz={self.nnz}, sparsity={self.sparsity:.4f}")
