"""int8_linear: W8A8 linear layer, the int8 GEMM with the dequantization, bias and activation fused in its
epilogue.

Math (in float32, in this order; the reference below is the specification):
    acc[m, n] = sum_k x_q[m, k] * w_q[n, k]                          (exact int32)
    y[m, n]   = (float(acc[m, n]) * x_scale[m]) * w_scale[n] + bias[n]
    y         = gelu(y)        when activation == "gelu" (the exact erf form, F.gelu's default)
    out       = y.to(out_dtype)
Shapes: x_q int8 [..., K]; x_scale float32 [...] (one scale per token, from quantize_per_token);
w_q int8 [N, K]; w_scale float32 [N]; bias [N] float32 / float16 / bfloat16 or None;
out_dtype float32 (default) / float16 / bfloat16; activation "none" (default) or "gelu" -> out [..., N].
All contiguous, on one device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qbert.ops import _checks
from qbert.ops._registry import Row, op
from qbert.ops.int8_gemm import check_operands, int8_gemm_reference

NAME = "int8_linear"
ACTIVATIONS = ("none", "gelu")


def check_activation(name: str, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: activation must be one of {ACTIVATIONS}, got {activation!r}")


def apply_activation(y: torch.Tensor, activation: str) -> torch.Tensor:
    """The epilogue activation on float32 ``y``, as the references define it."""
    return F.gelu(y) if activation == "gelu" else y


def check_int8_linear(name: str, x_q, x_scale, w_q, w_scale, bias, activation: str) -> None:
    """The checks int8_linear and int8_linear_requant share."""
    _checks.check_ndim(name, "x_q", x_q, min_ndim=1)
    check_operands(name, x_q, w_q, "x_q", "w_q")
    _checks.check_dtype(name, "x_scale", x_scale, torch.float32)
    _checks.check_dtype(name, "w_scale", w_scale, torch.float32)
    if x_scale.shape != x_q.shape[:-1]:
        raise ValueError(f"{name}: x_scale must have shape {list(x_q.shape[:-1])} (x_q's leading dims), "
                         f"got {list(x_scale.shape)}")
    n = w_q.shape[0]
    if w_scale.shape != (n,):
        raise ValueError(f"{name}: w_scale must have shape [N={n}], got {list(w_scale.shape)}")
    if bias is not None:
        _checks.check_dtype(name, "bias", bias, *_checks.FLOAT_DTYPES)
        if bias.shape != (n,):
            raise ValueError(f"{name}: bias must have shape [N={n}], got {list(bias.shape)}")
    check_activation(name, activation)
    _checks.check_contiguous(name, x_scale=x_scale, w_scale=w_scale, bias=bias)
    _checks.check_same_device(name, x_q=x_q, x_scale=x_scale, w_q=w_q, w_scale=w_scale, bias=bias)


def _check(x_q, x_scale, w_q, w_scale, bias, out_dtype, activation) -> None:
    check_int8_linear(NAME, x_q, x_scale, w_q, w_scale, bias, activation)
    if out_dtype is not None and out_dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{NAME}: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")


@torch.library.custom_op("qbert::int8_linear", mutates_args=())
def int8_linear(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                activation: str = "none") -> torch.Tensor:
    """``act((x_q @ w_q.T) * x_scale[..., None] * w_scale + bias)`` with int8 operands; returns [..., N]."""
    _check(x_q, x_scale, w_q, w_scale, bias, out_dtype, activation)
    k = x_q.shape[-1]
    out = _OP(x_q.reshape(-1, k), x_scale.reshape(-1), w_q, w_scale, bias, out_dtype or torch.float32, activation)
    return out.view(*x_q.shape[:-1], w_q.shape[0])


@int8_linear.register_fake
def _(x_q, x_scale, w_q, w_scale, bias=None, out_dtype=None, activation="none"):
    _check(x_q, x_scale, w_q, w_scale, bias, out_dtype, activation)
    return x_q.new_empty((*x_q.shape[:-1], w_q.shape[0]), dtype=out_dtype or torch.float32)


def int8_linear_float32(x_q, x_scale, w_q, w_scale, bias):
    """The reference's float32 y before the activation: ``(float(acc) * x_scale) * w_scale + bias``."""
    y = int8_gemm_reference(x_q, w_q).float() * x_scale[:, None] * w_scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y


def int8_linear_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype, activation="none"):
    return apply_activation(int8_linear_float32(x_q, x_scale, w_q, w_scale, bias), activation).to(out_dtype)


def _cpu(x_q, x_scale, w_q, w_scale, bias, out_dtype, activation):
    if activation == "none":
        return torch.ops.qbert.int8_linear_cpu(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    # GELU in float32 before the rounding to out_dtype, as in the reference: on AVX-512 in the GEMM
    # epilogue (qbert's erf, within a few ulp of torch's), elsewhere torch's GELU on the exact y.
    return torch.ops.qbert.int8_linear_gelu_cpu(x_q, x_scale, w_q, w_scale, bias).to(out_dtype)


def _triton(x_q, x_scale, w_q, w_scale, bias, out_dtype, activation):
    from qbert.kernels.int8_gemm import int8_linear_triton

    return int8_linear_triton(x_q, x_scale, w_q, w_scale, bias, out_dtype, activation)


_OP = op(NAME, reference=int8_linear_reference,
         cpu=Row(_cpu, kernel=("int8_linear_cpu", "int8_linear_gelu_cpu")),
         triton=Row(_triton),
         cuda=Row(kernel="int8_linear_cuda"))
