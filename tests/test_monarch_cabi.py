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


def _cuda_lib():
    import ctypes
    try:
        path = kernelkit.get_library("cuda")
    except FileNotFoundError:
        pytest.skip("the CUDA library was not built (no nvcc at install time)")
    lib = ctypes.CDLL(path)
    lib.kk_last_error.restype = ctypes.c_char_p
    return lib, ctypes


def test_cuda_library_loads_and_validates_without_a_gpu():
    """The CUDA library is built here by nvcc; its argument checks run before any CUDA call, so bad
    arguments return statuses even on a machine without a GPU."""
    lib, ctypes = _cuda_lib()
    assert kernelkit._lib.cuda_library_error() is None
    assert lib.kk_abi_version() == 1
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.kk_monarch_fwd_cuda.argtypes = [ctypes.c_int] + [i64] * 7 + [ptr, i64, ptr, ptr, ptr, i64, ptr]
    lib.kk_monarch_bwd_cuda_workspace_size.argtypes = [ctypes.c_int] + [i64] * 7 + [ctypes.POINTER(i64)]
    fake = ptr(4096)  # never dereferenced: every call below fails validation first
    st = lib.kk_monarch_fwd_cuda(0, 2, 4, 6, 5, 3, 7, 8, None, 20, fake, fake, fake, 21, None)
    assert st == 1 and b"x" in lib.kk_last_error()
    st = lib.kk_monarch_fwd_cuda(0, 2, 4, 6, 5, 3, 7, 9, fake, 20, fake, fake, fake, 21, None)
    assert st == 2 and b"l*r" in lib.kk_last_error().replace(b" ", b"")
    st = lib.kk_monarch_fwd_cuda(1, 2, 4, 6, 5, 3, 7, 8, fake, 20, fake, fake, fake, 21, None)
    assert st == 4  # float64 is not a CUDA dtype
    nbytes = i64(-1)
    assert lib.kk_monarch_bwd_cuda_workspace_size(0, 1000, 4, 256, 256, 4, 1024, 256, ctypes.byref(nbytes)) == 0
    assert nbytes.value >= 2 * 4 * 1000 * 4 * 256  # fp32 t and dt for the batch
