"""The fused W8A8 chain of a BERT layer: int8 activations handed from one op to the next.

In a W8A8 encoder every projection needs its input as int8 codes with per-token scales. Quantizing in a
separate pass reads and writes every activation once more; this module makes the producers emit the codes:

    embeddings LayerNorm ------------------> add_layernorm_quantize ---> y (float) + codes -> Q, K, V
    attention output: dense (w8a8) -> dropout -> add_layernorm_quantize ---> y (float) + codes -> FFN up
    FFN up: int8_linear_requant(codes, GELU) ---------------------------------> codes -> FFN down
    FFN down: int8_linear(codes) -> dropout -> add_layernorm_quantize ------> y (float) + codes -> next Q, K, V

The float y stays the residual stream, so the model's own forward code is unchanged: the modules below
replace Hugging Face's ``*SelfOutput`` / ``*Output`` (dense -> dropout -> LayerNorm(h + residual)),
``*Intermediate`` (dense -> exact GELU) and the embeddings' LayerNorm, keeping their parameter names, so
state dicts are unchanged. The codes travel attached to the tensor they stand for (``attach`` /
``int8_of``); ``QLinear`` uses them when its input carries them and they are still current (the
tensor was not modified in place since), and quantizes the float input otherwise. The unfused path
(``qbert.quantize(model, "w8a8", fuse=False)``) is the reference the fused chain is tested against.

Which classes qualify is family glue (``Family.add_norm``, ``intermediate``, ``embeddings`` in
``qbert.models``): BERT (and MiniLM), RoBERTa and ELECTRA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qbert import ops
from qbert.models import family_of
from qbert.nn.codes import Int8Activation, attach, int8_of
from qbert.nn.qlinear import QLinear


def is_w8a8(module: nn.Module) -> bool:
    return isinstance(module, QLinear) and module.format.name == "w8a8"


def is_exact_gelu(act: nn.Module) -> bool:
    """Hugging Face's ``GELUActivation`` (``hidden_act="gelu"``) or ``nn.GELU()``: the erf form the int8
    epilogue computes. The tanh approximations and other activations are not fused."""
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    return type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu


def _quantized_input(x: torch.Tensor) -> Int8Activation:
    codes = int8_of(x)
    if codes is not None:
        return codes
    if x.dtype == torch.int8:
        raise ValueError("the fused W8A8 chain got int8 codes without their per-token scales")
    q, scale = ops.quantize_per_token(x.contiguous())
    return Int8Activation(q, scale, x.dtype, None)  # consumed at once, never attached


class QLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose output also carries its per-token int8 codes (for the embeddings)."""

    @classmethod
    def from_layernorm(cls, norm: nn.LayerNorm) -> QLayerNorm:
        if len(norm.normalized_shape) != 1 or not norm.elementwise_affine:
            raise ValueError(f"QLayerNorm: needs a LayerNorm over the last dim with weights, got {norm}")
        fused = cls(norm.normalized_shape, eps=norm.eps, bias=norm.bias is not None,
                    device=norm.weight.device, dtype=norm.weight.dtype)
        fused.load_state_dict(norm.state_dict())
        return fused.train(norm.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, q, scale = ops.add_layernorm_quantize(x.contiguous(), None, self.weight, self.bias, self.eps)
        return attach(y, q, scale, y.dtype)


class QAddNorm(nn.Module):
    """``LayerNorm(dropout(dense(x)) + residual)`` with a w8a8 ``dense``, its output carrying its codes:
    Hugging Face's ``BertSelfOutput`` / ``BertOutput`` with the residual add, LayerNorm and the next
    layer's input quantization in one op. ``x`` may carry codes (then ``dense`` skips its quantization)."""

    def __init__(self, dense: QLinear, norm: nn.LayerNorm, dropout: nn.Module) -> None:
        super().__init__()
        if not is_w8a8(dense):
            raise ValueError(f"QAddNorm: dense must be a w8a8 QLinear, got {dense}")
        self.dense = dense
        self.LayerNorm = norm
        self.dropout = dropout

    @classmethod
    def from_module(cls, module: nn.Module) -> QAddNorm:
        return cls(module.dense, module.LayerNorm, module.dropout).train(module.training)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.dense(hidden_states))  # QLinear uses the codes hidden_states carries, if any
        norm = self.LayerNorm
        y, q, scale = ops.add_layernorm_quantize(h.contiguous(), input_tensor.contiguous(), norm.weight,
                                                 norm.bias, norm.eps)
        return attach(y, q, scale, y.dtype)


