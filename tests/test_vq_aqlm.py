"""VQLinear.from_aqlm: real aqlm.QuantizedLinear layers of the published formats (1x16g8, 2x8g8, 8x8,
1x16g16, 1x8g8) with random codes and codebooks give the outputs of AQLM's own forward and of
F.linear(x, scale * sum_m C_m[code], bias) in float64; AQLM's in-place CPU permutation of the codes is
undone; tensor dicts / tuples; out_group_size > 1 and other bad inputs raise naming the argument."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kernelkit import _lib
from kernelkit.vq import VQLinear, from_aqlm
from helpers import assert_close

aqlm = pytest.importorskip("aqlm")


def _cpu_vq() -> bool:
    return _lib.cpu_library_error() is None and hasattr(_lib.C(), "vq_linear_fwd_cpu")


BACKENDS = [pytest.param("cpu", marks=pytest.mark.skipif(not _cpu_vq(), reason="kernelkit._C without the vq kernels")),
            "torch"]

# name: (num_codebooks, nbits_per_codebook, in_group_size)
FORMATS = {"1x16g8": (1, 16, 8), "2x8g8": (2, 8, 8), "8x8": (8, 8, 8), "1x16g16": (1, 16, 16), "1x8g8": (1, 8, 8)}


@pytest.fixture(autouse=True)
def _numba_one_thread():
    """AQLM's numba CPU kernel adds into shared outputs from parallel threads (a race: 1-9% error with 2
    threads, issue 7); its own forward is only a valid reference single-threaded."""
    numba = pytest.importorskip("numba")
    prev = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(prev)


def _aqlm_layer(M, nbits, ig, n_out=24, n_in=128, seed=0, bias=True, ogs=1):
    g = torch.Generator().manual_seed(seed)
    layer = aqlm.QuantizedLinear(n_in, n_out, in_group_size=ig, out_group_size=ogs, num_codebooks=M,
                                 nbits_per_codebook=nbits, bias=bias)
    K = 1 << nbits
    with torch.no_grad():
        codes = torch.randint(-(K // 2), K // 2, tuple(layer.codes.shape), generator=g)  # AQLM's signed storage
        layer.codes.copy_(codes.to(layer.codes.dtype))
        layer.codebooks.copy_(torch.randn(tuple(layer.codebooks.shape), generator=g) / M ** 0.5)
        layer.scales.copy_(torch.rand(tuple(layer.scales.shape), generator=g) + 0.5)
        if bias:
            layer.bias.copy_(torch.randn(n_out, generator=g))
    return layer


def _reference(codes, codebooks, scales, bias, x):
    """float64 F.linear(x, scale * sum_m C_m[code], bias) from AQLM's (unpermuted) tensors."""
    M, K, _, ig = codebooks.shape
    c = codes.long() % K                                               # AQLM's unpack_int_data
    words = codebooks.double()[torch.arange(M).view(1, 1, M), c, 0]    # (out, G, M, ig)
    W = words.sum(2).reshape(codes.shape[0], -1) * scales.double().reshape(-1, 1)
    return nn.functional.linear(x.double(), W, None if bias is None else bias.double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FORMATS))
def test_from_aqlm_matches_aqlm_forward_and_reference(name, backend, poison):
    M, nbits, ig = FORMATS[name]
    layer = _aqlm_layer(M, nbits, ig, seed=len(name))
    tensors = [t.detach().clone() for t in (layer.codes, layer.codebooks, layer.scales, layer.bias)]
    ours = VQLinear.from_aqlm(layer, backend=backend)
    assert (ours.d, ours.K, ours.M, ours.in_features, ours.out_features) == (ig, 1 << nbits, M, 128, 24)
    assert ours.codes.dtype == (torch.uint8 if nbits <= 8 else torch.int16)
    if nbits in (8, 16):   # same bits as AQLM's int8 / int16 storage
        assert torch.equal(ours.codes.view(torch.int8 if nbits == 8 else torch.int16), tensors[0])
    x = torch.randn(5, 128)
    ref = _reference(*tensors, x)
    assert_close(ours(x), ref, torch.float32, f"{name} kernelkit")
    theirs = layer(x)                      # AQLM's own CPU forward (numba LUT for K = 256)
    assert_close(theirs, ref, torch.float32, f"{name} AQLM")
    assert_close(ours(x), theirs.double(), torch.float32, f"{name} kernelkit vs AQLM")
    x9 = torch.randn(9, 128)                # past AQLM's GEMV rule (<= 6 rows) and kernelkit's GEMV path
    assert_close(ours(x9), _reference(*tensors, x9), torch.float32, f"{name} kernelkit batch 9")
    assert_close(layer(x9), _reference(*tensors, x9), torch.float32, f"{name} AQLM batch 9")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,n_out", [("1x8g8", 24), ("2x8g8", 24), ("1x8g8", 16)],
                         ids=["1x8g8", "2x8g8", "1x8g8_square"])
