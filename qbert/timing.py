"""Timing one call, the way every qbert measurement does it (latency budgets, ``qbert demo``, benchmarks).

CPU:  ``time.perf_counter`` around batches of calls (a batch lasts at least ``MIN_BATCH_S``, so short
      calls are not dominated by the clock), median over repeats after warm-up, at the thread count set
      by ``set_threads`` (CPU timings depend on it; record it with the results).
CUDA: CUDA events around one call on each of several input copies, median over repeats. The copies
      together are larger than ``L2_FLUSH_BYTES`` so that weights come from HBM, as they do in a model
      whose layers are run one after another (one BERT layer fits in an H100's 50 MB L2).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

DEFAULT_WARMUP = 3
DEFAULT_REPEATS = 20
MIN_BATCH_S = 1e-3  # a CPU timing batch repeats the call until it lasts at least this long
MAX_BATCH_CALLS = 1000
L2_FLUSH_BYTES = 2 * 50 * 2**20  # twice the H100's L2: rotated inputs never all fit in it
MAX_INPUT_COPIES = 64
US_PER_S = 1e6


def set_threads(threads: int) -> int:
    """Pin torch's intra-op thread count (CPU timings depend on it) and return it."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    return threads


def _median_us(samples_s: Sequence[float]) -> float:
    return statistics.median(samples_s) * US_PER_S


def time_cpu(fn: Callable[[], Any], warmup: int = DEFAULT_WARMUP, repeats: int = DEFAULT_REPEATS) -> float:
    """Median µs of one ``fn()`` call on the CPU."""
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-9)
    calls = min(MAX_BATCH_CALLS, max(1, math.ceil(MIN_BATCH_S / once)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return _median_us(samples)


def input_copies(bytes_per_copy: int) -> int:
    """How many copies of a case's inputs to rotate through so that together they overflow L2."""
    return max(1, min(MAX_INPUT_COPIES, math.ceil(L2_FLUSH_BYTES / max(bytes_per_copy, 1))))


def time_cuda(fn: Callable[[Any], Any], inputs: Sequence[Any], warmup: int = DEFAULT_WARMUP,
              repeats: int = DEFAULT_REPEATS) -> float:
    """Median µs of ``fn(x)`` on CUDA, rotating ``x`` over ``inputs`` (see ``input_copies``)."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    for start, end in events:
        start.record()
        for x in inputs:
            fn(x)
        end.record()
    torch.cuda.synchronize()
    ms_per_s = 1e3
    return _median_us([start.elapsed_time(end) / ms_per_s / len(inputs) for start, end in events])


def time_fn(fn: Callable[[Any], Any], inputs: Sequence[Any], device: torch.device,
            warmup: int = DEFAULT_WARMUP, repeats: int = DEFAULT_REPEATS) -> float:
    """Median µs of ``fn(x)``: CUDA events over rotated ``inputs`` on CUDA, perf_counter on CPU."""
    if device.type == "cuda":
        return time_cuda(fn, inputs, warmup, repeats)
    return time_cpu(lambda: fn(inputs[0]), warmup, repeats)
