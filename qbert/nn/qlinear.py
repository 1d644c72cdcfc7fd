"""QLinear: a drop-in replacement for ``nn.Linear`` with int8 weights (formats in ``qbert/nn/formats.py``).

    y = x @ W.T + bias,   W ~= w_q * w_scale[:, None]   (w_q int8 [N, K], w_scale float32 [N])

``w8a8`` quantizes x per token on the fly and runs the int8 GEMM with the dequantization and bias
fused (``qbert.ops.w8a8_linear``: ``quantize_per_token`` then ``int8_linear``, in one op); ``w8a16`` keeps x
in floating point and runs ``qbert.ops.w8a16_linear``. Both return x's dtype. The backend is chosen by the op registry, never
by this module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from qbert import ops
from qbert.nn.formats import linear_format
from qbert.ops._checks import FLOAT_DTYPES


def _forward_w8a8(layer: QLinear, x: torch.Tensor) -> torch.Tensor:
    return ops.w8a8_linear(x, layer.w_q, layer.w_scale, layer.bias)


def _forward_w8a16(layer: QLinear, x: torch.Tensor) -> torch.Tensor:
    return ops.w8a16_linear(x, layer.w_q, layer.w_scale, layer.bias)


# One forward per format in qbert.nn.formats.FORMATS (tests/nn/test_qlinear.py checks they match).
FORWARDS: dict[str, Callable[[QLinear, torch.Tensor], torch.Tensor]] = {
    "w8a8": _forward_w8a8,
    "w8a16": _forward_w8a16,
}


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_q int8 [N, K], w_scale float32 [N])``: symmetric int8 codes, one scale per output channel."""
    return ops.quantize_per_token(weight.detach().contiguous())


class QLinear(nn.Module):
    """``nn.Linear`` with int8 weights; ``mode`` names the format (``"w8a8"`` or ``"w8a16"``).

    Buffers: ``w_q`` int8 [out_features, in_features], ``w_scale`` float32 [out_features], ``bias``
    [out_features] in the dtype of the float layer's bias, or None. Build one with
    ``QLinear.from_linear(linear, mode)``; the constructor makes an empty layer of the right shapes
    (zeros), ready for ``load_state_dict``.

    forward: x [..., in_features] float32 / float16 / bfloat16 -> [..., out_features] in x.dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "w8a8", *,
                 bias_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.format = linear_format(mode)
        if in_features < 1 or out_features < 1:
            raise ValueError(f"QLinear: in_features and out_features must be at least 1, "
                             f"got in_features={in_features}, out_features={out_features}")
        if bias_dtype not in FLOAT_DTYPES:
            raise TypeError(f"QLinear: bias_dtype must be float32, float16 or bfloat16, got {bias_dtype}")
        self.in_features = in_features
        self.out_features = out_features
        shapes = self.format.weight_shapes(out_features, in_features)
        self.register_buffer("w_q", torch.zeros(shapes["w_q"], dtype=torch.int8, device=device))
        self.register_buffer("w_scale", torch.ones(shapes["w_scale"], dtype=torch.float32, device=device))
        bias_buffer = torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None
        self.register_buffer("bias", bias_buffer)

    @property
    def mode(self) -> str:
        return self.format.name

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "w8a8") -> QLinear:
        """Quantize ``linear``'s weight per output channel; the bias is copied in its own dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        if weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"QLinear.from_linear: the weight must be float32, float16 or bfloat16, "
                            f"got {weight.dtype}")
        bias = linear.bias
        layer = cls(linear.in_features, linear.out_features, bias=bias is not None, mode=mode,
                    bias_dtype=bias.dtype if bias is not None else torch.float32, device=weight.device)
        with torch.no_grad():
            w_q, w_scale = quantize_weight(weight)
            layer.w_q.copy_(w_q)
            layer.w_scale.copy_(w_scale)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight [out_features, in_features] the codes stand for: ``w_q * w_scale[:, None]``."""
        return self.w_q.float() * self.w_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"QLinear: the last dim of x must be in_features={self.in_features}, "
                             f"got x of shape {list(x.shape)}")
        if self.w_scale.dtype != torch.float32:
            raise TypeError(f"QLinear: w_scale must be float32, got {self.w_scale.dtype}; the model was "
                            f"probably cast (.half(), .to(dtype)) after quantization: cast first, "
                            f"then quantize")
        return FORWARDS[self.mode](self, x.contiguous())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mode={self.mode}")
