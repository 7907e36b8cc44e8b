"""Sparse linear op and SparseLinear: every backend that runs here against the float64 reference at
sparsities 0 .. 100%, gradients (double backward too), custom-op registration (opcheck,
torch.compile), the automatic dense path, the format (SparseLayout) and bad input."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

import kernelkit
from kernelkit.sparse import SparseLayout, SparseLinear, dense_grad, mask_from_scores, sparse_linear
from kernelkit.sparse.ops import BREAK_EVEN_SPARSITY
from kernelkit.sparse.reference import reference_bwd
from helpers import assert_close, rel_err

# (n_out, n_in): odd sizes, tall, wide, a single row/column, sizes past the kernels' vector widths
SHAPES = [(37, 53), (64, 48), (1, 17), (19, 1), (130, 7), (5, 300)]
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]
BATCHES = [0, 1, 37, 300]
CPU_BACKENDS = ["torch", "cpu"]


def _amax(t) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def _interp() -> bool:
    return not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"


def _mask(shape, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    m = mask_from_scores(torch.rand(shape, generator=g), sparsity)
    if sparsity == 0.5 and shape[0] > 2 and shape[1] > 2:  # an all-zero row and column too
        m[1, :] = False
        m[:, 2] = False
    return m


def _problem(shape, sparsity, batch, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed + 1)
    layout = SparseLayout.from_mask(_mask(shape, sparsity, seed)).to(device)
    mk = lambda *sz: torch.randn(*sz, generator=g, dtype=torch.float64).to(device, dtype)  # noqa: E731
    return layout, mk(layout.nnz), mk(batch, shape[1]), mk(shape[0]), mk(batch, shape[0])


def _ref(layout, values, x, bias, dout):
    leaves = [t.detach().double().cpu().requires_grad_() for t in (x, values, bias)]
    out = torch.nn.functional.linear(leaves[0], layout.to("cpu").to_dense(leaves[1]), leaves[2])
    out.backward(dout.detach().double().cpu())
    return out.detach(), [t.grad for t in leaves]


def _check(layout, values, x, bias, dout, dtype, backend, what=""):
    leaves = [t.clone().requires_grad_() for t in (x, values, bias)]
    out = sparse_linear(leaves[0], leaves[1], layout, leaves[2], backend=backend, min_sparsity=0.0)
    out.backward(dout)
    ref, grads = _ref(layout, values, x, bias, dout)
    assert out.shape == ref.shape
    if x.shape[0] == 0:
        assert _amax(leaves[1].grad) == 0.0 and _amax(leaves[2].grad) == 0.0
        return
    assert_close(out, ref, dtype, f"{what} out")
    for got, want, name in zip((t.grad for t in leaves), grads, ("dx", "dvalues", "dbias")):
        if name == "dvalues" and layout.nnz == 0:
            assert got.shape == (0,)
            continue
        assert_close(got, want, dtype, f"{what} {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_fwd_bwd_match_reference(poison, shape, sparsity, batch, dtype, backend):
    layout, values, x, bias, dout = _problem(shape, sparsity, batch, dtype, seed=batch)
    _check(layout, values, x, bias, dout, dtype, backend, f"{backend} {shape} s={sparsity} B={batch}")


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_sparse_cpu_every_isa_variant_matches_reference(poison, monkeypatch, isa):
    """The CPU kernels are compiled once per ISA; KERNELKIT_CPU_ISA caps the one used."""
    monkeypatch.setenv("KERNELKIT_CPU_ISA", isa)
    for shape in [(37, 53), (130, 7), (256, 200)]:
        for batch in (1, 9, 70):
            for s in (0.0, 0.9):
                _check(*_problem(shape, s, batch, torch.float32, seed=batch), torch.float32, "cpu",
                       f"{isa} {shape} B={batch} s={s}")


def test_sparse_cpu_large_problem_uses_every_tile(poison):
    """A batch and widths past the CPU kernels' batch chunks and column blocks."""
    _check(*_problem((700, 1500), 0.9, 600, torch.float32, seed=3), torch.float32, "cpu", "large")


