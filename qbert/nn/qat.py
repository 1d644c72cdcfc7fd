"""Quantization-aware training (QAT): fake-quantized linear layers with a straight-through estimator.

``prepare_qat(model, mode | plan)`` swaps the same ``nn.Linear`` layers as ``qbert.quantize`` for
``FakeQuantLinear``, which keeps the float weight as the trained parameter and computes, every forward,

    W_fq = D(Q(W))                     the weight ``QLinear.from_linear`` would store, dequantized:
                                       packed formats: ``quantize_lowbit`` -> ``dequantize_lowbit``;
                                       int8 formats: ``quantize_per_token`` (per output channel) -> w_q * s
    x_fq = s_x * q(x)                  ``a8`` formats only: per-token symmetric int8 (``quantize_per_token``)
    y    = x_fq @ W_fq.T + bias        (``x_fq = x`` for ``a16`` formats)

Straight-through estimator (STE): Q and q are treated as the identity in the backward pass,

    dL/dW := dL/dW_fq,        dL/dx := dL/dx_fq,

so the float weight receives exactly the gradient of the loss with respect to the quantized weight it
stands for, and rounding never zeroes the gradient. The forward values are the quantized values
themselves (not ``W + (W_fq - W).detach()``, which can differ from W_fq by a rounding of the float
addition), so ``convert(model)`` -- which builds the real ``QLinear`` layers from the same float weights
-- gives the same outputs up to float summation order (the a8 formats run an exact int8 GEMM and scale
afterwards; the fake-quant layer multiplies the dequantized values in float).

``distillation_loss`` is the usual knowledge-distillation term against the float model's logits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from qbert import ops
from qbert.nn.formats import LinearFormat, linear_format
from qbert.nn.qlinear import QLinear
from qbert.nn.quantize import SUMMARY_ATTR, _set_module, swap_linears
from qbert.quant.lowbit import dequantize_lowbit, expand_rows, quantize_lowbit

QAT_SUMMARY_ATTR = "qbert_qat_summary"


class _StraightThrough(torch.autograd.Function):
    """``forward(t, fn) = fn(t)`` (the quantize-dequantize round trip); ``backward(g) = g`` (STE)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return fn(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def fake_quantize_weight(weight: torch.Tensor, fmt: LinearFormat) -> torch.Tensor:
    """float32 ``D(Q(W))`` [N, K]: exactly ``QLinear.from_linear(linear, fmt).dequantized_weight()``
    (no gradient; see ``FakeQuantLinear`` for the straight-through version)."""
    w = weight.detach()
    if not fmt.packed:
        w_q, w_scale = ops.quantize_per_token(w.contiguous())
        return w_q.float() * w_scale[:, None]
    n, k = w.shape
    q = quantize_lowbit(w, fmt.scheme)
    return dequantize_lowbit(q.codes, expand_rows(q.scale, n), expand_rows(q.zero, n), fmt.weight_bits,
                             fmt.scheme.kernel_group_size(k))


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """float32 ``s_x * q(x)``: per-token symmetric int8 of the last dim (``qbert.ops.quantize_per_token``:
    ``s_x = max|x| / 127``, round half to even), dequantized; no gradient."""
    x_q, x_scale = ops.quantize_per_token(x.detach().contiguous())
    return x_q.float() * x_scale[..., None]


class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` whose forward uses the fake-quantized weight (and, for ``a8`` formats, fake-quantized
    activations) of ``format``, with straight-through gradients (module docstring).

    ``weight`` and ``bias`` are the float parameters being trained; ``from_linear`` shares them with the
    layer it replaces (no copy), so an optimizer over the model's parameters keeps working after
    ``prepare_qat``. Inputs are computed in float32 and the output is cast back to x's dtype, as QLinear does.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 mode: str | LinearFormat = "w8a8", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.format = linear_format(mode)
        if self.format.packed:
            self.format.scheme.check_shape(out_features, in_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str | LinearFormat) -> FakeQuantLinear:
        """A FakeQuantLinear sharing ``linear``'s weight and bias parameters (their values are not copied)."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"FakeQuantLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, mode=mode,
                    device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.train(linear.training)
        return layer

    def quantized_weight(self) -> torch.Tensor:
        """``D(Q(W))`` with a straight-through gradient to ``self.weight``; float32 [N, K]."""
        return _StraightThrough.apply(self.weight, lambda w: fake_quantize_weight(w, self.format))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"FakeQuantLinear: the last dim of x must be in_features={self.in_features}, "
                             f"got x of shape {list(x.shape)}")
        xf = x.float()
        if self.format.activation_bits is not None:
            xf = _StraightThrough.apply(xf, fake_quantize_per_token)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(xf, self.quantized_weight(), bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.format.describe()} (fake quant, STE)"


def prepare_qat(model: nn.Module, mode: str | LinearFormat | Mapping = "w8a8",
                skip: tuple[str, ...] | list[str] = (), include_head: bool = False, *,
                group_size: int | None = None, row_groups: int | None = None,
                symmetric: bool | None = None) -> nn.Module:
    """Swap the ``nn.Linear`` layers that ``qbert.quantize(model, mode, ...)`` would quantize for
    ``FakeQuantLinear`` of the same formats, in place; return ``model``.

    Arguments are those of ``qbert.quantize`` (a mode or ``LinearFormat`` with overrides, ``skip`` and
    ``include_head``; or a ``qbert.Plan`` / mapping name -> format, which quantizes exactly the
    listed modules), with the same errors. A shared layer becomes one FakeQuantLinear at every name. The
    choice is recorded in ``model.qbert_qat_summary`` (a ``QuantizeSummary``). Train, then ``convert``.
    """
    if any(isinstance(m, FakeQuantLinear) for m in model.modules()):
        raise ValueError("prepare_qat: the model already has FakeQuantLinear layers; convert it first")
    summary = swap_linears(model, mode, skip, include_head, group_size, row_groups, symmetric,
                           FakeQuantLinear.from_linear, caller="prepare_qat",
                           replacement="qbert.nn.FakeQuantLinear")
    setattr(model, QAT_SUMMARY_ATTR, summary)
    return model


def convert(model: nn.Module) -> nn.Module:
    """Replace every ``FakeQuantLinear`` of ``model`` by the real ``QLinear`` of its format (built from the
    trained float weight by ``QLinear.from_linear``), in place; return ``model``.

    Shared layers stay shared. ``model.qbert_summary`` is set as ``qbert.quantize`` sets it (from the
    ``prepare_qat`` record) and ``model.qbert_qat_summary`` is removed. A model without FakeQuantLinear
    layers is an error (nothing was prepared).
    """
    found: dict[int, tuple[FakeQuantLinear, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, FakeQuantLinear):
            found.setdefault(id(module), (module, []))[1].append(name)
    if not found:
        raise ValueError(f"convert: {type(model).__name__} has no FakeQuantLinear layers; call prepare_qat first")
    for fake, names in found.values():
        qlinear = QLinear.from_linear(fake, fake.format)
        qlinear.train(fake.training)
        for name in names:
            _set_module(model, name, qlinear)
    summary = getattr(model, QAT_SUMMARY_ATTR, None)
    if summary is not None:
        setattr(model, SUMMARY_ATTR, summary)
        delattr(model, QAT_SUMMARY_ATTR)
    return model


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Knowledge distillation (Hinton et al.): ``T**2 * KL(softmax(t / T) || softmax(s / T))``, averaged
    over the rows of [batch, classes] logits. The ``T**2`` keeps the gradient's scale independent of T.
    The teacher's logits are detached."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"distillation_loss: student logits {list(student_logits.shape)} and teacher logits "
                         f"{list(teacher_logits.shape)} must have the same shape")
    if not temperature > 0:
        raise ValueError(f"distillation_loss: temperature must be > 0, got {temperature!r}")
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return temperature**2 * kl


__all__ = ["FakeQuantLinear", "convert", "distillation_loss", "fake_quantize_per_token", "fake_quantize_weight",
           "prepare_qat"]
