"""Layer sensitivities for bit allocation: Q-BERT's eigenvalue rule and HAWQ-V2's trace-weighted error,
for round-to-nearest or GPTQ rounding.

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
formats with their per-channel symmetric int8 rule (round to nearest). The constant 1/2 is dropped: it
does not change an allocation. A negative trace (a non-convex block) is kept as it is, as in HAWQ-V2.

GPTQ rounding (``rounding="gptq"``, ``qbert.quant.gptq``) chooses other codes than round to nearest: it
moves rounding error into the directions of weight space that the layer's inputs do not excite. Its
weight-space error ||Q_gptq(W) - W||^2 is often *larger* than round to nearest's although the layer's
outputs are much closer, so it cannot stand in for ||Q_b(W) - W||^2 above (that term measures the error
in every direction alike). Instead the round-to-nearest term is scaled by how much GPTQ reduces the
layer-output error for format b:

    Omega_i^gptq(b) = Omega_i(b) * r_i(b),    r_i(b) = e_i(Q_gptq,b(W_i)) / e_i(Q_b(W_i))   (``gptq_error_ratios``)
    e_i(W_hat)      = tr((W_hat - W_i) Hx_i (W_hat - W_i)^T) / 2                (``reconstruction_error``)
    Hx_i            = 2 X_i^T X_i / T                                            [K, K]

where X_i [T, K] are the inputs of layer i over the T tokens of calibration batches run through the
*float* model (``qbert.nn.gptq.input_hessians``: one forward pass over the batches per stage, one stage's
Hx at a time; Q, K and V share theirs). Both roundings are measured by the same metric e_i, and round to
nearest keeps its HAWQ-V2 / Q-BERT value (r = 1). Where e_i(Q_b(W_i)) = 0 (the weights are exactly
representable, or their error lies where no input reaches) there is nothing to reduce and r_i(b) = 1.
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
from qbert.nn.gptq import GPTQ, NEAREST, Rounding, calibration_batches, input_hessians, rounding_of
from qbert.nn.qat import fake_quantize_weight
from qbert.quant.gptq import gptq_quantize, reconstruction_error

GPTQ_ROUNDING = Rounding(GPTQ)


def quantize_dequantize(weight: torch.Tensor, fmt: LinearFormat) -> torch.Tensor:
    """Q_b(W): the float32 weight [N, K] that a ``QLinear`` of format ``fmt`` made from ``weight`` stands for."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_dequantize: expected a weight [N, K], got shape {list(weight.shape)}")
    return fake_quantize_weight(weight.detach().float(), fmt)


def quantization_error(weight: torch.Tensor, fmt: LinearFormat) -> float:
    """||Q_b(W) - W||^2 (float64 sum)."""
    return (quantize_dequantize(weight, fmt).double() - weight.detach().double()).pow(2).sum().item()


def gptq_error_ratios(model: nn.Module, names: Sequence[str], formats: Sequence[LinearFormat],
                      batches: Iterable[Mapping], rounding: str | Rounding = GPTQ_ROUNDING, *,
                      progress: bool = True) -> dict[str, dict[LinearFormat, float]]:
    """``{name: {b: r(b)}}``, r(b) = e(Q_gptq,b(W)) / e(Q_b(W)): how much GPTQ rounding reduces the layer-output
    error of round to nearest for format b (module docstring; 1 where round to nearest's error is 0).

    batches: dicts of model inputs (``model(**batch)``), through the float model once per stage of
    ``qbert.nn.gptq.input_hessians``. rounding: ``"gptq"`` or a GPTQ ``qbert.nn.Rounding`` (its damp,
    block_size and act_order are GPTQ's). A layer whose inputs are all zero is a ``GPTQError`` naming it.
    """
    if not formats:
        raise ValueError("gptq_error_ratios: formats is empty: give the candidate formats of the allocation")
    rounding = rounding_of(rounding, "gptq_error_ratios")
    if rounding.method != GPTQ:
        raise ValueError(f"gptq_error_ratios: rounding must be GPTQ (round to nearest's ratio is 1 by definition), "
                         f"got {rounding.describe()!r}")
    weights = module_weights(model, names)
    batches = calibration_batches(model, batches, "gptq_error_ratios")
    ratios: dict[str, dict[LinearFormat, float]] = {}
    for stage, hessian in input_hessians(model, list(weights), batches, progress=progress,
                                         caller="gptq_error_ratios"):
        for name in stage:
            weight = weights[name].detach()
            ratios[name] = {}
            for fmt in formats:
                nearest = reconstruction_error(weight, quantize_dequantize(weight, fmt), hessian)
                gptq = gptq_quantize(weight, hessian, fmt, damp=rounding.damp, block_size=rounding.block_size,
                                     act_order=rounding.act_order, name=name).dequantized
                ratios[name][fmt] = reconstruction_error(weight, gptq, hessian) / nearest if nearest > 0 else 1.0
        del hessian  # else this stage's H stays alive while the generator computes the next stage's
    return {name: ratios[name] for name in weights}


