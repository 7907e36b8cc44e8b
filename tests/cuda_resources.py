#!/usr/bin/env python3
"""Per-kernel register / spill / shared-memory report of the CUDA sources, checked without a GPU.

    python tests/cuda_resources.py [--arch 80 90] [sources...]

Compiles each source (default: every csrc/cuda/*.cu) for each target architecture (default: 80 and
90, or KERNELKIT_CUDA_ARCHS as for setup.py) with the product build's device flags plus
`-Xptxas -v`, reads ptxas's per-function report and the launch bounds from the PTX of the same
compile, prints one table per architecture and exits 1 if any of these holds:
  (a) a function spills registers (spill stores or loads > 0 bytes);
  (b) a kernel's register count prevents its launch bounds (minBlocks CTAs of maxThreads threads
      do not fit on one SM), or, for a kernel without launch bounds, limits it to < 256 threads;
  (c) a kernel's static shared memory exceeds 48 KiB;
  (d) nvcc fails.
Exit 2: usage error or no nvcc.  Needs nvcc (and ptxas) only, no GPU and no driver.
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"

# ---- hardware limits ---------------------------------------------------------------------------
# Sources:
#  * CUDA C++ Programming Guide, "Compute Capabilities", table "Technical Specifications per Compute
#    Capability": 64K 32-bit registers per SM and per block, 255 registers per thread, max resident
#    warps per SM (64 on 8.0 / 9.0, 48 on 8.6 / 8.9), max resident blocks per SM (32 / 16 / 24 / 32),
#    1024 threads per block, and 48 KB of *static* shared memory per block (more needs dynamic
#    shared memory and an opt-in).
#  * The occupancy calculator's register rule, cudaOccMaxBlocksPerSMRegsLimit in the toolkit's
#    include/cuda_occupancy.h (the header-only CUDA occupancy calculator): registers are allocated
#    per warp in units of 256 (a per-thread count rounded up to a multiple of 8); the register file
#    is split over 4 SM sub-partitions, each holding floor(16384 / regs-per-warp) warps; a block is
#    launchable only if regs-per-warp x (its warps rounded up to a multiple of 4) <= 65536.
@dataclass(frozen=True)
class SmLimits:
    max_warps_per_sm: int
    max_blocks_per_sm: int
    regs_per_sm: int = 65536
    regs_per_block: int = 65536
    max_regs_per_thread: int = 255
    max_threads_per_block: int = 1024
    reg_alloc_unit: int = 256  # registers, per warp
    sub_partitions: int = 4
    max_static_smem: int = 48 * 1024


LIMITS = {
    80: SmLimits(max_warps_per_sm=64, max_blocks_per_sm=32),
    86: SmLimits(max_warps_per_sm=48, max_blocks_per_sm=16),
    89: SmLimits(max_warps_per_sm=48, max_blocks_per_sm=24),
    90: SmLimits(max_warps_per_sm=64, max_blocks_per_sm=32),
}
WARP = 32
MIN_UNBOUNDED_THREADS = 256  # a kernel without launch bounds must still run 256-thread blocks


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def blocks_per_sm(regs: int, threads: int, lim: SmLimits) -> tuple[int, int]:
    """(CTAs the register file holds, CTAs the warp and CTA slots hold) per SM for CTAs of `threads`
    threads; the resident count is the smaller (shared memory aside: its dynamic part is only known
    at launch).  0 registers-wise: the block cannot launch at all."""
    warps = -(-threads // WARP)
    by_slots = min(lim.max_warps_per_sm // warps, lim.max_blocks_per_sm)
    if threads > lim.max_threads_per_block:
        return 0, 0
    per_warp = _round_up(regs * WARP, lim.reg_alloc_unit)
    if per_warp == 0:
        return lim.max_blocks_per_sm, by_slots
    per_block = per_warp * _round_up(warps, lim.sub_partitions)
    if regs > lim.max_regs_per_thread or per_block > lim.regs_per_block:
        return 0, by_slots  # the hardware's per-block check assumes all sub-partitions are allocated
    warps_by_regs = (lim.regs_per_sm // lim.sub_partitions // per_warp) * lim.sub_partitions
    return warps_by_regs // warps, by_slots


def max_threads_for(regs: int, lim: SmLimits) -> int:
    """Largest block (a multiple of 32 threads) one SM can hold at this register count."""
    return max((t for t in range(WARP, lim.max_threads_per_block + 1, WARP)
                if min(blocks_per_sm(regs, t, lim)) >= 1), default=0)


# ---- the product build's device flags ------------------------------------------------------------
def find_nvcc() -> str | None:
    """Same search as setup.py's _find_nvcc."""
    cand = [os.environ.get("NVCC"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cand.append(os.path.join(home, "bin", "nvcc"))
    return next((c for c in cand if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def product_version() -> str:
    """setup.py's VERSION (it is a -D of the build), read without running setup.py."""
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                and any(getattr(t, "id", None) == "VERSION" for t in node.targets)):
            return str(node.value.value)
    return "0.0.0"


def nvcc_flags() -> list[str]:
    """Keep in step with setup.py BuildKernelkit._build_cuda (minus -gencode, set per arch here), so
    that the report describes the registers of the shipped SASS.  With -cubin the host flags are
    unused, but nvcc then drives cicc and ptxas exactly as for the product's -c (checked with
    -dryrun, nvcc 13.0)."""
    return ["-std=c++17", "-O3", "-Xcompiler", "-fPIC,-fvisibility=hidden", f"-I{CSRC / 'include'}",
            f"-I{CSRC / 'cpu'}", f'-DKERNELKIT_VERSION="{product_version()}"']


# ---- one compile -----------------------------------------------------------------------------------
@dataclass
class Func:
    mangled: str
    entry: bool = False
    regs: int = 0
    stack: int = 0
    spill_st: int = 0
    spill_ld: int = 0
    smem: int = 0
    cmem: int | None = None  # cmem[0] (kernel parameters); ptxas no longer prints it for sm_90
    max_threads: int | None = None  # .maxntid / .reqntid, as a thread count
    min_blocks: int | None = None  # .minnctapersm
    name: str = ""  # demangled, shortened


@dataclass
class Result:
    source: Path
    arch: int
    ok: bool
    funcs: dict[str, Func] = field(default_factory=dict)
    log: str = ""  # nvcc/ptxas output minus the per-function info lines
    seconds: float = 0.0


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_\w+'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_CMEM0 = re.compile(r"(\d+) bytes cmem\[0\]")
_INFO = re.compile(r"^ptxas info\s*:|^\s+\d+ bytes stack frame")


def parse_ptxas(text: str) -> dict[str, Func]:
    """ptxas -v: 'Function properties for F' and the frame/spill line below it describe F, entry or
    not (a non-inlined device function spills on its own); 'Used N registers ...' describes the
    entry being compiled."""
    funcs: dict[str, Func] = {}
    entry = props = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            entry = funcs.setdefault(m[1], Func(m[1]))
            entry.entry = True
        elif m := _PROPS.search(line):
            props = funcs.setdefault(m[1], Func(m[1]))
        elif (m := _FRAME.search(line)) and props is not None:
            props.stack, props.spill_st, props.spill_ld = (int(g) for g in m.groups())
        elif (m := _USED.search(line)) and entry is not None:
            entry.regs = int(m[1])
            entry.smem = int(s[1]) if (s := _SMEM.search(line)) else 0
            entry.cmem = int(c[1]) if (c := _CMEM0.search(line)) else None
    return funcs


# The directives between an entry's parameter list and its body; PTX parameter lists hold no ')'.
_PTX_ENTRY = re.compile(r"\.entry\s+([\w$.]+)\s*\([^)]*\)([^{]*)\{")


def parse_launch_bounds(ptx: str) -> dict[str, tuple[int | None, int | None]]:
    """{entry: (max threads, min blocks per SM)} from .maxntid/.reqntid and .minnctapersm, which
    ptxas -v does not print.  __launch_bounds__(T, M) becomes '.maxntid T, 1, 1' '.minnctapersm M'."""
    bounds = {}
    for m in _PTX_ENTRY.finditer(ptx):
        directives = m[2]
        threads = None
        if d := re.search(r"\.(?:maxntid|reqntid)\s+(\d+)(?:\s*,\s*(\d+))?(?:\s*,\s*(\d+))?",
                          directives):
            threads = 1
            for g in d.groups():
                threads *= int(g or 1)
        blocks = int(b[1]) if (b := re.search(r"\.minnctapersm\s+(\d+)", directives)) else None
        bounds[m[1]] = (threads, blocks)
    return bounds


def compile_one(nvcc: str, flags: list[str], source: Path, arch: int) -> Result:
    """One nvcc run for one source and arch: the cubin with ptxas -v, and (-keep) the PTX it was
    assembled from, so report and launch bounds come from the same compilation."""
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"kk_res_{arch}_") as tmp:
        cmd = [nvcc, *flags, "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-cubin",
               "-Xptxas", "-v", "-keep", "-keep-dir", tmp, "-o", os.path.join(tmp, "out.cubin"),
               str(source)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        text = proc.stdout
        res = Result(source, arch, proc.returncode == 0)
        res.log = "\n".join(l for l in text.splitlines() if not _INFO.search(l))
        if res.ok:
            res.funcs = parse_ptxas(text)
            bounds = {}
            for ptx in Path(tmp).glob("*.ptx"):
                bounds.update(parse_launch_bounds(ptx.read_text()))
            for f in res.funcs.values():
                f.max_threads, f.min_blocks = bounds.get(f.mangled, (None, None))
    res.seconds = time.monotonic() - t0
    return res


# ---- names -----------------------------------------------------------------------------------------
_ALIASES = [("(anonymous namespace)::", ""), ("__nv_bfloat16", "bf16"), ("__half", "half")]


def _strip_params(sig: str) -> str:
    """'void ns::k<int>(P, int*)' -> 'ns::k<int>': drop the trailing argument list and the return
    type (kernels are void; templates may nest parentheses, so match them)."""
    if sig.endswith(")"):
        depth = 0
        for i in range(len(sig) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(sig[i], 0)
            if depth == 0:
                sig = sig[:i]
                break
    return sig[5:] if sig.startswith("void ") else sig


def demangle(names: list[str]) -> dict[str, str]:
    """Short readable names; the mangled ones when no demangler is installed."""
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    out = names
    if tool and names:
        proc = subprocess.run([tool, *names], stdout=subprocess.PIPE, text=True)
        lines = proc.stdout.splitlines()
        if proc.returncode == 0 and len(lines) == len(names):
            out = lines
    short = {}
    for mangled, full in zip(names, out):
        for old, new in _ALIASES:
            full = full.replace(old, new)
        short[mangled] = _strip_params(full)
    return short


def _rel(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# ---- checks and report -----------------------------------------------------------------------------
@dataclass
class Row:
    func: Func
    cells: list[str]
    problems: list[str]  # messages for the FAIL lines
    kinds: set[str]  # which rules failed: "spill", "bounds", "smem"


def check(f: Func, lim: SmLimits) -> Row:
    problems, kinds = [], set()
    if f.spill_st or f.spill_ld:
        kinds.add("spill")
        at = f" at {f.regs} registers" if f.entry else " (device function)"
        problems.append(f"spills {f.spill_st} B stored / {f.spill_ld} B loaded{at}")
    fits, per_sm = "-", "-"
    if f.entry:
        if f.max_threads is not None:
            m = f.min_blocks or 1
            by_regs, by_slots = blocks_per_sm(f.regs, f.max_threads, lim)
            n = min(by_regs, by_slots)
            per_sm = str(n)
            fits = "yes" if n >= m else "NO"
            if n < m:  # ptxas could not honour the bounds (or ignored impossible ones, with a warning)
                kinds.add("bounds")
                problems.append(f"__launch_bounds__({f.max_threads}, {m}) cannot hold: an SM takes "
                                f"{by_regs} CTA(s) of {f.max_threads} threads by registers "
                                f"({f.regs}/thread), "
                                f"{by_slots} by its {lim.max_warps_per_sm} warp / "
                                f"{lim.max_blocks_per_sm} CTA slots")
        else:
            t = max_threads_for(f.regs, lim)
            fits = "yes" if t >= MIN_UNBOUNDED_THREADS else "NO"
            if t < MIN_UNBOUNDED_THREADS:
                kinds.add("bounds")
                problems.append(f"no __launch_bounds__ and {f.regs} registers allow only {t} threads "
                                f"per block (< {MIN_UNBOUNDED_THREADS})")
        if f.smem > lim.max_static_smem:
            kinds.add("smem")
            problems.append(f"{f.smem} B of static shared memory > {lim.max_static_smem} B")
    if f.max_threads is not None:
        threads, blocks = str(f.max_threads), str(f.min_blocks or 1)
    elif f.entry:
        threads, blocks = f"({max_threads_for(f.regs, lim)})", "-"
    else:
        threads, blocks = "device fn", "-"
    cells = [f.name, str(f.regs) if f.entry else "-", f"{f.spill_st}/{f.spill_ld}", str(f.stack),
             str(f.smem), "-" if f.cmem is None else str(f.cmem), threads, blocks, per_sm, fits]
    return Row(f, cells, problems, kinds)


HEADER = ["kernel", "regs", "spill st/ld B", "stack B", "smem B", "cmem0 B", "max thr", "min CTAs",
          "CTAs/SM", "fits"]


def print_table(arch: int, sections: list[tuple[Path, list[Row]]]) -> None:
    rows = [r.cells for _, rs in sections for r in rs]
    widths = [max(len(c) for c in col) for col in zip(HEADER, *rows)]

    def fmt(cells: list[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(padded).rstrip()

    print(f"\n== sm_{arch} ==")
    print(fmt(HEADER))
    print(fmt(["-" * w for w in widths]))
    for source, rs in sections:
        if len(sections) > 1:
            print(f"[{_rel(source)}]")
        for r in rs:
            print(fmt(r.cells))


def main(argv: list[str] | None = None) -> int:
    env_archs = os.environ.get("KERNELKIT_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="+", default=[a.strip() for a in env_archs if a.strip()],
                    help="compute capabilities, e.g. 80 90 (default: KERNELKIT_CUDA_ARCHS or 80 90)")
    ap.add_argument("sources", nargs="*", type=Path, help="CUDA sources (default: csrc/cuda/*.cu)")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="parallel nvcc runs")
    args = ap.parse_args(argv)
    # nargs="+" also swallows the sources in `--arch 80 90 a.cu`: what is not an arch is a source.
    arch_like = re.compile(r"(?:sm_)?(\d+)", re.I)
    archs = sorted({int(m[1]) for a in args.arch if (m := arch_like.fullmatch(str(a)))})
    args.sources[:0] = [Path(a) for a in args.arch if not arch_like.fullmatch(str(a))]
    if not archs:
        ap.error("--arch needs compute capabilities, e.g. --arch 80 90")
    if unknown := [a for a in archs if a not in LIMITS]:
        ap.error(f"no SM limits for sm_{unknown[0]}; add them to LIMITS (known: {sorted(LIMITS)})")
    sources = [s.resolve() for s in args.sources] or sorted((CSRC / "cuda").glob("*.cu"))
    if not sources:
        ap.error("no CUDA sources")
    if missing := [str(s) for s in sources if not s.is_file()]:
        ap.error(f"no such source: {', '.join(missing)}")
    nvcc = find_nvcc()
    if nvcc is None:
        print("cuda-resources: nvcc not found (set NVCC or CUDA_HOME)", file=sys.stderr)
        return 2

    t0 = time.monotonic()
    flags = nvcc_flags()
    print(f"cuda-resources: {nvcc} {' '.join(flags)} -gencode arch=compute_A,code=sm_A -cubin "
          "-Xptxas -v")
    jobs = [(s, a) for s in sources for a in archs]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(lambda j: compile_one(nvcc, flags, *j), jobs))

    names = demangle(sorted({m for r in results for m in r.funcs}))
    failures: list[str] = []
    counts = {"spill": 0, "bounds": 0, "smem": 0, "compile": 0}
    kernels = set()
    for arch in archs:
        sections = []
        for res in (r for r in results if r.arch == arch):
            rel = _rel(res.source)
            if res.log.strip():  # ptxas warnings, compile errors
                print(f"\n[{rel} sm_{arch}] nvcc said:\n{res.log.strip()}")
            if not res.ok:
                counts["compile"] += 1
                failures.append(f"sm_{arch} {rel}: nvcc failed")
                continue
            rows = []
            for f in res.funcs.values():
                f.name = names.get(f.mangled, f.mangled)
                if f.entry:
                    kernels.add((res.source, f.mangled))
                elif not (f.spill_st or f.spill_ld or f.stack):
                    continue  # a clean non-inlined device function: not worth a row
                rows.append(check(f, LIMITS[arch]))
            rows.sort(key=lambda r: _natural(r.func.name))
            for r in rows:
                for k in r.kinds:
                    counts[k] += 1
                failures += [f"sm_{arch} {r.func.name} ({rel.name}): {p}" for p in r.problems]
            sections.append((res.source, rows))
        if sections:
            print_table(arch, sections)
    print("\n(N) in 'max thr': no __launch_bounds__, the largest block its registers allow.  CTAs/SM: "
          "resident CTAs at 'max thr' allowed by registers and warp slots (shared memory aside).")
    print(f"compile time {time.monotonic() - t0:.1f} s "
          f"({', '.join(f'sm_{r.arch} {r.source.name} {r.seconds:.1f} s' for r in results)})")

    for msg in failures:  # stdout, so that CI logs keep them next to the tables
        print(f"FAIL {msg}")
    summary = (f"cuda-resources: {len(kernels)} kernels x {len(archs)} archs, {counts['spill']} spills, "
               f"{counts['bounds']} launch-bound violations")
    if counts["smem"]:
        summary += f", {counts['smem']} static smem > 48 KiB"
    if counts["compile"]:
        summary += f", {counts['compile']} failed compiles"
    print(summary)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
