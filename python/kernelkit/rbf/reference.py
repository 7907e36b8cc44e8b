"""Pure-torch references of the rbf kernels (csrc/include/kernelkit/rbf.h).

* :func:`grid_layout` / :func:`grid_geometry` / :func:`grid_build_reference`: the neighbour grid's
  buffer, bit for bit what ``kk_rbf_grid_build_cpu`` writes (centres stable-sorted by cell);
* :func:`knn_reference`: brute-force k nearest centres, distances formed in the header's order (each
  operation rounded, no FMA), sorted by (dist2, index);
* :func:`features_reference`: the fused field evaluation written as NeuRBF writes it (gather, kernel,
  normalize, sine, weighted sum), differentiable by torch autograd with the header's conventions
  (the normalization's denominator detached for ``normalize=1``, differentiated for ``normalize=2``);
  :func:`features_backward_reference` is its vjp.  It materializes (N, k, C) temporaries: it is the
  benchmarks' "torch (NeuRBF-style)" baseline as well as the tests' oracle (in float64).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

KERNELS = {"ivq": 0, "gauss": 1, "nlin": 2}
NORM_NONE, NORM_DETACHED, NORM_FULL = 0, 1, 2
EPS = 1e-8                      # the normalization's additive constant (NeuRBF)
HEADER_BYTES = 256              # int64 header[16] + double geom[16]
_KK_DTYPE = {torch.float32: 0, torch.float64: 1}


# ---- the grid ------------------------------------------------------------------------------------------
def grid_cells_max(m: int) -> int:
    """The most cells a grid over m centres may use (about m / 2: a few centres per cell)."""
    return max(1, min(1 << 24, m // 2))


def grid_layout(dtype: torch.dtype, dim: int, m: int) -> tuple[int, int, int, int, int]:
    """(cells_max, cell_start_off, order_off, coords_off, bytes), as kk_rbf_grid_layout."""
    if dtype not in _KK_DTYPE:
        raise TypeError(f"grid_layout: dtype must be float32 or float64, got {dtype}")
    if dim not in (2, 3) or m < 0:
        raise ValueError(f"grid_layout: dim must be 2 or 3 and m >= 0, got dim={dim}, m={m}")
    cm = grid_cells_max(m)
    cs = HEADER_BYTES
    order = cs + 8 * (cm + 1)
    coords = order + 8 * m
    esize = 4 if dtype == torch.float32 else 8
    total = coords + ((esize * m * dim + 7) // 8) * 8
    return cm, cs, order, coords, total


def grid_geometry(lo: list[float], hi: list[float], m: int) -> tuple[float, list[int]]:
    """(cell, res): the cell edge and the cells per dimension for a box [lo, hi] (floats, in the
    coordinate values) and m centres.  Positive extents share the cell budget; a zero extent gets one
    cell; the cell grows by 1/16 until the product of the resolutions fits the budget."""
    cm = grid_cells_max(m)
    ext = [float(h) - float(l) for l, h in zip(lo, hi)]
    pos = [e for e in ext if e > 0.0]
    if not pos:
        return 1.0, [1] * len(lo)
    cell = (math.prod(pos) / cm) ** (1.0 / len(pos))
    while True:
        res = [min(cm, max(1, math.ceil(e / cell))) if e > 0.0 else 1 for e in ext]
        if math.prod(res) <= cm:
            return cell, res
        cell *= 1.0625


def grid_build_reference(centers: Tensor) -> Tensor:
    """The grid buffer (uint8) over ``centers`` (M, D), float32 or float64: the header, cell_start,
    order (stable by index inside a cell) and the sorted coordinates, as rbf.h lays them out."""
    m, dim = centers.shape
    cm, cs_off, order_off, coords_off, total = grid_layout(centers.dtype, dim, m)
    buf = torch.zeros(total, dtype=torch.uint8)
    hdr = buf[:128].view(torch.int64)
    geom = buf[128:256].view(torch.float64)
    c = centers.detach().cpu()
    flags = 0
    if m and not bool(torch.isfinite(c).all()):
        flags = 1
    if m and not flags:
        lo = c.min(0).values.double().tolist()
        hi = c.max(0).values.double().tolist()
    else:
        lo, hi = [0.0] * dim, [0.0] * dim
    cell, res = grid_geometry(lo, hi, m if not flags else 0)
    res3 = res + [1] * (3 - dim)
    ncells = math.prod(res)
    hdr[:9] = torch.tensor([dim, m, ncells, *res3, _KK_DTYPE[centers.dtype], cm, flags], dtype=torch.int64)
    geom[:4] = torch.tensor(lo + [0.0] * (3 - dim) + [cell], dtype=torch.float64)
    cell_start = buf[cs_off:order_off].view(torch.int64)
    order = buf[order_off:coords_off].view(torch.int64)
    if m == 0 or flags:
        return buf.to(centers.device)
    cd = c.double()
    lo_t = torch.tensor(lo, dtype=torch.float64)
    cid = torch.zeros(m, dtype=torch.int64)
    for d in range(dim):
        cc = torch.floor((cd[:, d] - lo_t[d]) / cell).clamp(0, res[d] - 1).long()
        cid = cid * res[d] + cc
    perm = torch.argsort(cid, stable=True)
    counts = torch.bincount(cid, minlength=cm + 1)[: cm + 1]
    cell_start[1:] = torch.cumsum(counts, 0)[: cm]
    cell_start[0] = 0
    cell_start[ncells + 1:] = m  # cells past ncells (unused) are empty
    order[:] = perm
    esize = c.element_size()
    buf[coords_off:coords_off + esize * m * dim].view(centers.dtype)[:] = c[perm].reshape(-1)
    return buf.to(centers.device)


def grid_header(grid: Tensor) -> dict:
    """The grid buffer's header fields, as a dict (for tests and messages)."""
    g = grid.detach().cpu()
    h = g[:128].view(torch.int64).tolist()
    geom = g[128:256].view(torch.float64).tolist()
    return {"dim": h[0], "m": h[1], "ncells": h[2], "res": h[3:6], "dtype": h[6], "cells_max": h[7],
            "flags": h[8], "lo": geom[:3], "cell": geom[3]}