class QIntermediate(nn.Module):
    """``gelu(dense(x))`` as int8 codes: the FFN up-projection with the GELU and the per-token
    requantization for the down-projection in the GEMM's epilogue (``int8_linear_requant``). It returns the
    int8 codes [..., N] carrying their scales; the ``QAddNorm`` after it consumes them."""

    def __init__(self, dense: QLinear, act: nn.Module) -> None:
        super().__init__()
        if not is_w8a8(dense) or not is_exact_gelu(act):
            raise ValueError(f"QIntermediate: needs a w8a8 QLinear and an exact GELU, got {dense} and {act}")
        self.dense = dense
        self.intermediate_act_fn = act

    @classmethod
    def from_module(cls, module: nn.Module) -> QIntermediate:
        return cls(module.dense, module.intermediate_act_fn).train(module.training)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = _quantized_input(hidden_states)
        dense = self.dense
        q, scale = ops.int8_linear_requant(x.q, x.scale, dense.w_q, dense.w_scale, dense.bias, "gelu")
        return attach(q, q, scale, x.dtype)


def _fusible_output(module: nn.Module | None, family) -> bool:
    """Whether ``module`` (the layer's FFN output) is, or will become, a ``QAddNorm``."""
    if isinstance(module, QAddNorm):
        return True
    return type(module).__name__ in family.add_norm and is_w8a8(getattr(module, "dense", None))


def _embeddings_consumer(modules: dict[str, nn.Module], parent: str, family) -> nn.Module | None:
    """The module that reads the embeddings' output: the first of ``family.embeddings_consumers`` (paths
    relative to the embeddings' parent) that exists."""
    for path in family.embeddings_consumers:
        module = modules.get(f"{parent}.{path}" if parent else path)
        if module is not None:
            return module
    return None


def fuse(model: nn.Module) -> tuple[str, ...]:
    """Install the fused chain in ``model``'s qualifying modules, in place; returns their names.

    A module qualifies when its class is one the model's family lists and its projections are w8a8
    QLinears; an intermediate needs an exact GELU and a fused output after it (its codes have no other
    consumer); the embeddings' LayerNorm needs a w8a8 consumer. Modules that do not qualify keep the
    unfused path.
    """
    family = family_of(model)
    modules = dict(model.named_modules())
    fused: list[str] = []
    for name, module in modules.items():
        kind = type(module).__name__
        parent_name, _, attr = name.rpartition(".")
        if kind in family.add_norm and is_w8a8(getattr(module, "dense", None)):
            setattr(modules[parent_name], attr, QAddNorm.from_module(module))
            fused.append(name)
        elif kind in family.intermediate and is_w8a8(getattr(module, "dense", None)) \
                and is_exact_gelu(module.intermediate_act_fn) \
                and _fusible_output(getattr(modules[parent_name], "output", None), family):
            setattr(modules[parent_name], attr, QIntermediate.from_module(module))
            fused.append(name)
        elif kind in family.embeddings and type(getattr(module, "LayerNorm", None)) is nn.LayerNorm \
                and is_w8a8(_embeddings_consumer(modules, parent_name, family)):
            module.LayerNorm = QLayerNorm.from_layernorm(module.LayerNorm)
            fused.append(f"{name}.LayerNorm")
    return tuple(fused)
