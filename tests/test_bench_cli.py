"""The bench CLI (python -m kernelkit.bench): the one-line-per-case table in its three formats, the CSV
files of every measurement, the PNGs, the family and sweep selection.  The CLI runs in-process on the
hidden --smoke sizes (tiny cases, no floors); every speed-up printed is checked against the times in the
CSV file the same run wrote."""
from __future__ import annotations

import contextlib
import csv
import io
import math
from pathlib import Path

import pytest

from kernelkit.bench import FAMILIES, _report
from kernelkit.bench import __main__ as cli

FAMS = {name: __import__(f"kernelkit.bench.{name}", fromlist=["x"]) for name in FAMILIES}


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def smoke_all(tmp_path_factory):
    """Every family, default (table) format, with --plot: (rc, stdout, stderr, out dir)."""
    out = tmp_path_factory.mktemp("bench")
    rc, so, se = _run(["--smoke", "--device", "cpu", "--repeats", "2", "--warmup", "1", "--out", str(out)]
                      + (["--plot"] if _report.have_matplotlib() else []))
    return rc, so, se, out


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cases(rows: list[dict], keys) -> list[tuple[tuple, dict]]:
    """The CSV rows grouped by case, in the order first measured: [(case values, {provider: row})]."""
    out: dict = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), {})[r["provider"]] = r
    return list(out.items())


def _section(text: str, family: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"== {family} on cpu"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("== ")), len(lines))
    return lines[start + 1:end]


def _parse_aligned(sec: list[str]) -> tuple[list[str], list[list[str]]]:
    """The aligned table of a section: columns cut at the spans of the dashes line."""
    d = next(i for i, ln in enumerate(sec) if ln.startswith("---"))
    spans, pos = [], 0
    for part in sec[d].split("  "):
        if part:
            spans.append((pos, pos + len(part)))
        pos += len(part) + 2
    body = []
    for ln in sec[d + 1:]:
        if not ln.strip() or ln.startswith(("G", "* ", "skipped", "CSV:", "PNG:", "solves", "agreement", "Break",
                                            "aqlm", "    ", "note")):
            break
        body.append([ln[a:b].strip() if i < len(spans) - 1 else ln[a:].strip() for i, (a, b) in enumerate(spans)])
    return [sec[d - 1][a:b].strip() for a, b in spans], body


def _expected_cell(case: dict, ref: str, prov: str) -> str:
    if prov not in case:
        return ""
    t, t0 = case[prov]["median_ms"], case[ref]["median_ms"]
    return _report.fmt_ratio(float(t0) / float(t)) if t and t0 else "-"


def test_default_run_every_family_table_and_summary(smoke_all):
    rc, so, se, out = smoke_all
    assert rc == 0, se[-3000:]
    for name, fam in FAMS.items():
        rows = _read_csv(out / f"{name}_cpu.csv")
        cases = _cases(rows, fam.CASE_KEYS)
        header, body = _parse_aligned(_section(so, name))
        provs = list(dict.fromkeys(r["provider"] for r in rows))
        assert len(body) == len(cases), (name, body)
        assert header[header.index("baseline") + 1:header.index("baseline") + 1 + len(provs)] == provs
        for line, (_, case) in zip(body, cases):
            cell = dict(zip(header, line))
            ref = next(b for b in fam.RATIOS.values() if b in case and case[b]["median_ms"])
            assert cell["baseline"] == ref
            assert cell[ref].rstrip("*") == "1.00"
            for p in provs:
                assert cell[p].rstrip("*") == _expected_cell(case, ref, p), (name, p, line)
    summary = so[so.index("== summary: cpu, smoke sweep"):].splitlines()
    assert [ln.split()[0] for ln in summary[3:3 + len(FAMILIES)]] == list(FAMILIES)
    assert "FAILED" not in so


def test_goal_column_matches_the_family_goals(smoke_all):
    rc, so, _, out = smoke_all
    rows = _read_csv(out / "monarch_cpu.csv")
    header, body = _parse_aligned(_section(so, "monarch"))
    kk = {r["op"] + r["in_features"] + r["out_features"]: float(r["vs_bmm"]) for r in rows
          if r["provider"] == "kernelkit_cpu"}
    gi = header.index("goals")
    n = 0
    for line, (_, case) in zip(body, _cases(rows, FAMS["monarch"].CASE_KEYS)):
        r = case["kernelkit_cpu"]
        if r["op"] == "fwd+bwd":   # the CPU goal: kernelkit_cpu fwd+bwd >= 1.3x vs bmm
            v = kk[r["op"] + r["in_features"] + r["out_features"]]
            assert line[gi] == f"G1 {_report.fmt_ratio(v)} {'ok' if v >= 1.3 else 'NO'}"
            n += 1
        else:
            assert line[gi] == ""
    assert n == 2
    assert any(ln.startswith("G1: Goal (CPU): kernelkit_cpu fwd+bwd >= 1.3x") for ln in _section(so, "monarch"))


def test_csv_files_keep_every_measurement(smoke_all):
    _, _, _, out = smoke_all
    for name, fam in FAMS.items():
        rows = _read_csv(out / f"{name}_cpu.csv")
        assert rows and set(getattr(fam, "COLUMNS", _report.COLUMNS) + getattr(fam, "EXTRA", _report.EXTRA)) <= set(rows[0])
        for case_vals, case in _cases(rows, fam.CASE_KEYS):
            for prov, r in case.items():
                if not r["median_ms"]:
                    continue
                assert float(r["median_ms"]) > 0
                for key, base in fam.RATIOS.items():   # the family's own ratios agree with the times
                    if r.get(key) and base in case and case[base]["median_ms"]:
                        want = float(case[base]["median_ms"]) / float(r["median_ms"])
                        assert math.isclose(float(r[key]), want, rel_tol=1e-9), (name, prov, key)


