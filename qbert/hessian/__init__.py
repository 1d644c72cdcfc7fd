"""Hessian tools for bit allocation (pure PyTorch, CPU and GPU): block Hessian-vector products, top
eigenvalues by power iteration, traces by Hutchinson's estimator, and Q-BERT / HAWQ-V2 sensitivities (for
round-to-nearest or GPTQ rounding)."""

from qbert.hessian.eigen import PowerIterationWarning, top_eigenvalues
from qbert.hessian.hvp import BlockHVP, eager_attention, hessian_mode, hvp, module_weights
from qbert.hessian.sensitivity import (
    curvature_sensitivity,
    eigen_sensitivity,
    gptq_error_ratios,
    hawq_sensitivity,
    qbert_sensitivity,
    quantization_error,
    quantize_dequantize,
)
from qbert.hessian.trace import TraceEstimate, hutchinson_traces

__all__ = ["BlockHVP", "PowerIterationWarning", "TraceEstimate", "curvature_sensitivity", "eager_attention",
           "eigen_sensitivity", "gptq_error_ratios", "hawq_sensitivity", "hessian_mode", "hutchinson_traces", "hvp",
           "module_weights", "qbert_sensitivity", "quantization_error", "quantize_dequantize", "top_eigenvalues"]
