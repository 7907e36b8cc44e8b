"""The vq format's small helpers: code dtypes, dense bit packing of codes, VQ4DiT's codebook-size clamp.

Codes (csrc/include/kernelkit/vq.h) are held unpacked for the kernels: uint8 for K <= 256, int16 for
K <= 65536 (read as unsigned: a code >= 2^15 is stored negative, AQLM's convention).  For storage
(VQLinear's state_dict) they are packed densely at b = ceil(log2 K) bits each, little-endian: code i
occupies bits [i*b, (i+1)*b) of the byte stream, bit 0 of a byte first.  So 6-bit codes (VQ4DiT's
3-bit setting, d=2, K=64) take 4 codes in 3 bytes, 8-bit codes one byte each, 16-bit codes two.

Bits per weight of a format: M * log2(K) / d index bits (``kernelkit.vq.bits_per_weight``), plus the
codebooks (S * M * K * d values) and the optional per-row scales spread over the layer's weights.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .reference import unsigned_codes

MAX_K = 1 << 16          # int16 codes (read as unsigned)
_CHUNK = 1 << 20         # codes per packing chunk (a multiple of 8: chunks end on a byte boundary)

# bits -> (d, K): the formats behind kernelkit.vq.quantize_(bits=...) and VQLinear.from_linear.
# 2 and 3 are VQ4DiT's settings (2-bit: d=4, K=256; 3-bit: d=2, K=64), 1 is AQLM's 1x8g8, 4 is
# d=2, K=256.  Index bits per weight = log2(K) / d equals ``bits`` for each.
_BITS_FORMATS = {1: (8, 256), 2: (4, 256), 3: (2, 64), 4: (2, 256)}


def code_dtype(K: int) -> torch.dtype:
    """uint8 for K <= 256, int16 (read as unsigned) for K <= 65536."""
    if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= MAX_K:
        raise ValueError(f"code_dtype: K must be an int in [1, {MAX_K}], got {K!r}")
    return torch.uint8 if K <= 256 else torch.int16


def index_bits(K: int) -> int:
    """Bits one packed code takes: ceil(log2 K), at least 1."""
    code_dtype(K)
    return max(1, (K - 1).bit_length())


def bits_for(bits: int) -> tuple[int, int]:
    """(d, K) of the ``bits``-per-weight format: 1 -> (8, 256) (AQLM 1x8g8), 2 -> (4, 256) (VQ4DiT
    2-bit), 3 -> (2, 64) (VQ4DiT 3-bit), 4 -> (2, 256)."""
    if isinstance(bits, bool) or bits not in _BITS_FORMATS:
        raise ValueError(f"bits_for: bits must be one of {sorted(_BITS_FORMATS)}, got {bits!r}")
    return _BITS_FORMATS[bits]


def vq4dit_codebook_size(bits: int, d: int, n_out: int, n_in: int) -> int:
    """K = min(2^(bits*d), 2^floor(log2(n_out*n_in / (4d)))), VQ4DiT's clamp for small layers (at least
    4 sub-vectors per codeword), never below 2 and never above 65536 (int16 codes)."""
    for name, v in (("bits", bits), ("d", d), ("n_out", n_out), ("n_in", n_in)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"vq4dit_codebook_size: {name} must be a positive int, got {v!r}")
    full = bits * d
    sub = n_out * n_in / (4 * d)
    cap = math.floor(math.log2(sub)) if sub >= 1 else 0
    return 1 << max(1, min(full, cap, 16))


def _check_bits(bits, fn: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"{fn}: bits must be an int in [1, 16], got {bits!r}")
    return bits


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes of ``n`` codes packed at ``bits`` each."""
    return (n * bits + 7) // 8


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """The codes (any integer dtype; uint8 / int16 read as unsigned) flattened in row-major order and
    packed densely at ``bits`` bits each, little-endian, into a 1-D uint8 tensor of
    ceil(numel * bits / 8) bytes.  Raises ValueError if a code does not fit ``bits`` bits."""
    fn = "kernelkit.vq.pack_codes"
    bits = _check_bits(bits, fn)
    if not isinstance(codes, Tensor) or codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"{fn}: codes must be an integer tensor, got "
                        f"{codes.dtype if isinstance(codes, Tensor) else type(codes).__name__}")
    vals = unsigned_codes(codes).reshape(-1)
    n = vals.numel()
    if n and (int(vals.min()) < 0 or int(vals.max()) >= (1 << bits)):
        bad = int(vals.min()) if int(vals.min()) < 0 else int(vals.max())
        raise ValueError(f"{fn}: code {bad} does not fit in bits = {bits}")
    if bits == 8:
        return vals.to(torch.uint8)
    if bits == 16:  # low byte first, whatever the machine's byte order
        return torch.stack([vals & 0xFF, vals >> 8], 1).reshape(-1).to(torch.uint8)
    out = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8, device=vals.device)
    shifts = torch.arange(bits, device=vals.device)
    weights8 = (1 << torch.arange(8, device=vals.device)).to(torch.int64)
    for lo in range(0, n, _CHUNK):  # bounded temporaries (chunk x bits)
        v = vals[lo:lo + _CHUNK]
        bitv = ((v.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)
        pad = (-bitv.numel()) % 8  # only the last chunk can end mid-byte
        if pad:
            bitv = torch.cat([bitv, bitv.new_zeros(pad)])
        byte = (bitv.view(-1, 8).to(torch.int64) * weights8).sum(1).to(torch.uint8)
        start = lo * bits // 8
        out[start:start + byte.numel()] = byte
    return out


def unpack_codes(packed: Tensor, bits: int, shape, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`pack_codes`: codes of ``shape`` in ``dtype`` (uint8, or int16 holding values >=
    2^15 negative, or any wider integer dtype)."""
    fn = "kernelkit.vq.unpack_codes"
    bits = _check_bits(bits, fn)
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"{fn}: packed must be a uint8 tensor, got "
                        f"{packed.dtype if isinstance(packed, Tensor) else type(packed).__name__}")
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if packed.numel() != packed_nbytes(n, bits):
        raise ValueError(f"{fn}: {n} codes of {bits} bits take {packed_nbytes(n, bits)} bytes, "
                         f"packed has {packed.numel()}")
    if dtype in (torch.uint8, torch.int8) and bits > 8:
        raise ValueError(f"{fn}: {bits}-bit codes do not fit dtype {dtype}")
    p = packed.reshape(-1).to(torch.int64)
    if bits == 8:
        vals = p
    elif bits == 16:
        pair = p.view(-1, 2)
        vals = pair[:, 0] | (pair[:, 1] << 8)
    else:
        vals = torch.empty(n, dtype=torch.int64, device=packed.device)
        shifts8 = torch.arange(8, device=packed.device)
        weights = (1 << torch.arange(bits, device=packed.device)).to(torch.int64)
        for lo in range(0, n, _CHUNK):
            hi = min(n, lo + _CHUNK)
            b0, b1 = lo * bits // 8, (hi * bits + 7) // 8
            bitv = ((p[b0:b1].unsqueeze(1) >> shifts8) & 1).reshape(-1)[: (hi - lo) * bits]
            vals[lo:hi] = (bitv.view(-1, bits) * weights).sum(1)
    if dtype == torch.int16:
        vals = torch.where(vals >= (1 << 15), vals - (1 << 16), vals)
    return vals.to(dtype).reshape(shape)


def to_code_dtype(values: Tensor, K: int) -> Tensor:
    """Unsigned code values (int64, in [0, K)) in the kernels' dtype for K: uint8, or int16 with values
    >= 2^15 stored negative."""
    dt = code_dtype(K)
    if dt == torch.int16:
        values = torch.where(values >= (1 << 15), values - (1 << 16), values)
    return values.to(dt)
