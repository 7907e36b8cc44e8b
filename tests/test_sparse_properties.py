"""Property-based tests (hypothesis) of the public sparse ops: sparse_linear, SparseLayout.from_csr /
from_mask, SparseLinear and SparseLinear.from_linear.

The rule for every public op (as in tests/test_monarch_properties.py):
  * valid input -- random shapes (n_out, n_in from 1 to 40, odd and prime sizes), masks (sparsity 0
    and 1.0, empty rows and columns, a single entry), batch shapes (0..3 leading dims, size 0 and 1),
    strides (transposed, expanded, sliced, strided and broadcast views of x, of the values, of the bias
    and of the output gradient), every dtype each backend here runs, the sparse kernels
    (min_sparsity=0) and the automatic dense path (min_sparsity=None) -- matches the float64
    reference computed from the same (rounded) inputs, with no NaN although every torch.empty starts
    NaN-filled (`poison`), and so do the gradients for every subset of (x, values, bias); the inputs
    (and the layout's index) are left as they were;
  * bad input of every kind raises the documented exception type (exactly that type) with a message
    naming the offending argument, before anything large is allocated or launched.
Example counts scale with the hypothesis profile (tests/conftest.py): `ci`, the default, is
derandomized and runs >= 1000 examples per op and backend, except under the (slow) Triton
interpreter; HYPOTHESIS_PROFILE=slow runs 10x as many, freshly random.

The plain-pytest tests at the end pin defects these tests found (bool / numpy min_sparsity, shapes
that are not int pairs, the layer's min_sparsity and sparse masks), fixed since.
"""
from __future__ import annotations

import functools
import math
import numbers
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("hypothesis")
from hypothesis import event, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import kernelkit  # noqa: E402
from kernelkit.sparse import (SparseLayout, SparseLinear, mask_from_scores, sparse_linear,  # noqa: E402
                              sparse_linear_reference)
from kernelkit.sparse.ops import BREAK_EVEN_SPARSITY, _INT32_MAX, _supports, check_index_range  # noqa: E402
from helpers import TOL  # noqa: E402
# the shared helpers; _one_thread is an autouse fixture (pytest finds it in this module)
from properties import (FAST, FLOATS, IDS, INTERPRETED, N, NOT_FLOAT, NOT_SIZES, NOT_TENSORS, SEEDS, THREADS,  # noqa: E402,F401
                        TRITON_DEVICE, X_LAYOUTS, _AVAIL_CPU, _BATCH_SIZE, Input, _one_thread, _peak_rss_bytes, _replace,
                        assert_close, huge, make, num_threads, poisoned, reference, x_layout)


if torch.cuda.is_available():
    FAST += [(b, "cuda") for b in ("torch", "triton", "cuda") if kernelkit.backends("cuda")[b] == "available"]


def tolerance(dtype: torch.dtype, backend: str, device: str) -> float:
    """TOL[dtype]; twice that for bfloat16 under the Triton interpreter, which truncates fp32 -> bf16
    casts instead of rounding them (kernels/sparse.py, "Numerics"): the one rounding of each result
    may cost 2**-7 instead of 2**-8."""
    interpreted = backend == "triton" and device == "cpu"
    return TOL[dtype] * (2 if interpreted and dtype == torch.bfloat16 else 1)


def dtypes_for(backend: str, device: str) -> list[torch.dtype]:
    """The dtypes `backend` runs on `device`, by the op's own dispatch rule."""
    return [dt for dt in FLOATS if _supports(dt, torch.device(device))(backend) is None]


# ---- strategies: masks, batch shapes, layouts ---------------------------------------------------

# The strategies are flat tuples of single draws, built once: hypothesis's bookkeeping per draw,
# not the maths, is most of the cost of an example this small.

SIZES = [1, 2, 3, 5, 7, 8, 11, 13, 16, 17, 31, 37, 40]   # 1, odd, prime, powers of two, up to 40
SMALL_SIZES = [1, 2, 3, 5, 7, 11, 16]                     # the Triton interpreter
# how the mask is drawn: "random" at a drawn density, "holes" = random with some rows and columns
# emptied, "exact" = mask_from_scores at a drawn sparsity (what SparseLinear makes), and the extremes
MASK_KINDS = ["random", "holes", "empty", "full", "single", "exact"]
DENSITIES = [0.5, 0.1, 0.9, 0.25, 0.03, 0.75]


