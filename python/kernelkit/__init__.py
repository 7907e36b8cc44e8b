"""kernelkit: fast paths of efficient-ML papers as PyTorch ops, layers, and a plain C library.

Families: ``kernelkit.monarch`` (block-diagonal Monarch matmul), ``kernelkit.sparse`` (unstructured-sparse
linear layers, Sparse-IFT, RigL/SET), ``kernelkit.vq`` (vector-quantized linear layers: VQ4DiT, AQLM), ``kernelkit.ot`` (log-domain Sinkhorn and
Sinkhorn-Newton-Sparse, POT-compatible), ``kernelkit.mfac`` (M-FAC inverse-Hessian-vector products, the
MFAC optimizer, OBS pruning), ``kernelkit.rbf`` (NeuRBF adaptive radial-basis fields).  Backends: torch
(reference), cpu (C++/OpenMP), triton, cuda (C++); see :func:`backends` and :func:`backend`.
``kernelkit.jax`` (imported on its own) has each family's main op for JAX.
"""
from ._backend import (BackendUnavailableError, KernelkitFallbackWarning, backend, backends)
from ._lib import get_cmake_dir, get_include, get_library

__version__ = "0.1.0"

from . import mfac, monarch, nn, ot, rbf, sparse, vq  # noqa: E402  (after the helpers they use)

__all__ = ["backend", "backends", "BackendUnavailableError", "KernelkitFallbackWarning",
           "get_cmake_dir", "get_include", "get_library", "mfac", "monarch", "nn", "ot", "rbf", "sparse", "vq",
           "__version__"]
