"""Property-based tests (hypothesis) of the public Monarch ops: monarch_matmul and MonarchLinear.

The rule for every public op (and every later one):
  * valid input -- random shapes (batch 0 and 1, odd and prime sizes, 0..3 leading dims), strides
    (transposed, expanded, sliced views of x, of the weights and of the output gradient), every
    dtype each backend here runs -- matches the float64 reference computed from the same (rounded)
    inputs, with no NaN although every torch.empty starts NaN-filled (`poison`), and so do the
    gradients; the inputs are left as they were;
  * bad input of every kind raises the documented exception type (exactly that type) with a
    message naming the offending argument, before anything large is allocated or launched.
Example counts scale with the hypothesis profile (tests/conftest.py): `ci`, the default, is
derandomized and runs >= 1000 examples per op and backend, except under the (slow) Triton
interpreter; HYPOTHESIS_PROFILE=slow runs 10x as many, freshly random.
"""
from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("hypothesis")
from hypothesis import event, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import kernelkit  # noqa: E402
from kernelkit.monarch import MonarchLinear, monarch_matmul, monarch_reference  # noqa: E402
from kernelkit.monarch.ops import _INT32_MAX, _supports, check_index_range  # noqa: E402
from helpers import TOL  # noqa: E402
# the shared helpers; _one_thread is an autouse fixture (pytest finds it in this module)
from properties import (FAST, FLOATS, IDS, INTERPRETED, N, NOT_FLOAT, NOT_SIZES, NOT_TENSORS, SEEDS, THREADS,  # noqa: E402,F401
                        TRITON_DEVICE, X_LAYOUTS, _AVAIL_CPU, _BATCH_SIZE, Input, _one_thread, _peak_rss_bytes, _replace,
                        assert_close, huge, make, num_threads, poisoned, reference, x_layout)


if torch.cuda.is_available():
    FAST += [(b, "cuda") for b in ("torch", "triton", "cuda") if kernelkit.backends("cuda")[b] == "available"]


def tolerance(dtype: torch.dtype, backend: str, device: str) -> float:
    """TOL[dtype]; twice that for bfloat16 under the Triton interpreter, which truncates fp32 ->
    bf16 casts instead of rounding them (kernels/monarch.py, "Numerics"): each of the two roundings
    of a gradient (the intermediate, then the result) may cost 2**-7 instead of 2**-8."""
    interpreted = backend == "triton" and device == "cpu"
    return TOL[dtype] * (2 if interpreted and dtype == torch.bfloat16 else 1)


def dtypes_for(backend: str, device: str) -> list[torch.dtype]:
    """The dtypes `backend` runs on `device`, by the op's own dispatch rule."""
    return [dt for dt in FLOATS if _supports(dt, torch.device(device))(backend) is None]


# ---- strategies: sizes, batch shapes, layouts ---------------------------------------------------

# The strategies are flat tuples of single draws, built once: hypothesis's bookkeeping per draw,
# not the maths, is most of the cost of an example this small.

def monarch_dims(big: bool = True):
    """(k, q, p, l, s, r) with l*r == k*q (l any divisor of k*q): 1, small, odd and prime sizes.

    big=False (the Triton interpreter, whose cost grows with the number of programs: k and l
    blocks) keeps k, l <= 4; big=True adds sizes past the CPU kernels' register tiles."""
    dim = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 11, 13, 16, 17] if big else [1, 2, 3, 4, 5, 6, 7, 11])
    blocks = dim if big else st.sampled_from([1, 2, 3, 4])

    def build(t):
        k, q, p, s, pick = t
        kq = k * q
        divisors = [d for d in range(1, kq + 1) if kq % d == 0 and (big or d <= 4)]
        l = divisors[pick % len(divisors)]  # shrinks towards l = 1
        return k, q, p, l, s, kq // l
    return st.tuples(blocks, dim, dim, dim, st.integers(0, 255)).map(build)


def _batch(t):
    n, *sizes = t
    sizes = list(sizes[:n])
    while math.prod(sizes) > 100:  # at most 100 rows in all: examples stay cheap
        sizes[sizes.index(max(sizes))] = 1
    return tuple(sizes)


batch_shapes = st.tuples(st.sampled_from([1, 0, 2, 3]), _BATCH_SIZE, _BATCH_SIZE, _BATCH_SIZE).map(_batch)

W_LAYOUTS = ["contiguous", "transposed", "permuted", "expanded", "sliced", "broadcast"]


