"""quantize_per_token: symmetric int8 quantization of each row of the last dim.

Math (the reference below is the specification), per row i of finite values:
    scale[i] = max_k |x[i, k]| / 127          (float32; 1 where that is 0: an all-zero row, or one whose
                                               max / 127 underflows to 0, gets scale 1 and codes 0)
    q[i, k]  = clamp(round_half_even(x[i, k] / scale[i]), -127, 127)   (x / scale in float32)
A row holding a NaN or an infinity gets scale NaN and codes 0, so whatever dequantizes it (q * scale, the
int8 GEMM epilogues) gives NaN for that token only; every other row is quantized as above. Every backend
follows this rule, bit for bit.

Shapes: x [..., K] float32 / float16 / bfloat16, contiguous, K >= 1 -> q int8 [..., K], scale float32 [...].
The same function quantizes a weight [N, K] per output channel.
"""

from __future__ import annotations

import torch

from qbert.ops import _checks
from qbert.ops._registry import Row, op
from qbert.quant.int8 import INT8_QMAX

NAME = "quantize_per_token"


def _check(x: torch.Tensor) -> None:
    _checks.check_dtype(NAME, "x", x, *_checks.FLOAT_DTYPES)
    _checks.check_ndim(NAME, "x", x, min_ndim=1)
    _checks.check_nonempty_k(NAME, "x", x)
    _checks.check_contiguous(NAME, x=x)


@torch.library.custom_op("qbert::quantize_per_token", mutates_args=())
def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 quantization of ``x`` [..., K]; returns ``(q int8 [..., K], scale f32 [...])``."""
    _check(x)
    q, scale = _OP(x.reshape(-1, x.shape[-1]))
    return q.view(x.shape), scale.view(x.shape[:-1])


@quantize_per_token.register_fake
def _(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x)
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


def quantize_per_token_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification, for x [M, K]; returns ``(q int8 [M, K], scale float32 [M])``."""
    xf = x.float()
    finite = xf.isfinite().all(dim=-1)                                   # [M]
    xf = xf.masked_fill(~finite[:, None], 0.0)  # a non-finite row quantizes as zeros, then gets scale NaN
    amax = xf.abs().amax(dim=-1)
    # Divide by a tensor, not the Python number: PyTorch's CUDA kernel turns division by a scalar into a
    # multiplication by its reciprocal, which can differ by an ulp; tensor division is IEEE on every device.
    scale = amax / torch.full_like(amax, INT8_QMAX)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / scale[:, None]).clamp_(-INT8_QMAX, INT8_QMAX).to(torch.int8)
    return q, scale.masked_fill(~finite, float("nan"))


def _triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from qbert.kernels.quantize_per_token import quantize_per_token_triton

    return quantize_per_token_triton(x)


_OP = op(NAME, reference=quantize_per_token_reference,
         cpu=Row(kernel="quantize_per_token_cpu"),
         triton=Row(_triton),
         cuda=Row(kernel="quantize_per_token_cuda"))  # csrc/cuda/row_quantize: any K
