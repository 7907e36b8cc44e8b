"""Build of kernelkit's compiled parts (no libtorch anywhere):

  kernelkit/lib/libkernelkit.so       CPU kernels, C ABI, OpenMP. Always built.  The kernels are
                                      compiled once per x86 ISA (base, AVX2, AVX-512) and chosen at
                                      run time, so a wheel built here runs on any x86-64 CPU.
  kernelkit/lib/libkernelkit_cuda.so  CUDA kernels, C ABI.  Built when nvcc is found.
                                      KERNELKIT_BUILD_CUDA=auto (default) | 0 | 1 (1 fails without nvcc)
                                      KERNELKIT_CUDA_ARCHS="80;90" (default) compute capabilities.
  kernelkit/_C                        pybind11 module over libkernelkit (loads the CUDA one lazily).
  kernelkit/include/kernelkit/*.h     the public header, for kernelkit.get_include().
  kernelkit/lib/libkernelkit_jax.so   XLA FFI handlers for kernelkit.jax over libkernelkit, and
  kernelkit/lib/libkernelkit_jax_cuda.so  over libkernelkit_cuda (with the CUDA library); built when
                                      jaxlib is importable at build time (it carries the FFI headers
                                      and is a build requirement in pyproject.toml).
                                      KERNELKIT_BUILD_JAX=auto (default) | 0 | 1 (1 fails without jaxlib).
Other knobs: KERNELKIT_SANITIZE=1 builds the CPU library with ASan+UBSan (used by .ci/run);
KERNELKIT_JOBS=N compiles N sources at a time.
"""
import os
import platform
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension
except ImportError:  # pybind11 is a build requirement; this only helps `python setup.py --help`
    from setuptools import Extension as Pybind11Extension

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
VERSION = "0.1.0"
IS_X86 = platform.machine().lower() in ("x86_64", "amd64")

# (source, extra flags, ISA namespace) for the CPU library.
CPU_ISAS = [("isa_base", [])]
if IS_X86:
    CPU_ISAS += [("isa_avx2", ["-mavx2", "-mfma"]),
                 ("isa_avx512", ["-mavx512f", "-mavx512dq", "-mavx2", "-mfma"])]
CPU_PER_ISA = ["monarch.cpp", "sparse.cpp", "vq.cpp", "ot.cpp", "mfac.cpp", "rbf.cpp"]          # kernels, compiled once per ISA
CPU_COMMON = ["status.cpp", "isa.cpp", "monarch_api.cpp", "sparse_api.cpp", "sparse_convert.cpp", "vq_api.cpp", "ot_api.cpp", "mfac_api.cpp", "rbf_api.cpp"]
CUDA_SOURCES = ["monarch.cu", "sparse.cu", "vq.cu", "ot.cu", "mfac.cu", "rbf.cu"]


def _run(cmd):
    print(" ".join(str(c) for c in cmd), flush=True)
    subprocess.check_call([str(c) for c in cmd])


