"""AQLM checkpoints on kernelkit's vq kernels: :func:`from_aqlm` turns an ``aqlm.QuantizedLinear`` (aqlm
1.1.x, Vahe1994/AQLM inference_lib) or its tensors into a :class:`~kernelkit.vq.VQLinear` with the same
output, F.linear(x, scale * sum_m C_m[code], bias).

AQLM's layout (aqlm/inference.py, utils.py):
    codes      [out / out_group_size, in / in_group_size, M]   int8 (nbits <= 8) or int16 (<= 16), signed:
               utils.pack_int_data stores a code >= 2^(nbits-1) as code - 2^nbits
    codebooks  [M, 2^nbits, out_group_size, in_group_size]
    scales     [out / out_group_size, 1, 1, 1]
    bias       [out] or None
With out_group_size = 1 (every published checkpoint: 1x16g8, 2x8g8, 8x8, 1x16g16, 1x8g8) this is
kernelkit's format with d = in_group_size, K = 2^nbits, one set of codebooks and per-row scales.  The
codes are read modulo K (unpack_int_data) and stored in kernelkit's dtype: uint8 for K <= 256 (for
K = 256 the same bits as AQLM's int8), int16 otherwise (for K = 65536 the same bits as AQLM's int16).

The CPU permutation: QuantizedLinear.prepare_matmul_op, run on the first forward, transposes the codes
in place to [in / in_group_size, out, M] when the input is on the CPU and K = 256 (for its numba
kernel).  from_aqlm undoes it: the codes are taken as permuted when their shape is [G, out, M] rather
than [out, G, M]; when out = G the shape cannot tell, and a QuantizedLinear is taken as permuted when
it has run (gemv_op set) with K = 256 and CPU codes, a tensor dict as not permuted.  ``permuted=``
overrides the guess.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .format import to_code_dtype
from .ops import GROUP_SIZES, MAX_CODEBOOKS


def _tensors(obj, fn: str):
    """(codes, codebooks, scales, bias, layer or None) from a QuantizedLinear, a dict or a tuple."""
    if isinstance(obj, torch.nn.Module):
        missing = [a for a in ("codes", "codebooks", "scales") if not isinstance(getattr(obj, a, None), Tensor)]
        if missing:
            raise TypeError(f"{fn}: layer_or_tensors is a {type(obj).__name__} without AQLM's tensor attribute(s) "
                            f"{', '.join(missing)}; pass an aqlm.QuantizedLinear or a dict of its tensors")
        return obj.codes, obj.codebooks, obj.scales, getattr(obj, "bias", None), obj
    if isinstance(obj, dict):
        if "codes" not in obj or "codebooks" not in obj:
            raise ValueError(f"{fn}: the dict must hold 'codes' and 'codebooks' (and 'scales', 'bias'), got keys "
                             f"{sorted(obj)}")
        unknown = set(obj) - {"codes", "codebooks", "scales", "bias"}
        if unknown:
            raise ValueError(f"{fn}: unknown key(s) {sorted(unknown)} in the dict (expected codes, codebooks, "
                             f"scales, bias)")
        return obj["codes"], obj["codebooks"], obj.get("scales"), obj.get("bias"), None
    if isinstance(obj, (tuple, list)):
        if not 2 <= len(obj) <= 4:
            raise ValueError(f"{fn}: a tuple must be (codes, codebooks[, scales[, bias]]), got {len(obj)} items")
        codes, codebooks, scales, bias = (list(obj) + [None, None])[:4]
        return codes, codebooks, scales, bias, None
    raise TypeError(f"{fn}: layer_or_tensors must be an aqlm.QuantizedLinear, a dict or a tuple of its tensors, "
                    f"got {type(obj).__name__}")


def from_aqlm(layer_or_tensors, *, backend: Optional[str] = None, permuted: Optional[bool] = None):
    """A :class:`~kernelkit.vq.VQLinear` computing what the AQLM layer computes (see the module docstring).

    layer_or_tensors: an ``aqlm.QuantizedLinear``, a dict {"codes", "codebooks", "scales", "bias"} (its
    state_dict) or a tuple (codes, codebooks, scales, bias); scales and bias may be None.  The layer
    gets the codebooks' dtype and device.  permuted: None (detect), True or False (see above).
    Raises ValueError for out_group_size > 1, a group size kernelkit does not run, codes >= K, or
    shapes that do not fit together; TypeError for non-integer codes or non-float codebooks."""
    from .layers import VQLinear

    fn = "VQLinear.from_aqlm"
    codes, codebooks, scales, bias, layer = _tensors(layer_or_tensors, fn)
    if not isinstance(codebooks, Tensor) or not codebooks.is_floating_point():
        raise TypeError(f"{fn}: codebooks must be a floating-point tensor [M, K, out_group_size, in_group_size], "
                        f"got {codebooks.dtype if isinstance(codebooks, Tensor) else type(codebooks).__name__}")
    if codebooks.dim() != 4:
        raise ValueError(f"{fn}: codebooks must be 4-D [M, K, out_group_size, in_group_size], got shape "
                         f"{tuple(codebooks.shape)}")
    M, K, ogs, ig = codebooks.shape
    if ogs != 1:
        raise ValueError(f"{fn}: out_group_size = {ogs} (codebooks.shape[2]) is not supported: kernelkit's vq "
                         f"kernels take out_group_size = 1 (every published AQLM checkpoint)")
    if ig not in GROUP_SIZES:
        raise ValueError(f"{fn}: in_group_size = {ig} (codebooks.shape[3]) is not supported; kernelkit's vq "
                         f"kernels take {GROUP_SIZES}")
    if not 1 <= M <= MAX_CODEBOOKS:
        raise ValueError(f"{fn}: num_codebooks = {M} (codebooks.shape[0]) must be in [1, {MAX_CODEBOOKS}]")
    if K < 2 or K & (K - 1) or K > 1 << 16:
        raise ValueError(f"{fn}: codebook_size = {K} (codebooks.shape[1]) must be 2^nbits with nbits in [1, 16]")
    nbits = K.bit_length() - 1
    if not isinstance(codes, Tensor) or codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"{fn}: codes must be an integer tensor (AQLM: int8 for nbits <= 8, int16 for <= 16), got "
                        f"{codes.dtype if isinstance(codes, Tensor) else type(codes).__name__}")
    width = torch.iinfo(codes.dtype).bits
    if width < nbits:
        raise TypeError(f"{fn}: codes of dtype {codes.dtype} cannot hold {nbits}-bit codes (K = {K}); AQLM stores "
                        f"them as {'int8' if nbits <= 8 else 'int16'}")
    if codes.dim() != 3 or codes.shape[2] != M:
        raise ValueError(f"{fn}: codes must be [out_features, in_features / in_group_size, M = {M}], got shape "
                         f"{tuple(codes.shape)}")
    if scales is not None:
        if not isinstance(scales, Tensor) or not scales.is_floating_point():
            raise TypeError(f"{fn}: scales must be a floating-point tensor [out_features, 1, 1, 1] or None")
        n_out = scales.numel()
    elif bias is not None:
        n_out = bias.numel()
    elif layer is not None and hasattr(layer, "out_features"):
        n_out = int(layer.out_features)
    else:
        n_out = None
    a, b = codes.shape[0], codes.shape[1]
    if permuted is None:
        if n_out is not None and a != b:
            permuted = b == n_out
        else:  # out = G (or out unknown): the shape cannot tell
            permuted = (layer is not None and getattr(layer, "gemv_op", None) is not None and K == 256
                        and codes.device.type == "cpu")
    if permuted:
        codes = codes.permute(1, 0, 2)
    n_out_c, G = codes.shape[0], codes.shape[1]
    if n_out is not None and n_out != n_out_c:
        raise ValueError(f"{fn}: codes {tuple(codes.shape)} (after undoing AQLM's CPU permutation: {bool(permuted)}) "
                         f"do not match out_features = {n_out} (from scales / bias)")
    if layer is not None and hasattr(layer, "in_features") and int(layer.in_features) != G * ig:
        raise ValueError(f"{fn}: codes have {G} groups of in_group_size = {ig} but in_features = {layer.in_features}")
    if scales is not None and scales.numel() != n_out_c:
        raise ValueError(f"{fn}: scales must have out_features = {n_out_c} entries, got shape {tuple(scales.shape)}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.numel() != n_out_c):
        raise ValueError(f"{fn}: bias must have out_features = {n_out_c} entries")
    raw = codes.detach().to(torch.int64)
    bad = (raw < -(K // 2)) | (raw >= K)  # AQLM stores [-K/2, K/2); unsigned [0, K) is accepted too
    if raw.numel() and bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{fn}: codes{list(pos)} = {int(raw[pos])} is out of range for {nbits}-bit codes "
                         f"(K = {K} = codebooks.shape[1]): expected [-{K // 2}, {K})")
    vals = raw % K  # AQLM's unpack_int_data: stored signed, read modulo 2^nbits
    out = VQLinear(G * ig, n_out_c, bias=bias is not None, d=ig, K=K, M=M, scales=scales is not None,
                   device=codebooks.device, dtype=codebooks.dtype, backend=backend)
    with torch.no_grad():
        out.codebooks.copy_(codebooks.detach().reshape(1, M, K, ig))
        out.codes.copy_(to_code_dtype(vals, K).to(out.codes.device))
        if scales is not None:
            out.scales.copy_(scales.detach().reshape(-1))
        if bias is not None:
            out.bias.copy_(bias.detach())
    return out
