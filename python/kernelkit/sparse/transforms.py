"""Sparse Iso-FLOP Transformations (Sparse-IFT) of dense linear layers, their FLOP accounting, and
:func:`sparsify_`, which transforms a whole model in place.

Thangarasa et al., "Sparse-IFT: Sparse Iso-FLOP Transformations for Maximizing Training Efficiency",
ICML 2024 (arXiv 2303.11525); code: CerebrasResearch/Sparse-IFT.  A dense layer ``D_in -> D_out``
is replaced by a bigger layer whose weights are sparse at ``s``, so that its FLOPs stay those of the
dense layer.  With ``k_s = round(1 / (1 - s))`` (the code's ``base_scaling``):

=============  ===========================================================  ==========================
family         construction                                                 width / rank
=============  ===========================================================  ==========================
wide           every hidden width x sqrt(k_s), all weights sparse; the      int(h * sqrt(k_s)), then a
               uniform sparsity is then searched so the model's total       FLOP search on s
               FLOPs are within 0.1% of dense
parallel       k_s copies of the layer, each sparse at s, each with its     k_s branches
               own norm (optional), outputs summed
factorized     W -> V . relu(norm(U x)), U (d x D_in), V (D_out x d),        d = ceil(D_in D_out /
               both sparse at s                                              ((1-s)(D_in + D_out)))
doped          W_s x + V (U x): the layer sparse at s plus a DENSE           d = floor(s D_in D_out /
               rank-d product                                               (D_in + D_out))
=============  ===========================================================  ==========================

The width/rank functions reproduce the published code's float arithmetic exactly, quirks included
(``1 - 0.9`` is 0.09999999999999998 in floating point, so a 2304-wide Factorized layer at s = 0.9 is
2305 wide, as in the fact sheet's table).  Doped's U and V stay dense: the rank formula is iso-FLOP
only then (the published code sparsifies them by accident, and its Doped models run at 0.19x to
0.75x of dense FLOPs).

FLOPs here are forward multiply-accumulates per input row of every linear layer: the nonzeros a
layer executes (``nnz`` for a SparseLinear, whether its sparse kernels or, below ``min_sparsity``, the
dense fallback run them; ``in * out`` for a dense one) plus one per bias entry.
Norms, activations, attention score products and embeddings are not counted (they are the same in
the dense and the transformed model, or nearly).  Training FLOPs are 3x the forward (forward, input
gradient, weight gradient), plus, with RigL, the dense-gradient GEMM ``n_out * n_in`` of every
dynamic sparse matrix on one step in ``delta_t`` up to ``t_end`` (kernelkit.sparse.dst).

Every transformed layer is freshly initialised (Sparse-IFT trains from scratch): random masks, and
the kept weights and biases drawn like nn.Linear's, U(+-1/sqrt(fan_in)).  Layers left as they were
keep their weights.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from .layers import SparseLinear, check_sparsity, random_mask

TRANSFORMS = ("wide", "parallel", "factorized", "doped", "sparse")
NORMS = ("batch", "layer", None)


# ---- the formulas ---------------------------------------------------------------------------------

def iso_flop_scale(sparsity: float) -> int:
    """``k_s = round(1 / (1 - s))``: the FLOP budget a layer sparse at ``s`` may spend, in units of
    its nonzeros (the published code's ``base_scaling``; round, not int, so that 0.99 gives 100)."""
    s = check_sparsity(sparsity, "iso_flop_scale")
    return round(1.0 / (1.0 - s))


def wide_width(width: int, sparsity: float) -> int:
    """Sparse Wide's widened hidden width ``int(width * sqrt(k_s))`` (the code's
    ``int(base_width * sqrt(base_scaling))``)."""
    width = _positive_int(width, "width", "wide_width")
    return int(width * math.sqrt(iso_flop_scale(sparsity)))


def factorized_width(d_in: int, d_out: int, sparsity: float) -> int:
    """Sparse Factorized's inner width ``ceil(D_in D_out / ((1 - s)(D_in + D_out)))``, evaluated
    like the code (``LowRankConv3x3.isoflop_width_control`` with 9 f_in -> D_in)."""
    where = "factorized_width"
    d_in, d_out = _positive_int(d_in, "d_in", where), _positive_int(d_out, "d_out", where)
    s = check_sparsity(sparsity, where)
    return int(math.ceil((d_in * d_out) / ((1 - s) * (d_in + d_out))))


def doped_rank(d_in: int, d_out: int, sparsity: float) -> int:
    """Sparse Doped's dense low rank ``floor(s D_in D_out / (D_in + D_out))``, evaluated like the
    code (``DopedConv3x3.isoflop_width_control``)."""
    where = "doped_rank"
    d_in, d_out = _positive_int(d_in, "d_in", where), _positive_int(d_out, "d_out", where)
    s = check_sparsity(sparsity, where)
    return int(math.floor((s * (d_in * d_out)) / (d_in + d_out)))


def _positive_int(v, name: str, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
        raise ValueError(f"{where}: {name} must be a positive int, got {v!r}")
    return int(v)


# ---- building blocks ------------------------------------------------------------------------------

class RowBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over all rows of a ``(..., C)`` input: the channel is the last dimension, as in a
    linear layer's output (nn.BatchNorm1d takes channels at dim 1 of a 3-D input).  The Sparse-IFT
    code puts a BatchNorm after every (sub)convolution; this is that norm for linear layers."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def _make_norm(kind: str | None, width: int, kw: dict) -> nn.Module | None:
    if kind is None:
        return None
    if kind == "batch":
        return RowBatchNorm1d(width, **kw)
    return nn.LayerNorm(width, **kw)


def _check_norm(norm, where: str):
    if norm not in NORMS:
        raise ValueError(f"{where}: norm must be 'batch', 'layer' or None, got {norm!r}")
    return norm


@dataclass
class _Ctx:
    """How new layers are made: device/dtype, kernelkit backend, randomness."""
    device: torch.device | None = None
    dtype: torch.dtype | None = None
    backend: str | None = None
    min_sparsity: float | None = None
    generator: torch.Generator | None = None

    @property
    def kw(self) -> dict:
        return {"device": self.device, "dtype": self.dtype}

    def uniform_(self, t: Tensor, fan_in: int) -> None:
        """nn.Linear's init, U(+-1/sqrt(fan_in)), from the generator (torch's global one if None)."""
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        with torch.no_grad():
            if self.generator is None or t.device.type == self.generator.device.type:
                t.uniform_(-bound, bound, generator=self.generator)
            else:
                t.copy_(torch.empty(t.shape, dtype=t.dtype).uniform_(-bound, bound, generator=self.generator))

    def sparse(self, n_in: int, n_out: int, sparsity: float, bias: bool) -> SparseLinear:
        mask = random_mask((n_out, n_in), sparsity, device=self.device, generator=self.generator)
        layer = SparseLinear(n_in, n_out, bias=bias, mask=mask, backend=self.backend,
                             min_sparsity=self.min_sparsity, **self.kw)
        if self.generator is not None:  # reproducible from the generator alone
            self.uniform_(layer.values, n_in)
            if layer.bias is not None:
                self.uniform_(layer.bias, n_in)
        return layer

    def dense(self, n_in: int, n_out: int, bias: bool) -> nn.Linear:
        layer = nn.Linear(n_in, n_out, bias=bias, **self.kw)
        if self.generator is not None:
            self.uniform_(layer.weight, n_in)
            if layer.bias is not None:
                self.uniform_(layer.bias, n_in)
        return layer


def _ctx(device, dtype, backend, min_sparsity, generator, where) -> _Ctx:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{where}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    return _Ctx(device, dtype, backend, min_sparsity, generator)


class SparseParallelLinear(nn.Module):
    """Sparse Parallel: ``y = sum_i norm_i(x W_i^T) + b`` with ``branches`` sparse W_i (out, in),
    each at ``sparsity`` (RepVGG-like; the published code sums BatchNorm'd branches, then applies the
    nonlinearity, which here is whatever follows the layer in the model).

    Args:
        in_features, out_features, bias: as nn.Linear (one bias, after the sum).
        branches: number of parallel sparse copies (Sparse-IFT: k_s).
        sparsity: each branch's sparsity, in [0, 1).
        norm: a norm per branch, ``"batch"`` (:class:`RowBatchNorm1d`, the paper's), ``"layer"`` or
            None.
        device, dtype, backend, min_sparsity: as :class:`SparseLinear`.
        generator: for the masks and the init (None: torch's global generator).
    """

    def __init__(self, in_features: int, out_features: int, branches: int, sparsity: float, bias: bool = True, *,
                 norm: str | None = "batch", device=None, dtype=None, backend: str | None = None,
                 min_sparsity: float | None = None, generator: torch.Generator | None = None):
        super().__init__()
        where = "SparseParallelLinear"
        branches = _positive_int(branches, "branches", where)
        sparsity = check_sparsity(sparsity, where)
        norm = _check_norm(norm, where)
        ctx = _ctx(device, dtype, backend, min_sparsity, generator, where)
        self.in_features, self.out_features, self.sparsity, self.norm_kind = in_features, out_features, sparsity, norm
        self.branches = nn.ModuleList(ctx.sparse(in_features, out_features, sparsity, bias=False)
                                      for _ in range(branches))
        self.norms = None if norm is None else nn.ModuleList(_make_norm(norm, out_features, ctx.kw)
                                                             for _ in range(branches))
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **ctx.kw))
            ctx.uniform_(self.bias, in_features)

    def forward(self, x: Tensor) -> Tensor:
        y = None
        for i, branch in enumerate(self.branches):
            yi = branch(x)
            if self.norms is not None:
                yi = self.norms[i](yi)
            y = yi if y is None else y + yi
        return y if self.bias is None else y + self.bias

    def flops(self) -> int:
        return sum(b.nnz for b in self.branches) + (self.out_features if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, branches={len(self.branches)}, "
                f"sparsity={self.sparsity:.4f}, norm={self.norm_kind!r}, bias={self.bias is not None}")


