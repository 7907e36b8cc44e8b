"""M-FAC benchmark: the sliding-window IHVP and update (kernelkit.mfac.SlidingWindowIHVP) against a plain
torch implementation of the same algorithm and the published one, with the memory floor of the same run.

What is measured, per case (d gradient entries, m gradients in the window; the window is filled first):
    update       window.update(g): g written into the ring buffer, its m dot products, the O(m^2)
                 rank-2 update of the float64 inverse (one pass over the buffer)
    ihvp         window.mul(x): q = G x, c = K^-1 q, out = x / damp - G^T c / damp (two passes)
    update_mul   the optimizer step: update(g) then F^-1 g, sharing the insertion's pass (two passes)
    static_setup (d = 1e5 and 1e6, m = 64, block_size None and 128, the pruner's setting) StaticIHVP(G)
Providers (interleaved round by round on the same gradients):
    torch_f32          the same algorithm in plain torch, float32 buffer: torch.mv / matmul on the
                       buffer (G @ x, G.T @ c), the m x m algebra in float64                 [baseline]
    paper_f32          the published algorithm (reference.PaperWindow: D and B rebuilt in O(m^3) per
                       update, the Cholesky route), float32, d = 1e5 only (its O(m^3) Python loop
                       dominates; the fact sheet's 141 ms per update at d = 2e5, m = 1024)   [baseline]
    kernelkit_<be>_f32 / _bf16   SlidingWindowIHVP(dtype=float32 / bfloat16, backend=be)
Each row: median ms; vs_torch = t(torch_f32) / t; vs_paper likewise; gbs = compulsory bytes / t;
of_floor = (compulsory bytes / the copy bandwidth of the same run) / t (1 = at the memory floor; the goal
"within 1.3x of the floor" is of_floor >= 1/1.3 = 0.77).  Compulsory bytes: the passes over the buffer
at its storage size (one for update, two for ihvp and update_mul) plus the vectors.
"""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

import kernelkit
from kernelkit import _backend
from kernelkit.mfac import SlidingWindowIHVP, StaticIHVP
from kernelkit.mfac import ops as kk_ops
from kernelkit.mfac import reference as R

from . import _report, _timing
from ._report import Goal
from .monarch import environment  # same machine description
from .sparse import floors  # same floors: a dense fp32 GEMM and a 256 MB copy

FAMILY = "mfac"
DAMP = 1e-5
CPU_SIZES = ((100_000, 64), (100_000, 256), (100_000, 1024), (1_000_000, 64), (1_000_000, 256),
             (1_000_000, 1024))
GPU_SIZES = CPU_SIZES + ((10_000_000, 64), (10_000_000, 256), (10_000_000, 1024))
STATIC_SIZES = ((100_000, 64), (1_000_000, 64))
OPS = ("update", "ihvp", "update_mul")
TORCH, PAPER = "torch_f32", "paper_f32"
PAPER_MAX_D = 100_000
DEFAULT_BACKENDS = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}
GOALS = {"cpu_of_floor": 1 / 1.3, "cpu_bf16_vs_torch": 1.7, "gpu_of_floor": 1 / 1.5}
COLUMNS = ("family", "op", "shape", "dtype", "device", "provider", "median_ms", "vs_torch", "vs_paper", "gbs",
           "of_floor")
PLOT_BASELINE = "vs_torch"
EXTRA = ("d", "m", "block", "repeats", "err")
CASE_KEYS = ("op", "d", "m", "block")
RATIOS = {"vs_torch": TORCH, "vs_paper": PAPER}
BASELINE_LIBS = ()
SMOKE_SIZE = (4096, 8)   # --smoke (the CLI's tests): (d, m) for the window ops and the static setup


@dataclass(frozen=True)
class Case:
    d: int
    m: int
    op: str
    block: int | None = None

    @property
    def label(self) -> str:
        b = "" if self.block is None else f" block={self.block}"
        return f"d={self.d:.0e} m={self.m}{b}".replace("e+0", "e")


