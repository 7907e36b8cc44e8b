"""CLI: ``python -m kernelkit.bench [--family NAME[,NAME...]]... [--full | --quick] [--device cpu|cuda]
[--format table|md|csv] [--plot] [--out DIR] [--batch N] [--repeats N] [--warmup N] [--backends cpu,...]``.

With no argument: a short run of every family (monarch, sparse, vq, ot, mfac, rbf at small sizes, a
few minutes on a 2-core CPU), each family's table printed as it finishes, then a summary.  --family
picks families (repeat it or separate with commas; a named family runs its full sweep unless --quick
is given); --full runs the full sweeps (of every family, or of those named).  Each table has one line per
case: its parameters, the case's baseline, each provider's speed-up over that baseline (t_baseline / t,
same run, median times) and the speed goals it is checked against; on cuda a second table gives the
times.  Every measurement (times included) goes to ``<out>/<family>_<device>.csv`` (rewritten after
every measured group, so a killed run keeps its rows); --plot draws ``<out>/<family>_<device>.png``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import FAMILIES, _report

DEFAULT_REPEATS = {"cpu": 5, "cuda": 30}
DEFAULT_WARMUP = {"cpu": 1, "cuda": 5}


def _families(values: list[str] | None) -> list[str]:
    if not values:
        return list(FAMILIES)
    out = []
    for v in values:
        for name in v.split(","):
            name = name.strip()
            if not name:
                continue
            if name == "all":
                out += FAMILIES
            elif name not in FAMILIES:
                raise argparse.ArgumentTypeError(f"unknown family {name!r} (choose from {', '.join(FAMILIES)}, all)")
            else:
                out.append(name)
    return list(dict.fromkeys(out))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kernelkit.bench", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", action="append", metavar="NAME",
                   help=f"family to run: {', '.join(FAMILIES)} or all; repeat it or separate names with commas "
                   "(default: all, short sweep)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the full sweeps (the default when --family is given)")
    size.add_argument("--quick", action="store_true", help="the short sweeps (the default without --family; "
                      "monarch: batch 256, the first two shapes, nblocks 4; sparse: batch 256, 1024x4096 at "
                      "50/90/99%%; vq: 4096x4096 at batch 1/16/256 (AQLM up to 16); ot: n = 1000 at reg 1e-2; mfac: d = 1e5 m = 64 and d = 1e6 m = 256; rbf: N = 2^16, M = 1e4, k = 4 and 8)")
    size.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny cases, for the tests
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--format", choices=_report.FORMATS, default="table",
                   help="table: aligned text (default); md: GitHub markdown; csv: the tables as CSV on stdout "
                   "(with the times; everything else goes to stderr)")
    p.add_argument("--batch", type=int, help="batch rows per case (default: the family's, 4096 for monarch, 2048 for "
                   "sparse, 1/4/16/256/4096 for vq; ot: the problem size n, default 1000/2000/5000; mfac: the "
                   "gradient size d; rbf: the query points N)")
    p.add_argument("--repeats", type=int, help="timed calls per measurement; the median is reported "
                   f"(default {DEFAULT_REPEATS['cpu']} on cpu, {DEFAULT_REPEATS['cuda']} on cuda)")
    p.add_argument("--warmup", type=int, help="untimed calls first (default 1 on cpu, 5 on cuda)")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for the CSV/PNG (default ./bench-out)")
    p.add_argument("--plot", action="store_true", help="also write <out>/<family>_<device>.png: the speed-ups as "
                   "grouped bars, the machine and versions in the caption (needs matplotlib)")
    p.add_argument("--backends", help="comma-separated kernelkit backends to time (default: the device's "
                   "native ones: cpu on cpu, triton,cuda on cuda; add torch for the slow reference)")
    a = p.parse_args(argv)
    try:
        a.families = _families(a.family)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    a.sweep = ("smoke" if a.smoke else "full" if a.full else "short" if a.quick
               else "full" if a.family else "short")
    return a


def _duration(s: float) -> str:
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {s % 60:02.0f} s"


def _summary_line(fam, rows: list[dict], device: str, seconds: float) -> tuple[str, str, str, str, str]:
    """(family, cases, kernelkit's speed-up range, goals, time) for the summary table."""
    lines, providers = _report.case_lines(rows, fam.CASE_KEYS, fam.RATIOS)
    speed = []
    for p in providers:
        if not p.startswith("kernelkit_"):
            continue
        vals = [v for ln in lines if (v := ln.speedup(p)) is not None and p != ln.reference]
        if vals:
            refs = "/".join(dict.fromkeys(ln.reference for ln in lines if ln.speedup(p) is not None))
            lo, hi = min(vals), max(vals)
            speed.append(f"{p} {_report.fmt_ratio(lo)}-{_report.fmt_ratio(hi)}x vs {refs}")
            break  # the first kernelkit provider (the backend's main path)
    gs = fam.goals(rows, device)
    met = sum(1 for g in gs if g.rows and all(g.ok(r) for r in g.rows))
    measured = sum(1 for g in gs if g.rows)
    goals = f"{met}/{measured} met" + (f", {len(gs) - measured} not measured" if measured < len(gs) else "")
    return fam.FAMILY, str(len(lines)), speed[0] if speed else "-", goals if gs else "-", _duration(seconds)


def main(argv=None) -> int:
    a = parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # keep stdout and the stderr progress in order in logs
    text = sys.stderr if a.format == "csv" else sys.stdout   # csv: stdout carries the tables only

    def say(*parts):
        print(*parts, file=text, flush=True)

    if a.device == "cuda" and not torch.cuda.is_available():
        print("kernelkit.bench: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if a.plot and not _report.have_matplotlib():
        print("kernelkit.bench: --plot needs matplotlib, which is not installed: pip install matplotlib "
              "(or pip install \"kernelkit[bench]\" for it and the baselines)", file=sys.stderr)
        return 2
    repeats = a.repeats or DEFAULT_REPEATS[a.device]
    warmup = DEFAULT_WARMUP[a.device] if a.warmup is None else a.warmup
    backends = [b.strip() for b in a.backends.split(",") if b.strip()] if a.backends else None
    mods = {name: importlib.import_module(f"kernelkit.bench.{name}") for name in a.families}
    for name, fam in mods.items():  # validates --backends before any timing
        try:
            fam.providers(a.device, backends)
        except ValueError as e:
            print(f"kernelkit.bench: --backends: {e}", file=sys.stderr)
            return 2

    start = time.perf_counter()
    say(f"kernelkit bench: {', '.join(a.families)} on {a.device}, {a.sweep} sweep, repeats={repeats}, "
        f"warmup={warmup}  ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)")
    say("  " + _report.machine(a.device))
    say("  " + _report.versions())
    for line in mods[a.families[0]].environment(a.device)[1:]:
        say("  " + line)
    if a.sweep == "short":
        say("  short sweep: smaller sizes than the goals were set for, so the goal cells are indicative; "
            "--full (or --family NAME) runs the goals' own sizes")
    a.out.mkdir(parents=True, exist_ok=True)
    summary, failed, files = [], [], []
    for name, fam in mods.items():
        t0 = time.perf_counter()
        csv_path = a.out / f"{name}_{a.device}.csv"
        csv_columns = getattr(fam, "COLUMNS", _report.COLUMNS) + getattr(fam, "EXTRA", _report.EXTRA)
        say(f"\n== {name} on {a.device} ({a.sweep}) ==")
        skipped: dict = {}
        done = [0]

        def on_group(rows, csv_path=csv_path, csv_columns=csv_columns):
            new = rows[done[0]:]
            done[0] = len(rows)
            if new:
                print(f"  [{name} {new[0]['op']} {new[0]['shape']} {new[0]['dtype']}] "
                      + ", ".join(f"{r['provider']} " + (f"{r['median_ms']:.3f} ms" if r['median_ms'] is not None
                                                         else "not run") for r in new), file=sys.stderr, flush=True)
            _report.write_csv(rows, csv_path, csv_columns)

        try:
            rows = fam.run(a.device, quick=a.sweep == "short", batch=a.batch, repeats=repeats, warmup=warmup,
                           backends=backends, on_group=on_group, skipped=skipped, smoke=a.sweep == "smoke")
            _report.write_csv(rows, csv_path, csv_columns)
            goals = fam.goals(rows, a.device)
            tbl = _report.case_table(rows, fam.CASE_KEYS, fam.RATIOS, goals, fmt=a.format)
            if a.format == "csv":
                print(f"# kernelkit bench: {name} on {a.device}")
                print(tbl)
                print()
            else:
                say(tbl)
                if a.device == "cuda":
                    say("")
                    say(_report.case_table(rows, fam.CASE_KEYS, fam.RATIOS, None, fmt=a.format, times=True))
            for what, why in skipped.items():
                say(f"skipped {what}: {why}")
            for line in fam.notes(rows, a.device):
                say(line)
            say(f"CSV: {csv_path}")
            files.append(csv_path)
            if a.plot:
                cap = _report.caption(name, a.device, fam.BASELINE_LIBS,
                                      f"{a.sweep} sweep; bars: t_baseline / t of the median of {repeats} interleaved "
                                      f"calls, same run; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
                png = _report.plot(rows, a.out / f"{name}_{a.device}.png", fam.CASE_KEYS, fam.RATIOS,
                                   f"kernelkit {name} ({a.device})", cap)
                say(f"PNG: {png}")
                files.append(png)
            summary.append(_summary_line(fam, rows, a.device, time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001 - one family failing does not lose the others
            traceback.print_exc()
            failed.append(name)
            say(f"{name}: FAILED ({type(e).__name__}: {e}); see the traceback on stderr")
            summary.append((name, "-", f"FAILED: {type(e).__name__}", "-", _duration(time.perf_counter() - t0)))
    say(f"\n== summary: {a.device}, {a.sweep} sweep, {_duration(time.perf_counter() - start)} ==")
    head = ["family", "cases", "kernelkit speed-up (min-max over the cases)", "goals met", "time"]
    cells = [list(s) for s in summary]
    say(_report._md(head, cells, [False, True, False, False, True]) if a.format == "md"
        else _report._align(head, cells, [False, True, False, False, True]))
    if failed:
        say(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
