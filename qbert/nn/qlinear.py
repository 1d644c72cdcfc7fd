"""QLinear: a drop-in replacement for ``nn.Linear`` with quantized weights (formats in ``qbert/nn/formats.py``).

    y = x @ W.T + bias

int8 formats store ``w_q`` int8 [N, K] and ``w_scale`` float32 [N] (``W ~= w_q * w_scale[:, None]``):
``w8a8`` quantizes x per token on the fly and runs the int8 GEMM with the dequantization and bias fused
(``qbert.ops.w8a8_linear``; the fused chain of ``qbert.nn.fused`` hands codes it already has straight to
``qbert.ops.int8_linear``); ``w8a16`` keeps x in floating point (``qbert.ops.w8a16_linear``).
Packed formats store ``w_packed``, ``w_scale`` and (asymmetric) ``w_zero`` as stated in
``qbert.quant.lowbit``: ``a16`` formats run ``qbert.ops.lowbit_linear``, ``a8`` formats
``qbert.ops.w4a8_linear``. Every forward returns x's dtype. The backend is chosen by the op registry,
never by this module.
"""

from __future__ import annotations

import torch
from torch import nn

from qbert import ops
from qbert.nn.formats import LinearFormat, linear_format
from qbert.ops._checks import FLOAT_DTYPES
from qbert.quant.int8 import INT8_QMAX
from qbert.quant.lowbit import dequantize_lowbit, expand_rows, quantize_lowbit
from qbert.quant.packing import pack, unpack


def _forward_int8(layer: QLinear, x: torch.Tensor) -> torch.Tensor:
    if layer.format.activation_bits is None:
        return ops.w8a16_linear(x, layer.w_q, layer.w_scale, layer.bias)
    return ops.w8a8_linear(x, layer.w_q, layer.w_scale, layer.bias)


