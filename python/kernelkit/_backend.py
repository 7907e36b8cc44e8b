"""Backend choice, in one place for every op.

Backends: ``torch`` (pure-torch reference), ``cpu`` (C++/OpenMP), ``triton``, ``cuda`` (C++/CUDA).
For each call the backend is, in order of precedence:
  1. the ``backend=`` argument of the call;
  2. the innermost ``with kernelkit.backend(name):`` block;
  3. the environment variable ``KERNELKIT_BACKEND``;
  4. the first backend in the device's priority list that can run this call.
A backend name that is not a str raises TypeError, an unknown name ValueError.
A backend chosen by 1-3 that cannot run raises BackendUnavailableError with the reason; in 4 a
backend that cannot run is skipped, and the first time a call falls past a preferred backend a
KernelkitFallbackWarning says why.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from typing import Callable, Iterator

import torch

from . import _lib

BACKENDS = ("torch", "cpu", "triton", "cuda")
PRIORITY = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
ENV_VAR = "KERNELKIT_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run the call; the message says why."""


class KernelkitFallbackWarning(UserWarning):
    """The preferred backend for a device could not run a call; another one did."""


_local = threading.local()


def _stack() -> list:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def _check_name(name: str, where: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{where}: backend must be a str, one of {', '.join(BACKENDS)}; got {type(name).__name__}")
    if name not in BACKENDS:
        raise ValueError(f"{where}: backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force ``name`` for every kernelkit op called inside the block (this thread)."""
    _stack().append(_check_name(name, "kernelkit.backend"))
    try:
        yield
    finally:
        _stack().pop()


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:  # a failed import is slow (a sys.path search): ask once per process
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    return None


def _triton_error(device: torch.device) -> str | None:
    if _triton_import_error():
        return _triton_import_error()
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None  # the interpreter runs the kernels on CPU tensors (tests)
    return "no GPU (triton runs on CUDA tensors; TRITON_INTERPRET=1 runs it on CPU for testing)"


def availability(device: torch.device | str | None = None) -> dict[str, str | None]:
    """{backend: None if it can run on ``device``, else why not} (dtype support aside)."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    out: dict[str, str | None] = {"torch": None}
    cpu_err = _lib.cpu_library_error()
    out["cpu"] = cpu_err or (None if device.type == "cpu" else f"tensor is on {device.type}; the cpu backend needs CPU tensors")
    out["triton"] = _triton_error(device)
    if device.type == "cuda":
        out["cuda"] = _lib.cuda_library_error()
    else:
        lib_err = _lib.cuda_library_error()
        out["cuda"] = ("no GPU" if not torch.cuda.is_available() else f"tensor is on {device.type}; the cuda backend needs CUDA tensors") + (f"; {lib_err}" if lib_err else "")
    return out


def backends(device: torch.device | str | None = None) -> dict[str, str]:
    """Human-readable availability: {backend: "available" | "<reason>"}."""
    return {k: ("available" if v is None else v) for k, v in availability(device).items()}


_warned: set = set()


@torch._dynamo.assume_constant_result
def select(op: str, device: torch.device, requested: str | None,
           supports: Callable[[str], str | None]) -> str:
    """Pick the backend for one call of ``op`` on ``device``.

    ``supports(name)`` returns None if backend ``name`` handles this call's dtypes/shapes, else why
    not.  Under torch.compile this runs once at trace time and its answer is a constant of the
    graph (so a compiled function keeps the backend it was traced with).
    """
    forced, source = requested, "backend= argument"
    if forced is None and _stack():
        forced, source = _stack()[-1], "kernelkit.backend(...) block"
    if forced is None and os.environ.get(ENV_VAR):
        forced, source = os.environ[ENV_VAR], f"{ENV_VAR} environment variable"
    avail = availability(device)
    if forced is not None:
        _check_name(forced, f"{op} ({source})")
        why = avail[forced] or supports(forced)
        if why:
            raise BackendUnavailableError(f"{op}: backend {forced!r} (from the {source}) cannot run: {why}")
        return forced
    skipped = []
    for name in PRIORITY.get(device.type, ("torch",)):
        why = avail[name] or supports(name)
        if why is None:
            if skipped and device.type in ("cpu", "cuda") and not torch.compiler.is_compiling():
                key = (op, device.type, tuple(skipped))
                if key not in _warned:
                    _warned.add(key)
                    reasons = "; ".join(f"{n}: {w}" for n, w in skipped)
                    warnings.warn(f"{op}: using backend {name!r} ({reasons})", KernelkitFallbackWarning, stacklevel=3)
            return name
        skipped.append((name, why))
    raise BackendUnavailableError(f"{op}: no backend can run on {device}: " + "; ".join(f"{n}: {w}" for n, w in skipped))
