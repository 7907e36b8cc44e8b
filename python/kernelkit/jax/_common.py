"""Registration of kernelkit's FFI targets with JAX, and the argument checks shared by the families."""
from __future__ import annotations

import ctypes
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_JAX_LIB = "libkernelkit_jax.so"
_JAX_CUDA_LIB = "libkernelkit_jax_cuda.so"
_LIB_DIR = Path(__file__).resolve().parents[1] / "lib"  # kernelkit/lib, beside libkernelkit(_cuda).so


def _open(name: str):
    lib = ctypes.CDLL(str(_LIB_DIR / name))
    lib.kk_jax_target_count.restype = ctypes.c_int32
    lib.kk_jax_target_name.restype = ctypes.c_char_p
    lib.kk_jax_target_name.argtypes = [ctypes.c_int32]
    lib.kk_jax_target_handler.restype = ctypes.c_void_p
    lib.kk_jax_target_handler.argtypes = [ctypes.c_int32]
    return lib


def _targets(lib) -> dict:
    """{target name: PyCapsule of its XLA FFI handler} of one handler library."""
    handler_t = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)  # XLA_FFI_Error* (XLA_FFI_CallFrame*)
    out = {}
    for i in range(lib.kk_jax_target_count()):
        out[lib.kk_jax_target_name(i).decode()] = jax.ffi.pycapsule(handler_t(lib.kk_jax_target_handler(i)))
    return out


if not (_LIB_DIR / _JAX_LIB).exists():  # pragma: no cover - depends on how kernelkit was built
    raise ImportError(
        f"kernelkit.jax: this kernelkit was built without its JAX handlers ({_LIB_DIR / _JAX_LIB} is missing: "
        "jaxlib was not importable when kernelkit was built, or KERNELKIT_BUILD_JAX=0).  Install jax, then "
        "rebuild kernelkit: pip install 'jax[cpu]' && pip install --force-reinstall --no-deps kernelkit "
        "(or `pip install .` in a checkout; jaxlib is a build requirement, so an isolated build has it).")
_cpu_lib = _open(_JAX_LIB)

FLOATS = (jnp.float32, jnp.float64, jnp.float16, jnp.bfloat16)
# dtypes the C kernels take, per XLA platform (the CPU kernels compute in float32/float64; the CUDA
# ones in float32/float16/bfloat16 with float32 accumulation)
PLATFORM_DTYPES = {"cpu": (np.dtype("float32"), np.dtype("float64")),
                   "cuda": (np.dtype("float32"), np.dtype(jnp.float16), np.dtype(jnp.bfloat16))}


def _register() -> tuple[str, ...]:
    done = []
    for name, capsule in _targets(_cpu_lib).items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    done.append("cpu")
    try:
        has_gpu = any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        has_gpu = False
    if has_gpu and (_LIB_DIR / _JAX_CUDA_LIB).exists():  # else GPU arrays raise at trace time
        for name, capsule in _targets(_open(_JAX_CUDA_LIB)).items():
            jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
        done.append("cuda")
    return tuple(done)


_PLATFORMS = _register()


def registered_platforms() -> tuple[str, ...]:
    """The XLA platforms kernelkit's custom calls were registered for (``("cpu",)`` or ``("cpu", "cuda")``)."""
    return _PLATFORMS


def platform() -> str:
    """The platform a traced call will lower for (JAX's default backend)."""
    p = jax.default_backend()
    return "cuda" if p == "gpu" else p


def check_platform(fn: str) -> str:
    """The platform a traced call lowers for ("cpu" or "cuda"); RuntimeError when kernelkit has no
    kernels for it or its custom calls are not registered there."""
    plat = platform()
    if plat not in PLATFORM_DTYPES:
        raise RuntimeError(f"{fn}: kernelkit.jax has no kernels for platform {plat!r} (cpu, cuda)")
    if plat not in _PLATFORMS:
        raise RuntimeError(f"{fn}: kernelkit's custom calls are not registered for {plat!r} "
                           f"(registered: {', '.join(_PLATFORMS)}; the CUDA ones need kernelkit built with nvcc)")
    return plat


def check_array(x, name: str, fn: str, *, ndim: int | None = None, min_ndim: int | None = None,
                dtypes=None) -> None:
    """TypeError / ValueError naming ``name`` when x is not an array of the right rank and dtype."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"{fn}: {name} must be a JAX array, got {type(x).__name__}")
    if ndim is not None and len(x.shape) != ndim:
        raise ValueError(f"{fn}: {name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if min_ndim is not None and len(x.shape) < min_ndim:
        raise ValueError(f"{fn}: {name} must have at least {min_ndim} dimension(s), got shape {tuple(x.shape)}")
    if dtypes is not None and np.dtype(x.dtype) not in [np.dtype(d) for d in dtypes]:
        names = ", ".join(np.dtype(d).name for d in dtypes)
        raise TypeError(f"{fn}: {name} must have dtype {names}, got {np.dtype(x.dtype).name}")


def check_float(fn: str, first: str, x, **others) -> None:
    """x a float array of a dtype the current platform's kernels take; the others of x's dtype."""
    plat = check_platform(fn)
    ok = PLATFORM_DTYPES[plat]
    check_array(x, first, fn, dtypes=ok)
    for name, t in others.items():
        check_array(t, name, fn)
        if np.dtype(t.dtype) != np.dtype(x.dtype):
            raise TypeError(f"{fn}: {name} must have {first}'s dtype {np.dtype(x.dtype).name}, "
                            f"got {np.dtype(t.dtype).name}")


def call(target: str, outs, *args, **attrs):
    """jax.ffi.ffi_call with kernelkit's vmap convention (``expand_dims``: the handlers walk the leading
    dims; csrc/jax/common.h, class Lead)."""
    return jax.ffi.ffi_call(target, outs, vmap_method="expand_dims")(*args, **attrs)


def spec(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), dtype)
