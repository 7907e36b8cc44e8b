"""Where the compiled pieces are, and loading them.

libkernelkit (CPU) is linked into the pybind11 module kernelkit._C.  libkernelkit_cuda is opened
lazily by _C.load_cuda the first time a CUDA backend is asked for, so importing kernelkit never
needs CUDA.  Neither library links libtorch.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

_PKG = Path(__file__).resolve().parent


def get_include() -> str:
    """Folder holding ``kernelkit/kernelkit.h`` (pass it to ``-I``)."""
    installed = _PKG / "include"
    if (installed / "kernelkit" / "kernelkit.h").exists():
        return str(installed)
    src = _PKG.parents[1] / "csrc" / "include"  # running from a source checkout
    return str(src)


def get_cmake_dir() -> str:
    """Folder of kernelkit's CMake package: ``cmake -Dkernelkit_DIR=<this>`` then
    ``find_package(kernelkit CONFIG)`` gives the imported targets ``kernelkit::cpu`` and, where the CUDA
    library was built, ``kernelkit::cuda``.  A pkg-config file lies in ``<package>/lib/pkgconfig``.
    Raises FileNotFoundError when kernelkit was not installed (a source checkout has no package)."""
    path = _PKG / "share" / "cmake" / "kernelkit"
    if not (path / "kernelkitConfig.cmake").exists():
        raise FileNotFoundError(f"kernelkit: no CMake package at {path} (pip install kernelkit builds it)")
    return str(path)


def get_library(name: str = "cpu") -> str:
    """Path of ``libkernelkit.so`` (``name="cpu"``) or ``libkernelkit_cuda.so`` (``name="cuda"``).

    ``KERNELKIT_LIBRARY`` / ``KERNELKIT_CUDA_LIBRARY`` override the paths (e.g. a sanitizer build).
    Raises FileNotFoundError, naming the path looked at, when the library was not built.
    """
    if name not in ("cpu", "cuda"):
        raise ValueError(f"get_library: name must be 'cpu' or 'cuda', got {name!r}")
    env = os.environ.get("KERNELKIT_LIBRARY" if name == "cpu" else "KERNELKIT_CUDA_LIBRARY")
    path = Path(env) if env else _PKG / "lib" / ("libkernelkit.so" if name == "cpu" else "libkernelkit_cuda.so")
    if not path.exists():
        what = "the CPU library" if name == "cpu" else "the CUDA library (built only where nvcc is found)"
        raise FileNotFoundError(f"kernelkit: {what} is not at {path}")
    return str(path)


@functools.lru_cache(maxsize=None)
def C():
    """The pybind11 module kernelkit._C, or raises ImportError with the reason."""
    from kernelkit import _C  # noqa: WPS433 (import inside: keep `import kernelkit` light)

    return _C


@functools.lru_cache(maxsize=None)
def cpu_library_error() -> str | None:
    """None when the CPU library works, else why not."""
    try:
        C()
    except ImportError as e:  # not built (e.g. a source checkout without `pip install`)
        return f"compiled module kernelkit._C not importable ({e})"
    return None


@functools.lru_cache(maxsize=None)
def cuda_library_error() -> str | None:
    """None when the CUDA library is loaded, else why not."""
    err = cpu_library_error()
    if err:
        return err
    try:
        path = get_library("cuda")
    except FileNotFoundError:
        return "library not built (nvcc was not found when kernelkit was installed)"
    if not C().load_cuda(path):
        return f"library at {path} failed to load: {C().cuda_error()}"
    return None


def stream(t) -> int:
    """The current CUDA stream of ``t``'s device, as the int the CUDA entry points take."""
    import torch
    return torch.cuda.current_stream(t.device).cuda_stream


def ptr(t) -> int:
    """``t.data_ptr()``, or 0 (NULL) for None: an optional array of the C entry points."""
    return 0 if t is None else t.data_ptr()
