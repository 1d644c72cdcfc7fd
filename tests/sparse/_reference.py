"""Masked dense attention: the block-sparse attention math written out with a token-level mask."""

from __future__ import annotations

import torch

from qbert.sparse import BlockLayout


def masked_dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                           key_padding_mask: torch.Tensor | None = None, scale: float | None = None
                           ) -> torch.Tensor:
    """``softmax(scale * q k^T, -inf outside the layout and on padded keys) v`` in float64, ``[b, h, s, d]``;
    a query row with no visible key gives zeros."""
    seq, head_dim = q.shape[-2], q.shape[-1]
    scale = head_dim ** -0.5 if scale is None else scale
    allowed = layout.token_mask(seq)[None].to(q.device)  # [1, H or 1, s, s]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    probs = probs.masked_fill(~allowed.any(-1, keepdim=True), 0.0)  # all -inf rows are NaN: no visible key
    return (probs @ v.double()).to(q.dtype)