def test_sparse_leading_dims_and_strided_input(poison):
    layout, values, _, bias, _ = _problem((37, 20), 0.5, 1, torch.float64)
    base = torch.randn(3, 4, 40, dtype=torch.float64)
    xs = [base[..., ::2], torch.randn(20, 12, dtype=torch.float64).T,
          torch.randn(9, 31, dtype=torch.float64)[:, 3:23]]  # inner stride 2, transposed, row stride 31
    for backend in CPU_BACKENDS:
        for x in xs:
            want = torch.nn.functional.linear(x, layout.to_dense(values), bias)
            assert_close(sparse_linear(x, values, layout, bias, backend=backend, min_sparsity=0), want,
                         torch.float64, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sparse_gradcheck_float64(backend):
    layout, values, x, bias, _ = _problem((7, 9), 0.5, 4, torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, values, bias))
    assert torch.autograd.gradcheck(lambda a, v, b: sparse_linear(a, v, layout, b, backend=backend, min_sparsity=0),
                                    inputs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sparse_gradgradcheck_float64(backend):
    """Double backward (the backward op is differentiable through the same two ops)."""
    layout, values, x, bias, _ = _problem((7, 9), 0.5, 4, torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, values, bias))
    assert torch.autograd.gradgradcheck(
        lambda a, v, b: sparse_linear(a, v, layout, b, backend=backend, min_sparsity=0), inputs)


def test_sparse_gradcheck_float64_triton_interpreted():
    pytest.importorskip("triton")
    if not _interp():
        pytest.skip("float64 Triton gradcheck runs under the interpreter only")
    layout, values, x, bias, _ = _problem((7, 9), 0.5, 4, torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, values, bias))
    assert torch.autograd.gradcheck(lambda a, v, b: sparse_linear(a, v, layout, b, backend="triton", min_sparsity=0),
                                    inputs)


def test_sparse_triton_backend_through_the_op(poison):
    pytest.importorskip("triton")
    if not (torch.cuda.is_available() or _interp()):
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for s in (0.0, 0.9, 1.0):
        _check(*_problem((37, 53), s, 19, torch.float32, device=dev), torch.float32, "triton", f"triton s={s}")


def test_sparse_partial_gradients():
    layout, values, x, bias, dout = _problem((37, 53), 0.9, 6, torch.float64)
    values.requires_grad_()
    out = sparse_linear(x, values, layout, None, backend="cpu", min_sparsity=0)
    (gv,) = torch.autograd.grad(out, (values,), dout)
    _, want = reference_bwd(x, values.detach(), layout.row_ptr, layout.col_idx, dout)
    assert rel_err(gv, want) < 1e-12 and x.grad is None


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
def test_sparse_opcheck(backend):
    if backend == "triton" and not _interp():
        pytest.skip("triton on CPU tensors needs the interpreter (GPU: tests/test_sparse_cuda.py)")
    layout, values, x, bias, dout = _problem((7, 9), 0.5, 5, torch.float64)
    idx = layout.index_tensors()
    torch.library.opcheck(torch.ops.kernelkit.sparse_linear_fwd,
                          (x.requires_grad_(), values.requires_grad_(), *idx, bias, backend))
    torch.library.opcheck(torch.ops.kernelkit.sparse_linear_fwd, (x, values, *idx, None, backend))
    for need in [(True, True), (False, True), (True, False)]:
        torch.library.opcheck(torch.ops.kernelkit.sparse_linear_bwd,
                              (x.detach(), values.detach(), *idx, dout, backend, *need))


