"""Optimal Brain Surgeon pruning with the M-FAC static inverse (Frantar, Kurtic & Alistarh, NeurIPS 2021,
``main_prun.py: MFACPruner``).

With F = damp I + (1/m) sum_i g_i g_i^T the damped empirical Fisher of m gradients of the pruned
parameters (flattened into one vector w of d entries; block-diagonal over blocks of ``block_size``
consecutive entries), one pruning step

  1. scores every kept weight: rho_q = w_q^2 / (2 [F^-1]_qq)          (the loss increase of dropping q alone)
  2. drops the lowest-scoring ones up to the step's target (over all parameters, or per parameter
     with scope="layer");
  3. corrects the rest: w <- w + F^-1 t, t_q = -w_q / [F^-1]_qq on the newly dropped set, 0 elsewhere
     (each dropped weight's own OBS correction, summed; correlations between dropped weights ignored);
  4. zeroes every pruned weight.

``prune(sparsity, data, nrecomps=k)`` reaches the target in k equal steps, each with fresh gradients
of the model as pruned so far (the gradients of pruned weights are zeroed), which matters when many
weights go at once.  Gradual pruning = calling prune with rising targets between training phases
(``mask_gradients`` before and ``apply_masks`` after each optimizer step keep the pruned weights at 0).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from .. import _progress
from .ihvp import StaticIHVP

__all__ = ["OBSPruner", "to_sparse", "magnitude_masks", "default_param_names"]

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def default_param_names(model: nn.Module) -> list[str]:
    """The ``weight`` of every nn.Linear / nn.Conv1d / nn.Conv2d / nn.Conv3d, in module order."""
    return [f"{name}.weight" if name else "weight" for name, mod in model.named_modules()
            if isinstance(mod, _PRUNABLE) and isinstance(getattr(mod, "weight", None), nn.Parameter)]


def _sparsity(s, fn: str) -> float:
    if isinstance(s, bool) or not isinstance(s, (int, float)):
        raise TypeError(f"{fn}: sparsity must be a float, got {type(s).__name__}")
    s = float(s)
    if not 0.0 <= s < 1.0:
        raise ValueError(f"{fn}: sparsity must be in [0, 1), got {s}")
    return s


def _lowest(scores: Tensor, k: int) -> Tensor:
    """Indices of the k lowest scores (ties by position, lowest first)."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.int64, device=scores.device)
    return torch.sort(scores.double(), stable=True).indices[:k]


@torch.no_grad()
def magnitude_masks(model: nn.Module, sparsity: float, params: list[str] | None = None,
                    scope: str = "global") -> dict[str, Tensor]:
    """The baseline: keep the largest |w| (global over ``params``, or per parameter), exactly
    round(sparsity * n) dropped.  Returns masks (True = kept); does not change the model."""
    fn = "kernelkit.mfac.magnitude_masks"
    sparsity = _sparsity(sparsity, fn)
    named = dict(model.named_parameters())
    names = default_param_names(model) if params is None else list(params)
    ws = [named[n].detach() for n in names]
    if scope == "layer":
        out = {}
        for n, w in zip(names, ws):
            keep = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
            keep[_lowest(w.abs().reshape(-1), round(sparsity * w.numel()))] = False
            out[n] = keep.view(w.shape)
        return out
    flat = torch.cat([w.abs().reshape(-1).double() for w in ws])
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[_lowest(flat, round(sparsity * flat.numel()))] = False
    out, off = {}, 0
    for n, w in zip(names, ws):
        out[n] = keep[off:off + w.numel()].view(w.shape).clone()
        off += w.numel()
    return out


