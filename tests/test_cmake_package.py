"""The installed package as a C/C++ dependency: kernelkit.get_cmake_dir()'s CMake package
(find_package(kernelkit CONFIG) -> kernelkit::cpu) builds and runs the C++ example in
kernelkit/examples/cpp (which checks kernelkit's results against naive loops and exits 1 on a
mismatch), and the pkg-config file compiles and links a C program."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import kernelkit


def _cmake_dir() -> str:
    try:
        return kernelkit.get_cmake_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_find_package_builds_and_runs_the_cpp_example(tmp_path):
    src = Path(kernelkit.__file__).parent / "examples" / "cpp"
    assert (src / "CMakeLists.txt").exists(), "the C++ example is not installed with the package"
    build = tmp_path / "build"
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD")}
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), f"-Dkernelkit_DIR={_cmake_dir()}"], check=True,
                   capture_output=True, text=True, env=env)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True, text=True, env=env)
    r = subprocess.run([str(build / "kernelkit_cpp_example")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all checks passed" in r.stdout
    assert "0 of 1500 neighbours differ" in r.stdout


def test_cmake_package_version_and_pkgconfig(tmp_path):
    d = Path(_cmake_dir())
    assert '"0.1.0"' in (d / "kernelkitConfigVersion.cmake").read_text()
    pc = d.parents[2] / "lib" / "pkgconfig" / "kernelkit.pc"   # <package>/share/cmake/kernelkit
    assert pc.exists()
    if shutil.which("pkg-config") is None or shutil.which("gcc") is None:
        pytest.skip("pkg-config or gcc not installed")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "kernelkit"], check=True, capture_output=True,
                           text=True, env={**os.environ, "PKG_CONFIG_PATH": str(pc.parent)}).stdout.split()
    prog = tmp_path / "v.c"
    prog.write_text('#include <kernelkit/kernelkit.h>\n#include <stdio.h>\n'
                    'int main(void) { printf("%s %d\\n", kk_version(), kk_abi_version()); return 0; }\n')
    subprocess.run(["gcc", str(prog), *flags, "-o", str(tmp_path / "v")], check=True, capture_output=True, text=True)
    out = subprocess.run([str(tmp_path / "v")], check=True, capture_output=True, text=True).stdout
    assert out.split() == [kernelkit.__version__, "1"]
