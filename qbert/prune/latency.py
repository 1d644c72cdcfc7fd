"""Measured latency of encoder layers at candidate head / neuron counts, for latency budgets.

A ``LatencyTable`` gives, for each encoder layer with n units (heads, or FFN neurons), the time t_l(k) of
one forward of that layer keeping k units, for every k in 1..n. Each timed point is a copy of the layer
alone in its encoder module (``structure.single_layer_encoder``: its first k units kept; which ones does
not change the time), quantized with ``qbert.quantize`` when a ``format`` is given (the fused W8A8 chain
included, as the deployed model runs it), run on random hidden states [batch, seq_len, h] in the model's
dtype on its device, and timed by ``qbert.timing.time_fn`` (median of ``repeats`` after ``warmup``) at the
current torch thread count (``qbert.timing.set_threads``). Layers of one shape (heads, head size,
neurons, hidden size) share their points. A layer with at most ``points`` counts has every count timed;
otherwise ``points`` counts evenly spaced over 1..n (n and 1 included) are timed and the others linearly
interpolated between them.

The encoder's latency is taken as the sum of its layers' (t_l of the kept counts): the embeddings and the
task head do not change with pruning. ``prune_heads`` / ``prune_ffn`` take the table with a
``max_latency_us`` budget and choose by the multiple-choice knapsack of ``qbert.allocate.solvers``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qbert.nn.formats import LinearFormat, linear_format
from qbert.prune.structure import (
    DEFAULT_SEQ_LEN,
    LayerView,
    PruneError,
    encoder_layers,
    require_plain,
    single_layer_encoder,
)
from qbert.timing import DEFAULT_REPEATS, DEFAULT_WARMUP, time_fn

# Timed counts per layer shape when a layer has more counts than this (FFN neurons): enough to follow the
# staircase of GEMM tile widths coarsely, at a few seconds per shape for a BERT-base layer on 2 cores.
DEFAULT_POINTS = 17
DEFAULT_BATCH = 1  # sequences per timed forward: the online-serving case pruning for latency targets
FIELDS = {"head": "heads", "neuron": "intermediate"}  # unit -> the LayerView field it counts


@dataclass(frozen=True)
class LatencyTable:
    """Per encoder layer, microseconds of one forward at each kept count (module docstring).

    unit: ``"head"`` or ``"neuron"``; sizes[l]: layer l's unit count when measured; us[l][k - 1]: t_l(k)
    for k = 1..sizes[l]; timed[l]: the counts actually timed (the others are interpolated); batch,
    seq_len, format (``LinearFormat.describe()``, or ``"float"``), device and threads: how."""

    unit: str
    sizes: tuple[int, ...]
    us: tuple[tuple[float, ...], ...]
    timed: tuple[tuple[int, ...], ...]
    batch: int
    seq_len: int
    format: str
    device: str
    threads: int

    def latency_us(self, layer: int, kept: int) -> float:
        """t_layer(kept), timed or interpolated."""
        return self.us[layer][kept - 1]

    def total_us(self, kept: Sequence[int]) -> float:
        """The encoder's latency with ``kept[l]`` units in layer l."""
        return sum(self.latency_us(layer, k) for layer, k in enumerate(kept))

    def describe(self) -> str:
        return (f"{self.format} encoder layers, batch {self.batch} x {self.seq_len} tokens on {self.device}, "
                f"{self.threads} threads")

    def check_matches(self, views: Sequence[LayerView], unit: str, caller: str) -> None:
        """PruneError unless the table was measured for ``unit`` on layers of the sizes ``views`` have now."""
        if self.unit != unit:
            raise PruneError(f"{caller}: the latency table was measured for {self.unit}s, not {unit}s")
        sizes = tuple(getattr(view, FIELDS[unit]) for view in views)
        if sizes != self.sizes:
            raise PruneError(f"{caller}: the latency table was measured for layers of {list(self.sizes)} "
                             f"{unit}s; the encoder now has {list(sizes)}: measure it again "
                             f"(measure_layer_latency) on the model as it is")


