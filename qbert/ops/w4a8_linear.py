"""w4a8_linear: low-bit weights (2, 3 or 4 bits) times dynamically quantized int8 activations, on the
int8 tensor cores (Hopper has no int4 ones): the codes are widened to int8 in registers.

Math (the reference below is the specification). With x_q, x_scale = quantize_per_token(x), codes u
unpacked from ``w_packed`` (layout: ``qbert.quant.packing``), zero = 2**(bits-1) when ``zeros`` is None,
and the K groups G_g = [g * group_size, (g + 1) * group_size):
    q[n, k]     = u[n, k] - zero[g(k), n]                          (an int8 in [-(2**bits - 1), 2**bits - 1])
    acc_g[m, n] = sum_{k in G_g} x_q[m, k] * q[n, k]                (exact int32, one per K group)
    y[m, n]     = sum_g float(acc_g[m, n]) * scales[g, n]          (float32, groups in ascending order)
    out[m, n]   = (y[m, n] * x_scale[m] + bias[n]).to(x.dtype)
A token (row of x) holding a NaN or an infinity gets x_scale NaN (quantize_per_token's rule), so its whole
output row is NaN; every other row is exactly as above.
Shapes: as ``lowbit_linear`` (x [..., K] float32 / float16 / bfloat16; w_packed int32
[ceil(K/32)*bits, N]; scales float32 and zeros uint8 or None, [ceil(K/group_size), N]; bias [N] or
None -> out [..., N] in x.dtype), with bits in {2, 3, 4}. Constraints beyond lowbit_linear's, so that
every integer is exact: zero points are codes of ``bits`` bits, in [0, 2**bits - 1] (so q fits an int8
operand; checked on every call outside CUDA graph capture), and a K group, min(group_size, K), has at
most W4A8_MAX_GROUP_K = 1127288 elements (so its int32 sum cannot overflow).
"""

from __future__ import annotations

import torch

from qbert.ops import _checks
from qbert.ops._registry import Row, op
from qbert.ops.int8_gemm import int8_gemm_reference
from qbert.ops.quantize_per_token import quantize_per_token_reference
from qbert.quant.int8 import INT8_QMAX
from qbert.quant.lowbit import implicit_zero
from qbert.quant.packing import unpack

NAME = "w4a8_linear"
W4A8_BITS = (2, 3, 4)  # (u - zero) must fit an int8 operand
# The most elements a K group may have: |x_q| <= 127 and |q| <= 2**4 - 1, so a group's int32 sum is exact
# while W4A8_MAX_GROUP_K * 127 * 15 <= 2**31 - 1.
W4A8_MAX_GROUP_K = (2**31 - 1) // (INT8_QMAX * ((1 << max(W4A8_BITS)) - 1))


def _check(x, w_packed, scales, zeros, bits, group_size, bias) -> None:
    _checks.check_lowbit_linear(NAME, x, w_packed, scales, zeros, bits, group_size, bias, W4A8_BITS)
    group_k = min(group_size, x.shape[-1])
    if group_k > W4A8_MAX_GROUP_K:
        raise ValueError(f"{NAME}: a K group of {group_k} elements (min(group_size={group_size}, K={x.shape[-1]})) "
                         f"exceeds {W4A8_MAX_GROUP_K}, beyond which its int32 sum can overflow")


def check_zero_points(zeros: torch.Tensor | None, bits: int) -> None:
    """Zero points must be codes of ``bits`` bits: u - zero then fits an int8 operand (larger ones would
    wrap). Reads the values: the real op only (not the fake one)."""
    if zeros is None or zeros.numel() == 0 or not _checks.values_readable(zeros):
        return
    top = (1 << bits) - 1
    largest = int(zeros.max())
    if largest > top:
        raise ValueError(f"{NAME}: zero points must be in [0, {top}] for bits={bits} (u - zero must fit an int8 "
                         f"operand), got a zero point of {largest}")


@torch.library.custom_op("qbert::w4a8_linear", mutates_args=())
def w4a8_linear(x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                bits: int, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Low-bit weights x per-token int8 activations on int8 GEMMs; returns [..., N] in x.dtype."""
    _check(x, w_packed, scales, zeros, bits, group_size, bias)
    check_zero_points(zeros, bits)
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


def _triton(x, w_packed, scales, zeros, bits, group_size, bias):
    from qbert.kernels.lowbit_linear import w4a8_linear_triton

    return w4a8_linear_triton(x, w_packed, scales, zeros, bits, group_size, bias)


_OP = op(NAME, reference=w4a8_linear_reference,
         cpu=Row(kernel="w4a8_linear_cpu"),
         triton=Row(_triton),  # no bf16_dot: x is quantized to int8 before any dot, so bf16 x runs anywhere
         cuda=Row(kernel="w4a8_linear_cuda"))
