"""pytest-benchmark view of the M-FAC benchmark (same cases and providers as
``python -m kernelkit.bench --family mfac``; see kernelkit/bench/mfac.py for what is timed).

Run explicitly:  pytest bench/bench_mfac.py --benchmark-only   (the main suite never collects it).
Environment knobs (read at collection time):
    KERNELKIT_BENCH_QUICK=1         d = 1e5 m = 64 and d = 1e6 m = 256
    KERNELKIT_BENCH_BATCH=N         one gradient size d
    KERNELKIT_BENCH_BACKENDS=a,b    kernelkit backends to time (default: the device's native ones)
    KERNELKIT_BENCH_ROUNDS=N        timed rounds per test (default 3, after 1 warm-up round)
Device: cuda if available, else cpu.  Triton/CUDA providers are marked `cuda` and skip without a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

from kernelkit import _backend
from kernelkit.bench import mfac as mb
from kernelkit.mfac import StaticIHVP

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_ENV_BACKENDS = os.environ.get("KERNELKIT_BENCH_BACKENDS")
BACKENDS = [b for b in _ENV_BACKENDS.split(",") if b] if _ENV_BACKENDS else None
ROUNDS = int(os.environ.get("KERNELKIT_BENCH_ROUNDS", "3"))
CASES = mb.cases(DEVICE, quick=os.environ.get("KERNELKIT_BENCH_QUICK") == "1",
                 batch=int(os.environ["KERNELKIT_BENCH_BATCH"]) if os.environ.get("KERNELKIT_BENCH_BATCH") else None)
_GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
_KK = [f"kernelkit_{b}_{dt}" for b in ("cpu", "triton", "cuda", "torch") for dt in ("f32", "bf16")]
PROVIDERS = [pytest.param(p, marks=[pytest.mark.cuda, _GPU_ONLY] if ("triton" in p or "cuda" in p) else [])
             for p in (mb.TORCH, mb.PAPER, *_KK)]
_RUN, _SKIPPED = mb.providers(DEVICE, BACKENDS)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}-{c.label}".replace(" ", "-"))
def test_mfac(benchmark, case, provider):
    """Median time of one ``case.op`` call of ``provider`` on a filled window (see kernelkit.bench.mfac)."""
    if provider not in _RUN and provider not in (mb.TORCH, mb.PAPER):
        pytest.skip(_SKIPPED.get(provider, f"{provider} not selected (KERNELKIT_BENCH_BACKENDS)"))
    grads = mb._gradients(case.d, case.m, DEVICE, case.m + 1)
    if case.op == "static_setup":
        if provider == mb.PAPER or provider.endswith("_bf16"):
            pytest.skip("static_setup is timed for torch_f32 and the kernelkit float32 providers")
        G = torch.stack(grads[:case.m])
        if provider == mb.TORCH:
            step = lambda: mb._torch_static(G, mb.DAMP, case.block)  # noqa: E731
        else:
            be = provider.removeprefix("kernelkit_").removesuffix("_f32")
            step = lambda: StaticIHVP(G, mb.DAMP, case.block, backend=be)  # noqa: E731
    else:
        try:
            w = mb._make_window(provider, case.d, case.m, DEVICE)
        except _backend.BackendUnavailableError as e:
            pytest.skip(str(e))
        mb._fill(provider, w, mb._window_rows(case.d, case.m, DEVICE))
        x = grads[-1]
        step = (lambda: w.mul(x)) if case.op == "ihvp" else (lambda: getattr(w, case.op)(x))
    step()
    if DEVICE == "cuda":
        inner = step

        def step():  # wall-clock timer: wait for the kernels
            inner()
            torch.cuda.synchronize()
    benchmark.extra_info.update(family=mb.FAMILY, shape=case.label, op=case.op, device=DEVICE, provider=provider,
                                d=case.d, m=case.m)
    benchmark.group = f"{case.op} {case.label}"
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
