"""The installed package as a C/C++ dependency: kernelkit.get_cmake_dir()'s CMake package
(find_package(kernelkit CONFIG) -> kernelkit::cpu) builds and runs the C++ example in
kernelkit/examples/cpp, which checks one CPU op of every family against naive loops and exits 1 on a
mismatch; a preloaded shim that makes one op wrong turns exactly that family's line to FAIL; and the
pkg-config file compiles and links a C program."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import kernelkit

FAMILIES = ("monarch", "sparse", "vq", "ot", "mfac", "rbf")
# without LD_LIBRARY_PATH: the example must find libkernelkit through the rpath of kernelkit::cpu
ENV = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD", "KK_BREAK")}
ENV.setdefault("OMP_WAIT_POLICY", "passive")   # spinning OpenMP workers on a busy machine: ~1 s a run, not 20 ms


def _cmake_dir() -> str:
    try:
        return kernelkit.get_cmake_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    """The example configured with find_package and built; the path of its executable."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed")
    src = Path(kernelkit.__file__).parent / "examples" / "cpp"
    assert (src / "CMakeLists.txt").exists() and (src / "main.cpp").exists(), "the C++ example is not installed"
    build = tmp_path_factory.mktemp("cmake") / "build"
    cfg = subprocess.run(["cmake", "-S", str(src), "-B", str(build), f"-Dkernelkit_DIR={_cmake_dir()}"],
                         capture_output=True, text=True, env=ENV)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    assert f"kernelkit {kernelkit.__version__} from" in cfg.stdout
    b = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True, env=ENV)
    assert b.returncode == 0, b.stdout + b.stderr
    return build / "kernelkit_cpp_example"


def _lines(stdout: str) -> dict[str, str]:
    """{family: its line} for the lines "<family> ok|FAIL <entry point> ..."."""
    return {m.group(1): m.group(0) for m in re.finditer(r"^(\w+) +(?:ok|FAIL) .*$", stdout, re.M)}


