"""Quantization types and constants (the single statement of every integer format)."""

from qbert.quant.int8 import INT8_GEMM_MAX_K, INT8_QMAX

__all__ = ["INT8_GEMM_MAX_K", "INT8_QMAX"]
