"""The M-FAC optimizer (Frantar, Kurtic & Alistarh, NeurIPS 2021, ``optim.py: MFAC``): gradient descent
preconditioned by the inverse of the damped empirical Fisher of the last m gradients,

    g = concat(grads) + weight_decay * w            (weight decay enters the window)
    u = F^-1 g,   F = damp I + (1/m) sum_{i < m} g_i g_i^T   (g already in the window)
    v = beta v + (1 - beta) u                       (momentum, optional; v starts at 0)
    w -= lr * (v or u)

with the window a :class:`kernelkit.mfac.SlidingWindowIHVP` spanning every parameter of every group
(O(d m) memory, two passes over it and O(m^2) float64 work per step).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .ihvp import SlidingWindowIHVP, all_finite

__all__ = ["MFAC"]

_SHARED = ("ngrads", "damp", "momentum", "weight_decay")   # one window: these are the same for every group


def _number(v, name: str, fn: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{fn}: {name} must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{fn}: {name} must be finite, got {v}")
    return v


class MFAC(torch.optim.Optimizer):
    """M-FAC: w -= lr * F^-1 g with F the damped empirical Fisher of the last ``ngrads`` gradients.

    Args:
        params: parameters or param groups.  Groups may differ only in ``lr`` (one window spans them
            all); another ngrads / damp / momentum / weight_decay in a group raises ValueError.
        lr: step size (>= 0).
        ngrads: m, the window size (>= 1).  The window always has m slots, the empty ones counting as
            zero gradients, so the 1/m of F is 1/m from the first step on (as in the paper).
        damp: lambda > 0.
        momentum: beta in [0, 1): v = beta v + (1 - beta) u (an average, as in the paper).
        weight_decay: >= 0, added to the gradient (wd * w) before it enters the window.
        buffer_dtype: the window's storage, torch.float32 (default) or torch.bfloat16 (half the memory
            and traffic, float32 arithmetic; the gradient is rounded to bfloat16 before it is
            preconditioned, so that it lies in the window's span).  When any parameter is float64 the buffer is float64 (and
            the step is computed in float64) whatever ``buffer_dtype`` says.
        refresh: rebuild the window's float64 inverse from its Gram matrix every ``refresh`` updates
            (default m; see SlidingWindowIHVP).
        shard, group: data parallelism; with torch.distributed initialised and more than one rank the
            buffer is split along d over the ranks of ``group`` (shard=None: automatic).  Every rank
            must call :meth:`step` with the same (all-reduced) gradients, as after DDP's backward.
        backend: force a kernelkit backend for the window's kernels.

    Parameters whose ``.grad`` is None are skipped: their slice of the flat gradient is zero and they
    are not updated.  The window (d = the total numel of all groups' parameters, m x d) is created on
    the first step, on the parameters' device.  A non-finite gradient raises ValueError and changes
    nothing (parameters, momentum and window).  ``state_dict()`` holds the window and the momentum
    under the extra key ``"mfac"`` (references, as torch's optimizers' state; torch.save or deepcopy
    it) and :meth:`load_state_dict` restores them exactly.
    """

    def __init__(self, params, lr: float, ngrads: int = 1024, damp: float = 1e-5, momentum: float = 0.0,
                 weight_decay: float = 0.0, buffer_dtype: torch.dtype = torch.float32, refresh: int | None = None,
                 shard: bool | None = None, group=None, backend: str | None = None):
        fn = "kernelkit.mfac.MFAC"
        lr = _number(lr, "lr", fn)
        if lr < 0:
            raise ValueError(f"{fn}: lr must be >= 0, got {lr}")
        if isinstance(ngrads, bool) or not isinstance(ngrads, int):
            raise TypeError(f"{fn}: ngrads must be an int, got {type(ngrads).__name__}")
        if ngrads < 1:
            raise ValueError(f"{fn}: ngrads (the window size m) must be >= 1, got {ngrads}")
        damp = _number(damp, "damp", fn)
        if damp <= 0:
            raise ValueError(f"{fn}: damp must be > 0, got {damp}")
        momentum = _number(momentum, "momentum", fn)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"{fn}: momentum must be in [0, 1), got {momentum}")
        weight_decay = _number(weight_decay, "weight_decay", fn)
        if weight_decay < 0:
            raise ValueError(f"{fn}: weight_decay must be >= 0, got {weight_decay}")
        if buffer_dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"{fn}: buffer_dtype must be torch.float32 or torch.bfloat16, got {buffer_dtype!r}")
        if refresh is not None and (isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 0):
            raise ValueError(f"{fn}: refresh must be None or an int >= 0, got {refresh!r}")
        self.buffer_dtype, self.refresh, self.shard, self.group, self.backend = (buffer_dtype, refresh, shard,
                                                                                  group, backend)
        self._window: SlidingWindowIHVP | None = None
        self._momentum: Tensor | None = None
        defaults = dict(lr=lr, ngrads=ngrads, damp=damp, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, defaults)

    # -- groups --------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        fn = "kernelkit.mfac.MFAC"
        if getattr(self, "_window", None) is not None:
            raise RuntimeError(f"{fn}: cannot add a param group after the first step (the window spans a fixed "
                               "set of parameters)")
        for key in _SHARED:
            if key in param_group and self.defaults[key] != param_group[key]:
                raise ValueError(f"{fn}: param groups may differ only in lr (one window spans them all); a group "
                                 f"has {key} = {param_group[key]!r}, the optimizer {self.defaults[key]!r}")
        if "lr" in param_group:
            lr = _number(param_group["lr"], "lr", fn)
            if lr < 0:
                raise ValueError(f"{fn}: lr must be >= 0, got {lr} (in a param group)")
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if not p.is_floating_point():
                raise TypeError(f"{fn}: parameters must be floating point, got {p.dtype}")

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _numel(self) -> int:
        return sum(p.numel() for p in self._params())

    def _make_window(self) -> SlidingWindowIHVP:
        params = self._params()
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError(f"kernelkit.mfac.MFAC: every parameter must be on one device (one window), got "
                             f"{sorted(str(d) for d in devices)}")
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else self.buffer_dtype
        return SlidingWindowIHVP(self._numel(), self.defaults["ngrads"], self.defaults["damp"], dtype,
                                 devices.pop(), refresh=self.refresh, shard=self.shard, group=self.group,
                                 backend=self.backend)

    @property
    def window(self) -> SlidingWindowIHVP | None:
        """The sliding window (None before the first step)."""
        return self._window

    # -- the step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params()
        if all(p.grad is None for p in params):
            return loss
        if self._window is None:
            self._window = self._make_window()
        win = self._window
        vdt, dev = win.vdtype, win.device
        wd = self.defaults["weight_decay"]
        parts, where = [], []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    parts.append(torch.zeros(p.numel(), dtype=vdt, device=dev))
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("kernelkit.mfac.MFAC does not support sparse gradients")
                g = p.grad.reshape(-1).to(vdt)
                if wd:
                    g = g + wd * p.detach().reshape(-1).to(vdt)
                parts.append(g)
                where.append((gi, pi, len(parts) - 1))
        g = torch.cat(parts)
        if not all_finite(g):
            bad = [f"param_groups[{gi}]['params'][{pi}]" for gi, pi, k in where
                   if not bool(torch.isfinite(parts[k]).all())]
            raise ValueError(f"kernelkit.mfac.MFAC.step: non-finite gradient (NaN or inf) in {', '.join(bad)}; "
                             "nothing was changed (parameters, momentum, window)")
        if win.dtype == torch.bfloat16:
            # Precondition the gradient as stored: the window holds round(g), and F^-1 amplifies the part
            # of g outside the window's span by 1/damp, so the rounding residual g - round(g) (2^-9
            # relative) would swamp the step whenever |g|^2 / m >> damp.
            g = g.to(torch.bfloat16).to(vdt)
        u = win.update_mul(g)     # raises before changing anything on a bad g
        beta = self.defaults["momentum"]
        if beta:
            if self._momentum is None:
                self._momentum = torch.zeros_like(u)
            self._momentum.mul_(beta).add_(u, alpha=1 - beta)
            u = self._momentum
        off = 0
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                n = p.numel()
                if p.grad is not None:
                    p.add_(u[off:off + n].view_as(p).to(p.dtype), alpha=-lr)
                off += n
        return loss

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["mfac"] = {"numel": self._numel(),
                      "window": None if self._window is None else self._window.state_dict(),
                      "window_dtype": None if self._window is None else self._window.dtype,
                      "momentum": self._momentum}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        fn = "kernelkit.mfac.MFAC.load_state_dict"
        state_dict = dict(state_dict)
        extra = state_dict.pop("mfac", None)
        if extra is None:
            raise ValueError(f"{fn}: the state dict has no 'mfac' entry (not saved by kernelkit.mfac.MFAC)")
        for g in state_dict["param_groups"]:
            for key in _SHARED:
                if g.get(key, self.defaults[key]) != self.defaults[key]:
                    raise ValueError(f"{fn}: the saved optimizer has {key} = {g[key]!r}, this one "
                                     f"{self.defaults[key]!r}")
        if extra["numel"] != self._numel():
            raise ValueError(f"{fn}: the saved optimizer spans {extra['numel']} parameters' entries, this one "
                             f"{self._numel()}")
        super().load_state_dict(state_dict)
        if extra["window"] is None:
            self._window, self._momentum = None, None
            return
        win = self._make_window()
        if extra["window_dtype"] != win.dtype:
            raise ValueError(f"{fn}: the saved window's buffer is {extra['window_dtype']}, this optimizer's "
                             f"{win.dtype}")
        win.load_state_dict(extra["window"])
        self._window = win
        mom = extra["momentum"]
        self._momentum = None if mom is None else mom.to(device=win.device, dtype=win.vdtype).clone()

    def __repr__(self) -> str:
        base = super().__repr__()
        return base if self._window is None else f"{base}\n{self._window!r}"
