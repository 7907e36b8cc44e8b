"""RBF benchmark: kernelkit's neighbour search and fused field evaluation against pykdtree (the search
NeuRBF uses) and the pure-torch NeuRBF-style evaluation, same run.

Problem (NeuRBF's image setting): M RBF centres uniform in [0, 1]^2, numbered in Morton order
(`kernelkit.rbf.spatial_order`, as RBFField's initialisation leaves them: the k neighbours' feature rows
are then close in memory; both providers get the same numbering), with anisotropic inverse covariances
at the centres' spacing ("ivq", full 2 x 2 shapes), C = 32 feature channels with NeuRBF's log-spaced
frequencies in [2^-3, 2^12], N query points uniform in [0, 1]^2, k neighbours, float32.
What is measured, per case (N, M, k):
    knn      the k nearest centres of the N queries, the search structure built beforehand (the centres
             are frozen in NeuRBF):
        kernelkit_<be>   kernelkit.rbf.knn(x, centers, k, grid=...) (the uniform-grid search)
        pykdtree         pykdtree.kdtree.KDTree(centers).query(x, k) (numpy float32; OpenMP)  [baseline]
    build    the search structure alone: kernelkit.rbf.build_grid vs pykdtree's KDTree(centers)
    fwd      the features given the neighbour indices (NeuRBF precomputes them per training point):
        kernelkit_<be>   kernelkit.rbf.rbf_features(..., idx=idx, check_values=False) (the shapes' checks --
                         a Cholesky of every shape, ~1 ms at M = 1e4, ~12 ms at M = 1e5 -- run once in
                         RBFField with frozen geometry, not per call)
        torch_neurbf     reference.features_reference: gather, kernel, normalize, sin, weighted sum in
                         torch ops, as NeuRBF's rbf.forward does, in chunks of CHUNK points (its (N, k, C)
                         temporaries would need gigabytes at N = 2^20)                               [baseline]
    fwd+bwd  the same plus the gradient to the weights (NeuRBF trains only the features: the geometry is
             frozen)
Each row: median ms, mpts_s (million query points per second), vs_torch = t(torch_neurbf) / t,
vs_pykdtree likewise, of_floor: the time of the N*k*C sines at the rate torch.sin reaches on 16M float32
(all threads, measured at the start of the run) over t -- the evaluation is bound by its transcendentals
(the gathered rows stay in cache at these M) -- for fwd, and err (the relative difference to torch_neurbf's
output on the first chunk).
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

import kernelkit
from kernelkit import _backend
from kernelkit.rbf import build_grid, knn, rbf_features
from kernelkit.rbf import reference as R

from . import _report, _timing
from ._report import Goal
from .mfac import _goal  # the goal lines' format
from .monarch import environment  # same machine description
from .sparse import floors  # a dense fp32 GEMM and a 256 MB copy

FAMILY = "rbf"
C = 32
CHUNK = 1 << 16
CPU_CASES = tuple((n, m, k) for n in (1 << 16, 1 << 20) for m in (10_000, 100_000) for k in (4, 8))
GPU_CASES = tuple((n, m, k) for n in (1 << 16, 1 << 18, 1 << 20) for m in (10_000, 100_000) for k in (4, 8))
QUICK_CASES = ((1 << 16, 10_000, 4), (1 << 16, 10_000, 8))
OPS = ("build", "knn", "fwd", "fwd+bwd")
TORCH, KDTREE = "torch_neurbf", "pykdtree"
DEFAULT_BACKENDS = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}
GOALS = {"cpu_vs_torch": 5.0, "cpu_knn_vs_pykdtree": 2.0, "gpu_vs_torch": 10.0}
COLUMNS = ("family", "op", "shape", "dtype", "device", "provider", "median_ms", "mpts_s", "vs_torch",
           "vs_pykdtree", "of_floor")
PLOT_BASELINE = "vs_torch"
EXTRA = ("n", "m", "k", "repeats", "err")
CASE_KEYS = ("op", "n", "m", "k")
RATIOS = {"vs_torch": TORCH, "vs_pykdtree": KDTREE}
BASELINE_LIBS = ("pykdtree",)
SMOKE_CASES = ((1 << 12, 500, 4),)   # --smoke (the CLI's tests)


@dataclass(frozen=True)
class Case:
    n: int
    m: int
    k: int
    op: str

    @property
    def label(self) -> str:
        return f"N=2^{int(math.log2(self.n))} M={self.m:.0e} k={self.k}".replace("e+0", "e")


def cases(device: str, *, quick: bool = False, batch: int | None = None, smoke: bool = False) -> list[Case]:
    """``batch`` picks one N (the CLI's --batch).  quick: QUICK_CASES; smoke: tiny (the CLI's tests)."""
    sizes = SMOKE_CASES if smoke else QUICK_CASES if quick else (GPU_CASES if device == "cuda" else CPU_CASES)
    if batch is not None:
        sizes = tuple(sorted({(batch, m, k) for _, m, k in sizes}))
    out = []
    for m in sorted({m for _, m, _ in sizes}):
        out.append(Case(max(n for n, mm, _ in sizes if mm == m), m, 0, "build"))
    for n, m, k in sizes:
        out += [Case(n, m, k, op) for op in ("knn", "fwd", "fwd+bwd")]
    return out


def _have_pykdtree() -> str | None:
    try:
        import pykdtree.kdtree  # noqa: F401
    except ImportError:
        return "pykdtree is not installed (pip install pykdtree)"
    return None


def providers(device: str, backends: Iterable[str] | None = None) -> tuple[list[str], dict[str, str]]:
    avail = kernelkit.backends(device)
    run, skipped = [TORCH], {}
    if device == "cpu":
        why = _have_pykdtree()
        if why:
            skipped[KDTREE] = why
        else:
            run.append(KDTREE)
    for name in (DEFAULT_BACKENDS[device] if backends is None else backends):
        if name not in _backend.BACKENDS:
            raise ValueError(f"unknown kernelkit backend {name!r} (choose from {', '.join(_backend.BACKENDS)})")
        if avail[name] == "available":
            run.append(f"kernelkit_{name}")
        else:
            skipped[f"kernelkit_{name}"] = avail[name]
    return run, skipped


def problem(n: int, m: int, device: str, dim: int = 2, seed: int = 0) -> dict:
    """Centres, full inverse covariances at the centres' spacing (random anisotropy and orientation),
    weights (M, C), NeuRBF's frequencies and queries, float32 on ``device``."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(m, dim, generator=g)
    centers = centers[R.spatial_order(centers)].contiguous()   # as RBFField's init leaves them
    spacing = m ** (-1.0 / dim)
    L = torch.randn(m, dim, dim, generator=g) * 0.5 + torch.eye(dim) * 1.5
    A = (L @ L.transpose(1, 2)) / (spacing ** 2 * 4)
    weights = torch.randn(m, C, generator=g) * 0.1
    x = torch.rand(n, dim, generator=g)
    return {"x": x.to(device), "centers": centers.to(device), "shapes": A.to(device), "weights": weights.to(device),
            "omegas": R.log_omegas(C).to(device)}


