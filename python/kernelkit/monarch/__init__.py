"""Monarch (block-diagonal) matrices: the op, MonarchLinear, and dense -> Monarch projection."""
from .layers import MonarchLinear
from .ops import monarch_matmul
from .projection import monarch_shapes, project, project_factors
from .reference import monarch_bmm, monarch_reference, monarch_to_dense

__all__ = ["MonarchLinear", "monarch_matmul", "project", "project_factors", "monarch_shapes",
           "monarch_reference", "monarch_to_dense", "monarch_bmm"]
