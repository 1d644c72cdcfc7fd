"""add_layernorm_quantize: residual add + LayerNorm, and the per-token int8 codes of the result, in one op.

In a W8A8 BERT layer the QKV and FFN1 projections read a LayerNorm's output; producing its int8 codes
and per-token scales in the LayerNorm kernel saves a second pass over the activations.

Math (the reference below is the specification):
    h        = x + residual        in x.dtype, as PyTorch adds (h = x when residual is None)
    y        = layer_norm(h, (K,), weight.float(), bias.float(), eps).to(x.dtype)   (the exact LayerNorm of
                                   h, here computed in float64, rounded once to x.dtype)
    y_q, y_scale = quantize_per_token(y)   (of the y that is returned: scale = amax_k |y| / 127,
                                            y_q = clamp(round_half_even(y / scale), -127, 127))
A row of h holding a NaN or an infinity (in x, in residual, or an overflowing add) gives a y row of NaN,
y_scale NaN and codes 0 (quantize_per_token's rule); every other row is as above. Rows anywhere in the
float32 range are normalized correctly: the kernels, which compute in float32, first scale a row of large
values by a power of two (exactly), so that its variance cannot overflow.
Shapes: x [..., K] float32 / float16 / bfloat16, K >= 1; residual like x (shape and dtype) or None;
weight [K] and bias [K] (or None) of any float dtype; eps in [EPS_MIN, EPS_MAX] = [2**-126, float32 max]
(it is added to a float32 variance: a subnormal eps no longer keeps its own precision, nor guards the
division by sqrt(var + eps); a larger one is not a float32) -> y [..., K] x.dtype, y_q int8 [..., K],
y_scale float32 [...]. All contiguous, on one device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qbert.ops import _checks
from qbert.ops._registry import Row, op
from qbert.ops.quantize_per_token import quantize_per_token_reference

NAME = "add_layernorm_quantize"
# LayerNorm parameters are read as float32 whatever their dtype (the reference's weight.float()).
PARAM_DTYPES = (*_checks.FLOAT_DTYPES, torch.float64)
# The eps the kernels accept: normal float32 numbers (see the module docstring).
EPS_MIN = torch.finfo(torch.float32).tiny
EPS_MAX = torch.finfo(torch.float32).max


def _check(x, residual, weight, bias, eps) -> None:
    _checks.check_dtype(NAME, "x", x, *_checks.FLOAT_DTYPES)
    _checks.check_ndim(NAME, "x", x, min_ndim=1)
    _checks.check_nonempty_k(NAME, "x", x)
    k = x.shape[-1]
    if residual is not None:
        if residual.dtype != x.dtype:
            raise TypeError(f"{NAME}: residual must have x's dtype {str(x.dtype).removeprefix('torch.')}, "
                            f"got {str(residual.dtype).removeprefix('torch.')}")
        if residual.shape != x.shape:
            raise ValueError(f"{NAME}: residual must have x's shape {list(x.shape)}, got {list(residual.shape)}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        _checks.check_dtype(NAME, name, param, *PARAM_DTYPES)
        if param.shape != (k,):
            raise ValueError(f"{NAME}: {name} must have shape [K={k}] (x's last dim), got {list(param.shape)}")
    if not EPS_MIN <= eps <= EPS_MAX:  # also refuses NaN
        raise ValueError(f"{NAME}: eps must be a normal float32 number in [{EPS_MIN:.6g}, {EPS_MAX:.6g}] (added to "
                         f"a float32 variance), got {eps!r}")
    _checks.check_contiguous(NAME, x=x, residual=residual, weight=weight, bias=bias)
    _checks.check_same_device(NAME, x=x, residual=residual, weight=weight, bias=bias)


@torch.library.custom_op("qbert::add_layernorm_quantize", mutates_args=())
def add_layernorm_quantize(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                           bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y = LayerNorm(x + residual)`` and its per-token int8 codes; returns ``(y, y_q, y_scale)``."""
    _check(x, residual, weight, bias, eps)
    k = x.shape[-1]
    res = residual.reshape(-1, k) if residual is not None else None
    y, y_q, y_scale = _OP(x.reshape(-1, k), res, weight, bias, eps)
    return y.view(x.shape), y_q.view(x.shape), y_scale.view(x.shape[:-1])


@add_layernorm_quantize.register_fake
def _(x, residual, weight, bias, eps):
    _check(x, residual, weight, bias, eps)
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


def add_layernorm_quantize_reference(x, residual, weight, bias, eps):
    """The specification, for x [..., K]; returns ``(y [..., K], y_q [..., K], y_scale [...])``."""
    k = x.shape[-1]
    h = x if residual is None else x + residual
    # float64: the variance of a float32 row near the top of its range (|h| ~ 1e20) overflows float32.
    y = F.layer_norm(h.double(), (k,), weight.float().double(), None if bias is None else bias.float().double(),
                     eps)
    y = y.masked_fill(~h.isfinite().all(dim=-1, keepdim=True), float("nan")).to(x.dtype)
    y_q, y_scale = quantize_per_token_reference(y.reshape(-1, k))
    return y, y_q.view(x.shape), y_scale.view(x.shape[:-1])


def _triton(x, residual, weight, bias, eps):
    from qbert.kernels.add_layernorm_quantize import add_layernorm_quantize_triton

    return add_layernorm_quantize_triton(x, residual, weight, bias, eps)


def _triton_limits(x, residual, weight, bias, eps) -> list[str]:
    from qbert.kernels.add_layernorm_quantize import MAX_K

    if x.shape[-1] > MAX_K:
        return [f"K={x.shape[-1]} > {MAX_K}: the Triton kernel holds a whole row in one program's registers"]
    return []


_OP = op(NAME, reference=add_layernorm_quantize_reference,
         cpu=Row(kernel="add_layernorm_quantize_cpu"),
         triton=Row(_triton, limits=_triton_limits),
         cuda=Row(kernel="add_layernorm_quantize_cuda"))
