"""w4a8_linear: low-bit weights (2, 3 or 4 bits) times dynamically quantized int8 activations, on the
int8 tensor cores (Hopper has no int4 ones): the codes are widened to int8 in registers.

Math (the reference below is the specification). With x_q, x_scale = quantize_per_token(x), codes u
unpacked from ``w_packed`` (layout: ``qbert.quant.packing``), zero = 2**(bits-1) when ``zeros`` is None,
and the K groups G_g = [g * group_size, (g + 1) * group_size):
    q[n, k]     = u[n, k] - zero[g(k), n]                          (an int8 in [-15, 15])
    acc_g[m, n] = sum_{k in G_g} x_q[m, k] * q[n, k]                (exact int32, one per K group)
    y[m, n]     = sum_g float(acc_g[m, n]) * scales[g, n]          (float32, groups in ascending order)
    out[m, n]   = (y[m, n] * x_scale[m] + bias[n]).to(x.dtype)
Shapes: as ``lowbit_linear`` (x [..., K] float32 / float16 / bfloat16; w_packed int32
[ceil(K/32)*bits, N]; scales float32 and zeros uint8 or None, [ceil(K/group_size), N]; bias [N] or
None -> out [..., N] in x.dtype), with bits in {2, 3, 4}.
"""

from __future__ import annotations

import torch

from qbert.ops import _checks
from qbert.ops._cuda import tensor_supports
from qbert.ops._registry import op
from qbert.ops.int8_gemm import int8_gemm_reference
from qbert.ops.quantize_per_token import quantize_per_token_reference
from qbert.quant.lowbit import implicit_zero
from qbert.quant.packing import unpack

NAME = "w4a8_linear"
_OP = op(NAME)
W4A8_BITS = (2, 3, 4)  # (u - zero) must fit an int8 operand


def _check(x, w_packed, scales, zeros, bits, group_size, bias) -> None:
    _checks.check_lowbit_linear(NAME, x, w_packed, scales, zeros, bits, group_size, bias, W4A8_BITS)


@torch.library.custom_op("qbert::w4a8_linear", mutates_args=())
def w4a8_linear(x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                bits: int, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Low-bit weights x per-token int8 activations on int8 GEMMs; returns [..., N] in x.dtype."""
    _check(x, w_packed, scales, zeros, bits, group_size, bias)
    out = _OP(x.reshape(-1, x.shape[-1]), w_packed, scales, zeros, bits, group_size, bias)
    return out.view(*x.shape[:-1], w_packed.shape[1])


@w4a8_linear.register_fake
def _(x, w_packed, scales, zeros, bits, group_size, bias=None):
    _check(x, w_packed, scales, zeros, bits, group_size, bias)
    return x.new_empty((*x.shape[:-1], w_packed.shape[1]))


def signed_codes(w_packed: torch.Tensor, zeros: torch.Tensor | None, bits: int, k: int,
                 group_size: int) -> torch.Tensor:
    """``q = u - zero`` as int8 [N, K] (the weight operand the int8 GEMM sees)."""
    codes = unpack(w_packed, bits, k).to(torch.int16)
    if zeros is None:
        return (codes - implicit_zero(bits)).to(torch.int8)
    group = torch.arange(k, device=w_packed.device) // group_size
    return (codes - zeros.to(torch.int16)[group].T).to(torch.int8)


def w4a8_linear_reference(x, w_packed, scales, zeros, bits, group_size, bias):
    k = x.shape[-1]
    x_q, x_scale = quantize_per_token_reference(x)
    q = signed_codes(w_packed, zeros, bits, k, group_size)
    y = torch.zeros(x.shape[0], w_packed.shape[1], dtype=torch.float32, device=x.device)
    for g, start in enumerate(range(0, k, group_size)):
        stop = min(start + group_size, k)
        acc = int8_gemm_reference(x_q[:, start:stop].contiguous(), q[:, start:stop].contiguous())
        y = y + acc.float() * scales[g]
    y = y * x_scale[:, None]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


_OP.register("reference", w4a8_linear_reference)


def _triton(x, w_packed, scales, zeros, bits, group_size, bias):
    # Runs under the interpreter for bf16 x too: x is quantized to int8 before any dot.
    from qbert.kernels.lowbit_linear import w4a8_linear_triton

    return w4a8_linear_triton(x, w_packed, scales, zeros, bits, group_size, bias)


_OP.register("triton", _triton)


def _cpu(x, w_packed, scales, zeros, bits, group_size, bias):
    return torch.ops.qbert.w4a8_linear_cpu(x, w_packed, scales, zeros, bits, group_size, bias)


_OP.register("cpu", _cpu)


def _cuda(x, w_packed, scales, zeros, bits, group_size, bias):
    return torch.ops.qbert.w4a8_linear_cuda(x, w_packed, scales, zeros, bits, group_size, bias)


_OP.register("cuda", _cuda, tensor_supports)
