"""Int8 codes attached to the activation they stand for, so the next W8A8 layer can skip quantizing it.

The fused W8A8 chain (``qbert.nn.fused``) attaches the per-token codes a producer computed to its output
tensor; ``QLinear`` reads them back with ``int8_of``. The codes are only used while the carrier tensor is
unchanged: attaching records its ``_version``, which every in-place operation increments. Tensors made
under ``torch.inference_mode`` have no version counter; theirs are trusted while the carrier is the same
tensor object (nothing in the chain, or in the encoders it is installed in, modifies them in place).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

_ATTR = "_qbert_int8"


@dataclass(frozen=True)
class Int8Activation:
    """Per-token int8 codes ``q`` [..., K] and scales ``scale`` [...] standing for a float activation of
    ``dtype``; ``version`` is the carrier tensor's ``_version`` when they were attached."""

    q: torch.Tensor | None  # None while attached to the codes themselves (no reference cycle)
    scale: torch.Tensor
    dtype: torch.dtype
    version: int | None  # None for inference tensors (no version counter)


def attach(carrier: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Attach codes to ``carrier`` (the float activation they quantize, or the codes themselves when no
    float activation exists) and return it."""
    stored = None if q is carrier else q
    setattr(carrier, _ATTR, Int8Activation(stored, scale, dtype, _version_of(carrier)))
    return carrier


def _version_of(x: torch.Tensor) -> int | None:
    return None if x.is_inference() else x._version


def int8_of(x: torch.Tensor) -> Int8Activation | None:
    """The codes attached to ``x``, if any and still current (``x`` unchanged since they were attached)."""
    codes = getattr(x, _ATTR, None)
    if codes is None or codes.version != _version_of(x):
        return None
    return dataclasses.replace(codes, q=x) if codes.q is None else codes