class SparseFactorizedLinear(nn.Module):
    """Sparse Factorized: ``y = V act(norm(U x)) + b`` with U (inner, in) and V (out, inner), both
    sparse at ``sparsity``.  The published configs use BatchNorm + ReLU between the factors
    (``uv_layer='nonlinear_relu'``); ``norm=None, relu=False`` is the plain product.

    Args:
        in_features, out_features, bias: as nn.Linear (the bias is V's).
        inner: the inner width d (Sparse-IFT: :func:`factorized_width`).
        sparsity: U's and V's sparsity, in [0, 1).
        norm: ``"batch"`` (:class:`RowBatchNorm1d`), ``"layer"`` or None, applied to U x.
        relu: a ReLU after the norm.
        device, dtype, backend, min_sparsity, generator: as :class:`SparseParallelLinear`.
    """

    def __init__(self, in_features: int, out_features: int, inner: int, sparsity: float, bias: bool = True, *,
                 norm: str | None = "batch", relu: bool = True, device=None, dtype=None, backend: str | None = None,
                 min_sparsity: float | None = None, generator: torch.Generator | None = None):
        super().__init__()
        where = "SparseFactorizedLinear"
        inner = _positive_int(inner, "inner", where)
        sparsity = check_sparsity(sparsity, where)
        norm = _check_norm(norm, where)
        if not isinstance(relu, bool):
            raise TypeError(f"{where}: relu must be a bool, got {type(relu).__name__}")
        ctx = _ctx(device, dtype, backend, min_sparsity, generator, where)
        self.in_features, self.out_features, self.inner, self.sparsity = in_features, out_features, inner, sparsity
        self.u = ctx.sparse(in_features, inner, sparsity, bias=False)
        self.norm = _make_norm(norm, inner, ctx.kw)
        self.act = nn.ReLU() if relu else None
        self.v = ctx.sparse(inner, out_features, sparsity, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.u(x)
        if self.norm is not None:
            h = self.norm(h)
        if self.act is not None:
            h = self.act(h)
        return self.v(h)

    def flops(self) -> int:
        return self.u.nnz + self.v.nnz + (self.out_features if self.v.bias is not None else 0)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, inner={self.inner}, "
                f"sparsity={self.sparsity:.4f}")


