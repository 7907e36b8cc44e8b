"""VQ linear ops: every backend that runs here against the float64 reference (both paths, every code
width, additive and per-set codebooks, scales, odd sizes, empty batches), gradients (double backward
too), custom-op registration (opcheck, torch.compile), the k-means assignment op, the code check
and bad input."""
from __future__ import annotations

import os

import pytest
import torch

from kernelkit.vq import assign, dequantize, vq_linear
from kernelkit.vq import ops as vq_ops
from kernelkit.vq.reference import assign_reference, dequantize_reference, reference_bwd, unsigned_codes
from helpers import TOL, assert_close, rel_err

# (d, K, M, code dtype): VQ4DiT 2-bit (4, 256) and 3-bit (2, 64), AQLM 2x8g8, 1x16g8, 8x8, 1x16g16,
# a K that is not a power of two, d = 1, a mid-size int16 codebook.
FORMATS = [(4, 256, 1, torch.uint8), (2, 64, 1, torch.uint8), (8, 256, 2, torch.uint8),
           (8, 65536, 1, torch.int16), (8, 256, 8, torch.uint8), (16, 65536, 1, torch.int16),
           (1, 3, 1, torch.uint8), (4, 4096, 1, torch.int16)]
FMT_IDS = [f"d{d}K{K}M{M}{'i16' if c == torch.int16 else 'u8'}" for d, K, M, c in FORMATS]
BATCHES = [0, 1, 7, 16, 17, 300]
CPU_BACKENDS = ["torch", "cpu"]


def _interp() -> bool:
    return not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"


def _codes(n_out, G, M, K, code_dtype, g):
    c = torch.randint(0, K, (n_out, G, M), generator=g)
    if code_dtype == torch.int16:
        c = torch.where(c >= 32768, c - 65536, c)  # AQLM's storage of codes >= 2^15
    return c.to(code_dtype)


