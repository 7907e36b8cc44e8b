"""Pure-torch reference of the generalized Monarch product (HazyResearch/fly layout).

Shapes (see ../shared/papers/monarch.md and csrc/include/kernelkit/kernelkit.h):
    x  (..., k*p),  w1 (k, q, p),  w2 (l, s, r)  with  l*r == k*q,   out (..., l*s)

    t[b, a*q + i]   = sum_j w1[a, i, j] x[b, a*p + j]      (block-diagonal B1)
    h[b, c, m]      = t[b, m*l + c]                         (permutation P1: (r, l) grid -> (l, r))
    out[b, n*l + c] = sum_m w2[c, n, m] h[b, c, m]          (B2, then permutation P2: (l, s) -> (s, l))

This is the readable definition every backend is tested against (in float64).  It materialises the
permuted intermediate, exactly like fly's bmm path, and is differentiable by plain autograd.
"""
from __future__ import annotations

import torch


def monarch_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    k, q, p = w1.shape
    l, s, r = w2.shape
    batch_shape = x.shape[:-1]
    xb = x.reshape(-1, k, p)
    t = torch.einsum("bkp,kqp->bkq", xb, w1).reshape(-1, r, l)   # t as the (r, l) grid
    h = t.transpose(1, 2)                                           # (batch, l, r)
    o = torch.einsum("blr,lsr->bls", h, w2)                         # (batch, l, s)
    return o.transpose(1, 2).reshape(*batch_shape, s * l)


def monarch_to_dense(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Dense (l*s, k*p) matrix M with monarch_reference(x, w1, w2) == x @ M.T."""
    k, q, p = w1.shape
    eye = torch.eye(k * p, dtype=w1.dtype, device=w1.device)
    return monarch_reference(eye, w1, w2).T.contiguous()


def monarch_bmm(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The bmm-based Monarch product as commonly implemented (fly / m2 / MoRe): two torch.bmm with
    reshapes and permutes between them.  A benchmark baseline, not used by kernelkit itself."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    batch_shape = x.shape[:-1]
    xb = x.reshape(-1, k, p).transpose(0, 1)                         # (k, B, p)
    out1 = torch.bmm(xb, w1.transpose(-1, -2))                       # (k, B, q)
    out1 = out1.transpose(0, 1).reshape(-1, r, l).transpose(-1, -2).contiguous().transpose(0, 1)
    out2 = torch.bmm(out1, w2.transpose(-1, -2))                     # (l, B, s)
    return out2.permute(1, 2, 0).reshape(*batch_shape, s * l)


def monarch_reference_bwd(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, dout: torch.Tensor):
    """Closed-form gradients (dx, dw1, dw2) of monarch_reference for x (B, k*p), dout (B, l*s)."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    xb = x.reshape(-1, k, p)
    h = torch.einsum("bkp,kqp->bkq", xb, w1).reshape(-1, r, l).transpose(1, 2)   # (B, l, r)
    d_o = dout.reshape(-1, s, l).transpose(1, 2)                                  # (B, l, s)
    dw2 = torch.einsum("bls,blr->lsr", d_o, h)
    dt = torch.einsum("bls,lsr->blr", d_o, w2).transpose(1, 2).reshape(-1, k, q)  # undo P1
    dx = torch.einsum("bkq,kqp->bkp", dt, w1).reshape(x.shape)
    dw1 = torch.einsum("bkq,bkp->kqp", dt, xb)
    return dx, dw1, dw2
