"""int8_linear_requant: a W8A8 linear layer whose output is int8 again, for the next int8 GEMM.

The epilogue dequantizes, adds the bias, applies the activation and re-quantizes each output row (token)
with its own scale, so a layer that feeds another W8A8 layer (BERT's FFN up-projection + GELU feeding the
down-projection) never writes or reads its float output. The per-token scale needs the max over the
whole output row, which a GPU kernel gathers across the column tiles of that row inside the epilogue.

Math (the reference below is the specification):
    y          = act((float(x_q @ w_q.T) * x_scale[:, None]) * w_scale + bias)   (float32, as int8_linear
                                                                                  with out_dtype=float32)
    y_q, y_scale = quantize_per_token(y)      (y_scale[m] = max_n |y[m, n]| / 127, codes round half to even)
A row of y holding a NaN or an infinity (a NaN x_scale, a NaN / infinite scale or bias, an overflow) gets
y_scale NaN and codes 0 (quantize_per_token's rule); every other row is exactly as above. With N = 0 the
result is y_q [..., 0] and y_scale 1 (an empty row counts as an all-zero one).
Shapes: x_q int8 [..., K]; x_scale float32 [...]; w_q int8 [N, K]; w_scale float32 [N]; bias [N] (any
float dtype) or None; activation "none" or "gelu" -> (y_q int8 [..., N], y_scale float32 [...]).
All contiguous, on one device.
"""

from __future__ import annotations

import torch

from qbert.ops._registry import Row, op
from qbert.ops.int8_linear import apply_activation, check_int8_linear, int8_linear_float32
from qbert.ops.quantize_per_token import quantize_per_token_reference

NAME = "int8_linear_requant"


def _check(x_q, x_scale, w_q, w_scale, bias, activation) -> None:
    check_int8_linear(NAME, x_q, x_scale, w_q, w_scale, bias, activation)


@torch.library.custom_op("qbert::int8_linear_requant", mutates_args=())
def int8_linear_requant(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                        bias: torch.Tensor | None = None,
                        activation: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_per_token(act(int8_linear(x_q, x_scale, w_q, w_scale, bias)))``; returns
    ``(y_q int8 [..., N], y_scale float32 [...])``."""
    _check(x_q, x_scale, w_q, w_scale, bias, activation)
    lead = x_q.shape[:-1]
    if w_q.shape[0] == 0:
        return no_columns(x_q)
    y_q, y_scale = _OP(x_q.reshape(-1, x_q.shape[-1]), x_scale.reshape(-1), w_q, w_scale, bias, activation)
    return y_q.view(*lead, w_q.shape[0]), y_scale.view(lead)


@int8_linear_requant.register_fake
def _(x_q, x_scale, w_q, w_scale, bias=None, activation="none"):
    _check(x_q, x_scale, w_q, w_scale, bias, activation)
    lead = x_q.shape[:-1]
    return x_q.new_empty((*lead, w_q.shape[0])), x_q.new_empty(lead, dtype=torch.float32)


def no_columns(x_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The result for N = 0: ``(y_q int8 [..., 0], y_scale = 1 [...])``, as for an all-zero row."""
    lead = x_q.shape[:-1]
    return x_q.new_empty((*lead, 0)), torch.ones(lead, dtype=torch.float32, device=x_q.device)


def int8_linear_requant_reference(x_q, x_scale, w_q, w_scale, bias, activation):
    if w_q.shape[0] == 0:
        return no_columns(x_q)
    return quantize_per_token_reference(
        apply_activation(int8_linear_float32(x_q, x_scale, w_q, w_scale, bias), activation))


def _cpu(x_q, x_scale, w_q, w_scale, bias, activation):
    # The C++ int8 GEMM gives the exact float32 y (its epilogue rounds like the reference), with GELU on
    # AVX-512 in the epilogue too (qbert's erf, within a few ulp of torch's: a code on a rounding boundary
    # can move by one step); the quantizer then runs on it. Without the activation, or below AVX-512
    # (torch's GELU), the result is the reference's bit for bit.
    if activation == "gelu":
        y = torch.ops.qbert.int8_linear_gelu_cpu(x_q, x_scale, w_q, w_scale, bias)
    else:
        y = torch.ops.qbert.int8_linear_cpu(x_q, x_scale, w_q, w_scale, bias, torch.float32)
    return torch.ops.qbert.quantize_per_token_cpu(y)


def _triton(x_q, x_scale, w_q, w_scale, bias, activation):
    from qbert.kernels.int8_gemm import int8_linear_triton
    from qbert.kernels.quantize_per_token import quantize_per_token_triton

    # Two kernels: the Triton GEMM's tiles cannot share a row's max, so the float32 y makes one round
    # trip through memory (the CUDA kernel avoids it). Both round like the reference: exact.
    y = int8_linear_triton(x_q, x_scale, w_q, w_scale, bias, torch.float32, activation)
    return quantize_per_token_triton(y)


_OP = op(NAME, reference=int8_linear_requant_reference,
         cpu=Row(_cpu, kernel=("int8_linear_cpu", "int8_linear_gelu_cpu", "quantize_per_token_cpu")),
         triton=Row(_triton),
         cuda=Row(kernel="int8_linear_requant_cuda"))