def _problem(fmt, n_out=37, G=5, batch=7, dtype=torch.float64, *, sets=1, scales=True, bias=True, seed=0):
    d, K, M, cdt = fmt
    g = torch.Generator().manual_seed(seed)
    mk = lambda *sz: torch.randn(*sz, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    rpc = -(-n_out // sets) if n_out else 1
    S = max(1, -(-n_out // rpc))
    codes = _codes(n_out, G, M, K, cdt, g)
    cb = mk(S, M, K, d) / M ** 0.5
    sc = (mk(n_out).abs() + 0.5) if scales else None
    b = mk(n_out) if bias else None
    return codes, cb, sc, b, rpc, mk(batch, G * d), mk(batch, n_out)


def _ref(codes, cb, sc, b, rpc, x, dout):
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (x, cb, sc, b)]
    w = dequantize_reference(codes, leaves[1], leaves[2], rpc)
    out = torch.nn.functional.linear(leaves[0], w, leaves[3])
    out.backward(dout.double())
    return out.detach(), [None if t is None else t.grad for t in leaves]


def _check(problem, dtype, backend, path="auto", what=""):
    codes, cb, sc, b, rpc, x, dout = problem
    leaves = [None if t is None else t.clone().requires_grad_() for t in (x, cb, sc, b)]
    out = vq_linear(leaves[0], codes, leaves[1], leaves[2], leaves[3], rows_per_codebook=rpc, path=path,
                    backend=backend)
    out.backward(dout)
    ref, grads = _ref(*problem)
    assert out.shape == ref.shape and out.dtype == dtype
    tol_scale = 4 if dtype in (torch.float16, torch.bfloat16) else 1
    for got, want, name in zip([out] + [None if t is None else t.grad for t in leaves], [ref] + grads,
                               ("out", "dx", "dcodebooks", "dscales", "dbias")):
        if want is None:
            continue
        if x.shape[0] == 0 and name != "out" and name != "dx":
            assert got is not None and float(got.abs().max()) == 0.0 if got.numel() else True, f"{what} {name}"
            continue
        err = rel_err(got, want)
        assert err <= TOL[dtype] * tol_scale, f"{what} {name}: relative error {err:.3e} ({dtype})"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("fmt", FORMATS, ids=FMT_IDS)
def test_vq_fwd_bwd_match_reference(poison, fmt, batch, dtype, backend):
    _check(_problem(fmt, batch=batch, dtype=dtype, seed=batch), dtype, backend, "auto", f"{backend} B={batch}")


@pytest.mark.parametrize("path", ["gemv", "gemm"])
@pytest.mark.parametrize("batch", [1, 16, 17, 300])
@pytest.mark.parametrize("fmt", FORMATS, ids=FMT_IDS)
def test_vq_cpu_both_paths_match_reference(poison, fmt, batch, path):
    if fmt[1] > 4096 and path == "gemv" and batch > 17:
        pytest.skip("a lookup table over 65536 codewords at batch 300 is slow by design (auto never picks it)")
    _check(_problem(fmt, n_out=41, G=6, batch=batch, dtype=torch.float32, seed=3), torch.float32, "cpu", path,
           f"{path} B={batch}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scales", [False, True])
def test_vq_per_set_codebooks_and_odd_rows(poison, backend, scales):
    """Output rows in sets sharing one codebook set (the last set short), additive M = 2."""
    for sets, n_out in [(3, 37), (4, 40), (37, 37)]:
        p = _problem((4, 16, 2, torch.uint8), n_out=n_out, G=9, batch=13, dtype=torch.float64, sets=sets,
                     scales=scales)
        _check(p, torch.float64, backend, "auto", f"sets={sets}")
        if backend == "cpu":
            for path in ("gemv", "gemm"):
                _check(p, torch.float64, backend, path, f"sets={sets} {path}")


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_vq_cpu_every_isa_variant_matches_reference(poison, monkeypatch, isa):
    monkeypatch.setenv("KERNELKIT_CPU_ISA", isa)
    for fmt in [(4, 256, 1, torch.uint8), (8, 256, 2, torch.uint8), (8, 65536, 1, torch.int16)]:
        for batch in (1, 9, 33):
            for path in ("gemv", "gemm"):
                _check(_problem(fmt, n_out=70, G=12, batch=batch, dtype=torch.float32, seed=batch), torch.float32,
                       "cpu", path, f"{isa} {path} B={batch}")


def test_vq_cpu_large_problem_uses_every_tile(poison):
    """Past the CPU kernels' batch tiles, row blocks and group blocks."""
    for path in ("gemv", "gemm"):
        _check(_problem((4, 256, 1, torch.uint8), n_out=300, G=150, batch=70, dtype=torch.float32, seed=1),
               torch.float32, "cpu", path, f"large {path}")


def test_vq_empty_sizes(poison):
    for backend in CPU_BACKENDS:
        for n_out, G in [(0, 5), (5, 0), (0, 0)]:
            codes, cb, sc, b, rpc, x, dout = _problem((4, 256, 1, torch.uint8), n_out=n_out, G=G, batch=3)
            out = vq_linear(x, codes, cb, sc, b, backend=backend)
            want = torch.nn.functional.linear(x, dequantize_reference(codes, cb, sc, rpc), b)
            assert out.shape == (3, n_out) and torch.equal(out, want)


def test_vq_leading_dims_strided_input_and_aqlm_scale_shape(poison):
    codes, cb, sc, b, rpc, _, _ = _problem((4, 256, 1, torch.uint8), n_out=19, G=5)
    w = dequantize_reference(codes, cb, sc, rpc)
    base = torch.randn(3, 4, 40, dtype=torch.float64)
    xs = [base[..., ::2], torch.randn(20, 12, dtype=torch.float64).T, torch.randn(9, 31, dtype=torch.float64)[:, 3:23]]
    for backend in CPU_BACKENDS:
        for x in xs:
            want = torch.nn.functional.linear(x, w, b)
            assert_close(vq_linear(x, codes, cb[0], sc.view(-1, 1, 1, 1), b, backend=backend), want, torch.float64,
                         backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_vq_gradcheck_and_gradgradcheck_float64(backend):
    codes, cb, sc, b, rpc, x, _ = _problem((2, 5, 2, torch.uint8), n_out=6, G=3, batch=4, sets=2)
    inputs = tuple(t.requires_grad_() for t in (x, cb, sc, b))
    f = lambda a, c, s, bb: vq_linear(a, codes, c, s, bb, rows_per_codebook=rpc, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_vq_gradcheck_float64_triton_interpreted():
    pytest.importorskip("triton")
    if not _interp():
        pytest.skip("float64 Triton gradcheck runs under the interpreter only")
    codes, cb, sc, b, rpc, x, _ = _problem((2, 5, 2, torch.uint8), n_out=6, G=3, batch=4, sets=2)
    inputs = tuple(t.requires_grad_() for t in (x, cb, sc, b))
    assert torch.autograd.gradcheck(
        lambda a, c, s, bb: vq_linear(a, codes, c, s, bb, rows_per_codebook=rpc, backend="triton"), inputs)


def test_vq_triton_backend_through_the_op(poison):
    pytest.importorskip("triton")
    if not (torch.cuda.is_available() or _interp()):
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1")
    for fmt in [(4, 256, 1, torch.uint8), (8, 65536, 1, torch.int16)]:
        for batch, path in [(3, "gemv"), (19, "gemm"), (5, "auto")]:
            _check(_problem(fmt, n_out=21, G=4, batch=batch, dtype=torch.float32), torch.float32, "triton", path,
                   f"triton {path}")


def test_vq_partial_gradients():
    codes, cb, sc, b, rpc, x, dout = _problem((4, 256, 1, torch.uint8))
    cb.requires_grad_()
    out = vq_linear(x, codes, cb, sc, b, backend="cpu")
    (gc,) = torch.autograd.grad(out, (cb,), dout)
    _, want, _ = reference_bwd(x, codes, cb.detach(), sc, dout, rpc)
    assert rel_err(gc, want) < 1e-12 and x.grad is None


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
def test_vq_opcheck(backend):
    if backend == "triton" and not _interp():
        pytest.skip("triton on CPU tensors needs the interpreter (GPU: tests/test_vq_cuda.py)")
    codes, cb, sc, b, rpc, x, dout = _problem((2, 5, 2, torch.uint8), n_out=6, G=3, batch=4, sets=2)
    op = torch.ops.kernelkit
    for path in (0, 1, 2):
        torch.library.opcheck(op.vq_linear_fwd, (x.requires_grad_(), codes, cb.requires_grad_(),
                                                 sc.requires_grad_(), b, rpc, path, backend))
    torch.library.opcheck(op.vq_linear_fwd, (x.detach(), codes, cb.detach(), None, None, rpc, 0, backend))
    for need in [(True, True, True), (False, True, False), (True, False, False), (False, False, True)]:
        torch.library.opcheck(op.vq_linear_bwd, (x.detach(), codes, cb.detach(), sc.detach(), dout, rpc, backend, *need))
    torch.library.opcheck(op.vq_dequantize, (codes, cb.detach().requires_grad_(), sc.detach().requires_grad_(), rpc,
                                             backend))
    v = torch.randn(50, 3, dtype=torch.float64 if backend != "triton" else torch.float32)
    torch.library.opcheck(op.vq_assign, (v, v[:7].clone(), 3, backend))


def test_vq_torch_compile_fullgraph_fwd_bwd():
    torch._dynamo.reset()
    codes, cb, sc, b, rpc, x, dout = _problem((4, 256, 1, torch.uint8), dtype=torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, cb, sc, b)]
    fn = torch.compile(lambda a, c, s, bb: torch.tanh(vq_linear(a, codes, c, s, bb)), fullgraph=True)
    out = fn(*leaves)
    out.backward(dout)
    refl = [t.clone().double().requires_grad_() for t in (x, cb, sc, b)]
    ref = torch.tanh(torch.nn.functional.linear(refl[0], dequantize_reference(codes, refl[1], refl[2], rpc), refl[3]))
    ref.backward(dout.double())
    assert_close(out, ref, torch.float32, "compiled out")
    for a, r in zip(leaves, refl):
        assert_close(a.grad, r.grad, torch.float32, "compiled grad")


# ---- dequantize and assign ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS, ids=FMT_IDS)
def test_vq_dequantize_matches_reference(poison, fmt, backend):
    codes, cb, sc, b, rpc, _, _ = _problem(fmt, n_out=23, G=7, sets=2)
    for s in (None, sc):
        want = dequantize_reference(codes, cb, s, rpc)
        got = dequantize(codes, cb, s, rows_per_codebook=rpc, backend=backend)
        assert torch.equal(got, want) or rel_err(got, want) < 1e-15
    got = dequantize(codes, cb, sc, rows_per_codebook=rpc, dtype=torch.float32, backend=backend)
    assert got.dtype == torch.float32 and rel_err(got, dequantize_reference(codes, cb, sc, rpc)) < 1e-6


def test_vq_dequantize_gradients():
    codes, cb, sc, b, rpc, _, _ = _problem((2, 5, 2, torch.uint8), n_out=6, G=3, sets=2)
    inputs = (cb.requires_grad_(), sc.requires_grad_())
    assert torch.autograd.gradcheck(lambda c, s: dequantize(codes, c, s, rows_per_codebook=rpc, backend="cpu"), inputs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d,K,topn", [(4, 256, 1), (2, 64, 2), (1, 3, 3), (8, 1000, 8), (16, 17, 1), (3, 40, 4)])
def test_vq_assign_matches_reference(poison, backend, dtype, d, K, topn):
    g = torch.Generator().manual_seed(d * K)
    v = torch.randn(333, d, generator=g, dtype=torch.float64).to(dtype)
    c = torch.randn(K, d, generator=g, dtype=torch.float64).to(dtype)
    idx, dist = assign(v, c, topn, backend=backend)
    ridx, rdist = assign_reference(v.double(), c.double(), topn)
    assert idx.dtype == torch.int32 and idx.shape == (333, topn)
    # the same neighbours (exact distances; a different pick only where two distances tie in the dtype)
    same = (idx == ridx).float().mean().item()
    assert same > 0.99, same
    assert_close(dist, rdist, dtype, "dist")
    assert (dist[:, 1:] >= dist[:, :-1]).all()


def test_vq_assign_ties_go_to_the_smaller_index():
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    v = torch.zeros(5, 2)
    for backend in CPU_BACKENDS:
        idx, dist = assign(v, c, 4, backend=backend)
        assert idx.tolist() == [[0, 1, 2, 3]] * 5 and torch.equal(dist, torch.ones(5, 4))
        idx, _ = assign(c, c.repeat(2, 1), 2, backend=backend)  # duplicated centroids
        assert idx.tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]


# ---- the code check and bad input ----------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_codes_out_of_range_raise_before_any_kernel(monkeypatch, backend):
    codes, cb, sc, b, rpc, x, _ = _problem((4, 100, 1, torch.uint8), n_out=9, G=4, batch=2)
    codes[4, 2, 0] = 200
    calls = []
    real_c = vq_ops._lib.C
    monkeypatch.setattr(vq_ops._lib, "C", lambda: calls.append(1) or real_c())
    with pytest.raises(ValueError, match=r"codes\[4, 2, 0\] = 200 .* K = 100"):
        vq_linear(x, codes, cb, sc, b, backend=backend)
    with pytest.raises(ValueError, match=r"codes\[4, 2, 0\] = 200"):
        dequantize(codes, cb, backend=backend)
    assert not calls  # no kernel was reached
    # int16 codes: a negative stored code is a value >= 2^15
    codes16, cb16, *_ = _problem((4, 40000, 1, torch.int16), n_out=3, G=2)
    codes16[1, 1, 0] = -2  # 65534 >= 40000
    with pytest.raises(ValueError, match=r"codes\[1, 1, 0\] = 65534"):
        vq_linear(torch.randn(2, 8, dtype=torch.float64), codes16, cb16, backend=backend)


def test_code_check_is_remembered_and_redone_when_codes_change():
    codes, cb, sc, b, rpc, x, _ = _problem((4, 100, 1, torch.uint8), n_out=9, G=4, batch=2)
    vq_linear(x, codes, cb, backend="cpu")  # checked and remembered
    codes[0, 0, 0] = 150  # in place: the version counter moves
    with pytest.raises(ValueError, match=r"codes\[0, 0, 0\] = 150"):
        vq_linear(x, codes, cb, backend="cpu")


def test_c_entry_point_checks_codes_itself():
    """The C library refuses bad codes on its own when the caller did not set KK_VQ_CODES_CHECKED."""
    from kernelkit import _lib
    codes, cb, sc, b, rpc, x, _ = _problem((4, 100, 1, torch.uint8), n_out=9, G=4, batch=2)
    codes[8, 3, 0] = 101
    fmt = (9, 16, 100, 9, 4, 1, 8, 0)
    out = torch.empty(2, 9, dtype=torch.float64)
    with pytest.raises(ValueError, match="codes"):
        _lib.C().vq_linear_fwd_cpu(1, fmt, 2, codes.data_ptr(), cb.data_ptr(), 0, x.data_ptr(), 16, 0,
                                   out.data_ptr(), 9, 0, 1)
    with pytest.raises(ValueError, match="codes"):
        _lib.C().vq_check_codes(fmt, codes.data_ptr())


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda p: p.update(codes=p["codes"].to(torch.int32)), TypeError, "codes must be uint8"),
    (lambda p: p.update(codes=p["codes"][:, :, :1].expand(-1, -1, 1)[..., 0, None].repeat(1, 1, 2)), ValueError,
     r"codes has 2 code\(s\) per group"),
    (lambda p: p.update(cb=p["cb"][..., :3]), ValueError, r"group size d = codebooks.shape\[-1\] must be one of"),
    (lambda p: p.update(x=p["x"][:, :-1]), ValueError, r"x has 19 features"),
    (lambda p: p.update(cb=torch.randn(1, 1, 300, 4, dtype=torch.float64)), ValueError, "K = 300 does not fit uint8"),
    (lambda p: p.update(cb=p["cb"].repeat(4, 1, 1, 1)), ValueError, r"codebooks has 4 set\(s\)"),
    (lambda p: p.update(sc=torch.ones(5, dtype=torch.float64)), ValueError, "scales must have n_out = 9"),
    (lambda p: p.update(b=torch.ones(4, dtype=torch.float64)), ValueError, "bias must have n_out = 9"),
    (lambda p: p.update(x=p["x"].long()), TypeError, "x must be float32"),
    (lambda p: p.update(cb=torch.randn(1, 17, 4, 4, dtype=torch.float64)), ValueError, r"M must be in \[1, 16\]"),
])
def test_vq_bad_input_names_the_argument(mutate, exc, match):
    codes, cb, sc, b, rpc, x, _ = _problem((4, 16, 1, torch.uint8), n_out=9, G=5, batch=2)
    p = dict(codes=codes, cb=cb, sc=sc, b=b, x=x)
    mutate(p)
    with pytest.raises(exc, match=match):
        vq_linear(p["x"], p["codes"], p["cb"], p["sc"], p["b"], backend="cpu")


def test_vq_bad_path_rows_per_codebook_and_topn():
    codes, cb, sc, b, rpc, x, _ = _problem((4, 16, 1, torch.uint8), n_out=9, G=5, batch=2)
    with pytest.raises(ValueError, match="path must be one of"):
        vq_linear(x, codes, cb, path="fast")
    with pytest.raises(ValueError, match="rows_per_codebook must be an int >= 1"):
        vq_linear(x, codes, cb, rows_per_codebook=0)
    with pytest.raises(ValueError, match=r"topn must be an int in \[1, min\(8, K = 3\)\]"):
        assign(torch.randn(4, 2), torch.randn(3, 2), 4)
    with pytest.raises(ValueError, match="vectors have d = 2 but centroids have d = 3"):
        assign(torch.randn(4, 2), torch.randn(3, 3))


def test_unsigned_codes_reads_int16_as_aqlm_stores_it():
    c = torch.tensor([0, 1, 32767, -32768, -1], dtype=torch.int16)
    assert unsigned_codes(c).tolist() == [0, 1, 32767, 32768, 65535]
    assert vq_ops.bits_per_weight(4, 256) == 2.0 and vq_ops.bits_per_weight(8, 256, 2) == 2.0
    assert vq_ops.bits_per_weight(8, 65536) == 2.0 and vq_ops.bits_per_weight(16, 65536) == 1.0