# ---- neighbour search ----------------------------------------------------------------------------------
def dist2_rounded(x: Tensor, c: Tensor) -> Tensor:
    """(N, M) squared distances in the dtype of x, formed as rbf.h says: ((x0-c0)^2 + (x1-c1)^2) + (x2-c2)^2,
    each operation rounded (separate torch ops: no FMA)."""
    acc = None
    for d in range(x.shape[1]):
        t = x[:, None, d] - c[None, :, d]
        t = t * t
        acc = t if acc is None else acc + t
    return acc


def knn_reference(x: Tensor, centers: Tensor, k: int, chunk: int = 1 << 22) -> tuple[Tensor, Tensor]:
    """Brute force: (idx int64 (N, k), dist2 (N, k)), sorted by (dist2, index); k > M pads with -1 / +inf;
    a query with a non-finite coordinate gets -1 / NaN in every slot."""
    n, dim = x.shape
    m = centers.shape[0]
    idx = torch.full((n, k), -1, dtype=torch.int64, device=x.device)
    dist = torch.full((n, k), math.inf, dtype=x.dtype, device=x.device)
    kk = min(k, m)
    if n and kk:
        rows = max(1, chunk // max(m, 1))
        for s in range(0, n, rows):
            d2 = dist2_rounded(x[s:s + rows], centers)
            # stable sort keeps the smaller index first among equal distances
            val, order = torch.sort(d2, dim=1, stable=True)
            idx[s:s + rows, :kk] = order[:, :kk]
            dist[s:s + rows, :kk] = val[:, :kk]
    bad = ~torch.isfinite(x).all(1) if n else torch.zeros(0, dtype=torch.bool, device=x.device)
    idx[bad] = -1
    dist[bad] = math.nan
    return idx, dist


# ---- the field -----------------------------------------------------------------------------------------
def phi_reference(x: Tensor, centers: Tensor, shapes: Tensor, idx: Tensor, kernel: str) -> Tensor:
    """(N, k) kernel values (0 for a missing neighbour), differentiable w.r.t. x, centers, shapes."""
    valid = idx >= 0
    ii = idx.clamp_min(0)
    # a missing neighbour's offset is 0 (not x - centers[0]: a non-finite x would leak NaN into its gradient)
    o = torch.where(valid[..., None], x[:, None, :] - centers[ii], torch.zeros((), dtype=x.dtype, device=x.device))
    if kernel == "nlin":
        s = shapes[ii]                                      # (N, k, D)
        phi = (1.0 - o.abs() * s).clamp(0.0, 1.0).prod(-1)
    else:
        if shapes.dim() == 3:                               # full (M, D, D)
            A = shapes[ii]                                  # (N, k, D, D)
            q = (o[..., :, None] * A * o[..., None, :]).sum((-1, -2))
        else:
            q = (shapes[ii] * o * o).sum(-1)
        phi = 1.0 / (1.0 + q) if kernel == "ivq" else torch.exp(-0.5 * q)
    return torch.where(valid, phi, torch.zeros((), dtype=phi.dtype, device=phi.device))


def features_reference(x: Tensor, centers: Tensor, shapes: Tensor, weights: Tensor, omegas: Optional[Tensor],
                       idx: Tensor, kernel: str = "ivq", normalize: int = NORM_DETACHED) -> Tensor:
    """out (N, C) in the weights' dtype; math in the coordinate dtype (x's)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    n, C = x.shape[0], weights.shape[1]
    if centers.shape[0] == 0 or idx.shape[1] == 0:          # no RBF: every neighbour is missing
        bad = ~torch.isfinite(x).all(1) if n else torch.zeros(0, dtype=torch.bool, device=x.device)
        return torch.where(bad[:, None], torch.full((), math.nan, dtype=x.dtype, device=x.device),
                           x.new_zeros(n, C)).to(weights.dtype)
    phi = phi_reference(x, centers, shapes, idx, kernel)
    if normalize != NORM_NONE:
        s = phi.sum(-1, keepdim=True)
        if normalize == NORM_DETACHED:
            s = s.detach()
        phi = phi / (s + EPS)
    w = weights.to(x.dtype)[idx.clamp_min(0)]                  # (N, k, C)
    if omegas is not None:
        basis = torch.sin(omegas.to(x.dtype) * phi[..., None])  # (N, k, C)
    else:
        basis = phi[..., None]
    out = (w * basis).sum(1) if idx.shape[1] else x.new_zeros(n, C)
    if n:
        bad = ~torch.isfinite(x).all(1)
        out = torch.where(bad[:, None], torch.full((), math.nan, dtype=out.dtype, device=out.device), out)
    return out.to(weights.dtype)


def features_backward_reference(grad_out: Tensor, x: Tensor, centers: Tensor, shapes: Tensor, weights: Tensor,
                                omegas: Optional[Tensor], idx: Tensor, kernel: str, normalize: int,
                                needs: tuple[bool, bool, bool, bool, bool] = (True,) * 5):
    """(dx, dcenters, dshapes, dweights, domegas), the vjp of :func:`features_reference` written out
    (the header's formulas; the tests check it against torch autograd of features_reference).  None
    where not needed (domegas also when omegas is None); dweights in the coordinate dtype."""
    cd = x.dtype
    n, dim = x.shape
    m = centers.shape[0]
    if m == 0:
        idx = idx[:, :0]
    g = grad_out.to(cd)
    valid = idx >= 0
    ii = idx.clamp_min(0)
    zero = torch.zeros((), dtype=cd, device=x.device)
    o = torch.where(valid[..., None], x[:, None, :] - centers[ii], zero)   # (N, k, D); 0 where missing
    full = kernel != "nlin" and shapes.dim() == 3
    if kernel == "nlin":
        s = shapes[ii]
        h = 1.0 - o.abs() * s
        hc = h.clamp(0.0, 1.0)
        passes = ((h >= 0) & (h <= 1)).to(cd)
        others = torch.stack([torch.prod(torch.cat([hc[..., :d], hc[..., d + 1:]], -1), -1) for d in range(dim)], -1)
        phi = hc.prod(-1)
        dphi_do = others * passes * (-s * torch.sign(o))               # (N, k, D)
        dphi_dshape = others * passes * (-o.abs())                    # (N, k, D)
    else:
        if full:
            A = shapes[ii]                                            # (N, k, D, D)
            q = (o[..., :, None] * A * o[..., None, :]).sum((-1, -2))
            dq_do = ((A + A.transpose(-1, -2)) * o[..., None, :]).sum(-1)
            dq_dshape = o[..., :, None] * o[..., None, :]
        else:
            a = shapes[ii]
            q = (a * o * o).sum(-1)
            dq_do = 2.0 * a * o
            dq_dshape = o * o
        if kernel == "ivq":
            phi = 1.0 / (1.0 + q)
            dphi_dq = -phi * phi
        else:
            phi = torch.exp(-0.5 * q)
            dphi_dq = -0.5 * phi
        dphi_do = dphi_dq[..., None] * dq_do
        dphi_dshape = (dphi_dq[..., None, None] if full else dphi_dq[..., None]) * dq_dshape
    phi = torch.where(valid, phi, zero)
    if normalize != NORM_NONE:
        s_eps = phi.sum(-1, keepdim=True) + EPS
        phih = phi / s_eps
    else:
        phih = phi
    w = weights.to(cd)[ii]                                            # (N, k, C)
    if omegas is not None:
        om = omegas.to(cd)
        arg = om * phih[..., None]
        basis, dbasis = torch.sin(arg), om * torch.cos(arg)
    else:
        basis, dbasis = phih[..., None].expand(w.shape), torch.ones_like(w)
    gw = g[:, None, :] * w                                            # (N, k, C)
    dphih = torch.where(valid, (gw * dbasis).sum(-1), zero)          # (N, k)
    if normalize == NORM_NONE:
        dphi = dphih
    elif normalize == NORM_DETACHED:
        dphi = dphih / s_eps
    else:
        dphi = dphih / s_eps - (dphih * phi).sum(-1, keepdim=True) / (s_eps * s_eps)
    dphi = torch.where(valid, dphi, zero)
    flat = ii.reshape(-1)
    dx = dc = ds = dw = do = None
    term = dphi[..., None] * dphi_do                                  # (N, k, D)
    if needs[0]:
        dx = term.sum(1)
    if needs[1]:
        dc = torch.zeros(m, dim, dtype=cd, device=x.device).index_add_(0, flat, -term.reshape(-1, dim))
    if needs[2]:
        tshape = (dphi[..., None, None] if full else dphi[..., None]) * dphi_dshape
        ds = torch.zeros(shapes.shape, dtype=cd, device=x.device).index_add_(0, flat, tshape.reshape(-1, *shapes.shape[1:]))
    if needs[3]:
        contrib = torch.where(valid[..., None], g[:, None, :] * basis, zero)
        dw = torch.zeros(m, weights.shape[1], dtype=cd, device=x.device).index_add_(0, flat, contrib.reshape(flat.numel(), weights.shape[1]))
    if needs[4] and omegas is not None:
        do = torch.where(valid[..., None], gw * phih[..., None] * torch.cos(arg), zero).sum((0, 1))
    return dx, dc, ds, dw, do


def spatial_order(centers: Tensor, bits: int | None = None) -> Tensor:
    """A permutation (int64, M) that puts ``centers`` (M, 2 or 3) in Morton (Z-curve) order over their
    bounding box, so that RBFs close in space get close indices: the feature rows the k neighbours of a
    query read are then near each other in memory (the fused kernels gather them at random otherwise,
    which costs 2-3x at M = 1e5 on a CPU).  Reordering RBFs (centres, shapes and weights alike) changes
    nothing else."""
    m, dim = centers.shape
    if m == 0:
        return torch.zeros(0, dtype=torch.int64, device=centers.device)
    bits = bits or (16 if dim == 2 else 10)
    c = centers.detach().double()
    lo, hi = c.min(0).values, c.max(0).values
    q = ((c - lo) / (hi - lo).clamp_min(1e-300) * ((1 << bits) - 1)).round().long().clamp(0, (1 << bits) - 1)
    code = torch.zeros(m, dtype=torch.int64, device=centers.device)
    for b in range(bits):
        for d in range(dim):
            code |= ((q[:, d] >> b) & 1) << (b * dim + d)
    return torch.argsort(code, stable=True)


def log_omegas(channels: int, lo: float = 2.0 ** -3, hi: float = 2.0 ** 12, dtype=torch.float32) -> Tensor:
    """NeuRBF's frequencies: 2 ** linspace(log2 lo, log2 hi, channels) ([2^-3, 2^12] for images)."""
    return torch.pow(2.0, torch.linspace(math.log2(lo), math.log2(hi), channels, dtype=torch.float64)).to(dtype)
