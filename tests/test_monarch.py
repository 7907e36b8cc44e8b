"""Monarch op: every backend that runs here against the float64 reference, gradients, custom-op
registration (opcheck, torch.compile), backend selection and bad input."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

import kernelkit
from kernelkit.monarch import monarch_matmul, monarch_reference, monarch_shapes
from kernelkit.monarch.reference import monarch_reference_bwd
from helpers import assert_close, rel_err

# (k, q, p, l, s, r), l*r == k*q: odd sizes, sizes not multiple of the register/tile blocks,
# q % l != 0, q < l, and MonarchLinear-like rectangular shapes.
SHAPES = [
    (4, 6, 5, 3, 7, 8),
    (2, 8, 3, 4, 5, 4),
    (3, 10, 7, 5, 9, 6),
    (4, 25, 25, 4, 10, 25),     # MonarchLinear(100 -> 37, nb4)
    (4, 33, 17, 4, 33, 33),
    (16, 8, 8, 16, 12, 8),      # many small blocks (nb16)
    (16, 48, 48, 16, 48, 48),   # N = 48: the narrow (NV = 1) micro-tile in every stage
    (2, 8, 600, 4, 520, 4),     # K = p = 600 and K = s = 520 > 512: packed (not in-place) A operands
    (1, 2, 3, 2, 3, 1),
]
BATCHES = [0, 1, 37, 300]
CPU_BACKENDS = ["torch", "cpu"]


def _factors(shape, dtype, device="cpu", batch=5, seed=0):
    k, q, p, l, s, r = shape
    g = torch.Generator().manual_seed(seed)
    mk = lambda *sz: torch.randn(*sz, generator=g, dtype=torch.float64)  # noqa: E731
    x, w1, w2, dout = mk(batch, k * p), mk(k, q, p), mk(l, s, r), mk(batch, l * s)
    return [t.to(device=device, dtype=dtype) for t in (x, w1, w2, dout)]


def _ref_grads(x, w1, w2, dout):
    leaves = [t.detach().double().cpu().requires_grad_() for t in (x, w1, w2)]
    out = monarch_reference(*leaves)
    out.backward(dout.detach().double().cpu())
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES)
def test_monarch_fwd_bwd_match_reference(poison, shape, batch, dtype, backend):
    x, w1, w2, dout = _factors(shape, dtype, batch=batch, seed=batch)
    xs, w1s, w2s = (t.clone().requires_grad_() for t in (x, w1, w2))
    out = monarch_matmul(xs, w1s, w2s, backend=backend)
    out.backward(dout)
    ref, (gx, g1, g2) = _ref_grads(x, w1, w2, dout)
    if batch == 0:
        assert out.shape == (0, shape[3] * shape[4])
        assert w1s.grad.abs().max() == 0 and w2s.grad.abs().max() == 0
        return
    assert_close(out, ref, dtype, "out")
    assert_close(xs.grad, gx, dtype, "dx")
    assert_close(w1s.grad, g1, dtype, "dw1")
    assert_close(w2s.grad, g2, dtype, "dw2")


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_monarch_cpu_every_isa_variant_matches_reference(poison, monkeypatch, isa):
    """The CPU kernels are compiled once per ISA; KERNELKIT_CPU_ISA caps the one used."""
    monkeypatch.setenv("KERNELKIT_CPU_ISA", isa)
    for shape, batch in [(sh, b) for sh in SHAPES[:5] for b in (2, 53)]:  # small-batch and tiled paths
        x, w1, w2, dout = _factors(shape, torch.float32, batch=batch)
        xs, w1s, w2s = (t.clone().requires_grad_() for t in (x, w1, w2))
        out = monarch_matmul(xs, w1s, w2s, backend="cpu")
        out.backward(dout)
        ref, grads = _ref_grads(x, w1, w2, dout)
        for got, want, what in zip((out, xs.grad, w1s.grad, w2s.grad), (ref, *grads), ("out", "dx", "dw1", "dw2")):
            assert_close(got, want, torch.float32, f"{isa} {shape} {what}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_monarch_cpu_small_batch_path(poison, dtype):
    """Batches up to two vectors wide take the unpacked small-batch forward (one or two vectors
    per row of the register tile); 33 is past it for float32 on every ISA."""
    for shape in [(4, 160, 129, 5, 128, 128), (16, 48, 48, 16, 48, 48), (3, 10, 7, 5, 9, 6)]:
        for batch in (1, 5, 8, 9, 16, 17, 20, 32, 33):
            x, w1, w2, _ = _factors(shape, dtype, batch=batch)
            ref = monarch_reference(x.double(), w1.double(), w2.double())
            assert_close(monarch_matmul(x, w1, w2, backend="cpu"), ref, dtype, f"{shape} B={batch}")


def test_monarch_cpu_small_batch_path_several_panels_for_big_weights(poison):
    """Weights over 8 MB keep the in-place-weights forward up to four batch panels."""
    shape = (4, 520, 512, 4, 520, 520)
    for batch in (40, 100, 128):
        x, w1, w2, _ = _factors(shape, torch.float32, batch=batch)
        ref = monarch_reference(x.double(), w1.double(), w2.double())
        assert_close(monarch_matmul(x, w1, w2, backend="cpu"), ref, torch.float32, f"B={batch}")


def test_monarch_cpu_large_batch_uses_tile_parallel_path(poison):
    """Enough rows that the forward gives whole batch tiles to threads (many tiles)."""
    shape = (4, 16, 16, 4, 16, 16)
    x, w1, w2, _ = _factors(shape, torch.float32, batch=20000)
    assert_close(monarch_matmul(x, w1, w2, backend="cpu"), monarch_reference(x.double(), w1.double(), w2.double()),
                 torch.float32, "out")


def test_monarch_leading_dims_and_strided_input(poison):
    shape = (4, 6, 5, 3, 7, 8)
    _, w1, w2, _ = _factors(shape, torch.float64)
    base = torch.randn(3, 4, 2 * 20, dtype=torch.float64)
    x = base[..., ::2]                                   # inner stride 2: copied to rows
    xt = torch.randn(20, 12, dtype=torch.float64).T      # transposed
    for backend in CPU_BACKENDS:
        assert_close(monarch_matmul(x, w1, w2, backend=backend), monarch_reference(x, w1, w2), torch.float64, backend)
        assert_close(monarch_matmul(xt, w1, w2, backend=backend), monarch_reference(xt, w1, w2), torch.float64, backend)
    wide = torch.randn(9, 31, dtype=torch.float64)[:, 3:23]  # row stride 31 > width 20: used in place
    assert_close(monarch_matmul(wide, w1, w2, backend="cpu"), monarch_reference(wide, w1, w2), torch.float64, "rows")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_monarch_gradcheck_float64(backend):
    x, w1, w2, _ = _factors((3, 4, 5, 2, 3, 6), torch.float64, batch=4)
    inputs = tuple(t.requires_grad_() for t in (x, w1, w2))
    assert torch.autograd.gradcheck(lambda a, b, c: monarch_matmul(a, b, c, backend=backend), inputs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_monarch_gradgradcheck_float64(backend):
    """Double backward (the backward op is differentiable through the same ops)."""
    x, w1, w2, _ = _factors((3, 4, 5, 2, 3, 6), torch.float64, batch=4)
    inputs = tuple(t.requires_grad_() for t in (x, w1, w2))
    assert torch.autograd.gradgradcheck(lambda a, b, c: monarch_matmul(a, b, c, backend=backend), inputs)


def test_monarch_partial_gradients():
    x, w1, w2, dout = _factors((4, 6, 5, 3, 7, 8), torch.float64, batch=6)
    w1.requires_grad_()
    out = monarch_matmul(x, w1, w2, backend="cpu")
    (g1,) = torch.autograd.grad(out, (w1,), dout)
    _, (_, r1, _) = _ref_grads(x, w1, w2, dout)
    assert rel_err(g1, r1) < 1e-12 and x.grad is None


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
def test_monarch_opcheck(backend):
    if backend == "triton" and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("triton on CPU tensors needs the interpreter (GPU: tests/test_monarch_cuda.py)")
    x, w1, w2, dout = _factors((3, 4, 5, 2, 3, 6), torch.float64, batch=7)
    torch.library.opcheck(torch.ops.kernelkit.monarch_fwd, (x.requires_grad_(), w1.requires_grad_(), w2, backend))
    for need in [(True, True, True), (False, True, False), (True, False, True)]:
        torch.library.opcheck(torch.ops.kernelkit.monarch_bwd, (x.detach(), w1.detach(), w2, dout, backend, *need))


def test_monarch_torch_compile_fullgraph_fwd_bwd():
    torch._dynamo.reset()
    x, w1, w2, dout = _factors((4, 6, 5, 3, 7, 8), torch.float32, batch=11)
    leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]
    fn = torch.compile(lambda a, b, c: torch.tanh(monarch_matmul(a, b, c)), fullgraph=True)
    out = fn(*leaves)
    out.backward(dout)
    ref_leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]
    ref = torch.tanh(monarch_reference(*ref_leaves))
    ref.backward(dout)
    assert_close(out, ref, torch.float32, "compiled out")
    for a, b in zip(leaves, ref_leaves):
        assert_close(a.grad, b.grad, torch.float32, "compiled grad")


def test_monarch_triton_backend_through_the_op(poison):
    """The op-level Triton path (forced; interpreter on CPU), forward and backward."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, w1, w2, dout = _factors((4, 6, 5, 3, 7, 8), torch.float32, device=dev, batch=19)
    leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]
    out = monarch_matmul(*leaves, backend="triton")
    out.backward(dout)
    ref, grads = _ref_grads(x, w1, w2, dout)
    for got, want in zip((out, *(t.grad for t in leaves)), (ref, *grads)):
        assert_close(got, want, torch.float32, "triton")


