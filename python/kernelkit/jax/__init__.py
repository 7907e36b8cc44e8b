"""kernelkit for JAX: each family's main op as an XLA FFI custom call on the same C entry points that
the torch ops use (``csrc/jax/*.cpp``, built into ``kernelkit/lib/libkernelkit_jax.so`` and, where the
CUDA library was built, ``libkernelkit_jax_cuda.so``).  Usable under ``jax.jit`` and ``jax.vmap``;
differentiable through ``jax.custom_vjp`` where the C ABI has a backward.

    import jax, jax.numpy as jnp
    import kernelkit.jax as kj
    y = jax.jit(kj.monarch_matmul)(x, w1, w2)

Families (each also a submodule, ``kernelkit.jax.<family>``, with its helpers):
    monarch  monarch_matmul(x, w1, w2)
    sparse   sparse_linear(x, values, SparseLayout.from_mask(mask) | .from_csr(...), bias)
    vq       vq_linear(x, codes, codebooks, scales, bias, rows_per_codebook=, path=)
    ot       OTCost.matrix(C) | OTCost.points(x, y); sinkhorn_step, sinkhorn (ot.solve: the log-domain
             solver as a lax.while_loop), sinkhorn_cost / sinkhorn_points (envelope-theorem gradients)
    mfac     ihvp(G, v, damp, block_size) (the static M-FAC inverse-Fisher-vector product); mfac.dots / combine
    rbf      rbf_features(x, centers, shapes, weights, omegas, k, kernel, normalize), rbf_knn, rbf_build_grid

CPU always; CUDA when kernelkit was built with nvcc (the custom calls run on XLA's stream).  The
handlers exist only when jaxlib was importable while kernelkit was built (setup.py; jaxlib is in
pyproject.toml's build requirements, so a normal ``pip install`` builds them).
"""
from __future__ import annotations

try:
    import jax  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("kernelkit.jax needs JAX: pip install 'jax[cpu]' (or jax[cuda12] for GPUs), "
                      f"then import kernelkit.jax again ({e})") from e

from ._common import registered_platforms  # noqa: E402  (registers the FFI targets)
from . import mfac, monarch, ot, rbf, sparse, vq  # noqa: E402
from .mfac import ihvp  # noqa: E402
from .monarch import monarch_matmul  # noqa: E402
from .ot import Cost as OTCost  # noqa: E402
from .ot import sinkhorn_cost, sinkhorn_points, sinkhorn_step  # noqa: E402
from .ot import solve as sinkhorn  # noqa: E402
from .rbf import build_grid as rbf_build_grid  # noqa: E402
from .rbf import knn as rbf_knn  # noqa: E402
from .rbf import rbf_features  # noqa: E402
from .sparse import SparseLayout, sparse_linear  # noqa: E402
from .vq import vq_linear  # noqa: E402

__all__ = ["OTCost", "SparseLayout", "ihvp", "mfac", "monarch", "monarch_matmul", "ot", "rbf", "rbf_build_grid",
           "rbf_features", "rbf_knn", "registered_platforms", "sinkhorn", "sinkhorn_cost", "sinkhorn_points",
           "sinkhorn_step", "sparse", "sparse_linear", "vq", "vq_linear"]