class SparseDopedLinear(nn.Module):
    """Sparse Doped: ``y = x W_s^T + b + (x U^T) V^T``, W_s (out, in) sparse at ``sparsity`` and a
    DENSE low-rank U (rank, in), V (out, rank) (nn.Linear, no bias).  Rank 0 (s = 0) has no U, V.

    Args:
        in_features, out_features, bias: as nn.Linear (the bias is W_s's).
        rank: the dense rank d (Sparse-IFT: :func:`doped_rank`).
        sparsity: W_s's sparsity, in [0, 1).
        device, dtype, backend, min_sparsity, generator: as :class:`SparseParallelLinear`.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, sparsity: float, bias: bool = True, *,
                 device=None, dtype=None, backend: str | None = None, min_sparsity: float | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        where = "SparseDopedLinear"
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 0:
            raise ValueError(f"{where}: rank must be an int >= 0, got {rank!r}")
        sparsity = check_sparsity(sparsity, where)
        ctx = _ctx(device, dtype, backend, min_sparsity, generator, where)
        self.in_features, self.out_features, self.rank, self.sparsity = in_features, out_features, int(rank), sparsity
        self.sparse = ctx.sparse(in_features, out_features, sparsity, bias=bias)
        self.u = ctx.dense(in_features, self.rank, bias=False) if self.rank else None
        self.v = ctx.dense(self.rank, out_features, bias=False) if self.rank else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.sparse(x)
        return y if self.u is None else y + self.v(self.u(x))

    def flops(self) -> int:
        return (self.sparse.nnz + (self.out_features if self.sparse.bias is not None else 0)
                + self.rank * (self.in_features + self.out_features))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"sparsity={self.sparsity:.4f}")


_COMPOSITES = (SparseParallelLinear, SparseFactorizedLinear, SparseDopedLinear)


# ---- FLOP accounting ------------------------------------------------------------------------------

def layer_flops(module: nn.Module) -> int | None:
    """Forward MACs per input row of one linear-like module (nonzeros executed + bias entries), or
    None for a module that is not one (nn.Linear, SparseLinear, the Sparse-IFT layers)."""
    if isinstance(module, _COMPOSITES):
        return module.flops()
    if isinstance(module, SparseLinear):
        return module.nnz + (module.out_features if module.bias is not None else 0)
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features + (module.out_features if module.bias is not None else 0)
    return None


def _linear_like(model: nn.Module, prefix: str = ""):
    """(name, module) of the outermost linear-like modules, in registration order."""
    if layer_flops(model) is not None:
        yield prefix, model
        return
    for name, child in model.named_children():
        yield from _linear_like(child, f"{prefix}.{name}" if prefix else name)


def forward_flops(model: nn.Module) -> int:
    """The forward MACs per input row of every linear layer of ``model`` (see the module docstring:
    nonzeros executed plus biases; norms, activations, attention products not counted)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"forward_flops: model must be an nn.Module, got {type(model).__name__}")
    return sum(layer_flops(m) for _, m in _linear_like(model))