def _forward_packed(layer: QLinear, x: torch.Tensor) -> torch.Tensor:
    op = ops.lowbit_linear if layer.format.activation_bits is None else ops.w4a8_linear
    scales, zeros = layer.kernel_scales()
    return op(x, layer.w_packed, scales, zeros, layer.format.weight_bits,
              layer.format.scheme.kernel_group_size(layer.in_features), layer.bias)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_q int8 [N, K], w_scale float32 [N])``: symmetric int8 codes, one scale per output channel."""
    return ops.quantize_per_token(weight.detach().contiguous())


_INT8_DTYPES = {"w_q": torch.int8, "w_scale": torch.float32}
_PACKED_DTYPES = {"w_packed": torch.int32, "w_scale": torch.float32, "w_zero": torch.uint8}


class QLinear(nn.Module):
    """``nn.Linear`` with quantized weights; ``mode`` names the format (``qbert.nn.formats``): a mode
    string (``"w8a8"``, ``"w4a16"``, ...) or a ``LinearFormat`` (``linear_format("w3a16", row_groups=12)``).

    Buffers (``LinearFormat.weight_shapes``): int8 formats ``w_q`` int8 [N, K] and ``w_scale`` float32
    [N]; packed formats ``w_packed`` int32 [ceil(K/32)*bits, N], ``w_scale`` float32 [K groups, row groups]
    and, when asymmetric, ``w_zero`` uint8 of the same shape; ``bias`` [N] in the dtype of the float
    layer's bias, or None. Build one with ``QLinear.from_linear(linear, mode)``; the constructor makes an
    empty layer of the right shapes, ready for ``load_state_dict``.

    forward: x [..., in_features] float32 / float16 / bfloat16 -> [..., out_features] in x.dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 mode: str | LinearFormat = "w8a8", *, bias_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.format = linear_format(mode)
        if in_features < 1 or out_features < 1:
            raise ValueError(f"QLinear: in_features and out_features must be at least 1, "
                             f"got in_features={in_features}, out_features={out_features}")
        if bias_dtype not in FLOAT_DTYPES:
            raise TypeError(f"QLinear: bias_dtype must be float32, float16 or bfloat16, got {bias_dtype}")
        self.in_features = in_features
        self.out_features = out_features
        dtypes = _PACKED_DTYPES if self.format.packed else _INT8_DTYPES
        for name, shape in self.format.weight_shapes(out_features, in_features).items():
            fill = torch.ones if name == "w_scale" else torch.zeros
            self.register_buffer(name, fill(shape, dtype=dtypes[name], device=device))
        bias_buffer = torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None
        self.register_buffer("bias", bias_buffer)

    @property
    def mode(self) -> str:
        return self.format.name

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str | LinearFormat = "w8a8") -> QLinear:
        """Quantize ``linear``'s weight in ``mode``'s format; the bias is copied in its own dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        if weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"QLinear.from_linear: the weight must be float32, float16 or bfloat16, "
                            f"got {weight.dtype}")
        fmt = linear_format(mode)
        if fmt.packed:
            q = quantize_lowbit(weight, fmt.scheme)
            return cls.from_codes(linear, fmt, q.codes, q.scale, q.zero)
        return cls.from_codes(linear, fmt, *quantize_weight(weight))

    @classmethod
    def from_codes(cls, linear: nn.Linear, mode: str | LinearFormat, codes: torch.Tensor, scale: torch.Tensor,
                   zero: torch.Tensor | None = None) -> QLinear:
        """A QLinear of ``linear``'s shape and bias holding codes computed elsewhere (e.g. ``qbert.quant.gptq``).

        int8 formats: ``codes`` int8 [N, K] in [-127, 127] and ``scale`` float32 [N]. Packed formats:
        ``codes`` uint8 [N, K] (unpacked, below 2**bits), ``scale`` float32 and, when asymmetric, ``zero``
        uint8 of the stored shape ``[K groups, row groups]`` (``qbert.quant.lowbit``); symmetric formats
        take ``zero=None``. Anything else is an error naming the tensor.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QLinear.from_codes: expected an nn.Linear, got {type(linear).__name__}")
        fmt = linear_format(mode)
        n, k = linear.out_features, linear.in_features
        bias = linear.bias
        layer = cls(k, n, bias=bias is not None, mode=fmt,
                    bias_dtype=bias.dtype if bias is not None else torch.float32, device=linear.weight.device)
        shapes = fmt.weight_shapes(n, k)
        if fmt.packed:
            expected = {"codes": ((n, k), torch.uint8), "w_scale": (shapes["w_scale"], torch.float32),
                        "w_zero": (shapes.get("w_zero"), torch.uint8)}
            highest = (1 << fmt.weight_bits) - 1
        else:
            expected = {"codes": ((n, k), torch.int8), "w_scale": (shapes["w_scale"], torch.float32),
                        "w_zero": (None, None)}
            highest = INT8_QMAX
        for what, tensor in (("codes", codes), ("w_scale", scale), ("w_zero", zero)):
            shape, dtype = expected[what]
            if shape is None:
                if tensor is not None:
                    raise ValueError(f"QLinear.from_codes: {fmt.describe()} stores no zero points, got a {what} tensor")
                continue
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                got = (f"{tensor.dtype} {list(tensor.shape)}" if isinstance(tensor, torch.Tensor)
                       else type(tensor).__name__)
                raise ValueError(f"QLinear.from_codes: {what} of a {fmt.describe()} [{n}, {k}] layer must be "
                                 f"{dtype} {list(shape)}, got {got}")
        lowest = 0 if fmt.packed else -INT8_QMAX
        if codes.numel() and not (lowest <= int(codes.min()) and int(codes.max()) <= highest):
            raise ValueError(f"QLinear.from_codes: {fmt.describe()} codes must be in [{lowest}, {highest}], got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        if zero is not None and zero.numel() and int(zero.max()) > highest:
            raise ValueError(f"QLinear.from_codes: {fmt.describe()} zero points must be in [0, {highest}], got up "
                             f"to {int(zero.max())}")
        with torch.no_grad():
            if fmt.packed:
                layer.w_packed.copy_(pack(codes, fmt.weight_bits))
                if zero is not None:
                    layer.w_zero.copy_(zero)
            else:
                layer.w_q.copy_(codes)
            layer.w_scale.copy_(scale)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def kernel_scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Packed formats: scales and zeros as the GEMM ops read them, [K groups, N] (row groups repeated)."""
        zeros = None if self.format.symmetric else self.w_zero
        return expand_rows(self.w_scale, self.out_features), expand_rows(zeros, self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight [out_features, in_features] the codes stand for."""
        if not self.format.packed:
            return self.w_q.float() * self.w_scale[:, None]
        scales, zeros = self.kernel_scales()
        codes = unpack(self.w_packed, self.format.weight_bits, self.in_features)
        return dequantize_lowbit(codes, scales, zeros, self.format.weight_bits,
                                 self.format.scheme.kernel_group_size(self.in_features))

    def weight_nbytes(self) -> dict[str, int]:
        """Exact bytes of the weight buffers (codes, scales, zeros; bias not counted)."""
        return self.format.nbytes(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"QLinear: x must be float32, float16 or bfloat16, got {x.dtype} (shape "
                            f"{list(x.shape)}); int8 codes with their scales go to qbert.ops.int8_linear")
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"QLinear: the last dim of x must be in_features={self.in_features}, "
                             f"got x of shape {list(x.shape)}")
        if self.w_scale.dtype != torch.float32:
            raise TypeError(f"QLinear: w_scale must be float32, got {self.w_scale.dtype}; the model was "
                            f"probably cast (.half(), .to(dtype)) after quantization: cast first, "
                            f"then quantize")
        forward = _forward_packed if self.format.packed else _forward_int8
        return forward(self, x.contiguous())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mode={self.format.describe()}")
