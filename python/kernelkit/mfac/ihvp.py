"""The two M-FAC algorithms on the kernels of ``kernelkit.mfac.ops``.

:class:`SlidingWindowIHVP` (the dynamic algorithm, for the optimizer): a ring buffer of the last m
gradients; replacing one costs one pass over the buffer plus O(m^2) (a rank-2 update of the float64
inverse of K = m damp I + G G^T, refreshed from the Gram matrix every ``refresh`` updates to bound
rounding drift); an IHVP costs two passes plus O(m^2).  With ``shard=True`` (the default when
torch.distributed is initialised with more than one rank) each rank keeps the columns [lo, hi) of
the buffer and the m-long dot products are all-reduced, so the buffer's memory per rank falls with
the world size.

:class:`StaticIHVP` (the static algorithm, for pruning): factors the damped Fisher of a fixed set of
gradients once (O(d m^2), per block of ``block_size`` coordinates when given); then an IHVP costs O(d r)
and any diagonal entry of the inverse O(r).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from . import reference as R

__all__ = ["SlidingWindowIHVP", "StaticIHVP"]


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def all_finite(x: Tensor) -> bool:
    """Whether every entry of x is finite, in one reduction pass: the float64 sum of finite float32 /
    bfloat16 entries cannot overflow, and an inf or NaN entry makes it inf or NaN; only a non-finite sum
    (or a float64 x whose sum overflowed) is decided by the exact elementwise check.  (torch.isfinite(x)
    .all() allocates a mask and took 2.7 ms on a 4 MB gradient here, 5 % of a d = 1e6 update.)"""
    if bool(torch.isfinite(x.sum(dtype=torch.float64))):
        return True
    return bool(torch.isfinite(x).all())


def _shard_bounds(d: int, world: int, rank: int) -> tuple[int, int]:
    base, extra = divmod(d, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


class SlidingWindowIHVP:
    """F^-1 v for F = damp I + (1/m) sum of the last m gradients g g^T (empty slots count as zero
    gradients, so the 1/m is 1/m from the first update on).

    Args:
        d: gradient size; m: window size (number of gradients); damp: lambda > 0.
        dtype: the buffer's storage, float32 (default), bfloat16 (half the memory and traffic; the
            products and sums stay float32 or wider) or float64 (vectors are then float64 too).
        device: where the buffer lives.
        refresh: rebuild the float64 inverse from the Gram matrix after this many updates (default m;
            0 = never).  Each rebuild is O(m^3).
        shard: split the buffer over the ranks of ``group`` along d (default: whenever
            torch.distributed is initialised with more than one rank).  Every rank must call update /
            mul with the same full-length vectors (as after DDP's gradient all-reduce).
        group: the process group (default: the world).
        backend: force a kernelkit backend.
    """

    def __init__(self, d: int, m: int, damp: float, dtype: torch.dtype = torch.float32, device=None, *,
                 refresh: int | None = None, shard: bool | None = None, group=None, backend: str | None = None):
        fn = "kernelkit.mfac.SlidingWindowIHVP"
        for name, v in (("d", d), ("m", m)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{fn}: {name} must be an int, got {type(v).__name__}")
        if m < 1:
            raise ValueError(f"{fn}: m (the number of gradients) must be >= 1, got {m}")
        if d < 1:
            raise ValueError(f"{fn}: d (the gradient size) must be >= 1, got {d}")
        if dtype not in ops.BUFFER_DTYPES:
            raise TypeError(f"{fn}: dtype must be torch.float32, torch.bfloat16 or torch.float64, got {dtype}")
        self.damp = ops.check_damp(damp, fn)
        if refresh is None:
            refresh = m
        if isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 0:
            raise ValueError(f"{fn}: refresh must be an int >= 0, got {refresh!r}")
        self.d, self.m, self.refresh, self.backend = d, m, refresh, backend
        dist = _dist()
        if shard is None:
            shard = dist is not None and dist.get_world_size(group) > 1
        if shard and dist is None:
            raise RuntimeError(f"{fn}: shard=True needs torch.distributed to be initialised")
        self.shard, self.group = bool(shard), group
        world, rank = (dist.get_world_size(group), dist.get_rank(group)) if self.shard else (1, 0)
        self.world, self.rank = world, rank
        self.lo, self.hi = _shard_bounds(d, world, rank)
        self.sizes = [b - a for a, b in (_shard_bounds(d, world, r) for r in range(world))]
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.vdtype = R.vector_dtype(dtype)
        self.G = torch.zeros(m, self.hi - self.lo, dtype=dtype, device=device)
        self.gram = torch.zeros(m, m, dtype=torch.float64, device=device)
        self.kinv = torch.eye(m, dtype=torch.float64, device=device) / (m * self.damp)
        self.slot = 0               # the row the next gradient replaces
        self.count = 0              # gradients seen
        self.since_rebuild = 0

    # -- helpers -------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.G.device

    def _backend(self, fn: str, dtype: torch.dtype) -> str:
        return ops._pick(fn, self.G, dtype, self.backend)

    def _vec(self, v, name: str, fn: str) -> tuple[Tensor, bool]:
        """Full-length vectors -> this rank's columns, (n, d_local) rows of the vector dtype."""
        x, one = ops._vectors(v, self.d, self.vdtype, self.device, name, fn)
        if self.shard:
            x = x[:, self.lo:self.hi]
            x = ops._checks.rows(x) if x.numel() else x.contiguous()
        return x, one

    def _allreduce(self, t: Tensor) -> Tensor:
        if self.shard:
            _dist().all_reduce(t, group=self.group)
        return t

    def _gather(self, local: Tensor) -> Tensor:
        """(n, d_local) -> (n, d): the columns of every rank."""
        if not self.shard:
            return local
        dist = _dist()
        width = max(self.sizes)
        pad = torch.zeros(local.shape[0], width, dtype=local.dtype, device=local.device)
        pad[:, :local.shape[1]] = local
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(parts, pad.contiguous(), group=self.group)
        return torch.cat([p[:, :s] for p, s in zip(parts, self.sizes)], dim=1)

    def _ihvp_local(self, x: Tensor, q: Tensor, fn: str) -> Tensor:
        be = self._backend(fn, torch.float64)
        c = ops.mfac_window_coef(self.kinv, q.reshape(q.shape[0], self.m).contiguous(), -1.0 / self.damp, be)
        return ops.mfac_combine(self.G, c.reshape(q.shape[0], 1, self.m), x, 1.0 / self.damp, max(x.shape[1], 1),
                                self._backend(fn, self.dtype))

    # -- the algorithm -------------------------------------------------------------------------------
    def update(self, g: Tensor) -> Tensor:
        """Put gradient g (d,) into the window, replacing the oldest; returns G g (m,) float64 (the dot
        products of g with the window after the insertion).  A non-finite g raises ValueError and
        leaves the window unchanged."""
        return self._update(g, "kernelkit.mfac.SlidingWindowIHVP.update")[0]

    def _update(self, g: Tensor, fn: str) -> tuple[Tensor, Tensor, Tensor]:
        """(G g, G round(g), this rank's slice of g) after the insertion."""
        if isinstance(g, Tensor) and g.dim() != 1:
            raise ValueError(f"{fn}: g must be 1-D (d,) = ({self.d},), got shape {tuple(g.shape)}")
        x, _ = self._vec(g, "g", fn)
        if not all_finite(x):
            raise ValueError(f"{fn}: g has a non-finite entry (NaN or inf); the window is unchanged")
        be = self._backend(fn, self.dtype)
        q, qr = ops.mfac_insert_dots(self.G, x, self.slot, be)
        both = self._allreduce(torch.cat([q.reshape(-1), qr.reshape(-1)]))
        q, qr = both[:self.m], both[self.m:]
        ops.mfac_window_update(self.gram, self.kinv, self.slot, qr.contiguous(), self.damp,
                               self._backend(fn, torch.float64))
        self.slot = (self.slot + 1) % self.m
        self.count += 1
        self.since_rebuild += 1
        if self.refresh and self.since_rebuild >= self.refresh:
            self.kinv = ops.mfac_window_rebuild(self.gram, self.damp, self._backend(fn, torch.float64))
            self.since_rebuild = 0
        return q, qr, x

    def mul(self, v: Tensor) -> Tensor:
        """F^-1 v for v (d,) or (n, d): same shape, the vector dtype (float32; float64 with a float64
        buffer).  Two passes over the buffer for all n vectors together."""
        fn = "kernelkit.mfac.SlidingWindowIHVP.mul"
        x, one = self._vec(v, "v", fn)
        q = ops.mfac_dots(self.G, x, max(x.shape[1], 1), self._backend(fn, self.dtype))
        q = self._allreduce(q.reshape(x.shape[0], self.m).contiguous())
        out = self._gather(self._ihvp_local(x, q, fn))
        return out.reshape(self.d) if one else out

    def update_mul(self, g: Tensor) -> Tensor:
        """update(g), then F^-1 g with the new window; shares the insertion's pass over the buffer
        (two passes in all): the M-FAC optimizer's step.  With a bfloat16 buffer the gradient as stored
        (rounded to bfloat16) is preconditioned: its rounding error lies outside the window's span,
        where F^-1 multiplies by 1/damp, and would otherwise dominate the step."""
        fn = "kernelkit.mfac.SlidingWindowIHVP.update_mul"
        q, qr, x = self._update(g, fn)
        if self.dtype == torch.bfloat16:
            x, q = x.to(torch.bfloat16).to(x.dtype), qr
        return self._gather(self._ihvp_local(x, q.reshape(1, self.m), fn)).reshape(self.d)

    def rebuild(self) -> None:
        """Recompute the Gram matrix from the buffer (float64, chunked over d) and the inverse from it:
        what the window would be if it had been built from its current rows in one go."""
        fn = "kernelkit.mfac.SlidingWindowIHVP.rebuild"
        gram = torch.zeros(self.m, self.m, dtype=torch.float64, device=self.device)
        step = max(1, (1 << 24) // max(self.m, 1))
        for lo in range(0, self.G.shape[1], step):
            blk = self.G[:, lo:lo + step].double()
            gram += blk @ blk.T
        self.gram = self._allreduce(gram)
        self.kinv = ops.mfac_window_rebuild(self.gram, self.damp, self._backend(fn, torch.float64))
        self.since_rebuild = 0

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The window (this rank's columns when sharded) and its float64 state, exactly."""
        return {"d": self.d, "m": self.m, "damp": self.damp, "refresh": self.refresh, "lo": self.lo, "hi": self.hi,
                "G": self.G, "gram": self.gram, "kinv": self.kinv, "slot": self.slot, "count": self.count,
                "since_rebuild": self.since_rebuild}

    def load_state_dict(self, state: dict) -> None:
        fn = "kernelkit.mfac.SlidingWindowIHVP.load_state_dict"
        for key in ("d", "m", "lo", "hi"):
            if state[key] != getattr(self, key):
                raise ValueError(f"{fn}: the saved window has {key} = {state[key]}, this one {getattr(self, key)} "
                                 "(a window saved with another size or world size)")
        self.damp, self.refresh = float(state["damp"]), int(state["refresh"])
        self.G.copy_(state["G"])
        self.gram = state["gram"].to(device=self.device, dtype=torch.float64).clone()
        self.kinv = state["kinv"].to(device=self.device, dtype=torch.float64).clone()
        self.slot, self.count = int(state["slot"]), int(state["count"])
        self.since_rebuild = int(state["since_rebuild"])

    def __repr__(self) -> str:
        shard = f", shard {self.rank}/{self.world} [{self.lo}, {self.hi})" if self.shard else ""
        return (f"SlidingWindowIHVP(d={self.d}, m={self.m}, damp={self.damp:g}, dtype={self.dtype}, "
                f"filled={min(self.count, self.m)}/{self.m}{shard})")


class StaticIHVP:
    """F^-1 for the damped empirical Fisher of a fixed set of gradients, factored once.

    Args:
        G: (m, d) gradients, float32 / bfloat16 / float64 (not modified).
        damp: lambda > 0.
        block_size: None: the full F; an int B: F taken block-diagonal over blocks of B consecutive
            coordinates (the last may be shorter), all blocks factored in one batched call.  With
            m <= B the factor has m rows per block (O(d m^2) setup, O(d m) per IHVP); with m > B it holds
            each block's explicit inverse factor (B rows, O(d B m) setup, O(d B) per IHVP).
        backend: force a kernelkit backend.
    """

    def __init__(self, G: Tensor, damp: float, block_size: int | None = None, *, backend: str | None = None):
        fn = "kernelkit.mfac.StaticIHVP"
        G = ops.check_buffer(G, "G", fn)
        m, d = G.shape
        if m == 0:
            raise ValueError(f"{fn}: G has no gradient (m = 0)")
        if d == 0:
            raise ValueError(f"{fn}: G has no coordinate (d = 0)")
        self.damp = ops.check_damp(damp, fn)
        self.block = ops.check_block(block_size, d, fn)
        self.m, self.d, self.backend = m, d, backend
        self.Z = ops.static_setup(G.detach(), self.damp, self.block, backend=backend)
        self.alpha, self.beta = R.static_coefficients(m, d, self.block, self.damp)
        self.rows = self.Z.shape[0]

    def mul(self, v: Tensor) -> Tensor:
        """F^-1 v for v (d,) or (n, d)."""
        fn = "kernelkit.mfac.StaticIHVP.mul"
        x, one = ops._vectors(v, self.d, self.Z.dtype, self.Z.device, "v", fn)
        be = ops._pick(fn, self.Z, self.Z.dtype, self.backend)
        q = ops.mfac_dots(self.Z, x, self.block, be)
        out = ops.mfac_combine(self.Z, self.beta * q, x, self.alpha, self.block, be)
        return out.reshape(self.d) if one else out

    def diag(self, indices: Tensor | None = None) -> Tensor:
        """The diagonal of F^-1 (d,), or its entries at ``indices`` (each O(r))."""
        fn = "kernelkit.mfac.StaticIHVP.diag"
        if indices is None:
            return ops.diag(self.Z, self.alpha, self.beta, backend=self.backend)
        if not isinstance(indices, Tensor) or indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{fn}: indices must be an integer tensor")
        idx = indices.to(self.Z.device, torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.d):
            raise ValueError(f"{fn}: indices must lie in [0, {self.d})")
        return (self.alpha + self.beta * self.Z[:, idx].double().square().sum(0)).to(self.Z.dtype)

    @property
    def nbytes(self) -> int:
        return self.Z.numel() * self.Z.element_size()

    def __repr__(self) -> str:
        return (f"StaticIHVP(m={self.m}, d={self.d}, block_size={self.block}, damp={self.damp:g}, "
                f"rows={self.rows}, {self.Z.dtype})")
