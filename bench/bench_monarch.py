"""pytest-benchmark view of the Monarch benchmark (same cases and providers as
``python -m kernelkit.bench --family monarch``; see kernelkit/bench/monarch.py for what is timed).

Run explicitly:  pytest bench/ --benchmark-only   (the main suite, testpaths = tests, skips it).
Environment knobs (sizes are read at collection time):
    KERNELKIT_BENCH_QUICK=1         batch 256, first two shapes, nblocks 4
    KERNELKIT_BENCH_BATCH=N         batch rows per case
    KERNELKIT_BENCH_BACKENDS=a,b    kernelkit backends to time (default: the device's native ones;
                                    add torch for the slow reference backend)
    KERNELKIT_BENCH_ROUNDS=N        timed rounds per test (default 3, after 1 warm-up round)
Device: cuda if available, else cpu.  Triton/CUDA providers are marked `cuda` and skip without a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

from kernelkit.bench import monarch as mb

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_ENV_BACKENDS = os.environ.get("KERNELKIT_BENCH_BACKENDS")
BACKENDS = [b for b in _ENV_BACKENDS.split(",") if b] if _ENV_BACKENDS else None
ROUNDS = int(os.environ.get("KERNELKIT_BENCH_ROUNDS", "3"))
CASES = mb.cases(DEVICE, quick=os.environ.get("KERNELKIT_BENCH_QUICK") == "1",
                 batch=int(os.environ["KERNELKIT_BENCH_BATCH"]) if os.environ.get("KERNELKIT_BENCH_BATCH") else None)
_GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
PROVIDERS = [pytest.param(p, marks=[pytest.mark.cuda, _GPU_ONLY] if p in ("kernelkit_triton", "kernelkit_cuda") else [])
             for p in (*mb.BASELINES, "kernelkit_cpu", "kernelkit_triton", "kernelkit_cuda", "kernelkit_torch")]
_RUN, _SKIPPED = mb.providers(DEVICE, BACKENDS)


def _case_id(c: mb.Case) -> str:
    return f"{c.in_features}-{c.out_features}-nb{c.nblocks}-b{c.batch}"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", mb.MODES, ids=lambda m: m.replace("+", "_"))
@pytest.mark.parametrize("dtype", mb.dtypes(DEVICE), ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_monarch(benchmark, case, dtype, mode, provider):
    """Median time of one ``mode`` step of ``provider`` on ``case`` (see kernelkit.bench.monarch)."""
    if provider not in _RUN:
        pytest.skip(_SKIPPED.get(provider, f"{provider} not selected (KERNELKIT_BENCH_BACKENDS)"))
    inp = mb.make_inputs(case, dtype, DEVICE)
    step = mb.make_fn(provider, mode, inp)
    if DEVICE == "cuda":
        inner = step

        def step():  # wall-clock timer: wait for the kernels
            inner()
            torch.cuda.synchronize()
    benchmark.extra_info.update(family=mb.FAMILY, shape=case.label, op=mode, dtype=str(dtype).replace("torch.", ""),
                                device=DEVICE, provider=provider, batch=case.batch, nblocks=case.nblocks)
    benchmark.group = f"{mode} {case.label} {benchmark.extra_info['dtype']}"
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
