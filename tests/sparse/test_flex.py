"""BlockLayout <-> FlexAttention BlockMask, both ways, and FlexAttention computing the layout's math."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from qbert.sparse import BUILDERS, BlockLayout, bigbird, per_head, sliding_window
from qbert.sparse.flex import from_block_mask, to_block_mask
from tests.sparse._reference import masked_dense_attention

LAYOUTS = {
    name: (lambda seq, name=name: BUILDERS[name](seq, 16, heads=2)) for name in BUILDERS if name != "fixed"
}
LAYOUTS["fixed"] = lambda seq: BUILDERS["fixed"](seq, 16, heads=2, global_patterns=2, local_blocks=2)
LAYOUTS["per_head"] = lambda seq: per_head([sliding_window(seq, 16, window=0), bigbird(seq, 16)])


@pytest.mark.parametrize("seq", [100, 128])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_round_trip_through_block_mask(name, seq):
    layout = LAYOUTS[name](seq)
    block_mask = to_block_mask(layout, seq, batch=3)
    assert block_mask.shape == (3, 2, seq, seq) and block_mask.BLOCK_SIZE == (16, 16)
    assert not block_mask.kv_num_blocks.any()  # every active block is a full block
    counts, indices = layout.csr("cpu")
    assert torch.equal(block_mask.full_kv_num_blocks[1], counts)
    assert torch.equal(block_mask.full_kv_indices[2], indices)
    assert torch.equal(block_mask.to_dense()[0].bool(), layout.mask)
    assert from_block_mask(block_mask).same_as(layout)


def test_block_mask_built_by_flex_reads_back():
    # A block-aligned mask_mod gives only full blocks; a token-level one gives partial blocks too.
    def block_window(b, h, q, kv):
        return (q // 32 - kv // 32).abs() <= 1

    def token_window(b, h, q, kv):
        return (q - kv).abs() <= 8

    aligned = create_block_mask(block_window, None, None, 256, 256, device="cpu", BLOCK_SIZE=32)
    assert from_block_mask(aligned).same_as(sliding_window(256, 32, window=1))
    token_level = create_block_mask(token_window, None, None, 256, 256, device="cpu", BLOCK_SIZE=32)
    with pytest.raises(ValueError, match="partial blocks under a mask_mod.*allow_partial=True"):
        from_block_mask(token_level)
    assert from_block_mask(token_level, allow_partial=True).same_as(sliding_window(256, 32, window=1))


def test_from_block_mask_errors():
    layout = sliding_window(64, 16)
    rectangular = create_block_mask(lambda b, h, q, kv: q >= 0, None, None, 128, 128, device="cpu",
                                    BLOCK_SIZE=(16, 32))
    with pytest.raises(ValueError, match=r"BLOCK_SIZE must be square"):
        from_block_mask(rectangular)
    per_batch = create_block_mask(lambda b, h, q, kv: (q // 16 == kv // 16) | (b == 1), 2, None, 64, 64,
                                  device="cpu", BLOCK_SIZE=16)
    with pytest.raises(ValueError, match="the 2 batch entries of the block mask differ"):
        from_block_mask(per_batch)
    with pytest.raises(ValueError, match=r"seq_len=80 at block_size=16 needs 5x5 blocks"):
        to_block_mask(layout, 80)
    with pytest.raises(ValueError, match="batch must be a positive int"):
        to_block_mask(layout, 64, batch=0)


def _qkv(seq: int, heads: int = 2, head_dim: int = 16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, heads, seq, head_dim, generator=g) for _ in range(3)]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_eager_flex_attention_follows_the_layout():
    """Eager FlexAttention evaluates mask_mod densely; the layout's mask_mod makes it match."""
    seq = 100
    layout = bigbird(seq, 16, heads=2, random_blocks=1)
    q, k, v = _qkv(seq)
    out = flex_attention(q, k, v, block_mask=to_block_mask(layout, seq))
    torch.testing.assert_close(out, masked_dense_attention(q, k, v, layout), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_flex_attention_follows_the_layout():
    """Compiled FlexAttention visits the full blocks only (seconds: an inductor compile on the CPU)."""
    seq = 200  # not a multiple of the block size: the last block is partial
    layout = BlockLayout(bigbird(seq, 16, heads=2, random_blocks=2).mask, 16)
    q, k, v = _qkv(seq)
    out = torch.compile(flex_attention)(q, k, v, block_mask=to_block_mask(layout, seq))
    torch.testing.assert_close(out, masked_dense_attention(q, k, v, layout), rtol=1e-5, atol=1e-5)
