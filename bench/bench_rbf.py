"""pytest-benchmark view of the RBF benchmark (same cases and providers as
``python -m kernelkit.bench --family rbf``; see kernelkit/bench/rbf.py for what is timed).

Run explicitly:  pytest bench/bench_rbf.py --benchmark-only   (the main suite never collects it).
Environment knobs (read at collection time):
    KERNELKIT_BENCH_QUICK=1         N = 2^16, M = 1e4, k = 4 and 8
    KERNELKIT_BENCH_BATCH=N         one query count N
    KERNELKIT_BENCH_BACKENDS=a,b    kernelkit backends to time (default: the device's native ones)
    KERNELKIT_BENCH_ROUNDS=N        timed rounds per test (default 3, after 1 warm-up round)
Device: cuda if available, else cpu.  Triton/CUDA providers are marked `cuda` and skip without a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

from kernelkit.bench import rbf as rb
from kernelkit.rbf import build_grid, knn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_ENV_BACKENDS = os.environ.get("KERNELKIT_BENCH_BACKENDS")
BACKENDS = [b for b in _ENV_BACKENDS.split(",") if b] if _ENV_BACKENDS else None
ROUNDS = int(os.environ.get("KERNELKIT_BENCH_ROUNDS", "3"))
CASES = rb.cases(DEVICE, quick=os.environ.get("KERNELKIT_BENCH_QUICK") == "1",
                 batch=int(os.environ["KERNELKIT_BENCH_BATCH"]) if os.environ.get("KERNELKIT_BENCH_BATCH") else None)
_GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
_KK = [f"kernelkit_{b}" for b in ("cpu", "triton", "cuda", "torch")]
PROVIDERS = [pytest.param(p, marks=[pytest.mark.cuda, _GPU_ONLY] if ("triton" in p or "cuda" in p) else [])
             for p in (rb.TORCH, rb.KDTREE, *_KK)]
_RUN, _SKIPPED = rb.providers(DEVICE, BACKENDS)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}-{c.label}".replace(" ", "-"))
def test_rbf(benchmark, case, provider):
    """Median time of one ``case.op`` call of ``provider`` (see kernelkit.bench.rbf)."""
    if provider not in _RUN and provider not in (rb.TORCH,):
        pytest.skip(_SKIPPED.get(provider, f"{provider} not selected (KERNELKIT_BENCH_BACKENDS)"))
    if (provider == rb.TORCH and case.op in ("build", "knn")) or (provider == rb.KDTREE and case.op in ("fwd", "fwd+bwd")):
        pytest.skip(f"{provider} does not do {case.op}")
    p = rb.problem(case.n, case.m, DEVICE)
    p["wgrad"] = p["weights"].clone().requires_grad_()
    grids, trees, idx = {}, {}, None
    if case.op != "build":
        idx = knn(p["x"], p["centers"], case.k)[0]
        if provider.startswith("kernelkit_"):
            be = provider.removeprefix("kernelkit_")
            grids[be] = build_grid(p["centers"], backend=be)
        if provider == rb.KDTREE:
            from pykdtree.kdtree import KDTree
            trees["tree"] = KDTree(p["centers"].numpy())
    step = rb._step(provider, case, p, idx, grids, trees)
    step()
    if DEVICE == "cuda":
        inner = step

        def step():  # wall-clock timer: wait for the kernels
            inner()
            torch.cuda.synchronize()
    benchmark.extra_info.update(family=rb.FAMILY, shape=case.label, op=case.op, device=DEVICE, provider=provider,
                                n=case.n, m=case.m, k=case.k)
    benchmark.group = f"{case.op} {case.label}"
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
