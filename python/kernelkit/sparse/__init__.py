"""Unstructured-sparse linear layers on sparse kernels: the op, SparseLinear, Sparse-IFT
transformations and dynamic sparse training (RigL, SET)."""
from .format import SparseLayout, mask_from_scores
from .layers import SparseLinear, check_sparsity, random_mask
from .ops import BREAK_EVEN_SPARSITY, dense_grad, sparse_linear
from .reference import sparse_linear_reference

__all__ = ["SparseLayout", "SparseLinear", "sparse_linear", "sparse_linear_reference", "dense_grad",
           "mask_from_scores", "random_mask", "check_sparsity", "BREAK_EVEN_SPARSITY"]
from .dst import SET, LayerUpdate, MaskUpdate, RigL, remap_state
from .transforms import (LayerReport, RowBatchNorm1d, SparseDopedLinear, SparseFactorizedLinear, SparseParallelLinear,
                         SparsifyReport, dense_grad_flops, doped_rank, factorized_width, forward_flops,
                         iso_flop_scale, layer_flops, sparsify_, wide_width)

__all__ += ["sparsify_", "SparsifyReport", "LayerReport", "SparseParallelLinear", "SparseFactorizedLinear",
            "SparseDopedLinear", "RowBatchNorm1d", "iso_flop_scale", "wide_width", "factorized_width", "doped_rank",
            "forward_flops", "layer_flops", "dense_grad_flops", "RigL", "SET", "remap_state", "MaskUpdate",
            "LayerUpdate"]
