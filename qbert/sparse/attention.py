"""Block-sparse attention as a Hugging Face attention implementation: ``"qbert_block_sparse"``.

Importing this module registers two functions with transformers under ``ATTENTION_NAME``:

- the attention function (``AttentionInterface``), called by every self-attention module of a model whose
  ``config._attn_implementation == "qbert_block_sparse"`` as
  ``fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)`` with
  ``query/key/value [batch, heads, seq, head_dim]``; it returns ``(out [batch, seq, heads, head_dim], None)``
  computed by ``qbert.ops.block_sparse_attention`` with the layout stored on the module;
- the mask function (``AttentionMaskInterface``), which turns the model's 2-D padding mask
  ``attention_mask [batch, seq]`` (1 = real token) into a bool key-padding mask ``[batch, 1, 1, seq]``
  (True = may be attended) instead of a dense ``[batch, 1, seq, seq]`` mask, which at 16k tokens would
  cost 256 MiB per sequence.

The layout comes from the module attribute ``LAYOUT_ATTR`` (a ``LayoutSource``), which
``qbert.sparsify_attention`` sets on each self-attention module; the layout for a sequence of ``seq``
tokens is built once per block count and cached (``qbert.sparse.cache``).

What it refuses, with an error naming the constraint: a module without a layout, cross-attention or a
key/value cache (query and key lengths differ), causal / decoder masks, attention dropout in training
(``p > 0``), ``output_attentions`` (the kernel never forms the probabilities), additive attention
biases other than a padding mask, and FlexAttention ``BlockMask`` masks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function

from qbert.sparse.cache import LayoutSpec
from qbert.sparse.layout import BlockLayout

try:  # transformers >= 5 records output_attentions through hooks and never tells the attention function
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # older transformers pass output_attentions in kwargs, checked below
    _active_collector = None

ATTENTION_NAME = "qbert_block_sparse"
LAYOUT_ATTR = "qbert_block_layout"

# What a module's layout may be: a builder spec, one fixed layout, or a function of the sequence length.
LayoutSource = LayoutSpec | BlockLayout | Callable[[int], BlockLayout]


class BlockSparseAttentionError(ValueError):
    """The model or its inputs ask for something ``qbert_block_sparse`` attention cannot do."""


def resolve_layout(source: LayoutSource, seq_len: int) -> BlockLayout:
    """The layout for a sequence of ``seq_len`` tokens from a ``LayoutSource``.

    A ``LayoutSpec`` gives its cached layout; a callable is called with ``seq_len`` and must return a
    ``BlockLayout``; a fixed ``BlockLayout`` must span exactly ``ceil(seq_len / block_size)`` blocks.
    """
    if isinstance(source, LayoutSpec):
        return source.layout(seq_len)
    layout = source(seq_len) if not isinstance(source, BlockLayout) and callable(source) else source
    if not isinstance(layout, BlockLayout):
        raise BlockSparseAttentionError(f"{ATTENTION_NAME}: the layout source must give a qbert.sparse.BlockLayout, "
                                        f"got {type(layout).__name__}")
    blocks = layout.blocks_for(seq_len)
    if layout.q_blocks != blocks or layout.kv_blocks != blocks:
        raise BlockSparseAttentionError(
            f"{ATTENTION_NAME}: a sequence of {seq_len} tokens needs a {blocks}x{blocks}-block layout at "
            f"block_size={layout.block_size}, the layout is {layout.q_blocks}x{layout.kv_blocks} (pass a builder "
            f"name or a function of seq_len to qbert.sparsify_attention to get one per length)")
    return layout


def key_padding_mask(attention_mask: Any, batch: int, seq_len: int) -> torch.Tensor | None:
    """The bool key-padding mask ``[batch, seq_len]`` (True = a real key) of a model's attention mask.

    Accepts None; a 2-D ``[batch, seq]`` mask (nonzero / True = real token); a 4-D bool mask ``[batch, 1,
    q, seq]`` (True = attend) or 4-D additive float mask (0 = attend, a very negative value or -inf =
    masked) whose ``q`` dimension is 1 or whose rows are all equal, i.e. a padding mask. Anything else
    (a per-query pattern, a bias, a BlockMask) is refused.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise BlockSparseAttentionError(
            f"{ATTENTION_NAME}: the attention mask must be a padding-mask tensor, got {type(attention_mask).__name__} "
            f"(the layout, not the mask, says which blocks are attended)")
    mask = attention_mask
    if mask.dim() == 2:
        keep = mask.bool() if mask.dtype != torch.bool else mask
    elif mask.dim() == 4 and mask.shape[1] == 1:
        if mask.dtype == torch.bool:
            keep = mask
        elif mask.is_floating_point():
            masked = mask <= torch.finfo(mask.dtype).min / 2
            if not bool(((mask == 0) | masked).all()):
                raise BlockSparseAttentionError(
                    f"{ATTENTION_NAME}: the additive attention mask holds values other than 0 and -inf/min "
                    f"(an attention bias), which block-sparse attention does not support")
            keep = ~masked
        else:
            raise BlockSparseAttentionError(f"{ATTENTION_NAME}: a 4-D attention mask must be bool or float, "
                                            f"got {mask.dtype}")
        if keep.shape[2] != 1 and not bool((keep == keep[:, :, :1]).all()):
            raise BlockSparseAttentionError(
                f"{ATTENTION_NAME}: the 4-D attention mask differs between query rows; only key-padding masks "
                f"are supported (the sparsity pattern comes from the layout)")
        keep = keep[:, 0, 0]
    else:
        raise BlockSparseAttentionError(
            f"{ATTENTION_NAME}: the attention mask must be [batch, seq] or [batch, 1, 1 or seq, seq], got "
            f"{list(mask.shape)}")
    if keep.shape[0] not in (1, batch) or keep.shape[1] != seq_len:
        raise BlockSparseAttentionError(f"{ATTENTION_NAME}: the padding mask is {list(keep.shape)}, expected "
                                        f"[{batch}, {seq_len}]")
    return keep.expand(batch, seq_len)


