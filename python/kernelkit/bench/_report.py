"""Output of benchmark rows: aligned text table, CSV file, optional PNG bar chart.

A row is a dict with at least the keys of COLUMNS (a family module may define its own COLUMNS and
EXTRA, e.g. sparse's vs_csr instead of vs_bmm); ratios (vs_*) are t_baseline / t_provider (>1 = faster
than that baseline), None where the baseline was not measured.
"""
from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = ("family", "op", "shape", "dtype", "device", "provider", "median_ms", "vs_dense", "vs_bmm")
EXTRA = ("batch", "in_features", "out_features", "nblocks", "repeats")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if v < 100 else f"{v:.1f}"
    return str(v)


def table(rows: list[dict], columns=COLUMNS) -> str:
    """The rows as an aligned plain-text table (numbers right-aligned)."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
    numeric = [c in ("median_ms", "gflops", "of_floor") or c.startswith("vs_") for c in columns]

    def line(vals):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric)).rstrip()

    out = [line(list(columns)), line(["-" * w for w in widths])]
    out += [line(c) for c in cells]
    return "\n".join(out)


def write_csv(rows: list[dict], path: Path, columns=COLUMNS + EXTRA) -> Path:
    """Write rows (``columns``: a family's table columns then its extra keys) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return path


def plot(rows: list[dict], path: Path, baseline: str = "vs_bmm") -> Path | None:
    """Bar chart of each provider's speed-up over a baseline, one panel per (op, dtype).

    Returns the PNG path, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = sorted({(r["op"], r["dtype"]) for r in rows})
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)), squeeze=False)
    for ax, (op, dtype) in zip(axes[:, 0], panels):
        sel = [r for r in rows if r["op"] == op and r["dtype"] == dtype and r.get(baseline) is not None]
        shapes = list(dict.fromkeys(r["shape"] for r in sel))
        providers = list(dict.fromkeys(r["provider"] for r in sel))
        width = 0.8 / max(len(providers), 1)
        for j, prov in enumerate(providers):
            vals = {r["shape"]: r[baseline] for r in sel if r["provider"] == prov}
            xs = [i + j * width for i, s in enumerate(shapes) if s in vals]
            ax.bar(xs, [vals[s] for s in shapes if s in vals], width, label=prov)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylim(0, 1.3 * max([r[baseline] for r in sel] + [1.0]))   # headroom for the legend
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes, rotation=20, fontsize=8)
        ax.set_ylabel(f"speed-up {baseline.replace('vs_', 'vs ')}")
        ax.set_title(f"{op}, {dtype}")
        ax.legend(fontsize=7, ncol=len(providers))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
