"""OT benchmark: kernelkit's log-domain Sinkhorn and SNS against POT's sinkhorn_log and regot's SSNS.

Problems (float64, uniform weights): random point clouds in [0,1]^2 with the squared-Euclidean cost,
n = m in SIZES, reg in REGS; and the SNS paper's random-assignment problem (C ~ U[0,1], reg = 1/1200).
Two measurements, all providers in the same run:

    solve   wall time and iterations until the L1 marginal error ||P1 - a||_1 + ||P^T1 - b||_1 is below
            TARGET (1e-8), from zero potentials, the cost matrix given (the providers all take it):
        kernelkit_sinkhorn   kernelkit.ot.solve(method="sinkhorn_log"), the L1 error of the columns checked
                             every 10 iterations (fused into the step; the rows are exact after an f update)
        kernelkit_sns        kernelkit.ot.solve(method="sns"): 20 Sinkhorn iterations, then Newton steps,
                             stopped on the L2 norm of the whole gradient <= TARGET / sqrt(n + m)
        kernelkit_sns_points the same without the cost matrix (point clouds, the cost on the fly)
        regot_ssns           regot.sinkhorn_ssns(M, a, b, reg, tol=TARGET / sqrt(n + m)) (its tol is the
                             L2 norm of the gradient: the same criterion as kernelkit_sns)       [baseline]
        pot_sinkhorn_log     ot.sinkhorn(..., method="sinkhorn_log").  Its iterates are kernelkit_sinkhorn's
                             (the same algorithm, the same order of updates; the tests check the iteration
                             counts agree), so its iterations are kernelkit_sinkhorn's count and its time is
                             that count times its per-iteration time (measured: the `iter` row) unless the
                             run is under POT_FULL_S, where POT is run to the target itself.      [baseline]
    iter    the time of one Sinkhorn iteration (both half-steps), median of a few 10-iteration runs:
            kernelkit_sinkhorn (dense cost), kernelkit_sinkhorn_points, pot_sinkhorn_log (numpy).
Rows report median_ms (solve: one run; iter: per iteration), iters, l1_err (the L1 marginal error of the
returned plan, recomputed here in float64), vs_pot / vs_regot = t_baseline / t.  Floors (`iter` rows):
the n*m exp evaluations of an iteration (2 per entry) at the exp rate measured at the start of the run
(torch.exp over 16M float64, all threads) and the bytes of C (read twice) at the copy bandwidth.
"""
from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

import kernelkit
from kernelkit.ot import Cost, solvers
from kernelkit.ot import ops as ot_ops

from . import _report, _timing
from ._report import Goal
from .monarch import environment  # same machine description

FAMILY = "ot"
SIZES = (1000, 2000, 5000)
REGS = (1e-2, 1e-3)
ASSIGNMENT = (1000, 1.0 / 1200)     # (n, reg): the SNS paper's random-assignment problem (eta = 1200)
GPU_CASES = ((10000, 1e-2), (10000, 1e-3), (100000, 1e-2))  # GPU: point clouds (no n x m matrix at 100k)
GPU_MAX_ITERS = 3000                 # GPU: iteration caps that keep the device check within its budget
TARGET = 1e-8                        # L1 marginal error
POT_FULL_S = 120.0                   # run POT to the target when its predicted time is below this
BUDGET_S = 150.0                     # wall budget of one baseline / kernelkit-Sinkhorn solve (reported as "> ...")
MAX_SINKHORN_ITERS = 100000
KK_SK, KK_SNS, KK_SNS_PTS, KK_SK_PTS = "kernelkit_sinkhorn", "kernelkit_sns", "kernelkit_sns_points", "kernelkit_sinkhorn_points"
POT, REGOT = "pot_sinkhorn_log", "regot_ssns"
BASELINES = (POT, REGOT)
GOALS = {"sns_vs_regot": 1.0, "sinkhorn_iter_vs_pot": 3.0, "sns_vs_pot_n2000_reg1e-3": 100.0}
COLUMNS = ("family", "op", "shape", "dtype", "device", "provider", "median_ms", "iters", "l1_err", "vs_pot",
           "vs_regot", "of_floor")
EXTRA = ("n", "reg", "problem", "note", "repeats")
PLOT_BASELINE = "vs_pot"
CASE_KEYS = ("op", "problem", "n", "reg")
RATIOS = {"vs_pot": POT, "vs_regot": REGOT}
BASELINE_LIBS = ("pot", "regot")
QUICK_REGS = (1e-2,)                 # quick: n = 1000 at reg 1e-2 only (no reg 1e-3, no assignment problem)
QUICK_POT_FULL_S, QUICK_BUDGET_S = 10.0, 30.0   # quick: POT extrapolated past 10 s, solves stopped at 30 s
SMOKE_CASE = ("points", 100, 0.1)    # --smoke (the CLI's tests)