def _check_call(module: nn.Module, query: torch.Tensor, key: torch.Tensor, dropout: float,
                kwargs: dict[str, Any]) -> None:
    if query.shape[2] != key.shape[2]:
        raise BlockSparseAttentionError(
            f"{ATTENTION_NAME}: query length {query.shape[2]} != key length {key.shape[2]}: cross-attention and "
            f"key/value caches are not supported (self-attention of encoders only)")
    if getattr(module, "is_causal", False) or kwargs.get("is_causal"):
        raise BlockSparseAttentionError(f"{ATTENTION_NAME}: causal (decoder) attention is not supported")
    if dropout > 0:
        raise BlockSparseAttentionError(
            f"{ATTENTION_NAME}: attention dropout p={dropout} in training is not supported; call model.eval() or "
            f"set config.attention_probs_dropout_prob = 0 for training")
    collected = _active_collector.get() if _active_collector is not None else None
    if kwargs.get("output_attentions") or (collected is not None and "attentions" in collected):
        raise BlockSparseAttentionError(
            f"{ATTENTION_NAME}: output_attentions is not supported (the kernel never forms the attention "
            f"probabilities); use attn_implementation='eager' to inspect them")


def block_sparse_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                                   value: torch.Tensor, attention_mask: Any, scaling: float | None = None,
                                   dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Hugging Face attention function: ``softmax(scaling * q k^T + mask) v`` over the blocks of the
    module's layout, padded keys excluded.

    query, key, value: ``[batch, heads, seq, head_dim]``. Returns ``(out [batch, seq, heads, head_dim],
    None)``; a query whose visible keys are all padding gets zeros (eager attention would average the
    masked keys instead; such rows are padding queries, whose outputs a model ignores).
    """
    from qbert import ops

    source = getattr(module, LAYOUT_ATTR, None)
    if source is None:
        raise BlockSparseAttentionError(
            f"{ATTENTION_NAME}: {type(module).__name__} has no block layout; call qbert.sparsify_attention(model, "
            f"layout=...) rather than setting attn_implementation={ATTENTION_NAME!r} by hand")
    _check_call(module, query, key, dropout, kwargs)
    batch, _, seq_len, _ = query.shape
    layout = resolve_layout(source, seq_len)
    padding = key_padding_mask(attention_mask, batch, seq_len)
    if padding is not None:
        padding = padding.to(query.device)
    out = ops.block_sparse_attention(query, key, value, layout, key_padding_mask=padding, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def key_padding_mask_interface(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                               kv_offset: int = 0, mask_function: Callable = bidirectional_mask_function,
                               attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """Hugging Face mask function: the 2-D padding mask as a bool ``[batch, 1, 1, kv_length]`` key-padding
    mask (True = attend), or None without padding. Only plain bidirectional masks are accepted."""
    if mask_function is not bidirectional_mask_function:
        raise BlockSparseAttentionError(
            f"{ATTENTION_NAME}: only bidirectional encoder masks are supported, got the mask function "
            f"{getattr(mask_function, '__name__', mask_function)!r} (causal, sliding or custom masks)")
    if q_offset != 0 or kv_offset != 0 or q_length != kv_length:
        raise BlockSparseAttentionError(
            f"{ATTENTION_NAME}: query length {q_length} (offset {q_offset}) and key length {kv_length} (offset "
            f"{kv_offset}) differ: caches and cross-attention are not supported")
    if attention_mask is None:
        return None
    return attention_mask.to(torch.bool)[:, None, None, :].expand(batch_size, 1, 1, kv_length)


AttentionInterface.register(ATTENTION_NAME, block_sparse_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, key_padding_mask_interface)
