"""Dynamic sparse training of SparseLinear layers: RigL and SET, each wrapping any torch optimizer.

Every ``delta_t`` optimizer steps the mask of each layer changes at constant nnz (each layer's
sparsity stays exact):

RigL  (Evci et al., "Rigging the Lottery", ICML 2020; google-research/rigl; the Sparse-IFT code's
      cbsparse RigLMaskOptimizer).  At step t (t % delta_t == 0, 0 < t < t_end) drop the
      ``n = int(f(t) * nnz)`` active weights of smallest |w|, with the cosine-annealed fraction
      ``f(t) = alpha / 2 * (1 + cos(pi * t / t_end))`` (alpha = 0.3, t_end = 0.75 of training), and
      regrow ``n`` of the positions that were inactive before the update, those with the largest
      |dense gradient| of the loss (so a weight just dropped is never regrown in the same update).
      Regrown weights start at 0.
SET   (Mocanu et al., Nature Communications 2018).  Drop the fraction ``zeta`` (0.3) of the
      smallest positive weights and the fraction ``zeta`` of the largest negative ones (those
      closest to zero; exact zeros count with the positives, as the smallest of them), and regrow as
      many at uniformly random previously inactive positions, drawn from the layer's init,
      U(+-1/sqrt(in_features)).

For both, a regrown weight's optimizer state (momentum, Adam's moments: every state tensor shaped
like the values) starts at zero, and the kept weights keep theirs, moved to their new CSR positions
(:func:`remap_state`).  Ties (equal |w| or |grad|) go to the lower position (row-major), so RigL is
deterministic; SET draws from ``generator``.  Stale gradients of the changed layers are cleared
(``values.grad = None``).

RigL's dense gradient ``dL/dW = dout^T x`` (n_out x n_in) exists only on the steps whose update
follows: RigL arms each layer's ``_dense_grad_hook`` slot (SparseLinear.forward calls it) just for
the forward/backward of the step before an update, which stores ``kernelkit.sparse.dense_grad(x,
dout)`` (summed over the forward calls of that step, e.g. gradient accumulation), and disarms it
after.  Other steps pay nothing.  The published cbsparse code keeps its dense gradient the same way.

Usage::

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rigl = kernelkit.sparse.RigL(model, opt, delta_t=100, total_steps=steps)   # t_end = 0.75 * steps
    for x, y in data:
        loss = loss_fn(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        rigl.step()                                        # right after the optimizer's step

Differences from the references, on purpose: the regrowth candidates are the positions inactive
*before* the update (google-research/rigl and cbsparse also admit the just-dropped ones, which then
restart at zero), and the drop count is capped by the number of inactive positions (it only binds
below ~23% sparsity at alpha = 0.3).

Data parallel (DDP): every rank must make the same mask change, at the same time (call ``step()`` on
every rank after each optimizer step).  With torch.distributed initialized and more than one rank,
RigL averages its dense gradient over the ranks before choosing the regrown positions (each rank
only saw its part of the batch: the result is the single-process choice on the global batch), and
SET takes rank 0's random regrowth (positions and values), so the ranks need not share generator
seeds.  The drops depend only on the weights, which DDP keeps identical.  ``process_group`` picks
the group (default: the default group); ``process_group=False`` turns this off (ranks training
different models).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .layers import SparseLinear
from .ops import dense_grad


@torch.no_grad()
def remap_state(optimizer: torch.optim.Optimizer, param: Tensor, src: Tensor, old_numel: int | None = None) -> int:
    """Carry ``param``'s per-entry optimizer state through a mask change.

    ``src`` (int64, the new nnz) is :meth:`SparseLinear.set_mask_`'s result: for each new entry its
    position in the old values, or -1 for a new entry.  Every state tensor of ``param`` shaped
    ``(old_numel,)`` (SGD's momentum_buffer, Adam's exp_avg / exp_avg_sq / max_exp_avg_sq, ...)
    becomes ``new[k] = old[src[k]]`` for a kept entry and 0 for a new one; other state (Adam's
    scalar ``step``) is left alone.  ``old_numel`` defaults to ``param.numel()`` (an nnz-preserving
    update, as RigL's and SET's).  Returns the number of state tensors remapped."""
    fn = "remap_state"
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{fn}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(src, Tensor) or src.dim() != 1 or src.dtype != torch.int64:
        raise ValueError(f"{fn}: src must be a 1-D int64 tensor (SparseLinear.set_mask_'s result), got "
                         f"{tuple(src.shape) if isinstance(src, Tensor) else type(src).__name__}")
    if src.numel() != param.numel():
        raise ValueError(f"{fn}: src must have one entry per element of param ({param.numel()}), got {src.numel()}")
    old_numel = param.numel() if old_numel is None else int(old_numel)
    if src.numel() and (int(src.max()) >= old_numel or int(src.min()) < -1):
        raise ValueError(f"{fn}: src entries must be -1 or positions in [0, {old_numel}), got range "
                         f"[{int(src.min())}, {int(src.max())}]")
    state = optimizer.state.get(param)
    if not state:
        return 0
    keep = src >= 0
    idx = src.clamp(min=0)
    count = 0
    for key, t in list(state.items()):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != old_numel:
            continue
        new = torch.where(keep.to(t.device), t[idx.to(t.device)], torch.zeros((), dtype=t.dtype, device=t.device))
        if new.shape == t.shape:
            t.copy_(new)  # in place: the tensor objects (and e.g. a fused optimizer's views) stay
        else:
            state[key] = new
        count += 1
    return count


@dataclass
class LayerUpdate:
    """One layer's mask change at one update: flat positions (row * n_in + col) dropped and grown."""
    dropped: Tensor
    grown: Tensor


