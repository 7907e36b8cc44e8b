"""Pure-torch reference of the vector-quantized linear layer (the float64 oracle every backend is tested
against, and the ``torch`` backend).

Format (csrc/include/kernelkit/vq.h): W (n_out, n_in), groups of d inputs, M additive codebooks of K
codewords, output rows in sets of ``rows_per_codebook`` sharing one set of codebooks:

    codes      (n_out, G, M)   uint8, or int16 read as unsigned (AQLM stores codes >= 2^15 negative)
    codebooks  (S, M, K, d)    S = ceil(n_out / rows_per_codebook)
    scales     (n_out,) or None
    W[o, g*d + t] = scales[o] * sum_m codebooks[o // rows_per_codebook, m, codes[o, g, m], t]

    forward   out = x W^T + bias
    backward  dx = dout W;  dW = dout^T x;  dcodebooks = dW * scales scattered onto the codes;
              dscales[o] = sum_i dW[o, i] U[o, i]  (U: W without the scale);  dbias = sum_b dout[b]

The reference dequantizes W and uses dense matmuls: readable, exact in float64, on every device.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def unsigned_codes(codes: Tensor) -> Tensor:
    """The codes as int64 in [0, 2^bits): uint8 as is, int16 reinterpreted as unsigned."""
    c = codes.long()
    return c & 0xFFFF if codes.dtype == torch.int16 else c


def _flat_index(codes: Tensor, S: int, M: int, K: int, rows_per_codebook: int) -> Tensor:
    n_out = codes.shape[0]
    s = torch.arange(n_out, device=codes.device) // max(rows_per_codebook, 1)
    m = torch.arange(M, device=codes.device)
    return (s.view(-1, 1, 1) * M + m.view(1, 1, -1)) * K + unsigned_codes(codes)  # (n_out, G, M)


def dequantize_unscaled(codes: Tensor, codebooks: Tensor, rows_per_codebook: int) -> Tensor:
    """U (n_out, n_in) = sum_m codebooks[set, m, codes]: W before the per-row scale.  Differentiable
    in the codebooks."""
    S, M, K, d = codebooks.shape
    n_out, G, _ = codes.shape
    idx = _flat_index(codes, S, M, K, rows_per_codebook)
    words = codebooks.reshape(S * M * K, d)[idx.reshape(-1)].view(n_out, G, M, d)
    return words.sum(2).reshape(n_out, G * d)


def dequantize_reference(codes: Tensor, codebooks: Tensor, scales: Optional[Tensor],
                         rows_per_codebook: int) -> Tensor:
    """W (n_out, n_in).  Differentiable in the codebooks and scales."""
    u = dequantize_unscaled(codes, codebooks, rows_per_codebook)
    return u if scales is None else u * scales.reshape(-1, 1)


def vq_linear_reference(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Optional[Tensor] = None,
                        bias: Optional[Tensor] = None, rows_per_codebook: Optional[int] = None) -> Tensor:
    """``x W^T + bias``; x (..., n_in); codebooks (S, M, K, d) or (M, K, d).  Differentiable."""
    if codebooks.dim() == 3:
        codebooks = codebooks.unsqueeze(0)
    if rows_per_codebook is None:
        rows_per_codebook = -(-codes.shape[0] // codebooks.shape[0]) if codes.shape[0] else 1
    w = dequantize_reference(codes, codebooks, scales, rows_per_codebook)
    return torch.nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def reference_fwd(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Optional[Tensor], bias: Optional[Tensor],
                  rows_per_codebook: int) -> Tensor:
    w = dequantize_reference(codes, codebooks, scales, rows_per_codebook)
    return torch.nn.functional.linear(x, w, bias)


def reference_bwd(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Optional[Tensor], dout: Tensor,
                  rows_per_codebook: int) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(dx, dcodebooks, dscales); the scatter runs in float32 at least (a codeword collects thousands of
    terms), results in the input dtype.  dscales is None without scales."""
    S, M, K, d = codebooks.shape
    n_out, G, _ = codes.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    u = dequantize_unscaled(codes, codebooks, rows_per_codebook)
    w = u if scales is None else u * scales.reshape(-1, 1)
    dx = dout @ w
    dw = dout.to(acc).t() @ x.to(acc)                                     # (n_out, n_in)
    dws = dw if scales is None else dw * scales.to(acc).reshape(-1, 1)
    idx = _flat_index(codes, S, M, K, rows_per_codebook).reshape(-1)
    src = dws.view(n_out, G, 1, d).expand(n_out, G, M, d).reshape(-1, d)
    dcb = torch.zeros(S * M * K, d, dtype=acc, device=x.device).index_add_(0, idx, src)
    dscales = None if scales is None else (dw * u.to(acc)).sum(1).to(x.dtype)
    return dx, dcb.view(S, M, K, d).to(x.dtype), dscales


def assign_reference(vectors: Tensor, centroids: Tensor, topn: int = 1) -> tuple[Tensor, Tensor]:
    """(idx int32 (n, topn), dist (n, topn)): the topn nearest centroids by squared Euclidean distance,
    nearest first, ties to the smaller index (a stable sort of exact differences)."""
    n, K = vectors.shape[0], centroids.shape[0]
    step = max(1, (1 << 24) // max(1, K * vectors.shape[1]))     # bound the (chunk, K, d) temporary
    idx, dists = [], []
    for lo in range(0, n, step):
        diff = vectors[lo:lo + step].unsqueeze(1) - centroids.unsqueeze(0)   # (chunk, K, d)
        dist = (diff * diff).sum(-1)
        order = torch.sort(dist, dim=1, stable=True).indices[:, :topn]
        idx.append(order.to(torch.int32))
        dists.append(dist.gather(1, order))
    if not idx:
        return (torch.empty(0, topn, dtype=torch.int32, device=vectors.device),
                vectors.new_empty(0, topn))
    return torch.cat(idx), torch.cat(dists)