@dataclass(frozen=True)
class Case:
    problem: str  # "points" or "assignment"
    n: int
    reg: float

    @property
    def label(self) -> str:
        return f"{self.problem} n={self.n} reg={self.reg:.3g}"


def cases(device: str, *, quick: bool = False, batch: int | None = None, smoke: bool = False) -> list[Case]:
    """Every SIZES x REGS point-cloud problem and the assignment problem; quick: n = 1000 at reg = 1e-2
    only; smoke: one tiny problem (the CLI's tests).
    ``batch`` (the CLI's --batch) picks one size n."""
    if smoke:
        return [Case(SMOKE_CASE[0], batch or SMOKE_CASE[1], SMOKE_CASE[2])]
    if device == "cuda":
        return [Case("points", batch, r) for r in REGS] if batch else [Case("points", n, r) for n, r in GPU_CASES]
    sizes = (batch,) if batch else ((1000,) if quick else SIZES)
    if quick:
        return [Case("points", n, r) for n in sizes for r in QUICK_REGS]
    out = [Case("points", n, r) for n in sizes for r in REGS]
    return out + [Case("assignment", ASSIGNMENT[0], ASSIGNMENT[1])]


def _pot():
    try:
        import ot  # noqa: F401
        return ot, None
    except Exception as e:  # noqa: BLE001
        return None, f"POT is not installed ({type(e).__name__}); pip install pot"


def _regot():
    try:
        import regot
        return regot, None
    except Exception as e:  # noqa: BLE001
        return None, f"regot is not installed ({type(e).__name__}); pip install regot"


