"""Output of benchmark rows: the per-case table (aligned text, GitHub markdown or CSV), the CSV file of
every measurement, the grouped-bar PNG and its caption (machine and versions).

A row (one measurement) is a dict with at least family, op, shape, dtype, device, provider, median_ms
(a family module may add its own ratio columns vs_* and extra keys, see its COLUMNS and EXTRA).
A family module also says how its rows make a table:

    CASE_KEYS   the row keys that identify a case (the table's first columns), e.g. op, batch, ...
    RATIOS      {ratio key: baseline provider}, in order of preference: a case's reference baseline
                is the first of these that was measured on it
    BASELINE_LIBS   the distributions of its baselines (their versions go into the plot's caption)
    goals(rows, device) -> [Goal]   the speed goals the family checks (see Goal)

The table has one line per case: the case's parameters (those that are the same on every line are
printed once above the table instead), the reference baseline, one column per provider with its
speed-up t_reference / t_provider (> 1 = faster; the reference itself is 1.00), and the goals column.
Absolute times are printed on CUDA only (a second table); on CPU they are in the CSV files.
"""
from __future__ import annotations

import csv
import io
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path

COLUMNS = ("family", "op", "shape", "dtype", "device", "provider", "median_ms", "vs_dense", "vs_bmm")
EXTRA = ("batch", "in_features", "out_features", "nblocks", "repeats")
FORMATS = ("table", "md", "csv")


@dataclass
class Goal:
    """One speed goal: ``rows`` (the measurements it applies to) must each have ``row[key] >= goal``."""
    title: str
    key: str
    goal: float
    rows: list

    def ok(self, r: dict) -> bool:
        return r.get(self.key) is not None and r[self.key] >= self.goal

    def verdict(self) -> str:
        if not self.rows:
            return "not measured"
        n = sum(self.ok(r) for r in self.rows)
        return f"{'MET' if n == len(self.rows) else 'NOT MET'} ({n}/{len(self.rows)})"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if v < 100 else f"{v:.1f}"
    return str(v)


def fmt_ratio(v: float | None) -> str:
    """A speed-up with 3 significant digits (0.123, 1.23, 12.3, 123)."""
    if v is None or not math.isfinite(v):
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 0.1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if v < 0.1 else (f"{v:.3f}" if v < 100 else f"{v:.1f}")


def _fmt_param(v) -> str:
    """A case parameter: 65536 -> 2^16, 100000 -> 1e5 (from 10000 up), floats with 3 digits, bools yes/no."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, int) and v >= 10_000:
        if v & (v - 1) == 0:
            return f"2^{v.bit_length() - 1}"
        if v % 1000 == 0:
            return f"{v:.0e}".replace("e+0", "e").replace("e+", "e")
    return str(v)


# short names of case keys in the plot's group labels ("" = the value alone)
SHORT = {"in_features": "in", "out_features": "out", "nblocks": "nb", "sparsity": "s", "batch": "B",
         "format": "", "problem": "", "dtype": "", "blocked": "blocked", "block": "block"}


def _label(key: str, v) -> str:
    k = SHORT.get(key, key)
    return f"{k}={_fmt_param(v)}" if k else _fmt_param(v)


def table(rows: list[dict], columns=COLUMNS) -> str:
    """The rows as an aligned plain-text table, one line per measurement (numbers right-aligned)."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    return _align(list(columns), cells, [c in ("median_ms", "gflops", "of_floor") or c.startswith("vs_")
                                         for c in columns])


def _align(header: list[str], cells: list[list[str]], numeric: list[bool]) -> str:
    widths = [max([len(h)] + [len(line[i]) for line in cells]) for i, h in enumerate(header)]

    def line(vals):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(c) for c in cells])


def _md(header: list[str], cells: list[list[str]], numeric: list[bool]) -> str:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(esc(h) for h in header) + " |",
           "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    out += ["| " + " | ".join(esc(c) for c in line) + " |" for line in cells]
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


# -- the per-case view ---------------------------------------------------------------------------------

@dataclass
class CaseLine:
    """One case: its parameters, the measurements by provider, its reference baseline."""
    params: tuple
    by_provider: dict
    reference: str | None

    def speedup(self, provider: str) -> float | None:
        """t_reference / t_provider, None where either was not measured."""
        r, b = self.by_provider.get(provider), self.by_provider.get(self.reference)
        if r is None or b is None or not r.get("median_ms") or not b.get("median_ms"):
            return None
        return b["median_ms"] / r["median_ms"]


def case_lines(rows: list[dict], case_keys, ratios: dict) -> tuple[list[CaseLine], list[str]]:
    """(the cases in the order first measured, the providers in the order first measured)."""
    by_case: dict[tuple, dict] = {}
    for r in rows:
        by_case.setdefault(tuple(r.get(k) for k in case_keys), {})[r["provider"]] = r
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    out = []
    for params, by_prov in by_case.items():
        ref = next((b for b in ratios.values() if by_prov.get(b, {}).get("median_ms")), None)
        out.append(CaseLine(params, by_prov, ref))
    return out, providers