def test_sparse_torch_compile_fullgraph_fwd_bwd():
    torch._dynamo.reset()
    layout, values, x, bias, dout = _problem((37, 53), 0.9, 11, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, values, bias)]
    fn = torch.compile(lambda a, v, b: torch.tanh(sparse_linear(a, v, layout, b, min_sparsity=0)), fullgraph=True)
    out = fn(*leaves)
    out.backward(dout)
    ref_leaves = [t.clone().requires_grad_() for t in (x, values, bias)]
    ref = torch.tanh(torch.nn.functional.linear(ref_leaves[0], layout.to_dense(ref_leaves[1]), ref_leaves[2]))
    ref.backward(dout)
    assert_close(out, ref, torch.float32, "compiled out")
    for a, b in zip(leaves, ref_leaves):
        assert_close(a.grad, b.grad, torch.float32, "compiled grad")


def test_sparse_linear_module_compiles_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = SparseLinear(40, 24, sparsity=0.9)
    x = torch.randn(6, 40, requires_grad=True)
    out = torch.compile(layer, fullgraph=True)(x)
    out.sum().backward()
    assert_close(out, torch.nn.functional.linear(x.double(), layer.to_dense().double(), layer.bias.double()),
                 torch.float32, "module")
    assert layer.values.grad is not None and layer.values.grad.shape == (layer.nnz,)


def test_sparse_follows_autocast_like_f_linear():
    layout, values, x, bias, dout = _problem((37, 53), 0.9, 9, torch.float32)
    values.requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kernelkit.KernelkitFallbackWarning)  # bf16 runs on torch here
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sparse_linear(x, values, layout, bias)
    assert out.dtype == torch.bfloat16
    assert_close(out, torch.nn.functional.linear(x.double(), layout.to_dense(values.double()), bias.double()),
                 torch.bfloat16, "autocast")
    out.float().backward(dout)
    assert values.grad.dtype == torch.float32 and torch.isfinite(values.grad).all()


# ---- the automatic dense path ---------------------------------------------------------------------

def test_dense_path_below_break_even_gives_the_same_result(monkeypatch):
    """Below min_sparsity the op computes F.linear on the scattered weight (no sparse kernel call);
    results and gradients are the same as the kernels'."""
    layout, values, x, bias, dout = _problem((37, 53), 0.5, 13, torch.float64)
    calls = []
    real = torch.ops.kernelkit.sparse_linear_fwd
    from kernelkit.sparse import ops as sops
    monkeypatch.setattr(sops.torch.ops.kernelkit, "sparse_linear_fwd", lambda *a: calls.append(1) or real(*a),
                        raising=False)
    got = {}
    for ms in (0.0, 0.6):
        leaves = [t.clone().requires_grad_() for t in (x, values, bias)]
        out = sparse_linear(leaves[0], leaves[1], layout, leaves[2], backend="cpu", min_sparsity=ms)
        out.backward(dout)
        got[ms] = (out.detach(), *(t.grad for t in leaves))
    assert len(calls) == 1  # only the min_sparsity=0 call ran the kernel
    for a, b in zip(got[0.0], got[0.6]):
        assert rel_err(a, b) < 1e-12


def test_default_min_sparsity_is_the_backends_break_even():
    assert 0.0 < BREAK_EVEN_SPARSITY["cpu"] < 1.0
    layer = SparseLinear(64, 64, sparsity=0.5, backend="cpu")
    assert layer.sparsity < BREAK_EVEN_SPARSITY["cpu"]  # runs dense by itself: same answer
    x = torch.randn(3, 64)
    assert_close(layer(x), torch.nn.functional.linear(x.double(), layer.to_dense().double(), layer.bias.double()),
                 torch.float32, "dense path")
    with pytest.raises(ValueError, match="min_sparsity"):
        sparse_linear(x, layer.values, layer.layout, min_sparsity=1.5)


def test_dense_grad_is_the_dense_weight_gradient():
    layout, values, x, bias, dout = _problem((37, 53), 0.9, 13, torch.float64)
    w = layout.to_dense(values).requires_grad_()
    torch.nn.functional.linear(x, w, bias).backward(dout)
    assert rel_err(dense_grad(x, dout), w.grad) < 1e-13
    assert dense_grad(x.float().reshape(13, 1, 53), dout.float().reshape(13, 1, 37)).shape == (37, 53)


