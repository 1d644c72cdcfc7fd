"""w8a8_linear: a whole W8A8 linear layer from float activations, in one op.

Math (the reference below is the specification): per-token int8 quantization of x followed by int8_linear,
    x_q, x_scale = quantize_per_token(x)
    out = int8_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype=x.dtype)
so it equals the two ops called in turn, exactly. One op instead of two halves the per-call dispatch cost,
which is a measurable share of a small encoder's forward, and lets a backend keep x_q on chip.
A token (row of x) holding a NaN or an infinity gets x_scale NaN (quantize_per_token's rule), so its
whole output row is NaN; every other row is exactly as above.
Shapes: x [..., K] float32 / float16 / bfloat16, 1 <= K <= INT8_GEMM_MAX_K (131071: beyond it the int32
sums can overflow); w_q int8 [N, K]; w_scale float32 [N]; bias [N] (any float dtype) or None
-> out [..., N] in x.dtype. All contiguous, on one device.
"""

from __future__ import annotations

import torch

from qbert.ops import _checks
from qbert.ops._registry import Row, op
from qbert.ops.int8_linear import int8_linear_reference
from qbert.ops.quantize_per_token import quantize_per_token_reference

NAME = "w8a8_linear"


def _check(x, w_q, w_scale, bias) -> None:
    _checks.check_float_linear(NAME, x, w_q, w_scale, bias)
    _checks.check_int8_gemm_k(NAME, "x", x)


@torch.library.custom_op("qbert::w8a8_linear", mutates_args=())
def w8a8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``int8_linear(*quantize_per_token(x), w_q, w_scale, bias, out_dtype=x.dtype)``; returns [..., N]."""
    _check(x, w_q, w_scale, bias)
    out = _OP(x.reshape(-1, x.shape[-1]), w_q, w_scale, bias)
    return out.view(*x.shape[:-1], w_q.shape[0])


@w8a8_linear.register_fake
def _(x, w_q, w_scale, bias=None):
    _check(x, w_q, w_scale, bias)
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


def w8a8_linear_reference(x, w_q, w_scale, bias):
    x_q, x_scale = quantize_per_token_reference(x)
    return int8_linear_reference(x_q, x_scale, w_q, w_scale, bias, x.dtype)


def _cpu(x, w_q, w_scale, bias):
    x_q, x_scale = torch.ops.qbert.quantize_per_token_cpu(x)
    return torch.ops.qbert.int8_linear_cpu(x_q, x_scale, w_q, w_scale, bias, x.dtype)


def _triton(x, w_q, w_scale, bias):
    from qbert.kernels.int8_gemm import int8_linear_triton
    from qbert.kernels.quantize_per_token import quantize_per_token_triton

    x_q, x_scale = quantize_per_token_triton(x)
    return int8_linear_triton(x_q, x_scale, w_q, w_scale, bias, x.dtype)


def _cuda(x, w_q, w_scale, bias):
    x_q, x_scale = torch.ops.qbert.quantize_per_token_cuda(x)
    return torch.ops.qbert.int8_linear_cuda(x_q, x_scale, w_q, w_scale, bias, x.dtype, "none")


_OP = op(NAME, reference=w8a8_linear_reference,
         cpu=Row(_cpu, kernel=("quantize_per_token_cpu", "int8_linear_cpu")),
         triton=Row(_triton),
         cuda=Row(_cuda, kernel=("quantize_per_token_cuda", "int8_linear_cuda")))