@dataclass
class MaskUpdate:
    """One update step: the optimizer step it followed, the drop fraction, and each layer's change."""
    step: int
    fraction: float
    layers: dict[str, LayerUpdate] = field(default_factory=dict)


def _positive_int(v, name: str, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
        raise ValueError(f"{where}: {name} must be a positive int, got {v!r}")
    return int(v)


def _fraction(v, name: str, where: str, *, allow_zero: bool = False) -> float:
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and (0.0 <= v < 1.0 if allow_zero else 0.0 < v < 1.0)
    if not ok:
        raise ValueError(f"{where}: {name} must be a number in {'[0, 1)' if allow_zero else '(0, 1)'}, got {v!r}")
    return float(v)


def _layers(model_or_layers, where: str) -> list[tuple[str, SparseLinear]]:
    if isinstance(model_or_layers, SparseLinear):
        return [("", model_or_layers)]
    if isinstance(model_or_layers, nn.Module):
        found = [(n, m) for n, m in model_or_layers.named_modules() if isinstance(m, SparseLinear)]
        if not found:
            raise ValueError(f"{where}: the model has no SparseLinear layer (make one with kernelkit.sparse.sparsify_)")
        return found
    if isinstance(model_or_layers, Iterable) and not isinstance(model_or_layers, (str, bytes)):
        found = list(model_or_layers)
        bad = [type(m).__name__ for m in found if not isinstance(m, SparseLinear)]
        if bad:
            raise TypeError(f"{where}: layers must be SparseLinear modules, got {bad[0]}")
        if not found:
            raise ValueError(f"{where}: no layers given")
        if len({id(m) for m in found}) != len(found):
            raise ValueError(f"{where}: a layer is given twice")
        return [(str(i), m) for i, m in enumerate(found)]
    raise TypeError(f"{where}: model_or_layers must be an nn.Module or an iterable of SparseLinear, got "
                    f"{type(model_or_layers).__name__}")


class _DynamicSparsity:
    """The schedule, the optimizer bookkeeping and the mask surgery shared by RigL and SET."""

    _where = "DynamicSparsity"

    def __init__(self, model_or_layers, optimizer, delta_t, t_end, total_steps, process_group=None):
        where = self._where
        if process_group is not None and process_group is not False and not (
                dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
            raise TypeError(f"{where}: process_group must be a torch.distributed ProcessGroup, None (the default "
                            f"group when torch.distributed is initialized) or False (no synchronization), got "
                            f"{type(process_group).__name__}")
        self.process_group = process_group
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{where}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.layers = _layers(model_or_layers, where)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for name, layer in self.layers:
            if id(layer.values) not in held:
                raise ValueError(f"{where}: the optimizer does not hold the values of layer {name or '<layer>'!r}; "
                                 f"build it from model.parameters() (after sparsify_)")
        self.optimizer = optimizer
        self.delta_t = _positive_int(delta_t, "delta_t", where)
        if t_end is not None and total_steps is not None:
            raise ValueError(f"{where}: give t_end or total_steps, not both")
        if total_steps is not None:
            t_end = int(0.75 * _positive_int(total_steps, "total_steps", where))  # RigL: stop at 75%
            if t_end <= 0:
                raise ValueError(f"{where}: total_steps={total_steps} leaves no step before t_end = 0.75 * total_steps")
        self.t_end = None if t_end is None else _positive_int(t_end, "t_end", where)
        self.t = 0                         # optimizer steps seen (calls of step())
        self.history: list[MaskUpdate] = []

    # ---- schedule ---------------------------------------------------------------------------------
    def is_update_step(self, t: int) -> bool:
        """Whether the masks change after the t-th optimizer step (t = 1, 2, ...)."""
        return t > 0 and t % self.delta_t == 0 and (self.t_end is None or t < self.t_end)

    def drop_fraction(self, t: int) -> float:
        raise NotImplementedError

    def _group(self):
        """The process group whose ranks must make the same mask changes, or None (one process)."""
        if self.process_group is False or not (dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD if self.process_group is None else self.process_group
        return group if dist.get_world_size(group) > 1 else None

    def step(self) -> bool:
        """Call right after ``optimizer.step()``.  Counts the step and, on an update step, changes the
        masks.  Returns whether it did."""
        self.t += 1
        updated = self.is_update_step(self.t)
        if updated:
            record = MaskUpdate(self.t, self.drop_fraction(self.t))
            for name, layer in self.layers:
                record.layers[name] = self._update_layer(name, layer, record.fraction)
            self.history.append(record)
        self._after_step()
        return updated

    def _after_step(self) -> None:
        pass

    # ---- mask surgery -----------------------------------------------------------------------------
    @torch.no_grad()
    def _apply(self, layer: SparseLinear, drop_k: Tensor, grow_flat: Tensor, grow_values: Tensor | None) -> LayerUpdate:
        """Drop the CSR entries ``drop_k``, add the flat positions ``grow_flat`` (with ``grow_values``
        or zeros), carry the optimizer state over."""
        n_out, n_in = layer.out_features, layer.in_features
        old_flat = layer.layout.flat_index()
        mask = torch.zeros(n_out * n_in, dtype=torch.bool, device=old_flat.device)
        mask[old_flat] = True
        dropped = old_flat[drop_k]
        mask[dropped] = False
        mask[grow_flat] = True
        new_values = None
        if grow_values is not None:
            new_values = torch.zeros(n_out * n_in, dtype=layer.values.dtype, device=layer.values.device)
            new_values[grow_flat.to(new_values.device)] = grow_values.to(new_values)
            new_values = new_values.view(n_out, n_in)
        src = layer.set_mask_(mask.view(n_out, n_in), new_values)
        remap_state(self.optimizer, layer.values, src)
        layer.values.grad = None  # the old positions' gradient means nothing in the new layout
        return LayerUpdate(torch.sort(dropped).values, torch.sort(grow_flat).values)

    def _update_layer(self, name: str, layer: SparseLinear, fraction: float) -> LayerUpdate:
        raise NotImplementedError

    # ---- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The step count (the masks live in the model's state_dict, the moments in the optimizer's)."""
        return {"t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        self._after_step()


class RigL(_DynamicSparsity):
    """RigL mask updates for the SparseLinear layers of a model (module docstring).

    Args:
        model_or_layers: an nn.Module (all its SparseLinear layers), a SparseLinear, or an iterable of
            them.  Their ``values`` must be parameters of ``optimizer``.
        optimizer: any torch optimizer; call :meth:`step` right after its ``step()``.
        delta_t: update period in optimizer steps (RigL's and Sparse-IFT's default: 100).
        alpha: initial drop fraction (0.3).
        t_end: the step from which the masks stay fixed; or
        total_steps: the training length, t_end = int(0.75 * total_steps) (RigL's end of updates).
        process_group: the data-parallel ranks whose dense gradients are averaged (module docstring;
            None: the default group when torch.distributed is initialized; False: none).
    Raises:
        TypeError / ValueError: bad arguments (naming them), layers the optimizer does not hold, a
            layer that already has a dense-gradient hook (another RigL).
    """

    _where = "RigL"

    def __init__(self, model_or_layers, optimizer: torch.optim.Optimizer, *, delta_t: int = 100, alpha: float = 0.3,
                 t_end: int | None = None, total_steps: int | None = None, process_group=None):
        super().__init__(model_or_layers, optimizer, delta_t, t_end, total_steps, process_group)
        if self.t_end is None:
            raise ValueError("RigL: give t_end (the last update is before it) or total_steps "
                             "(t_end = 0.75 * total_steps)")
        self.alpha = _fraction(alpha, "alpha", self._where)
        for name, layer in self.layers:
            if getattr(layer, "_dense_grad_hook", None) is not None:
                raise ValueError(f"RigL: layer {name or '<layer>'!r} already has a _dense_grad_hook (is another RigL "
                                 f"managing it?)")
        self._grads: dict[int, Tensor] = {}
        self._armed = False
        self._after_step()

    def drop_fraction(self, t: int) -> float:
        """``f(t) = alpha / 2 * (1 + cos(pi * t / t_end))`` for t < t_end, 0 from t_end on."""
        if t >= self.t_end:
            return 0.0
        return self.alpha / 2 * (1 + math.cos(math.pi * t / self.t_end))

    # ---- dense gradient capture -------------------------------------------------------------------
    def _hook(self, layer: SparseLinear, x: Tensor, y: Tensor) -> None:
        x = x.detach()

        def store(grad_y: Tensor) -> None:
            g = dense_grad(x, grad_y)
            prev = self._grads.get(id(layer))
            self._grads[id(layer)] = g if prev is None else prev + g

        y.register_hook(store)

    def _after_step(self) -> None:
        """Arm the hooks for the next step's forward/backward if an update follows it, else disarm."""
        arm = self.is_update_step(self.t + 1)
        for name, layer in self.layers:
            current = getattr(layer, "_dense_grad_hook", None)
            if current is not None and current != self._hook:
                raise RuntimeError(f"RigL: layer {name or '<layer>'!r}'s _dense_grad_hook was replaced by someone else")
            layer._dense_grad_hook = self._hook if arm else None
        self._armed = arm
        if arm:
            self._grads.clear()

    def detach(self) -> None:
        """Remove RigL's hooks from the layers (the masks stay as they are)."""
        for _, layer in self.layers:
            if getattr(layer, "_dense_grad_hook", None) == self._hook:
                layer._dense_grad_hook = None
        self._grads.clear()

    @torch.no_grad()
    def _update_layer(self, name: str, layer: SparseLinear, fraction: float) -> LayerUpdate:
        grad = self._grads.pop(id(layer), None)
        if grad is None:
            raise RuntimeError(f"RigL: no dense gradient for layer {name or '<layer>'!r} at step {self.t}: run the "
                               f"forward and backward through it between the previous RigL.step() and this one")
        nnz, numel = layer.nnz, layer.out_features * layer.in_features
        n = min(int(fraction * nnz), numel - nnz)
        device = layer.values.device
        if n <= 0:
            empty = torch.empty(0, dtype=torch.int64, device=device)
            return LayerUpdate(empty, empty.clone())
        group = self._group()
        if group is not None:  # each rank saw its part of the batch: the global batch's gradient
            dist.all_reduce(grad, group=group)
            grad /= dist.get_world_size(group)
        # drop: the n smallest |w| (stable sort: ties to the lower CSR position, i.e. row-major)
        drop_k = torch.sort(layer.values.detach().abs().double(), stable=True).indices[:n]
        # grow: the n largest |grad| among the positions inactive before this update
        score = grad.detach().abs().double().reshape(-1).to(device)
        score[layer.layout.flat_index()] = -math.inf
        grow_flat = torch.sort(score, descending=True, stable=True).indices[:n]
        return self._apply(layer, drop_k, grow_flat, None)


class SET(_DynamicSparsity):
    """SET mask updates for the SparseLinear layers of a model (module docstring).

    Args:
        model_or_layers, optimizer: as :class:`RigL`.
        delta_t: update period in optimizer steps (default 100; Mocanu et al. update once an epoch).
        zeta: the fraction of the positive and of the negative weights replaced (0.3).
        t_end / total_steps: optional end of the updates, as RigL (default: never end).
        generator: a torch.Generator (on CPU) for the regrown positions and values (None: torch's
            global generator).  Under data parallelism rank 0's draws are used on every rank.
        process_group: the data-parallel ranks that take rank 0's regrowth (module docstring; None:
            the default group when torch.distributed is initialized; False: none).
    """

    _where = "SET"

    def __init__(self, model_or_layers, optimizer: torch.optim.Optimizer, *, delta_t: int = 100, zeta: float = 0.3,
                 t_end: int | None = None, total_steps: int | None = None,
                 generator: torch.Generator | None = None, process_group=None):
        super().__init__(model_or_layers, optimizer, delta_t, t_end, total_steps, process_group)
        self.zeta = _fraction(zeta, "zeta", self._where)
        if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != "cpu"):
            raise TypeError(f"SET: generator must be a CPU torch.Generator or None, got {generator!r}")
        self.generator = generator

    def drop_fraction(self, t: int) -> float:
        """SET's fraction is constant: zeta."""
        return self.zeta

    @torch.no_grad()
    def _update_layer(self, name: str, layer: SparseLinear, fraction: float) -> LayerUpdate:
        values = layer.values.detach()
        nnz, numel = layer.nnz, layer.out_features * layer.in_features
        pos_k = torch.nonzero(values >= 0).reshape(-1)   # zeros count with the positives
        neg_k = torch.nonzero(values < 0).reshape(-1)
        n_neg = min(int(fraction * neg_k.numel()), numel - nnz)
        n_pos = min(int(fraction * pos_k.numel()), numel - nnz - n_neg)
        # smallest positives (ascending) and largest negatives (descending), ties to the lower position
        drop_pos = pos_k[torch.sort(values[pos_k].double(), stable=True).indices[:n_pos]]
        drop_neg = neg_k[torch.sort(values[neg_k].double(), descending=True, stable=True).indices[:n_neg]]
        drop_k = torch.cat([drop_pos, drop_neg])
        n = drop_k.numel()
        device = values.device
        if n == 0:
            empty = torch.empty(0, dtype=torch.int64, device=device)
            return LayerUpdate(empty, empty.clone())
        active = torch.zeros(numel, dtype=torch.bool, device=device)
        active[layer.layout.flat_index()] = True
        inactive = torch.nonzero(~active).reshape(-1)
        pick = torch.randperm(inactive.numel(), generator=self.generator)[:n].to(device)
        grow_flat = inactive[pick]
        bound = 1.0 / math.sqrt(layer.in_features)  # SparseLinear's init, U(+-1/sqrt(in_features))
        grow_values = torch.empty(n, dtype=torch.float64).uniform_(-bound, bound, generator=self.generator).to(device)
        group = self._group()
        if group is not None:  # the ranks' generators may differ: all take the group's first rank's draws
            dist.broadcast(grow_flat, group=group, group_src=0)
            dist.broadcast(grow_values, group=group, group_src=0)
        return self._apply(layer, drop_k, grow_flat, grow_values)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])
