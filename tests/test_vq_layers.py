"""VQLinear: forward against the float64 dequantize-then-matmul reference, index bits, from_linear (k-means)
quality, input padding, the packed state_dict (exact round trip, size, mismatches), set_codes_, gradients
to the codebooks / scales / bias with frozen codes, bad arguments."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from kernelkit import _lib
from kernelkit.vq import VQLinear, bits_per_weight, dequantize_reference, unsigned_codes
from kernelkit.vq.format import packed_nbytes
from helpers import assert_close, rel_err


def _cpu_vq() -> bool:
    return _lib.cpu_library_error() is None and hasattr(_lib.C(), "vq_linear_fwd_cpu")


# the default backend on a CPU machine (the C++ kernels) and the pure-torch one
BACKENDS = [pytest.param("cpu", marks=pytest.mark.skipif(not _cpu_vq(), reason="kernelkit._C without the vq kernels")),
            "torch"]


def _ref_out(layer: VQLinear, x: torch.Tensor) -> torch.Tensor:
    """float64 F.linear(x, W, b) with W dequantized by the reference from the layer's tensors."""
    W = dequantize_reference(layer.codes, layer.codebooks.detach().double(),
                             None if layer.scales is None else layer.scales.detach().double(),
                             layer.rows_per_codebook)[:, :layer.in_features]
    b = None if layer.bias is None else layer.bias.detach().double()
    return nn.functional.linear(x.double(), W, b)


def _gauss_linear(n_out, n_in, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n_in, n_out, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in))
        lin.bias.copy_(torch.randn(n_out, generator=g) * 0.1)
    return lin


# ---- format numbers -------------------------------------------------------------------------------
def test_vq_linear_index_bits_exactly_two_for_d4_k256():
    layer = VQLinear(64, 16, d=4, K=256)
    assert layer.bits_per_weight == 2.0          # codebook excluded
    assert VQLinear(64, 16, d=2, K=64).bits_per_weight == 3.0
    assert VQLinear(64, 16, d=8, K=256, M=2).bits_per_weight == 2.0   # AQLM 2x8g8
    assert VQLinear(64, 16, d=8, K=65536).bits_per_weight == 2.0      # AQLM 1x16g8
    assert bits_per_weight(4, 256) == 2.0
    # the stored bits add the codebook (256 x 4 fp32 = 32768 bits) and the fp32 bias over 1024 weights
    assert layer.storage_bits_per_weight > 2.0 + (256 * 4 * 32 + 16 * 32) / 1024 - 1e-9


def test_vq_linear_codes_dtype_and_shape():
    assert VQLinear(64, 16, d=4, K=256).codes.dtype == torch.uint8
    big = VQLinear(64, 16, d=8, K=65536, M=1)
    assert big.codes.dtype == torch.int16 and tuple(big.codes.shape) == (16, 8, 1)
    two = VQLinear(64, 10, d=8, K=256, M=2, rows_per_codebook=4, scales=True)
    assert tuple(two.codebooks.shape) == (3, 2, 256, 8) and tuple(two.scales.shape) == (10,)


# ---- forward --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fmt", [dict(d=4, K=256), dict(d=2, K=64, scales=True), dict(d=8, K=256, M=2, scales=True),
                                 dict(d=8, K=65536), dict(d=4, K=100, rows_per_codebook=7, scales=True)],
                         ids=["vq4dit2", "vq4dit3_scales", "2x8g8", "1x16g8", "K100_sets"])
def test_vq_linear_forward_matches_reference(backend, dtype, fmt, poison):
    torch.manual_seed(0)
    layer = VQLinear(64, 19, dtype=dtype, backend=backend, **fmt)
    if layer.scales is not None:
        with torch.no_grad():
            layer.scales.uniform_(0.5, 2.0)
    x = torch.randn(3, 5, 64, dtype=dtype)
    out = layer(x)
    assert out.shape == (3, 5, 19) and out.dtype == dtype
    assert_close(out, _ref_out(layer, x), dtype, f"VQLinear {fmt} {backend}")
    W = dequantize_reference(layer.codes, layer.codebooks.detach().double(),
                             None if layer.scales is None else layer.scales.detach().double(), layer.rows_per_codebook)
    assert_close(layer.dequantize(), W, dtype, "dequantize")