def test_monarch_follows_autocast_like_f_linear():
    x, w1, w2, dout = _factors((4, 25, 25, 4, 10, 25), torch.float32, batch=9)
    w1.requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kernelkit.KernelkitFallbackWarning)  # bf16 runs on torch here
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = monarch_matmul(x, w1, w2)
            dense = torch.nn.functional.linear(x, torch.randn(3, x.shape[1]))
    assert out.dtype == dense.dtype == torch.bfloat16
    assert_close(out, monarch_reference(x.double(), w1.double(), w2.double()), torch.bfloat16, "autocast")
    out.float().backward(dout)
    assert w1.grad.dtype == torch.float32 and torch.isfinite(w1.grad).all()


def test_monarch_gradcheck_float64_triton_interpreted():
    """gradcheck through the Triton kernels (interpreter on CPU; float64 tl.dot)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("float64 Triton gradcheck runs under the interpreter only")
    x, w1, w2, _ = _factors((3, 4, 5, 2, 3, 6), torch.float64, batch=4)
    inputs = tuple(t.requires_grad_() for t in (x, w1, w2))
    assert torch.autograd.gradcheck(lambda a, b, c: monarch_matmul(a, b, c, backend="triton"), inputs)


def test_reference_bwd_matches_autograd():
    x, w1, w2, dout = _factors((3, 10, 7, 5, 9, 6), torch.float64, batch=8)
    _, grads = _ref_grads(x, w1, w2, dout)
    for got, want in zip(monarch_reference_bwd(x, w1, w2, dout), grads):
        assert rel_err(got, want) < 1e-13


# ---- backend selection ------------------------------------------------------------------------

def test_default_backend_on_cpu_is_the_cpp_kernel(monkeypatch):
    monkeypatch.delenv("KERNELKIT_BACKEND", raising=False)
    x, w1, w2, _ = _factors((2, 8, 3, 4, 5, 4), torch.float32)
    from kernelkit import _backend
    from kernelkit.monarch.ops import _supports
    assert _backend.select("t", x.device, None, _supports(x.dtype)) == "cpu"
    assert kernelkit.backends("cpu")["cpu"] == "available"
    assert "GPU" in kernelkit.backends("cpu")["cuda"] or torch.cuda.is_available()


def test_backend_forced_by_env_and_context(monkeypatch):
    from kernelkit import _backend
    from kernelkit.monarch.ops import _supports
    dev = torch.device("cpu")
    monkeypatch.setenv("KERNELKIT_BACKEND", "torch")
    assert _backend.select("t", dev, None, _supports(torch.float32)) == "torch"
    with kernelkit.backend("cpu"):  # the context beats the environment
        assert _backend.select("t", dev, None, _supports(torch.float32)) == "cpu"
        assert _backend.select("t", dev, "torch", _supports(torch.float32)) == "torch"  # the argument beats both
    monkeypatch.setenv("KERNELKIT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="KERNELKIT_BACKEND"):
        _backend.select("t", dev, None, _supports(torch.float32))


def test_forced_backend_that_cannot_run_raises_with_reason():
    x, w1, w2, _ = _factors((2, 8, 3, 4, 5, 4), torch.float32)
    with pytest.raises(kernelkit.BackendUnavailableError, match="cuda"):
        monarch_matmul(x, w1, w2, backend="cuda") if not torch.cuda.is_available() else (_ for _ in ()).throw(
            kernelkit.BackendUnavailableError("cuda: skipped on GPU"))
    xh, w1h, w2h = (t.half() for t in (x, w1, w2))
    with pytest.raises(kernelkit.BackendUnavailableError, match="float16"):
        monarch_matmul(xh, w1h, w2h, backend="cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        monarch_matmul(x, w1, w2, backend="gpu")


def test_unsupported_dtype_falls_back_with_a_warning(monkeypatch):
    monkeypatch.delenv("KERNELKIT_BACKEND", raising=False)
    from kernelkit import _backend
    _backend._warned.clear()
    x, w1, w2, _ = _factors((2, 8, 3, 4, 5, 4), torch.bfloat16)
    with pytest.warns(kernelkit.KernelkitFallbackWarning, match="cpu: dtype torch.bfloat16 not supported"):
        out = monarch_matmul(x, w1, w2)
    ref = monarch_reference(x.double(), w1.double(), w2.double())
    assert_close(out, ref, torch.bfloat16, "bf16 fallback")


# ---- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("make, exc, match", [
    (lambda x, w1, w2: (x[:, :-1], w1, w2), ValueError, r"x.shape\[-1\] must equal"),
    (lambda x, w1, w2: (x, w1[:, :-1], w2), ValueError, r"w2 must consume w1's output"),
    (lambda x, w1, w2: (x, w1[0], w2), ValueError, r"w1 must be 3-D"),
    (lambda x, w1, w2: (x, w1, w2.unsqueeze(0)), ValueError, r"w2 must be 3-D"),
    (lambda x, w1, w2: (x.double(), w1, w2), TypeError, r"w1 has dtype torch.float32 but x has torch.float64"),
    (lambda x, w1, w2: (x.long(), w1, w2), TypeError, r"x must be float32"),
    (lambda x, w1, w2: (x.numpy(), w1, w2), TypeError, r"x must be a torch.Tensor"),
    (lambda x, w1, w2: (x, w1, w2.to("meta")), ValueError, r"w2 is on meta but x is on cpu"),
    (lambda x, w1, w2: (x, w1[:, :, :0], w2), ValueError, r"no empty dimension"),
])
def test_monarch_bad_input_names_the_argument(make, exc, match):
    x, w1, w2, _ = _factors((2, 8, 3, 4, 5, 4), torch.float32)
    with pytest.raises(exc, match=match):
        monarch_matmul(*make(x, w1, w2))


def test_monarch_nan_and_inf_propagate():
    """Documented: NaN/inf are not rejected; they reach exactly the outputs they feed."""
    x, w1, w2, _ = _factors((4, 6, 5, 3, 7, 8), torch.float64, batch=3)
    x[1, 0] = float("nan")
    out = monarch_matmul(x, w1, w2, backend="cpu")
    ref = monarch_reference(x, w1, w2)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all() and torch.isnan(out[1]).any()


def test_monarch_shapes_match_fly_table():
    # ../shared/papers/monarch.md, "Verified shapes"
    assert monarch_shapes(1024, 4096, 4)[:2] == ((4, 256, 256), (4, 1024, 256))
    assert monarch_shapes(4096, 1024, 4)[:2] == ((4, 256, 1024), (4, 256, 256))
    assert monarch_shapes(768, 768, 4)[:2] == ((4, 192, 192), (4, 192, 192))


def test_poison_fixture_really_poisons(poison):
    """Guards the guard: outputs allocated by the ops start as NaN under the fixture."""
    assert torch.isnan(torch.empty(7)).all() and torch.isnan(torch.ones(2).new_empty(3, 3)).all()


def test_monarch_cpu_concurrent_calls_from_python_threads():
    """The CPU entry points release the GIL; scratch memory is per calling thread."""
    from concurrent.futures import ThreadPoolExecutor
    shapes = [(4, 25, 25, 4, 10, 25), (16, 48, 48, 16, 48, 48), (3, 10, 7, 5, 9, 6)]
    data = [_factors(sh, torch.float32, batch=b, seed=i) for i, (sh, b) in enumerate(zip(shapes * 2, (5, 40, 300) * 2))]

    def run(item):
        x, w1, w2, dout = item
        leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]
        out = monarch_matmul(*leaves, backend="cpu")
        out.backward(dout)
        return out.detach(), [t.grad for t in leaves]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, data * 3))
    for (x, w1, w2, dout), (out, grads) in zip(data * 3, results):
        ref, ref_grads = _ref_grads(x, w1, w2, dout)
        assert_close(out, ref, torch.float32, "threaded out")
        for g, r in zip(grads, ref_grads):
            assert_close(g, r, torch.float32, "threaded grad")
