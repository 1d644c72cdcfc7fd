"""Every builder against hand-checked small layouts, its errors, and its build cost."""

from __future__ import annotations

import time

import pytest
import torch

from qbert.sparse import builders as B
from qbert.sparse.layout import BlockLayout
from tests.sparse._blocks import blocks

BS = 16


def only_head(layout: BlockLayout) -> torch.Tensor:
    assert layout.heads == 1
    return layout.mask[0]


def test_dense_covers_a_partial_last_block():
    layout = B.dense(50, BS, heads=3)  # 50 tokens: 4 blocks, the last holding 2 tokens
    assert layout.mask.shape == (3, 4, 4) and layout.mask.all() and layout.density == 1.0


def test_sliding_window():
    assert torch.equal(only_head(B.sliding_window(96, BS, window=1)), blocks("""
        110000
        111000
        011100
        001110
        000111
        000011"""))
    assert torch.equal(only_head(B.sliding_window(96, BS, window=0)), torch.eye(6, dtype=torch.bool))
    assert only_head(B.sliding_window(96, BS, window=5)).all()


BIGBIRD_NO_RANDOM = blocks("""
    111111
    111001
    111101
    101111
    100111
    111111""")


def test_bigbird_window_and_global_blocks():
    layout = B.bigbird(96, BS, window=1, global_blocks=(0, -1), random_blocks=0)
    assert torch.equal(only_head(layout), BIGBIRD_NO_RANDOM)


def test_bigbird_random_blocks_fill_inactive_blocks_of_non_global_rows():
    # One random block per non-global row. Row 2 has one candidate (block 4), row 3 one (block 1): both
    # rows become full; rows 1 and 4 have two candidates and gain exactly one.
    mask = only_head(B.bigbird(96, BS, random_blocks=1, seed=3))
    assert (mask >= BIGBIRD_NO_RANDOM).all()
    assert mask[2].all() and mask[3].all()
    assert mask[1].sum() == BIGBIRD_NO_RANDOM[1].sum() + 1 and mask[4].sum() == BIGBIRD_NO_RANDOM[4].sum() + 1
    assert torch.equal(mask[[0, 5]], BIGBIRD_NO_RANDOM[[0, 5]])


def test_bigbird_random_blocks_are_seeded_and_drawn_per_head():
    n, window, random_blocks = 32, 1, 3
    layout = B.bigbird(n * BS, BS, window=window, random_blocks=random_blocks, seed=7, heads=4)
    again = B.bigbird(n * BS, BS, window=window, random_blocks=random_blocks, seed=7, heads=4)
    other = B.bigbird(n * BS, BS, window=window, random_blocks=random_blocks, seed=8, heads=4)
    assert layout.same_as(again) and not layout.same_as(other)
    assert not torch.equal(layout.mask[0], layout.mask[1])
    # Away from the ends and the global blocks: 3 window + 2 global + 3 random blocks per row.
    inner = layout.mask[:, 2:-2].sum(-1)
    assert (inner == 2 * window + 1 + 2 + random_blocks).all()


def test_longformer_global_tokens_make_their_blocks_global():
    layout = B.longformer(128, BS, window=0, global_tokens=(17,), global_blocks=(-1,))
    expected = torch.eye(8, dtype=torch.bool)
    expected[[1, 7], :] = True  # token 17 is in block 1; block -1 is block 7
    expected[:, [1, 7]] = True
    assert torch.equal(only_head(layout), expected)


def test_fixed_local_windows_and_global_columns():
    assert torch.equal(only_head(B.fixed(128, BS, local_blocks=4, global_blocks=1)), blocks("""
        11110001
        11110001
        11110001
        11110001
        00011111
        00011111
        00011111
        00011111"""))


def test_fixed_horizontal_global_and_head_patterns():
    layout = B.fixed(128, BS, local_blocks=4, global_blocks=1, horizontal_global=True, global_patterns=2, heads=2)
    head0, head1 = layout.mask
    assert head0[[3, 7]].all() and not head0[[0, 1, 2, 4, 5, 6]].all(-1).any()
    assert head0[:, [3, 7]].all()
    # Pattern 1 starts its global block one block earlier: blocks 2 and 6.
    assert head1[:, [2, 6]].all() and head1[[2, 6]].all() and not head1[:, 3].all()


def test_fixed_partial_last_window_keeps_a_global_block_inside_the_sequence():
    # 5 blocks, windows {0,1} {2,3} {4}: global blocks 1, 3, and 4 (clamped into the partial window).
    assert torch.equal(only_head(B.fixed(80, BS, local_blocks=2, global_blocks=1)), blocks("""
        11011
        11011
        01111
        01111
        01011"""))