def cases(device: str, *, quick: bool = False, batch: int | None = None, smoke: bool = False) -> list[Case]:
    """``batch`` picks one d (the CLI's --batch).  quick: d = 1e5 m = 64 and d = 1e6 m = 256, the static
    setup at d = 1e5; smoke: tiny (the CLI's tests)."""
    sizes = GPU_SIZES if device == "cuda" else CPU_SIZES
    if smoke:
        d, m = SMOKE_SIZE
        d = batch or d
        return [Case(d, m, op) for op in OPS] + [Case(d, m, "static_setup", b) for b in (None, 128)]
    if quick:
        sizes = ((100_000, 64), (1_000_000, 256))
    if batch is not None:
        sizes = tuple((batch, m) for m in sorted({m for _, m in sizes}))
    out = [Case(d, m, op) for d, m in sizes for op in OPS]
    static = STATIC_SIZES if batch is None else ((batch, 64),)
    if quick:
        static = static[:1]
    out += [Case(d, m, "static_setup", b) for d, m in static for b in (None, 128)]
    return out


def providers(device: str, backends: Iterable[str] | None = None) -> tuple[list[str], dict[str, str]]:
    avail = kernelkit.backends(device)
    run, skipped = [TORCH, PAPER], {}
    for name in (DEFAULT_BACKENDS[device] if backends is None else backends):
        if name not in _backend.BACKENDS:
            raise ValueError(f"unknown kernelkit backend {name!r} (choose from {', '.join(_backend.BACKENDS)})")
        if avail[name] == "available":
            run += [f"kernelkit_{name}_f32", f"kernelkit_{name}_bf16"]
        else:
            skipped[f"kernelkit_{name}"] = avail[name]
    return run, skipped


class TorchWindow:
    """The sliding-window algorithm of SlidingWindowIHVP in plain torch (the baseline): float32 buffer,
    torch.mv on it, the Gram matrix and K^-1 in float64 with the same bordering update."""

    def __init__(self, d: int, m: int, damp: float, device):
        self.m, self.damp = m, damp
        self.G = torch.zeros(m, d, device=device)
        self.gram = torch.zeros(m, m, dtype=torch.float64, device=device)
        self.kinv = torch.eye(m, dtype=torch.float64, device=device) / (m * damp)
        self.slot = 0

    def update(self, g: torch.Tensor) -> torch.Tensor:
        k, m = self.slot, self.m
        self.G[k] = g
        q = torch.mv(self.G, g).double()
        # the bordering update of SlidingWindowIHVP (csrc/include/kernelkit/mfac.h), in torch ops
        a = self.kinv[k].clone()
        bz = q.clone()
        bz[k] = 0.0
        w = self.kinv @ bz - a * (torch.dot(a, bz) / a[k])
        w[k] = 0.0
        s = q[k] + m * self.damp - torch.dot(bz, w)
        self.kinv += torch.outer(w, w / s) - torch.outer(a, a / a[k])
        self.kinv[k, :] = -w / s
        self.kinv[:, k] = -w / s
        self.kinv[k, k] = 1.0 / s
        self.gram[k, :] = q
        self.gram[:, k] = q
        self.slot = (k + 1) % m
        return q

    def _ihvp(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        c = (self.kinv @ q) * (-1.0 / self.damp)
        return x / self.damp + torch.mv(self.G.T, c.float())

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        return self._ihvp(x, torch.mv(self.G, x).double())

    def update_mul(self, g: torch.Tensor) -> torch.Tensor:
        return self._ihvp(g, self.update(g))


def _make_window(provider: str, d: int, m: int, device: str):
    if provider == TORCH:
        return TorchWindow(d, m, DAMP, device)
    if provider == PAPER:
        if d > PAPER_MAX_D:
            raise _backend.BackendUnavailableError(f"{PAPER}: d <= {PAPER_MAX_D} only (O(m^3) Python loop per update)")
        return R.PaperWindow(d, m, DAMP, dtype=torch.float32, device=device)
    if provider.startswith("kernelkit_"):
        be, dt = provider.removeprefix("kernelkit_").rsplit("_", 1)
        dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dt]
        return SlidingWindowIHVP(d, m, DAMP, dtype=dtype, device=device, backend=be, refresh=0)
    raise ValueError(f"unknown provider {provider!r}")