def dense_grad_flops(model: nn.Module) -> int:
    """MACs per input row of RigL's dense-gradient GEMMs: ``n_out * n_in`` summed over the
    SparseLinear modules of ``model`` (what one mask-update step adds to training)."""
    return sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, SparseLinear))


def _nnz_params(module: nn.Module) -> tuple[int, int]:
    """(weights executed, parameters) of a linear-like module: for a SparseLinear the weights are its
    nonzeros; parameters count everything (norms and biases included)."""
    params = sum(p.numel() for p in module.parameters())
    nnz = sum(m.nnz for m in module.modules() if isinstance(m, SparseLinear))
    nnz += sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))
    return nnz, params


@dataclass
class LayerReport:
    """One linear layer of a :func:`sparsify_` run.  FLOPs are forward MACs per input row."""
    name: str
    transform: str                      # "wide", "parallel", "factorized", "doped", "sparse", or "dense"
    shape_before: tuple[int, int]       # (out_features, in_features)
    shape_after: tuple[int, int]        # Wide widens; the others keep the layer's interface
    sparsity: float                     # of its sparse matrices (0 for a dense layer)
    nnz: int                            # weights executed (sparse nonzeros + dense weights)
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    dense_grad_flops: int               # n_out * n_in of its sparse matrices (RigL's dense gradient)
    branches: int | None = None         # parallel
    inner: int | None = None            # factorized: d
    rank: int | None = None             # doped: d

    @property
    def ratio(self) -> float:
        return self.flops_after / self.flops_before

    @property
    def detail(self) -> str:
        if self.branches is not None:
            return f"{self.branches} branches"
        if self.inner is not None:
            return f"d={self.inner}"
        if self.rank is not None:
            return f"rank={self.rank}"
        if self.shape_after != self.shape_before:
            return "widened"
        return ""


