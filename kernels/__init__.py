"""Compute kernels behind `qdora.QDoRALinear` (installed as `qdora.kernels`)."""

from qdora.kernels.nf4 import NF4_CODE, dequantize_nf4, dequantize_nf4_reference

__all__ = ["NF4_CODE", "dequantize_nf4", "dequantize_nf4_reference"]
