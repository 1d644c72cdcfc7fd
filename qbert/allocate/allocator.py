"""``allocate``: per-layer formats from sensitivities, under a size / latency budget or by Q-BERT's rank rule.

Exact methods (``"milp"``, ``"dp"``; ``qbert.allocate.solvers``) minimise the summed sensitivity

    sum_i Omega_i(b_i)   subject to   sum_i bytes_i(b_i) <= budget bytes   (and sum_i t_i(b_i) <= latency)

over one candidate format b_i per layer, layers in one tie group sharing b (their Omega, bytes and
latency add up). ``"rank"`` is Q-BERT's rule for two candidate widths: groups sorted by a scalar score,
the more sensitive half of the layers gets the higher width; ``"reverse"`` gives it to the less sensitive
half (an ablation). The rank rules take no budget: the plan reports the size they realise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from torch import nn

from qbert.allocate.budget import BITS_PER_BYTE, MB, Budget
from qbert.allocate.layers import layer_bytes, linear_layers, weights_of
from qbert.allocate.solvers import SOLVERS, AllocationError, Problem
from qbert.nn.formats import LinearFormat
from qbert.nn.plan import Plan

METHODS = (*SOLVERS, "rank", "reverse")
RANK_METHODS = ("rank", "reverse")
Sensitivity = Mapping[str, Mapping[LinearFormat, float]]


def _groups(names: list[str], layers: dict[str, nn.Linear], sensitivity: Sensitivity,
            ties: Sequence[Sequence[str]]) -> list[list[str]]:
    """Tie groups plus singletons, ordered by their first module in ``names``; checks every tie."""
    group_of: dict[str, int] = {}
    for i, tie in enumerate(ties):
        if isinstance(tie, str) or len(tie) < 2:
            raise AllocationError(f"ties: each tie is a list of at least two module names, got {tie!r}")
        for name in tie:
            if name not in sensitivity:
                raise AllocationError(f"ties: {name!r} has no sensitivity (it is not one of the allocated layers)")
            if name in group_of:
                raise AllocationError(f"ties: {name!r} appears in two ties ({ties[group_of[name]]} and {tie})")
            group_of[name] = i
        first = layers[tie[0]]
        for name in tie[1:]:
            layer = layers[name]
            if (layer.out_features, layer.in_features) != (first.out_features, first.in_features):
                raise AllocationError(f"ties: {tie[0]!r} [{first.out_features}, {first.in_features}] and "
                                      f"{name!r} [{layer.out_features}, {layer.in_features}] have different shapes; "
                                      f"a tie joins layers of one shape")
            if list(sensitivity[name]) != list(sensitivity[tie[0]]):
                raise AllocationError(f"ties: {tie[0]!r} and {name!r} have different candidate formats")
    groups: list[list[str]] = []
    placed: set[int] = set()
    for name in names:
        if name not in group_of:
            groups.append([name])
        elif group_of[name] not in placed:
            placed.add(group_of[name])
            groups.append(list(ties[group_of[name]]))
    return groups


def _check_tables(sensitivity: Sensitivity, latency: Mapping[str, Mapping[LinearFormat, float]] | None) -> None:
    for name, options in sensitivity.items():
        if not options or not all(isinstance(f, LinearFormat) for f in options):
            raise AllocationError(f"sensitivity[{name!r}] must map candidate LinearFormats to Omega, got {options!r}")
        missing = [f.describe() for f in options if latency is not None and f not in latency.get(name, {})]
        if missing:
            raise AllocationError(f"latency has no entry for {name!r} in {missing}")


def _rank_choice(groups: list[list[str]], sensitivity: Sensitivity, scores: Mapping[str, float] | None,
                 method: str) -> tuple[list[int], dict[str, float]]:
    """Q-BERT's rule: indices of the chosen formats per group, and the score of each module."""
    options = list(sensitivity[groups[0][0]])
    if len(options) != 2 or options[0].weight_bits == options[1].weight_bits:
        raise AllocationError(f"method {method!r} picks between two widths: give exactly two candidate formats "
                              f"of different weight bits, got {[f.describe() for f in options]}")
    for name, fmts in sensitivity.items():
        if set(fmts) != set(options):
            raise AllocationError(f"method {method!r}: {name!r} has candidates {[f.describe() for f in fmts]}, "
                                  f"others {[f.describe() for f in options]}; every layer needs the same two")
    low, high = sorted(options, key=lambda f: f.weight_bits)
    if scores is None:
        scores = {name: fmts[low] - fmts[high] for name, fmts in sensitivity.items()}
    missing = [name for name in sensitivity if name not in scores]
    if missing:
        raise AllocationError(f"scores has no entry for {missing}")
    group_score = [math.fsum(scores[n] for n in group) / len(group) for group in groups]
    order = sorted(range(len(groups)), key=lambda g: group_score[g], reverse=method == "rank")
    half, promoted = len(sensitivity) // 2, 0
    chosen = [low] * len(groups)
    for g in order:
        if promoted + len(groups[g]) > half:
            break
        chosen[g] = high
        promoted += len(groups[g])
    return ([list(sensitivity[group[0]]).index(f) for group, f in zip(groups, chosen)],
            {name: scores[name] for name in sensitivity})


