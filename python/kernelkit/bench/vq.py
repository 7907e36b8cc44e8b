"""VQ benchmark: kernelkit.vq.vq_linear against dense F.linear, dequantize-then-matmul and AQLM's CPU kernel.

What is measured, per case (a layer in -> out quantized in one of the FORMATS, batch rows of x; float32
on CPU, float16 on GPU), all providers timed in the same run, interleaved, on the same inputs:
    fwd       y = f(x) under torch.no_grad()
    fwd+bwd   y = f(x); torch.autograd.grad(y, (x, weight or codebooks), g), at batch 256 only
              (fine-tuning with frozen codes: kernelkit's backward gives dx and the codebook gradient)
Providers (interleaved round by round, except aqlm_numba: see measure()):
    dense_F.linear        F.linear(x, W) with the dense weight W = the dequantized one       [baseline]
    dequant_matmul        F.linear(x, dequantize(codes, codebooks)) per call: what AQLM, VPTQ and
                          QuIP# do past a few tokens (kernelkit's own dequantize kernel)      [baseline]
    aqlm_numba            AQLM's CPU kernel (aqlm.inference_kernels.numba_kernel.numba_gemm_lut, a
                          numba lookup-table GEMV looped over the batch rows), CPU, fwd, batch <= 256
                          (its time grows linearly with the batch)                           [baseline]
    kernelkit_<be>        vq_linear(..., backend=be) with path "auto"
    kernelkit_<be>_gemv / _gemm   the same with the path forced (where it is not what auto picks)
Each row: median time; vs_dense / vs_dequant / vs_aqlm = t_baseline / t (> 1 = faster); err = the
relative error of the provider's output against the float64 reference on the first call (AQLM's kernel
races on its shared outputs with several threads); gbs = compulsory bytes / t; of_floor = the bandwidth
floor (compulsory bytes / the copy bandwidth measured at the start of the run, floors()) / t.
Compulsory bytes: the codes, codebooks, x and out (the dense providers: the dense W instead of the codes).
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
from kernelkit.vq import dequantize, vq_linear
from kernelkit.vq.reference import dequantize_reference

from . import _report, _timing
from ._report import Goal
from .monarch import environment  # same machine description
from .sparse import floors  # same floors: a dense fp32 GEMM and a 256 MB copy

FAMILY = "vq"
SHAPES = ((4096, 4096), (1152, 6912), (4608, 1152), (11008, 4096))   # (in, out): DiT adaLN, fc2; Llama down_proj
BATCHES = (1, 4, 16, 256, 4096)
# name: (M codebooks, K, d); 2 index bits per weight each
FORMATS = {"1x8g4": (1, 256, 4), "2x8g8": (2, 256, 8)}
GPU_FORMATS = {"1x8g4": (1, 256, 4), "2x8g8": (2, 256, 8), "1x16g8": (1, 65536, 8)}
MODES = ("fwd", "fwd+bwd")
BWD_BATCH = 256
AQLM_MAX_BATCH = 256
QUICK_AQLM_MAX_BATCH = 16   # quick: AQLM's kernel (a GEMV per row, ~4 s a call at batch 256 here) up to batch 16
DENSE, DEQUANT, AQLM = "dense_F.linear", "dequant_matmul", "aqlm_numba"
BASELINES = (DENSE, DEQUANT, AQLM)
DEFAULT_BACKENDS = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}
GOALS = {"cpu_b1_vs_dense": 4.0, "cpu_b16_vs_dense": 2.0, "gpu_b1_vs_dense": 4.0, "gpu_gemm_vs_dense": 0.9}
SLOW_FACTOR, SLOW_MS = 8.0, 2000.0
COLUMNS = ("family", "op", "shape", "dtype", "device", "provider", "median_ms", "vs_dense", "vs_dequant", "vs_aqlm",
           "err", "gbs", "of_floor")
PLOT_BASELINE = "vs_dense"
EXTRA = ("format", "batch", "in_features", "out_features", "repeats")
CASE_KEYS = ("op", "dtype", "format", "batch", "in_features", "out_features")
RATIOS = {"vs_dense": DENSE, "vs_dequant": DEQUANT, "vs_aqlm": AQLM}
BASELINE_LIBS = ("aqlm", "numba")
SMOKE_SHAPE = (256, 128)   # --smoke (the CLI's tests): (in, out) at batch 1 and 256, 1x8g4 only


@dataclass(frozen=True)
class Case:
    in_features: int
    out_features: int
    fmt: str
    batch: int

    @property
    def label(self) -> str:
        return f"{self.fmt} {self.batch}x{self.in_features}->{self.out_features}"


def cases(device: str, *, quick: bool = False, batch: int | None = None, smoke: bool = False) -> list[Case]:
    """Every SHAPES x format x BATCHES (or the one ``batch``); quick: 4096x4096, batch 1/16/256;
    smoke: a tiny layer (the CLI's tests)."""
    fmts = GPU_FORMATS if device == "cuda" else FORMATS
    if smoke:
        return [Case(*SMOKE_SHAPE, "1x8g4", b) for b in ((batch,) if batch else (1, BWD_BATCH))]
    if quick:
        return [Case(4096, 4096, f, b) for f in fmts for b in ((batch,) if batch else (1, 16, 256))]
    return [Case(i, o, f, b) for i, o in SHAPES for f in fmts for b in ((batch,) if batch else BATCHES)]


def dtype_for(device: str) -> torch.dtype:
    return torch.float16 if device == "cuda" else torch.float32


def _aqlm_error() -> str | None:
    try:
        from aqlm.inference_kernels.numba_kernel import numba_gemm_lut  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means: not available
        return f"aqlm[cpu] is not installed ({type(e).__name__}: {e}); pip install 'aqlm[cpu]'"
    return None


def providers(device: str, backends: Iterable[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(providers to time, {provider: why skipped}) for ``device``; backends None = the defaults."""
    avail = kernelkit.backends(device)
    run, skipped = [DENSE, DEQUANT], {}
    if device == "cpu":
        why = _aqlm_error()
        (skipped.__setitem__(AQLM, why) if why else run.append(AQLM))
    for name in (DEFAULT_BACKENDS[device] if backends is None else backends):
        if name not in _backend.BACKENDS:
            raise ValueError(f"unknown kernelkit backend {name!r} (choose from {', '.join(_backend.BACKENDS)})")
        if avail[name] == "available":
            run += [f"kernelkit_{name}", f"kernelkit_{name}_gemv", f"kernelkit_{name}_gemm"]
        else:
            skipped[f"kernelkit_{name}"] = avail[name]
    return run, skipped


def compulsory_bytes(case: Case, provider: str, esize: int) -> float:
    """Bytes a call must move at least: x and out, plus the weight as the provider stores it."""
    M, K, d = (GPU_FORMATS | FORMATS)[case.fmt]
    B, i, o = case.batch, case.in_features, case.out_features
    act = esize * B * (i + o)
    if provider == DENSE:
        return float(act + esize * i * o)
    code_bytes = o * (i // d) * M * (1 if K <= 256 else 2)
    return float(act + code_bytes + esize * M * K * d)


def make_inputs(case: Case, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Random codes and codebooks (codebook entries ~ U(-1,1)/sqrt(in) so W looks like an init), the
    dequantized dense W, x, an upstream gradient g, and AQLM's tensors for the same layer on CPU."""
    M, K, d = (GPU_FORMATS | FORMATS)[case.fmt]
    g = torch.Generator().manual_seed(seed)
    o, i, B = case.out_features, case.in_features, case.batch
    codes = torch.randint(0, K, (o, i // d, M), generator=g)
    codes = (torch.where(codes >= 32768, codes - 65536, codes).to(torch.int16) if K > 256 else codes.to(torch.uint8))
    cb = ((torch.rand(1, M, K, d, generator=g) * 2 - 1) / math.sqrt(i * M)).to(device, dtype)
    codes = codes.to(device)
    x = (torch.rand(B, i, generator=g) * 2 - 1).to(device, dtype)
    W = dequantize_reference(codes, cb.float(), None, o).to(dtype)
    inp = {"x": x.requires_grad_(True), "codes": codes, "cb": cb.requires_grad_(True),
           "W": W.requires_grad_(True), "g": (torch.rand(B, o, generator=g) * 2 - 1).to(device, dtype)}
    if device == "cpu" and K == 256:
        # AQLM's layout: int8 codes, permuted to (in groups, out, M) as its QuantizedLinear does on the
        # first CPU forward; codebooks (M, K, out_group_size = 1, in_group_size); scales (out, 1, 1, 1).
        inp["aqlm"] = (codes.view(torch.int8).permute(1, 0, 2).contiguous(), cb[0].detach().float().unsqueeze(2).contiguous(),
                       torch.ones(o, 1, 1, 1))
    return inp


def make_fn(provider: str, mode: str, inp: dict) -> Callable[[], object]:
    """A zero-argument callable running one ``mode`` step of ``provider`` on ``inp``."""
    x, g, codes, cb = inp["x"], inp["g"], inp["codes"], inp["cb"]
    if provider == DENSE:
        fwd, params = (lambda: F.linear(x, inp["W"])), (x, inp["W"])
    elif provider == DEQUANT:
        be = "cpu" if x.device.type == "cpu" else None
        fwd, params = (lambda: F.linear(x, dequantize(codes, cb, backend=be))), (x, cb)
    elif provider == AQLM:
        if "aqlm" not in inp:
            raise _backend.BackendUnavailableError("AQLM's CPU kernel needs 8-bit codebooks on CPU")
        if mode != "fwd" or x.shape[0] > AQLM_MAX_BATCH:
            raise _backend.BackendUnavailableError(f"aqlm_numba: fwd at batch <= {AQLM_MAX_BATCH} only")
        from aqlm.inference_kernels.numba_kernel import numba_gemm_lut
        a_codes, a_cb, a_sc = inp["aqlm"]
        numba_gemm_lut(x.detach()[:1], a_codes, a_cb, a_sc, None)  # numba compiles per shape: not timed
        fwd, params = (lambda: numba_gemm_lut(x.detach(), a_codes, a_cb, a_sc, None)), (x,)
    elif provider.startswith("kernelkit_"):
        name = provider.removeprefix("kernelkit_")
        path = "auto"
        for p in ("gemv", "gemm"):
            if name.endswith("_" + p):
                name, path = name.removesuffix("_" + p), p
        fwd, params = (lambda: vq_linear(x, codes, cb, backend=name, path=path)), (x, cb)
    else:
        raise ValueError(f"unknown provider {provider!r}")
    return _timing.mode_step(mode, fwd, params, g, MODES)


def _rel_err(out, ref) -> float:
    out = out[0] if isinstance(out, tuple) else out
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def measure(case: Case, dtype: torch.dtype, device: str, mode: str, provs: list[str], *,
            repeats: int, warmup: int, skipped: dict | None = None, floor: dict | None = None) -> list[dict]:
    """Time every provider on one (case, mode) with shared inputs; rows with ratios."""
    inp = make_inputs(case, dtype, device)
    dname = str(dtype).replace("torch.", "")
    ref = F.linear(inp["x"].detach().double(), inp["W"].detach().double()) if mode == "fwd" else None
    fns: dict[str, Callable[[], object]] = {}
    first: dict[str, float] = {}
    errs: dict[str, float] = {}
    for prov in provs:
        if mode == "fwd+bwd" and prov.endswith(("_gemv", "_gemm")):
            continue
        try:
            fn = make_fn(prov, mode, inp)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                out = fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                first[prov] = (time.perf_counter() - t0) * 1e3
                if ref is not None:
                    errs[prov] = _rel_err(out, ref)
                del out
                _timing.warm(fn, warmup - 1) if warmup > 1 else None
            fns[prov] = fn
        except (_backend.BackendUnavailableError, torch.OutOfMemoryError, RuntimeError) as e:
            if prov == AQLM and ("fwd at batch" in str(e) or "8-bit" in str(e)):
                continue  # by design (documented above)
            if skipped is not None:
                skipped[f"{prov} {mode} {case.label} {dname}"] = str(e).splitlines()[0]
    fastest = min(first.values(), default=0.0)
    slow = {p for p, t in first.items() if device == "cpu" and t > SLOW_FACTOR * fastest and t > SLOW_MS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # AQLM's kernel runs on numba's OpenMP thread pool, whose threads keep spinning after each call
        # and slowed the provider timed right after it 2-3x here (kernelkit batch 1 at 4096x4096: 2.3 ms
        # alone, 6.9 ms after an AQLM call), so it is timed in its own group, after the others.
        own = {p for p in fns if p == AQLM}
        times = _timing.median_ms({p: f for p, f in fns.items() if p not in slow | own}, device, repeats=repeats)
        times.update(_timing.median_ms({p: f for p, f in fns.items() if p in own - slow}, device, repeats=repeats))
    times.update({p: first[p] for p in slow})
    del inp
    esize = torch.finfo(dtype).bits // 8
    fl = (floor or {}).get(dname)
    rows = []
    for prov, t in times.items():
        nbytes = compulsory_bytes(case, prov, esize) * (1 if mode == "fwd" else 2)
        rows.append({
            "family": FAMILY, "op": mode, "shape": case.label, "dtype": dname, "device": device,
            "provider": prov, "median_ms": t,
            "vs_dense": times[DENSE] / t if DENSE in times else None,
            "vs_dequant": times[DEQUANT] / t if DEQUANT in times else None,
            "vs_aqlm": times[AQLM] / t if AQLM in times else None,
            "err": errs.get(prov), "gbs": nbytes / t / 1e6,
            "of_floor": (nbytes / (fl["copy_gbs"] * 1e6) / t) if fl else None,
            "format": case.fmt, "batch": case.batch, "in_features": case.in_features,
            "out_features": case.out_features, "repeats": 1 if prov in slow else repeats,
        })
    return rows


def run(device: str, *, quick: bool = False, batch: int | None = None, repeats: int = 5, warmup: int = 1,
        backends: Iterable[str] | None = None, on_group: Callable[[list[dict]], None] | None = None,
        skipped: dict | None = None, smoke: bool = False) -> list[dict]:
    """Every case x mode on ``device``; smoke: tiny cases and no floors (of_floor empty)."""
    provs, why = providers(device, backends)
    if skipped is not None:
        skipped.update(why)
    if smoke:  # numba compiles AQLM's kernel (seconds): not in the smoke run
        provs = [p for p in provs if p != AQLM]
    dtype = dtype_for(device)
    f = None if smoke else floors(device, dtype)
    if f is not None:
        print(f"  floors ({f['dtype']}): dense GEMM {f['gemm_gflops']:.1f} GFLOP/s (2048x4096 @ 4096x4096), "
              f"copy {f['copy_gbs']:.1f} GB/s (256 MB, read + write)", file=sys.stderr, flush=True)
    rows: list[dict] = []
    for case in cases(device, quick=quick, batch=batch, smoke=smoke):
        for mode in MODES:
            if mode == "fwd+bwd" and case.batch != BWD_BATCH:
                continue
            run_provs = [p for p in provs if not (quick and p == AQLM and case.batch > QUICK_AQLM_MAX_BATCH)]
            rows += measure(case, dtype, device, mode, run_provs, repeats=repeats, warmup=warmup, skipped=skipped,
                            floor={f["dtype"]: f} if f else None)
            if on_group is not None:
                on_group(rows)
    return rows


def _goal(rows: list[dict], title: str, key: str, goal: float) -> list[str]:
    if not rows:
        return [title, "    not measured"]
    ok = [r[key] >= goal for r in rows]
    lines = [f"    {r['op']:<8} {r['shape']:<28} {r['provider']:<22} {r[key]:6.2f}x  "
             f"{'MET' if r[key] >= goal else 'NOT MET'}" for r in rows]
    return [title] + lines + [f"  => {'MET' if all(ok) else 'NOT MET'} ({sum(ok)}/{len(ok)})"]


def goals(rows: list[dict], device: str) -> list[Goal]:
    """The issue's speed goals on ``device`` with the rows each applies to."""
    fwd = [r for r in rows if r["op"] == "fwd" and r["vs_dense"]]
    out = []
    if device == "cpu":
        k = [r for r in fwd if r["provider"] == "kernelkit_cpu"]
        out += [Goal(f"Goal 1 (CPU): batch 1 >= {GOALS['cpu_b1_vs_dense']}x vs {DENSE} (fp32)", "vs_dense",
                     GOALS["cpu_b1_vs_dense"], [r for r in k if r["batch"] == 1]),
                Goal(f"Goal 2 (CPU): batch 16 >= {GOALS['cpu_b16_vs_dense']}x vs {DENSE} (fp32)", "vs_dense",
                     GOALS["cpu_b16_vs_dense"], [r for r in k if r["batch"] == 16]),
                Goal(f"Large batches (no goal in the issue): kernelkit_cpu vs {DEQUANT} >= 1x", "vs_dequant", 1.0,
                     [r for r in k if r["batch"] >= 256 and r["vs_dequant"]]),
                Goal(f"vs {AQLM} (AQLM's CPU kernel, same format)", "vs_aqlm", 1.0, [r for r in k if r["vs_aqlm"]])]
    else:
        for be in ("triton", "cuda"):
            k = [r for r in fwd if r["provider"] == f"kernelkit_{be}"]
            out += [Goal(f"Goal (GPU, {be}): batch 1 >= {GOALS['gpu_b1_vs_dense']}x vs {DENSE} (fp16 cuBLAS)",
                         "vs_dense", GOALS["gpu_b1_vs_dense"], [r for r in k if r["batch"] == 1]),
                    Goal(f"Goal (GPU, {be}): GEMM >= {GOALS['gpu_gemm_vs_dense']}x of cuBLAS", "vs_dense",
                         GOALS["gpu_gemm_vs_dense"], [r for r in k if r["batch"] >= 256])]
    return out


def goal_report(rows: list[dict], device: str) -> list[str]:
    """The issue's speed goals, checked on ``rows`` (each case's ratio, then MET / NOT MET)."""
    return _report.goal_report(goals, notes, _goal, rows, device)


def notes(rows: list[dict], device: str) -> list[str]:
    """What the table does not show: the error of AQLM's kernel."""
    out = []
    errs = [r for r in rows if r["provider"] == AQLM and r["err"] is not None]
    if errs:
        out.append(f"{AQLM} relative error of the first call vs float64: "
                   + ", ".join(f"{r['err']:.1e}" for r in errs) + " (its parallel loop adds into shared outputs)")
    return out


__all__ = ["FAMILY", "cases", "providers", "make_inputs", "make_fn", "measure", "run", "goal_report",
           "environment", "COLUMNS"]
