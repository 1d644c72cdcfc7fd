"""Bit allocation: which format each linear layer gets, as a ``qbert.Plan`` (``qbert.nn.plan``)."""

from qbert.allocate.allocator import METHODS, allocate
from qbert.allocate.budget import MB, Budget, parse_budget
from qbert.allocate.latency import measure_latency
from qbert.allocate.layers import default_ties, linear_layers, quantizable_modules, uniform_size
from qbert.allocate.solvers import (
    AllocationError,
    InfeasibleBudget,
    Problem,
    solve_brute_force,
    solve_dp,
    solve_milp,
)

__all__ = ["MB", "METHODS", "AllocationError", "Budget", "InfeasibleBudget", "Problem", "allocate", "default_ties",
           "linear_layers", "measure_latency", "parse_budget", "quantizable_modules", "solve_brute_force", "solve_dp",
           "solve_milp", "uniform_size"]
