"""Timing one call, the way every qbert measurement does it (latency budgets, ``qbert demo``, benchmarks).

CPU:  ``time.perf_counter`` around batches of calls (a batch lasts at least ``MIN_BATCH_S``, so short
      calls are not dominated by the clock), median over repeats after warm-up, at the thread count set
      by ``set_threads`` (CPU timings depend on it; record it with the results).
CPU, side by side: ``round_robin_samples`` / ``time_round_robin`` time several fns in rounds (one sample of
      each per round, the first rotating), so that a shared machine's drift reaches every fn alike.
CUDA: CUDA events around one call on each of several input copies, median over repeats. The copies
      together are larger than ``L2_FLUSH_BYTES`` so that weights come from HBM, as they do in a model
      whose layers are run one after another (one BERT layer fits in an H100's 50 MB L2).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

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


def _calls_per_sample(fn: Callable[[], Any], min_sample_s: float = MIN_BATCH_S) -> int:
    """Calls of ``fn`` one timed sample repeats so that it lasts ``min_sample_s``, from one call now."""
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-9)
    return min(MAX_BATCH_CALLS, max(1, math.ceil(min_sample_s / once)))


def time_cpu(fn: Callable[[], Any], warmup: int = DEFAULT_WARMUP, repeats: int = DEFAULT_REPEATS) -> float:
    """Median µs of one ``fn()`` call on the CPU."""
    for _ in range(warmup):
        fn()
    calls = _calls_per_sample(fn)
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


def round_robin_samples(fns: Mapping[str, Callable[[], Any]], warmup: int = DEFAULT_WARMUP,
                        repeats: int = DEFAULT_REPEATS, progress: bool = False, desc: str = "rounds",
                        min_sample_s: float = MIN_BATCH_S, settle_calls: int = 0) -> dict[str, list[float]]:
    """Seconds per call of each ``fns[name]()``, timed side by side on the CPU: ``warmup`` untimed rounds,
    then ``repeats`` timed rounds, each round one sample of every fn with the first fn rotating by one
    each round, so that drift of a shared machine reaches every fn alike. A sample repeats a fn's call
    until it lasts ``min_sample_s`` (the count fixed from one call after warm-up, as ``time_cpu`` does),
    after ``settle_calls`` untimed calls: fns that run on thread pools of their own (another runtime) pay
    for the previous fn's idle threads on their first call after it, which a deployment running one
    runtime never does."""
    if not fns or warmup < 0 or repeats < 1 or settle_calls < 0 or min_sample_s <= 0:
        raise ValueError(f"round_robin_samples: need fns, warmup >= 0, repeats >= 1, settle_calls >= 0 and "
                         f"min_sample_s > 0, got {len(fns)} fns, warmup={warmup}, repeats={repeats}, "
                         f"settle_calls={settle_calls}, min_sample_s={min_sample_s}")
    names = list(fns)
    calls: dict[str, int] = {}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in tqdm(range(warmup + repeats), desc=desc, unit="round", disable=not progress, leave=False):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            fn = fns[name]
            for _ in range(settle_calls):
                fn()
            if r == warmup and name not in calls:  # warm now: one call fixes the sample's length
                calls[name] = _calls_per_sample(fn, min_sample_s)
            count = calls.get(name, 1)
            start = time.perf_counter()
            for _ in range(count):
                fn()
            seconds = (time.perf_counter() - start) / count
            if r >= warmup:
                samples[name].append(seconds)
    return samples


def time_round_robin(fns: Mapping[str, Callable[[], Any]], warmup: int = DEFAULT_WARMUP,
                     repeats: int = DEFAULT_REPEATS, progress: bool = False, min_sample_s: float = MIN_BATCH_S,
                     settle_calls: int = 0) -> dict[str, float]:
    """Median µs of one call of each fn, timed side by side (``round_robin_samples``)."""
    samples = round_robin_samples(fns, warmup, repeats, progress, min_sample_s=min_sample_s,
                                  settle_calls=settle_calls)
    return {name: _median_us(s) for name, s in samples.items()}
