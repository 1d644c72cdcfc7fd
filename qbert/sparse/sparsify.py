"""qbert.sparsify_attention: run a BERT-family model's self-attention on qbert's block-sparse kernel."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from qbert.sparse.cache import LayoutSpec
from qbert.sparse.layout import BlockLayout

DEFAULT_BLOCK_SIZE = 64
SUMMARY_ATTR = "qbert_sparse_attention"

# config.model_type -> the class that calls the attention interface (self-attention only: encoders).
ATTENTION_MODULES = {
    "bert": "BertSelfAttention",  # also MiniLM, which is a BertModel
    "roberta": "RobertaSelfAttention",
    "xlm-roberta": "XLMRobertaSelfAttention",
    "camembert": "CamembertSelfAttention",
    "electra": "ElectraSelfAttention",
    "distilbert": "DistilBertSelfAttention",
    "albert": "AlbertAttention",
}


@dataclass(frozen=True)
class SparsifySummary:
    """What one ``sparsify_attention`` call did; set on the model as ``model.qbert_sparse_attention``.

    family: ``config.model_type``; layout: the layout source set on every module (a ``LayoutSpec``, a
    ``BlockLayout`` or a callable); modules: names of the attention modules that carry it;
    previous_implementation: ``config._attn_implementation`` before the call (``restore_attention``).
    """

    family: str
    layout: LayoutSpec | BlockLayout | Callable[[int], BlockLayout]
    modules: tuple[str, ...]
    previous_implementation: str | None


def _check_heads(layout_heads: int, heads: tuple[int, ...], subject: str) -> None:
    """A layout serves every attention module if it has 1 head, or as many as each module (``heads``: the
    distinct head counts of the modules, several once heads were pruned unevenly)."""
    if layout_heads == 1 or heads == (layout_heads,):
        return
    if len(heads) == 1:
        raise ValueError(f"sparsify_attention: {subject} must be 1 or the model's num_attention_heads={heads[0]}")
    raise ValueError(f"sparsify_attention: {subject} must be 1: the attention modules have {list(heads)} heads "
                     f"(pruned unevenly), and a per-head layout needs one head count in every layer")


def _layout_source(layout: Any, block_size: int | None, params: dict[str, Any], heads: tuple[int, ...]):
    if isinstance(layout, str):
        spec = LayoutSpec.of(layout, DEFAULT_BLOCK_SIZE if block_size is None else block_size, **params)
        layout_heads = dict(spec.params).get("heads", 1)
        _check_heads(layout_heads, heads, f"heads={layout_heads}")
        return spec
    if params:
        raise TypeError(f"sparsify_attention: builder parameters {sorted(params)} only apply to a builder name, "
                        f"not to a {type(layout).__name__}")
    if isinstance(layout, LayoutSpec):
        if block_size is not None and block_size != layout.block_size:
            raise ValueError(f"sparsify_attention: block_size={block_size} contradicts the spec's "
                             f"block_size={layout.block_size}")
        return layout
    if isinstance(layout, BlockLayout):
        if block_size is not None and block_size != layout.block_size:
            raise ValueError(f"sparsify_attention: block_size={block_size} contradicts the layout's "
                             f"block_size={layout.block_size}")
        _check_heads(layout.heads, heads, f"the layout has {layout.heads} heads; a layout's head count")
        return layout
    if callable(layout):
        if block_size is not None:
            raise ValueError("sparsify_attention: block_size is chosen by the layouts the callable returns; "
                             "leave it None")
        return layout
    raise TypeError(f"sparsify_attention: layout must be a builder name, a LayoutSpec, a BlockLayout or a "
                    f"callable seq_len -> BlockLayout, got {type(layout).__name__}")


def _module_heads(module: nn.Module) -> int:
    heads = getattr(module, "num_attention_heads", None)
    return module.n_heads if heads is None else heads  # DistilBERT says n_heads


def sparsify_attention(model: nn.Module, layout: Any = "bigbird", block_size: int | None = None,
                       **params: Any) -> nn.Module:
    """Make ``model``'s self-attention block-sparse, in place, and return ``model``.

    layout: one of
        - a builder name from ``qbert.sparse.BUILDERS`` (``"dense"``, ``"sliding_window"``, ``"bigbird"``,
          ``"longformer"``, ``"fixed"``, ``"variable"``) with its keyword ``params``; the layout for each
          sequence length is built once per ``ceil(seq / block_size)`` and cached;
        - a ``LayoutSpec``;
        - a ``BlockLayout``, used as is (inputs must span exactly its blocks);
        - a callable ``seq_len -> BlockLayout`` (cache it yourself if it builds).
    block_size: 16, 32, 64 or 128 (default 64) for a builder name.

    Every self-attention module gets the layout (attribute ``qbert.sparse.attention.LAYOUT_ATTR``) and the
    model's attention implementation becomes ``"qbert_block_sparse"`` (registered with transformers by
    importing ``qbert.sparse.attention``), running ``qbert.ops.block_sparse_attention`` with the padding mask
    as key-padding mask. Supported: encoder models whose ``config.model_type`` is in
    ``ATTENTION_MODULES`` (BERT, MiniLM, RoBERTa, XLM-R, CamemBERT, ELECTRA, DistilBERT, ALBERT); decoders,
    cross-attention and ``output_attentions`` are refused. The result is recorded in
    ``model.qbert_sparse_attention`` (a ``SparsifySummary``); ``restore_attention`` undoes it.
    """
    from qbert.sparse.attention import ATTENTION_NAME, LAYOUT_ATTR

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ATTENTION_MODULES:
        raise ValueError(f"sparsify_attention: unsupported model type {model_type!r}; supported: "
                         f"{', '.join(ATTENTION_MODULES)}")
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"sparsify_attention: {type(model).__name__} is not a transformers PreTrainedModel")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError("sparsify_attention: decoder models (config.is_decoder / add_cross_attention) are not "
                         "supported: block-sparse attention here is bidirectional self-attention")
    if getattr(config, "output_attentions", False):
        raise ValueError("sparsify_attention: config.output_attentions=True is not supported (the kernel never "
                         "forms the attention probabilities)")
    if getattr(model, SUMMARY_ATTR, None) is not None:
        restore_attention(model)
    class_name = ATTENTION_MODULES[model_type]
    names = tuple(name for name, module in model.named_modules() if type(module).__name__ == class_name)
    if not names:
        raise ValueError(f"sparsify_attention: no {class_name} module in {type(model).__name__}")
    # Each module's own head count: after head pruning (qbert.prune) the config's is only the built one.
    heads = tuple(sorted({_module_heads(model.get_submodule(name)) for name in names}))
    source = _layout_source(layout, block_size, params, heads)
    previous = config._attn_implementation
    for name in names:
        setattr(model.get_submodule(name), LAYOUT_ATTR, source)
    model.set_attn_implementation(ATTENTION_NAME)
    setattr(model, SUMMARY_ATTR, SparsifySummary(model_type, source, names, previous))
    return model


def restore_attention(model: nn.Module) -> nn.Module:
    """Undo ``sparsify_attention``: remove the layouts and set the previous attention implementation."""
    from qbert.sparse.attention import LAYOUT_ATTR

    summary = getattr(model, SUMMARY_ATTR, None)
    if summary is None:
        raise ValueError("restore_attention: the model was not sparsified (no model.qbert_sparse_attention)")
    for name in summary.modules:
        delattr(model.get_submodule(name), LAYOUT_ATTR)
    model.set_attn_implementation(summary.previous_implementation or "eager")
    delattr(model, SUMMARY_ATTR)
    return model