def w_layout(kind: str, shape: tuple):
    a, b, c = shape
    if kind == "transposed":
        return (a, c, b), lambda t: t.transpose(1, 2)
    if kind == "permuted":
        return (c, b, a), lambda t: t.permute(2, 1, 0)
    if kind == "expanded":                    # every block the same memory (stride 0)
        return (1, b, c), lambda t: t.expand(a, b, c)
    if kind == "sliced":
        return (a, b, 2 * c), lambda t: t[..., ::2]
    if kind == "broadcast":
        return (), lambda t: t.expand(a, b, c)
    return shape, lambda t: t


# ---- monarch_matmul: valid input ----------------------------------------------------------------

# which inputs ask for a gradient (at least one): every need_dx/need_dw1/need_dw2 subset
NEEDS = st.sampled_from([n for n in np.ndindex(2, 2, 2) if any(n)]).map(lambda n: tuple(map(bool, n)))


@functools.lru_cache(maxsize=None)
def matmul_problems(backend, device, big=True, grads=False):
    X, W = st.sampled_from(X_LAYOUTS), st.sampled_from(W_LAYOUTS)
    return st.tuples(monarch_dims(big), batch_shapes, st.sampled_from(dtypes_for(backend, device)),
                     st.tuples(X, W, W, X), NEEDS if grads else st.just((False,) * 3),
                     THREADS if backend == "cpu" else st.just(1), SEEDS
                     ).map(lambda t: _matmul_problem(device, grads, *t))


def _matmul_problem(device, grads, dims, batch, dtype, kinds, need, threads, seed):
    k, q, p, l, s, r = dims
    note(f"dims={dims} batch={batch} dtype={dtype} layouts={kinds} need={need} threads={threads} seed={seed}")
    event(f"dtype {str(dtype)[6:]}")
    event(f"x layout {kinds[0]}")
    event("empty batch" if 0 in batch else f"{len(batch)} leading dims")
    gen = torch.Generator().manual_seed(seed)
    x = make(gen, x_layout(kinds[0], batch, k * p), dtype, device, need[0])
    w1 = make(gen, w_layout(kinds[1], (k, q, p)), dtype, device, need[1])
    w2 = make(gen, w_layout(kinds[2], (l, s, r)), dtype, device, need[2])
    g = make(gen, x_layout(kinds[3], batch, l * s), dtype, device) if grads else None
    return x, w1, w2, g, dtype, threads, (*batch, l * s)


def check_matmul(backend, device, problem):
    x, w1, w2, g, dtype, threads, out_shape = problem
    before = [t.leaf.detach().clone() for t in (x, w1, w2)]
    with num_threads(threads):
        out = monarch_matmul(x.value, w1.value, w2.value, backend=backend)
        if g is not None:
            out.backward(g.value)
    assert out.shape == out_shape and out.dtype == dtype and out.device.type == device
    for t, b in zip((x, w1, w2), before):
        assert torch.equal(t.leaf.detach(), b), "the op modified an input"
    (ref, ref_grads), (scale, scale_grads) = reference(monarch_reference, [x, w1, w2], g)
    tol = tolerance(dtype, backend, device)
    assert_close(out, ref, scale, tol, "out")
    if g is not None:
        wanted = [(name, t.leaf.grad) for name, t in zip(("dx", "dw1", "dw2"), (x, w1, w2)) if t.leaf.requires_grad]
        for (name, got), want, scale_ in zip(wanted, ref_grads, scale_grads):
            assert_close(got, want, scale_, tol, name)


@pytest.mark.parametrize("case", FAST, ids=IDS)
@poisoned(max_examples=N)
@given(data=st.data())
def test_monarch_matmul_forward_matches_float64_reference(poison, case, data):
    check_matmul(*case, data.draw(matmul_problems(*case)))


