"""Shared by the property-based tests of every family (tests/test_<family>_properties.py): which
backends run here, the hypothesis settings of tests that take the `poison` fixture, input layouts
(views of x), float64 references and the error measure relative to the |.| reference, and the lists
of bad values.  See tests/test_monarch_properties.py's docstring for the rule every public op follows.
"""
from __future__ import annotations

import contextlib
import resource
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import kernelkit  # noqa: E402

N = settings().max_examples  # of the active profile: 1000 (ci) or 10_000 (slow)

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# (backend, device) pairs that run here.  The Triton interpreter is ~1000x slower per call than the
# other backends, so it gets its own tests with fewer (and smaller) examples.
_AVAIL_CPU = kernelkit.backends("cpu")

FAST = [("torch", "cpu")] + ([("cpu", "cpu")] if _AVAIL_CPU["cpu"] == "available" else [])

INTERPRETED = [("triton", "cpu")] if (not torch.cuda.is_available() and _AVAIL_CPU["triton"] == "available") else []

IDS = lambda case: f"{case[0]}-{case[1]}"  # noqa: E731

def poisoned(max_examples: int):
    """Settings of a test that takes the `poison` fixture.  The fixture switches a process-wide mode
    (NaN-fill every torch.empty) for the whole test, which is what every example needs: hypothesis's
    warning about function-scoped fixtures (not reset between examples) does not apply."""
    return settings(max_examples=max_examples, suppress_health_check=[HealthCheck.function_scoped_fixture])

@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for everything but the cpu kernel under test (which draws its own thread
    count): thousands of tiny float64 references spend more on waking a thread pool than on maths,
    badly so on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

@contextlib.contextmanager
def num_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)

# The cpu kernel splits its work over this many OpenMP threads (serial, and split unevenly over odd
# work counts and over fewer rows than threads).  More threads than a 2-core CI machine has would
# cost a scheduler time slice per parallel region and test nothing more.
THREADS = st.sampled_from([1, 2])

SEEDS = st.integers(0, 2**32 - 1)

# 0..3 leading dims, with size-0 and size-1 dims (hypothesis favours the first entry of a list:
# one leading dim of one row, not a 1-D x, is the plain case)
_BATCH_SIZE = st.sampled_from([1, 2, 0, 3, 5, 7, 13])

# Views of a fresh "base" tensor; (base shape, view) for a wanted (*batch, n) shape.
X_LAYOUTS = ["contiguous", "transposed", "expanded_rows", "expanded_cols", "sliced_rows", "strided_cols", "broadcast"]

def x_layout(kind: str, batch: tuple, n: int):
    if kind == "transposed" and batch:        # last dim not the innermost: copied to rows
        return (n, *batch), lambda t: t.movedim(0, -1)
    if kind == "expanded_rows" and batch:     # stride 0 over the batch: one row seen many times
        return (*[1] * len(batch), n), lambda t: t.expand(*batch, n)
    if kind == "expanded_cols":               # inner stride 0
        return (*batch, 1), lambda t: t.expand(*batch, n)
    if kind == "sliced_rows" and batch:       # every other row, offset columns: used in place
        return (2 * batch[0], *batch[1:], n + 3), lambda t: t[::2, ..., 2:n + 2]
    if kind == "strided_cols":                # inner stride 2
        return (*batch, 2 * n), lambda t: t[..., ::2]
    if kind == "broadcast":                   # one value, every stride 0 -- size-1 dims too, as in
        return (), lambda t: t.expand(*batch, n)  # the gradient of out.sum()
    return (*batch, n), lambda t: t

@dataclass
class Input:
    """A leaf tensor in the tested dtype and device, the view of it the op sees, and the view fn."""
    leaf: torch.Tensor
    view: Callable[[torch.Tensor], torch.Tensor]

    @property
    def value(self) -> torch.Tensor:
        return self.view(self.leaf)

    def as64(self, absolute: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The same (already rounded) values in float64 on the CPU, as a fresh leaf, and its view."""
        leaf = self.leaf.detach().to("cpu", torch.float64)
        leaf = (leaf.abs() if absolute else leaf).requires_grad_(self.leaf.requires_grad)
        return leaf, self.view(leaf)

def make(gen: torch.Generator, layout, dtype, device, grad=False) -> Input:
    base_shape, view = layout
    base = torch.rand(base_shape, generator=gen, dtype=torch.float64) * 2 - 1  # |v| <= 1: fp16-safe
    return Input(base.to(device=device, dtype=dtype).requires_grad_(grad), view)

def assert_close(got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, tol: float, what: str) -> None:
    """||got - ref|| <= tol * ||scale||, scale = the same computation on |inputs|.

    The rounding error of a sum of products is bounded by eps * sum |products| (not by |sum|), so
    the tolerance is relative to the reference computed on absolute values: small random problems
    (one output element summing two terms) can cancel to ~0, where ||ref|| would demand more
    accuracy than any floating-point sum has.  scale >= |ref| elementwise, so this is the usual
    relative error whenever nothing cancels."""
    assert got is not None, f"{what}: no gradient"
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite entries (an unwritten, NaN-poisoned element?)"
    den = scale.norm().item()
    err = (got.detach().to("cpu", torch.float64) - ref).norm().item() / (den if den > 0 else 1.0)
    assert err <= tol, f"{what}: error {err:.3e} (relative to the |.| reference) > {tol:.0e} ({got.dtype})"

def reference(fn, inputs: list[Input], cotangent: Input | None):
    """fn's float64 value on the inputs (and gradients w.r.t. the leaves that require grad), and the
    same on absolute values: the error scale of each (see assert_close)."""
    results = []
    for absolute in (False, True):
        leaves, views = zip(*(i.as64(absolute) for i in inputs))
        out = fn(*views)
        grads = []
        if cotangent is not None:
            _, g = cotangent.as64(absolute)
            out.backward(g.detach())
            grads = [leaf.grad for leaf in leaves if leaf.requires_grad]
        results.append((out.detach(), grads))
    return results

def huge(shape, dtype, device) -> torch.Tensor:
    """A tensor of any logical size that owns one element (every stride 0)."""
    return torch.zeros((), dtype=dtype, device=device).expand(*shape)

def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

TRITON_DEVICE = "cpu" if INTERPRETED else ("cuda" if ("triton", "cuda") in FAST else None)

NOT_TENSORS = [None, 3, 2.5, "x", b"x"]

NOT_FLOAT = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
             torch.complex64, torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2]

def _replace(args, i, value):
    args = list(args)
    args[i] = value
    return args

NOT_SIZES = [0, -1, -7, 1.5, 8.0, "8", None, True, False, [8]]
