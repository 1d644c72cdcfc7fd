"""Operands shared by the low-bit op tests: random packed codes, scales and zeros over the full range."""

from __future__ import annotations

import torch

from qbert.ops.quantize_per_token import quantize_per_token_reference
from qbert.ops.w4a8_linear import signed_codes
from qbert.quant.lowbit import dequantize_lowbit
from qbert.quant.packing import pack, unpack

# (M, N, K, group_size): one-element, ragged sizes just past a tile, K groups of 32 / 64 / 128, one group
# per row (group_size >= K, per-channel scales), and a BERT-base projection.
CASES = [(1, 1, 1, 1), (7, 13, 129, 129), (7, 13, 129, 32), (13, 257, 64, 64), (129, 13, 257, 128),
         (16, 768, 768, 128)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def case_id(case) -> str:
    m, n, k, group = case
    return f"M{m}-N{n}-K{k}-g{group}"


def lowbit_operands(m, n, k, group_size, bits, dtype, device, symmetric=False, bias=True, seed=0):
    """``(x, w_packed, scales, zeros, bits, group_size, bias)`` with codes over the whole range."""
    g = torch.Generator().manual_seed(seed + m * 31 + n * 7 + k * 3 + bits)
    groups = -(-k // group_size)
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g)
    scales = torch.rand(groups, n, generator=g) / 50 + 1e-4
    zeros = None if symmetric else torch.randint(0, 1 << bits, (groups, n), dtype=torch.uint8, generator=g)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    tensors = [t if t is None else t.to(device) for t in (x, pack(codes, bits), scales, zeros, b)]
    x, w_packed, scales, zeros, b = tensors
    return x, w_packed, scales, zeros, bits, group_size, b


def w4a8_truth(x, w_packed, scales, zeros, bits, group_size, bias):
    """float64 math on the same integer codes (the per-token int8 activations and the weight codes)."""
    x, w_packed, scales = x.cpu(), w_packed.cpu(), scales.cpu()
    zeros = None if zeros is None else zeros.cpu()
    k = x.shape[-1]
    x_q, x_scale = quantize_per_token_reference(x)
    q = signed_codes(w_packed, zeros, bits, k, group_size).double()
    group = torch.arange(k) // group_size
    w = q * scales.double()[group].T
    y = (x_q.double() @ w.T) * x_scale.double()[:, None]
    if bias is not None:
        y = y + bias.double().cpu()
    return y


def lowbit_truth_and_baseline(x, w_packed, scales, zeros, bits, group_size, bias):
    """float64 math on the same codes, and PyTorch's same-dtype linear with the weight dequantized to it."""
    k = x.shape[-1]
    w = dequantize_lowbit(unpack(w_packed.cpu(), bits, k), scales.cpu(), None if zeros is None else zeros.cpu(),
                          bits, group_size)
    truth = x.double().cpu() @ w.double().T
    if bias is not None:
        truth = truth + bias.double().cpu()
    same_dtype = torch.nn.functional.linear(x.cpu(), w.to(x.dtype), None if bias is None else bias.cpu())
    return truth, same_dtype
