"""The layout cache: one layout per (builder, parameters, block count), hits, eviction, cost."""

from __future__ import annotations

import time

import pytest

from qbert.sparse import builders, cache
from qbert.sparse.cache import LayoutSpec, cache_info, cached_layout, clear_cache


@pytest.fixture(autouse=True)
def empty_cache():
    clear_cache()
    yield
    clear_cache()


def test_one_layout_per_seq_len_bucket():
    first = cached_layout("bigbird", 113, 16, random_blocks=1)  # ceil(113 / 16) = 8 blocks
    assert cached_layout("bigbird", 128, 16, random_blocks=1) is first  # also 8 blocks
    assert cached_layout("bigbird", 129, 16, random_blocks=1) is not first  # 9 blocks
    assert cached_layout("bigbird", 128, 16, random_blocks=2) is not first
    assert cache_info() == {"hits": 1, "misses": 3, "size": 3}
    assert first.same_as(builders.bigbird(128, 16, random_blocks=1))


def test_spec_builds_through_the_cache_and_freezes_list_params():
    spec = LayoutSpec.of("variable", 32, local_window_blocks=[2, 4])
    assert spec == LayoutSpec.of("variable", 32, local_window_blocks=(2, 4))
    layout = spec.layout(300)
    assert layout is spec.layout(320) and layout.block_size == 32 and layout.q_blocks == 10
    assert cache_info()["misses"] == 1


def test_least_recently_used_entries_are_evicted(monkeypatch):
    monkeypatch.setattr(cache, "MAX_ENTRIES", 2)
    a = cached_layout("dense", 16, 16)
    cached_layout("dense", 32, 16)
    assert cached_layout("dense", 16, 16) is a  # a is now the most recent
    cached_layout("dense", 48, 16)  # evicts 32
    assert cache_info()["size"] == 2 and cached_layout("dense", 16, 16) is a
    misses = cache_info()["misses"]
    cached_layout("dense", 32, 16)
    assert cache_info()["misses"] == misses + 1


def test_a_cache_hit_costs_a_tiny_fraction_of_a_build():
    spec = LayoutSpec.of("bigbird", 16, heads=12)
    start = time.perf_counter()
    spec.layout(16384)
    build_s = time.perf_counter() - start
    hits = 100
    start = time.perf_counter()
    for _ in range(hits):
        spec.layout(16384)
    hit_s = (time.perf_counter() - start) / hits
    assert hit_s < build_s / 100, f"hit {hit_s * 1e6:.1f} us vs build {build_s * 1e6:.1f} us"


@pytest.mark.parametrize("call, error, match", [
    (lambda: cached_layout("butterfly", 64, 16), ValueError, "unknown layout builder 'butterfly'; known: dense"),
    (lambda: LayoutSpec.of("dense", 24), ValueError, "block_size must be one of"),
    (lambda: cached_layout("bigbird", 64, 16, global_blocks={0: 1}), TypeError, "is not hashable"),
])
def test_cache_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