# ---- SparseLayout -----------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Sparse")
def test_layout_round_trips_and_transposed_index():
    m = _mask((37, 53), 0.5, 0)
    lay = SparseLayout.from_mask(m)
    assert torch.equal(lay.mask(), m) and lay.nnz == int(m.sum())
    assert lay.row_ptr.dtype == torch.int64 and lay.col_idx.dtype == torch.int32
    w = torch.randn(37, 53, dtype=torch.float64) * m
    v = lay.values_from_dense(w)
    assert torch.equal(lay.to_dense(v), w)
    # the CSC view reads the same values through perm
    csc = torch.sparse_csc_tensor(lay.col_ptr, lay.row_idx.long(), v[lay.perm], size=(37, 53))
    assert torch.equal(csc.to_dense(), w)
    again = SparseLayout.from_csr(lay.row_ptr, lay.col_idx, (37, 53))
    for a, b in zip(again.index_tensors(), lay.index_tensors()):
        assert torch.equal(a.long(), b.long())


@pytest.mark.parametrize("s", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_mask_from_scores_keeps_exact_count(s):
    scores = torch.randn(64, 48)
    m = mask_from_scores(scores, s)
    keep = round((1 - s) * m.numel())
    assert int(m.sum()) == keep
    if 0 < keep < m.numel():
        assert scores[m].min() >= scores[~m].max()


@pytest.mark.parametrize("row_ptr, col_idx, match", [
    ([0, 2, 3], [0, 1, 5], r"col_idx\[2\] = 5 is out of range \[0, 4\)"),
    ([0, 2, 3], [1, 0, 2], r"strictly increasing within each row, but in row 0 col_idx\[1\] = 0"),
    ([0, 2, 3], [1, 1, 2], r"strictly increasing"),
    ([0, 3, 2], [0, 1, 2], r"must not decrease"),
    ([1, 2, 3], [0, 1, 2], r"row_ptr\[0\] must be 0"),
    ([0, 2, 4], [0, 1, 2], r"row_ptr\[-1\] must equal len\(col_idx\) = 3"),
    ([0, 3], [0, 1, 2], r"row_ptr must have n_out\+1 = 3 entries"),
    ([0, 1, 2], [-1, 0], r"col_idx\[0\] = -1 is out of range"),
])
def test_from_csr_rejects_bad_index_before_any_kernel(row_ptr, col_idx, match):
    with pytest.raises(ValueError, match=match):
        SparseLayout.from_csr(torch.tensor(row_ptr), torch.tensor(col_idx, dtype=torch.int32), (2, 4))


def test_from_csr_rejects_wrong_types():
    with pytest.raises(TypeError, match="row_ptr must be an int32 or int64 tensor"):
        SparseLayout.from_csr(torch.tensor([0.0, 1.0]), torch.tensor([0]), (1, 2))
    with pytest.raises(ValueError, match="must be 2-D"):
        SparseLayout.from_csr(torch.tensor([0, 1]), torch.tensor([0]), (1, 2, 3))
    with pytest.raises(ValueError, match="col_idx must be 1-D"):
        SparseLayout.from_csr(torch.tensor([0, 1]), torch.tensor([[0]]), (1, 2))
    with pytest.raises(ValueError, match="must be 2-D"):
        SparseLayout.from_mask(torch.ones(2, 3, 4, dtype=torch.bool))


# ---- SparseLinear -----------------------------------------------------------------------------

@pytest.mark.parametrize("s", [0.0, 0.5, 0.9, 0.99])
def test_sparse_linear_from_linear_magnitude_keeps_largest(s):
    torch.manual_seed(0)
    lin = torch.nn.Linear(53, 37)
    sl = SparseLinear.from_linear(lin, s)
    keep = round((1 - s) * 37 * 53)
    assert sl.nnz == keep and abs(sl.sparsity - (1 - keep / (37 * 53))) < 1e-12
    dense = sl.to_dense()
    m = sl.mask
    assert torch.equal(dense[m], lin.weight.detach()[m]) and _amax(dense[~m]) == 0.0
    if 0 < keep < m.numel():
        assert lin.weight.detach().abs()[m].min() >= lin.weight.detach().abs()[~m].max()
    x = torch.randn(4, 53)
    assert_close(sl(x), torch.nn.functional.linear(x.double(), (lin.weight * m).double(), lin.bias.double()),
                 torch.float32, "from_linear")


def test_sparse_linear_from_linear_random_is_exact_and_seeded():
    lin = torch.nn.Linear(64, 32)
    a = SparseLinear.from_linear(lin, 0.75, "random", generator=torch.Generator().manual_seed(1))
    b = SparseLinear.from_linear(lin, 0.75, "random", generator=torch.Generator().manual_seed(1))
    assert a.nnz == 512 and torch.equal(a.mask, b.mask)
    with pytest.raises(ValueError, match="method must be"):
        SparseLinear.from_linear(lin, 0.5, "largest")


def test_sparse_linear_state_dict_holds_mask_and_values_not_dense():
    torch.manual_seed(0)
    a = SparseLinear(300, 200, sparsity=0.99)
    sd = a.state_dict()
    assert set(sd) == {"values", "bias", "row_ptr", "col_idx"}
    assert sum(t.numel() for t in sd.values()) < 0.05 * 300 * 200  # far below a dense copy
    b = SparseLinear(300, 200, sparsity=0.5)  # another mask and nnz: the checkpoint's wins
    b.load_state_dict(sd)
    assert b.nnz == a.nnz and torch.equal(b.to_dense(), a.to_dense())
    x = torch.randn(3, 300)
    assert torch.equal(a(x), b(x))
    bad = dict(sd, col_idx=sd["col_idx"].flip(0))
    with pytest.raises(RuntimeError, match="strictly increasing"):
        b.load_state_dict(bad)


def test_sparse_linear_set_mask_keeps_values_and_reports_sources():
    torch.manual_seed(0)
    layer = SparseLinear(20, 10, sparsity=0.5)
    param = layer.values
    old_dense = layer.to_dense()
    new_mask = layer.mask.clone()
    on = torch.nonzero(new_mask)[:3]
    off = torch.nonzero(~new_mask)[:3]
    new_mask[on[:, 0], on[:, 1]] = False
    new_mask[off[:, 0], off[:, 1]] = True
    src = layer.set_mask_(new_mask)
    assert layer.values is param and layer.nnz == 100 and torch.equal(layer.mask, new_mask)
    d = layer.to_dense()
    kept = new_mask & (old_dense != 0)
    assert torch.equal(d[kept], old_dense[kept])
    assert float(d[off[:, 0], off[:, 1]].abs().max()) == 0.0  # new entries start at zero
    assert int((src < 0).sum()) == 3


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(sparsity=1.0), ValueError, r"sparsity must be a number in \[0, 1\)"),
    (dict(sparsity=-0.1), ValueError, r"sparsity must be"),
    (dict(mask=torch.ones(3, 3)), ValueError, r"mask must be a tensor of shape"),
    (dict(dtype=torch.int32), TypeError, r"dtype must be"),
    (dict(backend="gpu"), ValueError, r"backend must be one of"),
])
def test_sparse_linear_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SparseLinear(8, 4, **kwargs)


