"""kernelkit for JAX: each family's main op as an XLA FFI custom call on the same C entry points that
the torch ops use (``csrc/jax/*.cpp``, the modules ``kernelkit._jax`` and, where the CUDA library was
built, ``kernelkit._jax_cuda``).  Usable under ``jax.jit`` and ``jax.vmap``; differentiable through
``jax.custom_vjp`` where the C ABI has a backward.

    import jax, jax.numpy as jnp
    import kernelkit.jax as kj
    y = jax.jit(kj.monarch_matmul)(x, w1, w2)

CPU always; CUDA when kernelkit was built with nvcc (the custom calls run on XLA's stream).  The
module exists only when jaxlib was importable while kernelkit was built (setup.py; jaxlib is in
pyproject.toml's build requirements, so a normal ``pip install`` builds it).
"""
from __future__ import annotations

try:
    import jax  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("kernelkit.jax needs JAX: pip install 'jax[cpu]' (or jax[cuda12] for GPUs), "
                      f"then import kernelkit.jax again ({e})") from e

from ._common import registered_platforms  # noqa: E402  (registers the FFI targets)
from .monarch import monarch_matmul  # noqa: E402

__all__ = ["monarch_matmul", "registered_platforms"]
