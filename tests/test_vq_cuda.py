"""The vq family on the GPU: the CUDA C++ backend (csrc/cuda/vq.cu) through the Python API
(kernelkit.vq.vq_linear, dequantize, assign) against the float64 oracle of python/kernelkit/vq/reference.py.
Marked `cuda`: skipped without a GPU, run on the device machine (the same kernels run without a GPU under
the host emulation in tests/test_vq_cuda_emu.py)."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import assert_close
from kernelkit.vq import assign, dequantize, vq_linear
from kernelkit.vq.reference import assign_reference, dequantize_reference, reference_bwd, reference_fwd

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["float32", "float16", "bfloat16"]


def _problem(n_out, n_in, d, K, M, batch, dtype, rpc=None, scales=True, bias=True, seed=0, device="cuda"):
    """codes (uint8 for K <= 256, else int16 with the values >= 2^15 negative), codebooks (S, M, K, d),
    scales, bias, x (all requiring grad) and dout, in dtype on the device."""
    g = torch.Generator().manual_seed(seed)
    rpc = rpc or n_out
    S = -(-n_out // rpc)
    u = torch.randint(0, K, (n_out, n_in // d, M), generator=g)
    codes = u.to(torch.uint8) if K <= 256 else torch.where(u >= 32768, u - 65536, u).to(torch.int16)
    cb = (torch.randn(S, M, K, d, generator=g) / math.sqrt(M)).to(device, dtype).requires_grad_()
    sc = (0.5 + torch.rand(n_out, generator=g)).to(device, dtype).requires_grad_() if scales else None
    b = torch.randn(n_out, generator=g).to(device, dtype).requires_grad_() if bias else None
    x = (torch.randn(batch, n_in, generator=g) / math.sqrt(n_in)).to(device, dtype).requires_grad_()
    dout = torch.randn(batch, n_out, generator=g).to(device, dtype)
    return codes.to(device), cb, sc, b, x, dout, rpc


def _reference(codes, cb, sc, b, x, dout, rpc):
    """out, dx, dcodebooks, dscales in float64 (on the device) from the same rounded inputs."""
    c64 = cb.detach().double()
    s64 = None if sc is None else sc.detach().double()
    b64 = None if b is None else b.detach().double()
    out = reference_fwd(x.detach().double(), codes, c64, s64, b64, rpc)
    dx, dcb, dsc = reference_bwd(x.detach().double(), codes, c64, s64, dout.double(), rpc)
    return out, dx, dcb, dsc


def _close(got, want, dtype, what):
    if want is None or want.numel() == 0:
        return
    if float(want.abs().max()) == 0.0:
        assert float(got.abs().max()) == 0.0, f"{what} must be zero"
        return
    assert_close(got, want, dtype, what)


def _run(shape, batch, dtype, path, rpc=None, scales=True, bias=True, seed=0):
    n_out, n_in, d, K, M = shape
    codes, cb, sc, b, x, dout, rpc = _problem(n_out, n_in, d, K, M, batch, dtype, rpc, scales, bias, seed)
    out = vq_linear(x, codes, cb, sc, b, rows_per_codebook=rpc, path=path, backend="cuda")
    out.backward(dout)
    torch.cuda.synchronize()
    ref_out, rdx, rdcb, rdsc = _reference(codes, cb, sc, b, x, dout, rpc)
    what = f"{shape} batch {batch} {path}"
    assert out.shape == (batch, n_out)
    _close(out, ref_out, dtype, f"{what} out")
    if batch == 0:
        assert cb.grad is None or float(cb.grad.abs().max()) == 0.0
        return
    _close(x.grad, rdx, dtype, f"{what} dx")
    _close(cb.grad, rdcb, dtype, f"{what} dcodebooks")
    if sc is not None:
        _close(sc.grad, rdsc, dtype, f"{what} dscales")
    if b is not None:
        _close(b.grad, dout.double().sum(0), dtype, f"{what} dbias")


# (n_out, n_in, d, K, M): the matrix (d in 2/4/8/16, K in 64/256/4096/65536, M in 1/2/8, odd n_out)
SHAPES = [
    (257, 512, 4, 256, 1),     # VQ4DiT 2-bit
    (129, 256, 2, 64, 1),      # VQ4DiT 3-bit
    (96, 512, 8, 256, 2),      # AQLM 2x8g8
    (64, 256, 8, 256, 8),      # AQLM 8x8
    (33, 256, 8, 65536, 1),    # AQLM 1x16g8 (int16 codes, codebook from cache)
    (65, 512, 16, 65536, 1),   # AQLM 1x16g16
    (31, 256, 16, 4096, 1),    # K = 4096
]
SHAPE_IDS = ["vq4dit-2bit", "vq4dit-3bit", "2x8g8", "8x8", "1x16g8", "1x16g16", "K4096"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("path", ["auto", "gemv", "gemm"])
@pytest.mark.parametrize("batch", [0, 1, 7, 16, 17, 300])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_cuda_vq_linear_matches_reference(poison, shape, batch, path, dtype):
    _run(shape, batch, dtype, path, seed=batch)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("batch", [3, 100])
def test_cuda_vq_linear_per_set_codebooks_and_no_scales(poison, batch, dtype):
    _run((150, 128, 4, 64, 2), batch, dtype, "auto", rpc=16, seed=1)
    _run((150, 128, 4, 64, 2), batch, dtype, "auto", rpc=1, seed=2)
    _run((75, 64, 8, 256, 1), batch, dtype, "auto", scales=False, bias=False, seed=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_vq_linear_large_layer(poison, dtype):
    """A 4096 x 4096 2-bit layer at batch 1 and 256: both paths at a real size."""
    for batch, path in ((1, "gemv"), (256, "gemm")):
        n_out, n_in, d, K, M = 4096, 4096, 4, 256, 1
        codes, cb, sc, b, x, dout, rpc = _problem(n_out, n_in, d, K, M, batch, dtype, seed=batch)
        out = vq_linear(x, codes, cb, sc, b, path=path, backend="cuda")
        ref = reference_fwd(x.detach().double(), codes, cb.detach().double(), sc.detach().double(),
                            b.detach().double(), rpc)
        _close(out, ref, dtype, f"4096x4096 batch {batch}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES[:5], ids=SHAPE_IDS[:5])
def test_cuda_dequantize_matches_reference(poison, shape, dtype):
    n_out, n_in, d, K, M = shape
    codes, cb, sc, _, _, _, rpc = _problem(n_out, n_in, d, K, M, 1, dtype, seed=4)
    w = dequantize(codes, cb.detach(), sc.detach(), rows_per_codebook=rpc, backend="cuda")
    ref = dequantize_reference(codes, cb.detach().double(), sc.detach().double(), rpc)
    _close(w, ref, dtype, "dequantize")


@pytest.mark.parametrize("n,K,d,topn", [(4096, 256, 4, 1), (1000, 64, 2, 3), (777, 4096, 8, 8), (50, 300, 24, 2)])
def test_cuda_assign_matches_reference(poison, n, K, d, topn):
    g = torch.Generator().manual_seed(n)
    V = torch.randn(n, d, generator=g).cuda()
    C = torch.randn(K, d, generator=g).cuda()
    idx, dist = assign(V, C, topn, backend="cuda")
    ridx, rdist = assign_reference(V.double(), C.double(), topn)
    d64 = ((V.double().unsqueeze(1) - C.double().unsqueeze(0)) ** 2).sum(-1)
    assert_close(dist, d64.gather(1, idx.long()), torch.float32, "dist at idx")
    assert_close(d64.gather(1, idx.long()), rdist, torch.float32, "nearest distances")
    agree = (idx == ridx).float().mean().item()
    assert agree > 0.99, f"only {agree:.3f} of the indices agree with the float64 reference"


# Small enough to run under compute-sanitizer (memcheck, racecheck, synccheck) on the device machine.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("path,batch", [("gemv", 3), ("gemv", 16), ("gemm", 40)])
@pytest.mark.parametrize("shape", [(37, 64, 4, 256, 1), (20, 32, 8, 65536, 1), (24, 64, 2, 64, 2)],
                         ids=["smem-codebook", "cached-codebook", "M2"])
def test_cuda_sanitizer_cases(shape, path, batch, dtype):
    _run(shape, batch, dtype, path, seed=batch)
    V = torch.randn(70, shape[2], device="cuda")
    C = torch.randn(40, shape[2], device="cuda")
    idx, _ = assign(V, C, 2, backend="cuda")
    torch.cuda.synchronize()
    assert (idx >= 0).all() and (idx < 40).all()
