"""pytest-benchmark view of the VQ benchmark (same cases and providers as
``python -m kernelkit.bench --family vq``; see kernelkit/bench/vq.py for what is timed).

Run explicitly:  pytest bench/bench_vq.py --benchmark-only   (the main suite never collects it).
Environment knobs (read at collection time):
    KERNELKIT_BENCH_QUICK=1         4096x4096 at batch 1/16/256
    KERNELKIT_BENCH_BATCH=N         one batch size per case
    KERNELKIT_BENCH_BACKENDS=a,b    kernelkit backends to time (default: the device's native ones)
    KERNELKIT_BENCH_ROUNDS=N        timed rounds per test (default 3, after 1 warm-up round)
Device: cuda if available, else cpu.  Triton/CUDA providers are marked `cuda` and skip without a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

from kernelkit import _backend
from kernelkit.bench import vq as vb

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_ENV_BACKENDS = os.environ.get("KERNELKIT_BENCH_BACKENDS")
BACKENDS = [b for b in _ENV_BACKENDS.split(",") if b] if _ENV_BACKENDS else None
ROUNDS = int(os.environ.get("KERNELKIT_BENCH_ROUNDS", "3"))
CASES = vb.cases(DEVICE, quick=os.environ.get("KERNELKIT_BENCH_QUICK") == "1",
                 batch=int(os.environ["KERNELKIT_BENCH_BATCH"]) if os.environ.get("KERNELKIT_BENCH_BATCH") else None)
_GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
_KK = [f"kernelkit_{b}{suffix}" for b in ("cpu", "triton", "cuda", "torch") for suffix in ("", "_gemv", "_gemm")]
PROVIDERS = [pytest.param(p, marks=[pytest.mark.cuda, _GPU_ONLY] if ("triton" in p or "cuda" in p) else [])
             for p in (vb.DENSE, vb.DEQUANT, vb.AQLM, *_KK)]
_RUN, _SKIPPED = vb.providers(DEVICE, BACKENDS)


def _case_id(c: vb.Case) -> str:
    return f"{c.fmt}-{c.in_features}x{c.out_features}-b{c.batch}"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", vb.MODES, ids=lambda m: m.replace("+", "_"))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_vq(benchmark, case, mode, provider):
    """Median time of one ``mode`` step of ``provider`` on ``case`` (see kernelkit.bench.vq)."""
    if provider not in _RUN:
        pytest.skip(_SKIPPED.get(provider, f"{provider} not selected (KERNELKIT_BENCH_BACKENDS)"))
    if mode == "fwd+bwd" and case.batch != vb.BWD_BATCH:
        pytest.skip(f"fwd+bwd is measured at batch {vb.BWD_BATCH}")
    dtype = vb.dtype_for(DEVICE)
    inp = vb.make_inputs(case, dtype, DEVICE)
    try:
        step = vb.make_fn(provider, mode, inp)
        step()
    except _backend.BackendUnavailableError as e:
        pytest.skip(str(e))
    if DEVICE == "cuda":
        inner = step

        def step():  # wall-clock timer: wait for the kernels
            inner()
            torch.cuda.synchronize()
    benchmark.extra_info.update(family=vb.FAMILY, shape=case.label, op=mode, dtype=str(dtype).replace("torch.", ""),
                                device=DEVICE, provider=provider, batch=case.batch, format=case.fmt)
    benchmark.group = f"{mode} {case.label}"
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
