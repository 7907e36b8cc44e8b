"""VQLinear: a drop-in nn.Linear whose weight is vector-quantized with additive codebooks and runs on
the vq dequant-matmul kernels (VQ4DiT's 2-bit d=4 K=256 format; AQLM's 1x16g8, 2x8g8, ...).

    W[o, g*d + t] = scales[o] * sum_m codebooks[o // rows_per_codebook, m, codes[o, g, m], t]
    y = x W^T + bias

Parameters: ``codebooks`` (S, M, K, d), optional ``scales`` (out_features,), optional ``bias``; the
integer ``codes`` (out_features, G, M) are a buffer (uint8 for K <= 256, else int16 read as unsigned),
so gradients reach the codebooks, scales and bias with the codes frozen (fine-tuning, calibration).

Input padding: when d does not divide in_features, the quantizer (``from_linear``, ``quantize_``)
pads W with zero columns to G*d = ceil(in_features/d)*d and the layer is built with ``pad=True``: its
forward pads x with zeros to G*d features, so the padded columns never contribute.  A VQLinear
constructed directly with in_features % d != 0 and pad=False raises.

state_dict: the codes are stored bit-packed, not as the uint8/int16 buffer: ``codes_packed`` (uint8,
ceil(log2 K) bits per code, little-endian, kernelkit.vq.format.pack_codes) and ``codes_format``
(int64 [out_features, G, M, K, bits]), beside ``codebooks``, ``scales`` and ``bias``.  Loading checks
the format against the layer and restores the codes exactly.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor, nn

from .. import _backend, _checks
from .format import code_dtype, index_bits, pack_codes, to_code_dtype, unpack_codes
from .ops import GROUP_SIZES, MAX_CODEBOOKS, PATHS, bits_per_weight, dequantize, vq_linear
from .quantize import bits_for, clamp_codebook_size, quantize_weight
from .reference import unsigned_codes


def _positive_int(v, name: str, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
        raise ValueError(f"{where}: {name} must be a positive int, got {v!r}")
    return int(v)


class VQLinear(nn.Module):
    """``y = x W^T + b`` with W (out_features, in_features) stored as codes into M additive codebooks
    of K codewords of d values (see the module docstring).

    Args:
        in_features, out_features, bias: as nn.Linear.
        d: group size (1, 2, 4, 8 or 16): each code covers d consecutive inputs of one row.
        K: codewords per codebook (<= 65536).  M: additive codebooks (1..16).
        rows_per_codebook: output rows sharing one set of M codebooks (None: one set for the layer).
        scales: a per-output-row scale parameter (AQLM's layout).
        pad: allow in_features % d != 0 by zero-padding the input to a multiple of d.
        device, dtype: of the codebooks, scales and bias (dtype: float32 default).
        backend: pin a kernelkit backend (None: the default choice per call).
        path: "auto", "gemv" or "gemm" (kernelkit.vq.vq_linear).
    A fresh layer has uniformly random codes and codebook entries U(+-1/sqrt(in_features))/sqrt(M) (so
    W has about nn.Linear's scale), scales 1 and nn.Linear's bias init; it is mostly a container to
    fill: use :meth:`from_linear`, :meth:`from_aqlm` or ``load_state_dict``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, d: int = 4, K: int = 256,
                 M: int = 1, rows_per_codebook: Optional[int] = None, scales: bool = False, pad: bool = False,
                 device=None, dtype=None, backend: Optional[str] = None, path: str = "auto"):
        super().__init__()
        where = "VQLinear"
        in_features = _positive_int(in_features, "in_features", where)
        out_features = _positive_int(out_features, "out_features", where)
        if isinstance(d, bool) or d not in GROUP_SIZES:
            raise ValueError(f"{where}: d must be one of {GROUP_SIZES}, got {d!r}")
        if isinstance(K, bool) or not isinstance(K, numbers.Integral) or not 1 <= K <= 1 << 16:
            raise ValueError(f"{where}: K must be an int in [1, 65536], got {K!r}")
        if isinstance(M, bool) or not isinstance(M, numbers.Integral) or not 1 <= M <= MAX_CODEBOOKS:
            raise ValueError(f"{where}: M must be an int in [1, {MAX_CODEBOOKS}], got {M!r}")
        if rows_per_codebook is None:
            rows_per_codebook = out_features
        rows_per_codebook = _positive_int(rows_per_codebook, "rows_per_codebook", where)
        if in_features % d and not pad:
            raise ValueError(f"{where}: in_features = {in_features} is not a multiple of d = {d}; choose a d that "
                             f"divides it, or pass pad=True to zero-pad the input to "
                             f"{-(-in_features // d) * d} features (as from_linear does)")
        if dtype is not None and dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"{where}: dtype must be float32/float64/float16/bfloat16 (or None), got {dtype!r}")
        if backend is not None:
            _backend._check_name(backend, where)
        if path not in PATHS:
            raise ValueError(f"{where}: path must be one of {', '.join(map(repr, PATHS))}, got {path!r}")
        self.in_features, self.out_features = in_features, out_features
        self.d, self.K, self.M = int(d), int(K), int(M)
        self.rows_per_codebook = rows_per_codebook
        self.groups = -(-in_features // d)
        self.backend, self.path = backend, path
        S = -(-out_features // rows_per_codebook)
        kw = {"device": device, "dtype": dtype}
        self.codebooks = nn.Parameter(torch.empty(S, self.M, self.K, self.d, **kw))
        self.register_buffer("codes", torch.empty(out_features, self.groups, self.M, dtype=code_dtype(self.K),
                                                  device=device), persistent=False)
        if scales:
            self.scales = nn.Parameter(torch.empty(out_features, **kw))
        else:
            self.register_parameter("scales", None)
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    # ---- properties ---------------------------------------------------------------------------------
    @property
    def padded_in_features(self) -> int:
        """G * d: the input width the kernels see (> in_features when the input is zero-padded)."""
        return self.groups * self.d

    @property
    def bits_per_weight(self) -> float:
        """Index bits per weight of the format, M log2(K) / d (codebooks, scales, bias excluded): exactly
        2.0 for d=4, K=256, M=1."""
        return bits_per_weight(self.d, self.K, self.M)

    @property
    def storage_bits_per_weight(self) -> float:
        """Bits per weight of everything the state_dict holds (packed codes, codebooks, scales, bias and
        the 40-byte codes_format): the sum of its tensors' nbytes * 8 / (out_features * in_features)."""
        total = sum(t.numel() * t.element_size() for t in self.state_dict().values())
        return 8.0 * total / (self.out_features * self.in_features)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.codebooks, -bound / math.sqrt(self.M), bound / math.sqrt(self.M))
        vals = torch.randint(0, self.K, self.codes.shape, device=self.codes.device)
        self.codes.copy_(to_code_dtype(vals, self.K))
        if self.scales is not None:
            nn.init.ones_(self.scales)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    # ---- forward --------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        _checks.tensor(x, "x", "VQLinear", min_ndim=1)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"VQLinear: x.shape[-1] must be in_features={self.in_features}, got shape "
                             f"{tuple(x.shape)}")
        if self.padded_in_features != self.in_features:
            x = nn.functional.pad(x, (0, self.padded_in_features - self.in_features))
        y = vq_linear(x, self.codes, self.codebooks, self.scales, self.bias,
                      rows_per_codebook=self.rows_per_codebook, path=self.path, backend=self.backend)
        return _checks.not_a_view(y)

    def dequantize(self) -> Tensor:
        """The dense W (out_features, in_features) in the codebooks' dtype (differentiable in the
        codebooks and scales)."""
        w = dequantize(self.codes, self.codebooks, self.scales, rows_per_codebook=self.rows_per_codebook,
                       backend=self.backend)
        return w[:, :self.in_features]

    # ---- codes ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def set_codes_(self, codes: Tensor) -> None:
        """Replace the codes in place (the buffer object is kept).  codes: (out_features, G, M) (or
        (out_features, G) for M = 1) of any integer dtype: uint8 / int16 are read as unsigned (the
        kernels' convention), wider ones must hold values in [0, K)."""
        fn = "VQLinear.set_codes_"
        if not isinstance(codes, Tensor) or codes.is_floating_point() or codes.is_complex() \
                or codes.dtype == torch.bool:
            got = codes.dtype if isinstance(codes, Tensor) else type(codes).__name__
            raise TypeError(f"{fn}: codes must be an integer tensor, got {got}")
        if codes.dim() == 2 and self.M == 1:
            codes = codes.unsqueeze(-1)
        want = tuple(self.codes.shape)
        if tuple(codes.shape) != want:
            raise ValueError(f"{fn}: codes must have shape (out_features, G, M) = {want}, got {tuple(codes.shape)}")
        vals = codes.to(torch.int64) & 0xFF if codes.dtype == torch.int8 else unsigned_codes(codes)
        _check_range(vals, self.K, fn, "codes")
        self.codes.copy_(to_code_dtype(vals.to(self.codes.device), self.K))

    # ---- conversions ------------------------------------------------------------------------------------
    def to_linear(self) -> nn.Linear:
        """An nn.Linear with the dequantized weight and the same bias."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.codebooks.device, dtype=self.codebooks.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dequantize())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 2, *, d: Optional[int] = None, K: Optional[int] = None,
                    M: int = 1, scales: bool = False, rows_per_codebook: Optional[int] = None, iters: int = 100,
                    seed: int = 0, progress: bool = False, backend: Optional[str] = None,
                    path: str = "auto") -> "VQLinear":
        """Quantize ``linear`` by k-means over its weight's sub-vectors W[o, g*d:(g+1)*d]
        (kernelkit.vq.kmeans: k-means++ seeding, ``iters`` Lloyd iterations, ``seed``; residual
        k-means for M > 1).

        Format: ``bits`` -> (d, K) by kernelkit.vq.bits_for (2 -> d=4, K=256, VQ4DiT's 2-bit; 3 -> d=2,
        K=64); ``d`` alone gives K = 2^(bits*d).  Unless K is given, it is clamped as VQ4DiT does for
        small layers, min(K, 2^floor(log2(out*in / (4d)))).  scales=True normalizes each row by its RMS
        first and keeps it as the layer's per-row scale.  in_features % d != 0: W and the input are
        zero-padded (see the module docstring).  The bias is copied; the layer has the linear's dtype
        and device.  ``backend`` runs the assignment kernel and is pinned on the layer."""
        where = "VQLinear.from_linear"
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{where}: linear must be an nn.Linear, got {type(linear).__name__}")
        if d is None:
            d, K0 = bits_for(bits)
        else:
            if isinstance(d, bool) or d not in GROUP_SIZES:
                raise ValueError(f"{where}: d must be one of {GROUP_SIZES}, got {d!r}")
            b = _positive_int(bits, "bits", where)
            K0 = 1 << min(b * d, 16)
        if K is None:
            K = clamp_codebook_size(K0, d, linear.out_features, linear.in_features)
        else:
            K = _positive_int(K, "K", where)
            code_dtype(K)
        M = _positive_int(M, "M", where)
        q = quantize_weight(linear.weight, d=d, K=K, M=M, scales=scales, rows_per_codebook=rows_per_codebook,
                            iters=iters, seed=seed, progress=progress, backend=backend)
        return cls._from_quantized(q, linear.bias, backend=backend, path=path)

    @classmethod
    def _from_quantized(cls, q, bias: Optional[Tensor], *, backend=None, path="auto") -> "VQLinear":
        """A layer holding a kernelkit.vq.quantize.QuantizedWeight's tensors and ``bias``."""
        S, M, K, d = q.codebooks.shape
        n_out = q.codes.shape[0]
        layer = cls(q.in_features, n_out, bias=bias is not None, d=d, K=K, M=M,
                    rows_per_codebook=q.rows_per_codebook, scales=q.scales is not None,
                    pad=q.in_features % d != 0, device=q.codebooks.device, dtype=q.codebooks.dtype,
                    backend=backend, path=path)
        with torch.no_grad():
            layer.codebooks.copy_(q.codebooks)
            layer.codes.copy_(q.codes)
            if q.scales is not None:
                layer.scales.copy_(q.scales.reshape(-1))
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_aqlm(cls, layer_or_tensors, *, backend: Optional[str] = None, permuted: Optional[bool] = None
                  ) -> "VQLinear":
        """An AQLM ``aqlm.QuantizedLinear`` (or its tensors) as a VQLinear: see kernelkit.vq.aqlm.from_aqlm."""
        from .aqlm import from_aqlm
        return from_aqlm(layer_or_tensors, backend=backend, permuted=permuted)

    # ---- state_dict: packed codes ------------------------------------------------------------------------
    def _format_tensor(self) -> Tensor:
        return torch.tensor([self.out_features, self.groups, self.M, self.K, index_bits(self.K)], dtype=torch.int64)

    # The two state_dict entries that are not parameters or buffers are attributes too, because
    # torch.distributed.checkpoint's get/set_model_state_dict look every state_dict key up by name.
    @property
    def codes_packed(self) -> Tensor:
        """The codes as the state_dict stores them: bit-packed, uint8 (kernelkit.vq.format.pack_codes)."""
        return pack_codes(self.codes, index_bits(self.K))

    @property
    def codes_format(self) -> Tensor:
        """int64 [out_features, G, M, K, bits]: the shape and bit width of :attr:`codes_packed`."""
        return self._format_tensor()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # codebooks, scales, bias
        destination[prefix + "codes_packed"] = self.codes_packed
        destination[prefix + "codes_format"] = self.codes_format

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        kp, kf = prefix + "codes_packed", prefix + "codes_format"
        packed, fmt = state_dict.get(kp), state_dict.get(kf)
        if packed is None or fmt is None:
            if strict:
                missing_keys.extend(k for k, v in ((kp, packed), (kf, fmt)) if v is None)
        else:
            try:
                self._load_codes(packed, fmt)
            except (TypeError, ValueError) as e:
                error_msgs.append(f"{prefix}codes_packed / codes_format: {e}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for k in (kp, kf):  # ours, though not parameters or buffers
            while k in unexpected_keys:
                unexpected_keys.remove(k)

    @torch.no_grad()
    def _load_codes(self, packed: Tensor, fmt: Tensor) -> None:
        if not isinstance(fmt, Tensor) or fmt.is_floating_point() or fmt.numel() != 5:
            raise ValueError("codes_format must be an integer tensor [out_features, G, M, K, bits], got "
                             f"{fmt if not isinstance(fmt, Tensor) else tuple(fmt.shape)}")
        n_out, G, M, K, bits = (int(v) for v in fmt.reshape(-1).tolist())
        mine = (self.out_features, self.groups, self.M, self.K)
        if (n_out, G, M, K) != mine:
            raise ValueError(f"the checkpoint holds codes for out_features={n_out}, G={G}, M={M}, K={K}, but this "
                             f"VQLinear has out_features={mine[0]}, G={mine[1]}, M={mine[2]}, K={mine[3]} "
                             f"(in_features={self.in_features}, d={self.d})")
        if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
            raise TypeError(f"codes_packed must be a uint8 tensor, got "
                            f"{packed.dtype if isinstance(packed, Tensor) else type(packed).__name__}")
        vals = unpack_codes(packed, bits, (n_out, G, M), torch.int64)
        _check_range(vals, self.K, "VQLinear.load_state_dict", "codes_packed")
        self.codes.copy_(to_code_dtype(vals.to(self.codes.device), self.K))

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
             f"d={self.d}, K={self.K}, M={self.M}")
        if self.codebooks.shape[0] > 1:
            s += f", rows_per_codebook={self.rows_per_codebook}"
        if self.scales is not None:
            s += ", scales=True"
        if self.padded_in_features != self.in_features:
            s += f", padded_to={self.padded_in_features}"
        return s + f", bits_per_weight={self.bits_per_weight:g}"


def _check_range(vals: Tensor, K: int, fn: str, name: str) -> None:
    """vals: int64 code values; ValueError naming the first one outside [0, K)."""
    bad = (vals < 0) | (vals >= K)
    if vals.numel() and bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{fn}: {name}{list(pos)} = {int(vals[pos])} is out of range for a codebook of K = {K} "
                         f"codewords (0 <= code < K)")
