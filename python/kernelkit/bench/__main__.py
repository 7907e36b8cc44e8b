"""CLI: ``python -m kernelkit.bench [--family monarch] [--device cpu|cuda] [--quick] [--batch N]
[--repeats N] [--warmup N] [--out DIR] [--plot] [--backends cpu,torch,...]``.

Prints the environment, progress (stderr), then the aligned results table and the goal check; writes
``<out>/<family>_<device>.csv`` (rewritten after every measured group, so a killed run keeps its
rows) and with --plot ``<out>/<family>_<device>.png``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from . import FAMILIES, _report

DEFAULT_REPEATS = {"cpu": 5, "cuda": 30}
DEFAULT_WARMUP = {"cpu": 1, "cuda": 5}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kernelkit.bench", description=__doc__.split("\n\n")[1])
    p.add_argument("--family", choices=FAMILIES, default="monarch")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny run (monarch: batch 256, first two shapes, "
                   "nblocks 4; sparse: batch 256, 1024x4096 at 50/90/99%%; vq: 4096x4096 at batch 1/16/256; ot: n = 1000; mfac: d = 1e5 m = 64 and d = 1e6 m = 256; rbf: N = 2^16, M = 1e4, k = 4 and 8)")
    p.add_argument("--batch", type=int, help="batch rows per case (default: the family's, 4096 for monarch, 2048 for sparse, "
                   "1/4/16/256/4096 for vq; ot: the problem size n, default 1000/2000/5000; mfac: the gradient size d; rbf: the query points N)")
    p.add_argument("--repeats", type=int, help="timed calls per measurement; the median is reported "
                   f"(default {DEFAULT_REPEATS['cpu']} on cpu, {DEFAULT_REPEATS['cuda']} on cuda)")
    p.add_argument("--warmup", type=int, help="untimed calls first (default 1 on cpu, 5 on cuda)")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for the CSV/PNG (default ./bench-out)")
    p.add_argument("--plot", action="store_true", help="also write a PNG of the speed-ups vs the bmm baseline")
    p.add_argument("--backends", help="comma-separated kernelkit backends to time (default: the device's "
                   "native ones: cpu on cpu, triton,cuda on cuda; add torch for the slow reference)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # keep stdout and the stderr progress in order in logs
    if a.device == "cuda" and not torch.cuda.is_available():
        print("kernelkit.bench: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    fam = importlib.import_module(f"kernelkit.bench.{a.family}")
    repeats = a.repeats or DEFAULT_REPEATS[a.device]
    warmup = DEFAULT_WARMUP[a.device] if a.warmup is None else a.warmup
    backends = [b.strip() for b in a.backends.split(",") if b.strip()] if a.backends else None
    csv_path = a.out / f"{a.family}_{a.device}.csv"
    columns = getattr(fam, "COLUMNS", _report.COLUMNS)
    csv_columns = columns + getattr(fam, "EXTRA", _report.EXTRA)

    print(f"kernelkit bench: {a.family} on {a.device}, repeats={repeats}, warmup={warmup}"
          f"{', quick' if a.quick else ''}")
    for line in fam.environment(a.device):
        print("  " + line)
    skipped: dict = {}
    try:
        fam.providers(a.device, backends)  # validates --backends before any timing
    except ValueError as e:
        print(f"kernelkit.bench: --backends: {e}", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    done = [0]

    def on_group(rows):
        new = rows[done[0]:]
        done[0] = len(rows)
        if new:
            print(f"  [{new[0]['op']} {new[0]['shape']} {new[0]['dtype']}] "
                  + ", ".join(f"{r['provider']} " + (f"{r['median_ms']:.3f} ms" if r['median_ms'] is not None else "not run")
                             for r in new), file=sys.stderr, flush=True)
        _report.write_csv(rows, csv_path, csv_columns)

    rows = fam.run(a.device, quick=a.quick, batch=a.batch, repeats=repeats, warmup=warmup,
                   backends=backends, on_group=on_group, skipped=skipped)
    print(f"\n== kernelkit bench results: {a.family} on {a.device} ==")
    print(_report.table(rows, columns))
    for what, why in skipped.items():
        print(f"skipped {what}: {why}")
    print()
    for line in fam.goal_report(rows, a.device):
        print(line)
    print(f"\nCSV: {_report.write_csv(rows, csv_path, csv_columns)}")
    if a.plot:
        png = _report.plot(rows, a.out / f"{a.family}_{a.device}.png", getattr(fam, "PLOT_BASELINE", "vs_bmm"))
        print(f"PNG: {png}" if png else "PNG: not written (matplotlib is not installed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
