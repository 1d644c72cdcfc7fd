"""Quantized modules: ``QLinear`` (int8 weights; formats in ``qbert.nn.formats``) and ``quantize``."""

from qbert.nn.formats import FORMATS, LinearFormat, linear_format
from qbert.nn.qlinear import QLinear
from qbert.nn.quantize import QuantizeSummary, quantize

__all__ = ["FORMATS", "LinearFormat", "QLinear", "QuantizeSummary", "linear_format", "quantize"]