def test_sparse_linear_all_zero_mask_gives_bias():
    layer = SparseLinear(8, 4, mask=torch.zeros(4, 8, dtype=torch.bool), min_sparsity=0)
    x = torch.randn(5, 8, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, layer.bias.expand(5, 4))
    y.sum().backward()
    assert float(x.grad.abs().max()) == 0.0


# ---- bad input to the op ----------------------------------------------------------------------

@pytest.mark.parametrize("make, exc, match", [
    (lambda x, v, lay, b: (x[:, :-1], v, lay, b), ValueError, r"x.shape\[-1\] must equal the weight's n_in = 53"),
    (lambda x, v, lay, b: (x, v[:-1], lay, b), ValueError, r"values must have the layout's nnz"),
    (lambda x, v, lay, b: (x, v.reshape(1, -1), lay, b), ValueError, r"values must be 1-D"),
    (lambda x, v, lay, b: (x, v, lay, b[:-1]), ValueError, r"bias must have n_out = 37"),
    (lambda x, v, lay, b: (x.double(), v, lay, b), TypeError, r"values has dtype torch.float32 but x has torch.float64"),
    (lambda x, v, lay, b: (x.long(), v, lay, b), TypeError, r"x must be float32"),
    (lambda x, v, lay, b: (x, v, lay.mask(), b), TypeError, r"layout must be a kernelkit.sparse.SparseLayout"),
    (lambda x, v, lay, b: (x, v, lay.to("meta"), b), ValueError, r"layout is on meta but x is on cpu"),
    (lambda x, v, lay, b: (x.to_sparse(), v, lay, b), TypeError, r"x must be a dense \(strided\) tensor"),
])
def test_sparse_bad_input_names_the_argument(make, exc, match):
    layout, values, x, bias, _ = _problem((37, 53), 0.9, 3, torch.float32)
    with pytest.raises(exc, match=match):
        sparse_linear(*make(x, values, layout, bias), backend="cpu")


