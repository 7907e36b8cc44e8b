"""pytest-benchmark view of the sparse benchmark (same cases and providers as
``python -m kernelkit.bench --family sparse``; see kernelkit/bench/sparse.py for what is timed).

Run explicitly:  pytest bench/bench_sparse.py --benchmark-only   (the main suite never collects it).
Environment knobs (read at collection time):
    KERNELKIT_BENCH_QUICK=1         batch 256, 1024x4096 at 50/90/99%
    KERNELKIT_BENCH_BATCH=N         batch rows per case
    KERNELKIT_BENCH_BACKENDS=a,b    kernelkit backends to time (default: the device's native ones)
    KERNELKIT_BENCH_ROUNDS=N        timed rounds per test (default 3, after 1 warm-up round)
Device: cuda if available, else cpu.  Triton/CUDA providers are marked `cuda` and skip without a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

from kernelkit import _backend
from kernelkit.bench import sparse as sb

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_ENV_BACKENDS = os.environ.get("KERNELKIT_BENCH_BACKENDS")
BACKENDS = [b for b in _ENV_BACKENDS.split(",") if b] if _ENV_BACKENDS else None
ROUNDS = int(os.environ.get("KERNELKIT_BENCH_ROUNDS", "3"))
CASES = sb.cases(DEVICE, quick=os.environ.get("KERNELKIT_BENCH_QUICK") == "1",
                 batch=int(os.environ["KERNELKIT_BENCH_BATCH"]) if os.environ.get("KERNELKIT_BENCH_BATCH") else None)
_GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
_KK = [f"kernelkit_{b}{suffix}" for b in ("cpu", "triton", "cuda", "torch") for suffix in ("", "_auto")]
PROVIDERS = [pytest.param(p, marks=[pytest.mark.cuda, _GPU_ONLY] if ("triton" in p or "cuda" in p) else [])
             for p in (sb.DENSE, sb.CSR, sb.BSR, *_KK)]
_RUN, _SKIPPED = sb.providers(DEVICE, BACKENDS)


def _case_id(c: sb.Case) -> str:
    return f"{c.out_features}x{c.in_features}-s{round(100 * c.sparsity)}-b{c.batch}{'-bsr' if c.blocked else ''}"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", sb.MODES, ids=lambda m: m.replace("+", "_"))
@pytest.mark.parametrize("dtype", sb.dtypes(DEVICE), ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_sparse(benchmark, case, dtype, mode, provider):
    """Median time of one ``mode`` step of ``provider`` on ``case`` (see kernelkit.bench.sparse)."""
    if provider not in _RUN:
        pytest.skip(_SKIPPED.get(provider, f"{provider} not selected (KERNELKIT_BENCH_BACKENDS)"))
    inp = sb.make_inputs(case, dtype, DEVICE)
    try:
        step = sb.make_fn(provider, mode, inp)
        step()
    except _backend.BackendUnavailableError as e:
        pytest.skip(str(e))
    if DEVICE == "cuda":
        inner = step

        def step():  # wall-clock timer: wait for the kernels
            inner()
            torch.cuda.synchronize()
    benchmark.extra_info.update(family=sb.FAMILY, shape=case.label, op=mode, dtype=str(dtype).replace("torch.", ""),
                                device=DEVICE, provider=provider, batch=case.batch, sparsity=case.sparsity)
    benchmark.group = f"{mode} {case.label} {benchmark.extra_info['dtype']}"
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
