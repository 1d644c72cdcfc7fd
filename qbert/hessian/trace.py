"""Trace of each module's Hessian block by Hutchinson's estimator (HAWQ-V2).

With Rademacher probes z (entries +-1, independent, seeded), E[z^T H_i z] = Tr(H_i). After p probes the
estimate is the sample mean of t_j = z_j^T H_i z_j and its standard error is s / sqrt(p), s the sample
standard deviation (ddof = 1). For a symmetric H the single-probe variance is 2 (||H||_F^2 - sum_k H_kk^2).

``joint=True`` draws one probe over all modules and does one double backward per batch: block i then gets
z_i^T sum_j H_ij z_j, still unbiased (E[z_i^T H_ij z_j] = 0 for i != j) but with the cross-blocks adding
variance; the default (``joint=False``) applies each block on its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import nn
from tqdm.auto import tqdm

from qbert.hessian.hvp import Batch, BlockHVP, LossFn, flat_dot, hessian_mode, module_weights

MIN_PROBES = 2  # a standard error needs two samples


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson samples t_j = z_j^T H z_j of one block; ``mean`` estimates Tr(H), ``stderr`` its error."""

    samples: tuple[float, ...]

    @property
    def probes(self) -> int:
        return len(self.samples)

    @property
    def mean(self) -> float:
        return math.fsum(self.samples) / self.probes

    @property
    def stderr(self) -> float:
        """s / sqrt(p), s the sample standard deviation (ddof = 1)."""
        return _stderr(self.samples)

    @property
    def history(self) -> tuple[float, ...]:
        """The running estimate after 1, 2, ..., p probes."""
        return tuple(total / (j + 1) for j, total in enumerate(accumulate(self.samples)))

    @property
    def stderr_history(self) -> tuple[float, ...]:
        """The running standard error after 2, ..., p probes."""
        return tuple(_stderr(self.samples[:j]) for j in range(MIN_PROBES, self.probes + 1))


def _stderr(samples: Sequence[float]) -> float:
    p = len(samples)
    mean = math.fsum(samples) / p
    return math.sqrt(math.fsum((t - mean) ** 2 for t in samples) / (p - 1) / p)


def rademacher(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A probe of +-1 entries shaped like ``weight`` (float32, on its device), drawn on the CPU from
    ``generator`` so that the probes do not depend on the device (every Hutchinson estimate in qbert)."""
    bits = torch.randint(0, 2, weight.shape, generator=generator, dtype=torch.int8)
    return (2 * bits - 1).float().to(weight.device)


def hutchinson_traces(model: nn.Module, module_names: Sequence[str], batches: Iterable[Batch], loss_fn: LossFn, *,
                      probes: int = 100, rel_tol: float | None = None, joint: bool = False, seed: int = 0,
                      progress: bool = True) -> dict[str, TraceEstimate]:
    """``{name: TraceEstimate}`` of Tr(H_i) for each module's weight block (module docstring).

    batches / loss_fn: as in ``top_eigenvalues`` (the loss is the mean over the batches).
    probes: probes per module at most (>= 2). rel_tol: stop a module early once stderr <= rel_tol * |mean|
        (checked from ``MIN_PROBES`` probes on); None runs every probe. seed: the probes (one generator,
        drawn in ``module_names`` order at each step), so a call is reproducible.
    joint: one double backward per probe for all modules (cheaper, noisier; module docstring).
    """
    if probes < MIN_PROBES or (rel_tol is not None and rel_tol <= 0):
        raise ValueError(f"hutchinson_traces: need probes >= {MIN_PROBES} and rel_tol > 0 (or None), "
                         f"got probes={probes}, rel_tol={rel_tol}")
    weights = module_weights(model, module_names)
    generator = torch.Generator().manual_seed(seed)
    samples: dict[str, list[float]] = {name: [] for name in weights}
    active = list(weights)
    with hessian_mode(model, weights.values()):
        products = BlockHVP(model, weights, batches, loss_fn, joint=joint)
        bar = tqdm(range(probes), desc="hutchinson", unit="probe", disable=not progress)
        for _ in bar:
            z = {name: rademacher(weights[name], generator) for name in active}
            for name, hv in products(z).items():
                samples[name].append(flat_dot(z[name], hv))
            if rel_tol is not None:
                active = [n for n in active if len(samples[n]) < MIN_PROBES
                          or _stderr(samples[n]) > rel_tol * abs(math.fsum(samples[n]) / len(samples[n]))]
            bar.set_postfix(done=f"{len(weights) - len(active)}/{len(weights)}")
            if not active:
                break
        bar.close()
    return {name: TraceEstimate(tuple(s)) for name, s in samples.items()}
