#!/usr/bin/env python
"""Compile every Triton kernel variant the launchers can choose, ahead of time, for real GPU targets,
on a machine without a GPU; report registers, spills and shared memory; fail on a compile error or on
shared memory over the target's per-block limit.

    python tests/triton_aot.py [--arch 80 90] [--family monarch ...] [--jobs N] [--expect-triton 3.6.0]

Which variants: each kernels/<family>.py defines ``aot_sweep()``, which calls its own public launchers
on meta tensors (no memory, no GPU) over every dtype / flag and a shape sweep that reaches every tile
choice.  This script intercepts the kernel launches those calls make (``JITFunction.run``, and
``Autotuner.run`` so that every config of an autotuned kernel is recorded) instead of running them,
so the compiled set is exactly what the launchers pick.  A new family only adds its ``aot_sweep()``;
a kernels file without one fails the run rather than being skipped.

Specialization: a launch is compiled as Triton specializes it at run time (an int argument equal to 1
becomes constexpr 1, one divisible by 16 gets the divisibility hint, a pointer too when 16-byte
aligned), but merged over all the launches of the sweep that take the same call path with the same
configuration: an argument counts as 1 / 16-divisible only when it is so in every one of them, i.e.
when the launcher makes it so (literal unit strides, sizes rounded by the launcher) rather than one
particular shape.  That is the variant a real layer shape (multiples of 16) compiles; shapes with odd
sizes compile variants with fewer hints, not checked here.

Registers and spills come from the -v log of the ptxas (the one inside the Triton wheel) that Triton
runs on the kernel's PTX to build the cubin, printed through TRITON_DUMP_PTXAS_LOG.  A second ptxas -v
run of our own would not see Triton's options: under 3.9 (--regAllocOptLevel=2) its sm_90 register
counts differed from the cubin's in 9 of 337 kernels, and it reported spills the cubin does not have.
(metadata.n_regs / n_spills are only filled in when a GPU loads the kernel.)  Shared memory is
metadata.shared, the number Triton itself compares with the device's limit when it loads a kernel.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import importlib.util
import io
import multiprocessing
import os
import pathlib
import re
import subprocess
import sys
import time
import warnings

# The interpreter replaces @triton.jit functions and selects the interpreter's tile sizes, so it must
# be off before triton or a kernels module is imported (here and in every worker process).
os.environ.pop("TRITON_INTERPRET", None)
# Triton prints the -v log of the ptxas run that builds each cubin (read by _ptxas_log).
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

KERNELS_DIR = pathlib.Path(__file__).resolve().parents[1] / "kernels"
# ptxas logs of the kernels in Triton's cache (see _ptxas_log)
PTXAS_LOGS = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "kernelkit/triton-aot-ptxas"

# Maximum shared memory per thread block (dynamic, with the cudaFuncAttributeMaxDynamicSharedMemorySize
# opt-in that Triton's launcher makes), by compute capability.  Source: CUDA C++ Programming Guide,
# "Compute Capabilities", table "Technical Specifications per Compute Capability", row "Maximum amount
# of shared memory per thread block": 163 KB for 8.0 (A100), 99 KB for 8.6 / 8.9, 227 KB for 9.0
# (H100 / H200).  It is the device's max_shared_mem that Triton checks metadata.shared against.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

_OPTION_DEFAULTS = {"num_warps": 4, "num_stages": 3}   # Triton's CUDA defaults, shown in the table


# ----------------------------------------------------------------------------------------------------
# Recording the launches
# ----------------------------------------------------------------------------------------------------
def load_family(name: str):
    """kernels/<name>.py from this checkout (not an installed kernelkit, which may be older)."""
    path = KERNELS_DIR / f"{name}.py"
    modname = f"_triton_aot_kernels_{name}"
    if modname in sys.modules:
        return sys.modules[modname]
    spec = importlib.util.spec_from_file_location(modname, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod   # triton reads the kernels' source and globals through the module
    spec.loader.exec_module(mod)
    return mod


def families() -> list[str]:
    return sorted(p.stem for p in KERNELS_DIR.glob("*.py") if not p.stem.startswith("_"))


@dataclasses.dataclass
class _Launch:
    kernel: object            # JITFunction
    args: dict                # parameter name -> value, every parameter
    options: dict             # num_warps, num_stages, ...
    path: tuple               # (function, line) frames inside the family file: the call path


def record_launches(mod) -> tuple[list[_Launch], int]:
    """Run mod.aot_sweep() with every Triton launch recorded instead of executed."""
    from triton.runtime.jit import JITFunction
    launches: list[_Launch] = []
    family_file = os.path.realpath(mod.__file__)
    in_family: dict[str, bool] = {}   # code filename -> is the family file (realpath is slow)

    def record(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        bound = dict(zip(names, args))
        bound.update((k, v) for k, v in kwargs.items() if k in names)
        for p in self.params:
            if p.name not in bound and p.has_default:
                bound[p.name] = p.default
        options = {k: v for k, v in kwargs.items() if k not in names}
        frames, f = [], sys._getframe(1)
        while f is not None:
            fn = f.f_code.co_filename
            if fn not in in_family:
                in_family[fn] = os.path.realpath(fn) == family_file
            if in_family[fn]:
                frames.append((f.f_code.co_name, f.f_lineno))
            f = f.f_back
        launches.append(_Launch(self, bound, options, tuple(frames)))

    saved = [(JITFunction, "run", JITFunction.run)]
    JITFunction.run = record
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        Autotuner = None
    if Autotuner is not None:
        def every_config(self, *args, **kwargs):
            # the autotuner's pick depends on timings on the GPU, so any of its configs can run;
            # self.fn may be a Heuristics wrapper, which fills in its values and calls the kernel
            for cfg in self.configs:
                self.fn.run(*args, **{**kwargs, **cfg.all_kwargs()})
        saved.append((Autotuner, "run", Autotuner.run))
        Autotuner.run = every_config
    try:
        points = mod.aot_sweep()
    finally:
        for cls, attr, fn in saved:
            setattr(cls, attr, fn)
    return launches, points


# ----------------------------------------------------------------------------------------------------
# Launch -> compile spec (signature, constexprs, attrs), as Triton's launcher would specialize it
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Spec:
    family: str
    kernel: str
    signature: tuple          # ((param, type or "constexpr"), ...) in parameter order
    constexprs: tuple         # ((param, value), ...) of the kernel's constexpr parameters
    units: tuple              # int parameters specialized to constexpr 1
    divisible: tuple          # parameter indices with the 16-divisibility hint
    options: tuple            # ((name, value), ...)


def _classify(param, value, mangle_type):
    """(type, equals_one, divisible_by_16) of one runtime argument, by Triton's specialization rules
    (checked against its launcher's binder on 3.6 and 3.9: == 1 -> constexpr, % 16 -> "D")."""
    may_align = not getattr(param, "do_not_specialize_on_alignment", False)
    ann = getattr(param, "annotation_type", "")
    if isinstance(ann, str) and (ann == "u1" or ann[:2] in ("fp", "bf")) and not hasattr(value, "data_ptr"):
        return ann, False, False   # an annotated scalar (`reg: tl.float64`): its type, never specialized
    if hasattr(value, "data_ptr"):
        return mangle_type(value), False, may_align and value.data_ptr() % 16 == 0
    if type(value) is int and not param.do_not_specialize:
        return mangle_type(value), value == 1, may_align and value % 16 == 0
    return mangle_type(value), False, False


def _widest_int(types: set) -> str:
    """An int argument that needs 64 bits in some launches is compiled as Triton would for those."""
    if not types <= {"i32", "i64", "u64"}:
        raise TypeError(f"an argument is passed with different kinds of type: {sorted(types)}")
    return next(t for t in ("u64", "i64", "i32") if t in types)


def build_specs(family: str, launches: list[_Launch]) -> list[Spec]:
    """One Spec per distinct configuration; see the module docstring for how specializations of the
    same call path and configuration are merged."""
    from triton.runtime.jit import mangle_type   # Triton's own type names: "*bf16", "i32", "i64", ...
    groups: dict[tuple, list] = {}
    for ln in launches:
        params = ln.kernel.params
        config = tuple((p.name, repr(ln.args[p.name])) for p in params if p.is_constexpr)
        classes = [None if p.is_constexpr else _classify(p, ln.args[p.name], mangle_type) for p in params]
        ptr_types = tuple(c[0] for c in classes if c is not None and c[0].startswith("*"))
        key = (ln.kernel.__name__, ln.path, config, ptr_types, tuple(sorted(ln.options.items())))
        groups.setdefault(key, [ln.kernel, ln.args, ln.options, []])[3].append(classes)
    specs = set()
    for kernel, args, options, runs in groups.values():
        signature, constexprs, units, divisible = [], [], [], []
        for i, p in enumerate(kernel.params):
            if p.is_constexpr:
                signature.append((p.name, "constexpr"))
                constexprs.append((p.name, args[p.name]))
                continue
            seen = [run[i] for run in runs]
            if all(one for _, one, _ in seen):
                signature.append((p.name, "constexpr"))
                units.append(p.name)
                continue
            types = {t for t, _, _ in seen}
            if len(types) > 1:
                types = {_widest_int(types)}
            signature.append((p.name, types.pop()))
            if all(div for _, _, div in seen):
                divisible.append(i)
        opts = {**_OPTION_DEFAULTS, **options}
        specs.add(Spec(family, kernel.__name__, tuple(signature), tuple(constexprs), tuple(units),
                       tuple(divisible), tuple(sorted(opts.items()))))
    return sorted(specs, key=_sort_key)


def _sort_key(spec: Spec):
    return (spec.family, spec.kernel, _dtypes(spec), [str(v) for _, v in spec.constexprs], spec.units,
            spec.options)


# ----------------------------------------------------------------------------------------------------
# Compiling (in worker processes)
# ----------------------------------------------------------------------------------------------------
def _gpu_target(cap: int):
    try:
        from triton.backends.compiler import GPUTarget      # Triton >= 3.1 (3.6 .. 3.9 here)
    except ImportError:
        from triton.compiler.compiler import GPUTarget      # older layouts
    return GPUTarget("cuda", cap, 32)


def _ptxas(cap: int) -> tuple[str, str]:
    """(path, --gpu-name) of the ptxas Triton uses for `cap`: the one in its wheel (3.9 switches to its
    newer "ptxas-blackwell" from sm_90 on, 3.6 only from sm_100), and sm_90a for 9.0 (Triton emits
    Hopper-only instructions there)."""
    from triton.backends.nvidia import compiler as nv
    return nv.get_ptxas(cap).path, nv.sm_arch_from_capability(cap)


def _compile_logged(src, cap: int, options: dict):
    """triton.compile, plus the -v log of the ptxas run that built the cubin (TRITON_DUMP_PTXAS_LOG
    makes Triton print it; empty when the kernel came from Triton's cache)."""
    import triton
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        compiled = triton.compile(src, target=_gpu_target(cap), options=options)
    return compiled, out.getvalue()


def _ptxas_log(src, cap: int, options: dict):
    """(kernel, ptxas -v log), without giving up Triton's cache: a log is stored per compiled kernel
    (Triton's hash covers source, options, target and ptxas version), and a cached kernel without a
    stored log is compiled again."""
    compiled, log = _compile_logged(src, cap, options)
    stored = PTXAS_LOGS / f"{compiled.metadata.hash}.log"
    if _REGS.search(log) is None:
        if stored.exists():
            return compiled, stored.read_text()
        previous = os.environ.get("TRITON_ALWAYS_COMPILE")
        os.environ["TRITON_ALWAYS_COMPILE"] = "1"
        try:
            compiled, log = _compile_logged(src, cap, options)
        finally:
            if previous is None:
                del os.environ["TRITON_ALWAYS_COMPILE"]
            else:
                os.environ["TRITON_ALWAYS_COMPILE"] = previous
    PTXAS_LOGS.mkdir(parents=True, exist_ok=True)
    tmp = stored.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(log)
    tmp.replace(stored)   # atomic: workers may store the same kernel's log at once
    return compiled, log


_REGS = re.compile(r"Used (\d+) registers")


def _usage(log: str) -> dict:
    def grab(pattern):
        m = re.search(pattern, log)
        if m is None:
            raise RuntimeError(f"no {pattern!r} in the ptxas log:\n{log}")
        return int(m.group(1))
    return dict(regs=grab(_REGS), spill_stores=grab(r"(\d+) bytes spill stores"),
                spill_loads=grab(r"(\d+) bytes spill loads"), stack=grab(r"(\d+) bytes stack frame"))


def _find_kernel(mod, name: str):
    """The @triton.jit function `name` of a kernels module, also under autotune / heuristics wrappers."""
    from triton.runtime.jit import JITFunction
    for obj in vars(mod).values():
        while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
            obj = obj.fn
        if isinstance(obj, JITFunction) and obj.__name__ == name:
            return obj
    raise LookupError(f"no @triton.jit function {name} in {mod.__file__}")


def compile_one(job: tuple[Spec, int]) -> dict:
    spec, cap = job
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION")  # 3.9: same default as a launch
    try:
        from triton.compiler import ASTSource
        kernel = _find_kernel(load_family(spec.family), spec.kernel)
        src = ASTSource(kernel, dict(spec.signature), {**dict(spec.constexprs), **dict.fromkeys(spec.units, 1)},
                        {(i,): [["tt.divisibility", 16]] for i in spec.divisible})
        compiled, log = _ptxas_log(src, cap, dict(spec.options))
        return dict(shared=compiled.metadata.shared, **_usage(log))
    except Exception as e:  # reported per variant; the run fails at the end
        return dict(error=f"{type(e).__name__}: {e}"[-3000:])


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------
def _dtypes(spec: Spec) -> str:
    """Pointer element types, run-length encoded: "bf16x2,fp32"."""
    out = []
    for _, t in spec.signature:
        if t.startswith("*"):
            if out and out[-1][0] == t[1:]:
                out[-1][1] += 1
            else:
                out.append([t[1:], 1])
    return ",".join(t if n == 1 else f"{t}x{n}" for t, n in out)


def _config(spec: Spec) -> str:
    """The kernel's constexprs (flags only when set), then the arguments specialized to 1."""
    parts = [name if value is True else f"{name}={getattr(value, 'name', value)}"
             for name, value in spec.constexprs if value is not False and value is not None]
    if spec.units:
        parts.append(",".join(spec.units) + "=1")
    return " ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SMEM_LIMIT),
                    help="compute capabilities to compile for (default: 80 90)")
    ap.add_argument("--family", nargs="+", default=None, help=f"kernels/<family>.py (default: all: {families()})")
    ap.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="compile processes")
    ap.add_argument("--expect-triton", metavar="VERSION", help="fail unless this process imports this Triton")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    import triton
    print(f"triton {triton.__version__} ({os.path.dirname(triton.__file__)})")
    if args.expect_triton and triton.__version__ != args.expect_triton:
        print(f"ERROR: expected triton {args.expect_triton}, imported {triton.__version__}", file=sys.stderr)
        return 2
    for cap in args.arch:
        ptxas, gpu = _ptxas(cap)
        ver = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
        ver = re.search(r"release [\d.]+, V[\d.]+", ver)
        print(f"sm_{cap}: {gpu}, {os.path.basename(ptxas)} {ver.group(0) if ver else '?'}, "
              f"shared-memory limit {SMEM_LIMIT[cap]} bytes per block")

    specs, bad = [], 0
    for fam in args.family or families():
        if not (KERNELS_DIR / f"{fam}.py").exists():
            print(f"ERROR: no kernels/{fam}.py", file=sys.stderr)
            return 2
        mod = load_family(fam)
        if not hasattr(mod, "aot_sweep"):
            print(f"ERROR: kernels/{fam}.py has no aot_sweep(): its kernels would go unchecked", file=sys.stderr)
            bad += 1
            continue
        launches, points = record_launches(mod)
        fam_specs = build_specs(fam, launches)
        print(f"{fam}: {points} sweep points, {len(launches)} launches -> {len(fam_specs)} distinct kernel variants")
        if not fam_specs:
            print(f"ERROR: kernels/{fam}.py: aot_sweep() launched no kernel", file=sys.stderr)
            bad += 1
        specs += fam_specs

    jobs = [(s, cap) for cap in args.arch for s in specs]
    print(f"compiling {len(specs)} variants x {len(args.arch)} archs with {args.jobs} processes ...", flush=True)
    if args.jobs > 1:
        # spawn: a fresh interpreter per worker, nothing inherited from torch / triton state here
        with cf.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(compile_one, jobs, chunksize=4))
    else:
        results = [compile_one(j) for j in jobs]

    head = ("arch", "kernel", "config", "dtypes", "warps", "stages", "regs", "spill st/ld", "smem", "limit%")
    rows, failed, over, spills = [], [], [], []
    for (spec, cap), res in zip(jobs, results):
        opts = dict(spec.options)
        name = f"{spec.family}.{spec.kernel}" if len(args.family or families()) > 1 else spec.kernel
        what = f"sm_{cap} {name} [{_config(spec)}] {_dtypes(spec)} warps={opts['num_warps']}"
        if "error" in res:
            failed.append((what, res["error"]))
            rows.append((f"sm_{cap}", name, _config(spec), _dtypes(spec), opts["num_warps"], opts["num_stages"],
                         "-", "COMPILE FAILED", "-", "-"))
            continue
        regs = str(res["regs"])
        pct = 100.0 * res["shared"] / SMEM_LIMIT[cap]
        mark = ""
        if res["shared"] > SMEM_LIMIT[cap]:
            over.append(what)
            mark = " OVER"
        if res["spill_stores"] or res["spill_loads"]:
            spills.append(f"{what}: {res['spill_stores']} B spill stores, {res['spill_loads']} B spill loads, "
                          f"{res['stack']} B stack")
            mark += " SPILLS"
        rows.append((f"sm_{cap}", name, _config(spec), _dtypes(spec), opts["num_warps"], opts["num_stages"],
                     regs, f"{res['spill_stores']}/{res['spill_loads']}", res["shared"], f"{pct:.0f}%{mark}"))
    rows = [tuple(map(str, r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:{'>' if i >= 4 else '<'}{w}}}" for i, w in enumerate(widths))
    print(fmt.format(*head))
    for r in rows:
        print(fmt.format(*r))
    for s in spills:
        print(f"WARNING: spills: {s}")
    for w in over:
        print(f"ERROR: shared memory over the sm limit: {w}")
    for w, err in failed:
        print(f"ERROR: compile failed: {w}\n{err}")
    mins, secs = divmod(time.perf_counter() - t0, 60)
    print(f"triton-aot: {len(specs)} kernels x {len(args.arch)} archs compiled with triton {triton.__version__}, "
          f"{len(failed)} failed, {len(over)} over the shared-memory limit, {len(spills)} with spills "
          f"({int(mins)}m{secs:04.1f}s)")
    return 1 if failed or over or bad or not specs else 0


if __name__ == "__main__":
    sys.exit(main())