def _find_nvcc():
    cand = [os.environ.get("NVCC"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cand.append(os.path.join(home, "bin", "nvcc"))
    for c in cand:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _jaxlib_include():
    """jaxlib's include folder (the XLA FFI headers), or None: then kernelkit.jax is not built."""
    mode = os.environ.get("KERNELKIT_BUILD_JAX", "auto").lower()
    if mode in ("0", "no", "off", "false"):
        print("kernelkit: KERNELKIT_BUILD_JAX=0, skipping the JAX handlers")
        return None
    try:
        import jaxlib
        inc = Path(jaxlib.__file__).resolve().parent / "include"
    except ImportError:
        inc = None
    if inc is None or not (inc / "xla" / "ffi" / "api" / "ffi.h").exists():
        if mode in ("1", "yes", "on", "true"):
            raise RuntimeError("KERNELKIT_BUILD_JAX=1 but jaxlib (with its XLA FFI headers) is not importable")
        print("kernelkit: jaxlib not importable at build time, kernelkit.jax is not built")
        return None
    return inc


class BuildKernelkit(build_ext):
    def run(self):
        out_pkg = Path(self.build_lib) / "kernelkit"
        if self.inplace:
            out_pkg = ROOT / "python" / "kernelkit"
        lib_dir = out_pkg / "lib"
        lib_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(self.build_temp) / "kernelkit"
        tmp.mkdir(parents=True, exist_ok=True)
        self._copy_headers(out_pkg)
        self._write_packages(out_pkg)
        self._build_cpu(lib_dir, tmp)
        self._build_cuda(lib_dir, tmp)
        self._build_jax(lib_dir, tmp)
        for ext in self.extensions:  # the pybind11 module links libkernelkit from ../lib
            ext.library_dirs = [str(lib_dir)]
        super().run()

    def _copy_headers(self, out_pkg):
        dst = out_pkg / "include" / "kernelkit"
        dst.mkdir(parents=True, exist_ok=True)
        for h in (CSRC / "include" / "kernelkit").glob("*.h"):
            shutil.copy2(h, dst / h.name)

    def _write_packages(self, out_pkg):
        """The CMake package (share/cmake/kernelkit) and the pkg-config file (lib/pkgconfig), both
        relocatable (paths relative to their own folder), from the templates in csrc/cmake."""
        subst = {"@VERSION@": VERSION, "@VERSION_MAJOR@": VERSION.split(".")[0]}
        for name, dst in (("kernelkitConfig.cmake", out_pkg / "share" / "cmake" / "kernelkit"),
                          ("kernelkitConfigVersion.cmake", out_pkg / "share" / "cmake" / "kernelkit"),
                          ("kernelkit.pc", out_pkg / "lib" / "pkgconfig")):
            text = (CSRC / "cmake" / f"{name}.in").read_text()
            for k, v in subst.items():
                text = text.replace(k, v)
            dst.mkdir(parents=True, exist_ok=True)
            (dst / name).write_text(text)

    def _jobs(self):
        return int(os.environ.get("KERNELKIT_JOBS", os.cpu_count() or 1))

    def _build_cpu(self, lib_dir, tmp):
        cxx = os.environ.get("CXX", "g++")
        flags = ["-std=c++17", "-O3", "-fPIC", "-fopenmp", "-fvisibility=hidden",
                 f"-DKERNELKIT_VERSION=\"{VERSION}\"", f"-I{CSRC / 'include'}", "-Wall", "-Wextra"]
        ldflags = ["-fopenmp", "-Wl,-Bsymbolic"]
        if os.environ.get("KERNELKIT_SANITIZE") == "1":
            san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
            flags = [f for f in flags if f != "-O3"] + ["-O1", "-g"] + san
            ldflags += san
        jobs = []
        for ns, isa_flags in CPU_ISAS:
            for src in CPU_PER_ISA:
                obj = tmp / f"{Path(src).stem}.{ns}.o"
                jobs.append([cxx, *flags, *isa_flags, *(["-ffp-contract=off"] if src == "rbf.cpp" else []), f"-DKK_ISA_NS={ns}", "-c", CSRC / "cpu" / src, "-o", obj])  # rbf: knn dist2 without FMA (rbf.h)
        for src in CPU_COMMON:
            jobs.append([cxx, *flags, "-c", CSRC / "cpu" / src, "-o", tmp / f"{Path(src).stem}.o"])
        with ThreadPoolExecutor(self._jobs()) as pool:
            list(pool.map(_run, jobs))
        objs = [j[-1] for j in jobs]
        _run([cxx, "-shared", *objs, *ldflags, "-o", lib_dir / "libkernelkit.so"])

    def _build_cuda(self, lib_dir, tmp):
        mode = os.environ.get("KERNELKIT_BUILD_CUDA", "auto").lower()
        target = lib_dir / "libkernelkit_cuda.so"
        if mode in ("0", "no", "off", "false"):
            print("kernelkit: KERNELKIT_BUILD_CUDA=0, skipping the CUDA library")
            return
        nvcc = _find_nvcc()
        if nvcc is None:
            if mode in ("1", "yes", "on", "true"):
                raise RuntimeError("KERNELKIT_BUILD_CUDA=1 but nvcc was not found (set NVCC or CUDA_HOME)")
            print("kernelkit: nvcc not found, the CUDA library is not built (the cpu/triton/torch backends still work)")
            return
        archs = [a.strip() for a in os.environ.get("KERNELKIT_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]
        gencode = []
        for a in archs:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX for newer cards
        flags = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC,-fvisibility=hidden", f"-I{CSRC / 'include'}",
                 f"-I{CSRC / 'cpu'}", f"-DKERNELKIT_VERSION=\"{VERSION}\"", *gencode]
        jobs = [[nvcc, *flags, "-c", CSRC / "cuda" / s, "-o", tmp / f"{Path(s).stem}.cu.o"] for s in CUDA_SOURCES]
        jobs.append([nvcc, *flags, "-x", "cu", "-c", CSRC / "cpu" / "status.cpp", "-o", tmp / "status.cu.o"])
        with ThreadPoolExecutor(self._jobs()) as pool:
            list(pool.map(_run, jobs))
        _run([nvcc, "-shared", *gencode, *[j[-1] for j in jobs], "-Xlinker", "-Bsymbolic",
              "-cudart", "static", "-o", target])

    def _build_jax(self, lib_dir, tmp):
        """libkernelkit_jax.so (CPU handlers over libkernelkit) and, with the CUDA library,
        libkernelkit_jax_cuda.so (CUDA handlers over libkernelkit_cuda): the same csrc/jax sources,
        compiled twice.  Plain shared libraries (no Python headers): kernelkit.jax loads them."""
        inc = _jaxlib_include()
        if inc is None:
            return
        cxx = os.environ.get("CXX", "g++")
        flags = ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", f"-I{CSRC / 'include'}",
                 "-isystem", str(inc), "-Wall", "-Wextra"]
        srcs = sorted((CSRC / "jax").glob("*.cpp"))
        variants = [("kernelkit_jax", "0", "kernelkit")]
        if (lib_dir / "libkernelkit_cuda.so").exists():
            variants.append(("kernelkit_jax_cuda", "1", "kernelkit_cuda"))
        jobs, links = [], []
        for name, cuda, dep in variants:
            objs = [tmp / f"jax.{s.stem}.{name}.o" for s in srcs]
            jobs += [[cxx, *flags, f"-DKK_JAX_CUDA={cuda}", "-c", s, "-o", o] for s, o in zip(srcs, objs)]
            links.append([cxx, "-shared", *objs, f"-L{lib_dir}", f"-l{dep}", "-Wl,-rpath,$ORIGIN", "-Wl,--no-undefined",
                          "-o", lib_dir / f"lib{name}.so"])
        with ThreadPoolExecutor(self._jobs()) as pool:
            list(pool.map(_run, jobs))
        for cmd in links:
            _run(cmd)


ext = Pybind11Extension(
    "kernelkit._C",
    [str(Path("csrc") / "python" / f) for f in ("module.cpp", "sparse.cpp", "vq.cpp", "ot.cpp", "mfac.cpp", "rbf.cpp")],  # one binding file per family
    include_dirs=[str(CSRC / "include")],
    libraries=["kernelkit"],
    extra_link_args=["-Wl,-rpath,$ORIGIN/lib"],
    extra_compile_args=["-O2"],
    cxx_std=17,
)



setup(
    # kernelkit from python/, and the Triton kernels from kernels/ as kernelkit.kernels
    packages=find_packages("python") + ["kernelkit.kernels"],
    package_dir={"": "python", "kernelkit.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildKernelkit},
    package_data={"kernelkit": ["lib/*.so", "include/kernelkit/*.h", "share/cmake/kernelkit/*.cmake",
                                "lib/pkgconfig/*.pc", "examples/cpp/*.cpp", "examples/cpp/CMakeLists.txt"]},
)
