"""Monarch on the GPU: the CUDA C++ and Triton backends against the float64 reference.
Marked `cuda`: skipped without a GPU, run by bench/device_check.sh on the device machine."""
from __future__ import annotations

import pytest
import torch

import kernelkit
from kernelkit.monarch import MonarchLinear, monarch_matmul, monarch_reference
from helpers import assert_close

pytestmark = pytest.mark.cuda

SHAPES = [(4, 6, 5, 3, 7, 8), (3, 10, 7, 5, 9, 6), (4, 33, 17, 4, 33, 33), (16, 8, 8, 16, 12, 8),
          (4, 64, 64, 4, 64, 64), (4, 256, 256, 4, 1024, 256)]
GPU_BACKENDS = ["cuda", "triton"]


def _data(shape, dtype, batch, seed=0):
    k, q, p, l, s, r = shape
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(*sz, generator=g, dtype=torch.float64) for sz in ((batch, k * p), (k, q, p), (l, s, r), (batch, l * s))]
    return ts, [t.to("cuda", dtype) for t in ts]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [0, 1, 37, 1000])
@pytest.mark.parametrize("shape", SHAPES)
def test_gpu_backend_matches_reference(poison, shape, batch, dtype, backend):
    (x64, w164, w264, d64), (x, w1, w2, dout) = _data(shape, dtype, batch)
    # the reference sees the same rounded inputs the kernel sees
    x64, w164, w264, d64 = (t.double().cpu().requires_grad_() for t in (x, w1, w2, dout))
    leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]
    out = monarch_matmul(*leaves, backend=backend)
    out.backward(dout)
    torch.cuda.synchronize()
    ref = monarch_reference(x64, w164, w264)
    ref.backward(d64.detach())
    if batch == 0:
        assert out.shape[0] == 0 and float(leaves[1].grad.abs().max()) == 0.0
        return
    assert_close(out, ref, dtype, f"{backend} out")
    for got, want, what in zip((t.grad for t in leaves), (x64.grad, w164.grad, w264.grad), ("dx", "dw1", "dw2")):
        assert_close(got, want, dtype, f"{backend} {what}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backend_bench_shape_4096(poison, backend):
    """The benchmark's largest layer (4096 -> 4096, nb4) in bf16, forward and backward."""
    torch.manual_seed(0)
    layer = MonarchLinear(4096, 4096, nblocks=4, device="cuda", dtype=torch.bfloat16, backend=backend)
    x = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    out.float().pow(2).mean().backward()
    ref = monarch_reference(x.detach().double(), layer.blkdiag1.detach().double(), layer.blkdiag2.detach().double())
    assert_close(out - layer.bias, ref, torch.bfloat16, backend)
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.blkdiag1.grad).all()


def test_gpu_default_backend_and_compile():
    assert kernelkit.backends("cuda")["triton"] == "available"
    assert kernelkit.backends("cuda")["cuda"] == "available"
    (_, _, _, _), (x, w1, w2, dout) = _data((4, 6, 5, 3, 7, 8), torch.float32, 33)
    for backend in GPU_BACKENDS:
        torch.library.opcheck(torch.ops.kernelkit.monarch_fwd, (x.requires_grad_(), w1.requires_grad_(), w2, backend))
        torch.library.opcheck(torch.ops.kernelkit.monarch_bwd, (x.detach(), w1.detach(), w2, dout, backend, True, True, True))
    fn = torch.compile(lambda a, b, c: monarch_matmul(a, b, c).sum(), fullgraph=True)
    fn(x, w1, w2).backward()
    assert torch.isfinite(x.grad).all()


def test_cuda_backend_respects_the_current_stream():
    (_, _, _, _), (x, w1, w2, _) = _data((4, 64, 64, 4, 64, 64), torch.float32, 4096)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = monarch_matmul(x, w1, w2, backend="cuda")
    s.synchronize()
    assert_close(out, monarch_reference(x.double(), w1.double(), w2.double()), torch.float32, "stream")


# Small enough to run under compute-sanitizer (memcheck, racecheck, synccheck) in bench/device_check.sh
# within its budget, yet covering the forward's cached and recomputing plans and the batch-split
# backward (batch >= 1024).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape,batch", [((4, 6, 5, 3, 7, 8), 37), ((16, 8, 8, 16, 12, 8), 17),
                                         ((2, 16, 9, 8, 40, 4), 300), ((4, 6, 5, 3, 7, 8), 1100)])
def test_cuda_sanitizer_cases(shape, batch, dtype):
    (_, _, _, _), (x, w1, w2, dout) = _data(shape, dtype, batch, seed=5)
    x64, w164, w264, d64 = (t.double().cpu() for t in (x, w1, w2, dout))
    leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]
    out = monarch_matmul(*leaves, backend="cuda")
    out.backward(dout)
    torch.cuda.synchronize()
    assert_close(out, monarch_reference(x64, w164, w264), dtype, "out")
    from kernelkit.monarch.reference import monarch_reference_bwd
    for got, want, what in zip((t.grad for t in leaves), monarch_reference_bwd(x64, w164, w264, d64), ("dx", "dw1", "dw2")):
        assert_close(got, want, dtype, what)
