"""The sparse family's C ABI from outside torch: numpy through ctypes (fresh interpreter, no torch
import) and a C99 program compiled against the installed header and library, each once per CPU ISA
variant (KERNELKIT_CPU_ISA caps the variant the library dispatches to).  The AVX-512 variant's
tiling (64-byte vectors: 16/8 lanes, 64-row panels) also runs on CPUs without AVX-512, through a
test build of csrc/cpu/sparse.cpp with that vector width on AVX2."""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cabi_common import env_for, make_cabi_tests

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SPARSE_SYMBOLS = ("kk_sparse_check_csr", "kk_sparse_csr_transpose_cpu", "kk_sparse_linear_fwd_cpu",
                  "kk_sparse_linear_bwd_cpu")


(test_sparse_header_is_installed_and_symbols_exported, test_sparse_cabi_from_numpy_ctypes_without_torch,
 cabi_exe, test_sparse_cabi_from_a_c_program) = make_cabi_tests(
    "sparse", SPARSE_SYMBOLS, lambda n: "sparse" in n and not n.startswith("kk_sparse_"))


def _build_vec64_library() -> Path:
    """libkernelkit with the sparse kernels only, whose isa_avx2 slot is sparse.cpp compiled with
    KK_SPARSE_VEC_BYTES=64: the AVX-512 code path (GCC vector extensions lowered to AVX2 pairs).
    Cached by the content of its sources and flags (KERNELKIT_TEST_CACHE, default ~/.cache)."""
    cxx = os.environ.get("CXX", "g++")
    cpu = ROOT / "csrc" / "cpu"
    base = ["-std=c++17", "-O2", "-fPIC", "-fopenmp", "-fvisibility=hidden", f"-I{ROOT / 'csrc' / 'include'}",
            "-Wall", "-Wextra", "-Wno-psabi"]
    units = [("status.cpp", []), ("isa.cpp", []), ("sparse_api.cpp", []), ("sparse_convert.cpp", []),
             ("sparse.cpp", ["-DKK_ISA_NS=isa_base"]),
             ("sparse.cpp", ["-DKK_ISA_NS=isa_avx2", "-mavx2", "-mfma", "-DKK_SPARSE_VEC_BYTES=64"]),
             ("sparse.cpp", ["-DKK_ISA_NS=isa_avx512", "-mavx512f", "-mavx512dq", "-mavx2", "-mfma"])]
    h = hashlib.sha256(" ".join([cxx, *base, repr(units)]).encode())
    for f in sorted(cpu.glob("*")) + sorted((ROOT / "csrc" / "include" / "kernelkit").glob("*.h")):
        h.update(f.name.encode() + f.read_bytes())
    cache = Path(os.environ.get("KERNELKIT_TEST_CACHE", Path.home() / ".cache" / "kernelkit")) / "sparse_vec64"
    out = cache / h.hexdigest()[:16] / "libkernelkit.so"
    if out.exists():
        return out
    tmp = out.parent / f"tmp{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)

    def compile_one(i):
        src, flags = units[i]
        obj = tmp / f"{i}.o"
        subprocess.run([cxx, *base, *flags, "-c", str(cpu / src), "-o", str(obj)], check=True, capture_output=True,
                       text=True)
        return obj

    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        objs = list(pool.map(compile_one, range(len(units))))
    lib = tmp / "libkernelkit.so"
    subprocess.run([cxx, "-shared", *map(str, objs), "-fopenmp", "-o", str(lib)], check=True, capture_output=True,
                   text=True)
    os.replace(lib, out)  # atomic: a concurrent run sees a whole library or none
    shutil.rmtree(tmp, ignore_errors=True)
    return out


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 ISA variants only")
def test_sparse_cabi_with_the_avx512_tiling_on_avx2(tmp_path):
    if shutil.which(os.environ.get("CXX", "g++")) is None or shutil.which("gcc") is None:
        pytest.skip("g++/gcc not installed")
    if "avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("the emulation build runs with AVX2")
    lib = _build_vec64_library()
    exe = tmp_path / "cabi_sparse"
    subprocess.run(["gcc", "-std=c99", "-Wall", "-Werror", str(HERE / "cabi_sparse.c"), f"-I{ROOT / 'csrc' / 'include'}",
                    f"-L{lib.parent}", f"-Wl,-rpath,{lib.parent}", "-l:libkernelkit.so", "-lm", "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    env = env_for("avx2")  # the isa_avx2 slot holds the 64-byte-vector build
    proc = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stdout}{proc.stderr}"
    assert proc.stdout.strip().splitlines()[-1].split()[2] == "avx2", proc.stdout
    proc = subprocess.run([sys.executable, str(HERE / "cabi_sparse_numpy.py"), str(lib)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split()[:2] == ["ok", "avx2"], proc.stdout
