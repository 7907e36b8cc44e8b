"""Vector-quantized linear layers (VQ4DiT, AQLM) on dequant-matmul kernels: the ops, VQLinear, the
k-means quantizer, AQLM checkpoint import and VQ4DiT calibration."""
from .ops import PATHS, assign, bits_per_weight, check_codes, dequantize, vq_linear
from .reference import dequantize_reference, unsigned_codes, vq_linear_reference
from .format import bits_for, code_dtype, index_bits, pack_codes, unpack_codes, vq4dit_codebook_size
from .quantize import (KMeansResult, LayerQuantReport, QuantizeReport, QuantizedWeight, clamp_codebook_size,
                       kmeans, quantize_, quantize_weight, residual_kmeans)
from .layers import VQLinear
from .aqlm import from_aqlm
from .calibrate import CalibrationReport, SoftVQLinear, block_mse, calibrate

__all__ = ["vq_linear", "dequantize", "assign", "check_codes", "bits_per_weight", "PATHS", "vq_linear_reference",
           "dequantize_reference", "unsigned_codes",
           "code_dtype", "index_bits", "pack_codes", "unpack_codes", "bits_for", "vq4dit_codebook_size",
           "kmeans", "residual_kmeans", "KMeansResult", "quantize_", "quantize_weight", "QuantizedWeight",
           "QuantizeReport", "LayerQuantReport", "clamp_codebook_size", "VQLinear", "from_aqlm",
           "calibrate", "CalibrationReport", "SoftVQLinear", "block_mse"]