def _gradients(d: int, m: int, device: str, n: int, seed: int = 0) -> list[torch.Tensor]:
    """n gradient-like vectors: a shared direction plus noise (nearby gradients, as in training)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=g)
    return [(0.5 * base + torch.randn(d, generator=g)).to(device) / d ** 0.5 for _ in range(n)]


def _window_rows(d: int, m: int, device: str, seed: int = 1) -> torch.Tensor:
    """(m, d) float32 rows like _gradients', generated on the device in place (no list of m vectors),
    rounded to bfloat16 values so that every provider (float32 or bfloat16 storage) holds the same
    window and one Gram matrix serves them all."""
    g = torch.Generator(device=device).manual_seed(seed)
    base = torch.randn(d, generator=g, device=device)
    G = torch.randn(m, d, generator=g, device=device)
    G.add_(base, alpha=0.5).div_(d ** 0.5)
    return G.copy_(G.bfloat16())


def _gram(G: torch.Tensor) -> torch.Tensor:
    """G G^T in float64, over column chunks (no float64 copy of the whole buffer)."""
    m, d = G.shape
    out = torch.zeros(m, m, dtype=torch.float64, device=G.device)
    step = max(1, (1 << 24) // max(m, 1))
    for lo in range(0, d, step):
        blk = G[:, lo:lo + step].double()
        out += blk @ blk.T
    return out


def _fill(prov: str, w, G: torch.Tensor, gram: torch.Tensor | None = None) -> None:
    """Load a full window from the rows G (m, d) at once (what m updates would give; m updates of a
    d = 1e7 window would take minutes).  The float32 providers share G's storage: the timed updates
    overwrite rows of it, which changes no timing; the agreement check runs before them."""
    m = G.shape[0]
    gram = _gram(G) if gram is None else gram
    if isinstance(w, TorchWindow):
        w.G = G
        w.gram = gram.clone()
        K = w.gram.clone()
        K.diagonal().add_(m * DAMP)
        w.kinv = torch.cholesky_inverse(torch.linalg.cholesky(K)).contiguous()
    elif isinstance(w, R.PaperWindow):
        w.G = G.clone()
        w.GGT = gram.to(w.cdt)
        w.last = 0
        w._setup()
    else:
        if w.dtype == torch.float32:
            w.G = G
        else:
            w.G.copy_(G)
        w.gram = gram.clone()
        w.kinv = kk_ops.window_rebuild(w.gram, w.damp)
        w.count = m


def compulsory_bytes(case: Case, provider: str) -> float:
    esize = 2 if provider.endswith("_bf16") else 4
    passes = {"update": 1, "ihvp": 2, "update_mul": 2}[case.op]
    vec = 4 * case.d * (2 if case.op == "update" else 3)
    return float(passes * case.m * case.d * esize + vec)


def _measure_window(case: Case, device: str, provs: list[str], repeats: int, warmup: int,
                    skipped: dict | None) -> tuple[dict, dict]:
    grads = _gradients(case.d, case.m, device, 9, seed=2)
    rows = _window_rows(case.d, case.m, device)
    gram = _gram(rows)
    wins, fns, errs = {}, {}, {}
    for prov in provs:
        try:
            w = _make_window(prov, case.d, case.m, device)
            _fill(prov, w, rows, gram)  # untimed
            wins[prov] = w
        except (_backend.BackendUnavailableError, torch.OutOfMemoryError, RuntimeError) as e:
            if skipped is not None and not (prov == PAPER and case.d > PAPER_MAX_D):
                skipped[f"{prov} {case.op} {case.label}"] = str(e).splitlines()[0]
    # agreement on one IHVP (every provider holds the same window)
    x = grads[-1]
    outs = {p: w.mul(x) for p, w in wins.items()}
    if TORCH in outs:
        ref = outs[TORCH].double()
        errs = {p: float((o.double() - ref).norm() / ref.norm()) for p, o in outs.items()}
    del outs
    extra = iter(range(10 ** 9))
    for prov, w in wins.items():
        if case.op == "ihvp":
            fns[prov] = (lambda w=w: w.mul(x))
        else:
            meth = getattr(w, case.op)
            fns[prov] = (lambda meth=meth: meth(grads[next(extra) % 8]))
    for fn in fns.values():
        _timing.warm(fn, warmup)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = _timing.median_ms(fns, device, repeats=repeats)
    return times, errs


def _torch_static(G: torch.Tensor, damp: float, block: int | None) -> torch.Tensor:
    """The static factor in plain torch (the baseline): batched float64 Grams, Cholesky, triangular solves."""
    m, d = G.shape
    if block is None or block >= d:
        K = (G.double() @ G.double().T)
        K.diagonal().add_(m * damp)
        return torch.linalg.solve_triangular(torch.linalg.cholesky(K), G.double(), upper=False).float()
    nb = d // block
    Gb = G[:, :nb * block].reshape(m, nb, block).permute(1, 0, 2).double()   # (nb, m, B)
    if m <= block:
        K = Gb @ Gb.transpose(1, 2)
        K.diagonal(dim1=1, dim2=2).add_(m * damp)
        return torch.linalg.solve_triangular(torch.linalg.cholesky(K), Gb, upper=False).float()
    A = Gb.transpose(1, 2) @ Gb
    A.diagonal(dim1=1, dim2=2).add_(m * damp)
    eye = torch.eye(block, dtype=torch.float64, device=G.device).expand(nb, block, block)
    return torch.linalg.solve_triangular(torch.linalg.cholesky(A), eye, upper=False).float()


def _measure_static(case: Case, device: str, provs: list[str], repeats: int, warmup: int) -> tuple[dict, dict]:
    G = torch.stack(_gradients(case.d, case.m, device, case.m))
    fns = {TORCH: (lambda: _torch_static(G, DAMP, case.block))}
    for prov in provs:
        if prov.startswith("kernelkit_") and prov.endswith("_f32"):
            be = prov.removeprefix("kernelkit_").removesuffix("_f32")
            fns[prov] = (lambda be=be: StaticIHVP(G, DAMP, case.block, backend=be))
    for fn in fns.values():
        _timing.warm(fn, warmup)
    times = _timing.median_ms(fns, device, repeats=max(1, min(repeats, 3)))
    return times, {}


def measure(case: Case, device: str, provs: list[str], *, repeats: int, warmup: int,
            skipped: dict | None = None, floor: dict | None = None) -> list[dict]:
    if case.op == "static_setup":
        times, errs = _measure_static(case, device, provs, repeats, warmup)
    else:
        times, errs = _measure_window(case, device, provs, repeats, warmup, skipped)
    fl = (floor or {}).get("float32")
    rows = []
    for prov, t in times.items():
        nbytes = compulsory_bytes(case, prov) if case.op != "static_setup" else None
        rows.append({
            "family": FAMILY, "op": case.op, "shape": case.label,
            "dtype": "bfloat16" if prov.endswith("_bf16") else "float32", "device": device, "provider": prov,
            "median_ms": t, "vs_torch": times[TORCH] / t if TORCH in times else None,
            "vs_paper": times[PAPER] / t if PAPER in times else None,
            "gbs": nbytes / t / 1e6 if nbytes else None,
            "of_floor": (nbytes / (fl["copy_gbs"] * 1e6) / t) if (fl and nbytes) else None,
            "d": case.d, "m": case.m, "block": case.block, "repeats": repeats, "err": errs.get(prov),
        })
    return rows


def run(device: str, *, quick: bool = False, batch: int | None = None, repeats: int = 5, warmup: int = 1,
        backends: Iterable[str] | None = None, on_group: Callable[[list[dict]], None] | None = None,
        skipped: dict | None = None, smoke: bool = False) -> list[dict]:
    """Every case on ``device``; smoke: tiny cases and no floors (of_floor empty)."""
    provs, why = providers(device, backends)
    if skipped is not None:
        skipped.update(why)
    f = None if smoke else floors(device, torch.float32)
    if f is not None:
        print(f"  floors (float32): dense GEMM {f['gemm_gflops']:.1f} GFLOP/s, copy {f['copy_gbs']:.1f} GB/s "
              "(256 MB, read + write)", file=sys.stderr, flush=True)
    rows: list[dict] = []
    for case in cases(device, quick=quick, batch=batch, smoke=smoke):
        t0 = time.perf_counter()
        rows += measure(case, device, provs, repeats=repeats, warmup=warmup, skipped=skipped,
                        floor={"float32": f} if f else None)
        if on_group is not None:
            on_group(rows)
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"    ({case.op} {case.label}: {time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    return rows


def _goal(rows: list[dict], title: str, key: str, goal: float) -> list[str]:
    if not rows:
        return [title, "    not measured"]
    ok = [r[key] >= goal for r in rows]
    lines = [f"    {r['op']:<11} {r['shape']:<18} {r['provider']:<20} {r[key]:6.2f}  "
             f"{'MET' if r[key] >= goal else 'NOT MET'}" for r in rows]
    return [title] + lines + [f"  => {'MET' if all(ok) else 'NOT MET'} ({sum(ok)}/{len(ok)})"]


def goals(rows: list[dict], device: str) -> list[Goal]:
    """The issue's speed goals on ``device`` with the rows each applies to."""
    win = [r for r in rows if r["op"] in ("update", "ihvp", "update_mul")]
    if device == "cpu":
        k = [r for r in win if r["provider"] == "kernelkit_cpu_f32" and r["d"] == 1_000_000 and r["m"] == 256
             and r["of_floor"]]
        b = [r for r in win if r["provider"] == "kernelkit_cpu_bf16" and r["vs_torch"]]
        return [Goal("Goal 1 (CPU): float32 within 1.3x of the memory floor at d = 1e6, m = 256 (of_floor >= 0.77)",
                     "of_floor", GOALS["cpu_of_floor"], k),
                Goal(f"Goal 2 (CPU): bfloat16 buffer >= {GOALS['cpu_bf16_vs_torch']}x faster than the float32 "
                     "torch implementation", "vs_torch", GOALS["cpu_bf16_vs_torch"], b)]
    return [Goal(f"Goal (GPU, {be}): within 1.5x of the memory floor (of_floor >= 0.67)", "of_floor",
                 GOALS["gpu_of_floor"], [r for r in win if r["provider"] == f"kernelkit_{be}_f32" and r["of_floor"]])
            for be in ("triton", "cuda")]


def goal_report(rows: list[dict], device: str) -> list[str]:
    """The issue's goals, checked on ``rows``."""
    return _report.goal_report(goals, notes, _goal, rows, device)


def notes(rows: list[dict], device: str) -> list[str]:
    """What the table does not show: the providers' agreement with torch_f32."""
    out = []
    errs = [r for r in rows if r.get("err") is not None and r["provider"] != TORCH]
    if errs:
        out.append("agreement with torch_f32 on one IHVP (relative): "
                   + ", ".join(f"{r['provider']} {r['shape']} {r['err']:.1e}" for r in errs if r["op"] == "ihvp"))
    return out


__all__ = ["FAMILY", "cases", "providers", "measure", "run", "goal_report", "environment", "TorchWindow"]
