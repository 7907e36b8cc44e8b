"""pytest-benchmark view of the OT benchmark (same cases and providers as
``python -m kernelkit.bench --family ot``; see kernelkit/bench/ot.py for what is timed).

Run explicitly:  pytest bench/bench_ot.py --benchmark-only   (the main suite never collects it).
Each test times one whole solve to the L1 marginal error 1e-8 (op "solve") or one 10-iteration
Sinkhorn run (op "iter10") of a provider; POT's full solves are slow (minutes at n >= 2000, reg 1e-3):
they run only with KERNELKIT_BENCH_POT_SOLVE=1 (its per-iteration time is always measured).
Environment knobs (read at collection time):
    KERNELKIT_BENCH_QUICK=1         n = 1000 only
    KERNELKIT_BENCH_BATCH=N         one problem size n
    KERNELKIT_BENCH_ROUNDS=N        timed rounds per test (default 1 for solves, 3 for iter10)
Device: cuda if available, else cpu.
"""
from __future__ import annotations

import os

import pytest
import torch

from kernelkit.bench import ot as ob

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROUNDS = os.environ.get("KERNELKIT_BENCH_ROUNDS")
CASES = ob.cases(DEVICE, quick=os.environ.get("KERNELKIT_BENCH_QUICK") == "1",
                 batch=int(os.environ["KERNELKIT_BENCH_BATCH"]) if os.environ.get("KERNELKIT_BENCH_BATCH") else None)
_RUN, _SKIPPED = ob.providers(DEVICE)
SOLVERS = [ob.KK_SK, ob.KK_SNS, ob.KK_SNS_PTS, ob.REGOT, ob.POT, ob.KK_SK_PTS]
ITERS = [ob.KK_SK, ob.KK_SK_PTS, ob.POT]


def _case_id(c: ob.Case) -> str:
    return f"{c.problem}-n{c.n}-reg{c.reg:.3g}"


def _setup(benchmark, case, provider, op):
    benchmark.extra_info.update(family=ob.FAMILY, shape=case.label, op=op, dtype="float64", device=DEVICE,
                                provider=provider, n=case.n, reg=case.reg)
    benchmark.group = f"{op} {case.label}"


@pytest.mark.parametrize("provider", SOLVERS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_ot_solve(benchmark, case, provider):
    """Wall time of one solve to the target (iterations and the reached error in extra_info)."""
    if provider not in _RUN and provider != ob.KK_SK_PTS:
        pytest.skip(_SKIPPED.get(provider, f"{provider} does not run on {DEVICE}"))
    if provider == ob.POT and os.environ.get("KERNELKIT_BENCH_POT_SOLVE") != "1":
        pytest.skip("POT's full solve takes minutes: set KERNELKIT_BENCH_POT_SOLVE=1 (its iter10 is measured)")
    pb = ob.make_problem(case, DEVICE)
    if pb["M"] is None and provider in (ob.KK_SK, ob.KK_SNS, ob.REGOT, ob.POT):
        pytest.skip("no cost matrix for this case (point clouds only)")
    if pb["x"] is None and provider.endswith("_points"):
        pytest.skip("the assignment problem has no point clouds")
    out = {}

    def step():
        out["r"] = ob.solve_once(provider, case, pb)
    _setup(benchmark, case, provider, "solve")
    benchmark.pedantic(step, rounds=int(ROUNDS or 1), warmup_rounds=0, iterations=1)
    ms, iters, err, note = out["r"]
    benchmark.extra_info.update(iters=iters, l1_err=err, note=note)


@pytest.mark.parametrize("provider", ITERS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_ot_iter10(benchmark, case, provider):
    """Ten Sinkhorn iterations (both half-steps each) of a provider."""
    pb = ob.make_problem(case, DEVICE)
    fns = ob.iteration_fns(case, pb, _RUN)
    if provider not in fns:
        pytest.skip(_SKIPPED.get(provider, f"{provider} does not run on this case / device"))
    fn = fns[provider]
    if DEVICE == "cuda":
        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()
    _setup(benchmark, case, provider, "iter10")
    benchmark.pedantic(fn, rounds=int(ROUNDS or 3), warmup_rounds=1, iterations=1)
