"""BlockLayout: validation, properties, token expansion and the per-device CSR cache."""

from __future__ import annotations

import pytest
import torch

from qbert.sparse import BlockLayout, from_csr, sliding_window, to_csr
from tests.sparse._blocks import blocks

PICTURE = blocks("""
    110
    011
    001""")


def test_properties_and_token_mask():
    layout = BlockLayout(PICTURE[None], 16)
    assert (layout.heads, layout.q_blocks, layout.kv_blocks, layout.block_size) == (1, 3, 3, 16)
    assert layout.density == pytest.approx(5 / 9)
    tokens = layout.token_mask(40)  # 40 tokens: blocks of 16, 16, 8
    assert tokens.shape == (1, 40, 40)
    assert tokens[0, 15, 31] and not tokens[0, 16, 15] and tokens[0, 39, 39] and not tokens[0, 39, 0]
    assert layout.blocks_for(33) == 3 and layout.blocks_for(48) == 3
    with pytest.raises(ValueError, match=r"seq_len=64 at block_size=16 needs 4x4 blocks, the layout has 3x3"):
        layout.token_mask(64)


def test_csr_matches_to_csr_and_is_cached_per_device():
    layout = sliding_window(100, 16, window=1, heads=2)
    counts, indices = layout.csr("cpu")
    ref_counts, ref_indices = to_csr(layout.mask)
    assert torch.equal(counts, ref_counts) and torch.equal(indices, ref_indices)
    assert counts.dtype == indices.dtype == torch.int32
    assert layout.csr("cpu")[0] is counts and layout.csr(torch.device("cpu"))[1] is indices
    t_counts, t_indices = layout.csr_transposed("cpu")
    assert torch.equal(from_csr(t_counts, t_indices), layout.mask.transpose(-1, -2))
    assert torch.equal(from_csr(counts, indices), layout.mask)


def test_csr_transposed_of_an_asymmetric_layout():
    layout = BlockLayout(PICTURE[None], 32)
    counts, indices = layout.csr_transposed("cpu")
    # Key block 0 is seen by query block 0; key block 1 by 0 and 1; key block 2 by 1 and 2.
    assert counts.tolist() == [[1, 2, 2]]
    assert indices[0, 0, :1].tolist() == [0] and indices[0, 1, :2].tolist() == [0, 1]
    assert indices[0, 2, :2].tolist() == [1, 2]


def test_the_layout_owns_its_mask():
    mask = PICTURE[None].clone()
    layout = BlockLayout(mask, 16)
    layout.csr("cpu")
    mask[0, 2, 0] = True
    assert torch.equal(layout.mask[0], PICTURE)
    assert layout.same_as(BlockLayout(PICTURE[None], 16)) and not layout.same_as(BlockLayout(mask, 16))
    assert not layout.same_as(BlockLayout(PICTURE[None], 32))


@pytest.mark.parametrize("mask, block_size, match", [
    (PICTURE.int()[None], 16, "mask must be a bool tensor"),
    (PICTURE, 16, "mask must be a bool tensor"),
    (PICTURE[None], 8, r"block_size must be one of \(16, 32, 64, 128\)"),
    (torch.zeros(1, 0, 3, dtype=torch.bool), 16, "mask must be non-empty"),
    (PICTURE[None].to("meta"), 16, "mask must be on the CPU"),
])
def test_invalid_layouts_are_refused(mask, block_size, match):
    with pytest.raises(ValueError, match=match):
        BlockLayout(mask, block_size)
