"""``BlockLayout``: which key blocks each query block attends to, per head.

A layout is a bool mask ``[heads, q_blocks, kv_blocks]`` over square blocks of ``block_size`` tokens
(16, 32, 64 or 128). Query token ``i`` may attend key token ``j`` when
``mask[h, i // block_size, j // block_size]`` is True; a sequence of ``seq`` tokens has
``ceil(seq / block_size)`` blocks (the last one possibly partial). A layout with one head is broadcast
over all heads by the op.

The mask lives on the CPU; the kernels read the CSR form (``qbert.sparse.csr``), built on first use per
device and kept on the layout, so a layout built once costs one host-to-device copy per device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from qbert.sparse.csr import to_csr

BLOCK_SIZES = (16, 32, 64, 128)


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """A block-sparse attention layout.

    mask: bool ``[heads, q_blocks, kv_blocks]`` on the CPU (True = the query block sees the key block).
    block_size: tokens per block, one of ``BLOCK_SIZES``.

    Layouts compare and hash by identity (a layout is built once and cached, see ``qbert.sparse.cache``);
    ``same_as`` compares the contents.
    """

    mask: torch.Tensor
    block_size: int
    _csr: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        mask = self.mask
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 3:
            got = f"{mask.dtype} of shape {list(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask)
            raise ValueError(f"BlockLayout: mask must be a bool tensor [heads, q_blocks, kv_blocks], got {got}")
        if mask.device.type != "cpu":
            raise ValueError(f"BlockLayout: mask must be on the CPU (the CSR form is moved per device), "
                             f"got {mask.device}")
        if min(mask.shape) == 0:
            raise ValueError(f"BlockLayout: mask must be non-empty, got shape {list(mask.shape)}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"BlockLayout: block_size must be one of {BLOCK_SIZES}, got {self.block_size}")
        # Own a contiguous copy that no caller can mutate behind the cached CSR.
        object.__setattr__(self, "mask", mask.detach().clone().contiguous())

    @property
    def heads(self) -> int:
        return self.mask.shape[0]

    @property
    def q_blocks(self) -> int:
        return self.mask.shape[1]

    @property
    def kv_blocks(self) -> int:
        return self.mask.shape[2]

    @property
    def density(self) -> float:
        """Fraction of active blocks, in [0, 1]."""
        return self.mask.float().mean().item()

    def csr(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """``to_csr(mask)`` on ``device``: ``(counts int32 [H, q_blocks], indices int32 [H, q_blocks,
        kv_blocks])`` — per query block, the active key blocks in ascending order. Cached per device."""
        return self._cached("csr", device, self.mask)

    def csr_transposed(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """``to_csr(mask.transpose(-1, -2))`` on ``device``: per key block, the query blocks that see it
        (what a backward pass walks for dK, dV). Cached per device."""
        return self._cached("csr_t", device, self.mask.transpose(-1, -2))

    def _cached(self, kind: str, device: torch.device | str, mask: torch.Tensor):
        key = (kind, str(torch.device(device)))
        if key not in self._csr:
            counts, indices = to_csr(mask.contiguous())
            self._csr[key] = (counts.to(device), indices.to(device))
        return self._csr[key]

    def blocks_for(self, seq_len: int) -> int:
        """``ceil(seq_len / block_size)``: the blocks a sequence of ``seq_len`` tokens spans."""
        return math.ceil(seq_len / self.block_size)

    def token_mask(self, seq_len: int) -> torch.Tensor:
        """The layout expanded to tokens: bool ``[heads, seq_len, seq_len]`` (True = may attend).

        Requires ``q_blocks == kv_blocks == ceil(seq_len / block_size)``. Memory is ``heads * seq_len**2``
        bytes: meant for references and tests, not for long sequences.
        """
        blocks = self.blocks_for(seq_len)
        if self.q_blocks != blocks or self.kv_blocks != blocks:
            raise ValueError(f"BlockLayout.token_mask: seq_len={seq_len} at block_size={self.block_size} "
                             f"needs {blocks}x{blocks} blocks, the layout has "
                             f"{self.q_blocks}x{self.kv_blocks}")
        block_of = torch.arange(seq_len) // self.block_size
        return self.mask[:, block_of][:, :, block_of]

    def same_as(self, other: BlockLayout) -> bool:
        """True when both layouts have the same block size and mask."""
        return (self.block_size == other.block_size and self.mask.shape == other.mask.shape
                and bool(torch.equal(self.mask, other.mask)))
