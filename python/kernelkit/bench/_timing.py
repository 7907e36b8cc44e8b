"""Wall-clock timing of zero-argument callables: warm-up calls, then the median of N timed calls.

Several callables measured together are interleaved (one timed call of each per round), so that
load from other processes or clock changes hit every provider alike rather than whichever ran at
the wrong moment.
CPU: each call is timed with time.perf_counter.  CUDA: each call is bracketed by a pair of
torch.cuda.Event records on the current stream and the device is synchronized before reading them,
so the time is that of the queued kernels (plus launch gaps when the host cannot keep up).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def warm(fn: Callable[[], object], warmup: int) -> None:
    """Run ``fn`` ``max(warmup, 1)`` times untimed (compiles, allocator, caches); errors propagate."""
    for _ in range(max(warmup, 1)):
        fn()


def median_ms(fns: dict[str, Callable[[], object]], device: str, *, repeats: int) -> dict[str, float]:
    """{name: median milliseconds of ``repeats`` calls}, calls interleaved round by round."""
    if repeats < 1:
        raise ValueError(f"median_ms: repeats must be >= 1, got {repeats}")
    if device == "cuda":
        torch.cuda.synchronize()
        events = {k: [] for k in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                events[name].append((start, end))
        torch.cuda.synchronize()
        return {k: statistics.median(s.elapsed_time(e) for s, e in ev) for k, ev in events.items()}
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def mode_step(mode: str, fwd: Callable[[], object], params, g, modes=("fwd", "fwd+bwd")) -> Callable[[], object]:
    """One benchmark step: ``fwd()`` under torch.no_grad() ("fwd"), or ``fwd()`` then the gradients of
    ``params`` for the upstream gradient ``g`` ("fwd+bwd")."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fwd()
    elif mode == "fwd+bwd":
        def step():
            return torch.autograd.grad(fwd(), params, g)
    else:
        raise ValueError(f"unknown mode {mode!r} (choose from {', '.join(modes)})")
    return step