@dataclass
class SparsifyReport:
    """What :func:`sparsify_` did: per linear layer (``layers``) and in total.

    ``sparsity`` is the one asked for; ``sparsity_used`` the uniform sparsity of the sparse matrices
    (Sparse Wide's FLOP search changes it).  ``flops_*`` are forward MACs per input row of all the
    model's linear layers (transformed or not); ``deviation`` is ``flops_after / flops_before - 1``."""
    transform: str
    sparsity: float
    sparsity_used: float
    k_s: int
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def flops_before(self) -> int:
        return sum(r.flops_before for r in self.layers)

    @property
    def flops_after(self) -> int:
        return sum(r.flops_after for r in self.layers)

    @property
    def deviation(self) -> float:
        return self.flops_after / self.flops_before - 1.0

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    @property
    def nnz(self) -> int:
        return sum(r.nnz for r in self.layers)

    @property
    def dense_grad_flops(self) -> int:
        return sum(r.dense_grad_flops for r in self.layers)

    def train_flops(self, delta_t: int | None = None, t_end: float = 0.75) -> float:
        """Training MACs per input row and step, averaged over training: 3x the forward, plus with
        RigL (``delta_t`` = its update period) the dense-gradient GEMMs of the sparse matrices on one
        step in ``delta_t`` during the first ``t_end`` fraction of training.  The dense model's is
        ``3 * flops_before``."""
        extra = 0.0
        if delta_t is not None:
            delta_t = _positive_int(delta_t, "delta_t", "SparsifyReport.train_flops")
            if not 0.0 <= t_end <= 1.0:
                raise ValueError(f"SparsifyReport.train_flops: t_end must be a fraction in [0, 1], got {t_end!r}")
            extra = t_end * self.dense_grad_flops / delta_t
        return 3.0 * self.flops_after + extra

    def __str__(self) -> str:
        head = (f"Sparse-IFT {self.transform!r} at s={self.sparsity:g} (k_s={self.k_s})"
                + (f", uniform sparsity after the FLOP search {self.sparsity_used:.4f}"
                   if self.transform == "wide" else ""))
        rows = [("layer", "transform", "shape before", "shape after", "detail", "sparsity", "nnz",
                 "FLOPs before", "FLOPs after", "ratio")]
        for r in self.layers:
            rows.append((r.name, r.transform, "x".join(map(str, r.shape_before)), "x".join(map(str, r.shape_after)),
                         r.detail, f"{r.sparsity:.4f}", f"{r.nnz:,}", f"{r.flops_before:,}", f"{r.flops_after:,}",
                         f"{r.ratio:.4f}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [head] + ["  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                          for row in rows]
        lines.append(f"total forward MACs/row {self.flops_before:,} -> {self.flops_after:,} "
                     f"({100 * self.deviation:+.3f}% vs dense); params {self.params_before:,} -> "
                     f"{self.params_after:,}; training MACs/row/step 3x forward = {self.train_flops():,.0f}, "
                     f"with RigL (delta_t=100, t_end=0.75) {self.train_flops(100):,.0f} "
                     f"(dense {3 * self.flops_before:,})")
        return "\n".join(lines)


# ---- Sparse Wide: which widths are hidden ---------------------------------------------------------

_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
                nn.Mish, nn.Softplus, nn.Softsign, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Tanhshrink,
                nn.LogSigmoid, nn.Dropout, nn.AlphaDropout, nn.Identity)
_WIDTH_NORMS = (nn.LayerNorm, nn.BatchNorm1d, nn.RMSNorm)


def _is_elementwise(m: nn.Module, extra: tuple) -> bool:
    if isinstance(m, nn.PReLU):
        return m.num_parameters == 1
    return isinstance(m, _ELEMENTWISE + extra)


def _norm_width(m: nn.Module) -> int | None:
    if isinstance(m, nn.BatchNorm1d):
        return m.num_features
    shape = tuple(m.normalized_shape)
    return shape[0] if len(shape) == 1 else None


@dataclass
class _Chain:
    producer: str                                 # the Linear whose output width is hidden
    consumer: str                                 # the Linear that reads it
    width: int
    norms: list = field(default_factory=list)     # names of the norms on that width between them


