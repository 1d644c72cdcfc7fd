"""Build each layout once per (builder, parameters, block count) and reuse it.

A layout depends on the sequence length only through ``n = ceil(seq_len / block_size)`` (see
``qbert.sparse.builders``), so every length in ``((n - 1) * block_size, n * block_size]`` — a *seq-len
bucket* — shares one ``BlockLayout`` object, and with it that object's per-device CSR tensors. A model
that sees a handful of lengths builds a handful of layouts; the cache keeps the ``MAX_ENTRIES`` most
recently used.

``LayoutSpec`` is the hashable description that ``qbert.sparsify_attention`` stores on a model:
``spec.layout(seq_len)`` is the cached layout for that length.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qbert.sparse.builders import BUILDERS, num_blocks
from qbert.sparse.layout import BlockLayout

MAX_ENTRIES = 256

_lock = threading.Lock()
_entries: OrderedDict[tuple, BlockLayout] = OrderedDict()
_stats = {"hits": 0, "misses": 0}


def _freeze(name: str, value: Any) -> Any:
    """A hashable form of a builder parameter (lists become tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(name, v) for v in value)
    try:
        hash(value)
    except TypeError:
        raise TypeError(f"layout parameter {name}={value!r} is not hashable, so the layout cannot be cached; "
                        f"pass ints, bools, tuples or a callable") from None
    return value


def _builder(name: str) -> Callable[..., BlockLayout]:
    if name not in BUILDERS:
        raise ValueError(f"unknown layout builder {name!r}; known: {', '.join(BUILDERS)}")
    return BUILDERS[name]


@dataclass(frozen=True)
class LayoutSpec:
    """A named builder with its parameters: ``LayoutSpec.of("bigbird", 64, random_blocks=2)``."""

    builder: str
    block_size: int
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, builder: str, block_size: int, **params: Any) -> LayoutSpec:
        _builder(builder)
        num_blocks(block_size, block_size)  # checks block_size
        frozen = tuple(sorted((k, _freeze(k, v)) for k, v in params.items()))
        return cls(builder, block_size, frozen)

    def layout(self, seq_len: int) -> BlockLayout:
        """The cached layout for ``seq_len`` tokens (built on the first call for its block count)."""
        return cached_layout(self.builder, seq_len, self.block_size, **dict(self.params))


def cached_layout(builder: str, seq_len: int, block_size: int, **params: Any) -> BlockLayout:
    """``BUILDERS[builder](seq_len, block_size, **params)``, built once per (builder, block_size, params,
    ceil(seq_len / block_size)) and then returned from the cache (the same object)."""
    build = _builder(builder)
    n = num_blocks(seq_len, block_size)
    key = (builder, block_size, n, tuple(sorted((k, _freeze(k, v)) for k, v in params.items())))
    with _lock:
        layout = _entries.get(key)
        if layout is not None:
            _entries.move_to_end(key)
            _stats["hits"] += 1
            return layout
    # Build outside the lock; the bucket's representative length is its longest, n * block_size.
    layout = build(n * block_size, block_size, **params)
    with _lock:
        _stats["misses"] += 1
        layout = _entries.setdefault(key, layout)
        _entries.move_to_end(key)
        while len(_entries) > MAX_ENTRIES:
            _entries.popitem(last=False)
    return layout


def cache_info() -> dict[str, int]:
    """``{"hits", "misses", "size"}`` of the layout cache."""
    with _lock:
        return {**_stats, "size": len(_entries)}


def clear_cache() -> None:
    """Forget every cached layout and reset the counters."""
    with _lock:
        _entries.clear()
        _stats.update(hits=0, misses=0)
