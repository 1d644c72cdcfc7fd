"""The exact solvers against brute force on small random instances, budgets and their errors."""

from __future__ import annotations

import random

import pytest

from qbert.allocate import (
    MB,
    AllocationError,
    Budget,
    InfeasibleBudget,
    Problem,
    parse_budget,
    solve_brute_force,
    solve_dp,
    solve_milp,
)
from qbert.allocate.budget import whole_bytes

INSTANCES = 40


def _random_problem(seed: int, latency: bool = False) -> Problem:
    rng = random.Random(seed)
    groups = rng.randint(1, 6)
    options = [rng.randint(1, 4) for _ in range(groups)]
    sizes = [[rng.randint(1, 50) for _ in range(k)] for k in options]
    costs = [[rng.uniform(-1.0, 10.0) for _ in range(k)] for k in options]
    smallest, largest = sum(map(min, sizes)), sum(map(max, sizes))
    latencies = [[rng.uniform(0.5, 5.0) for _ in range(k)] for k in options] if latency else None
    max_latency = None
    if latency:
        fastest, slowest = sum(map(min, latencies)), sum(map(max, latencies))
        max_latency = rng.uniform(fastest, slowest)
    return Problem(costs, sizes, rng.randint(smallest, largest), latencies, max_latency)


def _solve_or_infeasible(solver, problem):
    try:
        return solver(problem)
    except InfeasibleBudget:
        return "infeasible"


@pytest.mark.parametrize("solver", [solve_milp, solve_dp], ids=["milp", "dp"])
def test_size_budget_choice_equals_brute_force(solver):
    for seed in range(INSTANCES):
        problem = _random_problem(seed)
        expected = solve_brute_force(problem)
        assert solver(problem) == expected, seed
        assert problem.totals(expected)[1] <= problem.max_size


def test_milp_with_a_latency_budget_equals_brute_force():
    outcomes = set()
    for seed in range(INSTANCES):
        problem = _random_problem(seed, latency=True)
        expected = _solve_or_infeasible(solve_brute_force, problem)
        assert _solve_or_infeasible(solve_milp, problem) == expected, seed
        outcomes.add(expected == "infeasible")
    assert outcomes == {True, False}  # both kinds of instance were met


def test_no_size_limit_takes_the_cheapest_option_per_group():
    problem = Problem([[3.0, 1.0], [0.5, 2.0]], [[1, 9], [1, 9]], max_size=None)
    assert solve_milp(problem) == solve_dp(problem) == [1, 0]


@pytest.mark.parametrize("solver", [solve_milp, solve_dp, solve_brute_force], ids=["milp", "dp", "brute"])
def test_an_infeasible_size_names_the_smallest_achievable(solver):
    problem = Problem([[1.0, 2.0], [1.0, 2.0]], [[4, 2], [4, 3]], max_size=4)
    with pytest.raises(InfeasibleBudget, match="size budget 4 bytes is below the smallest achievable size 5 bytes"):
        solver(problem)


def test_infeasible_latency_and_joint_infeasibility():
    problem = Problem([[1.0, 2.0]], [[1, 2]], max_size=2, latencies=[[3.0, 2.0]], max_latency=1.0)
    with pytest.raises(InfeasibleBudget, match="smallest achievable latency 2 us"):
        solve_milp(problem)
    # Size allows only option 0, latency only option 1.
    problem = Problem([[1.0, 2.0]], [[1, 2]], max_size=1, latencies=[[3.0, 2.0]], max_latency=2.0)
    with pytest.raises(InfeasibleBudget, match="size and the latency budget together"):
        solve_milp(problem)
    with pytest.raises(AllocationError, match="'dp' solver handles a size budget only"):
        solve_dp(problem)


@pytest.mark.parametrize("kwargs,match", [
    ({"costs": []}, "no groups"),
    ({"sizes": [[1]]}, "sizes must have the shape of costs"),
    ({"costs": [[1.0, float("nan")]]}, "costs must be finite"),
    ({"sizes": [[1, -2]]}, "non-negative integers"),
    ({"max_latency": 3.0}, "needs the latency of every option"),
], ids=["empty", "shape", "nan", "negative", "latency"])
def test_malformed_problems(kwargs, match):
    args = {"costs": [[1.0, 2.0]], "sizes": [[1, 2]], "max_size": 2} | kwargs
    with pytest.raises(AllocationError, match=match):
        Problem(**args)


def test_brute_force_refuses_huge_instances():
    problem = Problem([[0.0] * 10] * 7, [[1] * 10] * 7, max_size=None)
    with pytest.raises(AllocationError, match="10000000 choices exceed"):
        solve_brute_force(problem)


@pytest.mark.parametrize("text,budget", [
    ("3bits", Budget(bits_per_weight=3.0)), ("2.5bits", Budget(bits_per_weight=2.5)), (".5bits", Budget(0.5)),
    ("40MB", Budget(megabytes=40.0)), (" 12.25 MB ", Budget(megabytes=12.25)),
])
def test_parse_budget(text, budget):
    assert parse_budget(text) == budget


@pytest.mark.parametrize("text", ["3", "3 bytes", "40mb", "-2bits", "0bits", "MB", "3bitsx", ""])
def test_bad_budget_strings(text):
    with pytest.raises(ValueError, match="bad budget .*followed by 'bits'"):
        parse_budget(text)


def test_budget_bytes():
    assert Budget(bits_per_weight=3).max_bytes(1000) == 375
    assert Budget(bits_per_weight=3).max_bytes(1001) == 375  # 375.375 rounds down
    assert Budget(megabytes=40).max_bytes(1) == 40 * MB
    assert Budget(megabytes=1234567 / MB).max_bytes(1) == 1234567  # an exact size survives the division
    assert whole_bytes(10.999999) == 10
    assert Budget(bits_per_weight=3, latency_us=5).describe() == "3 bits/weight, 5 us"
    assert Budget(megabytes=40).describe() == "40 MB"


@pytest.mark.parametrize("kwargs,match", [
    ({}, "exactly one of bits_per_weight or megabytes"),
    ({"bits_per_weight": 3, "megabytes": 1}, "exactly one"),
    ({"bits_per_weight": -1}, "bits_per_weight must be a positive number"),
    ({"megabytes": 1, "latency_us": 0}, "latency_us must be a positive number"),
])
def test_bad_budgets(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Budget(**kwargs)
