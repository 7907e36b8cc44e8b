"""Optimal projection of a dense matrix onto the Monarch set (Dao et al. 2022, Thm. on projection;
fly's blockdiag_butterfly_project_einsum_rank, generalized).

For factors w1 (k, q, p), w2 (l, s, r), entry (o = n*l + c, col = a*p + j) of the dense matrix is
    M[n*l + c, a*p + j] = sum_{m : (m*l + c) // q == a} w2[c, n, m] * w1[a, (m*l + c) % q, j].
So the s x p slice (output residue c, input block a) is a product of rank R(a, c) = #{m : ...},
and distinct slices use disjoint entries of w1 and w2.  Truncating each slice's SVD to R(a, c)
(Eckart-Young) and splitting sqrt(S) onto both factors is therefore globally optimal in Frobenius
norm.  This also covers rectangular layers and block counts that do not divide the width, where
R(a, c) varies from slice to slice (fly's version needs q = rank * l).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _checks


def monarch_shapes(in_features: int, out_features: int, nblocks: int):
    """fly's MonarchLinear factor shapes: ((k, q, p), (l, s, r)), and the padded widths."""
    in_blk = math.ceil(in_features / nblocks)
    out_blk = math.ceil(out_features / nblocks)
    in_ext, out_ext = in_blk * nblocks, out_blk * nblocks
    if in_ext < out_ext:
        s1, s2 = (nblocks, in_blk, in_blk), (nblocks, out_blk, in_blk)
    else:
        s1, s2 = (nblocks, out_blk, in_blk), (nblocks, out_blk, out_blk)
    return s1, s2, in_ext, out_ext


def project_factors(W: Tensor, w1_shape, w2_shape) -> tuple[Tensor, Tensor]:
    """w1, w2 of the given shapes whose Monarch product is closest to W (l*s, k*p) in Frobenius norm.

    Computed in float64 (or W's dtype if that is float64), returned in W's dtype."""
    k, q, p = w1_shape
    l, s, r = w2_shape
    if l * r != k * q:
        raise ValueError(f"project_factors: l*r ({l}*{r}) must equal k*q ({k}*{q})")
    if tuple(W.shape) != (l * s, k * p):
        raise ValueError(f"project_factors: W must have shape (l*s, k*p) = ({l * s}, {k * p}), got {tuple(W.shape)}")
    Wd = W.detach().to(torch.float64)
    # slices[c, a] = rows n*l + c, columns a*p : (a+1)*p   -> (l, k, s, p)
    slices = Wd.reshape(s, l, k, p).permute(1, 2, 0, 3)
    w1 = torch.zeros(k, q, p, dtype=torch.float64, device=W.device)
    w2 = torch.zeros(l, s, r, dtype=torch.float64, device=W.device)
    m = torch.arange(r, device=W.device)
    # Group the (c, a) slices by rank so that each group is one batched SVD.
    groups: dict[int, list] = {}
    for c in range(l):
        j = m * l + c
        a_of_m, i_of_m = j // q, j % q
        for a in range(k):
            ms = torch.nonzero(a_of_m == a).flatten()
            if ms.numel():
                groups.setdefault(ms.numel(), []).append((c, a, ms, i_of_m[ms]))
    for R, items in groups.items():
        cs = torch.tensor([it[0] for it in items], device=W.device)
        as_ = torch.tensor([it[1] for it in items], device=W.device)
        U, S, Vh = torch.linalg.svd(slices[cs, as_], full_matrices=False)   # (G, s, t), (G, t), (G, t, p)
        t = S.shape[-1]
        take = min(R, t)
        root = S[:, :take].sqrt()
        Uf = U[:, :, :take] * root[:, None, :]                  # (G, s, take)
        Vf = Vh[:, :take, :] * root[:, :, None]                 # (G, take, p)
        for g, (c, a, ms, iis) in enumerate(items):
            w2[c][:, ms[:take]] = Uf[g]
            w1[a][iis[:take]] = Vf[g]
            # columns beyond the slice's rank (R > min(s, p)) stay zero: they cannot help.
    return w1.to(W.dtype), w2.to(W.dtype)


def project(W: Tensor, nblocks: int = 4) -> tuple[Tensor, Tensor]:
    """Optimal Monarch approximation of a dense weight W (out_features, in_features).

    Returns (w1, w2) in MonarchLinear's (fly's) layout for ``nblocks``; W is zero-padded to the
    padded widths first, exactly as MonarchLinear pads its input and truncates its output."""
    _checks.tensor(W, "W", "project", ndim=2)
    if not isinstance(nblocks, int) or nblocks <= 0:
        raise ValueError(f"project: nblocks must be a positive int, got {nblocks!r}")
    out_f, in_f = W.shape
    if nblocks > min(in_f, out_f):
        raise ValueError(f"project: nblocks ({nblocks}) cannot exceed min(in_features, out_features) = {min(in_f, out_f)}")
    s1, s2, in_ext, out_ext = monarch_shapes(in_f, out_f, nblocks)
    Wp = torch.zeros(out_ext, in_ext, dtype=W.dtype, device=W.device)
    Wp[:out_f, :in_f] = W.detach()
    return project_factors(Wp, s1, s2)
