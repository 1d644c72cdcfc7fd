"""Bit allocation: which format each linear layer gets, and the Plan file that records the choice."""

from qbert.allocate.plan import PLAN_FORMAT, PLAN_VERSION, Plan, PlanError

__all__ = ["PLAN_FORMAT", "PLAN_VERSION", "Plan", "PlanError"]
