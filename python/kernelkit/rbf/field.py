"""RBFField: NeuRBF's neural field (Chen et al., ICCV 2023; img_sdf/network.py, class ``rbf``) on the
fused kernels.

    f(x)  = [ rbf_features(x) , grid(x) ] + bias                 (C + L*F features)
    out   = MLP(f):  h = W1 f + b1;  h = h + sin(omega' * h);  h = relu(h);
                     (h = relu(W h + b)) x (hidden_layers - 1);  out = Wo h + bo

* rbf_features: :func:`kernelkit.rbf.rbf_features` over the k nearest of M RBFs (centres ``centers``
  (M, D), shapes ``shapes`` (M, D, D) / (M, D), feature rows ``weights`` (M, C); NeuRBF's kc0, ks0,
  lc0), normalized, lifted by the log-spaced frequencies ``omegas`` (NeuRBF's [2^-3, 2^12] for 2-D,
  [1, 8] for 3-D) and summed;
* grid: an optional multi-resolution dense grid (:class:`DenseGrid`: L levels of F features, resolutions
  log-spaced from ``base_resolution`` to ``max_resolution``, bilinear / trilinear through
  ``grid_sample``), NeuRBF's hybrid part (it uses a hash grid; a dense one is the same at these sizes);
* ``bias``: NeuRBF's global lcb0;
* the MLP: NeuRBF's 3-layer ReLU decoder of width 64 with h <- h + sin(omega' h) after the first layer,
  omega' log-spaced over the hidden channels in [10, 100] (2-D) or [30, 300] (3-D).

Geometry (centres, shapes) is frozen by default, as in every NeuRBF config: they are buffers, the
neighbour grid is built once and cached (rebuilt when the centres change in place, are replaced, or
move device / dtype), and :meth:`RBFField.precompute_neighbors` gives the neighbour lists of a fixed
training set once (``forward(x, idx=...)``).  ``trainable_geometry=True`` makes them Parameters with
gradients through the fused backward; the grid is then rebuilt (without gradient) at every forward.
Trained full shapes stay symmetric (their gradient o o^T is), but nothing keeps them positive definite:
a step that breaks that makes the next forward raise (kernelkit.rbf.rbf_features checks the shapes);
use a small learning rate for them, or shape="diag".

Inputs are points in ``bounds`` (default [0, 1]^D); the grid maps bounds to its corners.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import init as _init
from . import ops
from .reference import log_omegas

_KERNELS = ("ivq", "gauss", "nlin")
_SHAPES = ("full", "diag")


def _int(v, name: str, fn: str, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{fn}: {name} must be an int {rng}, got {v!r}")
    return int(v)


# ---- the dense multi-resolution grid ---------------------------------------------------------------------
@dataclass
class GridConfig:
    """A multi-resolution dense grid: ``levels`` levels of ``features`` features each, resolutions
    (points per side) log-spaced from ``base_resolution`` to ``max_resolution``; values initialised
    uniform in [-init_scale, init_scale] (Instant-NGP: 1e-4)."""
    levels: int = 2
    features: int = 2
    base_resolution: int = 16
    max_resolution: int = 128
    init_scale: float = 1e-4

    def resolutions(self) -> list[int]:
        if self.levels == 1:
            return [self.base_resolution]
        g = (self.max_resolution / self.base_resolution) ** (1.0 / (self.levels - 1))
        return [int(round(self.base_resolution * g ** lv)) for lv in range(self.levels)]

    def num_params(self, dim: int) -> int:
        return sum(r ** dim for r in self.resolutions()) * self.features


def _grid_config(grid, fn: str) -> Optional[GridConfig]:
    if grid is None or isinstance(grid, GridConfig):
        cfg = grid
    elif isinstance(grid, dict):
        unknown = set(grid) - set(GridConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{fn}: grid has unknown keys {sorted(unknown)}; allowed: "
                             f"{', '.join(GridConfig.__dataclass_fields__)}")
        cfg = GridConfig(**grid)
    else:
        raise TypeError(f"{fn}: grid must be None, a dict or a GridConfig, got {type(grid).__name__}")
    if cfg is not None:
        _int(cfg.levels, "grid levels", fn, 1)
        _int(cfg.features, "grid features", fn, 1)
        _int(cfg.base_resolution, "grid base_resolution", fn, 2)
        _int(cfg.max_resolution, "grid max_resolution", fn, cfg.base_resolution)
    return cfg


class DenseGrid(nn.Module):
    """Multi-resolution dense feature grid over the box ``bounds``: forward(x (N, D)) -> (N, levels *
    features), each level interpolated (bilinear / trilinear, ``grid_sample`` with aligned corners:
    level values sit on a regular lattice from the box's low to its high corner; outside the box the
    border value)."""

    def __init__(self, dim: int, cfg: GridConfig, bounds: Tensor):
        super().__init__()
        self.dim, self.cfg = dim, cfg
        self.register_buffer("bounds", bounds.clone(), persistent=False)
        self.levels = nn.ParameterList()
        for r in cfg.resolutions():
            t = torch.empty(1, cfg.features, *([r] * dim)).uniform_(-cfg.init_scale, cfg.init_scale)
            self.levels.append(nn.Parameter(t))

    @property
    def out_features(self) -> int:
        return self.cfg.levels * self.cfg.features

    def forward(self, x: Tensor) -> Tensor:
        lo, hi = self.bounds[0].to(x.dtype), self.bounds[1].to(x.dtype)
        u = (x - lo) / (hi - lo) * 2 - 1                                  # [-1, 1]
        # grid_sample's last coordinate indexes the first spatial dimension: flip so that x[:, 0] runs
        # along the grid's first axis
        g = u.flip(-1).reshape(1, -1, *([1] * (self.dim - 1)), self.dim)
        outs = []
        for lv in self.levels:
            s = F.grid_sample(lv.to(x.dtype), g, mode="bilinear", padding_mode="border", align_corners=True)
            outs.append(s.reshape(lv.shape[1], -1).t())
        return torch.cat(outs, 1)


# ---- the decoder -----------------------------------------------------------------------------------------
class SineMLP(nn.Module):
    """NeuRBF's decoder: Linear(in, hidden); h + sin(omega' h) (omega' log-spaced over the hidden
    channels in ``freq``); ReLU; then hidden_layers - 1 x (Linear(hidden, hidden), ReLU); Linear(hidden,
    out).  ``freq=None`` skips the sine."""

    def __init__(self, in_features: int, out_features: int, hidden: int = 64, hidden_layers: int = 2,
                 freq: Optional[tuple[float, float]] = (10.0, 100.0)):
        super().__init__()
        self.first = nn.Linear(in_features, hidden)
        self.hidden = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(hidden_layers - 1)])
        self.last = nn.Linear(hidden, out_features)
        if freq is not None:
            self.register_buffer("freq", log_omegas(hidden, freq[0], freq[1]))
        else:
            self.freq = None

    def forward(self, f: Tensor) -> Tensor:
        h = self.first(f)
        if self.freq is not None:
            h = h + torch.sin(self.freq * h)
        h = torch.relu(h)
        for lin in self.hidden:
            h = torch.relu(lin(h))
        return self.last(h)


# ---- the field -------------------------------------------------------------------------------------------
class RBFField(nn.Module):
    """NeuRBF's adaptive RBF field (module docstring).

    in_dim: 2 or 3.  num_rbfs: M.  out_features: the decoder's outputs (3 for RGB).  kernel: "ivq",
    "gauss" or "nlin".  k: neighbours per query (default 4 in 2-D, 8 in 3-D; at most 32).
    rbf_channels: C.  omegas: "auto" (NeuRBF's frequencies), None (no sinusoids: feat = sum w phi), or a
    (C,) tensor.  shape: "full" (D x D inverse covariances) or "diag"; "nlin" takes per-dimension scales
    (shape="diag").  grid: None, a :class:`GridConfig` or a dict of its fields.  hidden, hidden_layers:
    the decoder (hidden_layers=0: the features go straight through one Linear).  trainable_geometry:
    train centres and shapes too.  backend: forced kernelkit backend (None: the device's default).
    bounds: the domain box, (2, D) or a pair of floats (default [0, 1]^D); centres start on a jittered
    lattice in it with isotropic shapes until :meth:`init_from_samples`.
    """

    def __init__(self, in_dim: int, num_rbfs: int, out_features: int, kernel: str = "ivq", k: Optional[int] = None,
                 rbf_channels: int = 32, omegas: Union[str, Tensor, None] = "auto", shape: str = "full",
                 grid: Union[None, dict, GridConfig] = None, hidden: int = 64, hidden_layers: int = 2,
                 trainable_geometry: bool = False, backend: Optional[str] = None,
                 bounds: Union[None, Sequence[float], Tensor] = None, weight_init_std: float = 1e-2):
        super().__init__()
        fn = "kernelkit.rbf.RBFField"
        if isinstance(in_dim, bool) or in_dim not in (2, 3):
            raise ValueError(f"{fn}: in_dim must be 2 or 3, got {in_dim!r}")
        num_rbfs = _int(num_rbfs, "num_rbfs", fn, 1)
        out_features = _int(out_features, "out_features", fn, 1)
        if not isinstance(kernel, str) or kernel not in _KERNELS:
            raise ValueError(f"{fn}: kernel must be one of {', '.join(map(repr, _KERNELS))}, got {kernel!r}")
        if shape not in _SHAPES:
            raise ValueError(f"{fn}: shape must be 'full' or 'diag', got {shape!r}")
        if kernel == "nlin" and shape != "diag":
            raise ValueError(f"{fn}: kernel='nlin' takes per-dimension scales: shape must be 'diag', got {shape!r}")
        k = (4 if in_dim == 2 else 8) if k is None else k
        k = _int(k, "k", fn, 1, ops.MAX_K)
        rbf_channels = _int(rbf_channels, "rbf_channels", fn, 1)
        hidden = _int(hidden, "hidden", fn, 1)
        hidden_layers = _int(hidden_layers, "hidden_layers", fn, 0)
        if not isinstance(trainable_geometry, bool):
            raise TypeError(f"{fn}: trainable_geometry must be a bool, got {type(trainable_geometry).__name__}")
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"{fn}: backend must be None or a str, got {type(backend).__name__}")
        cfg = _grid_config(grid, fn)
        self.in_dim, self.num_rbfs, self.out_features = in_dim, num_rbfs, out_features
        self.kernel, self.k, self.shape, self.rbf_channels = kernel, k, shape, rbf_channels
        self.trainable_geometry, self.backend = trainable_geometry, backend

        # the domain box
        if bounds is None:
            b = torch.tensor([[0.0] * in_dim, [1.0] * in_dim], dtype=torch.float64)
        else:
            b = torch.as_tensor(bounds, dtype=torch.float64)
            if b.shape == (2,):
                b = b[:, None].expand(2, in_dim).clone()
            if b.shape != (2, in_dim) or not bool(torch.isfinite(b).all()) or not bool((b[1] > b[0]).all()):
                raise ValueError(f"{fn}: bounds must be (lo, hi) floats or a (2, {in_dim}) tensor with hi > lo, "
                                 f"got {bounds!r}")
        self.register_buffer("bounds", b.float())

        # the frequencies
        if isinstance(omegas, str):
            if omegas != "auto":
                raise ValueError(f"{fn}: omegas must be 'auto', None or a ({rbf_channels},) tensor, got {omegas!r}")
            lo, hi = (2.0 ** -3, 2.0 ** 12) if in_dim == 2 else (1.0, 8.0)
            om = log_omegas(rbf_channels, lo, hi)
        elif omegas is None:
            om = None
        elif isinstance(omegas, Tensor):
            if omegas.shape != (rbf_channels,) or not bool(torch.isfinite(omegas).all()):
                raise ValueError(f"{fn}: omegas must be a finite ({rbf_channels},) tensor (rbf_channels), got "
                                 f"shape {tuple(omegas.shape)}")
            om = omegas.detach().float().clone()
        else:
            raise TypeError(f"{fn}: omegas must be 'auto', None or a tensor, got {type(omegas).__name__}")
        if om is not None:
            self.register_buffer("omegas", om)
        else:
            self.omegas = None

        # geometry: a jittered lattice and isotropic shapes at the lattice spacing until init_from_samples
        g = torch.Generator().manual_seed(0)
        side = math.ceil(num_rbfs ** (1.0 / in_dim))
        ext = (b[1] - b[0])
        lat = torch.stack(torch.meshgrid(*[torch.arange(side, dtype=torch.float64)] * in_dim, indexing="ij"),
                          -1).reshape(-1, in_dim)[:num_rbfs]
        c = b[0] + (lat + 0.5 + 0.1 * (torch.rand(lat.shape, generator=g, dtype=torch.float64) - 0.5)) / side * ext
        spacing = ext / side
        if kernel == "nlin":
            s = (1.0 / spacing).expand(num_rbfs, in_dim).clone() * 0.5       # support: two spacings
        elif shape == "diag":
            s = (1.0 / spacing ** 2).expand(num_rbfs, in_dim).clone()
        else:
            s = torch.diag_embed((1.0 / spacing ** 2).expand(num_rbfs, in_dim).clone())
        if trainable_geometry:
            self.centers = nn.Parameter(c.float())
            self.shapes = nn.Parameter(s.float())
        else:
            self.register_buffer("centers", c.float())
            self.register_buffer("shapes", s.float())
        # NeuRBF's lc0: small random features (N(0, 1e-2) here), so that the sines start independent
        self.weights = nn.Parameter(torch.randn(num_rbfs, rbf_channels, generator=g) * weight_init_std)

        self.grid = DenseGrid(in_dim, cfg, b.float()) if cfg is not None else None
        nfeat = rbf_channels + (self.grid.out_features if self.grid is not None else 0)
        self.bias = nn.Parameter(torch.zeros(nfeat))                          # NeuRBF's lcb0
        freq = (10.0, 100.0) if in_dim == 2 else (30.0, 300.0)
        if hidden_layers == 0:
            self.decoder = nn.Linear(nfeat, out_features)
        else:
            self.decoder = SineMLP(nfeat, out_features, hidden, hidden_layers, freq)
        self._grid_cache = None
        self._grid_key = None
        self._checked_key = None

    # -- the neighbour grid ---------------------------------------------------------------------------------
    @staticmethod
    def _key(t: Tensor) -> tuple:
        # the tensor itself is kept in the key (so its memory cannot be reused by another one), with its
        # version counter (bumped by in-place writes: copy_, load_state_dict, optimizer steps) and its
        # storage, dtype and device (changed by .to() / .double(), which may swap a Parameter's .data)
        return (t, t._version, t.data_ptr(), t.device, t.dtype, tuple(t.shape))

    @staticmethod
    def _same(old, key) -> bool:
        """Whether ``key`` (a tuple of _key()s) names the same tensors in the same state as ``old``."""
        return old is not None and all(o[0] is k[0] and o[1:] == k[1:] for o, k in zip(old, key))

    def neighbor_grid(self) -> Tensor:
        """The neighbour grid over the current centres (cached while they do not change)."""
        key = (self._key(self.centers),)
        if self._grid_cache is None or not self._same(self._grid_key, key):
            with torch.no_grad():
                self._grid_cache = ops.build_grid(self.centers.detach(), backend=self.backend)
            self._grid_key = key
        return self._grid_cache

    def _check_x(self, x: Tensor, fn: str) -> None:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"{fn}: x must be an (N, {self.in_dim}) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if x.dtype != self.centers.dtype:
            raise TypeError(f"{fn}: x has dtype {x.dtype} but the module's geometry is {self.centers.dtype} "
                            f"(cast x, or the module with .to(dtype) / .double())")

    @torch.no_grad()
    def precompute_neighbors(self, points: Tensor) -> Tensor:
        """The k nearest RBFs of each of ``points`` (N, D): int64 (N, k), for ``forward(points, idx=...)``
        on a fixed training set (valid while the centres do not change)."""
        self._check_x(points, "RBFField.precompute_neighbors")
        grid = self.neighbor_grid() if not self.trainable_geometry else None
        return ops.knn(points, self.centers.detach(), self.k, grid=grid, backend=self.backend)[0]

    # -- forward ---------------------------------------------------------------------------------------------
    def rbf_features(self, x: Tensor, idx: Optional[Tensor] = None) -> Tensor:
        """The RBF part alone: (N, C)."""
        grid = None
        if idx is None and not self.trainable_geometry:
            grid = self.neighbor_grid()
        # frozen geometry: the value checks (a Cholesky of every shape) run once per change of centres / shapes
        key = (self._key(self.centers), self._key(self.shapes))
        fresh = self.trainable_geometry or not self._same(self._checked_key, key)
        out = ops.rbf_features(x, self.centers, self.shapes, self.weights, self.omegas, self.k, self.kernel,
                               True, idx=idx, grid=grid, check_values=fresh or idx is not None, backend=self.backend)
        if fresh and not self.trainable_geometry:
            self._checked_key = key
        return out

    def features(self, x: Tensor, idx: Optional[Tensor] = None) -> Tensor:
        """The decoder's input: [rbf features, grid features] + bias, (N, C + L*F)."""
        self._check_x(x, "RBFField.forward")
        f = self.rbf_features(x, idx)
        if self.grid is not None:
            f = torch.cat([f, self.grid(x)], 1)
        return f + self.bias

    def forward(self, x: Tensor, idx: Optional[Tensor] = None) -> Tensor:
        """x (N, D) in ``bounds`` -> (N, out_features).  ``idx``: neighbours from
        :meth:`precompute_neighbors` (else searched through the cached grid)."""
        return self.decoder(self.features(x, idx))

    # -- initialisation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_samples(self, points: Tensor, weights: Optional[Tensor] = None, *, iters: int = 10,
                          alpha: float = 0.5, floor: float = 0.05, progress: bool = True,
                          generator: Optional[torch.Generator] = None) -> _init.InitResult:
        """Place the centres by weighted k-means over ``points`` (N, D) (``weights`` (N,), e.g. the image
        gradient magnitude) and set the shapes from the clusters (NeuRBF's rule, :mod:`kernelkit.rbf.init`).
        Needs N >= num_rbfs.  Returns the :class:`~kernelkit.rbf.init.InitResult` (objective history)."""
        if points.dim() != 2 or points.shape[1] != self.in_dim:
            raise ValueError(f"RBFField.init_from_samples: points must be (N, {self.in_dim}), got "
                             f"{tuple(points.shape)}")
        res = _init.init_from_samples(points.to(self.centers.device, self.centers.dtype), self.num_rbfs,
                                      None if weights is None else weights.to(self.centers.device), iters=iters,
                                      alpha=alpha, kernel=self.kernel, shape=self.shape, floor=floor,
                                      progress=progress, generator=generator, backend=self.backend)
        self.centers.copy_(res.centers)
        self.shapes.copy_(res.shapes)
        return res

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, num_rbfs={self.num_rbfs}, out_features={self.out_features}, "
                f"kernel={self.kernel!r}, k={self.k}, rbf_channels={self.rbf_channels}, shape={self.shape!r}, "
                f"sinusoids={self.omegas is not None}, trainable_geometry={self.trainable_geometry}")
