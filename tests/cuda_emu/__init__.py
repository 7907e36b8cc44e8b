"""Build and load the CUDA host emulation library (tests only).

The library is compiled from the checkout's own ``csrc/cuda/*.cu`` (as host C++, with this
folder's ``include/`` first on the include path) plus ``csrc/cpu/status.cpp``, ``kkemu.cpp`` and
``kkemu_ptx.cpp`` (the PTX instructions behind ``csrc/cuda/ptx.cuh``), and exports the same
``kk_*_cuda`` entry points as the product's ``libkernelkit_cuda.so``, over host memory.  It is
cached by content: the key hashes every source and header it is built from, the compiler's
version and the flags, so editing a ``.cu`` file is what the next test run checks.

    python tests/cuda_emu/__init__.py [--sanitize]     # build (or find) it and print its path

Environment: ``KKEMU_LIB`` uses a library built elsewhere (e.g. the ASan+UBSan build of .ci/run);
``KKEMU_CACHE`` is the cache folder (default ``~/.cache/kernelkit/cuda_emu``); ``CXX`` the compiler.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"

SANITIZE_FLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                  "-fno-sanitize-recover=undefined"]


def _sources(cuda_dir: Path) -> list[Path]:
    return sorted(cuda_dir.glob("*.cu")) + [CSRC / "cpu" / "status.cpp", HERE / "kkemu.cpp", HERE / "kkemu_ptx.cpp",
                                            HERE / "selftest.cu"]


def _flags(cuda_dir: Path, sanitize: bool, opt: str = "-O2") -> list[str]:
    base = ["-std=c++17", "-fPIC", "-fvisibility=hidden", "-DKK_CUDA_EMU", "-DKERNELKIT_VERSION=\"emu\"",
            "-Wall", "-Wno-unused-function", "-Wno-attributes", "-Wno-unknown-pragmas",
            f"-I{HERE / 'include'}", f"-I{cuda_dir}", f"-I{CSRC / 'include'}", f"-I{CSRC / 'cpu'}"]
    return base + (SANITIZE_FLAGS if sanitize else [opt])


def _key(cuda_dir: Path, sanitize: bool, opt: str, cxx: str) -> str:
    h = hashlib.sha256()
    files = (_sources(cuda_dir) + sorted(cuda_dir.glob("*.cuh")) + sorted((HERE / "include").glob("*.h"))
             + sorted(HERE.glob("*.h"))
             + sorted((CSRC / "include").rglob("*.h")) + sorted((CSRC / "cpu").glob("*.h")) + [Path(__file__)])
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    h.update(" ".join(_flags(Path("."), sanitize, opt)).encode())
    h.update(subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.encode())
    return h.hexdigest()[:20]


def mutant_dir(tmp_path: Path, name: str, before: str, after: str) -> Path:
    """A scratch copy of csrc/cuda holding only ``name`` (e.g. "vq.cu") among the .cu files, with the
    one occurrence of ``before`` replaced by ``after``: the source of a deliberately broken library
    (build(cuda_dir=...)) that compiles one family, not all of them."""
    src = CSRC / "cuda"
    scratch = Path(tmp_path) / "cuda"
    shutil.copytree(src, scratch, ignore=lambda d, names: [n for n in names if n.endswith(".cu") and n != name])
    text = (scratch / name).read_text()
    assert text.count(before) == 1, "the mutation no longer applies: update MUTANTS to the kernel's code"
    (scratch / name).write_text(text.replace(before, after))
    return scratch


def build(sanitize: bool = False, cuda_dir: Path | None = None, quiet: bool = True, opt: str = "-O2") -> Path:
    """Path of the emulation library for these sources, compiled if not cached yet.  ``cuda_dir``
    replaces csrc/cuda (e.g. a scratch copy with a deliberate bug); ``opt`` is the optimisation
    flag when not sanitizing (-O0 builds faster, for one-off libraries)."""
    cuda_dir = Path(cuda_dir or CSRC / "cuda").resolve()
    cxx = os.environ.get("CXX", "g++")
    cache = Path(os.environ.get("KKEMU_CACHE", Path.home() / ".cache" / "kernelkit" / "cuda_emu"))
    out = cache / _key(cuda_dir, sanitize, opt, cxx) / "libkernelkit_cuda_emu.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    flags = _flags(cuda_dir, sanitize, opt)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        def compile_one(src: Path) -> Path:
            obj = Path(tmp) / (src.name + ".o")
            lang = ["-x", "c++"] if src.suffix == ".cu" else []
            cmd = [cxx, *flags, *lang, "-c", str(src), "-o", str(obj)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"kkemu: compiling {src} failed:\n{' '.join(cmd)}\n{proc.stderr}")
            if not quiet and proc.stderr:
                print(proc.stderr, file=sys.stderr)
            return obj
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            objs = list(pool.map(compile_one, _sources(cuda_dir)))
        link = [cxx, "-shared", *flags, *map(str, objs), "-ldl", "-o", str(Path(tmp) / out.name)]
        proc = subprocess.run(link, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"kkemu: linking failed:\n{' '.join(link)}\n{proc.stderr}")
        os.replace(Path(tmp) / out.name, out)  # atomic: concurrent builders agree on the result
    return out


class Emulator:
    """ctypes handle on an emulation library: its kk_* entry points plus the kkemu_* test controls."""

    def __init__(self, path: Path | str):
        self.path = str(path)
        self.lib = ctypes.CDLL(self.path)
        L = self.lib
        L.kk_last_error.restype = ctypes.c_char_p
        L.kkemu_selftest_error.restype = ctypes.c_char_p
        L.kkemu_last_fault.restype = ctypes.c_char_p
        L.kkemu_set_device.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        L.kkemu_set_schedule.argtypes = [ctypes.c_int, ctypes.c_uint64]
        L.kkemu_launch_count.restype = ctypes.c_int64
        L.kkemu_launch_record.argtypes = [ctypes.c_int64, ctypes.c_char_p, ctypes.c_int64,
                                          ctypes.POINTER(ctypes.c_int64)]

    def set_device(self, preset: str = "h100", sms: int = 0, optin: int = 0, per_sm: int = 0) -> None:
        if self.lib.kkemu_set_device(preset.encode(), sms, optin, per_sm) != 0:
            raise ValueError(f"unknown device preset {preset!r}")

    def set_schedule(self, mode: str = "forward", seed: int = 1) -> None:
        self.lib.kkemu_set_schedule({"forward": 0, "reverse": 1, "shuffle": 2}[mode], seed)

    def clear_launches(self) -> None:
        self.lib.kkemu_clear_launches()

    def launches(self) -> list[dict]:
        out = []
        name = ctypes.create_string_buffer(512)
        vals = (ctypes.c_int64 * 8)()
        for i in range(self.lib.kkemu_launch_count()):
            self.lib.kkemu_launch_record(i, name, len(name), vals)
            v = list(vals)
            out.append({"name": name.value.decode(), "grid": tuple(v[0:3]), "block": tuple(v[3:6]),
                        "dyn_smem": v[6], "static_smem": v[7]})
        return out

    def last_fault(self) -> str:
        return self.lib.kkemu_last_fault().decode()

    def last_error(self) -> str:
        return self.lib.kk_last_error().decode()


def load(sanitize: bool = False) -> Emulator:
    """The emulator for the checkout's sources (or KKEMU_LIB when set)."""
    path = os.environ.get("KKEMU_LIB") or build(sanitize=sanitize)
    return Emulator(path)


if __name__ == "__main__":
    print(build(sanitize="--sanitize" in sys.argv, quiet=False))