@pytest.mark.parametrize("backend", BACKENDS)
def test_vq_linear_to_linear_matches(backend):
    torch.manual_seed(1)
    layer = VQLinear(32, 12, d=4, K=64, scales=True, backend=backend)
    lin = layer.to_linear()
    assert type(lin) is nn.Linear and lin.weight.shape == (12, 32)
    x = torch.randn(7, 32)
    assert_close(layer(x), lin(x).double(), torch.float32, "to_linear")
    assert "d=4" in repr(layer) and "K=64" in repr(layer) and "scales=True" in repr(layer)


# ---- from_linear ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_from_linear_3bit_and_2bit_quality(backend):
    """Gaussian weights (the hardest case for VQ: no structure to exploit), 128 x 256.  The relative
    weight MSE must beat the optimal scalar (Lloyd-Max) Gaussian quantizer at the same rate, 0.0345 at
    3 bits and 0.1175 at 2 bits; measured 0.029 (3-bit, d=2 K=64) and 0.085 (2-bit, d=4 K=256), i.e.
    output relative errors 0.17 and 0.29."""
    lin = _gauss_linear(128, 256)
    x = torch.randn(64, 256)
    ref = lin(x).detach()
    W = lin.weight.detach().double()
    results = {}
    for bits, bound in ((3, 0.0345), (2, 0.1175)):
        q = VQLinear.from_linear(lin, bits=bits, iters=30, backend=backend)
        assert (q.d, q.K) == {3: (2, 64), 2: (4, 256)}[bits] and q.bits_per_weight == bits
        mse = float((q.dequantize().detach().double() - W).pow(2).sum() / W.pow(2).sum())
        out_err = rel_err(q(x), ref)
        results[bits] = (mse, out_err)
        assert mse < bound, f"{bits}-bit relative weight MSE {mse:.4f} >= scalar Lloyd-Max {bound}"
        assert out_err < math.sqrt(bound) + 0.02
        assert torch.equal(q.bias, lin.bias)
    assert results[3][0] < 0.5 * results[2][0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_linear_scales_help_rows_of_different_magnitude(backend):
    lin = _gauss_linear(64, 128, seed=3)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-1, 1, 64).unsqueeze(1))
    W = lin.weight.detach().double()
    errs = {}
    for s in (False, True):
        q = VQLinear.from_linear(lin, bits=2, scales=s, iters=20, backend=backend)
        assert (q.scales is not None) == s
        errs[s] = float((q.dequantize().detach().double() - W).pow(2).sum(1).div(W.pow(2).sum(1)).mean())
    assert errs[True] < 0.5 * errs[False], errs


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_linear_additive_and_per_set_codebooks(backend):
    lin = _gauss_linear(32, 64, seed=4)
    W = lin.weight.detach().double()
    one = VQLinear.from_linear(lin, bits=2, d=8, K=16, iters=20, backend=backend)
    two = VQLinear.from_linear(lin, bits=2, d=8, K=16, M=2, iters=20, backend=backend)
    sets = VQLinear.from_linear(lin, bits=2, d=8, K=16, rows_per_codebook=8, iters=20, backend=backend)
    assert tuple(two.codebooks.shape) == (1, 2, 16, 8) and tuple(sets.codebooks.shape) == (4, 1, 16, 8)
    e = {k: float((m.dequantize().detach().double() - W).pow(2).sum()) for k, m in (("1", one), ("2", two), ("s", sets))}
    assert e["2"] < e["1"] and e["s"] < e["1"], e


def test_from_linear_clamps_k_for_small_layers_unless_given():
    lin = _gauss_linear(16, 32)        # 512 weights, 128 sub-vectors of 4: K = 2^floor(log2(512/16)) = 32
    q = VQLinear.from_linear(lin, bits=2, iters=5, backend="torch")
    assert q.K == 32 and q.bits_per_weight == 1.25
    q = VQLinear.from_linear(lin, bits=2, K=64, iters=5, backend="torch")
    assert q.K == 64
    with pytest.raises(ValueError, match="K = 256 codewords exceed"):
        VQLinear.from_linear(nn.Linear(8, 8), bits=2, K=256, backend="torch")


