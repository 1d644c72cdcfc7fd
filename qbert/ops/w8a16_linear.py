"""w8a16_linear: weight-only int8 linear layer (activations stay in floating point).

Math (the reference below is the specification): with per-output-channel scales the scale factors out
of the sum, so the kernels multiply by it in the epilogue and never materialize a float weight:
    acc[m, n] = sum_k x[m, k] * float(w_q[n, k])      (accumulated in float32)
    out[m, n] = (acc[m, n] * w_scale[n] + bias[n]).to(x.dtype)
Shapes: x [..., K] float32 / float16 / bfloat16; w_q int8 [N, K]; w_scale float32 [N];
bias [N] (any float dtype) or None -> out [..., N] in x.dtype. All contiguous, on one device.
"""

from __future__ import annotations

import torch

from qbert.ops import _checks
from qbert.ops._registry import Row, op

NAME = "w8a16_linear"


def _check(x, w_q, w_scale, bias) -> None:
    _checks.check_float_linear(NAME, x, w_q, w_scale, bias)


@torch.library.custom_op("qbert::w8a16_linear", mutates_args=())
def w8a16_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``(x @ w_q.T) * w_scale + bias`` with an int8 weight and float activations; returns [..., N]."""
    _check(x, w_q, w_scale, bias)
    out = _OP(x.reshape(-1, x.shape[-1]), w_q, w_scale, bias)
    return out.view(*x.shape[:-1], w_q.shape[0])


@w8a16_linear.register_fake
def _(x, w_q, w_scale, bias=None):
    _check(x, w_q, w_scale, bias)
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


def w8a16_linear_reference(x, w_q, w_scale, bias):
    y = (x.float() @ w_q.float().T) * w_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _triton(x, w_q, w_scale, bias):
    from qbert.kernels.w8a16_linear import w8a16_linear_triton

    return w8a16_linear_triton(x, w_q, w_scale, bias)


_OP = op(NAME, reference=w8a16_linear_reference,
         triton=Row(_triton, bf16_dot=True))
