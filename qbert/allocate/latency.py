"""Measured latency per (layer, format), for latency budgets (HAWQ-V3).

Each layer is converted with ``QLinear.from_linear`` and its forward on x [tokens, K] (the layer's
device and weight dtype) is timed with ``qbert.timing.time_fn`` (CUDA events over rotated inputs on a
GPU, ``perf_counter`` batches on the CPU; median of ``repeats`` after ``warmup``). The kernel time depends only on the shape and the format, so layers of one shape are
timed once. A format that no backend can run on the layer's device raises the dispatcher's error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from qbert.allocate.layers import linear_layers
from qbert.nn.formats import LinearFormat
from qbert.nn.qlinear import QLinear
from qbert.timing import DEFAULT_REPEATS, DEFAULT_WARMUP, time_fn


def measure_latency(model: nn.Module, module_names: Sequence[str], formats: Sequence[LinearFormat], *,
                    tokens: int = 128, warmup: int | None = None, repeats: int | None = None,
                    seed: int = 0, progress: bool = True) -> dict[str, dict[LinearFormat, float]]:
    """``{name: {format: microseconds of one forward on [tokens, in_features]}}`` (module docstring).

    warmup / repeats: None keeps qbert.timing's defaults (``DEFAULT_WARMUP``, ``DEFAULT_REPEATS``).
    """
    if tokens < 1 or not formats:
        raise ValueError(f"measure_latency: need tokens >= 1 and at least one format, got {tokens}, {formats}")
    timing = {"warmup": DEFAULT_WARMUP if warmup is None else warmup,
              "repeats": DEFAULT_REPEATS if repeats is None else repeats}
    layers = linear_layers(model, module_names)
    generator = torch.Generator().manual_seed(seed)
    by_shape: dict[tuple[int, int, LinearFormat], float] = {}
    cases = sorted({(layer.out_features, layer.in_features) for layer in layers.values()})
    bar = tqdm(total=len(cases) * len(formats), desc="latency", unit="case", disable=not progress)
    for layer in layers.values():
        for fmt in formats:
            key = (layer.out_features, layer.in_features, fmt)
            if key not in by_shape:
                weight = layer.weight
                x = torch.randn(tokens, layer.in_features, generator=generator).to(weight.device, weight.dtype)
                qlinear = QLinear.from_linear(layer, fmt)
                with torch.no_grad():
                    by_shape[key] = time_fn(qlinear, [x], weight.device, **timing)
                bar.update()
    bar.close()
    return {name: {fmt: by_shape[(layer.out_features, layer.in_features, fmt)] for fmt in formats}
            for name, layer in layers.items()}