def make_mask(n_out: int, n_in: int, kind: str, density: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "empty":    # sparsity 1.0: no entry at all (the output is the bias)
        return torch.zeros(n_out, n_in, dtype=torch.bool)
    if kind == "full":     # sparsity 0
        return torch.ones(n_out, n_in, dtype=torch.bool)
    if kind == "single":   # one entry
        m = torch.zeros(n_out * n_in, dtype=torch.bool)
        m[int(torch.randint(n_out * n_in, (), generator=gen))] = True
        return m.view(n_out, n_in)
    if kind == "exact":
        return mask_from_scores(torch.rand(n_out, n_in, generator=gen), 1.0 - density)
    m = torch.rand(n_out, n_in, generator=gen) < density
    if kind == "holes":    # empty rows and empty columns (every other one, from a drawn offset)
        m[int(torch.randint(2, (), generator=gen))::2] = False
        m[:, int(torch.randint(2, (), generator=gen))::2] = False
    return m


@functools.lru_cache(maxsize=None)
def masks(big: bool = True):
    size = st.sampled_from(SIZES if big else SMALL_SIZES)
    return st.tuples(size, size, st.sampled_from(MASK_KINDS), st.sampled_from(DENSITIES), st.integers(0, 2**32 - 1)
                     ).map(lambda t: make_mask(*t))


def _batch(t, max_rows):
    n, *sizes = t
    sizes = list(sizes[:n])
    while math.prod(sizes) > max_rows:  # examples stay cheap
        sizes[sizes.index(max(sizes))] = 1
    return tuple(sizes)


@functools.lru_cache(maxsize=None)
def batch_shapes(max_rows: int = 100):
    return st.tuples(st.sampled_from([1, 0, 2, 3]), _BATCH_SIZE, _BATCH_SIZE, _BATCH_SIZE).map(
        lambda t: _batch(t, max_rows))


VEC_LAYOUTS = ["contiguous", "strided", "sliced", "expanded"]


def vec_layout(kind: str, n: int):
    """Views of a 1-D (n,) tensor: the values (nnz,) and the bias (n_out,)."""
    if kind == "strided":                     # stride 2
        return (2 * n,), lambda t: t[::2]
    if kind == "sliced":                      # a storage offset
        return (n + 3,), lambda t: t[2:n + 2]
    if kind == "expanded":                    # stride 0: every entry the same memory
        return (1,), lambda t: t.expand(n)
    return (n,), lambda t: t


def sparse_reference(layout: SparseLayout):
    """The float64 oracle on a CPU copy of the layout: f(x, values[, bias])."""
    layout = layout.to("cpu")
    return lambda x, values, *bias: sparse_linear_reference(x, values, layout, bias[0] if bias else None)


def path_event(backend: str, layout: SparseLayout, min_sparsity) -> None:
    threshold = BREAK_EVEN_SPARSITY[backend] if min_sparsity is None else float(min_sparsity)
    event("dense path" if layout.sparsity < threshold else "sparse kernels")
    s = layout.sparsity
    event("sparsity 1 (no entry)" if layout.nnz == 0 else ("sparsity 0" if s == 0 else "0 < sparsity < 1"))


# ---- sparse_linear: valid input -----------------------------------------------------------------

# (bias given, x needs grad, values need grad, bias needs grad): every subset of the inputs there are
BIAS_NEEDS = [(b, nx, nv, nb) for b in (True, False) for nx in (True, False) for nv in (True, False)
              for nb in ((True, False) if b else (False,)) if nx or nv or nb]
# 0: always the sparse kernels; None: the backend's break-even (the dense path below it); 0.5 and 1:
# the dense path except at high sparsity / an empty mask
MIN_SPARSITY = st.sampled_from([0, None, 0.0, 0.5, 1])


@functools.lru_cache(maxsize=None)
def linear_op_problems(backend, device, big=True, grads=False):
    X, V = st.sampled_from(X_LAYOUTS), st.sampled_from(VEC_LAYOUTS)
    bias_needs = (st.sampled_from(BIAS_NEEDS) if grads
                  else st.booleans().map(lambda b: (b, False, False, False)))
    return st.tuples(masks(big), batch_shapes(100 if big else 24), st.sampled_from(dtypes_for(backend, device)),
                     st.tuples(X, V, V, X), bias_needs, MIN_SPARSITY,
                     THREADS if backend == "cpu" else st.just(1), SEEDS
                     ).map(lambda t: _op_problem(backend, device, grads, *t))


def _op_problem(backend, device, grads, mask, batch, dtype, kinds, bias_needs, min_sparsity, threads, seed):
    has_bias, *need = bias_needs
    layout = SparseLayout.from_mask(mask)
    n_out, n_in = layout.shape
    note(f"shape={layout.shape} nnz={layout.nnz} batch={batch} dtype={dtype} layouts={kinds} bias={has_bias} "
         f"need={need} min_sparsity={min_sparsity} threads={threads} seed={seed}")
    event(f"dtype {str(dtype)[6:]}")
    event(f"x layout {kinds[0]}")
    event("empty batch" if 0 in batch else f"{len(batch)} leading dims")
    path_event(backend, layout, min_sparsity)
    gen = torch.Generator().manual_seed(seed)
    x = make(gen, x_layout(kinds[0], batch, n_in), dtype, device, need[0])
    values = make(gen, vec_layout(kinds[1], layout.nnz), dtype, device, need[1])
    bias = make(gen, vec_layout(kinds[2], n_out), dtype, device, need[2]) if has_bias else None
    g = make(gen, x_layout(kinds[3], batch, n_out), dtype, device) if grads else None
    return layout, x, values, bias, g, dtype, min_sparsity, threads, (*batch, n_out)


def check_op(backend, device, problem):
    layout, x, values, bias, g, dtype, min_sparsity, threads, out_shape = problem
    inputs = [t for t in (x, values, bias) if t is not None]
    dev_layout = layout.to(device)
    before = [t.leaf.detach().clone() for t in inputs]
    index_before = [t.clone() for t in dev_layout.index_tensors()]
    with num_threads(threads):
        out = sparse_linear(x.value, values.value, dev_layout, None if bias is None else bias.value,
                            backend=backend, min_sparsity=min_sparsity)
        if g is not None:
            out.backward(g.value)
    assert out.shape == out_shape and out.dtype == dtype and out.device.type == device
    for t, b in zip(inputs, before):
        assert torch.equal(t.leaf.detach(), b), "the op modified an input"
    for t, b in zip(dev_layout.index_tensors(), index_before):
        assert torch.equal(t, b), "the op modified the layout's index"
    (ref, ref_grads), (scale, scale_grads) = reference(sparse_reference(layout), inputs, g)
    tol = tolerance(dtype, backend, device)
    assert_close(out, ref, scale, tol, "out")
    if g is not None:
        wanted = [(name, t.leaf.grad) for name, t in zip(("dx", "dvalues", "dbias"), (x, values, bias))
                  if t is not None and t.leaf.requires_grad]
        assert len(wanted) == len(ref_grads)
        for (name, got), want, scale_ in zip(wanted, ref_grads, scale_grads):
            assert_close(got, want, scale_, tol, name)
        for name, t in zip(("x", "values", "bias"), (x, values, bias)):
            if t is not None and not t.leaf.requires_grad:
                assert t.leaf.grad is None, f"a gradient for {name}, which did not ask for one"


@pytest.mark.parametrize("case", FAST, ids=IDS)
@poisoned(max_examples=N)
@given(data=st.data())
def test_sparse_linear_forward_matches_float64_reference(poison, case, data):
    check_op(*case, data.draw(linear_op_problems(*case)))


@pytest.mark.parametrize("case", FAST, ids=IDS)
@poisoned(max_examples=N // 2)
@given(data=st.data())
def test_sparse_linear_backward_matches_float64_reference(poison, case, data):
    check_op(*case, data.draw(linear_op_problems(*case, grads=True)))


@pytest.mark.parametrize("case", INTERPRETED, ids=IDS)
@poisoned(max_examples=max(N // 10, 1))
@given(data=st.data())
def test_sparse_linear_triton_interpreted_forward(poison, case, data):
    check_op(*case, data.draw(linear_op_problems(*case, big=False)))


@pytest.mark.parametrize("case", INTERPRETED, ids=IDS)
@poisoned(max_examples=max(N // 20, 1))
@given(data=st.data())
def test_sparse_linear_triton_interpreted_backward(poison, case, data):
    check_op(*case, data.draw(linear_op_problems(*case, big=False, grads=True)))


# ---- SparseLayout.from_csr / from_mask: valid input ---------------------------------------------

INDEX_DTYPES = st.sampled_from([torch.int64, torch.int32])
INDEX_LAYOUTS = st.sampled_from(["contiguous", "strided", "sliced"])


def index_view(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same 1-D index as a non-contiguous view (stride 2) or at a storage offset."""
    if kind == "strided":
        return torch.stack([t, torch.full_like(t, -7)], 1).reshape(-1)[::2]
    if kind == "sliced":
        return torch.cat([t.new_full((3,), -7), t])[3:]
    return t


def torch_csr(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(crow_indices, col_indices), int64, of a dense mask by torch's own CSR conversion."""
    with warnings.catch_warnings():  # torch's "beta" notice of CSR
        warnings.simplefilter("ignore", UserWarning)
        csr = mask.to_sparse_csr()
    return csr.crow_indices(), csr.col_indices()


def transposed_index(mask: torch.Tensor):
    """(col_ptr, row_idx, perm) computed independently of format.py: the CSR position of every entry
    as a dense map, read column by column."""
    n_out, n_in = mask.shape
    pos = torch.full((n_out, n_in), -1, dtype=torch.int64)
    pos[mask] = torch.arange(int(mask.sum()))             # row-major order = CSR order
    col_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(0).cumsum(0)])
    rows = torch.arange(n_out).unsqueeze(1).expand(n_out, n_in)
    return col_ptr, rows.t()[mask.t()].to(torch.int32), pos.t()[mask.t()]


@settings(max_examples=N // 2)
@given(mask=masks(), dtypes=st.tuples(INDEX_DTYPES, INDEX_DTYPES), kinds=st.tuples(INDEX_LAYOUTS, INDEX_LAYOUTS),
       mask_dtype=st.sampled_from([torch.bool, torch.float32, torch.int64, torch.uint8]))
def test_layout_from_csr_round_trips_to_the_mask_and_transposed_index(mask, dtypes, kinds, mask_dtype):
    """from_csr(the mask's CSR) is from_mask(mask): the same five index tensors (dtypes int64, int32,
    int64, int32, int64, contiguous), the same mask back, and a transposed index that reads every
    entry by column; the user's arrays are not modified or aliased."""
    n_out, n_in = mask.shape
    event(f"row_ptr {str(dtypes[0])[6:]} {kinds[0]}, col_idx {str(dtypes[1])[6:]} {kinds[1]}")
    crow, cols = torch_csr(mask)
    row_ptr = index_view(crow.to(dtypes[0]), kinds[0])
    col_idx = index_view(cols.to(dtypes[1]), kinds[1])
    rp_before, ci_before = row_ptr.clone(), col_idx.clone()
    # any nonzero of any dtype is kept by from_mask: nonzero values other than 1 too
    weights = (mask.to(mask_dtype) * (torch.arange(mask.numel()).view(mask.shape) % 3 + 1)).to(mask_dtype)
    a = SparseLayout.from_csr(row_ptr, col_idx, (n_out, n_in))
    b = SparseLayout.from_mask(weights)
    assert torch.equal(row_ptr, rp_before) and torch.equal(col_idx, ci_before), "from_csr modified its input"
    nnz = int(mask.sum())
    col_ptr, row_idx, perm = transposed_index(mask)
    want = (crow, cols.to(torch.int32), col_ptr, row_idx, perm)
    for layout in (a, b):
        assert layout.shape == (n_out, n_in) and layout.nnz == nnz
        assert layout.sparsity == pytest.approx(1 - nnz / (n_out * n_in), abs=1e-15)
        assert torch.equal(layout.mask(), mask)
        for name, got, exp in zip(("row_ptr", "col_idx", "col_ptr", "row_idx", "perm"), layout.index_tensors(), want):
            assert got.dtype == exp.dtype and got.is_contiguous(), f"{name}: {got.dtype}, strides {got.stride()}"
            assert torch.equal(got, exp), f"{name}: {got.tolist()} != {exp.tolist()}"
    for user in (row_ptr, col_idx):
        for t in a.index_tensors():
            assert user.numel() == 0 or t.numel() == 0 or user.data_ptr() != t.data_ptr(), "aliases the user's array"


# ---- SparseLinear: valid input ------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def layer_problems(backend, device, big=True):
    X = st.sampled_from(X_LAYOUTS)
    # mask=None: the layer draws its own at `sparsity`; else the drawn mask (any sparsity, also 1.0)
    how = st.one_of(st.sampled_from([0.9, 0.0, 0.5, 0.99, 0.75]).map(lambda s: ("sparsity", s)),
                    masks(big).map(lambda m: ("mask", m)))
    size = st.sampled_from(SIZES if big else SMALL_SIZES)
    return st.tuples(how, st.booleans(), batch_shapes(100 if big else 24), st.sampled_from(dtypes_for(backend, device)),
                     X, X, MIN_SPARSITY, THREADS if backend == "cpu" else st.just(1), SEEDS, st.tuples(size, size)
                     ).map(lambda t: _layer_problem(backend, device, *t))


def _layer_problem(backend, device, how, bias, batch, dtype, x_kind, g_kind, min_sparsity, threads, seed, sizes):
    kind, arg = how
    if kind == "mask":
        out_f, in_f = arg.shape
        kw = {"mask": arg}
    else:
        out_f, in_f = sizes
        kw = {"sparsity": arg}
    note(f"in={in_f} out={out_f} {kind}={arg if kind == 'sparsity' else int(arg.sum())} bias={bias} batch={batch} "
         f"dtype={dtype} layouts={x_kind},{g_kind} min_sparsity={min_sparsity} threads={threads} seed={seed}")
    event(f"dtype {str(dtype)[6:]}")
    event(f"layer from a {kind}")
    with torch.random.fork_rng(devices=[]):  # the layer's own mask and init from the drawn seed
        torch.manual_seed(seed)
        layer = SparseLinear(in_f, out_f, bias=bias, device=device, dtype=dtype, backend=backend,
                             min_sparsity=min_sparsity, **kw)
    path_event(backend, layer.layout, min_sparsity)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # values from the drawn seed (|v| <= 1), not nn.Linear's small init
        for prm in layer.parameters():
            prm.copy_(torch.rand(prm.shape, generator=gen, dtype=torch.float64) * 2 - 1)
    x = make(gen, x_layout(x_kind, batch, in_f), dtype, device, grad=True)
    g = make(gen, x_layout(g_kind, batch, out_f), dtype, device)
    return layer, kind, arg, x, g, dtype, threads, (*batch, out_f)


def check_layer(backend, device, problem):
    layer, kind, arg, x, g, dtype, threads, out_shape = problem
    out_f, in_f = layer.out_features, layer.in_features
    if kind == "mask":
        assert torch.equal(layer.mask.cpu(), arg), "the layer does not keep the given mask"
    else:
        assert layer.nnz == round((1 - arg) * out_f * in_f), f"nnz {layer.nnz} at sparsity {arg}"
    assert layer.values.shape == (layer.nnz,) and layer.values.dtype == dtype
    with num_threads(threads):
        out = layer(x.value)
        out.backward(g.value)
    assert out.shape == out_shape and out.dtype == dtype
    params = [Input(prm, lambda t: t) for prm in (layer.values, layer.bias) if prm is not None]
    (ref, ref_grads), (scale, scale_grads) = reference(sparse_reference(layer.layout), [x, *params], g)
    tol = tolerance(dtype, backend, device)
    assert_close(out, ref, scale, tol, "out")
    got = [x.leaf.grad] + [prm.leaf.grad for prm in params]
    for name, a, b, c in zip(("dx", "dvalues", "dbias"), got, ref_grads, scale_grads):
        assert_close(a, b, c, tol, name)
    dense, mask = layer.to_dense(), layer.mask
    assert dense.shape == (out_f, in_f) and not dense[~mask].any(), "to_dense has entries off the mask"
    assert torch.equal(dense[mask], layer.values.detach()), "to_dense does not place the values in CSR order"


@pytest.mark.parametrize("case", FAST, ids=IDS)
@poisoned(max_examples=N // 2)
@given(data=st.data())
def test_sparse_linear_layer_forward_backward_match_float64_reference(poison, case, data):
    check_layer(*case, data.draw(layer_problems(*case)))


@pytest.mark.parametrize("case", INTERPRETED, ids=IDS)
@poisoned(max_examples=max(N // 25, 1))
@given(data=st.data())
def test_sparse_linear_layer_triton_interpreted(poison, case, data):
    check_layer(*case, data.draw(layer_problems(*case, big=False)))


@settings(max_examples=N // 5)
@given(dims=st.tuples(st.sampled_from(SIZES), st.sampled_from(SIZES)), bias=st.booleans(),
       dtype=st.sampled_from(FLOATS), sparsity=st.sampled_from([0.9, 0.0, 0.5, 0.99, 0.3]) | st.floats(0, 0.999),
       method=st.sampled_from(["magnitude", "random"]), ties=st.booleans(), batch=batch_shapes(), seed=SEEDS)
def test_from_linear_keeps_the_largest_or_random_weights_exactly(dims, bias, dtype, sparsity, method, ties, batch,
                                                                  seed):
    """round((1 - s) * numel) weights kept, with their values and the bias; "magnitude" keeps the
    largest |w| (ties broken by position, lowest first); the layer computes F.linear with the
    masked weight; the nn.Linear is not modified."""
    out_f, in_f = dims
    event(f"{method}{' with ties' if ties else ''}")
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    with torch.no_grad():
        w = torch.rand(out_f, in_f, generator=gen, dtype=torch.float64) * 2 - 1
        if ties:  # few distinct magnitudes, both signs: ties across the cut
            w = (w * 4).round() / 4
        lin.weight.copy_(w)
        if bias:
            lin.bias.copy_(torch.rand(out_f, generator=gen, dtype=torch.float64) * 2 - 1)
    before = [p.detach().clone() for p in lin.parameters()]
    with warnings.catch_warnings():  # 16-bit: the default choice falls back from cpu to torch
        warnings.simplefilter("ignore", kernelkit.KernelkitFallbackWarning)
        layer = SparseLinear.from_linear(lin, sparsity, method, generator=torch.Generator().manual_seed(seed))
        x = torch.rand(*batch, in_f, generator=gen, dtype=torch.float64).to(dtype) * 2 - 1
        out = layer(x)
    W = lin.weight.detach()
    keep = round((1 - sparsity) * out_f * in_f)
    mask = layer.mask
    assert layer.nnz == keep and int(mask.sum()) == keep and layer.values.dtype == dtype
    assert torch.equal(layer.values.detach(), W[mask]), "the kept values are not linear's weights"
    assert (layer.bias is None) == (not bias) and (not bias or torch.equal(layer.bias.detach(), lin.bias.detach()))
    if method == "magnitude" and 0 < keep < W.numel():
        a = W.abs().reshape(-1).double()
        kept, flat = a[mask.reshape(-1)], mask.reshape(-1)
        cut = kept.min()
        assert cut >= a[~flat].max(), "a dropped weight is larger than a kept one"
        tied = torch.nonzero(a == cut).reshape(-1)       # among ties at the cut, the lowest positions win
        assert torch.equal(flat[tied], torch.arange(tied.numel()) < int(flat[tied].sum()))
    for p, b in zip(lin.parameters(), before):
        assert torch.equal(p.detach(), b), "from_linear modified the nn.Linear"
    cast = lambda t: None if t is None else t.detach().double()  # noqa: E731
    ref = F.linear(x.double(), (W * mask).double(), cast(lin.bias))
    scale = F.linear(x.double().abs(), (W * mask).double().abs(), None if not bias else cast(lin.bias).abs())
    assert_close(out, ref, scale, TOL[dtype], "out")


# ---- autocast -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", None])  # None: the default choice (a fallback for 16-bit)
@settings(max_examples=N // 5)
@given(data=st.data())
def test_sparse_linear_under_autocast_casts_like_f_linear(backend, data):
    """Under torch.autocast every float32/float16/bfloat16 input is cast to the autocast dtype, so
    mixed dtypes are fine; float64 is never cast, so a float64 input among cast ones is a dtype
    mismatch (TypeError), as it is for F.linear."""
    mask, batch, ac, dts, has_bias, ms, seed = data.draw(st.tuples(
        masks(), batch_shapes(), st.sampled_from([torch.bfloat16, torch.float16]),
        st.tuples(*[st.sampled_from(FLOATS)] * 3), st.booleans(), MIN_SPARSITY, SEEDS))
    dts = dts if has_bias else dts[:2]
    event(f"inputs {'/'.join(str(d)[6:] for d in dts)}")
    layout = SparseLayout.from_mask(mask)
    gen = torch.Generator().manual_seed(seed)
    shapes = ((*batch, layout.n_in), (layout.nnz,), (layout.n_out,))
    ts = [torch.rand(shape, generator=gen, dtype=torch.float64).to(dt) * 2 - 1 for shape, dt in zip(shapes, dts)]
    bias = ts[2] if has_bias else None
    with warnings.catch_warnings(), torch.autocast("cpu", dtype=ac):
        warnings.simplefilter("ignore", kernelkit.KernelkitFallbackWarning)
        if torch.float64 in dts and set(dts) != {torch.float64}:
            with pytest.raises(TypeError, match="has dtype"):
                sparse_linear(ts[0], ts[1], layout, bias, backend=backend, min_sparsity=ms)
            return
        out = sparse_linear(ts[0], ts[1], layout, bias, backend=backend, min_sparsity=ms)
    want = torch.float64 if dts[0] == torch.float64 else ac  # all float64: nothing is cast
    assert out.dtype == want
    cast = [t.to(want).double() for t in ts] + [None] * (not has_bias)
    ref = sparse_linear_reference(cast[0], cast[1], layout, cast[2])
    scale = sparse_linear_reference(*(None if t is None else t.abs() for t in cast[:2]), layout,
                                    None if cast[2] is None else cast[2].abs())
    assert_close(out, ref, scale, TOL[want], "out")


# ---- sizes past 32-bit indexing ---------------------------------------------------------------


@st.composite
def huge_rows(draw):
    """(x shape with more than 2**31 - 1 rows over 1 or 2 leading dims, a small mask, dtype)."""
    rows = _INT32_MAX + 1 + draw(st.integers(0, 1000) | st.integers(2**31, 2**40))
    lead = (2**20, -(-rows // 2**20)) if draw(st.booleans()) else (rows,)
    mask = draw(masks(big=False))
    note(f"lead={lead} shape={tuple(mask.shape)}")
    return (*lead, mask.shape[1]), mask, draw(st.sampled_from(FLOATS))


@pytest.mark.skipif(TRITON_DEVICE is None, reason="no triton backend here")
@settings(max_examples=N // 10)
@given(problem=huge_rows())
def test_sparse_linear_rows_past_int32_raise_before_allocating(problem):
    """backend='triton' puts the batch tiles on grid axis 0: more rows than 2**31 - 1 is a ValueError
    naming them, raised before any copy (no stride-0 x is materialised: the peak memory of the process
    does not grow) and before any launch."""
    shape, mask, dtype = problem
    layout = SparseLayout.from_mask(mask).to(TRITON_DEVICE)
    x, values = huge(shape, dtype, TRITON_DEVICE), torch.zeros(layout.nnz, dtype=dtype, device=TRITON_DEVICE)
    peak = _peak_rss_bytes()
    with pytest.raises(ValueError) as e:
        sparse_linear(x, values, layout, backend="triton", min_sparsity=0)
    assert e.type is ValueError
    assert "rows of x" in str(e.value) and str(_INT32_MAX) in str(e.value), str(e.value)
    assert _peak_rss_bytes() - peak < 2**28, "a huge input was materialised before the size check"


@settings(max_examples=N // 10)
@given(problem=huge_rows(), ms=MIN_SPARSITY)
def test_sparse_linear_torch_backend_takes_rows_past_int32(problem, ms):
    """The torch backend has no 32-bit limit: on meta tensors (shapes only) it answers the shape."""
    shape, mask, dtype = problem
    layout = SparseLayout.from_mask(mask).to("meta")
    x, values = huge(shape, dtype, "meta"), torch.zeros(layout.nnz, dtype=dtype, device="meta")
    for backend in ("torch", None):  # None: the meta device's default, torch
        out = sparse_linear(x, values, layout, backend=backend, min_sparsity=ms)
        assert out.shape == (*shape[:-1], layout.n_out) and out.device.type == "meta" and out.dtype == dtype


M = _INT32_MAX


@pytest.mark.parametrize("backend, rows, raises", [
    ("triton", M, False), ("triton", M + 1, True), ("triton", 2**40, True),
    ("cuda", M, False), ("cuda", M + 1, True),
    ("torch", 2**40, False), ("cpu", 2**40, False),
])
def test_index_range_limits_are_exact(backend, rows, raises):
    layout = SparseLayout.from_mask(torch.ones(3, 5, dtype=torch.bool))
    if raises:
        with pytest.raises(ValueError, match=f"exceeds {M}"):
            check_index_range("f", backend, rows, layout)
    else:
        check_index_range("f", backend, rows, layout)


# ---- sparse_linear: bad input -------------------------------------------------------------------

# min_sparsity: outside [0, 1], NaN and infinities, and things that are not numbers
BAD_MIN_SPARSITY = ([-0.1, -1, 1.0000001, 2, 1.5, float("nan"), float("inf"), -float("inf"), "0.5", "", [0.5],
                     (0,), 0.5j, torch.tensor(0.5), b"0"])


@st.composite
def valid_op_inputs(draw, dtypes=FLOATS):
    mask, batch, dtype, seed = draw(st.tuples(masks(big=False), batch_shapes(24), st.sampled_from(dtypes), SEEDS))
    layout = SparseLayout.from_mask(mask)
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    return mk(*batch, layout.n_in), mk(layout.nnz), layout, mk(layout.n_out)


OP_NAMES = {0: "x", 1: "values", 3: "bias"}   # positions in (x, values, layout, bias)


def _not_dense(draw, t):
    how = draw(st.sampled_from(["sparse_coo", "sparse_csr", "nested", "jagged"]))
    with warnings.catch_warnings():  # "prototype"/"beta" notices of torch
        warnings.simplefilter("ignore", UserWarning)
        if how in ("nested", "jagged"):
            return torch.nested.nested_tensor([t, t], layout=torch.jagged if how == "jagged" else torch.strided)
        if how == "sparse_csr" and t.dim() >= 2 and t.numel() > 0:  # (CSR needs both)
            return t.to_sparse_csr()
        return t.to_sparse()


@st.composite
def bad_op_call(draw, kind):
    """(args, kwargs, exception type, text the message must contain) with exactly one defect."""
    x, values, layout, bias = draw(valid_op_inputs())
    args = [x, values, layout, bias if draw(st.booleans()) else None]
    kw = {"backend": draw(st.sampled_from([None, "torch"])), "min_sparsity": draw(MIN_SPARSITY)}
    i = draw(st.sampled_from([0, 1, 3]))   # which tensor argument gets the defect
    args[3] = bias if i == 3 else args[3]
    name, t = OP_NAMES[i], args[i]
    if kind == "not_a_tensor":
        bad = draw(st.sampled_from(NOT_TENSORS + ["list", "numpy", "tuple"]))
        bad = {"list": t.float().tolist(), "numpy": t.float().numpy(), "tuple": (t,)}.get(bad, bad)
        if i == 3 and bad is None:   # a None bias is no bias
            bad = 0.0
        return _replace(args, i, bad), kw, TypeError, f"{name} must be a torch.Tensor"
    if kind == "not_float":
        dt = draw(st.sampled_from(NOT_FLOAT))
        return _replace(args, i, t.to(dt)), kw, TypeError, f"{name} must be float32/float64/float16/bfloat16"
    if kind == "not_dense":
        return _replace(args, i, _not_dense(draw, t)), kw, TypeError, f"{name} must be a dense (strided) tensor"
    if kind == "wrong_rank":
        if i == 0:
            return _replace(args, 0, t.sum()), kw, ValueError, "x must have at least 1 dimension"
        bad = draw(st.sampled_from([lambda v: v.sum(), lambda v: v[None], lambda v: v[:, None],
                                    lambda v: v[None, None]]))(t)
        return _replace(args, i, bad), kw, ValueError, f"{name} must be 1-D"
    if kind == "values_length":
        n = draw(st.integers(0, layout.nnz + 5).filter(lambda v: v != layout.nnz))
        return _replace(args, 1, torch.zeros(n, dtype=x.dtype)), kw, ValueError, "values must have the layout's nnz"
    if kind == "bias_length":
        n = draw(st.integers(0, layout.n_out + 5).filter(lambda v: v != layout.n_out))
        return _replace(args, 3, torch.zeros(n, dtype=x.dtype)), kw, ValueError, "bias must have n_out"
    if kind == "x_width":
        width = draw(st.integers(0, layout.n_in + 5).filter(lambda v: v != layout.n_in))
        bad = torch.zeros(*x.shape[:-1], width, dtype=x.dtype)
        return _replace(args, 0, bad), kw, ValueError, "x.shape[-1] must equal the weight's n_in"
    if kind == "dtype_mismatch":   # values and bias are compared with x
        other = draw(st.sampled_from([d for d in FLOATS if d != t.dtype]))
        return _replace(args, i, t.to(other)), kw, TypeError, f"{name} has dtype" if i else f"but x has {other}"
    if kind == "device_mismatch":
        if draw(st.booleans()):     # the layout on another device than x
            return _replace(args, 2, layout.to("meta")), kw, ValueError, "layout is on meta but x is on cpu"
        return _replace(args, i, t.to("meta")), kw, ValueError, f"{name} is on meta" if i else "but x is on meta"
    if kind == "not_a_layout":
        bad = draw(st.sampled_from(["mask", "csr", "tuple", "none", "dense", "str"]))
        with warnings.catch_warnings():  # torch's "beta" notice of CSR
            warnings.simplefilter("ignore", UserWarning)
            bad = {"mask": lambda: layout.mask(), "csr": lambda: layout.to_dense(values).to_sparse_csr(),
                   "tuple": lambda: (layout.row_ptr, layout.col_idx), "none": lambda: None,
                   "dense": lambda: layout.to_dense(values), "str": lambda: "csr"}[bad]()
        return _replace(args, 2, bad), kw, TypeError, "layout must be a kernelkit.sparse.SparseLayout"
    if kind == "bad_backend":
        unknown = st.sampled_from(["gpu", "CPU", "Torch", "", "cuda:0", " cpu", "triton "]) | st.text(max_size=8)
        name_ = draw(unknown.filter(lambda b: b not in kernelkit._backend.BACKENDS))
        if draw(st.booleans()):
            return args, {**kw, "backend": name_}, ValueError, "backend must be one of"
        bad = draw(st.sampled_from([1, 0.5, b"cpu", ["cpu"], ("cpu",), torch.device("cpu")]))
        return args, {**kw, "backend": bad}, TypeError, "backend must be a str"
    if kind == "unavailable_backend":
        if draw(st.booleans()) or _AVAIL_CPU["cpu"] != "available":   # CPU tensors: never the cuda backend
            return args, {**kw, "backend": "cuda"}, kernelkit.BackendUnavailableError, "backend 'cuda'"
        lowp = draw(st.sampled_from([torch.float16, torch.bfloat16]))
        args = [a.to(lowp) if isinstance(a, torch.Tensor) else a for a in args]
        return args, {**kw, "backend": "cpu"}, kernelkit.BackendUnavailableError, "backend 'cpu'"
    if kind == "min_sparsity":
        bad = draw(st.sampled_from(BAD_MIN_SPARSITY) | st.floats(allow_nan=False).filter(lambda v: not 0 <= v <= 1))
        return args, {**kw, "min_sparsity": bad}, ValueError, "min_sparsity must be a number in [0, 1]"
    raise AssertionError(kind)


OP_BAD_KINDS = ["not_a_tensor", "not_float", "not_dense", "wrong_rank", "values_length", "bias_length", "x_width",
                "dtype_mismatch", "device_mismatch", "not_a_layout", "bad_backend", "unavailable_backend",
                "min_sparsity"]


@pytest.mark.parametrize("kind", OP_BAD_KINDS)
@settings(max_examples=N // 10)
@given(data=st.data())
def test_sparse_linear_bad_input_raises_the_documented_error(kind, data):
    args, kw, exc, text = data.draw(bad_op_call(kind))
    with pytest.raises(exc) as e:
        sparse_linear(*args, **kw)
    assert e.type is exc, f"{e.type.__name__} instead of {exc.__name__}: {e.value}"
    assert text in str(e.value), f"message does not name the argument ({text!r}): {e.value}"


# ---- SparseLayout.from_csr: bad input -----------------------------------------------------------

@st.composite
def valid_csr(draw, min_out=1, min_nnz=0, min_row=0):
    """(row_ptr, col_idx, shape) of a random mask: at least min_out rows, min_nnz entries and one row
    with min_row entries."""
    mask = draw(masks(big=False).filter(
        lambda m: m.shape[0] >= min_out and int(m.sum()) >= min_nnz and int(m.sum(1).max()) >= min_row))
    crow, cols = torch_csr(mask)
    dts = draw(st.tuples(INDEX_DTYPES, INDEX_DTYPES))
    return crow.to(dts[0]), cols.to(dts[1]), tuple(mask.shape)


@st.composite
def bad_csr_call(draw, kind):
    """(row_ptr, col_idx, shape, exception type, text the message must contain): exactly one defect."""
    if kind == "row_ptr_decreasing":
        rp, ci, shape = draw(valid_csr(min_out=2, min_nnz=1))
    elif kind in ("col_idx_out_of_range",):
        rp, ci, shape = draw(valid_csr(min_nnz=1))
    elif kind in ("col_idx_unsorted", "col_idx_duplicate"):
        rp, ci, shape = draw(valid_csr(min_row=2))
    else:
        rp, ci, shape = draw(valid_csr())
    n_out, n_in = shape
    rp, ci = rp.clone(), ci.clone()
    which = draw(st.sampled_from(["row_ptr", "col_idx"]))
    arrays = {"row_ptr": rp, "col_idx": ci}
    t = arrays[which]

    def with_(name, value):
        new = dict(arrays, **{name: value})
        return new["row_ptr"], new["col_idx"], shape

    if kind == "not_a_tensor":
        bad = draw(st.sampled_from([None, 3, "row_ptr", "list", "numpy"]))
        bad = {"list": t.tolist(), "numpy": t.numpy()}.get(bad, bad)
        return (*with_(which, bad), TypeError, f"{which} must be a torch.Tensor")
    if kind == "wrong_dtype":
        dt = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bool, torch.int16, torch.int8,
                                   torch.uint8, torch.complex64]))
        return (*with_(which, t.to(dt)), TypeError, f"{which} must be an int32 or int64 tensor")
    if kind == "wrong_rank":
        bad = draw(st.sampled_from([lambda v: v[None], lambda v: v[:, None], lambda v: v.sum(),
                                    lambda v: v.reshape(1, 1, -1)]))(t)
        return (*with_(which, bad), ValueError, f"{which} must be 1-D")
    if kind == "row_ptr_length":      # an entry too many (repeating the last) or too few (one dropped)
        if draw(st.booleans()) or n_out == 1:
            bad = torch.cat([rp, rp[-1:].repeat(draw(st.integers(1, 3)))])
        else:
            j = draw(st.integers(1, n_out - 1))
            bad = torch.cat([rp[:j], rp[j + 1:]])
        return (*with_("row_ptr", bad), ValueError, f"row_ptr must have n_out+1 = {n_out + 1} entries")
    if kind == "row_ptr_start":       # row_ptr[0] != 0, still non-decreasing
        far = 2**31 if rp.dtype == torch.int32 else 2**40
        rp[0] = -draw(st.integers(1, far)) if rp[1] == 0 or draw(st.booleans()) else draw(st.integers(1, int(rp[1])))
        return rp, ci, shape, ValueError, "row_ptr[0] must be 0"
    if kind == "row_ptr_decreasing":  # an interior entry above the next one: the first decrease at r + 1
        r = draw(st.integers(1, n_out - 1))
        rp[r] = rp[r + 1] + draw(st.integers(1, 5))
        return rp, ci, shape, ValueError, f"row_ptr must not decrease, but row_ptr[{r + 1}]"
    if kind == "row_ptr_end":         # row_ptr[-1] != nnz, still non-decreasing
        nnz, prev = ci.numel(), int(rp[-2])
        above = st.integers(nnz + 1, nnz + 5)
        rp[-1] = draw(above | st.integers(prev, nnz - 1) if prev < nnz else above)
        return rp, ci, shape, ValueError, f"row_ptr[-1] must equal len(col_idx) = {nnz}"
    if kind == "col_idx_out_of_range":
        k = draw(st.integers(0, ci.numel() - 1))
        v = draw(st.integers(-2**31, -1) | st.integers(n_in, n_in + 3) | st.integers(2**31 - 1, 2**31 - 1))
        if ci.dtype == torch.int64:
            v = draw(st.just(v) | st.integers(2**31, 2**40) | st.integers(-2**40, -2**31))
        ci[k] = v
        return rp, ci, shape, ValueError, f"col_idx[{k}] = {v} is out of range [0, {n_in})"
    if kind in ("col_idx_unsorted", "col_idx_duplicate"):
        lengths = (rp[1:] - rp[:-1]).tolist()
        r = draw(st.sampled_from([i for i, n in enumerate(lengths) if n >= 2]))
        k = int(rp[r]) + draw(st.integers(1, lengths[r] - 1))   # k - 1 and k in row r
        if kind == "col_idx_unsorted":
            ci[k - 1], ci[k] = ci[k].clone(), ci[k - 1].clone()
        else:
            ci[k] = ci[k - 1]
        return (rp, ci, shape, ValueError,
                f"col_idx must be strictly increasing within each row, but in row {r} col_idx[{k}]")
    if kind == "device_mismatch":
        text = "row_ptr is on meta" if which == "row_ptr" else "but col_idx is on meta"
        return (*with_(which, t.to("meta")), ValueError, text)
    if kind == "shape_not_2d":
        bad = draw(st.sampled_from([(n_out,), (n_out, n_in, 1), (), (1, n_out, n_in), [n_out, n_in, 2]]))
        return rp, ci, bad, ValueError, "the weight must be 2-D (n_out, n_in), got shape"
    if kind == "shape_not_positive":
        bad = draw(st.sampled_from([(0, n_in), (n_out, 0), (-n_out, n_in), (n_out, -1), (0, 0), (-(2**40), n_in)]))
        return rp, ci, bad, ValueError, "dimensions must be > 0, got shape"
    if kind == "shape_too_large":
        big = draw(st.integers(2**31, 2**31 + 3) | st.integers(2**31, 2**62))
        bad = draw(st.sampled_from([(big, n_in), (n_out, big), (big, big)]))
        return rp, ci, bad, ValueError, "each dimension must be < 2**31 (32-bit indices), got shape"
    raise AssertionError(kind)


CSR_BAD_KINDS = ["not_a_tensor", "wrong_dtype", "wrong_rank", "row_ptr_length", "row_ptr_start",
                 "row_ptr_decreasing", "row_ptr_end", "col_idx_out_of_range", "col_idx_unsorted",
                 "col_idx_duplicate", "device_mismatch", "shape_not_2d", "shape_not_positive", "shape_too_large"]


@pytest.mark.parametrize("kind", CSR_BAD_KINDS)
@settings(max_examples=N // 10)
@given(data=st.data())
def test_layout_from_csr_bad_input_raises_the_documented_error(kind, data):
    rp, ci, shape, exc, text = data.draw(bad_csr_call(kind))
    peak = _peak_rss_bytes()
    with pytest.raises(exc) as e:
        SparseLayout.from_csr(rp, ci, shape)
    assert e.type is exc, f"{e.type.__name__} instead of {exc.__name__}: {e.value}"
    assert "SparseLayout.from_csr" in str(e.value) and text in str(e.value), \
        f"message does not name the argument ({text!r}): {e.value}"
    assert _peak_rss_bytes() - peak < 2**28, "a huge shape was allocated before the check"


# ---- SparseLinear and SparseLinear.from_linear: bad input ----------------------------------------

# sparsity of a layer: [0, 1) only -- 1 would remove every weight; NaN; bools and non-numbers
BAD_SPARSITY = [1.0, 1, 1.5, -0.1, -1, float("nan"), float("inf"), -float("inf"), True, False, "0.5", None, [0.5],
                0.5j, b"0"]


@st.composite
def bad_layer_call(draw, kind):
    """(thunk, exception type, text the message must contain)."""
    in_f, out_f = draw(st.sampled_from(SMALL_SIZES)), draw(st.sampled_from(SMALL_SIZES))
    dtype = draw(st.sampled_from(FLOATS))
    args = {"in_features": in_f, "out_features": out_f}
    sparsity = st.sampled_from(BAD_SPARSITY) | st.floats(allow_nan=False).filter(lambda v: not 0 <= v < 1)
    if kind == "constructor_size":
        which = draw(st.sampled_from(sorted(args)))
        args[which] = draw(st.sampled_from(NOT_SIZES) | st.integers(max_value=0))
        return lambda: SparseLinear(**args), ValueError, f"SparseLinear: {which} must be a positive int"
    if kind == "constructor_sparsity":
        bad = draw(sparsity)
        return (lambda: SparseLinear(**args, sparsity=bad), ValueError,
                "SparseLinear: sparsity must be a number in [0, 1)")
    if kind == "constructor_mask_shape":
        shapes = [(in_f, out_f), (out_f, in_f + 1), (out_f + 1, in_f), (out_f * in_f,), (1, out_f, in_f), ()]
        shape = draw(st.sampled_from([s for s in shapes if s != (out_f, in_f)]))
        bad = draw(st.sampled_from(["tensor", "list", "numpy"]))
        m = torch.ones(shape, dtype=torch.bool)
        bad = {"tensor": m, "list": torch.ones(out_f, in_f).tolist(), "numpy": np.ones((out_f, in_f), bool)}[bad]
        return lambda: SparseLinear(**args, mask=bad), ValueError, "SparseLinear: mask must be a tensor of shape"
    if kind == "constructor_dtype":
        bad = draw(st.sampled_from(NOT_FLOAT + ["float32", np.float32, float, torch.float]))
        if bad is torch.float:   # torch.float is float32: a valid dtype; its Python cousin is not
            bad = "float"
        return lambda: SparseLinear(**args, dtype=bad), TypeError, "SparseLinear: dtype must be"
    if kind == "constructor_backend":
        bad = draw(st.sampled_from(["gpu", "CPU", "", "cuda:0", 1, ["cpu"], torch.device("cpu")]))
        if isinstance(bad, str):
            return lambda: SparseLinear(**args, backend=bad), ValueError, "backend must be one of"
        return lambda: SparseLinear(**args, backend=bad), TypeError, "backend must be a str"
    if kind == "from_linear_sparsity":
        bad = draw(sparsity)
        lin = torch.nn.Linear(in_f, out_f, dtype=dtype)
        return (lambda: SparseLinear.from_linear(lin, bad), ValueError,
                "SparseLinear.from_linear: sparsity must be a number in [0, 1)")
    if kind == "from_linear_method":
        bad = draw(st.sampled_from(["Magnitude", "rand", "", "topk", None, 1, "magnitude "]))
        lin = torch.nn.Linear(in_f, out_f, dtype=dtype)
        return (lambda: SparseLinear.from_linear(lin, 0.5, bad), ValueError,
                "SparseLinear.from_linear: method must be 'magnitude' or 'random'")
    if kind == "from_linear_not_linear":
        bad = draw(st.sampled_from(["conv", "sequential", "weight", "sparse", "none", "bilinear"]))
        bad = {"conv": lambda: torch.nn.Conv1d(in_f, out_f, 1), "none": lambda: None,
               "sequential": lambda: torch.nn.Sequential(torch.nn.Linear(in_f, out_f)),
               "weight": lambda: torch.zeros(out_f, in_f), "sparse": lambda: SparseLinear(in_f, out_f),
               "bilinear": lambda: torch.nn.Bilinear(in_f, in_f, out_f)}[bad]()
        return (lambda: SparseLinear.from_linear(bad, 0.5), TypeError,
                "SparseLinear.from_linear: linear must be an nn.Linear")
    layer = SparseLinear(in_f, out_f, bias=draw(st.booleans()), sparsity=draw(st.sampled_from([0.0, 0.5, 0.9])),
                         dtype=dtype, min_sparsity=draw(MIN_SPARSITY))
    batch = draw(batch_shapes(24))
    x = torch.zeros(*batch, in_f, dtype=dtype)
    if kind == "x_width":
        width = draw(st.integers(0, 30).filter(lambda w: w != in_f))
        bad = torch.zeros(*batch, width, dtype=dtype)
        return lambda: layer(bad), ValueError, f"x.shape[-1] must be in_features={in_f}"
    if kind == "x_rank":
        return lambda: layer(torch.zeros((), dtype=dtype)), ValueError, "x must have at least 1 dimension"
    if kind == "x_not_a_tensor":
        bad = draw(st.sampled_from(NOT_TENSORS + ["list", "numpy"]))
        bad = {"list": x.float().tolist(), "numpy": x.float().numpy()}.get(bad, bad)
        return lambda: layer(bad), TypeError, "x must be a torch.Tensor"
    if kind == "x_not_float":
        dt = draw(st.sampled_from(NOT_FLOAT))
        return lambda: layer(x.to(dt)), TypeError, "x must be float32/float64/float16/bfloat16"
    if kind == "x_dtype_mismatch":
        other = draw(st.sampled_from([d for d in FLOATS if d != dtype]))
        return lambda: layer(x.to(other)), TypeError, f"but x has {other}"
    if kind == "x_device_mismatch":
        return lambda: layer(x.to("meta")), ValueError, "x is on meta"
    if kind == "x_not_dense":
        return lambda: layer(_not_dense(draw, x)), TypeError, "x must be a dense (strided) tensor"
    raise AssertionError(kind)


LAYER_BAD_KINDS = ["constructor_size", "constructor_sparsity", "constructor_mask_shape", "constructor_dtype",
                   "constructor_backend", "from_linear_sparsity", "from_linear_method", "from_linear_not_linear",
                   "x_width", "x_rank", "x_not_a_tensor", "x_not_float", "x_dtype_mismatch", "x_device_mismatch",
                   "x_not_dense"]


@pytest.mark.parametrize("kind", LAYER_BAD_KINDS)
@settings(max_examples=N // 10)
@given(data=st.data())
def test_sparse_linear_layer_bad_input_raises_the_documented_error(kind, data):
    call, exc, text = data.draw(bad_layer_call(kind))
    with pytest.raises(exc) as e:
        call()
    assert e.type is exc, f"{e.type.__name__} instead of {exc.__name__}: {e.value}"
    assert text in str(e.value), f"message does not name the argument ({text!r}): {e.value}"


# ---- defects found by the property tests, fixed; these keep them fixed --------------------------

def _layout_args():
    mask = make_mask(5, 7, "random", 0.5, 0)
    layout = SparseLayout.from_mask(mask)
    return torch.randn(3, 7), torch.randn(layout.nnz), layout


@pytest.mark.parametrize("bad", [True, False])
def test_sparse_linear_min_sparsity_bool_is_rejected(bad):
    with pytest.raises(ValueError, match="min_sparsity must be a number"):
        sparse_linear(*_layout_args(), min_sparsity=bad)


@pytest.mark.parametrize("ok", [np.float32(0.5), np.int64(0), np.float16(1.0)])
def test_sparse_linear_min_sparsity_takes_any_real_number(ok):
    assert isinstance(ok, numbers.Real)
    x, values, layout = _layout_args()
    out = sparse_linear(x, values, layout, min_sparsity=ok)
    assert out.shape == (3, 5)


@pytest.mark.parametrize("bad", [5, None, 5.0])
def test_layout_from_csr_shape_not_a_sequence_names_the_shape(bad):
    _, _, layout = _layout_args()
    with pytest.raises((TypeError, ValueError)) as e:
        SparseLayout.from_csr(layout.row_ptr, layout.col_idx, bad)
    assert "SparseLayout.from_csr" in str(e.value) and "shape" in str(e.value), str(e.value)


@pytest.mark.parametrize("bad", [(5.5, 7), (5.0, 7), ("5", 7), (True, 7)])
def test_layout_shape_with_non_integer_entries_is_rejected(bad):
    # an index valid for the shape int() makes of `bad`: the entry's type is the one defect
    layout = SparseLayout.from_mask(make_mask(int(bad[0]), 7, "random", 0.5, 0))
    with pytest.raises((TypeError, ValueError)) as e:
        SparseLayout.from_csr(layout.row_ptr, layout.col_idx, bad)
    assert "shape" in str(e.value), str(e.value)


@pytest.mark.parametrize("bad", [2.0, -0.5, float("nan"), "0.9"])
def test_sparse_linear_layer_constructor_checks_min_sparsity(bad):
    with pytest.raises(ValueError, match="min_sparsity"):
        SparseLinear(7, 5, min_sparsity=bad)


@pytest.mark.parametrize("how", ["sparse_coo", "sparse_csr"])
def test_sparse_linear_layer_sparse_mask_raises_type_error(how):
    mask = make_mask(5, 7, "random", 0.5, 0)
    with warnings.catch_warnings():  # torch's "beta" notice of CSR
        warnings.simplefilter("ignore", UserWarning)
        bad = mask.to_sparse() if how == "sparse_coo" else mask.to_sparse_csr()
    with pytest.raises(TypeError, match="mask must be a dense"):
        SparseLinear(7, 5, mask=bad)
