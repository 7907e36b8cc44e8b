"""The vq family's C ABI from outside torch: numpy through ctypes (fresh interpreter, no torch import)
and a C99 program compiled against the installed header and library, each once per CPU ISA variant
(KERNELKIT_CPU_ISA caps the variant the library dispatches to)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kernelkit

HERE = Path(__file__).resolve().parent
ISAS = ("base", "avx2", "avx512")
VQ_SYMBOLS = ("kk_vq_check_codes", "kk_vq_dequantize_cpu", "kk_vq_linear_fwd_cpu", "kk_vq_linear_bwd_cpu",
              "kk_vq_assign_cpu")


def _env(isa: str) -> dict:
    return dict(os.environ, KERNELKIT_CPU_ISA=isa)


def _check_isa(reported: str, requested: str) -> None:
    """The library runs the requested variant or, on a CPU without it, a lower one."""
    assert reported in ISAS, reported
    assert ISAS.index(reported) <= ISAS.index(requested), (reported, requested)
    if requested == "base":
        assert reported == "base"


def test_vq_header_is_installed_and_symbols_exported():
    assert (Path(kernelkit.get_include()) / "kernelkit" / "vq.h").is_file()
    if shutil.which("nm") is None:
        pytest.skip("nm not installed")
    out = subprocess.run(["nm", "-D", "--defined-only", kernelkit.get_library()], capture_output=True, text=True,
                         check=True).stdout
    names = {line.split()[-1] for line in out.splitlines() if line.strip()}
    for sym in VQ_SYMBOLS:
        assert sym in names, f"{sym} not exported"
    # only the C ABI is visible: the per-ISA kernels and the checks stay hidden
    assert not [n for n in names if "vq" in n and not n.startswith("kk_vq_")]


@pytest.mark.parametrize("isa", ISAS)
def test_vq_cabi_from_numpy_ctypes_without_torch(isa):
    proc = subprocess.run([sys.executable, str(HERE / "cabi_vq_numpy.py"), kernelkit.get_library()],
                          capture_output=True, text=True, env=_env(isa), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    words = proc.stdout.split()
    assert words[0] == "ok", proc.stdout
    _check_isa(words[1], isa)


@pytest.fixture(scope="module")
def cabi_vq_exe(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    lib = Path(kernelkit.get_library())
    exe = tmp_path_factory.mktemp("cabi") / "cabi_vq"
    subprocess.run(["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", str(HERE / "cabi_vq.c"),
                    f"-I{kernelkit.get_include()}", f"-L{lib.parent}", f"-Wl,-rpath,{lib.parent}", f"-l:{lib.name}",
                    "-lm", "-o", str(exe)], check=True, capture_output=True, text=True)
    return exe


@pytest.mark.parametrize("isa", ISAS)
def test_vq_cabi_from_a_c_program(cabi_vq_exe, isa):
    proc = subprocess.run([str(cabi_vq_exe)], capture_output=True, text=True, env=_env(isa), timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stdout}{proc.stderr}"
    last = proc.stdout.strip().splitlines()[-1].split()
    assert last[:2] == ["ok", kernelkit.__version__], proc.stdout
    _check_isa(last[2], isa)
