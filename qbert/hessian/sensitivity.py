"""Layer sensitivities for bit allocation: Q-BERT's eigenvalue rule and HAWQ-V2's trace-weighted error.

A second-order expansion of the loss around trained weights (gradient ~ 0) gives, for a perturbation
dW_i = Q_b(W_i) - W_i of one layer,

    dL ~= 1/2 dW_i^T H_i dW_i,

which HAWQ-V2 approximates with the mean eigenvalue Tr(H_i)/n_i and Q-BERT bounds with the top one:

    HAWQ-V2:  Omega_i(b) = Tr(H_i) / n_i * ||Q_b(W_i) - W_i||^2          (``hawq_sensitivity``)
    Q-BERT:   Omega_i    = |mean_s lambda_i^(s)| + std_s lambda_i^(s)    (``qbert_sensitivity``; s runs over
                                                                          data subsets, std with ddof = 0)
              Omega_i(b) = Omega_i * ||Q_b(W_i) - W_i||^2                (``eigen_sensitivity``, the same
                                                                          form with Omega_i as curvature)

n_i = W_i.numel(). Q_b quantizes and dequantizes under format b exactly as ``QLinear`` stores it:
packed formats through ``quantize_lowbit`` / ``dequantize_lowbit`` with the format's scheme, int8
formats with their per-channel symmetric int8 rule. The constant 1/2 is dropped: it does not change
an allocation. A negative trace (a non-convex block) is kept as it is, as in HAWQ-V2.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from qbert.hessian.eigen import top_eigenvalues
from qbert.hessian.hvp import Batch, LossFn, module_weights
from qbert.hessian.trace import TraceEstimate
from qbert.nn.formats import LinearFormat
from qbert.nn.qat import fake_quantize_weight


def quantize_dequantize(weight: torch.Tensor, fmt: LinearFormat) -> torch.Tensor:
    """Q_b(W): the float32 weight [N, K] that a ``QLinear`` of format ``fmt`` made from ``weight`` stands for."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_dequantize: expected a weight [N, K], got shape {list(weight.shape)}")
    return fake_quantize_weight(weight.detach().float(), fmt)


def quantization_error(weight: torch.Tensor, fmt: LinearFormat) -> float:
    """||Q_b(W) - W||^2 (float64 sum)."""
    return (quantize_dequantize(weight, fmt).double() - weight.detach().double()).pow(2).sum().item()


def curvature_sensitivity(model: nn.Module, curvature: Mapping[str, float],
                          formats: Sequence[LinearFormat]) -> dict[str, dict[LinearFormat, float]]:
    """``{name: {b: curvature[name] * ||Q_b(W) - W||^2}}`` for every module named in ``curvature``."""
    if not formats:
        raise ValueError("formats is empty: give the candidate formats of the allocation")
    weights = module_weights(model, list(curvature))
    return {name: {fmt: curvature[name] * quantization_error(weights[name], fmt) for fmt in formats}
            for name in weights}


def hawq_sensitivity(model: nn.Module, traces: Mapping[str, TraceEstimate | float],
                     formats: Sequence[LinearFormat]) -> dict[str, dict[LinearFormat, float]]:
    """HAWQ-V2: Omega_i(b) = Tr(H_i) / n_i * ||Q_b(W_i) - W_i||^2 (module docstring).

    traces: ``hutchinson_traces``' result, or plain traces as floats.
    """
    weights = module_weights(model, list(traces))
    mean_eigenvalue = {name: (t.mean if isinstance(t, TraceEstimate) else float(t)) / weights[name].numel()
                       for name, t in traces.items()}
    return curvature_sensitivity(model, mean_eigenvalue, formats)


def eigen_sensitivity(model: nn.Module, omega: Mapping[str, float],
                      formats: Sequence[LinearFormat]) -> dict[str, dict[LinearFormat, float]]:
    """Q-BERT's Omega_i as the curvature: Omega_i(b) = Omega_i * ||Q_b(W_i) - W_i||^2 (module docstring)."""
    return curvature_sensitivity(model, omega, formats)


def qbert_sensitivity(model: nn.Module, module_names: Sequence[str], subsets: Sequence[Iterable[Batch]],
                      loss_fn: LossFn, *, max_iter: int = 100, rel_tol: float = 1e-3, seed: int = 0,
                      progress: bool = True) -> dict[str, float]:
    """Q-BERT: Omega_i = |mean_s lambda_i^(s)| + std_s lambda_i^(s) over the data ``subsets``.

    lambda_i^(s) is ``top_eigenvalues`` on subset s (a list of batches), same seed for every subset;
    std is the population standard deviation (ddof = 0), so one subset gives Omega_i = |lambda_i|.
    """
    if not subsets:
        raise ValueError("qbert_sensitivity: subsets is empty")
    per_subset = [top_eigenvalues(model, module_names, subset, loss_fn, max_iter=max_iter, rel_tol=rel_tol,
                                  seed=seed, progress=progress) for subset in subsets]
    omega = {}
    for name in per_subset[0]:
        values = [eig[name] for eig in per_subset]
        omega[name] = abs(math.fsum(values) / len(values)) + statistics.pstdev(values)
    return omega
