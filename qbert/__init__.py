"""qbert: quantized and block-sparse kernels for BERT-family encoders.

``import qbert`` neither imports Triton nor initialises CUDA; the compiled extension loads on first use.
"""

from qbert import ops
from qbert.allocate.plan import Plan
from qbert.io import QuantizedFileError, load_quantized, save_quantized
from qbert.nn import QLinear, quantize
from qbert.ops import BackendError, FallbackWarning, use_backend
from qbert.sparse import BlockLayout, sparsify_attention

__version__ = "0.1.0"

__all__ = [
           "BackendError",
           "BlockLayout",
           "FallbackWarning",
           "Plan",
           "QLinear",
           "QuantizedFileError",
           "__version__",
           "load_quantized",
           "ops",
           "quantize",
           "save_quantized",
           "sparsify_attention",
           "use_backend",
]
