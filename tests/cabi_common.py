"""What every family's C-ABI test file shares: the header and exported symbols, the numpy/ctypes script
(tests/cabi_<family>_numpy.py, a fresh interpreter without torch) and the C99 program
(tests/cabi_<family>.c, compiled against the installed header and library), each once per CPU ISA
variant (KERNELKIT_CPU_ISA caps the variant the library dispatches to).

    (test_header, test_numpy, cabi_exe, test_c_program) = make_cabi_tests("vq", SYMBOLS, is_private)

in a test module defines the four (pytest collects them by the names bound there; the fixture must be
bound as `cabi_exe`, the name the C-program test asks for)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable

import pytest

import kernelkit

HERE = Path(__file__).resolve().parent
ISAS = ("base", "avx2", "avx512")


def env_for(isa: str) -> dict:
    return dict(os.environ, KERNELKIT_CPU_ISA=isa)


def check_isa(reported: str, requested: str) -> None:
    """The library runs the requested variant or, on a CPU without it, a lower one."""
    assert reported in ISAS, reported
    assert ISAS.index(reported) <= ISAS.index(requested), (reported, requested)
    if requested == "base":
        assert reported == "base"


def make_cabi_tests(family: str, symbols: Iterable[str], is_private: Callable[[str], bool]):
    symbols = tuple(symbols)

    def test_header(_family=family):
        assert (Path(kernelkit.get_include()) / "kernelkit" / f"{family}.h").is_file()
        if shutil.which("nm") is None:
            pytest.skip("nm not installed")
        out = subprocess.run(["nm", "-D", "--defined-only", kernelkit.get_library()], capture_output=True, text=True,
                             check=True).stdout
        names = {line.split()[-1] for line in out.splitlines() if line.strip()}
        for sym in symbols:
            assert sym in names, f"{sym} not exported"
        # only the C ABI is visible: the per-ISA kernels and the checks stay hidden
        assert not [n for n in names if is_private(n)]

    @pytest.mark.parametrize("isa", ISAS)
    def test_numpy(isa):
        proc = subprocess.run([sys.executable, str(HERE / f"cabi_{family}_numpy.py"), kernelkit.get_library()],
                              capture_output=True, text=True, env=env_for(isa), timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        words = proc.stdout.split()
        assert words[0] == "ok", proc.stdout
        check_isa(words[1], isa)

    @pytest.fixture(scope="module")
    def cabi_exe(tmp_path_factory):
        if shutil.which("gcc") is None:
            pytest.skip("gcc not installed")
        lib = Path(kernelkit.get_library())
        exe = tmp_path_factory.mktemp("cabi") / f"cabi_{family}"
        subprocess.run(["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", str(HERE / f"cabi_{family}.c"),
                        f"-I{kernelkit.get_include()}", f"-L{lib.parent}", f"-Wl,-rpath,{lib.parent}",
                        f"-l:{lib.name}", "-lm", "-o", str(exe)], check=True, capture_output=True, text=True)
        return exe

    @pytest.mark.parametrize("isa", ISAS)
    def test_c_program(cabi_exe, isa):
        proc = subprocess.run([str(cabi_exe)], capture_output=True, text=True, env=env_for(isa), timeout=600)
        assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stdout}{proc.stderr}"
        last = proc.stdout.strip().splitlines()[-1].split()
        assert last[:2] == ["ok", kernelkit.__version__], proc.stdout
        check_isa(last[2], isa)

    return test_header, test_numpy, cabi_exe, test_c_program
