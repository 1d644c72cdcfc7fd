"""Exact solvers for the multiple-choice knapsack behind bit allocation.

Groups g = 1..G (a layer, or layers tied to one format) each pick one option c(g) (a format):

    minimise   sum_g cost[g][c(g)]
    subject to sum_g size[g][c(g)] <= max_size           (bytes, integers)
               sum_g latency[g][c(g)] <= max_latency     (optional)

``solve_milp``: the 0/1 integer program x[g, c] in {0, 1}, sum_c x[g, c] = 1, solved by HiGHS
(``scipy.optimize.milp``) with a relative gap of 0. HiGHS also stops at an absolute gap of 1e-6, so the
costs are shifted (each group's cheapest option to 0) and scaled (largest shifted cost to 1) first: the
choice is optimal up to 1e-6 of the largest per-group cost range.
``solve_dp``: exact dynamic programming over the groups on the Pareto frontier of (size, cost) partial
choices (a partial choice survives only if every smaller one costs more); size budgets only.
``solve_brute_force``: enumerates every choice; for tests on small instances.

Every solver returns the chosen option index per group; a budget below the smallest achievable total is
an ``InfeasibleBudget`` naming that total.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

MAX_BRUTE_FORCE_CHOICES = 10**6
_MILP_OPTIMAL = 0
_MILP_INFEASIBLE = 2


class AllocationError(ValueError):
    """An allocation problem is malformed or cannot be solved; the message names the constraint."""


class InfeasibleBudget(AllocationError):
    """No choice meets the budget; the message gives the smallest achievable size / latency."""


def _bytes(n: int) -> str:
    return f"{n} bytes"


@dataclass(frozen=True)
class Problem:
    """costs[g][c], sizes[g][c] (bytes), latencies[g][c] (or None) of option c of group g, and the limits
    (``max_size`` None: no size limit; ``max_latency`` needs ``latencies``). ``describe_size`` renders a
    byte count in error messages (e.g. with bits per weight)."""

    costs: Sequence[Sequence[float]]
    sizes: Sequence[Sequence[int]]
    max_size: int | None
    latencies: Sequence[Sequence[float]] | None = None
    max_latency: float | None = None
    describe_size: Callable[[int], str] = field(default=_bytes, compare=False)

    def __post_init__(self) -> None:
        if not self.costs:
            raise AllocationError("Problem: no groups to allocate")
        tables = {"sizes": self.sizes} | ({} if self.latencies is None else {"latencies": self.latencies})
        for name, table in tables.items():
            if len(table) != len(self.costs) or any(len(t) != len(c) for t, c in zip(table, self.costs)):
                raise AllocationError(f"Problem: {name} must have the shape of costs (groups x options)")
        if any(not c for c in self.costs):
            raise AllocationError("Problem: every group needs at least one option")
        if any(not all(math.isfinite(x) for x in c) for c in self.costs):
            raise AllocationError("Problem: costs must be finite")
        if any(not isinstance(s, (int, np.integer)) or s < 0 for row in self.sizes for s in row):
            raise AllocationError("Problem: sizes must be non-negative integers (bytes)")
        if self.max_latency is not None and self.latencies is None:
            raise AllocationError("Problem: a latency limit needs the latency of every option")

    def totals(self, choice: Sequence[int]) -> tuple[float, int, float | None]:
        """(cost, size, latency or None) of one option per group, summed in group order."""
        cost = sum(self.costs[g][c] for g, c in enumerate(choice))
        size = sum(self.sizes[g][c] for g, c in enumerate(choice))
        latency = None if self.latencies is None else sum(self.latencies[g][c] for g, c in enumerate(choice))
        return cost, size, latency

    def fits(self, choice: Sequence[int]) -> bool:
        _, size, latency = self.totals(choice)
        return ((self.max_size is None or size <= self.max_size)
                and (self.max_latency is None or latency <= self.max_latency))

    def check_feasible(self) -> None:
        """Raise ``InfeasibleBudget`` when a limit is below its smallest achievable total."""
        smallest = sum(min(s) for s in self.sizes)
        if self.max_size is not None and smallest > self.max_size:
            raise InfeasibleBudget(f"the size budget {self.describe_size(self.max_size)} is below the smallest "
                                   f"achievable size {self.describe_size(smallest)} (every layer at its "
                                   f"smallest candidate format)")
        if self.max_latency is not None:
            fastest = sum(min(t) for t in self.latencies)
            if fastest > self.max_latency:
                raise InfeasibleBudget(f"the latency budget {self.max_latency:g} us is below the smallest "
                                       f"achievable latency {fastest:g} us (every layer at its fastest format)")


def _check_result(problem: Problem, choice: list[int], solver: str) -> list[int]:
    if not problem.fits(choice):
        _, size, latency = problem.totals(choice)
        raise AllocationError(f"{solver}: the returned choice ({size} bytes, latency {latency}) breaks the budget "
                              f"({problem.max_size} bytes, latency {problem.max_latency}); numerical trouble")
    return choice


def solve_milp(problem: Problem) -> list[int]:
    """Optimal choice by HiGHS' branch and bound (module docstring)."""
    problem.check_feasible()
    offsets = list(itertools.accumulate((len(c) for c in problem.costs), initial=0))
    shifted = np.concatenate([np.asarray(c, dtype=np.float64) - min(c) for c in problem.costs])
    scale = shifted.max() if shifted.max() > 0 else 1.0
    n = offsets[-1]
    one_per_group = np.zeros((len(problem.costs), n))
    for g in range(len(problem.costs)):
        one_per_group[g, offsets[g]:offsets[g + 1]] = 1
    constraints = [LinearConstraint(one_per_group, 1, 1)]
    if problem.max_size is not None:
        constraints.append(LinearConstraint(np.concatenate([np.asarray(s, dtype=np.float64) for s in problem.sizes]),
                                            -np.inf, problem.max_size))
    if problem.max_latency is not None:
        constraints.append(LinearConstraint(np.concatenate([np.asarray(t, dtype=np.float64)
                                                            for t in problem.latencies]),
                                            -np.inf, problem.max_latency))
    result = milp(shifted / scale, integrality=np.ones(n), bounds=Bounds(0, 1), constraints=constraints,
                  options={"mip_rel_gap": 0})
    if result.status == _MILP_INFEASIBLE:
        raise InfeasibleBudget("no choice of formats meets the size and the latency budget together (each alone "
                               "is achievable)")
    if result.status != _MILP_OPTIMAL:
        raise AllocationError(f"HiGHS (scipy.optimize.milp) did not solve the allocation: {result.message}")
    choice = [int(np.argmax(result.x[offsets[g]:offsets[g + 1]])) for g in range(len(problem.costs))]
    return _check_result(problem, choice, "milp")