# ---- padding ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_when_d_does_not_divide_in_features(backend, poison):
    lin = _gauss_linear(24, 30, seed=5)
    q = VQLinear.from_linear(lin, bits=2, iters=10, backend=backend)
    assert q.in_features == 30 and q.padded_in_features == 32 and tuple(q.codes.shape) == (24, 8, 1)
    assert q.dequantize().shape == (24, 30) and "padded_to=32" in repr(q)
    x = torch.randn(5, 30)
    assert_close(q(x), _ref_out(q, x), torch.float32, "padded forward")
    assert q.to_linear().weight.shape == (24, 30)
    with pytest.raises(ValueError, match="in_features = 30 is not a multiple of d = 4.*pad=True"):
        VQLinear(30, 24, d=4)
    VQLinear(30, 24, d=4, pad=True)
    with pytest.raises(ValueError, match="in_features=30"):
        q(torch.randn(5, 32))


# ---- state_dict ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,bits", [(dict(d=4, K=256), 8), (dict(d=8, K=65536), 16), (dict(d=2, K=64), 6),
                                      (dict(d=4, K=4096, M=2, scales=True), 12), (dict(d=1, K=3), 2)],
                         ids=["8bit", "16bit", "6bit", "12bit_M2", "2bit_K3"])
def test_state_dict_round_trip_restores_codes_exactly(fmt, bits):
    torch.manual_seed(2)
    a = VQLinear(40, 13, **fmt)
    if a.K == 65536:  # make sure codes >= 2^15 (stored negative) are there
        a.codes[0, 0, 0] = -1
    sd = a.state_dict()
    assert "codes" not in sd and sd["codes_packed"].dtype == torch.uint8
    assert sd["codes_packed"].numel() == packed_nbytes(a.codes.numel(), bits)
    assert sd["codes_format"].tolist() == [13, a.groups, a.M, a.K, bits]
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    b = VQLinear(40, 13, **fmt)      # other random codes and codebooks
    assert not torch.equal(a.codes, b.codes)
    b.load_state_dict(torch.load(buf))
    assert b.codes.dtype == a.codes.dtype and torch.equal(b.codes, a.codes)
    assert torch.equal(b.codebooks, a.codebooks) and torch.equal(b.bias, a.bias)
    x = torch.randn(3, 40)
    assert torch.equal(a(x), b(x))


def test_state_dict_of_2bit_4096_layer_is_under_a_seventh_of_fp16():
    """Real bytes: the torch.save of the state_dict (packed codes 4 MiB, fp32 codebook 4 KiB, fp32 bias
    16 KiB, codes_format, pickle overhead) against the fp16 weight's 32 MiB."""
    layer = VQLinear(4096, 4096, d=4, K=256)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    fp16_bytes = 4096 * 4096 * 2
    assert buf.getbuffer().nbytes <= fp16_bytes / 7, buf.getbuffer().nbytes / fp16_bytes
    tensor_bytes = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    assert tensor_bytes == 4096 * 1024 + 256 * 4 * 4 + 4096 * 4 + 5 * 8
    assert abs(layer.storage_bits_per_weight - 8 * tensor_bytes / 4096 ** 2) < 1e-12


def test_state_dict_mismatched_format_raises():
    a = VQLinear(32, 8, d=4, K=256)
    with pytest.raises(RuntimeError, match="codes_format.*K=256.*K=64"):
        VQLinear(32, 8, d=4, K=64).load_state_dict(a.state_dict())
    with pytest.raises(RuntimeError, match="out_features=8.*out_features=9"):
        VQLinear(32, 9, d=4, K=256).load_state_dict(a.state_dict())
    sd = a.state_dict()
    del sd["codes_packed"]
    with pytest.raises(RuntimeError, match="Missing key.*codes_packed"):
        VQLinear(32, 8, d=4, K=256).load_state_dict(sd)
    c = VQLinear(32, 8, d=4, K=200)
    sd = c.state_dict()
    sd["codes_packed"] = sd["codes_packed"].clone()
    sd["codes_packed"][5] = 250
    with pytest.raises(RuntimeError, match=r"codes_packed\[0, 5, 0\] = 250 is out of range.*K = 200"):
        VQLinear(32, 8, d=4, K=200).load_state_dict(sd)
    sd = a.state_dict()
    sd["codes_packed"] = sd["codes_packed"][:-1]
    with pytest.raises(RuntimeError, match="take 64 bytes, packed has 63"):
        VQLinear(32, 8, d=4, K=256).load_state_dict(sd)


def test_module_with_vq_layers_round_trips_through_state_dict():
    torch.manual_seed(3)
    m = nn.Sequential(VQLinear(16, 32, d=4, K=64), nn.ReLU(), VQLinear(32, 8, d=2, K=64, scales=True))
    m2 = nn.Sequential(VQLinear(16, 32, d=4, K=64), nn.ReLU(), VQLinear(32, 8, d=2, K=64, scales=True))
    m2.load_state_dict(m.state_dict())
    x = torch.randn(4, 16)
    assert torch.equal(m(x), m2(x))