def allocate(model: nn.Module, sensitivity: Sensitivity, budget: Budget | None, *,
             ties: Sequence[Sequence[str]] = (), latency: Mapping[str, Mapping[LinearFormat, float]] | None = None,
             method: str = "milp", scores: Mapping[str, float] | None = None) -> Plan:
    """A ``Plan`` giving each layer of ``sensitivity`` one of its candidate formats (module docstring).

    sensitivity: ``{module name: {candidate LinearFormat: Omega}}`` (``qbert.hessian.hawq_sensitivity``,
        ``eigen_sensitivity``); its names are the allocated layers (``nn.Linear`` of ``model``).
    budget: the size (bits per weight over the allocated layers, or MB) and optional latency limit;
        required by ``"milp"`` / ``"dp"``, and None for ``"rank"`` / ``"reverse"``.
    ties: groups of module names that get one format (e.g. ``default_ties(model)``: Q, K, V); a tie joins
        layers of one shape with the same candidates.
    latency: ``{name: {format: microseconds}}`` (``measure_latency``); needed for ``budget.latency_us``,
        otherwise only reported in ``plan.meta``.
    method: ``"milp"`` (HiGHS), ``"dp"`` (exact dynamic program, size budgets only), ``"rank"``, ``"reverse"``.
    scores: the scalar per layer the rank rules sort by (e.g. ``qbert_sensitivity``'s Omega); default
        Omega_i(low) - Omega_i(high), what the higher width saves. A group's score is its members' mean.

    ``plan.meta`` records method, budget, budget bytes, realised bytes / MB / bits per weight, objective
    (sum of Omega), latency (when given), ties and the sensitivity table (by ``LinearFormat.describe()``).
    """
    if method not in METHODS:
        raise AllocationError(f"unknown allocation method {method!r}; known: {', '.join(METHODS)}")
    if (budget is None) != (method in RANK_METHODS):
        raise AllocationError(f"method {method!r} " + ("takes no budget (its rule fixes the size; pass budget=None)"
                                                       if method in RANK_METHODS else "needs a Budget"))
    if not sensitivity:
        raise AllocationError("sensitivity is empty: no layers to allocate")
    if budget is not None and budget.latency_us is not None and latency is None:
        raise AllocationError("the budget bounds latency but no latency table was given")
    names = list(sensitivity)
    try:
        layers = linear_layers(model, names)
    except ValueError as exc:
        raise AllocationError(f"sensitivity: {exc}") from exc
    _check_tables(sensitivity, latency)
    groups = _groups(names, layers, sensitivity, ties)
    weights = weights_of(layers)
    options = [list(sensitivity[group[0]]) for group in groups]
    problem = Problem(
        costs=[[math.fsum(sensitivity[n][f] for n in group) for f in opts] for group, opts in zip(groups, options)],
        sizes=[[sum(layer_bytes(layers[n], f) for n in group) for f in opts] for group, opts in zip(groups, options)],
        max_size=None if budget is None else budget.max_bytes(weights),
        latencies=None if latency is None else [[math.fsum(latency[n][f] for n in group) for f in opts]
                                                for group, opts in zip(groups, options)],
        max_latency=None if budget is None else budget.latency_us,
        describe_size=lambda n: f"{n} bytes ({n / MB:g} MB, {BITS_PER_BYTE * n / weights:.4g} bits/weight)")
    meta: dict = {"method": method}
    if method in RANK_METHODS:
        choice, used_scores = _rank_choice(groups, sensitivity, scores, method)
        meta["scores"] = used_scores
    else:
        choice = SOLVERS[method](problem)
    objective, size, total_latency = problem.totals(choice)
    meta |= {"budget": None if budget is None else budget.describe(),
             "budget_bytes": problem.max_size, "weights": weights, "bytes": size, "megabytes": size / MB,
             "bits_per_weight": BITS_PER_BYTE * size / weights, "objective": objective}
    if total_latency is not None:
        meta["latency_us"] = total_latency
    meta["ties"] = [list(group) for group in groups if len(group) > 1]
    meta["sensitivity"] = {n: {f.describe(): v for f, v in fmts.items()} for n, fmts in sensitivity.items()}
    chosen = {n: options[g][c] for g, (group, c) in enumerate(zip(groups, choice)) for n in group}
    return Plan({n: chosen[n] for n in names}, meta)