def test_find_package_builds_and_runs_the_cpp_example(example):
    r = subprocess.run([str(example)], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = _lines(r.stdout)
    assert set(lines) == {*FAMILIES, "errors"}, r.stdout
    for name, line in lines.items():
        assert line.split()[1] == "ok", line
    # every family's error against its naive loop, as printed, within float64 / float32 rounding
    errs = {f: [float(e) for e in re.findall(r"rel\. error ([0-9.e+-]+)", lines[f])] for f in FAMILIES}
    assert all(len(e) == 1 for e in errs.values()), errs
    assert max(errs[f][0] for f in ("monarch", "sparse", "vq", "ot", "mfac")) < 1e-14, errs
    assert errs["rbf"][0] < 2e-5
    assert "0 of 1500 neighbours differ" in lines["rbf"]
    assert "status 3 (" in lines["errors"] and 'kk_last_error() "col_idx[' in lines["errors"]
    assert r.stdout.rstrip().endswith("all checks passed")
    assert r.stdout.startswith(f"kernelkit {kernelkit.__version__} (C ABI 1)")


# Wraps the example's entry points (LD_PRELOAD interposes them between the program and libkernelkit)
# and, when KK_BREAK names a check, makes that op's result wrong by a little more than rounding.
SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>
#include <kernelkit/kernelkit.h>
static int broken(const char* what) { const char* b = getenv("KK_BREAK"); return b && strcmp(b, what) == 0; }
#define REAL(f) ((__typeof__(&f))dlsym(RTLD_NEXT, #f))

kk_status kk_monarch_fwd_cpu(kk_dtype dt, int64_t batch, int64_t k, int64_t q, int64_t p, int64_t l, int64_t s,
                             int64_t r, const void* x, int64_t ldx, const void* w1, const void* w2, void* out,
                             int64_t ldo, int32_t nt) {
  kk_status st = REAL(kk_monarch_fwd_cpu)(dt, batch, k, q, p, l, s, r, x, ldx, w1, w2, out, ldo, nt);
  if (broken("monarch")) ((double*)out)[ldo + 1] += 1e-6;
  return st;
}
kk_status kk_sparse_linear_fwd_cpu(kk_dtype dt, int64_t batch, int64_t n_out, int64_t n_in, int64_t nnz,
                                   const int64_t* row_ptr, const int32_t* col_idx, const void* values,
                                   const void* x, int64_t ldx, const void* bias, void* out, int64_t ldo, int32_t nt) {
  kk_status st = REAL(kk_sparse_linear_fwd_cpu)(dt, batch, n_out, n_in, nnz, row_ptr, col_idx, values, x, ldx,
                                                bias, out, ldo, nt);
  if (broken("sparse")) ((double*)out)[n_out - 1] += 1e-9;
  if (broken("errors") && st != KK_OK) return KK_OK;   /* a library that accepts a bad index */
  return st;
}
kk_status kk_vq_linear_fwd_cpu(kk_dtype dt, const kk_vq_format* f, int64_t batch, const void* codes,
                               const void* codebooks, const void* scales, const void* x, int64_t ldx,
                               const void* bias, void* out, int64_t ldo, int32_t path, int32_t nt) {
  kk_status st = REAL(kk_vq_linear_fwd_cpu)(dt, f, batch, codes, codebooks, scales, x, ldx, bias, out, ldo, path, nt);
  if (broken("vq") && path == KK_VQ_PATH_GEMM) ((double*)out)[2] -= 1e-6;   /* one path wrong */
  return st;
}
kk_status kk_ot_sinkhorn_step_cpu(kk_dtype dt, const kk_ot_cost* cost, int64_t batch, int64_t n, int64_t m,
                                  int32_t axis, double reg, const void* w, const void* other, const void* pot,
                                  void* pot_new, void* err, int32_t norm, int32_t nt) {
  kk_status st = REAL(kk_ot_sinkhorn_step_cpu)(dt, cost, batch, n, m, axis, reg, w, other, pot, pot_new, err, norm, nt);
  if (broken("ot") && axis == 1) ((double*)pot_new)[m - 1] += 1e-9;
  return st;
}
kk_status kk_mfac_dots_cpu(kk_dtype gdt, int64_t r, int64_t d, int64_t block, void* G, int64_t ldg, int64_t nvec,
                           const void* x, int64_t ldx, int64_t insert_row, double* q, double* qr, int32_t nt) {
  kk_status st = REAL(kk_mfac_dots_cpu)(gdt, r, d, block, G, ldg, nvec, x, ldx, insert_row, q, qr, nt);
  if (broken("mfac")) q[r] += 1e-9;
  return st;
}
kk_status kk_rbf_knn_cpu(kk_dtype dt, int32_t dim, int64_t n, const void* x, int64_t ldx, const void* grid,
                         int32_t k, int64_t* idx, void* dist2, int32_t nt) {
  kk_status st = REAL(kk_rbf_knn_cpu)(dt, dim, n, x, ldx, grid, k, idx, dist2, nt);
  if (broken("rbf-knn")) { int64_t t = idx[k * 7 + 1]; idx[k * 7 + 1] = idx[k * 7 + 2]; idx[k * 7 + 2] = t; }
  return st;
}
kk_status kk_rbf_features_fwd_cpu(kk_dtype dt, kk_dtype wdt, int32_t dim, int32_t kernel, int32_t shape_full,
                                  int64_t n, const void* x, int64_t ldx, int64_t m, const void* centers,
                                  const void* shapes, const void* weights, int64_t ldw, int64_t channels,
                                  const void* omegas, int32_t k, const int64_t* idx, int32_t normalize, void* out,
                                  int64_t ldo, int32_t nt) {
  kk_status st = REAL(kk_rbf_features_fwd_cpu)(dt, wdt, dim, kernel, shape_full, n, x, ldx, m, centers, shapes,
                                               weights, ldw, channels, omegas, k, idx, normalize, out, ldo, nt);
  if (broken("rbf")) ((float*)out)[3 * ldo] += 1e-3f;
  return st;
}
"""


def test_each_check_fails_on_a_wrong_result(example, tmp_path):
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    (tmp_path / "shim.c").write_text(SHIM)
    c = subprocess.run(["gcc", "-shared", "-fPIC", "-O1", f"-I{kernelkit.get_include()}", str(tmp_path / "shim.c"),
                        "-o", str(tmp_path / "shim.so"), "-ldl"], capture_output=True, text=True)
    assert c.returncode == 0, c.stderr
    for broken, family in [*((f, f) for f in FAMILIES), ("rbf-knn", "rbf"), ("errors", "errors")]:
        r = subprocess.run([str(example)], capture_output=True, text=True,
                           env={**ENV, "LD_PRELOAD": str(tmp_path / "shim.so"), "KK_BREAK": broken})
        lines = _lines(r.stdout)
        assert r.returncode == 1 and "FAILED (1)" in r.stdout, (broken, r.stdout + r.stderr)
        assert {f for f, line in lines.items() if line.split()[1] == "FAIL"} == {family}, (broken, r.stdout)
        assert len(lines) == len(FAMILIES) + 1, r.stdout
    ok = subprocess.run([str(example)], capture_output=True, text=True,   # the shim itself changes nothing
                        env={**ENV, "LD_PRELOAD": str(tmp_path / "shim.so")})
    assert ok.returncode == 0 and "FAIL" not in ok.stdout, ok.stdout


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