def torch_neurbf(p: dict, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """NeuRBF's evaluation in torch ops, CHUNK points at a time."""
    outs = [R.features_reference(p["x"][s:s + CHUNK], p["centers"], p["shapes"], weights, p["omegas"],
                                 idx[s:s + CHUNK], "ivq", R.NORM_DETACHED) for s in range(0, idx.shape[0], CHUNK)]
    return torch.cat(outs) if outs else weights.new_zeros(0, C)


def sin_rate(device: str) -> float:
    """float32 sines per second of torch.sin over 16M elements (all threads)."""
    a = torch.rand(1 << 24, device=device) * 100
    out = torch.empty_like(a)
    fn = lambda: torch.sin(a, out=out)  # noqa: E731
    _timing.warm(fn, 1)
    return a.numel() / (_timing.median_ms({"sin": fn}, device, repeats=5)["sin"] * 1e-3)


def _step(prov: str, case: Case, p: dict, idx: torch.Tensor, grids: dict, trees: dict) -> Callable[[], object]:
    be = prov.removeprefix("kernelkit_") if prov.startswith("kernelkit_") else None
    if case.op == "build":
        if prov == KDTREE:
            from pykdtree.kdtree import KDTree
            c_np = p["centers"].numpy()
            return lambda: KDTree(c_np)
        return lambda: build_grid(p["centers"], backend=be)
    if case.op == "knn":
        if prov == KDTREE:
            x_np, tree = p["x"].numpy(), trees["tree"]
            return lambda: tree.query(x_np, k=case.k)
        grid = grids[be]
        return lambda: knn(p["x"], p["centers"], case.k, grid=grid, backend=be)
    w = p["wgrad"] if case.op == "fwd+bwd" else p["weights"]
    if prov == TORCH:
        fwd = lambda: torch_neurbf(p, idx, w)  # noqa: E731
    else:
        fwd = lambda: rbf_features(p["x"], p["centers"], p["shapes"], w, p["omegas"], idx=idx,  # noqa: E731
                                   check_values=False, backend=be)
    if case.op == "fwd":
        return _timing.mode_step("fwd", fwd, None, None)
    g = torch.ones(case.n, C, device=p["x"].device) * 1e-3
    return _timing.mode_step("fwd+bwd", fwd, (w,), g)


def measure(case: Case, device: str, provs: list[str], *, repeats: int, warmup: int,
            skipped: dict | None = None, floor: dict | None = None, _cache: dict = {}) -> list[dict]:
    key = (case.n, case.m, device)
    if _cache.get("key") != key:
        _cache.clear()
        _cache["key"] = key
        _cache["p"] = problem(case.n, case.m, device)
    p = _cache["p"]
    p["wgrad"] = p["weights"].clone().requires_grad_()
    if case.op == "build":
        run = [q for q in provs if q != TORCH]
    elif case.op == "knn":
        run = [q for q in provs if q != TORCH]
    else:
        run = [q for q in provs if q != KDTREE]
    grids, trees, idx = {}, {}, None
    if case.op != "build":
        with torch.no_grad():
            idx = knn(p["x"], p["centers"], case.k)[0] if case.op != "knn" else None
        for q in run:
            if q.startswith("kernelkit_"):
                grids[q.removeprefix("kernelkit_")] = build_grid(p["centers"], backend=q.removeprefix("kernelkit_"))
        if KDTREE in run:
            from pykdtree.kdtree import KDTree
            trees["tree"] = KDTree(p["centers"].numpy())
    fns = {q: _step(q, case, p, idx, grids, trees) for q in run}
    errs: dict = {}
    if case.op == "fwd" and TORCH in run:
        with torch.no_grad():
            sub = {kk: (v[:4096] if kk == "x" else v) for kk, v in p.items()}
            ref = torch_neurbf(sub, idx[:4096], p["weights"]).double()
            for q in run:
                if q.startswith("kernelkit_"):
                    out = rbf_features(sub["x"], p["centers"], p["shapes"], p["weights"], p["omegas"], idx=idx[:4096],
                                       backend=q.removeprefix("kernelkit_")).double()
                    errs[q] = float((out - ref).norm() / ref.norm())
    for fn in fns.values():
        _timing.warm(fn, warmup)
    reps = repeats if case.n <= (1 << 18) or device == "cuda" else max(1, min(repeats, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = _timing.median_ms(fns, device, repeats=reps)
    sin_s = (floor or {}).get("sin_rate")
    rows = []
    for prov, t in times.items():
        sin_floor_ms = case.n * case.k * C / sin_s * 1e3 if (sin_s and case.op == "fwd") else None
        rows.append({
            "family": FAMILY, "op": case.op, "shape": case.label if case.op != "build" else f"M={case.m:.0e}".replace("e+0", "e"),
            "dtype": "float32", "device": device, "provider": prov, "median_ms": t,
            "mpts_s": (case.n / t / 1e3) if case.op != "build" else None,
            "vs_torch": times[TORCH] / t if TORCH in times else None,
            "vs_pykdtree": times[KDTREE] / t if KDTREE in times else None,
            "of_floor": sin_floor_ms / t if sin_floor_ms else None,
            "n": case.n, "m": case.m, "k": case.k if case.op != "build" else None, "repeats": reps,
            "err": errs.get(prov),
        })
    return rows


def run(device: str, *, quick: bool = False, batch: int | None = None, repeats: int = 5, warmup: int = 1,
        backends: Iterable[str] | None = None, on_group: Callable[[list[dict]], None] | None = None,
        skipped: dict | None = None, smoke: bool = False) -> list[dict]:
    """Every case on ``device``; smoke: tiny cases and no floors (of_floor empty)."""
    provs, why = providers(device, backends)
    if skipped is not None:
        skipped.update(why)
    floor = None
    if not smoke:
        f = floors(device, torch.float32)
        s = sin_rate(device)
        floor = {"sin_rate": s, **f}
        print(f"  floors (float32): dense GEMM {f['gemm_gflops']:.1f} GFLOP/s, copy {f['copy_gbs']:.1f} GB/s "
              f"(256 MB, read + write), torch.sin {s / 1e9:.2f} G/s (16M)", file=sys.stderr, flush=True)
    rows: list[dict] = []
    for case in cases(device, quick=quick, batch=batch, smoke=smoke):
        t0 = time.perf_counter()
        rows += measure(case, device, provs, repeats=repeats, warmup=warmup, skipped=skipped, floor=floor)
        if on_group is not None:
            on_group(rows)
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"    ({case.op} {case.label}: {time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    return rows


def goals(rows: list[dict], device: str) -> list[Goal]:
    """The issue's speed goals on ``device`` with the rows each applies to."""
    if device == "cpu":
        k = [r for r in rows if r["provider"] == "kernelkit_cpu" and r["op"] in ("fwd", "fwd+bwd") and r["vs_torch"]]
        s = [r for r in rows if r["provider"] == "kernelkit_cpu" and r["op"] == "knn" and r["vs_pykdtree"]]
        return [Goal(f"Goal 1 (CPU): >= {GOALS['cpu_vs_torch']}x the points/s of the torch (NeuRBF-style) "
                     "reference, forward and forward+backward", "vs_torch", GOALS["cpu_vs_torch"], k),
                Goal(f"Goal 2 (CPU): the search >= {GOALS['cpu_knn_vs_pykdtree']}x faster than pykdtree",
                     "vs_pykdtree", GOALS["cpu_knn_vs_pykdtree"], s)]
    return [Goal(f"Goal (GPU, {be}): >= {GOALS['gpu_vs_torch']}x the torch reference", "vs_torch", GOALS["gpu_vs_torch"],
                 [r for r in rows if r["provider"] == f"kernelkit_{be}" and r["op"] in ("fwd", "fwd+bwd")
                  and r["vs_torch"]]) for be in ("triton", "cuda")]


def goal_report(rows: list[dict], device: str) -> list[str]:
    """The issue's goals, checked on ``rows``."""
    return _report.goal_report(goals, notes, _goal, rows, device)


def notes(rows: list[dict], device: str) -> list[str]:
    """What the table does not show: the agreement with torch_neurbf."""
    out = []
    errs = [r for r in rows if r.get("err") is not None]
    if errs:
        out.append("agreement with torch_neurbf (relative, first 4096 points): "
                   + ", ".join(f"{r['provider']} {r['shape']} {r['err']:.1e}" for r in errs))
    return out


__all__ = ["FAMILY", "cases", "providers", "measure", "run", "goal_report", "environment", "problem",
           "torch_neurbf"]
