"""Monarch benchmark: kernelkit.monarch.monarch_matmul against a dense layer and the bmm Monarch.

What is measured, per case (MonarchLinear-shaped factors for in -> out with nblocks, batch rows):
    fwd      y = f(x)                               under torch.no_grad()
    fwd+bwd  y = f(x); torch.autograd.grad(y, params, g)  with a fixed random upstream gradient g;
             params = (x, w1, w2) for the Monarch providers, (x, W) for the dense one
Providers (all timed in the same run on the same inputs):
    dense_F.linear    torch.nn.functional.linear(x, W), W dense (out, in)      [baseline]
    bmm_monarch       kernelkit.monarch.monarch_bmm (two torch.bmm), autograd   [baseline]
    kernelkit_<name>  monarch_matmul(x, w1, w2, backend=name), for each kernelkit backend asked for
Each row carries the median time and vs_dense = t_dense / t, vs_bmm = t_bmm / t (>1 = faster).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

import kernelkit
from kernelkit import _backend
from kernelkit.monarch import monarch_bmm, monarch_matmul, monarch_shapes

from . import _timing
from ._report import Goal

FAMILY = "monarch"
SHAPES = ((1024, 1024), (768, 3072), (3072, 768), (4096, 4096))   # (in_features, out_features)
NBLOCKS = (4, 16)
MODES = ("fwd", "fwd+bwd")
BATCH, QUICK_BATCH = 4096, 256
GPU_GOAL_CASE = (4096, 4096, 4, 8192)                               # (in, out, nblocks, batch)
DENSE, BMM = "dense_F.linear", "bmm_monarch"
BASELINES = (DENSE, BMM)
DEFAULT_BACKENDS = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}    # kernelkit_torch: opt-in (slow)
GOALS = {"cpu_vs_bmm": 1.3, "gpu_vs_bmm": 1.3, "gpu_vs_dense": 1.5}
SMOKE_SHAPES = ((64, 64), (64, 128))                                 # --smoke (the CLI's tests): batch 8, nb 4
CASE_KEYS = ("op", "dtype", "batch", "in_features", "out_features", "nblocks")   # the table's case columns
RATIOS = {"vs_bmm": BMM, "vs_dense": DENSE}                         # the reference baseline: bmm, else dense
BASELINE_LIBS = ()                                                  # both baselines are torch


@dataclass(frozen=True)
class Case:
    """One layer shape: x (batch, in) -> (batch, out) through MonarchLinear-shaped factors."""
    in_features: int
    out_features: int
    nblocks: int
    batch: int

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.in_features}->{self.out_features} nb{self.nblocks}"


def cases(device: str, *, quick: bool = False, batch: int | None = None, smoke: bool = False) -> list[Case]:
    """The spec's cases: every SHAPES x NBLOCKS at ``batch`` (default 4096), plus on cuda the GPU
    goal case 4096->4096 nb4 at batch 8192.  quick: batch 256, the first two shapes, nblocks 4.
    smoke: tiny layers at batch 8 (the CLI's tests)."""
    if smoke:
        return [Case(i, o, 4, batch or 8) for i, o in SMOKE_SHAPES]
    if quick:
        b = batch or QUICK_BATCH
        return [Case(i, o, 4, b) for i, o in SHAPES[:2]]
    b = batch or BATCH
    out = [Case(i, o, nb, b) for i, o in SHAPES for nb in NBLOCKS]
    if device == "cuda":
        out.append(Case(*GPU_GOAL_CASE))
    return out


def dtypes(device: str) -> tuple[torch.dtype, ...]:
    return (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,)


def providers(device: str, backends: Iterable[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(providers to time, {provider: why skipped}) for ``device``; backends None = the defaults."""
    avail = kernelkit.backends(device)
    run, skipped = list(BASELINES), {}
    for name in (DEFAULT_BACKENDS[device] if backends is None else backends):
        if name not in _backend.BACKENDS:
            raise ValueError(f"unknown kernelkit backend {name!r} (choose from {', '.join(_backend.BACKENDS)})")
        if avail[name] == "available":
            run.append(f"kernelkit_{name}")
        else:
            skipped[f"kernelkit_{name}"] = avail[name]
    return run, skipped


def make_inputs(case: Case, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Random inputs, weights scaled like MonarchLinear / nn.Linear init, and upstream gradients."""
    g = torch.Generator(device=device).manual_seed(seed)   # drawn on the device: no host copies
    s1, s2, in_ext, out_ext = monarch_shapes(case.in_features, case.out_features, case.nblocks)

    def rand(*shape, bound=1.0):
        t = (torch.rand(*shape, generator=g, device=device) * 2 - 1) * bound
        return t.to(dtype).requires_grad_(True)

    x = rand(case.batch, case.in_features)
    x_m = x if in_ext == case.in_features else rand(case.batch, in_ext)   # padded width, if any
    return {
        "x": x, "x_m": x_m,
        "W": rand(case.out_features, case.in_features, bound=1 / math.sqrt(case.in_features)),
        "w1": rand(*s1, bound=1 / math.sqrt(s1[-1])), "w2": rand(*s2, bound=1 / math.sqrt(s2[-1])),
        "g": rand(case.batch, case.out_features).detach(), "g_m": rand(case.batch, out_ext).detach(),
    }


def make_fn(provider: str, mode: str, inp: dict) -> Callable[[], object]:
    """A zero-argument callable running one ``mode`` step of ``provider`` on ``inp``."""
    if provider == DENSE:
        fwd, params, g = (lambda: F.linear(inp["x"], inp["W"])), (inp["x"], inp["W"]), inp["g"]
    else:
        if provider == BMM:
            op = monarch_bmm
        elif provider.startswith("kernelkit_"):
            name = provider.removeprefix("kernelkit_")
            op = lambda x, w1, w2: monarch_matmul(x, w1, w2, backend=name)  # noqa: E731
        else:
            raise ValueError(f"unknown provider {provider!r}")
        x, w1, w2 = inp["x_m"], inp["w1"], inp["w2"]
        fwd, params, g = (lambda: op(x, w1, w2)), (x, w1, w2), inp["g_m"]
    return _timing.mode_step(mode, fwd, params, g, MODES)


def measure(case: Case, dtype: torch.dtype, device: str, mode: str, provs: list[str], *,
            repeats: int, warmup: int, skipped: dict | None = None) -> list[dict]:
    """Time every provider on one (case, dtype, mode) with shared inputs; rows with ratios.

    Providers are warmed up one by one, then timed interleaved (see _timing).  A provider that
    raises BackendUnavailableError (e.g. dtype unsupported) or runs out of memory is left out, with
    the reason in ``skipped["<provider> <mode> <shape> <dtype>"]``."""
    inp = make_inputs(case, dtype, device)
    dname = str(dtype).replace("torch.", "")
    fns: dict[str, Callable[[], object]] = {}
    for prov in provs:
        fn = make_fn(prov, mode, inp)
        try:
            _timing.warm(fn, warmup)
            fns[prov] = fn
        except (_backend.BackendUnavailableError, torch.OutOfMemoryError) as e:
            if skipped is not None:
                skipped[f"{prov} {mode} {case.label} {dname}"] = str(e).splitlines()[0]
            if device == "cuda":
                torch.cuda.empty_cache()
    times = _timing.median_ms(fns, device, repeats=repeats)
    del inp
    rows = []
    for prov, t in times.items():
        rows.append({
            "family": FAMILY, "op": mode, "shape": case.label, "dtype": dname, "device": device,
            "provider": prov, "median_ms": t,
            "vs_dense": times[DENSE] / t if DENSE in times else None,
            "vs_bmm": times[BMM] / t if BMM in times else None,
            "batch": case.batch, "in_features": case.in_features, "out_features": case.out_features,
            "nblocks": case.nblocks, "repeats": repeats,
        })
    return rows


def run(device: str, *, quick: bool = False, batch: int | None = None, repeats: int = 5, warmup: int = 1,
        backends: Iterable[str] | None = None, on_group: Callable[[list[dict]], None] | None = None,
        skipped: dict | None = None, smoke: bool = False) -> list[dict]:
    """Every case x dtype x mode on ``device``; ``on_group(rows_so_far)`` after each group."""
    provs, why = providers(device, backends)
    if skipped is not None:
        skipped.update(why)
    rows: list[dict] = []
    for case in cases(device, quick=quick, batch=batch, smoke=smoke):
        for dtype in dtypes(device):
            for mode in MODES:
                rows += measure(case, dtype, device, mode, provs, repeats=repeats, warmup=warmup, skipped=skipped)
                if on_group is not None:
                    on_group(rows)
    return rows


def environment(device: str) -> list[str]:
    """Lines describing the machine: GPU card name, or CPU threads and kernelkit's CPU ISA."""
    lines = [f"torch {torch.__version__}, kernelkit {kernelkit.__version__}"]
    if device == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}, "
                     f"TF32 matmul {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'})")
        try:
            import triton
            lines.append(f"triton {triton.__version__}")
        except ImportError:
            pass
    else:
        try:
            from kernelkit import _lib
            isa = _lib.C().cpu_isa()
        except ImportError as e:
            isa = f"unknown ({e})"
        lines.append(f"CPU: {torch.get_num_threads()} threads, kernelkit cpu_isa={isa}")
    lines.append("kernelkit backends: " + "; ".join(f"{k}: {v}" for k, v in kernelkit.backends(device).items()))
    return lines


def _verdict(rows: list[dict], key: str, goal: float) -> list[str]:
    """One line per row (ratio, MET / NOT MET), then one verdict per (op, dtype)."""
    if not rows:
        return ["    not measured"]
    out = [f"    {r['op']:<8} {r['dtype']:<9} {r['shape']:<24} {r[key]:6.2f}x  "
           f"{'MET' if r[key] >= goal else 'NOT MET'}" for r in rows]
    for op, dt in dict.fromkeys((r["op"], r["dtype"]) for r in rows):
        grp = [r[key] >= goal for r in rows if (r["op"], r["dtype"]) == (op, dt)]
        out.append(f"  => {op} {dt}: {'MET' if all(grp) else 'NOT MET'} ({sum(grp)}/{len(grp)} shapes)")
    return out


def goals(rows: list[dict], device: str) -> list[Goal]:
    """The issue's speed goals on ``device`` with the rows each applies to."""
    if device == "cpu":
        goal = GOALS["cpu_vs_bmm"]
        sel = [r for r in rows if r["provider"] == "kernelkit_cpu" and r["op"] == "fwd+bwd" and r["vs_bmm"]]
        return [Goal(f"Goal (CPU): kernelkit_cpu fwd+bwd >= {goal}x vs {BMM} on every shape", "vs_bmm", goal, sel)]
    tri = [r for r in rows if r["provider"] == "kernelkit_triton"]
    g1, g2 = GOALS["gpu_vs_bmm"], GOALS["gpu_vs_dense"]
    goal_label = Case(*GPU_GOAL_CASE).label
    return [Goal(f"Goal 1 (GPU): kernelkit_triton >= {g1}x vs {BMM} on every shape", "vs_bmm", g1,
                 [r for r in tri if r["vs_bmm"]]),
            Goal(f"Goal 2 (GPU): kernelkit_triton >= {g2}x vs {DENSE} at {goal_label}", "vs_dense", g2,
                 [r for r in tri if r["shape"] == goal_label and r["vs_dense"]])]


def goal_report(rows: list[dict], device: str) -> list[str]:
    """The issue's speed goals, checked on ``rows`` (each shape's ratio, then MET / NOT MET)."""
    out = []
    for g in goals(rows, device):
        out += [g.title] + _verdict(g.rows, g.key, g.goal)
    return out + notes(rows, device)


def notes(rows: list[dict], device: str) -> list[str]:
    """What the table does not show (nothing for monarch)."""
    return []