@pytest.mark.parametrize("case", FAST, ids=IDS)
@poisoned(max_examples=N // 4)
@given(data=st.data())
def test_monarch_matmul_backward_matches_float64_reference(poison, case, data):
    check_matmul(*case, data.draw(matmul_problems(*case, grads=True)))


@pytest.mark.parametrize("case", INTERPRETED, ids=IDS)
@poisoned(max_examples=max(N // 20, 1))
@given(data=st.data())
def test_monarch_matmul_triton_interpreted_forward(poison, case, data):
    check_matmul(*case, data.draw(matmul_problems(*case, big=False)))


@pytest.mark.parametrize("case", INTERPRETED, ids=IDS)
@poisoned(max_examples=max(N // 40, 1))
@given(data=st.data())
def test_monarch_matmul_triton_interpreted_backward(poison, case, data):
    check_matmul(*case, data.draw(matmul_problems(*case, big=False, grads=True)))


# ---- MonarchLinear: valid input -----------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def linear_problems(backend, device, max_features=24, max_blocks=24):
    size, X = st.integers(1, max_features), st.sampled_from(X_LAYOUTS)
    return st.tuples(size, size, st.integers(1, max_blocks), st.booleans(), batch_shapes,
                     st.sampled_from(dtypes_for(backend, device)), X, X,
                     THREADS if backend == "cpu" else st.just(1), SEEDS
                     ).map(lambda t: _linear_problem(backend, device, *t))


def _linear_problem(backend, device, in_f, out_f, nblocks, bias, batch, dtype, x_kind, g_kind, threads, seed):
    nblocks = (nblocks - 1) % min(in_f, out_f) + 1  # 1 .. min(in_f, out_f); shrinks towards 1
    note(f"in={in_f} out={out_f} nblocks={nblocks} bias={bias} batch={batch} dtype={dtype} "
         f"layouts={x_kind},{g_kind} threads={threads} seed={seed}")
    event(f"nblocks {'divides' if in_f % nblocks == 0 and out_f % nblocks == 0 else 'does not divide'} the features")
    event(f"dtype {str(dtype)[6:]}")
    layer = MonarchLinear(in_f, out_f, nblocks, bias=bias, device=device, dtype=dtype, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # values from the drawn seed, not from torch's global generator
        for prm in layer.parameters():
            prm.copy_(torch.rand(prm.shape, generator=gen, dtype=torch.float64) * 2 - 1)
    x = make(gen, x_layout(x_kind, batch, in_f), dtype, device, grad=True)
    g = make(gen, x_layout(g_kind, batch, out_f), dtype, device)
    return layer, x, g, dtype, threads, (*batch, out_f)


def linear_reference(layer: MonarchLinear):
    def fn(x, w1, w2, *bias):
        y = monarch_reference(F.pad(x, (0, layer.in_features_extended - layer.in_features)), w1, w2)
        y = y[..., : layer.out_features]
        return y + bias[0] if bias else y
    return fn


def check_linear(backend, device, problem):
    layer, x, g, dtype, threads, out_shape = problem
    with num_threads(threads):
        out = layer(x.value)
        out.backward(g.value)
    assert out.shape == out_shape and out.dtype == dtype
    params = [Input(prm, lambda t: t) for prm in (layer.blkdiag1, layer.blkdiag2, layer.bias) if prm is not None]
    (ref, ref_grads), (scale, scale_grads) = reference(linear_reference(layer), [x, *params], g)
    tol = tolerance(dtype, backend, device)
    assert_close(out, ref, scale, tol, "out")
    got = [x.leaf.grad] + [prm.leaf.grad for prm in params]
    for name, a, b, c in zip(("dx", "dblkdiag1", "dblkdiag2", "dbias"), got, ref_grads, scale_grads):
        assert_close(a, b, c, tol, name)


@pytest.mark.parametrize("case", FAST, ids=IDS)
@poisoned(max_examples=N)
@given(data=st.data())
def test_monarch_linear_forward_backward_match_float64_reference(poison, case, data):
    check_linear(*case, data.draw(linear_problems(*case)))


@pytest.mark.parametrize("case", INTERPRETED, ids=IDS)
@poisoned(max_examples=max(N // 50, 1))
@given(data=st.data())
def test_monarch_linear_triton_interpreted(poison, case, data):
    check_linear(*case, data.draw(linear_problems(*case, max_features=10, max_blocks=3)))


# ---- autocast -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", None])  # None: the default choice (a fallback for 16-bit)
@settings(max_examples=N // 5)
@given(data=st.data())
def test_monarch_matmul_under_autocast_casts_like_f_linear(backend, data):
    """Under torch.autocast every float32/float16/bfloat16 input is cast to the autocast dtype, so
    mixed dtypes are fine (one layer's output feeds the next); float64 is never cast, so a float64
    input among cast ones is a dtype mismatch (TypeError), as it is for F.linear."""
    (k, q, p, l, s, r), batch, ac, dts, seed = data.draw(st.tuples(
        monarch_dims(), batch_shapes, st.sampled_from([torch.bfloat16, torch.float16]),
        st.tuples(*[st.sampled_from(FLOATS)] * 3), SEEDS))
    event(f"inputs {'/'.join(str(d)[6:] for d in dts)}")
    gen = torch.Generator().manual_seed(seed)
    x, w1, w2 = (torch.rand(shape, generator=gen, dtype=torch.float64).to(dt) * 2 - 1
                 for shape, dt in zip(((*batch, k * p), (k, q, p), (l, s, r)), dts))
    with warnings.catch_warnings(), torch.autocast("cpu", dtype=ac):
        warnings.simplefilter("ignore", kernelkit.KernelkitFallbackWarning)
        if torch.float64 in dts and set(dts) != {torch.float64}:
            with pytest.raises(TypeError, match="has dtype"):
                monarch_matmul(x, w1, w2, backend=backend)
            return
        out = monarch_matmul(x, w1, w2, backend=backend)
    want = torch.float64 if dts[0] == torch.float64 else ac  # all float64: nothing is cast
    assert out.dtype == want
    cast = [t.to(want).double() for t in (x, w1, w2)]
    ref, scale = monarch_reference(*cast), monarch_reference(*(t.abs() for t in cast))
    assert_close(out, ref, scale, TOL[want], "out")


# ---- sizes past 32-bit indexing ---------------------------------------------------------------


@st.composite
def oversized(draw):
    """Shapes of valid Monarch inputs with exactly one quantity past int32, just past or far past.

    Returns (x shape, w1 shape, w2 shape, dtype, the words of the error that name the argument)."""
    over = draw(st.sampled_from(["k*p", "k*q", "l*s", "w1.numel", "w2.numel", "rows"]))
    big = _INT32_MAX + 1 + draw(st.integers(0, 1000) | st.integers(2**31, 2**40))
    dtype = draw(st.sampled_from(FLOATS))
    small = st.integers(1, 5)
    rows = draw(st.sampled_from([0, 1, 3]))
    root = math.isqrt(big) + 1      # root**2 > big, root itself far inside int32
    if over == "k*p":               # a huge input block width
        k, q, s = draw(small), draw(small), draw(small)
        p, l, r, who = -(-big // k), 1, k * q, "x.shape[-1]"
    elif over == "k*q":             # a huge intermediate (w2 consumes it: r is huge too)
        k, q, p, l, s, r, who = 1, big, draw(small), 1, draw(small), big, "w1.shape[0]*w1.shape[1]"
    elif over == "l*s":             # a huge output row
        k, q, p, l, s, r, who = 1, 1, draw(small), 1, big, 1, "w2.shape[0]*w2.shape[1]"
    elif over == "w1.numel":        # every width in range, the factor itself past int32
        k, q, p, l, s, r, who = 1, root, root, 1, draw(small), root, "w1.numel()"
    elif over == "w2.numel":
        k, q, p, l, s, r, who = 1, root, draw(small), 1, root, root, "w2.numel()"
    else:                           # more rows than int32, over one or two leading dims
        k, q, p, l, s, r, who = 1, 2, draw(small), 2, draw(small), 1, "rows of x"
        rows = big
    lead = (2**20, -(-rows // 2**20)) if rows > 2**20 and draw(st.booleans()) else (rows,)
    note(f"over={over} dims={(k, q, p, l, s, r)} lead={lead} dtype={dtype}")
    event(f"past int32: {over}")
    return (*lead, k * p), (k, q, p), (l, s, r), dtype, who


@pytest.mark.skipif(TRITON_DEVICE is None, reason="no triton backend here")
@settings(max_examples=N // 4)
@given(problem=oversized())
def test_monarch_matmul_sizes_past_int32_raise_before_allocating(problem):
    """backend='triton' indexes with 32-bit integers: a size past that is a ValueError naming the
    argument, raised before any copy (no stride-0 input is materialised: the peak memory of the
    process does not grow) and before any launch."""
    *shapes, dtype, who = problem
    x, w1, w2 = (huge(shape, dtype, TRITON_DEVICE) for shape in shapes)
    peak = _peak_rss_bytes()
    with pytest.raises(ValueError) as e:
        monarch_matmul(x, w1, w2, backend="triton")
    assert e.type is ValueError
    assert who in str(e.value) and str(_INT32_MAX) in str(e.value), str(e.value)
    assert _peak_rss_bytes() - peak < 2**28, "a huge input was materialised before the size check"


@settings(max_examples=N // 10)
@given(problem=oversized())
def test_monarch_matmul_torch_backend_takes_sizes_past_int32(problem):
    """The torch backend has no 32-bit limit: on meta tensors (shapes only) it answers the shape."""
    *shapes, dtype, _ = problem
    x, w1, w2 = (huge(shape, dtype, "meta") for shape in shapes)
    for backend in ("torch", None):  # None: the meta device's default, torch
        out = monarch_matmul(x, w1, w2, backend=backend)
        assert out.shape == (*x.shape[:-1], w2.shape[0] * w2.shape[1]) and out.device.type == "meta"


M = _INT32_MAX


@pytest.mark.parametrize("backend, rows, w1, w2, raises", [
    # triton: the widths k*p, k*q, l*s, the factor sizes and the rows (M = 2**31 - 1 is prime, so
    # a product lands just past it with power-of-two factors: 2**16 * 2**15 = M + 1)
    ("triton", M, (1, 1, M), (1, M, 1), False),
    ("triton", 1, (1, 1, M + 1), (1, 1, 1), True),
    ("triton", 1, (1, M + 1, 1), (1, 1, M + 1), True),
    ("triton", 1, (1, 1, 1), (1, M + 1, 1), True),
    ("triton", 1, (1, 2**16, 2**15), (1, 1, 2**16), True),
    ("triton", 1, (1, 2**16, 1), (1, 2**15, 2**16), True),
    ("triton", M + 1, (1, 1, 1), (1, 1, 1), True),
    # triton launch grids put k and l on axis 1 (at most 65535 blocks)
    ("triton", 1, (65535, 1, 1), (65535, 1, 1), False),
    ("triton", 1, (65536, 1, 1), (65536, 1, 1), True),
    ("triton", 1, (65536, 1, 1), (1, 1, 65536), True),
    # cuda (csrc/cuda/monarch.cu check_shapes): each dim, k*p, k*q, l*s, ceil(rows / 16)
    ("cuda", 16 * M, (1, 1, M), (1, M, 1), False),
    ("cuda", 16 * M + 1, (1, 1, 1), (1, 1, 1), True),
    ("cuda", 1, (1, 2**16, 2**15), (1, 1, 2**16), False),
    ("cuda", 1, (1, 1, 1), (1, 1, M + 1), True),
    ("cuda", 1, (2**16, 1, 2**15), (1, 1, 1), True),
    ("cuda", 1, (2**16, 2**15, 1), (1, 1, 1), True),
    ("cuda", 1, (1, 1, 1), (2**16, 2**15, 1), True),
    # torch and cpu index with int64
    ("torch", 2**40, (2**20, 2**20, 2**20), (2**20, 2**20, 2**20), False),
    ("cpu", 2**40, (2**20, 2**20, 2**20), (2**20, 2**20, 2**20), False),
])
def test_index_range_limits_are_exact(backend, rows, w1, w2, raises):
    if raises:
        with pytest.raises(ValueError, match=f"exceeds {M}|exceeds {16 * M}|exceeds 65535"):
            check_index_range("f", backend, rows, w1, w2)
    else:
        check_index_range("f", backend, rows, w1, w2)


# ---- monarch_matmul: bad input ------------------------------------------------------------------


@st.composite
def valid_inputs(draw, dtypes=FLOATS):
    (k, q, p, l, s, r), batch, dtype, seed = draw(st.tuples(monarch_dims(big=False), batch_shapes,
                                                             st.sampled_from(dtypes), SEEDS))
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    return mk(*batch, k * p), mk(k, q, p), mk(l, s, r)


NAMES = ("x", "w1", "w2")


@st.composite
def bad_matmul_call(draw, kind):
    """(args, kwargs, exception type, text the message must contain) with exactly one defect."""
    x, w1, w2 = draw(valid_inputs())
    args, kw = [x, w1, w2], {"backend": draw(st.sampled_from([None, "torch"]))}
    i = draw(st.integers(0, 2))
    name = NAMES[i]
    t = args[i]
    if kind == "wrong_rank":
        if i == 0:
            return _replace(args, 0, t.sum()), kw, ValueError, "x must have at least 1 dimension"
        bad = draw(st.sampled_from([lambda w: w.sum(), lambda w: w.reshape(-1), lambda w: w[0],
                                    lambda w: w[None], lambda w: w[None, None]]))(t)
        return _replace(args, i, bad), kw, ValueError, f"{name} must be 3-D"
    if kind == "x_width":
        k, _, p = w1.shape
        width = draw(st.integers(0, k * p + 5).filter(lambda v: v != k * p))
        bad = torch.zeros(*x.shape[:-1], width, dtype=x.dtype)
        return _replace(args, 0, bad), kw, ValueError, "x.shape[-1] must equal"
    if kind == "factors_mismatch":
        k, q, _ = w1.shape
        l, r = draw(st.integers(1, 9)), draw(st.integers(1, 9))
        r += l * r == k * q   # one more column than would fit
        bad = torch.zeros(l, w2.shape[1], r, dtype=w2.dtype)
        return _replace(args, 2, bad), kw, ValueError, "w2 must consume w1's output"
    if kind == "dtype_mismatch":   # each weight is compared with x
        other = draw(st.sampled_from([d for d in FLOATS if d != t.dtype]))
        return _replace(args, i, t.to(other)), kw, TypeError, f"{name} has" if i else f"but x has {other}"
    if kind == "device_mismatch":
        return _replace(args, i, t.to("meta")), kw, ValueError, f"{name} is on meta" if i else "but x is on meta"
    if kind == "not_a_tensor":
        bad = draw(st.sampled_from(NOT_TENSORS + ["list", "numpy", "tuple"]))
        bad = {"list": t.float().tolist(), "numpy": t.float().numpy(), "tuple": (t,)}.get(bad, bad)
        return _replace(args, i, bad), kw, TypeError, f"{name} must be a torch.Tensor"
    if kind == "not_float":
        dt = draw(st.sampled_from(NOT_FLOAT))
        return _replace(args, i, t.to(dt)), kw, TypeError, f"{name} must be float32/float64/float16/bfloat16"
    if kind == "empty_factor":
        j = draw(st.integers(1, 2))
        shape = list(args[j].shape)
        shape[draw(st.integers(0, 2))] = 0
        bad = torch.zeros(shape, dtype=x.dtype)
        return _replace(args, j, bad), kw, ValueError, f"{NAMES[j]} must have no empty dimension"
    if kind == "not_dense":
        how = draw(st.sampled_from(["sparse_coo", "sparse_csr", "nested", "jagged"]))
        with warnings.catch_warnings():  # "prototype"/"beta" notices of torch
            warnings.simplefilter("ignore", UserWarning)
            if how in ("nested", "jagged"):
                bad = torch.nested.nested_tensor([t, t], layout=torch.jagged if how == "jagged" else torch.strided)
            elif how == "sparse_csr" and t.dim() >= 2 and t.numel() > 0:  # (CSR needs both)
                bad = t.to_sparse_csr()
            else:
                bad = t.to_sparse()
        return _replace(args, i, bad), kw, TypeError, f"{name} must be a dense (strided) tensor"
    if kind == "bad_backend":
        unknown = st.sampled_from(["gpu", "CPU", "Torch", "", "cuda:0", " cpu", "triton "]) | st.text(max_size=8)
        name_ = draw(unknown.filter(lambda b: b not in kernelkit._backend.BACKENDS))
        if draw(st.booleans()):
            return args, {"backend": name_}, ValueError, "backend must be one of"
        bad = draw(st.sampled_from([1, 0.5, b"cpu", ["cpu"], ("cpu",), torch.device("cpu")]))
        return args, {"backend": bad}, TypeError, "backend must be a str"
    if kind == "unavailable_backend":
        if draw(st.booleans()):   # CPU tensors: never the cuda backend
            return args, {"backend": "cuda"}, kernelkit.BackendUnavailableError, "backend 'cuda'"
        lowp = draw(st.sampled_from([torch.float16, torch.bfloat16]))
        if _AVAIL_CPU["cpu"] != "available":
            return args, {"backend": "cuda"}, kernelkit.BackendUnavailableError, "backend 'cuda'"
        return [a.to(lowp) for a in args], {"backend": "cpu"}, kernelkit.BackendUnavailableError, "backend 'cpu'"
    raise AssertionError(kind)


MATMUL_BAD_KINDS = ["wrong_rank", "x_width", "factors_mismatch", "dtype_mismatch", "device_mismatch",
                    "not_a_tensor", "not_float", "empty_factor", "not_dense", "bad_backend",
                    "unavailable_backend"]


@pytest.mark.parametrize("kind", MATMUL_BAD_KINDS)
@settings(max_examples=N // 10)
@given(data=st.data())
def test_monarch_matmul_bad_input_raises_the_documented_error(kind, data):
    args, kw, exc, text = data.draw(bad_matmul_call(kind))
    with pytest.raises(exc) as e:
        monarch_matmul(*args, **kw)
    assert e.type is exc, f"{e.type.__name__} instead of {exc.__name__}: {e.value}"
    assert text in str(e.value), f"message does not name the argument ({text!r}): {e.value}"


# ---- MonarchLinear: bad input -------------------------------------------------------------------


@st.composite
def bad_linear_call(draw, kind):
    """(thunk, exception type, text the message must contain)."""
    in_f, out_f = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    nb = draw(st.integers(1, min(in_f, out_f)))
    dtype = draw(st.sampled_from(FLOATS))
    args = {"in_features": in_f, "out_features": out_f, "nblocks": nb}
    if kind == "constructor_size":
        which = draw(st.sampled_from(sorted(args)))
        args[which] = draw(st.sampled_from(NOT_SIZES) | st.integers(max_value=0))
        return lambda: MonarchLinear(**args), ValueError, f"{which} must be a positive int"
    if kind == "constructor_nblocks_too_big":
        args["nblocks"] = min(in_f, out_f) + draw(st.integers(1, 10))
        return lambda: MonarchLinear(**args), ValueError, "nblocks"
    if kind == "constructor_dtype":
        bad = draw(st.sampled_from(NOT_FLOAT + ["float32", np.float32]))
        return lambda: MonarchLinear(**args, dtype=bad), TypeError, "dtype"
    if kind == "constructor_backend":
        bad = draw(st.sampled_from(["gpu", "CPU", "", 1, ["cpu"], torch.device("cpu")]))
        if isinstance(bad, str):
            return lambda: MonarchLinear(**args, backend=bad), ValueError, "backend must be one of"
        return lambda: MonarchLinear(**args, backend=bad), TypeError, "backend must be a str"
    layer = MonarchLinear(in_f, out_f, nb, bias=draw(st.booleans()), dtype=dtype)
    batch = draw(batch_shapes)
    x = torch.zeros(*batch, in_f, dtype=dtype)
    if kind == "x_width":
        width = draw(st.integers(0, 30).filter(lambda w: w != in_f))
        bad = torch.zeros(*batch, width, dtype=dtype)
        return lambda: layer(bad), ValueError, f"x.shape[-1] must be in_features={in_f}"
    if kind == "x_rank":
        return lambda: layer(torch.zeros((), dtype=dtype)), ValueError, "x must have at least 1 dimension"
    if kind == "x_not_a_tensor":
        bad = draw(st.sampled_from(NOT_TENSORS + [x.float().tolist(), x.float().numpy()]))
        return lambda: layer(bad), TypeError, "x must be a torch.Tensor"
    if kind == "x_not_float":
        dt = draw(st.sampled_from(NOT_FLOAT))
        return lambda: layer(x.to(dt)), TypeError, "x must be float32/float64/float16/bfloat16"
    if kind == "x_dtype_mismatch":
        other = draw(st.sampled_from([d for d in FLOATS if d != dtype]))
        return lambda: layer(x.to(other)), TypeError, "x has"
    if kind == "x_device_mismatch":
        return lambda: layer(x.to("meta")), ValueError, "x is on meta"
    if kind == "x_not_dense":
        return lambda: layer(x.to_sparse()), TypeError, "x must be a dense (strided) tensor"
    raise AssertionError(kind)


LINEAR_BAD_KINDS = ["constructor_size", "constructor_nblocks_too_big", "constructor_dtype", "constructor_backend",
                    "x_width", "x_rank", "x_not_a_tensor", "x_not_float", "x_dtype_mismatch",
                    "x_device_mismatch", "x_not_dense"]


@pytest.mark.parametrize("kind", LINEAR_BAD_KINDS)
@settings(max_examples=N // 10)
@given(data=st.data())
def test_monarch_linear_bad_input_raises_the_documented_error(kind, data):
    call, exc, text = data.draw(bad_linear_call(kind))
    with pytest.raises(exc) as e:
        call()
    assert e.type is exc, f"{e.type.__name__} instead of {exc.__name__}: {e.value}"
    assert text in str(e.value), f"message does not name the argument ({text!r}): {e.value}"
