"""Choosing what to prune under a budget, and the public entry points ``prune_heads``, ``prune_ffn`` and
``prune_layers``.

Units (heads, neurons or layers) carry importance scores s (``qbert.prune.scores``, or given). Within a
layer the units go in ascending score order (ties: lower index first), so keeping k of a layer's n units
removes its n - k lowest, at cost C_l(k) = the sum of those n - k scores. Exactly one budget:

  * ``count``: remove that many units in all, minimising sum_l C_l(k_l). The cumulative sums C_l are
    convex in n - k (sorted scores), so taking the globally cheapest next removal steps is optimal
    (greedy on a partition matroid); with ``multiple_of = 1`` these are exactly the lowest-scoring units
    subject to ``min_per_layer``.
  * ``fraction``: f in (0, 1) of all units, rounded to the nearest removable count (ties upward).
  * ``max_flops``: the encoder's ``layer_flops`` total at ``seq_len`` must fit: the multiple-choice
    knapsack of ``qbert.allocate.solvers`` (``solve_milp``, exact), one group per layer whose options are
    the allowed kept counts k with cost C_l(k) and size ``layer_flops`` with k units. A negative score (a
    negative Hessian trace estimate) predicts that removing the unit lowers the loss, so the knapsack
    removes it even where the budget does not need it.
  * ``max_latency_us``: the same knapsack with the measured latency t_l(k) of a ``LatencyTable``
    (``qbert.prune.latency.measure_layer_latency``: each layer timed at its candidate counts, optionally
    quantized to the format it will run in) in place of the FLOPs: sum_l t_l(k_l) <= max_latency_us.

Allowed kept counts of a layer with n units: k in ``min_per_layer .. n``, and for FFN neurons k a multiple
of ``multiple_of`` (a layer whose n is not one loses n mod multiple_of neurons whatever the budget).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from qbert.allocate.solvers import Problem, solve_milp
from qbert.hessian.hvp import Batch, LossFn
from qbert.prune.latency import LatencyTable
from qbert.prune.scores import (
    TAYLOR,
    calibration_batches,
    check_method,
    head_importance,
    layer_importance,
    neuron_importance,
)
from qbert.prune.structure import (
    DEFAULT_SEQ_LEN,
    LayerView,
    PruneError,
    encoder_layers,
    layer_flops,
    remove_heads,
    remove_layers,
    remove_neurons,
    require_plain,
)

GIVEN = "given"  # PruneSummary.method when the caller passed the scores
UNITS = {"head": "heads", "neuron": "neurons", "layer": "layers"}


@dataclass(frozen=True)
class PruneSummary:
    """What a ``prune_*`` call removed and what it saved.

    unit: ``"head"``, ``"neuron"`` or ``"layer"``; method: the scoring method, or ``"given"``.
    removed: heads / neurons, {layer index: [indices among the layer's units before the call]} for the
    layers that lost any; layers, the sorted indices of the removed layers (before the call).
    parameters_before / _after: every parameter of the model (``model.parameters()``, shared ones once);
    flops_before / _after: the encoder layers' ``layer_flops`` total at ``seq_len`` tokens.
    latency_us_before / _after: with a latency budget, the encoder layers' latency by the table (the
    measured or interpolated t_l of each layer's count before and after; ``latency`` says how it was
    measured), else None."""

    unit: str
    method: str
    removed: Mapping[int, list[int]] | list[int]
    parameters_before: int
    parameters_after: int
    flops_before: int
    flops_after: int
    seq_len: int
    latency_us_before: float | None = None
    latency_us_after: float | None = None
    latency: str | None = None

    @property
    def count(self) -> int:
        """Units removed in all."""
        if isinstance(self.removed, Mapping):
            return sum(len(indices) for indices in self.removed.values())
        return len(self.removed)

    def describe(self) -> str:
        def change(before: int, after: int) -> str:
            return f"{before:,} -> {after:,} ({(after - before) / before:+.1%})"
        lines = [f"pruned {self.count} {UNITS[self.unit]} ({self.method} scores)",
                 f"  parameters: {change(self.parameters_before, self.parameters_after)}",
                 f"  encoder FLOPs at seq_len={self.seq_len}: {change(self.flops_before, self.flops_after)}"]
        if self.latency_us_before is not None:
            lines.append(f"  encoder latency ({self.latency}): {self.latency_us_before:,.0f} -> "
                         f"{self.latency_us_after:,.0f} us "
                         f"({(self.latency_us_after - self.latency_us_before) / self.latency_us_before:+.1%})")
        if isinstance(self.removed, Mapping):
            lines += [f"  layer {layer}: removed {len(indices)} {UNITS[self.unit]} {indices}"
                      for layer, indices in sorted(self.removed.items())]
        else:
            lines.append(f"  removed layers {self.removed}")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Unit:
    """How one kind of unit is counted, scored and removed."""

    name: str
    size: Callable[[LayerView], int]
    field: str  # the LayerView field holding the count (for layer_flops of a candidate)
    importance: Callable[..., list[torch.Tensor]]
    remove: Callable[[nn.Module, Mapping[int, Iterable[int]]], None]


HEADS = _Unit("head", lambda view: view.heads, "heads", head_importance, remove_heads)
NEURONS = _Unit("neuron", lambda view: view.intermediate, "intermediate", neuron_importance, remove_neurons)


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _flops(model: nn.Module, seq_len: int) -> int:
    return sum(layer_flops(view, seq_len) for view in encoder_layers(model))


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _budget(caller: str, **budgets) -> str:
    """The name of the one budget given."""
    given = {name: value for name, value in budgets.items() if value is not None}
    if len(given) != 1:
        got = ", ".join(f"{name}={value!r}" for name, value in given.items()) or "none"
        raise PruneError(f"{caller}: give exactly one budget of {', '.join(budgets)}; got {got}")
    return next(iter(given))


def _no_data(caller: str, batches, loss_fn) -> None:
    if batches is not None or loss_fn is not None:
        raise PruneError(f"{caller}: scores= replaces the calibration data; pass scores or batches (and "
                         f"loss_fn), not both")


def _finite_row(row, size: int, caller: str, what: str, expected: str) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(row, dtype=torch.float64).cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise PruneError(f"{caller}: {what} is not a tensor of numbers: {error}") from None
    if tensor.shape != (size,):
        raise PruneError(f"{caller}: {what} has shape {list(tensor.shape)}, {expected} (expected [{size}])")
    if not torch.isfinite(tensor).all():
        raise PruneError(f"{caller}: {what} holds non-finite values")
    return tensor


def _checked_layer_scores(scores, layers: int, caller: str) -> torch.Tensor:
    """``scores`` as a finite float64 tensor of one number per layer."""
    return _finite_row(scores, layers, caller, "scores", f"the encoder has {layers} layers")


def _checked_scores(scores, sizes: Sequence[int], caller: str, unit: str) -> list[torch.Tensor]:
    """``scores`` as one finite float64 1-D tensor per layer, of that layer's number of units."""
    if isinstance(scores, torch.Tensor) or not isinstance(scores, Sequence):
        raise PruneError(f"{caller}: scores must be a sequence of one 1-D tensor per layer, got "
                         f"{type(scores).__name__}")
    if len(scores) != len(sizes):
        raise PruneError(f"{caller}: scores has {len(scores)} entries, the encoder has {len(sizes)} layers")
    return [_finite_row(row, size, caller, f"scores[{layer}]", f"layer {layer} has {size} {UNITS[unit]}")
            for layer, (row, size) in enumerate(zip(scores, sizes))]


def _allowed_kept(sizes: Sequence[int], min_per_layer, multiple_of, caller: str, unit: str) -> list[list[int]]:
    """Per layer, the allowed kept counts, largest first (module docstring)."""
    if not _is_int(multiple_of) or multiple_of < 1:
        raise PruneError(f"{caller}: multiple_of must be a positive int, got {multiple_of!r}")
    fewest = min(sizes)
    if not _is_int(min_per_layer) or not 1 <= min_per_layer <= fewest:
        raise PruneError(f"{caller}: min_per_layer must be an int in 1..{fewest} (the fewest {UNITS[unit]} "
                         f"in a layer: layer {sizes.index(fewest)}), got {min_per_layer!r}")
    allowed = []
    for layer, size in enumerate(sizes):
        kept = [k for k in range(size, min_per_layer - 1, -1) if k % multiple_of == 0]
        if not kept:
            raise PruneError(f"{caller}: layer {layer} has {size} {UNITS[unit]}: no count in "
                             f"min_per_layer={min_per_layer}..{size} is a multiple of multiple_of={multiple_of}")
        allowed.append(kept)
    return allowed


def _check_seq_len(seq_len, caller: str) -> None:
    if not _is_int(seq_len) or seq_len < 1:
        raise PruneError(f"{caller}: seq_len must be a positive int, got {seq_len!r}")


def _count_from_fraction(fraction, total: int, reachable: Sequence[int], caller: str, unit: str,
                         limit: str) -> int:
    if not _is_real(fraction) or not 0 < fraction < 1:
        raise PruneError(f"{caller}: fraction must be a number in (0, 1), got {fraction!r}")
    target = fraction * total
    if target > reachable[-1]:
        raise PruneError(f"{caller}: fraction={fraction!r} asks for {target:g} of {total} {UNITS[unit]}, but at "
                         f"most {reachable[-1]} can be removed ({limit}), i.e. fraction <= "
                         f"{reachable[-1] / total:.4g}")
    return min(reachable, key=lambda count: (abs(count - target), -count))


def _check_count(count, reachable: Sequence[int], step: int, caller: str, unit: str, total: int,
                 limit: str) -> int:
    if not _is_int(count) or count < 0:
        raise PruneError(f"{caller}: count must be a non-negative int, got {count!r}")
    if not reachable[0] <= count <= reachable[-1]:
        raise PruneError(f"{caller}: count={count} is out of range: {reachable[0]}..{reachable[-1]} of the "
                         f"{total} {UNITS[unit]} can be removed ({limit})")
    if count not in reachable:
        raise PruneError(f"{caller}: count={count} is not reachable with multiple_of={step}: removable counts are "
                         f"{reachable[0]} + multiples of {step} (e.g. {max(c for c in reachable if c < count)} or "
                         f"{min(c for c in reachable if c > count)})")
    return count


def _target(budget: str, count, fraction, sizes: Sequence[int], allowed: list[list[int]], multiple_of: int,
            caller: str, unit: str, limit: str) -> int:
    """The number of units a count / fraction budget removes (checked)."""
    forced = sum(size - kept[0] for size, kept in zip(sizes, allowed))
    most = sum(size - kept[-1] for size, kept in zip(sizes, allowed))
    reachable = list(range(forced, most + 1, multiple_of))
    if budget == "fraction":
        return _count_from_fraction(fraction, sum(sizes), reachable, caller, unit, limit)
    return _check_count(count, reachable, multiple_of, caller, unit, sum(sizes), limit)


def _greedy(values: list[torch.Tensor], allowed: list[list[int]], sizes: Sequence[int], count: int) -> list[int]:
    """Kept count per layer removing ``count`` units at least total cost (module docstring): each layer
    starts at its largest allowed count, then the globally cheapest next steps are taken. ``values``:
    each layer's scores in ascending order; a step's cost is the sum of the scores it removes, which
    never falls from one step of a layer to the next (ties: lower layer, then earlier step)."""
    steps = sorted((values[l][sizes[l] - allowed[l][j]:sizes[l] - allowed[l][j + 1]].sum().item(), l, j)
                   for l in range(len(allowed)) for j in range(len(allowed[l]) - 1))
    position = [0] * len(allowed)  # index into allowed[l]
    removed = sum(size - kept[0] for size, kept in zip(sizes, allowed))
    for _, layer, _ in steps:
        if removed == count:
            break
        removed += allowed[layer][position[layer]] - allowed[layer][position[layer] + 1]
        position[layer] += 1
    return [kept[p] for kept, p in zip(allowed, position)]


def _check_limit(caller: str, name: str, limit) -> None:
    if not _is_real(limit) or not math.isfinite(limit) or limit <= 0:
        raise PruneError(f"{caller}: {name} must be a positive finite number, got {limit!r}")


def _check_reachable(caller: str, name: str, limit, options: list[list[float]], now: float,
                     what: Callable[[float], str], unit: str, source: str = "") -> None:
    """PruneError when ``limit`` is below the smallest total of ``options`` (every layer at its fewest
    allowed units); ``what`` renders a total, ``source`` says where the totals come from."""
    smallest = sum(min(row) for row in options)
    if limit < smallest:
        raise PruneError(f"{caller}: {name}={limit:,} is below the smallest feasible total {what(smallest)} "
                         f"(every layer at its fewest allowed {UNITS[unit]}); the encoder now takes "
                         f"{what(now)}{source}")


def _flops_options(views: list[LayerView], unit: _Unit, allowed: list[list[int]], max_flops, seq_len: int,
                   caller: str) -> list[list[int]]:
    """``layer_flops`` of each layer at each allowed kept count (checked against max_flops)."""
    _check_limit(caller, "max_flops", max_flops)
    flops = [[layer_flops(dataclasses.replace(view, **{unit.field: k}), seq_len) for k in kept]
             for view, kept in zip(views, allowed)]
    _check_reachable(caller, "max_flops", max_flops, flops, sum(layer_flops(v, seq_len) for v in views),
                     lambda total: f"{total:,} FLOPs at seq_len={seq_len}", unit.name)
    return flops


def _latency_options(views: list[LayerView], unit: _Unit, allowed: list[list[int]], max_latency_us,
                     latency: LatencyTable | None, caller: str) -> list[list[float]]:
    """The table's t_l(k) of each layer at each allowed kept count (checked against max_latency_us)."""
    _check_limit(caller, "max_latency_us", max_latency_us)
    if latency is None:
        raise PruneError(f"{caller}: a max_latency_us budget needs latency=, the LatencyTable of "
                         f"measure_layer_latency(model, {unit.name!r}, ...)")
    latency.check_matches(views, unit.name, caller)
    options = [[latency.latency_us(layer, k) for k in kept] for layer, kept in enumerate(allowed)]
    _check_reachable(caller, "max_latency_us", max_latency_us, options, latency.total_us(latency.sizes),
                     lambda total: f"{total:,.0f} us", unit.name, f", by the table of {latency.describe()}")
    return options


def _knapsack(values: list[torch.Tensor], allowed: list[list[int]], sizes: Sequence[int], *,
              flops: list[list[int]] | None = None, max_flops=None, latencies: list[list[float]] | None = None,
              max_latency_us=None) -> list[int]:
    """Kept count per layer at least total cost within max_flops or max_latency_us (module docstring), by
    ``solve_milp``."""
    costs = [[0.0, *torch.cumsum(v, 0).tolist()] for v in values]  # costs[l][r]: the r lowest scores
    problem = Problem(costs=[[costs[l][sizes[l] - k] for k in kept] for l, kept in enumerate(allowed)],
                      sizes=flops if flops is not None else [[0] * len(kept) for kept in allowed],
                      max_size=None if max_flops is None else math.floor(max_flops),
                      latencies=latencies, max_latency=max_latency_us)
    return [kept[c] for kept, c in zip(allowed, solve_milp(problem))]


def _scores(unit: str, caller: str, model: nn.Module, batches, loss_fn, scores, sizes: Sequence[int],
            importance: Callable, method: str, progress: bool) -> tuple[list[torch.Tensor], str]:
    """(checked or computed scores, the summary's method)."""
    if scores is not None:
        _no_data(caller, batches, loss_fn)
        return _checked_scores(scores, sizes, caller, unit), GIVEN
    data = calibration_batches(batches, caller)
    return importance(model, data, loss_fn, method=method, progress=progress), method


def _prune_units(unit: _Unit, caller: str, model: nn.Module, batches, loss_fn, *, count, fraction, max_flops,
                 max_latency_us, latency: LatencyTable | None, seq_len: int, method: str, scores, min_per_layer,
                 multiple_of, progress: bool) -> PruneSummary:
    budget = _budget(caller, count=count, fraction=fraction, max_flops=max_flops, max_latency_us=max_latency_us)
    if latency is not None and budget != "max_latency_us":
        raise PruneError(f"{caller}: latency= is used only by a max_latency_us budget (the budget given is "
                         f"{budget})")
    check_method(method, caller)
    _check_seq_len(seq_len, caller)
    views = encoder_layers(model)
    require_plain(views, caller)
    flops_before, parameters_before = _flops(model, seq_len), _parameters(model)
    sizes = [unit.size(view) for view in views]
    allowed = _allowed_kept(sizes, min_per_layer, multiple_of, caller, unit.name)
    if budget == "max_flops":
        flops = _flops_options(views, unit, allowed, max_flops, seq_len, caller)
    elif budget == "max_latency_us":
        latencies = _latency_options(views, unit, allowed, max_latency_us, latency, caller)
    else:
        limit = f"every layer keeps at least min_per_layer={min_per_layer}" + (
            f" and a multiple of multiple_of={multiple_of}" if multiple_of > 1 else "")
        target = _target(budget, count, fraction, sizes, allowed, multiple_of, caller, unit.name, limit)
    scores, method = _scores(unit.name, caller, model, batches, loss_fn, scores, sizes, unit.importance, method,
                             progress)
    values, orders = zip(*(torch.sort(s, stable=True) for s in scores))
    if budget == "max_flops":
        kept = _knapsack(list(values), allowed, sizes, flops=flops, max_flops=max_flops)
    elif budget == "max_latency_us":
        kept = _knapsack(list(values), allowed, sizes, latencies=latencies, max_latency_us=max_latency_us)
    else:
        kept = _greedy(list(values), allowed, sizes, target)
    removed = {layer: sorted(orders[layer][:size - k].tolist())
               for layer, (size, k) in enumerate(zip(sizes, kept)) if k < size}
    if removed:  # nothing to remove (count 0, or a FLOP limit already met): the model stays untouched
        unit.remove(model, removed)
    timing = {} if latency is None else {"latency_us_before": latency.total_us(sizes),
                                         "latency_us_after": latency.total_us(kept), "latency": latency.describe()}
    return PruneSummary(unit.name, method, removed, parameters_before, _parameters(model), flops_before,
                        _flops(model, seq_len), seq_len, **timing)


def prune_heads(model: nn.Module, batches: Iterable[Batch] | None = None, loss_fn: LossFn | None = None, *,
                count: int | None = None, fraction: float | None = None, max_flops: float | None = None,
                max_latency_us: float | None = None, latency: LatencyTable | None = None,
                seq_len: int = DEFAULT_SEQ_LEN, method: str = TAYLOR, scores: Sequence | None = None,
                min_per_layer: int = 1, progress: bool = True) -> PruneSummary:
    """Score the attention heads, choose under one budget and remove them physically, in place.

    Budgets (exactly one; module docstring): ``count`` heads in all, a ``fraction`` of all heads,
    ``max_flops`` for the encoder at ``seq_len`` tokens, or ``max_latency_us`` for the encoder layers by
    the ``latency`` table (``measure_layer_latency(model, "head", ...)`` on the model as it is now). Every layer keeps at least ``min_per_layer``
    heads. scores: one tensor of length ``heads`` per layer (``head_importance``'s result); without it
    the heads are scored by ``method`` on ``batches`` with ``loss_fn`` (default: the model's ``.loss``).
    Prune the float model, before ``quantize`` / ``prepare_qat``. Bad budgets, scores or data:
    PruneError naming the budget and its feasible range."""
    return _prune_units(HEADS, "prune_heads", model, batches, loss_fn, count=count, fraction=fraction,
                        max_flops=max_flops, max_latency_us=max_latency_us, latency=latency, seq_len=seq_len, method=method, scores=scores,
                        min_per_layer=min_per_layer, multiple_of=1, progress=progress)


def prune_ffn(model: nn.Module, batches: Iterable[Batch] | None = None, loss_fn: LossFn | None = None, *,
              count: int | None = None, fraction: float | None = None, max_flops: float | None = None,
              max_latency_us: float | None = None, latency: LatencyTable | None = None,
              seq_len: int = DEFAULT_SEQ_LEN, method: str = TAYLOR, scores: Sequence | None = None,
              min_per_layer: int = 1, multiple_of: int = 1, progress: bool = True) -> PruneSummary:
    """Score the FFN intermediate neurons, choose under one budget and remove them physically, in place.

    As ``prune_heads`` (``count`` / ``fraction`` of all neurons, ``max_flops``, ``max_latency_us`` with a
    ``measure_layer_latency(model, "neuron", ...)`` table), with scores of length
    ``intermediate`` per layer (``neuron_importance``), and every layer's kept count a multiple of
    ``multiple_of`` (e.g. a GEMM tile width) and at least ``min_per_layer``; with multiple_of > 1 only
    some counts are reachable (the error names them)."""
    return _prune_units(NEURONS, "prune_ffn", model, batches, loss_fn, count=count, fraction=fraction,
                        max_flops=max_flops, max_latency_us=max_latency_us, latency=latency, seq_len=seq_len, method=method, scores=scores,
                        min_per_layer=min_per_layer, multiple_of=multiple_of, progress=progress)


def prune_layers(model: nn.Module, batches: Iterable[Batch] | None = None, loss_fn: LossFn | None = None, *,
                 count: int | None = None, fraction: float | None = None, seq_len: int = DEFAULT_SEQ_LEN,
                 method: str = TAYLOR, scores: Sequence | torch.Tensor | None = None,
                 progress: bool = True) -> PruneSummary:
    """Remove the ``count`` (or the ``fraction``, rounded to the nearest count, ties upward) lowest-scoring
    encoder layers (LayerDrop-style; ties: lower index first), in place; at least one layer stays.

    scores: one number per layer (``layer_importance``'s result); without it the layers are scored by
    ``method`` on ``batches``. FLOPs in the summary are counted at ``seq_len``."""
    caller = "prune_layers"
    budget = _budget(caller, count=count, fraction=fraction)
    check_method(method, caller)
    _check_seq_len(seq_len, caller)
    views = encoder_layers(model)
    require_plain(views, caller)
    flops_before, parameters_before = _flops(model, seq_len), _parameters(model)
    # The encoder as one group of layer units, of which at least one stays.
    target = _target(budget, count, fraction, [len(views)], [list(range(len(views), 0, -1))], 1, caller,
                     "layer", "at least one layer stays")
    if scores is not None:
        _no_data(caller, batches, loss_fn)
        scores = _checked_layer_scores(scores, len(views), caller)
        method = GIVEN
    else:
        scores = layer_importance(model, calibration_batches(batches, caller), loss_fn, method=method,
                                  progress=progress)
    removed = sorted(torch.sort(scores, stable=True).indices[:target].tolist())
    if removed:
        remove_layers(model, removed)
    return PruneSummary("layer", method, removed, parameters_before, _parameters(model), flops_before,
                        _flops(model, seq_len), seq_len)


__all__ = ["PruneSummary", "prune_ffn", "prune_heads", "prune_layers"]
