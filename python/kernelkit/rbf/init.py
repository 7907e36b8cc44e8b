"""NeuRBF's initialisation of RBF centres and shapes from sample points (util_init.py: kc_init_v3,
kw_init_v3; Chen et al., ICCV 2023, sec. 3.3).

Centres: weighted k-means over the sample points (for an image, every pixel weighted by the target's
gradient magnitude, so RBFs gather where detail is), seeded by weighted random sampling without
replacement (k-means++ costs M passes over the points, too slow for thousands of RBFs), then Lloyd
iterations.  The assignment step is :func:`kernelkit.rbf.knn` with k = 1 (the grid search, not an
N x M distance matrix) and the update a weighted ``index_add``; a cluster left with no weight is
re-seeded at the points with the largest weighted squared distance to their centre (which can only
lower the objective), so no centre is wasted.

Shapes: each point goes to its nearest centre; the weighted covariance of the offsets x - mu per
cluster, divided by ``alpha`` (0.5 for images and SDFs in NeuRBF: wider than the cluster), is
regularized by an eigenvalue floor ``(floor * h)^2`` with h the mean centre spacing (a cluster of one
point, or of collinear points, has a singular covariance), and an eigenvalue ceiling (the box's
diagonal squared).  Then, by kernel:

    "ivq" / "gauss", shape "full":  A = Sigma^-1 (M, D, D), symmetric to the last bit, positive definite
    "ivq" / "gauss", shape "diag":  A = 1 / diag(Sigma) (M, D)
    "nlin" (scales):                s = 1 / sqrt(4 diag(Sigma)) (M, D): the hat's support is 2 sigma

Everything is computed in float64 and returned in the points' dtype.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from . import ops
from .reference import spatial_order
from .._progress import bar as _bar

_KERNELS = ("ivq", "gauss", "nlin")
_SHAPES = ("full", "diag")


@dataclass
class InitResult:
    """centers (M, D) and shapes ((M, D, D) / (M, D)) in the points' dtype; objective[i] is the
    weighted mean squared distance of the points to their nearest centre after i Lloyd updates
    (objective[0]: the seeds); counts (M,) int64 the points per final cluster."""
    centers: Tensor
    shapes: Tensor
    objective: list = field(default_factory=list)
    counts: Optional[Tensor] = None


def _check_points(points, weights, fn: str):
    if not isinstance(points, Tensor) or points.dim() != 2 or points.shape[1] not in (2, 3):
        raise ValueError(f"{fn}: points must be an (N, 2) or (N, 3) tensor, got "
                         f"{tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__}")
    if points.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{fn}: points must be float32 or float64, got {points.dtype}")
    if points.shape[0] == 0:
        raise ValueError(f"{fn}: points is empty")
    if not bool(torch.isfinite(points).all()):
        raise ValueError(f"{fn}: points has a non-finite coordinate")
    if weights is None:
        return points.detach(), torch.ones(points.shape[0], dtype=torch.float64, device=points.device)
    if not isinstance(weights, Tensor) or weights.shape != (points.shape[0],):
        raise ValueError(f"{fn}: weights must be an (N,) = ({points.shape[0]},) tensor, got "
                         f"{tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__}")
    w = weights.detach().to(points.device, torch.float64)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"{fn}: weights must be finite and >= 0")
    if float(w.sum()) <= 0:
        raise ValueError(f"{fn}: weights sum to 0")
    return points.detach(), w


def _int(v, name: str, fn: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ValueError(f"{fn}: {name} must be an int >= {lo}, got {v!r}")
    return int(v)


def _assign(points: Tensor, centers: Tensor, backend) -> tuple[Tensor, Tensor]:
    """Each point's nearest centre (int64 (N,)) and squared distance (float64 (N,))."""
    idx, d2 = ops.knn(points, centers.to(points.dtype), 1, backend=backend)
    return idx[:, 0], d2[:, 0].double()


