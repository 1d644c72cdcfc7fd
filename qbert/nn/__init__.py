"""Quantized modules: ``QLinear`` (formats in ``qbert.nn.formats``), ``quantize`` and size accounting."""

from qbert.nn.formats import FORMATS, LinearFormat, linear_format
from qbert.nn.qlinear import QLinear
from qbert.nn.quantize import QuantizeSummary, quantize
from qbert.nn.size import LayerBytes, linear_bytes

__all__ = ["FORMATS", "LayerBytes", "LinearFormat", "QLinear", "QuantizeSummary", "linear_bytes", "linear_format",
           "quantize"]