@torch.no_grad()
def to_sparse(model: nn.Module, masks: dict[str, Tensor]) -> nn.Module:
    """Replace (in place) every nn.Linear whose weight has a mask by a kernelkit.sparse.SparseLinear with
    that mask and the linear's kept weights and bias; returns the model.  Other masked parameters
    (convolutions) stay dense, with their zeros."""
    from kernelkit.sparse import SparseLinear

    for name, mask in masks.items():
        if not name.endswith("weight"):
            continue
        path = name[:-len("weight")].rstrip(".")
        lin = model.get_submodule(path) if path else model
        if not isinstance(lin, nn.Linear):
            continue
        W = lin.weight.detach()
        layer = SparseLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, mask=mask,
                             device=W.device, dtype=W.dtype)
        layer.values.copy_(layer.layout.values_from_dense(W))
        if lin.bias is not None:
            layer.bias.copy_(lin.bias)
        if path:
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, layer)
        else:
            raise ValueError("kernelkit.mfac.to_sparse: the model itself is an nn.Linear; wrap it in a module")
    return model


class OBSPruner:
    """One-shot or gradual OBS pruning with the M-FAC static inverse of the empirical Fisher.

    Args:
        model: the module to prune (its parameters are changed in place).
        ngrads: m, gradients per Fisher estimate (one per batch, >= 1).
        damp: lambda > 0 of F = lambda I + (1/m) sum g g^T.  The scale matters: lambda is compared with
            the gradients' squared entries.
        block_size: F is taken block-diagonal over blocks of this many consecutive entries of the
            flattened parameters (None: the full F; the paper's default is 128).
        params: names (as in model.named_parameters()) of the parameters to prune; default: the
            ``weight`` of every nn.Linear / nn.Conv1d / nn.Conv2d / nn.Conv3d.
        scope: "global" (one ranking over all pruned parameters) or "layer" (each parameter pruned
            to the target on its own).
        backend: force a kernelkit backend for the static IHVP.
        progress: tqdm bars while collecting gradients.

    The gradient buffer is float32 (ngrads x d of the pruned parameters).  ``masks`` (name -> bool
    tensor, True = kept) persist between calls: pruned weights stay pruned.  ``stats`` holds the last
    call's timing (seconds): gradient collection, the static setup, the scores, the OBS update.
    """

    def __init__(self, model: nn.Module, ngrads: int = 64, damp: float = 1e-5, block_size: int | None = 128,
                 params: list[str] | None = None, scope: str = "global", backend: str | None = None,
                 progress: bool = True):
        fn = "kernelkit.mfac.OBSPruner"
        if not isinstance(model, nn.Module):
            raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
        if isinstance(ngrads, bool) or not isinstance(ngrads, int):
            raise TypeError(f"{fn}: ngrads must be an int, got {type(ngrads).__name__}")
        if ngrads < 1:
            raise ValueError(f"{fn}: ngrads must be >= 1, got {ngrads}")
        if isinstance(damp, bool) or not isinstance(damp, (int, float)):
            raise TypeError(f"{fn}: damp must be a float, got {type(damp).__name__}")
        if not (math.isfinite(float(damp)) and damp > 0):
            raise ValueError(f"{fn}: damp must be finite and > 0, got {damp}")
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                       or block_size < 1):
            raise ValueError(f"{fn}: block_size must be None or an int >= 1, got {block_size!r}")
        if scope not in ("global", "layer"):
            raise ValueError(f"{fn}: scope must be 'global' or 'layer', got {scope!r}")
        named = dict(model.named_parameters())
        names = default_param_names(model) if params is None else list(params)
        for n in names:
            if n not in named:
                raise ValueError(f"{fn}: the model has no parameter named {n!r}")
            if not named[n].is_floating_point():
                raise TypeError(f"{fn}: parameter {n!r} is not floating point ({named[n].dtype})")
        if not names:
            raise ValueError(f"{fn}: no prunable parameter (no nn.Linear / nn.Conv weight in the model and no "
                             "params given)")
        if len(set(names)) != len(names):
            raise ValueError(f"{fn}: params lists a parameter twice")
        if len({named[n].device for n in names}) != 1:
            raise ValueError(f"{fn}: the pruned parameters must be on one device")
        self.model, self.ngrads, self.damp, self.block_size = model, ngrads, float(damp), block_size
        self.scope, self.backend, self.progress = scope, backend, progress
        self.names = names
        self.params = [named[n] for n in names]
        self.sizes = [p.numel() for p in self.params]
        self.d = sum(self.sizes)
        self.masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in zip(names, self.params)}
        self.stats: dict[str, float] = {}
        self._it = None          # the loader's iterator, kept so that each estimate sees fresh batches
        self._data = None

    # -- helpers -------------------------------------------------------------------------------------
    def _flat_mask(self) -> Tensor:
        return torch.cat([self.masks[n].reshape(-1) for n in self.names])

    def _flat_weights(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1).float() for p in self.params])

    def _batches(self, data, fn: str):
        """The next batch, restarting the loader when it runs out."""
        if data is not self._data:
            self._data, self._it = data, iter(data)
        for fresh in (False, True):
            try:
                return next(self._it)
            except StopIteration:
                if fresh:
                    break
                self._it = iter(data)
        raise ValueError(f"{fn}: the loader yielded no batch (empty, or a spent iterator that cannot restart)")

    def collect(self, data, loss_fn: Callable | None = None, ngrads: int | None = None) -> Tensor:
        """The (ngrads, d) float32 buffer of gradients of the pruned parameters, one per batch of
        ``data`` (an iterable of batches, each given to ``loss_fn(model, batch)``; cycled if needed)
        or one per call of ``data`` (a closure () -> loss, when loss_fn is None); gradients of pruned
        weights are zeroed.  The parameters' ``.grad`` are not touched."""
        fn = "kernelkit.mfac.OBSPruner.collect"
        m = self.ngrads if ngrads is None else ngrads
        if loss_fn is None:
            if not callable(data):
                raise TypeError(f"{fn}: data must be a closure () -> loss when loss_fn is None, got "
                                f"{type(data).__name__}")
            one = data
        else:
            if not callable(loss_fn):
                raise TypeError(f"{fn}: loss_fn must be callable (model, batch) -> loss")
            if not isinstance(data, Iterable):
                raise TypeError(f"{fn}: data must be an iterable of batches, got {type(data).__name__}")
            one = lambda: loss_fn(self.model, self._batches(data, fn))  # noqa: E731
        mask = self._flat_mask().to(torch.float32)
        G = torch.empty(m, self.d, dtype=torch.float32, device=mask.device)
        if self.progress:
            bar = _progress.bar(True, total=m, desc="OBS gradients", leave=False)
        else:
            bar = _progress.NoBar()
        try:
            for i in range(m):
                with torch.enable_grad():
                    loss = one()
                    if not isinstance(loss, Tensor) or loss.numel() != 1:
                        raise TypeError(f"{fn}: the loss must be a one-element tensor, got "
                                        f"{type(loss).__name__}{'' if not isinstance(loss, Tensor) else tuple(loss.shape)}")
                    grads = torch.autograd.grad(loss.reshape(()), self.params, allow_unused=True)
                g = torch.cat([(torch.zeros(n, device=mask.device) if gr is None else gr.reshape(-1).float())
                               for gr, n in zip(grads, self.sizes)])
                if not bool(torch.isfinite(g).all()):
                    raise ValueError(f"{fn}: gradient {i} has a non-finite entry (NaN or inf); this pruning step was not applied")
                G[i] = g * mask
                bar.update(1)
        finally:
            bar.close()
        return G

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Re-zero every pruned weight (e.g. after an optimizer step)."""
        for n, p in zip(self.names, self.params):
            p.masked_fill_(~self.masks[n], 0)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradients of pruned weights (before an optimizer step)."""
        for n, p in zip(self.names, self.params):
            if p.grad is not None:
                p.grad.masked_fill_(~self.masks[n], 0)

    @property
    def sparsity(self) -> float:
        """The fraction of pruned weights over all pruned parameters."""
        return 1.0 - sum(int(m.sum()) for m in self.masks.values()) / self.d

    def to_sparse(self, model: nn.Module | None = None) -> nn.Module:
        """:func:`to_sparse` with this pruner's masks (default: on its model)."""
        return to_sparse(self.model if model is None else model, self.masks)

    # -- pruning -------------------------------------------------------------------------------------
    def _units(self) -> list[tuple[int, int]]:
        """(lo, hi) ranges of the flat vector pruned to the target separately."""
        if self.scope == "global":
            return [(0, self.d)]
        out, off = [], 0
        for n in self.sizes:
            out.append((off, off + n))
            off += n
        return out

    @torch.no_grad()
    def step(self, G: Tensor, counts: list[int]) -> int:
        """One OBS step from the gradient buffer G (m, d): prune unit u (see scope) to ``counts[u]``
        pruned weights; returns the number of newly dropped weights."""
        t0 = time.perf_counter()
        ihvp = StaticIHVP(G, self.damp, self.block_size, backend=self.backend)
        t1 = time.perf_counter()
        w = self._flat_weights()
        keep = self._flat_mask()
        dinv = ihvp.diag().float().clamp_min(torch.finfo(torch.float32).tiny)
        scores = w.square() / (2 * dinv)
        scores[~keep] = math.inf
        drop = []
        for (lo, hi), k in zip(self._units(), counts):
            have = int((~keep[lo:hi]).sum())
            drop.append(lo + _lowest(scores[lo:hi], k - have))
        drop = torch.cat(drop)
        t2 = time.perf_counter()
        if drop.numel():
            t = torch.zeros_like(w)
            t[drop] = -w[drop] / dinv[drop]
            w = w + ihvp.mul(t).float()
            keep[drop] = False
        w[~keep] = 0
        off = 0
        for n, p, size in zip(self.names, self.params, self.sizes):
            p.copy_(w[off:off + size].view_as(p).to(p.dtype))
            self.masks[n] = keep[off:off + size].view_as(p).clone()
            off += size
        t3 = time.perf_counter()
        for key, v in (("setup", t1 - t0), ("scores", t2 - t1), ("update", t3 - t2)):
            self.stats[key] = self.stats.get(key, 0.0) + v
        return int(drop.numel())

    def prune(self, sparsity: float, data, loss_fn: Callable | None = None, nrecomps: int = 1) -> dict[str, Tensor]:
        """Prune to ``sparsity`` (the fraction of pruned weights over all pruned parameters, or in each
        with scope="layer"; exactly round(sparsity * n) of them) in ``nrecomps`` equal steps, each with
        ``ngrads`` fresh gradients from ``data`` (see :meth:`collect`).  Already-pruned weights stay
        pruned; a target below the current sparsity prunes nothing.  Returns the masks (name -> bool
        tensor of the parameter's shape, True = kept), as kernelkit.sparse.SparseLinear takes them."""
        fn = "kernelkit.mfac.OBSPruner.prune"
        sparsity = _sparsity(sparsity, fn)
        if isinstance(nrecomps, bool) or not isinstance(nrecomps, int) or nrecomps < 1:
            raise ValueError(f"{fn}: nrecomps must be an int >= 1, got {nrecomps!r}")
        self.stats = {"gradients": 0.0}
        keep = self._flat_mask()
        start = [int((~keep[lo:hi]).sum()) for lo, hi in self._units()]
        final = [max(s, round(sparsity * (hi - lo))) for s, (lo, hi) in zip(start, self._units())]
        for i in range(nrecomps):
            counts = [s + round((f - s) * (i + 1) / nrecomps) for s, f in zip(start, final)]
            t0 = time.perf_counter()
            G = self.collect(data, loss_fn)
            self.stats["gradients"] += time.perf_counter() - t0
            self.step(G, counts)
        return {n: m.clone() for n, m in self.masks.items()}

    def __repr__(self) -> str:
        return (f"OBSPruner({len(self.names)} parameters, d={self.d}, ngrads={self.ngrads}, damp={self.damp:g}, "
                f"block_size={self.block_size}, scope={self.scope!r}, sparsity={self.sparsity:.3f})")