def test_variable_window_sizes_repeat_the_last():
    # Windows {0} {1,2} {3,4,5} {6,7,8} {9}; block 0 global.
    assert torch.equal(only_head(B.variable(160, BS, local_window_blocks=(1, 2, 3))), blocks("""
        1000000000
        1110000000
        1110000000
        1001110000
        1001110000
        1001110000
        1000001110
        1000001110
        1000001110
        1000000001"""))


def test_variable_global_ranges_horizontal_and_random():
    layout = B.variable(96, BS, local_window_blocks=(2,), global_block_indices=(2,),
                        global_block_end_indices=(4,), horizontal_global=True)
    assert torch.equal(only_head(layout), blocks("""
        111100
        111100
        111111
        111111
        001111
        001111"""))
    base = B.variable(512, BS, local_window_blocks=(4,))
    randomized = B.variable(512, BS, local_window_blocks=(4,), random_blocks=2, seed=1, heads=2)
    assert (randomized.mask >= base.mask).all()
    assert (randomized.mask.sum(-1) == base.mask.sum(-1) + 2).all()


def test_custom_from_a_predicate_a_tensor_and_per_head():
    widening = B.custom(lambda h, q, k: (q - k).abs() <= h, 64, BS, heads=2)
    assert torch.equal(widening.mask[0], torch.eye(4, dtype=torch.bool))
    assert torch.equal(widening.mask[1], only_head(B.sliding_window(64, BS, window=1)))
    picture = blocks("1010\n0101\n1010\n0101")
    assert torch.equal(only_head(B.custom(picture, 64, BS)), picture)
    stacked = B.per_head([B.sliding_window(64, BS, window=0), B.dense(64, BS)])
    assert stacked.heads == 2 and torch.equal(stacked.mask[0], torch.eye(4, dtype=torch.bool))
    assert stacked.mask[1].all()


@pytest.mark.parametrize("call, match", [
    (lambda: B.dense(64, 48), "block_size must be one of"),
    (lambda: B.dense(0, BS), "seq_len must be a positive int"),
    (lambda: B.sliding_window(64, BS, window=-1), "window must be an int >= 0"),
    (lambda: B.bigbird(64, BS, global_blocks=(4,)), r"global_blocks: block indices \[4\] are outside \[-4, 4\)"),
    (lambda: B.bigbird(64, BS, global_blocks=0), "must be a sequence of block indices"),
    (lambda: B.longformer(64, BS, global_tokens=(64,)), "global_tokens: block indices"),
    (lambda: B.fixed(64, BS, local_blocks=2, global_blocks=2, global_patterns=2, heads=2),
     "global_patterns \\* global_blocks = 4 must be <= local_blocks = 2"),
    (lambda: B.fixed(64, BS, global_patterns=2), "needs at least that many heads"),
    (lambda: B.variable(64, BS, local_window_blocks=()), "at least one window size"),
    (lambda: B.variable(64, BS, global_block_indices=(2,), global_block_end_indices=(2,)),
     r"each global range \[start, end\) needs start < end"),
    (lambda: B.custom(torch.ones(3, 3, dtype=torch.bool), 64, BS), r"blocks must be a bool tensor \[4, 4\]"),
    (lambda: B.custom(lambda h, q, k: q - k, 64, BS), "predicate must return a bool tensor"),
    (lambda: B.per_head([B.dense(64, BS), B.dense(80, BS)]), "every layout must have one head"),
    (lambda: B.dense(64, BS, heads=0), "heads must be an int >= 1"),
])
def test_builder_errors_name_the_constraint(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_building_costs_far_less_than_the_attention_it_serves():
    """The largest benchmark layouts (16384 tokens, 12 heads) build in less time than 1/96 of the
    attention forward they describe: one 2048-query slice of one head's q @ k^T, while a dense forward is
    8 such slices per head x 12 heads, twice over (q k^T and p v). Best of 5 on both sides: the CPUs are
    shared."""
    seq, heads, head_dim, block = 16384, 12, 64, 64
    q = torch.randn(2048, head_dim)
    k = torch.randn(seq, head_dim)
    (q @ k.T).sum()  # warm-up

    def best_of(fn, repeats=5):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    slice_s = best_of(lambda: q @ k.T)
    for builder in (lambda: B.bigbird(seq, block, heads=heads), lambda: B.sliding_window(seq, block, heads=heads),
                    lambda: B.fixed(seq, block, heads=heads), lambda: B.variable(seq, block, heads=heads)):
        assert best_of(builder) < slice_s
