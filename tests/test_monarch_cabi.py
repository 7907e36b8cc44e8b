"""The C ABI from outside torch: numpy through ctypes (fresh interpreter, no torch import) and a C
program compiled against the installed header and library."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kernelkit

HERE = Path(__file__).resolve().parent


def test_get_include_and_get_library_point_at_real_files():
    assert (Path(kernelkit.get_include()) / "kernelkit" / "kernelkit.h").is_file()
    assert Path(kernelkit.get_library()).is_file()
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        kernelkit.get_library("rocm")


def test_cabi_from_numpy_ctypes_without_torch():
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, str(HERE / "cabi_monarch_numpy.py"), kernelkit.get_library()],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "ok"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_cabi_from_a_c_program(tmp_path):
    lib = Path(kernelkit.get_library())
    exe = tmp_path / "cabi_monarch"
    subprocess.run(["gcc", "-std=c99", "-Wall", "-Werror", str(HERE / "cabi_monarch.c"), f"-I{kernelkit.get_include()}",
                    f"-L{lib.parent}", f"-Wl,-rpath,{lib.parent}", f"-l:{lib.name}", "-lm", "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stdout}{proc.stderr}"
    assert proc.stdout.startswith("ok 0.1.0")
