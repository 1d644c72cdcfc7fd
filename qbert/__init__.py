"""qbert: quantized and block-sparse kernels for BERT-family encoders.

``import qbert`` neither imports Triton nor initialises CUDA; the compiled extension loads on first use.
Nor does it import transformers: ``qbert.QbertConfig`` (``qbert.hf``) is imported on first access, and
qbert's quantizer is registered with transformers as soon as transformers' quantizer registry is imported
(at once, if it already is), so that ``from_pretrained`` of a qbert directory works after ``import qbert``.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from qbert import ops
from qbert.io import QuantizedFileError, load_quantized, save_quantized
from qbert.nn import QLinear, quantize
from qbert.nn.plan import Plan
from qbert.ops import BackendError, FallbackWarning, use_backend
from qbert.prune import prune_ffn, prune_heads, prune_layers
from qbert.sparse import BlockLayout, sparsify_attention

__version__ = "0.1.0"

_TRANSFORMERS_REGISTRY = "transformers.quantizers.auto"  # register_quantization_config / register_quantizer
_LAZY = {"QbertConfig": "qbert.hf"}  # imported on first access: qbert.hf imports transformers


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "hf":
        return importlib.import_module("qbert.hf")
    raise AttributeError(f"module 'qbert' has no attribute {name!r}")


class _RegisterWithTransformers(importlib.abc.MetaPathFinder):
    """Imports ``qbert.hf`` (which registers qbert's quantizer) right after transformers' quantizer
    registry module has run, whichever import brings it in; then leaves ``sys.meta_path``."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRANSFORMERS_REGISTRY:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        run = spec.loader.exec_module

        def run_then_register(module):
            run(module)
            importlib.import_module("qbert.hf")

        spec.loader.exec_module = run_then_register
        return spec


if _TRANSFORMERS_REGISTRY in sys.modules:
    importlib.import_module("qbert.hf")
else:
    sys.meta_path.insert(0, _RegisterWithTransformers())

__all__ = [
           "BackendError",
           "BlockLayout",
           "FallbackWarning",
           "Plan",
           "QLinear",
           "QbertConfig",
           "QuantizedFileError",
           "__version__",
           "load_quantized",
           "ops",
           "prune_ffn",
           "prune_heads",
           "prune_layers",
           "quantize",
           "save_quantized",
           "sparsify_attention",
           "use_backend",
]