def _goal_cell(line: CaseLine, goals: list[Goal]) -> str:
    parts = []
    mine = {id(r) for r in line.by_provider.values()}
    for i, g in enumerate(goals, 1):
        sel = [r for r in g.rows if id(r) in mine]
        if sel:
            vals = "/".join(fmt_ratio(r.get(g.key)) for r in sel)
            parts.append(f"G{i} {vals} {'ok' if all(g.ok(r) for r in sel) else 'NO'}")
    return "; ".join(parts)


def case_table(rows: list[dict], case_keys, ratios: dict, goals: list[Goal] | None = None, *,
               fmt: str = "table", times: bool = False) -> str:
    """The one-line-per-case table of ``rows`` (one family, one device) in ``fmt`` (table, md, csv).

    Columns: the case keys that vary (those constant over all rows are in a line above the table, except
    in csv, which keeps every column), ``baseline`` (the case's reference), one speed-up column per
    provider, ``goals`` (G<i> <value> ok/NO for each goal that applies to the case; the legend follows the
    table).  ``times``: the median ms per provider instead of the speed-ups (csv has both, always).  Cells of a measurement with
    a note (e.g. a time that is a lower bound or an extrapolation) end in '*'; the notes follow the table."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    goals = goals or []
    lines, providers = case_lines(rows, case_keys, ratios)
    if not lines:
        return "(no measurements)"
    vary = [i for i, k in enumerate(case_keys) if fmt == "csv" or len({ln.params[i] for ln in lines}) > 1]
    if not vary:
        vary = [0]
    fixed = [f"{case_keys[i]}={_fmt_param(lines[0].params[i])}" for i in range(len(case_keys)) if i not in vary]
    with_times = times or fmt == "csv"
    with_ratios = not times or fmt == "csv"
    notes: list[str] = []

    def mark(r: dict | None, text: str) -> str:
        if r is not None and r.get("note") and ("lower bound" in r["note"] or "extrapolated" in r["note"]
                                                or "not run" in r["note"]):
            notes.append(f"{r['provider']} at {r['shape']}: {r['note']}")
            return text + "*"
        return text

    header = [case_keys[i] for i in vary] + ["baseline"]
    if with_ratios:
        header += [f"{p} x" if fmt == "csv" else p for p in providers]
    if with_times:
        header += [f"{p} ms" if fmt == "csv" else p for p in providers]
    header += ["goals"] if goals else []
    numeric = [False] * (len(vary) + 1) + [True] * (len(header) - len(vary) - 1 - bool(goals)) + [False] * bool(goals)
    cells = []
    for ln in lines:
        if fmt == "csv":   # the values as the CSV files have them
            row = ["" if ln.params[i] is None else str(ln.params[i]) for i in vary] + [ln.reference or ""]
        else:
            row = [_fmt_param(ln.params[i]) for i in vary] + [ln.reference or "-"]
        for p in providers if with_ratios else ():
            r = ln.by_provider.get(p)
            v = ln.speedup(p)
            if fmt == "csv":
                row.append("" if v is None else f"{v:.4g}")
            else:
                row.append(mark(r, fmt_ratio(v)) if r is not None else "")
        if with_times:
            for p in providers:
                r = ln.by_provider.get(p)
                t = None if r is None else r.get("median_ms")
                row.append(("" if t is None else f"{t:.6g}") if fmt == "csv" else mark(r, fmt_ms(t)) if r is not None else "")
        if goals:
            row.append(_goal_cell(ln, goals))
        cells.append(row)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(cells)
        return buf.getvalue().rstrip("\n")
    body = _md(header, cells, numeric) if fmt == "md" else _align(header, cells, numeric)
    pre = []
    if fixed:
        pre.append(("all cases: " if fmt == "table" else "All cases: ") + ", ".join(fixed))
    what = ("median time per call, ms" if times else
            "speed-up t_baseline / t (> 1 = faster than the case's baseline, same run, median times)")
    pre.append(what if fmt == "table" else f"*{what}*")
    post = []
    for i, g in enumerate(goals, 1):
        post.append(f"G{i}: {g.title} [{g.key} >= {g.goal:.3g}]: {g.verdict()}")
    for n in dict.fromkeys(notes):
        post.append(f"* {n}")
    sep = "\n\n" if fmt == "md" else "\n"
    if fmt == "md":
        post = [f"- {p}" for p in post]
    return sep.join(pre) + "\n" + body + ("\n" + ("\n" if fmt == "md" else "") + "\n".join(post) if post else "")


# -- machine and versions ------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(dist: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine(device: str) -> str:
    """'<CPU model>, <n> cores (torch <t> threads)' plus the GPU on cuda."""
    import torch
    s = f"{cpu_model()}, {os.cpu_count()} cores (torch {torch.get_num_threads()} threads)"
    if device == "cuda":
        s = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}); host {s}"
    return s


def versions(libs=()) -> str:
    """'Python x, torch y, triton z, kernelkit v[, <baseline lib> w ...]' (triton: where installed)."""
    import torch

    import kernelkit
    out = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    tv = _version("triton")
    if tv:
        out.append(f"triton {tv}")
    out.append(f"kernelkit {kernelkit.__version__}")
    for lib in libs:
        v = _version(lib)
        out.append(f"{lib} {v}" if v else f"{lib} (not installed)")
    return ", ".join(out)


def caption(family: str, device: str, libs=(), extra: str = "") -> str:
    return (f"kernelkit bench, {family} on {device}: {machine(device)}\n{versions(libs)}"
            + (f"\n{extra}" if extra else ""))


# -- the plot ------------------------------------------------------------------------------------------

def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(rows: list[dict], path: Path, case_keys, ratios: dict, title: str, caption_text: str) -> Path:
    """Grouped bars of the speed-ups: one panel per op, a group per case, a bar per provider (the case's
    reference baseline is the line at 1); log y-axis where the values span more than 20x.  Raises
    ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines, providers = case_lines(rows, case_keys, ratios)
    op_i = list(case_keys).index("op") if "op" in case_keys else None
    ops = list(dict.fromkeys(ln.params[op_i] for ln in lines)) if op_i is not None else [None]
    vary = [i for i, k in enumerate(case_keys) if i != op_i and len({ln.params[i] for ln in lines}) > 1]
    fixed = [_label(k, lines[0].params[i]) if SHORT.get(k, k) else f"{k}={_fmt_param(lines[0].params[i])}"
             for i, k in enumerate(case_keys) if i != op_i and i not in vary] if lines else []
    colors = {p: f"C{i % 10}" for i, p in enumerate(providers)}
    panels = []
    for op in ops:
        sel = [ln for ln in lines if op_i is None or ln.params[op_i] == op]
        provs = [p for p in providers if any(ln.speedup(p) is not None and p != ln.reference for ln in sel)]
        if provs:
            panels.append((op, sel, provs))
    ncases = max([len(sel) for _, sel, _ in panels] + [1])
    nb = max([len(p) for _, _, p in panels] + [1])
    fig, axes = plt.subplots(max(len(panels), 1), 1, squeeze=False,
                             figsize=(max(7.0, 1.6 + ncases * (0.25 * nb + 0.5)), 2.6 * max(len(panels), 1) + 1.0))
    handles = {}
    for ax, (op, sel, provs) in zip(axes[:, 0], panels):
        width = 0.8 / len(provs)
        vals = [v for ln in sel for p in provs if (v := ln.speedup(p))]
        for j, p in enumerate(provs):
            xs, ys = [], []
            for i, ln in enumerate(sel):
                v = ln.speedup(p)
                if v is not None and p != ln.reference:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(v)
            handles[p] = ax.bar(xs, ys, width, color=colors[p], label=p)
        ax.axhline(1.0, color="k", lw=0.9)
        ax.annotate(" = 1: " + " / ".join(dict.fromkeys(ln.reference for ln in sel if ln.reference)), (1.0, 1.0),
                    xycoords=("axes fraction", "data"), fontsize=6.5, va="center", ha="left", annotation_clip=False)
        lo, hi = min(vals + [1.0]), max(vals + [1.0])
        if hi / lo > 20:
            ax.set_yscale("log")
            ax.set_ylim(lo / 1.6, hi * 2.5)
        else:
            ax.set_ylim(0, hi * 1.25)
        labels = ["\n".join(_label(case_keys[i], ln.params[i]) for i in vary) or "-" for ln in sel]
        ax.set_xticks(range(len(sel)), labels, fontsize=7)
        refs = list(dict.fromkeys(ln.reference for ln in sel if ln.reference))
        ax.set_ylabel("speed-up vs\n" + " / ".join(refs), fontsize=8)
        ax.set_title(f"{title}: {op}" if op is not None else title, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3, which="both")
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=min(len(handles), 4),
                   fontsize=7, frameon=False)
    if fixed:
        caption_text = f"all cases: {', '.join(fixed)}\n{caption_text}"
    h = fig.get_figheight()
    fig.tight_layout(rect=(0, (0.15 + 0.12 * caption_text.count(chr(10))) / h, 0.9, 1 - 0.3 / h))
    fig.text(0.01, 0.01, caption_text, fontsize=6.5, va="bottom", ha="left", family="monospace")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def goal_report(goals_fn, notes_fn, goal_lines, rows: list[dict], device: str) -> list[str]:
    """A family's goal check as text: ``goal_lines(rows, title, key, goal)`` for each of
    ``goals_fn(rows, device)``, then ``notes_fn(rows, device)`` (each family's ``goal_report``)."""
    out = []
    for g in goals_fn(rows, device):
        out += goal_lines(g.rows, g.title, g.key, g.goal)
    return out + notes_fn(rows, device)