@pytest.mark.skipif(not _report.have_matplotlib(), reason="matplotlib is not installed")
def test_plot_writes_one_png_per_family(smoke_all):
    import matplotlib.image as mpimg
    rc, so, _, out = smoke_all
    for name in FAMILIES:
        png = out / f"{name}_cpu.png"
        assert png.stat().st_size > 10_000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(png)
        assert img.shape[0] > 300 and img.shape[1] > 600
        assert img[..., :3].std() > 0.05   # not a blank canvas
        assert f"PNG: {png}" in so


def test_caption_names_machine_and_versions():
    import platform

    import torch
    cap = _report.caption("ot", "cpu", FAMS["ot"].BASELINE_LIBS)
    assert _report.cpu_model() in cap and f"torch {torch.__version__}" in cap
    assert f"Python {platform.python_version()}" in cap and "kernelkit " in cap
    assert "pot " in cap and "regot " in cap


def test_markdown_format(tmp_path):
    rc, so, se = _run(["--smoke", "--family", "monarch,mfac", "--format", "md", "--repeats", "1",
                       "--out", str(tmp_path)])
    assert rc == 0, se[-2000:]
    for name in ("monarch", "mfac"):
        rows = _read_csv(tmp_path / f"{name}_cpu.csv")
        tbl = [ln for ln in _section(so, name) if ln.startswith("|")]
        ncol = tbl[0].count("|")
        assert all(ln.count("|") == ncol for ln in tbl)
        assert set(tbl[1].strip("|").split("|")) <= {"---", "---:"}
        assert len(tbl) - 2 == len(_cases(rows, FAMS[name].CASE_KEYS))
        header = [c.strip() for c in tbl[0].strip("|").split("|")]
        for line, (_, case) in zip(tbl[2:], _cases(rows, FAMS[name].CASE_KEYS)):
            cell = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
            ref = cell["baseline"]
            for p in case:
                assert cell[p].rstrip("*") == _expected_cell(case, ref, p)
    assert "| family | cases |" in so


def test_csv_format_on_stdout(tmp_path):
    rc, so, se = _run(["--smoke", "--family", "monarch", "--family", "rbf", "--format", "csv", "--repeats", "1",
                       "--out", str(tmp_path)])
    assert rc == 0, se[-2000:]
    blocks = [b for b in so.split("# kernelkit bench: ")[1:]]
    assert [b.split()[0] for b in blocks] == ["monarch", "rbf"]
    assert "== summary" in se and "== summary" not in so   # the text goes to stderr
    for b in blocks:
        name = b.split()[0]
        table = list(csv.DictReader(io.StringIO(b.split("\n", 1)[1].strip())))
        rows = _read_csv(tmp_path / f"{name}_cpu.csv")
        cases = _cases(rows, FAMS[name].CASE_KEYS)
        assert len(table) == len(cases)
        for t, (vals, case) in zip(table, cases):
            assert tuple(t[k] for k in FAMS[name].CASE_KEYS) == vals
            for p, r in case.items():
                assert math.isclose(float(t[f"{p} ms"]), float(r["median_ms"]), rel_tol=1e-5)
                want = float(case[t["baseline"]]["median_ms"]) / float(r["median_ms"])
                assert math.isclose(float(t[f"{p} x"]), want, rel_tol=1e-3)


def test_plot_without_matplotlib_exits_clearly(monkeypatch, tmp_path):
    monkeypatch.setattr(_report, "have_matplotlib", lambda: False)
    rc, so, se = _run(["--smoke", "--family", "monarch", "--plot", "--out", str(tmp_path)])
    assert rc == 2 and "--plot needs matplotlib" in se and not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv, families, sweep", [
    ([], list(FAMILIES), "short"),
    (["--quick"], list(FAMILIES), "short"),
    (["--full"], list(FAMILIES), "full"),
    (["--family", "sparse"], ["sparse"], "full"),              # as before: a named family runs its sweep
    (["--family", "sparse", "--quick"], ["sparse"], "short"),
    (["--family", "vq,ot", "--family", "monarch", "--full"], ["vq", "ot", "monarch"], "full"),
    (["--family", "all", "--quick"], list(FAMILIES), "short"),
])
def test_family_and_sweep_selection(argv, families, sweep):
    a = cli.parse_args(argv)
    assert (a.families, a.sweep) == (families, sweep)


def test_bad_arguments_fail():
    for argv in (["--family", "nope"], ["--full", "--quick"], ["--format", "xml"]):
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            cli.parse_args(argv)


def test_case_table_layout_synthetic():
    rows = [dict(op=op, n=n, provider=p, shape=f"n={n}", median_ms=t * n, note=note)
            for op in ("a", "b") for n in (1, 2)
            for p, t, note in (("base", 6.0, ""), ("kk", 2.0, ""), ("other", 3.0, "extrapolated: x"))]
    g = _report.Goal("kk fast", "x", 2.5, [])
    txt = _report.case_table(rows, ("op", "n"), {"vs_base": "base"}, [g])
    lines = txt.splitlines()
    assert lines[1].split() == ["op", "n", "baseline", "base", "kk", "other", "goals"]
    assert lines[3].split() == ["a", "1", "base", "1.00", "3.00", "2.00*"]
    assert "G1: kk fast [x >= 2.5]: not measured" in txt and "* other at n=1: extrapolated: x" in txt
    assert _report.case_table(rows, ("op", "n"), {"vs_base": "base"}, times=True).splitlines()[3].split() == \
        ["a", "1", "base", "6.000", "2.000", "3.000*"]
