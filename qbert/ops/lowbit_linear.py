"""lowbit_linear: weight-only low-bit linear layer, W{2,3,4,8}A16 (activations stay in floating point).

Math (the reference below is the specification), with codes u unpacked from ``w_packed`` (the layout is
stated once, in ``qbert.quant.packing``) and g(k) = k // group_size:
    w[n, k]   = (u[n, k] - zero[g(k), n]) * scales[g(k), n]        (float32; zero = 2**(bits-1) when
                                                                     ``zeros`` is None: symmetric codes)
    out[m, n] = (sum_k x[m, k] * w[n, k] + bias[n]).to(x.dtype)     (accumulated in float32)
Kernels dequantize in registers and never materialize the float weight.
Shapes: x [..., K] float32 / float16 / bfloat16; w_packed int32 [ceil(K/32)*bits, N]; scales float32
[ceil(K/group_size), N]; zeros uint8 of the same shape, or None; bits in {2, 3, 4, 8}; group_size a
positive multiple of 32, or >= K for one group per row (per-channel scales); bias [N] (any float dtype)
or None -> out [..., N] in x.dtype. All contiguous, on one device.
"""

from __future__ import annotations

import torch

from qbert.ops import _checks
from qbert.ops._registry import Row, op
from qbert.quant.lowbit import dequantize_lowbit
from qbert.quant.packing import BITS_CHOICES, unpack

NAME = "lowbit_linear"


def _check(x, w_packed, scales, zeros, bits, group_size, bias) -> None:
    _checks.check_lowbit_linear(NAME, x, w_packed, scales, zeros, bits, group_size, bias, BITS_CHOICES)


@torch.library.custom_op("qbert::lowbit_linear", mutates_args=())
def lowbit_linear(x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  bits: int, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantize(w_packed).T + bias`` with packed low-bit weights; returns [..., N] in x.dtype."""
    _check(x, w_packed, scales, zeros, bits, group_size, bias)
    out = _OP(x.reshape(-1, x.shape[-1]), w_packed, scales, zeros, bits, group_size, bias)
    return out.view(*x.shape[:-1], w_packed.shape[1])


@lowbit_linear.register_fake
def _(x, w_packed, scales, zeros, bits, group_size, bias=None):
    _check(x, w_packed, scales, zeros, bits, group_size, bias)
    return x.new_empty((*x.shape[:-1], w_packed.shape[1]))


def lowbit_linear_reference(x, w_packed, scales, zeros, bits, group_size, bias):
    k = x.shape[-1]
    w = dequantize_lowbit(unpack(w_packed, bits, k), scales, zeros, bits, group_size)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _triton(x, w_packed, scales, zeros, bits, group_size, bias):
    from qbert.kernels.lowbit_linear import lowbit_linear_triton

    return lowbit_linear_triton(x, w_packed, scales, zeros, bits, group_size, bias)


_OP = op(NAME, reference=lowbit_linear_reference,
         cpu=Row(kernel="lowbit_linear_cpu"),
         triton=Row(_triton, bf16_dot=True),
         cuda=Row(kernel="lowbit_linear_cuda"))
