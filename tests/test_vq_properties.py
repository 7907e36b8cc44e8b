"""Property-based tests (hypothesis) of the public vq ops: vq_linear, dequantize, assign, check_codes,
VQLinear (constructor, forward, backward) and VQLinear.from_linear.

The rule for every public op (as in tests/test_monarch_properties.py):
  * valid input -- random formats (group size d in {1, 2, 4, 8, 16}; K from 1 to 65536, not only powers
    of two, with uint8 codes and int16 codes, the latter stored negative for codes >= 2^15 as AQLM does;
    M = 1..8 additive codebooks; one codebook set per layer or one per rows_per_codebook output rows
    with the last set short), n_out 0..40 (odd, prime), G = 0..12 groups, batch shapes (0..3 leading
    dims, size 0 and 1), strides (transposed, expanded, sliced, strided and broadcast views of x and of
    the output gradient; transposed / sliced / expanded codes and codebooks; strided, sliced, expanded
    scales and bias), codebooks / scales / bias in dtypes other than x's (they are cast), scales (n_out,)
    or AQLM's (n_out, 1, 1, 1) or None, every dtype each backend here runs, the paths auto / gemv /
    gemm and the cpu kernel on 1 or 2 threads -- matches the float64 reference computed from the same
    (rounded) inputs, with no NaN although every torch.empty starts NaN-filled (`poison`), and so do the
    gradients for every subset of (x, codebooks, scales, bias); the inputs (codes included) are left as
    they were;
  * bad input of every kind raises the documented exception type (exactly that type) with a message
    naming the offending argument; codes out of range (as unsigned values) raise ValueError naming the
    first bad position before any kernel runs (the kernels are replaced by tripwires to prove it).
Example counts scale with the hypothesis profile (tests/conftest.py): `ci`, the default, is
derandomized and runs >= 1000 examples per op and backend, except under the (slow) Triton
interpreter; HYPOTHESIS_PROFILE=slow runs 10x as many, freshly random.

The tests at the end pin defects these tests found, fixed since (each docstring-less test names it).
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
from kernelkit.vq import VQLinear, assign, check_codes, dequantize, vq_linear  # noqa: E402
from kernelkit.vq import ops as vq_ops  # noqa: E402
from kernelkit.vq.ops import _ASSIGN_SUPPORTED, _SUPPORTED, GROUP_SIZES, MAX_TOPN, _supports  # noqa: E402
from kernelkit.vq.reference import dequantize_reference, vq_linear_reference  # noqa: E402
from helpers import TOL  # noqa: E402
# the shared helpers; _one_thread is an autouse fixture (pytest finds it in this module)
from properties import (FAST, FLOATS, IDS, INTERPRETED, N, NOT_FLOAT, NOT_TENSORS, SEEDS, THREADS,  # noqa: E402,F401
                        _AVAIL_CPU, _BATCH_SIZE, Input, _one_thread, assert_close, make, num_threads, poisoned,
                        reference, x_layout, X_LAYOUTS)


if torch.cuda.is_available():
    FAST += [(b, "cuda") for b in ("torch", "triton", "cuda") if kernelkit.backends("cuda")[b] == "available"]


def tolerance(dtype: torch.dtype, backend: str, device: str) -> float:
    """TOL[dtype]; twice that for bfloat16 under the Triton interpreter, which truncates fp32 -> bf16
    casts instead of rounding them (kernels/vq.py, "Numerics")."""
    interpreted = backend == "triton" and device == "cpu"
    return TOL[dtype] * (2 if interpreted and dtype == torch.bfloat16 else 1)


def dtypes_for(backend: str, device: str, table=_SUPPORTED) -> list[torch.dtype]:
    """The dtypes `backend` runs on `device`, by the op's own dispatch rule."""
    return [dt for dt in FLOATS if _supports(table, dt, torch.device(device))(backend) is None]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---- strategies: formats, codes, layouts --------------------------------------------------------

# Flat tuples of single draws, built once (hypothesis's bookkeeping per draw is most of the cost of an
# example this small).  Hypothesis favours the first entry of each list: the plain case comes first.
OUT_SIZES = [5, 1, 2, 3, 7, 8, 11, 13, 16, 17, 31, 37, 40, 0]
GROUPS = [3, 1, 2, 4, 5, 7, 12, 0]
MS = [1, 2, 3, 4, 8]
SMALL_K = [16, 1, 2, 3, 5, 37, 64, 100, 255, 256]
# int16 only; 40000 and 65536 have codes >= 2^15, stored negative.  Few examples draw them (a K of
# 65536 costs a 65536-entry lookup table per group on the gemv path).
BIG_K = [257, 300, 1000, 4096, 40000, 65536]
SMALL = dict(out=[1, 2, 3, 5, 7, 11], groups=[1, 2, 3, 0, 5], ms=[1, 2, 3], ks=[16, 1, 3, 37, 256, 300])

CODE_LAYOUTS = ["contiguous", "transposed", "sliced", "expanded_rows", "two_d"]
CB_LAYOUTS = ["contiguous", "transposed", "sliced", "expanded_sets", "three_d"]
VEC_LAYOUTS = ["contiguous", "strided", "sliced", "expanded"]
SCALE_KINDS = ["none", "vector", "aqlm"]
RPC_KINDS = ["one", "per_set", "explicit_whole", "inferred"]


