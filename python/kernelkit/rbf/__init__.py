"""NeuRBF adaptive radial-basis fields: the k-nearest-centre search through a uniform grid
(:func:`knn`, :func:`build_grid`), the fused field evaluation (:func:`rbf_features`: kernel,
normalization, multi-frequency sinusoids and weighted sum in one pass, with its backward), and the
``RBFField`` module (adaptive RBF features + an optional multi-resolution grid + a small MLP decoder,
initialised by weighted k-means).  Kernel ops: ``ops`` (custom ops kernelkit::rbf_*); references:
``reference``.
"""
from . import ops, reference
from .field import DenseGrid, GridConfig, RBFField, SineMLP
from .init import InitResult, init_from_samples, shapes_from_clusters, weighted_kmeans
from .ops import build_grid, knn, rbf_features
from .reference import log_omegas, spatial_order

__all__ = ["ops", "reference", "build_grid", "knn", "rbf_features", "log_omegas", "spatial_order", "RBFField", "GridConfig",
           "DenseGrid", "SineMLP", "init_from_samples", "weighted_kmeans", "shapes_from_clusters", "InitResult"]
