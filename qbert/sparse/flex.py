"""Convert between ``BlockLayout`` and FlexAttention's ``BlockMask``.

A ``BlockMask`` stores, per (batch, head, query block), the key blocks to visit in the same ordered form
as ``qbert.sparse.csr`` (``kv_num_blocks [B, H, R]`` counts, ``kv_indices [B, H, R, C]`` active blocks
first in ascending order), split into *full* blocks (every entry attended, ``mask_mod`` skipped) and
*partial* blocks (``mask_mod`` evaluated per entry).

``to_block_mask`` writes every active block of a layout as a full block: a layout is exact at block
granularity, so FlexAttention never needs to call ``mask_mod`` inside a block (a sequence whose length is
not a multiple of the block size is bounds-checked by FlexAttention itself through ``seq_lengths``). Its
``mask_mod`` looks the layout up per token, for eager FlexAttention, which evaluates ``mask_mod`` densely
and ignores the block structure.
``from_block_mask`` reads full and partial blocks back as active blocks.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, noop_mask

from qbert.sparse.csr import from_csr
from qbert.sparse.layout import BLOCK_SIZES, BlockLayout


def to_block_mask(layout: BlockLayout, seq_len: int, batch: int | None = None,
                  device: torch.device | str = "cpu") -> BlockMask:
    """A FlexAttention ``BlockMask`` for ``layout`` on ``seq_len`` query and key tokens.

    Shapes: ``[batch or 1, layout.heads, q_blocks, kv_blocks]`` (a batch or head dimension of 1 is
    broadcast by FlexAttention); ``BLOCK_SIZE = (block_size, block_size)``; ``seq_lengths = (seq_len,
    seq_len)``. Active blocks are full blocks, the partial-block tensors are empty (all counts 0);
    ``mask_mod`` is ``layout_mask_mod(layout)``.
    ``seq_len`` must span exactly the layout's blocks: ``ceil(seq_len / block_size) == q_blocks ==
    kv_blocks``. The index tensors are placed on ``device``.
    """
    blocks = layout.blocks_for(seq_len)
    if layout.q_blocks != blocks or layout.kv_blocks != blocks:
        raise ValueError(f"to_block_mask: seq_len={seq_len} at block_size={layout.block_size} needs "
                         f"{blocks}x{blocks} blocks, the layout has {layout.q_blocks}x{layout.kv_blocks}")
    if batch is not None and (not isinstance(batch, int) or batch < 1):
        raise ValueError(f"to_block_mask: batch must be a positive int or None, got {batch!r}")
    counts, indices = layout.csr(device)
    shape_b = batch or 1
    full_counts = counts[None].expand(shape_b, *counts.shape).contiguous()
    full_indices = indices[None].expand(shape_b, *indices.shape).contiguous()
    return BlockMask.from_kv_blocks(
        torch.zeros_like(full_counts), full_indices.clone(), full_counts, full_indices,
        BLOCK_SIZE=layout.block_size, mask_mod=layout_mask_mod(layout, device), seq_lengths=(seq_len, seq_len))


def layout_mask_mod(layout: BlockLayout, device: torch.device | str = "cpu"):
    """The layout as a token-level FlexAttention ``mask_mod``: ``(b, h, q, kv) -> mask[h, q // bs, kv // bs]``
    (head 0 for a one-head layout). Compiled FlexAttention never calls it on full blocks; eager
    FlexAttention, which ignores the block structure and evaluates ``mask_mod`` densely, needs it."""
    blocks = layout.mask.to(device)
    block_size = layout.block_size
    if layout.heads == 1:
        blocks = blocks[0]

        def mask_mod(b, h, q_idx, kv_idx):
            return blocks[q_idx // block_size, kv_idx // block_size]
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return blocks[h, q_idx // block_size, kv_idx // block_size]
    return mask_mod


def from_block_mask(block_mask: BlockMask, allow_partial: bool = False) -> BlockLayout:
    """The ``BlockLayout`` of a ``BlockMask``: a block is active when it is full or partial.

    The block mask must have square blocks of a size in ``BLOCK_SIZES`` and a batch dimension of 1 (or all
    batch entries equal). A partial block under a ``mask_mod`` other than ``noop_mask`` attends only some
    of its entries, which a layout cannot say: such masks are refused unless ``allow_partial=True``, which
    makes those blocks fully active (a superset of the original pattern).
    """
    q_block, kv_block = block_mask.BLOCK_SIZE
    if q_block != kv_block or q_block not in BLOCK_SIZES:
        raise ValueError(f"from_block_mask: BLOCK_SIZE must be square with a size in {BLOCK_SIZES}, got "
                         f"{tuple(block_mask.BLOCK_SIZE)}")
    if block_mask.kv_indices.dim() != 4:
        raise ValueError(f"from_block_mask: expected kv_indices [batch, heads, q_blocks, kv_blocks], got "
                         f"{list(block_mask.kv_indices.shape)}")
    partial = from_csr(block_mask.kv_num_blocks.flatten(0, 1), block_mask.kv_indices.flatten(0, 1))
    if bool(partial.any()) and block_mask.mask_mod is not noop_mask and not allow_partial:
        raise ValueError("from_block_mask: the block mask has partial blocks under a mask_mod, which attend "
                         "only some of their entries; a block layout cannot express that (pass "
                         "allow_partial=True to treat those blocks as fully active)")
    mask = partial
    if block_mask.full_kv_num_blocks is not None:
        mask = mask | from_csr(block_mask.full_kv_num_blocks.flatten(0, 1),
                               block_mask.full_kv_indices.flatten(0, 1))
    batch, heads = block_mask.kv_indices.shape[:2]
    mask = mask.unflatten(0, (batch, heads))
    if batch > 1 and not bool((mask == mask[:1]).all()):
        raise ValueError(f"from_block_mask: the {batch} batch entries of the block mask differ; a layout is "
                         f"one pattern for the whole batch")
    # A BlockMask may be wider than the sequence it was built for; keep the blocks the sequence spans.
    q_len, kv_len = block_mask.seq_lengths
    rows, cols = -(-q_len // q_block), -(-kv_len // kv_block)
    return BlockLayout(mask[0, :, :rows, :cols].cpu(), q_block)

