"""Sparse benchmark: kernelkit.sparse.sparse_linear against dense F.linear and torch's CSR/BSR SpMM.

What is measured, per case (weight W out x in with an unstructured random mask at sparsity s,
batch rows of x, float32 on CPU; float32 and bfloat16 on GPU):
    fwd      y = f(x)                                   under torch.no_grad()
    fwd+bwd  y = f(x); torch.autograd.grad(y, (x, weight), g)   with a fixed random upstream g
Providers (all timed in the same run, interleaved, on the same inputs and mask):
    dense_F.linear      F.linear(x, W_masked): the dense weight with zeros, what Sparse-IFT's
                        published code computes                                         [baseline]
    torch_sparse_csr    torch.sparse.mm(W_csr, x^T)^T, W as a torch CSR tensor (MKL / cuSPARSE);
                        its backward gives the CSR weight's gradient                    [baseline]
    torch_sparse_bsr    the same with 32x32 blocks, forward only (torch has no BSR backward), on
                        the separate block-structured cases only (at 90% unstructured sparsity no
                        32x32 block is empty)                                          [baseline]
    kernelkit_<name>    sparse_linear(..., backend=name, min_sparsity=0): the sparse kernels always
    kernelkit_<name>_auto   the same with the default min_sparsity: the dense path below the
                        backend's break-even sparsity (kernelkit.sparse.BREAK_EVEN_SPARSITY)
A provider much slower than the fastest on a case (SLOW_FACTOR, SLOW_MS: torch's CSR at 50-75%) is timed
by its first call only (repeats = 1 in its row) to keep the run under ~15 minutes on a 2-core CPU.
Each row has the median time and vs_dense = t_dense / t, vs_csr = t_csr / t (> 1 = faster), the
useful rate gflops = (the FLOPs of the nonzeros: 2·nnz·batch forward, 3x that forward+backward) / t,
and of_floor = floor / t, the fraction of the floor reached: floor = max(FLOPs / the sgemm rate,
compulsory bytes / the copy bandwidth), both measured at the start of the same run (floors()).
The break-even summary interpolates, per shape and mode, the sparsity where kernelkit_<name> and
dense take the same time (log-linear in time between the measured sparsities).
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

import kernelkit
from kernelkit import _backend
from kernelkit.sparse import SparseLayout, mask_from_scores, sparse_linear

from . import _report, _timing
from ._report import Goal
from .monarch import environment  # same machine description

FAMILY = "sparse"
SHAPES = ((4096, 4096), (1024, 4096), (4096, 1024))        # W (out, in)
SPARSITIES = (0.5, 0.75, 0.8, 0.9, 0.95, 0.99)             # 0.8: to locate the break-even
BLOCK_CASES = ((4096, 4096, 0.9),)                          # block-structured (32x32) masks, for BSR
BLOCK = 32
MODES = ("fwd", "fwd+bwd")
BATCH, QUICK_BATCH = 2048, 256
DENSE, CSR, BSR = "dense_F.linear", "torch_sparse_csr", "torch_sparse_bsr"
BASELINES = (DENSE, CSR)
DEFAULT_BACKENDS = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}
GOALS = {"cpu_fwd_vs_dense": 3.0, "cpu_fwd_vs_csr": 2.0, "cpu_fwdbwd_vs_dense": 2.5, "auto_vs_dense": 0.95,
         "gpu_vs_dense": 1.0}
GOAL_SPARSITY = 0.9
SLOW_FACTOR, SLOW_MS = 8.0, 2000.0   # see measure(): such providers are timed once
COLUMNS = ("family", "op", "shape", "dtype", "device", "provider", "median_ms", "vs_dense", "vs_csr", "gflops",
           "of_floor")
PLOT_BASELINE = "vs_dense"
EXTRA = ("batch", "out_features", "in_features", "sparsity", "blocked", "repeats")
CASE_KEYS = ("op", "dtype", "batch", "out_features", "in_features", "sparsity", "blocked")
RATIOS = {"vs_dense": DENSE, "vs_csr": CSR}
BASELINE_LIBS = ()
SMOKE_CASES = ((128, 256, 0.5), (128, 256, 0.9))   # --smoke (the CLI's tests): batch 16
_FLOORS: dict = {}   # floors() of this process: one measurement per (device, dtype) for all families


@dataclass(frozen=True)
class Case:
    """x (batch, in) -> (batch, out) through W (out, in) at ``sparsity``; ``blocked``: the mask is
    made of whole 32x32 blocks (the BSR case)."""
    out_features: int
    in_features: int
    sparsity: float
    batch: int
    blocked: bool = False

    @property
    def label(self) -> str:
        kind = " bsr32" if self.blocked else ""
        return f"{self.batch}x{self.in_features}->{self.out_features} s{round(100 * self.sparsity)}{kind}"


def cases(device: str, *, quick: bool = False, batch: int | None = None, smoke: bool = False) -> list[Case]:
    """Every SHAPES x SPARSITIES at ``batch`` (default 2048), then the block-structured cases.
    quick: batch 256, the 1024x4096 shape at 50/90/99%.  smoke: tiny (the CLI's tests)."""
    if smoke:
        return [Case(o, i, s, batch or 16) for o, i, s in SMOKE_CASES]
    if quick:
        b = batch or QUICK_BATCH
        return [Case(1024, 4096, s, b) for s in (0.5, 0.9, 0.99)]
    b = batch or BATCH
    out = [Case(o, i, s, b) for o, i in SHAPES for s in SPARSITIES]
    return out + [Case(o, i, s, b, blocked=True) for o, i, s in BLOCK_CASES]


def dtypes(device: str) -> tuple[torch.dtype, ...]:
    return (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,)


def providers(device: str, backends: Iterable[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(providers to time, {provider: why skipped}) for ``device``; backends None = the defaults."""
    avail = kernelkit.backends(device)
    run, skipped = [DENSE, CSR, BSR], {}
    for name in (DEFAULT_BACKENDS[device] if backends is None else backends):
        if name not in _backend.BACKENDS:
            raise ValueError(f"unknown kernelkit backend {name!r} (choose from {', '.join(_backend.BACKENDS)})")
        if avail[name] == "available":
            run += [f"kernelkit_{name}", f"kernelkit_{name}_auto"]
        else:
            skipped[f"kernelkit_{name}"] = avail[name]
    return run, skipped


def floors(device: str, dtype: torch.dtype = torch.float32, repeats: int = 5) -> dict:
    """This machine's ceilings, measured now: dense GEMM rate (GFLOP/s, F.linear at batch 2048 x 4096 ->
    4096 in ``dtype``) and copy bandwidth (GB/s read + write, a 256 MB tensor copy).  Measured once per
    process and (device, dtype): the families of one CLI run share it."""
    key = (device, str(dtype), repeats)
    if key not in _FLOORS:
        _FLOORS[key] = _measure_floors(device, dtype, repeats)
    return dict(_FLOORS[key])


def _measure_floors(device: str, dtype: torch.dtype, repeats: int) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(2048, 4096, generator=g, device=device).to(dtype)
    w = torch.rand(4096, 4096, generator=g, device=device).to(dtype)
    src = torch.empty(64 * 2**20, device=device)
    dst = torch.empty_like(src)
    fns = {"gemm": lambda: F.linear(x, w), "copy": lambda: dst.copy_(src)}
    for fn in fns.values():
        _timing.warm(fn, 1)
    t = _timing.median_ms(fns, device, repeats=repeats)
    return {"gemm_gflops": 2 * 2048 * 4096 * 4096 / t["gemm"] / 1e6, "copy_gbs": 2 * src.numel() * 4 / t["copy"] / 1e6,
            "dtype": str(dtype).replace("torch.", "")}


def work(case: Case, mode: str, esize: int) -> tuple[float, float]:
    """(useful FLOPs, compulsory bytes) of one call: the nonzeros' products; x, out (and dout, dx),
    the values and their int32 column indices (read twice and dvalues written in the backward)."""
    nnz = round((1 - case.sparsity) * case.out_features * case.in_features)
    B, i, o = case.batch, case.in_features, case.out_features
    if mode == "fwd":
        return 2.0 * nnz * B, float(esize * (B * i + B * o + nnz) + 4 * nnz)
    return 6.0 * nnz * B, float(esize * (2 * B * i + 2 * B * o + 2 * B * o + 3 * nnz) + 12 * nnz)


def make_mask(case: Case, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    o, i = case.out_features, case.in_features
    if case.blocked:
        blocks = mask_from_scores(torch.rand(o // BLOCK, i // BLOCK, generator=g), case.sparsity)
        m = blocks.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    else:
        m = mask_from_scores(torch.rand(o, i, generator=g), case.sparsity)
    return m.to(device)


def make_inputs(case: Case, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """x, the masked dense W, its layout and values, torch CSR/BSR copies, upstream gradient g."""
    g = torch.Generator(device=device).manual_seed(seed)
    mask = make_mask(case, device, seed)
    bound = 1 / math.sqrt(case.in_features)
    W = ((torch.rand(case.out_features, case.in_features, generator=g, device=device) * 2 - 1) * bound * mask)
    x = (torch.rand(case.batch, case.in_features, generator=g, device=device) * 2 - 1).to(dtype)
    layout = SparseLayout.from_mask(mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "beta" notices for sparse CSR/BSR
        W_csr = W.to(dtype).to_sparse_csr() if device == "cpu" or dtype == torch.float32 else None
        W_bsr = W.to(dtype).to_sparse_bsr(BLOCK) if case.blocked else None
    return {
        "x": x.requires_grad_(True), "W": W.to(dtype).requires_grad_(True),
        "layout": layout, "values": layout.values_from_dense(W).to(dtype).requires_grad_(True),
        "W_csr": None if W_csr is None else W_csr.requires_grad_(True), "W_bsr": W_bsr,
        "g": (torch.rand(case.batch, case.out_features, generator=g, device=device) * 2 - 1).to(dtype),
    }


def make_fn(provider: str, mode: str, inp: dict) -> Callable[[], object]:
    """A zero-argument callable running one ``mode`` step of ``provider`` on ``inp``."""
    x, g = inp["x"], inp["g"]
    if provider == DENSE:
        fwd, params = (lambda: F.linear(x, inp["W"])), (x, inp["W"])
    elif provider == CSR:
        if inp["W_csr"] is None:
            raise _backend.BackendUnavailableError("torch CSR matmul: no half-precision CSR on this device")
        fwd, params = (lambda: torch.sparse.mm(inp["W_csr"], x.t()).t()), (x, inp["W_csr"])
    elif provider == BSR:
        if inp["W_bsr"] is None:
            raise _backend.BackendUnavailableError("BSR runs on the block-structured cases only")
        if mode != "fwd":
            raise _backend.BackendUnavailableError("torch has no backward for a BSR weight")
        fwd, params = (lambda: (inp["W_bsr"] @ x.t()).t()), (x,)
    elif provider.startswith("kernelkit_"):
        name = provider.removeprefix("kernelkit_")
        auto = name.endswith("_auto")
        name = name.removesuffix("_auto")
        ms = None if auto else 0.0
        lay, v = inp["layout"], inp["values"]
        fwd, params = (lambda: sparse_linear(x, v, lay, backend=name, min_sparsity=ms)), (x, v)
    else:
        raise ValueError(f"unknown provider {provider!r}")
    return _timing.mode_step(mode, fwd, params, g, MODES)


def measure(case: Case, dtype: torch.dtype, device: str, mode: str, provs: list[str], *,
            repeats: int, warmup: int, skipped: dict | None = None, floor: dict | None = None) -> list[dict]:
    """Time every provider on one (case, dtype, mode) with shared inputs; rows with ratios.
    ``floor``: {dtype name: floors()} for the gflops / of_floor columns."""
    inp = make_inputs(case, dtype, device)
    dname = str(dtype).replace("torch.", "")
    fns: dict[str, Callable[[], object]] = {}
    first: dict[str, float] = {}   # ms of each provider's first (warm-up) call
    for prov in provs:
        try:
            fn = make_fn(prov, mode, inp)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                t0 = time.perf_counter()
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                first[prov] = (time.perf_counter() - t0) * 1e3
                _timing.warm(fn, warmup - 1) if warmup > 1 else None
            fns[prov] = fn
        except (_backend.BackendUnavailableError, torch.OutOfMemoryError, RuntimeError) as e:
            if prov == BSR and not case.blocked:
                continue  # by design: BSR only on the block cases
            if skipped is not None:
                skipped[f"{prov} {mode} {case.label} {dname}"] = str(e).splitlines()[0]
            if device == "cuda":
                torch.cuda.empty_cache()
    # A provider whose first call took > SLOW_FACTOR x the fastest one's (and > SLOW_MS) is not timed
    # again: torch's CSR matmul takes 36 s per call at 50% on 4096x4096 here, and repeating it would
    # make the run hours long.  Its time is that one (warm-up) call: repeats = 1 in its row.
    fastest = min(first.values(), default=0.0)
    slow = {p for p, t in first.items() if device == "cpu" and t > SLOW_FACTOR * fastest and t > SLOW_MS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        times = _timing.median_ms({p: f for p, f in fns.items() if p not in slow}, device, repeats=repeats)
    times.update({p: first[p] for p in slow})
    del inp
    flops, nbytes = work(case, mode, torch.finfo(dtype).bits // 8)
    fl = (floor or {}).get(dname)
    rows = []
    for prov, t in times.items():
        rows.append({
            "family": FAMILY, "op": mode, "shape": case.label, "dtype": dname, "device": device,
            "provider": prov, "median_ms": t,
            "vs_dense": times[DENSE] / t if DENSE in times else None,
            "vs_csr": times[CSR] / t if CSR in times else None,
            "gflops": flops / t / 1e6,
            "of_floor": (max(flops / (fl["gemm_gflops"] * 1e6), nbytes / (fl["copy_gbs"] * 1e6)) / t) if fl else None,
            "batch": case.batch, "out_features": case.out_features, "in_features": case.in_features,
            "sparsity": case.sparsity, "blocked": case.blocked, "repeats": 1 if prov in slow else repeats,
        })
    return rows


def run(device: str, *, quick: bool = False, batch: int | None = None, repeats: int = 5, warmup: int = 1,
        backends: Iterable[str] | None = None, on_group: Callable[[list[dict]], None] | None = None,
        skipped: dict | None = None, smoke: bool = False) -> list[dict]:
    """Every case x dtype x mode on ``device``; ``on_group(rows_so_far)`` after each group.
    smoke: tiny cases and no floors (gflops only, of_floor empty)."""
    provs, why = providers(device, backends)
    if skipped is not None:
        skipped.update(why)
    floor = {}
    for dt in () if smoke else dtypes(device):
        f = floors(device, dt)
        floor[f["dtype"]] = f
        print(f"  floors ({f['dtype']}): dense GEMM {f['gemm_gflops']:.1f} GFLOP/s (2048x4096 @ 4096x4096), "
              f"copy {f['copy_gbs']:.1f} GB/s (256 MB, read + write)", file=sys.stderr, flush=True)
    rows: list[dict] = []
    for case in cases(device, quick=quick, batch=batch, smoke=smoke):
        for dtype in dtypes(device):
            for mode in MODES:
                rows += measure(case, dtype, device, mode, provs, repeats=repeats, warmup=warmup, skipped=skipped,
                                floor=floor)
                if on_group is not None:
                    on_group(rows)
    return rows


def break_even(rows: list[dict], provider: str) -> list[tuple[str, str, str, float | None]]:
    """[(op, dtype, weight shape, sparsity where ``provider`` ties dense)] by log-linear interpolation
    of vs_dense between measured sparsities; None when it never ties in the measured range (then
    the first sparsity measured is reported as faster or not by the caller)."""
    out = []
    keys = dict.fromkeys((r["op"], r["dtype"], r["out_features"], r["in_features"]) for r in rows
                         if r["provider"] == provider and not r["blocked"])
    for op, dt, o, i in keys:
        pts = sorted((r["sparsity"], r["vs_dense"]) for r in rows if r["provider"] == provider and r["op"] == op
                     and r["dtype"] == dt and r["out_features"] == o and r["in_features"] == i and not r["blocked"]
                     and r["vs_dense"])
        be = None
        if pts and pts[0][1] >= 1.0:
            be = pts[0][0]  # already faster at the lowest sparsity measured
        for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
            if be is None and v0 < 1.0 <= v1:
                t = (0.0 - math.log(v0)) / (math.log(v1) - math.log(v0))
                be = s0 + t * (s1 - s0)
        out.append((op, dt, f"{o}x{i}", be))
    return out


def _line(r: dict, key: str, goal: float) -> str:
    return (f"    {r['op']:<8} {r['dtype']:<9} {r['shape']:<28} {r['provider']:<20} {r[key]:6.2f}x  "
            f"{'MET' if r[key] >= goal else 'NOT MET'}")


def _goal(rows: list[dict], title: str, key: str, goal: float) -> list[str]:
    if not rows:
        return [title, "    not measured"]
    ok = [r[key] >= goal for r in rows]
    return [title] + [_line(r, key, goal) for r in rows] + [
        f"  => {'MET' if all(ok) else 'NOT MET'} ({sum(ok)}/{len(ok)})"]


def goals(rows: list[dict], device: str) -> list[Goal]:
    """The issue's speed goals on ``device`` with the rows each applies to."""
    unstructured = [r for r in rows if not r["blocked"]]
    out = []
    if device == "cpu":
        k = [r for r in unstructured if r["provider"] == "kernelkit_cpu" and r["sparsity"] == GOAL_SPARSITY]
        out += [Goal(f"Goal 1 (CPU): kernelkit_cpu fwd >= {GOALS['cpu_fwd_vs_dense']}x vs {DENSE} at 90%",
                     "vs_dense", GOALS["cpu_fwd_vs_dense"], [r for r in k if r["op"] == "fwd" and r["vs_dense"]]),
                Goal(f"Goal 2 (CPU): kernelkit_cpu fwd >= {GOALS['cpu_fwd_vs_csr']}x vs {CSR} at 90%",
                     "vs_csr", GOALS["cpu_fwd_vs_csr"], [r for r in k if r["op"] == "fwd" and r["vs_csr"]]),
                Goal(f"Goal 3 (CPU): kernelkit_cpu fwd+bwd >= {GOALS['cpu_fwdbwd_vs_dense']}x vs {DENSE} at 90%",
                     "vs_dense", GOALS["cpu_fwdbwd_vs_dense"],
                     [r for r in k if r["op"] == "fwd+bwd" and r["vs_dense"]])]
        auto = "kernelkit_cpu_auto"
    else:
        out.append(Goal(f"Goal (GPU): faster than {DENSE} (cuBLAS) from 90% sparsity up, bfloat16", "vs_dense",
                        GOALS["gpu_vs_dense"],
                        [r for r in unstructured if r["provider"] in ("kernelkit_triton", "kernelkit_cuda")
                         and r["dtype"] == "bfloat16" and r["sparsity"] >= GOAL_SPARSITY and r["vs_dense"]]))
        auto = "kernelkit_triton_auto"
    out.append(Goal(f"Goal (all): {auto} (dense path below the break-even) >= {GOALS['auto_vs_dense']}x of "
                    f"{DENSE} at every sparsity", "vs_dense", GOALS["auto_vs_dense"],
                    [r for r in unstructured if r["provider"] == auto and r["vs_dense"]]))
    return out


def goal_report(rows: list[dict], device: str) -> list[str]:
    """The issue's speed goals, checked on ``rows`` (each case's ratio, then MET / NOT MET), and the
    measured break-even sparsities."""
    return _report.goal_report(goals, notes, _goal, rows, device)


def notes(rows: list[dict], device: str) -> list[str]:
    """What the table does not show: the break-even sparsities of the kernelkit providers vs dense."""
    unstructured = [r for r in rows if not r["blocked"]]
    out = []
    for prov in dict.fromkeys(r["provider"] for r in unstructured):
        if prov.startswith("kernelkit_") and not prov.endswith("_auto"):
            out.append(f"Break-even sparsity of {prov} vs {DENSE} (interpolated; '<' = faster at every sparsity "
                       f"measured, '>' = never faster):")
            lo, hi = min(SPARSITIES), max(SPARSITIES)
            for op, dt, shape, be in break_even(rows, prov):
                txt = f"< {lo:.2f}" if be == lo else (f"> {hi:.2f}" if be is None else f"{be:.3f}")
                out.append(f"    {op:<8} {dt:<9} W {shape:<10} {txt}")
    return out


__all__ = ["FAMILY", "cases", "providers", "make_inputs", "make_fn", "measure", "run", "goal_report",
           "environment", "break_even", "COLUMNS"]
