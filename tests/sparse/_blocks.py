"""Write small block masks as pictures: one row per query block, ``1`` = active key block."""

from __future__ import annotations

import torch


def blocks(picture: str) -> torch.Tensor:
    """``"110\\n111\\n011"`` -> bool ``[3, 3]``."""
    rows = [line.strip() for line in picture.strip().splitlines()]
    return torch.tensor([[c == "1" for c in row] for row in rows], dtype=torch.bool)