def test_from_aqlm_undoes_the_cpu_permutation(name, n_out, backend):
    """After one CPU forward, AQLM holds K = 256 codes as [G, out, M].  n_out = 16 with 128 inputs in
    groups of 8 makes the permuted shape equal to the original one (detected from the layer's state)."""
    M, nbits, ig = FORMATS[name]
    layer = _aqlm_layer(M, nbits, ig, n_out=n_out, seed=3)
    tensors = [t.detach().clone() for t in (layer.codes, layer.codebooks, layer.scales, layer.bias)]
    x = torch.randn(3, 128)
    theirs = layer(x)
    assert not torch.equal(layer.codes, tensors[0])                    # AQLM did permute them
    assert torch.equal(layer.codes, tensors[0].permute(1, 0, 2))
    ours = VQLinear.from_aqlm(layer, backend=backend)
    assert torch.equal(ours.codes.view(torch.int8), tensors[0])
    ref = _reference(*tensors, x)
    assert_close(ours(x), ref, torch.float32, f"{name} permuted")
    assert_close(theirs, ref, torch.float32, "AQLM after permuting")
    # a state_dict saved after the permutation: the shape tells when out != G; else say so
    sd = {k: v.detach() for k, v in layer.state_dict().items()}
    if n_out != 16:
        assert torch.equal(from_aqlm(sd, backend=backend).codes.view(torch.int8), tensors[0])
    else:
        assert torch.equal(from_aqlm(sd, backend=backend, permuted=True).codes.view(torch.int8), tensors[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_aqlm_dict_and_tuple(backend):
    layer = _aqlm_layer(2, 8, 8, seed=5)
    sd = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 128)
    ref = _reference(sd["codes"], sd["codebooks"], sd["scales"], sd["bias"], x)
    assert_close(from_aqlm(sd, backend=backend)(x), ref, torch.float32, "dict")
    t = from_aqlm((sd["codes"], sd["codebooks"], sd["scales"], sd["bias"]), backend=backend)
    assert_close(t(x), ref, torch.float32, "tuple")
    nob = from_aqlm((sd["codes"], sd["codebooks"], sd["scales"]), backend=backend)
    assert nob.bias is None
    assert_close(nob(x), ref - sd["bias"].double(), torch.float32, "no bias")
    # loaded into kernelkit's own format it survives a state_dict round trip (packed codes)
    again = VQLinear(128, 24, d=8, K=256, M=2, scales=True, backend=backend)
    again.load_state_dict(t.state_dict())
    assert torch.equal(again(x), t(x))


def test_from_aqlm_small_nbits_reads_codes_modulo_k():
    """nbits < 8 (int8 storage, K = 16): AQLM stores codes >= 8 as code - 16 and reads them modulo 16."""
    layer = _aqlm_layer(1, 4, 8, seed=6)
    assert int(layer.codes.min()) < 0
    ours = from_aqlm(layer, backend="torch")
    assert ours.K == 16 and int(ours.codes.max()) < 16
    x = torch.randn(2, 128)
    assert_close(ours(x), _reference(layer.codes, layer.codebooks, layer.scales, layer.bias, x), torch.float32, "4-bit")


def test_from_aqlm_out_group_size_raises():
    layer = _aqlm_layer(1, 8, 8, ogs=2)
    with pytest.raises(ValueError, match=r"out_group_size = 2 \(codebooks.shape\[2\]\) is not supported"):
        VQLinear.from_aqlm(layer)


def test_from_aqlm_bad_inputs():
    layer = _aqlm_layer(2, 8, 8, seed=7)
    c, cb, s, b = (t.detach().clone() for t in (layer.codes, layer.codebooks, layer.scales, layer.bias))
    bad16 = c.to(torch.int16)
    bad16[1, 2, 0] = 300
    cases = [
        ((c.float(), cb, s, b), TypeError, "codes must be an integer tensor"),
        ((c, cb.long(), s, b), TypeError, "codebooks must be a floating-point tensor"),
        ((c[..., :1], cb, s, b), ValueError, r"codes must be \[out_features, in_features / in_group_size, M = 2\]"),
        ((bad16, cb, s, b), ValueError, r"codes\[1, 2, 0\] = 300 is out of range for 8-bit codes"),
        ((c, cb[..., :3], s, b), ValueError, r"in_group_size = 3 \(codebooks.shape\[3\]\) is not supported"),
        ((c, cb[:, :100], s, b), ValueError, r"codebook_size = 100 \(codebooks.shape\[1\]\) must be 2\^nbits"),
        ((c, cb, s[:5], b), ValueError, r"do not match out_features = 5"),
        ((c, cb, s, b[:5]), ValueError, "bias must have out_features = 24 entries"),
        ((c, cb[0], s, b), ValueError, "codebooks must be 4-D"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            from_aqlm(args)
    with pytest.raises(TypeError, match="codes of dtype torch.int8 cannot hold 16-bit codes"):
        from_aqlm((c[..., :1].to(torch.int8), torch.randn(1, 65536, 1, 8), s, b))
    with pytest.raises(TypeError, match="must be an aqlm.QuantizedLinear, a dict or a tuple"):
        from_aqlm("layer")
    with pytest.raises(TypeError, match="without AQLM's tensor attribute"):
        from_aqlm(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="unknown key"):
        from_aqlm({"codes": c, "codebooks": cb, "weight": s})