def to_codes(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int64 code values in [0, 2^bits) as uint8, or as int16 read as unsigned (>= 2^15 stored negative)."""
    if dtype == torch.uint8:
        return values.to(torch.uint8)
    return torch.where(values >= 2**15, values - 2**16, values).to(torch.int16)


def code_view(kind: str, codes: torch.Tensor) -> torch.Tensor:
    """The same (n_out, G, M) codes as a non-contiguous view (or 2-D for M = 1)."""
    n_out, G, M = codes.shape
    if kind == "transposed":     # stored (G, n_out, M)
        return codes.transpose(0, 1).contiguous().transpose(0, 1)
    if kind == "sliced":         # a storage offset and a row stride > G * M
        pad = torch.zeros(n_out, G + 2, M, dtype=codes.dtype)
        pad[:, 1:G + 1] = codes
        return pad[:, 1:G + 1]
    if kind == "two_d" and M == 1:
        return codes[..., 0]
    return codes


def cb_layout(kind: str, S: int, M: int, K: int, d: int):
    """(base shape, view) of the codebooks (S, M, K, d) (or (M, K, d) for one set)."""
    if kind == "transposed":
        return (S, M, d, K), lambda t: t.transpose(-1, -2)
    if kind == "sliced":
        return (S, M, K + 2, d), lambda t: t[:, :, 1:K + 1]
    if kind == "expanded_sets":   # every set the same memory (stride 0 over the sets)
        return (1, M, K, d), lambda t: t.expand(S, M, K, d)
    if kind == "three_d" and S == 1:
        return (M, K, d), lambda t: t
    return (S, M, K, d), lambda t: t


def vec_layout(kind: str, n: int):
    """Views of a 1-D (n,) tensor (the scales and the bias)."""
    if kind == "strided":
        return (2 * n,), lambda t: t[::2]
    if kind == "sliced":
        return (n + 3,), lambda t: t[2:n + 2]
    if kind == "expanded":
        return (1,), lambda t: t.expand(n)
    return (n,), lambda t: t


def scale_layout(kind: str, vec_kind: str, n: int):
    if kind == "aqlm":            # AQLM's (n_out, 1, 1, 1)
        base, view = vec_layout(vec_kind, n)
        return base, lambda t: view(t).reshape(n, 1, 1, 1)
    return vec_layout(vec_kind, n)


def _batch(t, max_rows):
    n, *sizes = t
    sizes = list(sizes[:n])
    while math.prod(sizes) > max_rows:  # examples stay cheap
        sizes[sizes.index(max(sizes))] = 1
    return tuple(sizes)


@functools.lru_cache(maxsize=None)
def batch_shapes(max_rows: int = 100):
    # 17..100 rows reach the gemm path of path="auto"
    return st.tuples(st.sampled_from([1, 0, 2, 3]), _BATCH_SIZE | st.sampled_from([17, 33]), _BATCH_SIZE,
                     _BATCH_SIZE).map(lambda t: _batch(t, max_rows))


class Fmt:
    """A random format: sizes, the codes (already in their view), the codebooks' set count and the
    rows_per_codebook passed (None or an int) and meant (an int)."""

    def __init__(self, n_out, G, d, M, K, code_dtype, S, rpc_arg, rpc, codes, code_kind):
        self.n_out, self.G, self.d, self.M, self.K = n_out, G, d, M, K
        self.code_dtype, self.S, self.rpc_arg, self.rpc = code_dtype, S, rpc_arg, rpc
        self.codes, self.code_kind = codes, code_kind

    @property
    def n_in(self) -> int:
        return self.G * self.d

    def __repr__(self):
        return (f"Fmt(n_out={self.n_out}, G={self.G}, d={self.d}, M={self.M}, K={self.K}, codes={_name(self.code_dtype)} "
                f"{self.code_kind}, S={self.S}, rows_per_codebook={self.rpc_arg} ({self.rpc}))")


def _format(big, n_out, G, d, M, k_big, k_small, k16, rpc_kind, rpc_draw, code_kind, top_code, seed):
    K = k_big if k_big is not None else k_small
    code_dtype = torch.int16 if (K > 256 or k16) else torch.uint8
    if K > 4096:                  # one 65536-word codebook is enough work per example
        M, d, G, rpc_kind = min(M, 2), min(d, 4), min(G, 5), "one"
    if rpc_kind in ("per_set", "inferred") and n_out >= 2:   # sets of r rows, the last one short when r does not divide
        rpc = 1 + rpc_draw % (n_out - 1)
    elif rpc_kind == "explicit_whole":               # one set, r >= n_out
        rpc = n_out + rpc_draw % 3 if n_out else 1 + rpc_draw % 3
    else:
        rpc = max(n_out, 1)
    S = max(1, -(-n_out // rpc))
    # None: the op infers ceil(n_out / S), which gives S sets back only for some (n_out, S)
    inferred = -(-n_out // S) if n_out else 1
    if rpc_kind in ("one", "inferred") and max(1, -(-n_out // inferred)) == S:
        rpc_arg, rpc = None, inferred
    else:
        rpc_arg = rpc
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(0, K, (n_out, G, M), generator=gen, dtype=torch.int64)
    if top_code and values.numel():   # the largest code K - 1 somewhere (with int16, negative for K > 2^15)
        values.view(-1)[int(torch.randint(values.numel(), (), generator=gen))] = K - 1
    codes = code_view(code_kind, to_codes(values, code_dtype))
    if code_kind == "expanded_rows" and n_out:       # one row of codes seen by every row (stride 0)
        codes = to_codes(values[:1], code_dtype).expand(n_out, G, M)
    kind = "contiguous" if code_kind == "two_d" and codes.dim() == 3 else code_kind   # (two_d: M = 1 only)
    return Fmt(n_out, G, d, M, K, code_dtype, S, rpc_arg, rpc, codes, kind)


@functools.lru_cache(maxsize=None)
def formats(big: bool = True):
    if big:
        k_big = st.one_of(st.just(None), st.just(None), st.just(None), st.just(None), st.just(None),
                          st.sampled_from(BIG_K))
        return st.tuples(st.just(big), st.sampled_from(OUT_SIZES), st.sampled_from(GROUPS),
                         st.sampled_from(GROUP_SIZES[2:3] + GROUP_SIZES[:2] + GROUP_SIZES[3:]),
                         st.sampled_from(MS), k_big, st.sampled_from(SMALL_K), st.booleans(), st.sampled_from(RPC_KINDS),
                         st.integers(0, 40), st.sampled_from(CODE_LAYOUTS), st.booleans(), SEEDS
                         ).map(lambda t: _format(*t))
    return st.tuples(st.just(big), st.sampled_from(SMALL["out"]), st.sampled_from(SMALL["groups"]),
                     st.sampled_from([4, 1, 2, 8, 16]), st.sampled_from(SMALL["ms"]), st.just(None),
                     st.sampled_from(SMALL["ks"]), st.booleans(), st.sampled_from(RPC_KINDS), st.integers(0, 40),
                     st.sampled_from(CODE_LAYOUTS), st.booleans(), SEEDS).map(lambda t: _format(*t))


def format_events(fmt: Fmt) -> None:
    event(f"d={fmt.d}")
    event("K > 2^15 (int16 codes stored negative)" if fmt.K > 2**15 else
          ("K > 256 (int16 codes)" if fmt.K > 256 else f"K <= 256, {_name(fmt.code_dtype)} codes"))
    event(f"M={fmt.M}")
    event("one codebook set" if fmt.S == 1 else "per-set codebooks")
    event("empty W" if fmt.n_out * fmt.G == 0 else "non-empty W")


# ---- vq_linear: valid input ---------------------------------------------------------------------

# (has scales, has bias, need x, need codebooks, need scales, need bias)
NEEDS = [(s, b, nx, nc, ns, nb) for s in (True, False) for b in (True, False) for nx in (True, False)
         for nc in (True, False) for ns in ((True, False) if s else (False,)) for nb in ((True, False) if b else (False,))
         if nx or nc or ns or nb]


@functools.lru_cache(maxsize=None)
def linear_problems(backend, device, big=True, grads=False):
    X, V = st.sampled_from(X_LAYOUTS), st.sampled_from(VEC_LAYOUTS)
    dts = dtypes_for(backend, device)
    # the codebooks, scales and bias: mostly x's dtype, else any float dtype (cast to x's)
    other = st.one_of(st.just(None), st.just(None), st.sampled_from(FLOATS))
    needs = (st.sampled_from(NEEDS) if grads
             else st.tuples(st.booleans(), st.booleans()).map(lambda t: (*t, False, False, False, False)))
    B = V
    fmts = formats(big)
    return st.tuples(fmts, batch_shapes(100 if big else 24), st.sampled_from(dts),
                     st.tuples(other, other, other), st.tuples(X, st.sampled_from(CB_LAYOUTS), V, B, X),
                     st.sampled_from(["vector", "aqlm"]), needs, st.sampled_from(["auto", "gemv", "gemm"]),
                     THREADS if backend == "cpu" else st.just(1), SEEDS
                     ).map(lambda t: _linear_problem(backend, device, grads, *t))


def _linear_problem(backend, device, grads, fmt, batch, dtype, other, kinds, scale_kind, needs, path, threads, seed):
    has_s, has_b, *need = needs
    cb_dt, s_dt, b_dt = (o or dtype for o in other)
    note(f"{fmt} batch={batch} dtype={dtype} codebooks/scales/bias dtypes={cb_dt}/{s_dt}/{b_dt} layouts={kinds} "
         f"scales={scale_kind if has_s else None} bias={has_b} need={need} path={path} threads={threads} seed={seed}")
    format_events(fmt)
    event(f"dtype {_name(dtype)}")
    event(f"path {path}")
    event("empty batch" if 0 in batch else f"{len(batch)} leading dims")
    if other != (None, None, None):
        event("codebooks/scales/bias cast")
    gen = torch.Generator().manual_seed(seed)
    x = make(gen, x_layout(kinds[0], batch, fmt.n_in), dtype, device, need[0])
    cb = make(gen, cb_layout(kinds[1], fmt.S, fmt.M, fmt.K, fmt.d), cb_dt, device, need[1])
    s = make(gen, scale_layout(scale_kind, kinds[2], fmt.n_out), s_dt, device, need[2]) if has_s else None
    b = make(gen, vec_layout(kinds[3], fmt.n_out), b_dt, device, need[3]) if has_b else None
    g = make(gen, x_layout(kinds[4], batch, fmt.n_out), dtype, device) if grads else None
    return fmt, x, cb, s, b, g, dtype, path, threads, (*batch, fmt.n_out)


def linear_reference(fmt: Fmt):
    """The float64 oracle: f(x, codebooks, [scales], [bias]) with the format's codes."""
    codes = fmt.codes if fmt.codes.dim() == 3 else fmt.codes.unsqueeze(-1)

    def f(x, cb, *rest, has_s, has_b):
        s = rest[0] if has_s else None
        b = rest[-1] if has_b else None
        return vq_linear_reference(x, codes, cb, s, b, fmt.rpc)
    return f


def check_linear(backend, device, problem):
    fmt, x, cb, s, b, g, dtype, path, threads, out_shape = problem
    inputs = [t for t in (x, cb, s, b) if t is not None]
    codes = fmt.codes.to(device)
    before = [t.leaf.detach().clone() for t in inputs]
    codes_before = codes.clone()
    with num_threads(threads):
        out = vq_linear(x.value, codes, cb.value, None if s is None else s.value, None if b is None else b.value,
                        rows_per_codebook=fmt.rpc_arg, path=path, backend=backend)
        if g is not None:
            out.backward(g.value)
    assert out.shape == out_shape and out.dtype == dtype and out.device.type == device
    for t, bf in zip(inputs, before):
        assert torch.equal(t.leaf.detach(), bf), "the op modified an input"
    assert torch.equal(codes, codes_before), "the op modified the codes"
    fn = functools.partial(linear_reference(fmt), has_s=s is not None, has_b=b is not None)
    (ref, ref_grads), (scale, scale_grads) = reference(fn, inputs, g)
    tol = tolerance(dtype, backend, device)
    assert_close(out, ref, scale, tol, "out")
    if g is not None:
        wanted = [(name, t) for name, t in zip(("dx", "dcodebooks", "dscales", "dbias"), (x, cb, s, b))
                  if t is not None and t.leaf.requires_grad]
        assert len(wanted) == len(ref_grads)
        for (name, t), want, scale_ in zip(wanted, ref_grads, scale_grads):
            got = t.leaf.grad
            assert got is not None and got.dtype == t.leaf.dtype, f"{name}: {None if got is None else got.dtype}"
            # a parameter in another dtype than x gets x's-dtype gradient rounded to its own dtype
            assert_close(got, want, scale_, max(tol, TOL[t.leaf.dtype]), name)
        for name, t in zip(("x", "codebooks", "scales", "bias"), (x, cb, s, b)):
            if t is not None and not t.leaf.requires_grad:
                assert t.leaf.grad is None, f"a gradient for {name}, which did not ask for one"


@pytest.mark.parametrize("case", FAST, ids=IDS)
@poisoned(max_examples=N)
@given(data=st.data())
def test_vq_linear_forward_matches_float64_reference(poison, case, data):
    check_linear(*case, data.draw(linear_problems(*case)))


@pytest.mark.parametrize("case", FAST, ids=IDS)
@poisoned(max_examples=N // 2)
@given(data=st.data())
def test_vq_linear_backward_matches_float64_reference(poison, case, data):
    check_linear(*case, data.draw(linear_problems(*case, grads=True)))


@pytest.mark.parametrize("case", INTERPRETED, ids=IDS)
@poisoned(max_examples=max(N // 20, 1))
@given(data=st.data())
def test_vq_linear_triton_interpreted_forward(poison, case, data):
    check_linear(*case, data.draw(linear_problems(*case, big=False)))


@pytest.mark.parametrize("case", INTERPRETED, ids=IDS)
@poisoned(max_examples=max(N // 40, 1))
@given(data=st.data())
def test_vq_linear_triton_interpreted_backward(poison, case, data):
    check_linear(*case, data.draw(linear_problems(*case, big=False, grads=True)))


@settings(max_examples=N // 10)
@given(fmt=formats(big=False), rows=st.integers(0, 2**40), dtype=st.sampled_from(FLOATS),
       backend=st.sampled_from(["torch", None]))
def test_vq_linear_on_meta_tensors_answers_the_shape(fmt, rows, dtype, backend):
    """Shapes only (torch.compile's fake tensors, meta-device model init): any number of rows, no
    code check (there are no values), no allocation."""
    x = torch.empty(rows, fmt.n_in, dtype=dtype, device="meta")
    cb = torch.empty(fmt.S, fmt.M, fmt.K, fmt.d, dtype=dtype, device="meta")
    out = vq_linear(x, fmt.codes.to("meta"), cb, rows_per_codebook=fmt.rpc_arg, backend=backend)
    assert out.shape == (rows, fmt.n_out) and out.device.type == "meta" and out.dtype == dtype


# ---- dequantize: valid input --------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def dequant_problems(backend, device, big=True):
    dts = dtypes_for(backend, device)
    V = st.sampled_from(VEC_LAYOUTS)
    return st.tuples(formats(big), st.sampled_from(dts), st.sampled_from([None] + list(FLOATS)),
                     st.sampled_from([None, "same"]), st.tuples(st.sampled_from(CB_LAYOUTS), V, st.sampled_from(X_LAYOUTS)),
                     st.sampled_from(SCALE_KINDS), st.tuples(st.booleans(), st.booleans()),
                     THREADS if backend == "cpu" else st.just(1), SEEDS
                     ).map(lambda t: _dequant_problem(backend, device, *t))


def _dequant_problem(backend, device, fmt, dtype, s_dt, how, kinds, scale_kind, need, threads, seed):
    """`dtype` is the result's; the codebooks are in it (how=None: dtype= not given) or in any dtype
    with dtype= given."""
    gen = torch.Generator().manual_seed(seed)
    cb_dt = dtype if how is None else s_dt or dtype
    cb = make(gen, cb_layout(kinds[0], fmt.S, fmt.M, fmt.K, fmt.d), cb_dt, device, need[0])
    s = None if scale_kind == "none" else make(gen, scale_layout(scale_kind, kinds[1], fmt.n_out), s_dt or dtype,
                                                device, need[1])
    g = make(gen, x_layout(kinds[2], (fmt.n_out,), fmt.n_in), dtype, device) if (need[0] or s is not None and need[1]) \
        else None
    note(f"{fmt} dtype={dtype} dtype_arg={how is not None} codebooks={cb_dt} scales={scale_kind} {s_dt} kinds={kinds} "
         f"need={need} threads={threads} seed={seed}")
    format_events(fmt)
    event(f"dtype {_name(dtype)}")
    return fmt, cb, s, g, dtype, None if how is None else dtype, threads


def check_dequant(backend, device, problem):
    fmt, cb, s, g, dtype, dtype_arg, threads = problem
    inputs = [t for t in (cb, s) if t is not None]
    codes = fmt.codes.to(device)
    before = [t.leaf.detach().clone() for t in inputs]
    codes_before = codes.clone()
    with num_threads(threads):
        w = dequantize(codes, cb.value, None if s is None else s.value, rows_per_codebook=fmt.rpc_arg, dtype=dtype_arg,
                       backend=backend)
        if g is not None:
            w.backward(g.value)
    assert w.shape == (fmt.n_out, fmt.n_in) and w.dtype == dtype and w.device.type == device
    for t, bf in zip(inputs, before):
        assert torch.equal(t.leaf.detach(), bf), "dequantize modified an input"
    assert torch.equal(codes, codes_before), "dequantize modified the codes"
    c3 = fmt.codes if fmt.codes.dim() == 3 else fmt.codes.unsqueeze(-1)

    def f(cb_, *rest):
        cb_ = cb_ if cb_.dim() == 4 else cb_.unsqueeze(0)
        return dequantize_reference(c3, cb_, rest[0] if rest else None, fmt.rpc)
    (ref, ref_grads), (scale, scale_grads) = reference(f, inputs, g)
    tol = tolerance(dtype, backend, device)
    assert_close(w, ref, scale, tol, "W")
    if g is not None:
        wanted = [(n, t) for n, t in (("dcodebooks", cb), ("dscales", s)) if t is not None and t.leaf.requires_grad]
        assert len(wanted) == len(ref_grads)
        for (name, t), want, scale_ in zip(wanted, ref_grads, scale_grads):
            assert_close(t.leaf.grad, want, scale_, max(tol, TOL[t.leaf.dtype]), name)


@pytest.mark.parametrize("case", FAST, ids=IDS)
@poisoned(max_examples=N)
@given(data=st.data())
def test_dequantize_matches_float64_reference(poison, case, data):
    check_dequant(*case, data.draw(dequant_problems(*case)))


@pytest.mark.parametrize("case", INTERPRETED, ids=IDS)
@poisoned(max_examples=max(N // 20, 1))
@given(data=st.data())
def test_dequantize_triton_interpreted(poison, case, data):
    check_dequant(*case, data.draw(dequant_problems(*case, big=False)))


# ---- assign: valid input ------------------------------------------------------------------------

def brute_force_assign(v: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order (n, K), dist (n, K)) in float64: every centroid by distance, ties to the smaller index
    (sorting (distance, index) pairs, written independently of reference.py)."""
    dist = ((v.double().unsqueeze(1) - c.double().unsqueeze(0)) ** 2).sum(-1)
    K = c.shape[0]
    rows = dist.tolist()
    order = torch.tensor([sorted(range(K), key=lambda k, row=row: (row[k], k)) for row in rows],
                         dtype=torch.int64).reshape(v.shape[0], K)
    return order, dist


ASSIGN_K = [8, 1, 2, 3, 5, 7, 16, 37, 100, 256, 1000]
ASSIGN_D = [4, 1, 2, 3, 8, 16, 5, 20]


@functools.lru_cache(maxsize=None)
def assign_problems(backend, device, big=True):
    dts = dtypes_for(backend, device, _ASSIGN_SUPPORTED)
    ks = ASSIGN_K if big else [8, 1, 3, 37]
    return st.tuples(st.sampled_from([5, 0, 1, 2, 13, 40] if big else [5, 0, 1, 3]), st.sampled_from(ks),
                     st.sampled_from(ASSIGN_D), st.integers(1, MAX_TOPN), st.sampled_from(dts),
                     st.sampled_from(["random", "integers", "duplicates"]), st.sampled_from(["contiguous", "transposed"]),
                     THREADS if backend == "cpu" else st.just(1), SEEDS)


def check_assign(backend, device, n, K, d, topn, dtype, values, layout, threads, seed):
    topn = min(topn, K)
    note(f"n={n} K={K} d={d} topn={topn} dtype={dtype} values={values} layout={layout} threads={threads} seed={seed}")
    event(f"values {values}")
    event(f"dtype {_name(dtype)}")
    gen = torch.Generator().manual_seed(seed)
    if values == "random":
        v = torch.rand(n, d, generator=gen, dtype=torch.float64) * 2 - 1
        c = torch.rand(K, d, generator=gen, dtype=torch.float64) * 2 - 1
    else:   # small integers: every distance exact in every dtype (<= 16 * 20 = 320 is not: keep |.| <= 2, d <= 20)
        v = torch.randint(-2, 3, (n, d), generator=gen).double()
        c = torch.randint(-2, 3, (K, d), generator=gen).double()
        if values == "duplicates" and K > 1:   # repeated centroids: exact ties at every distance
            c[K // 2:] = c[:K - K // 2].clone()
    v, c = v.to(device=device, dtype=dtype), c.to(device=device, dtype=dtype)
    if layout == "transposed":
        v, c = v.t().contiguous().t(), c.t().contiguous().t()
    v_before, c_before = v.clone(), c.clone()
    with num_threads(threads):
        idx, dist = assign(v, c, topn, backend=backend)
    assert torch.equal(v, v_before) and torch.equal(c, c_before), "assign modified an input"
    assert idx.shape == (n, topn) and idx.dtype == torch.int32 and idx.device.type == device
    assert dist.shape == (n, topn) and dist.dtype == dtype
    assert torch.isfinite(dist).all(), "non-finite distances (an unwritten, NaN-poisoned element?)"
    if n == 0:
        return
    order, d64 = brute_force_assign(v.cpu(), c.cpu())
    idx, dist = idx.cpu().long(), dist.cpu().double()
    assert ((idx >= 0) & (idx < K)).all(), f"index out of range: {idx}"
    assert all(len(set(row)) == topn for row in idx.tolist()), "a centroid listed twice"
    exact = values != "random" and (d <= 16 or dtype not in (torch.bfloat16,))
    if exact:   # integer distances are exact: the exact order, ties to the smaller index
        assert torch.equal(idx, order[:, :topn]), f"indices {idx.tolist()} != {order[:, :topn].tolist()}"
        assert torch.equal(dist, d64.gather(1, idx)), "distances are not the exact squared distances"
        return
    # rounding may swap near ties: the returned centroids' true distances are the topn smallest ones
    # (to rounding), the returned distances are theirs, and they come nearest first
    tol = tolerance(dtype, backend, device) * 4 * d       # |v|, |c| <= 1: every distance <= 4d
    true = d64.gather(1, idx)
    best = d64.gather(1, order[:, :topn])
    assert (true - best).abs().max() <= tol, f"not the nearest: {true.tolist()} vs {best.tolist()}"
    assert (dist - true).abs().max() <= tol, "distances are not the returned centroids' distances"
    assert (dist[:, 1:] >= dist[:, :-1]).all(), "not nearest first"


@pytest.mark.parametrize("case", FAST, ids=IDS)
@poisoned(max_examples=N)
@given(data=st.data())
def test_assign_matches_brute_force(poison, case, data):
    check_assign(*case, *data.draw(assign_problems(*case)))


@pytest.mark.parametrize("case", INTERPRETED, ids=IDS)
@poisoned(max_examples=max(N // 20, 1))
@given(data=st.data())
def test_assign_triton_interpreted(poison, case, data):
    check_assign(*case, *data.draw(assign_problems(*case, big=False)))


# ---- check_codes: valid and bad codes ------------------------------------------------------------

@st.composite
def codes_with_one_bad(draw, n_bad_max=3):
    """(codes (n_out, G, M) or 2-D, K, the first bad position in (n_out, G, M) order, its unsigned value):
    1..n_bad_max codes >= K (as unsigned), the rest valid."""
    fmt = draw(formats(big=True).filter(lambda f: f.n_out * f.G > 0 and f.K < (1 << (8 if f.code_dtype == torch.uint8
                                                                                      else 16))))
    codes = fmt.codes if fmt.codes.dim() == 3 else fmt.codes.unsqueeze(-1)
    values = (codes.long() & 0xFFFF).clone(memory_format=torch.contiguous_format)
    top = (1 << (8 if fmt.code_dtype == torch.uint8 else 16)) - 1
    bad_values = st.integers(fmt.K, top) | st.just(fmt.K) | st.just(top)
    if fmt.code_dtype == torch.int16 and fmt.K <= 2**15:
        bad_values |= st.integers(2**15, top)        # stored negative: as signed, < K
    flat = values.view(-1)
    positions = draw(st.lists(st.integers(0, flat.numel() - 1), min_size=1, max_size=n_bad_max, unique=True))
    for p in positions:
        flat[p] = draw(bad_values)
    first = min(positions)
    pos = np.unravel_index(first, tuple(values.shape))
    bad = to_codes(values, fmt.code_dtype)
    if fmt.codes.dim() == 2:
        bad = bad[..., 0]
    if fmt.code_kind == "transposed":
        bad = code_view("transposed", bad if bad.dim() == 3 else bad.unsqueeze(-1))
    return fmt, bad, tuple(int(i) for i in pos), int(flat[first])


def _clear_code_memo():
    # The memo of a passed check lives on the codes tensor object (ops.check_codes); the examples here
    # build fresh tensors, so there is nothing to clear.
    return None


@settings(max_examples=N // 2)
@given(fmt=formats(big=True))
def test_check_codes_accepts_every_valid_code(fmt):
    check_codes(fmt.codes if fmt.codes.dim() == 3 else fmt.codes.unsqueeze(-1), fmt.K)
    check_codes(fmt.codes, fmt.K, "f")


@settings(max_examples=N // 2)
@given(problem=codes_with_one_bad())
def test_check_codes_names_the_first_code_out_of_range(problem):
    fmt, bad, pos, value = problem
    _clear_code_memo()
    with pytest.raises(ValueError) as e:
        check_codes(bad if bad.dim() == 3 else bad.unsqueeze(-1), fmt.K, "myfn")
    assert e.type is ValueError
    text = f"codes{list(pos)} = {value}"
    assert str(e.value).startswith("myfn: ") and text in str(e.value) and f"K = {fmt.K}" in str(e.value), \
        f"{e.value!s} does not name {text}"


@settings(max_examples=N // 10)
@given(problem=codes_with_one_bad(n_bad_max=1))
def test_check_codes_sees_an_in_place_change_after_a_passing_check(problem):
    """The check is remembered per tensor until its version counter moves: codes made bad in place
    after a passing check raise again."""
    fmt, bad, pos, value = problem
    _clear_code_memo()
    codes = bad if bad.dim() == 3 else bad.unsqueeze(-1)
    good = codes.clone()
    good[pos] = 0
    check_codes(good, fmt.K)
    good[pos] = codes[pos]
    with pytest.raises(ValueError, match=rf"codes\[{pos[0]}, {pos[1]}, {pos[2]}\] = {value}"):
        check_codes(good, fmt.K)


class _Tripwire:
    """Stands in for the compiled library, the reference and the Triton module: any kernel call fails."""

    def __getattr__(self, name):
        def kernel(*args, **kwargs):
            raise AssertionError(f"a kernel ran ({name}) before the codes were checked")
        return kernel


@pytest.mark.parametrize("op", ["vq_linear", "vq_linear_backward", "dequantize"])
@settings(max_examples=N // 5)
@given(problem=codes_with_one_bad(), backend=st.sampled_from(["torch", "cpu", None]), dtype=st.sampled_from(FLOATS),
       path=st.sampled_from(["auto", "gemv", "gemm"]), seed=SEEDS)
def test_codes_out_of_range_raise_before_any_kernel_runs(op, problem, backend, dtype, path, seed):
    fmt, bad, pos, value = problem
    if backend == "cpu" and _AVAIL_CPU["cpu"] != "available":
        backend = "torch"
    if backend == "cpu" or backend is None:
        dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(3, fmt.n_in, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)
    cb = (torch.rand(fmt.S, fmt.M, fmt.K, fmt.d, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)
    _clear_code_memo()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vq_ops._lib, "C", lambda: _Tripwire())
        mp.setattr(vq_ops, "_triton", lambda: _Tripwire())
        for fn in ("reference_fwd", "reference_bwd", "dequantize_reference"):
            mp.setattr(vq_ops, fn, _Tripwire().__getattr__(fn))
        with pytest.raises(ValueError) as e:
            if op == "dequantize":
                dequantize(bad, cb, rows_per_codebook=fmt.rpc_arg, backend=backend)
            elif op == "vq_linear":
                vq_linear(x, bad, cb, rows_per_codebook=fmt.rpc_arg, path=path, backend=backend)
            else:   # the backward op on its own (a graph saved before the codes went bad)
                torch.ops.kernelkit.vq_linear_bwd(x, bad if bad.dim() == 3 else bad.unsqueeze(-1), cb, None,
                                                  torch.ones(3, fmt.n_out, dtype=dtype), fmt.rpc,
                                                  backend or "torch", True, True, False)
    assert e.type is ValueError
    assert f"codes{list(pos)} = {value}" in str(e.value), f"{e.value!s} does not name codes{list(pos)} = {value}"


# ---- vq_linear / dequantize: bad input ----------------------------------------------------------

@st.composite
def valid_linear_inputs(draw):
    fmt = draw(formats(big=False))
    batch, dtype, seed = draw(st.tuples(batch_shapes(24), st.sampled_from(FLOATS), SEEDS))
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *shape: (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)  # noqa: E731
    args = [mk(*batch, fmt.n_in), fmt.codes, mk(fmt.S, fmt.M, fmt.K, fmt.d), mk(fmt.n_out), mk(fmt.n_out)]
    return fmt, args


NAMES = ("x", "codes", "codebooks", "scales", "bias")   # positions in vq_linear's arguments
BAD_RPC = [0, -1, -7, 1.5, 2.0, "2", True, False, [2], (2,)]


def _not_dense(draw, t):
    how = draw(st.sampled_from(["sparse_coo", "nested"]))
    with warnings.catch_warnings():  # "prototype"/"beta" notices of torch
        warnings.simplefilter("ignore", UserWarning)
        if how == "nested":
            return torch.nested.nested_tensor([t, t])
        return t.to_sparse()


@st.composite
def bad_linear_call(draw, kind, op="vq_linear"):
    """(args, kwargs, exception type, text the message must contain) with exactly one defect.  op:
    "vq_linear" (x, codes, codebooks, scales, bias) or "dequantize" (codes, codebooks, scales)."""
    fmt, args = draw(valid_linear_inputs())
    x, codes, cb, s, b = args
    n_out, G, M, K, d = fmt.n_out, fmt.G, fmt.M, fmt.K, fmt.d
    kw = {"rows_per_codebook": fmt.rpc_arg, "backend": draw(st.sampled_from([None, "torch"]))}
    if op == "vq_linear":
        kw["path"] = draw(st.sampled_from(["auto", "gemv", "gemm"]))
    args = [x, codes, cb, s if draw(st.booleans()) else None, b if draw(st.booleans()) else None]
    if kw["backend"] is None and x.dtype in (torch.float16, torch.bfloat16):
        warnings.simplefilter("ignore", kernelkit.KernelkitFallbackWarning)   # cpu -> torch for 16-bit
    choices = [0, 1, 2, 3, 4] if op == "vq_linear" else [1, 2, 3]
    i = draw(st.sampled_from(choices))
    name, t = NAMES[i], [x, codes, cb, s, b][i]

    def put(j, value, text, exc=ValueError):
        a = list(args)
        a[j] = value
        return a, kw, exc, text

    c3 = codes if codes.dim() == 3 else codes.unsqueeze(-1)
    if kind == "not_a_tensor":
        bad = draw(st.sampled_from(NOT_TENSORS + ["list", "numpy"]))
        bad = {"list": t.tolist(), "numpy": t.numpy() if t.dtype != torch.bfloat16 else t.float().numpy()}.get(bad, bad)
        if i >= 3 and bad is None:   # a None scales / bias is none
            bad = 0.0
        return put(i, bad, f"{name} must be a torch.Tensor", TypeError)
    if kind == "not_dense":       # sparse / nested tensors (test_vq_linear_sparse_codes_raise_type_error)
        i = draw(st.sampled_from(choices))
        return put(i, _not_dense(draw, [x, codes, cb, s, b][i]), f"{NAMES[i]} must be a dense (strided) tensor",
                   TypeError)
    if kind == "not_float":       # x, codebooks, scales, bias: any non-float dtype
        i = draw(st.sampled_from([j for j in choices if j != 1]))
        dt = draw(st.sampled_from(NOT_FLOAT))
        return put(i, [x, codes, cb, s, b][i].to(dt), f"{NAMES[i]} must be float32/float64/float16/bfloat16", TypeError)
    if kind == "codes_dtype":
        dt = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int32, torch.int64, torch.bool,
                                   torch.int8, torch.uint16 if hasattr(torch, "uint16") else torch.int32]))
        return put(1, codes.to(dt), "codes must be uint8 (K <= 256) or int16", TypeError)
    if kind == "wrong_rank":
        if i == 0:
            return put(0, x.sum(), "x must have at least 1 dimension")
        if i == 1:
            bad = draw(st.sampled_from([lambda c: c.reshape(-1), lambda c: c.sum().to(c.dtype),
                                        lambda c: c3.unsqueeze(0), lambda c: c3.unsqueeze(-1)]))(codes)
            return put(1, bad, "codes must be (n_out, n_in / d, M)")
        if i == 2:
            bad = draw(st.sampled_from([lambda c: c[0, 0], lambda c: c.reshape(-1), lambda c: c.unsqueeze(0)]))(cb)
            return put(2, bad, "codebooks must be (M, K, d) or (S, M, K, d)")
        if i == 3:
            bad = draw(st.sampled_from([lambda v: v.reshape(1, -1, 1) if n_out > 1 else v.repeat(2).reshape(1, 1, 2),
                                        lambda v: v.sum() if n_out != 1 else v.repeat(2)]))(s)
            return put(3, bad, "scales must have n_out")
        bad = draw(st.sampled_from([lambda v: v[None], lambda v: v[:, None], lambda v: v.sum()]))(b)
        return put(4, bad, "bias must be 1-D")
    if kind == "codes_m_mismatch":   # codes with M' != M codes per group (codebooks unchanged)
        m2 = draw(st.sampled_from([m for m in (1, 2, 3, 5, 16) if m != M]))
        bad = c3[..., :1].expand(n_out, G, m2).contiguous()
        return put(1, bad, f"codes has {m2} code(s) per group (codes.shape[2]) but codebooks has M = {M}")
    if kind == "group_size":        # d not in {1, 2, 4, 8, 16} (x widened to match, so d is the one defect)
        d2 = draw(st.sampled_from([0, 3, 5, 6, 7, 9, 12, 32]))
        a = list(args)
        a[2] = torch.zeros(*cb.shape[:-1], d2, dtype=cb.dtype)
        a[0] = torch.zeros(*x.shape[:-1], G * d2, dtype=x.dtype)
        return a, kw, ValueError, f"group size d = codebooks.shape[-1] must be one of {GROUP_SIZES}, got {d2}"
    if kind == "num_codebooks":     # M = 0 or > 16, codes to match
        m2 = draw(st.sampled_from([0, 17, 32]))
        a = list(args)
        a[2] = torch.zeros(fmt.S, m2, K, d, dtype=cb.dtype)
        a[1] = torch.zeros(n_out, G, m2, dtype=codes.dtype)
        return a, kw, ValueError, f"the number of codebooks M must be in [1, 16], got {m2}"
    if kind == "codebook_size":     # K > 256 with uint8 codes, K > 65536, K = 0
        if codes.dtype == torch.uint8 and draw(st.booleans()):
            k2, c2, limit = draw(st.sampled_from([257, 300, 1000])), codes, 256
        else:
            k2, c2, limit = draw(st.sampled_from([65537, 70000, 0])), codes.to(torch.int16), 65536
            if k2 == 0 and codes.dtype == torch.uint8 and draw(st.booleans()):
                c2, limit = codes, 256
        a = list(args)
        a[1], a[2] = c2, torch.zeros(fmt.S, M, k2, 1, dtype=cb.dtype)
        a[0] = torch.zeros(*x.shape[:-1], G, dtype=x.dtype)
        return a, kw, ValueError, f"codebook size K = {k2} does not fit {_name(c2.dtype)} codes (1 <= K <= {limit})"
    if kind == "x_width":
        width = draw(st.integers(0, fmt.n_in + 5).filter(lambda w: w != fmt.n_in))
        return put(0, torch.zeros(*x.shape[:-1], width, dtype=x.dtype),
                   f"x has {width} features (x.shape[-1]) but the codes describe n_in = {G} groups x d = {d}")
    if kind == "scales_length":
        n = draw(st.integers(0, n_out + 5).filter(lambda v: v != n_out))
        shape = draw(st.sampled_from([(n,), (n, 1, 1, 1)]))
        return put(3, torch.ones(shape, dtype=x.dtype), f"scales must have n_out = {n_out} entries")
    if kind == "bias_length":
        n = draw(st.integers(0, n_out + 5).filter(lambda v: v != n_out))
        return put(4, torch.ones(n, dtype=x.dtype), f"bias must have n_out = {n_out} entries")
    if kind == "rows_per_codebook_type":
        bad = draw(st.sampled_from(BAD_RPC))
        return args, {**kw, "rows_per_codebook": bad}, ValueError, "rows_per_codebook must be an int >= 1"
    if kind == "rows_per_codebook_sets":   # S sets in the codebooks, another count from n_out and r
        n2 = max(n_out, 1)
        r = draw(st.integers(1, n2 + 3))
        need = max(1, -(-n_out // r))
        S2 = draw(st.sampled_from([s_ for s_ in (1, 2, 3, need + 1) if s_ != need]))
        a = list(args)
        a[2] = torch.zeros(S2, M, K, d, dtype=cb.dtype)
        return a, {**kw, "rows_per_codebook": r}, ValueError, \
            f"codebooks has {S2} set(s) (codebooks.shape[0]) but n_out = {n_out} rows in sets of rows_per_codebook = {r}"
    if kind == "path":
        bad = draw(st.sampled_from(["GEMV", "", "dense", "gemv ", None, 0, 1, 2.0, b"gemv"]))
        return args, {**kw, "path": bad}, ValueError, "path must be one of 'auto', 'gemv', 'gemm'"
    if kind == "device_mismatch":
        if op == "vq_linear" and i == 0:
            return put(0, x.to("meta"), "x is on meta but codes is on cpu")
        if i in (1, 2):
            return put(i, t.to("meta"), f"codes is on {'meta' if i == 1 else 'cpu'} but codebooks is on "
                                        f"{'cpu' if i == 1 else 'meta'}")
        if i == 3:
            return put(3, s.to("meta"), "scales is on meta but codebooks is on cpu")
        return put(4, b.to("meta"), "bias is on meta but x is on cpu")
    if kind == "bad_backend":
        unknown = st.sampled_from(["gpu", "CPU", "Torch", "", "cuda:0", " cpu", "triton "]) | st.text(max_size=8)
        bad = draw(unknown.filter(lambda v: v not in kernelkit._backend.BACKENDS))
        if draw(st.booleans()):
            return args, {**kw, "backend": bad}, ValueError, "backend must be one of"
        bad = draw(st.sampled_from([1, 0.5, b"cpu", ["cpu"], ("cpu",), torch.device("cpu")]))
        return args, {**kw, "backend": bad}, TypeError, "backend must be a str"
    if kind == "unavailable_backend":
        if draw(st.booleans()) or _AVAIL_CPU["cpu"] != "available":   # CPU tensors: never the cuda backend
            return args, {**kw, "backend": "cuda"}, kernelkit.BackendUnavailableError, "backend 'cuda'"
        lowp = draw(st.sampled_from([torch.float16, torch.bfloat16]))
        a = [v.to(lowp) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for v in args]
        return a, {**kw, "backend": "cpu"}, kernelkit.BackendUnavailableError, "backend 'cpu'"
    raise AssertionError(kind)


LINEAR_BAD_KINDS = ["not_a_tensor", "not_dense", "not_float", "codes_dtype", "wrong_rank", "codes_m_mismatch",
                    "group_size", "num_codebooks", "codebook_size", "x_width", "scales_length", "bias_length",
                    "rows_per_codebook_type", "rows_per_codebook_sets", "path", "device_mismatch", "bad_backend",
                    "unavailable_backend"]


def _raises(call, exc, text, where):
    with pytest.raises(Exception) as e:
        call()
    assert e.type is exc, f"{e.type.__name__} instead of {exc.__name__}: {e.value}"
    assert text in str(e.value), f"message does not name the argument ({text!r}): {e.value}"
    assert where in str(e.value), f"message does not name the function ({where!r}): {e.value}"


@pytest.mark.parametrize("kind", LINEAR_BAD_KINDS)
@settings(max_examples=N // 20)
@given(data=st.data())
def test_vq_linear_bad_input_raises_the_documented_error(kind, data):
    with warnings.catch_warnings():
        args, kw, exc, text = data.draw(bad_linear_call(kind))
        where = "vq_linear" if kind in ("bad_backend", "unavailable_backend") else "kernelkit.vq.vq_linear"
        _raises(lambda: vq_linear(*args, **kw), exc, text, where)


DEQUANT_BAD_KINDS = [k for k in LINEAR_BAD_KINDS if k not in ("x_width", "bias_length", "path")]


@pytest.mark.parametrize("kind", DEQUANT_BAD_KINDS)
@settings(max_examples=N // 20)
@given(data=st.data())
def test_dequantize_bad_input_raises_the_documented_error(kind, data):
    with warnings.catch_warnings():
        args, kw, exc, text = data.draw(bad_linear_call(kind, op="dequantize"))
        where = "vq_dequantize" if kind in ("bad_backend", "unavailable_backend") else "kernelkit.vq.dequantize"
        codes, cb, s = args[1:4]
        _raises(lambda: dequantize(codes, cb, s, **kw), exc, text, where)


# ---- assign: bad input --------------------------------------------------------------------------

BAD_TOPN = [0, -1, 9, 1.0, True, False, "1", None, [1], 2.5]


@st.composite
def bad_assign_call(draw, kind):
    n, K, d, dtype, seed = draw(st.tuples(st.sampled_from([3, 0, 1, 7]), st.sampled_from([4, 1, 2, 9]),
                                          st.sampled_from([4, 1, 3]), st.sampled_from(FLOATS), SEEDS))
    gen = torch.Generator().manual_seed(seed)
    v = torch.rand(n, d, generator=gen, dtype=torch.float64).to(dtype)
    c = torch.rand(K, d, generator=gen, dtype=torch.float64).to(dtype)
    topn = draw(st.integers(1, min(MAX_TOPN, K)))
    kw = {"backend": draw(st.sampled_from([None, "torch"]))}
    which = draw(st.sampled_from(["vectors", "centroids"]))
    args = {"vectors": v, "centroids": c, "topn": topn}
    t = args[which]

    def put(name, value, text, exc=ValueError):
        return {**args, name: value}, kw, exc, text

    if kind == "not_a_tensor":
        bad = draw(st.sampled_from(NOT_TENSORS + ["list"]))
        return put(which, t.tolist() if bad == "list" else bad, f"{which} must be a torch.Tensor", TypeError)
    if kind == "not_float":
        return put(which, t.to(draw(st.sampled_from(NOT_FLOAT))), f"{which} must be float32/float64", TypeError)
    if kind == "wrong_rank":
        bad = draw(st.sampled_from([lambda u: u.reshape(-1), lambda u: u[None], lambda u: u.sum()]))(t)
        return put(which, bad, f"{which} must be 2-D")
    if kind == "dtype_mismatch":
        other = draw(st.sampled_from([dt for dt in FLOATS if dt != dtype]))
        return put("centroids", c.to(other), "centroids has dtype", TypeError)
    if kind == "device_mismatch":
        return put("centroids", c.to("meta"), "centroids is on meta but vectors is on cpu")
    if kind == "width_mismatch":
        d2 = draw(st.integers(1, 6).filter(lambda v_: v_ != d))
        return put(which, torch.zeros(t.shape[0], d2, dtype=dtype),
                   f"vectors have d = {d if which == 'centroids' else d2} but centroids have d = "
                   f"{d2 if which == 'centroids' else d}")
    if kind == "zero_width":
        return {**args, "vectors": v[:, :0], "centroids": c[:, :0]}, kw, ValueError, "vectors must have d >= 1"
    if kind == "topn":
        bad = draw(st.sampled_from(BAD_TOPN + [K + 1, min(MAX_TOPN, K) + 1]))
        return put("topn", bad, f"topn must be an int in [1, min({MAX_TOPN}, K = {K})]")
    if kind == "no_centroids":
        return put("centroids", c[:0], "topn must be an int in [1, min(8, K = 0)]")
    if kind == "bad_backend":
        return args, {"backend": draw(st.sampled_from(["gpu", "CPU", ""]))}, ValueError, "backend must be one of"
    if kind == "unavailable_backend":
        if draw(st.booleans()) or _AVAIL_CPU["cpu"] != "available":
            return args, {"backend": "cuda"}, kernelkit.BackendUnavailableError, "backend 'cuda'"
        lowp = draw(st.sampled_from([torch.float16, torch.bfloat16]))
        return ({**args, "vectors": v.to(lowp), "centroids": c.to(lowp)}, {"backend": "cpu"},
                kernelkit.BackendUnavailableError, "backend 'cpu'")
    raise AssertionError(kind)


ASSIGN_BAD_KINDS = ["not_a_tensor", "not_float", "wrong_rank", "dtype_mismatch", "device_mismatch", "width_mismatch",
                    "zero_width", "topn", "no_centroids", "bad_backend", "unavailable_backend"]


@pytest.mark.parametrize("kind", ASSIGN_BAD_KINDS)
@settings(max_examples=N // 20)
@given(data=st.data())
def test_assign_bad_input_raises_the_documented_error(kind, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kernelkit.KernelkitFallbackWarning)
        args, kw, exc, text = data.draw(bad_assign_call(kind))
        where = "vq_assign" if kind in ("bad_backend", "unavailable_backend") else "kernelkit.vq.assign"
        _raises(lambda: assign(args["vectors"], args["centroids"], args["topn"], **kw), exc, text, where)


# ---- VQLinear: valid input ----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def layer_problems(backend, device, big=True):
    dts = dtypes_for(backend, device)
    sizes = st.sampled_from([5, 1, 3, 8, 13, 16, 31, 40] if big else [5, 1, 3, 8])
    return st.tuples(sizes, sizes, st.sampled_from(GROUP_SIZES), st.sampled_from([16, 1, 3, 256, 300, 4096] if big
                                                                                  else [16, 1, 3, 300]),
                     st.sampled_from([1, 2, 3]), st.sampled_from([None, 1, 2, 3, 7]), st.booleans(), st.booleans(),
                     st.sampled_from(dts), batch_shapes(100 if big else 24), st.sampled_from(X_LAYOUTS),
                     st.sampled_from(X_LAYOUTS), st.sampled_from(["auto", "gemv", "gemm"]),
                     THREADS if backend == "cpu" else st.just(1), SEEDS
                     ).map(lambda t: _layer_problem(backend, device, *t))


def _layer_problem(backend, device, in_f, out_f, d, K, M, rpc, scales, bias, dtype, batch, x_kind, g_kind, path,
                   threads, seed):
    if rpc is not None:
        rpc = min(rpc, out_f) if K <= 256 else None   # (S sets of large codebooks: too much work per example)
    pad = in_f % d != 0
    note(f"in={in_f} out={out_f} d={d} K={K} M={M} rows_per_codebook={rpc} scales={scales} bias={bias} pad={pad} "
         f"dtype={dtype} batch={batch} layouts={x_kind},{g_kind} path={path} threads={threads} seed={seed}")
    event("padded input" if pad else "d divides in_features")
    event(f"dtype {_name(dtype)}")
    with torch.random.fork_rng(devices=[]):  # the layer's own init (codes, codebooks) from the drawn seed
        torch.manual_seed(seed)
        layer = VQLinear(in_f, out_f, bias=bias, d=d, K=K, M=M, rows_per_codebook=rpc, scales=scales, pad=pad,
                         device=device, dtype=dtype, backend=backend, path=path)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # values from the drawn seed (|v| <= 1)
        for prm in layer.parameters():
            prm.copy_(torch.rand(prm.shape, generator=gen, dtype=torch.float64) * 2 - 1)
    x = make(gen, x_layout(x_kind, batch, in_f), dtype, device, grad=True)
    g = make(gen, x_layout(g_kind, batch, out_f), dtype, device)
    return layer, x, g, dtype, threads, (*batch, out_f)


def check_layer(backend, device, problem):
    layer, x, g, dtype, threads, out_shape = problem
    in_f, out_f, d, K, M = layer.in_features, layer.out_features, layer.d, layer.K, layer.M
    G = -(-in_f // d)
    S = -(-out_f // layer.rows_per_codebook)
    assert layer.codebooks.shape == (S, M, K, d) and layer.codebooks.dtype == dtype
    assert layer.codes.shape == (out_f, G, M) and layer.codes.dtype == (torch.uint8 if K <= 256 else torch.int16)
    assert ((layer.codes.long() & 0xFFFF) < K).all(), "the layer's codes are out of range"
    codes_before = layer.codes.clone()
    with num_threads(threads):
        out = layer(x.value)
        out.backward(g.value)
    assert out.shape == out_shape and out.dtype == dtype
    assert torch.equal(layer.codes, codes_before), "the forward modified the codes"
    params = [Input(p, lambda t: t) for p in (layer.codebooks, layer.scales, layer.bias) if p is not None]
    codes, rpc = layer.codes.cpu(), layer.rows_per_codebook
    has_s, has_b = layer.scales is not None, layer.bias is not None

    def f(x_, cb, *rest):
        s = rest[0] if has_s else None
        b = rest[-1] if has_b else None
        xp = F.pad(x_, (0, G * d - in_f))       # the padded columns never contribute
        return vq_linear_reference(xp, codes, cb, s, b, rpc)
    (ref, ref_grads), (scale, scale_grads) = reference(f, [x, *params], g)
    tol = tolerance(dtype, backend, device)
    assert_close(out, ref, scale, tol, "out")
    got = [x.leaf.grad] + [p.leaf.grad for p in params]
    names = ["dx", "dcodebooks"] + ["dscales"] * has_s + ["dbias"] * has_b
    for name, a, want, sc in zip(names, got, ref_grads, scale_grads):
        assert_close(a, want, sc, tol, name)
    w = layer.dequantize()
    assert w.shape == (out_f, in_f)
    w_ref = dequantize_reference(codes, layer.codebooks.detach().cpu().double(),
                                 None if not has_s else layer.scales.detach().cpu().double(), rpc)[:, :in_f]
    w_scale = dequantize_reference(codes, layer.codebooks.detach().cpu().double().abs(),
                                   None if not has_s else layer.scales.detach().cpu().double().abs(), rpc)[:, :in_f]
    assert_close(w, w_ref, w_scale, tol, "dequantize()")


@pytest.mark.parametrize("case", FAST, ids=IDS)
@poisoned(max_examples=N // 4)
@given(data=st.data())
def test_vq_linear_layer_forward_backward_match_float64_reference(poison, case, data):
    check_layer(*case, data.draw(layer_problems(*case)))


@pytest.mark.parametrize("case", INTERPRETED, ids=IDS)
@poisoned(max_examples=max(N // 40, 1))
@given(data=st.data())
def test_vq_linear_layer_triton_interpreted(poison, case, data):
    check_layer(*case, data.draw(layer_problems(*case, big=False)))


@settings(max_examples=N // 20)
@given(dims=st.tuples(st.sampled_from([8, 3, 5, 16, 12]), st.sampled_from([4, 1, 7, 16])),
       fmt=st.sampled_from([(2, None, None, 1), (2, 2, None, 1), (2, 4, 16, 1), (2, 2, 8, 2), (3, None, None, 1),
                            (1, 8, 4, 2)]),
       bias=st.booleans(), scales=st.booleans(), rpc=st.sampled_from([None, 1, 3]), dtype=st.sampled_from(
           [torch.float32, torch.float64]), batch=batch_shapes(24), seed=SEEDS)
def test_from_linear_layer_computes_with_its_codes_and_keeps_the_linear(dims, fmt, bias, scales, rpc, dtype, batch,
                                                                        seed):
    """from_linear(linear) (few Lloyd iterations): the bias copied exactly, every code < K, the layer's
    output is F.linear with its own dequantized weight, the weight's quantization error is no larger
    than that of the mean sub-vector alone (k-means with K >= 1 codewords never does worse than one
    centroid at the mean), and the nn.Linear is not modified."""
    in_f, out_f = dims
    bits, d, K, M = fmt
    if rpc is not None:
        rpc = min(rpc, out_f)
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.rand(out_f, in_f, generator=gen, dtype=torch.float64) * 2 - 1)
        if bias:
            lin.bias.copy_(torch.rand(out_f, generator=gen, dtype=torch.float64) * 2 - 1)
    before = [p.detach().clone() for p in lin.parameters()]
    note(f"in={in_f} out={out_f} bits={bits} d={d} K={K} M={M} bias={bias} scales={scales} rpc={rpc} dtype={dtype}")
    d_eff, K0 = kernelkit.vq.bits_for(bits) if d is None else (d, 1 << min(bits * d, 16))
    K_eff = K if K is not None else kernelkit.vq.clamp_codebook_size(K0, d_eff, out_f, in_f)
    r = rpc or out_f
    counts = [(min(out_f, (i + 1) * r) - i * r) * -(-in_f // d_eff) for i in range(-(-out_f // r))]  # per set
    short = [c for c in counts if c < K_eff]
    if short:   # more codewords than a set's sub-vectors: a ValueError naming K and the first such set
        event("K > sub-vectors: ValueError")
        with pytest.raises(ValueError, match=f"K = {K_eff} codewords exceed the {short[0]} sub-vectors"):
            VQLinear.from_linear(lin, bits, d=d, K=K, M=M, scales=scales, rows_per_codebook=rpc, iters=3, seed=seed)
        return
    layer = VQLinear.from_linear(lin, bits, d=d, K=K, M=M, scales=scales, rows_per_codebook=rpc, iters=3, seed=seed)
    for p, b in zip(lin.parameters(), before):
        assert torch.equal(p.detach(), b), "from_linear modified the nn.Linear"
    assert (layer.bias is None) == (not bias) and (not bias or torch.equal(layer.bias.detach(), lin.bias.detach()))
    assert layer.in_features == in_f and layer.out_features == out_f and layer.codebooks.dtype == dtype
    assert ((layer.codes.long() & 0xFFFF) < layer.K).all(), "codes out of range"
    if K is not None:
        assert layer.K == K
    W = lin.weight.detach().double()
    Wq = layer.dequantize().detach().double()
    assert Wq.shape == W.shape and torch.isfinite(Wq).all()
    x = torch.rand(*batch, in_f, generator=gen, dtype=torch.float64).to(dtype) * 2 - 1
    out = layer(x)
    ref = F.linear(x.double(), Wq, None if not bias else lin.bias.detach().double())
    scale = F.linear(x.double().abs(), Wq.abs(), None if not bias else lin.bias.detach().double().abs())
    assert_close(out, ref, scale, TOL[dtype], "out")
    if not scales:   # (with scales the k-means runs on row-normalized sub-vectors)
        G = -(-in_f // layer.d)
        sub = F.pad(W, (0, G * layer.d - in_f)).reshape(-1, layer.d)     # zero-padded as the quantizer pads
        mean_err = (sub - sub.mean(0)).square().sum()
        assert (W - Wq).square().sum() <= mean_err * (1 + 1e-4) + 1e-9, "worse than a single centroid at the mean"


# ---- VQLinear and from_linear: bad input --------------------------------------------------------

@st.composite
def bad_layer_call(draw, kind):
    """(thunk, exception type, text the message must contain)."""
    in_f, out_f = draw(st.sampled_from([8, 4, 12])), draw(st.sampled_from([5, 1, 3]))
    kw = {}
    if kind == "size":
        which = draw(st.sampled_from(["in_features", "out_features"]))
        bad = draw(st.sampled_from([0, -1, 1.5, 8.0, "8", None, True, [8]]))
        args = {"in_features": in_f, "out_features": out_f, which: bad}
        return lambda: VQLinear(**args), ValueError, f"VQLinear: {which} must be a positive int"
    if kind == "d":
        bad = draw(st.sampled_from([0, 3, 5, 32, -4, True, "4", None]))
        return lambda: VQLinear(in_f, out_f, d=bad), ValueError, "VQLinear: d must be one of"
    if kind == "K":
        bad = draw(st.sampled_from([0, -1, 65537, 2**20, 16.0, True, "16", None]))
        return lambda: VQLinear(in_f, out_f, K=bad), ValueError, "VQLinear: K must be an int in [1, 65536]"
    if kind == "M":
        bad = draw(st.sampled_from([0, 17, -1, 2.0, True, "2", None]))
        return lambda: VQLinear(in_f, out_f, M=bad), ValueError, "VQLinear: M must be an int in [1, 16]"
    if kind == "rows_per_codebook":
        bad = draw(st.sampled_from([0, -1, 1.5, "2", True]))
        return lambda: VQLinear(in_f, out_f, rows_per_codebook=bad), ValueError, \
            "VQLinear: rows_per_codebook must be a positive int"
    if kind == "pad":
        d = draw(st.sampled_from([8, 16]))
        in2 = draw(st.sampled_from([3, 5, 7, 9, 12]))
        return lambda: VQLinear(in2, out_f, d=d), ValueError, f"VQLinear: in_features = {in2} is not a multiple of d"
    if kind == "dtype":
        bad = draw(st.sampled_from(NOT_FLOAT + ["float32", np.float32, float]))
        return lambda: VQLinear(in_f, out_f, dtype=bad), TypeError, "VQLinear: dtype must be"
    if kind == "backend":
        bad = draw(st.sampled_from(["gpu", "CPU", "", 1, ["cpu"]]))
        if isinstance(bad, str):
            return lambda: VQLinear(in_f, out_f, backend=bad), ValueError, "backend must be one of"
        return lambda: VQLinear(in_f, out_f, backend=bad), TypeError, "backend must be a str"
    if kind == "path":
        bad = draw(st.sampled_from(["GEMV", "", "dense", None, 1]))
        return lambda: VQLinear(in_f, out_f, path=bad), ValueError, "VQLinear: path must be one of"
    if kind == "from_linear_not_linear":
        bad = draw(st.sampled_from(["conv", "none", "weight", "vq"]))
        bad = {"conv": lambda: torch.nn.Conv1d(in_f, out_f, 1), "none": lambda: None,
               "weight": lambda: torch.zeros(out_f, in_f), "vq": lambda: VQLinear(in_f, out_f)}[bad]()
        return lambda: VQLinear.from_linear(bad), TypeError, "VQLinear.from_linear: linear must be an nn.Linear"
    if kind == "from_linear_d":
        bad = draw(st.sampled_from([0, 3, 5, 32, True]))
        lin = torch.nn.Linear(in_f, out_f)
        return lambda: VQLinear.from_linear(lin, d=bad), ValueError, "VQLinear.from_linear: d must be one of"
    layer = VQLinear(in_f, out_f, **kw)
    x = torch.zeros(2, in_f)
    if kind == "x_width":
        w = draw(st.integers(0, 20).filter(lambda v: v != in_f))
        return lambda: layer(torch.zeros(2, w)), ValueError, f"VQLinear: x.shape[-1] must be in_features={in_f}"
    if kind == "x_rank":
        return lambda: layer(torch.zeros(())), ValueError, "VQLinear: x must have at least 1 dimension"
    if kind == "x_not_a_tensor":
        bad = draw(st.sampled_from(NOT_TENSORS + ["list"]))
        bad = x.tolist() if bad == "list" else bad
        return lambda: layer(bad), TypeError, "VQLinear: x must be a torch.Tensor"
    if kind == "x_not_float":
        dt = draw(st.sampled_from(NOT_FLOAT))
        return lambda: layer(x.to(dt)), TypeError, "VQLinear: x must be float32/float64/float16/bfloat16"
    if kind == "x_device_mismatch":
        return lambda: layer(x.to("meta")), ValueError, "x is on meta"
    raise AssertionError(kind)


LAYER_BAD_KINDS = ["size", "d", "K", "M", "rows_per_codebook", "pad", "dtype", "backend", "path",
                   "from_linear_not_linear", "from_linear_d", "x_width", "x_rank", "x_not_a_tensor", "x_not_float",
                   "x_device_mismatch"]


@pytest.mark.parametrize("kind", LAYER_BAD_KINDS)
@settings(max_examples=N // 20)
@given(data=st.data())
def test_vq_linear_layer_bad_input_raises_the_documented_error(kind, data):
    call, exc, text = data.draw(bad_layer_call(kind))
    with pytest.raises(Exception) as e:
        call()
    assert e.type is exc, f"{e.type.__name__} instead of {exc.__name__}: {e.value}"
    assert text in str(e.value), f"message does not name the argument ({text!r}): {e.value}"


# ---- defects these tests found, fixed since -------------------------------------------------------

def _small():
    codes = torch.randint(0, 10, (5, 3, 1), dtype=torch.uint8)
    return torch.randn(2, 12), codes, torch.randn(1, 10, 4)


def test_code_check_memo_survives_address_reuse():
    cb, x = torch.randn(1, 10, 4), torch.randn(2, 12)
    for _ in range(20):   # the CPU allocator hands a freed block of this size straight back, almost always
        good = torch.zeros(1000, 3, 1, dtype=torch.uint8)
        good.add_(1)
        ptr = good.data_ptr()
        vq_linear(x, good, cb, backend="torch")
        del good
        bad = torch.zeros(1000, 3, 1, dtype=torch.uint8)
        bad.add_(200)
        if bad.data_ptr() == ptr:
            break
    else:
        pytest.skip("the allocator did not reuse the address")
    with pytest.raises(ValueError, match=r"codes\[0, 0, 0\] = 200"):
        vq_linear(x, bad, cb, backend="torch")


@pytest.mark.parametrize("bad", [["gemv"], {"gemv": 1}])
def test_vq_linear_unhashable_path_raises_value_error(bad):
    x, codes, cb = _small()
    with pytest.raises(ValueError, match="path must be one of"):
        vq_linear(x, codes, cb, path=bad)


@pytest.mark.parametrize("how", ["sparse_coo", "nested"])
def test_vq_linear_sparse_codes_raise_type_error(how):
    x, codes, cb = _small()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        bad = codes.to_sparse() if how == "sparse_coo" else torch.nested.nested_tensor([codes, codes])
    with pytest.raises(TypeError, match="codes must be a dense"):
        vq_linear(x, bad, cb)


@pytest.mark.parametrize("bad", [torch.int32, torch.bool, torch.complex64, "float32", np.float32])
def test_dequantize_bad_dtype_raises_type_error(bad):
    _, codes, cb = _small()
    with pytest.raises(TypeError, match="kernelkit.vq.dequantize: dtype"):
        dequantize(codes, cb, dtype=bad)


@pytest.mark.parametrize("dt", [torch.float32, torch.int32, torch.int64])
def test_check_codes_rejects_codes_of_the_wrong_dtype(dt):
    codes = torch.randint(0, 3, (5, 3, 1)).to(dt)
    with pytest.raises(TypeError, match="codes must be uint8"):
        check_codes(codes, 3)


@pytest.mark.skipif(_AVAIL_CPU["cpu"] != "available", reason="cpu backend not built")
@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_vq_linear_non_contiguous_bias(layout):
    x, codes, cb = _small()
    base, view = vec_layout(layout, 5)
    b = view(torch.randn(base))
    want = vq_linear(x, codes, cb, bias=b, backend="torch")
    got = vq_linear(x, codes, cb, bias=b, backend="cpu")
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()


@pytest.mark.skipif(_AVAIL_CPU["cpu"] != "available", reason="cpu backend not built")
def test_vq_linear_codebook_gradient_with_no_output_rows_is_zero(poison):
    x = torch.randn(2, 12, requires_grad=True)
    cb = torch.randn(1, 16, 4, requires_grad=True)
    vq_linear(x, torch.zeros(0, 3, 1, dtype=torch.uint8), cb, backend="cpu").sum().backward()
    assert torch.equal(cb.grad, torch.zeros_like(cb)), cb.grad
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_codebook_gradient_accumulates_in_float32(dtype):
    cb = torch.ones(1, 1, 1, 1, dtype=dtype, requires_grad=True)
    w = dequantize(torch.zeros(64, 64, 1, dtype=torch.uint8), cb, backend="torch")
    w.backward(torch.ones_like(w))
    assert cb.grad.item() == 4096
