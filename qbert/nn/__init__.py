"""Quantized modules: ``QLinear`` (formats in ``qbert.nn.formats``), ``quantize``, sizes, QAT."""

from qbert.nn.formats import FORMATS, LinearFormat, linear_format
from qbert.nn.gptq import Rounding
from qbert.nn.qat import FakeQuantLinear, convert, distillation_loss, prepare_qat
from qbert.nn.qlinear import QLinear
from qbert.nn.quantize import QuantizeSummary, quantize
from qbert.nn.size import LayerBytes, linear_bytes
from qbert.nn.unpad import unpadding

__all__ = [
           "FORMATS",
           "FakeQuantLinear",
           "LayerBytes",
           "LinearFormat",
           "QLinear",
           "QuantizeSummary",
           "Rounding",
           "convert",
           "distillation_loss",
           "linear_bytes",
           "linear_format",
           "prepare_qat",
           "quantize",
           "unpadding",
]