def test_sparse_forced_backend_that_cannot_run_raises():
    layout, values, x, bias, _ = _problem((37, 53), 0.9, 3, torch.float32)
    with pytest.raises(kernelkit.BackendUnavailableError, match="float16"):
        sparse_linear(x.half(), values.half(), layout, bias.half(), backend="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(kernelkit.BackendUnavailableError, match="cuda"):
            sparse_linear(x, values, layout, bias, backend="cuda")


def test_sparse_cpu_entry_point_rejects_a_corrupt_index():
    """The C side re-checks the index (a layout built by hand, bypassing from_csr): a clear
    ValueError from the library, no out-of-bounds read."""
    layout, values, x, bias, _ = _problem((37, 53), 0.9, 3, torch.float32)
    bad_col = layout.col_idx.clone()
    bad_col[0] = 1000
    bad = SparseLayout(layout.shape, layout.row_ptr, bad_col, layout.col_ptr, layout.row_idx, layout.perm)
    with pytest.raises(ValueError, match="col_idx"):
        sparse_linear(x, values, bad, bias, backend="cpu", min_sparsity=0)
    bad_perm = layout.perm.clone()
    bad_perm[0] = 10**9
    bad = SparseLayout(layout.shape, layout.row_ptr, layout.col_idx, layout.col_ptr, layout.row_idx, bad_perm)
    xs = x.clone().requires_grad_()
    with pytest.raises(ValueError, match="perm"):
        sparse_linear(xs, values, bad, bias, backend="cpu", min_sparsity=0).sum().backward()


def test_sparse_nan_and_inf_propagate():
    """Documented: NaN/inf are not rejected; they reach exactly the outputs they feed."""
    layout, values, x, bias, _ = _problem((37, 53), 0.0, 3, torch.float64)
    x[1, 0] = float("nan")
    out = sparse_linear(x, values, layout, bias, backend="cpu", min_sparsity=0)
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all() and torch.isnan(out[1]).any()


def test_sparse_cpu_concurrent_calls_from_python_threads():
    from concurrent.futures import ThreadPoolExecutor
    data = [_problem(sh, 0.9, b, torch.float32, seed=i)
            for i, (sh, b) in enumerate([((37, 53), 5), ((130, 70), 40), ((64, 48), 300)] * 2)]

    def run(item):
        layout, values, x, bias, dout = item
        leaves = [t.clone().requires_grad_() for t in (x, values, bias)]
        out = sparse_linear(leaves[0], leaves[1], layout, leaves[2], backend="cpu", min_sparsity=0)
        out.backward(dout)
        return out.detach(), [t.grad for t in leaves]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, data * 3))
    for (layout, values, x, bias, dout), (out, grads) in zip(data * 3, results):
        ref, ref_grads = _ref(layout, values, x, bias, dout)
        assert_close(out, ref, torch.float32, "threaded out")
        for g, r in zip(grads, ref_grads):
            assert_close(g, r, torch.float32, "threaded grad")