def _timed_counts(size: int, points: int) -> list[int]:
    if size <= points:
        return list(range(1, size + 1))
    return sorted({round(k) for k in np.linspace(1, size, points)})


def _check_positive(caller: str, **values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PruneError(f"{caller}: {name} must be a positive int, got {value!r}")


def _model_tensor(model: nn.Module) -> torch.Tensor:
    for parameter in model.parameters():
        return parameter
    raise PruneError("measure_layer_latency: the model has no parameters")


def measure_layer_latency(model: nn.Module, unit: str, *, batch: int = DEFAULT_BATCH,
                          seq_len: int = DEFAULT_SEQ_LEN, format: str | LinearFormat | None = None,
                          points: int = DEFAULT_POINTS, warmup: int = DEFAULT_WARMUP,
                          repeats: int = DEFAULT_REPEATS, seed: int = 0, progress: bool = True) -> LatencyTable:
    """Time every encoder layer of ``model`` at its candidate ``unit`` counts (``"head"`` or ``"neuron"``)
    and return the ``LatencyTable`` (module docstring). ``format``: time the layers quantized to this
    mode name / LinearFormat (``qbert.quantize``'s ``mode``), as they will run once the pruned model is
    quantized; None times them as they are. The model is not changed."""
    caller = "measure_layer_latency"
    if unit not in FIELDS:
        raise PruneError(f"{caller}: unit must be one of {sorted(FIELDS)}, got {unit!r}")
    _check_positive(caller, batch=batch, seq_len=seq_len, repeats=repeats)
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise PruneError(f"{caller}: points must be an int >= 2 (the largest and the smallest count), got {points!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise PruneError(f"{caller}: warmup must be a non-negative int, got {warmup!r}")
    views = encoder_layers(model)
    require_plain(views, caller)
    field = FIELDS[unit]
    reference = _model_tensor(model)
    generator = torch.Generator().manual_seed(seed)
    hidden = {view.hidden for view in views}
    inputs = {h: torch.randn(batch, seq_len, h, generator=generator).to(reference.device, reference.dtype)
              for h in hidden}
    described = "float" if format is None else _describe(format)  # an unknown format fails before timing
    shapes = {_shape(view): view for view in views}
    cases = [(key, k) for key, view in shapes.items() for k in _timed_counts(getattr(view, field), points)]
    timed: dict[tuple[int, int, int, int], dict[int, float]] = {key: {} for key in shapes}
    from qbert.nn.quantize import quantize

    for key, kept in tqdm(cases, desc=f"timing layers ({unit}s)", unit="shape", disable=not progress):
        view = shapes[key]
        encoder = single_layer_encoder(model, view.index, **{field: kept}).eval()
        if format is not None:
            quantize(encoder, format, progress=False)
        x = inputs[view.hidden]
        with torch.no_grad():
            timed[key][kept] = time_fn(encoder, [x], x.device, warmup=warmup, repeats=repeats)
    us, counts = [], []
    for view in views:
        points_of = timed[_shape(view)]
        ks = sorted(points_of)
        us.append(tuple(float(t) for t in np.interp(np.arange(1, getattr(view, field) + 1), ks,
                                                    [points_of[k] for k in ks])))
        counts.append(tuple(ks))
    return LatencyTable(unit, tuple(getattr(view, field) for view in views), tuple(us), tuple(counts), batch,
                        seq_len, described, str(reference.device), torch.get_num_threads())


def _shape(view: LayerView) -> tuple[int, int, int, int]:
    """What a layer's time depends on: (heads, head size, neurons, hidden size)."""
    return view.heads, view.head_size, view.intermediate, view.hidden


def _describe(format: str | LinearFormat) -> str:
    return linear_format(format).describe()


__all__ = ["DEFAULT_BATCH", "DEFAULT_POINTS", "LatencyTable", "measure_layer_latency"]
