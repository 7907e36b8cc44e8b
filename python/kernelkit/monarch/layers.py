"""MonarchLinear: a drop-in nn.Linear with two block-diagonal factors (fly's layout and init)."""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _backend, _checks
from .ops import monarch_matmul
from .projection import monarch_shapes, project
from .reference import monarch_to_dense


def _positive_int(v, name: str) -> int:
    # bool is an int subclass, but MonarchLinear(64, 64, True) is a misplaced `bias`, not nblocks=1
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
        raise ValueError(f"MonarchLinear: {name} must be a positive int, got {v!r}")
    return int(v)


class MonarchLinear(nn.Module):
    """y = Monarch(w1, w2) x + b for any in/out features.

    The input is zero-padded to ``nblocks * ceil(in/nblocks)`` and the output truncated to
    ``out_features``.  Parameters are named like HazyResearch/fly's MonarchLinear (``blkdiag1``,
    ``blkdiag2``, ``bias``) with the same shapes, so fly checkpoints load with load_state_dict.
    ``backend`` pins a kernelkit backend for this layer (None = default choice per call).

    Bad arguments raise ValueError (in_features, out_features or nblocks not a positive int,
    nblocks > min(in_features, out_features), an unknown backend name) or TypeError (a dtype that
    is not float32/float64/float16/bfloat16, a backend that is not a str).  forward raises what
    :func:`monarch_matmul` raises, and ValueError when ``x.shape[-1] != in_features``.
    """

    def __init__(self, in_features: int, out_features: int, nblocks: int = 4, bias: bool = True,
                 device=None, dtype=None, backend: str | None = None):
        super().__init__()
        in_features, out_features, nblocks = (_positive_int(v, name) for name, v in (
            ("in_features", in_features), ("out_features", out_features), ("nblocks", nblocks)))
        if dtype is not None and dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"MonarchLinear: dtype must be float32/float64/float16/bfloat16 (or None), "
                            f"got {dtype!r}")
        if backend is not None:
            _backend._check_name(backend, "MonarchLinear")  # fail here, not at the first forward
        if nblocks > min(in_features, out_features):
            raise ValueError(f"MonarchLinear: nblocks ({nblocks}) cannot exceed min(in_features, out_features) "
                             f"= {min(in_features, out_features)}")
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        self.backend = backend
        s1, s2, self.in_features_extended, self.out_features_extended = monarch_shapes(in_features, out_features, nblocks)
        kw = {"device": device, "dtype": dtype}
        self.blkdiag1 = nn.Parameter(torch.empty(s1, **kw))
        self.blkdiag2 = nn.Parameter(torch.empty(s2, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # fly: kaiming_uniform(a=sqrt(5)) per factor with fan_in = the block's input size,
        # i.e. U(+-1/sqrt(fan_in)).  Bias: U(+-1/sqrt(out_features)) -- fly's quirk (nn.Linear uses in).
        for w in (self.blkdiag1, self.blkdiag2):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.out_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        # x is checked before F.pad, which fails on some bad inputs with messages about itself
        _checks.tensor(x, "x", "MonarchLinear", min_ndim=1)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"MonarchLinear: x.shape[-1] must be in_features={self.in_features}, got shape {tuple(x.shape)}")
        if self.in_features_extended != self.in_features:
            x = F.pad(x, (0, self.in_features_extended - self.in_features))
        y = monarch_matmul(x, self.blkdiag1, self.blkdiag2, backend=self.backend)
        if self.out_features_extended != self.out_features:
            y = y[..., : self.out_features]
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    @torch.no_grad()
    def to_dense(self) -> Tensor:
        """The dense (out_features, in_features) weight this layer applies (bias excluded)."""
        M = monarch_to_dense(self.blkdiag1, self.blkdiag2)
        return M[: self.out_features, : self.in_features].clone()

    @classmethod
    def from_linear(cls, linear: nn.Linear, nblocks: int = 4, backend: str | None = None) -> "MonarchLinear":
        """MonarchLinear whose weight is the optimal (Frobenius) Monarch projection of linear.weight."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"MonarchLinear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        W = linear.weight
        layer = cls(linear.in_features, linear.out_features, nblocks, bias=linear.bias is not None,
                    device=W.device, dtype=W.dtype, backend=backend)
        w1, w2 = project(W, nblocks)
        with torch.no_grad():
            layer.blkdiag1.copy_(w1)
            layer.blkdiag2.copy_(w2)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    @property
    def saving(self) -> float:
        """Parameters of the two factors as a fraction of the dense weight's (unpadded dims)."""
        return (self.blkdiag1.numel() + self.blkdiag2.numel()) / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, "
                f"bias={self.bias is not None}, blkdiag1={tuple(self.blkdiag1.shape)}, blkdiag2={tuple(self.blkdiag2.shape)}")
