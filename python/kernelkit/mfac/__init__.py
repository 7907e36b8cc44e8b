"""M-FAC: matrix-free inverse-Hessian-vector products with the damped empirical Fisher.

``SlidingWindowIHVP`` (the dynamic algorithm: a window of the last m gradients, O(dm + m^2) per update
and per IHVP, optionally sharded over torch.distributed ranks), ``StaticIHVP`` (the static algorithm:
one O(dm^2) factorization, then O(dm) per IHVP and O(m) per diagonal entry, block-wise for large d),
the ``MFAC`` optimizer, the ``OBSPruner`` (with ``magnitude_masks`` as the baseline and ``to_sparse``
turning pruned nn.Linear layers into kernelkit.sparse.SparseLinear), and the kernel ops (``ops``: dots,
combine, diag, static_setup, window_rebuild, window_coef and the custom ops under kernelkit::mfac_*).
"""
from . import ops, reference
from .ihvp import SlidingWindowIHVP, StaticIHVP
from .ops import combine, diag, dots, static_setup, window_coef, window_rebuild
from .optim import MFAC
from .prune import OBSPruner, magnitude_masks, to_sparse

__all__ = ["ops", "reference", "SlidingWindowIHVP", "StaticIHVP", "MFAC", "OBSPruner", "magnitude_masks",
           "to_sparse", "dots", "combine", "diag", "static_setup", "window_rebuild", "window_coef"]