# ---- set_codes_ -------------------------------------------------------------------------------------------
def test_set_codes_checks_and_keeps_buffer():
    layer = VQLinear(16, 4, d=4, K=100)
    buf = layer.codes
    new = torch.randint(0, 100, (4, 4))
    layer.set_codes_(new)             # (n_out, G) for M = 1, int64
    assert layer.codes is buf and torch.equal(layer.codes[..., 0].long(), new)
    with pytest.raises(ValueError, match=r"codes\[1, 2, 0\] = 100 is out of range.*K = 100"):
        bad = new.clone().unsqueeze(-1)
        bad[1, 2, 0] = 100
        layer.set_codes_(bad)
    with pytest.raises(ValueError, match=r"codes\[0, 0, 0\] = -1"):
        layer.set_codes_(torch.full((4, 4, 1), -1))
    with pytest.raises(TypeError, match="codes must be an integer tensor, got torch.float32"):
        layer.set_codes_(torch.zeros(4, 4, 1))
    with pytest.raises(ValueError, match=r"shape \(out_features, G, M\) = \(4, 4, 1\), got \(4, 5, 1\)"):
        layer.set_codes_(torch.zeros(4, 5, 1, dtype=torch.long))
    big = VQLinear(16, 4, d=8, K=65536)
    big.set_codes_(torch.full((4, 2, 1), -2, dtype=torch.int16))   # AQLM's storage of 65534
    assert int(unsigned_codes(big.codes).max()) == 65534
    big.set_codes_(torch.full((4, 2, 1), 65535))
    assert int(big.codes[0, 0, 0]) == -1


# ---- gradients -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_reach_codebooks_scales_bias_and_a_step_lowers_the_loss(backend):
    lin = _gauss_linear(24, 64, seed=6)
    layer = VQLinear.from_linear(lin, bits=2, d=4, K=32, scales=True, iters=10, backend=backend)
    x = torch.randn(32, 64)
    target = lin(x).detach()
    loss = (layer(x) - target).pow(2).mean()
    loss.backward()
    # float64 reference gradients through dequantize_reference
    leaves = [t.detach().double().requires_grad_() for t in (layer.codebooks, layer.scales, layer.bias)]
    W = dequantize_reference(layer.codes, leaves[0], leaves[1], layer.rows_per_codebook)
    ref_loss = (nn.functional.linear(x.double(), W, leaves[2]) - target.double()).pow(2).mean()
    ref_loss.backward()
    for p, r, name in zip((layer.codebooks, layer.scales, layer.bias), leaves, ("codebooks", "scales", "bias")):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert_close(p.grad, r.grad, torch.float32, f"d{name}")
    assert layer.codes.grad is None and not layer.codes.is_floating_point()
    codes = layer.codes.clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    opt.step()
    with torch.no_grad():
        after = (layer(x) - target).pow(2).mean()
    assert after < loss.detach(), (float(after), float(loss))
    assert torch.equal(layer.codes, codes)


# ---- bad arguments ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(d=3), ValueError, "d must be one of"),
    (dict(K=70000), ValueError, "K must be an int in"),
    (dict(K=0), ValueError, "K must be an int in"),
    (dict(M=0), ValueError, "M must be an int in"),
    (dict(M=17), ValueError, "M must be an int in"),
    (dict(rows_per_codebook=0), ValueError, "rows_per_codebook must be a positive int"),
    (dict(dtype=torch.int32), TypeError, "dtype must be"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(path="fast"), ValueError, "path must be one of"),
])
def test_vq_linear_bad_arguments(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        VQLinear(32, 8, **kwargs)


def test_vq_linear_bad_inputs():
    layer = VQLinear(32, 8, d=4, K=16)
    with pytest.raises(TypeError, match="x must be float"):
        layer(torch.zeros(2, 32, dtype=torch.long))
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        VQLinear.from_linear(layer)
    with pytest.raises(ValueError, match="bits must be one of"):
        VQLinear.from_linear(nn.Linear(32, 32), bits=5)
    with pytest.raises(ValueError, match="d must be one of"):
        VQLinear.from_linear(nn.Linear(32, 32), d=3)
