"""The sparse family on the GPU: the CUDA C++ backend (csrc/cuda/sparse.cu) through the Python API
(kernelkit.sparse.sparse_linear, SparseLinear) against the float64 reference built from the dense W.
Marked `cuda`: skipped without a GPU, run by bench/device_check.sh on the device machine (the same
kernels run without a GPU under the host emulation in tests/test_sparse_cuda_emu.py).

min_sparsity=0 everywhere: below the backend's break-even sparsity sparse_linear would otherwise take
the dense path and the kernels would not run."""
from __future__ import annotations

import pytest
import torch

from helpers import assert_close
from kernelkit.sparse import SparseLayout, SparseLinear, sparse_linear

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["float32", "float16", "bfloat16"]


def _problem(n_out, n_in, sparsity, batch, dtype, seed=0, device="cuda"):
    """layout, values (requires grad), bias (requires grad), x (requires grad), dout, all in dtype on
    the device; the mask keeps each weight with probability 1 - sparsity (all or none at 0 and 1)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_out, n_in, generator=g) >= sparsity
    layout = SparseLayout.from_mask(mask.to(device))
    w = torch.randn(n_out, n_in, generator=g) / max(1.0, (1 - sparsity) * n_in) ** 0.5
    values = layout.values_from_dense(w.to(device, dtype)).detach().clone().requires_grad_()
    bias = torch.randn(n_out, generator=g).to(device, dtype).requires_grad_()
    x = torch.randn(batch, n_in, generator=g).to(device, dtype).requires_grad_()
    dout = torch.randn(batch, n_out, generator=g).to(device, dtype)
    return layout, values, bias, x, dout


def _reference(layout, values, bias, x, dout):
    """out, dx, dvalues (CSR order), dbias in float64 (on the inputs' device: the benchmark shapes
    would take seconds on the CPU), from the same rounded inputs the kernels see."""
    w64 = layout.to_dense(values.detach()).double()
    x64, d64 = x.detach().double(), dout.double()
    out = x64 @ w64.t() + bias.detach().double()
    return out, d64 @ w64, layout.values_from_dense(d64.t() @ x64), d64.sum(0)


def _check_all(got, want, dtype, what=""):
    for g, w, name in zip(got, want, ("out", "dx", "dvalues", "dbias")):
        if w.numel() == 0:
            assert g is None or g.numel() == 0 or float(g.abs().max()) == 0.0, f"{what} {name}"
            continue
        if name in ("dx", "dvalues") and float(w.abs().max()) == 0.0:  # batch 0 / empty W: exactly zero
            assert float(g.abs().max()) == 0.0, f"{what} {name} must be zero"
            continue
        assert_close(g, w, dtype, f"{what} {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("batch", [0, 1, 37, 2048])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("shape", [(96, 200), (257, 70)], ids=["96x200", "257x70"])
def test_cuda_sparse_linear_matches_reference(poison, shape, sparsity, batch, dtype):
    layout, values, bias, x, dout = _problem(*shape, sparsity, batch, dtype, seed=batch)
    out = sparse_linear(x, values, layout, bias, backend="cuda", min_sparsity=0.0)
    out.backward(dout)
    torch.cuda.synchronize()
    want = _reference(layout, values, bias, x, dout)
    if batch == 0:
        assert out.shape == (0, shape[0])
        assert values.grad is None or values.grad.numel() == 0 or float(values.grad.abs().max()) == 0.0
        return
    _check_all((out, x.grad, values.grad, bias.grad), want, dtype, f"sparsity {sparsity}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_sparse_linear_layer_and_from_linear(poison, dtype):
    torch.manual_seed(0)
    layer = SparseLinear(300, 200, bias=True, sparsity=0.9, device="cuda", dtype=dtype, backend="cuda",
                         min_sparsity=0.0)
    lin = torch.nn.Linear(300, 200, device="cuda", dtype=dtype)
    converted = SparseLinear.from_linear(lin, 0.9, backend="cuda", min_sparsity=0.0)
    for m in (layer, converted):
        x = torch.randn(3, 41, 300, device="cuda", dtype=dtype, requires_grad=True)  # batch dims flattened
        dout = torch.randn(3, 41, 200, device="cuda", dtype=dtype)
        out = m(x)
        out.backward(dout)
        want = _reference(m.layout, m.values, m.bias, x.reshape(-1, 300), dout.reshape(-1, 200))
        got = (out.reshape(-1, 200), x.grad.reshape(-1, 300), m.values.grad, m.bias.grad)
        _check_all(got, want, dtype, type(m).__name__)


def test_cuda_bench_shapes_bf16():
    """The issue's benchmark layers (4096x4096, 1024x4096, 4096x1024 at 90% sparsity, batch 2048) in
    bfloat16, forward and backward; the backward's value gradient runs the batch-split SDDMM."""
    for n_out, n_in in ((4096, 4096), (1024, 4096), (4096, 1024)):
        layout, values, bias, x, dout = _problem(n_out, n_in, 0.9, 2048, torch.bfloat16, seed=1)
        out = sparse_linear(x, values, layout, bias, backend="cuda", min_sparsity=0.0)
        out.backward(dout)
        torch.cuda.synchronize()
        want = _reference(layout, values, bias, x, dout)
        _check_all((out, x.grad, values.grad, bias.grad), want, torch.bfloat16, f"{n_out}x{n_in}")


def test_cuda_backward_is_deterministic():
    """No float atomics: the batch-split SDDMM adds its partials in a fixed order, so two runs agree
    bit for bit."""
    layout, values, bias, x, dout = _problem(512, 384, 0.9, 1500, torch.float32, seed=2)
    grads = []
    for _ in range(2):
        values.grad = x.grad = None
        sparse_linear(x, values, layout, bias, backend="cuda", min_sparsity=0.0).backward(dout)
        grads.append((values.grad.clone(), x.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_cuda_backend_respects_the_current_stream():
    layout, values, bias, x, _ = _problem(256, 512, 0.9, 4096, torch.float32, seed=3)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = sparse_linear(x.detach(), values.detach(), layout, bias.detach(), backend="cuda", min_sparsity=0.0)
    s.synchronize()
    w64 = layout.to_dense(values.detach()).double()
    assert_close(out, x.detach().double() @ w64.t() + bias.detach().double(), torch.float32, "stream")


# Small enough to run under compute-sanitizer (memcheck, racecheck, synccheck) in bench/device_check.sh
# within its budget, yet covering on a 132-SM H100/H200: the vec SpMM and SDDMM (batch 5); the tiled
# SpMM with 2 rows per warp and the direct SDDMM (batch 100); 8 rows per warp and the batch-split
# SDDMM (4096 rows, batch 600); more SDDMM tiles than splits (float32, batch 2100); an empty weight.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape,sparsity,batch", [((33, 70), 0.8, 5), ((150, 90), 0.85, 100),
                                                  ((4096, 64), 0.9, 600), ((8, 24), 0.7, 2100),
                                                  ((20, 40), 1.0, 50)])
def test_cuda_sanitizer_cases(shape, sparsity, batch, dtype):
    layout, values, bias, x, dout = _problem(*shape, sparsity, batch, dtype, seed=5)
    out = sparse_linear(x, values, layout, bias, backend="cuda", min_sparsity=0.0)
    out.backward(dout)
    torch.cuda.synchronize()
    _check_all((out, x.grad, values.grad, bias.grad), _reference(layout, values, bias, x, dout), dtype, "sanitizer")