def solve_dp(problem: Problem) -> list[int]:
    """Optimal choice by dynamic programming on the (size, cost) Pareto frontier (module docstring)."""
    if problem.max_latency is not None:
        raise AllocationError("the 'dp' solver handles a size budget only; use 'milp' for a latency budget")
    problem.check_feasible()
    # A state: (size, cost, index of its parent state in the previous frontier, option taken).
    frontier: list[tuple[int, float, int, int]] = [(0, 0.0, -1, -1)]
    stages = []
    for costs, sizes in zip(problem.costs, problem.sizes):
        candidates = [(size + sizes[c], cost + costs[c], parent, c)
                      for parent, (size, cost, _, _) in enumerate(frontier) for c in range(len(costs))
                      if problem.max_size is None or size + sizes[c] <= problem.max_size]
        candidates.sort(key=lambda state: (state[0], state[1]))
        frontier = []
        for state in candidates:
            if not frontier or state[1] < frontier[-1][1]:
                frontier.append(state)
        stages.append(frontier)
    choice = []
    index = len(stages[-1]) - 1  # the frontier's costs fall as sizes grow: the last state is the cheapest
    for stage in reversed(stages):
        _, _, index, option = stage[index]
        choice.append(option)
    return _check_result(problem, choice[::-1], "dp")


def solve_brute_force(problem: Problem) -> list[int]:
    """Optimal choice by enumeration (the first of equal-cost choices in lexicographic order); for tests."""
    count = math.prod(len(c) for c in problem.costs)
    if count > MAX_BRUTE_FORCE_CHOICES:
        raise AllocationError(f"brute force: {count} choices exceed MAX_BRUTE_FORCE_CHOICES="
                              f"{MAX_BRUTE_FORCE_CHOICES}; use 'milp' or 'dp'")
    problem.check_feasible()
    best, best_cost = None, math.inf
    for choice in itertools.product(*(range(len(c)) for c in problem.costs)):
        cost = problem.totals(choice)[0]
        if cost < best_cost and problem.fits(choice):
            best, best_cost = list(choice), cost
    if best is None:
        raise InfeasibleBudget("no choice of formats meets the size and the latency budget together (each alone "
                               "is achievable)")
    return best


SOLVERS: dict[str, Callable[[Problem], list[int]]] = {"milp": solve_milp, "dp": solve_dp}