def weighted_kmeans(points: Tensor, num_clusters: int, weights: Optional[Tensor] = None, *, iters: int = 10,
                    progress: bool = True, generator: Optional[torch.Generator] = None,
                    backend: Optional[str] = None) -> tuple[Tensor, list, Tensor, Tensor]:
    """Weighted k-means of ``points`` (N, D): (centers (M, D) in the points' dtype, objective history
    (iters + 1 floats: the weighted mean squared distance to the nearest centre, seeds first, never
    increasing up to rounding), final assignment idx (N,), final squared distances (N,) float64).
    ``num_clusters`` must be <= N.  The seeds are ``num_clusters`` distinct points drawn with
    probability proportional to the weights (plus 1e-3 of their mean, so that zero-weight regions are
    not left without any centre)."""
    fn = "kernelkit.rbf.weighted_kmeans"
    points, w = _check_points(points, weights, fn)
    m = _int(num_clusters, "num_clusters", fn, 1)
    iters = _int(iters, "iters", fn, 0)
    n, dim = points.shape
    if m > n:
        raise ValueError(f"{fn}: num_clusters ({m}) must be <= the number of points ({n})")
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    p = (w + 1e-3 * w.mean()).to(gen_dev)
    seeds = torch.multinomial(p, m, replacement=False, generator=generator).to(points.device)
    pts = points.double()
    centers = pts[seeds].clone()
    wsum_all = float(w.sum())
    idx, d2 = _assign(points, centers, backend)
    history = [float((w * d2).sum()) / wsum_all]
    bar = _bar(progress, total=iters, desc="rbf k-means", leave=False)
    try:
        for _ in range(iters):
            sums = torch.zeros(m, dim, dtype=torch.float64, device=points.device).index_add_(0, idx, w[:, None] * pts)
            wsum = torch.zeros(m, dtype=torch.float64, device=points.device).index_add_(0, idx, w)
            live = wsum > 0
            new = torch.where(live[:, None], sums / wsum.clamp_min(1e-300)[:, None], centers)
            dead = (~live).nonzero()[:, 0]
            if dead.numel():
                # re-seed at the points worst served now (largest weighted squared distance)
                err = w * d2
                far = torch.topk(err, min(dead.numel(), n)).indices
                new[dead[:far.numel()]] = pts[far]
            centers = new
            idx, d2 = _assign(points, centers, backend)
            history.append(float((w * d2).sum()) / wsum_all)
            bar.update()
            bar.set_postfix(objective=f"{history[-1]:.3e}")
    finally:
        bar.close()
    return centers.to(points.dtype), history, idx, d2


