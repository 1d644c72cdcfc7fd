"""Block layouts in the compressed-row (CSR) form the kernels and FlexAttention read.

A layout is a bool mask ``[heads, rows, cols]`` over blocks (rows = query blocks, cols = key blocks).
Its CSR form is two int32 tensors:

    counts  [heads, rows]        active blocks of each row
    indices [heads, rows, cols]  per row: the active column indices in ascending order, then the
                                 inactive ones in ascending order (only the first ``counts`` entries mean
                                 anything to a kernel; keeping the full width makes the tensor a
                                 permutation, which FlexAttention's ``BlockMask`` also stores)

``to_csr(mask.transpose(-1, -2))`` is the transposed form (per key block: the query blocks that see it),
which a backward pass walks to accumulate dK and dV.
"""

from __future__ import annotations

import torch


def to_csr(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(counts int32 [H, R], indices int32 [H, R, C])`` of a bool block mask ``[H, R, C]``."""
    if mask.dtype != torch.bool or mask.dim() != 3:
        raise ValueError(f"to_csr: the block mask must be a bool tensor [heads, rows, cols], "
                         f"got {mask.dtype} of shape {list(mask.shape)}")
    counts = mask.sum(-1, dtype=torch.int32)
    # A stable sort of "inactive" puts the active columns first, each group in ascending order.
    indices = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    return counts, indices


def from_csr(counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The bool block mask ``[H, R, C]`` of a CSR pair (the inverse of ``to_csr``)."""
    if counts.dim() != 2 or indices.dim() != 3 or indices.shape[:2] != counts.shape:
        raise ValueError(f"from_csr: counts must be [heads, rows] and indices [heads, rows, cols], got "
                         f"{list(counts.shape)} and {list(indices.shape)}")
    cols = indices.shape[-1]
    position = torch.arange(cols, device=counts.device)
    active = position < counts[..., None]
    mask = torch.zeros(indices.shape, dtype=torch.bool, device=counts.device)
    return mask.scatter_(-1, indices.long(), active)