def providers(device: str, backends: Iterable[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(providers to time, {provider: why skipped})."""
    if backends is not None:
        for name in backends:
            if name not in kernelkit._backend.BACKENDS:
                raise ValueError(f"unknown kernelkit backend {name!r}")
    run, skipped = [], {}
    if device == "cpu":
        for prov, (mod, why) in ((POT, _pot()), (REGOT, _regot())):
            (run.append(prov) if mod is not None else skipped.__setitem__(prov, why))
        run += [KK_SK, KK_SNS, KK_SNS_PTS]
    else:
        run += [KK_SK_PTS, KK_SNS_PTS]
    return run, skipped


def make_problem(case: Case, device: str = "cpu", seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = case.n
    if case.problem == "points":
        x = torch.rand(n, 2, generator=g, dtype=torch.float64).to(device)
        y = torch.rand(n, 2, generator=g, dtype=torch.float64).to(device)
        M = ((x[:, None] - y[None]) ** 2).sum(-1) if device == "cpu" else None
    else:
        x = y = None
        M = torch.rand(n, n, generator=g, dtype=torch.float64).to(device)
    a = torch.full((n,), 1.0 / n, dtype=torch.float64, device=device)
    return {"x": x, "y": y, "M": M, "a": a, "b": a.clone()}


def l1_error(P: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    P = P.double()
    return float((P.sum(1) - a).abs().sum() + (P.sum(0) - b).abs().sum())


def _kk_l1(cost: Cost, reg: float, f, g, a, b) -> float:
    r, c, _ = ot_ops.marginals(cost, reg, f, g)
    return float((r[0] - a).abs().sum() + (c[0] - b).abs().sum())


def _regot_child(path: str, reg: float, tol: float, q) -> None:
    """regot's SSNS on the problem saved at ``path``, timed here; (ms, iterations, L1 error) into ``q``."""
    regot, _ = _regot()
    d = np.load(path)
    Mf, an, bn = np.asfortranarray(d["M"]), d["a"], d["b"]
    t0 = time.perf_counter()
    r = regot.sinkhorn_ssns(Mf, an, bn, reg, tol=tol, max_iter=1000)
    ms = (time.perf_counter() - t0) * 1e3
    P = np.asarray(r.plan)
    q.put((ms, int(r.niter), float(np.abs(P.sum(1) - an).sum() + np.abs(P.sum(0) - bn).sum())))


def solve_once(prov: str, case: Case, pb: dict, budget_s: float = BUDGET_S) -> tuple[float, int, float, str]:
    """(milliseconds, iterations, L1 error, note) of one solve to TARGET, within ``budget_s`` seconds
    (kernelkit's Sinkhorn and regot)."""
    a, b, M, reg, n = pb["a"], pb["b"], pb["M"], case.reg, case.n
    tol_l2 = TARGET / math.sqrt(2 * n)
    if prov in (KK_SK, KK_SNS, KK_SNS_PTS, KK_SK_PTS):
        cost = Cost.points(pb["x"], pb["y"]) if prov.endswith("_points") else Cost.matrix(M)
        A, Bw = a[None], b[None]
        t0 = time.perf_counter()
        if prov in (KK_SK, KK_SK_PTS):
            cap = GPU_MAX_ITERS if a.is_cuda else MAX_SINKHORN_ITERS
            f, g = A.new_zeros(A.shape), Bw.new_zeros(Bw.shape)
            done, total, note = False, 0, ""
            while not done:  # in chunks, within the wall budget
                chunk = min(500, cap - total)
                res = solvers.sinkhorn_loop(cost, A, Bw, reg, chunk, TARGET, f, g, progress=False, err_norm=1)
                f, g = res.f, res.g
                done = bool(res.converged.all())
                total += res.niter[0] + 1 if done else chunk
                if not done and (total >= cap or time.perf_counter() - t0 > budget_s):
                    note = f"stopped after {total} iterations / {time.perf_counter() - t0:.0f} s (not converged): a lower bound"
                    break
            iters = total
        else:
            res = solvers.solve(cost, A, Bw, reg, method="sns", numItermax=60 if a.is_cuda else 500, stopThr=tol_l2,
                                progress=False)
            iters = res.n_sinkhorn + res.n_newton
            note = f"{res.n_sinkhorn} Sinkhorn + {res.n_newton} Newton, keep {res.keep[0] if res.keep else '-'}" \
                   f"->{res.keep[-1] if res.keep else '-'}"
        if pb["a"].is_cuda:
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        return ms, iters, _kk_l1(cost, reg, res.f, res.g, a, b), note
    if prov == REGOT:
        # In a fresh ("spawn") child process with a wall budget: regot's C++ solve cannot be interrupted from
        # Python, and a forked child hung (OpenMP / torch thread pools do not survive a fork).
        import multiprocessing as mp
        import tempfile
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "problem.npz")
            np.savez(path, M=M.cpu().numpy(), a=a.cpu().numpy(), b=b.cpu().numpy())
            proc = ctx.Process(target=_regot_child, args=(path, reg, tol_l2, q))
            proc.start()
            try:
                ms, it, err = q.get(timeout=budget_s + 60)
                proc.join()
                return ms, it, err, ""
            except Exception:  # noqa: BLE001 - the budget ran out
                proc.kill()
                proc.join()
                return budget_s * 1e3, None, None, f"stopped after {budget_s:.0f} s (not converged): a lower bound"
    if prov == POT:
        ot, _ = _pot()
        Mn, an, bn = M.cpu().numpy(), a.cpu().numpy(), b.cpu().numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            P, log = ot.sinkhorn(an, bn, Mn, reg, method="sinkhorn_log", numItermax=MAX_SINKHORN_ITERS,
                                 stopThr=TARGET / math.sqrt(n), log=True)
            ms = (time.perf_counter() - t0) * 1e3
        return ms, int(log["niter"]) + 1, l1_error(torch.from_numpy(P), a.cpu(), b.cpu()), "run to L2 <= target/sqrt(n)"
    raise ValueError(f"unknown provider {prov!r}")


def iteration_fns(case: Case, pb: dict, provs: list[str]) -> dict[str, Callable[[], object]]:
    """10 Sinkhorn iterations per call, per provider (from near-converged potentials, as mid-solve)."""
    fns: dict[str, Callable[[], object]] = {}
    a, b, M, reg = pb["a"], pb["b"], pb["M"], case.reg
    A, Bw = a[None], b[None]
    if KK_SK in provs or KK_SNS in provs:
        cost = Cost.matrix(M)

        def kk():
            return solvers.sinkhorn_loop(cost, A, Bw, reg, 10, 0.0, A.new_zeros(A.shape), Bw.new_zeros(Bw.shape),
                                         progress=False)
        fns[KK_SK] = kk
    if pb["x"] is not None:
        pcost = Cost.points(pb["x"], pb["y"])

        def kkp():
            return solvers.sinkhorn_loop(pcost, A, Bw, reg, 10, 0.0, A.new_zeros(A.shape), Bw.new_zeros(Bw.shape),
                                         progress=False)
        fns[KK_SK_PTS] = kkp
    if POT in provs:
        ot, _ = _pot()
        Mn, an, bn = M.cpu().numpy(), a.cpu().numpy(), b.cpu().numpy()

        def pot():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return ot.sinkhorn(an, bn, Mn, reg, method="sinkhorn_log", numItermax=10, stopThr=0.0)
        fns[POT] = pot
    return fns


def floors(device: str) -> dict:
    """exp rate (torch.exp over 16M float64, all threads) and copy bandwidth (256 MB), this run."""
    t = torch.rand(1 << 24, dtype=torch.float64, device=device) * -50
    o = torch.empty_like(t)
    big = torch.empty(1 << 25, dtype=torch.float64, device=device)
    big2 = torch.empty_like(big)
    torch.exp(t, out=o)
    big2.copy_(big)
    ms = _timing.median_ms({"exp": lambda: torch.exp(t, out=o), "copy": lambda: big2.copy_(big)}, device, repeats=5)
    return {"exp_per_s": t.numel() / (ms["exp"] / 1e3), "copy_gbs": 2 * big.numel() * 8 / (ms["copy"] / 1e3) / 1e9}


def run(device: str, *, quick: bool = False, batch: int | None = None, repeats: int = 3, warmup: int = 1,
        backends: Iterable[str] | None = None, on_group: Callable[[list[dict]], None] | None = None,
        skipped: dict | None = None, smoke: bool = False) -> list[dict]:
    """Every case on ``device``: per-iteration times, then the solves.  quick / smoke: POT is
    extrapolated past QUICK_POT_FULL_S and the solves stop at QUICK_BUDGET_S; smoke: no floors."""
    provs, why = providers(device, backends)
    if skipped is not None:
        skipped.update(why)
    if smoke:  # regot runs in a spawned process (seconds to start): not in the smoke run
        provs = [p for p in provs if p != REGOT]
    pot_full_s, budget_s = (QUICK_POT_FULL_S, QUICK_BUDGET_S) if (quick or smoke) else (POT_FULL_S, BUDGET_S)
    fl = None if smoke else floors(device)
    if fl is not None:
        print(f"  floors: exp {fl['exp_per_s'] / 1e9:.2f} G/s (float64, all threads), copy {fl['copy_gbs']:.1f} GB/s",
              file=sys.stderr, flush=True)
    rows: list[dict] = []
    for case in cases(device, quick=quick, batch=batch, smoke=smoke):
        pb = make_problem(case, device)
        n = case.n
        base = {"family": FAMILY, "shape": case.label, "dtype": "float64", "device": device, "n": n,
                "reg": case.reg, "problem": case.problem}
        # -- per-iteration time (10 iterations per call, interleaved)
        fns = iteration_fns(case, pb, provs)
        for fn in fns.values():
            _timing.warm(fn, warmup)
        it_ms = {p: t / 10 for p, t in _timing.median_ms(fns, device, repeats=repeats).items()}
        floor_ms = max(2 * n * n / fl["exp_per_s"], (2 * n * n * 8 if pb["M"] is not None else 0)
                       / (fl["copy_gbs"] * 1e9)) * 1e3 if fl else None
        for p, t in it_ms.items():
            rows.append({**base, "op": "iter", "provider": p, "median_ms": t, "iters": 1, "l1_err": None,
                         "vs_pot": it_ms[POT] / t if POT in it_ms else None, "vs_regot": None,
                         "of_floor": floor_ms / t if floor_ms else None, "note": "", "repeats": repeats})
        # -- solves to the target
        solve: dict[str, tuple] = {}
        for p in provs:
            if p == POT:
                continue
            if p in (KK_SNS, KK_SK) and pb["M"] is None:
                continue
            if p.endswith("_points") and pb["x"] is None:
                continue
            try:
                solve[p] = solve_once(p, case, pb, budget_s)
            except (RuntimeError, MemoryError) as e:
                if skipped is not None:
                    skipped[f"{p} {case.label}"] = str(e).splitlines()[0]
        if POT in provs:
            sk_iters = solve.get(KK_SK, (None, None))[1]
            if sk_iters and "lower bound" in solve[KK_SK][3]:
                sk_iters = None  # no count to extrapolate from
            pred = it_ms[POT] * sk_iters if sk_iters else None
            if pred is None and KK_SK in solve:
                solve[POT] = (None, None, None, "not run: kernelkit_sinkhorn did not converge within its budget, so "
                              "POT (the same iterates, ~15-20x slower per iteration) would not either")
            elif pred is not None and pred / 1e3 > pot_full_s:
                solve[POT] = (pred, sk_iters, None, f"extrapolated: {sk_iters} iterations (kernelkit_sinkhorn's, the "
                              f"same iterates) x {it_ms[POT]:.1f} ms per iteration")
            else:
                solve[POT] = solve_once(POT, case, pb, budget_s)
        for p, (ms, iters, err, note) in solve.items():
            if ms is None:
                rows.append({**base, "op": "solve", "provider": p, "median_ms": None, "iters": None, "l1_err": None,
                             "vs_pot": None, "vs_regot": None, "of_floor": None, "note": note, "repeats": 0})
                continue
            rows.append({**base, "op": "solve", "provider": p, "median_ms": ms, "iters": iters, "l1_err": err,
                         "vs_pot": solve[POT][0] / ms if POT in solve and solve[POT][0] else None,
                         "vs_regot": solve[REGOT][0] / ms if REGOT in solve else None,
                         "of_floor": None, "note": note, "repeats": 1})
        del pb
        if on_group is not None:
            on_group(rows)
    return rows


def _goal(rows, title, key, goal):
    if not rows:
        return [title, "    not measured"]
    ok = [r[key] is not None and r[key] >= goal for r in rows]
    lines = [f"    {r['op']:<6} {r['shape']:<32} {r['provider']:<22} "
             f"{(format(r[key], '8.2f') + 'x') if r[key] is not None else '     n/a'}  {'MET' if o else 'NOT MET'}"
             + (f"  ({r['note']})" if r.get("note") else "") for r, o in zip(rows, ok)]
    return [title] + lines + [f"  => {'MET' if all(ok) else 'NOT MET'} ({sum(ok)}/{len(ok)})"]


def goals(rows: list[dict], device: str) -> list[Goal]:
    """The issue's speed goals (CPU; none on the GPU) with the rows each applies to."""
    if device != "cpu":
        return []
    sns = [r for r in rows if r["op"] == "solve" and r["provider"] == KK_SNS and r["median_ms"] is not None
           and any(q["op"] == "solve" and q["provider"] == REGOT and q["shape"] == r["shape"] for q in rows)]
    key = [r for r in rows if r["op"] == "solve" and r["provider"] == KK_SNS and r["n"] == 2000
           and r["problem"] == "points" and abs(r["reg"] - 1e-3) < 1e-12 and r["vs_pot"] is not None]
    it = [r for r in rows if r["op"] == "iter" and r["provider"] == KK_SK and r["vs_pot"] is not None]
    return [Goal("Goal (CPU): SNS no slower than regot's SSNS on every case", "vs_regot", GOALS["sns_vs_regot"], sns),
            Goal("Goal (CPU): SNS >= 100x faster than POT sinkhorn_log at n=2000, reg=1e-3", "vs_pot",
                 GOALS["sns_vs_pot_n2000_reg1e-3"], key),
            Goal("Goal (CPU): Sinkhorn >= 3x faster per iteration than POT sinkhorn_log", "vs_pot",
                 GOALS["sinkhorn_iter_vs_pot"], it)]


def goal_report(rows: list[dict], device: str) -> list[str]:
    """The issue's goals, checked on ``rows``."""
    return _report.goal_report(goals, notes, _goal, rows, device)


def notes(rows: list[dict], device: str) -> list[str]:
    """What the table does not show: the solves' iteration counts and L1 errors, budgets that ran out."""
    out = []
    if device != "cpu":
        pts = [r for r in rows if r["op"] == "solve" and r["median_ms"] is not None]
        out.append("GPU: point clouds without a cost matrix: " + ", ".join(
            f"{r['provider']} {r['shape']}: {r['median_ms']:.0f} ms, {r['iters']} it, L1 {r['l1_err']:.1e}"
            for r in pts))
        return out
    solved = [r for r in rows if r["op"] == "solve" and r["median_ms"] is not None and r["iters"] is not None]
    if solved:
        out.append("solves (iterations, L1 marginal error): " + "; ".join(
            f"{r['provider']} {r['shape']}: {r['iters']} it"
            + (f", {r['l1_err']:.1e}" if r["l1_err"] is not None else "") for r in solved))
    bad = [r for r in rows if r["op"] == "solve" and r["l1_err"] is not None and r["l1_err"] > 10 * TARGET]
    for r in rows:
        if r["op"] == "solve" and "lower bound" in (r.get("note") or ""):
            out.append(f"note: {r['provider']} {r['shape']}: {r['note']}")
    for r in bad:
        out.append(f"note: {r['provider']} {r['shape']} stopped at L1 error {r['l1_err']:.1e} (> 10x the target)")
    return out


__all__ = ["FAMILY", "cases", "providers", "make_problem", "solve_once", "iteration_fns", "run", "goal_report",
           "environment", "COLUMNS"]
