"""Linear-layer formats: how a QLinear stores its weight and what it does with its activations.

A format is a small, frozen descriptor looked up by name (the ``mode`` string of ``QLinear`` and
``qbert.quantize``). The names follow the usual ``w<weight bits>a<activation bits>`` convention;
``a16`` means the activations stay in floating point (float32, float16 or bfloat16).

Known formats:

======  ============  ================================  ==========================================
name    weight        weight scales                     activations
======  ============  ================================  ==========================================
w8a8    int8 [N, K]   float32 [N], one per out channel  dynamic int8, one scale per token (row)
w8a16   int8 [N, K]   float32 [N], one per out channel  floating point (weight-only quantization)
======  ============  ================================  ==========================================

Adding a format (e.g. ``w4a16`` with K-groups of 128) is one row in ``FORMATS`` whose
``weight_group_size`` and ``weight_bits`` give the buffer shapes, one weight quantizer and one forward
in ``qbert/nn/qlinear.py``; the per-layer metadata of ``qbert.save_quantized`` already records the format
of each layer, so a per-module plan (different formats per layer) needs no new file layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from qbert.quant.int8 import INT8_QMAX

_INT8_BITS = 8


@dataclass(frozen=True)
class LinearFormat:
    """One quantized linear-layer format.

    name: the mode string (``"w8a8"``).
    weight_bits: bits per weight code (8: one int8 per weight, no packing).
    weight_qmax: the largest code magnitude (codes are symmetric in [-qmax, qmax]).
    weight_group_size: weights sharing one scale along K; None means the whole row (per output channel).
    activation_bits: bits of the dynamically quantized activations; None keeps them in floating point.
    """

    name: str
    weight_bits: int
    weight_qmax: int
    weight_group_size: int | None
    activation_bits: int | None

    def weight_shapes(self, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the weight buffers (``w_q``, ``w_scale``) of an [N=out_features, K=in_features] layer:
        one int8 code per weight, one scale per output channel (the layout of every format in FORMATS)."""
        return {"w_q": (out_features, in_features), "w_scale": (out_features,)}


FORMATS: dict[str, LinearFormat] = {
    fmt.name: fmt
    for fmt in (
        LinearFormat("w8a8", weight_bits=_INT8_BITS, weight_qmax=INT8_QMAX, weight_group_size=None,
                     activation_bits=_INT8_BITS),
        LinearFormat("w8a16", weight_bits=_INT8_BITS, weight_qmax=INT8_QMAX, weight_group_size=None,
                     activation_bits=None),
    )
}


def linear_format(mode: str) -> LinearFormat:
    """The format named ``mode``; an unknown name is an error that lists the known ones."""
    if not isinstance(mode, str) or mode not in FORMATS:
        raise ValueError(f"unknown quantization mode {mode!r}; known modes: {', '.join(FORMATS)}")
    return FORMATS[mode]