def _sensitivity(model: nn.Module, curvature: Mapping[str, float], formats: Sequence[LinearFormat],
                 rounding: str | Rounding, calibration: Iterable[Mapping] | None, progress: bool,
                 caller: str) -> dict[str, dict[LinearFormat, float]]:
    """curvature * ||Q_b(W) - W||^2, times ``gptq_error_ratios`` under GPTQ rounding (module docstring)."""
    if not formats:
        raise ValueError(f"{caller}: formats is empty: give the candidate formats of the allocation")
    rounding = rounding_of(rounding, caller)
    if rounding.method == NEAREST and calibration is not None:
        raise ValueError(f"{caller}: calibration is only used by rounding='gptq'; round to nearest needs no data "
                         f"(pass rounding='gptq', or leave calibration out)")
    if rounding.method == GPTQ:
        calibration = calibration_batches(model, calibration, caller)
    weights = module_weights(model, list(curvature))
    omega = {name: {fmt: curvature[name] * quantization_error(weights[name], fmt) for fmt in formats}
             for name in weights}
    if rounding.method == NEAREST:
        return omega
    ratios = gptq_error_ratios(model, list(weights), formats, calibration, rounding, progress=progress)
    return {name: {fmt: value * ratios[name][fmt] for fmt, value in row.items()} for name, row in omega.items()}


def curvature_sensitivity(model: nn.Module, curvature: Mapping[str, float], formats: Sequence[LinearFormat], *,
                          rounding: str | Rounding = NEAREST, calibration: Iterable[Mapping] | None = None,
                          progress: bool = True) -> dict[str, dict[LinearFormat, float]]:
    """``{name: {b: curvature[name] * ||Q_b(W) - W||^2}}`` for every module named in ``curvature``; with
    ``rounding="gptq"`` (or a GPTQ ``Rounding``) each value times ``gptq_error_ratios`` over ``calibration``
    (dicts of model inputs; required then, refused with round to nearest)."""
    return _sensitivity(model, curvature, formats, rounding, calibration, progress, "curvature_sensitivity")


def hawq_sensitivity(model: nn.Module, traces: Mapping[str, TraceEstimate | float],
                     formats: Sequence[LinearFormat], *, rounding: str | Rounding = NEAREST,
                     calibration: Iterable[Mapping] | None = None,
                     progress: bool = True) -> dict[str, dict[LinearFormat, float]]:
    """HAWQ-V2: Omega_i(b) = Tr(H_i) / n_i * ||Q_b(W_i) - W_i||^2, times r_i(b) under GPTQ rounding (module
    docstring; ``rounding`` / ``calibration`` as in ``curvature_sensitivity``).

    traces: ``hutchinson_traces``' result, or plain traces as floats.
    """
    weights = module_weights(model, list(traces))
    mean_eigenvalue = {name: (t.mean if isinstance(t, TraceEstimate) else float(t)) / weights[name].numel()
                       for name, t in traces.items()}
    return _sensitivity(model, mean_eigenvalue, formats, rounding, calibration, progress, "hawq_sensitivity")


def eigen_sensitivity(model: nn.Module, omega: Mapping[str, float], formats: Sequence[LinearFormat], *,
                      rounding: str | Rounding = NEAREST, calibration: Iterable[Mapping] | None = None,
                      progress: bool = True) -> dict[str, dict[LinearFormat, float]]:
    """Q-BERT's Omega_i as the curvature: Omega_i(b) = Omega_i * ||Q_b(W_i) - W_i||^2, times r_i(b) under GPTQ
    rounding (module docstring; ``rounding`` / ``calibration`` as in ``curvature_sensitivity``)."""
    return _sensitivity(model, omega, formats, rounding, calibration, progress, "eigen_sensitivity")


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