def shapes_from_clusters(points: Tensor, centers: Tensor, idx: Tensor, weights: Optional[Tensor] = None, *,
                         kernel: str = "ivq", shape: str = "full", alpha: float = 0.5,
                         floor: float = 0.05) -> Tensor:
    """NeuRBF's shape rule (module docstring) for the clusters ``idx`` (N,) of ``points`` around
    ``centers`` (M, D): (M, D, D) inverse covariances for shape "full", (M, D) for "diag", (M, D) scales
    for "nlin"; in the points' dtype."""
    fn = "kernelkit.rbf.shapes_from_clusters"
    points, w = _check_points(points, weights, fn)
    if kernel not in _KERNELS:
        raise ValueError(f"{fn}: kernel must be one of {', '.join(map(repr, _KERNELS))}, got {kernel!r}")
    if shape not in _SHAPES:
        raise ValueError(f"{fn}: shape must be 'full' or 'diag', got {shape!r}")
    if kernel == "nlin" and shape != "diag":
        raise ValueError(f"{fn}: kernel='nlin' takes per-dimension scales: shape must be 'diag', got {shape!r}")
    if not (isinstance(alpha, numbers.Real) and alpha > 0):
        raise ValueError(f"{fn}: alpha must be > 0, got {alpha!r}")
    m, dim = centers.shape
    pts = points.double()
    c = centers.detach().to(points.device, torch.float64)
    o = pts - c[idx]                                                       # (N, D)
    cnt = torch.bincount(idx, minlength=m)
    wsum = torch.zeros(m, dtype=torch.float64, device=pts.device).index_add_(0, idx, w)
    # a cluster whose points all have weight 0 uses its points unweighted
    ww = torch.where(wsum[idx] > 0, w, torch.ones_like(w))
    wsum = torch.zeros(m, dtype=torch.float64, device=pts.device).index_add_(0, idx, ww)
    outer = (o[:, :, None] * o[:, None, :]) * ww[:, None, None]
    cov = torch.zeros(m, dim, dim, dtype=torch.float64, device=pts.device).index_add_(0, idx, outer)
    cov = cov / wsum.clamp_min(1e-300)[:, None, None] / alpha
    # the regularization: eigenvalues in [(floor * h)^2, diag^2], h the mean spacing of the centres
    lo = pts.min(0).values
    hi = pts.max(0).values
    ext = (hi - lo).clamp_min(1e-12)
    h = float(torch.prod(ext)) ** (1.0 / dim) / m ** (1.0 / dim)
    vmin = (floor * h) ** 2
    vmax = float((ext * ext).sum())
    cov = torch.where((cnt > 0)[:, None, None], cov, torch.zeros_like(cov))
    if kernel == "nlin":
        var = torch.diagonal(cov, dim1=1, dim2=2).clamp(vmin, vmax) * 4.0       # NeuRBF's x4 for the hat
        out = 1.0 / var.sqrt()
    elif shape == "diag":
        out = 1.0 / torch.diagonal(cov, dim1=1, dim2=2).clamp(vmin, vmax)
    else:
        cov = 0.5 * (cov + cov.transpose(1, 2))
        lam, vec = torch.linalg.eigh(cov)
        lam = lam.clamp(vmin, vmax)
        out = (vec / lam[:, None, :]) @ vec.transpose(1, 2)
        out = 0.5 * (out + out.transpose(1, 2))
    out = out.to(points.dtype)
    if out.dim() == 3:
        out = 0.5 * (out + out.transpose(1, 2))                           # exactly symmetric after the cast too
    return out


def init_from_samples(points: Tensor, num_rbfs: int, weights: Optional[Tensor] = None, *, iters: int = 10,
                      alpha: float = 0.5, kernel: str = "ivq", shape: str = "full", floor: float = 0.05,
                      progress: bool = True, generator: Optional[torch.Generator] = None,
                      backend: Optional[str] = None) -> InitResult:
    """Centres by weighted k-means over ``points`` (N, D) (``weights`` (N,) >= 0, e.g. an image's
    gradient magnitude; None: uniform), then shapes by :func:`shapes_from_clusters`.  ``alpha``: 0.5
    for images and SDFs (NeuRBF), 0.3 for radiance fields.  ``progress``: a tqdm bar over the Lloyd
    iterations.  Returns an :class:`InitResult`."""
    if kernel == "nlin" and shape != "diag":
        raise ValueError("kernelkit.rbf.init_from_samples: kernel='nlin' takes per-dimension scales: shape must "
                         f"be 'diag', got {shape!r}")
    centers, history, idx, _ = weighted_kmeans(points, num_rbfs, weights, iters=iters, progress=progress,
                                               generator=generator, backend=backend)
    shapes = shapes_from_clusters(points, centers, idx, weights, kernel=kernel, shape=shape, alpha=alpha,
                                  floor=floor)
    counts = torch.bincount(idx, minlength=centers.shape[0])
    perm = spatial_order(centers)   # nearby RBFs get nearby indices: the kernels' weight gathers stay local
    return InitResult(centers[perm].contiguous(), shapes[perm].contiguous(), history, counts[perm])