# ---- the dense path's conversions ---------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_to_dense_and_gather_match_the_layout(poison, backend, dtype):
    for s in (0.0, 0.5, 0.99, 1.0):
        layout, values, *_ = _problem((37, 53), s, 1, dtype)
        idx = (layout.row_ptr, layout.col_idx)
        w = torch.ops.kernelkit.sparse_to_dense(values, *idx, 53, backend)
        assert torch.equal(w, layout.to_dense(values))
        dense = torch.randn(37, 53, dtype=torch.float64).to(dtype)
        assert torch.equal(torch.ops.kernelkit.sparse_gather(dense, *idx, backend), layout.values_from_dense(dense))
        assert torch.equal(torch.ops.kernelkit.sparse_gather(dense.t().contiguous().t(), *idx, backend),
                           layout.values_from_dense(dense))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_to_dense_and_gather_opcheck_and_gradcheck(backend):
    layout, values, *_ = _problem((7, 9), 0.5, 1, torch.float64)
    idx = (layout.row_ptr, layout.col_idx)
    torch.library.opcheck(torch.ops.kernelkit.sparse_to_dense, (values.requires_grad_(), *idx, 9, backend))
    dense = torch.randn(7, 9, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.kernelkit.sparse_gather, (dense, *idx, backend))
    assert torch.autograd.gradgradcheck(lambda v: torch.ops.kernelkit.sparse_to_dense(v, *idx, 9, backend), (values,))
    assert torch.autograd.gradgradcheck(lambda d: torch.ops.kernelkit.sparse_gather(d, *idx, backend), (dense,))


def test_to_dense_cpu_rejects_a_corrupt_index():
    layout, values, *_ = _problem((37, 53), 0.9, 1, torch.float32)
    bad = layout.col_idx.clone()
    bad[-1] = 53
    with pytest.raises(ValueError, match=r"idx\[\d+\] = 53 \(row 36\) is out of range"):
        torch.ops.kernelkit.sparse_to_dense(values, layout.row_ptr, bad, 53, "cpu")


def test_dense_path_reuses_the_weight_only_while_the_values_are_unchanged():
    """Inference (no gradient to the values) keeps the dense path's W on the layout; an in-place
    update of the values (an optimizer step) or other values tensor rebuilds it; with gradients it is
    never reused.  Pickling and deepcopy drop the cache."""
    import copy
    import pickle
    torch.manual_seed(0)
    layer = SparseLinear(64, 32, sparsity=0.5, backend="cpu")   # below the break-even: the dense path
    x = torch.randn(5, 64)
    want = lambda: torch.nn.functional.linear(x.double(), layer.to_dense().double(), layer.bias.double())  # noqa: E731
    with torch.no_grad():
        y1 = layer(x)
        w1 = layer.layout._dense_cache[3]
        y2 = layer(x)
        assert layer.layout._dense_cache[3] is w1 and torch.equal(y1, y2)
        layer.values.mul_(2.0)                                   # in place: version bump
        assert_close(layer(x), want(), torch.float32, "after an in-place update")
        assert layer.layout._dense_cache[3] is not w1
    y = layer(x)                                                 # with grad: no reuse, gradients flow
    y.sum().backward()
    assert layer.values.grad is not None and layer.values.grad.shape == (layer.nnz,)
    clone = pickle.loads(pickle.dumps(layer))
    assert torch.equal(clone(x), layer(x)) and "_layout_cache" not in pickle.loads(pickle.dumps(layer)).__dict__
    assert torch.equal(copy.deepcopy(layer)(x), layer(x))
    lay2 = pickle.loads(pickle.dumps(layer.layout))
    assert lay2._dense_cache is None and torch.equal(lay2.row_ptr, layer.row_ptr)
