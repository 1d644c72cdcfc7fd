"""Block-layout builders: dense, sliding window, BigBird, Longformer, Sparse-Transformer fixed,
DeepSpeed-style variable, and custom / per-head layouts.

Every builder takes ``(seq_len, block_size, *, heads=1, ...)`` and returns a ``BlockLayout`` over
``n = ceil(seq_len / block_size)`` query and key blocks. Block indices ``q`` (query block, row) and
``k`` (key block, column) run over ``0 .. n-1``; parameters that name blocks accept negative indices
counted from the end (``-1`` is the last block) and must lie in ``[-n, n)``. All layouts are
bidirectional (encoders): nothing is causal. A layout depends on ``seq_len`` only through ``n``, which
is what lets ``qbert.sparse.cache`` share one layout per block count.

Builders are vectorized over the ``[heads, n, n]`` grid (no Python loop over blocks), so a layout for
16384 tokens in blocks of 16 (1024 x 1024 blocks) builds in milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from qbert.sparse.layout import BLOCK_SIZES, BlockLayout


def num_blocks(seq_len: int, block_size: int) -> int:
    """``ceil(seq_len / block_size)``, after checking both."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
    return math.ceil(seq_len / block_size)


def _check_count(name: str, value: int, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _block_indices(name: str, indices: Sequence[int], n: int) -> torch.Tensor:
    """``indices`` as an int64 tensor with negatives resolved, each checked to lie in ``[-n, n)``."""
    if isinstance(indices, int):
        raise TypeError(f"{name} must be a sequence of block indices, got the int {indices} "
                        f"(write ({indices},))")
    values = [int(i) for i in indices]
    outside = [i for i in values if not -n <= i < n]
    if outside:
        raise ValueError(f"{name}: block indices {outside} are outside [-{n}, {n}) for {n} blocks")
    return torch.tensor([i % n for i in values], dtype=torch.long)


def _grid(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query-block indices ``[n, 1]`` and key-block indices ``[1, n]``."""
    blocks = torch.arange(n)
    return blocks[:, None], blocks[None, :]


def _band(n: int, window: int) -> torch.Tensor:
    """``[n, n]``: ``|q - k| <= window``."""
    q, k = _grid(n)
    return (q - k).abs() <= window


def _add_global(mask: torch.Tensor, is_global: torch.Tensor, horizontal: bool = True) -> torch.Tensor:
    """Every query block sees the global key blocks; with ``horizontal`` the global query blocks also see
    every key block. ``mask`` is ``[..., n, n]``, ``is_global`` bool ``[..., n]``."""
    mask = mask | is_global[..., None, :]
    if horizontal:
        mask = mask | is_global[..., :, None]
    return mask


def _add_random(mask: torch.Tensor, count: int, seed: int, skip_rows: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Add ``count`` random key blocks per query block (per head), drawn without replacement among the
    blocks not yet active, with a ``torch.Generator`` seeded by ``seed`` (the same layout for the same
    arguments on every machine). A row with fewer than ``count`` inactive blocks gets all of them.
    ``skip_rows`` (bool ``[n]``) marks rows that get none (BigBird's global rows, already full)."""
    if count == 0:
        return mask
    generator = torch.Generator().manual_seed(seed)
    # Inactive candidates score in [0, 1), active ones -1: the top ``count`` scores are random inactive
    # blocks first; any active block the top-k picks when candidates run out is already set.
    scores = torch.rand(mask.shape, generator=generator).masked_fill_(mask, -1.0)
    chosen = scores.topk(min(count, mask.shape[-1]), dim=-1).indices
    random = torch.zeros_like(mask).scatter_(-1, chosen, True)
    if skip_rows is not None:
        random &= ~skip_rows[:, None]
    return mask | random


def _layout(mask: torch.Tensor, heads: int, block_size: int) -> BlockLayout:
    """A BlockLayout of ``mask`` (``[n, n]`` or ``[heads, n, n]``) broadcast to ``heads``."""
    _check_count("heads", heads, 1)
    if mask.dim() == 2:
        mask = mask[None]
    return BlockLayout(mask.expand(heads, *mask.shape[-2:]), block_size)


def dense(seq_len: int, block_size: int, *, heads: int = 1) -> BlockLayout:
    """Every query block sees every key block (density 1)."""
    n = num_blocks(seq_len, block_size)
    return _layout(torch.ones(n, n, dtype=torch.bool), heads, block_size)


def sliding_window(seq_len: int, block_size: int, *, window: int = 1, heads: int = 1) -> BlockLayout:
    """Query block ``q`` sees key blocks ``k`` with ``|q - k| <= window`` (``window`` blocks on each side,
    ``2 * window + 1`` in all away from the ends)."""
    n = num_blocks(seq_len, block_size)
    return _layout(_band(n, _check_count("window", window)), heads, block_size)


def bigbird(seq_len: int, block_size: int, *, window: int = 1, global_blocks: Sequence[int] = (0, -1),
            random_blocks: int = 3, seed: int = 0, heads: int = 1) -> BlockLayout:
    """BigBird (ITC, Zaheer et al. 2020): sliding window + global blocks + random blocks.

    window: ``|q - k| <= window`` (HF BigBird: 1, i.e. three blocks).
    global_blocks: block indices that see every block and that every block sees (HF: first and last).
    random_blocks: per head and per non-global query block, this many further key blocks drawn without
        replacement from those not already active (seeded by ``seed``; each head draws its own).
    """
    n = num_blocks(seq_len, block_size)
    _check_count("heads", heads, 1)
    is_global = torch.zeros(n, dtype=torch.bool)
    is_global[_block_indices("global_blocks", global_blocks, n)] = True
    mask = _add_global(_band(n, _check_count("window", window)), is_global).expand(heads, n, n)
    mask = _add_random(mask, _check_count("random_blocks", random_blocks), seed, skip_rows=is_global)
    return BlockLayout(mask, block_size)


def longformer(seq_len: int, block_size: int, *, window: int = 1, global_blocks: Sequence[int] = (),
               global_tokens: Sequence[int] = (), heads: int = 1) -> BlockLayout:
    """Longformer (Beltagy et al. 2020): sliding window + global attention.

    window: ``|q - k| <= window`` blocks.
    global_blocks: block indices that see, and are seen by, every block.
    global_tokens: token positions (e.g. ``[CLS]`` at 0) with global attention; at block granularity the
        whole block holding a global token becomes global, so the layout is a superset of the token-level
        pattern (the extra entries are computed exactly, they are just not skipped).
    """
    n = num_blocks(seq_len, block_size)
    tokens = _block_indices("global_tokens", global_tokens, n * block_size)
    is_global = torch.zeros(n, dtype=torch.bool)
    is_global[_block_indices("global_blocks", global_blocks, n)] = True
    is_global[tokens // block_size] = True
    return _layout(_add_global(_band(n, _check_count("window", window)), is_global), heads, block_size)


def fixed(seq_len: int, block_size: int, *, local_blocks: int = 4, global_blocks: int = 1,
          global_patterns: int = 1, horizontal_global: bool = False, heads: int = 1) -> BlockLayout:
    """Sparse-Transformer "fixed" pattern (Child et al. 2019), bidirectional, as DeepSpeed's
    ``FixedSparsityConfig``.

    Local: blocks form windows of ``local_blocks``; a query block sees every block of its window.
    Global: in each window, ``global_blocks`` consecutive key blocks are seen by every query block. Head
    ``h`` uses pattern ``p = h % global_patterns``: the global blocks of a window start at offset
    ``local_blocks - (p + 1) * global_blocks`` (pattern 0: the last ``global_blocks`` of the window). In a
    last, partial window they start at ``min(window_start + offset, n - global_blocks)``.
    horizontal_global: the global query blocks also see every key block.
    """
    n = num_blocks(seq_len, block_size)
    _check_count("local_blocks", local_blocks, 1)
    _check_count("global_blocks", global_blocks, 1)
    _check_count("global_patterns", global_patterns, 1)
    _check_count("heads", heads, 1)
    if global_patterns * global_blocks > local_blocks:
        raise ValueError(f"fixed: global_patterns * global_blocks = {global_patterns * global_blocks} must be "
                         f"<= local_blocks = {local_blocks}")
    if global_patterns > heads:
        raise ValueError(f"fixed: global_patterns={global_patterns} needs at least that many heads, got {heads}")
    q, k = _grid(n)
    local = (q // local_blocks) == (k // local_blocks)
    # Per head: the window offset of its first global block, [heads, 1].
    offset = (local_blocks - (1 + torch.arange(heads) % global_patterns) * global_blocks)[:, None]
    blocks = torch.arange(n)[None, :]
    window_start = blocks - blocks % local_blocks
    start = window_start + offset
    last_window_start = n - n % local_blocks
    start = torch.where(window_start == last_window_start, torch.clamp(start, max=max(n - global_blocks, 0)),
                        start)
    is_global = (blocks >= start) & (blocks < start + global_blocks)  # [heads, n]
    return BlockLayout(_add_global(local.expand(heads, n, n), is_global, horizontal_global), block_size)


def variable(seq_len: int, block_size: int, *, local_window_blocks: Sequence[int] = (4,),
             global_block_indices: Sequence[int] = (0,), global_block_end_indices: Sequence[int] | None = None,
             random_blocks: int = 0, horizontal_global: bool = False, seed: int = 0,
             heads: int = 1) -> BlockLayout:
    """DeepSpeed-style ``VariableSparsityConfig``, bidirectional.

    Local: consecutive windows with the sizes of ``local_window_blocks`` in order, the last size repeated
    to the end; a query block sees every block of its window.
    Global: key blocks ``global_block_indices`` (or, with ``global_block_end_indices``, the ranges
    ``[start_i, end_i)``) are seen by every query block; with ``horizontal_global`` they also see every
    key block.
    random_blocks: per head and query block, this many further random key blocks (seeded by ``seed``).
    """
    n = num_blocks(seq_len, block_size)
    _check_count("heads", heads, 1)
    sizes = [_check_count("local_window_blocks[i]", int(s), 1) for s in local_window_blocks]
    if not sizes:
        raise ValueError("variable: local_window_blocks must name at least one window size")
    # Window boundaries: the listed sizes, then the last size repeated past n.
    explicit_ends = torch.tensor(sizes).cumsum(0)
    repeats = max(0, math.ceil((n - explicit_ends[-1].item()) / sizes[-1]))
    ends = torch.cat([explicit_ends, explicit_ends[-1] + sizes[-1] * torch.arange(1, repeats + 1)])
    window_of = torch.bucketize(torch.arange(n), ends, right=True)
    local = window_of[:, None] == window_of[None, :]

    starts = _block_indices("global_block_indices", global_block_indices, n)
    blocks = torch.arange(n)
    if global_block_end_indices is None:
        is_global = (blocks[:, None] == starts[None, :]).any(-1)
    else:
        if len(global_block_end_indices) != len(starts):
            raise ValueError(f"variable: global_block_end_indices has {len(global_block_end_indices)} entries, "
                             f"global_block_indices {len(starts)}")
        ends_g = torch.tensor([int(e) for e in global_block_end_indices])
        if bool(((ends_g <= starts) | (ends_g > n)).any()):
            raise ValueError(f"variable: each global range [start, end) needs start < end <= {n}; got starts "
                             f"{starts.tolist()} and ends {ends_g.tolist()}")
        is_global = ((blocks[:, None] >= starts[None, :]) & (blocks[:, None] < ends_g[None, :])).any(-1)
    mask = _add_global(local, is_global, horizontal_global).expand(heads, n, n)
    return BlockLayout(_add_random(mask, _check_count("random_blocks", random_blocks), seed), block_size)


def custom(blocks: torch.Tensor | Callable[..., torch.Tensor], seq_len: int, block_size: int, *,
           heads: int = 1) -> BlockLayout:
    """A layout from a bool block mask or a block-level predicate.

    blocks: a bool tensor ``[n, n]`` or ``[heads, n, n]`` (``n = ceil(seq_len / block_size)``), or a
        callable ``fn(h, q, k) -> bool tensor`` evaluated once on broadcast index tensors ``h [heads, 1, 1]``,
        ``q [1, n, 1]``, ``k [1, 1, n]`` (as FlexAttention's ``mask_mod``, but over blocks), e.g.
        ``lambda h, q, k: (q - k).abs() <= h + 1`` for a window that widens with the head.
    """
    n = num_blocks(seq_len, block_size)
    _check_count("heads", heads, 1)
    if callable(blocks):
        mask = blocks(torch.arange(heads)[:, None, None], torch.arange(n)[None, :, None],
                      torch.arange(n)[None, None, :])
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"custom: the predicate must return a bool tensor, got "
                            f"{getattr(mask, 'dtype', type(mask))}")
        return _layout(torch.broadcast_to(mask, (heads, n, n)), heads, block_size)
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.bool or blocks.dim() not in (2, 3) \
            or tuple(blocks.shape[-2:]) != (n, n) or (blocks.dim() == 3 and blocks.shape[0] not in (1, heads)):
        got = f"{blocks.dtype} {list(blocks.shape)}" if isinstance(blocks, torch.Tensor) else type(blocks)
        raise ValueError(f"custom: blocks must be a bool tensor [{n}, {n}] or [{heads}, {n}, {n}] for "
                         f"seq_len={seq_len} at block_size={block_size}, got {got}")
    return _layout(blocks.cpu(), heads, block_size)


def per_head(layouts: Sequence[BlockLayout]) -> BlockLayout:
    """One layout whose head ``h`` is ``layouts[h]`` (each a one-head layout, all of one shape and block
    size), e.g. ``per_head([sliding_window(s, 64, window=w) for w in (1, 2, 4, 8)])``."""
    if not layouts:
        raise ValueError("per_head: needs at least one layout")
    first = layouts[0]
    for i, layout in enumerate(layouts):
        if layout.heads != 1 or layout.block_size != first.block_size or layout.mask.shape != first.mask.shape:
            raise ValueError(f"per_head: every layout must have one head, block_size {first.block_size} and "
                             f"{first.q_blocks}x{first.kv_blocks} blocks; layout {i} has {layout.heads} heads, "
                             f"block_size {layout.block_size}, {layout.q_blocks}x{layout.kv_blocks} blocks")
    return BlockLayout(torch.cat([layout.mask for layout in layouts]), first.block_size)


# Builders reachable by name (``qbert.sparsify_attention(model, layout="bigbird", ...)``, the cache).
BUILDERS: dict[str, Callable[..., BlockLayout]] = {
    "dense": dense,
    "sliding_window": sliding_window,
    "bigbird": bigbird,
    "longformer": longformer,
    "fixed": fixed,
    "variable": variable,
}
