"""Entropic optimal transport: log-domain Sinkhorn and the Sinkhorn-Newton-Sparse solver on fused kernels.

POT-compatible ``sinkhorn`` / ``sinkhorn2`` (numpy or torch, same arguments, returns, log keys and
warning as POT's ``method="sinkhorn_log"``; plus ``method="sns"``), ``sinkhorn_cost`` and
``sinkhorn_points`` (the regularized cost with envelope-theorem gradients; point clouds without a cost
matrix), the batched engine ``solve`` and the kernel ops (``ops``: sinkhorn_step, marginals, plan,
sparsify, hvp, cg, points_grad).
"""
from . import ops, reference
from .ops import Cost, cg, hvp, marginals, plan, points_grad, sinkhorn_step, sparsify
from .pot import NOT_CONVERGED, sinkhorn, sinkhorn2, sinkhorn_cost, sinkhorn_points
from .solvers import METHODS, SolveResult, dual_value, solve

__all__ = ["ops", "reference", "Cost", "sinkhorn_step", "marginals", "plan", "sparsify", "hvp", "cg", "points_grad",
           "sinkhorn", "sinkhorn2", "sinkhorn_cost", "sinkhorn_points", "solve", "dual_value", "SolveResult",
           "METHODS", "NOT_CONVERGED"]