def _sequence(parent: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """The children of ``parent`` in forward order: nn.Sequential flattened through nested
    nn.Sequential; any other parent in registration order."""
    out = []
    for name, child in parent.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if type(parent) is nn.Sequential and type(child) is nn.Sequential:
            out.extend(_sequence(child, full))
        else:
            out.append((full, child))
    return out


def _hidden_chains(model: nn.Module, extra_elementwise: tuple) -> list[_Chain]:
    """Every hidden width of ``model`` (see :func:`sparsify_`, "What Sparse Wide widens")."""
    chains = []

    def visit(parent: nn.Module, prefix: str, flattened: bool):
        seq = _sequence(parent, prefix)
        sequential = type(parent) is nn.Sequential
        if not flattened:  # a Sequential nested in a Sequential was scanned as part of its parent
            for i, (a_name, a) in enumerate(seq):
                if type(a) is not nn.Linear:
                    continue
                j, norms = i + 1, []
                while j < len(seq) and (_is_elementwise(seq[j][1], extra_elementwise)
                                        or isinstance(seq[j][1], _WIDTH_NORMS)):
                    if isinstance(seq[j][1], _WIDTH_NORMS):
                        norms.append(seq[j])
                    j += 1
                if j == len(seq) or type(seq[j][1]) is not nn.Linear or seq[j][1].in_features != a.out_features:
                    continue
                b_name, b = seq[j]
                h = a.out_features
                for n_name, n in norms:
                    if _norm_width(n) != h:
                        raise ValueError(
                            f"sparsify_: Sparse Wide cannot widen the hidden width {h} between {a_name!r} and "
                            f"{b_name!r}: the norm {n_name!r} ({type(n).__name__}) between them normalises "
                            f"{getattr(n, 'normalized_shape', getattr(n, 'num_features', '?'))}, not ({h},)")
                if not sequential:
                    # registration order stands for the forward order here: refuse when another Linear of
                    # this module could also read or write the width (e.g. a gated MLP's gate projection)
                    others = [n for n, m in parent.named_children()
                              if type(m) is nn.Linear and m is not a and m is not b
                              and h in (m.in_features, m.out_features)]
                    if others:
                        raise ValueError(
                            f"sparsify_: Sparse Wide cannot tell which layers share the hidden width {h} of "
                            f"{prefix or 'the model'!r}: besides {a_name!r} -> {b_name!r}, its Linear(s) "
                            f"{others} also have a dimension {h} (a gated MLP?).  Only chains Linear -> "
                            f"(activation/norm/dropout)* -> Linear are widened; exclude this module with "
                            f"filter or use another transform")
                chains.append(_Chain(a_name, b_name, h, [n for n, _ in norms]))
        for name, child in parent.named_children():
            if layer_flops(child) is None:
                visit(child, f"{prefix}.{name}" if prefix else name, sequential and type(child) is nn.Sequential)

    visit(model, "", False)
    return chains


def _widened_norm(n: nn.Module, width: int) -> nn.Module:
    w = n.weight if getattr(n, "weight", None) is not None else None
    kw = {"device": w.device if w is not None else None, "dtype": w.dtype if w is not None else None}
    if isinstance(n, nn.BatchNorm1d):
        return type(n)(width, eps=n.eps, momentum=n.momentum, affine=n.affine,
                        track_running_stats=n.track_running_stats, **kw)
    if isinstance(n, nn.LayerNorm):
        return type(n)(width, eps=n.eps, elementwise_affine=n.elementwise_affine, bias=n.bias is not None, **kw)
    return type(n)(width, eps=n.eps, elementwise_affine=n.elementwise_affine, **kw)  # RMSNorm


# ---- sparsify_ ------------------------------------------------------------------------------------

def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _wide_search(fixed: int, sizes: list[tuple[int, int]], budget: int, tol: float) -> float:
    """The uniform sparsity s' of the sparse matrices (numel N_i, bias b_i) that brings
    ``fixed + sum_i round((1 - s') N_i) + b_i`` closest to ``budget`` (bisection; the FLOPs fall as
    s' grows).  ValueError when even the sparsest model is over budget by more than ``tol``."""
    def flops(s):
        return fixed + sum(int(round((1.0 - s) * n)) + b for n, b in sizes)

    lo, hi = 0.0, 1.0 - 1e-12
    if flops(lo) <= budget:
        return lo
    if flops(hi) > budget * (1.0 + tol):
        raise ValueError(
            f"sparsify_: Sparse Wide cannot be iso-FLOP here: the layers it leaves dense, widened, and the sparse "
            f"layers' biases already cost {flops(hi):,} MACs per row, over the dense model's {budget:,} "
            f"(+{100 * (flops(hi) / budget - 1):.1f}%).  The first and last Linear are widened on one side "
            f"but stay dense; sparsify them too (dense_first_last=False), use a lower sparsity, or a deeper model")
    for _ in range(200):  # F(lo) > budget >= F(hi)
        mid = 0.5 * (lo + hi)
        if flops(mid) > budget:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return min((lo, hi), key=lambda s: abs(flops(s) - budget))


def sparsify_(model: nn.Module, transform: str = "wide", sparsity: float = 0.9, *,
              filter: Callable[[str, nn.Linear], bool] | None = None,  # noqa: A002 (public name)
              dense_first_last: bool = True, norm: str | None = "batch", relu: bool = True,
              backend: str | None = None, min_sparsity: float | None = None,
              generator: torch.Generator | None = None, flop_tolerance: float = 1e-3,
              elementwise: tuple = ()) -> SparsifyReport:
    """Apply a Sparse Iso-FLOP Transformation to the linear layers of ``model``, in place.

    Args:
        model: any module holding nn.Linear layers (plain ``nn.Sequential`` stacks, transformer
            blocks, ...); only modules of exact type nn.Linear are transformed (not subclasses such
            as nn.MultiheadAttention's out_proj, whose weight its parent reads directly).
        transform: ``"wide"``, ``"parallel"``, ``"factorized"``, ``"doped"`` (the Sparse-IFT
            families, module docstring) or ``"sparse"`` (the baseline: the same shape, sparse at s,
            so fewer FLOPs).
        sparsity: s in [0, 1); k_s = round(1 / (1 - s)).
        filter: ``filter(qualified_name, linear) -> bool`` chooses the layers to transform (all if
            None), e.g. ``lambda name, m: "mlp" in name``.
        dense_first_last: keep the model's first and last nn.Linear (registration order, subclasses
            included) dense, as Sparse-IFT does with the stem and the classifier.  Sparse Wide still
            widens their hidden side.
        norm: ``"batch"`` (the paper's BatchNorm, :class:`RowBatchNorm1d`), ``"layer"`` or None:
            the per-branch norm of "parallel" and the norm between the factors of "factorized".
        relu: a ReLU after that norm in "factorized".
        backend, min_sparsity: for the new SparseLinear layers (see SparseLinear).
        generator: masks and initial weights come from it (None: torch's global generator).
        flop_tolerance: Sparse Wide's FLOP search must end within this fraction of the dense FLOPs.
        elementwise: extra module types that keep the width (activations of your own) for Wide's
            chain rule.

    What Sparse Wide widens (the hidden widths).  Inside one parent module, a *chain* is an
    nn.Linear A, then zero or more activations / dropouts / nn.Identity / width norms (LayerNorm,
    BatchNorm1d, RMSNorm over A's output), then an nn.Linear B with ``B.in_features ==
    A.out_features``.  In an nn.Sequential that is the forward order (nested nn.Sequential are
    flattened into it); in any other module the registration order is taken as the forward order,
    as in the usual ``fc1, act, fc2`` MLP blocks, and a chain is refused (ValueError) when another
    Linear of that module has the same width (a gated MLP).  A chain with A or B selected for
    transformation is widened to :func:`wide_width`: A's output, B's input and the norms between
    them, A and B become new layers of that size (dense if not selected).  The selected layers are
    made sparse at one uniform sparsity, found by bisection so that the model's total FLOPs match
    what they were before the call, the dense model's (ValueError if impossible, e.g. a 3-layer MLP
    whose dense first and last layers alone, widened, exceed the budget).  A selected Linear in no chain is sparsified without
    widening.  Widths that are model inputs or outputs, or residual streams, are never widened.

    Returns:
        a :class:`SparsifyReport` (print it for a table): per layer the transform, shapes, widths
        and ranks, nnz and FLOPs before/after, and the totals with the deviation from dense.
    Raises:
        TypeError: model not an nn.Module (or a bare nn.Linear, which cannot be replaced in place),
            filter not callable, generator not a torch.Generator.
        ValueError: sparsity outside [0, 1), an unknown transform or norm, no layer to transform,
            a hidden width Sparse Wide cannot widen consistently, an infeasible FLOP budget.
    """
    where = "sparsify_"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    if type(model) is nn.Linear:
        raise TypeError(f"{where}: pass the parent module; a bare nn.Linear cannot be replaced in place "
                        f"(build the layer directly, e.g. SparseParallelLinear)")
    if transform not in TRANSFORMS:
        raise ValueError(f"{where}: transform must be one of {', '.join(map(repr, TRANSFORMS))}, got {transform!r}")
    sparsity = check_sparsity(sparsity, where)
    norm = _check_norm(norm, where)
    if filter is not None and not callable(filter):
        raise TypeError(f"{where}: filter must be a callable (name, module) -> bool or None, "
                        f"got {type(filter).__name__}")
    if not isinstance(relu, bool) or not isinstance(dense_first_last, bool):
        raise TypeError(f"{where}: relu and dense_first_last must be bools, got {relu!r} and {dense_first_last!r}")
    if not (isinstance(flop_tolerance, (int, float)) and 0.0 < flop_tolerance < 1.0):
        raise ValueError(f"{where}: flop_tolerance must be a number in (0, 1), got {flop_tolerance!r}")
    ctx = _ctx(None, None, backend, min_sparsity, generator, where)
    elementwise = (elementwise,) if isinstance(elementwise, type) else tuple(elementwise)
    if not all(isinstance(t, type) and issubclass(t, nn.Module) for t in elementwise):
        raise TypeError(f"{where}: elementwise must be nn.Module subclasses (types), got {elementwise!r}")

    leaves = list(_linear_like(model))  # every linear-like module, for the report
    # the nn.Linear layers, not those inside Sparse-IFT layers already there (Doped's dense U, V)
    linears = [(n, m) for n, m in leaves if type(m) is nn.Linear]
    if not linears:
        raise ValueError(f"{where}: the model has no nn.Linear layer")
    every = [n for n, m in leaves if isinstance(m, nn.Linear)]  # subclasses too (MultiheadAttention's out_proj)
    ends = {every[0], every[-1]} if dense_first_last else set()
    selected = {n for n, m in linears if n not in ends and (filter is None or filter(n, m))}
    if not selected:
        raise ValueError(f"{where}: no layer to transform: filter selected none"
                         + (f", or only the first/last Linear {sorted(ends)}, which dense_first_last=True "
                            f"keeps dense" if ends else ""))
    k = iso_flop_scale(sparsity)
    before = {n: (layer_flops(m), *_nnz_params(m)) for n, m in leaves}
    original = dict(linears)
    rows: dict[str, dict] = {}
    sparsity_used = sparsity

    if transform == "wide":
        shape = {n: [m.out_features, m.in_features] for n, m in linears}
        widen_norms = {}
        for c in _hidden_chains(model, elementwise):
            if c.producer in selected or c.consumer in selected:
                w = wide_width(c.width, sparsity)
                shape[c.producer][0] = w
                shape[c.consumer][1] = w
                for nn_name in c.norms:
                    widen_norms[nn_name] = w
        changed = [n for n, _ in linears if n in selected or tuple(shape[n]) != (original[n].out_features,
                                                                               original[n].in_features)]
        budget = sum(f for f, _, _ in before.values())
        fixed = budget - sum(before[n][0] for n in changed)
        sizes = []
        for n in changed:
            o, i = shape[n]
            b = o if original[n].bias is not None else 0
            if n in selected:
                sizes.append((o * i, b))
            else:
                fixed += o * i + b
        sparsity_used = _wide_search(fixed, sizes, budget, flop_tolerance)
        for n in changed:
            m, (o, i) = original[n], shape[n]
            ctx.device, ctx.dtype = m.weight.device, m.weight.dtype
            bias = m.bias is not None
            new = ctx.sparse(i, o, sparsity_used, bias) if n in selected else ctx.dense(i, o, bias)
            _set(model, n, new)
            rows[n] = {"transform": "wide" if n in selected else "dense"}
        for nn_name, w in widen_norms.items():
            _set(model, nn_name, _widened_norm(model.get_submodule(nn_name), w))
    else:
        for n in sorted(selected, key=[x for x, _ in linears].index):
            m = original[n]
            ctx.device, ctx.dtype = m.weight.device, m.weight.dtype
            i, o, bias = m.in_features, m.out_features, m.bias is not None
            kw = {"device": ctx.device, "dtype": ctx.dtype, "backend": backend, "min_sparsity": min_sparsity,
                  "generator": generator}
            if transform == "parallel":
                new = SparseParallelLinear(i, o, k, sparsity, bias, norm=norm, **kw)
                rows[n] = {"transform": transform, "branches": k}
            elif transform == "factorized":
                d = factorized_width(i, o, sparsity)
                new = SparseFactorizedLinear(i, o, d, sparsity, bias, norm=norm, relu=relu, **kw)
                rows[n] = {"transform": transform, "inner": d}
            elif transform == "doped":
                r = doped_rank(i, o, sparsity)
                new = SparseDopedLinear(i, o, r, sparsity, bias, **kw)
                rows[n] = {"transform": transform, "rank": r}
            else:
                new = ctx.sparse(i, o, sparsity, bias)
                rows[n] = {"transform": transform}
            _set(model, n, new)

    report = SparsifyReport(transform, sparsity, sparsity_used, k)
    for n, m_before in leaves:
        m = model.get_submodule(n)
        f0, _, p0 = before[n]
        nnz, p1 = _nnz_params(m)
        sparse = [x for x in m.modules() if isinstance(x, SparseLinear)]
        extra = rows.get(n, {"transform": "dense" if not sparse else "kept"})
        report.layers.append(LayerReport(
            name=n, transform=extra["transform"],
            shape_before=(m_before.out_features, m_before.in_features), shape_after=(m.out_features, m.in_features),
            sparsity=sparse[0].sparsity if sparse else 0.0, nnz=nnz, params_before=p0, params_after=p1,
            flops_before=f0, flops_after=layer_flops(m),
            dense_grad_flops=sum(x.out_features * x.in_features for x in sparse),
            branches=extra.get("branches"), inner=extra.get("inner"), rank=extra.get("rank")))
    if transform == "wide" and abs(report.deviation) > flop_tolerance:
        warnings.warn(f"{where}: Sparse Wide's FLOP search ended {100 * report.deviation:+.3f}% from dense, outside "
                      f"flop_tolerance={flop_tolerance}: the layers are too small for whole nonzeros to meet the "
                      f"budget more closely", stacklevel=2)
    return report
