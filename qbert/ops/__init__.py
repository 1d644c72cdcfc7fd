"""qbert's ops, each dispatching over backends: torch.library custom ops (``torch.ops.qbert.<name>``), but for
the eager-only ``w8a8_encoder_layer``."""

from qbert.ops._registry import BACKENDS, OPS, BackendError, FallbackWarning, use_backend
from qbert.ops.add_layernorm_quantize import add_layernorm_quantize
from qbert.ops.block_sparse_attention import block_sparse_attention
from qbert.ops.int8_gemm import int8_gemm
from qbert.ops.int8_linear import int8_linear
from qbert.ops.int8_linear_requant import int8_linear_requant
from qbert.ops.lowbit_linear import lowbit_linear
from qbert.ops.quantize_per_token import quantize_per_token
from qbert.ops.varlen_attention import varlen_attention
from qbert.ops.w4a8_linear import w4a8_linear
from qbert.ops.w8a8_encoder_layer import w8a8_encoder_layer
from qbert.ops.w8a8_linear import w8a8_linear
from qbert.ops.w8a16_linear import w8a16_linear

__all__ = ["BACKENDS", "OPS", "BackendError", "FallbackWarning", "add_layernorm_quantize", "block_sparse_attention",
           "int8_gemm", "int8_linear", "int8_linear_requant",
           "lowbit_linear", "quantize_per_token", "use_backend", "varlen_attention", "w4a8_linear", "w8a8_encoder_layer", "w8a8_linear", "w8a16_linear"]
